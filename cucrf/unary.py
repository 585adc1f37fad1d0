"""Building unaries (class scores) from what segmentation pipelines produce.

cucrf's unary is a *score* (larger = more likely), e.g. a network's logits. These helpers turn
probabilities or label maps into log-probabilities, which are valid scores.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._validation import array_namespace as _namespace
from ._validation import check_float_array, check_int

__all__ = ["unary_from_probabilities", "unary_from_labels"]


def unary_from_probabilities(probabilities, clip=1e-5):
    """Log-probability unary from per-pixel class probabilities.

    Parameters
    ----------
    probabilities : array_like, shape (C, H, W) or (B, C, H, W), values in [0, 1]
        Class probabilities, e.g. a network's softmax output.
    clip : float
        Probabilities are clipped to ``[clip, 1]`` before the logarithm, so that a probability of
        0 becomes a large finite penalty (``log(1e-5) = -11.5``) instead of ``-inf``.

    Returns
    -------
    ndarray, same shape, float32 (float64 for float64 input)
        ``log(clip(probabilities))``.

    Examples
    --------
    >>> import numpy as np
    >>> u = unary_from_probabilities(np.array([[[1.0]], [[0.0]]]))
    >>> u[:, 0, 0].round(2).tolist()
    [0.0, -11.51]
    """
    xp = _namespace(probabilities)
    p = xp.asarray(probabilities)
    check_float_array("probabilities", p, xp, ndims=(3, 4))
    if isinstance(clip, (bool, np.bool_)) or not isinstance(clip, numbers.Real) or not 0 < float(clip) < 1:
        raise ValueError(f"clip must be a number in (0, 1), got {clip!r}")
    dt = np.dtype(np.float64 if p.dtype == np.float64 else np.float32)
    tiny = float(np.finfo(dt).tiny)
    if float(clip) < tiny:
        # A smaller clip rounds to 0 in the dtype (or is subnormal, which GPUs may flush to 0): log(0) = -inf.
        raise ValueError(
            f"clip must be at least {tiny:.3g} (the smallest normal {dt.name}) for {dt.name} probabilities, so that "
            f"log(clip) is finite, got {clip!r}; use a larger clip (the default is 1e-05)"
            + (" or float64 probabilities" if dt != np.float64 else "")
        )
    lo, hi = float(p.min()), float(p.max())
    if lo < 0 or hi > 1 + 1e-6:
        raise ValueError(
            f"probabilities must lie in [0, 1], got values in [{lo:g}, {hi:g}]; "
            "for logits or log-probabilities pass them to cucrf.infer directly"
        )
    return xp.log(xp.clip(p.astype(dt), dt.type(clip), dt.type(1.0)))


#: Default ``confidence`` of :func:`unary_from_labels` for three or more classes.
DEFAULT_CONFIDENCE = 0.5
#: Default ``confidence`` for two classes, where 0.5 would be the uniform distribution.
DEFAULT_CONFIDENCE_TWO_CLASSES = 0.7


def default_confidence(num_classes):
    """The ``confidence`` that ``confidence=None`` stands for with ``num_classes`` classes.

    Parameters
    ----------
    num_classes : int
        Number of classes ``C`` (>= 2).

    Returns
    -------
    float
        0.7 for two classes (0.5 would carry no information there), 0.5 otherwise.
    """
    return DEFAULT_CONFIDENCE_TWO_CLASSES if num_classes == 2 else DEFAULT_CONFIDENCE


def unary_from_labels(labels, num_classes, confidence=None, unknown_label=None, *, spatial_dims=2):
    """Log-probability unary from a label map, trusting each label with ``confidence``.

    A pixel with label ``l`` gets probability ``confidence`` for ``l`` and
    ``(1 - confidence) / (C - 1)`` for every other class; a pixel with ``unknown_label`` gets
    ``1 / C`` everywhere, so the CRF fills it in from its neighbours.

    Parameters
    ----------
    labels : array_like of int, shape (H, W) or (B, H, W); volumes (D, H, W) or (B, D, H, W)
        Class ids in ``[0, num_classes)``, or ``unknown_label``.
    num_classes : int
        Number of classes ``C`` (>= 2).
    confidence : float or None
        Probability given to the labelled class, in ``(1 / C, 1)``. None (the default) means
        0.5 for ``C >= 3`` and 0.7 for ``C = 2`` (where 0.5 would be uniform).
    unknown_label : int or None
        Label value meaning "unknown" (e.g. 0 in pydensecrf's convention, 255 in VOC's).
    spatial_dims : {2, 3}
        Number of spatial axes of ``labels``: 2 for images, 3 for volumes.

    Returns
    -------
    ndarray, shape (C, *spatial) or (B, C, *spatial), float32

    Examples
    --------
    >>> import numpy as np
    >>> u = unary_from_labels(np.array([[0, 1]]), num_classes=2, confidence=0.8)
    >>> [round(float(v), 3) for v in np.exp(u[:, 0, 0])]
    [0.8, 0.2]
    """
    xp = _namespace(labels)
    lab = xp.asarray(labels)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array of class ids, got dtype {lab.dtype}")
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
    if lab.ndim not in (spatial_dims, spatial_dims + 1):
        names = "H, W" if spatial_dims == 2 else "D, H, W"
        raise ValueError(f"labels must have shape ({names}) or (B, {names}) with spatial_dims={spatial_dims}, "
                         f"got shape {tuple(lab.shape)}")
    if lab.size == 0:
        raise ValueError(f"labels must not be empty, got shape {tuple(lab.shape)}")
    if confidence is None:
        confidence = default_confidence(num_classes)
    if isinstance(confidence, (bool, np.bool_)) or not isinstance(confidence, numbers.Real) \
            or not 1.0 / num_classes < float(confidence) < 1.0:
        raise ValueError(
            f"confidence must be a number in (1/num_classes, 1) = ({1.0 / num_classes:.3g}, 1) for "
            f"num_classes={num_classes}, or None for the default, got {confidence!r}"
        )
    unknown_label = _check_unknown_label(unknown_label)
    # Compared in the labels' own dtype: uint64 ids above 2**63 - 1 would wrap to negative int64.
    unknown = xp.zeros(lab.shape, dtype=bool) if unknown_label is None else _equals(lab, unknown_label)
    bad = (~unknown) & ((lab < 0) | (lab >= num_classes)) if lab.dtype.kind == "i" else (~unknown) & (lab >= num_classes)
    if bool(bad.any()):
        values = sorted(set(int(v) for v in np.unique(_to_numpy(lab[bad]))[:5]))
        raise ValueError(
            f"labels contains value(s) {values} outside [0, {num_classes}); "
            f"unknown_label is {unknown_label!r}"
        )
    lab = xp.where(unknown, 0, lab).astype(np.int64)  # every value now fits
    confidence = float(confidence)
    other = np.log((1.0 - confidence) / (num_classes - 1))
    class_axis = 0 if lab.ndim == spatial_dims else 1
    classes = xp.arange(num_classes).reshape((1,) * class_axis + (num_classes,) + (1,) * spatial_dims)
    lab_b = xp.expand_dims(lab, class_axis)
    out = xp.where(lab_b == classes, np.float32(np.log(confidence)), np.float32(other)).astype(np.float32)
    uniform = np.float32(-np.log(num_classes))
    out = xp.where(xp.expand_dims(unknown, class_axis), uniform, out)
    return out.astype(np.float32)


def _check_unknown_label(unknown_label):
    """``unknown_label`` as an int or None; a float with a fraction is a ValueError, anything else a TypeError."""
    if unknown_label is None:
        return None
    if isinstance(unknown_label, (bool, np.bool_)) or not isinstance(unknown_label, numbers.Real):
        raise TypeError(f"unknown_label must be an integer label id or None, got {unknown_label!r} of type "
                        f"{type(unknown_label).__name__}")
    if isinstance(unknown_label, numbers.Integral):
        return int(unknown_label)
    if not (np.isfinite(unknown_label) and float(unknown_label).is_integer()):
        raise ValueError(f"unknown_label must be a whole number (a label id), got {unknown_label!r}")
    return int(unknown_label)


def _equals(labels, value):
    """``labels == value`` for an int ``value`` that may lie outside the labels' dtype (never equal then)."""
    info = np.iinfo(labels.dtype)
    if not info.min <= value <= info.max:
        return _namespace(labels).zeros(labels.shape, dtype=bool)
    return labels == labels.dtype.type(value)


def _to_numpy(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
