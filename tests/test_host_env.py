"""The host process stays as it was: importing and calling pynorm leaves the
caller's floating-point environment, signal handlers, thread settings and
environment alone, prints nothing, and does not import torch.

Each check runs in a fresh interpreter (a subprocess), which records the state
before `import pynorm`, after it, and after calls of every op (valid and
refused, several thread counts), and prints the three records as JSON.

- Floating point: subnormal arithmetic still gives subnormals, so neither
  flush-to-zero nor denormals-are-zero got switched on (a library built with
  -ffast-math sets both in the whole process when it is loaded).
- Signals: the raw `struct sigaction` of every signal 1..64 (sigaction(2)
  through ctypes) and Python's own handlers.
- Threads: OpenMP's settings as the caller sees them (omp_get_max_threads,
  omp_get_dynamic, omp_get_max_active_levels of the process's libgomp),
  torch.get_num_threads / get_num_interop_threads when torch is present, and
  every OMP_*/GOMP_*/KMP_*/MKL_*/OPENBLAS_* environment variable.

tests/c/test_reliability_host.c checks the same from C, with MXCSR read
directly (_mm_getcsr) before and after dlopen.
"""

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(r'''
    import ctypes, ctypes.util, json, os, signal, sys

    libc = ctypes.CDLL(None, use_errno=True)
    gomp = None
    for name in ("libgomp.so.1", ctypes.util.find_library("gomp")):
        try:
            gomp = ctypes.CDLL(name) if name else None
            break
        except OSError:
            pass

    def fp_state():
        # at run time, not folded at compile time: the values come from strings
        tiny64 = float("2.2250738585072014e-308")      # smallest normal double
        sub64 = float("5e-324")                        # smallest subnormal double
        import struct
        tiny32 = struct.unpack("f", struct.pack("I", 0x00800000))[0]
        return {
            "ftz64": tiny64 / 4.0 == 0.0,              # a subnormal result flushed to zero
            "daz64": sub64 * 2.0 == 0.0,               # a subnormal input read as zero
            "sub64": (tiny64 / 4.0).hex(),
        }

    def fp_state32():
        import numpy as np
        t = np.float32(1.1754944e-38)                  # smallest normal float
        s = np.frombuffer(np.uint32(1).tobytes(), np.float32)[0]
        return {"ftz32": bool(t / np.float32(4) == 0), "daz32": bool(s * np.float32(2) == 0)}

    import platform

    def signals():
        # glibc x86-64 `struct sigaction`: handler at 0, sa_mask (sigset_t, 128
        # bytes, of which the kernel fills the first 8: signals 1..64; glibc
        # copies the rest from uninitialized stack) at 8, sa_flags at 136,
        # sa_restorer at 144
        out = {}
        raw_ok = sys.platform.startswith("linux") and platform.machine() == "x86_64"
        for sig in range(1, 65):
            buf = ctypes.create_string_buffer(512)
            if raw_ok and libc.sigaction(sig, None, buf) == 0:
                b = buf.raw
                out[str(sig)] = (b[0:8] + b[8:16] + b[136:140] + b[144:152]).hex()
        py = {}
        for s in signal.valid_signals():
            try:
                h = signal.getsignal(s)
            except (ValueError, OSError):
                continue
            py[str(int(s))] = repr(h)
        return out, py

    def threads():
        d = {}
        if gomp is not None:
            d["omp_max"] = gomp.omp_get_max_threads()
            d["omp_dynamic"] = gomp.omp_get_dynamic()
            d["omp_levels"] = gomp.omp_get_max_active_levels()
        if "torch" in sys.modules:
            import torch
            d["torch_threads"] = torch.get_num_threads()
            d["torch_interop"] = torch.get_num_interop_threads()
        d["env"] = {k: v for k, v in os.environ.items()
                    if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_"))}
        return d

    def record():
        sigs, pysigs = signals()
        r = {"fp": fp_state(), "signals": sigs, "pysignals": pysigs, "threads": threads()}
        r["fp"].update(fp_state32())
        return r

    def exercise(pynorm):
        import ml_dtypes
        import numpy as np
        rng = np.random.default_rng(0)
        for dt in (np.float32, np.float16, ml_dtypes.bfloat16, np.float64):
            for n in (0, 1, 3):
                pynorm.set_num_threads(n)
                x = (rng.standard_normal((64, 700))).astype(dt)
                x[0, 0] = 1e-40 if dt in (np.float32, np.float64) else 0
                r = rng.standard_normal((64, 700)).astype(dt)
                y, m, s = pynorm.layer_norm_forward(x)
                pynorm.layer_norm_backward(r, x, m, s)
                y, s = pynorm.rms_norm_forward(x)
                pynorm.rms_norm_backward(r, x, s)
                pynorm.add_layer_norm(x, r)
                pynorm.add_rms_norm(x, r, eps=0.0)
                for bad in (lambda: pynorm.layer_norm(x, eps=-1.0), lambda: pynorm.rms_norm(x, out=x),
                            lambda: pynorm.layer_norm(x.astype(np.int8))):
                    try:
                        bad()
                    except (TypeError, ValueError):
                        pass
        pynorm.set_num_threads(0)
        x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
        pynorm.group_norm(x, 2)
        pynorm.batch_norm(x, np.zeros(4, np.float32), np.ones(4, np.float32), training=True)
        pynorm.copy_bandwidth(1 << 20, 2)

    mode = sys.argv[1]
    if mode == "torch":
        import torch                    # the caller's own thread settings, then pynorm
        torch.set_num_threads(2)
    before = record()
    import pynorm
    torch_imported = "torch" in sys.modules
    after_import = record()
    exercise(pynorm)
    after_calls = record()
    sys.stdout.write("@@RESULT@@" + json.dumps({"before": before, "import": after_import, "calls": after_calls,
                                                 "torch_imported": torch_imported}))
''')


def run_probe(pynorm_env, mode):
    p = subprocess.run([sys.executable, "-c", PROBE, mode], env=pynorm_env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"probe failed:\n{p.stdout}\n{p.stderr}"
    head, _, payload = p.stdout.partition("@@RESULT@@")
    return head, p.stderr, json.loads(payload)


def _changed(a, b):
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def test_floating_point_environment_unchanged(pynorm_env):
    _, _, r = run_probe(pynorm_env, "plain")
    assert r["before"]["fp"] == {"ftz64": False, "daz64": False, "sub64": r["before"]["fp"]["sub64"],
                                 "ftz32": False, "daz32": False}, \
        f"the interpreter itself runs with FTZ/DAZ: {r['before']['fp']}"
    for when in ("import", "calls"):
        assert r[when]["fp"] == r["before"]["fp"], \
            f"after {when}: subnormal arithmetic changed (flush-to-zero / denormals-are-zero): {r[when]['fp']}"


def test_no_signal_handlers_installed(pynorm_env):
    _, _, r = run_probe(pynorm_env, "plain")
    for when in ("import", "calls"):
        changed = _changed(r["before"]["signals"], r[when]["signals"])
        assert not changed, f"after {when}: sigaction changed for signals {changed}"
        changed = _changed(r["before"]["pysignals"], r[when]["pysignals"])
        assert not changed, f"after {when}: Python signal handlers changed for {changed}"


def test_thread_settings_unchanged(pynorm_env):
    _, _, r = run_probe(pynorm_env, "plain")
    for when in ("import", "calls"):
        assert r[when]["threads"] == r["before"]["threads"], \
            f"after {when}: {r[when]['threads']} (before: {r['before']['threads']})"


def test_torch_thread_settings_unchanged(pynorm_env):
    pytest.importorskip("torch")
    _, _, r = run_probe(pynorm_env, "torch")
    assert r["before"]["threads"]["torch_threads"] == 2
    for when in ("import", "calls"):
        assert r[when]["threads"] == r["before"]["threads"], \
            f"after {when}: {r[when]['threads']} (before: {r['before']['threads']})"
        assert r[when]["fp"] == r["before"]["fp"]


def test_import_does_not_import_torch_and_nothing_is_printed(pynorm_env):
    out, err, r = run_probe(pynorm_env, "plain")
    assert not r["torch_imported"], "import pynorm imported torch"
    assert out == "", f"pynorm printed to stdout: {out!r}"
    assert err == "", f"pynorm printed to stderr: {err!r}"
