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

#include "dtype.h"   /* rows of half precision read block by block */

#define PN_LANES 64

/* The fixed tree: lane j adds lane j + w for w = 32, 16, ..., 1. The steps
 * are written out: as a loop over w, GCC kept the lanes in memory and added
 * them one at a time (the LayerNorm forward spent 12% of its time there). */
#define PN_HALVE(acc, w) for (int j = 0; j < (w); j++) (acc)[j] += (acc)[j + (w)]
#define PN_TREE_16(acc) do { PN_HALVE(acc, 8); PN_HALVE(acc, 4); PN_HALVE(acc, 2); PN_HALVE(acc, 1); } while (0)
#define PN_TREE_64(acc) do { PN_HALVE(acc, 32); PN_HALVE(acc, 16); PN_TREE_16(acc); } while (0)
#if PN_LANES != 64
#error "PN_TREE_64 adds up exactly 64 lanes"
#endif

static inline real pn_lanes_total(real *acc) {
    PN_TREE_64(acc);
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
    PN_TREE_64(acc);
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

/* One-pass moments of a row: sum of d and of d^2, d = x[i] - shift. The
 * lanes add in the compute type over blocks of PN_BLOCK_VECS * PN_LANES
 * values (chains of 16 additions), then fold into PN_DLANES double lanes
 * (lane j takes float lanes j, j + 16, j + 32, j + 48, in that order), which
 * keeps the sums close to double accuracy. */
#define PN_BLOCK_VECS 16
#define PN_DLANES 16

static inline void pn_flush_lanes(double *total, real *acc) {
    for (int q = 0; q < PN_LANES; q += PN_DLANES)
        for (int j = 0; j < PN_DLANES; j++) total[j] += (double)acc[q + j];
    for (int j = 0; j < PN_LANES; j++) acc[j] = 0;
}

#if PN_DLANES != 16
#error "PN_TREE_16 adds up exactly 16 lanes"
#endif
static inline double pn_dlanes_total(double *t) {
    PN_TREE_16(t);
    return t[0];
}

/* Rows in another dtype than `real` (half precision) are summed straight
 * from their own storage: each block of PN_BLOCK_VECS * PN_LANES values is
 * converted into a buffer on the stack (4 KiB of float, in L1) and summed
 * from there. The lanes, blocks and flushes are those of the converted row,
 * so the sums have the bits they have on a converted row, while the row
 * needs no row-sized buffer of reals that competes with w and b for L1. */
#define PN_BLOCK (PN_BLOCK_VECS * PN_LANES)

/* the values [i, i + n) of row src (dtype dt) as reals: in place when the
 * row holds reals, else converted into blk */
static inline const real *pn_block_as_real(const void *src, pn_dtype dt, int64_t i, int64_t n, real *blk) {
    return pn_row_as_real((const char *)src + i * (int64_t)pn_dtype_size(dt), dt, blk, n);
}

/* pn_moments_shifted on row src of dtype dt */
static inline void pn_moments_shifted_row(const void *src, pn_dtype dt, int64_t n, real shift,
                                          double *sum, double *sumsq) {
    real a1[PN_LANES] = {0}, a2[PN_LANES] = {0}, blk[PN_BLOCK];
    double t1[PN_DLANES] = {0}, t2[PN_DLANES] = {0};
    int64_t i = 0;
    for (; i + PN_BLOCK <= n; i += PN_BLOCK) {
        const real *x = pn_block_as_real(src, dt, i, PN_BLOCK, blk);
        for (int v = 0; v < PN_BLOCK_VECS; v++)
            for (int j = 0; j < PN_LANES; j++) { real d = x[v * PN_LANES + j] - shift; a1[j] += d; a2[j] += d * d; }
        pn_flush_lanes(t1, a1);
        pn_flush_lanes(t2, a2);
    }
    if (i < n) {
        const int64_t m = n - i;
        const real *x = pn_block_as_real(src, dt, i, m, blk);
        int64_t k = 0;
        for (; k + PN_LANES <= m; k += PN_LANES)
            for (int j = 0; j < PN_LANES; j++) { real d = x[k + j] - shift; a1[j] += d; a2[j] += d * d; }
        for (int j = 0; k + j < m; j++) { real d = x[k + j] - shift; a1[j] += d; a2[j] += d * d; }
    }
    pn_flush_lanes(t1, a1);
    pn_flush_lanes(t2, a2);
    *sum = pn_dlanes_total(t1);
    *sumsq = pn_dlanes_total(t2);
}

static inline void pn_moments_shifted(const real *x, int64_t n, real shift, double *sum, double *sumsq) {
    pn_moments_shifted_row(x, PN_REAL_DTYPE, n, shift, sum, sumsq);
}

/* sum of x[i]^2 the same way: squares and blocks in the compute type, folded
 * into double lanes; no conversions, and twice the values per vector of
 * pn_sumsq. Float squares overflow above 1.8e19 and lose bits below 1e-19,
 * so a caller checks the sum's range and falls back to pn_sumsq. */
static inline double pn_sumsq_folded_row(const void *src, pn_dtype dt, int64_t n) {
    real a[PN_LANES] = {0}, blk[PN_BLOCK];
    double t[PN_DLANES] = {0};
    int64_t i = 0;
    for (; i + PN_BLOCK <= n; i += PN_BLOCK) {
        const real *x = pn_block_as_real(src, dt, i, PN_BLOCK, blk);
        for (int v = 0; v < PN_BLOCK_VECS; v++)
            for (int j = 0; j < PN_LANES; j++) { real d = x[v * PN_LANES + j]; a[j] += d * d; }
        pn_flush_lanes(t, a);
    }
    if (i < n) {
        const int64_t m = n - i;
        const real *x = pn_block_as_real(src, dt, i, m, blk);
        int64_t k = 0;
        for (; k + PN_LANES <= m; k += PN_LANES)
            for (int j = 0; j < PN_LANES; j++) { real d = x[k + j]; a[j] += d * d; }
        for (int j = 0; k + j < m; j++) { real d = x[k + j]; a[j] += d * d; }
    }
    pn_flush_lanes(t, a);
    return pn_dlanes_total(t);
}

static inline double pn_sumsq_folded(const real *x, int64_t n) { return pn_sumsq_folded_row(x, PN_REAL_DTYPE, n); }

#endif /* PYNORM_SIMD_H */
