/* epilogue.h - the end of a token norm's forward, per element, shared by
 * LayerNorm and RMSNorm: from xhat (the normalized row, (x - mean) * rstd or
 * x * rstd) to the y that is stored,
 *
 *   y = xhat * w' + b,   w' = weight_offset + weight (pn_work folds it once per call),
 *
 * in the compute type `real`, with the rounding mode of the call:
 *   PN_ROUND_ONCE:  y is rounded to the dtype once, when stored;
 *   PN_ROUND_LLAMA: xhat is rounded to the dtype first (Hugging Face
 *                   LlamaRMSNorm: `weight * hidden.to(dtype)`), then y as above,
 *                   rounded again when stored. For float32/float64 data,
 *                   rounding to the dtype changes nothing: both modes agree.
 * RMSNorm has no bias; LayerNorm always adds one (zeros when absent), so
 * its bits do not depend on whether a bias was given: without a weight the
 * loops leave out the product by 1 (exact), and without a bias they add a
 * constant 0 (which, unlike leaving it out, turns -0 into +0 as adding a
 * row of zeros does), so no row of ones or zeros is written per call. The
 * quantized output (pn_quantize_row) takes the row's y from here. Included by
 * kernel.h. */
#ifndef PYNORM_EPILOGUE_H
#define PYNORM_EPILOGUE_H

typedef struct {
    const real *w, *b;      /* w' (offset added) and b, C values each; NULL: ones, zeros */
    int bias;               /* a bias is added (LayerNorm), b or zeros */
    pn_dtype dt;            /* the data's dtype */
    int llama;              /* PN_ROUND_LLAMA on data narrower than `real` */
} pn_epilogue;

static inline pn_epilogue pn_epilogue_init(const pn_token_args *a, const pn_work *wk, int bias) {
    pn_epilogue e = {wk->w, bias ? wk->b : NULL, bias, a->dtype, a->llama && a->dtype != PN_REAL_DTYPE};
    return e;
}

/* v[i] = v[i] rounded to dtype dt, as real, for n <= PN_PIECE values. */
static inline void pn_round_to_dtype(real *v, pn_dtype dt, int64_t n) {
    uint16_t t[256];
    for (int64_t i0 = 0; i0 < n; i0 += 256) {
        const int64_t k = n - i0 < 256 ? n - i0 : 256;
        pn_store_row(t, v + i0, dt, k);
        pn_load_row(v + i0, t, dt, k);
    }
}

/* y[i] = XHAT * w'[i] + b[i] for i in [0, n) (columns i0 + i), XHAT an
 * expression of i, in the loop for the weight and bias the call has: no
 * weight multiplies by nothing (x * 1 is x), no bias of LayerNorm adds 0. */
#define PN_EPILOGUE_WB(e, y, i0, n, XHAT)                                                \
    do {                                                                                 \
        const real *w_ = (e)->w ? (e)->w + (i0) : NULL;                                  \
        const real *b_ = (e)->b ? (e)->b + (i0) : NULL;                                  \
        if (w_ && b_)                                                                    \
            for (int64_t i = 0; i < (n); i++) (y)[i] = (XHAT) * w_[i] + b_[i];           \
        else if (w_ && (e)->bias)                                                        \
            for (int64_t i = 0; i < (n); i++) (y)[i] = (XHAT) * w_[i] + (real)0;         \
        else if (w_)                                                                     \
            for (int64_t i = 0; i < (n); i++) (y)[i] = (XHAT) * w_[i];                   \
        else if (b_)                                                                     \
            for (int64_t i = 0; i < (n); i++) (y)[i] = (XHAT) + b_[i];                   \
        else if ((e)->bias)                                                              \
            for (int64_t i = 0; i < (n); i++) (y)[i] = (XHAT) + (real)0;                 \
        else                                                                             \
            for (int64_t i = 0; i < (n); i++) (y)[i] = (XHAT);                           \
    } while (0)

/* y[0..n) holds xhat of columns [i0, i0 + n): make it y. */
static PN_ALWAYS_INLINE void pn_epilogue_apply(const pn_epilogue *e, real *y, int64_t i0, int64_t n) {
    if (e->llama) pn_round_to_dtype(y, e->dt, n);
    PN_EPILOGUE_WB(e, y, i0, n, y[i]);
}

/* y[i] for i in [0, n) (columns i0 + i) from XHAT, an expression of i giving
 * xhat: in one loop where xhat is not rounded (the common case: as fast as a
 * norm without the epilogue), else xhat first, then pn_epilogue_apply. The
 * bits are the same either way: without FMA contraction, xhat * w + b rounds
 * xhat, the product and the sum each once in `real`. */
#define PN_EPILOGUE_LOOP(e, y, i0, n, XHAT)                                              \
    do {                                                                                 \
        const pn_epilogue *e_ = (e);                                                     \
        real *y_ = (y);                                                                  \
        if (e_->llama) {                                                                 \
            for (int64_t i = 0; i < (n); i++) y_[i] = (XHAT);                            \
            pn_epilogue_apply(e_, y_, (i0), (n));                                        \
        } else {                                                                         \
            PN_EPILOGUE_WB(e_, y_, i0, n, XHAT);                                         \
        }                                                                                \
    } while (0)

/* ---- quantized output (pn_*_quant_forward): y of a whole row -> q, scales ----
 * See pynorm.h for the semantics; y is taken as float32. */

/* int8: round half to even (the default rounding mode), saturated; NaN -> 0. */
static inline int8_t pn_q_int8(float t) {
    if (t != t) return 0;
    if (t >= 127.0f) return 127;
    if (t <= -128.0f) return -128;
    return (int8_t)nearbyintf(t);
}

/* float8 e4m3fn bits: clamped to +-448, rounded to nearest even; NaN -> 0x7f.
 * Normal values are 1.mmm * 2^(e - 7) (e = 1..15, 448 = 1.75 * 2^8 the
 * largest), subnormals m * 2^-9. A normal value is the float32's bits with the
 * 20 low mantissa bits rounded off (half to even; a carry into the exponent
 * is right, and cannot pass 448, which the clamp leaves exact). */
static inline uint8_t pn_q_e4m3(float t) {
    if (t != t) return 0x7f;
    const uint8_t sign = signbit(t) ? 0x80 : 0;   /* -0 stays -0 */
    float v = fabsf(t);
    if (v > 448.0f) v = 448.0f;
    if (v < 0.015625f)                            /* below 2^-6: subnormal (or zero) */
        return (uint8_t)(sign | (uint8_t)nearbyintf(v * 512.0f));   /* 8 rounds up to the smallest normal */
    uint32_t u = pn_float_to_bits(v);
    u += 0x7ffffu + ((u >> 20) & 1u);
    return (uint8_t)(sign | ((((u >> 23) - 120u) << 3) | ((u >> 20) & 7u)));   /* exponent: 127 - 7 */
}

/* Row r's y (C reals) quantized into a->q (and its scales into a->qscales). */
static inline void pn_quantize_row(const pn_token_args *a, int64_t r, const real *y) {
    const int64_t C = a->C;
    const int64_t G = a->qscale != 0 ? C : a->qgroup;
    const float qmax = a->qfp8 ? 448.0f : 127.0f;
    const float min_scale = a->qfp8 ? 1.0f / (448.0f * 512.0f) : 1.1920928955078125e-7f;
    uint8_t *q = (uint8_t *)a->q + r * C;
    for (int64_t g0 = 0; g0 < C; g0 += G) {
        float s = a->qscale;
        if (s == 0) {                                        /* dynamic */
            float amax = 0;
            int nan = 0;
            for (int64_t i = g0; i < g0 + G; i++) {
                const float v = fabsf((float)y[i]);
                nan |= v != v;
                amax = v > amax ? v : amax;
            }
            if (nan) amax = NAN;
            else if (a->qscale_ub > 0 && amax > a->qscale_ub) amax = a->qscale_ub;
            s = amax / qmax;
            if (s < min_scale) s = min_scale;                /* NaN stays NaN */
            a->qscales[r * (C / G) + g0 / G] = s;
        }
        if (a->qfp8)
            for (int64_t i = g0; i < g0 + G; i++) q[i] = pn_q_e4m3((float)y[i] / s);
        else
            for (int64_t i = g0; i < g0 + G; i++) q[i] = (uint8_t)pn_q_int8((float)y[i] / s);
    }
}

#endif /* PYNORM_EPILOGUE_H */
