"""Tensor-parallel LayerNorm/RMSNorm and SyncBatchNorm with pynorm.distributed.

    torchrun --nproc-per-node 2 examples/distributed_layernorm.py          # CPU, gloo

Each rank holds a slice of the hidden dimension C (uneven slices are fine) and
normalizes it with the statistics of the whole row: one all_reduce in the
forward, one in the backward. The script checks its slice against the
unsharded torch result and prints the collectives it counted. With GPUs, the
same code runs on NCCL: init_process_group("nccl") and tensors on
torch.device("cuda", local_rank) (across machines: torchrun --nnodes N
--rdzv-endpoint HOST:PORT ...).
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pynorm.distributed as pnd


def main():
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("PYNORM_EXAMPLE_CUDA") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")

    calls = {"all_reduce": 0}
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls["all_reduce"] += 1
        return all_reduce(*args, **kwargs)
    dist.all_reduce = counted

    C = 4097                                           # does not divide evenly
    start, stop = pnd.shard_bounds(C, world, rank)     # this rank's columns
    g = torch.Generator().manual_seed(0)               # the same full tensors on every rank
    x = (1e4 + 1e-2 * torch.randn(8, 16, C, generator=g)).to(device)   # hostile rows
    w = torch.randn(C, generator=g).to(device)

    ln = pnd.LayerNorm(stop - start, group=None).to(device)
    with torch.no_grad():
        ln.weight.copy_(w[start:stop])
    x_shard = x[..., start:stop].clone().requires_grad_(True)

    calls["all_reduce"] = 0
    y = ln(x_shard)
    fwd = calls["all_reduce"]
    y.square().sum().backward()
    bwd = calls["all_reduce"] - fwd

    ref = F.layer_norm(x.double(), (C,), w.double(), torch.zeros(C, dtype=torch.float64, device=device))
    err = (y.double() - ref[..., start:stop]).abs().max().item()
    err_torch = (F.layer_norm(x, (C,), w)[..., start:stop].double() - ref[..., start:stop]).abs().max().item()
    print(f"rank {rank}/{world}: columns [{start}, {stop}) of {C}; all_reduce calls: forward {fwd}, "
          f"backward {bwd}; max error vs float64: pynorm {err:.2e}, torch float32 {err_torch:.2e}")

    # data parallel: SyncBatchNorm statistics over every rank's batch
    model = pnd.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))).to(device)
    out = model(torch.randn(4, 3, 16, 16, generator=g).to(device))
    out.mean().backward()
    if rank == 0:
        print(f"SyncBatchNorm running_mean[:3] = {model[1].running_mean[:3].tolist()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
