"""docs/errors.md, entry by entry: the status table (codes, values, the
Python exception of each), the Python-only checks and the NaN/Inf rules.

Each table row is checked three ways where it can be: the C header and the
document agree on the code's value; pynorm maps the code to the documented
exception (check_status, the one place a C status becomes an exception); and a
public call that hits the condition raises that exception, names the
argument, and writes nothing. Codes Python cannot reach (NULL pointers, a short
scratch buffer, a failed allocation of terabytes) are checked through the
mapping only; tests/c/test_errors.c and tests/c/test_reliability_sizes.c reach
them in C.
"""

import math
import os
import re

import ml_dtypes
import numpy as np
import pytest

import pynorm
from pynorm import _arrays
from pynorm._lib import ffi, lib

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "errors.md")
BF16 = np.dtype(ml_dtypes.bfloat16)

# the exception docs/errors.md gives for each status
DOCUMENTED = {
    "PN_ERR_NULL": ValueError,       # "cannot happen": any exception class; the backstop maps it
    "PN_ERR_SIZE": ValueError,
    "PN_ERR_DTYPE": TypeError,
    "PN_ERR_EPS": ValueError,
    "PN_ERR_STRIDE": ValueError,
    "PN_ERR_ALIAS": ValueError,
    "PN_ERR_SCRATCH": pynorm.PynormError,
    "PN_ERR_ALLOC": MemoryError,
    "PN_ERR_GROUPS": ValueError,
    "PN_ERR_ARG": ValueError,
}


def doc_table():
    """{name: (value, python column)} from the status table of docs/errors.md."""
    rows = {}
    with open(DOC) as f:
        for line in f:
            m = re.match(r"\|\s*`(PN_\w+)`\s*\|\s*(\d+)\s*\|.*\|\s*(.*?)\s*\|\s*$", line)
            if m:
                rows[m.group(1)] = (int(m.group(2)), m.group(3))
    return rows


def arg(name):
    """A regex matching an argument's name as a word."""
    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


# ---------------------------------------------------------------------------
# the table against the header and the Python mapping

def test_table_lists_every_status_with_the_header_value():
    rows = doc_table()
    names = [n for n in dir(lib) if re.fullmatch(r"PN_(OK|ERR_\w+)", n)]
    assert set(rows) == set(names), f"docs/errors.md lists {sorted(rows)}, the header has {sorted(names)}"
    for name, (value, _) in rows.items():
        assert getattr(lib, name) == value, f"{name}: docs/errors.md says {value}, pynorm.h {getattr(lib, name)}"


def test_status_strings_are_distinct_and_nonempty():
    texts = [ffi.string(lib.pn_status_string(v)).decode() for v, _ in doc_table().values()]
    assert all(texts) and len(set(texts)) == len(texts)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_status_maps_to_the_documented_exception(name):
    rows = doc_table()
    exc = DOCUMENTED[name]
    python_column = rows[name][1]
    # the document's own words for the exception agree with this table
    if exc is not ValueError or "ValueError" in python_column:
        assert exc.__name__ in python_column or name == "PN_ERR_NULL", \
            f"{name}: docs/errors.md says '{python_column}', the test expects {exc.__name__}"
    with pytest.raises(exc) as info:
        _arrays.check_status(getattr(lib, name), "op")
    assert ffi.string(lib.pn_status_string(getattr(lib, name))).decode() in str(info.value)
    _arrays.check_status(lib.PN_OK, "op")   # PN_OK raises nothing


# ---------------------------------------------------------------------------
# each reachable code through the public API

def _x(shape=(3, 5), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_size_empty_last_axis_and_0d():
    for fn in (pynorm.layer_norm, pynorm.rms_norm):
        with pytest.raises(ValueError, match="C = 0|empty last axis"):
            fn(np.zeros((3, 0), np.float32))
        with pytest.raises(ValueError, match=arg("x")):
            fn(np.array(1.0, np.float32))


def test_size_zero_rows_are_allowed_and_empty():
    y, mean, rstd = pynorm.layer_norm_forward(np.zeros((0, 4), np.float32))
    assert y.shape == (0, 4) and mean.shape == (0,) and rstd.shape == (0,)
    dx, dw, db = pynorm.layer_norm_backward(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32),
                                            mean, rstd)
    assert dx.shape == (0, 4) and not dw.any() and not db.any()


@pytest.mark.parametrize("what", ["x", "weight", "bias", "out"])
def test_dtype_type_error_names_the_argument(what):
    x = _x()
    kw = {}
    if what == "x":
        x = x.astype(np.int32)
    elif what == "weight":
        kw["weight"] = np.ones(5, np.float16)            # neither x's dtype nor float32
    elif what == "bias":
        kw["bias"] = np.ones(5, np.float64)
    else:
        kw["out"] = np.empty((3, 5), np.float64)
    with pytest.raises(TypeError, match=arg(what)):
        pynorm.layer_norm(x, **kw)


@pytest.mark.parametrize("eps", [-1e-5, -0.0 - 1e-300, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_eps_value_error(op, eps):
    x = _x()
    args = (x, _x(seed=1)) if op.startswith("add_") else (x,)
    with pytest.raises(ValueError, match=arg("eps")):
        getattr(pynorm, op)(*args, eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", [1e-5], np.array([1e-5, 1e-5])])
def test_eps_type_error_when_not_a_real_number(eps):
    with pytest.raises(TypeError, match=arg("eps")):
        pynorm.layer_norm(_x(), eps=eps)


def test_large_finite_eps_is_accepted():
    """"eps negative, NaN or infinite" is the whole rule: a huge finite eps is valid."""
    y = pynorm.layer_norm(_x(), eps=1e308).astype(np.float64)
    assert np.isfinite(y).all() and np.abs(y).max() < 1e-30


def test_stride_output_rows_overlapping():
    """out= whose rows overlap (stride 0 along a leading axis): refused, nothing written."""
    base = np.full(5, 7.0, np.float32)
    out = np.lib.stride_tricks.as_strided(base, shape=(3, 5), strides=(0, 4))
    assert out.flags.writeable
    with pytest.raises(ValueError, match="out"):
        pynorm.layer_norm(_x(), out=out)
    assert (base == 7).all()


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_alias_out_overlapping_an_input(op):
    x, r = _x(), _x(seed=1)
    fused = op.startswith("add_")
    args = (x, r) if fused else (x,)
    before = x.copy()
    with pytest.raises(ValueError) as info:
        if fused:
            getattr(pynorm, op)(*args, out=(x[::-1], np.empty_like(x)))
        else:
            getattr(pynorm, op)(*args, out=x[::-1])   # out=x itself is in place (allowed)
    assert re.search(arg("x"), str(info.value)) and "out" in str(info.value)
    assert x.tobytes() == before.tobytes()


def test_alias_outputs_overlapping_each_other():
    y = np.empty((3, 5), np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        pynorm.add_rms_norm(_x(), _x(seed=1), out=(y, y))


def test_scratch_is_always_the_librarys_in_python():
    """The Python backward passes no scratch buffer (the library allocates
    it), so PN_ERR_SCRATCH cannot come from Python; any size works."""
    x, dy = _x((70, 9)), _x((70, 9), seed=2)
    _, mean, rstd = pynorm.layer_norm_forward(x)
    dx, dw, db = pynorm.layer_norm_backward(dy, x, mean, rstd, np.ones(9, np.float32))
    assert np.isfinite(dx).all() and np.isfinite(dw).all() and np.isfinite(db).all()


def test_groups_value_error_names_num_groups():
    x = _x((2, 6, 4))
    with pytest.raises(ValueError, match=arg("num_groups")):
        pynorm.group_norm(x, 4)
    with pytest.raises(ValueError, match=arg("num_groups")):
        pynorm.group_norm(x, 0)


def test_arg_bad_layout_and_momentum():
    x = _x((2, 6, 4))
    with pytest.raises(ValueError, match=arg("layout")):
        pynorm.group_norm(x, 2, layout="NCWH")
    with pytest.raises(TypeError, match=arg("layout")):
        pynorm.group_norm(x, 2, layout=3)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    with pytest.raises(ValueError, match=arg("momentum")):
        pynorm.batch_norm(x, rm, rv, training=True, momentum=math.nan)
    assert (rm == 0).all() and (rv == 1).all()


# ---------------------------------------------------------------------------
# the Python-only checks

def test_inputs_must_be_ndarrays():
    with pytest.raises(TypeError, match=arg("x")):
        pynorm.layer_norm([[1.0, 2.0]])
    with pytest.raises(TypeError, match=arg("weight")):
        pynorm.layer_norm(_x(), weight=[1.0] * 5)
    with pytest.raises(TypeError, match=arg("residual")):
        pynorm.add_layer_norm(_x(), None)


def test_weight_and_bias_shape():
    with pytest.raises(ValueError, match=arg("weight")):
        pynorm.layer_norm(_x(), weight=np.ones(4, np.float32))
    with pytest.raises(ValueError, match=arg("bias")):
        pynorm.layer_norm(_x(), bias=np.ones((1, 5), np.float32))


def test_out_shape_dtype_writable():
    x = _x()
    with pytest.raises(ValueError, match="out"):
        pynorm.layer_norm(x, out=np.empty((3, 6), np.float32))
    with pytest.raises(TypeError, match="out"):
        pynorm.layer_norm(x, out=np.empty((3, 5), np.float16))
    ro = np.zeros((3, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        pynorm.layer_norm(x, out=ro)
    assert not ro.any()
    # any strides are accepted, a strided last axis included (written through a temporary)
    wide = np.zeros((3, 10), np.float32)
    assert pynorm.layer_norm(x, out=wide[:, ::2]) is not None
    np.testing.assert_array_equal(wide[:, ::2], pynorm.layer_norm(x))
    assert not wide[:, 1::2].any()


def test_backward_statistics_shape_and_dtype():
    x, dy = _x(), _x(seed=2)
    _, mean, rstd = pynorm.layer_norm_forward(x)
    with pytest.raises(ValueError, match=arg("mean")):
        pynorm.layer_norm_backward(dy, x, mean[:2], rstd)
    with pytest.raises(TypeError, match=arg("rstd")):
        pynorm.layer_norm_backward(dy, x, mean, rstd.astype(np.float64))
    with pytest.raises(TypeError, match=arg("rstd")):
        pynorm.rms_norm_backward(dy, x, rstd.astype(np.float16))


def test_accumulate_needs_every_gradient_in_out():
    x, dy = _x(), _x(seed=2)
    _, mean, rstd = pynorm.layer_norm_forward(x)
    with pytest.raises(ValueError, match="accumulate"):
        pynorm.layer_norm_backward(dy, x, mean, rstd, accumulate=True)
    dx = np.zeros_like(x)
    with pytest.raises(ValueError, match="accumulate"):
        pynorm.layer_norm_backward(dy, x, mean, rstd, out=(dx, None, None), accumulate=True)
    assert not dx.any()


# ---------------------------------------------------------------------------
# NaN and Inf

@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.float64])
def test_nan_in_a_row_makes_the_row_and_its_statistics_nan(dtype):
    x = _x((4, 7), dtype)
    x[1, 3] = np.nan
    for fwd in (pynorm.layer_norm_forward, pynorm.rms_norm_forward):
        y, *stats = fwd(x)
        y64 = y.astype(np.float64)
        assert np.isnan(y64[1]).all()
        assert np.isfinite(y64[[0, 2, 3]]).all(), "other rows must not be affected"
        for s in stats:
            assert np.isnan(s[1]) and np.isfinite(s[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.float64])
def test_inf_in_a_row(dtype):
    x = _x((3, 6), dtype)
    x[0, 2] = np.inf
    x[2, 5] = -np.inf
    y = pynorm.layer_norm(x).astype(np.float64)
    assert np.isnan(y[[0, 2]]).all() and np.isfinite(y[1]).all()
    w = np.full(6, 2.0, dtype)
    y, rstd = pynorm.rms_norm_forward(x, w)
    y = y.astype(np.float64)
    assert rstd[0] == 0 and rstd[2] == 0 and rstd[1] > 0
    assert np.isnan(y[0, 2]) and np.isnan(y[2, 5])
    assert (y[0, [0, 1, 3, 4, 5]] == 0).all() and (y[2, :5] == 0).all()
    assert np.isfinite(y[1]).all()


@pytest.mark.parametrize("op", ["layer_norm_backward", "rms_norm_backward"])
def test_nan_never_crashes_the_backward_and_stays_in_its_row(op):
    x, dy = _x((4, 8)), _x((4, 8), seed=3)
    dy[2, 1] = np.nan
    if op == "layer_norm_backward":
        _, mean, rstd = pynorm.layer_norm_forward(x)
        dx, dw, db = pynorm.layer_norm_backward(dy, x, mean, rstd)
    else:
        _, rstd = pynorm.rms_norm_forward(x)
        dx, dw = pynorm.rms_norm_backward(dy, x, rstd)
    assert np.isnan(dx[2]).all() and np.isfinite(dx[[0, 1, 3]]).all()
    assert np.isnan(dw[1])


def test_float32_rows_huge_and_denormal_normalize_accurately():
    """Sums of squares in double: float32 rows of magnitude near float32's
    maximum (one sign, few values: see test_properties.py's known overflow of
    wide rows) and rows of denormals normalize like the float64 reference."""
    rng = np.random.default_rng(5)
    for scale in (3.3e38, 1e-40):
        x = (scale * rng.uniform(0.95 if scale > 1 else 0.3, 1.0, (3, 8))).astype(np.float32)
        for fwd in ("layer", "rms"):
            x64 = x.astype(np.float64)
            if fwd == "layer":
                y = pynorm.layer_norm(x, eps=0.0 if scale > 1 else 1e-5).astype(np.float64)
                c = x64 - x64.mean(axis=1, keepdims=True)
                ref = c / np.sqrt((c * c).mean(axis=1, keepdims=True) + (0.0 if scale > 1 else 1e-5))
            else:
                y = pynorm.rms_norm(x).astype(np.float64)
                ref = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + np.finfo(np.float32).eps)
            np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-6, err_msg=f"{fwd} at scale {scale}")


@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_half_outputs_beyond_range_round_to_inf(dtype):
    x = np.array([[-1.0, 1.0]], dtype)
    big = 6e4 if dtype == np.float16 else 3e38
    w = np.array([big, big], np.float32)           # y = +-1 * big * ~1 ... then the bias pushes it over
    b = np.array([-big, big], np.float32)
    y = pynorm.layer_norm(x, w, b).astype(np.float64)
    assert y[0, 0] == -np.inf and y[0, 1] == np.inf
