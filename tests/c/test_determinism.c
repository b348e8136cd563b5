/* test_determinism.c - every output, dweight and dbias included, is
 * bit-identical for 1, 2, 3 and the default number of threads, on repeated
 * calls, and with a caller scratch buffer or scratch = NULL. */
#include <pthread.h>

#include "testutil.h"

enum { OP_LN_FWD = 0, OP_LN_ADD, OP_LN_BWD, OP_LN_BWD_ACC, OP_RMS_FWD, OP_RMS_ADD, OP_RMS_BWD,
       OP_RMS_BWD_ACC, OP_N };

static const char *op_names[OP_N] = {
    "layernorm_forward", "add_layernorm_forward", "layernorm_backward",
    "layernorm_backward(accumulate)", "rmsnorm_forward", "add_rmsnorm_forward",
    "rmsnorm_backward", "rmsnorm_backward(accumulate)",
};

typedef struct {
    int64_t B, T, C;
    int layout;
    int big; /* outputs of 8 MiB and more (streamed): f32 only, fewer runs */
} cfg_t;

static const cfg_t cfgs[] = {
    {3, 67, 768, TU_DENSE, 0},   /* 201 rows */
    {7, 143, 64, TU_DENSE, 0},   /* 1001 short rows */
    {1, 1, 4097, TU_DENSE, 0},
    {5, 1, 3, TU_DENSE, 0},
    {4, 33, 257, TU_NEGATIVE, 0},
    {2, 1000, 16, TU_PADDED, 0}, /* many rows, tiny C */
    {4, 129, 4097, TU_NEGATIVE, 1},
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

/* uniform fill (cheaper than tu_fill_normal; values do not matter here) */
static void fill(tu_buf *b, tu_rng *r, double mu, double sd)
{
    int64_t N = b->B * b->T, n, k;
    for (n = 0; n < N; n++)
        for (k = 0; k < b->C; k++)
            tu_set(b, n, k, mu + sd * 3.4 * (tu_uniform(r) - 0.5));
}

typedef struct {
    unsigned char *bytes;
    size_t n;
    pn_status status;
} blob_t;

static void blob_add(blob_t *b, const tu_buf *t)
{
    size_t add;
    if (!t->mem)
        return;
    add = (size_t)t->nel * t->es;
    b->bytes = (unsigned char *)realloc(b->bytes, b->n + add);
    if (!b->bytes) { fprintf(stderr, "oom\n"); exit(2); }
    memcpy(b->bytes + b->n, t->mem, add);
    b->n += add;
}

/* Runs op once on inputs derived from the seed; returns every output
 * buffer's bytes (guards included). scratch_mode: 0 NULL, 1 exact size,
 * 2 larger than needed and pre-filled with garbage. */
static blob_t run(int op, const cfg_t *c, pn_dtype dt, pn_dtype wdt, int scratch_mode)
{
    const int64_t B = c->B, T = c->T, C = c->C, N = B * T;
    const pn_dtype sdt = tu_stat_dtype(dt);
    const int rms = op >= OP_RMS_FWD;
    const int bwd = op == OP_LN_BWD || op == OP_LN_BWD_ACC || op == OP_RMS_BWD || op == OP_RMS_BWD_ACC;
    const int acc = op == OP_LN_BWD_ACC || op == OP_RMS_BWD_ACC;
    const int fused = op == OP_LN_ADD || op == OP_RMS_ADD;
    tu_rng rng;
    tu_buf x, r, y, h, mean, rstd, w, b, dy, dx, dw, db, scr;
    pn_strides st;
    blob_t out;
    size_t need = 0;
    unsigned char *sp = NULL;
    int64_t n;

    memset(&out, 0, sizeof out);
    rng.s = 1000 + (uint64_t)(op * 31 + (int)dt * 7 + (int)wdt) + (uint64_t)C * 3 + (uint64_t)N;
    x = tu_buf_layout(c->layout, 0, 1, B, T, C, dt);
    fill(&x, &rng, 0.7, 1.3);
    w = tu_buf_vec(C, wdt);
    fill(&w, &rng, 1.0, 0.3);
    b = rms ? tu_buf_none() : tu_buf_vec(C, wdt);
    if (b.mem) fill(&b, &rng, 0.0, 0.3);
    r = fused ? tu_buf_layout(c->layout, 2, 1, B, T, C, dt) : tu_buf_none();
    if (fused) fill(&r, &rng, 0.0, 1.0);
    y = bwd ? tu_buf_none() : tu_buf_layout(c->layout, 1, 0, B, T, C, dt);
    h = fused ? tu_buf_layout(c->layout, 3, 0, B, T, C, dt) : tu_buf_none();
    mean = rms ? tu_buf_none() : tu_buf_vec(N, sdt);
    rstd = tu_buf_vec(N, sdt);
    dy = bwd ? tu_buf_layout(c->layout, 2, 1, B, T, C, dt) : tu_buf_none();
    dx = bwd ? tu_buf_layout(c->layout, 1, 0, B, T, C, dt) : tu_buf_none();
    dw = bwd ? tu_buf_vec(C, wdt) : tu_buf_none();
    db = (bwd && !rms) ? tu_buf_vec(C, wdt) : tu_buf_none();
    scr = tu_buf_none();
    memset(&st, 0, sizeof st);
    st.inp = x.rows;
    st.out = y.rows;
    st.residual = r.rows;
    st.h = h.rows;
    st.dout = dy.rows;
    st.dinp = dx.rows;

    if (bwd) {
        fill(&dy, &rng, 0.0, 1.0);
        for (n = 0; n < N; n++) {
            double s1 = 0, s2 = 0, mu;
            int64_t k;
            for (k = 0; k < C; k++) s1 += tu_get(&x, n, k);
            mu = rms ? 0.0 : s1 / (double)C;
            for (k = 0; k < C; k++) s2 += (tu_get(&x, n, k) - mu) * (tu_get(&x, n, k) - mu);
            if (mean.mem) tu_store(tu_ptr(&mean), sdt, n, mu);
            tu_store(tu_ptr(&rstd), sdt, n, 1.0 / sqrt(s2 / (double)C + 1e-5));
        }
        if (acc) {
            fill(&dx, &rng, 0.0, 1.0);
            fill(&dw, &rng, 0.0, 1.0);
            if (db.mem) fill(&db, &rng, 0.0, 1.0);
        }
        if (scratch_mode) {
            need = rms ? pn_rmsnorm_backward_scratch_size(B, T, C, dt)
                       : pn_layernorm_backward_scratch_size(B, T, C, dt);
            scr = tu_buf_vec((int64_t)need + 64, PN_FLOAT64);
            sp = (unsigned char *)tu_ptr(&scr);
            if (scratch_mode == 2) {
                size_t i;
                for (i = 0; i < need + 64; i++) sp[i] = (unsigned char)(i * 37 + 11);
                need += 64;
            }
        }
        if (rms)
            out.status = pn_rmsnorm_backward(tu_ptr(&dx), tu_ptr(&dw), sp, need, tu_ptr(&dy),
                                             tu_ptr(&x), tu_ptr(&w), tu_ptr(&rstd), B, T, C,
                                             acc ? PN_ACCUMULATE : 0, dt, wdt,
                                             c->layout == TU_DENSE ? NULL : &st);
        else
            out.status = pn_layernorm_backward(tu_ptr(&dx), tu_ptr(&dw), tu_ptr(&db), sp, need,
                                               tu_ptr(&dy), tu_ptr(&x), tu_ptr(&w), tu_ptr(&mean),
                                               tu_ptr(&rstd), B, T, C, acc ? PN_ACCUMULATE : 0,
                                               dt, wdt, c->layout == TU_DENSE ? NULL : &st);
        blob_add(&out, &dx);
        blob_add(&out, &dw);
        blob_add(&out, &db);
    } else {
        const pn_strides *sp2 = c->layout == TU_DENSE ? NULL : &st;
        switch (op) {
        case OP_LN_FWD:
            out.status = pn_layernorm_forward(tu_ptr(&y), tu_ptr(&mean), tu_ptr(&rstd), tu_ptr(&x),
                                              tu_ptr(&w), tu_ptr(&b), B, T, C, 1e-5, dt, wdt, sp2);
            break;
        case OP_LN_ADD:
            out.status = pn_add_layernorm_forward(tu_ptr(&y), tu_ptr(&h), tu_ptr(&mean),
                                                  tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&r),
                                                  tu_ptr(&w), tu_ptr(&b), B, T, C, 1e-5, dt, wdt,
                                                  sp2);
            break;
        case OP_RMS_FWD:
            out.status = pn_rmsnorm_forward(tu_ptr(&y), tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&w), B,
                                            T, C, 1e-6, dt, wdt, sp2);
            break;
        default:
            out.status = pn_add_rmsnorm_forward(tu_ptr(&y), tu_ptr(&h), tu_ptr(&rstd), tu_ptr(&x),
                                                tu_ptr(&r), tu_ptr(&w), B, T, C, 1e-6, dt, wdt,
                                                sp2);
            break;
        }
        blob_add(&out, &y);
        blob_add(&out, &h);
        blob_add(&out, &mean);
        blob_add(&out, &rstd);
    }
    tu_buf_free(&x); tu_buf_free(&r); tu_buf_free(&y); tu_buf_free(&h); tu_buf_free(&mean);
    tu_buf_free(&rstd); tu_buf_free(&w); tu_buf_free(&b); tu_buf_free(&dy); tu_buf_free(&dx);
    tu_buf_free(&dw); tu_buf_free(&db); tu_buf_free(&scr);
    return out;
}

/* ------------------------------------------------------------------------ */
/* several caller threads at once (the library promises that is safe): each
 * thread runs every job, starting at a different one, and must get the
 * single-threaded reference bits */

#define NJOBS (OP_N * 2 * 2)
#define NCALLERS 4

typedef struct {
    int op, ci, di;
    blob_t ref;
} job_t;

static job_t jobs[NJOBS];

typedef struct {
    int start;
    int mismatches;
    int failures;
} caller_t;

static void *caller_main(void *arg)
{
    caller_t *c = (caller_t *)arg;
    int j;
    for (j = 0; j < NJOBS; j++) {
        const job_t *jb = &jobs[(c->start + j) % NJOBS];
        blob_t o = run(jb->op, &cfgs[jb->ci], dtypes[jb->di].dt, dtypes[jb->di].wdt, j % 3);
        if (o.status != PN_OK) c->failures++;
        if (o.n != jb->ref.n || memcmp(o.bytes, jb->ref.bytes, o.n) != 0) c->mismatches++;
        free(o.bytes);
    }
    return NULL;
}

static void run_concurrent(void)
{
    static const int cis[2] = {0, 4}, dis[2] = {0, 4};
    pthread_t th[NCALLERS];
    caller_t cs[NCALLERS];
    int i, j, k, n = 0, started = 0, mism = 0, fails = 0;
    pn_set_num_threads(1);
    for (i = 0; i < OP_N; i++)
        for (j = 0; j < 2; j++)
            for (k = 0; k < 2; k++) {
                jobs[n].op = i; jobs[n].ci = cis[j]; jobs[n].di = dis[k];
                jobs[n].ref = run(i, &cfgs[cis[j]], dtypes[dis[k]].dt, dtypes[dis[k]].wdt, 0);
                n++;
            }
    pn_set_num_threads(2);
    for (i = 0; i < NCALLERS; i++) {
        cs[i].start = i * (NJOBS / NCALLERS) + i;
        cs[i].mismatches = 0;
        cs[i].failures = 0;
        if (pthread_create(&th[i], NULL, caller_main, &cs[i]) == 0) started++;
        else break;
    }
    for (i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        mism += cs[i].mismatches;
        fails += cs[i].failures;
    }
    tu_check(started == NCALLERS && mism == 0 && fails == 0,
             "%d caller threads x %d jobs at once (library threads 2): %d results differ from the "
             "single-threaded reference, %d calls failed",
             started, NJOBS, mism, fails);
    for (i = 0; i < NJOBS; i++) free(jobs[i].ref.bytes);
}

int main(void)
{
    /* (threads, scratch mode) of the runs compared with the single-thread,
     * scratch = NULL reference: every thread count, repeated calls, and for
     * backward every scratch mode with more than one thread count */
    static const int plan[][2] = {{2, 0}, {3, 1}, {0, 2}, {1, 1}, {2, 2}, {3, 0}, {1, 0}, {2, 1}};
    int op, ci, di, pi;
    printf("pynorm %s, isa %s\n", pn_version(), pn_isa());

    pn_set_num_threads(3);
    tu_check(pn_get_num_threads() == 3, "pn_set_num_threads(3) -> pn_get_num_threads() == %d",
             pn_get_num_threads());

    for (op = 0; op < OP_N; op++)
        for (ci = 0; ci < NELEM(cfgs); ci++)
            for (di = 0; di < NELEM(dtypes); di++) {
                const cfg_t *c = &cfgs[ci];
                const int bwd = op == OP_LN_BWD || op == OP_LN_BWD_ACC || op == OP_RMS_BWD ||
                                op == OP_RMS_BWD_ACC;
                blob_t ref;
                int same = 1, status_ok = 1, nruns = 0;
                char what[200];
                if (c->big && (tu_quick() || dtypes[di].dt != PN_FLOAT32 || dtypes[di].wdt != PN_FLOAT32))
                    continue;
                if (tu_quick_skip(op * NELEM(cfgs) + ci, di, NELEM(dtypes)))
                    continue; /* quick mode (testutil.h): each (op, shape) with one dtype, in turn */
                pn_set_num_threads(1);
                ref = run(op, c, dtypes[di].dt, dtypes[di].wdt, 0);
                status_ok = ref.status == PN_OK;
                what[0] = 0;
                for (pi = 0; pi < NELEM(plan); pi++) {
                    blob_t o;
                    int sm = bwd ? plan[pi][1] : 0;
                    if (!bwd && pi >= 5)
                        break; /* forward: threads 2, 3, default, 1, 2 again */
                    if (c->big && pi >= 3)
                        break; /* big: threads 2, 3, default */
                    pn_set_num_threads(plan[pi][0]);
                    o = run(op, c, dtypes[di].dt, dtypes[di].wdt, sm);
                    nruns++;
                    if (o.status != PN_OK) status_ok = 0;
                    if (o.n != ref.n || memcmp(o.bytes, ref.bytes, ref.n) != 0) {
                        if (same)
                            snprintf(what, sizeof what,
                                     " first difference: threads=%d scratch=%s", plan[pi][0],
                                     sm == 0 ? "NULL" : sm == 1 ? "exact" : "large+garbage");
                        same = 0;
                    }
                    free(o.bytes);
                }
                tu_check(same && status_ok,
                         "determinism %s %s/%s B=%lld T=%lld C=%lld %s: %d runs vs 1 thread "
                         "(threads 1,2,3,default, repeated%s) bit-identical=%d status_ok=%d%s",
                         op_names[op], tu_dtype_name(dtypes[di].dt), tu_dtype_name(dtypes[di].wdt),
                         (long long)c->B, (long long)c->T, (long long)c->C,
                         tu_layout_name(c->layout), nruns, bwd ? "; scratch NULL/exact/larger" : "",
                         same, status_ok, what);
                free(ref.bytes);
            }
    run_concurrent();
    pn_set_num_threads(0);
    return tu_summary();
}
