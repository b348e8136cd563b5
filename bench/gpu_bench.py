#!/usr/bin/env python3
"""GPU benchmark: pynorm's CUDA kernels side by side with torch CUDA and
Liger-Kernel (when importable), LayerNorm and RMSNorm, forward and backward;
then the spatial norms (GroupNorm, InstanceNorm, BatchNorm training and eval,
NCHW and NHWC: torch on channels_last tensors) against torch CUDA.

    python3 bench/gpu_bench.py [--repeats 30] [--quick] [--out FILE] [--no-write]

Needs torch with CUDA and libpynorm_cuda (found as pynorm._cuda finds it:
PYNORM_CUDA_LIBRARY, or next to the C library named by PYNORM_LIBRARY);
CuPy is not needed: the kernels are called through cffi on torch's buffers
and torch's current stream.

Method: every implementation runs on the same buffers. Inputs rotate over
enough buffer sets (each op's working set over the 50 MB L2 several times
over) that no call finds its inputs in cache. Times come from CUDA events
around a batch of calls (launch gaps hidden behind the GPU work), divided by
the batch size; the median over repeats is reported. GB/s counts the bytes
that must move: a forward reads x and writes y (2N elements), a backward reads
dy and x and writes dx (3N); weights, statistics and partial sums are not
counted. The yardstick is a device-to-device copy (torch's copy_) measured in
the same run, counting bytes read plus bytes written.

Before timing, every implementation's outputs are compared with a float64
computation (the "max err" columns: max |out - ref| / max |ref|).
"""

import argparse
import datetime
import math
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(16384, 4096), (8192, 8192), (65536, 768)]
QUICK_SHAPES = [(4096, 4096), (16384, 768)]
# spatial: (name, N, C, H, W, groups); groups None: BatchNorm
SPATIAL_CASES = [("GroupNorm G=32", 32, 256, 64, 64, 32), ("InstanceNorm", 32, 128, 64, 64, 128),
                 ("BatchNorm", 64, 128, 56, 56, None), ("BatchNorm", 256, 64, 28, 28, None)]
QUICK_SPATIAL_CASES = [("GroupNorm G=32", 16, 256, 32, 32, 32), ("BatchNorm", 32, 64, 56, 56, None)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PN_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
EPS = 1e-5
ROTATE_BYTES = 256 << 20        # each op touches at least this much per rotation


# ---- the libraries -------------------------------------------------------------------------

def load_pynorm():
    from pynorm import _cuda
    ffi, lib = _cuda.library()
    return ffi, lib, _cuda.library_path


def load_liger():
    """(rms_fn, ln_fn, note): autograd Functions of Liger-Kernel, or None and why."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception as e:  # not installed, or an incompatible version
        try:
            from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm
            return liger_rms_norm, liger_layer_norm, "liger_kernel.transformers.functional"
        except Exception:
            return None, None, f"Liger-Kernel not importable ({type(e).__name__}: {e})"

    def rms(x, w, eps):
        try:   # (X, W, eps, offset, casting_mode, in_place): keep dy intact between timed calls
            return LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
        except TypeError:
            return LigerRMSNormFunction.apply(x, w, eps)

    def ln(x, w, b, eps):
        return LigerLayerNormFunction.apply(x, w, b, eps)

    return rms, ln, "liger_kernel.ops"


# ---- timing ------------------------------------------------------------------------------------

def time_batches(fns, repeats, inner):
    """Median ms per call of fns[i % len(fns)]() over `repeats` batches of `inner` calls."""
    for i in range(max(3, len(fns))):       # warm-up
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        start.record()
        for i in range(inner):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 30, repeats=20):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_batches([lambda: dst.copy_(src)], repeats, 5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---- one shape and dtype ------------------------------------------------------------------------

class Sets:
    """Rotating buffer sets for one (rows, C, dtype)."""

    def __init__(self, rows, C, dtype, nsets):
        g = torch.Generator(device="cuda").manual_seed(rows * 131 + C)
        self.sets = []
        for _ in range(nsets):
            s = {
                "x": torch.randn(rows, C, device="cuda", dtype=torch.float32, generator=g).to(dtype),
                "dy": torch.randn(rows, C, device="cuda", dtype=torch.float32, generator=g).to(dtype),
                "y": torch.empty(rows, C, device="cuda", dtype=dtype),
                "dx": torch.empty(rows, C, device="cuda", dtype=dtype),
                "mean": torch.empty(rows, device="cuda", dtype=torch.float32),
                "rstd": torch.empty(rows, device="cuda", dtype=torch.float32),
            }
            self.sets.append(s)
        self.w = (1 + 0.1 * torch.randn(C, device="cuda", generator=g)).to(dtype)
        self.b = (0.1 * torch.randn(C, device="cuda", generator=g)).to(dtype)
        self.dw = torch.empty(C, device="cuda", dtype=dtype)
        self.db = torch.empty(C, device="cuda", dtype=dtype)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    d = (out - ref).abs().max().item()
    m = ref.abs().max().item()
    return d / m if m > 0 else d


def check_status(ffi, lib, st, what):
    if st != 0:
        raise RuntimeError(f"{what}: {ffi.string(lib.pn_cuda_status_string(st)).decode()} "
                           f"({ffi.string(lib.pn_cuda_last_error_string()).decode()})")


def bench_one(ffi, lib, liger, rows, C, dname, dtype, repeats, copy_gbps):
    es = torch.empty((), dtype=dtype).element_size()
    nsets = max(2, math.ceil(ROTATE_BYTES / (rows * C * es)))
    S = Sets(rows, C, dtype, nsets)
    stream = lambda: ffi.cast("cudaStream_t", torch.cuda.current_stream().cuda_stream)  # noqa: E731
    P = lambda t: ffi.cast("void *", t.data_ptr())  # noqa: E731
    dt = PN_DTYPE[dtype]
    ln_scratch = torch.empty(lib.pn_cuda_layernorm_backward_scratch_size(1, rows, C, dt), dtype=torch.uint8, device="cuda")
    rms_scratch = torch.empty(lib.pn_cuda_rmsnorm_backward_scratch_size(1, rows, C, dt), dtype=torch.uint8, device="cuda")

    check = lambda st, what: check_status(ffi, lib, st, what)  # noqa: E731

    # -- pynorm
    def pn_ln_fwd(s):
        check(lib.pn_cuda_layernorm_forward(P(s["y"]), P(s["mean"]), P(s["rstd"]), P(s["x"]), P(S.w), P(S.b),
                                            1, rows, C, EPS, dt, dt, ffi.NULL, stream()), "layernorm_forward")

    def pn_ln_bwd(s):
        check(lib.pn_cuda_layernorm_backward(P(s["dx"]), P(S.dw), P(S.db), P(ln_scratch), ln_scratch.numel(),
                                             P(s["dy"]), P(s["x"]), P(S.w), P(s["mean"]), P(s["rstd"]),
                                             1, rows, C, 0, dt, dt, ffi.NULL, stream()), "layernorm_backward")

    def pn_rms_fwd(s):
        check(lib.pn_cuda_rmsnorm_forward(P(s["y"]), P(s["rstd"]), P(s["x"]), P(S.w),
                                          1, rows, C, EPS, dt, dt, ffi.NULL, stream()), "rmsnorm_forward")

    def pn_rms_bwd(s):
        check(lib.pn_cuda_rmsnorm_backward(P(s["dx"]), P(S.dw), P(rms_scratch), rms_scratch.numel(),
                                           P(s["dy"]), P(s["x"]), P(S.w), P(s["rstd"]),
                                           1, rows, C, 0, dt, dt, ffi.NULL, stream()), "rmsnorm_backward")

    # -- references (float64) and checks, on set 0
    s0 = S.sets[0]
    x64, dy64, w64, b64 = s0["x"].double(), s0["dy"].double(), S.w.double(), S.b.double()
    rows_out = []

    def graph(fwd, *params):
        """(x_req, params_req, y) for timing backward passes through autograd alone."""
        out = []
        for s in S.sets:
            xr = s["x"].detach().clone().requires_grad_(True)
            ps = [p.detach().clone().requires_grad_(True) for p in params]
            out.append((xr, ps, fwd(xr, *ps), s["dy"]))
        return out

    def autograd_bwd(gs):
        return [lambda g=g: torch.autograd.grad(g[2], [g[0]] + g[1], g[3], retain_graph=True) for g in gs]

    for op in ("LayerNorm", "RMSNorm"):
        ln = op == "LayerNorm"
        # reference
        xr = x64.clone().requires_grad_(True)
        wr, br = w64.clone().requires_grad_(True), b64.clone().requires_grad_(True)
        yref = F.layer_norm(xr, (C,), wr, br, EPS) if ln else F.rms_norm(xr, (C,), wr, EPS)
        dxref = torch.autograd.grad(yref, xr, dy64)[0]
        yref = yref.detach()

        # pynorm: check
        (pn_ln_fwd if ln else pn_rms_fwd)(s0)
        (pn_ln_bwd if ln else pn_rms_bwd)(s0)
        torch.cuda.synchronize()
        err = {"pynorm": (rel_err(s0["y"], yref), rel_err(s0["dx"], dxref))}

        # torch: forward, backward through its own kernels where they are exposed
        if ln:
            t_fwd = [lambda s=s: F.layer_norm(s["x"], (C,), S.w, S.b, EPS) for s in S.sets]
            stats = [torch.ops.aten.native_layer_norm(s["x"], (C,), S.w, S.b, EPS) for s in S.sets]
            t_bwd = [lambda s=s, st=st: torch.ops.aten.native_layer_norm_backward(
                s["dy"], s["x"], (C,), st[1], st[2], S.w, S.b, [True, True, True])
                for s, st in zip(S.sets, stats)]
            y_t = F.layer_norm(s0["x"], (C,), S.w, S.b, EPS)
            dx_t = t_bwd[0]()[0]
            t_note = ""
        else:
            t_fwd = [lambda s=s: F.rms_norm(s["x"], (C,), S.w, EPS) for s in S.sets]
            gs = graph(lambda x, w: F.rms_norm(x, (C,), w, EPS), S.w)
            t_bwd = autograd_bwd(gs)
            y_t = F.rms_norm(s0["x"], (C,), S.w, EPS)
            dx_t = t_bwd[0]()[0]
            t_note = "torch RMSNorm backward: autograd on a recorded graph"
        err["torch"] = (rel_err(y_t, yref), rel_err(dx_t, dxref))
        del y_t, dx_t

        # Liger
        l_fwd = l_bwd = None
        l_note = liger[2]
        if liger[0] is not None:
            try:
                if ln:
                    lf = lambda x, w, b: liger[1](x, w, b, EPS)  # noqa: E731
                    l_fwd = [lambda s=s: lf(s["x"], S.w, S.b) for s in S.sets]
                    gs = graph(lf, S.w, S.b)
                else:
                    lf = lambda x, w: liger[0](x, w, EPS)  # noqa: E731
                    l_fwd = [lambda s=s: lf(s["x"], S.w) for s in S.sets]
                    gs = graph(lf, S.w)
                l_bwd = autograd_bwd(gs)
                with torch.no_grad():
                    y_l = l_fwd[0]()
                dx_l = l_bwd[0]()[0]
                err["liger"] = (rel_err(y_l, yref), rel_err(dx_l, dxref))
                del y_l, dx_l
            except Exception as e:
                l_fwd = l_bwd = None
                l_note = f"Liger-Kernel failed here ({type(e).__name__}: {e})"

        for kind in ("forward", "backward"):
            fwd = kind == "forward"
            inner = 2 * len(S.sets)
            pn = (pn_ln_fwd if ln else pn_rms_fwd) if fwd else (pn_ln_bwd if ln else pn_rms_bwd)
            with torch.no_grad():
                tp = time_batches([lambda s=s: pn(s) for s in S.sets], repeats, inner)
            if fwd or ln:       # torch's own kernels
                with torch.no_grad():
                    tt = time_batches(t_fwd if fwd else t_bwd, repeats, inner)
            else:               # autograd on a recorded graph
                tt = time_batches(t_bwd, repeats, inner)
            tl = None
            if l_fwd is not None:
                if fwd:
                    with torch.no_grad():
                        tl = time_batches(l_fwd, repeats, inner)
                else:
                    tl = time_batches(l_bwd, repeats, inner)
            nbytes = (2 if fwd else 3) * rows * C * es
            gbps = nbytes / (tp * 1e-3) / 1e9
            rows_out.append({
                "op": f"{op} {kind}", "dtype": dname, "shape": f"{rows}x{C}",
                "torch_ms": tt, "liger_ms": tl, "pynorm_ms": tp,
                "pynorm_gbps": gbps, "pct_copy": 100 * gbps / copy_gbps,
                "torch_gbps": nbytes / (tt * 1e-3) / 1e9 if tt else None,
                "speedup": tt / tp if tt else None,
                "err": {k: v[0 if fwd else 1] for k, v in err.items()},
                "notes": [n for n in ((t_note if not fwd else ""), l_note if l_fwd is None else "") if n],
            })
        torch.cuda.empty_cache()
    return rows_out


# ---- spatial norms --------------------------------------------------------------------------------

def bench_spatial(ffi, lib, name, N, C, H, W, groups, dname, dtype, layout, repeats, copy_gbps):
    """Rows for one spatial case: forward (BatchNorm: training and eval) and backward,
    pynorm (the CUDA library called on torch's buffers) against torch CUDA."""
    es = torch.empty((), dtype=dtype).element_size()
    n = N * C * H * W
    nsets = max(2, math.ceil(ROTATE_BYTES / (n * es)))
    cl = layout == "NHWC"
    g = torch.Generator(device="cuda").manual_seed(N * 7 + C)
    mf = torch.channels_last if cl else torch.contiguous_format

    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=g).to(dtype)

    sets = [{"x": t(N, C, H, W).contiguous(memory_format=mf), "dy": t(N, C, H, W).contiguous(memory_format=mf)}
            for _ in range(nsets)]
    for s in sets:
        s["y"] = torch.empty_like(s["x"])
        s["dx"] = torch.empty_like(s["x"])
    w, b = (1 + 0.1 * t(C)), 0.1 * t(C)
    dw, db = torch.empty_like(w), torch.empty_like(b)
    G = groups if groups is not None else C
    nst = N * G if groups is not None else C
    mean = torch.empty(nst, device="cuda", dtype=torch.float32)
    rstd = torch.empty(nst, device="cuda", dtype=torch.float32)
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    P = lambda a: ffi.cast("void *", a.data_ptr())  # noqa: E731
    stream = lambda: ffi.cast("cudaStream_t", torch.cuda.current_stream().cuda_stream)  # noqa: E731
    dt, lay, S = PN_DTYPE[dtype], 1 if cl else 0, H * W
    if groups is not None:
        nbytes = lib.pn_cuda_groupnorm_backward_scratch_size(N, C, S, G, lay, dt)
    else:
        nbytes = lib.pn_cuda_batchnorm_backward_scratch_size(N, C, S, lay, dt)
    scratch = torch.empty(max(int(nbytes), 16), dtype=torch.uint8, device="cuda")

    check = lambda st, what: check_status(ffi, lib, st, what)  # noqa: E731

    def pn_fwd(s, training=True):
        if groups is not None:
            check(lib.pn_cuda_groupnorm_forward(P(s["y"]), P(mean), P(rstd), P(s["x"]), P(w), P(b), N, C, S, G,
                                                EPS, lay, dt, dt, stream()), "groupnorm_forward")
        else:
            check(lib.pn_cuda_batchnorm_forward(P(s["y"]), P(mean), P(rstd), P(rm), P(rv), P(s["x"]), P(w), P(b),
                                                N, C, S, EPS, 0.1, 0, 2 if training else 0, lay, dt, dt, 0,
                                                stream()), "batchnorm_forward")

    def pn_bwd(s):
        if groups is not None:
            check(lib.pn_cuda_groupnorm_backward(P(s["dx"]), P(dw), P(db), P(scratch), scratch.numel(), P(s["dy"]),
                                                 P(s["x"]), P(w), P(mean), P(rstd), N, C, S, G, 0, lay, dt, dt,
                                                 stream()), "groupnorm_backward")
        else:
            check(lib.pn_cuda_batchnorm_backward(P(s["dx"]), P(dw), P(db), P(scratch), scratch.numel(), P(s["dy"]),
                                                 P(s["x"]), P(w), P(mean), P(rstd), N, C, S, 2, lay, dt, dt,
                                                 stream()), "batchnorm_backward")

    def t_fwd(x, training=True):
        if groups is not None:
            return F.group_norm(x, G, w, b, EPS)
        return F.batch_norm(x, rm, rv, w, b, training, 0.1, EPS)   # eval leaves rm, rv as they are

    # accuracy on set 0: y and dx against float64 autograd
    s0 = sets[0]
    x64 = s0["x"].double().requires_grad_(True)
    w64, b64 = w.double(), b.double()
    y64 = F.group_norm(x64, G, w64, b64, EPS) if groups is not None else \
        F.batch_norm(x64, None, None, w64, b64, True, 0.1, EPS)
    dx64 = torch.autograd.grad(y64, x64, s0["dy"].double())[0]
    pn_fwd(s0)
    pn_bwd(s0)
    torch.cuda.synchronize()
    xr = s0["x"].detach().clone().requires_grad_(True)
    yt = t_fwd(xr)
    dxt = torch.autograd.grad(yt, xr, s0["dy"])[0]
    err_f = {"pynorm": rel_err(s0["y"], y64.detach()), "torch": rel_err(yt, y64.detach())}
    err_b = {"pynorm": rel_err(s0["dx"], dx64), "torch": rel_err(dxt, dx64)}
    del x64, y64, dx64, xr, yt, dxt

    rows = []
    inner = 2 * len(sets)
    kinds = [("forward", True)] + ([("eval forward", False)] if groups is None else []) + [("backward", None)]
    graphs = None
    for kind, training in kinds:
        fwd = training is not None
        if fwd:
            with torch.no_grad():
                tp = time_batches([lambda s=s: pn_fwd(s, training) for s in sets], repeats, inner)
                tt = time_batches([lambda s=s: t_fwd(s["x"], training) for s in sets], repeats, inner)
        else:
            tp = time_batches([lambda s=s: pn_bwd(s) for s in sets], repeats, inner)
            if graphs is None:   # torch's backward: autograd on recorded graphs
                graphs = []
                for s in sets:
                    xr = s["x"].detach().clone().requires_grad_(True)
                    graphs.append((xr, t_fwd(xr), s["dy"]))
            tt = time_batches([lambda gr=gr: torch.autograd.grad(gr[1], [gr[0]], gr[2], retain_graph=True)
                               for gr in graphs], repeats, inner)
        nbytes = (2 if fwd else 3) * n * es
        gbps = nbytes / (tp * 1e-3) / 1e9
        rows.append({
            "op": f"{name} {kind} {layout}", "dtype": dname, "shape": f"{N}x{C}x{H}x{W}",
            "torch_ms": tt, "liger_ms": None, "pynorm_ms": tp,
            "pynorm_gbps": gbps, "pct_copy": 100 * gbps / copy_gbps,
            "torch_gbps": nbytes / (tt * 1e-3) / 1e9, "speedup": tt / tp,
            "err": err_f if fwd and training else (err_b if not fwd else {}),
            "notes": ["torch spatial backward: autograd on a recorded graph"] if not fwd else [],
        })
    del graphs, sets
    torch.cuda.empty_cache()
    return rows


# ---- report -------------------------------------------------------------------------------------

def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def table(rows):
    head = ("| op | dtype | shape | torch ms | Liger ms | pynorm ms | pynorm GB/s | % of copy | "
            "torch GB/s | speedup vs torch | max err pynorm / torch / Liger |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        e = r["err"]
        errs = " / ".join(fmt(e.get(k), ".1e") for k in ("pynorm", "torch", "liger"))
        lines.append(f"| {r['op']} | {r['dtype']} | {r['shape']} | {fmt(r['torch_ms'], '.3f')} | "
                     f"{fmt(r['liger_ms'], '.3f')} | {fmt(r['pynorm_ms'], '.3f')} | {fmt(r['pynorm_gbps'], '.0f')} | "
                     f"{fmt(r['pct_copy'], '.0f')}% | {fmt(r['torch_gbps'], '.0f')} | {fmt(r['speedup'], '.2f')}x | {errs} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed batches per measurement (median reported)")
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    ap.add_argument("--out", help="markdown results file (default bench/results/<date>-<device>.md)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA device", file=sys.stderr)
        return 2
    ffi, lib, libpath = load_pynorm()
    liger = load_liger()
    dev = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    repeats = 10 if args.quick else args.repeats
    shapes = QUICK_SHAPES if args.quick else SHAPES
    copy_gbps = copy_bandwidth()
    print(f"device: {dev} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}; libpynorm_cuda {ffi.string(lib.pn_cuda_version()).decode()} ({libpath})")
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write); Liger: {liger[2]}")
    rows = []
    for rc in shapes:
        for dname, dtype in DTYPES.items():
            rows += bench_one(ffi, lib, liger, rc[0], rc[1], dname, dtype, repeats, copy_gbps)
            print(table(rows[-4:]).split("\n", 2)[-1], flush=True)
    for case in (QUICK_SPATIAL_CASES if args.quick else SPATIAL_CASES):
        for dname, dtype in DTYPES.items():
            for layout in ("NCHW", "NHWC"):
                new_rows = bench_spatial(ffi, lib, *case, dname, dtype, layout, repeats, copy_gbps)
                rows += new_rows
                print(table(new_rows).split("\n", 2)[-1], flush=True)
    copy_again = copy_bandwidth()
    notes = sorted({n for r in rows for n in r["notes"]})
    text = table(rows)
    print()
    print(text)
    for n in notes:
        print(f"note: {n}")
    print(f"copy bandwidth before/after: {copy_gbps:.0f} / {copy_again:.0f} GB/s")
    if not args.no_write:
        date = datetime.date.today().isoformat()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", dev).strip("-").lower()
        path = args.out or os.path.join(HERE, "results", f"{date}-{slug}.md")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"# pynorm CUDA benchmark, {date}, {dev}\n\n")
            f.write(f"- device: {dev}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB\n")
            f.write(f"- torch {torch.__version__} (CUDA {torch.version.cuda}); Liger: {liger[2]}\n")
            f.write(f"- libpynorm_cuda {ffi.string(lib.pn_cuda_version()).decode()}\n")
            f.write(f"- device-to-device copy (torch copy_, 1 GiB, read + write): {copy_gbps:.0f} GB/s before, "
                    f"{copy_again:.0f} GB/s after the rows\n")
            f.write("- times: median over batches of CUDA-event-timed calls on rotating buffers (each rotation "
                    f"over {ROTATE_BYTES >> 20} MiB); GB/s counts 2N elements for a forward, 3N for a backward\n")
            f.write("- max err: max |out - ref| / max |ref| against float64 (y for forward rows, dx for backward; "
                    "spatial shapes are N x C x H x W, BatchNorm's eval rows unchecked)\n\n")
            f.write(text + "\n")
            for n in notes:
                f.write(f"\nNote: {n}\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
