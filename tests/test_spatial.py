"""Spatial norms (GroupNorm, InstanceNorm, BatchNorm), forward and backward, in
both layouts: checked against torch (CPU) and the float64 references of
reference_spatial.py with the suite's accuracy rule (conftest.check_accuracy:
pynorm's error at most 2x torch's on the same data, plus two ulps).

x is made in NCHW order, (N, C, *spatial); the NHWC runs get it as
(N, *spatial, C), and torch gets the same values as a channels_last tensor
where torch has one (4-D and 5-D), as a plain tensor otherwise.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pynorm
import reference_spatial as RS
from conftest import (BF16, DTYPES, F16, F32, F64, TORCH_DTYPES, assert_bitwise_equal, assert_unchanged,
                      check_accuracy, check_meta, dname, eps_of, from_torch, seed_for, snapshot, to_torch)

LAYOUTS = ["NCHW", "NHWC"]
HALF = (F16, BF16)


# --------------------------------------------------------------------------
# helpers


def sname(shape):
    return "x".join(map(str, shape))


def make_x(shape, dtype, seed, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def to_layout(a, layout):
    """An NCHW array as the array pynorm gets in `layout`."""
    return np.ascontiguousarray(a) if layout == "NCHW" else RS.to_nhwc(a)


def from_layout(a, layout):
    """pynorm's output in `layout` back to NCHW order."""
    return np.asarray(a) if layout == "NCHW" else RS.from_nhwc(a)


def torch_in(a, layout, cdt=None):
    """The torch tensor (NCHW indexing) for an NCHW NumPy array: channels_last
    memory for NHWC where torch has it; upcast to cdt when given."""
    t = to_torch(a)
    if cdt is not None:
        t = t.to(cdt)
    if layout == "NHWC" and t.dim() in (4, 5):
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def compute_dtype(x_dtype, *params):
    """torch runs natively on equal dtypes; mixed cases (a float32 weight or
    running statistic with a half input) run torch on upcast operands, whose
    results are rounded once to pynorm's output dtypes."""
    if all(p is None or np.dtype(p.dtype) == np.dtype(x_dtype) for p in params):
        return None
    return torch.float64 if np.dtype(x_dtype) == F64 else torch.float32


def make_params(C, dtype, affine, seed):
    """(weight, bias) for an affine mode: none, w, wb (x's dtype), wb32 (float32)."""
    rng = np.random.default_rng(seed)
    pdt = F32 if affine == "wb32" else dtype
    w = (1 + 0.5 * rng.standard_normal(C)).astype(pdt) if affine != "none" else None
    b = rng.standard_normal(C).astype(pdt) if affine in ("wb", "wb32") else None
    return w, b


def affine_modes(dtype):
    return ["none", "w", "wb"] + (["wb32"] if dtype != F32 else [])


def stats_scale(x):
    """The scale a mean's error is measured against: the data's magnitude."""
    v = np.abs(np.asarray(x).astype(np.float64))
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size and v.max() > 0 else 1.0


# --------------------------------------------------------------------------
# GroupNorm / InstanceNorm: forward and backward against torch and the reference

GN_CASES = [
    # (shape NCHW, groups)
    ((3, 8), (1, 2, 8)),                  # no spatial axes (S = 1)
    ((5, 6, 1, 1), (1, 3, 6)),            # spatial size 1
    ((1, 32, 7, 7), (1, 2, 32)),          # N = 1, 7x7
    ((3, 64, 32, 32), (1, 32, 64)),       # odd N, 32x32
    ((2, 16, 3, 4, 5), (1, 2, 16)),       # 3-D volume
    ((2, 4, 4100), (1, 2, 4)),            # rows longer than a piece (4096)
    ((3, 1, 9, 9), (1,)),                 # one channel
]
GN_PARAMS = [(shape, G) for shape, groups in GN_CASES for G in groups]


def torch_group_norm(x, G, w, b, layout, dy=None, eps=1e-5):
    """torch's y, mean, rstd (and dx, dweight, dbias when dy is given), as
    NumPy arrays of pynorm's dtypes, NCHW order."""
    cdt = compute_dtype(x.dtype, w, b)
    C = x.shape[1]
    xt = torch_in(x, layout, cdt).requires_grad_(dy is not None)
    gdt = F32 if w is None else w.dtype
    tdt = xt.dtype
    wt = (to_torch(w).to(tdt) if w is not None else torch.ones(C, dtype=tdt)).requires_grad_(dy is not None)
    bt = (to_torch(b).to(tdt) if b is not None else torch.zeros(C, dtype=tdt)).requires_grad_(dy is not None)
    y = F.group_norm(xt, G, wt, bt, eps)
    N = x.shape[0]
    _, mean, rstd = torch.ops.aten.native_group_norm(xt.detach(), None, None, N, C, x.size // (N * C) if x.size else 0,
                                                     G, eps)
    sdt = F64 if x.dtype == F64 else F32
    out = {"y": from_torch(y, x.dtype), "mean": from_torch(mean.reshape(N, G), sdt),
           "rstd": from_torch(rstd.reshape(N, G), sdt)}
    if dy is not None:
        y.backward(torch_in(dy, layout, tdt))
        out.update(dx=from_torch(xt.grad, x.dtype), dweight=from_torch(wt.grad, gdt),
                   dbias=from_torch(bt.grad, gdt))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("shape,G", GN_PARAMS, ids=[f"{sname(s)}-G{g}" for s, g in GN_PARAMS])
def test_group_norm(shape, G, dtype, layout):
    for affine in affine_modes(dtype):
        seed = seed_for("gn", shape, G, dname(dtype), layout, affine)
        x = make_x(shape, dtype, seed)
        dy = make_x(shape, dtype, seed + 1, 0.0, 1.0)
        w, b = make_params(shape[1], dtype, affine, seed + 2)
        what = f"group_norm {sname(shape)} G={G} {dname(dtype)} {layout} {affine}"
        xin, dyin = to_layout(x, layout), to_layout(dy, layout)
        snaps = snapshot(xin, dyin, w, b)

        y, mean, rstd = pynorm.group_norm_forward(xin, G, w, b, layout=layout)
        check_meta(f"{what} y", y, xin.shape, dtype)
        check_meta(f"{what} mean", mean, (shape[0], G), F64 if dtype == F64 else F32)
        check_meta(f"{what} rstd", rstd, (shape[0], G), F64 if dtype == F64 else F32)
        assert_bitwise_equal(pynorm.group_norm(xin, G, w, b, layout=layout), y, f"{what}: group_norm vs _forward")
        dx, dw, db = pynorm.group_norm_backward(dyin, xin, mean, rstd, G, w, layout=layout)
        gdt = F32 if w is None else w.dtype
        check_meta(f"{what} dx", dx, xin.shape, dtype)
        check_meta(f"{what} dweight", dw, (shape[1],), gdt)
        check_meta(f"{what} dbias", db, (shape[1],), gdt)
        assert_unchanged([xin, dyin, w, b], snaps)

        t = torch_group_norm(x, G, w, b, layout, dy)
        ry, rmean, rrstd = RS.group_norm_ref(x, G, w, b)
        rdx, rdw, rdb = RS.group_norm_backward_ref(dy, x, G, w)
        check_accuracy(f"{what} y", from_layout(y, layout), t["y"], ry, dtype)
        check_accuracy(f"{what} mean", mean, t["mean"], rmean, dtype, scale=stats_scale(x))
        check_accuracy(f"{what} rstd", rstd, t["rstd"], rrstd, dtype)
        check_accuracy(f"{what} dx", from_layout(dx, layout), t["dx"], rdx, dtype)
        sw, sb = RS.param_grad_scales(dy, RS.group_norm_ref(x, G)[0])
        check_accuracy(f"{what} dweight", dw, t["dweight"], rdw, gdt, scale=sw)
        check_accuracy(f"{what} dbias", db, t["dbias"], rdb, gdt, scale=sb)


IN_SHAPES = [(2, 5, 9), (1, 7, 7, 7), (3, 16, 32, 32), (2, 3, 3, 4, 5)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("shape", IN_SHAPES, ids=sname)
def test_instance_norm(shape, dtype, layout):
    C = shape[1]
    seed = seed_for("in", shape, dname(dtype), layout)
    x = make_x(shape, dtype, seed)
    w, b = make_params(C, dtype, "wb", seed + 1)
    y = pynorm.instance_norm(to_layout(x, layout), w, b, layout=layout)
    xt = torch_in(x, layout)
    yt = F.instance_norm(xt, weight=to_torch(w), bias=to_torch(b))
    ry, _, _ = RS.instance_norm_ref(x, w, b)
    check_accuracy(f"instance_norm {sname(shape)} {dname(dtype)} {layout}", from_layout(y, layout),
                   from_torch(yt, dtype), ry, dtype)
    # InstanceNorm is GroupNorm with one channel per group: the same bits
    assert_bitwise_equal(y, pynorm.group_norm(to_layout(x, layout), C, w, b, layout=layout), "instance vs group")


# --------------------------------------------------------------------------
# BatchNorm: forward (training and eval) and backward

BN_SHAPES = [(5, 8), (3, 6, 10), (1, 16, 7, 7), (3, 32, 32, 32), (2, 8, 3, 4, 5), (2, 4, 4100), (4, 3, 1, 1),
             (9, 5, 3, 3), (2, 1, 7), (3, 1, 20, 20)]


def torch_batch_norm(x, rm, rv, w, b, training, momentum, layout, dy=None, eps=1e-5):
    """torch's y, updated running stats, saved mean/invstd (training) and
    gradients, as NumPy arrays of pynorm's dtypes (NCHW order)."""
    cdt = compute_dtype(x.dtype, w, b, rm, rv)
    C = x.shape[1]
    xt = torch_in(x, layout, cdt).requires_grad_(dy is not None)
    tdt = xt.dtype
    gdt = F32 if w is None else w.dtype
    wt = (to_torch(w).to(tdt) if w is not None else torch.ones(C, dtype=tdt)).requires_grad_(dy is not None)
    bt = (to_torch(b).to(tdt) if b is not None else torch.zeros(C, dtype=tdt)).requires_grad_(dy is not None)
    rdt = torch.float32 if cdt is None and x.dtype in HALF else tdt   # torch keeps half stats in float32
    rmt = None if rm is None else to_torch(rm).to(rdt if rm.dtype == F32 or cdt else TORCH_DTYPES[rm.dtype])
    rvt = None if rv is None else to_torch(rv).to(rdt if rv.dtype == F32 or cdt else TORCH_DTYPES[rv.dtype])
    y = F.batch_norm(xt, rmt, rvt, wt, bt, training, momentum, eps)
    out = {"y": from_torch(y, x.dtype)}
    if rmt is not None:
        out["running_mean"] = from_torch(rmt, rm.dtype)
    if rvt is not None:
        out["running_var"] = from_torch(rvt, rv.dtype)
    if training:
        _, m, inv = torch.ops.aten.native_batch_norm(xt.detach().to(torch.float64 if x.dtype == F64 else torch.float32),
                                                     None, None, None, None, True, 0.0, eps)
        sdt = F64 if x.dtype == F64 else F32
        out.update(mean=from_torch(m, sdt), rstd=from_torch(inv, sdt))
    if dy is not None:
        y.backward(torch_in(dy, layout, tdt))
        out.update(dx=from_torch(xt.grad, x.dtype), dweight=from_torch(wt.grad, gdt), dbias=from_torch(bt.grad, gdt))
    return out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=sname)
def test_batch_norm(shape, dtype, layout, training):
    C = shape[1]
    for affine in affine_modes(dtype):
        seed = seed_for("bn", shape, dname(dtype), layout, affine, training)
        x = make_x(shape, dtype, seed)
        dy = make_x(shape, dtype, seed + 1, 0.0, 1.0)
        w, b = make_params(C, dtype, affine, seed + 2)
        rng = np.random.default_rng(seed + 3)
        rdt = F32 if affine == "wb32" else dtype
        rm0 = (0.3 * rng.standard_normal(C)).astype(rdt)
        rv0 = (0.5 + rng.random(C)).astype(rdt)
        rm, rv = rm0.copy(), rv0.copy()
        what = f"batch_norm {sname(shape)} {dname(dtype)} {layout} {affine} training={training}"
        xin, dyin = to_layout(x, layout), to_layout(dy, layout)

        y, mean, rstd = pynorm.batch_norm_forward(xin, rm, rv, w, b, training=training, momentum=0.3, layout=layout)
        sdt = F64 if dtype == F64 else F32
        check_meta(f"{what} y", y, xin.shape, dtype)
        check_meta(f"{what} mean", mean, (C,), sdt)
        check_meta(f"{what} rstd", rstd, (C,), sdt)
        dx, dw, db = pynorm.batch_norm_backward(dyin, xin, mean, rstd, w, layout=layout, training=training)
        rm2, rv2 = rm0.copy(), rv0.copy()
        y2 = pynorm.batch_norm(xin, rm2, rv2, w, b, training, 0.3, layout=layout)
        assert_bitwise_equal(y2, y, f"{what}: batch_norm vs _forward")
        assert_bitwise_equal(rm2, rm, f"{what}: running_mean, batch_norm vs _forward")

        t = torch_batch_norm(x, rm0, rv0, w, b, training, 0.3, layout, dy)
        gdt = F32 if w is None else w.dtype
        if training:
            ry, rmean, rrstd, rvar = RS.batch_norm_train_ref(x, w, b)
            n = x.size // C
            rrm, rrv = RS.running_update_ref(rm0, rv0, rmean, rvar, n, 0.3)
            check_accuracy(f"{what} mean", mean, t["mean"], rmean, dtype, scale=stats_scale(x))
            check_accuracy(f"{what} rstd", rstd, t["rstd"], rrstd, dtype)
            check_accuracy(f"{what} running_mean", rm, t["running_mean"], rrm, rdt, scale=stats_scale(x))
            check_accuracy(f"{what} running_var", rv, t["running_var"], rrv, rdt)
        else:
            ry, rmean, rrstd = RS.batch_norm_eval_ref(x, rm0, rv0, w, b)
            assert_bitwise_equal(rm, rm0, f"{what}: eval must not touch running_mean")
            assert_bitwise_equal(rv, rv0, f"{what}: eval must not touch running_var")
            assert np.array_equal(mean, rm0.astype(sdt)), f"{what}: eval mean must be running_mean"
            np.testing.assert_allclose(rstd, rrstd, rtol=4 * eps_of(sdt), err_msg=f"{what}: eval rstd")
        rdx, rdw, rdb = RS.batch_norm_backward_ref(dy, x, w, training=training, running_mean=rm0, running_var=rv0)
        check_accuracy(f"{what} y", from_layout(y, layout), t["y"], ry, dtype)
        check_accuracy(f"{what} dx", from_layout(dx, layout), t["dx"], rdx, dtype)
        xhat = RS.batch_norm_train_ref(x)[0] if training else RS.batch_norm_eval_ref(x, rm0, rv0)[0]
        sw, sb = RS.param_grad_scales(dy, xhat)
        check_accuracy(f"{what} dweight", dw, t["dweight"], rdw, gdt, scale=sw)
        check_accuracy(f"{what} dbias", db, t["dbias"], rdb, gdt, scale=sb)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0, None])
def test_running_stats_sequence(momentum, layout):
    """Several training steps then eval, against torch.nn.BatchNorm2d with the
    same momentum (None: cumulative average over num_batches_tracked)."""
    C = 6
    mod = torch.nn.BatchNorm2d(C, momentum=momentum).double()
    rm, rv = np.zeros(C, F64), np.ones(C, F64)
    for step in range(1, 6):
        x = make_x((3 + step, C, 5, 4), F64, seed_for("seq", momentum, layout, step), loc=step, scale=step)
        xin = to_layout(x, layout)
        mod.train()
        yt = mod(torch_in(x, layout))
        y = pynorm.batch_norm(xin, rm, rv, training=True, momentum=momentum, layout=layout,
                              num_batches_tracked=step if momentum is None else None)
        np.testing.assert_allclose(from_layout(y, layout), yt.detach().numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(rm, mod.running_mean.numpy(), rtol=1e-12, atol=1e-13, err_msg=f"step {step}")
        np.testing.assert_allclose(rv, mod.running_var.numpy(), rtol=1e-12, atol=1e-13, err_msg=f"step {step}")
        assert int(mod.num_batches_tracked) == step
    mod.eval()
    x = make_x((2, C, 3, 3), F64, seed_for("seq-eval", momentum, layout))
    y = pynorm.batch_norm(to_layout(x, layout), rm, rv, training=False, layout=layout)
    np.testing.assert_allclose(from_layout(y, layout), mod(torch_in(x, layout)).detach().numpy(), rtol=1e-10,
                               atol=1e-10)


def test_running_stats_float32_with_half_input_and_strided():
    """Half x with float32 running statistics (torch's mixed mode), given as
    strided views: updated in place through a copy."""
    C = 8
    x = make_x((4, C, 6, 6), BF16, 11)
    rm_base, rv_base = np.zeros(2 * C, F32), np.ones(2 * C, F32)
    rm, rv = rm_base[::2], rv_base[::2]
    pynorm.batch_norm(x, rm, rv, training=True, momentum=0.2)
    rmt, rvt = torch.zeros(C), torch.ones(C)
    F.batch_norm(to_torch(x), rmt, rvt, training=True, momentum=0.2)
    np.testing.assert_allclose(rm, rmt.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, rvt.numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(rm_base[1::2] == 0) and np.all(rv_base[1::2] == 1), "the other elements must be untouched"


def test_batch_norm_training_without_running_stats():
    x = make_x((4, 5, 3), F32, 3)
    y, mean, rstd = pynorm.batch_norm_forward(x, None, None, training=True)
    ry, rmean, rrstd, _ = RS.batch_norm_train_ref(x)
    np.testing.assert_allclose(y, ry, atol=2e-6)
    np.testing.assert_allclose(mean, rmean, atol=2e-6)
    # torch's rules: both running statistics or neither; eps > 0 in training
    with pytest.raises(ValueError, match="both be None"):
        F.batch_norm(to_torch(x), None, torch.ones(5), training=True)
    with pytest.raises(ValueError, match="both be None"):
        pynorm.batch_norm(x, None, np.ones(5, F32), training=True)
    with pytest.raises(ValueError, match="eps"):
        F.batch_norm(to_torch(x), None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        pynorm.batch_norm(x, None, None, training=True, eps=0.0)
    pynorm.batch_norm(x, np.zeros(5, F32), np.ones(5, F32), training=False, eps=0.0)


# --------------------------------------------------------------------------
# strides, out=, accumulate, empty arrays


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_input_and_out(layout):
    x = make_x((3, 8, 10, 12), F32, 5)
    xin = to_layout(x, layout)
    big = np.zeros(xin.shape[:-1] + (2 * xin.shape[-1],), F32)
    big[..., ::2] = xin
    strided = big[..., ::2]
    assert not strided.flags.c_contiguous
    assert_bitwise_equal(pynorm.group_norm(strided, 4, layout=layout), pynorm.group_norm(xin, 4, layout=layout),
                         "strided x")
    out = np.empty_like(xin)
    y = pynorm.group_norm(xin, 4, layout=layout, out=out)
    assert y is out
    assert_bitwise_equal(out, pynorm.group_norm(xin, 4, layout=layout), "out=")
    out = np.empty_like(xin)
    rm, rv = np.zeros(8, F32), np.ones(8, F32)
    assert pynorm.batch_norm(xin, rm, rv, training=False, layout=layout, out=out) is out
    assert pynorm.instance_norm(xin, layout=layout, out=out) is out


@pytest.mark.parametrize("op", ["group", "batch"])
def test_backward_out_and_accumulate(op):
    x, dy = make_x((3, 8, 5, 5), F32, 6), make_x((3, 8, 5, 5), F32, 7)
    w = make_params(8, F32, "w", 8)[0]
    if op == "group":
        _, m, r = pynorm.group_norm_forward(x, 2, w)
        bwd = lambda **kw: pynorm.group_norm_backward(dy, x, m, r, 2, w, **kw)   # noqa: E731
    else:
        _, m, r = pynorm.batch_norm_forward(x, None, None, w, training=True)
        bwd = lambda **kw: pynorm.batch_norm_backward(dy, x, m, r, w, **kw)   # noqa: E731
    ref = bwd()
    out = tuple(np.full_like(a, 0.25) for a in ref)
    got = bwd(out=out)
    assert all(g is o for g, o in zip(got, out))
    for g, e, n in zip(got, ref, ("dx", "dweight", "dbias")):
        assert_bitwise_equal(g, e, f"out= {n}")
    out = tuple(np.full_like(a, 0.25) for a in ref)
    bwd(out=out, accumulate=True)
    for g, e, n in zip(out, ref, ("dx", "dweight", "dbias")):
        np.testing.assert_allclose(g, e + np.float32(0.25), rtol=1e-6, atol=1e-6, err_msg=f"accumulate {n}")


def test_empty_arrays():
    for shape, layout in (((0, 4, 3), "NCHW"), ((2, 4, 0), "NCHW"), ((0, 3, 4), "NHWC")):
        x = np.zeros(shape, F32)
        y, mean, rstd = pynorm.group_norm_forward(x, 2, layout=layout)
        assert y.shape == shape and mean.shape == (shape[0], 2)
        dx, dw, db = pynorm.group_norm_backward(x, x, mean, rstd, 2, layout=layout)
        assert dx.shape == shape and np.all(dw == 0) and np.all(db == 0)
        rm, rv = np.full(4, 0.5, F32), np.full(4, 2.0, F32)
        y = pynorm.batch_norm(x, rm, rv, training=True, layout=layout)
        assert y.shape == shape and np.all(rm == 0.5) and np.all(rv == 2.0), "as torch: running stats untouched"


# --------------------------------------------------------------------------
# numerics: hostile data, huge and tiny magnitudes, NaN/Inf


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["group", "instance", "batch"])
def test_hostile_values(op, layout):
    """mean 1e4, std 1e-2 in float32: torch loses percents; pynorm must stay
    accurate (10x better than torch, and at the float32 noise level)."""
    shape = (4, 32, 16, 16)
    x = make_x(shape, F32, seed_for("hostile", op, layout), loc=1e4, scale=1e-2)
    dy = make_x(shape, F32, seed_for("hostile-dy", op, layout), 0.0, 1.0)
    xin, dyin = to_layout(x, layout), to_layout(dy, layout)
    xt = torch_in(x, layout).requires_grad_()
    if op == "batch":
        y, m, r = pynorm.batch_norm_forward(xin, None, None, training=True, layout=layout)
        dx, _, _ = pynorm.batch_norm_backward(dyin, xin, m, r, layout=layout)
        yt = F.batch_norm(xt, None, None, training=True)
        ry = RS.batch_norm_train_ref(x)[0]
        rdx = RS.batch_norm_backward_ref(dy, x)[0]
    else:
        G = 8 if op == "group" else 32
        y, m, r = pynorm.group_norm_forward(xin, G, layout=layout)
        dx, _, _ = pynorm.group_norm_backward(dyin, xin, m, r, G, layout=layout)
        yt = F.group_norm(xt, G)
        ry = RS.group_norm_ref(x, G)[0]
        rdx = RS.group_norm_backward_ref(dy, x, G)[0]
    yt.backward(torch_in(dy, layout))
    err_p = RS.max_abs_err(from_layout(y, layout), ry)
    err_t = RS.max_abs_err(yt.detach().numpy(), ry)
    assert err_p <= 1e-5 and err_p * 10 <= err_t, f"y: pynorm error {err_p:.3g}, torch {err_t:.3g}"
    # the backward works from the saved float32 mean as torch's does: no less accurate
    check_accuracy(f"hostile {op} {layout} dx", from_layout(dx, layout), xt.grad.numpy(), rdx, F32)


@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (1e4, 1e-2)], ids=["N(0,1)", "N(1e4,1e-2)"])
@pytest.mark.parametrize("offset", [0.0, 3.5, 50.0])
@pytest.mark.parametrize("op", ["group", "batch"])
@pytest.mark.parametrize("shape,layout", [((4, 256, 16, 16), layout) for layout in LAYOUTS]
                         + [((2, 1280, 8, 8), "NHWC"), ((2, 2048, 8, 8), "NHWC")], ids=str)
def test_shift_far_from_the_mean(shape, layout, op, offset, loc, scale):
    """The statistics are taken about a shift, the first value of each set
    (GroupNorm: of a group in a sample; BatchNorm: of a channel). Where that
    value lies `offset` standard deviations from the set's mean, in some sets
    (every third group, every 100th channel), the variance (one pass while the shift is near, a second pass
    about the mean when it is far, for the sets that need it) keeps float32's
    accuracy: saved rstd within 4 ulps of the float64 value, y within 2e-6 of
    its largest magnitude. The wide shapes cut NHWC sets into short pieces
    (16-25 rows), whose shift comes from fewer rows (NCHW has no such pieces;
    its GroupNorm of 64 channels x 64 values at N(1e4,1e-2) is 5 ulps off,
    float32 sums of 4096 squares)."""
    x = make_x(shape, F64, seed_for("far-shift", shape, op, layout, offset, loc), loc=loc, scale=scale)
    N, C = shape[:2]
    G = 32 if op == "group" else C
    if op == "group":
        x[:, ::3 * (C // G), 0, 0] = loc + offset * scale   # the first value of every third group in each sample
    else:
        x[0, ::100, 0, 0] = loc + offset * scale            # of every 100th channel
    x = x.astype(F32)
    if op == "group":
        y, _, rstd = pynorm.group_norm_forward(to_layout(x, layout), G, layout=layout)
        ry, _, rrstd = RS.group_norm_ref(x, G)
    else:
        y, _, rstd = pynorm.batch_norm_forward(to_layout(x, layout), None, None, training=True, layout=layout)
        ry, _, rrstd = RS.batch_norm_train_ref(x)[:3]
    rrstd = np.asarray(rrstd, F64).ravel()
    ulps = np.abs(np.asarray(rstd, F64).ravel() - rrstd) / np.spacing(rrstd.astype(F32)).astype(F64)
    assert ulps.max() <= 4, f"{op} {layout} offset {offset}: saved rstd {ulps.max():.2f} ulps from float64's"
    scale = max(1.0, float(np.abs(ry).max()))   # the outlier's y is about `offset`
    err = RS.max_abs_err(from_layout(y, layout), ry)
    assert err <= 2e-6 * scale, f"{op} {layout} offset {offset}: y error {err:.3g} at |y| up to {scale:.3g}"


FOLD_BOUND = 256.0   # spatial.c's PN_SP_FOLD: |mean| * rstd of the sets whose half-precision y is folded


def fold_test_sets(dtype, n, rng):
    """Sets of n values in `dtype` whose |mean| * rstd lies on both sides of
    FOLD_BOUND and far past it: N(loc, 1) rounded to the dtype (which
    quantizes them near its precision; loc found on a grid for the sets just
    inside and just past the bound), and a constant row with one value in 128
    an ulp lower (std 0.09 ulps: |mean| * rstd 2900 in bfloat16, 23000 in
    float16)."""
    def ratio(v):
        v = v.astype(F64)
        return abs(v.mean()) / np.sqrt(v.var() + 1e-5)

    def near(lo, hi):   # N(loc, 1) in dtype with a ratio in (lo, hi]
        z = rng.standard_normal(n)
        for loc in np.linspace(0.5 * lo, 2 * hi, 2000):
            v = (loc + z).astype(dtype)
            if lo < ratio(v) <= hi:
                return v
        raise AssertionError(f"no set with |mean| * rstd in ({lo}, {hi}]")

    top = 255.0 if dtype == BF16 else 2047.0   # the largest integer with an ulp of 1
    skew = np.full(n, top)
    skew[::128] = top - 1
    sets = [(loc + rng.standard_normal(n)).astype(dtype) for loc in (0.5, 100.0, 1000.0)]
    return sets + [near(0.9 * FOLD_BOUND, FOLD_BOUND), near(FOLD_BOUND, 1.1 * FOLD_BOUND),
                   near(1.5 * FOLD_BOUND, 3 * FOLD_BOUND), near(8 * FOLD_BOUND, 32 * FOLD_BOUND), skew.astype(dtype)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=dname)
@pytest.mark.parametrize("op", ["group", "batch", "batch_eval"])
def test_folded_output_bound(op, dtype, layout):
    """Half-precision y is computed as x * a + (b - mean * a), a = rstd * w
    (one multiply and one add a value), in the sets where |mean| * rstd <=
    FOLD_BOUND, and as ((x - shift) - m) * a + b in the others: the folded
    form's float32 error grows with |mean| * rstd (by at most 2^-24 |w| twice
    that), which the bound keeps under 2^-15 |w|. Sets just inside the bound,
    just past it and far past it: every value of y within half an ulp of the
    float64 value plus 2^-15 of the parameters' magnitude (with a bound 16
    times larger, folded sets past 256 broke that by up to 6x). BatchNorm in
    eval mode folds its channels by the same rule, here with the batch's own
    statistics as running statistics."""
    rng = np.random.default_rng(seed_for("fold-bound", op, dname(dtype), layout))
    nsets, N, S = 8, 2, 256
    if op == "group":   # 8 groups of 4 channels; set k of each sample from fold_test_sets
        C = 4 * nsets
        x = np.empty((N, C, S), dtype)
        for n in range(N):
            for k, v in enumerate(fold_test_sets(dtype, 4 * S, rng)):
                x[n, 4 * k:4 * k + 4] = rng.permutation(v).reshape(4, S)
    else:               # a channel per set
        C = nsets
        x = np.empty((N, C, S), dtype)
        for k, v in enumerate(fold_test_sets(dtype, N * S, rng)):
            x[:, k] = rng.permutation(v).reshape(N, S)
    x = x.reshape(N, C, 16, 16)
    w, b = make_params(C, dtype, "wb", seed_for("fold-bound-params", op))
    if op == "group":
        y = pynorm.group_norm_forward(to_layout(x, layout), nsets, w, b, layout=layout)[0]
        ry, mean, rstd = RS.group_norm_ref(x, nsets, w, b)
    elif op == "batch":
        y = pynorm.batch_norm_forward(to_layout(x, layout), None, None, w, b, training=True, layout=layout)[0]
        ry, mean, rstd = RS.batch_norm_train_ref(x, w, b)[:3]
    else:
        _, rm, _, rv = RS.batch_norm_train_ref(x)
        rm, rv = rm.astype(F32), rv.astype(F32)
        y = pynorm.batch_norm_forward(to_layout(x, layout), rm, rv, w, b, training=False, layout=layout)[0]
        ry, mean, rstd = RS.batch_norm_eval_ref(x, rm, rv, w, b)
    ratio = np.abs(np.asarray(mean, F64)) * np.asarray(rstd, F64)
    assert ratio.min() < FOLD_BOUND / 2 and ratio.max() > 8 * FOLD_BOUND, f"set ratios {np.sort(ratio.ravel())}"
    assert ((ratio > 0.9 * FOLD_BOUND) & (ratio <= FOLD_BOUND)).any(), f"none just inside: {np.sort(ratio.ravel())}"
    assert ((ratio > FOLD_BOUND) & (ratio <= 1.1 * FOLD_BOUND)).any(), f"none just past: {np.sort(ratio.ravel())}"
    got = from_layout(y, layout).astype(F64)
    bits = 8 if dtype == BF16 else 11   # significand bits: an ulp of v is 2^(24 - bits) float32 ulps
    half_ulp = 0.5 * np.spacing(np.abs(ry).astype(F32)).astype(F64) * 2.0 ** (24 - bits)
    budget = 2.0 ** -15 * max(np.abs(w.astype(F64)).max(), np.abs(b.astype(F64)).max())
    excess = np.abs(got - ry) - half_ulp
    k = np.unravel_index(int(np.argmax(excess)), excess.shape)
    set_ratio = ratio[k[0], k[1] // 4] if op == "group" else ratio[k[1]]
    assert excess[k] <= budget, (f"{op} {layout}: y[{k}] = {got[k]!r}, float64 {ry[k]!r}: {excess[k]:.3g} past half "
                                 f"an ulp (budget {budget:.3g}); its set's |mean| * rstd {set_ratio:.4g}")


@pytest.mark.parametrize("scale", [1e-15, 1e15])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_huge_and_tiny_magnitudes(scale, layout):
    """float32 values far from 1 (their squares still in range), eps negligible."""
    x = make_x((3, 8, 6, 6), F32, seed_for("mag", scale, layout), loc=0.5 * scale, scale=2 * scale)
    xin = to_layout(x, layout)
    for G in (2, 8):
        y = pynorm.group_norm(xin, G, layout=layout, eps=0.0)
        yt = F.group_norm(torch_in(x, layout), G, eps=0.0)
        ry = RS.group_norm_ref(x, G, eps=0.0)[0]
        check_accuracy(f"group_norm scale {scale} G={G}", from_layout(y, layout), from_torch(yt), ry, F32)
        assert RS.max_abs_err(from_layout(y, layout), ry) < 1e-5
    y = pynorm.batch_norm(xin, None, None, training=True, eps=1e-300, layout=layout)
    yt = F.batch_norm(torch_in(x, layout), None, None, training=True, eps=1e-300)
    ry = RS.batch_norm_train_ref(x, eps=1e-300)[0]
    check_accuracy(f"batch_norm scale {scale}", from_layout(y, layout), from_torch(yt), ry, F32)
    assert RS.max_abs_err(from_layout(y, layout), ry) < 1e-5


def _saved_mean_cases():
    """GroupNorm cases (N, C, S, G) with 1 to 4096 channels per group: the
    edges of the group sums' lanes and of the pieces, then random groups drawn
    from a fixed seed (channels per group log-uniform, spatial sizes from 1,
    where a piece holds every row of a sample, to a few hundred)."""
    cases = [(2, 1, 300, 1), (3, 31, 5, 1), (2, 64, 3, 2), (2, 99, 4, 3), (1, 4096, 1, 1), (2, 4096, 9, 1),
             (8, 3000, 2, 1), (16, 768, 2, 2), (2, 512, 100, 2)]
    rng = np.random.default_rng(seed_for("saved-mean-cases"))
    for _ in range(10):
        cg = int(np.exp(rng.uniform(0, np.log(4096))))
        G = int(rng.integers(1, 4))
        S = int(rng.choice([1, 2, 3, 5, 8, 16, 49, 300]))
        N = int(rng.integers(1, 5))
        while N * cg * G * S > 1 << 17 and S > 1:
            S //= 2
        cases.append((N, cg * G, S, G))
    return cases


SAVED_MEAN_CASES = _saved_mean_cases()
SAVED_MEAN_DISTS = [(1.5, 0.3), (-40.0, 4.0), (1e4, 1.0)]   # mean, std: the sets' means far from 0


def _mean_ref(x, axes):
    """The exact float64 mean over `axes` of x (math.fsum, then one division)."""
    import math
    v = np.moveaxis(np.asarray(x).astype(F64), axes, tuple(range(-len(axes), 0)))
    flat = v.reshape(v.shape[:v.ndim - len(axes)] + (-1,))
    out = np.array([math.fsum(r) for r in flat.reshape(-1, flat.shape[-1])]) / flat.shape[-1]
    return out.reshape(flat.shape[:-1])


def check_saved_mean(what, mean, ref, dtype):
    """The saved mean within 2 ulps of its own magnitude in its dtype (float32,
    or float64 for float64 input) of the exact mean."""
    sdt = F64 if dtype == F64 else F32
    mean = np.asarray(mean).astype(F64)
    ulps = np.abs(mean - ref) / np.spacing(np.abs(ref).astype(sdt)).astype(F64)
    k = int(np.argmax(ulps))
    assert ulps[k] <= 2, (f"{what}: saved mean {ulps[k]:.2f} ulps from the exact mean "
                          f"(set {k}: {mean[k]!r} vs {ref[k]!r})")


@pytest.mark.parametrize("dist", SAVED_MEAN_DISTS, ids=lambda d: f"N({d[0]:g},{d[1]:g})")
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("N,C,S,G", SAVED_MEAN_CASES,
                         ids=[f"{n}x{c}x{s}-Cg{c // g}" for n, c, s, g in SAVED_MEAN_CASES])
def test_group_norm_saved_mean_accurate(N, C, S, G, dtype, dist):
    """GroupNorm's (and so InstanceNorm's) saved mean is the exact mean of its
    set, rounded, within 2 ulps in both layouts, for any number of channels per
    group: the sums of a set's pieces and channels lose nothing that shows."""
    x = make_x((N, C, S), dtype, seed_for("saved-mean", N, C, S, G, dname(dtype), dist), *dist)
    ref = _mean_ref(x.reshape(N, G, C // G, S), (2, 3))
    for layout in LAYOUTS:
        _, mean, _ = pynorm.group_norm_forward(to_layout(x, layout), G, layout=layout)
        check_saved_mean(f"group_norm {N}x{C}x{S} G={G} {dname(dtype)} {layout}", mean.ravel(), ref.ravel(), dtype)


BN_MEAN_SHAPES = [(4096, 8, 1), (2048, 16, 2), (1024, 4, 5), (512, 32, 8), (64, 8, 300), (3, 4, 9000)]


@pytest.mark.parametrize("dist", SAVED_MEAN_DISTS, ids=lambda d: f"N({d[0]:g},{d[1]:g})")
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("shape", BN_MEAN_SHAPES, ids=sname)
def test_batch_norm_saved_mean_accurate(shape, dtype, dist):
    """BatchNorm's saved batch mean, the same property: its channels' sets are
    many short rows (NCHW) or many pieces of rows (NHWC)."""
    x = make_x(shape, dtype, seed_for("bn-saved-mean", shape, dname(dtype), dist), *dist)
    ref = _mean_ref(x, (0, 2))
    for layout in LAYOUTS:
        _, mean, _ = pynorm.batch_norm_forward(to_layout(x, layout), None, None, training=True, layout=layout)
        check_saved_mean(f"batch_norm {sname(shape)} {dname(dtype)} {layout}", mean, ref, dtype)


def _bf16_round_reference(f):
    """float32 -> bfloat16 bits: round half to even on the dropped 16 bits
    (overflow carries into Inf); a NaN keeps the top half of its payload, quieted."""
    u = f.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    quiet = (u >> 16) | 0x40
    return np.where((u & 0x7FFFFFFF) > 0x7F800000, quiet, rounded).astype(np.uint16)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_output_rounding(layout):
    """The output is rounded to bfloat16 as the reference rounding does, bit for
    bit, in every run of channels: ties both ways, values that round up into the
    next binade or to Inf, subnormals, and NaNs with payloads next to finite
    values (a run with a NaN and a run without take different code). Here y is
    the float32 bias itself: x is zero and the weight zero."""
    edge = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x3FFFFFFF, 0x7F7FFFFF, 0x7F7F8000,
                     0x7F7F7FFF, 0x00008000, 0x00018000, 0x007FFFFF, 0x80000001, 0xBF808000, 0x7F800000,
                     0xFF800000, 0x7F800001, 0xFFC0FFFF, 0x7FBFFFFF], np.uint32)
    rng = np.random.default_rng(seed_for("bf16 rounding", layout))
    C = 256   # whole runs of channels, and a tail, at every vector width
    bits = rng.integers(0, 2**32, C, dtype=np.uint64).astype(np.uint32)
    bits[:: 7][: edge.size] = edge            # spread over the runs
    bits[200:232] = rng.integers(0x3F000000, 0x40000000, 32).astype(np.uint32)   # a run without NaN
    bits[(bits & 0x7FFFFFFF) == 0] = 0x3F800000   # -0 + 0 is +0: not a rounding case
    b = bits.view(F32)
    w = np.zeros(C, F32)
    x = to_layout(np.zeros((2, C, 3, 1), BF16), layout)
    y = np.asarray(pynorm.group_norm(x, 8, w, b, layout=layout))
    got = y.view(np.uint16)
    got = (got if layout == "NHWC" else got.transpose(0, 2, 3, 1)).reshape(2, 3, C)
    want = _bf16_round_reference(b)
    for n in range(2):
        for s in range(3):
            bad = np.nonzero(got[n, s] != want)[0]
            assert bad.size == 0, (f"channel {bad[0]}: float32 bits {bits[bad[0]]:#010x} rounded to "
                                   f"{got[n, s][bad[0]]:#06x}, expected {want[bad[0]]:#06x}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dname)
def test_nan_inf_propagate_as_torch(dtype, layout):
    shape = (3, 8, 5, 5)
    x = make_x(shape, F32, seed_for("nan", dname(dtype), layout))
    x[0, 1, 2, 3] = np.nan
    x[1, 6, 0, 0] = np.inf
    x[2, 3, 4, 4] = -np.inf
    x = x.astype(dtype)
    xin = to_layout(x, layout)
    y = pynorm.group_norm(xin, 4, layout=layout)
    yt = from_torch(F.group_norm(torch_in(x, layout), 4))
    np.testing.assert_array_equal(np.isnan(from_layout(y, layout).astype(F32)), np.isnan(yt.astype(F32)),
                                  err_msg="group_norm NaN pattern")
    y = pynorm.batch_norm(xin, None, None, training=True, layout=layout)
    yt = from_torch(F.batch_norm(torch_in(x, layout), None, None, training=True))
    np.testing.assert_array_equal(np.isnan(from_layout(y, layout).astype(F32)), np.isnan(yt.astype(F32)),
                                  err_msg="batch_norm NaN pattern")
    # the other channels are unaffected: they match torch
    ok = ~np.isnan(yt.astype(F32))
    assert ok.any()
    np.testing.assert_allclose(from_layout(y, layout).astype(F32)[ok], yt.astype(F32)[ok], atol=3 * eps_of(dtype) * 4)


# --------------------------------------------------------------------------
# determinism: thread counts and instruction sets


def _det_cases():
    """(name, x, dy) covering both schedules: with 1-3 threads some run set-local,
    others phase by phase; every result must be the same bits. The last two:
    groups of 128 channels over two pieces of rows (NHWC), and BatchNorm's
    channels of many 3-value rows (NCHW)."""
    cases = []
    for dtype in (F32, BF16, F64):
        for shape, layout in (((2, 32, 48, 48), "NCHW"), ((6, 8, 40, 40), "NCHW"), ((3, 16, 40, 40), "NHWC"),
                              ((12, 8, 20, 20), "NHWC"), ((64, 300), "NCHW"), ((2, 4, 9000), "NCHW"),
                              ((2, 512, 6, 6), "NHWC"), ((512, 8, 3), "NCHW")):
            seed = seed_for("det", shape, layout, dname(dtype))
            x = to_layout(make_x(shape, dtype, seed), layout)
            dy = to_layout(make_x(shape, dtype, seed + 1, 0.0, 1.0), layout)
            cases.append((f"{sname(shape)}-{layout}-{dname(dtype)}", x, dy, layout))
    return cases


def _det_compute(x, dy, layout):
    C = x.shape[1] if layout == "NCHW" else x.shape[-1]
    w = np.linspace(0.5, 1.5, C).astype(x.dtype)
    b = np.linspace(-1, 1, C).astype(x.dtype)
    out = {}
    G = 4
    y, m, r = pynorm.group_norm_forward(x, G, w, b, layout=layout)
    out.update({"gn.y": y, "gn.m": m, "gn.r": r})
    out.update(zip(("gn.dx", "gn.dw", "gn.db"), pynorm.group_norm_backward(dy, x, m, r, G, w, layout=layout)))
    rm, rv = np.zeros(C, F32), np.ones(C, F32)
    y, m, r = pynorm.batch_norm_forward(x, rm, rv, w, b, training=True, layout=layout)
    out.update({"bn.y": y, "bn.m": m, "bn.r": r, "bn.rm": rm, "bn.rv": rv})
    out.update(zip(("bn.dx", "bn.dw", "bn.db"), pynorm.batch_norm_backward(dy, x, m, r, w, layout=layout)))
    out["bn.eval"] = pynorm.batch_norm(x, rm, rv, w, b, layout=layout)
    return out


def test_thread_counts_bit_identical():
    for name, x, dy, layout in _det_cases():
        results = {}
        for n in (1, 2, 3):
            pynorm.set_num_threads(n)
            results[n] = _det_compute(x, dy, layout)
        for n in (2, 3):
            for k in results[1]:
                assert_bitwise_equal(results[n][k], results[1][k], f"{name} {k}: {n} threads vs 1")
        again = _det_compute(x, dy, layout)
        for k in again:
            assert_bitwise_equal(again[k], results[1][k], f"{name} {k}: repeated call")


_ISA_SRC = textwrap.dedent('''
    import sys, numpy as np, ml_dtypes, pynorm
    sys.path.insert(0, sys.argv[1])
    import test_spatial as T
    res = {}
    for name, x, dy, layout in T._det_cases():
        for k, v in T._det_compute(x, dy, layout).items():
            v = np.asarray(v)
            res[name + "/" + k] = v.view(np.uint16) if v.dtype == np.dtype(ml_dtypes.bfloat16) else v
    res["__isa__"] = np.array(pynorm.isa())
    np.savez(sys.argv[2], **res)
''')


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_isa_bit_identical(isa, tmp_path, pynorm_env):
    """PYNORM_ISA=generic/avx2 give the bits of the default ISA."""
    if isa == pynorm.isa() or (isa == "avx2" and pynorm.isa() == "generic"):
        pytest.skip(f"the default ISA is already {pynorm.isa()}")
    here = os.path.dirname(os.path.abspath(__file__))
    outs = {}
    for tag, env_isa in (("default", None), (isa, isa)):
        env = dict(pynorm_env)
        env.pop("PYNORM_ISA", None)
        if env_isa:
            env["PYNORM_ISA"] = env_isa
        path = tmp_path / f"{tag}.npz"
        subprocess.run([sys.executable, "-c", _ISA_SRC, here, str(path)], env=env, check=True, cwd=here)
        with np.load(path) as f:
            outs[tag] = {k: f[k] for k in f.files}
    assert str(outs[isa]["__isa__"]) == isa
    for k, v in outs["default"].items():
        if k != "__isa__":
            assert_bitwise_equal(outs[isa][k], v, f"{k}: {isa} vs default")


# --------------------------------------------------------------------------
# bad input: the right exception, naming the argument, and nothing written


def _gn_args():
    return make_x((2, 8, 3, 3), F32, 1), np.ones(8, F32), np.zeros(8, F32)


@pytest.mark.parametrize("num_groups,exc", [(3, ValueError), (0, ValueError), (-2, ValueError), (16, ValueError),
                                            (2.0, TypeError), (True, TypeError), (None, TypeError)])
def test_bad_num_groups(num_groups, exc):
    x, w, b = _gn_args()
    with pytest.raises(exc, match="num_groups"):
        pynorm.group_norm(x, num_groups, w, b)
    _, m, r = pynorm.group_norm_forward(x, 2)
    with pytest.raises(exc, match="num_groups"):
        pynorm.group_norm_backward(x, x, m, r, num_groups)


@pytest.mark.parametrize("layout,exc", [("nchw", ValueError), ("NCW", ValueError), ("", ValueError),
                                        (None, TypeError), (1, TypeError)])
def test_bad_layout(layout, exc):
    x, w, b = _gn_args()
    for call in (lambda: pynorm.group_norm(x, 2, layout=layout),
                 lambda: pynorm.instance_norm(x, layout=layout),
                 lambda: pynorm.batch_norm(x, None, None, training=True, layout=layout),
                 lambda: pynorm.batch_norm_backward(x, x, np.zeros(8, F32), np.ones(8, F32), layout=layout)):
        with pytest.raises(exc, match="layout"):
            call()


def test_bad_x():
    with pytest.raises(TypeError, match="x"):
        pynorm.group_norm([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="x"):
        pynorm.group_norm(np.ones((2, 4), np.int32), 1)
    with pytest.raises(ValueError, match="x"):
        pynorm.group_norm(np.ones(4, F32), 1)
    with pytest.raises(ValueError, match="x"):
        pynorm.batch_norm(np.ones((2, 0, 3), F32), None, None, training=True)
    # an object with a CUDA array interface goes to the CUDA path: where that
    # path is missing it says so; where it exists, an empty interface is a TypeError
    class FakeCuda:
        __cuda_array_interface__ = {}
    with pytest.raises((NotImplementedError, TypeError), match="CUDA|cuda_array_interface"):
        pynorm.group_norm(FakeCuda(), 1)


def test_bad_params():
    x, w, b = _gn_args()
    with pytest.raises(ValueError, match="weight"):
        pynorm.group_norm(x, 2, np.ones(7, F32))
    with pytest.raises(TypeError, match="weight"):
        pynorm.group_norm(x, 2, np.ones(8, F64))
    with pytest.raises(TypeError, match="bias"):
        pynorm.batch_norm(x, None, None, w, [0.0] * 8, training=True)
    with pytest.raises(ValueError, match="eps"):
        pynorm.group_norm(x, 2, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        pynorm.batch_norm(x, None, None, training=True, eps=float("nan"))
    with pytest.raises(TypeError, match="eps"):
        pynorm.group_norm(x, 2, eps=None)
    # NHWC: the channel axis is the last one
    with pytest.raises(ValueError, match="weight"):
        pynorm.group_norm(x, 1, w, layout="NHWC")


def test_bad_running_stats():
    x = make_x((2, 8, 3, 3), F32, 2)
    good = np.zeros(8, F32)
    cases = [
        (dict(running_mean=np.zeros(7, F32), running_var=np.ones(8, F32)), ValueError, "running_mean"),
        (dict(running_mean=np.zeros(8, F32), running_var=np.ones((8, 1), F32)), ValueError, "running_var"),
        (dict(running_mean=np.zeros(8, F64), running_var=np.ones(8, F32)), TypeError, "running_mean"),
        (dict(running_mean=np.zeros(8, np.int64), running_var=np.ones(8, F32)), TypeError, "running_mean"),
        (dict(running_mean=[0.0] * 8, running_var=np.ones(8, F32)), TypeError, "running_mean"),
        (dict(running_mean=good, running_var=good), ValueError, "running_mean overlaps"),
    ]
    for kw, exc, match in cases:
        for training in (True, False):
            with pytest.raises(exc, match=match):
                pynorm.batch_norm(x, kw["running_mean"], kw["running_var"], training=training)
    xh = x.astype(F16)
    with pytest.raises(TypeError, match="same dtype"):
        pynorm.batch_norm(xh, np.zeros(8, F16), np.ones(8, F32), training=True)
    with pytest.raises(ValueError, match="running_mean"):
        pynorm.batch_norm(x, None, np.ones(8, F32), training=False)
    with pytest.raises(ValueError, match="running_var"):
        pynorm.batch_norm_forward(x, np.zeros(8, F32), None, training=False)
    ro = np.zeros(8, F32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        pynorm.batch_norm(x, ro, np.ones(8, F32), training=True)
    pynorm.batch_norm(x, ro, np.ones(8, F32), training=False)   # eval only reads them


def test_bad_momentum():
    x = make_x((2, 8, 3, 3), F32, 3)
    rm, rv = np.zeros(8, F32), np.ones(8, F32)
    snaps = snapshot(rm, rv)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        pynorm.batch_norm(x, rm, rv, training=True, momentum=None)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        pynorm.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=0)
    with pytest.raises(ValueError, match="momentum"):
        pynorm.batch_norm(x, rm, rv, training=True, momentum=float("inf"))
    with pytest.raises(TypeError, match="momentum"):
        pynorm.batch_norm(x, rm, rv, training=True, momentum="0.1")
    assert_unchanged([rm, rv], snaps, "running statistics")
    # momentum=None needs no count when nothing is updated
    pynorm.batch_norm(x, None, None, training=True, momentum=None)
    pynorm.batch_norm(x, rm, rv, training=False, momentum=None)


def test_one_value_per_channel_in_training():
    """torch refuses statistics over one value (its exact rules)."""
    rm, rv = np.zeros(4, F32), np.ones(4, F32)
    snaps = snapshot(rm, rv)
    for shape, layout in (((1, 4), "NCHW"), ((1, 4, 1, 1), "NCHW"), ((1, 1, 1, 4), "NHWC"), ((1, 4, 1), "NCHW")):
        x = np.ones(shape, F32)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            pynorm.batch_norm(x, rm, rv, training=True, layout=layout)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            pynorm.batch_norm_forward(x, rm, rv, training=True, layout=layout)
        pynorm.batch_norm(x, rm, rv, training=False, layout=layout)   # eval is fine
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            F.batch_norm(to_torch(RS.from_nhwc(x) if layout == "NHWC" else x), torch.zeros(4), torch.ones(4),
                         training=True)
    assert_unchanged([rm, rv], snaps, "running statistics")
    # GroupNorm: torch refuses N * C/G * spatial == 1; InstanceNorm a spatial size of 1
    with pytest.raises(ValueError, match="more than 1 value"):
        pynorm.group_norm(np.ones((1, 4), F32), 4)
    pynorm.group_norm(np.ones((2, 4), F32), 4)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        pynorm.instance_norm(np.ones((3, 4, 1), F32))


def test_bad_backward_args():
    x = make_x((2, 8, 3, 3), F32, 4)
    _, m, r = pynorm.group_norm_forward(x, 2)
    with pytest.raises(ValueError, match="mean"):
        pynorm.group_norm_backward(x, x, m[:, :1], r, 2)
    with pytest.raises(TypeError, match="rstd"):
        pynorm.group_norm_backward(x, x, m, r.astype(F64), 2)
    with pytest.raises(ValueError, match="dy"):
        pynorm.group_norm_backward(x[:1], x, m, r, 2)
    with pytest.raises(TypeError, match="dy"):
        pynorm.group_norm_backward(x.astype(F64), x, m, r, 2)
    _, bm, br = pynorm.batch_norm_forward(x, None, None, training=True)
    with pytest.raises(ValueError, match="mean"):
        pynorm.batch_norm_backward(x, x, np.zeros(7, F32), br)
    with pytest.raises(ValueError, match="accumulate"):
        pynorm.batch_norm_backward(x, x, bm, br, accumulate=True)
    with pytest.raises(TypeError, match="out"):
        pynorm.batch_norm_backward(x, x, bm, br, out=[None, None, None])
    dx = np.empty_like(x)
    with pytest.raises(ValueError, match="dy"):
        pynorm.batch_norm_backward(dx, x, bm, br, out=(dx, None, None))   # out overlapping an input


def test_bad_out():
    x, w, b = _gn_args()
    with pytest.raises(ValueError, match="out"):
        pynorm.group_norm(x, 2, out=np.empty((2, 8, 3), F32))
    with pytest.raises(TypeError, match="out"):
        pynorm.group_norm(x, 2, out=np.empty_like(x, dtype=F64))
    with pytest.raises(ValueError, match="out"):
        pynorm.group_norm(x, 2, out=x)
    # any strides are accepted (written through a temporary), nothing outside the view
    wide = np.zeros((2, 8, 3, 6), F32)
    pynorm.batch_norm(x, None, None, training=True, out=wide[..., ::2])
    np.testing.assert_array_equal(wide[..., ::2], pynorm.batch_norm(x, None, None, training=True))
    assert not wide[..., 1::2].any()


def test_no_partial_writes_on_error():
    """A call refused by the Python checks leaves every output untouched."""
    x = make_x((2, 8, 3, 3), F32, 9)
    rm, rv = np.full(8, 0.5, F32), np.full(8, 2.0, F32)
    out = np.full_like(x, 7.0)
    snaps = snapshot(rm, rv, out)
    with pytest.raises(ValueError):
        pynorm.batch_norm(x, rm, rv, np.ones(8, F32), np.zeros(3, F32), training=True, out=out)
    with pytest.raises(TypeError):
        pynorm.batch_norm(x, rm, rv, training=True, momentum=[0.1], out=out)
    with pytest.raises(ValueError):
        pynorm.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=1.5, out=out)
    with pytest.raises(ValueError):
        pynorm.group_norm(x, 3, out=out)
    assert_unchanged([rm, rv, out], snaps, "outputs")
