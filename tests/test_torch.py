"""pynorm.torch: custom operators, nn.Module drop-ins and replace_norms, against torch.nn.

Accuracy rule (as the rest of the suite): against a float64 reference (torch itself
run in float64 on the same values), pynorm's max error is at most 2x torch's on the
same data plus a few ulps of the dtype at the data's scale.
"""

import copy
import re
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.library import opcheck

import pynorm.torch as pnt

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DNAME = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
OPS = torch.ops.pynorm


def ulp(dtype):
    return torch.finfo(dtype).eps


def check_accuracy(what, got, torch_got, ref, dtype, factor=2.0, slack_ulps=4.0, scale=None):
    """max|got - ref| <= factor * max|torch - ref| + slack_ulps ulps(dtype) at max|ref|
    (or at `scale`, the natural size of the quantity, when given)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == torch_got.dtype, f"{what}: dtype {got.dtype}, torch's {torch_got.dtype}"
    if ref.numel() == 0:
        return
    ref = ref.double()
    err_p = (got.double() - ref).abs().max().item()
    err_t = (torch_got.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), scale or 0.0, 1e-30)
    if dtype == torch.float64:
        # the float64 reference is torch itself (torch's error reads 0): a few more ulps
        slack_ulps = max(slack_ulps, 32.0)
    slack = slack_ulps * ulp(dtype) * scale
    assert err_p <= factor * err_t + slack, (
        f"{what}: pynorm's error {err_p:.3g} exceeds {factor} x torch's {err_t:.3g} + {slack:.3g} "
        f"(dtype {dtype}, max|ref| {scale:.3g})")


def seed_of(*parts):
    """A seed from a test's parameters, the same in every process (unlike hash)."""
    return zlib.crc32(repr(parts).encode()) % 2**31


def rand(shape, dtype, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)



def bits(t):
    """The tensor's bits as int64 (bit-for-bit comparisons)."""
    t = t.detach().contiguous()
    carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(carrier).to(torch.int64)

def perturb_params(module, seed):
    """Parameters off their init (ones/zeros would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))


def run_fwd_bwd(module, x, dy):
    """Output, input gradient and parameter gradients of module on x."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def compare_modules(pn_mod, torch_mod, x, dy, dtype, what):
    """pynorm module vs torch module (same state) on x, with a float64 torch
    reference for the accuracy rule: outputs, input and parameter gradients."""
    ref_mod = copy.deepcopy(torch_mod).double()
    y_p, dx_p, g_p = run_fwd_bwd(pn_mod, x, dy)
    y_t, dx_t, g_t = run_fwd_bwd(torch_mod, x, dy)
    y_r, dx_r, g_r = run_fwd_bwd(ref_mod, x.double(), dy.double())
    # natural sizes: an ulp of x is amplified by rstd * |w| in y, and dx is
    # rstd * |dy * w| before its cancellations (C = 1 cancels to 0)
    xd = x.double().reshape(*x.shape[:x.dim() - len(torch_mod.normalized_shape)], -1)
    eps = torch_mod.eps if torch_mod.eps is not None else ulp(torch.float64 if dtype == torch.float64
                                                               else torch.float32)
    spread = xd - xd.mean(-1, keepdim=True) if isinstance(torch_mod, nn.LayerNorm) else xd
    rstd = (spread.pow(2).mean(-1) + eps).rsqrt().max().item()
    w = 1.0 if torch_mod.weight is None else torch_mod.weight.double().abs().max().item()
    check_accuracy(f"{what} y", y_p, y_t, y_r, dtype, scale=rstd * w * xd.abs().max().item())
    check_accuracy(f"{what} dx", dx_p, dx_t, dx_r, dtype, scale=rstd * w * dy.double().abs().max().item())
    assert set(g_p) == set(g_t)
    for name in g_p:
        pdt = dict(pn_mod.named_parameters())[name].dtype
        # parameter gradients sum dy * xhat over rows: their natural size is rows * |dy|
        # (times rstd * |x| where xhat cancels, as for C = 1: there an ulp of x is amplified)
        rows = x.numel() // g_p[name].numel()
        amp = max(1.0, rstd * xd.abs().max().item())
        check_accuracy(f"{what} d{name}", g_p[name], g_t[name], g_r[name], pdt, slack_ulps=16.0,
                       scale=rows * dy.double().abs().max().item() * amp)


# --------------------------------------------------------------------------------------
# import hygiene


def test_import_pynorm_does_not_import_torch(tmp_path, pynorm_env):
    code = "import pynorm, sys; assert 'torch' not in sys.modules, 'pynorm imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=pynorm_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_pynorm_torch_is_the_submodule():
    import importlib
    assert importlib.import_module("pynorm.torch") is pnt
    assert pnt.LayerNorm.__module__.startswith("pynorm.torch")
    assert issubclass(pnt.LayerNorm, nn.LayerNorm) and issubclass(pnt.RMSNorm, nn.RMSNorm)


# --------------------------------------------------------------------------------------
# modules against torch.nn

LN_CONFIGS = [
    # (input shape, normalized_shape, kwargs)
    ((3, 5, 64), 64, {}),
    ((7, 1), 1, {}),
    ((2, 3, 4, 8), (4, 8), {}),
    ((9, 96), 96, {"elementwise_affine": False}),
    ((4, 6, 40), 40, {"bias": False}),
    ((5, 4097), 4097, {"eps": 1e-3}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("cfg", LN_CONFIGS, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[2]}")
def test_layer_norm_module(cfg, dtype):
    shape, ns, kw = cfg
    seed = seed_of(shape, kw)
    torch_mod = nn.LayerNorm(ns, dtype=dtype, **kw)
    perturb_params(torch_mod, seed)
    pn_mod = pnt.LayerNorm(ns, dtype=dtype, **kw)
    pn_mod.load_state_dict(torch_mod.state_dict())
    x, dy = rand(shape, dtype, seed + 1, 2.0, 0.5), rand(shape, dtype, seed + 2)
    compare_modules(pn_mod, torch_mod, x, dy, dtype, f"LayerNorm{shape}")


RMS_CONFIGS = [
    ((3, 5, 64), 64, {}),
    ((7, 3), 3, {"eps": 1e-6}),
    ((2, 3, 4, 8), (4, 8), {}),
    ((9, 96), 96, {"elementwise_affine": False}),
    ((5, 4097), 4097, {"eps": 1e-5}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("cfg", RMS_CONFIGS, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[2]}")
def test_rms_norm_module(cfg, dtype):
    shape, ns, kw = cfg
    seed = seed_of(shape, kw)
    torch_mod = nn.RMSNorm(ns, dtype=dtype, **kw)
    perturb_params(torch_mod, seed)
    pn_mod = pnt.RMSNorm(ns, dtype=dtype, **kw)
    pn_mod.load_state_dict(torch_mod.state_dict())
    x, dy = rand(shape, dtype, seed + 1, 2.0, 0.5), rand(shape, dtype, seed + 2)
    compare_modules(pn_mod, torch_mod, x, dy, dtype, f"RMSNorm{shape}")


@pytest.mark.filterwarnings("ignore:Mismatch dtype")
@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DNAME.get)
def test_half_input_float32_params(cls, dtype):
    """Mixed precision as torch allows it: float32 parameters, half activations."""
    torch_mod = getattr(nn, cls)(48)
    perturb_params(torch_mod, 3)
    pn_mod = getattr(pnt, cls)(48)
    pn_mod.load_state_dict(torch_mod.state_dict())
    x, dy = rand((6, 48), dtype, 4, 2.0), rand((6, 48), dtype, 5)
    y_p, dx_p, g_p = run_fwd_bwd(pn_mod, x, dy)
    y_t, dx_t, g_t = run_fwd_bwd(torch_mod, x, dy)
    assert y_p.dtype == y_t.dtype == dtype and dx_p.dtype == dtype
    tol = dict(atol=4 * ulp(dtype) * 4, rtol=4 * ulp(dtype))
    torch.testing.assert_close(y_p, y_t, **tol)
    torch.testing.assert_close(dx_p, dx_t, **tol)
    for n in g_p:
        assert g_p[n].dtype == torch.float32
        torch.testing.assert_close(g_p[n], g_t[n], atol=0.05, rtol=0.02)


@pytest.mark.filterwarnings("ignore:Mismatch dtype")
def test_cpu_autocast_like_torch():
    """Under CPU autocast torch's norms run in their input's dtype; so do pynorm's."""
    lin = nn.Linear(8, 8)
    x = rand((4, 8), torch.float32, 1)
    for cls, args in (("LayerNorm", (8,)), ("RMSNorm", (8,)), ("GroupNorm", (2, 8)), ("BatchNorm1d", (8,))):
        t, p = getattr(nn, cls)(*args), getattr(pnt, cls)(*args)
        p.load_state_dict(t.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = lin(x)
            yt, yp = t(h), p(h)
        assert yp.dtype == yt.dtype == torch.bfloat16, cls
        torch.testing.assert_close(yp, yt, rtol=2e-2, atol=2e-2)


def test_params_of_another_dtype_are_cast():
    """Weights the kernels do not take (bf16 weight with float32 x) are cast, differentiably."""
    x = rand((5, 16), torch.float32, 2).requires_grad_(True)
    w = rand((16,), torch.bfloat16, 3).requires_grad_(True)
    y = pnt.rms_norm(x, (16,), w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.rms_norm(x, (16,), w.float()), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert w.grad.dtype == torch.bfloat16 and x.grad is not None


def test_train_eval_and_no_grad():
    """Token norms behave the same in train and eval mode, and under no_grad."""
    m = pnt.LayerNorm(32)
    perturb_params(m, 1)
    x = rand((4, 32), torch.float32, 2)
    y_train = m(x)
    m.eval()
    with torch.no_grad():
        y_eval = m(x)
    assert not m.training and not y_eval.requires_grad
    torch.testing.assert_close(y_train.detach(), y_eval, rtol=0, atol=0)


@pytest.mark.parametrize("cls,kw", [("LayerNorm", {}), ("LayerNorm", {"bias": False}),
                                    ("LayerNorm", {"elementwise_affine": False}),
                                    ("RMSNorm", {"eps": 1e-6}), ("RMSNorm", {})])
def test_state_dict_round_trip(cls, kw):
    t = getattr(nn, cls)((4, 6), **kw)
    perturb_params(t, 7)
    p = getattr(pnt, cls)((4, 6), **kw)
    assert list(p.state_dict()) == list(t.state_dict())
    assert [n for n, _ in p.named_parameters()] == [n for n, _ in t.named_parameters()]
    p.load_state_dict(t.state_dict())
    back = getattr(nn, cls)((4, 6), **kw)
    back.load_state_dict(p.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert repr(p) == repr(t)
    x = rand((3, 4, 6), torch.float32, 8)
    torch.testing.assert_close(p(x), t(x), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("offset,rounding", [(1.0, "once"), (0.0, "llama"), (0.5, "llama")])
def test_options_assigned_after_construction(cls, offset, rounding):
    """weight_offset and rounding assigned after construction take effect (forward,
    backward, repr) as if given to the constructor, and assigning the plain ones back
    gives the plain module's bits; a bad value raises, naming it, and changes nothing."""
    dt = torch.bfloat16
    x = rand((3, 16), dt, seed_of(cls, offset, rounding))
    w = rand((16,), dt, 61)
    fresh = getattr(pnt, cls)(16, weight_offset=offset, rounding=rounding, dtype=dt)
    late = getattr(pnt, cls)(16, dtype=dt)
    plain = getattr(pnt, cls)(16, dtype=dt)
    for m in (fresh, late, plain):
        with torch.no_grad():
            m.weight.copy_(w)
    late.weight_offset, late.rounding = offset, rounding
    assert (late.weight_offset, late.rounding) == (float(offset), rounding)
    assert repr(late) == repr(fresh)
    assert torch.equal(late.weight, w), "assigning an option keeps the weight"
    for grad in (False, True):
        xs = [x.clone().requires_grad_(grad) for _ in range(2)]
        with torch.set_grad_enabled(grad):
            ys = [late(xs[0]), fresh(xs[1])]
        assert torch.equal(bits(ys[0].detach()), bits(ys[1].detach())), f"grad={grad}: forward differs"
        if grad:
            for y in ys:
                y.float().sum().backward()
            assert torch.equal(bits(xs[0].grad), bits(xs[1].grad)), "dx differs"
            assert torch.equal(bits(late.weight.grad), bits(fresh.weight.grad)), "dweight differs"
    if (offset, rounding) != (0.0, "once"):
        with torch.no_grad():
            assert not torch.equal(bits(late(x)), bits(plain(x))), "the options changed nothing"
    late.weight_offset, late.rounding = 0.0, "once"
    with torch.no_grad():
        assert torch.equal(bits(late(x)), bits(plain(x))), "back to the plain options: plain bits"
    assert repr(late) == repr(plain)
    for name, value, exc in [("weight_offset", float("nan"), ValueError), ("weight_offset", "1", TypeError),
                             ("rounding", "gemma", ValueError), ("rounding", 1, TypeError)]:
        with pytest.raises(exc, match=name):
            setattr(late, name, value)
        assert (late.weight_offset, late.rounding) == (0.0, "once"), f"a bad {name} changed the module"
    bare = getattr(pnt, cls)(16, elementwise_affine=False)
    with pytest.raises(ValueError, match="weight_offset"):
        bare.weight_offset = 1.0
    assert bare.weight_offset == 0.0

# --------------------------------------------------------------------------------------
# spatial modules against torch.nn


def to_layout(x, layout):
    if layout == "channels_last":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() > 2 else x
    return x.contiguous()


def compare_spatial(pn_mod, torch_mod, x, dy, dtype, what, steps=2):
    """pynorm vs torch module (same state), and a float64 torch reference, over
    `steps` forward/backward calls (running statistics evolve): outputs, input and
    parameter gradients, buffers."""
    ref_mod = copy.deepcopy(torch_mod).double()
    for step in range(steps):
        y_p, dx_p, g_p = run_fwd_bwd(pn_mod, x, dy)
        y_t, dx_t, g_t = run_fwd_bwd(torch_mod, x, dy)
        y_r, dx_r, g_r = run_fwd_bwd(ref_mod, x.double(), dy.double())
        tag = f"{what} step {step}"
        check_accuracy(f"{tag} y", y_p, y_t, y_r, dtype, scale=natural_dx_scale(ref_mod, x, x))
        check_accuracy(f"{tag} dx", dx_p, dx_t, dx_r, dtype, slack_ulps=8.0,
                       scale=natural_dx_scale(ref_mod, x, dy, conditioned=True))
        assert set(g_p) == set(g_t)
        for name in g_p:
            pdt = dict(pn_mod.named_parameters())[name].dtype
            rows = x.numel() // g_p[name].numel()
            check_accuracy(f"{tag} d{name}", g_p[name], g_t[name], g_r[name], pdt, slack_ulps=16.0,
                           scale=rows * dy.double().abs().max().item())
        bp, bt, br = (dict(m.named_buffers()) for m in (pn_mod, torch_mod, ref_mod))
        assert set(bp) == set(bt)
        for name in bp:
            if bp[name].dtype == torch.long:
                assert torch.equal(bp[name], bt[name]), f"{tag} {name}"
            else:
                check_accuracy(f"{tag} {name}", bp[name], bt[name], br[name], bp[name].dtype,
                               slack_ulps=8.0, scale=x.double().abs().max().item())


def natural_dx_scale(mod, x, dy, conditioned=False):
    """rstd * max|dy| * max|w|: the size of dx before the cancellations of the
    backward (where dx itself is tiny, e.g. groups of two values, its error is
    measured against this). With dy = x: how far an ulp of x moves y."""
    xd = x.double()
    if xd.dim() == 2 and isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        xd = xd.unsqueeze(0)                            # unbatched (C, L)
    N, C = xd.shape[0], xd.shape[1]
    if isinstance(mod, nn.GroupNorm):
        var = xd.reshape(N, mod.num_groups, -1).var(-1, unbiased=False)
    elif isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        var = xd.reshape(N, C, -1).var(-1, unbiased=False)
    elif mod.training or mod.running_var is None:
        var = xd.movedim(1, 0).reshape(C, -1).var(-1, unbiased=False)
    else:
        var = mod.running_var.double()
    rstd = (var + mod.eps).rsqrt().max().item()
    w = 1.0 if mod.weight is None else mod.weight.double().abs().max().item()
    # conditioning: the saved mean carries an ulp of |x|, which xhat = (x - mean) * rstd
    # multiplies by rstd (large for groups of a few nearly equal values)
    cond = max(1.0, rstd * xd.abs().max().item()) if conditioned else 1.0
    return rstd * w * dy.double().abs().max().item() * cond


SPATIAL_SHAPES = [(4, 6, 5, 7), (3, 6, 11), (2, 6, 3, 4, 5), (8, 6)]
SPATIAL_LAYOUTS = ["contiguous", "channels_last", "strided"]


def _spatial_case(cls, shape, layout, dtype, kw, seed, steps=2):
    torch_mod = getattr(nn, cls)(**kw).to(dtype)
    perturb_params(torch_mod, seed)
    pn_mod = getattr(pnt, cls)(**kw).to(dtype)
    pn_mod.load_state_dict(torch_mod.state_dict())
    x = to_layout(rand(shape, dtype, seed + 1, 2.0, 0.5), layout)
    dy = rand(shape, dtype, seed + 2)
    compare_spatial(pn_mod, torch_mod, x, dy, dtype, f"{cls}{shape} {layout} {kw}", steps)
    y = pn_mod(x)
    if layout == "channels_last" and x.dim() > 2 and not x.is_contiguous():
        assert y.movedim(1, -1).is_contiguous(), "channels_last input gives channels_last output"


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("layout", SPATIAL_LAYOUTS)
@pytest.mark.parametrize("shape", SPATIAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_module(shape, layout, dtype):
    for kw in ({"num_groups": 3, "num_channels": 6}, {"num_groups": 6, "num_channels": 6, "affine": False},
               {"num_groups": 1, "num_channels": 6, "eps": 1e-3}):
        _spatial_case("GroupNorm", shape, layout, dtype, kw, seed=seed_of(shape, layout), steps=1)


BN_KWARGS = [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
             {"momentum": 0.3, "eps": 1e-3}]


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("layout", SPATIAL_LAYOUTS)
@pytest.mark.parametrize("shape", SPATIAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_module(shape, layout, dtype):
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    for kw in BN_KWARGS:
        _spatial_case(cls, shape, layout, dtype, dict(kw, num_features=6), seed=len(shape))


@pytest.mark.parametrize("shape", SPATIAL_SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_eval_and_train_switch(shape):
    cls = {3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    t = getattr(nn, cls)(6)
    perturb_params(t, 5)
    p = getattr(pnt, cls)(6)
    p.load_state_dict(t.state_dict())
    x = rand(shape, torch.float32, 6, 3.0, 1.0)
    compare_spatial(p, t, x, rand(shape, torch.float32, 7), torch.float32, "train", steps=2)
    t.eval()
    p.eval()
    before = {k: v.clone() for k, v in p.state_dict().items()}
    compare_spatial(p, t, x, rand(shape, torch.float32, 8), torch.float32, "eval", steps=1)
    for k, v in p.state_dict().items():
        assert torch.equal(v, before[k]), f"eval changed {k}"


IN_KWARGS = [{}, {"affine": True}, {"affine": True, "track_running_stats": True},
             {"track_running_stats": True, "momentum": 0.5}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DNAME.get)
@pytest.mark.parametrize("layout", SPATIAL_LAYOUTS)
@pytest.mark.parametrize("shape", SPATIAL_SHAPES[:3] + [(6, 9)], ids=lambda s: "x".join(map(str, s)))
def test_instance_norm_module(shape, layout, dtype):
    cls = {2: "InstanceNorm1d", 3: "InstanceNorm1d", 4: "InstanceNorm2d", 5: "InstanceNorm3d"}[len(shape)]
    for kw in IN_KWARGS:
        _spatial_case(cls, shape, layout, dtype, dict(kw, num_features=6), seed=len(shape) + 10)


def test_instance_norm_eval_uses_running_stats():
    t = nn.InstanceNorm2d(6, affine=True, track_running_stats=True)
    perturb_params(t, 1)
    p = pnt.InstanceNorm2d(6, affine=True, track_running_stats=True)
    p.load_state_dict(t.state_dict())
    x = rand((3, 6, 4, 5), torch.float32, 2, 2.0, 1.0)
    t(x), p(x)                                  # one training step moves the running stats
    t.eval()
    p.eval()
    torch.testing.assert_close(p(x), t(x), rtol=1e-5, atol=1e-5)
    for k, v in t.state_dict().items():
        torch.testing.assert_close(p.state_dict()[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kw", [("GroupNorm", {"num_groups": 2, "num_channels": 4}),
                                    ("BatchNorm2d", {"num_features": 4}),
                                    ("BatchNorm1d", {"num_features": 4, "momentum": None}),
                                    ("InstanceNorm3d", {"num_features": 4, "affine": True,
                                                        "track_running_stats": True})])
def test_spatial_state_dict_round_trip(cls, kw):
    t = getattr(nn, cls)(**kw)
    perturb_params(t, 3)
    p = getattr(pnt, cls)(**kw)
    assert list(p.state_dict()) == list(t.state_dict())
    assert [n for n, _ in p.named_buffers()] == [n for n, _ in t.named_buffers()]
    p.load_state_dict(t.state_dict())
    back = getattr(nn, cls)(**kw)
    back.load_state_dict(p.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert repr(p) == repr(t)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kw", [{}, {"affine": True}, {"track_running_stats": True}], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 3, 1)], ids=["2d", "1d"])
def test_instance_norm_one_spatial_element_as_torch(kw, train, shape):
    """torch raises ValueError when instance statistics would come from one element
    (training, or no running statistics); pynorm raises the same, else agrees."""
    cls = {4: (nn.InstanceNorm2d, pnt.InstanceNorm2d), 3: (nn.InstanceNorm1d, pnt.InstanceNorm1d)}[len(shape)]
    base, twin = cls[0](3, **kw).train(train), cls[1](3, **kw).train(train)
    x = rand(shape, torch.float32, 1)
    try:
        expected = base(x)
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            twin(x)
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            pnt.instance_norm(x)
        assert twin.state_dict().keys() == base.state_dict().keys()
        for a, b in zip(twin.buffers(), base.buffers()):
            assert torch.equal(a, b), "a failed call changed the running statistics"
        return
    torch.testing.assert_close(twin(x), expected)


def test_spatial_errors():
    with pytest.raises(ValueError, match="num_groups"):
        pnt.group_norm(torch.randn(2, 6, 3), 4)
    with pytest.raises(ValueError, match="more than 1 value"):
        pnt.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="running"):
        pnt.batch_norm(torch.randn(4, 3), None, None, training=False)


# --------------------------------------------------------------------------------------
# strides and copies


def aten_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}


def ran_pynorm(names, op):
    """Whether profiler event names show pynorm's operator `op` (or, in eager mode,
    the autograd.Function that stands for it)."""
    return f"pynorm::{op}" in names or f"PynormEager_{op}" in names


@pytest.mark.parametrize("layout", ["contiguous", "rows_strided", "sliced_rows"])
def test_no_copies_for_addressable_inputs(layout):
    base = rand((6, 8, 64), torch.float32, 11)
    x = {"contiguous": base, "rows_strided": base.transpose(0, 1),
         "sliced_rows": base[:, ::2, :]}[layout]
    assert x.is_contiguous() == (layout == "contiguous")
    w, b = rand((64,), torch.float32, 12), rand((64,), torch.float32, 13)
    names = aten_ops(lambda: pnt.layer_norm(x, (64,), w, b))           # no grad: the kernel only
    assert names == {"aten::empty"}, names
    wg = w.clone().requires_grad_(True)
    names = aten_ops(lambda: pnt.layer_norm(x, (64,), wg, b))
    assert ran_pynorm(names, "layer_norm_fwd")
    assert not names & COPY_OPS, names & COPY_OPS
    torch.testing.assert_close(pnt.layer_norm(x, (64,), w, b), F.layer_norm(x, (64,), w, b))
    # backward: dy and x read in place too
    y, mean, rstd = OPS.layer_norm_fwd(x, w, None, 1e-5)
    dy = rand(tuple(x.shape), torch.float32, 14).transpose(0, 1).contiguous().transpose(0, 1) \
        if layout == "rows_strided" else rand(tuple(x.shape), torch.float32, 14)
    names = aten_ops(lambda: OPS.layer_norm_bwd(dy, x, mean, rstd, w, True, True, True))
    assert not names & COPY_OPS, names & COPY_OPS


@pytest.mark.parametrize("op", ["layer", "rms"])
def test_strided_inputs_match_torch(op):
    base = rand((5, 7, 2 * 33), torch.float32, 21)
    xs = [base.transpose(0, 1), base[..., ::2], base[:, 1::2, :33], base.expand(3, 5, 7, 66)[1]]
    w = rand((33,), torch.float32, 22)
    for x in xs:
        x = x[..., :33]
        if op == "layer":
            got, want = pnt.layer_norm(x, (33,), w, w), F.layer_norm(x, (33,), w, w)
        else:
            got, want = pnt.rms_norm(x, (33,), w), F.rms_norm(x, (33,), w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.is_contiguous()


def test_broadcast_residual_rows():
    """A residual whose rows all alias one row (stride 0) is read correctly."""
    x = rand((4, 16), torch.float32, 31)
    r = rand((1, 16), torch.float32, 32).expand(4, 16)
    y, h = pnt.add_rms_norm(x, r, (16,))
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, F.rms_norm(x + r, (16,)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# fused residual ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DNAME.get)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("use_h", [True, False], ids=["h_used", "h_unused"])
def test_fused_residual_ops(op, dtype, use_h):
    shape, C = (3, 5, 48), 48
    x0, r0 = rand(shape, dtype, 41, 2.0), rand(shape, dtype, 42)
    w0, b0 = rand((C,), dtype, 43, 0.3, 1.0), rand((C,), dtype, 44, 0.1)
    gy, gh = rand(shape, dtype, 45), rand(shape, dtype, 46)

    def run(kind, cast):
        x, r, w, b = (t.detach().to(cast).requires_grad_(True) for t in (x0, r0, w0, b0))
        if kind == "pynorm":
            y, h = (pnt.add_layer_norm(x, r, (C,), w, b) if op == "add_layer_norm"
                    else pnt.add_rms_norm(x, r, (C,), w))
        else:
            h = x + r
            y = F.layer_norm(h, (C,), w, b) if op == "add_layer_norm" else F.rms_norm(h, (C,), w)
        loss = (y * gy.to(cast)).sum() + ((h * gh.to(cast)).sum() if use_h else 0)
        loss.backward()
        grads = [x.grad, r.grad, w.grad] + ([b.grad] if op == "add_layer_norm" else [])
        return [y.detach(), h.detach()] + grads

    got, tor, ref = run("pynorm", dtype), run("torch", dtype), run("torch", torch.float64)
    names = ["y", "h", "dx", "dresidual", "dweight", "dbias"]
    for name, g, t, r in zip(names, got, tor, ref):
        check_accuracy(f"{op} {name}", g, t, r, dtype, slack_ulps=16.0)
    torch.testing.assert_close(got[2], got[3], rtol=0, atol=0)   # d(x) == d(residual)


# --------------------------------------------------------------------------------------
# operator registration: opcheck and gradcheck


def _opcheck_cases():
    C = 24
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        x = rand((3, 4, C), dtype, 51).requires_grad_(True)
        xs = rand((4, 3, C), dtype, 52).transpose(0, 1).requires_grad_(False)
        r = rand((3, 4, C), dtype, 53).requires_grad_(True)
        w = rand((C,), torch.float32, 54).requires_grad_(True)
        b = rand((C,), torch.float32, 55).requires_grad_(True)
        d = DNAME[dtype]
        cases += [
            (f"layer_norm_fwd-{d}", OPS.layer_norm_fwd, (x, w, b, 1e-5)),
            (f"layer_norm_fwd-{d}-noparams-strided", OPS.layer_norm_fwd, (xs, None, None, 1e-5)),
            (f"rms_norm_fwd-{d}", OPS.rms_norm_fwd, (x, w, 1e-6)),
            (f"rms_norm_fwd-{d}-strided", OPS.rms_norm_fwd, (xs, None, 1e-6)),
            (f"add_layer_norm_fwd-{d}", OPS.add_layer_norm_fwd, (x, r, w, b, 1e-5)),
            (f"add_rms_norm_fwd-{d}", OPS.add_rms_norm_fwd, (x, r, w, 1e-5)),
        ]
        xd, wd = x.detach(), w.detach()
        y, mean, rstd = OPS.layer_norm_fwd(xd, wd, None, 1e-5)
        dy = rand(tuple(y.shape), dtype, 56)
        cases.append((f"layer_norm_bwd-{d}", OPS.layer_norm_bwd, (dy, xd, mean, rstd, wd, True, True, True)))
        cases.append((f"layer_norm_bwd-{d}-dx-only", OPS.layer_norm_bwd,
                      (dy, xd, mean, rstd, None, True, False, False)))
        y, rstd = OPS.rms_norm_fwd(xd, wd, 1e-5)
        cases.append((f"rms_norm_bwd-{d}", OPS.rms_norm_bwd, (dy, xd, rstd, wd, True, True)))
    for dtype in (torch.float32, torch.bfloat16):
        d = DNAME[dtype]
        for layout in ("nchw", "nhwc"):
            x = to_layout(rand((3, 6, 4, 5), dtype, 57),
                          "channels_last" if layout == "nhwc" else "contiguous")
            x.requires_grad_(True)
            w = rand((6,), torch.float32, 58).requires_grad_(True)
            b = rand((6,), torch.float32, 59).requires_grad_(True)
            rm, rv = rand((6,), torch.float32, 60), rand((6,), torch.float32, 61).abs() + 0.5
            tag = f"{d}-{layout}"
            cases += [
                (f"group_norm_fwd-{tag}", OPS.group_norm_fwd, (x, w, b, 3, 1e-5)),
                (f"group_norm_fwd-{tag}-noparams", OPS.group_norm_fwd, (x, None, None, 6, 1e-5)),
                (f"batch_norm_fwd-train-{tag}", OPS.batch_norm_fwd,
                 (x, w, b, rm, rv, None, True, 0.1, False, 1e-5)),
                (f"batch_norm_fwd-cumulative-{tag}", OPS.batch_norm_fwd,
                 (x, w, b, rm, rv, torch.tensor(3), True, 0.0, True, 1e-5)),
                (f"batch_norm_fwd-eval-{tag}", OPS.batch_norm_fwd,
                 (x, w, b, rm, rv, None, False, 0.1, False, 1e-5)),
                (f"batch_norm_fwd-nostats-{tag}", OPS.batch_norm_fwd,
                 (x, None, None, None, None, None, True, 0.1, False, 1e-5)),
            ]
            xd, wd = x.detach(), w.detach()
            dy = rand((3, 6, 4, 5), dtype, 62)
            _, mean, rstd = OPS.group_norm_fwd(xd, wd, None, 3, 1e-5)
            cases.append((f"group_norm_bwd-{tag}", OPS.group_norm_bwd,
                          (dy, xd, mean, rstd, wd, 3, True, True, True)))
            _, mean, rstd, _, _ = OPS.batch_norm_fwd(xd, wd, None, None, None, None, True, 0.1, False, 1e-5)
            cases.append((f"batch_norm_bwd-{tag}", OPS.batch_norm_bwd,
                          (dy, xd, mean, rstd, wd, True, True, True, False)))
    return cases


@pytest.mark.parametrize("case", _opcheck_cases(), ids=lambda c: c[0])
def test_opcheck(case):
    _, op, args = case
    opcheck(op, args)


def _f64(shape, seed, grad=True):
    return rand(shape, torch.float64, seed).requires_grad_(grad)


GRADCHECK_CASES = {
    "layer_norm": lambda: (lambda x, w, b: pnt.layer_norm(x, (6,), w, b),
                           (_f64((3, 4, 6), 1), _f64((6,), 2), _f64((6,), 3))),
    "layer_norm_no_params": lambda: (lambda x: pnt.layer_norm(x, (6,)), (_f64((5, 6), 4),)),
    "layer_norm_2d_shape": lambda: (lambda x, w, b: pnt.layer_norm(x, (2, 3), w, b),
                                    (_f64((4, 2, 3), 5), _f64((2, 3), 6), _f64((2, 3), 7))),
    "rms_norm": lambda: (lambda x, w: pnt.rms_norm(x, (6,), w, 1e-6),
                         (_f64((3, 4, 6), 8), _f64((6,), 9))),
    "rms_norm_strided": lambda: (lambda x, w: pnt.rms_norm(x.transpose(0, 1), (6,), w),
                                 (_f64((4, 3, 6), 10), _f64((6,), 11))),
    "add_layer_norm": lambda: (lambda x, r, w, b: pnt.add_layer_norm(x, r, (6,), w, b),
                               (_f64((3, 6), 12), _f64((3, 6), 13), _f64((6,), 14), _f64((6,), 15))),
    "add_rms_norm": lambda: (lambda x, r, w: pnt.add_rms_norm(x, r, (6,), w),
                             (_f64((3, 6), 16), _f64((3, 6), 17), _f64((6,), 18))),
    "add_rms_norm_y_only": lambda: (lambda x, r: pnt.add_rms_norm(x, r, (6,))[0],
                                    (_f64((3, 6), 19), _f64((3, 6), 20))),
    "weight_only_grad": lambda: (lambda w: pnt.layer_norm(_f64((3, 6), 21, grad=False), (6,), w),
                                 (_f64((6,), 22),)),
    "group_norm": lambda: (lambda x, w, b: pnt.group_norm(x, 2, w, b),
                           (_f64((2, 4, 3, 3), 23), _f64((4,), 24), _f64((4,), 25))),
    "group_norm_channels_last": lambda: (
        lambda x, w, b: pnt.group_norm(x.to(memory_format=torch.channels_last), 4, w, b),
        (_f64((2, 4, 3, 3), 26), _f64((4,), 27), _f64((4,), 28))),
    "batch_norm_train": lambda: (lambda x, w, b: pnt.batch_norm(x, None, None, w, b, True),
                                 (_f64((3, 4, 5), 29), _f64((4,), 30), _f64((4,), 31))),
    "batch_norm_train_channels_last": lambda: (
        lambda x, w, b: pnt.batch_norm(x.to(memory_format=torch.channels_last), None, None, w, b, True),
        (_f64((2, 4, 3, 3), 32), _f64((4,), 33), _f64((4,), 34))),
    "batch_norm_eval": lambda: (
        lambda x, w, b: pnt.batch_norm(x, torch.zeros(4, dtype=torch.float64),
                                       torch.full((4,), 1.5, dtype=torch.float64), w, b, False),
        (_f64((3, 4, 5), 35), _f64((4,), 36), _f64((4,), 37))),
    "instance_norm": lambda: (lambda x, w, b: pnt.instance_norm(x, weight=w, bias=b),
                              (_f64((2, 4, 6), 38), _f64((4,), 39), _f64((4,), 40))),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_float64(name):
    fn, args = GRADCHECK_CASES[name]()
    assert torch.autograd.gradcheck(fn, args)


# --------------------------------------------------------------------------------------
# eager fast path (autograd.Function) == operators


def _all_ops_case(seed):
    """Every functional op with gradients: outputs and input/parameter gradients."""
    x = rand((3, 6, 4, 5), torch.float32, seed).requires_grad_(True)
    r = rand((3, 6, 4, 5), torch.float32, seed + 1).requires_grad_(True)
    w5 = rand((5,), torch.float32, seed + 2).requires_grad_(True)
    b5 = rand((5,), torch.float32, seed + 3).requires_grad_(True)
    w6 = rand((6,), torch.float32, seed + 4).requires_grad_(True)
    b6 = rand((6,), torch.float32, seed + 5).requires_grad_(True)
    rm, rv = torch.zeros(6), torch.ones(6)
    xl = x.to(memory_format=torch.channels_last)
    outs = [
        pnt.layer_norm(x, (5,), w5, b5), pnt.rms_norm(x.transpose(1, 2), (5,), w5),
        *pnt.add_layer_norm(x, r, (5,), w5, b5), *pnt.add_rms_norm(x, r, (5,), w5),
        pnt.group_norm(x, 3, w6, b6), pnt.group_norm(xl, 2, w6, b6),
        pnt.batch_norm(xl, rm, rv, w6, b6, training=True),
        pnt.batch_norm(x, rm, rv, w6, b6, training=False),
        pnt.instance_norm(x, weight=w6, bias=b6),
    ]
    loss = sum((o * rand(tuple(o.shape), torch.float32, seed + 10 + i)).sum() for i, o in enumerate(outs))
    grads = torch.autograd.grad(loss, (x, r, w5, b5, w6, b6))
    return [o.detach() for o in outs] + list(grads) + [rm, rv]


def test_eager_fast_path_matches_operators(monkeypatch):
    from pynorm.torch import _dispatch
    fast = _all_ops_case(5)
    with torch.profiler.profile() as prof:
        _all_ops_case(5)
    names = {e.name for e in prof.events()}
    assert "PynormEager_layer_norm_fwd" in names and not any(n.startswith("pynorm::") for n in names)
    monkeypatch.setattr(_dispatch, "FAST_EAGER", False)
    slow = _all_ops_case(5)
    with torch.profiler.profile() as prof:
        _all_ops_case(5)
    names = {e.name for e in prof.events()}
    assert "pynorm::layer_norm_fwd" in names and "pynorm::batch_norm_bwd" in names
    assert not any(n.startswith("PynormEager") for n in names)
    assert len(fast) == len(slow)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert torch.equal(a, b), f"result {i} differs between the fast path and the operators"


def test_operators_path_for_modules(monkeypatch):
    """The module comparisons above run the eager fast path; a few through the operators."""
    from pynorm.torch import _dispatch
    monkeypatch.setattr(_dispatch, "FAST_EAGER", False)
    test_layer_norm_module(LN_CONFIGS[2], torch.float32)
    test_rms_norm_module(RMS_CONFIGS[0], torch.bfloat16)
    test_fused_residual_ops("add_layer_norm", torch.float32, True)
    test_batch_norm_module((4, 6, 5, 7), "channels_last", torch.float32)
    test_instance_norm_module((3, 6, 11), "contiguous", torch.float32)
    test_replace_norms_transformer(True)


# ---- the modules' straight path (pynorm.torch._fast) -----------------------------------------
# Plain eager calls on contiguous CPU input skip the operators and the general eager
# path: the same kernels reached with fewer torch and Python steps. They must give
# the same bits as the operators, parameter gradients and running statistics included.

STRAIGHT_MODULES = {
    "LayerNorm": lambda dt: nn.LayerNorm(24).to(dt),
    "LayerNorm_fp32_params": lambda dt: nn.LayerNorm(24),
    "LayerNorm_no_bias": lambda dt: nn.LayerNorm(24, bias=False).to(dt),
    "LayerNorm_no_affine": lambda dt: nn.LayerNorm(24, elementwise_affine=False),
    "RMSNorm": lambda dt: nn.RMSNorm(24).to(dt),
    "RMSNorm_eps": lambda dt: nn.RMSNorm(24, eps=1e-3).to(dt),
    "GroupNorm": lambda dt: nn.GroupNorm(3, 6).to(dt),
    "InstanceNorm2d": lambda dt: nn.InstanceNorm2d(6, affine=True).to(dt),
    "InstanceNorm1d_no_affine": lambda dt: nn.InstanceNorm1d(6),
    "BatchNorm2d_train": lambda dt: nn.BatchNorm2d(6).to(dt).train(),
    "BatchNorm2d_cumulative": lambda dt: nn.BatchNorm2d(6, momentum=None).to(dt).train(),
    "BatchNorm2d_eval": lambda dt: nn.BatchNorm2d(6).to(dt).eval(),
    "BatchNorm1d_untracked": lambda dt: nn.BatchNorm1d(6, track_running_stats=False).to(dt).train(),
}


def _straight_input(name, dtype, seed):
    if name.startswith(("LayerNorm", "RMSNorm")):
        return rand((2, 3, 24), dtype, seed)
    if "1d" in name:
        return rand((4, 6, 9), dtype, seed)
    return rand((4, 6, 5, 3), dtype, seed)


def _straight_run(make, name, dtype, grad, seed):
    """(outputs, gradients, buffers) of two forwards (+ backward) of a fresh twin."""
    torch.manual_seed(0)
    mod = _swap_one(make(dtype))
    perturb_params(mod, seed)
    outs = []
    for step in range(2):
        x = _straight_input(name, dtype, seed + step).requires_grad_(grad)
        if grad:
            y = mod(x)
            y.backward(rand(tuple(y.shape), dtype, seed + 10 + step))
            outs += [y.detach(), x.grad]
        else:
            with torch.no_grad():
                outs.append(mod(x))
    outs += [p.grad if p.grad is not None else torch.zeros(0) for p in mod.parameters()]
    return outs + [b.clone() for b in mod.buffers()]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "fwd_bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("name", list(STRAIGHT_MODULES))
def test_module_straight_path_matches_operators(monkeypatch, name, dtype, grad):
    from pynorm.torch import _dispatch, _fast
    make = STRAIGHT_MODULES[name]
    taken = []

    def spy(orig):
        def call(*args):
            out = orig(*args)
            taken.append(out is not None)
            return out
        return call

    for fn in ("token_norm", "group_norm", "batch_norm"):
        monkeypatch.setattr(_fast, fn, spy(getattr(_fast, fn)))
    straight = _straight_run(make, name, dtype, grad, 3)
    assert taken and all(taken), f"{name}: the straight path was not taken"
    monkeypatch.setattr(_dispatch, "FAST_EAGER", False)
    general = _straight_run(make, name, dtype, grad, 3)
    assert len(straight) == len(general)
    for i, (a, b) in enumerate(zip(straight, general)):
        assert a.dtype == b.dtype and torch.equal(a, b), \
            f"{name} {DNAME[dtype]}: result {i} differs between the straight path and the operators"


@pytest.mark.parametrize("case", ["channels_last", "sliced", "param_f64", "parametrized", "unbatched"])
def test_module_straight_path_declines_unusual_input(case):
    """What the straight path does not take (it returns None) still runs, through the
    general path, with torch.nn's result."""
    from pynorm.torch import _fast
    x = rand((4, 6, 5, 3), torch.float32, 1)
    if case == "channels_last":
        t, x = nn.GroupNorm(3, 6), x.to(memory_format=torch.channels_last)
        assert _fast.group_norm(pnt.GroupNorm(3, 6), x, 3) is None
    elif case == "sliced":
        t, x = nn.LayerNorm(3), x[:, ::2]
        assert _fast.token_norm(pnt.LayerNorm(3), x, False) is None
    elif case == "param_f64":
        t = nn.LayerNorm(3)
        t.weight = nn.Parameter(torch.ones(3, dtype=torch.float64))
        assert _fast.token_norm(_swap_one(t), x, False) is None
        ref = F.layer_norm(x.double(), (3,), t.weight, t.bias.double()).float()
        torch.testing.assert_close(_swap_one(t)(x), ref, rtol=1e-5, atol=1e-5)
        return
    elif case == "parametrized":
        t = nn.LayerNorm(3)
        torch.nn.utils.parametrize.register_parametrization(t, "weight", _Double())
        assert _fast.token_norm(_swap_one(t), x, False) is None
    else:
        t, x = nn.InstanceNorm1d(6, affine=True), x[0, :, :, 0]
    p = _swap_one(t)
    torch.testing.assert_close(p(x), t(x), rtol=1e-5, atol=1e-5)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def _swap_one(mod):
    box = nn.Sequential(copy.deepcopy(mod))
    pnt.replace_norms(box)
    return box[0]


def empty_batch_matches_torch(name):
    """An empty batch (torch's own module samples have one): an empty output and
    input gradient, zero parameter gradients, running statistics as they were
    (num_batches_tracked still counts the call in training), as torch.nn gives
    where it takes the batch (its InstanceNorm raises IndexError on one)."""
    base = STRAIGHT_MODULES[name](torch.float32)
    perturb_params(base, 5)
    twin = _swap_one(base)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    x = _straight_input(name, torch.float32, 6)[:0]
    results = []
    for mod in (twin, base):
        xi = x.clone().requires_grad_(True)
        try:
            y = mod(xi)
        except IndexError:
            assert mod is base and name.startswith("InstanceNorm"), f"{name}: the twin raised on an empty batch"
            break
        y.sum().backward()
        results.append((y.detach(), xi.grad, [p.grad for p in mod.parameters()], mod.state_dict()))
    y, dx, grads, state = results[0]
    assert y.shape == x.shape and y.dtype == x.dtype and dx.shape == x.shape
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g)), f"{name}: parameter gradient of an empty batch {g}"
    for key, value in state.items():
        counted = before[key] + (1 if key.endswith("num_batches_tracked") and twin.training else 0)
        assert torch.equal(value, counted), f"{name}: {key} after an empty batch: {value}, before {before[key]}"
    if len(results) == 2:
        _, _, torch_grads, torch_state = results[1]
        assert all(torch.equal(a, b) for a, b in zip(grads, torch_grads))
        assert all(torch.equal(a, b) for a, b in zip(state.values(), torch_state.values()))


@pytest.mark.parametrize("name", list(STRAIGHT_MODULES))
def test_empty_batch(name):
    empty_batch_matches_torch(name)


@pytest.mark.parametrize("case", ["plain", "no_bias", "no_affine", "parametrized", "functional_call"])
def test_modules_read_parameters_as_attributes_would(case):
    """The modules' eager calls read weight and bias from _parameters (no
    nn.Module.__getattr__): the same tensors as the attributes, a parametrized weight
    included, and torch.func.functional_call's substitutes take effect."""
    from pynorm.torch._modules import _weight_bias
    kw = {"no_bias": dict(bias=False), "no_affine": dict(elementwise_affine=False)}.get(case, {})
    m = pnt.LayerNorm(8, **kw)
    perturb_params(m, 71)
    x = rand((3, 8), torch.float32, 72)
    if case == "parametrized":
        torch.nn.utils.parametrize.register_parametrization(m, "weight", _Double())
    if case == "functional_call":
        w, b = rand((8,), torch.float32, 73), rand((8,), torch.float32, 74)
        got = torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))
        torch.testing.assert_close(got, F.layer_norm(x, (8,), w, b), rtol=1e-5, atol=1e-5)
        return
    w, b = _weight_bias(m)
    want_w, want_b = m.weight, m.bias
    assert (w is None) == (want_w is None) and (b is None) == (want_b is None), case
    if w is not None:
        assert torch.equal(w, want_w), f"{case}: weight differs from m.weight"
    if b is not None:
        assert b is want_b, f"{case}: bias is not m.bias"
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.layer_norm(x, (8,), want_w, want_b), rtol=1e-5, atol=1e-5)

def test_straight_path_batch_norm_bumps_running_stat_versions():
    """The kernel updates BatchNorm's running statistics in place; autograd is told,
    as an in-place torch op would tell it."""
    m = _swap_one(nn.BatchNorm2d(6).train())
    v = m.running_mean._version, m.running_var._version
    with torch.no_grad():
        m(rand((4, 6, 5, 3), torch.float32, 1))
    assert m.running_mean._version > v[0] and m.running_var._version > v[1]


def test_straight_path_errors_are_clear():
    """The kernels' status comes back as the general path's exception types."""
    m = pnt.LayerNorm(8, eps=-1.0)
    with pytest.raises(ValueError, match="layer_norm"):
        with torch.no_grad():
            m(rand((2, 8), torch.float32, 1))
    with pytest.raises(ValueError, match="layer_norm"):
        m(rand((2, 8), torch.float32, 1))


@pytest.mark.parametrize("fast", [True, False], ids=["eager_fast_path", "operators"])
def test_double_backward_raises(monkeypatch, fast):
    """Backward is first-order only: a second derivative raises rather than
    silently treating the backward's outputs as constants."""
    from pynorm.torch import _dispatch
    monkeypatch.setattr(_dispatch, "FAST_EAGER", fast)
    x = rand((3, 8), torch.float32, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(pnt.layer_norm(x, (8,)).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        g.sum().backward()


def test_fake_tensors_take_the_operators():
    """Under FakeTensorMode (what torch.export and compile use) the fake
    implementations answer: shapes, dtypes and channels_last strides, no kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 6, 4, 5).to(memory_format=torch.channels_last)
        y = pnt.group_norm(x, 3, torch.ones(6), torch.zeros(6))
        assert y.shape == x.shape and y.stride() == x.stride()
        z = pnt.LayerNorm(5)(torch.empty(3, 5, dtype=torch.bfloat16))
        assert z.shape == (3, 5) and z.dtype == torch.bfloat16


def test_meta_device():
    m = pnt.LayerNorm(16, device="meta")
    y = m(torch.empty(4, 16, device="meta"))
    assert y.device.type == "meta" and y.shape == (4, 16)


# --------------------------------------------------------------------------------------
# torch.compile


class _Net(nn.Module):
    def __init__(self, C=32):
        super().__init__()
        self.fc = nn.Linear(C, C)
        self.ln = pnt.LayerNorm(C)
        self.rms = pnt.RMSNorm(C)
        self.w = nn.Parameter(torch.ones(C))

    def forward(self, x):
        a = self.ln(self.fc(x))
        y, h = pnt.add_rms_norm(a, x, (a.shape[-1],), self.w)
        return self.rms(y) + h.sin()


def test_torch_compile_fullgraph():
    """No graph breaks (fullgraph=True raises on one), same forward and gradients as
    eager. backend="aot_eager" traces the forward and the backward through the
    operators' fake implementations, as inductor does, without inductor's C++
    compile (about 10 s here)."""
    torch._dynamo.reset()
    net = _Net()
    perturb_params(net, 61)
    x = rand((4, 7, 32), torch.float32, 62)
    compiled = torch.compile(copy.deepcopy(net), fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager, y_comp = net(x1), compiled(x2)
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    y_eager.sum().backward()
    y_comp.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    for (n, p), (_, q) in zip(net.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=n)
    # a second shape reuses (or recompiles) the graph without breaking it
    x3 = rand((2, 5, 32), torch.float32, 63)
    torch.testing.assert_close(compiled(x3), net(x3), rtol=0, atol=0)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = pnt.BatchNorm2d(8)
        self.gn = pnt.GroupNorm(2, 8)
        self.inorm = pnt.InstanceNorm2d(8, affine=True)
        self.bn_cum = pnt.BatchNorm2d(8, momentum=None)

    def forward(self, x):
        x = self.gn(torch.relu(self.bn(self.conv(x))))
        return self.bn_cum(self.inorm(x.to(memory_format=torch.channels_last)))


def test_torch_compile_fullgraph_spatial():
    """BatchNorm's running statistics (buffers updated in place, the batch count
    for momentum=None) compile without graph breaks too."""
    torch._dynamo.reset()
    net = _ConvNet().train()
    perturb_params(net, 64)
    twin = copy.deepcopy(net)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = rand((2, 3, 9, 9), torch.float32, 65 + step)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = net(x1), compiled(x2)
        torch.testing.assert_close(y2, y1, rtol=0, atol=0)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    for (n, b), (_, c) in zip(net.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=n)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit internals inductor imports
def test_torch_compile_inductor():
    """The default backend too (inductor, which compiles C++ with gcc here: about
    10 s on a 2-core machine, so one small model only)."""
    torch._dynamo.reset()
    net = _Net(16)
    perturb_params(net, 66)
    compiled = torch.compile(copy.deepcopy(net), fullgraph=True)
    x = rand((3, 5, 16), torch.float32, 67)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = net(x1), compiled(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)


def test_torch_compile_graph_holds_pynorm_ops():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = pnt.LayerNorm(16)
    f = torch.compile(m, fullgraph=True, backend=backend)
    f(torch.randn(3, 16))
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("pynorm.layer_norm_fwd" in t for t in targets), targets


# --------------------------------------------------------------------------------------
# replace_norms


class LlamaRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm, verbatim in substance."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's: matches the name rule and scales by (1 + weight): swapped with weight_offset=1."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class MyLayerNorm(nn.LayerNorm):
    """A subclass with its own forward: not replaced."""

    def forward(self, x):
        return super().forward(x) * 2


class TinyLlama(nn.Module):
    def __init__(self, C=32):
        super().__init__()
        self.norm1 = LlamaRMSNorm(C)
        self.fc = nn.Linear(C, C)
        self.norm2 = nn.RMSNorm(C)
        self.gemma = GemmaRMSNorm(C)
        self.mine = MyLayerNorm(C)

    def forward(self, x):
        return self.mine(self.gemma(self.norm2(self.fc(self.norm1(x)))))


def one_step(model, x, seed):
    """Output, loss gradient of every parameter, and parameters after one SGD step."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    y = model(x)
    g = rand(tuple(y.shape), y.dtype, seed)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    return y.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_models_match(a, b, x, atol, seed=0, rtol=1e-4):
    ya, ga, pa = one_step(a, x, seed)
    yb, gb, pb = one_step(b, x, seed)
    torch.testing.assert_close(yb, ya, atol=atol, rtol=rtol)
    assert list(ga) == list(gb)
    # gradients that vanish in exact arithmetic (a bias right before a BatchNorm) are
    # rounding noise in both models: the model's largest gradient sets their scale
    noise = 4e-6 * max(g.abs().max().item() for g in ga.values())
    for n in ga:
        tol = atol * max(1.0, ga[n].abs().max().item()) + noise
        err = (gb[n] - ga[n]).abs().max().item()
        assert err <= tol + rtol * ga[n].abs().max().item(), \
            f"grad of {n}: differs by {err:.3g} (tol {tol:.3g})"
        err = (pb[n] - pa[n]).abs().max().item()
        assert err <= tol + rtol * pa[n].abs().max().item(), f"{n} after a step: differs by {err:.3g}"


def test_replace_norms_hf_rule():
    model = TinyLlama()
    perturb_params(model, 71)
    with torch.no_grad():
        model.gemma.weight.zero_()
    orig = copy.deepcopy(model)
    weight_before = model.norm1.weight
    replaced = pnt.replace_norms(model)
    assert replaced == [("norm1", "LlamaRMSNorm"), ("norm2", "RMSNorm"), ("gemma", "GemmaRMSNorm")]
    assert type(model.norm1) is pnt.RMSNorm and model.norm1.weight is weight_before
    assert model.norm1.eps == 1e-6
    assert type(model.norm2) is pnt.RMSNorm
    assert type(model.gemma) is pnt.RMSNorm and model.gemma.weight_offset == 1.0
    assert type(model.mine) is MyLayerNorm
    assert list(model.state_dict()) == list(orig.state_dict())
    x = rand((5, 32), torch.float32, 72)
    assert_models_match(orig, model, x, atol=1e-5)
    assert pnt.replace_norms(model) == []           # idempotent


def test_replace_norms_keeps_dtype_device_params_and_optimizer():
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.RMSNorm(16)).to(torch.bfloat16)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    replaced = pnt.replace_norms(model)
    assert replaced == [("1", "LayerNorm"), ("2", "RMSNorm")]
    assert list(model.parameters()) == params and all(p.dtype == torch.bfloat16 for p in params)
    x = rand((3, 16), torch.bfloat16, 81)
    model(x).float().sum().backward()
    opt.step()
    assert all(p.grad is not None for p in params)


def test_replace_norms_root_and_shared_module():
    ln = nn.LayerNorm(8)
    assert pnt.replace_norms(ln) == [("", "LayerNorm")] and type(ln) is pnt.LayerNorm
    shared = LlamaRMSNorm(8)
    seq = nn.Sequential(shared, nn.Linear(8, 8), shared)
    replaced = pnt.replace_norms(seq)
    assert [n for n, _ in replaced] == ["0"]
    assert seq[0] is seq[2] and type(seq[0]) is pnt.RMSNorm
    with pytest.raises(TypeError):
        pnt.replace_norms("not a module")


def _transformer(norm_first, seed):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, nhead=4, dim_feedforward=64, dropout=0.0,
                                       batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(32),
                                  enable_nested_tensor=False)
    perturb_params_norms(model, seed)
    return model


def perturb_params_norms(model, seed):
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
            perturb_params(m, seed)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_norm", "post_norm"])
def test_replace_norms_transformer(norm_first):
    model = _transformer(norm_first, 91).train()
    orig = copy.deepcopy(model)
    replaced = pnt.replace_norms(model)
    names = [n for n, _ in replaced]
    assert names == ["layers.0.norm1", "layers.0.norm2", "layers.1.norm1", "layers.1.norm2", "norm"]
    assert all(c == "LayerNorm" for _, c in replaced)
    x = rand((3, 10, 32), torch.float32, 92)
    calls = aten_ops(lambda: model(x))
    assert ran_pynorm(calls, "layer_norm_fwd") and "aten::native_layer_norm" not in calls
    assert_models_match(orig, model, x, atol=2e-5)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 16, 3), nn.InstanceNorm2d(16, affine=True), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 6 * 6, 10), nn.BatchNorm1d(10, momentum=None))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_replace_norms_conv_net(channels_last):
    torch.manual_seed(101)
    model = ConvNet().train()
    perturb_params_norms(model, 102)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    orig = copy.deepcopy(model)
    replaced = pnt.replace_norms(model)
    assert replaced == [("features.1", "BatchNorm2d"), ("features.4", "GroupNorm"),
                        ("features.7", "InstanceNorm2d"), ("head.2", "BatchNorm1d")]
    x = rand((4, 3, 8, 8), torch.float32, 103)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    probe = copy.deepcopy(model)                     # (a forward moves the running stats)
    calls = aten_ops(lambda: probe(x))
    assert ran_pynorm(calls, "batch_norm_fwd") and ran_pynorm(calls, "group_norm_fwd")
    assert not calls & {"aten::native_batch_norm", "aten::native_group_norm", "aten::_batch_norm_with_update"}
    assert_models_match(orig, model, x, atol=2e-5)
    for (n, b), (_, c) in zip(orig.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=n)
    orig.eval()
    model.eval()
    with torch.no_grad():          # (after one SGD step on gradients equal to rounding)
        want = orig(x)
        torch.testing.assert_close(model(x), want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


# --------------------------------------------------------------------------------------
# errors


def test_bad_input_errors():
    m = pnt.LayerNorm(8)
    with pytest.raises(ValueError, match="normalized_shape"):
        m(torch.randn(3, 7))
    with pytest.raises(TypeError, match="dtype"):
        pnt.layer_norm(torch.ones(3, 8, dtype=torch.int32), (8,))
    with pytest.raises(ValueError, match="eps"):
        pnt.rms_norm(torch.randn(3, 8), (8,), None, -1.0)
    with pytest.raises(ValueError, match="weight"):
        pnt.layer_norm(torch.randn(3, 8), (8,), torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        pnt.add_rms_norm(torch.randn(3, 8), torch.randn(2, 8), (8,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this torch")
@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_cuda_module(cls):
    from pynorm.torch._backend import _load_cuda_backend
    t = getattr(nn, cls)(64).cuda()
    perturb_params(t, 5)
    p = getattr(pnt, cls)(64).cuda()
    p.load_state_dict(t.state_dict())
    x = torch.randn(8, 64, device="cuda")
    if _load_cuda_backend() is None:
        with pytest.raises(NotImplementedError, match="CUDA"):
            p(x)
        return
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = t(x1), p(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# the end-to-end benchmark's rows (tiny shapes: format only, no timing claims)


def test_bench_torch_rows():
    from pynorm import bench, bench_torch
    rows = bench_torch.block_rows(thread_counts=(1,), quick=True, warmup=0, repeats=1)
    assert [r["op"] for r in rows] == ["transformer_block_layernorm_fwd_bwd",
                                       "transformer_block_rmsnorm_fwd_bwd"]
    for r in rows:
        assert r["baseline"] == "torch" and r["baseline_ms"] > 0 and r["pynorm_ms"] > 0
        assert r["speedup"] > 0
    table = bench.format_table(rows, "torch")
    assert "GPT block" in table and "Llama block" in table


def test_bench_torch_decode_rows():
    from pynorm import bench, bench_torch
    rows = bench_torch.decode_rows(thread_counts=(1,), quick=True, warmup=0, repeats=1)
    assert [r["op"] for r in rows[::2]] == bench_torch.DECODE_KEYS     # two dtypes per key
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert r["baseline"] == "torch" and r["baseline_ms"] > 0 and r["pynorm_ms"] > 0
        assert r["speedup"] > 0 and r["bytes"] > 0
    table = bench.format_table([dict(r, pct_copy=0.0, pct_peak=0.0) for r in rows], "torch")
    assert "nn.BatchNorm2d fwd no_grad" in table and "nn.LayerNorm fwd+bwd" in table


def test_caller_scratch_path(monkeypatch):
    """The CUDA library needs the backward's scratch from the caller: that path
    (scratch sized by *_backward_scratch_size, allocated by torch) gives the same
    bits on the C library, which accepts a caller's scratch too."""
    from pynorm.torch import _backend
    x = rand((5, 6, 4, 3), torch.float32, 1)
    w = rand((6,), torch.float32, 2).requires_grad_(True)
    wt = rand((3,), torch.float32, 3).requires_grad_(True)

    def grads():
        xx = x.clone().requires_grad_(True)
        y = (pnt.group_norm(xx, 3, w) + pnt.batch_norm(xx, None, None, w, None, True)).sum(1)
        y = pnt.layer_norm(y, (3,), wt) + pnt.rms_norm(y, (3,), wt)
        return torch.autograd.grad(y.square().sum(), (xx, w, wt))

    plain = grads()
    monkeypatch.setattr(_backend.CPU, "needs_scratch", True)
    for a, b in zip(grads(), plain):
        assert torch.equal(a, b)
