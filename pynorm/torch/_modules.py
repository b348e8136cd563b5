"""nn.Module drop-ins: torch.nn's norm classes with their forward on pynorm's kernels.

Each class subclasses its torch.nn twin and overrides only forward, so the
constructor arguments, parameters, buffers, state_dict keys, reset_parameters,
extra_repr and isinstance checks are torch's own: a torch checkpoint loads
unchanged, and code that looks for nn.LayerNorm (weight-decay filters, FSDP
wrapping policies) still finds these.
"""

import torch

from . import _ext, _fast, _functional as F

_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_F64 = torch.float64
_EPS32, _EPS64 = torch.finfo(torch.float32).eps, torch.finfo(_F64).eps
_MISSING = object()


def _weight_bias(m):
    """m.weight, m.bias for an eager call, read from m._parameters: nn.Module.__getattr__
    costs ~0.6 us per attribute, a visible share of a one-row norm. A parametrized
    weight or bias is not there (its class holds a property): read as an attribute."""
    ps = m._parameters
    w, b = ps.get("weight", _MISSING), ps.get("bias", _MISSING)
    return (m.weight if w is _MISSING else w), (m.bias if b is _MISSING else b)


def _last_axis_is(x, ns):
    """Whether normalized_shape ns is x's last axis alone (what the extension's token
    operators normalize over); cheaper than x.shape[-1:] == ns."""
    shape = x.shape
    return len(ns) == 1 and len(shape) > 0 and shape[-1] == ns[0]


class _TokenOptions:
    """weight_offset= and rounding= of the token-norm modules (docs/inference.md): not
    parameters or buffers, so the state_dict is torch's. Class defaults: a module whose
    class replace_norms changed in place has the plain options.

    Both are properties: assigning one (after construction too) checks the value as
    the constructor does and decides once whether the module has the plain options
    (_plain), which forward reads instead of comparing both on every call. Assigning
    does not reset the weight (the constructor does, for a nonzero offset)."""

    _weight_offset = 0.0
    _rounding = "once"
    _plain = True               # weight_offset 0 and rounding "once": the straight paths apply

    @property
    def weight_offset(self):
        return self._weight_offset

    @weight_offset.setter
    def weight_offset(self, value):
        self._set_options(value, self._rounding)

    @property
    def rounding(self):
        return self._rounding

    @rounding.setter
    def rounding(self, value):
        self._set_options(self._weight_offset, value)

    def _set_options(self, weight_offset, rounding):
        from ._token_ops import options
        options(type(self).__name__, weight_offset, rounding, self.weight if self.elementwise_affine
                else None)
        d = self.__dict__           # plain attributes: past nn.Module.__setattr__'s checks
        d["_weight_offset"] = float(weight_offset)
        d["_rounding"] = rounding
        d["_plain"] = d["_weight_offset"] == 0.0 and rounding == "once"

    def reset_parameters(self):
        # the weight starts where (weight_offset + weight) is 1: Gemma's zeros for offset 1
        super().reset_parameters()
        if self.weight_offset != 0.0 and getattr(self, "weight", None) is not None:
            with torch.no_grad():
                self.weight.fill_(1.0 - self.weight_offset)

    def extra_repr(self):
        s = super().extra_repr()
        if not self._plain:
            s += f", weight_offset={self.weight_offset}, rounding={self.rounding!r}"
        return s


class LayerNorm(_TokenOptions, torch.nn.LayerNorm):
    """torch.nn.LayerNorm on pynorm's kernels (normalized_shape of any length: the
    trailing axes are flattened into one row). Keywords weight_offset (y = xhat *
    (weight_offset + weight) + bias; the weight then starts at 1 - weight_offset) and
    rounding ("once" or "llama"), as pynorm.torch.layer_norm's."""

    def __init__(self, *args, weight_offset=0.0, rounding="once", **kwargs):
        super().__init__(*args, **kwargs)
        self._set_options(weight_offset, rounding)
        if self._weight_offset != 0.0:
            self.reset_parameters()

    def forward(self, input):
        default = self._plain
        ops = _ext.ops
        if default and ops is not None and input.is_cpu and _last_axis_is(input, self.normalized_shape):
            # the C++ extension's operator: the whole call in C++ (see _ext)
            if _is_compiling():
                _ext.prepare_inductor()
                return ops.layer_norm(input, self.weight, self.bias, self.eps)
            if not _functorch_active():
                w, b = _weight_bias(self)
                return _ext.eager_layer_norm(input, w, b, self.eps)
        y = _fast.token_norm(self, input, False) if default else None
        if y is None:
            y = F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                             weight_offset=self.weight_offset, rounding=self.rounding)
        return y


class RMSNorm(_TokenOptions, torch.nn.RMSNorm):
    """torch.nn.RMSNorm on pynorm's kernels (eps=None: the machine epsilon of the
    compute type, as torch). Keywords weight_offset (Gemma: 1.0, the weight then
    starts at zeros) and rounding ("llama": Hugging Face LlamaRMSNorm's), as
    pynorm.torch.rms_norm's."""

    def __init__(self, *args, weight_offset=0.0, rounding="once", **kwargs):
        super().__init__(*args, **kwargs)
        self._set_options(weight_offset, rounding)
        if self._weight_offset != 0.0:
            self.reset_parameters()

    def forward(self, x):
        default = self._plain
        ops = _ext.ops
        if default and ops is not None and x.is_cpu and _last_axis_is(x, self.normalized_shape):
            eps = self.eps
            if eps is None:
                eps = _EPS64 if x.dtype is _F64 else _EPS32
            if _is_compiling():
                _ext.prepare_inductor()
                return ops.rms_norm(x, self.weight, eps)
            if not _functorch_active():
                w = self._parameters.get("weight", _MISSING)
                return _ext.eager_rms_norm(x, self.weight if w is _MISSING else w, eps)
        y = _fast.token_norm(self, x, True) if default else None
        if y is None:
            y = F.rms_norm(x, self.normalized_shape, self.weight, self.eps,
                           weight_offset=self.weight_offset, rounding=self.rounding)
        return y


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm on pynorm's kernels (channels_last input: NHWC kernels)."""

    def forward(self, input):
        ops = _ext.ops
        if ops is not None and input.is_cpu and input.is_contiguous():
            if _is_compiling():
                _ext.prepare_inductor()
                return ops.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
            if not _functorch_active():
                w, b = _weight_bias(self)
                return _ext.eager_group_norm(input, self.num_groups, w, b, self.eps)
        y = _fast.group_norm(self, input, self.num_groups)
        if y is None:
            y = F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        return y


class _InstanceNormMixin:
    # torch's _InstanceNorm.forward checks the input and handles unbatched input,
    # then calls this.
    def _apply_instance_norm(self, input):
        if self.training or not self.track_running_stats:
            F.check_instance_spatial_size(input)
        bufs = self._buffers        # (as _weight_bias: no nn.Module.__getattr__)
        if bufs.get("running_mean") is None and bufs.get("running_var") is None and input.dim() > 1:
            ops = _ext.ops
            if ops is not None and input.is_cpu and input.is_contiguous():
                C = input.shape[1]
                if _is_compiling():
                    _ext.prepare_inductor()
                    return ops.group_norm(input, C, self.weight, self.bias, self.eps)
                if not _functorch_active():
                    w, b = _weight_bias(self)
                    return _ext.eager_group_norm(input, C, w, b, self.eps)
            y = _fast.group_norm(self, input, input.shape[1])
            if y is not None:
                return y
        else:
            y = _ext.instance_norm(self, input)      # running statistics: the extension's operators
            if y is not None:
                return y
        return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               self.training or not self.track_running_stats,
                               self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d on pynorm's GroupNorm kernels (one group per channel)."""


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d on pynorm's GroupNorm kernels (one group per channel)."""


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d on pynorm's GroupNorm kernels (one group per channel)."""


class _BatchNormMixin:
    def forward(self, input):
        # torch's _BatchNorm.forward, except that momentum=None passes the batch count
        # to the kernel instead of reading it on the host (no sync, no graph break)
        self._check_input_dim(input)
        momentum = self.momentum
        nbt = None
        if self.training and self.track_running_stats:
            nbt = _ext.module_entries(self, "_buffers", "num_batches_tracked", "num_batches_tracked")[0]
            if nbt is not None:
                nbt.add_(1)
            if momentum is not None:               # else the cumulative moving average
                nbt = None
        if momentum is None and nbt is None:
            momentum = 0.0
        rm, rv = _ext.module_entries(self, "_buffers", "running_mean", "running_var")
        bn_training = self.training or (rm is None and rv is None)
        y = _ext.batch_norm(self, input, bn_training, momentum, nbt)
        if y is None:
            y = _fast.batch_norm(self, input, bn_training, momentum, nbt)
        if y is not None:
            return y
        track = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None,
                            self.running_var if track else None, self.weight, self.bias,
                            bn_training, momentum, self.eps, num_batches_tracked=nbt)


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on pynorm's kernels."""


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on pynorm's kernels (channels_last input: NHWC kernels)."""


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on pynorm's kernels (channels_last_3d input: NHWC kernels)."""


_TWINS = {torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm, torch.nn.GroupNorm: GroupNorm,
          torch.nn.InstanceNorm1d: InstanceNorm1d, torch.nn.InstanceNorm2d: InstanceNorm2d,
          torch.nn.InstanceNorm3d: InstanceNorm3d, torch.nn.BatchNorm1d: BatchNorm1d,
          torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d}


def twins():
    """{torch.nn class: pynorm twin} for every class replace_norms converts."""
    return dict(_TWINS)
