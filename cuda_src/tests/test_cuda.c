/* test_cuda.c - C test of libpynorm_cuda (no Python).
 *
 * 1. Argument checks: they happen on the host before any launch, so they run
 *    everywhere, with or without a GPU (fake device pointers are never
 *    dereferenced).
 * 2. With no usable CUDA device the test prints a SKIP line and exits 77
 *    (ctest: SKIP_RETURN_CODE 77).
 * 3. On a GPU: every op x dtype x weight dtype x C in {1 .. 65536} against a
 *    double-precision reference computed here; 16-byte-aligned against
 *    misaligned/strided buffers (must give the same bits); repeated runs
 *    (same bits); accumulate; hostile rows (mean 1e4, std 1e-2).
 * 4. On a GPU: GroupNorm and BatchNorm (training, running statistics) forward
 *    and backward, NCHW and NHWC, every dtype, against a double reference.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "pynorm_cuda.h"

static int failures = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            ++failures;                                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
        }                                                                  \
    } while (0)

#define CUDA_OK(call)                                                      \
    do {                                                                   \
        cudaError_t e_ = (call);                                           \
        if (e_ != cudaSuccess) {                                           \
            fprintf(stderr, "CUDA error %s at %s:%d\n",                    \
                    cudaGetErrorString(e_), __FILE__, __LINE__);           \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Host conversions (round to nearest even)                                  */

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static uint16_t f2bf(float f)
{
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf2f(uint16_t h) { return u2f((uint32_t)h << 16); }

static uint16_t f2h(float f)
{
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, mant;
    int exp;
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (u >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to inf */
    exp = (int)(u >> 23) - 127;
    mant = (u & 0x7fffffu) | 0x800000u;
    if (exp < -14) { /* subnormal half (or zero) */
        int shift = -14 - exp + 13;
        uint32_t r, half, q;
        if (shift > 24) return (uint16_t)sign;
        q = mant >> shift;
        r = mant & ((1u << shift) - 1u);
        half = 1u << (shift - 1);
        if (r > half || (r == half && (q & 1u))) ++q;
        return (uint16_t)(sign | q);
    } else {
        uint32_t q = ((uint32_t)(exp + 15) << 10) | ((mant >> 13) & 0x3ffu);
        uint32_t r = mant & 0x1fffu;
        if (r > 0x1000u || (r == 0x1000u && (q & 1u))) ++q;
        return (uint16_t)(sign | q);
    }
}
static float h2f(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0) {
        float v = ldexpf((float)mant, -24);
        return sign ? -v : v;
    }
    if (exp == 31) return u2f(sign | 0x7f800000u | (mant << 13));
    return u2f(sign | ((exp + 112) << 23) | (mant << 13));
}

static size_t esize(pn_dtype d) { return d == PN_FLOAT64 ? 8 : d == PN_FLOAT32 ? 4 : 2; }

/* value i of a host buffer of dtype d */
static double get(const void *p, pn_dtype d, size_t i)
{
    switch (d) {
    case PN_FLOAT32: return ((const float *)p)[i];
    case PN_FLOAT64: return ((const double *)p)[i];
    case PN_FLOAT16: return h2f(((const uint16_t *)p)[i]);
    case PN_BFLOAT16: return bf2f(((const uint16_t *)p)[i]);
    }
    return 0;
}
static void put(void *p, pn_dtype d, size_t i, double v)
{
    switch (d) {
    case PN_FLOAT32: ((float *)p)[i] = (float)v; break;
    case PN_FLOAT64: ((double *)p)[i] = v; break;
    case PN_FLOAT16: ((uint16_t *)p)[i] = f2h((float)v); break;
    case PN_BFLOAT16: ((uint16_t *)p)[i] = f2bf((float)v); break;
    }
}
static double round_to(pn_dtype d, double v)
{
    unsigned char tmp[8];
    put(tmp, d, 0, v);
    return get(tmp, d, 0);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static double urand(void) /* [-1, 1) */
{
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (double)(rng >> 11) / 4503599627370496.0 - 1.0;
}

static const char *dname(pn_dtype d)
{
    return d == PN_FLOAT32 ? "f32" : d == PN_FLOAT16 ? "f16" : d == PN_BFLOAT16 ? "bf16" : "f64";
}

/* tolerance of a value of dtype d computed from C-element rows */
static double tol(pn_dtype d)
{
    switch (d) {
    case PN_FLOAT64: return 1e-10;
    case PN_FLOAT32: return 2e-5;
    case PN_FLOAT16: return 2e-3;
    case PN_BFLOAT16: return 1.6e-2;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* 1. argument checks (no device needed)                                     */

static void test_args(void)
{
    void *X = (void *)(uintptr_t)0x7f0000000000ull, *Y = (void *)(uintptr_t)0x7f1000000000ull;
    void *W = (void *)(uintptr_t)0x7f2000000000ull, *S = (void *)(uintptr_t)0x7f3000000000ull;
    void *M = (void *)(uintptr_t)0x7f4000000000ull, *R = (void *)(uintptr_t)0x7f5000000000ull;
    pn_strides st;
    int s;

    s = pn_cuda_layernorm_forward(NULL, NULL, NULL, X, NULL, NULL, 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_NULL, "null out: %d", s);
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, NULL, NULL, NULL, 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_NULL, "null inp: %d", s);
    s = pn_cuda_add_layernorm_forward(Y, NULL, NULL, NULL, X, W, NULL, NULL, 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_NULL, "null h: %d", s);
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, X, NULL, NULL, 2, 3, 4, 1e-5, (pn_dtype)7, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_DTYPE, "bad dtype: %d", s);
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, X, NULL, NULL, 2, 3, 4, 1e-5, PN_FLOAT16, PN_BFLOAT16, NULL, 0);
    CHECK(s == PN_ERR_DTYPE, "bad wdtype: %d", s);
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, X, NULL, NULL, 0, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_SIZE, "B=0: %d", s);
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, X, NULL, NULL, 2, 3, -4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_SIZE, "C<0: %d", s);
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, X, NULL, NULL, INT64_MAX / 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_SIZE, "overflow: %d", s);
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, X, NULL, NULL, 2, 3, 4, -1.0, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_EPS, "eps<0: %d", s);
    s = pn_cuda_rmsnorm_forward(Y, NULL, X, NULL, 2, 3, 4, NAN, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_EPS, "eps nan: %d", s);
    s = pn_cuda_rmsnorm_forward(Y, NULL, X, NULL, 2, 3, 4, INFINITY, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_EPS, "eps inf: %d", s);
    /* out overlapping inp other than as the very same view (in place is allowed) */
    s = pn_cuda_layernorm_forward((char *)X + 16, NULL, NULL, X, NULL, NULL, 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_ALIAS, "out shifted over inp: %d", s);
    {
        /* per-head rows (H = 4 heads of 8 per t): checked as the C library checks them */
        pn_norm_options o;
        pn_quant_params qp;
        memset(&o, 0, sizeof o);
        memset(&st, 0, sizeof st);
        o.H = 4;
        st.inp.t = 96; st.out.t = 96;
        o.head.inp = 8; o.head.out = 7;
        s = pn_cuda_rmsnorm_forward_ex(Y, NULL, X, NULL, 1, 3, 8, 1e-5, PN_FLOAT32, PN_FLOAT32, &st, &o, 0);
        CHECK(s == PN_ERR_STRIDE, "overlapping heads: %d", s);
        o.head.out = 16;
        s = pn_cuda_rmsnorm_forward_ex(X, NULL, X, NULL, 1, 3, 8, 1e-5, PN_FLOAT32, PN_FLOAT32, &st, &o, 0);
        CHECK(s == PN_ERR_ALIAS, "out over inp with another head stride: %d", s);
        o.H = -1;
        s = pn_cuda_rmsnorm_forward_ex(Y, NULL, X, NULL, 1, 3, 8, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, &o, 0);
        CHECK(s == PN_ERR_SIZE, "H < 0: %d", s);
        /* the quantized forward's parameters */
        s = pn_cuda_rmsnorm_quant_forward(Y, (float *)S, NULL, NULL, X, NULL, NULL, 2, 3, 8, 1e-5, PN_FLOAT32,
                                          PN_FLOAT32, NULL, NULL, NULL, 0);
        CHECK(s == PN_ERR_NULL, "quant NULL: %d", s);
        memset(&qp, 0, sizeof qp);
        qp.group_size = 3;
        s = pn_cuda_rmsnorm_quant_forward(Y, (float *)S, NULL, NULL, X, NULL, NULL, 2, 3, 8, 1e-5, PN_FLOAT32,
                                          PN_FLOAT32, NULL, NULL, &qp, 0);
        CHECK(s == PN_ERR_ARG, "group_size not dividing C: %d", s);
        qp.group_size = 4;
        s = pn_cuda_layernorm_quant_forward(Y, (float *)((char *)Y + 16), NULL, NULL, NULL, X, NULL, NULL, NULL,
                                            2, 3, 8, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, NULL, &qp, 0);
        CHECK(s == PN_ERR_ALIAS, "scales inside q: %d", s);
    }
    s = pn_cuda_rmsnorm_forward(Y, (char *)X + 16, X, NULL, 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_ALIAS, "rstd inside inp: %d", s);
    s = pn_cuda_rmsnorm_forward(Y, NULL, X, (char *)Y + 8, 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_ALIAS, "weight inside out: %d", s);
    /* overlapping output rows */
    memset(&st, 0, sizeof st);
    st.out.b = 12; st.out.t = 2;
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, X, NULL, NULL, 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, &st, 0);
    CHECK(s == PN_ERR_STRIDE, "overlapping rows: %d", s);
    /* ... while input rows may (a row broadcast with stride 0 along T) */
    memset(&st, 0, sizeof st);
    st.inp.b = 4; st.inp.t = 0;
    st.out.b = 12; st.out.t = 4;
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, (char *)X + 2, NULL, NULL, 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, &st, 0);
    CHECK(s == PN_ERR_ARG, "broadcast input rows pass the layout checks (then: misaligned): %d", s);
    /* misaligned pointer */
    s = pn_cuda_layernorm_forward(Y, NULL, NULL, (char *)X + 2, NULL, NULL, 2, 3, 4, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_ARG, "misaligned inp: %d", s);
    /* backward */
    s = pn_cuda_layernorm_backward(Y, W, NULL, NULL, 0, X, R, NULL, M, S, 2, 3, 4, 0, PN_FLOAT32, PN_FLOAT32, NULL, 0);
    CHECK(s == PN_ERR_SCRATCH, "null scratch: %d", s);
    {
        size_t need = pn_cuda_layernorm_backward_scratch_size(2, 3, 4, PN_FLOAT32);
        CHECK(need > 0, "scratch size %zu", need);
        s = pn_cuda_layernorm_backward(Y, W, NULL, (void *)(uintptr_t)0x7f6000000000ull, need - 4, X, R, NULL, M, S,
                                       2, 3, 4, 0, PN_FLOAT32, PN_FLOAT32, NULL, 0);
        CHECK(s == PN_ERR_SCRATCH, "small scratch: %d", s);
        s = pn_cuda_layernorm_backward(Y, W, NULL, (void *)(uintptr_t)0x7f6000000004ull, need, X, R, NULL, M, S,
                                       2, 3, 4, 0, PN_FLOAT32, PN_FLOAT32, NULL, 0);
        CHECK(s == PN_ERR_SCRATCH, "misaligned scratch: %d", s);
        s = pn_cuda_layernorm_backward(Y, W, NULL, X, need, X, R, NULL, M, S, 2, 3, 4, 0, PN_FLOAT32, PN_FLOAT32, NULL, 0);
        CHECK(s == PN_ERR_ALIAS, "scratch == inp: %d", s);
        s = pn_cuda_layernorm_backward(Y, NULL, NULL, NULL, 0, X, R, NULL, M, S, 2, 3, 4, 2, PN_FLOAT32, PN_FLOAT32, NULL, 0);
        CHECK(s == PN_ERR_ARG, "bad flags: %d", s);
        s = pn_cuda_layernorm_backward(Y, NULL, NULL, NULL, 0, X, R, NULL, NULL, S, 2, 3, 4, 0, PN_FLOAT32, PN_FLOAT32, NULL, 0);
        CHECK(s == PN_ERR_NULL, "null mean: %d", s);
        s = pn_cuda_rmsnorm_backward(R, NULL, NULL, 0, X, R, NULL, S, 2, 3, 4, 0, PN_FLOAT32, PN_FLOAT32, NULL, 0);
        CHECK(s == PN_ERR_ALIAS, "dx == dy: %d", s);
        s = pn_cuda_rmsnorm_backward(NULL, NULL, NULL, 0, X, R, NULL, S, 2, 3, 4, 0, PN_FLOAT32, PN_FLOAT32, NULL, 0);
        CHECK(s == PN_OK, "nothing to do: %d", s);
    }
    /* spatial norms: N = 2, C = 4, S = 9 */
    {
        void *RM = (void *)(uintptr_t)0x7f7000000000ull, *RV = (void *)(uintptr_t)0x7f8000000000ull;
        void *SC = (void *)(uintptr_t)0x7f6000000000ull;
        size_t gneed = pn_cuda_groupnorm_backward_scratch_size(2, 4, 9, 2, PN_NCHW, PN_FLOAT32);
        size_t bneed = pn_cuda_batchnorm_backward_scratch_size(2, 4, 9, PN_NHWC, PN_FLOAT32);
        CHECK(gneed > 0 && bneed > 0, "spatial scratch sizes %zu %zu", gneed, bneed);
        CHECK(pn_cuda_groupnorm_backward_scratch_size(2, 4, 9, 3, PN_NCHW, PN_FLOAT32) == 0, "gn scratch, bad G");
        CHECK(pn_cuda_batchnorm_backward_scratch_size(2, 0, 9, PN_NCHW, PN_FLOAT32) == 0, "bn scratch, C = 0");
        s = pn_cuda_groupnorm_forward(NULL, M, R, X, NULL, NULL, 2, 4, 9, 2, 1e-5, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_NULL, "gn null out: %d", s);
        s = pn_cuda_groupnorm_forward(Y, M, R, X, NULL, NULL, 2, 4, 9, 3, 1e-5, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_GROUPS, "gn groups: %d", s);
        s = pn_cuda_groupnorm_forward(Y, M, R, X, NULL, NULL, 2, 4, 9, 2, 1e-5, (pn_layout)2, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ARG, "gn layout: %d", s);
        s = pn_cuda_groupnorm_forward(Y, M, R, X, NULL, NULL, 2, 4, 9, 2, NAN, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_EPS, "gn eps: %d", s);
        s = pn_cuda_groupnorm_forward(Y, M, R, X, NULL, NULL, 2, 4, 0, 2, 1e-5, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_SIZE, "gn S = 0: %d", s);
        s = pn_cuda_groupnorm_forward(Y, M, R, X, NULL, NULL, 2, 4, 9, 2, 1e-5, PN_NCHW, PN_FLOAT16, PN_BFLOAT16, 0);
        CHECK(s == PN_ERR_DTYPE, "gn wdtype: %d", s);
        s = pn_cuda_groupnorm_forward(Y, (char *)X + 8, R, X, NULL, NULL, 2, 4, 9, 2, 1e-5, PN_NHWC, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ALIAS, "gn mean inside inp: %d", s);
        s = pn_cuda_groupnorm_forward(Y, M, R, (char *)X + 2, NULL, NULL, 2, 4, 9, 2, 1e-5, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ARG, "gn misaligned inp: %d", s);
        s = pn_cuda_groupnorm_backward(Y, NULL, NULL, NULL, 0, X, W, NULL, M, R, 2, 4, 9, 2, 0, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_SCRATCH, "gn backward, null scratch: %d", s);
        s = pn_cuda_groupnorm_backward(Y, NULL, NULL, SC, gneed - 1, X, W, NULL, M, R, 2, 4, 9, 2, 0, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_SCRATCH, "gn backward, small scratch: %d", s);
        s = pn_cuda_groupnorm_backward(Y, NULL, NULL, SC, gneed, X, W, NULL, M, R, 2, 4, 9, 2, 4, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ARG, "gn backward, flags: %d", s);
        s = pn_cuda_groupnorm_backward(Y, NULL, NULL, SC, gneed, X, W, NULL, NULL, R, 2, 4, 9, 2, 0, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_NULL, "gn backward, null mean: %d", s);
        s = pn_cuda_groupnorm_backward(Y, NULL, NULL, X, gneed, X, W, NULL, M, R, 2, 4, 9, 2, 0, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ALIAS, "gn backward, scratch == dy: %d", s);
        s = pn_cuda_groupnorm_backward(NULL, NULL, NULL, NULL, 0, X, W, NULL, M, R, 2, 4, 9, 2, 0, PN_NCHW, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_OK, "gn backward, nothing to do: %d", s);
        s = pn_cuda_batchnorm_forward(Y, M, R, NULL, RV, X, NULL, NULL, 2, 4, 9, 1e-5, 0.1, 0, 0, PN_NCHW, PN_FLOAT32, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_NULL, "bn eval without running_mean: %d", s);
        s = pn_cuda_batchnorm_forward(Y, M, R, RM, RV, X, NULL, NULL, 2, 4, 9, 1e-5, 0.1, 0, 8, PN_NCHW, PN_FLOAT32, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ARG, "bn flags: %d", s);
        s = pn_cuda_batchnorm_forward(Y, M, R, RM, RV, X, NULL, NULL, 2, 4, 9, 1e-5, 0.1, 0, PN_BN_TRAINING, PN_NCHW, PN_FLOAT16, PN_FLOAT16, PN_BFLOAT16, 0);
        CHECK(s == PN_ERR_DTYPE, "bn rdtype: %d", s);
        s = pn_cuda_batchnorm_forward(Y, M, R, RM, RV, X, NULL, NULL, 1, 4, 1, 1e-5, 0.1, 0, PN_BN_TRAINING, PN_NCHW, PN_FLOAT32, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_SIZE, "bn one value per channel: %d", s);
        s = pn_cuda_batchnorm_forward(Y, M, R, RM, RV, X, NULL, NULL, 2, 4, 9, 1e-5, NAN, 0, PN_BN_TRAINING, PN_NCHW, PN_FLOAT32, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ARG, "bn momentum NaN: %d", s);
        s = pn_cuda_batchnorm_forward(Y, M, R, RM, RV, X, NULL, NULL, 2, 4, 9, 1e-5, 0.1, 0, PN_BN_TRAINING | PN_BN_CUMULATIVE, PN_NCHW, PN_FLOAT32, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ARG, "bn cumulative without a count: %d", s);
        s = pn_cuda_batchnorm_forward(Y, RM, R, RM, RV, X, NULL, NULL, 2, 4, 9, 1e-5, 0.1, 0, 0, PN_NCHW, PN_FLOAT32, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ALIAS, "bn eval, mean == running_mean: %d", s);
        s = pn_cuda_batchnorm_backward(Y, W, NULL, SC, bneed, X, R, NULL, M, S, 2, 4, 9, 8, PN_NHWC, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_ARG, "bn backward flags: %d", s);
        s = pn_cuda_batchnorm_backward(Y, W, NULL, (char *)SC + 8, bneed, X, R, NULL, M, S, 2, 4, 9, 0, PN_NHWC, PN_FLOAT32, PN_FLOAT32, 0);
        CHECK(s == PN_ERR_SCRATCH, "bn backward misaligned scratch: %d", s);
    }
    CHECK(pn_cuda_layernorm_backward_scratch_size(0, 1, 1, PN_FLOAT32) == 0, "scratch size of invalid sizes");
    CHECK(strcmp(pn_cuda_status_string(PN_CUDA_ERR_LAUNCH), "unknown status") != 0, "status string");
    CHECK(pn_cuda_version()[0] != 0, "version");
}

/* ------------------------------------------------------------------------ */
/* 3. kernels against a double reference                                     */

enum { OP_LN, OP_ADD_LN, OP_RMS, OP_ADD_RMS };

typedef struct {
    int64_t B, T, C;
    pn_dtype dt, wdt;
    int op, with_w;
} Case;

/* max over i of |got - ref| / (tol * (1 + |ref|)) */
static double worst(const void *got, pn_dtype d, const double *ref, size_t n, double t)
{
    double w = 0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double g = get(got, d, i), e = fabs(g - ref[i]) / (t * (1.0 + fabs(ref[i])));
        if (!(e <= w)) w = e; /* NaN counts as worst */
    }
    return w;
}

static void *dmalloc(size_t n)
{
    void *p = NULL;
    CUDA_OK(cudaMalloc(&p, n ? n : 1));
    return p;
}

static void to_dev(void *d, const void *h, size_t n) { CUDA_OK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice)); }
static void to_host(void *h, const void *d, size_t n) { CUDA_OK(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost)); }

static void run_case(const Case *cs, cudaStream_t stream, double shift, double scale)
{
    const int64_t rows = cs->B * cs->T, C = cs->C;
    const size_t n = (size_t)(rows * C), es = esize(cs->dt), wes = esize(cs->wdt);
    const size_t ss = cs->dt == PN_FLOAT64 ? 8 : 4;
    const pn_dtype sdt = cs->dt == PN_FLOAT64 ? PN_FLOAT64 : PN_FLOAT32;
    const int ln = cs->op == OP_LN || cs->op == OP_ADD_LN, fused = cs->op == OP_ADD_LN || cs->op == OP_ADD_RMS;
    const double eps = 1e-5, t = tol(cs->dt) * (C > 4096 ? 2.0 : 1.0);
    void *hx = malloc(n * es), *hr = malloc(n * es), *hdy = malloc(n * es), *hw = malloc(C * wes), *hb = malloc(C * wes);
    void *hy = malloc(n * es), *hh = malloc(n * es), *hdx = malloc(n * es), *hdw = malloc(C * wes), *hdb = malloc(C * wes);
    void *hmean = malloc(rows * ss), *hrstd = malloc(rows * ss), *hdx2 = malloc(n * es);
    double *rh = malloc(n * 8), *ry = malloc(n * 8), *rdx = malloc(n * 8), *rdw = calloc(C, 8), *rdb = calloc(C, 8);
    double *rmean = malloc(rows * 8), *rrstd = malloc(rows * 8);
    void *dx_, *dr, *dy_, *dw, *db, *dout, *dh, *dmean, *drstd, *ddx, *ddw, *ddb, *scratch, *dxo, *dyo, *ddxo;
    size_t sbytes, i;
    int64_t r, c;
    int s;
    double e;
    pn_strides st;

    for (i = 0; i < n; ++i) {
        put(hx, cs->dt, i, shift + scale * urand());
        put(hr, cs->dt, i, scale * urand());
        put(hdy, cs->dt, i, urand());
    }
    for (c = 0; c < C; ++c) {
        put(hw, cs->wdt, c, 1.0 + 0.5 * urand());
        put(hb, cs->wdt, c, 0.5 * urand());
    }
    /* reference, in double, from the rounded inputs */
    for (r = 0; r < rows; ++r) {
        double sum = 0, sq = 0, mean = 0, rstd;
        for (c = 0; c < C; ++c) {
            size_t k = (size_t)(r * C + c);
            double h = get(hx, cs->dt, k);
            if (fused) h = round_to(cs->dt, h + get(hr, cs->dt, k));
            rh[k] = h;
            sum += h;
        }
        if (ln) mean = sum / C;
        for (c = 0; c < C; ++c) {
            double d = rh[r * C + c] - mean;
            sq += d * d;
        }
        rstd = 1.0 / sqrt(sq / C + eps);
        rmean[r] = mean;
        rrstd[r] = rstd;
        for (c = 0; c < C; ++c) {
            size_t k = (size_t)(r * C + c);
            double w = cs->with_w ? get(hw, cs->wdt, c) : 1.0, b = (cs->with_w && ln) ? get(hb, cs->wdt, c) : 0.0;
            ry[k] = (rh[k] - mean) * rstd * w + b;
        }
    }

    dx_ = dmalloc(n * es); dr = dmalloc(n * es); dy_ = dmalloc(n * es); dw = dmalloc(C * wes); db = dmalloc(C * wes);
    dout = dmalloc(n * es); dh = dmalloc(n * es); dmean = dmalloc(rows * ss); drstd = dmalloc(rows * ss);
    ddx = dmalloc(n * es); ddw = dmalloc(C * wes); ddb = dmalloc(C * wes);
    to_dev(dx_, hx, n * es); to_dev(dr, hr, n * es); to_dev(dy_, hdy, n * es);
    to_dev(dw, hw, C * wes); to_dev(db, hb, C * wes);

    /* forward */
    switch (cs->op) {
    case OP_LN: s = pn_cuda_layernorm_forward(dout, dmean, drstd, dx_, cs->with_w ? dw : NULL, cs->with_w ? db : NULL,
                                              cs->B, cs->T, C, eps, cs->dt, cs->wdt, NULL, stream); break;
    case OP_ADD_LN: s = pn_cuda_add_layernorm_forward(dout, dh, dmean, drstd, dx_, dr, cs->with_w ? dw : NULL,
                                                      cs->with_w ? db : NULL, cs->B, cs->T, C, eps, cs->dt, cs->wdt, NULL, stream); break;
    case OP_RMS: s = pn_cuda_rmsnorm_forward(dout, drstd, dx_, cs->with_w ? dw : NULL, cs->B, cs->T, C, eps,
                                             cs->dt, cs->wdt, NULL, stream); break;
    default: s = pn_cuda_add_rmsnorm_forward(dout, dh, drstd, dx_, dr, cs->with_w ? dw : NULL, cs->B, cs->T, C, eps,
                                             cs->dt, cs->wdt, NULL, stream); break;
    }
    CHECK(s == PN_OK, "forward status %d (%s)", s, pn_cuda_status_string(s));
    CUDA_OK(cudaStreamSynchronize(stream));
    to_host(hy, dout, n * es);
    to_host(hrstd, drstd, rows * ss);
    if (ln) to_host(hmean, dmean, rows * ss);
    e = worst(hy, cs->dt, ry, n, t);
    CHECK(e <= 1.0, "op %d %s/%s B=%lld T=%lld C=%lld shift=%g: y error %.3g x tol", cs->op, dname(cs->dt), dname(cs->wdt),
          (long long)cs->B, (long long)cs->T, (long long)C, shift, e);
    if (fused) {
        to_host(hh, dh, n * es);
        for (i = 0; i < n; ++i)
            if (get(hh, cs->dt, i) != rh[i]) { CHECK(0, "h differs at %zu", i); break; }
    }
    for (r = 0; r < rows; ++r) {
        double gr = get(hrstd, sdt, r), em;
        const double rt = cs->dt == PN_FLOAT64 ? 1e-9 : 2e-5;
        CHECK(fabs(gr - rrstd[r]) <= rt * fabs(rrstd[r]), "rstd row %lld: %.9g vs %.9g", (long long)r, gr, rrstd[r]);
        if (ln) {
            em = fabs(get(hmean, sdt, r) - rmean[r]);
            CHECK(em <= 1e-6 * (fabs(rmean[r]) + scale), "mean row %lld: %.9g vs %.9g", (long long)r, get(hmean, sdt, r), rmean[r]);
        }
        if (failures > 20) break;
    }

    /* same bits when the buffers are misaligned / strided (scalar path) and on a repeat */
    {
        const int64_t pad = 1; /* rows start one element later: not 16-byte aligned */
        const int64_t ld = C + pad;
        size_t nn = (size_t)(rows * ld + pad);
        void *hx2 = calloc(nn, es), *hr2 = calloc(nn, es);
        for (r = 0; r < rows; ++r) {
            memcpy((char *)hx2 + (size_t)(r * ld + pad) * es, (char *)hx + (size_t)(r * C) * es, C * es);
            memcpy((char *)hr2 + (size_t)(r * ld + pad) * es, (char *)hr + (size_t)(r * C) * es, C * es);
        }
        dxo = dmalloc(nn * es); dyo = dmalloc(nn * es); ddxo = dmalloc(nn * es);
        void *dro = dmalloc(nn * es), *dho = dmalloc(nn * es);
        to_dev(dxo, hx2, nn * es);
        to_dev(dro, hr2, nn * es);
        memset(&st, 0, sizeof st);
        st.inp.b = cs->T * ld; st.inp.t = ld;
        st.out.b = cs->T * ld; st.out.t = ld;
        st.residual = st.inp; st.h = st.out;
        {
            void *xin = (char *)dxo + pad * es, *rin = (char *)dro + pad * es, *yo = (char *)dyo + pad * es, *ho = (char *)dho + pad * es;
            switch (cs->op) {
            case OP_LN: s = pn_cuda_layernorm_forward(yo, NULL, NULL, xin, cs->with_w ? dw : NULL, cs->with_w ? db : NULL,
                                                      cs->B, cs->T, C, eps, cs->dt, cs->wdt, &st, stream); break;
            case OP_ADD_LN: s = pn_cuda_add_layernorm_forward(yo, ho, NULL, NULL, xin, rin, cs->with_w ? dw : NULL,
                                                              cs->with_w ? db : NULL, cs->B, cs->T, C, eps, cs->dt, cs->wdt, &st, stream); break;
            case OP_RMS: s = pn_cuda_rmsnorm_forward(yo, NULL, xin, cs->with_w ? dw : NULL, cs->B, cs->T, C, eps,
                                                     cs->dt, cs->wdt, &st, stream); break;
            default: s = pn_cuda_add_rmsnorm_forward(yo, ho, NULL, xin, rin, cs->with_w ? dw : NULL, cs->B, cs->T, C, eps,
                                                     cs->dt, cs->wdt, &st, stream); break;
            }
        }
        CHECK(s == PN_OK, "strided forward status %d", s);
        CUDA_OK(cudaStreamSynchronize(stream));
        {
            void *hy3 = malloc(nn * es);
            to_host(hy3, dyo, nn * es);
            for (r = 0; r < rows; ++r)
                if (memcmp((char *)hy3 + (size_t)(r * ld + pad) * es, (char *)hy + (size_t)(r * C) * es, C * es) != 0) {
                    CHECK(0, "op %d %s C=%lld: strided/misaligned forward differs from aligned in row %lld", cs->op,
                          dname(cs->dt), (long long)C, (long long)r);
                    break;
                }
            free(hy3);
        }
        CUDA_OK(cudaFree(dro)); CUDA_OK(cudaFree(dho));
        free(hx2); free(hr2);
    }

    /* backward (from the forward's statistics; h plays x for fused ops) */
    {
        const void *xin = fused ? dh : dx_;
        double *xs = rh;
        if (ln) sbytes = pn_cuda_layernorm_backward_scratch_size(cs->B, cs->T, C, cs->dt);
        else sbytes = pn_cuda_rmsnorm_backward_scratch_size(cs->B, cs->T, C, cs->dt);
        CHECK(sbytes > 0, "scratch size");
        scratch = dmalloc(sbytes);
        /* reference from the GPU's statistics (as torch would get them) */
        for (c = 0; c < C; ++c) rdw[c] = rdb[c] = 0;
        for (r = 0; r < rows; ++r) {
            double mean = ln ? get(hmean, sdt, r) : 0.0, rstd = get(hrstd, sdt, r), s1 = 0, s2 = 0;
            for (c = 0; c < C; ++c) {
                size_t k = (size_t)(r * C + c);
                double xh = (xs[k] - mean) * rstd, dy = get(hdy, cs->dt, k), w = cs->with_w ? get(hw, cs->wdt, c) : 1.0;
                s1 += dy * w;
                s2 += dy * w * xh;
                rdw[c] += dy * xh;
                rdb[c] += dy;
            }
            for (c = 0; c < C; ++c) {
                size_t k = (size_t)(r * C + c);
                double xh = (xs[k] - mean) * rstd, dy = get(hdy, cs->dt, k), w = cs->with_w ? get(hw, cs->wdt, c) : 1.0;
                rdx[k] = ln ? rstd * (dy * w - s1 / C - xh * s2 / C) : rstd * (dy * w - xh * s2 / C);
            }
        }
        if (ln)
            s = pn_cuda_layernorm_backward(ddx, ddw, ddb, scratch, sbytes, dy_, xin, cs->with_w ? dw : NULL, dmean, drstd,
                                           cs->B, cs->T, C, 0, cs->dt, cs->wdt, NULL, stream);
        else
            s = pn_cuda_rmsnorm_backward(ddx, ddw, scratch, sbytes, dy_, xin, cs->with_w ? dw : NULL, drstd,
                                         cs->B, cs->T, C, 0, cs->dt, cs->wdt, NULL, stream);
        CHECK(s == PN_OK, "backward status %d (%s)", s, pn_cuda_status_string(s));
        CUDA_OK(cudaStreamSynchronize(stream));
        to_host(hdx, ddx, n * es);
        to_host(hdw, ddw, C * wes);
        to_host(hdb, ddb, C * wes);
        {
            double dxscale = 0, wscale = 0;
            for (i = 0; i < n; ++i) if (fabs(rdx[i]) > dxscale) dxscale = fabs(rdx[i]);
            e = 0;
            for (i = 0; i < n; ++i) {
                double d = fabs(get(hdx, cs->dt, i) - rdx[i]) / (4 * t * (dxscale + fabs(rdx[i]) + 1e-30));
                if (!(d <= e)) e = d;
            }
            CHECK(e <= 1.0, "op %d %s/%s C=%lld rows=%lld: dx error %.3g x tol", cs->op, dname(cs->dt), dname(cs->wdt),
                  (long long)C, (long long)rows, e);
            for (c = 0; c < C; ++c) if (fabs(rdw[c]) > wscale) wscale = fabs(rdw[c]);
            e = 0;
            for (c = 0; c < C; ++c) {
                double d = fabs(get(hdw, cs->wdt, c) - rdw[c]) / (4 * tol(cs->wdt) * (wscale + sqrt((double)rows)));
                if (!(d <= e)) e = d;
                if (ln) {
                    d = fabs(get(hdb, cs->wdt, c) - rdb[c]) / (4 * tol(cs->wdt) * (fabs(rdb[c]) + sqrt((double)rows)));
                    if (!(d <= e)) e = d;
                }
            }
            CHECK(e <= 1.0, "op %d %s/%s C=%lld rows=%lld: dweight/dbias error %.3g x tol", cs->op, dname(cs->dt),
                  dname(cs->wdt), (long long)C, (long long)rows, e);
        }
        /* repeat: same bits; accumulate: dx + dx, dw + dw */
        {
            void *hdw2 = malloc(C * wes);
            if (ln)
                s = pn_cuda_layernorm_backward(ddx, ddw, ddb, scratch, sbytes, dy_, xin, cs->with_w ? dw : NULL, dmean, drstd,
                                               cs->B, cs->T, C, 0, cs->dt, cs->wdt, NULL, stream);
            else
                s = pn_cuda_rmsnorm_backward(ddx, ddw, scratch, sbytes, dy_, xin, cs->with_w ? dw : NULL, drstd,
                                             cs->B, cs->T, C, 0, cs->dt, cs->wdt, NULL, stream);
            CUDA_OK(cudaStreamSynchronize(stream));
            to_host(hdx2, ddx, n * es);
            to_host(hdw2, ddw, C * wes);
            CHECK(memcmp(hdx2, hdx, n * es) == 0 && memcmp(hdw2, hdw, C * wes) == 0, "backward repeat differs (C=%lld)", (long long)C);
            if (ln)
                s = pn_cuda_layernorm_backward(ddx, ddw, ddb, scratch, sbytes, dy_, xin, cs->with_w ? dw : NULL, dmean, drstd,
                                               cs->B, cs->T, C, PN_ACCUMULATE, cs->dt, cs->wdt, NULL, stream);
            else
                s = pn_cuda_rmsnorm_backward(ddx, ddw, scratch, sbytes, dy_, xin, cs->with_w ? dw : NULL, drstd,
                                             cs->B, cs->T, C, PN_ACCUMULATE, cs->dt, cs->wdt, NULL, stream);
            CHECK(s == PN_OK, "accumulate status %d", s);
            CUDA_OK(cudaStreamSynchronize(stream));
            to_host(hdx2, ddx, n * es);
            to_host(hdw2, ddw, C * wes);
            for (i = 0; i < n; ++i) {
                double want = round_to(cs->dt, 2.0 * get(hdx, cs->dt, i));
                if (get(hdx2, cs->dt, i) != want) { CHECK(0, "accumulated dx %zu: %g vs %g", i, get(hdx2, cs->dt, i), want); break; }
            }
            for (c = 0; c < C; ++c) {
                double want = round_to(cs->wdt, 2.0 * get(hdw, cs->wdt, c));
                if (get(hdw2, cs->wdt, c) != want) { CHECK(0, "accumulated dweight %lld", (long long)c); break; }
            }
            free(hdw2);
        }
        /* the same from misaligned/strided x, dy, dx: same bits */
        {
            const int64_t pad = 1, ld = C + pad;
            size_t nn = (size_t)(rows * ld + pad);
            void *hx2 = calloc(nn, es), *hg2 = calloc(nn, es), *hdx3 = malloc(nn * es), *hdw3 = malloc(C * wes);
            void *dg2 = dmalloc(nn * es);
            void *hxs = malloc(n * es);
            to_host(hxs, xin, n * es);
            for (r = 0; r < rows; ++r) {
                memcpy((char *)hx2 + (size_t)(r * ld + pad) * es, (char *)hxs + (size_t)(r * C) * es, C * es);
                memcpy((char *)hg2 + (size_t)(r * ld + pad) * es, (char *)hdy + (size_t)(r * C) * es, C * es);
            }
            to_dev(dxo, hx2, nn * es);
            to_dev(dg2, hg2, nn * es);
            memset(&st, 0, sizeof st);
            st.inp.b = cs->T * ld; st.inp.t = ld;
            st.dout = st.inp; st.dinp = st.inp;
            if (ln)
                s = pn_cuda_layernorm_backward((char *)ddxo + pad * es, ddw, ddb, scratch, sbytes, (char *)dg2 + pad * es,
                                               (char *)dxo + pad * es, cs->with_w ? dw : NULL, dmean, drstd,
                                               cs->B, cs->T, C, 0, cs->dt, cs->wdt, &st, stream);
            else
                s = pn_cuda_rmsnorm_backward((char *)ddxo + pad * es, ddw, scratch, sbytes, (char *)dg2 + pad * es,
                                             (char *)dxo + pad * es, cs->with_w ? dw : NULL, drstd,
                                             cs->B, cs->T, C, 0, cs->dt, cs->wdt, &st, stream);
            CHECK(s == PN_OK, "strided backward status %d", s);
            CUDA_OK(cudaStreamSynchronize(stream));
            to_host(hdx3, ddxo, nn * es);
            to_host(hdw3, ddw, C * wes);
            for (r = 0; r < rows; ++r)
                if (memcmp((char *)hdx3 + (size_t)(r * ld + pad) * es, (char *)hdx + (size_t)(r * C) * es, C * es) != 0) {
                    CHECK(0, "op %d %s C=%lld: strided backward dx differs in row %lld", cs->op, dname(cs->dt), (long long)C,
                          (long long)r);
                    break;
                }
            CHECK(memcmp(hdw3, hdw, C * wes) == 0, "strided backward dweight differs (C=%lld)", (long long)C);
            CUDA_OK(cudaFree(dg2));
            free(hx2); free(hg2); free(hdx3); free(hdw3); free(hxs);
        }
        CUDA_OK(cudaFree(scratch));
    }

    CUDA_OK(cudaFree(dx_)); CUDA_OK(cudaFree(dr)); CUDA_OK(cudaFree(dy_)); CUDA_OK(cudaFree(dw)); CUDA_OK(cudaFree(db));
    CUDA_OK(cudaFree(dout)); CUDA_OK(cudaFree(dh)); CUDA_OK(cudaFree(dmean)); CUDA_OK(cudaFree(drstd));
    CUDA_OK(cudaFree(ddx)); CUDA_OK(cudaFree(ddw)); CUDA_OK(cudaFree(ddb));
    CUDA_OK(cudaFree(dxo)); CUDA_OK(cudaFree(dyo)); CUDA_OK(cudaFree(ddxo));
    free(hx); free(hr); free(hdy); free(hw); free(hb); free(hy); free(hh); free(hdx); free(hdw); free(hdb);
    free(hmean); free(hrstd); free(hdx2);
    free(rh); free(ry); free(rdx); free(rdw); free(rdb); free(rmean); free(rrstd);
}

/* A hostile row: mean 1e4, std 1e-2 (float32). pynorm must stay far more
 * accurate than a float32 mean allows (DESIGN.md section 5). */
static void test_hostile(cudaStream_t stream)
{
    const int64_t C = 4096, rows = 3;
    const size_t n = (size_t)(rows * C);
    float *hx = malloc(n * 4), *hy = malloc(n * 4);
    double worst_err = 0;
    void *dxp = dmalloc(n * 4), *dyp = dmalloc(n * 4);
    int64_t r, c;
    int s;
    for (size_t i = 0; i < n; ++i) hx[i] = (float)(1e4 + 1e-2 * urand() * 1.7320508);
    to_dev(dxp, hx, n * 4);
    s = pn_cuda_layernorm_forward(dyp, NULL, NULL, dxp, NULL, NULL, rows, 1, C, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL, stream);
    CHECK(s == PN_OK, "hostile status %d", s);
    CUDA_OK(cudaStreamSynchronize(stream));
    to_host(hy, dyp, n * 4);
    for (r = 0; r < rows; ++r) {
        double m = 0, v = 0;
        for (c = 0; c < C; ++c) m += hx[r * C + c];
        m /= C;
        for (c = 0; c < C; ++c) v += (hx[r * C + c] - m) * (hx[r * C + c] - m);
        v /= C;
        for (c = 0; c < C; ++c) {
            double ref = (hx[r * C + c] - m) / sqrt(v + 1e-5), e = fabs(hy[r * C + c] - ref);
            if (e > worst_err) worst_err = e;
        }
    }
    /* torch float32 loses about 3e-2 here; ask for 3e-3 */
    CHECK(worst_err < 3e-3, "hostile rows: max abs error %.3g", worst_err);
    CUDA_OK(cudaFree(dxp)); CUDA_OK(cudaFree(dyp));
    free(hx); free(hy);
}

/* ------------------------------------------------------------------------ */
/* 4. spatial norms against a double reference (GroupNorm and BatchNorm in   */
/*    training, forward and backward), both layouts, repeated runs bit-equal. */

/* offset of (n, c, s) in the layout */
static size_t sp_off(int nhwc, int64_t N, int64_t C, int64_t S, int64_t n, int64_t c, int64_t s)
{
    (void)N;
    return (size_t)(nhwc ? (n * S + s) * C + c : (n * C + c) * S + s);
}

/* op 0: GroupNorm with G groups; op 1: BatchNorm (training, running stats updated) */
static void run_spatial(int op, int64_t N, int64_t C, int64_t S, int64_t G, pn_dtype dt, int nhwc, cudaStream_t stream)
{
    const int64_t n = N * C * S, sets = op == 0 ? N * G : C, per = op == 0 ? (C / G) * S : N * S;
    const size_t es = esize(dt), ss = dt == PN_FLOAT64 ? 8 : 4;
    const pn_layout lay = nhwc ? PN_NHWC : PN_NCHW;
    unsigned char *hx = malloc((size_t)n * es), *hdy = malloc((size_t)n * es), *hw = malloc((size_t)C * es);
    unsigned char *hb = malloc((size_t)C * es), *hy = malloc((size_t)n * es), *hdx = malloc((size_t)n * es);
    unsigned char *hy2 = malloc((size_t)n * es), *hdw = malloc((size_t)C * es), *hdb = malloc((size_t)C * es);
    unsigned char *hrm = malloc((size_t)C * 4), *hrv = malloc((size_t)C * 4);
    double *ry = malloc(sizeof(double) * (size_t)n), *rdx = malloc(sizeof(double) * (size_t)n);
    double *rdw = calloc((size_t)C, sizeof(double)), *rdb = calloc((size_t)C, sizeof(double));
    double *rdwa = calloc((size_t)C, sizeof(double)), *rdba = calloc((size_t)C, sizeof(double));
    double *rrm = malloc(sizeof(double) * (size_t)C), *rrv = malloc(sizeof(double) * (size_t)C);
    void *dx_ = dmalloc((size_t)n * es), *ddy = dmalloc((size_t)n * es), *dw = dmalloc((size_t)C * es);
    void *db = dmalloc((size_t)C * es), *dy_ = dmalloc((size_t)n * es), *ddx = dmalloc((size_t)n * es);
    void *dmean = dmalloc((size_t)sets * ss), *drstd = dmalloc((size_t)sets * ss);
    void *ddw = dmalloc((size_t)C * es), *ddb = dmalloc((size_t)C * es), *drm = dmalloc((size_t)C * 4), *drv = dmalloc((size_t)C * 4);
    size_t need = op == 0 ? pn_cuda_groupnorm_backward_scratch_size(N, C, S, G, lay, dt)
                          : pn_cuda_batchnorm_backward_scratch_size(N, C, S, lay, dt);
    void *scr = dmalloc(need);
    int64_t i, k, c, s2, nn;
    int st;
    double e;
    const double eps = 1e-5, mom = 0.25;
    char what[160];
    snprintf(what, sizeof what, "%s N=%lld C=%lld S=%lld G=%lld %s %s", op == 0 ? "groupnorm" : "batchnorm",
             (long long)N, (long long)C, (long long)S, (long long)G, dname(dt), nhwc ? "NHWC" : "NCHW");
    for (i = 0; i < n; ++i) { put(hx, dt, (size_t)i, 3.0 + 2.0 * urand()); put(hdy, dt, (size_t)i, urand()); }
    for (c = 0; c < C; ++c) {
        put(hw, dt, (size_t)c, 1.0 + 0.5 * urand()); put(hb, dt, (size_t)c, urand());
        put(hrm, PN_FLOAT32, (size_t)c, 0.1 * urand()); put(hrv, PN_FLOAT32, (size_t)c, 1.0 + 0.5 * urand());
    }
    /* reference: per set, mean and variance in double; then y, dx, dweight, dbias */
    for (k = 0; k < sets; ++k) {
        double m = 0, v = 0, sg = 0, sgx = 0, rs;
        int64_t cnt = 0;
        for (nn = 0; nn < N; ++nn)
            for (c = 0; c < C; ++c)
                for (s2 = 0; s2 < S; ++s2) {
                    if (op == 0 ? (nn * G + c / (C / G)) != k : c != k) continue;
                    m += get(hx, dt, sp_off(nhwc, N, C, S, nn, c, s2));
                    ++cnt;
                }
        m /= (double)cnt;
        for (nn = 0; nn < N; ++nn)
            for (c = 0; c < C; ++c)
                for (s2 = 0; s2 < S; ++s2) {
                    size_t o = sp_off(nhwc, N, C, S, nn, c, s2);
                    double d, g;
                    if (op == 0 ? (nn * G + c / (C / G)) != k : c != k) continue;
                    d = get(hx, dt, o) - m;
                    v += d * d;
                    g = get(hdy, dt, o) * get(hw, dt, (size_t)c);
                    sg += g;
                    sgx += g * d;
                }
        v /= (double)per;
        rs = 1.0 / sqrt(v + eps);
        if (op == 1) {
            rrm[k] = (1 - mom) * get(hrm, PN_FLOAT32, (size_t)k) + mom * m;
            rrv[k] = (1 - mom) * get(hrv, PN_FLOAT32, (size_t)k) + mom * v * (double)per / (double)(per - 1);
        }
        for (nn = 0; nn < N; ++nn)
            for (c = 0; c < C; ++c)
                for (s2 = 0; s2 < S; ++s2) {
                    size_t o = sp_off(nhwc, N, C, S, nn, c, s2);
                    double xh, g, dyv;
                    if (op == 0 ? (nn * G + c / (C / G)) != k : c != k) continue;
                    xh = (get(hx, dt, o) - m) * rs;
                    dyv = get(hdy, dt, o);
                    g = dyv * get(hw, dt, (size_t)c);
                    ry[o] = xh * get(hw, dt, (size_t)c) + get(hb, dt, (size_t)c);
                    rdx[o] = rs * (g - sg / (double)per - xh * sgx * rs / (double)per);
                    rdw[c] += dyv * xh; rdb[c] += dyv;
                    rdwa[c] += fabs(dyv * xh); rdba[c] += fabs(dyv);
                }
    }
    to_dev(dx_, hx, (size_t)n * es); to_dev(ddy, hdy, (size_t)n * es);
    to_dev(dw, hw, (size_t)C * es); to_dev(db, hb, (size_t)C * es);
    to_dev(drm, hrm, (size_t)C * 4); to_dev(drv, hrv, (size_t)C * 4);
    if (op == 0)
        st = pn_cuda_groupnorm_forward(dy_, dmean, drstd, dx_, dw, db, N, C, S, G, eps, lay, dt, dt, stream);
    else
        st = pn_cuda_batchnorm_forward(dy_, dmean, drstd, drm, drv, dx_, dw, db, N, C, S, eps, mom, 0, PN_BN_TRAINING,
                                       lay, dt, dt, PN_FLOAT32, stream);
    CHECK(st == PN_OK, "%s forward: status %d", what, st);
    if (op == 0)
        st = pn_cuda_groupnorm_backward(ddx, ddw, ddb, scr, need, ddy, dx_, dw, dmean, drstd, N, C, S, G, 0, lay, dt, dt, stream);
    else
        st = pn_cuda_batchnorm_backward(ddx, ddw, ddb, scr, need, ddy, dx_, dw, dmean, drstd, N, C, S, PN_BN_TRAINING,
                                        lay, dt, dt, stream);
    CHECK(st == PN_OK, "%s backward: status %d", what, st);
    CUDA_OK(cudaStreamSynchronize(stream));
    to_host(hy, dy_, (size_t)n * es); to_host(hdx, ddx, (size_t)n * es);
    to_host(hdw, ddw, (size_t)C * es); to_host(hdb, ddb, (size_t)C * es);
    e = worst(hy, dt, ry, (size_t)n, 4 * tol(dt));
    CHECK(e <= 1.0, "%s: y error %.3g tolerances", what, e);
    e = worst(hdx, dt, rdx, (size_t)n, 4 * tol(dt));
    CHECK(e <= 1.0, "%s: dx error %.3g tolerances", what, e);
    for (c = 0; c < C; ++c) {   /* parameter gradients: relative to the sums of |terms| */
        double ew = fabs(get(hdw, dt, (size_t)c) - rdw[c]) / (4 * tol(dt) * (1 + rdwa[c]));
        double eb = fabs(get(hdb, dt, (size_t)c) - rdb[c]) / (4 * tol(dt) * (1 + rdba[c]));
        CHECK(ew <= 1.0 && eb <= 1.0, "%s: dweight/dbias[%lld] errors %.3g %.3g tolerances", what, (long long)c, ew, eb);
        if (failures > 20) break;
    }
    if (op == 1) {
        to_host(hrm, drm, (size_t)C * 4); to_host(hrv, drv, (size_t)C * 4);
        e = worst(hrm, PN_FLOAT32, rrm, (size_t)C, 4 * tol(PN_FLOAT32) + 4 * tol(dt));
        CHECK(e <= 1.0, "%s: running_mean error %.3g tolerances", what, e);
        e = worst(hrv, PN_FLOAT32, rrv, (size_t)C, 4 * tol(PN_FLOAT32) + 4 * tol(dt));
        CHECK(e <= 1.0, "%s: running_var error %.3g tolerances", what, e);
    }
    /* a second forward (GroupNorm; BatchNorm in eval, which leaves the running stats): same bits */
    if (op == 0) {
        st = pn_cuda_groupnorm_forward(dy_, dmean, drstd, dx_, dw, db, N, C, S, G, eps, lay, dt, dt, stream);
        CUDA_OK(cudaStreamSynchronize(stream));
        to_host(hy2, dy_, (size_t)n * es);
        CHECK(st == PN_OK && memcmp(hy, hy2, (size_t)n * es) == 0, "%s: repeated forward differs", what);
    }
    CUDA_OK(cudaFree(dx_)); CUDA_OK(cudaFree(ddy)); CUDA_OK(cudaFree(dw)); CUDA_OK(cudaFree(db));
    CUDA_OK(cudaFree(dy_)); CUDA_OK(cudaFree(ddx)); CUDA_OK(cudaFree(dmean)); CUDA_OK(cudaFree(drstd));
    CUDA_OK(cudaFree(ddw)); CUDA_OK(cudaFree(ddb)); CUDA_OK(cudaFree(drm)); CUDA_OK(cudaFree(drv)); CUDA_OK(cudaFree(scr));
    free(hx); free(hdy); free(hw); free(hb); free(hy); free(hdx); free(hy2); free(hdw); free(hdb); free(hrm); free(hrv);
    free(ry); free(rdx); free(rdw); free(rdb); free(rdwa); free(rdba); free(rrm); free(rrv);
}

int main(void)
{
    static const int64_t Cs[] = {1, 3, 7, 64, 255, 256, 257, 768, 1000, 1024, 1025, 2048, 4097, 8192, 8193, 16384, 16385, 65536};
    static const pn_dtype dts[] = {PN_FLOAT32, PN_FLOAT16, PN_BFLOAT16, PN_FLOAT64};
    cudaStream_t stream;
    int ndev, ci, di, op, wv;

    test_args();
    if (failures) {
        fprintf(stderr, "%d argument-check failures\n", failures);
        return 1;
    }
    ndev = pn_cuda_device_count();
    if (ndev == 0) {
        printf("SKIP: no usable CUDA device (argument checks passed)\n");
        return 77;
    }
    CUDA_OK(cudaStreamCreate(&stream));
    for (ci = 0; ci < (int)(sizeof Cs / sizeof Cs[0]); ++ci)
        for (di = 0; di < 4; ++di)
            for (op = 0; op < 4; ++op)
                for (wv = 0; wv < 3; ++wv) {
                    Case cs;
                    cs.C = Cs[ci];
                    cs.dt = dts[di];
                    cs.op = op;
                    cs.with_w = wv != 0;
                    cs.wdt = (wv == 2) ? PN_FLOAT32 : cs.dt;
                    if (wv == 2 && cs.dt == PN_FLOAT32) continue;
                    cs.B = cs.C >= 16384 ? 3 : 5;
                    cs.T = cs.C >= 16384 ? 1 : 7;
                    run_case(&cs, stream, (op & 1) ? 0.0 : 3.0, 2.0);
                    if (failures > 20) goto done;
                }
    /* many rows: partitions of several rows each */
    {
        Case cs = {301, 7, 768, PN_BFLOAT16, PN_BFLOAT16, OP_LN, 1};
        run_case(&cs, stream, 1.0, 1.0);
        cs.op = OP_RMS; cs.C = 4096; cs.B = 257; cs.T = 3; cs.dt = PN_FLOAT32; cs.wdt = PN_FLOAT32;
        run_case(&cs, stream, 0.0, 1.0);
    }
    test_hostile(stream);
    {   /* spatial norms: (N, C, S, G), both layouts, every dtype */
        static const int64_t sp[][4] = {{3, 8, 1, 2}, {2, 6, 49, 6}, {3, 32, 100, 8}, {2, 4, 4100, 1}, {5, 3, 700, 3}};
        int t, lay2;
        for (t = 0; t < (int)(sizeof sp / sizeof sp[0]); ++t)
            for (di = 0; di < 4; ++di)
                for (lay2 = 0; lay2 < 2; ++lay2) {
                    run_spatial(0, sp[t][0], sp[t][1], sp[t][2], sp[t][3], dts[di], lay2, stream);
                    run_spatial(1, sp[t][0], sp[t][1], sp[t][2], 1, dts[di], lay2, stream);
                    if (failures > 20) goto done;
                }
    }
done:
    CUDA_OK(cudaStreamDestroy(stream));
    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("ok: libpynorm_cuda %s on %d device(s)\n", pn_cuda_version(), ndev);
    return 0;
}
