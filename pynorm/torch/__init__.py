"""pynorm for PyTorch: custom operators, nn.Module drop-ins and a one-call swap.

    import pynorm.torch as pnt
    model = ...                              # any torch model
    pnt.replace_norms(model)                 # its norms now run on pynorm's kernels

- Operators ``torch.ops.pynorm.*`` (forward and backward of every norm) with fake
  implementations and autograd on pynorm's own backward kernels: they work in
  eager mode, under torch.compile(fullgraph=True) with no graph breaks, and pass
  torch.library.opcheck. CPU tensors go to the C library through their data
  pointers (no copies for contiguous inputs; strided rows are passed as strides);
  CUDA tensors go to the CUDA library on the current stream, where it is built.
- Modules ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d``,
  ``BatchNorm1d/2d/3d``: subclasses of their torch.nn twins (same constructor
  arguments, parameters, buffers and state_dict keys) whose forward runs pynorm.
  channels_last input runs the NHWC kernels and gives channels_last output.
- Functions with torch.nn.functional's signatures: ``layer_norm``, ``rms_norm``,
  ``group_norm``, ``instance_norm``, ``batch_norm``, and the fused residual forms
  ``add_layer_norm``, ``add_rms_norm`` -> (y, h).
- ``replace_norms(model)`` swaps a model's norm modules in place.

In plain eager mode the functions and modules call the same implementation through
an equivalent torch.autograd.Function instead of the operators (see _dispatch: the
operators' Python dispatch costs several times a small norm's kernel); under
torch.compile, torch.export, fake tensors, tensor subclasses, dispatch or function
modes and functorch transforms they call the operators. The modules go one step
further on plain contiguous CPU input (see _fast): one output allocation and one C
call through integer pointers, no statistics without gradients, and a lean
autograd.Function with them; same kernels, same bits. With the optional C++
extension built (``python -m pynorm.torch.build`` or ``build_extension()``; see
_ext and docs/torch.md), LayerNorm, RMSNorm, GroupNorm and InstanceNorm (without
running statistics) run on its C++ operators
``torch.ops.pynorm_ext.*`` instead, eager and compiled: the whole call in C++.

Differences from torch.nn worth knowing: outputs always have the input's dtype
(parameters of another dtype than the input's or float32 are cast); an NHWC-dense
input (channels innermost, any rank) gives an NHWC-dense output for every spatial
norm, InstanceNorm included (torch returns InstanceNorm's output contiguous).

Importing pynorm itself never imports torch; this module does.
"""
import torch  # noqa: F401  (absolute: the real torch, not this module)

from . import _ext, _spatial_ops, _token_ops  # noqa: F401  (register torch.ops.pynorm.*)
from ._functional import (add_layer_norm, add_rms_norm, batch_norm, fused_add_rms_norm_, group_norm,
                          instance_norm, layer_norm, rms_norm)
from ._quant import layer_norm_quant, rms_norm_quant
from ._modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                       InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm)
from ._swap import replace_norms


def build_extension(force=False):
    """Builds the optional C++ extension (LayerNorm and RMSNorm operators in C++; see
    the README) into the cache and loads it: the modules use it from then on, and
    every later ``import pynorm.torch`` loads it. Returns its path, or None (with a
    warning) when it cannot be built or PYNORM_TORCH_EXT=0."""
    if not _ext.enabled():
        return None
    ops = _ext.build_and_load(force=force)
    return None if ops is None else _ext.library_file()


def extension_loaded():
    """Whether the modules run on the C++ extension's operators."""
    return _ext.ops is not None


_ext.load_at_import()

__all__ = ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "replace_norms",
           "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "fused_add_rms_norm_",
           "rms_norm_quant", "layer_norm_quant",
           "group_norm", "instance_norm", "batch_norm", "build_extension", "extension_loaded"]
