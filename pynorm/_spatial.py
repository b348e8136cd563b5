"""Spatial norms (GroupNorm, InstanceNorm, BatchNorm): check, lay out, call C.

x has shape (N, C, *spatial) with layout="NCHW" (the default) or
(N, *spatial, C) with layout="NHWC" (torch's channels_last, permuted to put
C last). The C library sees N, C and S = the product of the spatial sizes, as
one dense buffer: an input with other strides is copied first. CUDA arrays go
to pynorm._cuda_spatial, which runs the same checks over libpynorm_cuda.
"""
import math
import numbers
import sys

import numpy as np

from . import _cuda
from ._arrays import (check_distinct_outputs, check_eps, check_out, check_status, dense_target, empty, gradient_outs,
                      internal_overlap, param_dtype, PN_DTYPE, ptr, shares_memory, stats_dtype, write_back)
from ._lib import lib

_F32 = np.dtype(np.float32)
_LAYOUTS = {"NCHW": lib.PN_NCHW, "NHWC": lib.PN_NHWC}
_DTYPE_NAMES = "float32, float16, bfloat16 (ml_dtypes) or float64"
_INSTANCE = object()   # num_groups of instance_norm: one channel per group


# ---- argument checks -----------------------------------------------------------

def _impl(x):
    """The module that runs x: this one for NumPy arrays, pynorm._cuda_spatial
    (the same functions over libpynorm_cuda) for CUDA arrays."""
    if _cuda.is_cuda_array(x):
        from . import _cuda_spatial
        return _cuda_spatial
    return sys.modules[__name__]


def _check_layout(layout):
    if not isinstance(layout, str):
        raise TypeError(f'layout must be "NCHW" or "NHWC", got {type(layout).__name__}')
    if layout not in _LAYOUTS:
        raise ValueError(f'layout must be "NCHW" or "NHWC", got {layout!r}')
    return layout


def _check_x(x, name="x"):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (or a CUDA array), got {type(x).__name__}")
    if x.dtype not in PN_DTYPE:
        raise TypeError(f"{name} has dtype {x.dtype}; expected {_DTYPE_NAMES}")
    _check_rank(x.shape, name)
    return x


def _check_rank(shape, name):
    if len(shape) < 2:
        raise ValueError(f"{name} must have at least 2 axes, (N, C, *spatial) or (N, *spatial, C); "
                         f"got shape {tuple(shape)}")


def _geometry(x, layout):
    """(N, C, S) of x in this layout; C must not be 0."""
    if layout == "NCHW":
        N, C, spatial = x.shape[0], x.shape[1], x.shape[2:]
    else:
        N, C, spatial = x.shape[0], x.shape[-1], x.shape[1:-1]
    if C == 0:
        raise ValueError(f"x has shape {x.shape}: no channels (C = 0) in layout {layout}")
    return N, C, math.prod(spatial)


def _check_eps(eps, x):
    if eps is None:
        raise TypeError("eps must be a real number, got None")
    return check_eps(eps, x.dtype)


def _check_same(a, name, x):
    a = _check_x(a, name)
    if a.shape != x.shape:
        raise ValueError(f"{name} has shape {a.shape}; expected x's shape {x.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {a.dtype}; expected x's dtype {x.dtype}")
    return a


def _check_param(p, name, x, C):
    """weight/bias/running stats: None or C values in x's dtype or float32."""
    if p is None:
        return None
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or None, got {type(p).__name__}")
    if p.dtype != x.dtype and p.dtype != _F32:
        raise TypeError(f"{name} has dtype {p.dtype}; expected x's dtype ({x.dtype}) or float32")
    if p.shape != (C,):
        raise ValueError(f"{name} has shape {p.shape}; expected ({C},), the channel count of x")
    return p


def _check_groups(num_groups, C):
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    G = int(num_groups)
    if G < 1 or C % G:
        raise ValueError(f"num_groups must be a positive divisor of the channel count {C}, got {G}")
    return G


def _check_stats(s, name, shape, x):
    if not isinstance(s, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(s).__name__}")
    if s.shape != tuple(shape):
        raise ValueError(f"{name} has shape {s.shape}; expected {tuple(shape)}")
    if s.dtype != stats_dtype(x.dtype):
        raise TypeError(f"{name} has dtype {s.dtype}; expected {stats_dtype(x.dtype)} (as the forward saves it)")
    return np.ascontiguousarray(s)


def _dense(a):
    return a if a is None or a.flags.c_contiguous else np.ascontiguousarray(a)


def _y_out(out, x, inputs):
    """The forward's output: out= checked (any strides: the kernels write dense
    buffers, so a strided out= is written through a temporary), or a new array."""
    if out is None:
        return empty(x.shape, x.dtype)
    return check_out(out, "out", x.shape, x.dtype, inputs)


# ---- GroupNorm / InstanceNorm ---------------------------------------------------

def _check_group_sizes(instance, N, C, G, S, shape):
    """torch's rules (torch.nn.functional): one value to normalize over is refused."""
    if instance and S == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(shape)}")
    if not instance and N * (C // G) * S == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")


def _group_norm_forward(x, num_groups, weight, bias, eps, layout, out, op):
    """Returns (y, mean, rstd); num_groups _INSTANCE means InstanceNorm (G = C)."""
    x = _check_x(x)
    layout = _check_layout(layout)
    N, C, S = _geometry(x, layout)
    instance = num_groups is _INSTANCE
    G = C if instance else _check_groups(num_groups, C)
    weight = _dense(_check_param(weight, "weight", x, C))
    bias = _dense(_check_param(bias, "bias", x, C))
    wdtype = param_dtype(weight, bias)
    eps = _check_eps(eps, x)
    _check_group_sizes(instance, N, C, G, S, x.shape)
    y = _y_out(out, x, (("x", x), ("weight", weight), ("bias", bias)))
    sdt = stats_dtype(x.dtype)
    mean, rstd = empty((N, G), sdt), empty((N, G), sdt)
    if x.size == 0:   # no samples, or groups of no values: statistics of nothing
        mean[...] = np.nan
        rstd[...] = np.nan
        return y, mean, rstd
    xd = np.ascontiguousarray(x)
    back = []
    yd = dense_target(y, False, back)
    status = lib.pn_groupnorm_forward(ptr(yd), ptr(mean), ptr(rstd), ptr(xd), ptr(weight), ptr(bias),
                                      N, C, S, G, eps, _LAYOUTS[layout], PN_DTYPE[x.dtype], PN_DTYPE[wdtype])
    check_status(status, op)
    write_back(back)
    return y, mean, rstd


def _grads_out(out, accumulate, x, C, wdtype, inputs):
    names = ("dx", "dweight", "dbias")
    out = gradient_outs(out, accumulate, names)
    grads = []
    for name, o, shape, dtype in zip(names, out, (x.shape, (C,), (C,)), (x.dtype, wdtype, wdtype)):
        if o is None:
            grads.append(empty(shape, dtype))
        else:
            grads.append(check_out(o, f"out ({name})", shape, dtype, inputs))
    check_distinct_outputs(list(zip(names, grads)))
    return grads


def _backward(kind, dy, x, mean, rstd, num_groups, weight, layout, training, out, accumulate):
    x = _check_x(x)
    dy = _check_same(dy, "dy", x)
    layout = _check_layout(layout)
    N, C, S = _geometry(x, layout)
    if kind == "group":
        G = _check_groups(num_groups, C)
        shape = (N, G)
    else:
        shape = (C,)
    mean = _check_stats(mean, "mean", shape, x)
    rstd = _check_stats(rstd, "rstd", shape, x)
    weight = _dense(_check_param(weight, "weight", x, C))
    wdtype = weight.dtype if weight is not None else _F32
    inputs = (("dy", dy), ("x", x), ("mean", mean), ("rstd", rstd), ("weight", weight))
    dx, dw, db = _grads_out(out, accumulate, x, C, wdtype, inputs)
    if x.size == 0:   # the parameter gradients are sums over nothing
        if not accumulate:
            dw[...] = 0
            db[...] = 0
        return dx, dw, db
    dyd, xd = np.ascontiguousarray(dy), np.ascontiguousarray(x)
    back = []       # the kernels write dense buffers: strided out= arrays through temporaries
    dxd, dwd, dbd = (dense_target(g, accumulate, back) for g in (dx, dw, db))
    flags = lib.PN_ACCUMULATE if accumulate else 0
    dt, wdt, lay = PN_DTYPE[x.dtype], PN_DTYPE[wdtype], _LAYOUTS[layout]
    if kind == "group":
        status = lib.pn_groupnorm_backward(ptr(dxd), ptr(dwd), ptr(dbd), ptr(None), 0, ptr(dyd), ptr(xd),
                                           ptr(weight), ptr(mean), ptr(rstd), N, C, S, G, flags, lay, dt, wdt)
    else:
        if training:
            flags |= lib.PN_BN_TRAINING
        status = lib.pn_batchnorm_backward(ptr(dxd), ptr(dwd), ptr(dbd), ptr(None), 0, ptr(dyd), ptr(xd),
                                           ptr(weight), ptr(mean), ptr(rstd), N, C, S, flags, lay, dt, wdt)
    check_status(status, kind, "_norm_backward")
    write_back(back)
    return dx, dw, db


# ---- BatchNorm ----------------------------------------------------------------------

def _check_running_given(rm, rv, training):
    """running_mean/running_var: both needed in eval, both or neither in training."""
    if not training and (rm is None or rv is None):
        missing = "running_mean" if rm is None else "running_var"
        raise ValueError(f"{missing} must be given in evaluation mode (training=False)")
    if (rm is None) != (rv is None):   # torch's rule
        raise ValueError("running_mean and running_var must either both be None or neither be None")


def _check_running_dtypes(rm, rv):
    if rm is not None and rv is not None and rm.dtype != rv.dtype:
        raise TypeError(f"running_mean and running_var must have the same dtype, got {rm.dtype} and {rv.dtype}")


def _update_args(training, update, momentum, eps, num_batches_tracked, N, S, shape):
    """The scalar arguments of a BatchNorm forward, checked as torch does:
    (flags, momentum, count) for pn_batchnorm_forward / pn_cuda_batchnorm_forward."""
    if training and eps == 0:   # torch's rule
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    flags, mom, count = (lib.PN_BN_TRAINING if training else 0), 0.0, 0
    if momentum is None:
        if update:
            if (isinstance(num_batches_tracked, bool) or not isinstance(num_batches_tracked, numbers.Integral)
                    or num_batches_tracked < 1):
                raise ValueError("momentum=None (cumulative moving average) needs num_batches_tracked, "
                                 f"the count of batches including this one (an int >= 1), got {num_batches_tracked!r}")
            flags |= lib.PN_BN_CUMULATIVE
            count = int(num_batches_tracked)
    else:
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            raise TypeError(f"momentum must be a real number or None, got {type(momentum).__name__}")
        mom = float(momentum)
        if not math.isfinite(mom):
            raise ValueError(f"momentum must be finite, got {mom}")
    if training and N * S == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")
    return flags, mom, count


def _check_running(rm, rv, x, C, training):
    """running_mean/running_var: as _check_running_given; same dtype; writable
    when they are updated (training)."""
    _check_running_given(rm, rv, training)
    rm = _check_param(rm, "running_mean", x, C)
    rv = _check_param(rv, "running_var", x, C)
    _check_running_dtypes(rm, rv)
    if rm is not None and rv is not None:
        if shares_memory(rm, rv):
            raise ValueError("running_mean overlaps running_var")
    for name, r in (("running_mean", rm), ("running_var", rv)):
        if r is not None and shares_memory(r, x):
            raise ValueError(f"{name} overlaps x")
        if r is not None and training and not r.flags.writeable:
            raise ValueError(f"{name} is read-only, but training=True updates it in place")
        if r is not None and training and internal_overlap(r):
            raise ValueError(f"{name} has a zero stride: training=True updates each of its elements")
    return rm, rv


def _batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum, eps, layout,
                        num_batches_tracked, out, op):
    x = _check_x(x)
    layout = _check_layout(layout)
    N, C, S = _geometry(x, layout)
    training = bool(training)
    rm, rv = _check_running(running_mean, running_var, x, C, training)
    weight = _dense(_check_param(weight, "weight", x, C))
    bias = _dense(_check_param(bias, "bias", x, C))
    wdtype = param_dtype(weight, bias)
    eps = _check_eps(eps, x)
    update = training and rm is not None
    flags, mom, count = _update_args(training, update, momentum, eps, num_batches_tracked,
                                     N, S, x.shape)
    y = _y_out(out, x, (("x", x), ("weight", weight), ("bias", bias), ("running_mean", rm),
                        ("running_var", rv)))
    sdt = stats_dtype(x.dtype)
    mean, rstd = empty((C,), sdt), empty((C,), sdt)
    if x.size == 0:   # as torch: y is empty and the running statistics stay as they are
        if training:
            mean[...] = np.nan
            rstd[...] = np.nan
        else:
            mean[...] = rm
            rstd[...] = 1.0 / np.sqrt(rv.astype(np.float64) + eps)
        return y, mean, rstd
    rdtype = rm.dtype if rm is not None else (rv.dtype if rv is not None else _F32)
    # the kernels update dense running statistics: other strides go through a copy
    rmd, rvd = _dense(rm), _dense(rv)
    xd = np.ascontiguousarray(x)
    back = []
    yd = dense_target(y, False, back)
    status = lib.pn_batchnorm_forward(ptr(yd), ptr(mean), ptr(rstd), ptr(rmd), ptr(rvd), ptr(xd), ptr(weight),
                                      ptr(bias), N, C, S, eps, mom, count, flags, _LAYOUTS[layout],
                                      PN_DTYPE[x.dtype], PN_DTYPE[wdtype], PN_DTYPE[rdtype])
    check_status(status, op)
    write_back(back)
    if update:
        if rmd is not rm:
            rm[...] = rmd
        if rvd is not rv:
            rv[...] = rvd
    return y, mean, rstd


# ---- the public functions ---------------------------------------------------------

def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, layout="NCHW", out=None):
    """GroupNorm: statistics per sample over each group of C/num_groups channels
    and all spatial positions; y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c].
    x: (N, C, *spatial), or (N, *spatial, C) with layout="NHWC"."""
    return _impl(x)._group_norm_forward(x, num_groups, weight, bias, eps, layout, out, "group_norm")[0]


def instance_norm(x, weight=None, bias=None, eps=1e-5, *, layout="NCHW", out=None):
    """InstanceNorm: GroupNorm with one channel per group (statistics per sample and channel)."""
    return _impl(x)._group_norm_forward(x, _INSTANCE, weight, bias, eps, layout, out, "instance_norm")[0]


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, layout="NCHW"):
    """GroupNorm saving its statistics for the backward: returns (y, mean, rstd), mean/rstd of shape (N, G)."""
    return _impl(x)._group_norm_forward(x, num_groups, weight, bias, eps, layout, None, "group_norm_forward")


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, layout="NCHW", out=None,
                        accumulate=False):
    """Gradients of group_norm: returns (dx, dweight, dbias); dweight/dbias have weight's dtype
    (float32 when weight is None). out=(dx, dweight, dbias) writes into given arrays;
    accumulate=True adds to them."""
    return _impl(x)._backward("group", dy, x, mean, rstd, num_groups, weight, layout, True, out, accumulate)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, layout="NCHW", num_batches_tracked=None, out=None):
    """BatchNorm: statistics per channel over the batch and the spatial positions.
    training=True normalizes with the batch statistics and updates running_mean and
    running_var in place (running = (1 - momentum) * running + momentum * batch, the
    variance unbiased); momentum=None is torch's cumulative average, weight
    1/num_batches_tracked (the count of batches including this one). training=False
    normalizes with the running statistics."""
    return _impl(x)._batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                        layout, num_batches_tracked, out, "batch_norm")[0]


def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                       eps=1e-5, *, layout="NCHW", num_batches_tracked=None):
    """batch_norm saving its statistics for the backward: returns (y, mean, rstd) of shape (C,);
    in eval mode they are running_mean and 1/sqrt(running_var + eps)."""
    return _impl(x)._batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                        layout, num_batches_tracked, None, "batch_norm_forward")


def batch_norm_backward(dy, x, mean, rstd, weight=None, *, layout="NCHW", training=True, out=None,
                        accumulate=False):
    """Gradients of batch_norm: returns (dx, dweight, dbias). training must say which
    statistics the forward used: True (batch statistics, the default) or False (running
    statistics, constants for the gradient)."""
    return _impl(x)._backward("batch", dy, x, mean, rstd, None, weight, layout, bool(training), out, accumulate)
