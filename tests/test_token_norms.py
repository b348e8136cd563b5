"""pynorm's token norms (LayerNorm, RMSNorm, fused residual variants, training
forward/backward pairs) checked against torch CPU and a float64 NumPy reference.

Accuracy rule (see conftest.check_accuracy): pynorm's max abs error against the
float64 reference is within 2x torch's error on the same data, plus one ulp of
the output dtype at the largest |ref|. Every test uses fixed seeds.
"""

import numpy as np
import pytest
import torch.nn.functional as F

import pynorm
import reference as R
from conftest import (
    BF16,
    BWD_OPS,
    DTYPES,
    F16,
    F32,
    F64,
    FUSED_OPS,
    FWD_OPS,
    assert_bitwise_equal,
    assert_nan_masks_equal,
    assert_unchanged,
    check_accuracy,
    check_meta,
    dname,
    eps_of,
    expected_forward_meta,
    from_torch,
    is_ln,
    pynorm_backward,
    pynorm_forward,
    randn,
    reference_backward,
    reference_forward,
    seed_for,
    shape_id,
    snapshot,
    to_torch,
    torch_backward,
    torch_forward,
    wgrad_dtype,
)

# A small covering of layouts for the full op x dtype x weight matrix:
# 1-D, 2-D with odd rows and odd C, 3-D with a SIMD-sized C.
SHAPES_SMALL = [(64,), (17, 7), (2, 3, 768)]

# Every C of the contract, with 1, 3 and 17 rows and 1-D / 2-D / 3-D leading shapes.
SHAPES_C = [(1,), (17, 1), (3, 3), (7,), (1, 7), (3, 1, 64), (17, 768), (3, 4097), (1, 3, 16384)]

STAT_NAMES = ("mean", "rstd")


def _wdtypes(dtype):
    return [dtype] if dtype == F32 else [dtype, F32]


def _forward_matrix():
    params = []
    for op in FWD_OPS:
        for dtype in DTYPES:
            variants = [("none", None)]
            for wd in _wdtypes(dtype):
                variants.append(("w", wd))
                if is_ln(op):
                    variants += [("wb", wd), ("b", wd)]
            for affine, wd in variants:
                wid = affine if wd is None else f"{affine}_{dname(wd)}"
                params.append(pytest.param(op, dtype, affine, wd, id=f"{op}-{dname(dtype)}-{wid}"))
    return params


def _backward_matrix():
    params = []
    for op in BWD_OPS:
        for dtype in DTYPES:
            params.append(pytest.param(op, dtype, None, id=f"{op}-{dname(dtype)}-noweight"))
            for wd in _wdtypes(dtype):
                params.append(pytest.param(op, dtype, wd, id=f"{op}-{dname(dtype)}-w_{dname(wd)}"))
    return params


def make_forward_inputs(op, shape, dtype, affine="wb", wdtype=None, seed=0, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    C = shape[-1]
    wdtype = dtype if wdtype is None else wdtype
    x = randn(rng, shape, dtype, loc=loc, scale=scale)
    residual = randn(rng, shape, dtype) if op in FUSED_OPS else None
    weight = randn(rng, (C,), wdtype, loc=1.0, scale=0.5) if "w" in affine else None
    bias = randn(rng, (C,), wdtype, scale=0.5) if ("b" in affine and is_ln(op)) else None
    return dict(x=x, residual=residual, weight=weight, bias=bias)


def check_forward(op, inputs, eps=None, slack_ulps=2.0):
    """Runs op through pynorm, torch and the reference; checks the outputs'
    shapes/dtypes/contiguity, h bitwise, y and the statistics by the accuracy
    rule, and that no input was modified. Returns pynorm's outputs."""
    x = inputs["x"]
    arrays = [inputs[k] for k in ("x", "residual", "weight", "bias")]
    snaps = snapshot(*arrays)
    got = pynorm_forward(op, eps=eps, **inputs)
    assert_unchanged(arrays, snaps, f"{op}: an input")
    meta = expected_forward_meta(op, x)
    assert set(got) == set(meta)
    for name, (shape, dtype) in meta.items():
        check_meta(f"{op} {name}", got[name], shape, dtype)
        for a in arrays:
            if a is not None:
                assert not np.shares_memory(got[name], a), f"{op} {name} shares memory with an input"
    ref = reference_forward(op, eps=eps, **inputs)
    th = torch_forward(op, eps=eps, **inputs)
    if "h" in got:
        assert_bitwise_equal(got["h"], ref["h"], f"{op} h (must be x + residual rounded once to {dname(x.dtype)})")
        assert_bitwise_equal(got["h"], th["h"], f"{op} h vs torch's x + residual")
    check_accuracy(f"{op} y", got["y"], th["y"], ref["y"], x.dtype, slack_ulps=slack_ulps)
    for name in STAT_NAMES:
        if name in got:
            # a mean's rounding error scales with the data's magnitude, not the mean's
            src = ref["h"] if "h" in ref else x
            scale = float(np.abs(src.astype(np.float64)).max()) if name == "mean" else None
            check_accuracy(f"{op} {name}", got[name], th[name], ref[name], R.stat_dtype(x.dtype),
                           slack_ulps=slack_ulps, scale=scale or None)
    return got


# --------------------------------------------------------------------------
# forward: every op x dtype x weight/bias x weight dtype


@pytest.mark.parametrize("shape", SHAPES_SMALL, ids=shape_id)
@pytest.mark.parametrize("op,dtype,affine,wdtype", _forward_matrix())
def test_forward_matches_torch_and_reference(op, dtype, affine, wdtype, shape):
    inputs = make_forward_inputs(op, shape, dtype, affine, wdtype, seed_for(op, dname(dtype), affine, shape))
    check_forward(op, inputs)


@pytest.mark.parametrize("shape", SHAPES_C, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", FWD_OPS)
def test_forward_all_sizes(op, dtype, shape):
    """Every C in {1, 3, 7, 64, 768, 4097, 16384}, 1 / 3 / 17 rows, 1-D to 3-D."""
    inputs = make_forward_inputs(op, shape, dtype, "wb", dtype, seed_for("sizes", op, dname(dtype), shape))
    check_forward(op, inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", FWD_OPS)
def test_forward_explicit_eps(op, dtype):
    """A large eps (0.5) and eps=0 are used as given."""
    for eps in (0.5, 0.0):
        inputs = make_forward_inputs(op, (5, 33), dtype, "wb", dtype, seed_for("eps", op, dname(dtype), eps))
        check_forward(op, inputs, eps=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", ["rms_norm", "rms_norm_forward", "add_rms_norm", "layer_norm", "layer_norm_forward", "add_layer_norm"])
def test_default_eps(op, dtype):
    """eps defaults: 1e-5 for LayerNorm; for RMSNorm torch's rule, the machine
    epsilon of the compute type (float32's for half and float32 input, float64's
    for float64). Rows of small values make eps matter."""
    default = 1e-5 if is_ln(op) else R.default_rms_eps(dtype)
    inputs = make_forward_inputs(op, (4, 48), dtype, "w", dtype, seed_for("defeps", op, dname(dtype)), loc=0.0, scale=3e-4)
    if op in FUSED_OPS:
        inputs["residual"] = (inputs["residual"].astype(np.float64) * 1e-4).astype(dtype)
    if op == "rms_norm":
        implicit = {"y": pynorm.rms_norm(inputs["x"], inputs["weight"])}
    elif op == "rms_norm_forward":
        y, rstd = pynorm.rms_norm_forward(inputs["x"], inputs["weight"])
        implicit = {"y": y, "rstd": rstd}
    elif op == "add_rms_norm":
        y, h = pynorm.add_rms_norm(inputs["x"], inputs["residual"], inputs["weight"])
        implicit = {"y": y, "h": h}
    elif op == "layer_norm":
        implicit = {"y": pynorm.layer_norm(inputs["x"], inputs["weight"])}
    elif op == "layer_norm_forward":
        y, mean, rstd = pynorm.layer_norm_forward(inputs["x"], inputs["weight"])
        implicit = {"y": y, "mean": mean, "rstd": rstd}
    else:
        y, h = pynorm.add_layer_norm(inputs["x"], inputs["residual"], inputs["weight"])
        implicit = {"y": y, "h": h}
    explicit = check_forward(op, inputs, eps=default)
    for name in implicit:
        assert_bitwise_equal(implicit[name], explicit[name], f"{op} {name} with default eps vs eps={default!r}")
    if not is_ln(op):  # and torch's own default (eps=None) agrees
        xt = to_torch(explicit["h"] if "h" in explicit else inputs["x"])
        wt = to_torch(inputs["weight"])
        th = from_torch(F.rms_norm(xt, (xt.shape[-1],), wt), dtype)
        ref = R.rms_norm_ref(explicit["h"] if "h" in explicit else inputs["x"], inputs["weight"], default)[0]
        check_accuracy(f"{op} y vs torch eps=None", implicit["y"], th, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", ["layer_norm_forward", "rms_norm_forward"])
@pytest.mark.parametrize("C", [1, 7, 4097])
def test_constant_rows(op, dtype, C):
    """Constant rows (zero variance): LayerNorm gives exactly bias (to the rule's
    accuracy), RMSNorm c/sqrt(c^2+eps)*w."""
    rng = np.random.default_rng(seed_for("const", op, dname(dtype), C))
    consts = np.array([0.1, -3.0, 1e4, 0.0, 7.25])
    x = np.repeat(consts[:, None], C, axis=1).astype(dtype)
    inputs = dict(x=x, residual=None, weight=randn(rng, (C,), dtype, 1.0, 0.5),
                  bias=randn(rng, (C,), dtype) if is_ln(op) else None)
    check_forward(op, inputs)


# --------------------------------------------------------------------------
# backward: gradients against torch.autograd and the reference

GRAD_RTOL = {F64: 1e-10, F32: 2e-4, F16: 2e-2, BF16: 8e-2}


def check_backward(op, x, dy, weight, eps=None, slack_ulps=2.0):
    arrays = [dy, x, weight]
    snaps = snapshot(*arrays)
    got, stats = pynorm_backward(op, dy, x, weight, eps)
    assert_unchanged(arrays, snaps, f"{op}: an input")
    C = x.shape[-1]
    gdt = wgrad_dtype(x.dtype, weight)
    names = ["dx", "dweight"] + (["dbias"] if is_ln(op) else [])
    assert set(got) == set(names)
    check_meta(f"{op} dx", got["dx"], x.shape, x.dtype)
    for name in names[1:]:
        check_meta(f"{op} {name}", got[name], (C,), gdt)
    ref = reference_backward(op, dy, x, weight, eps)
    th = torch_backward(op, dy, x, weight, eps)
    for name in names:
        odt = x.dtype if name == "dx" else gdt
        check_accuracy(f"{op} {name}", got[name], th[name], ref[name], odt, slack_ulps=slack_ulps)
        # and plainly close to torch.autograd
        # (a coarse check with a per-dtype tolerance, allowing for torch's own
        # error where the exact gradient is ~0, e.g. C = 1)
        g = np.asarray(got[name]).astype(np.float64)
        t = th[name].astype(np.float64)
        scale = max(float(np.abs(t).max()) if t.size else 0.0, 1e-30)
        rtol = max(GRAD_RTOL[np.dtype(odt)], GRAD_RTOL[np.dtype(x.dtype)])
        np.testing.assert_allclose(g, t, rtol=rtol, atol=rtol * scale + 3 * R.max_abs_err(t, ref[name]),
                                   err_msg=f"{op} {name} differs from torch.autograd's")
    return got, stats


@pytest.mark.parametrize("shape", SHAPES_SMALL, ids=shape_id)
@pytest.mark.parametrize("op,dtype,wdtype", _backward_matrix())
def test_backward_matches_torch_autograd_and_reference(op, dtype, wdtype, shape):
    rng = np.random.default_rng(seed_for("bwd", op, dname(dtype), wdtype and dname(wdtype), shape))
    C = shape[-1]
    x = randn(rng, shape, dtype, 0.5, 2.0)
    dy = randn(rng, shape, dtype)
    weight = None if wdtype is None else randn(rng, (C,), wdtype, 1.0, 0.5)
    check_backward(op, x, dy, weight)


@pytest.mark.parametrize("shape", SHAPES_C, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", BWD_OPS)
def test_backward_all_sizes(op, dtype, shape):
    rng = np.random.default_rng(seed_for("bwdsizes", op, dname(dtype), shape))
    C = shape[-1]
    x = randn(rng, shape, dtype, 0.5, 2.0)
    dy = randn(rng, shape, dtype)
    weight = randn(rng, (C,), dtype, 1.0, 0.5)
    check_backward(op, x, dy, weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", BWD_OPS)
def test_backward_many_rows_weight_grads(op, dtype):
    """dweight/dbias reduce over many rows (1000 x 768) as accurately as torch."""
    rng = np.random.default_rng(seed_for("bwdmany", op, dname(dtype)))
    x = randn(rng, (10, 100, 768), dtype, 0.5, 2.0)
    dy = randn(rng, (10, 100, 768), dtype)
    check_backward(op, x, dy, randn(rng, (768,), F32 if dtype != F64 else dtype, 1.0, 0.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", BWD_OPS)
def test_backward_without_weight_still_returns_weight_grads(op, dtype):
    """weight=None: dx is the gradient of the plain norm; dweight = sum(dy*xhat)
    and (LayerNorm) dbias = sum(dy) are still returned, float32 (the spec: the
    weight's dtype, float32 when weight is None), shape (C,)."""
    rng = np.random.default_rng(seed_for("noweight", op, dname(dtype)))
    x = randn(rng, (19, 65), dtype, 0.5, 2.0)
    dy = randn(rng, (19, 65), dtype)
    got, stats = check_backward(op, x, dy, None)
    assert got["dweight"].dtype == F32
    # against the defining formulas, from pynorm's own saved statistics
    xd, dyd = x.astype(np.float64), dy.astype(np.float64)
    if is_ln(op):
        mean, rstd = stats
        xhat = (xd - mean.astype(np.float64)[:, None]) * rstd.astype(np.float64)[:, None]
        np.testing.assert_allclose(got["dbias"].astype(np.float64), dyd.sum(0), rtol=1e-3, atol=1e-3 * np.abs(dyd.sum(0)).max(),
                                   err_msg="dbias != sum(dy) over rows")
    else:
        (rstd,) = stats
        xhat = xd * rstd.astype(np.float64)[:, None]
    dw = (dyd * xhat).sum(0)
    np.testing.assert_allclose(got["dweight"].astype(np.float64), dw, rtol=1e-3, atol=1e-3 * np.abs(dw).max(),
                               err_msg="dweight != sum(dy * xhat) over rows")


# --------------------------------------------------------------------------
# backward out= and accumulate


def _bwd_setup(op, dtype, wdtype, shape=(9, 70), seed=0):
    rng = np.random.default_rng(seed)
    C = shape[-1]
    x = randn(rng, shape, dtype, 0.5, 2.0)
    dy = randn(rng, shape, dtype)
    weight = None if wdtype is None else randn(rng, (C,), wdtype, 1.0, 0.5)
    if is_ln(op):
        _, mean, rstd = pynorm.layer_norm_forward(x, weight)
        stats = (mean, rstd)
    else:
        _, rstd = pynorm.rms_norm_forward(x, weight)
        stats = (rstd,)
    return rng, x, dy, weight, stats


def _bwd_call(op, dy, x, stats, weight, **kw):
    if is_ln(op):
        return pynorm.layer_norm_backward(dy, x, stats[0], stats[1], weight, **kw)
    return pynorm.rms_norm_backward(dy, x, stats[0], weight, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("op", BWD_OPS)
def test_backward_out_overwrites(op, dtype, with_weight):
    """out=(dx, dweight[, dbias]) receives exactly the results of a call
    without out=, and the call returns those very arrays."""
    _, x, dy, weight, stats = _bwd_setup(op, dtype, dtype if with_weight else None, seed=seed_for("bout", op, dname(dtype)))
    fresh = _bwd_call(op, dy, x, stats, weight)
    outs = tuple(np.full_like(a, 3.0) for a in fresh)
    got = _bwd_call(op, dy, x, stats, weight, out=outs)
    assert len(got) == len(outs)
    for g, o, f, name in zip(got, outs, fresh, ("dx", "dweight", "dbias")):
        assert g is o, f"{op}: returned {name} is not the out= array"
        assert_bitwise_equal(o, f, f"{op} out= {name} vs the result without out=")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("op", BWD_OPS)
def test_backward_accumulate_adds_into_out(op, dtype, with_weight):
    """accumulate=True: out arrays end as previous + new gradients (one rounding
    to the array's dtype, so compared within an ulp-level tolerance)."""
    wd = (dtype if dtype != F16 else F32) if with_weight else None
    rng, x, dy, weight, stats = _bwd_setup(op, dtype, wd, seed=seed_for("acc", op, dname(dtype)))
    fresh = _bwd_call(op, dy, x, stats, weight)
    outs = tuple(randn(rng, a.shape, a.dtype) for a in fresh)
    prev = [o.copy() for o in outs]
    got = _bwd_call(op, dy, x, stats, weight, out=outs, accumulate=True)
    for g, o, p, f, name in zip(got, outs, prev, fresh, ("dx", "dweight", "dbias")):
        assert g is o, f"{op}: returned {name} is not the out= array"
        exp = p.astype(np.float64) + f.astype(np.float64)
        tol = 1.01 * eps_of(o.dtype) * (np.abs(p.astype(np.float64)) + np.abs(f.astype(np.float64))) + 1e-30
        err = np.abs(o.astype(np.float64) - exp)
        assert (err <= tol).all(), (
            f"{op} accumulate {name}: not previous + new; worst {float(err.max()):.3g} "
            f"at {np.unravel_index(int(np.argmax(err - tol)), err.shape)}")
    # accumulating twice more adds the same gradient again
    _bwd_call(op, dy, x, stats, weight, out=outs, accumulate=True)
    for o, p, f, name in zip(outs, prev, fresh, ("dx", "dweight", "dbias")):
        exp = p.astype(np.float64) + 2 * f.astype(np.float64)
        np.testing.assert_allclose(o.astype(np.float64), exp, rtol=4 * eps_of(o.dtype),
                                   atol=4 * eps_of(o.dtype) * float(np.abs(exp).max()),
                                   err_msg=f"{op} accumulate twice {name}")


@pytest.mark.parametrize("op", BWD_OPS)
def test_backward_out_strided_dx(op):
    """dx may be written through a strided view (rows apart); nothing outside it is touched."""
    _, x, dy, weight, stats = _bwd_setup(op, F32, F32, shape=(6, 40), seed=seed_for("bstride", op))
    fresh = _bwd_call(op, dy, x, stats, weight)
    big = np.full((6, 3, 40), -7.0, F32)
    outs = (big[:, 1, :],) + tuple(np.empty_like(a) for a in fresh[1:])
    _bwd_call(op, dy, x, stats, weight, out=outs)
    assert_bitwise_equal(big[:, 1, :], fresh[0], f"{op} dx through a strided out view")
    assert (big[:, 0, :] == -7).all() and (big[:, 2, :] == -7).all(), "write outside the out view"


# --------------------------------------------------------------------------
# strided inputs: results are bit-identical to the same call on contiguous copies


def _layout(rng, shape, dtype, variant):
    A, B, C = shape
    if variant == "contiguous":
        return randn(rng, shape, dtype, 0.5, 2.0)
    if variant == "rows_step2":  # x[:, ::2, :]
        return randn(rng, (A, 2 * B, C), dtype, 0.5, 2.0)[:, ::2, :]
    if variant == "reversed":  # x[::-1]
        return randn(rng, shape, dtype, 0.5, 2.0)[::-1]
    if variant == "transposed_leading":
        return randn(rng, (B, A, C), dtype, 0.5, 2.0).transpose(1, 0, 2)
    if variant == "last_axis_step2":  # non-contiguous last axis: needs a copy
        return randn(rng, (A, B, 2 * C), dtype, 0.5, 2.0)[..., ::2]
    if variant == "last_axis_reversed":
        return randn(rng, shape, dtype, 0.5, 2.0)[..., ::-1]
    if variant == "fortran":
        return np.asfortranarray(randn(rng, shape, dtype, 0.5, 2.0))
    if variant == "broadcast_rows":  # zero strides, read-only
        return np.broadcast_to(randn(rng, (C,), dtype, 0.5, 2.0), shape)
    if variant == "readonly":
        a = randn(rng, shape, dtype, 0.5, 2.0)
        a.setflags(write=False)
        return a
    if variant == "unaligned":  # contiguous, but not at a 64-byte boundary
        buf = randn(rng, (A * B * C + 1,), dtype, 0.5, 2.0)
        return buf[1:].reshape(shape)
    raise ValueError(variant)


LAYOUTS = ["rows_step2", "reversed", "transposed_leading", "last_axis_step2", "last_axis_reversed",
           "fortran", "broadcast_rows", "readonly", "unaligned"]


def _run_any(op, x, dy=None, residual=None, weight=None, bias=None, stats=None):
    if op in BWD_OPS:
        got, _ = pynorm_backward(op, dy, x, weight, stats=stats)
        return got
    return pynorm_forward(op, x, residual, weight, bias)


@pytest.mark.parametrize("C", [1, 7, 768])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dname)
@pytest.mark.parametrize("variant", LAYOUTS)
@pytest.mark.parametrize("op", FWD_OPS + BWD_OPS)
def test_strided_inputs_bitwise_equal_contiguous(op, variant, dtype, C):
    rng = np.random.default_rng(seed_for("layout", op, variant, dname(dtype), C))
    shape = (3, 5, C)
    x = _layout(rng, shape, dtype, variant)
    residual = _layout(rng, shape, dtype, variant) if op in FUSED_OPS else None
    dy = _layout(rng, shape, dtype, variant) if op in BWD_OPS else None
    weight = randn(rng, (C,), dtype, 1.0, 0.5)
    bias = randn(rng, (C,), dtype) if is_ln(op) else None
    snaps = snapshot(x, residual, dy)
    stats = None
    if op in BWD_OPS:  # the same saved statistics for both calls
        xc = np.ascontiguousarray(x)
        stats = pynorm.layer_norm_forward(xc, weight)[1:] if is_ln(op) else pynorm.rms_norm_forward(xc, weight)[1:]
    got = _run_any(op, x, dy, residual, weight, bias, stats)
    assert_unchanged([x, residual, dy], snaps, f"{op} [{variant}]: an input")
    c = lambda a: None if a is None else np.ascontiguousarray(a)  # noqa: E731
    exp = _run_any(op, c(x), c(dy), c(residual), weight, bias, stats)
    for name in exp:
        assert got[name].flags.c_contiguous, f"{op} {name}: output not C-contiguous"
        assert_bitwise_equal(got[name], exp[name], f"{op} {name} on a {variant} input vs a contiguous copy")


@pytest.mark.parametrize("op", FWD_OPS + BWD_OPS)
def test_strided_weight_bias_and_stats(op):
    """weight/bias views (w[::2], reversed) and strided saved statistics work
    like their contiguous copies."""
    rng = np.random.default_rng(seed_for("wstride", op))
    C = 33
    x = randn(rng, (4, 6, C), F32, 0.5, 2.0)
    w = randn(rng, (2 * C,), F32, 1.0, 0.5)[::2]
    b = randn(rng, (C,), F32)[::-1] if is_ln(op) else None
    residual = randn(rng, x.shape, F32) if op in FUSED_OPS else None
    dy = randn(rng, x.shape, F32) if op in BWD_OPS else None
    stats = stats_c = None
    if op in BWD_OPS:
        stats_c = pynorm.layer_norm_forward(x, w)[1:] if is_ln(op) else pynorm.rms_norm_forward(x, w)[1:]
        # the same values, as transposed views of (6, 4) arrays
        stats = tuple(np.ascontiguousarray(s.T).T for s in stats_c)
        assert not stats[0].flags.c_contiguous
    got = _run_any(op, x, dy, residual, w, b, stats)
    exp = _run_any(op, x, dy, residual, np.ascontiguousarray(w), None if b is None else np.ascontiguousarray(b), stats_c)
    for name in exp:
        assert_bitwise_equal(got[name], exp[name], f"{op} {name} with strided weight/bias/statistics")


# --------------------------------------------------------------------------
# forward out=

OUT_OPS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]


def _out_names(op):
    return ("y", "h") if op in FUSED_OPS else ("y",)


def _pack_out(op, arrays):
    return tuple(arrays) if op in FUSED_OPS else arrays[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", OUT_OPS)
def test_out_contiguous(op, dtype):
    inputs = make_forward_inputs(op, (5, 3, 130), dtype, "wb", dtype, seed_for("out", op, dname(dtype)))
    fresh = pynorm_forward(op, **inputs)
    outs = [np.full(inputs["x"].shape, 5.0, dtype) for _ in _out_names(op)]
    ret = pynorm_forward(op, **inputs, out=_pack_out(op, outs))
    for name, o in zip(_out_names(op), outs):
        assert ret[name] is o, f"{op}: returned {name} is not the out= array"
        assert_bitwise_equal(o, fresh[name], f"{op} out= {name} vs the result without out=")


@pytest.mark.parametrize("view", ["rows_apart", "reversed_rows"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dname)
@pytest.mark.parametrize("op", OUT_OPS)
def test_out_strided_view(op, dtype, view):
    """out= may be a view whose rows are apart (or in reverse order); exactly
    the view's elements are written."""
    shape = (4, 7, 66)
    inputs = make_forward_inputs(op, shape, dtype, "wb", dtype, seed_for("outv", op, dname(dtype), view))
    fresh = pynorm_forward(op, **inputs)
    bigs, outs = [], []
    for _ in _out_names(op):
        big = np.full((4, 7, 3, 66), -9.0, dtype)
        bigs.append(big)
        outs.append(big[:, :, 1, :] if view == "rows_apart" else big[::-1, :, 1, :][::-1])
    pynorm_forward(op, **inputs, out=_pack_out(op, outs))
    for name, big, o in zip(_out_names(op), bigs, outs):
        assert_bitwise_equal(o, fresh[name], f"{op} {name} written through a {view} out view")
        assert (big[:, :, 0, :].astype(np.float64) == -9).all() and (big[:, :, 2, :].astype(np.float64) == -9).all(), \
            f"{op}: wrote outside the out= view"


@pytest.mark.parametrize("op", OUT_OPS)
def test_out_non_contiguous_last_axis(op):
    """An out= view with a non-contiguous last axis: the contract allows either
    writing the correct values through it, or a ValueError naming 'out' that
    leaves the buffer untouched (the kernels write contiguous rows)."""
    inputs = make_forward_inputs(op, (3, 40), F32, "wb", F32, seed_for("outlast", op))
    fresh = pynorm_forward(op, **inputs)
    bigs = [np.full((3, 80), -9.0, F32) for _ in _out_names(op)]
    before = [b.copy() for b in bigs]
    outs = [b[:, ::2] for b in bigs]
    try:
        pynorm_forward(op, **inputs, out=_pack_out(op, outs))
    except ValueError as e:
        assert "out" in str(e), f"ValueError does not name 'out': {e}"
        for b, s in zip(bigs, before):
            assert_bitwise_equal(b, s, f"{op}: out= modified although the call raised")
        return
    for name, b, o in zip(_out_names(op), bigs, outs):
        assert_bitwise_equal(o, fresh[name], f"{op} {name} through an out view with last-axis stride 2")
        assert (b[:, 1::2] == -9).all(), f"{op}: wrote outside the out= view"


# --------------------------------------------------------------------------
# fused residual


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_fused_h_is_the_rounded_sum_bitwise(op, dtype):
    """h == x + residual rounded once to x's dtype, bit for bit, including sums
    that round (large + small), cancel (x + -x) and overflow to inf."""
    rng = np.random.default_rng(seed_for("fusedh", op, dname(dtype)))
    C = 257
    big = float(ml_max(dtype))
    x = np.stack([
        rng.standard_normal(C) * 1e3,
        rng.standard_normal(C),
        np.full(C, big * 0.75),
        rng.standard_normal(C) * 1e-3,
    ]).astype(dtype)
    residual = np.stack([
        rng.standard_normal(C) * 1e-2,
        rng.standard_normal(C),
        np.full(C, big * 0.5),  # overflows: h = inf, y = NaN (as torch)
        -x[3].astype(np.float64),
    ]).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        h = pynorm_forward(op, x, residual)["h"]
        expected = R.residual_add_ref(x, residual)
    assert_bitwise_equal(h, expected, f"{op} h vs x + residual rounded once")
    assert_bitwise_equal(h, from_torch(to_torch(x) + to_torch(residual)), f"{op} h vs torch's x + residual")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("params", ["none", "w", "b", "wb"])
def test_fused_per_call_path_equals_checked_path(op, dtype, params):
    """The fused ops' call with out=None (the per-call path: attribute checks only)
    gives the bits of the same call with out=(y_out, h_out) (every check, the row
    layout), for weight and bias absent, given alone or together, in x's dtype or
    float32, on one row and on several."""
    if params == "b" and not is_ln(op):
        pytest.skip("RMSNorm has no bias")
    fn = getattr(pynorm, op)
    for wdtype in _wdtypes(dtype):
        for shape in [(1, 4096), (2, 4096), (3, 5, 77)]:
            rng = np.random.default_rng(seed_for("fusedcall", op, dname(dtype), params, dname(wdtype), shape))
            x, res = randn(rng, shape, dtype), randn(rng, shape, dtype)
            w = randn(rng, shape[-1:], wdtype) if "w" in params else None
            b = randn(rng, shape[-1:], wdtype) if "b" in params else None
            args = (x, res, w, b) if is_ln(op) else (x, res, w)
            y, h = fn(*args)
            outs = (np.full_like(x, 7), np.full_like(x, 7))
            fn(*args, out=outs)
            what = f"{op} {dname(dtype)} weight {dname(wdtype)} {params} {shape}"
            assert_bitwise_equal(y, outs[0], f"{what}: y of out=None vs out=")
            assert_bitwise_equal(h, outs[1], f"{what}: h of out=None vs out=")


def ml_max(dtype):
    import ml_dtypes

    return ml_dtypes.finfo(np.dtype(dtype)).max


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("C", [7, 768, 4097])
def test_fused_y_equals_unfused_norm_of_h(op, dtype, C):
    """y of the fused op is bit-identical to the unfused norm applied to h."""
    inputs = make_forward_inputs(op, (5, C), dtype, "wb", dtype, seed_for("fusedy", op, dname(dtype), C))
    got = pynorm_forward(op, **inputs)
    plain = "layer_norm" if is_ln(op) else "rms_norm"
    unfused = pynorm_forward(plain, got["h"], None, inputs["weight"], inputs["bias"])
    assert_bitwise_equal(got["y"], unfused["y"], f"{op} y vs {plain}(h)")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_fused_residual_cancelling_to_zero(op, dtype):
    """residual = -x: h is all zeros; LayerNorm gives bias, RMSNorm gives 0."""
    inputs = make_forward_inputs(op, (3, 100), dtype, "wb", dtype, seed_for("cancel", op, dname(dtype)))
    inputs["residual"] = (-inputs["x"].astype(np.float64)).astype(dtype)
    got = check_forward(op, inputs)
    assert (got["h"].astype(np.float64) == 0).all()
    expected = np.broadcast_to(inputs["bias"].astype(np.float64), got["y"].shape) if is_ln(op) else 0.0
    np.testing.assert_array_equal(got["y"].astype(np.float64), expected)


# --------------------------------------------------------------------------
# hostile rows: large mean, small spread (torch's float32 LayerNorm loses ~3%)


def _hostile(C, rows=32, seed=0, mean=1e4, std=1e-2):
    rng = np.random.default_rng(seed)
    x = (mean + std * rng.standard_normal((rows, C))).astype(F32)
    w = randn(rng, (C,), F32, 1.0, 0.5)
    b = randn(rng, (C,), F32)
    dy = randn(rng, (rows, C), F32)
    return x, w, b, dy


@pytest.mark.parametrize("C,rows", [(4096, 32), (777, 33), (65536, 3)])
@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_forward", "add_layer_norm"])
def test_hostile_rows_forward_10x_more_accurate_than_torch(op, C, rows):
    x, w, b, _ = _hostile(C, rows, seed_for("hostile", op, C))
    residual = None
    if op in FUSED_OPS:  # h = x + residual is the hostile row
        residual = (1e-3 * np.random.default_rng(1).standard_normal(x.shape)).astype(F32)
    inputs = dict(x=x, residual=residual, weight=w, bias=b)
    got = pynorm_forward(op, **inputs)
    ref = reference_forward(op, **inputs)
    th = torch_forward(op, **inputs)
    err_t = R.rel_err(th["y"], ref["y"])
    err_p = R.rel_err(got["y"], ref["y"])
    msg = f"{op} C={C}: error / max|y_ref|: pynorm {err_p:.3g}, torch {err_t:.3g}"
    assert err_t > 1e-3, f"data no longer hostile for torch ({msg}); the test needs harder rows"
    assert err_p * 10 <= err_t, msg + " (pynorm must be >= 10x more accurate)"
    if "rstd" in got:  # the saved statistics are accurate too
        r_t, r_p = R.rel_err(th["rstd"], ref["rstd"]), R.rel_err(got["rstd"], ref["rstd"])
        assert r_p * 10 <= r_t or r_p <= 4 * eps_of(F32), f"rstd relative error: pynorm {r_p:.3g}, torch {r_t:.3g}"
        mean_err = np.abs(got["mean"].astype(np.float64) - ref["mean"])
        assert (mean_err <= np.spacing(np.abs(ref["mean"]).astype(F32)).astype(np.float64)).all(), \
            f"saved mean off by more than 1 ulp: {mean_err.max():.3g}"


@pytest.mark.parametrize("C", [4096, 777])
def test_hostile_rows_backward_no_worse_than_torch(C):
    x, w, b, dy = _hostile(C, 32, seed_for("hostilebwd", C))
    got, _ = pynorm_backward("layer_norm_backward", dy, x, w)
    ref = reference_backward("layer_norm_backward", dy, x, w)
    th = torch_backward("layer_norm_backward", dy, x, w)
    e_p, e_t = R.rel_err(got["dx"], ref["dx"]), R.rel_err(th["dx"], ref["dx"])
    assert e_p <= e_t + 4 * eps_of(F32), f"dx error / max|dx_ref|: pynorm {e_p:.3g} > torch {e_t:.3g}"


# --------------------------------------------------------------------------
# huge and tiny magnitudes

MAGNITUDES = [
    (F32, "huge", 1e30), (F32, "tiny", 1e-30), (F32, "denormal", 1e-41),
    (BF16, "huge", 1e30), (BF16, "tiny", 1e-30),
    (F16, "huge", 2e3), (F16, "tiny", 1e-6),
    (F64, "huge", 1e150), (F64, "tiny", 1e-150), (F64, "denormal", 1e-310),
]


def _row_rel_err(got, ref):
    g = np.asarray(got).astype(np.float64).reshape(-1, ref.shape[-1])
    r = np.asarray(ref, dtype=np.float64).reshape(-1, ref.shape[-1])
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(g - r)
        d = np.where(np.isnan(d), np.inf, d)
        scale = np.abs(r).max(axis=1)
        scale = np.where((scale > 0) & np.isfinite(scale), scale, 1.0)
        return d.max(axis=1) / scale


@pytest.mark.parametrize("eps", [None, 0.0], ids=["default_eps", "eps0"])
@pytest.mark.parametrize("dtype,kind,mag", MAGNITUDES, ids=[f"{dname(d)}-{k}" for d, k, _ in MAGNITUDES])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "layer_norm_backward", "rms_norm_backward"])
def test_extreme_magnitudes(op, dtype, kind, mag, eps):
    """Rows of huge / tiny / denormal values (centred and off-centre): pynorm's
    results are finite wherever the reference's and torch's are, and on every
    row where torch is accurate pynorm is too (accuracy rule, row by row)."""
    rng = np.random.default_rng(seed_for("mag", op, dname(dtype), kind, eps))
    C = 129
    base = rng.standard_normal((6, C))
    base[3:] += 3.0  # off-centre rows
    x = (base * mag).astype(dtype)
    dy = randn(rng, (6, C), dtype)
    w = randn(rng, (C,), dtype, 1.0, 0.5)
    if op in BWD_OPS:
        got, _ = pynorm_backward(op, dy, x, w, eps)
        ref, th = reference_backward(op, dy, x, w, eps), torch_backward(op, dy, x, w, eps)
        names = ["dx"]
    else:
        got = pynorm_forward(op, x, None, w, None, eps)
        ref, th = reference_forward(op, x, None, w, None, eps), torch_forward(op, x, None, w, None, eps)
        names = ["y"]
    for name in names:
        g = got[name].astype(np.float64)
        finite_ok = np.isfinite(ref[name]) & np.isfinite(th[name].astype(np.float64))
        assert np.isfinite(g)[finite_ok].all(), f"{op} {name}: non-finite where reference and torch are finite"
        e_p, e_t = _row_rel_err(g, ref[name]), _row_rel_err(th[name], ref[name])
        torch_accurate = e_t <= 16 * eps_of(dtype)
        bad = torch_accurate & ~(e_p <= 2 * e_t + 4 * eps_of(dtype))
        assert not bad.any(), (
            f"{op} {name} ({kind} {mag:g}, eps={eps}): rows {np.flatnonzero(bad).tolist()} where torch is accurate "
            f"but pynorm is not: pynorm rel errors {e_p[bad]}, torch {e_t[bad]}")


BEYOND_TORCH = [(F32, "huge", 1e30, None), (BF16, "huge", 1e30, None), (F32, "tiny", 1e-30, 0.0),
                (BF16, "tiny", 1e-30, 0.0)]


# DESIGN.md section 5 asks for accurate statistics on huge and tiny magnitudes,
# also where torch's float32 sums of squares overflow or underflow: pynorm sums
# squares in double.
@pytest.mark.parametrize("dtype,kind,mag,eps", BEYOND_TORCH, ids=[f"{dname(d)}-{k}" for d, k, _, _ in BEYOND_TORCH])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_extreme_magnitudes_beyond_torch(op, dtype, kind, mag, eps):
    """Rows of +-1e30 (float32/bfloat16, squares overflow float32) and 1e-30
    with eps=0 (squares underflow): the exact result is representable, so
    pynorm should give it even though torch does not."""
    rng = np.random.default_rng(seed_for("beyond", op, dname(dtype), kind))
    C = 129
    x = (rng.standard_normal((4, C)) * mag).astype(dtype)
    w = randn(rng, (C,), dtype, 1.0, 0.5)
    got = pynorm_forward(op, x, None, w, None, eps)
    ref = reference_forward(op, x, None, w, None, eps)
    err = _row_rel_err(got["y"], ref["y"])
    assert (err <= 16 * eps_of(dtype)).all(), f"{op} {kind} {mag:g}: row errors / max|y_ref| {err}"


# --------------------------------------------------------------------------
# NaN / Inf propagate as in torch


def _poisoned(rng, dtype, C):
    x = rng.standard_normal((8, C)).astype(dtype)
    x[1, 0] = np.nan
    x[3, C - 1] = np.inf
    x[5, C // 2] = -np.inf
    x[6, 0] = np.inf
    x[6, C - 1] = -np.inf
    return x


POISONED_ROWS = [1, 3, 5, 6]


@pytest.mark.parametrize("C", [7, 64, 768])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", FWD_OPS + BWD_OPS)
def test_nan_inf_propagate_like_torch(op, dtype, C):
    """A NaN or Inf in a row: pynorm's outputs are NaN exactly where torch's are
    (LayerNorm: the whole row; RMSNorm with Inf: torch gives NaN at the Inf and
    0 elsewhere), the finite values there equal torch's, the other rows are
    bit-identical to a run without the poisoned rows; nothing crashes."""
    rng = np.random.default_rng(seed_for("nan", op, dname(dtype), C))
    x = _poisoned(rng, dtype, C)
    w = randn(rng, (C,), dtype, 1.0, 0.5)
    b = randn(rng, (C,), dtype) if is_ln(op) else None
    residual = randn(rng, x.shape, dtype) if op in FUSED_OPS else None
    dy = randn(rng, x.shape, dtype) if op in BWD_OPS else None
    clean = [r for r in range(8) if r not in POISONED_ROWS]
    with np.errstate(all="ignore"):
        if op in BWD_OPS:
            got, _ = pynorm_backward(op, dy, x, w)
            th = torch_backward(op, dy, x, w)
            sub, _ = pynorm_backward(op, dy[clean], x[clean], w)
            rowwise = ["dx"]
        else:
            got = pynorm_forward(op, x, residual, w, b)
            th = torch_forward(op, x, residual, w, b)
            sub = pynorm_forward(op, x[clean], None if residual is None else residual[clean], w, b)
            rowwise = list(got)
    for name in got:
        g = got[name]
        if name in ("mean", "rstd"):
            # statistics of a poisoned row: non-finite where torch's are
            np.testing.assert_array_equal(np.isfinite(g.astype(np.float64)), np.isfinite(th[name].astype(np.float64)),
                                          err_msg=f"{op} {name}: finiteness differs from torch's")
        else:
            assert_nan_masks_equal(g, th[name], f"{op} {name}")
            gd, td = g.astype(np.float64), th[name].astype(np.float64)
            both = ~np.isnan(gd)
            if name in rowwise:
                rows_mask = np.zeros(gd.shape[0], bool)
                rows_mask[POISONED_ROWS] = True
                both &= rows_mask[:, None]
                # finite leftovers in poisoned rows (RMSNorm's zeros) match torch's
                np.testing.assert_allclose(gd[both], td[both], atol=1e-6, err_msg=f"{op} {name} in poisoned rows")
        if name in rowwise:
            assert_bitwise_equal(g[clean], sub[name], f"{op} {name}: clean rows changed by poisoned rows")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=dname)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_nan_in_weight_propagates_to_its_column(op, dtype):
    inputs = make_forward_inputs(op, (5, 20), dtype, "wb", dtype, seed_for("nanw", op, dname(dtype)))
    inputs["weight"][3] = np.nan
    got = pynorm_forward(op, **inputs)
    th = torch_forward(op, **inputs)
    assert_nan_masks_equal(got["y"], th["y"], f"{op} y with a NaN weight")
    assert np.isnan(got["y"][:, 3].astype(np.float64)).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=dname)
@pytest.mark.parametrize("op", BWD_OPS)
def test_nan_in_dy_propagates_like_torch(op, dtype):
    rng = np.random.default_rng(seed_for("nandy", op, dname(dtype)))
    x = randn(rng, (6, 33), dtype)
    dy = randn(rng, (6, 33), dtype)
    dy[2, 5] = np.nan
    w = randn(rng, (33,), dtype, 1.0, 0.5)
    got, _ = pynorm_backward(op, dy, x, w)
    th = torch_backward(op, dy, x, w)
    for name in got:
        assert_nan_masks_equal(got[name], th[name], f"{op} {name} with a NaN in dy")


# RMSNorm's sum of squares runs in float32 lanes folded into double, and again in
# double where a float32 square may have overflowed or lost its bits (sums
# beyond 1e36 or below 1e-20). Rows on both sides of both limits, eps = 0 so
# that rstd rests on the sum alone: rstd within a few float32 ulps of float64.
FOLD_MAGNITUDES = [1e-20, 1e-13, 1e-11, 3e-11, 1e-10, 1e16, 1e17, 3e17, 1e18, 1e19, 3e19]


@pytest.mark.parametrize("C", [7, 129, 768, 4097])
@pytest.mark.parametrize("mag", FOLD_MAGNITUDES, ids=[f"{m:g}" for m in FOLD_MAGNITUDES])
def test_rms_norm_sum_of_squares_near_float32_limits(mag, C):
    rng = np.random.default_rng(seed_for("fold", mag, C))
    x64 = rng.standard_normal((4, C)) * mag
    x64[2:] += 3 * mag   # off-centre rows
    x = x64.astype(np.float32)
    y, rstd = pynorm.rms_norm_forward(x, None, eps=0.0)
    xd = x.astype(np.float64)
    want = 1 / np.sqrt((xd * xd).mean(axis=1))
    rel = np.abs(rstd.astype(np.float64).reshape(-1) - want) / want
    assert (rel <= 4 * eps_of(F32)).all(), f"rstd relative errors {rel} at magnitude {mag:g}, C={C}"
    assert np.isfinite(y).all(), f"non-finite y at magnitude {mag:g}, C={C}"
