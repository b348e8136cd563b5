/* quant.cuh - the quantized output of the token norms on CUDA
 * (pn_cuda_*_quant_forward): the CUDA sibling of the quantization in
 * c_src/epilogue.h, with the C library's checks (c_src/check.c,
 * pn_check_quant). The forward kernels write y in float32 to working memory
 * (TokArgs.yf: the very value they would round to the dtype); quant_k then
 * takes one group (or row) per warp: amax, scale, q. Semantics: pynorm.h. */
#ifndef PYNORM_CUDA_QUANT_CUH
#define PYNORM_CUDA_QUANT_CUH

#include "common.cuh"

namespace pn {
namespace {   /* one copy per including file, as the kernels of rmsnorm.cu/layernorm.cu */

struct QuantArgs {
    const float *y;        /* dense rows x C */
    uint8_t *q;            /* dense rows x C */
    float *scales;         /* dynamic: one per group; NULL: static */
    int64_t ngroups, G;    /* groups of G consecutive values (static: G = C) */
    float scale;           /* static scale; 0: dynamic */
    float ub;              /* float8 dynamic: bound of amax; 0: none */
    float qmax, min_scale;
    int fp8;
};

/* The checked parameters of a call (pn_check_quant's rules). */
struct QuantPlan {
    int fp8;
    float scale, ub;
    int64_t G;             /* elements per scale (C: per row, or static) */
};

/* pn_check_quant: PN_ERR_NULL (quant NULL; scales NULL when dynamic) or
 * PN_ERR_ARG, before any other check of the call. */
inline pn_status check_quant(const pn_quant_params *quant, const float *scales, int64_t C, QuantPlan *p)
{
    if (quant == nullptr) return PN_ERR_NULL;
    const int fp8 = quant->qdtype == PN_QFLOAT8_E4M3FN;
    if (quant->qdtype != PN_QINT8 && !fp8) return PN_ERR_ARG;
    if (!(quant->scale >= 0 && quant->scale <= 3.4028234663852886e38)) return PN_ERR_ARG;   /* NaN fails */
    if (!(quant->scale_ub >= 0 && isfinite(quant->scale_ub))) return PN_ERR_ARG;
    const bool dynamic = quant->scale == 0;
    if (quant->scale_ub != 0 && (!fp8 || !dynamic)) return PN_ERR_ARG;   /* float8, dynamic only */
    if (quant->group_size < 0 || (quant->group_size && (!dynamic || C % quant->group_size))) return PN_ERR_ARG;
    if (dynamic && scales == nullptr) return PN_ERR_NULL;
    if ((float)quant->scale == 0 && !dynamic) return PN_ERR_ARG;       /* underflows float32 */
    p->fp8 = fp8;
    p->scale = (float)quant->scale;
    p->ub = (float)quant->scale_ub;
    p->G = dynamic && quant->group_size ? quant->group_size : C;
    return PN_OK;
}

/* int8: round half to even, saturated; NaN -> 0 (pn_q_int8). */
__device__ __forceinline__ uint8_t q_int8(float t)
{
    if (t != t) return 0;
    if (t >= 127.0f) return (uint8_t)127;
    if (t <= -128.0f) return (uint8_t)(int8_t)-128;
    return (uint8_t)(int8_t)__float2int_rn(t);
}

/* float8 e4m3fn bits: clamped to +-448, rounded to nearest even; NaN ->
 * 0x7f; -0 stays -0 (pn_q_e4m3: a normal value is the float32's bits with the
 * 20 low mantissa bits rounded off, a subnormal m * 2^-9). */
__device__ __forceinline__ uint8_t q_e4m3(float t)
{
    if (t != t) return 0x7f;
    const uint32_t sign = (__float_as_uint(t) >> 24) & 0x80u;
    float v = fabsf(t);
    if (v > 448.0f) v = 448.0f;
    if (v < 0.015625f) return (uint8_t)(sign | (uint32_t)__float2int_rn(v * 512.0f));
    uint32_t u = __float_as_uint(v);
    u += 0x7ffffu + ((u >> 20) & 1u);
    return (uint8_t)(sign | ((((u >> 23) - 120u) << 3) | ((u >> 20) & 7u)));
}

/* One warp per group: amax (NaN if any value is NaN), scale, then q. The
 * divisions are IEEE (no fast math), as the C library's. */
__global__ void __launch_bounds__(256) quant_k(const QuantArgs a)
{
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t g = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); g < a.ngroups; g += warps) {
        const float *y = a.y + g * a.G;
        uint8_t *q = a.q + g * a.G;
        float s = a.scale;
        if (s == 0.0f) {
            float amax = 0.0f;
            bool nan = false;
            for (int64_t i = lane; i < a.G; i += 32) {
                const float v = fabsf(y[i]);
                nan |= v != v;
                amax = v > amax ? v : amax;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            nan = __any_sync(0xffffffffu, nan);
            if (nan) amax = __int_as_float(0x7fc00000);
            else if (a.ub > 0.0f && amax > a.ub) amax = a.ub;
            s = amax / a.qmax;
            if (s < a.min_scale) s = a.min_scale;   /* NaN stays NaN */
            if (lane == 0) a.scales[g] = s;
        }
        if (a.fp8)
            for (int64_t i = lane; i < a.G; i += 32) q[i] = q_e4m3(y[i] / s);
        else
            for (int64_t i = lane; i < a.G; i += 32) q[i] = q_int8(y[i] / s);
    }
}

/* Working memory for y (rows x C float32) from the stream-ordered pool;
 * PN_ERR_ALLOC (nothing launched) when it cannot be had. */
inline pn_status quant_alloc(int64_t rows, int64_t C, cudaStream_t stream, float **yf)
{
    int64_t n, bytes;
    if (mul_ovf(rows, C, &n) || mul_ovf(n, 4, &bytes)) return PN_ERR_SIZE;
    void *p = nullptr;
    const cudaError_t e = cudaMallocAsync(&p, (size_t)bytes, stream);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (e == cudaErrorMemoryAllocation) return PN_ERR_ALLOC;
        pn_cuda_set_last_error_((int)e);
        return (pn_status)PN_CUDA_ERR_LAUNCH;
    }
    *yf = static_cast<float *>(p);
    return PN_OK;
}

/* After the forward kernels wrote yf: quantize it, free it (stream order). */
inline void quant_launch(const QuantPlan &p, float *yf, void *q, float *scales, int64_t rows, int64_t C,
                         cudaStream_t stream)
{
    QuantArgs a = {};
    a.y = yf;
    a.q = static_cast<uint8_t *>(q);
    a.scales = p.scale == 0.0f ? scales : nullptr;
    a.G = p.G;
    a.ngroups = rows * (C / p.G);
    a.scale = p.scale;
    a.ub = p.ub;
    a.fp8 = p.fp8;
    a.qmax = p.fp8 ? 448.0f : 127.0f;
    a.min_scale = p.fp8 ? 1.0f / (448.0f * 512.0f) : 1.1920928955078125e-7f;
    quant_k<<<grid_for(ceil_div(a.ngroups, 8)), 256, 0, stream>>>(a);
    (void)cudaFreeAsync(yf, stream);
}

} /* namespace */
} /* namespace pn */

#endif /* PYNORM_CUDA_QUANT_CUH */
