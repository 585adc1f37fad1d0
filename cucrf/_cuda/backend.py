"""The GPU backend, written once over an array namespace and a kernel-module loader.

``make_backend(cupy, cupy_loader)`` is the CuPy backend (:mod:`cucrf._cupy_backend`);
``make_backend(numpy, emulated_loader)`` runs the very same launch code (grid and block sizes,
argument types, shared-memory sizes) on the CPU emulator of :mod:`cucrf.testing.emulator`.

A *loader* is ``load_module(file_name, options, name_expressions) -> module`` where
``module.get_function(name)`` returns a callable ``fn(grid, block, args, shared_mem=0)``, as
``cupy.RawModule`` does; the loader owns compilation and caching (per device for CuPy).

Per mean-field iteration the backend launches (merged kernel, no normalisation):

1. ``crf_pool``: Q (B, C, H, W) -> Pool(Q) (B, C, h, w)  (skipped when blur == 1);
2. ``crf_message``: coarse message, kernel values computed on the fly;
3. ``crf_update``: bilinear upsampling + compatibility + unary + softmax, written to a new Q.

With symmetric normalisation step 1 produces Pool(n_a Q) and Pool(n_s Q) in one pass and step 2
both kernels' messages in one pass.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

from .. import _cuda
from .._geometry import axis_geometry

__all__ = ["make_backend", "CudaBackend", "CudaSetup", "CoarseMessage"]

#: Same constant as cucrf._meanfield.NORM_EPS (kept here to avoid an import cycle).
_NORM_EPS = 1e-20


@dataclasses.dataclass
class CudaSetup:
    """What the kernels need for message passing, computed once per batch by ``prepare``.

    Attributes
    ----------
    features : array (B, F, h, w)
        Pooled features times ``1 / theta_beta`` per channel.
    ay, ax, sy, sx : arrays (h, k), (w, k)
        Per-axis spatial factors of the appearance exponent and of the smoothness kernel
        between a cell and the cell ``j - r`` rows (columns) away.
    yidx, yfrac, xidx, xfrac : arrays (2, H), (H,), (2, W), (W,)
        Bilinear upsampling taps (lo row then hi row, weight of hi).
    normalisers : (n_a, n_s) arrays (B, 1, H, W), or None
    weights : (w_a, w_s)
    """

    features: object
    ay: object
    ax: object
    sy: object
    sx: object
    yidx: object
    yfrac: object
    xidx: object
    xfrac: object
    normalisers: Optional[tuple]
    weights: Tuple[float, float]
    size: Tuple[int, int]
    coarse: Tuple[int, int]
    pads: Tuple[int, int]
    blur: int
    radius: int
    keep_centre: bool
    dtype: np.dtype

    @property
    def separate(self) -> bool:
        """True when appearance and smoothness are normalised (and passed) separately."""
        return self.normalisers is not None


@dataclasses.dataclass
class CoarseMessage:
    """The message of one iteration before upsampling: ``m0`` (and ``m1``), (B, C, h, w)."""

    setup: CudaSetup
    m0: object
    m1: object = None


def _axis_tables(centres, radius, inv_theta_alpha2, inv_theta_gamma2, dtype):
    """(a, s) tables of shape (n, 2r + 1) for cells with centre coordinates ``centres``."""
    n = centres.shape[0]
    k = 2 * radius + 1
    j = np.arange(-radius, radius + 1)
    idx = np.arange(n)[:, None] + j[None, :]
    valid = (idx >= 0) & (idx < n)
    d = np.where(valid, centres[np.clip(idx, 0, n - 1)] - centres[:, None], 0.0)
    d2 = d * d
    a = np.where(valid, d2 * inv_theta_alpha2, 0.0).astype(dtype)
    s = np.where(valid, np.exp(-0.5 * d2 * inv_theta_gamma2), 0.0).astype(dtype)
    assert a.shape == (n, k)
    return a, s


def _upsample_taps(geometry, dtype):
    idx = np.stack([geometry.lo, geometry.hi]).astype(np.int32)
    return idx, geometry.frac.astype(dtype)


class CudaBackend:
    """Mean-field primitives on hand-written CUDA kernels (see the module docstring)."""

    def __init__(self, xp, load_module, name="cuda", memory_info=None):
        self.xp = xp
        self.name = name
        self._load_module = load_module
        self._memory_info = memory_info

    # -- plumbing ---------------------------------------------------------------------------
    def _function(self, file_name, name_expression):
        module = self._load_module(file_name, _cuda.COMPILE_OPTIONS, (name_expression,))
        return module.get_function(name_expression)

    def _dev(self, host_array, dtype=None):
        """A fresh, writeable, C-contiguous device copy of a host array."""
        return self.xp.array(np.ascontiguousarray(host_array, dtype=dtype), copy=True)

    def _dummy(self, dtype):
        return self.xp.zeros(1, dtype=dtype)

    def _contiguous(self, a):
        return a if a.flags.c_contiguous else self.xp.ascontiguousarray(a)

    @staticmethod
    def _grid_1d(total):
        return (max(1, min(-(-int(total) // _cuda.BLOCK_1D), 1 << 20)),), (_cuda.BLOCK_1D,)

    def available_memory_bytes(self):
        """Free device memory (plus memory held free by the array pool), or None if unknown."""
        return None if self._memory_info is None else self._memory_info()

    # -- primitives ---------------------------------------------------------------------------
    def pool(self, x, blur, scale0=None, scale1=None):
        """Blur pooling of (B, C, H, W): ``Pool(x)``, or ``(Pool(x * s0), Pool(x * s1))``.

        ``scale0``, ``scale1`` are (B, 1, H, W). With ``blur == 1`` and no scales, ``x`` itself.
        """
        scaled = scale0 is not None
        if blur == 1 and not scaled:
            return x
        x = self._contiguous(x)
        B, C, H, W = x.shape
        gy, gx = axis_geometry(H, blur), axis_geometry(W, blur)
        h, w = gy.coarse, gx.coarse
        dt = x.dtype
        o0 = self.xp.empty((B, C, h, w), dtype=dt)
        o1 = self.xp.empty((B, C, h, w), dtype=dt) if scaled else self._dummy(dt)
        s0 = self._contiguous(scale0) if scaled else self._dummy(dt)
        s1 = self._contiguous(scale1) if scaled else self._dummy(dt)
        grid, block = self._grid_1d(B * C * h * w)
        i32 = np.int32
        self._function("pool.cu", _cuda.pool_spec(dt, scaled))(
            grid, block,
            (x, s0, s1, o0, o1, i32(B), i32(C), i32(H), i32(W), i32(h), i32(w), i32(blur),
             i32(gy.pad), i32(gx.pad)),
        )
        return (o0, o1) if scaled else o0

    def coarse_message(self, setup: CudaSetup, q0, q1=None):
        """Message on the coarse grid: ``K q0`` (merged), or ``(K_a q0, K_s q1)`` (separate)."""
        xp = self.xp
        separate = q1 is not None
        q0 = self._contiguous(q0)
        B, C, h, w = q0.shape
        F = setup.features.shape[1]
        dt = setup.dtype
        name, nf, chunk = _cuda.message_spec(dt, F, C, separate, num_cells=B * h * w)
        block, smem = _cuda.message_launch(h, w, setup.radius, F, dt.itemsize)
        nchunks = -(-C // chunk)
        grid = (-(-w // block[0]), -(-h // block[1]), min(B * nchunks, 65535))
        m0 = xp.empty_like(q0)
        m1 = xp.empty_like(q0) if separate else self._dummy(dt)
        q1 = self._contiguous(q1) if separate else self._dummy(dt)
        wa, ws = (1.0, 1.0) if separate else setup.weights
        i32, T = np.int32, dt.type
        self._function("message.cu", name)(
            grid, block,
            (setup.features, setup.ay, setup.ax, setup.sy, setup.sx, q0, q1, m0, m1,
             i32(B), i32(C), i32(F), i32(h), i32(w), i32(setup.radius), i32(setup.keep_centre),
             i32(nchunks), T(wa), T(ws)),
            shared_mem=smem,
        )
        return (m0, m1) if separate else m0

    def _upsample(self, setup: CudaSetup, m0, m1=None, mode=0):
        """Full-resolution (B, C, H, W) from coarse messages; ``mode`` as in ``crf_upsample``."""
        B, C = m0.shape[:2]
        H, W = setup.size
        h, w = setup.coarse
        dt = setup.dtype
        out = self.xp.empty((B, C, H, W), dtype=dt)
        n0, n1 = setup.normalisers if mode == 1 else (self._dummy(dt), self._dummy(dt))
        m1 = m1 if m1 is not None else self._dummy(dt)
        wa, ws = setup.weights
        grid, block = self._grid_1d(B * C * H * W)
        i32, T = np.int32, dt.type
        self._function("update.cu", _cuda.upsample_spec(dt))(
            grid, block,
            (m0, m1, n0, n1, setup.yidx, setup.yfrac, setup.xidx, setup.xfrac, out,
             i32(B), i32(C), i32(H), i32(W), i32(h), i32(w), i32(mode), T(wa), T(ws),
             T(_NORM_EPS)),
        )
        return out

    def materialise(self, msg: CoarseMessage):
        """The full-resolution message ``M`` (B, C, H, W) of :func:`cucrf._meanfield.message`."""
        return self._upsample(msg.setup, msg.m0, msg.m1, mode=1 if msg.setup.separate else 0)

    # -- the interface of cucrf._meanfield.mean_field ------------------------------------------
    def prepare(self, features, params, config) -> CudaSetup:
        """Pool and scale the features, build the per-axis tables and the normalisers."""
        xp = self.xp
        features = self._contiguous(features)
        B, F, H, W = features.shape
        dt = np.dtype(features.dtype)
        _cuda.ctype(dt)
        blur, radius = config.blur, config.filter_size // 2
        gy, gx = axis_geometry(H, blur), axis_geometry(W, blur)
        pooled = self.pool(features, blur)
        scaled = pooled * xp.asarray(1.0 / params.theta_beta_vector(F)).astype(dt)[None, :, None, None]
        ita2, itg2 = 1.0 / params.theta_alpha ** 2, 1.0 / params.theta_gamma ** 2
        ay, sy = _axis_tables(gy.centres, radius, ita2, itg2, dt)
        ax, sx = _axis_tables(gx.centres, radius, ita2, itg2, dt)
        yidx, yfrac = _upsample_taps(gy, dt)
        xidx, xfrac = _upsample_taps(gx, dt)
        normalized = config.normalization == "symmetric"
        setup = CudaSetup(
            features=self._contiguous(scaled), ay=self._dev(ay), ax=self._dev(ax),
            sy=self._dev(sy), sx=self._dev(sx), yidx=self._dev(yidx), yfrac=self._dev(yfrac),
            xidx=self._dev(xidx), xfrac=self._dev(xfrac), normalisers=None,
            weights=(float(params.appearance_weight), float(params.smoothness_weight)),
            size=(H, W), coarse=(gy.coarse, gx.coarse), pads=(gy.pad, gx.pad), blur=blur,
            radius=radius, keep_centre=bool(config.keep_centre), dtype=dt,
        )
        if normalized:
            ones = xp.ones((B, 1, gy.coarse, gx.coarse), dtype=dt)
            ka, ks = self.coarse_message(setup, ones, ones)
            setup.normalisers = (self._upsample(setup, ka, mode=2), self._upsample(setup, ks, mode=2))
        return setup

    def full_message(self, setup: CudaSetup, q, config=None) -> CoarseMessage:
        """The message of ``q`` (B, C, H, W), kept on the coarse grid until :meth:`update`."""
        if setup.separate:
            qa, qs = self.pool(q, setup.blur, *setup.normalisers)
            return CoarseMessage(setup, *self.coarse_message(setup, qa, qs))
        return CoarseMessage(setup, self.coarse_message(setup, self.pool(q, setup.blur)))

    def update(self, scaled_unary, msg, compat, return_logits=False, out=None):
        """``softmax(a U - Phi)`` (or the logits), with ``Phi`` from the message ``msg``.

        ``msg`` is a :class:`CoarseMessage` (upsampling is fused into the update) or a
        full-resolution array ``M`` (B, C, H, W). ``out`` is used when it is a C-contiguous
        array of the right shape and dtype other than the inputs, else a new array is returned.
        """
        xp = self.xp
        su = self._contiguous(scaled_unary)
        B, C, H, W = su.shape
        dt = np.dtype(su.dtype)
        matrix = compat is not None
        if isinstance(msg, CoarseMessage):
            setup = msg.setup
            m0, m1 = msg.m0, msg.m1
            mode = 2 if setup.separate else 1
            blur, (h, w) = setup.blur, setup.coarse
            taps = (setup.yidx, setup.yfrac, setup.xidx, setup.xfrac)
        else:
            setup, m0, m1, mode, blur, h, w = None, self._contiguous(msg), None, 1, 1, H, W
            taps = (xp.zeros(2, np.int32), self._dummy(dt), xp.zeros(2, np.int32), self._dummy(dt))
        name = _cuda.update_spec(dt, C, matrix)
        if name is None:
            full = self.materialise(msg) if setup is not None else m0
            return self._update_unfused(su, full, compat, return_logits)
        if not (out is not None and not isinstance(out, CoarseMessage) and isinstance(out, xp.ndarray)
                and out.shape == su.shape and out.dtype == dt and out.flags.c_contiguous
                and out is not su and out is not msg):
            out = xp.empty_like(su)
        n0, n1 = setup.normalisers if mode == 2 else (self._dummy(dt), self._dummy(dt))
        m1 = m1 if m1 is not None else self._dummy(dt)
        c = self._contiguous(compat.astype(dt, copy=False)) if matrix else self._dummy(dt)
        wa, ws = setup.weights if setup is not None else (1.0, 1.0)
        grid, block = self._grid_1d(B * H * W)
        i32, T = np.int32, dt.type
        self._function("update.cu", name)(
            grid, block,
            (su, m0, m1, n0, n1, c, *taps, out, i32(B), i32(C), i32(H), i32(W), i32(h), i32(w),
             i32(blur), i32(mode), i32(bool(return_logits)), T(wa), T(ws)),
        )
        return out

    def softmax(self, x):
        """Softmax over axis 1 of (B, C, H, W)."""
        xp = self.xp
        x = self._contiguous(x)
        B, C, H, W = x.shape
        dt = np.dtype(x.dtype)
        name = _cuda.update_spec(dt, C, False)
        if name is None:
            return self._softmax_unfused(x)
        out = xp.empty_like(x)
        d, di = self._dummy(dt), xp.zeros(2, np.int32)
        grid, block = self._grid_1d(B * H * W)
        i32, T = np.int32, dt.type
        self._function("update.cu", name)(
            grid, block,
            (x, d, d, d, d, d, di, d, di, d, out, i32(B), i32(C), i32(H), i32(W), i32(H), i32(W),
             i32(1), i32(0), i32(0), T(0), T(0)),
        )
        return out

    # -- beyond the fused kernels' class limit: array operations (same formulas as NumPy) --------
    def _softmax_unfused(self, logits):
        xp = self.xp
        out = logits - logits.max(axis=1, keepdims=True)
        xp.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def _update_unfused(self, su, msg, compat, return_logits):
        xp = self.xp
        if compat is None and not return_logits:
            logits = su + msg
        elif compat is None:
            logits = su + (msg - msg.sum(axis=1, keepdims=True))
        else:
            B, C = msg.shape[:2]
            phi = xp.matmul(compat.astype(msg.dtype), msg.reshape(B, C, -1)).reshape(msg.shape)
            logits = su - phi
        return logits if return_logits else self._softmax_unfused(logits)


def make_backend(xp, load_module, name="cuda", memory_info=None) -> CudaBackend:
    """The CUDA backend over array namespace ``xp`` and kernel loader ``load_module``.

    Parameters
    ----------
    xp : module
        ``cupy`` (device arrays), or ``numpy`` with an emulating loader.
    load_module : callable
        ``load_module(file_name, options, name_expressions)`` returning an object with
        ``get_function(name)`` (``cupy.RawModule`` or ``cucrf.testing.emulator.EmulatedModule``).
    name : str
        Backend name.
    memory_info : callable, optional
        ``memory_info() -> int`` bytes available for the working arrays.
    """
    return CudaBackend(xp, load_module, name=name, memory_info=memory_info)
