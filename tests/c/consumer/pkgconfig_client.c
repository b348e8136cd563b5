/* A client of the installed pynorm that needs nothing but
 *   cc pkgconfig_client.c $(pkg-config --cflags --libs pynorm)
 * (no libm of its own): LayerNorm without weights over a few rows, checked
 * through identities that need no square root - each output row has mean 0
 * and mean square var / (var + eps), and rstd^2 * (var + eps) = 1 - and one
 * bad call, refused before any write. Exit 0 on success. */
#include <stdio.h>

#include <pynorm.h>

static double absd(double v) { return v < 0 ? -v : v; }

int main(void)
{
    enum { B = 2, T = 3, C = 40 };
    const double eps = 1e-5;
    float x[B * T * C], y[B * T * C], mean[B * T], rstd[B * T];
    double worst = 0;
    int i, n, k;
    pn_status s;

    for (i = 0; i < B * T * C; i++)
        x[i] = (float)((i * 37) % 101) * 0.03f - 1.2f + (float)(i / C);
    s = pn_layernorm_forward(y, mean, rstd, x, NULL, NULL, B, T, C, eps, PN_FLOAT32, PN_FLOAT32,
                             NULL);
    if (s != PN_OK) {
        printf("pn_layernorm_forward failed: %s\n", pn_status_string(s));
        return 1;
    }
    for (n = 0; n < B * T; n++) {
        double mu = 0, var = 0, ysum = 0, ysq = 0, e;
        for (k = 0; k < C; k++) mu += x[n * C + k];
        mu /= C;
        for (k = 0; k < C; k++) var += (x[n * C + k] - mu) * (x[n * C + k] - mu);
        var /= C;
        for (k = 0; k < C; k++) {
            ysum += y[n * C + k];
            ysq += (double)y[n * C + k] * y[n * C + k];
        }
        e = absd(ysum / C);
        if (absd(ysq / C - var / (var + eps)) > e) e = absd(ysq / C - var / (var + eps));
        if (absd((double)rstd[n] * rstd[n] * (var + eps) - 1) > e)
            e = absd((double)rstd[n] * rstd[n] * (var + eps) - 1);
        if (absd(mean[n] - mu) > e) e = absd(mean[n] - mu);
        if (!(e <= worst)) worst = e;
    }
    /* a NULL input: refused with PN_ERR_NULL, the output left as it was */
    y[0] = 42.0f;
    s = pn_layernorm_forward(y, NULL, NULL, NULL, NULL, NULL, B, T, C, eps, PN_FLOAT32,
                             PN_FLOAT32, NULL);
    printf("pynorm %s (isa %s): layernorm of %dx%dx%d, worst identity error %.3g; "
           "a NULL input gives \"%s\"\n",
           pn_version(), pn_isa(), B, T, C, worst, pn_status_string(s));
    return worst <= 1e-5 && s == PN_ERR_NULL && y[0] == 42.0f ? 0 : 1;
}
