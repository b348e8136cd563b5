"""pynorm: normalization kernels (LayerNorm, RMSNorm, ...) in C and CUDA.

NumPy arrays run on the C library (OpenMP threads, SIMD); CUDA arrays (CuPy,
or anything with __cuda_array_interface__) on the CUDA library. bfloat16
arrays use ml_dtypes.bfloat16. `python -m pynorm` checks and benchmarks the
library on this machine against PyTorch.
"""
from ._arrays import PynormError, bfloat16, check_status as _check_status
from ._lib import ffi as _ffi, lib as _clib
from ._token import (add_layer_norm, add_rms_norm, layer_norm, layer_norm_backward, layer_norm_forward,
                     layer_norm_quant, rms_norm, rms_norm_backward, rms_norm_forward, rms_norm_quant)
from ._spatial import (batch_norm, batch_norm_backward, batch_norm_forward, group_norm, group_norm_backward,
                       group_norm_forward, instance_norm)

__version__ = _ffi.string(_clib.pn_version()).decode()


def isa():
    """The instruction set the C kernels run with: "avx512", "avx2" or "generic".
    The environment variable PYNORM_ISA (read once) forces a lower one."""
    return _ffi.string(_clib.pn_isa()).decode()


def set_num_threads(n):
    """Threads one call may use; 0 restores OpenMP's default (OMP_NUM_THREADS)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _clib.pn_set_num_threads(n)


def get_num_threads():
    """The thread setting: 0 means OpenMP's default."""
    return _clib.pn_get_num_threads()


def copy_bandwidth(nbytes=256 << 20, repeats=5):
    """STREAM-style copy bandwidth of this machine in GB/s (bytes read + written),
    with the library's threads: the yardstick for the kernels' GB/s."""
    gbps = _ffi.new("double *")
    _check_status(_clib.pn_copy_bandwidth(gbps, int(nbytes), int(repeats)), "copy_bandwidth")
    return gbps[0]


__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
           "layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward",
           "rms_norm_quant", "layer_norm_quant",
           "group_norm", "instance_norm", "batch_norm", "group_norm_forward", "group_norm_backward",
           "batch_norm_forward", "batch_norm_backward",
           "isa", "set_num_threads", "get_num_threads", "copy_bandwidth", "bfloat16", "PynormError",
           "__version__"]
