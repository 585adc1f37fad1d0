"""Running the CRF for the commands: class counts, normalisation names, timing."""

from __future__ import annotations

import time

import numpy as np

from ._errors import CLIError

IGNORE = 255  # the label of pixels to ignore (VOC's convention)


def to_numpy(a) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return a.get() if type(a).__module__.split(".")[0] == "cupy" else np.asarray(a)


def normalization(value):
    """The ``normalization`` argument of :func:`cucrf.infer` for the option's value."""
    return None if value == "none" else value


def num_classes_from_labels(label: np.ndarray, unknown, given, what: str) -> int:
    """``given``, or the largest class id (other than the unknown label) + 1, at least 2."""
    if given is not None:
        return given
    known = label if unknown is None else label[label != unknown]
    if known.size == 0:
        raise CLIError(f"{what} holds no class ids other than the unknown label {unknown}; expected some labelled "
                       "pixels (or give --num-classes)")
    return max(int(known.max()) + 1, 2)


def run_crf(unary, image, args, params, **kwargs):
    """Run :func:`cucrf.infer` with the CRF options of ``args``; return (float32 NumPy probabilities, seconds)."""
    from .._api import infer

    if getattr(args, "include_self", False):
        kwargs["include_self"] = True
    start = time.perf_counter()
    q = infer(
        unary, image, params, filter_size=args.filter_size, blur=args.blur,
        iterations=args.iterations, normalization=normalization(args.normalization),
        device=args.device, **kwargs,
    )
    q = to_numpy(q)  # also waits for the GPU, so the time is the real one
    return q.astype(np.float32, copy=False), time.perf_counter() - start
