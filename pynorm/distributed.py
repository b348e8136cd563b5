"""pynorm on torch.distributed: tensor-parallel LayerNorm/RMSNorm and synchronized BatchNorm.

    import pynorm.distributed as pnd
    y_shard = pnd.layer_norm(x_shard, w_shard, b_shard, group=tp_group)   # C split across tp_group
    y_shard = pnd.rms_norm(x_shard, w_shard, group=tp_group)
    model = pnd.convert_sync_batchnorm(model)                              # data parallel BatchNorm

- ``layer_norm`` / ``rms_norm`` (and the modules ``LayerNorm`` / ``RMSNorm``): x_shard
  holds this rank's slice of the last axis; slices may differ in width. Exactly one
  ``all_reduce`` in the forward and one in the backward, for LayerNorm as for RMSNorm.
- ``SyncBatchNorm``: torch.nn.SyncBatchNorm's results (running statistics included)
  with one ``all_reduce`` for the statistics in the forward and one in the backward;
  ``convert_sync_batchnorm`` swaps a model's BatchNorm layers for it.

The communication is torch.distributed's (gloo on CPU, NCCL on GPU): pynorm only
computes. Each forward exchanges one float64 buffer laid out as

    [header: world_size x 4] [data]

where every rank writes its own header slot (a status code, its row count, its
shard width and one detail) and its own data; the buffer is zero elsewhere, so
the sum that all_reduce computes delivers every slot exactly (adding zeros is
exact). LayerNorm's data is one slot per rank of (mean, M2) per row, the shard's
exact statistics, which every rank combines in rank order (Chan's formula, in C):
no cancellation on rows with a large mean and a tiny spread, and the same bits
on every rank. RMSNorm's data is the per-row sum of x^2 (a plain sum: no
cancellation). The backward exchanges (sum g, sum g * xhat) per row (one value
for RMSNorm), plainly summed. A rank whose arguments are wrong (a weight that
does not match its shard, a bad dtype, ...) still takes part in the all_reduce
with an error code in its header slot, so every rank raises the same ValueError
instead of waiting for it. (Tensors whose row counts differ between ranks make
the all_reduce itself mismatched, which torch.distributed reports or, with
NCCL, may hang on: the row count must agree.)

Importing this module imports torch (``import pynorm`` does not).
"""

import math
import numbers
import threading

import torch
import torch.distributed as dist

from ._lib import ffi as _cffi, lib as _clib
from .torch import batch_norm as _local_batch_norm
from .torch._backend import Backend, CPU, backend_for, empty, token_layout

__all__ = ["layer_norm", "rms_norm", "LayerNorm", "RMSNorm", "SyncBatchNorm", "convert_sync_batchnorm",
           "shard_bounds", "bytes_per_row", "print_bytes_per_row"]

_F64 = torch.float64
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_H = 4                      # header doubles per rank: code, rows, width, detail

# error codes written into a rank's header slot (detail in the 4th value)
_ERR = {
    1: "x_shard has an unsupported dtype; expected float32, float16, bfloat16 or float64",
    2: "x_shard has an empty last axis (a shard of width 0)",
    3: "weight_shard has {d:.0f} elements; expected the shard's width {w:.0f} (x_shard.shape[-1])",
    4: "bias_shard has {d:.0f} elements; expected the shard's width {w:.0f} (x_shard.shape[-1])",
    5: "weight/bias dtype does not match x_shard's dtype or float32 (or weight and bias differ)",
    6: "weight/bias is on another device than x_shard",
    7: "eps must be finite and >= 0",
    8: "the gradient has another shape, dtype or device than the output",
    9: "input has {d:.0f} channels; expected num_features = {w:.0f}",
    10: "input has fewer than 2 dimensions",
}
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


# ---- the libraries --------------------------------------------------------------------

_CUDA_CDEF = """
typedef struct { int64_t b; int64_t t; } pn_rows;
typedef struct { pn_rows inp; pn_rows out; pn_rows residual; pn_rows h; pn_rows dout; pn_rows dinp; } pn_strides;
const char *pn_cuda_status_string(int status);
const char *pn_cuda_last_error_string(void);
size_t pn_cuda_layernorm_backward_scratch_size(int64_t B, int64_t T, int64_t C, int dtype);
size_t pn_cuda_rmsnorm_backward_scratch_size(int64_t B, int64_t T, int64_t C, int dtype);
int pn_cuda_layernorm_shard_stats(double *part, const void *inp, int64_t B, int64_t T, int64_t C,
                                  int dtype, const pn_strides *strides, void *stream);
int pn_cuda_layernorm_shard_combine(double *mean, double *rstd, const double *parts, const int64_t *widths,
                                    int64_t nshards, int64_t rows, double eps, void *stream);
int pn_cuda_layernorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
                                  const double *mean, const double *rstd, int64_t B, int64_t T, int64_t C,
                                  int dtype, int wdtype, const pn_strides *strides, void *stream);
int pn_cuda_layernorm_shard_backward_sums(double *sums, const void *dout, const void *inp, const void *weight,
                                          const double *mean, const double *rstd, int64_t B, int64_t T, int64_t C,
                                          int dtype, int wdtype, const pn_strides *strides, void *stream);
int pn_cuda_layernorm_shard_backward(void *dinp, void *dweight, void *dbias, void *scratch, size_t scratch_bytes,
                                     const void *dout, const void *inp, const void *weight,
                                     const double *mean, const double *rstd, const double *sums,
                                     int64_t B, int64_t T, int64_t C, int64_t C_total, int flags,
                                     int dtype, int wdtype, const pn_strides *strides, void *stream);
int pn_cuda_rmsnorm_shard_stats(double *part, const void *inp, int64_t B, int64_t T, int64_t C,
                                int dtype, const pn_strides *strides, void *stream);
int pn_cuda_rmsnorm_shard_combine(double *rstd, const double *parts, const int64_t *widths,
                                  int64_t nshards, int64_t rows, double eps, void *stream);
int pn_cuda_rmsnorm_shard_apply(void *out, const void *inp, const void *weight, const double *rstd,
                                int64_t B, int64_t T, int64_t C, int dtype, int wdtype,
                                const pn_strides *strides, void *stream);
int pn_cuda_rmsnorm_shard_backward_sums(double *sums, const void *dout, const void *inp, const void *weight,
                                        const double *rstd, int64_t B, int64_t T, int64_t C,
                                        int dtype, int wdtype, const pn_strides *strides, void *stream);
int pn_cuda_rmsnorm_shard_backward(void *dinp, void *dweight, void *scratch, size_t scratch_bytes,
                                   const void *dout, const void *inp, const void *weight,
                                   const double *rstd, const double *sums,
                                   int64_t B, int64_t T, int64_t C, int64_t C_total, int flags,
                                   int dtype, int wdtype, const pn_strides *strides, void *stream);
int pn_cuda_batchnorm_shard_stats(double *part, const void *inp, int64_t N, int64_t C, int64_t S,
                                  int layout, int dtype, void *stream);
int pn_cuda_batchnorm_shard_combine(double *mean, double *rstd, void *running_mean, void *running_var,
                                    const double *parts, const int64_t *counts, int64_t nshards, int64_t C,
                                    double eps, double momentum, int64_t num_batches_tracked, int flags,
                                    int rdtype, void *stream);
int pn_cuda_batchnorm_shard_apply(void *out, const void *inp, const void *weight, const void *bias,
                                  const double *mean, const double *rstd, int64_t N, int64_t C, int64_t S,
                                  int layout, int dtype, int wdtype, void *stream);
int pn_cuda_batchnorm_shard_backward_sums(double *sums, const void *dout, const void *inp, const double *mean,
                                          int64_t N, int64_t C, int64_t S, int layout, int dtype, void *stream);
int pn_cuda_batchnorm_shard_backward(void *dinp, void *dweight, void *dbias, const void *dout, const void *inp,
                                     const void *weight, const double *mean, const double *rstd,
                                     const double *local_sums, const double *sums, int64_t count,
                                     int64_t N, int64_t C, int64_t S, int flags, int layout, int dtype,
                                     int wdtype, void *stream);
"""

_cuda_lock = threading.Lock()
_cuda_be = None


def _cuda_backend():
    """The CUDA library's sharded functions (widths/counts arrays in host memory)."""
    global _cuda_be
    with _cuda_lock:
        if _cuda_be is None:
            from cffi import FFI
            from . import _cuda
            _cuda.library()                     # finds and checks the library; raises if absent
            ffi = FFI()
            ffi.cdef(_CUDA_CDEF)
            lib = ffi.dlopen(_cuda.library_path, ffi.RTLD_NOW | getattr(ffi, "RTLD_NODELETE", 0))  # never unloaded: docs/reliability.md
            _cuda_be = Backend(ffi, lib, "pn_cuda_",
                               lambda s: ffi.string(lib.pn_cuda_status_string(s)).decode(),
                               cuda=True, needs_scratch=True)
        return _cuda_be


def _backend(t):
    if t.device.type == "cuda":
        return _cuda_backend()
    return backend_for(t, "distributed")


def _at(be, t, offset):
    """A pointer `offset` elements into tensor t."""
    return be.ffi.cast("void *", t.data_ptr() + offset * t.element_size())


def _int64s(be, values):
    return be.ffi.new("int64_t[]", [int(v) for v in values])


# ---- the one collective ------------------------------------------------------------------

def _group_info(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("pynorm.distributed: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


def _exchange(what, device, group, P, rank, header, ndata, fill):
    """One all_reduce (sum) of [P x _H header | ndata data] float64 values. This rank
    writes header (its slot) and, when its code is 0, its data through fill(buf,
    offset). Returns (headers as a list of P lists, buf, offset of the data). Raises
    the same ValueError on every rank when any rank reported an error."""
    buf = torch.zeros(P * _H + ndata, dtype=_F64, device=device)
    buf[rank * _H:(rank + 1) * _H] = torch.tensor(header, dtype=_F64)
    if header[0] == 0 and ndata:
        fill(buf, P * _H)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    headers = buf[:P * _H].view(P, _H).tolist()
    bad = [(r, h) for r, h in enumerate(headers) if h[0] != 0]
    if bad:
        msgs = [f"rank {r}: " + _ERR.get(int(h[0]), "error {c:.0f}").format(c=h[0], w=h[2], d=h[3])
                for r, h in bad]
        raise ValueError(f"pynorm.distributed.{what}: " + "; ".join(msgs))
    rows = {int(h[1]) for h in headers}
    if len(rows) > 1:
        raise ValueError(f"pynorm.distributed.{what}: the ranks disagree on the number of rows: "
                         f"{[int(h[1]) for h in headers]}")
    return headers, buf, P * _H


def _check_eps(eps):
    return not (isinstance(eps, bool) or not isinstance(eps, numbers.Real)
                or not math.isfinite(float(eps)) or float(eps) < 0)


# ---- tensor-parallel LayerNorm / RMSNorm ----------------------------------------------------

def _token_local_check(x, weight, bias, eps):
    """(code, detail) of this rank's arguments: 0 when they are fine."""
    if x.dtype not in _DTYPES:
        return 1, -1
    C = x.shape[-1]
    if C == 0:
        return 2, 0
    for code, p in ((3, weight), (4, bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.shape[0] != C:
            return code, p.numel() if isinstance(p, torch.Tensor) else -1
    for p in (weight, bias):
        if p is not None and p.dtype not in (x.dtype, torch.float32):
            return 5, 0
        if p is not None and p.device != x.device:
            return 6, 0
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return 5, 0
    if not _check_eps(eps):
        return 7, 0
    return 0, 0


def _check_x(what, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pynorm.distributed.{what}: x_shard must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"pynorm.distributed.{what}: x_shard must have at least one axis")


def _token_forward(op, x, weight, bias, eps, group):
    what = "layer_norm" if op == "layer" else "rms_norm"
    P, rank = _group_info(group)
    code, detail = _token_local_check(x, weight, bias, eps)
    lead, C = tuple(x.shape[:-1]), x.shape[-1]
    rows = math.prod(lead)
    ok = code == 0 and rows > 0
    be = _backend(x) if ok else None
    if ok:
        weight = None if weight is None else weight.detach().contiguous()
        bias = None if bias is None else bias.detach().contiguous()
        B, T, strides, (xin,) = token_layout(be, lead, [("inp", x.detach())])
        dt = be.pn_dtype[x.dtype]
    per = 2 if op == "layer" else 1
    ndata = P * rows * 2 if op == "layer" else rows        # LayerNorm: slots; RMSNorm: summed

    def fill(buf, off):
        if op == "layer":
            be.call("layernorm_shard_stats", what, x.device, _at(be, buf, off + rank * rows * per),
                    be.ptr(xin), B, T, C, dt, strides)
        else:
            be.call("rmsnorm_shard_stats", what, x.device, _at(be, buf, off), be.ptr(xin), B, T, C, dt, strides)

    headers, buf, off = _exchange(what, x.device, group, P, rank, [code, rows, C, detail], ndata, fill)
    widths = [int(h[2]) for h in headers]
    C_total = sum(widths)
    y = empty(x.shape, x.dtype, x.device)
    mean = torch.empty(lead, dtype=_F64, device=x.device) if op == "layer" else None
    rstd = torch.empty(lead, dtype=_F64, device=x.device)
    if rows == 0:
        return y, mean, rstd, C_total, (B, T) if ok else (0, 0)
    eps = float(eps)
    wdt = be.pn_dtype[weight.dtype if weight is not None else (bias.dtype if bias is not None else torch.float32)]
    p = be.ptr
    if op == "layer":
        be.call("layernorm_shard_combine", what, x.device, p(mean), p(rstd), _at(be, buf, off),
                _int64s(be, widths), P, rows, eps)
        be.call("layernorm_shard_apply", what, x.device, p(y), p(xin), p(weight), p(bias), p(mean), p(rstd),
                B, T, C, dt, wdt, strides)
    else:
        be.call("rmsnorm_shard_combine", what, x.device, p(rstd), _at(be, buf, off), _int64s(be, [C_total]),
                1, rows, eps)
        be.call("rmsnorm_shard_apply", what, x.device, p(y), p(xin), p(weight), p(rstd), B, T, C, dt, wdt, strides)
    return y, mean, rstd, C_total, (B, T)


def _token_backward(op, dy, x, weight, mean, rstd, C_total, group, need_dx, need_dw, need_db):
    what = ("layer_norm" if op == "layer" else "rms_norm") + " backward"
    P, rank = _group_info(group)
    lead, C = tuple(x.shape[:-1]), x.shape[-1]
    rows = math.prod(lead)
    code = 0 if (dy.shape == x.shape and dy.dtype == x.dtype and dy.device == x.device) else 8
    be = _backend(x)
    weight = None if weight is None else weight.contiguous()     # the kernels read C dense values
    per = 2 if op == "layer" else 1
    if code == 0 and rows:
        B, T, strides, (dyin, xin) = token_layout(be, lead, [("dout", dy), ("inp", x)])
        dt = be.pn_dtype[x.dtype]
        wdt = be.pn_dtype[weight.dtype if weight is not None else torch.float32]
    p = be.ptr

    def fill(buf, off):
        if op == "layer":
            be.call("layernorm_shard_backward_sums", what, x.device, _at(be, buf, off), p(dyin), p(xin), p(weight),
                    p(mean), p(rstd), B, T, C, dt, wdt, strides)
        else:
            be.call("rmsnorm_shard_backward_sums", what, x.device, _at(be, buf, off), p(dyin), p(xin), p(weight),
                    p(rstd), B, T, C, dt, wdt, strides)

    _, buf, off = _exchange(what, x.device, group, P, rank, [code, rows, C, 0], rows * per, fill)
    wdtype = weight.dtype if weight is not None else torch.float32
    dx = empty(x.shape, x.dtype, x.device) if need_dx else None
    dw = torch.empty((C,), dtype=wdtype, device=x.device) if need_dw else None
    db = torch.empty((C,), dtype=wdtype, device=x.device) if need_db else None
    if rows == 0:
        for g in (dw, db):
            if g is not None:
                g.zero_()
        return dx, dw, db
    if dx is None and dw is None and db is None:
        return dx, dw, db
    sc, nbytes, _keep = be.scratch(("layernorm" if op == "layer" else "rmsnorm") + "_backward_scratch_size",
                                   x.device, B, T, C, dt)
    sums = _at(be, buf, off)
    if op == "layer":
        be.call("layernorm_shard_backward", what, x.device, p(dx), p(dw), p(db), sc, nbytes, p(dyin), p(xin),
                p(weight), p(mean), p(rstd), sums, B, T, C, C_total, 0, dt, wdt, strides)
    else:
        be.call("rmsnorm_shard_backward", what, x.device, p(dx), p(dw), sc, nbytes, p(dyin), p(xin), p(weight),
                p(rstd), sums, B, T, C, C_total, 0, dt, wdt, strides)
    return dx, dw, db


class _TokenNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, op):
        y, mean, rstd, C_total, _ = _token_forward(op, x, weight, bias, eps, group)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.op, ctx.group, ctx.C_total, ctx.has_bias = op, group, C_total, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = _token_backward(ctx.op, dy, x, weight, mean, rstd, ctx.C_total, ctx.group,
                                     need[0], weight is not None and need[1],
                                     ctx.op == "layer" and ctx.has_bias and need[2])
        if db is not None and db.dtype != ctx.bias_dtype:
            db = db.to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


def layer_norm(x_shard, weight_shard=None, bias_shard=None, eps=1e-5, group=None):
    """LayerNorm over a last axis split across the ranks of `group` (default: the world).

    x_shard holds this rank's columns of every row (..., C_rank); weight_shard and
    bias_shard (C_rank,) its slices of the parameters. Returns this rank's slice of
    the output. Differentiable; one all_reduce in the forward, one in the backward."""
    _check_x("layer_norm", x_shard)
    return _TokenNormFunction.apply(x_shard, weight_shard, bias_shard, eps, group, "layer")


def rms_norm(x_shard, weight_shard=None, eps=None, group=None):
    """RMSNorm over a last axis split across the ranks of `group` (default: the world).
    eps=None: the machine epsilon of float32 (of float64 for float64 x), as torch."""
    _check_x("rms_norm", x_shard)
    if eps is None:
        eps = torch.finfo(torch.float64 if x_shard.dtype == torch.float64 else torch.float32).eps
    return _TokenNormFunction.apply(x_shard, weight_shard, None, eps, group, "rms")


def shard_bounds(features, world_size, rank):
    """(start, stop) of rank's columns when `features` are split as evenly as
    possible over world_size ranks (the first features % world_size get one more)."""
    base, extra = divmod(int(features), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class LayerNorm(torch.nn.Module):
    """torch.nn.LayerNorm over a last axis split across `group`: this rank holds
    `shard_features` of the columns (and of weight and bias)."""

    def __init__(self, shard_features, eps=1e-5, elementwise_affine=True, bias=True, group=None,
                 device=None, dtype=None):
        super().__init__()
        self.shard_features, self.eps, self.group = int(shard_features), eps, group
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(self.shard_features, **kw))
            self.bias = torch.nn.Parameter(torch.zeros(self.shard_features, **kw)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps, self.group)

    def extra_repr(self):
        return f"{self.shard_features} (shard), eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm over a last axis split across `group`: this rank holds
    `shard_features` of the columns (and of weight)."""

    def __init__(self, shard_features, eps=None, elementwise_affine=True, group=None, device=None, dtype=None):
        super().__init__()
        self.shard_features, self.eps, self.group = int(shard_features), eps, group
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(self.shard_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.group)

    def extra_repr(self):
        return f"{self.shard_features} (shard), eps={self.eps}, elementwise_affine={self.elementwise_affine}"


# ---- synchronized BatchNorm ------------------------------------------------------------------

def _bn_layout(x):
    """(tensor, N, C, S, pn_layout): channels_last inputs run NHWC, others dense NCHW."""
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return x, N, C, S, _clib.PN_NHWC
    return x.contiguous(), N, C, S, _clib.PN_NCHW


def _bn_out(x, layout):
    if layout == _clib.PN_NHWC:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return torch.empty_like(x, memory_format=fmt)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, num_features, group):
        what = "SyncBatchNorm"
        P, rank = _group_info(group)
        code, detail, C = 0, 0, num_features
        if x.dim() < 2:
            code = 10
        elif x.dtype not in _DTYPES:
            code, detail = 1, -1
        elif x.shape[1] != num_features:
            code, detail = 9, x.shape[1]
        elif any(p is not None and (p.dtype not in (x.dtype, torch.float32)) for p in (weight, bias)):
            code = 5
        elif any(p is not None and p.device != x.device for p in (weight, bias, running_mean, running_var)):
            code = 6
        count = x.numel() // max(x.shape[1], 1) if code == 0 else 0
        be = _backend(x) if code == 0 else CPU
        if code == 0:
            xin, N, _, S, layout = _bn_layout(x.detach())
            dt = be.pn_dtype[x.dtype]
        # the kernels read weight and bias, and update the running statistics, as C dense values
        weight, bias = (None if t is None else t.detach().contiguous() for t in (weight, bias))
        rm, rv = (None if r is None else r.contiguous() for r in (running_mean, running_var))

        def fill(buf, off):
            if count:
                be.call("batchnorm_shard_stats", what, x.device, _at(be, buf, off + rank * C * 2), be.ptr(xin),
                        N, C, S, layout, dt)

        # rows = C (all ranks must agree); width = this rank's count of values per channel
        headers, buf, off = _exchange(what, x.device, group, P, rank, [code, C, count, detail], P * C * 2, fill)
        counts = [int(h[2]) for h in headers]
        p = be.ptr
        mean = torch.empty(C, dtype=_F64, device=x.device)
        rstd = torch.empty(C, dtype=_F64, device=x.device)
        rdt = be.pn_dtype[running_mean.dtype] if running_mean is not None else _clib.PN_FLOAT32
        be.call("batchnorm_shard_combine", what, x.device, p(mean), p(rstd), p(rm), p(rv),
                _at(be, buf, off), _int64s(be, counts), P, C, float(eps), float(momentum), 1, 0, rdt)
        for r, rd in ((running_mean, rm), (running_var, rv)):
            if rd is not r:
                r.copy_(rd)
        y = _bn_out(x, layout)
        if count:
            wdt = be.pn_dtype[weight.dtype if weight is not None else (bias.dtype if bias is not None
                                                                          else torch.float32)]
            be.call("batchnorm_shard_apply", what, x.device, p(y), p(xin), p(weight), p(bias), p(mean), p(rstd),
                    N, C, S, layout, dt, wdt)
        ctx.save_for_backward(xin, weight, mean, rstd)
        ctx.group, ctx.total, ctx.layout, ctx.shape = group, sum(counts), layout, (N, C, S)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        what = "SyncBatchNorm backward"
        x, weight, mean, rstd = ctx.saved_tensors
        P, rank = _group_info(ctx.group)
        N, C, S = ctx.shape
        be = _backend(x)
        layout = ctx.layout
        code = 0 if (dy.shape == x.shape and dy.dtype == x.dtype and dy.device == x.device) else 8
        if code == 0:
            if layout == _clib.PN_NHWC:
                fmt = torch.channels_last if dy.dim() == 4 else torch.channels_last_3d
                dyin = dy.contiguous(memory_format=fmt)
            else:
                dyin = dy.contiguous()
        dt = be.pn_dtype[x.dtype]
        p = be.ptr
        local = torch.zeros(2 * C, dtype=_F64, device=x.device)
        count = N * S

        def fill(buf, off):
            if count:
                be.call("batchnorm_shard_backward_sums", what, x.device, p(local), p(dyin), p(x), p(mean),
                        N, C, S, layout, dt)
                buf[off:].copy_(local)

        _, buf, off = _exchange(what, x.device, ctx.group, P, rank, [code, C, count, 0], 2 * C, fill)
        need = ctx.needs_input_grad
        wdtype = weight.dtype if weight is not None else torch.float32
        dx = _bn_out(x, layout) if need[0] else None
        dw = torch.empty(C, dtype=wdtype, device=x.device) if (weight is not None and need[1]) else None
        db = torch.empty(C, dtype=wdtype, device=x.device) if (ctx.has_bias and need[2]) else None
        if count == 0:
            for g in (dw, db):
                if g is not None:
                    g.zero_()
        elif dx is not None or dw is not None or db is not None:
            wdt = be.pn_dtype[wdtype]
            be.call("batchnorm_shard_backward", what, x.device, p(dx), p(dw), p(db), p(dyin), p(x), p(weight),
                    p(mean), p(rstd), p(local), _at(be, buf, off), ctx.total, N, C, S, 0, layout, dt, wdt)
        if db is not None and db.dtype != ctx.bias_dtype:
            db = db.to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm on pynorm's kernels: batch statistics combined across
    the ranks of `process_group` (default: the world) with one all_reduce in the
    forward and one in the backward. Same constructor, parameters, buffers and
    state_dict keys as torch.nn.SyncBatchNorm. Without an initialized process group,
    with a world of one, or in eval, it is a plain BatchNorm (no collective)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        if self.momentum is None:
            factor = 0.0
        else:
            factor = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        sync = bn_training and self.training and dist.is_available() and dist.is_initialized()
        if sync:
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            sync = dist.get_world_size(group) > 1
        if not sync:
            return _local_batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                     factor, self.eps)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                            self.eps, factor, self.num_features, group)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module, process_group=None):
    """Every BatchNorm*D (torch's, pynorm.torch's, torch.nn.SyncBatchNorm) in `module`
    replaced by pynorm.distributed.SyncBatchNorm sharing its parameters and buffers.
    Returns the module (a new one when `module` itself is a BatchNorm)."""
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


# ---- communication volume ----------------------------------------------------------------------

def bytes_per_row(op, world_size, itemsize=4):
    """Bytes one row adds to the all-reduced message(s), and the number of collectives,
    for pynorm and for the usual implementation, as dicts {"forward": (bytes,
    collectives), "backward": (...)}. The usual implementation all-reduces sum(x) then
    sum((x - mean)^2) for LayerNorm (two collectives in the forward), sum(x^2) for
    RMSNorm, and the backward's row sums, in the activations' compute type
    (itemsize 4: float32). pynorm's header (32 bytes per rank per call) is not a
    per-row cost."""
    P = int(world_size)
    if op == "layer_norm":
        ours = {"forward": (16 * P, 1), "backward": (16, 1)}
        usual = {"forward": (2 * itemsize, 2), "backward": (2 * itemsize, 1)}
    elif op == "rms_norm":
        ours = {"forward": (8, 1), "backward": (8, 1)}
        usual = {"forward": (itemsize, 1), "backward": (itemsize, 1)}
    else:
        raise ValueError(f"op must be 'layer_norm' or 'rms_norm', got {op!r}")
    return {"pynorm": ours, "usual": usual}


def print_bytes_per_row(world_sizes=(2, 4, 8), hidden=4096, itemsize=2):
    """Prints the table of bytes communicated per row (and per rank of a ring
    all-reduce, 2 (P-1)/P times the message), pynorm vs the usual two-collective
    LayerNorm, next to the bytes of the row itself (hidden x itemsize)."""
    print(f"bytes per row all-reduced (row of {hidden} x {itemsize} B = {hidden * itemsize} B; "
          "ring traffic per rank = 2(P-1)/P x message)")
    print(f"{'op':<11} {'P':>2}  {'pass':<8} {'pynorm B/row':>12} {'colls':>5} {'ring B/rank':>11}   "
          f"{'usual B/row':>11} {'colls':>5} {'ring B/rank':>11}")
    for op in ("layer_norm", "rms_norm"):
        for P in world_sizes:
            b = bytes_per_row(op, P)
            for ps in ("forward", "backward"):
                (ob, oc), (ub, uc) = b["pynorm"][ps], b["usual"][ps]
                ring = 2 * (P - 1) / P
                print(f"{op:<11} {P:>2}  {ps:<8} {ob:>12} {oc:>5} {ob * ring:>11.1f}   {ub:>11} {uc:>5} "
                      f"{ub * ring:>11.1f}")


if __name__ == "__main__":
    print_bytes_per_row()
