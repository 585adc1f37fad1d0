"""The GPU backend, written once over an array namespace and a kernel-module loader.

``make_backend(cupy, cupy_loader)`` is the CuPy backend (:mod:`cucrf._cupy_backend`);
``make_backend(numpy, emulated_loader)`` runs the very same launch code (grid and block sizes,
argument types, shared-memory sizes) on the CPU emulator of :mod:`cucrf.testing.emulator`.

A *loader* is ``load_module(file_name, options, name_expressions) -> module`` where
``module.get_function(name)`` returns a callable ``fn(grid, block, args, shared_mem=0)``, as
``cupy.RawModule`` does; the loader owns compilation and caching (per device for CuPy).

Images (B, C, H, W) and volumes (B, C, D, H, W) run the same kernels, instantiated for 2 or 3
spatial axes (template argument ``ND``); window, blur and pixel spacing are per axis. Every
kernel takes the depth arguments (D = d = 1, blur 1, pad 0 and one-element tables for images).

Per mean-field iteration the backend launches (merged kernel, no normalisation):

1. ``crf_pool``: Q (B, C, *size) -> Pool(Q) (B, C, *coarse)  (skipped when every blur is 1);
2. ``crf_message``: coarse message, kernel values computed on the fly;
3. ``crf_update``: bi/trilinear upsampling + compatibility + unary + softmax, written to a new Q.

With symmetric normalisation step 1 produces Pool(n_a Q) and Pool(n_s Q) in one pass and step 2
both kernels' messages in one pass.

The backward pass (reverse mode through the taped iterations, driven by
:func:`cucrf._meanfield.mean_field_backward`) launches per iteration (merged kernel):

1. ``crf_softmax_backward``: ``gL = Q (g - sum_c Q g)``, with ``g`` the previous step's
   ``Pool^T(r)`` formed on the fly from the coarse ``r`` (never written at full resolution);
2. ``crf_upsample_backward``: ``Lc = Up^T(gL)`` (coarse; ``Up^T(n_s gL)`` for both kernels when
   normalised); the compatibility gradient ``-sum Lc m^T`` and ``G = -mu^T Lc`` are coarse
   array operations;
3. ``crf_message`` on ``G`` (the message operator is its own transpose on the coarse grid):
   ``r = K G``, handed to step 1 of the next (earlier) iteration as a lazy :class:`PixelGradient`.

``prepare_backward`` then runs ``crf_kernel_grad`` once over every iteration's stacked ``G`` and
pooled ``Q`` (parameter and pooled-feature gradients, deterministic block sums) and
``crf_pool_backward`` for the per-pixel features. See docs/kernels.md, "Backward".
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

from .. import _cuda
from .._geometry import axis_geometry, per_axis
from .._meanfield import cell_positions

__all__ = ["make_backend", "CudaBackend", "CudaSetup", "CoarseMessage", "MessageGradient",
           "PixelGradient"]

#: Same constant as cucrf._meanfield.NORM_EPS.
_NORM_EPS = 1e-20


def _three(values, fill):
    """Per-axis values as (z, y, x): images get ``fill`` for the depth axis."""
    values = tuple(values)
    return values if len(values) == 3 else (fill,) + values


@dataclasses.dataclass
class CudaSetup:
    """What the kernels need for message passing, computed once per batch by ``prepare``.

    Per-axis entries are ordered (z, y, x); for images the z entries are one-element
    placeholders the kernels never read.

    Attributes
    ----------
    features : array (B, F, *coarse)
        Pooled features times ``1 / theta_beta`` per channel.
    a, s : tuples of 3 arrays (n_axis, 2 r_axis + 1)
        Per-axis spatial factors of the appearance exponent and of the smoothness kernel
        between a cell and the cell ``j - r`` cells away along that axis.
    idx, frac : tuples of 3 arrays (2, N_axis) int32 and (N_axis,)
        Bilinear upsampling taps per axis (lo cell then hi cell, weight of hi).
    normalisers : (n_a, n_s) arrays (B, 1, *size), or None
    weights : (w_a, w_s)
    size, coarse : tuples
        Full-resolution and coarse spatial shapes, (H, W) or (D, H, W).
    pads, blurs, radii : tuples
        Per-axis pooling pad, blur factor and window radius (same order as ``size``).
    positions : list of float64 ndarrays
        Per-axis cell coordinates (mean pixel index times the spacing), for the backward tables.
    """

    features: object
    a: tuple
    s: tuple
    idx: tuple
    frac: tuple
    normalisers: Optional[tuple]
    weights: Tuple[float, float]
    size: tuple
    coarse: tuple
    pads: tuple
    blurs: tuple
    radii: tuple
    keep_centre: bool
    dtype: np.dtype
    positions: list
    #: Device tables of the backward pass, built on first use (see ``CudaBackend._backward_tables``).
    backward_tables: Optional[dict] = None

    @property
    def separate(self) -> bool:
        """True when appearance and smoothness are normalised (and passed) separately."""
        return self.normalisers is not None

    @property
    def nd(self) -> int:
        """Number of spatial axes: 2 (images) or 3 (volumes)."""
        return len(self.size)

    @property
    def identity(self) -> bool:
        """True when every blur is 1 (the coarse grid is the full grid)."""
        return all(b == 1 for b in self.blurs)

    def dims(self):
        """``(D, H, W, d, h, w)`` as int32 kernel arguments (D = d = 1 for images)."""
        return tuple(np.int32(n) for n in _three(self.size, 1) + _three(self.coarse, 1))

    def pooling(self):
        """``(blur_z, blur_y, blur_x, pad_z, pad_y, pad_x)`` as int32 kernel arguments."""
        return tuple(np.int32(n) for n in _three(self.blurs, 1) + _three(self.pads, 0))


@dataclasses.dataclass
class CoarseMessage:
    """The message of one iteration before upsampling: ``m0`` (and ``m1``), (B, C, *coarse).

    ``pooled`` keeps the coarse message inputs ``Pool(n_s Q)`` (what the kernel gradient needs,
    so the backward pass does not pool ``Q`` again) and ``source`` identifies the ``Q`` they came
    from (:func:`_array_key`).
    """

    setup: CudaSetup
    m0: object
    m1: object = None
    pooled: Optional[tuple] = None
    source: Optional[tuple] = None


@dataclasses.dataclass
class MessageGradient:
    """The gradient with respect to a full-resolution message, kept factored (lazy).

    It is ``-mu^T grad_logits`` (Potts: ``grad_logits - sum_c grad_logits``); ``coarse`` holds
    ``Up^T(n_s grad_logits)`` per kernel (``n_s = 1`` when merged), from which the coarse message
    gradient is ``-mu^T`` of it. ``msg`` is the forward message of the same iteration.
    """

    grad_logits: object
    compat: object
    coarse: tuple
    msg: CoarseMessage


@dataclasses.dataclass
class PixelGradient:
    """The gradient with respect to ``Q`` of one message, kept on the coarse grid (lazy).

    Its value is ``Pool^T(r0)`` (merged) or ``n_a Pool^T(r0) + n_s Pool^T(r1)`` (normalised).
    For symmetric normalisation the normaliser gradient still owes ``sum_c q Pool^T(r_s)``, with
    ``q`` the message's input; ``pending`` is True until it has been added (by
    ``softmax_backward`` on that same ``q``, or by ``prepare_backward``).
    """

    setup: CudaSetup
    r0: object
    r1: object
    q: object
    grads: object
    pending: bool = False


def _array_key(a):
    """(address, shape, strides, dtype) of a NumPy or CuPy array: which memory it views."""
    data = a.data
    ptr = data.ptr if hasattr(data, "ptr") else a.__array_interface__["data"][0]
    return (int(ptr), tuple(a.shape), tuple(a.strides), str(a.dtype))


def _axis_tables(positions, radius, inv_theta_alpha2, inv_theta_gamma2, dtype):
    """(a, s) tables of shape (n, 2r + 1) for cells with coordinates ``positions`` along one axis."""
    d2 = _axis_distances(positions, radius, np.float64)
    n = positions.shape[0]
    j = np.arange(-radius, radius + 1)
    idx = np.arange(n)[:, None] + j[None, :]
    valid = (idx >= 0) & (idx < n)
    a = np.where(valid, d2 * inv_theta_alpha2, 0.0).astype(dtype)
    s = np.where(valid, np.exp(-0.5 * d2 * inv_theta_gamma2), 0.0).astype(dtype)
    assert a.shape == (n, 2 * radius + 1)
    return a, s


def _upsample_taps(geometry, dtype):
    idx = np.stack([geometry.lo, geometry.hi]).astype(np.int32)
    return idx, geometry.frac.astype(dtype)


def _axis_distances(positions, radius, dtype):
    """(n, 2r + 1) squared distances between a cell and the cell ``j - r`` away (0 outside)."""
    n = positions.shape[0]
    j = np.arange(-radius, radius + 1)
    idx = np.arange(n)[:, None] + j[None, :]
    valid = (idx >= 0) & (idx < n)
    d = np.where(valid, positions[np.clip(idx, 0, n - 1)] - positions[:, None], 0.0)
    return (d * d).astype(dtype)


def _transpose_taps(geometry, dtype):
    """Gather tables of Up^T along one axis: ``(start, count, weights, L)``.

    Coarse cell ``c`` receives from pixels ``start[c] .. start[c] + count[c] - 1`` with weights
    ``weights[c, p - start[c]]``: the bilinear taps ``(lo, 1 - frac)`` and ``(hi, frac)`` of
    every pixel, transposed (a pixel whose two taps are the same clamped cell gives it 1).
    """
    lo, hi, frac = geometry.lo, geometry.hi, geometry.frac
    cells = np.arange(geometry.coarse)
    start = np.minimum(np.searchsorted(lo, cells, "left"), np.searchsorted(hi, cells, "left"))
    end = np.maximum(np.searchsorted(lo, cells, "right"), np.searchsorted(hi, cells, "right"))
    count = np.maximum(end - start, 0)
    length = max(1, int(count.max()))
    weights = np.zeros((geometry.coarse, length))
    pixels = np.arange(geometry.size)
    np.add.at(weights, (lo, pixels - start[lo]), 1.0 - frac)
    np.add.at(weights, (hi, pixels - start[hi]), frac)
    return start.astype(np.int32), count.astype(np.int32), weights.astype(dtype), length


class CudaBackend:
    """Mean-field primitives on hand-written CUDA kernels (see the module docstring)."""

    def __init__(self, xp, load_module, name="cuda", memory_info=None):
        self.xp = xp
        self.name = name
        self._load_module = load_module
        self._memory_info = memory_info
        self._neg_compat_t = None  # (mu, -mu^T) of the last backward pass

    # -- plumbing ---------------------------------------------------------------------------
    def _function(self, file_name, name_expression):
        module = self._load_module(file_name, _cuda.COMPILE_OPTIONS, (name_expression,))
        return module.get_function(name_expression)

    def _dev(self, host_array, dtype=None):
        """A fresh, writeable, C-contiguous device copy of a host array."""
        return self.xp.array(np.ascontiguousarray(host_array, dtype=dtype), copy=True)

    def _upload(self, arrays, dtype):
        """Device copies of host ``arrays`` (one dtype) in a single transfer: contiguous slices of
        one device array, in order."""
        flat = self._dev(np.concatenate([np.ravel(a) for a in arrays]), dtype=dtype)
        out, offset = [], 0
        for a in arrays:
            out.append(flat[offset:offset + a.size].reshape(a.shape))
            offset += a.size
        return out

    def _dummy(self, dtype):
        return self.xp.zeros(1, dtype=dtype)

    def _contiguous(self, a):
        return a if a.flags.c_contiguous else self.xp.ascontiguousarray(a)

    @staticmethod
    def _grid_1d(total):
        return (max(1, min(-(-int(total) // _cuda.BLOCK_1D), 1 << 20)),), (_cuda.BLOCK_1D,)

    @classmethod
    def _grid_update(cls, batch, pixels, nd):
        """Grid of ``crf_update``: 1-D over ``batch * pixels`` (images), or ``pixels`` along x and the
        batch along y (volumes; see update.cu)."""
        if nd == 2:
            return cls._grid_1d(batch * pixels)
        (gx,), block = cls._grid_1d(pixels)
        return (gx, min(int(batch), _cuda.MAX_GRID_Z)), block

    @staticmethod
    def _check_voxels(shape):
        """Refuse a volume of 2^31 voxels or more per channel (the kernels index within a channel in
        32 bits); images are not limited."""
        if len(shape) == 5 and int(np.prod(shape[2:])) >= 2 ** 31:
            raise ValueError(f"the CUDA backend computes volumes of fewer than 2^31 voxels per channel, got "
                             f"{'x'.join(map(str, shape[2:]))} = {int(np.prod(shape[2:]))}; split the volume or pass "
                             f"device='cpu'")

    #: Kernel values are computed on the fly, never stored (for the memory estimate).
    stores_kernels = False

    @staticmethod
    def supports(nd, config) -> bool:
        """True: images and volumes, per-axis window and blur, any pixel spacing.

        (Windows too large for a block's shared memory are refused when launched, with a
        ValueError naming the filter size.)
        """
        return nd in _cuda.SPATIAL_DIMS

    def available_memory_bytes(self):
        """Free device memory (plus memory held free by the array pool), or None if unknown."""
        return None if self._memory_info is None else self._memory_info()

    # -- primitives ---------------------------------------------------------------------------
    def pool(self, x, blur, scale0=None, scale1=None):
        """Blur pooling of (B, C, *size): ``Pool(x)``, or ``(Pool(x * s0), Pool(x * s1))``.

        ``blur`` is an int (every spatial axis) or one factor per axis; ``scale0``, ``scale1`` are
        (B, 1, *size). With every blur 1 and no scales, ``x`` itself.
        """
        scaled = scale0 is not None
        nd = x.ndim - 2
        self._check_voxels(x.shape)
        blurs = per_axis(blur, nd)
        if all(b == 1 for b in blurs) and not scaled:
            return x
        x = self._contiguous(x)
        B, C = x.shape[:2]
        geometries = [axis_geometry(n, b) for n, b in zip(x.shape[2:], blurs)]
        coarse = tuple(g.coarse for g in geometries)
        dt = x.dtype
        o0 = self.xp.empty((B, C) + coarse, dtype=dt)
        o1 = self.xp.empty((B, C) + coarse, dtype=dt) if scaled else self._dummy(dt)
        s0 = self._contiguous(scale0) if scaled else self._dummy(dt)
        s1 = self._contiguous(scale1) if scaled else self._dummy(dt)
        grid, block = self._grid_1d(o0.size)
        i32 = np.int32
        dims = _three(x.shape[2:], 1) + _three(coarse, 1)
        pooling = _three(blurs, 1) + _three([g.pad for g in geometries], 0)
        self._function("pool.cu", _cuda.pool_spec(dt, scaled, nd))(
            grid, block,
            (x, s0, s1, o0, o1, i32(B), i32(C), *(i32(n) for n in dims + pooling)),
        )
        return (o0, o1) if scaled else o0

    def coarse_message(self, setup: CudaSetup, q0, q1=None, weights=None):
        """Message on the coarse grid: ``K q0`` (merged), or ``(K_a q0, K_s q1)`` (separate).

        ``weights`` (separate only): ``(w0, w1)`` multiplying the two messages (default 1, 1).
        """
        xp = self.xp
        separate = q1 is not None
        q0 = self._contiguous(q0)
        B, C = q0.shape[:2]
        coarse = tuple(q0.shape[2:])
        F = setup.features.shape[1]
        dt = setup.dtype
        name, nf, chunk = _cuda.message_spec(dt, F, C, separate, num_cells=B * int(np.prod(coarse)), nd=setup.nd)
        block, smem = _cuda.message_launch(coarse, setup.radii, F, dt.itemsize)
        nchunks = -(-C // chunk)
        grid = _cuda.tiled_grid(coarse, block, B * nchunks)
        m0 = xp.empty_like(q0)
        m1 = xp.empty_like(q0) if separate else self._dummy(dt)
        q1 = self._contiguous(q1) if separate else self._dummy(dt)
        wa, ws = (weights or (1.0, 1.0)) if separate else setup.weights
        i32, T = np.int32, dt.type
        d, h, w = _three(coarse, 1)
        rz, ry, rx = _three(setup.radii, 0)
        self._function("message.cu", name)(
            grid, block,
            (setup.features, *setup.a, *setup.s, q0, q1, m0, m1,
             i32(B), i32(C), i32(F), i32(h), i32(w), i32(ry), i32(rx), i32(setup.keep_centre), i32(nchunks),
             T(wa), T(ws), i32(d), i32(rz)),
            shared_mem=smem,
        )
        return (m0, m1) if separate else m0

    def _upsample(self, setup: CudaSetup, m0, m1=None, mode=0):
        """Full-resolution (B, C, *size) from coarse messages; ``mode`` as in ``crf_upsample``."""
        B, C = m0.shape[:2]
        dt = setup.dtype
        out = self.xp.empty((B, C) + tuple(setup.size), dtype=dt)
        n0, n1 = setup.normalisers if mode == 1 else (self._dummy(dt), self._dummy(dt))
        m1 = m1 if m1 is not None else self._dummy(dt)
        wa, ws = setup.weights
        grid, block = self._grid_1d(out.size)
        i32, T = np.int32, dt.type
        taps = [t for axis in zip(setup.idx, setup.frac) for t in axis]
        self._function("update.cu", _cuda.upsample_spec(dt, setup.nd))(
            grid, block,
            (m0, m1, n0, n1, *taps, out, i32(B), i32(C), *setup.dims(), i32(mode), T(wa), T(ws),
             T(_NORM_EPS)),
        )
        return out

    def materialise(self, msg: CoarseMessage):
        """The full-resolution message ``M`` (B, C, *size) of :func:`cucrf._meanfield.message`."""
        return self._upsample(msg.setup, msg.m0, msg.m1, mode=1 if msg.setup.separate else 0)

    # -- the interface of cucrf._meanfield.mean_field ------------------------------------------
    def prepare(self, features, params, config) -> CudaSetup:
        """Pool and scale the features, build the per-axis tables and the normalisers."""
        xp = self.xp
        if features.ndim - 2 not in _cuda.SPATIAL_DIMS:
            raise ValueError(f"the CUDA backend computes on (B, F, H, W) or (B, F, D, H, W) features, got shape "
                             f"{tuple(features.shape)}")
        self._check_voxels(features.shape)
        features = self._contiguous(features)
        B, F = features.shape[:2]
        size = tuple(features.shape[2:])
        nd = len(size)
        dt = np.dtype(features.dtype)
        _cuda.ctype(dt)
        blurs = tuple(int(b) for b in config.blurs(nd))
        radii = tuple(int(k) // 2 for k in config.filter_sizes(nd))
        geometries = [axis_geometry(n, b) for n, b in zip(size, blurs)]
        positions = cell_positions(size, config)
        pooled = self.pool(features, blurs)
        scaled = pooled * xp.asarray(1.0 / params.theta_beta_vector(F)).astype(dt).reshape((1, F) + (1,) * nd)
        ita2, itg2 = 1.0 / params.theta_alpha ** 2, 1.0 / params.theta_gamma ** 2
        a, s = zip(*(_axis_tables(p, r, ita2, itg2, dt) for p, r in zip(positions, radii)))
        idx, frac = zip(*(_upsample_taps(g, dt) for g in geometries))
        placeholder = (np.zeros((2, 1), np.int32), np.zeros(1, dt))  # the depth axis of an image
        a, s = _three(a, placeholder[1]), _three(s, placeholder[1])
        idx, frac = _three(idx, placeholder[0]), _three(frac, placeholder[1])
        # Two host-to-device transfers for every table (reals, integers).
        reals = self._upload(a + s + frac, dt)
        idx = tuple(self._upload(idx, np.int32))
        a, s, frac = tuple(reals[0:3]), tuple(reals[3:6]), tuple(reals[6:9])
        normalized = config.normalization == "symmetric"
        setup = CudaSetup(
            features=self._contiguous(scaled), a=a, s=s, idx=idx, frac=frac, normalisers=None,
            weights=(float(params.appearance_weight), float(params.smoothness_weight)),
            size=size, coarse=tuple(g.coarse for g in geometries), pads=tuple(g.pad for g in geometries),
            blurs=blurs, radii=radii, keep_centre=bool(config.keep_centre), dtype=dt, positions=positions,
        )
        if normalized:
            ones = xp.ones((B, 1) + setup.coarse, dtype=dt)
            ka, ks = self.coarse_message(setup, ones, ones)
            setup.normalisers = (self._upsample(setup, ka, mode=2), self._upsample(setup, ks, mode=2))
        return setup

    def full_message(self, setup: CudaSetup, q, config=None) -> CoarseMessage:
        """The message of ``q`` (B, C, *size), kept on the coarse grid until :meth:`update`."""
        # The pooled inputs are kept for the backward pass when they are coarse (blur > 1): at
        # blur 1 they are Q itself or full-size products that inference should not hold on to.
        keep = not setup.identity
        if setup.separate:
            qa, qs = self.pool(q, setup.blurs, *setup.normalisers)
            return CoarseMessage(setup, *self.coarse_message(setup, qa, qs),
                                 pooled=(qa, qs) if keep else None, source=_array_key(q) if keep else None)
        pooled = self.pool(q, setup.blurs)
        return CoarseMessage(setup, self.coarse_message(setup, pooled), pooled=(pooled,) if keep else None,
                             source=_array_key(q) if keep else None)

    def update(self, scaled_unary, msg, compat, return_logits=False, out=None, transient=False):
        """``softmax(a U - Phi)`` (or the logits), with ``Phi`` from the message ``msg``.

        ``msg`` is a :class:`CoarseMessage` (upsampling is fused into the update) or a
        full-resolution array ``M`` (B, C, *size). ``out`` is used when it is a C-contiguous
        array of the right shape and dtype other than the inputs, else a new array is returned.
        ``transient`` (the result only feeds the next message) changes nothing on the GPU.
        """
        xp = self.xp
        self._check_voxels(scaled_unary.shape)
        su = self._contiguous(scaled_unary)
        B, C = su.shape[:2]
        size = tuple(su.shape[2:])
        nd = len(size)
        dt = np.dtype(su.dtype)
        matrix = compat is not None
        if isinstance(msg, CoarseMessage):
            setup = msg.setup
            m0, m1 = msg.m0, msg.m1
            mode = 2 if setup.separate else 1
            same_grid, dims = int(setup.identity), setup.dims()
            taps = [t for axis in zip(setup.idx, setup.frac) for t in axis]
        else:
            setup, m0, m1, mode, same_grid = None, self._contiguous(msg), None, 1, 1
            dims = tuple(np.int32(n) for n in _three(size, 1) * 2)
            taps = [xp.zeros(2, np.int32), self._dummy(dt)] * 3
        name = _cuda.update_spec(dt, C, matrix, nd)
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
        grid, block = self._grid_update(B, su.size // (B * C), nd)
        i32, T = np.int32, dt.type
        D, H, W, d, h, w = dims
        self._function("update.cu", name)(
            grid, block,
            (su, m0, m1, n0, n1, c, *taps, out, D, d, i32(B), i32(C), H, W, h, w, i32(same_grid), i32(mode),
             i32(bool(return_logits)), T(wa), T(ws)),
        )
        return out

    def softmax(self, x, transient=False):
        """Softmax over axis 1 of (B, C, *size); ``transient`` changes nothing on the GPU."""
        xp = self.xp
        self._check_voxels(x.shape)
        x = self._contiguous(x)
        B, C = x.shape[:2]
        size = tuple(x.shape[2:])
        dt = np.dtype(x.dtype)
        name = _cuda.update_spec(dt, C, False, len(size))
        if name is None:
            return self._softmax_unfused(x)
        out = xp.empty_like(x)
        z, zi = self._dummy(dt), xp.zeros(2, np.int32)
        grid, block = self._grid_update(B, x.size // (B * C), len(size))
        i32, T = np.int32, dt.type
        D, H, W = (i32(n) for n in _three(size, 1))
        self._function("update.cu", name)(
            grid, block,
            (x, z, z, z, z, z, zi, z, zi, z, zi, z, out, D, D, i32(B), i32(C), H, W, H, W,
             i32(1), i32(0), i32(0), T(0), T(0)),
        )
        return out

    # -- the backward pass (the interface of cucrf._meanfield.mean_field_backward) --------------
    def _backward_tables(self, setup: CudaSetup) -> dict:
        """Up^T gather tables and squared-distance tables, built once per setup on first use."""
        if setup.backward_tables is None:
            dt = setup.dtype
            geometries = [axis_geometry(n, b) for n, b in zip(setup.size, setup.blurs)]
            taps = [_transpose_taps(g, dt) for g in geometries]
            distances = [_axis_distances(p, r, dt) for p, r in zip(setup.positions, setup.radii)]
            if setup.nd == 2:  # one-element placeholders for the depth axis of an image
                taps.insert(0, (np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros((1, 1), dt), 1))
                distances.insert(0, np.zeros((1, 1), dt))
            names_i = ("zstart", "zcount", "ystart", "ycount", "xstart", "xcount")
            names_r = ("zw", "yw", "xw", "dz2", "dy2", "dx2")
            ints = [a for t in taps for a in t[:2]]
            reals = [t[2] for t in taps] + distances
            # Two host-to-device copies; the tables are contiguous slices of them.
            tables = dict(zip(names_i, self._upload(ints, np.int32)))
            tables.update(zip(names_r, self._upload(reals, dt)))
            setup.backward_tables = dict(tables, lz=taps[0][3], ly=taps[1][3], lx=taps[2][3])
        return setup.backward_tables

    def upsample_backward(self, setup: CudaSetup, x, scales=None):
        """Up^T of a full-resolution (B, C, *size) array: ``(Up^T(x),)`` or ``Up^T(x * s)`` per scale.

        ``scales``: None, or a tuple of one or two (B, 1, *size) per-pixel factors. Returns a tuple
        of coarse (B, C, *coarse) arrays (``x`` itself when every blur is 1 and there are no scales).
        """
        x = self._contiguous(x)
        ns = 0 if scales is None else len(scales)
        if setup.identity and ns == 0:
            return (x,)
        tab = self._backward_tables(setup)
        B, C = x.shape[:2]
        dt = setup.dtype
        outs = [self.xp.empty((B, C) + setup.coarse, dtype=dt) for _ in range(max(ns, 1))]
        s0 = self._contiguous(scales[0]) if ns >= 1 else self._dummy(dt)
        s1 = self._contiguous(scales[1]) if ns == 2 else self._dummy(dt)
        o1 = outs[1] if ns == 2 else self._dummy(dt)
        grid, block = self._grid_1d(outs[0].size)
        i32 = np.int32
        self._function("backward.cu", _cuda.upsample_backward_spec(dt, ns, setup.nd))(
            grid, block,
            (x, s0, s1, tab["zstart"], tab["zcount"], tab["zw"], tab["ystart"], tab["ycount"], tab["yw"],
             tab["xstart"], tab["xcount"], tab["xw"], outs[0], o1, i32(B), i32(C), *setup.dims(),
             i32(tab["lz"]), i32(tab["ly"]), i32(tab["lx"])),
        )
        return tuple(outs)

    def pool_backward(self, setup: CudaSetup, r0, r1=None):
        """Pool^T of coarse (B, C, *coarse): ``Pool^T(r0)``, or ``n_a Pool^T(r0) + n_s Pool^T(r1)``."""
        scaled = r1 is not None
        r0 = self._contiguous(r0)
        if setup.identity and not scaled:
            return r0
        B, C = r0.shape[:2]
        dt = setup.dtype
        out = self.xp.empty((B, C) + tuple(setup.size), dtype=dt)
        n0, n1 = setup.normalisers if scaled else (self._dummy(dt), self._dummy(dt))
        grid, block = self._grid_1d(out.size)
        i32 = np.int32
        self._function("backward.cu", _cuda.pool_backward_spec(dt, scaled, setup.nd))(
            grid, block,
            (r0, self._contiguous(r1) if scaled else self._dummy(dt), n0, n1, out, i32(B), i32(C),
             *setup.dims(), *setup.pooling()),
        )
        return out

    def materialise_gradient(self, grad):
        """The full-resolution array of a lazy :class:`MessageGradient` / :class:`PixelGradient`."""
        if isinstance(grad, PixelGradient):
            return self.pool_backward(grad.setup, grad.r0, grad.r1)
        if isinstance(grad, MessageGradient):
            return self._compat_transpose(grad.grad_logits, grad.compat)
        return grad

    def _compat_transpose(self, x, compat):
        """``-mu^T x`` over the class axis of (B, C, ...) (Potts: ``x - sum_c x``)."""
        xp = self.xp
        if compat is None:
            return x - x.sum(axis=1, keepdims=True)
        B, C = x.shape[:2]
        cached = self._neg_compat_t
        if cached is None or cached[0] is not compat or cached[1].dtype != x.dtype:
            # -mu^T, once per matrix (every iteration of a backward pass uses the same one)
            cached = self._neg_compat_t = (compat, self._contiguous((-compat.astype(x.dtype, copy=False)).T))
        return xp.matmul(cached[1], x.reshape(B, C, -1)).reshape(x.shape)

    def _settle_normaliser_term(self, grad: PixelGradient):
        """Add the pending ``sum_c q Pool^T(r_s)`` of a normalised :class:`PixelGradient`."""
        if not grad.pending:
            return
        grad.pending = False
        gn = self._normaliser_gradients(grad.grads, grad.q)
        for s, r in enumerate((grad.r0, grad.r1)):
            gn[s] += (grad.q * self.pool_backward(grad.setup, r)).sum(axis=1, keepdims=True)

    def _normaliser_gradients(self, grads, q):
        """The in-place accumulators (B, 1, *size) of the normaliser gradients in ``grads``."""
        for s in range(2):
            if grads.normalisers[s] is None:
                grads.normalisers[s] = self.xp.zeros((q.shape[0], 1) + tuple(q.shape[2:]), dtype=q.dtype)
        return grads.normalisers

    def softmax_backward(self, q, grad, into=None):
        """Vector-Jacobian product of the softmax over classes, given its output ``q``.

        ``grad`` is an array (B, C, *size) or a lazy :class:`PixelGradient` (formed on the fly;
        when it is the gradient of this same ``q``'s message its pending normaliser term is added
        in the same pass). With ``into`` (an array of ``q``'s shape) the result is also added to it.
        """
        xp = self.xp
        self._check_voxels(q.shape)
        q = self._contiguous(q)
        B, C = q.shape[:2]
        size = tuple(q.shape[2:])
        dt = np.dtype(q.dtype)
        d = self._dummy(dt)
        out = xp.empty_like(q)
        accumulate = 0
        if isinstance(grad, PixelGradient):
            setup = grad.setup
            g, r0 = d, grad.r0
            if grad.r1 is None:
                mode, r1, n0, n1, gn0, gn1 = 1, d, d, d, d, d
            else:
                mode, r1 = 2, grad.r1
                n0, n1 = setup.normalisers
                if grad.pending and grad.q is q:
                    gn0, gn1 = self._normaliser_gradients(grad.grads, q)
                    accumulate, grad.pending = 1, False
                else:
                    self._settle_normaliser_term(grad)
                    gn0, gn1 = d, d
            dims, pooling = setup.dims(), setup.pooling()
        else:
            mode, g = 0, self._contiguous(grad.astype(dt, copy=False))
            r0 = r1 = n0 = n1 = gn0 = gn1 = d
            dims = tuple(np.int32(n) for n in _three(size, 1) * 2)
            pooling = tuple(np.int32(n) for n in (1, 1, 1, 0, 0, 0))
        grid, block = self._grid_1d(q.size // C)
        i32 = np.int32
        self._function("backward.cu", _cuda.softmax_backward_spec(dt, mode, len(size)))(
            grid, block,
            (q, g, r0, r1, n0, n1, gn0, gn1, out, i32(B), i32(C), *dims, *pooling, i32(accumulate)),
        )
        if into is not None:
            into += out
        return out

    def sum_products(self, a, b):
        """``sum(a * b)`` over every element, summed in float64 (a float)."""
        return float(self.xp.sum(a * b, dtype=self.xp.float64))

    def compatibility_backward(self, grad, msg, compat):
        """Vector-Jacobian product of ``logits = a U - mu M``: ``(grad_msg, grad_compat)``.

        With a :class:`CoarseMessage` ``msg`` (what ``full_message`` returns) ``grad_msg`` is a lazy
        :class:`MessageGradient` and ``grad_compat = -sum_s w_s sum_b Up^T(n_s grad) m_s^T`` is
        formed on the coarse grid, in float64; it is a (C, C) float64 array of ``xp`` (converted
        by ``mean_field_backward`` at the end, so the iterations never wait for the device).
        """
        grad = self._contiguous(grad)
        if not isinstance(msg, CoarseMessage):
            msg = self._contiguous(msg.astype(grad.dtype, copy=False))
            return self._compat_transpose(grad, compat), self._class_products(grad, msg)
        setup = msg.setup
        if setup.separate:
            coarse = self.upsample_backward(setup, grad, setup.normalisers)
            gc = self._class_products(coarse[0], msg.m0, coarse[1], msg.m1, setup.weights)
        else:
            coarse = self.upsample_backward(setup, grad)
            gc = self._class_products(coarse[0], msg.m0)
        return MessageGradient(grad, compat, coarse, msg), gc

    def _class_products(self, a0, m0, a1=None, m1=None, weights=(1.0, 1.0)):
        """``-(w0 sum_{b, i} a0 m0^T + w1 sum_{b, i} a1 m1^T)``: a (C, C) float64 array of ``xp``."""
        B, C = a0.shape[:2]
        n = int(np.prod(a0.shape[2:]))
        two = a1 is not None
        dt = np.dtype(a0.dtype)
        grid, tn, smem = _cuda.class_products_launch(B, C, n, two, dt.itemsize)
        partials = self.xp.empty((grid, C, C), dtype=np.float64)
        self._function("backward.cu", _cuda.class_products_spec(dt))(
            (grid,), (256,),
            (self._contiguous(a0), self._contiguous(m0), self._contiguous(a1) if two else self._dummy(dt),
             self._contiguous(m1) if two else self._dummy(dt), partials, np.int32(B), np.int32(C), np.int64(n),
             np.int32(tn), np.int32(two), np.float64(weights[0]), np.float64(weights[1])),
            shared_mem=smem,
        )
        return partials.sum(axis=0) if grid > 1 else partials[0]

    def full_message_backward(self, setup: CudaSetup, q, grad_msg, config, grads):
        """Vector-Jacobian product of :meth:`full_message` with respect to ``q``.

        Records the coarse message gradients ``G_s`` and inputs ``P_s`` in ``grads`` (a
        :class:`cucrf._meanfield.MessageGradients`), and for symmetric normalisation adds the
        normaliser gradient (in place). Returns a lazy :class:`PixelGradient`.
        """
        xp = self.xp
        q = self._contiguous(q)
        sep = setup.separate
        dt = setup.dtype
        msg = None
        if isinstance(grad_msg, MessageGradient):
            msg = grad_msg.msg
            coarse = tuple(self._compat_transpose(lc, grad_msg.compat) for lc in grad_msg.coarse)
        else:
            grad_msg = self._contiguous(self.materialise_gradient(grad_msg).astype(dt, copy=False))
            coarse = self.upsample_backward(setup, grad_msg, setup.normalisers if sep else None)
        if msg is not None and msg.pooled is not None and msg.source == _array_key(q):
            pooled = msg.pooled
        elif sep:
            pooled = self.pool(q, setup.blurs, *setup.normalisers)
        else:
            pooled = (self.pool(q, setup.blurs),)
        for s in range(len(coarse)):
            grads.left[s].append(coarse[s])
            grads.right[s].append(pooled[s])
        wa, ws = setup.weights
        if not sep:
            r = self.coarse_message(setup, coarse[0])
            return PixelGradient(setup, r, None, q, grads)
        # The normaliser gradient's own-factor term, w_s sum_c grad_msg Up(m_s) per pixel, formed
        # as sum_c a Up(x_s) with coarse x_s: a = grad_logits, x_s = -w_s mu m_s from the lazy
        # gradient; else a = grad_msg, x_s = w_s m_s (the message recomputed).
        if msg is not None:
            a = grad_msg.grad_logits
            xs = []
            for m, weight in ((msg.m0, wa), (msg.m1, ws)):
                if grad_msg.compat is None:
                    x = (m - m.sum(axis=1, keepdims=True)) * dt.type(weight)
                else:
                    B, C = m.shape[:2]
                    mu = self._contiguous(grad_msg.compat.astype(dt, copy=False) * dt.type(-weight))
                    x = xp.matmul(mu, m.reshape(B, C, -1)).reshape(m.shape)
                xs.append(self._contiguous(x))
        else:
            a = grad_msg
            xs = list(self.coarse_message(setup, pooled[0], pooled[1], weights=(wa, ws)))
        gn0, gn1 = self._normaliser_gradients(grads, q)
        self._upsampled_dot(setup, a, xs[0], xs[1], gn0, gn1)
        r0, r1 = self.coarse_message(setup, coarse[0], coarse[1], weights=(wa, ws))
        lazy = PixelGradient(setup, r0, r1, q, grads, pending=True)
        if not hasattr(grads, "cuda_pending"):
            grads.cuda_pending = []
        grads.cuda_pending.append(lazy)
        return lazy

    def _upsampled_dot(self, setup, a, x0, x1, gn0, gn1):
        """``gn_s += sum_c a Up(x_s)`` per pixel (in place)."""
        a = self._contiguous(a)
        B, C = a.shape[:2]
        grid, block = self._grid_1d(a.size // C)
        taps = [t for axis in zip(setup.idx, setup.frac) for t in axis]
        self._function("backward.cu", _cuda.upsampled_dot_spec(setup.dtype, setup.nd))(
            grid, block,
            (a, x0, x1, *taps, gn0, gn1, np.int32(B), np.int32(C), *setup.dims()),
        )

    def prepare_backward(self, setup: CudaSetup, features, params, config, grads):
        """Gradient with respect to the features and the kernel parameters: ``(grad_features, dict)``.

        One ``crf_kernel_grad`` launch over every iteration's stacked ``G_s`` and ``P_s``, then
        ``Pool^T`` of the pooled-feature gradient. Parameter sums are per-block partials (a
        fixed-order tree in shared memory, in double) added on the host in a fixed order.
        """
        xp = self.xp
        for lazy in getattr(grads, "cuda_pending", ()):
            self._settle_normaliser_term(lazy)
        B, F = features.shape[:2]
        coarse = setup.coarse
        dt = setup.dtype
        sep = setup.separate
        S = 2 if sep else 1
        tab = self._backward_tables(setup)
        wa, ws = setup.weights
        theta_beta = params.theta_beta_vector(F)
        zero = {"theta_alpha": 0.0, "theta_beta": np.zeros(F), "theta_gamma": 0.0,
                "appearance_weight": 0.0, "smoothness_weight": 0.0}
        if not grads.left[0]:
            return xp.zeros(features.shape, dtype=dt), zero
        left = [self._contiguous(xp.concatenate(grads.left[s], axis=1)) for s in range(S)]
        right = [self._contiguous(xp.concatenate(grads.right[s], axis=1)) for s in range(S)]
        CT = left[0].shape[1]
        rows = [self._dummy(dt), self._dummy(dt)]
        has_rows = False
        if sep:
            for s in range(2):
                gn = grads.normalisers[s]
                if gn is None:
                    rows[s] = xp.zeros((B, 1) + coarse, dtype=dt)
                    continue
                n = setup.normalisers[s]
                factor = (n * n * n) * dt.type(-0.5)
                rows[s] = gn * factor if setup.identity else self.upsample_backward(setup, gn, (factor,))[0]
                rows[s] = self._contiguous(rows[s])
                has_rows = True
        name, nf, chunk = _cuda.kernel_grad_spec(dt, F, CT, num_cells=B * int(np.prod(coarse)), nd=setup.nd)
        block, smem = _cuda.kernel_grad_launch(coarse, setup.radii, F, dt.itemsize)
        nchunks = -(-CT // chunk)
        nz = B * S * nchunks
        grid = _cuda.tiled_grid(coarse, block, nz)
        feat_out = xp.empty((B, S * nchunks, F) + coarse, dtype=dt)
        partials = xp.empty((nz, grid[1], grid[0], 6 + F), dtype=np.float64)
        inv_beta = self._dev(1.0 / theta_beta, dtype=dt)
        i32, T = np.int32, dt.type
        d, h, w = _three(coarse, 1)
        rz, ry, rx = _three(setup.radii, 0)
        self._function("kernel_grad.cu", name)(
            grid, block,
            (setup.features, *setup.a, *setup.s, tab["dz2"], tab["dy2"], tab["dx2"],
             left[0], right[0], left[-1], right[-1], rows[0], rows[1], inv_beta, feat_out, partials,
             i32(B), i32(CT), i32(F), i32(h), i32(w), i32(setup.keep_centre), i32(S), i32(nchunks), i32(has_rows),
             T(1.0 if not sep else wa), T(1.0 if not sep else ws), T(wa if not sep else 1.0),
             i32(ry), i32(rx), i32(d), i32(rz)),
            shared_mem=smem,
        )
        grad_features = self.pool_backward(setup, feat_out.sum(axis=1))  # a new array (blur 1: the sum)
        host = np.asarray(partials.get() if hasattr(partials, "get") else partials, dtype=np.float64)
        sums = host.reshape(B, S, -1, 6 + F).transpose(1, 0, 2, 3).reshape(S, -1, 6 + F).sum(axis=1)
        # alpha / beta: how much each slice's appearance / smoothness terms count.
        alpha = (wa,) if not sep else (1.0, 0.0)
        beta = (ws,) if not sep else (0.0, 1.0)
        g_ia2 = sum(-0.25 * alpha[s] * sums[s, 2] for s in range(S))
        g_ig2 = sum(-0.25 * beta[s] * sums[s, 3] for s in range(S))
        g_ib = sum(-0.5 * alpha[s] * sums[s, 6:] for s in range(S)) * theta_beta  # / (1 / theta_beta)
        result = {
            "theta_alpha": float(g_ia2) * -2.0 / params.theta_alpha ** 3,
            "theta_beta": np.asarray(g_ib, dtype=np.float64) * -1.0 / theta_beta ** 2,
            "theta_gamma": float(g_ig2) * -2.0 / params.theta_gamma ** 3,
        }
        if sep:
            result["appearance_weight"] = float(0.5 * sums[0, 4])
            result["smoothness_weight"] = float(0.5 * sums[1, 5])
        else:
            result["appearance_weight"] = float(0.5 * sums[0, 0])
            result["smoothness_weight"] = float(0.5 * sums[0, 1])
        return grad_features, result

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
