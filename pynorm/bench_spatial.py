"""Benchmark and self-check cases for the spatial norms (GroupNorm, InstanceNorm,
BatchNorm).

Used by ``python -m pynorm`` (pynorm.bench) and runnable on its own:
``python -m pynorm.bench_spatial [--quick] [--models] [--threads 2,1] [--repeats K]``.
Rows: every op and layout in float32 at SHAPES, then rows of real models
(MODEL_CASES: a few by default, all with --models).

Rows have the format of pynorm.bench.run_benchmark (plus a "layout" key): torch
and pynorm run in one process on the same NumPy buffers, alternating call by
call. NHWC rows give pynorm the (N, H, W, C) array and torch the same memory as
a channels_last (N, C, H, W) tensor.

Byte model (% of copy bandwidth): the passes over memory of x's size that the
algorithm needs in that layout, N = N*C*H*W values:
  GroupNorm (and InstanceNorm) fwd: NCHW 2N (read x, write y: a group of a sample is one block
  that stays in cache), NHWC 3N (a group spans the whole sample, interleaved
  with the other groups: x is read for the statistics, then again for y);
  GroupNorm bwd: NCHW 3N (read dy and x, write dx), NHWC 5N;
  BatchNorm train fwd: NCHW 2N (a channel's N*H*W values fit in cache while its
  y is written), NHWC 3N (the statistics need every row before any y: read x
  twice, write y once);
  BatchNorm train bwd: NCHW 3N, NHWC 5N (dy and x read twice, dx written);
  BatchNorm eval fwd 2N.
"""

import argparse
import sys

import numpy as np

import pynorm
from pynorm import bench as B

SHAPES = [(32, 256, 32, 32), (8, 512, 64, 64)]
QUICK_SHAPES = [(8, 64, 32, 32)]
GROUPS = 32
LAYOUTS = ("NCHW", "NHWC")

NOTE = ("Spatial rows (layout in the label): NHWC runs pynorm on the (N, H, W, C) array and torch on "
        "the same memory as a channels_last tensor. GB/s counts the passes over memory of x's size "
        "the algorithm needs: NCHW 2 for a forward, 3 for a backward (a group of a sample, or a channel, "
        "stays in cache between the statistics and the output); NHWC 3 and 5 (the statistics need every "
        "row of the sample or batch before any output: x, dy are read twice); eval fwd 2. bwd rows time the backward alone (torch: autograd.grad on a retained graph).")


# ---------------------------------------------------------------------------
# float64 reference (self-check) and NumPy baseline (no torch)
# ---------------------------------------------------------------------------

def _nchw(a, layout):
    """An (N, C, *spatial) view of an array in `layout`."""
    return a if layout == "NCHW" else np.moveaxis(a, -1, 1)


def ref_group_norm(x, G, w, b, eps=1e-5, dtype=np.float64):
    """y, mean, rstd of GroupNorm over NCHW x, computed in `dtype`."""
    x = np.asarray(x).astype(dtype)
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    mean = xg.mean(-1)
    xc = xg - mean[..., None]
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1) + eps)
    shape = (1, C) + (1,) * (x.ndim - 2)
    y = (xc * rstd[..., None]).reshape(x.shape)
    y = y * np.asarray(w).astype(dtype).reshape(shape) + np.asarray(b).astype(dtype).reshape(shape)
    return y, mean, rstd


def ref_group_norm_backward(dy, x, G, w, eps=1e-5, dtype=np.float64):
    x, dy = np.asarray(x).astype(dtype), np.asarray(dy).astype(dtype)
    N, C = x.shape[:2]
    shape = (1, C) + (1,) * (x.ndim - 2)
    _, mean, rstd = ref_group_norm(x, G, np.ones(C), np.zeros(C), eps, dtype)
    xhat = ((x.reshape(N, G, -1) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    g = (dy * np.asarray(w).astype(dtype).reshape(shape)).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    dx = rstd[..., None] * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
    axes = (0,) + tuple(range(2, x.ndim))
    return dx.reshape(x.shape), (dy * xhat).sum(axes), dy.sum(axes)


def ref_batch_norm(x, w, b, eps=1e-5, dtype=np.float64):
    """y, mean, rstd of training-mode BatchNorm over NCHW x."""
    x = np.asarray(x).astype(dtype)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axes)
    xc = x - mean.reshape(shape)
    rstd = 1.0 / np.sqrt((xc * xc).mean(axes) + eps)
    y = xc * rstd.reshape(shape) * np.asarray(w).astype(dtype).reshape(shape) \
        + np.asarray(b).astype(dtype).reshape(shape)
    return y, mean, rstd


def ref_batch_norm_backward(dy, x, w, eps=1e-5, dtype=np.float64):
    x, dy = np.asarray(x).astype(dtype), np.asarray(dy).astype(dtype)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    _, mean, rstd = ref_batch_norm(x, np.ones(x.shape[1]), np.zeros(x.shape[1]), eps, dtype)
    xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
    g = dy * np.asarray(w).astype(dtype).reshape(shape)
    dx = rstd.reshape(shape) * (g - g.mean(axes, keepdims=True) - xhat * (g * xhat).mean(axes, keepdims=True))
    return dx, (dy * xhat).sum(axes), dy.sum(axes)


def ref_batch_norm_eval(x, rm, rv, w, b, eps=1e-5, dtype=np.float64):
    x = np.asarray(x).astype(dtype)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    rstd = 1.0 / np.sqrt(np.asarray(rv).astype(dtype) + eps)
    return ((x - np.asarray(rm).astype(dtype).reshape(shape)) * rstd.reshape(shape)
            * np.asarray(w).astype(dtype).reshape(shape) + np.asarray(b).astype(dtype).reshape(shape))


# ---------------------------------------------------------------------------
# self-check
# ---------------------------------------------------------------------------

CHECK_SHAPES = [(3, 8, 5, 7), (2, 64, 9)]


def _check_inputs(shape, dtype, layout, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    perm = (0,) + tuple(range(2, len(shape))) + (1,)

    def arr(s, scale=1.0, offset=0.0):
        return (rng.standard_normal(s) * scale + offset).astype(dtype)

    x, dy = arr(shape, 2.0, 0.5), arr(shape)
    if layout == "NHWC":
        x, dy = np.ascontiguousarray(x.transpose(perm)), np.ascontiguousarray(dy.transpose(perm))
    return dict(x=x, dy=dy, w=arr((C,), 0.1, 1.0), b=arr((C,), 0.1),
                rm=arr((C,), 0.1), rv=(rng.random(C) + 0.5).astype(dtype), layout=layout)


def _check_group_norm(d):
    L, G = d["layout"], 4
    y, mean, rstd = pynorm.group_norm_forward(d["x"], G, d["w"], d["b"], layout=L)
    dx, dw, db = pynorm.group_norm_backward(d["dy"], d["x"], mean, rstd, G, d["w"], layout=L)
    ry, rmean, rrstd = ref_group_norm(_nchw(d["x"], L), G, d["w"], d["b"])
    rdx, rdw, rdb = ref_group_norm_backward(_nchw(d["dy"], L), _nchw(d["x"], L), G, d["w"])
    return [("y", _nchw(y, L), ry), ("mean", mean, rmean), ("rstd", rstd, rrstd),
            ("dx", _nchw(dx, L), rdx), ("dweight", dw, rdw), ("dbias", db, rdb)]


def _check_batch_norm(d):
    L = d["layout"]
    rm, rv = d["rm"].copy(), d["rv"].copy()
    y, mean, rstd = pynorm.batch_norm_forward(d["x"], rm, rv, d["w"], d["b"], training=True, layout=L)
    dx, dw, db = pynorm.batch_norm_backward(d["dy"], d["x"], mean, rstd, d["w"], layout=L)
    x = _nchw(d["x"], L)
    ry, rmean, rrstd = ref_batch_norm(x, d["w"], d["b"])
    rdx, rdw, rdb = ref_batch_norm_backward(_nchw(d["dy"], L), x, d["w"])
    n = x.size // x.shape[1]
    rrm = 0.9 * B.f64(d["rm"]) + 0.1 * rmean
    rrv = 0.9 * B.f64(d["rv"]) + 0.1 * (1 / rrstd ** 2 - 1e-5) * n / (n - 1)
    ye = pynorm.batch_norm(d["x"], d["rm"], d["rv"], d["w"], d["b"], training=False, layout=L)
    rye = ref_batch_norm_eval(x, d["rm"], d["rv"], d["w"], d["b"])
    return [("y", _nchw(y, L), ry), ("mean", mean, rmean), ("rstd", rstd, rrstd),
            ("running_mean", rm, rrm), ("running_var", rv, rrv), ("dx", _nchw(dx, L), rdx),
            ("dweight", dw, rdw), ("dbias", db, rdb), ("y eval", _nchw(ye, L), rye)]


CHECKS = [("group_norm fwd+bwd", _check_group_norm), ("batch_norm fwd+bwd", _check_batch_norm)]


def self_check(out=sys.stdout):
    """One PASS/FAIL line per op, layout, dtype and shape; returns (all_ok, results)
    in pynorm.bench.self_check's format."""
    results = []
    for name, check in CHECKS:
        for layout in LAYOUTS:
            for dtype in B.ALL_DTYPES:
                for shape in CHECK_SHAPES:
                    tol = B.CHECK_TOLERANCE[dtype]
                    try:
                        errors = {n: B.relative_error(g, r) for n, g, r in check(_check_inputs(shape, dtype, layout))}
                        worst = max(errors, key=errors.get)
                        ok = all(e <= tol for e in errors.values())
                        msg = f"max err {errors[worst]:.1e} ({worst}), tol {tol:.0e}"
                    except Exception as e:  # a failure in the library is a failed check
                        ok, msg = False, f"raised {type(e).__name__}: {e}"
                    label = f"{name} {layout}"
                    results.append(dict(op=label, dtype=dtype.name, shape=list(shape), ok=ok, message=msg))
                    print(f"{'PASS' if ok else 'FAIL'}  {label:<25} {dtype.name:<9} {str(shape):<15} {msg}",
                          file=out, flush=True)
    return all(r["ok"] for r in results), results


# ---------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------

class Data:
    """Buffers of one (shape, layout, dtype), and torch views of the same memory.
    Weight, bias and running statistics have x's dtype (a model cast to bfloat16
    casts them all)."""

    def __init__(self, shape, layout, with_torch, dtype=B.F32):
        rng = np.random.default_rng(1)
        N, C = shape[:2]
        self.layout, self.C, self.dtype = layout, C, dtype
        mem_shape = shape if layout == "NCHW" else (N,) + shape[2:] + (C,)
        self.x = (rng.standard_normal(mem_shape, dtype=np.float32) * 2 + 0.5).astype(dtype)
        self.dy = rng.standard_normal(mem_shape, dtype=np.float32).astype(dtype)
        self.w = (rng.standard_normal(C) * 0.1 + 1).astype(dtype)
        self.b = (rng.standard_normal(C) * 0.1).astype(dtype)
        self.rm, self.rv = np.zeros(C, dtype), np.ones(C, dtype)
        self.t = None
        if with_torch:
            import torch
            self.torch, self.F = torch, torch.nn.functional

            def t(a):   # (N, C, H, W) over the same memory: channels_last for NHWC
                ta = B.to_torch(a)
                return ta if layout == "NCHW" else ta.permute(0, ta.dim() - 1, *range(1, ta.dim() - 1))

            self.t = argparse.Namespace(x=t(self.x), dy=t(self.dy), w=B.to_torch(self.w), b=B.to_torch(self.b),
                                        rm=B.to_torch(self.rm.copy()), rv=B.to_torch(self.rv.copy()))


def _np_group_norm(d, G=GROUPS):
    y, _, _ = ref_group_norm(_nchw(d.x, d.layout), G, d.w, d.b, dtype=np.float32)
    return y


def fns_group_norm(d):
    return {"torch": lambda: d.F.group_norm(d.t.x, GROUPS, d.t.w, d.t.b),
            "numpy": lambda: _np_group_norm(d),
            "pynorm": lambda: pynorm.group_norm(d.x, GROUPS, d.w, d.b, layout=d.layout)}


def fns_instance_norm(d):
    return {"torch": lambda: d.F.instance_norm(d.t.x, weight=d.t.w, bias=d.t.b),
            "numpy": lambda: _np_group_norm(d, d.C),
            "pynorm": lambda: pynorm.instance_norm(d.x, d.w, d.b, layout=d.layout)}


def fns_group_norm_bwd(d):
    fns = {"numpy": lambda: ref_group_norm_backward(_nchw(d.dy, d.layout), _nchw(d.x, d.layout), GROUPS, d.w,
                                                    dtype=np.float32)}
    _, mean, rstd = pynorm.group_norm_forward(d.x, GROUPS, d.w, d.b, layout=d.layout)
    fns["pynorm"] = lambda: pynorm.group_norm_backward(d.dy, d.x, mean, rstd, GROUPS, d.w, layout=d.layout)
    if d.t is not None:
        x, w, b = (a.detach().clone(memory_format=d.torch.preserve_format).requires_grad_()
                   for a in (d.t.x, d.t.w, d.t.b))
        y = d.F.group_norm(x, GROUPS, w, b)
        fns["torch"] = lambda: d.torch.autograd.grad(y, (x, w, b), d.t.dy, retain_graph=True)
    return fns


def fns_batch_norm(d):
    return {"torch": lambda: d.F.batch_norm(d.t.x, d.t.rm, d.t.rv, d.t.w, d.t.b, training=True),
            "numpy": lambda: ref_batch_norm(_nchw(d.x, d.layout), d.w, d.b, dtype=np.float32),
            "pynorm": lambda: pynorm.batch_norm(d.x, d.rm, d.rv, d.w, d.b, training=True, layout=d.layout)}


def fns_batch_norm_bwd(d):
    fns = {"numpy": lambda: ref_batch_norm_backward(_nchw(d.dy, d.layout), _nchw(d.x, d.layout), d.w,
                                                    dtype=np.float32)}
    _, mean, rstd = pynorm.batch_norm_forward(d.x, None, None, d.w, d.b, training=True, layout=d.layout)
    fns["pynorm"] = lambda: pynorm.batch_norm_backward(d.dy, d.x, mean, rstd, d.w, layout=d.layout)
    if d.t is not None:
        x, w, b = (a.detach().clone(memory_format=d.torch.preserve_format).requires_grad_()
                   for a in (d.t.x, d.t.w, d.t.b))
        y = d.F.batch_norm(x, None, None, w, b, training=True)
        fns["torch"] = lambda: d.torch.autograd.grad(y, (x, w, b), d.t.dy, retain_graph=True)
    return fns


def fns_batch_norm_eval(d):
    return {"torch": lambda: d.F.batch_norm(d.t.x, d.t.rm, d.t.rv, d.t.w, d.t.b, training=False),
            "numpy": lambda: ref_batch_norm_eval(_nchw(d.x, d.layout), d.rm, d.rv, d.w, d.b, dtype=np.float32),
            "pynorm": lambda: pynorm.batch_norm(d.x, d.rm, d.rv, d.w, d.b, training=False, layout=d.layout)}


# (key, label, {layout: passes of x's size}, fns)
OPS = [
    ("group_norm", "GroupNorm(32) fwd", {"NCHW": 2, "NHWC": 3}, fns_group_norm),
    ("group_norm_bwd", "GroupNorm(32) bwd", {"NCHW": 3, "NHWC": 5}, fns_group_norm_bwd),
    ("instance_norm", "InstanceNorm fwd", {"NCHW": 2, "NHWC": 3}, fns_instance_norm),
    ("batch_norm_train", "BatchNorm train fwd", {"NCHW": 2, "NHWC": 3}, fns_batch_norm),
    ("batch_norm_bwd", "BatchNorm train bwd", {"NCHW": 3, "NHWC": 5}, fns_batch_norm_bwd),
    ("batch_norm_eval", "BatchNorm eval fwd", {"NCHW": 2, "NHWC": 2}, fns_batch_norm_eval),
]
OPS_BY_KEY = {op[0]: op for op in OPS}

# Shapes of real models. Stable Diffusion's UNet: GroupNorm(32) over 320, 640
# and 1280 channels at 128x128 (SDXL's first level) down to 16x16 latents, batch
# 2 (classifier-free guidance). ResNet-50 at batch 32: BatchNorm after the stem
# (64 x 56x56), in the stages (256 x 56x56, 512 x 28x28) and at the last
# (2048 x 7x7). InstanceNorm of style-transfer networks (64-256 channels).
UNET_SHAPES = [(2, 320, 128, 128), (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]
RESNET_SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7)]
INSTANCE_SHAPES = [(4, 64, 128, 128), (4, 256, 32, 32)]
HALF_DTYPES = (B.BF16, B.F16)


def _cases(keys, dtypes, shapes, layouts=LAYOUTS):
    return [(key, layout, dtype, shape) for shape in shapes for dtype in dtypes for key in keys
            for layout in layouts]


# `--models`: every model row. Without it a few of them run after the
# float32 rows at SHAPES (the run time of `python -m pynorm` stays modest).
MODEL_CASES = (_cases(["group_norm", "group_norm_bwd"], (B.F32,) + HALF_DTYPES, UNET_SHAPES)
               + _cases(["batch_norm_train", "batch_norm_bwd", "batch_norm_eval"], (B.F32,), RESNET_SHAPES)
               + _cases(["instance_norm"], (B.F32,), INSTANCE_SHAPES))
DEFAULT_MODEL_CASES = (_cases(["group_norm"], HALF_DTYPES, [(2, 640, 32, 32)])
                       + _cases(["batch_norm_train", "batch_norm_bwd"], (B.F32,), [(32, 64, 56, 56)]))


def benchmark_cases(quick=False, shapes=None, ops=None, layouts=LAYOUTS, models=False, dtypes=None):
    """[(op key, layout, dtype, shape)] of a run: every op and layout in float32
    at `shapes` (default SHAPES, QUICK_SHAPES with quick), then model rows
    (none with quick or explicit shapes, a few by default, all with models),
    filtered by ops, layouts and dtypes."""
    keys = [op[0] for op in OPS if ops is None or op[0] in ops]
    cases = _cases(keys, (B.F32,), shapes or (QUICK_SHAPES if quick else SHAPES), layouts)
    if models:
        cases += MODEL_CASES
    elif not quick and not shapes:
        cases += DEFAULT_MODEL_CASES
    if dtypes is not None:
        cases = [c for c in cases if c[2].name in dtypes]
    return [c for c in cases if c[0] in keys and c[1] in layouts]


def run_spatial_benchmark(thread_counts, baseline, torch_mod, warmup, repeats, progress, quick=False,
                          shapes=None, ops=None, layouts=LAYOUTS, adjacent=True, models=False, dtypes=None):
    """Rows in pynorm.bench.run_benchmark's format (add_copy_fraction and
    format_table apply to them): every case of benchmark_cases x thread count."""
    cases = benchmark_cases(quick, shapes, ops, layouts, models, dtypes)
    rows = []
    total = len(cases) * len(thread_counts)
    data, data_key = None, None
    for key, layout, dtype, shape in cases:
        if data_key != (layout, dtype, shape):   # consecutive cases share their buffers
            data = None
            data, data_key = Data(shape, layout, with_torch=baseline == "torch", dtype=dtype), (layout, dtype, shape)
        _, label, passes, make = OPS_BY_KEY[key]
        fns = make(data)
        nbytes = passes[layout] * data.x.nbytes
        for threads in thread_counts:
            progress.show(f"[{len(rows) + 1}/{total}] {label} {layout} {dtype.name} {shape} threads={threads}")
            B.set_threads(threads, torch_mod)
            copy_gbps = B.copy_probe() if adjacent else None
            t_base, t_pn = B.time_pair(fns[baseline], fns["pynorm"], warmup, repeats)
            rows.append(dict(
                op=f"{key}_{layout.lower()}", label=f"{label} {layout}", layout=layout, dtype=dtype.name,
                shape=list(shape), threads=threads, baseline=baseline,
                baseline_ms=t_base * 1e3, pynorm_ms=t_pn * 1e3, speedup=t_base / t_pn,
                bytes=nbytes, pynorm_gbps=nbytes / t_pn / 1e9, copy_gbps=copy_gbps,
                baseline_allocating_only=False))
        del fns
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pynorm.bench_spatial",
                                description="Self-check and benchmark pynorm's spatial norms against torch.")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=B.parse_threads, default=[2, 1], metavar="N[,N]")
    p.add_argument("--repeats", type=B.positive_int, default=None, metavar="K")
    p.add_argument("--ops", default=None, help="comma-separated op keys (default: all)")
    p.add_argument("--shapes", type=B.shapes_arg(4, ",", ";"), default=None, metavar="N,C,H,W[;...]",
                   help="shapes (default: the two above)")
    p.add_argument("--layouts", default="NCHW,NHWC")
    p.add_argument("--models", action="store_true",
                   help="every model row (UNet GroupNorm in float32/bfloat16/float16, ResNet BatchNorm, "
                        "InstanceNorm); default: a few")
    p.add_argument("--dtypes", default=None, help="comma-separated dtypes of the rows to run (default: all)")
    p.add_argument("--baseline", choices=["auto", "torch", "numpy"], default="auto")
    p.add_argument("--no-check", action="store_true", help="skip the self-check")
    B.add_malloc_argument(p)
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)
    warmup = 1 if args.quick else 3
    if not args.no_check:
        ok, checks = self_check()
        if not ok:
            print(f"self-check FAILED ({sum(not c['ok'] for c in checks)} of {len(checks)})")
            return B.EXIT_SELFCHECK_FAILED
        print(f"self-check passed ({len(checks)} checks)\n")
    torch_mod, baseline = B.import_torch(args.baseline)
    malloc_mode = B.set_malloc(args.torch_malloc)
    saved = pynorm.get_num_threads()
    progress = B.Progress()
    try:
        copy_start = B.measure_copy_bandwidth(args.threads, torch_mod, progress)
        rows = run_spatial_benchmark(args.threads, baseline, torch_mod, warmup, repeats, progress, args.quick,
                                     shapes=args.shapes, ops=args.ops.split(",") if args.ops else None,
                                     layouts=tuple(args.layouts.split(",")), adjacent=not args.quick,
                                     models=args.models,
                                     dtypes=args.dtypes.split(",") if args.dtypes else None)
        copy_end = B.measure_copy_bandwidth(args.threads, torch_mod, progress)
    finally:
        progress.clear()
        pynorm.set_num_threads(saved)
    copy_bw = B.peak_copy_bandwidth(rows, copy_start, copy_end)
    B.add_copy_fraction(rows, copy_bw)
    print("copy bandwidth: " + ", ".join(f"peak {copy_bw[n]:.1f} GB/s at {n} thread(s), next to the rows "
                                         f"{B.adjacent_range(rows, n)}" for n in args.threads))
    print(B.format_table(rows, baseline))
    print()
    print(NOTE)
    if baseline == "torch":
        print(B.MALLOC_NOTES[malloc_mode])
    return B.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
