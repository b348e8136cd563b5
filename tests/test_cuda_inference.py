"""The inference options (docs/inference.md) on CUDA arrays: weight_offset,
rounding="llama", in place, per-head views. Checked against the float64 reference, the CPU
library, and the Hugging Face formulas on torch CUDA. Marked `cuda` and
skipped, with the reason, where tests/test_cuda.py's are (no CuPy, no device,
no CUDA torch or no libpynorm_cuda).
"""
import numpy as np
import pytest

import pynorm
import reference as R
from pynorm import _cuda
from test_cuda import BF16, DNAME, DTYPES, F16, F32, F64, HAVE_BF16, _SKIP_REASON, cp, torch

try:
    _CUDA_MARK = [pytest.mark.cuda]
except pytest.fail.Exception:
    _CUDA_MARK = []
pytestmark = _CUDA_MARK + [pytest.mark.skipif(_SKIP_REASON is not None, reason=str(_SKIP_REASON))]

OPS = ["rms", "layer"]
HALF = [F16, BF16]
_EPS = {F32: 2.0 ** -23, F16: 2.0 ** -10, BF16: 2.0 ** -7, F64: 2.0 ** -52}


def _host(shape, dtype, seed, loc=0.0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + loc).astype(dtype)


def _dev(a):
    return cp.asarray(a)


def _np(d):
    return cp.asnumpy(d)


def _inputs(op, shape, dtype, seed=0):
    x = _host(shape, dtype, seed, 0.3, 2.0)
    w = _host(shape[-1:], dtype, seed + 1, 0.0, 0.5)
    b = _host(shape[-1:], dtype, seed + 2, 0.0, 0.5) if op == "layer" else None
    return x, w, b


def _run(op, x, w, b, res=None, **kw):
    if op == "rms":
        return pynorm.add_rms_norm(x, res, w, **kw) if res is not None else pynorm.rms_norm(x, w, **kw)
    return pynorm.add_layer_norm(x, res, w, b, **kw) if res is not None else pynorm.layer_norm(x, w, b, **kw)


def _close(what, got, ref, dtype, ulps):
    got = np.asarray(got).astype(np.float64)
    ref = np.asarray(ref, np.float64)
    ulps = ulps * 4 if dtype in (F32, F64) else ulps
    tol = ulps * _EPS[dtype] * float(np.abs(ref[np.isfinite(ref)]).max())
    err = np.abs(got - ref).max()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} ({DNAME[dtype]})"


@pytest.mark.parametrize("rounding", ["once", "llama"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DNAME[d])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("C", [64, 768, 5000, 20000])
def test_cuda_options_forward_matches_reference(op, dtype, rounding, C):
    if dtype == BF16 and not HAVE_BF16:
        pytest.skip("this CuPy has no bfloat16 arrays")
    x, w, b = _inputs(op, (9, C), dtype, seed=C)
    got = _np(_run(op, _dev(x), _dev(w), None if b is None else _dev(b), weight_offset=1.0, rounding=rounding))
    if op == "rms":
        ref = R.rms_norm_ref(x, w, None, weight_offset=1.0, rounding=rounding)[0]
    else:
        ref = R.layer_norm_ref(x, w, b, 1e-5, weight_offset=1.0, rounding=rounding)[0]
    _close(f"{op} {rounding} offset 1 (CUDA)", got, ref, dtype, 3)
    cpu = _run(op, x, w, b, weight_offset=1.0, rounding=rounding)
    _close(f"{op} {rounding} offset 1 (CUDA vs CPU)", got, cpu.astype(np.float64), dtype, 3)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: DNAME[d])
def test_cuda_llama_and_gemma_formulas(dtype):
    """Hugging Face's LlamaRMSNorm and GemmaRMSNorm on torch CUDA, bit for bit on rows whose
    rstd agree, within one ulp elsewhere."""
    if dtype == BF16 and not HAVE_BF16:
        pytest.skip("this CuPy has no bfloat16 arrays")
    x, w, _ = _inputs("rms", (256, 1024), dtype, seed=5)
    eps = 1e-6
    T = {F16: torch.float16, BF16: torch.bfloat16}[dtype]
    xt = torch.as_tensor(x.astype(np.float32), device="cuda")
    wt = torch.as_tensor(w.astype(np.float32), device="cuda").to(T)
    r_hf = torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps)
    forms = {"llama": (dict(rounding="llama"), wt * (xt * r_hf).to(T)),
             "gemma": (dict(weight_offset=1.0), ((xt * r_hf) * (1.0 + wt.float())).to(T))}
    for name, (kw, hf) in forms.items():
        y, rstd = pynorm.rms_norm_forward(_dev(x), _dev(w), eps, **kw)
        y, rstd = _np(y), _np(rstd)
        hf = hf.float().cpu().numpy().astype(dtype)
        agree = rstd == r_hf[:, 0].cpu().numpy()
        assert (y[agree].view(np.uint16) == hf[agree].view(np.uint16)).all(), f"{name}: rows with equal rstd"
        _close(f"{name}: other rows", y[~agree], hf[~agree].astype(np.float64), dtype, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DNAME[d])
@pytest.mark.parametrize("op", OPS)
def test_cuda_in_place(op, dtype):
    if dtype == BF16 and not HAVE_BF16:
        pytest.skip("this CuPy has no bfloat16 arrays")
    x, w, b = _inputs(op, (33, 1000), dtype, seed=7)
    res = _host(x.shape, dtype, 8)
    dw, db = _dev(w), None if b is None else _dev(b)
    y = _np(_run(op, _dev(x), dw, db))
    xd = _dev(x)
    assert _run(op, xd, dw, db, out=xd) is xd
    assert (_np(xd).tobytes() == y.tobytes()), f"{op} out=x"
    y2, h2 = (_np(a) for a in _run(op, _dev(x), dw, db, _dev(res)))
    xd, rd = _dev(x), _dev(res)
    _run(op, xd, dw, db, rd, out=(xd, rd))
    assert _np(xd).tobytes() == y2.tobytes() and _np(rd).tobytes() == h2.tobytes(), f"{op} out=(x, residual)"
    with pytest.raises(ValueError, match="out overlaps x"):
        _run(op, xd, dw, db, out=xd[::-1])


@pytest.mark.parametrize("op", OPS)
def test_cuda_weight_offset_backward(op):
    x, w, b = _inputs(op, (6, 300), F32, seed=9)
    dy = _host(x.shape, F32, 10)
    xd, wd, dyd = _dev(x), _dev(w), _dev(dy)
    if op == "rms":
        rstd = pynorm.rms_norm_forward(xd, wd, weight_offset=1.0)[1]
        dx, dw = pynorm.rms_norm_backward(dyd, xd, rstd, wd, weight_offset=1.0)
        dw0 = pynorm.rms_norm_backward(dyd, xd, rstd, wd)[1]
        ref_dx = R.rms_norm_backward_ref(dy, x, w, rstd=_np(rstd), weight_offset=1.0)[0]
    else:
        _, mean, rstd = pynorm.layer_norm_forward(xd, wd, _dev(b), weight_offset=1.0)
        dx, dw, _ = pynorm.layer_norm_backward(dyd, xd, mean, rstd, wd, weight_offset=1.0)
        dw0 = pynorm.layer_norm_backward(dyd, xd, mean, rstd, wd)[1]
        ref_dx = R.layer_norm_backward_ref(dy, x, w, mean=_np(mean), rstd=_np(rstd), weight_offset=1.0)[0]
    assert _np(dw).tobytes() == _np(dw0).tobytes(), "dweight must not depend on the offset"
    _close(f"{op} dx with offset (CUDA)", _np(dx), ref_dx, F32, 16)


def test_cuda_options_checked():
    xd = _dev(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="weight_offset"):
        pynorm.rms_norm(xd, None, weight_offset=1.0)
    with pytest.raises(ValueError, match="rounding"):
        pynorm.rms_norm(xd, _dev(np.ones(8, np.float32)), rounding="gemma")
    ffi, lib = _cuda.library()
    o = ffi.new("pn_norm_options *")
    o.H = -1
    y = cp.full((2, 8), 7.0, np.float32)
    p = lambda a: ffi.cast("void *", a.data.ptr)
    st = lib.pn_cuda_rmsnorm_forward_ex(p(y), ffi.NULL, p(xd), ffi.NULL, 1, 2, 8, 1e-6, 0, 0, ffi.NULL, o, ffi.NULL)
    assert st == lib.PN_ERR_SIZE, "H < 0"
    assert (_np(y) == 7.0).all(), "a refused call wrote"


# ---- per-head views (QK-norm on a fused qkv buffer) ----------------------------------

def _qkv_views(B, S, s, Hq, Hk, D):
    """name -> index function of the (B, S, Hq + 2Hk, D) buffer: per-head views."""
    return {
        "q 4-D, S sliced": lambda a: a[:, :s, :Hq],
        "k 4-D, S sliced": lambda a: a[:, :s, Hq:Hq + Hk],
        "q (B, H, S, D)": lambda a: a[:, :, :Hq].transpose(0, 2, 1, 3),
        "q 3-D (T, H, D)": lambda a: a.reshape(B * S, Hq + 2 * Hk, D)[:, :Hq],
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DNAME[d])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("D", [64, 128, 200])
def test_cuda_qk_norm_on_views_in_place(op, dtype, D):
    """rms_norm/layer_norm(q, w, out=q) on per-head views of a fused qkv CUDA buffer:
    the bits of the norm of a dense copy, written where the view is; the rest of the
    buffer untouched; in place (the view itself is returned)."""
    if dtype == BF16 and not HAVE_BF16:
        pytest.skip("this CuPy has no bfloat16 arrays")
    B, S, s, Hq, Hk = 2, 9, 5, 8, 2
    buf = _host((B, S, Hq + 2 * Hk, D), dtype, D, 0.3, 2.0)
    _, w, b = _inputs(op, (1, D), dtype, seed=D + 1)
    dw, db = _dev(w), None if b is None else _dev(b)
    for name, view in _qkv_views(B, S, s, Hq, Hk, D).items():
        want = _np(_run(op, cp.ascontiguousarray(view(_dev(buf))), dw, db, weight_offset=0.5, rounding="llama"))
        bd = _dev(buf)
        q = view(bd)
        assert _run(op, q, dw, db, weight_offset=0.5, rounding="llama", out=q) is q, f"{name}: not in place"
        got = _np(bd)
        assert view(got).tobytes() == want.tobytes(), f"{name}: bits differ from the dense call ({DNAME[dtype]})"
        outside = np.ones(buf.shape, bool)
        view(outside)[...] = False
        assert got[outside].tobytes() == buf[outside].tobytes(), f"{name}: memory outside the view was written"


@pytest.mark.parametrize("op", OPS)
def test_cuda_qk_norm_views_fused_and_backward(op):
    """The fused form (h over the residual view) and the backward (dx into a view) on
    per-head views give the dense calls' bits."""
    B, S, s, Hq, Hk, D = 2, 6, 4, 4, 2, 128
    x, w, b = _inputs(op, (B, S, Hq + 2 * Hk, D), F32, seed=3)
    r = _host(x.shape, F32, 4)
    dy = _host(x.shape, F32, 5)
    dw, db = _dev(w), None if b is None else _dev(b)
    view = _qkv_views(B, S, s, Hq, Hk, D)["q 4-D, S sliced"]
    dense = lambda a: cp.ascontiguousarray(view(_dev(a)))
    y0, h0 = (_np(a) for a in _run(op, dense(x), dw, db, dense(r)))
    xd, rd = _dev(x), _dev(r)
    _run(op, view(xd), dw, db, view(rd), out=(view(xd), view(rd)))
    assert view(_np(xd)).tobytes() == y0.tobytes() and view(_np(rd)).tobytes() == h0.tobytes(), "fused, in place"

    if op == "rms":
        rstd = pynorm.rms_norm_forward(dense(x), dw)[1]
        want = pynorm.rms_norm_backward(dense(dy), dense(x), rstd, dw)
        dxd = _dev(np.zeros_like(x))
        got = pynorm.rms_norm_backward(view(_dev(dy)), view(_dev(x)), rstd, dw, out=(view(dxd), None))
    else:
        _, mean, rstd = pynorm.layer_norm_forward(dense(x), dw, db)
        want = pynorm.layer_norm_backward(dense(dy), dense(x), mean, rstd, dw)
        dxd = _dev(np.zeros_like(x))
        got = pynorm.layer_norm_backward(view(_dev(dy)), view(_dev(x)), mean, rstd, dw, out=(view(dxd), None, None))
    assert view(_np(dxd)).tobytes() == _np(want[0]).tobytes(), "dx into the view"
    assert _np(got[1]).tobytes() == _np(want[1]).tobytes(), "dweight from views"
    outside = np.ones(x.shape, bool)
    view(outside)[...] = False
    assert (_np(dxd)[outside] == 0).all(), "dx: memory outside the view was written"


# ---- fused quantized output (rms_norm_quant / layer_norm_quant on CUDA arrays) -----------

from test_inference import BAD_QUANT, FP8, QMAX, _bits_equal, _dyn_ref, _q_ref  # noqa: E402

_QFN = {"rms": pynorm.rms_norm_quant, "layer": pynorm.layer_norm_quant}


def _qargs(op, x, w, b):
    return (x, w) if op == "rms" else (x, w, b)


def _host_q(q, qdtype):
    """q of a CUDA call on the host, in its dtype (a CuPy without float8 gives its bits)."""
    q = _np(q)
    return q.view(np.int8 if qdtype == "int8" else FP8)


@pytest.mark.parametrize("group", [None, 32, 128], ids=["row", "g32", "g128"])
@pytest.mark.parametrize("qdtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("C", [256, 4096, 20480])
def test_cuda_quant_dynamic_bit_for_bit(op, qdtype, group, C):
    """float32 data: q and scales are the NumPy quantization of the CUDA norm's own y, bit
    for bit (hostile rows: outliers, all zeros); and the CPU library's q where rstd agree."""
    x, w, b = _inputs(op, (5, C), F32, seed=40)
    x[0, :5] *= 1e3
    x[3] = 0
    kw = dict(weight_offset=1.0)
    xd, wd, bd = _dev(x), _dev(w), None if b is None else _dev(b)
    q, s = _QFN[op](*_qargs(op, xd, wd, bd), qdtype=qdtype, group_size=group, **kw)
    y = _np(_run(op, xd, wd, bd, **kw))
    q_ref, s_ref = _dyn_ref(y, qdtype, group or C)
    _bits_equal(_np(s), s_ref, f"{op} {qdtype} scales (CUDA)")
    _bits_equal(_host_q(q, qdtype), q_ref, f"{op} {qdtype} q (CUDA)")
    assert _np(s).shape == (5, C // (group or C))
    fwd = pynorm.rms_norm_forward if op == "rms" else pynorm.layer_norm_forward
    r_gpu = _np(fwd(*_qargs(op, xd, wd, bd), **kw)[-1])
    r_cpu = fwd(*_qargs(op, x, w, b), **kw)[-1]
    q_cpu, s_cpu = _QFN[op](*_qargs(op, x, w, b), qdtype=qdtype, group_size=group, **kw)
    agree = r_gpu == r_cpu
    _bits_equal(_host_q(q, qdtype)[agree], q_cpu[agree], f"{op} {qdtype} q: CUDA vs CPU where rstd agree")


@pytest.mark.parametrize("qdtype", ["int8", "float8_e4m3fn"])
def test_cuda_quant_static_and_scale_ub(qdtype):
    x, w, _ = _inputs("rms", (16, 1024), F32, seed=41)
    xd, wd = _dev(x), _dev(w)
    y = _np(pynorm.rms_norm(xd, wd))
    q, s = pynorm.rms_norm_quant(xd, wd, qdtype=qdtype, scale=0.003)       # saturates
    _bits_equal(_host_q(q, qdtype), _q_ref(y, qdtype, np.float32(0.003)), f"static {qdtype}")
    assert _np(s).shape == (1,) and _np(s)[0] == np.float32(0.003)
    if qdtype == "float8_e4m3fn":
        x[:, 0] = 1e4
        xd = _dev(x)
        y = _np(pynorm.rms_norm(xd, wd))
        q, s = pynorm.rms_norm_quant(xd, wd, qdtype=qdtype, scale_ub=1.0)
        q_ref, s_ref = _dyn_ref(y, qdtype, 1024, scale_ub=1.0)
        _bits_equal(_np(s), s_ref, "scales with scale_ub")
        _bits_equal(_host_q(q, qdtype), q_ref, "q with scale_ub")


@pytest.mark.parametrize("rounding", ["once", "llama"])
@pytest.mark.parametrize("dtype", [F16, BF16, F64], ids=lambda d: DNAME[d])
@pytest.mark.parametrize("op", OPS)
def test_cuda_quant_half_data_and_residual_match_cpu(op, dtype, rounding):
    """bf16/f16/f64 data with a residual: h bit for bit as the CPU's; q and scales bit for
    bit as the CPU library's on rows whose rstd agree (there the float32 y agree)."""
    if dtype == BF16 and not HAVE_BF16:
        pytest.skip("this CuPy has no bfloat16 arrays")
    x, w, b = _inputs(op, (64, 4096), dtype, seed=42)
    res = _host(x.shape, dtype, 43)
    xd, rd, wd, bd = _dev(x), _dev(res), _dev(w), None if b is None else _dev(b)
    for qdtype, group in (("int8", None), ("float8_e4m3fn", 128)):
        kw = dict(qdtype=qdtype, group_size=group, residual=None, rounding=rounding)
        kw["residual"] = rd
        q, s, h = _QFN[op](*_qargs(op, xd, wd, bd), **kw)
        kw["residual"] = res
        q_cpu, s_cpu, h_cpu = _QFN[op](*_qargs(op, x, w, b), **kw)
        assert _np(h).tobytes() == h_cpu.tobytes(), f"{op} h"
        fwd = pynorm.rms_norm_forward if op == "rms" else pynorm.layer_norm_forward
        r_gpu = _np(fwd(*_qargs(op, h, wd, bd), rounding=rounding)[-1])
        r_cpu = fwd(*_qargs(op, h_cpu, w, b), rounding=rounding)[-1]
        agree = r_gpu == r_cpu
        assert agree.mean() > 0.5, f"{op} {DNAME[dtype]}: rstd agree on only {agree.mean():.0%} of the rows"
        _bits_equal(_np(s)[agree], s_cpu[agree], f"{op} {qdtype} scales vs CPU")
        _bits_equal(_host_q(q, qdtype)[agree], q_cpu[agree], f"{op} {qdtype} q vs CPU")


@pytest.mark.parametrize("qdtype", ["int8", "float8_e4m3fn"])
def test_cuda_quant_nan_and_inf(qdtype):
    """As the CPU's: a group holding a NaN gets scale NaN and q 0 (int8) / NaN (float8);
    other groups and rows are untouched; an Inf row gives what the CPU gives."""
    x, w, _ = _inputs("rms", (3, 64), F32, seed=44)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    for group in (None, 32):
        q, s = pynorm.rms_norm_quant(_dev(x), _dev(w), qdtype=qdtype, group_size=group)
        q_cpu, s_cpu = pynorm.rms_norm_quant(x, w, qdtype=qdtype, group_size=group)
        assert np.isnan(_np(s)[1]).all()
        _bits_equal(_np(s), s_cpu, f"scales with NaN/Inf rows (group {group})")
        qh = _host_q(q, qdtype)
        if qdtype == "int8":
            assert (qh[1] == 0).all()
        else:
            assert np.isnan(qh[1].astype(np.float32)).all()
        _bits_equal(qh[[1, 2]], q_cpu[[1, 2]], f"q of the NaN and Inf rows (group {group})")


def test_cuda_quant_of_a_per_head_view():
    """A q view of a fused qkv buffer quantizes as its dense copy does (no copy made)."""
    buf = _host((2, 6, 12, 128), F32, 45)
    w = _host((128,), F32, 46)
    bd, wd = _dev(buf), _dev(w)
    views = {"(B, S, H, D), S sliced": lambda a: a[:, :4, :8],                     # two strides
             "(B, H, S, D)": lambda a: a[:, :, :8].transpose(0, 2, 1, 3)}          # three (H > 1)
    for name, view in views.items():
        q, s = pynorm.rms_norm_quant(view(bd), wd, qdtype="float8_e4m3fn", group_size=64)
        q0, s0 = pynorm.rms_norm_quant(cp.ascontiguousarray(view(bd)), wd, qdtype="float8_e4m3fn", group_size=64)
        assert _np(q).tobytes() == _np(q0).tobytes() and _np(s).tobytes() == _np(s0).tobytes(), name
        assert _np(bd).tobytes() == buf.tobytes(), f"{name}: the input was written"


@pytest.mark.parametrize("kw,exc,msg", BAD_QUANT, ids=[str(k) for k, _, _ in BAD_QUANT])
def test_cuda_quant_bad_arguments_name_them(kw, exc, msg):
    x, w, _ = _inputs("rms", (2, 32), F32, seed=47)
    kw = dict(kw)
    w = kw.pop("weight", w)
    with pytest.raises(exc, match=msg):
        pynorm.rms_norm_quant(_dev(x), None if w is None else _dev(w), **kw)
