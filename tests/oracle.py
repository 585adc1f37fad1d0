"""Brute-force reference of the ConvCRF model, written from the mathematics with plain loops.

Deliberately slow and independent of the package's code: float64, one pixel and one window
element at a time. Use on tiny images only.
"""

import math

import numpy as np


def blur_axis(n, blur):
    """(pad, number of cells) of an axis of ``n`` pixels, ConvCRF's rule."""
    pad = math.ceil(((blur - n % blur) % blur) / 2)
    return pad, math.ceil(n / blur)


def cell_members(n, blur):
    """For each cell, the list of real pixel indices it covers."""
    pad, cells = blur_axis(n, blur)
    members = [[] for _ in range(cells)]
    for p in range(n):
        members[(p + pad) // blur].append(p)
    return members


def pool_image(x, blur):
    """Average-pool a (..., H, W) array, each cell averaging the real pixels it covers."""
    H, W = x.shape[-2:]
    rows, cols = cell_members(H, blur), cell_members(W, blur)
    out = np.zeros(x.shape[:-2] + (len(rows), len(cols)))
    for i, rs in enumerate(rows):
        for j, cs in enumerate(cols):
            total = 0.0
            for r in rs:
                for c in cs:
                    total = total + x[..., r, c]
            out[..., i, j] = total / (len(rs) * len(cs))
    return out


def upsample_image(x, blur, H, W):
    """Bilinear upsampling by ``blur`` (align_corners=False, clamped), cropped to H x W."""
    pad_y, h = blur_axis(H, blur)
    pad_x, w = blur_axis(W, blur)
    assert x.shape[-2:] == (h, w)

    def taps(o, n):
        src = max((o + 0.5) / blur - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n - 1)
        i1 = min(i0 + 1, n - 1)
        lam = src - i0 if i1 != i0 else 0.0
        return i0, i1, lam

    out = np.zeros(x.shape[:-2] + (H, W))
    for y in range(H):
        y0, y1, ly = taps(y + pad_y, h)
        for xx in range(W):
            x0, x1, lx = taps(xx + pad_x, w)
            out[..., y, xx] = ((1 - ly) * ((1 - lx) * x[..., y0, x0] + lx * x[..., y0, x1])
                               + ly * ((1 - lx) * x[..., y1, x0] + lx * x[..., y1, x1]))
    return out


def kernel_value(kind, pi, pj, fi, fj, p):
    """k_m(i, j) for one pair of cells: positions (y, x) and features vectors."""
    d2 = (pi[0] - pj[0]) ** 2 + (pi[1] - pj[1]) ** 2
    if kind == "smoothness":
        return math.exp(-0.5 * d2 / p["theta_gamma"] ** 2)
    colour = sum((fi[f] - fj[f]) ** 2 / p["theta_beta"][f] ** 2 for f in range(len(fi)))
    return math.exp(-0.5 * (d2 / p["theta_alpha"] ** 2 + colour))


def coarse_operator(kind, image, blur, filter_size, p, keep_centre=False):
    """Dense matrix of one kernel on the coarse grid: A[i, j] = k(i, j) for j in i's window."""
    H, W, F = image.shape
    rows, cols = cell_members(H, blur), cell_members(W, blur)
    h, w = len(rows), len(cols)
    feats = pool_image(np.moveaxis(image.astype(np.float64), -1, 0), blur)  # (F, h, w)
    pos = [[(np.mean(rows[i]), np.mean(cols[j])) for j in range(w)] for i in range(h)]
    r = filter_size // 2
    A = np.zeros((h * w, h * w))
    for i in range(h):
        for j in range(w):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    if (dy, dx) == (0, 0) and not keep_centre:
                        continue
                    ni, nj = i + dy, j + dx
                    if not (0 <= ni < h and 0 <= nj < w):
                        continue  # outside the image: contributes nothing
                    A[i * w + j, ni * w + nj] = kernel_value(
                        kind, pos[i][j], pos[ni][nj], feats[:, i, j], feats[:, ni, nj], p)
    return A


def full_operator(kind, image, blur, filter_size, p, keep_centre=False):
    """Dense (H*W, H*W) matrix of Up o K o Pool for one kernel."""
    H, W, _ = image.shape
    A = coarse_operator(kind, image, blur, filter_size, p, keep_centre)
    n = H * W
    cols = []
    for k in range(n):
        e = np.zeros((H, W))
        e.flat[k] = 1.0
        pooled = pool_image(e, blur).ravel()
        cols.append(upsample_image((A @ pooled).reshape(pool_image(e, blur).shape), blur, H, W).ravel())
    return np.stack(cols, axis=1)


def infer(unary, image, p, filter_size, blur, iterations, normalization=None, output="probabilities",
          keep_centre=False):
    """Mean-field inference for one image: unary (C, H, W), image (H, W, F). Returns (C, H, W).

    ``keep_centre``: the window contains its centre cell (a cell interacts with itself).
    """
    C, H, W = unary.shape
    n = H * W
    ops = {m: full_operator(m, image, blur, filter_size, p, keep_centre) for m in ("appearance", "smoothness")}
    weights = {"appearance": p["appearance_weight"], "smoothness": p["smoothness_weight"]}
    if normalization == "symmetric":
        norms = {m: 1.0 / np.sqrt(ops[m] @ np.ones(n) + 1e-20) for m in ops}
    mu = p["compatibility"] if p["compatibility"] is not None else 1.0 - np.eye(C)
    a = p["unary_weight"]
    U = unary.reshape(C, n).astype(np.float64)

    def softmax_pixels(logits):
        out = np.zeros_like(logits)
        for i in range(n):
            col = logits[:, i] - logits[:, i].max()
            e = np.exp(col)
            out[:, i] = e / e.sum()
        return out

    Q = softmax_pixels(a * U)
    logits = a * U
    for _ in range(iterations):
        M = np.zeros((C, n))
        for l in range(C):
            for m, op in ops.items():
                if normalization == "symmetric":
                    M[l] += weights[m] * norms[m] * (op @ (norms[m] * Q[l]))
                else:
                    M[l] += weights[m] * (op @ Q[l])
        logits = np.zeros((C, n))
        for l in range(C):
            logits[l] = a * U[l] - sum(mu[l, k] * M[k] for k in range(C))
        Q = softmax_pixels(logits)
    out = logits if output == "logits" else Q
    return out.reshape(C, H, W)
