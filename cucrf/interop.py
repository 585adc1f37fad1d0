"""Exchanging arrays with other array libraries through DLPack, without copying.

:func:`cucrf.infer` and :func:`cucrf.infer_vjp` accept any array exposing ``__dlpack__``
(PyTorch CPU and CUDA tensors, JAX arrays, CuPy and NumPy arrays, ...) and share its memory;
their ``like=`` keyword hands the result back as the caller's kind. This module offers the same
two directions as functions, for use around any cucrf call:

* :func:`as_array` shares an array as the NumPy (host) or CuPy (GPU) array cucrf computes on;
* :func:`to_like` hands a result back as the kind of a reference array, on its device.

It is also the one place where cucrf itself converts between array libraries: recognising an
array's kind and device, importing DLPack producers (with the refusals and copy warnings that
come with them), moving data between host and GPU, and describing arrays in error messages.

Nothing here imports PyTorch, JAX or CuPy: a library is only touched when one of its arrays is
passed in. For gradients through the CRF use :mod:`cucrf.torch` or :mod:`cucrf.jax`.

>>> import numpy as np
>>> from cucrf import interop
>>> a = np.arange(6.0).reshape(2, 3)
>>> interop.to_like(a, np.zeros(1)) is a  # already of the reference's kind: returned as it is
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import numpy as np

__all__ = ["as_array", "to_like", "array_kind", "CopyWarning"]


def _module_of(value):
    return type(value).__module__.split(".")[0]


def array_library(name, value):
    """Return ``'numpy'``, ``'cupy'`` or ``'dlpack'`` for an array argument (without importing CuPy)."""
    module = _module_of(value)
    if module == "cupy":
        return "cupy"
    if isinstance(value, np.ndarray):
        return "numpy"
    if hasattr(value, "__dlpack__") and not isinstance(value, np.generic):
        return "dlpack"
    return "numpy"


def is_array(value):
    """True for a NumPy or CuPy array or any ``__dlpack__`` producer (a tensor, a JAX array, ...)."""
    return hasattr(value, "__dlpack__") or isinstance(value, np.ndarray) or _module_of(value) == "cupy"


# -- into NumPy or CuPy -------------------------------------------------------------------------------



CUPY_INSTALL_HINT = (
    "the GPU backend needs CuPy: install it with `pip install cucrf[cuda12]` or "
    "`pip install cucrf[cuda13]` (matching your CUDA driver)"
)

_DLPACK_CPU = 1
_DLPACK_CUDA = 2


def _import_cupy(need_device=True):
    """Import CuPy, with an error that says what to do when it or a GPU is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(CUPY_INSTALL_HINT) from exc
    if need_device:
        try:
            available = cupy.cuda.is_available()
        except Exception:  # noqa: BLE001 (any driver problem means: no usable device)
            available = False
        if not available:
            raise RuntimeError(
                "device='gpu' needs a CUDA GPU, but CuPy found none usable (no device, or a driver "
                "older than CuPy's CUDA version); use device='cpu' or run on a machine with a GPU"
            )
    return cupy


def to_backend_array(name, value, device):
    """Return ``(array, library)`` with ``array`` a NumPy or CuPy array sharing memory when possible.

    Parameters
    ----------
    name : str
        Argument name, for error messages.
    value : array_like
        NumPy or CuPy array, any object exposing ``__dlpack__`` (PyTorch, JAX, ...), or a nested
        sequence. DLPack producers are shared without a copy (see :func:`from_dlpack`).
    device : {None, 'cpu', 'gpu'}
        Where to compute; None keeps the data where it is.
    """
    if device not in (None, "cpu", "gpu"):
        raise ValueError(f"device must be one of [None, 'cpu', 'gpu'], got {device!r}")
    if value is None:
        raise TypeError(f"{name} must be an array (NumPy, CuPy, or any object exposing __dlpack__ such as a "
                        "PyTorch tensor or a JAX array) or a nested sequence of numbers, got None")
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{name} must not be a masked array (numpy.ma.MaskedArray), got one with "
            f"{int(np.ma.count_masked(value))} masked entries: the mask would be ignored. Pass "
            f"{name}.filled(value) with a value the mask stands for, or, for a label map with unknown "
            "pixels, fill them with a label id and pass unary_kind='labels' with unknown_label= that id"
        )
    library = array_library(name, value)
    if library == "dlpack":
        value = from_dlpack(name, value)
        library = "numpy" if isinstance(value, np.ndarray) else "cupy"
    elif library == "numpy" and not isinstance(value, np.ndarray):
        _refuse_tracer(name, value)
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be an array, got {type(value).__name__}: {exc}") from exc
    if device == "gpu" and library == "numpy":
        value, library = _import_cupy().asarray(value), "cupy"
    elif device == "cpu" and library == "cupy":
        value, library = value.get(), "numpy"
    return value, library


# -- DLPack -----------------------------------------------------------------------------------------

class CopyWarning(UserWarning):
    """An array could not be shared without a copy (through DLPack); cucrf copied it."""


#: DLPack device types that CuPy imports (CUDA, CUDA managed, ROCm) and that NumPy imports.
_DLPACK_GPU_TYPES = {_DLPACK_CUDA: "CUDA", 13: "CUDA managed", 10: "ROCm"}
_DLPACK_HOST_TYPES = {_DLPACK_CPU: "CPU", 3: "CUDA host", 11: "ROCm host"}
_DLPACK_DEVICE_NAMES = {4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 12: "ExtDev", 14: "oneAPI",
                        15: "WebGPU", 16: "Hexagon", 17: "MAIA"}


def _is_tracer(value):
    return _module_of(value) == "jax" and any(c.__name__.endswith("Tracer") for c in type(value).__mro__)


def _refuse_tracer(name, value):
    if _is_tracer(value):
        raise TypeError(
            f"{name} is a traced JAX value (inside jax.jit, jax.grad or jax.vmap), which has no data to "
            "share; use cucrf.jax.infer, which runs cucrf as a JAX operation with its gradient"
        )


def describe(value):
    """A short human description of an array and where it lives, for error messages."""
    module = _module_of(value)
    if module == "torch" and hasattr(value, "device"):
        return f"a torch.Tensor on {value.device}"
    if module == "cupy" and hasattr(value, "device"):
        return f"a CuPy array on GPU {value.device.id}"
    if module in ("jax", "jaxlib") and hasattr(value, "devices"):
        try:
            return f"a JAX array on {', '.join(str(d) for d in value.devices())}"
        except Exception:  # noqa: BLE001  (a tracer has no devices)
            return "a JAX array"
    if isinstance(value, np.ndarray):
        return "a NumPy array (CPU)"
    return f"a {type(value).__name__}"


def from_dlpack(name, value):
    """Share any ``__dlpack__`` producer as a NumPy (host) or CuPy (GPU) array, without copying.

    PyTorch tensors (CPU or CUDA), JAX arrays, CuPy and NumPy arrays and any other DLPack producer are
    imported as views of their memory, whatever their strides. Refused, with an error that says what
    to do: tensors that require grad (use :mod:`cucrf.torch`), traced JAX values (use
    :mod:`cucrf.jax`), devices other than the CPU and CUDA/ROCm GPUs, and element types NumPy/CuPy
    do not have (bfloat16). Copied with a :class:`CopyWarning`: tensors whose producer can only
    export a copy (PyTorch's lazily negated or conjugated views, or a producer refusing
    ``copy=False``).
    """
    _refuse_tracer(name, value)
    module = _module_of(value)
    if module == "torch":
        if getattr(value, "requires_grad", False):
            raise TypeError(
                f"{name} is a torch.Tensor that requires grad; cucrf.infer and cucrf.infer_vjp do not record "
                "autograd history. To back-propagate through the CRF use cucrf.torch.infer or the "
                f"cucrf.torch.ConvCRF module (import cucrf.torch); for inference only pass {name}.detach() "
                "(no copy)"
            )
        if getattr(value, "is_sparse", False) or getattr(value, "layout", None) not in (None, _torch_strided()):
            raise TypeError(f"{name} is a torch.Tensor with layout {value.layout}; pass a dense (strided) tensor, "
                            f"e.g. {name}.to_dense()")
        if (hasattr(value, "is_neg") and value.is_neg()) or (hasattr(value, "is_conj") and value.is_conj()):
            # Lazy views: DLPack would export the data without the pending negation. Resolve (a copy).
            _warn_copy(name, value, "it is a lazily negated or conjugated view")
            value = value.resolve_neg().resolve_conj()
    try:
        dev_type, dev_id = value.__dlpack_device__() if hasattr(value, "__dlpack_device__") else (_DLPACK_CPU, 0)
    except Exception as exc:  # noqa: BLE001  (a producer on a device it cannot describe)
        raise TypeError(f"{name} ({describe(value)}) cannot be shared through DLPack: {exc}") from exc
    dev_type = int(dev_type)
    if dev_type in _DLPACK_GPU_TYPES:
        consumer = _import_cupy().from_dlpack
    elif dev_type in _DLPACK_HOST_TYPES:
        consumer = np.from_dlpack
    else:
        where = _DLPACK_DEVICE_NAMES.get(dev_type, f"DLPack device type {dev_type}")
        raise TypeError(f"{name} ({describe(value)}) lives on a {where} device, which cucrf cannot use; "
                        "move it to the CPU or to a CUDA GPU first")
    if dev_type in _DLPACK_GPU_TYPES:  # import on the array's own GPU (and that GPU's current stream)
        gpu_consumer, gpu = consumer, _import_cupy().cuda.Device(int(dev_id))

        def consumer(array, **kw):
            with gpu:
                return gpu_consumer(array, **kw)
    try:
        try:
            return consumer(value, copy=False)
        except TypeError as exc:
            # An older consumer or producer without the copy keyword (NumPy 1.x: "takes no
            # keyword arguments"); it never copies silently either.
            if "copy" not in str(exc) and "keyword" not in str(exc):
                raise
            return consumer(value)
    except BufferError as exc:
        message = str(exc)
        if "require" in message and "grad" in message:
            raise TypeError(f"{name} requires grad: {message}; use cucrf.torch") from exc
    except (TypeError, ValueError, RuntimeError) as exc:
        dtype = getattr(value, "dtype", "?")
        raise TypeError(
            f"{name} ({describe(value)}, dtype {dtype}) cannot be shared through DLPack: {str(exc).rstrip('.')}; "
            "pass float32 or float64 class scores (and a uint8 or float image)"
        ) from exc
    # The producer can only hand over a copy (DLPack's copy=False was refused).
    _warn_copy(name, value, "its producer cannot share it without a copy")
    try:
        return consumer(value, copy=True)
    except TypeError as exc:
        if "keyword" in str(exc):  # NumPy 1.x: from_dlpack cannot ask for a copy
            raise TypeError(f"{name} ({describe(value)}) can only be shared through DLPack as a copy, which "
                            f"NumPy {np.__version__} cannot ask for; pass a NumPy array (np.asarray) or "
                            "upgrade NumPy to 2.x") from exc
        raise TypeError(f"{name} ({describe(value)}) cannot be shared through DLPack, not even as a copy: "
                        f"{exc}") from exc
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"{name} ({describe(value)}) cannot be shared through DLPack, not even as a copy: "
                        f"{exc}") from exc


def _torch_strided():
    import torch  # noqa: PLC0415  (only reached for torch tensors: torch is imported already)

    return torch.strided


def _warn_copy(name, value, why):
    warnings.warn(f"{name} ({describe(value)}) is copied: {why}", CopyWarning, stacklevel=4)


def device_scope(array):
    """A context in which CuPy works on ``array``'s GPU (a no-op for host arrays)."""
    if _module_of(array) == "cupy":
        return _import_cupy().cuda.Device(array.device.id)
    return contextlib.nullcontext()


def check_same_device(name_a, a, name_b, b):
    """Refuse two CuPy arrays that live on different GPUs."""
    if _module_of(a) == "cupy" and _module_of(b) == "cupy" and a.device.id != b.device.id:
        raise ValueError(f"{name_a} is on GPU {a.device.id} but {name_b} is on GPU {b.device.id}; "
                         "put both on the same GPU")


# -- out of NumPy or CuPy, and the kinds of arrays ----------------------------------------------------

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
