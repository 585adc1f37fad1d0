"""Segmentation metrics: confusion matrix, pixel accuracy and (mean) intersection over union.

All functions work on NumPy arrays. A CuPy array (anything with a ``.get()`` method returning a
NumPy array) is copied to the host first; CuPy is never imported by this module.

Conventions
-----------
* The confusion matrix ``cm`` is ``int64`` of shape ``(C, C)``; ``cm[t, p]`` counts pixels whose
  true label is ``t`` and predicted label is ``p`` (rows = ground truth, columns = prediction).
* Pixels whose label equals ``ignore_index`` (255 by default) are not counted.
* ``mean_iou`` averages the per-class IoU over the classes that occur in the ground truth *or* in
  the prediction (classes absent from both have an undefined IoU and are left out).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "confusion_matrix",
    "pixel_accuracy",
    "per_class_iou",
    "mean_iou",
    "SegmentationScore",
]


def _to_numpy(x, name: str) -> np.ndarray:
    """Return ``x`` as a NumPy array, copying a CuPy (device) array to the host."""
    if isinstance(x, np.ndarray):
        return x
    get = getattr(x, "get", None)
    if callable(get) and type(x).__module__.split(".")[0] == "cupy":
        return np.asarray(get())
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(
            f"{name} must be an array of integer class ids; received {type(x).__name__}"
        ) from exc


def _check_int(arr: np.ndarray, name: str) -> None:
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(
            f"{name} must have an integer dtype (class ids); received dtype {arr.dtype}. "
            f"Take the argmax over the class axis first, e.g. {name}=probs.argmax(0)."
        )


def confusion_matrix(pred, label, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """Confusion matrix of a predicted label map against the ground truth.

    Parameters
    ----------
    pred : array_like of int, shape (...)
        Predicted class ids in ``[0, num_classes)``. Any shape, identical to ``label``'s
        (e.g. ``(H, W)`` or a batch ``(N, H, W)``).
    label : array_like of int, shape (...)
        Ground-truth class ids in ``[0, num_classes)`` or ``ignore_index``.
    num_classes : int
        Number of classes ``C`` (>= 1).
    ignore_index : int or None, default 255
        Label value whose pixels are skipped. ``None`` ignores nothing.

    Returns
    -------
    numpy.ndarray of int64, shape (C, C)
        ``cm[t, p]`` = number of counted pixels with true class ``t`` and predicted class ``p``.

    Raises
    ------
    TypeError
        If ``pred`` or ``label`` is not of an integer dtype.
    ValueError
        If shapes differ, ``num_classes`` < 1, or a label / prediction is out of range.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int; received {num_classes!r}")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; received {num_classes}")
    pred = _to_numpy(pred, "pred")
    label = _to_numpy(label, "label")
    _check_int(pred, "pred")
    _check_int(label, "label")
    if pred.shape != label.shape:
        raise ValueError(
            f"pred and label must have the same shape; received pred {pred.shape} and "
            f"label {label.shape}. If pred holds class scores (C, H, W), take pred.argmax(0)."
        )
    pred = pred.ravel().astype(np.int64, copy=False)
    label = label.ravel().astype(np.int64, copy=False)

    if ignore_index is not None:
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]

    bad = (label < 0) | (label >= num_classes)
    if bad.any():
        value = int(label[bad][0])
        raise ValueError(
            f"label contains value {value}, outside [0, {num_classes}) and not equal to "
            f"ignore_index={ignore_index}; check num_classes or the label encoding"
        )
    bad = (pred < 0) | (pred >= num_classes)
    if bad.any():
        value = int(pred[bad][0])
        raise ValueError(
            f"pred contains value {value}, outside [0, {num_classes}); check num_classes"
        )
    # One bincount over a combined index is much faster than np.add.at.
    cm = np.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _check_cm(cm) -> np.ndarray:
    cm = _to_numpy(cm, "cm")
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (C, C) confusion matrix; received shape {cm.shape}")
    if np.issubdtype(cm.dtype, np.number) and (cm < 0).any():
        raise ValueError("cm must hold non-negative counts; received negative entries")
    return cm


def pixel_accuracy(cm) -> float:
    """Fraction of counted pixels whose prediction equals the ground truth.

    Parameters
    ----------
    cm : array_like, shape (C, C)
        Confusion matrix from :func:`confusion_matrix`.

    Returns
    -------
    float
        ``trace(cm) / sum(cm)``; NaN if ``cm`` counts no pixel.
    """
    cm = _check_cm(cm)
    total = cm.sum()
    if total == 0:
        return float("nan")
    return float(np.trace(cm) / total)


def per_class_iou(cm) -> np.ndarray:
    """Intersection over union for every class.

    Parameters
    ----------
    cm : array_like, shape (C, C)
        Confusion matrix (rows = ground truth, columns = prediction).

    Returns
    -------
    numpy.ndarray of float64, shape (C,)
        ``tp / (tp + fp + fn)`` per class; NaN for a class absent from both the ground truth
        and the prediction (its IoU is undefined).
    """
    cm = _check_cm(cm).astype(np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.full(cm.shape[0], np.nan)
    present = union > 0
    iou[present] = tp[present] / union[present]
    return iou


def mean_iou(cm, classes: str = "gt_or_pred") -> float:
    """Mean IoU over the classes present in the ground truth or the prediction.

    Parameters
    ----------
    cm : array_like, shape (C, C)
        Confusion matrix.
    classes : {"gt_or_pred", "gt"}
        Which classes the mean runs over: those present in the ground truth or the prediction
        (the standard definition: a class predicted but absent counts with IoU 0), or only those
        present in the ground truth (kinder to small evaluation sets, where a few stray pixels
        of an absent class would otherwise weigh as much as a whole class).

    Returns
    -------
    float
        Mean of :func:`per_class_iou` ignoring NaN entries; NaN if no class is present.
    """
    if classes not in ("gt_or_pred", "gt"):
        raise ValueError(f"classes must be 'gt_or_pred' or 'gt', got {classes!r}")
    iou = per_class_iou(cm)
    if classes == "gt":
        iou = np.where(_check_cm(cm).sum(axis=1) > 0, iou, np.nan)
    if np.isnan(iou).all():
        return float("nan")
    return float(np.nanmean(iou))


class SegmentationScore:
    """Accumulate a confusion matrix over many images and report accuracy / IoU.

    Parameters
    ----------
    num_classes : int
        Number of classes ``C``.
    ignore_index : int or None, default 255
        Label value to skip.

    Examples
    --------
    >>> score = SegmentationScore(3)
    >>> score.add(np.array([[0, 1]]), np.array([[0, 2]]))
    >>> score.accuracy
    0.5
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise TypeError(f"num_classes must be an int; received {num_classes!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; received {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.cm = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, pred, label) -> None:
        """Add one prediction / ground-truth pair (integer arrays of equal shape)."""
        self.cm += confusion_matrix(pred, label, self.num_classes, self.ignore_index)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.cm[...] = 0

    @property
    def accuracy(self) -> float:
        """Pixel accuracy over everything added (float)."""
        return pixel_accuracy(self.cm)

    @property
    def miou(self) -> float:
        """Mean IoU over classes present in ground truth or prediction (float)."""
        return mean_iou(self.cm)

    @property
    def per_class_iou(self) -> np.ndarray:
        """Per-class IoU, float64 (C,), NaN for absent classes."""
        return per_class_iou(self.cm)

    def __repr__(self) -> str:
        return (
            f"SegmentationScore(num_classes={self.num_classes}, pixels={int(self.cm.sum())}, "
            f"accuracy={self.accuracy:.4f}, miou={self.miou:.4f})"
        )
