"""A process that has used pynorm's threads exits cleanly.

After a threaded call, OpenMP's worker threads stay alive between parallel
regions, waiting inside the OpenMP runtime (libgomp) that libpynorm brought
into the process. At interpreter exit cffi closes the library; when that
unmapped the library and, with it, the runtime, a waiting worker fetched its
next instruction from an unmapped page and the process died of SIGSEGV (exit
status 139): every time with OMP_WAIT_POLICY=active, now and then with the
default policy. The library is now never unloaded (docs/reliability.md).

Each run is a fresh NumPy-only interpreter (torch, imported first, holds
libgomp itself and hides the fault) that imports the pynorm this process
imports, makes one LayerNorm call on two threads and exits: 12 per policy
(PYNORM_EXIT_RUNS=n runs more), a few at a time; most of each run is the
import of NumPy and ml_dtypes, about 1 s of CPU. It runs from the tests
directory, so that the source tree's pynorm/ does not shadow an installed
package.

With OMP_WAIT_POLICY=passive the workers sleep in the kernel instead of
spinning, and the exit survived the unload anyway; the second test therefore
closes the library's handle itself, as cffi does at exit, and looks at what
stays mapped. tests/c/test_exit_unload.c checks the same for a C host that
dlopen()s and dlclose()s the library.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

import pynorm

RUNS = int(os.environ.get("PYNORM_EXIT_RUNS", "12"))   # per policy
PARALLEL = max(2, min(8, os.cpu_count() or 2))
POLICIES = ["active", "passive"]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import pynorm
    pynorm.set_num_threads(2)
    assert pynorm.get_num_threads() == 2, pynorm.get_num_threads()
    x = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
    y = pynorm.layer_norm(x)                    # 512 x 1024: the threaded path
    assert np.isfinite(y).all() and abs(float(y.mean())) < 1e-3
    assert "torch" not in sys.modules, "torch was imported: it would keep libgomp loaded"
    print("done", pynorm.__file__)
""")


def describe(returncode):
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def run_child(code, policy, env):
    return subprocess.run([sys.executable, "-c", code], cwd=TESTS_DIR, env=dict(env, OMP_WAIT_POLICY=policy),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("policy", POLICIES)
def test_exit_after_threaded_call(policy, pynorm_env):
    with ThreadPoolExecutor(PARALLEL) as pool:
        procs = list(pool.map(lambda _: run_child(CHILD, policy, pynorm_env), range(RUNS)))
    failures = []
    for proc in procs:
        finished = proc.stdout.startswith("done ")
        if proc.returncode != 0 or not finished:
            failures.append(f"{describe(proc.returncode)}, {'finished' if finished else 'did not finish'} "
                            f"its call; stderr: {proc.stderr.strip()[-500:]!r}")
        else:
            child_pynorm = proc.stdout.split(None, 1)[1].strip()
            assert child_pynorm == pynorm.__file__, (
                f"the subprocess imported {child_pynorm}, not this process's {pynorm.__file__}")
    assert not failures, (
        f"OMP_WAIT_POLICY={policy}: {len(failures)} of {RUNS} processes that made one 2-thread call "
        f"failed at exit; first: {failures[0]}")


CLOSE_CHILD = textwrap.dedent("""
    import json
    import numpy as np
    import pynorm
    from pynorm import _lib

    def mapped():
        with open("/proc/self/maps") as f:
            return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}

    pynorm.set_num_threads(2)
    pynorm.layer_norm(np.ones((512, 1024), np.float32))
    loaded = {p for p in mapped() if "pynorm" in p or "omp" in p}
    _lib.ffi.dlclose(_lib.lib)                  # what cffi does at interpreter exit
    print(json.dumps({"loaded": sorted(loaded), "after_close": sorted(loaded & mapped())}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("policy", POLICIES)
def test_closing_the_library_keeps_it_mapped(policy, pynorm_env):
    """Closing pynorm's library handle leaves the library and its OpenMP
    runtime mapped, so that OpenMP's waiting workers never run unmapped code."""
    proc = run_child(CLOSE_CHILD, policy, pynorm_env)
    assert proc.returncode == 0, (
        f"OMP_WAIT_POLICY={policy}: closing the library's handle after a 2-thread call: "
        f"{describe(proc.returncode)}; stderr: {proc.stderr.strip()[-500:]!r}")
    files = json.loads(proc.stdout)
    assert any("omp" in p for p in files["loaded"]), (
        f"no OpenMP runtime among the library's mappings {files['loaded']}: the test cannot see the fault")
    gone = sorted(set(files["loaded"]) - set(files["after_close"]))
    assert not gone, f"OMP_WAIT_POLICY={policy}: closing the library's handle unmapped {gone}"
