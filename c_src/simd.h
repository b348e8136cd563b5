/* simd.h - reductions over a row in a fixed order.
 *
 * Each sum keeps PN_LANES independent partial sums (element i goes to lane
 * i % PN_LANES) and adds them up in a fixed tree at the end. The compiler turns
 * the lane loop into vector instructions of whatever width the ISA has (one
 * AVX-512 register holds 16 floats, AVX2 8, SSE 4), but the order of additions
 * is the same in every build: results are bit-identical across ISAs. 32 lanes
 * also give the CPU several independent add chains to overlap. */
#ifndef PYNORM_SIMD_H
#define PYNORM_SIMD_H

#include <stdint.h>

#define PN_LANES 64

static inline real pn_lanes_total(real *acc) {
    for (int w = PN_LANES / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

/* sum of (x[i] - shift) */
static inline real pn_sum_shifted(const real *x, int64_t n, real shift) {
    real acc[PN_LANES] = {0};
    int64_t i = 0;
    for (; i + PN_LANES <= n; i += PN_LANES)
        for (int j = 0; j < PN_LANES; j++) acc[j] += x[i + j] - shift;
    for (int j = 0; i + j < n; j++) acc[j] += x[i + j] - shift;
    return pn_lanes_total(acc);
}

/* Sums of squares in double: a float32 square overflows above 1.8e19 and
 * underflows below 1e-19, and a float32 sum of many equal squares drifts by
 * several ulps. The lanes and their order stay fixed. */
static inline double pn_lanes_total_d(double *acc) {
    for (int w = PN_LANES / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

/* sum of ((x[i] - shift) - m)^2, in the compute type */
static inline real pn_sumsq_centered(const real *x, int64_t n, real shift, real m) {
    real acc[PN_LANES] = {0};
    int64_t i = 0;
    for (; i + PN_LANES <= n; i += PN_LANES)
        for (int j = 0; j < PN_LANES; j++) { real d = (x[i + j] - shift) - m; acc[j] += d * d; }
    for (int j = 0; i + j < n; j++) { real d = (x[i + j] - shift) - m; acc[j] += d * d; }
    return pn_lanes_total(acc);
}

/* the same in double */
static inline double pn_sumsq_centered_d(const real *x, int64_t n, real shift, real m) {
    double acc[PN_LANES] = {0};
    int64_t i = 0;
    for (; i + PN_LANES <= n; i += PN_LANES)
        for (int j = 0; j < PN_LANES; j++) { double d = (x[i + j] - shift) - m; acc[j] += d * d; }
    for (int j = 0; i + j < n; j++) { double d = (x[i + j] - shift) - m; acc[j] += d * d; }
    return pn_lanes_total_d(acc);
}

/* sum of x[i]^2 */
static inline double pn_sumsq(const real *x, int64_t n) {
    double acc[PN_LANES] = {0};
    int64_t i = 0;
    for (; i + PN_LANES <= n; i += PN_LANES)
        for (int j = 0; j < PN_LANES; j++) { double v = x[i + j]; acc[j] += v * v; }
    for (int j = 0; i + j < n; j++) { double v = x[i + j]; acc[j] += v * v; }
    return pn_lanes_total_d(acc);
}

#endif /* PYNORM_SIMD_H */
