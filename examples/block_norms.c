/* block_norms.c - the norms of a transformer block, llm.c style, with pynorm.
 *
 * Activations are B x T x C buffers (B sequences of T tokens, C channels).
 *   1. GPT-2's LayerNorm, float32: the forward saves each row's mean and rstd
 *      for the backward; the backward adds its gradients into buffers that
 *      already hold some (dinp: the gradient of the residual stream; dweight,
 *      dbias: the earlier micro-batches of this step), as a training loop with
 *      gradient accumulation does (PN_ACCUMULATE).
 *   2. Llama's RMSNorm, bfloat16 activations with float32 weights.
 * Each result is checked against a plain double-precision loop written below,
 * and a short summary printed. Exit status 0 when every check passes.
 *
 * Build against an installed pynorm (see README, "C"):
 *   cmake -S examples -B build/examples -DCMAKE_PREFIX_PATH=/opt/pynorm && cmake --build build/examples
 *   PKG_CONFIG_PATH=/opt/pynorm/lib/pkgconfig make -C examples
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pynorm.h>

/* ------------------------------------------------------------------------ */
/* small helpers                                                             */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

/* uniform in [-1, 1) (xorshift64*) */
static float rand_sym(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)((rng_state * 0x2545F4914F6CDD1Dull) >> 40) / 8388608.0f - 1.0f;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* bfloat16: the top 16 bits of a float32, rounded to nearest even */
static uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* the largest |a - ref| / (1 + |ref|) over n values */
static double max_err(const float *a, const double *ref, int64_t n)
{
    double worst = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        double e = fabs((double)a[i] - ref[i]) / (1.0 + fabs(ref[i]));
        if (!(e <= worst)) worst = e; /* a NaN sticks */
    }
    return worst;
}

static int failures = 0;

static void report(const char *what, double err, double tol)
{
    int ok = err <= tol;
    printf("  %-34s max error %.2e (limit %.0e)  %s\n", what, err, tol, ok ? "ok" : "FAILED");
    if (!ok) failures++;
}

static void check(pn_status s, const char *call)
{
    if (s != PN_OK) {
        fprintf(stderr, "%s: %s\n", call, pn_status_string(s));
        exit(1);
    }
}

/* ------------------------------------------------------------------------ */
/* the references: plain loops in double                                     */

static void layernorm_forward_ref(double *out, double *mean, double *rstd, const float *inp,
                                  const float *weight, const float *bias, int B, int T, int C,
                                  double eps)
{
    int b, t, i;
    for (b = 0; b < B; b++) {
        for (t = 0; t < T; t++) {
            const float *x = inp + ((int64_t)b * T + t) * C;
            double *o = out + ((int64_t)b * T + t) * C;
            double m = 0, v = 0, s;
            for (i = 0; i < C; i++) m += x[i];
            m /= C;
            for (i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
            v /= C;
            s = 1.0 / sqrt(v + eps);
            for (i = 0; i < C; i++) o[i] = (x[i] - m) * s * weight[i] + bias[i];
            mean[b * T + t] = m;
            rstd[b * T + t] = s;
        }
    }
}

/* adds the gradients into dinp, dweight, dbias (like the library with
 * PN_ACCUMULATE); mean and rstd as the forward reference computed them */
static void layernorm_backward_ref(double *dinp, double *dweight, double *dbias, const float *dout,
                                   const float *inp, const float *weight, const double *mean,
                                   const double *rstd, int B, int T, int C)
{
    int b, t, i;
    for (b = 0; b < B; b++) {
        for (t = 0; t < T; t++) {
            int64_t row = (int64_t)b * T + t;
            const float *dy = dout + row * C;
            const float *x = inp + row * C;
            double *dx = dinp + row * C;
            double m = mean[row], s = rstd[row];
            double dnorm_mean = 0, dnorm_norm_mean = 0;
            for (i = 0; i < C; i++) {
                double norm = (x[i] - m) * s;
                double dnorm = (double)weight[i] * dy[i];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean /= C;
            dnorm_norm_mean /= C;
            for (i = 0; i < C; i++) {
                double norm = (x[i] - m) * s;
                double dnorm = (double)weight[i] * dy[i];
                dbias[i] += dy[i];
                dweight[i] += norm * dy[i];
                dx[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
            }
        }
    }
}

static void rmsnorm_forward_ref(double *out, double *rstd, const uint16_t *inp,
                                const float *weight, int B, int T, int C, double eps)
{
    int64_t n, i;
    for (n = 0; n < (int64_t)B * T; n++) {
        double ss = 0, s;
        for (i = 0; i < C; i++) ss += (double)bf16_to_f32(inp[n * C + i]) * bf16_to_f32(inp[n * C + i]);
        s = 1.0 / sqrt(ss / C + eps);
        for (i = 0; i < C; i++) out[n * C + i] = bf16_to_f32(inp[n * C + i]) * s * weight[i];
        rstd[n] = s;
    }
}

/* ------------------------------------------------------------------------ */

int main(void)
{
    const int B = 4, T = 64, C = 768; /* GPT-2 small's width */
    const int64_t BTC = (int64_t)B * T * C, BT = (int64_t)B * T;
    const double ln_eps = 1e-5, rms_eps = 1e-6;
    int64_t i;

    /* the layer's parameters and one micro-batch of activations */
    float *ln_w = xmalloc(C * sizeof(float)), *ln_b = xmalloc(C * sizeof(float));
    float *inp = xmalloc(BTC * sizeof(float)), *dout = xmalloc(BTC * sizeof(float));
    /* the forward's outputs: normalized activations and saved statistics */
    float *out = xmalloc(BTC * sizeof(float));
    float *mean = xmalloc(BT * sizeof(float)), *rstd = xmalloc(BT * sizeof(float));
    /* gradients, accumulated into */
    float *dinp = xmalloc(BTC * sizeof(float));
    float *dweight = xmalloc(C * sizeof(float)), *dbias = xmalloc(C * sizeof(float));
    /* the references */
    double *out_ref = xmalloc(BTC * sizeof(double)), *mean_ref = xmalloc(BT * sizeof(double));
    double *rstd_ref = xmalloc(BT * sizeof(double)), *dinp_ref = xmalloc(BTC * sizeof(double));
    double *dweight_ref = xmalloc(C * sizeof(double)), *dbias_ref = xmalloc(C * sizeof(double));
    size_t scratch_bytes;
    void *scratch;

    for (i = 0; i < C; i++) {
        ln_w[i] = 1.0f + 0.2f * rand_sym();
        ln_b[i] = 0.1f * rand_sym();
    }
    /* residual-stream values: each token has its own offset and scale */
    for (i = 0; i < BTC; i++) {
        inp[i] = 0.5f * (float)((i / C) % 7) + (1.0f + (float)((i / C) % 3)) * rand_sym();
        dout[i] = rand_sym();
        dinp[i] = rand_sym(); /* what the residual path already gave */
        dinp_ref[i] = dinp[i];
    }
    for (i = 0; i < C; i++) { /* what earlier micro-batches gave */
        dweight[i] = rand_sym();
        dbias[i] = rand_sym();
        dweight_ref[i] = dweight[i];
        dbias_ref[i] = dbias[i];
    }

    printf("pynorm %s (isa %s): the norms of a transformer block, B=%d T=%d C=%d\n", pn_version(),
           pn_isa(), B, T, C);
    printf("(error: max |pynorm - double reference| / (1 + |reference|))\n");

    /* 1. LayerNorm forward, saving the statistics */
    check(pn_layernorm_forward(out, mean, rstd, inp, ln_w, ln_b, B, T, C, ln_eps, PN_FLOAT32,
                               PN_FLOAT32, NULL),
          "pn_layernorm_forward");
    layernorm_forward_ref(out_ref, mean_ref, rstd_ref, inp, ln_w, ln_b, B, T, C, ln_eps);
    printf("LayerNorm, float32\n");
    report("forward: out", max_err(out, out_ref, BTC), 1e-5);
    report("forward: saved mean", max_err(mean, mean_ref, BT), 1e-6);
    report("forward: saved rstd", max_err(rstd, rstd_ref, BT), 1e-6);

    /* 2. LayerNorm backward from the saved statistics, adding into the
     * gradients; the scratch buffer for the dweight/dbias sums is allocated
     * once, up front, like every other buffer of a training loop */
    scratch_bytes = pn_layernorm_backward_scratch_size(B, T, C, PN_FLOAT32);
    scratch = xmalloc(scratch_bytes ? scratch_bytes : 1);
    check(pn_layernorm_backward(dinp, dweight, dbias, scratch, scratch_bytes, dout, inp, ln_w, mean,
                                rstd, B, T, C, PN_ACCUMULATE, PN_FLOAT32, PN_FLOAT32, NULL),
          "pn_layernorm_backward");
    layernorm_backward_ref(dinp_ref, dweight_ref, dbias_ref, dout, inp, ln_w, mean_ref, rstd_ref, B,
                           T, C);
    report("backward, accumulated: dinp", max_err(dinp, dinp_ref, BTC), 1e-4);
    report("backward, accumulated: dweight", max_err(dweight, dweight_ref, C), 1e-4);
    report("backward, accumulated: dbias", max_err(dbias, dbias_ref, C), 1e-4);

    /* 3. RMSNorm on bfloat16 activations, float32 weights (the statistics of
     * half-precision inputs are float32) */
    {
        uint16_t *x16 = xmalloc(BTC * sizeof(uint16_t)), *y16 = xmalloc(BTC * sizeof(uint16_t));
        float *y = out; /* reused: the bfloat16 output widened to float32 */
        for (i = 0; i < BTC; i++) x16[i] = f32_to_bf16(inp[i]);
        check(pn_rmsnorm_forward(y16, rstd, x16, ln_w, B, T, C, rms_eps, PN_BFLOAT16, PN_FLOAT32,
                                 NULL),
              "pn_rmsnorm_forward");
        rmsnorm_forward_ref(out_ref, rstd_ref, x16, ln_w, B, T, C, rms_eps);
        for (i = 0; i < BTC; i++) y[i] = bf16_to_f32(y16[i]);
        printf("RMSNorm, bfloat16 activations, float32 weight\n");
        /* one rounding to bfloat16 (8 significant bits): at most 2^-8 relative */
        report("forward: out", max_err(y, out_ref, BTC), 1.0 / 256);
        report("forward: saved rstd", max_err(rstd, rstd_ref, BT), 1e-6);
        free(x16);
        free(y16);
    }

    printf("%s\n", failures ? "FAILED" : "all checks passed");
    free(ln_w); free(ln_b); free(inp); free(dout); free(out); free(mean); free(rstd);
    free(dinp); free(dweight); free(dbias); free(out_ref); free(mean_ref); free(rstd_ref);
    free(dinp_ref); free(dweight_ref); free(dbias_ref); free(scratch);
    return failures ? 1 : 0;
}
