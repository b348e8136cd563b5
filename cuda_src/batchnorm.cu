/* batchnorm.cu - BatchNorm on CUDA, forward (training and eval) and
 * backward, NCHW or NHWC (S = 1: BatchNorm1d). The CUDA sibling of
 * c_src/batchnorm.c.
 *
 * training: per channel c over its M = N*S values: mean, var (biased),
 *           rstd = 1/sqrt(var + eps), y = (x - mean) * rstd * w[c] + b[c];
 *           running_mean = (1 - f) * running_mean + f * mean
 *           running_var  = (1 - f) * running_var  + f * var * M/(M-1)
 *           with f = momentum, or 1/num_batches_tracked (PN_BN_CUMULATIVE)
 * eval:     the same y from the running statistics.
 * backward: xhat = (x - mean) * rstd, g = dy * w[c], means over the M values
 *           training: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
 *           eval:     dx = rstd * g (the statistics are constants)
 *           dw[c] = sum of dy * xhat,  db[c] = sum of dy
 *
 * Kernels:
 *   1. partial sums per (channel, chunk of positions) in double (common.cuh,
 *      sp_part_*; the chunks depend on N*S only): forward sum(d), sum(d*d)
 *      with d = x - the channel's first value; backward sum(dy),
 *      sum(dy * (x - mean));
 *   2. one thread per channel adds its chunks in order and finishes the
 *      channel: statistics, running statistics, dweight/dbias, and the few
 *      per-channel values the elementwise pass needs (kept in a small
 *      buffer: forward, from the stream-ordered pool; backward, in scratch);
 *   3. an elementwise pass writes y or dx (grid-stride; the channel of each
 *      element is stepped along without divisions).
 * Eval skips step 1. No atomics: the same bits on every run.
 */
#include "common.cuh"

namespace pn {
namespace {

/* Forward, one thread per channel: statistics from the chunks (training) or
 * the running statistics (eval); coef (A values, 4 arrays of C): shift, mean
 * of x - shift, rstd * w, b. */
template <class D>
__global__ void bn_forward_finish(const SpArgs a)
{
    typedef typename D::acc A;
    A *coef = static_cast<A *>(a.coef);
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < a.C; c += (int64_t)gridDim.x * blockDim.x) {
        A sh, mm, rs;
        if (a.training) {
            double s1 = 0, s2 = 0;
            for (int64_t p = 0; p < a.P; ++p) {
                s1 += a.part[(p * a.C + c) * 2];
                s2 += a.part[(p * a.C + c) * 2 + 1];
            }
            const double M = (double)(a.N * a.S);
            const double m = s1 / M;
            double var = s2 / M - m * m;
            if (var < 0) var = 0;   /* rounding; a NaN stays NaN */
            sh = D::to(static_cast<const typename D::raw *>(a.x)[a.nhwc ? c : c * a.S]);
            mm = (A)m;
            rs = (A)(1.0 / sqrt(var + a.eps));
            const double mean = (double)sh + m, f = a.momentum;
            if (a.mean) static_cast<A *>(a.mean)[c] = (A)mean;
            if (a.rstd) static_cast<A *>(a.rstd)[c] = rs;
            if (a.rm) st_any<A>(a.rm, a.rdt, c, (A)(f * mean + (1 - f) * ld_any(a.rm, a.rdt, c)));
            if (a.rv) st_any<A>(a.rv, a.rdt, c, (A)(f * (var * M / (M - 1)) + (1 - f) * ld_any(a.rv, a.rdt, c)));
        } else {
            sh = (A)ld_any(a.rm, a.rdt, c);
            mm = 0;
            rs = (A)(1.0 / sqrt(ld_any(a.rv, a.rdt, c) + a.eps));
            if (a.mean) static_cast<A *>(a.mean)[c] = sh;
            if (a.rstd) static_cast<A *>(a.rstd)[c] = rs;
        }
        coef[c] = sh;
        coef[a.C + c] = mm;
        coef[2 * a.C + c] = rs * param_at<D>(a.w, a.w_f32, (A)1, c);
        coef[3 * a.C + c] = param_at<D>(a.b, a.w_f32, (A)0, c);
    }
}

/* y = ((x - shift) - m) * (rstd * w) + b, rounded once. */
template <class D>
__global__ void __launch_bounds__(256)
bn_apply(const SpArgs a)
{
    typedef typename D::raw R;
    typedef typename D::acc A;
    const A *coef = static_cast<const A *>(a.coef);
    const R *x = static_cast<const R *>(a.x);
    R *y = static_cast<R *>(a.y);
    const int64_t n = a.N * a.C * a.S, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    ChanWalk w;
    w.init(i0, stride, a.nhwc ? 1 : a.S, a.C);
    for (int64_t i = i0; i < n; i += stride, w.next()) {
        const int64_t c = w.c;
        y[i] = D::from(((D::to(x[i]) - coef[c]) - coef[a.C + c]) * coef[2 * a.C + c] + coef[3 * a.C + c]);
    }
}

/* Backward, one thread per channel: sum(dy), sum(dy * (x - mean)) from the
 * chunks in order; dbias, dweight = rstd * sum(dy * (x - mean)); coef (two
 * doubles per channel after the partials): k1 = w * sum(dy) / M and
 * k2 = rstd^2 * w * sum(dy * (x - mean)) / M in training, zero in eval. */
template <class D>
__global__ void bn_backward_finish(const SpArgs a)
{
    typedef typename D::acc A;
    double *coef = static_cast<double *>(a.coef);
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < a.C; c += (int64_t)gridDim.x * blockDim.x) {
        double t0 = 0, t1 = 0;
        for (int64_t p = 0; p < a.P; ++p) {
            t0 += a.part[(p * a.C + c) * 2];
            t1 += a.part[(p * a.C + c) * 2 + 1];
        }
        const double rs = (double)static_cast<const A *>(a.rstd)[c];
        if (a.db) sp_store_grad<A>(a.db, a.wdt, c, t0, a.accumulate);
        if (a.dw) sp_store_grad<A>(a.dw, a.wdt, c, rs * t1, a.accumulate);
        const double M = (double)(a.N * a.S), wc = (double)param_at<D>(a.w, a.w_f32, (A)1, c);
        /* rounded to A here, as the elementwise pass uses them */
        coef[2 * c] = a.training ? (double)(A)(wc * t0 / M) : 0.0;
        coef[2 * c + 1] = a.training ? (double)(A)(rs * rs * (wc * t1) / M) : 0.0;
    }
}

/* dx = rstd * ((dy * w - k1) - (x - mean) * k2), added to dx when accumulating. */
template <class D>
__global__ void __launch_bounds__(256)
bn_dx(const SpArgs a)
{
    typedef typename D::raw R;
    typedef typename D::acc A;
    const double *coef = static_cast<const double *>(a.coef);
    const A *mean = static_cast<const A *>(a.mean), *rstd = static_cast<const A *>(a.rstd);
    const R *x = static_cast<const R *>(a.x);
    const R *dy = static_cast<const R *>(a.dy);
    R *dx = static_cast<R *>(a.dx);
    const int64_t n = a.N * a.C * a.S, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    ChanWalk w;
    w.init(i0, stride, a.nhwc ? 1 : a.S, a.C);
    for (int64_t i = i0; i < n; i += stride, w.next()) {
        const int64_t c = w.c;
        const A wc = param_at<D>(a.w, a.w_f32, (A)1, c), k1 = (A)coef[2 * c], k2 = (A)coef[2 * c + 1];
        A v = rstd[c] * ((D::to(dy[i]) * wc - k1) - (D::to(x[i]) - mean[c]) * k2);
        if (a.accumulate) v += D::to(dx[i]);
        dx[i] = D::from(v);
    }
}

template <class D>
void bn_forward_launch(const SpArgs &a, cudaStream_t s)
{
    if (a.training) sp_launch_partials<D, false>(a, s);
    bn_forward_finish<D><<<grid_for(ceil_div(a.C, 256)), 256, 0, s>>>(a);
    bn_apply<D><<<elem_grid(a.N * a.C * a.S), 256, 0, s>>>(a);
}

template <class D>
void bn_backward_launch(const SpArgs &a, cudaStream_t s)
{
    sp_launch_partials<D, true>(a, s);
    bn_backward_finish<D><<<grid_for(ceil_div(a.C, 256)), 256, 0, s>>>(a);
    if (a.dx) bn_dx<D><<<elem_grid(a.N * a.C * a.S), 256, 0, s>>>(a);
}

/* Bytes of the partial sums of P chunks x C channels (two doubles each). */
inline bool bn_part_bytes(int64_t N, int64_t C, int64_t S, int64_t *P, int64_t *chunk, int64_t *bytes)
{
    sp_partition(N * S, P, chunk);
    return !mul_ovf(*P * 16, C, bytes);
}

} /* namespace */
} /* namespace pn */

using namespace pn;

extern "C" {

pn_status pn_cuda_batchnorm_forward(void *out, void *mean, void *rstd,
                                    void *running_mean, void *running_var,
                                    const void *inp, const void *weight, const void *bias,
                                    int64_t N, int64_t C, int64_t S, double eps, double momentum,
                                    int64_t num_batches_tracked, int flags,
                                    pn_layout layout, pn_dtype dtype, pn_dtype wdtype, pn_dtype rdtype,
                                    cudaStream_t stream)
{
    pn_status st;
    bool nhwc;
    const bool training = (flags & PN_BN_TRAINING) != 0;
    const bool update = training && (running_mean != nullptr || running_var != nullptr);
    /* the C library's order of checks (c_src/batchnorm.c) */
    if (flags & ~(PN_BN_TRAINING | PN_BN_CUMULATIVE)) return PN_ERR_ARG;
    if (!training && (running_mean == nullptr || running_var == nullptr)) return PN_ERR_NULL;
    if ((running_mean != nullptr || running_var != nullptr) && check_dtypes(dtype, rdtype) != PN_OK)
        return PN_ERR_DTYPE;
    if ((st = sp_check(inp != nullptr && out != nullptr, dtype, wdtype, layout, N, C, S, C, &eps, &nhwc)) != PN_OK)
        return st;
    const int es = dtype_size(dtype), wes = dtype_size(wdtype), ss = dtype == PN_FLOAT64 ? 8 : 4;
    const int rs_ = dtype_size(rdtype);
    const int64_t n = N * C * S;
    Span outs[5], ins[3];
    if ((st = dense_span(out, n, es, es, true, &outs[0], nullptr)) != PN_OK) return st;
    if ((st = dense_span(mean, C, ss, ss, true, &outs[1], nullptr)) != PN_OK) return st;
    if ((st = dense_span(rstd, C, ss, ss, true, &outs[2], nullptr)) != PN_OK) return st;
    if ((st = dense_span(update ? running_mean : nullptr, C, rs_, rs_, true, &outs[3], nullptr)) != PN_OK) return st;
    if ((st = dense_span(update ? running_var : nullptr, C, rs_, rs_, true, &outs[4], nullptr)) != PN_OK) return st;
    if ((st = dense_span(inp, n, es, es, false, &ins[0], nullptr)) != PN_OK) return st;
    if ((st = dense_span(weight, C, wes, wes, false, &ins[1], nullptr)) != PN_OK) return st;
    if ((st = dense_span(bias, C, wes, wes, false, &ins[2], nullptr)) != PN_OK) return st;
    static const unsigned char same_ok[5 * 3] = {1, 0, 0};   /* y over x (in place) */
    if ((st = sp_overlaps(outs, 5, ins, 3, same_ok)) != PN_OK) return st;
    if (training && N * S == 1) return PN_ERR_SIZE;   /* torch: "more than 1 value per channel" */
    double f = 0.0;
    if (!training) {
        /* read-only inputs in eval: they must not overlap an output */
        Span rin[2];
        if ((st = dense_span(running_mean, C, rs_, rs_, false, &rin[0], nullptr)) != PN_OK) return st;
        if ((st = dense_span(running_var, C, rs_, rs_, false, &rin[1], nullptr)) != PN_OK) return st;
        if ((st = sp_overlaps(outs, 3, rin, 2, nullptr)) != PN_OK) return st;
    } else if (update) {
        if (flags & PN_BN_CUMULATIVE) {
            if (num_batches_tracked < 1) return PN_ERR_ARG;
            f = 1.0 / (double)num_batches_tracked;
        } else {
            if (!(momentum == momentum && fabs(momentum) <= 1e300)) return PN_ERR_ARG;   /* NaN, Inf */
            f = momentum;
        }
    }

    SpArgs a = {};
    a.x = inp; a.w = weight; a.b = bias; a.y = out; a.mean = mean; a.rstd = rstd;
    a.rm = running_mean; a.rv = running_var;
    a.N = N; a.C = C; a.S = S; a.G = C; a.Cg = 1;
    a.eps = eps; a.momentum = f; a.rdt = rdtype;
    a.nhwc = nhwc; a.w_f32 = wdtype == PN_FLOAT32; a.training = training;
    int64_t part_bytes = 0, total_bytes;
    if (training && !bn_part_bytes(N, C, S, &a.P, &a.chunk, &part_bytes)) return PN_ERR_SIZE;
    if (mul_ovf(C, 4 * (int64_t)ss, &total_bytes) || add_ovf(part_bytes, total_bytes, &total_bytes)) return PN_ERR_SIZE;

    /* working memory (partial sums, then the per-channel values) from the
     * stream-ordered pool: nothing has been launched if this fails */
    void *ws = nullptr;
    const cudaError_t e = cudaMallocAsync(&ws, (size_t)total_bytes, stream);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (e == cudaErrorMemoryAllocation) return PN_ERR_ALLOC;
        pn_cuda_set_last_error_((int)e);
        return (pn_status)PN_CUDA_ERR_LAUNCH;
    }
    a.part = static_cast<double *>(ws);
    a.coef = static_cast<char *>(ws) + part_bytes;
    switch (dtype) {
    case PN_FLOAT32: bn_forward_launch<F32>(a, stream); break;
    case PN_FLOAT16: bn_forward_launch<F16>(a, stream); break;
    case PN_BFLOAT16: bn_forward_launch<BF16>(a, stream); break;
    case PN_FLOAT64: bn_forward_launch<F64>(a, stream); break;
    }
    const pn_status ls = launch_status();
    cudaFreeAsync(ws, stream);
    return ls;
}

size_t pn_cuda_batchnorm_backward_scratch_size(int64_t N, int64_t C, int64_t S, pn_layout layout, pn_dtype dtype)
{
    int64_t rows, P, chunk, bytes, total;
    if (!valid_dtype(dtype) || (layout != PN_NCHW && layout != PN_NHWC)) return 0;
    if (check_sizes(N, C, S, dtype_size(dtype), &rows) != PN_OK) return 0;
    /* the partial sums, then k1, k2 per channel (doubles) */
    if (!bn_part_bytes(N, C, S, &P, &chunk, &bytes) || mul_ovf(C, 16, &total) || add_ovf(bytes, total, &total))
        return 0;
    return (size_t)total;
}

pn_status pn_cuda_batchnorm_backward(void *dinp, void *dweight, void *dbias,
                                     void *scratch, size_t scratch_bytes,
                                     const void *dout, const void *inp, const void *weight,
                                     const void *mean, const void *rstd,
                                     int64_t N, int64_t C, int64_t S, int flags,
                                     pn_layout layout, pn_dtype dtype, pn_dtype wdtype,
                                     cudaStream_t stream)
{
    pn_status st;
    bool nhwc;
    if (flags & ~(PN_ACCUMULATE | PN_BN_TRAINING)) return PN_ERR_ARG;
    const bool ptrs = inp != nullptr && dout != nullptr && mean != nullptr && rstd != nullptr;
    if ((st = sp_check(ptrs, dtype, wdtype, layout, N, C, S, C, nullptr, &nhwc)) != PN_OK) return st;
    const bool used = dinp != nullptr || dweight != nullptr || dbias != nullptr;
    const size_t need = pn_cuda_batchnorm_backward_scratch_size(N, C, S, layout, dtype);
    if (used && (scratch == nullptr || need == 0 || scratch_bytes < need || (uintptr_t)scratch % 16 != 0))
        return PN_ERR_SCRATCH;
    if ((st = sp_backward_buffers(dinp, dweight, dbias, scratch, need, used, dout, inp, weight, mean, rstd,
                                  N * C * S, C, C, dtype, wdtype)) != PN_OK)
        return st;
    if (!used) return PN_OK;

    SpArgs a = {};
    a.x = inp; a.dy = dout; a.w = weight; a.dx = dinp; a.dw = dweight; a.db = dbias;
    a.mean = const_cast<void *>(mean); a.rstd = const_cast<void *>(rstd);
    a.N = N; a.C = C; a.S = S; a.G = C; a.Cg = 1;
    int64_t part_bytes;
    bn_part_bytes(N, C, S, &a.P, &a.chunk, &part_bytes);
    a.part = static_cast<double *>(scratch);
    a.coef = static_cast<char *>(scratch) + part_bytes;
    a.nhwc = nhwc; a.w_f32 = wdtype == PN_FLOAT32; a.wdt = wdtype;
    a.training = (flags & PN_BN_TRAINING) != 0;
    a.accumulate = (flags & PN_ACCUMULATE) != 0;
    switch (dtype) {
    case PN_FLOAT32: bn_backward_launch<F32>(a, stream); break;
    case PN_FLOAT16: bn_backward_launch<F16>(a, stream); break;
    case PN_BFLOAT16: bn_backward_launch<BF16>(a, stream); break;
    case PN_FLOAT64: bn_backward_launch<F64>(a, stream); break;
    }
    return launch_status();
}

} /* extern "C" */
