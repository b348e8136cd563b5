"""The optional C++ extension: LayerNorm, RMSNorm, GroupNorm (InstanceNorm), BatchNorm
and InstanceNorm with running statistics as C++ torch operators.

At one row a norm's kernel takes a few microseconds, less than a Python
torch.autograd.Function costs on its own. The operators in csrc/ops.cpp
(``torch.ops.pynorm_ext.layer_norm``, ``rms_norm``, ``group_norm``, ``batch_norm``,
``instance_norm``; CPU and Meta
kernels, a C++
autograd kernel) do the whole call in C++, so the modules cost what torch's own
do. They call the same library functions with the same arguments as the Python
path: the same bits.

How it is built and used:

- Built on request, never silently at import: ``python -m pynorm.torch.build``,
  ``pynorm.torch.build_extension()``, or ``python -m pynorm --suites torch`` (which
  builds it before its rows). One ``c++`` call against torch's headers and
  libraries (no ninja, no setuptools), about 15-20 s on two cores; a line on
  stderr when it starts and when it is done. ``$CXX`` picks the compiler.
- Cached in ``$PYNORM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/pynorm``, else
  ``~/.cache/pynorm``), the file named by torch's version and a hash of
  what the binary depends on (ops.cpp, pynorm.h, torch's version and C++ ABI,
  the flags). The file appears by an atomic rename, so two
  processes building at once both end with a complete file.
- Loaded by ``import pynorm.torch`` when the file for this torch and this source
  exists; then the modules use it (eager and under torch.compile) for CPU input.
  ``PYNORM_TORCH_EXT=0`` never loads it (the Python path runs);
  ``PYNORM_TORCH_EXT=1`` builds it at import when it is missing.
- A failed build (no compiler, a compile error) warns once and the Python path
  runs; importing never fails because of the extension.

libpynorm is not linked into the extension: it receives the addresses of the
functions of the library pynorm already loaded (pynorm_ext::bind), so the built
file does not depend on where that library lies (PYNORM_LIBRARY, an installed
package, a source build) and the process holds one copy of the library.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from .. import _lib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "ops.cpp")
NAMESPACE = "pynorm_ext"
_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-w")
_BOUND_FUNCTIONS = ("pn_layernorm_forward", "pn_layernorm_backward", "pn_rmsnorm_forward",
                    "pn_rmsnorm_backward", "pn_buffer_alloc", "pn_buffer_free", "pn_status_string",
                    "pn_groupnorm_forward", "pn_groupnorm_backward", "pn_batchnorm_forward",
                    "pn_batchnorm_backward")

ops = None              # torch.ops.pynorm_ext once loaded (the modules use it), else None
# eager calls: the operators' C++ entry points (OpOverload._op), without the Python
# __call__ frames of torch.ops' packets and overloads (a visible share at one row);
# under torch.compile the modules call `ops`, which Dynamo traces
eager_layer_norm = eager_rms_norm = eager_group_norm = eager_batch_norm = eager_instance_norm = None
_loaded = None          # the namespace once loaded into this process (a file loads once)
_warned = False


def enabled():
    """False when PYNORM_TORCH_EXT=0 (the Python path only)."""
    return os.environ.get("PYNORM_TORCH_EXT", "").strip() != "0"


def cache_dir():
    d = os.environ.get("PYNORM_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pynorm")


def _compiler():
    return os.environ.get("CXX") or "c++"


def _abi_flag():
    return f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def cache_key():
    """A hash of what the built file depends on: the source, pynorm.h, torch's version
    and C++ ABI, the flags (not the compiler: any that builds it gives a usable file,
    and the cache is found again whatever $CXX is set to later)."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    h = hashlib.sha256()
    for part in (source, _lib.header_source.encode(), torch.__version__.encode(), _abi_flag().encode(),
                 " ".join(_FLAGS).encode(), sys.platform.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:20]


def library_file():
    """Where the extension for this torch and this source is (or would be) cached."""
    version = "".join(c if c.isalnum() or c in ".-" else "_" for c in torch.__version__)
    return os.path.join(cache_dir(), f"pynorm_ext-torch{version}-{cache_key()}.so")


def _command(source, header_dir, output):
    from torch.utils import cpp_extension
    cmd = [_compiler(), *_FLAGS, _abi_flag(), "-I", header_dir]
    for inc in cpp_extension.include_paths():
        cmd += ["-isystem", inc]
    cmd.append(source)
    for libdir in cpp_extension.library_paths():
        cmd += ["-L", libdir, f"-Wl,-rpath,{libdir}"]
    cmd += ["-lc10", "-ltorch_cpu", "-ltorch", "-o", output]
    return cmd


def build(force=False, quiet=False):
    """Builds the extension into the cache (unless it is there and not force) and
    returns its path. Raises RuntimeError when the compiler fails or is missing."""
    target = library_file()
    if os.path.exists(target) and not force:
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    start = time.monotonic()
    if not quiet:
        print(f"pynorm.torch: building the C++ extension (20-60 s) into {target}", file=sys.stderr,
              flush=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_dir()) as tmp:
        # the header the loaded library was built from, next to the source's include
        with open(os.path.join(tmp, "pynorm.h"), "w") as f:
            f.write(_lib.header_source)
        partial = os.path.join(tmp, "pynorm_ext.so")
        cmd = _command(SOURCE, tmp, partial)
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as e:
            raise RuntimeError(f"pynorm.torch: cannot run the C++ compiler {cmd[0]!r}: {e}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"pynorm.torch: building the C++ extension failed ({' '.join(cmd)}):\n"
                               + proc.stdout[-4000:])
        os.replace(partial, target)          # atomic: readers see no file or a complete one
    if not quiet:
        print(f"pynorm.torch: C++ extension built in {time.monotonic() - start:.1f} s", file=sys.stderr,
              flush=True)
    return target


def _addresses():
    ffi, lib = _lib.ffi, _lib.lib
    return [int(ffi.cast("uintptr_t", getattr(lib, name))) for name in _BOUND_FUNCTIONS]


def load(path):
    """Loads the built file at path and binds it to the loaded libpynorm."""
    global _loaded
    if _loaded is None:
        torch.ops.load_library(path)
        ns = getattr(torch.ops, NAMESPACE)
        ns.bind(_addresses())
        _loaded = ns
    _activate(_loaded)
    return ops


def _activate(ns):
    """Makes ns (the loaded operators, or None) the modules' path."""
    global ops, eager_layer_norm, eager_rms_norm, eager_group_norm, eager_batch_norm, eager_instance_norm
    ops = ns
    eager_instance_norm = None if ns is None else ns.instance_norm.default._op
    eager_batch_norm = None if ns is None else ns.batch_norm.default._op
    eager_group_norm = None if ns is None else ns.group_norm.default._op
    eager_layer_norm = None if ns is None else ns.layer_norm.default._op
    eager_rms_norm = None if ns is None else ns.rms_norm.default._op


_MISSING = object()


def module_entries(m, table, a, b):
    """m.<a>, m.<b> read from the module's table ("_parameters" or "_buffers") where they
    are: nn.Module.__getattr__ costs about 1 us per attribute (loaded machine), a
    visible share of a one-row norm, and BatchNorm reads four. One not in the table (a
    parametrization's property, a plain attribute) is read as an attribute."""
    d = getattr(m, table)
    va, vb = d.get(a, _MISSING), d.get(b, _MISSING)
    return (getattr(m, a) if va is _MISSING else va), (getattr(m, b) if vb is _MISSING else vb)


def batch_norm(m, x, training, momentum, nbt):
    """A BatchNorm module's forward after its bookkeeping (as _BatchNormMixin.forward:
    training = batch statistics, momentum a float, nbt the num_batches_tracked tensor
    for momentum=None) on the extension's operator, or None when it does not apply
    (not loaded, not an NCHW-contiguous CPU tensor, running statistics or parameters
    the kernels cannot use in place, functorch transforms): then the other paths run."""
    if ops is None or not x.is_cpu or not x.is_contiguous() or x.dim() < 2:
        return None
    track = not m.training or m.track_running_stats
    rm, rv = module_entries(m, "_buffers", "running_mean", "running_var") if track else (None, None)
    w, b = module_entries(m, "_parameters", "weight", "bias")
    rdt = rm.dtype if rm is not None else (rv.dtype if rv is not None else x.dtype)
    if ((rdt is not x.dtype and rdt is not torch.float32) or (rv is not None and rv.dtype is not rdt)
            or (w is None and b is not None)):
        return None
    momentum = 0.0 if momentum is None else momentum
    if torch.compiler.is_compiling():
        prepare_inductor()
        return ops.batch_norm(x, w, b, rm, rv, training, momentum, nbt, m.eps)
    if torch._C._are_functorch_transforms_active():
        return None
    return eager_batch_norm(x, w, b, rm, rv, training, momentum, nbt, m.eps)


def instance_norm(m, x):
    """An InstanceNorm module's _apply_instance_norm with running statistics
    (track_running_stats) on the extension's operators: in training instance_norm (the
    input's statistics; running_mean/running_var updated in place), in eval batch_norm
    (the running statistics normalize), as F.instance_norm does on the Python path;
    None when that does not apply (not loaded, no running statistics, not an
    NCHW-contiguous CPU tensor, running statistics the kernels cannot use in place,
    functorch transforms): then the other paths run."""
    rm, rv = module_entries(m, "_buffers", "running_mean", "running_var")
    if ops is None or (rm is None and rv is None) or not x.is_cpu or not x.is_contiguous() or x.dim() < 2:
        return None
    w, b = module_entries(m, "_parameters", "weight", "bias")
    rdt = rm.dtype if rm is not None else rv.dtype
    if ((rdt is not x.dtype and rdt is not torch.float32) or (rv is not None and rv.dtype is not rdt)
            or (rm is not None and not rm.is_contiguous()) or (rv is not None and not rv.is_contiguous())
            or (w is None and b is not None)):
        return None
    use_input_stats = m.training or not m.track_running_stats
    momentum = 0.0 if m.momentum is None else m.momentum
    compiling = torch.compiler.is_compiling()
    if compiling:
        prepare_inductor()
    elif torch._C._are_functorch_transforms_active():
        return None
    if not use_input_stats:
        if rm is None or rv is None:
            return None
        if compiling:
            return ops.batch_norm(x, w, b, rm, rv, False, 0.0, None, m.eps)
        return eager_batch_norm(x, w, b, rm, rv, False, 0.0, None, m.eps)
    if compiling:
        return ops.instance_norm(x, w, b, rm, rv, momentum, m.eps)
    return eager_instance_norm(x, w, b, rm, rv, momentum, m.eps)


# ---- Inductor: the operators' calls in its generated Python ------------------------------------
# Inductor's Python wrapper calls an operator it does not lower as
# `torch.ops.pynorm_ext.<op>.default(...)`: four attribute lookups and
# OpOverload.__call__'s Python frame (about 1 us per call at one row, a visible share of
# a compiled one-row norm) before the operator's C++ entry point (OpOverload._op). The
# wrapper's custom-codegen table (keyed by the operator's name) lets the modules' graphs
# bind each operator's _op once, at the generated module's top, and call that instead:
# the same operator, arguments, dispatch and results. Inductor's private API: anything
# unexpected there leaves its default code (the OpOverload call).
_OP_NAMES = ("layer_norm", "layer_norm_fwd", "layer_norm_bwd", "rms_norm", "rms_norm_fwd", "rms_norm_bwd",
             "group_norm", "group_norm_fwd", "group_norm_bwd", "batch_norm", "batch_norm_fwd",
             "batch_norm_bwd", "instance_norm", "instance_norm_fwd")
_inductor_registered = False


def _python_codegen(op):
    """The wrapper codegen of pynorm_ext::op: `bufN = pynorm_ext_<op>(args)`, the name bound
    in the module's header to the operator's _op (Inductor's default for other wrappers)."""
    alias = f"pynorm_ext_{op}"
    binding = f"{alias} = torch.ops.{NAMESPACE}.{op}.default._op"

    def codegen(node, writeline):
        from torch._inductor.codegen.wrapper import ExternKernelAllocLine, PythonWrapperCodegen
        from torch._inductor.virtualized import V
        wrapper = V.graph.wrapper_code
        if type(wrapper) is not PythonWrapperCodegen or not hasattr(wrapper, "header"):
            wrapper.writeline(ExternKernelAllocLine(wrapper, node))
            return
        if binding not in wrapper.header.getvalue():
            wrapper.header.writeline(binding)
        args = ", ".join([*node.codegen_args(), *node.codegen_kwargs()])
        writeline(f"{node.get_name()} = {alias}({args})")
        # no assert_size_stride per output (0.3-0.8 us each; torch's own compiled norm has
        # none): the CPU kernels return what the Meta kernels describe, dense tensors of
        # the shapes and dtypes they compute (test_extension_opcheck compares the two)
        for out in getattr(node, "outputs", None) or ():
            if hasattr(out, "skip_size_stride_alignment_checks"):
                out.skip_size_stride_alignment_checks = True
    return codegen


@torch.compiler.assume_constant_result
def prepare_inductor():
    """Registers, once, the operators' codegen with Inductor (see above). The modules
    call it when torch.compile traces them (it runs at trace time, not in the graph);
    True always."""
    global _inductor_registered
    if not _inductor_registered:
        _inductor_registered = True
        try:
            from torch._inductor.codegen.custom_extern_kernel_codegen import (
                CUSTOM_EXTERN_KERNEL_CODEGEN, CustomCodegen)
            for op in _OP_NAMES:
                CUSTOM_EXTERN_KERNEL_CODEGEN.setdefault(f"torch.ops.{NAMESPACE}.{op}.default",
                                                        CustomCodegen(python=_python_codegen(op)))
        except Exception:           # another torch: Inductor's default code
            pass
    return True


def _warn_once(message):
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def build_and_load(quiet=False, force=False):
    """Builds (when missing) and loads the extension; None (with one warning) when
    that fails or PYNORM_TORCH_EXT=0."""
    if not enabled():
        return None
    try:
        return load(build(force=force, quiet=quiet))
    except Exception as e:           # never break the caller: the Python path remains
        _warn_once(f"{e}\npynorm.torch: running without the C++ extension (the Python path)")
        return None


def load_at_import():
    """What `import pynorm.torch` does: load the cached build if there is one
    (PYNORM_TORCH_EXT=1: build it first when missing)."""
    if not enabled():
        return None
    if os.environ.get("PYNORM_TORCH_EXT", "").strip() == "1":
        return build_and_load()
    try:
        path = library_file()
        if os.path.exists(path):
            return load(path)
    except Exception as e:
        _warn_once(f"pynorm.torch: cannot load the C++ extension: {e}; running the Python path")
    return None
