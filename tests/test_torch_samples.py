"""PyTorch's own sample inputs for its norm functions (OpInfo) and modules
(ModuleInfo), run through pynorm.torch's functions and modules: the same output,
gradients and running statistics as torch, or a clear error where pynorm's
contract refuses what torch takes (a negative eps, docs/errors.md; a 1-D input to
batch_norm, which has no channel axis).

torch's test helpers need the `expecttest` package (in the test extra)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")
# torch's test helpers freeze torch.backends' flags when imported (their own suite's
# rule); torch.backends' own guard puts the flag back, for the other tests of this process
with getattr(torch.backends, "__allow_nonbracketed_mutation")():
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db

import pynorm.torch as pnt  # noqa: E402

FUNCTIONS = {"nn.functional.layer_norm": pnt.layer_norm, "nn.functional.rms_norm": pnt.rms_norm,
             "nn.functional.group_norm": pnt.group_norm, "nn.functional.instance_norm": pnt.instance_norm,
             "nn.functional.batch_norm": pnt.batch_norm}
MODULES = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DNAME = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def _copy(a):
    return a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a


def _close(got, ref, dtype, what, slack=1.0):
    assert got.shape == ref.shape and got.dtype == ref.dtype, \
        f"{what}: {tuple(got.shape)} {got.dtype}, torch {tuple(ref.shape)} {ref.dtype}"
    if got.numel():
        g, r = got.double(), ref.double()
        assert torch.equal(g.isnan(), r.isnan()), f"{what}: NaN where torch has none, or the reverse"
        err = (g - r).nan_to_num().abs().max().item()
        scale = max(1.0, r.nan_to_num().abs().max().item())
        assert err <= TOL[dtype] * slack * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _same_gradients(got, got_inputs, ref, ref_inputs, dtype, what, seed):
    """The gradients of got and ref (for one random dy) with respect to the tensors
    of their inputs that require grad."""
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(ref.dtype)
    grads = [torch.autograd.grad(out, [t for t in ins if isinstance(t, torch.Tensor) and t.requires_grad], dy,
                                 allow_unused=True)
             for out, ins in ((got, got_inputs), (ref, ref_inputs))]
    for g, r in zip(*grads):
        assert (g is None) == (r is None), what + ": a gradient missing"
        if g is not None:
            _close(g, r, dtype, what + " (gradient)", slack=10)


# torch's samples take gradients in float32 and float64
FUNCTION_CASES = [(dtype, grad) for dtype in DTYPES for grad in (False, True)
                  if not grad or dtype in (torch.float32, torch.float64)]


@pytest.mark.parametrize("dtype,grad", FUNCTION_CASES,
                         ids=[f"{DNAME[d]}-{'fwd_bwd' if g else 'no_grad'}" for d, g in FUNCTION_CASES])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_function_samples(name, dtype, grad):
    (info,) = [o for o in op_db if o.name == name and not o.variant_test_name]
    ran = 0
    for k, s in enumerate(info.sample_inputs("cpu", dtype, requires_grad=grad)):
        what = f"{name} {DNAME[dtype]} sample {k}: input {tuple(s.input.shape)}, kwargs {sorted(s.kwargs)}"
        ref_args = [_copy(s.input), *map(_copy, s.args)]
        ref_kwargs = {key: _copy(v) for key, v in s.kwargs.items()}
        args = [_copy(s.input), *map(_copy, s.args)]
        kwargs = {key: _copy(v) for key, v in s.kwargs.items()}
        if s.kwargs.get("eps", 0) < 0:
            with pytest.raises(ValueError, match="eps"):
                FUNCTIONS[name](*args, **kwargs)
            continue
        if name.endswith("batch_norm") and s.input.dim() < 2:
            with pytest.raises(ValueError, match="input"):
                FUNCTIONS[name](*args, **kwargs)
            continue
        ref = info.op(*ref_args, **ref_kwargs)
        got = FUNCTIONS[name](*args, **kwargs)
        _close(got, ref, dtype, what)
        for a, b in zip(args[1:] + list(kwargs.values()), ref_args[1:] + list(ref_kwargs.values())):
            if isinstance(a, torch.Tensor) and not a.requires_grad:   # running statistics, updated alike
                _close(a, b, dtype, what + " (running statistics)", slack=10)
        if grad and ref.numel():
            _same_gradients(got, args + list(kwargs.values()), ref, ref_args + list(ref_kwargs.values()),
                            dtype, what, k)
        ran += 1
    assert ran, f"no sample of {name} ran"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DNAME.get)
@pytest.mark.parametrize("name", MODULES)
def test_module_samples(name, dtype, training):
    (info,) = [m for m in module_db if m.module_cls.__name__ == name]
    ran = 0
    for k, s in enumerate(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                  training=training)):
        if s.forward_input is None:
            continue
        cargs, ckwargs = s.constructor_input.args, s.constructor_input.kwargs
        what = f"{name} {DNAME[dtype]} sample {k}: {cargs} {ckwargs}, input " \
               f"{[tuple(a.shape) for a in s.forward_input.args]}"
        ref_mod = info.module_cls(*cargs, **ckwargs).to(dtype).train(training)
        mod = getattr(pnt, name)(*cargs, **ckwargs).to(dtype).train(training)
        mod.load_state_dict(ref_mod.state_dict())
        ref_in = [_copy(a) for a in s.forward_input.args]
        inputs = [_copy(a) for a in s.forward_input.args]
        try:
            ref = ref_mod(*ref_in, **s.forward_input.kwargs)
        except IndexError:   # torch's InstanceNorm with running statistics on an empty batch
            assert name.startswith("InstanceNorm") and s.forward_input.args[0].numel() == 0, what
            continue
        got = mod(*inputs, **s.forward_input.kwargs)
        _close(got, ref, dtype, what)
        for (key, a), b in zip(mod.state_dict().items(), ref_mod.state_dict().values()):
            _close(a, b, dtype, f"{what} ({key})", slack=10)
        if ref.numel() and ref.requires_grad:
            _same_gradients(got, inputs + list(mod.parameters()), ref, ref_in + list(ref_mod.parameters()),
                            dtype, what, k)
        ran += 1
    assert ran, f"no sample of {name} ran"
