"""Input checks: every error names the argument, what was received and what was expected."""

from __future__ import annotations

import numbers
import os

import numpy as np

__all__ = [
    "ProblemTooLargeError", "array_library", "check_int", "check_float_array", "check_image", "check_finite",
    "available_memory_bytes",
]


class ProblemTooLargeError(MemoryError, ValueError):
    """The problem would need more memory than the machine has; raised before allocating."""


def array_library(name, value):
    """Return ``'numpy'``, ``'cupy'`` or ``'dlpack'`` for an array argument (without importing CuPy)."""
    module = type(value).__module__.split(".")[0]
    if module == "cupy":
        return "cupy"
    if isinstance(value, np.ndarray):
        return "numpy"
    if hasattr(value, "__dlpack__") and not isinstance(value, np.generic):
        return "dlpack"
    return "numpy"


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


def check_finite(name, arr, xp):
    """Reject NaN and infinite values."""
    if arr.dtype.kind == "f" and not bool(xp.isfinite(arr).all()):
        bad = int((~xp.isfinite(arr)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s); all values must be finite")


def check_image(image, xp, batch, size, batched, finite=True):
    """Validate ``image`` against the unary's batch and spatial ``size`` ((H, W) or (D, H, W));
    return it as (B, *size, F)."""
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
            order = ", ".join(str(a) for a in ((0,) + tuple(range(2, nd + 2)) + (1,) if batched
                                               else tuple(range(1, nd + 1)) + (0,)))
            raise ValueError(
                f"image has shape {_shape_text(image.shape)}, which looks channels-first; cucrf expects "
                f"channels-last {layout}, e.g. image.transpose({order})"
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
