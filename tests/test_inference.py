"""Inference options of the token norms (DESIGN.md 3b): weight_offset, rounding,
in place, per-head views.

  weight_offset  y = xhat * (weight_offset + w) (+ b), the offset added in float32
                 (float64 for float64 data); dx uses (offset + w), dweight does not change.
  rounding       "once": float32 throughout, y rounded once; "llama": xhat rounded to the
                 data dtype, then times w, rounded again (Hugging Face LlamaRMSNorm).
  in place       out=x; fused out=(x, residual): y over x, h over the residual.
  heads          views whose last axis is contiguous, up to 4-D (q/k heads of a fused qkv
                 buffer), read and written where they are, with no copy.

Checked against the float64 references (tests/reference.py), against the formulas
of the Hugging Face modules (bit for bit where the issue says so), and the C API's
own checks through cffi.
"""
import math

import numpy as np
import pytest
import torch

import pynorm
import pynorm._arrays
import reference as R
from conftest import (BF16, DTYPES, F16, F32, F64, TORCH_DTYPES, as_bits, assert_bitwise_equal, dname,
                      eps_of, randn, to_torch)
from pynorm._lib import ffi, lib

HALF = [F16, BF16]
OPS = ["rms", "layer"]


def _inputs(op, shape, dtype, wdtype=None, seed=0, fused=False):
    rng = np.random.default_rng(seed)
    C = shape[-1]
    wdtype = dtype if wdtype is None else wdtype
    x = randn(rng, shape, dtype, loc=0.3, scale=2.0)
    res = randn(rng, shape, dtype) if fused else None
    w = randn(rng, (C,), wdtype, scale=0.5)          # zero-centred, as Gemma's
    b = randn(rng, (C,), wdtype, scale=0.5) if op == "layer" else None
    return x, res, w, b


def _run(op, x, w, b, fused_res=None, **kw):
    """y (and h when fused) of op through pynorm."""
    if op == "rms":
        if fused_res is not None:
            return pynorm.add_rms_norm(x, fused_res, w, **kw)
        return pynorm.rms_norm(x, w, **kw)
    if fused_res is not None:
        return pynorm.add_layer_norm(x, fused_res, w, b, **kw)
    return pynorm.layer_norm(x, w, b, **kw)


def _ref(op, x, w, b, **kw):
    if op == "rms":
        return R.rms_norm_ref(x, w, None, **kw)[0]
    return R.layer_norm_ref(x, w, b, 1e-5, **kw)[0]


def _assert_close_ulps(what, got, ref, dtype, ulps):
    """|got - ref| <= ulps * eps(dtype) * max|ref| (NaN where ref is NaN). float32 and
    float64 results carry a few roundings of the compute type (xhat, the weight, the bias)
    at the data's scale: four times the ulps."""
    g = np.asarray(got).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if dtype in (F32, F64):
        ulps *= 4
    finite = np.abs(ref[np.isfinite(ref)])
    tol = ulps * eps_of(dtype) * max(float(finite.max()) if finite.size else 1.0, 1e-300)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(g - ref) <= tol) & ~(np.isnan(g) & np.isnan(ref))
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements beyond {ulps} ulps of {dname(dtype)}; first at "
                             f"{i}: got {g[i]!r}, reference {ref[i]!r}")


# ---- 1. weight_offset ------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("wdtype", [None, F32], ids=["w=x", "w=f32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_weight_offset_forward_matches_reference(op, dtype, wdtype, fused):
    x, res, w, b = _inputs(op, (7, 300), dtype, wdtype, seed=1, fused=fused)
    got = _run(op, x, w, b, res, weight_offset=1.0)
    if fused:
        got, h = got
        assert_bitwise_equal(h, R.residual_add_ref(x, res), f"{op} h with weight_offset")
        x = h
    ref = _ref(op, x, w, b, weight_offset=1.0)
    _assert_close_ulps(f"{op} weight_offset=1 y", got, ref, dtype, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_weight_offset_is_the_weight_plus_offset_in_the_compute_type(op, dtype):
    """offset + w is taken in float32 (float64 for float64): the result is exactly that of
    passing that sum as a float32 (float64) weight."""
    x, _, w, b = _inputs(op, (5, 257), dtype, seed=2)
    cdt = F64 if dtype == F64 else F32
    w_sum = (cdt.type(0.75) + w.astype(cdt)).astype(cdt)
    b_c = None if b is None else b.astype(cdt)
    assert_bitwise_equal(_run(op, x, w, b, weight_offset=0.75), _run(op, x, w_sum, b_c),
                         f"{op} weight_offset=0.75 vs a {cdt} weight of 0.75 + w")


def test_weight_offset_added_in_float32_not_bfloat16():
    """A bfloat16 weight of 15.8125 plus 1 is 16.8125 (float32), not a bfloat16 sum (16.75)."""
    w = np.full(4, 15.8125, BF16)
    x = np.array([[1.0, -1.0, 1.0, -1.0]], BF16)        # rstd ~ 1: y = +-(16.8125 * rstd)
    y = pynorm.rms_norm(x, w, weight_offset=1.0, eps=0.0)
    assert float(y[0, 0]) == float(np.float32(16.8125).astype(BF16)), \
        f"got {float(y[0, 0])}; the bfloat16 sum 15.8125 + 1 would give {float((w[0] + BF16.type(1.0)))}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_weight_offset_backward(op, dtype):
    """dx uses (offset + w); dweight (and dbias) are those of offset 0."""
    x, _, w, b = _inputs(op, (6, 130), dtype, seed=3)
    dy = randn(np.random.default_rng(4), x.shape, dtype)
    if op == "rms":
        _, rstd = pynorm.rms_norm_forward(x, w, weight_offset=1.0)
        dx, dw = pynorm.rms_norm_backward(dy, x, rstd, w, weight_offset=1.0)
        dx0, dw0 = pynorm.rms_norm_backward(dy, x, rstd, w)
        ref_dx, ref_dw = R.rms_norm_backward_ref(dy, x, w, rstd=rstd, weight_offset=1.0)
    else:
        _, mean, rstd = pynorm.layer_norm_forward(x, w, b, weight_offset=1.0)
        dx, dw, db = pynorm.layer_norm_backward(dy, x, mean, rstd, w, weight_offset=1.0)
        dx0, dw0, db0 = pynorm.layer_norm_backward(dy, x, mean, rstd, w)
        assert_bitwise_equal(db, db0, "dbias with weight_offset")
        ref_dx, ref_dw, _ = R.layer_norm_backward_ref(dy, x, w, mean=mean, rstd=rstd, weight_offset=1.0)
    assert_bitwise_equal(dw, dw0, f"{op} dweight with weight_offset (must not change)")
    scale = float(np.abs(ref_dx).max())
    tol = (8 if dtype in HALF else 64) * eps_of(dtype) * scale
    assert np.abs(dx.astype(np.float64) - ref_dx).max() <= tol, f"{op} dx with weight_offset vs reference"
    assert not np.array_equal(dx, dx0), f"{op} dx did not use the offset"


def test_gemma_rmsnorm_formula_bit_for_bit():
    """Hugging Face GemmaRMSNorm / Gemma3RMSNorm: out = norm(x.float()) * (1 + w.float()), then
    type_as(x); bit for bit on every row where the two rstd agree (they differ in at most
    the last bit of rstd: ours comes from a double sum)."""
    for dtype in HALF + [F32]:
        x, _, w, _ = _inputs("rms", (64, 640), dtype, seed=5)
        eps = 1e-6
        y, rstd = pynorm.rms_norm_forward(x, w, eps, weight_offset=1.0)
        xt, wt = to_torch(x).float(), to_torch(w).float()
        r_hf = torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps)
        hf = ((xt * r_hf) * (1.0 + wt)).to(TORCH_DTYPES[dtype])
        agree = rstd == r_hf[:, 0].numpy()
        assert agree.mean() > 0.5, "rstd should mostly agree with torch's float32 rsqrt"
        hf_np = hf.float().numpy().astype(dtype)
        assert_bitwise_equal(y[agree], hf_np[agree], f"{dname(dtype)} Gemma formula (rows with equal rstd)")
        _assert_close_ulps("Gemma formula, other rows", y[~agree], hf_np[~agree], dtype, 2)


# ---- 2. rounding -----------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_llama_rounding_matches_reference(op, dtype, fused):
    x, res, w, b = _inputs(op, (9, 200), dtype, seed=6, fused=fused)
    for offset in (0.0, 1.0):
        got = _run(op, x, w, b, res, rounding="llama", weight_offset=offset)
        xin = got[1] if fused else x
        got = got[0] if fused else got
        ref = _ref(op, xin, w, b, rounding="llama", weight_offset=offset)
        _assert_close_ulps(f"{op} llama offset={offset}", got, ref, dtype, 3)


@pytest.mark.parametrize("dtype", [F32, F64], ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_llama_rounding_is_once_for_float32_and_float64(op, dtype):
    x, _, w, b = _inputs(op, (4, 333), dtype, seed=7)
    assert_bitwise_equal(_run(op, x, w, b, rounding="llama"), _run(op, x, w, b), f"{op} llama vs once")


@pytest.mark.parametrize("dtype", HALF, ids=dname)
def test_llama_rmsnorm_formula_bit_for_bit(dtype):
    """Hugging Face LlamaRMSNorm / Qwen3RMSNorm: weight * (x.float() * rsqrt(var + eps)).to(T), bit
    for bit on every row where the two rstd agree; within one ulp of T elsewhere."""
    x, _, w, _ = _inputs("rms", (128, 512), dtype, seed=8)
    w = (w.astype(np.float32) + 1).astype(dtype)
    eps = 1e-6
    y, rstd = pynorm.rms_norm_forward(x, w, eps, rounding="llama")
    xt = to_torch(x).float()
    r_hf = torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps)
    hf = to_torch(w) * (xt * r_hf).to(TORCH_DTYPES[dtype])
    assert hf.dtype == TORCH_DTYPES[dtype]
    hf_np = hf.float().numpy().astype(dtype)
    agree = rstd == r_hf[:, 0].numpy()
    assert agree.mean() > 0.5
    assert_bitwise_equal(y[agree], hf_np[agree], f"{dname(dtype)} Llama formula (rows with equal rstd)")
    _assert_close_ulps("Llama formula, other rows", y[~agree], hf_np[~agree], dtype, 2)
    # the two modes really differ on half data
    assert not np.array_equal(y, pynorm.rms_norm(x, w, eps))


@pytest.mark.parametrize("dtype", HALF, ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_llama_backward_is_the_once_backward(op, dtype):
    x, _, w, b = _inputs(op, (5, 96), dtype, seed=9)
    dy = randn(np.random.default_rng(10), x.shape, dtype)
    if op == "rms":
        _, rstd = pynorm.rms_norm_forward(x, w, rounding="llama")
        got = pynorm.rms_norm_backward(dy, x, rstd, w, rounding="llama")
        exp = pynorm.rms_norm_backward(dy, x, rstd, w)
    else:
        _, mean, rstd = pynorm.layer_norm_forward(x, w, b, rounding="llama")
        got = pynorm.layer_norm_backward(dy, x, mean, rstd, w, rounding="llama")
        exp = pynorm.layer_norm_backward(dy, x, mean, rstd, w)
    for g, e, n in zip(got, exp, ("dx", "dweight", "dbias")):
        assert_bitwise_equal(g, e, f"{op} llama {n}")


@pytest.mark.parametrize("rounding", ["once", "llama"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_nan_and_inf_rows_stay_in_their_rows(op, dtype, rounding):
    """A row with a NaN or an Inf gives NaN where its statistics are NaN, as without the
    options; the other rows are untouched by it."""
    x, _, w, b = _inputs(op, (4, 64), dtype, seed=11)
    x[1, 3] = np.nan
    x[2, 5] = np.inf
    got = _run(op, x, w, b, weight_offset=1.0, rounding=rounding)
    assert np.isnan(got[1].astype(np.float64)).all(), "the NaN row"
    assert np.isnan(got[2].astype(np.float64)).any(), "the Inf row"
    clean = _run(op, x[[0, 3]], w, b, weight_offset=1.0, rounding=rounding)
    assert_bitwise_equal(got[[0, 3]], clean, "rows without NaN/Inf")


# ---- 3. in place -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_in_place_forward(op, dtype):
    x, _, w, b = _inputs(op, (33, 260), dtype, seed=12)
    exp = _run(op, x, w, b)
    xc = x.copy()
    got = _run(op, xc, w, b, out=xc)
    assert got is xc
    assert_bitwise_equal(xc, exp, f"{op} out=x")
    # a strided view (rows of a wider buffer), in place: the columns beyond it untouched
    wide = np.concatenate([x, x[:, :5]], axis=1)
    view = wide[:, :260]
    _run(op, view, w, b, out=view)
    assert_bitwise_equal(view, exp, f"{op} out=x on a strided view")
    assert_bitwise_equal(wide[:, 260:], x[:, :5], "the columns beyond the view")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_in_place_fused_add(op, dtype):
    """out=(x, residual): h = round(x + residual) over residual, y over x (vLLM's
    fused_add_rms_norm); the swapped pair (residual, x) works too."""
    x, res, w, b = _inputs(op, (17, 130), dtype, seed=13, fused=True)
    y, h = _run(op, x, w, b, res)
    xc, rc = x.copy(), res.copy()
    got = _run(op, xc, w, b, rc, out=(xc, rc))
    assert got[0] is xc and got[1] is rc
    assert_bitwise_equal(xc, y, f"{op} y over x")
    assert_bitwise_equal(rc, h, f"{op} h over residual")
    xc, rc = x.copy(), res.copy()
    _run(op, xc, w, b, rc, out=(rc, xc))
    assert_bitwise_equal(rc, y, f"{op} y over residual")
    assert_bitwise_equal(xc, h, f"{op} h over x")


def test_in_place_with_options_and_threads():
    x, res, w, _ = _inputs("rms", (512, 768), BF16, seed=14, fused=True)
    y, h = pynorm.add_rms_norm(x, res, w, weight_offset=1.0, rounding="llama")
    xc, rc = x.copy(), res.copy()
    pynorm.add_rms_norm(xc, rc, w, weight_offset=1.0, rounding="llama", out=(xc, rc))
    assert_bitwise_equal(xc, y, "y over x")
    assert_bitwise_equal(rc, h, "h over residual")


@pytest.mark.parametrize("op", OPS)
def test_other_overlaps_stay_errors(op):
    x, res, w, b = _inputs(op, (8, 64), F32, seed=15, fused=True)
    buf = np.concatenate([x, x[:1]])
    xv, shifted = buf[:8], buf[1:9]          # overlapping views of one buffer, not the same view
    snap = buf.copy()
    with pytest.raises(ValueError, match="out overlaps x"):
        _run(op, xv, w, b, out=shifted)
    with pytest.raises(ValueError, match="out overlaps x"):
        _run(op, xv, w, b, out=xv[::-1])
    assert_bitwise_equal(buf, snap, "x after refused calls")
    with pytest.raises(ValueError, match="h out overlaps out"):
        _run(op, x.copy(), w, b, res, out=(xv, xv))
    big = np.ones(8 * 64, np.float32)
    with pytest.raises(ValueError, match="out overlaps weight"):
        _run(op, x, big[:64], b, out=big.reshape(8, 64))


# ---- 5. heads: strided views, no copy ------------------------------------------------

def _no_copies(monkeypatch):
    """Fail the test if a call copies any buffer (row_layout replaces it by a dense array)."""
    def refuse(i, buffers, *a):
        raise AssertionError(f"{buffers[i][1]} was copied")
    monkeypatch.setattr(pynorm._arrays, "_replace", refuse)


def _qkv(B, S, Hq, Hk, D, dtype, seed=16, extra_s=0):
    rng = np.random.default_rng(seed)
    return randn(rng, (B, S + extra_s, (Hq + 2 * Hk) * D), dtype)


HEAD_VIEWS = {
    # name: view of a fused qkv buffer (B, S', (Hq + 2 Hk) * D) -> q heads
    "3d-T,H,D": lambda qkv, B, S, Hq, Hk, D: qkv.reshape(B * qkv.shape[1], Hq + 2 * Hk, D)[:, :Hq],
    "4d-B,S,H,D": lambda qkv, B, S, Hq, Hk, D: qkv.reshape(B, qkv.shape[1], Hq + 2 * Hk, D)[:, :S, :Hq],
    "4d-k-heads": lambda qkv, B, S, Hq, Hk, D: qkv.reshape(B, qkv.shape[1], Hq + 2 * Hk, D)[:, :S, Hq:Hq + Hk],
    "4d-B,H,S,D": lambda qkv, B, S, Hq, Hk, D:
        qkv.reshape(B, qkv.shape[1], Hq + 2 * Hk, D)[:, :S, :Hq].transpose(0, 2, 1, 3),
}


@pytest.mark.parametrize("extra_s", [0, 3], ids=["S-whole", "S-sliced"])
@pytest.mark.parametrize("view", list(HEAD_VIEWS))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dname)
@pytest.mark.parametrize("op", OPS)
def test_heads_read_and_written_in_place_without_copy(op, dtype, view, extra_s, monkeypatch):
    B, S, Hq, Hk, D = 2, 5, 4, 2, 64
    qkv = _qkv(B, S, Hq, Hk, D, dtype, extra_s=extra_s)
    if view == "3d-T,H,D" and extra_s:
        pytest.skip("the 3-D view has no S axis to slice")
    q = HEAD_VIEWS[view](qkv, B, S, Hq, Hk, D)
    _, _, w, b = _inputs(op, (1, D), dtype, seed=17)
    dense = np.ascontiguousarray(q)
    exp = _run(op, dense, w, b, weight_offset=1.0)
    untouched = qkv.copy()
    mask = np.ones(qkv.shape, bool)
    HEAD_VIEWS[view](mask, B, S, Hq, Hk, D)[...] = False
    _no_copies(monkeypatch)
    assert_bitwise_equal(_run(op, q, w, b, weight_offset=1.0), exp, f"{op} {view} into a new array")
    got = _run(op, q, w, b, weight_offset=1.0, out=q)
    assert got is q
    assert_bitwise_equal(q, exp, f"{op} {view} in place")
    assert_bitwise_equal(qkv[mask], untouched[mask], "the rest of the qkv buffer")


@pytest.mark.parametrize("op", OPS)
def test_heads_backward_without_copy(op, monkeypatch):
    B, S, Hq, Hk, D = 2, 4, 3, 1, 32
    qkv = _qkv(B, S, Hq, Hk, D, F32, extra_s=2)
    q = HEAD_VIEWS["4d-B,S,H,D"](qkv, B, S, Hq, Hk, D)
    dy = randn(np.random.default_rng(18), q.shape, F32)
    _, _, w, b = _inputs(op, (1, D), F32, seed=19)
    dense = np.ascontiguousarray(q)
    if op == "rms":
        _, rstd = pynorm.rms_norm_forward(dense, w)
        exp = pynorm.rms_norm_backward(dy, dense, rstd, w, weight_offset=1.0)
        _no_copies(monkeypatch)
        got = pynorm.rms_norm_backward(dy, q, rstd, w, weight_offset=1.0)
    else:
        _, mean, rstd = pynorm.layer_norm_forward(dense, w, b)
        exp = pynorm.layer_norm_backward(dy, dense, mean, rstd, w, weight_offset=1.0)
        _no_copies(monkeypatch)
        got = pynorm.layer_norm_backward(dy, q, mean, rstd, w, weight_offset=1.0)
    for g, e, n in zip(got, exp, ("dx", "dweight", "dbias")):
        assert_bitwise_equal(g, e, f"{op} {n} on a head view")


# ---- bad arguments ----------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(weight_offset=float("nan")), ValueError, "weight_offset must be finite"),
    (dict(weight_offset=float("inf")), ValueError, "weight_offset must be finite"),
    (dict(weight_offset="1"), TypeError, "weight_offset must be a real number"),
    (dict(weight_offset=True), TypeError, "weight_offset must be a real number"),
    (dict(rounding="Llama"), ValueError, "rounding must be"),
    (dict(rounding=None), TypeError, "rounding must be a str"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD_OPTIONS, ids=[str(k) for k, _, _ in BAD_OPTIONS])
@pytest.mark.parametrize("fn", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "rms_norm_forward",
                                "layer_norm_forward", "rms_norm_backward", "layer_norm_backward"])
def test_bad_options_name_the_argument_and_write_nothing(fn, kw, exc, msg):
    x, res, w, b = _inputs("layer", (3, 16), F32, seed=20, fused=True)
    out = np.full_like(x, 7.0)
    stats = np.ones(3, np.float32)
    calls = {
        "rms_norm": lambda: pynorm.rms_norm(x, w, out=out, **kw),
        "layer_norm": lambda: pynorm.layer_norm(x, w, b, out=out, **kw),
        "add_rms_norm": lambda: pynorm.add_rms_norm(x, res, w, out=(out, None), **kw),
        "add_layer_norm": lambda: pynorm.add_layer_norm(x, res, w, b, out=(out, None), **kw),
        "rms_norm_forward": lambda: pynorm.rms_norm_forward(x, w, **kw),
        "layer_norm_forward": lambda: pynorm.layer_norm_forward(x, w, b, **kw),
        "rms_norm_backward": lambda: pynorm.rms_norm_backward(x, x, stats, w, out=(out, None), **kw),
        "layer_norm_backward": lambda: pynorm.layer_norm_backward(x, x, stats, stats, w, out=(out, None, None), **kw),
    }
    with pytest.raises(exc, match=msg):
        calls[fn]()
    assert (out == 7.0).all(), "a refused call wrote its output"


@pytest.mark.parametrize("fn", ["rms_norm", "layer_norm", "rms_norm_backward"])
def test_weight_offset_without_weight_is_an_error(fn):
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="weight_offset=1.0 needs a weight"):
        if fn == "rms_norm":
            pynorm.rms_norm(x, None, weight_offset=1.0)
        elif fn == "layer_norm":
            pynorm.layer_norm(x, None, weight_offset=1.0)
        else:
            pynorm.rms_norm_backward(x, x, np.ones(2, np.float32), None, weight_offset=1.0)
    # offset 0 without a weight is the plain norm
    assert_bitwise_equal(pynorm.rms_norm(x, None, weight_offset=0.0), pynorm.rms_norm(x), "offset 0, no weight")


# ---- the C API's own checks -------------------------------------------------------------

def _c_rms(x, y, w, opts, strides=ffi.NULL):
    p = lambda a: ffi.cast("void *", a.ctypes.data) if a is not None else ffi.NULL
    return lib.pn_rmsnorm_forward_ex(p(y), ffi.NULL, p(x), p(w), 1, x.shape[0], x.shape[1], 1e-6,
                                     lib.PN_FLOAT32, lib.PN_FLOAT32, strides, opts)


@pytest.mark.parametrize("field,value,status", [
    ("weight_offset", float("nan"), "PN_ERR_ARG"), ("weight_offset", float("-inf"), "PN_ERR_ARG"),
    ("rounding", 2, "PN_ERR_ARG"), ("rounding", -1, "PN_ERR_ARG"), ("H", -1, "PN_ERR_SIZE"),
    ("H", 1 << 62, "PN_ERR_SIZE")])
def test_c_options_checked_before_any_write(field, value, status):
    x = np.ones((4, 8), np.float32)
    y = np.full_like(x, 7.0)
    w = np.ones(8, np.float32)
    o = ffi.new("pn_norm_options *")
    setattr(o, field, value)
    assert _c_rms(x, y, w, o) == getattr(lib, status)
    assert (y == 7.0).all()


def test_c_offset_needs_weight_and_null_options_are_the_defaults():
    x = np.random.default_rng(21).standard_normal((4, 8)).astype(np.float32)
    y, y0 = np.full_like(x, 7.0), np.empty_like(x)
    o = ffi.new("pn_norm_options *")
    o.weight_offset = 1.0
    assert _c_rms(x, y, None, o) == lib.PN_ERR_ARG
    assert (y == 7.0).all()
    w = np.ones(8, np.float32)
    assert _c_rms(x, y, w, ffi.NULL) == lib.PN_OK
    assert _c_rms(x, y0, w, ffi.new("pn_norm_options *")) == lib.PN_OK
    assert_bitwise_equal(y, y0, "NULL options vs zeroed options")
    assert_bitwise_equal(y, pynorm.rms_norm(x, w, 1e-6), "the _ex function vs the 0.1 one")


def test_c_heads_layout_and_overlapping_head_rows():
    """H > 1: row (b, t, k) at b*rows.b + t*rows.t + k*head; output heads that overlap each
    other are PN_ERR_STRIDE."""
    T, H, D, W = 3, 4, 8, 48                       # each t: H heads of D, in a row of W
    rng = np.random.default_rng(22)
    buf = rng.standard_normal((T, W)).astype(np.float32)
    x = buf[:, :H * D].reshape(T, H, D)
    y = np.zeros((T, W), np.float32)
    s = ffi.new("pn_strides *")
    s.inp.b, s.inp.t = T * W, W
    s.out.b, s.out.t = T * W, W
    o = ffi.new("pn_norm_options *")
    o.H = H
    o.head.inp, o.head.out = D, D
    p = lambda a: ffi.cast("void *", a.ctypes.data)
    w = np.ones(D, np.float32)
    st = lib.pn_rmsnorm_forward_ex(p(y), ffi.NULL, p(buf), p(w), 1, T, D, 1e-6, lib.PN_FLOAT32, lib.PN_FLOAT32, s, o)
    assert st == lib.PN_OK
    assert_bitwise_equal(y[:, :H * D].reshape(T, H, D), pynorm.rms_norm(np.ascontiguousarray(x), w, 1e-6),
                         "B x T x H rows")
    assert (y[:, H * D:] == 0).all()
    o.head.out = D // 2                            # heads of the output overlap
    y2 = np.zeros_like(y)
    st = lib.pn_rmsnorm_forward_ex(p(y2), ffi.NULL, p(buf), p(w), 1, T, D, 1e-6, lib.PN_FLOAT32, lib.PN_FLOAT32, s, o)
    assert st == lib.PN_ERR_STRIDE
    assert (y2 == 0).all()


# ---- 4. fused quantized output ---------------------------------------------------------
# For float32 data the norm's float32 y is rms_norm's/layer_norm's own output (nothing is
# rounded on the way out), so the quantization is checked bit for bit against NumPy and
# ml_dtypes applied to that y; other dtypes against y computed by the float32 path from
# the same values, which is the same y (loads are exact, the arithmetic is float32).

import ml_dtypes  # noqa: E402

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
MIN_SCALE = {"int8": np.float32(np.finfo(np.float32).eps), "float8_e4m3fn": np.float32(1.0 / (448 * 512))}


def _q_ref(y, qdtype, scale):
    """Q(y / scale) with y, scale float32 (true division in float32)."""
    t = (y / scale).astype(np.float32)
    if qdtype == "int8":
        with np.errstate(invalid="ignore"):
            r = np.clip(np.rint(np.nan_to_num(t, nan=0.0, posinf=127.0, neginf=-128.0)), -128, 127)
        return r.astype(np.int8)
    return np.clip(t, -448, 448).astype(FP8)


def _dyn_ref(y, qdtype, group, scale_ub=None):
    lead, C = y.shape[:-1], y.shape[-1]
    g = y.reshape(lead + (C // group, group))
    with np.errstate(invalid="ignore"):
        amax = np.abs(g).max(-1)
    if scale_ub is not None:
        amax = np.where(amax > np.float32(scale_ub), np.float32(scale_ub), amax)
    s = (amax / np.float32(QMAX[qdtype])).astype(np.float32)
    s = np.where(s < MIN_SCALE[qdtype], MIN_SCALE[qdtype], s).astype(np.float32)
    return _q_ref(g, qdtype, s[..., None]).reshape(y.shape), s


def _y32(op, x, w, b, **kw):
    """The float32 y of the norm for x's values (float32 compute, no rounding to x's dtype
    except where rounding="llama" asks for it)."""
    if x.dtype == F32 or x.dtype == F64:
        xf = x.astype(F32) if x.dtype == F32 else x
        y = _run(op, xf, w, b, **kw)
        return y.astype(F32)
    return None


def _bits_equal(got, exp, what):
    g, e = np.asarray(got), np.asarray(exp)
    assert g.dtype == e.dtype and g.shape == e.shape, f"{what}: {g.dtype}{g.shape} vs {e.dtype}{e.shape}"
    gb, eb = g.view(np.uint8 if g.itemsize == 1 else np.uint32), e.view(np.uint8 if e.itemsize == 1 else np.uint32)
    bad = gb != eb
    if g.dtype == np.float32:
        bad &= ~(np.isnan(g) & np.isnan(e))
    assert not bad.any(), f"{what}: {int(bad.sum())} of {g.size} differ; first at {np.argwhere(bad)[0]}"


@pytest.mark.parametrize("group", [None, 32, 128], ids=["row", "g32", "g128"])
@pytest.mark.parametrize("qdtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("op", OPS)
def test_quant_dynamic_bit_for_bit(op, qdtype, group):
    x, _, w, b = _inputs(op, (3, 7, 256), F32, seed=30)
    x[0, 0, :5] *= 1e3                                   # a hostile row: outliers
    x[1, 1] = 0                                          # an all-zero row: min_scale
    kw = dict(weight_offset=1.0)
    fn = pynorm.rms_norm_quant if op == "rms" else pynorm.layer_norm_quant
    args = (x, w) if op == "rms" else (x, w, b)
    q, s = fn(*args, qdtype=qdtype, group_size=group, **kw)
    y = _y32(op, x, w, b, **kw)
    q_ref, s_ref = _dyn_ref(y, qdtype, group or 256)
    _bits_equal(s, s_ref, f"{op} {qdtype} scales")
    _bits_equal(q, q_ref, f"{op} {qdtype} q")
    assert q.dtype == (np.int8 if qdtype == "int8" else FP8)
    assert s.shape == x.shape[:-1] + (256 // (group or 256),)


@pytest.mark.parametrize("qdtype", ["int8", "float8_e4m3fn"])
def test_quant_static_saturates(qdtype):
    x, _, w, _ = _inputs("rms", (16, 96), F32, seed=31)
    q, s = pynorm.rms_norm_quant(x, w, qdtype=qdtype, scale=0.003)  # y / scale far beyond qmax
    y = _y32("rms", x, w, None)
    _bits_equal(q, _q_ref(y, qdtype, np.float32(0.003)), f"static {qdtype}")
    assert s.shape == (1,) and s[0] == np.float32(0.003)
    qa = q.astype(np.float32)
    assert qa.max() == QMAX[qdtype] and qa.min() == (-128 if qdtype == "int8" else -448), "saturation"


def test_quant_scale_ub_bounds_amax():
    x, _, w, _ = _inputs("rms", (8, 64), F32, seed=32)
    x[:, 0] = 1e4                                        # one huge value per row
    q, s = pynorm.rms_norm_quant(x, w, qdtype="float8_e4m3fn", scale_ub=1.0)
    y = _y32("rms", x, w, None)
    q_ref, s_ref = _dyn_ref(y, "float8_e4m3fn", 64, scale_ub=1.0)
    _bits_equal(s, s_ref, "scales with scale_ub")
    _bits_equal(q, q_ref, "q with scale_ub (the huge values clamp to 448)")


@pytest.mark.parametrize("dtype", [F16, BF16, F64], ids=dname)
@pytest.mark.parametrize("rounding", ["once", "llama"])
def test_quant_other_dtypes_and_residual(dtype, rounding):
    """y of half data quantized: the scales match the float32 y of the reference to a few ulps,
    q within one step; the residual form returns h = round(x + residual)."""
    x, res, w, _ = _inputs("rms", (6, 128), dtype, seed=33, fused=True)
    q, s, h = pynorm.rms_norm_quant(x, w, qdtype="int8", group_size=64, residual=res, rounding=rounding)
    assert_bitwise_equal(h, R.residual_add_ref(x, res), "h")
    y = R.rms_norm_ref(h, w, None, rounding=rounding)[0].astype(np.float32)
    q_ref, s_ref = _dyn_ref(y, "int8", 64)
    assert np.allclose(s, s_ref, rtol=1e-5, atol=0), "scales vs the reference's"
    assert np.abs(q.astype(np.int32) - q_ref.astype(np.int32)).max() <= 1


@pytest.mark.parametrize("qdtype", ["int8", "float8_e4m3fn"])
def test_quant_nan_and_inf(qdtype):
    """A group holding a NaN gets scale NaN and q 0 (int8) / NaN (float8); other groups are
    unaffected. Nothing crashes."""
    x, _, w, _ = _inputs("rms", (3, 64), F32, seed=34)
    x[1, 3] = np.nan
    q, s = pynorm.rms_norm_quant(x, w, qdtype=qdtype, group_size=32)
    assert np.isnan(s[1]).all()
    if qdtype == "int8":
        assert (q[1] == 0).all()
    else:
        assert np.isnan(q[1].astype(np.float32)).all()
    clean, sc = pynorm.rms_norm_quant(x[[0, 2]], w, qdtype=qdtype, group_size=32)
    _bits_equal(q[[0, 2]], clean, "rows without NaN")
    x[2, 0] = np.inf                                     # an Inf row: rstd 0, y NaN there too
    q, s = pynorm.rms_norm_quant(x, w, qdtype=qdtype)
    assert q.shape == x.shape


BAD_QUANT = [
    (dict(qdtype="int4"), ValueError, "qdtype must be"),
    (dict(qdtype=None), TypeError, "qdtype must be a str"),
    (dict(scale=0.0), ValueError, "scale must be a positive"),
    (dict(scale=-1.0), ValueError, "scale must be a positive"),
    (dict(scale=float("nan")), ValueError, "scale must be a positive"),
    (dict(scale=1e-50), ValueError, "scale must be a positive"),
    (dict(scale="1"), TypeError, "scale must be a real number"),
    (dict(scale=1.0, group_size=8), ValueError, "group_size is for dynamic"),
    (dict(group_size=7), ValueError, "group_size must be a positive divisor"),
    (dict(group_size=0), ValueError, "group_size must be a positive divisor"),
    (dict(group_size=8.0), TypeError, "group_size must be an int"),
    (dict(scale_ub=1.0), ValueError, "scale_ub is for qdtype"),
    (dict(qdtype="float8_e4m3fn", scale_ub=-1.0), ValueError, "scale_ub must be finite and > 0"),
    (dict(weight_offset=1.0, weight=None), ValueError, "weight_offset"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD_QUANT, ids=[str(k) for k, _, _ in BAD_QUANT])
def test_quant_bad_arguments_name_them(kw, exc, msg):
    x, _, w, _ = _inputs("rms", (2, 32), F32, seed=35)
    kw = dict(kw)
    w = kw.pop("weight", w)
    with pytest.raises(exc, match=msg):
        pynorm.rms_norm_quant(x, w, **kw)


@pytest.mark.parametrize("qdtype", ["int8", "float8_e4m3fn"])
def test_quant_conversion_on_every_tie_and_edge(qdtype):
    """Q itself: with x a row of ones and eps 0, rstd is exactly 1 and y is the weight, so a
    static scale of 1 quantizes chosen values: every float8 value, the midpoints between
    neighbours (ties to even), subnormals, values beyond qmax, +-0, +-Inf and NaN."""
    grid = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])
    mids = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)
    ints = np.arange(-130, 131, dtype=np.float32)
    vals = np.concatenate([grid, mids, ints, ints + 0.5, np.float32([0.0, -0.0, 1e-45, -3e-3, 448.5, 464.0,
                                                                      1e30, -1e30, np.inf, -np.inf, np.nan])])
    vals = vals.astype(np.float32)
    x = np.ones((1, vals.size), np.float32)
    q, _ = pynorm.rms_norm_quant(x, vals, 0.0, qdtype=qdtype, scale=1.0)
    _bits_equal(q[0], _q_ref(vals, qdtype, np.float32(1.0)), f"Q for {qdtype}")
