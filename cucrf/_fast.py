"""The fused CPU path: compiled kernels (numba) behind the NumPy backend's interface, when available.

With the optional extra ``cucrf[fast]`` (numba) installed, CPU inference and gradients run on
the kernels of :mod:`cucrf._numba_kernels` through :mod:`cucrf._numba_backend`; without it, on
:mod:`cucrf._numpy_backend`, which stays the specification these kernels are tested against.

Nothing here imports numba until the first CPU computation asks for a backend, so ``import
cucrf`` stays light. The first use in a process loads (or, the very first time, compiles) the
float32 kernels by running a tiny problem through them (float64 ones on their first use).
numba caches the compiled code on disk (``cache=True``): ``NUMBA_CACHE_DIR`` when set, else
next to the sources, else in the user's cache folder (``~/.cache``); when none is writable the
kernels are compiled in every process (one warning says so).

When numba is installed but cannot be imported, or a kernel fails to compile or to run the
tiny problem, CPU work falls back to NumPy with one :class:`FastPathWarning` naming the reason.
``CUCRF_FAST=0`` turns the fused path off (NumPy everywhere); ``CUCRF_NUM_THREADS`` sets the
thread count of both paths (see :mod:`cucrf._parallel`).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
import warnings

import numpy as np

__all__ = ["FastPathWarning", "backend", "enabled", "status"]


class FastPathWarning(RuntimeWarning):
    """The fused CPU path (numba) is installed but could not be used; NumPy computes instead."""


_lock = threading.Lock()
_state = {"loaded": False, "backend": None, "reason": None, "seconds": None, "cached": None}


def enabled() -> bool:
    """False when ``CUCRF_FAST`` is ``0`` (or ``false``, ``no``, ``off``): NumPy everywhere."""
    return os.environ.get("CUCRF_FAST", "").strip().lower() not in ("0", "false", "no", "off")


def _warn(reason):
    warnings.warn(f"cucrf: the fast CPU path (numba) is not used: {reason}; computing with NumPy instead "
                  "(set CUCRF_FAST=0 to silence this)", FastPathWarning, stacklevel=4)


def warn_fallback(reason):
    """One warning for kernels of one dtype that failed on their first use (NumPy computes them)."""
    _state["reason"] = reason
    _warn(reason)


def _load():
    """Import numba and the kernels and run the tiny problem; return the backend or None."""
    if importlib.util.find_spec("numba") is None:
        return None  # the extra is not installed: NumPy, silently
    try:
        import numba  # noqa: F401
    except Exception as exc:  # installed but broken (a NumPy it does not support, llvmlite, ...)
        _state["reason"] = f"importing numba failed ({type(exc).__name__}: {exc})"
        _warn(_state["reason"])
        return None
    start = time.perf_counter()
    try:
        from . import _numba_backend

        if not _numba_backend.ready(np.float32):
            return None  # ready() gave the warning
    except Exception as exc:  # noqa: BLE001 (any failure to compile or run means: not usable)
        _state["reason"] = f"compiling its kernels failed ({type(exc).__name__}: {exc})"
        _warn(_state["reason"])
        return None
    _state["seconds"] = time.perf_counter() - start
    from . import _numba_kernels

    _state["cached"] = _numba_kernels.CACHE
    return _numba_backend


def backend():
    """The fused CPU backend module, or None (numba absent or unusable, or ``CUCRF_FAST=0``)."""
    if not enabled():
        return None
    if not _state["loaded"]:
        with _lock:
            if not _state["loaded"]:
                _state["backend"] = _load()
                _state["loaded"] = True
    return _state["backend"]


def status() -> dict:
    """What the last load found: ``backend`` name or None, ``reason`` it is off, ``seconds`` the
    load (compile or cache read) took, ``cached`` whether compiled code is cached on disk."""
    b = backend()
    return {"backend": None if b is None else b.name, "reason": _state["reason"], "seconds": _state["seconds"],
            "cached": _state["cached"], "enabled": enabled()}
