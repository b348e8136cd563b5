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


# =================================================================================================
# Spatial norms (GroupNorm, InstanceNorm, BatchNorm) on CUDA: pynorm._cuda_spatial over
# libpynorm_cuda, checked against torch CUDA, the CPU library and the float64 reference
# (tests/reference_spatial.py), NCHW and NHWC (torch on channels_last tensors).

import reference_spatial as RS  # noqa: E402

LAYOUTS = ["NCHW", "NHWC"]

GN_CASES = [
    # (shape NCHW, groups)
    ((3, 8), (1, 2, 8)),                  # no spatial axes (S = 1)
    ((5, 6, 1, 1), (1, 3, 6)),            # spatial size 1
    ((1, 32, 7, 7), (1, 2, 32)),          # N = 1, 7x7 (instance: 49 values a set)
    ((3, 64, 32, 32), (1, 32, 64)),       # odd N, 32x32
    ((2, 16, 3, 4, 5), (1, 2, 16)),       # 3-D volume
    ((2, 4, 4100), (1, 2, 4)),            # odd long rows
    ((3, 1, 9, 9), (1,)),                 # one channel
    ((2, 8, 150, 150), (2,)),             # large sets (90000 values): the widest blocks
]
GN_PARAMS = [(shape, G) for shape, groups in GN_CASES for G in groups]

BN_SHAPES = [(5, 8), (3, 6, 10), (1, 16, 7, 7), (3, 32, 32, 32), (2, 8, 3, 4, 5), (2, 4, 4100), (4, 3, 1, 1),
             (1024, 96), (300, 5, 37), (4, 2, 129, 131), (64, 3, 40, 40)]   # the last ones: many chunks


def _sname(shape):
    return "x".join(map(str, shape))


def _sp_affine_modes(dtype):
    return ["none", "w", "wb"] + (["wb32"] if dtype != F32 else [])


def _sp_params(C, dtype, affine, seed):
    rng = np.random.default_rng(seed)
    pdt = F32 if affine == "wb32" else dtype
    w = (1 + 0.5 * rng.standard_normal(C)).astype(pdt) if affine != "none" else None
    b = rng.standard_normal(C).astype(pdt) if affine in ("wb", "wb32") else None
    return w, b


def _to_layout(a, layout):
    """An NCHW NumPy array as pynorm gets it in `layout`."""
    return np.ascontiguousarray(a) if layout == "NCHW" else RS.to_nhwc(a)


def _from_layout(a, layout):
    return np.asarray(a) if layout == "NCHW" else RS.from_nhwc(a)


def _torch_cuda_in(a, layout, cdt=None):
    """torch CUDA tensor (NCHW indexing) of an NCHW NumPy array; channels_last
    memory for NHWC where torch has it; upcast to cdt when given."""
    t = c2t(n2c(a)).clone()
    if cdt is not None:
        t = t.to(cdt)
    if layout == "NHWC" and t.dim() in (4, 5):
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def _sp_compute_dtype(x_dtype, *params):
    """torch natively on equal dtypes; mixed ones (float32 params with half x) upcast."""
    if all(p is None or np.dtype(p.dtype) == np.dtype(x_dtype) for p in params):
        return None
    return torch.float64 if np.dtype(x_dtype) == F64 else torch.float32


def _stats_scale(x):
    v = np.abs(np.asarray(x).astype(np.float64))
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size and v.max() > 0 else 1.0


def check_sp(what, got, base, ref, dtype, base_name, scale=None):
    """max|got - ref| <= 2 * max|base - ref| + 4 ulps of dtype at `scale` (default max|ref|):
    parameter gradients pass the sums of |terms| as the scale."""
    ref = np.asarray(ref, np.float64)
    if ref.size == 0:
        return
    e_got, e_base = R.max_abs_err(got, ref), R.max_abs_err(base, ref)
    if scale is None:
        fin = np.abs(ref[np.isfinite(ref)])
        scale = float(fin.max()) if fin.size and fin.max() > 0 else 1.0
    slack = 4 * eps_of(dtype) * scale
    assert e_got <= 2 * e_base + slack, (
        f"{what}: max abs error {e_got:.4g} vs the float64 reference exceeds 2 x {base_name}'s {e_base:.4g} "
        f"+ {slack:.3g} (scale {scale:.4g})")


def _torch_group_norm(x, G, w, b, layout, dy, eps=1e-5):
    cdt = _sp_compute_dtype(x.dtype, w, b)
    C = x.shape[1]
    xt = _torch_cuda_in(x, layout, cdt).requires_grad_(True)
    tdt = xt.dtype
    gdt = F32 if w is None else w.dtype
    wt = (c2t(n2c(w)).to(tdt) if w is not None else torch.ones(C, dtype=tdt, device="cuda")).requires_grad_(True)
    bt = (c2t(n2c(b)).to(tdt) if b is not None else torch.zeros(C, dtype=tdt, device="cuda")).requires_grad_(True)
    y = F.group_norm(xt, G, wt, bt, eps)
    y.backward(_torch_cuda_in(dy, layout, tdt))
    out = {"y": t2n(y, x.dtype), "dx": t2n(xt.grad, x.dtype), "dweight": t2n(wt.grad, gdt),
           "dbias": t2n(bt.grad, gdt)}
    torch.cuda.synchronize()
    return out


def _gn_run_cuda(x, G, w, b, dy, layout):
    X, W, B, DY = n2c(_to_layout(x, layout)), n2c(w), n2c(b), n2c(_to_layout(dy, layout))
    y, m, s = pynorm.group_norm_forward(X, G, W, B, layout=layout)
    dx, dw, db = pynorm.group_norm_backward(DY, X, m, s, G, W, layout=layout)
    for a in (y, m, s, dx, dw, db):
        assert isinstance(a, cp.ndarray) and a.flags.c_contiguous
    return {"y": c2n(y), "mean": c2n(m), "rstd": c2n(s), "dx": c2n(dx), "dweight": c2n(dw), "dbias": c2n(db)}


def _gn_run_cpu(x, G, w, b, dy, layout):
    xin, dyin = _to_layout(x, layout), _to_layout(dy, layout)
    y, m, s = pynorm.group_norm_forward(xin, G, w, b, layout=layout)
    dx, dw, db = pynorm.group_norm_backward(dyin, xin, m, s, G, w, layout=layout)
    return {"y": y, "mean": m, "rstd": s, "dx": dx, "dweight": dw, "dbias": db}


def _check_y_and_grads(what, got, cpu, tch, layout, refs, dtype, w, sw, sb):
    """y, dx, dweight, dbias of the CUDA library against the CPU library's and
    torch CUDA's, each judged against the float64 reference (ry, rdx, rdw, rdb)."""
    ry, rdx, rdw, rdb = refs
    gdt = F32 if w is None else w.dtype
    for k, ref, kd, scale in (("y", ry, dtype, None), ("dx", rdx, dtype, None), ("dweight", rdw, gdt, sw),
                              ("dbias", rdb, gdt, sb)):
        g = _from_layout(got[k], layout) if k in ("y", "dx") else got[k]
        c = _from_layout(cpu[k], layout) if k in ("y", "dx") else cpu[k]
        check_sp(f"{what}: {k}", g, c, ref, kd, "the CPU library's", scale)
        check_sp(f"{what}: {k}", g, tch[k], ref, kd, "torch CUDA's", scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("shape,G", GN_PARAMS, ids=[f"{_sname(s)}-G{g}" for s, g in GN_PARAMS])
def test_spatial_group_norm(shape, G, dtype, layout):
    """GroupNorm (InstanceNorm at G = C) forward and backward on CUDA, every affine mode."""
    _need(dtype)
    C = shape[1]
    sdt = R.stat_dtype(dtype)
    for affine in _sp_affine_modes(dtype):
        seed = seed_for("gn", shape, G, DNAME[dtype], layout, affine)
        rng = np.random.default_rng(seed)
        x = randn(rng, shape, dtype, loc=0.5, scale=2.0)
        dy = randn(rng, shape, dtype)
        w, b = _sp_params(C, dtype, affine, seed + 1)
        what = f"group_norm {_sname(shape)} G={G} {DNAME[dtype]} {layout} {affine}"
        got = _gn_run_cuda(x, G, w, b, dy, layout)
        cpu = _gn_run_cpu(x, G, w, b, dy, layout)
        for k in got:
            assert got[k].shape == cpu[k].shape and got[k].dtype == cpu[k].dtype, f"{what}: {k} meta"
        tch = _torch_group_norm(x, G, w, b, layout, dy)
        ry, rmean, rrstd = RS.group_norm_ref(x, G, w, b)
        rdx, rdw, rdb = RS.group_norm_backward_ref(dy, x, G, w)
        sw, sb = RS.param_grad_scales(dy, RS.group_norm_ref(x, G)[0])
        _check_y_and_grads(what, got, cpu, tch, layout, (ry, rdx, rdw, rdb), dtype, w, sw, sb)
        check_sp(f"{what}: mean", got["mean"], cpu["mean"], rmean, sdt, "the CPU library's", _stats_scale(x))
        check_sp(f"{what}: rstd", got["rstd"], cpu["rstd"], rrstd, sdt, "the CPU library's")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DNAME.get)
def test_spatial_instance_norm_is_group_norm_with_g_equal_c(dtype, layout):
    _need(dtype)
    x = randn(np.random.default_rng(3), (3, 12, 9, 10), dtype)
    w, b = _sp_params(12, dtype, "wb", 4)
    X = n2c(_to_layout(x, layout))
    y1 = pynorm.instance_norm(X, n2c(w), n2c(b), layout=layout)
    y2 = pynorm.group_norm(X, 12, n2c(w), n2c(b), layout=layout)
    assert_same_bits(c2n(y1), c2n(y2), "instance_norm vs group_norm(G = C)")


def _torch_batch_norm(x, rm, rv, w, b, training, momentum, layout, dy, eps=1e-5):
    cdt = _sp_compute_dtype(x.dtype, w, b, rm, rv)
    C = x.shape[1]
    xt = _torch_cuda_in(x, layout, cdt).requires_grad_(True)
    tdt = xt.dtype
    gdt = F32 if w is None else w.dtype
    wt = (c2t(n2c(w)).to(tdt) if w is not None else torch.ones(C, dtype=tdt, device="cuda")).requires_grad_(True)
    bt = (c2t(n2c(b)).to(tdt) if b is not None else torch.zeros(C, dtype=tdt, device="cuda")).requires_grad_(True)
    half = x.dtype in (F16, BF16)
    rdt = torch.float32 if cdt is None and half else tdt      # torch keeps half statistics in float32
    rmt = c2t(n2c(rm)).to(rdt if rm.dtype == F32 or cdt else TORCH_DT[rm.dtype]).clone()
    rvt = c2t(n2c(rv)).to(rdt if rv.dtype == F32 or cdt else TORCH_DT[rv.dtype]).clone()
    y = F.batch_norm(xt, rmt, rvt, wt, bt, training, momentum, eps)
    y.backward(_torch_cuda_in(dy, layout, tdt))
    out = {"y": t2n(y, x.dtype), "dx": t2n(xt.grad, x.dtype), "dweight": t2n(wt.grad, gdt),
           "dbias": t2n(bt.grad, gdt), "running_mean": t2n(rmt, rm.dtype), "running_var": t2n(rvt, rv.dtype)}
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=_sname)
def test_spatial_batch_norm(shape, dtype, layout, training):
    """BatchNorm forward (with the running-statistics update) and backward on CUDA."""
    _need(dtype)
    C = shape[1]
    sdt = R.stat_dtype(dtype)
    for affine in _sp_affine_modes(dtype):
        seed = seed_for("bn", shape, DNAME[dtype], layout, affine, training)
        rng = np.random.default_rng(seed)
        x = randn(rng, shape, dtype, loc=0.5, scale=2.0)
        dy = randn(rng, shape, dtype)
        w, b = _sp_params(C, dtype, affine, seed + 1)
        rdt = F32 if affine == "wb32" else dtype
        rm0 = (0.3 * rng.standard_normal(C)).astype(rdt)
        rv0 = (0.5 + rng.random(C)).astype(rdt)
        what = f"batch_norm {_sname(shape)} {DNAME[dtype]} {layout} {affine} training={training}"
        xin, dyin = _to_layout(x, layout), _to_layout(dy, layout)

        X, DY, W, B, RM, RV = n2c(xin), n2c(dyin), n2c(w), n2c(b), n2c(rm0), n2c(rv0)
        y, m, s = pynorm.batch_norm_forward(X, RM, RV, W, B, training=training, momentum=0.3, layout=layout)
        dx, dw, db = pynorm.batch_norm_backward(DY, X, m, s, W, layout=layout, training=training)
        got = {"y": c2n(y), "mean": c2n(m), "rstd": c2n(s), "dx": c2n(dx), "dweight": c2n(dw), "dbias": c2n(db),
               "running_mean": c2n(RM), "running_var": c2n(RV)}
        RM2, RV2 = n2c(rm0), n2c(rv0)
        y2 = pynorm.batch_norm(X, RM2, RV2, W, B, training, 0.3, layout=layout)
        assert_same_bits(c2n(y2), got["y"], f"{what}: batch_norm vs batch_norm_forward")
        assert_same_bits(c2n(RM2), got["running_mean"], f"{what}: running_mean, batch_norm vs _forward")

        rm, rv = rm0.copy(), rv0.copy()
        cy, cm, cs = pynorm.batch_norm_forward(xin, rm, rv, w, b, training=training, momentum=0.3, layout=layout)
        cdx, cdw, cdb = pynorm.batch_norm_backward(dyin, xin, cm, cs, w, layout=layout, training=training)
        cpu = {"y": cy, "mean": cm, "rstd": cs, "dx": cdx, "dweight": cdw, "dbias": cdb,
               "running_mean": rm, "running_var": rv}
        for k in got:
            assert got[k].shape == cpu[k].shape and got[k].dtype == cpu[k].dtype, f"{what}: {k} meta"
        tch = _torch_batch_norm(x, rm0, rv0, w, b, training, 0.3, layout, dy)

        if training:
            ry, rmean, rrstd, rvar = RS.batch_norm_train_ref(x, w, b)
            rrm, rrv = RS.running_update_ref(rm0, rv0, rmean, rvar, x.size // C, 0.3)
            check_sp(f"{what}: mean", got["mean"], cpu["mean"], rmean, sdt, "the CPU library's", _stats_scale(x))
            check_sp(f"{what}: rstd", got["rstd"], cpu["rstd"], rrstd, sdt, "the CPU library's")
            for k, ref, sc in (("running_mean", rrm, _stats_scale(x)), ("running_var", rrv, None)):
                check_sp(f"{what}: {k}", got[k], cpu[k], ref, rdt, "the CPU library's", sc)
                check_sp(f"{what}: {k}", got[k], tch[k], ref, rdt, "torch CUDA's", sc)
        else:
            ry, rmean, rrstd = RS.batch_norm_eval_ref(x, rm0, rv0, w, b)
            assert_same_bits(got["running_mean"], rm0, f"{what}: eval must not touch running_mean")
            assert_same_bits(got["running_var"], rv0, f"{what}: eval must not touch running_var")
            assert_same_bits(got["mean"], rm0.astype(sdt), f"{what}: eval mean must be running_mean")
            assert_same_bits(got["rstd"], cpu["rstd"], f"{what}: eval rstd vs the CPU library's")
        rdx, rdw, rdb = RS.batch_norm_backward_ref(dy, x, w, training=training, running_mean=rm0, running_var=rv0)
        xhat = RS.batch_norm_train_ref(x)[0] if training else RS.batch_norm_eval_ref(x, rm0, rv0)[0]
        sw, sb = RS.param_grad_scales(dy, xhat)
        _check_y_and_grads(what, got, cpu, tch, layout, (ry, rdx, rdw, rdb), dtype, w, sw, sb)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=DNAME.get)
@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0, None])
def test_spatial_running_stats_sequence(momentum, dtype, layout):
    """Training steps then eval, against torch.nn.BatchNorm2d on CUDA (momentum None:
    the cumulative average over num_batches_tracked)."""
    C = 6
    tdt = TORCH_DT[dtype]
    mod = torch.nn.BatchNorm2d(C, momentum=momentum).to(device="cuda", dtype=tdt)
    RM, RV = cp.zeros(C, dtype), cp.ones(C, dtype)
    tol = 1e-10 if dtype == F64 else 2e-5
    for step in range(1, 6):
        x = randn(np.random.default_rng(seed_for("seq", momentum, layout, step)), (3 + step, C, 5, 4), dtype,
                  loc=step, scale=step)
        mod.train()
        yt = mod(_torch_cuda_in(x, layout))
        y = pynorm.batch_norm(n2c(_to_layout(x, layout)), RM, RV, training=True, momentum=momentum, layout=layout,
                              num_batches_tracked=step if momentum is None else None)
        np.testing.assert_allclose(_from_layout(c2n(y), layout), t2n(yt, dtype), rtol=tol, atol=tol)
        np.testing.assert_allclose(c2n(RM), t2n(mod.running_mean, dtype), rtol=tol, atol=tol, err_msg=f"step {step}")
        np.testing.assert_allclose(c2n(RV), t2n(mod.running_var, dtype), rtol=tol, atol=tol, err_msg=f"step {step}")
    mod.eval()
    x = randn(np.random.default_rng(seed_for("seq-eval", momentum, layout)), (2, C, 3, 3), dtype)
    y = pynorm.batch_norm(n2c(_to_layout(x, layout)), RM, RV, training=False, layout=layout)
    np.testing.assert_allclose(_from_layout(c2n(y), layout), t2n(mod(_torch_cuda_in(x, layout)), dtype),
                               rtol=tol, atol=tol)


def _sp_all(X, DY, W, B, layout, G):
    """Every spatial op once on CUDA arrays; NumPy copies of every result."""
    out = []
    y, m, s = pynorm.group_norm_forward(X, G, W, B, layout=layout)
    out += [y, m, s] + list(pynorm.group_norm_backward(DY, X, m, s, G, W, layout=layout))
    C = W.shape[0]
    RM, RV = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)
    for training in (True, False):
        y, m, s = pynorm.batch_norm_forward(X, RM, RV, W, B, training=training, layout=layout)
        out += [y, m, s, RM.copy(), RV.copy()]
        out += list(pynorm.batch_norm_backward(DY, X, m, s, W, layout=layout, training=training))
    return [c2n(a) for a in out]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("shape", [(8, 32, 28, 28), (300, 48), (2, 64, 3000), (4, 3, 65, 67)], ids=_sname)
def test_spatial_deterministic(shape, dtype, layout):
    """The same bits on every run and on another stream."""
    _need(dtype)
    rng = np.random.default_rng(seed_for("sp-det", shape, DNAME[dtype], layout))
    C = shape[1]
    x = randn(rng, shape, dtype, loc=1.0)
    dy = randn(rng, shape, dtype)
    w, b = _sp_params(C, dtype, "wb32" if dtype != F32 else "wb", 5)
    X, DY, W, B = n2c(_to_layout(x, layout)), n2c(_to_layout(dy, layout)), n2c(w), n2c(b)
    G = 16 if C % 16 == 0 else 1
    first = _sp_all(X, DY, W, B, layout, G)
    for i, (a, b_) in enumerate(zip(_sp_all(X, DY, W, B, layout, G), first)):
        assert_same_bits(a, b_, f"repeat, result {i}")
    with cp.cuda.Stream(non_blocking=True) as st:
        again = _sp_all(X, DY, W, B, layout, G)
        st.synchronize()
    for i, (a, b_) in enumerate(zip(again, first)):
        assert_same_bits(a, b_, f"other stream, result {i}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["group", "instance", "batch"])
def test_spatial_hostile_values(op, layout):
    """Mean 1e4, std 1e-2 in float32: statistics summed around a shift keep the digits
    (torch's float32 loses a few percent here)."""
    x = (1e4 + 1e-2 * np.random.default_rng(11).standard_normal((4, 8, 16, 16))).astype(F32)
    X = n2c(_to_layout(x, layout))
    if op == "group":
        y, ref = pynorm.group_norm(X, 2, layout=layout), RS.group_norm_ref(x, 2)[0]
    elif op == "instance":
        y, ref = pynorm.instance_norm(X, layout=layout), RS.instance_norm_ref(x)[0]
    else:
        y = pynorm.batch_norm(X, None, None, training=True, layout=layout)
        ref = RS.batch_norm_train_ref(x)[0]
    err = R.max_abs_err(_from_layout(c2n(y), layout), ref)
    assert err < 3e-3, f"{op} {layout}: max abs error {err:.3g} on hostile values"


def test_spatial_accumulate_and_out():
    rng = np.random.default_rng(21)
    for layout in LAYOUTS:
        x = randn(rng, (3, 8, 5, 6), F32)
        dy = randn(rng, (3, 8, 5, 6), F32)
        w = randn(rng, (8,), F32, loc=1.0)
        xin, dyin = _to_layout(x, layout), _to_layout(dy, layout)
        X, DY, W = n2c(xin), n2c(dyin), n2c(w)
        base = [randn(rng, s, F32) for s in (xin.shape, (8,), (8,))]
        for kind in ("group", "batch"):
            if kind == "group":
                _, m, s = pynorm.group_norm_forward(X, 4, W, layout=layout)
                _, cm, cs = pynorm.group_norm_forward(xin, 4, w, layout=layout)
                run = lambda *a, **k: pynorm.group_norm_backward(*a[:4], 4, a[4], layout=layout, **k)  # noqa: E731
            else:
                _, m, s = pynorm.batch_norm_forward(X, None, None, W, training=True, layout=layout)
                _, cm, cs = pynorm.batch_norm_forward(xin, None, None, w, training=True, layout=layout)
                run = lambda *a, **k: pynorm.batch_norm_backward(*a, layout=layout, **k)  # noqa: E731
            outs = tuple(n2c(a) for a in base)
            res = run(DY, X, m, s, W, out=outs, accumulate=True)
            assert all(r is o for r, o in zip(res, outs)), f"{kind}: out= arrays are returned"
            couts = tuple(a.copy() for a in base)
            run(dyin, xin, cm, cs, w, out=couts, accumulate=True)
            for i, (g, c) in enumerate(zip(res, couts)):
                np.testing.assert_allclose(c2n(g), c, rtol=1e-5, atol=1e-5, err_msg=f"{kind} {layout} grad {i}")


def test_spatial_strided_and_torch_tensors():
    """Non-contiguous CuPy inputs are copied; torch CUDA tensors work as inputs."""
    rng = np.random.default_rng(31)
    x = randn(rng, (4, 6, 10, 12), F32)
    X = n2c(x)[:, :, :, ::2]                        # strided view
    y = pynorm.group_norm(X, 3)
    np.testing.assert_allclose(c2n(y), pynorm.group_norm(np.ascontiguousarray(x[:, :, :, ::2]), 3),
                               rtol=1e-5, atol=1e-5)
    xt = torch.from_numpy(x).cuda()
    rm, rv = torch.zeros(6, device="cuda"), torch.ones(6, device="cuda")
    y = pynorm.batch_norm(xt, rm, rv, training=True)
    assert isinstance(y, cp.ndarray)
    rmc, rvc = np.zeros(6, F32), np.ones(6, F32)
    np.testing.assert_allclose(c2n(y), pynorm.batch_norm(x, rmc, rvc, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm.cpu().numpy(), rmc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DNAME.get)
def test_spatial_torch_modules_on_cuda(dtype):
    """pynorm.torch's GroupNorm/BatchNorm2d on CUDA tensors (the CUDA library) against
    torch.nn's, forward, backward and running statistics, NCHW and channels_last."""
    import pynorm.torch as pt
    tdt = TORCH_DT[dtype]
    tol = 2e-5 if dtype == F32 else 2e-2
    for channels_last in (False, True):
        for make_ref, make_pn in ((lambda: torch.nn.GroupNorm(4, 16), lambda: pt.GroupNorm(4, 16)),
                                  (lambda: torch.nn.BatchNorm2d(16), lambda: pt.BatchNorm2d(16))):
            torch.manual_seed(0)
            ref, mod = make_ref().cuda(), make_pn().cuda()
            mod.load_state_dict(ref.state_dict())
            x = torch.randn(5, 16, 9, 11, device="cuda").to(tdt)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            xr, xp = x.float().clone().requires_grad_(True), x.clone().requires_grad_(True)
            yr, yp = ref(xr), mod(xp)
            dy = torch.randn_like(yr)
            yr.backward(dy)
            yp.backward(dy.to(tdt))
            torch.testing.assert_close(yp.float(), yr, rtol=tol, atol=tol)
            torch.testing.assert_close(xp.grad.float(), xr.grad, rtol=tol, atol=tol)
            torch.testing.assert_close(mod.weight.grad.float(), ref.weight.grad, rtol=tol, atol=tol * 50)
            if isinstance(ref, torch.nn.BatchNorm2d):
                torch.testing.assert_close(mod.running_mean, ref.running_mean, rtol=tol, atol=tol)
                torch.testing.assert_close(mod.running_var, ref.running_var, rtol=tol, atol=tol)


def _same_error(fn_cpu, fn_cuda):
    """Both calls raise, with the same exception type and message."""
    errs = []
    for fn in (fn_cpu, fn_cuda):
        with pytest.raises((TypeError, ValueError)) as ei:
            fn()
        errs.append(ei.value)
    assert type(errs[0]) is type(errs[1]) and str(errs[0]) == str(errs[1]), f"CPU: {errs[0]!r}, CUDA: {errs[1]!r}"


def test_spatial_bad_input_same_errors_as_cpu():
    """Every refused call raises on CUDA what it raises on the CPU, and writes nothing."""
    x = np.ones((2, 8, 3, 3), F32)
    w, rm, rv = np.ones(8, F32), np.zeros(8, F32), np.ones(8, F32)
    X, W, RM, RV = n2c(x), n2c(w), n2c(rm), n2c(rv)
    _, m, s = pynorm.group_norm_forward(x, 2)
    M, S_ = n2c(m), n2c(s)
    cases = [
        (lambda a: pynorm.group_norm(a["x"], 3)),                                  # groups do not divide C
        (lambda a: pynorm.group_norm(a["x"], 0)),
        (lambda a: pynorm.group_norm(a["x"], 2.0)),
        (lambda a: pynorm.group_norm(a["x"], 2, layout="NWHC")),
        (lambda a: pynorm.group_norm(a["x"], 2, layout=1)),
        (lambda a: pynorm.group_norm(a["x"], 2, a["w7"])),
        (lambda a: pynorm.group_norm(a["x"], 2, a["w16"])),
        (lambda a: pynorm.group_norm(a["x"], 2, eps=-1.0)),
        (lambda a: pynorm.group_norm(a["x"], 2, eps=None)),
        (lambda a: pynorm.group_norm(a["x1"], 1)),                                 # one value a group
        (lambda a: pynorm.instance_norm(a["x2"])),                                 # one spatial element
        (lambda a: pynorm.batch_norm(a["x"], None, None)),                         # eval without running stats
        (lambda a: pynorm.batch_norm(a["x"], a["rm"], None, training=True)),
        (lambda a: pynorm.batch_norm(a["x"], a["rm"], a["rv64"], training=True)),
        (lambda a: pynorm.batch_norm(a["x"], a["rm"], a["rv"], training=True, momentum=float("nan"))),
        (lambda a: pynorm.batch_norm(a["x"], a["rm"], a["rv"], training=True, momentum="0.1")),
        (lambda a: pynorm.batch_norm(a["x"], a["rm"], a["rv"], training=True, momentum=None)),
        (lambda a: pynorm.batch_norm(a["x"], a["rm"], a["rv"], training=True, eps=0.0)),
        (lambda a: pynorm.batch_norm(a["x3"], a["rm"], a["rv"], training=True)),   # N*S == 1
        (lambda a: pynorm.group_norm_backward(a["x"], a["x"], a["m"], a["s"], 4)),
        (lambda a: pynorm.group_norm_backward(a["x"], a["x"], a["s"].astype(np.float64), a["s"], 2)),
        (lambda a: pynorm.group_norm_backward(a["x"], a["x"], a["m"], a["s"], 2, accumulate=True)),
        (lambda a: pynorm.group_norm_backward(a["x"], a["x"], a["m"], a["s"], 2, out=[None] * 3)),
        (lambda a: pynorm.group_norm_backward(a["xh"], a["x"], a["m"], a["s"], 2)),
        (lambda a: pynorm.batch_norm_backward(a["x"], a["x"], a["m"], a["s"])),
    ]

    def args(xp, dev):
        cv = (lambda v: n2c(v)) if dev else (lambda v: v)
        return {"x": xp, "w7": cv(np.ones(7, F32)), "w16": cv(np.ones(8, F16)), "x1": cv(np.ones((1, 1, 1), F32)),
                "x2": cv(np.ones((2, 3, 1), F32)), "x3": cv(np.ones((1, 8), F32)), "rm": cv(rm.copy()),
                "rv": cv(rv.copy()), "rv64": cv(rv.astype(F64)), "m": cv(m), "s": cv(s),
                "xh": cv(x.astype(F16))}

    for i, case in enumerate(cases):
        _same_error(lambda: case(args(x, False)), lambda: case(args(X, True)))
    # mixed devices, aliased outputs
    with pytest.raises(ValueError, match="weight"):
        pynorm.group_norm(X, 2, w)                                  # host weight, device x
    with pytest.raises(ValueError, match="out"):
        pynorm.group_norm(X, 2, out=X)
    with pytest.raises(ValueError, match="overlaps x"):
        pynorm.batch_norm(X, X.reshape(-1)[:8], RV, training=True)
    with pytest.raises(TypeError, match="mean"):
        pynorm.group_norm_backward(X, X, M.astype(cp.float64), S_, 2)
    assert bool(cp.all(X == 1)) and bool(cp.all(W == 1)) and bool(cp.all(RM == 0)) and bool(cp.all(RV == 1))


def test_spatial_empty():
    y, m, s = pynorm.group_norm_forward(cp.ones((0, 4, 3), cp.float32), 2)
    assert y.shape == (0, 4, 3) and m.shape == (0, 2)
    y, m, s = pynorm.batch_norm_forward(cp.ones((0, 4, 3), cp.float32), cp.zeros(4, cp.float32),
                                        cp.ones(4, cp.float32), training=False)
    assert y.shape == (0, 4, 3) and bool(cp.all(m == 0)) and bool(cp.all(cp.abs(s - 1 / np.sqrt(1 + 1e-5)) < 1e-6))
    dx, dw, db = pynorm.batch_norm_backward(cp.ones((0, 4), cp.float32), cp.ones((0, 4), cp.float32),
                                            cp.zeros(4, cp.float32), cp.ones(4, cp.float32))
    assert dx.shape == (0, 4) and bool(cp.all(dw == 0)) and bool(cp.all(db == 0))


def test_spatial_library_checks():
    """The C entry points refuse bad arguments before launching anything."""
    ffi, lib = _cuda.library()
    X, Y = cp.ones(2 * 8 * 9, cp.float32), cp.empty(2 * 8 * 9, cp.float32)
    M, S_ = cp.empty(16, cp.float32), cp.empty(16, cp.float32)
    p = lambda a: ffi.cast("void *", a.data.ptr)  # noqa: E731
    NULL, st = ffi.NULL, ffi.cast("cudaStream_t", cp.cuda.get_current_stream().ptr)
    assert lib.pn_cuda_groupnorm_forward(p(Y), NULL, NULL, p(X), NULL, NULL, 2, 8, 9, 3, 1e-5, 0, 0, 0, st) == 9
    assert lib.pn_cuda_groupnorm_forward(p(Y), NULL, NULL, p(X), NULL, NULL, 2, 8, 9, 2, -1.0, 0, 0, 0, st) == 4
    assert lib.pn_cuda_groupnorm_forward(p(Y), p(X), NULL, p(X), NULL, NULL, 2, 8, 9, 2, 1e-5, 0, 0, 0, st) == 6
    assert lib.pn_cuda_groupnorm_backward(p(Y), NULL, NULL, NULL, 0, p(X), p(X), NULL, p(M), p(S_),
                                          2, 8, 9, 2, 0, 0, 0, 0, st) == 7
    assert lib.pn_cuda_batchnorm_forward(p(Y), NULL, NULL, NULL, NULL, p(X), NULL, NULL, 2, 8, 9, 1e-5, 0.1, 0,
                                         0, 0, 0, 0, 0, st) == 1
    assert lib.pn_cuda_batchnorm_forward(p(Y), NULL, NULL, p(M), p(S_), p(X), NULL, NULL, 2, 8, 9, 1e-5,
                                         float("inf"), 0, 2, 0, 0, 0, 0, st) == 10
    assert lib.pn_cuda_batchnorm_backward_scratch_size(0, 8, 9, 0, 0) == 0
    assert lib.pn_cuda_groupnorm_backward_scratch_size(2, 8, 9, 3, 0, 0) == 0
    # in place is allowed, as in the C library
    assert lib.pn_cuda_groupnorm_forward(p(X), NULL, NULL, p(X), NULL, NULL, 2, 8, 9, 2, 1e-5, 0, 0, 0, st) == 0
    cp.cuda.get_current_stream().synchronize()
