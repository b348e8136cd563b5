/* test_errors.c - every pn_status path of the token-norm functions, and for
 * each one: the call writes nothing (every buffer lives in one arena, whose
 * bytes are compared before and after the call). Also pn_status_string,
 * pn_isa, pn_version, the thread setting and the buffer helpers. */
#include <limits.h>

#include "testutil.h"

enum { OP_LN_FWD = 0, OP_LN_ADD, OP_LN_BWD, OP_RMS_FWD, OP_RMS_ADD, OP_RMS_BWD, OP_N };

static const char *op_names[OP_N] = {
    "layernorm_forward", "add_layernorm_forward", "layernorm_backward",
    "rmsnorm_forward", "add_rmsnorm_forward", "rmsnorm_backward",
};

static int is_bwd(int op) { return op == OP_LN_BWD || op == OP_RMS_BWD; }
static int is_fused(int op) { return op == OP_LN_ADD || op == OP_RMS_ADD; }
static int is_rms(int op) { return op >= OP_RMS_FWD; }

/* every argument of every token-norm function */
typedef struct {
    int op;
    void *out, *h, *mean, *rstd, *dinp, *dweight, *dbias, *scratch;
    size_t scratch_bytes;
    const void *inp, *residual, *weight, *bias, *dout;
    int64_t B, T, C;
    double eps;
    int flags;
    pn_dtype dt, wdt;
    pn_strides strides;
    int use_strides;
} call_t;

static pn_status do_call(const call_t *c)
{
    const pn_strides *s = c->use_strides ? &c->strides : NULL;
    switch (c->op) {
    case OP_LN_FWD:
        return pn_layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->weight, c->bias, c->B,
                                    c->T, c->C, c->eps, c->dt, c->wdt, s);
    case OP_LN_ADD:
        return pn_add_layernorm_forward(c->out, c->h, c->mean, c->rstd, c->inp, c->residual,
                                        c->weight, c->bias, c->B, c->T, c->C, c->eps, c->dt,
                                        c->wdt, s);
    case OP_LN_BWD:
        return pn_layernorm_backward(c->dinp, c->dweight, c->dbias, c->scratch, c->scratch_bytes,
                                     c->dout, c->inp, c->weight, c->mean, c->rstd, c->B, c->T,
                                     c->C, c->flags, c->dt, c->wdt, s);
    case OP_RMS_FWD:
        return pn_rmsnorm_forward(c->out, c->rstd, c->inp, c->weight, c->B, c->T, c->C, c->eps,
                                  c->dt, c->wdt, s);
    case OP_RMS_ADD:
        return pn_add_rmsnorm_forward(c->out, c->h, c->rstd, c->inp, c->residual, c->weight, c->B,
                                      c->T, c->C, c->eps, c->dt, c->wdt, s);
    default:
        return pn_rmsnorm_backward(c->dinp, c->dweight, c->scratch, c->scratch_bytes, c->dout,
                                   c->inp, c->weight, c->rstd, c->B, c->T, c->C, c->flags, c->dt,
                                   c->wdt, s);
    }
}

/* ------------------------------------------------------------------------ */
/* the arena: one region per buffer                                          */

/* R_PAD0 keeps every buffer away from the arena's start, so that pointers a
 * little below an input still lie inside the arena */
enum { R_PAD0 = 0, R_INP, R_RES, R_W, R_B, R_OUT, R_H, R_MEAN, R_RSTD, R_DOUT, R_DINP, R_DW, R_DB,
       R_SCRATCH, R_N };
#define REGION 8192            /* bytes per region */
#define SCRATCH_REGION (1 << 20)
#define MID 4096               /* where a buffer with negative strides starts */

static unsigned char *arena;
static unsigned char *arena_copy;
static size_t arena_bytes;

static unsigned char *region(int r) { return arena + (size_t)r * REGION; }

/* Valid contents: random inputs, plausible statistics, sentinel outputs. */
static void arena_fill(void)
{
    tu_rng rng;
    size_t i;
    rng.s = 2024;
    memset(arena, TU_SENTINEL, arena_bytes);
    /* inputs hold bytes that read as finite, moderate numbers in every
     * dtype: 0x3F3F... is 0.747 in f32, 1.81 in f16, 0.746 in bf16 */
    for (i = 0; i < REGION; i++) {
        region(R_INP)[i] = 0x3F;
        region(R_RES)[i] = 0x3E;
        region(R_W)[i] = 0x3F;
        region(R_B)[i] = 0x3D;
        region(R_DOUT)[i] = 0x3C;
        region(R_MEAN)[i] = 0x3E;
        region(R_RSTD)[i] = 0x3F;
    }
    /* a little variation inside the input rows */
    for (i = 0; i < REGION; i += 2)
        region(R_INP)[i] = (unsigned char)(0x38 + (tu_next(&rng) & 7));
}

typedef struct {
    int64_t B, T, C;
} dims_t;

/* A valid call: every optional pointer given, dense, B=2 T=3 C=5. */
static call_t base_call(int op, pn_dtype dt, pn_dtype wdt)
{
    call_t c;
    memset(&c, 0, sizeof c);
    c.op = op;
    c.B = 2; c.T = 3; c.C = 5;
    c.dt = dt; c.wdt = wdt;
    c.eps = 1e-5;
    c.inp = region(R_INP);
    c.weight = region(R_W);
    if (!is_rms(op)) c.bias = region(R_B);
    if (is_fused(op)) { c.residual = region(R_RES); c.h = region(R_H); }
    if (is_bwd(op)) {
        c.dout = region(R_DOUT);
        c.dinp = region(R_DINP);
        c.dweight = region(R_DW);
        if (!is_rms(op)) { c.dbias = region(R_DB); c.mean = region(R_MEAN); }
        c.rstd = region(R_RSTD);
        c.scratch = region(R_SCRATCH);
        c.scratch_bytes = SCRATCH_REGION;
    } else {
        c.out = region(R_OUT);
        c.rstd = region(R_RSTD);
        if (!is_rms(op)) c.mean = region(R_MEAN);
    }
    return c;
}

static const char *status_name(pn_status s)
{
    static const char *names[] = {"PN_OK", "PN_ERR_NULL", "PN_ERR_SIZE", "PN_ERR_DTYPE",
                                  "PN_ERR_EPS", "PN_ERR_STRIDE", "PN_ERR_ALIAS", "PN_ERR_SCRATCH",
                                  "PN_ERR_ALLOC", "PN_ERR_GROUPS", "PN_ERR_ARG"};
    if ((int)s >= 0 && (int)s <= 10)
        return names[(int)s];
    return "unknown";
}

/* Runs the call on a fresh arena; the status must be `want` and, unless it
 * is PN_OK, no byte of the arena may change. want < 0: any error status. */
static void expect(const char *what, const call_t *c, int want)
{
    pn_status s;
    int untouched;
    arena_fill();
    memcpy(arena_copy, arena, arena_bytes);
    s = do_call(c);
    untouched = memcmp(arena_copy, arena, arena_bytes) == 0;
    if (want == PN_OK) {
        tu_check(s == PN_OK, "%s %s/%s %s: status %s (want PN_OK)", op_names[c->op],
                 tu_dtype_name(c->dt), tu_dtype_name(c->wdt), what, status_name(s));
    } else if (want < 0) {
        tu_check(s != PN_OK && untouched, "%s %s/%s %s: status %s (want an error), nothing written=%d",
                 op_names[c->op], tu_dtype_name(c->dt), tu_dtype_name(c->wdt), what,
                 status_name(s), untouched);
    } else {
        tu_check(s == (pn_status)want && untouched,
                 "%s %s/%s %s: status %s (want %s), nothing written=%d", op_names[c->op],
                 tu_dtype_name(c->dt), tu_dtype_name(c->wdt), what, status_name(s),
                 status_name((pn_status)want), untouched);
    }
}

/* Either outcome is defensible for the call (the contract leaves it open):
 * PN_OK, or `err` with nothing written. Reported, never failed otherwise. */
static void expect_either(const char *what, const call_t *c, pn_status err)
{
    pn_status s;
    int untouched;
    arena_fill();
    memcpy(arena_copy, arena, arena_bytes);
    s = do_call(c);
    untouched = memcmp(arena_copy, arena, arena_bytes) == 0;
    tu_check(s == PN_OK || (s == err && untouched),
             "%s %s/%s %s: status %s (accepted: PN_OK or %s with nothing written), nothing written=%d",
             op_names[c->op], tu_dtype_name(c->dt), tu_dtype_name(c->wdt), what, status_name(s),
             status_name(err), untouched);
}

/* ------------------------------------------------------------------------ */

static void test_null(int op)
{
    call_t b = base_call(op, PN_FLOAT32, PN_FLOAT32), c;
    expect("valid base call", &b, PN_OK);
    c = b; c.inp = NULL; expect("inp=NULL", &c, PN_ERR_NULL);
    if (is_bwd(op)) {
        c = b; c.dout = NULL; expect("dout=NULL", &c, PN_ERR_NULL);
        c = b; c.rstd = NULL; expect("rstd=NULL", &c, PN_ERR_NULL);
        if (!is_rms(op)) { c = b; c.mean = NULL; expect("mean=NULL", &c, PN_ERR_NULL); }
        c = b; c.dinp = NULL; expect("dinp=NULL (optional)", &c, PN_OK);
        c = b; c.dweight = NULL; expect("dweight=NULL (optional)", &c, PN_OK);
        if (!is_rms(op)) { c = b; c.dbias = NULL; expect("dbias=NULL (optional)", &c, PN_OK); }
        c = b; c.weight = NULL; expect("weight=NULL (optional)", &c, PN_OK);
        c = b; c.scratch = NULL; c.scratch_bytes = 0; expect("scratch=NULL (library allocates)", &c, PN_OK);
        c = b; c.dinp = NULL; c.dweight = NULL; c.dbias = NULL;
        expect_either("all gradient outputs NULL", &c, PN_ERR_NULL);
        /* NULL checks come before size checks would matter */
        c = b; c.dout = NULL; c.B = 1LL << 40; c.T = 1LL << 20;
        expect("dout=NULL with huge sizes", &c, -1);
    } else {
        c = b; c.out = NULL; expect("out=NULL", &c, PN_ERR_NULL);
        c = b; c.weight = NULL; expect("weight=NULL (optional)", &c, PN_OK);
        if (!is_rms(op)) {
            c = b; c.bias = NULL; expect("bias=NULL (optional)", &c, PN_OK);
            c = b; c.mean = NULL; expect("mean=NULL (optional)", &c, PN_OK);
        }
        c = b; c.rstd = NULL; expect("rstd=NULL (optional)", &c, PN_OK);
        if (is_fused(op)) {
            c = b; c.residual = NULL; expect("residual=NULL", &c, PN_ERR_NULL);
            c = b; c.h = NULL; expect_either("h=NULL", &c, PN_ERR_NULL);
        }
    }
}

static void test_sizes(int op)
{
    call_t b = base_call(op, PN_FLOAT32, PN_FLOAT32), c;
    const int64_t big = INT64_MAX;
    c = b; c.B = 0; expect("B=0", &c, PN_ERR_SIZE);
    c = b; c.T = 0; expect("T=0", &c, PN_ERR_SIZE);
    c = b; c.C = 0; expect("C=0", &c, PN_ERR_SIZE);
    c = b; c.B = -1; expect("B=-1", &c, PN_ERR_SIZE);
    c = b; c.T = -3; expect("T=-3", &c, PN_ERR_SIZE);
    c = b; c.C = -5; expect("C=-5", &c, PN_ERR_SIZE);
    c = b; c.B = INT64_MIN; expect("B=INT64_MIN", &c, PN_ERR_SIZE);
    c = b; c.B = big; c.T = 2; c.C = 1; expect("B=INT64_MAX T=2 (element count overflows)", &c, PN_ERR_SIZE);
    c = b; c.B = 1LL << 31; c.T = 1LL << 31; c.C = 2;
    expect("B=T=2^31 C=2 (element count 2^63 overflows)", &c, PN_ERR_SIZE);
    c = b; c.B = 1LL << 30; c.T = 1LL << 30; c.C = 2;
    expect("B=T=2^30 C=2 f32 (2^61 elements, 2^63 bytes overflow)", &c, PN_ERR_SIZE);
    c = b; c.B = 1; c.T = 1; c.C = (1LL << 61);
    expect("C=2^61 f32 (weight bytes overflow)", &c, PN_ERR_SIZE);
    c = b; c.B = 3; c.T = big / 2; c.C = 1; expect("T=INT64_MAX/2 B=3", &c, PN_ERR_SIZE);
    c = b; c.dt = PN_FLOAT64; c.wdt = PN_FLOAT64; c.B = 1LL << 30; c.T = 1LL << 30; c.C = 1;
    expect("B=T=2^30 C=1 f64 (2^63 bytes overflow)", &c, PN_ERR_SIZE);
    c = b; c.dt = PN_FLOAT16; c.wdt = PN_FLOAT16; c.B = 1LL << 31; c.T = 1LL << 31; c.C = 1;
    expect("B=T=2^31 C=1 f16 (2^63 bytes overflow)", &c, PN_ERR_SIZE);
    c = b; c.dt = PN_FLOAT16; c.wdt = PN_FLOAT32; c.B = 1; c.T = 1; c.C = 1LL << 61;
    expect("C=2^61 f16 with f32 weight (weight bytes overflow)", &c, PN_ERR_SIZE);
    /* strides that make the byte span overflow: any error, nothing written */
    c = b; c.use_strides = 1; c.strides.inp.b = big / 2; c.strides.inp.t = 5;
    expect("inp stride b=INT64_MAX/2 (span overflows)", &c, -1);
    c = b; c.use_strides = 1;
    if (is_bwd(op)) { c.strides.dinp.b = big / 3; c.strides.dinp.t = 5; }
    else { c.strides.out.b = big / 3; c.strides.out.t = 5; }
    expect("output stride b=INT64_MAX/3 (span overflows)", &c, -1);
    c = b; c.use_strides = 1;
    if (is_bwd(op)) { c.strides.dout.b = -(big / 2); c.strides.dout.t = -7; }
    else { c.strides.inp.b = -(big / 2); c.strides.inp.t = -7; }
    expect("input stride b=-INT64_MAX/2 (span overflows)", &c, -1);
}

static void test_dtypes(int op)
{
    call_t b = base_call(op, PN_FLOAT32, PN_FLOAT32), c;
    static const int bad[] = {4, 5, -1, 100, 0x7fffffff};
    int i;
    char what[100];
    for (i = 0; i < 5; i++) {
        c = b; c.dt = (pn_dtype)bad[i]; c.wdt = (pn_dtype)bad[i];
        snprintf(what, sizeof what, "dtype=%d", bad[i]);
        expect(what, &c, PN_ERR_DTYPE);
        c = b; c.wdt = (pn_dtype)bad[i];
        snprintf(what, sizeof what, "wdtype=%d", bad[i]);
        expect(what, &c, PN_ERR_DTYPE);
    }
    c = b; c.dt = PN_FLOAT32; c.wdt = PN_FLOAT16; expect("f32 with wdtype f16", &c, PN_ERR_DTYPE);
    c = b; c.dt = PN_FLOAT32; c.wdt = PN_BFLOAT16; expect("f32 with wdtype bf16", &c, PN_ERR_DTYPE);
    c = b; c.dt = PN_FLOAT32; c.wdt = PN_FLOAT64; expect("f32 with wdtype f64", &c, PN_ERR_DTYPE);
    c = b; c.dt = PN_FLOAT16; c.wdt = PN_BFLOAT16; expect("f16 with wdtype bf16", &c, PN_ERR_DTYPE);
    c = b; c.dt = PN_FLOAT16; c.wdt = PN_FLOAT64; expect("f16 with wdtype f64", &c, PN_ERR_DTYPE);
    c = b; c.dt = PN_BFLOAT16; c.wdt = PN_FLOAT16; expect("bf16 with wdtype f16", &c, PN_ERR_DTYPE);
    c = b; c.dt = PN_FLOAT64; c.wdt = PN_FLOAT16; expect("f64 with wdtype f16", &c, PN_ERR_DTYPE);
    c = b; c.dt = PN_FLOAT64; c.wdt = PN_BFLOAT16; expect("f64 with wdtype bf16", &c, PN_ERR_DTYPE);
    if (is_bwd(op)) {
        /* no weight, but dweight has dtype wdtype: still checked */
        c = b; c.weight = NULL; c.wdt = PN_FLOAT64;
        expect("weight=NULL, dweight given, f32 with wdtype f64", &c, PN_ERR_DTYPE);
    }
    /* the allowed combinations */
    c = b; c.dt = PN_FLOAT16; c.wdt = PN_FLOAT16; expect("f16 with wdtype f16", &c, PN_OK);
    c = b; c.dt = PN_FLOAT16; c.wdt = PN_FLOAT32; expect("f16 with wdtype f32", &c, PN_OK);
    c = b; c.dt = PN_BFLOAT16; c.wdt = PN_BFLOAT16; expect("bf16 with wdtype bf16", &c, PN_OK);
    c = b; c.dt = PN_BFLOAT16; c.wdt = PN_FLOAT32; expect("bf16 with wdtype f32", &c, PN_OK);
    c = b; c.dt = PN_FLOAT64; c.wdt = PN_FLOAT64; expect("f64 with wdtype f64", &c, PN_OK);
    c = b; c.dt = PN_FLOAT64; c.wdt = PN_FLOAT32; expect("f64 with wdtype f32", &c, PN_OK);
}

static void test_eps(int op)
{
    call_t b = base_call(op, PN_FLOAT32, PN_FLOAT32), c;
    if (is_bwd(op))
        return;
    c = b; c.eps = -1e-5; expect("eps=-1e-5", &c, PN_ERR_EPS);
    c = b; c.eps = -1e300; expect("eps=-1e300", &c, PN_ERR_EPS);
    c = b; c.eps = NAN; expect("eps=NaN", &c, PN_ERR_EPS);
    c = b; c.eps = -NAN; expect("eps=-NaN", &c, PN_ERR_EPS);
    c = b; c.eps = INFINITY; expect("eps=+Inf", &c, PN_ERR_EPS);
    c = b; c.eps = -INFINITY; expect("eps=-Inf", &c, PN_ERR_EPS);
    c = b; c.eps = 0.0; expect("eps=0 (allowed)", &c, PN_OK);
    c = b; c.eps = 1.0; expect("eps=1 (allowed)", &c, PN_OK);
    /* finite and positive, so allowed by the header's wording; a library
     * may still refuse absurd values (writing nothing) */
    c = b; c.eps = 1e308; expect("eps=1e308 (finite, huge)", &c, PN_OK);
    c = b; c.dt = PN_FLOAT64; c.wdt = PN_FLOAT64; c.eps = NAN; expect("f64 eps=NaN", &c, PN_ERR_EPS);
}

/* output rows that overlap each other */
static void test_strides(int op)
{
    call_t b = base_call(op, PN_FLOAT32, PN_FLOAT32), c;
    const int64_t T = 3, C = 5;
    pn_rows bad[4];
    const char *names[4] = {"{T*C, C-1} (rows of a batch overlap)", "{C, 0} (T rows coincide)",
                            "{C, C} (row (1,0) == row (0,1))",
                            "{-T*C, -(C-2)} (negative, overlapping)"};
    int i;
    bad[0].b = T * C; bad[0].t = C - 1;
    bad[1].b = C; bad[1].t = 0;
    bad[2].b = C; bad[2].t = C;
    bad[3].b = -T * C; bad[3].t = -(C - 2);
    for (i = 0; i < 4; i++) {
        char what[160];
        c = b; c.use_strides = 1;
        if (is_bwd(op)) {
            c.strides.dinp = bad[i];
            c.dinp = region(R_DINP) + MID;
            snprintf(what, sizeof what, "dinp strides %s", names[i]);
        } else {
            c.strides.out = bad[i];
            c.out = region(R_OUT) + MID;
            snprintf(what, sizeof what, "out strides %s", names[i]);
        }
        expect(what, &c, PN_ERR_STRIDE);
        if (is_fused(op)) {
            c = b; c.use_strides = 1; c.strides.h = bad[i]; c.h = region(R_H) + MID;
            snprintf(what, sizeof what, "h strides %s", names[i]);
            expect(what, &c, PN_ERR_STRIDE);
        }
    }
    /* rows that do not overlap, packed tighter than B * (T * st): rows of a
     * batch at st = C + 1, batches at sb = (T - 1) * st + C. The contract
     * allows it; a conservative check may refuse it (then writing nothing). */
    c = b; c.use_strides = 1;
    if (is_bwd(op)) { c.strides.dinp.b = (T - 1) * (C + 1) + C; c.strides.dinp.t = C + 1; }
    else { c.strides.out.b = (T - 1) * (C + 1) + C; c.strides.out.t = C + 1; }
    expect("output strides {(T-1)*(C+1)+C, C+1} (disjoint, tightly packed)", &c, PN_OK);
    /* inputs may overlap (broadcast rows), outputs may be sparse or reversed */
    c = b; c.use_strides = 1; c.strides.inp.b = C; c.strides.inp.t = 0;
    expect("inp strides {C, 0} (broadcast input, allowed)", &c, PN_OK);
    c = b; c.use_strides = 1; c.strides.inp.b = 0; c.strides.inp.t = 0;
    expect("inp strides {0, 0} (dense)", &c, PN_OK);
    if (is_bwd(op)) {
        c = b; c.use_strides = 1; c.strides.dout.b = 0; c.strides.dout.t = C;
        expect("dout strides {0, C} (broadcast over B, allowed)", &c, PN_OK);
        c = b; c.use_strides = 1; c.strides.dinp.b = -T * (C + 2); c.strides.dinp.t = -(C + 2);
        c.dinp = region(R_DINP) + MID;
        expect("dinp strides negative, padded (allowed)", &c, PN_OK);
    } else {
        c = b; c.use_strides = 1; c.strides.out.b = -T * (C + 2); c.strides.out.t = -(C + 2);
        c.out = region(R_OUT) + MID;
        expect("out strides negative, padded (allowed)", &c, PN_OK);
        c = b; c.use_strides = 1; c.strides.out.b = T * C; c.strides.out.t = C;
        expect("out strides explicit dense (allowed)", &c, PN_OK);
        if (is_fused(op)) {
            c = b; c.use_strides = 1; c.strides.residual.b = 0; c.strides.residual.t = C;
            expect("residual strides {0, C} (broadcast, allowed)", &c, PN_OK);
        }
    }
}

/* outputs overlapping inputs or each other */
static void test_alias(int op)
{
    call_t b = base_call(op, PN_FLOAT32, PN_FLOAT32), c;
    const int64_t N = 6, NC = 30; /* rows, elements */
    if (!is_bwd(op)) {
        c = b; c.out = (void *)((const float *)c.inp + 1); expect("out = inp + 1 element", &c, PN_ERR_ALIAS);
        c = b; c.out = (void *)((const float *)c.inp + NC - 1); expect("out = inp + 29 (last element shared)", &c, PN_ERR_ALIAS);
        c = b; c.out = (void *)((const float *)c.inp - NC + 1); expect("out = inp - 29 (first element shared)", &c, PN_ERR_ALIAS);
        c = b; c.out = (void *)((const float *)c.inp + NC); expect("out = inp + 30 (adjacent, allowed)", &c, PN_OK);
        c = b; c.out = (void *)((const float *)c.inp - NC); expect("out = inp - 30 (adjacent, allowed)", &c, PN_OK);
        c = b; c.out = (void *)c.inp; expect("out == inp, same (dense) strides: in place, allowed", &c, PN_OK);
        c = b; c.out = (void *)c.inp; c.use_strides = 1; c.strides.inp.b = 3 * 7; c.strides.inp.t = 7;
        c.strides.out = c.strides.inp;
        expect("out == inp, same padded strides: in place, allowed", &c, PN_OK);
        c = b; c.out = (void *)c.inp; c.use_strides = 1; c.strides.inp.b = 3 * 7; c.strides.inp.t = 7;
        expect("out == inp, different strides", &c, PN_ERR_ALIAS);
        c = b; c.out = (void *)c.inp; c.use_strides = 1; c.strides.out.b = 5; c.strides.out.t = 10;
        expect("out == inp, out strides {C, 2C} vs dense inp", &c, PN_ERR_ALIAS);
        c = b; c.out = (void *)((const char *)c.inp + 2); expect("out = inp + 2 bytes (misaligned overlap)", &c, PN_ERR_ALIAS);
        c = b; c.out = (void *)((const float *)c.weight + 2); expect("out overlaps weight", &c, PN_ERR_ALIAS);
        c = b; c.out = (void *)((const float *)c.weight - 3 * 5 * 2 + 1); expect("out's last element is weight[0]", &c, PN_ERR_ALIAS);
        if (!is_rms(op)) {
            c = b; c.out = (void *)((const float *)c.bias + 4); expect("out overlaps bias", &c, PN_ERR_ALIAS);
            c = b; c.mean = c.out; expect("mean == out", &c, PN_ERR_ALIAS);
            c = b; c.mean = (float *)c.rstd + 5; expect("mean overlaps rstd", &c, PN_ERR_ALIAS);
            c = b; c.mean = (void *)c.inp; expect("mean == inp", &c, PN_ERR_ALIAS);
            c = b; c.mean = (float *)c.rstd + N; expect("mean right after rstd (allowed)", &c, PN_OK);
        }
        c = b; c.rstd = (float *)c.out + NC - 2; expect("rstd overlaps out's end", &c, PN_ERR_ALIAS);
        c = b; c.rstd = (void *)((const float *)c.inp + 7); expect("rstd inside inp", &c, PN_ERR_ALIAS);
        c = b; c.rstd = (void *)((const float *)c.weight + 4); expect("rstd overlaps weight", &c, PN_ERR_ALIAS);
        /* an output with negative strides overlapping an input through its low end */
        c = b; c.use_strides = 1; c.strides.out.b = -15; c.strides.out.t = -5;
        c.out = (void *)((const float *)c.inp + NC + 10);
        expect("out (negative strides) reaches down into inp", &c, PN_ERR_ALIAS);
        if (is_fused(op)) {
            c = b; c.h = c.out; expect("h == out", &c, PN_ERR_ALIAS);
            c = b; c.h = (float *)c.out + 3; expect("h overlaps out", &c, PN_ERR_ALIAS);
            c = b; c.h = (void *)((const float *)c.residual + 1); expect("h = residual + 1", &c, PN_ERR_ALIAS);
            c = b; c.h = (void *)((const float *)c.inp + 1); expect("h = inp + 1", &c, PN_ERR_ALIAS);
            c = b; c.out = (void *)((const float *)c.residual + 1); expect("out = residual + 1", &c, PN_ERR_ALIAS);
            c = b; c.rstd = (float *)c.h + 4; expect("rstd overlaps h", &c, PN_ERR_ALIAS);
            c = b; c.h = (void *)((const float *)c.weight - 1); expect("h overlaps weight", &c, PN_ERR_ALIAS);
            c = b; c.out = (void *)c.inp; expect("out == inp (in place, allowed)", &c, PN_OK);
            /* y and h rows interleaved in one buffer: no element shared, but
             * the byte ranges overlap; a range check may refuse it */
            c = b; c.use_strides = 1;
            c.strides.out.b = 2 * 3 * 5; c.strides.out.t = 2 * 5;
            c.strides.h = c.strides.out;
            c.h = (float *)c.out + 5;
            expect_either("y and h rows interleaved (no element shared)", &c, PN_ERR_ALIAS);
            c = b; c.h = (void *)c.residual; expect("h == residual (in place residual stream)", &c, PN_OK);
            c = b; c.h = (void *)c.inp; expect("h == inp (in place)", &c, PN_OK);
            c = b; c.out = (void *)c.residual; expect("out == residual (in place)", &c, PN_OK);
        }
    } else {
        c = b; c.dinp = (void *)((const float *)c.dout + 1); expect("dinp = dout + 1", &c, PN_ERR_ALIAS);
        c = b; c.dinp = (void *)((const float *)c.inp + 1); expect("dinp = inp + 1", &c, PN_ERR_ALIAS);
        c = b; c.dinp = (void *)((const float *)c.inp - NC + 1); expect("dinp = inp - 29", &c, PN_ERR_ALIAS);
        c = b; c.dinp = (void *)((const float *)c.inp + NC); expect("dinp = inp + 30 (adjacent, allowed)", &c, PN_OK);
        c = b; c.dinp = (void *)((const float *)c.rstd - 2); expect("dinp overlaps rstd", &c, PN_ERR_ALIAS);
        c = b; c.dinp = (void *)((const float *)c.weight + 1); expect("dinp overlaps weight", &c, PN_ERR_ALIAS);
        c = b; c.dweight = (float *)c.dinp + 10; expect("dweight inside dinp", &c, PN_ERR_ALIAS);
        c = b; c.dweight = (void *)c.weight; expect("dweight == weight", &c, PN_ERR_ALIAS);
        c = b; c.dweight = (void *)((const float *)c.dout + 25); expect("dweight overlaps dout's end", &c, PN_ERR_ALIAS);
        c = b; c.dweight = (void *)((const float *)c.rstd + 1); expect("dweight overlaps rstd", &c, PN_ERR_ALIAS);
        if (!is_rms(op)) {
            c = b; c.dbias = c.dweight; expect("dbias == dweight", &c, PN_ERR_ALIAS);
            c = b; c.dbias = (float *)c.dweight + 4; expect("dbias overlaps dweight's last", &c, PN_ERR_ALIAS);
            c = b; c.dbias = (float *)c.dweight + 5; expect("dbias right after dweight (allowed)", &c, PN_OK);
            c = b; c.dbias = (void *)((const float *)c.mean + 3); expect("dbias overlaps mean", &c, PN_ERR_ALIAS);
            c = b; c.dinp = (void *)((const float *)c.mean + 5); expect("dinp overlaps mean", &c, PN_ERR_ALIAS);
            c = b; c.dbias = (void *)c.inp; expect("dbias == inp", &c, PN_ERR_ALIAS);
        }
        c = b; c.use_strides = 1; c.strides.dinp.b = -15; c.strides.dinp.t = -5;
        c.dinp = (void *)((const float *)c.dout + NC + 10);
        expect("dinp (negative strides) reaches down into dout", &c, PN_ERR_ALIAS);
        /* with ACCUMULATE too */
        c = b; c.flags = PN_ACCUMULATE; c.dweight = (float *)c.dinp + 3; expect("accumulate: dweight inside dinp", &c, PN_ERR_ALIAS);
        c = b; c.dinp = (void *)c.dout; expect("dinp == dout (in place)", &c, PN_OK);
    }
}

static void test_scratch(int op)
{
    call_t b = base_call(op, PN_FLOAT32, PN_FLOAT32), c;
    size_t need;
    int dti;
    if (!is_bwd(op))
        return;
    for (dti = 0; dti < 4; dti++) {
        pn_dtype dt = (pn_dtype)dti;
        char what[160];
        need = is_rms(op) ? pn_rmsnorm_backward_scratch_size(2, 3, 5, dt)
                          : pn_layernorm_backward_scratch_size(2, 3, 5, dt);
        if (need > SCRATCH_REGION) {
            tu_check(0, "%s scratch size %zu bytes for B=2 T=3 C=5 is implausibly large",
                     op_names[op], need);
            continue;
        }
        c = b; c.dt = dt; c.wdt = dt; c.scratch_bytes = need;
        snprintf(what, sizeof what, "scratch of exactly %zu bytes", need);
        expect(what, &c, PN_OK);
        if (need == 0) {
            tu_check(1, "%s %s needs no scratch for B=2 T=3 C=5 (nothing to make too small)",
                     op_names[op], tu_dtype_name(dt));
            continue;
        }
        c = b; c.dt = dt; c.wdt = dt; c.scratch_bytes = need - 1;
        snprintf(what, sizeof what, "scratch of %zu bytes (needs %zu)", need - 1, need);
        expect(what, &c, PN_ERR_SCRATCH);
        c = b; c.dt = dt; c.wdt = dt; c.scratch_bytes = 1;
        expect("scratch of 1 byte", &c, PN_ERR_SCRATCH);
        c = b; c.dt = dt; c.wdt = dt; c.scratch_bytes = 0;
        expect("scratch pointer with 0 bytes", &c, PN_ERR_SCRATCH);
        c = b; c.dt = dt; c.wdt = dt; c.scratch_bytes = need - 1; c.flags = PN_ACCUMULATE;
        expect("accumulate, scratch 1 byte short", &c, PN_ERR_SCRATCH);
    }
    /* the query is a pure function of its arguments */
    need = is_rms(op) ? pn_rmsnorm_backward_scratch_size(64, 1024, 4096, PN_FLOAT32)
                      : pn_layernorm_backward_scratch_size(64, 1024, 4096, PN_FLOAT32);
    tu_check(need == (is_rms(op) ? pn_rmsnorm_backward_scratch_size(64, 1024, 4096, PN_FLOAT32)
                                 : pn_layernorm_backward_scratch_size(64, 1024, 4096, PN_FLOAT32)),
             "%s scratch size for B=64 T=1024 C=4096 f32: %zu bytes, same on a second query",
             op_names[op], need);
}

static void test_flags(int op)
{
    call_t b = base_call(op, PN_FLOAT32, PN_FLOAT32), c;
    static const int bad[] = {2, 3, -1, 0x100, INT_MIN};
    int i;
    if (!is_bwd(op))
        return;
    for (i = 0; i < 5; i++) {
        char what[64];
        c = b; c.flags = bad[i];
        snprintf(what, sizeof what, "flags=%d", bad[i]);
        expect(what, &c, PN_ERR_ARG);
    }
    c = b; c.flags = PN_ACCUMULATE; expect("flags=PN_ACCUMULATE", &c, PN_OK);
}

/* A call with several things wrong: still an error, nothing written. */
static void test_combined(int op)
{
    call_t b = base_call(op, PN_FLOAT32, PN_FLOAT32), c;
    c = b; c.C = 0; c.dt = (pn_dtype)9; expect("C=0 and dtype=9", &c, -1);
    c = b; c.B = -1; c.eps = NAN; c.inp = NULL; expect("B=-1, eps=NaN, inp=NULL", &c, -1);
}

static void test_misc(void)
{
    const char *strs[11];
    int i, j, distinct = 1, nonempty = 1;
    const char *isa = pn_isa();
    const char *env = getenv("PYNORM_ISA");
    const char *v = pn_version();
    char want[32];
    void *p;

    for (i = 0; i <= 10; i++) {
        strs[i] = pn_status_string((pn_status)i);
        if (!strs[i] || !strs[i][0]) nonempty = 0;
    }
    for (i = 0; i <= 10; i++)
        for (j = 0; j < i; j++)
            if (strs[i] && strs[j] && strcmp(strs[i], strs[j]) == 0) distinct = 0;
    tu_check(nonempty && distinct, "pn_status_string: codes 0..10 non-empty=%d distinct=%d",
             nonempty, distinct);
    for (i = 0; i <= 10; i++)
        printf("     status %2d: %s\n", i, strs[i] ? strs[i] : "(null)");
    {
        static const int unknown[] = {11, 12, 255, -1, 1000000, INT_MIN};
        for (i = 0; i < 6; i++) {
            const char *s = pn_status_string((pn_status)unknown[i]);
            tu_check(s && s[0] && (!strs[0] || strcmp(s, strs[0]) != 0),
                     "pn_status_string(%d) = \"%s\" (non-empty, not the PN_OK text)", unknown[i],
                     s ? s : "(null)");
        }
    }
    tu_check(pn_status_string(PN_OK) == pn_status_string(PN_OK), "pn_status_string returns static strings");

    snprintf(want, sizeof want, "%d.%d.%d", PYNORM_VERSION_MAJOR, PYNORM_VERSION_MINOR,
             PYNORM_VERSION_PATCH);
    tu_check(v && strncmp(v, want, strlen(want)) == 0, "pn_version() = \"%s\" starts with the header's %s",
             v ? v : "(null)", want);

    tu_check(isa && (strcmp(isa, "avx512") == 0 || strcmp(isa, "avx2") == 0 ||
                     strcmp(isa, "generic") == 0),
             "pn_isa() = \"%s\" is one of avx512/avx2/generic", isa ? isa : "(null)");
    if (env && strcmp(env, "generic") == 0)
        tu_check(isa && strcmp(isa, "generic") == 0, "PYNORM_ISA=generic forces pn_isa() = \"%s\"", isa);
    if (env && strcmp(env, "avx2") == 0)
        tu_check(isa && strcmp(isa, "avx512") != 0, "PYNORM_ISA=avx2 gives at most avx2: \"%s\"", isa);
    tu_check(pn_isa() == isa || (pn_isa() && strcmp(pn_isa(), isa) == 0), "pn_isa() is stable");

    pn_set_num_threads(2);
    tu_check(pn_get_num_threads() == 2, "pn_set_num_threads(2) -> %d", pn_get_num_threads());
    pn_set_num_threads(1);
    tu_check(pn_get_num_threads() == 1, "pn_set_num_threads(1) -> %d", pn_get_num_threads());
    pn_set_num_threads(0);
    tu_check(pn_get_num_threads() >= 0, "pn_set_num_threads(0) -> %d (default)", pn_get_num_threads());

    p = pn_buffer_alloc(1 << 20);
    tu_check(p != NULL && ((uintptr_t)p % 64) == 0, "pn_buffer_alloc(1 MiB) is 64-byte aligned");
    if (p) {
        memset(p, 1, 1 << 20);
        pn_buffer_free(p, 1 << 20);
    }
    p = pn_buffer_alloc(100);
    tu_check(p != NULL && ((uintptr_t)p % 64) == 0, "pn_buffer_alloc(100) is 64-byte aligned");
    if (p) {
        memset(p, 1, 100);
        pn_buffer_free(p, 100);
    }
    pn_buffer_trim();
    tu_check(1, "pn_buffer_trim() returns");

    {
        double g = -1;
        pn_status s = pn_copy_bandwidth(&g, 1 << 20, 2);
        tu_check(s == PN_OK && g > 0 && isfinite(g), "pn_copy_bandwidth(1 MiB, 2): status %s, %.1f GB/s",
                 status_name(s), g);
        s = pn_copy_bandwidth(NULL, 1 << 20, 2);
        tu_check(s == PN_ERR_NULL, "pn_copy_bandwidth(NULL, ...): %s", status_name(s));
        g = -1;
        s = pn_copy_bandwidth(&g, 0, 2);
        tu_check(s == PN_ERR_SIZE && g == -1, "pn_copy_bandwidth(bytes=0): %s, result untouched", status_name(s));
        s = pn_copy_bandwidth(&g, -5, 2);
        tu_check(s == PN_ERR_SIZE && g == -1, "pn_copy_bandwidth(bytes=-5): %s", status_name(s));
        s = pn_copy_bandwidth(&g, 1 << 20, 0);
        tu_check(s == PN_OK || (s == PN_ERR_ARG && g == -1),
                 "pn_copy_bandwidth(repeats=0): %s (accepted: PN_OK or PN_ERR_ARG)", status_name(s));
    }
}

int main(void)
{
    int op;
    printf("pynorm %s, isa %s\n", pn_version(), pn_isa());
    arena_bytes = (size_t)R_SCRATCH * REGION + SCRATCH_REGION;
    arena = (unsigned char *)tu_xmalloc(arena_bytes);
    arena_copy = (unsigned char *)tu_xmalloc(arena_bytes);

    test_misc();
    for (op = 0; op < OP_N; op++) {
        test_null(op);
        test_sizes(op);
        test_dtypes(op);
        test_eps(op);
        test_strides(op);
        test_alias(op);
        test_scratch(op);
        test_flags(op);
        test_combined(op);
    }
    /* scratch-size queries on bad sizes must not crash */
    (void)pn_layernorm_backward_scratch_size(-1, 3, 5, PN_FLOAT32);
    (void)pn_rmsnorm_backward_scratch_size(INT64_MAX, INT64_MAX, INT64_MAX, (pn_dtype)77);
    tu_check(1, "scratch-size queries with bad arguments return");

    free(arena);
    free(arena_copy);
    return tu_summary();
}
