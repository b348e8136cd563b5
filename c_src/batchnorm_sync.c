/* batchnorm_sync.c - synchronized BatchNorm: the batch split across processes
 * (data parallel), the per-channel statistics combined exactly (see pynorm.h).
 *
 * stats:    per channel, over this process's M = N*S values, in double:
 *           x0 = its first value, m' = sum(x - x0)/M, M2 = sum(((x - x0) - m')^2),
 *           mean = x0 + m'
 * combine:  n = sum(n_p), mean = sum(n_p mean_p)/n,
 *           M2 = sum(M2_p) + sum(n_p (mean_p - mean)^2) (shards in order),
 *           rstd = 1/sqrt(M2/n + eps); running statistics as batchnorm.c
 * apply:    y = (x - mean) * rstd * w + b
 * backward: S_dy = sum dy, S_dyx = sum dy * (x - mean) (totalled by the caller);
 *           dx = (dy - S_dy/n - (x - mean) * rstd^2 * S_dyx/n) * rstd * w
 *           dw = rstd * local S_dyx, db = local S_dy
 *
 * Compiled once, computing in double. A channel (NCHW: N rows of S values) or
 * a block of 64 channels (NHWC: N*S rows, 64 values of each) is one task,
 * taken by one thread and summed in a fixed order: the same bits for every
 * thread count.
 */
#include "common.h"

typedef double real;
#include "dtype.h"

#define BLK 64

typedef struct {
    int64_t N, C, S;
    int nchw;
    size_t es;
} bn_shape;

static int64_t bn_tasks(const bn_shape *g) { return g->nchw ? g->C : (g->C + BLK - 1) / BLK; }
static int64_t bn_segs(const bn_shape *g) { return g->nchw ? g->N : g->N * g->S; }
/* task t: channels [c0, c0 + nc); segment k of it: len values at element off */
static void bn_task(const bn_shape *g, int64_t t, int64_t *c0, int64_t *nc) {
    *c0 = g->nchw ? t : t * BLK;
    *nc = g->nchw ? 1 : (g->C - *c0 < BLK ? g->C - *c0 : BLK);
}
static int64_t bn_len(const bn_shape *g, int64_t nc) { return g->nchw ? g->S : nc; }
static int64_t bn_off(const bn_shape *g, int64_t k, int64_t c0) {
    return g->nchw ? (k * g->C + c0) * g->S : k * g->C + c0;
}
static const void *bn_at(const void *base, const bn_shape *g, int64_t off) {
    return (const char *)base + off * (int64_t)g->es;
}
/* the local channel of value j of a segment */
#define KIDX(j) (g.nchw ? 0 : (j))

static int bn_threads(const bn_shape *g) {
    int nt = pn_threads();
    return (g->N * g->C * g->S < PN_PARALLEL_MIN_ELEMS || nt < 1) ? 1 : nt;
}

/* per-thread buffers: nbuf arrays of the longest segment, in doubles */
static double *bn_buffers(const bn_shape *g, int nt, int nbuf, int64_t *len) {
    *len = ((g->nchw ? g->S : BLK) + 7) & ~(int64_t)7;
    return (double *)malloc((size_t)nt * (size_t)nbuf * (size_t)*len * sizeof(double));
}

/* C values of a parameter as doubles (fill where absent). */
static double *bn_param(const void *p, pn_dtype dt, int64_t C, double fill, double *mem) {
    if (p) pn_load_row(mem, p, dt, C);
    else for (int64_t c = 0; c < C; c++) mem[c] = fill;
    return mem;
}

/* ---- checks ------------------------------------------------------------------ */

static pn_view flat(const void *p, int64_t n, size_t esize) {
    pn_view v = {p, 1, 1, {0, 0}, n, esize};
    return v;
}

static pn_status bn_check(bn_shape *g, int64_t N, int64_t C, int64_t S, pn_layout layout,
                          pn_dtype dtype, pn_dtype wdtype) {
    pn_status st;
    if ((st = pn_check_dtypes(dtype, wdtype))) return st;
    if (layout != PN_NCHW && layout != PN_NHWC) return PN_ERR_ARG;
    if ((st = pn_check_sizes(N, C, S, dtype))) return st;
    g->N = N; g->C = C; g->S = S;
    g->nchw = layout == PN_NCHW && S > 1;
    g->es = pn_dtype_size(dtype);
    return PN_OK;
}

/* ---- stats ------------------------------------------------------------------- */

pn_status pn_batchnorm_shard_stats(double *part, const void *inp, int64_t N, int64_t C, int64_t S,
                                   pn_layout layout, pn_dtype dtype) {
    bn_shape g;
    pn_status st;
    if (!part || !inp) return PN_ERR_NULL;
    if ((st = bn_check(&g, N, C, S, layout, dtype, dtype))) return st;
    pn_view outs[1] = {flat(part, 2 * C, 8)};
    pn_view ins[1] = {flat(inp, N * C * S, g.es)};
    if ((st = pn_check_views(outs, 1, ins, 1, NULL))) return st;
    const int nt = bn_threads(&g);
    int64_t len;
    double *bufs = bn_buffers(&g, nt, 1, &len);
    if (!bufs) return PN_ERR_ALLOC;
    const int64_t M = N * S, nseg = bn_segs(&g);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < bn_tasks(&g); t++) {
        double *buf = bufs + (int64_t)pn_thread_id() * len;
        double shift[BLK], s1[BLK], m2[BLK];
        int64_t c0, nc;
        bn_task(&g, t, &c0, &nc);
        const int64_t L = bn_len(&g, nc);
        pn_load_row(buf, bn_at(inp, &g, bn_off(&g, 0, c0)), dtype, L);
        for (int64_t k = 0; k < nc; k++) { shift[k] = buf[k]; s1[k] = 0; m2[k] = 0; }
        for (int64_t k = 0; k < nseg; k++) {
            pn_load_row(buf, bn_at(inp, &g, bn_off(&g, k, c0)), dtype, L);
            for (int64_t j = 0; j < L; j++) s1[KIDX(j)] += buf[j] - shift[KIDX(j)];
        }
        for (int64_t k = 0; k < nc; k++) s1[k] /= (double)M;   /* the mean of x - x0 */
        for (int64_t k = 0; k < nseg; k++) {
            pn_load_row(buf, bn_at(inp, &g, bn_off(&g, k, c0)), dtype, L);
            for (int64_t j = 0; j < L; j++) {
                const double d = (buf[j] - shift[KIDX(j)]) - s1[KIDX(j)];
                m2[KIDX(j)] += d * d;
            }
        }
        for (int64_t k = 0; k < nc; k++) {
            part[2 * (c0 + k)] = shift[k] + s1[k];
            part[2 * (c0 + k) + 1] = m2[k];
        }
    }
    free(bufs);
    return PN_OK;
}

/* ---- combine ----------------------------------------------------------------- */

pn_status pn_batchnorm_shard_combine(double *mean, double *rstd, void *running_mean, void *running_var,
                                     const double *parts, const int64_t *counts, int64_t nshards,
                                     int64_t C, double eps, double momentum,
                                     int64_t num_batches_tracked, int flags, pn_dtype rdtype) {
    pn_status st;
    int64_t n = 0, np;
    const int update = running_mean || running_var;
    if (!parts || !counts) return PN_ERR_NULL;
    if (flags & ~PN_BN_CUMULATIVE) return PN_ERR_ARG;
    if (nshards <= 0 || C <= 0 || __builtin_mul_overflow(C, 2 * nshards, &np) || np > INT64_MAX / 8)
        return PN_ERR_SIZE;
    for (int64_t p = 0; p < nshards; p++)
        if (counts[p] < 0 || __builtin_add_overflow(n, counts[p], &n)) return PN_ERR_SIZE;
    if (n <= 1) return PN_ERR_SIZE;   /* torch: "more than 1 value per channel" */
    if ((st = pn_check_eps(eps))) return st;
    if (update && pn_check_dtypes(rdtype, rdtype)) return PN_ERR_DTYPE;
    double f = momentum;
    if (update) {
        if (flags & PN_BN_CUMULATIVE) {
            if (num_batches_tracked < 1) return PN_ERR_ARG;
            f = 1.0 / (double)num_batches_tracked;
        } else if (!(momentum == momentum && fabs(momentum) <= 1e300)) {
            return PN_ERR_ARG;
        }
    }
    const size_t res = update ? pn_dtype_size(rdtype) : 1;
    pn_view outs[4] = {flat(mean, C, 8), flat(rstd, C, 8), flat(running_mean, C, res), flat(running_var, C, res)};
    pn_view ins[2] = {flat(parts, np, 8), flat(counts, nshards, 8)};
    if ((st = pn_check_views(outs, 4, ins, 2, NULL))) return st;
    const double invn = 1.0 / (double)n;
    for (int64_t c = 0; c < C; c++) {
        double sm = 0, m2 = 0;
        for (int64_t p = 0; p < nshards; p++)
            if (counts[p]) sm += (double)counts[p] * parts[(p * C + c) * 2];
        const double m = sm * invn;
        for (int64_t p = 0; p < nshards; p++) {
            if (!counts[p]) continue;
            const double d = parts[(p * C + c) * 2] - m;
            m2 += parts[(p * C + c) * 2 + 1] + (double)counts[p] * d * d;
        }
        if (mean) mean[c] = m;
        if (rstd) rstd[c] = 1 / sqrt(m2 * invn + eps);
        if (running_mean) {
            double v;
            char *p = (char *)running_mean + c * (int64_t)res;
            pn_load_row(&v, p, rdtype, 1);
            v = (1 - f) * v + f * m;
            pn_store_row(p, &v, rdtype, 1);
        }
        if (running_var) {
            double v;
            char *p = (char *)running_var + c * (int64_t)res;
            pn_load_row(&v, p, rdtype, 1);
            v = (1 - f) * v + f * (m2 / (double)(n - 1));
            pn_store_row(p, &v, rdtype, 1);
        }
    }
    return PN_OK;
}

/* ---- apply ------------------------------------------------------------------- */

pn_status pn_batchnorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
                                   const double *mean, const double *rstd,
                                   int64_t N, int64_t C, int64_t S,
                                   pn_layout layout, pn_dtype dtype, pn_dtype wdtype) {
    bn_shape g;
    pn_status st;
    if (!out || !inp || !mean || !rstd) return PN_ERR_NULL;
    if ((st = bn_check(&g, N, C, S, layout, dtype, wdtype))) return st;
    const int64_t n = N * C * S;
    const size_t wes = pn_dtype_size(wdtype);
    pn_view outs[1] = {flat(out, n, g.es)};
    pn_view ins[5] = {flat(inp, n, g.es), flat(weight, C, wes), flat(bias, C, wes), flat(mean, C, 8),
                      flat(rstd, C, 8)};
    static const unsigned char same_ok[5] = {1, 0, 0, 0, 0};
    if ((st = pn_check_views(outs, 1, ins, 5, same_ok))) return st;
    const int nt = bn_threads(&g);
    int64_t len;
    double *bufs = bn_buffers(&g, nt, 1, &len);
    double *wb = (double *)malloc(2 * (size_t)C * sizeof(double));
    if (!bufs || !wb) { free(bufs); free(wb); return PN_ERR_ALLOC; }
    const double *w = bn_param(weight, wdtype, C, 1, wb), *b = bn_param(bias, wdtype, C, 0, wb + C);
    const int64_t nseg = bn_segs(&g);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < bn_tasks(&g); t++) {
        double *buf = bufs + (int64_t)pn_thread_id() * len;
        int64_t c0, nc;
        bn_task(&g, t, &c0, &nc);
        const int64_t L = bn_len(&g, nc);
        for (int64_t k = 0; k < nseg; k++) {
            const int64_t off = bn_off(&g, k, c0);
            pn_load_row(buf, bn_at(inp, &g, off), dtype, L);
            for (int64_t j = 0; j < L; j++) {
                const int64_t c = c0 + KIDX(j);
                buf[j] = (buf[j] - mean[c]) * rstd[c] * w[c] + b[c];
            }
            pn_store_row((char *)out + off * (int64_t)g.es, buf, dtype, L);
        }
    }
    free(bufs);
    free(wb);
    return PN_OK;
}

/* ---- backward ------------------------------------------------------------------ */

pn_status pn_batchnorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
                                           const double *mean, int64_t N, int64_t C, int64_t S,
                                           pn_layout layout, pn_dtype dtype) {
    bn_shape g;
    pn_status st;
    if (!sums || !dout || !inp || !mean) return PN_ERR_NULL;
    if ((st = bn_check(&g, N, C, S, layout, dtype, dtype))) return st;
    const int64_t n = N * C * S;
    pn_view outs[1] = {flat(sums, 2 * C, 8)};
    pn_view ins[3] = {flat(dout, n, g.es), flat(inp, n, g.es), flat(mean, C, 8)};
    if ((st = pn_check_views(outs, 1, ins, 3, NULL))) return st;
    const int nt = bn_threads(&g);
    int64_t len;
    double *bufs = bn_buffers(&g, nt, 2, &len);
    if (!bufs) return PN_ERR_ALLOC;
    const int64_t nseg = bn_segs(&g);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < bn_tasks(&g); t++) {
        double *xb = bufs + (int64_t)pn_thread_id() * 2 * len, *db = xb + len;
        double sdy[BLK] = {0}, sdx[BLK] = {0};
        int64_t c0, nc;
        bn_task(&g, t, &c0, &nc);
        const int64_t L = bn_len(&g, nc);
        for (int64_t k = 0; k < nseg; k++) {
            const int64_t off = bn_off(&g, k, c0);
            pn_load_row(xb, bn_at(inp, &g, off), dtype, L);
            pn_load_row(db, bn_at(dout, &g, off), dtype, L);
            for (int64_t j = 0; j < L; j++) {
                sdy[KIDX(j)] += db[j];
                sdx[KIDX(j)] += db[j] * (xb[j] - mean[c0 + KIDX(j)]);
            }
        }
        for (int64_t k = 0; k < nc; k++) {
            sums[2 * (c0 + k)] = sdy[k];
            sums[2 * (c0 + k) + 1] = sdx[k];
        }
    }
    free(bufs);
    return PN_OK;
}

pn_status pn_batchnorm_shard_backward(void *dinp, void *dweight, void *dbias,
                                      const void *dout, const void *inp, const void *weight,
                                      const double *mean, const double *rstd,
                                      const double *local_sums, const double *sums, int64_t count,
                                      int64_t N, int64_t C, int64_t S, int flags,
                                      pn_layout layout, pn_dtype dtype, pn_dtype wdtype) {
    bn_shape g;
    pn_status st;
    const int acc = (flags & PN_ACCUMULATE) != 0;
    if (flags & ~PN_ACCUMULATE) return PN_ERR_ARG;
    if (!dout || !inp || !mean || !rstd) return PN_ERR_NULL;
    if (dinp && !sums) return PN_ERR_NULL;
    if ((dweight || dbias) && !local_sums) return PN_ERR_NULL;
    if ((st = bn_check(&g, N, C, S, layout, dtype, wdtype))) return st;
    if (dinp && count < N * S) return PN_ERR_SIZE;   /* the total covers this process's values */
    const int64_t n = N * C * S;
    const size_t wes = pn_dtype_size(wdtype);
    pn_view outs[3] = {flat(dinp, n, g.es), flat(dweight, C, wes), flat(dbias, C, wes)};
    pn_view ins[7] = {flat(dout, n, g.es), flat(inp, n, g.es), flat(weight, C, wes), flat(mean, C, 8),
                      flat(rstd, C, 8), flat(local_sums, 2 * C, 8), flat(sums, 2 * C, 8)};
    static const unsigned char same_ok[3 * 7] = {1, 1, 0, 0, 0, 0, 0};
    if ((st = pn_check_views(outs, 3, ins, 7, same_ok))) return st;
    const int nt = bn_threads(&g);
    int64_t len;
    double *bufs = bn_buffers(&g, nt, 3, &len);
    double *wv = (double *)malloc(2 * (size_t)C * sizeof(double));
    if (!bufs || !wv) { free(bufs); free(wv); return PN_ERR_ALLOC; }
    const double *w = bn_param(weight, wdtype, C, 1, wv);
    double *v = wv + C;
    /* parameter gradients first: dx may overwrite dy or x, never the sums */
    if (dweight) {
        if (acc) pn_load_row(v, dweight, wdtype, C);
        for (int64_t c = 0; c < C; c++) v[c] = (acc ? v[c] : 0) + local_sums[2 * c + 1] * rstd[c];
        pn_store_row(dweight, v, wdtype, C);
    }
    if (dbias) {
        if (acc) pn_load_row(v, dbias, wdtype, C);
        for (int64_t c = 0; c < C; c++) v[c] = (acc ? v[c] : 0) + local_sums[2 * c];
        pn_store_row(dbias, v, wdtype, C);
    }
    if (dinp) {
        const double invn = 1.0 / (double)count;
        const int64_t nseg = bn_segs(&g);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
        for (int64_t t = 0; t < bn_tasks(&g); t++) {
            double *xb = bufs + (int64_t)pn_thread_id() * 3 * len, *db = xb + len, *ob = db + len;
            int64_t c0, nc;
            bn_task(&g, t, &c0, &nc);
            const int64_t L = bn_len(&g, nc);
            for (int64_t k = 0; k < nseg; k++) {
                const int64_t off = bn_off(&g, k, c0);
                pn_load_row(xb, bn_at(inp, &g, off), dtype, L);
                pn_load_row(db, bn_at(dout, &g, off), dtype, L);
                if (acc) pn_load_row(ob, bn_at(dinp, &g, off), dtype, L);
                for (int64_t j = 0; j < L; j++) {
                    const int64_t c = c0 + KIDX(j);
                    const double rs = rstd[c];
                    const double gx = (db[j] - sums[2 * c] * invn -
                                       (xb[j] - mean[c]) * rs * rs * (sums[2 * c + 1] * invn)) * rs * w[c];
                    ob[j] = acc ? ob[j] + gx : gx;
                }
                pn_store_row((char *)dinp + off * (int64_t)g.es, ob, dtype, L);
            }
        }
    }
    free(bufs);
    free(wv);
    return PN_OK;
}
