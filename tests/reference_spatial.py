"""Float64 NumPy references for pynorm's spatial norms (GroupNorm,
InstanceNorm, BatchNorm), forward and backward, and torch's running-statistics
update. The ground truth tests/test_spatial.py measures pynorm and torch against.

Every function takes arrays in NCHW order, (N, C, *spatial); to_nhwc/from_nhwc
convert. Statistics are two-pass in float64 on values scaled by a power of two
(so that huge and tiny magnitudes neither overflow nor underflow); inputs of
any dtype convert to float64 exactly. Results are float64.
"""

import numpy as np


def f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def to_nhwc(a):
    """(N, C, *spatial) -> (N, *spatial, C), C-contiguous."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), 1, -1))


def from_nhwc(a):
    """(N, *spatial, C) -> (N, C, *spatial) view."""
    return np.moveaxis(np.asarray(a), -1, 1)


def _pow2_scale(v, axis):
    """A power of two per reduced set close to max|v| (1 for all-zero sets, the
    max itself where it is not finite: NaN/Inf propagate anyway)."""
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(v), axis=axis, keepdims=True)
    amax = np.where(amax == 0, 1.0, amax)
    finite = np.isfinite(amax)
    _, e = np.frexp(np.where(finite, amax, 1.0))
    return np.where(finite, np.ldexp(1.0, e), amax)


def _moments(v, axis):
    """mean and biased variance over `axis` of float64 v, without overflow."""
    s = _pow2_scale(v, axis)
    with np.errstate(invalid="ignore", over="ignore"):
        vs = v / s
        m = vs.mean(axis=axis, keepdims=True)
        var = ((vs - m) ** 2).mean(axis=axis, keepdims=True)
    return m * s, var, s


def _rstd(var_scaled, s, eps):
    """1/sqrt(s^2 * var_scaled + eps) without overflowing s^2."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # s^2 * var + eps = s^2 * (var + eps / s^2)
        return 1.0 / (s * np.sqrt(var_scaled + eps / (s * s)))


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _affine(y, x, w, b):
    cs = _channel_shape(x)
    if w is not None:
        y = y * f64(w).reshape(cs)
    if b is not None:
        y = y + f64(b).reshape(cs)
    return y


# ---- GroupNorm / InstanceNorm --------------------------------------------------

def group_norm_ref(x, num_groups, weight=None, bias=None, eps=1e-5):
    """(y, mean (N, G), rstd (N, G)) of GroupNorm over NCHW x."""
    x = f64(x)
    N, C = x.shape[:2]
    G = num_groups
    xg = x.reshape(N, G, -1)
    m, var, s = _moments(xg, -1)
    rstd = _rstd(var, s, eps)
    with np.errstate(invalid="ignore"):
        y = ((xg - m) * rstd).reshape(x.shape)
    return _affine(y, x, weight, bias), m[..., 0], rstd[..., 0]


def instance_norm_ref(x, weight=None, bias=None, eps=1e-5):
    return group_norm_ref(x, x.shape[1], weight, bias, eps)


def group_norm_backward_ref(dy, x, num_groups, weight=None, eps=1e-5):
    """(dx, dweight, dbias) from float64 statistics."""
    x, dy = f64(x), f64(dy)
    N, C = x.shape[:2]
    G = num_groups
    _, mean, rstd = group_norm_ref(x, G, None, None, eps)
    xg = x.reshape(N, G, -1)
    xhat = (xg - mean[..., None]) * rstd[..., None]
    g = dy if weight is None else dy * f64(weight).reshape(_channel_shape(x))
    g = g.reshape(N, G, -1)
    dx = rstd[..., None] * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    axes = (0,) + tuple(range(2, x.ndim))
    xhat = xhat.reshape(x.shape)
    return dx.reshape(x.shape), (dy * xhat).sum(axes), dy.sum(axes)


# ---- BatchNorm ------------------------------------------------------------------------

def _bn_axes(x):
    return (0,) + tuple(range(2, x.ndim))


def batch_norm_train_ref(x, weight=None, bias=None, eps=1e-5):
    """(y, mean (C,), rstd (C,), biased var (C,)) of training-mode BatchNorm."""
    x = f64(x)
    axes = _bn_axes(x)
    m, var, s = _moments(x, axes)
    rstd = _rstd(var, s, eps)
    with np.errstate(invalid="ignore"):
        y = (x - m) * rstd
    with np.errstate(over="ignore"):
        var_true = var * s * s
    return _affine(y, x, weight, bias), m.reshape(-1), rstd.reshape(-1), var_true.reshape(-1)


def batch_norm_eval_ref(x, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """(y, mean, rstd) of eval-mode BatchNorm: the running statistics."""
    x = f64(x)
    cs = _channel_shape(x)
    rm, rv = f64(running_mean), f64(running_var)
    rstd = 1.0 / np.sqrt(rv + eps)
    y = (x - rm.reshape(cs)) * rstd.reshape(cs)
    return _affine(y, x, weight, bias), rm, rstd


def running_update_ref(running_mean, running_var, mean, var_biased, n, momentum):
    """torch's update: running = (1 - momentum) * running + momentum * batch,
    the batch variance unbiased (n / (n - 1))."""
    rm = (1 - momentum) * f64(running_mean) + momentum * f64(mean)
    rv = (1 - momentum) * f64(running_var) + momentum * f64(var_biased) * n / (n - 1)
    return rm, rv


def batch_norm_backward_ref(dy, x, weight=None, eps=1e-5, training=True, running_mean=None, running_var=None):
    """(dx, dweight, dbias): training uses the batch statistics (their gradient
    flows into dx); eval the running ones (constants)."""
    x, dy = f64(x), f64(dy)
    axes = _bn_axes(x)
    cs = _channel_shape(x)
    if training:
        _, mean, rstd, _ = batch_norm_train_ref(x, None, None, eps)
    else:
        _, mean, rstd = batch_norm_eval_ref(x, running_mean, running_var, None, None, eps)
    xhat = (x - mean.reshape(cs)) * rstd.reshape(cs)
    g = dy if weight is None else dy * f64(weight).reshape(cs)
    if training:
        dx = rstd.reshape(cs) * (g - g.mean(axes, keepdims=True) - xhat * (g * xhat).mean(axes, keepdims=True))
    else:
        dx = rstd.reshape(cs) * g
    return dx, (dy * xhat).sum(axes), dy.sum(axes)


def param_grad_scales(dy, xhat):
    """The error scales of dweight and dbias: per channel, the sums of |terms|
    (|dy * xhat| and |dy|), their largest over the channels. A floating-point
    sum is accurate relative to the sum of its terms' magnitudes, not to its
    value."""
    dy, xhat = f64(dy), f64(xhat)
    axes = _bn_axes(dy)
    return float(np.abs(dy * xhat).sum(axes).max()), float(np.abs(dy).sum(axes).max())


def max_abs_err(got, ref):
    """max |got - ref|; a NaN on one side only counts as infinite."""
    g, r = f64(got), f64(ref)
    if g.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        d = np.abs(g - r)
    both_nan = np.isnan(g) & np.isnan(r)
    same_inf = np.isinf(g) & (g == r)
    d = np.where(both_nan | same_inf, 0.0, d)
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max())
