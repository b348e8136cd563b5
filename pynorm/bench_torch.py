"""End-to-end benchmark: a transformer block's forward + backward on CPU with torch's
norms and with the same block after pynorm.torch.replace_norms.

    python -m pynorm.bench_torch [--quick] [--threads 2,1] [--repeats K] [--json OUT]

It prints the norm modules alone (module_rows: torch.nn's vs pynorm.torch's through
autograd, at the blocks' sizes; GB/s meaningful), every module at decode sizes
(decode_rows: one row of 768 to 8192 values, float32 and bfloat16, forward under
no_grad and forward + backward; with --compiled also under torch.compile), then whole
blocks (block_rows).

Two blocks, both float32 and pre-norm:
- "gpt": torch.nn.TransformerEncoderLayer(norm_first=True, GELU, batch_first) with
  its two nn.LayerNorm;
- "llama": an RMSNorm block written out below (nn.RMSNorm, causal attention through
  scaled_dot_product_attention, SwiGLU MLP).

The pynorm model is a deep copy of the torch model (same weights) with its norms
swapped; both run on the same input and output gradient, calls alternating
torch / pynorm so that noise hits both, medians reported. Rows have the format of
pynorm.bench's rows (op, label, dtype, shape, threads, baseline, baseline_ms,
pynorm_ms, speedup, bytes, pynorm_gbps, baseline_allocating_only): shape is
(rows = batch*seq, C); bytes counts only what the norms must move (5 N per norm,
N = rows * C * 4 bytes) and pynorm_gbps / pct_copy / pct_peak are NaN, since a whole block's
time is mostly matrix products and a bandwidth figure for it would mean nothing.
"""

import argparse
import copy
import json
import math
import sys

from .bench import time_pair

# (batch, seq, C): GPT-2 small's width, and a narrow block where the norms (O(C) per
# token, against O(C^2) for the matrix products) weigh more
GPT_SHAPES = [(4, 256, 768), (16, 128, 256)]
LLAMA_SHAPES = [(4, 256, 1024), (16, 128, 256)]
QUICK_GPT_SHAPES = [(2, 64, 256)]
QUICK_LLAMA_SHAPES = [(2, 64, 256)]


def _torch():
    import torch
    return torch


def make_llama_block(C, n_heads, hidden, torch):
    nn, F = torch.nn, torch.nn.functional

    class LlamaBlock(nn.Module):
        """Pre-norm block: h = x + attn(rms(x)); out = h + mlp(rms(h))."""

        def __init__(self):
            super().__init__()
            self.attn_norm = nn.RMSNorm(C, eps=1e-6)
            self.qkv = nn.Linear(C, 3 * C, bias=False)
            self.proj = nn.Linear(C, C, bias=False)
            self.mlp_norm = nn.RMSNorm(C, eps=1e-6)
            self.gate_up = nn.Linear(C, 2 * hidden, bias=False)
            self.down = nn.Linear(hidden, C, bias=False)

        def forward(self, x):
            Bs, T, _ = x.shape
            q, k, v = self.qkv(self.attn_norm(x)).split(C, dim=-1)
            q, k, v = (t.view(Bs, T, n_heads, C // n_heads).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = x + self.proj(a.transpose(1, 2).reshape(Bs, T, C))
            gate, up = self.gate_up(self.mlp_norm(h)).chunk(2, dim=-1)
            return h + self.down(F.silu(gate) * up)

    return LlamaBlock()


def make_block(kind, C, torch):
    if kind == "gpt":
        return torch.nn.TransformerEncoderLayer(C, nhead=max(1, C // 64), dim_feedforward=4 * C,
                                                dropout=0.0, activation="gelu", batch_first=True,
                                                norm_first=True)
    if kind == "llama":
        hidden = 256 * math.ceil(8 * C / 3 / 256)
        return make_llama_block(C, max(1, C // 64), hidden, torch)
    raise ValueError(kind)


BLOCKS = {
    "gpt": ("transformer_block_layernorm_fwd_bwd", "GPT block fwd+bwd (2 LayerNorm)", 2),
    "llama": ("transformer_block_rmsnorm_fwd_bwd", "Llama block fwd+bwd (2 RMSNorm)", 2),
}


def _fwd_bwd(model, x, dy):
    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x).backward(dy)
    return step


def block_case(kind, shape, seed=0):
    """(torch model, pynorm model, x, dy, swapped names) for one block."""
    torch = _torch()
    import pynorm.torch as pnt
    Bs, T, C = shape
    torch.manual_seed(seed)
    base = make_block(kind, C, torch).train()
    with torch.no_grad():               # norm parameters off their init, so they matter
        for m in base.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.1, 0.1)
    swapped = copy.deepcopy(base)
    names = pnt.replace_norms(swapped)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    return base, swapped, x, dy, names


def _row(op, label, dtype, shape, threads, times, nbytes, gbps=True, **extra):
    """One row in pynorm.bench's format; times = (torch's, pynorm's) seconds. gbps
    False: a whole block, where pynorm_gbps, pct_copy and pct_peak are NaN."""
    t_base, t_pn = times
    row = dict(op=op, label=label, dtype=dtype, shape=list(shape), threads=threads, baseline="torch",
               baseline_ms=t_base * 1e3, pynorm_ms=t_pn * 1e3, speedup=t_base / t_pn, bytes=nbytes,
               pynorm_gbps=nbytes / t_pn / 1e9 if gbps else float("nan"))
    if not gbps:
        row.update(pct_copy=float("nan"), pct_peak=float("nan"))
    row["baseline_allocating_only"] = False
    row.update(extra)
    return row


def _timed(pairs, thread_counts, warmup, repeats):
    """For each (fns, make_row) of pairs and each thread count: times the pair fns =
    (torch's step, pynorm's step) alternating, at that many threads for both
    libraries, and collects make_row(threads, times). The thread settings are
    restored after."""
    torch = _torch()
    import pynorm
    saved = (pynorm.get_num_threads(), torch.get_num_threads())
    rows = []
    try:
        for fns, make_row in pairs:
            for threads in thread_counts:
                pynorm.set_num_threads(threads)
                torch.set_num_threads(threads)
                rows.append(make_row(threads, time_pair(*fns, warmup, repeats)))
    finally:
        pynorm.set_num_threads(saved[0])
        torch.set_num_threads(saved[1])
    return rows


def _block_shapes(quick):
    return {"gpt": QUICK_GPT_SHAPES if quick else GPT_SHAPES,
            "llama": QUICK_LLAMA_SHAPES if quick else LLAMA_SHAPES}


def block_rows(thread_counts=(2, 1), quick=False, warmup=None, repeats=None, blocks=("gpt", "llama")):
    """Times each block's forward + backward with torch's norms and with pynorm's.
    Returns rows in pynorm.bench's format (pynorm_gbps, pct_copy and pct_peak NaN)."""
    warmup = (1 if quick else 3) if warmup is None else warmup
    repeats = (5 if quick else 15) if repeats is None else repeats

    def pairs():
        for kind in blocks:
            key, label, n_norms = BLOCKS[kind]
            for shape in _block_shapes(quick)[kind]:
                base, swapped, x, dy, names = block_case(kind, shape)
                assert len(names) == n_norms, names
                n = shape[0] * shape[1] * shape[2] * x.element_size()
                block = dict(kind=kind, batch=shape[0], seq=shape[1], C=shape[2], norms=[n for n, _ in names])
                yield ((_fwd_bwd(base, x, dy), _fwd_bwd(swapped, x, dy)),
                       lambda threads, times, key=key, label=label, shape=shape, n=n * 5 * n_norms, block=block:
                       _row(key, label, "float32", [shape[0] * shape[1], shape[2]], threads, times, n,
                            gbps=False, block=block))
    return _timed(pairs(), thread_counts, warmup, repeats)


MODULES = {
    "gpt": ("torch_module_layernorm_fwd_bwd", "nn.LayerNorm module fwd+bwd", "LayerNorm"),
    "llama": ("torch_module_rmsnorm_fwd_bwd", "nn.RMSNorm module fwd+bwd", "RMSNorm"),
}


def module_rows(thread_counts=(2, 1), quick=False, warmup=None, repeats=None, blocks=("gpt", "llama")):
    """The blocks' norm modules alone (torch.nn's vs pynorm.torch's, through autograd,
    parameter gradients included) at the blocks' (rows, C): where a block's difference
    comes from. bytes = 5 N (reads x, writes y; reads dy and x, writes dx), so these
    rows' GB/s are meaningful (pct_copy is left to pynorm.bench.add_copy_fraction)."""
    torch = _torch()
    import pynorm.torch as pnt
    warmup = (1 if quick else 3) if warmup is None else warmup
    repeats = (5 if quick else 15) if repeats is None else repeats

    def pairs():
        for kind in blocks:
            key, label, cls = MODULES[kind]
            for shape in _block_shapes(quick)[kind]:
                rows_, C = shape[0] * shape[1], shape[2]
                torch.manual_seed(1)
                base = getattr(torch.nn, cls)(C)
                with torch.no_grad():
                    base.weight.uniform_(0.5, 1.5)
                twin = getattr(pnt, cls)(C)
                twin.load_state_dict(base.state_dict())
                x = torch.randn(rows_, C, requires_grad=True)
                dy = torch.randn(rows_, C)
                nbytes = 5 * x.numel() * x.element_size()
                yield ((_fwd_bwd(base, x, dy), _fwd_bwd(twin, x, dy)),
                       lambda threads, times, key=key, label=label, shape=(rows_, C), nbytes=nbytes:
                       _row(key, label, "float32", shape, threads, times, nbytes))
    return _timed(pairs(), thread_counts, warmup, repeats)


# ---- small ("decode") sizes: every module, float32 and bfloat16, no_grad and fwd+bwd ----------
# At one row of a few thousand values a norm's kernel takes microseconds and the Python
# and torch calls around it are most of the time: these rows measure that overhead.

DECODE_SIZES = (768, 4096, 8192)
QUICK_DECODE_SIZES = (768,)
DECODE_DTYPES = ("float32", "bfloat16")
DECODE_MODULES = ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm2d", "BatchNorm2d")
DECODE_MODES = ("fwd_nograd", "fwd_bwd")
DECODE_KEYS = [f"torch_module_{m.lower()}_decode_{mode}" for m in DECODE_MODULES for mode in DECODE_MODES]


def decode_case(module, size, dtype, mode, compile=False):
    """(torch.nn module, pynorm.torch twin, input) holding `size` values: (1, size) for
    the token norms, (1, size // 64, 8, 8) for the spatial ones (GroupNorm: 4 groups).
    BatchNorm2d runs in eval for fwd_nograd (inference), in training for fwd_bwd."""
    torch = _torch()
    import pynorm.torch as pnt
    torch.manual_seed(1)
    if module in ("LayerNorm", "RMSNorm"):
        args, shape = (size,), (1, size)
    else:
        C = size // 64
        args = {"GroupNorm": (4, C), "InstanceNorm2d": (C,), "BatchNorm2d": (C,)}[module]
        shape = (1, C, 8, 8)
    kwargs = {"affine": True} if module == "InstanceNorm2d" else {}
    base = getattr(torch.nn, module)(*args, **kwargs)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
    twin = getattr(pnt, module)(*args, **kwargs)
    dt = getattr(torch, dtype)
    base, twin = base.to(dt), twin.to(dt)
    twin.load_state_dict(base.state_dict())
    train = mode == "fwd_bwd"
    base.train(train)
    twin.train(train)
    if compile:
        # every row compiles fresh modules of the same classes: without a reset Dynamo's
        # recompile limit stops fullgraph compilation after a few rows
        torch._dynamo.reset()
        base = torch.compile(base, fullgraph=True)
        twin = torch.compile(twin, fullgraph=True)
    x = torch.randn(shape, dtype=dt).requires_grad_(train)
    return base, twin, x


def _nograd(model, x):
    torch = _torch()

    def step():
        with torch.no_grad():
            model(x)
    return step


def decode_rows(thread_counts=(2, 1), quick=False, warmup=None, repeats=None,
                modules=DECODE_MODULES, compile=False):
    """Every pynorm.torch module against its torch.nn twin at decode sizes, float32 and
    bfloat16, forward under no_grad and forward + backward (compile: both modules
    through torch.compile(fullgraph=True); slow to build, not in the default suite).
    Only at the smallest of thread_counts: one row of a few thousand values runs on one
    thread either way, and more threads only add torch's thread-pool hand-offs (on a
    busy 2-core machine torch's 2-thread backward took milliseconds here)."""
    torch = _torch()
    warmup = (2 if quick else 5) if warmup is None else warmup
    # a call takes microseconds: many repeats cost little and steady the medians
    repeats = (20 if quick else 60) if repeats is None else 4 * repeats

    def pairs():
        for module in modules:
            for mode in DECODE_MODES:
                key = f"torch_module_{module.lower()}{'_compiled' if compile else ''}_decode_{mode}"
                label = (f"nn.{module} {'compiled ' if compile else ''}"
                         f"{'fwd no_grad' if mode == 'fwd_nograd' else 'fwd+bwd'}")
                for dtype in DECODE_DTYPES:
                    for size in (QUICK_DECODE_SIZES if quick else DECODE_SIZES):
                        base, twin, x = decode_case(module, size, dtype, mode, compile)
                        if mode == "fwd_nograd":
                            fns = _nograd(base, x), _nograd(twin, x)
                        else:
                            dy = torch.randn(x.shape, dtype=x.dtype)
                            fns = _fwd_bwd(base, x, dy), _fwd_bwd(twin, x, dy)
                        nbytes = (2 if mode == "fwd_nograd" else 5) * x.numel() * x.element_size()
                        yield fns, (lambda threads, times, key=key, label=label, dtype=dtype, shape=x.shape,
                                    nbytes=nbytes: _row(key, label, dtype, shape, threads, times, nbytes))
    return _timed(pairs(), [min(thread_counts)], warmup, repeats)


NOTE = ("Transformer block rows: forward + backward of a whole block (matrix products, "
        "attention, norms), torch's norms vs the same block after pynorm.torch.replace_norms "
        "(same weights and data, calls alternating); GB/s and % copy do not apply (nan). "
        "Decode rows (fwd no_grad, fwd+bwd): each torch.nn module against its pynorm.torch "
        "twin on one row of 768-8192 values (spatial norms: (1, C, 8, 8)), at one thread; "
        "there the Python and torch calls around a kernel are most of the time.")


def prepare_extension():
    """Builds (when missing) and loads pynorm.torch's C++ extension before the rows,
    saying so on stderr; the rows then measure the path a user gets after
    `python -m pynorm.torch.build`. PYNORM_TORCH_EXT=0: the Python path."""
    import pynorm.torch as pnt
    from pynorm.torch import _ext
    if not _ext.enabled():
        print("pynorm.torch: PYNORM_TORCH_EXT=0: the rows measure the Python path", file=sys.stderr)
        return False
    loaded = pnt.build_extension() is not None
    print("pynorm.torch: " + ("the rows use the C++ extension" if loaded
                              else "no C++ extension: the rows measure the Python path"), file=sys.stderr)
    return loaded


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pynorm.bench_torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", default="2,1")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", metavar="OUT.json")
    p.add_argument("--compiled", action="store_true",
                   help="also the decode rows with both modules under torch.compile(fullgraph=True)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    import pynorm
    from pynorm.bench import Progress, add_copy_fraction, format_table, measure_copy_bandwidth
    prepare_extension()
    rows = module_rows(threads, quick=args.quick, repeats=args.repeats)
    rows += decode_rows(threads, quick=args.quick, repeats=args.repeats)
    if args.compiled:
        rows += decode_rows(threads, quick=args.quick, repeats=args.repeats, compile=True)
    saved = pynorm.get_num_threads()
    progress = Progress()
    try:
        add_copy_fraction(rows, measure_copy_bandwidth(threads, None, progress))
    finally:
        progress.clear()
        pynorm.set_num_threads(saved)
    rows += block_rows(threads, quick=args.quick, repeats=args.repeats)
    print(format_table(rows, "torch"))
    print()
    print(NOTE)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, notes=[NOTE]), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
