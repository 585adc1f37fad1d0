"""JAX adapter: cucrf as a JAX operation with a custom VJP, usable under ``jax.jit``, ``grad`` and ``vmap``.

Imported only on ``import cucrf.jax`` (JAX is not a dependency of cucrf; install the ``interop``
or ``jax`` extra). :func:`infer` is :func:`cucrf.infer` for JAX arrays: its forward pass runs
cucrf's mean-field inference and its backward pass cucrf's analytic reverse mode
(:func:`cucrf.infer_vjp`), through ``jax.custom_vjp``. Gradients reach the unary, a
floating-point image, and every CRF parameter given as a JAX array.

How the data reaches cucrf (JAX cannot run NumPy or CuPy code inside a compiled program, so cucrf
runs as a host callback):

* With ``jax.experimental.buffer_callback`` (experimental; used when the installed JAX has it,
  as 0.10 does) cucrf receives JAX's own buffers: on the CPU as NumPy views, on a GPU as CuPy
  views on JAX's CUDA stream and device (no host round trip); the result is written into JAX's
  output buffer (one device-local copy, since cucrf does not compute in place).
* Otherwise through ``jax.pure_callback``: on the CPU the arguments arrive as NumPy views, on a
  GPU JAX stages them through host memory (a device-to-host and a host-to-device copy, and cucrf
  computes with NumPy unless ``device='gpu'``).

Outside ``jit`` and for inference only, ``cucrf.infer(jax_array, ..., like='input')`` shares a JAX
array (CPU or GPU) through DLPack without any copy.

The backward pass runs the forward iterations again (with a tape) and then the reverse pass: about
one extra forward pass, and no per-iteration intermediates kept between JAX's forward and backward.
Under ``vmap`` the callback runs once per batch element (``vmap_method='sequential'``); a batch
axis of the unary itself (B, C, H, W) is processed in one call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _api
from ._api import DEFAULT_BLUR, DEFAULT_FILTER_SIZE, DEFAULT_ITERATIONS
from ._params import CRFParams
from ._spatial import check_spatial_dims, resolve_spatial_dims

try:  # recent JAX: zero-copy access to JAX's buffers (CPU and GPU)
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - older JAX
    _buffer_callback = None

__all__ = ["infer", "PARAM_NAMES", "param_arrays"]

#: The fields of :class:`cucrf.CRFParams` that can be given as JAX arrays.
PARAM_NAMES = ("theta_alpha", "theta_beta", "theta_gamma", "appearance_weight", "smoothness_weight",
               "compatibility", "unary_weight")

_OUTPUTS = ("probabilities", "logits")

#: Which callback carries the data: "buffer" (buffer_callback, when JAX has it) or "pure" (pure_callback).
CALLBACK = "buffer" if _buffer_callback is not None else "pure"


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a call (hashable: it is a non-differentiable argument of the custom VJP)."""

    constants: CRFParams
    names: tuple            # fields given as arrays, sorted (the order of JAX's dict pytree)
    filter_size: object     # int or tuple
    blur: object            # int or tuple
    iterations: int
    normalization: object
    output: str
    device: object
    include_self: bool = False
    spatial_dims: int = 2
    spacing: object = None  # None or tuple

    def settings(self):
        return dict(filter_size=self.filter_size, blur=self.blur, iterations=self.iterations,
                    normalization=self.normalization, include_self=self.include_self, output=self.output,
                    device=self.device, spatial_dims=self.spatial_dims, spacing=self.spacing)

    def params(self, dynamic):
        """CRFParams from the constants and the (NumPy or CuPy) values of the array-valued fields."""
        changes = {}
        for name in self.names:
            value = np.asarray(dynamic[name].get() if hasattr(dynamic[name], "get") else dynamic[name],
                               dtype=np.float64)
            if name == "compatibility":
                changes[name] = value
            elif name == "theta_beta" and value.size > 1:
                changes[name] = tuple(value.ravel().tolist())
            else:
                changes[name] = float(value.reshape(()))
        return self.constants.replace(**changes) if changes else self.constants


def _host_forward(spec, unary, image, dynamic):
    return _api.infer(unary, image, spec.params(dynamic), dtype=unary.dtype, **spec.settings())


def _host_backward(spec, unary, image, dynamic, grad_output):
    r = _api.infer_vjp(unary, image, spec.params(dynamic), grad_output=grad_output, dtype=unary.dtype,
                       **spec.settings())
    g_params = {name: np.asarray(r.params[name], dtype=dynamic[name].dtype).reshape(dynamic[name].shape)
                for name in spec.names}
    return r.unary, r.image, g_params


def _to_host(value):
    return value.get() if type(value).__module__.split(".")[0] == "cupy" else np.asarray(value)


def _pure(fn, result_shapes, *args):
    def host(*arrays):
        out = fn(*arrays)
        return jax.tree_util.tree_map(lambda r, s: _to_host(r).astype(s.dtype, copy=False).reshape(s.shape),
                                      out, result_shapes)
    try:
        return jax.pure_callback(host, result_shapes, *args, vmap_method="sequential")
    except TypeError as exc:  # pragma: no cover - JAX < 0.4.34 names it differently
        if "vmap_method" not in str(exc):
            raise
        return jax.pure_callback(host, result_shapes, *args, vectorized=False)


def _buffer(fn, result_shapes, *args):
    def callback(ctx, out, *buffers):
        leaves = jax.tree_util.tree_leaves(buffers)
        dev_type, dev_id = leaves[0].__dlpack_device__()
        if int(dev_type) == 2:  # CUDA: CuPy views of JAX's buffers, on JAX's device and stream
            import cupy  # noqa: PLC0415

            with cupy.cuda.Device(dev_id), cupy.cuda.ExternalStream(ctx.stream, dev_id):
                _run(fn, cupy.asarray, out, buffers)
        else:
            _run(fn, np.from_dlpack, out, buffers)
    return _buffer_callback(callback, result_shapes, vmap_method="sequential")(*args)


def _run(fn, view, out, buffers):
    arrays = jax.tree_util.tree_map(view, buffers)
    results = fn(*arrays)
    for target, result in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(results)):
        target = view(target)
        if type(target).__module__.split(".")[0] == "cupy":
            import cupy  # noqa: PLC0415

            result = cupy.asarray(result)
        else:
            result = _to_host(result)
        target[...] = result.reshape(target.shape)


def _call(fn, result_shapes, *args):
    if CALLBACK == "buffer" and _buffer_callback is not None:
        return _buffer(fn, result_shapes, *args)
    return _pure(fn, result_shapes, *args)


def _shape_of(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _crf(spec, unary, image, dynamic):
    return _call(functools.partial(_host_forward, spec), _shape_of(unary), unary, image, dynamic)


def _crf_fwd(spec, unary, image, dynamic):
    return _crf(spec, unary, image, dynamic), (unary, image, dynamic)


def _crf_bwd(spec, residuals, grad_output):
    unary, image, dynamic = residuals
    shapes = (_shape_of(unary), _shape_of(image), jax.tree_util.tree_map(_shape_of, dynamic))
    return _call(functools.partial(_host_backward, spec), shapes, unary, image, dynamic, grad_output)


_crf.defvjp(_crf_fwd, _crf_bwd)


def _is_array(value):
    return isinstance(value, (jax.Array, np.ndarray, np.generic))  # tracers included


def _split_params(params):
    if params is None:
        given = {}
    elif isinstance(params, CRFParams):
        return params, {}
    elif isinstance(params, dict):
        unknown = sorted(set(params) - set(PARAM_NAMES))
        if unknown:
            raise ValueError(f"unknown CRF parameter(s) {unknown}; expected some of {list(PARAM_NAMES)}")
        given = params
    else:
        raise TypeError(f"params must be None, a cucrf.CRFParams or a dict of numbers and JAX arrays, got "
                        f"{type(params).__name__}")
    constants = {k: v for k, v in given.items() if not _is_array(v)}
    dynamic = {k: jnp.asarray(v) for k, v in given.items() if _is_array(v)}
    for name, value in dynamic.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"params[{name!r}] must be a floating-point array, got dtype {value.dtype}")
        want = {"compatibility": 2, "theta_beta": 1}.get(name, 0)
        if value.ndim > want or (name == "compatibility" and value.ndim != 2):
            raise ValueError(f"params[{name!r}] must have {want} dimension(s), got shape {value.shape}")
    return CRFParams(**constants), dynamic


def param_arrays(params=None, num_classes=None, dtype=jnp.float32):
    """A dict of JAX arrays holding every CRF parameter, for :func:`infer` and ``jax.grad``.

    A Potts compatibility becomes the full matrix ``1 - I`` (so ``num_classes`` is needed then).

    >>> p = param_arrays(num_classes=3)
    >>> sorted(p)[:3], p["compatibility"].shape
    (['appearance_weight', 'compatibility', 'smoothness_weight'], (3, 3))
    """
    params = CRFParams() if params is None else (CRFParams.from_dict(params) if isinstance(params, dict) else params)
    if params.is_potts and num_classes is None:
        raise ValueError("a Potts compatibility becomes a (C, C) array: pass num_classes")
    c = num_classes if num_classes is not None else params.num_classes
    d = params.to_dict()
    d["compatibility"] = params.compatibility_matrix(c)
    return {k: jnp.asarray(np.asarray(v, dtype=np.float64), dtype=dtype) for k, v in d.items()}


def infer(unary, image, params=None, *, filter_size=DEFAULT_FILTER_SIZE, blur=DEFAULT_BLUR,
          iterations=DEFAULT_ITERATIONS, normalization=None, include_self=False, output="probabilities",
          device=None, spatial_dims=None, spacing=None):
    """:func:`cucrf.infer` for JAX arrays, differentiable (``jax.custom_vjp``) and jit-compatible.

    Parameters
    ----------
    unary : jax.Array, shape (C, H, W) or (B, C, H, W); volumes (C, D, H, W) or (B, C, D, H, W)
        Logits. Computed in float64 when it is float64 (``jax_enable_x64``), else float32.
    image : jax.Array, shape (H, W, F) or (B, H, W, F); volumes (D, H, W, F) or (B, D, H, W, F)
        Channels-last image or features; cast to the compute dtype (so it receives a gradient).
    params : None, cucrf.CRFParams or dict
        Fields of :class:`cucrf.CRFParams`; dict values that are JAX arrays are differentiable
        (scalars; ``theta_beta`` a scalar or (F,); ``compatibility`` (C, C)), and so are NumPy
        arrays (converted); Python numbers, tuples and ``'potts'`` are constants. :func:`param_arrays` builds a complete dict. Bandwidths must stay positive:
        parametrise them as ``jnp.exp(log_theta)``.
    filter_size, blur, iterations, normalization, include_self, output, spatial_dims, spacing
        As for :func:`cucrf.infer` (static: changing them retraces). ``include_self=True``: the
        window keeps its centre cell, as upstream ConvCRF's does. Volumes need ``spatial_dims=3``.
    device : {None, 'cpu', 'gpu'}
        Where cucrf computes inside the callback; None: where the callback's data is.

    Returns
    -------
    jax.Array, shape of ``unary``, compute dtype

    Examples
    --------
    >>> import jax, jax.numpy as jnp, cucrf.jax
    >>> unary = jax.random.normal(jax.random.PRNGKey(0), (3, 12, 16))
    >>> image = jnp.ones((12, 16, 3)) * 100.0
    >>> loss = lambda u, w: (cucrf.jax.infer(u, image, {"appearance_weight": w}, blur=2)[0] ** 2).sum()
    >>> g_u, g_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(unary, jnp.float32(10.0))
    >>> g_u.shape, g_w.shape
    ((3, 12, 16), ())
    """
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {list(_OUTPUTS)}, got {output!r}")
    unary = jnp.asarray(unary)
    image = jnp.asarray(image)
    if not jnp.issubdtype(unary.dtype, jnp.floating):
        raise TypeError(f"unary must hold floating-point logits, got dtype {unary.dtype}; for a label map use "
                        "cucrf.unary_from_labels first")
    dtype = jnp.float64 if unary.dtype == jnp.float64 else jnp.float32
    unary = unary.astype(dtype)
    image = image.astype(dtype)
    constants, dynamic = _split_params(params)
    # Check shapes and settings now (at trace time), with JAX-level messages.
    nd = resolve_spatial_dims(check_spatial_dims(spatial_dims), unary.shape, image.shape, "logits")
    names = "H, W" if nd == 2 else "D, H, W"
    if unary.ndim not in (nd + 1, nd + 2):
        raise ValueError(f"unary must have shape (C, {names}) or (B, C, {names}), got shape {unary.shape}")
    if (image.ndim != unary.ndim or image.shape[-nd - 1:-1] != unary.shape[-nd:]
            or image.shape[:-nd - 1] != unary.shape[:-nd - 1]):
        raise ValueError(f"image must have shape {f'(B, {names}, F)' if unary.ndim == nd + 2 else f'({names}, F)'} "
                         f"matching the unary {unary.shape}, got shape {image.shape}")
    include_self = _api.check_include_self(include_self)
    config = _api.check_config(filter_size, blur, iterations, normalization, tuple(unary.shape[-nd:]),
                               keep_centre=include_self, spacing=spacing)
    spec = _Spec(constants, tuple(sorted(dynamic)), config.filter_size, config.blur, iterations, normalization, output,
                 device, include_self, nd, config.spacing)
    return _crf(spec, unary, image, dynamic)
