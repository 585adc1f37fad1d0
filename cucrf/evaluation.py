"""Evaluation on labelled data: the ConvCRF paper's protocol, with DenseCRF side by side.

A *method* turns a unary and an image into a label map:

==================  ===========================================================================
``unary``           the argmax of the unary (no CRF)
``cucrf``           :func:`cucrf.infer` with its defaults (filter 5, blur 4)
``cucrf:KxB``       :func:`cucrf.infer` with ``filter_size=K``, ``blur=B``
``densecrf``        the fully connected CRF (pydensecrf2) with its usual parameters: Gaussian
                    sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10
``convcrf``         upstream ConvCRF's algorithm (:func:`cucrf.convcrf.infer`), its default
                    config (filter 11, blur 4)
``convcrf:KxB``     the same with ``filter_size=K``, ``blur=B``
==================  ===========================================================================

A cucrf method can also carry its own parameters (and feature transform) under a name of its
own, e.g. the output of ``cucrf fit``; :func:`named_methods` adds one such row per parameter
set, so several parameter files compare in one table.

All CRFs run ``iterations`` (default 5) mean-field iterations on the CPU (NumPy) and are timed
per image (the CRF call only; making or loading the unary is not counted). The unary is either
the paper's synthetic one (:func:`cucrf.datasets.synthetic_unary`: the label downsampled 8x,
20 % of the cells replaced by random classes, upsampled; log-probabilities, seed ``seed + i``
for the ``i``-th image of the set's folder in sorted order, also when only some of its images
are scored) or per-image logits from files. Every method
sees the same unary: cucrf and ConvCRF as logits, DenseCRF as ``log_softmax`` of it.

Scores are accumulated over the set (one confusion matrix over all its images, label 255
ignored): pixel accuracy, mean IoU over the classes present in the ground truth or the
prediction (``miou``), mean IoU over the classes present in the ground truth (``miou_gt``) and
per-class IoU.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import metrics

__all__ = [
    "KNOWN_SETS", "Method", "parse_methods", "named_methods", "run_method", "MethodScore", "SetResult",
    "make_unary", "evaluate_samples", "evaluate", "find_sets", "format_table", "write_csv",
]

#: Number of classes of the sets of the development data (folder name -> classes).
KNOWN_SETS = {"voc": 21, "msrc": 23, "camvid": 11}

#: DenseCRF's usual parameters (pydensecrf's README and the ConvCRF paper's FullCRF).
DENSECRF_PARAMS = dict(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13,
                       bilateral_compat=10)

_KINDS = ("unary", "cucrf", "densecrf", "convcrf")
_DEFAULT_WINDOWS = {"cucrf": None, "convcrf": (11, 4)}


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of turning a unary into labels.

    Attributes
    ----------
    kind : {"unary", "cucrf", "densecrf", "convcrf"}
    filter_size, blur : int or None
        The window of cucrf / convcrf.
    label : str or None
        The row's name in tables (default ``kind`` or ``kind:KxB``).
    params : CRFParams or None
        cucrf only: parameters of this row; None uses those given to :func:`run_method`.
    feature_transform : dict or None
        cucrf only: the feature transform of this row (as :func:`cucrf.infer` takes it).
    """

    kind: str
    filter_size: Optional[int] = None
    blur: Optional[int] = None
    label: Optional[str] = None
    params: object = dataclasses.field(default=None, compare=False, repr=False)
    feature_transform: object = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        if self.label is not None:
            return self.label
        if self.filter_size is None:
            return self.kind
        return f"{self.kind}:{self.filter_size}x{self.blur}"

    def __str__(self) -> str:
        return self.name


def parse_methods(spec) -> List[Method]:
    """Parse ``"unary,cucrf:5x4,cucrf:7x1,densecrf,convcrf:7x4"`` into :class:`Method` objects.

    ``cucrf`` alone uses cucrf's defaults (filter 5, blur 4); ``convcrf`` alone upstream's
    (filter 11, blur 4). Duplicates are dropped, the order is kept.
    """
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out: List[Method] = []
    for raw in items:
        text = str(raw).strip().lower()
        if not text:
            continue
        m = re.fullmatch(r"(unary|cucrf|densecrf|convcrf)(?::(\d+)x(\d+))?", text)
        if not m:
            raise ValueError(
                f"unknown method {raw.strip()!r}; expected unary, densecrf, cucrf, cucrf:KxB, convcrf or "
                "convcrf:KxB (K = odd filter size, B = blur), e.g. 'unary,cucrf:5x4,cucrf:7x1,densecrf'"
            )
        kind = m.group(1)
        if m.group(2) is None:
            method = Method(kind)
            if kind == "cucrf":
                from ._api import DEFAULT_BLUR, DEFAULT_FILTER_SIZE

                method = Method(kind, DEFAULT_FILTER_SIZE, DEFAULT_BLUR)
            elif kind == "convcrf":
                method = Method(kind, *_DEFAULT_WINDOWS["convcrf"])
        else:
            if kind in ("unary", "densecrf"):
                raise ValueError(f"method {raw.strip()!r}: {kind} takes no window (KxB)")
            k, b = int(m.group(2)), int(m.group(3))
            if k < 1 or k % 2 == 0:
                raise ValueError(f"method {raw.strip()!r}: the filter size K must be odd, got {k}")
            if b < 1:
                raise ValueError(f"method {raw.strip()!r}: the blur B must be >= 1, got {b}")
            method = Method(kind, k, b)
        if method not in out:
            out.append(method)
    if not out:
        raise ValueError("no method given; e.g. 'unary,cucrf,densecrf'")
    return out


_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*")


def named_methods(methods, named) -> List[Method]:
    """Add a cucrf row per named parameter set.

    Parameters
    ----------
    methods : list of Method
        The rows so far (e.g. from :func:`parse_methods`).
    named : dict
        ``{NAME: (params, feature_transform)}`` in the order wanted; ``params`` a
        :class:`cucrf.CRFParams`, ``feature_transform`` None or what :func:`cucrf.infer` takes.

    Returns
    -------
    list of Method
        ``methods`` followed by, for each NAME, the cucrf method with those parameters at each
        cucrf window of ``methods`` (cucrf's default window when there is none). The row is
        called NAME, or ``NAME:KxB`` when ``methods`` hold several cucrf windows.

    Raises
    ------
    ValueError
        If a NAME is not a plain identifier (letters, digits, ``_.+-``) or is already a row's name.
    """
    out = list(methods)
    windows = [(m.filter_size, m.blur) for m in out if m.kind == "cucrf" and m.params is None]
    windows = list(dict.fromkeys(windows))
    if not windows:
        from ._api import DEFAULT_BLUR, DEFAULT_FILTER_SIZE

        windows = [(DEFAULT_FILTER_SIZE, DEFAULT_BLUR)]
    taken = {m.name.lower() for m in out} | set(_KINDS)
    for name, (params, transform) in named.items():
        if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
            raise ValueError(f"parameter set name {name!r} must start with a letter or '_' and hold only letters, "
                             "digits and _.+-")
        for k, b in windows:
            label = name if len(windows) == 1 else f"{name}:{k}x{b}"
            if label.lower() in taken or name.lower() in _KINDS:
                raise ValueError(f"parameter set name {name!r} is already a method's name; choose another")
            taken.add(label.lower())
            out.append(Method("cucrf", k, b, label=label, params=params, feature_transform=transform))
    return out


def _log_softmax(u):
    u = np.asarray(u, dtype=np.float32)
    s = u - u.max(axis=0, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=0, keepdims=True))


def run_method(method: Method, unary, image, *, params=None, iterations: int = 5, feature_transform=None,
               include_self: bool = False):
    """Apply one method to one image.

    Parameters
    ----------
    method : Method
    unary : numpy.ndarray, shape (C, H, W)
        Class scores (logits or log-probabilities).
    image : numpy.ndarray, shape (H, W, F)
        The image (DenseCRF needs RGB uint8).
    params : CRFParams, optional
        cucrf's parameters (cucrf methods without parameters of their own).
    iterations : int
        Mean-field iterations.
    feature_transform : optional
        cucrf's feature transform (cucrf methods without parameters of their own; a method with
        its own parameters uses its own ``feature_transform``).
    include_self : bool
        cucrf methods: keep the centre of the window (see :func:`cucrf.infer`).

    Returns
    -------
    (labels, seconds)
        ``labels`` int64 (H, W); ``seconds`` the wall time of the CRF call (0 for ``unary``).
    """
    unary = np.asarray(unary)
    if unary.dtype == np.float16:
        unary = unary.astype(np.float32)
    if method.kind == "unary":
        return unary.argmax(axis=0).astype(np.int64), 0.0
    if method.kind == "cucrf":
        from ._api import infer

        if method.params is not None:
            params, feature_transform = method.params, method.feature_transform
        extra = {"include_self": True} if include_self else {}
        start = time.perf_counter()
        q = infer(unary, image, params, filter_size=method.filter_size, blur=method.blur, iterations=iterations,
                  feature_transform=feature_transform, **extra)
        labels = q.argmax(axis=0)
        return labels.astype(np.int64), time.perf_counter() - start
    if method.kind == "densecrf":
        from ._peers import densecrf_infer

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"densecrf needs RGB uint8 images (H, W, 3); got {image.shape} {image.dtype}")
        logprob = _log_softmax(unary)
        start = time.perf_counter()
        q = densecrf_infer(logprob, image, iterations=iterations, **DENSECRF_PARAMS)
        labels = q.argmax(axis=0)
        return labels.astype(np.int64), time.perf_counter() - start
    if method.kind == "convcrf":
        from . import convcrf

        u = np.ascontiguousarray(unary[None], dtype=np.float32)
        img = np.ascontiguousarray(np.moveaxis(image, -1, 0)[None], dtype=np.float32)
        start = time.perf_counter()
        out = convcrf.infer(u, img, {"filter_size": method.filter_size, "blur": method.blur}, num_iter=iterations)
        labels = out[0].argmax(axis=0)
        return labels.astype(np.int64), time.perf_counter() - start
    raise ValueError(f"unknown method kind {method.kind!r}")  # pragma: no cover


@dataclasses.dataclass
class MethodScore:
    """What one method scored on one set (accumulated over its images)."""

    method: str
    cm: np.ndarray
    seconds: float = 0.0
    images: int = 0

    @property
    def accuracy(self) -> float:
        return metrics.pixel_accuracy(self.cm)

    @property
    def miou(self) -> float:
        """Mean IoU over classes in the ground truth or the prediction."""
        return metrics.mean_iou(self.cm, classes="gt_or_pred")

    @property
    def miou_gt(self) -> float:
        """Mean IoU over classes in the ground truth."""
        return metrics.mean_iou(self.cm, classes="gt")

    @property
    def per_class_iou(self) -> np.ndarray:
        return metrics.per_class_iou(self.cm)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images if self.images else float("nan")


@dataclasses.dataclass
class SetResult:
    """Every method's score on one set of images with one kind of unary."""

    name: str
    unaries: str
    num_classes: int
    images: List[str]
    scores: Dict[str, MethodScore]
    seed: Optional[int] = None

    def __getitem__(self, method) -> MethodScore:
        return self.scores[str(method)]


def make_unary(sample, index: int, num_classes: int, unaries: str = "synthetic", *, seed: int = 0,
               downsample: int = 8, replace_prob: float = 0.2) -> np.ndarray:
    """The (C, H, W) float32 unary of a sample: synthetic (seed ``seed + index``) or its loaded logits."""
    if unaries == "synthetic":
        from .datasets import synthetic_unary

        return synthetic_unary(sample.label, num_classes, downsample=downsample, replace_prob=replace_prob,
                               seed=seed + index)
    if sample.unary is None:
        raise ValueError(f"sample {sample.name!r} has no unary loaded (unaries={unaries!r})")
    if sample.unary.shape[0] != num_classes:
        raise ValueError(f"unary of {sample.name!r} has {sample.unary.shape[0]} classes, expected {num_classes}")
    return np.asarray(sample.unary, dtype=np.float32)


def evaluate_samples(samples, num_classes: int, methods, *, name: str = "data", unaries: str = "synthetic",
                     seed: int = 0, downsample: int = 8, replace_prob: float = 0.2, params=None,
                     iterations: int = 5, progress: bool = False, on_prediction=None, feature_transform=None,
                     include_self: bool = False) -> SetResult:
    """Score every method on a sequence of :class:`cucrf.datasets.Sample`.

    Parameters
    ----------
    samples : sequence of Sample
        A list, or a :class:`cucrf.datasets.PairDataset` (read one pair at a time).
    num_classes : int
    methods : str or list of Method
    name, unaries : str
        Labels of the result (``unaries`` = ``'synthetic'`` makes the paper's synthetic unaries;
        anything else uses ``sample.unary``).
    seed, downsample, replace_prob
        The synthetic protocol: seed ``seed + sample.index`` when the sample knows its position
        in its folder (:class:`~cucrf.datasets.PairDataset`), else ``seed + i`` for the ``i``-th
        sample.
    params : CRFParams, optional
        Parameters of the cucrf methods that have none of their own.
    iterations : int
    progress : bool
        Show a tqdm progress bar on stderr.
    on_prediction : callable, optional
        Called as ``on_prediction(index, sample, unary, method, labels)`` after every method on
        every image (e.g. to keep example outputs).
    feature_transform : optional
        Feature transform of the cucrf methods that have no parameters of their own.
    include_self : bool
        cucrf methods: keep the centre of the window.

    Returns
    -------
    SetResult
    """
    methods = parse_methods(methods) if isinstance(methods, str) else list(methods)
    if not samples:
        raise ValueError(f"set {name!r} holds no images")
    scores = {m.name: MethodScore(m.name, np.zeros((num_classes, num_classes), dtype=np.int64)) for m in methods}
    bar = None
    names = []
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples) * len(methods), desc=f"{name} ({unaries})", unit="run", file=sys.stderr,
                   dynamic_ncols=True, leave=False)
    try:
        for i, sample in enumerate(samples):
            names.append(sample.name)
            position = getattr(sample, "index", None)
            unary = make_unary(sample, i if position is None else position, num_classes, unaries, seed=seed,
                               downsample=downsample, replace_prob=replace_prob)
            for m in methods:
                if bar is not None:
                    bar.set_postfix_str(f"{sample.name} {m.name}", refresh=False)
                try:
                    labels, seconds = run_method(m, unary, sample.image, params=params, iterations=iterations,
                                                 feature_transform=feature_transform, include_self=include_self)
                except (ValueError, TypeError) as exc:
                    raise type(exc)(f"{name}/{sample.name}, {m.name}: {exc}") from exc
                s = scores[m.name]
                s.cm += metrics.confusion_matrix(labels, sample.label, num_classes, ignore_index=255)
                s.seconds += seconds
                s.images += 1
                if on_prediction is not None:
                    on_prediction(i, sample, unary, m, labels)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return SetResult(name, unaries, num_classes, names, scores,
                     seed if unaries == "synthetic" else None)


def _has_pairs(folder: Path) -> bool:
    try:
        return any(f.endswith("_image.png") for f in os.listdir(folder))
    except OSError:
        return False


def find_sets(data, sets=None) -> List[Path]:
    """The folders to evaluate: ``data/<set>`` for each name in ``sets``; without ``sets``, ``data``
    itself when it holds image/label pairs, else its subfolders named like :data:`KNOWN_SETS`."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {str(data)!r} does not exist or is not a directory")
    if sets:
        out = []
        for s in sets:
            p = data / s
            if not p.is_dir():
                have = sorted(d.name for d in data.iterdir() if d.is_dir() and _has_pairs(d))
                raise FileNotFoundError(f"no set {s!r} in {str(data)!r} (sets there: {', '.join(have) or 'none'})")
            out.append(p)
        return out
    if _has_pairs(data):
        return [data]
    out = [data / s for s in KNOWN_SETS if _has_pairs(data / s)]
    if not out:
        raise FileNotFoundError(f"{str(data)!r} holds no <id>_image.png / <id>_label.png pairs and none of the "
                                f"subfolders {', '.join(KNOWN_SETS)}; name the sets with --set")
    return out


def _num_classes(name, samples, given, unaries):
    if given is not None:
        return int(given)
    if name in KNOWN_SETS:
        return KNOWN_SETS[name]
    if unaries != "synthetic":
        return int(samples[0].unary.shape[0])
    labels = samples.labels if hasattr(samples, "labels") else [s.label for s in samples]
    largest = max(int(lab[lab != 255].max(initial=0)) for lab in labels)
    return max(largest + 1, 2)


def evaluate(data, sets=None, methods="unary,cucrf,densecrf", *, unaries="synthetic", unary_dir=None,
             num_classes=None, max_images=None, seed=0, downsample=8, replace_prob=0.2, params=None,
             iterations=5, progress=False, on_prediction=None, names=None, feature_transform=None,
             include_self=False) -> List[SetResult]:
    """Evaluate methods on every set of a data folder (see :func:`find_sets`).

    Parameters
    ----------
    data : str or os.PathLike
        A folder of pairs, or of sets (see :func:`find_sets`).
    sets : list of str, optional
        Subfolders of ``data`` to evaluate.
    methods : str or list of Method
    unaries : str
        ``'synthetic'`` uses the paper's synthetic unaries; any other name ``NAME`` loads
        ``<unary_dir>/<id>_NAME.npz``.
    unary_dir : str or os.PathLike, optional
        Default ``<data>/unaries``.
    num_classes : int, optional
        Default: :data:`KNOWN_SETS` by folder name, else the unaries' class count, else the
        largest label + 1.
    max_images : int, optional
        Keep the first N images of each set (sorted by id, or in the order of ``names``).
    seed, downsample, replace_prob, params, iterations, progress, on_prediction,
    feature_transform, include_self
        As for :func:`evaluate_samples`.
    names : list of str, optional
        Score only these ids (e.g. one subset of a split); needs a single set.

    Returns
    -------
    list of SetResult
        One per set. Images are read one at a time (:class:`cucrf.datasets.PairDataset`).
    """
    from .datasets import PairDataset

    methods = parse_methods(methods) if isinstance(methods, str) else list(methods)
    folders = find_sets(data, sets)
    if names is not None and len(folders) != 1:
        raise ValueError(f"names selects images of one set, but {len(folders)} sets are evaluated "
                         f"({', '.join(f.name for f in folders)}); name a single set")
    results = []
    for folder in folders:
        kwargs = {}
        if unaries != "synthetic":
            udir = Path(unary_dir) if unary_dir is not None else Path(data) / "unaries"
            kwargs = dict(unary_dir=udir, unary_pattern="{name}_" + unaries + ".npz")
        ids = list(names) if names is not None else None
        if max_images is not None:
            if ids is None:
                ids = sorted(f[:-len("_image.png")] for f in os.listdir(folder) if f.endswith("_image.png"))
            ids = ids[:max_images]
        samples = PairDataset(folder, names=ids, **kwargs)
        name = folder.name
        c = _num_classes(name, samples, num_classes, unaries)
        results.append(evaluate_samples(samples, c, methods, name=name, unaries=unaries, seed=seed,
                                        downsample=downsample, replace_prob=replace_prob, params=params,
                                        iterations=iterations, progress=progress, on_prediction=on_prediction,
                                        feature_transform=feature_transform, include_self=include_self))
    return results


def _pct(x):
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def format_table(results: Sequence[SetResult], per_class: bool = False) -> str:
    """Plain-text tables, one per set: accuracy, both mIoUs, gain over the unary, seconds per image."""
    lines = []
    for r in results:
        unary = r.scores.get("unary")
        width = max([14] + [len(m) + 2 for m in r.scores])
        what = (f"synthetic unaries, seed {r.seed}" if r.unaries == "synthetic" else f"unaries {r.unaries}")
        lines.append(f"{r.name}: {len(r.images)} images, {r.num_classes} classes, {what}")
        lines.append(f"  {'method':<{width}}{'pixel acc %':>12}{'mIoU %':>9}{'mIoU(gt) %':>12}{'gain':>8}"
                     f"{'s/image':>10}")
        for s in r.scores.values():
            gain = "" if unary is None else f"{100 * (s.miou - unary.miou):+.2f}"
            sec = "-" if s.method == "unary" else f"{s.seconds_per_image:.3f}"
            lines.append(f"  {s.method:<{width}}{_pct(s.accuracy):>12}{_pct(s.miou):>9}{_pct(s.miou_gt):>12}"
                         f"{gain:>8}{sec:>10}")
        if per_class:
            lines.append(f"  {'IoU % / class':<{width}}" + "".join(f"{c:>6}" for c in range(r.num_classes)))
            for s in r.scores.values():
                lines.append(f"  {s.method:<{width}}" + "".join(
                    f"{100 * v:>6.1f}" if math.isfinite(v) else f"{'-':>6}" for v in s.per_class_iou))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


CSV_FIELDS = ["set", "unaries", "seed", "method", "images", "num_classes", "pixel_accuracy", "miou", "miou_gt",
              "miou_gain", "seconds_per_image"]


def write_csv(results: Sequence[SetResult], path) -> None:
    """One row per (set, unaries, method); per-class IoU in columns ``iou_0`` ... (empty where undefined)."""
    width = max(r.num_classes for r in results) if results else 0
    fields = CSV_FIELDS + [f"iou_{c}" for c in range(width)]
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            unary = r.scores.get("unary")
            for s in r.scores.values():
                row = {
                    "set": r.name, "unaries": r.unaries, "seed": "" if r.seed is None else r.seed,
                    "method": s.method, "images": s.images, "num_classes": r.num_classes,
                    "pixel_accuracy": f"{s.accuracy:.6f}", "miou": f"{s.miou:.6f}", "miou_gt": f"{s.miou_gt:.6f}",
                    "miou_gain": "" if unary is None else f"{s.miou - unary.miou:.6f}",
                    "seconds_per_image": "" if s.method == "unary" else f"{s.seconds_per_image:.6f}",
                }
                for c, v in enumerate(s.per_class_iou):
                    row[f"iou_{c}"] = f"{v:.6f}" if math.isfinite(v) else ""
                writer.writerow(row)
