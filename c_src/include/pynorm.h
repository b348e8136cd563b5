/* pynorm.h - normalization kernels for deep learning, in plain C99.
 *
 * The one public header of libpynorm. Conventions (llm.c style):
 *   - Token norms (LayerNorm, RMSNorm) see activations as B x T x C: B*T rows
 *     of C contiguous elements, normalized over C.
 *   - Output pointers first, then inputs, then sizes, then scalars, then dtypes.
 *   - Every function returns a pn_status; arguments are checked before anything
 *     is written. The library never aborts, prints or exits.
 *   - The caller owns all memory. Kernels use a little working memory of their
 *     own (O(C) per thread, taken with malloc and freed before returning); a
 *     failed allocation returns PN_ERR_ALLOC before any output is written.
 *   - Results are deterministic: the same inputs give the same bits on every
 *     call, for every thread count and for every instruction set the library
 *     picks (generic, AVX2, AVX-512), except for the payload bits of NaNs.
 *
 *   - Forward outputs may be written over their inputs (in place): y over x;
 *     in a fused forward y and h each over x or the residual (vLLM's
 *     fused_add_rms_norm: y over x, h over the residual). "Over" means the
 *     same address and the same strides; any other overlap is PN_ERR_ALIAS.
 *
 * Everything between PN_CDEF_BEGIN and PN_CDEF_END is plain declarations: the
 * Python bindings feed that block to cffi as it stands.
 */
#ifndef PYNORM_H
#define PYNORM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PYNORM_VERSION_MAJOR 0
#define PYNORM_VERSION_MINOR 1
#define PYNORM_VERSION_PATCH 0

/* PN_CDEF_BEGIN */

typedef enum {
    PN_OK = 0,
    PN_ERR_NULL = 1,      /* a required pointer is NULL */
    PN_ERR_SIZE = 2,      /* a size is <= 0, or a byte count overflows int64 */
    PN_ERR_DTYPE = 3,     /* unknown dtype, or a weight dtype that is not allowed */
    PN_ERR_EPS = 4,       /* eps is negative, NaN or infinite */
    PN_ERR_STRIDE = 5,    /* output rows would overlap each other */
    PN_ERR_ALIAS = 6,     /* an output overlaps an input or another output */
    PN_ERR_SCRATCH = 7,   /* the scratch buffer given is smaller than needed */
    PN_ERR_ALLOC = 8,     /* the library could not allocate its working memory */
    PN_ERR_GROUPS = 9,    /* num_groups does not divide C (spatial norms) */
    PN_ERR_ARG = 10       /* another argument is out of range (flags, momentum, ...) */
} pn_status;

typedef enum {
    PN_FLOAT32 = 0,
    PN_FLOAT16 = 1,       /* IEEE binary16 */
    PN_BFLOAT16 = 2,
    PN_FLOAT64 = 3
} pn_dtype;

/* Where the rows of a B x T x C buffer lie: row (b, t) starts at element
 * b*b + t*t of the buffer (strides in elements, may be negative); the C
 * elements of a row are contiguous. {0, 0} means the dense layout {T*C, C}. */
typedef struct {
    int64_t b;
    int64_t t;
} pn_rows;

/* Row layouts of the buffers a token-norm call touches. Pass NULL when every
 * buffer is dense; a field left {0, 0} is dense. Statistics (mean, rstd) are
 * always dense B x T arrays. */
typedef struct {
    pn_rows inp;          /* x (forward and backward) */
    pn_rows out;          /* y */
    pn_rows residual;     /* the residual added to x (fused forward) */
    pn_rows h;            /* h = x + residual (fused forward) */
    pn_rows dout;         /* dy (backward) */
    pn_rows dinp;         /* dx (backward) */
} pn_strides;

/* Backward flag: add the gradients into dinp/dweight/dbias instead of
 * overwriting them (training loops with residual streams need this). */
#define PN_ACCUMULATE 1

/* --- library facts and settings ----------------------------------------- */

const char *pn_version(void);
const char *pn_status_string(pn_status status);
/* The instruction set the kernels run with: "avx512", "avx2" or "generic".
 * Picked once from the CPU; the environment variable PYNORM_ISA (generic,
 * avx2, avx512) forces a lower one. */
const char *pn_isa(void);
/* Threads used by one call: 0 (the default) means OpenMP's default. This and
 * the ISA choice are the library's only global state. */
void pn_set_num_threads(int n);
int pn_get_num_threads(void);

/* --- LayerNorm: y = (x - mean) * rstd * weight + bias -------------------- */
/* Statistics: mean and rstd = 1/sqrt(var + eps), float32 (float64 for float64
 * input), one per row; either may be NULL when not needed. weight and bias may
 * be NULL; wdtype is their dtype: dtype itself or PN_FLOAT32. */
pn_status pn_layernorm_forward(void *out, void *mean, void *rstd,
                               const void *inp, const void *weight, const void *bias,
                               int64_t B, int64_t T, int64_t C, double eps,
                               pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);

/* h = x + residual (rounded to dtype), then y = layernorm(h). */
pn_status pn_add_layernorm_forward(void *out, void *h, void *mean, void *rstd,
                                   const void *inp, const void *residual,
                                   const void *weight, const void *bias,
                                   int64_t B, int64_t T, int64_t C, double eps,
                                   pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);

/* Gradients from dy and the saved statistics. Any of dinp, dweight, dbias may
 * be NULL to skip it. dweight/dbias have dtype wdtype and are reduced over the
 * B*T rows in a fixed order (bit-identical for any thread count), through
 * partial sums kept in scratch: pass a buffer of at least
 * pn_layernorm_backward_scratch_size() bytes, or NULL to let the call malloc
 * and free it. flags: 0 or PN_ACCUMULATE. */
size_t pn_layernorm_backward_scratch_size(int64_t B, int64_t T, int64_t C, pn_dtype dtype);
pn_status pn_layernorm_backward(void *dinp, void *dweight, void *dbias,
                                void *scratch, size_t scratch_bytes,
                                const void *dout, const void *inp, const void *weight,
                                const void *mean, const void *rstd,
                                int64_t B, int64_t T, int64_t C, int flags,
                                pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);

/* --- RMSNorm: y = x * rstd * weight, rstd = 1/sqrt(mean(x^2) + eps) ------ */
pn_status pn_rmsnorm_forward(void *out, void *rstd,
                             const void *inp, const void *weight,
                             int64_t B, int64_t T, int64_t C, double eps,
                             pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);

pn_status pn_add_rmsnorm_forward(void *out, void *h, void *rstd,
                                 const void *inp, const void *residual, const void *weight,
                                 int64_t B, int64_t T, int64_t C, double eps,
                                 pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);

size_t pn_rmsnorm_backward_scratch_size(int64_t B, int64_t T, int64_t C, pn_dtype dtype);
pn_status pn_rmsnorm_backward(void *dinp, void *dweight,
                              void *scratch, size_t scratch_bytes,
                              const void *dout, const void *inp, const void *weight,
                              const void *rstd,
                              int64_t B, int64_t T, int64_t C, int flags,
                              pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);

/* --- token-norm options: the *_ex functions ------------------------------ */
/* The *_ex functions are the six token-norm functions above with one more
 * argument, `opts` (NULL: every field's default, which is exactly the
 * function without _ex). A field out of range gives PN_ERR_ARG (PN_ERR_SIZE
 * for H) before anything is written. */

typedef enum {
    PN_ROUND_ONCE = 0,    /* the compute type (float32; float64 for float64 data) throughout, y rounded
                             once to the dtype (Hugging Face Gemma RMSNorm, FlashInfer) */
    PN_ROUND_LLAMA = 1    /* xhat = (x - mean) * rstd (x * rstd for RMSNorm) rounded to the dtype
                             first, then y = xhat * (weight_offset + w) (+ b) in the compute type,
                             rounded to the dtype again (Hugging Face LlamaRMSNorm, Qwen3). The same
                             as PN_ROUND_ONCE for float32 and float64 data. */
} pn_rounding;

/* The third outer stride of each buffer (elements, may be negative) when the
 * rows are B x T x H (opts->H > 1): row (b, t, k) of a buffer starts at
 * b*rows.b + t*rows.t + k*head, its pn_rows being {b, t}. Ignored for a
 * buffer whose pn_rows is {0, 0}: that buffer is dense B x T x H x C. */
typedef struct {
    int64_t inp, out, residual, h, dout, dinp;
} pn_head_strides;

typedef struct {
    /* y = xhat * (weight_offset + w) (+ b): Gemma's (1 + w), zero-centred
     * gamma. The offset (rounded to the compute type) is added to each weight
     * in the compute type, never in a half-precision weight's own dtype. The
     * backward's dx uses (weight_offset + w); dweight does not change.
     * Finite; non-zero needs a weight. Default 0. */
    double weight_offset;
    /* A pn_rounding: PN_ROUND_ONCE (0, the default) or PN_ROUND_LLAMA. The
     * backward ignores it (its gradients are those of PN_ROUND_ONCE). */
    int rounding;
    /* Rows per (b, t): 0 or 1 (default) for B x T rows; H > 1 for B x T x H
     * rows (per-head norms: q or k heads of a fused qkv buffer), with each
     * buffer's third stride in `head`. Statistics (mean, rstd) are then dense
     * B x T x H arrays. */
    int64_t H;
    pn_head_strides head;
} pn_norm_options;

pn_status pn_layernorm_forward_ex(void *out, void *mean, void *rstd,
                                  const void *inp, const void *weight, const void *bias,
                                  int64_t B, int64_t T, int64_t C, double eps,
                                  pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                  const pn_norm_options *opts);
pn_status pn_add_layernorm_forward_ex(void *out, void *h, void *mean, void *rstd,
                                      const void *inp, const void *residual,
                                      const void *weight, const void *bias,
                                      int64_t B, int64_t T, int64_t C, double eps,
                                      pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                      const pn_norm_options *opts);
pn_status pn_layernorm_backward_ex(void *dinp, void *dweight, void *dbias,
                                   void *scratch, size_t scratch_bytes,
                                   const void *dout, const void *inp, const void *weight,
                                   const void *mean, const void *rstd,
                                   int64_t B, int64_t T, int64_t C, int flags,
                                   pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                   const pn_norm_options *opts);
pn_status pn_rmsnorm_forward_ex(void *out, void *rstd,
                                const void *inp, const void *weight,
                                int64_t B, int64_t T, int64_t C, double eps,
                                pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                const pn_norm_options *opts);
pn_status pn_add_rmsnorm_forward_ex(void *out, void *h, void *rstd,
                                    const void *inp, const void *residual, const void *weight,
                                    int64_t B, int64_t T, int64_t C, double eps,
                                    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                    const pn_norm_options *opts);
pn_status pn_rmsnorm_backward_ex(void *dinp, void *dweight,
                                 void *scratch, size_t scratch_bytes,
                                 const void *dout, const void *inp, const void *weight,
                                 const void *rstd,
                                 int64_t B, int64_t T, int64_t C, int flags,
                                 pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                 const pn_norm_options *opts);
/* The backward scratch of B x T x H rows is that of B x (T*H) rows:
 * pn_*_backward_scratch_size(B, T * H, C, dtype). */

/* --- fused quantized output: the norm's y quantized as it is made ---------- */
/* y is the norm's output as the options define it (weight_offset, rounding),
 * in float32 (float64 data: rounded to float32), never stored in the data's
 * dtype. Q(v) is:
 *   PN_QINT8:          round-half-even of v, saturated to [-128, 127]; NaN -> 0.
 *   PN_QFLOAT8_E4M3FN: v clamped to [-448, 448], then rounded to nearest even
 *                      to float8 e4m3fn (bit pattern in a byte); NaN -> NaN (0x7f).
 * Static (quant->scale > 0): q = Q(y / scale), scale as float32; `scales` is
 * not written (may be NULL).
 * Dynamic (quant->scale == 0): per group of `group_size` consecutive elements
 * of a row (0: the whole row; else it must divide C), amax = max |y| (NaN if
 * any y of the group is NaN), for float8 clamped to scale_ub when scale_ub > 0
 * (scale_ub must be 0 for int8), scale = max(amax / qmax, min_scale) in
 * float32 with qmax = 127 (int8) or 448 (float8) and min_scale = float32's
 * epsilon (int8) or 1 / (qmax * 512) (float8); q = Q(y / scale) (a true
 * division); scales (dense, rows x groups float32) receives each scale. A
 * group with a NaN gets scale NaN (int8 q 0, float8 q NaN); with an Inf and no
 * scale_ub, scale Inf (finite values give q 0, the Inf NaN -> 0 / NaN).
 * q is dense B x T x C bytes. With a residual (the fused form; NULL: none),
 * h = round(x + residual) is written to h, which may be the residual itself. */
typedef enum {
    PN_QINT8 = 0,
    PN_QFLOAT8_E4M3FN = 1
} pn_qdtype;

typedef struct {
    int qdtype;          /* a pn_qdtype */
    double scale;        /* > 0 (finite): static scale; 0: dynamic */
    double scale_ub;     /* dynamic float8 only: upper bound of amax (> 0), 0: none */
    int64_t group_size;  /* dynamic: elements per scale (divides C); 0: one scale per row */
} pn_quant_params;

pn_status pn_rmsnorm_quant_forward(void *q, float *scales, void *h, void *rstd,
                                   const void *inp, const void *residual, const void *weight,
                                   int64_t B, int64_t T, int64_t C, double eps,
                                   pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                   const pn_norm_options *opts, const pn_quant_params *quant);
pn_status pn_layernorm_quant_forward(void *q, float *scales, void *h, void *mean, void *rstd,
                                     const void *inp, const void *residual,
                                     const void *weight, const void *bias,
                                     int64_t B, int64_t T, int64_t C, double eps,
                                     pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                     const pn_norm_options *opts, const pn_quant_params *quant);

/* --- spatial norms: GroupNorm, InstanceNorm, BatchNorm -------------------- */
/* Activations of N samples, C channels and S = the product of the spatial
 * sizes (S = 1 when there are none, e.g. BatchNorm1d on (N, C)), as one dense
 * buffer in either layout. Statistics (mean, rstd) are float32 (float64 for
 * float64 input); either may be NULL when not needed. weight and bias (C
 * values of wdtype: dtype itself or PN_FLOAT32) may be NULL. Backward: any of
 * dinp, dweight, dbias may be NULL to skip it; partial sums go through
 * scratch: pass a buffer of at least *_backward_scratch_size() bytes, or NULL
 * to let the call malloc and free it. Reductions use a partition fixed by the
 * sizes: bit-identical results for any thread count. */
typedef enum {
    PN_NCHW = 0,          /* (N, C, *spatial): each channel's S values contiguous */
    PN_NHWC = 1           /* (N, *spatial, C): the C channels contiguous (channels_last) */
} pn_layout;

/* GroupNorm: C channels in G groups of C/G (G must divide C, else
 * PN_ERR_GROUPS); statistics per sample and group over (C/G)*S values, saved
 * as N x G arrays; y = (x - mean) * rstd * weight[c] + bias[c]. InstanceNorm
 * is G = C. */
pn_status pn_groupnorm_forward(void *out, void *mean, void *rstd,
                               const void *inp, const void *weight, const void *bias,
                               int64_t N, int64_t C, int64_t S, int64_t G, double eps,
                               pn_layout layout, pn_dtype dtype, pn_dtype wdtype);

/* flags: 0 or PN_ACCUMULATE. mean, rstd: as the forward saved them. */
size_t pn_groupnorm_backward_scratch_size(int64_t N, int64_t C, int64_t S, int64_t G,
                                          pn_layout layout, pn_dtype dtype);
pn_status pn_groupnorm_backward(void *dinp, void *dweight, void *dbias,
                                void *scratch, size_t scratch_bytes,
                                const void *dout, const void *inp, const void *weight,
                                const void *mean, const void *rstd,
                                int64_t N, int64_t C, int64_t S, int64_t G, int flags,
                                pn_layout layout, pn_dtype dtype, pn_dtype wdtype);

/* BatchNorm flags (they combine with PN_ACCUMULATE in the backward). */
#define PN_BN_TRAINING 2      /* batch statistics; without it, the running statistics */
#define PN_BN_CUMULATIVE 4    /* running statistics updated with weight 1/num_batches_tracked */

/* BatchNorm: statistics per channel over N*S values, mean and rstd arrays of
 * C. With PN_BN_TRAINING (N*S must be > 1, else PN_ERR_SIZE, as torch) the
 * batch statistics normalize x, and running_mean/running_var (C values of
 * rdtype: dtype or PN_FLOAT32; either may be NULL) are updated in place:
 *   running = (1 - f) * running + f * batch, the variance unbiased (n/(n-1)),
 * with f = momentum (finite, else PN_ERR_ARG), or, with PN_BN_CUMULATIVE,
 * f = 1/num_batches_tracked (torch's momentum=None: the count of batches
 * including this one, >= 1). Without PN_BN_TRAINING (eval) both running
 * statistics are required inputs; mean and rstd then receive running_mean
 * and 1/sqrt(running_var + eps). */
pn_status pn_batchnorm_forward(void *out, void *mean, void *rstd,
                               void *running_mean, void *running_var,
                               const void *inp, const void *weight, const void *bias,
                               int64_t N, int64_t C, int64_t S, double eps, double momentum,
                               int64_t num_batches_tracked, int flags,
                               pn_layout layout, pn_dtype dtype, pn_dtype wdtype, pn_dtype rdtype);

/* flags: PN_BN_TRAINING when the forward used batch statistics (their
 * gradient flows into dx), plus PN_ACCUMULATE. mean, rstd: as the forward
 * returned them. */
size_t pn_batchnorm_backward_scratch_size(int64_t N, int64_t C, int64_t S,
                                          pn_layout layout, pn_dtype dtype);
pn_status pn_batchnorm_backward(void *dinp, void *dweight, void *dbias,
                                void *scratch, size_t scratch_bytes,
                                const void *dout, const void *inp, const void *weight,
                                const void *mean, const void *rstd,
                                int64_t N, int64_t C, int64_t S, int flags,
                                pn_layout layout, pn_dtype dtype, pn_dtype wdtype);

/* --- sharded statistics: tensor-parallel token norms, synchronized BatchNorm
 *
 * When C is split across P processes (each holds columns [c_p, c_p + C_p) of
 * every row: a "shard"), a norm runs in three steps around one collective:
 *   1. *_shard_stats: each process writes its shard's per-row (per-channel
 *      for BatchNorm) partial statistics in float64;
 *   2. the caller exchanges them (one all-reduce; the library never talks to
 *      other processes) and *_shard_combine turns the P partials into the
 *      statistics of the whole row: float64 mean and rstd;
 *   3. *_shard_apply normalizes the shard with them.
 * The backward is the same: *_shard_backward_sums gives a shard's two (one
 * for RMSNorm) row sums in float64, the caller sums them over the processes,
 * and *_shard_backward gives dx (and the shard's dweight/dbias) from the
 * totals. Everything else - dtypes, strides, flags, scratch (the size of
 * pn_layernorm_backward_scratch_size / pn_rmsnorm_backward_scratch_size),
 * determinism, checks before any write - is as for the ops above.
 *
 * LayerNorm partials are exact per shard: (mean_p, M2_p = sum((x - mean_p)^2))
 * of the shard's row, computed in double around a shift by the row's first
 * element. The combine takes them in shard order,
 *   mean = sum(C_p mean_p) / C,  M2 = sum(M2_p) + sum(C_p (mean_p - mean)^2),
 * so no sum of squares of large values ever cancels: rows with mean 1e4 and
 * std 1e-2 keep full accuracy. Exchange the partials exactly: each process
 * writes its own slot of a zero-filled P x rows x 2 array and one all-reduce
 * (sum) of that array delivers every slot bit for bit (adding zeros is exact);
 * every process then combines the same slots in the same order and gets the
 * same bits. The backward's row sums have no cancellation: a plain sum over
 * the processes is accurate. */

/* LayerNorm shard statistics: part[2r] = mean, part[2r + 1] = M2 of row r of
 * the shard (B*T rows of C elements: this shard's width). */
pn_status pn_layernorm_shard_stats(double *part, const void *inp,
                                   int64_t B, int64_t T, int64_t C,
                                   pn_dtype dtype, const pn_strides *strides);
/* parts: nshards arrays of rows x 2 (each a shard's pn_layernorm_shard_stats,
 * one after the other, in shard order); widths: the nshards shard widths
 * C_p (each >= 1). mean and rstd = 1/sqrt(M2/C + eps) of each row of the
 * whole C = sum(C_p) columns, float64, rows values each (either may be NULL). */
pn_status pn_layernorm_shard_combine(double *mean, double *rstd, const double *parts,
                                     const int64_t *widths, int64_t nshards, int64_t rows,
                                     double eps);
/* y = (x - mean) * rstd * weight + bias on the shard; mean and rstd as the
 * combine gave them (B*T float64 values each); weight and bias (C values of
 * wdtype: this shard's slice) may be NULL. */
pn_status pn_layernorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
                                   const double *mean, const double *rstd,
                                   int64_t B, int64_t T, int64_t C,
                                   pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);
/* sums[2r] = sum over the shard's row of g = dy * weight, sums[2r + 1] = sum of
 * g * xhat (xhat = (x - mean) * rstd), float64. */
pn_status pn_layernorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
                                           const void *weight, const double *mean, const double *rstd,
                                           int64_t B, int64_t T, int64_t C,
                                           pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);
/* dx = rstd * (g - S_g / C_total - xhat * S_gx / C_total) with (S_g, S_gx) =
 * sums: the totals of pn_layernorm_shard_backward_sums over every shard;
 * dweight/dbias of this shard's columns (sums over its B*T rows). Any of
 * dinp, dweight, dbias may be NULL. flags: 0 or PN_ACCUMULATE. */
pn_status pn_layernorm_shard_backward(void *dinp, void *dweight, void *dbias,
                                      void *scratch, size_t scratch_bytes,
                                      const void *dout, const void *inp, const void *weight,
                                      const double *mean, const double *rstd, const double *sums,
                                      int64_t B, int64_t T, int64_t C, int64_t C_total, int flags,
                                      pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);

/* RMSNorm shard statistics: part[r] = sum of x^2 over the shard's row r. */
pn_status pn_rmsnorm_shard_stats(double *part, const void *inp,
                                 int64_t B, int64_t T, int64_t C,
                                 pn_dtype dtype, const pn_strides *strides);
/* parts: nshards arrays of rows values (shard order), widths as for
 * LayerNorm; rstd = 1/sqrt(sum(parts) / C + eps), float64. Partials already
 * summed over the processes are nshards = 1 with widths = {C}. */
pn_status pn_rmsnorm_shard_combine(double *rstd, const double *parts, const int64_t *widths,
                                   int64_t nshards, int64_t rows, double eps);
/* y = x * rstd * weight on the shard. */
pn_status pn_rmsnorm_shard_apply(void *out, const void *inp, const void *weight, const double *rstd,
                                 int64_t B, int64_t T, int64_t C,
                                 pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);
/* sums[r] = sum over the shard's row of dy * weight * x * rstd. */
pn_status pn_rmsnorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
                                         const void *weight, const double *rstd,
                                         int64_t B, int64_t T, int64_t C,
                                         pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);
/* dx = rstd * (g - xhat * S / C_total), S = sums totalled over the shards;
 * dweight of this shard's columns. */
pn_status pn_rmsnorm_shard_backward(void *dinp, void *dweight, void *scratch, size_t scratch_bytes,
                                    const void *dout, const void *inp, const void *weight,
                                    const double *rstd, const double *sums,
                                    int64_t B, int64_t T, int64_t C, int64_t C_total, int flags,
                                    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides);

/* Synchronized BatchNorm: the batch is split across processes (data
 * parallel); each holds N samples of the same C channels. part[2c] = mean and
 * part[2c + 1] = M2 of channel c over this process's N*S values (dense, NCHW
 * or NHWC as for pn_batchnorm_forward). */
pn_status pn_batchnorm_shard_stats(double *part, const void *inp, int64_t N, int64_t C, int64_t S,
                                   pn_layout layout, pn_dtype dtype);
/* parts: nshards arrays of C x 2 (shard order); counts: each shard's N*S
 * (>= 0: a shard with no values is skipped; the total must be > 1). Writes
 * the batch mean and rstd (float64, C values each; either may be NULL) and,
 * when running_mean/running_var (C values of rdtype) are given, updates them
 * as pn_batchnorm_forward does in training (momentum, or PN_BN_CUMULATIVE
 * with num_batches_tracked; the variance unbiased with the total count).
 * flags: 0 or PN_BN_CUMULATIVE. */
pn_status pn_batchnorm_shard_combine(double *mean, double *rstd, void *running_mean, void *running_var,
                                     const double *parts, const int64_t *counts, int64_t nshards,
                                     int64_t C, double eps, double momentum,
                                     int64_t num_batches_tracked, int flags, pn_dtype rdtype);
/* y = (x - mean[c]) * rstd[c] * weight[c] + bias[c]. */
pn_status pn_batchnorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
                                   const double *mean, const double *rstd,
                                   int64_t N, int64_t C, int64_t S,
                                   pn_layout layout, pn_dtype dtype, pn_dtype wdtype);
/* sums[2c] = sum of dy, sums[2c + 1] = sum of dy * (x - mean[c]) over this
 * process's values of channel c. */
pn_status pn_batchnorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
                                           const double *mean, int64_t N, int64_t C, int64_t S,
                                           pn_layout layout, pn_dtype dtype);
/* dx = (dy - S_dy / count - (x - mean) * rstd^2 * S_dyx / count) * rstd * w
 * with (S_dy, S_dyx) = sums totalled over the processes and count the total
 * number of values per channel; dweight = rstd * local_sums[2c + 1] and
 * dbias = local_sums[2c] (this process's own sums: parameter gradients stay
 * local, as torch's SyncBatchNorm). Any of dinp, dweight, dbias may be NULL;
 * local_sums is needed only for dweight/dbias. flags: 0 or PN_ACCUMULATE. */
pn_status pn_batchnorm_shard_backward(void *dinp, void *dweight, void *dbias,
                                      const void *dout, const void *inp, const void *weight,
                                      const double *mean, const double *rstd,
                                      const double *local_sums, const double *sums, int64_t count,
                                      int64_t N, int64_t C, int64_t S, int flags,
                                      pn_layout layout, pn_dtype dtype, pn_dtype wdtype);

/* --- memory ---------------------------------------------------------------- */
/* 64-byte aligned buffers for outputs. Large freed buffers are kept in a small
 * bounded cache and handed out again, so that a loop allocating its outputs
 * does not pay the kernel's page faults on every call. NULL on failure. */
void *pn_buffer_alloc(size_t bytes);
void pn_buffer_free(void *ptr, size_t bytes);
/* Return every cached buffer to the system. */
void pn_buffer_trim(void);

/* --- memory bandwidth probe ----------------------------------------------- */
/* A STREAM-style copy over two buffers of `bytes` each (allocated and freed by
 * the call), using the library's threads; writes the best of `repeats` runs
 * in GB/s counting bytes read plus bytes written. */
pn_status pn_copy_bandwidth(double *gbps, int64_t bytes, int repeats);

/* PN_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* PYNORM_H */
