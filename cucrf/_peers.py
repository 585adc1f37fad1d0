"""Thin wrappers around peer CRF implementations, used by benchmarks and comparison tests.

Only the fully connected CRF of Krähenbühl & Koltun (2011) through ``pydensecrf`` (PyPI package
``pydensecrf2``, an optional extra) is wrapped. Install it with ``scripts/install-densecrf.sh``.
``pydensecrf`` is imported lazily, so this module imports without it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["densecrf_available", "densecrf_infer"]


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
