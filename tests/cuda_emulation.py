"""The CUDA library's token-norm forward statistics replayed in NumPy, in the
kernels' exact order of operations (no GPU needed).

What is replayed, and where it lives in the CUDA sources:

  kernel choice, threads   cuda_src/launch.h fwd_plan(); the thresholds are read
                           from launch.h itself (LAUNCH below)
  which values a thread    launch.h col_of_v(): element k of thread tid is column
  holds, in which order    ((k // V) * tpr + tid) * V + k % V, V = 16 / itemsize
                           (register kernels); c = tid, tid + nt, ... (streaming)
  LayerNorm shift          common.cuh row_shift(): x0 + tree-sum of the first
                           min(C, 16) differences / k
  LayerNorm's sum          common.cuh CompSum over a thread's values in order
                           (two_sum of v and -sh, two_sum into s, c += both
                           errors); the thread's (double)s + (double)c, or for
                           float64 rows the pair (s, c)
  squares                  register kernels: `q = fmaf(d, d, q)` over k = 0..E-1
                           (values at columns >= C skipped; RMSNorm's kernel adds
                           their zeros, the same bits); streaming kernels:
                           common.cuh FoldSum (chains of 16 in the compute type,
                           each added to a double total, then total + the open one)
  across threads           common.cuh warp_sum (xor butterfly 16, 8, 4, 2, 1) and
                           block_sum (each warp's butterfly, then a butterfly over
                           the warp sums padded with zeros to 32), in double;
                           float64 rows' LayerNorm sum: warp_sum_dd/block_sum_dd,
                           the same order on (hi, lo) pairs (dd_add)
  results                  m = (A)(sd / C); rstd = (A)(1 / sqrt(qd / C + eps));
                           mean = (A)((double)sh + sd / C), float64 rows dd_mean;
                           y = fma(((v - sh) - m) * rs, w, b) (LayerNorm) or
                           v * rs * w (RMSNorm), rounded once
  double fallback          rows whose float sum of squares leaves [1e-20, 1e36]:
                           everything again in double, shifted by x0 (plain double
                           chains, fma for the squares and for y)

Every float32 operation is a NumPy float32 operation (IEEE, round to nearest
even); fused multiply-adds are emulated exactly (fma32, fma64 below, checked
against exact rational arithmetic by the tests).
"""

import os
import re

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_LAUNCH_H = os.path.join(_HERE, "..", "cuda_src", "launch.h")


def _read_launch_constants(path=_LAUNCH_H):
    text = open(path).read()
    out = {}
    for name in ("kWarpMaxC", "kRegMaxC", "kFwdWarpsPerBlock", "kStreamThreads", "kFwdBlockE",
                 "kShiftCount", "kFoldEvery"):
        m = re.search(r"constexpr int %s = (\d+);" % name, text)
        if m is None:
            raise RuntimeError(f"{path}: constant {name} not found")
        out[name] = int(m.group(1))
    return out


LAUNCH = _read_launch_constants()

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


# ---- exact fused multiply-add -----------------------------------------------------------

def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a):
    c = 134217729.0 * a          # 2^27 + 1 (Veltkamp)
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a, b):
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _round_odd_sum(a, b):
    """a + b rounded to odd (float64): the neighbour with an odd last bit
    whenever the sum is not representable."""
    s, e = _two_sum(a, b)
    even = (s.view(np.int64) & 1) == 0
    bump = (e != 0) & even
    return np.where(bump, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)


def fma64(a, b, c):
    """Correctly rounded a * b + c in float64 (Boldo and Melquiond's emulation:
    exact product, exact sum, one rounding to odd, one to nearest); exact for
    operands whose products neither overflow nor underflow."""
    a, b, c = (np.asarray(v, F64) for v in (a, b, c))
    uh, ul = _two_prod(a, b)
    th, tl = _two_sum(c, uh)
    return th + _round_odd_sum(tl, ul)


def fma32(a, b, c):
    """Correctly rounded a * b + c in float32: the product of two floats is
    exact in float64; the sum rounded to odd in float64 (53 >= 24 + 2 bits),
    then to nearest in float32, rounds as the exact value would."""
    a, b, c = (np.asarray(v, F32).astype(F64) for v in (a, b, c))
    return _round_odd_sum(a * b, c).astype(F32)


def fma(a, b, c, A):
    return fma32(a, b, c) if A == F32 else fma64(a, b, c)


# ---- geometry (launch.h) ------------------------------------------------------------------

def fwd_plan(C, itemsize):
    """(kind, E, threads) of launch.h fwd_plan: kind "warp", "block" or "stream"."""
    L = LAUNCH
    if itemsize == 8:
        n = -(-C // 4)
        n = min(n, L["kStreamThreads"])
        n = -(-n // 32) * 32
        return "stream", 0, max(n, 32)
    if C <= L["kWarpMaxC"]:
        E = 8 if C <= 256 else 16 if C <= 512 else 24 if C <= 768 else 32
        return "warp", E, 32 * L["kFwdWarpsPerBlock"]
    if C <= L["kRegMaxC"]:
        E = L["kFwdBlockE"]
        return "block", E, -(-(-(-C // E)) // 32) * 32
    return "stream", 0, L["kStreamThreads"]


def fragment_columns(C, itemsize, E, tpr):
    """(tpr, E) columns held by each thread (launch.h col_of_v)."""
    V = 16 // itemsize
    k = np.arange(E)
    tid = np.arange(tpr)[:, None]
    return ((k // V) * tpr + tid) * V + k % V


# ---- reductions (common.cuh) -----------------------------------------------------------------

def warp_sum(v):
    """xor butterfly over the last axis (32 lanes); every lane ends with the
    same bits: lane 0's value is returned."""
    idx = np.arange(32)
    for o in (16, 8, 4, 2, 1):
        v = v + v[..., idx ^ o]
    return v[..., 0]


def block_sum(v):
    """common.cuh block_sum over the last axis (threads, a multiple of 32)."""
    nt = v.shape[-1]
    nw = nt // 32
    w = warp_sum(v.reshape(v.shape[:-1] + (nw, 32)))
    pad = np.zeros(v.shape[:-1] + (32,), v.dtype)
    pad[..., :nw] = w
    return warp_sum(pad)


def _reduce(per_thread, kind):
    return warp_sum(per_thread) if kind == "warp" else block_sum(per_thread)


def _dd_add(ah, al, bh, bl):
    h, e = _two_sum(ah, bh)
    return h, (al + bl) + e


def warp_sum_dd(hi, lo):
    idx = np.arange(32)
    for o in (16, 8, 4, 2, 1):
        hi, lo = _dd_add(hi, lo, hi[..., idx ^ o], lo[..., idx ^ o])
    return hi[..., 0], lo[..., 0]


def block_sum_dd(hi, lo):
    nt = hi.shape[-1]
    nw = nt // 32
    wh, wl = warp_sum_dd(hi.reshape(hi.shape[:-1] + (nw, 32)), lo.reshape(lo.shape[:-1] + (nw, 32)))
    ph = np.zeros(hi.shape[:-1] + (32,), F64)
    pl = np.zeros(hi.shape[:-1] + (32,), F64)
    ph[..., :nw], pl[..., :nw] = wh, wl
    return warp_sum_dd(ph, pl)


def dd_mean(sh, hi, lo, C):
    """common.cuh dd_mean"""
    q = hi / C
    r = fma64(-q, np.float64(C), hi)
    u, eu = _two_sum(sh, q)
    return u + (eu + (r + lo) / C)


# ---- the statistics ----------------------------------------------------------------------------

def compute_type(dtype):
    return F64 if np.dtype(dtype) == F64 else F32


def row_shift(xa, A):
    """common.cuh row_shift on rows xa (compute type A): (shift, x0)."""
    C = xa.shape[-1]
    k = min(C, LAUNCH["kShiftCount"])
    x0 = xa[:, 0]
    d = np.zeros((xa.shape[0], LAUNCH["kShiftCount"]), A)
    d[:, :k] = xa[:, :k] - x0[:, None]
    w = LAUNCH["kShiftCount"] // 2
    while w >= 1:
        d[:, :w] = d[:, :w] + d[:, w:2 * w]
        w //= 2
    step = d[:, 0] * A.type(0.0625) if k == LAUNCH["kShiftCount"] else d[:, 0] / A.type(k)
    return x0 + step, x0


class _Rows:
    """The values each thread holds, and a mask of the real ones."""

    def __init__(self, xa, itemsize):
        self.rows, self.C = xa.shape
        self.kind, self.E, self.nt = fwd_plan(self.C, itemsize)
        if self.kind == "stream":
            J = -(-self.C // self.nt)
            cols = np.arange(J)[None, :] * self.nt + np.arange(self.nt)[:, None]   # (nt, J): c = tid + j * nt
        else:
            tpr = 32 if self.kind == "warp" else self.nt
            cols = fragment_columns(self.C, itemsize, self.E, tpr)                  # (tpr, E)
        self.mask = cols < self.C
        self.vals = np.where(self.mask, xa[:, np.minimum(cols, self.C - 1)], xa.dtype.type(0))

    def chain(self, terms, sq, A):
        """Per-thread sums of `terms` (rows, threads, steps), or of their
        squares (sq: fma(t, t, part)), in the kernel's order, as float64.
        Register kernels: one chain over k = 0..E-1, columns >= C skipped
        (RMSNorm's kernel adds their zeros instead: fma(0, 0, q) == q, the
        same bits). Streaming kernels: FoldSum over c = tid, tid + nt, ...,
        a thread's chain ending at its last column."""
        part = np.zeros(terms.shape[:2], A)
        total = np.zeros(terms.shape[:2], F64)
        fold = LAUNCH["kFoldEvery"] if self.kind == "stream" else None
        for j in range(terms.shape[2]):
            t = terms[:, :, j]
            active = self.mask[None, :, j]
            part = np.where(active, fma(t, t, part, A) if sq else part + t, part)
            if fold and (j + 1) % fold == 0:
                total = np.where(active, total + part.astype(F64), total)
                part = np.where(active, A.type(0), part)
        return total + part.astype(F64) if fold else part.astype(F64)


    def comp_sum(self, sh, A):
        """common.cuh CompSum of v - sh over each thread's values in order:
        (s, c) per thread."""
        s = np.zeros(self.vals.shape[:2], A)
        c = np.zeros(self.vals.shape[:2], A)
        nsh = -sh[:, None]
        for j in range(self.vals.shape[2]):
            active = self.mask[None, :, j]
            d, ed = _two_sum(self.vals[:, :, j], nsh)
            t, et = _two_sum(s, d)
            s = np.where(active, t, s)
            c = np.where(active, c + (et + ed), c)
        return s, c

    def chain_d(self, terms, sq):
        """A plain double chain per thread (the fallback): sum of terms, or
        fma(t, t, part)."""
        part = np.zeros(terms.shape[:2], F64)
        for j in range(terms.shape[2]):
            t = terms[:, :, j]
            part = np.where(self.mask[None, :, j], fma64(t, t, part) if sq else part + t, part)
        return part


def needs_fallback(qd):
    return ~((qd >= 1e-20) & (qd <= 1e36))


def layer_norm_forward(x, eps, w=None, b=None):
    """(y, mean, rstd, fallback) as the CUDA forward computes them; x of shape
    (rows, C) in its dtype; w, b (x's dtype or float32) or None. fallback:
    the rows the kernels redo in double."""
    A = compute_type(x.dtype)
    xa = x.astype(A)
    R = _Rows(xa, x.dtype.itemsize)
    sh, x0 = row_shift(xa, A)
    s, c = R.comp_sum(sh, A)
    if A == F32:
        sd = _reduce(s.astype(F64) + c.astype(F64), R.kind)
        mean_d = sh.astype(F64) + sd / R.C
    else:
        hi, lo = block_sum_dd(s, c)          # float64 rows always stream (block sums)
        sd = hi + lo
        mean_d = dd_mean(sh, hi, lo, R.C)
    m = (sd / R.C).astype(A)
    d2 = (R.vals - sh[:, None, None]) - m[:, None, None]
    qd = _reduce(R.chain(d2, True, A), R.kind)
    rs = (1.0 / np.sqrt(qd / R.C + eps)).astype(A)
    mean = mean_d.astype(A)
    wv = np.ones(R.C, A) if w is None else np.asarray(w).astype(A)
    bv = np.zeros(R.C, A) if b is None else np.asarray(b).astype(A)
    y = fma(((xa - sh[:, None]) - m[:, None]) * rs[:, None], wv[None, :], bv[None, :], A)
    fb = needs_fallback(qd) if A == F32 else np.zeros(R.rows, bool)
    if fb.any():
        # the double fallback: shifted by x0, plain double chains
        v = R.vals.astype(F64)
        x0d = x0.astype(F64)
        s2 = _reduce(R.chain_d(v - x0d[:, None, None], False), R.kind)
        md = s2 / R.C
        q2 = _reduce(R.chain_d((v - x0d[:, None, None]) - md[:, None, None], True), R.kind)
        rsd = 1.0 / np.sqrt(q2 / R.C + eps)
        yd = fma64((((xa.astype(F64) - x0d[:, None]) - md[:, None]) * rsd[:, None]),
                   wv.astype(F64)[None, :], bv.astype(F64)[None, :]).astype(A)
        y = np.where(fb[:, None], yd, y)
        mean = np.where(fb, (x0d + md).astype(A), mean)
        rs = np.where(fb, rsd.astype(A), rs)
    return y.astype(x.dtype), mean, rs, fb


def rms_norm_forward(x, eps, w=None):
    """(y, rstd, fallback) as the CUDA forward computes them."""
    A = compute_type(x.dtype)
    xa = x.astype(A)
    R = _Rows(xa, x.dtype.itemsize)
    qd = _reduce(R.chain(R.vals, True, A), R.kind)
    rs = (1.0 / np.sqrt(qd / R.C + eps)).astype(A)
    wv = np.ones(R.C, A) if w is None else np.asarray(w).astype(A)
    y = (xa * rs[:, None]) * wv[None, :]
    fb = needs_fallback(qd) if A == F32 else np.zeros(R.rows, bool)
    if fb.any():
        v = R.vals.astype(F64)
        q2 = _reduce(R.chain_d(v, True), R.kind)
        rsd = 1.0 / np.sqrt(q2 / R.C + eps)
        yd = ((xa.astype(F64) * rsd[:, None]) * wv.astype(F64)[None, :]).astype(A)
        y = np.where(fb[:, None], yd, y)
        rs = np.where(fb, rsd.astype(A), rs)
    return y.astype(x.dtype), rs, fb
