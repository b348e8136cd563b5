/* test_reliability_sizes.c - the size and extent rules of docs/errors.md that
 * test_errors.c leaves out, each checked on every token-norm function:
 *
 *   - B*T*C*itemsize overflowing int64 for every dtype (B*T, B*T*C and the
 *     byte count each overflowing on its own) -> PN_ERR_SIZE;
 *   - strides whose extent overflows int64, on every row buffer (inp,
 *     residual, dout, out, h, dinp): (B-1)*sb, (T-1)*st, their sum (both
 *     signs), + C, and * itemsize each overflowing on its own -> PN_ERR_SIZE;
 *   - a stride of INT64_MIN on a buffer whose rows never step along it, and a
 *     scratch buffer claimed larger than INT64_MAX bytes: no undefined
 *     behaviour (the ASan+UBSan build aborts on it), a defined status;
 *   - PN_ERR_ALLOC: a call whose working memory cannot be allocated (C = 2^40)
 *     returns PN_ERR_ALLOC and writes nothing. Its pointers are never
 *     dereferenced; skipped where the kernel overcommits every allocation.
 *
 * Every refused call must leave its buffers untouched (they are real, small
 * buffers with sentinel bytes: the library must refuse before touching them).
 */
#define _GNU_SOURCE   /* getenv, fopen of /proc */
#include <limits.h>

#include "testutil.h"

/* The ALLOC test asks malloc for terabytes: under AddressSanitizer that is a
 * NULL return, not an abort. (Only read when the ASan runtime is linked.) */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1"; }

enum { OP_LN_FWD = 0, OP_LN_ADD, OP_LN_BWD, OP_RMS_FWD, OP_RMS_ADD, OP_RMS_BWD, OP_N };
static const char *op_names[OP_N] = {"layernorm_forward", "add_layernorm_forward", "layernorm_backward",
                                     "rmsnorm_forward", "add_rmsnorm_forward", "rmsnorm_backward"};
static int is_bwd(int op) { return op == OP_LN_BWD || op == OP_RMS_BWD; }
static int is_fused(int op) { return op == OP_LN_ADD || op == OP_RMS_ADD; }
static int is_ln(int op) { return op < OP_RMS_FWD; }

static const char *status_name(pn_status s)
{
    static const char *names[] = {"PN_OK", "PN_ERR_NULL", "PN_ERR_SIZE", "PN_ERR_DTYPE", "PN_ERR_EPS",
                                  "PN_ERR_STRIDE", "PN_ERR_ALIAS", "PN_ERR_SCRATCH", "PN_ERR_ALLOC",
                                  "PN_ERR_GROUPS", "PN_ERR_ARG"};
    return (unsigned)s <= 10 ? names[s] : "unknown";
}

/* every buffer of a call, in one arena of small regions */
enum { R_INP, R_RES, R_W, R_B, R_OUT, R_H, R_MEAN, R_RSTD, R_DOUT, R_DINP, R_DW, R_DB, R_SCRATCH, R_N };
#define REGION 4096
static unsigned char arena[R_N * REGION], arena_copy[R_N * REGION];
static void *reg(int r) { return arena + (size_t)r * REGION; }

typedef struct {
    int op;
    int64_t B, T, C;
    pn_dtype dt, wdt;   /* data and weight/bias dtypes */
    pn_strides s;
    void *p[R_N];
    size_t scratch_bytes;
} call_t;

static call_t base(int op, pn_dtype dt)
{
    call_t c;
    int i;
    memset(&c, 0, sizeof c);
    c.op = op;
    c.B = 2; c.T = 2; c.C = 4;
    c.dt = c.wdt = dt;
    for (i = 0; i < R_N; i++) c.p[i] = reg(i);
    c.scratch_bytes = REGION;
    return c;
}

static pn_status run(const call_t *c)
{
    const pn_strides *s = &c->s;
    void *const *p = c->p;
    switch (c->op) {
    case OP_LN_FWD:
        return pn_layernorm_forward(p[R_OUT], p[R_MEAN], p[R_RSTD], p[R_INP], p[R_W], p[R_B], c->B, c->T, c->C,
                                    1e-5, c->dt, c->wdt, s);
    case OP_LN_ADD:
        return pn_add_layernorm_forward(p[R_OUT], p[R_H], p[R_MEAN], p[R_RSTD], p[R_INP], p[R_RES], p[R_W], p[R_B],
                                        c->B, c->T, c->C, 1e-5, c->dt, c->wdt, s);
    case OP_LN_BWD:
        return pn_layernorm_backward(p[R_DINP], p[R_DW], p[R_DB], p[R_SCRATCH], c->scratch_bytes, p[R_DOUT],
                                     p[R_INP], p[R_W], p[R_MEAN], p[R_RSTD], c->B, c->T, c->C, 0, c->dt, c->wdt, s);
    case OP_RMS_FWD:
        return pn_rmsnorm_forward(p[R_OUT], p[R_RSTD], p[R_INP], p[R_W], c->B, c->T, c->C, 1e-5, c->dt, c->wdt, s);
    case OP_RMS_ADD:
        return pn_add_rmsnorm_forward(p[R_OUT], p[R_H], p[R_RSTD], p[R_INP], p[R_RES], p[R_W], c->B, c->T, c->C,
                                      1e-5, c->dt, c->wdt, s);
    default:
        return pn_rmsnorm_backward(p[R_DINP], p[R_DW], p[R_SCRATCH], c->scratch_bytes, p[R_DOUT], p[R_INP],
                                   p[R_W], p[R_RSTD], c->B, c->T, c->C, 0, c->dt, c->wdt, s);
    }
}

/* Runs the call on a sentinel-filled arena; returns the status and whether
 * the arena kept every byte. */
static pn_status run_checked(const call_t *c, int *untouched)
{
    pn_status st;
    memset(arena, TU_SENTINEL, sizeof arena);
    memcpy(arena_copy, arena, sizeof arena);
    st = run(c);
    *untouched = memcmp(arena, arena_copy, sizeof arena) == 0;
    return st;
}

static void expect(const char *what, const call_t *c, pn_status want)
{
    int untouched;
    pn_status st = run_checked(c, &untouched);
    tu_check(st == want && untouched, "%s %s: %s -> %s (want %s), nothing written=%d", op_names[c->op],
             tu_dtype_name(c->dt), what, status_name(st), status_name(want), untouched);
}

/* ---- byte counts overflowing int64 ------------------------------------- */

static void test_byte_overflow(int op)
{
    static const pn_dtype dts[4] = {PN_FLOAT32, PN_FLOAT16, PN_BFLOAT16, PN_FLOAT64};
    int d;
    for (d = 0; d < 4; d++) {
        pn_dtype dt = dts[d];
        int64_t es = (int64_t)tu_dtype_size(dt);
        call_t c = base(op, dt);
        char what[160];
        /* B*T overflows */
        c.B = (int64_t)1 << 32; c.T = (int64_t)1 << 32; c.C = 1;
        expect("B*T = 2^64", &c, PN_ERR_SIZE);
        /* B*T fits, *C overflows */
        c = base(op, dt);
        c.B = (int64_t)1 << 31; c.T = 2; c.C = (int64_t)1 << 31;
        expect("B*T*C = 2^63", &c, PN_ERR_SIZE);
        /* B*T*C fits, the byte count does not (per dtype: INT64_MAX/es + 1 elements) */
        c = base(op, dt);
        c.B = 1; c.T = 1; c.C = INT64_MAX / es + 1;
        snprintf(what, sizeof what, "C = INT64_MAX/%lld + 1 (bytes overflow)", (long long)es);
        expect(what, &c, PN_ERR_SIZE);
        c = base(op, dt);
        c.B = INT64_MAX / es / 3 + 1; c.T = 3; c.C = 1;
        snprintf(what, sizeof what, "B = INT64_MAX/%lld/3 + 1, T = 3 (bytes overflow)", (long long)es);
        expect(what, &c, PN_ERR_SIZE);
        c = base(op, dt);
        c.B = 3; c.T = 5; c.C = INT64_MAX / es / 15 + 1;
        expect("B=3 T=5, C just past INT64_MAX / (15 * itemsize)", &c, PN_ERR_SIZE);
    }
}

/* ---- extents overflowing int64 ------------------------------------------ */

typedef struct {
    const char *what;
    int64_t B, T, C, sb, st;
} ext_case;

static void set_rows(call_t *c, int which, pn_rows r)
{
    switch (which) {
    case R_INP: c->s.inp = r; break;
    case R_RES: c->s.residual = r; break;
    case R_DOUT: c->s.dout = r; break;
    case R_OUT: c->s.out = r; break;
    case R_H: c->s.h = r; break;
    default: c->s.dinp = r; break;
    }
}

static void test_extents(int op)
{
    const int64_t P62 = (int64_t)1 << 62, P61 = (int64_t)1 << 61;
    const ext_case cases[] = {
        {"(B-1)*sb overflows: B=3 sb=2^62", 3, 1, 4, P62, 4},
        {"(T-1)*st overflows: T=3 st=2^62", 1, 3, 4, 4, P62},
        {"(B-1)*sb + (T-1)*st overflows: B=T=2, sb=st=2^62", 2, 2, 4, P62, P62},
        {"the negative span overflows: B=T=2, sb=st=-2^62", 2, 2, 4, -P62, -P62},
        {"span + C overflows: B=2 sb=INT64_MAX-1 C=4", 2, 1, 4, INT64_MAX - 1, 4},
        {"span * itemsize overflows: B=2 sb=2^61 (4- and 8-byte dtypes), 2^62-ish for 2-byte", 2, 1, 4, P61 + P61 / 2, 4},
        {"negative span * itemsize overflows: B=2 sb=-(2^61+2^60)", 2, 1, 4, -(P61 + P61 / 2), 4},
    };
    static const int rows_bufs[6] = {R_INP, R_RES, R_DOUT, R_OUT, R_H, R_DINP};
    static const char *rows_names[6] = {"inp", "residual", "dout", "out", "h", "dinp"};
    static const pn_dtype dts[2] = {PN_FLOAT32, PN_BFLOAT16};
    size_t k;
    int b, d;
    for (d = 0; d < 2; d++)
        for (b = 0; b < 6; b++) {
            int which = rows_bufs[b];
            if ((which == R_RES || which == R_H) && !is_fused(op)) continue;
            if ((which == R_DOUT || which == R_DINP) && !is_bwd(op)) continue;
            if ((which == R_OUT) && is_bwd(op)) continue;
            for (k = 0; k < sizeof cases / sizeof cases[0]; k++) {
                call_t c = base(op, dts[d]);
                pn_rows r;
                char what[200];
                /* bf16: 2 bytes; make the itemsize case overflow there too */
                int64_t sb = cases[k].sb;
                if (k >= 5 && tu_dtype_size(dts[d]) == 2) sb = sb > 0 ? P62 + P61 : -(P62 + P61);
                c.B = cases[k].B; c.T = cases[k].T; c.C = cases[k].C;
                r.b = sb; r.t = cases[k].st;
                set_rows(&c, which, r);
                snprintf(what, sizeof what, "%s strides {%lld, %lld}: %s", rows_names[b], (long long)r.b,
                         (long long)r.t, cases[k].what);
                expect(what, &c, PN_ERR_SIZE);
            }
        }
}

/* ---- INT64_MIN strides along an axis of one row, huge scratch claims ----- */

static void test_int64_min(int op)
{
    call_t c = base(op, PN_FLOAT32);
    pn_rows r;
    int untouched;
    pn_status st;
    /* B = 1: the batch stride is never stepped; INT64_MIN there is legal */
    c.B = 1; c.T = 3; c.C = 4;
    r.b = INT64_MIN; r.t = 4;
    set_rows(&c, is_bwd(op) ? R_DINP : R_OUT, r);
    st = run_checked(&c, &untouched);
    tu_check(st == PN_OK || (st == PN_ERR_SIZE && untouched) || (st == PN_ERR_STRIDE && untouched),
             "%s output strides {INT64_MIN, C} with B=1: %s (no UB; OK, or refused writing nothing)",
             op_names[op], status_name(st));
    c = base(op, PN_FLOAT32);
    c.B = 3; c.T = 1; c.C = 4;
    r.b = 4; r.t = INT64_MIN;
    set_rows(&c, is_bwd(op) ? R_DINP : R_OUT, r);
    st = run_checked(&c, &untouched);
    tu_check(st == PN_OK || ((st == PN_ERR_SIZE || st == PN_ERR_STRIDE) && untouched),
             "%s output strides {C, INT64_MIN} with T=1: %s", op_names[op], status_name(st));
    c = base(op, PN_FLOAT32);
    c.B = 2; c.T = 1; c.C = 4;
    r.b = INT64_MIN; r.t = 4;
    set_rows(&c, is_bwd(op) ? R_DINP : R_OUT, r);
    expect("output batch stride INT64_MIN with B=2", &c, PN_ERR_SIZE);
    c = base(op, PN_FLOAT32);
    c.B = 2; c.T = 1; c.C = 4;
    set_rows(&c, R_INP, r);
    expect("input batch stride INT64_MIN with B=2", &c, PN_ERR_SIZE);

    if (is_bwd(op)) {
        static const size_t claims[3] = {(size_t)INT64_MAX + 1, SIZE_MAX, SIZE_MAX - 63};
        int i;
        for (i = 0; i < 3; i++) {
            c = base(op, PN_FLOAT32);
            c.scratch_bytes = claims[i];
            st = run_checked(&c, &untouched);
            tu_check(st == PN_OK || (st == PN_ERR_SIZE && untouched),
                     "%s scratch_bytes = %zu (more than exists): %s (no UB; OK, or PN_ERR_SIZE writing nothing)",
                     op_names[op], claims[i], status_name(st));
        }
    }
}

/* ---- PN_ERR_ALLOC ----------------------------------------------------------- */

static int overcommit_always(void)
{
    FILE *f = fopen("/proc/sys/vm/overcommit_memory", "r");
    int mode = 0;
    if (!f) return 0;
    if (fscanf(f, "%d", &mode) != 1) mode = 0;
    fclose(f);
    return mode == 1;
}

static void test_alloc(void)
{
    /* C = 2^40: terabyte rows, the kernels' working memory and the backward
     * scratch are terabytes. The row pointers are far apart addresses that are
     * never touched: the call must fail at its allocation, before reading or
     * writing any row. A forward of float32 rows with float32 (or no) parameters
     * takes no working memory at all, so the forwards run on float64 rows with a
     * float32 weight, which they convert to float64 first (8 TiB); the backwards
     * on float32 rows (ones for the absent weight, partial sums). */
    const int64_t C = (int64_t)1 << 40;
    unsigned char *lo = (unsigned char *)((uintptr_t)1 << 44);
    int op;
    if (overcommit_always()) {
        printf("skip PN_ERR_ALLOC: vm.overcommit_memory = 1, a terabyte malloc would succeed\n");
        return;
    }
    if (getenv("PN_SKIP_ALLOC_TEST")) {
        printf("skip PN_ERR_ALLOC: PN_SKIP_ALLOC_TEST is set\n");
        return;
    }
    for (op = 0; op < OP_N; op++) {
        call_t c;
        int i, untouched;
        pn_status st;
        memset(&c, 0, sizeof c);
        c.op = op;
        c.B = 1; c.T = 1; c.C = C;
        c.dt = is_bwd(op) ? PN_FLOAT32 : PN_FLOAT64;
        c.wdt = PN_FLOAT32;
        /* rows 8 TiB apart (as far apart as the largest needs); statistics optional */
        c.p[R_INP] = lo;
        c.p[R_RES] = lo + ((uint64_t)1 << 43);
        c.p[R_OUT] = lo + ((uint64_t)2 << 43);
        c.p[R_H] = lo + ((uint64_t)3 << 43);
        c.p[R_DOUT] = lo + ((uint64_t)1 << 43);
        c.p[R_DINP] = lo + ((uint64_t)2 << 43);
        c.p[R_W] = is_bwd(op) ? NULL : lo + ((uint64_t)5 << 43);   /* 4 TiB of float32, past h */
        if (is_bwd(op)) {
            /* the saved statistics are required: one float each, real memory */
            c.p[R_RSTD] = reg(R_RSTD);
            if (is_ln(op)) c.p[R_MEAN] = reg(R_MEAN);
            c.p[R_DW] = NULL;        /* first round: dx only */
        }
        for (i = 0; i < 2; i++) {
            memset(arena, TU_SENTINEL, sizeof arena);
            memcpy(arena_copy, arena, sizeof arena);
            st = run(&c);
            untouched = memcmp(arena, arena_copy, sizeof arena) == 0;
            tu_check(st == PN_ERR_ALLOC && untouched,
                     "%s C=2^40 %s (terabytes of working memory): %s (want PN_ERR_ALLOC), nothing written=%d",
                     op_names[op], tu_dtype_name(c.dt), status_name(st), untouched);
            if (!is_bwd(op)) break;
            /* backward, second round: dweight too, through a library-allocated scratch */
            c.p[R_DINP] = NULL;
            c.p[R_DW] = lo + ((uint64_t)2 << 43);
        }
    }
}

int main(void)
{
    int op;
    printf("pynorm %s, isa %s\n", pn_version(), pn_isa());
    for (op = 0; op < OP_N; op++) {
        test_byte_overflow(op);
        test_extents(op);
        test_int64_min(op);
    }
    test_alloc();
    return tu_summary();
}
