"""How a pynorm.torch call reaches the kernels: through the torch.ops.pynorm operators,
or, in plain eager mode, through an equivalent autograd.Function.

The operators are what torch.compile, torch.export, fake tensors, tensor subclasses,
dispatch modes and functorch see. In plain eager mode their Python dispatch path
(redispatch, argument normalisation, the generated autograd wrapper, for the forward
and again for the backward) costs several times a small norm's kernel, so there the
same implementation and the same autograd formulas run through a torch.autograd.Function
instead: the same bits, the same gradients, a fraction of the overhead. The
conditions for that fast path are all checked per call; anything unusual takes the
operators.
"""

import torch
from torch.autograd.function import once_differentiable

# Tests switch this off to run eager code through the operators.
FAST_EAGER = True

_RAW = {}       # operator name -> Python implementation (real tensors)
_FAST = {}      # operator name -> autograd.Function running _RAW
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DEVICES = ("cpu", "cuda")


def register(name, impl, setup_context=None, backward=None):
    """Records an operator's implementation (and its autograd formula, for the
    forwards) for the eager fast path."""
    _RAW[name] = impl
    if setup_context is None:
        return

    def forward(ctx, *args):
        # the classic forward(ctx, ...) form: Function.apply binds a setup_context-style
        # forward's signature with inspect on every call (tens of microseconds)
        output = impl(*args)
        setup_context(ctx, args, output)
        ctx.pynorm_fast = True          # backward: call the raw backward, not its operator
        return output

    _FAST[name] = type(f"PynormEager_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        # first-order only, as the operators: a double backward raises instead of
        # treating the raw backward's outputs as constants
        "backward": staticmethod(once_differentiable(backward)),
    })


def backward_op(ctx, name):
    """The backward operator, or its raw implementation under the fast path."""
    if getattr(ctx, "pynorm_fast", False):
        return _RAW[name]
    return getattr(torch.ops.pynorm, name)


def _plain(args):
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.device.type not in _DEVICES):
            return False
    return True


def _any_requires_grad(args):
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


def run(name, *args):
    """Calls operator `name` (a forward) with args."""
    if torch.compiler.is_compiling():            # first: Dynamo folds this to True
        return getattr(torch.ops.pynorm, name)(*args)
    if (FAST_EAGER and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None
            and torch._C._get_tracing_state() is None
            and not torch._C._is_torch_function_mode_enabled()
            and _plain(args)):
        if torch.is_grad_enabled() and _any_requires_grad(args):
            return _FAST[name].apply(*args)
        return _RAW[name](*args)         # nothing to differentiate: no graph node
    return getattr(torch.ops.pynorm, name)(*args)
