"""Shared helpers for pynorm's pytest suite.

The suite reads as a specification: torch (CPU) defines the behaviour wherever
it defines one, and tests/reference.py (float64 NumPy) is the ground truth for
accuracy. The accuracy rule used throughout:

    max|pynorm - ref| <= 2 * max|torch - ref| + slack

where ref is the float64 reference, torch runs on the same data and dtypes, and
slack is two ulps of the output dtype at the largest |ref| (so that the rule
does not flake when both errors are ~0, e.g. torch exact and pynorm one ulp off).

Test modules import the plain helpers below with `from conftest import ...`
(pytest puts this directory on sys.path; see pytest.ini).
"""

import os
import zlib

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pynorm
import reference as R

# pynorm.torch's optional C++ extension is never picked up from the user's cache:
# the torch tests run the Python path, and tests/test_torch_ext.py builds the
# extension once per session (into a session directory) and switches to it.
os.environ["PYNORM_TORCH_EXT"] = "0"

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)

DTYPES = [F32, F16, BF16, F64]
DTYPE_NAMES = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64"}

TORCH_DTYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16, F64: torch.float64}

LN_OPS = {"layer_norm", "add_layer_norm", "layer_norm_forward", "layer_norm_backward"}
FUSED_OPS = {"add_layer_norm", "add_rms_norm"}
FWD_OPS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "layer_norm_forward", "rms_norm_forward"]
BWD_OPS = ["layer_norm_backward", "rms_norm_backward"]

# The ISA the library picked in this process (PYNORM_ISA may lower it).
DEFAULT_ISA = pynorm.isa()


# --------------------------------------------------------------------------
# small utilities


def dname(dtype):
    return DTYPE_NAMES[np.dtype(dtype)]


def shape_id(shape):
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"


def seed_for(*parts):
    """A fixed seed derived from a test's parameters (stable across runs)."""
    return zlib.crc32(repr(parts).encode())


def eps_of(dtype):
    """Machine epsilon (one ulp at 1.0) of a NumPy dtype, bfloat16 included."""
    return float(ml_dtypes.finfo(np.dtype(dtype)).eps)


def is_ln(op):
    return op in LN_OPS


def wgrad_dtype(x_dtype, weight):
    """dtype of dweight/dbias: weight's dtype, float32 when weight is None."""
    return F32 if weight is None else np.dtype(weight.dtype)


def randn(rng, shape, dtype, loc=0.0, scale=1.0):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def snapshot(*arrays):
    """Byte copies of arrays (None kept), to check later that they are unchanged."""
    return [None if a is None else (a.copy(), a.__array_interface__["data"][0]) for a in arrays]


def assert_unchanged(arrays, snaps, what="input"):
    for a, s in zip(arrays, snaps):
        if a is None:
            continue
        before = s[0]
        if a.dtype == object:
            same = a.shape == before.shape and all(p is q for p, q in zip(a.reshape(-1), before.reshape(-1)))
        else:
            same = a.shape == before.shape and a.tobytes() == before.tobytes()
        if not same:
            if a.dtype.kind == "f" or a.dtype == BF16:
                assert_bitwise_equal(a, before, f"{what} was modified by the call")
            raise AssertionError(f"{what} was modified by the call")


def as_bits(a):
    a = np.ascontiguousarray(np.asarray(a)).reshape(-1)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bitwise_equal(got, expected, what):
    """Same dtype, shape and bits (any NaN matches any NaN: payloads aside)."""
    got = np.asarray(got)
    expected = np.asarray(expected)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    if got.size == 0:
        return
    g64 = got.astype(np.float64).reshape(-1)
    e64 = expected.astype(np.float64).reshape(-1)
    nan_g, nan_e = np.isnan(g64), np.isnan(e64)
    bad = (as_bits(got) != as_bits(expected)) & ~(nan_g & nan_e)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        idx = tuple(int(k) for k in np.unravel_index(i, got.shape)) if got.ndim else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.size} elements differ bitwise; first at index {idx}: "
            f"{float(g64[i])!r} (bits {int(as_bits(got)[i]):#x}) vs expected {float(e64[i])!r} "
            f"(bits {int(as_bits(expected)[i]):#x})"
        )


def assert_nan_masks_equal(got, expected, what):
    got64 = np.asarray(got).astype(np.float64)
    exp64 = np.asarray(expected).astype(np.float64)
    assert got64.shape == exp64.shape, f"{what}: shape {got64.shape} != {exp64.shape}"
    g, e = np.isnan(got64), np.isnan(exp64)
    if not np.array_equal(g, e):
        where = np.argwhere(g != e)
        i = tuple(int(k) for k in where[0])
        raise AssertionError(
            f"{what}: NaN pattern differs from torch's at {len(where)} places; first at {i}: "
            f"pynorm {got64[i]!r}, torch {exp64[i]!r}"
        )


def check_accuracy(what, got, torch_got, ref, dtype, factor=2.0, slack_ulps=2.0, scale=None):
    """The suite's accuracy rule: pynorm's max abs error against the float64
    reference is at most `factor` x torch's on the same data, plus `slack_ulps`
    ulps of `dtype` at the largest |ref| (or at `scale` when given: the data's
    magnitude is the natural scale of a mean's error)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference shape {ref.shape}"
    if ref.size == 0:
        return
    err_p = R.max_abs_err(got, ref)
    err_t = R.max_abs_err(torch_got, ref)
    if scale is None:
        finite_ref = np.abs(ref[np.isfinite(ref)])
        scale = float(finite_ref.max()) if finite_ref.size else 1.0
        scale = scale if scale > 0 else 1.0
    slack = slack_ulps * eps_of(dtype) * scale
    if not err_p <= factor * err_t + slack:
        g = np.asarray(got).astype(np.float64)
        t = np.asarray(torch_got).astype(np.float64)
        with np.errstate(invalid="ignore"):
            d = np.abs(g - ref)
        d = np.where(np.isnan(d), np.inf, d)
        i = tuple(int(k) for k in np.unravel_index(int(np.argmax(d)), d.shape)) if d.ndim else ()
        raise AssertionError(
            f"{what}: pynorm's max abs error {err_p:.4g} vs the float64 reference exceeds "
            f"{factor:g} x torch's {err_t:.4g} + slack {slack:.3g} (scale {scale:.4g}, dtype {dname(dtype)}); "
            f"worst element {i}: pynorm {float(g[i])!r}, torch {float(t[i])!r}, reference {float(ref[i])!r}"
        )


# --------------------------------------------------------------------------
# NumPy <-> torch


def to_torch(a):
    """A torch CPU tensor holding a copy of a NumPy array (bfloat16 included)."""
    if a is None:
        return None
    a = np.ascontiguousarray(np.asarray(a))
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def from_torch(t, dtype=None):
    """A NumPy array from a torch tensor, converted to `dtype` if given (one
    rounding, from the tensor's own dtype)."""
    t = t.detach()
    if dtype is not None:
        t = t.to(TORCH_DTYPES[np.dtype(dtype)])
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16).copy()
    return t.numpy().copy()


def _compute_dtype(x_dtype, *params):
    """torch natively handles equal dtypes (and, on CPU, a float32 weight with a
    half input for LayerNorm). For a uniform baseline, mixed cases run torch on
    operands upcast to the compute type (float32; float64 for float64 x), and
    round its results once to pynorm's output dtypes."""
    x_dtype = np.dtype(x_dtype)
    if all(p is None or np.dtype(p.dtype) == x_dtype for p in params):
        return None  # native: same dtypes
    return torch.float64 if x_dtype == F64 else torch.float32


def torch_forward(op, x, residual=None, weight=None, bias=None, eps=None):
    """torch's results for a forward op, as NumPy arrays of pynorm's output
    dtypes: dict with y, and h / mean / rstd as the op returns them."""
    x = np.asarray(x)
    C = x.shape[-1]
    res = {}
    if op in FUSED_OPS:
        h_t = to_torch(x) + to_torch(residual)
        res["h"] = from_torch(h_t, x.dtype)
        src = res["h"]
    else:
        src = x
    cdt = _compute_dtype(x.dtype, weight, bias)
    xt = to_torch(src)
    wt, bt = to_torch(weight), to_torch(bias)
    if cdt is not None:
        xt = xt.to(cdt)
        wt = None if wt is None else wt.to(cdt)
        bt = None if bt is None else bt.to(cdt)
    if is_ln(op):
        eps = 1e-5 if eps is None else eps
        y = F.layer_norm(xt, (C,), wt, bt, eps)
    else:
        eps = R.default_rms_eps(x.dtype) if eps is None else eps
        y = F.rms_norm(xt, (C,), wt, eps)
    res["y"] = from_torch(y, x.dtype)
    if op in ("layer_norm_forward", "rms_norm_forward"):
        sdt = R.stat_dtype(x.dtype)
        xs = to_torch(src)
        if is_ln(op):
            _, mean, rstd = torch.ops.aten.native_layer_norm(xs, (C,), None, None, eps)
            res["mean"] = from_torch(mean.reshape(x.shape[:-1]), sdt)
            res["rstd"] = from_torch(rstd.reshape(x.shape[:-1]), sdt)
        else:
            xf = xs.to(TORCH_DTYPES[sdt])
            rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
            res["rstd"] = from_torch(rstd, sdt)
    return res


def torch_backward(op, dy, x, weight=None, eps=None):
    """torch.autograd's gradients for LayerNorm/RMSNorm, as NumPy arrays of
    pynorm's output dtypes: dx (x's dtype), dweight and, for LayerNorm, dbias
    (weight's dtype, float32 when weight is None). With weight None, torch runs
    with a weight of ones (exact; dx is unchanged) to get dweight."""
    x = np.asarray(x)
    C = x.shape[-1]
    gdt = wgrad_dtype(x.dtype, weight)
    cdt = _compute_dtype(x.dtype, weight) if weight is not None else (
        torch.float64 if x.dtype == F64 else torch.float32)
    xt, dyt = to_torch(x), to_torch(dy)
    if weight is not None:
        wt = to_torch(weight)
    else:
        wt = torch.ones(C, dtype=cdt)
    if cdt is not None:
        xt, dyt, wt = xt.to(cdt), dyt.to(cdt), wt.to(cdt)
    xt.requires_grad_(True)
    wt.requires_grad_(True)
    if is_ln(op):
        bt = torch.zeros(C, dtype=wt.dtype, requires_grad=True)
        y = F.layer_norm(xt, (C,), wt, bt, 1e-5 if eps is None else eps)
    else:
        bt = None
        y = F.rms_norm(xt, (C,), wt, R.default_rms_eps(x.dtype) if eps is None else eps)
    y.backward(dyt)
    out = {"dx": from_torch(xt.grad, x.dtype), "dweight": from_torch(wt.grad, gdt)}
    if bt is not None:
        out["dbias"] = from_torch(bt.grad, gdt)
    return out


# --------------------------------------------------------------------------
# pynorm and reference calls, uniformly as dicts


def pynorm_forward(op, x, residual=None, weight=None, bias=None, eps=None, out=None):
    kw = {} if out is None else {"out": out}
    if op == "layer_norm":
        return {"y": pynorm.layer_norm(x, weight, bias, 1e-5 if eps is None else eps, **kw)}
    if op == "rms_norm":
        return {"y": pynorm.rms_norm(x, weight, eps, **kw)}
    if op == "add_layer_norm":
        y, h = pynorm.add_layer_norm(x, residual, weight, bias, 1e-5 if eps is None else eps, **kw)
        return {"y": y, "h": h}
    if op == "add_rms_norm":
        y, h = pynorm.add_rms_norm(x, residual, weight, eps, **kw)
        return {"y": y, "h": h}
    if op == "layer_norm_forward":
        y, mean, rstd = pynorm.layer_norm_forward(x, weight, bias, 1e-5 if eps is None else eps)
        return {"y": y, "mean": mean, "rstd": rstd}
    if op == "rms_norm_forward":
        y, rstd = pynorm.rms_norm_forward(x, weight, eps)
        return {"y": y, "rstd": rstd}
    raise ValueError(op)


def reference_forward(op, x, residual=None, weight=None, bias=None, eps=None):
    if op in FUSED_OPS:
        h = R.residual_add_ref(x, residual)
        src = h
    else:
        src = x
    if is_ln(op):
        y, mean, rstd = R.layer_norm_ref(src, weight, bias, 1e-5 if eps is None else eps)
        res = {"y": y, "mean": mean, "rstd": rstd}
    else:
        y, rstd = R.rms_norm_ref(src, weight, eps)
        res = {"y": y, "rstd": rstd}
    if op in FUSED_OPS:
        res["h"] = h
    return res


def pynorm_backward(op, dy, x, weight=None, eps=None, out=None, accumulate=False, stats=None):
    """Runs pynorm's forward (for the saved statistics, unless given) and
    backward; returns dict dx, dweight[, dbias] and the statistics used."""
    kw = {}
    if out is not None:
        kw["out"] = out
    if accumulate:
        kw["accumulate"] = True
    if is_ln(op):
        if stats is None:
            _, mean, rstd = pynorm.layer_norm_forward(x, weight, None, 1e-5 if eps is None else eps)
        else:
            mean, rstd = stats
        dx, dw, db = pynorm.layer_norm_backward(dy, x, mean, rstd, weight, **kw)
        return {"dx": dx, "dweight": dw, "dbias": db}, (mean, rstd)
    if stats is None:
        _, rstd = pynorm.rms_norm_forward(x, weight, eps)
    else:
        (rstd,) = stats
    dx, dw = pynorm.rms_norm_backward(dy, x, rstd, weight, **kw)
    return {"dx": dx, "dweight": dw}, (rstd,)


def reference_backward(op, dy, x, weight=None, eps=None):
    if is_ln(op):
        dx, dw, db = R.layer_norm_backward_ref(dy, x, weight, 1e-5 if eps is None else eps)
        return {"dx": dx, "dweight": dw, "dbias": db}
    dx, dw = R.rms_norm_backward_ref(dy, x, weight, eps)
    return {"dx": dx, "dweight": dw}


def expected_forward_meta(op, x):
    """name -> (shape, dtype) of each forward output."""
    x = np.asarray(x)
    sdt = R.stat_dtype(x.dtype)
    meta = {"y": (x.shape, x.dtype)}
    if op in FUSED_OPS:
        meta["h"] = (x.shape, x.dtype)
    if op == "layer_norm_forward":
        meta["mean"] = (x.shape[:-1], sdt)
    if op in ("layer_norm_forward", "rms_norm_forward"):
        meta["rstd"] = (x.shape[:-1], sdt)
    return meta


def check_meta(what, arr, shape, dtype, contiguous=True):
    assert isinstance(arr, np.ndarray), f"{what}: expected a numpy.ndarray, got {type(arr).__name__}"
    assert arr.shape == tuple(shape), f"{what}: shape {arr.shape}, expected {tuple(shape)}"
    assert arr.dtype == np.dtype(dtype), f"{what}: dtype {arr.dtype}, expected {np.dtype(dtype)}"
    if contiguous:
        assert arr.flags.c_contiguous, f"{what}: output is not C-contiguous (strides {arr.strides})"


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(autouse=True)
def _restore_pynorm_threads():
    """Every test leaves pynorm's thread count as it found it."""
    n = pynorm.get_num_threads()
    yield
    pynorm.set_num_threads(n)


@pytest.fixture
def pynorm_env():
    """Environment for a subprocess that imports the same pynorm as this process."""
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(pynorm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def pytest_report_header(config):
    return [
        f"pynorm: {getattr(pynorm, '__file__', '?')}, isa={DEFAULT_ISA}, threads={pynorm.get_num_threads()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, ml_dtypes {ml_dtypes.__version__}"
    ]
