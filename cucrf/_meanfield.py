"""Mean-field inference, written once for every backend.

A *backend* offers, for one array library ``backend.xp``, the primitives

* ``prepare(features, params, config) -> setup``: everything message passing needs that does not
  depend on ``Q`` (pooled features, kernels or normalisers), computed once per batch;
* ``full_message(setup, q, config) -> M``: the full-resolution message of :func:`message`;
* ``update(scaled_unary, msg, compat, return_logits, out)``: compatibility, unary and softmax;
* ``softmax(x)``.

:func:`prepare` and :func:`message` below are the reference versions, built from the NumPy
backend's smaller primitives; :func:`mean_field` strings a backend's primitives together.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from ._geometry import axis_geometry

#: Added to ``K(1)`` before the inverse square root of symmetric normalisation, so that a pixel
#: with no neighbour (a 1-pixel image) gets a zero message instead of NaN.
NORM_EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class CRFConfig:
    """Structural settings of one inference (everything that is not a learnable parameter)."""

    filter_size: int
    blur: int
    iterations: int
    normalization: Optional[str] = None  # None or "symmetric"
    keep_centre: bool = False


@dataclasses.dataclass
class PairwiseSetup:
    """What message passing needs, computed once per image batch.

    Attributes
    ----------
    kernels : array, shape (S, B, K, h, w)
        Pairwise kernels on the coarse grid (merged and weighted when ``S == 1``; unweighted
        appearance and smoothness when ``S == 2``).
    weights : tuple of float
        Weight applied to each of the ``S`` kernels' messages (1.0 when merged).
    normalisers : tuple of arrays of shape (B, 1, H, W), or None
        ``n_s = 1 / sqrt(K_s(1))`` per kernel for symmetric normalisation.
    size : tuple of int
        Full-resolution (H, W).
    """

    kernels: object
    weights: Tuple[float, ...]
    normalisers: Optional[tuple]
    size: Tuple[int, int]


def prepare(backend, features, params, config: CRFConfig) -> PairwiseSetup:
    """Pool the features and compute the pairwise kernels on the coarse grid.

    Parameters
    ----------
    backend : module
    features : array, shape (B, F, H, W), float32 or float64
        Per-pixel image features in image units.
    params : CRFParams
    config : CRFConfig
    """
    xp = backend.xp
    B, F, H, W = features.shape
    dt = features.dtype
    gy, gx = axis_geometry(H, config.blur), axis_geometry(W, config.blur)
    pooled = backend.pool(features, config.blur)
    wa, ws = params.appearance_weight, params.smoothness_weight
    normalized = config.normalization == "symmetric"
    kernel_weights = ((1.0, 0.0), (0.0, 1.0)) if normalized else ((wa, ws),)
    kernels = backend.pairwise_kernels(
        xp.asarray(gy.centres), xp.asarray(gx.centres), pooled,
        xp.asarray(1.0 / params.theta_beta_vector(F)),
        1.0 / params.theta_alpha ** 2, 1.0 / params.theta_gamma ** 2,
        config.filter_size, kernel_weights, config.keep_centre,
    )
    if not normalized:
        return PairwiseSetup(kernels, (1.0,), None, (H, W))
    normalisers = []
    for s in range(2):
        k_of_ones = backend.upsample(kernels[s].sum(axis=1, keepdims=True), config.blur, (H, W))
        normalisers.append((k_of_ones + dt.type(NORM_EPS)) ** dt.type(-0.5))
    return PairwiseSetup(kernels, (wa, ws), tuple(normalisers), (H, W))


def message(backend, setup: PairwiseSetup, q, config: CRFConfig):
    """Full-resolution message ``M = sum_s w_s n_s * Up(K_s(Pool(n_s * q)))``.

    Parameters
    ----------
    q : array, shape (B, C, H, W)

    Returns
    -------
    array, shape (B, C, H, W)
    """
    blur, k = config.blur, config.filter_size
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


def mean_field(backend, unary, features, params, config: CRFConfig, return_logits=False):
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

    Returns
    -------
    array, shape (B, C, H, W)
        Probabilities ``Q`` (or logits).
    """
    C = unary.shape[1]
    dt = unary.dtype
    compat = None if params.is_potts else backend.xp.asarray(params.compatibility_matrix(C), dtype=dt)
    scaled_unary = unary * dt.type(params.unary_weight)
    if config.iterations == 0:
        return scaled_unary if return_logits else backend.softmax(scaled_unary)
    setup = backend.prepare(features, params, config)
    q = backend.softmax(scaled_unary)
    for t in range(config.iterations):
        last = t == config.iterations - 1
        msg = backend.full_message(setup, q, config)
        q = backend.update(scaled_unary, msg, compat, return_logits=last and return_logits, out=msg)
    return q


def estimate_bytes(batch, classes, height, width, channels, config: CRFConfig, itemsize) -> int:
    """Upper estimate of the working memory of :func:`mean_field`, in bytes."""
    h = -(-height // config.blur)
    w = -(-width // config.blur)
    full = batch * classes * height * width
    n_kernels = 2 if config.normalization == "symmetric" else 1
    window = config.filter_size ** 2
    kernels = n_kernels * batch * window * h * w
    # unary copy, scaled unary, q, message, upsampling temporaries; padded coarse q; features.
    elements = 6 * full + 3 * batch * classes * (h + config.filter_size) * (w + config.filter_size)
    elements += kernels + 3 * batch * channels * height * width + 2 * n_kernels * batch * height * width
    return int(elements * itemsize)


__all__ = ["CRFConfig", "PairwiseSetup", "prepare", "message", "mean_field", "estimate_bytes"]
