"""Functional forms with torch.nn.functional's signatures, on pynorm's operators.

These are plain Python over the torch.ops.pynorm.* operators (in plain eager mode over
an equivalent autograd.Function: see _dispatch): torch.compile traces them without
graph breaks (the operators are opaque nodes with fake implementations).
"""

import numbers

import torch

from ._dispatch import run

_HALF = (torch.float16, torch.bfloat16)


def _normalized(what, x, normalized_shape):
    """(x viewed as (..., C), C, the original shape): the trailing axes named by
    normalized_shape are flattened into one."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    normalized_shape = tuple(normalized_shape)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pynorm.torch.{what}: input must be a torch.Tensor, got {type(x).__name__}")
    k = len(normalized_shape)
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(f"pynorm.torch.{what}: input of shape {tuple(x.shape)} does not end with "
                         f"normalized_shape {normalized_shape}")
    if k == 1:
        return x, normalized_shape[0], None
    C = 1
    for s in normalized_shape:
        C *= s
    return x.reshape(*x.shape[:x.dim() - k], C), C, x.shape


def _flat_param(what, p, name, C):
    if p is None:
        return None
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"pynorm.torch.{what}: {name} must be a torch.Tensor or None, "
                        f"got {type(p).__name__}")
    if p.numel() != C:
        raise ValueError(f"pynorm.torch.{what}: {name} has shape {tuple(p.shape)}; expected "
                         f"normalized_shape ({C} elements)")
    return p.reshape(C) if p.dim() != 1 else p


def _param_dtypes(x, *params):
    """The kernels take weight/bias in x's dtype or float32, both the same. Other
    combinations are cast (differentiably): to float32 for half x (exact for half
    parameters), to x's dtype otherwise."""
    given = [p for p in params if p is not None]
    dts = {p.dtype for p in given}
    if not given or (len(dts) == 1 and next(iter(dts)) in (x.dtype, torch.float32)):
        return params
    target = torch.float32 if x.dtype in _HALF else x.dtype
    return tuple(None if p is None else p.to(target) for p in params)


def _unflatten(y, shape):
    return y if shape is None else y.reshape(shape)


def _opts(weight_offset, rounding):
    """The operators' trailing (weight_offset, rounding), () for the defaults (the
    operators' own defaults: the call is the 0.1 one). Values are checked by the
    operators, which name the argument."""
    if type(weight_offset) is float and weight_offset == 0.0 and rounding == "once":
        return ()
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, numbers.Real):
        raise TypeError(f"pynorm.torch: weight_offset must be a real number, got {type(weight_offset).__name__}")
    if not isinstance(rounding, str):
        raise TypeError(f"pynorm.torch: rounding must be a str, \"once\" or \"llama\", "
                        f"got {type(rounding).__name__}")
    return float(weight_offset), rounding


def default_rms_eps(dtype):
    """torch's RMSNorm default: the machine epsilon of the compute type."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, weight_offset=0.0,
               rounding="once"):
    """As torch.nn.functional.layer_norm, on pynorm's kernels (CPU and CUDA).
    weight_offset: y = xhat * (weight_offset + weight) + bias, the offset added in float32
    (a non-zero offset needs a weight); rounding "once" (float32 throughout, one rounding)
    or "llama" (xhat rounded to input's dtype before the weight). docs/inference.md."""
    x, C, shape = _normalized("layer_norm", input, normalized_shape)
    weight = _flat_param("layer_norm", weight, "weight", C)
    bias = _flat_param("layer_norm", bias, "bias", C)
    weight, bias = _param_dtypes(x, weight, bias)
    y, _, _ = run("layer_norm_fwd", x, weight, bias, float(eps), *_opts(weight_offset, rounding))
    return _unflatten(y, shape)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, weight_offset=0.0, rounding="once"):
    """As torch.nn.functional.rms_norm (eps=None: machine epsilon of the compute type);
    weight_offset and rounding as layer_norm's (Gemma: weight_offset=1.0; Hugging Face
    LlamaRMSNorm: rounding="llama")."""
    x, C, shape = _normalized("rms_norm", input, normalized_shape)
    weight = _flat_param("rms_norm", weight, "weight", C)
    (weight,) = _param_dtypes(x, weight)
    eps = default_rms_eps(x.dtype) if eps is None else float(eps)
    y, _ = run("rms_norm_fwd", x, weight, eps, *_opts(weight_offset, rounding))
    return _unflatten(y, shape)


def _residual(what, x, residual):
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"pynorm.torch.{what}: residual must be a torch.Tensor, "
                        f"got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise ValueError(f"pynorm.torch.{what}: residual has shape {tuple(residual.shape)}; "
                         f"expected input's {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"pynorm.torch.{what}: residual has dtype {residual.dtype}; expected "
                        f"input's {x.dtype}")


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                   weight_offset=0.0, rounding="once"):
    """h = input + residual (rounded to input's dtype), y = layer_norm(h), in one pass
    over memory: returns (y, h). Differentiable through both outputs."""
    _residual("add_layer_norm", input, residual)
    x, C, shape = _normalized("add_layer_norm", input, normalized_shape)
    if shape is not None:
        residual = residual.reshape(x.shape)
    weight = _flat_param("add_layer_norm", weight, "weight", C)
    bias = _flat_param("add_layer_norm", bias, "bias", C)
    weight, bias = _param_dtypes(x, weight, bias)
    y, h, _, _ = run("add_layer_norm_fwd", x, residual, weight, bias, float(eps),
                     *_opts(weight_offset, rounding))
    return _unflatten(y, shape), _unflatten(h, shape)


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, *, weight_offset=0.0,
                 rounding="once"):
    """h = input + residual (rounded to input's dtype), y = rms_norm(h), in one pass
    over memory: returns (y, h). Differentiable through both outputs."""
    _residual("add_rms_norm", input, residual)
    x, C, shape = _normalized("add_rms_norm", input, normalized_shape)
    if shape is not None:
        residual = residual.reshape(x.shape)
    weight = _flat_param("add_rms_norm", weight, "weight", C)
    (weight,) = _param_dtypes(x, weight)
    eps = default_rms_eps(x.dtype) if eps is None else float(eps)
    y, h, _ = run("add_rms_norm_fwd", x, residual, weight, eps, *_opts(weight_offset, rounding))
    return _unflatten(y, shape), _unflatten(h, shape)


# ---- spatial norms ------------------------------------------------------------------------------

def _spatial_input(what, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pynorm.torch.{what}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"pynorm.torch.{what}: input must be (N, C, *spatial), got shape {tuple(x.shape)}")


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """As torch.nn.functional.group_norm; channels_last input runs the NHWC kernels."""
    _spatial_input("group_norm", input)
    weight, bias = _param_dtypes(input, weight, bias)
    y, _, _ = run("group_norm_fwd", input, weight, bias, int(num_groups), float(eps))
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, num_batches_tracked=None):
    """As torch.nn.functional.batch_norm (running statistics updated in place in
    training). momentum=None: the cumulative average over num_batches_tracked
    batches (a tensor holding the count including this batch), as torch's modules."""
    _spatial_input("batch_norm", input)
    weight, bias = _param_dtypes(input, weight, bias)
    cumulative = momentum is None
    y, _, _, new_mean, new_var = run("batch_norm_fwd",
        input, weight, bias, running_mean, running_var, num_batches_tracked if cumulative else None,
        bool(training), 0.0 if cumulative else float(momentum), cumulative, float(eps))
    if training:
        with torch.no_grad():
            if running_mean is not None:
                running_mean.copy_(new_mean)
            if running_var is not None:
                running_var.copy_(new_var)
    return y


def check_instance_spatial_size(input):
    """torch's check: statistics over one spatial element per instance are undefined
    (a zero output, NaN running variance), so training on such input is an error."""
    size = input.shape
    n = 1
    for s in size[2:]:
        n *= s
    if n == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """As torch.nn.functional.instance_norm: GroupNorm with one group per channel.
    With use_input_stats and running statistics given, these are updated in place
    as torch does (the batch average of the per-instance mean and unbiased variance);
    without use_input_stats, the running statistics normalize (BatchNorm's eval)."""
    _spatial_input("instance_norm", input)
    if use_input_stats:
        check_instance_spatial_size(input)
    weight, bias = _param_dtypes(input, weight, bias)
    if not use_input_stats:
        y, _, _, _, _ = run("batch_norm_fwd", input, weight, bias, running_mean, running_var,
                                                        None, False, 0.0, False, float(eps))
        return y
    N, C = input.shape[0], input.shape[1]
    y, mean, _ = run("group_norm_fwd", input, weight, bias, C, float(eps))
    if running_mean is not None or running_var is not None:
        with torch.no_grad():
            m = float(momentum)
            if running_mean is not None:
                running_mean.mul_(1 - m).add_(mean.mean(0).to(running_mean.dtype), alpha=m)
            if running_var is not None:
                xs = input.detach().reshape(N, C, -1)
                var = xs.to(mean.dtype).var(-1, unbiased=True).mean(0)
                running_var.mul_(1 - m).add_(var.to(running_var.dtype), alpha=m)
    return y


# ---- in place ------------------------------------------------------------------------------------

def _check_inplace(what, x, residual, weight):
    for name, t in (("x", x), ("residual", residual)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pynorm.torch.{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"pynorm.torch.{what}: {name} requires grad; this in-place op is for "
                             "inference (use add_rms_norm to differentiate, or torch.no_grad())")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"pynorm.torch.{what}: x must have a non-empty last axis, got shape {tuple(x.shape)}")
    if residual.shape != x.shape:
        raise ValueError(f"pynorm.torch.{what}: residual has shape {tuple(residual.shape)}; "
                         f"expected x's {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"pynorm.torch.{what}: residual has dtype {residual.dtype}; expected x's {x.dtype}")
    if residual.device != x.device:
        raise ValueError(f"pynorm.torch.{what}: residual is on {residual.device}, expected x's device {x.device}")
    # memory overlaps are checked by the operator, on the real tensors


def fused_add_rms_norm_(x, residual, weight, eps=None, *, weight_offset=0.0, rounding="once"):
    """In place, as vLLM's fused_add_rms_norm: residual <- h = x + residual (rounded to
    x's dtype), then x <- rms_norm(h, weight, eps) (weight_offset, rounding as
    rms_norm's; the statistics come from the rounded h). Returns None: the results
    are x and residual themselves. A mutating operator (torch.ops.pynorm.
    fused_add_rms_norm_, x and residual declared mutated) that works under
    torch.compile; not differentiable (x or residual requiring grad is an error;
    use add_rms_norm). Bad arguments raise before anything is written."""
    what = "fused_add_rms_norm_"
    _check_inplace(what, x, residual, weight)
    C = x.shape[-1]
    weight = _flat_param(what, weight, "weight", C)
    (weight,) = _param_dtypes(x, None if weight is None else weight.detach())
    eps = default_rms_eps(x.dtype) if eps is None else float(eps)
    if x.numel() == 0:
        return None
    opts = _opts(weight_offset, rounding)
    run("fused_add_rms_norm_", x, residual, weight, eps, *opts)
    return None
