"""Diagnostics of common input mistakes: a unary of the wrong kind or layout, an image of the wrong scale.

:func:`check_inputs` is the one place these checks live; :func:`cucrf.infer` calls it, and so can
any other front end (the command line). Likely mistakes that may still be intended are reported
as :class:`InputWarning` (filter them with ``warnings.filterwarnings("ignore",
category=cucrf.InputWarning)``); layouts that cannot be right are a ValueError.
"""

from __future__ import annotations

import warnings

import numpy as np

from ._params import CRFParams
from ._validation import array_namespace

__all__ = ["InputWarning", "check_inputs", "check_unary_layout"]

#: Pixels whose class sums are examined (a regular sample; the minimum and maximum use every value).
SAMPLE_PIXELS = 4096
#: How far the per-pixel class sums may be from 1 for a unary to be taken for normalised values.
SUM_TOLERANCE = 1e-3
#: Relative tolerance of ``sum_c exp(-U) = 1`` for energies (``unary_from_softmax`` clips p at 1e-5).
ENERGY_TOLERANCE = 1e-2
#: Colour bandwidths at least this large are meant for 0..255 values, not for an image in [0, 1].
LARGE_THETA_BETA = 2.0


class InputWarning(UserWarning):
    """An input looks like a common mistake (energies or probabilities passed as logits, an image in [0, 1]
    with bandwidths meant for 0..255). The message says how to fix it; filter the category to silence it."""


def _shape_text(shape):
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_unary_layout(unary, image, spatial_dims=2):
    """Raise a ValueError when ``unary`` is channels-last (H, W, C) for an (H, W, F) ``image``.

    Reads only the shapes. Inputs of other shapes pass (other checks report them).

    Parameters
    ----------
    unary : array, shape (C, H, W) or (B, C, H, W); volumes (C, D, H, W) or (B, C, D, H, W)
    image : array, shape (H, W, F) or (B, H, W, F); volumes (D, H, W, F) or (B, D, H, W, F); or None
    spatial_dims : {2, 3}
    """
    nd = spatial_dims
    ushape = tuple(getattr(unary, "shape", ()))
    ishape = tuple(getattr(image, "shape", ())) if image is not None else ()
    if len(ushape) not in (nd + 1, nd + 2) or len(ishape) != len(ushape):
        return
    batched = len(ushape) == nd + 2
    size = ishape[-nd - 1:-1]
    if ushape[-nd:] == size or ushape[-nd - 1:-1] != size or ishape[-nd:] == ushape[-nd:]:
        return  # the unary fits, or does not fit either way, or the image is the channels-first one
    if batched and ushape[0] != ishape[0]:
        return
    names = "H, W" if nd == 2 else "D, H, W"
    spatial_axes = ", ".join(str(a) for a in range(1 if batched else 0, (1 if batched else 0) + nd))
    layout, fix, torch_fix = (
        (f"(B, C, {names})", "np.moveaxis(unary, -1, 1)", f"unary.permute(0, {nd + 1}, {spatial_axes})") if batched
        else (f"(C, {names})", "np.moveaxis(unary, -1, 0)", f"unary.permute({nd}, {spatial_axes})")
    )
    raise ValueError(
        f"unary has shape {_shape_text(ushape)}, which looks channels-last (the image is {'x'.join(map(str, size))} "
        f"and the unary's last axis holds {ushape[-1]} classes); cucrf expects class scores as {layout}: pass "
        f"{fix} (for a torch.Tensor, {torch_fix})"
    )


def _to_host(a):
    return a.get() if type(a).__module__.split(".")[0] == "cupy" else np.asarray(a)


def _pixel_sample(unary, spatial_dims=2):
    """Up to :data:`SAMPLE_PIXELS` pixels of a (C, *spatial) or (B, C, *spatial) unary, as a float64 (C, N) array."""
    u = unary if unary.ndim == spatial_dims + 2 else unary[None]
    B, C = u.shape[:2]
    flat = u.swapaxes(0, 1).reshape(C, -1) if B > 1 else u[0].reshape(C, -1)
    step = max(1, flat.shape[1] // SAMPLE_PIXELS)
    return _to_host(flat[:, ::step][:, :SAMPLE_PIXELS]).astype(np.float64)


def _warn(message, stacklevel):
    warnings.warn(message, InputWarning, stacklevel=stacklevel + 2)


def _check_logits(unary, stacklevel, spatial_dims=2, unary_extremes=None):
    xp = array_namespace(unary)
    lo, hi = unary_extremes if unary_extremes is not None else (float(xp.min(unary)), float(xp.max(unary)))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return  # NaN and infinity are refused elsewhere
    class_axis = "0" if unary.ndim == spatial_dims + 1 else "1"
    if 0.0 <= lo and hi <= 1.0:
        sums = _pixel_sample(unary, spatial_dims).sum(axis=0)
        if np.all(np.abs(sums - 1.0) <= SUM_TOLERANCE):
            _warn(
                f"unary looks like probabilities (values in [{lo:.3g}, {hi:.3g}] summing to 1 over the classes on "
                f"axis {class_axis}), but unary_kind='logits' treats it as class scores (log-probabilities), so "
                "the CRF sees nearly uniform classes; pass unary_kind='probabilities' (or np.log of them)",
                stacklevel,
            )
            return
    if lo >= 0.0:
        sums = np.exp(-_pixel_sample(unary, spatial_dims)).sum(axis=0)
        if np.all(np.abs(sums - 1.0) <= ENERGY_TOLERANCE):
            _warn(
                f"unary looks like energies -log(p) (all values >= 0, in [{lo:.3g}, {hi:.3g}], and exp(-unary) sums "
                f"to 1 over the classes on axis {class_axis}, as pydensecrf.utils.unary_from_softmax returns), but "
                "cucrf takes class scores (larger = more likely), so the CRF would prefer the least likely class; "
                "pass -energies, or unary_kind='probabilities' with np.exp(-energies)",
                stacklevel,
            )


def _check_image_scale(image, params, stacklevel):
    kind = getattr(getattr(image, "dtype", None), "kind", None)
    if kind != "f" or params.appearance_weight == 0 or getattr(image, "size", 0) == 0:
        return
    theta_beta = np.atleast_1d(np.asarray(params.theta_beta, dtype=np.float64))
    if theta_beta.min() < LARGE_THETA_BETA:
        return
    xp = array_namespace(image)
    lo, hi = float(xp.min(image)), float(xp.max(image))
    if not (0.0 <= lo and 0.0 < hi <= 1.0):
        return
    shown = params.theta_beta if isinstance(params.theta_beta, float) else tuple(params.theta_beta)
    scaled = (round(float(theta_beta[0]) / 255, 3) if theta_beta.size == 1
              else tuple(round(float(t) / 255, 3) for t in theta_beta))
    _warn(
        f"image is a float image with values in [{lo:.3g}, {hi:.3g}], but theta_beta={shown} is a colour "
        "bandwidth for 0..255 values, so colour differences barely change the appearance kernel; pass the "
        f"image times 255, or theta_beta={scaled} for values in [0, 1]",
        stacklevel,
    )


def _as_params(params):
    if params is None:
        return CRFParams()
    if isinstance(params, dict):
        return CRFParams.from_dict(params)
    return params


def check_inputs(unary, image, *, unary_kind, params, stacklevel=1, spatial_dims=2, unary_extremes=None):
    """Warn about inputs that look like common mistakes; raise for a channels-last unary.

    Reads the unary's and the image's minimum and maximum once, and sums over the classes at up
    to 4096 sampled pixels, so the cost is a small fraction of one inference.

    Parameters
    ----------
    unary : NumPy or CuPy array, shape (C, H, W) or (B, C, H, W)
        What is passed to :func:`cucrf.infer` as ``unary`` (label maps, of shape (H, W) or
        (B, H, W), are left alone).
    image : NumPy or CuPy array, shape (H, W, F) or (B, H, W, F), or None
        The image, in the units ``params.theta_beta`` refers to. None skips the image checks (as
        when a feature transform changes those units).
    unary_kind : {'logits', 'probabilities', 'labels'}
        What ``unary`` holds; the checks of its values apply to ``'logits'``.
    params : CRFParams, dict or None
        The CRF parameters (None: the defaults).
    stacklevel : int
        Which caller the warnings point to: 1 is the caller of this function, 2 its caller, ...
    spatial_dims : {2, 3}
        2 for images, 3 for volumes ((C, D, H, W) unaries with (D, H, W, F) images).
    unary_extremes : (float, float), optional
        The unary's minimum and maximum when the caller already has them (not read again).

    Returns
    -------
    None

    Raises
    ------
    ValueError
        When ``unary`` is channels-last: shape (H, W, C) for an (H, W, F) image (or
        (B, H, W, C) for a batch).

    Warns
    -----
    InputWarning
        For ``unary_kind='logits'``: a unary that looks like probabilities (all values in [0, 1],
        summing to 1 over the classes) or like pydensecrf energies ``-log(p)`` (all values
        >= 0, ``exp(-unary)`` summing to 1). For a float image with values in [0, 1] while every
        ``theta_beta`` is at least 2 (bandwidths for 0..255 values; the default is 20).

    Examples
    --------
    >>> import warnings, numpy as np
    >>> from cucrf._diagnostics import InputWarning, check_inputs
    >>> p = np.full((2, 4, 5), 0.5, dtype=np.float32)
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     check_inputs(p, np.zeros((4, 5, 3), np.uint8), unary_kind="logits", params=None)
    >>> w[0].category is InputWarning, "unary_kind='probabilities'" in str(w[0].message)
    (True, True)
    """
    level = stacklevel + 1
    nd = spatial_dims
    if image is not None:
        check_unary_layout(unary, image, nd)
    params = _as_params(params)
    dtype = getattr(unary, "dtype", None)
    if unary_kind == "logits" and dtype is not None and dtype.kind == "f" and unary.ndim in (nd + 1, nd + 2) \
            and unary.size and unary.shape[-nd - 1] >= 2:
        _check_logits(unary, level, nd, unary_extremes)
    if image is not None:
        _check_image_scale(image, params, level)
