"""NumPy implementation of the hot primitives of mean-field inference.

This module is the specification the CUDA kernels are tested against. Every function works on
whole batches and is vectorised over pixels and classes; the only Python loops run over the
window offsets and the spatial axes.

Array layout: class maps are ``(B, C, *spatial)``, feature maps ``(B, F, *spatial)``, with two
spatial axes (H, W) for images and three (D, H, W) for volumes; a stack of pairwise kernels on
the (coarse) grid is ``(S, B, K, *coarse)`` with ``S`` kernels (1 merged, or 2 when each kernel
is normalised on its own), ``K`` window offsets and ``[.., o, i]`` the kernel value between cell
``i`` and cell ``i + offset_o`` (0 where that cell is outside the grid).
"""

from __future__ import annotations

import numpy as np

from . import _parallel
from ._geometry import axis_geometry, window_offsets

xp = np
name = "numpy"


def _valid(n, d):
    """Slices (centre, neighbour) of an axis of ``n`` cells for offset ``d``."""
    return slice(max(0, -d), min(n, n - d)), slice(max(0, d), min(n, n + d))


# ---------------------------------------------------------------------------------------------
# blur: average pooling and bilinear upsampling
# ---------------------------------------------------------------------------------------------
def _axis_index(ndim, axis, index):
    """Index tuple selecting ``index`` along ``axis`` (negative) of an ``ndim``-d array."""
    key = [slice(None)] * ndim
    key[axis] = index
    return tuple(key)


def _pool_phases(g):
    """Pairs ``(cells, pixels)`` of slices, one per position j inside a cell: ``pixels`` are the
    real pixels at position j of their cell, ``cells`` the cells they belong to, in order."""
    for j in range(g.blur):
        first_pixel = j - g.pad
        first_cell = 0 if first_pixel >= 0 else 1
        first_pixel += first_cell * g.blur
        if first_pixel >= g.size:
            continue
        n = len(range(first_pixel, g.size, g.blur))
        yield slice(first_cell, first_cell + n), slice(first_pixel, g.size, g.blur)


def _upsample_phases(g):
    """Triples ``(pixels, lo, frac)``, one per phase of the bilinear upsampling: the pixels of the
    phase read cells ``lo`` and ``lo + 1`` of the edge-extended coarse axis (one repeated cell
    at each end) with weights ``1 - frac`` and ``frac``."""
    b = g.blur
    for phase in range(b):
        # Padded output o = q * b + phase reads source coordinate q + delta.
        delta = (phase + 0.5) / b - 0.5
        shift, frac = (0, 1.0 + delta) if delta < 0 else (1, delta)
        first = (phase - g.pad) % b
        if first >= g.size:
            continue
        n = len(range(first, g.size, b))
        q0 = (first + g.pad) // b + shift
        yield slice(first, g.size, b), slice(q0, q0 + n), frac


def _pool_axis(x, g, axis):
    """Sum ``x`` along ``axis`` over the cells of geometry ``g`` (real pixels only)."""
    shape = list(x.shape)
    shape[axis] = g.coarse
    out = np.zeros(shape, dtype=x.dtype)
    # One strided slice per position inside a cell: much faster than a reduction over a short
    # reshaped axis, and it needs no padded copy.
    for cells, pixels in _pool_phases(g):
        out[_axis_index(x.ndim, axis, cells)] += x[_axis_index(x.ndim, axis, pixels)]
    return out


def _axes(blur, size=None):
    """Per-axis blur factors of the spatial (last) axes: a tuple as given; an int for the axes
    of ``size`` (or for 2 axes)."""
    if isinstance(blur, tuple):
        return blur
    return (int(blur),) * (2 if size is None else len(size))


def _inverse_counts(geometries, dtype):
    """``1 / (number of real pixels)`` of every cell, shape (coarse sizes...)."""
    counts = np.ones(())
    for g in geometries:
        counts = np.multiply.outer(counts, g.counts)
    return (1.0 / counts).astype(dtype)


def pool(x, blur):
    """Average-pool the spatial (last) axes in cells of ``blur`` pixels per axis (real pixels only).

    Parameters
    ----------
    x : ndarray, shape (..., *spatial)
    blur : int or tuple of int
        An int pools the last two axes ``blur`` x ``blur``; a tuple pools the last ``len(blur)``
        axes, one factor per axis.

    Returns
    -------
    ndarray, shape (..., ceil(n_a / blur_a) for each spatial axis a), dtype of ``x``
    """
    blurs = _axes(blur)
    nd = len(blurs)
    if all(b == 1 for b in blurs):
        return x
    spatial = x.shape[-nd:]
    geometries = [axis_geometry(n, b) for n, b in zip(spatial, blurs)]
    inv_counts = _inverse_counts(geometries, x.dtype)
    lead = x.shape[:-nd]
    flat = x.reshape((-1,) + spatial)
    out = np.empty((flat.shape[0],) + inv_counts.shape, dtype=x.dtype)

    def work(start, stop):
        # Outer axes first: whole contiguous rows are added; the last pass sees 1/blur of the data.
        sums = flat[start:stop]
        for a, g in enumerate(geometries):
            if g.blur > 1:
                sums = _pool_axis(sums, g, a - nd)
        np.multiply(sums, inv_counts, out=out[start:stop])

    _parallel.for_chunks(flat.shape[0], work, x.size)
    return out.reshape(lead + out.shape[1:])


def _pool_axis_backward(grad, g, axis):
    """Transpose of :func:`_pool_axis`: copy each cell's value to the real pixels it covers."""
    shape = list(grad.shape)
    shape[axis] = g.size
    out = np.empty(shape, dtype=grad.dtype)
    for cells, pixels in _pool_phases(g):
        out[_axis_index(grad.ndim, axis, pixels)] = grad[_axis_index(grad.ndim, axis, cells)]
    return out


def pool_backward(grad, blur, size):
    """Vector-Jacobian product of :func:`pool`: ``grad`` (..., *coarse) to (..., *size)."""
    blurs = _axes(blur, size)
    if all(b == 1 for b in blurs):
        return grad
    nd = len(blurs)
    geometries = [axis_geometry(n, b) for n, b in zip(size, blurs)]
    out = grad * _inverse_counts(geometries, grad.dtype)
    for a, g in enumerate(geometries):
        if g.blur > 1:
            out = _pool_axis_backward(out, g, a - nd)
    return out


def _upsample_axis(x, g, axis, out=None):
    """Bilinear upsampling of ``x`` along ``axis`` from ``g.coarse`` cells to ``g.size`` pixels."""
    nd = x.ndim
    # Repeat the edge cells once on each side: the clamping at the borders then becomes an
    # ordinary interpolation between two equal values, and every phase is a plain slice.
    edged = np.concatenate([x[_axis_index(nd, axis, slice(0, 1))], x,
                            x[_axis_index(nd, axis, slice(-1, None))]], axis=axis)
    shape = list(x.shape)
    shape[axis] = g.size
    if out is None:
        out = np.empty(shape, dtype=x.dtype)
    for pixels, lo_cells, frac in _upsample_phases(g):
        lo = edged[_axis_index(nd, axis, lo_cells)]
        hi = edged[_axis_index(nd, axis, slice(lo_cells.start + 1, lo_cells.stop + 1))]
        view = out[_axis_index(nd, axis, pixels)]
        np.subtract(hi, lo, out=view)
        view *= x.dtype.type(frac)
        view += lo
    return out


def upsample(x, blur, size):
    """Bilinearly upsample the spatial (last ``len(size)``) axes by ``blur`` and crop to ``size``.

    Parameters
    ----------
    x : ndarray, shape (..., *coarse)
    blur : int or tuple of int
        One factor for every axis, or one per axis.
    size : tuple of int
        Full-resolution spatial shape, e.g. (H, W) or (D, H, W).

    Returns
    -------
    ndarray, shape (..., *size), dtype of ``x``
    """
    blurs = _axes(blur, size)
    if all(b == 1 for b in blurs):
        return x
    nd = len(size)
    geometries = [axis_geometry(n, b) for n, b in zip(size, blurs)]
    lead = x.shape[:-nd]
    flat = x.reshape((-1,) + x.shape[-nd:])
    out = np.empty((flat.shape[0],) + tuple(size), dtype=x.dtype)
    # Last axis first, on the coarse grid; the pass over the first axis writes whole contiguous
    # blocks straight into the output.
    passes = [(a - nd, g) for a, g in enumerate(geometries) if g.blur > 1][::-1]

    def work(start, stop):
        y = flat[start:stop]
        for i, (axis, g) in enumerate(passes):
            last = i == len(passes) - 1
            y = _upsample_axis(y, g, axis, out=out[start:stop] if last else None)
        if not passes:
            out[start:stop] = y

    _parallel.for_chunks(flat.shape[0], work, out.size)
    return out.reshape(lead + tuple(size))


def _upsample_axis_backward(grad, g, axis):
    """Transpose of :func:`_upsample_axis`: ``grad`` (.., g.size, ..) to (.., g.coarse, ..)."""
    nd = grad.ndim
    shape = list(grad.shape)
    shape[axis] = g.coarse + 2
    edged = np.zeros(shape, dtype=grad.dtype)
    for pixels, lo_cells, frac in _upsample_phases(g):
        view = grad[_axis_index(nd, axis, pixels)]
        edged[_axis_index(nd, axis, lo_cells)] += view * grad.dtype.type(1.0 - frac)
        edged[_axis_index(nd, axis, slice(lo_cells.start + 1, lo_cells.stop + 1))] += view * grad.dtype.type(frac)
    out = np.ascontiguousarray(edged[_axis_index(nd, axis, slice(1, g.coarse + 1))])
    # The repeated edge cells of the forward fold back onto the first and last cell.
    out[_axis_index(nd, axis, slice(0, 1))] += edged[_axis_index(nd, axis, slice(0, 1))]
    out[_axis_index(nd, axis, slice(g.coarse - 1, g.coarse))] += edged[_axis_index(nd, axis, slice(-1, None))]
    return out


def upsample_backward(grad, blur, coarse_size):
    """Vector-Jacobian product of :func:`upsample`: ``grad`` (..., *size) to (..., *coarse_size).

    The exact transpose of the separable, phase-sliced forward (no dense matrices).
    """
    nd = len(coarse_size)
    blurs = _axes(blur, coarse_size)
    if all(b == 1 for b in blurs):
        return grad
    size = grad.shape[-nd:]
    geometries = [axis_geometry(n, b) for n, b in zip(size, blurs)]
    if tuple(g.coarse for g in geometries) != tuple(coarse_size):
        raise ValueError(f"upsample_backward: a {'x'.join(map(str, size))} gradient at blur {blur} comes from a "
                         f"{'x'.join(str(g.coarse) for g in geometries)} grid, not {tuple(coarse_size)}")
    out = grad
    for a, g in reversed(list(enumerate(geometries))):  # the forward's passes in reverse
        if g.blur > 1:
            out = _upsample_axis_backward(out, g, a - nd)
    return out


# ---------------------------------------------------------------------------------------------
# pairwise kernels and message passing on the (coarse) grid
# ---------------------------------------------------------------------------------------------
def _offset_kernels(positions, scaled, inv_theta_alpha2, inv_theta_gamma2, offsets):
    """Kernel values of each window offset on the cells where the neighbour is inside the grid.

    Yields ``(o, centre, neighbour, d2, appearance, spatial_s)``: the centre and neighbour index
    tuples (one slice per spatial axis), squared distances (n'...) in position units, the
    unweighted appearance kernel (B, n'...) and smoothness kernel (n'...). ``scaled`` is the
    features (B, F, n...) times ``1 / theta_beta``; ``positions`` one coordinate array per axis.
    """
    nd = len(positions)
    spatial = scaled.shape[-nd:]
    dt = scaled.dtype
    pos = [np.asarray(p, dtype=np.float64) for p in positions]
    whole = (slice(None), slice(None))
    for o, offset in enumerate(offsets):
        centre, neighbour = zip(*(_valid(n, d) for n, d in zip(spatial, offset)))
        if any(c.start >= c.stop for c in centre):
            continue
        d2 = 0.0
        for a in range(nd):
            shape = [1] * nd
            shape[a] = -1
            d2 = d2 + ((pos[a][neighbour[a]] - pos[a][centre[a]]) ** 2).reshape(shape)
        spatial_a = (d2 * inv_theta_alpha2).astype(dt)
        spatial_s = np.exp(-0.5 * d2 * inv_theta_gamma2).astype(dt)
        diff = scaled[whole + neighbour] - scaled[whole + centre]
        colour = np.einsum("bf...,bf...->b...", diff, diff)
        appearance = np.exp(-0.5 * (colour + spatial_a))
        yield o, centre, neighbour, d2, appearance, spatial_s


def _window(filter_size, nd):
    """Per-axis window widths: an int is the same width on every one of the ``nd`` axes."""
    return filter_size if isinstance(filter_size, tuple) else (int(filter_size),) * nd


def pairwise_kernels(positions, features, inv_theta_beta, inv_theta_alpha2, inv_theta_gamma2,
                     filter_size, weights, keep_centre=False):
    """Kernel values between every cell and every other cell of its window.

    Parameters
    ----------
    positions : sequence of ndarray of float, one per spatial axis, shape (n_a,)
        Coordinate of each cell along each axis (full-resolution pixels times the spacing).
    features : ndarray, shape (B, F, *spatial)
        Image features of each cell, in image units.
    inv_theta_beta : ndarray, shape (F,)
        ``1 / theta_beta`` per channel.
    inv_theta_alpha2, inv_theta_gamma2 : float
        ``1 / theta_alpha**2`` and ``1 / theta_gamma**2``.
    filter_size : int or tuple of int
        Odd window width ``k`` (every axis) or one odd width per axis.
    weights : sequence of (float, float)
        One ``(appearance, smoothness)`` weight pair per output kernel: ``((wa, ws),)`` merges the
        two kernels into one; ``((1, 0), (0, 1))`` keeps them apart.
    keep_centre : bool
        Include the centre of the window (the cell itself).

    Returns
    -------
    ndarray, shape (S, B, K, *spatial), dtype of ``features``
        ``K`` window offsets in the order of :func:`cucrf._geometry.window_offsets`.
    """
    B, F = features.shape[:2]
    spatial = features.shape[2:]
    dt = features.dtype
    offsets = window_offsets(_window(filter_size, len(spatial)), keep_centre)
    scaled = features * inv_theta_beta.astype(dt).reshape((1, F) + (1,) * len(spatial))
    out = np.zeros((len(weights), B, len(offsets)) + spatial, dtype=dt)
    for o, centre, _, _, appearance, spatial_s in _offset_kernels(
            positions, scaled, inv_theta_alpha2, inv_theta_gamma2, offsets):
        for s, (wa, ws) in enumerate(weights):
            val = out[(s, slice(None), o) + centre]
            if wa:
                val += dt.type(wa) * appearance
            if ws:
                val += dt.type(ws) * spatial_s
    return out


def message(kernels, q, filter_size, keep_centre=False):
    """Pass messages: ``out[b, c, i] = sum_o kernels[b, o, i] * q[b, c, i + offset_o]``.

    Parameters
    ----------
    kernels : ndarray, shape (B, K, *spatial)
    q : ndarray, shape (B, C, *spatial)
    filter_size : int or tuple of int
    keep_centre : bool

    Returns
    -------
    ndarray, shape (B, C, *spatial)
    """
    B, C = q.shape[:2]
    spatial = q.shape[2:]
    sizes = _window(filter_size, len(spatial))
    radii = [k // 2 for k in sizes]
    padded = np.zeros((B, C) + tuple(n + 2 * r for n, r in zip(spatial, radii)), dtype=q.dtype)
    padded[(slice(None), slice(None)) + tuple(slice(r, r + n) for n, r in zip(spatial, radii))] = q
    out = np.zeros_like(q)
    tmp = np.empty_like(q)
    offsets = window_offsets(sizes, keep_centre)
    r0 = radii[0]

    def work(y0, y1):
        # Rows (the first spatial axis) y0:y1 of the output read rows y0 - r : y1 + r of q; each
        # thread owns its rows.
        o_rows, t_rows = out[:, :, y0:y1], tmp[:, :, y0:y1]
        for o, offset in enumerate(offsets):
            key = (slice(None), slice(None), slice(r0 + offset[0] + y0, r0 + offset[0] + y1)) + tuple(
                slice(r + d, r + d + n) for n, r, d in zip(spatial[1:], radii[1:], offset[1:]))
            np.multiply(kernels[:, o, None, y0:y1], padded[key], out=t_rows)
            o_rows += t_rows

    _parallel.for_chunks(spatial[0], work, q.size * len(offsets))
    return out


def pairwise_kernels_backward(positions, features, inv_theta_beta, inv_theta_alpha2, inv_theta_gamma2,
                              filter_size, weights, keep_centre, left, right, scales, row_grads=None):
    """Vector-Jacobian product of :func:`pairwise_kernels`, without materialising the kernel gradient.

    The gradient of the loss with respect to kernel ``s`` is never stored as a ``(B, K, *spatial)``
    stack; it is formed one window offset at a time as

    ``gK[s, b, o, i] = scales[s] * A[s, b, o, i] + row_grads[s][b, 0, i]`` with
    ``A[s, b, o, i] = sum_c left[s][b, c, i] * right[s][b, c, i + offset_o]``

    (the vjp of :func:`message` with respect to its kernels, summed over every iteration when the
    iterations are stacked on the class axis) and used at once.

    Parameters
    ----------
    positions, features, inv_theta_beta, inv_theta_alpha2, inv_theta_gamma2, filter_size, weights, keep_centre
        As for :func:`pairwise_kernels`.
    left, right : sequence of ndarray, shape (B, C', *spatial), one per kernel
        Upstream gradient of the messages and the message inputs (``None`` skips a kernel); each
        may also be a list of such arrays (one per iteration), stacked on the class axis here.
    scales : sequence of float, one per kernel
    row_grads : sequence of ndarray of shape (B, 1, *spatial) or None, optional
        Gradient with respect to each kernel's row sums ``sum_o K[s, b, o, i]`` (symmetric
        normalisation).

    Returns
    -------
    dict
        ``features`` (B, F, *spatial); ``inv_theta_beta`` (F,); ``inv_theta_alpha2``,
        ``inv_theta_gamma2`` (floats); ``weights`` (S, 2) float64, the gradient with respect to
        ``weights``; ``pair_dot`` (S,) float64, ``sum_{o, i} K[s, o, i] * A[s, o, i]``.
    """
    B, F = features.shape[:2]
    nd = features.ndim - 2
    dt = features.dtype
    S = len(weights)
    left = [np.concatenate(a, axis=1) if isinstance(a, list) else a for a in left]
    right = [np.concatenate(a, axis=1) if isinstance(a, list) else a for a in right]
    offsets = window_offsets(_window(filter_size, nd), keep_centre)
    ib = inv_theta_beta.astype(dt).reshape((1, F) + (1,) * nd)
    ib2 = ib * ib
    scaled = features * ib
    g_feat = np.zeros_like(features)
    g_ib = np.zeros(F, dtype=np.float64)
    g_ia2 = 0.0
    g_ig2 = 0.0
    g_weights = np.zeros((S, 2))
    pair_dot = np.zeros(S)
    whole = (slice(None), slice(None))
    sp = "zyx"[-nd:]  # einsum letters of the spatial axes (sums over "..." are not allowed)
    if row_grads is None:
        row_grads = (None,) * S
    for o, centre, neighbour, d2, appearance, spatial_s in _offset_kernels(
            positions, scaled, inv_theta_alpha2, inv_theta_gamma2, offsets):
        g_app = None
        g_smo = None
        for s, (wa, ws) in enumerate(weights):
            if left[s] is None and row_grads[s] is None:
                continue
            gk = np.zeros_like(appearance)
            if left[s] is not None:
                a = np.einsum("bc...,bc...->b...", left[s][whole + centre], right[s][whole + neighbour])
                kernel = dt.type(wa) * appearance + dt.type(ws) * spatial_s
                pair_dot[s] += float(np.einsum(f"b{sp},b{sp}->", kernel, a, dtype=np.float64))
                gk += dt.type(scales[s]) * a
            if row_grads[s] is not None:
                gk += row_grads[s][(slice(None), 0) + centre]
            g_weights[s, 0] += float(np.einsum(f"b{sp},b{sp}->", gk, appearance, dtype=np.float64))
            g_weights[s, 1] += float(np.einsum(f"b{sp},{sp}->", gk, spatial_s, dtype=np.float64))
            if wa:
                g_app = dt.type(wa) * gk if g_app is None else g_app + dt.type(wa) * gk
            if ws:
                g_smo = dt.type(ws) * gk if g_smo is None else g_smo + dt.type(ws) * gk
        if g_app is not None:
            # appearance = exp(-1/2 (sum_f (raw_f ib_f)^2 + d2 ia2)), raw = f(neighbour) - f(centre)
            e = g_app * appearance
            g_ia2 += float(-0.5 * np.einsum(f"b{sp},{sp}->", e, d2.astype(dt), dtype=np.float64))
            raw = features[whole + neighbour] - features[whole + centre]
            g_ib += -np.einsum(f"b{sp},bf{sp}->f", e, raw * raw, dtype=np.float64) * inv_theta_beta
            # d appearance / d f_centre = appearance * raw * ib^2; the neighbour gets the opposite.
            t = e[:, None] * raw * ib2
            g_feat[whole + centre] += t
            g_feat[whole + neighbour] -= t
        if g_smo is not None:
            g_ig2 += float(-0.5 * np.einsum(f"b{sp},{sp}->", g_smo, (spatial_s * d2).astype(dt), dtype=np.float64))
    return {"features": g_feat, "inv_theta_beta": g_ib, "inv_theta_alpha2": g_ia2,
            "inv_theta_gamma2": g_ig2, "weights": g_weights, "pair_dot": pair_dot}


def message_transpose(kernels, grad, filter_size, keep_centre=False):
    """Transpose of :func:`message` with respect to ``q``.

    The kernels are symmetric (``k(i, j) = k(j, i)``, i.e. ``kernels[o, i] = kernels[-o, i + o]``)
    and zero outside the grid on both sides, so the operator is its own transpose.
    """
    return message(kernels, grad, filter_size, keep_centre)


# ---------------------------------------------------------------------------------------------
# update: compatibility, unary and softmax
# ---------------------------------------------------------------------------------------------
def compatibility_transform(msg, compat):
    """Return ``-Phi = -sum_l' mu(l, l') M(l')``; ``compat`` None means Potts."""
    if compat is None:
        return msg - msg.sum(axis=1, keepdims=True)
    B, C = msg.shape[:2]
    out = np.matmul(compat.astype(msg.dtype), msg.reshape(B, C, -1))
    return np.negative(out, out=out).reshape(msg.shape)


def _softmax_inplace(x):
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)


def softmax(logits, out=None, transient=False):
    """Softmax over axis 1, computed stably; ``out`` may be ``logits`` itself.

    ``transient`` (the result only feeds the next message) changes nothing here: it lets other
    backends keep less (see :func:`cucrf._meanfield.mean_field`).
    """
    if out is None:
        out = np.empty_like(logits)
    rows = logits.shape[2] if logits.ndim >= 3 else 1

    def work(start, stop):
        key = (slice(None), slice(None), slice(start, stop)) if logits.ndim >= 3 else ...
        if out is not logits:
            out[key] = logits[key]
        _softmax_inplace(out[key])

    _parallel.for_chunks(rows, work, logits.size)
    return out


def softmax_backward(q, grad, into=None):
    """Vector-Jacobian product of :func:`softmax` (over axis 1) given its output ``q``; with
    ``into`` (an array of ``q``'s shape) the result is also added to it."""
    inner = np.einsum("bc...,bc...->b...", q, grad)[:, None]
    out = q * (grad - inner)
    if into is not None:
        into += out
    return out


def sum_products(a, b):
    """``sum(a * b)`` over every element of two arrays of one shape, summed in float64 (a float)."""
    return float(np.sum(a * b, dtype=np.float64))


def compatibility_backward(grad, msg, compat):
    """Vector-Jacobian product of :func:`compatibility_transform`.

    Returns ``(grad_msg, grad_compat)``: ``-mu^T grad`` and ``-sum_{b, pixels} grad msg^T``
    (C, C) float64; for Potts (``compat`` None) the gradient is the one of the full matrix
    evaluated at ``mu = 1 - I``.
    """
    B, C = msg.shape[:2]
    g2 = grad.reshape(B, C, -1)
    m2 = msg.reshape(B, C, -1)
    grad_compat = np.zeros((C, C))
    for b in range(B):  # 2-D products: a batched matmul with a transposed operand is far slower
        grad_compat -= np.dot(g2[b], m2[b].T)
    if compat is None:
        grad_msg = grad - grad.sum(axis=1, keepdims=True)
    else:
        grad_msg = -np.matmul(compat.astype(grad.dtype).T, g2).reshape(grad.shape)
    return grad_msg, grad_compat


def update(scaled_unary, msg, compat, return_logits=False, out=None, transient=False):
    """One mean-field update: ``softmax(a * U - Phi)`` (or the logits themselves).

    ``transient`` (the result only feeds the next message) changes nothing here; see
    :func:`softmax`.

    Parameters
    ----------
    scaled_unary : ndarray, shape (B, C, H, W)
        ``a * U``.
    msg : ndarray, shape (B, C, H, W)
        Messages ``M``.
    compat : ndarray of shape (C, C) or None
        ``mu``; None for Potts.
    """
    if compat is None and not return_logits:
        # For Potts, -Phi = M - sum(M) and the sum is constant over classes: softmax drops it.
        if out is None:
            out = np.empty_like(msg)

        def work(start, stop):
            key = (slice(None), slice(None), slice(start, stop))
            np.add(scaled_unary[key], msg[key], out=out[key])
            _softmax_inplace(out[key])

        _parallel.for_chunks(msg.shape[2], work, msg.size)
        return out
    else:
        logits = np.add(scaled_unary, compatibility_transform(msg, compat), out=out)
    if return_logits:
        return logits
    return softmax(logits, out=logits)


# ---------------------------------------------------------------------------------------------
# the interface used by cucrf._meanfield.mean_field
# ---------------------------------------------------------------------------------------------
def prepare(features, params, config):
    """Pooled features, pairwise kernels and normalisers: see :func:`cucrf._meanfield.prepare`."""
    from . import _meanfield, _numpy_backend

    return _meanfield.prepare(_numpy_backend, features, params, config)


def full_message(setup, q, config):
    """Full-resolution message: see :func:`cucrf._meanfield.message`."""
    from . import _meanfield, _numpy_backend

    return _meanfield.message(_numpy_backend, setup, q, config)


def full_message_backward(setup, q, grad_msg, config, grads):
    """Gradient of :func:`full_message`: see :func:`cucrf._meanfield.message_backward`."""
    from . import _meanfield, _numpy_backend

    return _meanfield.message_backward(_numpy_backend, setup, q, grad_msg, config, grads)


def prepare_backward(setup, features, params, config, grads):
    """Gradient of :func:`prepare`: see :func:`cucrf._meanfield.prepare_backward`."""
    from . import _meanfield, _numpy_backend

    return _meanfield.prepare_backward(_numpy_backend, setup, features, params, config, grads)
