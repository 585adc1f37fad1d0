"""The public inference entry point."""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from typing import Optional

import numpy as np

from . import _meanfield, interop
from ._backends import get_backend
from ._diagnostics import check_inputs, check_unary_layout
from .interop import check_same_device, describe, device_scope, is_array, to_backend_array
from ._geometry import axis_geometry
from ._params import CRFParams
from ._spatial import check_per_axis, check_spacing, check_spatial_dims, resolve_spatial_dims
from ._validation import (
    ProblemTooLargeError, available_memory_bytes, check_compute_dtype, check_feature_magnitude, check_finite, check_float_array,
    check_image, check_image_magnitude, check_int, extremes, check_result_finite, check_unary_magnitude,
)
from .unary import unary_from_labels, unary_from_probabilities

__all__ = ["infer", "infer_vjp", "InferVJP", "DEFAULT_FILTER_SIZE", "DEFAULT_BLUR", "DEFAULT_ITERATIONS"]

DEFAULT_FILTER_SIZE = 5
DEFAULT_BLUR = 4
DEFAULT_ITERATIONS = 5

_UNARY_KINDS = ("logits", "probabilities", "labels")
_NORMALIZATIONS = (None, "symmetric")
_OUTPUTS = ("probabilities", "logits")
_DEVICES = (None, "cpu", "gpu")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_include_self(include_self):
    """Return ``include_self`` as a Python bool; anything but ``True`` / ``False`` is a TypeError.

    NumPy booleans are accepted; integers, strings and None are not (``1`` or ``"yes"`` would
    otherwise pass silently as true, ``None`` or ``0`` as false).
    """
    if not isinstance(include_self, (bool, np.bool_)):
        raise TypeError(f"include_self must be True or False (a bool), got {include_self!r} of type "
                        f"{type(include_self).__name__}")
    return bool(include_self)


def check_config(filter_size, blur, iterations, normalization, size, keep_centre=False, spacing=None):
    """Validate the structural settings against an image or volume of spatial shape ``size``.

    ``size`` is (H, W) or (D, H, W); ``filter_size`` and ``blur`` are ints or one value per axis;
    ``spacing`` (None, a number or one per axis) scales the pixel positions. ``keep_centre`` is the
    public ``include_self`` (and is checked, and named, as such).
    """
    size = tuple(int(n) for n in size)
    nd = len(size)
    keep_centre = check_include_self(keep_centre)
    if (not keep_centre and isinstance(filter_size, numbers.Integral)
            and not isinstance(filter_size, (bool, np.bool_)) and filter_size == 1):
        raise ValueError("filter_size must be >= 3 with include_self=False (the window leaves out its centre, so "
                         "a 1-cell window would be empty), got 1; pass include_self=True for a window of the "
                         "centre alone")
    per_axis = isinstance(filter_size, (tuple, list, np.ndarray))
    filter_size = check_per_axis("filter_size", filter_size, nd, minimum=1 if (keep_centre or per_axis) else 3,
                                 odd=True)
    blur_per_axis = isinstance(blur, (tuple, list, np.ndarray))
    blur = check_per_axis("blur", blur, nd, minimum=1)
    iterations = check_int("iterations", iterations, minimum=0)
    _choice("normalization", normalization, _NORMALIZATIONS)
    spacing = check_spacing(spacing, nd)
    sizes = filter_size if isinstance(filter_size, tuple) else (filter_size,) * nd
    blurs = blur if isinstance(blur, tuple) else (blur,) * nd
    if not keep_centre and all(k == 1 for k in sizes):
        raise ValueError(f"filter_size={filter_size} with include_self=False is an empty window (it leaves out "
                         "its centre); make at least one axis 3 or more, or pass include_self=True")
    coarse = tuple(axis_geometry(n, b).coarse for n, b in zip(size, blurs))
    grid = "x".join(map(str, coarse))
    shape = "x".join(map(str, size))
    if blur_per_axis:
        for a, (n, b) in enumerate(zip(size, blurs)):
            if b > n:
                raise ValueError(f"blur[{a}]={b} is larger than axis {a} of the {shape} input ({n} pixels); "
                                 f"use at most {n}")
    # A window wider than twice the longest axis of the grid only adds empty cells.
    largest = max(2 * max(coarse) - 1, 3)
    what = "image" if nd == 2 else "volume"
    for a, k in enumerate(sizes):
        if k > largest:
            name = f"filter_size[{a}]" if per_axis else "filter_size"
            raise ValueError(
                f"{name}={k} is larger than the {what} allows: with blur={blur} the {shape} {what} is a {grid} "
                f"grid, so the window can be at most {largest} cells wide; use a smaller filter_size or blur")
    return _meanfield.CRFConfig(filter_size, blur, iterations, normalization, keep_centre, spacing)


def check_backend_geometry(backend, nd, config):
    """Refuse settings a backend cannot compute (volumes, per-axis windows or a spacing) clearly."""
    supports = getattr(backend, "supports", None)
    if backend.name == "numpy" or (supports is not None and supports(nd, config)):
        return
    raise ValueError(
        f"the {backend.name} backend computes 2-D images with one filter_size and blur for both axes and no "
        f"spacing; this call has {nd} spatial axes, filter_size={config.filter_size}, blur={config.blur}, "
        f"spacing={config.spacing}: pass device='cpu'")


def training_bytes(batch, classes, size, channels, config, itemsize):
    """Memory :func:`infer_vjp` needs beyond :func:`cucrf._meanfield.estimate_bytes`, in bytes.

    Measured (tracemalloc, NumPy backend) to bound the peak over classes 2..21, filter sizes 3..11,
    blur 1..4, 0..5 iterations, with and without symmetric normalisation: the tape keeps the
    ``T + 1`` marginals and ``T`` messages (full size); the backward pass a few full-size
    gradients; for each of the ``S`` kernels (2 with symmetric normalisation) it collects the
    coarse message gradients and inputs of every iteration and concatenates them (4 S T coarse
    arrays at once); per window offset it forms feature and per-pixel temporaries. The fused CPU
    path also keeps the pair products of each kernel's gradient, as large as its kernel stack.
    """
    T = max(config.iterations, 1)
    S = 2 if config.normalization == "symmetric" else 1
    pixels = int(np.prod(size))
    cells = int(np.prod(_meanfield.coarse_shape(size, config)))
    full = batch * classes * pixels
    coarse = batch * classes * cells
    window = int(np.prod(config.filter_sizes(len(size))))
    elements = (2 * T + 5 + 2 * (S - 1)) * full + 4 * S * T * coarse
    elements += 4 * batch * channels * cells + 8 * S * batch * pixels + S * batch * window * cells
    return int(elements * itemsize)


def required_bytes(batch, classes, size, channels, config, itemsize, *, training, stored_kernels=True):
    """The memory :func:`infer` (or, with ``training``, :func:`infer_vjp`) is estimated to need, in bytes.

    What the check before allocating compares with the available memory.
    """
    need = _meanfield.estimate_bytes(batch, classes, size, channels, config, itemsize,
                                     stored_kernels=stored_kernels)
    if training:
        need += training_bytes(batch, classes, size, channels, config, itemsize)
    return need


def _check_params(params, num_classes, num_channels):
    if params is None:
        return CRFParams()
    if isinstance(params, dict):
        return CRFParams.from_dict(params)
    if not isinstance(params, CRFParams):
        raise TypeError(f"params must be a cucrf.CRFParams, a dict or None, got {type(params).__name__}")
    params.compatibility_matrix(num_classes)  # raises on a size mismatch
    params.theta_beta_vector(num_channels)
    return params


def infer(unary, image, params=None, *, filter_size=DEFAULT_FILTER_SIZE, blur=DEFAULT_BLUR,
          iterations=DEFAULT_ITERATIONS, unary_kind="logits", num_classes=None, confidence=None,
          unknown_label=None, clip=1e-5, normalization=None, include_self=False, output="probabilities",
          dtype=None, device=None, feature_transform=None, like=None, spatial_dims=None, spacing=None):
    """Refine a segmentation with a convolutional CRF (mean-field inference).

    Parameters
    ----------
    unary : array, shape (C, H, W) or (B, C, H, W); volumes (C, D, H, W) or (B, C, D, H, W)
        Per-pixel class scores, larger = more likely: a network's logits or log-probabilities
        (``unary_kind='logits'``, the default); probabilities in [0, 1]
        (``unary_kind='probabilities'``); or, with ``unary_kind='labels'``, an integer label map of
        shape (H, W) or (B, H, W) ((D, H, W) or (B, D, H, W) for volumes). NumPy, CuPy, or any
        array exposing ``__dlpack__``.
    image : array, shape (H, W, F) or (B, H, W, F); volumes (D, H, W, F) or (B, D, H, W, F)
        Channels-last image or per-pixel features, uint8 or float, any ``F >= 1``. Colour
        bandwidths ``theta_beta`` are in its units (0..255 for uint8).
    params : CRFParams, optional
        Kernel bandwidths, weights, compatibility and unary weight; defaults to ``CRFParams()``.
    filter_size : int or tuple of int
        Odd width ``k`` of the window of (coarse) cells each pixel exchanges messages with, or one
        odd width per spatial axis.
    blur : int or tuple of int
        Messages are computed on a grid ``blur`` times coarser, so the window spans
        ``filter_size * blur`` pixels; 1 computes them at full resolution. One value per axis
        for anisotropic data (thick slices: ``blur=(1, 4, 4)``).
    iterations : int
        Number of mean-field updates (0 returns ``softmax(unary_weight * unary)``).
    unary_kind : {'logits', 'probabilities', 'labels'}
        What ``unary`` holds (see above).
    num_classes, confidence, unknown_label
        For ``unary_kind='labels'``: see :func:`cucrf.unary_from_labels` (``confidence=None``
        gives the labelled class 0.5, or 0.7 with two classes).
    clip : float
        For ``unary_kind='probabilities'``: see :func:`cucrf.unary_from_probabilities`.
    normalization : {None, 'symmetric'}
        ``'symmetric'`` normalises each kernel as ``n * K(n * Q)`` with ``n = 1 / sqrt(K(1))``.
    include_self : bool
        False (the default): each pixel's window leaves out its own centre cell, so messages come
        from neighbours only (the mean-field update of the CRF energy). True: the window keeps its
        centre, as upstream ConvCRF's does: each (coarse) cell also sends a message to itself,
        with value 1 in both kernels (distance 0), so its previous estimate comes back as an
        extra unary; ``filter_size=1`` is then allowed. Anything but a bool is a TypeError.
    output : {'probabilities', 'logits'}
        Return the marginals ``Q`` or the final logits ``a * U - Phi`` (whose softmax is ``Q``).
    dtype : {None, numpy.float32, numpy.float64}
        Compute precision; None means float64 for a float64 unary and float32 otherwise.
    device : {None, 'cpu', 'gpu'}
        Where to compute; None computes where the unary is (CuPy arrays on the GPU).
    feature_transform : optional
        A linear map applied to every pixel's image channels before the appearance kernel,
        ``f' = A @ f + c`` (the paper's "+T", learned by :func:`cucrf.fit`): a dict
        ``{'matrix': (F', F), 'offset': (F',)}``, a ``(matrix, offset)`` pair, a bare (F', F)
        matrix, or an object with ``matrix`` / ``offset`` attributes (such as
        ``FitResult.feature_transform``). ``params.theta_beta`` is then in the units of ``f'``
        (one value, or one per output channel). None (the default) uses the image as it is.
    like : {None, 'input'} or array, optional
        The kind of array to return. None: a NumPy array (CPU) or a CuPy array (GPU). ``'input'``:
        the kind and device of ``unary`` (a PyTorch tensor for a tensor, a JAX array for a JAX
        array, ...). An array or tensor: its kind and device. The result is handed over through
        DLPack without a copy when it already lives on that device (see
        :func:`cucrf.interop.to_like`).
    spatial_dims : {None, 2, 3}
        Number of spatial axes: 2 for images, 3 for volumes. None means images, and refuses
        shapes that could equally be a volume (pass ``spatial_dims`` to settle it).
    spacing : float or tuple of float, optional
        Distance between neighbouring pixels (voxels) along each spatial axis, e.g. the voxel
        size in mm ``(dz, dy, dx)``; positions are indices times ``spacing``, so ``theta_alpha``
        and ``theta_gamma`` are in its units. None means 1 (positions in pixels).

    Returns
    -------
    array, shape (C, *spatial) or (B, C, *spatial) like ``unary`` (with a class axis for label maps)
        In the unary's array library (NumPy or CuPy) unless ``like`` says otherwise, of the
        compute dtype.

    Raises
    ------
    ValueError
        Besides bad shapes and settings: for finite values too large for the compute dtype
        (``unary_weight * unary`` or the image's squared colour differences, divided by
        ``theta_beta``, beyond a quarter of its largest value); the message names the input and
        the fix (rescale it, or ``dtype=np.float64``). A result with NaN or infinity is never
        returned: it is a ValueError too.

    Warns
    -----
    cucrf.InputWarning
        When the inputs look like a common mistake: probabilities or pydensecrf energies
        ``-log(p)`` passed as logits, or a float image in [0, 1] with a ``theta_beta`` meant for
        0..255 values (see :func:`cucrf._diagnostics.check_inputs`).

    Notes
    -----
    Inputs exposing ``__dlpack__`` (PyTorch CPU or CUDA tensors, JAX arrays, ...) are shared
    without a copy and computed on where they live (a tensor on GPU 1 is computed on GPU 1);
    see docs/interop.md. A tensor that requires grad is refused: use :mod:`cucrf.torch`.

    Examples
    --------
    >>> import numpy as np, cucrf
    >>> rng = np.random.default_rng(0)
    >>> image = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    >>> unary = rng.normal(size=(4, 32, 48)).astype(np.float32)
    >>> q = cucrf.infer(unary, image)
    >>> q.shape, q.dtype, bool(np.allclose(q.sum(axis=0), 1, atol=1e-5))
    ((4, 32, 48), dtype('float32'), True)
    """
    reference = _like_reference(like, unary, image)
    image_kind = interop.array_kind(image)
    unary, image = _share_inputs(unary, image, device)
    with device_scope(unary):
        prepared = _prepare_inputs(
            unary, image, params, filter_size=filter_size, blur=blur, iterations=iterations,
            unary_kind=unary_kind, num_classes=num_classes, confidence=confidence, unknown_label=unknown_label,
            clip=clip, normalization=normalization, include_self=include_self, output=output, dtype=dtype,
            device=device, feature_transform=feature_transform, training=False, image_kind=image_kind,
            spatial_dims=spatial_dims, spacing=spacing,
        )
        result = _meanfield.mean_field(prepared.backend, prepared.unary, prepared.features, prepared.params,
                                       prepared.config, return_logits=output == "logits")
        if not _known_finite(prepared.backend, result):
            check_result_finite("the output of cucrf.infer", result, prepared.unary.dtype,
                                lambda: _magnitudes(prepared))
        result = result if prepared.batched else result[0]
        return result if reference is None else _to_like(result, reference[0])


def _channels_last(xp, a):
    """(B, F, *spatial) as a C-contiguous (B, *spatial, F) array: for 2 to 8 channels one channel
    at a time (NumPy's general transposing copy took 4x longer for three, 500x334 float32; from
    16 channels on it is the faster)."""
    if not 2 <= a.shape[1] <= 8:
        return xp.ascontiguousarray(xp.moveaxis(a, 1, -1))
    out = xp.empty(a.shape[:1] + a.shape[2:] + a.shape[1:2], dtype=a.dtype)
    for f in range(a.shape[1]):
        out[..., f] = a[:, f]
    return out


def _known_finite(backend, value):
    """Whether ``backend`` found every value of ``value`` finite as it made it (no scan needed)."""
    known = getattr(backend, "known_finite", None)
    return known is not None and known(value)


def _magnitudes(prepared, grad_output=None):
    """A sentence on the sizes of the prepared inputs, for the error about a non-finite result."""
    xp = prepared.backend.xp
    peak = float(xp.max(xp.abs(prepared.unary))) * abs(prepared.params.unary_weight)
    lo, hi = float(xp.min(prepared.features)), float(xp.max(prepared.features))
    text = f"The largest |unary_weight * unary| is {peak:.3g}; the image features lie in [{lo:.3g}, {hi:.3g}]"
    if grad_output is not None:
        text += f"; the largest |grad_output| is {float(xp.max(xp.abs(grad_output))):.3g}"
    return text + "."


def _to_like(value, reference):
    """Hand a result back as ``reference``'s kind (one function, so that tests can watch every hand-back)."""
    return interop.to_like(value, reference)


def _like_reference(like, unary, image):
    """``like=`` as ``(reference for the output and unary gradient, reference for the image gradient)``."""
    if like is None:
        return None
    if isinstance(like, str):
        if like != "input":
            raise ValueError(f"like must be None, 'input' or an array whose kind to return, got {like!r}")
        if not is_array(unary):
            return None  # a nested list: NumPy, as without like=
        return unary, (image if is_array(image) else unary)
    if not is_array(like):
        raise TypeError(f"like must be None, 'input' or an array or tensor whose kind to return, got "
                        f"{type(like).__name__}")
    return like, like


def _share_inputs(unary, image, device):
    """Import DLPack inputs once, without copying; refuse inputs that live on different devices."""
    shared_unary, unary_library = to_backend_array("unary", unary, device)
    shared_image, image_library = to_backend_array("image", image, device)
    plain = (lambda a: isinstance(a, np.ndarray) or type(a).__module__.split(".")[0] == "cupy")
    if unary_library != image_library and not (plain(unary) and plain(image)):
        raise TypeError(f"unary is {describe(unary)} but image is {describe(image)}; pass both on the same "
                        "device (or set device=)")
    check_same_device("unary", shared_unary, "image", shared_image)
    return shared_unary, shared_image


@dataclasses.dataclass
class _Prepared:
    backend: object
    unary: object          # (B, C, H, W), compute dtype, a copy
    image_features: object  # (B, F, H, W), compute dtype: the image before the feature transform
    features: object       # (B, F', H, W): what the kernels see
    params: CRFParams
    config: _meanfield.CRFConfig
    batched: bool
    transform: object      # (matrix, offset) as float64 NumPy arrays, or None
    library: str = "numpy"


def check_feature_transform(feature_transform, num_channels):
    """Validate a feature transform; return ``(matrix (F', F), offset (F',))`` float64 or None.

    Accepted: None; a dict with ``matrix`` (and optionally ``offset``); a ``(matrix, offset)`` pair;
    a bare (F', F) matrix; any object with ``matrix`` / ``offset`` attributes.
    """
    if feature_transform is None:
        return None
    if isinstance(feature_transform, dict):
        unknown = sorted(set(feature_transform) - {"matrix", "offset"})
        if unknown or "matrix" not in feature_transform:
            raise ValueError("feature_transform must be a dict with keys 'matrix' and optionally 'offset', "
                             f"got keys {sorted(feature_transform)}")
        matrix, offset = feature_transform["matrix"], feature_transform.get("offset")
    elif hasattr(feature_transform, "matrix"):
        matrix, offset = feature_transform.matrix, getattr(feature_transform, "offset", None)
    elif isinstance(feature_transform, (tuple, list)) and len(feature_transform) == 2 and \
            np.ndim(feature_transform[0]) == 2:
        matrix, offset = feature_transform
    else:
        matrix, offset = feature_transform, None
    matrix = _real_float64("matrix", matrix)
    offset = None if offset is None else _real_float64("offset", offset)
    if matrix.ndim != 2 or matrix.shape[1] != num_channels or matrix.shape[0] < 1:
        raise ValueError(
            f"feature_transform matrix must have shape (F', {num_channels}) for an image with "
            f"{num_channels} channel(s), got shape {matrix.shape}"
        )
    if offset is None:
        offset = np.zeros(matrix.shape[0])
    if offset.shape != (matrix.shape[0],):
        raise ValueError(f"feature_transform offset must have shape ({matrix.shape[0]},), got {offset.shape}")
    if not (np.isfinite(matrix).all() and np.isfinite(offset).all()):
        raise ValueError("feature_transform must contain only finite values")
    return matrix, offset


def _real_float64(part, value):
    """One part of a feature transform as a float64 NumPy array; complex values are a TypeError."""
    if type(value).__module__.split(".")[0] == "cupy":
        value = value.get()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"feature_transform {part} must be an array of numbers: {exc}") from exc
    if array.dtype.kind == "c":  # converting would silently drop the imaginary part
        raise TypeError(f"feature_transform {part} must be real, got complex dtype {array.dtype}")
    try:
        return np.array(array, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"feature_transform {part} must be an array of numbers: {exc}") from exc


def apply_feature_transform(xp, features, transform):
    """``A f + c`` on (B, F, *spatial) features; ``transform`` as :func:`check_feature_transform` returns."""
    if transform is None:
        return features
    matrix, offset = transform
    dt = features.dtype
    B, F = features.shape[:2]
    spatial = tuple(features.shape[2:])
    a = xp.asarray(matrix, dtype=dt)
    out = xp.matmul(a, features.reshape(B, F, -1)).reshape((B, a.shape[0]) + spatial)
    out += xp.asarray(offset, dtype=dt).reshape((1, -1) + (1,) * len(spatial))
    return out


def _prepare_inputs(unary, image, params, *, filter_size, blur, iterations, unary_kind, num_classes,
                    confidence, unknown_label, clip, normalization, output, dtype, device, feature_transform,
                    training, include_self=False, image_kind=None, spatial_dims=None, spacing=None):
    """Every check of :func:`infer`; returns a :class:`_Prepared` ready for the mean-field loop.

    ``image_kind`` is the array library the caller passed the image as (see
    :func:`cucrf.interop.array_kind`), for hints in the messages; None: that of ``image``.
    """
    if image_kind is None:
        image_kind = interop.array_kind(image)
    include_self = check_include_self(include_self)
    _choice("unary_kind", unary_kind, _UNARY_KINDS)
    _choice("output", output, _OUTPUTS)
    _choice("device", device, _DEVICES)
    spatial_dims = check_spatial_dims(spatial_dims)
    dtype = check_compute_dtype(dtype)

    unary, library = to_backend_array("unary", unary, device)
    image, image_library = to_backend_array("image", image, device)
    if image_library != library:
        raise TypeError(
            f"unary is a {library} array but image is a {image_library} array; pass both as NumPy "
            "arrays (CPU) or both as CuPy arrays (GPU), or set device="
        )
    backend = get_backend(library)
    xp = backend.xp
    nd = resolve_spatial_dims(spatial_dims, unary.shape, image.shape, unary_kind)
    if unary_kind != "labels":
        check_unary_layout(unary, image, nd)  # shapes only: before the image is blamed for the unary's layout
    given_unary = unary

    compute_dtype = dtype if dtype is not None else (
        np.dtype(np.float64) if unary.dtype == np.float64 else np.dtype(np.float32)
    )

    def check_memory(B, C, size, F, config):
        need = required_bytes(B, C, size, F, config, compute_dtype.itemsize, training=training,
                              stored_kernels=getattr(backend, "stores_kernels", True))
        available = backend.available_memory_bytes() if hasattr(backend, "available_memory_bytes") else available_memory_bytes()
        if available is not None and need > available:
            raise ProblemTooLargeError(
                f"this {'gradient' if training else 'inference'} needs about {need / 2**30:.1f} GiB "
                f"({'x'.join(map(str, (B, C) + tuple(size)))}, filter_size={config.filter_size}, "
                f"blur={config.blur}) but only "
                f"{available / 2**30:.1f} GiB is available; split the batch, use a larger blur or a smaller filter_size"
            )

    # The (B, C, H, W) unary that labels or probabilities become, estimated from the shapes
    # before converting: a problem refused for its size is never allocated.
    planned = None
    if unary_kind == "labels":
        if num_classes is None:
            raise ValueError("unary_kind='labels' needs num_classes")
        if unary.ndim in (nd, nd + 1) and unary.size:
            lead = unary.shape[:-nd] or (1,)
            planned = (lead[0], check_int("num_classes", num_classes, minimum=2)) + tuple(unary.shape[-nd:])
    elif unary_kind == "probabilities" and unary.ndim in (nd + 1, nd + 2) and unary.size:
        planned = tuple(unary.shape) if unary.ndim == nd + 2 else (1,) + tuple(unary.shape)
    if planned is not None:
        channels = image.shape[-1] if image.ndim >= nd + 1 and image.shape[-1] else 1
        check_memory(planned[0], planned[1], planned[2:], channels,
                     check_config(filter_size, blur, iterations, normalization, planned[2:],
                                  keep_centre=include_self, spacing=spacing))

    if unary_kind == "labels":
        if nd == 3 and unary.ndim not in (3, 4):
            raise ValueError(f"unary must be a label volume (D, H, W) or a batch of them (B, D, H, W) with "
                             f"spatial_dims=3, got shape {tuple(unary.shape)}")
        unary = unary_from_labels(unary, num_classes, confidence, unknown_label, spatial_dims=nd)
    elif unary_kind == "probabilities":
        unary = unary_from_probabilities(unary, clip)
    if nd == 3 and unary.ndim not in (4, 5):
        raise ValueError(f"unary must have shape (C, D, H, W) or (B, C, D, H, W) with spatial_dims=3, got shape "
                         f"{tuple(unary.shape)}")
    check_float_array("unary", unary, xp, ndims=(nd + 1, nd + 2), finite=False)

    batched = unary.ndim == nd + 2
    u4 = unary if batched else unary[None]
    B, C = u4.shape[:2]
    size = tuple(u4.shape[2:])
    if C < 2:
        raise ValueError(f"unary must have at least 2 classes on axis {1 if batched else 0}, got shape {tuple(unary.shape)}")
    image4 = check_image(image, xp, B, size, batched, finite=False, kind=image_kind)
    F = image4.shape[-1]
    transform = check_feature_transform(feature_transform, F)
    F_out = F if transform is None else transform[0].shape[0]
    config = check_config(filter_size, blur, iterations, normalization, size, keep_centre=include_self,
                          spacing=spacing)
    params = _check_params(params, C, F_out)

    check_memory(B, C, size, max(F, F_out), config)

    # Scanned for NaN only now: a problem refused for its size is never read. One scan of the
    # unary's extremes serves the finiteness, the diagnostics and the magnitude checks.
    unary_range = extremes(unary, xp, scan=getattr(backend, "extremes", None)) if unary.size else None
    check_finite("unary", unary, xp, value_range=unary_range)
    check_finite("image", image4, xp)
    # With a feature transform theta_beta is in the transformed units: the image scale says nothing.
    check_inputs(given_unary, image4 if transform is None else None, unary_kind=unary_kind, params=params,
                 stacklevel=3, spatial_dims=nd, unary_extremes=unary_range if given_unary is unary else None)
    # Values the compute dtype cannot carry through the kernels and the softmax are refused here,
    # naming the input, instead of coming back as NaN.
    check_unary_magnitude(u4, xp, params.unary_weight, compute_dtype, unary_extremes=unary_range)
    check_image_magnitude(image4, xp, compute_dtype)
    # No copy when the dtype already fits: mean-field inference never writes to its inputs, and
    # a copy would cost a whole unary's worth of memory.
    u = u4.astype(compute_dtype, copy=False)
    image_features = xp.empty(image4.shape[:1] + image4.shape[-1:] + image4.shape[1:-1], dtype=compute_dtype)
    image_features[...] = xp.moveaxis(image4, -1, 1)  # cast and made channels-first in one pass
    if not config.plain or nd != 2:
        check_backend_geometry(backend, nd, config)
    features = apply_feature_transform(xp, image_features, transform)
    if config.iterations > 0:  # without an iteration the features are never used
        integer = transform is None and image4.dtype.kind in "ui"
        check_feature_magnitude(features, xp, params.theta_beta_vector(F_out), config.blur, training,
                                transformed=transform is not None,
                                bounds=(np.iinfo(image4.dtype).min, np.iinfo(image4.dtype).max) if integer else None)
    return _Prepared(backend, u, image_features, features, params, config, batched, transform, library)


@dataclasses.dataclass
class InferVJP:
    """What :func:`infer_vjp` returns: the output of :func:`infer` and the gradients of the loss.

    Attributes
    ----------
    output : array, shape like ``unary``
        The probabilities or logits :func:`infer` returns.
    unary : array, shape and library like ``unary``, compute dtype
        ``dL/dunary``.
    image : array, shape and library like ``image``, compute dtype (float)
        ``dL/dimage`` (the image as per-pixel features, before any feature transform).
    params : dict
        ``dL/dparam`` for every field of :class:`CRFParams`: floats for ``theta_alpha``,
        ``theta_gamma``, ``appearance_weight``, ``smoothness_weight``, ``unary_weight``;
        ``theta_beta`` a float when ``params.theta_beta`` is one number, else an (F,) float64
        array; ``compatibility`` a (C, C) float64 array (for Potts the gradient with respect to
        the full matrix evaluated at ``1 - I``).
    feature_transform : dict or None
        ``{'matrix': (F', F), 'offset': (F',)}`` float64 gradients when a transform was given.
    """

    output: object
    unary: object
    image: object
    params: dict
    feature_transform: Optional[dict] = None


def _feature_transform_backward(xp, image_features, grad_features, transform):
    """Gradients of ``A f + c``: (grad wrt f, {'matrix', 'offset'})."""
    matrix, _ = transform
    B, F = image_features.shape[:2]
    Fo = matrix.shape[0]
    g = grad_features.reshape(B, Fo, -1)
    f = image_features.reshape(B, F, -1)
    g_matrix = xp.matmul(g, f.transpose(0, 2, 1)).sum(axis=0)
    g_offset = g.sum(axis=(0, 2))
    to_np = (lambda a: np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64))
    grad_f = xp.matmul(xp.asarray(matrix.T, dtype=grad_features.dtype), g).reshape(image_features.shape)
    return grad_f, {"matrix": to_np(g_matrix), "offset": to_np(g_offset)}


def params_gradient_dict(params, grads):
    """Shape the raw gradients of :func:`cucrf._meanfield.mean_field_backward` like ``params``."""
    out = {
        "theta_alpha": float(grads["theta_alpha"]),
        "theta_beta": (float(np.sum(grads["theta_beta"])) if isinstance(params.theta_beta, float)
                       else np.asarray(grads["theta_beta"], dtype=np.float64)),
        "theta_gamma": float(grads["theta_gamma"]),
        "appearance_weight": float(grads["appearance_weight"]),
        "smoothness_weight": float(grads["smoothness_weight"]),
        "compatibility": np.asarray(grads["compatibility"], dtype=np.float64),
        "unary_weight": float(grads["unary_weight"]),
    }
    return out


def infer_vjp(unary, image, params=None, *, grad_output, filter_size=DEFAULT_FILTER_SIZE, blur=DEFAULT_BLUR,
              iterations=DEFAULT_ITERATIONS, unary_kind="logits", normalization=None, include_self=False,
              output="probabilities", dtype=None, device=None, feature_transform=None, like=None,
              spatial_dims=None, spacing=None):
    """Run :func:`infer` and back-propagate ``grad_output`` through it (a vector-Jacobian product).

    For a loss ``L`` of the output, pass ``grad_output = dL/doutput`` and get ``dL/d`` every input:
    the unary, the image (as per-pixel features) and every CRF parameter. The gradients are
    analytic (reverse mode through the ``iterations`` unrolled mean-field updates), computed in
    the compute dtype; parameter gradients are summed in a fixed order (deterministic).

    Parameters
    ----------
    unary, image, params, filter_size, blur, iterations, normalization, include_self, spatial_dims, spacing
        As for :func:`infer`; checked the same way.
    output, dtype, device, like
        As for :func:`infer`. With ``like='input'`` the output and the unary gradient are of the
        unary's kind and the image gradient of the image's kind; parameter gradients stay floats
        and NumPy arrays.
    grad_output : array, shape of the output (that is, of ``unary``)
        ``dL/doutput``, where the output is the probabilities or the logits (``output=``).
    unary_kind : {'logits'}
        Gradients are taken with respect to logits only.
    feature_transform : optional
        A learnable linear map of the image channels, ``features = A @ f + c`` per pixel: a dict
        ``{'matrix': (F', F), 'offset': (F',)}``, a ``(matrix, offset)`` pair or a matrix;
        ``params.theta_beta`` then has one value per transformed channel. See :func:`infer`.

    Returns
    -------
    InferVJP
        ``.output``, ``.unary``, ``.image``, ``.params`` (dict), ``.feature_transform``.

    Raises
    ------
    ValueError
        As for :func:`infer`; also when an image's raw value range squared (which the gradient
        computes) exceeds a quarter of the compute dtype's largest value, and instead of returning
        an output or gradient that holds NaN or infinity.

    Examples
    --------
    >>> import numpy as np, cucrf
    >>> rng = np.random.default_rng(0)
    >>> unary = rng.normal(size=(3, 12, 16)); image = rng.uniform(0, 255, (12, 16, 3))
    >>> r = cucrf.infer_vjp(unary, image, grad_output=np.ones((3, 12, 16)), blur=2)
    >>> r.unary.shape, r.image.shape, sorted(r.params)[:2]
    ((3, 12, 16), (12, 16, 3), ['appearance_weight', 'compatibility'])
    """
    if unary_kind != "logits":
        raise ValueError(f"infer_vjp differentiates with respect to logits only: unary_kind must be 'logits', "
                         f"got {unary_kind!r}")
    reference = _like_reference(like, unary, image)
    image_kind = interop.array_kind(image)
    unary, image = _share_inputs(unary, image, device)
    with device_scope(unary):
        prepared = _prepare_inputs(
            unary, image, params, filter_size=filter_size, blur=blur, iterations=iterations, unary_kind="logits",
            num_classes=None, confidence=None, unknown_label=None, clip=1e-5, normalization=normalization,
            include_self=include_self, output=output, dtype=dtype, device=device,
            feature_transform=feature_transform, training=True, image_kind=image_kind, spatial_dims=spatial_dims,
            spacing=spacing,
        )
        backend, xp = prepared.backend, prepared.backend.xp
        _meanfield.check_backward_support(backend)
        grad_output_in = grad_output
        grad_output, library = to_backend_array("grad_output", grad_output, device)
        if library != prepared.library:
            raise TypeError(f"unary is a {prepared.library} array but grad_output is {describe(grad_output_in)}; "
                            "pass both from the same array library and device")
        check_same_device("unary", prepared.unary, "grad_output", grad_output)
        check_float_array("grad_output", grad_output, xp, ndims=(prepared.unary.ndim - (0 if prepared.batched else 1),),
                          finite=False)

        def check_grad_output_finite():
            # scanned in one pass by the backend's scan where it has one, as the unary is
            check_finite("grad_output", grad_output, xp,
                         value_range=extremes(grad_output, xp, scan=getattr(backend, "extremes", None)))

        g4 = grad_output if prepared.batched else grad_output[None]
        if tuple(g4.shape) != tuple(prepared.unary.shape):
            want = prepared.unary.shape if prepared.batched else prepared.unary.shape[1:]
            raise ValueError(f"grad_output must have the shape of the output {tuple(want)}, got shape "
                             f"{tuple(grad_output.shape)}")
        # A backend that can vouch for the unary's gradient as it makes it (the fused CPU path)
        # spares the scan: a NaN or infinity in grad_output reaches that gradient at its pixel
        # (the last softmax's vjp spreads it over the pixel's classes, and sums keep it), so a
        # finite gradient means a finite grad_output; otherwise grad_output is scanned afterwards
        # (the backward pass reads grad_output and never writes to it).
        vouches = hasattr(backend, "known_finite")
        if not vouches:
            check_grad_output_finite()
        tape = _meanfield.Tape()
        result = _meanfield.mean_field(backend, prepared.unary, prepared.features, prepared.params, prepared.config,
                                       return_logits=output == "logits", tape=tape)
        # (a grad_output not scanned yet may hold NaN or infinity: refused below, without NumPy's warnings)
        with np.errstate(all="ignore") if vouches else contextlib.nullcontext():
            g_unary, g_features, grads = _meanfield.mean_field_backward(backend, tape,
                                                                        g4.astype(prepared.unary.dtype, copy=False))
        unary_finite = vouches and _known_finite(backend, g_unary)
        if vouches and not unary_finite:
            check_grad_output_finite()
        g_transform = None
        if prepared.transform is not None:
            g_features, g_transform = _feature_transform_backward(xp, prepared.image_features, g_features,
                                                                  prepared.transform)
        g_image = _channels_last(xp, g_features)
        param_grads = params_gradient_dict(prepared.params, grads)
        computed = [("the output", result), ("the gradient with respect to the unary", g_unary),
                    ("the gradient with respect to the image", g_image)]
        computed += [(f"the gradient with respect to {k}", v) for k, v in param_grads.items()]
        computed += [(f"the gradient with respect to feature_transform {k}", v) for k, v in (g_transform or {}).items()]
        for what, value in computed:
            if value is g_unary and unary_finite:
                continue
            if isinstance(value, xp.ndarray) and _known_finite(backend, value):
                continue
            check_result_finite(f"{what} (cucrf.infer_vjp)", value, prepared.unary.dtype,
                                lambda: _magnitudes(prepared, g4),
                                inputs="grad_output, the unary or the image (with theta_beta)")
        if not prepared.batched:
            result, g_unary, g_image = result[0], g_unary[0], g_image[0]
        result = InferVJP(result, g_unary, g_image, param_grads, g_transform)
        if reference is not None:
            result = dataclasses.replace(result, output=_to_like(result.output, reference[0]),
                                         unary=_to_like(result.unary, reference[0]),
                                         image=_to_like(result.image, reference[1]))
    return result
