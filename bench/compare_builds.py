"""Two builds of libpynorm side by side in one process: the way to tell
whether a kernel change is faster.

    python bench/compare_builds.py OLD/libpynorm.so NEW/libpynorm.so [--threads 2,1]
        [--dtypes float32,bfloat16,float16] [--repeats 11] [--shapes 8192x768,...] [--after-torch]

Both libraries run the token norms (LayerNorm, RMSNorm: forward with out=,
backward with dx, dweight, dbias) on the same NumPy buffers, their calls
alternating, after a warm-up call each; the table gives each build's median
GB/s (forward: read x, write y; backward: read x and dy, write dx) and
new/old, the ratio of their median times (above 1: NEW is faster). With
--after-torch each timed call follows a torch layer_norm of the same x, as in
`python -m pynorm`, where torch and pynorm alternate: the cache then holds x
and torch's output rather than the last output of the build being timed,
which matters for shapes near the last-level cache's size. The
machine's memory bandwidth drifts over minutes, so only ratios within one run
mean much; build OLD from the commit to compare against, for example
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES), help="rows x C, comma-separated")
    ap.add_argument("--after-torch", action="store_true", help="a torch layer_norm of x before each timed call")
    args = ap.parse_args(argv)
    torch = None
    ffi, bfloat16, libs = _load([args.old, args.new])
    from pynorm.bench import shapes_arg   # after _load: importing pynorm needs a library
    try:
        shapes = shapes_arg(2)(args.shapes)
    except argparse.ArgumentTypeError as e:
        ap.error(f"argument --shapes: {e}")
    if args.after_torch:
        import torch
        from pynorm.bench import to_torch
    dtypes = {"float32": (np.float32, 0), "float16": (np.float16, 1), "bfloat16": (bfloat16, 2)}
    print(f"{'op':18s} {'dtype':9s} {'shape':11s} thr  {'old GB/s':>8s}  {'new GB/s':>8s}  new/old")
    for threads in (int(t) for t in args.threads.split(",")):
        for lib in libs.values():
            lib.pn_set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        for dname in args.dtypes.split(","):
            npdt, code = dtypes[dname]
            for R, C in shapes:
                rng = np.random.default_rng(0)
                x = rng.standard_normal((R, C)).astype(np.float32).astype(npdt)
                dy = rng.standard_normal((R, C)).astype(np.float32).astype(npdt)
                before = lambda: None
                if torch is not None:
                    tx = to_torch(x)
                    before = lambda: torch.nn.functional.layer_norm(tx, (C,))
                for op in ("LayerNorm", "RMSNorm"):
                    calls = {k: _calls(ffi, lib, op, x, dy, code, R, C) for k, lib in libs.items()}
                    for part in ("fwd", "bwd"):
                        times = {k: [] for k in libs}
                        for k in libs:
                            if calls[k][part][0]() != 0:
                                sys.exit(f"{k}: {op} {part} {dname} failed")
                        for _ in range(args.repeats):
                            for k in libs:
                                before()
                                t0 = time.perf_counter()
                                calls[k][part][0]()
                                times[k].append(time.perf_counter() - t0)
                        med = {k: statistics.median(v) for k, v in times.items()}
                        gb = calls["old"][part][1] * x.nbytes / 1e9
                        print(f"{op + ' ' + part:18s} {dname:9s} {f'{R}x{C}':11s} {threads:3d}  "
                              f"{gb / med['old']:8.1f}  {gb / med['new']:8.1f}  {med['old'] / med['new']:6.2f}x",
                              flush=True)


if __name__ == "__main__":
    main()
