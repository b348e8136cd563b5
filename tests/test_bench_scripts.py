"""The developer benchmarks in bench/ (not installed with the package) run and
print their tables: bench/compare_builds.py (two builds side by side) and
bench/ceiling.py (the forwards next to a bare multiply). Tiny shapes: this
checks that they work, not how fast anything is."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pynorm
from pynorm._lib import library_path

BENCH = Path(__file__).resolve().parent.parent / "bench"
PYNORM_PARENT = str(Path(pynorm.__file__).resolve().parent.parent)

pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="bench/ is not in this tree")


def run_script(name, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PYNORM_PARENT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(BENCH / name), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def table_rows(stdout, first_word):
    return [line.split() for line in stdout.splitlines() if line.split()[:1] == [first_word]]


@pytest.mark.parametrize("after_torch", [False, True], ids=["plain", "after_torch"])
def test_compare_builds_prints_a_row_per_case(after_torch):
    if after_torch:
        pytest.importorskip("torch")
    p = run_script("compare_builds.py", library_path, library_path, "--shapes", "64x128", "--threads", "1",
                   "--dtypes", "float32,bfloat16", "--repeats", "3", *(["--after-torch"] if after_torch else []))
    assert p.returncode == 0, p.stderr
    rows = [r for op in ("LayerNorm", "RMSNorm") for r in table_rows(p.stdout, op)]
    assert len(rows) == 8, p.stdout   # 2 ops x fwd/bwd x 2 dtypes
    for r in rows:
        assert re.fullmatch(r"\d+\.\d\dx", r[-1]), f"new/old column: {r}"
        assert float(r[-3]) > 0 and float(r[-2]) > 0, f"GB/s columns: {r}"


def test_compare_builds_spatial_prints_a_row_per_case():
    p = run_script("compare_builds.py", library_path, library_path, "--suite", "spatial", "--shapes", "2x8x100x4",
                   "--threads", "1", "--dtypes", "float32,float64", "--repeats", "3")
    assert p.returncode == 0, p.stderr
    rows = [r for op in ("GN", "BN") for r in table_rows(p.stdout, op)]
    # (GN, BN training) x 2 layouts x fwd/bwd x 2 dtypes, and BN eval fwd x 2 layouts x 2 dtypes
    assert len(rows) == 20, p.stdout
    assert sum(r[1] == "eval" for r in rows) == 4, p.stdout
    for r in rows:
        assert re.fullmatch(r"\d+\.\d\dx", r[-1]), f"new/old column: {r}"
        assert float(r[-3]) > 0 and float(r[-2]) > 0, f"GB/s columns: {r}"


def test_compare_builds_only_keeps_the_rows_it_names():
    p = run_script("compare_builds.py", library_path, library_path, "--suite", "spatial", "--shapes", "2x8x100x4",
                   "--threads", "1", "--dtypes", "float32", "--repeats", "3", "--only", "BN eval")
    assert p.returncode == 0, p.stderr
    rows = [r for op in ("GN", "BN") for r in table_rows(p.stdout, op)]
    assert [r[:3] for r in rows] == [["BN", "eval", "NCHW"], ["BN", "eval", "NHWC"]], p.stdout


def test_ceiling_prints_a_row_per_case():
    pytest.importorskip("torch")
    p = run_script("ceiling.py", "--shapes", "64x128,32x256", "--threads", "1", "--repeats", "3", "--warmup", "1")
    assert p.returncode == 0, p.stderr
    rows = table_rows(p.stdout, "layer_norm") + table_rows(p.stdout, "rms_norm")
    assert len(rows) == 4, p.stdout   # 2 ops x 2 shapes
    for r in rows:
        torch_ms, pynorm_ms, bound_ms = map(float, r[3:6])
        assert min(torch_ms, pynorm_ms, bound_ms) > 0, r
        speedup, bound_speedup = float(r[6].rstrip("x")), float(r[7].rstrip("x"))
        assert within_rounding(speedup, torch_ms, pynorm_ms), f"speedup is not torch ms / pynorm ms: {r}"
        assert within_rounding(bound_speedup, torch_ms, bound_ms), f"bound speedup is not torch ms / bound ms: {r}"


def within_rounding(ratio, num, den):
    """ratio (printed to 0.01) = num / den (printed to 0.001) up to the printing's rounding."""
    h = 5e-4
    return (num - h) / (den + h) - 5e-3 <= ratio <= (num + h) / max(den - h, 1e-9) + 5e-3


def test_ceiling_rejects_a_bad_shape():
    pytest.importorskip("torch")
    p = run_script("ceiling.py", "--shapes", "64by128")
    assert p.returncode == 2 and "--shapes" in p.stderr and "64by128" in p.stderr, p.stderr


@pytest.mark.parametrize("args, named", [
    (["--shapes", "64x0"], "64x0"),
    (["--suite", "spatial", "--shapes", "2x8x100"], "2x8x100"),
    (["--suite", "spatial", "--shapes", "2x9x100x4"], "G must divide C"),
    (["--dtypes", "float8"], "float8"),
    (["--suite", "spatial", "--after-torch"], "--after-torch"),
], ids=["zero", "spatial_3_sizes", "groups_not_dividing", "dtype", "after_torch_spatial"])
def test_compare_builds_rejects_bad_arguments(args, named):
    p = run_script("compare_builds.py", library_path, library_path, *args)
    assert p.returncode == 2 and named in p.stderr, p.stderr
