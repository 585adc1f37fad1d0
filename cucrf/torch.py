"""PyTorch adapter: cucrf as a differentiable PyTorch operation and a ``torch.nn.Module``.

Imported only on ``import cucrf.torch`` (PyTorch is not a dependency of cucrf; install the
``interop`` or ``torch`` extra). Two entry points:

* :func:`infer`: :func:`cucrf.infer` for tensors, recorded by autograd. Its backward is cucrf's
  analytic reverse mode (:func:`cucrf.infer_vjp`), so gradients flow to the unary (the network
  below), to a floating-point image, and to every CRF parameter given as a tensor.
* :class:`ConvCRF`: a module whose CRF parameters are ``torch.nn.Parameter`` objects (bandwidths
  as logarithms, so they stay positive), trained by the same optimiser as the network.

Tensors are shared with cucrf through DLPack without a copy: CPU tensors as NumPy arrays, CUDA
tensors as CuPy arrays on the same GPU (CuPy works on PyTorch's current CUDA stream, so no
synchronisation is added); results come back as tensors on the unary's device, again without a
copy.

Memory and time: the forward pass runs plain inference and keeps only references to its inputs;
the backward pass runs :func:`cucrf.infer_vjp`, which runs the forward iterations again with a
tape and then the reverse pass. Training therefore costs about one extra forward pass, and the
CRF's per-iteration intermediates occupy memory only during its own backward pass (like
activation checkpointing), not for the whole network's forward and backward.

Do not modify the unary, image or parameter tensors in place between the forward and backward
passes: autograd detects it (they are saved for backward) and raises.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import torch

from . import _api
from ._api import DEFAULT_BLUR, DEFAULT_FILTER_SIZE, DEFAULT_ITERATIONS
from ._params import CRFParams
from ._spatial import check_spatial_dims

__all__ = ["infer", "ConvCRF", "PARAM_NAMES", "LEARNABLE", "DEFAULT_LEARN"]

#: The fields of :class:`cucrf.CRFParams`, in the order the autograd function takes them.
PARAM_NAMES = ("theta_alpha", "theta_beta", "theta_gamma", "appearance_weight", "smoothness_weight",
               "compatibility", "unary_weight")
#: What :class:`ConvCRF` can learn (the names :func:`cucrf.fit` uses).
LEARNABLE = ("weights", "bandwidths", "compatibility", "unary_weight")
#: What :class:`ConvCRF` learns unless told otherwise.
DEFAULT_LEARN = LEARNABLE

_OUTPUTS = ("probabilities", "logits")


@contextlib.contextmanager
def _cuda_stream(tensor):
    """Make CuPy work on the tensor's GPU and on PyTorch's current stream there (no-op on the CPU)."""
    if tensor.device.type != "cuda":
        yield
        return
    import cupy  # noqa: PLC0415  (needed for CUDA tensors anyway)

    stream = torch.cuda.current_stream(tensor.device)
    with cupy.cuda.Device(tensor.device.index), cupy.cuda.ExternalStream(stream.cuda_stream, tensor.device.index):
        yield


class _Spec:
    """The non-tensor part of a call: settings and the constant parameters."""

    def __init__(self, constants, tensor_names, settings):
        self.constants = constants          # dict: field -> Python value (CRFParams.to_dict() style)
        self.tensor_names = tensor_names    # fields given as tensors, in PARAM_NAMES order
        self.settings = settings            # keyword arguments of cucrf.infer

    def params(self, values):
        """CRFParams from the constants and the current values of the tensor-valued fields."""
        fields = dict(self.constants)
        if values:
            flat = torch.cat([v.detach().reshape(-1).to("cpu", torch.float64) for v in values]).tolist()
            at = 0
            for name, value in zip(self.tensor_names, values):
                n = value.numel()
                chunk = flat[at:at + n]
                at += n
                if name == "compatibility":
                    if value.dim() != 2:
                        raise ValueError(f"compatibility must be a (C, C) tensor, got shape {tuple(value.shape)}")
                    fields[name] = np.array(chunk).reshape(tuple(value.shape))
                elif name == "theta_beta" and value.dim() > 0 and n > 1:
                    if value.dim() != 1:
                        raise ValueError(f"theta_beta must be a scalar or an (F,) tensor, got shape {tuple(value.shape)}")
                    fields[name] = tuple(chunk)
                else:
                    if n != 1:
                        raise ValueError(f"{name} must be a scalar tensor, got shape {tuple(value.shape)}")
                    fields[name] = chunk[0]
        return CRFParams(**fields)


def _split_params(params):
    """``(constants, tensor_names, tensors)`` from None, a CRFParams or a dict of numbers and tensors."""
    if params is None:
        given = {}
    elif isinstance(params, CRFParams):
        given = params.to_dict()
    elif isinstance(params, dict):
        unknown = sorted(set(params) - set(PARAM_NAMES))
        if unknown:
            raise ValueError(f"unknown CRF parameter(s) {unknown}; expected some of {list(PARAM_NAMES)}")
        given = dict(params)
    else:
        raise TypeError(f"params must be None, a cucrf.CRFParams or a dict of numbers and tensors, got "
                        f"{type(params).__name__}")
    constants = CRFParams().to_dict()
    names, tensors = [], []
    for name in PARAM_NAMES:
        if name not in given:
            continue
        value = given[name]
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                raise TypeError(f"params[{name!r}] must be a floating-point tensor, got dtype {value.dtype}")
            names.append(name)
            tensors.append(value)
        else:
            constants[name] = value
    CRFParams(**{k: v for k, v in constants.items()})  # validate the constants now, with their names
    return constants, tuple(names), tensors


def _check_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}; for NumPy, CuPy or JAX arrays "
                        "use cucrf.infer or cucrf.jax.infer")


class _CRFFunction(torch.autograd.Function):
    """Forward: :func:`cucrf.infer`; backward: :func:`cucrf.infer_vjp` (recomputes the forward)."""

    @staticmethod
    def forward(ctx, spec, unary, image, *values):  # noqa: D401
        params = spec.params(values)
        with _cuda_stream(unary):
            output = _api.infer(unary.detach(), image.detach(), params, like=unary, **spec.settings)
        ctx.spec, ctx.params = spec, params
        ctx.save_for_backward(unary, image, *values)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        unary, image, *values = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with _cuda_stream(unary):
            r = _api.infer_vjp(unary.detach(), image.detach(), ctx.params, grad_output=grad_output.detach(),
                               like="input", **ctx.spec.settings)
        g_unary = r.unary.to(unary.dtype) if needs[1] else None
        g_image = r.image.to(image.dtype) if needs[2] and image.is_floating_point() else None
        g_values = []
        for i, (name, value) in enumerate(zip(ctx.spec.tensor_names, values)):
            if not needs[3 + i]:
                g_values.append(None)
                continue
            g = torch.as_tensor(np.asarray(r.params[name], dtype=np.float64))
            g_values.append(g.to(device=value.device, dtype=value.dtype).reshape(value.shape))
        return (None, g_unary, g_image, *g_values)


def infer(unary, image, params=None, *, filter_size=DEFAULT_FILTER_SIZE, blur=DEFAULT_BLUR,
          iterations=DEFAULT_ITERATIONS, normalization=None, include_self=False, output="probabilities",
          dtype=None, spatial_dims=None, spacing=None):
    """:func:`cucrf.infer` on PyTorch tensors, differentiable by autograd.

    Parameters
    ----------
    unary : torch.Tensor, shape (C, H, W) or (B, C, H, W); volumes (C, D, H, W) or (B, C, D, H, W)
        Logits (class scores), on the CPU or a CUDA GPU; gradients flow back to it.
    image : torch.Tensor, shape (H, W, F) or (B, H, W, F); volumes (D, H, W, F) or (B, D, H, W, F)
        Channels-last image or features on the unary's device, integer or floating point. For a
        channels-first batch pass ``images.permute(0, 2, 3, 1)`` (``permute(0, 2, 3, 4, 1)`` for
        volumes; a view: no copy). A floating-point image receives a gradient (so learned
        features can sit below the CRF).
    params : None, cucrf.CRFParams or dict
        The CRF parameters; a dict maps field names of :class:`cucrf.CRFParams` to numbers or
        tensors (missing fields take their defaults). Tensor fields receive gradients: scalar
        tensors for ``theta_alpha``, ``theta_gamma``, the weights and ``unary_weight``; a scalar
        or an (F,) tensor for ``theta_beta``; a (C, C) tensor for ``compatibility`` (or the string
        ``'potts'``). Bandwidths must be positive: parametrise them as ``log_theta.exp()``.
    filter_size, blur, iterations, normalization, include_self, output, dtype, spatial_dims, spacing
        As for :func:`cucrf.infer` (``include_self=True``: the window keeps its centre cell, as
        upstream ConvCRF's does; volumes need ``spatial_dims=3``).

    Returns
    -------
    torch.Tensor, shape of ``unary``, on its device
        Probabilities or logits (``output=``), of the compute dtype (float64 for a float64
        unary, else float32), sharing memory with cucrf's result.

    Examples
    --------
    >>> import torch, cucrf.torch
    >>> unary = torch.randn(1, 3, 12, 16, dtype=torch.float64, requires_grad=True)
    >>> image = torch.rand(1, 12, 16, 3, dtype=torch.float64) * 255
    >>> w = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    >>> q = cucrf.torch.infer(unary, image, {"appearance_weight": w}, blur=2)
    >>> (q[:, 0] ** 2).sum().backward()
    >>> unary.grad.shape, w.grad.shape
    (torch.Size([1, 3, 12, 16]), torch.Size([]))
    """
    _check_tensor("unary", unary)
    _check_tensor("image", image)
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {list(_OUTPUTS)}, got {output!r}")
    if unary.device != image.device:
        raise ValueError(f"unary is on {unary.device} but image on {image.device}; put both on the same device")
    if not unary.is_floating_point():
        raise TypeError(f"unary must hold floating-point logits, got dtype {unary.dtype}; for a label map use "
                        "cucrf.unary_from_labels first")
    include_self = _api.check_include_self(include_self)
    constants, names, tensors = _split_params(params)
    settings = dict(filter_size=filter_size, blur=blur, iterations=iterations, normalization=normalization,
                    include_self=include_self, output=output, dtype=dtype, spatial_dims=spatial_dims, spacing=spacing)
    return _CRFFunction.apply(_Spec(constants, names, settings), unary, image, *tensors)


def _check_learn(learn):
    if learn == "all":
        return LEARNABLE
    if isinstance(learn, str):
        learn = (learn,)
    try:
        learn = tuple(learn)
    except TypeError:
        raise TypeError(f"learn must be 'all' or a sequence of names from {list(LEARNABLE)}, got {learn!r}") from None
    unknown = [x for x in learn if x not in LEARNABLE]
    if unknown:
        hint = ("; a feature transform is an ordinary torch layer on the image below the CRF"
                if "feature_transform" in unknown else "")
        raise ValueError(f"learn holds unknown name(s) {unknown}; choose from {list(LEARNABLE)}{hint}")
    return learn


class ConvCRF(torch.nn.Module):
    """A convolutional CRF layer with learnable parameters, for end-to-end training.

    ``crf(unary, image)`` runs :func:`infer` with the module's parameters. Learned parameters
    are ``torch.nn.Parameter`` objects, the others buffers (both follow ``.to()``, ``.double()``
    and ``state_dict()``):

    ======================  =====================================  ===================
    name                    meaning                                learned with
    ======================  =====================================  ===================
    ``log_theta_alpha``     log of the appearance kernel's         ``'bandwidths'``
                            spatial bandwidth (pixels)
    ``log_theta_beta``      log colour bandwidth(s): () or (F,)    ``'bandwidths'``
    ``log_theta_gamma``     log of the smoothness bandwidth        ``'bandwidths'``
    ``appearance_weight``   appearance kernel weight               ``'weights'``
    ``smoothness_weight``   smoothness kernel weight               ``'weights'``
    ``compatibility``       (C, C) label compatibility             ``'compatibility'``
    ``unary_weight``        factor on the unary                    ``'unary_weight'``
    ======================  =====================================  ===================

    Parameters
    ----------
    num_classes : int, optional
        Number of classes C; needed to learn the compatibility from a Potts start (it becomes the
        full matrix ``1 - I``, learned entry by entry: the paper's "+C").
    params : cucrf.CRFParams or dict, optional
        Starting values (defaults: ``CRFParams()``). A tuple ``theta_beta`` gives one learned
        bandwidth per image channel.
    filter_size, blur, iterations, normalization, include_self
        As for :func:`cucrf.infer`; fixed for the module's life (``include_self=True``: the window
        keeps its centre cell, as upstream ConvCRF's does).
    spatial_dims : {2, 3}
        2 for images (B, C, H, W), 3 for volumes (B, C, D, H, W) with images (B, D, H, W, F).
    spacing : float or tuple of float, optional
        Voxel spacing per axis (``theta_alpha`` and ``theta_gamma`` are in its units).
    learn : 'all' or sequence of str
        What to learn, from ``'weights'``, ``'bandwidths'``, ``'compatibility'``,
        ``'unary_weight'`` (default: all four); ``()`` makes a fixed CRF that still passes
        gradients to the unary and the image.
    output : {'logits', 'probabilities'}
        ``'logits'`` (the default here) returns ``a * U - Phi``, ready for
        ``torch.nn.functional.cross_entropy``; its softmax is the CRF's marginals.
    dtype : {None, numpy.float32, numpy.float64}
        Compute precision (None: float64 for a float64 unary, else float32).

    Examples
    --------
    >>> import torch, cucrf.torch
    >>> crf = cucrf.torch.ConvCRF(num_classes=3, filter_size=5, blur=2, iterations=3)
    >>> sorted(name for name, _ in crf.named_parameters())[:3]
    ['appearance_weight', 'compatibility', 'log_theta_alpha']
    >>> logits = crf(torch.randn(2, 3, 16, 20), torch.rand(2, 16, 20, 3) * 255)
    >>> logits.shape
    torch.Size([2, 3, 16, 20])
    """

    def __init__(self, num_classes=None, params=None, *, filter_size=DEFAULT_FILTER_SIZE, blur=DEFAULT_BLUR,
                 iterations=DEFAULT_ITERATIONS, normalization=None, include_self=False, learn=DEFAULT_LEARN,
                 output="logits", dtype=None, spatial_dims=2, spacing=None):
        super().__init__()
        if params is None:
            params = CRFParams()
        elif isinstance(params, dict):
            params = CRFParams.from_dict(params)
        elif not isinstance(params, CRFParams):
            raise TypeError(f"params must be a cucrf.CRFParams, a dict or None, got {type(params).__name__}")
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
                raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
            num_classes = int(num_classes)
            if not params.is_potts and params.num_classes != num_classes:
                raise ValueError(f"params.compatibility is {params.num_classes}x{params.num_classes} but "
                                 f"num_classes={num_classes}")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {list(_OUTPUTS)}, got {output!r}")
        learn = _check_learn(learn)
        # Checked now rather than at the first forward pass.
        include_self = _api.check_include_self(include_self)
        spatial_dims = check_spatial_dims(spatial_dims)
        if spatial_dims is None:
            raise ValueError("spatial_dims must be 2 (images) or 3 (volumes), got None")
        _api.check_config(filter_size, blur, iterations, normalization, (10**6,) * spatial_dims,
                          keep_centre=include_self, spacing=spacing)
        self.spatial_dims, self.spacing = spatial_dims, spacing
        self.num_classes = num_classes if num_classes is not None else params.num_classes
        self.filter_size, self.blur, self.iterations = filter_size, blur, iterations
        self.normalization, self.output, self.dtype = normalization, output, dtype
        self.include_self = include_self
        self.learn = learn

        def add(name, value, learned):
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=torch.get_default_dtype())
            if learned:
                self.register_parameter(name, torch.nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

        bandwidths = "bandwidths" in learn
        add("log_theta_alpha", math.log(params.theta_alpha), bandwidths)
        add("log_theta_beta", np.log(np.asarray(params.theta_beta, dtype=np.float64)), bandwidths)
        add("log_theta_gamma", math.log(params.theta_gamma), bandwidths)
        add("appearance_weight", params.appearance_weight, "weights" in learn)
        add("smoothness_weight", params.smoothness_weight, "weights" in learn)
        if "compatibility" in learn:
            if self.num_classes is None:
                raise ValueError("learning the compatibility from a Potts start needs num_classes (the matrix is "
                                 "C x C); pass num_classes=C, or learn without 'compatibility'")
            add("compatibility", params.compatibility_matrix(self.num_classes), True)
        elif params.is_potts:
            self.compatibility = None  # Potts, fixed: the fast path
        else:
            add("compatibility", params.compatibility_matrix(params.num_classes), False)
        add("unary_weight", params.unary_weight, "unary_weight" in learn)

    def param_tensors(self):
        """The CRF parameters as a dict of tensors, as :func:`infer` takes them (bandwidths exponentiated)."""
        values = {
            "theta_alpha": self.log_theta_alpha.exp(),
            "theta_beta": self.log_theta_beta.exp(),
            "theta_gamma": self.log_theta_gamma.exp(),
            "appearance_weight": self.appearance_weight,
            "smoothness_weight": self.smoothness_weight,
            "unary_weight": self.unary_weight,
        }
        values["compatibility"] = "potts" if self.compatibility is None else self.compatibility
        return values

    def crf_params(self):
        """The current parameters as a :class:`cucrf.CRFParams` (for :func:`cucrf.infer` or JSON)."""
        with torch.no_grad():
            values = {k: (v if isinstance(v, str) else v.detach().cpu().double().numpy())
                      for k, v in self.param_tensors().items()}
        tb = values["theta_beta"]
        return CRFParams(
            theta_alpha=float(values["theta_alpha"]), theta_beta=float(tb) if tb.ndim == 0 else tuple(tb.tolist()),
            theta_gamma=float(values["theta_gamma"]), appearance_weight=float(values["appearance_weight"]),
            smoothness_weight=float(values["smoothness_weight"]), compatibility=values["compatibility"],
            unary_weight=float(values["unary_weight"]),
        )

    def forward(self, unary, image):
        """Refine ``unary`` (B, C, *spatial) or (C, *spatial) logits with ``image`` (B, *spatial, F) or (*spatial, F)."""
        return infer(unary, image, self.param_tensors(), filter_size=self.filter_size, blur=self.blur,
                     iterations=self.iterations, normalization=self.normalization,
                     include_self=self.include_self, output=self.output, dtype=self.dtype,
                     spatial_dims=self.spatial_dims, spacing=self.spacing)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, spatial_dims={self.spatial_dims}, filter_size={self.filter_size}, "
                f"blur={self.blur}, spacing={self.spacing}, "
                f"iterations={self.iterations}, normalization={self.normalization!r}, "
                f"include_self={self.include_self}, output={self.output!r}, learn={self.learn}")
