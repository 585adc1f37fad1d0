"""Choosing the array library and the backend that computes on it."""

from __future__ import annotations

import numpy as np

from ._validation import array_library

__all__ = ["to_backend_array", "get_backend", "CUPY_INSTALL_HINT"]

CUPY_INSTALL_HINT = (
    "the GPU backend needs CuPy: install it with `pip install cucrf[cuda12]` or "
    "`pip install cucrf[cuda13]` (matching your CUDA driver)"
)

_DLPACK_CPU = 1
_DLPACK_CUDA = 2


def _import_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(CUPY_INSTALL_HINT) from exc
    return cupy


def to_backend_array(name, value, device):
    """Return ``(array, library)`` with ``array`` a NumPy or CuPy array sharing memory when possible.

    Parameters
    ----------
    name : str
        Argument name, for error messages.
    value : array_like
        NumPy or CuPy array, any object exposing ``__dlpack__``, or a nested sequence.
    device : {None, 'cpu', 'gpu'}
        Where to compute; None keeps the data where it is.
    """
    library = array_library(name, value)
    if library == "dlpack":
        dev_type = value.__dlpack_device__()[0] if hasattr(value, "__dlpack_device__") else _DLPACK_CPU
        if int(dev_type) == _DLPACK_CUDA:
            value, library = _import_cupy().from_dlpack(value), "cupy"
        else:
            try:
                value, library = np.from_dlpack(value), "numpy"
            except (TypeError, BufferError, RuntimeError) as exc:
                raise TypeError(
                    f"{name} of type {type(value).__name__} cannot be shared through DLPack ({exc}); "
                    "pass a NumPy array instead"
                ) from exc
    elif library == "numpy" and not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be an array, got {type(value).__name__}: {exc}") from exc
    if device == "gpu" and library == "numpy":
        value, library = _import_cupy().asarray(value), "cupy"
    elif device == "cpu" and library == "cupy":
        value, library = value.get(), "numpy"
    return value, library


def get_backend(library):
    """The backend module for ``'numpy'`` or ``'cupy'``."""
    if library == "cupy":
        from . import _cupy_backend  # noqa: PLC0415  (imports CuPy; only when asked for)

        return _cupy_backend
    from . import _numpy_backend

    return _numpy_backend
