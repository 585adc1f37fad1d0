"""Choosing the backend that computes on an array library (NumPy or CuPy).

Converting arrays between libraries (DLPack, devices, descriptions for messages) lives in
:mod:`cucrf.interop`; the names below are re-exported from there for the modules that import
them from here.
"""

from __future__ import annotations

from .interop import (  # noqa: F401  (re-exported)
    CUPY_INSTALL_HINT, CopyWarning, _import_cupy, _is_tracer, check_same_device, describe, device_scope,
    from_dlpack, to_backend_array,
)

__all__ = ["to_backend_array", "get_backend", "CUPY_INSTALL_HINT", "from_dlpack", "CopyWarning", "describe",
           "device_scope", "check_same_device"]


def get_backend(library):
    """The backend module for ``'numpy'`` or ``'cupy'``.

    NumPy arrays go to the fused CPU backend when it is usable (:mod:`cucrf._fast`), else to
    :mod:`cucrf._numpy_backend`.
    """
    if library == "cupy":
        from . import _cupy_backend  # noqa: PLC0415  (imports CuPy; only when asked for)

        return _cupy_backend
    from . import _fast  # noqa: PLC0415  (the fused CPU path, when cucrf[fast] is installed)

    fast = _fast.backend()
    if fast is not None:
        return fast
    from . import _numpy_backend

    return _numpy_backend
