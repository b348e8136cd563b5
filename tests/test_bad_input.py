"""Bad input: every case raises TypeError (wrong type or dtype) or ValueError
(wrong shape or value, aliasing, unusable out=), with a message naming the
argument, and writes nothing: out= buffers and inputs keep their bytes.

Also the edge shapes that are *not* errors: zero rows behave like torch (empty
results; zero weight gradients); C = 0 is a ValueError.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pynorm
from conftest import (
    BF16,
    BWD_OPS,
    F16,
    F32,
    F64,
    FUSED_OPS,
    FWD_OPS,
    assert_bitwise_equal,
    dname,
    from_torch,
    is_ln,
    snapshot,
    assert_unchanged,
    to_torch,
    wgrad_dtype,
)

R_, C_ = 4, 6  # rows and channels of the default inputs
OUT_OPS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
LN_FWD = ["layer_norm", "add_layer_norm", "layer_norm_forward"]
ALL_OPS = FWD_OPS + BWD_OPS
SENTINEL = 1234.5


def _rng():
    return np.random.default_rng(12345)


def arg(name):
    """A regex matching the argument's name as a word (so 'x' is not found in
    'expected', nor 'weight' in 'dweight')."""
    return rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])"


def good_args(op, dtype=F32, R=R_, C=C_):
    """Valid arguments for op, as a dict of the API's argument names."""
    rng = _rng()
    x = rng.standard_normal((R, C)).astype(dtype)
    a = {"x": x}
    if op in FUSED_OPS:
        a["residual"] = rng.standard_normal((R, C)).astype(dtype)
    if op in BWD_OPS:
        a["dy"] = rng.standard_normal((R, C)).astype(dtype)
        if is_ln(op):
            _, a["mean"], a["rstd"] = pynorm.layer_norm_forward(x)
        else:
            _, a["rstd"] = pynorm.rms_norm_forward(x)
    a["weight"] = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
    if is_ln(op) and op not in BWD_OPS:
        a["bias"] = rng.standard_normal(C).astype(dtype)
    return a


def out_buffers(op, a):
    """Valid out= buffers for op, filled with a sentinel."""
    x = a["x"]
    C = x.shape[-1]
    if op in BWD_OPS:
        gdt = wgrad_dtype(x.dtype, a.get("weight"))
        bufs = [np.full(x.shape, SENTINEL, x.dtype), np.full((C,), SENTINEL, gdt)]
        if is_ln(op):
            bufs.append(np.full((C,), SENTINEL, gdt))
        return tuple(bufs)
    if op in FUSED_OPS:
        return (np.full(x.shape, SENTINEL, x.dtype), np.full(x.shape, SENTINEL, x.dtype))
    return np.full(x.shape, SENTINEL, x.dtype)


def invoke(op, a):
    a = dict(a)
    fn = getattr(pynorm, op)
    if op in BWD_OPS:
        pos = [a.pop("dy"), a.pop("x")] + ([a.pop("mean")] if is_ln(op) else []) + [a.pop("rstd")]
    elif op in FUSED_OPS:
        pos = [a.pop("x"), a.pop("residual")]
    else:
        pos = [a.pop("x")]
    return fn(*pos, **a)


def _arrays_in(a):
    found = []
    for v in a.values():
        for item in (v if isinstance(v, tuple) else (v,)):
            if isinstance(item, np.ndarray) and not any(item is f for f in found):
                found.append(item)
    return found


# --------------------------------------------------------------------------
# the cases: name -> (ops it applies to, builder(op) -> (args, exception, regex))

CASES = {}


def case(name, ops):
    def register(builder):
        CASES[name] = (ops, builder)
        return builder

    return register


def _with(op, dtype=F32, **changes):
    a = good_args(op, dtype)
    a.update(changes)
    return a


# weight / bias

@case("weight_wrong_length", ALL_OPS)
def _(op):
    return _with(op, weight=np.ones(C_ + 1, F32)), ValueError, arg("weight")


@case("weight_2d", ALL_OPS)
def _(op):
    return _with(op, weight=np.ones((1, C_), F32)), ValueError, arg("weight")


@case("weight_0d", ALL_OPS)
def _(op):
    return _with(op, weight=np.array(1.0, F32)), ValueError, arg("weight")


@case("weight_f64_for_f32_x", ALL_OPS)
def _(op):
    return _with(op, weight=np.ones(C_, F64)), TypeError, arg("weight")


@case("weight_f16_for_bf16_x", ALL_OPS)
def _(op):
    return _with(op, BF16, weight=np.ones(C_, F16)), TypeError, arg("weight")


@case("weight_f64_for_f16_x", ALL_OPS)
def _(op):
    return _with(op, F16, weight=np.ones(C_, F64)), TypeError, arg("weight")


@case("weight_bf16_for_f64_x", ALL_OPS)
def _(op):
    return _with(op, F64, weight=np.ones(C_, BF16)), TypeError, arg("weight")


@case("weight_int", ALL_OPS)
def _(op):
    return _with(op, weight=np.ones(C_, np.int32)), TypeError, arg("weight")


@case("weight_list", ALL_OPS)
def _(op):
    return _with(op, weight=[1.0] * C_), TypeError, arg("weight")


@case("bias_wrong_length", LN_FWD)
def _(op):
    return _with(op, bias=np.zeros(C_ + 1, F32)), ValueError, arg("bias")


@case("bias_wrong_length_without_weight", LN_FWD)
def _(op):
    return _with(op, weight=None, bias=np.zeros((2, C_), F32)), ValueError, arg("bias")


@case("bias_f64_for_f32_x", LN_FWD)
def _(op):
    return _with(op, bias=np.zeros(C_, F64)), TypeError, arg("bias")


@case("weight_and_bias_dtypes_differ", LN_FWD)
def _(op):  # both allowed alone (x's dtype, float32), but the C API takes one weight dtype
    return _with(op, F16, weight=np.ones(C_, F16), bias=np.zeros(C_, F32)), TypeError, rf"{arg('weight')}|{arg('bias')}"


# x

for _name, _x, _exc in [
    ("x_int32", np.ones((R_, C_), np.int32), TypeError),
    ("x_int64", np.ones((R_, C_), np.int64), TypeError),
    ("x_bool", np.ones((R_, C_), bool), TypeError),
    ("x_complex64", np.ones((R_, C_), np.complex64), TypeError),
    ("x_object", np.ones((R_, C_), object), TypeError),
    ("x_longdouble", np.ones((R_, C_), np.longdouble), TypeError),
    ("x_list", [[1.0] * C_] * R_, TypeError),
    ("x_tuple", tuple([1.0] * C_), TypeError),
    ("x_python_float", 1.0, TypeError),
    ("x_numpy_scalar", np.float32(1.0), TypeError),
    ("x_torch_cpu_tensor", "torch", TypeError),
    ("x_0d", np.array(1.0, F32), ValueError),
    ("x_C0", np.ones((R_, 0), F32), ValueError),
    ("x_C0_zero_rows", np.ones((0, 0), F32), ValueError),
]:
    def _make(_x=_x, _exc=_exc):
        def builder(op):
            x = torch.ones(R_, C_) if isinstance(_x, str) else _x
            # every other argument stays valid, so that x is the culprit whatever
            # order the arguments are checked in
            a = _with(op, x=x)
            return a, _exc, arg("x")
        return builder
    case(_name, ALL_OPS)(_make())


# eps

for _name, _eps, _exc in [
    ("eps_negative", -1e-5, ValueError),
    ("eps_nan", float("nan"), ValueError),
    ("eps_inf", float("inf"), ValueError),
    ("eps_string", "1e-5", TypeError),
]:
    def _make(_eps=_eps, _exc=_exc):
        return lambda op: (_with(op, eps=_eps), _exc, arg("eps"))
    case(_name, FWD_OPS)(_make())


# out= (forward)

def _with_out(op, **changes):
    a = good_args(op)
    a["out"] = out_buffers(op, a)
    a.update(changes)
    return a


def _replace_out(op, a, first):
    return (first, a["out"][1]) if op in FUSED_OPS else first


# out=x itself is in place (allowed, tests/test_inference.py); the same memory seen
# through other strides is an overlap
@case("out_is_x_reversed", OUT_OPS)
def _(op):
    a = _with_out(op)
    a["out"] = _replace_out(op, a, a["x"][::-1])
    return a, ValueError, arg("out")


@case("out_overlaps_x", OUT_OPS)
def _(op):
    a = _with_out(op)
    buf = np.zeros((R_ + 1) * C_, F32)
    buf[C_:] = a["x"].reshape(-1)
    a["x"] = buf[C_:].reshape(R_, C_)
    a["out"] = _replace_out(op, a, buf[: R_ * C_].reshape(R_, C_))
    return a, ValueError, arg("out")


@case("out_overlaps_weight", OUT_OPS)
def _(op):
    a = _with_out(op)
    buf = np.full((R_, C_), SENTINEL, F32)
    buf[0] = a["weight"]
    a["weight"] = buf[0]
    a["out"] = _replace_out(op, a, buf)
    return a, ValueError, arg("out")


@case("out_h_is_residual_reversed", ["add_layer_norm", "add_rms_norm"])
def _(op):
    a = _with_out(op)
    a["out"] = (a["out"][0], a["residual"][::-1])
    return a, ValueError, arg("out")


@case("out_y_and_h_same_array", ["add_layer_norm", "add_rms_norm"])
def _(op):
    a = _with_out(op)
    a["out"] = (a["out"][0], a["out"][0])
    return a, ValueError, arg("out")


@case("out_tuple_too_short", ["add_layer_norm", "add_rms_norm"])
def _(op):
    a = _with_out(op)
    a["out"] = (a["out"][0],)
    return a, (TypeError, ValueError), arg("out")


@case("out_single_array_for_fused", ["add_layer_norm", "add_rms_norm"])
def _(op):
    a = _with_out(op)
    a["out"] = a["out"][0]
    return a, (TypeError, ValueError), arg("out")


for _name, _shape in [("out_wrong_shape_C", (R_, C_ + 1)), ("out_wrong_shape_rows", (R_ + 1, C_)),
                      ("out_flat", (R_ * C_,))]:
    def _make(_shape=_shape):
        def builder(op):
            a = _with_out(op)
            a["out"] = _replace_out(op, a, np.full(_shape, SENTINEL, F32))
            return a, ValueError, arg("out")
        return builder
    case(_name, OUT_OPS)(_make())


# A wrong dtype is a TypeError, as for every other argument (and as NumPy's
# ufuncs do for out=).
@case("out_wrong_dtype", OUT_OPS)
def _(op):
    a = _with_out(op)
    a["out"] = _replace_out(op, a, np.full((R_, C_), SENTINEL, F64))
    return a, TypeError, arg("out")


@case("out_h_wrong_dtype", ["add_layer_norm", "add_rms_norm"])
def _(op):
    a = _with_out(op)
    a["out"] = (a["out"][0], np.full((R_, C_), SENTINEL, F16))
    return a, TypeError, arg("out")


@case("out_readonly", OUT_OPS)
def _(op):
    a = _with_out(op)
    o = np.full((R_, C_), SENTINEL, F32)
    o.setflags(write=False)
    a["out"] = _replace_out(op, a, o)
    return a, ValueError, arg("out")


@case("out_list", OUT_OPS)
def _(op):
    a = _with_out(op)
    a["out"] = _replace_out(op, a, [[0.0] * C_] * R_)
    return a, TypeError, arg("out")


# residual

@case("residual_wrong_C", ["add_layer_norm", "add_rms_norm"])
def _(op):
    return _with(op, residual=np.ones((R_, C_ + 1), F32)), ValueError, arg("residual")


@case("residual_wrong_rows", ["add_layer_norm", "add_rms_norm"])
def _(op):
    return _with(op, residual=np.ones((R_ + 1, C_), F32)), ValueError, arg("residual")


@case("residual_dtype", ["add_layer_norm", "add_rms_norm"])
def _(op):
    return _with(op, residual=np.ones((R_, C_), F64)), TypeError, arg("residual")


@case("residual_none", ["add_layer_norm", "add_rms_norm"])
def _(op):
    return _with(op, residual=None), TypeError, arg("residual")


@case("residual_list", ["add_layer_norm", "add_rms_norm"])
def _(op):
    return _with(op, residual=[[1.0] * C_] * R_), TypeError, arg("residual")


# backward: saved statistics, dy, out=, accumulate

def _stat_cases():
    for stat in ("mean", "rstd"):
        ops = ["layer_norm_backward"] if stat == "mean" else BWD_OPS
        for name, make, exc in [
            (f"{stat}_wrong_length", lambda: np.ones(R_ + 1, F32), ValueError),
            (f"{stat}_keepdim_shape", lambda: np.ones((R_, 1), F32), ValueError),
            (f"{stat}_f64_for_f32_x", lambda: np.ones(R_, F64), TypeError),
            (f"{stat}_list", lambda: [1.0] * R_, TypeError),
        ]:
            def builder(op, stat=stat, make=make, exc=exc):
                return _with(op, **{stat: make()}), exc, arg(stat)
            case(name, ops)(builder)

        def half_stats(op, stat=stat):  # statistics of half input are float32
            a = good_args(op, F16)
            a[stat] = a[stat].astype(F16)
            return a, TypeError, arg(stat)
        case(f"{stat}_f16_for_f16_x", ops)(half_stats)


_stat_cases()


@case("dy_wrong_shape", BWD_OPS)
def _(op):
    return _with(op, dy=np.ones((R_, C_ + 1), F32)), ValueError, arg("dy")


@case("dy_wrong_dtype", BWD_OPS)
def _(op):
    return _with(op, dy=np.ones((R_, C_), F64)), TypeError, arg("dy")


@case("dy_list", BWD_OPS)
def _(op):
    return _with(op, dy=[[1.0] * C_] * R_), TypeError, arg("dy")


@case("accumulate_without_out", BWD_OPS)
def _(op):
    return _with(op, accumulate=True), ValueError, rf"{arg('out')}|{arg('accumulate')}"


def _bwd_out_case(name, mutate, exc=ValueError):
    def builder(op):
        a = _with_out(op)
        a["out"] = mutate(op, a, list(a["out"]))
        return a, exc, arg("out")
    case(name, BWD_OPS)(builder)


def _set(i, make):
    def mutate(op, a, outs):
        outs[i] = make(a)
        return tuple(outs)
    return mutate


# a tuple of the wrong length: TypeError or ValueError (both read naturally)
_bwd_out_case("out_too_few", lambda op, a, outs: tuple(outs[:-1]), (TypeError, ValueError))
_bwd_out_case("out_too_many", lambda op, a, outs: tuple(outs) + (np.zeros(C_, F32),), (TypeError, ValueError))
_bwd_out_case("out_dx_wrong_shape", _set(0, lambda a: np.full((R_ + 1, C_), SENTINEL, F32)))
_bwd_out_case("out_dx_wrong_dtype", _set(0, lambda a: np.full((R_, C_), SENTINEL, F64)), TypeError)
_bwd_out_case("out_dweight_wrong_shape", _set(1, lambda a: np.full((C_ + 1,), SENTINEL, F32)))
_bwd_out_case("out_dweight_wrong_dtype", _set(1, lambda a: np.full((C_,), SENTINEL, F64)), TypeError)
_bwd_out_case("out_dx_is_dy", _set(0, lambda a: a["dy"]))
_bwd_out_case("out_dx_is_x", _set(0, lambda a: a["x"]))
_bwd_out_case("out_dweight_is_weight", _set(1, lambda a: a["weight"]))
_bwd_out_case("out_dx_readonly", _set(0, lambda a: _readonly(np.full((R_, C_), SENTINEL, F32))))
_bwd_out_case("out_dx_list", _set(0, lambda a: [[0.0] * C_] * R_), TypeError)


@case("out_dbias_is_dweight", ["layer_norm_backward"])
def _(op):
    a = _with_out(op)
    a["out"] = (a["out"][0], a["out"][1], a["out"][1])
    return a, ValueError, rf"{arg('out')}|{arg('dbias')}|{arg('dweight')}"


def _readonly(arr):
    arr.setflags(write=False)
    return arr


PARAMS = [pytest.param(op, name, id=f"{op}-{name}") for name, (ops, _) in CASES.items() for op in ops]


@pytest.mark.parametrize("op,name", PARAMS)
def test_bad_input_raises_and_writes_nothing(op, name):
    a, exc, pattern = CASES[name][1](op)
    watched = _arrays_in(a)
    snaps = snapshot(*watched)
    with np.errstate(all="ignore"), pytest.raises(exc, match=pattern):
        invoke(op, a)
    assert_unchanged(watched, snaps, f"{op} [{name}]: an input or out= buffer (written although the call raised)")


# --------------------------------------------------------------------------
# valid edge cases


@pytest.mark.parametrize("op", FWD_OPS)
@pytest.mark.parametrize("eps", [0, 0.0, np.float32(1e-3), np.float64(0.25)], ids=["int0", "0.0", "np.float32", "np.float64"])
def test_eps_zero_and_numpy_scalars_accepted(op, eps):
    a = _with(op, eps=eps)
    invoke(op, a)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["0", "2x0", "0x3"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=dname)
@pytest.mark.parametrize("op", FWD_OPS)
def test_zero_rows_forward_like_torch(op, dtype, lead):
    """Zero rows (C > 0): empty results of the right shapes and dtypes, as torch."""
    C = 5
    shape = lead + (C,)
    x = np.ones(shape, dtype)
    w = np.ones(C, dtype)
    a = {"x": x, "weight": w}
    if op in FUSED_OPS:
        a["residual"] = np.ones(shape, dtype)
    res = invoke(op, a)
    res = res if isinstance(res, tuple) else (res,)
    fn = F.layer_norm if is_ln(op) else F.rms_norm
    ty = from_torch(fn(to_torch(x), (C,), to_torch(w)))
    assert res[0].shape == ty.shape == shape and res[0].dtype == ty.dtype
    stat_dt = F64 if dtype == F64 else F32
    for extra in res[1:]:
        if extra.shape == shape:  # h
            assert extra.dtype == dtype
        else:  # mean / rstd
            assert extra.shape == lead and extra.dtype == stat_dt, (extra.shape, extra.dtype)


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=dname)
@pytest.mark.parametrize("op", BWD_OPS)
def test_zero_rows_backward_like_torch(op, dtype, with_weight):
    """Zero rows: dx is empty, dweight/dbias are zeros of shape (C,) (torch.autograd
    gives zeros); accumulate=True leaves out= unchanged."""
    C = 5
    x = np.ones((0, C), dtype)
    dy = np.ones((0, C), dtype)
    w = np.ones(C, dtype) if with_weight else None
    a = {"x": x, "dy": dy, "weight": w}
    if is_ln(op):
        _, a["mean"], a["rstd"] = pynorm.layer_norm_forward(x, w)
        assert a["mean"].shape == (0,)
    else:
        _, a["rstd"] = pynorm.rms_norm_forward(x, w)
    res = invoke(op, a)
    xt = to_torch(x).requires_grad_(True)
    wt = torch.ones(C, dtype=xt.dtype, requires_grad=True)
    bt = torch.zeros(C, dtype=xt.dtype, requires_grad=True)
    if is_ln(op):
        F.layer_norm(xt, (C,), wt, bt).backward(to_torch(dy))
    else:
        F.rms_norm(xt, (C,), wt).backward(to_torch(dy))
    gdt = wgrad_dtype(dtype, w)
    assert res[0].shape == (0, C) and res[0].dtype == dtype
    expected = [from_torch(wt.grad, gdt)] + ([from_torch(bt.grad, gdt)] if is_ln(op) else [])
    for got, exp in zip(res[1:], expected):
        assert_bitwise_equal(got, exp, f"{op} weight gradient with zero rows (torch: zeros)")
    prev = tuple(np.full(r.shape, 2.5, r.dtype) for r in res)
    outs = tuple(p.copy() for p in prev)
    invoke(op, dict(a, out=outs, accumulate=True))
    for o, p in zip(outs, prev):
        assert_bitwise_equal(o, p, f"{op} accumulate with zero rows must add nothing")
