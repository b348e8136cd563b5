"""CUDA Array Interface v3 stream order in pynorm._cuda, checked without a GPU.

An input whose __cuda_array_interface__ (version 3) names a producer stream may
still be being written on that stream. The spec asks the consumer to make its
own stream wait for the producer's before using the data; pynorm's first use can
be a copy queued while the arguments are checked (a strided weight or saved
statistic made dense, a running statistic read on the host), well before the
kernel. These tests run pynorm._cuda's argument handling against a stand-in for
CuPy that logs stream operations and copies, and check that the wait on every
producer stream comes before any copy of its array.
"""

import types

import numpy as np
import pytest

from pynorm import _cuda, _cuda_spatial

OUR_STREAM = 0x5000


class _Event:
    def __init__(self, stream):
        self.stream = stream


class _Stream:
    def __init__(self, ptr, log):
        self.ptr, self.log = ptr, log

    def record(self):
        self.log.append(("record", self.ptr))
        return _Event(self.ptr)

    def wait_event(self, ev):
        self.log.append(("wait", self.ptr, ev.stream))


class _Device:
    def __init__(self, id=0):
        self.id = id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Copy:
    """What CuPy's ascontiguousarray returns, as far as pynorm looks."""

    def __init__(self, a):
        self.shape, self.dtype = a.shape, a.dtype
        self.strides = _cuda._c_strides(a.shape, a.dtype.itemsize)
        self.data = types.SimpleNamespace(ptr=0x900000)

    def get(self):
        return np.zeros(self.shape, self.dtype)


def _fake_cupy(log):
    class ndarray:   # a CuPy view of foreign memory (pynorm._cuda._as_cupy)
        def __init__(self, shape, dtype, memptr, strides=None):
            self.shape, self.dtype, self.strides, self.memptr = shape, np.dtype(dtype), strides, memptr

    def ascontiguousarray(a):
        log.append(("copy", a.memptr.ptr))
        return _Copy(a)

    cuda = types.SimpleNamespace(
        Device=_Device,
        runtime=types.SimpleNamespace(pointerGetAttributes=lambda ptr: types.SimpleNamespace(device=0)),
        UnownedMemory=lambda ptr, size, owner, dev: types.SimpleNamespace(ptr=ptr),
        MemoryPointer=lambda mem, off: types.SimpleNamespace(ptr=mem.ptr + off),
        ExternalStream=lambda ptr: _Stream(ptr, log),
        get_current_stream=lambda: _Stream(OUR_STREAM, log),
    )
    return types.SimpleNamespace(ndarray=ndarray, ascontiguousarray=ascontiguousarray, cuda=cuda)


class _Foreign:
    """A device array known only by its __cuda_array_interface__."""

    def __init__(self, ptr, shape, dtype=np.float32, strides=None, stream=None, version=3):
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": np.dtype(dtype).str, "data": (ptr, False),
            "strides": strides, "version": version, "stream": stream,
        }


def _call(log):
    """A _Call as pynorm builds it, on the stand-in CuPy (not yet entered)."""
    call = object.__new__(_cuda._Call)
    call.cp = _fake_cupy(log)
    call.ffi = types.SimpleNamespace(cast=lambda t, v: v)
    call.stream = None
    call.producers = set()
    return call


def _enter(call, x):
    call.x = _cuda._check_x(x, "x", call)
    call.device = _Device()
    return call.__enter__()


def _assert_waited_before_copy(log, producer, ptr):
    waits = [i for i, e in enumerate(log) if e == ("wait", OUR_STREAM, producer)]
    copies = [i for i, e in enumerate(log) if e == ("copy", ptr)]
    assert waits, f"our stream never waited for producer stream {producer:#x}: {log}"
    assert copies, f"no copy of the array at {ptr:#x} was queued: {log}"
    assert waits[0] < copies[0], f"the array at {ptr:#x} was copied before the wait for its producer: {log}"


def test_x_producer_is_waited_for_on_entry_before_anything_is_queued():
    log = []
    call = _call(log)
    call.x = _cuda._check_x(_Foreign(0x1000, (4, 8), stream=0x77), "x", call)
    assert log == [], "nothing may be queued before the call enters x's device"
    call.device = _Device()
    call.__enter__()
    assert log == [("record", 0x77), ("wait", OUR_STREAM, 0x77)]
    assert call.stream_ptr() == OUR_STREAM
    assert log == [("record", 0x77), ("wait", OUR_STREAM, 0x77)], "stream_ptr must not wait twice"


@pytest.mark.parametrize("check", ["token weight", "token stats", "spatial stats"])
def test_strided_input_is_copied_only_after_its_producer_is_waited_for(check):
    log = []
    call = _enter(_call(log), _Foreign(0x1000, (4, 8), stream=0x77))
    x = call.x
    if check == "token weight":     # every other float32 of a buffer: copied to a dense weight
        _cuda._check_param(_Foreign(0x2000, (8,), strides=(8,), stream=0x88), "weight", x, call)
    elif check == "token stats":    # saved mean with a stride: copied before the backward
        _cuda._check_stats(_Foreign(0x2000, (4,), strides=(8,), stream=0x88), "mean", x, call)
    else:
        _cuda_spatial._check_stats(_Foreign(0x2000, (4,), strides=(8,), stream=0x88), "mean", (4,), x, call)
    _assert_waited_before_copy(log, 0x88, 0x2000)


def test_same_stream_and_v2_inputs_add_no_wait():
    log = []
    call = _enter(_call(log), _Foreign(0x1000, (4, 8), stream=OUR_STREAM))
    _cuda._check_param(_Foreign(0x2000, (8,), stream=0x99, version=2), "weight", call.x, call)
    _cuda._check_param(_Foreign(0x3000, (8,)), "bias", call.x, call)
    assert [e for e in log if e[0] == "wait"] == [], f"unexpected waits: {log}"


def test_each_input_waits_when_seen_and_the_launch_adds_nothing():
    log = []
    call = _enter(_call(log), _Foreign(0x1000, (4, 8), stream=0x77))
    _cuda._check_param(_Foreign(0x2000, (8,), stream=0x77), "weight", call.x, call)
    _cuda._check_param(_Foreign(0x3000, (8,), stream=0x88), "bias", call.x, call)
    call.stream_ptr()
    waits = [e for e in log if e[0] == "wait"]
    assert waits == [("wait", OUR_STREAM, 0x77), ("wait", OUR_STREAM, 0x77), ("wait", OUR_STREAM, 0x88)], log
