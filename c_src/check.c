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

pn_rows pn_resolve(pn_rows s, int64_t T, int64_t C) {
    if (s.b == 0 && s.t == 0) { s.b = T * C; s.t = C; }
    return s;
}

pn_strides pn_resolve_all(const pn_strides *s, int64_t T, int64_t C) {
    pn_strides r;
    memset(&r, 0, sizeof r);
    if (s) r = *s;
    r.inp = pn_resolve(r.inp, T, C);
    r.out = pn_resolve(r.out, T, C);
    r.residual = pn_resolve(r.residual, T, C);
    r.h = pn_resolve(r.h, T, C);
    r.dout = pn_resolve(r.dout, T, C);
    r.dinp = pn_resolve(r.dinp, T, C);
    return r;
}

/* Byte range [lo, hi) a view covers; 0 when its extent overflows. */
static int view_extent(const pn_view *v, uintptr_t *lo, uintptr_t *hi) {
    const int64_t B = v->nb, T = v->nt;
    int64_t eb, et, e = (int64_t)v->esize, span_lo, span_hi, bytes_lo, bytes_hi;
    if (!mul_ok(B - 1, v->s.b, &eb) || !mul_ok(T - 1, v->s.t, &et)) return 0;
    if (__builtin_add_overflow(eb < 0 ? eb : 0, et < 0 ? et : 0, &span_lo) ||
        __builtin_add_overflow(eb > 0 ? eb : 0, et > 0 ? et : 0, &span_hi))
        return 0;
    if (v->C < 0 || span_hi > INT64_MAX - v->C) return 0;
    if (!mul_ok(span_lo, e, &bytes_lo) || !mul_ok(span_hi + v->C, e, &bytes_hi)) return 0;
    *lo = (uintptr_t)v->ptr + (uintptr_t)bytes_lo;  /* wraps correctly for negative spans */
    *hi = (uintptr_t)v->ptr + (uintptr_t)bytes_hi;
    return 1;
}

/* Rows of an output must not overlap each other (two threads would write the
 * same element). A sufficient test, exact for the layouts slicing produces. */
static uint64_t uabs(int64_t v) { return v < 0 ? 0 - (uint64_t)v : (uint64_t)v; }

/* Called after view_extent() succeeded, so (B-1)*|sb| and (T-1)*|st| fit in int64. */
static int rows_disjoint(const pn_view *v) {
    const uint64_t B = (uint64_t)v->nb, T = (uint64_t)v->nt, C = (uint64_t)v->C;
    const uint64_t sb = uabs(v->s.b), st = uabs(v->s.t);
    if (B == 1 && T == 1) return 1;
    if (B == 1) return st >= C;
    if (T == 1) return sb >= C;
    /* each row clears the next along the smaller stride, and the whole run
     * of rows along it ends before the next step of the larger one */
    if (st <= sb) return st >= C && sb >= (T - 1) * st + C;
    return sb >= C && st >= (B - 1) * sb + C;
}

static int same_view(const pn_view *a, const pn_view *b) {
    return a->ptr == b->ptr && a->s.b == b->s.b && a->s.t == b->s.t && a->esize == b->esize;
}

pn_status pn_check_views(const pn_view *outs, int nout, const pn_view *ins, int nin,
                         const unsigned char *same_ok) {
    uintptr_t lo[16], hi[16], ilo, ihi;
    for (int o = 0; o < nout; o++) {
        if (!outs[o].ptr) continue;
        if (!view_extent(&outs[o], &lo[o], &hi[o])) return PN_ERR_SIZE;
        if (!rows_disjoint(&outs[o])) return PN_ERR_STRIDE;
        for (int p = 0; p < o; p++)
            if (outs[p].ptr && lo[o] < hi[p] && lo[p] < hi[o]) return PN_ERR_ALIAS;
    }
    for (int i = 0; i < nin; i++) {
        if (!ins[i].ptr) continue;
        if (!view_extent(&ins[i], &ilo, &ihi)) return PN_ERR_SIZE;
        for (int o = 0; o < nout; o++) {
            if (!outs[o].ptr || !(lo[o] < ihi && ilo < hi[o])) continue;
            if (same_ok && same_ok[o * nin + i] && same_view(&outs[o], &ins[i])) continue;
            return PN_ERR_ALIAS;
        }
    }
    return PN_OK;
}

static pn_view rows_view(const void *p, const pn_token_args *a, pn_rows s) {
    pn_view v = {p, a->B, a->T, s, a->C, pn_dtype_size(a->dtype)};
    return v;
}
static pn_view stats_view(const void *p, const pn_token_args *a) {
    pn_view v = {p, a->B, a->T, {a->T, 1}, 1, a->dtype == PN_FLOAT64 ? 8 : 4};
    return v;
}
static pn_view param_view(const void *p, const pn_token_args *a) {
    pn_view v = {p, 1, 1, {0, 0}, a->C, pn_dtype_size(a->wdtype)};
    return v;
}

pn_status pn_check_token(pn_token_args *a, const pn_strides *strides, unsigned what,
                         size_t scratch_bytes, size_t scratch_needed) {
    pn_status st;
    const int backward = (what & PN_CHECK_BACKWARD) != 0;
    if (!a->inp) return PN_ERR_NULL;
    if (backward) {
        if (!a->dout || !a->rstd || ((what & PN_CHECK_MEAN) && !a->mean)) return PN_ERR_NULL;
    } else {
        if (!a->out) return PN_ERR_NULL;
        if ((what & PN_CHECK_RESIDUAL) && (!a->residual || !a->h)) return PN_ERR_NULL;
    }
    if ((st = pn_check_dtypes(a->dtype, a->wdtype))) return st;
    if ((st = pn_check_sizes(a->B, a->T, a->C, a->dtype))) return st;
    if (!backward && (st = pn_check_eps(a->eps))) return st;
    if (backward && a->scratch && scratch_bytes < scratch_needed) return PN_ERR_SCRATCH;
    a->s = pn_resolve_all(strides, a->T, a->C);

    if (backward) {
        pn_view outs[4] = {rows_view(a->dinp, a, a->s.dinp), param_view(a->dweight, a),
                           param_view(a->dbias, a), {a->scratch, 1, 1, {0, 0}, (int64_t)scratch_bytes, 1}};
        pn_view ins[5] = {rows_view(a->dout, a, a->s.dout), rows_view(a->inp, a, a->s.inp),
                          param_view(a->weight, a), stats_view(a->mean, a), stats_view(a->rstd, a)};
        /* dx may be written over dy or x: each row reads both before writing. */
        static const unsigned char same_ok[4 * 5] = {1, 1, 0, 0, 0};
        if (!(a->dweight || a->dbias)) outs[3].ptr = NULL;   /* scratch unused */
        return pn_check_views(outs, 4, ins, 5, same_ok);
    } else {
        pn_view outs[4] = {rows_view(a->out, a, a->s.out), rows_view(a->h, a, a->s.h),
                           stats_view(a->mean, a), stats_view(a->rstd, a)};
        pn_view ins[4] = {rows_view(a->inp, a, a->s.inp), rows_view(a->residual, a, a->s.residual),
                          param_view(a->weight, a), param_view(a->bias, a)};
        /* y and h may be written over x or the residual (in place). */
        static const unsigned char same_ok[4 * 4] = {1, 1, 0, 0, 1, 1, 0, 0};
        return pn_check_views(outs, 4, ins, 4, same_ok);
    }
}
