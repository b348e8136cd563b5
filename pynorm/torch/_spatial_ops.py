"""Spatial norms (GroupNorm, BatchNorm; InstanceNorm is GroupNorm with G = C) as torch
custom operators.

    pynorm::group_norm_fwd(x, weight?, bias?, num_groups, eps) -> (y, mean, rstd)
    pynorm::group_norm_bwd(dy, x, mean, rstd, weight?, num_groups, need_dx, need_dweight,
                           need_dbias) -> (dx, dweight, dbias)
    pynorm::batch_norm_fwd(x, weight?, bias?, running_mean?, running_var?,
                           num_batches_tracked?, training, momentum, cumulative, eps)
        -> (y, mean, rstd, new_running_mean, new_running_var)
    pynorm::batch_norm_bwd(dy, x, mean, rstd, weight?, training, need_dx, need_dweight,
                           need_dbias) -> (dx, dweight, dbias)

x is (N, C, *spatial). A contiguous x runs the NCHW kernels; a channels_last x (dense
with the channels innermost: torch.channels_last, channels_last_3d, or any rank with
that order) runs the NHWC kernels and gets a channels_last y; any other x is made
contiguous first. mean/rstd: (N, G) for GroupNorm, (C,) for BatchNorm (in eval the
running mean and 1/sqrt(running_var + eps)), float32 (float64 for float64 x).

BatchNorm in training computes the updated running statistics (momentum, or with
cumulative=True the average over num_batches_tracked batches: torch's momentum=None;
the variance unbiased, as torch) and returns them as new_running_mean/var (shape (0,)
when there is nothing to update): the operator is functional, as torch requires of an
operator with autograd, and pynorm.torch.batch_norm copies them into the buffers (C
values). num_batches_tracked itself is the caller's to count.
"""

import math

import torch

from ._backend import (PN_BN_CUMULATIVE, PN_BN_TRAINING, backend_for, check_same_device, check_tensor,
                       empty, stats_dtype)
from ._dispatch import backward_op, register

NCHW, NHWC = 0, 1


def layout_of(x):
    """NCHW when x is contiguous, NHWC when it has spatial axes and is dense with the
    channels innermost, None otherwise (any other strides, a 2-D (N, C) slice or
    transpose included: the kernels read dense buffers, so it is copied to NCHW)."""
    if x.is_contiguous():
        return NCHW
    if x.dim() > 2 and x.movedim(1, -1).is_contiguous():
        return NHWC
    return None


def _in_layout(t, layout):
    """t laid out densely in `layout` (a copy only when it is not already)."""
    if layout == NCHW:
        return t.contiguous()
    if t.movedim(1, -1).is_contiguous():
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def empty_like_layout(x, layout, dtype=None, alloc=torch.empty):
    dtype = dtype or x.dtype
    if layout == NHWC:
        shape = (x.shape[0], *x.shape[2:], x.shape[1])
        return alloc(shape, dtype=dtype, device=x.device).movedim(-1, 1)
    return alloc(x.shape, dtype=dtype, device=x.device)


def _sizes(what, x):
    check_tensor(x, "x", what)
    if x.dim() < 2:
        raise ValueError(f"pynorm.torch.{what}: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    return N, C, S


def _params(what, x, C, **params):
    out = []
    dts = set()
    for name, p in params.items():
        if p is None:
            out.append(None)
            continue
        check_tensor(p, name, what)
        if p.dtype != x.dtype and p.dtype != torch.float32:
            raise TypeError(f"pynorm.torch.{what}: {name} has dtype {p.dtype}; expected x's dtype "
                            f"({x.dtype}) or float32")
        if tuple(p.shape) != (C,):
            raise ValueError(f"pynorm.torch.{what}: {name} has shape {tuple(p.shape)}; expected ({C},)")
        check_same_device(what, x, **{name: p})
        dts.add(p.dtype)
        out.append(p.contiguous())
    if len(dts) > 1:
        raise TypeError(f"pynorm.torch.{what}: {' and '.join(params)} must have the same dtype")
    return out, (dts.pop() if dts else torch.float32)


def _check_stats(what, s, name, shape, x):
    if tuple(s.shape) != tuple(shape) or s.dtype != stats_dtype(x.dtype):
        raise ValueError(f"pynorm.torch.{what}: {name} has shape {tuple(s.shape)} and dtype {s.dtype}; "
                         f"expected {tuple(shape)} and {stats_dtype(x.dtype)}")
    check_same_device(what, x, **{name: s})
    return s.contiguous()


def _empty_grad(x, dtype):
    return x.new_empty((0,), dtype=dtype)


def _grads(x, layout, C, wdtype, need_dx, need_dw, need_db, alloc=torch.empty):
    dx = empty_like_layout(x, layout, alloc=alloc) if need_dx else _empty_grad(x, x.dtype)
    dw = x.new_empty((C,) if need_dw else (0,), dtype=wdtype)
    db = x.new_empty((C,) if need_db else (0,), dtype=wdtype)
    return dx, dw, db


# ---- GroupNorm ------------------------------------------------------------------------------

def _group_norm_fwd_impl(x, weight, bias, num_groups, eps):
    what = "group_norm"
    N, C, S = _sizes(what, x)
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"pynorm.torch.{what}: num_groups={num_groups} must divide the {C} channels")
    (weight, bias), wdtype = _params(what, x, C, weight=weight, bias=bias)
    be = backend_for(x, what)
    layout = layout_of(x)
    if layout is None:
        layout, x = NCHW, x.contiguous()
    sdt = stats_dtype(x.dtype)
    y = empty_like_layout(x, layout, alloc=empty)
    mean = torch.empty((N, num_groups), dtype=sdt, device=x.device)
    rstd = torch.empty((N, num_groups), dtype=sdt, device=x.device)
    if x.numel() == 0:                 # statistics over nothing, as torch: NaN
        return y, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    p = be.ptr
    be.call("groupnorm_forward", what, x.device, p(y), p(mean), p(rstd), p(x), p(weight), p(bias),
            N, C, S, num_groups, float(eps), layout, be.pn_dtype[x.dtype], be.pn_dtype[wdtype])
    return y, mean, rstd


def _group_norm_bwd_impl(dy, x, mean, rstd, weight, num_groups, need_dx, need_dw, need_db):
    what = "group_norm_backward"
    N, C, S = _sizes(what, x)
    (weight,), _ = _params(what, x, C, weight=weight)
    wdtype = weight.dtype if weight is not None else torch.float32
    mean = _check_stats(what, mean, "mean", (N, num_groups), x)
    rstd = _check_stats(what, rstd, "rstd", (N, num_groups), x)
    be = backend_for(x, what)
    layout = layout_of(x)
    if layout is None:
        layout, x = NCHW, x.contiguous()
    dy = _in_layout(dy, layout)
    dx, dw, db = _grads(x, layout, C, wdtype, need_dx, need_dw, need_db, alloc=empty)
    if x.numel() == 0 or not (need_dx or need_dw or need_db):
        if x.numel() == 0:
            dw.zero_()
            db.zero_()
        return dx, dw, db
    p, NULL = be.ptr, be.ffi.NULL
    dt = be.pn_dtype[x.dtype]
    sp, sn, _keep = be.scratch("groupnorm_backward_scratch_size", x.device, N, C, S, num_groups, layout, dt)
    be.call("groupnorm_backward", what, x.device, p(dx) if need_dx else NULL, p(dw) if need_dw else NULL,
            p(db) if need_db else NULL, sp, sn, p(dy), p(x), p(weight), p(mean), p(rstd),
            N, C, S, num_groups, 0, layout, dt, be.pn_dtype[wdtype])
    return dx, dw, db


register("group_norm_bwd", _group_norm_bwd_impl)


@torch.library.custom_op("pynorm::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _group_norm_fwd_impl(x, weight, bias, num_groups, eps)


@torch.library.custom_op("pynorm::group_norm_bwd", mutates_args=())
def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   weight: torch.Tensor | None, num_groups: int, need_dx: bool, need_dweight: bool,
                   need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _group_norm_bwd_impl(dy, x, mean, rstd, weight, num_groups, need_dx, need_dweight, need_dbias)


@group_norm_fwd.register_fake
def _(x, weight, bias, num_groups, eps):
    layout = layout_of(x) or NCHW
    sdt = stats_dtype(x.dtype)
    N = x.shape[0]
    return (empty_like_layout(x, layout), x.new_empty((N, num_groups), dtype=sdt),
            x.new_empty((N, num_groups), dtype=sdt))


@group_norm_bwd.register_fake
def _(dy, x, mean, rstd, weight, num_groups, need_dx, need_dweight, need_dbias):
    wdtype = weight.dtype if weight is not None else torch.float32
    return _grads(x, layout_of(x) or NCHW, x.shape[1], wdtype, need_dx, need_dweight, need_dbias)


def _setup_group_norm(ctx, inputs, output):
    x, weight, bias, num_groups, eps = inputs
    y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.num_groups = num_groups
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _backward_group_norm(ctx, dy, dmean, drstd):
    if dy is None:
        return None, None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    nw, nb = nw and weight is not None, nb and ctx.has_bias
    dx, dw, db = backward_op(ctx, "group_norm_bwd")(dy, x, mean, rstd, weight, ctx.num_groups, nx, nw, nb)
    return dx if nx else None, dw if nw else None, db if nb else None, None, None


group_norm_fwd.register_autograd(_backward_group_norm, setup_context=_setup_group_norm)
register("group_norm_fwd", _group_norm_fwd_impl, _setup_group_norm, _backward_group_norm)


# ---- BatchNorm ------------------------------------------------------------------------------

def _batch_norm_fwd_impl(x, weight, bias, running_mean, running_var, num_batches_tracked,
                         training, momentum, cumulative, eps):
    what = "batch_norm"
    N, C, S = _sizes(what, x)
    (weight, bias), wdtype = _params(what, x, C, weight=weight, bias=bias)
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        if r is None:
            continue
        check_tensor(r, name, what)
        if r.dtype != x.dtype and r.dtype != torch.float32:
            raise TypeError(f"pynorm.torch.{what}: {name} has dtype {r.dtype}; expected x's dtype "
                            f"({x.dtype}) or float32")
        if tuple(r.shape) != (C,):
            raise ValueError(f"pynorm.torch.{what}: {name} must be a tensor of shape ({C},)")
        check_same_device(what, x, **{name: r})
    if running_mean is not None and running_var is not None and running_mean.dtype != running_var.dtype:
        raise TypeError(f"pynorm.torch.{what}: running_mean and running_var must have the same dtype")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"pynorm.torch.{what}: eval mode (training=False) needs running_mean "
                         "and running_var")
    if training and N * S == 1:       # torch's rule; an empty batch returns an empty output
        raise ValueError(f"pynorm.torch.{what}: expected more than 1 value per channel when training, "
                         f"got input of shape {tuple(x.shape)}")
    rdtype = (running_mean if running_mean is not None else running_var)
    rdtype = rdtype.dtype if rdtype is not None else x.dtype
    be = backend_for(x, what)
    layout = layout_of(x)
    if layout is None:
        layout, x = NCHW, x.contiguous()
    sdt = stats_dtype(x.dtype)
    y = empty_like_layout(x, layout, alloc=empty)
    mean = torch.empty((C,), dtype=sdt, device=x.device)
    rstd = torch.empty((C,), dtype=sdt, device=x.device)
    update = training and (running_mean is not None or running_var is not None)
    # the kernels read and write C dense values: the updated statistics are dense copies
    # (returned; the caller copies them into the buffers), eval reads dense ones
    dense = torch.contiguous_format
    new_rm = (running_mean.clone(memory_format=dense) if update and running_mean is not None
              else _empty_grad(x, rdtype))
    new_rv = (running_var.clone(memory_format=dense) if update and running_var is not None
              else _empty_grad(x, rdtype))
    if x.numel() == 0:
        return y, mean.zero_(), rstd.zero_(), new_rm, new_rv
    if not training:                   # eval reads the running statistics
        running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
        new_rm_p, new_rv_p = be.ptr(running_mean), be.ptr(running_var)
    else:
        new_rm_p = be.ptr(new_rm) if new_rm.numel() else be.ffi.NULL
        new_rv_p = be.ptr(new_rv) if new_rv.numel() else be.ffi.NULL
    flags = PN_BN_TRAINING if training else 0
    nbt = 0
    if training and cumulative:
        flags |= PN_BN_CUMULATIVE
        if num_batches_tracked is None:
            raise ValueError(f"pynorm.torch.{what}: momentum=None (cumulative average) needs "
                             "num_batches_tracked")
        nbt = int(num_batches_tracked.item())
    p = be.ptr
    be.call("batchnorm_forward", what, x.device, p(y), p(mean), p(rstd), new_rm_p, new_rv_p,
            p(x), p(weight), p(bias), N, C, S, float(eps), float(momentum), nbt, flags, layout,
            be.pn_dtype[x.dtype], be.pn_dtype[wdtype], be.pn_dtype[rdtype])
    return y, mean, rstd, new_rm, new_rv


def _batch_norm_bwd_impl(dy, x, mean, rstd, weight, training, need_dx, need_dw, need_db):
    what = "batch_norm_backward"
    N, C, S = _sizes(what, x)
    (weight,), _ = _params(what, x, C, weight=weight)
    wdtype = weight.dtype if weight is not None else torch.float32
    mean = _check_stats(what, mean, "mean", (C,), x)
    rstd = _check_stats(what, rstd, "rstd", (C,), x)
    be = backend_for(x, what)
    layout = layout_of(x)
    if layout is None:
        layout, x = NCHW, x.contiguous()
    dy = _in_layout(dy, layout)
    dx, dw, db = _grads(x, layout, C, wdtype, need_dx, need_dw, need_db, alloc=empty)
    if x.numel() == 0 or not (need_dx or need_dw or need_db):
        if x.numel() == 0:
            dw.zero_()
            db.zero_()
        return dx, dw, db
    p, NULL = be.ptr, be.ffi.NULL
    dt = be.pn_dtype[x.dtype]
    sp, sn, _keep = be.scratch("batchnorm_backward_scratch_size", x.device, N, C, S, layout, dt)
    flags = PN_BN_TRAINING if training else 0
    be.call("batchnorm_backward", what, x.device, p(dx) if need_dx else NULL, p(dw) if need_dw else NULL,
            p(db) if need_db else NULL, sp, sn, p(dy), p(x), p(weight), p(mean), p(rstd),
            N, C, S, flags, layout, dt, be.pn_dtype[wdtype])
    return dx, dw, db


@torch.library.custom_op("pynorm::batch_norm_fwd", mutates_args=())
def batch_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   num_batches_tracked: torch.Tensor | None, training: bool, momentum: float,
                   cumulative: bool, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _batch_norm_fwd_impl(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                training, momentum, cumulative, eps)


@torch.library.custom_op("pynorm::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   weight: torch.Tensor | None, training: bool, need_dx: bool, need_dweight: bool,
                   need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _batch_norm_bwd_impl(dy, x, mean, rstd, weight, training, need_dx, need_dweight, need_dbias)


@batch_norm_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
      cumulative, eps):
    layout = layout_of(x) or NCHW
    sdt = stats_dtype(x.dtype)
    C = x.shape[1]
    r = running_mean if running_mean is not None else running_var
    rdtype = r.dtype if r is not None else x.dtype
    update = training and r is not None

    def new(run):
        return x.new_empty((C,) if update and run is not None else (0,), dtype=rdtype)

    return (empty_like_layout(x, layout), x.new_empty((C,), dtype=sdt), x.new_empty((C,), dtype=sdt),
            new(running_mean), new(running_var))


@batch_norm_bwd.register_fake
def _(dy, x, mean, rstd, weight, training, need_dx, need_dweight, need_dbias):
    wdtype = weight.dtype if weight is not None else torch.float32
    return _grads(x, layout_of(x) or NCHW, x.shape[1], wdtype, need_dx, need_dweight, need_dbias)


def _setup_batch_norm(ctx, inputs, output):
    x, weight, bias, rm, rv, nbt, training, momentum, cumulative, eps = inputs
    y, mean, rstd, new_rm, new_rv = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.training = training
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd, new_rm, new_rv)
    ctx.set_materialize_grads(False)


def _backward_batch_norm(ctx, dy, dmean, drstd, drm, drv):
    if dy is None:
        return (None,) * 10
    x, weight, mean, rstd = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    nw, nb = nw and weight is not None, nb and ctx.has_bias
    dx, dw, db = backward_op(ctx, "batch_norm_bwd")(dy, x, mean, rstd, weight, ctx.training, nx, nw, nb)
    return (dx if nx else None, dw if nw else None, db if nb else None) + (None,) * 7


batch_norm_fwd.register_autograd(_backward_batch_norm, setup_context=_setup_batch_norm)
register("batch_norm_fwd", _batch_norm_fwd_impl, _setup_batch_norm, _backward_batch_norm)
register("batch_norm_bwd", _batch_norm_bwd_impl)
