"""replace_norms: swap a model's norm modules for pynorm's, in place."""

import copy

import torch

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


# The (weight_offset, rounding) forms pynorm reproduces, tried in this order after the
# one the class name suggests: Hugging Face's Gemma/Gemma2/Gemma3 RMSNorm compute
# (x.float() * rstd * (1 + w.float())).type_as(x) (offset 1, rounded once); LlamaRMSNorm,
# Qwen2/Qwen3 and Mistral's compute w * (x.float() * rstd).to(T) ("llama"); Olmo2's
# current (w * x.float() * rstd).to(T) is offset 0 rounded once.
_FORMS = ((0.0, "llama"), (0.0, "once"), (1.0, "once"))


def _forms_for(cls_name):
    first = (1.0, "once") if "gemma" in cls_name.lower() else (0.0, "llama")
    return (first,) + tuple(f for f in _FORMS if f != first)


def _probe_inputs(weight):
    """A probe input (16 rows, the module's dtype and device) and a second, random
    weight: the module's own weight may be ones or zeros (fresh init), which hides the
    difference between the forms; a random one does not."""
    C = weight.numel()
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((16, C), generator=gen, dtype=torch.float64) * 2 + 0.5
    w = torch.randn((C,), generator=gen, dtype=torch.float64) * 0.75 + 0.25
    return x.to(weight.dtype).to(weight.device), w.to(weight.dtype).to(weight.device)


def _run_with_weight(module, weight, x):
    """The module's own forward with `weight` in place of its weight, on a shallow copy
    (the module itself is not touched, its hooks are not run)."""
    probe = copy.copy(module)
    probe._parameters = dict(module._parameters)
    probe._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=False)
    return type(module).forward(probe, x)


def _mismatch(ref, x, weight, eps, offset, rounding):
    """Why pynorm's rms_norm(x, weight, eps, weight_offset, rounding) is not `ref` within
    the documented rounding, or None when it is: bit for bit on the rows where torch's
    float32 rstd (rsqrt(mean(x^2) + eps), as Hugging Face computes it) equals pynorm's,
    on the others within what the two rstd's difference explains plus a rounding:
    (|rstd_torch - rstd| / rstd + 2 eps) * |y| (torch's float32 sum of squares is less
    exact than pynorm's; for half dtypes this is about one ulp)."""
    if not isinstance(ref, torch.Tensor):
        return f"its forward returned {type(ref).__name__}, not a tensor"
    if ref.shape != x.shape or ref.dtype != x.dtype:
        return (f"its forward returned shape {tuple(ref.shape)} dtype {ref.dtype} for an input of shape "
                f"{tuple(x.shape)} dtype {x.dtype}")
    from ._token_ops import _rms_norm_fwd
    got, rstd = _rms_norm_fwd(x, weight, eps, offset, rounding)
    sdt = rstd.dtype
    rstd_torch = torch.rsqrt(x.to(sdt).pow(2).mean(-1) + eps)
    same_rstd = (rstd_torch == rstd).unsqueeze(-1)
    r, g = ref.double(), got.double()
    if not torch.isfinite(r).all():
        return "its forward gave non-finite values on a finite probe"
    bits_equal = (r == g)
    rel = ((rstd_torch.double() - rstd.double()).abs() / rstd.double()).unsqueeze(-1)
    tol = (rel + 2 * torch.finfo(x.dtype).eps) * torch.maximum(r.abs(), g.abs()) + torch.finfo(x.dtype).tiny
    near = (r - g).abs() <= tol
    bad = torch.where(same_rstd, ~bits_equal, ~near)
    if bool(bad.any()):
        return (f"{int(bad.sum())} of {bad.numel()} probe outputs differ beyond the documented rounding "
                f"(max |diff| {float((r - g).abs().max()):.3g})")
    return None


def _probe(module, weight, eps):
    """(weight_offset, rounding) of the first form of _FORMS whose pynorm RMSNorm
    reproduces the module on the probe (with its own weight and a random one), and
    None; or (None, why not)."""
    if weight.device.type not in ("cpu", "cuda"):
        return None, f"its weight is on {weight.device}: cannot be probed"
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return None, f"its weight has dtype {weight.dtype}"
    x, w_random = _probe_inputs(weight)
    why = []
    with torch.no_grad():
        try:
            refs = [_run_with_weight(module, w.detach(), x) for w in (weight, w_random)]
        except Exception as e:                    # noqa: BLE001  (any failure: not swapped)
            return None, f"its forward raised {type(e).__name__}: {e}"
        for offset, rounding in _forms_for(type(module).__name__):
            for w, ref in zip((weight.detach(), w_random), refs):
                reason = _mismatch(ref, x, w, eps, offset, rounding)
                if reason is not None:
                    why.append(f"weight_offset={offset}, rounding={rounding!r}: {reason}")
                    break
            else:
                return (offset, rounding), None
    return None, "no pynorm form reproduces it (" + "; ".join(why) + ")"


def _hf_twin(module, eps, offset, rounding):
    weight = module.weight
    new = RMSNorm(weight.numel(), eps=eps, elementwise_affine=True, device="meta",
                  weight_offset=offset, rounding=rounding)
    new.weight = weight                      # the same Parameter: optimizers keep working
    new.train(module.training)
    return new


def replace_norms(model, *, skipped=None):
    """Replaces, in place, every norm module of `model` with its pynorm twin and
    returns [(qualified_name, old_class_name)] for each one replaced.

    - torch.nn.LayerNorm, RMSNorm, GroupNorm, InstanceNorm1d/2d/3d and
      BatchNorm1d/2d/3d of exactly those classes (not subclasses, whose forward
      may differ; not SyncBatchNorm or the Lazy* classes): the module object is kept and its
      class becomes pynorm's twin, a subclass that changes only forward. Its
      parameters, buffers, hooks, dtype and device are untouched and the
      parameters stay the same objects, so an optimizer built before the swap
      keeps working.
    - Hand-written RMSNorm classes (Hugging Face's LlamaRMSNorm, Qwen2/Qwen3,
      Mistral, Gemma/Gemma2/Gemma3 and kin), by a name-based rule: the class name
      ends in "RMSNorm", the module's only parameter is a 1-D `weight`, it has no
      buffers or submodules, and it has a float eps attribute named
      `variance_epsilon` or `eps`. Such a module is replaced by a
      pynorm.torch.RMSNorm sharing the same weight Parameter, with the
      weight_offset and rounding that reproduce it: Gemma's (1 + w), rounded once;
      Llama's x_hat rounded to the dtype before the weight ("llama"); or plain. The
      form is chosen and verified by a probe: the module's own forward (hooks not
      run, no grad) against pynorm's on a 16 x C random input in the module's dtype,
      with its own weight and with a random one, must agree bit for bit on every
      row where torch's float32 rstd equals pynorm's, and elsewhere within what the
      two rstd's relative difference explains plus two eps of the dtype
      (docs/inference.md, "rstd"). A module no form reproduces
      (another formula, float64 modules computed in float32, ...) is left alone.
      Hooks registered on the old module do not carry over. The output dtype is the
      input's (HF's returns weight-promoted dtype when they differ). Modules on the
      meta device cannot be probed and are left alone.

    skipped: a list to which (qualified_name, class_name, reason) is appended for
    every hand-written *RMSNorm module left alone.

    The model itself is converted too when it is a torch.nn norm (its class
    changes in place; a hand-written root module cannot be replaced in place).

    Note: torch.nn.TransformerEncoderLayer's inference fast path (eval mode, no
    grad) calls a fused kernel that reads its norms' weights directly, bypassing
    the norm modules; results stay correct, but there the norms are torch's.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if skipped is not None and not isinstance(skipped, list):
        raise TypeError(f"skipped must be a list or None, got {type(skipped).__name__}")
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
        form, why = (None, "it does not fit the rule (one 1-D weight, no buffers or submodules, "
                     "a float eps or variance_epsilon)")
        if eps is not None:
            form, why = _probe(child, child.weight, eps)
        if form is not None:
            new = _hf_twin(child, eps, *form)
            parent._modules[child_name] = new
            new_for[key] = new
            replaced.append((qual, type(child).__name__))
        else:
            new_for[key] = None
            cls = type(child)
            if (skipped is not None and cls.__name__.endswith("RMSNorm")
                    and not cls.__module__.startswith(("torch.", "pynorm."))):
                skipped.append((qual, cls.__name__, why))
    return replaced
