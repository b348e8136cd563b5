/* rmsnorm.c - RMSNorm over the last axis C of B x T rows.
 *
 * forward:  rstd = 1/sqrt(sum(x^2)/C + eps),  y = x * rstd * w
 * backward: xhat = x * rstd,  g = dy * w
 *           dx = rstd * (g - xhat * mean(g * xhat))
 *           dw = sum over rows of dy * xhat
 *
 * Derivation of dx: y_i = w_i x_i r with r = (s/C + eps)^(-1/2), s = sum x^2, so
 * dr/dx_j = -r^3 x_j / C and dL/dx_j = r g_j - (r^3 x_j / C) sum_i g_i x_i
 *         = r (g_j - xhat_j * mean(g * xhat)).
 */
#include "common.h"

#ifdef PN_KERNEL_BUILD
#include "shard.h"   /* kernel.h, and the sharded backward's arguments */

/* 1/sqrt(mean(x^2) + eps): squares in the compute type, again in double where
 * a float square may have overflowed or lost its bits (sums beyond 1e36 or
 * below 1e-20, NaN and Inf among them). The row is read in its own dtype
 * (src, dt: bfloat16 widened in the loop, float16 converted block by block,
 * simd.h), and converted into buf (C reals) only for the sum in double. */
static real rmsnorm_rstd(const void *src, pn_dtype dt, int64_t C, double inv_C, double eps, real *buf) {
    double ss = pn_sumsq_folded_row(src, dt, C);
    if (sizeof(real) < sizeof(double) && !(ss >= 1e-20 && ss <= 1e36)) ss = pn_sumsq(pn_row_as_real(src, dt, buf, C), C);
    return (real)(1 / sqrt(ss * inv_C + eps));
}

/* y = xhat * (offset + w) over n values of a row at column i0, xhat = x * rstd */
PN_Y_PIECE rmsnorm_y(real *y, const real *x, const pn_row_stats *s, const pn_epilogue *e, int64_t i0, int64_t n) {
    const real rstd = s->rstd;
    PN_EPILOGUE_LOOP(e, y, i0, n, x[i] * rstd);
}

PN_Y_PIECE rmsnorm_y_bf16(real *y, const uint16_t *x, const pn_row_stats *s, const pn_epilogue *e, int64_t i0,
                          int64_t n) {
    const real rstd = s->rstd;
    PN_EPILOGUE_LOOP(e, y, i0, n, (real)pn_bf16_to_float(x[i]) * rstd);
}

/* Row r of a forward, plain or fused: rstd of x (or h), then y piece by
 * piece (kernel.h: reading, the residual, the epilogue, the store). */
static void rmsnorm_forward_row(const pn_fwd_call *c, int64_t r) {
    const pn_token_args *a = c->a;
    const pn_fwd_in in = pn_fwd_input(c, r);
    const pn_row_stats s = {0, 0, rmsnorm_rstd(in.row, in.dt, a->C, c->inv_C, c->eps, in.buf)};
    pn_fwd_output(c, r, &in, &s, rmsnorm_y, rmsnorm_y_bf16);
    if (a->rstd) ((real *)a->rstd)[r] = s.rstd;
}

pn_status PN_KERNEL(rmsnorm_forward)(const pn_token_args *a) { return pn_forward_call(a, 0, 0, rmsnorm_forward_row); }
pn_status PN_KERNEL(add_rmsnorm_forward)(const pn_token_args *a) { return pn_forward_call(a, 1, 0, rmsnorm_forward_row); }

/* A row's sum for dx: sum(g * xhat), g = dy * w, in fixed-order lanes; x and
 * dy read in their dtype, block by block (the lanes of the whole row). */
static real rmsnorm_backward_sum(const void *xs, const void *dys, pn_dtype dt, const real *w, real rstd, int64_t C) {
    real sgx[PN_LANES] = {0}, xblk[PN_BLOCK], dyblk[PN_BLOCK];
    for (int64_t i0 = 0; i0 < C; i0 += PN_BLOCK) {
        const int64_t m = C - i0 < PN_BLOCK ? C - i0 : PN_BLOCK;
        const real *x = pn_block_as_real(xs, dt, i0, m, xblk), *dy = pn_block_as_real(dys, dt, i0, m, dyblk);
        const real *wb = w + i0;
        int64_t i = 0;
        for (; i + PN_LANES <= m; i += PN_LANES)
            for (int j = 0; j < PN_LANES; j++) sgx[j] += dy[i + j] * wb[i + j] * (x[i + j] * rstd);
        for (int j = 0; i + j < m; j++) sgx[j] += dy[i + j] * wb[i + j] * (x[i + j] * rstd);
    }
    return pn_lanes_total(sgx);
}

/* n values of a row's backward: the weight gradient (dw: NULL when not
 * wanted) and dx (NULL: not wanted), which may overwrite x or dy: each value
 * of x and dy is read before dx's value at the same place is written; mgx is
 * mean(g * xhat). The first row of a chunk (`first`) starts dw from 0 (0 + v
 * as on a zeroed sum), so no pass zeroes it first. */
static void rmsnorm_backward_piece(real *dx, real *dw, const real *x, const real *dy, const real *w,
                                   real rs, real mgx, int64_t n, int first) {
    if (dw && dx && first) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            const real d = dy[i], xhat = x[i] * rs;
            dw[i] = (real)0 + d * xhat;
            dx[i] = rs * (d * w[i] - xhat * mgx);
        }
        return;
    }
    if (dw && dx) {   /* one loop, x and dy loaded once; simd although dx may be x or dy */
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            const real d = dy[i], xhat = x[i] * rs;
            dw[i] += d * xhat;
            dx[i] = rs * (d * w[i] - xhat * mgx);
        }
        return;
    }
    if (dw && first)
        for (int64_t i = 0; i < n; i++) dw[i] = (real)0 + dy[i] * (x[i] * rs);
    else if (dw)
        for (int64_t i = 0; i < n; i++) dw[i] += dy[i] * (x[i] * rs);
    if (dx)
        for (int64_t i = 0; i < n; i++) dx[i] = rs * (dy[i] * w[i] - (x[i] * rs) * mgx);
}

/* The backward over all rows. Plain (sh NULL): each row's rstd is a->rstd and
 * its sum S_gx = sum(g * xhat) is taken here. Sharded (rmsnorm_shard.c, sh
 * given): the row is one shard of a wider row; rstd and the sum over all
 * shards come from sh (width sh->C_total). */
pn_status PN_KERNEL(rmsnorm_backward_rows)(const pn_token_args *a, const pn_shard_args *sh) {
    const int64_t rows = a->B * a->T, C = a->C;
    const size_t es = pn_dtype_size(a->dtype);
    const int params = a->dweight != NULL;
    const int64_t per = pn_chunk_rows(rows), nchunks = pn_num_chunks(rows);
    const int stream = rows * C * (int64_t)es >= pn_stream_min_bytes();
    const int64_t pstride = (C + 15) & ~(int64_t)15;
    real *part = params ? pn_scratch_reals(a->scratch) : NULL;
    const int direct = pn_direct_params(a, nchunks);
    pn_work wk;
    /* rows are read in their dtype: no row buffers; w only (ones when absent) */
    pn_status st = pn_work_init_as(&wk, a, 0, PN_FILL_W);
    if (st) return st;
    const real *w = wk.w;
    const real *rstd = (const real *)a->rstd;
    const real invC = (real)1 / (real)C;
    const pn_ahead ahead = pn_ahead_rows(a, 3, stream);
    const double inv_total = sh ? 1.0 / (double)sh->C_total : 0;

    /* Chunks of consecutive rows; each chunk's dw partial is its own (or,
     * direct, the gradient itself), started by the chunk's first row. */
#pragma omp parallel for schedule(static) num_threads(wk.nthreads) if (wk.nthreads > 1)
    for (int64_t c = 0; c < nchunks; c++) {
        real *dw = params ? direct ? (real *)a->dweight : part + c * pstride : NULL;
        const int64_t r1 = (c + 1) * per < rows ? (c + 1) * per : rows;
        for (int64_t r = c * per; r < r1; r++) {
            const char *xs = (const char *)pn_row(a->inp, a->s.inp, r, a->T, es);
            const char *dys = (const char *)pn_row(a->dout, a->s.dout, r, a->T, es);
            real rs, mgx;
            if (sh) {
                rs = (real)sh->rstd[r];
                mgx = (real)(sh->sums[r] * inv_total);
            } else {
                rs = rstd[r];
                mgx = rmsnorm_backward_sum(xs, dys, a->dtype, w, rs, C) * invC;
            }
            /* in pieces, each prefetching the same share of the next rows' x and dy (and dx) */
            const pn_next_rows next = pn_next_rows_after(a, r, r1, a->dout, a->s.dout, ahead, a->dinp, a->s.dinp);
            for (int64_t i0 = 0; i0 < C; i0 += PN_PIECE) {
                const int64_t n = pn_piece_len(C, i0);
                real piece[PN_PIECE], tmp[PN_PIECE], xp[PN_PIECE], dyp[PN_PIECE];
                const real *x = pn_row_as_real(xs + i0 * (int64_t)es, a->dtype, xp, n);
                const real *dy = pn_row_as_real(dys + i0 * (int64_t)es, a->dtype, dyp, n);
                real *dx = a->dinp ? pn_dx_piece(a, r, i0, piece, stream) : NULL;
                rmsnorm_backward_piece(dx, dw ? dw + i0 : NULL, x, dy, w + i0, rs, mgx, n, r == c * per);
                if (dx) pn_finish_dx_piece(a, r, i0, dx, n, tmp, stream);
                pn_prefetch_share(&next, i0, n);
            }
        }
    }
    if (stream) pn_stream_fence();
    if (params && !direct)
        pn_reduce_chunks(a->dweight, NULL, a->wdtype, a->accumulate, part, 0, nchunks, pstride, C, wk.nthreads);
    pn_work_free(&wk);
    return PN_OK;
}

pn_status PN_KERNEL(rmsnorm_backward)(const pn_token_args *a) { return PN_KERNEL(rmsnorm_backward_rows)(a, NULL); }

#else /* ---- the public functions: check, then run the variant for this CPU ---- */

PN_DECLARE_VARIANTS(rmsnorm_forward, pn_token_args)
PN_DECLARE_VARIANTS(add_rmsnorm_forward, pn_token_args)
PN_DECLARE_VARIANTS(rmsnorm_backward, pn_token_args)
static const pn_token_kernel forward_kernels[3][2] = PN_VARIANTS(rmsnorm_forward);
static const pn_token_kernel add_forward_kernels[3][2] = PN_VARIANTS(add_rmsnorm_forward);
static const pn_token_kernel backward_kernels[3][2] = PN_VARIANTS(rmsnorm_backward);

/* T*H of a backward call for the scratch size (the check refuses what overflows). */
static int64_t rows_per_b(int64_t T, const pn_norm_options *opts) {
    return opts && opts->H > 1 && T > 0 && opts->H <= INT64_MAX / T ? T * opts->H : T;
}

pn_status pn_rmsnorm_forward_ex(void *out, void *rstd, const void *inp, const void *weight,
                                int64_t B, int64_t T, int64_t C, double eps,
                                pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                const pn_norm_options *opts) {
    pn_token_args a = {.out = out, .rstd = rstd, .inp = inp, .weight = weight,
                       .B = B, .T = T, .C = C, .eps = eps, .dtype = dtype, .wdtype = wdtype};
    pn_status st = pn_check_token(&a, strides, opts, 0, 0, 0);
    return st ? st : pn_run(forward_kernels, &a);
}

pn_status pn_add_rmsnorm_forward_ex(void *out, void *h, void *rstd,
                                    const void *inp, const void *residual, const void *weight,
                                    int64_t B, int64_t T, int64_t C, double eps,
                                    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                    const pn_norm_options *opts) {
    pn_token_args a = {.out = out, .h = h, .rstd = rstd, .inp = inp, .residual = residual,
                       .weight = weight, .B = B, .T = T, .C = C, .eps = eps,
                       .dtype = dtype, .wdtype = wdtype};
    pn_status st = pn_check_token(&a, strides, opts, PN_CHECK_RESIDUAL, 0, 0);
    return st ? st : pn_run(add_forward_kernels, &a);
}

size_t pn_rmsnorm_backward_scratch_size(int64_t B, int64_t T, int64_t C, pn_dtype dtype) {
    return pn_token_scratch_size(B, T, C, dtype, 1);
}

pn_status pn_rmsnorm_backward_ex(void *dinp, void *dweight, void *scratch, size_t scratch_bytes,
                                 const void *dout, const void *inp, const void *weight, const void *rstd,
                                 int64_t B, int64_t T, int64_t C, int flags,
                                 pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                 const pn_norm_options *opts) {
    pn_token_args a = {.dinp = dinp, .dweight = dweight, .scratch = scratch, .dout = dout,
                       .inp = inp, .weight = weight, .rstd = (void *)rstd, .B = B, .T = T, .C = C,
                       .accumulate = (flags & PN_ACCUMULATE) != 0, .dtype = dtype, .wdtype = wdtype};
    if (flags & ~PN_ACCUMULATE) return PN_ERR_ARG;
    pn_status st = pn_check_token(&a, strides, opts, PN_CHECK_BACKWARD, scratch_bytes,
                                  pn_rmsnorm_backward_scratch_size(B, rows_per_b(T, opts), C, dtype));
    return st ? st : pn_run_backward(backward_kernels, &a, 1);
}

pn_status pn_rmsnorm_quant_forward(void *q, float *scales, void *h, void *rstd,
                                   const void *inp, const void *residual, const void *weight,
                                   int64_t B, int64_t T, int64_t C, double eps,
                                   pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
                                   const pn_norm_options *opts, const pn_quant_params *quant) {
    pn_token_args a = {.q = q, .qscales = scales, .h = residual ? h : NULL, .rstd = rstd, .inp = inp,
                       .residual = residual, .weight = weight, .B = B, .T = T, .C = C, .eps = eps,
                       .dtype = dtype, .wdtype = wdtype};
    pn_status st = pn_check_quant(&a, quant);
    if (!st) st = pn_check_token(&a, strides, opts, PN_CHECK_QUANT | (residual ? PN_CHECK_RESIDUAL : 0), 0, 0);
    return st ? st : pn_run(residual ? add_forward_kernels : forward_kernels, &a);
}

/* The 0.1 functions: the options' defaults. */
pn_status pn_rmsnorm_forward(void *out, void *rstd, const void *inp, const void *weight,
                             int64_t B, int64_t T, int64_t C, double eps,
                             pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides) {
    return pn_rmsnorm_forward_ex(out, rstd, inp, weight, B, T, C, eps, dtype, wdtype, strides, NULL);
}

pn_status pn_add_rmsnorm_forward(void *out, void *h, void *rstd,
                                 const void *inp, const void *residual, const void *weight,
                                 int64_t B, int64_t T, int64_t C, double eps,
                                 pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides) {
    return pn_add_rmsnorm_forward_ex(out, h, rstd, inp, residual, weight, B, T, C, eps, dtype, wdtype,
                                     strides, NULL);
}

pn_status pn_rmsnorm_backward(void *dinp, void *dweight, void *scratch, size_t scratch_bytes,
                              const void *dout, const void *inp, const void *weight, const void *rstd,
                              int64_t B, int64_t T, int64_t C, int flags,
                              pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides) {
    return pn_rmsnorm_backward_ex(dinp, dweight, scratch, scratch_bytes, dout, inp, weight, rstd,
                                  B, T, C, flags, dtype, wdtype, strides, NULL);
}

#endif
