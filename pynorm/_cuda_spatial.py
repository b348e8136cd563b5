"""The spatial norms (GroupNorm, InstanceNorm, BatchNorm) for CUDA arrays, over
libpynorm_cuda.

pynorm._spatial routes CUDA arrays here: the same functions (_group_norm_forward,
_batch_norm_forward, _backward), the same checks and messages, then one library
call on CuPy's current stream for x's device; results are CuPy arrays. Inputs
the kernels cannot read in place (not C-contiguous) are copied on the device.
"""

import numpy as np

from . import _spatial as _sp
from ._arrays import gradient_outs, param_dtype
from ._cuda import (_F32, _PN_ACCUMULATE, _PN_DTYPE, _Call, _as_cupy, _check_distinct, _check_out,
                    _check_same, _check_status, _contiguous_copy, _dense_target, _dev, _empty, _p, _same_device,
                    _shares, _stats_dtype, _wrap_new, _write_back)

_LAYOUTS = _sp._LAYOUTS   # pn_layout: the same enum in both libraries


# ---- argument checks (pynorm._spatial's, on CUDA arrays) ------------------------------

def _check_x(x, name, call):
    d = _dev(x, name, call)
    if d.dtype not in _PN_DTYPE:
        raise TypeError(f"{name} has dtype {d.dtype}; expected {_sp._DTYPE_NAMES}")
    _sp._check_rank(d.shape, name)
    return d


def _dense(d, cp):
    return d if d is None or d.c_contiguous() else _contiguous_copy(d, cp)


def _check_param(p, name, x, C, call):
    """weight/bias/running stats: None or C values in x's dtype or float32."""
    if p is None:
        return None
    d = _dev(p, name, call)
    if d.dtype != x.dtype and d.dtype != _F32:
        raise TypeError(f"{name} has dtype {d.dtype}; expected x's dtype ({x.dtype}) or float32")
    if d.shape != (C,):
        raise ValueError(f"{name} has shape {d.shape}; expected ({C},), the channel count of x")
    _same_device(d, name, x)
    return d


def _check_stats(s, name, shape, x, call):
    if s is None:
        raise TypeError(f"{name} must be a CUDA array (as the forward returns it), got None")
    d = _dev(s, name, call)
    if d.shape != tuple(shape):
        raise ValueError(f"{name} has shape {d.shape}; expected {tuple(shape)}")
    if d.dtype != _stats_dtype(x.dtype):
        raise TypeError(f"{name} has dtype {d.dtype}; expected {_stats_dtype(x.dtype)} (as the forward saves it)")
    _same_device(d, name, x)
    return _dense(d, call.cp)


def _out(o, name, shape, dtype, inputs, x, call):
    """An out= array, checked (any strides: the kernels write dense buffers, so a
    strided one is written through a temporary, _dense_target)."""
    return _check_out(o, name, shape, dtype, inputs, x, call)


def _fill(d, value, cp):
    _as_cupy(d, cp)[...] = value


# ---- GroupNorm / InstanceNorm ----------------------------------------------------------

def _group_norm_forward(x, num_groups, weight, bias, eps, layout, out, op):
    with _Call(x, _check_x) as call:
        ffi, lib, cp, x = call.ffi, call.lib, call.cp, call.x
        layout = _sp._check_layout(layout)
        N, C, S = _sp._geometry(x, layout)
        instance = num_groups is _sp._INSTANCE
        G = C if instance else _sp._check_groups(num_groups, C)
        weight = _dense(_check_param(weight, "weight", x, C, call), cp)
        bias = _dense(_check_param(bias, "bias", x, C, call), cp)
        wdtype = param_dtype(weight, bias)
        eps = _sp._check_eps(eps, x)
        _sp._check_group_sizes(instance, N, C, G, S, x.shape)
        inputs = (("x", x), ("weight", weight), ("bias", bias))
        y = (_out(out, "out", x.shape, x.dtype, inputs, x, call) if out is not None
             else _wrap_new(_empty(x.shape, x.dtype, cp)))
        sdt = _stats_dtype(x.dtype)
        mean, rstd = _wrap_new(_empty((N, G), sdt, cp)), _wrap_new(_empty((N, G), sdt, cp))
        if x.size == 0:   # no samples, or groups of no values: statistics of nothing
            _fill(mean, np.nan, cp)
            _fill(rstd, np.nan, cp)
        else:
            xd = _dense(x, cp)
            back = []
            yd = _dense_target(y, False, back, (), cp)
            status = lib.pn_cuda_groupnorm_forward(
                _p(ffi, yd), _p(ffi, mean), _p(ffi, rstd), _p(ffi, xd), _p(ffi, weight), _p(ffi, bias),
                N, C, S, G, eps, _LAYOUTS[layout], _PN_DTYPE[x.dtype], _PN_DTYPE[wdtype], call.stream_ptr())
            _check_status(ffi, lib, status, op)
            _write_back(back, cp)
        return y.obj, mean.obj, rstd.obj


def _grads_out(out, accumulate, x, C, wdtype, inputs, call):
    names = ("dx", "dweight", "dbias")
    out = gradient_outs(out, accumulate, names)
    grads = []
    for name, o, shape, dtype in zip(names, out, (x.shape, (C,), (C,)), (x.dtype, wdtype, wdtype)):
        if o is None:
            grads.append(_wrap_new(_empty(shape, dtype, call.cp)))
        else:
            grads.append(_out(o, f"out ({name})", shape, dtype, inputs, x, call))
    _check_distinct(list(zip(names, grads)))
    return grads


def _backward(kind, dy, x, mean, rstd, num_groups, weight, layout, training, out, accumulate):
    with _Call(x, _check_x) as call:
        ffi, lib, cp, x = call.ffi, call.lib, call.cp, call.x
        dy = _check_same(dy, "dy", x, call)
        layout = _sp._check_layout(layout)
        N, C, S = _sp._geometry(x, layout)
        if kind == "group":
            G = _sp._check_groups(num_groups, C)
            shape = (N, G)
        else:
            shape = (C,)
        mean = _check_stats(mean, "mean", shape, x, call)
        rstd = _check_stats(rstd, "rstd", shape, x, call)
        weight = _dense(_check_param(weight, "weight", x, C, call), cp)
        wdtype = weight.dtype if weight is not None else _F32
        inputs = (("dy", dy), ("x", x), ("mean", mean), ("rstd", rstd), ("weight", weight))
        dx, dw, db = _grads_out(out, accumulate, x, C, wdtype, inputs, call)
        if x.size == 0:   # the parameter gradients are sums over nothing
            if not accumulate:
                _fill(dw, 0, cp)
                _fill(db, 0, cp)
            return dx.obj, dw.obj, db.obj
        dyd, xd = _dense(dy, cp), _dense(x, cp)
        back = []       # the kernels write dense buffers: strided out= arrays through temporaries
        dxd, dwd, dbd = (_dense_target(g, accumulate, back, (), cp) for g in (dx, dw, db))
        flags = _PN_ACCUMULATE if accumulate else 0
        dt, wdt, lay = _PN_DTYPE[x.dtype], _PN_DTYPE[wdtype], _LAYOUTS[layout]
        if kind == "group":
            nbytes = lib.pn_cuda_groupnorm_backward_scratch_size(N, C, S, G, lay, dt)
        else:
            nbytes = lib.pn_cuda_batchnorm_backward_scratch_size(N, C, S, lay, dt)
            if training:
                flags |= _sp.lib.PN_BN_TRAINING
        # from CuPy's pool (256-byte aligned), stream-ordered: freed after the launch,
        # reused only by later work on this stream
        scratch = cp.empty(max(int(nbytes), 16), dtype=cp.uint8)
        sp, s = ffi.cast("void *", scratch.data.ptr), call.stream_ptr()
        if kind == "group":
            status = lib.pn_cuda_groupnorm_backward(
                _p(ffi, dxd), _p(ffi, dwd), _p(ffi, dbd), sp, scratch.nbytes, _p(ffi, dyd), _p(ffi, xd),
                _p(ffi, weight), _p(ffi, mean), _p(ffi, rstd), N, C, S, G, flags, lay, dt, wdt, s)
        else:
            status = lib.pn_cuda_batchnorm_backward(
                _p(ffi, dxd), _p(ffi, dwd), _p(ffi, dbd), sp, scratch.nbytes, _p(ffi, dyd), _p(ffi, xd),
                _p(ffi, weight), _p(ffi, mean), _p(ffi, rstd), N, C, S, flags, lay, dt, wdt, s)
        _check_status(ffi, lib, status, f"{kind}_norm_backward")
        _write_back(back, cp)
        return dx.obj, dw.obj, db.obj


# ---- BatchNorm ------------------------------------------------------------------------------

def _check_running(rm, rv, x, C, training, call):
    """running_mean/running_var: as pynorm._spatial checks them (here on device arrays)."""
    _sp._check_running_given(rm, rv, training)
    rm = _check_param(rm, "running_mean", x, C, call)
    rv = _check_param(rv, "running_var", x, C, call)
    _sp._check_running_dtypes(rm, rv)
    if rm is not None and rv is not None:
        if _shares(rm, rv):
            raise ValueError("running_mean overlaps running_var")
    for name, r in (("running_mean", rm), ("running_var", rv)):
        if r is not None and _shares(r, x):
            raise ValueError(f"{name} overlaps x")
        if r is not None and training and r.readonly:
            raise ValueError(f"{name} is read-only, but training=True updates it in place")
        if r is not None and training and r.size > 1 and any(s == 0 for s in r.strides):
            raise ValueError(f"{name} has a zero stride: training=True updates each of its elements")
    return rm, rv


def _to_host(d, cp):
    """A device array as NumPy (bfloat16 through its bits)."""
    a = _as_cupy(d, cp)
    return cp.asnumpy(a).view(d.dtype) if a.dtype != d.dtype else cp.asnumpy(a)


def _batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum, eps, layout,
                        num_batches_tracked, out, op):
    with _Call(x, _check_x) as call:
        ffi, lib, cp, x = call.ffi, call.lib, call.cp, call.x
        layout = _sp._check_layout(layout)
        N, C, S = _sp._geometry(x, layout)
        training = bool(training)
        rm, rv = _check_running(running_mean, running_var, x, C, training, call)
        weight = _dense(_check_param(weight, "weight", x, C, call), cp)
        bias = _dense(_check_param(bias, "bias", x, C, call), cp)
        wdtype = param_dtype(weight, bias)
        eps = _sp._check_eps(eps, x)
        update = training and rm is not None
        flags, mom, count = _sp._update_args(training, update, momentum, eps,
                                             num_batches_tracked, N, S, x.shape)
        inputs = (("x", x), ("weight", weight), ("bias", bias), ("running_mean", rm), ("running_var", rv))
        y = (_out(out, "out", x.shape, x.dtype, inputs, x, call) if out is not None
             else _wrap_new(_empty(x.shape, x.dtype, cp)))
        sdt = _stats_dtype(x.dtype)
        mean, rstd = _wrap_new(_empty((C,), sdt, cp)), _wrap_new(_empty((C,), sdt, cp))
        if x.size == 0:   # as torch: y is empty and the running statistics stay as they are
            if training:
                _fill(mean, np.nan, cp)
                _fill(rstd, np.nan, cp)
            else:         # rare: through the host, whatever CuPy knows of the dtype
                hm = _to_host(rm, cp).astype(np.float64)
                hv = _to_host(rv, cp).astype(np.float64)
                _fill(mean, cp.asarray(hm.astype(sdt)), cp)
                _fill(rstd, cp.asarray((1.0 / np.sqrt(hv + eps)).astype(sdt)), cp)
            return y.obj, mean.obj, rstd.obj
        rdtype = rm.dtype if rm is not None else _F32
        # the kernels update dense running statistics: other strides go through a copy
        rmd, rvd = _dense(rm, cp), _dense(rv, cp)
        xd = _dense(x, cp)
        back = []
        yd = _dense_target(y, False, back, (), cp)
        status = lib.pn_cuda_batchnorm_forward(
            _p(ffi, yd), _p(ffi, mean), _p(ffi, rstd), _p(ffi, rmd), _p(ffi, rvd), _p(ffi, xd), _p(ffi, weight),
            _p(ffi, bias), N, C, S, eps, mom, count, flags, _LAYOUTS[layout],
            _PN_DTYPE[x.dtype], _PN_DTYPE[wdtype], _PN_DTYPE[rdtype], call.stream_ptr())
        _check_status(ffi, lib, status, op)
        _write_back(back, cp)
        if update:
            for r, rd in ((rm, rmd), (rv, rvd)):
                if rd is not r:
                    _as_cupy(r, cp)[...] = _as_cupy(rd, cp)
        return y.obj, mean.obj, rstd.obj
