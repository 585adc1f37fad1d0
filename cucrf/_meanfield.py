"""Mean-field inference and its gradient, written once for every backend.

A *backend* offers, for one array library ``backend.xp``, the primitives

* ``prepare(features, params, config) -> setup``: everything message passing needs that does not
  depend on ``Q`` (pooled features, kernels or normalisers), computed once per batch;
* ``full_message(setup, q, config) -> M``: the full-resolution message of :func:`message`;
* ``update(scaled_unary, msg, compat, return_logits, out, transient)``: compatibility, unary and
  softmax (``out=None`` must allocate a new array: training keeps every message);
* ``softmax(x, transient)``.

``transient`` marks a ``Q`` that only feeds the next message and, with a tape, the backward pass:
a backend may return an object of its own for it, which it then gets back in ``full_message``,
``softmax_backward`` and ``full_message_backward``.

and, for learning (reverse mode, see :func:`mean_field_backward`),

* ``softmax_backward(q, grad, into) -> grad_logits``: vjp of the softmax over axis 1, given its
  output; also added to ``into`` when that is an array (the unary's gradient, summed over the
  iterations); the result of the last call, at the first ``Q``, is not read (only ``into``);
* ``compatibility_backward(grad_logits, msg, compat) -> (grad_msg, grad_compat)``: vjp of
  ``logits = a U - mu M``; ``grad_compat`` is a (C, C) float64 array (NumPy, or of the backend's
  array library: it is converted once, after the last iteration), the gradient with respect to
  the full matrix (also for Potts, ``compat`` None, where it is evaluated at 1 - I); ``grad_msg``
  may be a lazy object the backend's own ``full_message_backward`` understands;
* ``full_message_backward(setup, q, grad_msg, config, grads) -> grad_q``: vjp of
  ``full_message`` with respect to ``q``; what the parameter gradient needs is recorded in
  ``grads`` (a :class:`MessageGradients`); ``grad_q`` may be a lazy object the backend's own
  ``softmax_backward`` understands (it is only ever passed there);
* ``prepare_backward(setup, features, params, config, grads) -> (grad_features, dict)``: turns
  what ``grads`` collected over all iterations into the gradient with respect to the features
  (B, F, H, W) and to ``theta_alpha``, ``theta_beta`` (an (F,) float64 array), ``theta_gamma``,
  ``appearance_weight`` and ``smoothness_weight``.

:func:`prepare`, :func:`message`, :func:`message_backward` and :func:`prepare_backward` below are
the reference versions, built from the NumPy backend's smaller primitives (``pool``,
``upsample``, ``pairwise_kernels``, ``message`` and their ``*_backward`` / ``message_transpose``);
:func:`mean_field` strings a backend's primitives together, for inference and, with a
:class:`Tape`, for training; :func:`mean_field_backward` replays the taped iterations in reverse.

Training memory is O(T B C H W) on the NumPy and CUDA backends: the tape keeps each iteration's
input ``Q`` and message ``M`` and the backward pass the pooled message inputs and the pooled
message gradients (on the coarse grid); the (S, B, K, h, w) kernel stack of the forward pass is
the only window-sized array. The fused CPU backend keeps, with one merged kernel, only coarse
arrays per iteration (each ``Q`` pooled, each message on the coarse grid) and makes each ``Q``
again inside the softmax's vjp.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

from ._geometry import axis_geometry, per_axis

#: Added to ``K(1)`` before the inverse square root of symmetric normalisation, so that a pixel
#: with no neighbour (a 1-pixel image) gets a zero message instead of NaN.
NORM_EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class CRFConfig:
    """Structural settings of one inference (everything that is not a learnable parameter)."""

    filter_size: object  # odd int (every spatial axis) or a tuple with one per axis
    blur: object  # int or a tuple with one per axis
    iterations: int
    normalization: Optional[str] = None  # None or "symmetric"
    keep_centre: bool = False
    spacing: Optional[tuple] = None  # distance between neighbouring pixels per axis; None: 1

    def filter_sizes(self, ndim: int) -> tuple:
        """One window width per spatial axis."""
        return per_axis(self.filter_size, ndim)

    def blurs(self, ndim: int) -> tuple:
        """One blur factor per spatial axis."""
        return per_axis(self.blur, ndim)

    def spacings(self, ndim: int) -> tuple:
        """One pixel spacing per spatial axis (1.0 when none is set)."""
        return per_axis(1.0 if self.spacing is None else self.spacing, ndim)

    @property
    def plain(self) -> bool:
        """Isotropic 2-D settings (int window and blur, unit spacing): what every backend runs."""
        return (isinstance(self.filter_size, int) and isinstance(self.blur, int)
                and (self.spacing is None or all(float(v) == 1.0 for v in self.spacing)))


def cell_positions(size, config: CRFConfig):
    """Per-axis coordinates of the coarse cells (mean pixel index times the spacing), float64."""
    nd = len(size)
    return [axis_geometry(n, b).centres * float(sp)
            for n, b, sp in zip(size, config.blurs(nd), config.spacings(nd))]


def coarse_shape(size, config: CRFConfig) -> tuple:
    """Shape of the coarse grid of a full-resolution ``size`` (one entry per spatial axis)."""
    return tuple(axis_geometry(n, b).coarse for n, b in zip(size, config.blurs(len(size))))


@dataclasses.dataclass
class PairwiseSetup:
    """What message passing needs, computed once per image batch.

    Attributes
    ----------
    kernels : array, shape (S, B, K, *coarse)
        Pairwise kernels on the coarse grid (merged and weighted when ``S == 1``; unweighted
        appearance and smoothness when ``S == 2``).
    weights : tuple of float
        Weight applied to each of the ``S`` kernels' messages (1.0 when merged).
    normalisers : tuple of arrays of shape (B, 1, *spatial), or None
        ``n_s = 1 / sqrt(K_s(1))`` per kernel for symmetric normalisation.
    size : tuple of int
        Full-resolution spatial shape: (H, W), or (D, H, W) for volumes.
    pooled : array, shape (B, F, *coarse)
        The pooled features the kernels were made of (the backward pass reads them again).
    """

    kernels: object
    weights: Tuple[float, ...]
    normalisers: Optional[tuple]
    size: Tuple[int, int]
    pooled: object


def prepare(backend, features, params, config: CRFConfig) -> PairwiseSetup:
    """Pool the features and compute the pairwise kernels on the coarse grid.

    Parameters
    ----------
    backend : module
    features : array, shape (B, F, *spatial), float32 or float64
        Per-pixel image features in image units.
    params : CRFParams
    config : CRFConfig
    """
    xp = backend.xp
    F = features.shape[1]
    size = tuple(features.shape[2:])
    nd = len(size)
    dt = features.dtype
    blurs = config.blurs(nd)
    pooled = backend.pool(features, blurs)
    wa, ws = params.appearance_weight, params.smoothness_weight
    normalized = config.normalization == "symmetric"
    kernel_weights = ((1.0, 0.0), (0.0, 1.0)) if normalized else ((wa, ws),)
    kernels = backend.pairwise_kernels(
        [xp.asarray(p) for p in cell_positions(size, config)], pooled,
        xp.asarray(1.0 / params.theta_beta_vector(F)),
        1.0 / params.theta_alpha ** 2, 1.0 / params.theta_gamma ** 2,
        config.filter_sizes(nd), kernel_weights, config.keep_centre,
    )
    if not normalized:
        return PairwiseSetup(kernels, (1.0,), None, size, pooled)
    normalisers = []
    for s in range(2):
        k_of_ones = backend.upsample(kernels[s].sum(axis=1, keepdims=True), blurs, size)
        normalisers.append((k_of_ones + dt.type(NORM_EPS)) ** dt.type(-0.5))
    return PairwiseSetup(kernels, (wa, ws), tuple(normalisers), size, pooled)


def message(backend, setup: PairwiseSetup, q, config: CRFConfig):
    """Full-resolution message ``M = sum_s w_s n_s * Up(K_s(Pool(n_s * q)))``.

    Parameters
    ----------
    q : array, shape (B, C, *spatial)

    Returns
    -------
    array, shape (B, C, *spatial)
    """
    nd = q.ndim - 2
    blur, k = config.blurs(nd), config.filter_sizes(nd)
    out = None
    for s, weight in enumerate(setup.weights):
        if weight == 0:
            continue
        n = setup.normalisers[s] if setup.normalisers is not None else None
        src = q if n is None else q * n
        m = backend.upsample(
            backend.message(setup.kernels[s], backend.pool(src, blur), k, config.keep_centre),
            blur, setup.size,
        )
        if n is not None:
            m *= n * q.dtype.type(weight)
        if out is None:
            out = m
        else:
            out += m
    if out is None:
        out = backend.xp.zeros_like(q)
    return out


@dataclasses.dataclass
class Tape:
    """The record of one :func:`mean_field` call that :func:`mean_field_backward` replays.

    Pass ``Tape()`` as ``mean_field(..., tape=)``; the call fills it.

    Attributes
    ----------
    qs : list of arrays (B, C, H, W)
        The input ``Q`` of every iteration (``qs[0] = softmax(a U)``).
    msgs : list
        The message ``M`` of every iteration, as ``backend.full_message`` returned it (an array
        (B, C, H, W) for NumPy; a backend with a lazy message object gets it back in its own
        ``compatibility_backward``).
    output : array
        What :func:`mean_field` returned.
    """

    unary: object = None
    features: object = None
    params: object = None
    config: Optional[CRFConfig] = None
    return_logits: bool = False
    compat: object = None
    setup: Optional[PairwiseSetup] = None
    qs: list = dataclasses.field(default_factory=list)
    msgs: list = dataclasses.field(default_factory=list)
    output: object = None


#: What a backend needs besides the inference interface to compute gradients.
BACKWARD_METHODS = ("softmax_backward", "compatibility_backward", "full_message_backward", "prepare_backward",
                    "sum_products")


def check_backward_support(backend):
    """Raise NotImplementedError when ``backend`` lacks one of :data:`BACKWARD_METHODS`."""
    missing = [m for m in BACKWARD_METHODS if not hasattr(backend, m)]
    if missing:
        raise NotImplementedError(
            f"the {getattr(backend, 'name', 'this')} backend has no backward pass yet (missing "
            f"{', '.join(missing)}); compute gradients on the CPU with device='cpu'"
        )


class MessageGradients:
    """What the backward passes of the messages collect for the kernel gradient.

    For kernel ``s``: ``left[s]`` the gradients of the coarse messages (before the weight),
    ``right[s]`` the coarse message inputs, one per iteration (stacked on the class axis at the
    end), and ``normalisers[s]`` the gradient with respect to ``n_s`` (B, 1, H, W), or None.
    """

    def __init__(self, num_kernels):
        self.left = [[] for _ in range(num_kernels)]
        self.right = [[] for _ in range(num_kernels)]
        self.normalisers = [None] * num_kernels

    def add_normaliser(self, s, grad):
        self.normalisers[s] = grad if self.normalisers[s] is None else self.normalisers[s] + grad


def mean_field(backend, unary, features, params, config: CRFConfig, return_logits=False, tape=None):
    """Run ``config.iterations`` mean-field updates.

    Parameters
    ----------
    backend : module
    unary : array, shape (B, C, H, W), float32 or float64
        Class scores ``U`` (logits).
    features : array, shape (B, F, H, W), same dtype
    params : CRFParams
    config : CRFConfig
    return_logits : bool
        Return ``a * U - Phi`` of the last iteration instead of its softmax.
    tape : Tape, optional
        Record what :func:`mean_field_backward` needs (every iteration's ``Q`` and ``M``).

    Returns
    -------
    array, shape (B, C, H, W)
        Probabilities ``Q`` (or logits).
    """
    C = unary.shape[1]
    dt = unary.dtype
    compat = None if params.is_potts else backend.xp.asarray(params.compatibility_matrix(C), dtype=dt)
    # Never written to: with a unary weight of 1 the unary itself serves (a whole array less).
    scaled_unary = unary if params.unary_weight == 1 else unary * dt.type(params.unary_weight)
    if tape is not None:
        tape.unary, tape.features, tape.params, tape.config = unary, features, params, config
        tape.return_logits, tape.compat = return_logits, compat
    if config.iterations == 0:
        if return_logits:
            q = scaled_unary.copy() if scaled_unary is unary else scaled_unary
        else:
            q = backend.softmax(scaled_unary)
        if tape is not None:
            tape.output = q
        return q
    setup = backend.prepare(features, params, config)
    # Every Q but the last only feeds the next message (and, taped, the backward pass, which
    # hands it back to this backend): ``transient`` lets a backend keep just what those need
    # (the fused CPU path: Q pooled, never written; its backward pass makes it again).
    q = backend.softmax(scaled_unary, transient=True)
    if tape is not None:
        tape.setup = setup
    for t in range(config.iterations):
        last = t == config.iterations - 1
        if tape is not None:
            tape.qs.append(q)
        msg = backend.full_message(setup, q, config)
        if tape is not None:
            tape.msgs.append(msg)
        q = backend.update(scaled_unary, msg, compat, return_logits=last and return_logits,
                           out=None if tape is not None else msg, transient=not last)
    if tape is not None:
        tape.output = q
    return q


def mean_field_backward(backend, tape: Tape, grad_output):
    """Reverse-mode gradient of a taped :func:`mean_field` call.

    Parameters
    ----------
    backend : module
    tape : Tape
        Filled by ``mean_field(..., tape=tape)``.
    grad_output : array, shape (B, C, H, W)
        Gradient of the loss with respect to what :func:`mean_field` returned.

    Returns
    -------
    grad_unary : array (B, C, H, W)
    grad_features : array (B, F, H, W)
    grads : dict
        Gradients with respect to ``theta_alpha``, ``theta_gamma``, ``appearance_weight``,
        ``smoothness_weight`` and ``unary_weight`` (floats), ``theta_beta`` ((F,) float64) and
        ``compatibility`` ((C, C) float64; for Potts the gradient of the full matrix at 1 - I).
    """
    check_backward_support(backend)
    xp = backend.xp
    config, params = tape.config, tape.params
    unary, features = tape.unary, tape.features
    dt = unary.dtype
    C = unary.shape[1]
    g = grad_output.astype(dt, copy=False)
    grad_compat = None
    if config.iterations == 0:
        grad_scaled = g if tape.return_logits else backend.softmax_backward(tape.output, g)
        grad_features = xp.zeros_like(features)
        kernel_grads = {"theta_alpha": 0.0, "theta_beta": np.zeros(features.shape[1]), "theta_gamma": 0.0,
                        "appearance_weight": 0.0, "smoothness_weight": 0.0}
    else:
        setup = tape.setup
        collected = MessageGradients(len(setup.weights))
        grad_scaled = None
        T = config.iterations
        for t in reversed(range(T)):
            # grad_scaled sums every iteration's grad_logits, added in place by the softmax's vjp.
            # The first is that sum itself: each grad_logits is used up within its iteration.
            if t == T - 1 and tape.return_logits:
                grad_logits, grad_scaled = g, g.copy()  # (g may be the caller's grad_output)
            else:
                q = tape.output if t == T - 1 else tape.qs[t + 1]
                if grad_scaled is None:
                    grad_logits = grad_scaled = backend.softmax_backward(q, g)
                else:
                    grad_logits = backend.softmax_backward(q, g, into=grad_scaled)
            grad_msg, gc = backend.compatibility_backward(grad_logits, tape.msgs[t], tape.compat)
            grad_compat = gc if grad_compat is None else grad_compat + gc
            g = backend.full_message_backward(setup, tape.qs[t], grad_msg, config, collected)
        # the last addition into grad_scaled: it is final from here on (a backend may say so)
        backend.softmax_backward(tape.qs[0], g, into=grad_scaled)
        grad_features, kernel_grads = backend.prepare_backward(setup, features, params, config, collected)
    if grad_compat is None:
        grad_compat = np.zeros((C, C))
    else:  # summed where the backend computed it; a device array is fetched once, at the end
        grad_compat = np.asarray(grad_compat.get() if hasattr(grad_compat, "get") else grad_compat,
                                 dtype=np.float64)
    grads = dict(kernel_grads)
    grads["compatibility"] = grad_compat
    grads["unary_weight"] = backend.sum_products(grad_scaled, unary)
    # After iterations grad_scaled is this function's own array: with a unary weight of 1 it is the
    # gradient itself (without iterations it may be grad_output, which is never handed back).
    own = config.iterations > 0
    grad_unary = grad_scaled if own and params.unary_weight == 1 else grad_scaled * dt.type(params.unary_weight)
    return grad_unary, grad_features, grads


def message_backward(backend, setup: PairwiseSetup, q, grad_msg, config: CRFConfig, grads: MessageGradients):
    """Reference vjp of :func:`message` with respect to ``q``; records kernel gradients in ``grads``.

    With ``P_s = Pool(n_s q)`` and ``G_s = Up^T(n_s grad_msg)`` (coarse), the gradient is
    ``sum_s n_s Pool^T(K_s^T (w_s G_s))`` (``K_s^T = K_s``: the kernels are symmetric); ``G_s`` and
    ``P_s`` are recorded for the kernel gradient, and for symmetric normalisation the gradient
    with respect to ``n_s``: ``w_s sum_c grad_msg Up(K_s P_s) + sum_c q Pool^T(K_s w_s G_s)``.
    """
    nd = q.ndim - 2
    blur, k, keep = config.blurs(nd), config.filter_sizes(nd), config.keep_centre
    dt = q.dtype
    coarse = tuple(setup.kernels.shape[-nd:])
    grad_q = None
    for s, weight in enumerate(setup.weights):
        n = setup.normalisers[s] if setup.normalisers is not None else None
        src = q if n is None else q * n
        pooled = backend.pool(src, blur)
        g_coarse = backend.upsample_backward(grad_msg if n is None else grad_msg * n, blur, coarse)
        grads.left[s].append(g_coarse)
        grads.right[s].append(pooled)
        if weight == 0:
            continue
        g_src = backend.pool_backward(
            backend.message_transpose(setup.kernels[s], g_coarse * dt.type(weight), k, keep), blur, setup.size)
        if n is not None:
            m = backend.upsample(backend.message(setup.kernels[s], pooled, k, keep), blur, setup.size)
            m *= grad_msg
            g_n = m.sum(axis=1, keepdims=True) * dt.type(weight) + (q * g_src).sum(axis=1, keepdims=True)
            grads.add_normaliser(s, g_n)
            g_src = g_src * n
        grad_q = g_src if grad_q is None else grad_q + g_src
    return backend.xp.zeros_like(q) if grad_q is None else grad_q


def prepare_backward(backend, setup: PairwiseSetup, features, params, config: CRFConfig, grads: MessageGradients):
    """Reference gradient of :func:`prepare` from what :func:`message_backward` collected.

    The kernel gradient ``dL/dK_s[o, i] = w_s sum_t sum_c G_s,t[c, i] P_s,t[c, i + o] + r_s[i]``
    (``r_s`` from the normalisers, ``n = (K(1) + eps)^-1/2`` so ``dn/dK(1) = -n^3 / 2``) is
    formed one offset at a time by ``backend.pairwise_kernels_backward``, then pushed through
    the pooling of the features. Returns ``(grad_features, dict)``.
    """
    xp = backend.xp
    F = features.shape[1]
    size = tuple(features.shape[2:])
    nd = len(size)
    dt = features.dtype
    blur = config.blurs(nd)
    coarse = coarse_shape(size, config)
    pooled = setup.pooled  # the features pooled by prepare
    normalized = config.normalization == "symmetric"
    wa, ws = params.appearance_weight, params.smoothness_weight
    kernel_weights = ((1.0, 0.0), (0.0, 1.0)) if normalized else ((wa, ws),)
    S = len(kernel_weights)
    # per kernel, every iteration's arrays (stacked on the class axis by the backend, if at all)
    left = [list(grads.left[s]) if grads.left[s] else None for s in range(S)]
    right = [list(grads.right[s]) if grads.right[s] else None for s in range(S)]
    rows = None
    if normalized:
        rows = []
        for s in range(S):
            gn = grads.normalisers[s]
            if gn is None:
                rows.append(None)
                continue
            n = setup.normalisers[s]
            rows.append(backend.upsample_backward(gn * (n * n * n) * dt.type(-0.5), blur, coarse))
    theta_beta = params.theta_beta_vector(F)
    out = backend.pairwise_kernels_backward(
        [xp.asarray(p) for p in cell_positions(size, config)], pooled, xp.asarray(1.0 / theta_beta),
        1.0 / params.theta_alpha ** 2, 1.0 / params.theta_gamma ** 2,
        config.filter_sizes(nd), kernel_weights, config.keep_centre, left, right, setup.weights, rows,
    )
    grad_features = backend.pool_backward(out["features"], blur, size)
    g_ib = np.asarray(out["inv_theta_beta"].get() if hasattr(out["inv_theta_beta"], "get") else out["inv_theta_beta"],
                      dtype=np.float64)
    result = {
        "theta_alpha": float(out["inv_theta_alpha2"]) * -2.0 / params.theta_alpha ** 3,
        "theta_beta": g_ib * -1.0 / theta_beta ** 2,
        "theta_gamma": float(out["inv_theta_gamma2"]) * -2.0 / params.theta_gamma ** 3,
    }
    if normalized:
        result["appearance_weight"], result["smoothness_weight"] = (float(v) for v in out["pair_dot"])
    else:
        result["appearance_weight"], result["smoothness_weight"] = (float(v) for v in out["weights"][0])
    return grad_features, result


def estimate_bytes(batch, classes, size, channels, config: CRFConfig, itemsize, stored_kernels=True) -> int:
    """Upper estimate of the working memory of :func:`mean_field`, in bytes.

    ``size`` is the full-resolution spatial shape ((H, W) or (D, H, W)). ``stored_kernels`` is
    False for a backend that computes kernel values on the fly (CUDA) instead of keeping the
    (S, B, K, *coarse) kernel stack.
    """
    size = tuple(int(n) for n in size)
    nd = len(size)
    coarse = coarse_shape(size, config)
    sizes = config.filter_sizes(nd)
    pixels = int(np.prod(size))
    full = batch * classes * pixels
    n_kernels = 2 if config.normalization == "symmetric" else 1
    # K entries per cell with the centre (include_self), K - 1 without: the full window covers both.
    window = int(np.prod(sizes))
    cells = int(np.prod(coarse))
    kernels = n_kernels * batch * window * cells if stored_kernels else 0
    padded = int(np.prod([n + k for n, k in zip(coarse, sizes)]))
    # unary copy, scaled unary, q, message, upsampling temporaries; padded coarse q; features.
    elements = 6 * full + 3 * batch * classes * padded
    elements += kernels + 3 * batch * channels * pixels + 2 * n_kernels * batch * pixels
    return int(elements * itemsize)


__all__ = [
    "CRFConfig", "PairwiseSetup", "Tape", "MessageGradients", "prepare", "message", "mean_field",
    "mean_field_backward", "message_backward", "prepare_backward", "estimate_bytes", "BACKWARD_METHODS",
    "check_backward_support",
]
