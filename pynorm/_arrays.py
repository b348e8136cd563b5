"""Array handling shared by the ops: argument checks, row layouts, outputs.

Every check runs before the C library is called, and names the argument it
rejects. The C library checks again (a backstop): a status from it becomes an
exception here too.
"""
import math
import numbers

import ml_dtypes
import numpy as np

from ._lib import ffi, lib

bfloat16 = np.dtype(ml_dtypes.bfloat16)

# NumPy dtype -> pn_dtype
PN_DTYPE = {
    np.dtype(np.float32): lib.PN_FLOAT32,
    np.dtype(np.float16): lib.PN_FLOAT16,
    bfloat16: lib.PN_BFLOAT16,
    np.dtype(np.float64): lib.PN_FLOAT64,
}
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 (ml_dtypes) or float64"

# Outputs of at least this many bytes come from the library's buffer cache,
# which spares a loop over large outputs the page faults of fresh memory.
CACHED_ALLOC_MIN = 1 << 20


class PynormError(RuntimeError):
    """The C library refused a call that passed the Python checks."""


def check_status(status, *what):
    """Raise for a failed status. `what` names the call in pieces, joined only on
    failure: a name built on every successful call is measurable per-call cost."""
    if status == lib.PN_OK:
        return
    raise status_error(status)(f"{''.join(what)}: {ffi.string(lib.pn_status_string(status)).decode()}")


def status_error(status):
    """The exception class of a failed pn_status (docs/errors.md); the CUDA library's
    codes are the same numbers."""
    if status == lib.PN_ERR_ALLOC:
        return MemoryError
    if status == lib.PN_ERR_DTYPE:
        return TypeError
    if status == lib.PN_ERR_SCRATCH:
        return PynormError
    return ValueError


def ptr(a):
    """Data pointer of an ndarray (or NULL for None)."""
    if a is None:
        return ffi.NULL
    if a.flags.c_contiguous:              # the fast way, for the common case
        return ffi.from_buffer(a)
    return ffi.cast("void *", a.__array_interface__["data"][0])


def stats_dtype(dtype):
    """Saved statistics are float32, float64 for float64 data."""
    return _F64 if dtype == _F64 else _F32


def check_input(x, name):
    """x must be a NumPy array of a supported dtype with at least one axis."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (or a CUDA array), got {type(x).__name__}")
    if x.dtype not in PN_DTYPE:
        raise TypeError(f"{name} has dtype {x.dtype}; expected {_DTYPE_NAMES}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the normalized axis C), got a 0-d array")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last axis (C = 0): there is nothing to normalize")
    return x


_EPS32 = float(np.finfo(np.float32).eps)
_EPS64 = float(np.finfo(np.float64).eps)


def check_eps(eps, default_for=None):
    """eps as a float; None means the machine epsilon of the compute type."""
    if eps is None:
        return _EPS64 if default_for == _F64 else _EPS32
    if type(eps) is not float:            # a plain float skips the (slow) ABC check
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
        eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


ROUNDINGS = ("once", "llama")


def check_options(weight_offset, rounding, weight):
    """weight_offset and rounding of a token norm: (offset as a float, rounding code).
    A non-zero offset needs a weight (weight=None means no scaling at all)."""
    if type(weight_offset) is not float:
        if isinstance(weight_offset, bool) or not isinstance(weight_offset, numbers.Real):
            raise TypeError(f"weight_offset must be a real number, got {type(weight_offset).__name__}")
        weight_offset = float(weight_offset)
    if not math.isfinite(weight_offset):
        raise ValueError(f"weight_offset must be finite, got {weight_offset}")
    if weight_offset != 0.0 and weight is None:
        raise ValueError(f"weight_offset={weight_offset} needs a weight: with weight=None there is no scaling "
                         "to offset (pass the weight, e.g. zeros for Gemma's 1 + w)")
    if not isinstance(rounding, str):
        raise TypeError(f"rounding must be a str, \"once\" or \"llama\", got {type(rounding).__name__}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be \"once\" or \"llama\", got {rounding!r}")
    return weight_offset, ROUNDINGS.index(rounding)


def same_view(a, b):
    """a and b are the same memory seen the same way (same start, shape, strides
    and dtype): an output that may be written over that input (in place)."""
    return (a is b or (a is not None and b is not None and a.shape == b.shape and a.strides == b.strides and
                       a.dtype == b.dtype and
                       a.__array_interface__["data"][0] == b.__array_interface__["data"][0]))


def check_param(p, name, x):
    """weight/bias: None, or a 1-D array of C elements in x's dtype or float32.
    Returns (array or None, its pn_dtype) - dense, as the C API wants it."""
    if p is None:
        return None
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or None, got {type(p).__name__}")
    if p.dtype != x.dtype and p.dtype != _F32:
        raise TypeError(f"{name} has dtype {p.dtype}; expected x's dtype ({x.dtype}) or float32")
    if p.shape != (x.shape[-1],):
        raise ValueError(f"{name} has shape {p.shape}; expected ({x.shape[-1]},), the last axis of x")
    return p if p.flags.c_contiguous else np.ascontiguousarray(p)


def param_dtype(*params):
    """The dtype of weight/bias (they must agree), float32 when both are None."""
    dt = None
    for p in params:
        if p is None:
            continue
        if dt is None:
            dt = p.dtype
        elif p.dtype != dt:
            raise TypeError(f"weight and bias must have the same dtype, got {dt} and {p.dtype}")
    return _F32 if dt is None else dt


def _fold(sizes, strides):
    """(n, stride) when axes of these sizes and element strides walk one
    arithmetic sequence (outermost first), else None."""
    n, step = 1, 0
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if n > 1 and stride != step * n:
            return None
        if n == 1:
            step = stride
        n *= size
    return n, step


def _elem_strides(a):
    """Element strides of a's leading axes when its rows are contiguous, else None."""
    item = a.itemsize
    if a.shape[-1] > 1 and a.strides[-1] != item:
        return None
    if any(s % item for s in a.strides[:-1]):
        return None
    return [s // item for s in a.strides[:-1]]


def gradient_outs(out, accumulate, names):
    """A backward's out= as a tuple of len(names) entries (None: allocate that
    gradient); accumulate=True adds into existing gradients, so it needs all of them."""
    joined = ", ".join(names)
    if out is None:
        if accumulate:
            raise ValueError(f"accumulate=True adds into existing gradients: pass out=({joined})")
        return (None,) * len(names)
    if not (isinstance(out, tuple) and len(out) == len(names)):
        raise TypeError(f"out must be a tuple ({joined})")
    if accumulate and any(o is None for o in out):
        raise ValueError(f"accumulate=True needs every gradient in out=({joined})")
    return out


def split_rows(lead, strides_list):
    """The first split of the leading axes into B x T that every buffer can be
    addressed with: (B, T, [(sb, st) per buffer]) or None."""
    for k in range(len(lead) + 1):
        pairs = []
        for st in strides_list:
            fb, ft = _fold(lead[:k], st[:k]), _fold(lead[k:], st[k:])
            if fb is None or ft is None:
                break
            pairs.append((fb[1], ft[1]))
        else:
            B, T = math.prod(lead[:k]), math.prod(lead[k:])
            return B, T, pairs
    return None


def split_rows3(lead, strides_list):
    """A split of the leading axes into B x T x H (the third axis: heads) that every
    buffer can be addressed with, for views no B x T split fits (a 4-D (B, S, H, D)
    view of a buffer whose B and S axes do not fold into one):
    (B, T, H, [(sb, st, sh) per buffer]) or None."""
    n = len(lead)
    for k1 in range(n + 1):
        for k2 in range(k1, n + 1):
            triples = []
            for st in strides_list:
                fb, ft, fh = _fold(lead[:k1], st[:k1]), _fold(lead[k1:k2], st[k1:k2]), _fold(lead[k2:], st[k2:])
                if fb is None or ft is None or fh is None:
                    break
                triples.append((fb[1], ft[1], fh[1]))
            else:
                return math.prod(lead[:k1]), math.prod(lead[k1:k2]), math.prod(lead[k2:]), triples
    return None


def rows_disjoint3(counts, strides, C):
    """The C library's test that rows of C elements along up to three axes
    (counts, element strides) do not overlap: by increasing |stride|, each
    stride clears the run of rows along the smaller ones."""
    axes = sorted((abs(s), n) for n, s in zip(counts, strides) if n > 1)
    run = C
    for s, n in axes:
        if s < run:
            return False
        run += (n - 1) * s
    return True


def rows_disjoint(B, T, sb, st, C):
    """The C library's test that B x T rows of C elements at element offsets
    b*sb + t*st do not overlap (what it requires of an output's rows)."""
    sb, st = abs(sb), abs(st)
    if B == 1 and T == 1:
        return True
    if B == 1:
        return st >= C
    if T == 1:
        return sb >= C
    if st <= sb:
        return st >= C and sb >= (T - 1) * st + C
    return sb >= C and st >= (B - 1) * sb + C


COPY, REPEAT = "copy", "repeat"


def row_pair(role, sizes, strides, C):
    """How the library addresses one buffer's rows in a (B, T, H) split with strides
    (sb, st, sh): its (b, t) strides, or COPY when it must go through a dense
    temporary (rows an output would overlap; a broadcast row under heads with
    B, T > 1), or REPEAT when its one row must become min(B, T) dense copies (a
    broadcast row of a B x T split). {0, 0} would read as dense, so it never comes
    back."""
    (B, T, H), (sb, st, sh) = sizes, strides
    if (role == OUT or role == INOUT) and not rows_disjoint3(sizes, strides, C):
        return COPY
    pair = repeated_row(sb, st, B, T)
    if pair is None:
        return COPY if H > 1 else REPEAT
    return pair


def repeated_row(sb, st, B, T):
    """Strides {sb, st} for a buffer whose every row is the same memory, where the
    fold gave (0, 0) - which the C API reads as the dense layout. None when both
    B > 1 and T > 1 (no other pair reads one row for every (b, t))."""
    if (sb, st) != (0, 0):
        return sb, st
    if B == 1:
        return 1, 0                 # b is always 0
    if T == 1:
        return 0, 1                 # t is always 0
    return None


# roles of the buffers of a token-norm call (row_layout): read, written, added into,
# or written and new (an output the call allocated: dense, apart from everything)
IN, OUT, INOUT, NEW = 0, 1, 2, 3


def _replace(i, buffers, arrays, strides, back):
    """Buffer i of a row_layout call replaced by a dense array: a copy of an input, a
    temporary for an output (holding its values when the call adds into it)."""
    a, role = buffers[i][2], buffers[i][3]
    if role == IN:
        new = np.ascontiguousarray(a)
    else:
        new = empty(a.shape, a.dtype) if role != INOUT else np.array(a, order="C")
        back.append((a, new))
    arrays[i] = new
    strides[i] = _elem_strides(new)


def row_layout(lead, buffers, others=(), heads=False):
    """Lays B x T x C rows over buffers sharing the leading shape `lead`.

    buffers: list of (pn_strides field, argument name, array, role): IN (read;
    may be replaced by a dense copy), OUT (written), INOUT (added into) or NEW
    (written, and allocated by the call: dense and apart from everything). An
    output the kernels cannot write where it is (its last axis is strided, its
    rows have no B x T split in common with the other buffers, or its extent
    meets another buffer's, which the library refuses as an alias) is replaced
    by a dense temporary: write_back() copies it into the output after the call.
    An output that is the same view as an input (in place, same_view) is
    written where it is, as long as that input is. others: (name, array or
    None) of every array the call reads, for that test.

    heads=True (the *_ex calls): where no B x T split fits every buffer, a
    B x T x H split (pn_norm_options.H and head strides) is tried before any
    copy. Returns (B, T, pn_strides* or NULL, arrays to pass, [(output,
    temporary)]), plus (H, {field: head stride}) with heads=True."""
    arrays = [b[2] for b in buffers]
    for a in arrays:
        if not a.flags.c_contiguous:
            break
    else:                                                   # the common case, no struct
        done = (1, math.prod(lead), ffi.NULL, arrays, ())
        return done + (1, {}) if heads else done
    back = []
    strides = [_elem_strides(a) for a in arrays]
    # in place: output i is written over input twin[i], where both stay
    twin = {}
    for i, b in enumerate(buffers):
        if b[3] == OUT:
            for j, c in enumerate(buffers):
                if c[3] == IN and same_view(b[2], c[2]):
                    twin[i] = j

    # rows the kernels cannot address at all (a strided last axis) are copied; an
    # output is also written through a temporary when its extent meets another
    # buffer's (the library would refuse it as an alias)
    for i, b in enumerate(buffers):
        if b[3] == IN and strides[i] is None:
            _replace(i, buffers, arrays, strides, back)
    for i, b in enumerate(buffers):
        if i in twin and arrays[twin[i]] is buffers[twin[i]][2] and strides[i] is not None:
            continue                                        # in place: x itself is read there
        if (b[3] == OUT or b[3] == INOUT) and (
                strides[i] is None or
                any(j != i and np.may_share_memory(arrays[i], a) for j, a in enumerate(arrays)) or
                any(a is not None and np.may_share_memory(arrays[i], a) for _, a in others)):
            _replace(i, buffers, arrays, strides, back)
    # a B x T split common to every buffer (B x T x H with heads); failing one, the
    # strided inputs are copied, then the strided outputs written through temporaries
    # (dense arrays fit any split)
    def find():
        two = split_rows(lead, strides)
        if two is not None:
            return two[0], two[1], 1, [(sb, st, 0) for sb, st in two[2]]
        return split_rows3(lead, strides) if heads else None
    split = find()
    for copy_inputs in (True, False):
        if split is not None:
            break
        for i, b in enumerate(buffers):
            if (b[3] == IN) == copy_inputs and not arrays[i].flags.c_contiguous:
                _replace(i, buffers, arrays, strides, back)
        split = find()
    B, T, H, triples = split
    C = arrays[0].shape[-1]
    s = ffi.new("pn_strides *")
    head = {}
    for i, (sb, st, sh) in enumerate(triples):
        if arrays[i].flags.c_contiguous:
            continue                                        # {0, 0}: dense, whatever the split
        field, role = buffers[i][0], buffers[i][3]
        pair = row_pair(role, (B, T, H), (sb, st, sh), C)
        if pair is COPY:
            _replace(i, buffers, arrays, strides, back)
            continue
        if pair is REPEAT:
            arrays[i], pair = repeat_row(arrays[i], B, T)
        if H > 1:
            head[field] = sh
        row = getattr(s, field)
        row.b, row.t = pair
    done = (B, T, s, arrays, back)
    return done + (H, head) if heads else done


def repeat_row(a, B, T):
    """(array, strides) for an input whose every row is the same memory, under a
    B x T split with B > 1 and T > 1: that row repeated densely along the
    shorter of the two, and a zero stride along the other."""
    row = a[(0,) * (a.ndim - 1)]
    if B <= T:
        return np.ascontiguousarray(np.broadcast_to(row, (B, a.shape[-1]))), (a.shape[-1], 0)
    return np.ascontiguousarray(np.broadcast_to(row, (T, a.shape[-1]))), (0, a.shape[-1])


def write_back(back):
    """After a successful call: each temporary into the output it stands for."""
    for out, tmp in back:
        np.copyto(out, tmp)


def dense_target(out, accumulate, back, others=()):
    """The array a kernel that writes dense buffers gets for `out` (None stays
    None): out itself when it is C-contiguous and its extent meets none of
    `others`, else a temporary (holding out's values when the kernel adds into
    it), recorded in `back` for write_back()."""
    if out is None or (out.flags.c_contiguous and
                       not any(a is not None and np.may_share_memory(out, a) for a in others)):
        return out
    tmp = np.array(out, order="C") if accumulate else empty(out.shape, out.dtype)
    back.append((out, tmp))
    return tmp


def empty(shape, dtype):
    """A C-contiguous output array; large ones come from the library's cache."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < CACHED_ALLOC_MIN:
        return np.empty(shape, dtype)
    raw = lib.pn_buffer_alloc(nbytes)
    if raw == ffi.NULL:
        raise MemoryError(f"pynorm: cannot allocate {nbytes} bytes")
    raw = ffi.gc(raw, lambda p: lib.pn_buffer_free(p, nbytes), size=nbytes)
    return np.frombuffer(ffi.buffer(raw, nbytes), dtype).reshape(shape)


def shares_memory(a, b):
    """Whether arrays a and b have an element in common (exactly, not by bounds:
    interleaved views of one buffer share nothing)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return np.shares_memory(a, b, max_work=_SHARES_MAX_WORK)
    except np.exceptions.TooHardError:
        return True


_SHARES_MAX_WORK = 1 << 16


def internal_overlap(a):
    """Whether two elements of a lie at the same address through a zero stride
    (a writable broadcast view): such an array cannot receive results."""
    return a.size > 1 and any(s == 0 and n > 1 for n, s in zip(a.shape, a.strides))


def check_out(out, name, shape, dtype, inputs, inplace_ok=()):
    """An out= array: right shape and dtype, writable, no element written twice
    and no memory shared with any input, except that it may be the very view of
    an input named in inplace_ok (same memory, same strides: in place). Any
    strides: where the kernels cannot write them, the call writes through a
    temporary (row_layout, dense_target)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}; expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}; expected {np.dtype(dtype)}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if not out.flags.c_contiguous and internal_overlap(out):
        raise ValueError(f"{name} has a zero stride along an axis of more than one element: "
                         "its elements overlap")
    for arg, a in inputs:
        if a is not None and np.may_share_memory(out, a) and shares_memory(out, a):
            if arg in inplace_ok and same_view(out, a):
                continue
            if arg in inplace_ok:
                raise ValueError(f"{name} overlaps {arg} without being the same view of it: in place, "
                                 f"{name} must be {arg} itself (same memory, same strides)")
            raise ValueError(f"{name} overlaps {arg}: outputs must not share memory with inputs")
    return out


def check_distinct_outputs(outs):
    """No two outputs may share memory."""
    for i, (n1, a) in enumerate(outs):
        for n2, b in outs[:i]:
            if a is not None and b is not None and np.may_share_memory(a, b) and shares_memory(a, b):
                raise ValueError(f"{n1} overlaps {n2}: outputs must not share memory")
