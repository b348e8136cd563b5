/* test_isa.c - the library promises the same bits for every instruction set
 * it picks (and for every compiler that builds it). This program runs a fixed
 * set of cases (every token-norm op, dtype, weight dtype, a few shapes and
 * layouts, a row with NaN/Inf, half-precision rows of conversion edge values;
 * GroupNorm and training BatchNorm, forward and backward, in both layouts) and
 * hashes every output bit (NaN payloads canonicalized, except in h of the
 * edge-value cases, where they must agree too).
 *
 *   test_isa write FILE          one "case hash" line per case, under the ISA
 *                                the library picked (set PYNORM_ISA to force)
 *   test_isa compare FILE FILE   the two files must agree line by line
 *
 * ctest runs "write" under the default ISA, PYNORM_ISA=avx2 and
 * PYNORM_ISA=generic (fixtures), then "compare" for each pair;
 * tests/run_clang.sh compares the files of a clang build with another
 * build's, tests/run_aarch64.sh an aarch64 build's with an x86-64 build's.
 * Under PYNORM_TEST_QUICK=1 the write leaves out the cases of 8 MiB and more
 * and says so in the file; compare refuses a quick file against a full one. */
#include "testutil.h"

#define NELEM(a) ((int)(sizeof(a) / sizeof((a)[0])))

typedef struct {
    uint64_t h;
} hash_t;

static void hash_bytes(hash_t *h, const void *p, size_t n)
{
    const unsigned char *b = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < n; i++) {
        h->h ^= b[i];
        h->h *= 0x100000001b3ull;
    }
}

/* Hashes the rows of a buffer value by value; every NaN hashes the same. */
static void hash_buf(hash_t *h, const tu_buf *b)
{
    int64_t N = b->B * b->T, n, k;
    if (!b->mem)
        return;
    for (n = 0; n < N; n++)
        for (k = 0; k < b->C; k++) {
            const unsigned char *p = b->mem + tu_idx(b, n / b->T, n % b->T, k) * (int64_t)b->es;
            double v = tu_load(b->mem, b->dt, tu_idx(b, n / b->T, n % b->T, k));
            if (isnan(v)) {
                static const unsigned char qnan[8] = {0x7f, 0xf8, 0, 0, 0, 0, 0, 0x11};
                hash_bytes(h, qnan, b->es);
            } else {
                hash_bytes(h, p, b->es);
            }
        }
    /* the guard bytes must be untouched under every ISA too */
    if (!tu_buf_guard_ok(b))
        hash_bytes(h, "guard", 5);
}

enum { OP_LN_FWD = 0, OP_LN_ADD, OP_LN_BWD, OP_LN_BWD_ACC, OP_RMS_FWD, OP_RMS_ADD, OP_RMS_BWD,
       OP_RMS_BWD_ACC, OP_N };

static const char *op_names[OP_N] = {"ln_fwd", "ln_add", "ln_bwd", "ln_bwd_acc",
                                     "rms_fwd", "rms_add", "rms_bwd", "rms_bwd_acc"};

typedef struct {
    int64_t B, T, C;
    int layout;
    int nonfinite;
    int big; /* outputs of 8 MiB and more (streamed): f32 and f64 only, weights only */
    int edge; /* half precision: conversion edge values (see fill_edge); skipped for other dtypes */
} cfg_t;

static const cfg_t cfgs[] = {
    {1, 1, 1, TU_DENSE, 0, 0, 0},     {3, 5, 3, TU_DENSE, 0, 0, 0},      {1, 7, 7, TU_PADDED, 0, 0, 0},
    {2, 3, 15, TU_DENSE, 0, 0, 0},    {2, 3, 16, TU_DENSE, 0, 0, 0},     {2, 3, 17, TU_NEGATIVE, 0, 0, 0},
    {3, 1, 31, TU_DENSE, 0, 0, 0},    {1, 3, 33, TU_DENSE, 0, 0, 0},     {3, 3, 64, TU_EXPLICIT, 0, 0, 0},
    {2, 2, 65, TU_DENSE, 0, 0, 0},    {1, 5, 127, TU_DENSE, 0, 0, 0},    {3, 5, 768, TU_DENSE, 0, 0, 0},
    {3, 5, 768, TU_NEGATIVE, 0, 0, 0}, {1, 3, 4097, TU_DENSE, 0, 0, 0},  {5, 3, 4097, TU_PADDED, 0, 0, 0},
    {2, 1, 16384, TU_DENSE, 0, 0, 0}, {1, 4, 300, TU_DENSE, 1, 0, 0},    {7, 143, 64, TU_DENSE, 0, 0, 0},
    {4, 129, 4097, TU_DENSE, 0, 1, 0}, {4, 129, 4097, TU_NEGATIVE, 0, 1, 0},
    {2, 4, 1500, TU_DENSE, 0, 0, 1}, {1, 3, 37, TU_PADDED, 0, 0, 1},
};

static int is_half(pn_dtype dt) { return dt == PN_FLOAT16 || dt == PN_BFLOAT16; }

/* Conversion edge values in a half-precision buffer, as raw bits: every bit
 * pattern is as likely, so rows hold subnormals, the largest finite values
 * (whose sums overflow to Inf when rounded), values whose float sums fall
 * exactly halfway between two halves (ties to even), zeros of both signs,
 * and, where `specials`, Inf and NaNs with every payload. Rows of such values
 * also take the statistics' fallback paths (squares beyond float's range). */
static void fill_edge(tu_buf *b, tu_rng *rng, int specials)
{
    const uint16_t expmask = b->dt == PN_FLOAT16 ? 0x7c00 : 0x7f80;
    int64_t N = b->B * b->T, n, k;
    for (n = 0; n < N; n++)
        for (k = 0; k < b->C; k++) {
            uint16_t v = (uint16_t)(tu_next(rng) >> 48);
            if (!specials && (v & expmask) == expmask) v ^= (uint16_t)(expmask & (expmask >> 1)); /* finite */
            memcpy(b->mem + tu_idx(b, n / b->T, n % b->T, k) * (int64_t)b->es, &v, 2);
        }
}

/* Hashes every bit of the rows, NaN payloads included (h of a fused
 * forward: x + residual rounded, where only x holds NaNs, so the payload is
 * x's, quieted, under every ISA). */
static void hash_buf_raw(hash_t *h, const tu_buf *b)
{
    int64_t N = b->B * b->T, n, k;
    if (!b->mem)
        return;
    for (n = 0; n < N; n++)
        for (k = 0; k < b->C; k++)
            hash_bytes(h, b->mem + tu_idx(b, n / b->T, n % b->T, k) * (int64_t)b->es, b->es);
}

typedef struct {
    pn_dtype dt, wdt;
} dtypes_t;

static const dtypes_t dtypes[] = {
    {PN_FLOAT32, PN_FLOAT32}, {PN_FLOAT16, PN_FLOAT16}, {PN_FLOAT16, PN_FLOAT32},
    {PN_BFLOAT16, PN_BFLOAT16}, {PN_BFLOAT16, PN_FLOAT32}, {PN_FLOAT64, PN_FLOAT64},
    {PN_FLOAT64, PN_FLOAT32},
};

/* One case: runs op and returns the hash of all outputs (status included). */
static uint64_t run_case(int op, const cfg_t *c, pn_dtype dt, pn_dtype wdt, int with_w)
{
    const int64_t B = c->B, T = c->T, C = c->C, N = B * T;
    const pn_dtype sdt = tu_stat_dtype(dt);
    const int rms = op >= OP_RMS_FWD;
    const int bwd = op == OP_LN_BWD || op == OP_LN_BWD_ACC || op == OP_RMS_BWD || op == OP_RMS_BWD_ACC;
    const int acc = op == OP_LN_BWD_ACC || op == OP_RMS_BWD_ACC;
    const int fused = op == OP_LN_ADD || op == OP_RMS_ADD;
    const pn_strides *sp;
    tu_rng rng;
    tu_buf x, r, y, h, mean, rstd, w, b, dy, dx, dw, db;
    pn_strides st;
    pn_status s;
    hash_t hh;
    int64_t n;

    hh.h = 0xcbf29ce484222325ull;
    rng.s = 555 + (uint64_t)(op * 131 + (int)dt * 17 + (int)wdt * 3 + with_w) + (uint64_t)(C * 7 + N);
    x = tu_buf_layout(c->layout, 0, 1, B, T, C, dt);
    tu_fill_normal(&x, &rng, 0.3, 1.5);
    if (c->nonfinite) {
        tu_set(&x, 1, 5, NAN);
        tu_set(&x, 2, 0, INFINITY);
        tu_set(&x, 3, C - 1, -INFINITY);
    }
    w = with_w ? tu_buf_vec(C, wdt) : tu_buf_none();
    if (w.mem) tu_fill_normal(&w, &rng, 1.0, 0.4);
    b = (with_w && !rms) ? tu_buf_vec(C, wdt) : tu_buf_none();
    if (b.mem) tu_fill_normal(&b, &rng, 0.0, 0.4);
    r = fused ? tu_buf_layout(c->layout, 2, 1, B, T, C, dt) : tu_buf_none();
    if (fused) tu_fill_normal(&r, &rng, 0.0, 1.0);
    if (c->edge) {   /* NaN and Inf in x's first row only: the other rows keep finite statistics */
        fill_edge(&x, &rng, 0);
        for (n = 0; n < C; n++) {
            uint16_t v = (uint16_t)(tu_next(&rng) >> 48);
            if (n % 3 == 0) v |= dt == PN_FLOAT16 ? 0x7c00 : 0x7f80;   /* Inf or a NaN */
            memcpy(x.mem + tu_idx(&x, 0, 0, n) * (int64_t)x.es, &v, 2);
        }
        if (fused) fill_edge(&r, &rng, 0);
    }
    y = bwd ? tu_buf_none() : tu_buf_layout(c->layout, 1, 0, B, T, C, dt);
    h = fused ? tu_buf_layout(c->layout, 3, 0, B, T, C, dt) : tu_buf_none();
    mean = rms ? tu_buf_none() : tu_buf_vec(N, sdt);
    rstd = tu_buf_vec(N, sdt);
    dy = bwd ? tu_buf_layout(c->layout, 2, 1, B, T, C, dt) : tu_buf_none();
    dx = bwd ? tu_buf_layout(c->layout, 1, 0, B, T, C, dt) : tu_buf_none();
    dw = bwd ? tu_buf_vec(C, wdt) : tu_buf_none();
    db = (bwd && !rms) ? tu_buf_vec(C, wdt) : tu_buf_none();
    memset(&st, 0, sizeof st);
    st.inp = x.rows; st.out = y.rows; st.residual = r.rows; st.h = h.rows;
    st.dout = dy.rows; st.dinp = dx.rows;
    sp = c->layout == TU_DENSE ? NULL : &st;

    if (bwd) {
        tu_fill_normal(&dy, &rng, 0.0, 1.0);
        /* statistics from the library itself would tie this case to the
         * forward kernels; compute them here */
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
            tu_fill_normal(&dx, &rng, 0.0, 1.0);
            tu_fill_normal(&dw, &rng, 0.0, 1.0);
            if (db.mem) tu_fill_normal(&db, &rng, 0.0, 1.0);
        }
        if (rms)
            s = pn_rmsnorm_backward(tu_ptr(&dx), tu_ptr(&dw), NULL, 0, tu_ptr(&dy), tu_ptr(&x),
                                    tu_ptr(&w), tu_ptr(&rstd), B, T, C, acc ? PN_ACCUMULATE : 0,
                                    dt, wdt, sp);
        else
            s = pn_layernorm_backward(tu_ptr(&dx), tu_ptr(&dw), tu_ptr(&db), NULL, 0, tu_ptr(&dy),
                                      tu_ptr(&x), tu_ptr(&w), tu_ptr(&mean), tu_ptr(&rstd), B, T,
                                      C, acc ? PN_ACCUMULATE : 0, dt, wdt, sp);
        hash_buf(&hh, &dx);
        hash_buf(&hh, &dw);
        hash_buf(&hh, &db);
    } else {
        switch (op) {
        case OP_LN_FWD:
            s = pn_layernorm_forward(tu_ptr(&y), tu_ptr(&mean), tu_ptr(&rstd), tu_ptr(&x),
                                     tu_ptr(&w), tu_ptr(&b), B, T, C, 1e-5, dt, wdt, sp);
            break;
        case OP_LN_ADD:
            s = pn_add_layernorm_forward(tu_ptr(&y), tu_ptr(&h), tu_ptr(&mean), tu_ptr(&rstd),
                                         tu_ptr(&x), tu_ptr(&r), tu_ptr(&w), tu_ptr(&b), B, T, C,
                                         1e-5, dt, wdt, sp);
            break;
        case OP_RMS_FWD:
            s = pn_rmsnorm_forward(tu_ptr(&y), tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&w), B, T, C,
                                   1e-6, dt, wdt, sp);
            break;
        default:
            s = pn_add_rmsnorm_forward(tu_ptr(&y), tu_ptr(&h), tu_ptr(&rstd), tu_ptr(&x),
                                       tu_ptr(&r), tu_ptr(&w), B, T, C, 1e-6, dt, wdt, sp);
            break;
        }
        hash_buf(&hh, &y);
        if (c->edge) hash_buf_raw(&hh, &h);
        else hash_buf(&hh, &h);
        hash_buf(&hh, &mean);
        hash_buf(&hh, &rstd);
    }
    hash_bytes(&hh, &s, sizeof s);
    tu_buf_free(&x); tu_buf_free(&r); tu_buf_free(&y); tu_buf_free(&h); tu_buf_free(&mean);
    tu_buf_free(&rstd); tu_buf_free(&w); tu_buf_free(&b); tu_buf_free(&dy); tu_buf_free(&dx);
    tu_buf_free(&dw); tu_buf_free(&db);
    return s == PN_OK ? hh.h : 0;
}

/* --- spatial norms: GroupNorm, BatchNorm (training) ----------------------- */

enum { SP_GN_FWD = 0, SP_GN_BWD, SP_BN_FWD, SP_BN_BWD, SP_N };

static const char *sp_names[SP_N] = {"gn_fwd", "gn_bwd", "bn_fwd", "bn_bwd"};

typedef struct {
    int64_t N, C, S, G;
} sp_cfg_t;

static const sp_cfg_t sp_cfgs[] = {
    {1, 1, 1, 1},    {2, 6, 5, 3},     {3, 32, 49, 8},  {2, 64, 17, 64}, /* InstanceNorm */
    {4, 16, 256, 4}, {7, 10, 1, 5},    {2, 8, 1031, 2}, {5, 48, 64, 16},
    {2, 1280, 40, 32}, /* NHWC pieces of 25 rows and fewer */
};

/* One spatial case: the hash of all outputs (status included), 0 when a call
 * failed. The backward takes the statistics of the library's forward. */
static uint64_t run_spatial_case(int op, const sp_cfg_t *c, pn_layout l, pn_dtype dt, pn_dtype wdt,
                                 int with_w)
{
    const int64_t N = c->N, C = c->C, S = c->S, G = c->G, n = N * C * S;
    const int bn = op == SP_BN_FWD || op == SP_BN_BWD;
    const int bwd = op == SP_GN_BWD || op == SP_BN_BWD;
    const int64_t nstat = bn ? C : N * G;
    const pn_dtype sdt = tu_stat_dtype(dt);
    tu_rng rng;
    tu_buf x, y, w, b, mean, rstd, rm, rv, dy, dx, dw, db;
    pn_status s1, s2 = PN_OK;
    hash_t hh;

    hh.h = 0xcbf29ce484222325ull;
    rng.s = 777 + (uint64_t)(op * 131 + (int)dt * 17 + (int)wdt * 3 + with_w + (int)l * 7) +
            (uint64_t)(C * 11 + N * 5 + S);
    x = tu_buf_vec(n, dt);
    tu_fill_normal(&x, &rng, 0.5, 2.0);
    y = tu_buf_vec(n, dt);
    w = with_w ? tu_buf_vec(C, wdt) : tu_buf_none();
    if (w.mem) tu_fill_normal(&w, &rng, 1.0, 0.4);
    b = with_w ? tu_buf_vec(C, wdt) : tu_buf_none();
    if (b.mem) tu_fill_normal(&b, &rng, 0.0, 0.4);
    mean = tu_buf_vec(nstat, sdt);
    rstd = tu_buf_vec(nstat, sdt);
    rm = bn ? tu_buf_vec(C, wdt) : tu_buf_none();
    rv = bn ? tu_buf_vec(C, wdt) : tu_buf_none();
    if (bn) {
        tu_fill_normal(&rm, &rng, 0.0, 0.5);
        tu_fill_normal(&rv, &rng, 1.0, 0.1);
    }
    dy = bwd ? tu_buf_vec(n, dt) : tu_buf_none();
    dx = bwd ? tu_buf_vec(n, dt) : tu_buf_none();
    dw = bwd ? tu_buf_vec(C, wdt) : tu_buf_none();
    db = bwd ? tu_buf_vec(C, wdt) : tu_buf_none();
    if (bwd) {
        tu_fill_normal(&dy, &rng, 0.0, 1.0);
        tu_fill_normal(&dx, &rng, 0.0, 1.0); /* accumulated into */
        tu_fill_normal(&dw, &rng, 0.0, 1.0);
        tu_fill_normal(&db, &rng, 0.0, 1.0);
    }

    if (bn)
        s1 = pn_batchnorm_forward(tu_ptr(&y), tu_ptr(&mean), tu_ptr(&rstd), tu_ptr(&rm), tu_ptr(&rv),
                                  tu_ptr(&x), tu_ptr(&w), tu_ptr(&b), N, C, S, 1e-5, 0.1, 0,
                                  PN_BN_TRAINING, l, dt, wdt, wdt);
    else
        s1 = pn_groupnorm_forward(tu_ptr(&y), tu_ptr(&mean), tu_ptr(&rstd), tu_ptr(&x), tu_ptr(&w),
                                  tu_ptr(&b), N, C, S, G, 1e-5, l, dt, wdt);
    if (!bwd) {
        hash_buf(&hh, &y);
        hash_buf(&hh, &mean);
        hash_buf(&hh, &rstd);
        hash_buf(&hh, &rm);
        hash_buf(&hh, &rv);
    } else {
        if (bn)
            s2 = pn_batchnorm_backward(tu_ptr(&dx), tu_ptr(&dw), tu_ptr(&db), NULL, 0, tu_ptr(&dy),
                                       tu_ptr(&x), tu_ptr(&w), tu_ptr(&mean), tu_ptr(&rstd), N, C,
                                       S, PN_BN_TRAINING | PN_ACCUMULATE, l, dt, wdt);
        else
            s2 = pn_groupnorm_backward(tu_ptr(&dx), tu_ptr(&dw), tu_ptr(&db), NULL, 0, tu_ptr(&dy),
                                       tu_ptr(&x), tu_ptr(&w), tu_ptr(&mean), tu_ptr(&rstd), N, C,
                                       S, G, PN_ACCUMULATE, l, dt, wdt);
        hash_buf(&hh, &dx);
        hash_buf(&hh, &dw);
        hash_buf(&hh, &db);
    }
    hash_bytes(&hh, &s1, sizeof s1);
    hash_bytes(&hh, &s2, sizeof s2);
    tu_buf_free(&x); tu_buf_free(&y); tu_buf_free(&w); tu_buf_free(&b); tu_buf_free(&mean);
    tu_buf_free(&rstd); tu_buf_free(&rm); tu_buf_free(&rv); tu_buf_free(&dy); tu_buf_free(&dx);
    tu_buf_free(&dw); tu_buf_free(&db);
    return s1 == PN_OK && s2 == PN_OK ? hh.h : 0;
}

static int do_write(const char *path)
{
    FILE *f = fopen(path, "w");
    int op, ci, di, wi, li, zero = 0, ncases = 0;
    const char *env = getenv("PYNORM_ISA");
    const char *isa = pn_isa();
    if (!f) {
        tu_check(0, "open %s for writing", path);
        return tu_summary();
    }
    printf("pynorm %s, isa %s (PYNORM_ISA=%s)\n", pn_version(), isa, env ? env : "(unset)");
    if (env && (strcmp(env, "generic") == 0 || strcmp(env, "avx2") == 0))
        tu_check(strcmp(isa, "avx512") != 0 && (strcmp(env, "avx2") == 0 || strcmp(isa, "generic") == 0),
                 "PYNORM_ISA=%s is honoured: pn_isa() = %s", env, isa);
    fprintf(f, "# isa %s\n", isa);
    if (tu_quick())
        fprintf(f, "# quick: PYNORM_TEST_QUICK=1 left out the cases of 8 MiB and more\n");
    for (op = 0; op < OP_N; op++)
        for (ci = 0; ci < NELEM(cfgs); ci++)
            for (di = 0; di < NELEM(dtypes); di++)
                for (wi = 0; wi < 2; wi++) {
                    const cfg_t *c = &cfgs[ci];
                    uint64_t hv;
                    if (c->big && (tu_quick() || !wi || (dtypes[di].dt != PN_FLOAT32 && dtypes[di].wdt != PN_FLOAT64)))
                        continue;
                    if (c->edge && !is_half(dtypes[di].dt))
                        continue;
                    hv = run_case(op, c, dtypes[di].dt, dtypes[di].wdt, wi);
                    if (hv == 0) zero++;
                    ncases++;
                    fprintf(f, "%s %s/%s B=%lld T=%lld C=%lld %s%s %s %016llx\n", op_names[op],
                            tu_dtype_name(dtypes[di].dt), tu_dtype_name(dtypes[di].wdt),
                            (long long)c->B, (long long)c->T, (long long)c->C,
                            tu_layout_name(c->layout), c->nonfinite ? "+nan" : c->edge ? "+edge" : "",
                            wi ? "w" : "no-w", (unsigned long long)hv);
                }
    for (op = 0; op < SP_N; op++)
        for (ci = 0; ci < NELEM(sp_cfgs); ci++)
            for (li = 0; li < 2; li++)
                for (di = 0; di < NELEM(dtypes); di++)
                    for (wi = 0; wi < 2; wi++) {
                        const sp_cfg_t *c = &sp_cfgs[ci];
                        const pn_layout l = li ? PN_NHWC : PN_NCHW;
                        uint64_t hv;
                        if (op >= SP_BN_FWD && c->N * c->S < 2)
                            continue; /* training BatchNorm needs two values per channel */
                        hv = run_spatial_case(op, c, l, dtypes[di].dt, dtypes[di].wdt, wi);
                        if (hv == 0) zero++;
                        ncases++;
                        fprintf(f, "%s %s/%s N=%lld C=%lld S=%lld G=%lld %s %s %016llx\n", sp_names[op],
                                tu_dtype_name(dtypes[di].dt), tu_dtype_name(dtypes[di].wdt),
                                (long long)c->N, (long long)c->C, (long long)c->S, (long long)c->G,
                                li ? "nhwc" : "nchw", wi ? "w" : "no-w", (unsigned long long)hv);
                    }
    fclose(f);
    tu_check(zero == 0, "wrote %d case hashes under isa %s to %s; calls that failed: %d", ncases,
             isa, path, zero);
    return tu_summary();
}

static char *read_line(FILE *f, char *buf, int n)
{
    char *p = fgets(buf, n, f);
    if (p) {
        size_t l = strlen(buf);
        if (l && buf[l - 1] == '\n') buf[l - 1] = 0;
    }
    return p;
}

static int do_compare(const char *a, const char *b)
{
    FILE *fa = fopen(a, "r"), *fb = fopen(b, "r");
    char la[512], lb[512], isa_a[64] = "?", isa_b[64] = "?";
    int lines = 0, diffs = 0, quick_a = 0, quick_b = 0;
    if (!fa || !fb) {
        tu_check(0, "open %s and %s (did the write tests run?)", a, b);
        if (fa) fclose(fa);
        if (fb) fclose(fb);
        return tu_summary();
    }
    for (;;) {
        char *pa = read_line(fa, la, sizeof la), *pb = read_line(fb, lb, sizeof lb);
        if (!pa && !pb) break;
        if (!pa || !pb) {
            tu_check(0, "files have different lengths (%s ends first)", pa ? b : a);
            diffs++;
            break;
        }
        if (la[0] == '#' || lb[0] == '#') {
            /* comment lines: the ISA, and whether the write was quick */
            sscanf(la, "# isa %63s", isa_a);
            sscanf(lb, "# isa %63s", isa_b);
            quick_a |= strncmp(la, "# quick", 7) == 0;
            quick_b |= strncmp(lb, "# quick", 7) == 0;
            if (la[0] == '#' && lb[0] == '#')
                continue;
            if (quick_a != quick_b) {
                tu_check(0, "%s was written with PYNORM_TEST_QUICK=1 and %s without: write both the same way",
                         quick_a ? a : b, quick_a ? b : a);
                diffs++;
                break;
            }
        }
        lines++;
        if (strcmp(la, lb) != 0) {
            diffs++;
            tu_check(0, "differs: [%s] vs [%s]", la, lb);
        }
    }
    fclose(fa);
    fclose(fb);
    tu_check(diffs == 0 && lines > 0, "%d cases bit-identical between isa %s (%s) and isa %s (%s): %d differ",
             lines, isa_a, a, isa_b, b, diffs);
    return tu_summary();
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "write") == 0)
        return do_write(argv[2]);
    if (argc == 4 && strcmp(argv[1], "compare") == 0)
        return do_compare(argv[2], argv[3]);
    fprintf(stderr, "usage: %s write FILE | compare FILE FILE\n", argv[0]);
    return 2;
}
