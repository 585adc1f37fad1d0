"""Thin wrappers around peer CRF implementations, used by benchmarks and comparison tests.

The fully connected CRF of Krähenbühl & Koltun (2011) through ``pydensecrf`` (PyPI package
``pydensecrf2``, an optional extra; install it with ``scripts/install-densecrf.sh``), and
upstream ConvCRF's PyTorch code run from a checkout of its repository (for the benchmark; never
vendored). Both are imported lazily, so this module imports without them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["densecrf_available", "densecrf_infer", "convcrf_runner"]


def densecrf_available() -> bool:
    """Return True if ``pydensecrf.densecrf`` can be imported (the pydensecrf2 extra)."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except Exception:  # ImportError, or a broken binary build
        return False
    return True


def densecrf_infer(
    unary_logprob,
    image,
    iterations: int = 5,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 80,
    bilateral_srgb: float = 13,
    bilateral_compat: float = 10,
) -> np.ndarray:
    """Mean-field inference of a DenseCRF (pydensecrf, permutohedral lattice) on one image.

    The energy is ``-unary_logprob`` plus a Potts-model Gaussian (smoothness) kernel on pixel
    positions and a bilateral (appearance) kernel on positions and RGB, with pydensecrf's
    defaults (``DIAG_KERNEL``, ``NORMALIZE_SYMMETRIC``).

    Parameters
    ----------
    unary_logprob : array_like of float, shape (C, H, W)
        Per-class log-probabilities (e.g. ``log_softmax(logits)``); the unary energy is their
        negative. Converted to C-contiguous float32.
    image : array_like of uint8, shape (H, W, 3)
        RGB image used by the bilateral kernel.
    iterations : int, default 5
        Number of mean-field iterations.
    gaussian_sxy, gaussian_compat : float, default 3, 3
        Spatial standard deviation (pixels) and Potts weight of the smoothness kernel.
    bilateral_sxy, bilateral_srgb, bilateral_compat : float, default 80, 13, 10
        Spatial (pixels) and colour (intensity units) standard deviations and the Potts weight
        of the appearance kernel.

    Returns
    -------
    numpy.ndarray of float32, shape (C, H, W)
        Marginal probabilities; they sum to 1 over the class axis.

    Raises
    ------
    ImportError
        If pydensecrf is not installed (see ``scripts/install-densecrf.sh``).
    ValueError, TypeError
        For inputs of the wrong shape, dtype or non-finite values (pydensecrf itself would
        crash or silently misread them).
    """
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise ImportError(
            "densecrf_infer needs pydensecrf (PyPI: pydensecrf2==1.1); install it with "
            "scripts/install-densecrf.sh"
        ) from exc

    u = np.asarray(unary_logprob)
    if u.ndim != 3:
        raise ValueError(f"unary_logprob must have shape (C, H, W); received shape {u.shape}")
    if not np.issubdtype(u.dtype, np.floating):
        raise TypeError(f"unary_logprob must be floating point log-probabilities; received dtype {u.dtype}")
    c, h, w = u.shape
    if c < 2:
        raise ValueError(f"unary_logprob must have at least 2 classes; received C={c}")
    img = np.asarray(image)
    if img.shape != (h, w, 3):
        raise ValueError(
            f"image must have shape (H, W, 3) = ({h}, {w}, 3) to match unary_logprob; "
            f"received shape {img.shape}"
        )
    if img.dtype != np.uint8:
        raise TypeError(f"image must have dtype uint8; received dtype {img.dtype}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0; received {iterations!r}")
    if not np.isfinite(u).all():
        raise ValueError("unary_logprob contains NaN or inf; clip probabilities before taking the log")

    crf = dcrf.DenseCRF2D(w, h, c)  # pydensecrf takes width first
    # pydensecrf needs C-contiguous float32 (C, H*W); anything else segfaults or is misread.
    energy = np.ascontiguousarray(-u.reshape(c, h * w), dtype=np.float32)
    crf.setUnaryEnergy(energy)
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(img), compat=bilateral_compat
    )
    q = np.asarray(crf.inference(int(iterations)), dtype=np.float32)
    return q.reshape(c, h, w)


def convcrf_runner(checkout, unary_logits, image, filter_size=7, blur=4, iterations=5, threads=None):
    """A callable running upstream ConvCRF (PyTorch, CPU) from a checkout of its repository.

    Upstream's ``GaussCRF`` with its default configuration (``convcrf.default_conf``: Potts
    weights 3 and 10, sxy 3 / 80, srgb 13, logsoftmax, no normalisation) at the given
    ``filter_size`` and ``blur``, built once for the image's shape as upstream's own
    ``benchmark.py`` does; calling the returned function runs ``iterations`` mean-field updates
    under ``torch.no_grad()``. Nothing of upstream is copied into cucrf: the checkout (MIT
    licence) is imported from ``checkout`` when this is called.

    Parameters
    ----------
    checkout : str or path
        A clone of https://github.com/MarvinTeichmann/ConvCRF (the folder holding ``convcrf/``).
    unary_logits : ndarray, shape (C, H, W)
    image : ndarray of uint8, shape (H, W, 3)
    threads : int, optional
        ``torch.set_num_threads`` for the run (default: PyTorch's own).

    Raises
    ------
    ImportError
        When PyTorch is missing or ``checkout`` holds no ``convcrf/convcrf.py``.
    """
    import importlib.util
    import os
    import sys

    path = os.path.join(os.fspath(checkout), "convcrf", "convcrf.py")
    if not os.path.isfile(path):
        raise ImportError(f"no upstream ConvCRF checkout at {checkout!r} (expected {path})")
    import torch

    spec = importlib.util.spec_from_file_location("_upstream_convcrf", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.fspath(checkout))  # upstream imports its own top-level ``utils``
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.fspath(checkout))
    if threads is not None:
        torch.set_num_threads(int(threads))
    C, H, W = unary_logits.shape
    conf = dict(module.default_conf)
    conf.update(filter_size=int(filter_size), blur=int(blur), pyinn=False)
    crf = module.GaussCRF(conf=conf, shape=(H, W), nclasses=C, use_gpu=False)
    img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32))
    un = torch.from_numpy(np.ascontiguousarray(unary_logits[None], dtype=np.float32))

    def run():
        with torch.no_grad():
            return crf.forward(unary=un, img=img, num_iter=iterations)

    return run
