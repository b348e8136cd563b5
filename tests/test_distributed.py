"""pynorm.distributed on real process groups: 2 and 3 processes on this machine
(gloo over 127.0.0.1), each running tests/dist_worker.py.

Checked against the single-process results (pynorm.torch and torch on the full
tensors) and a float64 reference: tensor-parallel LayerNorm and RMSNorm with C =
4096 split evenly and C = 4097 split unevenly, forward and backward, float32,
float64 and bfloat16, hostile rows (mean 1e4, std 1e-2); exactly one collective
per pass (counted by wrapping torch.distributed's functions); a rank passing a
wrong shard makes every rank raise (no hang: every process runs under a
timeout); SyncBatchNorm against BatchNorm on the whole batch in one process
(torch's own SyncBatchNorm refuses CPU tensors), running statistics over three
steps, momentum=None, channels_last; convert_sync_batchnorm.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
TIMEOUT = 150   # seconds for a whole group; a hang fails the test instead of CI


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(world, tmp_path):
    port = _free_port()
    # the same pynorm as this process (the installed package), one thread per rank
    import pynorm
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(pynorm.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    outs = [str(tmp_path / f"rank{r}.json") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port), outs[r]],
                              cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world}-process group did not finish within {TIMEOUT} s (hang?)")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r][-4000:]}"
    results = []
    for r in range(world):
        with open(outs[r]) as f:
            res = json.load(f)
        assert "exception" not in res, f"rank {r} raised:\n{res['exception']}"
        results.append(res)
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def group_results(request, tmp_path_factory):
    return request.param, _run_group(request.param, tmp_path_factory.mktemp(f"dist{request.param}"))


ONE = {"all_reduce": 1}

# tolerances on max abs error, relative to the output's scale (ulps of the dtype)
ULP = {"torch.float32": 1.2e-7, "torch.float64": 2.2e-16, "torch.bfloat16": 7.8e-3}


def test_token_norms_one_collective_per_pass(group_results):
    world, results = group_results
    for r, res in enumerate(results):
        for name, c in res["token"].items():
            assert c["fwd_collectives"] == ONE, f"rank {r} {name}: forward collectives {c['fwd_collectives']}"
            assert c["bwd_collectives"] == ONE, f"rank {r} {name}: backward collectives {c['bwd_collectives']}"
            assert sum(c["widths"]) in (4096, 4097, 1000) and len(c["widths"]) == world


def test_token_norms_match_single_process(group_results):
    """Outputs and gradients of each shard against single-process pynorm and torch,
    and the accuracy rule against the float64 reference: within 2x the single-process
    pynorm's error plus a few ulps of the output scale."""
    world, results = group_results
    for r, res in enumerate(results):
        for name, c in res["token"].items():
            ulp = ULP[c["dtype"]]
            hostile = "hostile" in name
            for g in ("y", "dx", "dw", "db"):
                if f"{g}_vs_ref" not in c:
                    continue
                scale = max(c[f"{g}_scale"], 1.0)
                slack = (8 if g in ("y", "dx") else 64) * ulp * scale
                err, single = c[f"{g}_vs_ref"], c[f"{g}_single_vs_ref"]
                assert err <= 2 * single + slack, (
                    f"rank {r} {name} {g}: error {err:.3g} vs float64 reference; single-process pynorm "
                    f"{single:.3g}, slack {slack:.3g}")
                if not hostile and c["dtype"] != "torch.bfloat16":
                    # ordinary rows: the same numbers as one process, to a few ulps
                    assert c[f"{g}_vs_pynorm"] <= slack + 2 * single, (
                        f"rank {r} {name} {g}: differs from single-process pynorm by {c[f'{g}_vs_pynorm']:.3g}")
                    assert c[f"{g}_vs_torch"] <= slack + 2 * c[f"{g}_torch_vs_ref"] + 2 * single, (
                        f"rank {r} {name} {g}: differs from torch by {c[f'{g}_vs_torch']:.3g}")


def test_hostile_rows_accuracy(group_results):
    """mean 1e4, std 1e-2, float32: the sharded LayerNorm keeps full float32 accuracy
    (y error ~ 1e-6 on outputs of size ~3); torch's float32 loses about 3%."""
    world, results = group_results
    for r, res in enumerate(results):
        for name in ("layer_4096_even_hostile", "layer_4097_uneven_hostile",
                     "rms_4096_even_hostile", "rms_4097_uneven_hostile"):
            c = res["token"][name]
            assert c["y_vs_ref"] <= 1e-5, f"rank {r} {name}: y error {c['y_vs_ref']:.3g}"
            if name.startswith("layer"):
                assert c["y_vs_ref"] * 10 <= c["y_torch_vs_ref"], (
                    f"rank {r} {name}: not 10x more accurate than torch ({c['y_vs_ref']:.3g} vs "
                    f"{c['y_torch_vs_ref']:.3g})")
                assert c["dx_vs_ref"] <= 1e-3 * max(c["dx_scale"], 1.0), f"rank {r} {name}: dx {c['dx_vs_ref']:.3g}"


def test_modules(group_results):
    _, results = group_results
    for r, res in enumerate(results):
        assert res["modules"]["ln"] <= 1e-5 and res["modules"]["rms"] <= 1e-5, f"rank {r}: {res['modules']}"


def test_wrong_shard_raises_on_every_rank(group_results):
    world, results = group_results
    for r, res in enumerate(results):
        e = res["wrong_shard"]["error"]
        assert e is not None and "rank 1" in e and "weight_shard has" in e, f"rank {r}: {e!r}"
        e = res["wrong_shard"]["error_dtype"]
        assert e is not None and f"rank {world - 1}" in e and "dtype" in e, f"rank {r}: {e!r}"
        assert res["wrong_shard"]["after"], f"rank {r}: the group is out of step after the errors"
    # every rank raised the same message
    assert len({res["wrong_shard"]["error"] for res in results}) == 1


def test_sync_batchnorm_matches_full_batch(group_results):
    _, results = group_results
    for r, res in enumerate(results):
        for name, case in res["syncbn"].items():
            tol = 1e-12 if name == "f64" else 2e-5
            for i, s in enumerate(case["steps"]):
                where = f"rank {r} {name} step {i}"
                assert s["fwd_collectives"] == ONE and s["bwd_collectives"] == ONE, (
                    f"{where}: collectives {s['fwd_collectives']} / {s['bwd_collectives']}")
                for k in ("y", "dx", "dw", "db", "running_mean", "running_var"):
                    assert s[k] <= tol * (50 if k in ("dw", "db") else 1), f"{where}: {k} differs by {s[k]:.3g}"
                assert s["nbt"] == 0
                if name.endswith("_cl"):
                    assert s["channels_last_out"], f"{where}: channels_last input gave another layout"
            assert case["eval"] <= tol and case["eval_collectives"] == {}, f"rank {r} {name}: eval"


def test_convert_sync_batchnorm(group_results):
    _, results = group_results
    for r, res in enumerate(results):
        c = res["convert"]
        assert c["kinds"] == ["Conv2d", "SyncBatchNorm", "ReLU", "Flatten", "Linear", "SyncBatchNorm"]
        assert c["shared_param"], "the converted layer does not reuse the BatchNorm's parameters"
        assert c["y"] <= 2e-5 and c["conv_grad"] <= 1e-4 and c["running_var"] <= 1e-5, f"rank {r}: {c}"
        assert c["fwd_collectives"] == {"all_reduce": 2} and c["bwd_collectives"] == {"all_reduce": 2}, (
            f"rank {r}: two SyncBatchNorm layers: {c['fwd_collectives']} / {c['bwd_collectives']}")


def test_bytes_per_row():
    import pynorm.distributed as pnd
    b = pnd.bytes_per_row("layer_norm", 4)
    assert b["pynorm"]["forward"] == (64, 1) and b["usual"]["forward"] == (8, 2)
    assert pnd.bytes_per_row("rms_norm", 2)["pynorm"]["backward"] == (8, 1)
    assert pnd.shard_bounds(4097, 3, 0) == (0, 1366) and pnd.shard_bounds(4097, 3, 2) == (2732, 4097)


def test_import_pynorm_does_not_import_torch(pynorm_env, tmp_path):
    code = "import sys, pynorm; assert 'torch' not in sys.modules and 'pynorm.distributed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env=pynorm_env, timeout=60)


def test_not_initialized_raises():
    import pynorm.distributed as pnd
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        pnd.layer_norm(torch.randn(2, 8))
