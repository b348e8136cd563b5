/* rmsnorm.cu - RMSNorm on CUDA: forward, fused residual-add forward,
 * backward. The CUDA sibling of c_src/rmsnorm.c.
 *
 * rstd = 1/sqrt(sum(x^2)/C + eps), y = x * rstd * w, rounded once.
 * float16/bfloat16/float32 compute in float32, float64 in double. The sum of
 * squares is taken as the C library takes it: each thread adds its squares in
 * the compute type in short chains, the chains' sums are added in double
 * (common.cuh, "Row statistics"), and rstd comes from the double sum. A row
 * whose float sum of squares leaves [1e-20, 1e36] (a square may have
 * overflowed or lost its bits; NaN/Inf) is redone in double.
 * Kernel choice by C, partitions and the fixed-order reduction of dweight are
 * those of layernorm.cu (see there and common.cuh).
 */
#include <type_traits>

#include "common.cuh"
#include "quant.cuh"

namespace pn {
namespace {

/* ------------------------------------------------------------------------ */
/* Forward, row in registers                                                 */

template <class D, int E, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kFwdWarpsPerBlock : 1024, WARP ? (E <= 16 ? 8 : 5) : 1)
rms_fwd_reg(const TokArgs a)
{
    typedef typename D::raw R;
    constexpr int V = Vw<D>::V;
    constexpr int NV = E / V;
    __shared__ double redd[32];
    const int C = (int)a.C;
    const int tpr = WARP ? 32 : (int)blockDim.x;
    const int tid = WARP ? (int)(threadIdx.x & 31) : (int)threadIdx.x;
    const int64_t rpb = WARP ? (int64_t)(blockDim.x >> 5) : 1;
    const int64_t step = (int64_t)gridDim.x * rpb;
    const bool vec = a.vec != 0, llama = a.llama != 0;
    const double dC = (double)C;

    for (int64_t row = (int64_t)blockIdx.x * rpb + (WARP ? (threadIdx.x >> 5) : 0); row < a.rows; row += step) {
        const R *xr = static_cast<const R *>(a.x) + row_off(row, a.T, a.H, a.xsb, a.xst, a.xsh);
        R *yr = static_cast<R *>(a.y) + row_off(row, a.T, a.H, a.ysb, a.yst, a.ysh);
        Frag<D, E> f;   /* x, or h = x + residual; zero beyond C */
        f.load(xr, C, tid, tpr, vec);
        if (a.res != nullptr) {
            const R *rr = static_cast<const R *>(a.res) + row_off(row, a.T, a.H, a.rsb, a.rst, a.rsh);
            R *hr = static_cast<R *>(a.h) + row_off(row, a.T, a.H, a.hsb, a.hst, a.hsh);
            Frag<D, E> r;
            r.load(rr, C, tid, tpr, vec);
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                R hv[V];
#pragma unroll
                for (int i = 0; i < V; ++i) hv[i] = D::from(f.get(j * V + i) + r.get(j * V + i));
                chunk_pack<D>(f.w[j], hv);
            }
            f.store(hr, C, tid, tpr, vec);
        }

        /* each thread's squares in a float chain (k in order; the zeros
         * beyond C add nothing), the chains in double */
        float q = 0.0f;
#pragma unroll
        for (int k = 0; k < E; ++k) q = fmadd(f.get(k), f.get(k), q);
        const double qd = WARP ? warp_sum((double)q) : block_sum((double)q, redd);

        float rstd_o;
        if (float_sumsq_ok(qd)) {
            const float rs = (float)inv_sqrt(qd / dC + a.eps);
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                const int c0 = (j * tpr + tid) * V;
                float wv[V], o[V];
                load_weight_chunk<D>(wv, a, c0, C, vec);
#pragma unroll
                for (int i = 0; i < V; ++i) o[i] = xhat_as<D>(f.get(j * V + i) * rs, llama) * wv[i];
                put_y_chunk<D>(a, row, yr, o, c0, C, vec);
            }
            rstd_o = rs;
        } else {
            /* a float square may have overflowed or lost its bits (or
             * Inf/NaN): redo the row in double, from the registers */
            double q2 = 0.0;
#pragma unroll
            for (int k = 0; k < E; ++k) q2 = fmadd((double)f.get(k), (double)f.get(k), q2);
            q2 = WARP ? warp_sum(q2) : block_sum(q2, redd);
            const double rsd = inv_sqrt(q2 / dC + a.eps);
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                const int c0 = (j * tpr + tid) * V;
                float wv[V], o[V];
                load_weight_chunk<D>(wv, a, c0, C, vec);
#pragma unroll
                for (int i = 0; i < V; ++i) o[i] = (float)(xhat_as<D>((double)f.get(j * V + i) * rsd, llama) * (double)wv[i]);
                put_y_chunk<D>(a, row, yr, o, c0, C, vec);
            }
            rstd_o = (float)rsd;
        }
        if (tid == 0 && a.rstd != nullptr) static_cast<float *>(a.rstd)[row] = rstd_o;
    }
}

/* ------------------------------------------------------------------------ */
/* Forward, streaming the row (C > 16384, and float64)                       */

template <class D>
__global__ void __launch_bounds__(kStreamThreads)
rms_fwd_stream(const TokArgs a)
{
    typedef typename D::raw R;
    typedef typename D::acc A;
    __shared__ double redd[32];
    const int64_t C = a.C;
    const double dC = (double)C;
    const int nt = blockDim.x, tid = threadIdx.x;
    const bool llama = a.llama != 0;
    for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
        const R *xr = static_cast<const R *>(a.x) + row_off(row, a.T, a.H, a.xsb, a.xst, a.xsh);
        R *yr = static_cast<R *>(a.y) + row_off(row, a.T, a.H, a.ysb, a.yst, a.ysh);
        const R *rr = nullptr;
        R *hr = nullptr;
        if (a.res != nullptr) {
            rr = static_cast<const R *>(a.res) + row_off(row, a.T, a.H, a.rsb, a.rst, a.rsh);
            hr = static_cast<R *>(a.h) + row_off(row, a.T, a.H, a.hsb, a.hst, a.hsh);
        }
        /* the thread's squares, c = tid, tid + nt, ..., in chains of
         * kFoldEvery, in double */
        FoldSum<A> q;
        for (int64_t c = tid; c < C; c += nt) {
            A v;
            if (rr != nullptr) {
                const R hv = D::from(D::to(xr[c]) + D::to(rr[c]));
                hr[c] = hv;
                v = D::to(hv);
            } else {
                v = D::to(xr[c]);
            }
            q.add_sq(v);
        }
        const double qd = block_sum(q.sum(), redd);   /* its barriers also publish h to the block */
        const R *src = (rr != nullptr) ? hr : xr;   /* plain loads: h was written here */
        A rstd_o;
        bool fast = true;
        if constexpr (sizeof(A) == 4) fast = float_sumsq_ok(qd);
        if (fast) {
            const A rs = (A)inv_sqrt(qd / dC + a.eps);
            for (int64_t c = tid; c < C; c += nt)
                put_y<D, A>(a, row, yr, c, xhat_as<D>(D::to(src[c]) * rs, llama) * (weight_at<D, A>(a, c)));
            rstd_o = rs;
        } else {
            double q2 = 0.0;
            for (int64_t c = tid; c < C; c += nt) {
                const double v = (double)D::to(src[c]);
                q2 = fmadd(v, v, q2);
            }
            q2 = block_sum(q2, redd);
            const double rsd = inv_sqrt(q2 / dC + a.eps);
            for (int64_t c = tid; c < C; c += nt)
                put_y<D, A>(a, row, yr, c, (A)(xhat_as<D>((double)D::to(src[c]) * rsd, llama) * (double)(weight_at<D, A>(a, c))));
            rstd_o = (A)rsd;
        }
        if (tid == 0 && a.rstd != nullptr) static_cast<A *>(a.rstd)[row] = rstd_o;
    }
}

/* ------------------------------------------------------------------------ */
/* Backward, rows in registers: one block per partition of rows              */

template <class D, int E, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kBwdWarpsPerBlock : 1024,
                  WARP ? ((sizeof(typename D::raw) == 4 && E == 32) ? 1 : 2) : 1)
rms_bwd_reg(const TokArgs a)
{
    typedef typename D::raw R;
    constexpr int V = Vw<D>::V;
    constexpr int NV = E / V;
    __shared__ float red[32];
    __shared__ float sdw[WARP ? kWarpMaxC : 1];
    const int C = (int)a.C;
    const int tpr = WARP ? 32 : (int)blockDim.x;
    const int tid = WARP ? (int)(threadIdx.x & 31) : (int)threadIdx.x;
    const int nw = WARP ? (int)(blockDim.x >> 5) : 1;
    const int wid = WARP ? (int)(threadIdx.x >> 5) : 0;
    const bool vec = a.vec != 0, acc = a.accumulate != 0;
    const float fC = (float)C;
    const float *rstdp = static_cast<const float *>(a.rstd);
    const int64_t r0 = (int64_t)blockIdx.x * a.chunk;
    const int64_t r1 = (r0 + a.chunk < a.rows) ? r0 + a.chunk : a.rows;

    float adw[E];
#pragma unroll
    for (int k = 0; k < E; ++k) adw[k] = 0.0f;

    for (int64_t row = r0 + wid; row < r1; row += nw) {
        const R *xr = static_cast<const R *>(a.x) + row_off(row, a.T, a.H, a.xsb, a.xst, a.xsh);
        const R *gr = static_cast<const R *>(a.dy) + row_off(row, a.T, a.H, a.dysb, a.dyst, a.dysh);
        Frag<D, E> xv, gv;
        xv.load(xr, C, tid, tpr, vec);
        gv.load(gr, C, tid, tpr, vec);
        const float rs = rstdp[row];
        float s2 = 0.0f;
#pragma unroll
        for (int j = 0; j < NV; ++j) {
            const int c0 = (j * tpr + tid) * V;
            float wv[V];
            load_weight_chunk<D>(wv, a, c0, C, vec);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const int k = j * V + i;
                if (c0 + i < C) {
                    const float xh = xv.get(k) * rs;
                    const float dy = gv.get(k);
                    s2 = fmadd(dy * wv[i], xh, s2);
                    adw[k] = fmadd(dy, xh, adw[k]);
                }
            }
        }
        if (a.dx != nullptr) {
            s2 = WARP ? warp_sum(s2) : block_sum(s2, red);
            const float c2 = s2 / fC;
            R *dxr = static_cast<R *>(a.dx) + row_off(row, a.T, a.H, a.dxsb, a.dxst, a.dxsh);
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                const int c0 = (j * tpr + tid) * V;
                float wv[V], o[V];
                uint32_t old[4];
                load_weight_chunk<D>(wv, a, c0, C, vec);
                if (acc) load_chunk<D>(old, dxr, c0, C, vec);
#pragma unroll
                for (int i = 0; i < V; ++i) {
                    const int k = j * V + i;
                    const float xh = xv.get(k) * rs;
                    const float g = gv.get(k) * wv[i];
                    float d = rs * fmadd(-xh, c2, g);
                    if (acc) d = D::to(chunk_raw<D>(old, i)) + d;
                    o[i] = d;
                }
                store_chunk_f<D>(dxr, o, c0, C, vec);
            }
        }
    }

    if (a.part == nullptr) return;   /* uniform over the grid */
    float *pdw = static_cast<float *>(a.part) + (int64_t)blockIdx.x * a.C;
    if (WARP) {
        for (int w = 0; w < nw; ++w) {
            if (wid == w) {
#pragma unroll
                for (int k = 0; k < E; ++k) {
                    const int c = col_of<D>(k, tid, 32);
                    if (c < C) sdw[c] = (w == 0) ? adw[k] : sdw[c] + adw[k];
                }
            }
            __syncthreads();
        }
        for (int c = threadIdx.x; c < C; c += blockDim.x) pdw[c] = sdw[c];
    } else {
#pragma unroll
        for (int k = 0; k < E; ++k) {
            const int c = col_of<D>(k, tid, tpr);
            if (c < C) pdw[c] = adw[k];
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Backward dx, streaming the row (C > 16384, and float64)                   */

template <class D>
__global__ void __launch_bounds__(kStreamThreads)
rms_bwd_stream(const TokArgs a)
{
    typedef typename D::raw R;
    typedef typename D::acc A;
    __shared__ A red[32];
    const int64_t C = a.C;
    const int nt = blockDim.x, tid = threadIdx.x;
    const bool acc = a.accumulate != 0;
    const A *rstdp = static_cast<const A *>(a.rstd);
    for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
        const R *xr = static_cast<const R *>(a.x) + row_off(row, a.T, a.H, a.xsb, a.xst, a.xsh);
        const R *gr = static_cast<const R *>(a.dy) + row_off(row, a.T, a.H, a.dysb, a.dyst, a.dysh);
        R *dxr = static_cast<R *>(a.dx) + row_off(row, a.T, a.H, a.dxsb, a.dxst, a.dxsh);
        const A rs = rstdp[row];
        A s2 = 0;
        for (int64_t c = tid; c < C; c += nt) {
            const A xh = D::to(xr[c]) * rs;
            s2 = fmadd(D::to(gr[c]) * (weight_at<D, A>(a, c)), xh, s2);
        }
        s2 = block_sum(s2, red);
        const A c2 = s2 / (A)C;
        for (int64_t c = tid; c < C; c += nt) {
            const A xh = D::to(xr[c]) * rs;
            const A g = D::to(gr[c]) * (weight_at<D, A>(a, c));
            A d = rs * fmadd(-xh, c2, g);
            if (acc) d = D::to(dxr[c]) + d;
            dxr[c] = D::from(d);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Dispatch                                                                  */

/* The kernel and block size come from launch.h (fwd_plan, bwd_plan: a
 * function of C and the dtype's size alone, checked on the host by
 * cuda_src/tests/test_launch.cpp); here each plan's E picks the template. */
template <class D>
void rms_fwd_dispatch(const TokArgs &a, cudaStream_t s)
{
    const TokPlan p = fwd_plan(a.C, (int)sizeof(typename D::raw));
    const int64_t rows = a.rows;
    if constexpr (std::is_same<D, F64>::value) {
        rms_fwd_stream<D><<<grid_for(rows), p.threads, 0, s>>>(a);
    } else if (p.kind == kTokWarp) {
        const unsigned g = grid_for(ceil_div(rows, p.rows_per_block));
        switch (p.E) {
        case 8: rms_fwd_reg<D, 8, true><<<g, p.threads, 0, s>>>(a); break;
        case 16: rms_fwd_reg<D, 16, true><<<g, p.threads, 0, s>>>(a); break;
        case 24: rms_fwd_reg<D, 24, true><<<g, p.threads, 0, s>>>(a); break;
        default: rms_fwd_reg<D, 32, true><<<g, p.threads, 0, s>>>(a); break;
        }
    } else if (p.kind == kTokBlock) {
        rms_fwd_reg<D, kFwdBlockE, false><<<grid_for(rows), p.threads, 0, s>>>(a);
    } else {
        rms_fwd_stream<D><<<grid_for(rows), p.threads, 0, s>>>(a);
    }
}

template <class D>
void rms_bwd_dispatch(const TokArgs &a, cudaStream_t s)
{
    const TokPlan p = bwd_plan(a.C, (int)sizeof(typename D::raw));
    const int64_t C = a.C, rows = a.rows;
    const unsigned P = (unsigned)a.P;
    if constexpr (std::is_same<D, F64>::value) {
        if (a.dx != nullptr) rms_bwd_stream<D><<<grid_for(rows), p.threads, 0, s>>>(a);
        if (a.part != nullptr) bwd_cols<D, false><<<dim3((unsigned)ceil_div(C, 256), P), 256, 0, s>>>(a);
    } else if (p.kind == kTokStream) {
        if (a.dx != nullptr) rms_bwd_stream<D><<<grid_for(rows), p.threads, 0, s>>>(a);
        if (a.part != nullptr) bwd_cols<D, false><<<dim3((unsigned)ceil_div(C, 256), P), 256, 0, s>>>(a);
    } else if (p.kind == kTokWarp) {
        switch (p.E) {
        case 8: rms_bwd_reg<D, 8, true><<<P, p.threads, 0, s>>>(a); break;
        case 16: rms_bwd_reg<D, 16, true><<<P, p.threads, 0, s>>>(a); break;
        case 24: rms_bwd_reg<D, 24, true><<<P, p.threads, 0, s>>>(a); break;
        default: rms_bwd_reg<D, 32, true><<<P, p.threads, 0, s>>>(a); break;
        }
    } else {
        rms_bwd_reg<D, kBwdBlockE, false><<<P, p.threads, 0, s>>>(a);
    }
}

pn_status rms_forward(void *out, void *h, void *rstd,
                      const void *inp, const void *residual, const void *weight,
                      int64_t B, int64_t T, int64_t C, double eps,
                      pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                      cudaStream_t stream, bool fused, const pn_norm_options *opts,
                      const pn_quant_params *quant = nullptr, void *q = nullptr, float *scales = nullptr)
{
    pn_status st;
    int64_t rows, T_eff, H_eff;
    bool vec = true, vec_w = true;
    QuantPlan qp = {};
    /* the quantized form (quant != NULL): q and scales instead of out */
    if (quant != nullptr && (st = check_quant(quant, scales, C, &qp)) != PN_OK) return st;
    if ((quant != nullptr ? q : out) == nullptr || inp == nullptr) return PN_ERR_NULL;
    if (fused && (h == nullptr || residual == nullptr)) return PN_ERR_NULL;
    if ((st = check_dtypes(dtype, wdtype)) != PN_OK) return st;
    double woff;
    int llama;
    int64_t H, TH;
    if ((st = check_options(opts, weight, &woff, &llama, &H)) != PN_OK) return st;
    const int es = dtype_size(dtype), wes = dtype_size(wdtype), ss = dtype == PN_FLOAT64 ? 8 : 4;
    if ((st = check_sizes_h(B, T, H, C, es, &TH, &rows)) != PN_OK) return st;
    if ((st = check_eps(eps)) != PN_OK) return st;

    const pn_strides zero = {};
    const pn_strides &sd = strides ? *strides : zero;
    const pn_head_strides hzero = {};
    const pn_head_strides &hd = (opts != nullptr && H > 1) ? opts->head : hzero;
    RowBuf rb[4] = {
        {inp, sd.inp, false, 0, 0, hd.inp, 0},
        {fused ? residual : nullptr, sd.residual, false, 0, 0, hd.residual, 0},
        {out, sd.out, true, 0, 0, hd.out, 0},
        {fused ? h : nullptr, sd.h, true, 0, 0, hd.h, 0},
    };
    if (quant != nullptr) rb[2].p = nullptr;   /* no y: q and scales are dense */
    Span sp[4];
    if ((st = dense_span(weight, C, wes, wes, false, &sp[0], &vec_w)) != PN_OK) return st;
    if ((st = dense_span(rstd, rows, ss, ss, true, &sp[1], nullptr)) != PN_OK) return st;
    if ((st = dense_span(quant ? q : nullptr, rows * C, 1, 1, true, &sp[2], nullptr)) != PN_OK) return st;
    if ((st = dense_span(quant && qp.scale == 0.0f ? scales : nullptr, rows * (C / (qp.G ? qp.G : C)), 4, 4, true,
                         &sp[3], nullptr)) != PN_OK) return st;
    /* in place: y and h each over x or the residual */
    static const int twin[4] = {0, 0, 3, 3};
    if ((st = prepare(B, T, C, es, rb, 4, sp, 4, &T_eff, &vec, twin, H, &H_eff)) != PN_OK) return st;
    float *yf = nullptr;
    if (quant != nullptr && (st = quant_alloc(rows, C, stream, &yf)) != PN_OK) return st;

    TokArgs a = {};
    a.x = inp; a.xsb = rb[0].sb; a.xst = rb[0].st; a.xsh = rb[0].sh;
    a.res = rb[1].p; a.rsb = rb[1].sb; a.rst = rb[1].st; a.rsh = rb[1].sh;
    a.y = out; a.ysb = rb[2].sb; a.yst = rb[2].st; a.ysh = rb[2].sh;
    a.h = const_cast<void *>(rb[3].p); a.hsb = rb[3].sb; a.hst = rb[3].st; a.hsh = rb[3].sh;
    a.w = weight; a.rstd = rstd;
    a.rows = rows; a.T = T_eff; a.H = H_eff; a.C = C; a.eps = eps;
    a.vec = vec && vec_w; a.w_f32 = wdtype == PN_FLOAT32;
    a.woff = woff; a.llama = llama;
    a.yf = yf;
    if (yf != nullptr) a.y = nullptr;

    switch (dtype) {
    case PN_FLOAT32: rms_fwd_dispatch<F32>(a, stream); break;
    case PN_FLOAT16: rms_fwd_dispatch<F16>(a, stream); break;
    case PN_BFLOAT16: rms_fwd_dispatch<BF16>(a, stream); break;
    case PN_FLOAT64: rms_fwd_dispatch<F64>(a, stream); break;
    }
    if (yf != nullptr) quant_launch(qp, yf, q, scales, rows, C, stream);
    return launch_status();
}

} /* namespace */
} /* namespace pn */

using namespace pn;

extern "C" {

pn_status pn_cuda_rmsnorm_forward(void *out, void *rstd,
                                  const void *inp, const void *weight,
                                  int64_t B, int64_t T, int64_t C, double eps,
                                  pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                  cudaStream_t stream)
{
    return rms_forward(out, nullptr, rstd, inp, nullptr, weight, B, T, C, eps, dtype, wdtype, strides, stream, false, nullptr);
}

pn_status pn_cuda_add_rmsnorm_forward(void *out, void *h, void *rstd,
                                      const void *inp, const void *residual, const void *weight,
                                      int64_t B, int64_t T, int64_t C, double eps,
                                      pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                      cudaStream_t stream)
{
    return rms_forward(out, h, rstd, inp, residual, weight, B, T, C, eps, dtype, wdtype, strides, stream, true, nullptr);
}

size_t pn_cuda_rmsnorm_backward_scratch_size(int64_t B, int64_t T, int64_t C, pn_dtype dtype)
{
    return scratch_bytes_for(B, T, C, dtype, 1);
}

pn_status pn_cuda_rmsnorm_backward_ex(void *dinp, void *dweight,
                                      void *scratch, size_t scratch_bytes,
                                      const void *dout, const void *inp, const void *weight,
                                      const void *rstd,
                                      int64_t B, int64_t T, int64_t C, int flags,
                                      pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                      const pn_norm_options *opts, cudaStream_t stream)
{
    pn_status st;
    int64_t rows, T_eff, H_eff;
    bool vec = true, vec_w = true;
    if (dout == nullptr || inp == nullptr || rstd == nullptr) return PN_ERR_NULL;
    if ((st = check_dtypes(dtype, wdtype)) != PN_OK) return st;
    double woff;
    int llama;   /* the backward of llama is that of once */
    int64_t H, TH;
    if ((st = check_options(opts, weight, &woff, &llama, &H)) != PN_OK) return st;
    const int es = dtype_size(dtype), wes = dtype_size(wdtype), ss = dtype == PN_FLOAT64 ? 8 : 4;
    if ((st = check_sizes_h(B, T, H, C, es, &TH, &rows)) != PN_OK) return st;
    if (flags & ~PN_ACCUMULATE) return PN_ERR_ARG;
    const bool want_w = dweight != nullptr;
    const size_t need = want_w ? scratch_bytes_for(B, TH, C, dtype, 1) : 0;
    if (want_w && (scratch == nullptr || scratch_bytes < need || (uintptr_t)scratch % 16 != 0))
        return PN_ERR_SCRATCH;

    const pn_strides zero = {};
    const pn_strides &sd = strides ? *strides : zero;
    const pn_head_strides hzero = {};
    const pn_head_strides &hd = (opts != nullptr && H > 1) ? opts->head : hzero;
    RowBuf rb[3] = {
        {inp, sd.inp, false, 0, 0, hd.inp, 0},
        {dout, sd.dout, false, 0, 0, hd.dout, 0},
        {dinp, sd.dinp, true, 0, 0, hd.dinp, 0},
    };
    Span sp[4];
    if ((st = dense_span(weight, C, wes, wes, false, &sp[0], &vec_w)) != PN_OK) return st;
    if ((st = dense_span(rstd, rows, ss, ss, false, &sp[1], nullptr)) != PN_OK) return st;
    if ((st = dense_span(dweight, C, wes, wes, true, &sp[2], nullptr)) != PN_OK) return st;
    if ((st = dense_span(want_w ? scratch : nullptr, (int64_t)need, 1, 1, true, &sp[3], nullptr)) != PN_OK) return st;
    if ((st = prepare(B, T, C, es, rb, 3, sp, 4, &T_eff, &vec, nullptr, H, &H_eff)) != PN_OK) return st;
    if (dinp == nullptr && !want_w) return PN_OK;

    TokArgs a = {};
    a.x = inp; a.xsb = rb[0].sb; a.xst = rb[0].st; a.xsh = rb[0].sh;
    a.dy = dout; a.dysb = rb[1].sb; a.dyst = rb[1].st; a.dysh = rb[1].sh;
    a.dx = dinp; a.dxsb = rb[2].sb; a.dxst = rb[2].st; a.dxsh = rb[2].sh;
    a.w = weight; a.rstd = const_cast<void *>(rstd);
    a.part = want_w ? scratch : nullptr;
    a.rows = rows; a.T = T_eff; a.H = H_eff; a.C = C;
    partition(rows, C, &a.P, &a.chunk);
    a.vec = vec && vec_w; a.w_f32 = wdtype == PN_FLOAT32;
    a.woff = woff;
    a.accumulate = (flags & PN_ACCUMULATE) != 0;

    switch (dtype) {
    case PN_FLOAT32: rms_bwd_dispatch<F32>(a, stream); break;
    case PN_FLOAT16: rms_bwd_dispatch<F16>(a, stream); break;
    case PN_BFLOAT16: rms_bwd_dispatch<BF16>(a, stream); break;
    case PN_FLOAT64: rms_bwd_dispatch<F64>(a, stream); break;
    }
    if (want_w) {
        const dim3 grid((unsigned)ceil_div(C, 32), 1), block(32, 8);
        if (dtype == PN_FLOAT64)
            reduce_partials<double><<<grid, block, 0, stream>>>(dweight, nullptr, wdtype, static_cast<const double *>(scratch),
                                                                a.P, C, a.accumulate);
        else
            reduce_partials<float><<<grid, block, 0, stream>>>(dweight, nullptr, wdtype, static_cast<const float *>(scratch),
                                                               a.P, C, a.accumulate);
    }
    return launch_status();
}

/* The *_ex functions (pynorm.h's pn_norm_options; opts NULL: the functions above). */
pn_status pn_cuda_rmsnorm_forward_ex(void *out, void *rstd, const void *inp, const void *weight,
                                     int64_t B, int64_t T, int64_t C, double eps,
                                     pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                     const pn_norm_options *opts, cudaStream_t stream)
{
    return rms_forward(out, nullptr, rstd, inp, nullptr, weight, B, T, C, eps, dtype, wdtype, strides, stream, false, opts);
}

pn_status pn_cuda_add_rmsnorm_forward_ex(void *out, void *h, void *rstd,
                                         const void *inp, const void *residual, const void *weight,
                                         int64_t B, int64_t T, int64_t C, double eps,
                                         pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                         const pn_norm_options *opts, cudaStream_t stream)
{
    return rms_forward(out, h, rstd, inp, residual, weight, B, T, C, eps, dtype, wdtype, strides, stream, true, opts);
}

pn_status pn_cuda_rmsnorm_quant_forward(void *q, float *scales, void *h, void *rstd,
                                        const void *inp, const void *residual, const void *weight,
                                        int64_t B, int64_t T, int64_t C, double eps,
                                        pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                        const pn_norm_options *opts, const pn_quant_params *quant,
                                        cudaStream_t stream)
{
    return rms_forward(nullptr, residual ? h : nullptr, rstd, inp, residual, weight, B, T, C, eps, dtype, wdtype,
                       strides, stream, residual != nullptr, opts, quant, q, scales);
}

pn_status pn_cuda_rmsnorm_backward(void *dinp, void *dweight,
                                   void *scratch, size_t scratch_bytes,
                                   const void *dout, const void *inp, const void *weight,
                                   const void *rstd,
                                   int64_t B, int64_t T, int64_t C, int flags,
                                   pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                   cudaStream_t stream)
{
    return pn_cuda_rmsnorm_backward_ex(dinp, dweight, scratch, scratch_bytes, dout, inp, weight, rstd,
                                       B, T, C, flags, dtype, wdtype, strides, nullptr, stream);
}


} /* extern "C" */
