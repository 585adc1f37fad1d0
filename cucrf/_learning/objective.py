"""What :func:`cucrf.fit` minimises, and its gradient.

The loss of a minibatch is the cross-entropy of ``softmax(L / tau)`` against the labels, where
``L`` are the CRF's output logits and ``tau = exp(log_temperature)`` is an output temperature
learned alongside the CRF parameters. The temperature changes the confidence of the output but
never its argmax, so the CRF parameters no longer have to pay for calibration (plain
cross-entropy rewards a CRF that smooths less merely because it is less confident where it is
wrong). A Gaussian prior keeps the parameters near their start, in the optimiser's units.
"""

from __future__ import annotations

import numpy as np

from .._validation import array_namespace as _namespace


def cross_entropy(logits, labels, class_weights=None, ignore_index=255):
    """Mean (weighted) cross-entropy of softmax(logits) over axis 1 and its gradient.

    Parameters
    ----------
    logits : array (B, C, H, W), float
    labels : NumPy int array (B, H, W); ``ignore_index`` pixels do not count
    class_weights : (C,) array or None
        Weighted mean as in PyTorch: ``sum_i w[y_i] (-log q_i(y_i)) / sum_i w[y_i]``.
    ignore_index : int

    Returns
    -------
    loss : float
    grad : array like ``logits``
    weight : float
        ``sum_i w[y_i]`` (the number of counted pixels without class weights); 0 when nothing counts
        (then ``loss`` is NaN and ``grad`` zero).
    """
    xp = _namespace(logits)
    dt = logits.dtype
    lab = xp.asarray(labels)
    valid = lab != ignore_index
    safe = xp.where(valid, lab, 0)
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    logp = shifted - xp.log(s)
    picked = xp.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
    if class_weights is None:
        w = valid.astype(dt)
    else:
        w = xp.asarray(class_weights, dtype=dt)[safe] * valid.astype(dt)
    total = float(w.sum(dtype=xp.float64))
    if total <= 0:
        return float("nan"), xp.zeros_like(logits), 0.0
    loss = float(-(w * picked).sum(dtype=xp.float64)) / total
    grad = e / s
    onehot = xp.zeros_like(grad)
    xp.put_along_axis(onehot, safe[:, None], 1.0, axis=1)
    grad -= onehot
    grad *= (w / dt.type(total))[:, None]
    return loss, grad, total


def tempered_cross_entropy(logits, labels, log_temperature, class_weights=None, ignore_index=255):
    """Cross-entropy of ``softmax(logits / exp(log_temperature))`` and its gradients.

    Parameters
    ----------
    logits : array (B, C, H, W), float
    labels : NumPy int array (B, H, W)
    log_temperature : float
    class_weights, ignore_index
        As for :func:`cross_entropy`.

    Returns
    -------
    loss : float
    grad_logits : array like ``logits``
    grad_log_temperature : float
    weight : float
        As for :func:`cross_entropy`.
    """
    if type(logits) is np.ndarray:  # the fused CPU path computes it in one pass where it can
        from .. import _fast

        fused = _fast.backend()
        result = None if fused is None else fused.tempered_cross_entropy(logits, labels, log_temperature,
                                                                         class_weights, ignore_index)
        if result is not None:
            return result
    tau = float(np.exp(log_temperature))
    scaled = logits / logits.dtype.type(tau)
    loss, g_scaled, weight = cross_entropy(scaled, labels, class_weights, ignore_index)
    xp = _namespace(logits)
    # d scaled / d log tau = -scaled
    g_log_tau = -float((g_scaled * scaled).sum(dtype=xp.float64))
    return loss, g_scaled / logits.dtype.type(tau), g_log_tau, weight


def balanced_class_weights(class_pixels):
    """Median-frequency class weights ``median(f) / f_c`` from labelled-pixel counts (0 for absent classes).

    Parameters
    ----------
    class_pixels : (C,) int array

    Returns
    -------
    (C,) float64 array
    """
    counts = np.asarray(class_pixels, dtype=np.float64)
    present = counts > 0
    freq = counts / counts.sum()
    weights = np.zeros_like(freq)
    weights[present] = np.median(freq[present]) / freq[present]
    return weights


def prior(z, z_start, strength):
    """``strength / 2 * sum_k ||z_k - z_start_k||^2`` and its gradient, over the keys of ``z``.

    ``z`` are the optimiser's variables (log-bandwidths, weights relative to their start, the
    compatibility matrix), so one strength suits all of them.
    """
    if strength == 0:
        return 0.0, {k: np.zeros_like(v) for k, v in z.items()}
    value = 0.0
    grad = {}
    for k, v in z.items():
        d = v - z_start[k]
        value += 0.5 * strength * float(np.sum(d * d))
        grad[k] = strength * d
    return value, grad


def _softmax(x, axis):
    xp = _namespace(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def lovasz_softmax(logits, labels, log_temperature, ignore_index=255, classes="all"):
    """Lovász-softmax loss (Berman et al., 2018) of ``softmax(logits / tau)`` and its gradient.

    The convex surrogate of the Jaccard loss ``1 - IoU``, per class over all labelled pixels of the
    minibatch, averaged over the classes. With ``classes='all'`` a class absent from the labels
    contributes its largest predicted probability, so stray pixels of absent classes cost what
    they cost the standard mIoU. The temperature is treated as a constant here (it is fitted by
    the cross-entropy).

    Parameters
    ----------
    logits : array (B, C, H, W), float
    labels : NumPy int array (B, H, W)
    log_temperature : float
    ignore_index : int
    classes : {'all', 'present'}

    Returns
    -------
    loss : float
    grad_logits : array like ``logits``
    """
    xp = _namespace(logits)
    dt = logits.dtype
    tau = float(np.exp(log_temperature))
    B, C = logits.shape[:2]
    q = _softmax(logits / dt.type(tau), axis=1)
    lab = xp.asarray(labels).reshape(-1)
    valid = lab != ignore_index
    probs = xp.moveaxis(q, 1, 0).reshape(C, -1)[:, valid]       # (C, N)
    lab = lab[valid]
    grad_probs = xp.zeros_like(probs)
    losses = []
    for c in range(C):
        fg = (lab == c).astype(dt)
        if classes == "present" and not bool(fg.any()):
            continue
        errors = xp.abs(fg - probs[c])
        order = xp.argsort(-errors)
        fg_sorted = fg[order]
        gts = fg_sorted.sum()
        intersection = gts - xp.cumsum(fg_sorted)
        union = gts + xp.cumsum(1 - fg_sorted)
        jaccard = 1 - intersection / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
        losses.append(float((errors[order] * jaccard).sum(dtype=xp.float64)))
        g = xp.empty_like(jaccard)
        g[order] = jaccard
        grad_probs[c] = g * (1 - 2 * fg)  # d|fg - p| / dp = -1 on the class, +1 elsewhere
    if not losses:
        return 0.0, xp.zeros_like(logits)
    scale = dt.type(1.0 / len(losses))
    full = xp.zeros((C, valid.shape[0]), dtype=dt)
    full[:, valid] = grad_probs * scale
    g_q = xp.moveaxis(full.reshape((C, B) + logits.shape[2:]), 0, 1)
    g_z = q * (g_q - (q * g_q).sum(axis=1, keepdims=True))
    return float(np.mean(losses)), g_z / dt.type(tau)
