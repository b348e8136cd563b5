/* layernorm.c - LayerNorm over the last axis C of B x T rows.
 *
 * forward:  mean = sum(x)/C,  var = sum((x - mean)^2)/C,  rstd = 1/sqrt(var + eps)
 *           y = (x - mean) * rstd * w + b
 * backward: xhat = (x - mean) * rstd,  g = dy * w
 *           dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
 *           dw = sum over rows of dy * xhat,  db = sum over rows of dy
 *
 * The statistics are taken on the row shifted by a value near its centre
 * (the mean of its first 16 values; the first value in the two-pass
 * fallback). With mean 1e4 and std 1e-2 a float32 mean cannot hold the row's
 * centre (its spacing there is 1e-3, a tenth of a std): sums of x - shift are
 * small numbers, and y is computed from (x - shift) - m with m = mean(x -
 * shift), never from a rounded mean. For float64 data the same code runs in
 * double.
 */
#include "common.h"

#ifdef PN_KERNEL_BUILD
#include "shard.h"   /* kernel.h, and the sharded backward's arguments */

/* The row's mean and sum of squared deviations, as (shift, m, ss): mean =
 * shift + m, ss = sum((x - shift - m)^2). Two passes on x - x0: the mean, then
 * the squares of the centred values, summed in the compute type unless they may
 * have overflowed or underflowed float32 (rows of magnitude beyond 1e19 or
 * below 1e-10): then again in double. */
static void layernorm_stats_two_pass(const real *x, int64_t C, real *shift, real *m, double *ss) {
    const real x0 = x[0];
    *shift = x0;
    *m = pn_sum_shifted(x, C, x0) / (real)C;
    *ss = pn_sumsq_centered(x, C, x0, *m);
    if (sizeof(real) < sizeof(double) && !(*ss >= 1e-20 && *ss <= 1e36))
        *ss = pn_sumsq_centered_d(x, C, x0, *m);
}

/* The same in one pass (one pass less over the row: 4-12% faster for float32
 * rows): shifted by the mean of the row's first 16 values, near the row's
 * centre, the variance is sum(d^2) - sum(d)^2 / C with d = x - shift and
 * little cancellation. Taken only when the mean of d is within a std of zero
 * (at most a bit lost) and the float squares neither overflowed nor
 * underflowed; other rows (outliers first, NaN, Inf, extreme magnitudes) go
 * the two-pass way. The row is read in its own dtype (src, dt): bfloat16
 * widened in the sum loop, float16 converted block by block as the sums go
 * (simd.h), and into buf (C reals) only for the two-pass way. */
static void layernorm_stats(const void *src, pn_dtype dt, int64_t C, double inv_C, real *buf,
                            real *shift, real *m, double *ss) {
    real head[16] = {0};   /* (every value set by the conversion; GCC cannot tell) */
    const int64_t k = C < 16 ? C : 16;
    const real *xh = pn_row_as_real(src, dt, head, k);
    const real x0 = xh[0];
    real d[16];   /* added as a tree: a chain of 16 additions held up every row */
    if (k == 16)
        for (int i = 0; i < 16; i++) d[i] = xh[i] - x0;
    else
        for (int i = 0; i < 16; i++) d[i] = i < k ? xh[i] - x0 : 0;
    PN_TREE_16(d);
    const real sh = x0 + (k == 16 ? d[0] * (real)0.0625 : d[0] / (real)k);   /* * 1/16: exactly / 16 */
    double sd, ssd;
    pn_moments_shifted_row(src, dt, C, sh, &sd, &ssd);
    const double md = sd * inv_C, q = ssd - sd * md;
    if (md * md * (double)C <= q && (sizeof(real) == sizeof(double) || (q >= 1e-20 && q <= 1e36))) {
        *shift = sh;
        *m = (real)md;
        *ss = q;
    } else {
        layernorm_stats_two_pass(pn_row_as_real(src, dt, buf, C), C, shift, m, ss);
    }
}

/* The row's statistics for y: shift, m (mean = shift + m) and rstd. */
static real layernorm_row_stats(const void *src, pn_dtype dt, int64_t C, double inv_C, double eps, real *buf,
                                real *shift, real *m) {
    double ss;
    layernorm_stats(src, dt, C, inv_C, buf, shift, m, &ss);
    return (real)(1 / sqrt(ss * inv_C + eps));
}

/* y = xhat * (offset + w) + b over n values of a row at column i0, xhat = ((x - shift) - m) * rstd */
PN_Y_PIECE layernorm_y(real *y, const real *x, const pn_row_stats *s, const pn_epilogue *e, int64_t i0, int64_t n) {
    const real shift = s->shift, m = s->m, rstd = s->rstd;
    PN_EPILOGUE_LOOP(e, y, i0, n, ((x[i] - shift) - m) * rstd);
}

PN_Y_PIECE layernorm_y_bf16(real *y, const uint16_t *x, const pn_row_stats *s, const pn_epilogue *e, int64_t i0,
                            int64_t n) {
    const real shift = s->shift, m = s->m, rstd = s->rstd;
    PN_EPILOGUE_LOOP(e, y, i0, n, (((real)pn_bf16_to_float(x[i]) - shift) - m) * rstd);
}

/* Row r of a forward, plain or fused: the statistics of x (or h), then y
 * piece by piece (kernel.h: reading, the residual, the epilogue, the store). */
static void layernorm_forward_row(const pn_fwd_call *c, int64_t r) {
    const pn_token_args *a = c->a;
    const pn_fwd_in in = pn_fwd_input(c, r);
    pn_row_stats s;
    s.rstd = layernorm_row_stats(in.row, in.dt, a->C, c->inv_C, c->eps, in.buf, &s.shift, &s.m);
    pn_fwd_output(c, r, &in, &s, layernorm_y, layernorm_y_bf16);
    if (a->mean) ((real *)a->mean)[r] = s.shift + s.m;
    if (a->rstd) ((real *)a->rstd)[r] = s.rstd;
}

pn_status PN_KERNEL(layernorm_forward)(const pn_token_args *a) { return pn_forward_call(a, 0, 1, layernorm_forward_row); }
pn_status PN_KERNEL(add_layernorm_forward)(const pn_token_args *a) { return pn_forward_call(a, 1, 1, layernorm_forward_row); }

/* A row's sums for dx: sum(g) and sum(g * xhat), g = dy * w, in fixed-order
 * lanes. x and dy are read in their dtype (half precision converted block by
 * block, as in simd.h: the lanes and their order are those of the whole row). */
static void layernorm_backward_sums(const void *xs, const void *dys, pn_dtype dt, const real *w, real mean,
                                    real rstd, int64_t C, real *sum_g, real *sum_gx) {
    real sg[PN_LANES] = {0}, sgx[PN_LANES] = {0}, xblk[PN_BLOCK], dyblk[PN_BLOCK];
    for (int64_t i0 = 0; i0 < C; i0 += PN_BLOCK) {
        const int64_t m = C - i0 < PN_BLOCK ? C - i0 : PN_BLOCK;
        const real *x = pn_block_as_real(xs, dt, i0, m, xblk), *dy = pn_block_as_real(dys, dt, i0, m, dyblk);
        const real *wb = w + i0;
        int64_t i = 0;
        for (; i + PN_LANES <= m; i += PN_LANES)
            for (int j = 0; j < PN_LANES; j++) {
                real g = dy[i + j] * wb[i + j], xhat = (x[i + j] - mean) * rstd;
                sg[j] += g;
                sgx[j] += g * xhat;
            }
        for (int j = 0; i + j < m; j++) {
            real g = dy[i + j] * wb[i + j], xhat = (x[i + j] - mean) * rstd;
            sg[j] += g;
            sgx[j] += g * xhat;
        }
    }
    *sum_g = pn_lanes_total(sg);
    *sum_gx = pn_lanes_total(sgx);
}

/* n values of a row's backward: the parameter gradients (dw, db: NULL when
 * not wanted) and dx (NULL: not wanted), which may overwrite x or dy: each
 * value of x and dy is read before dx's value at the same place is written.
 * The mean is hi + lo (lo = 0 in the plain backward: the same bits as x -
 * mean); mg, mgx are mean(g) and mean(g * xhat). The first row of a chunk
 * (`first`) starts dw and db from 0 instead of their values (0 + v as on a
 * zeroed sum: -0 becomes +0), so no pass zeroes them first. */
static void layernorm_backward_piece(real *dx, real *dw, real *db, const real *x, const real *dy, const real *w,
                                     real hi, real lo, real rs, real mg, real mgx, int64_t n, int first) {
    if (dw && dx) {   /* one loop, x and dy loaded once (1.05-1.24x in cache); simd although dx may be x or dy */
        if (first) {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                const real d = dy[i], xhat = ((x[i] - hi) - lo) * rs;
                dw[i] = (real)0 + d * xhat;
                db[i] = (real)0 + d;
                dx[i] = rs * ((d * w[i] - mg) - xhat * mgx);
            }
            return;
        }
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            const real d = dy[i], xhat = ((x[i] - hi) - lo) * rs;
            dw[i] += d * xhat;
            db[i] += d;
            dx[i] = rs * ((d * w[i] - mg) - xhat * mgx);
        }
        return;
    }
    if (dw && first)
        for (int64_t i = 0; i < n; i++) {
            dw[i] = (real)0 + dy[i] * (((x[i] - hi) - lo) * rs);
            db[i] = (real)0 + dy[i];
        }
    else if (dw)
        for (int64_t i = 0; i < n; i++) {
            dw[i] += dy[i] * (((x[i] - hi) - lo) * rs);
            db[i] += dy[i];
        }
    if (dx)
        for (int64_t i = 0; i < n; i++) {
            real xhat = ((x[i] - hi) - lo) * rs;
            dx[i] = rs * ((dy[i] * w[i] - mg) - xhat * mgx);
        }
}

/* The fused piece loop (dx and the parameter gradients) over PN_BWD_GROUP rows at
 * once: dw and db are loaded and stored once per group instead of once per row
 * (at C = 256 their traffic was a quarter of the backward's time). Each row's
 * terms are added to dw and db in row order, as layernorm_backward_piece does
 * row by row: the same bits. dx[k] may overwrite x[k] or dy[k] (the same row).
 * A group that starts a chunk (`first`) starts the sums from 0. */
#define PN_BWD_GROUP 4
static void layernorm_backward_piece_group(real *const dx[PN_BWD_GROUP], real *dw, real *db,
                                           const real *const x[PN_BWD_GROUP],
                                           const real *const dy[PN_BWD_GROUP], const real *w,
                                           const real hi[PN_BWD_GROUP], const real lo[PN_BWD_GROUP],
                                           const real rs[PN_BWD_GROUP], const real mg[PN_BWD_GROUP],
                                           const real mgx[PN_BWD_GROUP], int64_t n, int first) {
    real *dx0 = dx[0], *dx1 = dx[1], *dx2 = dx[2], *dx3 = dx[3];
    const real *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    const real *d0 = dy[0], *d1 = dy[1], *d2 = dy[2], *d3 = dy[3];
    const real lo0 = lo[0], lo1 = lo[1], lo2 = lo[2], lo3 = lo[3];
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        const real wi = w[i];
        real sw = first ? (real)0 : dw[i], sb = first ? (real)0 : db[i], d, xhat;
        d = d0[i], xhat = ((x0[i] - hi[0]) - lo0) * rs[0];
        sw += d * xhat, sb += d;
        dx0[i] = rs[0] * ((d * wi - mg[0]) - xhat * mgx[0]);
        d = d1[i], xhat = ((x1[i] - hi[1]) - lo1) * rs[1];
        sw += d * xhat, sb += d;
        dx1[i] = rs[1] * ((d * wi - mg[1]) - xhat * mgx[1]);
        d = d2[i], xhat = ((x2[i] - hi[2]) - lo2) * rs[2];
        sw += d * xhat, sb += d;
        dx2[i] = rs[2] * ((d * wi - mg[2]) - xhat * mgx[2]);
        d = d3[i], xhat = ((x3[i] - hi[3]) - lo3) * rs[3];
        sw += d * xhat, sb += d;
        dx3[i] = rs[3] * ((d * wi - mg[3]) - xhat * mgx[3]);
        dw[i] = sw;
        db[i] = sb;
    }
}

/* The backward over all rows. Plain (sh NULL): each row's mean and rstd are
 * a->mean, a->rstd and its sums S_g = sum(g), S_gx = sum(g * xhat) are taken
 * here. Sharded (layernorm_shard.c, sh given): the row is one shard of a
 * wider row, its mean the combined double mean (split as hi + lo, see
 * shard.h) and its sums the totals over all shards (sh->sums, width
 * sh->C_total). */
pn_status PN_KERNEL(layernorm_backward_rows)(const pn_token_args *a, const pn_shard_args *sh) {
    const int64_t rows = a->B * a->T, C = a->C;
    const size_t es = pn_dtype_size(a->dtype);
    const int params = a->dweight || a->dbias;
    const int64_t per = pn_chunk_rows(rows), nchunks = pn_num_chunks(rows);
    const int stream = rows * C * (int64_t)es >= pn_stream_min_bytes();
    const int64_t pstride = 2 * ((C + 15) & ~(int64_t)15);   /* dw partial, then db partial */
    real *part = params ? pn_scratch_reals(a->scratch) : NULL;
    const int direct = pn_direct_params(a, nchunks);
    pn_work wk;
    /* rows are read in their dtype: no row buffers; w only (ones when absent) */
    pn_status st = pn_work_init_as(&wk, a, 0, PN_FILL_W);
    if (st) return st;
    const real *w = wk.w;
    const real *mean = (const real *)a->mean, *rstd = (const real *)a->rstd;
    const real invC = (real)1 / (real)C;
    const pn_ahead ahead = pn_ahead_rows(a, 3, stream);
    const double inv_total = sh ? 1.0 / (double)sh->C_total : 0;

    /* Chunks of consecutive rows; each chunk's dw/db partial is its own (or,
     * direct, the gradients themselves), started by the chunk's first row. */
#pragma omp parallel for schedule(static) num_threads(wk.nthreads) if (wk.nthreads > 1)
    for (int64_t c = 0; c < nchunks; c++) {
        real *dw = params ? part + c * pstride : NULL, *db = params ? dw + pstride / 2 : NULL;
        if (direct && a->dweight) dw = (real *)a->dweight;
        if (direct && a->dbias) db = (real *)a->dbias;
        const int64_t r1 = (c + 1) * per < rows ? (c + 1) * per : rows;
        for (int64_t r = c * per; r < r1;) {
            /* a group of rows when dx and dw/db are wanted, else one row */
            const int g = (dw && db && a->dinp && r1 - r >= PN_BWD_GROUP) ? PN_BWD_GROUP : 1;
            const char *xs[PN_BWD_GROUP], *dys[PN_BWD_GROUP];
            real hi[PN_BWD_GROUP], lo[PN_BWD_GROUP], rs[PN_BWD_GROUP], mg[PN_BWD_GROUP], mgx[PN_BWD_GROUP];
            for (int k = 0; k < g; k++) {
                const int64_t rk = r + k;
                xs[k] = (const char *)pn_row(a->inp, a->s.inp, rk, a->T, es);
                dys[k] = (const char *)pn_row(a->dout, a->s.dout, rk, a->T, es);
                if (sh) {
                    pn_shard_split(sh->mean[rk], &hi[k], &lo[k]);
                    rs[k] = (real)sh->rstd[rk];
                    mg[k] = (real)(sh->sums[2 * rk] * inv_total);
                    mgx[k] = (real)(sh->sums[2 * rk + 1] * inv_total);
                } else {
                    hi[k] = mean[rk], lo[k] = 0, rs[k] = rstd[rk];
                    mg[k] = mgx[k] = 0;   /* only dx reads them: no pass over the row without it */
                    if (a->dinp) {
                        layernorm_backward_sums(xs[k], dys[k], a->dtype, w, hi[k], rs[k], C, &mg[k], &mgx[k]);
                        mg[k] *= invC;
                        mgx[k] *= invC;
                    }
                }
            }
            /* in pieces, each prefetching the same share of the next rows' x and dy (and dx) */
            const pn_next_rows next = pn_next_rows_after(a, r + g - 1, r1, a->dout, a->s.dout, ahead, a->dinp,
                                                         a->s.dinp);
            for (int64_t i0 = 0; i0 < C; i0 += PN_PIECE) {
                const int64_t n = pn_piece_len(C, i0);
                real piece[PN_BWD_GROUP][PN_PIECE], tmp[PN_PIECE], xp[PN_BWD_GROUP][PN_PIECE],
                    dyp[PN_BWD_GROUP][PN_PIECE];
                const real *x[PN_BWD_GROUP], *dy[PN_BWD_GROUP];
                real *dx[PN_BWD_GROUP];
                for (int k = 0; k < g; k++) {
                    x[k] = pn_row_as_real(xs[k] + i0 * (int64_t)es, a->dtype, xp[k], n);
                    dy[k] = pn_row_as_real(dys[k] + i0 * (int64_t)es, a->dtype, dyp[k], n);
                    dx[k] = a->dinp ? pn_dx_piece(a, r + k, i0, piece[k], stream) : NULL;
                }
                if (g == PN_BWD_GROUP)
                    layernorm_backward_piece_group(dx, dw + i0, db + i0, x, dy, w + i0, hi, lo, rs, mg, mgx, n,
                                                   r == c * per);
                else
                    layernorm_backward_piece(dx[0], dw ? dw + i0 : NULL, db ? db + i0 : NULL, x[0], dy[0],
                                             w + i0, hi[0], lo[0], rs[0], mg[0], mgx[0], n, r == c * per);
                for (int k = 0; k < g; k++)
                    if (dx[k]) pn_finish_dx_piece(a, r + k, i0, dx[k], n, tmp, stream);
                pn_prefetch_share(&next, i0, n);
            }
            r += g;
        }
    }
    if (stream) pn_stream_fence();
    if ((a->dweight || a->dbias) && !direct)
        pn_reduce_chunks(a->dweight, a->dbias, a->wdtype, a->accumulate, part, pstride / 2, nchunks, pstride, C,
                         wk.nthreads);
    pn_work_free(&wk);
    return PN_OK;
}

pn_status PN_KERNEL(layernorm_backward)(const pn_token_args *a) { return PN_KERNEL(layernorm_backward_rows)(a, NULL); }

#else /* ---- the public functions: check, then run the variant for this CPU ---- */

PN_DECLARE_VARIANTS(layernorm_forward, pn_token_args)
PN_DECLARE_VARIANTS(add_layernorm_forward, pn_token_args)
PN_DECLARE_VARIANTS(layernorm_backward, pn_token_args)
static const pn_token_kernel forward_kernels[3][2] = PN_VARIANTS(layernorm_forward);
static const pn_token_kernel add_forward_kernels[3][2] = PN_VARIANTS(add_layernorm_forward);
static const pn_token_kernel backward_kernels[3][2] = PN_VARIANTS(layernorm_backward);

/* T*H of a backward call for the scratch size (the check refuses what overflows). */
static int64_t rows_per_b(int64_t T, const pn_norm_options *opts) {
    return opts && opts->H > 1 && T > 0 && opts->H <= INT64_MAX / T ? T * opts->H : T;
}

pn_status pn_layernorm_forward_ex(void *out, void *mean, void *rstd,
                                  const void *inp, const void *weight, const void *bias,
                                  int64_t B, int64_t T, int64_t C, double eps,
                                  pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                  const pn_norm_options *opts) {
    pn_token_args a = {.out = out, .mean = mean, .rstd = rstd, .inp = inp, .weight = weight,
                       .bias = bias, .B = B, .T = T, .C = C, .eps = eps, .dtype = dtype, .wdtype = wdtype};
    pn_status st = pn_check_token(&a, strides, opts, 0, 0, 0);
    return st ? st : pn_run(forward_kernels, &a);
}

pn_status pn_add_layernorm_forward_ex(void *out, void *h, void *mean, void *rstd,
                                      const void *inp, const void *residual,
                                      const void *weight, const void *bias,
                                      int64_t B, int64_t T, int64_t C, double eps,
                                      pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                      const pn_norm_options *opts) {
    pn_token_args a = {.out = out, .h = h, .mean = mean, .rstd = rstd, .inp = inp, .residual = residual,
                       .weight = weight, .bias = bias, .B = B, .T = T, .C = C, .eps = eps,
                       .dtype = dtype, .wdtype = wdtype};
    pn_status st = pn_check_token(&a, strides, opts, PN_CHECK_RESIDUAL, 0, 0);
    return st ? st : pn_run(add_forward_kernels, &a);
}

size_t pn_layernorm_backward_scratch_size(int64_t B, int64_t T, int64_t C, pn_dtype dtype) {
    return pn_token_scratch_size(B, T, C, dtype, 2);
}

pn_status pn_layernorm_backward_ex(void *dinp, void *dweight, void *dbias,
                                   void *scratch, size_t scratch_bytes,
                                   const void *dout, const void *inp, const void *weight,
                                   const void *mean, const void *rstd,
                                   int64_t B, int64_t T, int64_t C, int flags,
                                   pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                   const pn_norm_options *opts) {
    pn_token_args a = {.dinp = dinp, .dweight = dweight, .dbias = dbias, .scratch = scratch,
                       .dout = dout, .inp = inp, .weight = weight, .mean = (void *)mean,
                       .rstd = (void *)rstd, .B = B, .T = T, .C = C,
                       .accumulate = (flags & PN_ACCUMULATE) != 0, .dtype = dtype, .wdtype = wdtype};
    if (flags & ~PN_ACCUMULATE) return PN_ERR_ARG;
    pn_status st = pn_check_token(&a, strides, opts, PN_CHECK_BACKWARD | PN_CHECK_MEAN, scratch_bytes,
                                  pn_layernorm_backward_scratch_size(B, rows_per_b(T, opts), C, dtype));
    return st ? st : pn_run_backward(backward_kernels, &a, 2);
}

pn_status pn_layernorm_quant_forward(void *q, float *scales, void *h, void *mean, void *rstd,
                                     const void *inp, const void *residual,
                                     const void *weight, const void *bias,
                                     int64_t B, int64_t T, int64_t C, double eps,
                                     pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                     const pn_norm_options *opts, const pn_quant_params *quant) {
    pn_token_args a = {.q = q, .qscales = scales, .h = residual ? h : NULL, .mean = mean, .rstd = rstd,
                       .inp = inp, .residual = residual, .weight = weight, .bias = bias,
                       .B = B, .T = T, .C = C, .eps = eps, .dtype = dtype, .wdtype = wdtype};
    pn_status st = pn_check_quant(&a, quant);
    if (!st) st = pn_check_token(&a, strides, opts, PN_CHECK_QUANT | (residual ? PN_CHECK_RESIDUAL : 0), 0, 0);
    return st ? st : pn_run(residual ? add_forward_kernels : forward_kernels, &a);
}

/* The 0.1 functions: the options' defaults. */
pn_status pn_layernorm_forward(void *out, void *mean, void *rstd,
                               const void *inp, const void *weight, const void *bias,
                               int64_t B, int64_t T, int64_t C, double eps,
                               pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides) {
    return pn_layernorm_forward_ex(out, mean, rstd, inp, weight, bias, B, T, C, eps, dtype, wdtype,
                                   strides, NULL);
}

pn_status pn_add_layernorm_forward(void *out, void *h, void *mean, void *rstd,
                                   const void *inp, const void *residual,
                                   const void *weight, const void *bias,
                                   int64_t B, int64_t T, int64_t C, double eps,
                                   pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides) {
    return pn_add_layernorm_forward_ex(out, h, mean, rstd, inp, residual, weight, bias, B, T, C, eps,
                                       dtype, wdtype, strides, NULL);
}

pn_status pn_layernorm_backward(void *dinp, void *dweight, void *dbias,
                                void *scratch, size_t scratch_bytes,
                                const void *dout, const void *inp, const void *weight,
                                const void *mean, const void *rstd,
                                int64_t B, int64_t T, int64_t C, int flags,
                                pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides) {
    return pn_layernorm_backward_ex(dinp, dweight, dbias, scratch, scratch_bytes, dout, inp, weight,
                                    mean, rstd, B, T, C, flags, dtype, wdtype, strides, NULL);
}

#endif
