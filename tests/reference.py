"""Float64 NumPy reference implementations of pynorm's token norms.

These are the ground truth the test suite (and the benchmark's self-check)
measures both pynorm and torch against. Everything is computed in float64 from
the exact values of the inputs (a float16/bfloat16/float32 value converts to
float64 exactly), with a two-pass variance and a power-of-two row scaling so
that huge (1e30, 1e200) and tiny (denormal) rows neither overflow nor underflow.

Only NumPy is needed (ml_dtypes is used when present, for bfloat16 helpers);
torch is never imported here.

Shapes follow pynorm: x has shape (..., C) and is normalized over its last
axis; per-row statistics have shape x.shape[:-1]; weight/bias have shape (C,).
All functions return float64 arrays.
"""

import numpy as np

try:  # bfloat16 is optional for the references themselves
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    ml_dtypes = None
    BFLOAT16 = None

__all__ = [
    "BFLOAT16",
    "default_rms_eps",
    "stat_dtype",
    "layer_norm_ref",
    "rms_norm_ref",
    "add_layer_norm_ref",
    "add_rms_norm_ref",
    "layer_norm_backward_ref",
    "rms_norm_backward_ref",
    "round_to",
    "offset_weight_ref",
    "residual_add_ref",
    "max_abs_err",
    "rel_err",
]


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def default_rms_eps(dtype):
    """torch's default RMSNorm eps: the machine epsilon of the compute type
    (float32's for float16/bfloat16/float32 input, float64's for float64)."""
    if np.dtype(dtype) == np.float64:
        return float(np.finfo(np.float64).eps)
    return float(np.finfo(np.float32).eps)


def stat_dtype(dtype):
    """dtype of the saved statistics (mean, rstd) for an input dtype."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def round_to(a, dtype):
    """Round float64 values once (round to nearest even) to `dtype`."""
    return np.asarray(a, dtype=np.float64).astype(dtype)


def _row_scale(xd):
    """A power of two per row (shape (..., 1)) close to max|x| of the row, 1 for
    all-zero rows; NaN/Inf rows get NaN/Inf (they propagate anyway)."""
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(xd), axis=-1, keepdims=True) if xd.shape[-1] else np.ones(xd.shape[:-1] + (1,))
    amax = np.where(amax == 0, 1.0, amax)
    finite = np.isfinite(amax)
    _, e = np.frexp(np.where(finite, amax, 1.0))
    s = np.ldexp(1.0, e)
    return np.where(finite, s, amax)


def _rstd_from_scaled(ms_scaled, s, eps):
    """For a row scaled by s (x = s * xs, ms_scaled = mean of squares or variance
    of xs): returns (rstd, s * rstd) where rstd = 1/sqrt(s^2 * ms_scaled + eps),
    computed without spurious overflow/underflow of s^2; s * rstd is the factor
    that maps xs to the normalized row (finite even when rstd itself is not)."""
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        if eps == 0:
            srstd = 1.0 / np.sqrt(ms_scaled)
            return srstd / s, srstd
        big = s >= 1.0
        # s >= 1: factor s out (eps/s^2 may harmlessly underflow)
        srstd_big = 1.0 / np.sqrt(ms_scaled + eps / (s * s))
        # s < 1: s^2 * ms may harmlessly underflow against eps > 0
        rstd_small = 1.0 / np.sqrt((s * s) * ms_scaled + eps)
        rstd = np.where(big, srstd_big / s, rstd_small)
        srstd = np.where(big, srstd_big, s * rstd_small)
        return rstd, srstd


def offset_weight_ref(weight, weight_offset=0.0, data_dtype=np.float32):
    """weight_offset + weight as the semantics define it, in float64: the sum is
    taken in float32 (float64 for float64 data), never in the weight's own dtype
    (a bfloat16 weight of 15.8125 plus 1 is 16.8125, not 16.75 or 17)."""
    if weight is None:
        return None
    if weight_offset == 0.0:
        return _f64(weight)
    if np.dtype(data_dtype) == np.float64:
        return float(weight_offset) + _f64(weight)
    return (np.float32(weight_offset) + np.asarray(weight).astype(np.float32)).astype(np.float64)


def _apply_weight(xhat, x_dtype, weight, bias, weight_offset, rounding):
    """y from the float64 xhat: rounding "once" keeps xhat exact; "llama" rounds it
    to the data dtype first (then y = xhat * (offset + w) + b, exact in float64)."""
    if rounding == "llama":
        xhat = round_to(xhat, x_dtype).astype(np.float64)
    elif rounding != "once":
        raise ValueError(rounding)
    w = offset_weight_ref(weight, weight_offset, x_dtype)
    y = xhat * w if w is not None else xhat
    return y + _f64(bias) if bias is not None else y


def layer_norm_ref(x, weight=None, bias=None, eps=1e-5, weight_offset=0.0, rounding="once"):
    """LayerNorm over the last axis in float64.

    Returns (y, mean, rstd): y has x's shape, mean/rstd have shape x.shape[:-1].
    mean = sum(x)/C, var = sum((x-mean)^2)/C (biased), rstd = 1/sqrt(var+eps),
    y = (x-mean)*rstd*(weight_offset + weight) + bias; rounding="llama" rounds
    (x-mean)*rstd to x's dtype before the weight.
    """
    x = np.asarray(x)
    xd = _f64(x)
    s = _row_scale(xd)
    with np.errstate(invalid="ignore", over="ignore"):
        xs = xd / s
        mean_s = xs.mean(axis=-1, keepdims=True)
        d = xs - mean_s
        var_s = (d * d).mean(axis=-1, keepdims=True)
        rstd, srstd = _rstd_from_scaled(var_s, s, float(eps))
        mean = mean_s * s
        y = d * srstd  # (x-mean)*rstd without overflowing (x-mean)
        y = _apply_weight(y, x.dtype, weight, bias, weight_offset, rounding)
    return y, mean[..., 0], rstd[..., 0]


def rms_norm_ref(x, weight=None, eps=None, weight_offset=0.0, rounding="once"):
    """RMSNorm over the last axis in float64.

    Returns (y, rstd): rstd = 1/sqrt(mean(x^2) + eps), y = x*rstd*(weight_offset +
    weight); rounding="llama" rounds x*rstd to x's dtype before the weight.
    eps=None means default_rms_eps(x.dtype).
    """
    x = np.asarray(x)
    if eps is None:
        eps = default_rms_eps(x.dtype)
    xd = _f64(x)
    s = _row_scale(xd)
    with np.errstate(invalid="ignore", over="ignore"):
        xs = xd / s
        ms_s = (xs * xs).mean(axis=-1, keepdims=True)
        rstd, srstd = _rstd_from_scaled(ms_s, s, float(eps))
        y = _apply_weight(xs * srstd, x.dtype, weight, None, weight_offset, rounding)
    return y, rstd[..., 0]


def residual_add_ref(x, residual):
    """h = x + residual rounded once to x's dtype (an array of x's dtype)."""
    x = np.asarray(x)
    # The exact sum in float64 rounded once to x's dtype. (float64 holds the sum
    # of two float16/bfloat16 values exactly; for float32 the double rounding
    # 53 -> 24 bits is innocuous for an addition.)
    if x.dtype == np.float64:
        return x + np.asarray(residual).astype(np.float64)
    return (_f64(x) + _f64(residual)).astype(x.dtype)


def add_layer_norm_ref(x, residual, weight=None, bias=None, eps=1e-5):
    """Returns (y, h, mean, rstd): h = x + residual rounded to x's dtype (an
    array of x's dtype), y = layer_norm_ref(h) in float64."""
    h = residual_add_ref(x, residual)
    y, mean, rstd = layer_norm_ref(h, weight, bias, eps)
    return y, h, mean, rstd


def add_rms_norm_ref(x, residual, weight=None, eps=None):
    """Returns (y, h, rstd), as add_layer_norm_ref."""
    h = residual_add_ref(x, residual)
    y, rstd = rms_norm_ref(h, weight, eps if eps is not None else default_rms_eps(np.asarray(x).dtype))
    return y, h, rstd


def _sum_rows(a, C):
    return a.reshape(-1, C).sum(axis=0)


def layer_norm_backward_ref(dy, x, weight=None, eps=1e-5, mean=None, rstd=None, weight_offset=0.0):
    """Gradients of LayerNorm in float64.

    Statistics are recomputed exactly from x and eps unless mean and rstd are
    given. Returns (dx, dweight, dbias) with dweight = sum(dy*xhat) and
    dbias = sum(dy) over all rows (returned whether or not weight is None).
    dx uses (weight_offset + weight); dweight does not depend on the offset.
    """
    xd = _f64(x)
    C = xd.shape[-1]
    if mean is None or rstd is None:
        _, m, r = layer_norm_ref(x, None, None, eps)
        mean = m if mean is None else mean
        rstd = r if rstd is None else rstd
    m = _f64(mean)[..., None]
    r = _f64(rstd)[..., None]
    dyd = _f64(dy)
    with np.errstate(invalid="ignore", over="ignore"):
        xhat = (xd - m) * r
        g = dyd * offset_weight_ref(weight, weight_offset, np.asarray(x).dtype) if weight is not None else dyd
        dx = r * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        dweight = _sum_rows(dyd * xhat, C)
        dbias = _sum_rows(dyd, C)
    return dx, dweight, dbias


def rms_norm_backward_ref(dy, x, weight=None, eps=None, rstd=None, weight_offset=0.0):
    """Gradients of RMSNorm in float64. Returns (dx, dweight), dweight =
    sum(dy*x*rstd) over all rows; dx uses (weight_offset + weight)."""
    x = np.asarray(x)
    xd = _f64(x)
    C = xd.shape[-1]
    if rstd is None:
        _, rstd = rms_norm_ref(x, None, eps)
    r = _f64(rstd)[..., None]
    dyd = _f64(dy)
    with np.errstate(invalid="ignore", over="ignore"):
        xhat = xd * r
        g = dyd * offset_weight_ref(weight, weight_offset, x.dtype) if weight is not None else dyd
        dx = r * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        dweight = _sum_rows(dyd * xhat, C)
    return dx, dweight


def max_abs_err(got, ref):
    """max |got - ref| in float64; inf when any NaN/Inf differs from the
    reference; 0 for empty arrays."""
    g = _f64(got)
    r = _f64(ref)
    if g.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(g - r)
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max())


def rel_err(got, ref):
    """max|got - ref| / max|ref| (max|ref| taken as 1 when it is 0)."""
    r = _f64(ref)
    scale = float(np.max(np.abs(r))) if r.size else 1.0
    if not np.isfinite(scale) or scale == 0:
        scale = 1.0
    return max_abs_err(got, ref) / scale
