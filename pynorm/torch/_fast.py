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
_TRAINING, _CUMULATIVE = _lib.lib.PN_BN_TRAINING, _lib.lib.PN_BN_CUMULATIVE

# ---- when the straight path applies ------------------------------------------------------------

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack
_tracing = torch._C._get_tracing_state
_function_mode = torch._C._is_torch_function_mode_enabled
_grad_enabled = torch.is_grad_enabled


def _ordinary(x):
    """x is a plain contiguous CPU tensor and the call runs in plain eager mode."""
    # is_compiling first: Dynamo folds it to True, and the rest is never traced
    return (not _is_compiling() and type(x) is _Tensor and x.is_cpu and x.is_contiguous()
            and _dispatch.FAST_EAGER and _dispatch_depth() == 0 and _functorch_level() is None
            and _tracing() is None and not _function_mode())


def _param(p, x, C):
    """p's (data pointer, dtype) when the kernels can read it as it is (None: 0),
    False otherwise (the general path casts or raises)."""
    if p is None:
        return 0, None
    t = type(p)
    if ((t is _Parameter or t is _Tensor) and p.is_cpu and p.is_contiguous() and p.numel() == C
            and (p.dtype is x.dtype or p.dtype is _F32)):
        return p.data_ptr(), p.dtype
    return False


def _weights(x, C, weight, bias):
    """(weight pointer, bias pointer, wdtype code) or None."""
    w = _param(weight, x, C)
    if w is False:
        return None
    b = _param(bias, x, C)
    if b is False:
        return None
    wdt = w[1] or b[1] or _F32
    if b[1] is not None and b[1] is not wdt:
        return None
    return w[0], b[0], _CODE[wdt]


def _needs_grad(*tensors):
    if not _grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _out(x):
    """A dense output like x (large ones from the library's buffer cache)."""
    if x.numel() * x.element_size() >= CACHED_ALLOC_MIN:
        return _cached_empty(x.shape, x.dtype, x.device)
    return torch.empty_like(x)


def _stats(n, dtype):
    """One buffer for both statistics (mean, then rstd): float32, float64 for float64."""
    return torch.empty(2 * n, dtype=_F64 if dtype is _F64 else _F32)


def _grad_like(t, need):
    return torch.empty_like(t) if need else None


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _check(status, what):
    if status:
        CPU.check(status, what)


# ---- LayerNorm / RMSNorm --------------------------------------------------------------------------

class _TokenNorm(torch.autograd.Function):
    """y = norm(x) over the last axis; backward on pynorm's kernels (first order).
    Subclassed once per norm: the class name is what profilers show."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, C, wp, bp, wdt):
        rows = x.numel() // C
        y = _out(x)
        st = _stats(rows, x.dtype)
        sp = st.data_ptr()
        dt = _CODE[x.dtype]
        if rms:
            status = _rms_fwd(y.data_ptr(), sp + rows * st.element_size(), x.data_ptr(), wp,
                              1, rows, C, eps, dt, wdt, 0)
        else:
            status = _ln_fwd(y.data_ptr(), sp, sp + rows * st.element_size(), x.data_ptr(), wp, bp,
                             1, rows, C, eps, dt, wdt, 0)
        _check(status, "rms_norm" if rms else "layer_norm")
        ctx.save_for_backward(x, weight, st)
        ctx.rms, ctx.has_bias, ctx.wdt = rms, bias is not None, wdt
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, st = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        nw = nw and weight is not None
        nb = nb and ctx.has_bias
        dy = dy.contiguous()
        C = x.shape[-1]
        rows = st.numel() // 2
        dx, dw = _grad_like(x, nx), _grad_like(weight, nw)
        db = _grad_like(weight, nb) if not ctx.rms else None
        sp = st.data_ptr()
        rp = sp + rows * st.element_size()
        if nx or nw or nb:
            if ctx.rms:
                status = _rms_bwd(_ptr(dx), _ptr(dw), 0, 0, dy.data_ptr(), x.data_ptr(), _ptr(weight),
                                  rp, 1, rows, C, 0, _CODE[x.dtype], ctx.wdt, 0)
            else:
                status = _ln_bwd(_ptr(dx), _ptr(dw), _ptr(db), 0, 0, dy.data_ptr(), x.data_ptr(),
                                 _ptr(weight), sp, rp, 1, rows, C, 0, _CODE[x.dtype], ctx.wdt, 0)
            _check(status, "rms_norm_backward" if ctx.rms else "layer_norm_backward")
        return dx, dw, db, None, None, None, None, None, None


# named as the general path's eager Functions (see _dispatch.register)
_LayerNormFn = type("PynormEager_layer_norm_fwd", (_TokenNorm,), {})
_RMSNormFn = type("PynormEager_rms_norm_fwd", (_TokenNorm,), {})


def token_norm(x, normalized_shape, weight, bias, eps, rms):
    """LayerNorm (rms False) or RMSNorm over x's last axis, or None (general path).
    eps: a float (RMSNorm's None is resolved by the caller)."""
    if not _ordinary(x) or len(normalized_shape) != 1:
        return None
    C = normalized_shape[0]
    shape = x.shape
    if not shape or shape[-1] != C or x.dtype not in _CODE or x.numel() == 0:
        return None
    ws = _weights(x, C, weight, bias)
    if ws is None:
        return None
    wp, bp, wdt = ws
    if _needs_grad(x, weight, bias):
        return (_RMSNormFn if rms else _LayerNormFn).apply(x, weight, bias, eps, rms, C, wp, bp, wdt)
    y = _out(x)
    rows = x.numel() // C
    if rms:
        status = _rms_fwd(y.data_ptr(), 0, x.data_ptr(), wp, 1, rows, C, eps, _CODE[x.dtype], wdt, 0)
    else:
        status = _ln_fwd(y.data_ptr(), 0, 0, x.data_ptr(), wp, bp, 1, rows, C, eps, _CODE[x.dtype], wdt, 0)
    _check(status, "rms_norm" if rms else "layer_norm")
    return y
