"""Brute-force reference of the Convolutional CRF on volumes, from the mathematics with plain loops.

Independent of the package's code: float64, dense matrices built one voxel at a time. A volume
(D, H, W) is pooled into cells of ``blur[a]`` voxels along each axis (ConvCRF's padding rule,
each cell averaging the real voxels it covers), messages pass between cells whose index differs
by at most ``filter_size[a] // 2`` along each axis, positions are the cells' mean voxel indices
times ``spacing``, and upsampling is trilinear (``align_corners=False``, clamped). Use on tiny
volumes only.
"""

import itertools
import math

import numpy as np


def _cells(n, blur):
    """For each cell of an axis of ``n`` voxels, the voxel indices it covers."""
    pad = math.ceil(((blur - n % blur) % blur) / 2)
    members = [[] for _ in range(math.ceil(n / blur))]
    for p in range(n):
        members[(p + pad) // blur].append(p)
    return pad, members


def _taps(o, pad, blur, cells):
    """(cell0, cell1, weight of cell1) that linear upsampling reads for voxel ``o`` of an axis."""
    src = max((o + pad + 0.5) / blur - 0.5, 0.0)
    i0 = min(int(math.floor(src)), cells - 1)
    i1 = min(i0 + 1, cells - 1)
    return i0, i1, (src - i0 if i1 != i0 else 0.0)


def operators(size, blur):
    """Dense pooling (cells x voxels) and upsampling (voxels x cells) matrices of a volume."""
    axes = [_cells(n, b) for n, b in zip(size, blur)]
    coarse = tuple(len(m) for _, m in axes)
    voxels = list(itertools.product(*[range(n) for n in size]))
    cells = list(itertools.product(*[range(c) for c in coarse]))
    index = {c: i for i, c in enumerate(cells)}
    pool = np.zeros((len(cells), len(voxels)))
    for ci, cell in enumerate(cells):
        members = list(itertools.product(*[axes[a][1][cell[a]] for a in range(len(size))]))
        for v in members:
            pool[ci, voxels.index(v)] = 1.0 / len(members)
    up = np.zeros((len(voxels), len(cells)))
    for vi, v in enumerate(voxels):
        taps = [_taps(v[a], axes[a][0], blur[a], coarse[a]) for a in range(len(size))]
        for corner in itertools.product((0, 1), repeat=len(size)):
            weight = 1.0
            cell = []
            for a, (i0, i1, lam) in enumerate(taps):
                cell.append(i1 if corner[a] else i0)
                weight *= lam if corner[a] else 1.0 - lam
            up[vi, index[tuple(cell)]] += weight
    centres = [[float(np.mean(m)) for m in members] for _, members in axes]
    return pool, up, coarse, cells, centres


def coarse_kernel(kind, features, size, blur, filter_size, spacing, p, keep_centre):
    """Dense (cells x cells) matrix of one kernel on the coarse grid."""
    pool, _, coarse, cells, centres = operators(size, blur)
    pooled = pool @ features  # (cells, F)
    radius = [k // 2 for k in filter_size]
    index = {c: i for i, c in enumerate(cells)}
    A = np.zeros((len(cells), len(cells)))
    for i, ci in enumerate(cells):
        for offset in itertools.product(*[range(-r, r + 1) for r in radius]):
            if not keep_centre and not any(offset):
                continue
            cj = tuple(c + d for c, d in zip(ci, offset))
            if not all(0 <= c < n for c, n in zip(cj, coarse)):
                continue
            j = index[cj]
            d2 = sum(((centres[a][cj[a]] - centres[a][ci[a]]) * spacing[a]) ** 2 for a in range(len(size)))
            if kind == "smoothness":
                A[i, j] = math.exp(-0.5 * d2 / p["theta_gamma"] ** 2)
            else:
                colour = sum((pooled[i, f] - pooled[j, f]) ** 2 / p["theta_beta"][f] ** 2
                             for f in range(pooled.shape[1]))
                A[i, j] = math.exp(-0.5 * (d2 / p["theta_alpha"] ** 2 + colour))
    return A


def infer(unary, image, p, filter_size, blur, spacing, iterations, normalization=None, output="probabilities",
          keep_centre=False):
    """Mean-field inference on one volume: unary (C, D, H, W), image (D, H, W, F); returns (C, D, H, W).

    ``filter_size``, ``blur`` and ``spacing`` have one entry per axis. ``p`` holds ``theta_alpha``,
    ``theta_beta`` (one per channel), ``theta_gamma``, the two weights, ``compatibility`` ((C, C) or
    None for Potts) and ``unary_weight``.
    """
    C = unary.shape[0]
    size = unary.shape[1:]
    n = int(np.prod(size))
    features = image.reshape(n, -1).astype(np.float64)
    pool, up, *_ = operators(size, blur)
    ops = {kind: up @ coarse_kernel(kind, features, size, blur, filter_size, spacing, p, keep_centre) @ pool
           for kind in ("appearance", "smoothness")}
    weights = {"appearance": p["appearance_weight"], "smoothness": p["smoothness_weight"]}
    norms = {kind: 1.0 / np.sqrt(op @ np.ones(n) + 1e-20) for kind, op in ops.items()}
    mu = p["compatibility"] if p["compatibility"] is not None else 1.0 - np.eye(C)
    a = p["unary_weight"]
    U = unary.reshape(C, n).astype(np.float64)

    def softmax(logits):
        e = np.exp(logits - logits.max(axis=0))
        return e / e.sum(axis=0)

    logits = a * U
    Q = softmax(logits)
    for _ in range(iterations):
        M = np.zeros((C, n))
        for kind, op in ops.items():
            if normalization == "symmetric":
                M += weights[kind] * norms[kind] * (op @ (norms[kind] * Q).T).T
            else:
                M += weights[kind] * (op @ Q.T).T
        logits = a * U - mu @ M
        Q = softmax(logits)
    return (logits if output == "logits" else Q).reshape(unary.shape)
