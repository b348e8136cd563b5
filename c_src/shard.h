/* shard.h - what the sharded token norms (layernorm_shard.c, rmsnorm_shard.c)
 * share: their argument block, double-precision row sums in a fixed order,
 * and (in the public build) their argument checks. Internal to the library.
 *
 * A shard is this process's slice of the C columns of every row; statistics
 * of the whole row come from the caller (after its collective) as float64
 * mean/rstd arrays of B*T values, and the backward's row sums as float64.
 */
#ifndef PYNORM_SHARD_H
#define PYNORM_SHARD_H

#include "common.h"

typedef struct {
    pn_token_args t;            /* pointers, sizes, dtypes, resolved strides */
    double *part;               /* stats / backward_sums output */
    const double *mean, *rstd;  /* the whole row's statistics */
    const double *sums;         /* backward: row sums totalled over the shards */
    int64_t C_total;            /* backward: the whole row's width */
} pn_shard_args;

typedef pn_status (*pn_shard_kernel)(const pn_shard_args *);

static inline pn_status pn_run_shard(const pn_shard_kernel table[3][2], const pn_shard_args *a) {
    return table[pn_isa_index()][a->t.dtype == PN_FLOAT64](a);
}

#ifndef PN_KERNEL_BUILD
/* ---- argument checks -------------------------------------------------------- */

static inline pn_view pn_shard_rows_view(const void *p, const pn_token_args *a, pn_rowmap m) {
    pn_view v = {p, a->B, a->T, {m.b, m.t}, a->C, pn_dtype_size(a->dtype)};
    return v;
}
static inline pn_view pn_shard_flat(const void *p, int64_t n, size_t esize) {
    pn_view v = {p, 1, 1, {0, 0}, n, esize};
    return v;
}

/* Sizes, dtypes and strides of a shard call (x is required). */
static inline pn_status pn_shard_check_common(pn_token_args *a, const pn_strides *strides) {
    pn_status st;
    if (!a->inp) return PN_ERR_NULL;
    if ((st = pn_check_dtypes(a->dtype, a->wdtype))) return st;
    if ((st = pn_check_sizes(a->B, a->T, a->C, a->dtype))) return st;
    a->s = pn_resolve_all(strides, NULL, a->T, 1, a->C);
    return PN_OK;
}

/* stats: out = part (rows * per doubles), in = x. */
static inline pn_status pn_shard_check_stats(pn_shard_args *s, const pn_strides *strides, int per) {
    pn_status st;
    if (!s->part) return PN_ERR_NULL;
    if ((st = pn_shard_check_common(&s->t, strides))) return st;
    pn_view outs[1] = {pn_shard_flat(s->part, s->t.B * s->t.T * per, 8)};
    pn_view ins[1] = {pn_shard_rows_view(s->t.inp, &s->t, s->t.s.inp)};
    return pn_check_views(outs, 1, ins, 1, NULL);
}

/* apply: out = y, in = x (y may be x itself), weight, bias, mean, rstd. */
static inline pn_status pn_shard_check_apply(pn_shard_args *s, const pn_strides *strides, int need_mean) {
    pn_status st;
    pn_token_args *a = &s->t;
    if (!a->out || !s->rstd || (need_mean && !s->mean)) return PN_ERR_NULL;
    if ((st = pn_shard_check_common(a, strides))) return st;
    const int64_t rows = a->B * a->T;
    pn_view outs[1] = {pn_shard_rows_view(a->out, a, a->s.out)};
    pn_view ins[5] = {pn_shard_rows_view(a->inp, a, a->s.inp), pn_shard_flat(a->weight, a->C, pn_dtype_size(a->wdtype)),
                      pn_shard_flat(a->bias, a->C, pn_dtype_size(a->wdtype)), pn_shard_flat(s->mean, rows, 8),
                      pn_shard_flat(s->rstd, rows, 8)};
    static const unsigned char same_ok[5] = {1, 0, 0, 0, 0};
    return pn_check_views(outs, 1, ins, 5, same_ok);
}

/* backward_sums: out = sums (rows * per), in = dy, x, weight, mean, rstd. */
static inline pn_status pn_shard_check_bsums(pn_shard_args *s, const pn_strides *strides, int per, int need_mean) {
    pn_status st;
    pn_token_args *a = &s->t;
    if (!s->part || !a->dout || !s->rstd || (need_mean && !s->mean)) return PN_ERR_NULL;
    if ((st = pn_shard_check_common(a, strides))) return st;
    const int64_t rows = a->B * a->T;
    pn_view outs[1] = {pn_shard_flat(s->part, rows * per, 8)};
    pn_view ins[5] = {pn_shard_rows_view(a->dout, a, a->s.dout), pn_shard_rows_view(a->inp, a, a->s.inp),
                      pn_shard_flat(a->weight, a->C, pn_dtype_size(a->wdtype)), pn_shard_flat(s->mean, rows, 8),
                      pn_shard_flat(s->rstd, rows, 8)};
    return pn_check_views(outs, 1, ins, 5, NULL);
}

/* backward: outs = dx, dweight, dbias, scratch; ins = dy, x, weight, mean,
 * rstd, sums. dx may be written over dy or x. */
static inline pn_status pn_shard_check_backward(pn_shard_args *s, const pn_strides *strides, int per,
                                                int need_mean, int flags, size_t scratch_bytes,
                                                size_t scratch_needed) {
    pn_status st;
    pn_token_args *a = &s->t;
    if (flags & ~PN_ACCUMULATE) return PN_ERR_ARG;
    if (!a->dout || !s->rstd || !s->sums || (need_mean && !s->mean)) return PN_ERR_NULL;
    if ((st = pn_shard_check_common(a, strides))) return st;
    if (s->C_total < a->C) return PN_ERR_SIZE;
    if (a->scratch && scratch_bytes < scratch_needed) return PN_ERR_SCRATCH;
    const int64_t rows = a->B * a->T;
    const size_t wes = pn_dtype_size(a->wdtype);
    pn_view outs[4] = {pn_shard_rows_view(a->dinp, a, a->s.dinp), pn_shard_flat(a->dweight, a->C, wes),
                       pn_shard_flat(a->dbias, a->C, wes),
                       pn_shard_flat((a->dweight || a->dbias) ? a->scratch : NULL, (int64_t)scratch_bytes, 1)};
    pn_view ins[6] = {pn_shard_rows_view(a->dout, a, a->s.dout), pn_shard_rows_view(a->inp, a, a->s.inp),
                      pn_shard_flat(a->weight, a->C, wes), pn_shard_flat(s->mean, rows, 8),
                      pn_shard_flat(s->rstd, rows, 8), pn_shard_flat(s->sums, rows * per, 8)};
    static const unsigned char same_ok[4 * 6] = {1, 1, 0, 0, 0, 0};
    return pn_check_views(outs, 4, ins, 6, same_ok);
}

/* combine: widths all >= 1 and their total fits; returns the total in *C. */
static inline pn_status pn_shard_check_widths(const int64_t *widths, int64_t nshards, int64_t *C) {
    int64_t total = 0;
    if (!widths) return PN_ERR_NULL;
    if (nshards <= 0) return PN_ERR_SIZE;
    for (int64_t p = 0; p < nshards; p++)
        if (widths[p] <= 0 || __builtin_add_overflow(total, widths[p], &total)) return PN_ERR_SIZE;
    *C = total;
    return PN_OK;
}

/* Runs a backward variant, taking (and freeing) scratch when the caller gave none. */
static inline pn_status pn_run_shard_backward(const pn_shard_kernel table[3][2], pn_shard_args *s, int nparam) {
    void *own = NULL;
    pn_token_args *a = &s->t;
    if (!a->dinp && !a->dweight && !a->dbias) return PN_OK;
    if ((a->dweight || a->dbias) && !a->scratch) {
        own = malloc(pn_token_scratch_size(a->B, a->T, a->C, a->dtype, nparam));
        if (!own) return PN_ERR_ALLOC;
        a->scratch = own;
    }
    pn_status st = pn_run_shard(table, s);
    free(own);
    return st;
}

#else /* PN_KERNEL_BUILD ------------------------------------------------------ */
#include "kernel.h"

/* Sums in double over a row, PN_LANES lanes added in a fixed tree: the same
 * bits in every ISA build. */
static inline double pn_shard_sum_shifted_d(const real *x, int64_t n, double shift) {
    double acc[PN_LANES] = {0};
    int64_t i = 0;
    for (; i + PN_LANES <= n; i += PN_LANES)
        for (int j = 0; j < PN_LANES; j++) acc[j] += (double)x[i + j] - shift;
    for (int j = 0; i + j < n; j++) acc[j] += (double)x[i + j] - shift;
    return pn_lanes_total_d(acc);
}

/* sum of ((x - shift) - m)^2 in double, x - shift taken in double (exact for
 * float data). */
static inline double pn_shard_m2_d(const real *x, int64_t n, double shift, double m) {
    double acc[PN_LANES] = {0};
    int64_t i = 0;
    for (; i + PN_LANES <= n; i += PN_LANES)
        for (int j = 0; j < PN_LANES; j++) { double d = ((double)x[i + j] - shift) - m; acc[j] += d * d; }
    for (int j = 0; i + j < n; j++) { double d = ((double)x[i + j] - shift) - m; acc[j] += d * d; }
    return pn_lanes_total_d(acc);
}

/* The token norms' backward over all rows (layernorm.c, rmsnorm.c), which the
 * sharded backwards run with the combined statistics and row sums. */
pn_status PN_KERNEL(layernorm_backward_rows)(const pn_token_args *a, const pn_shard_args *sh);
pn_status PN_KERNEL(rmsnorm_backward_rows)(const pn_token_args *a, const pn_shard_args *sh);

/* A double mean as a pair of reals (hi + lo): (x - hi) - lo centres a row in
 * the compute type without the rounding error of a real mean (x - hi is
 * exact for x near hi). */
static inline void pn_shard_split(double m, real *hi, real *lo) {
    *hi = (real)m;
    *lo = (real)(m - (double)*hi);
}

#endif /* PN_KERNEL_BUILD */
#endif /* PYNORM_SHARD_H */
