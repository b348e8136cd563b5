"""pynorm.torch's optional C++ extension (torch.ops.pynorm_ext: LayerNorm, RMSNorm,
GroupNorm/InstanceNorm, BatchNorm with its running statistics updated in place).

The extension is built once per session into a session cache directory (the
`ext` fixture: one c++ call, tens of seconds); its tests switch the modules to it
and compare with the Python path, which every other torch test runs (conftest sets
PYNORM_TORCH_EXT=0 for the session). How it is built (cache key, atomic rename,
the fallback without a compiler, the environment switch) is tested with a stand-in
compiler or in subprocesses.
"""
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn as nn
from torch.library import opcheck

import pynorm.torch as pnt
from pynorm.torch import _ext
from test_torch import (DNAME, DTYPES, STRAIGHT_MODULES, _straight_input, _straight_run, _swap_one,
                        empty_batch_matches_torch, perturb_params, rand)

EXT_MODULES = [n for n in STRAIGHT_MODULES
               if n.startswith(("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "BatchNorm"))]


@pytest.fixture(scope="session")
def ext(tmp_path_factory):
    """(operators, built file): built into a session cache and loaded, but not
    switched on (use_ext does that per test)."""
    cache = tmp_path_factory.mktemp("pynorm-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PYNORM_CACHE_DIR", str(cache))
    mp.delenv("PYNORM_TORCH_EXT")
    try:
        path = _ext.build()          # a failed build fails these tests: CI must build it
        ops = _ext.load(path)
    finally:
        _ext._activate(None)
        mp.undo()
    return ops, path


def _switch(monkeypatch, ops):
    """The modules' path for this test: the extension's operators, or None (Python)."""
    monkeypatch.setattr(_ext, "ops", ops)
    monkeypatch.setattr(_ext, "eager_layer_norm", None if ops is None else ops.layer_norm.default._op)
    monkeypatch.setattr(_ext, "eager_rms_norm", None if ops is None else ops.rms_norm.default._op)
    monkeypatch.setattr(_ext, "eager_group_norm", None if ops is None else ops.group_norm.default._op)
    monkeypatch.setattr(_ext, "eager_batch_norm", None if ops is None else ops.batch_norm.default._op)
    monkeypatch.setattr(_ext, "eager_instance_norm", None if ops is None else ops.instance_norm.default._op)


@pytest.fixture
def use_ext(ext, monkeypatch):
    _switch(monkeypatch, ext[0])
    return ext[0]


def _pynorm_ops(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events()}


# ---- the modules on the extension -------------------------------------------------------------

def test_modules_take_the_extension_when_loaded(ext, monkeypatch):
    for mod, op in ((pnt.LayerNorm(16), "pynorm_ext::layer_norm"), (pnt.RMSNorm(16), "pynorm_ext::rms_norm"),
                    (pnt.GroupNorm(4, 16), "pynorm_ext::group_norm"),
                    (pnt.InstanceNorm1d(16, affine=True), "pynorm_ext::group_norm"),
                    (pnt.BatchNorm1d(16), "pynorm_ext::batch_norm")):
        x = rand((3, 16) if isinstance(mod, (pnt.LayerNorm, pnt.RMSNorm)) else (3, 16, 4), torch.float32, 1)
        x.requires_grad_(True)
        _switch(monkeypatch, None)
        assert op not in _pynorm_ops(lambda: mod(x).sum().backward())
        _switch(monkeypatch, ext[0])
        names = _pynorm_ops(lambda: mod(x).sum().backward())
        assert op in names and f"{op}_bwd" in names, f"{type(mod).__name__} did not run {op}: {names}"
    assert pnt.extension_loaded()


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "fwd_bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("name", EXT_MODULES)
def test_extension_gives_the_python_paths_bits(ext, monkeypatch, name, dtype, grad):
    """Outputs, input and parameter gradients: bit for bit the Python path's."""
    _switch(monkeypatch, None)
    python = _straight_run(STRAIGHT_MODULES[name], name, dtype, grad, 3)
    _switch(monkeypatch, ext[0])
    extension = _straight_run(STRAIGHT_MODULES[name], name, dtype, grad, 3)
    assert len(python) == len(extension)
    for i, (a, b) in enumerate(zip(python, extension)):
        assert a.dtype == b.dtype and torch.equal(a, b), \
            f"{name} {DNAME[dtype]}: result {i} differs between the extension and the Python path"


@pytest.mark.parametrize("name", EXT_MODULES)
def test_extension_empty_batch(use_ext, name):
    empty_batch_matches_torch(name)


@pytest.mark.parametrize("case", ["sliced", "param_f64", "large", "weight_grad_only", "rms_eps_none_f64"])
def test_extension_unusual_input_matches_python_path(ext, monkeypatch, case):
    """Strided input, parameters of a third dtype, outputs from the buffer cache,
    gradients of the parameters only, RMSNorm's default eps for float64."""
    dtype = torch.float64 if case == "rms_eps_none_f64" else torch.float32
    mod = nn.RMSNorm(64) if case == "rms_eps_none_f64" else nn.LayerNorm(64)
    if case == "param_f64":
        mod = mod.double()
    mod = _swap_one(mod.to(dtype) if case != "param_f64" else mod)
    perturb_params(mod, 4)
    shape = {"large": (256, 64, 64), "sliced": (6, 8, 128)}.get(case, (5, 64))   # large: 4 MiB
    x = rand(shape, dtype, 5)
    if case == "sliced":
        x = x[:, ::2, ::2]
    results = []
    for ops in (None, ext[0]):
        _switch(monkeypatch, ops)
        mod.zero_grad()
        xi = x.clone().requires_grad_(case != "weight_grad_only")
        y = mod(xi)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), xi.grad if xi.grad is not None else torch.zeros(0)]
                       + [p.grad for p in mod.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{case}: result {i} differs from the Python path"


@pytest.mark.parametrize("name", ["LayerNorm", "LayerNorm_no_affine", "RMSNorm", "GroupNorm", "InstanceNorm2d",
                                  "BatchNorm2d_train", "BatchNorm2d_eval", "BatchNorm2d_cumulative"])
def test_extension_gradcheck_float64(use_ext, name):
    mod = _swap_one(STRAIGHT_MODULES[name](torch.float64))
    perturb_params(mod, 6)
    shape = (2, 6, 3, 2) if name.startswith(("Group", "Instance", "Batch")) else (3, 24)
    x = rand(shape, torch.float64, 7).requires_grad_(True)
    params = tuple(mod.parameters())

    def fn(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
                mod, {n: p for (n, _), p in zip(mod.named_parameters(), ps)}):
            return torch.ops.pynorm_ext.rms_norm(x, ps[0], 1e-6) if name == "RMSNorm" else mod(x)
    assert torch.autograd.gradcheck(fn, (x, *params))


def _ext_opcheck_cases():
    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        x, dy = rand((3, 5, 8), dt, 1), rand((3, 5, 8), dt, 2)
        w, b = rand((8,), dt, 3), rand((8,), dt, 4)
        w32 = rand((8,), torch.float32, 5)
        tag = DNAME[dt]
        cases += [(f"layer_norm-{tag}", "layer_norm", (x, w, b, 1e-5)),
                  (f"layer_norm_f32_params-{tag}", "layer_norm", (x, w32, None, 1e-5)),
                  (f"layer_norm_grad-{tag}", "layer_norm",
                   (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), 1e-5)),
                  (f"layer_norm_fwd-{tag}", "layer_norm_fwd", (x, w, b, 1e-5)),
                  (f"rms_norm-{tag}", "rms_norm", (x, w, 1e-6)),
                  (f"rms_norm_grad-{tag}", "rms_norm", (x.clone().requires_grad_(), None, 1e-6)),
                  (f"rms_norm_fwd-{tag}", "rms_norm_fwd", (x, w, 1e-6))]
        cases.append((f"layer_norm_bwd-{tag}", "layer_norm_bwd",
                      lambda ops, x=x, dy=dy, w=w, b=b: (dy, x, w, ops.layer_norm_fwd(x, w, b, 1e-5)[1],
                                                         [True, True, True])))
        xs, dys = rand((2, 6, 3, 4), dt, 6), rand((2, 6, 3, 4), dt, 7)
        w6, b6 = rand((6,), dt, 8), rand((6,), dt, 9)
        cases += [(f"group_norm-{tag}", "group_norm", (xs, 3, w6, b6, 1e-5)),
                  (f"group_norm_grad-{tag}", "group_norm",
                   (xs.clone().requires_grad_(), 2, w6.clone().requires_grad_(), None, 1e-5)),
                  (f"group_norm_fwd-{tag}", "group_norm_fwd", (xs, 6, None, None, 1e-5))]
        cases.append((f"group_norm_bwd-{tag}", "group_norm_bwd",
                      lambda ops, x=xs, dy=dys, w=w6, b=b6: (dy, x, 3, w, ops.group_norm_fwd(x, 3, w, b, 1e-5)[1],
                                                             [True, True, True])))
        rm, rv, nbt = rand((6,), torch.float32, 10), rand((6,), torch.float32, 11).abs() + 0.5, torch.tensor(3)
        rm_x, rv_x = rm.to(dt), rv.to(dt)
        cases += [(f"batch_norm_train-{tag}", "batch_norm", (xs, w6, b6, rm.clone(), rv.clone(), True, 0.1, None, 1e-5)),
                  (f"batch_norm_cumulative-{tag}", "batch_norm",
                   (xs, w6, b6, rm_x.clone(), rv_x.clone(), True, 0.0, nbt, 1e-5)),
                  (f"batch_norm_untracked-{tag}", "batch_norm", (xs, None, None, None, None, True, 0.1, None, 1e-5)),
                  (f"batch_norm_eval-{tag}", "batch_norm", (xs, w6, b6, rm_x, rv_x, False, 0.1, None, 1e-5)),
                  (f"batch_norm_grad-{tag}", "batch_norm",
                   (xs.clone().requires_grad_(), w6.clone().requires_grad_(), b6.clone().requires_grad_(),
                    rm.clone(), rv.clone(), True, 0.1, None, 1e-5)),
                  (f"batch_norm_fwd-{tag}", "batch_norm_fwd", (xs, w6, b6, rm.clone(), rv.clone(), True, 0.1, None,
                                                               1e-5))]
        cases += [(f"instance_norm-{tag}", "instance_norm", (xs, w6, b6, rm.clone(), rv.clone(), 0.1, 1e-5)),
                  (f"instance_norm_own_dtype-{tag}", "instance_norm",
                   (xs, None, None, rm_x.clone(), rv_x.clone(), 0.3, 1e-5)),
                  (f"instance_norm_mean_only-{tag}", "instance_norm", (xs, w6, None, rm.clone(), None, 0.1, 1e-5)),
                  (f"instance_norm_grad-{tag}", "instance_norm",
                   (xs.clone().requires_grad_(), w6.clone().requires_grad_(), b6.clone().requires_grad_(),
                    rm.clone(), rv.clone(), 0.1, 1e-5)),
                  (f"instance_norm_fwd-{tag}", "instance_norm_fwd", (xs, w6, b6, rm.clone(), rv.clone(), 0.1, 1e-5))]
        for training in (True, False):
            cases.append((f"batch_norm_bwd_{'train' if training else 'eval'}-{tag}", "batch_norm_bwd",
                          lambda ops, x=xs, dy=dys, w=w6, b=b6, t=training, rm=rm, rv=rv: (
                              dy, x, w, ops.batch_norm_fwd(x, w, b, rm.clone(), rv.clone(), t, 0.1, None, 1e-5)[1],
                              t, [True, True, True])))
        cases.append((f"rms_norm_bwd-{tag}", "rms_norm_bwd",
                      lambda ops, x=x, dy=dy, w=w: (dy, x, w, ops.rms_norm_fwd(x, w, 1e-6)[1], [True, True])))
    return cases


@pytest.mark.parametrize("case", _ext_opcheck_cases(), ids=lambda c: c[0])
def test_extension_opcheck(ext, case):
    _, name, args = case
    ops = ext[0]
    opcheck(getattr(ops, name), args(ops) if callable(args) else args)


def test_extension_torch_compile_fullgraph(use_ext):
    """Under torch.compile(fullgraph=True) the modules call the extension's operators
    (the graph holds them) and give eager's bits, gradients included."""
    torch._dynamo.reset()
    for make, shape in ((lambda: pnt.LayerNorm(32), (4, 32)), (lambda: pnt.RMSNorm(32), (4, 32)),
                        (lambda: pnt.GroupNorm(4, 8), (2, 8, 2, 2))):
        mod = make()
        perturb_params(mod, 8)
        graphs = []

        def backend(gm, inputs):
            graphs.append({str(n.target) for n in gm.graph.nodes})
            return gm.forward
        compiled = torch.compile(mod, fullgraph=True, backend=backend)
        x = rand(shape, torch.float32, 9).requires_grad_(True)
        results = []
        for fn in (mod, compiled):
            mod.zero_grad()
            xi = x.detach().clone().requires_grad_(True)
            y = fn(xi)
            y.backward(rand(shape, torch.float32, 10))
            results.append([y.detach(), xi.grad] + [p.grad for p in mod.parameters()])
        assert any(any("pynorm_ext" in t for t in g) for g in graphs), graphs
        for i, (a, b) in enumerate(zip(*results)):
            assert torch.equal(a, b), f"{type(mod).__name__}: compiled result {i} differs from eager"


def test_extension_torch_compile_inductor(use_ext):
    torch._dynamo.reset()
    mod = pnt.LayerNorm(32)
    perturb_params(mod, 11)
    x = rand((4, 32), torch.float32, 12)
    compiled = torch.compile(mod, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), mod(x))
    xi = x.clone().requires_grad_(True)
    compiled(xi).sum().backward()
    xe = x.clone().requires_grad_(True)
    mod(xe).sum().backward()
    assert torch.equal(xi.grad, xe.grad)


def _compiled_steps_match_eager(eager, compiled_mod, backend, shape, seed):
    """Three training steps of eager and of torch.compile(compiled_mod, fullgraph=True)
    on the same data: outputs, gradients and buffers bit-equal at each step. Returns
    the compiled graphs' node targets (one set per graph)."""
    graphs = []

    def spy(gm, inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return torch._dynamo.lookup_backend(backend)(gm, inputs)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend=spy)
    for step in range(3):
        x, dy = rand(shape, torch.float32, seed + step), rand(shape, torch.float32, seed + 10 + step)
        results = []
        for mod, fn in ((eager, eager), (compiled_mod, compiled)):
            mod.zero_grad()
            xi = x.clone().requires_grad_(True)
            y = fn(xi)
            y.backward(dy)
            results.append([y.detach(), xi.grad, *(p.grad for p in mod.parameters()),
                            *(b.clone() for b in mod.buffers())])
        for i, (a, b) in enumerate(zip(*results)):
            assert torch.equal(a, b), f"step {step}: compiled result {i} differs from eager"
    return graphs


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm2d(8), lambda: nn.BatchNorm2d(8, momentum=None),
                                  lambda: nn.BatchNorm2d(8).eval()], ids=["momentum", "cumulative", "eval"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_extension_batch_norm_compiles_with_its_running_stats(use_ext, make, backend):
    """torch.compile(fullgraph=True) of a BatchNorm2d: the graph holds the extension's
    mutating operator, and outputs, gradients and the buffers (running statistics,
    num_batches_tracked) are eager's bits, step after step."""
    torch._dynamo.reset()
    base = make()
    perturb_params(base, 16)
    eager, compiled_mod = _swap_one(base), _swap_one(base)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled_mod.train(base.training)
    graphs = _compiled_steps_match_eager(eager, compiled_mod, backend, (4, 8, 3, 3), 17)
    assert any(any("pynorm_ext.batch_norm" in t for t in g) for g in graphs), graphs


def _instance_norm_with_stats(dtype, momentum, training, seed, stats_dtype=None):
    m = pnt.InstanceNorm2d(6, affine=True, track_running_stats=True, momentum=momentum).to(dtype)
    perturb_params(m, seed)
    with torch.no_grad():
        m.running_mean.copy_(rand((6,), torch.float64, seed + 1))
        m.running_var.copy_(rand((6,), torch.float64, seed + 2).abs() + 0.5)
    if stats_dtype is not None:
        m.running_mean.data = m.running_mean.to(stats_dtype)
        m.running_var.data = m.running_var.to(stats_dtype)
    return m.train(training)


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "momentum_none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extension_instance_norm_running_stats_gives_the_python_paths_bits(ext, monkeypatch, dtype, momentum,
                                                                           training):
    """InstanceNorm with running statistics through the extension (_ext.instance_norm:
    instance_norm in training, batch_norm in eval) gives the Python path's bits: output,
    gradients and the running statistics updated in place, step after step."""
    stats_dtypes = [None] if dtype in (torch.float32, torch.float64) else [None, torch.float32]
    for stats_dtype in stats_dtypes:
        py, cx = (_instance_norm_with_stats(dtype, momentum, training, 30, stats_dtype) for _ in range(2))
        for step in range(2):
            x, dy = rand((3, 6, 4, 5), dtype, 40 + step), rand((3, 6, 4, 5), dtype, 50 + step)
            results = []
            for mod, use in ((py, None), (cx, ext[0])):
                _switch(monkeypatch, use)
                mod.zero_grad()
                xi = x.clone().requires_grad_(True)
                y = mod(xi) if use is None else _ext.instance_norm(mod, xi)
                assert y is not None, "the extension refused a plain contiguous CPU input"
                y.backward(dy)
                results.append([y.detach(), xi.grad, mod.weight.grad, mod.bias.grad,
                                mod.running_mean.clone(), mod.running_var.clone()])
            for what, a, b in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), *results):
                assert a.dtype == b.dtype and torch.equal(a, b), (
                    f"{DNAME[dtype]} stats {stats_dtype} step {step}: {what} differs from the Python path")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_instance_norm_modules_with_running_stats_take_the_extension(use_ext, monkeypatch, training):
    """pnt.InstanceNorm2d(track_running_stats=True) goes through _ext.instance_norm
    (the Python path is made to fail), with the bits of the direct call."""
    from pynorm.torch import _modules

    def python_path(*args, **kwargs):
        raise AssertionError("the module took the Python path")
    mod, twin = (_instance_norm_with_stats(torch.float32, 0.1, training, 80) for _ in range(2))
    x = rand((3, 6, 4, 5), torch.float32, 81)
    want = _ext.instance_norm(twin, x)
    monkeypatch.setattr(_modules.F, "instance_norm", python_path)
    got = mod(x)
    assert torch.equal(got, want)
    assert torch.equal(mod.running_mean, twin.running_mean) and torch.equal(mod.running_var, twin.running_var)


def test_extension_instance_norm_leaves_what_it_cannot_do_to_the_other_paths(use_ext):
    x = rand((2, 6, 3, 3), torch.float32, 60)
    assert _ext.instance_norm(pnt.InstanceNorm2d(6), x) is None                  # no running statistics
    m = _instance_norm_with_stats(torch.float32, 0.1, True, 61)
    assert _ext.instance_norm(m, x.transpose(2, 3)) is None                      # not contiguous
    m.running_var.data = m.running_var.double()
    assert _ext.instance_norm(m, x) is None                                      # two stats dtypes
    rm = m.running_mean.clone()
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        use_ext.instance_norm(torch.randn(2, 6, 1), None, None, rm, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="running_mean must be a contiguous tensor of 6 values"):
        use_ext.instance_norm(x, None, None, torch.zeros(5), None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="running_var must be float32 or the input's dtype"):
        use_ext.instance_norm(x, None, None, None, torch.ones(6, dtype=torch.float64), 0.1, 1e-5)
    assert torch.equal(rm, m.running_mean)                                       # refused: nothing written


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_extension_instance_norm_compiles_with_its_running_stats(use_ext, training, backend):
    """torch.compile(fullgraph=True) of the extension's InstanceNorm with running
    statistics: the graph holds the operator, and outputs, gradients and running
    statistics are eager's bits, step after step."""
    torch._dynamo.reset()
    eager, compiled_mod = (_instance_norm_with_stats(torch.float32, 0.1, training, 70) for _ in range(2))
    graphs = _compiled_steps_match_eager(eager, compiled_mod, backend, (4, 6, 3, 3), 71)
    want = "pynorm_ext.instance_norm" if training else "pynorm_ext.batch_norm"
    assert any(any(want in t for t in g) for g in graphs), graphs


ONE_CALL_MODULES = {
    **{n: STRAIGHT_MODULES[n] for n in ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm2d_train", "BatchNorm2d_eval")},
    "InstanceNorm2d_stats_train": lambda dt: nn.InstanceNorm2d(6, affine=True, track_running_stats=True).to(dt),
    "InstanceNorm2d_stats_eval": lambda dt: nn.InstanceNorm2d(6, affine=True, track_running_stats=True).to(dt).eval(),
}


@pytest.mark.parametrize("name", list(ONE_CALL_MODULES))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "fwd_bwd"])
def test_extension_inductor_code_is_one_call_per_graph(use_ext, name, grad):
    """Inductor's code around the operators: each graph (inference; forward and
    backward) calls one pynorm_ext operator on its inputs as they come, with no copy,
    clone or extra allocation (the Meta kernels' outputs are laid out as the CPU
    kernels', so Inductor needs no restriding). Only BatchNorm's training graph adds
    the module's num_batches_tracked += 1, as torch's compiled module does. The call
    goes to the operator's C++ entry bound once at the module's top (not through
    torch.ops.pynorm_ext.<op>.default's Python frames), with no assert_size_stride on
    its outputs (the graph's inputs keep theirs)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    mod = _swap_one(ONE_CALL_MODULES[name](torch.float32))
    perturb_params(mod, 22)
    x = rand((4, 6, 3, 3) if name.startswith(("Group", "Batch", "Instance")) else (1, 24), torch.float32, 23)
    compiled = torch.compile(mod, fullgraph=True)

    def run():
        if grad:
            compiled(x.clone().requires_grad_(True)).sum().backward()
        else:
            with torch.no_grad():
                compiled(x)
    with inductor_config.patch(force_disable_caches=True):     # this code, not a cached graph's
        _, codes = run_and_get_code(run)
    assert len(codes) == (2 if grad else 1), f"{name}: {len(codes)} graphs"
    for code in codes:
        body = code[code.index("def call(self, args):"):]
        body = body[:body.index("runner = Runner(")]
        calls = [line.strip() for line in body.splitlines() if " = torch.ops." in line or " = pynorm_ext_" in line]
        assert len(calls) == 1, f"{name}: {calls}"
        op = calls[0].split(" = pynorm_ext_", 1)[-1].split("(")[0]
        assert f"\npynorm_ext_{op} = torch.ops.pynorm_ext.{op}.default._op\n" in code, f"{name}: {calls}"
        asserted = [line.strip() for line in body.splitlines() if "assert_size_stride(buf" in line]
        assert not asserted, f"{name}: {asserted}"
        for forbidden in ("empty_strided", "clone", "as_strided", "reinterpret_tensor", "aten."):
            assert forbidden not in body, f"{name}: {forbidden} in the compiled graph:\n{body}"
        kernels = [line.strip() for line in body.splitlines() if line.strip().startswith("cpp_fused")]
        allowed = ["add_copy_"] if name == "BatchNorm2d_train" and "_bwd" not in calls[0] else []
        assert all(any(a in k for a in allowed) for k in kernels), f"{name}: extra kernels {kernels}"


def test_extension_state_dict_and_torch_results(use_ext):
    """A torch.nn checkpoint loads unchanged and the extension matches torch.nn."""
    for base in (nn.LayerNorm(48), nn.RMSNorm(48)):
        perturb_params(base, 13)
        twin = type(_swap_one(base))(48)
        twin.load_state_dict(base.state_dict())
        assert twin.state_dict().keys() == base.state_dict().keys()
        x = rand((7, 48), torch.float32, 14)
        torch.testing.assert_close(twin(x), base(x), rtol=1e-5, atol=1e-5)
    for momentum in (0.1, None):                   # BatchNorm: the buffers follow torch's
        base = nn.BatchNorm2d(6, momentum=momentum)
        perturb_params(base, 18)
        twin = _swap_one(base)
        twin.load_state_dict(base.state_dict())
        for step in range(2):
            x = rand((3, 6, 4, 4), torch.float32, 19 + step)
            torch.testing.assert_close(twin(x), base(x), rtol=1e-5, atol=1e-5)
        assert twin.state_dict().keys() == base.state_dict().keys()
        for key, value in base.state_dict().items():
            torch.testing.assert_close(twin.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
        base.eval(), twin.eval()
        x = rand((3, 6, 4, 4), torch.float32, 21)
        torch.testing.assert_close(twin(x), base(x), rtol=1e-5, atol=1e-5)


NODE_MODULES = {n: STRAIGHT_MODULES[n] for n in ("LayerNorm", "LayerNorm_no_bias", "LayerNorm_no_affine", "RMSNorm",
                                                 "GroupNorm", "InstanceNorm2d", "BatchNorm2d_train")}
NODE_MODULES["InstanceNorm2d_tracked"] = lambda dt: nn.InstanceNorm2d(6, affine=True, track_running_stats=True).to(dt)


@pytest.mark.parametrize("name", list(NODE_MODULES))
def test_extension_backward_node_keeps_autograd_rules(use_ext, name):
    """The operators record their backward as torch's own operators do, one autograd
    Node per call (pynorm_ext::<Norm>Backward), and it keeps autograd's rules: a second
    backward through a freed graph raises, an in-place change to a saved input raises,
    gradients not asked for are not computed (autograd.grad on x alone gives the same
    dx and leaves the parameters' .grad unset), and forward-mode AD is refused rather
    than its tangent dropped."""
    import torch.autograd.forward_ad as fwAD
    mod = _swap_one(NODE_MODULES[name](torch.float64)).train()
    perturb_params(mod, 31)
    x = _straight_input(name, torch.float64, 32).requires_grad_(True)
    y = mod(x)
    assert y.grad_fn.name().startswith("pynorm_ext::") and y.grad_fn.name().endswith("Backward"), y.grad_fn.name()
    dy = rand(y.shape, torch.float64, 33)
    y.backward(dy)
    with pytest.raises(RuntimeError, match="second time"):
        y.backward(dy)
    (dx,) = torch.autograd.grad(mod(x), x, dy)
    torch.testing.assert_close(dx, x.grad, rtol=0, atol=0)
    mod.zero_grad(set_to_none=True)
    torch.autograd.grad(mod(x), x, dy)
    assert all(p.grad is None for p in mod.parameters()), name
    xin = x * 1
    y = mod(xin)
    xin.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            mod(fwAD.make_dual(x.detach(), torch.ones_like(x)))


def test_extension_double_backward_raises(use_ext):
    mod = pnt.LayerNorm(8)
    x = rand((3, 8), torch.float64, 15).requires_grad_(True)
    (g,) = torch.autograd.grad(mod(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_extension_errors_are_clear(use_ext):
    ops = use_ext
    with pytest.raises(ValueError, match="normalized_shape"):
        pnt.LayerNorm(8)(torch.randn(3, 7))                    # the module: torch's message
    with pytest.raises(ValueError, match="weight must hold 7 values"):
        ops.layer_norm(torch.randn(3, 7), torch.ones(8), None, 1e-5)
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm(torch.randn(2, 6, 3), 4, None, None, 1e-5)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        ops.rms_norm(torch.ones(3, 7, dtype=torch.int32), None, 1e-5)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(torch.randn(3, 7), None, None, -1.0)    # the library's own check
    x, c = torch.randn(2, 3, 4), torch.ones(3)
    cg = c.clone().requires_grad_(True)
    for call in (lambda: ops.batch_norm(x, None, cg, None, None, True, 0.1, None, 1e-5),
                 lambda: ops.layer_norm(x, None, torch.ones(4, requires_grad=True), 1e-5),
                 lambda: ops.group_norm(x, 3, None, cg, 1e-5)):
        with pytest.raises(ValueError, match="a bias needs a weight to get a gradient"):
            call()                                     # rather than no gradient for the bias
    torch.testing.assert_close(ops.layer_norm(x, None, torch.ones(4), 1e-5),   # no gradient wanted: fine
                               torch.nn.functional.layer_norm(x, (4,), None, torch.ones(4)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="required when not training"):
        ops.batch_norm(x, c, c, c.clone(), None, False, 0.1, None, 1e-5)
    with pytest.raises(ValueError, match="running_var must be float32 or the input's dtype"):
        ops.batch_norm(x, c, c, None, c.double(), True, 0.1, None, 1e-5)
    with pytest.raises(ValueError, match="running_mean must be a contiguous tensor of 3 values"):
        ops.batch_norm(x, c, c, torch.zeros(4), None, True, 0.1, None, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.batch_norm(torch.randn(1, 3, 1), c, c, None, None, True, 0.1, None, 1e-5)
    bn = pnt.BatchNorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3))
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


# ---- how it is built ---------------------------------------------------------------------------

def test_cache_key_follows_source_header_and_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("PYNORM_CACHE_DIR", str(tmp_path))
    first = _ext.library_file()
    assert os.path.dirname(first) == str(tmp_path) and torch.__version__.split("+")[0] in first
    assert _ext.library_file() == first, "the key is not stable"
    src = tmp_path / "ops.cpp"
    src.write_text(open(_ext.SOURCE).read() + "\n// changed\n")
    monkeypatch.setattr(_ext, "SOURCE", str(src))
    assert _ext.library_file() != first, "the key ignores the source"
    monkeypatch.undo()
    monkeypatch.setenv("PYNORM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_ext._lib, "header_source", _ext._lib.header_source + "\n")
    assert _ext.library_file() != first, "the key ignores pynorm.h"
    monkeypatch.undo()
    monkeypatch.setenv("PYNORM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert _ext.library_file() != first and "9.9.9" in _ext.library_file(), "the key ignores torch's version"


FAKE_CXX = """\
#!{python}
# a stand-in compiler: writes its output (-o) in two halves with a pause, and checks
# that the final cache file does not exist while it is writing
import os, sys, time
out = sys.argv[sys.argv.index("-o") + 1]
with open(out, "wb") as f:
    f.write(b"A" * 4096)
    f.flush()
    time.sleep(0.3)
    f.write(b"B" * 4096)
with open(os.environ["FAKE_CXX_LOG"], "a") as log:
    log.write(out + "\\n")
"""


def test_build_is_atomic_and_safe_when_two_processes_build(tmp_path, monkeypatch, capfd):
    cxx = tmp_path / "fake-c++"
    cxx.write_text(FAKE_CXX.format(python=sys.executable))
    cxx.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("FAKE_CXX_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("PYNORM_CACHE_DIR", str(cache))
    target = _ext.library_file()
    seen_partial = []

    def watch():
        for _ in range(60):
            if os.path.exists(target):
                seen_partial.append(os.path.getsize(target) != 8192)
            threading.Event().wait(0.01)

    results = []
    threads = [threading.Thread(target=lambda: results.append(_ext.build())) for _ in range(2)]
    threads.append(threading.Thread(target=watch))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert open(target, "rb").read() == b"A" * 4096 + b"B" * 4096
    assert not any(seen_partial), "the cache file was visible before it was complete"
    assert os.listdir(cache) == [os.path.basename(target)], "temporary build files were left behind"
    outputs = open(tmp_path / "log").read().split()
    assert len(outputs) == 2 and all(not o.startswith(str(target)) for o in outputs), \
        "the compiler wrote to the cache file itself instead of a temporary one"
    err = capfd.readouterr().err
    assert "building the C++ extension" in err and "built in" in err
    # present: not built again
    assert _ext.build() == target and len(open(tmp_path / "log").read().split()) == 2


SUBPROCESS = textwrap.dedent("""
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import pynorm.torch as pnt
        import torch
        y = pnt.LayerNorm(8)(torch.randn(2, 8, requires_grad=True))
        y.sum().backward()
        pnt.build_extension()
    print("LOADED", pnt.extension_loaded())
    print("WARNINGS", sum("C++ extension" in str(w.message) for w in caught))
""")


def _run(env_changes, pynorm_env):
    env = dict(pynorm_env)
    env.pop("PYNORM_TORCH_EXT", None)
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", SUBPROCESS], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("cxx", ["/nonexistent/c++", "false"])
def test_failed_build_warns_once_and_falls_back(tmp_path, pynorm_env, cxx):
    """No compiler (or one that fails): import and the modules work, one warning."""
    proc = _run({"CXX": cxx, "PYNORM_TORCH_EXT": "1", "PYNORM_CACHE_DIR": str(tmp_path)}, pynorm_env)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED False" in proc.stdout and "WARNINGS 1" in proc.stdout, proc.stdout + proc.stderr
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []


def test_environment_switch(ext, pynorm_env):
    """Built: import loads it; PYNORM_TORCH_EXT=0: the Python path, nothing built."""
    cache = os.path.dirname(ext[1])
    on = _run({"PYNORM_CACHE_DIR": cache, "CXX": "/nonexistent/c++"}, pynorm_env)
    assert "LOADED True" in on.stdout and "WARNINGS 0" in on.stdout, on.stdout + on.stderr
    off = _run({"PYNORM_CACHE_DIR": cache, "PYNORM_TORCH_EXT": "0"}, pynorm_env)
    assert "LOADED False" in off.stdout and "WARNINGS 0" in off.stdout, off.stdout + off.stderr


def test_build_command_line(ext, pynorm_env):
    env = dict(pynorm_env, PYNORM_CACHE_DIR=os.path.dirname(ext[1]))
    env.pop("PYNORM_TORCH_EXT", None)
    proc = subprocess.run([sys.executable, "-m", "pynorm.torch.build"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == ext[1], proc.stdout + proc.stderr


def test_benchmarks_load_the_extension_first(ext, monkeypatch, capfd):
    """The torch benchmarks (python -m pynorm --suites torch, python -m pynorm.bench_torch)
    build or load the extension before their rows and say which path they measure."""
    from pynorm import bench_torch
    monkeypatch.setenv("PYNORM_CACHE_DIR", os.path.dirname(ext[1]))
    monkeypatch.delenv("PYNORM_TORCH_EXT")
    _switch(monkeypatch, None)
    assert bench_torch.prepare_extension() and _ext.ops is ext[0]
    assert "the rows use the C++ extension" in capfd.readouterr().err
    monkeypatch.setenv("PYNORM_TORCH_EXT", "0")
    _switch(monkeypatch, None)
    assert not bench_torch.prepare_extension() and _ext.ops is None
    assert "the rows measure the Python path" in capfd.readouterr().err
