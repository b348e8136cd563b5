"""Huge tensors: more than 2^31 elements in one call (int64 indexing).

A bfloat16 input of 524544 x 4096 = 2^31 + 2^20 elements (4 GiB) is
normalized into a 4 GiB output: every element offset past 2^31 would wrap in
32-bit arithmetic. The rows repeat a 256-row random pattern, and column 0 of
every row holds a marker that depends on the row, so that each row's
statistics are known in closed form: the test checks mean and rstd of all
524544 rows, the first and last output element of every row, whole rows
around the 2^31 boundary and at the end, then RMSNorm into the same output
and RMSNorm's backward (its weight gradient reduces over all 2^31+ elements).

Needs about 8.5 GiB of free memory; skipped, saying so, where there is less
(or with PYNORM_SKIP_HUGE=1). The overflow checks of sizes whose byte count
exceeds int64 are C tests (tests/c/test_errors.c, test_reliability_sizes.c)
and tests/test_errors_doc.py.
"""

import os

import ml_dtypes
import numpy as np
import pytest

import pynorm

BF16 = np.dtype(ml_dtypes.bfloat16)
K, C = 256, 4096                   # pattern rows, row length
R = 2049 * K                       # 524544 rows
N = R * C                          # 2^31 + 2^20 elements
NEED = 2 * N * 2 + (512 << 20)     # x and y (bfloat16) plus working room


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.fixture(scope="module")
def huge():
    if os.environ.get("PYNORM_SKIP_HUGE"):
        pytest.skip("PYNORM_SKIP_HUGE is set")
    avail = mem_available()
    if avail is None:
        pytest.skip("cannot read MemAvailable from /proc/meminfo to check for the 8.5 GiB this test needs")
    if avail < NEED:
        pytest.skip(f"needs {NEED / 2**30:.1f} GiB of free memory for a 2^31+ element tensor, "
                    f"{avail / 2**30:.1f} GiB available")
    assert N > 2**31
    rng = np.random.default_rng(31)
    P = rng.standard_normal((K, C)).astype(BF16)
    x = np.empty((R, C), BF16)
    x.reshape(R // K, K, C)[...] = P
    rows = np.arange(R)
    # marker: multiples of 1/4 in [-31.25, 31.25], exact in bfloat16
    marker = (((rows * 37) % 251) - 125).astype(np.float64) * 0.25
    x[:, 0] = marker.astype(BF16)
    yield P.astype(np.float64), marker, x
    del x


def closed_form_stats(P, marker):
    """Per row: mean and E[x^2] from the pattern row (r mod K) with column 0
    replaced by the row's marker, in float64."""
    k = np.arange(R) % K
    s1 = P.sum(axis=1) - P[:, 0]
    s2 = (P * P).sum(axis=1) - P[:, 0] ** 2
    sum1 = s1[k] + marker
    sum2 = s2[k] + marker ** 2
    return sum1 / C, sum2 / C, k


def bf16_tol(v):
    return 2.0 ** -7 * np.abs(v) + 1e-6     # one bfloat16 rounding and some


def test_layer_norm_beyond_2_31_elements(huge):
    P, marker, x = huge
    y, mean, rstd = pynorm.layer_norm_forward(x)
    assert y.shape == x.shape and y.dtype == BF16 and mean.shape == (R,)
    m1, m2, k = closed_form_stats(P, marker)
    var = m2 - m1 * m1
    rstd_ref = 1 / np.sqrt(var + 1e-5)
    # every row's statistics: a row read from the wrong place has another marker
    np.testing.assert_allclose(mean.astype(np.float64), m1, rtol=0, atol=1e-5 + 1e-5 * np.abs(m1).max())
    np.testing.assert_allclose(rstd.astype(np.float64), rstd_ref, rtol=1e-4)
    # the first and the last element of every row
    y0 = y[:, 0].astype(np.float64)
    ylast = y[:, -1].astype(np.float64)
    ref0 = (marker - m1) * rstd_ref
    reflast = (P[k, -1] - m1) * rstd_ref
    np.testing.assert_allclose(y0, ref0, rtol=0, atol=bf16_tol(ref0).max())
    np.testing.assert_allclose(ylast, reflast, rtol=0, atol=bf16_tol(reflast).max())
    # whole rows: the start, around element 2^31 (row 2^19), the end, a sample
    boundary = 2**31 // C
    sample = np.r_[0:3, boundary - 2:boundary + 3, R - 3:R,
                   np.random.default_rng(7).integers(0, R, 64)]
    xs = x[sample].astype(np.float64)
    mu = xs.mean(axis=1, keepdims=True)
    ref = (xs - mu) / np.sqrt(((xs - mu) ** 2).mean(axis=1, keepdims=True) + 1e-5)
    got = y[sample].astype(np.float64)
    assert np.abs(got - ref).max() <= bf16_tol(ref).max()
    del y


def test_rms_norm_and_backward_beyond_2_31_elements(huge):
    P, marker, x = huge
    y, rstd = pynorm.rms_norm_forward(x)
    m1, m2, k = closed_form_stats(P, marker)
    eps = float(np.finfo(np.float32).eps)
    rstd_ref = 1 / np.sqrt(m2 + eps)
    np.testing.assert_allclose(rstd.astype(np.float64), rstd_ref, rtol=1e-4)
    ref0 = marker * rstd_ref
    np.testing.assert_allclose(y[:, 0].astype(np.float64), ref0, rtol=0, atol=bf16_tol(ref0).max())
    # backward with dy = x, into the forward's output buffer: dx and the
    # weight gradient, a reduction over all 2^31 + 2^20 elements
    w = np.ones(C, np.float32)
    dx, dw = pynorm.rms_norm_backward(x, x, rstd, w, out=(y, np.empty(C, np.float32)))
    assert dx is y
    # dw[c] = sum_r x[r,c]^2 * rstd[r]: per pattern row, the rows that repeat it
    rs = rstd.astype(np.float64)
    per_k = np.bincount(k, weights=rs, minlength=K)
    dw_ref = (P * P * per_k[:, None]).sum(axis=0)
    dw_ref[0] = (marker ** 2 * rs).sum()
    np.testing.assert_allclose(dw.astype(np.float64), dw_ref, rtol=2e-4)
    # dx on the boundary rows: rstd * (x - xhat * mean(x * xhat)) with dy = x
    boundary = 2**31 // C
    for r in (0, boundary - 1, boundary, R - 1):
        xr = x[r].astype(np.float64)
        xh = xr * rs[r]
        ref = rs[r] * (xr - xh * (xr * xh).mean())
        assert np.abs(dx[r].astype(np.float64) - ref).max() <= 2.0 ** -7 * np.abs(ref).max() + 1e-3, r
