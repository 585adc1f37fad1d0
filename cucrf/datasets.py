"""Loading labelled image pairs and making the paper's synthetic unaries.

Two pieces:

* :func:`load_pairs` reads a folder of ``<id>_image.png`` / ``<id>_label.png`` pairs (optionally
  with per-image unary files from another folder) into a list of :class:`Sample`.
* :func:`synthetic_unary` turns a ground-truth label map into a degraded unary, following the
  synthetic protocol of Teichmann & Cipolla (2018), "Convolutional CRFs for Semantic
  Segmentation", Sec. 5.1: downsample the one-hot label 8x, replace the labels of a random 20 %
  of the low-resolution cells with random classes, upsample bilinearly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Sample", "load_pairs", "synthetic_unary"]

_IMAGE_SUFFIX = "_image.png"
_LABEL_SUFFIX = "_label.png"


@dataclass
class Sample:
    """One labelled image.

    Attributes
    ----------
    name : str
        The ``<id>`` shared by the image and label files.
    image : numpy.ndarray, shape (H, W, F)
        The image as stored (normally uint8 RGB, F = 3). Grey images get F = 1; an alpha
        channel is dropped.
    label : numpy.ndarray of uint8 (or uint16 for 16-bit PNGs), shape (H, W)
        Class ids; 255 conventionally marks pixels to ignore.
    unary : numpy.ndarray, shape (C, H, W), or None
        Per-class scores loaded from the unary file (dtype as stored, e.g. float16 logits),
        or None when no unary folder was given.
    unary_path : pathlib.Path or None
        The file the unary came from.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    unary: np.ndarray | None = None
    unary_path: Path | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # arrays are too long for the default repr
        u = None if self.unary is None else f"{self.unary.shape} {self.unary.dtype}"
        return (
            f"Sample(name={self.name!r}, image={self.image.shape} {self.image.dtype}, "
            f"label={self.label.shape} {self.label.dtype}, unary={u})"
        )


def _read_image(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    img = np.asarray(iio.imread(path))
    if img.ndim == 2:
        img = img[:, :, None]
    elif img.ndim == 3:
        # Drop alpha: grey+alpha (LA) keeps 1 channel, RGBA keeps 3.
        if img.shape[2] == 2:
            img = img[:, :, :1]
        elif img.shape[2] == 4:
            img = img[:, :, :3]
    else:
        raise ValueError(f"image file {path} decodes to shape {img.shape}; expected (H, W) or (H, W, F)")
    return np.ascontiguousarray(img)


def _read_label(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    # Palette PNGs (e.g. VOC SegmentationClass) store class ids as palette indices; without
    # mode="P" imageio would apply the palette and return RGB colours.
    mode = None
    try:
        mode = iio.immeta(path).get("mode")
    except Exception:  # metadata is a nicety; fall back to a plain read
        pass
    lab = np.asarray(iio.imread(path, mode="P") if mode == "P" else iio.imread(path))
    if lab.ndim == 3 and lab.shape[2] in (2, 4):
        lab = lab[:, :, 0]  # grey + alpha
    if lab.ndim == 3 and lab.shape[2] == 1:
        lab = lab[:, :, 0]
    if lab.ndim != 2:
        raise ValueError(
            f"label file {path} decodes to shape {lab.shape}; expected a single-channel (H, W) "
            "map of class ids (greyscale or palette PNG), not a colour-coded label"
        )
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"label file {path} decodes to dtype {lab.dtype}; expected integer class ids")
    return np.ascontiguousarray(lab)


def _read_unary(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "logits" in z.files:
                arr = z["logits"]
            elif len(z.files) == 1:
                arr = z[z.files[0]]
            else:
                raise ValueError(
                    f"unary file {path} holds arrays {z.files}; expected one named 'logits'"
                )
    else:
        raise ValueError(f"unary file {path} has suffix {path.suffix!r}; expected .npz or .npy")
    if arr.ndim != 3:
        raise ValueError(f"unary file {path} holds shape {arr.shape}; expected (C, H, W)")
    return arr


def load_pairs(
    folder,
    *,
    unary_dir=None,
    unary_pattern: str = "{name}.npz",
    names=None,
) -> list[Sample]:
    """Load every ``<id>_image.png`` / ``<id>_label.png`` pair in a folder.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder holding the pairs (not searched recursively).
    unary_dir : str or os.PathLike, optional
        Folder holding one unary file per sample. When given, every sample must have one.
    unary_pattern : str, default ``"{name}.npz"``
        File name of a sample's unary inside ``unary_dir``; ``{name}`` is replaced by the id.
        E.g. ``"{name}_espnet2_384.npz"`` for the layout of ``data/unaries``. ``.npz`` files must
        hold an array ``logits`` (or a single array); ``.npy`` files hold the array itself.
        The array must be (C, H, W) with H, W equal to the label's.
    names : iterable of str, optional
        Load only these ids (in this order) instead of all pairs.

    Returns
    -------
    list of Sample
        Sorted by id (or in the order of ``names``).

    Raises
    ------
    FileNotFoundError
        If ``folder`` / ``unary_dir`` does not exist, holds no pairs, or a file is missing.
    ValueError
        If an image has no label (or vice versa), or sizes of image / label / unary differ.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist or is not a directory")
    files = set(os.listdir(folder))
    image_ids = {f[: -len(_IMAGE_SUFFIX)] for f in files if f.endswith(_IMAGE_SUFFIX)}
    label_ids = {f[: -len(_LABEL_SUFFIX)] for f in files if f.endswith(_LABEL_SUFFIX)}

    if names is None:
        if not image_ids and not label_ids:
            raise FileNotFoundError(
                f"folder {str(folder)!r} holds no '<id>{_IMAGE_SUFFIX}' / '<id>{_LABEL_SUFFIX}' files"
            )
        unmatched = sorted(image_ids ^ label_ids)
        if unmatched:
            lines = [
                f"{i}{_IMAGE_SUFFIX} has no {i}{_LABEL_SUFFIX}" if i in image_ids
                else f"{i}{_LABEL_SUFFIX} has no {i}{_IMAGE_SUFFIX}"
                for i in unmatched[:5]
            ]
            more = f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
            raise ValueError(f"unmatched pairs in {str(folder)!r}: " + "; ".join(lines) + more)
        ids = sorted(image_ids)
    else:
        ids = [str(n) for n in names]
        if not ids:
            raise ValueError("names is empty; expected at least one sample id")
        for i in ids:
            for suffix in (_IMAGE_SUFFIX, _LABEL_SUFFIX):
                if i + suffix not in files:
                    raise FileNotFoundError(f"{i}{suffix} not found in {str(folder)!r}")

    if unary_dir is not None:
        unary_dir = Path(unary_dir)
        if not unary_dir.is_dir():
            raise FileNotFoundError(f"unary_dir {str(unary_dir)!r} does not exist or is not a directory")
        if "{name}" not in unary_pattern:
            raise ValueError(f"unary_pattern must contain '{{name}}'; received {unary_pattern!r}")

    samples = []
    for i in ids:
        image = _read_image(folder / (i + _IMAGE_SUFFIX))
        label = _read_label(folder / (i + _LABEL_SUFFIX))
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"size mismatch for {i!r}: image is {image.shape[0]}x{image.shape[1]} (H x W) "
                f"but label is {label.shape[0]}x{label.shape[1]}"
            )
        unary = upath = None
        if unary_dir is not None:
            upath = unary_dir / unary_pattern.format(name=i)
            if not upath.is_file():
                raise FileNotFoundError(f"no unary for {i!r}: {str(upath)!r} does not exist")
            unary = _read_unary(upath)
            if unary.shape[1:] != label.shape:
                raise ValueError(
                    f"size mismatch for {i!r}: unary {upath.name} is {unary.shape} (C, H, W) "
                    f"but label is {label.shape} (H, W)"
                )
        samples.append(Sample(name=i, image=image, label=label, unary=unary, unary_path=upath))
    return samples


def _area_downsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Average (C, H, W) over non-overlapping factor x factor cells -> (C, ceil(H/f), ceil(W/f)).

    A partial cell at the bottom / right border averages only the pixels it covers.
    """
    c, h, w = x.shape
    hl, wl = -(-h // factor), -(-w // factor)
    padded = np.zeros((c, hl * factor, wl * factor), dtype=np.float64)
    padded[:, :h, :w] = x
    count = np.zeros((hl * factor, wl * factor), dtype=np.float64)
    count[:h, :w] = 1.0
    s = padded.reshape(c, hl, factor, wl, factor).sum(axis=(2, 4))
    n = count.reshape(hl, factor, wl, factor).sum(axis=(1, 3))
    return s / n


def _linear_taps(n_out: int, n_in: int, factor: int):
    """Source indices and weights of align_corners=False linear interpolation by `factor`.

    Output pixel i samples the low-resolution grid at (i + 0.5) / factor - 0.5 (cell centres sit
    at the centres of their factor-wide pixel blocks), clamped to the border like PyTorch's
    ``interpolate(mode="bilinear", align_corners=False)``.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) / factor - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    return i0, i1, w1


def _bilinear_upsample(x: np.ndarray, factor: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Upsample (C, h, w) -> (C, H, W) by `factor`, align_corners=False, separably."""
    h_out, w_out = out_hw
    r0, r1, wr = _linear_taps(h_out, x.shape[1], factor)
    c0, c1, wc = _linear_taps(w_out, x.shape[2], factor)
    rows = x[:, r0, :] * (1.0 - wr)[None, :, None] + x[:, r1, :] * wr[None, :, None]
    return rows[:, :, c0] * (1.0 - wc) + rows[:, :, c1] * wc


def synthetic_unary(
    label,
    num_classes: int,
    *,
    downsample: int = 8,
    replace_prob: float = 0.2,
    seed=0,
    kind: str = "log_probabilities",
    ignore_index: int = 255,
    clip: float = 1e-5,
) -> np.ndarray:
    """Degrade a ground-truth label map into a unary, as in the ConvCRF paper's synthetic task.

    Steps (all in float64, result cast to float32):

    1. One-hot encode ``label`` into (C, H, W). Pixels equal to ``ignore_index`` get the uniform
       distribution 1/C (they carry no information, so the unary should not favour any class).
    2. Downsample by ``downsample`` with area averaging: low-resolution cell (i, j) is the mean
       of the pixels in rows ``[i*d, (i+1)*d)`` and columns ``[j*d, (j+1)*d)``; the grid is
       ``ceil(H/d) x ceil(W/d)`` and a partial border cell averages only the pixels it covers.
    3. Pick exactly ``round(replace_prob * n_cells)`` distinct cells uniformly at random and
       replace each by the one-hot vector of a class drawn uniformly from ``[0, C)`` (the drawn
       class can coincide with the true one, so slightly fewer than that fraction change).
    4. Upsample bilinearly back to H x W, ``align_corners=False`` geometry: output pixel y reads
       the low-resolution grid at ``(y + 0.5)/d - 0.5``, clamped at the borders.
    5. Clip probabilities to ``>= clip`` and renormalise so each pixel sums to 1.
    6. Return log-probabilities (``kind="log_probabilities"``, every pixel's logsumexp over
       classes is 0) or the probabilities (``kind="probabilities"``).

    Random numbers come from ``numpy.random.default_rng(seed)``: the cell choice first, then the
    random classes, so the result is a deterministic function of (label, arguments).

    Parameters
    ----------
    label : array_like of int, shape (H, W)
        Ground-truth class ids in ``[0, num_classes)`` or ``ignore_index``.
    num_classes : int
        Number of classes C (>= 2).
    downsample : int, default 8
        Downsampling factor d (>= 1).
    replace_prob : float, default 0.2
        Fraction of low-resolution cells replaced by a random class, in [0, 1].
    seed : int, numpy.random.Generator or None, default 0
        Seed for ``numpy.random.default_rng``.
    kind : {"log_probabilities", "probabilities"}, default "log_probabilities"
        What to return.
    ignore_index : int, default 255
        Label value treated as unknown (uniform distribution).
    clip : float, default 1e-5
        Lower bound of each probability before renormalisation (keeps the log finite).

    Returns
    -------
    numpy.ndarray of float32, shape (C, H, W), C-contiguous
        Log-probabilities or probabilities.

    Notes
    -----
    With the defaults the argmax of the unary on PASCAL VOC images has roughly the quality the
    paper reports for its synthetic unaries (pixel accuracy ~0.85, mIoU ~0.5-0.6): errors come
    from the replaced cells and from blurred object boundaries.
    """
    lab = np.asarray(label.get() if type(label).__module__.split(".")[0] == "cupy" else label)
    if lab.ndim != 2:
        raise ValueError(f"label must be a 2-D (H, W) map of class ids; received shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"label must have an integer dtype; received dtype {lab.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; received {num_classes!r}")
    if isinstance(downsample, bool) or not isinstance(downsample, (int, np.integer)) or downsample < 1:
        raise ValueError(f"downsample must be an int >= 1; received {downsample!r}")
    if not (0.0 <= float(replace_prob) <= 1.0):
        raise ValueError(f"replace_prob must be in [0, 1]; received {replace_prob!r}")
    if kind not in ("log_probabilities", "probabilities"):
        raise ValueError(f"kind must be 'log_probabilities' or 'probabilities'; received {kind!r}")
    if not (0.0 < clip < 1.0 / num_classes):
        raise ValueError(f"clip must be in (0, 1/num_classes); received {clip!r}")
    num_classes = int(num_classes)
    h, w = lab.shape
    if h == 0 or w == 0:
        raise ValueError(f"label must be non-empty; received shape {lab.shape}")
    lab = lab.astype(np.int64)
    ignore = lab == ignore_index
    bad = ~ignore & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        raise ValueError(
            f"label contains value {int(lab[bad][0])}, outside [0, {num_classes}) and not "
            f"ignore_index={ignore_index}"
        )

    # 1. one-hot, ignore -> uniform
    onehot = np.zeros((num_classes, h, w), dtype=np.float64)
    rows, cols = np.nonzero(~ignore)
    onehot[lab[rows, cols], rows, cols] = 1.0
    onehot[:, ignore] = 1.0 / num_classes

    # 2. area downsample
    low = _area_downsample(onehot, int(downsample))

    # 3. replace a random subset of cells
    rng = np.random.default_rng(seed)
    n_cells = low.shape[1] * low.shape[2]
    k = int(round(float(replace_prob) * n_cells))
    if k > 0:
        cells = rng.choice(n_cells, size=k, replace=False)
        classes = rng.integers(0, num_classes, size=k)
        flat = low.reshape(num_classes, n_cells)  # a view: writes go into `low`
        flat[:, cells] = 0.0
        flat[classes, cells] = 1.0

    # 4. bilinear upsample (a convex combination, so each pixel still sums to 1)
    prob = _bilinear_upsample(low, int(downsample), (h, w))

    # 5. clip and renormalise
    prob = np.maximum(prob, clip)
    prob /= prob.sum(axis=0, keepdims=True)

    if kind == "probabilities":
        return np.ascontiguousarray(prob, dtype=np.float32)
    return np.ascontiguousarray(np.log(prob), dtype=np.float32)
