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
 * RMSNorm has no bias (b NULL); LayerNorm always adds one (zeros when
 * absent), so its bits do not depend on whether a bias was given. Included by
 * kernel.h. */
#ifndef PYNORM_EPILOGUE_H
#define PYNORM_EPILOGUE_H

typedef struct {
    const real *w, *b;      /* w' (offset added) and b, C values each; b NULL: none */
    pn_dtype dt;            /* the data's dtype */
    int llama;              /* PN_ROUND_LLAMA on data narrower than `real` */
} pn_epilogue;

static inline pn_epilogue pn_epilogue_init(const pn_token_args *a, const pn_work *wk, int bias) {
    pn_epilogue e = {wk->w, bias ? wk->b : NULL, a->dtype, a->llama && a->dtype != PN_REAL_DTYPE};
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

/* y[0..n) holds xhat of columns [i0, i0 + n): make it y. */
static PN_ALWAYS_INLINE void pn_epilogue_apply(const pn_epilogue *e, real *y, int64_t i0, int64_t n) {
    const real *w = e->w + i0;
    if (e->llama) pn_round_to_dtype(y, e->dt, n);
    if (e->b) {
        const real *b = e->b + i0;
        for (int64_t i = 0; i < n; i++) y[i] = y[i] * w[i] + b[i];
    } else {
        for (int64_t i = 0; i < n; i++) y[i] = y[i] * w[i];
    }
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
        const real *w_ = e_->w + (i0);                                                   \
        if (e_->llama) {                                                                 \
            for (int64_t i = 0; i < (n); i++) y_[i] = (XHAT);                            \
            pn_epilogue_apply(e_, y_, (i0), (n));                                        \
        } else if (e_->b) {                                                              \
            const real *b_ = e_->b + (i0);                                               \
            for (int64_t i = 0; i < (n); i++) y_[i] = (XHAT) * w_[i] + b_[i];            \
        } else {                                                                         \
            for (int64_t i = 0; i < (n); i++) y_[i] = (XHAT) * w_[i];                    \
        }                                                                                \
    } while (0)

#endif /* PYNORM_EPILOGUE_H */
