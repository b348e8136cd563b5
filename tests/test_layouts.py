"""Memory layouts: every public function gives the same bits for any layout of its arrays.

Each array argument of a call - inputs and out= arrays alike - gets a random
layout: a view into a larger buffer with its axes in any order (the buffer is a
transposed copy, so the logical array is the same), steps of 2 or 3, negative
steps (NumPy and CuPy; torch has none), padding around the view, size-1 and
empty axes, and for inputs broadcast axes (stride 0). The same call on dense
C-contiguous copies defines the expected result, bit for bit (NaN matches NaN):

- results, returned arrays and the contents of every out= view are identical;
- out= arrays are returned as given, and nothing outside their views changes
  (each is a view into a bigger buffer whose other elements are checked);
- accumulate=True and BatchNorm's running statistics (read and written) hold
  the same values as with dense arrays; no input buffer changes;
- a call that the dense arrays make fail fails the same way, writing nothing.

Covered: the NumPy API (every function of pynorm.__all__ that takes arrays,
out= and accumulate included), the same on CUDA arrays (CuPy; skipped without
a GPU), pynorm.torch's functions and modules with autograd through
non-contiguous and expanded gradients (CPU, and CUDA when present), and
pynorm.distributed on a one-process gloo group.

Reproducible: a derandomized hypothesis profile (no example database);
PYNORM_HYPOTHESIS_EXAMPLES=N runs N examples per test.
"""

import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pynorm
import pynorm.torch as pnt
from conftest import BF16, F16, F32, F64, TORCH_DTYPES, assert_bitwise_equal

DTYPES = [F32, F16, BF16, F64]

settings.register_profile(
    "pynorm-layouts",
    derandomize=True,            # the same examples on every run
    database=None,
    deadline=None,               # a loaded machine: no per-example time limit
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_N = int(os.environ.get("PYNORM_HYPOTHESIS_EXAMPLES", "0"))


def profile(examples):
    return settings(settings.get_profile("pynorm-layouts"), max_examples=_N or examples)


# ---------------------------------------------------------------------------
# layouts

@dataclass(frozen=True)
class Layout:
    """Where a logical array lies in its buffer."""
    order: tuple    # the buffer's axes, outermost first, as logical axes (not 0..n-1: transposed)
    steps: tuple    # per logical axis: the step between its elements (negative: reversed)
    pads: tuple     # per logical axis: buffer elements outside the view (half of them before it)
    bcast: tuple    # per logical axis: stride 0, the values repeated along it (inputs only)


@st.composite
def _full_layouts(draw, ndim, broadcast, negative, kind=None):
    steps = [1, 2, -1, 3, -2] if negative else [1, 2, 3]
    # inputs: none, some or all of the leading axes broadcast (every row the same one,
    # as np.broadcast_to(row, shape) gives)
    if kind is None:
        kind = draw(st.sampled_from(["none", "rows", "some", "rows"]), label="broadcast") if broadcast else "none"
    # mostly rows the kernels read in place (the last axis innermost, step 1), whose
    # leading axes the B x T split must handle; otherwise any order and step
    rows = ndim > 0 and (kind == "rows" or draw(st.sampled_from([True, True, False]), label="rows in place"))
    lead = tuple(draw(st.permutations(range(ndim - 1)))) if rows else ()
    order = lead + (ndim - 1,) if rows else tuple(draw(st.permutations(range(ndim))))
    step = draw(st.lists(st.sampled_from(steps), min_size=ndim, max_size=ndim))
    if rows:
        step[-1] = 1
    pads = tuple(draw(st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim)))
    bcast = (False,) * ndim
    if kind == "rows":
        bcast = (True,) * (ndim - 1) + (False,) * min(ndim, 1)
    elif kind == "some":
        bcast = tuple(draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim)))
    return Layout(order, tuple(step), pads, bcast)


def layouts(ndim, broadcast=False, negative=True):
    """None (a dense array) or a Layout for an array of ndim axes."""
    full = _full_layouts(ndim, broadcast, negative)
    return st.one_of(st.none(), full, full)


def _view_slices(shape, lay):
    """(index of the view in logical axis order, buffer size per logical axis); the
    index ends with an Ellipsis so that even a 0-d array gives a view."""
    sl, phys = [], []
    for n, s, p in zip(shape, lay.steps, lay.pads):
        k, o = abs(s), (p + 1) // 2
        ext = (n - 1) * k + 1 if n else 0
        phys.append(ext + p)
        if n == 0:
            sl.append(slice(o, o))
        elif s > 0:
            sl.append(slice(o, o + ext, k))
        else:
            sl.append(slice(o + ext - 1, o - 1 if o else None, -k))
    return tuple(sl) + (Ellipsis,), phys


def _repeat_source(values, lay):
    """values restricted to index 0 along the broadcast axes (that have elements)."""
    bc = tuple(b and n > 0 for b, n in zip(lay.bcast, values.shape))
    return values[tuple(slice(0, 1) if b else slice(None) for b in bc)], bc


class Placed:
    """An argument laid out in a buffer: `arr` (what the call gets), `dense` (the
    same logical values, C-contiguous), and what checks the buffer afterwards."""

    def __init__(self, arr, dense, buf, mask, before):
        self.arr, self.dense, self.buf, self.mask, self.before = arr, dense, buf, mask, before


class NumpyLike:
    """Buffers of NumPy (or, through `xp`, CuPy) arrays; values come from the host."""

    def __init__(self, xp=np):
        self.xp = xp

    def host(self, a):
        return a if self.xp is np else self.xp.asnumpy(a)

    def dev(self, a):
        return a if self.xp is np else self.xp.asarray(a)

    def place(self, values, lay, fill=77.0):
        """values (a host array) laid out as lay says (None: a dense copy)."""
        xp = self.xp
        if lay is None:
            arr = self.dev(values.copy())
            return Placed(arr, values.copy(), arr, None, values.copy())
        src, bc = _repeat_source(values, lay)
        dense = np.array(np.broadcast_to(src, values.shape), order="C")
        sl, phys = _view_slices(src.shape, lay)
        inv = tuple(int(i) for i in np.argsort(lay.order))
        hbuf = np.full([phys[a] for a in lay.order], fill, values.dtype)
        mask = np.zeros(hbuf.shape, bool)
        hbuf.transpose(inv)[sl][...] = src
        mask.transpose(inv)[sl][...] = True
        buf = self.dev(hbuf)
        arr = buf.transpose(inv)[sl]
        if any(bc):
            arr = xp.broadcast_to(arr, values.shape)
        assert arr.shape == values.shape
        return Placed(arr, dense, buf, mask, hbuf.copy())


class TorchLike:
    """Buffers of torch tensors on `device` (steps are positive: torch has no negative strides)."""

    def __init__(self, device):
        self.torch, self.device = torch, device

    def tensor(self, values):
        """A torch tensor of a host array (bfloat16 through its bits)."""
        torch = self.torch
        if values.dtype == BF16:
            t = torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(values.copy())
        return t.to(self.device)

    def host(self, t):
        t = t.detach().cpu().contiguous()
        if t.dtype == self.torch.bfloat16:
            return t.view(self.torch.int16).numpy().view(BF16).copy()
        return t.numpy().copy()

    def place(self, values, lay, fill=77.0):
        if lay is None:
            return Placed(self.tensor(values), values.copy(), None, None, None)
        src, bc = _repeat_source(values, lay)
        dense = np.array(np.broadcast_to(src, values.shape), order="C")
        sl, phys = _view_slices(src.shape, lay)
        inv = tuple(int(i) for i in np.argsort(lay.order))
        hbuf = np.full([phys[a] for a in lay.order], fill, values.dtype)
        hbuf.transpose(inv)[sl][...] = src
        buf = self.tensor(hbuf)
        arr = buf.permute(inv)[sl]
        if any(bc):
            arr = arr.expand(values.shape)
        assert tuple(arr.shape) == values.shape
        return Placed(arr, dense, buf, None, None)


# ---------------------------------------------------------------------------
# values and comparisons

def values(rng, shape, dtype, loc=0.0, scale=1.0):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def same_bits(got, want, what):
    """Bit-identical, any NaN matching any NaN."""
    assert_bitwise_equal(np.asarray(got), np.asarray(want), what)


def _raw(a):
    return np.ascontiguousarray(a).view(np.uint8)


class Case:
    """The arguments of one call, each laid out at random (drawn from `data`)."""

    def __init__(self, data, space, negative=True, repeat_rows=()):
        self.data, self.space, self.negative = data, space, negative
        self.repeat_rows = repeat_rows      # inputs whose rows are all one row
        self.args = {}          # name -> Placed or a plain value
        self.outs = []          # names of arrays the call writes (out=, accumulate, running stats)
        self.layouts = {}

    def _lay(self, name, ndim, broadcast):
        if name in self.repeat_rows:
            strategy = _full_layouts(ndim, True, self.negative, "rows")
        else:
            strategy = layouts(ndim, broadcast, self.negative)
        lay = self.data.draw(strategy, label=f"layout of {name}")
        self.layouts[name] = lay
        return lay

    def input(self, name, vals, broadcast=True):
        """An input: returns its logical (dense) values, which broadcast axes may repeat."""
        p = self.space.place(vals, self._lay(name, vals.ndim, broadcast))
        self.args[name] = p
        return p.dense

    def output(self, name, vals):
        """An array the call writes (its initial contents: vals, the same for both calls)."""
        self.args[name] = self.space.place(vals, self._lay(name, vals.ndim, False), fill=-55.0)
        self.outs.append(name)

    def value(self, name, v):
        self.args[name] = v

    def dense_args(self):
        d = {}
        for k, v in self.args.items():
            d[k] = self.space.place(v.dense, None).arr if isinstance(v, Placed) else v
        return d

    def laid_args(self):
        return {k: (v.arr if isinstance(v, Placed) else v) for k, v in self.args.items()}


def _flat(result):
    if isinstance(result, tuple):
        return list(result)
    return [result]


def run_numpy_case(case, call):
    """call(args) on dense copies and on the laid-out arrays; compares everything."""
    space = case.space
    dense, laid = case.dense_args(), case.laid_args()
    try:
        want = call(dense)
    except (ValueError, TypeError) as e:
        with pytest.raises(type(e)):
            call(laid)
        for name, p in case.args.items():
            if isinstance(p, Placed):
                assert _raw(space.host(p.buf)).tobytes() == _raw(p.before).tobytes(), \
                    f"{name} changed although the call raised"
        return
    got = call(laid)
    outs = {id(case.args[n].arr): n for n in case.outs}
    for i, (g, w) in enumerate(zip(_flat(got), _flat(want))):
        if w is None:
            assert g is None, f"result {i}: expected None"
            continue
        if id(g) in outs:
            continue            # an out= array: its view is compared below
        assert g.flags.c_contiguous, f"result {i} is not C-contiguous"
        same_bits(space.host(g), space.host(w), f"result {i} with layouts {case.layouts}")
    for i, (g, w) in enumerate(zip(_flat(got), _flat(want))):
        for n in case.outs:
            if dense[n] is w:
                assert g is case.args[n].arr, f"result {i}: the out= array {n} is not returned as given"
    for name, p in case.args.items():
        if not isinstance(p, Placed):
            continue
        after = space.host(p.buf)
        if name in case.outs:
            same_bits(space.host(p.arr), space.host(dense[name]),
                      f"{name} (written) with layouts {case.layouts}")
            if p.mask is not None:
                assert _raw(after[~p.mask]).tobytes() == _raw(p.before[~p.mask]).tobytes(), \
                    f"{name}: elements outside the view changed (layout {case.layouts[name]})"
        else:
            assert _raw(after).tobytes() == _raw(p.before).tobytes(), f"input {name} was modified"


# ---------------------------------------------------------------------------
# the NumPy API (and the same calls on CuPy arrays)

LEAD_SIZES = [2, 3, 1, 4, 2, 3, 1, 4, 0]     # empty arrays too, now and then
C_SIZES = [8, 1, 3, 17]
TOKEN_FWD = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "layer_norm_forward", "rms_norm_forward"]
TOKEN_QUANT = ["rms_norm_quant", "layer_norm_quant"]      # NumPy and CuPy arrays (torch: test_torch_inference.py)


def _draw_dtypes(data, dtypes):
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    wdtype = data.draw(st.sampled_from([dtype, F32]), label="weight dtype")
    return dtype, wdtype


def _lead(data):
    """Leading axes: mostly two or three (the B x T splits), sometimes one or none."""
    n = data.draw(st.sampled_from([2, 3, 1, 0, 2, 3]), label="leading axes")
    return tuple(data.draw(st.lists(st.sampled_from(LEAD_SIZES), min_size=n, max_size=n), label="lead"))


def token_forward_case(data, space, dtypes, negative=True, repeat_rows=()):
    ops = TOKEN_FWD + (TOKEN_QUANT if isinstance(space, NumpyLike) else [])
    op = data.draw(st.sampled_from(ops), label="op")
    dtype, wdtype = _draw_dtypes(data, dtypes)
    shape = _lead(data) + (data.draw(st.sampled_from(C_SIZES), label="C"),)
    C = shape[-1]
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    quant = op in TOKEN_QUANT
    layer = "layer" in op
    fused = op.startswith("add_") or (quant and data.draw(st.booleans(), label="residual"))
    case = Case(data, space, negative, repeat_rows)
    case.input("x", values(rng, shape, dtype, 0.3, 2.0))
    if fused:
        case.input("residual", values(rng, shape, dtype))
    if data.draw(st.booleans(), label="weight"):
        case.input("weight", values(rng, (C,), wdtype, 1.0, 0.5))
    if layer and data.draw(st.booleans(), label="bias"):
        case.input("bias", values(rng, (C,), wdtype))
    if op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        for name in (["out", "h_out"] if fused else ["out"]):
            if data.draw(st.booleans(), label=name):
                case.output(name, values(rng, shape, dtype))

    def call(a):
        w, b = a.get("weight"), a.get("bias")
        if quant:
            kw = {"residual": a["residual"]} if fused else {}
            if layer:
                return pynorm.layer_norm_quant(a["x"], w, b, qdtype="float8_e4m3fn", **kw)
            return pynorm.rms_norm_quant(a["x"], w, **kw)
        if fused:
            kw = {"out": (a.get("out"), a.get("h_out"))} if "out" in a or "h_out" in a else {}
            if layer:
                return pynorm.add_layer_norm(a["x"], a["residual"], w, b, **kw)
            return pynorm.add_rms_norm(a["x"], a["residual"], w, **kw)
        kw = {"out": a["out"]} if "out" in a else {}
        if op == "layer_norm":
            return pynorm.layer_norm(a["x"], w, b, **kw)
        if op == "rms_norm":
            return pynorm.rms_norm(a["x"], w, **kw)
        if op == "layer_norm_forward":
            return pynorm.layer_norm_forward(a["x"], w, b)
        return pynorm.rms_norm_forward(a["x"], w)
    return case, call


def token_backward_case(data, space, dtypes, negative=True, repeat_rows=()):
    layer = data.draw(st.booleans(), label="layer (else rms)")
    dtype, wdtype = _draw_dtypes(data, dtypes)
    shape = _lead(data) + (data.draw(st.sampled_from(C_SIZES), label="C"),)
    C = shape[-1]
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    case = Case(data, space, negative, repeat_rows)
    x = case.input("x", values(rng, shape, dtype, 0.3, 2.0))
    case.input("dy", values(rng, shape, dtype))
    weight = None
    if data.draw(st.booleans(), label="weight"):
        weight = case.input("weight", values(rng, (C,), wdtype, 1.0, 0.5))
    gdtype = wdtype if weight is not None else F32
    if layer:                            # the statistics of the dense x, laid out at random
        _, mean, rstd = pynorm.layer_norm_forward(x, weight)
        case.input("mean", mean, broadcast=False)
    else:
        _, rstd = pynorm.rms_norm_forward(x, weight)
    case.input("rstd", rstd, broadcast=False)
    names = ["dx", "dweight", "dbias"] if layer else ["dx", "dweight"]
    accumulate = data.draw(st.booleans(), label="accumulate")
    given = [accumulate or data.draw(st.booleans(), label=f"out {n}") for n in names]
    for n, g in zip(names, given):
        if g:
            case.output(n, values(rng, shape if n == "dx" else (C,), dtype if n == "dx" else gdtype))
    case.value("accumulate", accumulate)

    def call(a):
        kw = {"accumulate": True} if a["accumulate"] else {}
        if any(n in a for n in names):
            kw["out"] = tuple(a.get(n) for n in names)
        if layer:
            return pynorm.layer_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a.get("weight"), **kw)
        return pynorm.rms_norm_backward(a["dy"], a["x"], a["rstd"], a.get("weight"), **kw)
    return case, call


SPATIAL_FWD = ["group_norm", "instance_norm", "batch_norm", "group_norm_forward", "batch_norm_forward"]


def _spatial_shape(data, layout):
    N = data.draw(st.sampled_from([2, 1, 3]), label="N")
    C = data.draw(st.sampled_from([4, 1, 2, 6]), label="C")
    spatial = tuple(data.draw(st.lists(st.sampled_from([3, 1, 2]), min_size=0, max_size=3), label="spatial"))
    shape = (N, C) + spatial if layout == "NCHW" else (N,) + spatial + (C,)
    return shape, N, C, spatial


def spatial_forward_case(data, space, dtypes, negative=True):
    op = data.draw(st.sampled_from(SPATIAL_FWD), label="op")
    layout = data.draw(st.sampled_from(["NCHW", "NHWC"]), label="layout")
    dtype, wdtype = _draw_dtypes(data, dtypes)
    shape, N, C, spatial = _spatial_shape(data, layout)
    G = data.draw(st.sampled_from([g for g in (1, 2, 3, C) if C % g == 0]), label="groups")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    case = Case(data, space, negative)
    case.input("x", values(rng, shape, dtype, 0.3, 2.0))
    if data.draw(st.booleans(), label="weight"):
        case.input("weight", values(rng, (C,), wdtype, 1.0, 0.5))
    if data.draw(st.booleans(), label="bias"):
        case.input("bias", values(rng, (C,), wdtype))
    batch = op.startswith("batch")
    training = batch and data.draw(st.booleans(), label="training")
    if batch:
        rdtype = data.draw(st.sampled_from([dtype, F32]), label="running dtype")
        if not training or data.draw(st.booleans(), label="running stats"):
            rm, rv = values(rng, (C,), rdtype, 0.1, 0.3), np.abs(values(rng, (C,), rdtype, 1.0, 0.3))
            if training:             # updated in place
                case.output("running_mean", rm)
                case.output("running_var", rv)
            else:
                case.input("running_mean", rm)
                case.input("running_var", rv)
    if op in ("group_norm", "instance_norm", "batch_norm") and data.draw(st.booleans(), label="out"):
        case.output("out", values(rng, shape, dtype))

    def call(a):
        w, b = a.get("weight"), a.get("bias")
        kw = {"out": a["out"]} if "out" in a else {}
        if op == "group_norm":
            return pynorm.group_norm(a["x"], G, w, b, layout=layout, **kw)
        if op == "group_norm_forward":
            return pynorm.group_norm_forward(a["x"], G, w, b, layout=layout)
        if op == "instance_norm":
            return pynorm.instance_norm(a["x"], w, b, layout=layout, **kw)
        f = pynorm.batch_norm if op == "batch_norm" else pynorm.batch_norm_forward
        return f(a["x"], a.get("running_mean"), a.get("running_var"), w, b, training=training,
                 layout=layout, **kw)
    return case, call


def spatial_backward_case(data, space, dtypes, negative=True):
    group = data.draw(st.booleans(), label="group (else batch)")
    layout = data.draw(st.sampled_from(["NCHW", "NHWC"]), label="layout")
    dtype, wdtype = _draw_dtypes(data, dtypes)
    shape, N, C, spatial = _spatial_shape(data, layout)
    G = data.draw(st.sampled_from([g for g in (1, 2, C) if C % g == 0]), label="groups")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    training = data.draw(st.booleans(), label="training")
    case = Case(data, space, negative)
    x = case.input("x", values(rng, shape, dtype, 0.3, 2.0))
    case.input("dy", values(rng, shape, dtype))
    weight = None
    if data.draw(st.booleans(), label="weight"):
        weight = case.input("weight", values(rng, (C,), wdtype, 1.0, 0.5))
    gdtype = wdtype if weight is not None else F32
    sdt = F64 if dtype == F64 else F32
    try:                                 # statistics of the dense x (any values when it has none)
        if group:
            _, mean, rstd = pynorm.group_norm_forward(x, G, weight, layout=layout)
        else:
            _, mean, rstd = pynorm.batch_norm_forward(x, None, None, weight, training=True, layout=layout)
    except ValueError:
        mean = values(rng, (N, G) if group else (C,), sdt)
        rstd = np.abs(values(rng, mean.shape, sdt, 1.0))
    case.input("mean", mean, broadcast=False)
    case.input("rstd", rstd, broadcast=False)
    accumulate = data.draw(st.booleans(), label="accumulate")
    names = ["dx", "dweight", "dbias"]
    for n in names:
        if accumulate or data.draw(st.booleans(), label=f"out {n}"):
            case.output(n, values(rng, shape if n == "dx" else (C,), dtype if n == "dx" else gdtype))
    case.value("accumulate", accumulate)

    def call(a):
        kw = {"accumulate": True} if a["accumulate"] else {}
        if any(n in a for n in names):
            kw["out"] = tuple(a.get(n) for n in names)
        if group:
            return pynorm.group_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], G, a.get("weight"),
                                              layout=layout, **kw)
        return pynorm.batch_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a.get("weight"),
                                          layout=layout, training=training, **kw)
    return case, call


CASES = {"token_forward": token_forward_case, "token_backward": token_backward_case,
         "spatial_forward": spatial_forward_case, "spatial_backward": spatial_backward_case}


def test_every_array_function_is_covered():
    """The cases here call every function of pynorm.__all__ that takes arrays."""
    takes_arrays = {n for n in pynorm.__all__ if callable(getattr(pynorm, n))} - {
        "isa", "set_num_threads", "get_num_threads", "copy_bandwidth", "bfloat16", "PynormError"}
    covered = set(TOKEN_FWD) | set(TOKEN_QUANT) | {"layer_norm_backward", "rms_norm_backward", "group_norm_backward",
                                "batch_norm_backward"} | set(SPATIAL_FWD)
    assert takes_arrays <= covered, f"not covered by the layout tests: {sorted(takes_arrays - covered)}"


@pytest.mark.parametrize("kind", list(CASES))
def test_numpy_layouts_give_the_dense_bits(kind):
    @profile(150)
    @given(st.data())
    def check(data):
        case, call = CASES[kind](data, NumpyLike(), DTYPES)
        run_numpy_case(case, call)
    check()


REPEATED_ROWS = [("token_forward", ("x",)), ("token_forward", ("residual",)), ("token_backward", ("dy",)),
                 ("token_backward", ("x",))]


@pytest.mark.parametrize("kind,inputs", REPEATED_ROWS)
def test_numpy_repeated_rows_under_any_split(kind, inputs):
    """Inputs whose rows are all one row (np.broadcast_to(row, shape)), whatever B x T
    split the other buffers' layouts force: the dense bits."""
    @profile(60)
    @given(st.data())
    def check(data):
        case, call = CASES[kind](data, NumpyLike(), DTYPES, repeat_rows=inputs)
        run_numpy_case(case, call)
    check()


# the examples, kept as plain tests

def test_out_with_a_strided_last_axis():
    rng = np.random.default_rng(1)
    x, w, b = values(rng, (4, 8), F32), values(rng, (8,), F32), values(rng, (8,), F32)
    for f, args in ((pynorm.layer_norm, (x, w, b)), (pynorm.rms_norm, (x, w))):
        big = np.full((4, 16), -3.0, F32)
        o = big[:, ::2]
        assert f(*args, out=o) is o
        same_bits(o, f(*args), f"{f.__name__} through out=big[:, ::2]")
        assert (big[:, 1::2] == -3).all(), "wrote outside the out= view"


def test_broadcast_input_with_a_transposed_residual():
    rng = np.random.default_rng(2)
    row = values(rng, (8,), F32)
    r = values(rng, (5, 3, 8), F32).transpose(1, 0, 2)
    x = np.broadcast_to(row, (3, 5, 8))
    for f in (pynorm.add_layer_norm, pynorm.add_rms_norm):
        y, h = f(x, r)
        y_dense, h_dense = f(np.ascontiguousarray(x), np.ascontiguousarray(r))
        same_bits(h, h_dense, f"{f.__name__} h")
        same_bits(y, y_dense, f"{f.__name__} y")


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_out_interleaved_with_an_input(op):
    """Views of one buffer that share no element do not overlap: out= may take the
    rows between x's (written through a temporary where the library's alias check,
    which compares extents, would refuse it)."""
    rng = np.random.default_rng(4)
    big = values(rng, (6, 8), F32)
    before = big.copy()
    x, o = big[0::2], big[1::2]
    f = getattr(pynorm, op)
    if op.startswith("add_"):
        r = values(rng, (3, 8), F32)
        want = f(x.copy(), r)
        got = f(x, r, out=(o, None))
        same_bits(got[1], want[1], f"{op} h")
    else:
        want, got = (f(x.copy()),), (f(x, out=o),)
    assert got[0] is o
    same_bits(o, want[0], f"{op} y between the rows of x")
    same_bits(big[0::2], before[0::2], "x")


def test_backward_out_in_the_gaps_of_the_inputs():
    """dweight (contiguous) inside the gap between dy's rows, dx between x's rows."""
    rng = np.random.default_rng(5)
    big = values(rng, (2, 40), F32)
    dy, dw = big[:, 0:8], big[0, 16:24]
    xb = values(rng, (4, 8), F32)
    x, dx = xb[0::2], xb[1::2]
    x_copy, dy_copy = x.copy(), dy.copy()
    _, mean, rstd = pynorm.layer_norm_forward(x_copy)
    want = pynorm.layer_norm_backward(dy_copy, x_copy, mean, rstd)
    got = pynorm.layer_norm_backward(dy, x, mean, rstd, out=(dx, dw, None))
    assert got[0] is dx and got[1] is dw
    for name, g, w in zip(("dx", "dweight", "dbias"), got, want):
        same_bits(g, w, name)
    same_bits(dy, dy_copy, "dy")
    same_bits(x, x_copy, "x")


# ---------------------------------------------------------------------------
# CUDA arrays (CuPy): the same cases, skipped without a GPU

def _cuda_probe():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return None, "no CUDA device"
        from pynorm import _cuda
        _cuda.library()
    except Exception as e:
        return None, f"CUDA arrays cannot run here ({type(e).__name__}: {e})"
    return cupy, None


def _cuda_space():
    cp, reason = _cuda_probe()
    if cp is None:
        pytest.skip(reason)
    try:
        cp.empty(0, BF16)
        dtypes = DTYPES
    except Exception:
        dtypes = [F32, F16, F64]
    return NumpyLike(cp), dtypes


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(CASES))
def test_cuda_layouts_give_the_dense_bits(kind):
    space, dtypes = _cuda_space()

    @profile(60)
    @given(st.data())
    def check(data):
        case, call = CASES[kind](data, space, dtypes)
        run_numpy_case(case, call)
    check()


@pytest.mark.cuda
@pytest.mark.parametrize("kind,inputs", REPEATED_ROWS)
def test_cuda_repeated_rows_under_any_split(kind, inputs):
    space, dtypes = _cuda_space()

    @profile(40)
    @given(st.data())
    def check(data):
        case, call = CASES[kind](data, space, dtypes, repeat_rows=inputs)
        run_numpy_case(case, call)
    check()


# ---------------------------------------------------------------------------
# pynorm.torch: functions and modules, forward and autograd backward

TORCH_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _torch_device(device):
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("torch has no CUDA device here")
        from pynorm.torch import _backend
        if _backend._load_cuda_backend() is None:
            pytest.skip("libpynorm_cuda is not available")
    return device


def _grad_layout(data, case, name, shape, dtype, rng):
    """A gradient for an output: a laid-out tensor (expanded ones included), or
    "sum" (the output's .sum(): autograd passes an expanded tensor of ones)."""
    if data.draw(st.booleans(), label=f"{name}: sum()"):
        return "sum"
    case.input(name, values(rng, shape, dtype))
    return name


def _torch_run(leaves, forward, grads):
    """forward(args) -> tuple of outputs; the gradient of output i is grads[i]: the
    argument of that name, "sum" (backward of the output's .sum()) or None.
    Returns (outputs, {leaf name: grad})."""
    args = dict(leaves.args)
    outs = forward(args)
    targets, gvals = [], []
    for o, g in zip(outs, grads):
        if g is None:
            continue
        targets.append(o.sum() if g == "sum" else o)
        gvals.append(None if g == "sum" else args[g])
    if targets:
        torch.autograd.backward(targets, gvals)
    return outs, {k: v.grad for k, v in leaves.args.items() if isinstance(v, torch.Tensor) and v.requires_grad}


class _Leaves:
    """The arguments as tensors: the random layouts (laid) or dense copies; those
    named in `differentiable` are leaves that require grad (laid: with their strides)."""

    def __init__(self, case, space, laid, differentiable):
        self.args = {}
        for name, p in case.args.items():
            if not isinstance(p, Placed):
                self.args[name] = p
                continue
            t = p.arr.detach() if laid else space.tensor(p.dense)
            if name in differentiable:
                t.requires_grad_()
            self.args[name] = t


def _compare_torch(space, case, forward, grads, differentiable, fast=True):
    """forward on dense copies and on the layouts: outputs and gradients bit for bit
    (fast: pynorm.torch's eager fast path, else the torch.ops operators)."""
    from pynorm.torch import _dispatch
    dense = _Leaves(case, space, False, differentiable)
    laid = _Leaves(case, space, True, differentiable)
    saved, _dispatch.FAST_EAGER = _dispatch.FAST_EAGER, fast
    try:
        try:
            want_out, want_grad = _torch_run(dense, forward, grads)
        except ValueError:
            with pytest.raises(ValueError):
                _torch_run(laid, forward, grads)
            return None, None
        got_out, got_grad = _torch_run(laid, forward, grads)
    finally:
        _dispatch.FAST_EAGER = saved
    for i, (g, w) in enumerate(zip(got_out, want_out)):
        same_bits(space.host(g), space.host(w), f"output {i} with layouts {case.layouts}")
    for k in want_grad:
        w, g = want_grad[k], got_grad[k]
        assert (w is None) == (g is None), f"grad of {k}: {g} where the dense call gives {w}"
        if w is not None:
            same_bits(space.host(g), space.host(w), f"grad of {k} with layouts {case.layouts}")
    return dense, laid


def _module_call(m, x, w, b):
    """m(x) with the leaves w and b as its weight and bias (so their gradients are
    compared) and a copy of its buffers; returns (y, buffers after the call)."""
    params = {} if w is None else ({"weight": w, "bias": b} if b is not None else {"weight": w})
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    y = torch.func.functional_call(m, {**params, **buffers}, (x,))
    return y, buffers


TORCH_TOKEN = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "LayerNorm", "RMSNorm"]


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_token_norms_layouts(device):
    space = TorchLike(_torch_device(device))

    @profile(120)
    @given(st.data())
    def check(data):
        op = data.draw(st.sampled_from(TORCH_TOKEN), label="op")
        dtype, wdtype = _draw_dtypes(data, DTYPES)
        module = op in ("LayerNorm", "RMSNorm")
        if module:
            wdtype = dtype
        norm = tuple(data.draw(st.lists(st.sampled_from([3, 1, 8, 2]), min_size=1, max_size=2),
                               label="normalized_shape"))
        shape = _lead(data) + norm
        rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
        case = Case(data, space, negative=False)
        case.input("x", values(rng, shape, dtype, 0.3, 2.0))
        fused = op.startswith("add_")
        if fused:
            case.input("residual", values(rng, shape, dtype))
        has_w = data.draw(st.booleans(), label="weight")
        has_b = has_w and "ayer" in op and data.draw(st.booleans(), label="bias")
        if has_w:
            case.input("weight", values(rng, norm, wdtype, 1.0, 0.5))
        if has_b:
            case.input("bias", values(rng, norm, wdtype))
        grads = [_grad_layout(data, case, "grad_y", shape, dtype, rng)]
        if fused:
            grads.append(_grad_layout(data, case, "grad_h", shape, dtype, rng))
        fast = data.draw(st.booleans(), label="eager fast path")

        def forward(a):
            x, w, b = a["x"], a.get("weight"), a.get("bias")
            if op == "layer_norm":
                return (pnt.layer_norm(x, norm, w, b),)
            if op == "rms_norm":
                return (pnt.rms_norm(x, norm, w),)
            if op == "add_layer_norm":
                return pnt.add_layer_norm(x, a["residual"], norm, w, b)
            if op == "add_rms_norm":
                return pnt.add_rms_norm(x, a["residual"], norm, w)
            kw = {"elementwise_affine": has_w, "device": x.device, "dtype": TORCH_DTYPES[dtype]}
            m = pnt.LayerNorm(norm, bias=has_b, **kw) if op == "LayerNorm" else pnt.RMSNorm(norm, **kw)
            return (_module_call(m, x, w, b)[0],)
        _compare_torch(space, case, forward, grads, {"x", "residual", "weight", "bias"}, fast)
    check()


TORCH_SPATIAL = ["group_norm", "instance_norm", "batch_norm", "GroupNorm", "InstanceNorm", "BatchNorm",
                 "SyncBatchNorm"]


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_spatial_norms_layouts(device):
    space = TorchLike(_torch_device(device))

    @profile(120)
    @given(st.data())
    def check(data):
        op = data.draw(st.sampled_from(TORCH_SPATIAL), label="op")
        dtype, wdtype = _draw_dtypes(data, DTYPES)
        module = op[0].isupper()
        if module:
            wdtype = dtype
        N = data.draw(st.sampled_from([3, 1, 2]), label="N")
        C = data.draw(st.sampled_from([4, 1, 2, 6]), label="C")
        spatial = tuple(data.draw(st.lists(st.sampled_from([3, 1, 2]), min_size=0, max_size=3), label="spatial"))
        if "nstance" in op and math.prod(spatial) == 1:   # statistics over one value: torch refuses
            spatial = spatial[:-1] + (3,) if spatial else (3,)
        shape = (N, C) + spatial
        G = data.draw(st.sampled_from([g for g in (1, 2, C) if C % g == 0]), label="groups")
        training = data.draw(st.booleans(), label="training")
        track = data.draw(st.booleans(), label="running statistics")
        rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
        case = Case(data, space, negative=False)
        case.input("x", values(rng, shape, dtype, 0.3, 2.0))
        affine = data.draw(st.booleans(), label="weight and bias")
        if affine:
            case.input("weight", values(rng, (C,), wdtype, 1.0, 0.5))
            case.input("bias", values(rng, (C,), wdtype))
        grads = [_grad_layout(data, case, "grad_y", shape, dtype, rng)]
        fast = data.draw(st.booleans(), label="eager fast path")
        rm0 = values(rng, (C,), wdtype if module else F32, 0.1, 0.3)
        rv0 = np.abs(values(rng, (C,), wdtype if module else F32, 1.0, 0.3))
        state = []                      # running statistics after each run (dense, then laid)

        def forward(a):
            x, w, b = a["x"], a.get("weight"), a.get("bias")
            if op == "group_norm":
                return (pnt.group_norm(x, G, w, b),)
            rm = space.tensor(rm0) if track or not training else None
            rv = space.tensor(rv0) if track or not training else None
            if op == "instance_norm":
                y = pnt.instance_norm(x, rm, rv, w, b, use_input_stats=training or rm is None)
                state.append((rm, rv))
                return (y,)
            if op == "batch_norm":
                y = pnt.batch_norm(x, rm, rv, w, b, training=training)
                state.append((rm, rv))
                return (y,)
            dims = len(spatial)
            kw = {"affine": affine, "device": x.device, "dtype": TORCH_DTYPES[dtype]}
            if op == "GroupNorm":
                m = pnt.GroupNorm(G, C, **kw)
            elif op == "InstanceNorm":
                m = {1: pnt.InstanceNorm1d, 2: pnt.InstanceNorm2d, 3: pnt.InstanceNorm3d}[dims](
                    C, track_running_stats=track, **kw)
            elif op == "BatchNorm":
                m = {0: pnt.BatchNorm1d, 1: pnt.BatchNorm1d, 2: pnt.BatchNorm2d, 3: pnt.BatchNorm3d}[dims](
                    C, track_running_stats=track, **kw)
            else:
                import pynorm.distributed as pnd
                m = pnd.SyncBatchNorm(C, track_running_stats=track, **kw)
            m.train(training)
            y, buffers = _module_call(m, x, w, b)
            state.append(tuple(buffers.values()))
            return (y,)

        dense, _ = _compare_torch(space, case, forward, grads, {"x", "weight", "bias"}, fast)
        if dense is not None and state:            # running statistics: the same bits
            for i, (g, w) in enumerate(zip(state[1], state[0])):
                if w is not None:
                    same_bits(space.host(g), space.host(w), f"{op}: buffer {i} with layouts {case.layouts}")
    check()


def test_torch_batchnorm1d_on_a_column_slice():
    """The issue's example: BatchNorm1d on h[:, :4] of a (16, 10) tensor, as torch.nn."""
    h = torch.randn(16, 10, generator=torch.Generator().manual_seed(3))
    for train in (True, False):
        ours, ref = pnt.BatchNorm1d(4).train(train), torch.nn.BatchNorm1d(4).train(train)
        torch.testing.assert_close(ours(h[:, :4]), ref(h[:, :4]))
        torch.testing.assert_close(ours.running_mean, ref.running_mean)


# ---------------------------------------------------------------------------
# pynorm.distributed on a one-process group

@pytest.fixture(scope="module")
def one_rank_group():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


DIST_OPS = ["layer_norm", "rms_norm", "sync_batch_norm"]


def test_distributed_layouts(one_rank_group):
    import pynorm.distributed as pnd
    space = TorchLike("cpu")

    @profile(100)
    @given(st.data())
    def check(data):
        op = data.draw(st.sampled_from(DIST_OPS), label="op")
        dtype, wdtype = _draw_dtypes(data, [F32, F64, BF16])
        rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
        case = Case(data, space, negative=False)
        if op == "sync_batch_norm":
            wdtype = dtype
            C = data.draw(st.sampled_from([4, 1, 3]), label="C")
            shape = (data.draw(st.sampled_from([3, 2]), label="N"), C) + tuple(
                data.draw(st.lists(st.sampled_from([2, 1, 3]), min_size=0, max_size=2), label="spatial"))
        else:
            shape = _lead(data) + (data.draw(st.sampled_from(C_SIZES), label="C"),)
            C = shape[-1]
        case.input("x", values(rng, shape, dtype, 0.3, 2.0))
        if data.draw(st.booleans(), label="weight"):
            case.input("weight", values(rng, (C,), wdtype, 1.0, 0.5))
            if op != "rms_norm":
                case.input("bias", values(rng, (C,), wdtype))
        grads = [_grad_layout(data, case, "grad_y", shape, dtype, rng)]
        rm0, rv0 = values(rng, (C,), F32), np.abs(values(rng, (C,), F32, 1.0))
        state = []

        def forward(a):
            x, w, b = a["x"], a.get("weight"), a.get("bias")
            if op == "layer_norm":
                return (pnd.layer_norm(x, w, b, group=one_rank_group),)
            if op == "rms_norm":
                return (pnd.rms_norm(x, w, group=one_rank_group),)
            # the synchronized path itself (a one-rank SyncBatchNorm module takes the
            # local one, which test_torch_spatial_norms_layouts covers)
            rm, rv = space.tensor(rm0), space.tensor(rv0)
            y = pnd._SyncBatchNormFunction.apply(x, w, b, rm, rv, 1e-5, 0.1, C, one_rank_group)
            state.append((rm, rv))
            return (y,)

        dense, _ = _compare_torch(space, case, forward, grads, {"x", "weight", "bias"})
        if dense is not None and state:
            for g, w in zip(state[1], state[0]):
                same_bits(space.host(g), space.host(w), f"running statistics with layouts {case.layouts}")
    check()
