"""replace_norms: swap a model's norm modules for pynorm's, in place."""

import torch

from . import _functional as F
from ._modules import RMSNorm, twins

_HF_EPS_NAMES = ("variance_epsilon", "eps")


def _hf_eps(module):
    for name in _HF_EPS_NAMES:
        eps = getattr(module, name, None)
        if isinstance(eps, float) and not isinstance(eps, bool):
            return eps
    return None


def _hf_rmsnorm_candidate(module):
    """The name-based rule for hand-written RMSNorm classes (Hugging Face's
    LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, T5-style ones named *RMSNorm...):
    class name ending in "RMSNorm", not a torch.nn class, one parameter `weight`
    (1-D), no buffers and no submodules, a float eps attribute named
    `variance_epsilon` or `eps`. Returns eps or None."""
    cls = type(module)
    if not cls.__name__.endswith("RMSNorm") or cls.__module__.startswith(("torch.", "pynorm.")):
        return None
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if set(params) != {"weight"} or weight.dim() != 1 or weight.numel() == 0:
        return None
    if any(True for _ in module.buffers(recurse=False)) or any(True for _ in module.children()):
        return None
    if not weight.is_floating_point():
        return None
    return _hf_eps(module)


def _probe_matches(module, weight, eps):
    """Runs the module and pynorm's rms_norm on a small random probe and compares
    them: a class that matches the name rule but computes something else (Gemma's
    x * (1 + weight), a norm over another axis, ...) is left alone."""
    if weight.device.type not in ("cpu", "cuda") or weight.dtype not in (
            torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return False
    C = weight.numel()
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn((3, C), generator=gen, dtype=torch.float32) * 2 + 0.5).to(weight.dtype).to(weight.device)
    try:
        with torch.no_grad():
            ref = module(x)
            got = F.rms_norm(x, (C,), weight, eps)
    except Exception:
        return False
    if not isinstance(ref, torch.Tensor) or ref.shape != got.shape:
        return False
    ref, got = ref.double(), got.double()
    if not torch.isfinite(ref).all():
        return False
    # a few ulps of the data's dtype at the row's scale (HF rounds before the weight
    # multiply, pynorm after: at most about one ulp apart)
    ulp = torch.finfo(weight.dtype).eps
    tol = 8 * ulp * max(1.0, float(ref.abs().max()))
    return bool(((ref - got).abs() <= tol).all())


def _hf_twin(module, eps):
    weight = module.weight
    new = RMSNorm(weight.numel(), eps=eps, elementwise_affine=True, device="meta")
    new.weight = weight                      # the same Parameter: optimizers keep working
    new.train(module.training)
    return new


def replace_norms(model):
    """Replaces, in place, every norm module of `model` with its pynorm twin and
    returns [(qualified_name, old_class_name)] for each one replaced.

    - torch.nn.LayerNorm, RMSNorm, GroupNorm, InstanceNorm1d/2d/3d and
      BatchNorm1d/2d/3d of exactly those classes (not subclasses, whose forward
      may differ; not SyncBatchNorm or the Lazy* classes): the module object is kept and its
      class becomes pynorm's twin, a subclass that changes only forward. Its
      parameters, buffers, hooks, dtype and device are untouched and the
      parameters stay the same objects, so an optimizer built before the swap
      keeps working.
    - Hand-written RMSNorm classes (Hugging Face's LlamaRMSNorm and kin), by a
      name-based rule: the class name ends in "RMSNorm", the module's only
      parameter is a 1-D `weight`, it has no buffers or submodules, and it has a
      float eps attribute named `variance_epsilon` or `eps`. Such a module is
      replaced by a pynorm.torch.RMSNorm sharing the same weight Parameter, only
      after a probe (a 3 x C random input, no grad) shows the two agree to a few
      ulps, so look-alikes that compute something else (Gemma's x * (1 + w)) are
      left alone. Hooks registered on the old module do not carry over. The output
      dtype is the input's (HF's returns weight-promoted dtype when they differ).
      Modules on the meta device cannot be probed and are left alone.

    The model itself is converted too when it is a torch.nn norm (its class
    changes in place; a hand-written root module cannot be replaced in place).

    Note: torch.nn.TransformerEncoderLayer's inference fast path (eval mode, no
    grad) calls a fused kernel that reads its norms' weights directly, bypassing
    the norm modules; results stay correct, but there the norms are torch's.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    table = twins()
    replaced = []
    new_for = {}                 # id(old module) -> replacement (shared modules: one twin)

    def swap_class(module, name):
        twin = table.get(type(module))
        if twin is None:
            return False
        old_name = type(module).__name__
        module.__class__ = twin
        replaced.append((name, old_name))
        return True

    def walk(module, prefix, seen):
        """(parent, attribute, qualified name, child) in named_modules' order."""
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            qual = f"{prefix}.{name}" if prefix else name
            yield module, name, qual, child
            if id(child) not in seen:
                seen.add(id(child))
                yield from walk(child, qual, seen)

    swap_class(model, "")
    for parent, child_name, qual, child in list(walk(model, "", {id(model)})):
        key = id(child)
        if key in new_for:
            if new_for[key] is not None and new_for[key] is not child:
                parent._modules[child_name] = new_for[key]
            continue
        if swap_class(child, qual):
            new_for[key] = child
            continue
        eps = _hf_rmsnorm_candidate(child)
        if eps is not None and _probe_matches(child, child.weight, eps):
            new = _hf_twin(child, eps)
            parent._modules[child_name] = new
            new_for[key] = new
            replaced.append((qual, type(child).__name__))
        else:
            new_for[key] = None
    return replaced
