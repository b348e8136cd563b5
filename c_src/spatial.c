/* spatial.c - the engines of the spatial norms (GroupNorm, InstanceNorm,
 * BatchNorm; see spatial.h for how they cut the work into pieces and sets):
 * the NCHW engine, which walks sets of rows, and the NHWC engine, which walks
 * pieces of rows with one accumulator per channel. groupnorm.c and
 * batchnorm.c call them with their own sets. Compiled once per (instruction
 * set, compute type), like the op files, and only there: the public
 * functions live in the op files.
 */
#include "spatial.h"

#ifdef PN_KERNEL_BUILD

/* ---- working memory ----------------------------------------------------------
 * One malloc per call, before any output is written, carved into arrays of
 * reals (each 64-byte aligned): weight and bias as reals (ones and zeros when
 * absent, so that the inner loops need no branches), the engine's arrays, and
 * per-thread buffers. */
typedef struct {
    real *mem;
    int64_t used;
    size_t bytes;
} pn_sp_mem;

static inline real *pn_sp_take(pn_sp_mem *m, int64_t n) {
    real *p = m->mem + m->used;
    m->used += pn_sp_pad(n);
    return p;
}

/* The reals that n doubles take, and an array of n doubles from the block. */
static inline int64_t pn_sp_dreals(int64_t n) { return n * (int64_t)(sizeof(double) / sizeof(real)); }
static inline double *pn_sp_take_d(pn_sp_mem *m, int64_t n) { return (double *)pn_sp_take(m, pn_sp_dreals(n)); }

/* Threads for a call over `elems` values. */
static inline int pn_sp_threads(int64_t elems) {
    int nt = pn_threads();
    return (elems < PN_PARALLEL_MIN_ELEMS || nt < 1) ? 1 : nt;
}

/* From the library's buffer cache (64-byte aligned; large blocks are reused
 * from call to call instead of being faulted in afresh). */
static inline pn_status pn_sp_alloc(pn_sp_mem *m, int64_t reals) {
    m->bytes = (size_t)reals * sizeof(real);
    m->mem = (real *)pn_buffer_alloc(m->bytes);
    m->used = 0;
    return m->mem ? PN_OK : PN_ERR_ALLOC;
}

static inline void pn_sp_release(pn_sp_mem *m) { pn_buffer_free(m->mem, m->bytes); }

/* Scheduling. Which thread works on what never changes a result, so the
 * loops hand out work dynamically: on a busy machine a thread that was
 * preempted does not hold the others up. Set-local loops give a thread runs
 * of consecutive sets, and loops over NHWC pieces runs of pieces (consecutive
 * memory, which the hardware prefetcher follows; software prefetches of the
 * next set measured slower); loops over sub-rows give each about 16K values
 * at a time. */
static inline int64_t pn_sp_local_chunk(int64_t nsets, int nt) {
    const int64_t k = nsets / (8 * (int64_t)nt);
    return k < 1 ? 1 : k;
}
static inline int64_t pn_sp_unit_chunk(int64_t S) {
    const int64_t k = 16384 / (S < PN_SP_PIECE ? S : PN_SP_PIECE);
    return k < 1 ? 1 : k;
}

/* w and b (C reals each) from the call's weight and bias. */
static inline void pn_sp_params(const pn_spatial_args *a, real *w, real *b) {
    if (a->weight) pn_load_row(w, a->weight, a->wdtype, a->C);
    else for (int64_t c = 0; c < a->C; c++) w[c] = 1;
    if (b) {
        if (a->bias) pn_load_row(b, a->bias, a->wdtype, a->C);
        else for (int64_t c = 0; c < a->C; c++) b[c] = 0;
    }
}

/* One value of a buffer of dtype dt, as a real. */
static inline real pn_sp_value(const void *p, pn_dtype dt, int64_t i) {
    real v = 0;
    pn_load_row(&v, (const char *)p + i * (int64_t)pn_dtype_size(dt), dt, 1);
    return v;
}

/* Neumaier's compensated sum: *s + *c holds the running total with about
 * twice double's precision (a float64 set's mean merged in double over a few
 * hundred pieces drifted by up to 5 ulps). The same operations in the same
 * order in every build: the bits do not depend on the instruction set. */
static inline void pn_sp_kadd(double *s, double *c, double v) {
    const double t = *s + v;
    *c += fabs(*s) >= fabs(v) ? (*s - t) + v : (v - t) + *s;
    *s = t;
}

/* Merges np pieces' (mean, M2) pairs, st[p * step] and st[p * step + 1]
 * (of x - shift, in double; M2 about the piece's mean). Pieces come in runs
 * of `per`: each holds `full` values but the last of a run, which holds
 * `tail`. The mean is the compensated total of the pieces' sums (mean times
 * count) over the count; then M2 = sum(M2_p) + sum(n_p (mean_p - mean)^2)
 * with that mean (Chan et al.'s combination, done once instead of piece by
 * piece). Returns the mean and the biased variance. */
static inline void pn_sp_merge(const double *st, int64_t np, int64_t step, int64_t per, int64_t full,
                               int64_t tail, double *mean, double *var) {
    if (np == 1) {   /* what the loops give for one piece, without their roundings */
        *mean = st[0];
        *var = st[1] / (double)tail;
        return;
    }
    double s = 0, c = 0, n = 0, M2 = 0;
    for (int64_t p = 0; p < np; p++) {
        const double nb = (double)(p % per == per - 1 ? tail : full);
        pn_sp_kadd(&s, &c, st[p * step] * nb);
        n += nb;
    }
    const double m = (s + c) / n;
    for (int64_t p = 0; p < np; p++) {
        const double nb = (double)(p % per == per - 1 ? tail : full), d = st[p * step] - m;
        M2 += st[p * step + 1] + d * d * nb;
    }
    *mean = m;
    *var = M2 / n;
}

/* A set's statistics are ready: shift + m is its mean, var its (biased)
 * variance. Writes the saved statistics (slot k) and, in BatchNorm training,
 * updates the running statistics of channel k as torch does:
 *   running = (1 - momentum) * running + momentum * batch, var unbiased n/(n-1).
 * Returns rstd. */
static inline real pn_sp_finish(const pn_spatial_args *a, int64_t k, real shift, double m, double var,
                                int64_t count) {
    const double mean = (double)shift + m;
    const real rstd = (real)(1.0 / sqrt(var + a->eps));
    if (a->mean) ((real *)a->mean)[k] = (real)mean;
    if (a->rstd) ((real *)a->rstd)[k] = rstd;
    if (a->running_mean || a->running_var) {
        const double f = a->momentum;
        real v;
        if (a->running_mean) {
            v = (real)(f * mean + (1 - f) * (double)pn_sp_value(a->running_mean, a->rdtype, k));
            pn_store_row((char *)a->running_mean + k * (int64_t)pn_dtype_size(a->rdtype), &v, a->rdtype, 1);
        }
        if (a->running_var) {
            const double unbiased = var * (double)count / (double)(count - 1);
            v = (real)(f * unbiased + (1 - f) * (double)pn_sp_value(a->running_var, a->rdtype, k));
            pn_store_row((char *)a->running_var + k * (int64_t)pn_dtype_size(a->rdtype), &v, a->rdtype, 1);
        }
    }
    return rstd;
}

/* The output pass's two forms. y = ((x - shift) - m) * a + b, with
 * a = rstd * w[c] rounded and mean = shift + m (shift: a value of the set,
 * exact), keeps the digits of data whose mean is far from zero in standard
 * deviations; y = x * a + beta, beta = b - mean * a (in double, rounded
 * once), is one multiply and one add a value. With u the unit roundoff of
 * the compute type, the folded form's error exceeds the other's by at most
 * u (2 |mean| |a| + |b|) = u |w| 2 |mean| rstd + u |b| (x * a rounds
 * |x| |a| <= (|x - mean| + |mean|) |a|, beta rounds |b| + |mean| |a|).
 * Half-precision outputs (compute type float, u = 2^-24) fold the sets where
 * |mean| * rstd <= PN_SP_FOLD = 256: the excess is then at most 2^-15 |w|,
 * 1/16 of float16's rounding of a value of |w| (one standard deviation of
 * y; u = 2^-11) and 1/64 of bfloat16's (2^-9), so that the stored value is
 * the current form's but where the float lies that close to a rounding
 * boundary, and then one ulp away. The decision depends on the set's
 * statistics alone (NaN and Inf take the first form), so every thread count
 * and instruction set folds the same sets; folded values are written as
 * ((x - 0) - 0) * a + beta where a loop computes both forms, which is
 * x * a + beta bit for bit. float32 and float64 outputs keep the first form
 * (their own rounding is u: a fold would show). */
#define PN_SP_FOLD 256.0
static inline int pn_sp_fold(const pn_spatial_args *a, double mean, real rstd) {
    return (a->dtype == PN_BFLOAT16 || a->dtype == PN_FLOAT16) && fabs(mean) * (double)rstd <= PN_SP_FOLD;
}

/* beta of the folded form for bias b and scale sc. */
static inline real pn_sp_beta(real b, double mean, real sc) { return (real)((double)b - mean * (double)sc); }

/* Outputs are streamed (non-temporal stores, see kernel.h) when the call is
 * large and the blocks written at a time are long: a short block would leave
 * partial cache lines to the write-combining buffers, far slower than
 * ordinary stores. */
#define PN_SP_STREAM_BLOCK 4096
static inline int pn_sp_stream(const pn_spatial_args *a, int64_t block) {
    const int64_t es = (int64_t)pn_dtype_size(a->dtype);
    return a->N * a->C * a->S * es >= pn_stream_min_bytes() && block * es >= PN_SP_STREAM_BLOCK;
}

/* ---- row sums (NCHW) ------------------------------------------------------------
 * Long rows use simd.h's 64-lane sums. Rows shorter than PN_SP_SHORT_MAX
 * values (7x7 or 8x8 feature maps) use 16 lanes: 64 would cost more in their
 * tail and final tree than in the sum. The order of additions depends on the
 * row length alone. */
#define PN_SP_SHORT 16
#define PN_SP_SHORT_MAX 256

/* The 16 lanes added in a fixed tree (8 + 8, 4 + 4, 2 + 2, 1 + 1), spelled
 * out: written as a loop over the widths, gcc keeps the tree as scalar
 * additions through memory, which costs more than the sums of a short row. */
static inline real pn_sp_short_total(real *acc) {
    for (int j = 0; j < 8; j++) acc[j] += acc[j + 8];
    for (int j = 0; j < 4; j++) acc[j] += acc[j + 4];
    for (int j = 0; j < 2; j++) acc[j] += acc[j + 2];
    return acc[0] + acc[1];
}

/* sum of (x[i] - shift) */
static inline real pn_sp_sum_shifted(const real *x, int64_t n, real shift) {
    if (n >= PN_SP_SHORT_MAX) return pn_sum_shifted(x, n, shift);
    real acc[PN_SP_SHORT] = {0};
    int64_t i = 0;
    for (; i + PN_SP_SHORT <= n; i += PN_SP_SHORT)
        for (int j = 0; j < PN_SP_SHORT; j++) acc[j] += x[i + j] - shift;
    for (int j = 0; i + j < n; j++) acc[j] += x[i + j] - shift;
    return pn_sp_short_total(acc);
}

/* sum of ((x[i] - shift) - m)^2 */
static inline real pn_sp_sumsq_centered(const real *x, int64_t n, real shift, real m) {
    if (n >= PN_SP_SHORT_MAX) return pn_sumsq_centered(x, n, shift, m);
    real acc[PN_SP_SHORT] = {0};
    int64_t i = 0;
    for (; i + PN_SP_SHORT <= n; i += PN_SP_SHORT)
        for (int j = 0; j < PN_SP_SHORT; j++) { real d = (x[i + j] - shift) - m; acc[j] += d * d; }
    for (int j = 0; i + j < n; j++) { real d = (x[i + j] - shift) - m; acc[j] += d * d; }
    return pn_sp_short_total(acc);
}

/* ==== NCHW engine (pn_sp_sets: spatial.h) ===================================== */

/* The first row of a set, and the set of row r (GroupNorm: r / (C/G); BatchNorm: r % C). */
static inline int64_t pn_sp_first(const pn_sp_sets *ss, int64_t set) { return ss->step == 1 ? set * ss->count : set; }
static inline int64_t pn_sp_set_of(const pn_sp_sets *ss, int64_t r) {
    return ss->step == 1 ? r / ss->count : r % ss->step;
}

/* From row r to row r + 1: its set, channel, and index j within its set
 * (GroupNorm), without a division. */
static inline void pn_sp_next_row(const pn_sp_sets *ss, int64_t C, int64_t *set, int64_t *c, int64_t *j) {
    if (++*c == C) *c = 0;
    if (ss->step != 1) *set = *c;
    else if (++*j == ss->count) { *j = 0; ++*set; }
}

/* Unit u of rp per row: row index j = u / rp and sub-row k = u % rp (no
 * division for short rows, rp = 1). */
static inline int64_t pn_sp_unit_row(int64_t u, int64_t rp) { return rp == 1 ? u : u / rp; }
static inline int64_t pn_sp_unit_sub(int64_t u, int64_t rp) { return rp == 1 ? 0 : u % rp; }

/* Pieces of a set: a piece is one part of PN_SP_PIECE values of a long
 * segment (`rp` pieces per segment) or `rpp` whole short segments. */
typedef struct {
    int64_t seg, nseg, rp, rpp, np;   /* np: pieces per set */
} pn_sp_nchw_pieces;

static inline pn_sp_nchw_pieces pn_sp_nchw_layout(const pn_spatial_args *a, const pn_sp_sets *ss) {
    pn_sp_nchw_pieces q;
    q.nseg = ss->step == 1 ? 1 : ss->count;
    q.seg = ss->step == 1 ? ss->count * a->S : a->S;
    q.rp = pn_sp_row_pieces(q.seg);
    q.rpp = pn_sp_rows_per_piece_nchw(q.seg);
    q.np = q.rp > 1 ? q.nseg * q.rp : pn_sp_cdiv(q.nseg, q.rpp);
    return q;
}

/* Piece p of a set: segments j0..j1-1 of the set, values i0..i1-1 of each. */
static inline void pn_sp_nchw_piece(const pn_sp_nchw_pieces *q, int64_t p, int64_t *j0, int64_t *j1,
                                    int64_t *i0, int64_t *i1) {
    if (q->rp > 1) {
        *j0 = p / q->rp;
        *j1 = *j0 + 1;
        *i0 = (p % q->rp) * PN_SP_PIECE;
        *i1 = *i0 + PN_SP_PIECE < q->seg ? *i0 + PN_SP_PIECE : q->seg;
    } else {
        *j0 = p * q->rpp;
        *j1 = *j0 + q->rpp < q->nseg ? *j0 + q->rpp : q->nseg;
        *i0 = 0;
        *i1 = q->seg;
    }
}

/* Mean and M2 of (x - shift) over piece p of a set, st[0], st[1]: two passes
 * while the piece is in cache. Each segment's part is summed in lanes of
 * reals; the parts (up to PN_SP_PIECE of them, BatchNorm's short rows) are
 * added in double, compensated: in reals, thousands of them in a row lost
 * several ulps of the mean. The mean is their total over the count in
 * double; M2 is taken about it rounded to a real (M2 about the exact mean
 * differs by the count times the square of their difference, far below M2's
 * rounding). buf: PN_SP_PIECE reals (conversions). */
static inline void pn_sp_nchw_piece_stats(const pn_spatial_args *a, const pn_sp_sets *ss,
                                          const pn_sp_nchw_pieces *q, int64_t set, int64_t p,
                                          real shift, real *buf, double *st) {
    const size_t es = pn_dtype_size(a->dtype);
    const int64_t S = a->S, first = pn_sp_first(ss, set);   /* segment j starts at row first + j * step */
    int64_t j0, j1, i0, i1;
    pn_sp_nchw_piece(q, p, &j0, &j1, &i0, &i1);
    const int64_t n = i1 - i0;
    const int native = a->dtype == PN_REAL_DTYPE;
    double sum = 0, comp = 0;
    for (int64_t j = j0; j < j1; j++) {
        const char *row = (const char *)a->inp + ((first + j * ss->step) * S + i0) * (int64_t)es;
        if (j + 1 < j1) pn_prefetch(row + ss->step * S * (int64_t)es, n * (int64_t)es);
        const double v = pn_sp_sum_shifted(pn_row_as_real(row, a->dtype, buf + (j - j0) * n, n), n, shift);
        if (j == j0) sum = v;   /* GroupNorm: the only segment */
        else pn_sp_kadd(&sum, &comp, v);
    }
    const double mean = (sum + comp) / (double)((j1 - j0) * n);
    const real m = (real)mean;
    double M2 = 0;   /* second pass: the rows as reals, from cache (or from buf) */
    for (int64_t j = j0; j < j1; j++) {
        const char *row = (const char *)a->inp + ((first + j * ss->step) * S + i0) * (int64_t)es;
        M2 += (double)pn_sp_sumsq_centered(native ? (const real *)row : buf + (j - j0) * n, n, shift, m);
    }
    st[0] = mean;
    st[1] = M2;
}

/* y = ((x - shift) - m) * scale + bias for n values of dtype dt, rounded once
 * and not streamed: half-precision values in runs of PN_SP_CB converted in
 * registers (y may be x itself: a run is read before it is written). With
 * shift and m zero (a folded set, pn_sp_fold) the loop is x * scale + bias,
 * the same bits in fewer operations. */
static PN_ALWAYS_INLINE void pn_sp_norm_run_dt(pn_dtype dt, const char *x, char *y, int64_t n, real shift, real m,
                                               real scale, real bias) {
    if (dt == PN_REAL_DTYPE) {
        const real *xs = (const real *)x;
        real *ys = (real *)y;
        for (int64_t i = 0; i < n; i++) ys[i] = ((xs[i] - shift) - m) * scale + bias;
        return;
    }
    const int64_t es = (int64_t)pn_dtype_size(dt);
    int64_t i = 0;
    if (shift == 0 && m == 0) {
        for (; i + PN_SP_CB <= n; i += PN_SP_CB) {
            real v[PN_SP_CB];
            pn_load_run(v, x + i * es, dt, PN_SP_CB);
            for (int j = 0; j < PN_SP_CB; j++) v[j] = v[j] * scale + bias;
            pn_store_run(y + i * es, v, dt, PN_SP_CB);
        }
    }
    for (; i + PN_SP_CB <= n; i += PN_SP_CB) {
        real v[PN_SP_CB];
        pn_load_run(v, x + i * es, dt, PN_SP_CB);
        for (int j = 0; j < PN_SP_CB; j++) v[j] = ((v[j] - shift) - m) * scale + bias;
        pn_store_run(y + i * es, v, dt, PN_SP_CB);
    }
    if (i < n) {   /* the last, partial run: dtype.h's conversions (vectors of 8 where they can) */
        real v[PN_SP_CB];
        const int k = (int)(n - i);
        pn_load_row(v, x + i * es, dt, k);
        for (int j = 0; j < k; j++) v[j] = ((v[j] - shift) - m) * scale + bias;
        pn_store_row(y + i * es, v, dt, k);
    }
}

static void pn_sp_norm_run(pn_dtype dt, const char *x, char *y, int64_t n, real shift, real m, real scale,
                           real bias) {
    switch (dt) {
    case PN_FLOAT32: pn_sp_norm_run_dt(PN_FLOAT32, x, y, n, shift, m, scale, bias); break;
    case PN_FLOAT64: pn_sp_norm_run_dt(PN_FLOAT64, x, y, n, shift, m, scale, bias); break;
    case PN_BFLOAT16: pn_sp_norm_run_dt(PN_BFLOAT16, x, y, n, shift, m, scale, bias); break;
    case PN_FLOAT16: pn_sp_norm_run_dt(PN_FLOAT16, x, y, n, shift, m, scale, bias); break;
    }
}

/* y for values i0..i1-1 of row r: ((x - shift) - m) * scale + bias, rounded
 * once; streamed through buf (tmp: the rounded values). buf, tmp:
 * PN_SP_PIECE reals each. */
static inline void pn_sp_nchw_norm(const pn_spatial_args *a, int64_t r, int64_t i0, int64_t i1,
                                   real shift, real m, real scale, real bias, int stream,
                                   real *buf, real *tmp) {
    const size_t es = pn_dtype_size(a->dtype);
    const int64_t n = i1 - i0, off = (r * a->S + i0) * (int64_t)es;
    if (!stream) {
        pn_sp_norm_run(a->dtype, (const char *)a->inp + off, (char *)a->out + off, n, shift, m, scale, bias);
        return;
    }
    const real *x = pn_row_as_real((const char *)a->inp + off, a->dtype, buf, n);
    for (int64_t i = 0; i < n; i++) buf[i] = ((x[i] - shift) - m) * scale + bias;
    pn_write_row((char *)a->out + off, buf, a->dtype, n, stream, tmp);
}

/* Backward partial sums over n values of a row: sum(dy) and
 * sum(dy * (x - mu)), into out[0], out[1]. Short rows: 16 lanes, as
 * pn_sp_sum_shifted. */
static inline void pn_sp_row_bwd_sums_short(const real *x, const real *dy, int64_t n, real mu, real *out) {
    /* two loops: gcc turns the two sums in one 16-lane loop into shuffles */
    real s[PN_SP_SHORT], sx[PN_SP_SHORT];
    int64_t i = 0;
    for (int j = 0; j < PN_SP_SHORT; j++) s[j] = 0;
    for (; i + PN_SP_SHORT <= n; i += PN_SP_SHORT)
        for (int j = 0; j < PN_SP_SHORT; j++) s[j] += dy[i + j];
    for (int j = 0; i + j < n; j++) s[j] += dy[i + j];
    i = 0;
    for (int j = 0; j < PN_SP_SHORT; j++) sx[j] = 0;
    for (; i + PN_SP_SHORT <= n; i += PN_SP_SHORT)
        for (int j = 0; j < PN_SP_SHORT; j++) sx[j] += dy[i + j] * (x[i + j] - mu);
    for (int j = 0; i + j < n; j++) sx[j] += dy[i + j] * (x[i + j] - mu);
    out[0] = pn_sp_short_total(s);
    out[1] = pn_sp_short_total(sx);
}

static inline void pn_sp_row_bwd_sums(const real *x, const real *dy, int64_t n, real mu, real *out) {
    if (n < PN_SP_SHORT_MAX) {
        pn_sp_row_bwd_sums_short(x, dy, n, mu, out);
        return;
    }
    real s[PN_LANES] = {0}, sx[PN_LANES] = {0};
    int64_t i = 0;
    for (; i + PN_LANES <= n; i += PN_LANES)
        for (int j = 0; j < PN_LANES; j++) {
            s[j] += dy[i + j];
            sx[j] += dy[i + j] * (x[i + j] - mu);
        }
    for (int j = 0; i + j < n; j++) {
        s[j] += dy[i + j];
        sx[j] += dy[i + j] * (x[i + j] - mu);
    }
    out[0] = pn_lanes_total(s);
    out[1] = pn_lanes_total(sx);
}

/* The same over values i0..i1-1 of row r. */
static inline void pn_sp_nchw_bwd_sums(const pn_spatial_args *a, int64_t r, int64_t i0, int64_t i1,
                                       real mu, real *xb, real *dyb, real *out) {
    const size_t es = pn_dtype_size(a->dtype);
    const int64_t n = i1 - i0, off = (r * a->S + i0) * (int64_t)es;
    const real *x = pn_row_as_real((const char *)a->inp + off, a->dtype, xb, n);
    const real *dy = pn_row_as_real((const char *)a->dout + off, a->dtype, dyb, n);
    pn_sp_row_bwd_sums(x, dy, n, mu, out);
}

/* dx = rs * ((dy * w - k1) - (x - mu) * k2) for n half-precision values of
 * dtype dt, overwritten and not streamed: runs of PN_SP_CB converted,
 * computed and rounded in registers (dx may be x or dy: a run is read before
 * it is written). */
static PN_ALWAYS_INLINE void pn_sp_dx_run_dt(pn_dtype dt, const char *x, const char *dy, char *dx, int64_t n,
                                             real mu, real rs, real w, real k1, real k2) {
    const int64_t es = (int64_t)pn_dtype_size(dt);
    int64_t i = 0;
    for (; i + PN_SP_CB <= n; i += PN_SP_CB) {
        real xv[PN_SP_CB], dv[PN_SP_CB];
        pn_load_run(xv, x + i * es, dt, PN_SP_CB);
        pn_load_run(dv, dy + i * es, dt, PN_SP_CB);
        for (int j = 0; j < PN_SP_CB; j++) xv[j] = rs * ((dv[j] * w - k1) - (xv[j] - mu) * k2);
        pn_store_run(dx + i * es, xv, dt, PN_SP_CB);
    }
    if (i < n) {   /* the last, partial run: dtype.h's conversions */
        real xv[PN_SP_CB], dv[PN_SP_CB];
        const int k = (int)(n - i);
        pn_load_row(xv, x + i * es, dt, k);
        pn_load_row(dv, dy + i * es, dt, k);
        for (int j = 0; j < k; j++) xv[j] = rs * ((dv[j] * w - k1) - (xv[j] - mu) * k2);
        pn_store_row(dx + i * es, xv, dt, k);
    }
}

/* dx for values i0..i1-1 of row r: rs * ((dy * w - k1) - (x - mu) * k2),
 * added to the old dx when accumulating. xb, dyb, tmp: PN_SP_PIECE reals. */
static inline void pn_sp_nchw_dx(const pn_spatial_args *a, int64_t r, int64_t i0, int64_t i1, real mu,
                                 real rs, real w, real k1, real k2, int stream, real *xb, real *dyb,
                                 real *tmp) {
    const size_t es = pn_dtype_size(a->dtype);
    const int64_t n = i1 - i0, off = (r * a->S + i0) * (int64_t)es;
    if (!stream && !a->accumulate && (a->dtype == PN_BFLOAT16 || a->dtype == PN_FLOAT16)) {
        const char *x = (const char *)a->inp + off, *dy = (const char *)a->dout + off;
        char *dx = (char *)a->dinp + off;
        if (a->dtype == PN_BFLOAT16) pn_sp_dx_run_dt(PN_BFLOAT16, x, dy, dx, n, mu, rs, w, k1, k2);
        else pn_sp_dx_run_dt(PN_FLOAT16, x, dy, dx, n, mu, rs, w, k1, k2);
        return;
    }
    const real *x = pn_row_as_real((const char *)a->inp + off, a->dtype, xb, n);
    const real *dy = pn_row_as_real((const char *)a->dout + off, a->dtype, dyb, n);
    void *row = (char *)a->dinp + off;
    const int direct = a->dtype == PN_REAL_DTYPE && !a->accumulate && !stream;
    real *dx = direct ? (real *)row : xb;   /* xb: x is read before dx[i] is written */
    for (int64_t i = 0; i < n; i++) dx[i] = rs * ((dy[i] * w - k1) - (x[i] - mu) * k2);
    if (direct) return;
    if (a->accumulate) {
        pn_load_row(tmp, row, a->dtype, n);
        for (int64_t i = 0; i < n; i++) dx[i] += tmp[i];
    }
    pn_write_row(row, dx, a->dtype, n, stream, tmp);
}

/* ---- NCHW forward ----------------------------------------------------------- */

/* The NCHW forward's per-set vectors: the statistics' shift, the mean of
 * x - shift, rstd, and whether the set is folded (pn_sp_fold: 1 or 0) with
 * its mean in double; w and b per channel. */
typedef struct {
    real *shift, *m, *rs, *fold;
    double *mean;
    const real *w, *b;
} pn_sp_nchw_out;

/* Statistics of one set from its pieces' (mean, M2), then its rstd and
 * whether it folds. */
static inline void pn_sp_nchw_set_stats(const pn_spatial_args *a, const pn_sp_sets *ss,
                                        const pn_sp_nchw_pieces *q, int64_t set, const double *pst,
                                        const pn_sp_nchw_out *o) {
    const int64_t total = ss->count * a->S;
    double m, var;
    if (q->rp > 1)   /* segments of rp pieces, the last one short */
        pn_sp_merge(pst + set * q->np * 2, q->np, 2, q->rp, PN_SP_PIECE, q->seg - (q->rp - 1) * PN_SP_PIECE, &m,
                    &var);
    else             /* pieces of rpp segments, the last one short */
        pn_sp_merge(pst + set * q->np * 2, q->np, 2, q->np, q->rpp * q->seg, total - q->rpp * q->seg * (q->np - 1),
                    &m, &var);
    o->m[set] = (real)m;
    o->rs[set] = pn_sp_finish(a, set, o->shift[set], m, var, total);
    o->mean[set] = (double)o->shift[set] + m;
    o->fold[set] = (real)pn_sp_fold(a, o->mean[set], o->rs[set]);
}

/* The output pass's coefficients of a row of channel c in a set:
 * y = ((x - *sh) - *mm) * *sc + *bias, with *sh = *mm = 0 in a folded set. */
static inline void pn_sp_nchw_coefs(const pn_sp_nchw_out *o, int64_t set, int64_t c, real *sh, real *mm, real *sc,
                                    real *bias) {
    *sc = o->rs[set] * o->w[c];
    if (o->fold[set] != 0) {
        *sh = *mm = 0;
        *bias = pn_sp_beta(o->b[c], o->mean[set], *sc);
    } else {
        *sh = o->shift[set];
        *mm = o->m[set];
        *bias = o->b[c];
    }
}

/* y of row r (set `set`), sub-row k (rp sub-rows per row). */
static inline void pn_sp_nchw_norm_unit(const pn_spatial_args *a, const pn_sp_nchw_out *o, int64_t set, int64_t r,
                                        int64_t k, int stream, real *buf, real *tmp) {
    const int64_t i0 = k * PN_SP_PIECE, i1 = i0 + PN_SP_PIECE < a->S ? i0 + PN_SP_PIECE : a->S;
    real sh, mm, sc, bias;
    pn_sp_nchw_coefs(o, set, r % a->C, &sh, &mm, &sc, &bias);
    pn_sp_nchw_norm(a, r, i0, i1, sh, mm, sc, bias, stream, buf, tmp);
}

/* y for the consecutive whole rows r0..r1-1 ((r1 - r0) * S <= PN_SP_PIECE),
 * each with its set's statistics, as pn_sp_nchw_norm computes them; the rows
 * are one contiguous block, written (or streamed) at once. */
static inline void pn_sp_nchw_norm_rows(const pn_spatial_args *a, const pn_sp_sets *ss, int64_t r0, int64_t r1,
                                        const pn_sp_nchw_out *o, int stream, real *buf, real *tmp) {
    const int64_t S = a->S, n = (r1 - r0) * S, es = (int64_t)pn_dtype_size(a->dtype), off = r0 * S * es;
    int64_t set = pn_sp_set_of(ss, r0), c = r0 % a->C, j = ss->step == 1 ? r0 % ss->count : 0;
    real sh, mm, sc, bias;
    if (!stream && S >= PN_SP_SHORT_MAX) {   /* row by row, straight from x to y */
        for (int64_t r = r0; r < r1; r++) {
            const int64_t o2 = off + (r - r0) * S * es;
            pn_sp_nchw_coefs(o, set, c, &sh, &mm, &sc, &bias);
            pn_sp_norm_run(a->dtype, (const char *)a->inp + o2, (char *)a->out + o2, S, sh, mm, sc, bias);
            pn_sp_next_row(ss, a->C, &set, &c, &j);
        }
        return;
    }
    /* short rows (7x7 maps): the block converted at once, computed in buf */
    const real *x = pn_row_as_real((const char *)a->inp + off, a->dtype, buf, n);
    void *dst = (char *)a->out + off;
    real *y = (a->dtype == PN_REAL_DTYPE && !stream) ? (real *)dst : buf;
    for (int64_t r = r0; r < r1; r++) {
        pn_sp_nchw_coefs(o, set, c, &sh, &mm, &sc, &bias);
        const real *xr = x + (r - r0) * S;
        real *yr = y + (r - r0) * S;
        for (int64_t i = 0; i < S; i++) yr[i] = ((xr[i] - sh) - mm) * sc + bias;
        pn_sp_next_row(ss, a->C, &set, &c, &j);
    }
    if (y == buf) pn_write_row(dst, y, a->dtype, n, stream, tmp);
}

/* The whole forward over NCHW rows with statistics per set (GroupNorm,
 * InstanceNorm, BatchNorm training; BatchNorm eval is sp_eval_forward). */
pn_status PN_KERNEL(sp_nchw_forward)(const pn_spatial_args *a, const pn_sp_sets *ss) {
    const int64_t C = a->C, S = a->S, nsets = ss->nsets, rows = a->N * C;
    const pn_sp_nchw_pieces q = pn_sp_nchw_layout(a, ss);
    /* y is written in sub-rows of long rows (rp per row), or in blocks of bpr
     * consecutive short rows (bpr = 0: long rows) */
    const int64_t rp = pn_sp_row_pieces(S), units = ss->count * rp, bpr = S < PN_SP_PIECE ? PN_SP_PIECE / S : 0;
    const int stream = pn_sp_stream(a, S < PN_SP_PIECE ? S : PN_SP_PIECE);      /* one row (or sub-row) */
    const int stream_blk = pn_sp_stream(a, bpr ? bpr * S : PN_SP_PIECE);         /* a block of rows */
    const int nt = pn_sp_threads(a->N * C * S);
    pn_sp_mem mem;
    const int64_t per_thread = 2 * pn_sp_pad(PN_SP_PIECE);
    pn_status st = pn_sp_alloc(&mem, 2 * pn_sp_pad(C) + 4 * pn_sp_pad(nsets) + pn_sp_pad(pn_sp_dreals(nsets)) +
                                         pn_sp_pad(pn_sp_dreals(nsets * q.np * 2)) + nt * per_thread);
    if (st) return st;
    real *w = pn_sp_take(&mem, C), *b = pn_sp_take(&mem, C);
    real *shift = pn_sp_take(&mem, nsets), *m = pn_sp_take(&mem, nsets), *rs = pn_sp_take(&mem, nsets);
    real *fold = pn_sp_take(&mem, nsets);
    double *mean = pn_sp_take_d(&mem, nsets), *pst = pn_sp_take_d(&mem, nsets * q.np * 2);
    const pn_sp_nchw_out o = {shift, m, rs, fold, mean, w, b};
    real *bufs = pn_sp_take(&mem, nt * per_thread);
    pn_sp_params(a, w, b);
    /* each set's shift: its first value */
    for (int64_t set = 0; set < nsets; set++) shift[set] = pn_sp_value(a->inp, a->dtype, pn_sp_first(ss, set) * S);
    /* set-local when there are sets enough to keep every thread busy, but not
     * for BatchNorm's short rows (its sets' rows are scattered: y is better
     * written in memory order) */
    const int local = nsets >= 4 * (int64_t)nt && !(S < PN_SP_SHORT_MAX && ss->step != 1);
    const int64_t lchunk = pn_sp_local_chunk(nsets, nt), uchunk = pn_sp_unit_chunk(S);

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        real *buf = bufs + pn_thread_id() * per_thread, *tmp = buf + pn_sp_pad(PN_SP_PIECE);
        if (local) {
#pragma omp for schedule(dynamic, lchunk)
            for (int64_t set = 0; set < nsets; set++) {
                for (int64_t p = 0; p < q.np; p++)
                    pn_sp_nchw_piece_stats(a, ss, &q, set, p, shift[set], buf, pst + (set * q.np + p) * 2);
                pn_sp_nchw_set_stats(a, ss, &q, set, pst, &o);
                const int64_t first = pn_sp_first(ss, set);
                if (bpr && ss->step == 1) {   /* GroupNorm, short rows: the set's rows are consecutive */
                    for (int64_t r = first; r < first + ss->count; r += bpr) {
                        const int64_t r1 = r + bpr < first + ss->count ? r + bpr : first + ss->count;
                        pn_sp_nchw_norm_rows(a, ss, r, r1, &o, stream_blk, buf, tmp);
                    }
                } else {
                    for (int64_t u = 0; u < units; u++) {
                        const int64_t j = pn_sp_unit_row(u, rp), k = pn_sp_unit_sub(u, rp);
                        pn_sp_nchw_norm_unit(a, &o, set, first + j * ss->step, k, stream, buf, tmp);
                    }
                }
            }
        } else {
#pragma omp for schedule(dynamic, 4)
            for (int64_t t = 0; t < nsets * q.np; t++)
                pn_sp_nchw_piece_stats(a, ss, &q, t / q.np, t % q.np, shift[t / q.np], buf, pst + t * 2);
#pragma omp for schedule(static)
            for (int64_t set = 0; set < nsets; set++)
                pn_sp_nchw_set_stats(a, ss, &q, set, pst, &o);
            /* rows in memory order: blocks of short rows, or sub-rows of long ones */
            if (bpr) {
                const int64_t nblk = pn_sp_cdiv(rows, bpr);
#pragma omp for schedule(dynamic, 4)
                for (int64_t k = 0; k < nblk; k++)
                    pn_sp_nchw_norm_rows(a, ss, k * bpr, (k + 1) * bpr < rows ? (k + 1) * bpr : rows, &o, stream_blk,
                                         buf, tmp);
            } else {
#pragma omp for schedule(dynamic, uchunk)
                for (int64_t t = 0; t < rows * rp; t++) {
                    const int64_t r = pn_sp_unit_row(t, rp), set = pn_sp_set_of(ss, r);
                    pn_sp_nchw_norm_unit(a, &o, set, r, pn_sp_unit_sub(t, rp), stream, buf, tmp);
                }
            }
        }
    }
    if (stream) pn_stream_fence();
    pn_sp_release(&mem);
    return PN_OK;
}

/* ==== BatchNorm eval forward ==================================================
 * With the running statistics y = (x - mean[c]) * (rstd[c] * w[c]) + b[c]
 * (half-precision outputs: folded where pn_sp_fold allows, as in training):
 * one elementwise pass (the engines above, which take each set's statistics
 * from x, are for training). Each thread
 * takes one contiguous share of the flat array and walks it in blocks of
 * PN_SP_PIECE values: one sequential stream per thread, as the hardware
 * prefetchers like it. Handing out blocks dynamically interleaved the two
 * threads' streams and, on a machine whose cores other processes share, left
 * the call waiting on a preempted thread's block: measured 0.6-0.8x torch
 * (which splits the work statically) at 2 threads, equal at 1.
 * NCHW: the block's rows of S values, one channel each. NHWC: the channel of
 * value i is i % C; mean, scale and bias are repeated over a period of whole
 * multiples of C (pn_sp_eval_period), a block's values walked in runs of it. */
/* NHWC: mean, scale and bias repeat every C values over R values, and a
 * block is walked in runs of R from the channel of its first value. Rows of
 * reals: R = C + PN_SP_PIECE, one loop a block (runs never wrap). Rows
 * converted through buf (PN_SP_PIECE reals): R = C * ceil(512 / C), at least
 * 512 values so that short C still gives long loops, so that 3 R reals stay
 * in L1 beside buf (over C + PN_SP_PIECE values, 50 KiB at C = 64, they did
 * not: bfloat16 1.05-1.17x, 1 thread; float32 lost 3-9% with the short
 * period, so it keeps the long one). */
static inline int64_t pn_sp_eval_period(int64_t C, pn_dtype dt) {
    if (dt == PN_REAL_DTYPE) return C + PN_SP_PIECE;
    return C >= 512 ? C : C * pn_sp_cdiv(512, C);
}

/* NHWC, half precision: y = (x - m[i]) * s[i] + bb[i] for n values of dtype
 * dt (x * s[i] + bb[i] when every m is zero, the same bits), in runs of
 * PN_SP_CB converted, computed and rounded in registers, as
 * pn_sp_norm_run_dt does rows: a block converted into a buffer first and
 * stored from it after ran at 0.66-0.80x torch's eval kernel (float16,
 * bfloat16, 1 thread). */
static PN_ALWAYS_INLINE void pn_sp_eval_run_dt(pn_dtype dt, const char *x, char *y, int64_t n, const real *m,
                                               const real *s, const real *bb, int folded) {
    const int64_t es = (int64_t)pn_dtype_size(dt);
    int64_t i = 0;
    if (folded) {
        for (; i + PN_SP_CB <= n; i += PN_SP_CB) {
            real v[PN_SP_CB];
            pn_load_run(v, x + i * es, dt, PN_SP_CB);
            for (int j = 0; j < PN_SP_CB; j++) v[j] = v[j] * s[i + j] + bb[i + j];
            pn_store_run(y + i * es, v, dt, PN_SP_CB);
        }
    }
    for (; i + PN_SP_CB <= n; i += PN_SP_CB) {
        real v[PN_SP_CB];
        pn_load_run(v, x + i * es, dt, PN_SP_CB);
        for (int j = 0; j < PN_SP_CB; j++) v[j] = (v[j] - m[i + j]) * s[i + j] + bb[i + j];
        pn_store_run(y + i * es, v, dt, PN_SP_CB);
    }
    if (i < n) {   /* the last, partial run */
        real v[PN_SP_CB];
        const int k = (int)(n - i);
        pn_load_row(v, x + i * es, dt, k);
        for (int j = 0; j < k; j++) v[j] = (v[j] - m[i + j]) * s[i + j] + bb[i + j];
        pn_store_row(y + i * es, v, dt, k);
    }
}

static void pn_sp_eval_run(pn_dtype dt, const char *x, char *y, int64_t n, const real *m, const real *s,
                           const real *bb, int folded) {
    if (dt == PN_BFLOAT16) pn_sp_eval_run_dt(PN_BFLOAT16, x, y, n, m, s, bb, folded);
    else pn_sp_eval_run_dt(PN_FLOAT16, x, y, n, m, s, bb, folded);
}

static inline void pn_sp_eval_block(const pn_spatial_args *a, int64_t i0, int64_t i1, const real *mu,
                                    const real *sc, const real *b, int folded, real *buf) {
    const size_t es = pn_dtype_size(a->dtype);
    const int64_t n = i1 - i0, C = a->C, S = a->S;
    if (a->dtype == PN_BFLOAT16 || a->dtype == PN_FLOAT16) {   /* in registers, straight from x to y */
        const char *x = (const char *)a->inp + i0 * (int64_t)es;
        char *y = (char *)a->out + i0 * (int64_t)es;
        int64_t k = 0;
        if (a->layout == PN_NHWC) {
            const int64_t R = pn_sp_eval_period(C, a->dtype);
            for (int64_t c0 = i0 % C; k < n; c0 = 0) {   /* as below */
                const int64_t len = R - c0 < n - k ? R - c0 : n - k;
                pn_sp_eval_run(a->dtype, x + k * (int64_t)es, y + k * (int64_t)es, len, mu + c0, sc + c0, b + c0,
                               folded);
                k += len;
            }
        } else {   /* (x - m) * s + b is ((x - m) - 0) * s + b */
            for (int64_t r = i0 / S, j0 = i0 % S; k < n; j0 = 0, r++) {
                const int64_t len = S - j0 < n - k ? S - j0 : n - k, c = r % C;
                pn_sp_norm_run(a->dtype, x + k * (int64_t)es, y + k * (int64_t)es, len, mu[c], 0, sc[c], b[c]);
                k += len;
            }
        }
        return;
    }
    const real *x = pn_row_as_real((const char *)a->inp + i0 * (int64_t)es, a->dtype, buf, n);
    void *dst = (char *)a->out + i0 * (int64_t)es;
    real *y = a->dtype == PN_REAL_DTYPE ? (real *)dst : buf;   /* buf: x is read before y is written */
    if (a->layout == PN_NHWC) {
        const int64_t R = pn_sp_eval_period(C, a->dtype);
        int64_t c0 = i0 % C, k = 0;
        while (k < n) {   /* runs of the period from channel c0, then from 0 (reals: one run) */
            const int64_t len = R - c0 < n - k ? R - c0 : n - k;
            const real *m = mu + c0, *s = sc + c0, *bb = b + c0, *xr = x + k;
            real *yr = y + k;
            if (folded)   /* every mean zero: the same bits */
                for (int64_t i = 0; i < len; i++) yr[i] = xr[i] * s[i] + bb[i];
            else
                for (int64_t i = 0; i < len; i++) yr[i] = (xr[i] - m[i]) * s[i] + bb[i];
            k += len;
            c0 = 0;
        }
    } else {
        int64_t r = i0 / S, k = 0, j0 = i0 % S;
        while (k < n) {
            const int64_t len = S - j0 < n - k ? S - j0 : n - k, c = r % C;
            const real m = mu[c], s = sc[c], bb = b[c];
            const real *xr = x + k;
            real *yr = y + k;
            if (m == 0)   /* a folded channel: the same bits */
                for (int64_t i = 0; i < len; i++) yr[i] = xr[i] * s + bb;
            else
                for (int64_t i = 0; i < len; i++) yr[i] = (xr[i] - m) * s + bb;
            k += len;
            j0 = 0;
            r++;
        }
    }
    if (y == buf) pn_store_row(dst, y, a->dtype, n);
}

pn_status PN_KERNEL(sp_eval_forward)(const pn_spatial_args *a) {
    const int64_t C = a->C, total = a->N * C * a->S;
    const int nhwc = a->layout == PN_NHWC;
    const int64_t plen = nhwc ? pn_sp_eval_period(C, a->dtype) : C;   /* mean, scale, bias: repeated in NHWC */
    const int nt = pn_sp_threads(total);
    pn_sp_mem mem;
    pn_status st = pn_sp_alloc(&mem, pn_sp_pad(C) + 3 * pn_sp_pad(plen) + nt * pn_sp_pad(PN_SP_PIECE));
    if (st) return st;
    real *w = pn_sp_take(&mem, C), *mu = pn_sp_take(&mem, plen), *sc = pn_sp_take(&mem, plen);
    real *b = pn_sp_take(&mem, plen), *bufs = pn_sp_take(&mem, nt * pn_sp_pad(PN_SP_PIECE));
    pn_sp_params(a, w, b);
    int folded = 1;   /* every channel folded */
    for (int64_t c = 0; c < C; c++) {
        const real rs = (real)(1.0 / sqrt((double)pn_sp_value(a->running_var, a->rdtype, c) + a->eps));
        mu[c] = pn_sp_value(a->running_mean, a->rdtype, c);
        sc[c] = rs * w[c];
        if (a->mean) ((real *)a->mean)[c] = mu[c];
        if (a->rstd) ((real *)a->rstd)[c] = rs;
        /* half-precision y of a channel with |mean| * rstd <= PN_SP_FOLD: x * sc + beta (as the
         * training forward folds a set), written as (x - 0) * sc + beta where channels are mixed */
        if (pn_sp_fold(a, (double)mu[c], rs)) {
            b[c] = pn_sp_beta(b[c], (double)mu[c], sc[c]);
            mu[c] = 0;
        } else {
            folded = 0;
        }
    }
    for (int64_t c = C; c < plen; c++) {
        mu[c] = mu[c - C];
        sc[c] = sc[c - C];
        b[c] = b[c - C];
    }
    /* shares of whole 64-value runs (whole cache lines of the output in every dtype) */
    const int64_t runs = pn_sp_cdiv(total, 64);

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        real *buf = bufs + pn_thread_id() * pn_sp_pad(PN_SP_PIECE);
#pragma omp for schedule(static)
        for (int p = 0; p < nt; p++) {   /* share p: one per thread */
            const int64_t e0 = runs * p / nt * 64, e1 = p + 1 == nt ? total : runs * (p + 1) / nt * 64;
            for (int64_t i = e0; i < e1; i += PN_SP_PIECE)
                pn_sp_eval_block(a, i, i + PN_SP_PIECE < e1 ? i + PN_SP_PIECE : e1, mu, sc, b, folded, buf);
        }
    }
    pn_sp_release(&mem);
    return PN_OK;
}

/* ---- NCHW backward -------------------------------------------------------------
 * Per set, from the partial sums of its rows: sg = sum(dy * w), sgx = sum(dy * w * (x - mu)),
 * then dx = rs * ((dy * w - k1) - (x - mu) * k2) with k1 = sg / M and
 * k2 = rs^2 * sgx / M (M values per set); with running statistics (BatchNorm
 * eval) the statistics are constants and k1 = k2 = 0. */

/* The sums of row r, sub-row k, into the scratch. */
static inline void pn_sp_nchw_bwd_unit(const pn_spatial_args *a, int64_t r, int64_t k, int64_t rp, real mu,
                                       real *part, real *xb, real *dyb) {
    const int64_t i0 = k * PN_SP_PIECE, i1 = i0 + PN_SP_PIECE < a->S ? i0 + PN_SP_PIECE : a->S;
    pn_sp_nchw_bwd_sums(a, r, i0, i1, mu, xb, dyb, part + (r * rp + k) * 2);
}

/* A set's coefficients k1, k2 from its rows' partial sums (in order); also
 * the rows' totals, tot[r] = (sum dy, rs * sum dy * (x - mu)), for dbias and
 * dweight. */
static inline void pn_sp_nchw_bwd_set(const pn_spatial_args *a, const pn_sp_sets *ss, int64_t set,
                                      int64_t rp, const real *part, double *tot, const real *w,
                                      real rs, real *k1, real *k2) {
    double sg = 0, sgx = 0;
    const int64_t first = pn_sp_first(ss, set), c0 = first % a->C;
    for (int64_t j = 0; j < ss->count; j++) {
        /* the row's channel: BatchNorm's set is a channel (with C = 1 its rows
         * are consecutive too: step 1 does not tell the ops apart) */
        const int64_t r = first + j * ss->step, c = a->batchnorm ? set : c0 + j;
        double s = 0, sx = 0;   /* the row's pieces in order */
        for (int64_t k = 0; k < rp; k++) {
            s += (double)part[(r * rp + k) * 2];
            sx += (double)part[(r * rp + k) * 2 + 1];
        }
        tot[r * 2] = s;                        /* the row's share of dbias */
        tot[r * 2 + 1] = (double)rs * sx;      /* and of dweight: sum(dy * xhat) */
        sg += (double)w[c] * s;
        sgx += (double)w[c] * sx;
    }
    const double M = (double)(ss->count * a->S);
    const int consts = a->batchnorm && !a->training;
    *k1 = consts ? 0 : (real)(sg / M);
    *k2 = consts ? 0 : (real)((double)rs * (double)rs * sgx / M);
}

static inline void pn_sp_nchw_dx_unit(const pn_spatial_args *a, int64_t r, int64_t k, real mu, real rs,
                                      real k1, real k2, const real *w, int stream, real *xb, real *dyb,
                                      real *tmp) {
    const int64_t i0 = k * PN_SP_PIECE, i1 = i0 + PN_SP_PIECE < a->S ? i0 + PN_SP_PIECE : a->S;
    pn_sp_nchw_dx(a, r, i0, i1, mu, rs, w[r % a->C], k1, k2, stream, xb, dyb, tmp);
}

/* The sums of the consecutive whole rows r0..r1-1 ((r1 - r0) * S <=
 * PN_SP_PIECE, one sub-row each), each with its set's mean, into the scratch. */
static inline void pn_sp_nchw_bwd_rows(const pn_spatial_args *a, const pn_sp_sets *ss, int64_t r0, int64_t r1,
                                       const real *mu, real *part, real *xb, real *dyb) {
    const int64_t S = a->S, n = (r1 - r0) * S, off = r0 * S * (int64_t)pn_dtype_size(a->dtype);
    const real *x = pn_row_as_real((const char *)a->inp + off, a->dtype, xb, n);
    const real *dy = pn_row_as_real((const char *)a->dout + off, a->dtype, dyb, n);
    int64_t set = pn_sp_set_of(ss, r0), c = r0 % a->C, j = ss->step == 1 ? r0 % ss->count : 0;
    for (int64_t r = r0; r < r1; r++) {
        pn_sp_row_bwd_sums(x + (r - r0) * S, dy + (r - r0) * S, S, mu[set], part + r * 2);
        pn_sp_next_row(ss, a->C, &set, &c, &j);
    }
}

/* dx for the consecutive whole rows r0..r1-1 ((r1 - r0) * S <= PN_SP_PIECE),
 * each with its set's coefficients, as pn_sp_nchw_dx computes them; written
 * (or streamed) as one block. */
static inline void pn_sp_nchw_dx_rows(const pn_spatial_args *a, const pn_sp_sets *ss, int64_t r0, int64_t r1,
                                      const real *mu, const real *rsv, const real *k1, const real *k2,
                                      const real *w, int stream, real *xb, real *dyb, real *tmp) {
    const int64_t S = a->S, n = (r1 - r0) * S, off = r0 * S * (int64_t)pn_dtype_size(a->dtype);
    int64_t set = pn_sp_set_of(ss, r0), c = r0 % a->C, j = ss->step == 1 ? r0 % ss->count : 0;
    if (!stream && !a->accumulate && S >= PN_SP_SHORT_MAX && (a->dtype == PN_BFLOAT16 || a->dtype == PN_FLOAT16)) {
        for (int64_t r = r0; r < r1; r++) {   /* row by row, in registers (as pn_sp_nchw_dx) */
            pn_sp_nchw_dx(a, r, 0, S, mu[set], rsv[set], w[c], k1[set], k2[set], 0, xb, dyb, tmp);
            pn_sp_next_row(ss, a->C, &set, &c, &j);
        }
        return;
    }
    const real *x = pn_row_as_real((const char *)a->inp + off, a->dtype, xb, n);
    const real *dy = pn_row_as_real((const char *)a->dout + off, a->dtype, dyb, n);
    void *dst = (char *)a->dinp + off;
    const int direct = a->dtype == PN_REAL_DTYPE && !a->accumulate && !stream;
    real *dx = direct ? (real *)dst : xb;   /* xb: x is read before dx is written */
    for (int64_t r = r0; r < r1; r++) {
        const real m = mu[set], rs = rsv[set], wc = w[c], c1 = k1[set], c2 = k2[set];
        const real *xr = x + (r - r0) * S, *dr = dy + (r - r0) * S;
        real *o = dx + (r - r0) * S;
        for (int64_t i = 0; i < S; i++) o[i] = rs * ((dr[i] * wc - c1) - (xr[i] - m) * c2);
        pn_sp_next_row(ss, a->C, &set, &c, &j);
    }
    if (direct) return;
    if (a->accumulate) {
        pn_load_row(tmp, dst, a->dtype, n);
        for (int64_t i = 0; i < n; i++) dx[i] += tmp[i];
    }
    pn_write_row(dst, dx, a->dtype, n, stream, tmp);
}

/* dweight/dbias of channel c: the totals of its rows (n*C + c), with each
 * row's rstd, added over n in order in double. */
static inline void pn_sp_param_grads(const pn_spatial_args *a, int64_t c, double dw, double db) {
    const size_t wes = pn_dtype_size(a->wdtype);
    real v;
    if (a->dweight) {
        char *p = (char *)a->dweight + c * (int64_t)wes;
        v = a->accumulate ? (real)((double)pn_sp_value(p, a->wdtype, 0) + dw) : (real)dw;
        pn_store_row(p, &v, a->wdtype, 1);
    }
    if (a->dbias) {
        char *p = (char *)a->dbias + c * (int64_t)wes;
        v = a->accumulate ? (real)((double)pn_sp_value(p, a->wdtype, 0) + db) : (real)db;
        pn_store_row(p, &v, a->wdtype, 1);
    }
}

pn_status PN_KERNEL(sp_nchw_backward)(const pn_spatial_args *a, const pn_sp_sets *ss) {
    const int64_t N = a->N, C = a->C, S = a->S, nsets = ss->nsets;
    const int64_t rows = N * C, rp = pn_sp_row_pieces(S), units = ss->count * rp;
    const int64_t bpr = S < PN_SP_PIECE ? PN_SP_PIECE / S : 0;   /* dx in blocks of short rows */
    const int stream = pn_sp_stream(a, S < PN_SP_PIECE ? S : PN_SP_PIECE);
    const int stream_blk = pn_sp_stream(a, bpr ? bpr * S : PN_SP_PIECE);
    const int nt = pn_sp_threads(N * C * S);
    int64_t ntot;
    real *part = pn_scratch_reals(a->scratch);
    double *tot = (double *)((char *)part + pn_sp_parts_bytes(pn_sp_scratch_parts(a, &ntot), a->dtype));
    const real *mu = (const real *)a->smean, *rsv = (const real *)a->srstd;
    pn_sp_mem mem;
    const int64_t per_thread = 3 * pn_sp_pad(PN_SP_PIECE);
    pn_status st = pn_sp_alloc(&mem, pn_sp_pad(C) + 2 * pn_sp_pad(nsets) + nt * per_thread);
    if (st) return st;
    real *w = pn_sp_take(&mem, C), *k1 = pn_sp_take(&mem, nsets), *k2 = pn_sp_take(&mem, nsets);
    real *bufs = pn_sp_take(&mem, nt * per_thread);
    pn_sp_params(a, w, NULL);
    /* set-local when there are sets enough, but not for BatchNorm's short
     * rows (its sets' rows are scattered: memory order does better) */
    const int local = nsets >= 4 * (int64_t)nt && !(S < PN_SP_SHORT_MAX && ss->step != 1);
    const int64_t lchunk = pn_sp_local_chunk(nsets, nt), uchunk = pn_sp_unit_chunk(S);

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        real *xb = bufs + pn_thread_id() * per_thread, *dyb = xb + pn_sp_pad(PN_SP_PIECE);
        real *tmp = dyb + pn_sp_pad(PN_SP_PIECE);
        if (local) {
#pragma omp for schedule(dynamic, lchunk)
            for (int64_t set = 0; set < nsets; set++) {
                const int64_t first = pn_sp_first(ss, set);
                if (bpr && ss->step == 1) {   /* GroupNorm, short rows: consecutive */
                    for (int64_t r = first; r < first + ss->count; r += bpr)
                        pn_sp_nchw_bwd_rows(a, ss, r, r + bpr < first + ss->count ? r + bpr : first + ss->count, mu,
                                            part, xb, dyb);
                } else {
                    for (int64_t u = 0; u < units; u++)
                        pn_sp_nchw_bwd_unit(a, first + pn_sp_unit_row(u, rp) * ss->step, pn_sp_unit_sub(u, rp), rp,
                                            mu[set], part, xb, dyb);
                }
                pn_sp_nchw_bwd_set(a, ss, set, rp, part, tot, w, rsv[set], &k1[set], &k2[set]);
                if (a->dinp && bpr && ss->step == 1) {   /* GroupNorm, short rows: consecutive */
                    for (int64_t r = first; r < first + ss->count; r += bpr) {
                        const int64_t r1 = r + bpr < first + ss->count ? r + bpr : first + ss->count;
                        pn_sp_nchw_dx_rows(a, ss, r, r1, mu, rsv, k1, k2, w, stream_blk, xb, dyb, tmp);
                    }
                } else if (a->dinp) {
                    for (int64_t u = 0; u < units; u++) {
                        const int64_t j = pn_sp_unit_row(u, rp), k = pn_sp_unit_sub(u, rp);
                        pn_sp_nchw_dx_unit(a, first + j * ss->step, k, mu[set], rsv[set], k1[set],
                                           k2[set], w, stream, xb, dyb, tmp);
                    }
                }
            }
        } else {
            /* rows in memory order: blocks of short rows, or sub-rows of long ones */
            if (bpr) {
                const int64_t nblk = pn_sp_cdiv(rows, bpr);
#pragma omp for schedule(dynamic, 4)
                for (int64_t k = 0; k < nblk; k++)
                    pn_sp_nchw_bwd_rows(a, ss, k * bpr, (k + 1) * bpr < rows ? (k + 1) * bpr : rows, mu, part, xb, dyb);
            } else {
#pragma omp for schedule(dynamic, uchunk)
                for (int64_t t = 0; t < rows * rp; t++) {
                    const int64_t r = pn_sp_unit_row(t, rp);
                    pn_sp_nchw_bwd_unit(a, r, pn_sp_unit_sub(t, rp), rp, mu[pn_sp_set_of(ss, r)], part, xb, dyb);
                }
            }
#pragma omp for schedule(static)
            for (int64_t set = 0; set < nsets; set++)
                pn_sp_nchw_bwd_set(a, ss, set, rp, part, tot, w, rsv[set], &k1[set], &k2[set]);
            if (a->dinp && bpr) {
                const int64_t nblk = pn_sp_cdiv(rows, bpr);
#pragma omp for schedule(dynamic, 4)
                for (int64_t k = 0; k < nblk; k++)
                    pn_sp_nchw_dx_rows(a, ss, k * bpr, (k + 1) * bpr < rows ? (k + 1) * bpr : rows, mu, rsv, k1, k2,
                                       w, stream_blk, xb, dyb, tmp);
            } else if (a->dinp) {
#pragma omp for schedule(dynamic, uchunk)
                for (int64_t t = 0; t < rows * rp; t++) {
                    const int64_t r = pn_sp_unit_row(t, rp), set = pn_sp_set_of(ss, r);
                    pn_sp_nchw_dx_unit(a, r, pn_sp_unit_sub(t, rp), mu[set], rsv[set], k1[set], k2[set], w, stream, xb,
                                       dyb, tmp);
                }
            }
        }
        /* dweight, dbias: per channel, the rows' shares over the samples in
         * order; blocks of channels, one per lane */
        if (a->dweight || a->dbias) {
            const int64_t ncb = pn_sp_cdiv(C, PN_SP_GB);
#pragma omp for schedule(static)
            for (int64_t k = 0; k < ncb; k++) {
                const int64_t c0 = k * PN_SP_GB, nc = c0 + PN_SP_GB < C ? PN_SP_GB : C - c0;
                double dw[PN_SP_GB], db[PN_SP_GB];
                for (int64_t j = 0; j < nc; j++) dw[j] = db[j] = 0;
                for (int64_t n = 0; n < N; n++)
                    for (int64_t j = 0; j < nc; j++) {
                        const int64_t r = n * C + c0 + j;
                        db[j] += tot[r * 2];
                        dw[j] += tot[r * 2 + 1];
                    }
                for (int64_t j = 0; j < nc; j++) pn_sp_param_grads(a, c0 + j, dw[j], db[j]);
            }
        }
    }
    if (stream) pn_stream_fence();
    pn_sp_release(&mem);
    return PN_OK;
}

/* ==== NHWC engine ================================================================
 * Rows of C channels. nsets sets of `rows` consecutive rows (GroupNorm: a
 * sample; BatchNorm: everything), G groups of Cg consecutive channels
 * (BatchNorm: G = C). Per set and channel, the values are accumulated down
 * the rows (vectors along C); pieces are runs of rpp rows. Statistics slot of
 * (set, g): set * G + g. */
typedef struct {
    int64_t nsets, rows, rpp, np, G, Cg;
} pn_sp_nhwc;

static inline pn_sp_nhwc pn_sp_nhwc_layout(const pn_spatial_args *a) {
    pn_sp_nhwc h;
    h.nsets = pn_sp_nhwc_sets(a);
    h.rows = pn_sp_nhwc_rows(a);
    h.rpp = pn_sp_rows_per_piece(a->C);
    h.np = pn_sp_cdiv(h.rows, h.rpp);
    h.G = a->G;
    h.Cg = a->C / a->G;
    return h;
}

/* Rows of piece p of a set: first row (global) and count. */
static inline int64_t pn_sp_nhwc_piece_rows(const pn_sp_nhwc *h, int64_t set, int64_t p, int64_t *r0) {
    *r0 = set * h->rows + p * h->rpp;
    return p * h->rpp + h->rpp < h->rows ? h->rpp : h->rows - p * h->rpp;
}

/* Column sums down nr rows of C values (NHWC pieces): for each channel c,
 *   kind 0: sum of x[r][c] - sh[c]
 *   kind 1: sum of ((x[r][c] - sh[c]) - mv[c])^2
 *   kind 2: sum of dy[r][c] into out[c], sum of dy[r][c] * (x[r][c] - sh[c]) into out2[c]
 *   kind 3: kind 0's sum into out[c] and the sum of (x[r][c] - sh[c])^2 into
 *           out2[c], in one pass
 * Blocks of PN_SP_CB channels are summed in registers, the rows split in four
 * interleaved running sums (rows 0, 1, 2, 3 mod 4) added together at the end:
 * short chains of additions, one load per value. The order of additions is
 * fixed by the sizes alone. */
/* PN_SP_CB (spatial.h): channels per block, two cache lines */

static PN_ALWAYS_INLINE void pn_sp_colsum_block(int kind, pn_dtype dt, const char *x, const char *dy, int64_t nr,
                                                int64_t C, const real *sh, const real *mv, real *out, real *out2) {
    const int64_t rs = C * (int64_t)pn_dtype_size(dt);   /* bytes per row */
    real a0[PN_SP_CB], a1[PN_SP_CB], a2[PN_SP_CB], a3[PN_SP_CB];
    real b0[PN_SP_CB], b1[PN_SP_CB], b2[PN_SP_CB], b3[PN_SP_CB];
    real s[PN_SP_CB], m[PN_SP_CB];
    for (int j = 0; j < PN_SP_CB; j++) {
        a0[j] = a1[j] = a2[j] = a3[j] = b0[j] = b1[j] = b2[j] = b3[j] = 0;
        s[j] = sh[j];
        m[j] = kind == 1 ? mv[j] : 0;
    }
    int64_t r = 0;
    /* the block's values of a row as reals: in place, or converted in registers */
#define PN_SP_ROW(v, base, row)                                                                \
    real v##_c[PN_SP_CB];                                                                      \
    const real *v = (const real *)((base) + (row) * rs);                                       \
    if (dt != PN_REAL_DTYPE) { pn_load_run(v##_c, (base) + (row) * rs, dt, PN_SP_CB); v = v##_c; }
#define PN_SP_TERM(acc, bcc, row)                                                              \
    {                                                                                          \
        PN_SP_ROW(xv, x, row)                                                                  \
        if (kind == 2) {                                                                       \
            PN_SP_ROW(dv, dy, row)                                                             \
            for (int j = 0; j < PN_SP_CB; j++) {                                               \
                acc[j] += dv[j];                                                               \
                bcc[j] += dv[j] * (xv[j] - s[j]);                                              \
            }                                                                                  \
        } else if (kind == 3) {                                                                \
            for (int j = 0; j < PN_SP_CB; j++) {                                               \
                const real d = xv[j] - s[j];                                                   \
                acc[j] += d;                                                                   \
                bcc[j] += d * d;                                                               \
            }                                                                                  \
        } else {                                                                               \
            for (int j = 0; j < PN_SP_CB; j++) {                                               \
                const real d = (xv[j] - s[j]) - m[j];                                          \
                if (kind == 0) acc[j] += d;                                                    \
                else acc[j] += d * d;                                                          \
            }                                                                                  \
        }                                                                                      \
    }
    for (; r + 4 <= nr; r += 4) {
        PN_SP_TERM(a0, b0, r)
        PN_SP_TERM(a1, b1, r + 1)
        PN_SP_TERM(a2, b2, r + 2)
        PN_SP_TERM(a3, b3, r + 3)
    }
    if (r < nr) { PN_SP_TERM(a0, b0, r) r++; }
    if (r < nr) { PN_SP_TERM(a1, b1, r) r++; }
    if (r < nr) { PN_SP_TERM(a2, b2, r) r++; }
#undef PN_SP_TERM
#undef PN_SP_ROW
    for (int j = 0; j < PN_SP_CB; j++) {
        out[j] = (a0[j] + a1[j]) + (a2[j] + a3[j]);
        if (kind >= 2) out2[j] = (b0[j] + b1[j]) + (b2[j] + b3[j]);
    }
}

/* The blocks of a piece (C a multiple of PN_SP_CB), each kind and dtype its
 * own loop: half-precision rows are converted a block row at a time in
 * registers, not into a buffer first (a piece's buffer of reals overflowed
 * L1, and was written once and read twice). */
static PN_ALWAYS_INLINE void pn_sp_colsum_blocks_k(int kind, pn_dtype dt, const char *x, const char *dy, int64_t nr,
                                                   int64_t C, int64_t c0, int64_t c1, const real *sh,
                                                   const real *mv, real *out, real *out2) {
    const int64_t es = (int64_t)pn_dtype_size(dt);
    for (int64_t c = c0; c + PN_SP_CB <= c1; c += PN_SP_CB)
        pn_sp_colsum_block(kind, dt, x + c * es, dy ? dy + c * es : NULL, nr, C, sh + c, mv ? mv + c : NULL,
                           out + c, out2 ? out2 + c : NULL);
}

#define PN_SP_BLOCKS_DT(kind)                                                                  \
    switch (dt) {                                                                              \
    case PN_FLOAT32: pn_sp_colsum_blocks_k(kind, PN_FLOAT32, x, dy, nr, C, c0, c1, sh, mv, out, out2); break; \
    case PN_FLOAT64: pn_sp_colsum_blocks_k(kind, PN_FLOAT64, x, dy, nr, C, c0, c1, sh, mv, out, out2); break; \
    case PN_BFLOAT16: pn_sp_colsum_blocks_k(kind, PN_BFLOAT16, x, dy, nr, C, c0, c1, sh, mv, out, out2); break; \
    case PN_FLOAT16: pn_sp_colsum_blocks_k(kind, PN_FLOAT16, x, dy, nr, C, c0, c1, sh, mv, out, out2); break; \
    }
static void pn_sp_colsum_blocks(int kind, pn_dtype dt, const char *x, const char *dy, int64_t nr, int64_t C,
                                int64_t c0, int64_t c1, const real *sh, const real *mv, real *out, real *out2) {
    if (kind == 0) { PN_SP_BLOCKS_DT(0) }
    else if (kind == 1) { PN_SP_BLOCKS_DT(1) }
    else if (kind == 2) { PN_SP_BLOCKS_DT(2) }
    else { PN_SP_BLOCKS_DT(3) }
}
#undef PN_SP_BLOCKS_DT

/* The same for the last, partial block of n < PN_SP_CB channels, same order. */
static inline void pn_sp_colsum_tail(int kind, const real *x, const real *dy, int64_t nr, int64_t C,
                                     int n, const real *sh, const real *mv, real *out, real *out2) {
    for (int j = 0; j < n; j++) {
        real a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
        for (int64_t r = 0; r < nr; r++) {
            const real d = (x[r * C + j] - sh[j]) - (kind == 1 ? mv[j] : 0);
            if (kind == 0) a[r & 3] += d;
            else if (kind == 1) a[r & 3] += d * d;
            else { a[r & 3] += dy[r * C + j]; b[r & 3] += dy[r * C + j] * d; }
        }
        out[j] = (a[0] + a[1]) + (a[2] + a[3]);
        if (kind == 2) out2[j] = (b[0] + b[1]) + (b[2] + b[3]);
    }
}

static inline void pn_sp_colsum_reals(int kind, const real *x, const real *dy, int64_t nr, int64_t C,
                                      const real *sh, const real *mv, real *out, real *out2) {
    if (nr < 4) {   /* a piece of 1-3 rows (short sets): plain sums down the rows */
        for (int64_t c = 0; c < C; c++) {
            out[c] = 0;
            if (kind == 2) out2[c] = 0;
        }
        for (int64_t r = 0; r < nr; r++)
            for (int64_t c = 0; c < C; c++) {
                const real d = (x[r * C + c] - sh[c]) - (kind == 1 ? mv[c] : 0);
                if (kind == 0) out[c] += d;
                else if (kind == 1) out[c] += d * d;
                else { out[c] += dy[r * C + c]; out2[c] += dy[r * C + c] * d; }
            }
        return;
    }
    const int64_t c = C - C % PN_SP_CB;
    pn_sp_colsum_blocks(kind, PN_REAL_DTYPE, (const char *)x, (const char *)dy, nr, C, 0, C, sh, mv, out, out2);
    if (c < C)
        pn_sp_colsum_tail(kind, x + c, dy ? dy + c : NULL, nr, C, (int)(C - c), sh + c, mv ? mv + c : NULL,
                          out + c, out2 ? out2 + c : NULL);
}

/* The column sums of nr rows of dtype dt at x (and dy): straight from the
 * rows when every channel is in a whole block and there are 4 rows or more;
 * else from the rows as reals (converted into xb, dyb: nr*C reals). The
 * same additions in the same order either way. */
static inline void pn_sp_colsum(int kind, pn_dtype dt, const void *x, const void *dy, int64_t nr, int64_t C,
                                const real *sh, const real *mv, real *out, real *out2, real *xb, real *dyb) {
    if (nr >= 4 && C % PN_SP_CB == 0) {
        pn_sp_colsum_blocks(kind, dt, (const char *)x, (const char *)dy, nr, C, 0, C, sh, mv, out, out2);
        return;
    }
    const real *xr = pn_row_as_real(x, dt, xb, nr * C);
    const real *dr = kind == 2 ? pn_row_as_real(dy, dt, dyb, nr * C) : NULL;
    pn_sp_colsum_reals(kind, xr, dr, nr, C, sh, mv, out, out2);
}

/* The sum of n reals (a group's column sums) in double. A sum in reals, one
 * channel after the other, lost up to 9 ulps of the mean of a group of a few
 * hundred channels or more with few rows per piece; in double, in PN_DLANES
 * lanes (element i in lane i % PN_DLANES, a fixed tree at the end), a
 * float32 group's sum is all but exact and a float64 group's chains are
 * 16 times shorter. Short groups: one chain. */
static inline double pn_sp_sum_d(const real *v, int64_t n) {
    if (n < 2 * PN_DLANES) {
        double s = 0;
        for (int64_t i = 0; i < n; i++) s += (double)v[i];
        return s;
    }
    double acc[PN_DLANES] = {0};
    int64_t i = 0;
    for (; i + PN_DLANES <= n; i += PN_DLANES)
        for (int j = 0; j < PN_DLANES; j++) acc[j] += (double)v[i + j];
    for (int j = 0; i + j < n; j++) acc[j] += (double)v[i + j];
    return pn_dlanes_total(acc);
}

/* One pass for a piece's M2: with d = x - c, c a shift near the piece's
 * mean, M2 = sum d^2 - (sum d)^2 / n. c is the mean of the group's values
 * in the piece's first k rows, k = min(8, nr / 4) (a rounded real; any
 * value would do, a near one keeps the cancellation small): the piece's sum
 * about the set's shift is then sum d + n (c - shift), in double. A group's
 * one pass is kept while sum d^2 is at most PN_SP_ONEPASS times M2 (c within
 * sqrt(PN_SP_ONEPASS - 1) standard deviations of the piece's mean), where M2
 * keeps all but about an ulp of the float sums of squares (measured: with
 * the set's first value as c and a bound of 16, a float32 rstd lost 5 ulps
 * on ordinary groups; a bound of 8 lost 5 on a channel with an outlier in
 * its first rows); else (c far off: outlying values in the first rows; an
 * Inf or NaN) the blocks of PN_SP_CB channels that hold the group take two
 * passes about the set's shift as before, the piece's other blocks keep
 * their one pass. Deciding per block, not per piece, lets short pieces (C >
 * 1024: 16-25 rows) take one pass: their shift comes from 4-6 rows, and a
 * channel of Gaussian data then misses the bound about once in 2000, once a
 * piece at C = 2048, which would send every piece back to two passes. Below
 * 4 shift rows (pieces under 16 rows) a block of 32 channels misses it too
 * often. Which groups take two passes depends on the data and the sizes
 * only (each channel's column sums are the same whichever blocks are
 * summed together): every thread count and ISA gets the same bits. */
#define PN_SP_ONEPASS 4.0
#define PN_SP_SHIFT_ROWS 8
#define PN_SP_SHIFT_MIN 4

/* Piece p of a set: per group g, the sum and M2 of x - shift into st[g] and
 * st[Gp + g], while the rows are in cache: in one pass over the rows (kind
 * 3) when every channel is in a whole block and the cancellation is mild,
 * else in two (the second about the piece's mean in reals, as in the NCHW
 * engine). sh: the set's shift per channel; acc, mv: C reals; buf: rpp*C
 * reals (conversions). */
static inline void pn_sp_nhwc_piece_stats(const pn_spatial_args *a, const pn_sp_nhwc *h, int64_t set,
                                          int64_t p, const real *sh, real *acc, real *mv, real *buf,
                                          double *st) {
    const int64_t C = a->C, Cg = h->Cg, G = h->G, Gp = pn_sp_pad(G);
    int64_t r0;
    const int64_t nr = pn_sp_nhwc_piece_rows(h, set, p, &r0);
    const char *x = (const char *)a->inp + r0 * C * (int64_t)pn_dtype_size(a->dtype);
    const real cnt = (real)(nr * Cg);
    const int blocks = nr >= 4 && C % PN_SP_CB == 0;   /* the column sums read the rows as they are */
    /* one pass where the shift's rows are at most a quarter of the piece */
    const int64_t k = nr / 4 < PN_SP_SHIFT_ROWS ? nr / 4 : PN_SP_SHIFT_ROWS;
    if (blocks && k >= PN_SP_SHIFT_MIN) {
        /* the piece's shift per channel, pc = buf[0, C): the column sums of
         * its first k rows (converted into buf, which holds rpp >= nr rows,
         * when they are not reals; row 0 becomes the sums), added up per
         * group, over their count. Vectors along C: a loop per group and
         * row cost as much as the pass itself at BatchNorm's C = 640. */
        real *pc = buf;
        const real *rows = (const real *)x;
        if (a->dtype != PN_REAL_DTYPE) {
            pn_load_row(buf, x, a->dtype, k * C);
            rows = buf;
        }
        for (int64_t c = 0; c < C; c++) pc[c] = rows[c];
        for (int64_t r = 1; r < k; r++)
            for (int64_t c = 0; c < C; c++) pc[c] += rows[r * C + c];
        if (Cg > 1)
            for (int64_t g = 0; g < G; g++) {
                real t = 0;
                for (int64_t c = g * Cg; c < (g + 1) * Cg; c++) t += pc[c];
                for (int64_t c = g * Cg; c < (g + 1) * Cg; c++) pc[c] = t;
            }
        const real inv = (real)1 / (real)(k * Cg);
        for (int64_t c = 0; c < C; c++) pc[c] *= inv;
        /* acc: the sums of d, mv: of d^2 */
        pn_sp_colsum_blocks(3, a->dtype, x, NULL, nr, C, 0, C, pc, NULL, acc, mv);
        int64_t nbad = 0;
        const double n = (double)(nr * Cg);
        for (int64_t g = 0; g < G; g++) {
            const double s1 = Cg == 1 ? (double)acc[g] : pn_sp_sum_d(acc + g * Cg, Cg);
            const double s2 = Cg == 1 ? (double)mv[g] : pn_sp_sum_d(mv + g * Cg, Cg);
            const double M2 = s2 - s1 * s1 / n;
            st[g] = s1 + n * ((double)pc[g * Cg] - (double)sh[g * Cg]);
            st[Gp + g] = M2;
            if (!(M2 * PN_SP_ONEPASS >= s2 && s2 < INFINITY && st[g] == st[g])) {   /* true for NaN */
                st[Gp + g] = -1;   /* marks the group for the two passes below */
                nbad++;
            }
        }
        if (!nbad) return;
        /* the groups that missed the bound: their blocks' sums about sh,
         * each block once (a block may hold several such groups), the
         * groups' means, then the sums of squares about them */
        for (int kind = 0; kind < 2; kind++) {
            int64_t done = 0;   /* channels [0, done) summed */
            for (int64_t g = 0; g < G; g++) {
                if (st[Gp + g] >= 0) continue;
                const int64_t c0 = (g * Cg) / PN_SP_CB * PN_SP_CB;
                const int64_t c1 = pn_sp_cdiv((g + 1) * Cg, PN_SP_CB) * PN_SP_CB;
                if (c1 > done)
                    pn_sp_colsum_blocks(kind, a->dtype, x, NULL, nr, C, c0 > done ? c0 : done, c1, sh, mv, acc,
                                        NULL);
                done = c1;
            }
            for (int64_t g = 0; g < G; g++) {
                if (st[Gp + g] >= 0) continue;
                if (kind == 1) {
                    st[Gp + g] = Cg == 1 ? (double)acc[g] : pn_sp_sum_d(acc + g * Cg, Cg);
                    continue;
                }
                st[g] = Cg == 1 ? (double)acc[g] : pn_sp_sum_d(acc + g * Cg, Cg);
                const real m = Cg == 1 ? acc[g] / cnt : (real)st[g] / cnt;
                for (int64_t c = g * Cg; c < (g + 1) * Cg; c++) mv[c] = m;
            }
        }
        return;
    }
    /* buf converts the rows once for both passes when they need it */
    const int conv = a->dtype != PN_REAL_DTYPE && !blocks;
    if (conv) {
        pn_load_row(buf, x, a->dtype, nr * C);
        x = (const char *)buf;
    }
    const pn_dtype dt = conv ? PN_REAL_DTYPE : a->dtype;
    pn_sp_colsum(0, dt, x, NULL, nr, C, sh, NULL, acc, NULL, buf, NULL);
    if (Cg == 1) {   /* one channel per group (BatchNorm, InstanceNorm): vectors */
        for (int64_t c = 0; c < C; c++) {
            st[c] = (double)acc[c];
            mv[c] = acc[c] / cnt;
        }
    } else {
        for (int64_t g = 0; g < G; g++) {
            st[g] = pn_sp_sum_d(acc + g * Cg, Cg);
            const real m = (real)st[g] / cnt;
            for (int64_t c = g * Cg; c < (g + 1) * Cg; c++) mv[c] = m;
        }
    }
    pn_sp_colsum(1, dt, x, NULL, nr, C, sh, mv, acc, NULL, buf, NULL);
    if (Cg == 1) {
        for (int64_t c = 0; c < C; c++) st[Gp + c] = (double)acc[c];
    } else {
        for (int64_t g = 0; g < G; g++) st[Gp + g] = pn_sp_sum_d(acc + g * Cg, Cg);
    }
}

/* Rows per block written at once in NHWC: about PN_SP_PIECE values, so that
 * a block computed in a buffer is still in L1 when it is stored. */
static inline int64_t pn_sp_nhwc_block_rows(int64_t C) { return C >= PN_SP_PIECE ? 1 : PN_SP_PIECE / C; }

/* y for nr rows of C values of dtype dt (not streamed): runs of PN_SP_CB
 * channels converted in registers, computed and rounded back, row by row (y
 * may be x itself: a run is read before it is written). When every channel
 * of the set takes the folded form (see pn_sp_fold) the whole runs are
 * computed as x * sc + b; otherwise, and for the channels past the last
 * whole run, as ((x - sh) - mm) * sc + b, which is the same for a folded
 * channel (sh and mm zero). One loop body per case: a test per run made GCC
 * keep each run's results on the stack (f16: 5-9% slower than before). */
static PN_ALWAYS_INLINE void pn_sp_nhwc_norm_dt(pn_dtype dt, const char *x, char *y, int64_t nr, int64_t C,
                                                const real *sh, const real *mm, const real *sc, const real *b,
                                                int folded) {
    const int64_t es = (int64_t)pn_dtype_size(dt), cw = C - C % PN_SP_CB;
    for (int64_t r = 0; r < nr; r++) {
        const char *xr = x + r * C * es;
        char *yr = y + r * C * es;
        if (dt == PN_REAL_DTYPE) {   /* no conversion: one loop over the row */
            const real *xs = (const real *)xr;
            real *ys = (real *)yr;
            for (int64_t c = 0; c < C; c++) ys[c] = ((xs[c] - sh[c]) - mm[c]) * sc[c] + b[c];
            continue;
        }
        if (folded) {
            for (int64_t c = 0; c < cw; c += PN_SP_CB) {
                real xv[PN_SP_CB], yv[PN_SP_CB];
                pn_load_run(xv, xr + c * es, dt, PN_SP_CB);
                for (int j = 0; j < PN_SP_CB; j++) yv[j] = xv[j] * sc[c + j] + b[c + j];
                pn_store_run(yr + c * es, yv, dt, PN_SP_CB);
            }
        } else {
            for (int64_t c = 0; c < cw; c += PN_SP_CB) {
                real xv[PN_SP_CB], yv[PN_SP_CB];
                pn_load_run(xv, xr + c * es, dt, PN_SP_CB);
                for (int j = 0; j < PN_SP_CB; j++) yv[j] = ((xv[j] - sh[c + j]) - mm[c + j]) * sc[c + j] + b[c + j];
                pn_store_run(yr + c * es, yv, dt, PN_SP_CB);
            }
        }
        for (int64_t c = cw; c < C; c++) {
            real xv, yv;
            pn_load_run(&xv, xr + c * es, dt, 1);
            yv = ((xv - sh[c]) - mm[c]) * sc[c] + b[c];
            pn_store_run(yr + c * es, &yv, dt, 1);
        }
    }
}

static void pn_sp_nhwc_norm_rows(pn_dtype dt, const char *x, char *y, int64_t nr, int64_t C, const real *sh,
                                 const real *mm, const real *sc, const real *b, int folded) {
    switch (dt) {
    case PN_FLOAT32: pn_sp_nhwc_norm_dt(PN_FLOAT32, x, y, nr, C, sh, mm, sc, b, folded); break;
    case PN_FLOAT64: pn_sp_nhwc_norm_dt(PN_FLOAT64, x, y, nr, C, sh, mm, sc, b, folded); break;
    case PN_BFLOAT16: pn_sp_nhwc_norm_dt(PN_BFLOAT16, x, y, nr, C, sh, mm, sc, b, folded); break;
    case PN_FLOAT16: pn_sp_nhwc_norm_dt(PN_FLOAT16, x, y, nr, C, sh, mm, sc, b, folded); break;
    }
}

/* y for piece p's rows: ((x - sh[c]) - mm[c]) * sc[c] + b[c] (x * sc[c] +
 * b[c] in runs of folded channels, the same bits), rounded once; streamed in
 * contiguous blocks of rows computed in buf (tmp: the rounded block), else
 * written run by run. buf, tmp: rpp*C reals; folded: every channel is
 * folded (sh, mm zero). */
static inline void pn_sp_nhwc_norm(const pn_spatial_args *a, const pn_sp_nhwc *h, int64_t set, int64_t p,
                                   const real *sh, const real *mm, const real *sc, const real *b,
                                   int folded, int stream, real *buf, real *tmp) {
    const int64_t C = a->C, es = (int64_t)pn_dtype_size(a->dtype), br = pn_sp_nhwc_block_rows(C);
    int64_t r0;
    const int64_t nr = pn_sp_nhwc_piece_rows(h, set, p, &r0);
    if (!stream) {
        pn_sp_nhwc_norm_rows(a->dtype, (const char *)a->inp + r0 * C * es, (char *)a->out + r0 * C * es, nr, C, sh,
                             mm, sc, b, folded);
        return;
    }
    for (int64_t q0 = 0; q0 < nr; q0 += br) {
        const int64_t q1 = q0 + br < nr ? q0 + br : nr, off = (r0 + q0) * C * es;
        const real *x = pn_row_as_real((const char *)a->inp + off, a->dtype, buf, (q1 - q0) * C);
        for (int64_t r = 0; r < q1 - q0; r++) {
            const real *xr = x + r * C;
            real *yr = buf + r * C;
            for (int64_t c = 0; c < C; c++) yr[c] = ((xr[c] - sh[c]) - mm[c]) * sc[c] + b[c];
        }
        pn_write_row((char *)a->out + off, buf, a->dtype, (q1 - q0) * C, stream, tmp);
    }
}

/* Whether every channel of the output pass takes the folded form (sh, mm zero). */
static inline int pn_sp_nhwc_all_folded(int64_t C, const real *sh, const real *mm) {
    int all = 1;
    for (int64_t c = 0; c < C; c++) all &= sh[c] == 0 && mm[c] == 0;
    return all;
}

/* A set's shift per channel: the first value of each group in the set. */
static inline void pn_sp_nhwc_shift(const pn_spatial_args *a, const pn_sp_nhwc *h, int64_t set, real *sh) {
    const int64_t C = a->C;
    for (int64_t g = 0; g < h->G; g++) {
        const real v = pn_sp_value(a->inp, a->dtype, set * h->rows * C + g * h->Cg);
        for (int64_t c = g * h->Cg; c < (g + 1) * h->Cg; c++) sh[c] = v;
    }
}

/* Statistics of groups g0..g1-1 (at most PN_SP_GB) of a set: their pieces'
 * (sum, M2) merged in order as pn_sp_merge merges (mean, M2), one group per
 * lane (the pieces' counts are the same for every group); then the saved
 * statistics and the output pass's vectors for the group's channels: sc
 * (rstd * w), and ns, mm, bb: the shift, the mean of x - shift and b, or, in
 * a folded group (pn_sp_fold), 0, 0 and beta. */
static inline void pn_sp_nhwc_merge(const pn_spatial_args *a, const pn_sp_nhwc *h, int64_t set, int64_t g0,
                                    int64_t g1, const double *pst, const real *sh, const real *w, const real *b,
                                    real *ns, real *mm, real *sc, real *bb) {
    const int64_t Cg = h->Cg, Gp = pn_sp_pad(h->G), np = h->np, ng = g1 - g0;
    const int64_t total = h->rows * Cg, full = h->rpp * Cg, tail = total - full * (np - 1);
    const double *st0 = pst + set * np * 2 * Gp + g0;   /* piece p's sums at st0 + p * 2 * Gp */
    double m[PN_SP_GB], M2[PN_SP_GB], comp[PN_SP_GB];
    for (int64_t j = 0; j < ng; j++) m[j] = M2[j] = comp[j] = 0;
    for (int64_t p = 0; p < np; p++) {
        const double *st = st0 + p * 2 * Gp;
        for (int64_t j = 0; j < ng; j++) pn_sp_kadd(&m[j], &comp[j], st[j]);
    }
    for (int64_t j = 0; j < ng; j++) m[j] = (m[j] + comp[j]) / (double)total;
    for (int64_t p = 0; p < np; p++) {   /* the pieces' means by a reciprocal: only d^2 * nb needs them */
        const double *st = st0 + p * 2 * Gp, nb = (double)(p + 1 < np ? full : tail), inb = 1 / nb;
        for (int64_t j = 0; j < ng; j++) {
            const double d = st[j] * inb - m[j];
            M2[j] += st[Gp + j] + d * d * nb;
        }
    }
    for (int64_t j = 0; j < ng; j++) {
        const int64_t g = g0 + j;
        const real shift = sh[g * Cg];
        const real rs = pn_sp_finish(a, set * h->G + g, shift, m[j], M2[j] / (double)total, total);
        const double mean = (double)shift + m[j];
        const int fold = pn_sp_fold(a, mean, rs);
        for (int64_t c = g * Cg; c < (g + 1) * Cg; c++) {
            sc[c] = rs * w[c];
            ns[c] = fold ? 0 : shift;
            mm[c] = fold ? 0 : (real)m[j];
            bb[c] = fold ? pn_sp_beta(b[c], mean, sc[c]) : b[c];
        }
    }
}

/* The whole forward over NHWC rows with statistics per set (GroupNorm,
 * InstanceNorm, BatchNorm training; BatchNorm eval is sp_eval_forward). */
pn_status PN_KERNEL(sp_nhwc_forward)(const pn_spatial_args *a) {
    const int64_t C = a->C;
    const pn_sp_nhwc h = pn_sp_nhwc_layout(a);
    const int64_t ns = h.nsets, np = h.np, G = h.G, Cp = pn_sp_pad(C);
    const int stream = pn_sp_stream(a, (h.rpp < pn_sp_nhwc_block_rows(C) ? h.rpp : pn_sp_nhwc_block_rows(C)) * C);
    const int nt = pn_sp_threads(a->N * C * a->S);
    const int local = ns >= 4 * (int64_t)nt;
    const int64_t lchunk = pn_sp_local_chunk(ns, nt), pchunk = pn_sp_local_chunk(ns * h.np, nt);
    const int64_t Gp = pn_sp_pad(G), nblk = pn_sp_cdiv(G, PN_SP_GB);
    /* the vectors sh (the statistics' shift) and the output pass's nsh
     * (shift), mm (mean of x - shift), sc (rstd * w) and bb (bias): per
     * thread (set-local), or per set with a flag each (all folded) */
    const int64_t nvec = local ? nt : ns, nv = 5;
    const int64_t bufn = pn_sp_pad(h.rpp * C);
    const int64_t per_thread = 2 * Cp + 2 * bufn;
    pn_sp_mem mem;
    /* [w | b | sh, nsh, mm, sc, bb per set or thread | flags | piece stats | per thread: acc, mv, buf, tmp] */
    pn_status st = pn_sp_alloc(&mem, 2 * Cp + nv * nvec * Cp + pn_sp_pad(ns) + pn_sp_dreals(ns * np * 2 * Gp) +
                                         nt * per_thread);
    if (st) return st;
    real *w = pn_sp_take(&mem, C), *b = pn_sp_take(&mem, C);
    real *vecs = pn_sp_take(&mem, nv * nvec * Cp);   /* vector k of slot i at vecs + (i * nv + k) * Cp */
    real *allf = pn_sp_take(&mem, ns);
    double *pst = pn_sp_take_d(&mem, ns * np * 2 * Gp);
    real *bufs = pn_sp_take(&mem, nt * per_thread);
    pn_sp_params(a, w, b);
    if (!local) {
        for (int64_t set = 0; set < ns; set++) pn_sp_nhwc_shift(a, &h, set, vecs + set * nv * Cp);
    }

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = pn_thread_id();
        real *acc = bufs + tid * per_thread, *mv = acc + Cp, *buf = mv + Cp, *tmp = buf + bufn;
        if (local) {
            real *sh = vecs + tid * nv * Cp, *nsh = sh + Cp, *mm = nsh + Cp, *sc = mm + Cp, *bb = sc + Cp;
#pragma omp for schedule(dynamic, lchunk)
            for (int64_t set = 0; set < ns; set++) {
                pn_sp_nhwc_shift(a, &h, set, sh);
                for (int64_t p = 0; p < np; p++) {
                    pn_sp_nhwc_piece_stats(a, &h, set, p, sh, acc, mv, buf, pst + (set * np + p) * 2 * Gp);
                }
                for (int64_t g = 0; g < G; g += PN_SP_GB)
                    pn_sp_nhwc_merge(a, &h, set, g, g + PN_SP_GB < G ? g + PN_SP_GB : G, pst, sh, w, b, nsh, mm, sc,
                                     bb);
                const int folded = pn_sp_nhwc_all_folded(C, nsh, mm);
                for (int64_t p = 0; p < np; p++)
                    pn_sp_nhwc_norm(a, &h, set, p, nsh, mm, sc, bb, folded, stream, buf, tmp);
            }
        } else {
#pragma omp for schedule(dynamic, pchunk)
            for (int64_t t = 0; t < ns * np; t++) {
                pn_sp_nhwc_piece_stats(a, &h, t / np, t % np, vecs + (t / np) * nv * Cp, acc, mv, buf,
                                       pst + t * 2 * Gp);
            }
#pragma omp for schedule(static)
            for (int64_t t = 0; t < ns * nblk; t++) {
                const int64_t set = t / nblk, g0 = (t % nblk) * PN_SP_GB, g1 = g0 + PN_SP_GB < G ? g0 + PN_SP_GB : G;
                real *sh = vecs + set * nv * Cp;
                pn_sp_nhwc_merge(a, &h, set, g0, g1, pst, sh, w, b, sh + Cp, sh + 2 * Cp, sh + 3 * Cp, sh + 4 * Cp);
            }
#pragma omp for schedule(static)
            for (int64_t set = 0; set < ns; set++) {
                real *sh = vecs + set * nv * Cp;
                allf[set] = (real)pn_sp_nhwc_all_folded(C, sh + Cp, sh + 2 * Cp);
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < ns * np; t++) {
                const real *sh = vecs + (t / np) * nv * Cp;
                pn_sp_nhwc_norm(a, &h, t / np, t % np, sh + Cp, sh + 2 * Cp, sh + 3 * Cp, sh + 4 * Cp,
                                allf[t / np] != 0, stream, buf, tmp);
            }
        }
    }
    if (stream) pn_stream_fence();
    pn_sp_release(&mem);
    return PN_OK;
}

/* ---- NHWC backward ------------------------------------------------------------- */

/* Piece p of a set: per channel, sum(dy) and sum(dy * (x - mu[c])) down its
 * rows, into part[0..C) and part[Cp..Cp+C). xb, dyb: rpp*C reals. */
static inline void pn_sp_nhwc_bwd_piece(const pn_spatial_args *a, const pn_sp_nhwc *h, int64_t set,
                                        int64_t p, const real *mu, real *part, int64_t Cp, real *xb,
                                        real *dyb) {
    const int64_t C = a->C;
    const size_t es = pn_dtype_size(a->dtype);
    int64_t r0;
    const int64_t nr = pn_sp_nhwc_piece_rows(h, set, p, &r0);
    pn_sp_colsum(2, a->dtype, (const char *)a->inp + r0 * C * (int64_t)es, (const char *)a->dout + r0 * C * (int64_t)es,
                 nr, C, mu, NULL, part, part + Cp, xb, dyb);
}

/* dx for piece p's rows: rs[c] * ((dy * w[c] - k1[c]) - (x - mu[c]) * k2[c]),
 * added to the old dx when accumulating, in contiguous blocks of rows. xb,
 * dyb, tmp: rpp*C reals. */
static inline void pn_sp_nhwc_dx(const pn_spatial_args *a, const pn_sp_nhwc *h, int64_t set, int64_t p,
                                 const real *mu, const real *rs, const real *w, const real *k1,
                                 const real *k2, int stream, real *xb, real *dyb, real *tmp) {
    const int64_t C = a->C, es = (int64_t)pn_dtype_size(a->dtype), br = pn_sp_nhwc_block_rows(C);
    const int direct = a->dtype == PN_REAL_DTYPE && !a->accumulate && !stream;
    int64_t r0;
    const int64_t nr = pn_sp_nhwc_piece_rows(h, set, p, &r0);
    for (int64_t q0 = 0; q0 < nr; q0 += br) {
        const int64_t q1 = q0 + br < nr ? q0 + br : nr, n = (q1 - q0) * C, off = (r0 + q0) * C * es;
        const real *x = pn_row_as_real((const char *)a->inp + off, a->dtype, xb, n);
        const real *dy = pn_row_as_real((const char *)a->dout + off, a->dtype, dyb, n);
        void *dst = (char *)a->dinp + off;
        real *dx = direct ? (real *)dst : xb;   /* xb: x is read before dx is written */
        for (int64_t r = 0; r < q1 - q0; r++) {
            const real *xr = x + r * C, *dr = dy + r * C;
            real *o = dx + r * C;
            for (int64_t c = 0; c < C; c++) o[c] = rs[c] * ((dr[c] * w[c] - k1[c]) - (xr[c] - mu[c]) * k2[c]);
        }
        if (direct) continue;
        if (a->accumulate) {
            pn_load_row(tmp, dst, a->dtype, n);
            for (int64_t i = 0; i < n; i++) dx[i] += tmp[i];
        }
        pn_write_row(dst, dx, a->dtype, n, stream, tmp);
    }
}

/* Per set: the per-channel vectors mu, rs (from the saved statistics). */
static inline void pn_sp_nhwc_saved(const pn_spatial_args *a, const pn_sp_nhwc *h, int64_t set, real *mu,
                                    real *rs) {
    const real *sm = (const real *)a->smean, *sr = (const real *)a->srstd;
    for (int64_t g = 0; g < h->G; g++)
        for (int64_t c = g * h->Cg; c < (g + 1) * h->Cg; c++) {
            mu[c] = sm[set * h->G + g];
            rs[c] = sr[set * h->G + g];
        }
}

/* Channels c0..c1-1 (at most PN_SP_GB) of a set: their totals over the
 * set's pieces, added in order in double, one channel per lane:
 * tot[c] = sum(dy), tot[Cp + c] = sum(dy * (x - mu)) (doubles). */
static inline void pn_sp_nhwc_bwd_totals(const pn_sp_nhwc *h, int64_t set, int64_t c0, int64_t c1,
                                         const real *part, double *tot, int64_t Cp) {
    double s[PN_SP_GB], sx[PN_SP_GB];
    const int64_t n = c1 - c0;
    for (int64_t j = 0; j < n; j++) s[j] = sx[j] = 0;
    for (int64_t p = 0; p < h->np; p++) {
        const real *ps = part + (set * h->np + p) * 2 * Cp + c0;
        for (int64_t j = 0; j < n; j++) {
            s[j] += (double)ps[j];
            sx[j] += (double)ps[Cp + j];
        }
    }
    for (int64_t j = 0; j < n; j++) {
        tot[c0 + j] = s[j];
        tot[Cp + c0 + j] = sx[j];
    }
}

/* Group g of a set: the coefficients k1, k2 of its channels (see the NCHW
 * backward) from the channels' totals; then the totals of sum(dy * (x - mu))
 * become shares of dweight (times rstd). */
static inline void pn_sp_nhwc_bwd_coeffs(const pn_spatial_args *a, const pn_sp_nhwc *h, int64_t g,
                                         double *tot, int64_t Cp, const real *w, const real *rs,
                                         real *k1, real *k2) {
    const int64_t Cg = h->Cg;
    const double M = (double)(h->rows * Cg);
    const int consts = a->batchnorm && !a->training;
    double sg = 0, sgx = 0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; c++) {
        sg += (double)w[c] * tot[c];
        sgx += (double)w[c] * tot[Cp + c];
    }
    const double r = (double)rs[g * Cg];
    for (int64_t c = g * Cg; c < (g + 1) * Cg; c++) {
        k1[c] = consts ? 0 : (real)(sg / M);
        k2[c] = consts ? 0 : (real)(r * r * sgx / M);
        tot[Cp + c] = r * tot[Cp + c];   /* now the channel's share of dweight */
    }
}

pn_status PN_KERNEL(sp_nhwc_backward)(const pn_spatial_args *a) {
    const int64_t C = a->C, Cp = pn_sp_pad(C);
    const pn_sp_nhwc h = pn_sp_nhwc_layout(a);
    const int64_t ns = h.nsets, np = h.np;
    const int stream = pn_sp_stream(a, (h.rpp < pn_sp_nhwc_block_rows(C) ? h.rpp : pn_sp_nhwc_block_rows(C)) * C);
    const int nt = pn_sp_threads(a->N * C * a->S);
    int64_t ntot;
    real *part = pn_scratch_reals(a->scratch);
    double *tot = (double *)((char *)part + pn_sp_parts_bytes(pn_sp_scratch_parts(a, &ntot), a->dtype));
    const int64_t bufn = pn_sp_pad(h.rpp * C);
    const int local = ns >= 4 * (int64_t)nt;
    const int64_t lchunk = pn_sp_local_chunk(ns, nt), pchunk = pn_sp_local_chunk(ns * np, nt);
    /* the vectors mu, rs, k1, k2: per thread (set-local), or per set */
    const int64_t nvec = local ? nt : ns;
    const int64_t per_thread = 3 * bufn;
    pn_sp_mem mem;
    /* [w | mu, rs, k1, k2 per set or thread | per thread: xb, dyb, tmp] */
    pn_status st = pn_sp_alloc(&mem, Cp + 4 * nvec * Cp + nt * per_thread);
    if (st) return st;
    real *w = pn_sp_take(&mem, C);
    real *muv = pn_sp_take(&mem, nvec * Cp), *rsv = pn_sp_take(&mem, nvec * Cp);
    real *k1v = pn_sp_take(&mem, nvec * Cp), *k2v = pn_sp_take(&mem, nvec * Cp);
    real *bufs = pn_sp_take(&mem, nt * per_thread);
    pn_sp_params(a, w, NULL);

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = pn_thread_id();
        real *xb = bufs + tid * per_thread, *dyb = xb + bufn, *tmp = dyb + bufn;
        if (local) {
            real *mu = muv + tid * Cp, *rs = rsv + tid * Cp, *k1 = k1v + tid * Cp, *k2 = k2v + tid * Cp;
#pragma omp for schedule(dynamic, lchunk)
            for (int64_t set = 0; set < ns; set++) {
                pn_sp_nhwc_saved(a, &h, set, mu, rs);
                for (int64_t p = 0; p < np; p++) {
                    pn_sp_nhwc_bwd_piece(a, &h, set, p, mu, part + (set * np + p) * 2 * Cp, Cp, xb, dyb);
                }
                for (int64_t c = 0; c < C; c += PN_SP_GB)
                    pn_sp_nhwc_bwd_totals(&h, set, c, c + PN_SP_GB < C ? c + PN_SP_GB : C, part, tot + set * 2 * Cp,
                                          Cp);
                for (int64_t g = 0; g < h.G; g++)
                    pn_sp_nhwc_bwd_coeffs(a, &h, g, tot + set * 2 * Cp, Cp, w, rs, k1, k2);
                if (a->dinp)
                    for (int64_t p = 0; p < np; p++)
                        pn_sp_nhwc_dx(a, &h, set, p, mu, rs, w, k1, k2, stream, xb, dyb, tmp);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t set = 0; set < ns; set++) pn_sp_nhwc_saved(a, &h, set, muv + set * Cp, rsv + set * Cp);
#pragma omp for schedule(dynamic, pchunk)
            for (int64_t t = 0; t < ns * np; t++) {
                pn_sp_nhwc_bwd_piece(a, &h, t / np, t % np, muv + (t / np) * Cp, part + t * 2 * Cp, Cp, xb, dyb);
            }
            /* totals parallel over blocks of channels, then the groups' coefficients */
            const int64_t nblk = pn_sp_cdiv(C, PN_SP_GB);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < ns * nblk; t++) {
                const int64_t set = t / nblk, c0 = (t % nblk) * PN_SP_GB;
                pn_sp_nhwc_bwd_totals(&h, set, c0, c0 + PN_SP_GB < C ? c0 + PN_SP_GB : C, part,
                                      tot + set * 2 * Cp, Cp);
            }
#pragma omp for schedule(static)
            for (int64_t t = 0; t < ns * h.G; t++) {
                const int64_t o = (t / h.G) * Cp;
                pn_sp_nhwc_bwd_coeffs(a, &h, t % h.G, tot + (t / h.G) * 2 * Cp, Cp, w, rsv + o, k1v + o, k2v + o);
            }
            if (a->dinp) {
#pragma omp for schedule(dynamic, 1)
                for (int64_t t = 0; t < ns * np; t++) {
                    const int64_t o = (t / np) * Cp;
                    pn_sp_nhwc_dx(a, &h, t / np, t % np, muv + o, rsv + o, w, k1v + o, k2v + o, stream, xb, dyb,
                                  tmp);
                }
            }
        }
        /* dweight, dbias: per channel, the sets' shares in order; blocks of
         * channels, one per lane */
        if (a->dweight || a->dbias) {
            const int64_t ncb = pn_sp_cdiv(C, PN_SP_GB);
#pragma omp for schedule(static)
            for (int64_t k = 0; k < ncb; k++) {
                const int64_t c0 = k * PN_SP_GB, n = c0 + PN_SP_GB < C ? PN_SP_GB : C - c0;
                double dw[PN_SP_GB], db[PN_SP_GB];
                for (int64_t j = 0; j < n; j++) dw[j] = db[j] = 0;
                for (int64_t set = 0; set < ns; set++) {
                    const double *t = tot + set * 2 * Cp + c0;
                    for (int64_t j = 0; j < n; j++) {
                        db[j] += t[j];
                        dw[j] += t[Cp + j];
                    }
                }
                for (int64_t j = 0; j < n; j++) pn_sp_param_grads(a, c0 + j, dw[j], db[j]);
            }
        }
    }
    if (stream) pn_stream_fence();
    pn_sp_release(&mem);
    return PN_OK;
}


#endif /* PN_KERNEL_BUILD */
