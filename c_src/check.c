/* check.c - argument checks shared by every public function. They run before a
 * kernel starts, so a rejected call writes nothing. */
#include "common.h"

/* a * b into *out, or 0 when it overflows int64. */
static int mul_ok(int64_t a, int64_t b, int64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}

pn_status pn_check_sizes(int64_t B, int64_t T, int64_t C, pn_dtype dtype) {
    int64_t rows, n, bytes;
    if (B <= 0 || T <= 0 || C <= 0) return PN_ERR_SIZE;
    if (!mul_ok(B, T, &rows) || !mul_ok(rows, C, &n) ||
        !mul_ok(n, (int64_t)pn_dtype_size(dtype), &bytes) || (uint64_t)bytes > (uint64_t)SIZE_MAX)
        return PN_ERR_SIZE;
    /* Row buffers hold C doubles plus padding per thread. */
    if (C > INT64_MAX / 64) return PN_ERR_SIZE;
    return PN_OK;
}

static int dtype_ok(pn_dtype dt) {
    return dt == PN_FLOAT32 || dt == PN_FLOAT16 || dt == PN_BFLOAT16 || dt == PN_FLOAT64;
}

pn_status pn_check_dtypes(pn_dtype dtype, pn_dtype wdtype) {
    if (!dtype_ok(dtype) || !dtype_ok(wdtype)) return PN_ERR_DTYPE;
    if (wdtype != dtype && wdtype != PN_FLOAT32) return PN_ERR_DTYPE;
    return PN_OK;
}

pn_status pn_check_eps(double eps) {
    return (eps >= 0 && isfinite(eps)) ? PN_OK : PN_ERR_EPS;   /* NaN fails eps >= 0 */
}

static pn_rowmap resolve(pn_rows s, int64_t head, int64_t T, int64_t H, int64_t C) {
    pn_rowmap m = {s.b, s.t, H > 1 ? head : 0, H};
    if (s.b == 0 && s.t == 0) { m.b = T * H * C; m.t = H * C; m.h = C; }
    return m;
}

pn_rowmaps pn_resolve_all(const pn_strides *s, const pn_head_strides *head, int64_t T, int64_t H, int64_t C) {
    pn_strides r;
    pn_head_strides hd;
    memset(&r, 0, sizeof r);
    memset(&hd, 0, sizeof hd);
    if (s) r = *s;
    if (head && H > 1) hd = *head;
    pn_rowmaps m = {resolve(r.inp, hd.inp, T, H, C), resolve(r.out, hd.out, T, H, C),
                    resolve(r.residual, hd.residual, T, H, C), resolve(r.h, hd.h, T, H, C),
                    resolve(r.dout, hd.dout, T, H, C), resolve(r.dinp, hd.dinp, T, H, C)};
    return m;
}

/* A view with a third axis of rows: nh rows sh elements apart (token norms
 * over heads); nh = 1 for every other view. */
typedef struct {
    pn_view v;
    int64_t nh, sh;
} pn_view3;

/* Byte range [lo, hi) a view covers; 0 when its extent overflows. */
static inline int view_extent(const pn_view3 *w, uintptr_t *lo, uintptr_t *hi) {
    const pn_view *v = &w->v;
    if (v->nb == 1 && v->nt == 1 && w->nh == 1) {   /* one row (every view of a one-row call): [ptr, ptr + C) */
        int64_t bytes;
        if (v->C < 0 || !mul_ok(v->C, (int64_t)v->esize, &bytes)) return 0;
        *lo = (uintptr_t)v->ptr;
        *hi = (uintptr_t)v->ptr + (uintptr_t)bytes;
        return 1;
    }
    const int64_t n[3] = {v->nb, v->nt, w->nh}, s[3] = {v->s.b, v->s.t, w->sh};
    int64_t span_lo = 0, span_hi = 0, e = (int64_t)v->esize, bytes_lo, bytes_hi;
    for (int k = 0; k < 3; k++) {
        int64_t ek;
        if (!mul_ok(n[k] - 1, s[k], &ek)) return 0;
        if (__builtin_add_overflow(span_lo, ek < 0 ? ek : 0, &span_lo) ||
            __builtin_add_overflow(span_hi, ek > 0 ? ek : 0, &span_hi))
            return 0;
    }
    if (v->C < 0 || span_hi > INT64_MAX - v->C) return 0;
    if (!mul_ok(span_lo, e, &bytes_lo) || !mul_ok(span_hi + v->C, e, &bytes_hi)) return 0;
    *lo = (uintptr_t)v->ptr + (uintptr_t)bytes_lo;  /* wraps correctly for negative spans */
    *hi = (uintptr_t)v->ptr + (uintptr_t)bytes_hi;
    return 1;
}

/* Rows of an output must not overlap each other (two threads would write the
 * same element). A sufficient test, exact for the layouts slicing produces:
 * taken by increasing |stride| over the axes of more than one row, each
 * stride clears the whole run of rows along the smaller ones. */
static uint64_t uabs(int64_t v) { return v < 0 ? 0 - (uint64_t)v : (uint64_t)v; }

/* Called after view_extent() succeeded, so each (n-1)*|s| and their sum fit in int64. */
static int rows_disjoint(const pn_view3 *w) {
    const pn_view *v = &w->v;
    uint64_t n[3], s[3];
    int k = 0;
    const int64_t vn[3] = {v->nb, v->nt, w->nh}, vs[3] = {v->s.b, v->s.t, w->sh};
    for (int i = 0; i < 3; i++)
        if (vn[i] > 1) { n[k] = (uint64_t)vn[i]; s[k] = uabs(vs[i]); k++; }
    for (int i = 1; i < k; i++)          /* sort by stride */
        for (int j = i; j > 0 && s[j] < s[j - 1]; j--) {
            uint64_t t = s[j]; s[j] = s[j - 1]; s[j - 1] = t;
            t = n[j]; n[j] = n[j - 1]; n[j - 1] = t;
        }
    uint64_t run = (uint64_t)v->C;       /* extent of the rows along the smaller strides */
    for (int i = 0; i < k; i++) {
        if (s[i] < run) return 0;
        run += (n[i] - 1) * s[i];
    }
    return 1;
}

static int same_view(const pn_view3 *a, const pn_view3 *b) {
    return a->v.ptr == b->v.ptr && a->v.s.b == b->v.s.b && a->v.s.t == b->v.s.t && a->v.esize == b->v.esize &&
           a->nh == b->nh && (a->nh > 1 ? a->sh == b->sh : 1);
}

static pn_status check_views3(const pn_view3 *outs, int nout, const pn_view3 *ins, int nin,
                              const unsigned char *same_ok) {
    uintptr_t lo[16], hi[16], ilo, ihi;
    for (int o = 0; o < nout; o++) {
        if (!outs[o].v.ptr) continue;
        if (!view_extent(&outs[o], &lo[o], &hi[o])) return PN_ERR_SIZE;
        if (!rows_disjoint(&outs[o])) return PN_ERR_STRIDE;
        for (int p = 0; p < o; p++)
            if (outs[p].v.ptr && lo[o] < hi[p] && lo[p] < hi[o]) return PN_ERR_ALIAS;
    }
    for (int i = 0; i < nin; i++) {
        if (!ins[i].v.ptr) continue;
        if (!view_extent(&ins[i], &ilo, &ihi)) return PN_ERR_SIZE;
        for (int o = 0; o < nout; o++) {
            if (!outs[o].v.ptr || !(lo[o] < ihi && ilo < hi[o])) continue;
            if (same_ok && same_ok[o * nin + i] && same_view(&outs[o], &ins[i])) continue;
            return PN_ERR_ALIAS;
        }
    }
    return PN_OK;
}

pn_status pn_check_views(const pn_view *outs, int nout, const pn_view *ins, int nin,
                         const unsigned char *same_ok) {
    pn_view3 o3[16], i3[16];
    for (int o = 0; o < nout; o++) { o3[o].v = outs[o]; o3[o].nh = 1; o3[o].sh = 0; }
    for (int i = 0; i < nin; i++) { i3[i].v = ins[i]; i3[i].nh = 1; i3[i].sh = 0; }
    return check_views3(o3, nout, i3, nin, same_ok);
}

static pn_view3 rows_view(const void *p, const pn_token_args *a, pn_rowmap m) {
    pn_view3 v = {{p, a->B, a->T / a->H, {m.b, m.t}, a->C, pn_dtype_size(a->dtype)}, a->H, m.h};
    return v;
}
static pn_view3 stats_view(const void *p, const pn_token_args *a) {
    pn_view3 v = {{p, a->B, a->T, {a->T, 1}, 1, a->dtype == PN_FLOAT64 ? 8 : 4}, 1, 0};
    return v;
}
static pn_view3 param_view(const void *p, const pn_token_args *a) {
    pn_view3 v = {{p, 1, 1, {0, 0}, a->C, pn_dtype_size(a->wdtype)}, 1, 0};
    return v;
}

/* The options of a *_ex call into a (NULL: the defaults). */
static pn_status check_options(pn_token_args *a, const pn_norm_options *o) {
    a->H = 1;
    a->weight_offset = 0;
    a->llama = 0;
    if (!o) return PN_OK;
    if (!isfinite(o->weight_offset) || o->rounding < PN_ROUND_ONCE || o->rounding > PN_ROUND_LLAMA)
        return PN_ERR_ARG;
    if (o->weight_offset != 0 && !a->weight) return PN_ERR_ARG;   /* no weight: no scaling at all */
    if (o->H < 0) return PN_ERR_SIZE;
    a->H = o->H > 1 ? o->H : 1;
    a->weight_offset = o->weight_offset;
    a->llama = o->rounding == PN_ROUND_LLAMA;
    return PN_OK;
}

pn_status pn_check_token(pn_token_args *a, const pn_strides *strides, const pn_norm_options *opts,
                         unsigned what, size_t scratch_bytes, size_t scratch_needed) {
    pn_status st;
    const int backward = (what & PN_CHECK_BACKWARD) != 0;
    if (!a->inp) return PN_ERR_NULL;
    if (backward) {
        if (!a->dout || !a->rstd || ((what & PN_CHECK_MEAN) && !a->mean)) return PN_ERR_NULL;
    } else {
        if (!((what & PN_CHECK_QUANT) ? a->q : a->out)) return PN_ERR_NULL;
        if ((what & PN_CHECK_RESIDUAL) && (!a->residual || !a->h)) return PN_ERR_NULL;
    }
    if ((st = pn_check_dtypes(a->dtype, a->wdtype))) return st;
    if ((st = check_options(a, opts))) return st;
    const int64_t T = a->T;
    if (T <= 0 || a->H > INT64_MAX / T) return PN_ERR_SIZE;
    if ((st = pn_check_sizes(a->B, T * a->H, a->C, a->dtype))) return st;
    if (!backward && (st = pn_check_eps(a->eps))) return st;
    if (backward && a->scratch && scratch_bytes < scratch_needed) return PN_ERR_SCRATCH;
    a->s = pn_resolve_all(strides, opts ? &opts->head : NULL, T, a->H, a->C);
    a->T = T * a->H;   /* from here on rows are B x (T*H) */

    if (backward) {
        pn_view3 outs[4] = {rows_view(a->dinp, a, a->s.dinp), param_view(a->dweight, a),
                            param_view(a->dbias, a), {{a->scratch, 1, 1, {0, 0}, (int64_t)scratch_bytes, 1}, 1, 0}};
        pn_view3 ins[5] = {rows_view(a->dout, a, a->s.dout), rows_view(a->inp, a, a->s.inp),
                          param_view(a->weight, a), stats_view(a->mean, a), stats_view(a->rstd, a)};
        /* dx may be written over dy or x: each row reads both before writing. */
        static const unsigned char same_ok[4 * 5] = {1, 1, 0, 0, 0};
        if (!(a->dweight || a->dbias)) outs[3].v.ptr = NULL;   /* scratch unused */
        return check_views3(outs, 4, ins, 5, same_ok);
    } else {
        const int64_t rows = a->B * a->T;
        const int64_t ng = a->qscale == 0 && a->qgroup ? a->C / a->qgroup : 0;
        pn_view3 outs[6] = {rows_view(a->out, a, a->s.out), rows_view(a->h, a, a->s.h),
                            stats_view(a->mean, a), stats_view(a->rstd, a),
                            {{a->q, 1, 1, {0, 0}, rows * a->C, 1}, 1, 0},
                            {{a->qscales, 1, 1, {0, 0}, rows * ng, 4}, 1, 0}};
        pn_view3 ins[4] = {rows_view(a->inp, a, a->s.inp), rows_view(a->residual, a, a->s.residual),
                          param_view(a->weight, a), param_view(a->bias, a)};
        /* y and h may be written over x or the residual (in place). */
        static const unsigned char same_ok[6 * 4] = {1, 1, 0, 0, 1, 1, 0, 0};
        return check_views3(outs, 6, ins, 4, same_ok);
    }
}

pn_status pn_check_quant(pn_token_args *a, const pn_quant_params *quant) {
    if (!quant) return PN_ERR_NULL;
    const int fp8 = quant->qdtype == PN_QFLOAT8_E4M3FN;
    if (quant->qdtype != PN_QINT8 && !fp8) return PN_ERR_ARG;
    if (!(quant->scale >= 0 && quant->scale <= 3.4028234663852886e38)) return PN_ERR_ARG;   /* NaN fails */
    if (!(quant->scale_ub >= 0 && isfinite(quant->scale_ub))) return PN_ERR_ARG;
    const int dynamic = quant->scale == 0;
    if (quant->scale_ub != 0 && (!fp8 || !dynamic)) return PN_ERR_ARG;   /* float8, dynamic only */
    if (quant->group_size < 0 || (quant->group_size && (!dynamic || a->C % quant->group_size))) return PN_ERR_ARG;
    if (dynamic && !a->qscales) return PN_ERR_NULL;
    if ((float)quant->scale == 0 && !dynamic) return PN_ERR_ARG;       /* underflows float32 */
    a->qfp8 = fp8;
    a->qscale = (float)quant->scale;
    a->qscale_ub = (float)quant->scale_ub;
    a->qgroup = dynamic ? (quant->group_size ? quant->group_size : a->C) : 0;
    if (!dynamic) a->qscales = NULL;
    return PN_OK;
}
