"""Hand-written CUDA kernels: sources, specialisations and launch-parameter rules.

Nothing here imports CuPy or compiles anything. The kernels live in ``cucrf/kernels/*.cu``
(package data); :func:`kernel_source` reads one. Each kernel is a C++ template, instantiated
through NVRTC *name expressions* such as ``crf_message<float, 2, 3, 32, false>``; the rules that
pick a specialisation for a problem (:func:`message_spec` and friends) are plain functions used
both by the launch code (:mod:`cucrf._cuda.backend`) and by :func:`specialisations`, which lists
every specialisation the library can launch (for ``python -m cucrf.testing.nvrtc_check``).

Specialisation axes:

* dtype: ``float`` / ``double``;
* ``ND``, the number of spatial axes: 2 (images, (H, W)) or 3 (volumes, (D, H, W)); every
  kernel takes its depth arguments in both cases and an image instance compiles them out;
* message passing: feature count ``NF`` in 1..5 kept in registers, ``0`` for any other ``F``;
  ``CHUNK`` classes per thread (8, 16 or 32; more classes are covered by several chunks);
  merged kernel or separate appearance/smoothness kernels (symmetric normalisation);
* update: ``CMAX`` classes in registers (8, 16, 32), Potts or full compatibility matrix;
* backward (``backward.cu``): ``NS`` / ``MODE``, how many per-pixel factors and which incoming
  gradient (array, or a coarse one pooled-transposed on the fly);
* kernel gradient (``kernel_grad.cu``): ``NF`` as for message passing, ``CHUNK`` 8 or 16 stacked
  classes per thread.

The filter size (one radius per axis), the blur factors and the pixel spacing are runtime
arguments (the spacing only enters the host-built per-axis tables): the message loops run over
a window of (2 rz + 1)(2 ry + 1)(2 rx + 1) cells with a per-cell body of tens of instructions,
so a compile-time radius would buy nothing measurable, and one instance serves every odd filter
size.
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np

__all__ = [
    "KERNEL_FILES", "COMPILE_OPTIONS", "kernel_source", "specialisations", "ctype",
    "message_spec", "message_launch", "pool_spec", "update_spec", "upsample_spec",
    "upsample_backward_spec", "pool_backward_spec", "softmax_backward_spec", "upsampled_dot_spec",
    "class_products_spec", "class_products_launch",
    "kernel_grad_spec", "kernel_grad_launch",
    "MAX_FUSED_CLASSES", "SHARED_MEMORY_LIMIT", "BLOCK_1D", "SPATIAL_DIMS",
]

KERNEL_FILES = ("message.cu", "pool.cu", "update.cu", "backward.cu", "kernel_grad.cu")

#: Extra NVRTC options (CuPy adds its own); the kernels need none.
COMPILE_OPTIONS = ()

#: Dynamic shared memory available to a block without an opt-in attribute.
SHARED_MEMORY_LIMIT = 48 * 1024

#: Threads per block of the element-wise (1-D) kernels.
BLOCK_1D = 256

#: Numbers of spatial axes the kernels are instantiated for: images (H, W) and volumes (D, H, W).
SPATIAL_DIMS = (2, 3)

#: Largest grid y or z of a launch (CUDA's limit); the kernels loop over the slices beyond it.
MAX_GRID_Z = 65535

#: Feature counts with a register specialisation; others use the generic NF = 0 instance.
FEATURE_SPECIALISATIONS = (1, 2, 3, 4, 5)

#: Classes per thread of the message kernel.
MESSAGE_CHUNKS = (8, 16, 32)

#: Class counts the fused update keeps in registers, per (dtype, matrix); above it the update
#: falls back to an unfused path (upsampling kernel + array operations).
_UPDATE_CMAX = {
    ("float", False): (8, 16, 32),
    ("float", True): (8, 16, 32),
    ("double", False): (8, 16, 32),
    ("double", True): (8, 16),
}
MAX_FUSED_CLASSES = {key: max(v) for key, v in _UPDATE_CMAX.items()}


def ctype(dtype) -> str:
    """The C type of a NumPy dtype (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise TypeError(f"the CUDA kernels support float32 and float64, got {dtype}")


@functools.lru_cache(maxsize=None)
def kernel_source(file_name: str) -> str:
    """The text of ``cucrf/kernels/<file_name>``."""
    if file_name not in KERNEL_FILES:
        raise ValueError(f"unknown kernel file {file_name!r}; expected one of {KERNEL_FILES}")
    return importlib.resources.files("cucrf.kernels").joinpath(file_name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# specialisation rules
# ---------------------------------------------------------------------------------------------
def _smallest_at_least(n, choices):
    for c in choices:
        if c >= n:
            return c
    return choices[-1]


#: Below this many coarse cells (B * h * w) the message kernel uses the smallest class chunk, so
#: that a small grid (e.g. 125 x 125 at blur 4) still has enough threads to fill the GPU; kernel
#: values are then recomputed per chunk, which costs nothing on an otherwise idle device.
#: (A heuristic from the occupancy arithmetic in docs/kernels.md, not tuned on a GPU yet.)
SMALL_GRID_CELLS = 1 << 16


def _check_nd(nd):
    if nd not in SPATIAL_DIMS:
        raise ValueError(f"the CUDA kernels compute on {SPATIAL_DIMS} spatial axes, got {nd}")
    return nd


def message_spec(dtype, num_features, num_classes, separate, num_cells=None, nd=2):
    """``(name_expression, nf, chunk)`` of the message kernel for a problem.

    ``num_cells`` (B times the coarse cells), when given and below :data:`SMALL_GRID_CELLS`,
    selects the smallest class chunk (more threads); otherwise the chunk is the smallest that
    covers the classes in as few chunks as possible. ``nd``: 2 spatial axes or 3.
    """
    nf = num_features if num_features in FEATURE_SPECIALISATIONS else 0
    if num_cells is not None and num_cells < SMALL_GRID_CELLS:
        chunk = MESSAGE_CHUNKS[0]
    else:
        chunks = -(-num_classes // MESSAGE_CHUNKS[-1])
        chunk = _smallest_at_least(-(-num_classes // chunks), MESSAGE_CHUNKS)
    sep = "true" if separate else "false"
    return f"crf_message<{ctype(dtype)}, {_check_nd(nd)}, {nf}, {chunk}, {sep}>", nf, chunk


def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _block_shape(coarse, radii):
    """The largest block of a tiled kernel, before shared memory is considered: ``(TX, TY, TZ)``.

    TX along x (32 when the grid is at least 32 wide, else the next power of two >= 8), so that
    a warp's loads are one row segment (coalesced). The other 256 / TX threads go along y for
    images; for volumes they are split between y and z (powers of two, at most the next power of
    two of the axis) so that the tile with its halo has the fewest cells per thread, ties to the
    larger TY.
    """
    w, h = coarse[-1], coarse[-2]
    tx = 32 if w >= 32 else max(8, _next_pow2(w))
    rest = 256 // tx
    if len(coarse) == 2:
        return tx, max(1, min(rest, _next_pow2(h))), 1
    d = coarse[0]
    rz, ry = radii[0], radii[1]
    best = None
    ty = 1
    while ty <= rest:
        tz = rest // ty
        ty_c, tz_c = min(ty, _next_pow2(h)), min(tz, _next_pow2(d))
        halo = (ty_c + 2 * ry) * (tz_c + 2 * rz) / (ty_c * tz_c)
        key = (halo, -ty_c)
        if best is None or key < best[0]:
            best = (key, ty_c, tz_c)
        ty *= 2
    return tx, best[1], best[2]


def _fit_tile(coarse, radii, shared_bytes, what, purpose):
    """Largest (TX, TY, TZ) block (see :func:`_block_shape`) whose ``shared_bytes(tx, ty, tz)`` fits
    in :data:`SHARED_MEMORY_LIMIT`: TZ shrinks first, then TY, then TX, by halves (powers of two)."""
    tx, ty, tz = _block_shape(coarse, radii)
    while shared_bytes(tx, ty, tz) > SHARED_MEMORY_LIMIT and tz > 1:
        tz //= 2
    while shared_bytes(tx, ty, tz) > SHARED_MEMORY_LIMIT and ty > 1:
        ty //= 2
    while shared_bytes(tx, ty, tz) > SHARED_MEMORY_LIMIT and tx > 1:
        tx //= 2
    if shared_bytes(tx, ty, tz) > SHARED_MEMORY_LIMIT:
        raise ValueError(
            f"{what} need {shared_bytes(tx, ty, tz)} bytes of shared memory per block{purpose}, more than "
            f"{SHARED_MEMORY_LIMIT}; use fewer channels or a smaller filter_size on the GPU"
        )
    return (tx, ty, tz), shared_bytes(tx, ty, tz)


def _tile_cells(block, radii):
    """Cells of a block's tile with its halo: (TX + 2 rx)(TY + 2 ry)(TZ + 2 rz) (no z for images)."""
    cells = 1
    for t, r in zip(block, reversed(radii)):
        cells *= t + 2 * r
    return cells


def _window_text(radii):
    sizes = [2 * r + 1 for r in radii]
    return f"filter_size={sizes[0]}" if len(set(sizes)) == 1 and len(sizes) == 2 else f"filter_size={tuple(sizes)}"


def message_launch(coarse, radii, num_features, itemsize):
    """``(block, shared_mem)`` of the message kernel: a (TX, TY, TZ) tile of cells, x fastest.

    ``coarse`` is the coarse grid's (h, w) or (d, h, w), ``radii`` one window radius per axis
    (same order). The block holds the tile's features with its halo in shared memory; TZ, TY
    then TX shrink until that fits in :data:`SHARED_MEMORY_LIMIT`. For images TZ is 1.
    """
    def smem(tx, ty, tz):
        return num_features * _tile_cells((tx, ty, tz), radii) * itemsize

    return _fit_tile(tuple(coarse), tuple(radii), smem,
                     f"{num_features} feature channels with {_window_text(radii)}", "")


def tiled_grid(coarse, block, slices):
    """Grid of the tiled kernels (``crf_message``, ``crf_kernel_grad``).

    ``(ceil(w / TX) * ceil(d / TZ), ceil(h / TY), min(slices, MAX_GRID_Z))``: grid x holds the x
    tiles (fastest) and, for volumes, the depth tiles; grid z the batch and class-chunk slices
    (the kernels loop over those beyond :data:`MAX_GRID_Z`).
    """
    w, h = coarse[-1], coarse[-2]
    depth_tiles = -(-coarse[0] // block[2]) if len(coarse) == 3 else 1
    return (-(-w // block[0]) * depth_tiles, -(-h // block[1]), min(slices, MAX_GRID_Z))


def pool_spec(dtype, scaled, nd=2):
    """Name expression of the pooling kernel (``scaled``: two outputs, x * s0 and x * s1)."""
    return f"crf_pool<{ctype(dtype)}, {_check_nd(nd)}, {2 if scaled else 0}>"


def update_spec(dtype, num_classes, matrix, nd=2):
    """Name expression of the fused update, or None when ``num_classes`` is too many for it."""
    key = (ctype(dtype), bool(matrix))
    if num_classes > MAX_FUSED_CLASSES[key]:
        return None
    cmax = _smallest_at_least(num_classes, _UPDATE_CMAX[key])
    return f"crf_update<{key[0]}, {_check_nd(nd)}, {cmax}, {'true' if matrix else 'false'}>"


def upsample_spec(dtype, nd=2):
    """Name expression of the stand-alone upsampling kernel."""
    return f"crf_upsample<{ctype(dtype)}, {_check_nd(nd)}>"


def upsample_backward_spec(dtype, num_scales, nd=2):
    """Name expression of Up^T with 0, 1 or 2 per-pixel factors (``crf_upsample_backward``)."""
    if num_scales not in (0, 1, 2):
        raise ValueError(f"num_scales must be 0, 1 or 2, got {num_scales}")
    return f"crf_upsample_backward<{ctype(dtype)}, {_check_nd(nd)}, {num_scales}>"


def pool_backward_spec(dtype, scaled, nd=2):
    """Name expression of Pool^T (``scaled``: n0 Pool^T(r0) + n1 Pool^T(r1))."""
    return f"crf_pool_backward<{ctype(dtype)}, {_check_nd(nd)}, {2 if scaled else 0}>"


def softmax_backward_spec(dtype, mode, nd=2):
    """Name expression of the softmax vjp; ``mode`` 0 array, 1 pooled, 2 pooled and normalised."""
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0, 1 or 2, got {mode}")
    return f"crf_softmax_backward<{ctype(dtype)}, {_check_nd(nd)}, {mode}>"


def upsampled_dot_spec(dtype, nd=2):
    """Name expression of the per-pixel ``sum_c a Up(x)`` accumulation."""
    return f"crf_upsampled_dot<{ctype(dtype)}, {_check_nd(nd)}>"


def class_products_spec(dtype):
    """Name expression of the (C, C) compatibility-gradient reduction (any number of axes)."""
    return f"crf_class_products<{ctype(dtype)}>"


#: Upper bound on the blocks of ``crf_class_products`` (two per SM of an H100), and on the
#: size of its per-block (C, C) double partials (bytes).
CLASS_PRODUCT_BLOCKS = 264
CLASS_PRODUCT_PARTIAL_BYTES = 16 << 20


def class_products_launch(batch, classes, n, two, itemsize):
    """``(grid, tn, shared_mem)`` of ``crf_class_products``: tiles of ``tn`` <= 64 columns."""
    tn = 64
    arrays = 4 if two else 2

    def smem(tn):
        return arrays * classes * (tn + 1) * itemsize

    while smem(tn) > SHARED_MEMORY_LIMIT and tn > 1:
        tn //= 2
    if smem(tn) > SHARED_MEMORY_LIMIT:
        raise ValueError(f"{classes} classes are too many for the compatibility gradient kernel")
    tiles = batch * -(-n // tn)
    cap = max(1, CLASS_PRODUCT_PARTIAL_BYTES // (8 * classes * classes))
    return max(1, min(tiles, CLASS_PRODUCT_BLOCKS, cap)), tn, smem(tn)


#: Stacked classes per thread of the kernel-gradient kernel. Its per-thread registers are the
#: centre cell's G and P for the chunk (2 CHUNK values) plus a dozen accumulators, so 16 keeps
#: double precision well inside the register file; every extra chunk recomputes kernel values.
KERNEL_GRAD_CHUNKS = (8, 16)


def kernel_grad_spec(dtype, num_features, stacked_classes, num_cells=None, nd=2):
    """``(name_expression, nf, chunk)`` of ``crf_kernel_grad`` for a problem.

    ``stacked_classes`` is iterations x classes. Small grids (``num_cells`` = B times the coarse
    cells, below :data:`SMALL_GRID_CELLS`) use chunks of 8 (more blocks along grid z); otherwise 16.
    """
    nf = num_features if num_features in FEATURE_SPECIALISATIONS else 0
    small = num_cells is not None and num_cells < SMALL_GRID_CELLS
    chunk = KERNEL_GRAD_CHUNKS[0] if small or stacked_classes <= KERNEL_GRAD_CHUNKS[0] else KERNEL_GRAD_CHUNKS[-1]
    return f"crf_kernel_grad<{ctype(dtype)}, {_check_nd(nd)}, {nf}, {chunk}>", nf, chunk


def kernel_grad_shared_bytes(block, radii, num_features, itemsize, generic):
    """Dynamic shared memory of ``crf_kernel_grad`` for a (tx, ty, tz) block (see the kernel)."""
    nth = block[0] * block[1] * block[2]
    tile = num_features * _tile_cells(block, radii) * itemsize
    red = (6 if generic else 6 + num_features) * nth * 8
    front = (max(tile, red) + 15) & ~15
    return front + (2 * num_features * nth * itemsize if generic else 0)


def kernel_grad_launch(coarse, radii, num_features, itemsize):
    """``(block, shared_mem)`` of the kernel-gradient kernel: a (TX, TY, TZ) tile, x fastest.

    As :func:`message_launch`, shrinking the block (powers of two, for the tree reduction) until
    the feature tile, the reduction buffer and the generic instance's per-thread accumulators fit
    in :data:`SHARED_MEMORY_LIMIT`.
    """
    generic = num_features not in FEATURE_SPECIALISATIONS

    def smem(tx, ty, tz):
        return kernel_grad_shared_bytes((tx, ty, tz), radii, num_features, itemsize, generic)

    return _fit_tile(tuple(coarse), tuple(radii), smem,
                     f"{num_features} feature channels with {_window_text(radii)}", " for the kernel gradient")


def specialisations():
    """Every specialisation the library launches: ``{file: [(options, [name_expression...])]}``.

    One entry per file and dtype (the name expressions of one entry compile together, images and
    volumes; at run time each is compiled on its own, on first use).
    """
    out = {}
    for t in ("float", "double"):
        dt = np.float32 if t == "float" else np.float64
        names = [f"crf_message<{t}, {nd}, {nf}, {chunk}, {sep}>" for nd in SPATIAL_DIMS
                 for nf in (0,) + FEATURE_SPECIALISATIONS for chunk in MESSAGE_CHUNKS
                 for sep in ("false", "true")]
        out.setdefault("message.cu", []).append((COMPILE_OPTIONS, names))
        out.setdefault("pool.cu", []).append(
            (COMPILE_OPTIONS, [pool_spec(dt, s, nd) for nd in SPATIAL_DIMS for s in (False, True)]))
        names = [f"crf_update<{t}, {nd}, {c}, {'true' if m else 'false'}>"
                 for nd in SPATIAL_DIMS for m in (False, True) for c in _UPDATE_CMAX[(t, m)]]
        out.setdefault("update.cu", []).append(
            (COMPILE_OPTIONS, names + [upsample_spec(dt, nd) for nd in SPATIAL_DIMS]))
        names = [name for nd in SPATIAL_DIMS
                 for name in ([upsample_backward_spec(dt, n, nd) for n in (0, 1, 2)]
                              + [pool_backward_spec(dt, s, nd) for s in (False, True)]
                              + [softmax_backward_spec(dt, m, nd) for m in (0, 1, 2)]
                              + [upsampled_dot_spec(dt, nd)])]
        out.setdefault("backward.cu", []).append((COMPILE_OPTIONS, names + [class_products_spec(dt)]))
        names = [f"crf_kernel_grad<{t}, {nd}, {nf}, {chunk}>" for nd in SPATIAL_DIMS
                 for nf in (0,) + FEATURE_SPECIALISATIONS for chunk in KERNEL_GRAD_CHUNKS]
        out.setdefault("kernel_grad.cu", []).append((COMPILE_OPTIONS, names))
    return out
