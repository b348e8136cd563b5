/* spatial.h - what the spatial norms (GroupNorm, InstanceNorm, BatchNorm)
 * share: their argument block, their argument checks and, in kernel builds,
 * the declarations of the two engines that walk the data in each layout
 * (spatial.c holds them). Internal to the library.
 *
 * A spatial norm sees N x C x S values (S = product of the spatial sizes):
 *   NCHW: row r = n*C + c holds the S values of sample n, channel c;
 *   NHWC: row r = n*S + s holds the C channels of sample n, position s.
 * Statistics are taken over "sets": GroupNorm's set is (n, g), BatchNorm's is
 * a channel. Every reduction goes through "pieces" whose bounds depend on the
 * sizes only, never on the thread count:
 *   - forward: each piece gets its own sum and M2 = sum((x - mean)^2) in two
 *     passes while it sits in cache (the values shifted first by one element
 *     of their set, as layernorm.c does, so that a mean of 1e4 with a std of
 *     1e-2 keeps its digits); NHWC pieces of 16 rows or more take both sums
 *     in one pass about a shift near the piece's mean, decided per block of
 *     PN_SP_CB channels, where the cancellation in M2 is mild (spatial.c,
 *     PN_SP_ONEPASS). Short runs of values are summed in the compute
 *     type, and every longer sum of such partial sums (a piece's rows or
 *     channels, a set's pieces) runs in double, in lanes or compensated, so
 *     that the saved mean is the set's exact mean rounded, within an ulp or
 *     two, however the set is cut. A set's pieces are merged in order: the
 *     mean from the total of their sums, then M2 with Chan's formula in
 *     double;
 *   - backward: the sums of dy and dy * (x - mean) per piece, added in order;
 *   - output: y = ((x - shift) - m) * (rstd * w) + b (mean = shift + m), or,
 *     for half-precision outputs of sets with |mean| * rstd <= 256, the
 *     folded x * (rstd * w) + beta, one multiply and one add a value, whose
 *     extra float error that bound keeps under 1/16 of the output's rounding
 *     (spatial.c, PN_SP_FOLD).
 * So results are bit-identical for every thread count and instruction set.
 * A thread takes whole sets when there are enough of them ("set-local": the
 * statistics pass leaves the set in cache for the pass that writes y or dx);
 * otherwise the passes run one after the other, each parallel over pieces.
 * Both schedules do the same arithmetic, so the choice (which depends on the
 * thread count) and the dynamic hand-out of work never change a bit.
 */
#ifndef PYNORM_SPATIAL_H
#define PYNORM_SPATIAL_H

#include "common.h"

typedef struct {
    void *out, *mean, *rstd;           /* forward outputs (mean, rstd may be NULL) */
    void *running_mean, *running_var;  /* BatchNorm running statistics, updated in training */
    void *dinp, *dweight, *dbias;      /* backward outputs (any may be NULL) */
    void *scratch;                     /* backward partial sums */
    const void *inp, *weight, *bias, *dout;
    const void *smean, *srstd;         /* backward: the statistics the forward saved */
    int64_t N, C, S, G;                /* BatchNorm: G = C */
    double eps, momentum;              /* momentum: the weight the batch statistics get */
    int batchnorm, training, accumulate;
    pn_layout layout;
    pn_dtype dtype, wdtype, rdtype;
} pn_spatial_args;

typedef pn_status (*pn_spatial_kernel)(const pn_spatial_args *);

static inline pn_status pn_run_spatial(const pn_spatial_kernel table[3][2], const pn_spatial_args *a) {
    return table[pn_isa_index()][a->dtype == PN_FLOAT64](a);
}

/* ---- pieces (shared by the kernels and the scratch-size queries) ---------- */
#define PN_SP_PIECE 4096          /* NCHW: at most this many values per piece */
#define PN_SP_PIECE_ROWS 32768    /* NHWC: about this many values per piece of rows */
#define PN_SP_GB 64               /* groups or channels per block of lanes in the merges */

static inline int64_t pn_sp_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t pn_sp_pad(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* NCHW: a segment of n contiguous values (a row of S; for GroupNorm's
 * statistics, a set's C/G rows) is cut into pieces of PN_SP_PIECE values when
 * it is long; short ones are taken PN_SP_PIECE / n at a time. The backward
 * cuts each row into pn_sp_row_pieces(S) sub-rows. */
static inline int64_t pn_sp_row_pieces(int64_t S) { return pn_sp_cdiv(S, PN_SP_PIECE); }
static inline int64_t pn_sp_rows_per_piece_nchw(int64_t S) { return S >= PN_SP_PIECE ? 1 : PN_SP_PIECE / S; }
/* NHWC: whole rows of C, about PN_SP_PIECE_ROWS values and at most
 * PN_SP_MAX_ROWS rows per piece (each channel's sums run down the rows). */
#define PN_SP_MAX_ROWS 64
static inline int64_t pn_sp_rows_per_piece(int64_t C) {
    const int64_t r = C >= PN_SP_PIECE_ROWS ? 1 : PN_SP_PIECE_ROWS / C;
    return r < PN_SP_MAX_ROWS ? r : PN_SP_MAX_ROWS;
}

/* The sets of one call in the NHWC engine: nsets sets of `rows` rows each
 * (GroupNorm: a sample's S rows; BatchNorm: all N*S rows). */
static inline int64_t pn_sp_nhwc_sets(const pn_spatial_args *a) { return a->batchnorm ? 1 : a->N; }
static inline int64_t pn_sp_nhwc_rows(const pn_spatial_args *a) { return a->batchnorm ? a->N * a->S : a->S; }

/* Backward scratch: per-piece partial sums of dy and dy * (x - mean) (reals),
 * then their totals in double per row (NCHW) or per set and channel (NHWC).
 * Returns the reals of partials; *totals gets the doubles of totals. */
static inline int64_t pn_sp_scratch_parts(const pn_spatial_args *a, int64_t *totals) {
    if (a->layout == PN_NCHW) {
        const int64_t rows = a->N * a->C;
        *totals = 2 * rows;
        return 2 * rows * pn_sp_row_pieces(a->S);
    }
    const int64_t ns = pn_sp_nhwc_sets(a), np = pn_sp_cdiv(pn_sp_nhwc_rows(a), pn_sp_rows_per_piece(a->C));
    *totals = 2 * ns * pn_sp_pad(a->C);
    return 2 * ns * np * pn_sp_pad(a->C);
}

/* Bytes of partials, rounded to 64: the totals start there (after the
 * 64-byte alignment of the scratch itself). */
static inline int64_t pn_sp_parts_bytes(int64_t parts, pn_dtype dtype) {
    return (parts * (dtype == PN_FLOAT64 ? 8 : 4) + 63) & ~(int64_t)63;
}

#ifndef PN_KERNEL_BUILD
/* ---- argument checks (the public functions) -------------------------------- */

static inline pn_view pn_sp_flat(const void *p, int64_t n, size_t esize) {
    pn_view v = {p, 1, 1, {0, 0}, n, esize};
    return v;
}

/* Scratch bytes for a backward call; 0 when the sizes are invalid. */
static inline size_t pn_sp_scratch_size(pn_spatial_args *a) {
    if (pn_check_sizes(a->N, a->C, a->S, a->dtype) != PN_OK) return 0;
    if (a->layout != PN_NCHW && a->layout != PN_NHWC) return 0;
    if (a->S == 1) a->layout = PN_NHWC;   /* (N, C): both layouts are the same memory */
    int64_t totals;
    const int64_t parts = pn_sp_scratch_parts(a, &totals);
    /* sizes passed pn_check_sizes: parts and totals are below 8 N*C*S */
    const uint64_t bytes = (uint64_t)pn_sp_parts_bytes(parts, a->dtype) + (uint64_t)totals * 8 + 64;
    if (bytes > (uint64_t)SIZE_MAX) return 0;
    return (size_t)bytes;
}

/* Every check of a spatial call, before anything is written. */
static inline pn_status pn_check_spatial(pn_spatial_args *a, int backward, size_t scratch_bytes) {
    pn_status st;
    if (!a->inp) return PN_ERR_NULL;
    if (backward ? (!a->dout || !a->smean || !a->srstd) : !a->out) return PN_ERR_NULL;
    if ((st = pn_check_dtypes(a->dtype, a->wdtype))) return st;
    if (a->layout != PN_NCHW && a->layout != PN_NHWC) return PN_ERR_ARG;
    if ((st = pn_check_sizes(a->N, a->C, a->S, a->dtype))) return st;
    if (a->G <= 0 || a->C % a->G != 0) return PN_ERR_GROUPS;
    if (!backward && (st = pn_check_eps(a->eps))) return st;
    if (a->S == 1) a->layout = PN_NHWC;   /* (N, C): both layouts are the same memory */
    const int64_t n = a->N * a->C * a->S, nstats = a->batchnorm ? a->C : a->N * a->G;
    const size_t es = pn_dtype_size(a->dtype), wes = pn_dtype_size(a->wdtype);
    const size_t ses = a->dtype == PN_FLOAT64 ? 8 : 4, res = pn_dtype_size(a->rdtype);
    if (backward) {
        const size_t need = pn_sp_scratch_size(a);
        const int used = a->dinp || a->dweight || a->dbias;
        if (used && a->scratch && scratch_bytes < need) return PN_ERR_SCRATCH;
        pn_view outs[4] = {pn_sp_flat(a->dinp, n, es), pn_sp_flat(a->dweight, a->C, wes),
                           pn_sp_flat(a->dbias, a->C, wes),
                           pn_sp_flat(used ? a->scratch : NULL, (int64_t)scratch_bytes, 1)};
        pn_view ins[5] = {pn_sp_flat(a->dout, n, es), pn_sp_flat(a->inp, n, es),
                          pn_sp_flat(a->weight, a->C, wes), pn_sp_flat(a->smean, nstats, ses),
                          pn_sp_flat(a->srstd, nstats, ses)};
        /* dx may be written over dy or x: every value is read before its dx is written. */
        static const unsigned char same_ok[4 * 5] = {1, 1, 0, 0, 0};
        return pn_check_views(outs, 4, ins, 5, same_ok);
    } else {
        pn_view outs[5] = {pn_sp_flat(a->out, n, es), pn_sp_flat(a->mean, nstats, ses),
                           pn_sp_flat(a->rstd, nstats, ses), pn_sp_flat(a->running_mean, a->C, res),
                           pn_sp_flat(a->running_var, a->C, res)};
        pn_view ins[3] = {pn_sp_flat(a->inp, n, es), pn_sp_flat(a->weight, a->C, wes),
                          pn_sp_flat(a->bias, a->C, wes)};
        /* y may be written over x (in place). */
        static const unsigned char same_ok[5 * 3] = {1, 0, 0};
        return pn_check_views(outs, 5, ins, 3, same_ok);
    }
}

/* Runs a backward variant, taking (and giving back) scratch when the caller
 * gave none: from the library's buffer cache, which spares a loop of calls
 * the page faults of fresh memory when the scratch is large. */
static inline pn_status pn_run_spatial_backward(const pn_spatial_kernel table[3][2], pn_spatial_args *a) {
    void *own = NULL;
    size_t bytes = 0;
    if (!a->dinp && !a->dweight && !a->dbias) return PN_OK;   /* nothing asked for */
    if (!a->scratch) {
        bytes = pn_sp_scratch_size(a);
        own = pn_buffer_alloc(bytes);
        if (!own) return PN_ERR_ALLOC;
        a->scratch = own;
    }
    pn_status st = pn_run_spatial(table, a);
    pn_buffer_free(own, bytes);
    return st;
}

#else /* PN_KERNEL_BUILD ------------------------------------------------------ */
#include "kernel.h"

/* Runs of values the engines convert and compute at a time (NHWC: a block
 * of channels): two cache lines of reals. */
#define PN_SP_CB ((int)(128 / sizeof(real)))

/* The engines convert such runs with dtype.h's pn_load_run and pn_store_run
 * (n a small constant, dt a constant where they are called): always inlined,
 * the conversion stays in registers next to the arithmetic that uses it. */

/* The NCHW engine's sets. Rows r = n*C + c of S values, at x + r*S. A set is `count` rows: first(set),
 * first + step, ... (GroupNorm: the C/G consecutive rows of (n, g), step 1;
 * BatchNorm: the N rows of channel c, step C). For the statistics a set is
 * `nseg` segments of `seg` contiguous values: GroupNorm's set is one segment
 * of (C/G)*S values (row boundaries do not matter to a sum), BatchNorm's set
 * N segments of S. */
typedef struct {
    int64_t nsets, count, step;   /* step 1: a set's rows are consecutive (GroupNorm; BatchNorm with C = 1) */
} pn_sp_sets;

/* The two engines, compiled once per (instruction set, compute type) in
 * spatial.c: GroupNorm and BatchNorm differ only in their sets. Their
 * forwards take each set's statistics from x (BatchNorm: training). */
pn_status PN_KERNEL(sp_nchw_forward)(const pn_spatial_args *a, const pn_sp_sets *ss);
pn_status PN_KERNEL(sp_nchw_backward)(const pn_spatial_args *a, const pn_sp_sets *ss);
pn_status PN_KERNEL(sp_nhwc_forward)(const pn_spatial_args *a);
pn_status PN_KERNEL(sp_nhwc_backward)(const pn_spatial_args *a);
/* BatchNorm eval forward (running statistics, either layout): one elementwise pass. */
pn_status PN_KERNEL(sp_eval_forward)(const pn_spatial_args *a);

#endif /* PN_KERNEL_BUILD */
#endif /* PYNORM_SPATIAL_H */
