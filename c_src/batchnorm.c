/* batchnorm.c - BatchNorm over N samples of C channels and S spatial
 * positions (S = 1: BatchNorm1d on (N, C)), in NCHW or NHWC.
 *
 * training: per channel c over its M = N*S values: mean, var (biased),
 *           rstd = 1/sqrt(var + eps), y = (x - mean) * rstd * w[c] + b[c];
 *           running_mean = (1 - f) * running_mean + f * mean
 *           running_var  = (1 - f) * running_var  + f * var * M/(M-1)
 *           with f = momentum, or 1/num_batches_tracked (torch's momentum=None)
 * eval:     the same y from the running statistics: one elementwise pass
 *           (spatial.c's sp_eval_forward), each thread on its share of memory.
 * backward: xhat = (x - mean) * rstd, g = dy * w[c], means over the M values
 *           training: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
 *           eval:     dx = rstd * g (the statistics are constants)
 *           dw[c] = sum of dy * xhat,  db[c] = sum of dy
 *
 * The walks over memory are spatial.c's engines. In NCHW a channel is N rows
 * of S values: a thread takes a channel, sums its rows in pieces while they
 * come in from memory and writes y while they are still in cache. In NHWC
 * the channels are contiguous: the sums run down pieces of rows with one
 * accumulator per channel (vectors along C, never a stride of C per value),
 * the pieces are merged in order, then a second sweep writes y.
 */
#include "spatial.h"

#ifdef PN_KERNEL_BUILD

/* NCHW: set c is the N rows c, C + c, 2C + c, ... (step C). */

pn_status PN_KERNEL(batchnorm_forward)(const pn_spatial_args *a) {
    if (!a->training) return PN_KERNEL(sp_eval_forward)(a);
    if (a->layout == PN_NHWC) return PN_KERNEL(sp_nhwc_forward)(a);
    const pn_sp_sets sets = {a->C, a->N, a->C};
    return PN_KERNEL(sp_nchw_forward)(a, &sets);
}

pn_status PN_KERNEL(batchnorm_backward)(const pn_spatial_args *a) {
    if (a->layout == PN_NHWC) return PN_KERNEL(sp_nhwc_backward)(a);
    const pn_sp_sets sets = {a->C, a->N, a->C};
    return PN_KERNEL(sp_nchw_backward)(a, &sets);
}

#else /* ---- the public functions: check, then run the variant for this CPU ---- */

PN_DECLARE_VARIANTS(batchnorm_forward, pn_spatial_args)
PN_DECLARE_VARIANTS(batchnorm_backward, pn_spatial_args)
static const pn_spatial_kernel forward_kernels[3][2] = PN_VARIANTS(batchnorm_forward);
static const pn_spatial_kernel backward_kernels[3][2] = PN_VARIANTS(batchnorm_backward);

pn_status pn_batchnorm_forward(void *out, void *mean, void *rstd,
                               void *running_mean, void *running_var,
                               const void *inp, const void *weight, const void *bias,
                               int64_t N, int64_t C, int64_t S, double eps, double momentum,
                               int64_t num_batches_tracked, int flags,
                               pn_layout layout, pn_dtype dtype, pn_dtype wdtype, pn_dtype rdtype) {
    const int training = (flags & PN_BN_TRAINING) != 0;
    const int update = training && (running_mean || running_var);
    pn_spatial_args a = {.out = out, .mean = mean, .rstd = rstd, .inp = inp, .weight = weight,
                         .bias = bias, .N = N, .C = C, .S = S, .G = C, .eps = eps,
                         .batchnorm = 1, .training = training, .layout = layout,
                         .dtype = dtype, .wdtype = wdtype, .rdtype = rdtype};
    if (update) {   /* in eval they are inputs only: never written */
        a.running_mean = running_mean;
        a.running_var = running_var;
    }
    if (flags & ~(PN_BN_TRAINING | PN_BN_CUMULATIVE)) return PN_ERR_ARG;
    if (!training && (!running_mean || !running_var)) return PN_ERR_NULL;
    if ((running_mean || running_var) && pn_check_dtypes(dtype, rdtype)) return PN_ERR_DTYPE;
    pn_status st = pn_check_spatial(&a, 0, 0);
    if (st) return st;
    if (training && N * S == 1) return PN_ERR_SIZE;   /* torch: "more than 1 value per channel" */
    if (!training) {
        /* read-only inputs: they must not overlap an output */
        const size_t res = pn_dtype_size(rdtype);
        pn_view outs[3] = {{out, 1, 1, {0, 0}, N * C * S, pn_dtype_size(dtype)},
                           {mean, 1, 1, {0, 0}, C, dtype == PN_FLOAT64 ? 8 : 4},
                           {rstd, 1, 1, {0, 0}, C, dtype == PN_FLOAT64 ? 8 : 4}};
        pn_view ins[2] = {{running_mean, 1, 1, {0, 0}, C, res}, {running_var, 1, 1, {0, 0}, C, res}};
        if ((st = pn_check_views(outs, 3, ins, 2, NULL))) return st;
        a.running_mean = (void *)running_mean;
        a.running_var = (void *)running_var;
    } else if (update) {
        if (flags & PN_BN_CUMULATIVE) {
            if (num_batches_tracked < 1) return PN_ERR_ARG;
            a.momentum = 1.0 / (double)num_batches_tracked;
        } else {
            if (!(momentum == momentum && fabs(momentum) <= 1e300)) return PN_ERR_ARG;   /* NaN, Inf */
            a.momentum = momentum;
        }
    }
    return pn_run_spatial(forward_kernels, &a);
}

size_t pn_batchnorm_backward_scratch_size(int64_t N, int64_t C, int64_t S, pn_layout layout,
                                          pn_dtype dtype) {
    pn_spatial_args a = {.N = N, .C = C, .S = S, .G = C, .batchnorm = 1, .layout = layout, .dtype = dtype};
    return pn_sp_scratch_size(&a);
}

pn_status pn_batchnorm_backward(void *dinp, void *dweight, void *dbias,
                                void *scratch, size_t scratch_bytes,
                                const void *dout, const void *inp, const void *weight,
                                const void *mean, const void *rstd,
                                int64_t N, int64_t C, int64_t S, int flags,
                                pn_layout layout, pn_dtype dtype, pn_dtype wdtype) {
    pn_spatial_args a = {.dinp = dinp, .dweight = dweight, .dbias = dbias, .scratch = scratch,
                         .dout = dout, .inp = inp, .weight = weight, .smean = mean, .srstd = rstd,
                         .N = N, .C = C, .S = S, .G = C, .batchnorm = 1,
                         .training = (flags & PN_BN_TRAINING) != 0,
                         .accumulate = (flags & PN_ACCUMULATE) != 0,
                         .layout = layout, .dtype = dtype, .wdtype = wdtype, .rdtype = PN_FLOAT32};
    if (flags & ~(PN_ACCUMULATE | PN_BN_TRAINING)) return PN_ERR_ARG;
    pn_status st = pn_check_spatial(&a, 1, scratch_bytes);
    return st ? st : pn_run_spatial_backward(backward_kernels, &a);
}

#endif
