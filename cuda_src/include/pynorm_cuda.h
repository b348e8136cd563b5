/* pynorm_cuda.h - normalization kernels for deep learning, on CUDA GPUs.
 *
 * The one public header of libpynorm_cuda, the CUDA sibling of libpynorm.
 * It mirrors pynorm.h op for op (prefix pn_cuda_) and reuses its types:
 * pn_status, pn_dtype, pn_rows, pn_strides and PN_ACCUMULATE.
 *
 *   - Every buffer argument is a device pointer (or managed memory); the
 *     pn_strides struct, when given, lives in host memory.
 *   - Work is queued on `stream` and never waited for: no call synchronizes
 *     the stream or the device or changes device settings, and none
 *     allocates memory except where its comment says so (stream-ordered,
 *     cudaMallocAsync: pn_cuda_batchnorm_forward).
 *     Kernels run on the current device; the buffers and the stream must
 *     belong to it.
 *   - Arguments are checked on the host before anything is launched (null
 *     pointers, sizes, dtypes, eps, flags, overlapping output rows, outputs
 *     that overlap inputs or each other, misaligned pointers, scratch size).
 *     Errors the kernels meet while running (a bad pointer, say) are reported
 *     by CUDA later, as for any asynchronous launch.
 *   - Results are deterministic: the same inputs give the same bits on every
 *     call, whatever the alignment of the buffers and on every GPU. Reductions
 *     across rows (dweight, dbias) go through partial sums over a fixed
 *     partition of the rows that depends only on (B*T, C), and a fixed-order
 *     final sum: no atomics.
 *   - Buffers must be aligned to their element size (PN_ERR_ARG otherwise);
 *     rows that start on 16-byte boundaries are read and written 16 bytes at a
 *     time, other rows element by element (same results, slower).
 *
 * Everything between PN_CUDA_CDEF_BEGIN and PN_CUDA_CDEF_END is plain
 * declarations (cudaStream_t is a pointer: the Python bindings declare it as
 * void *).
 */
#ifndef PYNORM_CUDA_H
#define PYNORM_CUDA_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#include "pynorm.h"

#if defined(_WIN32)
#  define PN_CUDA_API
#elif defined(__GNUC__)
#  define PN_CUDA_API __attribute__((visibility("default")))
#else
#  define PN_CUDA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* PN_CUDA_CDEF_BEGIN */

/* Status codes of this library beyond pynorm.h's pn_status values (they are
 * returned as pn_status; compare them as integers). */
#define PN_CUDA_ERR_LAUNCH 100  /* a kernel launch failed: no device, no usable
                                   driver, an earlier sticky error, ... ; see
                                   pn_cuda_last_error() */

/* --- library facts ----------------------------------------------------- */

PN_CUDA_API const char *pn_cuda_version(void);
/* Explains any status this library returns (pn_status values and the
 * PN_CUDA_ERR_ codes above). */
PN_CUDA_API const char *pn_cuda_status_string(int status);
/* The cudaError_t (as an int) behind the last PN_CUDA_ERR_LAUNCH returned on
 * the calling thread, 0 if none; and CUDA's text for it. */
PN_CUDA_API int pn_cuda_last_error(void);
PN_CUDA_API const char *pn_cuda_last_error_string(void);
/* Number of CUDA devices usable by this process: 0 when there is no device
 * or no usable driver. Never fails. */
PN_CUDA_API int pn_cuda_device_count(void);

/* --- LayerNorm: y = (x - mean) * rstd * weight + bias -------------------- */
/* As pn_layernorm_forward. mean, rstd: float32 (float64 for float64 input),
 * B*T of them, dense; either may be NULL. */
PN_CUDA_API pn_status pn_cuda_layernorm_forward(
    void *out, void *mean, void *rstd,
    const void *inp, const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    cudaStream_t stream);

/* h = x + residual (rounded to dtype), then y = layernorm(h). */
PN_CUDA_API pn_status pn_cuda_add_layernorm_forward(
    void *out, void *h, void *mean, void *rstd,
    const void *inp, const void *residual,
    const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    cudaStream_t stream);

/* Gradients from dy and the saved statistics; any of dinp, dweight, dbias may
 * be NULL to skip it. dweight/dbias (wdtype) are reduced over the B*T rows
 * through per-partition partial sums kept in `scratch`: a device buffer of at
 * least pn_cuda_layernorm_backward_scratch_size() bytes, 16-byte aligned.
 * Unlike the C library, the call never allocates it: NULL (or too small)
 * scratch gives PN_ERR_SCRATCH when dweight or dbias is wanted; scratch is not
 * used when both are NULL. The scratch size returned is 0 for invalid sizes.
 * flags: 0 or PN_ACCUMULATE (add into dinp, dweight and dbias). */
PN_CUDA_API size_t pn_cuda_layernorm_backward_scratch_size(
    int64_t B, int64_t T, int64_t C, pn_dtype dtype);
PN_CUDA_API pn_status pn_cuda_layernorm_backward(
    void *dinp, void *dweight, void *dbias,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight,
    const void *mean, const void *rstd,
    int64_t B, int64_t T, int64_t C, int flags,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    cudaStream_t stream);

/* --- RMSNorm: y = x * rstd * weight, rstd = 1/sqrt(mean(x^2) + eps) ------ */
PN_CUDA_API pn_status pn_cuda_rmsnorm_forward(
    void *out, void *rstd,
    const void *inp, const void *weight,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    cudaStream_t stream);

PN_CUDA_API pn_status pn_cuda_add_rmsnorm_forward(
    void *out, void *h, void *rstd,
    const void *inp, const void *residual, const void *weight,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    cudaStream_t stream);

PN_CUDA_API size_t pn_cuda_rmsnorm_backward_scratch_size(
    int64_t B, int64_t T, int64_t C, pn_dtype dtype);
PN_CUDA_API pn_status pn_cuda_rmsnorm_backward(
    void *dinp, void *dweight,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight,
    const void *rstd,
    int64_t B, int64_t T, int64_t C, int flags,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    cudaStream_t stream);

/* --- spatial norms: GroupNorm, InstanceNorm (G = C), BatchNorm ------------ */
/* As pynorm.h's pn_groupnorm_* and pn_batchnorm_*: N samples, C channels,
 * S = the product of the spatial sizes (S = 1: BatchNorm1d on (N, C)), one
 * dense buffer in PN_NCHW or PN_NHWC; mean/rstd float32 (float64 for float64
 * input), either may be NULL; weight/bias (wdtype: dtype or PN_FLOAT32) may be
 * NULL. y may be written over x (out == inp exactly), dx over dy or x; any
 * other overlap is PN_ERR_ALIAS. Statistics are summed in double over values
 * shifted by one value of their set, so a mean of 1e4 with a std of 1e-2
 * keeps its digits. Reductions use partitions fixed by the sizes and a fixed
 * order: the same bits on every run.
 *
 * Backward scratch: a device buffer of at least *_backward_scratch_size()
 * bytes, 16-byte aligned, needed whenever any of dinp, dweight, dbias is
 * asked for (the per-channel partial sums that dx needs too); NULL, too small
 * or misaligned scratch gives PN_ERR_SCRATCH. The size is 0 for invalid
 * sizes. flags: 0 or PN_ACCUMULATE (BatchNorm: plus PN_BN_TRAINING). */
PN_CUDA_API pn_status pn_cuda_groupnorm_forward(
    void *out, void *mean, void *rstd,
    const void *inp, const void *weight, const void *bias,
    int64_t N, int64_t C, int64_t S, int64_t G, double eps,
    pn_layout layout, pn_dtype dtype, pn_dtype wdtype,
    cudaStream_t stream);

PN_CUDA_API size_t pn_cuda_groupnorm_backward_scratch_size(
    int64_t N, int64_t C, int64_t S, int64_t G, pn_layout layout, pn_dtype dtype);
PN_CUDA_API pn_status pn_cuda_groupnorm_backward(
    void *dinp, void *dweight, void *dbias,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight,
    const void *mean, const void *rstd,
    int64_t N, int64_t C, int64_t S, int64_t G, int flags,
    pn_layout layout, pn_dtype dtype, pn_dtype wdtype,
    cudaStream_t stream);

/* BatchNorm forward: as pn_batchnorm_forward (PN_BN_TRAINING: batch
 * statistics, running_mean/running_var of rdtype updated in place, with
 * momentum or PN_BN_CUMULATIVE and num_batches_tracked; eval: the running
 * statistics, both required). The one call of this library that allocates:
 * its per-channel working values (and in training the partial sums, at most
 * 256 x C x 16 bytes) come from the stream-ordered pool of the current
 * device (cudaMallocAsync / cudaFreeAsync on `stream`); PN_ERR_ALLOC if that
 * fails, before anything is launched. */
PN_CUDA_API pn_status pn_cuda_batchnorm_forward(
    void *out, void *mean, void *rstd,
    void *running_mean, void *running_var,
    const void *inp, const void *weight, const void *bias,
    int64_t N, int64_t C, int64_t S, double eps, double momentum,
    int64_t num_batches_tracked, int flags,
    pn_layout layout, pn_dtype dtype, pn_dtype wdtype, pn_dtype rdtype,
    cudaStream_t stream);

PN_CUDA_API size_t pn_cuda_batchnorm_backward_scratch_size(
    int64_t N, int64_t C, int64_t S, pn_layout layout, pn_dtype dtype);
PN_CUDA_API pn_status pn_cuda_batchnorm_backward(
    void *dinp, void *dweight, void *dbias,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight,
    const void *mean, const void *rstd,
    int64_t N, int64_t C, int64_t S, int flags,
    pn_layout layout, pn_dtype dtype, pn_dtype wdtype,
    cudaStream_t stream);

/* --- sharded statistics (tensor-parallel LayerNorm/RMSNorm, synchronized
 * BatchNorm): pynorm.h's pn_*_shard_* on device buffers. The widths/counts
 * arrays of the combine functions are in host memory and are read during the
 * call: their values travel with the launch (no copy, no allocation, no
 * wait; under stream capture the graph keeps the values), so the arrays may
 * be freed or reused as soon as the call returns. At most PN_CUDA_MAX_SHARDS
 * shards: nshards beyond it (or <= 0) gives PN_ERR_SIZE. The backward's
 * scratch is not used (NULL is fine). */
#define PN_CUDA_MAX_SHARDS 64
PN_CUDA_API pn_status pn_cuda_layernorm_shard_stats(double *part, const void *inp, int64_t B, int64_t T, int64_t C,
    pn_dtype dtype, const pn_strides *strides, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_layernorm_shard_combine(double *mean, double *rstd, const double *parts,
    const int64_t *widths, int64_t nshards, int64_t rows, double eps, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_layernorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
    const double *mean, const double *rstd, int64_t B, int64_t T, int64_t C, pn_dtype dtype, pn_dtype wdtype,
    const pn_strides *strides, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_layernorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
    const void *weight, const double *mean, const double *rstd, int64_t B, int64_t T, int64_t C,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_layernorm_shard_backward(void *dinp, void *dweight, void *dbias, void *scratch,
    size_t scratch_bytes, const void *dout, const void *inp, const void *weight, const double *mean,
    const double *rstd, const double *sums, int64_t B, int64_t T, int64_t C, int64_t C_total, int flags,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_stats(double *part, const void *inp, int64_t B, int64_t T, int64_t C,
    pn_dtype dtype, const pn_strides *strides, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_combine(double *rstd, const double *parts, const int64_t *widths,
    int64_t nshards, int64_t rows, double eps, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_apply(void *out, const void *inp, const void *weight, const double *rstd,
    int64_t B, int64_t T, int64_t C, pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
    const void *weight, const double *rstd, int64_t B, int64_t T, int64_t C, pn_dtype dtype, pn_dtype wdtype,
    const pn_strides *strides, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_backward(void *dinp, void *dweight, void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight, const double *rstd, const double *sums,
    int64_t B, int64_t T, int64_t C, int64_t C_total, int flags, pn_dtype dtype, pn_dtype wdtype,
    const pn_strides *strides, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_batchnorm_shard_stats(double *part, const void *inp, int64_t N, int64_t C, int64_t S,
    pn_layout layout, pn_dtype dtype, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_batchnorm_shard_combine(double *mean, double *rstd, void *running_mean,
    void *running_var, const double *parts, const int64_t *counts, int64_t nshards, int64_t C, double eps,
    double momentum, int64_t num_batches_tracked, int flags, pn_dtype rdtype, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_batchnorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
    const double *mean, const double *rstd, int64_t N, int64_t C, int64_t S, pn_layout layout, pn_dtype dtype,
    pn_dtype wdtype, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_batchnorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
    const double *mean, int64_t N, int64_t C, int64_t S, pn_layout layout, pn_dtype dtype, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_batchnorm_shard_backward(void *dinp, void *dweight, void *dbias, const void *dout,
    const void *inp, const void *weight, const double *mean, const double *rstd, const double *local_sums,
    const double *sums, int64_t count, int64_t N, int64_t C, int64_t S, int flags, pn_layout layout,
    pn_dtype dtype, pn_dtype wdtype, cudaStream_t stream);

/* --- token-norm options: the *_ex functions ------------------------------ */
/* As pynorm.h's *_ex functions (pn_norm_options: weight_offset, rounding;
 * opts NULL: the functions above). In place: y and h may each be written
 * over x or the residual (same address, same strides), as in the C library.
 * Per-head layouts (opts->H > 1, each buffer's third stride in opts->head)
 * as in the C library: row (b, t, k) at b*rows.b + t*rows.t + k*head,
 * statistics dense B x T x H; the backward's scratch is
 * pn_cuda_*_backward_scratch_size(B, T * H, C, dtype). */
PN_CUDA_API pn_status pn_cuda_layernorm_forward_ex(
    void *out, void *mean, void *rstd,
    const void *inp, const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    const pn_norm_options *opts, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_add_layernorm_forward_ex(
    void *out, void *h, void *mean, void *rstd,
    const void *inp, const void *residual, const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    const pn_norm_options *opts, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_layernorm_backward_ex(
    void *dinp, void *dweight, void *dbias,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight,
    const void *mean, const void *rstd,
    int64_t B, int64_t T, int64_t C, int flags,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    const pn_norm_options *opts, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_rmsnorm_forward_ex(
    void *out, void *rstd,
    const void *inp, const void *weight,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    const pn_norm_options *opts, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_add_rmsnorm_forward_ex(
    void *out, void *h, void *rstd,
    const void *inp, const void *residual, const void *weight,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    const pn_norm_options *opts, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_rmsnorm_backward_ex(
    void *dinp, void *dweight,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight,
    const void *rstd,
    int64_t B, int64_t T, int64_t C, int flags,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    const pn_norm_options *opts, cudaStream_t stream);

/* As pynorm.h's pn_rmsnorm_quant_forward / pn_layernorm_quant_forward (the
 * same semantics, checks and statuses): the norm's y, in float32, quantized
 * to int8 or float8 e4m3fn as it is made; q dense B x T x C bytes, scales
 * dense float32 (dynamic). y goes through working memory from the
 * stream-ordered pool (rows x C float32; PN_ERR_ALLOC, nothing launched,
 * where it cannot be had), so its bits are those of the forward's y before
 * its rounding to the dtype. */
PN_CUDA_API pn_status pn_cuda_rmsnorm_quant_forward(
    void *q, float *scales, void *h, void *rstd,
    const void *inp, const void *residual, const void *weight,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    const pn_norm_options *opts, const pn_quant_params *quant, cudaStream_t stream);
PN_CUDA_API pn_status pn_cuda_layernorm_quant_forward(
    void *q, float *scales, void *h, void *mean, void *rstd,
    const void *inp, const void *residual, const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    const pn_norm_options *opts, const pn_quant_params *quant, cudaStream_t stream);

/* PN_CUDA_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* PYNORM_CUDA_H */
