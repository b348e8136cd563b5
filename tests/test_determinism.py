"""Determinism: the same inputs give the same bits on every call, for every
thread count (pynorm.set_num_threads) and for every instruction set the library
can run with (PYNORM_ISA=generic / avx2 versus the default), NaN payloads aside.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pynorm
from conftest import DEFAULT_ISA, DTYPES, F32, assert_bitwise_equal, dname, seed_for

# The computation shared by the in-process run and the subprocess runs: every
# op on a set of inputs, results in a dict. Kept as source text so that the
# subprocess runs exactly the same code.
COMPUTE_SRC = textwrap.dedent('''
    import numpy as np
    import ml_dtypes
    import pynorm

    BF16 = np.dtype(ml_dtypes.bfloat16)

    def compute(inp):
        """inp: dict with keys 'x:<tag>', 'r:<tag>', 'dy:<tag>', 'w:<tag>', 'b:<tag>'."""
        out = {}
        for key in sorted(k for k in inp if k.startswith("x:")):
            tag = key[2:]
            x, r, dy, w, b = (inp[p + ":" + tag] for p in ("x", "r", "dy", "w", "b"))
            y, mean, rstd = pynorm.layer_norm_forward(x, w, b)
            out.update({"ln.y:" + tag: y, "ln.mean:" + tag: mean, "ln.rstd:" + tag: rstd})
            dx, dw, db = pynorm.layer_norm_backward(dy, x, mean, rstd, w)
            out.update({"ln.dx:" + tag: dx, "ln.dw:" + tag: dw, "ln.db:" + tag: db})
            dx, dw, db = pynorm.layer_norm_backward(dy, x, mean, rstd, None)
            out.update({"ln0.dx:" + tag: dx, "ln0.dw:" + tag: dw, "ln0.db:" + tag: db})
            out["ln0.y:" + tag] = pynorm.layer_norm(x)
            y, rstd = pynorm.rms_norm_forward(x, w)
            out.update({"rms.y:" + tag: y, "rms.rstd:" + tag: rstd})
            dx, dw = pynorm.rms_norm_backward(dy, x, rstd, w)
            out.update({"rms.dx:" + tag: dx, "rms.dw:" + tag: dw})
            out["rms0.y:" + tag] = pynorm.rms_norm(x)
            y, h = pynorm.add_layer_norm(x, r, w, b)
            out.update({"addln.y:" + tag: y, "addln.h:" + tag: h})
            y, h = pynorm.add_rms_norm(x, r, w)
            out.update({"addrms.y:" + tag: y, "addrms.h:" + tag: h})
        return out

    def save(path, d):
        enc = {}
        for k, a in d.items():
            a = np.asarray(a)
            enc[k + ("@bf16" if a.dtype == BF16 else "")] = a.view(np.uint16) if a.dtype == BF16 else a
        np.savez(path, **enc)

    def load(path):
        with np.load(path) as f:
            return {(k[:-5] if k.endswith("@bf16") else k): (f[k].view(BF16) if k.endswith("@bf16") else f[k])
                    for k in f.files}

    if __name__ == "__main__":
        import sys
        res = compute(load(sys.argv[1]))
        res["__isa__"] = np.array(pynorm.isa())
        save(sys.argv[2], res)
''')

_ns = {}
exec(compile(COMPUTE_SRC, "<determinism-compute>", "exec"), _ns)
compute, save, load = _ns["compute"], _ns["save"], _ns["load"]


def make_inputs(dtypes=DTYPES, Cs=(1, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 768, 1000, 4097),
                rows=5, extra=True):
    """Inputs covering SIMD widths and tails, plus (extra=True) many-row
    backward reductions, hostile rows and NaN/Inf rows."""
    inp = {}

    def put(tag, x, dtype, rng):
        C = x.shape[-1]
        inp["x:" + tag] = x.astype(dtype)
        inp["r:" + tag] = rng.standard_normal(x.shape).astype(dtype)
        inp["dy:" + tag] = rng.standard_normal(x.shape).astype(dtype)
        inp["w:" + tag] = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
        inp["b:" + tag] = rng.standard_normal(C).astype(dtype)

    for dtype in dtypes:
        for C in Cs:
            rng = np.random.default_rng(seed_for("det", dname(dtype), C))
            put(f"{dname(dtype)}_C{C}", 0.5 + 2 * rng.standard_normal((rows, C)), dtype, rng)
        if extra:
            rng = np.random.default_rng(seed_for("det-many", dname(dtype)))
            put(f"{dname(dtype)}_many", rng.standard_normal((1000, 768)), dtype, rng)
            rng = np.random.default_rng(seed_for("det-hostile", dname(dtype)))
            put(f"{dname(dtype)}_hostile", 1e4 + 1e-2 * rng.standard_normal((7, 4096)), dtype, rng)
            x = rng.standard_normal((6, 130))
            x[1, 3], x[3, 0], x[4, 129] = np.nan, np.inf, -np.inf
            put(f"{dname(dtype)}_nan", x, dtype, rng)
    return inp


def assert_same_results(got, exp, what):
    assert sorted(got) == sorted(exp), f"{what}: different result keys"
    for k in sorted(exp):
        assert_bitwise_equal(got[k], exp[k], f"{what}: {k}")


# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_repeated_calls_bit_identical(dtype):
    inp = make_inputs([dtype], Cs=(7, 768, 4097), extra=True)
    first = compute(inp)
    second = compute(inp)
    compute(make_inputs([dtype], Cs=(33,), extra=False))  # something else in between
    third = compute(inp)
    assert_same_results(second, first, "second call")
    assert_same_results(third, first, "third call")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_thread_counts_bit_identical(dtype):
    """1, 2 and 3 threads (the machine may have fewer cores) give the same bits,
    dweight/dbias over 1000 x 768 rows included."""
    inp = make_inputs([dtype], Cs=(1, 7, 768, 4097), extra=True)
    results = {}
    for n in (1, 2, 3):
        pynorm.set_num_threads(n)
        assert pynorm.get_num_threads() == n
        results[n] = compute(inp)
    for n in (2, 3):
        assert_same_results(results[n], results[1], f"{n} threads vs 1 thread")


def test_thread_count_default_zero():
    """set_num_threads(0) restores OpenMP's default; results unchanged."""
    inp = make_inputs([F32], Cs=(768,), extra=False)
    pynorm.set_num_threads(1)
    one = compute(inp)
    pynorm.set_num_threads(0)
    assert_same_results(compute(inp), one, "default threads vs 1 thread")


def _isa_params():
    params = []
    for isa in ("generic", "avx2"):
        note = f"{isa}-vs-default-{DEFAULT_ISA}"
        if isa == DEFAULT_ISA:
            note += "-same-isa-checks-env-path-only"
        params.append(pytest.param(isa, id=note))
    return params


@pytest.mark.parametrize("isa", _isa_params())
def test_forced_isa_bit_identical_to_default(isa, tmp_path, pynorm_env):
    """A subprocess with PYNORM_ISA=<isa> computes the same results bit for bit
    as this process (default ISA). When the default already is <isa>, the test
    only checks that the environment variable path works."""
    inp = make_inputs()
    save(str(tmp_path / "inputs.npz"), inp)
    script = tmp_path / "compute.py"
    script.write_text(COMPUTE_SRC)
    env = dict(pynorm_env, PYNORM_ISA=isa)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess with PYNORM_ISA={isa} failed:\n{proc.stdout}\n{proc.stderr}"
    theirs = load(str(tmp_path / "out.npz"))
    sub_isa = str(theirs.pop("__isa__"))
    if sub_isa != isa:
        if isa == "avx2" and sub_isa == "generic" and DEFAULT_ISA == "generic":
            pytest.skip("this CPU has no AVX2")
        pytest.fail(f"PYNORM_ISA={isa}: the subprocess reports pynorm.isa() == {sub_isa!r}")
    ours = compute(inp)
    note = " (same ISA as default: only the PYNORM_ISA path is checked)" if isa == DEFAULT_ISA else ""
    assert_same_results(theirs, ours, f"PYNORM_ISA={isa} vs default {DEFAULT_ISA}{note}")


def test_isa_reports_known_name():
    assert DEFAULT_ISA in ("avx512", "avx2", "generic")
    if os.environ.get("PYNORM_ISA") in ("generic", "avx2"):
        assert DEFAULT_ISA in ("generic", os.environ["PYNORM_ISA"])
