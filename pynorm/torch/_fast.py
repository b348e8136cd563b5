"""The modules' straight path: plain CPU tensors in plain eager mode, one C call.

A pynorm.torch module's forward tries this first. It runs when the call is ordinary
(not compiling, no dispatch or function mode, no functorch transform, no tracing;
input and parameters plain CPU tensors, the input contiguous, dtypes the kernels
take as they are). Then it does no more than the kernel needs:

- without gradients (no_grad, inference_mode, or nothing requiring grad): one
  torch.empty_like for y, no statistics (the kernels accept NULL), one C call;
- with gradients: a lean torch.autograd.Function saving x, the parameters and one
  float32 buffer holding both statistics; its backward allocates only the
  gradients asked for.

Tensors are handed to the C library as integers (``tensor.data_ptr()``) through a
second cffi binding of the same library whose pointer parameters are declared
uintptr_t (declarations derived from pynorm.h's, so they cannot drift): no
per-pointer cdata casts. Nothing about the module is cached: its parameters can
be replaced or modified in place, and every fact used is read per call (a few
attribute reads). Anything out of the ordinary returns None, and the caller takes
the general path (operators or their eager equivalent), which validates and
raises the clear errors.
"""

import re

import torch
from cffi import FFI
from torch.autograd.function import once_differentiable

from .. import _lib
from . import _dispatch
from ._backend import CACHED_ALLOC_MIN, CPU, empty as _cached_empty

# ---- integer-pointer bindings ------------------------------------------------------------------

_NAMES = ("layernorm_forward", "layernorm_backward", "rmsnorm_forward", "rmsnorm_backward",
          "groupnorm_forward", "groupnorm_backward", "batchnorm_forward", "batchnorm_backward")


def _int_pointer_cdef(header_cdef, names):
    """Declarations of pn_<names> with every pointer parameter as uintptr_t and the
    enums as int (their C ABI type)."""
    decls = []
    for name in names:
        m = re.search(r"pn_status\s+pn_%s\s*\((.*?)\)\s*;" % name, header_cdef, re.S)
        if m is None:
            raise ImportError(f"pynorm.torch: pynorm.h declares no pn_{name}")
        params = re.sub(r"(?:const\s+)?\w+\s*\*\s*", "uintptr_t ", m.group(1))
        params = re.sub(r"\bpn_(?:dtype|layout)\b", "int", params)
        decls.append(f"int pn_{name}({params});")
    return "\n".join(decls)


_ffi = FFI()
_ffi.cdef(_int_pointer_cdef(_lib._cdef_block(_lib.header_source), _NAMES))
_c = _ffi.dlopen(_lib.library_path)
_ln_fwd, _ln_bwd = _c.pn_layernorm_forward, _c.pn_layernorm_backward
_rms_fwd, _rms_bwd = _c.pn_rmsnorm_forward, _c.pn_rmsnorm_backward
_gn_fwd, _gn_bwd = _c.pn_groupnorm_forward, _c.pn_groupnorm_backward
_bn_fwd, _bn_bwd = _c.pn_batchnorm_forward, _c.pn_batchnorm_backward

_CODE = {torch.float32: _lib.lib.PN_FLOAT32, torch.float16: _lib.lib.PN_FLOAT16,
         torch.bfloat16: _lib.lib.PN_BFLOAT16, torch.float64: _lib.lib.PN_FLOAT64}
_F32 = torch.float32
_F64 = torch.float64
_CODE_F64 = _lib.lib.PN_FLOAT64
_EPS32, _EPS64 = torch.finfo(_F32).eps, torch.finfo(_F64).eps
_TRAINING, _CUMULATIVE = _lib.lib.PN_BN_TRAINING, _lib.lib.PN_BN_CUMULATIVE

# ---- when the straight path applies ------------------------------------------------------------

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack
_tracing = torch._C._get_tracing_state
_function_mode = torch._C._is_torch_function_mode_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled


def _out(x):
    """A dense output like x (large ones from the library's buffer cache)."""
    if x.numel() * x.element_size() >= CACHED_ALLOC_MIN:
        return _cached_empty(x.shape, x.dtype, x.device)
    return torch.empty_like(x)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


# ---- LayerNorm / RMSNorm --------------------------------------------------------------------------

def _c_apply(cls):
    """cls.apply without autograd.Function.apply's Python wrapper (which binds
    arguments and unwraps functorch wrappers: the straight path runs only with no
    functorch transform active, where that wrapper calls exactly this)."""
    try:
        return super(torch.autograd.Function, cls).apply
    except AttributeError:          # another torch: the public entry
        return cls.apply


def _direct_backward(cls, backward):
    """The engine calls the backward node's `apply`, which by default looks the user's
    backward up (backward or vjp, boxed or not) on every call: a visible share of a
    small norm's backward. Point it at `backward` directly."""
    node = getattr(cls, "_backward_cls", None)
    if node is not None:
        node.apply = backward
    return cls


def _token_forward(rms, yp, mp, rp, xp, wp, bp, rows, C, eps, dt, wdt):
    """One LayerNorm (rms False) or RMSNorm forward call on integer pointers (mp, rp:
    the statistics, 0 for none; RMSNorm has no mean and no bias)."""
    if rms:
        status = _rms_fwd(yp, rp, xp, wp, 1, rows, C, eps, dt, wdt, 0)
    else:
        status = _ln_fwd(yp, mp, rp, xp, wp, bp, 1, rows, C, eps, dt, wdt, 0)
    if status:
        CPU.check(status, "rms_norm" if rms else "layer_norm")


class _TokenNorm(torch.autograd.Function):
    """y = norm(x) over the last axis; backward on pynorm's kernels. Subclassed once
    per norm (RMS: whether it is RMSNorm): the class name is what profilers show."""
    RMS = False

    @staticmethod
    def forward(ctx, x, weight, bias, rows, C, eps, wp, bp, dt, wdt):
        rms = ctx._forward_cls.RMS
        y = _out(x)
        st = torch.empty(2 * rows, dtype=_F64 if dt == _CODE_F64 else _F32)   # mean, then rstd
        sp = st.data_ptr()
        rp = sp + rows * st.element_size()
        _token_forward(rms, y.data_ptr(), sp, rp, x.data_ptr(), wp, bp, rows, C, eps, dt, wdt)
        ctx.save_for_backward(x, weight, st)
        ctx.meta = (rows, C, dt, wdt, rp - sp)
        return y

    @staticmethod
    def backward(ctx, dy):
        if _grad_enabled():
            # create_graph=True: first order only, as the operators (a double
            # backward raises instead of treating these gradients as constants)
            return _TokenNorm._backward_once(ctx, dy)
        return _TokenNorm._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, weight, st = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        rows, C, dt, wdt, off = ctx.meta
        rms = ctx._forward_cls.RMS
        dy = dy.contiguous()
        dx = _out(x) if nx else None
        dw = torch.empty_like(weight) if nw else None
        db = torch.empty_like(weight) if nb and not rms else None
        if dx is not None or dw is not None or db is not None:
            sp = st.data_ptr()
            if rms:
                status = _rms_bwd(_ptr(dx), _ptr(dw), 0, 0, dy.data_ptr(), x.data_ptr(),
                                  _ptr(weight), sp + off, 1, rows, C, 0, dt, wdt, 0)
            else:
                status = _ln_bwd(_ptr(dx), _ptr(dw), _ptr(db), 0, 0, dy.data_ptr(), x.data_ptr(),
                                 _ptr(weight), sp, sp + off, 1, rows, C, 0, dt, wdt, 0)
            if status:
                CPU.check(status, "rms_norm_backward" if rms else "layer_norm_backward")
        return dx, dw, db, None, None, None, None, None, None, None, None


_TokenNorm._backward_once = staticmethod(once_differentiable(_TokenNorm._backward))

# named as the general path's eager Functions (see _dispatch.register)
_LayerNormFn = _direct_backward(type("PynormEager_layer_norm_fwd", (_TokenNorm,), {}), _TokenNorm.backward)
_RMSNormFn = _direct_backward(type("PynormEager_rms_norm_fwd", (_TokenNorm,), {"RMS": True}),
                              _TokenNorm.backward)
_APPLY = {False: _c_apply(_LayerNormFn), True: _c_apply(_RMSNormFn)}


_MISSING = object()


def token_norm(m, x, rms):
    """A LayerNorm (rms False) or RMSNorm module m's forward on x, or None (general path)."""
    # everything inline: at one row, each Python call here is a visible share
    if (_is_compiling() or type(x) is not _Tensor or not x.is_cpu or not x.is_contiguous()
            or not _dispatch.FAST_EAGER or _dispatch_depth() or _functorch_level() is not None
            or _tracing() is not None or _function_mode()):
        return None
    ns = m.normalized_shape
    if len(ns) != 1:
        return None
    C = ns[0]
    shape = x.shape
    dt = _CODE.get(x.dtype)
    if dt is None or not shape or shape[-1] != C:
        return None
    n = x.numel()
    if n == 0:
        return None
    # the parameters straight from the module's dict (nn.Module.__getattr__ costs
    # a visible share); a parametrized weight is not there: general path
    ps = m._parameters
    weight = ps.get("weight", _MISSING)
    bias = None if rms else ps.get("bias", _MISSING)
    wdtype = None
    wp = bp = 0
    if weight is not None:
        if (weight is _MISSING or type(weight) is not _Parameter or not weight.is_cpu
                or not weight.is_contiguous() or weight.numel() != C):
            return None
        wdtype = weight.dtype
        wp = weight.data_ptr()
    if bias is not None:
        if (bias is _MISSING or type(bias) is not _Parameter or not bias.is_cpu
                or not bias.is_contiguous() or bias.numel() != C
                or (wdtype is not None and bias.dtype is not wdtype)):
            return None
        wdtype = bias.dtype
        bp = bias.data_ptr()
    if wdtype is None:
        wdtype = _F32
    elif wdtype is not x.dtype and wdtype is not _F32:
        return None
    wdt = _CODE[wdtype]
    eps = m.eps
    if eps is None:               # RMSNorm: the machine epsilon of the compute type, as torch
        if not rms:
            return None
        eps = _EPS64 if dt == _CODE_F64 else _EPS32
    if _grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                            or (bias is not None and bias.requires_grad)):
        if _functorch_active():
            return None
        if weight is None and bias is not None:
            return None           # not a torch.nn module's state: dbias would have no template
        return _APPLY[rms](x, weight, bias, n // C, C, float(eps), wp, bp, dt, wdt)
    y = torch.empty_like(x) if n * x.element_size() < CACHED_ALLOC_MIN else _out(x)
    _token_forward(rms, y.data_ptr(), 0, 0, x.data_ptr(), wp, bp, n // C, C, eps, dt, wdt)
    return y


# ---- GroupNorm / InstanceNorm / BatchNorm (NCHW-contiguous input) ------------------------------

_increment_version = torch._C._increment_version


def _usable(p, C):
    """Whether the kernels can read tensor p (not None) as C values in place."""
    t = type(p)
    return ((t is _Parameter or t is _Tensor) and p.is_cpu and p.is_contiguous()
            and p.numel() == C)


def _pair(d, first, second, x, C):
    """(a, a's pointer, b, b's pointer, their common dtype code) of the entries
    `first` and `second` of d (a module's _parameters or _buffers; each may be None:
    pointer 0), or None when one cannot be read as it is (general path)."""
    a, b = d.get(first, _MISSING), d.get(second, _MISSING)
    dtype = None
    ap = bp = 0
    if a is not None:
        if a is _MISSING or not _usable(a, C):
            return None
        dtype, ap = a.dtype, a.data_ptr()
    if b is not None:
        if b is _MISSING or not _usable(b, C) or (dtype is not None and b.dtype is not dtype):
            return None
        dtype, bp = b.dtype, b.data_ptr()
    if dtype is None:
        dtype = _F32
    elif dtype is not x.dtype and dtype is not _F32:
        return None
    return a, ap, b, bp, _CODE[dtype]


def _spatial_sizes(x):
    """(N, C, S, dtype code) of an ordinary NCHW input, or None."""
    if (_is_compiling() or type(x) is not _Tensor or not x.is_cpu or not x.is_contiguous()
            or not _dispatch.FAST_EAGER or _dispatch_depth() or _functorch_level() is not None
            or _tracing() is not None or _function_mode()):
        return None
    shape = x.shape
    dt = _CODE.get(x.dtype)
    n = x.numel()
    if dt is None or len(shape) < 2 or n == 0:
        return None
    N, C = shape[0], shape[1]
    return N, C, n // (N * C), dt


def _grad_wanted(x, w, b):
    return _grad_enabled() and (x.requires_grad or (w is not None and w.requires_grad)
                                or (b is not None and b.requires_grad))


class _SpatialNorm(torch.autograd.Function):
    """GroupNorm (G groups; InstanceNorm: G = C) or BatchNorm (training or eval) on an
    NCHW input; backward on pynorm's kernels. Subclassed once per norm (BN: whether
    it is BatchNorm): the class name is what profilers show."""
    BN = False

    @staticmethod
    def forward(ctx, x, weight, bias, N, C, S, G, eps, wp, bp, dt, wdt, bn):
        # bn (BatchNorm): (flags, momentum, nbt, running_mean ptr, running_var ptr, rdtype code)
        y = _out(x)
        k = C if bn is not None else N * G
        st = torch.empty(2 * k, dtype=_F64 if dt == _CODE_F64 else _F32)     # mean, then rstd
        sp = st.data_ptr()
        rp = sp + k * st.element_size()
        if bn is None:
            status = _gn_fwd(y.data_ptr(), sp, rp, x.data_ptr(), wp, bp, N, C, S, G, eps, 0, dt, wdt)
        else:
            flags, momentum, nbt, rmp, rvp, rdt = bn
            status = _bn_fwd(y.data_ptr(), sp, rp, rmp, rvp, x.data_ptr(), wp, bp, N, C, S, eps,
                             momentum, nbt, flags, 0, dt, wdt, rdt)
        if status:
            CPU.check(status, "batch_norm" if bn is not None else "group_norm")
        ctx.save_for_backward(x, weight, st)
        ctx.meta = (N, C, S, G, dt, wdt, rp - sp, None if bn is None else bn[0] & _TRAINING)
        return y

    @staticmethod
    def backward(ctx, dy):
        if _grad_enabled():          # create_graph=True: first order only (see _TokenNorm)
            return _SpatialNorm._backward_once(ctx, dy)
        return _SpatialNorm._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, weight, st = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        N, C, S, G, dt, wdt, off, bn_flags = ctx.meta
        dy = dy.contiguous()
        dx = _out(x) if nx else None
        dw = torch.empty_like(weight) if nw else None
        db = torch.empty_like(weight) if nb else None
        if dx is not None or dw is not None or db is not None:
            sp = st.data_ptr()
            if bn_flags is None:
                status = _gn_bwd(_ptr(dx), _ptr(dw), _ptr(db), 0, 0, dy.data_ptr(), x.data_ptr(),
                                 _ptr(weight), sp, sp + off, N, C, S, G, 0, 0, dt, wdt)
            else:
                status = _bn_bwd(_ptr(dx), _ptr(dw), _ptr(db), 0, 0, dy.data_ptr(), x.data_ptr(),
                                 _ptr(weight), sp, sp + off, N, C, S, bn_flags, 0, dt, wdt)
            if status:
                CPU.check(status, "group_norm_backward" if bn_flags is None else "batch_norm_backward")
        return (dx, dw, db) + (None,) * 10


_SpatialNorm._backward_once = staticmethod(once_differentiable(_SpatialNorm._backward))
_GroupNormFn = _c_apply(_direct_backward(type("PynormEager_group_norm_fwd", (_SpatialNorm,), {}),
                                         _SpatialNorm.backward))
_BatchNormFn = _c_apply(_direct_backward(type("PynormEager_batch_norm_fwd", (_SpatialNorm,), {"BN": True}),
                                         _SpatialNorm.backward))


def group_norm(m, x, G):
    """A GroupNorm module's forward (InstanceNorm without running statistics: G = C),
    or None (general path)."""
    sizes = _spatial_sizes(x)
    if sizes is None:
        return None
    N, C, S, dt = sizes
    if G <= 0 or C % G:
        return None
    ps = _pair(m._parameters, "weight", "bias", x, C)
    if ps is None:
        return None
    w, wp, b, bp, wdt = ps
    if w is None and b is not None:
        return None
    eps = float(m.eps)
    if _grad_wanted(x, w, b):
        if _functorch_active():
            return None
        return _GroupNormFn(x, w, b, N, C, S, G, eps, wp, bp, dt, wdt, None)
    y = _out(x)
    status = _gn_fwd(y.data_ptr(), 0, 0, x.data_ptr(), wp, bp, N, C, S, G, eps, 0, dt, wdt)
    if status:
        CPU.check(status, "group_norm")
    return y


def batch_norm(m, x, training, momentum, nbt):
    """A BatchNorm module's forward after its bookkeeping (as _BatchNormMixin.forward:
    training = batch statistics; momentum None = cumulative over nbt batches, nbt the
    num_batches_tracked tensor), or None (general path). The running statistics it
    uses are m's buffers when m tracks them, updated in place in training."""
    sizes = _spatial_sizes(x)
    if sizes is None:
        return None
    N, C, S, dt = sizes
    if training and N * S <= 1:
        return None                  # the general path raises torch's error
    ps = _pair(m._parameters, "weight", "bias", x, C)
    if ps is None:
        return None
    w, wp, b, bp, wdt = ps
    if w is None and b is not None:
        return None
    rm = rv = None
    rmp = rvp = 0
    rdt = dt
    if not training or m.track_running_stats:
        rs = _pair(m._buffers, "running_mean", "running_var", x, C)
        if rs is None:
            return None
        rm, rmp, rv, rvp, rdt = rs
        if rm is None or rv is None:
            if not training:
                return None          # eval needs both: the general path raises
            if rm is None and rv is None:
                rdt = dt
    flags = _TRAINING if training else 0
    count = 0
    if training and momentum is None:
        if nbt is None:
            return None
        flags |= _CUMULATIVE
        count = int(nbt.item())
        momentum = 0.0
    eps = float(m.eps)
    bn = (flags, float(momentum or 0.0), count, rmp, rvp, rdt)
    if _grad_wanted(x, w, b):
        if _functorch_active():
            return None
        y = _BatchNormFn(x, w, b, N, C, S, 0, eps, wp, bp, dt, wdt, bn)
    else:
        y = _out(x)
        status = _bn_fwd(y.data_ptr(), 0, 0, rmp, rvp, x.data_ptr(), wp, bp, N, C, S, eps,
                         bn[1], count, flags, 0, dt, wdt, rdt)
        if status:
            CPU.check(status, "batch_norm")
    if training and (rm is not None or rv is not None):
        # the kernel wrote the running statistics in place: tell autograd, as copy_ would
        _increment_version([t for t in (rm, rv) if t is not None])
    return y
