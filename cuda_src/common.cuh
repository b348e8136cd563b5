/* common.cuh - pieces shared by libpynorm_cuda's kernels (internal header).
 *
 *   - dtype traits: storage ("raw") type, compute ("acc") type, conversions
 *     that round once (round to nearest even);
 *   - row fragments: each thread of a row owns E elements of it, in chunks of
 *     V = 16 / sizeof(raw) consecutive elements; chunk j of thread `tid` starts
 *     at column (j * tpr + tid) * V (tpr = threads per row). Chunks are read
 *     with one 16-byte load when every row buffer is 16-byte aligned and with
 *     V scalar loads otherwise: the element-to-thread mapping, hence every
 *     sum's order, is the same either way, so results do not depend on the
 *     buffers' alignment;
 *   - warp and block sums (fixed order: the same bits on every run);
 *   - host-side argument checks shared by the ops and the fixed-order final
 *     reduction of partial sums; the kernel limits, launch geometry, the
 *     backward's row partition and the index walks are in launch.h (host and
 *     device code, tested on the host).
 */
#ifndef PN_CUDA_COMMON_CUH
#define PN_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pynorm_cuda.h"
#include "launch.h"   /* launch geometry, partitions, index walks (host and device) */

/* Records the CUDA error behind a PN_CUDA_ERR_LAUNCH (pynorm_cuda.cu). */
void pn_cuda_set_last_error_(int err);

namespace pn {
namespace {

/* ------------------------------------------------------------------------ */
/* dtypes                                                                    */

struct F32 {
    typedef float raw;
    typedef float acc;
    static __device__ __forceinline__ float to(float r) { return r; }
    static __device__ __forceinline__ float from(float a) { return a; }
};

struct F16 {
    typedef unsigned short raw;
    typedef float acc;
    static __device__ __forceinline__ float to(unsigned short r) { return __half2float(__ushort_as_half(r)); }
    static __device__ __forceinline__ unsigned short from(float a) { return __half_as_ushort(__float2half_rn(a)); }
};

struct BF16 {
    typedef unsigned short raw;
    typedef float acc;
    static __device__ __forceinline__ float to(unsigned short r) { return __bfloat162float(__ushort_as_bfloat16(r)); }
    static __device__ __forceinline__ unsigned short from(float a) { return __bfloat16_as_ushort(__float2bfloat16_rn(a)); }
};

struct F64 {
    typedef double raw;
    typedef double acc;
    static __device__ __forceinline__ double to(double r) { return r; }
    static __device__ __forceinline__ double from(double a) { return a; }
};

/* Multiply-adds are written out as fma so that the compiler cannot contract
 * one copy of an expression and not another (bit-identical paths). */
__device__ __forceinline__ float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fmadd(double a, double b, double c) { return fma(a, b, c); }

__device__ __forceinline__ float inv_sqrt(float v) { return 1.0f / sqrtf(v); }   /* IEEE sqrt and division */
__device__ __forceinline__ double inv_sqrt(double v) { return 1.0 / sqrt(v); }


/* ------------------------------------------------------------------------ */
/* Row fragments (register kernels, C <= 16384, 2- and 4-byte dtypes).       */
/* A chunk is V = 16 / sizeof(raw) consecutive elements held as four 32-bit  */
/* words (16-bit values packed two to a word), so that a thread's share of a */
/* row costs E * sizeof(raw) / 4 registers.                                  */

template <class D>
struct Vw { static constexpr int V = 16 / (int)sizeof(typename D::raw); };

/* Column of element k (0 <= k < E) of thread tid's fragment. */
template <class D>
__device__ __forceinline__ int col_of(int k, int tid, int tpr) { return col_of_v(Vw<D>::V, k, tid, tpr); }

/* Element i of a chunk as raw bits, and packing raw values into words. */
template <class D>
__device__ __forceinline__ typename D::raw chunk_raw(const uint32_t (&w)[4], int i)
{
    if constexpr (sizeof(typename D::raw) == 4) return __uint_as_float(w[i]);
    else return (unsigned short)(w[i >> 1] >> (16 * (i & 1)));
}

template <class D>
__device__ __forceinline__ void chunk_pack(uint32_t (&w)[4], const typename D::raw (&r)[Vw<D>::V])
{
    if constexpr (sizeof(typename D::raw) == 4) {
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(r[i]);
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = (uint32_t)r[2 * i] | ((uint32_t)r[2 * i + 1] << 16);
    }
}

/* Load / store one chunk starting at column c0. vec: every row buffer is
 * 16-byte aligned and C % V == 0, so the chunk is whole or absent. Elements
 * beyond C read as zero and are not written. */
template <class D>
__device__ __forceinline__ void load_chunk(uint32_t (&w)[4], const typename D::raw *row, int c0, int C, bool vec)
{
    typedef typename D::raw R;
    constexpr int V = Vw<D>::V;
    if (vec) {
        if (c0 < C) {
            const uint4 u = *reinterpret_cast<const uint4 *>(row + c0);
            w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
        } else {
            w[0] = w[1] = w[2] = w[3] = 0u;
        }
    } else {
        R r[V];
#pragma unroll
        for (int i = 0; i < V; ++i) r[i] = (c0 + i < C) ? row[c0 + i] : R(0);
        chunk_pack<D>(w, r);
    }
}

template <class D>
__device__ __forceinline__ void store_chunk(typename D::raw *row, const uint32_t (&w)[4], int c0, int C, bool vec)
{
    constexpr int V = Vw<D>::V;
    if (vec) {
        if (c0 < C) *reinterpret_cast<uint4 *>(row + c0) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i)
            if (c0 + i < C) row[c0 + i] = chunk_raw<D>(w, i);
    }
}

/* V floats rounded (once) to dtype D and stored at column c0. */
template <class D>
__device__ __forceinline__ void store_chunk_f(typename D::raw *row, const float (&o)[Vw<D>::V], int c0, int C, bool vec)
{
    typename D::raw r[Vw<D>::V];
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < Vw<D>::V; ++i) r[i] = D::from(o[i]);
    chunk_pack<D>(w, r);
    store_chunk<D>(row, w, c0, C, vec);
}

/* Thread tid's E elements of a row: E / V chunks, chunk j at column
 * (j * tpr + tid) * V. */
template <class D, int E>
struct Frag {
    static constexpr int V = Vw<D>::V;
    static constexpr int NV = E / V;
    static_assert(E % V == 0, "E must be a multiple of the vector width");
    uint32_t w[NV][4];

    __device__ __forceinline__ typename D::raw raw(int k) const { return chunk_raw<D>(w[k / V], k % V); }
    __device__ __forceinline__ float get(int k) const { return D::to(raw(k)); }

    __device__ __forceinline__ void load(const typename D::raw *row, int C, int tid, int tpr, bool vec)
    {
#pragma unroll
        for (int j = 0; j < NV; ++j) load_chunk<D>(w[j], row, (j * tpr + tid) * V, C, vec);
    }
    __device__ __forceinline__ void store(typename D::raw *row, int C, int tid, int tpr, bool vec) const
    {
#pragma unroll
        for (int j = 0; j < NV; ++j) store_chunk<D>(row, w[j], (j * tpr + tid) * V, C, vec);
    }
};

/* A chunk of weight or bias as float: p == NULL gives `dflt`; p holds float32
 * values when f32, else values of dtype D. */
template <class D>
__device__ __forceinline__ void load_param_chunk(float (&o)[Vw<D>::V], const void *p, bool f32, float dflt,
                                                 int c0, int C, bool vec)
{
    constexpr int V = Vw<D>::V;
    if (p == nullptr) {
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = dflt;
    } else if (f32) {
        const float *q = static_cast<const float *>(p);
        if (vec) {
            if (c0 < C) {
#pragma unroll
                for (int i = 0; i < V; i += 4) {
                    const float4 f = *reinterpret_cast<const float4 *>(q + c0 + i);
                    o[i] = f.x; o[i + 1] = f.y; o[i + 2] = f.z; o[i + 3] = f.w;
                }
            } else {
#pragma unroll
                for (int i = 0; i < V; ++i) o[i] = 0.0f;
            }
        } else {
#pragma unroll
            for (int i = 0; i < V; ++i) o[i] = (c0 + i < C) ? q[c0 + i] : 0.0f;
        }
    } else {
        uint32_t w[4];
        load_chunk<D>(w, static_cast<const typename D::raw *>(p), c0, C, vec);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = D::to(chunk_raw<D>(w, i));
    }
}

/* Weight or bias element c (streaming kernels). */
template <class D>
__device__ __forceinline__ typename D::acc param_at(const void *p, bool f32, typename D::acc dflt, int64_t c)
{
    typedef typename D::acc A;
    if (p == nullptr) return dflt;
    if (f32) return (A)static_cast<const float *>(p)[c];
    return D::to(static_cast<const typename D::raw *>(p)[c]);
}

/* ------------------------------------------------------------------------ */
/* Reductions. Butterfly (xor) shuffles leave the same bits in every lane.   */

template <class A>
__device__ __forceinline__ A warp_sum(A v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread
 * gets the same bits. sh: 32 elements of shared memory; the leading barrier
 * makes back-to-back calls with the same sh safe. */
template <class A>
__device__ __forceinline__ A block_sum(A v, A *sh)
{
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = (lane < nw) ? sh[lane] : A(0);
    return warp_sum(v);   /* every warp sums sh[0..nw) in the same order */
}

/* Two sums at once (one pair of barriers). */
template <class A>
__device__ __forceinline__ void block_sum2(A &a, A &b, A *sh /* 64 elements */)
{
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();
    if (lane == 0) { sh[wid] = a; sh[32 + wid] = b; }
    __syncthreads();
    a = (lane < nw) ? sh[lane] : A(0);
    b = (lane < nw) ? sh[32 + lane] : A(0);
    a = warp_sum(a);
    b = warp_sum(b);
}

/* ------------------------------------------------------------------------ */
/* Row statistics, by the C library's method (c_src/layernorm.c,             */
/* c_src/simd.h): values are added in the compute type only in short chains  */
/* (a thread's register fragment, at most 32 values, or kFoldEvery values in */
/* the streaming kernels); the chains' sums are added in double, across the  */
/* threads by the fixed-order warp and block sums above. LayerNorm sums       */
/* x - shift with the shift near the row's centre (row_shift), so the sums    */
/* stay small and the saved mean, shift + sum / C taken in double, is as      */
/* accurate as the float64 sum allows, whatever the magnitude of x[0].        */
/* tests/test_cuda_numerics.py replays these orders in NumPy.                 */

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }     /* never contracted */
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

/* A thread's running sum for the streaming kernels: chains of kFoldEvery
 * values in A, each chain's sum then added to a double total. */
template <class A>
struct FoldSum {
    A part = A(0);
    double total = 0.0;
    int n = 0;
    __device__ __forceinline__ void fold()
    {
        if (++n == kFoldEvery) { total += (double)part; part = A(0); n = 0; }
    }
    __device__ __forceinline__ void add(A v) { part += v; fold(); }
    __device__ __forceinline__ void add_sq(A v) { part = fmadd(v, v, part); fold(); }
    __device__ __forceinline__ double sum() const { return total + (double)part; }
};

/* Error-free sum (Knuth): a + b == s + e exactly, whatever the order of a
 * and b (so the lanes of a butterfly get the same bits); no multiplication,
 * so nothing the compiler may contract. */
template <class A>
__device__ __forceinline__ void two_sum(A a, A b, A &s, A &e)
{
    s = a + b;
    const A z = s - a;
    e = (a - (s - z)) + (b - z);
}

/* A thread's compensated sum of v - sh (LayerNorm's mean): the rounding
 * errors of each difference and of each addition, all exact, are added up in
 * c; s + c is the sum to a few ulps of c. A plain float chain loses up to an
 * ulp of its running sum per value, which in the mean of a row far from zero
 * relative to the mean is many ulps of the mean. */
template <class A>
struct CompSum {
    A s = A(0), c = A(0);
    __device__ __forceinline__ void add_diff(A v, A sh)
    {
        A d, ed, t, et;
        two_sum(v, -sh, d, ed);
        two_sum(s, d, t, et);
        s = t;
        c += et + ed;
    }
};

/* Double-double sums across threads (float64 rows): pairs (hi, lo) added as
 * hi + hi' exactly (two_sum) and lo + lo' + the error; commutative bit for bit. */
struct DD {
    double hi, lo;
};
__device__ __forceinline__ DD dd_add(DD a, DD b)
{
    DD r;
    double e;
    two_sum(a.hi, b.hi, r.hi, e);
    r.lo = (a.lo + b.lo) + e;
    return r;
}
__device__ __forceinline__ DD warp_sum_dd(DD v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        DD p;
        p.hi = __shfl_xor_sync(0xffffffffu, v.hi, o);
        p.lo = __shfl_xor_sync(0xffffffffu, v.lo, o);
        v = dd_add(v, p);
    }
    return v;
}
/* As block_sum (same order), on pairs; sh: 64 doubles. */
__device__ __forceinline__ DD block_sum_dd(DD v, double *sh)
{
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_dd(v);
    __syncthreads();
    if (lane == 0) { sh[wid] = v.hi; sh[32 + wid] = v.lo; }
    __syncthreads();
    v.hi = (lane < nw) ? sh[lane] : 0.0;
    v.lo = (lane < nw) ? sh[32 + lane] : 0.0;
    return warp_sum_dd(v);
}

/* sh + (t.hi + t.lo) / C, rounded once to about half an ulp of the result
 * (float64 rows): the quotient's remainder is exact (fma), and sh + q, which
 * cancels to the small mean, is taken exactly before the last rounding. */
__device__ __forceinline__ double dd_mean(double sh, DD t, double C)
{
    const double q = t.hi / C;
    const double r = fma(-q, C, t.hi);
    double u, eu;
    two_sum(sh, q, u, eu);
    return u + (eu + (r + t.lo) / C);
}

/* Value i of a row as the norm sees it: x, or h = x + residual rounded to the
 * dtype (rr != NULL), exactly as the kernels compute h. */
template <class D>
__device__ __forceinline__ typename D::acc row_value(const typename D::raw *xr, const typename D::raw *rr, int64_t i)
{
    if (rr != nullptr) return D::to(D::from(D::to(xr[i]) + D::to(rr[i])));
    return D::to(xr[i]);
}

/* The LayerNorm shift of a row, as the C library's (layernorm_stats): x0
 * plus the mean of d_i = v_i - x0 over the first k = min(C, 16) values, the
 * 16 d_i (zero beyond k) added as a fixed tree (lane j takes lane j + w for
 * w = 8, 4, 2, 1). *x0 receives the first value. */
template <class D>
__device__ __forceinline__ typename D::acc row_shift(const typename D::raw *xr, const typename D::raw *rr, int64_t C,
                                                     typename D::acc *x0)
{
    typedef typename D::acc A;
    const int k = shift_count(C);
    const A v0 = row_value<D>(xr, rr, 0);
    A d[kShiftCount];
#pragma unroll
    for (int i = 0; i < kShiftCount; ++i) {
        d[i] = A(0);
        if (i < k) d[i] = row_value<D>(xr, rr, i) - v0;
    }
    static_assert(kShiftCount == 16, "the tree below adds 16 lanes");
    /* constant offsets, so that d stays in registers (a loop over w = 8, 4,
     * 2, 1 was left rolled: d went to local memory) */
#pragma unroll
    for (int j = 0; j < 8; ++j) d[j] += d[j + 8];
#pragma unroll
    for (int j = 0; j < 4; ++j) d[j] += d[j + 4];
    d[0] += d[2];
    d[1] += d[3];
    d[0] += d[1];
    *x0 = v0;
    return v0 + (k == kShiftCount ? mul_rn(d[0], A(0.0625)) : d[0] / (A)k);   /* * 1/16: exactly / 16 */
}

/* The float path's sums of squares are trusted in [1e-20, 1e36] (the C
 * library's bounds): beyond, a float square may have overflowed or lost its
 * bits (and NaN/Inf fail the test); such rows are redone in double. */
__device__ __forceinline__ bool float_sumsq_ok(double q) { return q >= 1e-20 && q <= 1e36; }

/* ------------------------------------------------------------------------ */
/* Kernel arguments shared by the token norms (passed by value).            */

struct TokArgs {
    const void *x, *res, *dy, *w, *b;
    void *y, *h, *dx;
    void *mean, *rstd;         /* forward: outputs; backward: inputs */
    void *part;                /* backward: partial sums (scratch), or NULL */
    int64_t xsb, xst, rsb, rst, ysb, yst, hsb, hst, dysb, dyst, dxsb, dxst;
    int64_t xsh, rsh, ysh, hsh, dysh, dxsh;   /* third strides (heads), with H > 1 */
    int64_t rows, T, C;
    int64_t H;                 /* heads per (b, t): 1, or > 1 with T = T_user * H (row_off) */
    int64_t P, chunk;          /* backward: partitions, rows per partition */
    double eps;
    int vec, w_f32, accumulate;
    double woff;               /* pn_norm_options.weight_offset: w' = woff + w (0: w as it is) */
    int llama;                 /* PN_ROUND_LLAMA: xhat rounded to the dtype before w' */
    float *yf;                 /* quantized forms: y in float32, dense rows x C (y unused); NULL: y */
};

/* ------------------------------------------------------------------------ */
/* The epilogue of a token norm's forward (c_src/epilogue.h): the weight     */
/* with the offset added in the compute type, and the llama rounding of xhat. */

/* A chunk of the weight as float, the offset added (a.w == NULL: ones). */
template <class D>
__device__ __forceinline__ void load_weight_chunk(float (&o)[Vw<D>::V], const TokArgs &a, int c0, int C, bool vec)
{
    load_param_chunk<D>(o, a.w, a.w_f32 != 0, 1.0f, c0, C, vec);
    if (a.woff != 0.0 && a.w != nullptr) {   /* never for offset 0: -0 + 0 would turn a -0 weight into +0 */
        const float off = (float)a.woff;
#pragma unroll
        for (int i = 0; i < Vw<D>::V; ++i) o[i] = off + o[i];
    }
}

/* Weight c in the compute type A, the offset added. */
template <class D, class A>
__device__ __forceinline__ A weight_at(const TokArgs &a, int64_t c)
{
    const A w = param_at<D>(a.w, a.w_f32 != 0, (A)1, c);
    return (a.woff != 0.0 && a.w != nullptr) ? (A)a.woff + w : w;
}

/* Storing the forward's y: in the dtype into the row yr, or, for the
 * quantized forms (a.yf), as float32 into row `row` of the dense a.yf (the
 * value before its rounding to the dtype). */
template <class D>
__device__ __forceinline__ void put_y_chunk(const TokArgs &a, int64_t row, typename D::raw *yr,
                                            const float (&o)[Vw<D>::V], int c0, int C, bool vec)
{
    if (a.yf != nullptr) {
        float *yf = a.yf + row * (int64_t)C + c0;
#pragma unroll
        for (int i = 0; i < Vw<D>::V; ++i)
            if (c0 + i < C) yf[i] = o[i];
    } else {
        store_chunk_f<D>(yr, o, c0, C, vec);
    }
}

template <class D, class A>
__device__ __forceinline__ void put_y(const TokArgs &a, int64_t row, typename D::raw *yr, int64_t c, A v)
{
    if (a.yf != nullptr) a.yf[row * a.C + c] = (float)v;
    else yr[c] = D::from(v);
}

/* xhat as the rounding mode wants it: rounded to the 2-byte dtype D for
 * llama; as it is otherwise (and for float32/float64 data). */
template <class D, class A>
__device__ __forceinline__ A xhat_as(A v, bool llama)
{
    if constexpr (sizeof(typename D::raw) == 2) return llama ? (A)D::to(D::from((float)v)) : v;
    else return v;
}

/* Final fixed-order reduction of partial sums: out[c] = (old out[c]) +
 * sum_p part[k][p][c] for k = blockIdx.y (0: dweight, 1: dbias). Block (32, 8):
 * lane y adds partitions y, y+8, ... in order, then lane 0 adds the 8 lane
 * sums in order. */
template <class A>
__global__ void __launch_bounds__(256)
reduce_partials(void *out0, void *out1, pn_dtype wd, const A *part, int64_t P, int64_t C, int accumulate)
{
    __shared__ A sh[8][33];
    void *out = blockIdx.y == 0 ? out0 : out1;
    if (out == nullptr) return;                       /* uniform over the block */
    const A *pp = part + (int64_t)blockIdx.y * P * C;
    const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
    A s = 0;
    if (c < C)
        for (int64_t p = threadIdx.y; p < P; p += 8) s += pp[p * C + c];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y != 0 || c >= C) return;
    s = sh[0][threadIdx.x];
#pragma unroll
    for (int i = 1; i < 8; ++i) s += sh[i][threadIdx.x];
    switch (wd) {
    case PN_FLOAT32: {
        float *o = static_cast<float *>(out);
        o[c] = accumulate ? (float)((A)o[c] + s) : (float)s;
        break;
    }
    case PN_FLOAT64: {
        double *o = static_cast<double *>(out);
        o[c] = accumulate ? (double)o[c] + (double)s : (double)s;
        break;
    }
    case PN_FLOAT16: {
        unsigned short *o = static_cast<unsigned short *>(out);
        const float v = accumulate ? F16::to(o[c]) + (float)s : (float)s;
        o[c] = F16::from(v);
        break;
    }
    case PN_BFLOAT16: {
        unsigned short *o = static_cast<unsigned short *>(out);
        const float v = accumulate ? BF16::to(o[c]) + (float)s : (float)s;
        o[c] = BF16::from(v);
        break;
    }
    }
}

/* Partial sums of dweight (and dbias when LN) over the rows of partition
 * blockIdx.y, for column blockIdx.x * 256 + threadIdx.x, added row by row in
 * order; used where the row does not fit in registers (C > 16384, float64).
 * xhat = (x - mean) * rstd (LN) or x * rstd (RMS). */
template <class D, bool LN>
__global__ void __launch_bounds__(256)
bwd_cols(const TokArgs a)
{
    typedef typename D::raw R;
    typedef typename D::acc A;
    const int64_t c = (int64_t)blockIdx.x * 256 + threadIdx.x;
    if (c >= a.C) return;
    const int64_t r0 = (int64_t)blockIdx.y * a.chunk;
    const int64_t r1 = (r0 + a.chunk < a.rows) ? r0 + a.chunk : a.rows;
    const A *meanp = static_cast<const A *>(a.mean);
    const A *rstdp = static_cast<const A *>(a.rstd);
    const R *x = static_cast<const R *>(a.x);
    const R *dy = static_cast<const R *>(a.dy);
    /* (b, t, k) of row r0, stepped along (H == 1: k stays 0; see row_off) */
    const int64_t H = a.H > 1 ? a.H : 1, Tu = a.T / H;
    int64_t b = r0 / a.T, t = r0 - b * a.T, k = t % H;
    t /= H;
    A dw = 0, db = 0;
    for (int64_t row = r0; row < r1; ++row) {
        const A xv = D::to(x[b * a.xsb + t * a.xst + k * a.xsh + c]);
        const A g = D::to(dy[b * a.dysb + t * a.dyst + k * a.dysh + c]);
        const A xh = LN ? (xv - meanp[row]) * rstdp[row] : xv * rstdp[row];
        dw = fmadd(g, xh, dw);
        db += g;
        if (++k == H) {
            k = 0;
            if (++t == Tu) { t = 0; ++b; }
        }
    }
    A *part = static_cast<A *>(a.part);
    part[blockIdx.y * a.C + c] = dw;
    if (LN) part[a.P * a.C + blockIdx.y * a.C + c] = db;
}

/* ------------------------------------------------------------------------ */
/* Spatial norms (groupnorm.cu, batchnorm.cu): N x C x S values, dense.      */
/*   NCHW: value (n, c, s) at (n*C + c)*S + s;  NHWC: at (n*S + s)*C + c.     */
/* S == 1 is run as NHWC (the same memory either way). The N*S positions     */
/* m = n*S + s of every channel are cut into P chunks of `chunk` positions   */
/* (GroupNorm's backward: one chunk per sample) for partial sums in double.  */

struct SpArgs {
    const void *x, *dy, *w, *b;
    void *y, *dx, *dw, *db;
    void *mean, *rstd;         /* forward: outputs (may be NULL); backward: saved statistics */
    void *rm, *rv;             /* BatchNorm running statistics */
    double *part;              /* partial sums: P x C x 2 */
    void *coef;                /* BatchNorm: per-channel values for the elementwise pass */
    int64_t N, C, S, G, Cg;
    int64_t P, chunk;
    double eps, momentum;      /* momentum: the weight the batch statistics get */
    pn_dtype wdt, rdt;
    int nhwc, w_f32, accumulate, training, per_sample;
};

/* A value of any dtype as a double, and a value stored (rounded once from A). */
__device__ __forceinline__ double ld_any(const void *p, pn_dtype dt, int64_t i)
{
    switch (dt) {
    case PN_FLOAT32: return (double)static_cast<const float *>(p)[i];
    case PN_FLOAT64: return static_cast<const double *>(p)[i];
    case PN_FLOAT16: return (double)F16::to(static_cast<const unsigned short *>(p)[i]);
    default: return (double)BF16::to(static_cast<const unsigned short *>(p)[i]);
    }
}

template <class A>
__device__ __forceinline__ void st_any(void *p, pn_dtype dt, int64_t i, A v)
{
    switch (dt) {
    case PN_FLOAT32: static_cast<float *>(p)[i] = (float)v; break;
    case PN_FLOAT64: static_cast<double *>(p)[i] = (double)v; break;
    case PN_FLOAT16: static_cast<unsigned short *>(p)[i] = F16::from((float)v); break;
    default: static_cast<unsigned short *>(p)[i] = BF16::from((float)v); break;
    }
}

/* dweight/dbias element c from its double sum, as the C library stores it:
 * rounded to the compute type, then to dt (added to the old value first when
 * accumulating). */
template <class A>
__device__ __forceinline__ void sp_store_grad(void *p, pn_dtype dt, int64_t c, double v, int accumulate)
{
    const A r = accumulate ? (A)(ld_any(p, dt, c) + v) : (A)v;
    st_any<A>(p, dt, c, r);
}


/* The reference value of channel c in chunk p: the backward's saved mean of
 * the channel's set (GroupNorm: sample p's group; BatchNorm: the channel), or
 * the statistics' shift, the channel's first value (BatchNorm forward). */
template <class D, bool BWD>
__device__ __forceinline__ typename D::acc sp_ref(const SpArgs &a, int64_t p, int64_t c)
{
    typedef typename D::acc A;
    if (BWD) return static_cast<const A *>(a.mean)[a.per_sample ? p * a.G + c / a.Cg : c];
    return D::to(static_cast<const typename D::raw *>(a.x)[a.nhwc ? c : c * a.S]);
}

/* One value's terms: backward: dy and dy * (x - ref), computed in A;
 * forward: d and d*d with d = x - ref in double. */
template <class D, bool BWD>
__device__ __forceinline__ void sp_term(const SpArgs &a, int64_t off, typename D::acc ref, double &s0, double &s1)
{
    typedef typename D::acc A;
    const A xv = D::to(static_cast<const typename D::raw *>(a.x)[off]);
    if (BWD) {
        const A g = D::to(static_cast<const typename D::raw *>(a.dy)[off]);
        s0 += (double)g;
        s1 += (double)(g * (xv - ref));
    } else {
        const double d = (double)xv - (double)ref;
        s0 += d;
        s1 = fma(d, d, s1);
    }
}

/* Partial sums of channel c over chunk p, into part[(p*C + c)*2 + {0, 1}].
 * NHWC: block (32, 8), 32 consecutive channels (coalesced rows), the chunk's
 * rows dealt to the 8 y-lanes in turn, whose sums are added in lane order. */
template <class D, bool BWD>
__global__ void __launch_bounds__(256)
sp_part_nhwc(const SpArgs a)
{
    __shared__ double sh[2][8][33];
    const int64_t M = a.N * a.S, ncb = (a.C + 31) / 32;
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int64_t p = blockIdx.y; p < a.P; p += gridDim.y) {
        const int64_t m0 = p * a.chunk, m1 = (m0 + a.chunk < M) ? m0 + a.chunk : M;
        for (int64_t cb = blockIdx.x; cb < ncb; cb += gridDim.x) {
            const int64_t c = cb * 32 + tx;
            double s0 = 0, s1 = 0;
            if (c < a.C) {
                const typename D::acc ref = sp_ref<D, BWD>(a, p, c);
                for (int64_t m = m0 + ty; m < m1; m += 8) sp_term<D, BWD>(a, m * a.C + c, ref, s0, s1);
            }
            sh[0][ty][tx] = s0;
            sh[1][ty][tx] = s1;
            __syncthreads();
            if (ty == 0 && c < a.C) {
                double t0 = sh[0][0][tx], t1 = sh[1][0][tx];
#pragma unroll
                for (int k = 1; k < 8; ++k) { t0 += sh[0][k][tx]; t1 += sh[1][k][tx]; }
                a.part[(p * a.C + c) * 2] = t0;
                a.part[(p * a.C + c) * 2 + 1] = t1;
            }
            __syncthreads();
        }
    }
}

/* NCHW: one block per (channel, chunk); the chunk's positions (n, s) walk
 * rows of S contiguous values (coalesced), block sum in a fixed order. */
template <class D, bool BWD>
__global__ void __launch_bounds__(256)
sp_part_nchw(const SpArgs a)
{
    __shared__ double sh[64];
    const int64_t M = a.N * a.S;
    for (int64_t p = blockIdx.y; p < a.P; p += gridDim.y) {
        const int64_t m0 = p * a.chunk, m1 = (m0 + a.chunk < M) ? m0 + a.chunk : M;
        for (int64_t c = blockIdx.x; c < a.C; c += gridDim.x) {
            const typename D::acc ref = sp_ref<D, BWD>(a, p, c);
            double s0 = 0, s1 = 0;
            Walk2 w;   /* position m = n*S + s: w.o = n, w.in = s */
            w.init(m0 + threadIdx.x, blockDim.x, a.S);
            for (int64_t m = m0 + threadIdx.x; m < m1; m += blockDim.x, w.next())
                sp_term<D, BWD>(a, (w.o * a.C + c) * a.S + w.in, ref, s0, s1);
            block_sum2(s0, s1, sh);
            if (threadIdx.x == 0) {
                a.part[(p * a.C + c) * 2] = s0;
                a.part[(p * a.C + c) * 2 + 1] = s1;
            }
        }
    }
}

/* ======================================================================== */
/* Host side (sizes, partitions and launch geometry: launch.h)              */

inline pn_status check_dtypes(pn_dtype dtype, pn_dtype wdtype)
{
    if (!valid_dtype(dtype)) return PN_ERR_DTYPE;
    if (wdtype != dtype && wdtype != PN_FLOAT32) return PN_ERR_DTYPE;
    return PN_OK;
}

/* The options of a *_ex call (NULL: defaults), as the C library checks them:
 * *H = heads per (b, t) (1 unless opts->H > 1). */
inline pn_status check_options(const pn_norm_options *o, const void *weight, double *woff, int *llama, int64_t *H)
{
    *woff = 0.0;
    *llama = 0;
    *H = 1;
    if (o == nullptr) return PN_OK;
    if (!isfinite(o->weight_offset) || o->rounding < PN_ROUND_ONCE || o->rounding > PN_ROUND_LLAMA) return PN_ERR_ARG;
    if (o->weight_offset != 0.0 && weight == nullptr) return PN_ERR_ARG;
    if (o->H < 0) return PN_ERR_SIZE;
    *woff = o->weight_offset;
    *llama = o->rounding == PN_ROUND_LLAMA;
    *H = o->H > 1 ? o->H : 1;
    return PN_OK;
}

/* check_sizes over B x (T*H) rows: *TH = T * H, *rows = B * T * H. */
inline pn_status check_sizes_h(int64_t B, int64_t T, int64_t H, int64_t C, int esize, int64_t *TH, int64_t *rows)
{
    if (T <= 0 || H > INT64_MAX / T) return PN_ERR_SIZE;
    *TH = T * H;
    return check_sizes(B, *TH, C, esize, rows);
}

inline pn_status check_eps(double eps) { return (eps >= 0.0 && eps <= DBL_MAX) ? PN_OK : PN_ERR_EPS; }

/* One buffer a call touches, with its byte range [lo, hi). */
struct Span {
    uintptr_t lo, hi;
    bool out;
};

/* A B x T (x H) x C buffer with a row layout. */
struct RowBuf {
    const void *p;
    pn_rows l;       /* as given ({0, 0}: dense) */
    bool out;
    int64_t sb, st;  /* resolved: element strides, then folded (see prepare) */
    int64_t hs;      /* the third stride as given (pn_head_strides; used with H > 1) */
    int64_t sh;      /* resolved third stride (0 with H == 1) */
};

/* Do the rows of an output touch each other? The C library's sufficient
 * test (c_src/check.c): taken by increasing |stride| over the axes of more
 * than one row, each stride clears the whole run of rows along the smaller
 * ones. */
inline bool rows_disjoint(int64_t B, int64_t T, int64_t H, int64_t sb, int64_t st, int64_t sh, int64_t C)
{
    /* |stride|; INT64_MIN only reaches here for an axis of size 1 (the span
     * checks reject (n - 1) * stride overflows), where it is never used */
    const int64_t vn[3] = {B, T, H}, vs[3] = {sb, st, sh};
    int64_t n[3], s[3];
    int k = 0;
    for (int i = 0; i < 3; ++i)
        if (vn[i] > 1) { n[k] = vn[i]; s[k] = vs[i] < 0 ? -vs[i] : vs[i]; ++k; }
    for (int i = 1; i < k; ++i)          /* sort by stride */
        for (int j = i; j > 0 && s[j] < s[j - 1]; --j) {
            int64_t t = s[j]; s[j] = s[j - 1]; s[j - 1] = t;
            t = n[j]; n[j] = n[j - 1]; n[j - 1] = t;
        }
    int64_t run = C;                     /* extent of the rows along the smaller strides */
    for (int i = 0; i < k; ++i) {
        int64_t e;
        if (s[i] < run) return false;
        if (mul_ovf(n[i] - 1, s[i], &e) || add_ovf(run, e, &run)) return false;
    }
    return true;
}

/* Resolved layout checks for a call: sizes must already be checked (T: the
 * caller's T, heads not included). rb: row buffers (NULL pointers are
 * skipped); sp: dense buffers already turned into spans. H > 1: B x T x H
 * rows, each buffer's third stride in rb[i].hs (a dense buffer, pn_rows
 * {0, 0}, is B x T x H x C). Fills in each row buffer's folded strides,
 * *T_eff (rows per b, heads included), *H_eff (1 where every buffer's heads
 * fold into its t axis, as dense ones do) and *vec. Returns PN_ERR_ARG
 * (misaligned), PN_ERR_SIZE (a stride overflows), PN_ERR_STRIDE (output rows
 * overlap) or PN_ERR_ALIAS. twin[i]: bit j set when output i may be input j
 * itself (in place: same address, same strides). */
inline pn_status prepare(int64_t B, int64_t T, int64_t C, int esize,
                         RowBuf *rb, int nrb, Span *sp, int nsp, int64_t *T_eff, bool *vec,
                         const int *twin = nullptr, int64_t H = 1, int64_t *H_eff = nullptr)
{
    Span spans[16];
    int from[16];    /* the row buffer of each span (-1: a dense buffer) */
    int ns = 0;
    bool v = (C * esize) % 16 == 0;
    for (int i = 0; i < nrb; ++i) {
        RowBuf &r = rb[i];
        if (r.p == nullptr) continue;
        const uintptr_t p = (uintptr_t)r.p;
        if (p % (uintptr_t)esize != 0) return PN_ERR_ARG;
        int64_t sb = r.l.b, st = r.l.t, sh = H > 1 ? r.hs : 0;
        if (sb == 0 && st == 0) { sb = T * H * C; st = H * C; sh = H > 1 ? C : 0; }   /* dense; fits */
        /* span in elements: [min offset, max offset + C) */
        const int64_t n3[3] = {B, T, H}, s3[3] = {sb, st, sh};
        int64_t lo = 0, hi = 0, lo_b, hi_b;
        for (int k = 0; k < 3; ++k) {
            int64_t e;
            if (mul_ovf(n3[k] - 1, s3[k], &e)) return PN_ERR_SIZE;
            if (e < 0) { if (add_ovf(lo, e, &lo)) return PN_ERR_SIZE; }
            else { if (add_ovf(hi, e, &hi)) return PN_ERR_SIZE; }
        }
        if (add_ovf(hi, C, &hi) || mul_ovf(lo, esize, &lo_b) || mul_ovf(hi, esize, &hi_b)) return PN_ERR_SIZE;
        const uintptr_t below = (uintptr_t)0 - (uintptr_t)lo_b;       /* -lo_b, lo_b <= 0 */
        if (below > p) return PN_ERR_SIZE;                               /* would start below address 0 */
        if ((uintptr_t)hi_b > UINTPTR_MAX - p) return PN_ERR_SIZE;
        spans[ns].lo = p - below;
        spans[ns].hi = p + (uintptr_t)hi_b;
        spans[ns].out = r.out;
        from[ns] = i;
        ++ns;
        if (r.out && !rows_disjoint(B, T, H, sb, st, sh, C)) return PN_ERR_STRIDE;
        if (p % 16 != 0) v = false;
        if (B > 1 && (sb * esize) % 16 != 0) v = false;   /* each stride*esize fits: checked via lo_b/hi_b */
        if (T > 1 && (st * esize) % 16 != 0) v = false;
        if (H > 1 && (sh * esize) % 16 != 0) v = false;
        r.sb = sb;
        r.st = st;
        r.sh = sh;
    }
    for (int i = 0; i < nsp; ++i) {
        if (sp[i].lo == 0) continue;                      /* NULL buffer */
        from[ns] = -1;
        spans[ns++] = sp[i];
    }
    auto in_place = [&](int i, int j) {
        if (twin == nullptr || i < 0 || j < 0) return false;
        if (!((twin[i] >> j) & 1) && !((twin[j] >> i) & 1)) return false;
        return rb[i].p == rb[j].p && rb[i].sb == rb[j].sb && rb[i].st == rb[j].st && rb[i].sh == rb[j].sh;
    };
    for (int i = 0; i < ns; ++i)
        for (int j = i + 1; j < ns; ++j)
            if ((spans[i].out || spans[j].out) && spans[i].lo < spans[j].hi && spans[j].lo < spans[i].hi &&
                !(spans[i].out != spans[j].out && in_place(from[i], from[j])))
                return PN_ERR_ALIAS;
    /* heads that fold into t (t stride H times the head stride, as in a dense
     * buffer, or T == 1): B x (T*H) rows of two strides */
    int64_t Tr = T, Hr = H;
    if (H > 1) {
        bool heads_fold = true;
        for (int i = 0; i < nrb; ++i) {
            int64_t hst;
            if (rb[i].p != nullptr && T > 1 && (mul_ovf(H, rb[i].sh, &hst) || rb[i].st != hst)) heads_fold = false;
        }
        if (heads_fold) {
            for (int i = 0; i < nrb; ++i) {
                if (rb[i].p == nullptr) continue;
                rb[i].st = rb[i].sh;
                rb[i].sh = 0;
            }
            Tr = T * H;
            Hr = 1;
        }
    }
    bool fold = Hr == 1;
    for (int i = 0; i < nrb && fold; ++i) {
        int64_t tst;
        if (rb[i].p != nullptr && !(B == 1 || Tr == 1 || (!mul_ovf(Tr, rb[i].st, &tst) && rb[i].sb == tst))) fold = false;
    }
    if (fold) {
        for (int i = 0; i < nrb; ++i) {
            RowBuf &r = rb[i];
            if (r.p == nullptr) continue;
            r.sb = (Tr == 1) ? r.sb : r.st;   /* row stride */
            r.st = 0;
        }
        *T_eff = 1;
    } else {
        *T_eff = Tr * Hr;
    }
    if (H_eff != nullptr) *H_eff = Hr;
    *vec = v;
    return PN_OK;
}

/* A dense buffer of n elements of esize bytes (weight, bias, statistics,
 * gradients of weight/bias, scratch): alignment and span. */
inline pn_status dense_span(const void *p, int64_t n, int esize, int align, bool out, Span *s, bool *vec)
{
    if (p == nullptr) { s->lo = s->hi = 0; s->out = out; return PN_OK; }
    const uintptr_t q = (uintptr_t)p;
    int64_t bytes;
    if (q % (uintptr_t)align != 0) return PN_ERR_ARG;
    if (mul_ovf(n, esize, &bytes) || (uintptr_t)bytes > UINTPTR_MAX - q) return PN_ERR_SIZE;
    s->lo = q;
    s->hi = q + (uintptr_t)bytes;
    s->out = out;
    if (vec && q % 16 != 0) *vec = false;
    return PN_OK;
}


/* ---- spatial norms: host side ---- */

/* The checks every spatial call shares, in the C library's order
 * (c_src/spatial.h, pn_check_spatial): pointers, dtypes, layout, sizes,
 * groups, eps (forward only: eps != NULL). *nhwc: the layout the kernels
 * use (S == 1 runs as NHWC). */
inline pn_status sp_check(bool ptrs_ok, pn_dtype dtype, pn_dtype wdtype, pn_layout layout,
                          int64_t N, int64_t C, int64_t S, int64_t G, const double *eps, bool *nhwc)
{
    pn_status st;
    int64_t rows;
    if (!ptrs_ok) return PN_ERR_NULL;
    if ((st = check_dtypes(dtype, wdtype)) != PN_OK) return st;
    if (layout != PN_NCHW && layout != PN_NHWC) return PN_ERR_ARG;
    if ((st = check_sizes(N, C, S, dtype_size(dtype), &rows)) != PN_OK) return st;
    if (G <= 0 || C % G != 0) return PN_ERR_GROUPS;
    if (eps && (st = check_eps(*eps)) != PN_OK) return st;
    *nhwc = layout == PN_NHWC || S == 1;
    return PN_OK;
}

/* The C library's overlap rule on dense buffers: outputs pairwise disjoint;
 * an output may overlap an input only where same_ok[o * nin + i] allows that
 * exact pair and both are the same buffer (in place). NULL buffers (lo == 0)
 * are skipped. */
inline pn_status sp_overlaps(const Span *outs, int nout, const Span *ins, int nin, const unsigned char *same_ok)
{
    for (int o = 0; o < nout; ++o) {
        if (outs[o].lo == 0) continue;
        for (int q = 0; q < o; ++q)
            if (outs[q].lo != 0 && outs[o].lo < outs[q].hi && outs[q].lo < outs[o].hi) return PN_ERR_ALIAS;
        for (int i = 0; i < nin; ++i) {
            if (ins[i].lo == 0 || !(outs[o].lo < ins[i].hi && ins[i].lo < outs[o].hi)) continue;
            if (same_ok && same_ok[o * nin + i] && outs[o].lo == ins[i].lo && outs[o].hi == ins[i].hi) continue;
            return PN_ERR_ALIAS;
        }
    }
    return PN_OK;
}


/* Launches the partial sums of args.part (chunks args.P x args.chunk). */
template <class D, bool BWD>
void sp_launch_partials(const SpArgs &a, cudaStream_t s)
{
    const unsigned gy = (unsigned)(a.P < 65535 ? a.P : 65535);
    if (a.nhwc) {
        const int64_t ncb = ceil_div(a.C, 32);
        sp_part_nhwc<D, BWD><<<dim3(grid_for(ncb), gy), dim3(32, 8), 0, s>>>(a);
    } else {
        sp_part_nchw<D, BWD><<<dim3(grid_for(a.C), gy), 256, 0, s>>>(a);
    }
}

/* The spatial backwards' buffers: dx, dweight, dbias and the scratch (`need`
 * bytes, taken only when a gradient is wanted) against dy, x, weight and the
 * saved mean and rstd (nstats values each) of n = N*C*S values. dx may be dy
 * or x exactly: the sums read them all before dx is written, and dx[i] is
 * written by the thread that read dy[i] and x[i]. */
inline pn_status sp_backward_buffers(void *dinp, void *dweight, void *dbias, void *scratch, size_t need, bool used,
                                     const void *dout, const void *inp, const void *weight, const void *mean,
                                     const void *rstd, int64_t n, int64_t C, int64_t nstats, pn_dtype dtype,
                                     pn_dtype wdtype)
{
    const int es = dtype_size(dtype), wes = dtype_size(wdtype), ss = dtype == PN_FLOAT64 ? 8 : 4;
    Span outs[4], ins[5];
    pn_status st;
    if ((st = dense_span(dinp, n, es, es, true, &outs[0], nullptr)) != PN_OK) return st;
    if ((st = dense_span(dweight, C, wes, wes, true, &outs[1], nullptr)) != PN_OK) return st;
    if ((st = dense_span(dbias, C, wes, wes, true, &outs[2], nullptr)) != PN_OK) return st;
    if ((st = dense_span(used ? scratch : nullptr, (int64_t)need, 1, 1, true, &outs[3], nullptr)) != PN_OK)
        return st;
    if ((st = dense_span(dout, n, es, es, false, &ins[0], nullptr)) != PN_OK) return st;
    if ((st = dense_span(inp, n, es, es, false, &ins[1], nullptr)) != PN_OK) return st;
    if ((st = dense_span(weight, C, wes, wes, false, &ins[2], nullptr)) != PN_OK) return st;
    if ((st = dense_span(mean, nstats, ss, ss, false, &ins[3], nullptr)) != PN_OK) return st;
    if ((st = dense_span(rstd, nstats, ss, ss, false, &ins[4], nullptr)) != PN_OK) return st;
    static const unsigned char same_ok[4 * 5] = {1, 1, 0, 0, 0};
    return sp_overlaps(outs, 4, ins, 5, same_ok);
}

/* Status of the launches just queued. */
inline pn_status launch_status(void)
{
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        pn_cuda_set_last_error_((int)e);
        return (pn_status)PN_CUDA_ERR_LAUNCH;
    }
    return PN_OK;
}

} /* namespace */
} /* namespace pn */

#endif /* PN_CUDA_COMMON_CUH */
