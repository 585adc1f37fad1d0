"""Blur geometry: which pixels a coarse cell averages and where upsampling reads.

The geometry is ConvCRF's: a full-resolution axis of ``n`` pixels is padded by
``pad = ceil(((blur - n % blur) % blur) / 2)`` pixels in front, cut into ``ceil(n / blur)`` cells
of ``blur`` pixels, each cell averaging only the real pixels it covers. Upsampling is bilinear
with scale ``blur`` and ``align_corners=False`` on the padded axis (source coordinate
``(o + 0.5) / blur - 0.5`` clamped at the edges), cropped back to the ``n`` real pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

__all__ = ["AxisGeometry", "axis_geometry", "per_axis", "window_offsets"]


@dataclasses.dataclass(frozen=True)
class AxisGeometry:
    """Pooling and upsampling along one image axis.

    Attributes
    ----------
    size : int
        Number of full-resolution pixels ``n``.
    blur : int
        Cell width in pixels.
    pad : int
        Padding in front of the first pixel.
    coarse : int
        Number of cells, ``ceil(n / blur)``.
    counts : ndarray of float64, shape (coarse,)
        Number of real pixels in each cell.
    centres : ndarray of float64, shape (coarse,)
        Mean pixel coordinate of each cell (the pooled position feature).
    lo, hi : ndarray of int64, shape (size,)
        The two cells bilinear upsampling reads for each pixel.
    frac : ndarray of float64, shape (size,)
        Weight of ``hi`` (``lo`` gets ``1 - frac``).
    """

    size: int
    blur: int
    pad: int
    coarse: int
    counts: np.ndarray
    centres: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    frac: np.ndarray

    def upsample_matrix(self) -> np.ndarray:
        """Dense (size, coarse) float64 matrix of the bilinear upsampling (for tests and backward)."""
        m = np.zeros((self.size, self.coarse))
        rows = np.arange(self.size)
        np.add.at(m, (rows, self.lo), 1.0 - self.frac)
        np.add.at(m, (rows, self.hi), self.frac)
        return m

    def pool_matrix(self) -> np.ndarray:
        """Dense (coarse, size) float64 matrix of the average pooling."""
        m = np.zeros((self.coarse, self.size))
        cells = (np.arange(self.size) + self.pad) // self.blur
        m[cells, np.arange(self.size)] = 1.0 / self.counts[cells]
        return m


@functools.lru_cache(maxsize=256)
def axis_geometry(size: int, blur: int) -> AxisGeometry:
    """Return the :class:`AxisGeometry` of an axis of ``size`` pixels pooled by ``blur``."""
    size, blur = int(size), int(blur)
    pad = -(-((blur - size % blur) % blur) // 2)
    coarse = -(-size // blur)
    pixels = np.arange(size)
    cells = (pixels + pad) // blur
    counts = np.bincount(cells, minlength=coarse).astype(np.float64)
    centres = np.bincount(cells, weights=pixels.astype(np.float64), minlength=coarse) / counts
    src = (pixels + pad + 0.5) / blur - 0.5
    clamped = src < 0
    src = np.maximum(src, 0.0)
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, coarse - 1)
    hi = np.minimum(lo + 1, coarse - 1)
    # The weight of a pixel depends only on its place in its cell (its phase), computed as the
    # NumPy backend's phases do: ``src - lo`` would round differently far from the origin, and a
    # tile of the image would then not compute exactly what the whole image computes.
    delta = ((pixels + pad) % blur + 0.5) / blur - 0.5
    frac = np.where(delta < 0, 1.0 + delta, delta)
    frac = np.where(clamped | (hi == lo), 0.0, frac)
    for a in (counts, centres, lo, hi, frac):
        a.setflags(write=False)
    return AxisGeometry(size, blur, pad, coarse, counts, centres, lo, hi, frac)


def per_axis(value, ndim: int) -> tuple:
    """``value`` as a tuple with one entry per spatial axis (an int is repeated ``ndim`` times)."""
    if isinstance(value, tuple):
        return value
    return (value,) * ndim


@functools.lru_cache(maxsize=64)
def window_offsets(filter_size, keep_centre: bool = False):
    """Offsets of a window in row-major order (the last axis fastest).

    ``filter_size`` is an int (a square 2-D window: offsets ``(dy, dx)``) or a tuple with one odd
    width per spatial axis (offsets with one entry per axis). The centre (all zeros) is left out
    unless ``keep_centre``.
    """
    sizes = per_axis(filter_size, 2)
    ranges = [range(-(k // 2), k // 2 + 1) for k in sizes]
    return tuple(o for o in itertools.product(*ranges) if keep_centre or any(o))
