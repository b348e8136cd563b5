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
 * from their own storage (bfloat16 widened in the loop, below); each block of PN_BLOCK_VECS * PN_LANES values is
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

/* The moments' lanes over a row whose value k is X(k): blocks of PN_BLOCK
 * values, then the tail, in the order described above. The same additions
 * whatever X reads: a row of reals, a converted block, or bfloat16 widened in
 * the loop (exact), so every reader gives the same bits. */
#define PN_MOMENTS_BLOCK(X, base, a1, a2, shift)                                                          \
    for (int v = 0; v < PN_BLOCK_VECS; v++)                                                                \
        for (int j = 0; j < PN_LANES; j++) { real d = X((base) + v * PN_LANES + j) - (shift); (a1)[j] += d; (a2)[j] += d * d; }
#define PN_MOMENTS_TAIL(X, base, m, a1, a2, shift)                                                         \
    do {                                                                                                    \
        int64_t k = 0;                                                                                      \
        for (; k + PN_LANES <= (m); k += PN_LANES)                                                          \
            for (int j = 0; j < PN_LANES; j++) { real d = X((base) + k + j) - (shift); (a1)[j] += d; (a2)[j] += d * d; } \
        for (int j = 0; k + j < (m); j++) { real d = X((base) + k + j) - (shift); (a1)[j] += d; (a2)[j] += d * d; } \
    } while (0)

/* A bfloat16 row is widened in the loop (a shift of each value in
 * registers), as the forward's y pieces read it: no pass that writes the
 * block into blk and reads it back. */
static inline void pn_moments_shifted_bf16(const uint16_t *xb, int64_t n, real shift, double *sum, double *sumsq) {
    real a1[PN_LANES] = {0}, a2[PN_LANES] = {0};
    double t1[PN_DLANES] = {0}, t2[PN_DLANES] = {0};
#define PN_XB(k) ((real)pn_bf16_to_float(xb[k]))
    int64_t i = 0;
    for (; i + PN_BLOCK <= n; i += PN_BLOCK) {
        PN_MOMENTS_BLOCK(PN_XB, i, a1, a2, shift);
        pn_flush_lanes(t1, a1);
        pn_flush_lanes(t2, a2);
    }
    if (i < n) PN_MOMENTS_TAIL(PN_XB, i, n - i, a1, a2, shift);
#undef PN_XB
    pn_flush_lanes(t1, a1);
    pn_flush_lanes(t2, a2);
    *sum = pn_dlanes_total(t1);
    *sumsq = pn_dlanes_total(t2);
}

/* pn_moments_shifted on row src of dtype dt */
static inline void pn_moments_shifted_row(const void *src, pn_dtype dt, int64_t n, real shift,
                                          double *sum, double *sumsq) {
    if (pn_widen_in_loop(dt)) {
        pn_moments_shifted_bf16((const uint16_t *)src, n, shift, sum, sumsq);
        return;
    }
    real a1[PN_LANES] = {0}, a2[PN_LANES] = {0}, blk[PN_BLOCK];
    double t1[PN_DLANES] = {0}, t2[PN_DLANES] = {0};
    const real *x;
#define PN_XR(k) (x[k])
    int64_t i = 0;
    for (; i + PN_BLOCK <= n; i += PN_BLOCK) {
        x = pn_block_as_real(src, dt, i, PN_BLOCK, blk);
        PN_MOMENTS_BLOCK(PN_XR, 0, a1, a2, shift);
        pn_flush_lanes(t1, a1);
        pn_flush_lanes(t2, a2);
    }
    if (i < n) {
        x = pn_block_as_real(src, dt, i, n - i, blk);
        PN_MOMENTS_TAIL(PN_XR, 0, n - i, a1, a2, shift);
    }
#undef PN_XR
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
#define PN_SUMSQ_BLOCK(X, base, a)                                                                         \
    for (int v = 0; v < PN_BLOCK_VECS; v++)                                                                \
        for (int j = 0; j < PN_LANES; j++) { real d = X((base) + v * PN_LANES + j); (a)[j] += d * d; }
#define PN_SUMSQ_TAIL(X, base, m, a)                                                                       \
    do {                                                                                                    \
        int64_t k = 0;                                                                                      \
        for (; k + PN_LANES <= (m); k += PN_LANES)                                                          \
            for (int j = 0; j < PN_LANES; j++) { real d = X((base) + k + j); (a)[j] += d * d; }             \
        for (int j = 0; k + j < (m); j++) { real d = X((base) + k + j); (a)[j] += d * d; }                   \
    } while (0)

/* bfloat16 widened in the loop, as in pn_moments_shifted_bf16 */
static inline double pn_sumsq_folded_bf16(const uint16_t *xb, int64_t n) {
    real a[PN_LANES] = {0};
    double t[PN_DLANES] = {0};
#define PN_XB(k) ((real)pn_bf16_to_float(xb[k]))
    int64_t i = 0;
    for (; i + PN_BLOCK <= n; i += PN_BLOCK) {
        PN_SUMSQ_BLOCK(PN_XB, i, a);
        pn_flush_lanes(t, a);
    }
    if (i < n) PN_SUMSQ_TAIL(PN_XB, i, n - i, a);
#undef PN_XB
    pn_flush_lanes(t, a);
    return pn_dlanes_total(t);
}

static inline double pn_sumsq_folded_row(const void *src, pn_dtype dt, int64_t n) {
    if (pn_widen_in_loop(dt)) return pn_sumsq_folded_bf16((const uint16_t *)src, n);
    real a[PN_LANES] = {0}, blk[PN_BLOCK];
    double t[PN_DLANES] = {0};
    const real *x;
#define PN_XR(k) (x[k])
    int64_t i = 0;
    for (; i + PN_BLOCK <= n; i += PN_BLOCK) {
        x = pn_block_as_real(src, dt, i, PN_BLOCK, blk);
        PN_SUMSQ_BLOCK(PN_XR, 0, a);
        pn_flush_lanes(t, a);
    }
    if (i < n) {
        x = pn_block_as_real(src, dt, i, n - i, blk);
        PN_SUMSQ_TAIL(PN_XR, 0, n - i, a);
    }
#undef PN_XR
    pn_flush_lanes(t, a);
    return pn_dlanes_total(t);
}

static inline double pn_sumsq_folded(const real *x, int64_t n) { return pn_sumsq_folded_row(x, PN_REAL_DTYPE, n); }

#endif /* PYNORM_SIMD_H */
