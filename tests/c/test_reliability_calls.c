/* test_reliability_calls.c - every code path of the token norms on modest
 * sizes: the driver tests/run_reliability.sh runs under valgrind memcheck and
 * ThreadSanitizer (the full numeric tests take minutes there). Also a plain
 * ctest test.
 *
 * Covers: the six token-norm functions; every dtype with its own and float32
 * weights; weight/bias given or NULL; dense, padded, negative and broadcast
 * row layouts; one and several threads (sizes above the threading
 * threshold); streamed outputs (8 MiB and more); in-place calls; accumulate;
 * caller scratch and library scratch; refused calls; outputs from plain
 * malloc (never initialized: memcheck reports any result that depends on
 * memory the library did not write); the buffer cache and the bandwidth probe;
 * and the spatial norms (GroupNorm, BatchNorm in training and eval, forward
 * and backward, both layouts, three dtypes, a threaded size), checked for
 * finite results that are bit-identical on one and three threads.
 * Results are checked against testutil.h's double reference with loose
 * tolerances (the numeric tests measure accuracy; here a wrong element or
 * row is what matters), and every byte outside the rows must stay intact.
 */
#include "testutil.h"

enum { OP_LN_FWD = 0, OP_LN_ADD, OP_LN_BWD, OP_RMS_FWD, OP_RMS_ADD, OP_RMS_BWD, OP_N };
static const char *op_names[OP_N] = {"layernorm_forward", "add_layernorm_forward", "layernorm_backward",
                                     "rmsnorm_forward", "add_rmsnorm_forward", "rmsnorm_backward"};
static int is_bwd(int op) { return op == OP_LN_BWD || op == OP_RMS_BWD; }
static int is_fused(int op) { return op == OP_LN_ADD || op == OP_RMS_ADD; }
static int is_rms(int op) { return op >= OP_RMS_FWD; }

typedef struct {
    pn_dtype dt, wdt;
} dts_t;
static const dts_t dtypes[] = {{PN_FLOAT32, PN_FLOAT32}, {PN_FLOAT16, PN_FLOAT16}, {PN_FLOAT16, PN_FLOAT32},
                               {PN_BFLOAT16, PN_BFLOAT16}, {PN_BFLOAT16, PN_FLOAT32}, {PN_FLOAT64, PN_FLOAT64},
                               {PN_FLOAT64, PN_FLOAT32}};
#define NDT ((int)(sizeof dtypes / sizeof dtypes[0]))

typedef struct {
    int op, layout, threads, with_w, accumulate, scratch, inplace;
    int64_t B, T, C;
    dts_t d;
} cfg_t;

static double tol_of(pn_dtype dt, int bwd) { return 8 * (bwd ? tu_rtol_bwd(dt) : tu_rtol_fwd(dt)); }

/* max |got - ref| / (scale + max|ref|) over a buffer's rows */
static int close_rows(const tu_buf *b, const double *ref, double tol, double *err)
{
    int64_t N = b->B * b->T, n, k;
    double scale = 1e-30, e = 0;
    for (n = 0; n < N * b->C; n++) scale = fmax(scale, fabs(ref[n]));
    for (n = 0; n < N; n++)
        for (k = 0; k < b->C; k++) {
            double g = tu_get(b, n, k), r = ref[n * b->C + k];
            double d = fabs(g - r) / scale;
            if (!(d <= e)) e = isnan(d) ? INFINITY : d;
        }
    *err = e;
    return e <= tol;
}

static int run(const cfg_t *c, char *what, size_t nwhat)
{
    const int op = c->op, bwd = is_bwd(op), fused = is_fused(op), rms = is_rms(op);
    const int64_t B = c->B, T = c->T, C = c->C, N = B * T;
    const pn_dtype dt = c->d.dt, wdt = c->d.wdt, sdt = tu_stat_dtype(dt);
    tu_rng rng;
    tu_buf x, r, y, h, dy, dx, w, bb, mean, rstd, dw, db;
    double *xd, *rd, *dyd, *wd = NULL, *bd = NULL, *yref, *mref, *rref, *dxref, *dwref, *dbref, *mag, *dwa, *dba;
    double *old_dx = NULL, *old_dw = NULL, *old_db = NULL;
    double err = 0;
    unsigned char *scratch = NULL;
    size_t scratch_bytes = 0;
    pn_strides s;
    pn_status st;
    int ok = 1, k;
    int64_t n, i;

    snprintf(what, nwhat, "%s %s/%s B=%lld T=%lld C=%lld %s threads=%d w=%d acc=%d scratch=%d inplace=%d",
             op_names[op], tu_dtype_name(dt), tu_dtype_name(wdt), (long long)B, (long long)T, (long long)C,
             tu_layout_name(c->layout), c->threads, c->with_w, c->accumulate, c->scratch, c->inplace);
    rng.s = 1000 + (uint64_t)op * 7 + (uint64_t)c->layout;
    memset(&s, 0, sizeof s);
    x = tu_buf_layout(c->layout, 0, 1, B, T, C, dt);
    r = fused ? tu_buf_layout(c->layout, 2, 1, B, T, C, dt) : tu_buf_none();
    dy = bwd ? tu_buf_layout(c->layout, 4, 1, B, T, C, dt) : tu_buf_none();
    y = !bwd ? tu_buf_layout(c->layout, 1, 0, B, T, C, dt) : tu_buf_none();
    h = fused ? tu_buf_layout(c->layout, 3, 0, B, T, C, dt) : tu_buf_none();
    dx = bwd ? tu_buf_layout(c->layout, 5, 0, B, T, C, dt) : tu_buf_none();
    w = c->with_w ? tu_buf_vec(C, wdt) : tu_buf_none();
    bb = (c->with_w && !rms && !bwd) ? tu_buf_vec(C, wdt) : tu_buf_none();
    mean = tu_buf_vec(N, sdt);
    rstd = tu_buf_vec(N, sdt);
    dw = bwd ? tu_buf_vec(C, wdt) : tu_buf_none();
    db = (bwd && !rms) ? tu_buf_vec(C, wdt) : tu_buf_none();
    tu_fill_normal(&x, &rng, 0.5, 1.0);
    if (fused) tu_fill_normal(&r, &rng, 0.0, 0.5);
    if (bwd) tu_fill_normal(&dy, &rng, 0.0, 1.0);
    if (c->with_w) tu_fill_normal(&w, &rng, 1.0, 0.2);
    if (bb.mem) tu_fill_normal(&bb, &rng, 0.0, 0.2);
    if (bwd) {
        /* saved statistics of x, as the forward gives them */
        double *xx = tu_gather(&x), *yy = (double *)tu_xmalloc((size_t)(N * C) * 8);
        double *mm = (double *)tu_xmalloc((size_t)N * 8), *rr = (double *)tu_xmalloc((size_t)N * 8);
        tu_ref_forward(rms, N, C, xx, NULL, NULL, 1e-5, yy, mm, rr);
        for (n = 0; n < N; n++) {
            tu_set(&mean, 0, n, mm[n]);
            tu_set(&rstd, 0, n, rr[n]);
        }
        free(xx); free(yy); free(mm); free(rr);
        if (c->accumulate) {
            tu_fill_normal(&dx, &rng, 0.0, 1.0);
            tu_fill_normal(&dw, &rng, 0.0, 1.0);
            if (db.mem) tu_fill_normal(&db, &rng, 0.0, 1.0);
        }
    }
    /* in place: y over x (forward), h over the residual (fused), dx over dy */
    if (c->inplace) {
        if (!bwd && !fused) { tu_buf_free(&y); y = x; }
        if (fused) { tu_buf_free(&h); h = r; }
        if (bwd && !c->accumulate) { tu_buf_free(&dx); dx = dy; }
    }
    if (bwd && c->accumulate) {
        old_dx = tu_gather(&dx);
        old_dw = tu_gather(&dw);
        if (db.mem) old_db = tu_gather(&db);
    }
    xd = tu_gather(&x);
    rd = fused ? tu_gather(&r) : NULL;
    dyd = bwd ? tu_gather(&dy) : NULL;
    if (c->with_w) wd = tu_gather(&w);
    if (bb.mem) bd = tu_gather(&bb);
    tu_buf_snapshot(&x);
    if (fused) tu_buf_snapshot(&r);
    if (bwd) tu_buf_snapshot(&dy);
    s.inp = x.rows; s.residual = r.rows; s.dout = dy.rows;
    s.out = y.rows; s.h = h.rows; s.dinp = dx.rows;
    if (bwd && c->scratch) {
        scratch_bytes = rms ? pn_rmsnorm_backward_scratch_size(B, T, C, dt) : pn_layernorm_backward_scratch_size(B, T, C, dt);
        scratch = (unsigned char *)tu_xmalloc(scratch_bytes);
    }

    pn_set_num_threads(c->threads);
    switch (op) {
    case OP_LN_FWD:
        st = pn_layernorm_forward(tu_ptr(&y), tu_ptr(&mean), tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&w), tu_ptr(&bb), B,
                                  T, C, 1e-5, dt, wdt, &s);
        break;
    case OP_LN_ADD:
        st = pn_add_layernorm_forward(tu_ptr(&y), tu_ptr(&h), tu_ptr(&mean), tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&r),
                                      tu_ptr(&w), tu_ptr(&bb), B, T, C, 1e-5, dt, wdt, &s);
        break;
    case OP_LN_BWD:
        st = pn_layernorm_backward(tu_ptr(&dx), tu_ptr(&dw), tu_ptr(&db), scratch, scratch_bytes, tu_ptr(&dy),
                                   tu_ptr(&x), tu_ptr(&w), tu_ptr(&mean), tu_ptr(&rstd), B, T, C,
                                   c->accumulate ? PN_ACCUMULATE : 0, dt, wdt, &s);
        break;
    case OP_RMS_FWD:
        st = pn_rmsnorm_forward(tu_ptr(&y), tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&w), B, T, C, 1e-5, dt, wdt, &s);
        break;
    case OP_RMS_ADD:
        st = pn_add_rmsnorm_forward(tu_ptr(&y), tu_ptr(&h), tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&r), tu_ptr(&w), B, T,
                                    C, 1e-5, dt, wdt, &s);
        break;
    default:
        st = pn_rmsnorm_backward(tu_ptr(&dx), tu_ptr(&dw), scratch, scratch_bytes, tu_ptr(&dy), tu_ptr(&x),
                                 tu_ptr(&w), tu_ptr(&rstd), B, T, C, c->accumulate ? PN_ACCUMULATE : 0, dt, wdt, &s);
        break;
    }
    pn_set_num_threads(0);
    if (st != PN_OK) {
        ok = 0;
        goto done;
    }

    /* reference */
    yref = (double *)tu_xmalloc((size_t)(N * C) * 8);
    mref = (double *)tu_xmalloc((size_t)N * 8);
    rref = (double *)tu_xmalloc((size_t)N * 8);
    if (!bwd) {
        double *src = xd;
        if (fused) {
            src = (double *)tu_xmalloc((size_t)(N * C) * 8);
            for (i = 0; i < N * C; i++) src[i] = tu_add_round(dt, xd[i], rd[i]);
            ok &= close_rows(&h, src, 0, &err);   /* h bit-exact */
        }
        tu_ref_forward(rms, N, C, src, wd, bd, 1e-5, yref, mref, rref);
        ok &= close_rows(&y, yref, tol_of(dt, 0), &err);
        if (!rms) for (n = 0; n < N; n++) ok &= fabs(tu_get(&mean, 0, n) - mref[n]) <= 1e-4 * (1 + fabs(mref[n]));
        for (n = 0; n < N; n++) ok &= fabs(tu_get(&rstd, 0, n) - rref[n]) <= 1e-4 * rref[n];
        if (src != xd) free(src);
    } else {
        double *mm = tu_gather(&mean), *rr = tu_gather(&rstd);
        dxref = (double *)tu_xmalloc((size_t)(N * C) * 8);
        mag = (double *)tu_xmalloc((size_t)(N * C) * 8);
        dwref = (double *)calloc((size_t)C, 8); dbref = (double *)calloc((size_t)C, 8);
        dwa = (double *)calloc((size_t)C, 8); dba = (double *)calloc((size_t)C, 8);
        tu_ref_backward(rms, N, C, dyd, xd, wd, mm, rr, dxref, dwref, rms ? NULL : dbref, mag, dwa, dba);
        if (c->accumulate) {   /* the gradients add to what the buffers held */
            for (i = 0; i < N * C; i++) dxref[i] += old_dx[i];
            for (k = 0; k < C; k++) {
                dwref[k] += old_dw[k];
                dwa[k] += fabs(old_dw[k]);
                if (old_db) { dbref[k] += old_db[k]; dba[k] += fabs(old_db[k]); }
            }
        }
        free(mm); free(rr);
        ok &= close_rows(&dx, dxref, tol_of(dt, 1), &err);
        for (k = 0; k < C; k++) {
            ok &= fabs(tu_get(&dw, 0, k) - dwref[k]) <= tol_of(dw.dt, 1) * (1 + dwa[k]);
            if (db.mem) ok &= fabs(tu_get(&db, 0, k) - dbref[k]) <= tol_of(db.dt, 1) * (1 + dba[k]);
        }
        free(dxref); free(mag); free(dwref); free(dbref); free(dwa); free(dba);
    }
    free(yref); free(mref); free(rref);
    /* inputs untouched (unless written in place), guard bytes intact */
    if (!(c->inplace && !bwd && !fused)) ok &= tu_buf_unchanged(&x);
    if (fused && !c->inplace) ok &= tu_buf_unchanged(&r);
    if (bwd && !(c->inplace && !c->accumulate)) ok &= tu_buf_unchanged(&dy);
    if (y.mem) ok &= tu_buf_guard_ok(&y);
    if (h.mem) ok &= tu_buf_guard_ok(&h);
    if (dx.mem) ok &= tu_buf_guard_ok(&dx);

done:
    snprintf(what + strlen(what), nwhat - strlen(what), ": %s, max rel err %.3g",
             st == PN_OK ? "PN_OK" : pn_status_string(st), err);
    /* free, minding the aliases */
    if (c->inplace && !bwd && !fused) y.mem = NULL;
    if (c->inplace && fused) h.mem = NULL;
    if (c->inplace && bwd && !c->accumulate) dx.mem = NULL;
    tu_buf_free(&x); tu_buf_free(&r); tu_buf_free(&dy); tu_buf_free(&w); tu_buf_free(&bb);
    tu_buf_free(&mean); tu_buf_free(&rstd); tu_buf_free(&dw); tu_buf_free(&db);
    if (y.mem) tu_buf_free(&y);
    if (h.mem) tu_buf_free(&h);
    if (dx.mem) tu_buf_free(&dx);
    free(xd); free(rd); free(dyd); free(wd); free(bd); free(scratch);
    free(old_dx); free(old_dw); free(old_db);
    return ok;
}

/* outputs straight from malloc, never initialized */
static void uninitialized_outputs(void)
{
    const int64_t B = 2, T = 3, C = 70, N = B * T;
    float *x = (float *)tu_xmalloc((size_t)(N * C) * 4), *r = (float *)tu_xmalloc((size_t)(N * C) * 4);
    float *y = (float *)malloc((size_t)(N * C) * 4), *h = (float *)malloc((size_t)(N * C) * 4);
    float *mean = (float *)malloc((size_t)N * 4), *rstd = (float *)malloc((size_t)N * 4);
    float *dx = (float *)malloc((size_t)(N * C) * 4), *dw = (float *)malloc((size_t)C * 4), *db = (float *)malloc((size_t)C * 4);
    double sum = 0;
    int64_t i;
    int ok = 1;
    tu_rng rng;
    rng.s = 9;
    for (i = 0; i < N * C; i++) { x[i] = (float)tu_normal(&rng); r[i] = (float)tu_normal(&rng); }
    ok &= pn_add_layernorm_forward(y, h, mean, rstd, x, r, NULL, NULL, B, T, C, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL) == PN_OK;
    ok &= pn_layernorm_backward(dx, dw, db, NULL, 0, x, h, NULL, mean, rstd, B, T, C, 0, PN_FLOAT32, PN_FLOAT32, NULL) == PN_OK;
    ok &= pn_rmsnorm_forward(y, rstd, x, NULL, B, T, C, 1e-6, PN_FLOAT32, PN_FLOAT32, NULL) == PN_OK;
    /* every output feeds a branch: memcheck reports a result made of memory nobody wrote */
    for (i = 0; i < N * C; i++) sum += y[i] + h[i] + dx[i];
    for (i = 0; i < N; i++) sum += mean[i] + rstd[i];
    for (i = 0; i < C; i++) sum += dw[i] + db[i];
    tu_check(ok && isfinite(sum), "outputs from malloc (uninitialized): every element written (sum %g)", sum);
    free(x); free(r); free(y); free(h); free(mean); free(rstd); free(dx); free(dw); free(db);
}

/* The spatial norms (GroupNorm, BatchNorm) on every path: both layouts,
 * training and eval, accumulate, a threaded size and a small one, run with
 * one thread and with three; the results must be finite and bit-identical
 * (their accuracy is test_spatial.c's business; here memcheck and TSan
 * watch the kernels' memory and threads). */
static int spatial_once(int layout, pn_dtype dt, int64_t N, int64_t C, int64_t S, int threads,
                        unsigned char **res, size_t *nres)
{
    const int64_t n = N * C * S, G = C % 3 == 0 ? 3 : 1;
    const size_t es = tu_dtype_size(dt), ses = dt == PN_FLOAT64 ? 8 : 4;
    unsigned char *x = tu_xmalloc((size_t)n * es), *dy = tu_xmalloc((size_t)n * es);
    unsigned char *w = tu_xmalloc((size_t)C * es), *b = tu_xmalloc((size_t)C * es);
    size_t total = 6 * (size_t)n * es + 8 * (size_t)C * es + 4 * (size_t)(N * G + C) * ses, off = 0;
    unsigned char *out = tu_xmalloc(total);
    int ok = 1, i;
    tu_rng rng;
    rng.s = 42;
    for (i = 0; i < n; i++) {
        tu_store(x, dt, i, 0.3 + tu_normal(&rng));
        tu_store(dy, dt, i, tu_normal(&rng));
    }
    for (i = 0; i < C; i++) {
        tu_store(w, dt, i, 1 + 0.1 * tu_normal(&rng));
        tu_store(b, dt, i, 0.1 * tu_normal(&rng));
    }
    memset(out, 0, total);
#define TAKE(bytes) (off += (bytes), out + off - (bytes))
    {
        unsigned char *y = TAKE((size_t)n * es), *gm = TAKE((size_t)(N * G) * ses), *gr = TAKE((size_t)(N * G) * ses);
        unsigned char *dx = TAKE((size_t)n * es), *dw = TAKE((size_t)C * es), *db = TAKE((size_t)C * es);
        unsigned char *by = TAKE((size_t)n * es), *bm = TAKE((size_t)C * ses), *br = TAKE((size_t)C * ses);
        unsigned char *rm = TAKE((size_t)C * es), *rv = TAKE((size_t)C * es);
        unsigned char *bdx = TAKE((size_t)n * es), *bdw = TAKE((size_t)C * es), *bdb = TAKE((size_t)C * es);
        unsigned char *ey = TAKE((size_t)n * es), *edx = TAKE((size_t)n * es), *em = TAKE((size_t)C * ses);
        unsigned char *er = TAKE((size_t)C * ses);
        for (i = 0; i < C; i++) { tu_store(rm, dt, i, 0.1); tu_store(rv, dt, i, 0.9); }
        pn_set_num_threads(threads);
        ok &= pn_groupnorm_forward(y, gm, gr, x, w, b, N, C, S, G, 1e-5, (pn_layout)layout, dt, dt) == PN_OK;
        ok &= pn_groupnorm_backward(dx, dw, db, NULL, 0, dy, x, w, gm, gr, N, C, S, G, 0, (pn_layout)layout, dt, dt) == PN_OK;
        ok &= pn_groupnorm_backward(dx, dw, db, NULL, 0, dy, x, w, gm, gr, N, C, S, G, PN_ACCUMULATE, (pn_layout)layout, dt, dt) == PN_OK;
        ok &= pn_batchnorm_forward(by, bm, br, rm, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, PN_BN_TRAINING, (pn_layout)layout, dt, dt, dt) == PN_OK;
        ok &= pn_batchnorm_backward(bdx, bdw, bdb, NULL, 0, dy, x, w, bm, br, N, C, S, PN_BN_TRAINING, (pn_layout)layout, dt, dt) == PN_OK;
        ok &= pn_batchnorm_forward(ey, em, er, rm, rv, x, w, b, N, C, S, 1e-5, 0.1, 0, 0, (pn_layout)layout, dt, dt, dt) == PN_OK;
        ok &= pn_batchnorm_backward(edx, bdw, bdb, NULL, 0, dy, x, w, em, er, N, C, S, PN_ACCUMULATE, (pn_layout)layout, dt, dt) == PN_OK;
        pn_set_num_threads(0);
        /* the outputs finite (the inputs are): a branch on every value, so
         * memcheck reports any made of memory the library did not write */
        {
            unsigned char *data[6] = {y, dx, by, bdx, ey, edx};
            int k;
            for (k = 0; k < 6; k++)
                for (i = 0; i < n; i++)
                    if (!isfinite(tu_load(data[k], dt, i))) ok = 0;
        }
    }
#undef TAKE
    free(x); free(dy); free(w); free(b);
    *res = out;
    *nres = total;
    return ok;
}

static void spatial_paths(int quick)
{
    static const pn_dtype dts[3] = {PN_FLOAT32, PN_BFLOAT16, PN_FLOAT64};
    int layout, d, big;
    for (big = 0; big < 2; big++)
        for (layout = 0; layout < 2; layout++)
            for (d = 0; d < 3; d++) {
                const int64_t N = big ? 3 : 2, C = big ? 12 : 6, S = big ? 1100 : 9;   /* big: 39600 values */
                unsigned char *r1, *r3;
                size_t n1, n3;
                int ok1, ok3;
                if (quick && big && d) continue;
                ok1 = spatial_once(layout, dts[d], N, C, S, 1, &r1, &n1);
                ok3 = spatial_once(layout, dts[d], N, C, S, 3, &r3, &n3);
                tu_check(ok1 && ok3 && n1 == n3 && memcmp(r1, r3, n1) == 0,
                         "spatial %s %s N=%lld C=%lld S=%lld: statuses OK, finite, 1 thread == 3 threads bitwise",
                         layout ? "NHWC" : "NCHW", tu_dtype_name(dts[d]), (long long)N, (long long)C, (long long)S);
                free(r1);
                free(r3);
            }
}

static void misc(void)
{
    double g = 0;
    void *p;
    pn_status st = pn_copy_bandwidth(&g, 1 << 16, 2);
    tu_check(st == PN_OK && g > 0, "pn_copy_bandwidth(64 KiB, 2): %.2f GB/s", g);
    p = pn_buffer_alloc((size_t)3 << 20);
    tu_check(p != NULL, "pn_buffer_alloc(3 MiB)");
    if (p) { memset(p, 1, (size_t)3 << 20); pn_buffer_free(p, (size_t)3 << 20); }
    p = pn_buffer_alloc((size_t)3 << 20);   /* from the cache */
    if (p) { memset(p, 2, (size_t)3 << 20); pn_buffer_free(p, (size_t)3 << 20); }
    p = pn_buffer_alloc(100);
    if (p) { memset(p, 3, 100); pn_buffer_free(p, 100); }
    pn_buffer_trim();
    tu_check(1, "buffer cache: alloc, reuse, free, trim");
}

int main(int argc, char **argv)
{
    const int quick = argc > 1 && !strcmp(argv[1], "--quick");
    int op, d, layout, nfail = 0, ncalls = 0;
    char what[512];
    printf("pynorm %s, isa %s%s\n", pn_version(), pn_isa(), quick ? " (quick)" : "");
    for (op = 0; op < OP_N; op++) {
        for (d = 0; d < NDT; d++)
            for (layout = 0; layout < TU_NLAYOUTS; layout++) {
                cfg_t c;
                memset(&c, 0, sizeof c);
                c.op = op; c.d = dtypes[d]; c.layout = layout;
                c.B = 2; c.T = 3; c.C = 33 + layout;
                c.threads = 1 + (d & 1);
                c.with_w = (d + layout) % 3 != 0;
                c.scratch = layout & 1;
                c.inplace = layout == TU_DENSE && d % 2 == 0;
                c.accumulate = is_bwd(op) && layout == TU_PADDED;
                ncalls++;
                if (!tu_check(run(&c, what, sizeof what), "%s", what)) nfail++;
            }
        /* threaded sizes, every dtype (rows * C above the threshold) */
        for (d = 0; d < NDT; d++) {
            cfg_t c;
            if (quick && d % 3) continue;
            memset(&c, 0, sizeof c);
            c.op = op; c.d = dtypes[d]; c.layout = d % 2 ? TU_NEGATIVE : TU_DENSE;
            c.B = 2; c.T = 40; c.C = 416;
            c.threads = 2 + (d % 2);
            c.with_w = 1;
            c.scratch = d % 2;
            ncalls++;
            tu_check(run(&c, what, sizeof what), "%s", what);
        }
    }
    /* streamed outputs (>= 8 MiB): float32, one forward and one backward */
    if (!quick) {
        cfg_t c;
        memset(&c, 0, sizeof c);
        c.op = OP_LN_FWD; c.d = dtypes[0]; c.layout = TU_DENSE;
        c.B = 1; c.T = 512; c.C = 4100; c.threads = 2; c.with_w = 1;
        tu_check(run(&c, what, sizeof what), "streamed: %s", what);
        c.op = OP_RMS_BWD; c.d = dtypes[3];
        c.T = 1040;
        tu_check(run(&c, what, sizeof what), "streamed: %s", what);
    }
    spatial_paths(quick);
    uninitialized_outputs();
    misc();
    (void)nfail; (void)ncalls;
    return tu_summary();
}
