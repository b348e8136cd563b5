/* common.h - what every op file shares: the argument block passed from a public
 * function to its kernels, the per-ISA variant naming, threading, and the
 * argument checks. Internal to the library. */
#ifndef PYNORM_COMMON_H
#define PYNORM_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "pynorm.h"

/* ---- the argument block of a token norm (LayerNorm, RMSNorm) --------------
 * The public function checks every argument, fills this block with dense
 * strides resolved, and hands it to the kernel variant for the CPU. */
/* Where row r of a buffer starts: rows are B x T' (T' = T*H, the args' T),
 * row (b, t') at b*b + t*t + k*h with t' = t*H + k. H is 1 unless the
 * options asked for heads. */
typedef struct {
    int64_t b, t, h, H;
} pn_rowmap;

typedef struct {
    pn_rowmap inp, out, residual, h, dout, dinp;
} pn_rowmaps;

typedef struct {
    void *out, *h, *mean, *rstd;          /* forward outputs (any may be NULL) */
    void *dinp, *dweight, *dbias;         /* backward outputs (any may be NULL) */
    void *scratch;                        /* backward partial sums, aligned */
    const void *inp, *residual, *weight, *bias, *dout;
    int64_t B, T, C;                      /* T: rows per b, heads included (T*H of the call) */
    int64_t H;                            /* heads per (b, t) of the call: 1 unless opts->H > 1 */
    double eps;
    double weight_offset;                 /* added to every weight (pn_work), 0 by default */
    int llama;                            /* PN_ROUND_LLAMA */
    int accumulate;
    pn_dtype dtype, wdtype;
    pn_rowmaps s;                         /* every field resolved (no {0, 0}) */
    /* fused quantized output (pn_*_quant_forward): q replaces out */
    void *q;                              /* dense rows x C bytes; NULL: no quantized output */
    float *qscales;                       /* dynamic: dense rows x C/qgroup scales */
    int qfp8;                             /* PN_QFLOAT8_E4M3FN */
    float qscale, qscale_ub;              /* static scale (0: dynamic); amax bound (0: none) */
    int64_t qgroup;                       /* dynamic: elements per scale (C: one per row) */
} pn_token_args;

typedef pn_status (*pn_token_kernel)(const pn_token_args *);

/* For helpers that must be inlined to work (see pn_prefetch in kernel.h). */
#if defined(__GNUC__) || defined(__clang__)
#define PN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PN_ALWAYS_INLINE inline
#endif

/* ---- variants -------------------------------------------------------------
 * Op files are compiled once per instruction set (PN_ISA = generic, avx2,
 * avx512) and compute type (PN_REAL = float, double) with PN_KERNEL_BUILD
 * defined; PN_KERNEL(name) names that build's kernel. They are compiled once
 * more without it for the public functions, which pick a variant at run time. */
#define PN_CAT_(a, b, c, d) a##b##_##c##_##d
#define PN_CAT(a, b, c, d) PN_CAT_(a, b, c, d)
#define PN_KERNEL(name) PN_CAT(pn_k_, name, PN_ISA, PN_REAL)

#define PN_DECLARE_VARIANTS(name, args_type)                  \
    pn_status pn_k_##name##_generic_float(const args_type *);  \
    pn_status pn_k_##name##_generic_double(const args_type *); \
    pn_status pn_k_##name##_avx2_float(const args_type *);     \
    pn_status pn_k_##name##_avx2_double(const args_type *);    \
    pn_status pn_k_##name##_avx512_float(const args_type *);   \
    pn_status pn_k_##name##_avx512_double(const args_type *);

/* Table [isa][compute type] of one op's variants; off x86 only generic exists. */
#ifdef PN_X86_VARIANTS
#define PN_VARIANTS(name)                                                        \
    {{pn_k_##name##_generic_float, pn_k_##name##_generic_double},                \
     {pn_k_##name##_avx2_float, pn_k_##name##_avx2_double},                      \
     {pn_k_##name##_avx512_float, pn_k_##name##_avx512_double}}
#else
#define PN_VARIANTS(name)                                                        \
    {{pn_k_##name##_generic_float, pn_k_##name##_generic_double},                \
     {pn_k_##name##_generic_float, pn_k_##name##_generic_double},                \
     {pn_k_##name##_generic_float, pn_k_##name##_generic_double}}
#endif

enum { PN_ISA_GENERIC = 0, PN_ISA_AVX2 = 1, PN_ISA_AVX512 = 2 };
int pn_isa_index(void);                    /* runtime.c */

/* Run the variant for this CPU and compute type (double for float64 data). */
static inline pn_status pn_run(const pn_token_kernel table[3][2], const pn_token_args *a) {
    return table[pn_isa_index()][a->dtype == PN_FLOAT64](a);
}

/* ---- threading ----------------------------------------------------------- */
int pn_threads(void);                      /* runtime.c: threads one call may use */
int64_t pn_stream_min_bytes(void);         /* runtime.c: outputs this large are streamed */

/* Below this many elements a call runs on one thread: waking the team costs
 * more than the work. */
#define PN_PARALLEL_MIN_ELEMS 32768

static inline int pn_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ---- rows ------------------------------------------------------------------ */
static inline size_t pn_dtype_size(pn_dtype dt) {
    return dt == PN_FLOAT64 ? 8 : dt == PN_FLOAT32 ? 4 : 2;
}

/* Address of row r (= b*T + t) of a strided B x T x C buffer (T: the args'
 * T, heads included). */
static inline void *pn_row(const void *base, pn_rowmap s, int64_t r, int64_t T, size_t esize) {
    int64_t b = r / T, t = r - b * T, k = 0;
    if (s.H > 1) { k = t % s.H; t /= s.H; }
    return (char *)base + (b * s.b + t * s.t + k * s.h) * (int64_t)esize;
}

/* Backward reductions over rows go through partial sums, one per chunk of
 * consecutive rows. The chunking depends only on the row count, never on the
 * thread count, so dweight/dbias come out bit-identical however many threads
 * run. At most PN_MAX_CHUNKS chunks bound the scratch to that many rows of C. */
#define PN_MAX_CHUNKS 64
#define PN_MIN_CHUNK_ROWS 16
static inline int64_t pn_chunk_rows(int64_t rows) {
    int64_t per = (rows + PN_MAX_CHUNKS - 1) / PN_MAX_CHUNKS;
    return per < PN_MIN_CHUNK_ROWS ? PN_MIN_CHUNK_ROWS : per;
}
static inline int64_t pn_num_chunks(int64_t rows) {
    int64_t per = pn_chunk_rows(rows);
    return (rows + per - 1) / per;
}

/* ---- argument checks (check.c) -------------------------------------------- */
/* One row-structured buffer as a check sees it. */
typedef struct {
    const void *ptr;
    int64_t nb, nt;     /* rows along B and T (1, 1 for a weight vector) */
    pn_rows s;          /* resolved strides */
    int64_t C;          /* elements per row (1 for a statistics array) */
    size_t esize;
} pn_view;

pn_status pn_check_sizes(int64_t B, int64_t T, int64_t C, pn_dtype dtype);
pn_status pn_check_dtypes(pn_dtype dtype, pn_dtype wdtype);
pn_status pn_check_eps(double eps);
/* Strides resolved ({0, 0}: dense B x T x H x C) for T rows per b and H
 * heads per (b, t); head: the third strides (NULL with H = 1). */
pn_rowmaps pn_resolve_all(const pn_strides *s, const pn_head_strides *head, int64_t T, int64_t H, int64_t C);
/* Every output's rows disjoint (PN_ERR_STRIDE); no output overlapping another
 * output, nor an input unless `same_ok` marks that exact pair as in-place
 * (same address, same strides) (PN_ERR_ALIAS). same_ok[o][i] is 1 where
 * output o may be input i. NULL outputs are skipped. */
pn_status pn_check_views(const pn_view *outs, int nout, const pn_view *ins, int nin,
                         const unsigned char *same_ok);

/* Bytes of backward scratch: nparam partial arrays of C reals per chunk of
 * rows, plus slack for 64-byte alignment. */
size_t pn_token_scratch_size(int64_t B, int64_t T, int64_t C, pn_dtype dtype, int nparam);
/* Runs a backward variant, taking (and freeing) scratch when the caller gave none. */
pn_status pn_run_backward(const pn_token_kernel table[3][2], pn_token_args *a, int nparam);

/* Checks every argument of a token-norm call and resolves its strides.
 * `what` says which pointers the op needs; scratch_needed is the backward's
 * scratch size (checked only when a scratch buffer is given). */
enum { PN_CHECK_RESIDUAL = 1, PN_CHECK_BACKWARD = 2, PN_CHECK_MEAN = 4, PN_CHECK_QUANT = 8 };
/* The quantization parameters of a *_quant_forward call into a (checked after
 * pn_check_token's sizes); quant NULL is PN_ERR_NULL. */
pn_status pn_check_quant(pn_token_args *a, const pn_quant_params *quant);
/* opts: the *_ex options (NULL: defaults); on success a->T counts the heads
 * too (T*H) and a->H, a->weight_offset, a->llama hold the options. */
pn_status pn_check_token(pn_token_args *a, const pn_strides *strides, const pn_norm_options *opts,
                         unsigned what, size_t scratch_bytes, size_t scratch_needed);

#endif /* PYNORM_COMMON_H */
