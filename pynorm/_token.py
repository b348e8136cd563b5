"""Token norms (LayerNorm, RMSNorm) over the last axis: check, lay out, call C.

NumPy arrays go to the C library; CUDA arrays (CuPy, or anything with
__cuda_array_interface__) go to the CUDA library through pynorm._cuda.
"""

import math

import ml_dtypes
import numpy as np

from . import _cuda
from ._arrays import (CACHED_ALLOC_MIN, IN, INOUT, NEW, OUT, check_distinct_outputs, check_eps, check_input,
                      check_options, check_out, check_param, check_status, dense_target, empty, gradient_outs,
                      param_dtype, PN_DTYPE, ptr, row_layout, stats_dtype, write_back)
from ._lib import ffi, lib

_F32 = np.dtype(np.float32)


# ---- the common call in few steps ----------------------------------------------------
# A small call's time is mostly its Python steps (LayerNorm on one row of 4096 float32
# values: the C call is about a fifth of it). _fast_forward takes the common forward -
# dense NumPy arrays, weight/bias dense of shape (C,), a float eps - with the fewest
# steps: one dtype lookup, checks on attributes only, and ffi.from_buffer, which also
# refuses what the C library cannot address as a dense buffer (a non-C-contiguous
# array; with require_writable, a read-only out=). The fused ops take it too, for
# out=None (their checked path was 5-7x the plain forward's time per call).
# Anything else, and every bad argument, goes to _forward, which checks it and
# raises the error naming it.

_NDARRAY = np.ndarray
_NULL = ffi.NULL
_FROM_BUFFER = ffi.from_buffer
_NP_EMPTY = np.empty
_INF = float("inf")
_PN_F32 = lib.PN_FLOAT32
_NOT_DENSE = (ValueError, TypeError, BufferError)     # what from_buffer raises for such arrays
# x's dtype -> (pn_dtype, the default eps: float64's machine epsilon for float64, else
# float32's - check_eps(None, dtype) -, statistics dtype)
_FAST_DTYPE = {dt: (code, check_eps(None, dt), stats_dtype(dt)) for dt, code in PN_DTYPE.items()}
# the C functions, looked up once (an attribute of the library object is a lookup per call)
_LN_FORWARD, _RMS_FORWARD = lib.pn_layernorm_forward, lib.pn_rmsnorm_forward
_ADD_LN_FORWARD, _ADD_RMS_FORWARD = lib.pn_add_layernorm_forward, lib.pn_add_rmsnorm_forward


def _fast_forward(op, x, residual, weight, bias, eps, out, want_stats):
    """The forward of _forward for the common call (x an ndarray; residual None, or for
    the fused ops an ndarray of x's shape and dtype with out=None): (y, h, mean, rstd),
    or None where _forward must take the call. The default options only (weight_offset
    0, rounding "once"); out may be x itself (in place)."""
    xdt = x.dtype
    facts = _FAST_DTYPE.get(xdt)
    shape = x.shape
    if facts is None or not shape:
        return None
    C = shape[-1]
    if not C:
        return None
    rows = x.size // C
    if not rows:
        return None
    if eps is None:
        eps = facts[1]
    elif type(eps) is not float or not 0.0 <= eps < _INF:      # NaN fails both
        return None
    code = facts[0]
    wcode = code
    try:
        xp = _FROM_BUFFER(x)
        if weight is None:
            wp = _NULL
            if bias is None:
                wcode = _PN_F32
        else:
            wdt = weight.dtype if type(weight) is _NDARRAY else None
            if wdt is not xdt and wdt != xdt:                  # dtypes compared by identity first: cheaper
                if wdt != _F32:
                    return None
                wcode = _PN_F32
            if weight.shape != shape[-1:]:
                return None
            wp = _FROM_BUFFER(weight)
        if bias is None:
            bp = _NULL
        else:
            bdt = bias.dtype if type(bias) is _NDARRAY else None
            if weight is None:
                if bdt is not xdt and bdt != xdt:
                    if bdt != _F32:
                        return None
                    wcode = _PN_F32
            elif bdt is not wdt and bdt != wdt:
                return None
            if bias.shape != shape[-1:]:
                return None
            bp = _FROM_BUFFER(bias)
        if out is None:
            y = _NP_EMPTY(shape, xdt) if x.nbytes < CACHED_ALLOC_MIN else empty(shape, xdt)
            yp = _FROM_BUFFER(y)
        elif residual is not None:
            return None
        else:
            if type(out) is not _NDARRAY or out.shape != shape or (out.dtype is not xdt and out.dtype != xdt):
                return None
            yp = _FROM_BUFFER(out, require_writable=True)
            # out may not overlap x (unless it is x), weight or bias: all dense here, so
            # np.may_share_memory's bounds test is a comparison of the buffers' address
            # ranges, done on the cffi pointers (half its time; x has out's size)
            end = yp + len(yp)
            if ((out is not x and xp < end and yp < xp + len(xp)) or
                    (weight is not None and wp < end and yp < wp + len(wp)) or
                    (bias is not None and bp < end and yp < bp + len(bp))):
                return None
            y = out
        if residual is not None:
            if (type(residual) is not _NDARRAY or residual.shape != shape or
                    (residual.dtype is not xdt and residual.dtype != xdt)):
                return None
            rp = _FROM_BUFFER(residual)
            h = _NP_EMPTY(shape, xdt) if x.nbytes < CACHED_ALLOC_MIN else empty(shape, xdt)
            hp = _FROM_BUFFER(h)
        else:
            h = None
    except _NOT_DENSE:
        return None
    mean = rstd = None
    mp = sp = _NULL
    if want_stats:
        rstd = _NP_EMPTY(shape[:-1], facts[2])
        sp = _FROM_BUFFER(rstd)
        if op == "layer":
            mean = _NP_EMPTY(shape[:-1], facts[2])
            mp = _FROM_BUFFER(mean)
    if h is None:
        if op == "layer":
            status = _LN_FORWARD(yp, mp, sp, xp, wp, bp, 1, rows, C, eps, code, wcode, _NULL)
        else:
            status = _RMS_FORWARD(yp, sp, xp, wp, 1, rows, C, eps, code, wcode, _NULL)
    elif op == "layer":
        status = _ADD_LN_FORWARD(yp, hp, mp, sp, xp, rp, wp, bp, 1, rows, C, eps, code, wcode, _NULL)
    else:
        status = _ADD_RMS_FORWARD(yp, hp, sp, xp, rp, wp, 1, rows, C, eps, code, wcode, _NULL)
    if status:
        check_status(status, "" if h is None else "add_", op, "_norm")
    return y, h, mean, rstd


def _check_same(a, name, x):
    a = check_input(a, name)
    if a.shape != x.shape:
        raise ValueError(f"{name} has shape {a.shape}; expected x's shape {x.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {a.dtype}; expected x's dtype {x.dtype}")
    return a


def _options(weight_offset, rounding, H=1, head=None):
    """A pn_norm_options for the *_ex functions."""
    o = ffi.new("pn_norm_options *")
    o.weight_offset = weight_offset
    o.rounding = rounding
    o.H = H
    for field, stride in (head or {}).items():
        setattr(o.head, field, stride)
    return o


def _forward(op, x, residual, weight, bias, eps, out, want_stats, weight_offset=0.0, rounding="once"):
    """Every forward: op is "layer" or "rms"; residual given for the fused ops.
    Returns (y, h, mean, rstd) with None for what was not asked."""
    fused = residual is not None
    x = check_input(x, "x")
    if fused:
        residual = _check_same(residual, "residual", x)
    weight = check_param(weight, "weight", x)
    bias = check_param(bias, "bias", x)
    wdtype = param_dtype(weight, bias)
    eps = check_eps(eps, x.dtype)
    offset, rmode = check_options(weight_offset, rounding, weight)
    lead, C = x.shape[:-1], x.shape[-1]
    inputs = (("x", x), ("residual", residual), ("weight", weight), ("bias", bias))

    if fused:
        if out is None:
            out = (None, None)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("out must be a tuple (y_out, h_out) for the fused ops")
        y_out, h_out = out
    else:
        y_out, h_out = out, None
    # in place: y over x (or the residual), h over the residual (or x), as the same views
    inplace = ("x", "residual")
    if y_out is not None:
        check_out(y_out, "out", x.shape, x.dtype, inputs, inplace)
    if h_out is not None:
        check_out(h_out, "h out", x.shape, x.dtype, inputs, inplace)
        check_distinct_outputs([("out", y_out), ("h out", h_out)])
    y = y_out if y_out is not None else empty(x.shape, x.dtype)
    h = (h_out if h_out is not None else empty(x.shape, x.dtype)) if fused else None
    sdt = stats_dtype(x.dtype)
    mean = empty(lead, sdt) if want_stats and op == "layer" else None
    rstd = empty(lead, sdt) if want_stats else None
    if y.size == 0:
        return y, h, mean, rstd

    buffers = [("inp", "x", x, IN), ("out", "out", y, NEW if y_out is None else OUT)]
    if fused:
        buffers += [("residual", "residual", residual, IN), ("h", "h out", h, NEW if h_out is None else OUT)]
    B, T, strides, arrays, back, H, head = row_layout(lead, buffers, inputs, heads=True)
    opts = _options(offset, rmode, H, head)
    dt, wdt = PN_DTYPE[x.dtype], PN_DTYPE[wdtype]
    xp, yp = ptr(arrays[0]), ptr(arrays[1])
    if op == "layer":
        if fused:
            status = lib.pn_add_layernorm_forward_ex(yp, ptr(arrays[3]), ptr(mean), ptr(rstd), xp, ptr(arrays[2]),
                                                     ptr(weight), ptr(bias), B, T, C, eps, dt, wdt, strides, opts)
        else:
            status = lib.pn_layernorm_forward_ex(yp, ptr(mean), ptr(rstd), xp, ptr(weight), ptr(bias),
                                                 B, T, C, eps, dt, wdt, strides, opts)
    else:
        if fused:
            status = lib.pn_add_rmsnorm_forward_ex(yp, ptr(arrays[3]), ptr(rstd), xp, ptr(arrays[2]), ptr(weight),
                                                   B, T, C, eps, dt, wdt, strides, opts)
        else:
            status = lib.pn_rmsnorm_forward_ex(yp, ptr(rstd), xp, ptr(weight), B, T, C, eps, dt, wdt, strides, opts)
    check_status(status, "add_" if fused else "", op, "_norm")
    if back:
        write_back(back)
    return y, h, mean, rstd


def _stats(s, name, x):
    if not isinstance(s, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(s).__name__}")
    if s.shape != x.shape[:-1]:
        raise ValueError(f"{name} has shape {s.shape}; expected x.shape[:-1] = {x.shape[:-1]}")
    if s.dtype != stats_dtype(x.dtype):
        raise TypeError(f"{name} has dtype {s.dtype}; expected {stats_dtype(x.dtype)} "
                        "(as the forward saves it)")
    return np.ascontiguousarray(s)


def _backward(op, dy, x, mean, rstd, weight, out, accumulate, weight_offset=0.0, rounding="once"):
    """Every backward: returns (dx, dweight, dbias) (dbias None for RMSNorm).
    rounding is checked and otherwise ignored: the gradients of "llama" are those of "once"."""
    x = check_input(x, "x")
    dy = _check_same(dy, "dy", x)
    mean = _stats(mean, "mean", x) if op == "layer" else None
    rstd = _stats(rstd, "rstd", x)
    weight = check_param(weight, "weight", x)
    offset, rmode = check_options(weight_offset, rounding, weight)
    wdtype = weight.dtype if weight is not None else _F32
    lead, C = x.shape[:-1], x.shape[-1]
    names = ("dx", "dweight", "dbias") if op == "layer" else ("dx", "dweight")
    out = gradient_outs(out, accumulate, names)
    inputs = (("dy", dy), ("x", x), ("mean", mean), ("rstd", rstd), ("weight", weight))
    shapes = (x.shape, (C,), (C,))
    dtypes = (x.dtype, wdtype, wdtype)
    grads = []
    for name, o, shape, dtype in zip(names, out, shapes, dtypes):
        if o is None:
            grads.append(empty(shape, dtype))
        else:
            grads.append(check_out(o, f"out ({name})", shape, dtype, inputs))
    check_distinct_outputs(list(zip(names, grads)))
    if x.size == 0:                   # no rows: the parameter gradients are sums over nothing
        if not accumulate:
            for g in grads[1:]:
                g[...] = 0
        return tuple(grads) if op == "layer" else (*grads, None)

    dx_role = INOUT if accumulate else (OUT if out[0] is not None else NEW)
    params_given = out[1] is not None or out[-1] is not None
    B, T, strides, arrays, back, H, head = row_layout(
        lead, [("dout", "dy", dy, IN), ("inp", "x", x, IN), ("dinp", "out (dx)", grads[0], dx_role)],
        inputs + tuple(zip(names[1:], grads[1:])) if params_given else inputs, heads=True)
    opts = _options(offset, rmode, H, head)
    targets = [arrays[2], *grads[1:]]
    if params_given:        # dweight/dbias given in out=: dense C values apart from every other buffer
        back = list(back)
        for i in range(1, len(targets)):
            if out[i] is not None:
                others = (*arrays, weight, mean, rstd, *(t for j, t in enumerate(targets) if j not in (0, i)))
                targets[i] = dense_target(targets[i], accumulate, back, others)
    flags = lib.PN_ACCUMULATE if accumulate else 0
    dt, wdt = PN_DTYPE[x.dtype], PN_DTYPE[wdtype]
    if op == "layer":
        status = lib.pn_layernorm_backward_ex(ptr(targets[0]), ptr(targets[1]), ptr(targets[2]), ptr(None), 0,
                                              ptr(arrays[0]), ptr(arrays[1]), ptr(weight), ptr(mean),
                                              ptr(rstd), B, T, C, flags, dt, wdt, strides, opts)
    else:
        status = lib.pn_rmsnorm_backward_ex(ptr(targets[0]), ptr(targets[1]), ptr(None), 0,
                                            ptr(arrays[0]), ptr(arrays[1]), ptr(weight), ptr(rstd),
                                            B, T, C, flags, dt, wdt, strides, opts)
    check_status(status, op, "_norm_backward")
    if back:
        write_back(back)
    return tuple(grads) if op == "layer" else (*grads, None)


# ---- the public functions ---------------------------------------------------------
# Options of every token norm (docs/inference.md):
#   weight_offset: y = xhat * (weight_offset + weight) (+ bias), the offset added in float32
#       (float64 for float64 data), never in a half-precision weight's dtype: Gemma's 1 + w.
#       A non-zero offset needs a weight. The backward's dx uses (offset + w).
#   rounding: "once" (float32 throughout, y rounded once) or "llama" (xhat rounded to x's
#       dtype, then times the weight, rounded again: Hugging Face LlamaRMSNorm). The backward
#       of "llama" is that of "once".
#   out: may be x itself (in place); for the fused ops (y_out, h_out), e.g. (x, residual).
# The default options take _fast_forward; any other value the checked path.

def layer_norm(x, weight=None, bias=None, eps=1e-5, *, weight_offset=0.0, rounding="once", out=None):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * (weight_offset + weight) + bias."""
    if type(x) is _NDARRAY:
        if weight_offset == 0.0 and rounding == "once":
            r = _fast_forward("layer", x, None, weight, bias, eps, out, False)
            if r is not None:
                return r[0]
    elif _cuda.is_cuda_array(x):
        return _cuda.layer_norm(x, weight, bias, eps, weight_offset=weight_offset, rounding=rounding, out=out)
    return _forward("layer", x, None, weight, bias, eps, out, False, weight_offset, rounding)[0]


def rms_norm(x, weight=None, eps=None, *, weight_offset=0.0, rounding="once", out=None):
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * (weight_offset + weight).
    eps=None: the machine epsilon of float32 (of float64 for float64 x)."""
    if type(x) is _NDARRAY:
        if weight_offset == 0.0 and rounding == "once":
            r = _fast_forward("rms", x, None, weight, None, eps, out, False)
            if r is not None:
                return r[0]
    elif _cuda.is_cuda_array(x):
        return _cuda.rms_norm(x, weight, eps, weight_offset=weight_offset, rounding=rounding, out=out)
    return _forward("rms", x, None, weight, None, eps, out, False, weight_offset, rounding)[0]


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, *, weight_offset=0.0, rounding="once",
                   out=None):
    """h = x + residual (in x's dtype), y = layer_norm(h) in one pass: returns (y, h).
    out: optional (y_out, h_out); out=(x, residual) writes y over x and h over residual."""
    if _cuda.is_cuda_array(x):
        return _cuda.add_layer_norm(x, residual, weight, bias, eps, weight_offset=weight_offset,
                                    rounding=rounding, out=out)
    if residual is None:
        raise TypeError("residual must be an array, got None")
    if type(x) is _NDARRAY and weight_offset == 0.0 and rounding == "once" and out is None:
        r = _fast_forward("layer", x, residual, weight, bias, eps, None, False)
        if r is not None:
            return r[0], r[1]
    y, h, _, _ = _forward("layer", x, residual, weight, bias, eps, out, False, weight_offset, rounding)
    return y, h


def add_rms_norm(x, residual, weight=None, eps=None, *, weight_offset=0.0, rounding="once", out=None):
    """h = x + residual (in x's dtype), y = rms_norm(h) in one pass: returns (y, h).
    out: optional (y_out, h_out); out=(x, residual) writes y over x and h over residual
    (vLLM's fused_add_rms_norm)."""
    if _cuda.is_cuda_array(x):
        return _cuda.add_rms_norm(x, residual, weight, eps, weight_offset=weight_offset, rounding=rounding,
                                  out=out)
    if residual is None:
        raise TypeError("residual must be an array, got None")
    if type(x) is _NDARRAY and weight_offset == 0.0 and rounding == "once" and out is None:
        r = _fast_forward("rms", x, residual, weight, None, eps, None, False)
        if r is not None:
            return r[0], r[1]
    y, h, _, _ = _forward("rms", x, residual, weight, None, eps, out, False, weight_offset, rounding)
    return y, h


def layer_norm_forward(x, weight=None, bias=None, eps=1e-5, *, weight_offset=0.0, rounding="once"):
    """LayerNorm saving its statistics for the backward: returns (y, mean, rstd)."""
    if type(x) is _NDARRAY:
        if weight_offset == 0.0 and rounding == "once":
            r = _fast_forward("layer", x, None, weight, bias, eps, None, True)
            if r is not None:
                return r[0], r[2], r[3]
    elif _cuda.is_cuda_array(x):
        return _cuda.layer_norm_forward(x, weight, bias, eps, weight_offset=weight_offset, rounding=rounding)
    y, _, mean, rstd = _forward("layer", x, None, weight, bias, eps, None, True, weight_offset, rounding)
    return y, mean, rstd


def layer_norm_backward(dy, x, mean, rstd, weight=None, *, weight_offset=0.0, rounding="once", out=None,
                        accumulate=False):
    """Gradients of layer_norm: returns (dx, dweight, dbias).
    out=(dx, dweight, dbias) writes into given arrays; accumulate=True adds to them."""
    if _cuda.is_cuda_array(x):
        return _cuda.layer_norm_backward(dy, x, mean, rstd, weight, weight_offset=weight_offset,
                                         rounding=rounding, out=out, accumulate=accumulate)
    return _backward("layer", dy, x, mean, rstd, weight, out, accumulate, weight_offset, rounding)


def rms_norm_forward(x, weight=None, eps=None, *, weight_offset=0.0, rounding="once"):
    """RMSNorm saving its statistics for the backward: returns (y, rstd)."""
    if type(x) is _NDARRAY:
        if weight_offset == 0.0 and rounding == "once":
            r = _fast_forward("rms", x, None, weight, None, eps, None, True)
            if r is not None:
                return r[0], r[3]
    elif _cuda.is_cuda_array(x):
        return _cuda.rms_norm_forward(x, weight, eps, weight_offset=weight_offset, rounding=rounding)
    y, _, _, rstd = _forward("rms", x, None, weight, None, eps, None, True, weight_offset, rounding)
    return y, rstd


def rms_norm_backward(dy, x, rstd, weight=None, *, weight_offset=0.0, rounding="once", out=None,
                      accumulate=False):
    """Gradients of rms_norm: returns (dx, dweight).
    out=(dx, dweight) writes into given arrays; accumulate=True adds to them."""
    if _cuda.is_cuda_array(x):
        return _cuda.rms_norm_backward(dy, x, rstd, weight, weight_offset=weight_offset, rounding=rounding,
                                       out=out, accumulate=accumulate)
    dx, dweight, _ = _backward("rms", dy, x, None, rstd, weight, out, accumulate, weight_offset, rounding)
    return dx, dweight


# ---- fused quantized output ---------------------------------------------------------

_QDTYPES = {"int8": (0, np.dtype(np.int8)), "float8_e4m3fn": (1, np.dtype(ml_dtypes.float8_e4m3fn))}


def _check_quant(x, qdtype, scale, scale_ub, group_size):
    """(pn_quant_params*, q dtype, scales shape) of a *_quant call, or an error naming the argument."""
    if not isinstance(qdtype, str):
        raise TypeError(f"qdtype must be a str, \"int8\" or \"float8_e4m3fn\", got {type(qdtype).__name__}")
    if qdtype not in _QDTYPES:
        raise ValueError(f"qdtype must be \"int8\" or \"float8_e4m3fn\", got {qdtype!r}")
    code, qdt = _QDTYPES[qdtype]
    C = x.shape[-1]
    p = ffi.new("pn_quant_params *")
    p.qdtype = code
    if scale is not None:
        if isinstance(scale, np.ndarray):
            if scale.size != 1:
                raise ValueError(f"scale must be one positive number, got an array of shape {scale.shape}")
            scale = float(scale.reshape(-1)[0])
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        s = float(scale)
        if not (math.isfinite(s) and s > 0 and float(np.float32(s)) > 0 and math.isfinite(float(np.float32(s)))):
            raise ValueError(f"scale must be a positive, finite float32 value, got {s}")
        if group_size is not None:
            raise ValueError("group_size is for dynamic scales (scale=None); a static scale covers every element")
        if scale_ub is not None:
            raise ValueError("scale_ub bounds dynamic scales (scale=None); it has no meaning with a static scale")
        p.scale = s
        return p, qdt, (1,)
    if scale_ub is not None:
        if qdtype != "float8_e4m3fn":
            raise ValueError("scale_ub is for qdtype=\"float8_e4m3fn\" only (as vLLM)")
        if isinstance(scale_ub, bool) or not isinstance(scale_ub, (int, float, np.floating, np.integer)):
            raise TypeError(f"scale_ub must be a real number or None, got {type(scale_ub).__name__}")
        ub = float(scale_ub)
        if not (math.isfinite(ub) and ub > 0):
            raise ValueError(f"scale_ub must be finite and > 0, got {ub}")
        p.scale_ub = ub
    groups = 1
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size <= 0 or C % group_size:
            raise ValueError(f"group_size must be a positive divisor of C = {C}, got {group_size}")
        p.group_size = int(group_size)
        groups = C // int(group_size)
    return p, qdt, x.shape[:-1] + (groups,)


def _quant(op, x, weight, bias, eps, qdtype, scale, scale_ub, group_size, residual, weight_offset, rounding):
    if _cuda.is_cuda_array(x):
        return _cuda.norm_quant(op, x, weight, bias, eps, residual, weight_offset, rounding,
                                lambda d: _check_quant(d, qdtype, scale, scale_ub, group_size))
    x = check_input(x, "x")
    if residual is not None:
        residual = _check_same(residual, "residual", x)
    weight = check_param(weight, "weight", x)
    bias = check_param(bias, "bias", x)
    wdtype = param_dtype(weight, bias)
    eps = check_eps(eps, x.dtype)
    offset, rmode = check_options(weight_offset, rounding, weight)
    quant, qdt, sshape = _check_quant(x, qdtype, scale, scale_ub, group_size)
    lead, C = x.shape[:-1], x.shape[-1]
    q = empty(x.shape, np.uint8)
    scales = empty(sshape, np.float32)
    h = empty(x.shape, x.dtype) if residual is not None else None
    if q.size:
        if quant.scale:
            scales[...] = np.float32(quant.scale)
        buffers = [("inp", "x", x, IN)]
        if residual is not None:
            buffers += [("residual", "residual", residual, IN), ("h", "h", h, NEW)]
        inputs = (("x", x), ("residual", residual), ("weight", weight), ("bias", bias))
        B, T, strides, arrays, back, H, head = row_layout(lead, buffers, inputs, heads=True)
        opts = _options(offset, rmode, H, head)
        dt, wdt = PN_DTYPE[x.dtype], PN_DTYPE[wdtype]
        res_p = ptr(arrays[1]) if residual is not None else _NULL
        h_p = ptr(arrays[2]) if residual is not None else _NULL
        sp = ffi.cast("float *", ptr(scales)) if not quant.scale else _NULL
        if op == "layer":
            status = lib.pn_layernorm_quant_forward(ptr(q), sp, h_p, _NULL, _NULL, ptr(arrays[0]), res_p,
                                                    ptr(weight), ptr(bias), B, T, C, eps, dt, wdt, strides, opts,
                                                    quant)
        else:
            status = lib.pn_rmsnorm_quant_forward(ptr(q), sp, h_p, _NULL, ptr(arrays[0]), res_p, ptr(weight),
                                                  B, T, C, eps, dt, wdt, strides, opts, quant)
        check_status(status, op, "_norm_quant")
        if back:
            write_back(back)
    q = q.view(qdt)
    return (q, scales) if residual is None else (q, scales, h)


def rms_norm_quant(x, weight=None, eps=None, *, qdtype="int8", scale=None, scale_ub=None, group_size=None,
                   residual=None, weight_offset=0.0, rounding="once"):
    """RMSNorm with its output quantized as it is made: returns (q, scales), plus h =
    x + residual (rounded to x's dtype) when a residual is given. y is the norm's output
    in float32 (weight_offset, rounding as rms_norm's); qdtype "int8" (qmax 127) or
    "float8_e4m3fn" (ml_dtypes, qmax 448).
    Static (scale given): q = Q(y / scale), scales = [scale] (float32, shape (1,)).
    Dynamic (scale=None): per row, or per group of group_size consecutive elements,
    scale = max(min(amax, scale_ub) / qmax, min_scale) (scale_ub: float8 only; min_scale
    1/(qmax*512) for float8, float32's epsilon for int8), scales of shape
    x.shape[:-1] + (C/group,). Q: int8 round-half-even saturated to [-128, 127];
    float8 round-to-nearest-even of y/scale clamped to +-448. docs/inference.md."""
    return _quant("rms", x, weight, None, eps, qdtype, scale, scale_ub, group_size, residual, weight_offset,
                  rounding)


def layer_norm_quant(x, weight=None, bias=None, eps=1e-5, *, qdtype="int8", scale=None, scale_ub=None,
                     group_size=None, residual=None, weight_offset=0.0, rounding="once"):
    """LayerNorm with its output quantized as it is made: as rms_norm_quant."""
    return _quant("layer", x, weight, bias, eps, qdtype, scale, scale_ub, group_size, residual, weight_offset,
                  rounding)
