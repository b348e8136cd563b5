"""Array handling shared by the ops: argument checks, row layouts, outputs.

Every check runs before the C library is called, and names the argument it
rejects. The C library checks again (a backstop): a status from it becomes an
exception here too.
"""
import math
import numbers

import ml_dtypes
import numpy as np

from ._lib import ffi, lib

bfloat16 = np.dtype(ml_dtypes.bfloat16)

# NumPy dtype -> pn_dtype
PN_DTYPE = {
    np.dtype(np.float32): lib.PN_FLOAT32,
    np.dtype(np.float16): lib.PN_FLOAT16,
    bfloat16: lib.PN_BFLOAT16,
    np.dtype(np.float64): lib.PN_FLOAT64,
}
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 (ml_dtypes) or float64"

# Outputs of at least this many bytes come from the library's buffer cache,
# which spares a loop over large outputs the page faults of fresh memory.
_CACHED_ALLOC_MIN = 1 << 20


class PynormError(RuntimeError):
    """The C library refused a call that passed the Python checks."""


def check_status(status, *what):
    """Raise for a failed status. `what` names the call in pieces, joined only on
    failure: a name built on every successful call is measurable per-call cost."""
    if status == lib.PN_OK:
        return
    message = f"{''.join(what)}: {ffi.string(lib.pn_status_string(status)).decode()}"
    if status == lib.PN_ERR_ALLOC:
        raise MemoryError(message)
    if status in (lib.PN_ERR_DTYPE,):
        raise TypeError(message)
    if status in (lib.PN_ERR_SCRATCH,):
        raise PynormError(message)
    raise ValueError(message)


def ptr(a):
    """Data pointer of an ndarray (or NULL for None)."""
    if a is None:
        return ffi.NULL
    if a.flags.c_contiguous:              # the fast way, for the common case
        return ffi.from_buffer(a)
    return ffi.cast("void *", a.__array_interface__["data"][0])


def stats_dtype(dtype):
    """Saved statistics are float32, float64 for float64 data."""
    return _F64 if dtype == _F64 else _F32


def check_input(x, name):
    """x must be a NumPy array of a supported dtype with at least one axis."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (or a CUDA array), got {type(x).__name__}")
    if x.dtype not in PN_DTYPE:
        raise TypeError(f"{name} has dtype {x.dtype}; expected {_DTYPE_NAMES}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the normalized axis C), got a 0-d array")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last axis (C = 0): there is nothing to normalize")
    return x


_EPS32 = float(np.finfo(np.float32).eps)
_EPS64 = float(np.finfo(np.float64).eps)


def check_eps(eps, default_for=None):
    """eps as a float; None means the machine epsilon of the compute type."""
    if eps is None:
        return _EPS64 if default_for == _F64 else _EPS32
    if type(eps) is not float:            # a plain float skips the (slow) ABC check
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
        eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def check_param(p, name, x):
    """weight/bias: None, or a 1-D array of C elements in x's dtype or float32.
    Returns (array or None, its pn_dtype) - dense, as the C API wants it."""
    if p is None:
        return None
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or None, got {type(p).__name__}")
    if p.dtype != x.dtype and p.dtype != _F32:
        raise TypeError(f"{name} has dtype {p.dtype}; expected x's dtype ({x.dtype}) or float32")
    if p.shape != (x.shape[-1],):
        raise ValueError(f"{name} has shape {p.shape}; expected ({x.shape[-1]},), the last axis of x")
    return p if p.flags.c_contiguous else np.ascontiguousarray(p)


def param_dtype(*params):
    """The dtype of weight/bias (they must agree), float32 when both are None."""
    dt = None
    for p in params:
        if p is None:
            continue
        if dt is None:
            dt = p.dtype
        elif p.dtype != dt:
            raise TypeError(f"weight and bias must have the same dtype, got {dt} and {p.dtype}")
    return _F32 if dt is None else dt


def _fold(sizes, strides):
    """(n, stride) when axes of these sizes and element strides walk one
    arithmetic sequence (outermost first), else None."""
    n, step = 1, 0
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if n > 1 and stride != step * n:
            return None
        if n == 1:
            step = stride
        n *= size
    return n, step


def _elem_strides(a):
    """Element strides of a's leading axes when its rows are contiguous, else None."""
    item = a.itemsize
    if a.shape[-1] > 1 and a.strides[-1] != item:
        return None
    if any(s % item for s in a.strides[:-1]):
        return None
    return [s // item for s in a.strides[:-1]]


def gradient_outs(out, accumulate, names):
    """A backward's out= as a tuple of len(names) entries (None: allocate that
    gradient); accumulate=True adds into existing gradients, so it needs all of them."""
    joined = ", ".join(names)
    if out is None:
        if accumulate:
            raise ValueError(f"accumulate=True adds into existing gradients: pass out=({joined})")
        return (None,) * len(names)
    if not (isinstance(out, tuple) and len(out) == len(names)):
        raise TypeError(f"out must be a tuple ({joined})")
    if accumulate and any(o is None for o in out):
        raise ValueError(f"accumulate=True needs every gradient in out=({joined})")
    return out


def split_rows(lead, strides_list):
    """The first split of the leading axes into B x T that every buffer can be
    addressed with: (B, T, [(sb, st) per buffer]) or None."""
    for k in range(len(lead) + 1):
        pairs = []
        for st in strides_list:
            fb, ft = _fold(lead[:k], st[:k]), _fold(lead[k:], st[k:])
            if fb is None or ft is None:
                break
            pairs.append((fb[1], ft[1]))
        else:
            B, T = math.prod(lead[:k]), math.prod(lead[k:])
            return B, T, pairs
    return None


def row_layout(lead, buffers):
    """Lays B x T x C rows over buffers sharing the leading shape `lead`.

    buffers: list of (pn_strides field, argument name, array, may_copy).
    Returns (B, T, pn_strides* or NULL, arrays) where an input the kernels
    cannot address in place (last axis not contiguous, or leading axes that
    fold with no common split) has been replaced by a dense copy. An output
    (may_copy False) that cannot be addressed raises ValueError."""
    arrays = [b[2] for b in buffers]
    for a in arrays:
        if not a.flags.c_contiguous:
            break
    else:                                                   # the common case, no struct
        return 1, math.prod(lead), ffi.NULL, arrays
    for attempt in (0, 1):
        strides_list = []
        for i, (field, name, a, may_copy) in enumerate(buffers):
            st = _elem_strides(arrays[i])
            if st is None or (attempt and may_copy and not arrays[i].flags.c_contiguous):
                if not may_copy:
                    raise ValueError(f"{name} must have a contiguous last axis (stride = itemsize)")
                arrays[i] = np.ascontiguousarray(arrays[i])
                st = _elem_strides(arrays[i])
            strides_list.append(st)
        split = split_rows(lead, strides_list)
        if split is not None:
            B, T, pairs = split
            s = ffi.new("pn_strides *")
            for (field, *_), (sb, st) in zip(buffers, pairs):
                row = getattr(s, field)
                if (sb, st) == (0, 0):     # one row repeated (broadcast): {0, 0} would mean dense
                    sb = 1                 # B == 1 here, so this stride is never used
                row.b, row.t = sb, st
            return B, T, s, arrays
    names = ", ".join(b[1] for b in buffers if not b[3])
    raise ValueError(f"the leading axes of {names} have strides that cannot be laid out as B x T rows; "
                     "pass C-contiguous output arrays")


def empty(shape, dtype):
    """A C-contiguous output array; large ones come from the library's cache."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _CACHED_ALLOC_MIN:
        return np.empty(shape, dtype)
    raw = lib.pn_buffer_alloc(nbytes)
    if raw == ffi.NULL:
        raise MemoryError(f"pynorm: cannot allocate {nbytes} bytes")
    raw = ffi.gc(raw, lambda p: lib.pn_buffer_free(p, nbytes), size=nbytes)
    return np.frombuffer(ffi.buffer(raw, nbytes), dtype).reshape(shape)


def check_out(out, name, shape, dtype, inputs):
    """An out= array: right shape and dtype, writable, rows the kernels can
    write in place, and no memory shared with any input."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}; expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}; expected {np.dtype(dtype)}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if out.size and not out.flags.c_contiguous and _elem_strides(out) is None:
        raise ValueError(f"{name} must have a contiguous last axis (stride = itemsize)")
    for arg, a in inputs:
        if a is not None and np.may_share_memory(out, a):
            raise ValueError(f"{name} overlaps {arg}: outputs must not share memory with inputs")
    return out


def check_distinct_outputs(outs):
    """No two outputs may share memory."""
    for i, (n1, a) in enumerate(outs):
        for n2, b in outs[:i]:
            if a is not None and b is not None and np.may_share_memory(a, b):
                raise ValueError(f"{n1} overlaps {n2}: outputs must not share memory")
