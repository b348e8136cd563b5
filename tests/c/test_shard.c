/* test_shard.c - the sharded-statistics API (tensor-parallel LayerNorm and
 * RMSNorm, synchronized BatchNorm) on its own: rows split in column shards
 * (or a batch split in sample shards), each shard's statistics combined, and
 * the results compared with the unsharded ops and a double reference;
 * hostile rows (mean 1e4, std 1e-2); bad arguments return their status
 * without writing anything.
 */
#include "testutil.h"

static const pn_dtype DTYPES[4] = {PN_FLOAT32, PN_FLOAT64, PN_BFLOAT16, PN_FLOAT16};

/* max |a - b| over n doubles */
static double maxdiff(const double *a, const double *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = tu_nanmax(m, fabs(a[i] - b[i]));
    return m;
}

/* an array of n values of dtype dt, read back as doubles */
static double *as_doubles(const void *p, pn_dtype dt, int64_t n) {
    double *d = tu_xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) d[i] = tu_load(p, dt, i);
    return d;
}

/* columns [c0, c0 + w) of rows x C (dtype dt) into a dense rows x w buffer */
static void *take_cols(const void *full, pn_dtype dt, int64_t rows, int64_t C, int64_t c0, int64_t w) {
    void *s = tu_xmalloc((size_t)(rows * w) * tu_dtype_size(dt));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < w; j++) tu_store(s, dt, r * w + j, tu_load(full, dt, r * C + c0 + j));
    return s;
}
static void put_cols(double *full, const void *s, pn_dtype dt, int64_t rows, int64_t C, int64_t c0, int64_t w) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < w; j++) full[r * C + c0 + j] = tu_load(s, dt, r * w + j);
}

/* one token-norm case: rows x C split into P shards of the given widths */
static void token_case(int rms, pn_dtype dt, int64_t rows, int64_t C, int P, const int64_t *widths,
                       double loc, double sd, unsigned seed) {
    const char *op = rms ? "rmsnorm" : "layernorm";
    const size_t es = tu_dtype_size(dt);
    tu_rng rng = {seed};
    void *x = tu_xmalloc((size_t)(rows * C) * es), *dy = tu_xmalloc((size_t)(rows * C) * es);
    void *w = tu_xmalloc((size_t)C * es), *b = tu_xmalloc((size_t)C * es);
    for (int64_t i = 0; i < rows * C; i++) {
        tu_store(x, dt, i, loc + sd * tu_normal(&rng));
        tu_store(dy, dt, i, tu_normal(&rng));
    }
    for (int64_t i = 0; i < C; i++) {
        tu_store(w, dt, i, 1 + 0.5 * tu_normal(&rng));
        tu_store(b, dt, i, 0.5 * tu_normal(&rng));
    }
    /* unsharded results */
    void *y_full = tu_xmalloc((size_t)(rows * C) * es), *dx_full = tu_xmalloc((size_t)(rows * C) * es);
    void *dw_full = tu_xmalloc((size_t)C * es), *db_full = tu_xmalloc((size_t)C * es);
    const size_t ses = dt == PN_FLOAT64 ? 8 : 4;
    void *mean_f = tu_xmalloc((size_t)rows * ses), *rstd_f = tu_xmalloc((size_t)rows * ses);
    pn_status st;
    if (rms) {
        st = pn_rmsnorm_forward(y_full, rstd_f, x, w, 1, rows, C, 1e-6, dt, dt, NULL);
        if (!st) st = pn_rmsnorm_backward(dx_full, dw_full, NULL, 0, dy, x, w, rstd_f, 1, rows, C, 0, dt, dt, NULL);
    } else {
        st = pn_layernorm_forward(y_full, mean_f, rstd_f, x, w, b, 1, rows, C, 1e-5, dt, dt, NULL);
        if (!st) st = pn_layernorm_backward(dx_full, dw_full, db_full, NULL, 0, dy, x, w, mean_f, rstd_f,
                                            1, rows, C, 0, dt, dt, NULL);
    }
    tu_check(st == PN_OK, "%s %s C=%lld unsharded ops run", op, tu_dtype_name(dt), (long long)C);

    /* sharded: stats into slots, combine, apply; backward sums totalled, backward */
    const int per = rms ? 1 : 2;
    double *parts = tu_xmalloc((size_t)(P * rows * per) * sizeof(double));
    double *mean = tu_xmalloc((size_t)rows * sizeof(double)), *rstd = tu_xmalloc((size_t)rows * sizeof(double));
    double *sums = tu_xmalloc((size_t)(rows * per) * sizeof(double)), *psum = tu_xmalloc((size_t)(rows * per) * sizeof(double));
    double *y = tu_xmalloc((size_t)(rows * C) * sizeof(double)), *dx = tu_xmalloc((size_t)(rows * C) * sizeof(double));
    double *dw = tu_xmalloc((size_t)C * sizeof(double)), *db = tu_xmalloc((size_t)C * sizeof(double));
    void *xs[8], *dys[8], *ws[8], *bs[8];
    int ok = 1;
    int64_t c0 = 0;
    for (int p = 0; p < P; c0 += widths[p], p++) {
        xs[p] = take_cols(x, dt, rows, C, c0, widths[p]);
        dys[p] = take_cols(dy, dt, rows, C, c0, widths[p]);
        ws[p] = take_cols(w, dt, 1, C, c0, widths[p]);
        bs[p] = take_cols(b, dt, 1, C, c0, widths[p]);
        st = rms ? pn_rmsnorm_shard_stats(parts + p * rows, xs[p], 1, rows, widths[p], dt, NULL)
                 : pn_layernorm_shard_stats(parts + 2 * p * rows, xs[p], 1, rows, widths[p], dt, NULL);
        ok &= st == PN_OK;
    }
    st = rms ? pn_rmsnorm_shard_combine(rstd, parts, widths, P, rows, 1e-6)
             : pn_layernorm_shard_combine(mean, rstd, parts, widths, P, rows, 1e-5);
    ok &= st == PN_OK;
    for (int64_t i = 0; i < rows * per; i++) sums[i] = 0;
    c0 = 0;
    for (int p = 0; p < P; c0 += widths[p], p++) {
        void *ys = tu_xmalloc((size_t)(rows * widths[p]) * es);
        st = rms ? pn_rmsnorm_shard_apply(ys, xs[p], ws[p], rstd, 1, rows, widths[p], dt, dt, NULL)
                 : pn_layernorm_shard_apply(ys, xs[p], ws[p], bs[p], mean, rstd, 1, rows, widths[p], dt, dt, NULL);
        ok &= st == PN_OK;
        put_cols(y, ys, dt, rows, C, c0, widths[p]);
        free(ys);
        st = rms ? pn_rmsnorm_shard_backward_sums(psum, dys[p], xs[p], ws[p], rstd, 1, rows, widths[p], dt, dt, NULL)
                 : pn_layernorm_shard_backward_sums(psum, dys[p], xs[p], ws[p], mean, rstd, 1, rows, widths[p],
                                                    dt, dt, NULL);
        ok &= st == PN_OK;
        for (int64_t i = 0; i < rows * per; i++) sums[i] += psum[i];
    }
    c0 = 0;
    for (int p = 0; p < P; c0 += widths[p], p++) {
        void *dxs = tu_xmalloc((size_t)(rows * widths[p]) * es);
        void *dws = tu_xmalloc((size_t)widths[p] * es), *dbs = tu_xmalloc((size_t)widths[p] * es);
        st = rms ? pn_rmsnorm_shard_backward(dxs, dws, NULL, 0, dys[p], xs[p], ws[p], rstd, sums, 1, rows,
                                             widths[p], C, 0, dt, dt, NULL)
                 : pn_layernorm_shard_backward(dxs, dws, dbs, NULL, 0, dys[p], xs[p], ws[p], mean, rstd, sums,
                                               1, rows, widths[p], C, 0, dt, dt, NULL);
        ok &= st == PN_OK;
        put_cols(dx, dxs, dt, rows, C, c0, widths[p]);
        put_cols(dw, dws, dt, 1, C, c0, widths[p]);
        if (!rms) put_cols(db, dbs, dt, 1, C, c0, widths[p]);
        free(dxs); free(dws); free(dbs);
    }
    tu_check(ok, "%s %s C=%lld P=%d sharded calls return PN_OK", op, tu_dtype_name(dt), (long long)C, P);

    /* reference in double from the same (rounded) inputs */
    double *xd = as_doubles(x, dt, rows * C), *dyd = as_doubles(dy, dt, rows * C);
    double *wd = as_doubles(w, dt, C), *bd = as_doubles(b, dt, C);
    double *yr = tu_xmalloc((size_t)(rows * C) * sizeof(double)), *dxr = tu_xmalloc((size_t)(rows * C) * sizeof(double));
    double *mr = tu_xmalloc((size_t)rows * sizeof(double)), *rr = tu_xmalloc((size_t)rows * sizeof(double));
    for (int64_t r = 0; r < rows; r++) {
        const double *xr = xd + r * C, *g = dyd + r * C;
        double m = 0, v = 0, sg = 0, sgx = 0;
        if (!rms) {
            for (int64_t i = 0; i < C; i++) m += xr[i];
            m /= (double)C;
        }
        for (int64_t i = 0; i < C; i++) v += (xr[i] - m) * (xr[i] - m);
        const double rs = 1 / sqrt(v / (double)C + (rms ? 1e-6 : 1e-5));
        mr[r] = m; rr[r] = rs;
        for (int64_t i = 0; i < C; i++) {
            const double xh = (xr[i] - m) * rs;
            yr[r * C + i] = xh * wd[i] + (rms ? 0 : bd[i]);
            sg += g[i] * wd[i];
            sgx += g[i] * wd[i] * xh;
        }
        for (int64_t i = 0; i < C; i++) {
            const double xh = (xr[i] - m) * rs;
            dxr[r * C + i] = rs * (g[i] * wd[i] - (rms ? 0 : sg / (double)C) - xh * sgx / (double)C);
        }
    }
    double *yf = as_doubles(y_full, dt, rows * C), *dxf = as_doubles(dx_full, dt, rows * C);
    const double ey = maxdiff(y, yr, rows * C), eyf = maxdiff(yf, yr, rows * C);
    const double edx = maxdiff(dx, dxr, rows * C), edxf = maxdiff(dxf, dxr, rows * C);
    const double ulp = dt == PN_FLOAT64 ? 2.2e-16 : dt == PN_FLOAT32 ? 1.2e-7 : dt == PN_FLOAT16 ? 9.8e-4 : 7.8e-3;
    const double ymax = tu_maxabs(yr, rows * C), dxmax = tu_maxabs(dxr, rows * C);
    /* sharded error within 2x the unsharded op's, plus 2 ulps of the output scale */
    tu_check(ey <= 2 * eyf + 2 * ulp * ymax, "%s %s C=%lld P=%d loc=%g: y err %.3g (unsharded %.3g)", op,
             tu_dtype_name(dt), (long long)C, P, loc, ey, eyf);
    tu_check(edx <= 2 * edxf + 2 * ulp * dxmax, "%s %s C=%lld P=%d loc=%g: dx err %.3g (unsharded %.3g)", op,
             tu_dtype_name(dt), (long long)C, P, loc, edx, edxf);
    /* parameter gradients: against the double reference, within 2x the unsharded op's error */
    double *dwf = as_doubles(dw_full, dt, C), *dbf = as_doubles(db_full, dt, C);
    double *dwr = tu_xmalloc((size_t)C * sizeof(double)), *dbr = tu_xmalloc((size_t)C * sizeof(double));
    for (int64_t i = 0; i < C; i++) {
        dwr[i] = 0; dbr[i] = 0;
        for (int64_t r = 0; r < rows; r++) {
            dwr[i] += dyd[r * C + i] * (xd[r * C + i] - mr[r]) * rr[r];
            dbr[i] += dyd[r * C + i];
        }
    }
    const double edw = maxdiff(dw, dwr, C), edwf = maxdiff(dwf, dwr, C);
    tu_check(edw <= 2 * edwf + 4 * ulp * (tu_maxabs(dwr, C) + sqrt((double)rows)),
             "%s %s C=%lld P=%d loc=%g: dweight err %.3g (unsharded %.3g)", op, tu_dtype_name(dt), (long long)C, P,
             loc, edw, edwf);
    if (!rms) {
        const double edb = maxdiff(db, dbr, C), edbf = maxdiff(dbf, dbr, C);
        tu_check(edb <= 2 * edbf + 4 * ulp * (tu_maxabs(dbr, C) + 1), "%s %s C=%lld P=%d: dbias err %.3g (unsharded %.3g)",
                 op, tu_dtype_name(dt), (long long)C, P, edb, edbf);
        const double em = maxdiff(mean, mr, rows);
        tu_check(em <= 1e-12 * (fabs(loc) + sd), "%s %s C=%lld P=%d: combined mean err %.3g", op,
                 tu_dtype_name(dt), (long long)C, P, em);
    }
    free(dwr); free(dbr);
    double erstd = 0;
    for (int64_t r = 0; r < rows; r++) erstd = tu_nanmax(erstd, fabs(rstd[r] - rr[r]) / rr[r]);
    tu_check(erstd <= 1e-9, "%s %s C=%lld P=%d loc=%g: combined rstd rel err %.3g", op, tu_dtype_name(dt),
             (long long)C, P, loc, erstd);

    /* deterministic: the same call twice gives the same bits */
    double *parts2 = tu_xmalloc((size_t)(rows * per) * sizeof(double));
    st = rms ? pn_rmsnorm_shard_stats(parts2, xs[0], 1, rows, widths[0], dt, NULL)
             : pn_layernorm_shard_stats(parts2, xs[0], 1, rows, widths[0], dt, NULL);
    tu_check(st == PN_OK && !memcmp(parts2, parts, (size_t)(rows * per) * sizeof(double)),
             "%s %s C=%lld: shard stats are bit-identical on a second call", op, tu_dtype_name(dt), (long long)C);

    for (int p = 0; p < P; p++) { free(xs[p]); free(dys[p]); free(ws[p]); free(bs[p]); }
    free(parts2); free(x); free(dy); free(w); free(b); free(y_full); free(dx_full); free(dw_full); free(db_full);
    free(mean_f); free(rstd_f); free(parts); free(mean); free(rstd); free(sums); free(psum); free(y); free(dx);
    free(dw); free(db); free(xd); free(dyd); free(wd); free(bd); free(yr); free(dxr); free(mr); free(rr);
    free(yf); free(dxf); free(dwf); free(dbf);
}

/* BatchNorm: N samples split into shards of the given sizes, against the unsharded op */
static void batchnorm_case(pn_layout layout, pn_dtype dt, int64_t N, int64_t C, int64_t S, int P,
                           const int64_t *ns, double loc, double sd, unsigned seed) {
    const size_t es = tu_dtype_size(dt), ses = dt == PN_FLOAT64 ? 8 : 4;
    const int64_t n = N * C * S;
    tu_rng rng = {seed};
    void *x = tu_xmalloc((size_t)n * es), *dy = tu_xmalloc((size_t)n * es);
    void *w = tu_xmalloc((size_t)C * es), *b = tu_xmalloc((size_t)C * es);
    for (int64_t i = 0; i < n; i++) {
        tu_store(x, dt, i, loc + sd * tu_normal(&rng));
        tu_store(dy, dt, i, tu_normal(&rng));
    }
    for (int64_t c = 0; c < C; c++) {
        tu_store(w, dt, c, 1 + 0.5 * tu_normal(&rng));
        tu_store(b, dt, c, 0.5 * tu_normal(&rng));
    }
    float rm_full[256], rv_full[256], rm[256], rv[256];
    for (int64_t c = 0; c < C; c++) { rm_full[c] = rm[c] = 0.1f * (float)c; rv_full[c] = rv[c] = 1 + 0.1f * (float)c; }
    void *y_full = tu_xmalloc((size_t)n * es), *dx_full = tu_xmalloc((size_t)n * es);
    void *dw_full = tu_xmalloc((size_t)C * es), *db_full = tu_xmalloc((size_t)C * es);
    void *mean_f = tu_xmalloc((size_t)C * ses), *rstd_f = tu_xmalloc((size_t)C * ses);
    pn_status st = pn_batchnorm_forward(y_full, mean_f, rstd_f, rm_full, rv_full, x, w, b, N, C, S, 1e-5, 0.1, 1,
                                        PN_BN_TRAINING, layout, dt, dt, PN_FLOAT32);
    if (!st) st = pn_batchnorm_backward(dx_full, dw_full, db_full, NULL, 0, dy, x, w, mean_f, rstd_f, N, C, S,
                                        PN_BN_TRAINING, layout, dt, dt);
    tu_check(st == PN_OK, "batchnorm %s unsharded ops run", tu_dtype_name(dt));

    /* shard p holds samples [n0, n0 + ns[p]): a contiguous block in both layouts */
    double parts[8 * 2 * 256], mean[256], rstd[256], sums[2 * 256], local[8][2 * 256];
    int64_t counts[8];
    int ok = 1;
    int64_t n0 = 0;
    for (int p = 0; p < P; n0 += ns[p], p++) {
        counts[p] = ns[p] * S;
        if (!ns[p]) {   /* a process with no samples contributes nothing (its slot stays zero) */
            for (int64_t i = 0; i < 2 * C; i++) parts[p * 2 * C + i] = 0;
            continue;
        }
        const char *xs = (const char *)x + (size_t)(n0 * C * S) * es;
        ok &= pn_batchnorm_shard_stats(parts + p * 2 * C, xs, ns[p], C, S, layout, dt) == PN_OK;
    }
    ok &= pn_batchnorm_shard_combine(mean, rstd, rm, rv, parts, counts, P, C, 1e-5, 0.1, 1, 0, PN_FLOAT32) == PN_OK;
    void *y = tu_xmalloc((size_t)n * es), *dx = tu_xmalloc((size_t)n * es);
    for (int64_t i = 0; i < 2 * C; i++) sums[i] = 0;
    n0 = 0;
    for (int p = 0; p < P; n0 += ns[p], p++) {
        const size_t off = (size_t)(n0 * C * S) * es;
        if (!ns[p]) continue;
        ok &= pn_batchnorm_shard_apply((char *)y + off, (const char *)x + off, w, b, mean, rstd, ns[p], C, S,
                                       layout, dt, dt) == PN_OK;
        ok &= pn_batchnorm_shard_backward_sums(local[p], (const char *)dy + off, (const char *)x + off, mean,
                                               ns[p], C, S, layout, dt) == PN_OK;
        for (int64_t i = 0; i < 2 * C; i++) sums[i] += local[p][i];
    }
    double dw[256] = {0}, db[256] = {0};
    n0 = 0;
    for (int p = 0; p < P; n0 += ns[p], p++) {
        const size_t off = (size_t)(n0 * C * S) * es;
        if (!ns[p]) continue;
        void *dws = tu_xmalloc((size_t)C * es), *dbs = tu_xmalloc((size_t)C * es);
        ok &= pn_batchnorm_shard_backward((char *)dx + off, dws, dbs, (const char *)dy + off, (const char *)x + off,
                                          w, mean, rstd, local[p], sums, N * S, ns[p], C, S, 0, layout, dt,
                                          dt) == PN_OK;
        for (int64_t c = 0; c < C; c++) { dw[c] += tu_load(dws, dt, c); db[c] += tu_load(dbs, dt, c); }
        free(dws); free(dbs);
    }
    tu_check(ok, "batchnorm %s %s P=%d sharded calls return PN_OK", layout == PN_NCHW ? "NCHW" : "NHWC",
             tu_dtype_name(dt), P);
    const double ulp = dt == PN_FLOAT64 ? 2.2e-16 : dt == PN_FLOAT32 ? 1.2e-7 : dt == PN_FLOAT16 ? 9.8e-4 : 7.8e-3;
    double *yd = as_doubles(y, dt, n), *yfd = as_doubles(y_full, dt, n);
    double *dxd = as_doubles(dx, dt, n), *dxfd = as_doubles(dx_full, dt, n);
    double *mf = as_doubles(mean_f, dt == PN_FLOAT64 ? PN_FLOAT64 : PN_FLOAT32, C);
    double *dwf = as_doubles(dw_full, dt, C), *dbf = as_doubles(db_full, dt, C);
    /* double reference of dx from the same (rounded) inputs */
    double *xd = as_doubles(x, dt, n), *dyd = as_doubles(dy, dt, n), *wd = as_doubles(w, dt, C);
    double rm_[256] = {0}, rv_[256] = {0}, sdy[256] = {0}, sdx[256] = {0};
    const int nchw = layout == PN_NCHW && S > 1;
#define CH(i) (nchw ? ((i) / S) % C : (i) % C)
    for (int64_t i = 0; i < n; i++) rm_[CH(i)] += xd[i];
    for (int64_t c = 0; c < C; c++) rm_[c] /= (double)(N * S);
    for (int64_t i = 0; i < n; i++) rv_[CH(i)] += (xd[i] - rm_[CH(i)]) * (xd[i] - rm_[CH(i)]);
    for (int64_t c = 0; c < C; c++) rv_[c] = 1 / sqrt(rv_[c] / (double)(N * S) + 1e-5);
    for (int64_t i = 0; i < n; i++) { sdy[CH(i)] += dyd[i]; sdx[CH(i)] += dyd[i] * (xd[i] - rm_[CH(i)]); }
    double *dxr = tu_xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        const int64_t c = CH(i);
        const double rs = rv_[c], M = (double)(N * S);
        dxr[i] = (dyd[i] - sdy[c] / M - (xd[i] - rm_[c]) * rs * rs * sdx[c] / M) * rs * wd[c];
    }
#undef CH
    const double ey = maxdiff(yd, yfd, n), edx = maxdiff(dxd, dxr, n), edxf = maxdiff(dxfd, dxr, n);
    tu_check(ey <= 4 * ulp * (tu_maxabs(yfd, n) + 1), "batchnorm %s P=%d loc=%g: y matches unsharded (%.3g)",
             tu_dtype_name(dt), P, loc, ey);
    tu_check(edx <= 2 * edxf + 2 * ulp * (tu_maxabs(dxr, n) + 1), "batchnorm %s P=%d loc=%g: dx err %.3g (unsharded %.3g)",
             tu_dtype_name(dt), P, loc, edx, edxf);
    double dwr[256], dbr[256];
    for (int64_t c = 0; c < C; c++) { dwr[c] = sdx[c] * rv_[c]; dbr[c] = sdy[c]; }
    const double sl = 8 * ulp * (double)(N * S);
    tu_check(maxdiff(dw, dwr, C) <= 2 * maxdiff(dwf, dwr, C) + sl * (tu_maxabs(dwr, C) + 1) &&
             maxdiff(db, dbr, C) <= 2 * maxdiff(dbf, dbr, C) + sl * (tu_maxabs(dbr, C) + 1),
             "batchnorm %s P=%d loc=%g: sum of shard dweight/dbias (err %.3g, %.3g; unsharded %.3g, %.3g)",
             tu_dtype_name(dt), P, loc, maxdiff(dw, dwr, C), maxdiff(db, dbr, C), maxdiff(dwf, dwr, C),
             maxdiff(dbf, dbr, C));
    free(xd); free(dyd); free(wd); free(dxr);
    tu_check(maxdiff(mean, mf, C) <= 4 * (dt == PN_FLOAT64 ? 2.2e-16 : 1.2e-7) * (fabs(loc) + sd),
             "batchnorm %s P=%d: mean matches unsharded", tu_dtype_name(dt), P);
    /* largest relative error of the running stats, a NaN wins. Not fmax(): it drops a NaN, and
       GCC 12.2 for aarch64 crashes (internal compiler error in vect_transform_reduction) when it
       vectorizes an fmax() reduction over floats widened to double, as this loop was. */
    double erm = 0, erv = 0;
    for (int64_t c = 0; c < C; c++) {
        erm = tu_nanmax(erm, fabs((double)rm[c] - rm_full[c]) / (fabs(rm_full[c]) + 1e-3));
        erv = tu_nanmax(erv, fabs((double)rv[c] - rv_full[c]) / fabs(rv_full[c]));
    }
    tu_check(erm <= 1e-5 && erv <= 1e-5, "batchnorm %s P=%d: running stats match (%.3g, %.3g)", tu_dtype_name(dt),
             P, erm, erv);
    free(x); free(dy); free(w); free(b); free(y_full); free(dx_full); free(dw_full); free(db_full);
    free(mean_f); free(rstd_f); free(y); free(dx); free(yd); free(yfd); free(dxd); free(dxfd); free(mf);
    free(dwf); free(dbf);
}

/* bad arguments: the status, and nothing written */
static void bad_args(void) {
    enum { R = 4, C = 8 };
    float x[R * C], w[C], y[R * C];
    double part[2 * R * 3], mean[R], rstd[R], sums[2 * R];
    for (int i = 0; i < R * C; i++) x[i] = (float)i;
    for (int i = 0; i < C; i++) w[i] = 1;
    for (int i = 0; i < 2 * R * 3; i++) part[i] = 1 + i;
    for (int i = 0; i < R; i++) { mean[i] = -7; rstd[i] = -7; }
    for (int i = 0; i < 2 * R; i++) sums[i] = 1;
    const int64_t good[3] = {C, C, C}, zero[2] = {C, 0}, neg[2] = {C, -1};
    double snap_part[2 * R * 3];
    memcpy(snap_part, part, sizeof part);
#define UNCHANGED_STATS() (mean[0] == -7 && mean[R - 1] == -7 && rstd[0] == -7 && rstd[R - 1] == -7)
    tu_check(pn_layernorm_shard_stats(NULL, x, 1, R, C, PN_FLOAT32, NULL) == PN_ERR_NULL, "stats: NULL part");
    tu_check(pn_layernorm_shard_stats(part, NULL, 1, R, C, PN_FLOAT32, NULL) == PN_ERR_NULL, "stats: NULL x");
    tu_check(pn_layernorm_shard_stats(part, x, 1, R, 0, PN_FLOAT32, NULL) == PN_ERR_SIZE, "stats: C = 0");
    tu_check(pn_layernorm_shard_stats(part, x, 1, R, C, (pn_dtype)9, NULL) == PN_ERR_DTYPE, "stats: bad dtype");
    tu_check(pn_rmsnorm_shard_stats(part, x, -1, R, C, PN_FLOAT32, NULL) == PN_ERR_SIZE, "rms stats: B < 0");
    tu_check(pn_layernorm_shard_stats((double *)(void *)x, x, 1, R, C, PN_FLOAT32, NULL) == PN_ERR_ALIAS,
             "stats: part overlapping x");
    tu_check(!memcmp(part, snap_part, sizeof part), "stats: nothing written by the rejected calls");
    tu_check(pn_layernorm_shard_combine(mean, rstd, part, zero, 2, R, 1e-5) == PN_ERR_SIZE &&
             pn_layernorm_shard_combine(mean, rstd, part, neg, 2, R, 1e-5) == PN_ERR_SIZE &&
             pn_layernorm_shard_combine(mean, rstd, part, good, 0, R, 1e-5) == PN_ERR_SIZE &&
             pn_layernorm_shard_combine(mean, rstd, part, good, 3, 0, 1e-5) == PN_ERR_SIZE &&
             pn_layernorm_shard_combine(mean, rstd, part, good, 3, R, -1) == PN_ERR_EPS &&
             pn_layernorm_shard_combine(mean, rstd, part, good, 3, R, NAN) == PN_ERR_EPS &&
             pn_layernorm_shard_combine(mean, rstd, NULL, good, 3, R, 1e-5) == PN_ERR_NULL &&
             pn_layernorm_shard_combine(mean, rstd, part, NULL, 3, R, 1e-5) == PN_ERR_NULL &&
             pn_layernorm_shard_combine(part + 1, rstd, part, good, 3, R, 1e-5) == PN_ERR_ALIAS &&
             UNCHANGED_STATS(),
             "combine: zero/negative width, no shards, no rows, bad eps, NULLs, aliasing -> status, nothing written");
    tu_check(pn_rmsnorm_shard_combine(rstd, part, zero, 2, R, 1e-5) == PN_ERR_SIZE &&
             pn_rmsnorm_shard_combine(NULL, part, good, 3, R, 1e-5) == PN_ERR_NULL && UNCHANGED_STATS(),
             "rms combine: bad width, NULL rstd");
    for (int i = 0; i < R; i++) { mean[i] = 1; rstd[i] = 1; }
    for (int i = 0; i < R * C; i++) y[i] = -3;
    tu_check(pn_layernorm_shard_apply(y, x, w, NULL, NULL, rstd, 1, R, C, PN_FLOAT32, PN_FLOAT32, NULL) == PN_ERR_NULL &&
             pn_layernorm_shard_apply(y, x, w, NULL, mean, rstd, 1, R, C, PN_FLOAT32, PN_FLOAT16, NULL) == PN_ERR_DTYPE &&
             pn_rmsnorm_shard_apply(y, x, w, NULL, 1, R, C, PN_FLOAT32, PN_FLOAT32, NULL) == PN_ERR_NULL &&
             y[0] == -3 && y[R * C - 1] == -3,
             "apply: NULL statistics, bad weight dtype");
    for (int i = 0; i < R * C; i++) y[i] = -3;
    tu_check(pn_layernorm_shard_apply(y, y + 1, w, NULL, mean, rstd, 1, R, C, PN_FLOAT32, PN_FLOAT32, NULL) == PN_ERR_ALIAS &&
             y[0] == -3 && y[R * C - 1] == -3, "apply: output overlapping x (not in place) -> PN_ERR_ALIAS, nothing written");
    tu_check(pn_layernorm_shard_apply(x, x, w, NULL, mean, rstd, 1, R, C, PN_FLOAT32, PN_FLOAT32, NULL) == PN_OK,
             "apply: in place (y = x) allowed");
    tu_check(pn_layernorm_shard_backward(y, NULL, NULL, NULL, 0, x, x, w, mean, rstd, sums, 1, R, C, C - 1, 0,
                                         PN_FLOAT32, PN_FLOAT32, NULL) == PN_ERR_SIZE &&
             pn_layernorm_shard_backward(y, NULL, NULL, NULL, 0, x, x, w, mean, rstd, sums, 1, R, C, C, 4,
                                         PN_FLOAT32, PN_FLOAT32, NULL) == PN_ERR_ARG &&
             pn_layernorm_shard_backward(y, NULL, NULL, NULL, 0, x, x, w, mean, rstd, NULL, 1, R, C, C, 0,
                                         PN_FLOAT32, PN_FLOAT32, NULL) == PN_ERR_NULL &&
             pn_rmsnorm_shard_backward(y, w, part, 8, x, x, w, rstd, sums, 1, R, C, C, 0,
                                       PN_FLOAT32, PN_FLOAT32, NULL) == PN_ERR_SCRATCH &&
             pn_layernorm_shard_backward(y, NULL, NULL, NULL, 0, x, x, w, mean, rstd, (double *)(void *)y, 1, R, C,
                                         C, 0, PN_FLOAT32, PN_FLOAT32, NULL) == PN_ERR_ALIAS &&
             y[0] == -3 && y[R * C - 1] == -3 && w[0] == 1,
             "backward: C_total < C, bad flags, NULL sums, small scratch, dx over sums -> status, nothing written");
    tu_check(pn_layernorm_shard_backward_sums(sums, x, x, w, NULL, rstd, 1, R, C, PN_FLOAT32, PN_FLOAT32, NULL) == PN_ERR_NULL &&
             pn_rmsnorm_shard_backward_sums(sums, x, x, w, rstd, 1, R, C, PN_FLOAT32, PN_FLOAT32, NULL) == PN_OK,
             "backward sums: NULL mean for LayerNorm; RMSNorm needs none");

    /* BatchNorm */
    double bpart[2 * C], bmean[C], brstd[C];
    float rm[C], rv[C];
    const int64_t counts1[2] = {1, 0}, counts_neg[2] = {4, -1}, counts[2] = {4, 0};
    for (int c = 0; c < C; c++) { bpart[2 * c] = 0; bpart[2 * c + 1] = 1; bmean[c] = -7; brstd[c] = -7; rm[c] = 5; rv[c] = 5; }
    tu_check(pn_batchnorm_shard_stats(NULL, x, 4, C, 1, PN_NCHW, PN_FLOAT32) == PN_ERR_NULL &&
             pn_batchnorm_shard_stats(bpart, x, 4, C, 1, (pn_layout)7, PN_FLOAT32) == PN_ERR_ARG &&
             pn_batchnorm_shard_stats(bpart, x, 0, C, 1, PN_NCHW, PN_FLOAT32) == PN_ERR_SIZE &&
             pn_batchnorm_shard_combine(bmean, brstd, rm, rv, bpart, counts1, 2, C, 1e-5, 0.1, 1, 0, PN_FLOAT32) == PN_ERR_SIZE &&
             pn_batchnorm_shard_combine(bmean, brstd, rm, rv, bpart, counts_neg, 2, C, 1e-5, 0.1, 1, 0, PN_FLOAT32) == PN_ERR_SIZE &&
             pn_batchnorm_shard_combine(bmean, brstd, rm, rv, bpart, counts, 1, C, 1e-5, NAN, 1, 0, PN_FLOAT32) == PN_ERR_ARG &&
             pn_batchnorm_shard_combine(bmean, brstd, rm, rv, bpart, counts, 1, C, 1e-5, 0.1, 0, PN_BN_CUMULATIVE, PN_FLOAT32) == PN_ERR_ARG &&
             pn_batchnorm_shard_combine(bmean, brstd, rm, rv, bpart, counts, 1, C, 1e-5, 0.1, 1, 8, PN_FLOAT32) == PN_ERR_ARG &&
             bmean[0] == -7 && brstd[C - 1] == -7 && rm[0] == 5 && rv[C - 1] == 5,
             "batchnorm: NULL, bad layout, N = 0, one value in all, negative count, bad momentum/flags -> status, nothing written");
    tu_check(pn_batchnorm_shard_combine(bmean, brstd, rm, rv, bpart, counts, 1, C, 1e-5, 0.1, 1, 0, PN_FLOAT32) == PN_OK &&
             bmean[0] == 0 && fabs(brstd[0] - 1 / sqrt(0.25 + 1e-5)) < 1e-12 &&
             fabsf(rm[0] - 4.5f) < 1e-6f && fabs(rv[0] - (0.9 * 5 + 0.1 * (1.0 / 3))) < 1e-6,
             "batchnorm combine: one shard of 4 values, running stats updated with the unbiased variance");
}

int main(void) {
    const int64_t w2[2] = {2048, 2048}, w3[3] = {1366, 1365, 1366}, w3b[3] = {1, 40, 24};
    for (int k = 0; k < 4; k++) {
        const pn_dtype dt = DTYPES[k];
        for (int rms = 0; rms <= 1; rms++) {
            token_case(rms, dt, 5, 4096, 2, w2, 0.5, 1.0, 11u + (unsigned)k);
            token_case(rms, dt, 3, 4097, 3, w3, 0.5, 1.0, 21u + (unsigned)k);
            token_case(rms, dt, 9, 65, 3, w3b, -0.3, 2.0, 31u + (unsigned)k);
        }
    }
    /* hostile rows: mean 1e4, std 1e-2 (float32 and float64) */
    for (int rms = 0; rms <= 1; rms++) {
        token_case(rms, PN_FLOAT32, 6, 4096, 2, w2, 1e4, 1e-2, 41u);
        token_case(rms, PN_FLOAT32, 6, 4097, 3, w3, 1e4, 1e-2, 42u);
        token_case(rms, PN_FLOAT64, 4, 4097, 3, w3, 1e4, 1e-2, 43u);
    }
    const int64_t n2[2] = {3, 2}, n3[3] = {2, 0, 5};
    for (int k = 0; k < 4; k++) {
        batchnorm_case(PN_NCHW, DTYPES[k], 5, 6, 7, 2, n2, 0.3, 1.0, 51u + (unsigned)k);
        batchnorm_case(PN_NHWC, DTYPES[k], 5, 6, 7, 2, n2, 0.3, 1.0, 61u + (unsigned)k);
        batchnorm_case(PN_NHWC, DTYPES[k], 7, 70, 3, 3, n3, -0.2, 1.5, 71u + (unsigned)k);
    }
    batchnorm_case(PN_NCHW, PN_FLOAT32, 5, 6, 300, 2, n2, 1e4, 1e-2, 81u);
    batchnorm_case(PN_NCHW, PN_FLOAT32, 7, 5, 1, 3, n3, 1.0, 2.0, 82u);   /* (N, C): S = 1 */
    bad_args();
    return tu_summary();
}
