/* test_layernorm.c - LayerNorm forward, fused add+LayerNorm forward and
 * backward against a double-precision reference, for every dtype, weight
 * dtype, row layout (strides, negative strides, broadcast inputs) and a
 * range of C; hostile rows (mean 1e4, std 1e-2); NaN/Inf rows. */
#include "testutil.h"
#include "token_inplace.h"

static const int64_t Cs[] = {1, 3, 7, 64, 768, 4097};

typedef struct {
    int64_t B, T;
    int layout;
} shape_t;

/* odd row counts everywhere; every strided layout has B, T > 1 */
static const shape_t shapes[] = {
    {1, 1, TU_DENSE}, {3, 5, TU_DENSE}, {1, 9, TU_PADDED},
    {3, 5, TU_NEGATIVE}, {3, 3, TU_EXPLICIT}, {5, 3, TU_PADDED},
};

typedef struct {
    pn_dtype dt, wdt;
} dtypes_t;

static const dtypes_t dtypes[] = {
    {PN_FLOAT32, PN_FLOAT32}, {PN_FLOAT16, PN_FLOAT16}, {PN_FLOAT16, PN_FLOAT32},
    {PN_BFLOAT16, PN_BFLOAT16}, {PN_BFLOAT16, PN_FLOAT32}, {PN_FLOAT64, PN_FLOAT64},
    {PN_FLOAT64, PN_FLOAT32},
};

#define NELEM(a) ((int)(sizeof(a) / sizeof((a)[0])))

typedef struct {
    int64_t B, T, C;
    int layout;
} many_t;

/* more rows than one backward chunk holds, odd counts, a partial last chunk */
static const many_t many[] = {
    {7, 143, 64, TU_DENSE}, {3, 67, 768, TU_NEGATIVE}, {1, 3001, 7, TU_PADDED},
    {33, 3, 17, TU_EXPLICIT}, {1, 1025, 1, TU_DENSE},
};

static const char *wmode_name(int wmode)
{
    return wmode == 0 ? "no-w" : wmode == 1 ? "w" : "w+b";
}

static uint64_t seed_of(int64_t B, int64_t T, int64_t C, int a, int b, int c)
{
    return (uint64_t)(B * 1000003 + T * 10007 + C * 101 + a * 7919 + b * 131 + c * 17 + 12345);
}

/* statistics check: mean relative to |mean| + std, rstd relative */
static int stats_ok(const tu_buf *mean, const tu_buf *rstd, const double *mref,
                    const double *rref, int64_t N, double tol, double *merr, double *rerr)
{
    int64_t n;
    *merr = 0;
    *rerr = 0;
    for (n = 0; n < N; n++) {
        double sd = 1.0 / rref[n];
        if (mean->mem) {
            double e = fabs(tu_load(tu_ptr(mean), mean->dt, n) - mref[n]) / (fabs(mref[n]) + sd);
            if (!(e <= *merr)) *merr = e;
        }
        if (rstd->mem) {
            double e = fabs(tu_load(tu_ptr(rstd), rstd->dt, n) - rref[n]) / rref[n];
            if (!(e <= *rerr)) *rerr = e;
        }
    }
    return *merr <= tol && *rerr <= tol;
}

/* ------------------------------------------------------------------------ */
/* forward and fused forward                                                 */

static void run_forward(int fused, int64_t B, int64_t T, int64_t C, int layout, pn_dtype dt,
                        pn_dtype wdt, int wmode, int want_stats)
{
    const int64_t N = B * T;
    const double eps = 1e-5;
    const pn_dtype sdt = tu_stat_dtype(dt);
    tu_rng rng;
    tu_buf x, r, y, h, mean, rstd, w, b;
    pn_strides st;
    pn_status s;
    double *xd, *rd = NULL, *hd, *wd = NULL, *bd = NULL, *yref, *mref, *rref, *yd;
    double yerr, ymax, merr = 0, rerr = 0, tol = tu_rtol_fwd(dt);
    int64_t i, hbad = 0;
    int ok;

    rng.s = seed_of(B, T, C, layout, (int)dt * 4 + (int)wdt, wmode + 3 * fused);
    x = tu_buf_layout(layout, 0, 1, B, T, C, dt);
    r = fused ? tu_buf_layout(layout, 2, 1, B, T, C, dt) : tu_buf_none();
    y = tu_buf_layout(layout, 1, 0, B, T, C, dt);
    h = fused ? tu_buf_layout(layout, 3, 0, B, T, C, dt) : tu_buf_none();
    mean = want_stats ? tu_buf_vec(N, sdt) : tu_buf_none();
    rstd = want_stats ? tu_buf_vec(N, sdt) : tu_buf_none();
    w = wmode >= 1 ? tu_buf_vec(C, wdt) : tu_buf_none();
    b = wmode >= 2 ? tu_buf_vec(C, wdt) : tu_buf_none();

    tu_fill_normal(&x, &rng, 0.5, 2.0);
    if (fused) tu_fill_normal(&r, &rng, -0.25, 1.0);
    if (w.mem) tu_fill_normal(&w, &rng, 1.0, 0.5);
    if (b.mem) tu_fill_normal(&b, &rng, 0.0, 0.5);
    tu_buf_snapshot(&x);
    tu_buf_snapshot(&r);
    tu_buf_snapshot(&w);
    tu_buf_snapshot(&b);

    memset(&st, 0, sizeof st);
    st.inp = x.rows;
    st.out = y.rows;
    st.residual = r.rows;
    st.h = h.rows;
    if (fused)
        s = pn_add_layernorm_forward(tu_ptr(&y), tu_ptr(&h), tu_ptr(&mean), tu_ptr(&rstd),
                                     tu_ptr(&x), tu_ptr(&r), tu_ptr(&w), tu_ptr(&b), B, T, C,
                                     eps, dt, wdt, layout == TU_DENSE ? NULL : &st);
    else
        s = pn_layernorm_forward(tu_ptr(&y), tu_ptr(&mean), tu_ptr(&rstd), tu_ptr(&x),
                                 tu_ptr(&w), tu_ptr(&b), B, T, C, eps, dt, wdt,
                                 layout == TU_DENSE ? NULL : &st);

    /* reference */
    xd = tu_gather(&x);
    if (fused) {
        rd = tu_gather(&r);
        hd = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
        for (i = 0; i < N * C; i++)
            hd[i] = tu_add_round(dt, xd[i], rd[i]);
    } else {
        hd = xd;
    }
    if (w.mem) wd = tu_gather(&w);
    if (b.mem) bd = tu_gather(&b);
    yref = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    mref = (double *)tu_xmalloc((size_t)N * sizeof(double));
    rref = (double *)tu_xmalloc((size_t)N * sizeof(double));
    tu_ref_forward(0, N, C, hd, wd, bd, eps, yref, mref, rref);

    yd = tu_gather(&y);
    yerr = tu_maxerr(yd, yref, N * C);
    ymax = tu_maxabs(yref, N * C);
    if (fused) {
        double *hg = tu_gather(&h);
        for (i = 0; i < N * C; i++)
            if (memcmp(&hg[i], &hd[i], sizeof(double)) != 0)
                hbad++;
        free(hg);
    }
    ok = s == PN_OK && yerr <= tol * (ymax > 0 ? ymax : 1e-30) + 1e-300;
    if (want_stats)
        ok = stats_ok(&mean, &rstd, mref, rref, N, dt == PN_FLOAT64 ? 1e-12 : 1e-5, &merr, &rerr) && ok;
    ok = ok && hbad == 0;
    ok = ok && tu_buf_guard_ok(&y) && tu_buf_guard_ok(&h) && tu_buf_guard_ok(&mean) &&
         tu_buf_guard_ok(&rstd);
    ok = ok && tu_buf_unchanged(&x) && tu_buf_unchanged(&r) && tu_buf_unchanged(&w) &&
         tu_buf_unchanged(&b);
    tu_check(ok,
             "%s %s/%s %s B=%lld T=%lld C=%lld %s%s: status=%d y_err=%.3g (tol %.3g) mean_err=%.3g "
             "rstd_err=%.3g h_mismatch=%lld guards=%d inputs_kept=%d",
             fused ? "add_layernorm_forward" : "layernorm_forward", tu_dtype_name(dt),
             tu_dtype_name(wdt), tu_layout_name(layout), (long long)B, (long long)T,
             (long long)C, wmode_name(wmode), want_stats ? "" : " no-stats", (int)s,
             yerr / (ymax > 0 ? ymax : 1), tol, merr, rerr, (long long)hbad,
             tu_buf_guard_ok(&y) && tu_buf_guard_ok(&h) && tu_buf_guard_ok(&mean) &&
                 tu_buf_guard_ok(&rstd),
             tu_buf_unchanged(&x) && tu_buf_unchanged(&r) && tu_buf_unchanged(&w) &&
                 tu_buf_unchanged(&b));

    if (fused) { free(rd); free(hd); }
    free(xd); free(wd); free(bd); free(yref); free(mref); free(rref); free(yd);
    tu_buf_free(&x); tu_buf_free(&r); tu_buf_free(&y); tu_buf_free(&h);
    tu_buf_free(&mean); tu_buf_free(&rstd); tu_buf_free(&w); tu_buf_free(&b);
}

/* ------------------------------------------------------------------------ */
/* backward                                                                  */

enum { BW_ALL = 0, BW_ACCUMULATE, BW_DX_ONLY, BW_PARAMS_ONLY, BW_DB_ONLY, BW_NMODES };

static const char *bw_name(int m)
{
    switch (m) {
    case BW_ALL: return "dx+dw+db";
    case BW_ACCUMULATE: return "accumulate";
    case BW_DX_ONLY: return "dx-only";
    case BW_PARAMS_ONLY: return "dw+db-only";
    case BW_DB_ONLY: return "db-only";
    }
    return "?";
}

static void run_backward(int64_t B, int64_t T, int64_t C, int layout, pn_dtype dt, pn_dtype wdt,
                         int has_w, int mode, int use_scratch)
{
    const int64_t N = B * T;
    const double eps = 1e-5;
    const pn_dtype sdt = tu_stat_dtype(dt);
    tu_rng rng;
    tu_buf x, dy, dx, w, mean, rstd, dw, db, scr;
    pn_strides st;
    pn_status s;
    size_t need = 0;
    double *xd, *dyd, *wd = NULL, *md, *rd, *yt, *dxr, *dwr, *dbr, *dxmag, *dwabs, *dbabs;
    double *dx0 = NULL, *dw0 = NULL, *db0 = NULL;
    double dxerr = 0, dwerr = 0, dberr = 0, dxscale = 0, dwscale = 0, dbscale = 0;
    double tol = tu_rtol_bwd(dt), tolw;
    int64_t i, n;
    int ok, want_dx, want_dw, want_db;

    want_dx = mode == BW_ALL || mode == BW_ACCUMULATE || mode == BW_DX_ONLY;
    want_dw = mode == BW_ALL || mode == BW_ACCUMULATE || mode == BW_PARAMS_ONLY;
    want_db = mode == BW_ALL || mode == BW_ACCUMULATE || mode == BW_PARAMS_ONLY || mode == BW_DB_ONLY;
    tolw = tol > tu_rtol_fwd(wdt) ? tol : tu_rtol_fwd(wdt);

    rng.s = seed_of(B, T, C, layout + 10, (int)dt * 4 + (int)wdt, has_w * 8 + mode);
    x = tu_buf_layout(layout, 0, 1, B, T, C, dt);
    dy = tu_buf_layout(layout, 2, 1, B, T, C, dt);
    dx = want_dx ? tu_buf_layout(layout, 1, 0, B, T, C, dt) : tu_buf_none();
    w = has_w ? tu_buf_vec(C, wdt) : tu_buf_none();
    mean = tu_buf_vec(N, sdt);
    rstd = tu_buf_vec(N, sdt);
    dw = want_dw ? tu_buf_vec(C, wdt) : tu_buf_none();
    db = want_db ? tu_buf_vec(C, wdt) : tu_buf_none();

    tu_fill_normal(&x, &rng, -0.3, 1.7);
    tu_fill_normal(&dy, &rng, 0.1, 1.0);
    if (w.mem) tu_fill_normal(&w, &rng, 1.0, 0.5);
    xd = tu_gather(&x);
    dyd = tu_gather(&dy);
    if (w.mem) wd = tu_gather(&w);

    /* saved statistics: reference ones, rounded to the statistics dtype */
    md = (double *)tu_xmalloc((size_t)N * sizeof(double));
    rd = (double *)tu_xmalloc((size_t)N * sizeof(double));
    yt = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    tu_ref_forward(0, N, C, xd, NULL, NULL, eps, yt, md, rd);
    for (n = 0; n < N; n++) {
        tu_store(tu_ptr(&mean), sdt, n, md[n]);
        tu_store(tu_ptr(&rstd), sdt, n, rd[n]);
        md[n] = tu_load(tu_ptr(&mean), sdt, n);
        rd[n] = tu_load(tu_ptr(&rstd), sdt, n);
    }

    if (mode == BW_ACCUMULATE) {
        tu_fill_normal(&dx, &rng, 0.0, 1.0);
        tu_fill_normal(&dw, &rng, 0.0, 3.0);
        tu_fill_normal(&db, &rng, 0.0, 3.0);
        dx0 = tu_gather(&dx);
        dw0 = tu_gather(&dw);
        db0 = tu_gather(&db);
    }
    tu_buf_snapshot(&x);
    tu_buf_snapshot(&dy);
    tu_buf_snapshot(&w);
    tu_buf_snapshot(&mean);
    tu_buf_snapshot(&rstd);

    scr = tu_buf_none();
    if (use_scratch) {
        need = pn_layernorm_backward_scratch_size(B, T, C, dt);
        scr = tu_buf_vec((int64_t)need + 1, PN_BFLOAT16); /* any bytes will do */
    }

    memset(&st, 0, sizeof st);
    st.inp = x.rows;
    st.dout = dy.rows;
    st.dinp = dx.rows;
    s = pn_layernorm_backward(tu_ptr(&dx), tu_ptr(&dw), tu_ptr(&db), use_scratch ? tu_ptr(&scr) : NULL,
                              use_scratch ? need : 0, tu_ptr(&dy), tu_ptr(&x), tu_ptr(&w),
                              tu_ptr(&mean), tu_ptr(&rstd), B, T, C,
                              mode == BW_ACCUMULATE ? PN_ACCUMULATE : 0, dt, wdt,
                              layout == TU_DENSE ? NULL : &st);

    dxr = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    dxmag = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    dwr = (double *)calloc((size_t)C, sizeof(double));
    dbr = (double *)calloc((size_t)C, sizeof(double));
    dwabs = (double *)calloc((size_t)C, sizeof(double));
    dbabs = (double *)calloc((size_t)C, sizeof(double));
    tu_ref_backward(0, N, C, dyd, xd, wd, md, rd, dxr, dwr, dbr, dxmag, dwabs, dbabs);
    if (mode == BW_ACCUMULATE) {
        for (i = 0; i < N * C; i++) dxr[i] += dx0[i];
        for (i = 0; i < C; i++) { dwr[i] += dw0[i]; dbr[i] += db0[i]; }
    }

    ok = s == PN_OK;
    if (want_dx) {
        double *g = tu_gather(&dx);
        dxscale = tu_maxabs(dxr, N * C);
        if (tu_maxabs(dxmag, N * C) * 1e-2 > dxscale) dxscale = tu_maxabs(dxmag, N * C) * 1e-2;
        dxerr = tu_maxerr(g, dxr, N * C) / (dxscale > 0 ? dxscale : 1e-300);
        ok = ok && dxerr <= tol;
        free(g);
    }
    if (want_dw) {
        double *g = tu_gather(&dw);
        dwscale = tu_maxabs(dwr, C);
        if (tu_maxabs(dwabs, C) > dwscale) dwscale = tu_maxabs(dwabs, C);
        dwerr = tu_maxerr(g, dwr, C) / (dwscale > 0 ? dwscale : 1e-300);
        ok = ok && dwerr <= tolw;
        free(g);
    }
    if (want_db) {
        double *g = tu_gather(&db);
        dbscale = tu_maxabs(dbr, C);
        if (tu_maxabs(dbabs, C) > dbscale) dbscale = tu_maxabs(dbabs, C);
        dberr = tu_maxerr(g, dbr, C) / (dbscale > 0 ? dbscale : 1e-300);
        ok = ok && dberr <= tolw;
        free(g);
    }
    ok = ok && tu_buf_guard_ok(&dx) && tu_buf_guard_ok(&dw) && tu_buf_guard_ok(&db);
    ok = ok && tu_buf_unchanged(&x) && tu_buf_unchanged(&dy) && tu_buf_unchanged(&w) &&
         tu_buf_unchanged(&mean) && tu_buf_unchanged(&rstd);
    tu_check(ok,
             "layernorm_backward %s/%s %s B=%lld T=%lld C=%lld %s %s%s: status=%d dx_err=%.3g "
             "dw_err=%.3g db_err=%.3g (tol %.3g/%.3g) guards=%d inputs_kept=%d",
             tu_dtype_name(dt), tu_dtype_name(wdt), tu_layout_name(layout), (long long)B,
             (long long)T, (long long)C, has_w ? "w" : "no-w", bw_name(mode),
             use_scratch ? " scratch" : "", (int)s, dxerr, dwerr, dberr, tol, tolw,
             tu_buf_guard_ok(&dx) && tu_buf_guard_ok(&dw) && tu_buf_guard_ok(&db),
             tu_buf_unchanged(&x) && tu_buf_unchanged(&dy) && tu_buf_unchanged(&w) &&
                 tu_buf_unchanged(&mean) && tu_buf_unchanged(&rstd));

    free(xd); free(dyd); free(wd); free(md); free(rd); free(yt); free(dxr); free(dxmag);
    free(dwr); free(dbr); free(dwabs); free(dbabs); free(dx0); free(dw0); free(db0);
    tu_buf_free(&x); tu_buf_free(&dy); tu_buf_free(&dx); tu_buf_free(&w); tu_buf_free(&mean);
    tu_buf_free(&rstd); tu_buf_free(&dw); tu_buf_free(&db); tu_buf_free(&scr);
}

/* ------------------------------------------------------------------------ */
/* hostile rows: large mean, small spread                                    */

static void run_hostile(int fused, int64_t N, int64_t C, double mu, double sd, double eps)
{
    tu_rng rng;
    tu_buf x, r, y, h, mean, rstd;
    pn_status s;
    double *xd, *hd, *yref, *mref, *rref, *yd, yerr, ymax, merr, rerr;
    int64_t i;
    int ok;

    rng.s = 777 + (uint64_t)C + (uint64_t)fused;
    x = tu_buf_vec(N * C, PN_FLOAT32);
    x.B = N; x.T = 1; x.C = C; x.sb = C; x.st = C; /* view as N rows */
    r = fused ? tu_buf_vec(N * C, PN_FLOAT32) : tu_buf_none();
    if (fused) { r.B = N; r.T = 1; r.C = C; r.sb = C; r.st = C; }
    y = tu_buf_vec(N * C, PN_FLOAT32);
    y.B = N; y.T = 1; y.C = C; y.sb = C; y.st = C;
    h = fused ? tu_buf_vec(N * C, PN_FLOAT32) : tu_buf_none();
    if (fused) { h.B = N; h.T = 1; h.C = C; h.sb = C; h.st = C; }
    mean = tu_buf_vec(N, PN_FLOAT32);
    rstd = tu_buf_vec(N, PN_FLOAT32);
    if (fused) {
        /* h = x + r: x carries the large mean, r the small spread */
        for (i = 0; i < N * C; i++) {
            tu_store(tu_ptr(&x), PN_FLOAT32, i, mu);
            tu_store(tu_ptr(&r), PN_FLOAT32, i, sd * tu_normal(&rng));
        }
    } else {
        for (i = 0; i < N * C; i++)
            tu_store(tu_ptr(&x), PN_FLOAT32, i, mu + sd * tu_normal(&rng));
    }
    if (fused)
        s = pn_add_layernorm_forward(tu_ptr(&y), tu_ptr(&h), tu_ptr(&mean), tu_ptr(&rstd),
                                     tu_ptr(&x), tu_ptr(&r), NULL, NULL, N, 1, C, eps,
                                     PN_FLOAT32, PN_FLOAT32, NULL);
    else
        s = pn_layernorm_forward(tu_ptr(&y), tu_ptr(&mean), tu_ptr(&rstd), tu_ptr(&x), NULL,
                                 NULL, N, 1, C, eps, PN_FLOAT32, PN_FLOAT32, NULL);
    xd = tu_gather(&x);
    hd = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    if (fused) {
        double *rd = tu_gather(&r);
        for (i = 0; i < N * C; i++) hd[i] = tu_add_round(PN_FLOAT32, xd[i], rd[i]);
        free(rd);
    } else {
        memcpy(hd, xd, (size_t)(N * C) * sizeof(double));
    }
    yref = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    mref = (double *)tu_xmalloc((size_t)N * sizeof(double));
    rref = (double *)tu_xmalloc((size_t)N * sizeof(double));
    tu_ref_forward(0, N, C, hd, NULL, NULL, eps, yref, mref, rref);
    yd = tu_gather(&y);
    yerr = tu_maxerr(yd, yref, N * C);
    ymax = tu_maxabs(yref, N * C);
    ok = stats_ok(&mean, &rstd, mref, rref, N, 3e-3, &merr, &rerr);
    ok = s == PN_OK && yerr < 3e-3 * ymax && ok;
    tu_check(ok,
             "hostile %s f32 N=%lld C=%lld mean=%g std=%g eps=%g: status=%d y_err=%.3g%% of max|y| "
             "(limit 0.3%%) mean_err=%.3g rstd_err=%.3g",
             fused ? "add_layernorm_forward" : "layernorm_forward", (long long)N, (long long)C,
             mu, sd, eps, (int)s, 100.0 * yerr / ymax, merr, rerr);

    /* backward on the same hostile rows, from the saved (float32) statistics */
    if (!fused) {
        tu_buf dy = tu_buf_vec(N * C, PN_FLOAT32), dx = tu_buf_vec(N * C, PN_FLOAT32);
        tu_buf dw = tu_buf_vec(C, PN_FLOAT32), db = tu_buf_vec(C, PN_FLOAT32);
        double *dyd, *md, *rd, *dxr, *dxmag, *dwr, *dbr, *dwa, *dba, *g, dxe, dwe, dxs, dws;
        dy.B = N; dy.T = 1; dy.C = C; dy.sb = C; dy.st = C;
        dx.B = N; dx.T = 1; dx.C = C; dx.sb = C; dx.st = C;
        for (i = 0; i < N * C; i++) tu_store(tu_ptr(&dy), PN_FLOAT32, i, tu_normal(&rng));
        md = (double *)tu_xmalloc((size_t)N * sizeof(double));
        rd = (double *)tu_xmalloc((size_t)N * sizeof(double));
        for (i = 0; i < N; i++) {
            tu_store(tu_ptr(&mean), PN_FLOAT32, i, mref[i]);
            tu_store(tu_ptr(&rstd), PN_FLOAT32, i, rref[i]);
            md[i] = tu_load(tu_ptr(&mean), PN_FLOAT32, i);
            rd[i] = tu_load(tu_ptr(&rstd), PN_FLOAT32, i);
        }
        s = pn_layernorm_backward(tu_ptr(&dx), tu_ptr(&dw), tu_ptr(&db), NULL, 0, tu_ptr(&dy),
                                  tu_ptr(&x), NULL, tu_ptr(&mean), tu_ptr(&rstd), N, 1, C, 0,
                                  PN_FLOAT32, PN_FLOAT32, NULL);
        dyd = tu_gather(&dy);
        dxr = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
        dxmag = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
        dwr = (double *)calloc((size_t)C, sizeof(double));
        dbr = (double *)calloc((size_t)C, sizeof(double));
        dwa = (double *)calloc((size_t)C, sizeof(double));
        dba = (double *)calloc((size_t)C, sizeof(double));
        tu_ref_backward(0, N, C, dyd, xd, NULL, md, rd, dxr, dwr, dbr, dxmag, dwa, dba);
        g = tu_gather(&dx);
        dxs = tu_maxabs(dxr, N * C);
        dxe = tu_maxerr(g, dxr, N * C) / dxs;
        free(g);
        g = tu_gather(&dw);
        dws = tu_maxabs(dwa, C);
        dwe = tu_maxerr(g, dwr, C) / dws;
        free(g);
        tu_check(s == PN_OK && dxe < 3e-3 && dwe < 3e-3,
                 "hostile layernorm_backward f32 N=%lld C=%lld mean=%g std=%g: status=%d "
                 "dx_err=%.3g%% dw_err=%.3g%% (limit 0.3%%)",
                 (long long)N, (long long)C, mu, sd, (int)s, 100 * dxe, 100 * dwe);
        free(dyd); free(md); free(rd); free(dxr); free(dxmag); free(dwr); free(dbr);
        free(dwa); free(dba);
        tu_buf_free(&dy); tu_buf_free(&dx); tu_buf_free(&dw); tu_buf_free(&db);
    }

    free(xd); free(hd); free(yref); free(mref); free(rref); free(yd);
    tu_buf_free(&x); tu_buf_free(&r); tu_buf_free(&y); tu_buf_free(&h);
    tu_buf_free(&mean); tu_buf_free(&rstd);
}

/* ------------------------------------------------------------------------ */
/* NaN / Inf rows                                                            */

static int row_has_nonfinite(const double *v, int64_t C)
{
    int64_t k;
    for (k = 0; k < C; k++)
        if (!isfinite(v[k]))
            return 1;
    return 0;
}

static void run_nonfinite(pn_dtype dt, int64_t C)
{
    const int64_t N = 6;
    const double eps = 1e-5;
    const pn_dtype sdt = tu_stat_dtype(dt);
    tu_rng rng;
    tu_buf x, y, mean, rstd, dy, dx, dw, db, r, y2, h2;
    pn_status s, s2, s3;
    double *xd, *yd, *yref, *mref, *rref, *dxr, *dxmag, *dwr, *dbr, *dwa, *dba, *dyd, *g, *md, *rd;
    double tol = tu_rtol_fwd(dt), btol = tu_rtol_bwd(dt);
    int64_t n, k;
    int ok = 1, bad_rows_ok = 1, fwd_ok = 1, bwd_ok = 1, fused_ok = 1;

    rng.s = 4242 + (uint64_t)C * 7 + (uint64_t)dt;
    x = tu_buf_rows(N, 1, C, dt, 0, 0);
    y = tu_buf_rows(N, 1, C, dt, 0, 0);
    mean = tu_buf_vec(N, sdt);
    rstd = tu_buf_vec(N, sdt);
    tu_fill_normal(&x, &rng, 0.0, 1.0);
    /* row 1: NaN inside; row 3: +Inf first (the element a kernel may shift
     * by); row 4: -Inf last; row 5: NaN first */
    tu_set(&x, 1, C / 2, NAN);
    tu_set(&x, 3, 0, INFINITY);
    tu_set(&x, 4, C - 1, -INFINITY);
    tu_set(&x, 5, 0, NAN);
    s = pn_layernorm_forward(tu_ptr(&y), tu_ptr(&mean), tu_ptr(&rstd), tu_ptr(&x), NULL, NULL, N,
                             1, C, eps, dt, dt, NULL);
    xd = tu_gather(&x);
    yd = tu_gather(&y);
    yref = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    mref = (double *)tu_xmalloc((size_t)N * sizeof(double));
    rref = (double *)tu_xmalloc((size_t)N * sizeof(double));
    tu_ref_forward(0, N, C, xd, NULL, NULL, eps, yref, mref, rref);
    for (n = 0; n < N; n++) {
        int bad = n == 1 || n == 3 || n == 4 || n == 5;
        if (bad) {
            if (!row_has_nonfinite(yd + n * C, C)) bad_rows_ok = 0;
        } else {
            double e = tu_maxerr(yd + n * C, yref + n * C, C);
            double m = tu_maxabs(yref + n * C, C);
            if (!(e <= tol * (m > 0 ? m : 1))) fwd_ok = 0;
        }
    }
    ok = s == PN_OK && bad_rows_ok && fwd_ok && tu_buf_guard_ok(&y);

    /* backward with those rows: clean rows must stay exact */
    dy = tu_buf_rows(N, 1, C, dt, 0, 0);
    dx = tu_buf_rows(N, 1, C, dt, 0, 0);
    dw = tu_buf_vec(C, dt);
    db = tu_buf_vec(C, dt);
    tu_fill_normal(&dy, &rng, 0.0, 1.0);
    md = (double *)tu_xmalloc((size_t)N * sizeof(double));
    rd = (double *)tu_xmalloc((size_t)N * sizeof(double));
    for (n = 0; n < N; n++) {
        tu_store(tu_ptr(&mean), sdt, n, mref[n]);
        tu_store(tu_ptr(&rstd), sdt, n, rref[n]);
        md[n] = tu_load(tu_ptr(&mean), sdt, n);
        rd[n] = tu_load(tu_ptr(&rstd), sdt, n);
    }
    s2 = pn_layernorm_backward(tu_ptr(&dx), tu_ptr(&dw), tu_ptr(&db), NULL, 0, tu_ptr(&dy),
                               tu_ptr(&x), NULL, tu_ptr(&mean), tu_ptr(&rstd), N, 1, C, 0, dt, dt,
                               NULL);
    dyd = tu_gather(&dy);
    dxr = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    dxmag = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    dwr = (double *)calloc((size_t)C, sizeof(double));
    dbr = (double *)calloc((size_t)C, sizeof(double));
    dwa = (double *)calloc((size_t)C, sizeof(double));
    dba = (double *)calloc((size_t)C, sizeof(double));
    tu_ref_backward(0, N, C, dyd, xd, NULL, md, rd, dxr, dwr, dbr, dxmag, dwa, dba);
    g = tu_gather(&dx);
    for (n = 0; n < N; n++) {
        int bad = n == 1 || n == 3 || n == 4 || n == 5;
        if (!bad) {
            double e = tu_maxerr(g + n * C, dxr + n * C, C);
            double m = tu_maxabs(dxmag + n * C, C);
            if (!(e <= btol * (m > 0 ? m : 1))) bwd_ok = 0;
        }
    }
    free(g);
    /* dbias does not depend on x: must stay exact for every column */
    g = tu_gather(&db);
    {
        double e = tu_maxerr(g, dbr, C), m = tu_maxabs(dba, C);
        if (!(e <= btol * (m > 0 ? m : 1))) bwd_ok = 0;
    }
    free(g);

    /* fused: the non-finite value comes from the residual */
    r = tu_buf_rows(N, 1, C, dt, 0, 0);
    y2 = tu_buf_rows(N, 1, C, dt, 0, 0);
    h2 = tu_buf_rows(N, 1, C, dt, 0, 0);
    for (n = 0; n < N; n++)
        for (k = 0; k < C; k++) {
            tu_set(&r, n, k, tu_get(&x, n, k));
            tu_set(&x, n, k, isfinite(tu_get(&x, n, k)) ? 0.5 : 1.0);
        }
    s3 = pn_add_layernorm_forward(tu_ptr(&y2), tu_ptr(&h2), NULL, NULL, tu_ptr(&x), tu_ptr(&r),
                                  NULL, NULL, N, 1, C, eps, dt, dt, NULL);
    g = tu_gather(&y2);
    for (n = 0; n < N; n++) {
        int bad = n == 1 || n == 3 || n == 4 || n == 5;
        if (bad && !row_has_nonfinite(g + n * C, C)) fused_ok = 0;
        if (!bad)
            for (k = 0; k < C; k++)
                if (!isfinite(g[n * C + k])) fused_ok = 0;
    }
    free(g);

    tu_check(ok && s2 == PN_OK && bwd_ok && s3 == PN_OK && fused_ok,
             "nan/inf rows layernorm %s C=%lld: status fwd=%d bwd=%d fused=%d, bad rows non-finite=%d, "
             "clean rows exact fwd=%d bwd=%d fused=%d",
             tu_dtype_name(dt), (long long)C, (int)s, (int)s2, (int)s3, bad_rows_ok, fwd_ok,
             bwd_ok, fused_ok);

    free(xd); free(yd); free(yref); free(mref); free(rref); free(dxr); free(dxmag); free(dwr);
    free(dbr); free(dwa); free(dba); free(dyd); free(md); free(rd);
    tu_buf_free(&x); tu_buf_free(&y); tu_buf_free(&mean); tu_buf_free(&rstd); tu_buf_free(&dy);
    tu_buf_free(&dx); tu_buf_free(&dw); tu_buf_free(&db); tu_buf_free(&r); tu_buf_free(&y2);
    tu_buf_free(&h2);
}

/* PYNORM_TEST_QUICK (testutil.h): the grid's rows of 768 values and more run
 * each shape with one dtype, in turn over shapes and widths */
static int quick_skip(int ci, int si, int di)
{
    return Cs[ci] >= 768 && tu_quick_skip(ci + si, di, NELEM(dtypes));
}

/* A one-row call (B = T = 1) checks its views the same as any other: every
 * overlap of an output with an input or another output is PN_ERR_ALIAS, y
 * over x in place is allowed, and an untouched neighbour is not an overlap. */
static void run_one_row_checks(int64_t C)
{
    float *mem = calloc((size_t)(4 * C + 8), sizeof(float));
    float *x = mem, *w = mem + C, *b = mem + 2 * C, *y = mem + 3 * C, *st = mem + 4 * C;
    struct { const char *what; float *out, *mean, *rstd; pn_status want; } cases[] = {
        {"y, mean, rstd apart", y, st + 4, st + 6, PN_OK},
        {"y over x (in place)", x, st + 4, st + 6, PN_OK},
        {"y = x + 1", x + 1, st + 4, st + 6, PN_ERR_ALIAS},
        {"y's last element is w[0]", w - C + 1, st + 4, st + 6, PN_ERR_ALIAS},
        {"y over b", b, st + 4, st + 6, PN_ERR_ALIAS},
        {"mean inside y", y, y + C - 1, st + 6, PN_ERR_ALIAS},
        {"rstd inside x", y, st + 4, x + C / 2, PN_ERR_ALIAS},
        {"mean == rstd", y, st + 4, st + 4, PN_ERR_ALIAS},
        {"y ends where mean starts", y, y + C, st + 6, PN_OK},
    };
    for (int i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) {
        for (int64_t j = 0; j < C; j++) { x[j] = (float)j; w[j] = 1; }
        pn_status st_ = pn_layernorm_forward(cases[i].out, cases[i].mean, cases[i].rstd, x, w, b, 1, 1, C, 1e-5,
                                             PN_FLOAT32, PN_FLOAT32, NULL);
        tu_check(st_ == cases[i].want, "one-row check C=%lld, %s: status %d, want %d", (long long)C,
                 cases[i].what, (int)st_, (int)cases[i].want);
    }
    free(mem);
}

int main(void)
{
    int ci, si, di, wm, mode;
    printf("pynorm %s, isa %s\n", pn_version(), pn_isa());

    for (ci = 0; ci < NELEM(Cs); ci++)
        for (si = 0; si < NELEM(shapes); si++)
            for (di = 0; di < NELEM(dtypes); di++)
                for (wm = 0; wm < 3 && !quick_skip(ci, si, di); wm++)
                    run_forward(0, shapes[si].B, shapes[si].T, Cs[ci], shapes[si].layout,
                                dtypes[di].dt, dtypes[di].wdt, wm, 1);
    for (di = 0; di < NELEM(dtypes); di++)
        run_forward(0, 3, 5, 768, TU_PADDED, dtypes[di].dt, dtypes[di].wdt, 2, 0);

    for (ci = 0; ci < NELEM(Cs); ci++)
        for (si = 0; si < NELEM(shapes); si++)
            for (di = 0; di < NELEM(dtypes); di++)
                for (wm = 0; wm < 3 && !quick_skip(ci, si, di); wm += 2)
                    run_forward(1, shapes[si].B, shapes[si].T, Cs[ci], shapes[si].layout,
                                dtypes[di].dt, dtypes[di].wdt, wm, 1);
    for (di = 0; di < NELEM(dtypes); di++)
        run_forward(1, 3, 5, 4097, TU_NEGATIVE, dtypes[di].dt, dtypes[di].wdt, 1, 0);

    for (ci = 0; ci < NELEM(Cs); ci++)
        for (si = 0; si < NELEM(shapes); si++)
            for (di = 0; di < NELEM(dtypes); di++)
                for (wm = 0; wm < 2 && !quick_skip(ci, si, di); wm++)
                    for (mode = 0; mode < BW_NMODES; mode++)
                        run_backward(shapes[si].B, shapes[si].T, Cs[ci], shapes[si].layout,
                                     dtypes[di].dt, dtypes[di].wdt, wm, mode,
                                     (ci + si + mode) % 2);

    run_hostile(0, 8, 4096, 1e4, 1e-2, 1e-5);
    run_hostile(1, 8, 4096, 1e4, 1e-2, 1e-5);
    run_hostile(0, 3, 65536, 1e4, 1e-2, 1e-5);
    run_hostile(0, 5, 4096, -3e5, 1.0, 1e-5);
    run_hostile(0, 5, 768, 1e15, 1e13, 1e-5);
    run_hostile(0, 5, 768, 1e-15, 1e-16, 0.0);

    for (di = 0; di < 4; di++) {
        run_nonfinite((pn_dtype)di, 7);
        run_nonfinite((pn_dtype)di, 768);
        run_nonfinite((pn_dtype)di, 4097);
    }
    tok_run_inplace_grid(0);
    run_one_row_checks(1);
    run_one_row_checks(64);

    /* many rows: several backward chunks of partial sums, threads over rows */
    for (si = 0; si < NELEM(many); si++)
        for (di = 0; di < NELEM(dtypes); di++) {
            run_forward(0, many[si].B, many[si].T, many[si].C, many[si].layout, dtypes[di].dt,
                        dtypes[di].wdt, 2, 1);
            run_forward(1, many[si].B, many[si].T, many[si].C, many[si].layout, dtypes[di].dt,
                        dtypes[di].wdt, 2, 1);
            run_backward(many[si].B, many[si].T, many[si].C, many[si].layout, dtypes[di].dt,
                         dtypes[di].wdt, 1, BW_ALL, 1);
            run_backward(many[si].B, many[si].T, many[si].C, many[si].layout, dtypes[di].dt,
                         dtypes[di].wdt, 0, BW_ACCUMULATE, 0);
        }

    /* outputs of 8 MiB and more (the library streams those) */
    for (di = 0; di < 4 && !tu_quick(); di++) {
        const pn_dtype dt = (pn_dtype)di;
        const int64_t es = (int64_t)tu_dtype_size(dt), B = 16 / es, T = 129, C = 4097;
        run_forward(0, B, T, C, TU_DENSE, dt, dt, 2, 1);
        run_forward(1, B, T, C, TU_NEGATIVE, dt, PN_FLOAT32, 2, 1);
        run_backward(B, T, C, TU_PADDED, dt, dt, 1, BW_ALL, 0);
        run_backward(B, T, C, TU_DENSE, dt, PN_FLOAT32, 1, BW_ACCUMULATE, 1);
        tok_run_inplace_streamed(0, dt);
    }
    return tu_summary();
}
