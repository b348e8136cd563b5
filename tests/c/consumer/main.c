/* A consumer of the installed pynorm: LayerNorm over a small buffer, checked
 * against a few lines of double arithmetic. Exit 0 on success. */
#include <math.h>
#include <stdio.h>

#include <pynorm.h>

int main(void)
{
    enum { B = 2, T = 3, C = 8 };
    float x[B * T * C], y[B * T * C], w[C], b[C], mean[B * T], rstd[B * T];
    double maxerr = 0;
    int i, n, k;
    pn_status s;

    for (i = 0; i < B * T * C; i++)
        x[i] = (float)sin(0.7 * i) * 3.0f + (float)(i % 5);
    for (k = 0; k < C; k++) {
        w[k] = 1.0f + 0.125f * (float)k;
        b[k] = 0.5f - 0.25f * (float)k;
    }
    s = pn_layernorm_forward(y, mean, rstd, x, w, b, B, T, C, 1e-5, PN_FLOAT32, PN_FLOAT32, NULL);
    if (s != PN_OK) {
        printf("pn_layernorm_forward failed: %s\n", pn_status_string(s));
        return 1;
    }
    for (n = 0; n < B * T; n++) {
        double mu = 0, var = 0, rs;
        for (k = 0; k < C; k++) mu += x[n * C + k];
        mu /= C;
        for (k = 0; k < C; k++) var += (x[n * C + k] - mu) * (x[n * C + k] - mu);
        var /= C;
        rs = 1.0 / sqrt(var + 1e-5);
        for (k = 0; k < C; k++) {
            double ref = (x[n * C + k] - mu) * rs * w[k] + b[k];
            double e = fabs(y[n * C + k] - ref);
            if (!(e <= maxerr)) maxerr = e;
        }
        if (!(fabs(mean[n] - mu) <= 1e-5 * (fabs(mu) + 1)) || !(fabs(rstd[n] - rs) <= 1e-5 * rs)) {
            printf("row %d: mean %g (want %g), rstd %g (want %g)\n", n, mean[n], mu, rstd[n], rs);
            return 1;
        }
    }
    printf("pynorm %s (isa %s): layernorm of %dx%dx%d, max error %.3g\n", pn_version(), pn_isa(),
           B, T, C, maxerr);
    return maxerr <= 1e-4 ? 0 : 1;
}
