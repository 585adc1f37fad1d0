"""CRF parameters as the optimiser sees them: a dict of float64 arrays, and back.

Bandwidths are learned as ``log theta`` (they stay positive, and a step is a relative change);
the kernel weights and the unary weight are divided by their starting magnitude (at least 1), so
that one learning rate moves every parameter by a similar relative amount.
"""

from __future__ import annotations

import math

import numpy as np

#: Everything :func:`cucrf.fit` can learn.
LEARNABLE = ("weights", "bandwidths", "compatibility", "unary_weight", "feature_transform")
#: What :func:`cucrf.fit` learns unless told otherwise.
DEFAULT_LEARN = ("weights", "bandwidths", "compatibility", "unary_weight")

_KEYS = {
    "weights": ("appearance_weight", "smoothness_weight"),
    "bandwidths": ("log_theta_alpha", "log_theta_beta", "log_theta_gamma"),
    "compatibility": ("compatibility",),
    "unary_weight": ("unary_weight",),
    # Only the matrix: the kernels see differences of features, so the offset has no gradient
    # (Adam would turn its rounding noise into a random walk).
    "feature_transform": ("transform_matrix",),
}


class TrainingDivergedError(ValueError, FloatingPointError):
    """Training produced a non-finite loss or parameter (the learning rate is too large)."""


def initial_vector(params, num_classes, transform):
    """The parameters (and transform) as a dict of float64 arrays, in natural units."""
    vec = {
        "appearance_weight": np.array(float(params.appearance_weight)),
        "smoothness_weight": np.array(float(params.smoothness_weight)),
        "log_theta_alpha": np.array(math.log(params.theta_alpha)),
        "log_theta_beta": (np.array(math.log(params.theta_beta)) if isinstance(params.theta_beta, float)
                           else np.log(np.array(params.theta_beta, dtype=np.float64))),
        "log_theta_gamma": np.array(math.log(params.theta_gamma)),
        "compatibility": np.array(params.compatibility_matrix(num_classes), dtype=np.float64),
        "unary_weight": np.array(float(params.unary_weight)),
    }
    if transform is not None:
        vec["transform_matrix"] = np.array(transform.matrix, dtype=np.float64)
        vec["transform_offset"] = np.array(transform.offset, dtype=np.float64)
    return vec


def learned_keys(learn, vec):
    """The entries of ``vec`` that ``learn`` names, in a fixed order."""
    return [k for name in LEARNABLE if name in learn for k in _KEYS[name] if k in vec]


def scales(vec):
    """Per-entry unit of the optimiser: the starting magnitude (at least 1) of weights, 1 otherwise."""
    out = {k: 1.0 for k in vec}
    for k in ("appearance_weight", "smoothness_weight", "unary_weight"):
        out[k] = max(abs(float(vec[k])), 1.0)
    return out


def to_params(vec, base, keys):
    """CRFParams from ``vec``; whatever is not learned keeps ``base``'s exact value.

    Raises
    ------
    TrainingDivergedError
        When a learned entry is NaN or infinite, or a bandwidth left the representable range.
    """
    for k in keys:
        if not np.isfinite(vec[k]).all():
            raise TrainingDivergedError(f"parameter {k} became NaN or infinite")
    changes = {}
    if "appearance_weight" in keys:
        changes.update(appearance_weight=float(vec["appearance_weight"]),
                       smoothness_weight=float(vec["smoothness_weight"]))
    if "log_theta_alpha" in keys:
        for k in ("log_theta_alpha", "log_theta_beta", "log_theta_gamma"):
            if np.abs(vec[k]).max() > 300:
                raise TrainingDivergedError(f"{k[4:]} reached exp({float(np.max(np.abs(vec[k]))):.3g})")
        tb = np.exp(vec["log_theta_beta"])
        changes.update(theta_alpha=float(np.exp(vec["log_theta_alpha"])),
                       theta_beta=float(tb) if tb.ndim == 0 else tuple(float(v) for v in tb),
                       theta_gamma=float(np.exp(vec["log_theta_gamma"])))
    if "compatibility" in keys:
        changes.update(compatibility=vec["compatibility"])
    if "unary_weight" in keys:
        changes.update(unary_weight=float(vec["unary_weight"]))
    if not changes:
        return base
    try:
        return base.replace(**changes)
    except ValueError as exc:  # e.g. a weight stepped below zero
        raise TrainingDivergedError(f"a parameter left its valid range ({exc})") from exc


def gradient(vec, params, grads, grad_transform):
    """The gradient with respect to ``vec`` from the natural-parameter gradients of ``infer_vjp``."""
    g = {
        "appearance_weight": np.array(grads["appearance_weight"]),
        "smoothness_weight": np.array(grads["smoothness_weight"]),
        "log_theta_alpha": np.array(grads["theta_alpha"] * params.theta_alpha),
        "log_theta_beta": np.asarray(grads["theta_beta"], dtype=np.float64) * np.exp(vec["log_theta_beta"]),
        "log_theta_gamma": np.array(grads["theta_gamma"] * params.theta_gamma),
        "compatibility": np.asarray(grads["compatibility"], dtype=np.float64),
        "unary_weight": np.array(grads["unary_weight"]),
    }
    if vec["log_theta_beta"].ndim == 0:
        g["log_theta_beta"] = np.array(np.sum(g["log_theta_beta"]))
    if grad_transform is not None:
        g["transform_matrix"] = np.asarray(grad_transform["matrix"], dtype=np.float64)
        g["transform_offset"] = np.asarray(grad_transform["offset"], dtype=np.float64)
    return g
