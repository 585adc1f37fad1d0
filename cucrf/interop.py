"""Exchanging arrays with other array libraries through DLPack, without copying.

:func:`cucrf.infer` and :func:`cucrf.infer_vjp` accept any array exposing ``__dlpack__``
(PyTorch CPU and CUDA tensors, JAX arrays, CuPy and NumPy arrays, ...) and share its memory;
their ``like=`` keyword hands the result back as the caller's kind. This module offers the same
two directions as functions, for use around any cucrf call:

* :func:`as_array` shares an array as the NumPy (host) or CuPy (GPU) array cucrf computes on;
* :func:`to_like` hands a result back as the kind of a reference array, on its device.

Nothing here imports PyTorch, JAX or CuPy: a library is only touched when one of its arrays is
passed in. For gradients through the CRF use :mod:`cucrf.torch` or :mod:`cucrf.jax`.

>>> import numpy as np
>>> from cucrf import interop
>>> a = np.arange(6.0).reshape(2, 3)
>>> interop.to_like(a, np.zeros(1)) is a  # already of the reference's kind: returned as it is
True
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from ._backends import CopyWarning, describe, to_backend_array

__all__ = ["as_array", "to_like", "array_kind", "CopyWarning"]


def _module_of(value):
    return type(value).__module__.split(".")[0]


def array_kind(value):
    """The array library of ``value``: ``'numpy'``, ``'cupy'``, ``'torch'``, ``'jax'``, ``'array-api'``
    (another library whose arrays offer ``__array_namespace__``) or None (not an array).

    >>> array_kind(np.zeros(2)), array_kind([1, 2])
    ('numpy', None)
    """
    module = _module_of(value)
    if isinstance(value, np.ndarray):
        return "numpy"
    if module == "cupy" and hasattr(value, "device"):
        return "cupy"
    if module == "torch" and hasattr(value, "data_ptr"):
        return "torch"
    if module in ("jax", "jaxlib") and hasattr(value, "__dlpack__"):
        return "jax"
    if hasattr(value, "__array_namespace__") and hasattr(value, "__dlpack__"):
        return "array-api"
    return None


def as_array(value, *, name="array", device=None):
    """Share ``value`` as a NumPy (host) or CuPy (GPU) array, without a copy.

    Parameters
    ----------
    value : array
        NumPy or CuPy array, or any object exposing ``__dlpack__`` (PyTorch tensor, JAX array, ...).
    name : str
        What to call it in error messages.
    device : {None, 'cpu', 'gpu'}
        None keeps the data where it is (no copy); ``'cpu'`` / ``'gpu'`` move it there (a copy
        when it lives elsewhere).

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        A view of ``value``'s memory with its strides.

    Raises
    ------
    TypeError
        For None, a tensor that requires grad (use :mod:`cucrf.torch`), a traced JAX value (use
        :mod:`cucrf.jax`), an array on a device other than the CPU or a CUDA/ROCm GPU, or an
        element type NumPy and CuPy lack (bfloat16).
    ValueError
        For a ``device`` other than None, ``'cpu'`` and ``'gpu'``.

    Warns
    -----
    CopyWarning
        When the producer can only export a copy (PyTorch's lazily negated or conjugated views).

    >>> a = np.ones((2, 3))
    >>> as_array(a) is a
    True
    """
    return to_backend_array(name, value, device)[0]


def _has_negative_stride(array):
    return any(s < 0 for s in getattr(array, "strides", ()) or ())


def _to_torch(array, reference, copy):
    import torch  # noqa: PLC0415  (the reference is a tensor: torch is imported already)

    if isinstance(array, torch.Tensor):
        tensor = array
    else:
        if _has_negative_stride(array):
            # PyTorch has no negative strides (importing them aborts the process): copy.
            if copy is False:
                raise ValueError(f"an array with negative strides {array.strides} cannot become a torch.Tensor "
                                 "without a copy (copy=False)")
            warnings.warn("an array with negative strides is copied to become a torch.Tensor", CopyWarning,
                          stacklevel=3)
            array = array.copy()
            copy = None
        tensor = torch.from_dlpack(array)
    if tensor.device != reference.device:
        if copy is False:
            raise ValueError(f"the result lives on {tensor.device} but the reference on {reference.device}; "
                             "moving it there is a copy (copy=False)")
        return tensor.to(reference.device)
    return tensor.clone() if copy else tensor


def _jax_device(reference):
    devices = reference.devices() if hasattr(reference, "devices") else {reference.device}
    return next(iter(devices)) if len(devices) == 1 else None


def _to_jax(array, reference, copy):
    import jax  # noqa: PLC0415  (the reference is a JAX array: jax is imported already)
    import jax.numpy as jnp  # noqa: PLC0415

    device = _jax_device(reference)
    if isinstance(array, jax.Array):
        result = array
    else:
        if _has_negative_stride(array) or not (getattr(array, "flags", None) is None or array.flags.c_contiguous):
            array = array.copy()  # JAX arrays are dense and row-major
        on_host = isinstance(array, np.ndarray)
        if on_host and device is not None and device.platform != "cpu":
            if copy is False:
                raise ValueError(f"the result is on the host but the reference on {device}; moving it there is "
                                 "a copy (copy=False)")
            return jax.device_put(array, device)
        # Zero-copy when JAX accepts the buffer (on the CPU: 64-byte aligned; otherwise JAX copies).
        result = jnp.from_dlpack(array)
    if device is not None and _jax_device(result) != device:
        if copy is False:
            raise ValueError(f"the result lives on {_jax_device(result)} but the reference on {device}; moving "
                             "it there is a copy (copy=False)")
        return jax.device_put(result, device)
    return jnp.array(result, copy=True) if copy else result


def _to_numpy(array, copy):
    if isinstance(array, np.ndarray):
        return array.copy() if copy else array
    if _module_of(array) == "cupy":
        if copy is False:
            raise ValueError("the result is a CuPy array on the GPU; a NumPy array is a copy to the host (copy=False)")
        return array.get()
    return _to_numpy(as_array(array), copy)  # another library's array: shared first, then as above


def _to_cupy(array, reference, copy):
    import cupy  # noqa: PLC0415  (the reference is a CuPy array: cupy is imported already)

    if isinstance(array, np.ndarray):
        if copy is False:
            raise ValueError("the result is a NumPy array on the host; a CuPy array is a copy to the GPU (copy=False)")
        with cupy.cuda.Device(reference.device.id):
            return cupy.asarray(array)
    if _module_of(array) != "cupy":
        array = as_array(array)
        if isinstance(array, np.ndarray):
            return _to_cupy(array, reference, copy)
    if array.device.id != reference.device.id:
        if copy is False:
            raise ValueError(f"the result is on GPU {array.device.id} but the reference on GPU "
                             f"{reference.device.id}; moving it there is a copy (copy=False)")
        with cupy.cuda.Device(reference.device.id):
            return cupy.array(array, copy=True)
    return array.copy() if copy else array


def _convert(value, reference, kind, copy):
    if value is None or isinstance(value, (int, float, complex, str, bool)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _convert(getattr(value, f.name), reference, kind, copy)
                   for f in dataclasses.fields(value) if f.name in ("output", "unary", "image")}
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(v, reference, kind, copy) for v in value)
    if isinstance(value, dict):
        return {k: _convert(v, reference, kind, copy) for k, v in value.items()}
    if kind == "numpy":
        return _to_numpy(value, copy)
    if kind == "cupy":
        return _to_cupy(value, reference, copy)
    if kind == "torch":
        return _to_torch(value, reference, copy)
    if kind == "jax":
        return _to_jax(value, reference, copy)
    namespace = reference.__array_namespace__()
    result = namespace.from_dlpack(value)
    return namespace.asarray(result, copy=True) if copy else result


def to_like(value, reference, *, copy=None):
    """Hand ``value`` back as the array kind of ``reference``, on ``reference``'s device.

    Parameters
    ----------
    value : array, InferVJP, or a list / tuple / dict of them
        What cucrf returned: a NumPy or CuPy array, or any ``__dlpack__`` producer. For an
        :class:`cucrf.InferVJP` the ``output``, ``unary`` and ``image`` arrays are converted and the
        parameter gradients (floats and NumPy arrays) are left as they are; containers are
        converted element by element; numbers and None pass through.
    reference : array
        A NumPy or CuPy array, a PyTorch tensor, a JAX array, or an array of any library offering
        ``__array_namespace__`` and ``from_dlpack``; only its kind and device are used.
    copy : {None, False, True}
        None (the default): share memory through DLPack when ``value`` is already on the
        reference's device, copy it there otherwise (as ``torch.Tensor.to`` does). False: never
        copy; a ``ValueError`` when the devices differ. True: always return a copy.

    Returns
    -------
    array of the reference's kind
        Sharing ``value``'s memory unless a copy was needed or asked for. Two exceptions:
        PyTorch tensors cannot have negative strides and JAX arrays are always dense, so such
        layouts are copied (with a :class:`CopyWarning` for PyTorch); JAX on the CPU imports a
        buffer without a copy only when it is 64-byte aligned (otherwise JAX copies it itself).

    Examples
    --------
    >>> a = np.ones((2, 3), dtype=np.float32)
    >>> to_like(a, np.zeros(0)) is a
    True
    >>> to_like({"q": a, "n": 3}, np.zeros(0))["n"]
    3
    """
    if copy not in (None, False, True):
        raise ValueError(f"copy must be None, False or True, got {copy!r}")
    kind = array_kind(reference)
    if kind is None:
        raise TypeError(f"reference must be an array or tensor whose kind to return (NumPy, CuPy, PyTorch, JAX or "
                        f"any array API library), got {describe(reference)}")
    return _convert(value, reference, kind, copy)
