"""rms_norm_quant / layer_norm_quant for CPU torch tensors: pynorm's NumPy functions
on zero-copy NumPy views of the tensors, results handed back as torch tensors.

Same semantics and bits as pynorm.rms_norm_quant (docs/inference.md): q is int8 or
torch.float8_e4m3fn, scales float32. Not differentiable (quantized outputs have no
gradient); CPU only, as the C library's quantized forward.
"""

import ml_dtypes
import numpy as np
import torch

from .. import _token

_NP_VIEW = {torch.float32: (None, None), torch.float64: (None, None),
            torch.float16: (None, None), torch.bfloat16: (torch.int16, ml_dtypes.bfloat16)}
_QDTYPES = {"int8": "int8", "float8_e4m3fn": "float8_e4m3fn",
            torch.int8: "int8", torch.float8_e4m3fn: "float8_e4m3fn"}


def _as_numpy(what, t, name, x=None):
    """A NumPy view (no copy) of a CPU tensor in one of the kernels' dtypes."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pynorm.torch.{what}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise NotImplementedError(f"pynorm.torch.{what}: {name} is on {t.device}; the quantized "
                                  "output runs on CPU tensors only for now")
    if t.dtype not in _NP_VIEW:
        raise TypeError(f"pynorm.torch.{what}: {name} has dtype {t.dtype}; expected float32, float16, "
                        "bfloat16 or float64")
    t = t.detach()
    carrier, npdt = _NP_VIEW[t.dtype]
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t.numpy() if carrier is None else t.view(carrier).numpy().view(npdt)


def _to_torch(a):
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if a.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(a)


def _quant(what, fn, x, residual, params, eps, qdtype, scale, scale_ub, group_size, weight_offset, rounding):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pynorm.torch.{what}: x must be a torch.Tensor, got {type(x).__name__}")
    q = _QDTYPES.get(qdtype) if isinstance(qdtype, (str, torch.dtype)) else None
    if q is None:
        raise ValueError(f"pynorm.torch.{what}: qdtype must be \"int8\", \"float8_e4m3fn\", torch.int8 or "
                         f"torch.float8_e4m3fn, got {qdtype!r}")
    for name, v in (("scale", scale), ("scale_ub", scale_ub)):
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"pynorm.torch.{what}: {name} must be one number, got a tensor of shape "
                                 f"{tuple(v.shape)}")
            if name == "scale":
                scale = float(v.detach().cpu())
            else:
                scale_ub = float(v.detach().cpu())
    xn = _as_numpy(what, x, "x")
    rn = _as_numpy(what, residual, "residual")
    pn = [_as_numpy(what, p, name) for name, p in params]
    try:
        out = fn(xn, *pn, eps, qdtype=q, scale=scale, scale_ub=scale_ub, group_size=group_size,
                 residual=rn, weight_offset=weight_offset, rounding=rounding)
    except (TypeError, ValueError) as e:
        raise type(e)(f"pynorm.torch.{what}: {e}") from None
    return tuple(_to_torch(a) for a in out)


def rms_norm_quant(x, weight=None, eps=None, *, qdtype="int8", scale=None, scale_ub=None, group_size=None,
                   residual=None, weight_offset=0.0, rounding="once"):
    """pynorm.rms_norm_quant for CPU torch tensors: returns (q, scales), plus h = x +
    residual (x's dtype) when a residual is given. q: torch.int8 or torch.float8_e4m3fn
    (qdtype "int8"/"float8_e4m3fn" or those torch dtypes), x's shape; scales: float32,
    shape (1,) for a static scale, x.shape[:-1] + (C // group,) for dynamic ones.
    Bit for bit the NumPy function's (docs/inference.md); no gradient."""
    return _quant("rms_norm_quant", _token.rms_norm_quant, x, residual, [("weight", weight)], eps, qdtype,
                  scale, scale_ub, group_size, weight_offset, rounding)


def layer_norm_quant(x, weight=None, bias=None, eps=1e-5, *, qdtype="int8", scale=None, scale_ub=None,
                     group_size=None, residual=None, weight_offset=0.0, rounding="once"):
    """pynorm.layer_norm_quant for CPU torch tensors: as rms_norm_quant, with bias."""
    return _quant("layer_norm_quant", _token.layer_norm_quant, x, residual,
                  [("weight", weight), ("bias", bias)], eps, qdtype, scale, scale_ub, group_size,
                  weight_offset, rounding)
