"""``python -m pynorm``: a self-check, then a side-by-side benchmark.

1. Self-check: every op the benchmark times, in every dtype, is compared with a
   float64 NumPy reference written below (the test suite is not installed, so
   this module carries its own). A failure stops the run with exit status 1.
2. Benchmark: torch (CPU) and pynorm run in one process on the same NumPy
   buffers (torch.from_numpy shares their memory), alternating call by call so
   that noise hits both. Each row reports the median times, the speedup
   torch/pynorm, the bytes per second pynorm moves and the fraction of the
   machine's copy bandwidth that is, measured by pynorm.copy_bandwidth at the
   row's thread count. Without torch, a NumPy implementation is the baseline.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np

import pynorm

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
ALL_DTYPES = (F32, F16, BF16, F64)

COPY_PROBE_BYTES = 256 * 2**20
COPY_PROBE_REPEATS = 5
# A probe (0.3-1 s, most of it the first touch of 512 MiB) is reused for the rows
# that follow at the same thread count within PROBE_MAX_AGE_S: the bandwidth
# drifts over minutes, and a probe before every row took a fifth of the table's time.
PROBE_MAX_AGE_S = 10.0

EXIT_OK, EXIT_SELFCHECK_FAILED, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------------
# float64 reference (and small helpers shared with the NumPy baseline)
# ---------------------------------------------------------------------------

def f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def rms_eps(dtype, eps):
    """torch's default RMSNorm eps: the machine epsilon of the compute type."""
    if eps is not None:
        return eps
    return float(np.finfo(np.float64 if dtype == F64 else np.float32).eps)


def round_to(a, dtype):
    """Round a float64 array to dtype and back (what a dtype-typed h holds)."""
    return a.astype(dtype).astype(np.float64)


def ref_layer_norm(x, w, b, eps=1e-5):
    x = f64(x)
    mean = x.mean(-1)
    xc = x - mean[..., None]
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1) + eps)
    y = xc * rstd[..., None]
    if w is not None:
        y = y * f64(w)
    if b is not None:
        y = y + f64(b)
    return y, mean, rstd


def ref_rms_norm(x, w, eps):
    x = f64(x)
    rstd = 1.0 / np.sqrt((x * x).mean(-1) + eps)
    y = x * rstd[..., None]
    if w is not None:
        y = y * f64(w)
    return y, rstd


def ref_layer_norm_backward(dy, x, w, eps=1e-5):
    dy, x = f64(dy), f64(x)
    _, mean, rstd = ref_layer_norm(x, None, None, eps)
    xhat = (x - mean[..., None]) * rstd[..., None]
    g = dy * f64(w) if w is not None else dy
    dx = rstd[..., None] * (g - g.mean(-1, keepdims=True)
                            - xhat * (g * xhat).mean(-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return dx, (dy * xhat).sum(rows), dy.sum(rows)


def ref_rms_norm_backward(dy, x, w, eps):
    dy, x = f64(dy), f64(x)
    _, rstd = ref_rms_norm(x, None, eps)
    xhat = x * rstd[..., None]
    g = dy * f64(w) if w is not None else dy
    dx = rstd[..., None] * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return dx, (dy * xhat).sum(rows)


# ---------------------------------------------------------------------------
# 1. self-check
# ---------------------------------------------------------------------------

CHECK_SHAPES = [(7, 64), (3, 5, 769)]
# max |got - ref| / max(1, max |ref|); half types round their outputs once.
CHECK_TOLERANCE = {F64: 1e-10, F32: 1e-4, F16: 2e-3, BF16: 1e-2}


def make_inputs(shape, dtype, seed=0):
    """x, residual, dy of `shape` and weight, bias of shape (C,), all in dtype."""
    rng = np.random.default_rng(seed)
    C = shape[-1]

    def arr(shape_, scale=1.0, offset=0.0):   # float32 draws (float64 for float64): twice as fast
        a = rng.standard_normal(shape_, dtype=np.float64 if dtype == F64 else np.float32)
        return (a * scale + offset).astype(dtype)

    return dict(x=arr(shape, 2.0, 0.5), res=arr(shape), dy=arr(shape),
                w=arr((C,), 0.1, 1.0), b=arr((C,), 0.1))


def check_layer_norm(d):
    y = pynorm.layer_norm(d["x"], d["w"], d["b"])
    return [("y", y, ref_layer_norm(d["x"], d["w"], d["b"])[0])]


def check_layer_norm_out(d):
    out = np.empty_like(d["x"])
    pynorm.layer_norm(d["x"], d["w"], d["b"], out=out)
    return [("out", out, ref_layer_norm(d["x"], d["w"], d["b"])[0])]


def check_rms_norm(d):
    y = pynorm.rms_norm(d["x"], d["w"])
    return [("y", y, ref_rms_norm(d["x"], d["w"], rms_eps(d["x"].dtype, None))[0])]


def check_rms_norm_out(d):
    out = np.empty_like(d["x"])
    pynorm.rms_norm(d["x"], d["w"], out=out)
    return [("out", out, ref_rms_norm(d["x"], d["w"], rms_eps(d["x"].dtype, None))[0])]


def check_layer_norm_fwd_bwd(d):
    x, w, b, dy = d["x"], d["w"], d["b"], d["dy"]
    y, mean, rstd = pynorm.layer_norm_forward(x, w, b)
    dx, dw, db = pynorm.layer_norm_backward(dy, x, mean, rstd, w)
    ry, rmean, rrstd = ref_layer_norm(x, w, b)
    rdx, rdw, rdb = ref_layer_norm_backward(dy, x, w)
    return [("y", y, ry), ("mean", mean, rmean), ("rstd", rstd, rrstd),
            ("dx", dx, rdx), ("dweight", dw, rdw), ("dbias", db, rdb)]


def check_rms_norm_fwd_bwd(d):
    x, w, dy = d["x"], d["w"], d["dy"]
    eps = rms_eps(x.dtype, None)
    y, rstd = pynorm.rms_norm_forward(x, w)
    dx, dw = pynorm.rms_norm_backward(dy, x, rstd, w)
    ry, rrstd = ref_rms_norm(x, w, eps)
    rdx, rdw = ref_rms_norm_backward(dy, x, w, eps)
    return [("y", y, ry), ("rstd", rstd, rrstd), ("dx", dx, rdx), ("dweight", dw, rdw)]


def check_add_layer_norm(d):
    y, h = pynorm.add_layer_norm(d["x"], d["res"], d["w"], d["b"])
    rh = round_to(f64(d["x"]) + f64(d["res"]), d["x"].dtype)
    return [("y", y, ref_layer_norm(rh, d["w"], d["b"])[0]), ("h", h, rh)]


def check_add_rms_norm(d):
    y, h = pynorm.add_rms_norm(d["x"], d["res"], d["w"])
    rh = round_to(f64(d["x"]) + f64(d["res"]), d["x"].dtype)
    eps = rms_eps(d["x"].dtype, None)
    return [("y", y, ref_rms_norm(rh, d["w"], eps)[0]), ("h", h, rh)]


CHECKS = [
    ("layer_norm", check_layer_norm),
    ("layer_norm out=", check_layer_norm_out),
    ("rms_norm", check_rms_norm),
    ("rms_norm out=", check_rms_norm_out),
    ("layer_norm fwd+bwd", check_layer_norm_fwd_bwd),
    ("rms_norm fwd+bwd", check_rms_norm_fwd_bwd),
    ("add_layer_norm", check_add_layer_norm),
    ("add_rms_norm", check_add_rms_norm),
]


def relative_error(got, ref):
    got, ref = f64(got), f64(ref)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape}, expected {ref.shape}")
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def run_one_check(check, dtype, shape):
    """Returns (ok, message)."""
    tol = CHECK_TOLERANCE[dtype]
    try:
        pairs = check(make_inputs(shape, dtype))
        errors = {name: relative_error(got, ref) for name, got, ref in pairs}
    except Exception as e:  # a crash in the library is a failed check, not a crash here
        return False, f"raised {type(e).__name__}: {e}"
    worst = max(errors, key=errors.get)
    ok = all(err <= tol for err in errors.values())  # NaN fails too
    return ok, f"max err {errors[worst]:.1e} ({worst}), tol {tol:.0e}"


def self_check(out=sys.stdout):
    """Prints one PASS/FAIL line per op, dtype and shape; returns (all_ok, results)."""
    results = []
    for name, check in CHECKS:
        for dtype in ALL_DTYPES:
            for shape in CHECK_SHAPES:
                ok, msg = run_one_check(check, dtype, shape)
                results.append(dict(op=name, dtype=dtype.name, shape=list(shape),
                                    ok=ok, message=msg))
                print(f"{'PASS' if ok else 'FAIL'}  {name:<20} {dtype.name:<9} "
                      f"{str(shape):<13} {msg}", file=out, flush=True)
    return all(r["ok"] for r in results), results


# ---------------------------------------------------------------------------
# 2. benchmark
# ---------------------------------------------------------------------------

SHAPES = [(8192, 768), (4096, 4096), (1024, 16384)]
HALF_SHAPE = (4096, 4096)
QUICK_SHAPES = [(1024, 768), (256, 4096)]
QUICK_HALF_SHAPE = (256, 4096)
# Small calls (4,096 to 32,768 values, in cache) show what a call costs besides its
# data - the Python checks and the C library's set-up - against torch's whole call:
# one row of a decoder's hidden size, a few rows in bfloat16, a few rows of 768.
# Their rows time CALL_REPEATS_SCALE times as many calls: each takes microseconds.
CALL_CASES = [(F32, (1, 4096)), (BF16, (8, 4096)), (F32, (16, 768))]
CALL_REPEATS_SCALE = 20
CALL_NOTE = ("The per-call rows (" + ", ".join(f"{s[0]}x{s[1]} {dt.name}" for dt, s in CALL_CASES) +
             ") time one small call, in cache: the per-call cost of the Python functions and "
             f"the C library against torch's whole call ({CALL_REPEATS_SCALE}x the calls of the "
             "other rows; their GB/s is no bandwidth figure).")


def to_torch(a):
    """A torch tensor sharing a's memory (bfloat16 through a uint16 view)."""
    import torch
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class Data:
    """The buffers of one (dtype, shape): NumPy arrays and torch views of them."""

    def __init__(self, shape, dtype, with_torch):
        d = make_inputs(shape, dtype, seed=1)
        self.C = shape[-1]
        self.x, self.res, self.dy, self.w, self.b = d["x"], d["res"], d["dy"], d["w"], d["b"]
        self.y_out = np.empty_like(self.x)
        self.t = self.F = self.torch = None
        if with_torch:
            import torch
            self.torch, self.F = torch, torch.nn.functional
            self.t = argparse.Namespace(**{k: to_torch(v) for k, v in d.items()})

    def torch_leaves(self, *names):
        """Fresh torch tensors over the same memory that require grad."""
        return [to_torch(getattr(self, n)).requires_grad_() for n in names]


# --- NumPy baseline (used only when torch is missing): float32 compute ------

def compute_dtype(a):
    return np.float64 if a.dtype == F64 else np.float32


def np_layer_norm(x, w, b, eps=1e-5):
    xf = x.astype(compute_dtype(x))
    mean = xf.mean(-1, keepdims=True)
    xc = xf - mean
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    return (xc * rstd * w + b).astype(x.dtype), mean, rstd


def np_rms_norm(x, w, eps=None):
    xf = x.astype(compute_dtype(x))
    rstd = 1.0 / np.sqrt((xf * xf).mean(-1, keepdims=True) + rms_eps(x.dtype, eps))
    return (xf * rstd * w).astype(x.dtype), rstd


def np_layer_norm_fwd_bwd(x, w, b, dy):
    _, mean, rstd = np_layer_norm(x, w, b)
    xhat = (x - mean) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx.astype(x.dtype), (dy * xhat).sum(0), dy.sum(0)


def np_rms_norm_fwd_bwd(x, w, dy):
    _, rstd = np_rms_norm(x, w)
    xhat = x * rstd
    g = dy * w
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx.astype(x.dtype), (dy * xhat).sum(0)


# --- the three sides of each op: {"torch": fn, "numpy": fn, "pynorm": fn} ---

def fns_layer_norm(d):
    return {
        "torch": lambda: d.F.layer_norm(d.t.x, (d.C,), d.t.w, d.t.b),
        "numpy": lambda: np_layer_norm(d.x, d.w, d.b),
        "pynorm": lambda: pynorm.layer_norm(d.x, d.w, d.b),
    }


def fns_layer_norm_out(d):
    fns = fns_layer_norm(d)  # torch has no out= variant: its allocating time
    fns["pynorm"] = lambda: pynorm.layer_norm(d.x, d.w, d.b, out=d.y_out)
    return fns


def fns_rms_norm(d):
    return {
        "torch": lambda: d.F.rms_norm(d.t.x, (d.C,), d.t.w),
        "numpy": lambda: np_rms_norm(d.x, d.w),
        "pynorm": lambda: pynorm.rms_norm(d.x, d.w),
    }


def fns_rms_norm_out(d):
    fns = fns_rms_norm(d)  # torch has no out= variant: its allocating time
    fns["pynorm"] = lambda: pynorm.rms_norm(d.x, d.w, out=d.y_out)
    return fns


def fns_layer_norm_fwd_bwd(d):
    def torch_fn():
        y = d.F.layer_norm(x, (d.C,), w, b)
        return d.torch.autograd.grad(y, (x, w, b), d.t.dy)

    def pynorm_fn():
        y, mean, rstd = pynorm.layer_norm_forward(d.x, d.w, d.b)
        return pynorm.layer_norm_backward(d.dy, d.x, mean, rstd, d.w)

    x, w, b = d.torch_leaves("x", "w", "b") if d.t is not None else (None,) * 3
    return {"torch": torch_fn, "pynorm": pynorm_fn,
            "numpy": lambda: np_layer_norm_fwd_bwd(d.x, d.w, d.b, d.dy)}


def fns_rms_norm_fwd_bwd(d):
    def torch_fn():
        y = d.F.rms_norm(x, (d.C,), w)
        return d.torch.autograd.grad(y, (x, w), d.t.dy)

    def pynorm_fn():
        y, rstd = pynorm.rms_norm_forward(d.x, d.w)
        return pynorm.rms_norm_backward(d.dy, d.x, rstd, d.w)

    x, w = d.torch_leaves("x", "w") if d.t is not None else (None,) * 2
    return {"torch": torch_fn, "pynorm": pynorm_fn,
            "numpy": lambda: np_rms_norm_fwd_bwd(d.x, d.w, d.dy)}


def fns_add_layer_norm(d):
    def torch_fn():
        h = d.t.x + d.t.res
        return d.F.layer_norm(h, (d.C,), d.t.w, d.t.b), h

    def numpy_fn():
        h = d.x + d.res
        return np_layer_norm(h, d.w, d.b)[0], h

    return {"torch": torch_fn, "numpy": numpy_fn,
            "pynorm": lambda: pynorm.add_layer_norm(d.x, d.res, d.w, d.b)}


def fns_add_rms_norm(d):
    def torch_fn():
        h = d.t.x + d.t.res
        return d.F.rms_norm(h, (d.C,), d.t.w), h

    def numpy_fn():
        h = d.x + d.res
        return np_rms_norm(h, d.w)[0], h

    return {"torch": torch_fn, "numpy": numpy_fn,
            "pynorm": lambda: pynorm.add_rms_norm(d.x, d.res, d.w)}


# --- inference forms (docs/inference.md): fused quantized output, Gemma's offset, llama rounding;
# bfloat16 at an LLM hidden size, against torch doing the same in separate ops ---

INFER_EPS = 1e-6
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def _torch_quantize(d, y, fp8, group):
    """torch: y (the norm's output) quantized with amax/scale/round/clamp/to, per group."""
    T = d.torch
    g = y.float().reshape(*y.shape[:-1], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    if fp8:
        s = (amax / 448.0).clamp(min=1.0 / (448 * 512))
        q = (g / s).clamp(-448.0, 448.0).to(T.float8_e4m3fn)
    else:
        s = (amax / 127.0).clamp(min=float(np.finfo(np.float32).eps))
        q = (g / s).round().clamp(-128, 127).to(T.int8)
    return q.reshape(y.shape), s


def _np_quantize(y, fp8, group):
    g = y.astype(np.float32).reshape(y.shape[:-1] + (-1, group))
    amax = np.abs(g).max(-1, keepdims=True)
    if fp8:
        s = np.maximum(amax / np.float32(448), np.float32(1.0 / (448 * 512)))
        q = np.clip(g / s, -448, 448).astype(FP8)
    else:
        s = np.maximum(amax / np.float32(127), np.finfo(np.float32).eps)
        q = np.clip(np.rint(g / s), -128, 127).astype(np.int8)
    return q.reshape(y.shape), s


def fns_rms_norm_quant(fp8, group):
    qdtype = "float8_e4m3fn" if fp8 else "int8"

    def fns(d):
        G = group or d.C
        return {
            "torch": lambda: _torch_quantize(d, d.F.rms_norm(d.t.x, (d.C,), d.t.w, INFER_EPS), fp8, G),
            "numpy": lambda: _np_quantize(np_rms_norm(d.x, d.w, INFER_EPS)[0], fp8, G),
            "pynorm": lambda: pynorm.rms_norm_quant(d.x, d.w, INFER_EPS, qdtype=qdtype, group_size=group),
        }
    return fns


def fns_rms_norm_gemma(d):
    """Hugging Face's GemmaRMSNorm formula: float32 throughout, (1 + w), one rounding."""
    def torch_fn():
        xf = d.t.x.float()
        return (xf * d.torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + INFER_EPS) * (1.0 + d.t.w.float())).type_as(d.t.x)

    def numpy_fn():
        xf = d.x.astype(np.float32)
        r = 1.0 / np.sqrt((xf * xf).mean(-1, keepdims=True) + np.float32(INFER_EPS))
        return (xf * r * (1.0 + d.w.astype(np.float32))).astype(d.x.dtype)

    return {"torch": torch_fn, "numpy": numpy_fn,
            "pynorm": lambda: pynorm.rms_norm(d.x, d.w, INFER_EPS, weight_offset=1.0)}


def fns_rms_norm_llama(d):
    """Hugging Face's LlamaRMSNorm formula: weight * (x.float() * rstd).to(dtype)."""
    def torch_fn():
        xf = d.t.x.float()
        return d.t.w * (xf * d.torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + INFER_EPS)).to(d.t.x.dtype)

    def numpy_fn():
        xf = d.x.astype(np.float32)
        r = 1.0 / np.sqrt((xf * xf).mean(-1, keepdims=True) + np.float32(INFER_EPS))
        return (d.w.astype(np.float32) * (xf * r).astype(d.x.dtype).astype(np.float32)).astype(d.x.dtype)

    return {"torch": torch_fn, "numpy": numpy_fn,
            "pynorm": lambda: pynorm.rms_norm(d.x, d.w, INFER_EPS, rounding="llama")}


@dataclass(frozen=True)
class Op:
    key: str          # name in the JSON
    label: str        # name in the table
    streams: float    # arrays of x's size that must move (the byte model; 1.5: a 1-byte q of bf16 x)
    fns: Callable     # Data -> {"torch": fn, "numpy": fn, "pynorm": fn}
    no_torch_out: bool = False  # torch's column is its allocating time


OPS = [
    Op("layer_norm", "LayerNorm fwd", 2, fns_layer_norm),
    Op("layer_norm_out", "LayerNorm fwd out=", 2, fns_layer_norm_out, no_torch_out=True),
    Op("rms_norm", "RMSNorm fwd", 2, fns_rms_norm),
    Op("rms_norm_out", "RMSNorm fwd out=", 2, fns_rms_norm_out, no_torch_out=True),
    Op("layer_norm_fwd_bwd", "LayerNorm fwd+bwd", 5, fns_layer_norm_fwd_bwd),
    Op("rms_norm_fwd_bwd", "RMSNorm fwd+bwd", 5, fns_rms_norm_fwd_bwd),
    Op("add_layer_norm", "add+LayerNorm fwd", 4, fns_add_layer_norm),
    Op("add_rms_norm", "add+RMSNorm fwd", 4, fns_add_rms_norm),
]
# the inference forms: bfloat16 only, at INFER_SHAPE (benchmark_cases)
INFER_OPS = [
    Op("rms_norm_quant_int8", "RMSNorm+quant int8/row", 1.5, fns_rms_norm_quant(False, None)),
    Op("rms_norm_quant_fp8_g128", "RMSNorm+quant fp8/g128", 1.5, fns_rms_norm_quant(True, 128)),
    Op("rms_norm_gemma", "RMSNorm fwd offset=1 (Gemma)", 2, fns_rms_norm_gemma),
    Op("rms_norm_llama", "RMSNorm fwd rounding=llama", 2, fns_rms_norm_llama),
]
INFER_SHAPE, QUICK_INFER_SHAPE = (1024, 4096), (256, 4096)
OPS += INFER_OPS
OPS_BY_KEY = {op.key: op for op in OPS}

BYTE_MODEL = (
    "GB/s counts the bytes that must move, N = rows*C elements of the input dtype: "
    "a forward reads x and writes y (2N); add+norm reads x and the residual and writes "
    "y and h (4N); fwd+bwd reads x and writes y, then reads dy and x and writes dx (5N); "
    "RMSNorm+quant reads x and writes one byte of q per value (1.5N for bfloat16). "
    "Weights, biases, statistics and partial sums are not counted. % copy = that GB/s "
    "over the copy bandwidth pynorm.copy_bandwidth measured next to the row (at most "
    "{age:g} s before it), at the same thread count (STREAM Copy: bytes read + bytes "
    "written, {mib} MiB buffers, best of {rep}): this machine's bandwidth drifts between phases over minutes, and the probe "
    "next to a row sees the same phase. % peak = the same GB/s over the highest probe of "
    "the run at that thread count (before the rows, after them or next to any row): the "
    "stricter figure. The probe's ordinary stores also read each destination line "
    "(write-allocate); pynorm streams large outputs past the caches, and small shapes fit "
    "in them, so a row can pass 100%.")
TORCH_OUT_NOTE = (
    "torch has no out= form of layer_norm/rms_norm (aten's native_layer_norm.out is "
    "autogenerated: it allocates, then copies), so this row's torch time is its "
    "allocating call.")
TORCH_FUSED_NOTE = "torch's add+norm rows time x + residual, then the norm (two passes)."
# --torch-malloc: how glibc hands out the outputs that torch's (and NumPy's) calls allocate
MALLOC_MODES = ("steady", "no-faults", "as-is")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)
MALLOC_NOTES = {
    "steady": (
        "torch's calls take their outputs from malloc. This run pinned glibc's thresholds "
        "where its own dynamic rule ends up once blocks of these sizes have been freed "
        "(mmap threshold 32 MiB, its ceiling; trim threshold 64 MiB): outputs of 32 MiB and "
        "more are fresh memory on every call and pay its page faults (unless a free block "
        "of the heap can hold them), smaller ones are reused. Left alone (--torch-malloc "
        "as-is), which of the two a row sees depends on the process's earlier allocations; "
        "--torch-malloc no-faults compares the kernels alone. pynorm's allocating calls "
        "reuse freed buffers (pn_buffer_alloc)."),
    "no-faults": (
        "torch's calls take their outputs from malloc; this run set glibc's mmap and trim "
        "thresholds to 2 GiB (--torch-malloc no-faults), so freed outputs are reused and no "
        "call pays page faults: kernel against kernel."),
    "as-is": (
        "torch's calls take their outputs from malloc, left as the process found it "
        "(--torch-malloc as-is): above glibc's dynamic mmap threshold (at most 32 MiB) each "
        "call pays the page faults of fresh memory, and where the threshold stands depends "
        "on the process's earlier allocations, so rows near 32 MiB may differ between runs. "
        "pynorm's allocating calls reuse freed buffers (pn_buffer_alloc)."),
}


def set_malloc(mode):
    """Pin glibc's mmap and trim thresholds for this process (mode: one of
    MALLOC_MODES). Returns the mode in effect: "as-is" where the C library
    has no mallopt (not glibc) or refused the values."""
    if mode == "as-is":
        return mode
    limit = {"steady": (32 << 20, 64 << 20), "no-faults": ((1 << 31) - 1, (1 << 31) - 1)}[mode]
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "as-is"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, limit[0]) == 1 and mallopt(M_TRIM_THRESHOLD, limit[1]) == 1
    return mode if ok else "as-is"


def shapes_arg(ndim, dim_sep="x", list_sep=","):
    """An argparse type for a list of shapes of ndim positive sizes:
    shapes_arg(2)("8192x768,4096x4096") == [(8192, 768), (4096, 4096)]."""
    form = dim_sep.join(["N"] * ndim)

    def parse(text):
        try:
            shapes = [tuple(int(v) for v in t.split(dim_sep)) for t in text.split(list_sep)]
        except ValueError:
            shapes = []
        if not shapes or any(len(s) != ndim or min(s) < 1 for s in shapes):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {form}[{list_sep}{form}...] of positive sizes")
        return shapes
    return parse


def add_malloc_argument(parser):
    parser.add_argument("--torch-malloc", choices=MALLOC_MODES, default="steady",
                        help="glibc's handling of the outputs torch allocates: steady (default: "
                             "thresholds pinned where glibc's dynamic rule ends up; outputs of "
                             "32 MiB and more pay page faults every call), no-faults (kernel "
                             "against kernel), as-is (depends on the process's history)")


# LLM token norms: bf16 and f16 rows of LLM_TOKENS tokens at the hidden sizes of
# decoder models. The default run has the few rows of LLM_DEFAULT; --llm all runs
# every hidden size, dtype and op of LLM_OPS (60 rows per thread count, minutes).
LLM_HIDDEN = (2048, 2560, 4096, 5120, 8192)
LLM_TOKENS, QUICK_LLM_TOKENS = 4096, 256
LLM_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "layer_norm_fwd_bwd", "rms_norm_fwd_bwd")
LLM_DEFAULT = [(BF16, 4096, "rms_norm"), (BF16, 4096, "add_rms_norm"), (BF16, 4096, "rms_norm_fwd_bwd"),
               (F16, 2560, "layer_norm"), (F16, 2560, "add_layer_norm"), (BF16, 8192, "layer_norm_fwd_bwd")]
LLM_CHOICES = ("few", "all", "none")


def llm_cases(quick, llm="few"):
    """[(Op, dtype, shape)] of the LLM rows: LLM_DEFAULT (few), the whole grid (all) or none."""
    tokens = QUICK_LLM_TOKENS if quick else LLM_TOKENS
    if llm == "all":
        picked = [(dtype, hidden, key) for hidden in LLM_HIDDEN for dtype in (BF16, F16) for key in LLM_OPS]
    else:
        picked = LLM_DEFAULT if llm == "few" else []
    return [(OPS_BY_KEY[key], dtype, (tokens, hidden)) for dtype, hidden, key in picked]


def benchmark_cases(quick, llm="few"):
    """[(Op, dtype, shape)]: every op in float32 at every shape, plus half types
    (LayerNorm at HALF_SHAPE, the LLM rows of llm_cases, the inference rows of
    INFER_OPS) and the per-call rows."""
    shapes, half_shape = (QUICK_SHAPES, QUICK_HALF_SHAPE) if quick else (SHAPES, HALF_SHAPE)
    cases = [(op, F32, shape) for shape in shapes for op in OPS if op not in INFER_OPS]
    cases += [(OPS_BY_KEY["layer_norm"], dtype, half_shape) for dtype in (BF16, F16)]
    cases += [case for case in llm_cases(quick, llm) if case not in cases]
    cases += [(op, BF16, QUICK_INFER_SHAPE if quick else INFER_SHAPE) for op in INFER_OPS]
    cases += [(OPS_BY_KEY[key], dtype, shape) for dtype, shape in CALL_CASES
              for key in ("layer_norm", "layer_norm_out")]
    return cases


# A row whose calls are slow (torch's composite RMSNorm at 4096x4096, a whole
# transformer block: 0.1-0.7 s a pair) stops adding timed pairs once it has spent
# ROW_BUDGET_S seconds on them, and warms up with one pair, never timing fewer than
# MIN_REPEATS pairs (or the K of --repeats K, when fewer): the medians of such rows
# are steady after five, and the whole table takes a minute less.
ROW_BUDGET_S = 1.5
MIN_REPEATS = 5


def time_pair(baseline_fn, pynorm_fn, warmup, repeats):
    """Median seconds of each, calls alternating so that noise hits both (the
    number of pairs: see ROW_BUDGET_S)."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        baseline_fn()
        pynorm_fn()
        if time.perf_counter() - t0 > ROW_BUDGET_S / MIN_REPEATS:
            break
    times_base, times_pn = [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        spent = 0.0
        for i in range(repeats):
            t0 = time.perf_counter()
            baseline_fn()
            t1 = time.perf_counter()
            pynorm_fn()
            t2 = time.perf_counter()
            times_base.append(t1 - t0)
            times_pn.append(t2 - t1)
            spent += t2 - t0
            if i + 1 >= MIN_REPEATS and spent > ROW_BUDGET_S:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times_base), statistics.median(times_pn)


def set_threads(n, torch_mod):
    pynorm.set_num_threads(n)
    if torch_mod is not None:
        torch_mod.set_num_threads(n)


class Progress:
    """One line on stderr, rewritten in place with a carriage return."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.width = stream, 0

    def show(self, text):
        self.width = max(self.width, len(text))
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()

    def clear(self):
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


_last_probe = {}   # thread count -> (time.monotonic() of the probe, GB/s)


def copy_probe(max_age=PROBE_MAX_AGE_S):
    """The copy probe at the current thread count. Taken before and after the
    rows and, except with --quick, next to each row (at most max_age seconds
    before it): this machine's bandwidth drifts over minutes (from one phase to
    another of a shared host), and a row is best compared with the probe taken
    in the same phase."""
    n = pynorm.get_num_threads()
    last = _last_probe.get(n)
    if last is not None and time.monotonic() - last[0] < max_age:
        return last[1]
    gbps = pynorm.copy_bandwidth(nbytes=COPY_PROBE_BYTES, repeats=COPY_PROBE_REPEATS)
    _last_probe[n] = (time.monotonic(), gbps)
    return gbps


def measure_copy_bandwidth(thread_counts, torch_mod, progress):
    bw = {}
    for n in thread_counts:
        progress.show(f"copy bandwidth, {n} thread(s) ...")
        set_threads(n, torch_mod)
        bw[n] = copy_probe(max_age=0.0)
    return bw


def run_benchmark(cases, thread_counts, baseline, torch_mod, warmup, repeats, progress, adjacent=True):
    rows = []
    total = len(cases) * len(thread_counts)
    for op, dtype, shape in cases:
        data = Data(shape, dtype, with_torch=baseline == "torch")
        fns = op.fns(data)
        nbytes = int(op.streams * data.x.nbytes)
        call = (dtype, shape) in CALL_CASES   # no bandwidth to probe next to it
        scale = CALL_REPEATS_SCALE if call else 1
        for threads in thread_counts:
            progress.show(f"[{len(rows) + 1}/{total}] {op.label} {dtype.name} "
                          f"{shape} threads={threads}")
            set_threads(threads, torch_mod)
            copy_gbps = copy_probe() if adjacent and not call else None
            t_base, t_pn = time_pair(fns[baseline], fns["pynorm"], warmup * scale, repeats * scale)
            gbps = nbytes / t_pn / 1e9
            rows.append(dict(
                op=op.key, label=op.label, dtype=dtype.name, shape=list(shape),
                threads=threads, baseline=baseline,
                baseline_ms=t_base * 1e3, pynorm_ms=t_pn * 1e3, speedup=t_base / t_pn,
                bytes=nbytes, pynorm_gbps=gbps, copy_gbps=copy_gbps,
                baseline_allocating_only=op.no_torch_out and baseline == "torch"))
        del fns, data
    return rows


def peak_copy_bandwidth(rows, *probes):
    """Per thread count, the highest copy probe of the run: the probes before
    and after the rows ({threads: GB/s} each) and those taken next to rows."""
    peak = {}
    for probe in probes:
        for n, bw in probe.items():
            peak[n] = max(peak.get(n, 0.0), bw)
    for r in rows:
        if r.get("copy_gbps"):
            peak[r["threads"]] = max(peak.get(r["threads"], 0.0), r["copy_gbps"])
    return peak


def adjacent_range(rows, threads):
    """'lo-hi GB/s' of the probes taken next to the rows at this thread count."""
    bws = [r["copy_gbps"] for r in rows if r["threads"] == threads and r.get("copy_gbps")]
    return f"{min(bws):.1f}-{max(bws):.1f}" if bws else "none"


def add_copy_fraction(rows, peak_bw):
    """pct_copy: GB/s against the probe taken next to the row (copy_gbps; the
    run's peak where a row has none); pct_peak: against the run's peak probe at
    the row's thread count, the stricter figure."""
    for r in rows:
        peak = peak_bw[r["threads"]]
        r["pct_copy"] = 100.0 * r["pynorm_gbps"] / (r.get("copy_gbps") or peak)
        r["pct_peak"] = 100.0 * r["pynorm_gbps"] / peak


# ---------------------------------------------------------------------------
# output: table, JSON, plot
# ---------------------------------------------------------------------------

def _ms(t):
    """Milliseconds with three decimals, four below 0.1 ms (the per-call rows)."""
    return f"{t:.4f}" if t < 0.1 else f"{t:.3f}"


def format_table(rows, baseline):
    header = ["op", "dtype", "shape", "thr", f"{baseline} ms", "pynorm ms",
              "speedup", "pynorm GB/s", "% copy", "% peak"]
    lines = [header]
    for r in rows:
        mark = " *" if r["baseline_allocating_only"] else ""
        lines.append([r["label"], r["dtype"], "x".join(map(str, r["shape"])),
                      str(r["threads"]), f"{_ms(r['baseline_ms'])}{mark}",
                      f"{_ms(r['pynorm_ms'])}", f"{r['speedup']:.2f}x",
                      f"{r['pynorm_gbps']:.1f}", f"{r['pct_copy']:.0f}%", f"{r['pct_peak']:.0f}%"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    left = {0, 1, 2}

    def fmt(line):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(line, widths)))

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    return "\n".join(out + [fmt(line) for line in lines[1:]])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuShare:
    """The share of the machine's CPU time that other processes used between
    start() and stop(): their busy time (/proc/stat, all CPUs) minus ours.
    None where /proc/stat is missing."""

    @staticmethod
    def _busy_seconds():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
            idle = fields[3] + fields[4]   # idle + iowait
            return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _own_seconds():
        t = os.times()
        return t.user + t.system

    def start(self):
        self.t0 = (time.perf_counter(), self._busy_seconds(), self._own_seconds())

    def stop(self):
        wall0, busy0, own0 = self.t0
        busy1 = self._busy_seconds()
        if busy0 is None or busy1 is None:
            return None
        wall = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
        others = (busy1 - busy0) - (self._own_seconds() - own0)
        return max(0.0, others / wall) if wall > 0 else None


def busy_warning(other_share):
    if other_share is not None and other_share > 0.10:
        return (f"warning: other processes used {100 * other_share:.0f}% of the CPUs' time "
                f"while this ran, so these timings are noisy.")
    return None


def machine_info(torch_mod, copy_bw, copy_start, copy_end):
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return dict(
        cpu_model=cpu_model(), logical_cpus=os.cpu_count(), cpus_available=affinity,
        isa=pynorm.isa(), pynorm_version=getattr(pynorm, "__version__", None),
        python=platform.python_version(), numpy=np.__version__,
        torch=torch_mod.__version__ if torch_mod is not None else None,
        platform=platform.platform(),
        copy_bandwidth_gbps={str(n): bw for n, bw in copy_bw.items()},
        copy_bandwidth_start_gbps={str(n): bw for n, bw in copy_start.items()},
        copy_bandwidth_end_gbps={str(n): bw for n, bw in copy_end.items()},
        copy_probe=dict(bytes=COPY_PROBE_BYTES, repeats=COPY_PROBE_REPEATS))


def write_plot(path, rows, baseline):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['label']} {r['dtype']} {'x'.join(map(str, r['shape']))} t={r['threads']}"
              for r in rows]
    speedups = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.28 * len(rows)))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speedups]
    ax.barh(range(len(rows)), speedups, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")  # 2x faster and 2x slower look alike
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"speedup ({baseline} time / pynorm time)")
    ax.set_title(f"pynorm vs {baseline} (CPU, {pynorm.isa()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def parse_threads(text):
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"expected N or N,N,... with N >= 1, got {text!r}")
    return counts


def positive_int(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m pynorm",
        description="Check pynorm against a float64 reference, then benchmark it "
                    "side by side with torch (CPU) and against the copy bandwidth.")
    p.add_argument("--quick", action="store_true", help="small shapes and fewer repeats")
    p.add_argument("--threads", type=parse_threads, default=[2, 1], metavar="N[,N]",
                   help="thread counts to run each row at (default 2,1)")
    p.add_argument("--repeats", type=positive_int, default=None, metavar="K",
                   help="timed calls per row, median reported (default 15, 5 with --quick; "
                        f"fewer, at least {MIN_REPEATS}, where they take over {ROW_BUDGET_S:g} s)")
    p.add_argument("--json", metavar="OUT.json", help="write all rows and machine info")
    p.add_argument("--plot", metavar="OUT.png", help="bar chart of speedups (needs matplotlib)")
    p.add_argument("--baseline", choices=["auto", "torch", "numpy"], default="auto",
                   help="what pynorm is compared with (auto: torch if installed, else numpy)")
    p.add_argument("--suites", type=parse_suites, default=list(SUITES), metavar="S[,S]",
                   help="which rows to run: token (LayerNorm, RMSNorm), spatial (GroupNorm, "
                        "BatchNorm), torch (pynorm.torch modules and transformer blocks; "
                        "needs torch) (default: all)")
    p.add_argument("--llm", choices=LLM_CHOICES, default="few",
                   help="token suite's bf16/f16 rows at LLM hidden sizes "
                        f"({', '.join(map(str, LLM_HIDDEN))}; {LLM_TOKENS} tokens): few (default: "
                        f"{len(LLM_DEFAULT)} rows), all (every size, dtype and op: "
                        f"{len(LLM_HIDDEN) * 2 * len(LLM_OPS)} rows per thread count), none")
    add_malloc_argument(p)
    return p.parse_args(argv)


SUITES = ("token", "spatial", "torch")


def parse_suites(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(SUITES)}, "
                                         f"got {text!r}")
    return names


def import_torch(baseline):
    """(torch module or None, baseline name); exits if torch is asked for and missing."""
    if baseline == "numpy":
        return None, "numpy"
    try:
        import torch
    except ImportError:
        if baseline == "torch":
            sys.exit("error: --baseline torch, but torch is not installed")
        return None, "numpy"
    return torch, "torch"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib; install it with `pip install matplotlib`",
                  file=sys.stderr)
            return EXIT_USAGE
    repeats = args.repeats or (5 if args.quick else 15)
    warmup = 1 if args.quick else 3

    print(f"pynorm {getattr(pynorm, '__version__', '')} self-check (isa {pynorm.isa()}) "
          f"against a float64 NumPy reference")
    from . import bench_spatial
    ok, checks = self_check()
    if "spatial" in args.suites:
        ok_spatial, checks_spatial = bench_spatial.self_check()
        ok, checks = ok and ok_spatial, checks + checks_spatial
    if not ok:
        failed = sum(not c["ok"] for c in checks)
        print(f"self-check FAILED ({failed} of {len(checks)}); not benchmarking")
        return EXIT_SELFCHECK_FAILED
    print(f"self-check passed ({len(checks)} checks)\n")

    torch_mod, baseline = import_torch(args.baseline)
    malloc_mode = set_malloc(args.torch_malloc)
    saved_threads = pynorm.get_num_threads()
    saved_torch_threads = torch_mod.get_num_threads() if torch_mod is not None else None
    progress = Progress()
    cpu_share = CpuShare()
    cpu_share.start()
    try:
        copy_start = measure_copy_bandwidth(args.threads, torch_mod, progress)
        rows = []
        if "token" in args.suites:
            rows += run_benchmark(benchmark_cases(args.quick, args.llm), args.threads, baseline, torch_mod,
                                  warmup, repeats, progress, adjacent=not args.quick)
        if "spatial" in args.suites:
            rows += bench_spatial.run_spatial_benchmark(args.threads, baseline, torch_mod, warmup,
                                                        repeats, progress, args.quick,
                                                        adjacent=not args.quick)
        if "torch" in args.suites and torch_mod is not None:
            from . import bench_torch
            progress.clear()
            bench_torch.prepare_extension()
            progress.show("pynorm.torch modules and transformer blocks, forward + backward ...")
            rows += bench_torch.module_rows(args.threads, args.quick, warmup, repeats)
            rows += bench_torch.decode_rows(args.threads, args.quick)
            rows += bench_torch.block_rows(args.threads, args.quick, warmup, repeats)
        copy_end = measure_copy_bandwidth(args.threads, torch_mod, progress)
        other_share = cpu_share.stop()
    finally:
        progress.clear()
        pynorm.set_num_threads(saved_threads)
        if torch_mod is not None:
            torch_mod.set_num_threads(saved_torch_threads)

    # The probe runs before and after the rows and next to each row (on a shared
    # machine the attainable bandwidth drifts while the rows run): % copy is against
    # the probe next to the row, % peak against the run's highest.
    copy_bw = peak_copy_bandwidth(rows, copy_start, copy_end)
    add_copy_fraction(rows, copy_bw)
    info = machine_info(torch_mod, copy_bw, copy_start, copy_end)
    info["other_processes_cpu_share"] = other_share
    info["torch_malloc"] = malloc_mode
    notes = [BYTE_MODEL.format(mib=COPY_PROBE_BYTES // 2**20, rep=COPY_PROBE_REPEATS,
                               age=PROBE_MAX_AGE_S)]
    if baseline == "torch":
        notes += ["* " + TORCH_OUT_NOTE, TORCH_FUSED_NOTE, MALLOC_NOTES[malloc_mode]]
    else:
        notes.append("torch is not installed (or --baseline numpy): the baseline is a "
                     "NumPy implementation computing in float32.")
    if "spatial" in args.suites:
        notes.append(bench_spatial.NOTE)
    if "torch" in args.suites and torch_mod is not None:
        from . import bench_torch
        notes.append(bench_torch.NOTE)
    elif "torch" in args.suites:
        notes.append("The torch suite (pynorm.torch modules, transformer blocks) needs torch: skipped.")
    if "token" in args.suites:
        notes.append(CALL_NOTE)
    notes.append(f"Times are medians of {repeats} calls after {warmup} warm-up call(s) (a row of slow "
                 f"calls stops at {ROW_BUDGET_S:g} s of timed calls, after at least {MIN_REPEATS}, and "
                 f"warms up with one), "
                 f"{baseline} and pynorm alternating; speedup = {baseline} ms / pynorm ms.")
    warning = busy_warning(other_share)
    if warning:
        notes.append(warning)

    print(f"CPU: {info['cpu_model']}, {info['cpus_available']} CPUs available, "
          f"pynorm isa {info['isa']}, baseline {baseline}"
          + (f" {info['torch']}" if torch_mod is not None else "")
          + f", malloc {malloc_mode}")
    print("copy bandwidth: " + ", ".join(
        f"peak {copy_bw[n]:.1f} GB/s at {n} thread(s) (before the rows {copy_start[n]:.1f}, "
        f"after {copy_end[n]:.1f}, next to the rows {adjacent_range(rows, n)})" for n in args.threads))
    print()
    print(format_table(rows, baseline))
    print()
    for note in notes:
        print(note)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, baseline=baseline, repeats=repeats, warmup=warmup,
                           notes=notes, selfcheck=checks, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, rows, baseline)
        print(f"wrote {args.plot}")
    return EXIT_OK
