/* token_inplace.h - the in-place properties of the token norms, shared by
 * test_layernorm.c and test_rmsnorm.c: each writes the same results over its
 * inputs as out of place, bit for bit. `rms` picks the op (RMSNorm has no bias
 * and no mean: tok_* below pass what the op takes). */
#ifndef PN_TOKEN_INPLACE_H
#define PN_TOKEN_INPLACE_H
#include "testutil.h"

static const char *tok_name(int rms) { return rms ? "rms" : "layer"; }
static double tok_eps(int rms) { return rms ? 1e-6 : 1e-5; }

static pn_status tok_forward(int rms, void *out, const void *inp, int64_t B, int64_t T, int64_t C, pn_dtype dt,
                             const pn_strides *st)
{
    return rms ? pn_rmsnorm_forward(out, NULL, inp, NULL, B, T, C, tok_eps(rms), dt, dt, st)
               : pn_layernorm_forward(out, NULL, NULL, inp, NULL, NULL, B, T, C, tok_eps(rms), dt, dt, st);
}

static pn_status tok_add_forward(int rms, void *out, void *h, void *mean, void *rstd, const void *inp,
                                 const void *residual, const void *w, const void *b, int64_t B, int64_t T,
                                 int64_t C, pn_dtype dt, const pn_strides *st)
{
    return rms ? pn_add_rmsnorm_forward(out, h, rstd, inp, residual, w, B, T, C, tok_eps(rms), dt, dt, st)
               : pn_add_layernorm_forward(out, h, mean, rstd, inp, residual, w, b, B, T, C, tok_eps(rms), dt,
                                          dt, st);
}

static pn_status tok_backward(int rms, void *dinp, void *dw, void *db, const void *dout, const void *inp,
                              const void *w, const void *mean, const void *rstd, int64_t B, int64_t T, int64_t C,
                              int flags, pn_dtype dt, const pn_strides *st)
{
    return rms ? pn_rmsnorm_backward(dinp, dw, NULL, 0, dout, inp, w, rstd, B, T, C, flags, dt, dt, st)
               : pn_layernorm_backward(dinp, dw, db, NULL, 0, dout, inp, w, mean, rstd, B, T, C, flags, dt, dt, st);
}

/* in place: out == inp with the same strides */
static void tok_run_inplace(int rms, pn_dtype dt, int layout)
{
    const int64_t B = 3, T = 5, C = 96;
    tu_rng rng;
    tu_buf x, y;
    pn_strides st;
    pn_status s1, s2;
    double *a, *b2;
    int same;

    rng.s = (rms ? 98 : 99) + (uint64_t)dt;
    x = tu_buf_layout(layout, 0, 0, B, T, C, dt);
    y = tu_buf_layout(layout, 1, 0, B, T, C, dt);
    tu_fill_normal(&x, &rng, 1.0, 2.0);
    memset(&st, 0, sizeof st);
    st.inp = x.rows;
    st.out = y.rows;
    s1 = tok_forward(rms, tu_ptr(&y), tu_ptr(&x), B, T, C, dt, layout == TU_DENSE ? NULL : &st);
    st.out = x.rows;
    s2 = tok_forward(rms, tu_ptr(&x), tu_ptr(&x), B, T, C, dt, layout == TU_DENSE ? NULL : &st);
    a = tu_gather(&y);
    b2 = tu_gather(&x);
    same = memcmp(a, b2, (size_t)(B * T * C) * sizeof(double)) == 0;
    tu_check(s1 == PN_OK && s2 == PN_OK && same && tu_buf_guard_ok(&x),
             "%snorm_forward in place (out == inp) %s %s: status=%d/%d same bits as out-of-place=%d",
             tok_name(rms), tu_dtype_name(dt), tu_layout_name(layout), (int)s1, (int)s2, same);
    free(a); free(b2);
    tu_buf_free(&x); tu_buf_free(&y);
}

/* Fused forward written over its inputs (the library accepts out or h equal
 * to inp or residual, same strides): same bits as out of place. variant:
 * 0 out=inp, 1 out=residual, 2 h=inp, 3 h=residual, 4 out=inp and h=residual,
 * 5 out=residual and h=inp */
static void tok_run_inplace_fused(int rms, pn_dtype dt, int layout, int64_t C, int variant)
{
    static const char *names[] = {"out=inp", "out=residual", "h=inp", "h=residual",
                                  "out=inp,h=residual", "out=residual,h=inp"};
    const int64_t B = 3, T = 5, N = B * T;
    tu_rng rng;
    tu_buf x, r, y, h, w, b, x2, r2, y2, h2, m1, m2, s1b, s2b;
    pn_strides st, st2;
    pn_status s1, s2;
    double *yref, *href, *yg, *hg;
    void *outp, *hp;
    int same;

    rng.s = (rms ? 517 : 515) + (uint64_t)dt * 3 + (uint64_t)variant + (uint64_t)C;
    x = tu_buf_layout(layout, 0, 0, B, T, C, dt);
    r = tu_buf_layout(layout, 2, 0, B, T, C, dt);
    y = tu_buf_layout(layout, 1, 0, B, T, C, dt);
    h = tu_buf_layout(layout, 3, 0, B, T, C, dt);
    w = tu_buf_vec(C, dt);
    b = tu_buf_vec(C, dt);
    m1 = tu_buf_vec(N, tu_stat_dtype(dt));
    m2 = tu_buf_vec(N, tu_stat_dtype(dt));
    s1b = tu_buf_vec(N, tu_stat_dtype(dt));
    s2b = tu_buf_vec(N, tu_stat_dtype(dt));
    tu_fill_normal(&x, &rng, 0.5, 2.0);
    tu_fill_normal(&r, &rng, 0.0, 1.0);
    tu_fill_normal(&w, &rng, 1.0, 0.3);
    tu_fill_normal(&b, &rng, 0.0, 0.3);
    x2 = tu_buf_layout(layout, 0, 0, B, T, C, dt);
    r2 = tu_buf_layout(layout, 2, 0, B, T, C, dt);
    y2 = tu_buf_layout(layout, 1, 0, B, T, C, dt);
    h2 = tu_buf_layout(layout, 3, 0, B, T, C, dt);
    memcpy(x2.mem, x.mem, (size_t)x.nel * x.es);
    memcpy(r2.mem, r.mem, (size_t)r.nel * r.es);

    memset(&st, 0, sizeof st);
    st.inp = x.rows; st.residual = r.rows; st.out = y.rows; st.h = h.rows;
    s1 = tok_add_forward(rms, tu_ptr(&y), tu_ptr(&h), tu_ptr(&m1), tu_ptr(&s1b), tu_ptr(&x), tu_ptr(&r),
                         tu_ptr(&w), tu_ptr(&b), B, T, C, dt, &st);
    yref = tu_gather(&y);
    href = tu_gather(&h);

    st2 = st;
    st2.inp = x2.rows; st2.residual = r2.rows;
    outp = tu_ptr(&y2); hp = tu_ptr(&h2);
    st2.out = y2.rows; st2.h = h2.rows;
    if (variant == 0 || variant == 4) { outp = tu_ptr(&x2); st2.out = x2.rows; }
    if (variant == 1 || variant == 5) { outp = tu_ptr(&r2); st2.out = r2.rows; }
    if (variant == 2 || variant == 5) { hp = tu_ptr(&x2); st2.h = x2.rows; }
    if (variant == 3 || variant == 4) { hp = tu_ptr(&r2); st2.h = r2.rows; }
    s2 = tok_add_forward(rms, outp, hp, tu_ptr(&m2), tu_ptr(&s2b), tu_ptr(&x2), tu_ptr(&r2), tu_ptr(&w),
                         tu_ptr(&b), B, T, C, dt, &st2);
    {
        const tu_buf *yb = outp == tu_ptr(&x2) ? &x2 : outp == tu_ptr(&r2) ? &r2 : &y2;
        const tu_buf *hb = hp == tu_ptr(&x2) ? &x2 : hp == tu_ptr(&r2) ? &r2 : &h2;
        yg = tu_gather(yb);
        hg = tu_gather(hb);
    }
    same = memcmp(yg, yref, (size_t)(N * C) * sizeof(double)) == 0 &&
           memcmp(hg, href, (size_t)(N * C) * sizeof(double)) == 0 &&
           memcmp(m1.mem, m2.mem, (size_t)m1.nel * m1.es) == 0 &&
           memcmp(s1b.mem, s2b.mem, (size_t)s1b.nel * s1b.es) == 0;
    tu_check(s1 == PN_OK && s2 == PN_OK && same && tu_buf_guard_ok(&x2) && tu_buf_guard_ok(&r2),
             "add_%snorm_forward in place %s %s %s C=%lld: status=%d/%d same bits as out-of-place=%d",
             tok_name(rms), names[variant], tu_dtype_name(dt), tu_layout_name(layout), (long long)C, (int)s1,
             (int)s2, same);
    free(yref); free(href); free(yg); free(hg);
    tu_buf_free(&x); tu_buf_free(&r); tu_buf_free(&y); tu_buf_free(&h); tu_buf_free(&w);
    tu_buf_free(&b); tu_buf_free(&x2); tu_buf_free(&r2); tu_buf_free(&y2); tu_buf_free(&h2);
    tu_buf_free(&m1); tu_buf_free(&m2); tu_buf_free(&s1b); tu_buf_free(&s2b);
}

/* Backward written over dy or x (accepted by the library with the same
 * strides), overwriting or accumulating: same bits as out of place with dx
 * starting from a copy of that input. */
static void tok_run_inplace_backward(int rms, pn_dtype dt, int layout, int64_t C, int over_x, int acc)
{
    const int64_t B = 3, T = 5, N = B * T;
    const pn_dtype sdt = tu_stat_dtype(dt);
    tu_rng rng;
    tu_buf x, dy, dx, w, mean, rstd, dw, db, x2, dy2, dw2, db2;
    pn_strides st, st2;
    pn_status s1, s2;
    double *xd, *md, *rd, *yt, *ref, *got;
    tu_buf *target;
    int64_t n, k;
    int same;

    rng.s = (rms ? 618 : 616) + (uint64_t)dt * 5 + (uint64_t)over_x * 2 + (uint64_t)acc + (uint64_t)C;
    x = tu_buf_layout(layout, 0, 0, B, T, C, dt);
    dy = tu_buf_layout(layout, 2, 0, B, T, C, dt);
    dx = tu_buf_layout(layout, 1, 0, B, T, C, dt);
    w = tu_buf_vec(C, dt);
    mean = tu_buf_vec(N, sdt);
    rstd = tu_buf_vec(N, sdt);
    dw = tu_buf_vec(C, dt);
    db = tu_buf_vec(C, dt);
    dw2 = tu_buf_vec(C, dt);
    db2 = tu_buf_vec(C, dt);
    tu_fill_normal(&x, &rng, 0.5, 2.0);
    tu_fill_normal(&dy, &rng, 0.0, 1.0);
    tu_fill_normal(&w, &rng, 1.0, 0.3);
    tu_fill_normal(&dw, &rng, 0.0, 1.0);
    tu_fill_normal(&db, &rng, 0.0, 1.0);
    memcpy(dw2.mem, dw.mem, (size_t)dw.nel * dw.es);
    memcpy(db2.mem, db.mem, (size_t)db.nel * db.es);
    xd = tu_gather(&x);
    md = (double *)tu_xmalloc((size_t)N * sizeof(double));
    rd = (double *)tu_xmalloc((size_t)N * sizeof(double));
    yt = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    tu_ref_forward(rms, N, C, xd, NULL, NULL, tok_eps(rms), yt, md, rd);
    for (n = 0; n < N; n++) {
        tu_store(tu_ptr(&mean), sdt, n, md[n]);
        tu_store(tu_ptr(&rstd), sdt, n, rd[n]);
    }
    x2 = tu_buf_layout(layout, 0, 0, B, T, C, dt);
    dy2 = tu_buf_layout(layout, 2, 0, B, T, C, dt);
    memcpy(x2.mem, x.mem, (size_t)x.nel * x.es);
    memcpy(dy2.mem, dy.mem, (size_t)dy.nel * dy.es);
    target = over_x ? &x2 : &dy2;
    for (n = 0; n < N; n++) /* accumulate: dx starts as the input it replaces */
        for (k = 0; k < C; k++)
            tu_set(&dx, n, k, acc ? tu_get(target, n, k) : 0.0);

    memset(&st, 0, sizeof st);
    st.inp = x.rows; st.dout = dy.rows; st.dinp = dx.rows;
    s1 = tok_backward(rms, tu_ptr(&dx), tu_ptr(&dw), tu_ptr(&db), tu_ptr(&dy), tu_ptr(&x), tu_ptr(&w),
                      tu_ptr(&mean), tu_ptr(&rstd), B, T, C, acc ? PN_ACCUMULATE : 0, dt, &st);
    st2 = st;
    st2.inp = x2.rows; st2.dout = dy2.rows; st2.dinp = target->rows;
    s2 = tok_backward(rms, tu_ptr(target), tu_ptr(&dw2), tu_ptr(&db2), tu_ptr(&dy2), tu_ptr(&x2), tu_ptr(&w),
                      tu_ptr(&mean), tu_ptr(&rstd), B, T, C, acc ? PN_ACCUMULATE : 0, dt, &st2);
    ref = tu_gather(&dx);
    got = tu_gather(target);
    same = memcmp(ref, got, (size_t)(N * C) * sizeof(double)) == 0 &&
           memcmp(dw.mem, dw2.mem, (size_t)dw.nel * dw.es) == 0 &&
           memcmp(db.mem, db2.mem, (size_t)db.nel * db.es) == 0;
    tu_check(s1 == PN_OK && s2 == PN_OK && same && tu_buf_guard_ok(target),
             "%snorm_backward in place dinp=%s%s %s %s C=%lld: status=%d/%d same bits as out-of-place=%d",
             tok_name(rms), over_x ? "inp" : "dout", acc ? " accumulate" : "", tu_dtype_name(dt),
             tu_layout_name(layout), (long long)C, (int)s1, (int)s2, same);
    free(xd); free(md); free(rd); free(yt); free(ref); free(got);
    tu_buf_free(&x); tu_buf_free(&dy); tu_buf_free(&dx); tu_buf_free(&w); tu_buf_free(&mean);
    tu_buf_free(&rstd); tu_buf_free(&dw); tu_buf_free(&db); tu_buf_free(&x2); tu_buf_free(&dy2);
    tu_buf_free(&dw2); tu_buf_free(&db2);
}

/* the in-place grid both op tests run: every dtype, the forward over x, the
 * fused forward's six in-place pairs, the backward over dy or x (accumulating
 * or not), in dense, negative-stride and padded layouts */
static void tok_run_inplace_grid(int rms)
{
    for (int di = 0; di < 4; di++) {
        const pn_dtype dt = (pn_dtype)di;
        tok_run_inplace(rms, dt, TU_DENSE);
        tok_run_inplace(rms, dt, TU_NEGATIVE);
        for (int v = 0; v < 6; v++) {
            tok_run_inplace_fused(rms, dt, TU_DENSE, 96, v);
            tok_run_inplace_fused(rms, dt, TU_NEGATIVE, 4097, v);
        }
        for (int over_x = 0; over_x < 2; over_x++)
            for (int acc = 0; acc < 2; acc++) {
                tok_run_inplace_backward(rms, dt, TU_DENSE, 96, over_x, acc);
                tok_run_inplace_backward(rms, dt, TU_PADDED, 4097, over_x, acc);
            }
    }
}

/* the same on outputs of 8 MiB and more (the library streams those) */
static void tok_run_inplace_streamed(int rms, pn_dtype dt)
{
    const int64_t es = (int64_t)tu_dtype_size(dt);
    const int64_t Cbig = (8 << 20) / (15 * es) + 1000; /* 3 x 5 rows of Cbig */
    tok_run_inplace_fused(rms, dt, TU_DENSE, Cbig, 4);
    tok_run_inplace_backward(rms, dt, TU_DENSE, Cbig, 0, 1);
    tok_run_inplace_backward(rms, dt, TU_DENSE, Cbig, 1, 0);
}

#endif
