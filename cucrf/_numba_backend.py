"""The fused CPU backend: the interface of :mod:`cucrf._meanfield` on compiled kernels (numba).

Chosen by :func:`cucrf._backends.get_backend` for NumPy arrays when the optional extra
``cucrf[fast]`` is installed (see :mod:`cucrf._fast`). It computes what
:mod:`cucrf._numpy_backend` computes (the specification; the tests compare the two) with fewer
passes over the full-resolution arrays, as the CUDA backend does on the GPU:

* ``full_message`` keeps the message on the coarse grid (a :class:`CoarseMessage`);
* ``update`` does upsampling, compatibility, unary and softmax in one pass per row, and pools
  the new ``Q`` for the next message in the same pass;
* the backward pass keeps the gradients with respect to the message and to ``Q`` on the coarse
  grid (:class:`MessageGradient`, :class:`PixelGradient`) and forms them at full resolution
  inside the softmax's vjp, as ``cucrf._cuda.backend`` does.

Images are volumes of depth 1 for the kernels (one compiled kernel serves both); arrays handed
back to :mod:`cucrf._meanfield` keep their own shapes. The kernel parameter gradients
(``prepare_backward``) are the NumPy reference's, on what the backward pass collected.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
import weakref
from typing import Optional

import numpy as np

from . import _meanfield, _parallel
from . import _numba_kernels as _k
from . import _numpy_backend as _reference
from ._geometry import axis_geometry, window_offsets

xp = np
name = "numba"
#: The (S, B, K, *coarse) kernel stack is stored, as NumPy's (for the memory estimate).
stores_kernels = True

_owned = weakref.WeakValueDictionary()  # id -> class maps this backend allocated (safe to overwrite)
_finite = weakref.WeakValueDictionary()  # id -> outputs whose every value the update found finite
_dots = {}  # id(sums) -> (weak sums, weak logits, sum(sums * logits)) from softmax vjps, until read or freed
_taped_outputs = {}  # id(Q) -> (weak Q, weak setup): outputs of taped iterations on images, while alive
_logits_coarse = {}  # id(grad_logits) -> (weak grad_logits, weak setup, its Up^T), until read or freed

#: The most pieces a kernel call is split into: two per thread, so that a thread starting late
#: still gets a share (each piece costs a few microseconds of dispatch under the GIL).
PIECES = 16


def supports(nd, config) -> bool:
    """Images and volumes with any per-axis window, blur and spacing."""
    return nd in (2, 3)


def _run(kernel, *args):
    """Run a kernel on ``CUCRF_NUM_THREADS`` threads: its pieces, taken by cucrf's threads as they
    come free (:func:`cucrf._parallel.for_pieces`), or the whole call on one thread."""
    threads = _parallel.num_threads()
    if threads == 1:
        kernel(*args, 0, 1)
    else:
        pieces = min(PIECES, 2 * threads)
        _parallel.for_pieces(pieces, lambda piece: kernel(*args, piece, pieces))


def known_finite(a) -> bool:
    """Whether ``a`` is an output of :func:`update` that found every value it stored finite (then
    the output needs no scan of its own). Answers once per array."""
    return _finite.pop(id(a), None) is a


def extremes(a):
    """(minimum, maximum) of a C-contiguous float32 or float64 array of finite values, in one
    threaded pass; None for any other array, or one holding a NaN or an infinity (see
    :func:`cucrf._validation.extremes`), and while the kernels of its dtype are not compiled yet
    (a float64 unary computed in float32 would compile the float64 kernels for its scan alone)."""
    if (a.dtype not in (np.float32, np.float64) or not a.flags.c_contiguous or not a.size
            or _ready_dtypes.get(a.dtype.str) is not True):
        return None
    out = np.zeros((PIECES, 3))
    out[:, 0], out[:, 1] = np.inf, -np.inf  # pieces a call does not use
    _run(_k.extremes, a.reshape(-1), out)
    if np.isnan(out[:, 2]).any():
        return None
    return float(out[:, 0].min()), float(out[:, 1].max())


def _c(a):
    """C-contiguous and writeable (a read-only array would compile another kernel signature)."""
    if a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, order="C", copy=True)


def _v5(a):
    """(B, C, *spatial) as (B, C, D, H, W): an image gets a depth of 1 (a view)."""
    a = _c(a)
    return a.reshape(a.shape[:2] + (1,) * (5 - a.ndim) + a.shape[2:])


def _new(shape, dtype):
    out = np.empty(shape, dtype=dtype)
    _owned[id(out)] = out
    return out


_ready_lock = threading.RLock()
_ready_dtypes = {}  # dtype.str -> True (compiled and checked) or False (failed: NumPy computes)


def ready(dtype) -> bool:
    """Whether the kernels of ``dtype`` are usable, compiling and checking them on first use.

    A failure gives one :class:`cucrf._fast.FastPathWarning` and NumPy computes that dtype from
    then on (every function below hands it to the reference backend).
    """
    key = np.dtype(dtype).str
    state = _ready_dtypes.get(key)
    if state is None:
        with _ready_lock:
            state = _ready_dtypes.get(key)
            if state is None:
                _ready_dtypes[key] = True  # while warming up, the functions below use the kernels
                try:
                    warm_up((np.dtype(dtype).type,))
                    state = True
                except Exception as exc:  # noqa: BLE001 (any failure to compile or run)
                    state = False
                    from . import _fast

                    _fast.warn_fallback(f"compiling its {np.dtype(dtype).name} kernels failed "
                                        f"({type(exc).__name__}: {exc})")
                _ready_dtypes[key] = state
    return state


# ---------------------------------------------------------------------------------------------
# geometry tables
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Tables:
    """Per-axis tables of pooling, upsampling and its transpose for (D, H, W) at blur (bz, by, bx)."""

    starts: tuple  # 3 int64 arrays (cells + 1): first pixel of each cell, then the end
    cells: tuple  # 3 int64 arrays (pixels): the cell of each pixel
    inv: np.ndarray  # (d, h, w) inverse pixel counts
    lo: tuple
    hi: tuple
    frac: tuple
    t_start: tuple  # transposed taps: first pixel, count and weights per cell
    t_count: tuple
    t_weight: tuple
    coarse: tuple
    trivial: bool  # blur 1 on every axis
    lo_starts: tuple  # 3 int64 arrays (cells + 1): the first pixel whose lower tap is each cell, then the end


def _transpose_taps(g, dtype):
    """Cell ``c`` gathers pixels ``start[c] .. start[c] + count[c] - 1`` with weights ``w[c, p - start[c]]``."""
    lo, hi, frac = g.lo, g.hi, g.frac
    cells = np.arange(g.coarse)
    start = np.minimum(np.searchsorted(lo, cells, "left"), np.searchsorted(hi, cells, "left"))
    end = np.maximum(np.searchsorted(lo, cells, "right"), np.searchsorted(hi, cells, "right"))
    count = np.maximum(end - start, 0)
    weights = np.zeros((g.coarse, max(1, int(count.max()))))
    pixels = np.arange(g.size)
    np.add.at(weights, (lo, pixels - start[lo]), 1.0 - frac)
    np.add.at(weights, (hi, pixels - start[hi]), frac)
    return start.astype(np.int64), count.astype(np.int64), weights.astype(dtype)


@functools.lru_cache(maxsize=64)
def _tables(size, blurs, dtype_str) -> _Tables:
    dt = np.dtype(dtype_str)
    size = (1,) * (3 - len(size)) + tuple(size)
    blurs = (1,) * (3 - len(blurs)) + tuple(blurs)
    geoms = [axis_geometry(n, b) for n, b in zip(size, blurs)]
    starts, cells, lo, hi, frac, ts, tc, tw, ls = [], [], [], [], [], [], [], [], []
    for g in geoms:
        # every pixel's upper tap is the cell after its lower one (the last cell's own on the
        # edge): the transposed upsampling of the vjp kernels relies on it
        if not np.array_equal(g.hi, np.minimum(g.lo + 1, g.coarse - 1)):
            raise RuntimeError("upsampling taps of an unexpected form")
        ls.append(np.searchsorted(g.lo, np.arange(g.coarse + 1), "left").astype(np.int64))
        c = np.arange(g.coarse + 1) * g.blur - g.pad
        starts.append(np.clip(c, 0, g.size).astype(np.int64))
        # unsigned: gather indices the kernels need not check for wraparound
        cells.append(((np.arange(g.size) + g.pad) // g.blur).astype(np.uintp))
        lo.append(np.array(g.lo, dtype=np.uintp))
        hi.append(np.array(g.hi, dtype=np.uintp))
        frac.append(np.array(g.frac, dtype=dt))
        s, n, w = _transpose_taps(g, dt)
        ts.append(s)
        tc.append(n)
        tw.append(w)
    inv = np.array(_reference._inverse_counts(geoms, dt), dtype=dt, order="C")
    return _Tables(tuple(starts), tuple(cells), inv, tuple(lo), tuple(hi), tuple(frac), tuple(ts), tuple(tc),
                   tuple(tw), tuple(g.coarse for g in geoms), all(b == 1 for b in blurs), tuple(ls))


@functools.lru_cache(maxsize=16)
def _row_tables(D, H):
    """Cells of one pixel each along D and H (for updates without pooling geometry)."""
    return np.arange(D + 1, dtype=np.int64), np.arange(H + 1, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _dummies(dtype_str):
    dt = np.dtype(dtype_str)
    return dict(a5=np.zeros((1, 1, 1, 1, 1), dt), mat=np.zeros((1, 1), dt), i=np.zeros(1, np.int64),
                u=np.zeros(1, np.uintp), f=np.zeros(1, dt), inv=np.ones((1, 1, 1), dt))


def _message(setup, s, q5, weight, out, upsample=False, xlo=None, xhi=None, xf=None, up=None, scale=None):
    """``out = weight * K_s q5`` on the coarse grid (B, C, d, h, w), by
    :func:`cucrf._numba_kernels.message`; with ``upsample`` each row also upsampled along x into
    ``up``; with ``scale`` (d, h, w) also multiplied by it."""
    kernels = setup.kernels[s]
    if not upsample:
        upsample, xlo, xhi, xf, up = _no_upsampling(setup.dtype)
    scaled = scale is not None
    if not scaled:
        scale = _dummies(setup.dtype.str)["inv"]
    _run(_k.message, kernels.reshape(kernels.shape[:3] + (-1,)), setup.offsets, _c(q5), float(weight), scale, scaled,
         out, upsample, xlo, xhi, xf, up)


def _no_upsampling(dtype):
    """The arguments of :func:`cucrf._numba_kernels.message` that turn its upsampling off."""
    d = _dummies(np.dtype(dtype).str)
    return False, d["u"], d["u"], d["f"], d["a5"]


def _offsets3(filter_size, nd, keep_centre):
    sizes = filter_size if isinstance(filter_size, tuple) else (int(filter_size),) * nd
    offs = np.array(window_offsets(sizes, keep_centre), dtype=np.int64).reshape(-1, nd)
    return np.ascontiguousarray(np.concatenate([np.zeros((len(offs), 3 - nd), np.int64), offs], axis=1))


# ---------------------------------------------------------------------------------------------
# the primitives used by cucrf._meanfield.prepare (pooling and kernels are compiled)
# ---------------------------------------------------------------------------------------------
def pool(x, blur):
    """Average pooling, as :func:`cucrf._numpy_backend.pool` (x itself at blur 1)."""
    blurs = _reference._axes(blur)
    nd = len(blurs)
    if all(b == 1 for b in blurs):
        return x
    lead, size = x.shape[:-nd], x.shape[-nd:]
    tab = _tables(tuple(size), tuple(blurs), x.dtype.str)
    x5 = _c(x).reshape((1, -1) + (1,) * (3 - nd) + tuple(size))
    out = np.empty((1, x5.shape[1]) + tab.coarse, dtype=x.dtype)
    d = _dummies(x.dtype.str)
    _run(_k.pool, x5, d["a5"], d["a5"], 0, *tab.starts, tab.inv, out, d["a5"])
    return out.reshape(tuple(lead) + tab.coarse[3 - nd:])


upsample = _reference.upsample


def pairwise_kernels(positions, features, inv_theta_beta, inv_theta_alpha2, inv_theta_gamma2,
                     filter_size, weights, keep_centre=False):
    """Kernel values of every cell and window offset, as :func:`cucrf._numpy_backend.pairwise_kernels`."""
    B, F = features.shape[:2]
    spatial = tuple(features.shape[2:])
    nd = len(spatial)
    dt = features.dtype
    scaled = features * inv_theta_beta.astype(dt).reshape((1, F) + (1,) * nd)
    offsets = _offsets3(filter_size, nd, keep_centre)
    out = np.zeros((len(weights), B, len(offsets)) + spatial, dtype=dt)
    pos = [np.zeros(1)] * (3 - nd) + [np.ascontiguousarray(p, dtype=np.float64) for p in positions]
    out6 = out.reshape(out.shape[:3] + (1,) * (3 - nd) + spatial)
    _run(_k.pairwise_kernels, _v5(scaled), pos[0], pos[1], pos[2], offsets, float(inv_theta_alpha2),
         float(inv_theta_gamma2), np.array(weights, dtype=np.float64).reshape(-1, 2), out6)
    return out


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FastSetup:
    """What message passing needs (see :class:`cucrf._meanfield.PairwiseSetup`, kept as ``reference``).

    ``kernels`` holds one (B, K, d, h, w) array per kernel, ``normalisers`` (B, 1, D, H, W) ones
    or None, ``weights`` the weight of each kernel's message; ``pending`` the pooled ``Q`` the
    last update made for the next message (a weak reference to that ``Q`` and the pooled arrays).
    """

    reference: _meanfield.PairwiseSetup
    kernels: tuple
    offsets: np.ndarray
    normalisers: Optional[tuple]
    weights: tuple
    tables: _Tables
    size: tuple
    nd: int
    dtype: np.dtype
    pending: Optional[tuple] = None

    @property
    def separate(self):
        return self.normalisers is not None

    def natural(self, a5):
        """A (B, C, D, H, W) or (B, C, d, h, w) array in the caller's shape (drop the depth of images)."""
        return a5.reshape(a5.shape[:2] + a5.shape[5 - self.nd:]) if self.nd < 3 else a5


@dataclasses.dataclass
class CoarseMessage:
    """The message of one iteration on the coarse grid: ``m`` (one (B, C, d, h, w) per kernel).

    ``m`` None: not made yet (inference on an image with one merged kernel): the update that
    reads it makes it too, in one kernel call (:func:`cucrf._numba_kernels.iterate`), and keeps
    it here when a tape keeps the message; else :func:`_make_message` makes it first.
    ``pooled``: the coarse message inputs ``Pool(n_s Q)`` (5-D), kept for the backward pass;
    ``source``: the ``Q`` they came from.
    """

    setup: FastSetup
    m: Optional[tuple]
    pooled: tuple
    source: object
    #: ``m`` upsampled along x (B, C, d, h, W) by the message kernel, until the update uses it
    upsampled: Optional[tuple] = None
    #: ``-compat @ m`` (merged, with a compatibility matrix), once the update has made it
    phi: object = None


@dataclasses.dataclass
class PooledQ:
    """A ``Q`` that only feeds the next message (and, taped, the backward pass), never written
    at full resolution: kept as its pooled forms ``Pool(n_s Q)`` (5-D) and, where the backward
    pass needs ``Q``, as what makes it again: ``Q = softmax(logits - Phi(message))`` with
    ``compat`` (``message`` None: ``softmax(logits)``, the first softmax, pooled by
    :func:`full_message` once the pooling geometry is known). ``full``: ``Q`` itself, where
    something had to make it (blur 1, or the backward pass of symmetric normalisation).
    """

    shape: tuple
    dtype: np.dtype
    pooled: Optional[tuple] = None
    logits: object = None
    message: Optional[CoarseMessage] = None
    compat: object = None
    full: object = None


@dataclasses.dataclass
class MessageGradient:
    """The gradient with respect to a message, kept factored: ``-mu^T grad_logits``; ``coarse``
    holds ``Up^T(n_s grad_logits)`` per kernel (5-D)."""

    grad_logits: object
    compat: object
    coarse: tuple
    msg: CoarseMessage


@dataclasses.dataclass
class LogitsGradient:
    """The gradient with respect to the logits of a merged update, kept only as its transposed
    upsampling ``Up^T(grad_logits)`` (5-D, coarse): all that :func:`compatibility_backward` reads."""

    setup: FastSetup
    coarse: object


@dataclasses.dataclass
class PixelGradient:
    """The gradient with respect to ``Q`` of one message: ``sum_s n_s Pool^T(r_s)`` (``n = 1``
    merged), with coarse ``r`` (5-D), already divided by the cells' pixel counts. With normalisation ``pending`` is True until
    ``sum_c q Pool^T(r_s)`` has been added to the normaliser gradients."""

    setup: FastSetup
    r: tuple
    q: object
    grads: object
    pending: bool = False


def prepare(features, params, config):
    """Pooled features, kernels and normalisers (see :func:`cucrf._meanfield.prepare`)."""
    if not ready(features.dtype):
        return _reference.prepare(features, params, config)
    ref = _meanfield.prepare(sys.modules[__name__], features, params, config)
    nd = features.ndim - 2
    dt = features.dtype
    tab = _tables(tuple(features.shape[2:]), tuple(config.blurs(nd)), dt.str)
    kernels = tuple(_c(ref.kernels[s]).reshape(ref.kernels.shape[1:3] + tab.coarse) for s in range(len(ref.weights)))
    normalisers = None if ref.normalisers is None else tuple(_v5(n) for n in ref.normalisers)
    return FastSetup(ref, kernels, _offsets3(config.filter_sizes(nd), nd, config.keep_centre), normalisers,
                     tuple(float(w) for w in ref.weights), tab, tuple(features.shape[2:]), nd, dt)


def _pool_q(setup, q5):
    """``Pool(n_s q)`` per kernel (5-D), ``q`` itself for a merged kernel at blur 1."""
    tab = setup.tables
    if not setup.separate and tab.trivial:
        return (q5,)
    B, C = q5.shape[:2]
    d = _dummies(setup.dtype.str)
    outs = [np.empty((B, C) + tab.coarse, setup.dtype) for _ in range(2 if setup.separate else 1)]
    if setup.separate:
        _run(_k.pool, q5, setup.normalisers[0], setup.normalisers[1], 2, *tab.starts, tab.inv, outs[0], outs[1])
    else:
        _run(_k.pool, q5, d["a5"], d["a5"], 0, *tab.starts, tab.inv, outs[0], d["a5"])
    return tuple(outs)


def full_message(setup: FastSetup, q, config=None):
    """The message of ``q``, on the coarse grid until :func:`update` (a :class:`CoarseMessage`;
    the full-resolution array at blur 1 with symmetric normalisation); for a pooled ``q`` on an
    image with one kernel, not made yet: the update makes it itself."""
    if not isinstance(setup, FastSetup):
        return _reference.full_message(setup, q, config)
    setup.pending, pending = None, setup.pending
    if isinstance(q, PooledQ):
        if q.pooled is None and q.full is None:
            q.pooled = _pooled_softmax(setup, q.logits)
            if q.pooled is None:  # blur 1 without normalisation: the message needs Q itself
                q.full = softmax(q.logits)
        if q.pooled is not None:
            if _one_call_per_iteration(setup):
                return CoarseMessage(setup, None, q.pooled, q)
            return _coarse_message(setup, q.pooled, q)
    q = _materialise(q)  # (the array as the source: inference may write the next Q over it)
    pooled = pending[1] if pending is not None and pending[0]() is q else _pool_q(setup, _v5(q))
    return _coarse_message(setup, pooled, q)


def _one_call_per_iteration(setup):
    """Whether :func:`cucrf._numba_kernels.iterate` serves this setup: images, one (merged)
    kernel, pooling along both axes."""
    tab = setup.tables
    return (setup.nd == 2 and not setup.separate and len(setup.kernels) == 1
            and tab.coarse[1] != setup.size[-2] and tab.coarse[2] != setup.size[-1])


def _coarse_message(setup, pooled, q):
    """The :class:`CoarseMessage` of the pooled ``Q`` (5-D, one per kernel) of ``q``."""
    msg = CoarseMessage(setup, None, tuple(pooled), q)
    _make_message(msg)
    if setup.tables.trivial and setup.separate:
        # Blur 1 with normalisation: the two messages are full-size, so the sum M is formed (as
        # the reference does) and kept instead of both, and no pooled input is kept either.
        (w0, w1), (n0, n1) = setup.weights, setup.normalisers
        full = msg.m[0] * (n0 * setup.dtype.type(w0))
        full += msg.m[1] * (n1 * setup.dtype.type(w1))
        return setup.natural(full)
    return msg


def _make_message(msg, along_x=True):
    """Make ``msg.m`` (and, where the update reads it so and ``along_x``, ``msg.upsampled``) from
    ``msg.pooled``."""
    setup = msg.setup
    B, C = msg.pooled[0].shape[:2]
    tab = setup.tables
    # the update reads the message upsampled along x: made row by row by the message kernel
    # (unless blur 1 along x, or the two messages are summed at full resolution)
    upsample = along_x and tab.coarse[2] != setup.size[-1] and not (tab.trivial and setup.separate)
    d = _dummies(setup.dtype.str)
    ms, ups = [], []
    for s, weight in enumerate(setup.weights):
        m = np.empty((B, C) + tab.coarse, setup.dtype)
        up = np.empty((B, C) + tab.coarse[:2] + (setup.size[-1],), setup.dtype) if upsample else d["a5"]
        _message(setup, s, msg.pooled[s], 1.0, m, upsample, tab.lo[2], tab.hi[2], tab.frac[2], up)
        ms.append(m)
        ups.append(up)
    msg.m = tuple(ms)
    msg.upsampled = tuple(ups) if upsample else None


def _coarse_phi(msg, compat):
    """``-compat @ m`` of a merged message on the coarse grid (5-D), kept in ``msg.phi`` for the
    backward pass, which makes ``Q`` again from it."""
    if msg.phi is None:
        msg.phi = _mix_classes(-np.asarray(compat, dtype=msg.m[0].dtype), msg.m[0])
    return msg.phi


def _mix_classes(mu, x):
    """``mu @ x`` over the class axis of a (B, C, ...) array, compiled (a new C-contiguous array)."""
    B, C = x.shape[:2]
    out = np.empty(x.shape, x.dtype)
    _run(_k.mix_classes, _c(np.asarray(mu, dtype=x.dtype)), _c(x).reshape(B, C, -1), out.reshape(B, C, -1))
    return out


def _taps(tab):
    """Upsampling taps along z and y (x is done first, by :func:`_upsample_x`)."""
    return (tab.lo[0], tab.hi[0], tab.frac[0], tab.lo[1], tab.hi[1], tab.frac[1])


def _upsample_x(setup, m):
    """A coarse (B, C, d, h, w) array upsampled along its last axis: (B, C, d, h, W)."""
    tab = setup.tables
    if m.shape[4] == setup.size[-1]:  # blur 1 along x: already full width
        return m
    out = np.empty(m.shape[:4] + (setup.size[-1],), setup.dtype)
    _run(_k.upsample_x, m, tab.lo[2], tab.hi[2], tab.frac[2], out)
    return out


def update(scaled_unary, msg, compat, return_logits=False, out=None, transient=False):
    """``softmax(a U - Phi)`` (or the logits) in one pass; see :func:`cucrf._numpy_backend.update`.

    ``msg`` is a :class:`CoarseMessage` (or a full-resolution array). With ``out`` the message
    itself (inference without a tape) the result overwrites the message's ``Q`` when this backend
    made it; ``out`` None (a tape keeps every message): a new array. ``transient``: the result
    only feeds the next message (and, taped, the backward pass), so where the update pools it a
    :class:`PooledQ` is returned and ``Q`` is never written (two full-size passes of memory
    traffic less per iteration; the backward pass makes it again, see :func:`softmax_backward`).
    """
    if not ready(scaled_unary.dtype):
        return _reference.update(scaled_unary, msg, compat, return_logits, None if isinstance(out, CoarseMessage) else out)
    su = _c(scaled_unary)
    U5 = _v5(su)
    dt = su.dtype
    d = _dummies(dt.str)
    taped = out is None
    phi = False
    if isinstance(msg, CoarseMessage) and msg.m is None:
        if compat is None and not return_logits:
            return _iterate(U5, su, msg, transient, taped)
        _make_message(msg, along_x=compat is None or msg.setup.separate)
    if isinstance(msg, CoarseMessage):
        setup = msg.setup
        tab = setup.tables
        trivial_merged = tab.trivial and not setup.separate
        mode = 3 if trivial_merged else (2 if setup.separate else 1)
        ups, msg.upsampled = msg.upsampled, None  # used once: a tape keeps only the coarse m
        if compat is not None and mode == 1:
            # -Phi = -compat @ Up(m) = Up(-compat @ m): the class product on the coarse grid
            phi = True
            m0 = _upsample_x(setup, _coarse_phi(msg, compat))
        else:
            m0 = msg.m[0] if trivial_merged else (ups[0] if ups else _upsample_x(setup, msg.m[0]))
        m1 = (ups[1] if ups else _upsample_x(setup, msg.m[1])) if setup.separate else d["a5"]
        n0, n1 = setup.normalisers if setup.separate else (d["a5"], d["a5"])
        w0, w1 = (setup.weights + (0.0,))[:2]
        taps = _taps(tab) if not trivial_merged else (d["u"], d["u"], d["f"]) * 2
        # At blur 1 the pooled maps are full-size products: not made ahead, nor kept.
        pool_mode = 0 if return_logits or tab.trivial else (2 if setup.separate else 1)
        zs, ys, xs, inv = tab.starts[0], tab.starts[1], tab.starts[2], tab.inv
    else:
        setup = None
        m0, m1, n0, n1, w0, w1, mode = _v5(msg.astype(dt, copy=False)), d["a5"], d["a5"], d["a5"], 1.0, 1.0, 3
        taps = (d["u"], d["u"], d["f"]) * 2
        pool_mode = 0
        zs, ys = _row_tables(U5.shape[2], U5.shape[3])
        xs, inv = d["i"], d["inv"]
    B, C = U5.shape[:2]
    # A taped Q of two kernels is written: the backward pass of normalisation reads it often.
    store = not (transient and pool_mode) or (taped and pool_mode == 2)
    target = None
    if not store:
        target = d["a5"]
    elif isinstance(out, CoarseMessage):
        src = out.source
        if (_owned.get(id(src)) is src and src.shape == su.shape and src.dtype == dt and src.flags.c_contiguous
                and src is not su):
            target = src
    if target is None:
        target = _new(su.shape, dt)
    if pool_mode:
        p0 = np.empty((B, C) + tab.coarse, dt)
        p1 = np.empty((B, C) + tab.coarse, dt) if pool_mode == 2 else d["a5"]
    else:
        p0 = p1 = d["a5"]
    use_compat = compat is not None and not phi
    c = _c(np.asarray(compat, dtype=dt)) if use_compat else d["mat"]
    checks = np.zeros(PIECES, dt)
    _run(_k.update, U5, m0, m1, n0, n1, mode, float(w0), float(w1), c, use_compat, phi, bool(return_logits), *taps,
         pool_mode, zs, ys, xs, inv, p0, p1, store, _v5(target), checks)
    if store and not np.isnan(checks).any():
        _finite[id(target)] = target
    pooled = (p0, p1) if pool_mode == 2 else (p0,)
    if not store:
        if taped:
            return PooledQ(su.shape, dt, pooled=pooled, logits=su, message=msg, compat=compat)
        return PooledQ(su.shape, dt, pooled=pooled)
    if pool_mode:
        setup.pending = (weakref.ref(target), pooled)
        if taped and not return_logits:
            _keep_taped_output(target, setup)
    return target


def _iterate(U5, su, msg, transient, taped):
    """The message of ``msg`` and the Potts update it feeds, in one kernel call (see
    :func:`update`, which this returns what it would); ``taped``: the message is kept in ``msg.m``."""
    setup = msg.setup
    tab = setup.tables
    dt = su.dtype
    d = _dummies(dt.str)
    B, C = U5.shape[:2]
    p0 = np.empty((B, C) + tab.coarse, dt)
    m = np.empty((B, C) + tab.coarse, dt) if taped else d["a5"]
    store = not transient
    target = _new(su.shape, dt) if store else d["a5"]
    checks = np.zeros(PIECES, dt)
    kernels = setup.kernels[0]
    _run(_k.iterate, kernels.reshape(kernels.shape[:3] + (-1,)), setup.offsets, _c(msg.pooled[0]), U5,
         tab.lo[2], tab.hi[2], tab.frac[2], tab.lo[1], tab.hi[1], tab.frac[1], tab.starts[1], tab.starts[2], tab.inv,
         p0, store, _v5(target), checks, taped, m)
    if taped:
        msg.m = (m,)
    if not store:
        if taped:
            return PooledQ(su.shape, dt, pooled=(p0,), logits=su, message=msg)
        return PooledQ(su.shape, dt, pooled=(p0,))
    if not np.isnan(checks).any():
        _finite[id(target)] = target
    setup.pending = (weakref.ref(target), (p0,))
    if taped:
        _keep_taped_output(target, setup)
    return target


def _keep_taped_output(target, setup):
    """Remember ``target``, the output of a taped iteration on an image with one merged kernel and
    pooling, so that the softmax's vjp at it also makes its transposed upsampling
    (:func:`softmax_backward`), which :func:`compatibility_backward` reads next. Every backward
    pass at it (and every thread's) then takes that same path: the same bits each time."""
    if setup.nd == 2 and not setup.separate and not setup.tables.trivial:
        _remember(_taped_outputs, target, weakref.ref(setup))


def _remember(table, array, *values):
    """``table[id(array)] = (weak array, *values)``, the entry removed when ``array`` is freed."""
    key = id(array)
    table[key] = (weakref.ref(array, lambda _, key=key: table.pop(key, None)),) + values


def _materialise(q):
    """``Q`` as an array: ``q`` itself, or a :class:`PooledQ` made again (and kept in ``q.full``)."""
    if not isinstance(q, PooledQ):
        return q
    if q.full is None:
        if q.message is None:
            q.full = softmax(q.logits)
        else:
            q.full = update(q.logits, q.message, q.compat)
    return q.full


def softmax(x, transient=False):
    """Softmax over axis 1, in one pass per row.

    ``transient``: the result only feeds the next message; a :class:`PooledQ` is returned and
    the softmax is computed, pooled and never written by :func:`full_message`.
    """
    if not ready(x.dtype):
        return _reference.softmax(x)
    if transient:
        return PooledQ(x.shape, x.dtype, logits=x)
    xc = _c(x)
    x5 = _v5(xc)
    d = _dummies(xc.dtype.str)
    out = _new(xc.shape, xc.dtype)
    zs, ys = _row_tables(x5.shape[2], x5.shape[3])
    checks = np.zeros(PIECES, xc.dtype)
    _run(_k.update, x5, d["a5"], d["a5"], d["a5"], d["a5"], 0, 1.0, 1.0, d["mat"], False, False, False,
         *((d["u"], d["u"], d["f"]) * 2), 0, zs, ys, d["i"], d["inv"], d["a5"], d["a5"], True, _v5(out), checks)
    if not np.isnan(checks).any():
        _finite[id(out)] = out
    return out


def _pooled_softmax(setup, logits):
    """``Pool(n_s softmax(logits))`` per kernel (5-D) in one pass, the softmax never written; None
    where the message needs ``Q`` itself (blur 1 on every axis without normalisation)."""
    tab = setup.tables
    if tab.trivial:
        return None
    x5 = _v5(logits)
    B, C = x5.shape[:2]
    d = _dummies(setup.dtype.str)
    separate = setup.separate
    p0 = np.empty((B, C) + tab.coarse, setup.dtype)
    p1 = np.empty((B, C) + tab.coarse, setup.dtype) if separate else d["a5"]
    n0, n1 = setup.normalisers if separate else (d["a5"], d["a5"])
    _run(_k.update, x5, d["a5"], d["a5"], n0, n1, 0, 1.0, 1.0, d["mat"], False, False, False,
         *((d["u"], d["u"], d["f"]) * 2), 2 if separate else 1, *tab.starts, tab.inv, p0, p1, False, d["a5"],
         np.zeros(PIECES, setup.dtype))
    return (p0, p1) if separate else (p0,)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
def _upsample_backward(setup, x5, scales=None):
    """``Up^T(x n_s)`` per scale (or ``(Up^T(x),)``), coarse 5-D arrays."""
    tab = setup.tables
    ns = 0 if scales is None else len(scales)
    if tab.trivial and ns == 0:
        return (x5,)
    B, C = x5.shape[:2]
    d = _dummies(setup.dtype.str)
    outs = [np.empty((B, C) + tab.coarse, setup.dtype) for _ in range(max(ns, 1))]
    s0 = scales[0] if ns >= 1 else d["a5"]
    s1 = scales[1] if ns == 2 else d["a5"]
    _run(_k.upsample_backward, x5, s0, s1, ns, tab.t_start[0], tab.t_count[0], tab.t_weight[0], tab.t_start[1],
         tab.t_count[1], tab.t_weight[1], tab.t_start[2], tab.t_count[2], tab.t_weight[2], outs[0],
         outs[1] if ns == 2 else d["a5"])
    return tuple(outs)


def _compat_transpose(x, compat):
    """``-mu^T x`` over the class axis (Potts: ``x - sum_c x``)."""
    if compat is None:
        return x - x.sum(axis=1, keepdims=True)
    return _mix_classes(-np.asarray(compat, dtype=x.dtype).T, x)


def _class_products(pairs, weights):
    """``-sum_s w_s sum_{b, i} a_s m_s^T``: (C, C) float64 (products in the compute dtype, sums in
    float64; the reference sums the same products over the pixels instead of the coarse cells)."""
    C = pairs[0][0].shape[1]
    out = np.zeros((C, C))
    for (a, m), weight in zip(pairs, weights):
        B = a.shape[0]
        _run(_k.class_products, _c(a).reshape(B, C, -1), _c(m).reshape(B, C, -1), float(weight), out)
    return out


def softmax_backward(q, grad, into=None):
    """vjp of the softmax given its output ``q``; ``grad`` an array or a lazy :class:`PixelGradient`;
    ``into``: an array the result is also added to, in the same pass."""
    if isinstance(q, PooledQ):
        made_again = _softmax_backward_made_again(q, grad, into)
        if made_again is not None:
            return made_again
        if isinstance(grad, PixelGradient) and grad.pending and grad.q is q:
            grad.q = q = _materialise(q)  # (the normaliser gradient's term reads this Q too)
        else:
            q = _materialise(q)
    if not ready(q.dtype):
        return _reference.softmax_backward(q, grad, into)
    qc = _c(q)
    q5 = _v5(qc)
    dt = qc.dtype
    d = _dummies(dt.str)
    out = np.empty_like(qc)
    if isinstance(grad, PixelGradient):
        setup = grad.setup
        tab = setup.tables
        if setup.separate:
            mode = 2
            r0, r1 = grad.r
            n0, n1 = setup.normalisers
            accumulate = grad.pending and grad.q is q
            if grad.pending and not accumulate:
                _settle(grad)
            if accumulate:
                grad.pending = False
            gn0, gn1 = (_v5(g) for g in _normaliser_gradients(setup, grad.grads, qc)) if accumulate else (d["a5"],) * 2
        else:
            mode, r0, r1, n0, n1, gn0, gn1, accumulate = 1, grad.r[0], d["a5"], d["a5"], d["a5"], d["a5"], d["a5"], False
        _run(_k.softmax_backward, q5, d["a5"], r0, r1, n0, n1, gn0, gn1, mode, bool(accumulate), True,
             *_spread(tab), _v5(out), *_into(into, d))
    else:
        g5 = _v5(np.asarray(grad).astype(dt, copy=False))
        made = _taped_outputs.get(id(q)) if into is None else None
        setup = made[1]() if made is not None and made[0]() is qc else None
        if setup is not None:
            # the last iteration's vjp: its transposed upsampling too, in the same pass
            tab = setup.tables
            B, C = q5.shape[:2]
            below, above = (np.empty((B, C) + tab.coarse, dt) for _ in range(2))
            _run(_k.softmax_backward_reduced, q5, g5, tab.lo_starts[1], tab.frac[1], tab.lo[2], tab.hi[2],
                 tab.frac[2], _v5(out), below, above)
            _remember(_logits_coarse, out, weakref.ref(setup), _rows_transposed(below, above))
            return out
        _run(_k.softmax_backward, q5, g5, d["a5"], d["a5"], d["a5"], d["a5"], d["a5"], d["a5"], 0, False, True,
             d["u"], d["u"], d["i"], _v5(out), *_into(into, d))
    return out


def _spread(tab):
    """The cells the softmax vjp kernels spread a coarse gradient over: each pixel's cell along z
    and y, the first pixel of each cell along x."""
    return tab.cells[0], tab.cells[1], tab.starts[2]


def _into(into, d):
    """The ``add, sums`` arguments of the softmax vjp kernels for ``into`` (an array or None)."""
    if into is None:
        return False, d["a5"]
    if not (into.flags.c_contiguous and into.flags.writeable):
        raise ValueError("into must be a C-contiguous, writeable array")
    return True, _v5(into)


def _softmax_backward_made_again(q: PooledQ, grad, into):
    """The vjp of the softmax at a :class:`PooledQ` whose ``Q`` is made again inside the kernel
    (one merged kernel, or the first softmax; with a merged :class:`PixelGradient`, what
    :func:`full_message_backward` gives); None where ``Q`` has to be made first.

    With ``into`` on an image the result is only read again by :func:`compatibility_backward`,
    for its transposed upsampling: the kernel does that too and a :class:`LogitsGradient` is
    returned instead of the full-resolution array."""
    msg = q.message
    if q.full is not None or (msg is not None and (msg.setup.separate or msg.setup.tables.trivial)):
        return None
    if not isinstance(grad, PixelGradient) or grad.setup.separate:
        return None
    setup = grad.setup
    tab = setup.tables
    dt = q.dtype
    d = _dummies(dt.str)
    U5 = _v5(q.logits)
    B, C = U5.shape[:2]
    # with a compatibility matrix, Q is made from -compat @ m, as the update made it
    m = d["a5"] if msg is None else (msg.m[0] if q.compat is None else _coarse_phi(msg, q.compat))
    reduce = into is not None and setup.nd == 2
    # The first softmax's vjp is the last addition into the unary's gradient (mean_field_backward,
    # which does not read its result): its kernel also tells whether the sums are finite and
    # gives sum(sums * logits); on images it only adds to the sums.
    final = msg is None and into is not None
    if reduce:
        out = d["a5"]
        below, above = (np.empty((B, C) + tab.coarse, dt) if not final else d["a5"] for _ in range(2))
    else:
        out = np.empty(q.shape, dt)
        below = above = d["a5"]
    checks = np.zeros(PIECES, dt)
    dots = np.zeros(_k._chunks(B * U5.shape[2] * tab.coarse[1]) if final else 1)
    _run(_k.softmax_backward_made_again, U5, m, msg is not None,
         tab.lo[0], tab.hi[0], tab.frac[0], tab.lo[1], tab.hi[1], tab.frac[1], tab.lo[2], tab.hi[2], tab.frac[2],
         tab.lo_starts[1], grad.r[0], *_spread(tab), _v5(out), *_into(into, d), reduce, below, above, final,
         checks, dots)
    if final:
        if not np.isnan(checks).any():
            _finite[id(into)] = into
        total = 0.0
        for v in dots:  # in order: the same sum for any number of threads
            total += float(v)
        _remember(_dots, into, weakref.ref(q.logits), total)  # (sum_products reads it right after)
    if not reduce:
        return out
    if final:
        return LogitsGradient(setup, None)  # (not read: see above)
    return LogitsGradient(setup, _rows_transposed(below, above))


def _rows_transposed(below, above):
    """``Up^T`` along y from the split sums of the softmax vjp kernels (``reduce``):
    ``Up^T(out)[l] = below[l] + above[l - 1]``, the last row also getting its own ``above``
    (added into ``below``, which is returned)."""
    below[:, :, :, 1:] += above[:, :, :, :-1]
    below[:, :, :, -1] += above[:, :, :, -1]
    return below


def _normaliser_gradients(setup, grads, q):
    B = q.shape[0]
    for s in range(2):
        if grads.normalisers[s] is None:
            grads.normalisers[s] = np.zeros((B, 1) + tuple(setup.size), dtype=setup.dtype)
    return grads.normalisers


def _settle(grad: PixelGradient):
    """Add the pending ``sum_c q Pool^T(r_s)`` of a normalised :class:`PixelGradient`."""
    if not grad.pending:
        return
    grad.pending = False
    setup = grad.setup
    tab = setup.tables
    d = _dummies(setup.dtype.str)
    grad.q = _materialise(grad.q)
    gn0, gn1 = (_v5(g) for g in _normaliser_gradients(setup, grad.grads, grad.q))
    _run(_k.softmax_backward, _v5(grad.q), d["a5"], grad.r[0], grad.r[1], setup.normalisers[0],
         setup.normalisers[1], gn0, gn1, 2, True, False, *_spread(tab), d["a5"], False, d["a5"])


def sum_products(a, b):
    """``sum(a * b)`` over every element, in float64: compiled, per row (the rows' sums added in
    order, so the result does not depend on the number of threads)."""
    if not ready(a.dtype):
        return _reference.sum_products(a, b)
    known = _dots.pop(id(a), None)
    if known is not None and known[0]() is a and known[1]() is b:
        return known[2]  # summed by the softmax vjp that finished ``a``
    a2 = _c(a).reshape(-1, a.shape[-1])
    b2 = _c(np.asarray(b, dtype=a.dtype)).reshape(a2.shape)
    rows = np.empty(a2.shape[0], np.float64)
    _run(_k.row_dots, a2, b2, rows)
    return float(rows.sum())


def compatibility_backward(grad, msg, compat):
    """vjp of ``logits = a U - mu M``: ``(grad_msg, grad_compat)``, the first lazy for a :class:`CoarseMessage`."""
    known = _logits_coarse.pop(id(grad), None)
    if known is not None and known[0]() is grad and isinstance(msg, CoarseMessage) and msg.setup is known[1]():
        grad = LogitsGradient(msg.setup, known[2])  # made by the softmax's vjp that made grad
    if isinstance(grad, LogitsGradient):
        coarse = (grad.coarse,)
        return MessageGradient(None, compat, coarse, msg), _class_products(list(zip(coarse, msg.m)), msg.setup.weights)
    if not isinstance(msg, CoarseMessage):
        return _reference.compatibility_backward(grad, msg, compat)
    setup = msg.setup
    g5 = _v5(grad.astype(setup.dtype, copy=False))
    coarse = _upsample_backward(setup, g5, setup.normalisers)
    gc = _class_products(list(zip(coarse, msg.m)), setup.weights)
    return MessageGradient(grad, compat, coarse, msg), gc


def full_message_backward(setup: FastSetup, q, grad_msg, config, grads):
    """vjp of :func:`full_message` with respect to ``q``: a lazy :class:`PixelGradient`.

    Records the coarse message gradients and inputs in ``grads`` (see
    :func:`cucrf._meanfield.message_backward`) and, with symmetric normalisation, adds the
    normaliser gradient's own-factor term.
    """
    if not isinstance(setup, FastSetup):
        return _reference.full_message_backward(setup, q, grad_msg, config, grads)
    msg = None
    if isinstance(grad_msg, MessageGradient):
        msg = grad_msg.msg
        coarse = tuple(_compat_transpose(lc, grad_msg.compat) for lc in grad_msg.coarse)
    else:
        grad_msg = _c(np.asarray(grad_msg).astype(setup.dtype, copy=False))
        coarse = _upsample_backward(setup, _v5(grad_msg), setup.normalisers)
    if msg is not None and msg.source is q:
        pooled5 = tuple(_v5(p) for p in msg.pooled)
    elif isinstance(q, PooledQ) and q.pooled is not None:
        pooled5 = q.pooled
    else:
        pooled5 = _pool_q(setup, _v5(_materialise(q)))
    for s in range(len(setup.weights)):
        grads.left[s].append(setup.natural(coarse[s]))
        grads.right[s].append(setup.natural(pooled5[s]))
    def coarse_gradients():
        rs = []
        for s, weight in enumerate(setup.weights):
            r = np.empty(coarse[s].shape, setup.dtype)
            # (with Pool^T's division by the pixel counts, on the coarse grid)
            _message(setup, s, coarse[s], weight, r, scale=setup.tables.inv)
            rs.append(r)
        return tuple(rs)

    if not setup.separate:
        return PixelGradient(setup, coarse_gradients(), q, grads)
    # w_s sum_c grad_msg Up(K_s P_s) per pixel, as sum_c a Up(x_s): with the lazy gradient
    # a = grad_logits and x_s = -w_s mu m_s; else a = grad_msg and x_s = w_s K_s P_s. Formed
    # (and let go) before the gradients r_s, so that at blur 1 the four are not held at once.
    if msg is not None:
        a = _v5(grad_msg.grad_logits.astype(setup.dtype, copy=False))
        xs = []
        for m, weight in zip(msg.m, setup.weights):
            x = _compat_transpose(m, None if grad_msg.compat is None else np.asarray(grad_msg.compat).T)
            xs.append(_c(x * setup.dtype.type(weight)))
    else:
        a = _v5(grad_msg)
        xs = []
        for s, weight in enumerate(setup.weights):
            x = np.empty(pooled5[s].shape, setup.dtype)
            _message(setup, s, pooled5[s], weight, x)
            xs.append(x)
    gn0, gn1 = (_v5(g) for g in _normaliser_gradients(setup, grads, q))
    _run(_k.upsampled_dot, a, _upsample_x(setup, xs[0]), _upsample_x(setup, xs[1]), *_taps(setup.tables), gn0, gn1)
    del xs, a
    lazy = PixelGradient(setup, coarse_gradients(), q, grads, pending=True)
    # Only the unsettled ones are kept (settled ones would hold on to their r_s).
    grads.fast_pending = [p for p in getattr(grads, "fast_pending", ()) if p.pending] + [lazy]
    return lazy


upsample_backward = _reference.upsample_backward


def pool_backward(grad, blur, size):
    """The vjp of :func:`pool`, as :func:`cucrf._numpy_backend.pool_backward` (bit for bit): each
    pixel gets its cell's gradient divided by the cell's pixel count."""
    blurs = _reference._axes(blur, size)
    nd = len(blurs)
    if not ready(grad.dtype) or all(b == 1 for b in blurs):
        return _reference.pool_backward(grad, blur, size)
    tab = _tables(tuple(size), tuple(blurs), grad.dtype.str)
    lead = grad.shape[:-nd]
    r = _c(grad).reshape((1, -1) + tab.coarse) * tab.inv
    out = np.empty((1, r.shape[1]) + (1,) * (3 - nd) + tuple(size), dtype=grad.dtype)
    _run(_k.pool_transpose, r, *_spread(tab), out)
    return out.reshape(tuple(lead) + tuple(size))


def pairwise_kernels_backward(positions, features, inv_theta_beta, inv_theta_alpha2, inv_theta_gamma2,
                              filter_size, weights, keep_centre, left, right, scales, row_grads=None):
    """The vjp of :func:`pairwise_kernels`, as :func:`cucrf._numpy_backend.pairwise_kernels_backward`.

    The pair products ``A[s, b, o, i] = sum_c left[s][b, c, i] * right[s][b, c, i + offset_o]``
    are made first (one (B, K, *coarse) array per kernel, as large as the forward pass's kernel
    stack); then every cell gathers its own feature gradient; parameter sums are float64 partial
    sums over fixed pieces of rows, added in order (the same for any number of threads).
    """
    B, F = features.shape[:2]
    spatial = tuple(features.shape[2:])
    nd = len(spatial)
    dt = features.dtype
    S = len(weights)
    offsets = _offsets3(filter_size, nd, keep_centre)
    ib = np.ascontiguousarray(inv_theta_beta, dtype=dt)
    scaled = _c(features * ib.reshape((1, F) + (1,) * nd))
    f5 = _v5(features)
    s5 = _v5(scaled)
    coarse = s5.shape[2:]
    pairs = []
    for s in range(S):
        if left[s] is None:  # a kernel without message gradients
            a = np.zeros((B, len(offsets)) + coarse, dt)
        else:  # summed over the iterations' arrays (not stacked: no copy of them all)
            a = np.empty((B, len(offsets)) + coarse, dt)
            ls = left[s] if isinstance(left[s], list) else [left[s]]
            rs = right[s] if isinstance(right[s], list) else [right[s]]
            for t, (lt, rt) in enumerate(zip(ls, rs)):
                _run(_k.pair_products, offsets, _v5(lt), _v5(rt), t > 0, a)
        pairs.append(a)
    pairs += [pairs[0]] * (2 - S)
    has_rows = row_grads is not None and any(r is not None for r in row_grads)
    rows = np.zeros((S, B, 1) + coarse, dt) if has_rows else np.zeros((S, 1, 1, 1, 1, 1), dt)
    if has_rows:
        for s in range(S):
            if row_grads[s] is not None:
                rows[s] = _v5(row_grads[s])
    pos = [np.zeros(1)] * (3 - nd) + [np.ascontiguousarray(p, dtype=np.float64) for p in positions]
    g_feat = np.empty_like(f5)
    pieces = max(1, min(B * coarse[0] * coarse[1], 64))
    partial = np.empty((pieces, 3 * S + 2 + F))
    _run(_k.kernel_gradients, s5, f5, ib, ib * ib, np.asarray(inv_theta_beta, dtype=np.float64), pos[0], pos[1],
         pos[2], offsets, float(inv_theta_alpha2), float(inv_theta_gamma2),
         np.array(weights, dtype=np.float64).reshape(-1, 2), np.array(scales, dtype=np.float64), pairs[0], pairs[1],
         rows, bool(has_rows), g_feat, partial)
    sums = np.zeros(partial.shape[1])
    for row in partial:  # in order: the same sums for any number of threads
        sums += row
    return {"features": g_feat.reshape(features.shape), "inv_theta_beta": sums[3 * S + 2:],
            "inv_theta_alpha2": float(sums[3 * S]), "inv_theta_gamma2": float(sums[3 * S + 1]),
            "weights": sums[S:3 * S].reshape(S, 2), "pair_dot": sums[:S]}


def prepare_backward(setup: FastSetup, features, params, config, grads):
    """Gradient with respect to the features and kernel parameters (see :func:`cucrf._meanfield.prepare_backward`)."""
    if not isinstance(setup, FastSetup):
        return _reference.prepare_backward(setup, features, params, config, grads)
    pending, grads.fast_pending = getattr(grads, "fast_pending", ()), []
    for lazy in pending:
        _settle(lazy)
    del pending
    return _meanfield.prepare_backward(sys.modules[__name__], setup.reference, features, params, config, grads)


# ---------------------------------------------------------------------------------------------
# the training loss
# ---------------------------------------------------------------------------------------------
def tempered_cross_entropy(logits, labels, log_temperature, class_weights=None, ignore_index=255):
    """:func:`cucrf._learning.objective.tempered_cross_entropy` in one compiled pass; None where
    the NumPy code should compute it (a dtype whose kernels are not compiled and checked, a label
    outside ``0 .. C - 1`` that is not ``ignore_index``: NumPy's own error then)."""
    if logits.dtype not in (np.float32, np.float64) or _ready_dtypes.get(logits.dtype.str) is not True:
        return None
    dt = logits.dtype
    B, C = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    lab = np.asarray(labels)
    if lab.shape != (B,) + spatial or lab.dtype.kind not in "iu" or len(spatial) not in (2, 3):
        return None
    lab = np.ascontiguousarray(lab, dtype=np.int64).reshape((B,) + (1,) * (3 - len(spatial)) + spatial)
    valid = lab != ignore_index
    counted = lab[valid]
    if counted.size and (counted.min() < 0 or counted.max() >= C):
        return None
    if class_weights is None:
        weights, total = _dummies(dt.str)["f"], float(counted.size)
    else:
        weights = np.ascontiguousarray(class_weights, dtype=dt)
        total = float(np.sum(weights[counted], dtype=np.float64))
    tau = float(np.exp(log_temperature))
    if total <= 0:
        return float("nan"), np.zeros_like(logits), 0.0, 0.0
    grad = np.empty(logits.shape, dt)
    partial = np.zeros((max(1, min(B * lab.shape[1] * lab.shape[2], 64)), 2))
    _run(_k.tempered_cross_entropy, _v5(logits), lab, weights, class_weights is not None, int(ignore_index),
         dt.type(1.0 / tau), dt.type(1.0 / (total * tau)), _v5(grad), partial)
    sums = np.zeros(2)
    for row in partial:  # in order: the same sums for any number of threads
        sums += row
    return -float(sums[0]) / total, grad, -float(sums[1]) / total, total


# ---------------------------------------------------------------------------------------------
# first use# ---------------------------------------------------------------------------------------------
# first use
# ---------------------------------------------------------------------------------------------
def warm_up(dtypes=(np.float32,)):
    """Compile (or load from the cache) every kernel for ``dtypes`` on tiny problems.

    Raises whatever compiling or running raised; checks the result against the NumPy backend.
    Only float32 by default (most work, and half the first compilation); float64 kernels are
    compiled on their first use.
    """
    from ._params import CRFParams

    module = sys.modules[__name__]
    rng = np.random.default_rng(0)
    for dt in dtypes:
        for normalization, compat in ((None, "potts"), ("symmetric", np.full((3, 3), 0.5))):
            unary = rng.normal(size=(1, 3, 5, 6)).astype(dt)
            features = rng.uniform(0, 10, size=(1, 2, 5, 6)).astype(dt)
            params = CRFParams(theta_beta=5.0, compatibility=compat)
            config = _meanfield.CRFConfig(3, 2, 2, normalization)
            got = _meanfield.mean_field(module, unary, features, params, config)
            want = _meanfield.mean_field(_reference, unary, features, params, config)
            if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                raise RuntimeError("the compiled kernels disagree with the NumPy backend on a test problem")
            tape = _meanfield.Tape()
            _meanfield.mean_field(module, unary, features, params, config, return_logits=True, tape=tape)
            _meanfield.mean_field_backward(module, tape, np.ones_like(unary))
            if isinstance(compat, str):  # (the last iteration's vjp on probabilities has a kernel of its own)
                tape = _meanfield.Tape()
                _meanfield.mean_field(module, unary, features, params, config, tape=tape)
                _meanfield.mean_field_backward(module, tape, np.ones_like(unary))
            softmax(unary)
            if extremes(unary) != (float(unary.min()), float(unary.max())):
                raise RuntimeError("the compiled scan of extremes disagrees with NumPy on a test array")
