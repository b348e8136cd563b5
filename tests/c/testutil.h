/* testutil.h - shared helpers for pynorm's C tests (plain C99, header only).
 *
 *   - pass/fail bookkeeping: tu_check() prints one line per check, tu_summary()
 *     prints "N passed, N failed" and gives the exit status;
 *   - float <-> float16 / bfloat16 conversions, round to nearest even;
 *   - a deterministic random generator;
 *   - tu_buf: a B x T x C buffer of any dtype with any row strides (negative
 *     ones included), surrounded by guard bytes, so that a test can check that
 *     the library wrote exactly the rows and nothing else;
 *   - double-precision references for LayerNorm and RMSNorm, forward and
 *     backward (two-pass mean/variance).
 */
#ifndef PN_TESTUTIL_H
#define PN_TESTUTIL_H

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pynorm.h"

/* ------------------------------------------------------------------------ */
/* bookkeeping                                                               */

static int tu_passed = 0;
static int tu_failed = 0;

/* Records one check and prints "ok   ..." or "FAIL ...". Returns ok. */
static inline int tu_check(int ok, const char *fmt, ...)
{
    va_list ap;
    printf("%s ", ok ? "ok  " : "FAIL");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    if (ok)
        tu_passed++;
    else
        tu_failed++;
    return ok;
}

/* PYNORM_TEST_QUICK=1 (set by ctest when the tests run under an emulator such
 * as qemu-user, where they are 20-50x slower) makes the tests smaller:
 *   - they leave out their outputs of 8 MiB and more, which the library
 *     streams; on targets other than x86-64 streaming is a plain memcpy of the
 *     same rounded row (kernel.h), so no kernel goes untested;
 *   - a grid over (large case, dtype) runs each large case with one dtype, in
 *     turn (tu_quick_skip): every case and every dtype still runs, not every
 *     pair. Small cases keep every pair. */
static inline int tu_quick(void)
{
    const char *v = getenv("PYNORM_TEST_QUICK");
    return v && v[0] && strcmp(v, "0") != 0;
}

/* In quick mode: skip dtype k (of n) for case i unless it is case i's turn. */
static inline int tu_quick_skip(int i, int k, int n)
{
    return tu_quick() && k != i % n;
}

static inline int tu_summary(void)
{
    printf("%d passed, %d failed\n", tu_passed, tu_failed);
    fflush(stdout);
    return tu_failed ? 1 : 0;
}

static inline void *tu_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

/* ------------------------------------------------------------------------ */
/* dtypes                                                                    */

static inline const char *tu_dtype_name(pn_dtype dt)
{
    switch (dt) {
    case PN_FLOAT32: return "f32";
    case PN_FLOAT16: return "f16";
    case PN_BFLOAT16: return "bf16";
    case PN_FLOAT64: return "f64";
    }
    return "?";
}

static inline size_t tu_dtype_size(pn_dtype dt)
{
    switch (dt) {
    case PN_FLOAT32: return 4;
    case PN_FLOAT16: return 2;
    case PN_BFLOAT16: return 2;
    case PN_FLOAT64: return 8;
    }
    return 0;
}

/* dtype of the saved statistics (mean, rstd) */
static inline pn_dtype tu_stat_dtype(pn_dtype dt)
{
    return dt == PN_FLOAT64 ? PN_FLOAT64 : PN_FLOAT32;
}

static inline uint32_t tu_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float tu_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float32 -> IEEE binary16, round to nearest even (NaN stays NaN, quiet). */
static inline uint16_t tu_f32_to_f16(float f)
{
    uint32_t x = tu_f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) { /* inf or nan */
        if (a == 0x7f800000u)
            return (uint16_t)(sign | 0x7c00u);
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    }
    if (a >= 0x477ff000u) /* >= 65520 rounds to infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below 2^-14: subnormal half (or zero) */
        /* a * 2^24 is exact in float; rintf rounds half to even */
        float v = tu_bits_f32(a) * 16777216.0f;
        return (uint16_t)(sign | (uint32_t)rintf(v));
    }
    {
        uint32_t e = (a >> 23) - 127u + 15u;
        uint32_t m = a & 0x7fffffu;
        uint32_t h = (e << 10) | (m >> 13);
        uint32_t rem = m & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
            h++; /* a carry into the exponent is the right answer */
        return (uint16_t)(sign | h);
    }
}

static inline float tu_f16_to_f32(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return sign ? -v : v;
    }
    if (e == 31)
        return tu_bits_f32(sign | 0x7f800000u | (m << 13));
    return tu_bits_f32(sign | ((e - 15u + 127u) << 23) | (m << 13));
}

/* float32 -> bfloat16, round to nearest even (NaN stays NaN, quiet). */
static inline uint16_t tu_f32_to_bf16(float f)
{
    uint32_t x = tu_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

static inline float tu_bf16_to_f32(uint16_t h)
{
    return tu_bits_f32((uint32_t)h << 16);
}

/* Element i of a buffer of dtype dt, as a double. */
static inline double tu_load(const void *p, pn_dtype dt, int64_t i)
{
    switch (dt) {
    case PN_FLOAT32: { float v; memcpy(&v, (const char *)p + 4 * i, 4); return v; }
    case PN_FLOAT16: { uint16_t v; memcpy(&v, (const char *)p + 2 * i, 2); return tu_f16_to_f32(v); }
    case PN_BFLOAT16: { uint16_t v; memcpy(&v, (const char *)p + 2 * i, 2); return tu_bf16_to_f32(v); }
    case PN_FLOAT64: { double v; memcpy(&v, (const char *)p + 8 * i, 8); return v; }
    }
    return 0.0;
}

/* Stores v into element i (half types go double -> float -> half). */
static inline void tu_store(void *p, pn_dtype dt, int64_t i, double v)
{
    switch (dt) {
    case PN_FLOAT32: { float f = (float)v; memcpy((char *)p + 4 * i, &f, 4); break; }
    case PN_FLOAT16: { uint16_t h = tu_f32_to_f16((float)v); memcpy((char *)p + 2 * i, &h, 2); break; }
    case PN_BFLOAT16: { uint16_t h = tu_f32_to_bf16((float)v); memcpy((char *)p + 2 * i, &h, 2); break; }
    case PN_FLOAT64: memcpy((char *)p + 8 * i, &v, 8); break;
    }
}

/* v rounded to dtype dt and back. */
static inline double tu_round(pn_dtype dt, double v)
{
    unsigned char tmp[8];
    tu_store(tmp, dt, 0, v);
    return tu_load(tmp, dt, 0);
}

/* h = x + r as the fused kernels define it: computed in the compute type
 * (float32 for the 16/32-bit types, double for float64), rounded once. */
static inline double tu_add_round(pn_dtype dt, double x, double r)
{
    if (dt == PN_FLOAT64)
        return x + r;
    return tu_round(dt, (double)((float)x + (float)r));
}

/* Relative tolerances (against the magnitude of the output). */
static inline double tu_rtol_fwd(pn_dtype dt)
{
    switch (dt) {
    case PN_FLOAT32: return 1e-5;
    case PN_FLOAT16: return 1.2e-3;  /* one rounding to binary16: 2^-11 */
    case PN_BFLOAT16: return 8e-3;   /* one rounding to bfloat16: 2^-8 */
    case PN_FLOAT64: return 1e-12;
    }
    return 0;
}

static inline double tu_rtol_bwd(pn_dtype dt)
{
    switch (dt) {
    case PN_FLOAT32: return 5e-5;
    case PN_FLOAT16: return 1.5e-3;
    case PN_BFLOAT16: return 1e-2;
    case PN_FLOAT64: return 1e-11;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* random numbers (splitmix64)                                              */

typedef struct {
    uint64_t s;
} tu_rng;

static inline uint64_t tu_next(tu_rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in (0, 1) */
static inline double tu_uniform(tu_rng *r)
{
    return ((double)(tu_next(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static inline double tu_normal(tu_rng *r)
{
    double u1 = tu_uniform(r), u2 = tu_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ------------------------------------------------------------------------ */
/* strided buffers                                                           */

#define TU_SENTINEL 0xA5
#define TU_GUARD 16 /* guard elements before and after the rows */

typedef struct {
    unsigned char *mem;   /* allocation (NULL: this buffer is not used) */
    unsigned char *snap;  /* copy taken by tu_buf_snapshot */
    unsigned char *mask;  /* per element of mem: 1 inside a row */
    int64_t nel;          /* elements in mem */
    int64_t off0;         /* element index of row (0, 0) in mem */
    int64_t B, T, C;
    int64_t sb, st;       /* resolved row strides, in elements */
    pn_rows rows;         /* what to pass in pn_strides ({0,0}: dense) */
    pn_dtype dt;
    size_t es;
} tu_buf;

/* A B x T x C buffer with rows at b*sb + t*st (sb = st = 0: dense, and then
 * rows is {0, 0}). Filled with the sentinel byte. Strides may be negative
 * and may make rows overlap (for inputs). */
static inline tu_buf tu_buf_rows(int64_t B, int64_t T, int64_t C, pn_dtype dt, int64_t sb, int64_t st)
{
    tu_buf b;
    int64_t lo = 0, hi = 0, i, j, k;
    memset(&b, 0, sizeof b);
    b.B = B; b.T = T; b.C = C; b.dt = dt; b.es = tu_dtype_size(dt);
    b.rows.b = sb; b.rows.t = st;
    if (sb == 0 && st == 0) { sb = T * C; st = C; }
    b.sb = sb; b.st = st;
    for (i = 0; i < 2; i++)
        for (j = 0; j < 2; j++) {
            int64_t o = (i ? (B - 1) * sb : 0) + (j ? (T - 1) * st : 0);
            if (o < lo) lo = o;
            if (o > hi) hi = o;
        }
    hi += C;
    b.nel = (hi - lo) + 2 * TU_GUARD;
    b.off0 = TU_GUARD - lo;
    b.mem = (unsigned char *)tu_xmalloc((size_t)b.nel * b.es);
    b.snap = (unsigned char *)tu_xmalloc((size_t)b.nel * b.es);
    b.mask = (unsigned char *)tu_xmalloc((size_t)b.nel);
    memset(b.mem, TU_SENTINEL, (size_t)b.nel * b.es);
    memset(b.mask, 0, (size_t)b.nel);
    for (i = 0; i < B; i++)
        for (j = 0; j < T; j++)
            for (k = 0; k < C; k++)
                b.mask[b.off0 + i * sb + j * st + k] = 1;
    return b;
}

static inline tu_buf tu_buf_vec(int64_t n, pn_dtype dt)
{
    return tu_buf_rows(1, 1, n, dt, 0, 0);
}

static inline tu_buf tu_buf_none(void)
{
    tu_buf b;
    memset(&b, 0, sizeof b);
    return b;
}

static inline void tu_buf_free(tu_buf *b)
{
    free(b->mem);
    free(b->snap);
    free(b->mask);
    memset(b, 0, sizeof *b);
}

/* Pointer to row (0, 0), or NULL for an unused buffer. */
static inline void *tu_ptr(const tu_buf *b)
{
    return b->mem ? b->mem + b->off0 * (int64_t)b->es : NULL;
}

static inline int64_t tu_idx(const tu_buf *b, int64_t i, int64_t j, int64_t k)
{
    return b->off0 + i * b->sb + j * b->st + k;
}

/* element (row n = b*T + t, column k) */
static inline double tu_get(const tu_buf *b, int64_t n, int64_t k)
{
    return tu_load(b->mem, b->dt, tu_idx(b, n / b->T, n % b->T, k));
}

static inline void tu_set(tu_buf *b, int64_t n, int64_t k, double v)
{
    tu_store(b->mem, b->dt, tu_idx(b, n / b->T, n % b->T, k), v);
}

/* All rows into a dense (B*T) x C array of doubles. */
static inline double *tu_gather(const tu_buf *b)
{
    int64_t N = b->B * b->T, n, k;
    double *d = (double *)tu_xmalloc((size_t)(N * b->C) * sizeof(double));
    for (n = 0; n < N; n++)
        for (k = 0; k < b->C; k++)
            d[n * b->C + k] = tu_get(b, n, k);
    return d;
}

/* Fills the rows with mu + sd * z, rounded to the dtype; z is a cheap
 * bell-shaped variate (sum of four uniforms: mean 0, variance 1, |z| < 3.5),
 * several times faster than tu_normal for the big buffers. */
static inline void tu_fill_normal(tu_buf *b, tu_rng *r, double mu, double sd)
{
    int64_t N = b->B * b->T, n, k;
    for (n = 0; n < N; n++)
        for (k = 0; k < b->C; k++) {
            double z = 1.7320508075688772 *
                       (tu_uniform(r) + tu_uniform(r) + tu_uniform(r) + tu_uniform(r) - 2.0);
            tu_set(b, n, k, mu + sd * z);
        }
}

static inline void tu_buf_snapshot(tu_buf *b)
{
    if (b->mem)
        memcpy(b->snap, b->mem, (size_t)b->nel * b->es);
}

/* 1 when the buffer is byte-identical to its snapshot (inputs). */
static inline int tu_buf_unchanged(const tu_buf *b)
{
    return !b->mem || memcmp(b->snap, b->mem, (size_t)b->nel * b->es) == 0;
}

/* 1 when every byte outside the rows still holds the sentinel (outputs). */
static inline int tu_buf_guard_ok(const tu_buf *b)
{
    int64_t i;
    size_t j;
    if (!b->mem)
        return 1;
    for (i = 0; i < b->nel; i++)
        if (!b->mask[i])
            for (j = 0; j < b->es; j++)
                if (b->mem[i * (int64_t)b->es + (int64_t)j] != TU_SENTINEL)
                    return 0;
    return 1;
}

/* ------------------------------------------------------------------------ */
/* comparisons                                                               */

/* max |got - ref| over n values; a NaN where the other is not NaN, or an
 * infinity that differs, counts as an infinite error. */
static inline double tu_maxerr(const double *got, const double *ref, int64_t n)
{
    double m = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        double g = got[i], r = ref[i], e;
        if (isnan(g) || isnan(r)) {
            if (isnan(g) && isnan(r))
                continue;
            return INFINITY;
        }
        if (isinf(g) || isinf(r)) {
            if (g == r)
                continue;
            return INFINITY;
        }
        e = fabs(g - r);
        if (e > m)
            m = e;
    }
    return m;
}

/* The larger of a running error maximum m and an error e, where a NaN error wins:
   fmax() would drop it and let a NaN result pass a tolerance check. */
static inline double tu_nanmax(double m, double e)
{
    return e <= m ? m : e;
}

static inline double tu_maxabs(const double *v, int64_t n)
{
    double m = 0;
    int64_t i;
    for (i = 0; i < n; i++)
        if (fabs(v[i]) > m)
            m = fabs(v[i]);
    return m;
}

/* ------------------------------------------------------------------------ */
/* double-precision references                                               */

/* Forward over N rows of C: y, mean (LayerNorm only; may be NULL), rstd.
 * w, b may be NULL. Two-pass statistics. */
static inline void tu_ref_forward(int rms, int64_t N, int64_t C, const double *x,
                                  const double *w, const double *b, double eps,
                                  double *y, double *mean, double *rstd)
{
    int64_t n, k;
    for (n = 0; n < N; n++) {
        const double *xr = x + n * C;
        double mu = 0, var = 0, rs;
        if (!rms) {
            for (k = 0; k < C; k++)
                mu += xr[k];
            mu /= (double)C;
        }
        for (k = 0; k < C; k++)
            var += (xr[k] - mu) * (xr[k] - mu);
        var /= (double)C;
        rs = 1.0 / sqrt(var + eps);
        for (k = 0; k < C; k++) {
            double v = (xr[k] - mu) * rs;
            if (w) v *= w[k];
            if (b) v += b[k];
            y[n * C + k] = v;
        }
        if (mean) mean[n] = mu;
        rstd[n] = rs;
    }
}

/* Backward from saved statistics (mean ignored for RMSNorm). w may be NULL.
 * Writes dx (N x C) and ADDS into dw, db (C each); dxmag gets, per element,
 * the magnitude of the terms dx is made of, dwabs/dbabs (added into) the sums
 * of |terms| of dweight/dbias: the scales the errors are measured against. */
static inline void tu_ref_backward(int rms, int64_t N, int64_t C, const double *dy,
                                   const double *x, const double *w,
                                   const double *mean, const double *rstd,
                                   double *dx, double *dw, double *db, double *dxmag,
                                   double *dwabs, double *dbabs)
{
    int64_t n, k;
    for (n = 0; n < N; n++) {
        const double *xr = x + n * C, *gr = dy + n * C;
        double mu = rms ? 0.0 : mean[n], rs = rstd[n];
        double mg = 0, mgx = 0;
        for (k = 0; k < C; k++) {
            double xh = (xr[k] - mu) * rs;
            double g = gr[k] * (w ? w[k] : 1.0);
            mg += g;
            mgx += g * xh;
            dw[k] += gr[k] * xh;
            dwabs[k] += fabs(gr[k] * xh);
            if (db) { db[k] += gr[k]; dbabs[k] += fabs(gr[k]); }
        }
        mg /= (double)C;
        mgx /= (double)C;
        if (rms) mg = 0;
        for (k = 0; k < C; k++) {
            double xh = (xr[k] - mu) * rs;
            double g = gr[k] * (w ? w[k] : 1.0);
            dx[n * C + k] = rs * (g - mg - xh * mgx);
            dxmag[n * C + k] = rs * (fabs(g) + fabs(mg) + fabs(xh * mgx));
        }
    }
}

/* ------------------------------------------------------------------------ */
/* row layouts used by the numeric tests                                     */

enum { TU_DENSE = 0, TU_PADDED, TU_NEGATIVE, TU_EXPLICIT, TU_NLAYOUTS };

static inline const char *tu_layout_name(int layout)
{
    switch (layout) {
    case TU_DENSE: return "dense";
    case TU_PADDED: return "padded";
    case TU_NEGATIVE: return "negative";
    case TU_EXPLICIT: return "explicit+bcast";
    }
    return "?";
}

/* Strides of buffer number k (each buffer of a call gets a different one)
 * for a layout. Outputs never get overlapping rows; with TU_EXPLICIT an
 * input (k even) is broadcast along T (st = 0) and outputs get explicit
 * dense strides. */
static inline void tu_layout_strides(int layout, int k, int is_input, int64_t T, int64_t C,
                                     int64_t *sb, int64_t *st)
{
    int64_t s;
    switch (layout) {
    case TU_PADDED:
        *st = C + 1 + 2 * k;
        *sb = T * (*st) + 3 + k;
        return;
    case TU_NEGATIVE:
        s = C + 1 + k;
        *st = (k & 1) ? s : -s;
        *sb = -(T * s + 5);
        return;
    case TU_EXPLICIT:
        if (is_input && (k % 2 == 0)) { *sb = C; *st = 0; }
        else { *sb = T * C; *st = C; }
        return;
    default:
        *sb = 0; *st = 0;
    }
}

static inline tu_buf tu_buf_layout(int layout, int k, int is_input, int64_t B, int64_t T,
                                   int64_t C, pn_dtype dt)
{
    int64_t sb, st;
    tu_layout_strides(layout, k, is_input, T, C, &sb, &st);
    return tu_buf_rows(B, T, C, dt, sb, st);
}

#endif /* PN_TESTUTIL_H */
