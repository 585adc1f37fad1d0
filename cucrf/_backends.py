"""Choosing the array library and the backend that computes on it."""

from __future__ import annotations

import numpy as np

from ._validation import array_library

__all__ = ["to_backend_array", "get_backend", "CUPY_INSTALL_HINT", "from_dlpack", "CopyWarning", "describe",
           "device_scope", "check_same_device"]

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


def _module_of(value):
    return type(value).__module__.split(".")[0]


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
    import warnings  # noqa: PLC0415

    warnings.warn(f"{name} ({describe(value)}) is copied: {why}", CopyWarning, stacklevel=4)


def device_scope(array):
    """A context in which CuPy works on ``array``'s GPU (a no-op for host arrays)."""
    if _module_of(array) == "cupy":
        return _import_cupy().cuda.Device(array.device.id)
    import contextlib  # noqa: PLC0415

    return contextlib.nullcontext()


def check_same_device(name_a, a, name_b, b):
    """Refuse two CuPy arrays that live on different GPUs."""
    if _module_of(a) == "cupy" and _module_of(b) == "cupy" and a.device.id != b.device.id:
        raise ValueError(f"{name_a} is on GPU {a.device.id} but {name_b} is on GPU {b.device.id}; "
                         "put both on the same GPU")


def get_backend(library):
    """The backend module for ``'numpy'`` or ``'cupy'``."""
    if library == "cupy":
        from . import _cupy_backend  # noqa: PLC0415  (imports CuPy; only when asked for)

        return _cupy_backend
    from . import _numpy_backend

    return _numpy_backend
