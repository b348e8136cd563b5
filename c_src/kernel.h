/* kernel.h - included by op files in their kernel builds: the compute type
 * `real`, dtype load/store, fixed-order reductions, and each call's working
 * memory. */
#ifndef PYNORM_KERNEL_H
#define PYNORM_KERNEL_H

#include "common.h"

typedef PN_REAL real;
#define PN_REAL_DTYPE (sizeof(real) == 8 ? PN_FLOAT64 : PN_FLOAT32)

#include "dtype.h"
#include "simd.h"

/* Working memory of one call, taken with a single malloc before any output is
 * written: weight and bias as `real` (ones and zeros when absent, so the inner
 * loops need no branches), the weight with the call's weight_offset added
 * (in `real`: float32 for half-precision weights, never in their own dtype),
 * and `nbuf` row buffers of C reals per thread.
 *
 * A forward (pn_work_init_lean) leaves w NULL for ones and b NULL for zeros
 * (the epilogue then multiplies by nothing and adds a constant 0, the same
 * bits), and takes memory only for what it must convert or fold: on one row
 * the fills and the malloc were a large part of a call (LayerNorm (1, 4096)
 * float32 without weight and bias wrote 32 KiB of ones and zeros: the C call
 * took 2.0 us with them, 0.9 us without). A backward reads w only: it asks for PN_FILL_W alone and
 * writes no row of zeros. */
typedef struct {
    const real *w, *b;
    const void *wh, *bh;   /* a forward's half-precision weight and bias read as given (pn_params_as_given) */
    real *rows;
    int64_t stride;     /* reals per row buffer, rounded up to 64 bytes */
    int nbuf, nthreads;
    void *mem;
} pn_work;

/* A forward with a half-precision weight and bias (and no weight_offset)
 * on few rows reads them as given: each piece of y converts its share into
 * the stack (pn_fwd_output), in L1, instead of the call widening them into
 * fresh memory first (exact conversions: the same values, the same bits).
 * Widening costs 2 C stores that miss the cache once per call; converting in
 * the pieces costs 2 C conversions from L1 per row. Measured on AVX-512
 * (loaded machine, min of 41 alternating runs): LayerNorm (1, 4096) bfloat16
 * and float16 with weight and bias of their dtype 1.22-1.27x faster as given,
 * (2, 4096) float16 1.12x, (4, 4096) bfloat16 0.91x: read as given up to 2
 * rows, and without F16C (float16 converted one value at a time) on one. */
static inline int pn_params_as_given(const pn_token_args *a) {
    if (!(a->weight || a->bias) || a->weight_offset != 0) return 0;
    const int64_t rows = a->B * a->T;
#ifdef __F16C__
    const int f16_max = 2;
#else
    const int f16_max = 1;
#endif
    return (a->wdtype == PN_BFLOAT16 && rows <= 2) || (a->wdtype == PN_FLOAT16 && rows <= f16_max);
}

enum { PN_FILL_W = 1, PN_FILL_B = 2,    /* which absent rows pn_work_init_as writes (ones, zeros) */
       PN_AS_GIVEN = 4 };               /* half-precision w and b read as given where pn_params_as_given */
static inline pn_status pn_work_init_as(pn_work *wk, const pn_token_args *a, int nbuf, int fill) {
    const int64_t C = a->C, rows = a->B * a->T;
    const int64_t stride = (C + 15) & ~(int64_t)15;
    int nt = pn_threads();
    if (rows * C < PN_PARALLEL_MIN_ELEMS || nt < 1) nt = 1;
    wk->stride = stride;
    wk->nbuf = nbuf;
    wk->nthreads = nt;
    const int as_given = (fill & PN_AS_GIVEN) && pn_params_as_given(a);
    wk->wh = as_given ? a->weight : NULL;
    wk->bh = as_given ? a->bias : NULL;
    /* rows of reals that w and b need: their own storage unless given as reals (and, for w, no offset) */
    const int own_w = a->weight ? !as_given && (a->wdtype != PN_REAL_DTYPE || a->weight_offset != 0)
                                : (fill & PN_FILL_W) != 0;
    const int own_b = a->bias ? !as_given && a->wdtype != PN_REAL_DTYPE : (fill & PN_FILL_B) != 0;
    /* [w | b | nt * nbuf row buffers], the parts that are needed */
    size_t n = (size_t)stride * ((size_t)own_w + (size_t)own_b + (size_t)nt * (size_t)nbuf);
    real *mem = NULL;
    if (n && !(mem = (real *)malloc(n * sizeof(real)))) return PN_ERR_ALLOC;
    real *w = own_w ? mem : NULL, *b = own_b ? mem + (own_w ? stride : 0) : NULL;
    if (!a->weight && w) for (int64_t i = 0; i < C; i++) w[i] = 1;
    if (!a->bias && b) for (int64_t i = 0; i < C; i++) b[i] = 0;
    wk->w = a->weight && !as_given ? pn_row_as_real(a->weight, a->wdtype, w, C) : w;
    if (a->weight_offset != 0) {   /* a weight is given (checked) */
        const real off = (real)a->weight_offset;
        if (wk->w != w) pn_load_row(w, a->weight, a->wdtype, C);
        for (int64_t i = 0; i < C; i++) w[i] = off + w[i];
        wk->w = w;
    }
    wk->b = a->bias && !as_given ? pn_row_as_real(a->bias, a->wdtype, b, C) : b;
    wk->rows = mem ? mem + ((size_t)own_w + (size_t)own_b) * (size_t)stride : NULL;
    wk->mem = mem;
    return PN_OK;
}

/* w and b always set (ones and zeros when absent). */
static inline pn_status pn_work_init(pn_work *wk, const pn_token_args *a, int nbuf) {
    return pn_work_init_as(wk, a, nbuf, PN_FILL_W | PN_FILL_B);
}

/* w NULL for ones, b NULL for zeros when absent (the forward's epilogue);
 * half-precision w and b as given (wh, bh) where pn_params_as_given. */
static inline pn_status pn_work_init_lean(pn_work *wk, const pn_token_args *a, int nbuf) {
    return pn_work_init_as(wk, a, nbuf, PN_AS_GIVEN);
}

/* Row buffer k of the calling thread. */
static inline real *pn_work_row(const pn_work *wk, int k) {
    const int64_t t = wk->nthreads > 1 ? pn_thread_id() : 0;   /* one thread: no lookup */
    return wk->rows + (t * wk->nbuf + k) * wk->stride;
}

static inline void pn_work_free(pn_work *wk) { free(wk->mem); }

/* A half-precision forward row is read in its dtype: the sums convert it
 * block by block (simd.h), the y pieces again, so each value is converted
 * twice. Where the conversion costs more than reading a float back from L1/L2,
 * the row is instead converted once into the thread's row buffer, and the sums
 * and y read the floats (the same values: the same bits). That is float16
 * without AVX-512: F16C converts 8 values an instruction, and the generic
 * build one at a time (LayerNorm/RMSNorm f16 forwards in cache were 0.87-0.93x
 * with the double conversion on AVX2). bfloat16 widens by a shift, and
 * AVX-512 converts 16 float16 values an instruction: there the smaller
 * footprint wins. */
#ifdef __AVX512F__
#define PN_KEEP_F16_ROW 0
#else
#define PN_KEEP_F16_ROW 1
#endif
static inline int pn_keep_row(pn_dtype dt) { return PN_KEEP_F16_ROW && dt == PN_FLOAT16 && sizeof(real) == 4; }

/* Rows are written in pieces of PN_PIECE values (see pn_put_piece below). */
#define PN_PIECE 256

/* h = x + residual for row r of a fused forward, rounded to the dtype and
 * written to a->h, in pieces of PN_PIECE values (x and the residual of a
 * piece converted into xp and rp, PN_PIECE reals each, or widened in the
 * loop, pn_widen_in_loop). Returns h's row:
 * the norm reads h as stored, in its dtype, from there (in L1 or L2 now).
 * h may be x's or the residual's row: each piece is read before it is
 * written. */
static inline const void *pn_residual_row(const pn_token_args *a, int64_t r, real *xp, real *rp) {
    const size_t es = pn_dtype_size(a->dtype);
    const int64_t C = a->C;
    const char *xrow = (const char *)pn_row(a->inp, a->s.inp, r, a->T, es);
    const char *rrow = (const char *)pn_row(a->residual, a->s.residual, r, a->T, es);
    char *hrow = (char *)pn_row(a->h, a->s.h, r, a->T, es);
    for (int64_t i0 = 0; i0 < C; i0 += PN_PIECE) {
        const int64_t n = C - i0 < PN_PIECE ? C - i0 : PN_PIECE, off = i0 * (int64_t)es;
        if (a->dtype == PN_REAL_DTYPE) {
            const real *x = (const real *)(xrow + off), *res = (const real *)(rrow + off);
            real *h = (real *)(hrow + off);
            for (int64_t i = 0; i < n; i++) h[i] = x[i] + res[i];
            continue;
        }
        if (pn_widen_in_loop(a->dtype)) {
            const uint16_t *xb = (const uint16_t *)(const void *)(xrow + off);
            const uint16_t *rb = (const uint16_t *)(const void *)(rrow + off);
            for (int64_t i = 0; i < n; i++) xp[i] = (real)pn_bf16_to_float(xb[i]) + (real)pn_bf16_to_float(rb[i]);
        } else {
            const real *x = pn_row_as_real(xrow + off, a->dtype, xp, n);
            const real *res = pn_row_as_real(rrow + off, a->dtype, rp, n);
            for (int64_t i = 0; i < n; i++) xp[i] = x[i] + res[i];
        }
        pn_store_row(hrow + off, xp, a->dtype, n);
    }
    return hrow;
}

/* Ask for data that comes next while this is computed: rows are read once,
 * and the passes that work from L1 would otherwise leave the memory idle.
 * Always inlined: GCC takes a function whose only effect is a prefetch for a
 * pure one and deletes the calls. */
static PN_ALWAYS_INLINE void pn_prefetch(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)p + i, 0, 2);
}

/* Outputs of at least pn_stream_min_bytes() (larger than the last-level
 * cache, see runtime.c) are written with non-temporal stores: they go to
 * memory without first reading the lines they overwrite, and do not push the
 * inputs out of the cache. Smaller outputs stay cached for the caller, which
 * will read them soon. */

static inline void pn_stream_bytes(void *dst, const void *src, int64_t n) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
    int64_t i = 0;
#if defined(__x86_64__) || defined(_M_X64)
    int64_t head = (int64_t)((16 - ((uintptr_t)d & 15)) & 15);
    if (head > n) head = n;
    memcpy(d, s, (size_t)head);
    for (i = head; i + 16 <= n; i += 16)
        _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
#endif
    memcpy(d + i, s + i, (size_t)(n - i));
}

static inline void pn_stream_fence(void) {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_sfence();   /* non-temporal stores are visible to other threads after this */
#endif
}

/* Write a computed row y (reals) to dst in dtype dt: rounded, and streamed
 * when `stream`; tmp (C reals) holds the rounded row on the way. */
static inline void pn_write_row(void *dst, const real *y, pn_dtype dt, int64_t C, int stream, real *tmp) {
    if (!stream) {
        pn_store_row(dst, y, dt, C);
    } else if (dt == PN_REAL_DTYPE) {
        pn_stream_bytes(dst, y, C * (int64_t)sizeof(real));
    } else {
        pn_store_row(tmp, y, dt, C);
        pn_stream_bytes(dst, tmp, C * (int64_t)pn_dtype_size(dt));
    }
}

/* Rows are written in pieces of PN_PIECE values: each piece is computed
 * (into a small buffer when it must be rounded or streamed), written out, and
 * the same share of the next row's inputs is prefetched. The memory then reads
 * the next row while this one is written, instead of idling through the
 * passes that run from L1, and no whole-row buffer competes with x, w and b
 * for L1 (for long rows they would not all fit). Prefetching the whole next
 * row at once instead stalls the core on its own prefetches. Keep the per-row
 * work in small functions: inlined into one large loop body, GCC allocated
 * registers badly and the same loops ran up to 40% slower. */

/* Far prefetch. When a call's buffers take more than 3/4 of the last-level
 * cache (which holds other data too), its rows come from memory, and the
 * next row is too little warning for short rows (3 KiB at C = 768 float32):
 * the core then waits on the loads of x and on the reads that ordinary
 * stores make of the output lines they overwrite. Each piece then also
 * prefetches the same share of the inputs PN_READ_AHEAD bytes of rows on
 * and, for writing, of the output PN_WRITE_AHEAD bytes on (not when the
 * output is streamed: non-temporal stores read nothing). Measured on
 * LayerNorm at (8192, 768) float32, 2 threads, each call after a torch call
 * on the same x: 1.16-1.43x faster (bench/compare_builds.py --after-torch);
 * half-precision rows at (4096, 4096) and (1024, 16384): 1.1-1.5x. Calls
 * whose buffers fit in the cache skip it: there it cost 5-10%. */
#define PN_READ_AHEAD 12288
#define PN_WRITE_AHEAD 6144

typedef struct { int64_t read, write; } pn_ahead;   /* rows ahead; 0: no far prefetch */

/* For a call moving `buffers` row-sized buffers (forward 2, fused forward 4,
 * backward 3) whose output is streamed or not. */
static inline pn_ahead pn_ahead_rows(const pn_token_args *a, int buffers, int stream) {
    const int64_t row_bytes = a->C * (int64_t)pn_dtype_size(a->dtype);
    pn_ahead h = {0, 0};
    const double bytes = (double)buffers * (double)(a->B * a->T) * (double)row_bytes;
    if (4 * bytes < 3 * (double)pn_stream_min_bytes()) return h;   /* within 3/4 of the cache: it may hold them */
    h.read = (PN_READ_AHEAD + row_bytes - 1) / row_bytes;
    if (h.read < 2) h.read = 0;   /* the next row: prefetched anyway */
    h.write = stream ? 0 : (PN_WRITE_AHEAD + row_bytes - 1) / row_bytes;
    return h;
}

/* The rows a row's pieces prefetch a share of. */
typedef struct {
    const char *row[2];   /* the next row's x and `other` input, into L1 */
    const char *far[2];   /* x and `other` of the row ahead.read rows on (NULL: none) */
    char *out[2];         /* the output rows ahead.write rows on, for writing: y (or dx), and h of a
                             fused forward (NULL: none) */
    int64_t es;
} pn_next_rows;

/* For row r: row r + 1's x and its `other` input (the residual of a fused
 * forward, dy in a backward; NULL: none) when r + 1 < end, and the far rows
 * of `ahead` within the call's rows (out: the output buffer, NULL: none). */
static inline pn_next_rows pn_next_rows_after(const pn_token_args *a, int64_t r, int64_t end,
                                              const void *other, pn_rowmap other_s,
                                              pn_ahead ahead, void *out, pn_rowmap out_s) {
    const size_t es = pn_dtype_size(a->dtype);
    const int64_t rows = a->B * a->T;
    pn_next_rows nx = {{NULL, NULL}, {NULL, NULL}, {NULL, NULL}, (int64_t)es};
    if (r + 1 < end) {
        nx.row[0] = (const char *)pn_row(a->inp, a->s.inp, r + 1, a->T, es);
        if (other) nx.row[1] = (const char *)pn_row(other, other_s, r + 1, a->T, es);
    }
    if (ahead.read && r + ahead.read < rows) {
        nx.far[0] = (const char *)pn_row(a->inp, a->s.inp, r + ahead.read, a->T, es);
        if (other) nx.far[1] = (const char *)pn_row(other, other_s, r + ahead.read, a->T, es);
    }
    if (ahead.write && out && r + ahead.write < rows) nx.out[0] = (char *)pn_row(out, out_s, r + ahead.write, a->T, es);
    return nx;
}

/* Values [i0, i0 + n) of the next rows: the near ones into L1, their passes
 * start soon; the far ones on their way. */
static PN_ALWAYS_INLINE void pn_prefetch_share(const pn_next_rows *nx, int64_t i0, int64_t n) {
    const int64_t off = i0 * nx->es, bytes = n * nx->es;
    for (int k = 0; k < 2; k++) {
        if (nx->row[k])
            for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(nx->row[k] + off + i, 0, 3);
        if (nx->far[k])
            for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(nx->far[k] + off + i, 0, 3);
    }
    for (int k = 0; k < 2; k++)
        if (nx->out[k])
            for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(nx->out[k] + off + i, 1, 3);
}

/* Where the pieces of a forward row go. */
typedef struct {
    char *dst;              /* the output row */
    pn_dtype dt;
    int stream;
    pn_next_rows next;      /* x of the next rows; the residual too when fused (next.es: the dtype's size) */
} pn_row_out;

static inline pn_row_out pn_row_out_init(const pn_token_args *a, int64_t r, int fused, int stream, pn_ahead ahead) {
    const size_t es = pn_dtype_size(a->dtype);
    pn_row_out o = {a->out ? (char *)pn_row(a->out, a->s.out, r, a->T, es) : NULL, a->dtype, stream,
                    pn_next_rows_after(a, r, a->B * a->T, fused ? a->residual : NULL, a->s.residual,
                                       ahead, a->out, a->s.out)};
    if (fused && o.next.out[0])   /* h is written too */
        o.next.out[1] = (char *)pn_row(a->h, a->s.h, r + ahead.write, a->T, es);
    return o;
}

static inline int64_t pn_piece_len(int64_t C, int64_t i0) { return C - i0 < PN_PIECE ? C - i0 : PN_PIECE; }

/* Piece y[0..n) of the row, at i0, computed: write it (tmp: PN_PIECE reals)
 * and prefetch the same share of the next row. */
static PN_ALWAYS_INLINE void pn_put_piece(const pn_row_out *o, int64_t i0, const real *y, int64_t n, real *tmp,
                                          int in_place) {
    if (!in_place) pn_write_row(o->dst + i0 * o->next.es, y, o->dt, n, o->stream, tmp);
    pn_prefetch_share(&o->next, i0, n);
}

/* Scratch for backward partial sums, aligned to 64 bytes (the size query adds
 * the slack). */
static inline real *pn_scratch_reals(void *scratch) {
    uintptr_t p = ((uintptr_t)scratch + 63) & ~(uintptr_t)63;
    return (real *)p;
}

#include "epilogue.h"

/* The forward of one row, and what every row of one call shares. */
typedef struct {
    const pn_token_args *a;
    const pn_work *wk;
    pn_ahead ahead;
    double eps, inv_C;
    int fused, stream, in_place;
    pn_epilogue ep;         /* xhat -> y */
} pn_fwd_call;
typedef void (*pn_fwd_row)(const pn_fwd_call *c, int64_t r);

/* row(c, r) for every row: on wk->nthreads threads, or in a plain loop for one.
 * A parallel region costs a team set-up even with one thread (about 0.25 us, a
 * sixth of the C time of a LayerNorm call on one float32 row of 4096), and
 * small calls run on one thread (PN_PARALLEL_MIN_ELEMS). */
static inline void pn_fwd_rows(const pn_fwd_call *c, pn_fwd_row row) {
    const int64_t rows = c->a->B * c->a->T;
    if (c->wk->nthreads > 1) {
#pragma omp parallel for schedule(static) num_threads(c->wk->nthreads)
        for (int64_t r = 0; r < rows; r++) row(c, r);
    } else {
        for (int64_t r = 0; r < rows; r++) row(c, r);
    }
}

/* A forward call, plain or fused (h = x + residual first), of a norm with or
 * without a bias: row(c, r) for every row. */
static inline pn_status pn_forward_call(const pn_token_args *a, int fused, int bias, pn_fwd_row row) {
    const int64_t rows = a->B * a->T, C = a->C;
    const int stream = !a->q && rows * C * (int64_t)pn_dtype_size(a->dtype) >= pn_stream_min_bytes();
    pn_work wk;
    /* row buffers: 0 for a half precision row as floats (pn_keep_row, the
     * two-pass or double sums), 1 for the whole row's y of a quantized output */
    pn_status st = pn_work_init_lean(&wk, a, a->q ? 2 : a->dtype == PN_REAL_DTYPE ? 0 : 1);
    if (st) return st;
    /* y computed in place in the output when it holds reals and is not streamed */
    const pn_fwd_call c = {a, &wk, pn_ahead_rows(a, fused ? 4 : 2, stream), a->eps, 1 / (double)C,
                           fused, stream, a->dtype == PN_REAL_DTYPE && !stream && !a->q,
                           pn_epilogue_init(a, &wk, bias)};
    pn_fwd_rows(&c, row);
    if (stream) pn_stream_fence();
    pn_work_free(&wk);
    return PN_OK;
}

/* A forward row's input: what the op's statistics and y read. */
typedef struct {
    const char *src;    /* the row in its dtype: x, or h as stored (fused) */
    const void *row;    /* what the sums read, in dtype dt: src, or its floats in buf (pn_keep_row) */
    pn_dtype dt;
    int kept;
    real *buf;          /* the thread's row buffer (C reals; NULL for rows of reals) */
} pn_fwd_in;

/* Row r's input: x, or h = x + residual written to a->h and read back as
 * stored; converted once into the row buffer where pn_keep_row says. */
static inline pn_fwd_in pn_fwd_input(const pn_fwd_call *c, int64_t r) {
    const pn_token_args *a = c->a;
    const size_t es = pn_dtype_size(a->dtype);
    pn_fwd_in in;
    in.buf = c->wk->nbuf ? pn_work_row(c->wk, 0) : NULL;
    if (c->fused) {
        real xp[PN_PIECE], rp[PN_PIECE];
        in.src = (const char *)pn_residual_row(a, r, xp, rp);
    } else {
        in.src = (const char *)pn_row(a->inp, a->s.inp, r, a->T, es);
    }
    in.kept = pn_keep_row(a->dtype);
    if (in.kept) pn_load_row(in.buf, in.src, a->dtype, a->C);
    in.row = in.kept ? (const void *)in.buf : (const void *)in.src;
    in.dt = in.kept ? PN_REAL_DTYPE : a->dtype;
    return in;
}

/* A row's statistics for y: xhat = ((x - shift) - m) * rstd (RMSNorm: shift = m = 0). */
typedef struct { real shift, m, rstd; } pn_row_stats;

/* y[0..n) from x[0..n), columns [i0, i0 + n) of a row: the op's math. Kept
 * out of line (PN_Y_PIECE): inlined into the row's loop with its conversions,
 * the RMSNorm float16 forward ran 10-12% slower on AVX-512 (GCC 12). */
#if defined(__GNUC__)
#define PN_Y_PIECE static __attribute__((noinline)) void
#else
#define PN_Y_PIECE static void
#endif
typedef void (*pn_y_piece)(real *y, const real *x, const pn_row_stats *s, const pn_epilogue *e, int64_t i0, int64_t n);
/* The same from a bfloat16 x, widened in the loop (a shift in registers): no
 * pass that widens the piece into a buffer and reads it back. */
typedef void (*pn_y_piece_bf16)(real *y, const uint16_t *x, const pn_row_stats *s, const pn_epilogue *e, int64_t i0,
                                int64_t n);

/* Row r's y, in pieces: each piece's x (converted from the row's dtype, or
 * the kept floats; a bfloat16 row is read by y_bf16 as it is), the weight
 * and bias (their share converted where pn_params_as_given), y_piece's
 * values in the output itself, or rounded when
 * written, or in the quantized output's row buffer (then quantized as a whole
 * row: its groups' amax first); each piece prefetches the same share of the
 * next rows. */
static PN_ALWAYS_INLINE void pn_fwd_output(const pn_fwd_call *c, int64_t r, const pn_fwd_in *in,
                                          const pn_row_stats *s, pn_y_piece y_piece, pn_y_piece_bf16 y_bf16) {
    const pn_token_args *a = c->a;
    const int64_t C = a->C, es = (int64_t)pn_dtype_size(a->dtype);
    real *qrow = a->q ? pn_work_row(c->wk, 1) : NULL;
    const pn_row_out out = pn_row_out_init(a, r, c->fused, c->stream, c->ahead);
    const void *wh = c->wk->wh, *bh = c->wk->bh;
    const int64_t wes = (int64_t)pn_dtype_size(a->wdtype);
    for (int64_t i0 = 0; i0 < C; i0 += PN_PIECE) {
        const int64_t n = pn_piece_len(C, i0);
        real piece[PN_PIECE], tmp[PN_PIECE], xp[PN_PIECE], wp[PN_PIECE], bp[PN_PIECE];
        real *y = qrow ? qrow + i0 : c->in_place ? (real *)out.dst + i0 : piece;
        const pn_epilogue *e = &c->ep;
        pn_epilogue eg;
        int64_t j0 = i0;   /* the column of the piece in e's weight and bias */
        if (wh || bh) {   /* the piece's weight and bias as given: converted here, from column 0 of them */
            eg = c->ep;
            if (wh) pn_load_row(wp, (const char *)wh + i0 * wes, a->wdtype, n);
            if (bh) pn_load_row(bp, (const char *)bh + i0 * wes, a->wdtype, n);
            eg.w = wh ? wp : NULL;
            eg.b = bh ? bp : NULL;
            e = &eg;
            j0 = 0;
        }
        if (!in->kept && pn_widen_in_loop(a->dtype)) {
            y_bf16(y, (const uint16_t *)(const void *)in->src + i0, s, e, j0, n);
        } else {
            const real *x = in->kept ? in->buf + i0 : pn_row_as_real(in->src + i0 * es, a->dtype, xp, n);
            y_piece(y, x, s, e, j0, n);
        }
        if (qrow) pn_prefetch_share(&out.next, i0, n);
        else pn_put_piece(&out, i0, y, n, tmp, c->in_place);
    }
    if (qrow) pn_quantize_row(a, r, qrow);
}

/* dparam = (accumulate ? dparam : 0) + sum over chunks of part[c * pstride + i],
 * the chunks added in order in double precision. Parallel over columns; on
 * one thread in a plain loop (no parallel region: see pn_fwd_rows). */
enum { PN_REDUCE_BLK = 256 };
static inline void pn_reduce_block(void *dparam, pn_dtype wdtype, int accumulate, const real *part,
                                   int64_t nchunks, int64_t pstride, int64_t C, int64_t k) {
    const int64_t i0 = k * PN_REDUCE_BLK, n = C - i0 < PN_REDUCE_BLK ? C - i0 : PN_REDUCE_BLK;
    const size_t wes = pn_dtype_size(wdtype);
    double acc[PN_REDUCE_BLK];
    real v[PN_REDUCE_BLK];
    for (int64_t i = 0; i < n; i++) acc[i] = 0;
    for (int64_t c = 0; c < nchunks; c++) {
        const real *p = part + c * pstride + i0;
        for (int64_t i = 0; i < n; i++) acc[i] += (double)p[i];
    }
    char *dst = (char *)dparam + i0 * (int64_t)wes;
    if (accumulate) {
        pn_load_row(v, dst, wdtype, n);
        for (int64_t i = 0; i < n; i++) v[i] = (real)((double)v[i] + acc[i]);
    } else {
        for (int64_t i = 0; i < n; i++) v[i] = (real)acc[i];
    }
    pn_store_row(dst, v, wdtype, n);
}

/* dweight and dbias (either may be NULL) from their chunks' partials (dbias's
 * at part + boff), in one parallel region: blocks 0..nblk-1 are dweight's,
 * nblk..2*nblk-1 dbias's. A region that loses a thread to other load waits
 * milliseconds, and LayerNorm's backward had three where torch's has two. */
static inline void pn_reduce_param_block(void *dweight, void *dbias, pn_dtype wdtype, int accumulate,
                                         const real *part, int64_t boff, int64_t nchunks, int64_t pstride,
                                         int64_t C, int64_t nblk, int64_t k) {
    if (k < nblk) pn_reduce_block(dweight, wdtype, accumulate, part, nchunks, pstride, C, k);
    else pn_reduce_block(dbias, wdtype, accumulate, part + boff, nchunks, pstride, C, k - nblk);
}

static inline void pn_reduce_chunks(void *dweight, void *dbias, pn_dtype wdtype, int accumulate,
                                    const real *part, int64_t boff, int64_t nchunks, int64_t pstride,
                                    int64_t C, int nthreads) {
    const int64_t nblk = (C + PN_REDUCE_BLK - 1) / PN_REDUCE_BLK;
    const int64_t first = dweight ? 0 : nblk, end = dbias ? 2 * nblk : nblk;
    if (nthreads > 1 && end - first > 1) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t k = first; k < end; k++)
            pn_reduce_param_block(dweight, dbias, wdtype, accumulate, part, boff, nchunks, pstride, C, nblk, k);
    } else {
        for (int64_t k = first; k < end; k++)
            pn_reduce_param_block(dweight, dbias, wdtype, accumulate, part, boff, nchunks, pstride, C, nblk, k);
    }
}

/* A backward whose rows are one chunk, with the parameter gradients in the
 * compute type and overwritten, sums them straight into dweight and dbias:
 * pn_reduce_chunks would only have copied them (0 + one partial in double,
 * back to `real`: the same value; the partials are never -0, each starts as
 * 0 + v). Zeroing the partials, adding into them and the reduction were a
 * third to a half of a one-row backward (LayerNorm (1, 4096) float32: dx,
 * dw and db 13.3 us against dx alone 7.2 us). */
static inline int pn_direct_params(const pn_token_args *a, int64_t nchunks) {
    return (a->dweight || a->dbias) && nchunks == 1 && !a->accumulate && a->wdtype == PN_REAL_DTYPE;
}

/* Where the backward computes piece [i0, i0 + n) of dx of row r: straight
 * into a->dinp when that holds `real`s, is overwritten and not streamed, else
 * into `piece`, which pn_finish_dx_piece then adds to the old dx (when
 * accumulating) and writes (tmp: PN_PIECE reals). */
static inline int pn_dx_direct(const pn_token_args *a, int stream) {
    return a->dtype == PN_REAL_DTYPE && !a->accumulate && !stream;
}
static inline real *pn_dx_piece(const pn_token_args *a, int64_t r, int64_t i0, real *piece, int stream) {
    if (pn_dx_direct(a, stream)) return (real *)pn_row(a->dinp, a->s.dinp, r, a->T, sizeof(real)) + i0;
    return piece;
}
static inline void pn_finish_dx_piece(const pn_token_args *a, int64_t r, int64_t i0, real *dx, int64_t n,
                                      real *tmp, int stream) {
    const size_t es = pn_dtype_size(a->dtype);
    if (pn_dx_direct(a, stream)) return;   /* written in place */
    char *dst = (char *)pn_row(a->dinp, a->s.dinp, r, a->T, es) + i0 * (int64_t)es;
    if (a->accumulate) {
        pn_load_row(tmp, dst, a->dtype, n);
        for (int64_t i = 0; i < n; i++) dx[i] += tmp[i];
    }
    pn_write_row(dst, dx, a->dtype, n, stream, tmp);
}

#endif /* PYNORM_KERNEL_H */
