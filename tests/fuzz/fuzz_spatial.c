/* fuzz_spatial.c - libFuzzer harness over pynorm's spatial norms:
 * pn_groupnorm_forward/backward and pn_batchnorm_forward/backward.
 *
 * Each input decodes into one call: sizes N, C, S and groups G (valid,
 * non-dividing, zero, negative, overflowing), layout (NCHW, NHWC, invalid),
 * dtype / weight dtype / running-statistics dtype, eps, momentum and
 * num_batches_tracked (BatchNorm), flags (training, cumulative, accumulate,
 * invalid bits), scratch (none, exact, short, "SIZE_MAX bytes"), the thread
 * setting, and for every buffer NULL, its own memory or an alias of an
 * earlier buffer (exactly, or a few elements off).
 *
 * The checks are those of fuzz_token.c: a call the contract must refuse
 * returns an error (the specific one for a single fault) and leaves every
 * byte of the arena as it was; an accepted call changes no byte outside its
 * outputs and its outputs match a double-precision reference (GroupNorm and
 * BatchNorm forward in training and eval, with the running statistics'
 * update, and both backwards) within an error bound of the compute type.
 *
 * Build: tests/fuzz/build.sh. -DPN_FUZZ_REPLAY builds a corpus replayer.
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pynorm.h"

#if defined(__clang__) && __clang_major__ >= 13
#define NOCOV __attribute__((no_sanitize("coverage"), noinline))
#else
#define NOCOV
#endif

/* ---- input and values ------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    size_t n, i;
} reader;
static uint8_t rd8(reader *r) { return r->i < r->n ? r->p[r->i++] : 0; }

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

/* ---- dtypes ------------------------------------------------------------------ */

static int dtype_valid(int dt) { return dt >= 0 && dt <= 3; }
static int64_t dtype_size(int dt) { return dt == PN_FLOAT64 ? 8 : dt == PN_FLOAT32 ? 4 : 2; }
static uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

NOCOV static uint16_t float_to_half(float f)
{
    uint32_t x = fbits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) return (uint16_t)(sign | (uint32_t)nearbyint((double)bitsf(ax) * 16777216.0));
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
    uint16_t h;
    switch (dt) {
    case PN_FLOAT32: { float v; memcpy(&v, p, 4); return v; }
    case PN_FLOAT64: { double v; memcpy(&v, p, 8); return v; }
    case PN_FLOAT16: {
        memcpy(&h, p, 2);
        int e = (h >> 10) & 31, m = h & 1023;
        double v = e == 31 ? (m ? NAN : INFINITY) : e == 0 ? ldexp(m, -24) : ldexp(m | 1024, e - 25);
        return (h & 0x8000) ? -v : v;
    }
    default: memcpy(&h, p, 2); return (double)bitsf((uint32_t)h << 16);
    }
}
NOCOV static void store(void *p, double v, int dt)
{
    switch (dt) {
    case PN_FLOAT32: { float f = (float)v; memcpy(p, &f, 4); break; }
    case PN_FLOAT64: memcpy(p, &v, 8); break;
    case PN_FLOAT16: { uint16_t h = float_to_half((float)v); memcpy(p, &h, 2); break; }
    default: { uint16_t h = float_to_bf16((float)v); memcpy(p, &h, 2); break; }
    }
}
NOCOV static double ulp_of(double v, int dt)
{
    int mant = dt == PN_FLOAT64 ? 52 : dt == PN_FLOAT32 ? 23 : dt == PN_FLOAT16 ? 10 : 7;
    int emin = dt == PN_FLOAT64 ? -1022 : dt == PN_FLOAT16 ? -14 : -126, e;
    if (!isfinite(v) || v == 0) e = emin;
    else { frexp(v, &e); e -= 1; if (e < emin) e = emin; }
    return ldexp(1.0, e - mant);
}
static double dtype_max(int dt) { return dt == PN_FLOAT64 ? DBL_MAX : dt == PN_FLOAT16 ? 65504.0 : FLT_MAX; }
static int too_big(double v, int dt) { return fabs(v) > (dt == PN_FLOAT64 ? 1e100 : 1e6); }

static const char *status_name(pn_status s)
{
    static const char *names[] = {"PN_OK", "PN_ERR_NULL", "PN_ERR_SIZE", "PN_ERR_DTYPE", "PN_ERR_EPS",
                                  "PN_ERR_STRIDE", "PN_ERR_ALIAS", "PN_ERR_SCRATCH", "PN_ERR_ALLOC",
                                  "PN_ERR_GROUPS", "PN_ERR_ARG"};
    return (unsigned)s <= 10 ? names[s] : "unknown status";
}

/* ---- the call -------------------------------------------------------------------- */

enum { OP_GN_FWD, OP_GN_BWD, OP_BN_FWD, OP_BN_BWD, OP_N };
static const char *op_names[OP_N] = {"groupnorm_forward", "groupnorm_backward", "batchnorm_forward",
                                     "batchnorm_backward"};

enum { BI_INP, BI_W, BI_B, BI_DOUT, BI_SMEAN, BI_SRSTD, BI_RMEAN, BI_RVAR,
       BI_OUT, BI_MEAN, BI_RSTD, BI_DINP, BI_DW, BI_DB, BI_SCRATCH, NB };
static const char *buf_names[NB] = {"inp", "weight", "bias", "dout", "mean(in)", "rstd(in)", "running_mean",
                                    "running_var", "out", "mean", "rstd", "dinp", "dweight", "dbias", "scratch"};
enum { K_DATA, K_PARAM, K_STAT, K_RUN, K_BYTES };

typedef struct {
    int used, required, output, present, kind;
    int64_t n, es;        /* elements, element size */
    int64_t off;          /* offset into the arena */
    int placed;
} buf_t;

typedef struct {
    int op, dt, wdt, rdt, layout, threads, flags;
    int64_t N, C, S, G, nbt;
    double eps, momentum;
    size_t scratch_bytes;
    buf_t b[NB];
} call_t;

static call_t cl;
static unsigned char *arena, *snap;
static int64_t arena_size;

static void *bptr(int i) { return cl.b[i].present ? (void *)(arena + cl.b[i].off) : NULL; }
static int is_bn(void) { return cl.op >= OP_BN_FWD; }
static int is_bwd(void) { return cl.op == OP_GN_BWD || cl.op == OP_BN_BWD; }
static int training(void) { return (cl.flags & PN_BN_TRAINING) != 0; }

static pn_status do_call(void)
{
    switch (cl.op) {
    case OP_GN_FWD:
        return pn_groupnorm_forward(bptr(BI_OUT), bptr(BI_MEAN), bptr(BI_RSTD), bptr(BI_INP), bptr(BI_W), bptr(BI_B),
                                    cl.N, cl.C, cl.S, cl.G, cl.eps, (pn_layout)cl.layout, (pn_dtype)cl.dt,
                                    (pn_dtype)cl.wdt);
    case OP_GN_BWD:
        return pn_groupnorm_backward(bptr(BI_DINP), bptr(BI_DW), bptr(BI_DB), bptr(BI_SCRATCH), cl.scratch_bytes,
                                     bptr(BI_DOUT), bptr(BI_INP), bptr(BI_W), bptr(BI_SMEAN), bptr(BI_SRSTD), cl.N,
                                     cl.C, cl.S, cl.G, cl.flags, (pn_layout)cl.layout, (pn_dtype)cl.dt,
                                     (pn_dtype)cl.wdt);
    case OP_BN_FWD:
        return pn_batchnorm_forward(bptr(BI_OUT), bptr(BI_MEAN), bptr(BI_RSTD), bptr(BI_RMEAN), bptr(BI_RVAR),
                                    bptr(BI_INP), bptr(BI_W), bptr(BI_B), cl.N, cl.C, cl.S, cl.eps, cl.momentum,
                                    cl.nbt, cl.flags, (pn_layout)cl.layout, (pn_dtype)cl.dt, (pn_dtype)cl.wdt,
                                    (pn_dtype)cl.rdt);
    default:
        return pn_batchnorm_backward(bptr(BI_DINP), bptr(BI_DW), bptr(BI_DB), bptr(BI_SCRATCH), cl.scratch_bytes,
                                     bptr(BI_DOUT), bptr(BI_INP), bptr(BI_W), bptr(BI_SMEAN), bptr(BI_SRSTD), cl.N,
                                     cl.C, cl.S, cl.flags, (pn_layout)cl.layout, (pn_dtype)cl.dt, (pn_dtype)cl.wdt);
    }
}

static void describe(void)
{
    fprintf(stderr, "call: %s N=%lld C=%lld S=%lld G=%lld layout=%d dtype=%d wdtype=%d rdtype=%d eps=%.17g "
                    "momentum=%.17g nbt=%lld flags=%d threads=%d scratch_bytes=%zu arena=%lld\n",
            op_names[cl.op], (long long)cl.N, (long long)cl.C, (long long)cl.S, (long long)cl.G, cl.layout, cl.dt,
            cl.wdt, cl.rdt, cl.eps, cl.momentum, (long long)cl.nbt, cl.flags, cl.threads, cl.scratch_bytes,
            (long long)arena_size);
    for (int i = 0; i < NB; i++)
        if (cl.b[i].used)
            fprintf(stderr, "  %-12s %s off=%lld n=%lld es=%lld\n", buf_names[i], cl.b[i].present ? "" : "NULL",
                    (long long)cl.b[i].off, (long long)cl.b[i].n, (long long)cl.b[i].es);
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

/* ---- decoding --------------------------------------------------------------------- */

#define ARENA_MAX ((int64_t)8 << 20)
#define WORK_MAX ((int64_t)1 << 18)
#define GUARD 64

static const int64_t special[] = {0, -1, 1, 2, 3, INT64_MIN, INT64_MAX, (int64_t)1 << 31, (int64_t)1 << 32,
                                  (int64_t)1 << 62, INT64_MAX / 2, 3037000500LL, 5, 7, 8, 16};

static int sizes_ok(void)
{
    int64_t a, b, c;
    if (cl.N <= 0 || cl.C <= 0 || cl.S <= 0) return 0;
    if (__builtin_mul_overflow(cl.N, cl.C, &a) || __builtin_mul_overflow(a, cl.S, &b)) return 0;
    if (__builtin_mul_overflow(b, dtype_size(cl.dt), &c)) return 0;
    if (cl.S > INT64_MAX / 64) return 0;   /* the library's own limit on row buffers (its "C" is S here) */
    return 1;
}

static size_t scratch_need(void)
{
    return cl.op == OP_GN_BWD ? pn_groupnorm_backward_scratch_size(cl.N, cl.C, cl.S, cl.G, (pn_layout)cl.layout,
                                                                   (pn_dtype)cl.dt)
                              : pn_batchnorm_backward_scratch_size(cl.N, cl.C, cl.S, (pn_layout)cl.layout,
                                                                   (pn_dtype)cl.dt);
}

static int decode(const uint8_t *data, size_t size)
{
    reader r = {data, size, 0};
    memset(&cl, 0, sizeof cl);
    cl.op = rd8(&r) % OP_N;
    uint8_t d = rd8(&r), w = rd8(&r), rr = rd8(&r), l = rd8(&r);
    cl.dt = d < 248 ? d % 4 : (d == 248 ? 4 : -1);
    cl.wdt = w < 128 ? cl.dt : w < 200 ? PN_FLOAT32 : w < 250 ? w % 4 : 9;
    cl.rdt = rr < 128 ? cl.dt : rr < 200 ? PN_FLOAT32 : rr < 250 ? rr % 4 : 7;
    cl.layout = l < 250 ? l % 2 : (l == 250 ? 2 : -1);
    static const int thr[8] = {0, 1, 2, 3, 1, 2, 4, 0};
    cl.threads = thr[rd8(&r) % 8];
    uint8_t sm = rd8(&r), a = rd8(&r), b = rd8(&r), c = rd8(&r), g = rd8(&r);
    const size_t ns = sizeof special / sizeof special[0];
    if (sm < 200) {
        cl.N = 1 + a % 4;
        cl.C = 1 + b % 12;
        cl.S = (c & 0x80) ? (int64_t)(c % 64) * 17 + 1 : 1 + c % 9;
    } else if (sm < 235) {        /* larger: threaded, several pieces */
        cl.N = 1 + a % 6;
        cl.C = 1 + b % 40;
        cl.S = 100 + (int64_t)c * 40;
        while (cl.N * cl.C * cl.S > 200000) cl.S /= 2;
    } else {
        cl.N = (a & 0x80) ? special[a % ns] : 1 + a % 3;
        cl.C = (b & 0x80) ? special[b % ns] : 1 + b % 8;
        cl.S = (c & 0x80) ? special[c % ns] : 1 + c % 5;
    }
    /* groups: a divisor of C mostly */
    if (g < 200 && cl.C > 0) {
        int64_t k = 1 + g % (cl.C < 16 ? cl.C : 16);
        while (cl.C % k) k--;
        cl.G = k;
    } else {
        cl.G = g < 230 && cl.C < INT64_MAX ? cl.C + 1 : special[g % ns];
    }
    if (is_bn()) cl.G = cl.C;   /* BatchNorm: one set per channel */
    static const double eps_t[8] = {1e-5, 0.0, 1e-3, 1.0, -1e-5, NAN, INFINITY, 1e300};
    uint8_t e = rd8(&r);
    cl.eps = e < 200 ? eps_t[e % 4] : eps_t[e % 8];
    static const double mom_t[8] = {0.1, 0.0, 1.0, 0.5, NAN, INFINITY, -0.5, 2.0};
    uint8_t m = rd8(&r);
    cl.momentum = m < 200 ? mom_t[m % 4] : mom_t[m % 8];
    uint8_t nb = rd8(&r);
    cl.nbt = nb < 200 ? 1 + nb % 5 : (nb < 230 ? 0 : -3);
    uint8_t f = rd8(&r);
    if (f < 240) {
        cl.flags = (f & 1) ? PN_ACCUMULATE : 0;
        if (is_bn()) cl.flags |= (f & 2) ? PN_BN_TRAINING : 0;
        if (cl.op == OP_BN_FWD) cl.flags = ((f & 2) ? PN_BN_TRAINING : 0) | ((f & 4) ? PN_BN_CUMULATIVE : 0);
    } else {
        cl.flags = f == 240 ? 8 : f == 241 ? -1 : f == 242 ? PN_BN_CUMULATIVE : 16;
    }
    uint8_t sc = rd8(&r);

    const int op = cl.op, bwd = is_bwd();
    int used[NB] = {0}, req[NB] = {0};
    used[BI_INP] = req[BI_INP] = 1;
    used[BI_W] = 1;
    if (bwd) {
        used[BI_DOUT] = req[BI_DOUT] = 1;
        used[BI_SMEAN] = req[BI_SMEAN] = 1;
        used[BI_SRSTD] = req[BI_SRSTD] = 1;
        used[BI_DINP] = used[BI_DW] = used[BI_DB] = used[BI_SCRATCH] = 1;
    } else {
        used[BI_OUT] = req[BI_OUT] = 1;
        used[BI_B] = used[BI_MEAN] = used[BI_RSTD] = 1;
        if (op == OP_BN_FWD) {
            used[BI_RMEAN] = used[BI_RVAR] = 1;
            if (!training()) req[BI_RMEAN] = req[BI_RVAR] = 1;
        }
    }
    const int sizes = sizes_ok() && cl.G > 0 && cl.G <= cl.C;
    const int64_t nstats = !sizes ? 0 : is_bn() ? cl.C : cl.N * cl.G;
    size_t need = bwd && dtype_valid(cl.dt) ? scratch_need() : 0;
    switch (sc % 8) {
    case 0: case 1: case 2: cl.scratch_bytes = 0; break;
    case 3: case 4: cl.scratch_bytes = need; break;
    case 5: cl.scratch_bytes = need ? need - 1 : 0; break;
    case 6: cl.scratch_bytes = need + 13; break;
    default: cl.scratch_bytes = sc < 128 ? 1 : SIZE_MAX; break;
    }
    const int scratch_present = bwd && (sc % 8) >= 3;

    int64_t cursor = GUARD;
    for (int i = 0; i < NB; i++) {
        buf_t *bf = &cl.b[i];
        uint8_t mode = rd8(&r), tgt = rd8(&r), delta = rd8(&r);
        if (!used[i]) continue;
        bf->used = 1;
        bf->required = req[i];
        bf->output = i >= BI_OUT || ((i == BI_RMEAN || i == BI_RVAR) && training());
        bf->kind = (i == BI_INP || i == BI_DOUT || i == BI_OUT || i == BI_DINP) ? K_DATA
                 : (i == BI_W || i == BI_B || i == BI_DW || i == BI_DB) ? K_PARAM
                 : (i == BI_RMEAN || i == BI_RVAR) ? K_RUN : i == BI_SCRATCH ? K_BYTES : K_STAT;
        bf->es = bf->kind == K_DATA ? (dtype_valid(cl.dt) ? dtype_size(cl.dt) : 2)
               : bf->kind == K_PARAM ? (dtype_valid(cl.wdt) ? dtype_size(cl.wdt) : 2)
               : bf->kind == K_RUN ? (dtype_valid(cl.rdt) ? dtype_size(cl.rdt) : 2)
               : bf->kind == K_STAT ? (cl.dt == PN_FLOAT64 ? 8 : 4) : 1;
        bf->present = i == BI_SCRATCH ? scratch_present : req[i] ? mode >= 6 : mode >= 70;
        if (!bf->present) continue;
        if (!sizes) { bf->off = GUARD; continue; }
        bf->n = bf->kind == K_DATA ? cl.N * cl.C * cl.S : bf->kind == K_STAT ? nstats
              : bf->kind == K_BYTES ? (cl.scratch_bytes <= (size_t)INT64_MAX ? (int64_t)cl.scratch_bytes : (int64_t)need)
              : cl.C;   /* scratch: the bytes the caller claims (all of them may be used) */
        int64_t bytes;
        if (__builtin_mul_overflow(bf->n, bf->es, &bytes) || bytes > ARENA_MAX) { bf->off = GUARD; bf->n = 0; continue; }
        if (mode >= 210) {   /* alias an earlier buffer */
            int j = tgt % NB;
            if (j < i && cl.b[j].used && cl.b[j].present && cl.b[j].placed) {
                int64_t de = (delta & 1) ? 0 : (int8_t)delta;
                int64_t off = cl.b[j].off + de * bf->es;
                if (off >= 0) {
                    bf->off = off;
                    bf->placed = 1;
                    if (off + bytes > cursor) cursor = off + bytes;
                    continue;
                }
            }
        }
        bf->off = (cursor + (delta % 4) * 64 + 7) & ~(int64_t)7;
        if (bf->kind == K_BYTES) bf->off += delta % 5;
        bf->placed = 1;
        cursor = bf->off + bytes;
    }
    arena_size = cursor + GUARD;
    if (arena_size > 4 * ARENA_MAX) return 0;
    pn_set_num_threads(cl.threads);
    rng_state = 0x9E3779B97F4A7C15ULL;
    for (size_t k = 0; k < size; k++) rng_state = (rng_state ^ data[k]) * 0x100000001B3ULL;
    if (!rng_state) rng_state = 1;
    return 1;
}

/* ---- values ---------------------------------------------------------------------------- */

static int value_mode;
NOCOV static double gen_value(int allow_special, double offset)
{
    uint64_t x = rng_next();
    int sp = (int)(x % 64);
    if (allow_special && value_mode == 2 && sp < 3) return sp == 0 ? NAN : sp == 1 ? INFINITY : -INFINITY;
    if (value_mode == 2 && sp < 8) return 0.0;
    double v = ldexp(1.0 + (double)((x >> 8) % 256) / 256.0, (int)((x >> 20) % 11) - 5);
    return ((x >> 30) & 1 ? -v : v) + offset;
}

NOCOV static void fill_inputs(void)
{
    const int acc = is_bwd() && (cl.flags & PN_ACCUMULATE);
    memset(arena, 0xA5, (size_t)arena_size);
    for (int i = 0; i < NB; i++) {
        buf_t *b = &cl.b[i];
        if (!b->used || !b->present || !b->placed || b->kind == K_BYTES) continue;
        int as_input = !b->output || (acc && (i == BI_DINP || i == BI_DW || i == BI_DB)) || i == BI_RMEAN ||
                       i == BI_RVAR;
        if (!as_input) continue;
        int dt = b->kind == K_DATA ? cl.dt : b->kind == K_PARAM ? cl.wdt : b->kind == K_RUN ? cl.rdt
               : (cl.dt == PN_FLOAT64 ? PN_FLOAT64 : PN_FLOAT32);
        if (!dtype_valid(dt)) continue;
        double offset = (value_mode == 1 && (i == BI_INP || i == BI_SMEAN || i == BI_RMEAN))
                      ? (double)(rng_next() % 2001) - 1000.0 : 0.0;
        for (int64_t k = 0; k < b->n; k++) {
            double v;
            if (i == BI_SRSTD || i == BI_RVAR) v = fabs(gen_value(i == BI_SRSTD, 0)) * 2;
            else if (b->kind == K_DATA && !b->output) v = gen_value(1, offset);
            else v = gen_value(0, i == BI_RMEAN ? offset : 0);
            store(arena + b->off + k * b->es, v, dt);
        }
    }
}

/* ---- reference --------------------------------------------------------------------------- */

/* element index of (n, c, s) */
static int64_t idx(int64_t n, int64_t c, int64_t s)
{
    return cl.layout == PN_NCHW && cl.S > 1 ? (n * cl.C + c) * cl.S + s : (n * cl.S + s) * cl.C + c;
}
static double at(const unsigned char *base, int i, int64_t k, int dt) { return load(base + cl.b[i].off + k * cl.b[i].es, dt); }

NOCOV static void compare(const char *what, int64_t k, double got, double ref, double t, int dt)
{
    if (isnan(ref)) {
        if (!isnan(got)) fail("%s[%lld] = %.9g, expected NaN", what, (long long)k, got);
        return;
    }
    if (isinf(ref)) {
        if (got != ref) fail("%s[%lld] = %.9g, expected %g", what, (long long)k, got, ref);
        return;
    }
    if (fabs(ref) > 0.5 * dtype_max(dt)) return;
    if (!(fabs(got - ref) <= t))
        fail("%s[%lld] = %.17g, reference %.17g, |diff| %.3g > tolerance %.3g", what, (long long)k, got, ref,
             fabs(got - ref), t);
}

/* sets: GroupNorm (n, g) with (C/G)*S values, BatchNorm channel c with N*S values */
static int64_t nsets(void) { return is_bn() ? cl.C : cl.N * cl.G; }
static int64_t set_size(void) { return is_bn() ? cl.N * cl.S : (cl.C / cl.G) * cl.S; }
/* the j-th element of set q and its channel */
static int64_t set_elem(int64_t q, int64_t j, int64_t *ch)
{
    if (is_bn()) {
        int64_t n = j / cl.S, s = j % cl.S;
        *ch = q;
        return idx(n, q, s);
    }
    int64_t n = q / cl.G, g = q % cl.G, cpg = cl.C / cl.G, cc = j / cl.S, s = j % cl.S;
    *ch = g * cpg + cc;
    return idx(n, *ch, s);
}

NOCOV static void check_forward(void)
{
    const int dt = cl.dt, sdt = dt == PN_FLOAT64 ? PN_FLOAT64 : PN_FLOAT32;
    const double ce = dt == PN_FLOAT64 ? DBL_EPSILON : FLT_EPSILON;
    const double dmin = dt == PN_FLOAT64 ? 4.9406564584124654e-324 : 1.4012984643248171e-45;
    const int64_t M = set_size(), Q = nsets();
    const double K = 4.0 * (double)(M + 8);
    const int eval = cl.op == OP_BN_FWD && !training();
    for (int64_t q = 0; q < Q; q++) {
        int finite = 1, big = 0;
        long double sum = 0, sq = 0, x0 = 0;
        int64_t ch;
        double mean, var, rstd, R = 0;
        for (int64_t j = 0; j < M; j++) {
            double x = at(snap, BI_INP, set_elem(q, j, &ch), dt);
            if (!isfinite(x)) finite = 0;
            else if (too_big(x, dt)) big = 1;
            if (j == 0) x0 = x;
            sum += (long double)x - x0;
        }
        if (big) continue;
        long double m = sum / M;
        for (int64_t j = 0; j < M; j++) {
            long double d = ((long double)at(snap, BI_INP, set_elem(q, j, &ch), dt) - x0) - m;
            sq += d * d;
            if (fabs((double)d) > R) R = fabs((double)d);
        }
        mean = (double)(x0 + m);
        var = (double)(sq / M);
        if (eval) {
            double rm = at(snap, BI_RMEAN, q, cl.rdt), rv = at(snap, BI_RVAR, q, cl.rdt);
            mean = rm;
            rstd = 1.0 / sqrt(rv + cl.eps);
            R = 0;
            for (int64_t j = 0; j < M; j++) {
                double d = fabs(at(snap, BI_INP, set_elem(q, j, &ch), dt) - rm);
                if (d > R) R = d;
            }
        } else {
            rstd = 1.0 / sqrt(var + cl.eps);
        }
        if (!finite && !eval) {   /* a NaN or Inf in a set: the whole set is NaN, and its rstd */
            for (int64_t j = 0; j < M; j++) {
                int64_t k = set_elem(q, j, &ch);
                compare("y (set with NaN/Inf)", k, at(arena, BI_OUT, k, dt), NAN, 0, dt);
            }
            if (cl.b[BI_RSTD].present) compare("rstd (set with NaN/Inf)", q, at(arena, BI_RSTD, q, sdt), NAN, 0, sdt);
            continue;
        }
        if (sdt == PN_FLOAT32 && isfinite(rstd) && rstd > FLT_MAX / 2) continue;
        if (!isfinite(mean) || !isfinite(rstd) || too_big(mean, dt) || too_big(rstd, dt)) continue;
        for (int64_t j = 0; j < M; j++) {
            int64_t k = set_elem(q, j, &ch);
            double w = cl.b[BI_W].present ? at(snap, BI_W, ch, cl.wdt) : 1.0;
            double b = cl.b[BI_B].present ? at(snap, BI_B, ch, cl.wdt) : 0.0;
            if (!isfinite(w) || !isfinite(b) || too_big(w, dt) || too_big(b, dt)) continue;
            double x = at(snap, BI_INP, k, dt);
            /* centred in long double (a double mean rounds away digits of
             * float64 sets far from zero); eval: the given running mean */
            double cen = eval ? x - mean : (double)(((long double)x - x0) - m);
            double xh = cen * rstd, y = xh * w + b;
            /* eval normalizes element by element: an Inf there meets an rstd
             * that may underflow the float compute type (eps = 1e300): Inf * 0 */
            if (eval && !isfinite(x)) continue;
            double t = K * ce * (fabs(w) * R * rstd * (2 + R * rstd) + fabs(xh * w) + fabs(b));
            if (eval) t = K * ce * (fabs(w) * (fabs(x) + fabs(mean)) * rstd + fabs(b)) + 4 * ce * fabs(y);
            t += 1024 * K * dmin * (1 + fabs(w)) + ulp_of(y, dt) + ulp_of(0, dt);
            compare("y", k, at(arena, BI_OUT, k, dt), y, t, dt);
        }
        if (!finite) continue;
        if (cl.b[BI_MEAN].present)
            compare("mean", q, at(arena, BI_MEAN, q, sdt), mean, K * ce * (fabs(mean) + R) + ulp_of(mean, sdt), sdt);
        if (cl.b[BI_RSTD].present)
            compare("rstd", q, at(arena, BI_RSTD, q, sdt), rstd,
                    K * ce * rstd * (1 + (eval ? 0 : R * rstd)) + ulp_of(rstd, sdt), sdt);
        if (cl.op == OP_BN_FWD && training()) {
            const double fmom = (cl.flags & PN_BN_CUMULATIVE) ? 1.0 / (double)cl.nbt : cl.momentum;
            if (cl.b[BI_RMEAN].present) {
                double old = at(snap, BI_RMEAN, q, cl.rdt), ref = (1 - fmom) * old + fmom * mean;
                compare("running_mean", q, at(arena, BI_RMEAN, q, cl.rdt), ref,
                        K * ce * (fabs(old) + fabs(mean) + R) * (1 + fabs(fmom)) + ulp_of(ref, cl.rdt), cl.rdt);
            }
            if (cl.b[BI_RVAR].present) {
                double old = at(snap, BI_RVAR, q, cl.rdt), ub = M > 1 ? var * M / (M - 1) : var;
                double ref = (1 - fmom) * old + fmom * ub;
                compare("running_var", q, at(arena, BI_RVAR, q, cl.rdt), ref,
                        K * ce * (fabs(old) + ub + R * R) * (1 + fabs(fmom)) + ulp_of(ref, cl.rdt) + ulp_of(0, cl.rdt),
                        cl.rdt);
            }
        }
    }
}

NOCOV static void check_backward(void)
{
    const int dt = cl.dt, wdt = cl.wdt, sdt = dt == PN_FLOAT64 ? PN_FLOAT64 : PN_FLOAT32;
    const double ce = dt == PN_FLOAT64 ? DBL_EPSILON : FLT_EPSILON;
    const double dmin = dt == PN_FLOAT64 ? 4.9406564584124654e-324 : 1.4012984643248171e-45;
    const int64_t M = set_size(), Q = nsets(), C = cl.C;
    const double K = 4.0 * (double)(M + 8), Kr = 4.0 * (double)(cl.N * cl.S + M + 16);
    const int acc = (cl.flags & PN_ACCUMULATE) != 0, through_stats = !is_bn() || training();
    double *dw = calloc((size_t)C, 8), *db = calloc((size_t)C, 8), *dwa = calloc((size_t)C, 8), *dba = calloc((size_t)C, 8);
    int all_finite = 1;
    for (int64_t c = 0; c < C; c++) {
        double w = cl.b[BI_W].present ? at(snap, BI_W, c, wdt) : 1.0;
        if (!isfinite(w) || too_big(w, dt)) all_finite = 0;
    }
    for (int64_t q = 0; q < Q && all_finite; q++) {
        const double mu = at(snap, BI_SMEAN, q, sdt), rs = at(snap, BI_SRSTD, q, sdt);
        int64_t ch;
        double mg = 0, mgx = 0, mabsg = 0, mgA = 0, mA = 0;
        int finite = isfinite(mu) && isfinite(rs) && !too_big(mu, dt) && !too_big(rs, dt);
        for (int64_t j = 0; j < M && finite; j++) {
            int64_t k = set_elem(q, j, &ch);
            double x = at(snap, BI_INP, k, dt), dy = at(snap, BI_DOUT, k, dt);
            if (!isfinite(x) || !isfinite(dy) || too_big(x, dt) || too_big(dy, dt)) finite = 0;
        }
        if (!finite) { all_finite = 0; break; }
        for (int64_t j = 0; j < M; j++) {
            int64_t k = set_elem(q, j, &ch);
            double x = at(snap, BI_INP, k, dt), dy = at(snap, BI_DOUT, k, dt);
            double w = cl.b[BI_W].present ? at(snap, BI_W, ch, wdt) : 1.0;
            double xh = (x - mu) * rs, g = dy * w, A = (fabs(x) + fabs(mu)) * fabs(rs);
            mg += g; mgx += g * xh; mabsg += fabs(g); mgA += fabs(g) * A; mA += A;
            dw[ch] += dy * xh; db[ch] += dy; dwa[ch] += fabs(dy) * A; dba[ch] += fabs(dy);
        }
        mg /= M; mgx /= M; mabsg /= M; mgA /= M; mA /= M;
        if (!cl.b[BI_DINP].present) continue;
        for (int64_t j = 0; j < M; j++) {
            int64_t k = set_elem(q, j, &ch);
            double x = at(snap, BI_INP, k, dt), dy = at(snap, BI_DOUT, k, dt);
            double w = cl.b[BI_W].present ? at(snap, BI_W, ch, wdt) : 1.0;
            double xh = (x - mu) * rs, g = dy * w, A = (fabs(x) + fabs(mu)) * fabs(rs);
            double dx = through_stats ? rs * (g - mg - xh * mgx) : rs * g;
            double t = through_stats ? K * ce * fabs(rs) * (fabs(g) + mabsg + A * mgA + A * fabs(mgx))
                                     : 4 * ce * fabs(rs * g);
            if (acc) {
                double old = at(snap, BI_DINP, k, dt);
                dx += old;
                t += 2 * ce * (fabs(old) + fabs(dx));
            }
            /* a subnormal g is off by up to dmin, also through the two means */
            t += 1024 * K * dmin * (1 + fabs(w)) * (1 + fabs(rs)) * (through_stats ? 1 + A * mA : 1)
                 + ulp_of(dx, dt) + ulp_of(0, dt);
            compare("dinp", k, at(arena, BI_DINP, k, dt), dx, t, dt);
        }
    }
    if (all_finite)
        for (int64_t c = 0; c < C; c++) {
            if (cl.b[BI_DW].present) {
                double ref = dw[c], t = Kr * ce * dwa[c];
                if (acc) { double old = at(snap, BI_DW, c, wdt); ref += old; t += 2 * ce * (fabs(old) + fabs(ref)); }
                compare("dweight", c, at(arena, BI_DW, c, wdt), ref,
                        t + 1024 * Kr * dmin * (1 + dba[c]) + ulp_of(ref, wdt) + ulp_of(0, wdt), wdt);
            }
            if (cl.b[BI_DB].present) {
                double ref = db[c], t = Kr * ce * dba[c];
                if (acc) { double old = at(snap, BI_DB, c, wdt); ref += old; t += 2 * ce * (fabs(old) + fabs(ref)); }
                compare("dbias", c, at(arena, BI_DB, c, wdt), ref, t + ulp_of(ref, wdt) + ulp_of(0, wdt), wdt);
            }
        }
    free(dw); free(db); free(dwa); free(dba);
}

/* ---- one input ---------------------------------------------------------------------------- */

enum { R_NULL = 1, R_DTYPE = 2, R_SIZE = 4, R_EPS = 8, R_ARG = 16, R_SCRATCH = 32, R_GROUPS = 64, R_OVERLAP = 128,
       R_ONE = 256 /* BatchNorm training on one value per channel: PN_ERR_SIZE, checked after the views */ };

static int overlap(int i, int j)
{
    const buf_t *a = &cl.b[i], *b = &cl.b[j];
    return a->off < b->off + b->n * b->es && b->off < a->off + a->n * a->es;
}

NOCOV static void check_untouched(void)
{
    unsigned char *may = calloc((size_t)arena_size, 1);
    for (int i = 0; i < NB; i++) {
        const buf_t *b = &cl.b[i];
        if (!b->used || !b->present || !b->output) continue;
        memset(may + b->off, 1, (size_t)(b->n * b->es));
    }
    for (int64_t k = 0; k < arena_size; k++)
        if (!may[k] && arena[k] != snap[k]) fail("PN_OK but byte %lld outside every output changed", (long long)k);
    free(may);
}

static int run_one(const uint8_t *data, size_t size)
{
    if (!decode(data, size)) return 0;
    value_mode = size > 1 ? data[size - 1] % 3 : 0;
    const int bwd = is_bwd(), bn = is_bn();
    unsigned must = 0;
    for (int i = 0; i < NB; i++)
        if (cl.b[i].used && cl.b[i].required && !cl.b[i].present) must |= R_NULL;
    if (!dtype_valid(cl.dt) || !dtype_valid(cl.wdt) || (cl.wdt != cl.dt && cl.wdt != PN_FLOAT32)) must |= R_DTYPE;
    if (cl.op == OP_BN_FWD && (cl.b[BI_RMEAN].present || cl.b[BI_RVAR].present) &&
        (!dtype_valid(cl.rdt) || (cl.rdt != cl.dt && cl.rdt != PN_FLOAT32)))
        must |= R_DTYPE;
    if (cl.layout != PN_NCHW && cl.layout != PN_NHWC) must |= R_ARG;
    int allowed = bwd ? PN_ACCUMULATE | (bn ? PN_BN_TRAINING : 0) : (bn ? PN_BN_TRAINING | PN_BN_CUMULATIVE : 0);
    if (cl.op != OP_GN_FWD && (cl.flags & ~allowed)) must |= R_ARG;   /* groupnorm_forward has no flags */
    if (!sizes_ok()) must |= R_SIZE;
    else if (cl.op == OP_BN_FWD && training() && cl.N * cl.S == 1) must |= R_ONE;
    if (!bn && (cl.G <= 0 || cl.C <= 0 || cl.C % cl.G)) must |= R_GROUPS;
    if (!bwd && !(cl.eps >= 0 && isfinite(cl.eps))) must |= R_EPS;
    if (cl.op == OP_BN_FWD && training() && (cl.b[BI_RMEAN].present || cl.b[BI_RVAR].present)) {
        if (cl.flags & PN_BN_CUMULATIVE) { if (cl.nbt < 1) must |= R_ARG; }
        else if (!isfinite(cl.momentum)) must |= R_ARG;
    }
    if (bwd && cl.b[BI_SCRATCH].present && !(must & (R_SIZE | R_DTYPE | R_GROUPS | R_ARG)) &&
        (cl.b[BI_DINP].present || cl.b[BI_DW].present || cl.b[BI_DB].present) && cl.scratch_bytes < scratch_need())
        must |= R_SCRATCH;
    int fits = !(must & (R_SIZE | R_DTYPE | R_GROUPS)), unplaced = 0;
    for (int i = 0; i < NB; i++)
        if (cl.b[i].used && cl.b[i].present && (!cl.b[i].placed || cl.b[i].off + cl.b[i].n * cl.b[i].es > arena_size))
            fits = 0, unplaced |= !cl.b[i].placed;
    if (!must && !fits) return 0;
    const int64_t work = sizes_ok() ? cl.N * cl.C * cl.S : 0;
    if (!must && work > WORK_MAX) return 0;
    const int may_size = bwd && cl.b[BI_SCRATCH].present && cl.scratch_bytes > (size_t)INT64_MAX;

    arena = malloc((size_t)arena_size);
    snap = malloc((size_t)arena_size);
    if (work <= WORK_MAX && fits) fill_inputs();
    else memset(arena, 0xA5, (size_t)arena_size);
    if (fits) {
        /* outputs: against each other and against inputs; in place: out == inp
         * (forward), dinp == dout or inp (backward), exactly */
        const int scratch_used = bwd && (cl.b[BI_DINP].present || cl.b[BI_DW].present || cl.b[BI_DB].present);
        for (int o = 0; o < NB; o++) {
            const buf_t *bo = &cl.b[o];
            if (!bo->used || !bo->present || !bo->output || (o == BI_SCRATCH && !scratch_used)) continue;
            for (int j = 0; j < NB; j++) {
                const buf_t *bj = &cl.b[j];
                if (j == o || !bj->used || !bj->present || (j == BI_SCRATCH && !scratch_used) || !overlap(o, j)) continue;
                if (bj->output && j < o) { must |= R_OVERLAP; continue; }
                if (bj->output) continue;
                int inplace = bo->off == bj->off && bo->es == bj->es && bo->n == bj->n &&
                              ((o == BI_OUT && j == BI_INP) || (o == BI_DINP && (j == BI_DOUT || j == BI_INP)));
                if (!inplace) must |= R_OVERLAP;
            }
        }
    }
    memcpy(snap, arena, (size_t)arena_size);
    pn_status st = do_call();
    if (getenv("PN_FUZZ_VERBOSE")) { fprintf(stderr, "status %s\n", status_name(st)); describe(); }

    if (st != PN_OK) {
        if (memcmp(arena, snap, (size_t)arena_size) != 0) fail("status %s but the arena changed", status_name(st));
        /* a scratch claimed beyond INT64_MAX bytes: refused as a size, or as
         * overlapping whatever lies after it */
        const int claim_ok = may_size && (st == PN_ERR_SIZE || st == PN_ERR_ALIAS);
        /* buffers too large for the arena all start at GUARD: the library
         * rightly sees them overlap (they are never dereferenced) */
        const int unplaced_ok = unplaced && st == PN_ERR_ALIAS;
        if (!must && !claim_ok) fail("valid call refused with %s", status_name(st));
        static const struct { unsigned reason; pn_status code; } single[] = {
            {R_NULL, PN_ERR_NULL}, {R_DTYPE, PN_ERR_DTYPE}, {R_SIZE, PN_ERR_SIZE}, {R_EPS, PN_ERR_EPS},
            {R_ARG, PN_ERR_ARG}, {R_SCRATCH, PN_ERR_SCRATCH}, {R_GROUPS, PN_ERR_GROUPS}, {R_OVERLAP, PN_ERR_ALIAS},
            {R_ONE, PN_ERR_SIZE}};
        for (size_t k = 0; k < sizeof single / sizeof single[0]; k++)
            if (must == single[k].reason && st != single[k].code && !claim_ok && !unplaced_ok)
                fail("one fault (reason %u) should give %s, got %s", must, status_name(single[k].code),
                     status_name(st));
    } else {
        if (must) fail("call that must fail (reasons %#x) returned PN_OK", must);
        check_untouched();
        if (bwd) check_backward();
        else check_forward();
    }
    free(arena);
    free(snap);
    arena = snap = NULL;
    return 0;
}

#ifndef PN_FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { return run_one(data, size); }
#else
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
