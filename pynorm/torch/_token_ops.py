"""Token norms (LayerNorm, RMSNorm, fused residual forms) as torch custom operators.

Operators (namespace ``pynorm``), each with a fake (meta) implementation and, for
the forwards, autograd wired to pynorm's own backward kernels:

    pynorm::layer_norm_fwd(x, weight?, bias?, eps, weight_offset=0, rounding="once") -> (y, mean, rstd)
    pynorm::layer_norm_bwd(dy, x, mean, rstd, weight?, need_dx, need_dweight, need_dbias,
                           weight_offset=0) -> (dx, dweight, dbias)
    pynorm::rms_norm_fwd(x, weight?, eps, weight_offset=0, rounding="once") -> (y, rstd)
    pynorm::rms_norm_bwd(dy, x, rstd, weight?, need_dx, need_dweight, weight_offset=0) -> (dx, dweight)
    pynorm::add_layer_norm_fwd(x, residual, weight?, bias?, eps, weight_offset=0, rounding="once")
        -> (y, h, mean, rstd)
    pynorm::add_rms_norm_fwd(x, residual, weight?, eps, weight_offset=0, rounding="once") -> (y, h, rstd)
    pynorm::fused_add_rms_norm_(x!, residual!, weight, eps, weight_offset=0, rounding="once") -> ()

x is (..., C) and normalized over its last axis; outputs are dense. mean/rstd have
shape x.shape[:-1] and dtype float32 (float64 for float64 x); they are not
differentiable. A gradient not asked for (need_* False) comes back as an empty
tensor of shape (0,). dweight/dbias have weight's dtype (float32 without weight).

weight_offset and rounding are docs/inference.md's: y = xhat * (weight_offset + w) (+ b),
the offset added in float32; rounding "once" or "llama" (xhat rounded to x's dtype
before the weight). The backward takes the offset (dx uses offset + w; dweight does
not change) and ignores the rounding, as the C library's.

The fused ops' gradient: h = x + residual, y = norm(h), and h is an output too, so
d(x) = d(residual) = norm_backward(dy, h) + dh.
"""

import torch

from .._arrays import check_options
from ._backend import backend_for, check_same_device, check_tensor, empty, stats_dtype, token_layout
from ._dispatch import backward_op, register

_EMPTY = (0,)


def _empty_grad(x, dtype=None):
    return x.new_empty(_EMPTY, dtype=dtype or x.dtype)


def _wdtype(weight, bias, x):
    for p in (weight, bias):
        if p is not None:
            return p.dtype
    return torch.float32


def _params(what, x, weight, bias=None):
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(p, name, what)
        if p.dtype != x.dtype and p.dtype != torch.float32:
            raise TypeError(f"pynorm.torch.{what}: {name} has dtype {p.dtype}; expected x's "
                            f"dtype ({x.dtype}) or float32")
        if tuple(p.shape) != (C,):
            raise ValueError(f"pynorm.torch.{what}: {name} has shape {tuple(p.shape)}; expected ({C},)")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"pynorm.torch.{what}: weight and bias must have the same dtype, "
                        f"got {weight.dtype} and {bias.dtype}")
    check_same_device(what, x, weight=weight, bias=bias)
    return (None if weight is None else weight.contiguous(),
            None if bias is None else bias.contiguous())


def _check_x(what, x, name="x"):
    check_tensor(x, name, what)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"pynorm.torch.{what}: {name} must have a non-empty last axis, "
                         f"got shape {tuple(x.shape)}")


def _check_like(what, a, name, x):
    check_tensor(a, name, what)
    if a.shape != x.shape or a.dtype != x.dtype:
        raise ValueError(f"pynorm.torch.{what}: {name} has shape {tuple(a.shape)} and dtype "
                         f"{a.dtype}; expected x's {tuple(x.shape)} and {x.dtype}")
    check_same_device(what, x, **{name: a})


def _check_stats(what, s, name, x):
    if s.shape != x.shape[:-1] or s.dtype != stats_dtype(x.dtype):
        raise ValueError(f"pynorm.torch.{what}: {name} has shape {tuple(s.shape)} and dtype {s.dtype}; "
                         f"expected {tuple(x.shape[:-1])} and {stats_dtype(x.dtype)}")
    check_same_device(what, x, **{name: s})
    return s.contiguous()


def options(what, weight_offset, rounding, weight):
    """(offset, rounding code) checked as the NumPy functions do, or an error naming
    the argument (pynorm.torch.<what>: ...)."""
    try:
        return check_options(weight_offset, rounding, weight)
    except (TypeError, ValueError) as e:
        raise type(e)(f"pynorm.torch.{what}: {e}") from None


def _opts(be, offset, rmode, H=1, head=None):
    """A pn_norm_options for the *_ex functions, or None for the defaults (the 0.1
    functions are called then). H, head: B x T x H rows (token_layout's heads)."""
    if offset == 0.0 and rmode == 0 and H == 1:
        return None
    o = be.ffi.new("pn_norm_options *")
    o.weight_offset = offset
    o.rounding = rmode
    o.H = H
    for field, stride in (head or {}).items():
        setattr(o.head, field, stride)
    return o


# ---- implementations (real tensors) ---------------------------------------------------------

def _forward_impl(op, x, residual, weight, bias, eps, weight_offset=0.0, rounding="once", outs=None,
                  what=None):
    """Every forward. op: "layer" or "rms". Returns (y, h or None, mean or None, rstd).
    outs: (y, h) written in place (fused_add_rms_norm_: x and residual, dense)."""
    what = what or f"{'add_' if residual is not None else ''}{op}_norm"
    _check_x(what, x)
    if residual is not None:
        _check_like(what, residual, "residual", x)
    weight, bias = _params(what, x, weight, bias)
    offset, rmode = options(what, weight_offset, rounding, weight)
    be = backend_for(x, what)
    shape, dtype, dev = x.shape, x.dtype, x.device
    lead, C = tuple(shape[:-1]), shape[-1]
    sdt = stats_dtype(dtype)
    if outs is None:
        y = empty(shape, dtype, dev)
        h = empty(shape, dtype, dev) if residual is not None else None
    else:
        y, h = outs
    mean = torch.empty(lead, dtype=sdt, device=dev) if op == "layer" else None
    rstd = torch.empty(lead, dtype=sdt, device=dev)
    if y.numel() == 0:
        return y, h, mean, rstd
    inputs = [("inp", x)] + ([("residual", residual)] if residual is not None else [])
    B, T, H, head, strides, ins = token_layout(be, lead, inputs, heads=True)
    dt, wdt = be.pn_dtype[dtype], be.pn_dtype[_wdtype(weight, bias, x)]
    p = be.ptr
    opts = _opts(be, offset, rmode, H, head)
    ex = () if opts is None else (opts,)          # the default options: the 0.1 functions
    sfx = "" if opts is None else "_ex"
    if op == "layer":
        if residual is None:
            be.call("layernorm_forward" + sfx, what, dev, p(y), p(mean), p(rstd), p(ins[0]),
                    p(weight), p(bias), B, T, C, float(eps), dt, wdt, strides, *ex)
        else:
            be.call("add_layernorm_forward" + sfx, what, dev, p(y), p(h), p(mean), p(rstd),
                    p(ins[0]), p(ins[1]), p(weight), p(bias), B, T, C, float(eps), dt, wdt, strides, *ex)
    else:
        if residual is None:
            be.call("rmsnorm_forward" + sfx, what, dev, p(y), p(rstd), p(ins[0]), p(weight),
                    B, T, C, float(eps), dt, wdt, strides, *ex)
        else:
            be.call("add_rmsnorm_forward" + sfx, what, dev, p(y), p(h), p(rstd), p(ins[0]),
                    p(ins[1]), p(weight), B, T, C, float(eps), dt, wdt, strides, *ex)
    return y, h, mean, rstd


def _backward_impl(op, dy, x, mean, rstd, weight, need_dx, need_dw, need_db, weight_offset=0.0):
    what = f"{op}_norm_backward"
    _check_x(what, x)
    _check_like(what, dy, "dy", x)
    mean = _check_stats(what, mean, "mean", x) if op == "layer" else None
    rstd = _check_stats(what, rstd, "rstd", x)
    weight, _ = _params(what, x, weight)
    offset, _ = options(what, weight_offset, "once", weight)
    be = backend_for(x, what)
    lead, C = tuple(x.shape[:-1]), x.shape[-1]
    wdtype = weight.dtype if weight is not None else torch.float32
    dev = x.device
    dx = empty(x.shape, x.dtype, dev) if need_dx else _empty_grad(x)
    dw = torch.empty((C,), dtype=wdtype, device=dev) if need_dw else _empty_grad(x, wdtype)
    db = (torch.empty((C,), dtype=wdtype, device=dev) if need_db else _empty_grad(x, wdtype)) \
        if op == "layer" else None
    if x.numel() == 0:
        if need_dw:
            dw.zero_()
        if need_db:
            db.zero_()
        return dx, dw, db
    if not (need_dx or need_dw or need_db):
        return dx, dw, db
    B, T, H, head, strides, (dy_, x_) = token_layout(be, lead, [("dout", dy), ("inp", x)], heads=True)
    dt, wdt = be.pn_dtype[x.dtype], be.pn_dtype[wdtype]
    p = be.ptr
    dxp = p(dx) if need_dx else be.ffi.NULL
    dwp = p(dw) if need_dw else be.ffi.NULL
    opts = _opts(be, offset, 0, H, head)
    ex = () if opts is None else (opts,)
    sfx = "" if opts is None else "_ex"
    if op == "layer":
        dbp = p(db) if need_db else be.ffi.NULL
        sp, sn, _keep = be.scratch("layernorm_backward_scratch_size", dev, B, T * H, C, dt)
        be.call("layernorm_backward" + sfx, what, dev, dxp, dwp, dbp, sp, sn, p(dy_), p(x_), p(weight),
                p(mean), p(rstd), B, T, C, 0, dt, wdt, strides, *ex)
    else:
        sp, sn, _keep = be.scratch("rmsnorm_backward_scratch_size", dev, B, T * H, C, dt)
        be.call("rmsnorm_backward" + sfx, what, dev, dxp, dwp, sp, sn, p(dy_), p(x_), p(weight),
                p(rstd), B, T, C, 0, dt, wdt, strides, *ex)
    return dx, dw, db


# ---- the operators ----------------------------------------------------------------------------

def _layer_norm_fwd(x, weight, bias, eps, weight_offset=0.0, rounding="once"):
    y, _, mean, rstd = _forward_impl("layer", x, None, weight, bias, eps, weight_offset, rounding)
    return y, mean, rstd


def _rms_norm_fwd(x, weight, eps, weight_offset=0.0, rounding="once"):
    y, _, _, rstd = _forward_impl("rms", x, None, weight, None, eps, weight_offset, rounding)
    return y, rstd


def _add_layer_norm_fwd(x, residual, weight, bias, eps, weight_offset=0.0, rounding="once"):
    return _forward_impl("layer", x, residual, weight, bias, eps, weight_offset, rounding)


def _add_rms_norm_fwd(x, residual, weight, eps, weight_offset=0.0, rounding="once"):
    y, h, _, rstd = _forward_impl("rms", x, residual, weight, None, eps, weight_offset, rounding)
    return y, h, rstd


def _layer_norm_bwd(dy, x, mean, rstd, weight, need_dx, need_dweight, need_dbias, weight_offset=0.0):
    return _backward_impl("layer", dy, x, mean, rstd, weight, need_dx, need_dweight, need_dbias,
                          weight_offset)


def _rms_norm_bwd(dy, x, rstd, weight, need_dx, need_dweight, weight_offset=0.0):
    dx, dw, _ = _backward_impl("rms", dy, x, None, rstd, weight, need_dx, need_dweight, False,
                               weight_offset)
    return dx, dw


@torch.library.custom_op("pynorm::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, weight_offset: float = 0.0, rounding: str = "once"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_fwd(x, weight, bias, eps, weight_offset, rounding)


@torch.library.custom_op("pynorm::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 weight_offset: float = 0.0, rounding: str = "once") -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_fwd(x, weight, eps, weight_offset, rounding)


@torch.library.custom_op("pynorm::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float, weight_offset: float = 0.0,
                       rounding: str = "once"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_layer_norm_fwd(x, residual, weight, bias, eps, weight_offset, rounding)


@torch.library.custom_op("pynorm::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                     eps: float, weight_offset: float = 0.0, rounding: str = "once"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_rms_norm_fwd(x, residual, weight, eps, weight_offset, rounding)


@torch.library.custom_op("pynorm::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   weight: torch.Tensor | None, need_dx: bool, need_dweight: bool,
                   need_dbias: bool, weight_offset: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_bwd(dy, x, mean, rstd, weight, need_dx, need_dweight, need_dbias, weight_offset)


@torch.library.custom_op("pynorm::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor,
                 weight: torch.Tensor | None, need_dx: bool, need_dweight: bool,
                 weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_bwd(dy, x, rstd, weight, need_dx, need_dweight, weight_offset)


# ---- fake (meta) implementations: shapes, dtypes and strides only ------------------------------

def _fake_out(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_stats(x):
    return x.new_empty(x.shape[:-1], dtype=stats_dtype(x.dtype))


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, weight_offset=0.0, rounding="once"):
    return _fake_out(x), _fake_stats(x), _fake_stats(x)


@rms_norm_fwd.register_fake
def _(x, weight, eps, weight_offset=0.0, rounding="once"):
    return _fake_out(x), _fake_stats(x)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, weight_offset=0.0, rounding="once"):
    return _fake_out(x), _fake_out(x), _fake_stats(x), _fake_stats(x)


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, weight_offset=0.0, rounding="once"):
    return _fake_out(x), _fake_out(x), _fake_stats(x)


def _fake_grads(x, weight, need_dx, need_dw, need_db):
    C = x.shape[-1]
    wdtype = weight.dtype if weight is not None else torch.float32
    dx = _fake_out(x) if need_dx else _empty_grad(x)
    dw = x.new_empty((C,) if need_dw else _EMPTY, dtype=wdtype)
    db = x.new_empty((C,) if need_db else _EMPTY, dtype=wdtype)
    return dx, dw, db


@layer_norm_bwd.register_fake
def _(dy, x, mean, rstd, weight, need_dx, need_dweight, need_dbias, weight_offset=0.0):
    return _fake_grads(x, weight, need_dx, need_dweight, need_dbias)


@rms_norm_bwd.register_fake
def _(dy, x, rstd, weight, need_dx, need_dweight, weight_offset=0.0):
    return _fake_grads(x, weight, need_dx, need_dweight, False)[:2]


# ---- autograd ----------------------------------------------------------------------------------
# set_materialize_grads(False): an output nobody differentiates (the fused ops' h,
# the statistics) brings None, not a tensor of zeros to add.

def _offset_of(opts):
    """weight_offset from the trailing (weight_offset, rounding) inputs, 0 when left out."""
    return float(opts[0]) if opts else 0.0


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, eps, *opts = inputs
    ctx.weight_offset, ctx.n_inputs = _offset_of(opts), len(inputs)
    y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _layer_norm_grads(ctx, dy, x, weight, mean, rstd, need_dx, need_dw, need_db):
    if dy is None:
        return None, None, None
    dx, dw, db = backward_op(ctx, "layer_norm_bwd")(dy, x, mean, rstd, weight,
                                                    need_dx, need_dw, need_db, ctx.weight_offset)
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None


def _backward_layer_norm(ctx, dy, dmean, drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    dx, dw, db = _layer_norm_grads(ctx, dy, x, weight, mean, rstd, nx, nw and weight is not None,
                                   nb and ctx.has_bias)
    return (dx, dw, db, None, None, None)[:ctx.n_inputs]


layer_norm_fwd.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)
register("layer_norm_fwd", _layer_norm_fwd, _setup_layer_norm, _backward_layer_norm)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, eps, *opts = inputs
    ctx.weight_offset, ctx.n_inputs = _offset_of(opts), len(inputs)
    y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _rms_norm_grads(ctx, dy, x, weight, rstd, need_dx, need_dw):
    if dy is None:
        return None, None
    dx, dw = backward_op(ctx, "rms_norm_bwd")(dy, x, rstd, weight, need_dx, need_dw, ctx.weight_offset)
    return dx if need_dx else None, dw if need_dw else None


def _backward_rms_norm(ctx, dy, drstd):
    x, weight, rstd = ctx.saved_tensors
    nx, nw = ctx.needs_input_grad[:2]
    dx, dw = _rms_norm_grads(ctx, dy, x, weight, rstd, nx, nw and weight is not None)
    return (dx, dw, None, None, None)[:ctx.n_inputs]


rms_norm_fwd.register_autograd(_backward_rms_norm, setup_context=_setup_rms_norm)
register("rms_norm_fwd", _rms_norm_fwd, _setup_rms_norm, _backward_rms_norm)


def _residual_grad(dh_norm, dh):
    """d(x) = d(residual): the norm's gradient through h plus h's own gradient."""
    if dh_norm is None:
        return dh
    if dh is None:
        return dh_norm
    return dh_norm + dh


def _setup_add_layer_norm(ctx, inputs, output):
    x, residual, weight, bias, eps, *opts = inputs
    ctx.weight_offset, ctx.n_inputs = _offset_of(opts), len(inputs)
    y, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _backward_add_layer_norm(ctx, dy, dh, dmean, drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    nx, nr, nw, nb = ctx.needs_input_grad[:4]
    dhn, dw, db = _layer_norm_grads(ctx, dy, h, weight, mean, rstd, nx or nr,
                                    nw and weight is not None, nb and ctx.has_bias)
    d = _residual_grad(dhn, dh)
    return (d if nx else None, d if nr else None, dw, db, None, None, None)[:ctx.n_inputs]


add_layer_norm_fwd.register_autograd(_backward_add_layer_norm, setup_context=_setup_add_layer_norm)
register("add_layer_norm_fwd", _add_layer_norm_fwd, _setup_add_layer_norm, _backward_add_layer_norm)


def _setup_add_rms_norm(ctx, inputs, output):
    x, residual, weight, eps, *opts = inputs
    ctx.weight_offset, ctx.n_inputs = _offset_of(opts), len(inputs)
    y, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _backward_add_rms_norm(ctx, dy, dh, drstd):
    h, weight, rstd = ctx.saved_tensors
    nx, nr, nw = ctx.needs_input_grad[:3]
    dhn, dw = _rms_norm_grads(ctx, dy, h, weight, rstd, nx or nr, nw and weight is not None)
    d = _residual_grad(dhn, dh)
    return (d if nx else None, d if nr else None, dw, None, None, None)[:ctx.n_inputs]


add_rms_norm_fwd.register_autograd(_backward_add_rms_norm, setup_context=_setup_add_rms_norm)
register("add_rms_norm_fwd", _add_rms_norm_fwd, _setup_add_rms_norm, _backward_add_rms_norm)
register("layer_norm_bwd", _layer_norm_bwd)
register("rms_norm_bwd", _rms_norm_bwd)


# ---- in place: fused_add_rms_norm_ ---------------------------------------------------------------
# residual <- h = round(x + residual), x <- y = rms_norm(h): vLLM's and FlashInfer's
# fused_add_rmsnorm. A mutating operator (x and residual declared mutated), so
# torch.compile keeps the writes in order; no autograd (an inference op).

def _fused_add_rms_norm_(x, residual, weight, eps, weight_offset=0.0, rounding="once"):
    what = "fused_add_rms_norm_"
    if x.numel() and torch._C._overlaps(x, residual):
        raise ValueError(f"pynorm.torch.{what}: x and residual overlap in memory; they must be "
                         "separate buffers (both are written)")
    for name, t in (("x", x), ("residual", residual)):
        if t.numel() and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"pynorm.torch.{what}: {name} has elements that share memory (an expanded "
                             "view); it cannot be written in place")
        if weight is not None and t.numel() and weight.device == t.device and torch._C._overlaps(t, weight):
            raise ValueError(f"pynorm.torch.{what}: {name} overlaps weight in memory")
    if x.is_contiguous() and residual.is_contiguous():
        # dense: the kernel writes y over x and h over the residual (the in-place pairs)
        _forward_impl("rms", x, residual, weight, None, eps, weight_offset, rounding, outs=(x, residual),
                      what=what)
    else:
        y, h, _, _ = _forward_impl("rms", x, residual, weight, None, eps, weight_offset, rounding, what=what)
        residual.copy_(h)
        x.copy_(y)


@torch.library.custom_op("pynorm::fused_add_rms_norm_", mutates_args=("x", "residual"))
def fused_add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                        eps: float, weight_offset: float = 0.0, rounding: str = "once") -> None:
    _fused_add_rms_norm_(x, residual, weight, eps, weight_offset, rounding)


@fused_add_rms_norm_.register_fake
def _(x, residual, weight, eps, weight_offset=0.0, rounding="once"):
    return None


register("fused_add_rms_norm_", _fused_add_rms_norm_)
