/* test_rmsnorm.c - RMSNorm forward, fused add+RMSNorm forward and backward
 * against a double-precision reference, for every dtype, weight dtype, row
 * layout (strides, negative strides, broadcast inputs) and a range of C;
 * extreme magnitudes; NaN/Inf rows. */
#include "testutil.h"
#include "token_inplace.h"

static const int64_t Cs[] = {1, 3, 7, 64, 768, 4097};

typedef struct {
    int64_t B, T;
    int layout;
} shape_t;

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

/* torch's default eps: the machine epsilon of the compute type */
static double default_eps(pn_dtype dt)
{
    return dt == PN_FLOAT64 ? 2.220446049250313e-16 : 1.1920928955078125e-07;
}

static uint64_t seed_of(int64_t B, int64_t T, int64_t C, int a, int b, int c)
{
    return (uint64_t)(B * 1000033 + T * 10009 + C * 103 + a * 7907 + b * 137 + c * 19 + 54321);
}

static int rstd_ok(const tu_buf *rstd, const double *rref, int64_t N, double tol, double *rerr)
{
    int64_t n;
    *rerr = 0;
    if (!rstd->mem)
        return 1;
    for (n = 0; n < N; n++) {
        double e = fabs(tu_load(tu_ptr(rstd), rstd->dt, n) - rref[n]) / rref[n];
        if (!(e <= *rerr)) *rerr = e;
    }
    return *rerr <= tol;
}

static void run_forward(int fused, int64_t B, int64_t T, int64_t C, int layout, pn_dtype dt,
                        pn_dtype wdt, int has_w, int want_stats, double eps)
{
    const int64_t N = B * T;
    const pn_dtype sdt = tu_stat_dtype(dt);
    tu_rng rng;
    tu_buf x, r, y, h, rstd, w;
    pn_strides st;
    pn_status s;
    double *xd, *rd = NULL, *hd, *wd = NULL, *yref, *rref, *yd;
    double yerr, ymax, rerr = 0, tol = tu_rtol_fwd(dt);
    int64_t i, hbad = 0;
    int ok, guards, kept;

    rng.s = seed_of(B, T, C, layout, (int)dt * 4 + (int)wdt, has_w + 3 * fused);
    x = tu_buf_layout(layout, 0, 1, B, T, C, dt);
    r = fused ? tu_buf_layout(layout, 2, 1, B, T, C, dt) : tu_buf_none();
    y = tu_buf_layout(layout, 1, 0, B, T, C, dt);
    h = fused ? tu_buf_layout(layout, 3, 0, B, T, C, dt) : tu_buf_none();
    rstd = want_stats ? tu_buf_vec(N, sdt) : tu_buf_none();
    w = has_w ? tu_buf_vec(C, wdt) : tu_buf_none();

    tu_fill_normal(&x, &rng, 0.5, 2.0);
    if (fused) tu_fill_normal(&r, &rng, -0.25, 1.0);
    if (w.mem) tu_fill_normal(&w, &rng, 1.0, 0.5);
    tu_buf_snapshot(&x);
    tu_buf_snapshot(&r);
    tu_buf_snapshot(&w);

    memset(&st, 0, sizeof st);
    st.inp = x.rows;
    st.out = y.rows;
    st.residual = r.rows;
    st.h = h.rows;
    if (fused)
        s = pn_add_rmsnorm_forward(tu_ptr(&y), tu_ptr(&h), tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&r),
                                   tu_ptr(&w), B, T, C, eps, dt, wdt,
                                   layout == TU_DENSE ? NULL : &st);
    else
        s = pn_rmsnorm_forward(tu_ptr(&y), tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&w), B, T, C, eps, dt,
                               wdt, layout == TU_DENSE ? NULL : &st);

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
    yref = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    rref = (double *)tu_xmalloc((size_t)N * sizeof(double));
    tu_ref_forward(1, N, C, hd, wd, NULL, eps, yref, NULL, rref);

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
    guards = tu_buf_guard_ok(&y) && tu_buf_guard_ok(&h) && tu_buf_guard_ok(&rstd);
    kept = tu_buf_unchanged(&x) && tu_buf_unchanged(&r) && tu_buf_unchanged(&w);
    ok = s == PN_OK && yerr <= tol * (ymax > 0 ? ymax : 1e-30) + 1e-300;
    ok = rstd_ok(&rstd, rref, N, dt == PN_FLOAT64 ? 1e-12 : 1e-5, &rerr) && ok;
    ok = ok && hbad == 0 && guards && kept;
    tu_check(ok,
             "%s %s/%s %s B=%lld T=%lld C=%lld %s eps=%g%s: status=%d y_err=%.3g (tol %.3g) "
             "rstd_err=%.3g h_mismatch=%lld guards=%d inputs_kept=%d",
             fused ? "add_rmsnorm_forward" : "rmsnorm_forward", tu_dtype_name(dt),
             tu_dtype_name(wdt), tu_layout_name(layout), (long long)B, (long long)T,
             (long long)C, has_w ? "w" : "no-w", eps, want_stats ? "" : " no-stats", (int)s,
             yerr / (ymax > 0 ? ymax : 1), tol, rerr, (long long)hbad, guards, kept);

    if (fused) { free(rd); free(hd); }
    free(xd); free(wd); free(yref); free(rref); free(yd);
    tu_buf_free(&x); tu_buf_free(&r); tu_buf_free(&y); tu_buf_free(&h);
    tu_buf_free(&rstd); tu_buf_free(&w);
}

enum { BW_ALL = 0, BW_ACCUMULATE, BW_DX_ONLY, BW_DW_ONLY, BW_NMODES };

static const char *bw_name(int m)
{
    switch (m) {
    case BW_ALL: return "dx+dw";
    case BW_ACCUMULATE: return "accumulate";
    case BW_DX_ONLY: return "dx-only";
    case BW_DW_ONLY: return "dw-only";
    }
    return "?";
}

static void run_backward(int64_t B, int64_t T, int64_t C, int layout, pn_dtype dt, pn_dtype wdt,
                         int has_w, int mode, int use_scratch)
{
    const int64_t N = B * T;
    const double eps = 1e-6;
    const pn_dtype sdt = tu_stat_dtype(dt);
    tu_rng rng;
    tu_buf x, dy, dx, w, rstd, dw, scr;
    pn_strides st;
    pn_status s;
    size_t need = 0;
    double *xd, *dyd, *wd = NULL, *rd, *yt, *dxr, *dwr, *dbr, *dxmag, *dwabs, *dbabs;
    double *dx0 = NULL, *dw0 = NULL;
    double dxerr = 0, dwerr = 0, dxscale = 0, dwscale = 0;
    double tol = tu_rtol_bwd(dt), tolw;
    int64_t i, n;
    int ok, want_dx, want_dw, guards, kept;

    want_dx = mode != BW_DW_ONLY;
    want_dw = mode != BW_DX_ONLY;
    tolw = tol > tu_rtol_fwd(wdt) ? tol : tu_rtol_fwd(wdt);

    rng.s = seed_of(B, T, C, layout + 10, (int)dt * 4 + (int)wdt, has_w * 8 + mode);
    x = tu_buf_layout(layout, 0, 1, B, T, C, dt);
    dy = tu_buf_layout(layout, 2, 1, B, T, C, dt);
    dx = want_dx ? tu_buf_layout(layout, 1, 0, B, T, C, dt) : tu_buf_none();
    w = has_w ? tu_buf_vec(C, wdt) : tu_buf_none();
    rstd = tu_buf_vec(N, sdt);
    dw = want_dw ? tu_buf_vec(C, wdt) : tu_buf_none();

    tu_fill_normal(&x, &rng, -0.3, 1.7);
    tu_fill_normal(&dy, &rng, 0.1, 1.0);
    if (w.mem) tu_fill_normal(&w, &rng, 1.0, 0.5);
    xd = tu_gather(&x);
    dyd = tu_gather(&dy);
    if (w.mem) wd = tu_gather(&w);

    rd = (double *)tu_xmalloc((size_t)N * sizeof(double));
    yt = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    tu_ref_forward(1, N, C, xd, NULL, NULL, eps, yt, NULL, rd);
    for (n = 0; n < N; n++) {
        tu_store(tu_ptr(&rstd), sdt, n, rd[n]);
        rd[n] = tu_load(tu_ptr(&rstd), sdt, n);
    }
    if (mode == BW_ACCUMULATE) {
        tu_fill_normal(&dx, &rng, 0.0, 1.0);
        tu_fill_normal(&dw, &rng, 0.0, 3.0);
        dx0 = tu_gather(&dx);
        dw0 = tu_gather(&dw);
    }
    tu_buf_snapshot(&x);
    tu_buf_snapshot(&dy);
    tu_buf_snapshot(&w);
    tu_buf_snapshot(&rstd);

    scr = tu_buf_none();
    if (use_scratch) {
        need = pn_rmsnorm_backward_scratch_size(B, T, C, dt);
        scr = tu_buf_vec((int64_t)need + 1, PN_BFLOAT16);
    }
    memset(&st, 0, sizeof st);
    st.inp = x.rows;
    st.dout = dy.rows;
    st.dinp = dx.rows;
    s = pn_rmsnorm_backward(tu_ptr(&dx), tu_ptr(&dw), use_scratch ? tu_ptr(&scr) : NULL,
                            use_scratch ? need : 0, tu_ptr(&dy), tu_ptr(&x), tu_ptr(&w),
                            tu_ptr(&rstd), B, T, C, mode == BW_ACCUMULATE ? PN_ACCUMULATE : 0,
                            dt, wdt, layout == TU_DENSE ? NULL : &st);

    dxr = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    dxmag = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    dwr = (double *)calloc((size_t)C, sizeof(double));
    dbr = (double *)calloc((size_t)C, sizeof(double));
    dwabs = (double *)calloc((size_t)C, sizeof(double));
    dbabs = (double *)calloc((size_t)C, sizeof(double));
    tu_ref_backward(1, N, C, dyd, xd, wd, NULL, rd, dxr, dwr, dbr, dxmag, dwabs, dbabs);
    if (mode == BW_ACCUMULATE) {
        for (i = 0; i < N * C; i++) dxr[i] += dx0[i];
        for (i = 0; i < C; i++) dwr[i] += dw0[i];
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
    guards = tu_buf_guard_ok(&dx) && tu_buf_guard_ok(&dw);
    kept = tu_buf_unchanged(&x) && tu_buf_unchanged(&dy) && tu_buf_unchanged(&w) &&
           tu_buf_unchanged(&rstd);
    ok = ok && guards && kept;
    tu_check(ok,
             "rmsnorm_backward %s/%s %s B=%lld T=%lld C=%lld %s %s%s: status=%d dx_err=%.3g "
             "dw_err=%.3g (tol %.3g/%.3g) guards=%d inputs_kept=%d",
             tu_dtype_name(dt), tu_dtype_name(wdt), tu_layout_name(layout), (long long)B,
             (long long)T, (long long)C, has_w ? "w" : "no-w", bw_name(mode),
             use_scratch ? " scratch" : "", (int)s, dxerr, dwerr, tol, tolw, guards, kept);

    free(xd); free(dyd); free(wd); free(rd); free(yt); free(dxr); free(dxmag); free(dwr);
    free(dbr); free(dwabs); free(dbabs); free(dx0); free(dw0);
    tu_buf_free(&x); tu_buf_free(&dy); tu_buf_free(&dx); tu_buf_free(&w); tu_buf_free(&rstd);
    tu_buf_free(&dw); tu_buf_free(&scr);
}

/* extreme magnitudes and large means (float32) */
static void run_magnitude(int64_t N, int64_t C, double mu, double sd, double eps)
{
    tu_rng rng;
    tu_buf x, y, rstd;
    pn_status s;
    double *xd, *yd, *yref, *rref, yerr, ymax, rerr;
    int ok;

    rng.s = 31337 + (uint64_t)C;
    x = tu_buf_rows(N, 1, C, PN_FLOAT32, 0, 0);
    y = tu_buf_rows(N, 1, C, PN_FLOAT32, 0, 0);
    rstd = tu_buf_vec(N, PN_FLOAT32);
    tu_fill_normal(&x, &rng, mu, sd);
    s = pn_rmsnorm_forward(tu_ptr(&y), tu_ptr(&rstd), tu_ptr(&x), NULL, N, 1, C, eps, PN_FLOAT32,
                           PN_FLOAT32, NULL);
    xd = tu_gather(&x);
    yd = tu_gather(&y);
    yref = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    rref = (double *)tu_xmalloc((size_t)N * sizeof(double));
    tu_ref_forward(1, N, C, xd, NULL, NULL, eps, yref, NULL, rref);
    yerr = tu_maxerr(yd, yref, N * C);
    ymax = tu_maxabs(yref, N * C);
    ok = rstd_ok(&rstd, rref, N, 1e-4, &rerr);
    ok = s == PN_OK && yerr <= 1e-4 * ymax && ok;
    tu_check(ok,
             "magnitude rmsnorm_forward f32 N=%lld C=%lld mean=%g std=%g eps=%g: status=%d "
             "y_err=%.3g of max|y| (limit 1e-4) rstd_err=%.3g",
             (long long)N, (long long)C, mu, sd, eps, (int)s, yerr / ymax, rerr);
    free(xd); free(yd); free(yref); free(rref);
    tu_buf_free(&x); tu_buf_free(&y); tu_buf_free(&rstd);
}

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
    const double eps = 1e-6;
    const pn_dtype sdt = tu_stat_dtype(dt);
    tu_rng rng;
    tu_buf x, y, rstd, dy, dx, dw, r, y2, h2;
    pn_status s, s2, s3;
    double *xd, *yd, *yref, *rref, *dxr, *dxmag, *dwr, *dbr, *dwa, *dba, *dyd, *g, *rd;
    double tol = tu_rtol_fwd(dt), btol = tu_rtol_bwd(dt);
    int64_t n, k;
    int bad_rows_ok = 1, fwd_ok = 1, bwd_ok = 1, fused_ok = 1;

    rng.s = 4243 + (uint64_t)C * 7 + (uint64_t)dt;
    x = tu_buf_rows(N, 1, C, dt, 0, 0);
    y = tu_buf_rows(N, 1, C, dt, 0, 0);
    rstd = tu_buf_vec(N, sdt);
    tu_fill_normal(&x, &rng, 0.0, 1.0);
    tu_set(&x, 1, C / 2, NAN);
    tu_set(&x, 3, 0, INFINITY);
    tu_set(&x, 4, C - 1, -INFINITY);
    tu_set(&x, 5, 0, NAN);
    s = pn_rmsnorm_forward(tu_ptr(&y), tu_ptr(&rstd), tu_ptr(&x), NULL, N, 1, C, eps, dt, dt, NULL);
    xd = tu_gather(&x);
    yd = tu_gather(&y);
    yref = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    rref = (double *)tu_xmalloc((size_t)N * sizeof(double));
    tu_ref_forward(1, N, C, xd, NULL, NULL, eps, yref, NULL, rref);
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

    dy = tu_buf_rows(N, 1, C, dt, 0, 0);
    dx = tu_buf_rows(N, 1, C, dt, 0, 0);
    dw = tu_buf_vec(C, dt);
    tu_fill_normal(&dy, &rng, 0.0, 1.0);
    rd = (double *)tu_xmalloc((size_t)N * sizeof(double));
    for (n = 0; n < N; n++) {
        tu_store(tu_ptr(&rstd), sdt, n, rref[n]);
        rd[n] = tu_load(tu_ptr(&rstd), sdt, n);
    }
    s2 = pn_rmsnorm_backward(tu_ptr(&dx), tu_ptr(&dw), NULL, 0, tu_ptr(&dy), tu_ptr(&x), NULL,
                             tu_ptr(&rstd), N, 1, C, 0, dt, dt, NULL);
    dyd = tu_gather(&dy);
    dxr = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    dxmag = (double *)tu_xmalloc((size_t)(N * C) * sizeof(double));
    dwr = (double *)calloc((size_t)C, sizeof(double));
    dbr = (double *)calloc((size_t)C, sizeof(double));
    dwa = (double *)calloc((size_t)C, sizeof(double));
    dba = (double *)calloc((size_t)C, sizeof(double));
    tu_ref_backward(1, N, C, dyd, xd, NULL, NULL, rd, dxr, dwr, dbr, dxmag, dwa, dba);
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

    r = tu_buf_rows(N, 1, C, dt, 0, 0);
    y2 = tu_buf_rows(N, 1, C, dt, 0, 0);
    h2 = tu_buf_rows(N, 1, C, dt, 0, 0);
    for (n = 0; n < N; n++)
        for (k = 0; k < C; k++) {
            tu_set(&r, n, k, tu_get(&x, n, k));
            tu_set(&x, n, k, isfinite(tu_get(&x, n, k)) ? 0.5 : 1.0);
        }
    s3 = pn_add_rmsnorm_forward(tu_ptr(&y2), tu_ptr(&h2), NULL, tu_ptr(&x), tu_ptr(&r), NULL, N,
                                1, C, eps, dt, dt, NULL);
    g = tu_gather(&y2);
    for (n = 0; n < N; n++) {
        int bad = n == 1 || n == 3 || n == 4 || n == 5;
        if (bad && !row_has_nonfinite(g + n * C, C)) fused_ok = 0;
        if (!bad)
            for (k = 0; k < C; k++)
                if (!isfinite(g[n * C + k])) fused_ok = 0;
    }
    free(g);

    tu_check(s == PN_OK && s2 == PN_OK && s3 == PN_OK && bad_rows_ok && fwd_ok && bwd_ok &&
                 fused_ok && tu_buf_guard_ok(&y),
             "nan/inf rows rmsnorm %s C=%lld: status fwd=%d bwd=%d fused=%d, bad rows non-finite=%d, "
             "clean rows exact fwd=%d bwd=%d fused=%d",
             tu_dtype_name(dt), (long long)C, (int)s, (int)s2, (int)s3, bad_rows_ok, fwd_ok,
             bwd_ok, fused_ok);

    free(xd); free(yd); free(yref); free(rref); free(dxr); free(dxmag); free(dwr); free(dbr);
    free(dwa); free(dba); free(dyd); free(rd);
    tu_buf_free(&x); tu_buf_free(&y); tu_buf_free(&rstd); tu_buf_free(&dy); tu_buf_free(&dx);
    tu_buf_free(&dw); tu_buf_free(&r); tu_buf_free(&y2); tu_buf_free(&h2);
}

/* PYNORM_TEST_QUICK (testutil.h): the grid's rows of 768 values and more run
 * each shape with one dtype, in turn over shapes and widths */
static int quick_skip(int ci, int si, int di)
{
    return Cs[ci] >= 768 && tu_quick_skip(ci + si, di, NELEM(dtypes));
}

int main(void)
{
    int ci, si, di, wm, mode;
    printf("pynorm %s, isa %s\n", pn_version(), pn_isa());

    for (ci = 0; ci < NELEM(Cs); ci++)
        for (si = 0; si < NELEM(shapes); si++)
            for (di = 0; di < NELEM(dtypes); di++)
                for (wm = 0; wm < 2 && !quick_skip(ci, si, di); wm++)
                    run_forward(0, shapes[si].B, shapes[si].T, Cs[ci], shapes[si].layout,
                                dtypes[di].dt, dtypes[di].wdt, wm, 1,
                                (si % 2) ? 1e-6 : default_eps(dtypes[di].dt));
    for (di = 0; di < NELEM(dtypes); di++)
        run_forward(0, 3, 5, 768, TU_PADDED, dtypes[di].dt, dtypes[di].wdt, 1, 0, 1e-5);

    for (ci = 0; ci < NELEM(Cs); ci++)
        for (si = 0; si < NELEM(shapes); si++)
            for (di = 0; di < NELEM(dtypes); di++)
                for (wm = 0; wm < 2 && !quick_skip(ci, si, di); wm++)
                    run_forward(1, shapes[si].B, shapes[si].T, Cs[ci], shapes[si].layout,
                                dtypes[di].dt, dtypes[di].wdt, wm, 1,
                                (si % 2) ? 1e-6 : default_eps(dtypes[di].dt));
    for (di = 0; di < NELEM(dtypes); di++)
        run_forward(1, 3, 5, 4097, TU_NEGATIVE, dtypes[di].dt, dtypes[di].wdt, 1, 0, 1e-6);

    for (ci = 0; ci < NELEM(Cs); ci++)
        for (si = 0; si < NELEM(shapes); si++)
            for (di = 0; di < NELEM(dtypes); di++)
                for (wm = 0; wm < 2 && !quick_skip(ci, si, di); wm++)
                    for (mode = 0; mode < BW_NMODES; mode++)
                        run_backward(shapes[si].B, shapes[si].T, Cs[ci], shapes[si].layout,
                                     dtypes[di].dt, dtypes[di].wdt, wm, mode,
                                     (ci + si + mode) % 2);

    run_magnitude(8, 4096, 1e4, 1e-2, 1e-6);
    run_magnitude(3, 65536, 0.0, 1.0, 1e-6);
    run_magnitude(5, 768, 1e15, 1e15, 1e-6);
    run_magnitude(5, 768, 0.0, 1e-15, 0.0);

    for (di = 0; di < 4; di++) {
        run_nonfinite((pn_dtype)di, 7);
        run_nonfinite((pn_dtype)di, 768);
        run_nonfinite((pn_dtype)di, 4097);
    }
    tok_run_inplace_grid(1);

    /* many rows: several backward chunks of partial sums, threads over rows */
    for (si = 0; si < NELEM(many); si++)
        for (di = 0; di < NELEM(dtypes); di++) {
            run_forward(0, many[si].B, many[si].T, many[si].C, many[si].layout, dtypes[di].dt,
                        dtypes[di].wdt, 1, 1, 1e-6);
            run_forward(1, many[si].B, many[si].T, many[si].C, many[si].layout, dtypes[di].dt,
                        dtypes[di].wdt, 1, 1, 1e-6);
            run_backward(many[si].B, many[si].T, many[si].C, many[si].layout, dtypes[di].dt,
                         dtypes[di].wdt, 1, BW_ALL, 1);
            run_backward(many[si].B, many[si].T, many[si].C, many[si].layout, dtypes[di].dt,
                         dtypes[di].wdt, 0, BW_ACCUMULATE, 0);
        }

    /* outputs of 8 MiB and more (the library streams those) */
    for (di = 0; di < 4 && !tu_quick(); di++) {
        const pn_dtype dt = (pn_dtype)di;
        const int64_t es = (int64_t)tu_dtype_size(dt), B = 16 / es, T = 129, C = 4097;
        run_forward(0, B, T, C, TU_DENSE, dt, dt, 1, 1, default_eps(dt));
        run_forward(1, B, T, C, TU_NEGATIVE, dt, PN_FLOAT32, 1, 1, 1e-6);
        run_backward(B, T, C, TU_PADDED, dt, dt, 1, BW_ALL, 0);
        run_backward(B, T, C, TU_DENSE, dt, PN_FLOAT32, 1, BW_ACCUMULATE, 1);
        tok_run_inplace_streamed(1, dt);
    }
    return tu_summary();
}
