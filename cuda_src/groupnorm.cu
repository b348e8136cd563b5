/* groupnorm.cu - GroupNorm (InstanceNorm: G = C) on CUDA, forward and
 * backward, NCHW or NHWC. The CUDA sibling of c_src/groupnorm.c.
 *
 * forward:  per sample n and group g of Cg = C/G channels (a "set" of
 *           L = Cg*S values): mean, var = sum((x - mean)^2)/L,
 *           rstd = 1/sqrt(var + eps), y = (x - mean) * rstd * w[c] + b[c].
 * backward: xhat = (x - mean) * rstd, g = dy * w[c], means over the set
 *           dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
 *           dw[c] = sum over n, s of dy * xhat,  db[c] = sum of dy.
 *
 * Kernels:
 *   forward    one block per set: the block sums d = x - shift and d*d in
 *              double (shift: the set's first value, as the C library), a
 *              fixed-order block sum gives mean and variance, then the same
 *              block writes y (its set is still in L2).
 *   backward   1. per (sample, channel) sums of dy and dy * (x - mean) in
 *                 double (common.cuh, sp_part_*: one chunk per sample) into
 *                 scratch;
 *              2. one block per set: its two sums from its channels' (fixed
 *                 order), then dx;
 *              3. one thread per channel: dweight, dbias over the samples
 *                 in order.
 * No atomics: the same bits on every run.
 */
#include "common.cuh"

namespace pn {
namespace {

/* Offset of element (w.o, w.in) of set (n, g), and its channel. A set is
 * NCHW: Cg rows of S contiguous values (w.o = channel in group, w.in = s);
 * NHWC: S rows of Cg contiguous channels (w.o = s, w.in = channel in group). */
__device__ __forceinline__ int64_t gn_off(const SpArgs &a, int64_t n, int64_t g, const Walk2 &w)
{
    return a.nhwc ? (n * a.S + w.o) * a.C + g * a.Cg + w.in : (n * a.C + g * a.Cg + w.o) * a.S + w.in;
}
__device__ __forceinline__ int64_t gn_chan(const SpArgs &a, int64_t g, const Walk2 &w)
{
    return g * a.Cg + (a.nhwc ? w.in : w.o);
}

template <class D>
__global__ void __launch_bounds__(512)
gn_forward(const SpArgs a)
{
    typedef typename D::raw R;
    typedef typename D::acc A;
    __shared__ double sh[64];
    const R *x = static_cast<const R *>(a.x);
    R *y = static_cast<R *>(a.y);
    const int64_t L = a.Cg * a.S, inner = a.nhwc ? a.Cg : a.S;
    for (int64_t set = blockIdx.x; set < a.N * a.G; set += gridDim.x) {
        const int64_t n = set / a.G, g = set - n * a.G;
        Walk2 w0;
        w0.init(0, 0, inner);
        const A shift = D::to(x[gn_off(a, n, g, w0)]);   /* the set's first value */

        /* statistics: sums of d = x - shift and d*d, in double */
        double s1 = 0, s2 = 0;
        Walk2 w;
        w.init(threadIdx.x, blockDim.x, inner);
        for (int64_t i = threadIdx.x; i < L; i += blockDim.x, w.next()) {
            const double d = (double)D::to(x[gn_off(a, n, g, w)]) - (double)shift;
            s1 += d;
            s2 = fma(d, d, s2);
        }
        block_sum2(s1, s2, sh);
        const double m = s1 / (double)L;
        double var = s2 / (double)L - m * m;
        if (var < 0) var = 0;             /* rounding; a NaN stays NaN */
        const A rs = (A)(1.0 / sqrt(var + a.eps));
        if (threadIdx.x == 0) {
            if (a.mean) static_cast<A *>(a.mean)[set] = (A)((double)shift + m);
            if (a.rstd) static_cast<A *>(a.rstd)[set] = rs;
        }

        /* y = ((x - shift) - m) * (rstd * w) + b, rounded once (each thread
         * reads x[i] before writing y[i]: y may be x) */
        const A mm = (A)m;
        w.init(threadIdx.x, blockDim.x, inner);
        for (int64_t i = threadIdx.x; i < L; i += blockDim.x, w.next()) {
            const int64_t off = gn_off(a, n, g, w), c = gn_chan(a, g, w);
            const A scale = rs * param_at<D>(a.w, a.w_f32, (A)1, c);
            y[off] = D::from(((D::to(x[off]) - shift) - mm) * scale + param_at<D>(a.b, a.w_f32, (A)0, c));
        }
    }
}

/* dx for one set per block: k1 = sum(g)/L, k2 = rstd^2 * sum(g * (x - mean))/L
 * from the channels' partial sums (part[(n*C + c)*2 + {0, 1}]: sum dy and
 * sum dy * (x - mean)), then dx = rstd * ((dy * w - k1) - (x - mean) * k2). */
template <class D>
__global__ void __launch_bounds__(512)
gn_dx(const SpArgs a)
{
    typedef typename D::raw R;
    typedef typename D::acc A;
    __shared__ double sh[64];
    const R *x = static_cast<const R *>(a.x);
    const R *dy = static_cast<const R *>(a.dy);
    R *dx = static_cast<R *>(a.dx);
    const int64_t L = a.Cg * a.S, inner = a.nhwc ? a.Cg : a.S;
    for (int64_t set = blockIdx.x; set < a.N * a.G; set += gridDim.x) {
        const int64_t n = set / a.G, g = set - n * a.G;
        const double *pp = a.part + n * a.C * 2;
        double sg = 0, sgx = 0;
        for (int64_t j = threadIdx.x; j < a.Cg; j += blockDim.x) {
            const int64_t c = g * a.Cg + j;
            const double wc = (double)param_at<D>(a.w, a.w_f32, (A)1, c);
            sg += wc * pp[c * 2];
            sgx += wc * pp[c * 2 + 1];
        }
        block_sum2(sg, sgx, sh);
        const A mu = static_cast<const A *>(a.mean)[set], rs = static_cast<const A *>(a.rstd)[set];
        const A k1 = (A)(sg / (double)L), k2 = (A)((double)rs * (double)rs * sgx / (double)L);
        Walk2 w;
        w.init(threadIdx.x, blockDim.x, inner);
        for (int64_t i = threadIdx.x; i < L; i += blockDim.x, w.next()) {
            const int64_t off = gn_off(a, n, g, w), c = gn_chan(a, g, w);
            const A wc = param_at<D>(a.w, a.w_f32, (A)1, c);
            A v = rs * ((D::to(dy[off]) * wc - k1) - (D::to(x[off]) - mu) * k2);
            if (a.accumulate) v += D::to(dx[off]);
            dx[off] = D::from(v);
        }
    }
}

/* dweight[c] = sum over n of rstd[n, g] * sum dy * (x - mean), dbias[c] = sum
 * over n of sum dy: one thread per channel, samples in order. */
template <class D>
__global__ void gn_dparams(const SpArgs a)
{
    typedef typename D::acc A;
    const A *rstd = static_cast<const A *>(a.rstd);
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < a.C; c += (int64_t)gridDim.x * blockDim.x) {
        const int64_t g = c / a.Cg;
        double dw = 0, db = 0;
        for (int64_t n = 0; n < a.N; ++n) {
            db += a.part[(n * a.C + c) * 2];
            dw += (double)rstd[n * a.G + g] * a.part[(n * a.C + c) * 2 + 1];
        }
        if (a.dw) sp_store_grad<A>(a.dw, a.wdt, c, dw, a.accumulate);
        if (a.db) sp_store_grad<A>(a.db, a.wdt, c, db, a.accumulate);
    }
}

/* Threads per set: fixed by the set's size (so are the sums' order and bits). */
inline unsigned gn_threads(int64_t L) { return L <= 512 ? 128 : (L <= 8192 ? 256 : 512); }

template <class D>
void gn_forward_launch(const SpArgs &a, cudaStream_t s)
{
    gn_forward<D><<<grid_for(a.N * a.G), gn_threads(a.Cg * a.S), 0, s>>>(a);
}

template <class D>
void gn_backward_launch(const SpArgs &a, cudaStream_t s)
{
    sp_launch_partials<D, true>(a, s);
    if (a.dx) gn_dx<D><<<grid_for(a.N * a.G), gn_threads(a.Cg * a.S), 0, s>>>(a);
    if (a.dw || a.db) gn_dparams<D><<<grid_for(ceil_div(a.C, 256)), 256, 0, s>>>(a);
}

} /* namespace */
} /* namespace pn */

using namespace pn;

extern "C" {

pn_status pn_cuda_groupnorm_forward(void *out, void *mean, void *rstd,
                                    const void *inp, const void *weight, const void *bias,
                                    int64_t N, int64_t C, int64_t S, int64_t G, double eps,
                                    pn_layout layout, pn_dtype dtype, pn_dtype wdtype,
                                    cudaStream_t stream)
{
    pn_status st;
    bool nhwc;
    if ((st = sp_check(inp != nullptr && out != nullptr, dtype, wdtype, layout, N, C, S, G, &eps, &nhwc)) != PN_OK)
        return st;
    const int es = dtype_size(dtype), wes = dtype_size(wdtype), ss = dtype == PN_FLOAT64 ? 8 : 4;
    const int64_t n = N * C * S;
    Span outs[3], ins[3];
    if ((st = dense_span(out, n, es, es, true, &outs[0], nullptr)) != PN_OK) return st;
    if ((st = dense_span(mean, N * G, ss, ss, true, &outs[1], nullptr)) != PN_OK) return st;
    if ((st = dense_span(rstd, N * G, ss, ss, true, &outs[2], nullptr)) != PN_OK) return st;
    if ((st = dense_span(inp, n, es, es, false, &ins[0], nullptr)) != PN_OK) return st;
    if ((st = dense_span(weight, C, wes, wes, false, &ins[1], nullptr)) != PN_OK) return st;
    if ((st = dense_span(bias, C, wes, wes, false, &ins[2], nullptr)) != PN_OK) return st;
    static const unsigned char same_ok[3 * 3] = {1, 0, 0};   /* y over x (in place) */
    if ((st = sp_overlaps(outs, 3, ins, 3, same_ok)) != PN_OK) return st;

    SpArgs a = {};
    a.x = inp; a.w = weight; a.b = bias; a.y = out; a.mean = mean; a.rstd = rstd;
    a.N = N; a.C = C; a.S = S; a.G = G; a.Cg = C / G;
    a.eps = eps; a.nhwc = nhwc; a.w_f32 = wdtype == PN_FLOAT32;
    switch (dtype) {
    case PN_FLOAT32: gn_forward_launch<F32>(a, stream); break;
    case PN_FLOAT16: gn_forward_launch<F16>(a, stream); break;
    case PN_BFLOAT16: gn_forward_launch<BF16>(a, stream); break;
    case PN_FLOAT64: gn_forward_launch<F64>(a, stream); break;
    }
    return launch_status();
}

size_t pn_cuda_groupnorm_backward_scratch_size(int64_t N, int64_t C, int64_t S, int64_t G,
                                               pn_layout layout, pn_dtype dtype)
{
    int64_t rows, bytes;
    if (!valid_dtype(dtype) || (layout != PN_NCHW && layout != PN_NHWC)) return 0;
    if (check_sizes(N, C, S, dtype_size(dtype), &rows) != PN_OK) return 0;
    if (G <= 0 || C % G != 0) return 0;
    /* two double sums per (sample, channel); N*C*S*esize fits in int64 */
    if (mul_ovf(N * C, 16, &bytes)) return 0;
    return (size_t)bytes;
}

pn_status pn_cuda_groupnorm_backward(void *dinp, void *dweight, void *dbias,
                                     void *scratch, size_t scratch_bytes,
                                     const void *dout, const void *inp, const void *weight,
                                     const void *mean, const void *rstd,
                                     int64_t N, int64_t C, int64_t S, int64_t G, int flags,
                                     pn_layout layout, pn_dtype dtype, pn_dtype wdtype,
                                     cudaStream_t stream)
{
    pn_status st;
    bool nhwc;
    if (flags & ~PN_ACCUMULATE) return PN_ERR_ARG;
    const bool ptrs = inp != nullptr && dout != nullptr && mean != nullptr && rstd != nullptr;
    if ((st = sp_check(ptrs, dtype, wdtype, layout, N, C, S, G, nullptr, &nhwc)) != PN_OK) return st;
    const bool used = dinp != nullptr || dweight != nullptr || dbias != nullptr;
    const size_t need = pn_cuda_groupnorm_backward_scratch_size(N, C, S, G, layout, dtype);
    if (used && (scratch == nullptr || scratch_bytes < need || (uintptr_t)scratch % 16 != 0))
        return PN_ERR_SCRATCH;
    if ((st = sp_backward_buffers(dinp, dweight, dbias, scratch, need, used, dout, inp, weight, mean, rstd,
                                  N * C * S, C, N * G, dtype, wdtype)) != PN_OK)
        return st;
    if (!used) return PN_OK;

    SpArgs a = {};
    a.x = inp; a.dy = dout; a.w = weight; a.dx = dinp; a.dw = dweight; a.db = dbias;
    a.mean = const_cast<void *>(mean); a.rstd = const_cast<void *>(rstd);
    a.part = static_cast<double *>(scratch);
    a.N = N; a.C = C; a.S = S; a.G = G; a.Cg = C / G;
    a.P = N; a.chunk = S; a.per_sample = 1;   /* one chunk of positions per sample */
    a.nhwc = nhwc; a.w_f32 = wdtype == PN_FLOAT32; a.wdt = wdtype;
    a.accumulate = (flags & PN_ACCUMULATE) != 0;
    switch (dtype) {
    case PN_FLOAT32: gn_backward_launch<F32>(a, stream); break;
    case PN_FLOAT16: gn_backward_launch<F16>(a, stream); break;
    case PN_BFLOAT16: gn_backward_launch<BF16>(a, stream); break;
    case PN_FLOAT64: gn_backward_launch<F64>(a, stream); break;
    }
    return launch_status();
}

} /* extern "C" */
