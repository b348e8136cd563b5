"""Two builds of libpynorm side by side in one process: the way to tell
whether a kernel change is faster.

    python bench/compare_builds.py OLD/libpynorm.so NEW/libpynorm.so [--threads 2,1]
        [--dtypes float32,bfloat16,float16] [--repeats 11] [--shapes 8192x768,...] [--after-torch]
    python bench/compare_builds.py OLD/libpynorm.so NEW/libpynorm.so --suite spatial
        [--dtypes float32,float64] [--shapes 32x64x3136x32,...] [--only 'BN eval']   (N x C x S x G)

Both libraries run the same calls on the same NumPy buffers, their calls
alternating, after a warm-up call each: the token norms (LayerNorm, RMSNorm:
forward with out=, backward with dx, dweight, dbias), or with --suite spatial
GroupNorm and BatchNorm (training) forward and backward and BatchNorm eval
forward (running statistics) in NCHW and NHWC. The
table gives each build's median GB/s (forward: read x, write y; backward:
read x and dy, write dx) and new/old, the ratio of their median times (above
1: NEW is faster). With --after-torch (token suite) each timed call follows a
torch layer_norm of the same x, as in `python -m pynorm`, where torch and
pynorm alternate: the cache then holds x and torch's output rather than the
last output of the build being timed, which matters for shapes near the
last-level cache's size. The machine's memory bandwidth drifts over minutes,
so only ratios within one run mean much; a second run with OLD and NEW
swapped tells a real difference from the order's. Build OLD from the commit
to compare against, for example
`git worktree add /tmp/old HEAD~1 && cmake -S /tmp/old -B /tmp/old/build
-DBUILD_TESTING=OFF -DPYNORM_CUDA=OFF && cmake --build /tmp/old/build --target pynorm`.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

SHAPES = [(8192, 768), (4096, 4096), (1024, 16384)]
SPATIAL_SHAPES = [(32, 64, 3136, 32), (8, 256, 4096, 32), (128, 512, 49, 32), (64, 32, 12544, 8)]
DTYPES = ("float32", "float16", "bfloat16", "float64")   # pn_dtype's order


def _load(paths):
    os.environ.setdefault("PYNORM_LIBRARY", paths[0])   # pynorm's own import needs a library
    from pynorm._lib import ffi
    from pynorm._arrays import bfloat16
    return ffi, bfloat16, {name: ffi.dlopen(p) for name, p in zip(("old", "new"), paths)}


def _calls(ffi, lib, op, x, dy, dtype_code, R, C):
    """The forward and backward of op ('LayerNorm' or 'RMSNorm') on these buffers."""
    p = lambda a: ffi.cast("void *", a.ctypes.data)
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    mean, rstd = np.zeros(R, np.float32), np.ones(R, np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    dw, db = np.empty(C, np.float32), np.empty(C, np.float32)
    if op == "LayerNorm":
        scratch = np.empty(lib.pn_layernorm_backward_scratch_size(1, R, C, dtype_code), np.uint8)
        fwd = lambda: lib.pn_layernorm_forward(p(y), p(mean), p(rstd), p(x), p(w), p(b), 1, R, C, 1e-5,
                                               dtype_code, 0, ffi.NULL)
        bwd = lambda: lib.pn_layernorm_backward(p(dx), p(dw), p(db), p(scratch), scratch.nbytes, p(dy), p(x), p(w),
                                                p(mean), p(rstd), 1, R, C, 0, dtype_code, 0, ffi.NULL)
    else:
        scratch = np.empty(lib.pn_rmsnorm_backward_scratch_size(1, R, C, dtype_code), np.uint8)
        fwd = lambda: lib.pn_rmsnorm_forward(p(y), p(rstd), p(x), p(w), 1, R, C, 1e-5, dtype_code, 0, ffi.NULL)
        bwd = lambda: lib.pn_rmsnorm_backward(p(dx), p(dw), p(scratch), scratch.nbytes, p(dy), p(x), p(w), p(rstd),
                                              1, R, C, 0, dtype_code, 0, ffi.NULL)
    return {"fwd": (fwd, 2), "bwd": (bwd, 3)}   # call, passes over memory of x's size


def _spatial_calls(ffi, lib, op, layout, x, dy, dtype_code, N, C, S, G):
    """The forward and backward of op ('GroupNorm', 'BatchNorm' in training)
    or the forward alone ('BatchNorm eval': the running statistics) on these
    buffers, in layout lib.PN_NCHW or lib.PN_NHWC."""
    p = lambda a: ffi.cast("void *", a.ctypes.data)
    nstats = N * G if op == "GroupNorm" else C
    mean = np.zeros(nstats, np.float64 if dtype_code == lib.PN_FLOAT64 else np.float32)
    rstd = np.ones_like(mean)
    w, b = np.ones(C, x.dtype), np.zeros(C, x.dtype)
    y, dx = np.empty_like(x), np.empty_like(x)
    dw, db = np.empty(C, x.dtype), np.empty(C, x.dtype)
    if op == "GroupNorm":
        fwd = lambda: lib.pn_groupnorm_forward(p(y), p(mean), p(rstd), p(x), p(w), p(b), N, C, S, G, 1e-5, layout,
                                               dtype_code, dtype_code)
        bwd = lambda: lib.pn_groupnorm_backward(p(dx), p(dw), p(db), ffi.NULL, 0, p(dy), p(x), p(w), p(mean),
                                                p(rstd), N, C, S, G, 0, layout, dtype_code, dtype_code)
    elif op == "BatchNorm eval":
        rng = np.random.default_rng(1)
        rm, rv = rng.standard_normal(C).astype(x.dtype), (rng.random(C) + 0.5).astype(x.dtype)
        fwd = lambda: lib.pn_batchnorm_forward(p(y), p(mean), p(rstd), p(rm), p(rv), p(x), p(w), p(b),
                                               N, C, S, 1e-5, 0.1, 0, 0, layout, dtype_code, dtype_code,
                                               dtype_code)
        return {"fwd": (fwd, 2)}
    else:
        training = lib.PN_BN_TRAINING
        fwd = lambda: lib.pn_batchnorm_forward(p(y), p(mean), p(rstd), ffi.NULL, ffi.NULL, p(x), p(w), p(b),
                                               N, C, S, 1e-5, 0.1, 0, training, layout, dtype_code, dtype_code,
                                               dtype_code)
        bwd = lambda: lib.pn_batchnorm_backward(p(dx), p(dw), p(db), ffi.NULL, 0, p(dy), p(x), p(w), p(mean),
                                                p(rstd), N, C, S, training, layout, dtype_code, dtype_code)
    return {"fwd": (fwd, 2), "bwd": (bwd, 3)}


def _time_pair(calls, part, repeats, before, what):
    """Median seconds of each build's call, the builds alternating."""
    for k, c in calls.items():
        if c[part][0]() != 0:
            sys.exit(f"{k}: {what} failed")
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, c in calls.items():
            before()
            t0 = time.perf_counter()
            c[part][0]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--suite", choices=("token", "spatial"), default="token")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--dtypes", help="default float32,bfloat16,float16 (token), float32,float64 (spatial)")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--shapes", help="rows x C (token) or N x C x S x G (spatial), comma-separated")
    ap.add_argument("--only", help="only the rows whose label starts with this (spatial: 'BN eval', 'GN NHWC', ...)")
    ap.add_argument("--after-torch", action="store_true", help="a torch layer_norm of x before each timed call")
    args = ap.parse_args(argv)
    spatial = args.suite == "spatial"
    if spatial and args.after_torch:
        ap.error("argument --after-torch: only with --suite token")
    dnames = (args.dtypes or ("float32,float64" if spatial else "float32,bfloat16,float16")).split(",")
    for d in dnames:
        if d not in DTYPES:
            ap.error(f"argument --dtypes: {d!r} is not one of {', '.join(DTYPES)}")
    torch = None
    ffi, bfloat16, libs = _load([args.old, args.new])
    from pynorm.bench import shapes_arg   # after _load: importing pynorm needs a library
    default_shapes = SPATIAL_SHAPES if spatial else SHAPES
    try:
        shapes = shapes_arg(4 if spatial else 2)(args.shapes or ",".join("x".join(map(str, s)) for s in default_shapes))
    except argparse.ArgumentTypeError as e:
        ap.error(f"argument --shapes: {e}")
    for s in shapes:
        if spatial and s[1] % s[3]:
            ap.error(f"argument --shapes: {'x'.join(map(str, s))}: the groups G must divide C")
    if args.after_torch:
        import torch
        from pynorm.bench import to_torch
    print(f"{'op':18s} {'dtype':9s} {'shape':15s} thr  {'old GB/s':>8s}  {'new GB/s':>8s}  new/old")
    for threads in (int(t) for t in args.threads.split(",")):
        for lib in libs.values():
            lib.pn_set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        for dname in dnames:
            npdt, code = (bfloat16 if dname == "bfloat16" else np.dtype(dname)), DTYPES.index(dname)
            for shape in shapes:
                rng = np.random.default_rng(0)
                n = int(np.prod(shape[:3])) if spatial else shape[0] * shape[1]
                x = rng.standard_normal(n).astype(np.float32).astype(npdt)
                dy = rng.standard_normal(n).astype(np.float32).astype(npdt)
                before = lambda: None
                if spatial:
                    cases = [(f"{op[0]}N{' eval' * (' ' in op)} {lay}",
                              {k: _spatial_calls(ffi, lib, op, getattr(lib, f"PN_{lay}"), x, dy, code, *shape)
                               for k, lib in libs.items()})
                             for op in ("GroupNorm", "BatchNorm", "BatchNorm eval") for lay in ("NCHW", "NHWC")]
                else:
                    R, C = shape
                    x, dy = x.reshape(R, C), dy.reshape(R, C)
                    if torch is not None:
                        tx = to_torch(x)
                        before = lambda: torch.nn.functional.layer_norm(tx, (C,))
                    cases = [(op, {k: _calls(ffi, lib, op, x, dy, code, R, C) for k, lib in libs.items()})
                             for op in ("LayerNorm", "RMSNorm")]
                for label, calls in cases:
                    if args.only and not label.startswith(args.only):
                        continue
                    for part in calls["old"]:
                        med = _time_pair(calls, part, args.repeats, before, f"{label} {part} {dname}")
                        gb = calls["old"][part][1] * x.nbytes / 1e9
                        print(f"{label + ' ' + part:18s} {dname:9s} {'x'.join(map(str, shape)):15s} {threads:3d}  "
                              f"{gb / med['old']:8.1f}  {gb / med['new']:8.1f}  {med['old'] / med['new']:6.2f}x",
                              flush=True)


if __name__ == "__main__":
    main()
