"""`python -m pynorm`: the self-check passes and the benchmark writes sane rows.

The command runs in a subprocess on the pynorm this test process imports
(its parent directory goes first on PYTHONPATH), from a scratch directory.
"""

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import pynorm
from pynorm.bench import CALL_CASES, CALL_NOTE, OPS
from pynorm.bench_spatial import LAYOUTS as SPATIAL_LAYOUTS
from pynorm.bench_spatial import OPS as SPATIAL_OPS

TOKEN_KEYS = {op.key for op in OPS}
SPATIAL_KEYS = {f"{key}_{layout.lower()}" for key, *_ in SPATIAL_OPS for layout in SPATIAL_LAYOUTS}
TORCH_KEYS = {"torch_module_layernorm_fwd_bwd", "torch_module_rmsnorm_fwd_bwd",
              "transformer_block_layernorm_fwd_bwd", "transformer_block_rmsnorm_fwd_bwd"} | {
    f"torch_module_{m}_decode_{mode}" for m in ("layernorm", "rmsnorm", "groupnorm", "instancenorm2d",
                                                "batchnorm2d") for mode in ("fwd_nograd", "fwd_bwd")}

PYNORM_PARENT = str(Path(pynorm.__file__).resolve().parent.parent)
GLIBC = platform.libc_ver()[0] == "glibc"   # --torch-malloc pins thresholds only there


def run_main(args, cwd, extra_path=(), timeout=300):
    env = dict(os.environ)
    path = list(extra_path) + [PYNORM_PARENT]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run([sys.executable, "-m", "pynorm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main")
    out = tmp / "bench.json"
    proc = run_main(["--quick", "--json", str(out)], cwd=tmp)
    return proc, out


def test_exit_code_and_self_check(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    checks = [ln for ln in lines if ln.startswith(("PASS", "FAIL"))]
    assert checks, proc.stdout
    assert all(ln.startswith("PASS") for ln in checks), "\n".join(checks)
    assert "self-check passed" in proc.stdout
    # every checked op appears in the self-check
    for name in ("layer_norm ", "rms_norm ", "add_layer_norm", "add_rms_norm",
                 "layer_norm fwd+bwd", "rms_norm fwd+bwd", "layer_norm out=", "rms_norm out="):
        assert any(name in ln for ln in checks), name


def test_table_on_stdout(quick_run):
    proc, _ = quick_run
    assert "speedup" in proc.stdout and "% copy" in proc.stdout
    for op in OPS:
        assert op.label in proc.stdout, op.label
    for _, label, *_ in SPATIAL_OPS:
        assert label in proc.stdout, label


def test_json_rows(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    rows = data["rows"]
    expected = TOKEN_KEYS | SPATIAL_KEYS
    if importlib.util.find_spec("torch") is not None:
        expected |= TORCH_KEYS
    assert {r["op"] for r in rows} == expected
    assert {r["threads"] for r in rows} == {1, 2}
    assert {"float32", "bfloat16", "float16"} <= {r["dtype"] for r in rows}
    for r in rows:
        assert r["baseline_ms"] > 0 and r["pynorm_ms"] > 0, r
        assert r["speedup"] > 0, r
        if not r["op"].startswith("transformer_block"):   # a whole block has no bandwidth figure
            assert r["pynorm_gbps"] > 0 and r["pct_copy"] > 0, r
    call_cases = {(dtype.name, tuple(shape)) for dtype, shape in CALL_CASES}
    call = [r for r in rows if (r["dtype"], tuple(r["shape"])) in call_cases]
    assert {(r["dtype"], tuple(r["shape"]), r["op"], r["threads"]) for r in call} == \
        {(*case, op, n) for case in call_cases for op in ("layer_norm", "layer_norm_out") for n in (1, 2)}, \
        "the per-call rows (each small layer_norm call, allocating and out=) at each thread count"
    assert all(r["copy_gbps"] is None for r in call)
    assert CALL_NOTE in proc.stdout
    info = data["machine"]
    assert info["isa"] in ("avx512", "avx2", "generic")
    assert info["cpu_model"]
    assert all(bw > 0 for bw in info["copy_bandwidth_gbps"].values())
    assert set(info["copy_bandwidth_gbps"]) == {"1", "2"}
    assert info["torch_malloc"] == ("steady" if GLIBC else "as-is")
    assert data["selfcheck"] and all(c["ok"] for c in data["selfcheck"])


def test_numpy_baseline(tmp_path):
    out = tmp_path / "np.json"
    proc = run_main(["--quick", "--baseline", "numpy", "--threads", "1", "--repeats", "1",
                     "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numpy ms" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == TOKEN_KEYS | SPATIAL_KEYS   # the torch suite needs torch
    assert all(r["baseline"] == "numpy" and r["baseline_ms"] > 0 for r in rows)


def test_suites_argument(tmp_path):
    out = tmp_path / "s.json"
    proc = run_main(["--quick", "--suites", "spatial", "--threads", "1", "--repeats", "1",
                     "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["op"] for r in json.loads(out.read_text())["rows"]} == SPATIAL_KEYS
    proc = run_main(["--suites", "token,bogus"], cwd=tmp_path)
    assert proc.returncode != 0 and "--suites" in proc.stderr and "bogus" in proc.stderr


def test_torch_malloc_argument(tmp_path):
    out = tmp_path / "m.json"
    proc = run_main(["--quick", "--suites", "spatial", "--threads", "1", "--repeats", "1",
                     "--torch-malloc", "no-faults", "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mode = json.loads(out.read_text())["machine"]["torch_malloc"]
    assert mode == ("no-faults" if GLIBC else "as-is")
    assert f"malloc {mode}" in proc.stdout
    proc = run_main(["--torch-malloc", "sometimes"], cwd=tmp_path, timeout=60)
    assert proc.returncode != 0 and "--torch-malloc" in proc.stderr and "sometimes" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib not installed")
def test_plot(tmp_path):
    png = tmp_path / "speedups.png"
    proc = run_main(["--quick", "--threads", "1", "--repeats", "1", "--plot", str(png)],
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path):
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    proc = run_main(["--quick", "--plot", str(tmp_path / "x.png")], cwd=tmp_path,
                    extra_path=[str(fake)], timeout=60)
    assert proc.returncode != 0
    assert "pip install matplotlib" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_bad_threads_argument(tmp_path):
    proc = run_main(["--threads", "0"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "--threads" in proc.stderr


@pytest.mark.parametrize("value", ["8,64,16", "8,64,16,0", "8,64,a,16"])
def test_bad_spatial_shapes_argument(value, tmp_path):
    """python -m pynorm.bench_spatial --shapes: a usage error naming the value, before any work."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PYNORM_PARENT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pynorm.bench_spatial", "--shapes", value], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--shapes" in proc.stderr and value in proc.stderr, proc.stderr


def test_copy_fractions():
    """% copy is against the probe next to the row, % peak against the run's highest probe."""
    from pynorm.bench import add_copy_fraction, peak_copy_bandwidth
    rows = [dict(threads=2, pynorm_gbps=30.0, copy_gbps=40.0), dict(threads=2, pynorm_gbps=30.0, copy_gbps=None),
            dict(threads=1, pynorm_gbps=20.0, copy_gbps=25.0)]
    peak = peak_copy_bandwidth(rows, {2: 50.0, 1: 20.0}, {2: 45.0, 1: 22.0})
    assert peak == {2: 50.0, 1: 25.0}
    add_copy_fraction(rows, peak)
    assert [round(r["pct_copy"]) for r in rows] == [75, 60, 80]
    assert [round(r["pct_peak"]) for r in rows] == [60, 60, 80]


@pytest.mark.parametrize("llm", ["few", "all", "none"])
def test_llm_rows(llm):
    """--llm picks the bf16/f16 rows at LLM hidden sizes: a few by default, the whole
    grid (every hidden size, dtype and op) with all, none with none; the rows of
    the rest of the token suite stay as they are."""
    from pynorm.bench import LLM_DEFAULT, LLM_HIDDEN, LLM_OPS, LLM_TOKENS, benchmark_cases
    cases = benchmark_cases(False, llm)
    got = {(op.key, dtype.name, shape) for op, dtype, shape in cases if shape[0] == LLM_TOKENS
           and shape[1] in LLM_HIDDEN and dtype.name in ("bfloat16", "float16")}
    grid = {(key, dtype, (LLM_TOKENS, hidden)) for key in LLM_OPS for dtype in ("bfloat16", "float16")
            for hidden in LLM_HIDDEN}
    few = {(key, dtype.name, (LLM_TOKENS, hidden)) for dtype, hidden, key in LLM_DEFAULT}
    half_rows = {("layer_norm", dtype, (4096, 4096)) for dtype in ("bfloat16", "float16")}
    expected = {"all": grid, "few": few | half_rows, "none": half_rows}[llm]
    assert got == expected, f"--llm {llm}: rows {sorted(got ^ expected)} differ"
    assert len(cases) == len(set(cases)), "no row twice"
    assert len(benchmark_cases(False, "none")) + len(expected - half_rows) == len(cases)


def test_copy_bandwidth_positive():
    assert pynorm.copy_bandwidth(nbytes=1 << 22, repeats=2) > 0
