"""Concurrency: pynorm called from many Python threads at once.

- Many threads running every op on shared inputs get the bits serial calls
  get, while another thread keeps changing pynorm.set_num_threads (the thread
  count never changes results).
- The C calls release the GIL: a Python thread spinning a counter keeps
  advancing while another thread is inside a long pynorm call (cffi releases
  the GIL around every C call; were it held, the spinner could not run a
  single Python instruction during the call).
- Threads that each get their own outputs through out= never see each other's
  results.

The caller's OpenMP parallel region case (a C program calling pynorm from
each thread of its `#pragma omp parallel`) is tests/c/test_reliability_omp.c.
"""

import ctypes
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest

import pynorm
import pynorm._lib

BF16 = np.dtype(ml_dtypes.bfloat16)


def _inputs():
    rng = np.random.default_rng(2024)
    cases = []
    for dtype, shape in ((np.float32, (7, 33, 256)), (np.float16, (5, 129)), (BF16, (3, 3000)),
                         (np.float64, (2, 64, 300)), (np.float32, (1, 1)), (np.float32, (40, 1100))):
        x = (rng.standard_normal(shape) + 0.3).astype(dtype)
        r = rng.standard_normal(shape).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[-1]
        w = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
        b = (0.1 * rng.standard_normal(C)).astype(np.float32 if dtype == np.float32 else dtype)
        cases.append((x, r, dy, w, b))
    return cases


def _all_ops(x, r, dy, w, b):
    out = []
    y, mean, rstd = pynorm.layer_norm_forward(x, w, b)
    out += [y, mean, rstd]
    out += list(pynorm.layer_norm_backward(dy, x, mean, rstd, w))
    y, rs = pynorm.rms_norm_forward(x, w)
    out += [y, rs]
    out += list(pynorm.rms_norm_backward(dy, x, rs, w))
    out += list(pynorm.add_layer_norm(x, r, w, b))
    out += list(pynorm.add_rms_norm(x, r, w))
    out.append(pynorm.layer_norm(x[..., ::-1, :] if x.ndim > 2 else x))   # a strided input too
    return out


def _bits(arrays):
    return [np.ascontiguousarray(a).tobytes() for a in arrays]


def test_many_threads_get_the_serial_results():
    cases = _inputs()
    pynorm.set_num_threads(1)
    expected = [_bits(_all_ops(*c)) for c in cases]
    pynorm.set_num_threads(0)

    errors, mismatches = [], []
    stop = threading.Event()

    def worker(k):
        try:
            for rep in range(3):
                for i in range(len(cases)):
                    j = (i + k + rep) % len(cases)
                    if _bits(_all_ops(*cases[j])) != expected[j]:
                        mismatches.append((k, j))
        except Exception as e:      # noqa: BLE001 - reported below
            errors.append(repr(e))

    def flipper():
        n = 0
        while not stop.is_set():
            pynorm.set_num_threads(n % 4)
            n += 1
            time.sleep(0.0005)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    f = threading.Thread(target=flipper)
    f.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    stop.set()
    f.join()
    pynorm.set_num_threads(0)
    assert not any(t.is_alive() for t in threads), "a thread is still running: deadlock?"
    assert not errors, errors
    assert not mismatches, f"results differing from serial calls (thread, case): {mismatches[:10]}"


def test_threads_with_their_own_out_buffers():
    x = np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)
    want = pynorm.rms_norm(x)
    outs = [np.full_like(x, np.nan) for _ in range(6)]

    def worker(o):
        for _ in range(20):
            pynorm.rms_norm(x, out=o)

    threads = [threading.Thread(target=worker, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in outs:
        assert o.tobytes() == want.tobytes()


def test_calls_release_the_gil():
    """A spinner thread counts while the main thread is inside one long C
    call. With the GIL held for the call the spinner could not execute a
    single bytecode between the call's start and end: it would record no
    progress inside the window."""
    n = 1 << 26                                      # 256 MiB of float32: a call of ~0.05-0.5 s
    x = (np.arange(n, dtype=np.float32) % 977).reshape(n // 1024, 1024)   # values do not matter here
    out = np.empty_like(x)
    pynorm.rms_norm(x, out=out)                      # warm up (page faults, thread pool)
    pynorm.set_num_threads(1)                        # leave a core to the spinner

    stamps = []
    stop = threading.Event()
    started = threading.Event()

    def spinner():
        started.set()
        append, clock = stamps.append, time.perf_counter
        while not stop.is_set():
            append(clock())

    def probe(call):
        """Spinner steps recorded in the middle 60% of call()'s duration."""
        stamps.clear()
        stop.clear()
        started.clear()
        t = threading.Thread(target=spinner)
        t.start()
        started.wait()
        time.sleep(0.01)
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        stop.set()
        t.join()
        lo, hi = t0 + 0.2 * (t1 - t0), t1 - 0.2 * (t1 - t0)
        return sum(1 for s in stamps if lo < s < hi), t1 - t0

    try:
        # control: the same C function called through ctypes.PyDLL, which
        # keeps the GIL: the probe must see the spinner stop
        held = ctypes.PyDLL(pynorm._lib.library_path).pn_layernorm_forward
        held.restype = ctypes.c_int
        held.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_double, ctypes.c_int,
                                                                         ctypes.c_int, ctypes.c_void_p]
        rows = x.shape[0]
        status = []
        # a long switch interval: the main thread is not made to hand the GIL
        # over between reading the clock and entering the call
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.5)
        steps_held = None
        try:
            # a loaded machine may stall the main thread between taking the GIL and
            # entering the call for longer than the switch interval, letting the
            # spinner in before the call: one clean probe of a few shows the control
            for attempt in range(5):
                steps, dt_held = probe(lambda: status.append(held(out.ctypes.data, None, None, x.ctypes.data, None,
                                                                  None, 1, rows, 1024, 1e-5, 0, 0, None)))
                steps_held = steps if steps_held is None else min(steps_held, steps)
                if steps_held == 0:
                    break
        finally:
            sys.setswitchinterval(interval)
        assert status and set(status) == {0}, f"control: the direct call returned {status}"
        assert steps_held == 0, f"control: a GIL-holding call let the spinner run {steps_held} times"
        best = 0
        for attempt in range(5):                     # a loaded machine may starve the spinner once
            steps, dt = probe(lambda: pynorm.layer_norm(x, out=out))
            best = max(best, steps)
            if steps >= 20:
                break
    finally:
        pynorm.set_num_threads(0)
    assert best >= 20, (f"the spinner made {best} steps during the middle of a {dt:.3f} s call "
                        f"(0 while a GIL-holding call of {dt_held:.3f} s ran): the call seems to hold the GIL")


@pytest.mark.parametrize("op", ["layer_norm_backward", "add_rms_norm"])
def test_other_entry_points_release_the_gil(op):
    """The same for a backward and a fused forward, with a coarser probe: a
    thread that sleeps-and-counts keeps counting during the calls."""
    x = np.random.default_rng(4).standard_normal((4096, 1024)).astype(np.float32)
    dy = np.random.default_rng(5).standard_normal((4096, 1024)).astype(np.float32)
    _, mean, rstd = pynorm.layer_norm_forward(x)
    counter = [0]
    stop = threading.Event()

    def spinner():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spinner)
    pynorm.set_num_threads(1)
    try:
        t.start()
        time.sleep(0.01)
        c0 = counter[0]
        t0 = time.perf_counter()
        calls = 0
        while time.perf_counter() - t0 < 0.3 or calls < 2:
            if op == "layer_norm_backward":
                pynorm.layer_norm_backward(dy, x, mean, rstd)
            else:
                pynorm.add_rms_norm(x, dy)
            calls += 1
        c1 = counter[0]
    finally:
        stop.set()
        t.join()
        pynorm.set_num_threads(0)
    assert c1 - c0 > 1000, f"{op}: the spinner advanced only {c1 - c0} times during {calls} calls"
