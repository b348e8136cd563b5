/* shard.cu - the sharded statistics of c_src/layernorm_shard.c,
 * c_src/rmsnorm_shard.c and c_src/batchnorm_sync.c on CUDA: tensor-parallel
 * LayerNorm/RMSNorm and synchronized BatchNorm (see pynorm.h for the maths).
 *
 * Simple kernels, written for exactness and determinism rather than peak
 * bandwidth: one block per row (token norms) or per channel (BatchNorm
 * statistics), per-thread sums in double combined by a fixed-order tree in
 * shared memory; parameter gradients by one thread per column walking the
 * rows in order. No atomics: the same bits on every run. The LayerNorm shift
 * and the hi + lo split of the double mean are those of the C library.
 * widths/counts arrays of the combine functions live in host memory and
 * reach the kernel by value, as a kernel argument (ShardSizes, at most
 * kMaxShards = PN_CUDA_MAX_SHARDS of them): no copy, no allocation, nothing
 * that could wait on the host or point into the caller's memory once the call
 * has returned (a captured graph keeps the values themselves). The
 * backward's scratch is not used (NULL is fine).
 */
#include "common.cuh"

namespace pn {
namespace {

constexpr int kShardThreads = 256;

static_assert(kMaxShards == PN_CUDA_MAX_SHARDS, "launch.h and pynorm_cuda.h disagree on the shard limit");

/* The shards' widths (token norms) or counts (BatchNorm), by value. */
struct ShardSizes {
    int64_t n[kMaxShards];
};

/* fixed-order block sum of one double per thread (blockDim.x == kShardThreads) */
__device__ double block_sum_d(double v, double *sh)
{
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int w = kShardThreads / 2; w >= 1; w /= 2) {
        if ((int)threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
        __syncthreads();
    }
    const double r = sh[0];
    __syncthreads();
    return r;
}

template <class D>
__device__ __forceinline__ double ld(const void *p, int64_t i) { return (double)D::to(static_cast<const typename D::raw *>(p)[i]); }

template <class D>
__device__ __forceinline__ typename D::acc ldp(const void *p, bool f32, int64_t i, typename D::acc dflt)
{
    if (!p) return dflt;
    if (f32) return (typename D::acc) static_cast<const float *>(p)[i];
    return D::to(static_cast<const typename D::raw *>(p)[i]);
}

struct ShardArgs {
    const void *x, *dy, *w, *b;
    void *y, *dx, *dw, *db;
    double *part;
    const double *mean, *rstd, *sums;
    int64_t rows, T, C, C_total;
    int64_t xsb, xst, ysb, yst, dysb, dyst, dxsb, dxst;
    bool wf32, ln, accumulate;
};

/* ---- token norms ------------------------------------------------------------------ */

template <class D>
__global__ void __launch_bounds__(kShardThreads) shard_stats_k(const ShardArgs a)
{
    __shared__ double sh[kShardThreads];
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const void *x = static_cast<const typename D::raw *>(a.x) + row_off(r, a.T, a.xsb, a.xst);
        if (!a.ln) {
            double s = 0;
            for (int64_t i = threadIdx.x; i < a.C; i += kShardThreads) { double v = ld<D>(x, i); s += v * v; }
            s = block_sum_d(s, sh);
            if (threadIdx.x == 0) a.part[r] = s;
            continue;
        }
        const double x0 = ld<D>(x, 0);
        double s = 0;
        for (int64_t i = threadIdx.x; i < a.C; i += kShardThreads) s += ld<D>(x, i) - x0;
        const double m = block_sum_d(s, sh) / (double)a.C;
        double q = 0;
        for (int64_t i = threadIdx.x; i < a.C; i += kShardThreads) { double d = (ld<D>(x, i) - x0) - m; q += d * d; }
        q = block_sum_d(q, sh);
        if (threadIdx.x == 0) { a.part[2 * r] = x0 + m; a.part[2 * r + 1] = q; }
    }
}

template <class D>
__global__ void __launch_bounds__(kShardThreads) shard_apply_k(const ShardArgs a)
{
    typedef typename D::acc A;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const typename D::raw *x = static_cast<const typename D::raw *>(a.x) + row_off(r, a.T, a.xsb, a.xst);
        typename D::raw *y = static_cast<typename D::raw *>(a.y) + row_off(r, a.T, a.ysb, a.yst);
        const double md = a.ln ? a.mean[r] : 0.0;
        const A hi = (A)md, lo = (A)(md - (double)hi), rs = (A)a.rstd[r];
        for (int64_t i = threadIdx.x; i < a.C; i += kShardThreads) {
            const A xv = D::to(x[i]);
            const A w = ldp<D>(a.w, a.wf32, i, (A)1), b = a.ln ? ldp<D>(a.b, a.wf32, i, (A)0) : (A)0;
            const A v = a.ln ? ((xv - hi) - lo) * rs * w + b : xv * rs * w;
            y[i] = D::from(v);
        }
    }
}

template <class D>
__global__ void __launch_bounds__(kShardThreads) shard_bsums_k(const ShardArgs a)
{
    typedef typename D::acc A;
    __shared__ double sh[kShardThreads];
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const typename D::raw *x = static_cast<const typename D::raw *>(a.x) + row_off(r, a.T, a.xsb, a.xst);
        const typename D::raw *dy = static_cast<const typename D::raw *>(a.dy) + row_off(r, a.T, a.dysb, a.dyst);
        const double md = a.ln ? a.mean[r] : 0.0;
        const A hi = (A)md, lo = (A)(md - (double)hi), rs = (A)a.rstd[r];
        double sg = 0, sgx = 0;
        for (int64_t i = threadIdx.x; i < a.C; i += kShardThreads) {
            const A g = D::to(dy[i]) * ldp<D>(a.w, a.wf32, i, (A)1);
            const A xh = ((D::to(x[i]) - hi) - lo) * rs;
            sg += (double)g;
            sgx += (double)(g * xh);
        }
        sgx = block_sum_d(sgx, sh);
        if (a.ln) sg = block_sum_d(sg, sh);
        if (threadIdx.x == 0) {
            if (a.ln) { a.part[2 * r] = sg; a.part[2 * r + 1] = sgx; }
            else a.part[r] = sgx;
        }
    }
}

template <class D>
__global__ void __launch_bounds__(kShardThreads) shard_dx_k(const ShardArgs a)
{
    typedef typename D::acc A;
    const double invC = 1.0 / (double)a.C_total;
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
        const typename D::raw *x = static_cast<const typename D::raw *>(a.x) + row_off(r, a.T, a.xsb, a.xst);
        const typename D::raw *dy = static_cast<const typename D::raw *>(a.dy) + row_off(r, a.T, a.dysb, a.dyst);
        typename D::raw *dx = static_cast<typename D::raw *>(a.dx) + row_off(r, a.T, a.dxsb, a.dxst);
        const double md = a.ln ? a.mean[r] : 0.0;
        const A hi = (A)md, lo = (A)(md - (double)hi), rs = (A)a.rstd[r];
        const A mg = a.ln ? (A)(a.sums[2 * r] * invC) : (A)0;
        const A mgx = (A)(a.sums[a.ln ? 2 * r + 1 : r] * invC);
        for (int64_t i = threadIdx.x; i < a.C; i += kShardThreads) {
            const A g = D::to(dy[i]) * ldp<D>(a.w, a.wf32, i, (A)1);
            const A xh = ((D::to(x[i]) - hi) - lo) * rs;
            A v = rs * ((g - mg) - xh * mgx);
            if (a.accumulate) v += D::to(dx[i]);
            dx[i] = D::from(v);
        }
    }
}

/* one thread per column: dw = sum over rows of dy * xhat, db = sum of dy, rows in order */
template <class D>
__global__ void shard_dparam_k(const ShardArgs a)
{
    typedef typename D::acc A;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= a.C) return;
    double sw = 0, sb = 0;
    for (int64_t r = 0; r < a.rows; r++) {
        const A dy = D::to(static_cast<const typename D::raw *>(a.dy)[row_off(r, a.T, a.dysb, a.dyst) + i]);
        const A xv = D::to(static_cast<const typename D::raw *>(a.x)[row_off(r, a.T, a.xsb, a.xst) + i]);
        const double md = a.ln ? a.mean[r] : 0.0;
        const A hi = (A)md, lo = (A)(md - (double)hi), rs = (A)a.rstd[r];
        sw += (double)(dy * (((xv - hi) - lo) * rs));
        sb += (double)dy;
    }
    if (a.dw) {
        if (a.wf32) { float *p = static_cast<float *>(a.dw); p[i] = (float)((a.accumulate ? (double)p[i] : 0.0) + sw); }
        else { typename D::raw *p = static_cast<typename D::raw *>(a.dw);
               p[i] = D::from((A)((a.accumulate ? (double)D::to(p[i]) : 0.0) + sw)); }
    }
    if (a.db) {
        if (a.wf32) { float *p = static_cast<float *>(a.db); p[i] = (float)((a.accumulate ? (double)p[i] : 0.0) + sb); }
        else { typename D::raw *p = static_cast<typename D::raw *>(a.db);
               p[i] = D::from((A)((a.accumulate ? (double)D::to(p[i]) : 0.0) + sb)); }
    }
}

__global__ void ln_combine_k(double *mean, double *rstd, const double *parts, const ShardSizes sz,
                             int64_t P, int64_t rows, double eps, int ln)
{
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    double C = 0;
    for (int64_t p = 0; p < P; p++) C += (double)sz.n[p];
    if (!ln) {
        double s = 0;
        for (int64_t p = 0; p < P; p++) s += parts[p * rows + r];
        rstd[r] = 1.0 / sqrt(s / C + eps);
        return;
    }
    double sm = 0, m2 = 0;
    for (int64_t p = 0; p < P; p++) sm += (double)sz.n[p] * parts[(p * rows + r) * 2];
    const double m = sm / C;
    for (int64_t p = 0; p < P; p++) {
        const double d = parts[(p * rows + r) * 2] - m;
        m2 += parts[(p * rows + r) * 2 + 1] + (double)sz.n[p] * d * d;
    }
    if (mean) mean[r] = m;
    if (rstd) rstd[r] = 1.0 / sqrt(m2 / C + eps);
}

/* ---- BatchNorm ------------------------------------------------------------------------- */

struct BnArgs {
    const void *x, *dy, *w, *b;
    void *y, *dx, *dw, *db;
    double *part;
    const double *mean, *rstd, *local, *sums;
    int64_t N, C, S, count;
    bool nchw, wf32, accumulate;
};

__device__ __forceinline__ int64_t bn_index(const BnArgs &a, int64_t c, int64_t v)
{
    if (!a.nchw) return v * a.C + c;
    const int64_t n = v / a.S;
    return (n * a.C + c) * a.S + (v - n * a.S);
}
__device__ __forceinline__ int64_t bn_channel(const BnArgs &a, int64_t i)
{
    return a.nchw ? (i / a.S) % a.C : i % a.C;
}

template <class D>
__global__ void __launch_bounds__(kShardThreads) bn_stats_k(const BnArgs a)
{
    __shared__ double sh[kShardThreads];
    const int64_t M = a.N * a.S;
    for (int64_t c = blockIdx.x; c < a.C; c += gridDim.x) {
        const double x0 = ld<D>(a.x, bn_index(a, c, 0));
        double s = 0;
        for (int64_t v = threadIdx.x; v < M; v += kShardThreads) s += ld<D>(a.x, bn_index(a, c, v)) - x0;
        const double m = block_sum_d(s, sh) / (double)M;
        double q = 0;
        for (int64_t v = threadIdx.x; v < M; v += kShardThreads) {
            const double d = (ld<D>(a.x, bn_index(a, c, v)) - x0) - m;
            q += d * d;
        }
        q = block_sum_d(q, sh);
        if (threadIdx.x == 0) { a.part[2 * c] = x0 + m; a.part[2 * c + 1] = q; }
    }
}

template <class D>
__global__ void __launch_bounds__(kShardThreads) bn_bsums_k(const BnArgs a)
{
    __shared__ double sh[kShardThreads];
    const int64_t M = a.N * a.S;
    for (int64_t c = blockIdx.x; c < a.C; c += gridDim.x) {
        double sd = 0, sx = 0;
        for (int64_t v = threadIdx.x; v < M; v += kShardThreads) {
            const int64_t i = bn_index(a, c, v);
            const double g = ld<D>(a.dy, i);
            sd += g;
            sx += g * (ld<D>(a.x, i) - a.mean[c]);
        }
        sd = block_sum_d(sd, sh);
        sx = block_sum_d(sx, sh);
        if (threadIdx.x == 0) { a.part[2 * c] = sd; a.part[2 * c + 1] = sx; }
    }
}

template <class D>
__global__ void bn_apply_k(const BnArgs a)
{
    const int64_t n = a.N * a.C * a.S;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = bn_channel(a, i);
        const double wc = a.w ? (a.wf32 ? (double)static_cast<const float *>(a.w)[c] : ld<D>(a.w, c)) : 1.0;
        const double bc = a.b ? (a.wf32 ? (double)static_cast<const float *>(a.b)[c] : ld<D>(a.b, c)) : 0.0;
        const double v = (ld<D>(a.x, i) - a.mean[c]) * a.rstd[c] * wc + bc;
        static_cast<typename D::raw *>(a.y)[i] = D::from((typename D::acc)v);
    }
}

template <class D>
__global__ void bn_dx_k(const BnArgs a)
{
    const int64_t n = a.N * a.C * a.S;
    const double inv = 1.0 / (double)a.count;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = bn_channel(a, i);
        const double wc = a.w ? (a.wf32 ? (double)static_cast<const float *>(a.w)[c] : ld<D>(a.w, c)) : 1.0;
        const double rs = a.rstd[c];
        double v = (ld<D>(a.dy, i) - a.sums[2 * c] * inv -
                    (ld<D>(a.x, i) - a.mean[c]) * rs * rs * (a.sums[2 * c + 1] * inv)) * rs * wc;
        typename D::raw *dx = static_cast<typename D::raw *>(a.dx);
        if (a.accumulate) v += (double)D::to(dx[i]);
        dx[i] = D::from((typename D::acc)v);
    }
}

template <class D>
__global__ void bn_dparam_k(const BnArgs a)
{
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= a.C) return;
    const double vals[2] = {a.local[2 * c + 1] * a.rstd[c], a.local[2 * c]};
    void *outs[2] = {a.dw, a.db};
    for (int k = 0; k < 2; k++) {
        if (!outs[k]) continue;
        if (a.wf32) { float *p = static_cast<float *>(outs[k]); p[c] = (float)((a.accumulate ? (double)p[c] : 0.0) + vals[k]); }
        else { typename D::raw *p = static_cast<typename D::raw *>(outs[k]);
               p[c] = D::from((typename D::acc)((a.accumulate ? (double)D::to(p[c]) : 0.0) + vals[k])); }
    }
}

__global__ void bn_combine_k(double *mean, double *rstd, void *rm, void *rv, const double *parts,
                             const ShardSizes sz, int64_t P, int64_t C, double eps, double f, int rdt)
{
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double n = 0, sm = 0, m2 = 0;
    for (int64_t p = 0; p < P; p++) { n += (double)sz.n[p]; if (sz.n[p]) sm += (double)sz.n[p] * parts[(p * C + c) * 2]; }
    const double m = sm / n;
    for (int64_t p = 0; p < P; p++) {
        if (!sz.n[p]) continue;
        const double d = parts[(p * C + c) * 2] - m;
        m2 += parts[(p * C + c) * 2 + 1] + (double)sz.n[p] * d * d;
    }
    if (mean) mean[c] = m;
    if (rstd) rstd[c] = 1.0 / sqrt(m2 / n + eps);
    const double vals[2] = {m, m2 / (n - 1)};
    void *run[2] = {rm, rv};
    for (int k = 0; k < 2; k++) {
        if (!run[k]) continue;
        switch (rdt) {
        case PN_FLOAT32: { float *p = static_cast<float *>(run[k]); p[c] = (float)((1 - f) * p[c] + f * vals[k]); break; }
        case PN_FLOAT64: { double *p = static_cast<double *>(run[k]); p[c] = (1 - f) * p[c] + f * vals[k]; break; }
        case PN_FLOAT16: { unsigned short *p = static_cast<unsigned short *>(run[k]);
                           p[c] = F16::from((float)((1 - f) * F16::to(p[c]) + f * vals[k])); break; }
        default: { unsigned short *p = static_cast<unsigned short *>(run[k]);
                   p[c] = BF16::from((float)((1 - f) * BF16::to(p[c]) + f * vals[k])); break; }
        }
    }
}

/* ---- host side ----------------------------------------------------------------------- */

template <template <class> class K, class Args>
void launch_typed(pn_dtype dt, dim3 grid, dim3 block, const Args &a, cudaStream_t s)
{
    switch (dt) {
    case PN_FLOAT32: K<F32>::run(grid, block, a, s); break;
    case PN_FLOAT16: K<F16>::run(grid, block, a, s); break;
    case PN_BFLOAT16: K<BF16>::run(grid, block, a, s); break;
    default: K<F64>::run(grid, block, a, s); break;
    }
}

#define PN_SHARD_LAUNCHER(name, kernel, Args)                                              \
    template <class D> struct name {                                                        \
        static void run(dim3 g, dim3 b, const Args &a, cudaStream_t s) { kernel<D><<<g, b, 0, s>>>(a); } \
    };
PN_SHARD_LAUNCHER(L_stats, shard_stats_k, ShardArgs)
PN_SHARD_LAUNCHER(L_apply, shard_apply_k, ShardArgs)
PN_SHARD_LAUNCHER(L_bsums, shard_bsums_k, ShardArgs)
PN_SHARD_LAUNCHER(L_dx, shard_dx_k, ShardArgs)
PN_SHARD_LAUNCHER(L_dparam, shard_dparam_k, ShardArgs)
PN_SHARD_LAUNCHER(L_bn_stats, bn_stats_k, BnArgs)
PN_SHARD_LAUNCHER(L_bn_bsums, bn_bsums_k, BnArgs)
PN_SHARD_LAUNCHER(L_bn_apply, bn_apply_k, BnArgs)
PN_SHARD_LAUNCHER(L_bn_dx, bn_dx_k, BnArgs)
PN_SHARD_LAUNCHER(L_bn_dparam, bn_dparam_k, BnArgs)

inline void resolve(pn_rows r, int64_t T, int64_t C, int64_t *sb, int64_t *st)
{
    if (r.b == 0 && r.t == 0) { *sb = T * C; *st = C; }
    else { *sb = r.b; *st = r.t; }
}

/* checks shared by the token calls; fills sizes and strides */
inline pn_status token_prep(ShardArgs *a, int64_t B, int64_t T, int64_t C, pn_dtype dt, pn_dtype wdt,
                            const pn_strides *s)
{
    pn_status st;
    if ((st = check_dtypes(dt, wdt))) return st;
    if ((st = check_sizes(B, T, C, dtype_size(dt), &a->rows))) return st;
    pn_strides z;
    memset(&z, 0, sizeof z);
    if (!s) s = &z;
    a->T = T;
    a->C = C;
    a->wf32 = wdt == PN_FLOAT32 && dt != PN_FLOAT32;
    resolve(s->inp, T, C, &a->xsb, &a->xst);
    resolve(s->out, T, C, &a->ysb, &a->yst);
    resolve(s->dout, T, C, &a->dysb, &a->dyst);
    resolve(s->dinp, T, C, &a->dxsb, &a->dxst);
    return PN_OK;
}

inline unsigned row_grid(int64_t rows) { return grid_for(rows < 65535 ? rows : 65535); }

pn_status token_stats(int ln, double *part, const void *inp, int64_t B, int64_t T, int64_t C, pn_dtype dt,
                      const pn_strides *s, cudaStream_t stream)
{
    ShardArgs a = {};
    if (!part || !inp) return PN_ERR_NULL;
    pn_status st = token_prep(&a, B, T, C, dt, dt, s);
    if (st) return st;
    a.x = inp; a.part = part; a.ln = ln != 0;
    launch_typed<L_stats>(dt, row_grid(a.rows), kShardThreads, a, stream);
    return launch_status();
}

pn_status token_combine(int ln, double *mean, double *rstd, const double *parts, const int64_t *widths,
                        int64_t P, int64_t rows, double eps, cudaStream_t stream)
{
    if (!parts || !widths || (!ln && !rstd)) return PN_ERR_NULL;
    if (P <= 0 || P > kMaxShards || rows <= 0) return PN_ERR_SIZE;
    ShardSizes sz = {};
    int64_t total = 0;
    for (int64_t p = 0; p < P; p++) {
        if (widths[p] <= 0 || add_ovf(total, widths[p], &total)) return PN_ERR_SIZE;
        sz.n[p] = widths[p];
    }
    if (check_eps(eps)) return PN_ERR_EPS;
    ln_combine_k<<<(unsigned)ceil_div(rows, 256), 256, 0, stream>>>(mean, rstd, parts, sz, P, rows, eps, ln);
    return launch_status();
}

} /* namespace */
} /* namespace pn */

using namespace pn;

extern "C" {

PN_CUDA_API pn_status pn_cuda_layernorm_shard_stats(double *part, const void *inp, int64_t B, int64_t T, int64_t C,
                                                    pn_dtype dtype, const pn_strides *strides, cudaStream_t stream)
{
    return token_stats(1, part, inp, B, T, C, dtype, strides, stream);
}

PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_stats(double *part, const void *inp, int64_t B, int64_t T, int64_t C,
                                                  pn_dtype dtype, const pn_strides *strides, cudaStream_t stream)
{
    return token_stats(0, part, inp, B, T, C, dtype, strides, stream);
}

PN_CUDA_API pn_status pn_cuda_layernorm_shard_combine(double *mean, double *rstd, const double *parts,
                                                      const int64_t *widths, int64_t nshards, int64_t rows,
                                                      double eps, cudaStream_t stream)
{
    return token_combine(1, mean, rstd, parts, widths, nshards, rows, eps, stream);
}

PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_combine(double *rstd, const double *parts, const int64_t *widths,
                                                    int64_t nshards, int64_t rows, double eps, cudaStream_t stream)
{
    return token_combine(0, nullptr, rstd, parts, widths, nshards, rows, eps, stream);
}

static pn_status token_apply(int ln, void *out, const void *inp, const void *weight, const void *bias,
                             const double *mean, const double *rstd, int64_t B, int64_t T, int64_t C,
                             pn_dtype dt, pn_dtype wdt, const pn_strides *s, cudaStream_t stream)
{
    ShardArgs a = {};
    if (!out || !inp || !rstd || (ln && !mean)) return PN_ERR_NULL;
    pn_status st = token_prep(&a, B, T, C, dt, wdt, s);
    if (st) return st;
    a.y = out; a.x = inp; a.w = weight; a.b = bias; a.mean = mean; a.rstd = rstd; a.ln = ln != 0;
    launch_typed<L_apply>(dt, row_grid(a.rows), kShardThreads, a, stream);
    return launch_status();
}

PN_CUDA_API pn_status pn_cuda_layernorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
                                                    const double *mean, const double *rstd,
                                                    int64_t B, int64_t T, int64_t C, pn_dtype dtype, pn_dtype wdtype,
                                                    const pn_strides *strides, cudaStream_t stream)
{
    return token_apply(1, out, inp, weight, bias, mean, rstd, B, T, C, dtype, wdtype, strides, stream);
}

PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_apply(void *out, const void *inp, const void *weight, const double *rstd,
                                                  int64_t B, int64_t T, int64_t C, pn_dtype dtype, pn_dtype wdtype,
                                                  const pn_strides *strides, cudaStream_t stream)
{
    return token_apply(0, out, inp, weight, nullptr, nullptr, rstd, B, T, C, dtype, wdtype, strides, stream);
}

static pn_status token_bsums(int ln, double *sums, const void *dout, const void *inp, const void *weight,
                             const double *mean, const double *rstd, int64_t B, int64_t T, int64_t C,
                             pn_dtype dt, pn_dtype wdt, const pn_strides *s, cudaStream_t stream)
{
    ShardArgs a = {};
    if (!sums || !dout || !inp || !rstd || (ln && !mean)) return PN_ERR_NULL;
    pn_status st = token_prep(&a, B, T, C, dt, wdt, s);
    if (st) return st;
    a.part = sums; a.dy = dout; a.x = inp; a.w = weight; a.mean = mean; a.rstd = rstd; a.ln = ln != 0;
    launch_typed<L_bsums>(dt, row_grid(a.rows), kShardThreads, a, stream);
    return launch_status();
}

PN_CUDA_API pn_status pn_cuda_layernorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
                                                            const void *weight, const double *mean,
                                                            const double *rstd, int64_t B, int64_t T, int64_t C,
                                                            pn_dtype dtype, pn_dtype wdtype,
                                                            const pn_strides *strides, cudaStream_t stream)
{
    return token_bsums(1, sums, dout, inp, weight, mean, rstd, B, T, C, dtype, wdtype, strides, stream);
}

PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
                                                          const void *weight, const double *rstd,
                                                          int64_t B, int64_t T, int64_t C, pn_dtype dtype,
                                                          pn_dtype wdtype, const pn_strides *strides,
                                                          cudaStream_t stream)
{
    return token_bsums(0, sums, dout, inp, weight, nullptr, rstd, B, T, C, dtype, wdtype, strides, stream);
}

static pn_status token_backward(int ln, void *dinp, void *dweight, void *dbias, const void *dout, const void *inp,
                                const void *weight, const double *mean, const double *rstd, const double *sums,
                                int64_t B, int64_t T, int64_t C, int64_t C_total, int flags, pn_dtype dt,
                                pn_dtype wdt, const pn_strides *s, cudaStream_t stream)
{
    ShardArgs a = {};
    if (flags & ~PN_ACCUMULATE) return PN_ERR_ARG;
    if (!dout || !inp || !rstd || !sums || (ln && !mean)) return PN_ERR_NULL;
    pn_status st = token_prep(&a, B, T, C, dt, wdt, s);
    if (st) return st;
    if (C_total < C) return PN_ERR_SIZE;
    a.dx = dinp; a.dw = dweight; a.db = dbias; a.dy = dout; a.x = inp; a.w = weight;
    a.mean = mean; a.rstd = rstd; a.sums = sums; a.C_total = C_total; a.ln = ln != 0;
    a.accumulate = (flags & PN_ACCUMULATE) != 0;
    a.wf32 = wdt == PN_FLOAT32;   /* the gradients' dtype: float32 or the data's */
    if (dweight || dbias)   /* first: dx may be written over dy or x */
        launch_typed<L_dparam>(dt, (unsigned)ceil_div(C, 256), 256, a, stream);
    a.wf32 = wdt == PN_FLOAT32 && dt != PN_FLOAT32;
    if (dinp) launch_typed<L_dx>(dt, row_grid(a.rows), kShardThreads, a, stream);
    return launch_status();
}

PN_CUDA_API pn_status pn_cuda_layernorm_shard_backward(void *dinp, void *dweight, void *dbias, void *scratch,
                                                       size_t scratch_bytes, const void *dout, const void *inp,
                                                       const void *weight, const double *mean, const double *rstd,
                                                       const double *sums, int64_t B, int64_t T, int64_t C,
                                                       int64_t C_total, int flags, pn_dtype dtype, pn_dtype wdtype,
                                                       const pn_strides *strides, cudaStream_t stream)
{
    (void)scratch; (void)scratch_bytes;
    return token_backward(1, dinp, dweight, dbias, dout, inp, weight, mean, rstd, sums, B, T, C, C_total, flags,
                          dtype, wdtype, strides, stream);
}

PN_CUDA_API pn_status pn_cuda_rmsnorm_shard_backward(void *dinp, void *dweight, void *scratch, size_t scratch_bytes,
                                                     const void *dout, const void *inp, const void *weight,
                                                     const double *rstd, const double *sums,
                                                     int64_t B, int64_t T, int64_t C, int64_t C_total, int flags,
                                                     pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                                     cudaStream_t stream)
{
    (void)scratch; (void)scratch_bytes;
    return token_backward(0, dinp, dweight, nullptr, dout, inp, weight, nullptr, rstd, sums, B, T, C, C_total, flags,
                          dtype, wdtype, strides, stream);
}

/* ---- BatchNorm ---- */

static pn_status bn_prep(BnArgs *a, int64_t N, int64_t C, int64_t S, pn_layout layout, pn_dtype dt, pn_dtype wdt)
{
    int64_t rows;
    pn_status st;
    if ((st = check_dtypes(dt, wdt))) return st;
    if (layout != PN_NCHW && layout != PN_NHWC) return PN_ERR_ARG;
    if ((st = check_sizes(N, C, S, dtype_size(dt), &rows))) return st;
    a->N = N; a->C = C; a->S = S;
    a->nchw = layout == PN_NCHW && S > 1;
    a->wf32 = wdt == PN_FLOAT32 && dt != PN_FLOAT32;
    return PN_OK;
}

PN_CUDA_API pn_status pn_cuda_batchnorm_shard_stats(double *part, const void *inp, int64_t N, int64_t C, int64_t S,
                                                    pn_layout layout, pn_dtype dtype, cudaStream_t stream)
{
    BnArgs a = {};
    if (!part || !inp) return PN_ERR_NULL;
    pn_status st = bn_prep(&a, N, C, S, layout, dtype, dtype);
    if (st) return st;
    a.part = part; a.x = inp;
    launch_typed<L_bn_stats>(dtype, row_grid(C), kShardThreads, a, stream);
    return launch_status();
}

PN_CUDA_API pn_status pn_cuda_batchnorm_shard_combine(double *mean, double *rstd, void *running_mean,
                                                      void *running_var, const double *parts, const int64_t *counts,
                                                      int64_t nshards, int64_t C, double eps, double momentum,
                                                      int64_t num_batches_tracked, int flags, pn_dtype rdtype,
                                                      cudaStream_t stream)
{
    if (!parts || !counts) return PN_ERR_NULL;
    if (flags & ~PN_BN_CUMULATIVE) return PN_ERR_ARG;
    if (nshards <= 0 || nshards > kMaxShards || C <= 0) return PN_ERR_SIZE;
    ShardSizes sz = {};
    int64_t n = 0;
    for (int64_t p = 0; p < nshards; p++) {
        if (counts[p] < 0 || add_ovf(n, counts[p], &n)) return PN_ERR_SIZE;
        sz.n[p] = counts[p];
    }
    if (n <= 1) return PN_ERR_SIZE;
    if (check_eps(eps)) return PN_ERR_EPS;
    const bool update = running_mean || running_var;
    if (update && !valid_dtype(rdtype)) return PN_ERR_DTYPE;
    double f = momentum;
    if (update && (flags & PN_BN_CUMULATIVE)) {
        if (num_batches_tracked < 1) return PN_ERR_ARG;
        f = 1.0 / (double)num_batches_tracked;
    } else if (update && !(momentum == momentum && fabs(momentum) <= 1e300)) {
        return PN_ERR_ARG;
    }
    bn_combine_k<<<(unsigned)ceil_div(C, 256), 256, 0, stream>>>(mean, rstd, running_mean, running_var, parts, sz,
                                                                 nshards, C, eps, f, (int)rdtype);
    return launch_status();
}

PN_CUDA_API pn_status pn_cuda_batchnorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
                                                    const double *mean, const double *rstd,
                                                    int64_t N, int64_t C, int64_t S, pn_layout layout,
                                                    pn_dtype dtype, pn_dtype wdtype, cudaStream_t stream)
{
    BnArgs a = {};
    if (!out || !inp || !mean || !rstd) return PN_ERR_NULL;
    pn_status st = bn_prep(&a, N, C, S, layout, dtype, wdtype);
    if (st) return st;
    a.y = out; a.x = inp; a.w = weight; a.b = bias; a.mean = mean; a.rstd = rstd;
    launch_typed<L_bn_apply>(dtype, elem_grid(N * C * S), 256, a, stream);
    return launch_status();
}

PN_CUDA_API pn_status pn_cuda_batchnorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
                                                            const double *mean, int64_t N, int64_t C, int64_t S,
                                                            pn_layout layout, pn_dtype dtype, cudaStream_t stream)
{
    BnArgs a = {};
    if (!sums || !dout || !inp || !mean) return PN_ERR_NULL;
    pn_status st = bn_prep(&a, N, C, S, layout, dtype, dtype);
    if (st) return st;
    a.part = sums; a.dy = dout; a.x = inp; a.mean = mean;
    launch_typed<L_bn_bsums>(dtype, row_grid(C), kShardThreads, a, stream);
    return launch_status();
}

PN_CUDA_API pn_status pn_cuda_batchnorm_shard_backward(void *dinp, void *dweight, void *dbias, const void *dout,
                                                       const void *inp, const void *weight, const double *mean,
                                                       const double *rstd, const double *local_sums,
                                                       const double *sums, int64_t count, int64_t N, int64_t C,
                                                       int64_t S, int flags, pn_layout layout, pn_dtype dtype,
                                                       pn_dtype wdtype, cudaStream_t stream)
{
    BnArgs a = {};
    if (flags & ~PN_ACCUMULATE) return PN_ERR_ARG;
    if (!dout || !inp || !mean || !rstd || (dinp && !sums) || ((dweight || dbias) && !local_sums)) return PN_ERR_NULL;
    pn_status st = bn_prep(&a, N, C, S, layout, dtype, wdtype);
    if (st) return st;
    if (dinp && count < N * S) return PN_ERR_SIZE;
    a.dx = dinp; a.dw = dweight; a.db = dbias; a.dy = dout; a.x = inp; a.w = weight;
    a.mean = mean; a.rstd = rstd; a.local = local_sums; a.sums = sums; a.count = count;
    a.accumulate = (flags & PN_ACCUMULATE) != 0;
    if (dweight || dbias) {
        BnArgs p = a;
        p.wf32 = wdtype == PN_FLOAT32;
        launch_typed<L_bn_dparam>(dtype, (unsigned)ceil_div(C, 256), 256, p, stream);
    }
    if (dinp) launch_typed<L_bn_dx>(dtype, elem_grid(N * C * S), 256, a, stream);
    return launch_status();
}

} /* extern "C" */
