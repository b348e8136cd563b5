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
