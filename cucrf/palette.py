"""Colouring label maps: a fixed VOC-style palette, overlays and paletted PNG files.

The palette is the one PASCAL VOC uses for its ``SegmentationClass`` PNGs: the bits of a class
id are spread over the high bits of the red, green and blue channels (bit 0 -> red, bit 1 ->
green, bit 2 -> blue, then the next three bits one level lower, ...). Class 0 is black, 1 dark
red, 2 dark green, ... and 255 (VOC's "ignore / boundary" value) is a light grey-beige.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["PALETTE", "IGNORE_LABEL", "voc_palette", "color_labels", "overlay", "save_label_png"]

IGNORE_LABEL = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The VOC colour palette.

    Parameters
    ----------
    n : int
        Number of entries (at most 256).

    Returns
    -------
    numpy.ndarray of uint8, shape (n, 3)
        ``palette[i]`` is the RGB colour of class ``i``.

    Examples
    --------
    >>> voc_palette(4).tolist()
    [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    >>> voc_palette()[255].tolist()
    [224, 224, 192]
    """
    if not 0 <= n <= 256:
        raise ValueError(f"n must be in [0, 256], got {n}")
    ids = np.arange(n)
    palette = np.zeros((n, 3), dtype=np.int64)
    # Bit-interleaving rule: id bits (b0 b1 b2)(b3 b4 b5)(b6 b7) go to R, G, B from bit 7 down.
    for level in range(8):
        shift = 7 - level
        for channel in range(3):
            bit = (ids >> (3 * level + channel)) & 1
            palette[:, channel] |= bit << shift
    return palette.astype(np.uint8)


PALETTE = voc_palette(256)
PALETTE.setflags(write=False)


def _check_labels(labels) -> np.ndarray:
    lab = np.asarray(labels.get() if type(labels).__module__.split(".")[0] == "cupy" else labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) map of class ids, got shape {lab.shape}")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
        raise TypeError(f"labels must hold integer class ids, got dtype {lab.dtype}")
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) > 255):
        raise ValueError(
            f"labels must lie in [0, 255] to be coloured with the 256-entry palette, got values in "
            f"[{int(lab.min())}, {int(lab.max())}]"
        )
    return lab.astype(np.uint8, copy=False)


def color_labels(labels) -> np.ndarray:
    """Colour a label map with the VOC palette.

    Parameters
    ----------
    labels : array_like of int, shape (H, W)
        Class ids in [0, 255]; 255 (ignore) becomes light grey.

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 3)

    Examples
    --------
    >>> color_labels(np.array([[0, 1, 255]])).tolist()
    [[[0, 0, 0], [128, 0, 0], [224, 224, 192]]]
    """
    return PALETTE[_check_labels(labels)]


def _as_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {img.shape}")
    if img.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got dtype {img.dtype}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img[:, :, :3]


def overlay(image, labels, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured labels over an image.

    Parameters
    ----------
    image : numpy.ndarray of uint8, shape (H, W, 3) or (H, W, 1) or (H, W)
        The image; grey images are shown in grey.
    labels : array_like of int, shape (H, W)
        Class ids; pixels labelled 255 (ignore) show the image unchanged.
    alpha : float
        Opacity of the labels, in [0, 1].

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 3)
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    img = _as_rgb(image)
    lab = _check_labels(labels)
    if lab.shape != img.shape[:2]:
        raise ValueError(f"labels have shape {lab.shape} but the image is {img.shape[0]}x{img.shape[1]}")
    blended = (1.0 - alpha) * img.astype(np.float32) + alpha * PALETTE[lab].astype(np.float32)
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    ignore = lab == IGNORE_LABEL
    out[ignore] = img[ignore]  # ignored pixels have no label to show
    return out


def save_label_png(path, labels) -> None:
    """Write a label map as a paletted PNG: pixel values are class ids, viewers show colours.

    This is the format of VOC's ``SegmentationClass`` files, so the result can be read back as
    class ids (e.g. by :func:`cucrf.datasets.load_pairs`) and looked at in any image viewer.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.png``).
    labels : array_like of int, shape (H, W)
        Class ids in [0, 255].
    """
    lab = _check_labels(labels)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with imageio
        import imageio.v3 as iio

        # Without Pillow keep the ids (greyscale PNG): the ids matter more than the colours.
        iio.imwrite(path, lab)
        return
    img = Image.fromarray(np.ascontiguousarray(lab))  # mode "L"
    img.putpalette(PALETTE.tobytes())  # turns the "L" image into a "P" image with our colours
    img.save(os.fspath(path), format="PNG")
