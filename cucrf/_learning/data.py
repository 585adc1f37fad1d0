"""Training data for :func:`cucrf.fit`: samples read lazily, checked once up front.

A data set is three parallel sequences (unaries, images, labels). A ``Sequence`` (anything with
``len`` and integer indexing: a list, a batch array, a lazy reader of a folder) is indexed again
every epoch, so a lazy one keeps memory bounded by a minibatch; a one-shot iterable (a
generator) is materialised once.
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Optional

import numpy as np

from .. import _api


@dataclasses.dataclass
class Sample:
    """One prepared training image."""

    unary: object      # (1, C, *spatial), compute dtype, NumPy or CuPy
    features: object   # (1, F, *spatial), compute dtype: image channels before any feature transform
    label: np.ndarray  # (*spatial) int64: (H, W), or (D, H, W) for volumes
    library: str       # 'numpy' or 'cupy'


#: Dimensions of one item: a bare array of this many dimensions is one image, not a sequence.
_ITEM_NDIM = {"unaries": (3, "(C, H, W)", "(N, C, H, W)"), "images": (3, "(H, W, F)", "(N, H, W, F)"),
              "labels": (2, "(H, W)", "(N, H, W)")}


_SINGULAR = {"unaries": "unary", "images": "image", "labels": "label"}


def _indexable(value):
    """Whether ``value`` has ``len`` and integer indexing (and is not a mapping)."""
    if hasattr(value, "ndim") and hasattr(value, "shape"):
        return True
    if isinstance(value, collections.abc.Mapping):
        return False
    return isinstance(value, collections.abc.Sequence) or (hasattr(value, "__len__") and hasattr(value, "__getitem__"))


def failure(where, exc):
    """``exc`` as a new exception whose message starts with ``where`` (raise it ``from exc``).

    The type is kept when it can be rebuilt from one message (OSError, ValueError, ...); a
    KeyError becomes a LookupError (a KeyError would quote the whole message); any other type
    becomes a RuntimeError that names it.
    """
    if isinstance(exc, KeyError):
        reason = exc.args[0] if len(exc.args) == 1 else exc
        return LookupError(f"{where}: {reason}")
    text = f"{where}: {exc}"
    try:
        new = type(exc)(text)
    except Exception:
        new = None
    if new is None or str(new) != text:
        return RuntimeError(f"{where}: {type(exc).__name__}: {exc}")
    return new


def as_sequence(name, value, limit=None, volumes=False):
    """``value`` as something with ``len`` and integer indexing, or a clear TypeError.

    Parameters
    ----------
    name : str
        The argument's name, for messages.
    value : sequence, batch array or iterable
    limit : (int, str), optional
        ``(n, other)``: the length of another argument ``other``. A one-shot iterable is read
        for at most ``n + 1`` items, so an endless generator is a length error, not a hang.
    volumes : bool
        Items are volumes (one more spatial axis), for the shapes a bare batch array must have.
    """
    expected = f"{name} must be a sequence or iterable of arrays (one per image)"
    if value is None:
        raise TypeError(f"{expected}, got None")
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{expected}, got a string")
    if isinstance(value, (collections.abc.Mapping, collections.abc.Set)):
        raise TypeError(f"{expected}, got a {type(value).__name__} (an unordered or keyed collection); pass a list")
    if hasattr(value, "ndim") and hasattr(value, "shape"):
        item_ndim, one, many = _ITEM_NDIM.get(name.split("_")[-1], (None, "", ""))
        if item_ndim is not None and volumes:
            item_ndim, one, many = item_ndim + 1, one.replace("(H", "(D, H"), many.replace(" H", " D, H")
        if item_ndim is not None and value.ndim != item_ndim + 1:
            raise TypeError(f"{name} must be a sequence of arrays (one per image) or one {many} array, got a bare "
                            f"array of shape {tuple(value.shape)}"
                            + (f"; for a single image pass [{_SINGULAR[name.split('_')[-1]]}] (a list "
                               f"of one {one} array)" if value.ndim == item_ndim else ""))
        return value  # a batch array: item i is image i
    if _indexable(value):
        return value  # indexed lazily, again every epoch
    try:
        iterator = iter(value)
    except TypeError:
        raise TypeError(f"{expected}, got {type(value).__name__}") from None
    items = []
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return items
        except Exception as exc:  # a generator failing midway: say which argument and item
            raise failure(f"{name}: reading item {len(items)} failed", exc) from exc
        items.append(item)
        if limit is not None and len(items) > limit[0]:
            raise ValueError(f"{name} yields more items than {limit[1]} has ({limit[0]}); expected one item per "
                             "image in each")


class Dataset:
    """Parallel unaries, images and labels, each sample checked as :func:`cucrf.infer` would.

    Parameters
    ----------
    what : str
        ``''`` for training data, ``'validation '`` for the validation set (used in messages).
    unaries, images, labels : sequences (see :func:`as_sequence`)
    prepare_kwargs : dict
        Settings for ``_api._prepare_inputs`` (filter size, blur, iterations, ..., dtype, device).
    ignore_index : int
    num_classes : int or None
        When given, every unary must have this many classes.
    cache : bool
        Keep prepared samples (only sensible when the inputs are in memory anyway).
    classes_from : str, optional
        Where ``num_classes`` came from, for messages (default: ``'num_classes is'``).
    """

    def __init__(self, what, unaries, images, labels, prepare_kwargs, ignore_index, num_classes=None, cache=True,
                 classes_from=None):
        self.what = what
        self.classes_from = classes_from
        names = [f"{what}{part}".replace(" ", "_") for part in ("unaries", "images", "labels")]
        given = (unaries, images, labels)
        known = [(len(v), name) for v, name in zip(given, names) if v is not None and _indexable(v)]
        limit = max(known) if known else None
        volumes = prepare_kwargs.get("spatial_dims") == 3
        self.unaries, self.images, self.labels = (as_sequence(name, v, limit, volumes) for v, name in zip(given, names))
        n = (len(self.unaries), len(self.images), len(self.labels))
        if n[0] == 0:
            raise ValueError(f"{what}unaries is empty; expected at least one image")
        if len(set(n)) != 1:
            raise ValueError(f"{what}unaries, {what}images and {what}labels must have the same length, got "
                             f"{n[0]}, {n[1]} and {n[2]}")
        self.prepare_kwargs = prepare_kwargs
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self._num_classes_given = num_classes is not None
        self.num_channels: Optional[int] = None
        self.library: Optional[str] = None
        self.shapes: list = []
        self.class_pixels: Optional[np.ndarray] = None
        self._cache = {} if cache else None

    def __len__(self):
        return len(self.unaries)

    def where(self, i):
        return f"{self.what or 'training '}sample {i}"

    def load(self, i) -> Sample:
        """Sample ``i``, prepared (and checked) as :func:`cucrf.infer` would."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        where = self.where(i)
        try:
            u, im, lab = self.unaries[i], self.images[i], self.labels[i]
        except Exception as exc:  # a lazy reader failing: say which sample
            raise failure(where, exc) from exc
        if getattr(getattr(u, "dtype", None), "kind", None) in ("b", "i", "u"):
            raise TypeError(f"{where}: unary must hold float class scores (logits), got dtype {u.dtype}; for a "
                            "label map use cucrf.unary_from_labels(label_map, num_classes)")
        for what, array in (("unary", u), ("image", im)):
            if isinstance(array, np.ma.MaskedArray):
                raise TypeError(f"{where}: {what} is a masked array, whose mask cucrf would ignore; pass a plain "
                                f"array ({what}.filled(...)) and mark unknown pixels in the label with ignore_index")
        try:
            prep = _api._prepare_inputs(
                u, im, None, unary_kind="logits", num_classes=None, confidence=0.5, unknown_label=None,
                clip=1e-5, output="logits", feature_transform=None, training=True, **self.prepare_kwargs)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        if prep.batched:
            one = "(C, H, W)" if prep.unary.ndim == 4 else "(C, D, H, W)"
            raise ValueError(f"{where}: unary must be one image {one}, got shape {tuple(np.shape(u))}")
        C = prep.unary.shape[1]
        size = tuple(prep.unary.shape[2:])
        F = prep.image_features.shape[1]
        if self.num_classes is None:
            self.num_classes = C
        elif C != self.num_classes:
            raise ValueError(f"{where}: unary has {C} classes but {self._classes_source()} {self.num_classes}")
        if self.num_channels is None:
            self.num_channels, self.library = F, prep.library
        elif F != self.num_channels:
            raise ValueError(f"{where}: image has {F} channels but sample 0 has {self.num_channels}")
        elif prep.library != self.library:
            raise TypeError(f"{where}: arrays are {prep.library} arrays but sample 0's are {self.library} arrays")
        lab = check_label(where, lab, size, C, self.ignore_index)
        sample = Sample(prep.unary, prep.image_features, lab, prep.library)
        if self._cache is not None:
            self._cache[i] = sample
        return sample

    def _classes_source(self):
        if not self._num_classes_given:
            return "sample 0 has"
        return self.classes_from or "num_classes is"

    def scan(self, progress=False, desc="checking"):
        """Read every sample once: all checks before any training, shapes and class counts."""
        from tqdm import tqdm

        shapes, counts = [], None
        for i in tqdm(range(len(self)), desc=desc, unit="image", disable=not progress, leave=False):
            s = self.load(i)
            shapes.append(tuple(s.label.shape))
            valid = s.label[s.label != self.ignore_index]
            c = np.bincount(valid, minlength=self.num_classes)
            counts = c if counts is None else counts + c
        if counts.sum() == 0:
            raise ValueError(f"{self.what}labels have no labelled pixel: every pixel is the ignore index "
                             f"{self.ignore_index}; pass labels with class ids in [0, {self.num_classes}) or set "
                             "ignore_index")
        self.shapes, self.class_pixels = shapes, counts
        return self


def check_label(where, label, shape, num_classes, ignore_index):
    """The label as int64 of the unary's spatial ``shape``, or a clear error naming the sample."""
    lab = label.get() if type(label).__module__.split(".")[0] == "cupy" else label
    if isinstance(lab, np.ma.MaskedArray):
        raise TypeError(f"{where}: label is a masked array; mark unlabelled pixels with ignore_index instead")
    lab = np.asarray(lab)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"{where}: label must hold integer class ids, got dtype {lab.dtype}")
    if lab.shape != shape:
        raise ValueError(f"{where}: label has shape {lab.shape} but the unary is {'x'.join(map(str, shape))}; "
                         f"expected {tuple(shape)}")
    lab = lab.astype(np.int64)
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        raise ValueError(f"{where}: label holds class id {int(lab[bad][0])}, outside [0, {num_classes}) and not "
                         f"the ignore index {ignore_index}")
    return lab


class Subset:
    """The samples ``indices`` of a :class:`Dataset` (a validation split, a cross-validation fold)."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.shapes = [dataset.shapes[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def load(self, j):
        return self.dataset.load(self.indices[j])


def batches(shapes, batch_size, rng):
    """Groups of up to ``batch_size`` indices of equal-size samples, in a random order.

    Parameters
    ----------
    shapes : list of (H, W)
    batch_size : int
    rng : numpy.random.Generator
    """
    by_size = {}
    for i in rng.permutation(len(shapes)):
        by_size.setdefault(tuple(shapes[i]), []).append(int(i))
    groups = []
    for idx in by_size.values():
        groups += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    order = rng.permutation(len(groups))
    return [groups[j] for j in order]
