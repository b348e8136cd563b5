"""How fast could any forward be here? The token forwards next to the
simplest kernel that reads x and writes y, timed the way `python -m pynorm`
times them.

    python bench/ceiling.py [--shapes 8192x768,4096x4096] [--threads 2,1]
        [--repeats 21] [--torch-malloc steady]

For each shape and op (LayerNorm, RMSNorm, float32) the script alternates
torch's call with pynorm's, and torch's call with a bound kernel: torch.mul(x,
1.5, out=y), one multiply per value into a preallocated y, ordinary stores,
torch's threads. Each timed call thus follows a torch call of the same op on
the same x, as in the benchmark, and finds the cache as that call left it.
The bound's speedup (torch ms / bound ms) is about the most that any kernel
reading x and writing y reaches against torch in these conditions: a target
above it asks for more than the memory delivers. `pynorm / bound` is the
bound's time over pynorm's (100%: pynorm as fast as the bare multiply).
"""
import argparse
import statistics
import sys
import time

import numpy as np

import pynorm
from pynorm import bench

OPS = ("layer_norm", "rms_norm")


def time_rotation(calls, warmup, repeats):
    """Median seconds of each of `calls` ({name: fn}), run in turn, again and
    again: [torch, pynorm, torch, bound] times `repeats`."""
    times = {name: [] for name in calls}
    order = list(calls)
    for i in range(warmup + repeats):
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            t1 = time.perf_counter()
            if i >= warmup:
                times[name].append(t1 - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(shape, op_key, threads, warmup, repeats):
    import torch
    bench.set_threads(threads, torch)
    d = bench.Data(shape, np.float32, with_torch=True)
    fns = bench.OPS_BY_KEY[op_key].fns(d)
    ty = torch.from_numpy(d.y_out)
    bound = lambda: torch.mul(d.t.x, 1.5, out=ty)
    t = time_rotation({"torch": fns["torch"], "pynorm": fns["pynorm"],
                       "torch ": fns["torch"], "bound": bound}, warmup, repeats)
    t_torch = statistics.median([t["torch"], t["torch "]])
    return dict(op=op_key, shape=list(shape), threads=threads, torch_ms=t_torch * 1e3,
                pynorm_ms=t["pynorm"] * 1e3, bound_ms=t["bound"] * 1e3,
                speedup=t_torch / t["pynorm"], bound_speedup=t_torch / t["bound"],
                bound_over_pynorm=t["bound"] / t["pynorm"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=bench.shapes_arg(2), default=bench.SHAPES, help="rows x C, comma-separated")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    bench.add_malloc_argument(ap)
    args = ap.parse_args(argv)
    mode = bench.set_malloc(args.torch_malloc)
    print(f"pynorm isa {pynorm.isa()}, malloc {mode}; bound = torch.mul(x, 1.5, out=y)")
    print(f"{'op':10s} {'shape':11s} thr  torch ms  pynorm ms  bound ms  speedup  bound speedup"
          "  pynorm / bound")
    for threads in (int(n) for n in args.threads.split(",")):
        for shape in args.shapes:
            for op in OPS:
                r = measure(shape, op, threads, args.warmup, args.repeats)
                print(f"{op:10s} {'x'.join(map(str, shape)):11s} {threads:3d}  {r['torch_ms']:8.3f}"
                      f"  {r['pynorm_ms']:9.3f}  {r['bound_ms']:8.3f}  {r['speedup']:6.2f}x"
                      f"  {r['bound_speedup']:12.2f}x  {100 * r['bound_over_pynorm']:13.0f}%",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
