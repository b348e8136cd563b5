"""One rank of tests/test_distributed.py: run as

    python dist_worker.py RANK WORLD PORT OUT.json

(from a directory outside the source tree, so that `import pynorm` finds the
installed package). Every rank builds the same full tensors from fixed seeds,
takes its shard, runs pynorm.distributed and compares with the single-process
results (pynorm.torch and torch on the full tensors); the measurements go to
OUT.json for the test to judge. Collectives are counted by wrapping the
torch.distributed functions.
"""
import copy
import datetime
import json
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pynorm.distributed as pnd
import pynorm.torch as pnt

RANK, WORLD, PORT, OUT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

# ---- collective counting ----------------------------------------------------------------

COUNTS = {}
_COLLECTIVES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
                "gather", "scatter", "all_gather_object", "broadcast_object_list", "barrier"]


def _wrap(name):
    fn = getattr(dist, name)

    def counted(*args, **kwargs):
        COUNTS[name] = COUNTS.get(name, 0) + 1
        return fn(*args, **kwargs)
    return counted


for _n in _COLLECTIVES:
    if hasattr(dist, _n):
        setattr(dist, _n, _wrap(_n))


def counted(fn):
    """(result, {collective: calls}) of fn()."""
    COUNTS.clear()
    r = fn()
    return r, dict(COUNTS)


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def widths_for(C, split):
    if split == "even":
        return [pnd.shard_bounds(C, WORLD, r)[1] - pnd.shard_bounds(C, WORLD, r)[0] for r in range(WORLD)]
    # uneven: rank r gets a share proportional to r + 1
    tot = sum(range(1, WORLD + 1))
    w = [C * (r + 1) // tot for r in range(WORLD)]
    w[-1] += C - sum(w)
    return w


def cols(widths):
    start = sum(widths[:RANK])
    return start, start + widths[RANK]


# ---- tensor-parallel LayerNorm / RMSNorm ---------------------------------------------------

def token_case(op, C, split, dtype, loc=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, C)
    x = (loc + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype)
    widths = widths_for(C, split)
    c0, c1 = cols(widths)
    xs = x[..., c0:c1].clone().requires_grad_(True)
    ws = w[c0:c1].clone().requires_grad_(True)
    bs = b[c0:c1].clone().requires_grad_(True)
    if op == "layer":
        y, fwd = counted(lambda: pnd.layer_norm(xs, ws, bs, eps=1e-5))
    else:
        y, fwd = counted(lambda: pnd.rms_norm(xs, ws))
    _, bwd = counted(lambda: y.backward(dy[..., c0:c1]))
    res = {"fwd_collectives": fwd, "bwd_collectives": bwd, "widths": widths}

    def single(fn_kind):
        xf = x.clone().requires_grad_(True)
        wf = w.clone().requires_grad_(True)
        bf = b.clone().requires_grad_(True)
        if fn_kind == "pynorm":
            yf = pnt.layer_norm(xf, (C,), wf, bf, 1e-5) if op == "layer" else pnt.rms_norm(xf, (C,), wf)
        elif fn_kind == "torch":
            yf = F.layer_norm(xf, (C,), wf, bf, 1e-5) if op == "layer" else F.rms_norm(xf, (C,), wf)
        else:   # float64 reference from the same rounded inputs
            xd, wd, bd = [t.detach().double().requires_grad_(True) for t in (xf, wf, bf)]
            eps = 1e-5 if op == "layer" else torch.finfo(torch.float64 if dtype == torch.float64
                                                          else torch.float32).eps
            yd = F.layer_norm(xd, (C,), wd, bd, eps) if op == "layer" else F.rms_norm(xd, (C,), wd, eps)
            yd.backward(dy.double())
            return yd.detach(), xd.grad, wd.grad, bd.grad
        yf.backward(dy)
        return yf.detach(), xf.grad, wf.grad, bf.grad

    out = (y.detach(), xs.grad, ws.grad, bs.grad if op == "layer" else None)
    for kind in ("pynorm", "torch", "ref"):
        full = single(kind)
        for name, got, ref in zip(("y", "dx", "dw", "db"), out, full):
            if got is None:
                continue
            ref_s = ref[..., c0:c1]
            res[f"{name}_vs_{kind}"] = maxdiff(got, ref_s)
            if kind == "ref":
                res[f"{name}_scale"] = float(ref_s.double().abs().max())
        if kind == "ref":
            for name, got in zip(("y", "dx", "dw", "db"), single("pynorm")):
                if got is not None:
                    res[f"{name}_single_vs_ref"] = maxdiff(got[..., c0:c1], full[("y", "dx", "dw", "db").index(name)][..., c0:c1])
            for name, got in zip(("y", "dx", "dw", "db"), single("torch")):
                if got is not None:
                    res[f"{name}_torch_vs_ref"] = maxdiff(got[..., c0:c1], full[("y", "dx", "dw", "db").index(name)][..., c0:c1])
    res["dtype"] = str(dtype)
    return res


def modules_case():
    C = 4097
    widths = widths_for(C, "uneven")
    c0, c1 = cols(widths)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, C, generator=g)
    ln = pnd.LayerNorm(widths[RANK])
    rms = pnd.RMSNorm(widths[RANK], eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(torch.linspace(0.5, 1.5, C)[c0:c1])
        rms.weight.copy_(torch.linspace(1.5, 0.5, C)[c0:c1])
    y1, y2 = ln(x[:, c0:c1]), rms(x[:, c0:c1])
    r1 = F.layer_norm(x, (C,), torch.linspace(0.5, 1.5, C), torch.zeros(C))[:, c0:c1]
    r2 = F.rms_norm(x, (C,), torch.linspace(1.5, 0.5, C), 1e-6)[:, c0:c1]
    return {"ln": maxdiff(y1, r1), "rms": maxdiff(y2, r2)}


def wrong_shard_case():
    """Rank 1 passes a weight that does not match its shard: every rank must raise."""
    C = 64
    widths = widths_for(C, "even")
    c0, c1 = cols(widths)
    x = torch.randn(3, C)[:, c0:c1]
    w = torch.ones(widths[RANK] + (5 if RANK == 1 else 0))
    res = {}
    try:
        pnd.layer_norm(x, w)
        res["error"] = None
    except ValueError as e:
        res["error"] = str(e)
    try:   # RMSNorm with a wrong dtype on the last rank
        pnd.rms_norm(x.to(torch.int32) if RANK == WORLD - 1 else x)
        res["error_dtype"] = None
    except ValueError as e:
        res["error_dtype"] = str(e)
    # the group is still in step: a correct call works afterwards
    y = pnd.layer_norm(x, torch.ones(widths[RANK]))
    res["after"] = bool(y.isfinite().all())
    return res


# ---- synchronized BatchNorm ------------------------------------------------------------------

def syncbn_case(momentum, channels_last, dtype=torch.float32):
    C = 5
    ns = [3 + r for r in range(WORLD)]            # uneven batch shards
    N = sum(ns)
    n0 = sum(ns[:RANK])
    g = torch.Generator().manual_seed(7)
    bn_full = torch.nn.BatchNorm2d(C, momentum=momentum, dtype=dtype)
    sbn = pnd.SyncBatchNorm(C, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        w = 1 + 0.3 * torch.randn(C, generator=g)
        b = 0.2 * torch.randn(C, generator=g)
        for m in (bn_full, sbn):
            m.weight.copy_(w)
            m.bias.copy_(b)
    res = {"steps": []}
    for step in range(3):
        x = (2 + torch.randn(N, C, 6, 7, generator=g, dtype=torch.float64)).to(dtype)
        dy = torch.randn(N, C, 6, 7, generator=g, dtype=torch.float64).to(dtype)
        xf = x.clone().requires_grad_(True)
        yf = bn_full(xf)
        yf.backward(dy)
        xs = x[n0:n0 + ns[RANK]].clone()
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        xs.requires_grad_(True)
        sbn.zero_grad()
        y, fwd = counted(lambda: sbn(xs))
        _, bwd = counted(lambda: y.backward(dy[n0:n0 + ns[RANK]]))
        # parameter gradients are local (as torch's SyncBatchNorm); DDP would sum them
        dw, db = sbn.weight.grad.clone(), sbn.bias.grad.clone()
        dist.all_reduce(dw)
        dist.all_reduce(db)
        res["steps"].append({
            "fwd_collectives": fwd, "bwd_collectives": bwd,
            "y": maxdiff(y, yf[n0:n0 + ns[RANK]]), "dx": maxdiff(xs.grad, xf.grad[n0:n0 + ns[RANK]]),
            "dw": maxdiff(dw, bn_full.weight.grad), "db": maxdiff(db, bn_full.bias.grad),
            "running_mean": maxdiff(sbn.running_mean, bn_full.running_mean),
            "running_var": maxdiff(sbn.running_var, bn_full.running_var),
            "nbt": int(sbn.num_batches_tracked) - int(bn_full.num_batches_tracked),
            "channels_last_out": bool(y.is_contiguous(memory_format=torch.channels_last)),
        })
        bn_full.weight.grad = None
        bn_full.bias.grad = None
    sbn.eval()
    bn_full.eval()
    x = torch.randn(2, C, 3, 3, generator=g).to(dtype)
    _, evc = counted(lambda: sbn(x))
    res["eval"] = maxdiff(sbn(x), bn_full(x))
    res["eval_collectives"] = evc
    return res


def convert_case():
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6), torch.nn.BatchNorm1d(6))
    ref = copy.deepcopy(model)
    w_before = model[1].weight
    conv = pnd.convert_sync_batchnorm(model)
    kinds = [type(m).__name__ for m in conv]
    ns = [2 + r for r in range(WORLD)]
    n0 = sum(ns[:RANK])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(ns), 3, 6, 6, generator=g)
    yr = ref(x)
    yr.sum().backward()
    y, fwd = counted(lambda: conv(x[n0:n0 + ns[RANK]]))
    _, bwd = counted(lambda: y.sum().backward())
    gw = conv[0].weight.grad.clone()
    dist.all_reduce(gw)
    return {"kinds": kinds, "shared_param": conv[1].weight is w_before,
            "y": maxdiff(y, yr[n0:n0 + ns[RANK]]), "conv_grad": maxdiff(gw, ref[0].weight.grad),
            "fwd_collectives": fwd, "bwd_collectives": bwd,
            "running_var": maxdiff(conv[5].running_var, ref[5].running_var)}


def main():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{PORT}", rank=RANK, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    out = {}
    try:
        cases = {}
        for op in ("layer", "rms"):
            for C, split in ((4096, "even"), (4097, "uneven")):
                cases[f"{op}_{C}_{split}_f32"] = token_case(op, C, split, torch.float32, seed=C)
            cases[f"{op}_4097_uneven_f64"] = token_case(op, 4097, "uneven", torch.float64, seed=1)
            cases[f"{op}_1000_uneven_bf16"] = token_case(op, 1000, "uneven", torch.bfloat16, seed=2)
            cases[f"{op}_4096_even_hostile"] = token_case(op, 4096, "even", torch.float32, 1e4, 1e-2, seed=3)
            cases[f"{op}_4097_uneven_hostile"] = token_case(op, 4097, "uneven", torch.float32, 1e4, 1e-2, seed=4)
        out["token"] = cases
        out["modules"] = modules_case()
        out["wrong_shard"] = wrong_shard_case()
        out["syncbn"] = {"m0.1": syncbn_case(0.1, False), "mNone_cl": syncbn_case(None, True),
                         "f64": syncbn_case(0.1, False, torch.float64)}
        out["convert"] = convert_case()
    except Exception:
        out["exception"] = traceback.format_exc()
    with open(OUT, "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
