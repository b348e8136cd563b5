"""The pynorm API for CUDA arrays, over libpynorm_cuda (cffi).

Inputs are CuPy arrays or any object with ``__cuda_array_interface__``
(PyTorch CUDA tensors, Numba device arrays, ...); results are CuPy arrays on
the device of x. Work is queued on CuPy's current stream for that device and
never waited for. pynorm._token routes here when ``is_cuda_array(x)``
(pynorm._spatial routes to pynorm._cuda_spatial, built on this module).

Importing this module needs neither CuPy nor CUDA: the library is loaded
(cffi ``dlopen``) and CuPy imported on the first call. The library is looked
for in $PYNORM_CUDA_LIBRARY, next to the C library that pynorm._lib loaded
(and in ../cuda_src of it, a build tree), then in pynorm/lib.

bfloat16: arrays whose typestr is "<V2" (what PyTorch and ml_dtypes write
for bfloat16) are read as bfloat16; bfloat16 results need a CuPy that knows
ml_dtypes.bfloat16 (CuPy 14 or later with ml_dtypes installed).
"""
import math
import numbers
import os
import sys
import threading

import ml_dtypes
import numpy as np

from ._arrays import (COPY, IN, INOUT, NEW, OUT, REPEAT, check_eps, check_options, gradient_outs, param_dtype,
                      row_pair, status_error, shares_memory, split_rows, split_rows3)

__all__ = ["is_cuda_array", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
           "layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward",
           "library", "library_path"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBNAME = {"darwin": "libpynorm_cuda.dylib", "win32": "pynorm_cuda.dll"}.get(sys.platform,
                                                                             "libpynorm_cuda.so")

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
_PN_DTYPE = {_F32: 0, _F16: 1, BFLOAT16: 2, _F64: 3}        # pn_dtype
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"
_PN_ACCUMULATE = 1

# Self-contained declarations (the typedefs of pynorm.h and the functions of
# pynorm_cuda.h); cudaStream_t is a pointer.
_CDEF = """
typedef enum {
    PN_OK = 0, PN_ERR_NULL = 1, PN_ERR_SIZE = 2, PN_ERR_DTYPE = 3, PN_ERR_EPS = 4,
    PN_ERR_STRIDE = 5, PN_ERR_ALIAS = 6, PN_ERR_SCRATCH = 7, PN_ERR_ALLOC = 8,
    PN_ERR_GROUPS = 9, PN_ERR_ARG = 10
} pn_status;
typedef enum { PN_FLOAT32 = 0, PN_FLOAT16 = 1, PN_BFLOAT16 = 2, PN_FLOAT64 = 3 } pn_dtype;
typedef struct { int64_t b; int64_t t; } pn_rows;
typedef struct { pn_rows inp; pn_rows out; pn_rows residual; pn_rows h; pn_rows dout; pn_rows dinp; } pn_strides;
typedef void *cudaStream_t;
#define PN_CUDA_ERR_LAUNCH 100
typedef struct { int64_t inp, out, residual, h, dout, dinp; } pn_head_strides;
typedef struct { double weight_offset; int rounding; int64_t H; pn_head_strides head; } pn_norm_options;
typedef struct { int qdtype; double scale; double scale_ub; int64_t group_size; } pn_quant_params;

const char *pn_cuda_version(void);
const char *pn_cuda_status_string(int status);
int pn_cuda_last_error(void);
const char *pn_cuda_last_error_string(void);
int pn_cuda_device_count(void);

pn_status pn_cuda_layernorm_forward(void *out, void *mean, void *rstd,
    const void *inp, const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, cudaStream_t stream);
pn_status pn_cuda_add_layernorm_forward(void *out, void *h, void *mean, void *rstd,
    const void *inp, const void *residual, const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, cudaStream_t stream);
size_t pn_cuda_layernorm_backward_scratch_size(int64_t B, int64_t T, int64_t C, pn_dtype dtype);
pn_status pn_cuda_layernorm_backward(void *dinp, void *dweight, void *dbias,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight, const void *mean, const void *rstd,
    int64_t B, int64_t T, int64_t C, int flags,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, cudaStream_t stream);

pn_status pn_cuda_rmsnorm_forward(void *out, void *rstd,
    const void *inp, const void *weight,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, cudaStream_t stream);
pn_status pn_cuda_add_rmsnorm_forward(void *out, void *h, void *rstd,
    const void *inp, const void *residual, const void *weight,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, cudaStream_t stream);
size_t pn_cuda_rmsnorm_backward_scratch_size(int64_t B, int64_t T, int64_t C, pn_dtype dtype);
pn_status pn_cuda_rmsnorm_backward(void *dinp, void *dweight,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight, const void *rstd,
    int64_t B, int64_t T, int64_t C, int flags,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, cudaStream_t stream);
pn_status pn_cuda_layernorm_forward_ex(void *out, void *mean, void *rstd,
    const void *inp, const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, const pn_norm_options *opts, cudaStream_t stream);
pn_status pn_cuda_add_layernorm_forward_ex(void *out, void *h, void *mean, void *rstd,
    const void *inp, const void *residual, const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, const pn_norm_options *opts, cudaStream_t stream);
pn_status pn_cuda_layernorm_backward_ex(void *dinp, void *dweight, void *dbias,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight, const void *mean, const void *rstd,
    int64_t B, int64_t T, int64_t C, int flags,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, const pn_norm_options *opts, cudaStream_t stream);
pn_status pn_cuda_rmsnorm_forward_ex(void *out, void *rstd,
    const void *inp, const void *weight,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, const pn_norm_options *opts, cudaStream_t stream);
pn_status pn_cuda_add_rmsnorm_forward_ex(void *out, void *h, void *rstd,
    const void *inp, const void *residual, const void *weight,
    int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, const pn_norm_options *opts, cudaStream_t stream);
pn_status pn_cuda_rmsnorm_backward_ex(void *dinp, void *dweight,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight, const void *rstd,
    int64_t B, int64_t T, int64_t C, int flags,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, const pn_norm_options *opts, cudaStream_t stream);
pn_status pn_cuda_rmsnorm_quant_forward(void *q, float *scales, void *h, void *rstd,
    const void *inp, const void *residual, const void *weight, int64_t B, int64_t T, int64_t C, double eps,
    pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides, const pn_norm_options *opts,
    const pn_quant_params *quant, cudaStream_t stream);
pn_status pn_cuda_layernorm_quant_forward(void *q, float *scales, void *h, void *mean, void *rstd,
    const void *inp, const void *residual, const void *weight, const void *bias,
    int64_t B, int64_t T, int64_t C, double eps, pn_dtype dtype, pn_dtype wdtype, const pn_strides *strides,
    const pn_norm_options *opts, const pn_quant_params *quant, cudaStream_t stream);
typedef enum { PN_NCHW = 0, PN_NHWC = 1 } pn_layout;
#define PN_BN_TRAINING 2
#define PN_BN_CUMULATIVE 4
pn_status pn_cuda_groupnorm_forward(void *out, void *mean, void *rstd,
    const void *inp, const void *weight, const void *bias,
    int64_t N, int64_t C, int64_t S, int64_t G, double eps,
    pn_layout layout, pn_dtype dtype, pn_dtype wdtype, cudaStream_t stream);
size_t pn_cuda_groupnorm_backward_scratch_size(int64_t N, int64_t C, int64_t S, int64_t G,
    pn_layout layout, pn_dtype dtype);
pn_status pn_cuda_groupnorm_backward(void *dinp, void *dweight, void *dbias,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight, const void *mean, const void *rstd,
    int64_t N, int64_t C, int64_t S, int64_t G, int flags,
    pn_layout layout, pn_dtype dtype, pn_dtype wdtype, cudaStream_t stream);
pn_status pn_cuda_batchnorm_forward(void *out, void *mean, void *rstd,
    void *running_mean, void *running_var,
    const void *inp, const void *weight, const void *bias,
    int64_t N, int64_t C, int64_t S, double eps, double momentum,
    int64_t num_batches_tracked, int flags,
    pn_layout layout, pn_dtype dtype, pn_dtype wdtype, pn_dtype rdtype, cudaStream_t stream);
size_t pn_cuda_batchnorm_backward_scratch_size(int64_t N, int64_t C, int64_t S,
    pn_layout layout, pn_dtype dtype);
pn_status pn_cuda_batchnorm_backward(void *dinp, void *dweight, void *dbias,
    void *scratch, size_t scratch_bytes,
    const void *dout, const void *inp, const void *weight, const void *mean, const void *rstd,
    int64_t N, int64_t C, int64_t S, int flags,
    pn_layout layout, pn_dtype dtype, pn_dtype wdtype, cudaStream_t stream);
"""

_lock = threading.Lock()
_loaded = None          # (ffi, lib) once loaded
library_path = None     # where libpynorm_cuda was loaded from


class CudaUnavailableError(NotImplementedError):
    """A CUDA array was given but the CUDA library or CuPy is missing (a
    NotImplementedError, hence a RuntimeError: the CUDA path is not available here)."""


# ---- routing ---------------------------------------------------------------------

def is_cuda_array(obj):
    """True for CuPy arrays and anything exposing __cuda_array_interface__.
    (A PyTorch CUDA tensor that requires grad refuses the interface with an
    error: it still counts as a CUDA array, and the call explains the refusal.)"""
    if obj is None or isinstance(obj, (np.ndarray, numbers.Number)):
        return False
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except Exception:       # the property exists but raised (not AttributeError)
        return True


# ---- loading ---------------------------------------------------------------------

def _candidates():
    env = os.environ.get("PYNORM_CUDA_LIBRARY")
    if env:
        return [env], True
    dirs = []
    try:
        from . import _lib
        cpu = getattr(_lib, "library_path", None)
        if cpu:
            d = os.path.dirname(os.path.abspath(cpu))
            dirs += [d, os.path.join(os.path.dirname(d), "cuda_src")]
    except ImportError:
        pass
    dirs.append(os.path.join(_HERE, "lib"))
    return [os.path.join(d, _LIBNAME) for d in dirs], False


def library():
    """(ffi, lib) of libpynorm_cuda, loaded on first use. Raises
    CudaUnavailableError (a RuntimeError) when it cannot be found or loaded."""
    global _loaded, library_path
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        from cffi import FFI
        paths, from_env = _candidates()
        found = [p for p in paths if os.path.exists(p)]
        if not found:
            where = "PYNORM_CUDA_LIBRARY=" + paths[0] if from_env else ", ".join(paths)
            raise CudaUnavailableError(
                f"pynorm: got a CUDA array, but the CUDA library {_LIBNAME} was not found "
                f"(looked for {where}). Build it with CMake and -DPYNORM_CUDA=ON (needs nvcc), "
                "or point PYNORM_CUDA_LIBRARY at it.")
        ffi = FFI()
        ffi.cdef(_CDEF)
        try:
            lib = ffi.dlopen(found[0], ffi.RTLD_NOW | getattr(ffi, "RTLD_NODELETE", 0))  # never unloaded: docs/reliability.md
        except OSError as e:
            raise CudaUnavailableError(f"pynorm: cannot load the CUDA library {found[0]}: {e}") from e
        library_path = found[0]
        _loaded = (ffi, lib)
        return _loaded


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise CudaUnavailableError(
            "pynorm: CUDA arrays need CuPy (pip install cupy-cuda12x or cupy-cuda13x, matching "
            f"your CUDA driver) to allocate the results; it could not be imported: {e}") from e
    return cupy


# ---- CUDA array views ----------------------------------------------------------------

class _Dev:
    """What the kernels need of a CUDA array: pointer, shape, byte strides,
    dtype, device; `obj` keeps the memory alive."""
    __slots__ = ("ptr", "shape", "strides", "dtype", "device", "obj", "readonly")

    def __init__(self, ptr, shape, strides, dtype, device, obj, readonly=False):
        self.ptr, self.shape, self.strides, self.dtype = ptr, tuple(shape), tuple(strides), dtype
        self.device, self.obj, self.readonly = device, obj, readonly

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def ndim(self):
        return len(self.shape)

    def span(self):
        """[lo, hi) byte range the array touches (None when empty)."""
        if self.size == 0:
            return None
        lo = hi = self.ptr
        for n, s in zip(self.shape, self.strides):
            if s < 0:
                lo += (n - 1) * s
            else:
                hi += (n - 1) * s
        return lo, hi + self.dtype.itemsize

    def c_contiguous(self):
        return self.strides == _c_strides(self.shape, self.dtype.itemsize) or self.size <= 1


def _c_strides(shape, itemsize):
    strides, acc = [], itemsize
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _typestr_dtype(typestr, descr):
    if typestr in ("<V2", "|V2", "V2"):       # bfloat16 as PyTorch and ml_dtypes spell it
        return BFLOAT16
    try:
        return np.dtype(typestr)
    except TypeError:
        return None


def _dev(obj, name, call):
    """A _Dev for a CuPy array or a __cuda_array_interface__ object."""
    cp = call.cp
    if isinstance(obj, cp.ndarray):
        return _Dev(obj.data.ptr, obj.shape, obj.strides, obj.dtype, obj.device.id, obj)
    if isinstance(obj, np.ndarray):
        raise ValueError(f"{name} is a numpy.ndarray (host memory) but x is a CUDA array: "
                         "all arrays of a call must be on the same device")
    try:
        cai = obj.__cuda_array_interface__
    except AttributeError:
        raise TypeError(f"{name} must be a CUDA array (CuPy, or an object with "
                        f"__cuda_array_interface__) like x, got {type(obj).__name__}") from None
    except Exception as e:     # e.g. a PyTorch tensor that requires grad
        raise TypeError(f"{name}: its __cuda_array_interface__ refused: {e}") from e
    if not isinstance(cai, dict) or any(k not in cai for k in ("typestr", "shape", "data")):
        raise TypeError(f"{name}: its __cuda_array_interface__ lacks typestr, shape or data")
    if cai.get("mask") is not None:
        raise TypeError(f"{name}: masked CUDA arrays are not supported")
    dtype = _typestr_dtype(cai["typestr"], cai.get("descr"))
    if dtype is None:
        raise TypeError(f"{name} has typestr {cai['typestr']!r}; expected {_DTYPE_NAMES}")
    shape = tuple(int(n) for n in cai["shape"])
    strides = cai.get("strides")
    strides = _c_strides(shape, dtype.itemsize) if strides is None else tuple(int(s) for s in strides)
    ptr, readonly = int(cai["data"][0]), bool(cai["data"][1])
    device = cp.cuda.Device().id
    if ptr and math.prod(shape):
        try:
            device = cp.cuda.runtime.pointerGetAttributes(ptr).device
        except Exception:       # not a device pointer CUDA knows: let the library find out
            pass
    d = _Dev(ptr, shape, strides, dtype, device, obj, readonly)
    stream = cai.get("stream") if cai.get("version", 0) >= 3 else None
    if stream:                  # v3: the producer's stream; ours waits for it before any use
        call.wait_for(int(stream))
    return d


def _as_cupy(d, cp):
    """A CuPy view of d's memory (bfloat16 seen as uint16 when CuPy lacks it),
    for copies."""
    if isinstance(d.obj, cp.ndarray):
        return d.obj
    carrier = d.dtype
    if carrier == BFLOAT16 and not _cupy_has_bfloat16(cp):
        carrier = np.dtype(np.uint16)
    lo, hi = d.span()
    mem = cp.cuda.UnownedMemory(lo, hi - lo, d.obj, d.device)
    return cp.ndarray(d.shape, carrier, cp.cuda.MemoryPointer(mem, d.ptr - lo), strides=d.strides)


_HAS_BF16 = None


def _cupy_has_bfloat16(cp):
    global _HAS_BF16
    if _HAS_BF16 is None:
        try:
            cp.empty(0, BFLOAT16)
            _HAS_BF16 = True
        except Exception:
            _HAS_BF16 = False
    return _HAS_BF16


def _contiguous_copy(d, cp):
    a = cp.ascontiguousarray(_as_cupy(d, cp))
    return _Dev(a.data.ptr, a.shape, a.strides, d.dtype, d.device, a)


def _empty(shape, dtype, cp):
    try:
        return cp.empty(shape, dtype)
    except Exception as e:
        if dtype == BFLOAT16:
            raise TypeError("bfloat16 results need a CuPy that supports ml_dtypes.bfloat16 "
                            f"(CuPy 14 or later, with ml_dtypes installed): {e}") from e
        raise


def _wrap_new(a):
    return _Dev(a.data.ptr, a.shape, a.strides, a.dtype, a.device.id, a)


# ---- argument checks (as pynorm._arrays, for CUDA arrays) ------------------------------

_check_eps = check_eps   # one rule for eps on every device


def _check_x(x, name, call):
    d = _dev(x, name, call)
    if d.dtype not in _PN_DTYPE:
        raise TypeError(f"{name} has dtype {d.dtype}; expected {_DTYPE_NAMES}")
    if d.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the normalized axis C), got a 0-d array")
    if d.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last axis (C = 0): there is nothing to normalize")
    return d


def _same_device(d, name, x):
    if d.device != x.device:
        raise ValueError(f"{name} is on CUDA device {d.device} but x is on device {x.device}")


def _check_same(a, name, x, call):
    if a is None:
        raise TypeError(f"{name} must be a CUDA array like x, got None")
    d = _dev(a, name, call)
    if d.shape != x.shape:
        raise ValueError(f"{name} has shape {d.shape}; expected x's shape {x.shape}")
    if d.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {d.dtype}; expected x's dtype {x.dtype}")
    _same_device(d, name, x)
    return d


def _check_param(p, name, x, call):
    if p is None:
        return None
    d = _dev(p, name, call)
    if d.dtype != x.dtype and d.dtype != _F32:
        raise TypeError(f"{name} has dtype {d.dtype}; expected x's dtype ({x.dtype}) or float32")
    if d.shape != (x.shape[-1],):
        raise ValueError(f"{name} has shape {d.shape}; expected ({x.shape[-1]},), the last axis of x")
    _same_device(d, name, x)
    return d if d.c_contiguous() else _contiguous_copy(d, call.cp)


def _stats_dtype(dtype):
    return _F64 if dtype == _F64 else _F32


def _check_stats(s, name, x, call):
    if s is None:
        raise TypeError(f"{name} must be a CUDA array (as the forward returns it), got None")
    d = _dev(s, name, call)
    if d.shape != x.shape[:-1]:
        raise ValueError(f"{name} has shape {d.shape}; expected x.shape[:-1] = {x.shape[:-1]}")
    if d.dtype != _stats_dtype(x.dtype):
        raise TypeError(f"{name} has dtype {d.dtype}; expected {_stats_dtype(x.dtype)} "
                        "(as the forward saves it)")
    _same_device(d, name, x)
    return d if d.c_contiguous() else _contiguous_copy(d, call.cp)


def _elem_strides(d):
    item = d.dtype.itemsize
    if d.shape[-1] > 1 and d.strides[-1] != item:
        return None
    if any(s % item for s in d.strides[:-1]):
        return None
    return [s // item for s in d.strides[:-1]]


def _same_view(a, b):
    """a and b are the same device memory seen the same way (in place)."""
    return (a is not None and b is not None and a.ptr == b.ptr and a.shape == b.shape and
            a.strides == b.strides and a.dtype == b.dtype)


def _check_out(o, name, shape, dtype, inputs, x, call, inplace_ok=()):
    """An out= array: right shape, dtype and device, writable, no element written
    twice and no memory shared with an input, except that it may be the very view
    of an input named in inplace_ok (in place). Any strides: where the kernels
    cannot write them, the call writes through a temporary (_row_layout, _dense_target)."""
    d = _dev(o, name, call)
    if d.shape != tuple(shape):
        raise ValueError(f"{name} has shape {d.shape}; expected {tuple(shape)}")
    if d.dtype != dtype:
        raise TypeError(f"{name} has dtype {d.dtype}; expected {np.dtype(dtype)}")
    if d.readonly:
        raise ValueError(f"{name} is read-only")
    _same_device(d, name, x)
    if d.size > 1 and any(s == 0 and n > 1 for n, s in zip(d.shape, d.strides)):
        raise ValueError(f"{name} has a zero stride along an axis of more than one element: "
                         "its elements overlap")
    for arg, a in inputs:
        if a is not None and _shares(d, a):
            if arg in inplace_ok and _same_view(d, a):
                continue
            if arg in inplace_ok:
                raise ValueError(f"{name} overlaps {arg} without being the same view of it: in place, "
                                 f"{name} must be {arg} itself (same memory, same strides)")
            raise ValueError(f"{name} overlaps {arg}: outputs must not share memory with inputs")
    return d


def _overlap(a, b):
    """Whether the byte ranges of a and b meet (what the library's alias check sees)."""
    sa, sb = a.span(), b.span()
    return sa is not None and sb is not None and sa[0] < sb[1] and sb[0] < sa[1]


class _Layout:
    """Address, shape and strides of a device array as a NumPy array interface:
    for np.shares_memory, which computes with them and never reads the memory."""
    __slots__ = ("__array_interface__",)

    def __init__(self, d):
        self.__array_interface__ = {"data": (d.ptr, False), "shape": d.shape, "strides": d.strides,
                                    "typestr": f"|V{d.dtype.itemsize}", "version": 3}


def _shares(a, b):
    """Whether a and b have an element in common (exactly: interleaved views of one
    buffer share nothing)."""
    return _overlap(a, b) and shares_memory(np.asarray(_Layout(a)), np.asarray(_Layout(b)))


def _check_distinct(outs):
    for i, (n1, a) in enumerate(outs):
        for n2, b in outs[:i]:
            if a is not None and b is not None and _shares(a, b):
                raise ValueError(f"{n1} overlaps {n2}: outputs must not share memory")


def _temporary(d, cp, copy):
    """A dense device array standing in for output d (holding d's values when the
    kernel adds into it)."""
    a = _as_cupy(d, cp)
    a = a.copy(order="C") if copy else cp.empty(d.shape, a.dtype)
    return _Dev(a.data.ptr, a.shape, a.strides, d.dtype, d.device, a)


def _write_back(back, cp):
    """After a successful launch, on the same stream: each temporary into its output."""
    for out, tmp in back:
        _as_cupy(out, cp)[...] = tmp.obj


def _dense_target(d, accumulate, back, others, cp):
    """What a kernel that writes dense buffers gets for output d: d itself when it
    is C-contiguous and its extent meets none of `others`, else a temporary."""
    if d is None or (d.c_contiguous() and not any(o is not None and _overlap(d, o) for o in others)):
        return d
    t = _temporary(d, cp, accumulate)
    back.append((d, t))
    return t


def _repeat_row(d, B, T, cp):
    """pynorm._arrays.repeat_row for a device array."""
    C = d.shape[-1]
    row = _as_cupy(d, cp)[(0,) * (d.ndim - 1)]
    n, pair = (B, (C, 0)) if B <= T else (T, (0, C))
    a = cp.ascontiguousarray(cp.broadcast_to(row, (n, C)))
    return _Dev(a.data.ptr, a.shape, a.strides, d.dtype, d.device, a), pair


def _row_layout(lead, buffers, others, ffi, cp):
    """B x T (x H) x C rows over buffers sharing the leading shape, as
    pynorm._arrays.row_layout(heads=True): buffers: (pn_strides field, argument name,
    _Dev, role IN, OUT, INOUT or NEW). Where no B x T split fits every buffer, a
    B x T x H split (pn_norm_options.H, head strides: per-head views of a fused qkv
    buffer) is used before any copy. Inputs the kernels cannot address are copied;
    outputs they cannot write where they are (strided last axis, no common split, an
    extent meeting another buffer's) are written through temporaries. Returns
    (B, T, pn_strides* or NULL, devs, back, H, {field: head stride})."""
    devs = [b[2] for b in buffers]
    if all(d.c_contiguous() for d in devs):
        return 1, math.prod(lead), ffi.NULL, devs, [], 1, {}
    back = []
    strides = [_elem_strides(d) for d in devs]

    def replace(i):
        d, role = buffers[i][2], buffers[i][3]
        if role == IN:
            devs[i] = _contiguous_copy(d, cp)
        else:
            devs[i] = _temporary(d, cp, role == INOUT)
            back.append((d, devs[i]))
        strides[i] = _elem_strides(devs[i])

    for i, b in enumerate(buffers):
        if b[3] == IN and strides[i] is None:
            replace(i)
    # in place: an output that is the same view as an input stays where it is while
    # that input does (the library allows exactly that pair)
    twin = {i: j for i, b in enumerate(buffers) if b[3] == OUT
            for j, c in enumerate(buffers) if c[3] == IN and _same_view(b[2], c[2])}
    for i, b in enumerate(buffers):
        if i in twin and devs[twin[i]] is buffers[twin[i]][2] and strides[i] is not None:
            continue
        if (b[3] == OUT or b[3] == INOUT) and (
                strides[i] is None or
                any(j != i and _overlap(devs[i], d) for j, d in enumerate(devs)) or
                any(o is not None and _overlap(devs[i], o) for o in others)):
            replace(i)

    def find():
        two = split_rows(lead, strides)
        if two is not None:
            return two[0], two[1], 1, [(sb, st, 0) for sb, st in two[2]]
        return split_rows3(lead, strides)
    split = find()
    for copy_inputs in (True, False):
        if split is not None:
            break
        for i, b in enumerate(buffers):
            if (b[3] == IN) == copy_inputs and not devs[i].c_contiguous():
                replace(i)
        split = find()
    B, T, H, triples = split
    C = devs[0].shape[-1]
    s = ffi.new("pn_strides *")
    head = {}
    for i, (sb, st, sh) in enumerate(triples):
        if devs[i].c_contiguous():
            continue                                    # {0, 0}: dense, whatever the split
        field, role = buffers[i][0], buffers[i][3]
        pair = row_pair(role, (B, T, H), (sb, st, sh), C)
        if pair is COPY:
            replace(i)
            continue
        if pair is REPEAT:
            devs[i], pair = _repeat_row(devs[i], B, T, cp)
        if H > 1:
            head[field] = sh
        row = getattr(s, field)
        row.b, row.t = pair
    return B, T, s, devs, back, H, head


# ---- calling the library ---------------------------------------------------------------

def _p(ffi, d):
    return ffi.NULL if d is None else ffi.cast("void *", d.ptr)


def _check_status(ffi, lib, status, what):
    if status == 0:
        return
    message = f"{what}: {ffi.string(lib.pn_cuda_status_string(status)).decode()}"
    if status == 100:
        raise RuntimeError(f"{message}: {ffi.string(lib.pn_cuda_last_error_string()).decode()}")
    raise status_error(status)(message)      # the CPU library's codes and exceptions


class _Call:
    """One call's context: library, CuPy, device and stream of x (check_x: how
    x is checked; the token norms' rule by default).

    Stream order (CUDA Array Interface v3): an input whose interface names a
    producer stream may still be being written there. The first use of any
    input is work queued on our stream (a copy to a dense layout, a copy to
    the host, a kernel), so our stream is made to wait for the producer's as
    soon as the input is seen: an event recorded on the producer stream and
    waited for by ours, queued before anything reads the array. Inputs seen
    before the call enters x's device (x itself) are waited for on entry,
    before anything is queued."""

    def __init__(self, x, check_x=None):
        self.ffi, self.lib = library()
        self.cp = _cupy()
        self.stream = None          # set on entry: the current stream of x's device
        self.producers = set()      # producer streams not yet waited for (until entry)
        self.x = (check_x or _check_x)(x, "x", self)
        self.device = self.cp.cuda.Device(self.x.device)

    def __enter__(self):
        self.device.__enter__()
        self.stream = self.cp.cuda.get_current_stream()
        self._wait_producers()
        return self

    def __exit__(self, *exc):
        return self.device.__exit__(*exc)

    def wait_for(self, producer):
        """An input's producer stream (its __cuda_array_interface__ v3
        "stream"): our stream waits for it now, or on entry."""
        self.producers.add(producer)
        if self.stream is not None:
            self._wait_producers()

    def _wait_producers(self):
        for s in sorted(self.producers):
            if s != self.stream.ptr:
                self.stream.wait_event(self.cp.cuda.ExternalStream(s).record())
        self.producers.clear()

    def stream_ptr(self):
        """Our stream (every producer is already waited for)."""
        self._wait_producers()
        return self.ffi.cast("cudaStream_t", self.stream.ptr)


def _result(d):
    return d.obj


def _options(ffi, weight_offset, rounding, H=1, head=None):
    o = ffi.new("pn_norm_options *")
    o.weight_offset, o.rounding, o.H = weight_offset, rounding, H
    for field, stride in (head or {}).items():
        setattr(o.head, field, stride)
    return o


def _forward(op, x, residual, weight, bias, eps, out, want_stats, weight_offset=0.0, rounding="once"):
    fused = residual is not None
    with _Call(x) as call:
        ffi, lib, cp, x = call.ffi, call.lib, call.cp, call.x
        if fused:
            residual = _check_same(residual, "residual", x, call)
        weight = _check_param(weight, "weight", x, call)
        bias = _check_param(bias, "bias", x, call)
        wdtype = param_dtype(weight, bias)
        eps = _check_eps(eps, x.dtype)
        offset, rmode = check_options(weight_offset, rounding, weight)
        lead, C = x.shape[:-1], x.shape[-1]
        inputs = (("x", x), ("residual", residual), ("weight", weight), ("bias", bias))
        if fused:
            if out is None:
                out = (None, None)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("out must be a tuple (y_out, h_out) for the fused ops")
            y_out, h_out = out
        else:
            y_out, h_out = out, None
        inplace = ("x", "residual")      # y and h each over x or the residual, as the same views
        if y_out is not None:
            y_out = _check_out(y_out, "out", x.shape, x.dtype, inputs, x, call, inplace)
        if h_out is not None:
            h_out = _check_out(h_out, "h out", x.shape, x.dtype, inputs, x, call, inplace)
            _check_distinct([("out", y_out), ("h out", h_out)])
        y = y_out if y_out is not None else _wrap_new(_empty(x.shape, x.dtype, cp))
        h = (h_out if h_out is not None else _wrap_new(_empty(x.shape, x.dtype, cp))) if fused else None
        sdt = _stats_dtype(x.dtype)
        mean = _wrap_new(_empty(lead, sdt, cp)) if want_stats and op == "layer" else None
        rstd = _wrap_new(_empty(lead, sdt, cp)) if want_stats else None
        if y.size:
            buffers = [("inp", "x", x, IN), ("out", "out", y, NEW if y_out is None else OUT)]
            if fused:
                buffers += [("residual", "residual", residual, IN),
                            ("h", "h out", h, NEW if h_out is None else OUT)]
            B, T, strides, devs, back, H, head = _row_layout(lead, buffers, (weight, bias), ffi, cp)
            opts = _options(ffi, offset, rmode, H, head)
            dt, wdt = _PN_DTYPE[x.dtype], _PN_DTYPE[wdtype]
            xp, yp, s = _p(ffi, devs[0]), _p(ffi, devs[1]), call.stream_ptr()
            if op == "layer":
                if fused:
                    status = lib.pn_cuda_add_layernorm_forward_ex(
                        yp, _p(ffi, devs[3]), _p(ffi, mean), _p(ffi, rstd), xp, _p(ffi, devs[2]),
                        _p(ffi, weight), _p(ffi, bias), B, T, C, eps, dt, wdt, strides, opts, s)
                else:
                    status = lib.pn_cuda_layernorm_forward_ex(
                        yp, _p(ffi, mean), _p(ffi, rstd), xp, _p(ffi, weight), _p(ffi, bias),
                        B, T, C, eps, dt, wdt, strides, opts, s)
            else:
                if fused:
                    status = lib.pn_cuda_add_rmsnorm_forward_ex(
                        yp, _p(ffi, devs[3]), _p(ffi, rstd), xp, _p(ffi, devs[2]), _p(ffi, weight),
                        B, T, C, eps, dt, wdt, strides, opts, s)
                else:
                    status = lib.pn_cuda_rmsnorm_forward_ex(
                        yp, _p(ffi, rstd), xp, _p(ffi, weight), B, T, C, eps, dt, wdt, strides, opts, s)
            _check_status(ffi, lib, status, f"{'add_' if fused else ''}{op}_norm")
            _write_back(back, cp)
        return (_result(y), _result(h) if h is not None else None,
                _result(mean) if mean is not None else None, _result(rstd) if rstd is not None else None)


def _backward(op, dy, x, mean, rstd, weight, out, accumulate, weight_offset=0.0, rounding="once"):
    with _Call(x) as call:
        ffi, lib, cp, x = call.ffi, call.lib, call.cp, call.x
        dy = _check_same(dy, "dy", x, call)
        mean = _check_stats(mean, "mean", x, call) if op == "layer" else None
        rstd = _check_stats(rstd, "rstd", x, call)
        weight = _check_param(weight, "weight", x, call)
        offset, rmode = check_options(weight_offset, rounding, weight)
        wdtype = weight.dtype if weight is not None else _F32
        lead, C = x.shape[:-1], x.shape[-1]
        names = ("dx", "dweight", "dbias") if op == "layer" else ("dx", "dweight")
        out = gradient_outs(out, accumulate, names)
        inputs = (("dy", dy), ("x", x), ("mean", mean), ("rstd", rstd), ("weight", weight))
        shapes = (x.shape, (C,), (C,))
        dtypes = (x.dtype, wdtype, wdtype)
        grads = []
        for name, o, shape, dtype in zip(names, out, shapes, dtypes):
            if o is None:
                grads.append(_wrap_new(_empty(shape, dtype, cp)))
            else:
                grads.append(_check_out(o, f"out ({name})", shape, dtype, inputs, x, call))
        _check_distinct(list(zip(names, grads)))
        if x.size == 0:                 # no rows: the parameter gradients are sums over nothing
            if not accumulate:
                for g in grads[1:]:
                    _as_cupy(g, cp)[...] = 0
        else:
            dx_role = INOUT if accumulate else (OUT if out[0] is not None else NEW)
            B, T, strides, devs, back, H, head = _row_layout(
                lead, [("dout", "dy", dy, IN), ("inp", "x", x, IN), ("dinp", "out (dx)", grads[0], dx_role)],
                (weight, mean, rstd, *grads[1:]), ffi, cp)
            opts = _options(ffi, offset, rmode, H, head)
            # dweight/dbias given in out=: dense C values apart from every other buffer of the call
            targets = [devs[2]] + grads[1:]
            for i in range(1, len(targets)):
                if out[i] is not None:
                    others = (*devs, weight, mean, rstd, *(t for j, t in enumerate(targets) if j not in (0, i)))
                    targets[i] = _dense_target(targets[i], accumulate, back, others, cp)
            flags = _PN_ACCUMULATE if accumulate else 0
            dt, wdt = _PN_DTYPE[x.dtype], _PN_DTYPE[wdtype]
            if op == "layer":
                nbytes = lib.pn_cuda_layernorm_backward_scratch_size(B, T * H, C, dt)
            else:
                nbytes = lib.pn_cuda_rmsnorm_backward_scratch_size(B, T * H, C, dt)
            # from CuPy's pool, stream-ordered: freed after the launch, reused only
            # by later work on this stream
            scratch = cp.empty(max(int(nbytes), 16), dtype=cp.uint8)
            sp, s = ffi.cast("void *", scratch.data.ptr), call.stream_ptr()
            if op == "layer":
                status = lib.pn_cuda_layernorm_backward_ex(
                    _p(ffi, targets[0]), _p(ffi, targets[1]), _p(ffi, targets[2]), sp, scratch.nbytes,
                    _p(ffi, devs[0]), _p(ffi, devs[1]), _p(ffi, weight), _p(ffi, mean), _p(ffi, rstd),
                    B, T, C, flags, dt, wdt, strides, opts, s)
            else:
                status = lib.pn_cuda_rmsnorm_backward_ex(
                    _p(ffi, targets[0]), _p(ffi, targets[1]), sp, scratch.nbytes,
                    _p(ffi, devs[0]), _p(ffi, devs[1]), _p(ffi, weight), _p(ffi, rstd),
                    B, T, C, flags, dt, wdt, strides, opts, s)
            _check_status(ffi, lib, status, f"{op}_norm_backward")
            _write_back(back, cp)
        res = tuple(_result(g) for g in grads)
        return res if op == "layer" else (*res, None)


# ---- the public functions (same signatures as pynorm's) ----------------------------------

def norm_quant(op, x, weight, bias, eps, residual, weight_offset, rounding, check_quant):
    """rms_norm_quant / layer_norm_quant on CUDA arrays (pynorm._token's checks:
    check_quant(x) gives (pn_quant_params of the C library, q dtype, scales shape)).
    q is int8, or float8_e4m3fn where CuPy has that dtype (else uint8 holding its
    bits); scales float32; h = round(x + residual) with a residual."""
    with _Call(x) as call:
        ffi, lib, cp, x = call.ffi, call.lib, call.cp, call.x
        if residual is not None:
            residual = _check_same(residual, "residual", x, call)
        weight = _check_param(weight, "weight", x, call)
        bias = _check_param(bias, "bias", x, call)
        wdtype = param_dtype(weight, bias)
        eps = _check_eps(eps, x.dtype)
        offset, rmode = check_options(weight_offset, rounding, weight)
        cpu_quant, qdt, sshape = check_quant(x)
        quant = ffi.new("pn_quant_params *")
        quant.qdtype, quant.scale = cpu_quant.qdtype, cpu_quant.scale
        quant.scale_ub, quant.group_size = cpu_quant.scale_ub, cpu_quant.group_size
        lead, C = x.shape[:-1], x.shape[-1]
        q = cp.empty(x.shape, np.uint8)
        scales = cp.empty(sshape, np.float32)
        h = _wrap_new(_empty(x.shape, x.dtype, cp)) if residual is not None else None
        if q.size:
            if quant.scale:
                scales[...] = np.float32(quant.scale)
            buffers = [("inp", "x", x, IN)]
            if residual is not None:
                buffers += [("residual", "residual", residual, IN), ("h", "h", h, NEW)]
            B, T, strides, devs, back, H, head = _row_layout(lead, buffers, (weight, bias), ffi, cp)
            opts = _options(ffi, offset, rmode, H, head)
            dt, wdt = _PN_DTYPE[x.dtype], _PN_DTYPE[wdtype]
            qp = ffi.cast("void *", q.data.ptr)
            sp = ffi.cast("float *", scales.data.ptr) if not quant.scale else ffi.NULL
            res_p = _p(ffi, devs[1]) if residual is not None else ffi.NULL
            h_p = _p(ffi, devs[2]) if residual is not None else ffi.NULL
            s = call.stream_ptr()
            if op == "layer":
                status = lib.pn_cuda_layernorm_quant_forward(
                    qp, sp, h_p, ffi.NULL, ffi.NULL, _p(ffi, devs[0]), res_p, _p(ffi, weight), _p(ffi, bias),
                    B, T, C, eps, dt, wdt, strides, opts, quant, s)
            else:
                status = lib.pn_cuda_rmsnorm_quant_forward(
                    qp, sp, h_p, ffi.NULL, _p(ffi, devs[0]), res_p, _p(ffi, weight),
                    B, T, C, eps, dt, wdt, strides, opts, quant, s)
            _check_status(ffi, lib, status, f"{op}_norm_quant")
            _write_back(back, cp)
        try:
            q = q.view(qdt)
        except Exception:      # a CuPy without this dtype (float8): the bits, as uint8
            pass
        return (q, scales) if residual is None else (q, scales, _result(h))


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, weight_offset=0.0, rounding="once", out=None):
    """LayerNorm over the last axis of a CUDA array."""
    return _forward("layer", x, None, weight, bias, eps, out, False, weight_offset, rounding)[0]


def rms_norm(x, weight=None, eps=None, *, weight_offset=0.0, rounding="once", out=None):
    """RMSNorm over the last axis of a CUDA array."""
    return _forward("rms", x, None, weight, None, eps, out, False, weight_offset, rounding)[0]


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, *, weight_offset=0.0, rounding="once",
                   out=None):
    """h = x + residual, y = layer_norm(h): returns (y, h)."""
    if residual is None:
        raise TypeError("residual must be a CUDA array like x, got None")
    y, h, _, _ = _forward("layer", x, residual, weight, bias, eps, out, False, weight_offset, rounding)
    return y, h


def add_rms_norm(x, residual, weight=None, eps=None, *, weight_offset=0.0, rounding="once", out=None):
    """h = x + residual, y = rms_norm(h): returns (y, h)."""
    if residual is None:
        raise TypeError("residual must be a CUDA array like x, got None")
    y, h, _, _ = _forward("rms", x, residual, weight, None, eps, out, False, weight_offset, rounding)
    return y, h


def layer_norm_forward(x, weight=None, bias=None, eps=1e-5, *, weight_offset=0.0, rounding="once"):
    """Returns (y, mean, rstd)."""
    y, _, mean, rstd = _forward("layer", x, None, weight, bias, eps, None, True, weight_offset, rounding)
    return y, mean, rstd


def layer_norm_backward(dy, x, mean, rstd, weight=None, *, weight_offset=0.0, rounding="once", out=None,
                        accumulate=False):
    """Returns (dx, dweight, dbias)."""
    return _backward("layer", dy, x, mean, rstd, weight, out, accumulate, weight_offset, rounding)


def rms_norm_forward(x, weight=None, eps=None, *, weight_offset=0.0, rounding="once"):
    """Returns (y, rstd)."""
    y, _, _, rstd = _forward("rms", x, None, weight, None, eps, None, True, weight_offset, rounding)
    return y, rstd


def rms_norm_backward(dy, x, rstd, weight=None, *, weight_offset=0.0, rounding="once", out=None,
                      accumulate=False):
    """Returns (dx, dweight)."""
    dx, dweight, _ = _backward("rms", dy, x, None, rstd, weight, out, accumulate, weight_offset, rounding)
    return dx, dweight
