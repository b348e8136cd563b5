/* fuzz_token.c - libFuzzer harness over pynorm's token-norm C API.
 *
 * Each input decodes into one call of pn_layernorm_forward,
 * pn_add_layernorm_forward, pn_layernorm_backward, pn_rmsnorm_forward,
 * pn_add_rmsnorm_forward or pn_rmsnorm_backward: sizes (small, larger ones
 * that take the threaded path, and hostile ones: 0, negative, 2^31, INT64_MAX,
 * ...), dtype and weight dtype (valid and invalid), eps (NaN, Inf, negative,
 * huge, 0, denormal), backward flags, scratch buffers (none, exact, short,
 * "SIZE_MAX bytes"), the thread setting, and for every buffer: NULL, its own
 * memory, or an alias of another buffer (in place, shifted by a few elements,
 * same or other strides), with row strides that may be dense, padded,
 * negative, zero (broadcast), overlapping, or large enough to overflow.
 *
 * All buffers live in one arena allocated for the call at its exact size (so
 * AddressSanitizer sees any access outside it), filled with a sentinel byte
 * and then with the input values. After the call the harness checks:
 *
 *   - a call the contract must refuse (a NULL required pointer, a bad size,
 *     dtype, eps or flags, a short scratch, an extent that overflows int64,
 *     outputs overlapping each other or an input other than exactly in place)
 *     returned an error status, the specific one when it had a single fault;
 *   - a refused call left every byte of the arena as it was;
 *   - an accepted call changed no byte outside its outputs' footprints, and
 *     its outputs match a double-precision reference (fused h bit for bit;
 *     y, statistics and gradients within an error bound of the compute type);
 *   - a call it accepted or refused conservatively is consistent with the
 *     documented rules (no refusal of a layout whose outputs are plainly
 *     disjoint).
 *
 * A failed check prints what went wrong and aborts, which libFuzzer reports
 * as a crash and saves the input. Build: tests/fuzz/build.sh (clang
 * -fsanitize=fuzzer,address,undefined). Without libFuzzer the same file
 * builds with -DPN_FUZZ_REPLAY into a program that runs the files named on its
 * command line (the corpus as a regression test).
 */
#include <float.h>
#include <stdarg.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pynorm.h"

/* The checks walk every byte and element of the arena: kept out of the
 * coverage instrumentation (which guides the fuzzer through decode() and the
 * library), or they would cost most of the run time. */
#if defined(__clang__) && __clang_major__ >= 13
#define NOCOV __attribute__((no_sanitize("coverage"), noinline))
#else
#define NOCOV
#endif

/* ------------------------------------------------------------------------ */
/* reading the input                                                         */

typedef struct {
    const uint8_t *p;
    size_t n, i;
} reader;

static uint8_t rd8(reader *r) { return r->i < r->n ? r->p[r->i++] : 0; }
static uint16_t rd16(reader *r) { uint16_t a = rd8(r); return (uint16_t)(a | (rd8(r) << 8)); }

/* values come from a small generator seeded by the input */
static uint64_t rng_state;
NOCOV static uint64_t rng_next(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* ------------------------------------------------------------------------ */
/* dtypes (independent of the library's conversions)                         */

static int dtype_valid(int dt) { return dt == PN_FLOAT32 || dt == PN_FLOAT16 || dt == PN_BFLOAT16 || dt == PN_FLOAT64; }
static int64_t dtype_size(int dt) { return dt == PN_FLOAT64 ? 8 : dt == PN_FLOAT32 ? 4 : 2; }
static const char *dtype_name(int dt)
{
    switch (dt) {
    case PN_FLOAT32: return "f32";
    case PN_FLOAT16: return "f16";
    case PN_BFLOAT16: return "bf16";
    case PN_FLOAT64: return "f64";
    }
    return "invalid";
}

static uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

NOCOV static double half_to_double(uint16_t h)
{
    int e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31) v = m ? NAN : INFINITY;
    else if (e == 0) v = ldexp((double)m, -24);
    else v = ldexp((double)(m | 1024), e - 25);
    return (h & 0x8000) ? -v : v;
}

/* float -> binary16, round to nearest even */
NOCOV static uint16_t float_to_half(float f)
{
    uint32_t x = fbits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);    /* >= 65520: Inf */
    if (ax < 0x38800000u) {                                      /* below 2^-14 */
        double q = (double)bitsf(ax) * 16777216.0;               /* in units of 2^-24, exact */
        return (uint16_t)(sign | (uint32_t)nearbyint(q));
    }
    uint32_t h = ((((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13)), rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

NOCOV static uint16_t float_to_bf16(float f)
{
    uint32_t u = fbits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    uint32_t rem = u & 0xffffu, h = u >> 16;
    if (rem > 0x8000u || (rem == 0x8000u && (h & 1u))) h++;
    return (uint16_t)h;
}

NOCOV static double load(const void *p, int dt)
{
    switch (dt) {
    case PN_FLOAT32: { float v; memcpy(&v, p, 4); return v; }
    case PN_FLOAT64: { double v; memcpy(&v, p, 8); return v; }
    case PN_FLOAT16: { uint16_t v; memcpy(&v, p, 2); return half_to_double(v); }
    default: { uint16_t v; memcpy(&v, p, 2); return (double)bitsf((uint32_t)v << 16); }
    }
}

/* v rounded to dt (once, from double; exact for values that came from dt) */
NOCOV static void store(void *p, double v, int dt)
{
    switch (dt) {
    case PN_FLOAT32: { float f = (float)v; memcpy(p, &f, 4); break; }
    case PN_FLOAT64: memcpy(p, &v, 8); break;
    case PN_FLOAT16: { uint16_t h = float_to_half((float)v); memcpy(p, &h, 2); break; }
    default: { uint16_t h = float_to_bf16((float)v); memcpy(p, &h, 2); break; }
    }
}

/* round a value to dt and back */
NOCOV static double round_to(double v, int dt)
{
    unsigned char b[8];
    store(b, v, dt);
    return load(b, dt);
}

/* one unit in the last place of dt at |v| */
NOCOV static double ulp_of(double v, int dt)
{
    int mant = dt == PN_FLOAT64 ? 52 : dt == PN_FLOAT32 ? 23 : dt == PN_FLOAT16 ? 10 : 7;
    int emin = dt == PN_FLOAT64 ? -1022 : dt == PN_FLOAT16 ? -14 : -126;
    int e;
    if (!isfinite(v) || v == 0) e = emin;
    else { frexp(v, &e); e -= 1; if (e < emin) e = emin; }
    return ldexp(1.0, e - mant);
}

/* Inputs this large can overflow the float compute type's intermediates
 * (x - x0, g * xhat, ...), where the double reference stays finite. The
 * generator stays far below; larger values only come from buffers that
 * alias each other with other dtypes (stats bytes read as bf16, ...): their
 * rows are checked for staying inside the outputs, not for values. */
static int too_big(double v, int dt) { return fabs(v) > (dt == PN_FLOAT64 ? 1e100 : 1e6); }

static double dtype_max(int dt)
{
    return dt == PN_FLOAT64 ? DBL_MAX : dt == PN_FLOAT16 ? 65504.0 : FLT_MAX;
}

/* ------------------------------------------------------------------------ */
/* the call                                                                  */

enum { OP_LN_FWD, OP_LN_ADD, OP_LN_BWD, OP_RMS_FWD, OP_RMS_ADD, OP_RMS_BWD, OP_N };
static const char *op_names[OP_N] = {"layernorm_forward", "add_layernorm_forward", "layernorm_backward",
                                     "rmsnorm_forward", "add_rmsnorm_forward", "rmsnorm_backward"};
static int is_bwd(int op) { return op == OP_LN_BWD || op == OP_RMS_BWD; }
static int is_fused(int op) { return op == OP_LN_ADD || op == OP_RMS_ADD; }
static int is_ln(int op) { return op < OP_RMS_FWD; }

/* buffers, inputs first (placement order: an alias points at an earlier one) */
enum { BI_INP, BI_RES, BI_W, BI_B, BI_DOUT, BI_MEAN_IN, BI_RSTD_IN,
       BI_OUT, BI_H, BI_MEAN, BI_RSTD, BI_DINP, BI_DW, BI_DB, BI_SCRATCH, NB };
static const char *buf_names[NB] = {"inp", "residual", "weight", "bias", "dout", "mean(in)", "rstd(in)",
                                    "out", "h", "mean", "rstd", "dinp", "dweight", "dbias", "scratch"};
enum { K_ROWS, K_PARAM, K_STAT, K_BYTES };

typedef struct {
    int used;          /* the op has this argument */
    int required;      /* NULL is an error */
    int output;
    int kind;
    int present;       /* non-NULL */
    int64_t es;        /* element size */
    pn_rows raw;       /* strides as passed (rows kind) */
    pn_rows s;         /* resolved */
    int64_t off;       /* base, as an offset into the arena (may lie outside) */
    int64_t lo, hi;    /* footprint's byte extent relative to base */
    int placed;        /* the footprint lies inside the arena */
    int extent_overflow;
} buf_t;

typedef struct {
    int op, dt, wdt, threads, flags;
    int64_t B, T, C;
    double eps;
    size_t scratch_bytes;
    int strides_null;
    buf_t b[NB];
} call_t;

static call_t cl;
static unsigned char *arena, *snap, *maymod;
static int64_t arena_size;

static void *bptr(int i) { return cl.b[i].present ? (void *)(arena + cl.b[i].off) : NULL; }

static pn_status do_call(void)
{
    pn_strides st;
    memset(&st, 0, sizeof st);
    st.inp = cl.b[BI_INP].raw;
    st.residual = cl.b[BI_RES].raw;
    st.dout = cl.b[BI_DOUT].raw;
    st.out = cl.b[BI_OUT].raw;
    st.h = cl.b[BI_H].raw;
    st.dinp = cl.b[BI_DINP].raw;
    const pn_strides *sp = cl.strides_null ? NULL : &st;
    void *mean = bptr(is_bwd(cl.op) ? BI_MEAN_IN : BI_MEAN), *rstd = bptr(is_bwd(cl.op) ? BI_RSTD_IN : BI_RSTD);
    switch (cl.op) {
    case OP_LN_FWD:
        return pn_layernorm_forward(bptr(BI_OUT), mean, rstd, bptr(BI_INP), bptr(BI_W), bptr(BI_B),
                                    cl.B, cl.T, cl.C, cl.eps, (pn_dtype)cl.dt, (pn_dtype)cl.wdt, sp);
    case OP_LN_ADD:
        return pn_add_layernorm_forward(bptr(BI_OUT), bptr(BI_H), mean, rstd, bptr(BI_INP), bptr(BI_RES),
                                        bptr(BI_W), bptr(BI_B), cl.B, cl.T, cl.C, cl.eps,
                                        (pn_dtype)cl.dt, (pn_dtype)cl.wdt, sp);
    case OP_LN_BWD:
        return pn_layernorm_backward(bptr(BI_DINP), bptr(BI_DW), bptr(BI_DB), bptr(BI_SCRATCH),
                                     cl.scratch_bytes, bptr(BI_DOUT), bptr(BI_INP), bptr(BI_W), mean,
                                     rstd, cl.B, cl.T, cl.C, cl.flags, (pn_dtype)cl.dt,
                                     (pn_dtype)cl.wdt, sp);
    case OP_RMS_FWD:
        return pn_rmsnorm_forward(bptr(BI_OUT), rstd, bptr(BI_INP), bptr(BI_W), cl.B, cl.T, cl.C,
                                  cl.eps, (pn_dtype)cl.dt, (pn_dtype)cl.wdt, sp);
    case OP_RMS_ADD:
        return pn_add_rmsnorm_forward(bptr(BI_OUT), bptr(BI_H), rstd, bptr(BI_INP), bptr(BI_RES),
                                      bptr(BI_W), cl.B, cl.T, cl.C, cl.eps, (pn_dtype)cl.dt,
                                      (pn_dtype)cl.wdt, sp);
    default:
        return pn_rmsnorm_backward(bptr(BI_DINP), bptr(BI_DW), bptr(BI_SCRATCH), cl.scratch_bytes,
                                   bptr(BI_DOUT), bptr(BI_INP), bptr(BI_W), rstd, cl.B, cl.T, cl.C,
                                   cl.flags, (pn_dtype)cl.dt, (pn_dtype)cl.wdt, sp);
    }
}

/* ------------------------------------------------------------------------ */
/* failure report                                                            */

static const char *status_name(pn_status s)
{
    static const char *names[] = {"PN_OK", "PN_ERR_NULL", "PN_ERR_SIZE", "PN_ERR_DTYPE", "PN_ERR_EPS",
                                  "PN_ERR_STRIDE", "PN_ERR_ALIAS", "PN_ERR_SCRATCH", "PN_ERR_ALLOC",
                                  "PN_ERR_GROUPS", "PN_ERR_ARG"};
    return (unsigned)s <= 10 ? names[s] : "unknown status";
}

static void describe(void)
{
    fprintf(stderr, "call: %s B=%lld T=%lld C=%lld dtype=%s(%d) wdtype=%s(%d) eps=%.17g flags=%d "
                    "threads=%d scratch_bytes=%zu strides=%s arena=%lld bytes\n",
            op_names[cl.op], (long long)cl.B, (long long)cl.T, (long long)cl.C, dtype_name(cl.dt), cl.dt,
            dtype_name(cl.wdt), cl.wdt, cl.eps, cl.flags, cl.threads, cl.scratch_bytes,
            cl.strides_null ? "NULL" : "struct", (long long)arena_size);
    for (int i = 0; i < NB; i++) {
        const buf_t *b = &cl.b[i];
        if (!b->used) continue;
        if (!b->present) { fprintf(stderr, "  %-9s NULL\n", buf_names[i]); continue; }
        fprintf(stderr, "  %-9s off=%lld strides raw={%lld,%lld} resolved={%lld,%lld} extent=[%lld,%lld)%s\n",
                buf_names[i], (long long)b->off, (long long)b->raw.b, (long long)b->raw.t, (long long)b->s.b,
                (long long)b->s.t, (long long)b->lo, (long long)b->hi,
                b->extent_overflow ? " (extent overflows)" : b->placed ? "" : " (outside the arena)");
    }
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "\n==== pynorm fuzz check failed: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    describe();
    abort();
}

/* ------------------------------------------------------------------------ */
/* sizes, strides, footprints                                                */

static int64_t sat_mul(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r)) return ((a < 0) != (b < 0)) ? INT64_MIN : INT64_MAX;
    return r;
}
static int64_t sat_add(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r)) return a < 0 ? INT64_MIN : INT64_MAX;
    return r;
}
static int64_t iabs(int64_t a) { return a < 0 ? (a == INT64_MIN ? INT64_MAX : -a) : a; }

static const int64_t special_sizes[] = {
    0, -1, 1, 2, 3, INT64_MIN, INT64_MAX, (int64_t)1 << 31, ((int64_t)1 << 31) - 1, (int64_t)1 << 32,
    (int64_t)1 << 40, (int64_t)1 << 62, INT64_MAX / 2, INT64_MAX / 64 + 1, 3037000500LL, (int64_t)1 << 57,
};

/* the documented size rule: positive, and B*T*C*itemsize fits int64 and size_t */
static int sizes_ok(void)
{
    int64_t rows, n, bytes;
    if (cl.B <= 0 || cl.T <= 0 || cl.C <= 0) return 0;
    if (__builtin_mul_overflow(cl.B, cl.T, &rows) || __builtin_mul_overflow(rows, cl.C, &n)) return 0;
    if (__builtin_mul_overflow(n, dtype_size(cl.dt), &bytes)) return 0;
    /* the library also refuses C > INT64_MAX/64 (its per-thread row buffers
     * of C doubles): sizes no memory can hold, counted as bad sizes here */
    if (cl.C > INT64_MAX / 64) return 0;
    return 1;
}

static int64_t neg(int64_t a) { return a == INT64_MIN ? INT64_MAX : -a; }

/* row strides (all arithmetic saturates: C may be a hostile size) */
static int64_t pick_stride(uint8_t code, int64_t C)
{
    switch (code % 16) {
    case 0: return C;
    case 1: return sat_add(C, 1);
    case 2: return sat_add(C, 3);
    case 3: return sat_mul(2, C);
    case 4: return 0;
    case 5: return neg(C);
    case 6: return neg(sat_add(C, 2));
    case 7: return sat_add(C, -1);
    case 8: return 1;
    case 9: return sat_add(C, 17);
    case 10: return INT64_MAX / 4;
    case 11: return INT64_MIN;
    case 12: return sat_mul(-2, C);
    case 13: return (int64_t)1 << 62;
    case 14: return -1;
    default: return C;
    }
}

static int64_t pick_batch_stride(uint8_t code, int64_t T, int64_t C, int64_t st)
{
    int64_t span = sat_mul(T, iabs(st) > C ? iabs(st) : C);
    switch (code % 16) {
    case 0: return span;
    case 1: return sat_add(span, 5);
    case 2: return neg(span);
    case 3: return 0;
    case 4: return st;
    case 5: return sat_mul(T, C);
    case 6: return sat_add(sat_mul(sat_add(T, -1), sat_add(C, 1)), C);
    case 7: return INT64_MAX / 3;
    case 8: return INT64_MIN;
    case 9: return (int64_t)1 << 62;
    case 10: return sat_add(neg(span), -3);
    case 11: return C;
    case 12: return sat_mul(span, 2);
    case 13: return 1;
    case 14: return INT64_MAX;
    default: return span;
    }
}

/* Byte extent [lo, hi) of a view relative to its base, computed the way the
 * documented rule says (B-1)*sb + (T-1)*st + C elements; 0 when some step
 * overflows int64 (then the library must say PN_ERR_SIZE). */
static int extent(int64_t nb, int64_t nt, pn_rows s, int64_t C, int64_t es, int64_t *lo, int64_t *hi)
{
    int64_t eb, et, slo, shi, blo, bhi;
    if (__builtin_mul_overflow(nb - 1, s.b, &eb) || __builtin_mul_overflow(nt - 1, s.t, &et)) return 0;
    if (__builtin_add_overflow(eb < 0 ? eb : 0, et < 0 ? et : 0, &slo)) return 0;
    if (__builtin_add_overflow(eb > 0 ? eb : 0, et > 0 ? et : 0, &shi)) return 0;
    if (__builtin_add_overflow(shi, C, &shi)) return 0;
    if (__builtin_mul_overflow(slo, es, &blo) || __builtin_mul_overflow(shi, es, &bhi)) return 0;
    *lo = blo;
    *hi = bhi;
    return 1;
}

static void view_dims(int i, int64_t *nb, int64_t *nt, int64_t *C)
{
    const buf_t *b = &cl.b[i];
    switch (b->kind) {
    case K_ROWS: *nb = cl.B; *nt = cl.T; *C = cl.C; break;
    case K_STAT: *nb = cl.B; *nt = cl.T; *C = 1; break;
    case K_PARAM: *nb = 1; *nt = 1; *C = cl.C; break;
    default: *nb = 1; *nt = 1; *C = (int64_t)cl.scratch_bytes; break;
    }
}

static int64_t stat_es(void) { return cl.dt == PN_FLOAT64 ? 8 : 4; }

/* ------------------------------------------------------------------------ */
/* decoding an input into a call and an arena                                 */

#define ARENA_MAX ((int64_t)16 << 20)
#define WORK_MAX ((int64_t)1 << 20)    /* elements one call may process */
#define GUARD 64

static int decode(const uint8_t *data, size_t size)
{
    reader r = {data, size, 0};
    memset(&cl, 0, sizeof cl);
    uint8_t opb = rd8(&r);
    cl.op = opb % OP_N;
    uint8_t d = rd8(&r);
    cl.dt = d < 244 ? d % 4 : (d == 244 ? 4 : d == 245 ? -1 : d == 246 ? 255 : d == 247 ? INT_MAX : 7);
    uint8_t w = rd8(&r);
    cl.wdt = w < 128 ? cl.dt : w < 200 ? PN_FLOAT32 : w < 250 ? w % 4 : (w == 250 ? 4 : w == 251 ? -3 : 99);
    static const int thr[8] = {0, 1, 2, 3, 4, 1, 2, 8};
    cl.threads = thr[rd8(&r) % 8];

    uint8_t sm = rd8(&r);
    if (sm < 220) {            /* small */
        static const int64_t cs[16] = {1, 2, 3, 5, 7, 15, 16, 17, 31, 63, 64, 65, 100, 127, 129, 257};
        uint8_t a = rd8(&r), bb = rd8(&r), c = rd8(&r);
        cl.B = 1 + a % 4;
        cl.T = 1 + bb % 5;
        cl.C = (c & 0x80) ? cs[c % 16] : 1 + c % 48;
    } else if (sm < 240) {     /* larger: rows * C above the threading threshold */
        uint8_t a = rd8(&r), bb = rd8(&r), c = rd8(&r);
        cl.B = 1 + a % 8;
        cl.T = 1 + bb % 40;
        cl.C = 64 + (int64_t)(rd16(&r) % 4096) + c % 3;
        if (cl.B * cl.T * cl.C > 40000) cl.C = 40000 / (cl.B * cl.T) + (c % 5);
        if (cl.C < 1) cl.C = 1;
    } else {                   /* hostile */
        uint8_t a = rd8(&r), bb = rd8(&r), c = rd8(&r);
        const size_t ns = sizeof special_sizes / sizeof special_sizes[0];
        cl.B = (a & 0x80) ? special_sizes[a % ns] : 1 + a % 3;
        cl.T = (bb & 0x80) ? special_sizes[bb % ns] : 1 + bb % 3;
        cl.C = (c & 0x80) ? special_sizes[c % ns] : 1 + c % 9;
    }

    static const double eps_table[16] = {1e-5, 0.0, 1e-12, 1.0, 1e-30, 4.9406564584124654e-324, 1e300,
                                         1e301, DBL_MAX, -0.0, -1e-5, NAN, -NAN, INFINITY, -INFINITY, 1e-6};
    uint8_t e = rd8(&r);
    cl.eps = e < 160 ? eps_table[e % 4 == 3 ? 15 : (e % 4 == 0 ? 0 : e % 4 == 1 ? 1 : 2)]
                     : eps_table[e % 16];
    uint8_t f = rd8(&r);
    cl.flags = f < 150 ? 0 : f < 240 ? PN_ACCUMULATE : (f == 240 ? 2 : f == 241 ? -1 : f == 242 ? INT_MIN : 3);
    uint8_t sc = rd8(&r);
    cl.strides_null = rd8(&r) < 128;

    /* which arguments the op has */
    const int op = cl.op, bwd = is_bwd(op);
    int used[NB] = {0}, req[NB] = {0};
    used[BI_INP] = req[BI_INP] = 1;
    used[BI_W] = 1;
    if (bwd) {
        used[BI_DOUT] = req[BI_DOUT] = 1;
        used[BI_RSTD_IN] = req[BI_RSTD_IN] = 1;
        if (is_ln(op)) used[BI_MEAN_IN] = req[BI_MEAN_IN] = 1;
        used[BI_DINP] = used[BI_DW] = used[BI_SCRATCH] = 1;
        if (is_ln(op)) used[BI_DB] = 1;
    } else {
        used[BI_OUT] = req[BI_OUT] = 1;
        used[BI_RSTD] = 1;
        if (is_ln(op)) { used[BI_MEAN] = 1; used[BI_B] = 1; }
        if (is_fused(op)) { used[BI_RES] = req[BI_RES] = 1; used[BI_H] = req[BI_H] = 1; }
    }
    const int dtok = dtype_valid(cl.dt);
    for (int i = 0; i < NB; i++) {
        buf_t *b = &cl.b[i];
        b->used = used[i];
        b->required = req[i];
        b->output = i >= BI_OUT;
        b->kind = (i == BI_INP || i == BI_RES || i == BI_DOUT || i == BI_OUT || i == BI_H || i == BI_DINP) ? K_ROWS
                : (i == BI_W || i == BI_B || i == BI_DW || i == BI_DB) ? K_PARAM
                : i == BI_SCRATCH ? K_BYTES : K_STAT;
        b->es = b->kind == K_ROWS ? (dtok ? dtype_size(cl.dt) : 2)
              : b->kind == K_PARAM ? (dtype_valid(cl.wdt) ? dtype_size(cl.wdt) : 2)
              : b->kind == K_STAT ? stat_es() : 1;
    }

    /* scratch size */
    size_t need = 0;
    if (bwd) need = is_ln(op) ? pn_layernorm_backward_scratch_size(cl.B, cl.T, cl.C, (pn_dtype)cl.dt)
                              : pn_rmsnorm_backward_scratch_size(cl.B, cl.T, cl.C, (pn_dtype)cl.dt);
    if (bwd && sizes_ok() && dtok && need == 0) fail("scratch_size() returned 0 for valid sizes");
    switch (sc % 8) {
    case 0: case 1: cl.scratch_bytes = 0; break;            /* NULL scratch */
    case 2: case 3: cl.scratch_bytes = need; break;
    case 4: cl.scratch_bytes = need + 1 + sc % 61; break;
    case 5: cl.scratch_bytes = need ? need - 1 - (sc >> 3) % (need < 64 ? need : 64) : 0; break;
    case 6: cl.scratch_bytes = sc < 128 ? 0 : 1; break;
    default: cl.scratch_bytes = sc < 128 ? SIZE_MAX : (size_t)1 << 63; break;
    }
    const int scratch_present = bwd && (sc % 8) >= 2;

    /* per buffer: NULL / own / alias; strides */
    int64_t cursor = GUARD;
    const int sizes_valid = sizes_ok();
    for (int i = 0; i < NB; i++) {
        buf_t *b = &cl.b[i];
        uint8_t mode = rd8(&r), s1 = rd8(&r), s2 = rd8(&r), tgt = rd8(&r), delta = rd8(&r);
        if (!b->used) continue;
        if (i == BI_SCRATCH) b->present = scratch_present;
        else if (b->required) b->present = mode >= 6;
        else b->present = mode >= 80;
        if (b->kind == K_ROWS && s1 >= 150) {
            b->raw.t = pick_stride(s1, cl.C);
            b->raw.b = pick_batch_stride(s2, cl.T, cl.C, b->raw.t);
        }
        if (!b->present) continue;
        if (!sizes_valid) { b->off = GUARD; continue; }   /* never dereferenced by a correct library */
        b->s = b->raw;
        if (b->kind == K_ROWS && b->s.b == 0 && b->s.t == 0) { b->s.b = cl.T * cl.C; b->s.t = cl.C; }
        if (b->kind == K_STAT) { b->s.b = cl.T; b->s.t = 1; }
        int64_t nb, nt, C;
        view_dims(i, &nb, &nt, &C);
        if (b->kind == K_BYTES) {        /* the bytes the caller claims: all of them may be used */
            b->lo = 0;
            b->hi = cl.scratch_bytes <= (size_t)INT64_MAX ? (int64_t)cl.scratch_bytes : (int64_t)need;
        } else if (!extent(nb, nt, b->s, C, b->es, &b->lo, &b->hi)) {
            b->extent_overflow = 1;
            b->off = GUARD;
            continue;
        }
        if (b->lo < -ARENA_MAX || b->hi > ARENA_MAX) { b->off = GUARD; continue; }
        /* alias an earlier buffer? */
        if (mode >= 200) {
            int j = tgt % NB;
            if (j < i && cl.b[j].used && cl.b[j].present && cl.b[j].placed) {
                buf_t *t = &cl.b[j];
                int64_t de = (int8_t)delta;
                if (delta & 1) de = 0;
                if (b->kind == K_ROWS && t->kind == K_ROWS && (tgt & 0x80)) {
                    b->raw = t->raw;   /* same strides: with de = 0 exactly in place */
                    b->s = t->s;
                    if (!extent(nb, nt, b->s, C, b->es, &b->lo, &b->hi)) { b->extent_overflow = 1; b->off = GUARD; continue; }
                    if (b->lo < -ARENA_MAX || b->hi > ARENA_MAX) { b->off = GUARD; continue; }
                }
                int64_t off = t->off + de * b->es;
                if (b->kind == K_BYTES) off = t->off + (int64_t)(delta % 7);
                if (off + b->lo >= 0) {
                    b->off = off;
                    b->placed = 1;
                    if (off + b->hi > cursor) cursor = off + b->hi;
                    continue;
                }
            }
        }
        /* own memory: element-aligned, with a small gap after the previous one */
        int64_t gap = (delta % 4) * 64 + (b->kind == K_BYTES ? delta % 13 : 0);
        int64_t base = cursor + gap - b->lo;
        base = (base + 7) & ~(int64_t)7;
        if (b->kind == K_BYTES) base += delta % 5;
        b->off = base;
        b->placed = 1;
        cursor = base + b->hi;
    }
    /* strides == NULL only means "all dense" when no row buffer has others */
    for (int i = 0; i < NB; i++)
        if (cl.b[i].raw.b != 0 || cl.b[i].raw.t != 0) cl.strides_null = 0;
    arena_size = cursor + GUARD;
    if (arena_size > 4 * ARENA_MAX) return 0;

    pn_set_num_threads(cl.threads);
    rng_state = 0x9E3779B97F4A7C15ULL;
    for (size_t k = 0; k < size; k++) rng_state = (rng_state ^ data[k]) * 0x100000001B3ULL;
    if (!rng_state) rng_state = 1;
    return 1;
}

/* ------------------------------------------------------------------------ */
/* values                                                                    */

static int value_mode;   /* 0 moderate, 1 rows around an offset, 2 with NaN/Inf/denormals */
NOCOV static double gen_value(int allow_special, double offset)
{
    uint64_t x = rng_next();
    int special = (int)(x % 64);
    if (allow_special && value_mode == 2 && special < 4) {
        static const double sp[4] = {NAN, INFINITY, -INFINITY, 1e-40};
        return sp[special];
    }
    if (value_mode == 2 && special < 8) return (x & 64) ? 0.0 : -0.0;
    double m = 1.0 + (double)((x >> 8) % 256) / 256.0;
    int ex = (int)((x >> 20) % 13) - 6;
    double v = ldexp(m, ex);
    if (x & (1u << 30)) v = -v;
    return offset + v;
}

NOCOV static void fill_inputs(void)
{
    memset(arena, 0xA5, (size_t)arena_size);
    const int acc = is_bwd(cl.op) && (cl.flags & PN_ACCUMULATE);
    for (int i = 0; i < NB; i++) {
        buf_t *b = &cl.b[i];
        if (!b->used || !b->present || !b->placed) continue;
        int as_input = !b->output || (acc && (i == BI_DINP || i == BI_DW || i == BI_DB));
        if (!as_input) continue;
        int dt = b->kind == K_ROWS ? cl.dt : b->kind == K_PARAM ? cl.wdt : (cl.dt == PN_FLOAT64 ? PN_FLOAT64 : PN_FLOAT32);
        if (!dtype_valid(dt)) continue;
        int64_t nb, nt, C;
        view_dims(i, &nb, &nt, &C);
        for (int64_t rr = 0; rr < nb * nt; rr++) {
            int64_t rowoff = ((rr / nt) * b->s.b + (rr % nt) * b->s.t) * b->es;
            double offset = (value_mode == 1 && (i == BI_INP || i == BI_RES || i == BI_MEAN_IN))
                          ? (double)((rng_next() % 2001)) - 1000.0 : 0.0;
            for (int64_t c = 0; c < C; c++) {
                double v;
                if (i == BI_RSTD_IN) v = fabs(gen_value(1, 0)) * 4;
                else if (b->kind == K_PARAM || b->output) v = gen_value(0, 0);
                else v = gen_value(1, offset);
                store(arena + b->off + rowoff + c * b->es, v, dt);
            }
        }
    }
}

/* ------------------------------------------------------------------------ */
/* expectations                                                              */

enum { R_NULL = 1, R_DTYPE = 2, R_SIZE = 4, R_EPS = 8, R_FLAGS = 16, R_SCRATCH = 32, R_EXTENT = 64, R_OVERLAP = 128 };

/* exact footprints: does any byte of view i coincide with one of view j? */
static unsigned char *fp_owner;   /* per arena byte: 1 + index of the last output view covering it */
NOCOV static int overlap_outputs_exact(void)
{
    /* outputs against each other and their own rows against each other */
    memset(fp_owner, 0, (size_t)arena_size);
    for (int i = BI_OUT; i < NB; i++) {
        buf_t *b = &cl.b[i];
        if (!b->used || !b->present) continue;
        if (i == BI_SCRATCH && !(cl.b[BI_DW].present || cl.b[BI_DB].present)) continue;  /* unused */
        int64_t nb, nt, C;
        view_dims(i, &nb, &nt, &C);
        int64_t len = b->kind == K_BYTES ? (int64_t)(cl.scratch_bytes < (size_t)(b->hi) ? cl.scratch_bytes : (size_t)b->hi)
                                          : C * b->es;
        if (b->kind == K_BYTES) { nb = nt = 1; }
        for (int64_t rr = 0; rr < nb * nt; rr++) {
            int64_t o = b->off + (b->kind == K_BYTES ? 0 : ((rr / nt) * b->s.b + (rr % nt) * b->s.t) * b->es);
            for (int64_t k = 0; k < len; k++) {
                if (fp_owner[o + k]) return 1;
                fp_owner[o + k] = (unsigned char)(1 + i);
            }
        }
    }
    return 0;
}

static int same_view(int o, int i)
{
    const buf_t *a = &cl.b[o], *b = &cl.b[i];
    return a->off == b->off && a->s.b == b->s.b && a->s.t == b->s.t && a->es == b->es;
}

/* in place is allowed for these exact (output, input) pairs */
static int inplace_ok(int o, int i)
{
    if (!is_bwd(cl.op)) return (o == BI_OUT || o == BI_H) && (i == BI_INP || i == BI_RES) && same_view(o, i);
    return o == BI_DINP && (i == BI_DOUT || i == BI_INP) && same_view(o, i);
}

NOCOV static int overlap_inputs_exact(void)
{
    /* fp_owner holds the outputs' footprints (from overlap_outputs_exact) */
    for (int i = 0; i < BI_OUT; i++) {
        buf_t *b = &cl.b[i];
        if (!b->used || !b->present) continue;
        int64_t nb, nt, C;
        view_dims(i, &nb, &nt, &C);
        for (int64_t rr = 0; rr < nb * nt; rr++) {
            int64_t o = b->off + ((rr / nt) * b->s.b + (rr % nt) * b->s.t) * b->es;
            for (int64_t k = 0; k < C * b->es; k++) {
                int own = fp_owner[o + k];
                if (own && !inplace_ok(own - 1, i)) return 1;
            }
        }
    }
    return 0;
}

/* The conservative rules a library may apply on top of the exact ones: an
 * output's byte range [lo, hi) meeting another output's or a non-in-place
 * input's (PN_ERR_ALIAS), or output strides outside the simple sufficient
 * condition for disjoint rows (PN_ERR_STRIDE). */
static int extents_meet(int i, int j)
{
    const buf_t *a = &cl.b[i], *b = &cl.b[j];
    return a->off + a->lo < b->off + b->hi && b->off + b->lo < a->off + a->hi;
}
static int conservative_alias(void)
{
    for (int o = BI_OUT; o < NB; o++) {
        if (!cl.b[o].used || !cl.b[o].present) continue;
        if (o == BI_SCRATCH && !(cl.b[BI_DW].present || cl.b[BI_DB].present)) continue;
        for (int j = 0; j < NB; j++) {
            if (j == o || !cl.b[j].used || !cl.b[j].present) continue;
            if (j == BI_SCRATCH && !(cl.b[BI_DW].present || cl.b[BI_DB].present)) continue;
            if (j < BI_OUT && inplace_ok(o, j)) continue;
            if (extents_meet(o, j)) return 1;
        }
    }
    return 0;
}
static int simple_disjoint(int i)
{
    const buf_t *b = &cl.b[i];
    int64_t sb = iabs(b->s.b), st = iabs(b->s.t);
    if (cl.B == 1 && cl.T == 1) return 1;
    if (cl.B == 1) return st >= cl.C;
    if (cl.T == 1) return sb >= cl.C;
    /* each row clears the next along the smaller stride, and the run of rows
     * along it ends before the next step of the larger one */
    if (st <= sb) return st >= cl.C && sb - (cl.T - 1) * st >= cl.C;
    return sb >= cl.C && st - (cl.B - 1) * sb >= cl.C;
}
static int conservative_stride(void)
{
    static const int outs[3] = {BI_OUT, BI_H, BI_DINP};
    for (int k = 0; k < 3; k++)
        if (cl.b[outs[k]].used && cl.b[outs[k]].present && !simple_disjoint(outs[k])) return 1;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* the reference and the comparison                                           */

NOCOV static double at(const unsigned char *base, int i, int64_t r, int64_t c, int dt)
{
    const buf_t *b = &cl.b[i];
    int64_t off = b->off;
    if (b->kind == K_ROWS) off += ((r / cl.T) * b->s.b + (r % cl.T) * b->s.t + c) * b->es;
    else if (b->kind == K_PARAM) off += c * b->es;
    else off += r * b->es;
    return load(base + off, dt);
}

static double *wbuf, *bbuf, *xrow, *xcen;
static int64_t wcap;

static void ensure(int64_t C)
{
    if (C <= wcap) return;
    free(wbuf); free(bbuf); free(xrow); free(xcen);
    wbuf = malloc(C * sizeof(double)); bbuf = malloc(C * sizeof(double)); xrow = malloc(C * sizeof(double));
    xcen = malloc(C * sizeof(double));
    wcap = C;
}

/* got vs ref within tolerance t; NaN must match NaN, Inf the same Inf */
NOCOV static void compare(const char *what, int64_t r, int64_t c, double got, double ref, double t, int dt)
{
    if (isnan(ref)) {
        if (!isnan(got)) fail("%s[%lld,%lld] = %.9g, expected NaN", what, (long long)r, (long long)c, got);
        return;
    }
    if (isinf(ref)) {
        if (got != ref) fail("%s[%lld,%lld] = %.9g, expected %g", what, (long long)r, (long long)c, got, ref);
        return;
    }
    if (fabs(ref) > 0.5 * dtype_max(dt)) return;   /* near the format's overflow: either side is fine */
    if (!(fabs(got - ref) <= t))
        fail("%s[%lld,%lld] = %.17g, reference %.17g, |diff| %.3g > tolerance %.3g", what, (long long)r,
             (long long)c, got, ref, fabs(got - ref), t);
}

NOCOV static void check_forward(void)
{
    const int op = cl.op, ln = is_ln(op), fused = is_fused(op);
    const int64_t rows = cl.B * cl.T, C = cl.C;
    const int dt = cl.dt, sdt = dt == PN_FLOAT64 ? PN_FLOAT64 : PN_FLOAT32;
    const double ce = dt == PN_FLOAT64 ? DBL_EPSILON : FLT_EPSILON;   /* compute type */
    const double K = 4.0 * (double)(C + 8);
    const double dmin = dt == PN_FLOAT64 ? 4.9406564584124654e-324 : 1.4012984643248171e-45;
    int params_finite = 1;
    ensure(C);
    for (int64_t c = 0; c < C; c++) {
        wbuf[c] = cl.b[BI_W].present ? at(snap, BI_W, 0, c, cl.wdt) : 1.0;
        bbuf[c] = (ln && cl.b[BI_B].present) ? at(snap, BI_B, 0, c, cl.wdt) : 0.0;
        /* weight/bias aliasing an input may hold its NaN/Inf: y then has no
         * well-defined NaN/Inf pattern to compare (Inf * 0 vs Inf * tiny) */
        if (!isfinite(wbuf[c]) || !isfinite(bbuf[c]) || too_big(wbuf[c], dt) || too_big(bbuf[c], dt))
            params_finite = 0;
    }
    for (int64_t r = 0; r < rows; r++) {
        int finite = 1, big = 0;
        for (int64_t c = 0; c < C; c++) {
            double x = at(snap, BI_INP, r, c, dt);
            if (fused) {
                double h = round_to(x + at(snap, BI_RES, r, c, dt), dt);
                double got = at(arena, BI_H, r, c, dt);
                if (!(got == h || (isnan(got) && isnan(h))) || (got == 0 && h == 0 && signbit(got) != signbit(h)))
                    fail("h[%lld,%lld] = %.17g, expected x + residual rounded = %.17g", (long long)r,
                         (long long)c, got, h);
                x = h;
            }
            xrow[c] = x;
            if (!isfinite(x)) finite = 0;
            else if (too_big(x, dt)) big = 1;
        }
        if (big) continue;
        double mean = 0, var = 0, rstd, R = 0;
        if (ln) {
            /* in long double, centred on the row's first element: the
             * reference must be finer than a double mean for float64 rows
             * far from 0 (mean 800, spread 1: a rounded mean is off by
             * 1e-13 of the spread's scale) */
            long double s = xrow[0], m = 0, v = 0;
            for (int64_t c = 0; c < C; c++) m += (long double)xrow[c] - s;
            m /= (long double)C;
            for (int64_t c = 0; c < C; c++) {
                long double d = ((long double)xrow[c] - s) - m;
                v += d * d;
                xcen[c] = (double)d;
                if (fabs((double)d) > R) R = fabs((double)d);
            }
            mean = (double)(s + m);
            var = (double)(v / (long double)C);
            rstd = 1.0 / sqrt(var + cl.eps);
        } else {
            double ms = 0;
            for (int64_t c = 0; c < C; c++) ms += xrow[c] * xrow[c];
            rstd = 1.0 / sqrt(ms / (double)C + cl.eps);
        }
        if (getenv("PN_FUZZ_VERBOSE")) {
            fprintf(stderr, "row %lld:", (long long)r);
            for (int64_t c = 0; c < C; c++) fprintf(stderr, " %.17g", xrow[c]);
            fprintf(stderr, "\n  w:");
            for (int64_t c = 0; c < C; c++) fprintf(stderr, " %.17g", wbuf[c]);
            fprintf(stderr, "\n  b:");
            for (int64_t c = 0; c < C; c++) fprintf(stderr, " %.17g", bbuf[c]);
            fprintf(stderr, "\n  mean %.17g rstd %.17g\n", mean, rstd);
        }
        /* float statistics cannot hold an rstd above FLT_MAX (eps ~ 0 and a
         * denormal-scale row): the row's values are then not comparable */
        if (sdt == PN_FLOAT32 && isfinite(rstd) && rstd > FLT_MAX / 2) continue;
        if (ln && finite && var == 0 && cl.eps == 0) {
            /* a constant row with eps = 0: 0 * Inf, NaN expected */
        }
        for (int64_t c = 0; c < C && params_finite; c++) {
            double y, t;
            if (ln) {
                double xh = xcen[c] * rstd;
                y = xh * wbuf[c] + bbuf[c];
                t = K * ce * (fabs(wbuf[c]) * R * rstd * (2 + R * rstd) + fabs(xh * wbuf[c]) + fabs(bbuf[c]));
            } else {
                y = xrow[c] * rstd * wbuf[c];
                t = K * ce * fabs(y);
            }
            if (ln && (isnan(rstd) || isinf(rstd))) t = INFINITY;
            /* intermediate results in the compute type's subnormal range lose
             * relative precision: allow an absolute error of some of its
             * smallest steps (float: ~1e-39 and less; a wrong element or row
             * is far larger) */
            t += 1024 * K * dmin * (1 + fabs(wbuf[c]));
            t += ulp_of(y, dt) + ulp_of(0, dt);
            compare("y", r, c, at(arena, BI_OUT, r, c, dt), y, t, dt);
        }
        if (cl.b[BI_RSTD].present) {
            double got = at(arena, BI_RSTD, r, 0, sdt);
            double t = K * ce * rstd * (1 + (ln ? R * rstd : 0)) + ulp_of(rstd, sdt);
            compare("rstd", r, 0, got, rstd, t, sdt);
        }
        if (ln && cl.b[BI_MEAN].present) {
            double got = at(arena, BI_MEAN, r, 0, sdt);
            if (!finite) {
                if (!(isnan(got) || got == mean)) fail("mean[%lld] = %g for a row with NaN/Inf, expected NaN or %g", (long long)r, got, mean);
            } else {
                double t = K * ce * (fabs(mean) + R) + ulp_of(mean, sdt);
                compare("mean", r, 0, got, mean, t, sdt);
            }
        }
    }
}

NOCOV static void check_backward(void)
{
    const int op = cl.op, ln = is_ln(op), acc = (cl.flags & PN_ACCUMULATE) != 0;
    const int64_t rows = cl.B * cl.T, C = cl.C;
    const int dt = cl.dt, wdt = cl.wdt, sdt = dt == PN_FLOAT64 ? PN_FLOAT64 : PN_FLOAT32;
    const double ce = dt == PN_FLOAT64 ? DBL_EPSILON : FLT_EPSILON;
    const double K = 4.0 * (double)(C + 8), Kr = 2.0 * (double)rows + 16;
    const double dmin = dt == PN_FLOAT64 ? 4.9406564584124654e-324 : 1.4012984643248171e-45;
    const int want_dw = cl.b[BI_DW].present, want_db = ln && cl.b[BI_DB].present;
    ensure(C);
    double *dw = calloc((size_t)C, sizeof(double)), *db = calloc((size_t)C, sizeof(double));
    double *dwa = calloc((size_t)C, sizeof(double)), *dba = calloc((size_t)C, sizeof(double));
    double *g = malloc(C * sizeof(double)), *A = malloc(C * sizeof(double)), *dy = malloc(C * sizeof(double));
    int all_finite = 1;
    for (int64_t c = 0; c < C; c++) {
        wbuf[c] = cl.b[BI_W].present ? at(snap, BI_W, 0, c, wdt) : 1.0;
        if (!isfinite(wbuf[c]) || too_big(wbuf[c], dt)) all_finite = 0;
    }
    for (int64_t r = 0; r < rows; r++) {
        const double mu = ln ? at(snap, BI_MEAN_IN, r, 0, sdt) : 0.0, rs = at(snap, BI_RSTD_IN, r, 0, sdt);
        int finite = isfinite(mu) && isfinite(rs) && !too_big(mu, dt) && !too_big(rs, dt);
        double mg = 0, mgx = 0, mabsg = 0, mgA = 0, mA = 0;
        for (int64_t c = 0; c < C; c++) {
            xrow[c] = at(snap, BI_INP, r, c, dt);
            dy[c] = at(snap, BI_DOUT, r, c, dt);
            if (!isfinite(xrow[c]) || !isfinite(dy[c]) || too_big(xrow[c], dt) || too_big(dy[c], dt)) finite = 0;
        }
        if (!finite || !all_finite) { all_finite = 0; continue; }
        for (int64_t c = 0; c < C; c++) {
            double xh = (xrow[c] - mu) * rs;
            g[c] = dy[c] * wbuf[c];
            A[c] = (fabs(xrow[c]) + fabs(mu)) * fabs(rs);
            mg += g[c];
            mgx += g[c] * xh;
            mabsg += fabs(g[c]);
            mgA += fabs(g[c]) * A[c];
            mA += A[c];
            dw[c] += dy[c] * xh;
            db[c] += dy[c];
            dwa[c] += fabs(dy[c]) * A[c];
            dba[c] += fabs(dy[c]);
        }
        mg /= (double)C; mgx /= (double)C; mabsg /= (double)C; mgA /= (double)C; mA /= (double)C;
        if (!ln) mg = 0;
        if (!cl.b[BI_DINP].present) continue;
        for (int64_t c = 0; c < C; c++) {
            double xh = (xrow[c] - mu) * rs;
            double dx = rs * (g[c] - mg - xh * mgx);
            double t = K * ce * fabs(rs) * (fabs(g[c]) + mabsg + A[c] * mgA + A[c] * fabs(mgx));
            if (acc) {
                double old = at(snap, BI_DINP, r, c, dt);
                dx += old;
                t += 2 * ce * (fabs(old) + fabs(dx));
            }
            /* a g = dy * w in the subnormal range is off by up to dmin, and
             * reaches dx through its mean and the x-hat-weighted mean too:
             * rs * (1 + A_c * mean A) times that */
            t += 1024 * K * dmin * (1 + fabs(wbuf[c])) * (1 + fabs(rs)) * (1 + A[c] * mA);
            t += ulp_of(dx, dt) + ulp_of(0, dt);
            compare("dinp", r, c, at(arena, BI_DINP, r, c, dt), dx, t, dt);
        }
    }
    if (all_finite) {
        for (int64_t c = 0; c < C; c++) {
            if (want_dw) {
                double ref = dw[c], t = Kr * ce * dwa[c];
                if (acc) { double old = at(snap, BI_DW, 0, c, wdt); ref += old; t += 2 * ce * (fabs(old) + fabs(ref)); }
                t += 1024 * Kr * dmin * (1 + dba[c]) + ulp_of(ref, wdt) + ulp_of(0, wdt);
                compare("dweight", 0, c, at(arena, BI_DW, 0, c, wdt), ref, t, wdt);
            }
            if (want_db) {
                double ref = db[c], t = Kr * ce * dba[c];
                if (acc) { double old = at(snap, BI_DB, 0, c, wdt); ref += old; t += 2 * ce * (fabs(old) + fabs(ref)); }
                t += 1024 * Kr * dmin * (1 + dba[c]) + ulp_of(ref, wdt) + ulp_of(0, wdt);
                compare("dbias", 0, c, at(arena, BI_DB, 0, c, wdt), ref, t, wdt);
            }
        }
    }
    free(dw); free(db); free(dwa); free(dba); free(g); free(A); free(dy);
}

/* ------------------------------------------------------------------------ */

/* An accepted call changed no byte outside its outputs' footprints. */
NOCOV static void check_untouched(void)
{
    /* bytes outside the outputs' footprints are unchanged */
    memset(maymod = malloc((size_t)arena_size), 0, (size_t)arena_size);
    for (int i = BI_OUT; i < NB; i++) {
        buf_t *b = &cl.b[i];
        if (!b->used || !b->present) continue;
        int64_t nb, nt, C;
        view_dims(i, &nb, &nt, &C);
        if (b->kind == K_BYTES) { memset(maymod + b->off, 1, (size_t)b->hi); continue; }
        for (int64_t rr = 0; rr < nb * nt; rr++)
            memset(maymod + b->off + ((rr / nt) * b->s.b + (rr % nt) * b->s.t) * b->es, 1, (size_t)(C * b->es));
    }
    for (int64_t k = 0; k < arena_size; k++)
        if (!maymod[k] && arena[k] != snap[k]) {
            const char *inside = "no buffer";
            for (int i = 0; i < NB; i++)
                if (cl.b[i].used && cl.b[i].present && k >= cl.b[i].off + cl.b[i].lo && k < cl.b[i].off + cl.b[i].hi)
                    inside = buf_names[i];
            fail("PN_OK but byte %lld (inside the extent of: %s) outside every output changed", (long long)k, inside);
        }
    free(maymod);
    maymod = NULL;
}

static int run_one(const uint8_t *data, size_t size)
{
    if (!decode(data, size)) return 0;
    value_mode = size > 1 ? data[size - 1] % 3 : 0;

    /* what the contract says about this call */
    unsigned must = 0;
    const int bwd = is_bwd(cl.op);
    for (int i = 0; i < NB; i++)
        if (cl.b[i].used && cl.b[i].required && !cl.b[i].present) must |= R_NULL;
    if (!dtype_valid(cl.dt) || !dtype_valid(cl.wdt) || (cl.wdt != cl.dt && cl.wdt != PN_FLOAT32)) must |= R_DTYPE;
    if (!sizes_ok()) must |= R_SIZE;
    if (!bwd && !(cl.eps >= 0 && isfinite(cl.eps))) must |= R_EPS;
    if (bwd && (cl.flags & ~PN_ACCUMULATE)) must |= R_FLAGS;
    if (bwd && cl.b[BI_SCRATCH].present && !(must & (R_SIZE | R_DTYPE))) {
        size_t need = is_ln(cl.op) ? pn_layernorm_backward_scratch_size(cl.B, cl.T, cl.C, (pn_dtype)cl.dt)
                                   : pn_rmsnorm_backward_scratch_size(cl.B, cl.T, cl.C, (pn_dtype)cl.dt);
        if (cl.scratch_bytes < need) must |= R_SCRATCH;
    }
    const int may_eps = !bwd && isfinite(cl.eps) && cl.eps > 1e300;   /* the library's own limit */
    /* a scratch claimed larger than INT64_MAX bytes: used in part or refused */
    const int may_size = bwd && cl.b[BI_SCRATCH].present && cl.scratch_bytes > (size_t)INT64_MAX;
    int fits = 1;
    if (!(must & (R_SIZE | R_DTYPE))) {
        for (int i = 0; i < NB; i++) {
            buf_t *b = &cl.b[i];
            if (!b->used || !b->present) continue;
            if (b->extent_overflow) must |= R_EXTENT;
            else if (!b->placed || b->off + b->lo < 0 || b->off + b->hi > arena_size) fits = 0;
        }
    } else {
        fits = 0;
    }
    if (!must && !fits) return 0;   /* a valid call on memory we cannot provide */
    /* Rows with stride 0 (broadcast) can give 2^40 rows over a few bytes:
     * such calls are valid but would run for hours. */
    const int64_t work = sizes_ok() ? cl.B * cl.T * cl.C : 0;
    if (!must && work > WORK_MAX) return 0;
    const int fill = work <= WORK_MAX;

    arena = malloc((size_t)arena_size);
    snap = malloc((size_t)arena_size);
    fp_owner = malloc((size_t)arena_size);
    if (fill) fill_inputs();
    else memset(arena, 0xA5, (size_t)arena_size);
    int exact_overlap = 0;
    if (!must && fits) {
        exact_overlap = overlap_outputs_exact() || overlap_inputs_exact();
        if (exact_overlap) must |= R_OVERLAP;
    }
    memcpy(snap, arena, (size_t)arena_size);

    pn_status st = do_call();
    if (getenv("PN_FUZZ_VERBOSE")) {
        fprintf(stderr, "status %s\n", status_name(st));
        describe();
    }

    if (st != PN_OK) {
        if (memcmp(arena, snap, (size_t)arena_size) != 0) {
            int64_t k = 0;
            while (arena[k] == snap[k]) k++;
            fail("status %s but the arena changed (first byte at offset %lld)", status_name(st), (long long)k);
        }
        if (!must) {
            int ok = (may_eps && st == PN_ERR_EPS) || (may_size && (st == PN_ERR_SIZE || st == PN_ERR_ALIAS)) || (st == PN_ERR_ALIAS && conservative_alias()) ||
                     (st == PN_ERR_STRIDE && conservative_stride());
            if (!ok) fail("valid call refused with %s", status_name(st));
        } else {
            static const struct { unsigned reason; pn_status code; } single[] = {
                {R_NULL, PN_ERR_NULL}, {R_DTYPE, PN_ERR_DTYPE}, {R_SIZE, PN_ERR_SIZE}, {R_EPS, PN_ERR_EPS},
                {R_FLAGS, PN_ERR_ARG}, {R_SCRATCH, PN_ERR_SCRATCH}};
            for (size_t k = 0; k < sizeof single / sizeof single[0]; k++)
                if (must == single[k].reason && st != single[k].code)
                    fail("one fault (reason %u) should give %s, got %s", must, status_name(single[k].code),
                         status_name(st));
            /* the views are checked one after the other: an overflowing extent
             * may be found after another view's overlap */
            if (must == R_EXTENT && st != PN_ERR_SIZE && st != PN_ERR_ALIAS && st != PN_ERR_STRIDE)
                fail("an extent overflowing int64 should give PN_ERR_SIZE (or a view error), got %s",
                     status_name(st));
            if (must == R_OVERLAP && st != PN_ERR_ALIAS && st != PN_ERR_STRIDE && !(may_size && st == PN_ERR_SIZE))
                fail("overlapping outputs/inputs should give PN_ERR_ALIAS or PN_ERR_STRIDE, got %s", status_name(st));
        }
    } else {
        if (must) fail("call that must fail (reasons %#x) returned PN_OK", must);
        check_untouched();
        if (bwd) check_backward();
        else check_forward();
    }
    free(arena);
    free(snap);
    free(fp_owner);
    arena = snap = fp_owner = NULL;
    return 0;
}

#ifndef PN_FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return run_one(data, size); }
#else
/* replay: run every file named on the command line */
int main(int argc, char **argv)
{
    int n = 0;
    for (int a = 1; a < argc; a++) {
        FILE *f = fopen(argv[a], "rb");
        if (!f) { fprintf(stderr, "cannot open %s\n", argv[a]); return 2; }
        static uint8_t buf[1 << 16];
        size_t len = fread(buf, 1, sizeof buf, f);
        fclose(f);
        uint8_t *copy = malloc(len ? len : 1);
        memcpy(copy, buf, len);
        run_one(copy, len);
        free(copy);
        n++;
    }
    printf("replayed %d inputs: no check failed\n", n);
    return 0;
}
#endif
