"""pynorm.torch's inference surface (docs/inference.md): weight_offset= and rounding=
on the token-norm functions and modules, fused_add_rms_norm_ (in place), the
quantized outputs, and replace_norms on Hugging Face's Gemma and Llama-style RMSNorms.

The NumPy functions are the specification here (tests/test_inference.py checks them
against float64 formulas): the torch forms must give the same bits. The Hugging Face
classes are stand-ins written from the transformers formulas (transformers need not
be installed), with the same class names.
"""

import copy

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.library import opcheck

import pynorm
import pynorm.torch as pnt
from pynorm.torch import _dispatch

OPS = torch.ops.pynorm
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FORMS = [(0.0, "once"), (1.0, "once"), (0.0, "llama"), (1.0, "llama"), (-0.5, "once")]


def rand(shape, dtype, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def to_np(t):
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def bits(t):
    """The tensor's bits as int64 (NaN payloads compared as bits too)."""
    t = t.detach().contiguous()
    carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(carrier).to(torch.int64)


def assert_same_bits(got, want_np, what):
    want = torch.from_numpy(np.ascontiguousarray(want_np).view(
        {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[want_np.dtype.itemsize])).to(torch.int64)
    g = bits(got)
    assert g.shape == want.shape, f"{what}: shape {tuple(g.shape)} != {tuple(want.shape)}"
    diff = (g != want)
    assert not bool(diff.any()), f"{what}: {int(diff.sum())} of {diff.numel()} values differ from NumPy's"


@pytest.fixture(params=[True, False], ids=["eager_fast", "operators"])
def eager_path(request, monkeypatch):
    monkeypatch.setattr(_dispatch, "FAST_EAGER", request.param)
    return request.param


# ---- weight_offset / rounding: same bits as NumPy ----------------------------------------------

@pytest.mark.parametrize("offset,rounding", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["rms", "layer"])
def test_options_match_numpy(op, dtype, offset, rounding, eager_path):
    x = rand((5, 3, 48), dtype, 1, scale=2.0, offset=0.3)
    w = rand((48,), dtype, 2, scale=0.5)
    b = rand((48,), dtype, 3)
    kw = dict(weight_offset=offset, rounding=rounding)
    if op == "rms":
        got = pnt.rms_norm(x, (48,), w, 1e-6, **kw)
        want = pynorm.rms_norm(to_np(x), to_np(w), 1e-6, **kw)
        mod = pnt.RMSNorm(48, eps=1e-6, dtype=dtype, **kw)
    else:
        got = pnt.layer_norm(x, (48,), w, b, 1e-5, **kw)
        want = pynorm.layer_norm(to_np(x), to_np(w), to_np(b), 1e-5, **kw)
        mod = pnt.LayerNorm(48, eps=1e-5, dtype=dtype, **kw)
        with torch.no_grad():
            mod.bias.copy_(b)
    assert_same_bits(got, want, f"{op} function {dtype} {kw}")
    with torch.no_grad():
        mod.weight.copy_(w)
    assert_same_bits(mod(x), want, f"{op} module {dtype} {kw}")
    with torch.no_grad():
        assert_same_bits(mod(x), want, f"{op} module, no grad")


@pytest.mark.parametrize("offset,rounding", FORMS)
@pytest.mark.parametrize("op", ["rms", "layer"])
def test_fused_options_match_numpy(op, offset, rounding):
    dtype = torch.bfloat16
    x, r = rand((7, 40), dtype, 4), rand((7, 40), dtype, 5)
    w, b = rand((40,), dtype, 6), rand((40,), dtype, 7)
    kw = dict(weight_offset=offset, rounding=rounding)
    if op == "rms":
        y, h = pnt.add_rms_norm(x, r, 40, w, 1e-6, **kw)
        wy, wh = pynorm.add_rms_norm(to_np(x), to_np(r), to_np(w), 1e-6, **kw)
    else:
        y, h = pnt.add_layer_norm(x, r, 40, w, b, **kw)
        wy, wh = pynorm.add_layer_norm(to_np(x), to_np(r), to_np(w), to_np(b), **kw)
    assert_same_bits(y, wy, f"add_{op} y {kw}")
    assert_same_bits(h, wh, f"add_{op} h {kw}")


def test_offset_added_in_float32():
    """bfloat16 data and weight: (1 + w) is taken in float32 (a bfloat16 weight of 15.8125
    plus 1 is 16.8125, a bfloat16 sum 16.75). Rows whose xhat is exact (rstd 0.5) make the
    float64 formula the exact reference."""
    row = torch.tensor([1.0] * 7 + [5.0], dtype=torch.float64)       # mean(x^2) = 4: rstd 0.5
    x = (row * torch.tensor([[1.0], [-3.0]], dtype=torch.float64)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(61)
    w = (torch.rand((8,), generator=g, dtype=torch.float64) * 24 + 8).to(torch.bfloat16)
    w[0] = 15.8125
    for rounding in ("once", "llama"):
        y = pnt.rms_norm(x, 8, w, 0.0, weight_offset=1.0, rounding=rounding)
        xhat = x.double() * 0.5 / torch.tensor([[1.0], [3.0]], dtype=torch.float64)
        want = (xhat * (1.0 + w.double())).to(torch.bfloat16)
        assert torch.equal(bits(y), bits(want)), f"rounding={rounding}: {y} != {want}"
    assert float(torch.tensor(15.8125, dtype=torch.bfloat16) + 1) == 16.75   # what must not happen


@pytest.mark.parametrize("offset", [0.0, 1.0, -0.25])
@pytest.mark.parametrize("op", ["rms", "layer", "add_rms", "add_layer"])
def test_gradcheck_with_offset(op, offset, eager_path):
    x = rand((3, 2, 8), torch.float64, 11).requires_grad_()
    r = rand((3, 2, 8), torch.float64, 12).requires_grad_()
    w = rand((8,), torch.float64, 13).requires_grad_()
    b = rand((8,), torch.float64, 14).requires_grad_()
    kw = dict(weight_offset=offset, rounding="llama")     # float64: "llama" is "once"
    f = {"rms": lambda x, r, w, b: pnt.rms_norm(x, 8, w, 1e-5, **kw),
         "layer": lambda x, r, w, b: pnt.layer_norm(x, 8, w, b, **kw),
         "add_rms": lambda x, r, w, b: pnt.add_rms_norm(x, r, 8, w, 1e-5, **kw),
         "add_layer": lambda x, r, w, b: pnt.add_layer_norm(x, r, 8, w, b, **kw)}[op]
    assert torch.autograd.gradcheck(f, (x, r, w, b))


def test_backward_uses_offset_plus_weight():
    """dx uses (offset + w) and dweight is unchanged: against torch's autograd on the
    formula, float64."""
    x = rand((4, 16), torch.float64, 21).requires_grad_()
    w = rand((16,), torch.float64, 22).requires_grad_()
    dy = rand((4, 16), torch.float64, 23)
    y = pnt.rms_norm(x, 16, w, 1e-6, weight_offset=1.0)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w2)
    dx2, dw2 = torch.autograd.grad(y2, (x2, w2), dy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(dx, dx2)
    torch.testing.assert_close(dw, dw2)


@pytest.mark.parametrize("name,args", [
    ("rms_norm_fwd", lambda x, r, w, b: (x, w, 1e-6, 1.0, "llama")),
    ("layer_norm_fwd", lambda x, r, w, b: (x, w, b, 1e-5, 0.5, "once")),
    ("add_rms_norm_fwd", lambda x, r, w, b: (x, r, w, 1e-6, 1.0, "once")),
    ("add_layer_norm_fwd", lambda x, r, w, b: (x, r, w, b, 1e-5, -1.0, "llama")),
])
def test_opcheck_with_options(name, args):
    x = rand((3, 16), torch.float32, 31).requires_grad_()
    r = rand((3, 16), torch.float32, 32).requires_grad_()
    w = rand((16,), torch.float32, 33).requires_grad_()
    b = rand((16,), torch.float32, 34).requires_grad_()
    opcheck(getattr(OPS, name), args(x, r, w, b))


def test_opcheck_backward_with_offset():
    x, dy = rand((3, 16), torch.float32, 35), rand((3, 16), torch.float32, 36)
    w = rand((16,), torch.float32, 37)
    _, rstd = OPS.rms_norm_fwd(x, w, 1e-6, 1.0, "once")
    opcheck(OPS.rms_norm_bwd, (dy, x, rstd, w, True, True, 1.0))
    _, mean, rstd = OPS.layer_norm_fwd(x, w, None, 1e-5, 1.0, "once")
    opcheck(OPS.layer_norm_bwd, (dy, x, mean, rstd, w, True, True, False, 1.0))


def test_compile_with_options():
    mod = pnt.RMSNorm(32, eps=1e-6, weight_offset=1.0, dtype=torch.bfloat16)
    ln = pnt.LayerNorm(32, rounding="llama", dtype=torch.bfloat16)
    with torch.no_grad():
        mod.weight.copy_(rand((32,), torch.bfloat16, 41))

    def f(x):
        return ln(mod(x))

    x = rand((4, 32), torch.bfloat16, 42).requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert torch.equal(bits(y), bits(f(x)))
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    (gx2,) = torch.autograd.grad(f(x).float().sum(), x)
    assert torch.equal(bits(gx), bits(gx2))


def test_module_options_state_dict_and_repr():
    m = pnt.RMSNorm(8, weight_offset=1.0)
    assert torch.equal(m.weight, torch.zeros(8)), "offset 1: the weight starts at zeros (Gemma)"
    assert list(m.state_dict()) == ["weight"]
    assert "weight_offset=1.0" in repr(m) and "rounding='once'" in repr(m)
    plain = pnt.LayerNorm(8)
    assert repr(plain) == repr(nn.LayerNorm(8)), "default options: torch's repr"
    m2 = pnt.LayerNorm(8, rounding="llama")
    m2.load_state_dict(nn.LayerNorm(8).state_dict())
    assert "rounding='llama'" in repr(m2)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(weight_offset=float("nan")), ValueError, "weight_offset"),
    (dict(weight_offset="1"), TypeError, "weight_offset"),
    (dict(rounding="gemma"), ValueError, "rounding"),
    (dict(rounding=1), TypeError, "rounding"),
])
def test_bad_options(kw, exc, match):
    x, w = rand((2, 8), torch.float32, 51), rand((8,), torch.float32, 52)
    with pytest.raises(exc, match=match):
        pnt.rms_norm(x, 8, w, **kw)
    with pytest.raises(exc, match=match):
        pnt.layer_norm(x, 8, w, **kw)
    with pytest.raises(exc, match=match):
        pnt.RMSNorm(8, **kw)


def test_offset_without_weight_is_an_error():
    with pytest.raises(ValueError, match="weight_offset"):
        pnt.rms_norm(rand((2, 8), torch.float32, 53), 8, None, weight_offset=1.0)
    with pytest.raises(ValueError, match="weight_offset"):
        pnt.RMSNorm(8, elementwise_affine=False, weight_offset=1.0)


# ---- fused_add_rms_norm_: in place -------------------------------------------------------------

def _fused_reference(x, r, w, eps, **kw):
    y, h = pynorm.add_rms_norm(to_np(x), to_np(r), None if w is None else to_np(w), eps, **kw)
    return y, h


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["dense", "strided"])
def test_fused_add_rms_norm_in_place(dtype, layout, eager_path):
    if layout == "dense":
        x, r = rand((6, 64), dtype, 71), rand((6, 64), dtype, 72)
    else:                               # views of wider buffers: written where they are
        x, r = rand((6, 96), dtype, 71)[:, 8:72], rand((6, 80), dtype, 72)[:, :64]
    w = rand((64,), dtype, 73)
    wy, wh = _fused_reference(x, r, w, 1e-6)
    x_base, r_base = x._base, r._base
    before = None if x_base is None else x_base.clone()
    x_ptr, r_ptr = x.data_ptr(), r.data_ptr()
    assert pnt.fused_add_rms_norm_(x, r, w, 1e-6) is None
    assert x.data_ptr() == x_ptr and r.data_ptr() == r_ptr
    assert_same_bits(x, wy, "x <- y")
    assert_same_bits(r, wh, "residual <- h")
    if before is not None:             # the memory outside the view is untouched
        assert torch.equal(bits(x_base[:, :8]), bits(before[:, :8]))
        assert torch.equal(bits(x_base[:, 72:]), bits(before[:, 72:]))


@pytest.mark.parametrize("offset,rounding", [(1.0, "once"), (0.0, "llama")])
def test_fused_add_rms_norm_options(offset, rounding):
    x, r, w = rand((5, 32), torch.bfloat16, 74), rand((5, 32), torch.bfloat16, 75), rand((32,), torch.bfloat16, 76)
    wy, wh = _fused_reference(x, r, w, 1e-5, weight_offset=offset, rounding=rounding)
    pnt.fused_add_rms_norm_(x, r, w, 1e-5, weight_offset=offset, rounding=rounding)
    assert_same_bits(x, wy, "x <- y")
    assert_same_bits(r, wh, "residual <- h")


def test_fused_add_rms_norm_compiles_and_opcheck():
    w = rand((32,), torch.float32, 77)

    def layer(x, r):
        pnt.fused_add_rms_norm_(x, r, w, 1e-6)
        return x * 2, r

    x, r = rand((4, 32), torch.float32, 78), rand((4, 32), torch.float32, 79)
    x2, r2 = x.clone(), r.clone()
    y_c, r_c = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, r)
    y_e, r_e = layer(x2, r2)
    assert torch.equal(y_c, y_e) and torch.equal(r_c, r_e)
    assert torch.equal(x, x2) and torch.equal(r, r2), "the compiled call wrote its inputs in place"
    opcheck(OPS.fused_add_rms_norm_, (rand((4, 32), torch.float32, 80), rand((4, 32), torch.float32, 81),
                                      w, 1e-6, 1.0, "llama"))


def test_fused_add_rms_norm_param_weight_under_grad_mode():
    """A Parameter weight (requires_grad) is fine: the op is not differentiated."""
    m = pnt.RMSNorm(16)
    x, r = rand((2, 16), torch.float32, 82), rand((2, 16), torch.float32, 83)
    wy, wh = _fused_reference(x, r, m.weight, 1e-6)
    pnt.fused_add_rms_norm_(x, r, m.weight, 1e-6)
    assert_same_bits(x, wy, "x <- y")


@pytest.mark.parametrize("case,exc,match", [
    ("same", ValueError, "x and residual overlap"),
    ("shifted", ValueError, "x and residual overlap"),
    ("shape", ValueError, "residual has shape"),
    ("dtype", TypeError, "residual has dtype"),
    ("weight_shape", ValueError, "weight"),
    ("expanded", ValueError, "x has elements that share memory"),
    ("grad", ValueError, "x requires grad"),
    ("not_tensor", TypeError, "residual must be a torch.Tensor"),
    ("offset_no_weight", ValueError, "weight_offset"),
    ("rounding", ValueError, "rounding"),
    ("eps", ValueError, "fused_add_rms_norm_: eps"),
])
def test_fused_add_rms_norm_bad_arguments(case, exc, match):
    buf = rand((4, 48), torch.float32, 84)
    x, r, w = rand((4, 32), torch.float32, 85), rand((4, 32), torch.float32, 86), rand((32,), torch.float32, 87)
    kw = {}
    if case == "same":
        r = x
    elif case == "shifted":
        x, r = buf[:, :32], buf[:, 8:40]
    elif case == "shape":
        r = r[:3]
    elif case == "dtype":
        r = r.double()
    elif case == "weight_shape":
        w = w[:31]
    elif case == "expanded":
        x = rand((32,), torch.float32, 88).expand(4, 32)
    elif case == "grad":
        x = x.requires_grad_()
    elif case == "not_tensor":
        r = r.numpy()
    elif case == "offset_no_weight":
        w, kw = None, dict(weight_offset=1.0)
    elif case == "rounding":
        kw = dict(rounding="vllm")
    elif case == "eps":
        kw = dict(eps=-1.0)
    snapshot = [t.clone() if isinstance(t, torch.Tensor) else None for t in (x, r, buf)]
    kw.setdefault("eps", 1e-6)
    with pytest.raises(exc, match=match):
        pnt.fused_add_rms_norm_(x, r, w, **kw)
    for t, s0 in zip((x, r, buf), snapshot):       # nothing written
        if s0 is not None:
            assert torch.equal(t.detach(), s0)


# ---- quantized output --------------------------------------------------------------------------

@pytest.mark.parametrize("qdtype", ["int8", "float8_e4m3fn", torch.int8, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("mode", ["dynamic_row", "group32", "static", "scale_ub", "residual"])
@pytest.mark.parametrize("op", ["rms", "layer"])
def test_quant_matches_numpy(op, mode, qdtype):
    if mode == "scale_ub" and qdtype in ("int8", torch.int8):
        pytest.skip("scale_ub is float8 only")
    dtype = torch.bfloat16
    x = rand((3, 5, 64), dtype, 91, scale=3.0)
    r = rand((3, 5, 64), dtype, 92)
    w, b = rand((64,), dtype, 93), rand((64,), dtype, 94)
    q_name = qdtype if isinstance(qdtype, str) else {torch.int8: "int8", torch.float8_e4m3fn: "float8_e4m3fn"}[qdtype]
    kw = dict(weight_offset=1.0, rounding="llama")
    if mode == "group32":
        kw["group_size"] = 32
    elif mode == "static":
        kw["scale"] = 0.02
    elif mode == "scale_ub":
        kw["scale_ub"] = 1.5
    args_t = (x, w) if op == "rms" else (x, w, b)
    args_n = tuple(to_np(t) for t in args_t)
    if mode == "residual":
        got = getattr(pnt, f"{op}_norm_quant")(*args_t, qdtype=qdtype, residual=r, **kw)
        want = getattr(pynorm, f"{op}_norm_quant")(*args_n, qdtype=q_name, residual=to_np(r), **kw)
    else:
        got = getattr(pnt, f"{op}_norm_quant")(*args_t, qdtype=qdtype, **kw)
        want = getattr(pynorm, f"{op}_norm_quant")(*args_n, qdtype=q_name, **kw)
    assert len(got) == len(want)
    qt = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}[q_name]
    assert got[0].dtype == qt and got[1].dtype == torch.float32
    for i, (g, w_) in enumerate(zip(got, want)):
        assert_same_bits(g, w_, f"output {i}")


def test_quant_strided_view_and_nan():
    buf = rand((4, 96), torch.float16, 95)
    buf[1, 20] = float("nan")                    # in row 1 of the view: its rstd is NaN
    x = buf[:, 16:80]
    q, s = pnt.rms_norm_quant(x, qdtype="float8_e4m3fn", group_size=16)
    wq, ws = pynorm.rms_norm_quant(to_np(x), qdtype="float8_e4m3fn", group_size=16)
    assert_same_bits(q, wq, "q")
    assert_same_bits(s, ws, "scales")
    assert torch.isnan(s[1]).all() and torch.isnan(q[1].float()).all(), "the NaN row: NaN scales, NaN q"
    others = [0, 2, 3]
    assert torch.isfinite(s[others]).all() and torch.isfinite(q[others].float()).all(), "other rows"


@pytest.mark.parametrize("kw,exc,match", [
    (dict(qdtype="int4"), ValueError, "qdtype"),
    (dict(qdtype=torch.uint8), ValueError, "qdtype"),
    (dict(group_size=5), ValueError, "group_size"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(scale=torch.ones(2)), ValueError, "scale"),
    (dict(scale_ub=2.0), ValueError, "scale_ub"),
    (dict(residual=torch.zeros(3, 63)), ValueError, "residual"),
    (dict(weight_offset=1.0), ValueError, "weight_offset"),
])
def test_quant_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        pnt.rms_norm_quant(rand((3, 64), torch.float32, 96), **kw)


def test_quant_bad_tensors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pnt.rms_norm_quant(np.zeros((2, 8), np.float32))
    with pytest.raises(TypeError, match="x has dtype"):
        pnt.rms_norm_quant(torch.zeros((2, 8), dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="x is on meta"):
        pnt.rms_norm_quant(torch.zeros((2, 8), device="meta"))


# ---- replace_norms: Hugging Face's Gemma and Llama-style RMSNorms ---------------------------------
# Stand-ins with transformers' class names and forward formulas.

class _LlamaStyle(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):            # transformers' LlamaRMSNorm.forward
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRMSNorm(_LlamaStyle):
    pass


class Qwen2RMSNorm(_LlamaStyle):
    pass


class Qwen3RMSNorm(_LlamaStyle):
    pass


class MistralRMSNorm(_LlamaStyle):
    pass


class _GemmaStyle(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):                        # transformers' GemmaRMSNorm.forward
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class GemmaRMSNorm(_GemmaStyle):
    pass


class Gemma2RMSNorm(_GemmaStyle):
    pass


class Gemma3RMSNorm(_GemmaStyle):
    pass


class Olmo2RMSNorm(_LlamaStyle):
    def forward(self, hidden_states):            # casts after the weight: rounded once
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)


class HalfOffsetGemmaRMSNorm(_GemmaStyle):
    """(1 + w) taken in the weight's own dtype (the bug of some ports): not reproducible."""

    def forward(self, x):
        return (self._norm(x.float()) * (1.0 + self.weight).float()).type_as(x)


class CenteredRMSNorm(_LlamaStyle):
    """Named like one, computes a LayerNorm without bias: not an RMSNorm."""

    def forward(self, x):
        xf = x.float()
        xf = xf - xf.mean(-1, keepdim=True)
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


class RaisingRMSNorm(_LlamaStyle):
    def forward(self, x):
        raise RuntimeError("needs position ids")


REPRODUCIBLE = {"LlamaRMSNorm": (0.0, "llama"), "Qwen2RMSNorm": (0.0, "llama"),
                "Qwen3RMSNorm": (0.0, "llama"), "MistralRMSNorm": (0.0, "llama"),
                "GemmaRMSNorm": (1.0, "once"), "Gemma2RMSNorm": (1.0, "once"),
                "Gemma3RMSNorm": (1.0, "once"), "Olmo2RMSNorm": (0.0, "once")}
NOT_REPRODUCIBLE = ["HalfOffsetGemmaRMSNorm", "CenteredRMSNorm", "RaisingRMSNorm"]


def _hf_model(dtype, C=64, seed=101):
    model = nn.Module()
    g = torch.Generator().manual_seed(seed)
    for name in list(REPRODUCIBLE) + NOT_REPRODUCIBLE:
        m = globals()[name](C)
        with torch.no_grad():        # trained-looking weights (around 0 for Gemma, 1 otherwise)
            base = 0.0 if isinstance(m, _GemmaStyle) else 1.0
            m.weight.copy_(base + 0.5 * torch.randn((C,), generator=g, dtype=torch.float64))
        setattr(model, name, m.to(dtype))
    return model


def assert_hf_rounding(got, ref, x, eps, what):
    """got == ref bit for bit on the rows where torch's float32 rstd equals pynorm's,
    elsewhere within the two rstd's relative difference plus 2 eps, times |y|
    (docs/inference.md, "rstd")."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    _, rstd = pynorm.rms_norm_forward(to_np(x.reshape(-1, x.shape[-1])), None, eps)
    rstd_torch = torch.rsqrt(x.float().pow(2).mean(-1) + eps).reshape(-1)
    same = torch.from_numpy(rstd) == rstd_torch
    g, r = got.reshape(-1, x.shape[-1]), ref.reshape(-1, x.shape[-1])
    assert torch.equal(bits(g[same]), bits(r[same])), f"{what}: rows with the same rstd differ"
    gd, rd = g[~same].double(), r[~same].double()
    rstd = torch.from_numpy(rstd).double()
    rel = ((rstd_torch.double() - rstd).abs() / rstd)[~same].unsqueeze(-1)
    tol = (rel + 2 * torch.finfo(x.dtype).eps) * torch.maximum(gd.abs(), rd.abs())
    assert bool(((gd - rd).abs() <= tol).all()), f"{what}: further apart than the rstd explain"
    assert int(same.sum()) >= same.numel() // 2, f"{what}: the probe data should mostly agree on rstd"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_replace_norms_hf_gemma_and_llama(dtype):
    model = _hf_model(dtype)
    orig = copy.deepcopy(model)
    skipped = []
    reproducible, not_reproducible = dict(REPRODUCIBLE), list(NOT_REPRODUCIBLE)
    if dtype == torch.float32:        # 1 + w in a float32 weight's own dtype is Gemma's
        reproducible["HalfOffsetGemmaRMSNorm"] = (1.0, "once")
        not_reproducible.remove("HalfOffsetGemmaRMSNorm")
    replaced = pnt.replace_norms(model, skipped=skipped)
    assert sorted(replaced) == sorted((n, n) for n in reproducible)
    assert sorted(n for n, _, _ in skipped) == sorted(not_reproducible)
    reasons = {n: why for n, _, why in skipped}
    assert "raised RuntimeError" in reasons["RaisingRMSNorm"]
    x = rand((3, 5, 64), dtype, 102, scale=3.0, offset=-0.2)
    for name, (offset, rounding) in reproducible.items():
        new, old = getattr(model, name), getattr(orig, name)
        assert type(new) is pnt.RMSNorm, name
        assert new.weight_offset == offset, name
        if dtype != torch.float32:                     # float32: both roundings are the same bits
            assert new.rounding == rounding, name
        assert new.eps == 1e-6
        with torch.no_grad():
            assert_hf_rounding(new(x), old(x), x, 1e-6, name)
    for name in not_reproducible:
        assert type(getattr(model, name)) is globals()[name], name


def test_replace_norms_keeps_the_weight_and_trains():
    model = nn.Sequential(nn.Linear(32, 32), Gemma3RMSNorm(32), nn.Linear(32, 32), Qwen3RMSNorm(32))
    weights = [model[1].weight, model[3].weight]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert pnt.replace_norms(model) == [("1", "Gemma3RMSNorm"), ("3", "Qwen3RMSNorm")]
    assert [model[1].weight, model[3].weight] == weights
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "2.weight", "2.bias", "3.weight"]
    model(rand((4, 32), torch.float32, 103)).sum().backward()
    assert all(w.grad is not None for w in weights)
    opt.step()


def test_replace_norms_float64_hf_module_left_alone():
    """Hugging Face computes in float32 even for float64 modules; pynorm in float64."""
    model = nn.Sequential(LlamaRMSNorm(16).double())
    skipped = []
    assert pnt.replace_norms(model, skipped=skipped) == []
    assert [(n, c) for n, c, _ in skipped] == [("0", "LlamaRMSNorm")]
    assert "no pynorm form reproduces it" in skipped[0][2]


def test_replace_norms_probe_does_not_touch_the_module():
    m = GemmaRMSNorm(16)
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    w = m.weight.detach().clone()
    version = m.weight._version
    pnt.replace_norms(nn.Sequential(m))
    assert calls == [] and torch.equal(m.weight, w) and m.weight._version == version


def test_replace_norms_skipped_must_be_a_list():
    with pytest.raises(TypeError, match="skipped"):
        pnt.replace_norms(nn.Sequential(), skipped=())


# ---- per-head views: q/k norms on a fused qkv buffer, read with no copy ------------------------

def _qk_views(dtype):
    """3-D (T, H, D) and 4-D (B, S, H, D) q and k views of fused qkv buffers."""
    g = torch.Generator().manual_seed(7)
    Hq, Hk, D = 4, 2, 64
    qkv3 = torch.randn(9, (Hq + 2 * Hk) * D, generator=g).to(dtype)
    qkv4 = torch.randn(2, 5, (Hq + 2 * Hk) * D, generator=g).to(dtype)
    v3 = qkv3.view(9, Hq + 2 * Hk, D)
    v4 = qkv4.view(2, 5, Hq + 2 * Hk, D)
    return [("q 3-D", v3[:, :Hq]), ("k 3-D", v3[:, Hq:Hq + Hk]),
            ("q 4-D", v4[:, :, :Hq]), ("k 4-D", v4[:, :, Hq:Hq + Hk]),
            ("q 4-D, S sliced", v4[:, 1:4, :Hq])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["rms", "layer"])
def test_head_views_are_read_in_place(op, dtype, monkeypatch):
    """rms_norm/layer_norm on q/k views of a fused qkv buffer: the bits of the call on
    a dense copy (forward, dx, dweight), and no copy of the view is made."""
    D = 64
    w = torch.randn(D).to(dtype)
    for name, view in _qk_views(dtype):
        assert not view.is_contiguous()
        dense = view.contiguous()
        x = view.detach().requires_grad_(False)
        wg, wd = w.clone().requires_grad_(True), w.clone().requires_grad_(True)

        def call(t, weight):
            if op == "rms":
                return pnt.rms_norm(t, (D,), weight, 1e-6)
            return pnt.layer_norm(t, (D,), weight, None, 1e-5)

        xd = dense.clone().requires_grad_(True)
        want = call(xd, wd)
        want.backward(torch.ones_like(want))
        real_contiguous = torch.Tensor.contiguous

        def no_copy(self, *args, **kwargs):
            if self.data_ptr() == view.data_ptr() and not self.is_contiguous():
                raise AssertionError(f"{name}: the view was copied")
            return real_contiguous(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "contiguous", no_copy)
        xv = view.detach().requires_grad_(True)
        got = call(xv, wg)
        got.backward(torch.ones_like(got))
        monkeypatch.setattr(torch.Tensor, "contiguous", real_contiguous)
        assert torch.equal(got, want), f"{op} {name} {dtype}: y differs from the dense call"
        assert torch.equal(xv.grad, xd.grad), f"{op} {name} {dtype}: dx differs"
        assert torch.equal(wg.grad, wd.grad), f"{op} {name} {dtype}: dweight differs"
