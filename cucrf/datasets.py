"""Loading labelled image pairs and making the paper's synthetic unaries.

Two pieces:

* :func:`load_pairs` reads a folder of ``<id>_image.png`` / ``<id>_label.png`` pairs (optionally
  with per-image unary files from another folder) into a list of :class:`Sample`;
  :class:`PairDataset` is the same folder as a lazy sequence that reads one pair per access (so
  hundreds of images are never held in memory at once), and :func:`load_split` reads a JSON
  split of the ids into train / validation / test.
* :func:`synthetic_unary` turns a ground-truth label map into a degraded unary, following the
  synthetic protocol of Teichmann & Cipolla (2018), "Convolutional CRFs for Semantic
  Segmentation", Sec. 5.1: downsample the one-hot label 8x, replace the labels of a random 20 %
  of the low-resolution cells with random classes, upsample bilinearly.
"""

from __future__ import annotations

import collections.abc
import json
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Sample", "PairDataset", "load_pairs", "load_split", "synthetic_unary", "SPLIT_SUBSETS", "CLASS_NAMES"]

_IMAGE_SUFFIX = "_image.png"

#: Class names of the data sets the evaluation knows, indexed by class id (255 is "ignore" in all).
CLASS_NAMES = {
    "voc": ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
            "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
            "tvmonitor"],
    "msrc": ["building", "grass", "tree", "cow", "horse", "sheep", "sky", "mountain", "aeroplane", "water", "face",
             "car", "bicycle", "flower", "sign", "bird", "book", "chair", "road", "cat", "dog", "body", "boat"],
    "camvid": ["sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
               "bicyclist"],
}
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
    index : int or None
        Position of the pair among all pairs of its folder, sorted by id (set by
        :class:`PairDataset`; seeds its synthetic unary), or None.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    unary: np.ndarray | None = None
    unary_path: Path | None = field(default=None, repr=False)
    index: int | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # arrays are too long for the default repr
        u = None if self.unary is None else f"{self.unary.shape} {self.unary.dtype}"
        return (
            f"Sample(name={self.name!r}, image={self.image.shape} {self.image.dtype}, "
            f"label={self.label.shape} {self.label.dtype}, unary={u})"
        )


#: The first bytes of the image formats the readers decode, and their names.
_SIGNATURES = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]
_PNM_MAGIC = (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")


def _image_format(path: Path, what: str) -> str:
    """The format of an image file from its first bytes; a ValueError when it is no image format read here."""
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if head[:2] in _PNM_MAGIC and head[2:3].isspace():
        return "PNM"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    shown = f"its first bytes are {head!r}" if head else "it is empty"
    raise ValueError(
        f"{what} {str(path)!r} is not an image: it does not start like a PNG, JPEG, GIF, BMP, TIFF, PNM or WebP "
        f"file ({shown}); expected an image file"
    )


def _decode(path: Path, what: str, **kwargs) -> np.ndarray:
    """Decode an image file into an array, one frame only, with errors that name the file.

    Multi-frame containers (GIF, TIFF) holding a single frame give that frame; several frames are
    a ValueError. ``kwargs`` go to :func:`imageio.v3.imread` (e.g. ``mode="P"``).
    """
    import imageio.v3 as iio

    kind = _image_format(path, what)
    try:
        props = iio.improps(path)
        frames = props.n_images if props.is_batch else None
        if frames is None or frames == 1:
            return np.asarray(iio.imread(path, index=0, **kwargs) if frames == 1 else iio.imread(path, **kwargs))
    except Exception as exc:  # decoders raise an assortment of types for broken files
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"cannot decode {what} {str(path)!r} as a {kind} image ({detail}); the file may be "
                         "truncated or corrupt") from exc
    raise ValueError(f"{what} {str(path)!r} holds {frames} frames (an animation or a multi-page file); expected "
                     "a single image")


def _read_image(path: Path) -> np.ndarray:
    img = _decode(path, "image file")
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
    _image_format(path, "label file")  # no image: say so before imageio tries every plugin on it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # metadata is a nicety: not worth a plugin's deprecation notice
            mode = iio.immeta(path, index=0).get("mode")
    except Exception:  # metadata is a nicety; fall back to a plain read
        pass
    lab = _decode(path, "label file", **({"mode": "P"} if mode == "P" else {}))
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


def _load_array(path: Path, what: str, pick=None):
    """The array of a .npy file, or ``pick(npz)`` of a .npz file, with errors that name the file.

    ``pick`` chooses the array name from the archive's names (None: the first); it may raise a
    ValueError of its own, passed on unchanged.
    """
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                name = pick(z.files) if pick is not None else z.files[0]
                return z[name]
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except _PickError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, IndexError) as exc:
        kind = "a .npz archive (numpy.savez)" if path.suffix.lower() == ".npz" else "a .npy array (numpy.save)"
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"cannot read {what} {str(path)!r} as {kind} ({type(exc).__name__}: {detail}); the file "
                         "may be truncated or corrupt") from exc


class _PickError(ValueError):
    """The archive is readable but holds no array that fits (passed on as it is)."""


def _pick_logits(path):
    def pick(files):
        if "logits" in files:
            return "logits"
        if len(files) == 1:
            return files[0]
        raise _PickError(f"unary file {path} holds arrays {files}; expected one named 'logits'")
    return pick


def _read_unary(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        arr = _load_array(path, "unary file")
    elif path.suffix == ".npz":
        arr = _load_array(path, "unary file", _pick_logits(path))
    else:
        raise ValueError(f"unary file {path} has suffix {path.suffix!r}; expected .npz or .npy")
    if arr.ndim != 3:
        raise ValueError(f"unary file {path} holds shape {arr.shape}; expected (C, H, W)")
    return arr


def _list_files(folder: Path) -> set:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist or is not a directory")
    return set(os.listdir(folder))


def _pair_ids(folder: Path, files=None) -> list[str]:
    """Sorted ids of every complete pair in ``folder``; an error for an empty folder or a lonely file."""
    files = _list_files(folder) if files is None else files
    image_ids = {f[: -len(_IMAGE_SUFFIX)] for f in files if f.endswith(_IMAGE_SUFFIX)}
    label_ids = {f[: -len(_LABEL_SUFFIX)] for f in files if f.endswith(_LABEL_SUFFIX)}
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
    return sorted(image_ids)


def _select_ids(folder: Path, names) -> list[str]:
    """``names`` (checked to have both files in ``folder``), or every pair's id, sorted."""
    files = _list_files(folder)
    if names is None:
        return _pair_ids(folder, files)
    ids = [str(n) for n in names]
    if not ids:
        raise ValueError("names is empty; expected at least one sample id")
    for i in ids:
        for suffix in (_IMAGE_SUFFIX, _LABEL_SUFFIX):
            if i + suffix not in files:
                raise FileNotFoundError(f"{i}{suffix} not found in {str(folder)!r}")
    return ids


def _check_unary_dir(unary_dir, unary_pattern):
    if unary_dir is None:
        return None
    unary_dir = Path(unary_dir)
    if not unary_dir.is_dir():
        raise FileNotFoundError(f"unary_dir {str(unary_dir)!r} does not exist or is not a directory")
    if not isinstance(unary_pattern, str) or "{name}" not in unary_pattern:
        raise ValueError(f"unary_pattern must contain '{{name}}'; received {unary_pattern!r}")
    return unary_dir


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
    ids = _select_ids(folder, names)
    unary_dir = _check_unary_dir(unary_dir, unary_pattern)

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


# -- lazy folder access ------------------------------------------------------------------------


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, from its header (the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, SyntaxError) as exc:  # Pillow raises SyntaxError for some corrupt files
        raise ValueError(f"cannot read image file {str(path)!r}: {exc}") from exc
    return int(h), int(w)


def _npy_header_shape(f) -> tuple:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, _ = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(int(n) for n in shape)


def _unary_shape(path: Path) -> tuple:
    """Shape of the array :func:`_read_unary` would return, read from the file's header only."""
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                shape = _npy_header_shape(f)
        elif path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                arrays = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
                if "logits" in arrays:
                    key = "logits"
                elif len(arrays) == 1:
                    key = arrays[0]
                else:
                    raise ValueError(f"unary file {path} holds arrays {arrays}; expected one named 'logits'")
                with z.open(key + ".npy") as f:
                    shape = _npy_header_shape(f)
        else:
            raise ValueError(f"unary file {path} has suffix {path.suffix!r}; expected .npz or .npy")
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read unary file {str(path)!r}: {exc}") from exc
    if len(shape) != 3:
        raise ValueError(f"unary file {path} holds shape {shape}; expected (C, H, W)")
    return shape


def _read_checked(read, path: Path, what: str):
    """``read(path)``; a file that cannot be decoded is a ValueError naming it."""
    try:
        return read(path)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc}") from exc


class _Column(collections.abc.Sequence):
    """One field (images, labels or unaries) of a :class:`PairDataset`, read on access."""

    def __init__(self, dataset: "PairDataset", reader: str):
        self._dataset = dataset
        self._reader = reader

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return _Column(self._dataset[i], self._reader)
        return getattr(self._dataset, self._reader)(i)

    def __repr__(self) -> str:
        return f"<{self._reader[5:]}s of {self._dataset!r}>"


class PairDataset(collections.abc.Sequence):
    """The labelled pairs of a folder as a lazy sequence: each access reads one pair from disk.

    ``dataset[i]`` is a :class:`Sample`; :attr:`images`, :attr:`labels` and :attr:`unaries`
    are sequences of the arrays alone (each item read when it is indexed), which is what
    :func:`cucrf.fit` takes. Memory stays bounded by one pair however many the folder holds.
    Construction only lists the folder and checks that every file exists; :meth:`check`
    validates sizes and class ids up front without keeping anything.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder of ``<id>_image.png`` / ``<id>_label.png`` pairs.
    names : iterable of str, optional
        Only these ids, in this order (default: every pair, sorted by id).
    unary_dir : str or os.PathLike, optional
        Folder of per-image unary files (as for :func:`load_pairs`).
    unary_pattern : str, default ``"{name}.npz"``
        File name of an image's unary inside ``unary_dir``; ``{name}`` is the id.
    synthetic : bool, default False
        Make each unary from its label with :func:`synthetic_unary` instead (needs
        ``num_classes``; seed ``seed + index``, where ``index`` is the pair's position among
        all pairs of the folder sorted by id, so a pair gets the same unary in any subset).
    num_classes : int, optional
        Number of classes: required with ``synthetic``; otherwise the expected class count
        used by :meth:`check`.
    downsample, replace_prob : optional
        The synthetic protocol (see :func:`synthetic_unary`).
    seed : int, default 0
        Base seed of the synthetic unaries.
    ignore_index : int, default 255
        Label value that marks unlabelled pixels.

    Attributes
    ----------
    folder : pathlib.Path
    names : tuple of str
        The ids, in order.
    indices : tuple of int
        Each id's position among all pairs of the folder, sorted by id.

    Examples
    --------
    >>> data = PairDataset("data/msrc", synthetic=True, num_classes=23)   # doctest: +SKIP
    >>> data.check()                                                       # doctest: +SKIP
    >>> cucrf.fit(data.unaries, data.images, data.labels)                  # doctest: +SKIP
    """

    def __init__(self, folder, *, names=None, unary_dir=None, unary_pattern: str = "{name}.npz",
                 synthetic: bool = False, num_classes=None, downsample: int = 8, replace_prob: float = 0.2,
                 seed: int = 0, ignore_index: int = 255):
        self.folder = Path(folder)
        ids = _select_ids(self.folder, names)
        self.unary_dir = _check_unary_dir(unary_dir, unary_pattern)
        self.unary_pattern = unary_pattern
        if synthetic and self.unary_dir is not None:
            raise ValueError("give either unary_dir or synthetic=True, not both")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                                        or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2; received {num_classes!r}")
        if synthetic and num_classes is None:
            raise ValueError("synthetic=True needs num_classes: the labels alone do not fix the number of classes")
        self.synthetic = bool(synthetic)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.downsample, self.replace_prob, self.seed = downsample, replace_prob, seed
        self.ignore_index = ignore_index
        if names is None:
            positions = range(len(ids))
        else:
            everything = {n: k for k, n in enumerate(sorted(
                f[: -len(_IMAGE_SUFFIX)] for f in os.listdir(self.folder) if f.endswith(_IMAGE_SUFFIX)))}
            positions = [everything[n] for n in ids]
        self.names = tuple(ids)
        self.indices = tuple(int(k) for k in positions)
        if self.unary_dir is not None:
            for n in self.names:
                path = self.unary_dir / unary_pattern.format(name=n)
                if not path.is_file():
                    raise FileNotFoundError(f"no unary for {n!r}: {str(path)!r} does not exist")
        self._label_cache = None

    # -- sequence protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def _position(self, i) -> int:
        import operator

        n = len(self.names)
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} pairs")
        return i

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(self.names[i])
        i = self._position(i)
        return Sample(name=self.names[i], image=self.read_image(i), label=self.read_label(i),
                      unary=self.read_unary(i), unary_path=self.unary_path(i), index=self.indices[i])

    def __repr__(self) -> str:
        if self.synthetic:
            unaries = f"synthetic unaries, {self.num_classes} classes"
        elif self.unary_dir is not None:
            unaries = f"unaries {str(self.unary_dir / self.unary_pattern)!r}"
        else:
            unaries = "no unaries"
        return f"PairDataset({str(self.folder)!r}, {len(self)} pairs, {unaries})"

    def subset(self, names) -> "PairDataset":
        """The pairs ``names`` (ids of this dataset, in the order given) with the same settings."""
        names = [str(n) for n in names]
        have = set(self.names)
        unknown = [n for n in names if n not in have]
        if unknown:
            raise ValueError(f"ids not in {self!r}: {', '.join(map(repr, unknown[:5]))}"
                             + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        out = object.__new__(PairDataset)
        out.__dict__.update(self.__dict__)
        where = {n: k for k, n in enumerate(self.names)}
        out.names = tuple(names)
        out.indices = tuple(self.indices[where[n]] for n in names)
        out._label_cache = None
        return out

    # -- files and reading -------------------------------------------------------------------
    def image_path(self, i) -> Path:
        """The image file of pair ``i``."""
        return self.folder / (self.names[self._position(i)] + _IMAGE_SUFFIX)

    def label_path(self, i) -> Path:
        """The label file of pair ``i``."""
        return self.folder / (self.names[self._position(i)] + _LABEL_SUFFIX)

    def unary_path(self, i):
        """The unary file of pair ``i``, or None (synthetic or no unaries)."""
        if self.unary_dir is None:
            return None
        return self.unary_dir / self.unary_pattern.format(name=self.names[self._position(i)])

    def read_image(self, i) -> np.ndarray:
        """The image of pair ``i``, (H, W, F), as stored."""
        return _read_checked(_read_image, self.image_path(i), "image file")

    def read_label(self, i) -> np.ndarray:
        """The label of pair ``i``, (H, W) integer class ids (the last one read is kept)."""
        i = self._position(i)
        if self._label_cache is not None and self._label_cache[0] == i:
            return self._label_cache[1]
        label = _read_checked(_read_label, self.label_path(i), "label file")
        self._label_cache = (i, label)
        return label

    def read_unary(self, i):
        """The unary of pair ``i``: (C, H, W), float32 when stored as float16 or synthetic; None without unaries."""
        i = self._position(i)
        if self.synthetic:
            return synthetic_unary(self.read_label(i), self.num_classes, downsample=self.downsample,
                                   replace_prob=self.replace_prob, seed=self.seed + self.indices[i],
                                   ignore_index=self.ignore_index)
        path = self.unary_path(i)
        if path is None:
            return None
        unary = _read_checked(_read_unary, path, "unary file")
        return unary.astype(np.float32) if unary.dtype == np.float16 else unary

    @property
    def images(self) -> collections.abc.Sequence:
        """The images, a lazy sequence."""
        return _Column(self, "read_image")

    @property
    def labels(self) -> collections.abc.Sequence:
        """The labels, a lazy sequence."""
        return _Column(self, "read_label")

    @property
    def unaries(self) -> collections.abc.Sequence:
        """The unaries, a lazy sequence (None items without unaries)."""
        return _Column(self, "read_unary")

    # -- checks ------------------------------------------------------------------------------
    def check(self, num_classes=None, *, name: str = "num_classes"):
        """Check every pair before use, keeping nothing in memory.

        Reads every label, and only the headers of the images and unary files: image, label
        and unary sizes must agree, every unary must have the same number of classes C and
        every label id must be in ``[0, C)`` or ``ignore_index``.

        Parameters
        ----------
        num_classes : int, optional
            The expected number of classes (default: the dataset's ``num_classes``, else the
            first unary's class count).
        name : str, default ``"num_classes"``
            How the class count is named in messages (e.g. ``"--num-classes"``).

        Returns
        -------
        int or None
            The number of classes; None when neither it nor unaries are known.

        Raises
        ------
        ValueError
            Naming the offending file, what it holds and what was expected.
        """
        if num_classes is None:
            num_classes = self.num_classes
        source = None if num_classes is None else f"{name} is {num_classes}"
        for i in range(len(self)):
            ipath, lpath, upath = self.image_path(i), self.label_path(i), self.unary_path(i)
            label = _read_checked(_read_label, lpath, "label file")
            size = _image_size(ipath)
            if size != label.shape:
                raise ValueError(f"size mismatch: image file {str(ipath)!r} is {size[0]}x{size[1]} (H x W) but "
                                 f"label file {str(lpath)!r} is {label.shape[0]}x{label.shape[1]}")
            if upath is not None:
                shape = _unary_shape(upath)
                if shape[1:] != label.shape:
                    raise ValueError(f"size mismatch: unary file {str(upath)!r} is {shape} (C, H, W) but label "
                                     f"file {str(lpath)!r} is {label.shape} (H, W)")
                if num_classes is None:
                    num_classes, source = shape[0], f"the unaries have {shape[0]} classes ({str(upath)!r})"
                elif shape[0] != num_classes:
                    raise ValueError(f"unary file {str(upath)!r} has {shape[0]} classes but {source}; every "
                                     "unary must have the same number of classes")
            if num_classes is not None:
                lab = label.astype(np.int64)
                bad = (lab != self.ignore_index) & ((lab < 0) | (lab >= num_classes))
                if bad.any():
                    raise ValueError(f"label file {str(lpath)!r} holds class id {int(lab[bad].max())} but {source}; "
                                     f"expected class ids in [0, {num_classes}) or {self.ignore_index} (ignored)")
        return num_classes


SPLIT_SUBSETS = ("train", "validation", "test")


def load_split(path, folder=None) -> dict:
    """Read a split of a folder's ids: a JSON object ``{"train": [ids], "validation": [ids], "test": [ids]}``.

    Parameters
    ----------
    path : str or os.PathLike
        The JSON file. Missing subsets are empty; no id may appear twice.
    folder : str or os.PathLike, optional
        When given, every id must name a pair in this folder (only file names are looked at).

    Returns
    -------
    dict
        ``{"train": [...], "validation": [...], "test": [...]}``, ids as str, in file order.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not such a JSON object, repeats an id, or names ids not in ``folder``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"split file {str(path)!r} is not valid JSON ({exc}); expected an object "
                         '{"train": [ids], "validation": [ids], "test": [ids]}') from exc
    if not isinstance(data, dict):
        raise ValueError(f"split file {str(path)!r} holds a JSON {type(data).__name__}; expected an object "
                         '{"train": [ids], "validation": [ids], "test": [ids]}')
    unknown = sorted(set(data) - set(SPLIT_SUBSETS))
    if unknown:
        raise ValueError(f"split file {str(path)!r} has key(s) {', '.join(map(repr, unknown))}; expected only "
                         f"{', '.join(map(repr, SPLIT_SUBSETS))}")
    split, seen = {}, {}
    for subset in SPLIT_SUBSETS:
        ids = data.get(subset, [])
        if not isinstance(ids, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in ids):
            raise ValueError(f"split file {str(path)!r}: {subset!r} must be a list of ids (strings); got "
                             f"{json.dumps(ids)[:80]}")
        ids = [str(x) for x in ids]
        for x in ids:
            if x in seen:
                where = "twice" if seen[x] == subset else f"in both {seen[x]!r} and {subset!r}"
                raise ValueError(f"split file {str(path)!r} names id {x!r} {where}; each id belongs to one subset")
            seen[x] = subset
        split[subset] = ids
    if folder is not None:
        have = set(_pair_ids(Path(folder)))
        for subset in SPLIT_SUBSETS:
            missing = [x for x in split[subset] if x not in have]
            if missing:
                more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                raise ValueError(f"split file {str(path)!r}: {subset!r} names id(s) "
                                 f"{', '.join(map(repr, missing[:5]))}{more} with no <id>_image.png / "
                                 f"<id>_label.png pair in {str(folder)!r}")
    return split


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
