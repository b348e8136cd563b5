"""Pointer-level access to the C library (CPU) and the CUDA library for torch tensors.

Tensors reach the kernels through ``tensor.data_ptr()``: nothing passes through
NumPy and contiguous inputs are never copied. Inputs whose rows are contiguous
but whose leading axes are strided are described to the kernels with a
``pn_strides`` struct; only inputs the kernels cannot address (last axis not
contiguous, leading axes with no common B x T split) are copied.
"""

import math

import torch

from .._arrays import COPY, IN, REPEAT, row_pair, split_rows, split_rows3
from .._lib import ffi as _cffi, lib as _clib

_TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


# CPU outputs of at least this many bytes come from the C library's buffer cache
# (pn_buffer_alloc): fresh large allocations cost a page fault per 4 KiB on first
# touch, several times a norm's own time on some machines (pynorm._arrays does the same).
CACHED_ALLOC_MIN = 1 << 20


def _cpu_cached_empty(shape, dtype, nbytes):
    raw = _clib.pn_buffer_alloc(nbytes)
    if raw == _cffi.NULL:
        raise MemoryError(f"pynorm.torch: cannot allocate {nbytes} bytes")
    raw = _cffi.gc(raw, lambda p, n=nbytes: _clib.pn_buffer_free(p, n), size=nbytes)
    # the tensor keeps the buffer object alive, the buffer keeps raw: freed (back to
    # the cache) when the tensor's storage goes
    return torch.frombuffer(_cffi.buffer(raw, nbytes), dtype=dtype).view(shape)


_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def empty(shape, dtype, device):
    """A dense output tensor (CPU: large ones from the library's buffer cache)."""
    if device.type == "cpu":
        n = _ITEMSIZE.get(dtype, 0)
        for s in shape:
            n *= s
        if n >= CACHED_ALLOC_MIN:
            return _cpu_cached_empty(tuple(shape), dtype, n)
    return torch.empty(shape, dtype=dtype, device=device)


def stats_dtype(dtype):
    """Saved statistics are float32, float64 for float64 data."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Backend:
    """One library (the C one, or the CUDA one): its cffi handles, its function
    prefix and how to call it (the CUDA functions take a stream last)."""

    def __init__(self, ffi, lib, prefix, status_string, cuda, needs_scratch):
        self.ffi, self.lib, self.prefix = ffi, lib, prefix
        self._status_string = status_string
        self.cuda = cuda
        self.needs_scratch = needs_scratch       # the CUDA library never allocates
        # enum values and flags are pynorm.h's, shared by both libraries
        self.pn_dtype = {
            torch.float32: _clib.PN_FLOAT32, torch.float16: _clib.PN_FLOAT16,
            torch.bfloat16: _clib.PN_BFLOAT16, torch.float64: _clib.PN_FLOAT64,
        }
        self._fns = {}
        self._voidp = ffi.typeof("void *")
        self._cast = ffi._backend.cast if hasattr(ffi, "_backend") else ffi.cast

    def ptr(self, t):
        """A void * to t's first element (NULL for None)."""
        return self.ffi.NULL if t is None else self._cast(self._voidp, t.data_ptr())

    def fn(self, name):
        f = self._fns.get(name)
        if f is None:
            try:
                f = self._fns[name] = getattr(self.lib, self.prefix + name)
            except AttributeError:
                raise NotImplementedError(f"pynorm.torch: this build's {'CUDA' if self.cuda else 'C'} "
                                          f"library has no {self.prefix + name}") from None
        return f

    def call(self, name, what, device, *args):
        if self.cuda:
            with torch.cuda.device(device):
                stream = self.ffi.cast("void *", torch.cuda.current_stream(device).cuda_stream)
                status = self.fn(name)(*args, stream)
        else:
            status = self.fn(name)(*args)
        self.check(status, what)

    def check(self, status, what):
        if status == 0:
            return
        message = f"pynorm.torch.{what}: {self._status_string(status)}"
        if status == _clib.PN_ERR_ALLOC:
            raise MemoryError(message)
        if status == _clib.PN_ERR_DTYPE:
            raise TypeError(message)
        if status == _clib.PN_ERR_SCRATCH or status >= 100:
            raise RuntimeError(message)
        raise ValueError(message)

    def scratch(self, size_fn, device, *size_args):
        """(pointer, bytes) of a scratch buffer for a backward: NULL on the CPU
        (the C library allocates its own), a torch allocation on CUDA (kept
        alive by the returned tensor)."""
        if not self.needs_scratch:
            return self.ffi.NULL, 0, None
        nbytes = int(self.fn(size_fn)(*size_args))
        buf = torch.empty(max(nbytes, 16), dtype=torch.uint8, device=device)
        return self.ptr(buf), nbytes, buf


# flags of pynorm.h
PN_ACCUMULATE = _clib.PN_ACCUMULATE
PN_BN_TRAINING = _clib.PN_BN_TRAINING
PN_BN_CUMULATIVE = _clib.PN_BN_CUMULATIVE

CPU = Backend(_cffi, _clib, "pn_", lambda s: _cffi.string(_clib.pn_status_string(s)).decode(),
              cuda=False, needs_scratch=False)

_cuda_backend = None
_cuda_error = None


def _load_cuda_backend():
    """The CUDA library's pointer-level bindings, from pynorm._cuda.library() (the
    cffi (ffi, lib) of libpynorm_cuda, whose pn_cuda_* functions mirror the C
    library's and take the CUDA stream last), or None when it cannot be loaded."""
    global _cuda_backend, _cuda_error
    if _cuda_backend is None:
        try:
            from .. import _cuda
            ffi, lib = _cuda.library()
            _cuda_backend = Backend(ffi, lib, "pn_cuda_", lambda s: _cuda_status(ffi, lib, s),
                                    cuda=True, needs_scratch=True)
        except Exception as e:        # no CUDA library built, no driver, old bindings...
            _cuda_backend, _cuda_error = False, e
    return _cuda_backend or None


def _cuda_status(ffi, lib, status):
    text = ffi.string(lib.pn_cuda_status_string(status)).decode()
    if status >= 100:
        text += f" ({ffi.string(lib.pn_cuda_last_error_string()).decode()})"
    return text


def backend_for(t, what):
    """The library that runs tensor t's device."""
    kind = t.device.type
    if kind == "cpu":
        return CPU
    if kind == "cuda":
        be = _load_cuda_backend()
        if be is None:
            raise NotImplementedError(
                f"pynorm.torch.{what}: CUDA tensors need pynorm's CUDA library (libpynorm_cuda, "
                f"built when nvcc is found), which could not be loaded: {_cuda_error}")
        return be
    raise NotImplementedError(f"pynorm.torch.{what}: tensors on device {t.device} are not "
                              "supported (CPU and CUDA only)")


# ---- argument checks shared by the ops ------------------------------------------------

def check_tensor(t, name, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pynorm.torch.{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _TORCH_DTYPES:
        raise TypeError(f"pynorm.torch.{what}: {name} has dtype {t.dtype}; expected {_DTYPE_NAMES}")
    return t


def check_same_device(what, x, **others):
    dev = x.device
    for name, t in others.items():
        if t is not None and t.device != dev:
            raise ValueError(f"pynorm.torch.{what}: {name} is on {t.device}, expected x's device {dev}")


# ---- row layouts ------------------------------------------------------------------------

def _row_strides(t):
    """Element strides of t's leading axes when its rows are contiguous, else None."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    return t.stride()[:-1]


def token_layout(be, lead, inputs, heads=False):
    """B x T rows for the inputs of a token-norm call; outputs are fresh dense tensors.

    inputs: list of (pn_strides field, tensor). Returns (B, T, pn_strides* or NULL,
    tensors), where an input the kernels cannot address in place was replaced by a
    contiguous copy (the only copies ever made). With heads=True, views no B x T
    split fits (a 4-D (B, S, H, D) view of a fused qkv buffer) get a B x T x H
    split, and the result is (B, T, H, {field: head stride}, pn_strides*, tensors)
    for a pn_norm_options (H == 1, {} otherwise)."""
    tensors = [t for _, t in inputs]
    rows = math.prod(lead)

    def result(B, T, s, H=1, head=None):
        return (B, T, H, head or {}, s, tensors) if heads else (B, T, s, tensors)

    for t in tensors:
        if not t.is_contiguous():
            break
    else:                                             # the common case: no struct
        return result(1, rows, be.ffi.NULL)
    strides = []
    for i, t in enumerate(tensors):
        st = _row_strides(t)
        if st is None:
            tensors[i] = t.contiguous()
            st = tensors[i].stride()[:-1]
        strides.append(st)
    split = split_rows(tuple(lead), strides)
    if split is not None:
        B, T, pairs = split
        H, triples = 1, [(sb, st, 0) for sb, st in pairs]
    else:
        split = split_rows3(tuple(lead), strides) if heads else None
        if split is None:
            tensors = [t.contiguous() for t in tensors]
            return result(1, rows, be.ffi.NULL)
        B, T, H, triples = split
    C = tensors[0].shape[-1]
    s = be.ffi.new("pn_strides *")
    head = {}
    for i, ((field, _), triple) in enumerate(zip(inputs, triples)):
        if tensors[i].is_contiguous():
            continue                                  # {0, 0}: dense
        pair = row_pair(IN, (B, T, H), triple, C)
        if pair is COPY or pair is REPEAT:            # every row the same memory, for every (b, t)
            tensors[i] = tensors[i].contiguous()
            continue
        if H > 1:
            head[field] = triple[2]
        row = getattr(s, field)
        row.b, row.t = pair
    return result(B, T, s, H, head)
