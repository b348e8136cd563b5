"""pynorm on CUDA arrays (libpynorm_cuda through pynorm._cuda), checked against
torch CUDA, the CPU library and the float64 NumPy reference (tests/reference.py).

Every test here is marked `cuda` and skipped, with the reason, unless CuPy, a
CUDA device, a CUDA build of torch and libpynorm_cuda are all present.

Accuracy rule (as the CPU suite's): pynorm's max abs error against the float64
reference is at most 2x the baseline's (torch CUDA; the CPU library) on the
same data, plus two ulps of the output dtype at the largest |reference|.
"""

import zlib

import ml_dtypes
import numpy as np
import pytest

import pynorm
import reference as R
from pynorm import _cuda

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F32, F16, BF16, F64]
DNAME = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64"}


def _probe():
    """(cupy, torch, reason): reason is None when the CUDA tests can run."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CuPy that cannot find its CUDA libraries
        return None, None, f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return None, None, f"no usable CUDA device ({type(e).__name__}: {e})"
    if n == 0:
        return None, None, "no CUDA device"
    try:
        import torch
    except Exception as e:
        return None, None, f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        return None, None, "torch has no CUDA support here (the CUDA tests compare with torch CUDA)"
    try:
        _cuda.library()
    except RuntimeError as e:
        return None, None, f"libpynorm_cuda is not available: {e}"
    return cupy, torch, None


cp, torch, _SKIP_REASON = _probe()

try:
    _CUDA_MARK = [pytest.mark.cuda]
except pytest.fail.Exception:  # "cuda" not registered while --strict-markers is on
    _CUDA_MARK = []
pytestmark = _CUDA_MARK + [pytest.mark.skipif(_SKIP_REASON is not None, reason=str(_SKIP_REASON))]

if _SKIP_REASON is None:
    import torch.nn.functional as F

    TORCH_DT = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16, F64: torch.float64}
    try:
        cp.empty(0, BF16)
        HAVE_BF16 = True
    except Exception:
        HAVE_BF16 = False
else:
    F = None
    TORCH_DT = {}
    HAVE_BF16 = False

FWD_OPS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "layer_norm_forward", "rms_norm_forward"]
BWD_OPS = ["layer_norm_backward", "rms_norm_backward"]

# C from 1 to 65536 (odd, not multiples of 8, and the kernels' thresholds:
# 256/512/768/1024 warp sizes, 8192/16384 register limits); odd row counts.
SHAPES = [(7, 1), (3, 5, 3), (1, 7), (5, 64), (3, 3, 255), (9, 257), (7, 768), (2, 3, 1000), (5, 1024),
          (3, 1025), (3, 4097), (3, 8192), (3, 8193), (3, 16384), (3, 16385), (1, 65536), (3, 65536)]
SHAPES_MANY_ROWS = [(301, 768), (2, 129, 96), (257, 4096)]


def _id(shape):
    return "x".join(map(str, shape))


def _need(dtype):
    if dtype == BF16 and not HAVE_BF16:
        pytest.skip("this CuPy has no bfloat16 (needs CuPy 14+ with ml_dtypes)")


def _wmodes(dtype):
    return ["none", "same"] + ([] if dtype == F32 else ["f32"])


def is_ln(op):
    return op.startswith("layer") or op.startswith("add_layer")


def fused(op):
    return op.startswith("add_")


def seed_for(*parts):
    return zlib.crc32(repr(parts).encode())


def eps_of(dtype):
    return float(ml_dtypes.finfo(dtype).eps)


# ---- conversions ------------------------------------------------------------------------

def n2c(a):
    """NumPy -> CuPy (bfloat16 through its bits)."""
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return cp.asarray(a.view(np.uint16)).view(BF16)
    return cp.asarray(a)


def c2n(a):
    """CuPy -> NumPy."""
    if a is None:
        return None
    if a.dtype == BF16:
        return cp.asnumpy(cp.ascontiguousarray(a).view(cp.uint16)).view(BF16)
    return cp.asnumpy(a)


def c2t(a):
    """CuPy -> torch CUDA (shares memory)."""
    if a is None:
        return None
    if a.dtype == BF16:
        return torch.from_dlpack(a.view(cp.uint16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def t2n(t, dtype):
    """torch -> NumPy of `dtype` (one rounding from the tensor's dtype)."""
    t = t.detach().to(TORCH_DT[dtype]).contiguous().cpu()
    if dtype == BF16:
        return t.view(torch.int16).numpy().view(BF16).copy()
    return t.numpy().copy()


def randn(rng, shape, dtype, loc=0.0, scale=1.0):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def bits(a):
    a = np.ascontiguousarray(np.asarray(a)).reshape(-1)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_bits(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    g, w = bits(got), bits(want)
    nan = np.isnan(got.astype(np.float64).reshape(-1)) & np.isnan(want.astype(np.float64).reshape(-1))
    bad = (g != w) & ~nan
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} elements differ bitwise (first at {int(np.flatnonzero(bad)[0])})"


def check_acc(what, got, base, ref, dtype, base_name, factor=2.0, slack_ulps=2.0):
    """max|got - ref| <= factor * max|base - ref| + slack_ulps ulps of dtype at max|ref|."""
    ref = np.asarray(ref, np.float64)
    if ref.size == 0:
        return
    e_got = R.max_abs_err(got, ref)
    e_base = R.max_abs_err(base, ref)
    fin = np.abs(ref[np.isfinite(ref)])
    scale = float(fin.max()) if fin.size and fin.max() > 0 else 1.0
    slack = slack_ulps * eps_of(dtype) * scale
    assert e_got <= factor * e_base + slack, (
        f"{what}: max abs error {e_got:.4g} vs the float64 reference exceeds {factor:g} x {base_name}'s "
        f"{e_base:.4g} + {slack:.3g} ({DNAME[np.dtype(dtype)]}, scale {scale:.4g})")


# ---- the three implementations -------------------------------------------------------------

def make_inputs(op, dtype, shape, wmode, seed, loc=0.0):
    rng = np.random.default_rng(seed)
    C = shape[-1]
    x = randn(rng, shape, dtype, loc=loc)
    r = randn(rng, shape, dtype) if fused(op) else None
    wdt = {"none": None, "same": dtype, "f32": F32}[wmode]
    w = randn(rng, (C,), wdt, loc=1.0, scale=0.5) if wdt is not None else None
    b = randn(rng, (C,), wdt, scale=0.5) if (wdt is not None and is_ln(op)) else None
    dy = randn(rng, shape, dtype)
    return x, r, w, b, dy


def eps_for(op, dtype):
    return 1e-5 if is_ln(op) else R.default_rms_eps(dtype)


def run_cuda_forward(op, x, r, w, b, eps):
    """pynorm on CuPy arrays: dict of NumPy results."""
    X, Rr, W, B = n2c(x), n2c(r), n2c(w), n2c(b)
    if op == "layer_norm":
        out = {"y": pynorm.layer_norm(X, W, B, eps)}
    elif op == "rms_norm":
        out = {"y": pynorm.rms_norm(X, W, eps)}
    elif op == "add_layer_norm":
        y, h = pynorm.add_layer_norm(X, Rr, W, B, eps)
        out = {"y": y, "h": h}
    elif op == "add_rms_norm":
        y, h = pynorm.add_rms_norm(X, Rr, W, eps)
        out = {"y": y, "h": h}
    elif op == "layer_norm_forward":
        y, m, s = pynorm.layer_norm_forward(X, W, B, eps)
        out = {"y": y, "mean": m, "rstd": s}
    else:
        y, s = pynorm.rms_norm_forward(X, W, eps)
        out = {"y": y, "rstd": s}
    for k, v in out.items():
        assert isinstance(v, cp.ndarray), f"{op}: {k} is a {type(v).__name__}, expected a CuPy array"
        assert v.flags.c_contiguous
    return {k: c2n(v) for k, v in out.items()}


def run_cpu_forward(op, x, r, w, b, eps):
    if op == "layer_norm":
        return {"y": pynorm.layer_norm(x, w, b, eps)}
    if op == "rms_norm":
        return {"y": pynorm.rms_norm(x, w, eps)}
    if op == "add_layer_norm":
        return dict(zip("yh", pynorm.add_layer_norm(x, r, w, b, eps)))
    if op == "add_rms_norm":
        return dict(zip("yh", pynorm.add_rms_norm(x, r, w, eps)))
    if op == "layer_norm_forward":
        return dict(zip(("y", "mean", "rstd"), pynorm.layer_norm_forward(x, w, b, eps)))
    return dict(zip(("y", "rstd"), pynorm.rms_norm_forward(x, w, eps)))


def _torch_compute(dtype, *params):
    """torch natively for equal dtypes; mixed (float32 weight, half x) upcast to
    float32 and rounded once, which is pynorm's semantics."""
    if all(p is None or p.dtype == dtype for p in params):
        return TORCH_DT[dtype]
    return torch.float64 if dtype == F64 else torch.float32


def run_torch_forward(op, x, r, w, b, eps):
    dev = "cuda"
    dtype = x.dtype
    C = x.shape[-1]
    xt = c2t(n2c(x)).clone()
    out = {}
    if fused(op):
        xt = xt + c2t(n2c(r))
        out["h"] = t2n(xt, dtype)
    cdt = _torch_compute(dtype, w, b)
    xs = xt.to(cdt)
    wt = None if w is None else c2t(n2c(w)).to(cdt)
    bt = None if b is None else c2t(n2c(b)).to(cdt)
    if is_ln(op):
        y = F.layer_norm(xs, (C,), wt, bt, eps)
        if op == "layer_norm_forward":
            _, m, s = torch.ops.aten.native_layer_norm(xt, (C,), None, None, eps)
            sdt = R.stat_dtype(dtype)
            out["mean"], out["rstd"] = t2n(m.reshape(x.shape[:-1]), sdt), t2n(s.reshape(x.shape[:-1]), sdt)
    else:
        y = F.rms_norm(xs, (C,), wt, eps)
        if op == "rms_norm_forward":
            sdt = R.stat_dtype(dtype)
            xf = xt.to(TORCH_DT[sdt])
            out["rstd"] = t2n(torch.rsqrt(xf.pow(2).mean(-1) + eps), sdt)
    out["y"] = t2n(y, dtype)
    torch.cuda.synchronize(dev)
    return out


def run_reference_forward(op, x, r, w, b, eps):
    src = R.residual_add_ref(x, r) if fused(op) else x
    if is_ln(op):
        y, m, s = R.layer_norm_ref(src, w, b, eps)
        out = {"y": y, "mean": m, "rstd": s}
    else:
        y, s = R.rms_norm_ref(src, w, eps)
        out = {"y": y, "rstd": s}
    if fused(op):
        out["h"] = src
    return out


# ---- forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES + SHAPES_MANY_ROWS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("op", FWD_OPS)
def test_forward(op, dtype, shape):
    _need(dtype)
    for wmode in _wmodes(dtype):
        x, r, w, b, _ = make_inputs(op, dtype, shape, wmode, seed=seed_for(op, DNAME[dtype], shape, wmode))
        eps = eps_for(op, dtype)
        got = run_cuda_forward(op, x, r, w, b, eps)
        cpu = run_cpu_forward(op, x, r, w, b, eps)
        tch = run_torch_forward(op, x, r, w, b, eps)
        ref = run_reference_forward(op, x, r, w, b, eps)
        what = f"{op} {DNAME[dtype]} {_id(shape)} weight={wmode}"
        if fused(op):
            assert_same_bits(got["h"], tch["h"], f"{what}: h vs torch's x + residual")
            assert_same_bits(got["h"], cpu["h"], f"{what}: h vs the CPU library's")
        for k in got:
            if k == "h":
                continue
            assert got[k].shape == cpu[k].shape and got[k].dtype == cpu[k].dtype, f"{what}: {k} meta"
            kd = dtype if k == "y" else R.stat_dtype(dtype)
            check_acc(f"{what}: {k}", got[k], cpu[k], ref[k], kd, "the CPU library's")
            if k in tch:
                check_acc(f"{what}: {k}", got[k], tch[k], ref[k], kd, "torch CUDA's")


# ---- backward ---------------------------------------------------------------------------------

def run_cuda_backward(op, x, dy, w, eps):
    X, DY, W = n2c(x), n2c(dy), n2c(w)
    if op == "layer_norm_backward":
        _, m, s = pynorm.layer_norm_forward(X, W, None, eps)
        g = pynorm.layer_norm_backward(DY, X, m, s, W)
        names = ("dx", "dweight", "dbias")
    else:
        _, s = pynorm.rms_norm_forward(X, W, eps)
        g = pynorm.rms_norm_backward(DY, X, s, W)
        names = ("dx", "dweight")
    for v in g:
        assert isinstance(v, cp.ndarray)
    return {k: c2n(v) for k, v in zip(names, g)}


def run_cpu_backward(op, x, dy, w, eps):
    if op == "layer_norm_backward":
        _, m, s = pynorm.layer_norm_forward(x, w, None, eps)
        return dict(zip(("dx", "dweight", "dbias"), pynorm.layer_norm_backward(dy, x, m, s, w)))
    _, s = pynorm.rms_norm_forward(x, w, eps)
    return dict(zip(("dx", "dweight"), pynorm.rms_norm_backward(dy, x, s, w)))


def run_torch_backward(op, x, dy, w, eps):
    dtype = x.dtype
    C = x.shape[-1]
    gdt = F32 if w is None else w.dtype
    cdt = _torch_compute(dtype, w) if w is not None else (torch.float64 if dtype == F64 else torch.float32)
    xt = c2t(n2c(x)).to(cdt).clone().requires_grad_(True)
    dyt = c2t(n2c(dy)).to(cdt)
    wt = (c2t(n2c(w)).to(cdt) if w is not None else torch.ones(C, dtype=cdt, device="cuda")).clone().requires_grad_(True)
    if op == "layer_norm_backward":
        bt = torch.zeros(C, dtype=cdt, device="cuda", requires_grad=True)
        y = F.layer_norm(xt, (C,), wt, bt, eps)
    else:
        bt = None
        y = F.rms_norm(xt, (C,), wt, eps)
    y.backward(dyt)
    out = {"dx": t2n(xt.grad, dtype), "dweight": t2n(wt.grad, gdt)}
    if bt is not None:
        out["dbias"] = t2n(bt.grad, gdt)
    return out


def run_reference_backward(op, x, dy, w, eps):
    if op == "layer_norm_backward":
        return dict(zip(("dx", "dweight", "dbias"), R.layer_norm_backward_ref(dy, x, w, eps)))
    return dict(zip(("dx", "dweight"), R.rms_norm_backward_ref(dy, x, w, eps)))


@pytest.mark.parametrize("shape", SHAPES + SHAPES_MANY_ROWS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("op", BWD_OPS)
def test_backward(op, dtype, shape):
    _need(dtype)
    for wmode in _wmodes(dtype):
        x, _, w, _, dy = make_inputs(op, dtype, shape, wmode, seed=seed_for(op, DNAME[dtype], shape, wmode))
        eps = eps_for(op, dtype)
        got = run_cuda_backward(op, x, dy, w, eps)
        cpu = run_cpu_backward(op, x, dy, w, eps)
        tch = run_torch_backward(op, x, dy, w, eps)
        ref = run_reference_backward(op, x, dy, w, eps)
        what = f"{op} {DNAME[dtype]} {_id(shape)} weight={wmode}"
        for k in got:
            assert got[k].shape == cpu[k].shape and got[k].dtype == cpu[k].dtype, f"{what}: {k} meta"
            kd = dtype if k == "dx" else (F32 if w is None else w.dtype)
            check_acc(f"{what}: {k}", got[k], cpu[k], ref[k], kd, "the CPU library's")
            check_acc(f"{what}: {k}", got[k], tch[k], ref[k], kd, "torch CUDA's")


# ---- determinism ------------------------------------------------------------------------------

DET_SHAPES = [(33, 7), (65, 768), (9, 1000), (17, 4096), (5, 8200), (3, 16385)]


def _all_ops(X, R_, W, B, DY):
    """Every op once; returns NumPy copies of every result."""
    out = []
    out += [pynorm.layer_norm(X, W, B), pynorm.rms_norm(X, W)]
    out += list(pynorm.add_layer_norm(X, R_, W, B)) + list(pynorm.add_rms_norm(X, R_, W))
    _, m, s = pynorm.layer_norm_forward(X, W, B)
    out += [m, s] + list(pynorm.layer_norm_backward(DY, X, m, s, W))
    _, s2 = pynorm.rms_norm_forward(X, W)
    out += [s2] + list(pynorm.rms_norm_backward(DY, X, s2, W))
    return [c2n(a) for a in out]


@pytest.mark.parametrize("shape", DET_SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
def test_deterministic_repeats_and_alignment(dtype, shape):
    """Same bits on every run, on another stream, and whatever the buffers'
    alignment (rows starting off a 16-byte boundary take the scalar path)."""
    _need(dtype)
    x, r, w, b, dy = make_inputs("add_layer_norm", dtype, shape, "same", seed=7)
    X, Rr, W, B, DY = n2c(x), n2c(r), n2c(w), n2c(b), n2c(dy)
    first = _all_ops(X, Rr, W, B, DY)
    for _ in range(2):
        for i, (a, b_) in enumerate(zip(_all_ops(X, Rr, W, B, DY), first)):
            assert_same_bits(a, b_, f"repeat, result {i}")
    with cp.cuda.Stream(non_blocking=True) as st:
        again = _all_ops(X, Rr, W, B, DY)
        st.synchronize()
    for i, (a, b_) in enumerate(zip(again, first)):
        assert_same_bits(a, b_, f"other stream, result {i}")

    def shifted(a):  # the same values one element past a 16-byte boundary
        flat = cp.empty(a.size + 1, a.dtype)
        v = flat[1:].reshape(a.shape)
        v[...] = a
        return v

    moved = _all_ops(shifted(X), shifted(Rr), shifted(W), shifted(B), shifted(DY))
    for i, (a, b_) in enumerate(zip(moved, first)):
        assert_same_bits(a, b_, f"misaligned buffers, result {i}")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DNAME.get)
def test_strided_rows_and_out(dtype):
    """Rows laid out with strides (inputs and out=) give the dense results."""
    _need(dtype)
    rng = np.random.default_rng(3)
    B_, T_, C = 3, 5, 768
    x = randn(rng, (T_, B_, C), dtype)
    w = randn(rng, (C,), dtype, loc=1.0)
    X = n2c(x).transpose(1, 0, 2)                      # (B, T, C), leading axes transposed
    want = c2n(pynorm.layer_norm(cp.ascontiguousarray(X), n2c(w)))
    got = c2n(pynorm.layer_norm(X, n2c(w)))
    assert_same_bits(got, want, "transposed input")
    wide = cp.zeros((B_, T_, C + 8), dtype)
    out = wide[..., 4:4 + C]
    res = pynorm.layer_norm(X, n2c(w), out=out)
    assert res is out
    assert_same_bits(c2n(out), want, "strided out=")
    pad = np.concatenate([c2n(wide[..., :4]), c2n(wide[..., 4 + C:])], axis=-1)
    assert not bits(pad).any(), "the padding around the out= rows was written"


@pytest.mark.parametrize("dtype", [F32, F16], ids=DNAME.get)
def test_torch_tensors_as_inputs(dtype):
    """Any __cuda_array_interface__ object works: torch CUDA tensors (strided
    too) give the same bits as CuPy arrays; a tensor that requires grad is
    refused with a TypeError."""
    rng = np.random.default_rng(11)
    x = randn(rng, (4, 6, 1000), dtype)
    w = randn(rng, (1000,), dtype, loc=1.0)
    xt = c2t(n2c(x)).clone()
    wt = c2t(n2c(w)).clone()
    want = c2n(pynorm.rms_norm(n2c(x), n2c(w)))
    got = pynorm.rms_norm(xt, wt)
    assert isinstance(got, cp.ndarray)
    assert_same_bits(c2n(got), want, "torch inputs")
    got_t = pynorm.rms_norm(xt.transpose(0, 1), wt)
    assert_same_bits(c2n(got_t), np.swapaxes(want, 0, 1), "transposed torch input")
    with pytest.raises(TypeError, match="x"):
        pynorm.rms_norm(xt.clone().requires_grad_(True), wt)


# ---- accumulate, hostile rows, non-finite values ---------------------------------------------------

@pytest.mark.parametrize("C", [7, 768, 4096, 20000], ids=str)
@pytest.mark.parametrize("op", BWD_OPS)
def test_accumulate(op, C):
    rng = np.random.default_rng(C)
    x, dy = randn(rng, (9, C), F32), randn(rng, (9, C), F32)
    w = randn(rng, (C,), F32, loc=1.0)
    X, DY, W = n2c(x), n2c(dy), n2c(w)
    if op == "layer_norm_backward":
        _, m, s = pynorm.layer_norm_forward(X, W)
        fresh = pynorm.layer_norm_backward(DY, X, m, s, W)
        outs = tuple(cp.full(a.shape, 0.25, a.dtype) for a in fresh)
        res = pynorm.layer_norm_backward(DY, X, m, s, W, out=outs, accumulate=True)
    else:
        _, s = pynorm.rms_norm_forward(X, W)
        fresh = pynorm.rms_norm_backward(DY, X, s, W)
        outs = tuple(cp.full(a.shape, 0.25, a.dtype) for a in fresh)
        res = pynorm.rms_norm_backward(DY, X, s, W, out=outs, accumulate=True)
    for o, r_, f in zip(outs, res, fresh):
        assert r_ is o
        assert_same_bits(c2n(o), c2n(f) + np.float32(0.25), "accumulated gradient")


@pytest.mark.parametrize("C", [768, 4096, 65536], ids=str)
def test_hostile_rows(C):
    """Rows with mean 1e4 and std 1e-2 (float32): at least 10x more accurate
    than torch CUDA, whose float32 statistics lose about 3% there."""
    rng = np.random.default_rng(5)
    x = randn(rng, (5, C), F32, loc=1e4, scale=1e-2)
    y = c2n(pynorm.layer_norm(n2c(x)))
    yt = t2n(F.layer_norm(c2t(n2c(x)), (C,)), F32)
    ref, _, _ = R.layer_norm_ref(x)
    e, et = R.max_abs_err(y, ref), R.max_abs_err(yt, ref)
    assert e <= max(et / 10, 2e-3), f"hostile rows: pynorm {e:.3g}, torch {et:.3g}"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DNAME.get)
@pytest.mark.parametrize("C", [64, 2048, 20000], ids=str)
def test_nonfinite_propagate_like_torch(dtype, C):
    _need(dtype)
    rng = np.random.default_rng(1)
    x = randn(rng, (6, C), dtype)
    x[1, 3] = np.nan
    x[2, 0] = np.inf          # the first element: the shift itself is infinite
    x[3, C // 2] = -np.inf
    for op in ("layer_norm", "rms_norm"):
        got = c2n(getattr(pynorm, op)(n2c(x), eps=1e-5))
        tch = t2n((F.layer_norm if op == "layer_norm" else F.rms_norm)(c2t(n2c(x)).float(), (C,), eps=1e-5), dtype)
        g64, t64 = got.astype(np.float64), tch.astype(np.float64)
        assert np.array_equal(np.isnan(g64), np.isnan(t64)), f"{op}: NaN pattern differs from torch's"
        finite = np.isfinite(t64)
        assert np.array_equal(np.isfinite(g64), finite), f"{op}: Inf pattern differs from torch's"


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_input():
    X = cp.ones((4, 16), cp.float32)
    W = cp.ones(16, cp.float32)
    with pytest.raises(TypeError, match="x"):
        pynorm.layer_norm(cp.ones((4, 16), cp.int32))
    with pytest.raises(ValueError, match="weight"):
        pynorm.layer_norm(X, cp.ones(15, cp.float32))
    with pytest.raises(TypeError, match="weight"):
        pynorm.layer_norm(X, cp.ones(16, cp.float16))
    with pytest.raises(ValueError, match="weight"):
        pynorm.layer_norm(X, np.ones(16, np.float32))          # host weight, device x
    with pytest.raises(TypeError, match="bias"):
        pynorm.layer_norm(X, W, cp.ones(16, cp.float64))
    with pytest.raises(ValueError, match="eps"):
        pynorm.layer_norm(X, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        pynorm.rms_norm(X, eps=float("nan"))
    with pytest.raises(ValueError, match="out"):
        pynorm.layer_norm(X, out=X)                           # aliases the input
    with pytest.raises(ValueError, match="out"):
        pynorm.layer_norm(X, out=cp.empty((4, 15), cp.float32))
    with pytest.raises(TypeError, match="out"):
        pynorm.layer_norm(X, out=cp.empty((4, 16), cp.float64))
    with pytest.raises(ValueError, match="residual"):
        pynorm.add_rms_norm(X, cp.ones((4, 15), cp.float32))
    with pytest.raises(ValueError, match="empty last axis"):
        pynorm.layer_norm(cp.ones((4, 0), cp.float32))
    with pytest.raises(ValueError, match="x"):
        pynorm.layer_norm(cp.ones((), cp.float32))
    _, m, s = pynorm.layer_norm_forward(X)
    with pytest.raises(ValueError, match="accumulate"):
        pynorm.layer_norm_backward(X, X, m, s, accumulate=True)
    with pytest.raises(TypeError, match="mean"):
        pynorm.layer_norm_backward(X, X, m.astype(cp.float64), s)
    with pytest.raises(ValueError, match="rstd"):
        pynorm.rms_norm_backward(X, X, cp.ones(5, cp.float32))
    # nothing was written to the inputs by any of the refused calls
    assert bool(cp.all(X == 1)) and bool(cp.all(W == 1))


def test_empty_rows():
    y = pynorm.layer_norm(cp.ones((0, 8), cp.float32))
    assert isinstance(y, cp.ndarray) and y.shape == (0, 8)
    dx, dw, db = pynorm.layer_norm_backward(cp.ones((0, 8), cp.float32), cp.ones((0, 8), cp.float32),
                                            cp.ones(0, cp.float32), cp.ones(0, cp.float32))
    assert dx.shape == (0, 8) and bool(cp.all(dw == 0)) and bool(cp.all(db == 0))


def test_library_facts():
    ffi, lib = _cuda.library()
    assert lib.pn_cuda_device_count() >= 1
    assert ffi.string(lib.pn_cuda_version()).decode() == pynorm.__version__
    # a scratch size that depends only on (rows, C): the same for any split of the rows
    assert lib.pn_cuda_layernorm_backward_scratch_size(6, 5, 768, 0) == \
        lib.pn_cuda_layernorm_backward_scratch_size(30, 1, 768, 0)
