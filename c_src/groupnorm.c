/* groupnorm.c - GroupNorm over N samples of C channels and S spatial
 * positions, in NCHW or NHWC; InstanceNorm is GroupNorm with G = C.
 *
 * forward:  per sample n and group g of C/G channels (L = (C/G)*S values):
 *           mean, var = sum((x - mean)^2)/L, rstd = 1/sqrt(var + eps)
 *           y = (x - mean) * rstd * w[c] + b[c]
 * backward: xhat = (x - mean) * rstd,  g = dy * w[c],  means over the L values
 *           dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
 *           dw[c] = sum over n, s of dy * xhat,  db[c] = sum over n, s of dy
 *
 * The walks over memory are spatial.c's engines. In NCHW a group of a sample
 * is C/G consecutive rows of S values, one contiguous block: a thread takes a
 * block, sums it in pieces while it comes in from memory, and writes y while
 * it is still in cache. In NHWC a sample is S rows of C channels: the sums run
 * down the rows with one accumulator per channel (vectors along C), and are
 * folded into the groups at the end of each piece.
 */
#include "spatial.h"

#ifdef PN_KERNEL_BUILD

/* NCHW: set n*G + g is the C/G consecutive rows n*C + g*C/G, ... (step 1). */

pn_status PN_KERNEL(groupnorm_forward)(const pn_spatial_args *a) {
    if (a->layout == PN_NHWC) return PN_KERNEL(sp_nhwc_forward)(a);
    const pn_sp_sets sets = {a->N * a->G, a->C / a->G, 1};
    return PN_KERNEL(sp_nchw_forward)(a, &sets);
}

pn_status PN_KERNEL(groupnorm_backward)(const pn_spatial_args *a) {
    if (a->layout == PN_NHWC) return PN_KERNEL(sp_nhwc_backward)(a);
    const pn_sp_sets sets = {a->N * a->G, a->C / a->G, 1};
    return PN_KERNEL(sp_nchw_backward)(a, &sets);
}

#else /* ---- the public functions: check, then run the variant for this CPU ---- */

PN_DECLARE_VARIANTS(groupnorm_forward, pn_spatial_args)
PN_DECLARE_VARIANTS(groupnorm_backward, pn_spatial_args)
static const pn_spatial_kernel forward_kernels[3][2] = PN_VARIANTS(groupnorm_forward);
static const pn_spatial_kernel backward_kernels[3][2] = PN_VARIANTS(groupnorm_backward);

pn_status pn_groupnorm_forward(void *out, void *mean, void *rstd,
                               const void *inp, const void *weight, const void *bias,
                               int64_t N, int64_t C, int64_t S, int64_t G, double eps,
                               pn_layout layout, pn_dtype dtype, pn_dtype wdtype) {
    pn_spatial_args a = {.out = out, .mean = mean, .rstd = rstd, .inp = inp, .weight = weight,
                         .bias = bias, .N = N, .C = C, .S = S, .G = G, .eps = eps, .layout = layout,
                         .dtype = dtype, .wdtype = wdtype, .rdtype = PN_FLOAT32};
    pn_status st = pn_check_spatial(&a, 0, 0);
    return st ? st : pn_run_spatial(forward_kernels, &a);
}

size_t pn_groupnorm_backward_scratch_size(int64_t N, int64_t C, int64_t S, int64_t G,
                                          pn_layout layout, pn_dtype dtype) {
    pn_spatial_args a = {.N = N, .C = C, .S = S, .G = G, .layout = layout, .dtype = dtype};
    if (C <= 0 || G <= 0 || C % G != 0) return 0;
    return pn_sp_scratch_size(&a);
}

pn_status pn_groupnorm_backward(void *dinp, void *dweight, void *dbias,
                                void *scratch, size_t scratch_bytes,
                                const void *dout, const void *inp, const void *weight,
                                const void *mean, const void *rstd,
                                int64_t N, int64_t C, int64_t S, int64_t G, int flags,
                                pn_layout layout, pn_dtype dtype, pn_dtype wdtype) {
    pn_spatial_args a = {.dinp = dinp, .dweight = dweight, .dbias = dbias, .scratch = scratch,
                         .dout = dout, .inp = inp, .weight = weight, .smean = mean, .srstd = rstd,
                         .N = N, .C = C, .S = S, .G = G, .accumulate = (flags & PN_ACCUMULATE) != 0,
                         .layout = layout, .dtype = dtype, .wdtype = wdtype, .rdtype = PN_FLOAT32};
    if (flags & ~PN_ACCUMULATE) return PN_ERR_ARG;
    pn_status st = pn_check_spatial(&a, 1, scratch_bytes);
    return st ? st : pn_run_spatial_backward(backward_kernels, &a);
}

#endif
