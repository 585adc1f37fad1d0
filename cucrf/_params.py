"""CRF parameters: an immutable, validated, JSON-serialisable record."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Sequence
from typing import Optional, Tuple, Union

import numpy as np

__all__ = ["CRFParams"]

_POTTS = "potts"
_BOM = "\ufeff"


# The kernels compute 1 / theta^2 (in Python floats, then float32) and scale positions and image
# values by 1 / theta. With theta in [1e-6, 1e6], 1 / theta^2 lies in [1e-12, 1e12], far inside
# float32's normal range [1.2e-38, 3.4e38]: squared distances up to ~1e26 still give finite
# exponents, and theta^3 in the gradients stays finite. Outside it, 1e-300 ** 2 rounds to 0
# (ZeroDivisionError) and 1e300 ** 2 overflows (OverflowError).
BANDWIDTH_RANGE = (1e-6, 1e6)
# Kernel weights, compatibility entries and the unary weight multiply messages that are at most
# the window's kernel mass (or unary scores); |value| <= 1e6 keeps products like
# weight * mu * message (<= 1e6 * 1e6 * 1e4) far below float32's maximum of 3.4e38.
MAX_ABS_WEIGHT = 1e6


def _to_float(name, value, allowed):
    """``value`` (a real number) as a float; an integer too large for a float is a ValueError naming ``name``."""
    try:
        return float(value)
    except OverflowError:
        digits = math.floor((abs(int(value)).bit_length() - 1) * math.log10(2)) + 1  # at most one too few
        raise ValueError(f"{name} must be in {allowed}, got an integer of {digits} or more digits, too large "
                         "for a float") from None


def _as_positive_float(name, value):
    """``value`` as a float bandwidth in ``BANDWIDTH_RANGE``; raises TypeError/ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = _to_float(name, value, f"[{BANDWIDTH_RANGE[0]:g}, {BANDWIDTH_RANGE[1]:g}]")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    low, high = BANDWIDTH_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return value


def _as_finite_float(name, value):
    """``value`` as a float with ``|value| <= MAX_ABS_WEIGHT``; raises TypeError/ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = _to_float(name, value, f"[-{MAX_ABS_WEIGHT:g}, {MAX_ABS_WEIGHT:g}]")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if abs(value) > MAX_ABS_WEIGHT:
        raise ValueError(f"{name} must be in [-{MAX_ABS_WEIGHT:g}, {MAX_ABS_WEIGHT:g}], got {value!r}")
    return value


def _as_theta_beta(value):
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return _as_positive_float("theta_beta", value)
    if isinstance(value, (str, bytes)) or not (isinstance(value, Sequence) or hasattr(value, "shape")):
        unordered = " (a set or mapping has no channel order)" if hasattr(value, "__len__") else ""
        raise TypeError(
            "theta_beta must be a positive number or a sequence (tuple, list or array) with one positive "
            f"number per image channel, in channel order; got {value!r} of type {type(value).__name__}{unordered}"
        )
    values = tuple(np.asarray(value, dtype=object).ravel().tolist()) if hasattr(value, "shape") else tuple(value)
    if len(values) == 0:
        raise ValueError("theta_beta must not be an empty sequence")
    return tuple(_as_positive_float(f"theta_beta[{i}]", v) for i, v in enumerate(values))


def _as_compatibility(value):
    if value is None or (isinstance(value, str) and value.lower() == _POTTS):
        return _POTTS
    if isinstance(value, str):
        raise ValueError(f"compatibility must be 'potts' or a (C, C) matrix, got the string {value!r}")
    try:
        given = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"compatibility must be 'potts' or a (C, C) matrix of numbers, got {value!r}") from exc
    if given.dtype.kind == "c":  # a float conversion would silently drop the imaginary part
        raise TypeError(f"compatibility must be real, got complex dtype {given.dtype}")
    try:
        matrix = np.array(given, dtype=np.float64)
    except OverflowError:
        raise ValueError(f"compatibility entries must be in [-{MAX_ABS_WEIGHT:g}, {MAX_ABS_WEIGHT:g}], got an "
                         "integer too large for a float") from None
    except (TypeError, ValueError) as exc:
        raise TypeError(f"compatibility must be 'potts' or a (C, C) matrix of numbers, got {value!r}") from exc
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(
            f"compatibility must be 'potts' or a square (C, C) matrix with C >= 2, got shape {matrix.shape}"
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError("compatibility must contain only finite values")
    too_large = np.argwhere(np.abs(matrix) > MAX_ABS_WEIGHT)
    if len(too_large):
        i, j = (int(v) for v in too_large[0])
        raise ValueError(
            f"compatibility entries must be in [-{MAX_ABS_WEIGHT:g}, {MAX_ABS_WEIGHT:g}], "
            f"got compatibility[{i}][{j}] = {float(matrix[i, j])!r}"
        )
    return tuple(tuple(float(v) for v in row) for row in matrix)


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Parameters of the ConvCRF model.

    The pairwise energy between pixels ``i`` and ``j`` (``j`` in the window of ``i``) is
    ``mu(x_i, x_j) * (appearance_weight * k_a(i, j) + smoothness_weight * k_s(i, j))`` with

    * ``k_a = exp(-|p_i - p_j|^2 / (2 theta_alpha^2) - sum_f (I_if - I_jf)^2 / (2 theta_beta_f^2))``
      (appearance, or bilateral, kernel: nearby pixels of similar colour want the same label);
    * ``k_s = exp(-|p_i - p_j|^2 / (2 theta_gamma^2))`` (smoothness kernel: removes small
      isolated regions).

    Positions ``p`` are in pixels of the full-resolution image, image values ``I`` in the units of
    the image given to :func:`cucrf.infer` (0..255 for uint8 images).

    Parameters
    ----------
    theta_alpha : float
        Spatial bandwidth of the appearance kernel, in pixels, in [1e-6, 1e6].
    theta_beta : float or tuple of float
        Colour bandwidth of the appearance kernel, in image units; one value for all channels or
        one per image channel, each in [1e-6, 1e6].
    theta_gamma : float
        Spatial bandwidth of the smoothness kernel, in pixels, in [1e-6, 1e6].
    appearance_weight, smoothness_weight : float
        Kernel weights ``w``, in [-1e6, 1e6]; 0 switches a kernel off.
    compatibility : 'potts' or (C, C) array_like
        Label compatibility ``mu(l, l')``: the cost of giving label ``l`` to a pixel whose
        neighbour has label ``l'``. ``'potts'`` is ``mu = 1 - identity``. Entries in [-1e6, 1e6].
    unary_weight : float
        Factor ``a`` applied to the unary scores (the inverse of a softmax temperature), in
        [-1e6, 1e6].

    Raises
    ------
    TypeError
        When a field is not a number (or, for ``compatibility``, not a matrix of numbers).
    ValueError
        When a value is NaN, infinite or outside the ranges above, which keep the kernel
        arithmetic (``1 / theta^2`` and the weighted messages, in float32) finite.

    Examples
    --------
    >>> p = CRFParams(theta_beta=(10.0, 12.0, 14.0))
    >>> p.theta_beta
    (10.0, 12.0, 14.0)
    >>> CRFParams.from_json(p.to_json()) == p
    True
    """

    theta_alpha: float = 80.0
    theta_beta: Union[float, Tuple[float, ...]] = 20.0
    theta_gamma: float = 3.0
    appearance_weight: float = 10.0
    smoothness_weight: float = 3.0
    compatibility: Union[str, Tuple[Tuple[float, ...], ...]] = _POTTS
    unary_weight: float = 1.0

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "theta_alpha", _as_positive_float("theta_alpha", self.theta_alpha))
        set_(self, "theta_beta", _as_theta_beta(self.theta_beta))
        set_(self, "theta_gamma", _as_positive_float("theta_gamma", self.theta_gamma))
        set_(self, "appearance_weight", _as_finite_float("appearance_weight", self.appearance_weight))
        set_(self, "smoothness_weight", _as_finite_float("smoothness_weight", self.smoothness_weight))
        set_(self, "compatibility", _as_compatibility(self.compatibility))
        set_(self, "unary_weight", _as_finite_float("unary_weight", self.unary_weight))

    # -- derived values -------------------------------------------------------------------
    @property
    def is_potts(self) -> bool:
        """True when the compatibility is the Potts model."""
        return self.compatibility == _POTTS

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes fixed by a compatibility matrix, or None for Potts."""
        return None if self.is_potts else len(self.compatibility)

    def compatibility_matrix(self, num_classes: int) -> np.ndarray:
        """Return ``mu`` as a float64 array of shape (C, C)."""
        if self.is_potts:
            return 1.0 - np.eye(num_classes)
        matrix = np.array(self.compatibility, dtype=np.float64)
        if matrix.shape[0] != num_classes:
            raise ValueError(
                f"params.compatibility has shape {matrix.shape} but the unary has {num_classes} classes; "
                f"expected ({num_classes}, {num_classes})"
            )
        return matrix

    def theta_beta_vector(self, num_channels: int) -> np.ndarray:
        """Return the colour bandwidths as a float64 array of shape (F,)."""
        if isinstance(self.theta_beta, float):
            return np.full(num_channels, self.theta_beta)
        if len(self.theta_beta) != num_channels:
            raise ValueError(
                f"params.theta_beta has {len(self.theta_beta)} values but the image has {num_channels} "
                f"channels; give one value or {num_channels}"
            )
        return np.array(self.theta_beta, dtype=np.float64)

    def replace(self, **changes) -> "CRFParams":
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Return the parameters as a JSON-compatible dict."""
        out = dataclasses.asdict(self)
        if isinstance(out["theta_beta"], tuple):
            out["theta_beta"] = list(out["theta_beta"])
        if out["compatibility"] != _POTTS:
            out["compatibility"] = [list(row) for row in out["compatibility"]]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CRFParams":
        """Build parameters from a dict such as :meth:`to_dict` returns; unknown keys are errors."""
        if not isinstance(data, dict):
            raise TypeError(f"CRF parameters must be a JSON object (dict), got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CRF parameter(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    def to_json(self, path: Union[str, os.PathLike, None] = None) -> str:
        """Return the parameters as JSON text; with ``path``, also write them to that file."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, bytes, os.PathLike]) -> "CRFParams":
        """Read parameters from JSON text or from a JSON file.

        Parameters
        ----------
        text_or_path : str, bytes or os.PathLike
            A ``str`` whose first character (after white space or a UTF-8 byte order mark) is
            ``{`` or ``[`` is JSON text; any other ``str`` and every ``os.PathLike``
            (``pathlib.Path``) is a file path; ``bytes`` are UTF-8 JSON text. A byte order mark at
            the start of the text or file is ignored.

        Raises
        ------
        TypeError
            For another type.
        ValueError
            When the file cannot be read, the text is not JSON, or holds something other than an
            object of known parameters with valid values.
        """
        if isinstance(text_or_path, (bytes, bytearray)):
            try:
                text = bytes(text_or_path).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"CRF parameters given as bytes must be UTF-8 JSON text: {exc}") from exc
            source, path = "the JSON bytes", None
        elif isinstance(text_or_path, os.PathLike) or (
                isinstance(text_or_path, str) and not text_or_path.lstrip(_BOM + " \t\r\n").startswith(("{", "["))):
            path = os.fspath(text_or_path)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read CRF parameters from {path!r}: {exc}") from exc
            source = f"file {path!r}"
        elif isinstance(text_or_path, str):
            text, source, path = text_or_path, "the JSON text", None
        else:
            raise TypeError("CRF parameters must be JSON text (str or bytes) or a file path (str or os.PathLike), "
                            f"got {type(text_or_path).__name__}")
        try:
            data = json.loads(text.lstrip(_BOM))
        except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
            hint = ""
            if path is None and isinstance(text_or_path, str) and os.path.exists(text_or_path):
                hint = (f"; a str starting with '{{' or '[' is read as JSON text, but a file of that name exists: "
                        f"pass pathlib.Path({text_or_path!r}) to read the file")
            raise ValueError(f"CRF parameters in {source} are not valid JSON: {exc}{hint}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"CRF parameters in {source} must be a JSON object such as {{\"theta_alpha\": 80.0}}, "
                             f"got a JSON {type(data).__name__}")
        return cls.from_dict(data)

    save = to_json
    load = from_json
