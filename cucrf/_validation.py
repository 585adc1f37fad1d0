"""Input checks: every error names the argument, what was received and what was expected."""

from __future__ import annotations

import numbers
import os

import numpy as np

from . import _parallel
from .interop import array_library  # noqa: F401  (re-exported: the array kinds live in cucrf.interop)

__all__ = [
    "ProblemTooLargeError", "array_library", "check_int", "check_float_array", "check_image", "check_finite",
    "available_memory_bytes", "check_compute_dtype",
]


class ProblemTooLargeError(MemoryError, ValueError):
    """The problem would need more memory than the machine has; raised before allocating."""


def array_namespace(value):
    """NumPy or CuPy, whichever ``value`` belongs to (without importing CuPy otherwise)."""
    if type(value).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def check_int(name, value, *, minimum=None, odd=False):
    """Return ``value`` as int; reject bools, floats and out-of-range values."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name} must be odd (the window is centred on the pixel), got {value}")
    return value


def check_compute_dtype(dtype):
    """``dtype`` as ``numpy.dtype('float32')`` or ``numpy.dtype('float64')``, or None; a TypeError otherwise."""
    if dtype is None:
        return None
    expected = "numpy.float32, numpy.float64 (or 'float32', 'float64') or None"
    try:
        value = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"dtype must be {expected}, got {dtype!r}, which is not a dtype") from exc
    if value not in (np.float32, np.float64):
        raise TypeError(f"dtype must be {expected}, got {dtype!r}")
    return value


def _check_dtype(name, arr, *, allow_int, allow_bool=False):
    kind = arr.dtype.kind
    if kind == "c":
        raise TypeError(f"{name} must be real, got complex dtype {arr.dtype}")
    if kind in "OSUVMm":
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if kind == "b" and not allow_bool:
        raise TypeError(f"{name} must be numeric, got a boolean array")
    if kind in "iu" and not allow_int:
        raise TypeError(
            f"{name} must be floating point class scores, got integer dtype {arr.dtype}; "
            "for a label map pass unary_kind='labels'"
        )


def _shape_text(shape):
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_float_array(name, arr, xp, *, ndims, allow_int=False, finite=True):
    """Check dtype, ndim, emptiness and (with ``finite``) finiteness of an array in namespace ``xp``."""
    _check_dtype(name, arr, allow_int=allow_int)
    if arr.ndim not in ndims:
        expected = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {expected} dimensions, got shape {_shape_text(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {_shape_text(arr.shape)}")
    if finite:
        check_finite(name, arr, xp)


def check_finite(name, arr, xp, value_range=None):
    """Reject NaN and infinite values.

    ``value_range``: the array's :func:`extremes`, when already known. NaN or infinity shows in
    the minimum or maximum, so the array is scanned once (by :func:`extremes`, threaded, without
    a temporary) and again only to count the bad values for the message.
    """
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    lo, hi = value_range if value_range is not None else extremes(arr, xp)
    finite = bool(np.isfinite(lo) and np.isfinite(hi))
    if not finite:
        bad = int((~xp.isfinite(arr)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s); all values must be finite")


def check_image(image, xp, batch, size, batched, finite=True, kind=None):
    """Validate ``image`` against the unary's batch and spatial ``size`` ((H, W) or (D, H, W));
    return it as (B, *size, F).

    ``kind`` is the array library the caller passed the image as (``'torch'`` gets PyTorch's
    ``permute`` in the hint for a channels-first image).
    """
    _check_dtype("image", image, allow_int=True)
    size = tuple(size)
    nd = len(size)
    names = "H, W" if nd == 2 else "D, H, W"
    want = nd + 2 if batched else nd + 1
    layout = f"(B, {names}, F)" if batched else f"({names}, F)"
    if image.ndim != want:
        hint = ""
        if image.ndim == want - 1 and image.shape[-nd:] == size:
            hint = "; for a single-channel image add a channel axis: image[..., None]"
        raise ValueError(
            f"image must have shape {layout} to match a unary with {nd + 2 if batched else nd + 1} dimensions, "
            f"got shape {_shape_text(image.shape)}{hint}"
        )
    spatial = tuple(image.shape[-nd - 1:-1])
    if spatial != size:
        if tuple(image.shape[-nd:]) == size:
            axes = ", ".join(str(a) for a in ((0,) + tuple(range(2, nd + 2)) + (1,) if batched
                                              else tuple(range(1, nd + 1)) + (0,)))
            fix = f"image.permute({axes})" if kind == "torch" else f"image.transpose({axes})"
            raise ValueError(
                f"image has shape {_shape_text(image.shape)}, which looks channels-first; cucrf expects "
                f"channels-last {layout}, e.g. {fix}"
            )
        what = "height and width" if nd == 2 else "depth, height and width"
        raise ValueError(
            f"image {what} {spatial} differ from the unary's {size}; "
            f"expected image shape {layout} with " + ", ".join(f"{n}={v}" for n, v in zip(names.split(", "), size))
        )
    if batched and image.shape[0] != batch:
        raise ValueError(f"image has batch size {image.shape[0]} but the unary has {batch}")
    if image.shape[-1] < 1 or image.size == 0:
        raise ValueError(f"image must not be empty, got shape {_shape_text(image.shape)}")
    if finite:
        check_finite("image", image, xp)
    return image if batched else image[None]


def available_memory_bytes():
    """Memory the process may still allocate on the host, in bytes (None when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# -- values the compute dtype can carry ----------------------------------------------------------

#: Share of a dtype's largest value that inputs may reach: the softmax subtracts two scores and the
#: kernels add a squared distance to the squared colour difference, so a factor of 4 leaves room.
HEADROOM = 4.0

_DTYPE_FIX = "pass dtype=np.float64 (float64 carries values up to 1.8e308)"


def dtype_limit(dtype):
    """The largest magnitude an input may reach in ``dtype``: its largest value / :data:`HEADROOM`."""
    return float(np.finfo(dtype).max) / HEADROOM


def _extremes(arr, xp, axis=None):
    """(minimum, maximum) of ``arr`` as float64 NumPy values (arrays with ``axis``)."""
    lo, hi = xp.min(arr, axis=axis), xp.max(arr, axis=axis)
    to_np = (lambda a: np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64))
    return to_np(lo), to_np(hi)


def extremes(arr, xp, scan=None):
    """(minimum, maximum) of a non-empty array as Python floats; NaN when it holds a NaN.

    One scan serves every check that reads them (finiteness, magnitudes, diagnostics); a large
    NumPy array is scanned by ``CUCRF_NUM_THREADS`` threads (NumPy reductions release the GIL),
    each taking whole rows of it. ``scan``: a backend's one-pass scan of a NumPy array, giving
    (minimum, maximum) of an array of finite values and None otherwise (NumPy then rescans it).
    """
    if scan is not None and xp is np and arr.size >= _parallel.MIN_ELEMENTS:
        found = scan(arr)
        if found is not None:
            return found
    if xp is not np or arr.size < _parallel.MIN_ELEMENTS or not arr.flags.c_contiguous:
        lo, hi = _extremes(arr, xp)
        return float(lo), float(hi)
    flat = arr.reshape(-1)
    pieces = max(1, min(_parallel.num_threads(), 16))
    found = [None] * pieces

    def scan(start, stop):
        for i in range(start, stop):
            part = flat[i * flat.size // pieces:(i + 1) * flat.size // pieces]
            found[i] = (float(part.min()), float(part.max())) if part.size else (np.inf, -np.inf)

    _parallel.for_chunks(pieces, scan, flat.size)
    los, his = zip(*found)
    if any(np.isnan(los)) or any(np.isnan(his)):
        return float("nan"), float("nan")
    return min(los), max(his)


def check_unary_magnitude(unary, xp, unary_weight, dtype, unary_extremes=None):
    """Refuse a unary whose values, cast to ``dtype`` and times ``unary_weight``, exceed what ``dtype`` carries.

    ``unary`` is the finite unary before the cast (so values a cast would turn into infinity are
    seen); ``dtype`` the compute dtype. The limit is :func:`dtype_limit`: the softmax subtracts two
    scaled scores, so twice the largest one must stay finite. ``unary_extremes``: its
    :func:`extremes` when already known.
    """
    dtype = np.dtype(dtype)
    lo, hi = unary_extremes if unary_extremes is not None else _extremes(unary, xp)
    peak = max(abs(float(lo)), abs(float(hi)))
    largest = float(np.finfo(dtype).max)
    if peak > largest:
        raise ValueError(
            f"unary holds values up to {peak:.3g} in magnitude, more than {dtype.name} can carry ({largest:.3g}); "
            f"rescale the unary or {_DTYPE_FIX}"
        )
    scaled = peak * abs(float(unary_weight))
    limit = dtype_limit(dtype)
    if scaled > limit:
        raise ValueError(
            f"unary_weight * unary reaches {scaled:.3g} in magnitude (unary up to {peak:.3g}, unary_weight="
            f"{float(unary_weight):g}), more than {dtype.name} can carry in the softmax (limit {limit:.3g}, a "
            f"quarter of its largest value); rescale the unary or unary_weight, or {_DTYPE_FIX}"
        )


def check_image_magnitude(image, xp, dtype):
    """Refuse a finite image with values that become infinite when cast to the compute ``dtype``."""
    dtype = np.dtype(dtype)
    if image.dtype.kind != "f" or image.dtype.itemsize <= dtype.itemsize:
        return
    lo, hi = _extremes(image, xp)
    peak = max(abs(float(lo)), abs(float(hi)))
    largest = float(np.finfo(dtype).max)
    if peak > largest:
        raise ValueError(
            f"image holds values up to {peak:.3g} in magnitude, more than {dtype.name} can carry ({largest:.3g}); "
            f"rescale the image (and theta_beta with it) or {_DTYPE_FIX}"
        )


def check_feature_magnitude(features, xp, theta_beta, blur, training, transformed=False, bounds=None):
    """Refuse features whose kernel arithmetic would leave the range of their dtype.

    Parameters
    ----------
    features : array, shape (B, F, *spatial), the compute dtype
        What the kernels see (the image, after any feature transform).
    xp : module
    theta_beta : ndarray, shape (F,)
        Colour bandwidths.
    blur : int or tuple of int
        Pooling sums ``blur ** ndim`` values (the product of the per-axis blurs) before dividing.
    training : bool
        The gradient also squares raw (unscaled) feature differences.
    transformed : bool
        The features come from a feature transform (named in the messages).
    bounds : (float, float), optional
        Bounds known to hold every feature value (an integer image's dtype range): when they pass
        every check, the features are not scanned.

    Notes
    -----
    With ``r_f`` the value range of channel ``f``, the forward pass needs
    ``sum_f (r_f / theta_beta_f)^2`` (the largest squared colour distance) and ``blur^2 max|f|``
    within :func:`dtype_limit`; the gradient also needs ``max_f r_f^2``. Overflowing to infinity
    there turns into NaN (``inf - inf``, ``0 * inf``), never into a usable result.
    """
    if bounds is not None:
        F = features.shape[1]
        try:
            _check_feature_ranges(np.full(F, float(bounds[0])), np.full(F, float(bounds[1])), features, theta_beta,
                                  blur, training, transformed)
            return
        except ValueError:
            pass  # the bounds are too wide to tell: scan the values
    lo, hi = _extremes(features, xp, axis=(0,) + tuple(range(2, features.ndim)))
    _check_feature_ranges(lo, hi, features, theta_beta, blur, training, transformed)


def _check_feature_ranges(lo, hi, features, theta_beta, blur, training, transformed):
    """:func:`check_feature_magnitude` given each channel's minimum ``lo`` and maximum ``hi`` (F,)."""
    dt = np.dtype(features.dtype)
    limit = dtype_limit(dt)
    name = "image (after feature_transform)" if transformed else "image"
    nd = features.ndim - 2
    cell = int(np.prod(blur)) if isinstance(blur, tuple) else int(blur) ** nd
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError(
            f"feature_transform maps the image to values beyond what {dt.name} can carry "
            f"({float(np.finfo(dt).max):.3g}); use a smaller matrix or offset, rescale the image, or {_DTYPE_FIX}"
        )
    with np.errstate(over="ignore"):  # float64 arithmetic on the ranges; infinity compares as too large
        span = hi - lo
        peak = float(np.max(np.maximum(np.abs(lo), np.abs(hi))))
        pooled = peak * cell
        squared = np.square(span / np.asarray(theta_beta, dtype=np.float64))
        total = float(squared.sum())
        raw = float(np.max(span)) ** 2 if np.max(span) < 1e154 else np.inf
    fix = f"rescale the image (and theta_beta with it) or {_DTYPE_FIX}"
    can_carry = f"more than {dt.name} can carry (limit {limit:.3g}, a quarter of its largest value)"
    if pooled > limit:
        raise ValueError(
            f"{name} holds values up to {peak:.3g} in magnitude; blur={blur} sums {cell} of them per cell, "
            f"{pooled:.3g}, {can_carry}; use a smaller blur, or {fix}"
        )
    if total > limit:
        f = int(np.argmax(squared))
        raise ValueError(
            f"{name} spans {float(span[f]):.3g} in channel {f} (values from {float(lo[f]):.3g} to {float(hi[f]):.3g}); "
            f"divided by theta_beta={float(theta_beta[f]):g}, the squared colour differences reach {total:.3g}, "
            f"{can_carry}; {fix}"
        )
    if training and raw > limit:
        f = int(np.argmax(span))
        raise ValueError(
            f"{name} spans {float(span[f]):.3g} in channel {f}; the gradient squares differences of raw values, "
            f"{raw:.3g}, {can_carry}; {fix}"
        )


def check_result_finite(name, values, dtype, hint, inputs="the unary or the image (with theta_beta)"):
    """Raise a ValueError instead of returning NaN or infinity computed from finite inputs.

    Parameters
    ----------
    name : str
        What was computed ("the output", "the gradient with respect to the unary", ...).
    values : NumPy or CuPy array, or float
    dtype : numpy.dtype
        The compute dtype.
    hint : callable
        Returns a sentence on the inputs' magnitudes (only called when raising).
    inputs : str
        The inputs to rescale, for the message.
    """
    if not (isinstance(values, np.ndarray) or type(values).__module__.split(".")[0] == "cupy"):
        values = np.asarray(values, dtype=np.float64)
    xp = array_namespace(values)
    if values.size == 0 or all(np.isfinite(extremes(values, xp))):
        return
    bad = int((~xp.isfinite(values)).sum())
    dt = np.dtype(dtype)
    fix = f"rescale {inputs}"
    if dt != np.float64:
        fix += f", or {_DTYPE_FIX}"
    raise ValueError(
        f"{name} holds {bad} NaN or infinite value(s) although every input is finite: an intermediate value "
        f"exceeded what {dt.name} can carry ({float(np.finfo(dt).max):.3g}). {hint()} To fix it, {fix}"
    )
