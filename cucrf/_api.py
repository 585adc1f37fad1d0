"""The public inference entry point."""

from __future__ import annotations


import numpy as np

from . import _meanfield
from ._backends import get_backend, to_backend_array
from ._geometry import axis_geometry
from ._params import CRFParams
from ._validation import (
    ProblemTooLargeError, available_memory_bytes, check_finite, check_float_array, check_image, check_int,
)
from .unary import unary_from_labels, unary_from_probabilities

__all__ = ["infer", "DEFAULT_FILTER_SIZE", "DEFAULT_BLUR", "DEFAULT_ITERATIONS"]

DEFAULT_FILTER_SIZE = 7
DEFAULT_BLUR = 4
DEFAULT_ITERATIONS = 5

_UNARY_KINDS = ("logits", "probabilities", "labels")
_NORMALIZATIONS = (None, "symmetric")
_OUTPUTS = ("probabilities", "logits")
_DEVICES = (None, "cpu", "gpu")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_config(filter_size, blur, iterations, normalization, height, width, keep_centre=False):
    """Validate the structural settings against an image of ``height`` x ``width``."""
    filter_size = check_int("filter_size", filter_size, minimum=3 if not keep_centre else 1, odd=True)
    blur = check_int("blur", blur, minimum=1)
    iterations = check_int("iterations", iterations, minimum=0)
    _choice("normalization", normalization, _NORMALIZATIONS)
    h = axis_geometry(height, blur).coarse
    w = axis_geometry(width, blur).coarse
    largest = 2 * max(h, w) - 1
    if filter_size > max(largest, 3):
        raise ValueError(
            f"filter_size={filter_size} is larger than the image allows: with blur={blur} the "
            f"{height}x{width} image is a {h}x{w} grid, so the window can be at most {max(largest, 3)} "
            "cells wide; use a smaller filter_size or blur"
        )
    return _meanfield.CRFConfig(filter_size, blur, iterations, normalization, keep_centre)


def _check_params(params, num_classes, num_channels):
    if params is None:
        return CRFParams()
    if isinstance(params, dict):
        return CRFParams.from_dict(params)
    if not isinstance(params, CRFParams):
        raise TypeError(f"params must be a cucrf.CRFParams, a dict or None, got {type(params).__name__}")
    params.compatibility_matrix(num_classes)  # raises on a size mismatch
    params.theta_beta_vector(num_channels)
    return params


def infer(unary, image, params=None, *, filter_size=DEFAULT_FILTER_SIZE, blur=DEFAULT_BLUR,
          iterations=DEFAULT_ITERATIONS, unary_kind="logits", num_classes=None, confidence=0.5,
          unknown_label=None, clip=1e-5, normalization=None, output="probabilities", dtype=None,
          device=None):
    """Refine a segmentation with a convolutional CRF (mean-field inference).

    Parameters
    ----------
    unary : array, shape (C, H, W) or (B, C, H, W)
        Per-pixel class scores, larger = more likely: a network's logits or log-probabilities
        (``unary_kind='logits'``, the default); probabilities in [0, 1]
        (``unary_kind='probabilities'``); or, with ``unary_kind='labels'``, an integer label map of
        shape (H, W) or (B, H, W). NumPy, CuPy, or any array exposing ``__dlpack__``.
    image : array, shape (H, W, F) or (B, H, W, F)
        Channels-last image or per-pixel features, uint8 or float, any ``F >= 1``. Colour
        bandwidths ``theta_beta`` are in its units (0..255 for uint8).
    params : CRFParams, optional
        Kernel bandwidths, weights, compatibility and unary weight; defaults to ``CRFParams()``.
    filter_size : int
        Odd width ``k`` of the window of (coarse) cells each pixel exchanges messages with.
    blur : int
        Messages are computed on a grid ``blur`` times coarser, so the window spans
        ``filter_size * blur`` pixels; 1 computes them at full resolution.
    iterations : int
        Number of mean-field updates (0 returns ``softmax(unary_weight * unary)``).
    unary_kind : {'logits', 'probabilities', 'labels'}
        What ``unary`` holds (see above).
    num_classes, confidence, unknown_label
        For ``unary_kind='labels'``: see :func:`cucrf.unary_from_labels`.
    clip : float
        For ``unary_kind='probabilities'``: see :func:`cucrf.unary_from_probabilities`.
    normalization : {None, 'symmetric'}
        ``'symmetric'`` normalises each kernel as ``n * K(n * Q)`` with ``n = 1 / sqrt(K(1))``.
    output : {'probabilities', 'logits'}
        Return the marginals ``Q`` or the final logits ``a * U - Phi`` (whose softmax is ``Q``).
    dtype : {None, numpy.float32, numpy.float64}
        Compute precision; None means float64 for a float64 unary and float32 otherwise.
    device : {None, 'cpu', 'gpu'}
        Where to compute; None computes where the unary is (CuPy arrays on the GPU).

    Returns
    -------
    array, shape (C, H, W) or (B, C, H, W) like ``unary`` (with a class axis for label maps)
        In the unary's array library (NumPy or CuPy), of the compute dtype.

    Examples
    --------
    >>> import numpy as np, cucrf
    >>> rng = np.random.default_rng(0)
    >>> image = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    >>> unary = rng.normal(size=(4, 32, 48)).astype(np.float32)
    >>> q = cucrf.infer(unary, image)
    >>> q.shape, q.dtype, bool(np.allclose(q.sum(axis=0), 1, atol=1e-5))
    ((4, 32, 48), dtype('float32'), True)
    """
    _choice("unary_kind", unary_kind, _UNARY_KINDS)
    _choice("output", output, _OUTPUTS)
    _choice("device", device, _DEVICES)
    if dtype is not None and np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"dtype must be numpy.float32, numpy.float64 or None, got {dtype!r}")

    unary, library = to_backend_array("unary", unary, device)
    image, image_library = to_backend_array("image", image, device)
    if image_library != library:
        raise TypeError(
            f"unary is a {library} array but image is a {image_library} array; pass both as NumPy "
            "arrays (CPU) or both as CuPy arrays (GPU), or set device="
        )
    backend = get_backend(library)
    xp = backend.xp

    if unary_kind == "labels":
        if num_classes is None:
            raise ValueError("unary_kind='labels' needs num_classes")
        unary = unary_from_labels(unary, num_classes, confidence, unknown_label)
    elif unary_kind == "probabilities":
        unary = unary_from_probabilities(unary, clip)
    check_float_array("unary", unary, xp, ndims=(3, 4), finite=False)

    batched = unary.ndim == 4
    u4 = unary if batched else unary[None]
    B, C, H, W = u4.shape
    if C < 2:
        raise ValueError(f"unary must have at least 2 classes on axis {1 if batched else 0}, got shape {tuple(unary.shape)}")
    image4 = check_image(image, xp, B, H, W, batched, finite=False)
    F = image4.shape[-1]
    config = check_config(filter_size, blur, iterations, normalization, H, W)
    params = _check_params(params, C, F)

    compute_dtype = np.dtype(dtype) if dtype is not None else (
        np.dtype(np.float64) if unary.dtype == np.float64 else np.dtype(np.float32)
    )
    need = _meanfield.estimate_bytes(B, C, H, W, F, config, compute_dtype.itemsize)
    available = backend.available_memory_bytes() if hasattr(backend, "available_memory_bytes") else available_memory_bytes()
    if available is not None and need > available:
        raise ProblemTooLargeError(
            f"this inference needs about {need / 2**30:.1f} GiB ({B}x{C}x{H}x{W}, filter_size={config.filter_size}, "
            f"blur={config.blur}) but only {available / 2**30:.1f} GiB is available; split the batch, "
            "use a larger blur or a smaller filter_size"
        )

    # Scanned for NaN only now: a problem refused for its size is never read.
    check_finite("unary", unary, xp)
    check_finite("image", image4, xp)
    # astype copies: the caller's arrays are never modified.
    u = u4.astype(compute_dtype, copy=True)
    features = xp.ascontiguousarray(xp.moveaxis(image4, -1, 1).astype(compute_dtype))
    result = _meanfield.mean_field(backend, u, features, params, config, return_logits=output == "logits")
    return result if batched else result[0]
