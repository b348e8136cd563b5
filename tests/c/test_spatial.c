/* test_spatial.c - GroupNorm, InstanceNorm and BatchNorm (forward, backward,
 * running statistics) against a double-precision reference, for every dtype
 * and weight dtype, both layouts, spatial sizes from 1 to longer than a
 * piece, N = 1 and odd N; bad-input statuses with nothing written; in-place
 * calls; caller scratch; bit-identical results for 1, 2 and 3 threads. */
#include "testutil.h"

#define NELEM(a) ((int)(sizeof(a) / sizeof((a)[0])))

typedef struct {
    pn_dtype dt, wdt;
} dtypes_t;

static const dtypes_t dtypes[] = {
    {PN_FLOAT32, PN_FLOAT32}, {PN_FLOAT16, PN_FLOAT16}, {PN_FLOAT16, PN_FLOAT32},
    {PN_BFLOAT16, PN_BFLOAT16}, {PN_BFLOAT16, PN_FLOAT32}, {PN_FLOAT64, PN_FLOAT64},
    {PN_FLOAT64, PN_FLOAT32},
};

typedef struct {
    int64_t N, C, S, G;
} shape_t;

static const shape_t shapes[] = {
    {3, 8, 1, 2},      /* no spatial axes */
    {1, 32, 49, 8},    /* N = 1, 7x7 */
    {3, 16, 1024, 4},  /* 32x32, odd N */
    {2, 4, 4100, 2},   /* rows longer than a piece */
    {5, 6, 7, 6},      /* InstanceNorm (G = C) */
    {2, 64, 9, 32},
    {7, 3, 2, 1},
    {2, 1, 7, 1},      /* one channel: BatchNorm's rows are consecutive */
    {3, 1, 300, 1},
};

static const char *lname(pn_layout l) { return l == PN_NCHW ? "NCHW" : "NHWC"; }

/* Element (n, c, s) of an N x C x S buffer in a layout. */
static int64_t at(pn_layout l, int64_t N, int64_t C, int64_t S, int64_t n, int64_t c, int64_t s)
{
    (void)N;
    return l == PN_NCHW ? (n * C + c) * S + s : (n * S + s) * C + c;
}

static void *xalloc_dt(int64_t n, pn_dtype dt) { return tu_xmalloc((size_t)n * tu_dtype_size(dt)); }

static void fill(void *p, pn_dtype dt, int64_t n, tu_rng *r, double mu, double sd)
{
    for (int64_t i = 0; i < n; i++) tu_store(p, dt, i, mu + sd * tu_normal(r));
}

static double *as_doubles(const void *p, pn_dtype dt, int64_t n)
{
    double *d = (double *)tu_xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) d[i] = tu_load(p, dt, i);
    return d;
}

/* ------------------------------------------------------------------------ */
/* double references: statistics over "sets" (GroupNorm: (n, g); BatchNorm: c) */

/* set of element (n, c): GroupNorm n*G + c/(C/G), BatchNorm c (G = 0 marks BatchNorm) */
static int64_t set_of(int64_t n, int64_t c, int64_t C, int64_t G) { return G ? n * G + c / (C / G) : c; }

static void ref_stats(const double *x, pn_layout l, int64_t N, int64_t C, int64_t S, int64_t G, double eps,
                      double *mean, double *rstd, double *var)
{
    const int64_t nsets = G ? N * G : C;
    double *cnt = (double *)calloc((size_t)nsets, sizeof(double));
    for (int64_t k = 0; k < nsets; k++) mean[k] = var[k] = 0;
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                mean[set_of(n, c, C, G)] += x[at(l, N, C, S, n, c, s)];
                cnt[set_of(n, c, C, G)] += 1;
            }
    for (int64_t k = 0; k < nsets; k++) mean[k] /= cnt[k];
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                double d = x[at(l, N, C, S, n, c, s)] - mean[set_of(n, c, C, G)];
                var[set_of(n, c, C, G)] += d * d;
            }
    for (int64_t k = 0; k < nsets; k++) {
        var[k] /= cnt[k];
        rstd[k] = 1.0 / sqrt(var[k] + eps);
    }
    free(cnt);
}

/* y from per-set statistics */
static void ref_norm(const double *x, const double *w, const double *b, pn_layout l, int64_t N, int64_t C,
                     int64_t S, int64_t G, const double *mean, const double *rstd, double *y)
{
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                int64_t i = at(l, N, C, S, n, c, s), k = set_of(n, c, C, G);
                y[i] = (x[i] - mean[k]) * rstd[k] * (w ? w[c] : 1.0) + (b ? b[c] : 0.0);
            }
}

/* Gradients with the given statistics; `train`: the statistics depend on x.
 * dxmag: the largest magnitude of dx's terms; dwabs/dbabs: sums of |terms|. */
static void ref_backward(const double *dy, const double *x, const double *w, pn_layout l, int64_t N, int64_t C,
                         int64_t S, int64_t G, const double *mean, const double *rstd, int train, double *dx,
                         double *dw, double *db, double *dxmag, double *dwabs, double *dbabs)
{
    const int64_t nsets = G ? N * G : C;
    double *sg = (double *)calloc((size_t)nsets, sizeof(double)), *sgx = (double *)calloc((size_t)nsets, sizeof(double));
    double *cnt = (double *)calloc((size_t)nsets, sizeof(double));
    for (int64_t c = 0; c < C; c++) dw[c] = db[c] = dwabs[c] = dbabs[c] = 0;
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                int64_t i = at(l, N, C, S, n, c, s), k = set_of(n, c, C, G);
                double xh = (x[i] - mean[k]) * rstd[k], g = dy[i] * (w ? w[c] : 1.0);
                sg[k] += g;
                sgx[k] += g * xh;
                cnt[k] += 1;
                dw[c] += dy[i] * xh;
                db[c] += dy[i];
                dwabs[c] += fabs(dy[i] * xh);
                dbabs[c] += fabs(dy[i]);
            }
    *dxmag = 0;
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                int64_t i = at(l, N, C, S, n, c, s), k = set_of(n, c, C, G);
                double xh = (x[i] - mean[k]) * rstd[k], g = dy[i] * (w ? w[c] : 1.0);
                double mg = train ? sg[k] / cnt[k] : 0, mgx = train ? sgx[k] / cnt[k] : 0;
                double mag = rstd[k] * (fabs(g) + fabs(mg) + fabs(xh * mgx));
                dx[i] = rstd[k] * (g - mg - xh * mgx);
                if (mag > *dxmag) *dxmag = mag;
            }
    free(sg);
    free(sgx);
    free(cnt);
}

/* max |got - ref| / scale over n values of a buffer */
static double err_of(const void *got, pn_dtype dt, const double *ref, int64_t n, double scale)
{
    double *g = as_doubles(got, dt, n);
    double e = tu_maxerr(g, ref, n) / (scale > 0 ? scale : 1.0);
    free(g);
    return e;
}

/* parameter gradient errors relative to each channel's sum of |terms| */
static double grad_err(const void *got, pn_dtype dt, const double *ref, const double *absum, int64_t C)
{
    double m = 0;
    for (int64_t c = 0; c < C; c++) {
        double e = fabs(tu_load(got, dt, c) - ref[c]) / (absum[c] + 1e-30);
        if (!(e <= m)) m = e;
    }
    return m;
}

/* ------------------------------------------------------------------------ */
/* numeric checks */

static void run_case(int bn, int train, shape_t sh, pn_layout l, dtypes_t d, int affine)
{
    const int64_t N = sh.N, C = sh.C, S = sh.S, G = bn ? 0 : sh.G, n = N * C * S;
    const int64_t nst = bn ? C : N * G;
    const double eps = 1e-5, momentum = 0.25;
    const pn_dtype sdt = tu_stat_dtype(d.dt), rdt = d.wdt;
    tu_rng rng = {(uint64_t)(N * 131 + C * 17 + S * 7 + G + 1000 * bn + 100 * train + 10 * l + d.dt * 3 + d.wdt)};
    void *x = xalloc_dt(n, d.dt), *dy = xalloc_dt(n, d.dt), *y = xalloc_dt(n, d.dt), *dx = xalloc_dt(n, d.dt);
    void *w = affine ? xalloc_dt(C, d.wdt) : NULL, *b = affine ? xalloc_dt(C, d.wdt) : NULL;
    void *dw = xalloc_dt(C, d.wdt), *db = xalloc_dt(C, d.wdt);
    void *mean = xalloc_dt(nst, sdt), *rstd = xalloc_dt(nst, sdt);
    void *rm = bn ? xalloc_dt(C, rdt) : NULL, *rv = bn ? xalloc_dt(C, rdt) : NULL;
    double *rm0 = NULL, *rv0 = NULL;
    pn_status s1, s2;
    fill(x, d.dt, n, &rng, 0.5, 2.0);
    fill(dy, d.dt, n, &rng, 0.0, 1.0);
    if (affine) {
        fill(w, d.wdt, C, &rng, 1.0, 0.5);
        fill(b, d.wdt, C, &rng, 0.0, 1.0);
    }
    if (bn) {
        fill(rm, rdt, C, &rng, 0.0, 0.3);
        for (int64_t c = 0; c < C; c++) tu_store(rv, rdt, c, 0.5 + tu_uniform(&rng));
        rm0 = as_doubles(rm, rdt, C);
        rv0 = as_doubles(rv, rdt, C);
    }
    double *xd = as_doubles(x, d.dt, n), *dyd = as_doubles(dy, d.dt, n);
    double *wd = affine ? as_doubles(w, d.wdt, C) : NULL, *bd = affine ? as_doubles(b, d.wdt, C) : NULL;
    double *rmean = (double *)tu_xmalloc((size_t)nst * 8), *rrstd = (double *)tu_xmalloc((size_t)nst * 8);
    double *rvar = (double *)tu_xmalloc((size_t)nst * 8), *ry = (double *)tu_xmalloc((size_t)n * 8);
    double *rdx = (double *)tu_xmalloc((size_t)n * 8), *rdw = (double *)tu_xmalloc((size_t)C * 8);
    double *rdb = (double *)tu_xmalloc((size_t)C * 8), *wabs = (double *)tu_xmalloc((size_t)C * 8);
    double *babs = (double *)tu_xmalloc((size_t)C * 8), dxmag;
    const double tf = tu_rtol_fwd(d.dt), tb = tu_rtol_bwd(d.dt), tw = tu_rtol_bwd(d.wdt);

    if (bn) {
        s1 = pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, N, C, S, eps, momentum, 0,
                                  train ? PN_BN_TRAINING : 0, l, d.dt, d.wdt, rdt);
        s2 = pn_batchnorm_backward(dx, dw, db, NULL, 0, dy, x, w, mean, rstd, N, C, S, train ? PN_BN_TRAINING : 0,
                                   l, d.dt, d.wdt);
    } else {
        s1 = pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, sh.G, eps, l, d.dt, d.wdt);
        s2 = pn_groupnorm_backward(dx, dw, db, NULL, 0, dy, x, w, mean, rstd, N, C, S, sh.G, 0, l, d.dt, d.wdt);
    }
    if (!tu_check(s1 == PN_OK && s2 == PN_OK, "%s%s N=%lld C=%lld S=%lld G=%lld %s dt=%d wdt=%d %s: status %d %d",
                  bn ? "batchnorm" : "groupnorm", bn ? (train ? " train" : " eval") : "", (long long)N, (long long)C,
                  (long long)S, (long long)sh.G, lname(l), d.dt, d.wdt, affine ? "affine" : "plain", s1, s2))
        goto done;

    if (bn && !train) {   /* the running statistics */
        for (int64_t c = 0; c < C; c++) {
            rmean[c] = rm0[c];
            rrstd[c] = 1.0 / sqrt(rv0[c] + eps);
        }
    } else {
        ref_stats(xd, l, N, C, S, G, eps, rmean, rrstd, rvar);
    }
    ref_norm(xd, wd, bd, l, N, C, S, G, rmean, rrstd, ry);
    /* the backward from the statistics pynorm saved, as torch's does */
    double *pm = as_doubles(mean, sdt, nst), *pr = as_doubles(rstd, sdt, nst);
    ref_backward(dyd, xd, wd, l, N, C, S, G, pm, pr, !bn || train, rdx, rdw, rdb, &dxmag, wabs, babs);

    double ymax = tu_maxabs(ry, n), ey = err_of(y, d.dt, ry, n, ymax > 1 ? ymax : 1);
    double em = 0, er = 0;
    for (int64_t k = 0; k < nst; k++) {
        double e1 = fabs(pm[k] - rmean[k]) / (fabs(rmean[k]) + 1.0 / rrstd[k]);
        double e2 = fabs(pr[k] - rrstd[k]) / rrstd[k];
        if (!(e1 <= em)) em = e1;
        if (!(e2 <= er)) er = e2;
    }
    double ex = err_of(dx, d.dt, rdx, n, dxmag), ew = grad_err(dw, d.wdt, rdw, wabs, C);
    double eb = grad_err(db, d.wdt, rdb, babs, C);
    const double ts = sdt == PN_FLOAT64 ? 1e-12 : 2e-6;
    int ok = ey <= 2 * tf && em <= ts && er <= ts && ex <= 2 * tb && ew <= tw && eb <= tw;
    double erm = 0, erv = 0;
    if (bn && train) {   /* running = (1 - f) * running + f * batch, variance unbiased */
        const double cntn = (double)(N * S);
        for (int64_t c = 0; c < C; c++) {
            double em_ = (1 - momentum) * rm0[c] + momentum * rmean[c];
            double ev_ = (1 - momentum) * rv0[c] + momentum * rvar[c] * cntn / (cntn - 1);
            double e1 = fabs(tu_load(rm, rdt, c) - em_) / (fabs(em_) + 1), e2 = fabs(tu_load(rv, rdt, c) - ev_) / ev_;
            if (!(e1 <= erm)) erm = e1;
            if (!(e2 <= erv)) erv = e2;
        }
        ok = ok && erm <= 2 * tu_rtol_fwd(rdt) && erv <= 2 * tu_rtol_fwd(rdt);
    } else if (bn) {
        double *a = as_doubles(rm, rdt, C), *bb = as_doubles(rv, rdt, C);
        ok = ok && memcmp(a, rm0, (size_t)C * 8) == 0 && memcmp(bb, rv0, (size_t)C * 8) == 0;
        free(a);
        free(bb);
    }
    tu_check(ok, "  errors: y %.2g mean %.2g rstd %.2g dx %.2g dw %.2g db %.2g running %.2g %.2g", ey, em, er, ex, ew,
             eb, erm, erv);
    free(pm);
    free(pr);
done:
    free(x); free(dy); free(y); free(dx); free(w); free(b); free(dw); free(db); free(mean); free(rstd);
    free(rm); free(rv); free(rm0); free(rv0); free(xd); free(dyd); free(wd); free(bd); free(rmean); free(rrstd);
    free(rvar); free(ry); free(rdx); free(rdw); free(rdb); free(wabs); free(babs);
}

/* mean 1e4, std 1e-2 in float32: the statistics must keep their digits */
static void run_hostile(int bn, pn_layout l)
{
    const int64_t N = 4, C = 32, S = 256, G = bn ? 0 : 8, n = N * C * S, nst = bn ? C : N * G;
    tu_rng rng = {77 + (uint64_t)bn * 3 + (uint64_t)l};
    float *x = (float *)tu_xmalloc((size_t)n * 4), *y = (float *)tu_xmalloc((size_t)n * 4);
    float *mean = (float *)tu_xmalloc((size_t)nst * 4), *rstd = (float *)tu_xmalloc((size_t)nst * 4);
    double *xd = (double *)tu_xmalloc((size_t)n * 8), *ry = (double *)tu_xmalloc((size_t)n * 8);
    double *rmean = (double *)tu_xmalloc((size_t)nst * 8), *rrstd = (double *)tu_xmalloc((size_t)nst * 8);
    double *rvar = (double *)tu_xmalloc((size_t)nst * 8);
    for (int64_t i = 0; i < n; i++) xd[i] = x[i] = (float)(1e4 + 1e-2 * tu_normal(&rng));
    pn_status st = bn ? pn_batchnorm_forward(y, mean, rstd, NULL, NULL, x, NULL, NULL, N, C, S, 1e-5, 0.1, 0,
                                             PN_BN_TRAINING, l, PN_FLOAT32, PN_FLOAT32, PN_FLOAT32)
                      : pn_groupnorm_forward(y, mean, rstd, x, NULL, NULL, N, C, S, 8, 1e-5, l, PN_FLOAT32, PN_FLOAT32);
    ref_stats(xd, l, N, C, S, G, 1e-5, rmean, rrstd, rvar);
    ref_norm(xd, NULL, NULL, l, N, C, S, G, rmean, rrstd, ry);
    double e = err_of(y, PN_FLOAT32, ry, n, 1.0);
    tu_check(st == PN_OK && e < 2e-6, "%s hostile rows (mean 1e4, std 1e-2) %s: max |y err| %.2g",
             bn ? "batchnorm" : "groupnorm", lname(l), e);
    free(x); free(y); free(mean); free(rstd); free(xd); free(ry); free(rmean); free(rrstd); free(rvar);
}

/* ------------------------------------------------------------------------ */
/* in place, caller scratch, determinism */

/* All outputs of one op set, concatenated bytes, for comparisons. */
typedef struct {
    unsigned char *bytes;
    size_t n;
} blob;

static void blob_add(blob *bl, const void *p, size_t n)
{
    bl->bytes = (unsigned char *)realloc(bl->bytes, bl->n + n);
    memcpy(bl->bytes + bl->n, p, n);
    bl->n += n;
}

/* Runs GroupNorm and BatchNorm forward + backward; returns every output. */
static blob run_all(int64_t N, int64_t C, int64_t S, int64_t G, pn_layout l, pn_dtype dt, int use_scratch)
{
    const int64_t n = N * C * S;
    const size_t es = tu_dtype_size(dt), ses = dt == PN_FLOAT64 ? 8 : 4;
    tu_rng rng = {(uint64_t)(N * 7 + C * 5 + S * 3 + G + l + dt)};
    void *x = xalloc_dt(n, dt), *dy = xalloc_dt(n, dt), *y = xalloc_dt(n, dt), *dx = xalloc_dt(n, dt);
    void *w = xalloc_dt(C, dt), *b = xalloc_dt(C, dt), *dw = xalloc_dt(C, dt), *db = xalloc_dt(C, dt);
    void *mean = tu_xmalloc((size_t)(N * C) * ses), *rstd = tu_xmalloc((size_t)(N * C) * ses);
    float rm[2048], rv[2048];
    blob bl = {NULL, 0};
    size_t sz1 = pn_groupnorm_backward_scratch_size(N, C, S, G, l, dt);
    size_t sz2 = pn_batchnorm_backward_scratch_size(N, C, S, l, dt);
    void *scratch = use_scratch ? tu_xmalloc(sz1 > sz2 ? sz1 : sz2) : NULL;
    int ok = sz1 > 0 && sz2 > 0 && C <= 2048;
    fill(x, dt, n, &rng, 0.5, 2.0);
    fill(dy, dt, n, &rng, 0.0, 1.0);
    fill(w, dt, C, &rng, 1.0, 0.5);
    fill(b, dt, C, &rng, 0.0, 1.0);
    for (int64_t c = 0; c < C && c < 2048; c++) { rm[c] = 0; rv[c] = 1; }
    ok = ok && pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, G, 1e-5, l, dt, dt) == PN_OK;
    blob_add(&bl, y, (size_t)n * es);
    blob_add(&bl, mean, (size_t)(N * G) * ses);
    blob_add(&bl, rstd, (size_t)(N * G) * ses);
    ok = ok && pn_groupnorm_backward(dx, dw, db, scratch, use_scratch ? sz1 : 0, dy, x, w, mean, rstd, N, C, S, G, 0,
                                     l, dt, dt) == PN_OK;
    blob_add(&bl, dx, (size_t)n * es);
    blob_add(&bl, dw, (size_t)C * es);
    blob_add(&bl, db, (size_t)C * es);
    ok = ok && pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, PN_BN_TRAINING, l, dt,
                                    dt, PN_FLOAT32) == PN_OK;
    blob_add(&bl, y, (size_t)n * es);
    blob_add(&bl, mean, (size_t)C * ses);
    blob_add(&bl, rstd, (size_t)C * ses);
    blob_add(&bl, rm, (size_t)C * 4);
    blob_add(&bl, rv, (size_t)C * 4);
    ok = ok && pn_batchnorm_backward(dx, dw, db, scratch, use_scratch ? sz2 : 0, dy, x, w, mean, rstd, N, C, S,
                                     PN_BN_TRAINING, l, dt, dt) == PN_OK;
    blob_add(&bl, dx, (size_t)n * es);
    blob_add(&bl, dw, (size_t)C * es);
    blob_add(&bl, db, (size_t)C * es);
    if (!ok) { free(bl.bytes); bl.bytes = NULL; bl.n = 0; }
    free(x); free(dy); free(y); free(dx); free(w); free(b); free(dw); free(db); free(mean); free(rstd); free(scratch);
    return bl;
}

static void run_determinism(void)
{
    /* sizes where 1, 2 and 3 threads take different schedules (set-local or phased) */
    static const shape_t det[] = {{2, 32, 2304, 4}, {6, 8, 1600, 2}, {3, 16, 1600, 4}, {12, 8, 400, 8},
                                  {64, 300, 1, 3}, {2, 4, 9000, 1},
                                  {2, 1280, 40, 32} /* NHWC pieces of 25 and 15 rows */};
    static const pn_dtype dts[] = {PN_FLOAT32, PN_BFLOAT16, PN_FLOAT64};
    for (int i = 0; i < NELEM(det); i++)
        for (int li = 0; li < 2; li++)
            for (int k = 0; k < NELEM(dts); k++) {
                const pn_layout l = li ? PN_NHWC : PN_NCHW;
                blob ref;
                int same = 1;
                if (tu_quick_skip(2 * i + li, k, NELEM(dts)))
                    continue; /* quick mode (testutil.h): one dtype per (shape, layout), in turn */
                pn_set_num_threads(1);
                ref = run_all(det[i].N, det[i].C, det[i].S, det[i].G, l, dts[k], 0);
                for (int t = 2; t <= 3; t++) {
                    pn_set_num_threads(t);
                    blob got = run_all(det[i].N, det[i].C, det[i].S, det[i].G, l, dts[k], t == 3);
                    same = same && ref.n > 0 && got.n == ref.n && memcmp(got.bytes, ref.bytes, ref.n) == 0;
                    free(got.bytes);
                }
                pn_set_num_threads(0);
                tu_check(same, "bit-identical for 1/2/3 threads (and caller scratch): N=%lld C=%lld S=%lld G=%lld %s dt=%d",
                         (long long)det[i].N, (long long)det[i].C, (long long)det[i].S, (long long)det[i].G, lname(l),
                         dts[k]);
                free(ref.bytes);
            }
}

static void run_in_place(pn_layout l)
{
    const int64_t N = 3, C = 8, S = 50, G = 4, n = N * C * S;
    tu_rng rng = {99 + (uint64_t)l};
    float *x = (float *)tu_xmalloc((size_t)n * 4), *y = (float *)tu_xmalloc((size_t)n * 4);
    float *buf = (float *)tu_xmalloc((size_t)n * 4), *dy = (float *)tu_xmalloc((size_t)n * 4);
    float *dx = (float *)tu_xmalloc((size_t)n * 4), mean[64], rstd[64];
    fill(x, PN_FLOAT32, n, &rng, 0.5, 2.0);
    fill(dy, PN_FLOAT32, n, &rng, 0.0, 1.0);
    memcpy(buf, x, (size_t)n * 4);
    int ok = pn_groupnorm_forward(y, mean, rstd, x, NULL, NULL, N, C, S, G, 1e-5, l, PN_FLOAT32, PN_FLOAT32) == 0;
    ok = ok && pn_groupnorm_forward(buf, NULL, NULL, buf, NULL, NULL, N, C, S, G, 1e-5, l, PN_FLOAT32, PN_FLOAT32) == 0;
    ok = ok && memcmp(buf, y, (size_t)n * 4) == 0;
    ok = ok && pn_groupnorm_backward(dx, NULL, NULL, NULL, 0, dy, x, NULL, mean, rstd, N, C, S, G, 0, l, PN_FLOAT32,
                                     PN_FLOAT32) == 0;
    memcpy(buf, dy, (size_t)n * 4);
    ok = ok && pn_groupnorm_backward(buf, NULL, NULL, NULL, 0, buf, x, NULL, mean, rstd, N, C, S, G, 0, l, PN_FLOAT32,
                                     PN_FLOAT32) == 0;
    ok = ok && memcmp(buf, dx, (size_t)n * 4) == 0;
    memcpy(buf, x, (size_t)n * 4);
    ok = ok && pn_batchnorm_forward(y, mean, rstd, NULL, NULL, x, NULL, NULL, N, C, S, 1e-5, 0.1, 0, PN_BN_TRAINING, l,
                                    PN_FLOAT32, PN_FLOAT32, PN_FLOAT32) == 0;
    ok = ok && pn_batchnorm_forward(buf, NULL, NULL, NULL, NULL, buf, NULL, NULL, N, C, S, 1e-5, 0.1, 0,
                                    PN_BN_TRAINING, l, PN_FLOAT32, PN_FLOAT32, PN_FLOAT32) == 0;
    ok = ok && memcmp(buf, y, (size_t)n * 4) == 0;
    tu_check(ok, "in place (out = x, dx = dy) gives the out-of-place bits, %s", lname(l));
    free(x); free(y); free(buf); free(dy); free(dx);
}

/* momentum=None: factor 1/num_batches_tracked; accumulate */
static void run_cumulative_and_accumulate(void)
{
    const int64_t N = 4, C = 3, S = 5, n = N * C * S;
    double x[60], y[60], rm[3] = {1, 2, 3}, rv[3] = {1, 1, 1}, mean[3], rstd[3], var[3];
    double dx[60], dw[3], db[3], dx2[60], dw2[3], db2[3], dy[60];
    tu_rng rng = {5};
    for (int64_t i = 0; i < n; i++) { x[i] = tu_normal(&rng); dy[i] = tu_normal(&rng); }
    pn_status st = pn_batchnorm_forward(y, mean, rstd, rm, rv, x, NULL, NULL, N, C, S, 1e-5, 123.0, 4,
                                        PN_BN_TRAINING | PN_BN_CUMULATIVE, PN_NCHW, PN_FLOAT64, PN_FLOAT64, PN_FLOAT64);
    double rmean[3], rrstd[3];
    ref_stats(x, PN_NCHW, N, C, S, 0, 1e-5, rmean, rrstd, var);
    double e = 0;
    for (int c = 0; c < 3; c++) {
        e = tu_nanmax(e, fabs(rm[c] - (0.75 * (c + 1) + 0.25 * rmean[c])));
        e = tu_nanmax(e, fabs(rv[c] - (0.75 + 0.25 * var[c] * 20.0 / 19.0)));
    }
    tu_check(st == PN_OK && e < 1e-14, "PN_BN_CUMULATIVE: factor 1/num_batches_tracked (err %.2g)", e);
    st = pn_batchnorm_backward(dx, dw, db, NULL, 0, dy, x, NULL, mean, rstd, N, C, S, PN_BN_TRAINING, PN_NCHW,
                               PN_FLOAT64, PN_FLOAT64);
    for (int64_t i = 0; i < n; i++) dx2[i] = 1.0;
    for (int c = 0; c < 3; c++) dw2[c] = db2[c] = 2.0;
    pn_status st2 = pn_batchnorm_backward(dx2, dw2, db2, NULL, 0, dy, x, NULL, mean, rstd, N, C, S,
                                          PN_BN_TRAINING | PN_ACCUMULATE, PN_NCHW, PN_FLOAT64, PN_FLOAT64);
    e = 0;
    for (int64_t i = 0; i < n; i++) e = tu_nanmax(e, fabs(dx2[i] - (dx[i] + 1.0)));
    for (int c = 0; c < 3; c++) e = tu_nanmax(tu_nanmax(e, fabs(dw2[c] - (dw[c] + 2.0))), fabs(db2[c] - (db[c] + 2.0)));
    tu_check(st == PN_OK && st2 == PN_OK && e < 1e-13, "PN_ACCUMULATE adds into dx, dweight, dbias (err %.2g)", e);
}

/* ------------------------------------------------------------------------ */
/* bad input: the status, and nothing written */

#define SENT 0x5A

static int untouched(const void *p, size_t n)
{
    const unsigned char *c = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++)
        if (c[i] != SENT) return 0;
    return 1;
}

static void run_errors(void)
{
    enum { N = 2, C = 8, S = 6, NN = N * C * S };
    float x[NN], dy[NN], w[C], b[C];
    float y[NN], dx[NN], mean[C], rstd[C], dw[C], db[C], rm[C], rv[C], smean[N * 2], srstd[N * 2];
    const pn_layout L = PN_NCHW;
    const pn_dtype F = PN_FLOAT32;
    tu_rng rng = {1};
    for (int i = 0; i < NN; i++) { x[i] = (float)tu_normal(&rng); dy[i] = (float)tu_normal(&rng); }
    for (int c = 0; c < C; c++) { w[c] = 1; b[c] = 0; }
    pn_groupnorm_forward(y, smean, srstd, x, NULL, NULL, N, C, S, 2, 1e-5, L, F, F);
#define RESET() do { memset(y, SENT, sizeof y); memset(dx, SENT, sizeof dx); memset(mean, SENT, sizeof mean);  \
        memset(rstd, SENT, sizeof rstd); memset(dw, SENT, sizeof dw); memset(db, SENT, sizeof db);              \
        memset(rm, SENT, sizeof rm); memset(rv, SENT, sizeof rv); } while (0)
#define CLEAN() (untouched(y, sizeof y) && untouched(dx, sizeof dx) && untouched(mean, sizeof mean) &&           \
                 untouched(rstd, sizeof rstd) && untouched(dw, sizeof dw) && untouched(db, sizeof db) &&        \
                 untouched(rm, sizeof rm) && untouched(rv, sizeof rv))
#define EXPECT(call, want, what) do { RESET(); pn_status s_ = (call);                                           \
        tu_check(s_ == (want) && CLEAN(), "error: %s -> %d (want %d), nothing written", what, s_, want); } while (0)

    /* GroupNorm forward */
    EXPECT(pn_groupnorm_forward(y, mean, rstd, NULL, w, b, N, C, S, 2, 1e-5, L, F, F), PN_ERR_NULL, "gn x NULL");
    EXPECT(pn_groupnorm_forward(NULL, mean, rstd, x, w, b, N, C, S, 2, 1e-5, L, F, F), PN_ERR_NULL, "gn out NULL");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, 3, 1e-5, L, F, F), PN_ERR_GROUPS, "gn G=3, C=8");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, 0, 1e-5, L, F, F), PN_ERR_GROUPS, "gn G=0");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, -2, 1e-5, L, F, F), PN_ERR_GROUPS, "gn G=-2");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, 16, 1e-5, L, F, F), PN_ERR_GROUPS, "gn G=16 > C");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, 0, C, S, 2, 1e-5, L, F, F), PN_ERR_SIZE, "gn N=0");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, -1, 2, 1e-5, L, F, F), PN_ERR_SIZE, "gn S=-1");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, INT64_MAX / 2, C, S, 2, 1e-5, L, F, F), PN_ERR_SIZE,
           "gn N*C*S overflows");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, 2, -1.0, L, F, F), PN_ERR_EPS, "gn eps < 0");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, 2, NAN, L, F, F), PN_ERR_EPS, "gn eps NaN");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, 2, 1e-5, (pn_layout)2, F, F), PN_ERR_ARG,
           "gn layout 2");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, 2, 1e-5, L, (pn_dtype)7, F), PN_ERR_DTYPE,
           "gn dtype 7");
    EXPECT(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, 2, 1e-5, L, F, PN_FLOAT16), PN_ERR_DTYPE,
           "gn f32 x with f16 weight");
    tu_check(pn_groupnorm_forward(y, mean, rstd, x, w, b, N, C, S, 2, 1e-5, L, F, F) == PN_OK, "gn good call");
    EXPECT(pn_groupnorm_forward(x + 3, mean, rstd, x, w, b, N, C, S, 2, 1e-5, L, F, F), PN_ERR_ALIAS,
           "gn out overlapping x (shifted)");
    EXPECT(pn_groupnorm_forward(y, y + 10, rstd, x, w, b, N, C, S, 2, 1e-5, L, F, F), PN_ERR_ALIAS,
           "gn mean inside out");
    EXPECT(pn_groupnorm_forward(y, (void *)w, rstd, x, w, b, N, C, S, 2, 1e-5, L, F, F), PN_ERR_ALIAS,
           "gn mean over weight");
    /* GroupNorm backward */
    EXPECT(pn_groupnorm_backward(dx, dw, db, NULL, 0, NULL, x, w, smean, srstd, N, C, S, 2, 0, L, F, F), PN_ERR_NULL,
           "gn bwd dy NULL");
    EXPECT(pn_groupnorm_backward(dx, dw, db, NULL, 0, dy, x, w, NULL, srstd, N, C, S, 2, 0, L, F, F), PN_ERR_NULL,
           "gn bwd mean NULL");
    EXPECT(pn_groupnorm_backward(dx, dw, db, NULL, 0, dy, x, w, smean, srstd, N, C, S, 5, 0, L, F, F), PN_ERR_GROUPS,
           "gn bwd G=5");
    EXPECT(pn_groupnorm_backward(dx, dw, db, NULL, 0, dy, x, w, smean, srstd, N, C, S, 2, 8, L, F, F), PN_ERR_ARG,
           "gn bwd flags 8");
    {
        unsigned char small[64];
        EXPECT(pn_groupnorm_backward(dx, dw, db, small, sizeof small, dy, x, w, smean, srstd, N, C, S, 2, 0, L, F, F),
               PN_ERR_SCRATCH, "gn bwd scratch too small");
    }
    EXPECT(pn_groupnorm_backward(dx, dw, dw + 2, NULL, 0, dy, x, w, smean, srstd, N, C, S, 2, 0, L, F, F), PN_ERR_ALIAS,
           "gn bwd dbias overlapping dweight");
    EXPECT(pn_groupnorm_backward(x + 1, dw, db, NULL, 0, dy, x, w, smean, srstd, N, C, S, 2, 0, L, F, F),
           PN_ERR_ALIAS, "gn bwd dx overlapping x (shifted)");
    tu_check(pn_groupnorm_backward_scratch_size(N, C, S, 3, L, F) == 0, "scratch size 0 for bad groups");
    tu_check(pn_groupnorm_backward_scratch_size(N, C, S, 2, (pn_layout)5, F) == 0, "scratch size 0 for a bad layout");
    tu_check(pn_batchnorm_backward_scratch_size(-1, C, S, L, F) == 0, "scratch size 0 for bad sizes");

    /* BatchNorm forward */
    const int T = PN_BN_TRAINING;
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, 1, C, 1, 1e-5, 0.1, 0, T, L, F, F, F), PN_ERR_SIZE,
           "bn training with N*S = 1");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, 1, C, 1, 1e-5, 0.1, 0, T, PN_NHWC, F, F, F),
           PN_ERR_SIZE, "bn training with N*S = 1, NHWC");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, NULL, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, 0, L, F, F, F), PN_ERR_NULL,
           "bn eval without running_mean");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, N, C, S, 1e-5, NAN, 0, T, L, F, F, F), PN_ERR_ARG,
           "bn momentum NaN");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, N, C, S, 1e-5, INFINITY, 0, T, L, F, F, F), PN_ERR_ARG,
           "bn momentum Inf");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, T | PN_BN_CUMULATIVE, L, F, F,
                                F), PN_ERR_ARG, "bn cumulative with num_batches_tracked 0");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, T | 64, L, F, F, F), PN_ERR_ARG,
           "bn unknown flag");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, T, L, F, F, PN_BFLOAT16),
           PN_ERR_DTYPE, "bn f32 x with bf16 running stats");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rm, x, w, b, N, C, S, 1e-5, 0.1, 0, T, L, F, F, F), PN_ERR_ALIAS,
           "bn running_mean == running_var");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, T, (pn_layout)-1, F, F, F),
           PN_ERR_ARG, "bn layout -1");
    EXPECT(pn_batchnorm_forward(y, mean, rstd, rm, rv, x, w, b, N, C, S, -1e-5, 0.1, 0, T, L, F, F, F), PN_ERR_EPS,
           "bn eps < 0");
    EXPECT(pn_batchnorm_forward(y, rm, rstd, rm, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, T, L, F, F, F), PN_ERR_ALIAS,
           "bn mean over running_mean");
    EXPECT(pn_batchnorm_forward(y, rv, rstd, rm, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, 0, L, F, F, F), PN_ERR_ALIAS,
           "bn eval: mean written over running_var");
    /* BatchNorm backward */
    EXPECT(pn_batchnorm_backward(dx, dw, db, NULL, 0, dy, x, w, NULL, srstd, N, C, S, T, L, F, F), PN_ERR_NULL,
           "bn bwd mean NULL");
    EXPECT(pn_batchnorm_backward(dx, dw, db, NULL, 0, dy, x, w, smean, srstd, N, C, S, T | PN_BN_CUMULATIVE, L, F, F),
           PN_ERR_ARG, "bn bwd cumulative flag");
    EXPECT(pn_batchnorm_backward(dx, dw, db, NULL, 0, dy, x, w, smean, srstd, N, 0, S, T, L, F, F), PN_ERR_SIZE,
           "bn bwd C=0");
    EXPECT(pn_batchnorm_backward(NULL, NULL, NULL, NULL, 0, dy, x, w, smean, srstd, N, C, S, T, L, F, F), PN_OK,
           "bn bwd with no outputs does nothing");
#undef EXPECT
#undef CLEAN
#undef RESET
}

/* PYNORM_TEST_QUICK (testutil.h): shapes of 10000 values and more run with
 * one dtype (k) per (op, shape, layout), in turn */
static int quick_skip(shape_t sh, int i, int k)
{
    return sh.N * sh.C * sh.S >= 10000 && tu_quick_skip(i, k, NELEM(dtypes));
}

int main(void)
{
    printf("pynorm %s, isa %s\n", pn_version(), pn_isa());
    for (int bn = 0; bn < 2; bn++)
        for (int train = bn ? 0 : 1; train < 2; train++)
            for (int i = 0; i < NELEM(shapes); i++)
                for (int li = 0; li < 2; li++)
                    for (int k = 0; k < NELEM(dtypes); k++)
                        for (int affine = 0; affine < 2 && !quick_skip(shapes[i], bn + train + i + li, k); affine++)
                            run_case(bn, train, shapes[i], li ? PN_NHWC : PN_NCHW, dtypes[k], affine);
    for (int bn = 0; bn < 2; bn++) {
        run_hostile(bn, PN_NCHW);
        run_hostile(bn, PN_NHWC);
    }
    run_in_place(PN_NCHW);
    run_in_place(PN_NHWC);
    run_cumulative_and_accumulate();
    run_errors();
    run_determinism();
    return tu_summary();
}
