"""libpynorm_cuda's argument checks and pynorm._cuda's row layouts, on the host:
no device, no CuPy. Every call here is refused before anything is launched (the
pointers are host addresses that a kernel never sees), and the layouts are
computed from shapes and strides alone. Skipped only where libpynorm_cuda cannot
be loaded.

Per-head views (pn_norm_options.H > 1): the checks are the C library's
(c_src/check.c): sizes, rows of an output overlapping along any of the three
axes, outputs over inputs other than the in-place pairs.
"""
import ml_dtypes
import numpy as np
import pytest

from pynorm import _cuda
from pynorm._lib import lib as CPU_LIB
from test_errors_doc import DOCUMENTED

try:
    FFI, LIB = _cuda.library()
    _SKIP = None
except RuntimeError as e:
    FFI = LIB = None
    _SKIP = f"libpynorm_cuda is not available: {e}"

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))

F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)
# a host buffer whose addresses stand in for device pointers (never dereferenced)
_MEM = np.zeros(1 << 16, np.uint8)
BASE = (_MEM.ctypes.data + 255) & ~255


def _ptr(byte_offset=0):
    return FFI.cast("void *", BASE + byte_offset)


def _opts(H, **head):
    o = FFI.new("pn_norm_options *")
    o.H = H
    for k, v in head.items():
        setattr(o.head, k, v)
    return o


def _rows(**fields):
    s = FFI.new("pn_strides *")
    for k, (b, t) in fields.items():
        getattr(s, k).b, getattr(s, k).t = b, t
    return s


def _rms(out_off, inp_off, B, T, C, strides, opts, rstd=None):
    return LIB.pn_cuda_rmsnorm_forward_ex(_ptr(out_off), rstd or FFI.NULL, _ptr(inp_off), FFI.NULL,
                                          B, T, C, 1e-6, LIB.PN_FLOAT32, LIB.PN_FLOAT32, strides or FFI.NULL, opts, FFI.NULL)


def _ln_bwd(dx_off, dy_off, x_off, B, T, C, strides, opts):
    return LIB.pn_cuda_layernorm_backward_ex(_ptr(dx_off), FFI.NULL, FFI.NULL, FFI.NULL, 0, _ptr(dy_off),
                                             _ptr(x_off), FFI.NULL, _ptr(60000), _ptr(62000), B, T, C, 0,
                                             LIB.PN_FLOAT32, LIB.PN_FLOAT32, strides, opts, FFI.NULL)


# (what, call, expected status name): each refused before any launch
def _cases():
    C, H = 8, 4                        # a (T, 3H, C) float32 qkv buffer; q = [:, :H], k = [:, H:2H]
    T, row = 3, 3 * H * C
    return [
        ("H < 0", lambda: _rms(20000, 0, 1, T, C, _rows(inp=(0, row)), _opts(-1, inp=C)), "PN_ERR_SIZE"),
        ("T * H overflows", lambda: _rms(20000, 0, 1, 1 << 40, C, None, _opts(1 << 40)), "PN_ERR_SIZE"),
        ("B * T * H * C overflows", lambda: _rms(20000, 0, 1 << 20, 1 << 20, C, None, _opts(1 << 24)),
         "PN_ERR_SIZE"),
        ("output heads overlap (head stride < C)",
         lambda: _rms(20000, 0, 1, T, C, _rows(inp=(0, row), out=(0, row)), _opts(H, inp=C, out=C - 1)),
         "PN_ERR_STRIDE"),
        ("output t rows run into the heads of the next t",
         lambda: _rms(20000, 0, 1, T, C, _rows(inp=(0, row), out=(0, 2 * C)), _opts(H, inp=C, out=C)),
         "PN_ERR_STRIDE"),
        ("y over x with another head stride",
         lambda: _rms(0, 0, 1, T, C, _rows(inp=(0, row), out=(0, row)), _opts(H, inp=C, out=2 * C)),
         "PN_ERR_ALIAS"),
        ("y over the k heads while reading the q heads (shifted view)",
         lambda: _rms(4 * C * 4, 0, 1, T, C, _rows(inp=(0, row), out=(0, row)), _opts(H, inp=C, out=C)),
         "PN_ERR_ALIAS"),
        ("rstd inside x's heads",
         lambda: _rms(20000, 0, 1, T, C, _rows(inp=(0, row)), _opts(H, inp=C), rstd=FFI.cast("float *", BASE + 4)),
         "PN_ERR_ALIAS"),
        ("a head stride that makes x start below address 0",
         lambda: _rms(20000, 0, 1, T, C, _rows(inp=(0, row)), _opts(H, inp=-(1 << 60))), "PN_ERR_SIZE"),
        ("backward: dx heads overlap",
         lambda: _ln_bwd(20000, 40000, 0, 1, T, C, _rows(inp=(0, row), dinp=(0, row)), _opts(H, inp=C, dinp=4)),
         "PN_ERR_STRIDE"),
        ("backward: dx over x's other heads",
         lambda: _ln_bwd(4 * C, 40000, 0, 1, T, C, _rows(inp=(0, row), dinp=(0, row)), _opts(H, inp=C, dinp=C)),
         "PN_ERR_ALIAS"),
    ]


@pytest.mark.parametrize("what,call,status", _cases(), ids=[c[0] for c in _cases()])
def test_per_head_arguments_refused_before_launch(what, call, status):
    got = call()
    assert got == getattr(LIB, status), (
        f"{what}: got {FFI.string(LIB.pn_cuda_status_string(got)).decode()}, expected {status}")


def _view(base_ptr, buf_shape, dtype, index, transpose=None):
    """A _Dev of numpy's view `index` of a C-contiguous buffer (shape, strides from
    numpy; the pointer moved by the view's offset from the buffer)."""
    host = np.empty(buf_shape, dtype)
    v = host[index]
    if transpose is not None:
        v = v.transpose(transpose)
    off = v.__array_interface__["data"][0] - host.__array_interface__["data"][0]
    return _cuda._Dev(base_ptr + off, v.shape, v.strides, np.dtype(dtype), 0, None)


_QKV = [  # (name, buffer shape, view index, transpose, expected H)
    ("3-D q of (T, Hq + 2Hk, D)", (7, 8 + 2 * 2, 64), (slice(None), slice(0, 8)), None, 1),
    ("4-D q of (B, S, H, D), S sliced", (2, 9, 12, 128), (slice(None), slice(0, 5), slice(0, 8)), None, 8),
    ("4-D k of (B, S, H, D), S sliced", (2, 9, 12, 128), (slice(None), slice(0, 5), slice(8, 10)), None, 2),
    ("(B, H, S, D): heads transposed before S", (2, 9, 12, 128), (slice(None), slice(None), slice(0, 8)),
     (0, 2, 1, 3), 9),
]


@pytest.mark.parametrize("name,shape,index,transpose,H", _QKV, ids=[c[0] for c in _QKV])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_qkv_views_are_addressed_with_no_copy(name, shape, index, transpose, H, dtype):
    """The row layout of an in-place norm of a q/k view: no copy, no temporary (the
    kernels read and write the view where it is), three strides where two do not do."""
    x = _view(BASE, shape, dtype, index, transpose)
    lead, C = x.shape[:-1], x.shape[-1]
    buffers = [("inp", "x", x, _cuda.IN), ("out", "out", x, _cuda.OUT)]
    B, T, s, devs, back, got_H, head = _cuda._row_layout(lead, buffers, (None, None), FFI, None)
    assert devs[0] is x and devs[1] is x and not back, f"{name}: a copy or a temporary was made"
    assert got_H == H, f"{name}: H = {got_H}, expected {H}"
    assert B * T * got_H == int(np.prod(lead)), f"{name}: {B} x {T} x {got_H} rows for a lead of {lead}"
    item = dtype.itemsize
    # every row of the view is where the layout says: row (b, t, k) at b*sb + t*st + k*sh
    want = sorted(sum(i * st // item for i, st in zip(idx, x.strides[:-1]))
                  for idx in np.ndindex(*lead))
    sh_in, sh_out = head.get("inp", 0), head.get("out", 0)
    assert sh_in == sh_out, f"{name}: x and out must get the same head stride in place"
    got = sorted(b * s.inp.b + t * s.inp.t + k * sh_in
                 for b in range(B) for t in range(T) for k in range(got_H))
    assert got == want, f"{name}: the rows addressed are not the view's"


# ---- the quantized forms: pn_cuda_*_quant_forward checks as the C library's ----------

def _quant(**kw):
    """pn_quant_params of both libraries: (CUDA's, the C library's)."""
    from pynorm._lib import ffi as cffi
    out = []
    for f in (FFI, cffi):
        p = f.new("pn_quant_params *")
        for k, v in kw.items():
            setattr(p, k, v)
        out.append(p)
    return out


def _both(q_off, s_off, x_off, B, T, C, quant_kw, null_quant=False, op="rms"):
    """Status of the CUDA and of the C library's quantized forward for the same
    arguments (host addresses in _MEM; every case is refused before a write)."""
    from pynorm._lib import ffi as cffi, lib as clib
    qs = _quant(**quant_kw)
    got = []
    for f, lib, qp, name in ((FFI, LIB, qs[0], "cuda"), (cffi, clib, qs[1], "c")):
        p = lambda off: f.NULL if off is None else f.cast("void *", BASE + off)
        sp = f.NULL if s_off is None else f.cast("float *", BASE + s_off)
        quant = f.NULL if null_quant else qp
        tail = (B, T, C, 1e-6, 0, 0, f.NULL, f.NULL, quant)
        if op == "rms":
            args = (p(q_off), sp, f.NULL, f.NULL, p(x_off), f.NULL, f.NULL) + tail
            fn = lib.pn_cuda_rmsnorm_quant_forward if name == "cuda" else lib.pn_rmsnorm_quant_forward
        else:
            args = (p(q_off), sp, f.NULL, f.NULL, f.NULL, p(x_off), f.NULL, f.NULL, f.NULL) + tail
            fn = lib.pn_cuda_layernorm_quant_forward if name == "cuda" else lib.pn_layernorm_quant_forward
        got.append(fn(*args, FFI.NULL) if name == "cuda" else fn(*args))
    return got


_QCASES = [  # (what, q offset, scales offset, quant params, expected)
    ("quant NULL", 8192, 16384, None, "PN_ERR_NULL"),
    ("qdtype out of range", 8192, 16384, dict(qdtype=7), "PN_ERR_ARG"),
    ("scale NaN", 8192, 16384, dict(scale=float("nan")), "PN_ERR_ARG"),
    ("scale < 0", 8192, 16384, dict(scale=-1.0), "PN_ERR_ARG"),
    ("scale underflows float32", 8192, None, dict(scale=1e-50), "PN_ERR_ARG"),
    ("scale_ub with int8", 8192, 16384, dict(scale_ub=1.0), "PN_ERR_ARG"),
    ("scale_ub with a static scale", 8192, None, dict(qdtype=1, scale=1.0, scale_ub=1.0), "PN_ERR_ARG"),
    ("group_size not dividing C", 8192, 16384, dict(group_size=7), "PN_ERR_ARG"),
    ("group_size with a static scale", 8192, None, dict(scale=1.0, group_size=8), "PN_ERR_ARG"),
    ("dynamic without scales", 8192, None, dict(), "PN_ERR_NULL"),
    ("q NULL", None, 16384, dict(), "PN_ERR_NULL"),
    ("q over x", 0, 16384, dict(), "PN_ERR_ALIAS"),
    ("scales over q", 8192, 8192 + 64, dict(group_size=8), "PN_ERR_ALIAS"),
    ("scales over x", 8192, 4, dict(), "PN_ERR_ALIAS"),
]


@pytest.mark.parametrize("op", ["rms", "layer"])
@pytest.mark.parametrize("what,q_off,s_off,kw,status", _QCASES, ids=[c[0] for c in _QCASES])
def test_quant_arguments_refused_as_the_c_library_does(op, what, q_off, s_off, kw, status):
    cuda, c = _both(q_off, s_off, 0, 2, 3, 64, kw or {}, null_quant=kw is None, op=op)
    assert cuda == getattr(LIB, status), (
        f"{what}: CUDA gives {FFI.string(LIB.pn_cuda_status_string(cuda)).decode()}, expected {status}")
    assert cuda == c, f"{what}: CUDA status {cuda}, the C library's {c}"


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_status_maps_to_the_cpu_librarys_exception(name):
    """A CUDA status raises what the same CPU status raises (docs/errors.md);
    a failed launch or CUDA runtime call is a RuntimeError naming the CUDA error."""
    with pytest.raises(DOCUMENTED[name]) as info:
        _cuda._check_status(FFI, LIB, getattr(CPU_LIB, name), "op")
    assert str(info.value).startswith("op: ")
    with pytest.raises(RuntimeError):
        _cuda._check_status(FFI, LIB, LIB.PN_CUDA_ERR_LAUNCH, "op")
    _cuda._check_status(FFI, LIB, 0, "op")
