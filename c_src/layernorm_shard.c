/* layernorm_shard.c - LayerNorm over a row split in column shards across
 * processes (tensor parallel): per-shard statistics, their exact combination,
 * the apply step, and the backward's row sums and dx (see pynorm.h).
 *
 * stats:    per row of the shard, in double: x0 = x[0], m' = sum(x - x0)/C_p,
 *           M2 = sum(((x - x0) - m')^2), mean = x0 + m'  (x - x0 is exact in
 *           double for every input dtype)
 * combine:  mean = sum(C_p mean_p) / C,  M2 = sum(M2_p) + sum(C_p (mean_p - mean)^2),
 *           shards taken in order; rstd = 1/sqrt(M2/C + eps)
 * apply:    y = ((x - hi) - lo) * rstd * w + b, with the double mean split as
 *           hi + lo in the compute type (never a rounded mean)
 * backward: g = dy * w, xhat = ((x - hi) - lo) * rstd, row sums S_g, S_gx over
 *           the whole row (totalled over the shards by the caller);
 *           dx = rstd * (g - S_g/C - xhat * S_gx/C); dw, db as layernorm.c.
 */
#include "shard.h"

#ifdef PN_KERNEL_BUILD

pn_status PN_KERNEL(layernorm_shard_stats)(const pn_shard_args *s) {
    const pn_token_args *a = &s->t;
    const int64_t rows = a->B * a->T, C = a->C;
    const size_t es = pn_dtype_size(a->dtype);
    pn_work wk;
    pn_status st = pn_work_init(&wk, a, 1);
    if (st) return st;
    double *part = s->part;
#pragma omp parallel for schedule(static) num_threads(wk.nthreads) if (wk.nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const real *x = pn_row_as_real(pn_row(a->inp, a->s.inp, r, a->T, es), a->dtype, pn_work_row(&wk, 0), C);
        const double x0 = (double)x[0];
        const double m = pn_shard_sum_shifted_d(x, C, x0) / (double)C;
        part[2 * r] = x0 + m;
        part[2 * r + 1] = pn_shard_m2_d(x, C, x0, m);
    }
    pn_work_free(&wk);
    return PN_OK;
}

pn_status PN_KERNEL(layernorm_shard_apply)(const pn_shard_args *s) {
    const pn_token_args *a = &s->t;
    const int64_t rows = a->B * a->T, C = a->C;
    const size_t es = pn_dtype_size(a->dtype);
    const int stream = rows * C * (int64_t)es >= pn_stream_min_bytes();
    const int in_place = a->dtype == PN_REAL_DTYPE && !stream;
    pn_work wk;
    pn_status st = pn_work_init(&wk, a, 2);
    if (st) return st;
    const real *w = wk.w, *b = wk.b;
#pragma omp parallel for schedule(static) num_threads(wk.nthreads) if (wk.nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        real *buf = pn_work_row(&wk, 0), *buf2 = pn_work_row(&wk, 1);
        const real *x = pn_row_as_real(pn_row(a->inp, a->s.inp, r, a->T, es), a->dtype, buf, C);
        void *yrow = pn_row(a->out, a->s.out, r, a->T, es);
        real *y = in_place ? (real *)yrow : buf2;
        real hi, lo;
        pn_shard_split(s->mean[r], &hi, &lo);
        const real rs = (real)s->rstd[r];
        for (int64_t i = 0; i < C; i++) y[i] = ((x[i] - hi) - lo) * rs * w[i] + b[i];
        if (!in_place) pn_write_row(yrow, y, a->dtype, C, stream, buf);
    }
    if (stream) pn_stream_fence();
    pn_work_free(&wk);
    return PN_OK;
}

pn_status PN_KERNEL(layernorm_shard_backward_sums)(const pn_shard_args *s) {
    const pn_token_args *a = &s->t;
    const int64_t rows = a->B * a->T, C = a->C;
    const size_t es = pn_dtype_size(a->dtype);
    pn_work wk;
    pn_status st = pn_work_init(&wk, a, 2);
    if (st) return st;
    const real *w = wk.w;
    double *part = s->part;
#pragma omp parallel for schedule(static) num_threads(wk.nthreads) if (wk.nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const real *x = pn_row_as_real(pn_row(a->inp, a->s.inp, r, a->T, es), a->dtype, pn_work_row(&wk, 0), C);
        const real *dy = pn_row_as_real(pn_row(a->dout, a->s.dout, r, a->T, es), a->dtype, pn_work_row(&wk, 1), C);
        real hi, lo;
        pn_shard_split(s->mean[r], &hi, &lo);
        const real rs = (real)s->rstd[r];
        double sg[PN_LANES] = {0}, sgx[PN_LANES] = {0};
        int64_t i = 0;
        for (; i + PN_LANES <= C; i += PN_LANES)
            for (int j = 0; j < PN_LANES; j++) {
                real g = dy[i + j] * w[i + j], xhat = ((x[i + j] - hi) - lo) * rs;
                sg[j] += (double)g;
                sgx[j] += (double)(g * xhat);
            }
        for (int j = 0; i + j < C; j++) {
            real g = dy[i + j] * w[i + j], xhat = ((x[i + j] - hi) - lo) * rs;
            sg[j] += (double)g;
            sgx[j] += (double)(g * xhat);
        }
        part[2 * r] = pn_lanes_total_d(sg);
        part[2 * r + 1] = pn_lanes_total_d(sgx);
    }
    pn_work_free(&wk);
    return PN_OK;
}

/* dx, dweight, dbias of the shard: layernorm.c's backward with the combined
 * mean and the totalled row sums. */
pn_status PN_KERNEL(layernorm_shard_backward)(const pn_shard_args *s) {
    return PN_KERNEL(layernorm_backward_rows)(&s->t, s);
}

#else /* ---- the public functions: check, then run the variant for this CPU ---- */

PN_DECLARE_VARIANTS(layernorm_shard_stats, pn_shard_args)
PN_DECLARE_VARIANTS(layernorm_shard_apply, pn_shard_args)
PN_DECLARE_VARIANTS(layernorm_shard_backward_sums, pn_shard_args)
PN_DECLARE_VARIANTS(layernorm_shard_backward, pn_shard_args)
static const pn_shard_kernel stats_kernels[3][2] = PN_VARIANTS(layernorm_shard_stats);
static const pn_shard_kernel apply_kernels[3][2] = PN_VARIANTS(layernorm_shard_apply);
static const pn_shard_kernel bsums_kernels[3][2] = PN_VARIANTS(layernorm_shard_backward_sums);
static const pn_shard_kernel backward_kernels[3][2] = PN_VARIANTS(layernorm_shard_backward);

pn_status pn_layernorm_shard_stats(double *part, const void *inp, int64_t B, int64_t T, int64_t C,
                                   pn_dtype dtype, const pn_strides *strides) {
    pn_shard_args s = {.t = {.inp = inp, .B = B, .T = T, .C = C, .dtype = dtype, .wdtype = dtype},
                       .part = part};
    pn_status st = pn_shard_check_stats(&s, strides, 2);
    return st ? st : pn_run_shard(stats_kernels, &s);
}

pn_status pn_layernorm_shard_combine(double *mean, double *rstd, const double *parts,
                                     const int64_t *widths, int64_t nshards, int64_t rows, double eps) {
    pn_status st;
    int64_t C, n;
    if (!parts) return PN_ERR_NULL;
    if ((st = pn_shard_check_widths(widths, nshards, &C))) return st;
    if (rows <= 0 || __builtin_mul_overflow(rows, 2 * nshards, &n) || n > INT64_MAX / 8) return PN_ERR_SIZE;
    if ((st = pn_check_eps(eps))) return st;
    pn_view outs[2] = {{mean, 1, 1, {0, 0}, rows, 8}, {rstd, 1, 1, {0, 0}, rows, 8}};
    pn_view ins[2] = {{parts, 1, 1, {0, 0}, n, 8}, {widths, 1, 1, {0, 0}, nshards, 8}};
    if ((st = pn_check_views(outs, 2, ins, 2, NULL))) return st;
    const double invC = 1.0 / (double)C;
    const int nt = rows * nshards >= PN_PARALLEL_MIN_ELEMS ? pn_threads() : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        double sm = 0, m2 = 0;
        for (int64_t p = 0; p < nshards; p++) sm += (double)widths[p] * parts[(p * rows + r) * 2];
        const double m = sm * invC;
        for (int64_t p = 0; p < nshards; p++) {
            const double d = parts[(p * rows + r) * 2] - m;
            m2 += parts[(p * rows + r) * 2 + 1] + (double)widths[p] * d * d;
        }
        if (mean) mean[r] = m;
        if (rstd) rstd[r] = 1 / sqrt(m2 * invC + eps);
    }
    return PN_OK;
}

pn_status pn_layernorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
                                   const double *mean, const double *rstd,
                                   int64_t B, int64_t T, int64_t C,
                                   pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides) {
    pn_shard_args s = {.t = {.out = out, .inp = inp, .weight = weight, .bias = bias, .B = B, .T = T, .C = C,
                             .dtype = dtype, .wdtype = wdtype},
                       .mean = mean, .rstd = rstd};
    pn_status st = pn_shard_check_apply(&s, strides, 1);
    return st ? st : pn_run_shard(apply_kernels, &s);
}

pn_status pn_layernorm_shard_backward_sums(double *sums, const void *dout, const void *inp,
                                           const void *weight, const double *mean, const double *rstd,
                                           int64_t B, int64_t T, int64_t C,
                                           pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides) {
    pn_shard_args s = {.t = {.dout = dout, .inp = inp, .weight = weight, .B = B, .T = T, .C = C,
                             .dtype = dtype, .wdtype = wdtype},
                       .part = sums, .mean = mean, .rstd = rstd};
    pn_status st = pn_shard_check_bsums(&s, strides, 2, 1);
    return st ? st : pn_run_shard(bsums_kernels, &s);
}

pn_status pn_layernorm_shard_backward(void *dinp, void *dweight, void *dbias,
                                      void *scratch, size_t scratch_bytes,
                                      const void *dout, const void *inp, const void *weight,
                                      const double *mean, const double *rstd, const double *sums,
                                      int64_t B, int64_t T, int64_t C, int64_t C_total, int flags,
                                      pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides) {
    pn_shard_args s = {.t = {.dinp = dinp, .dweight = dweight, .dbias = dbias, .scratch = scratch,
                             .dout = dout, .inp = inp, .weight = weight, .B = B, .T = T, .C = C,
                             .accumulate = (flags & PN_ACCUMULATE) != 0, .dtype = dtype, .wdtype = wdtype},
                       .mean = mean, .rstd = rstd, .sums = sums, .C_total = C_total};
    pn_status st = pn_shard_check_backward(&s, strides, 2, 1, flags, scratch_bytes,
                                           pn_layernorm_backward_scratch_size(B, T, C, dtype));
    return st ? st : pn_run_shard_backward(backward_kernels, &s, 2);
}

#endif
