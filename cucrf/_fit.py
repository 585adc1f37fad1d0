"""Learning CRF parameters from labelled images: :func:`cucrf.fit`.

The parts live in :mod:`cucrf._learning` (data, objective, parameters, selection, checkpoint,
trainer); this module drives them:

1. read and check every sample once (before any training);
2. decide how candidates are scored: a held-out validation set, or cross-validation for tiny sets;
3. score the start (epoch 0), then per epoch: Adam steps over minibatches, a validation score,
   the best epoch so far, a checkpoint, early stopping;
4. return the best epoch's parameters, or the exact starting parameters when no epoch beat them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import logging
import math
import os
import time
from typing import Optional

import numpy as np

from . import _api, _meanfield
from ._learning import checkpoint as _checkpoint
from ._learning import data as _data
from ._learning import parameters as _parameters
from ._learning import selection as _selection
from ._learning import trainer as _trainer
from ._learning.data import batches as _batches_of_shapes
from ._learning.objective import balanced_class_weights, cross_entropy
from ._learning.parameters import DEFAULT_LEARN, LEARNABLE, TrainingDivergedError
from ._params import CRFParams
from .optim import Adam

__all__ = ["fit", "FitResult", "FeatureTransform", "LEARNABLE", "DEFAULT_LEARN", "METRICS",
           "TrainingDivergedError", "cross_entropy"]

logger = logging.getLogger("cucrf.fit")

#: Validation metrics :func:`fit` can select by.
METRICS = tuple(_selection.METRICS)
#: With at least this many images (and ``val_fraction='auto'``), a quarter is held out for validation;
#: with fewer, candidates are scored by leave-one-out cross-validation.
MIN_HOLDOUT_IMAGES = 8
DEFAULT_METRIC = "miou_gt"
DEFAULT_LR = 0.01
DEFAULT_PRIOR = 0.01
#: The selected epoch must beat the start by more than this (half a point of mIoU).
DEFAULT_MIN_IMPROVEMENT = 0.005


@dataclasses.dataclass
class FeatureTransform:
    """A per-pixel linear map of the image channels, ``f' = matrix @ f + offset`` (the paper's "+T").

    Pass it to :func:`cucrf.infer` as ``feature_transform=``.

    Attributes
    ----------
    matrix : numpy.ndarray of float64, shape (F', F)
    offset : numpy.ndarray of float64, shape (F',)
    """

    matrix: np.ndarray
    offset: np.ndarray

    @classmethod
    def identity(cls, num_channels):
        return cls(np.eye(num_channels), np.zeros(num_channels))

    def to_dict(self):
        return {"matrix": np.asarray(self.matrix).tolist(), "offset": np.asarray(self.offset).tolist()}

    @classmethod
    def from_dict(cls, data):
        return cls(np.array(data["matrix"], dtype=np.float64), np.array(data.get("offset", [0.0] * len(data["matrix"])),
                                                                         dtype=np.float64))


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    params : CRFParams
        The selected parameters: those of the epoch with the best validation score, or the
        starting ``params`` object itself (bit-identical, Potts stays Potts) when no epoch beat it.
    feature_transform : FeatureTransform or None
        The feature transform belonging to ``params`` (pass it to :func:`cucrf.infer` as
        ``feature_transform=``); the starting one (None without) when no epoch beat the start.
    history : list of dict
        One entry per epoch, epoch 0 being the start: ``epoch``, ``train_loss``, ``val_loss``,
        ``val_accuracy``, ``val_miou``, ``val_miou_gt`` (None without validation), ``score`` (the
        selection metric's value), ``lr``, ``seconds``, ``images``, ``temperature``. With
        cross-validation the validation entries pool the held-out predictions of every fold.
    best_epoch : int
        The selected epoch (0: the start).
    improved : bool
        Whether an epoch beat the start (``params`` is then not the start).
    metric : str
        The selection metric.
    temperature : float
        The learned output temperature: ``softmax(logits / temperature)`` of
        ``infer(..., output='logits')`` are calibrated probabilities. It never changes the argmax.
    validation : str
        How candidates were scored, in words: N of M images held out, N validation images given,
        leave-one-out cross-validation over N images, the training image itself (one image), or
        no validation.
    """

    params: CRFParams
    feature_transform: Optional[FeatureTransform]
    history: list
    best_epoch: int
    improved: bool = False
    metric: str = DEFAULT_METRIC
    temperature: float = 1.0
    validation: str = "none"

    def to_dict(self):
        return {"params": self.params.to_dict(),
                "feature_transform": None if self.feature_transform is None else self.feature_transform.to_dict(),
                "best_epoch": self.best_epoch, "improved": self.improved, "metric": self.metric,
                "temperature": self.temperature, "validation": self.validation, "history": self.history}

    def save(self, path):
        """Write :meth:`to_dict` as JSON (atomically)."""
        _checkpoint.atomic_write(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8"))


# -------------------------------------------------------------------------------------------------
# argument checks
# -------------------------------------------------------------------------------------------------
def _check_learn(learn):
    if isinstance(learn, str):
        learn = (learn,)
    try:
        learn = tuple(learn)
    except TypeError:
        raise TypeError(f"learn must be a sequence of names from {list(LEARNABLE)}, got {learn!r}") from None
    unknown = [x for x in learn if x not in LEARNABLE]
    if unknown:
        raise ValueError(f"learn holds unknown name(s) {unknown}; choose from {list(LEARNABLE)}")
    if not learn:
        raise ValueError(f"learn is empty; choose at least one of {list(LEARNABLE)}")
    return learn


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(name, value, lo=None, lo_open=False, hi=None, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo)) and (
        hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        raise ValueError(f"{name} must be a finite number {' and '.join(s for s in (lo_s, hi_s) if s)}, got {value!r}")
    return value


def _check_class_weights(class_weights, C):
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be None, 'balanced' or {C} non-negative numbers, "
                             f"got {class_weights!r}")
        return "balanced"
    expected = f"class_weights must be None, 'balanced' or {C} finite non-negative numbers (one per class)"
    if isinstance(class_weights, (collections.abc.Mapping, collections.abc.Set)):
        raise TypeError(f"{expected}, got a {type(class_weights).__name__}")
    try:
        w = np.asarray(class_weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{expected}, got {class_weights!r}") from None
    if w.shape != (C,) or not np.isfinite(w).all() or (w < 0).any():
        got = w.tolist() if w.size <= 32 else f"an array of shape {w.shape}"
        raise ValueError(f"class_weights must be {C} finite non-negative numbers (one per class), got {got}")
    if not (w > 0).any():
        raise ValueError("class_weights are all zero, so no pixel would count; give at least one class a "
                         "positive weight")
    return w


def _cosine_schedule(total_steps, warmup_steps):
    """Linear warm-up, then cosine decay to a tenth of the learning rate at ``total_steps``."""
    def schedule(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        t = min((step - warmup_steps) / span, 1.0)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))
    return schedule


class _Say:
    """Log lines to logger 'cucrf.fit'; printed above the progress bars when nothing else shows them."""

    def __init__(self, progress):
        self.echo = progress and not logger.hasHandlers()

    def __call__(self, text, level=logging.INFO):
        logger.log(level, text)
        if self.echo:
            from tqdm import tqdm

            tqdm.write(text)


def _fmt(entry):
    parts = [f"epoch {entry['epoch']}"]
    if entry.get("train_loss") is not None:
        parts.append(f"train loss {entry['train_loss']:.4f}")
    if entry.get("val_accuracy") is not None:
        parts.append(f"val loss {entry['val_loss']:.4f}, accuracy {100 * entry['val_accuracy']:.2f} %, "
                     f"mIoU {100 * entry['val_miou']:.2f} %, mIoU (gt classes) {100 * entry['val_miou_gt']:.2f} %")
    return ", ".join(parts)


# -------------------------------------------------------------------------------------------------
# one training run: epoch 0 (the start), then epochs of steps, scores, selection, checkpoints
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    history: list
    best_vec: dict
    selection: _selection.Selection


def _train_run(trainer, train, val, vec_start, settings, say, *, stop_at=None, ckpt=None, resume_state=None,
               signature=None, callback=None, label=""):
    """Train from ``vec_start`` on ``train``, scoring ``val`` (a data set, or None) after every epoch.

    ``resume_state`` is a checkpoint already read and checked (:func:`_checkpoint.load`).
    """
    s = settings
    selection = _selection.Selection(s["metric"], s["patience"] if val is not None else None, s["min_improvement"],
                                     s["guard"])
    units = _parameters.scales(vec_start)
    z_start = {k: vec_start[k] / units[k] for k in trainer.keys}
    steps_per_epoch = len(_batches_of_shapes(train.shapes, s["batch_size"], np.random.default_rng(0)))
    schedule = s["lr_schedule"]
    if schedule == "cosine":
        schedule = _cosine_schedule(s["epochs"] * steps_per_epoch, min(steps_per_epoch, 20))
    optimizer = Adam(lr=s["lr"], weight_decay=s["weight_decay"], schedule=schedule)
    last = s["epochs"] if stop_at is None else stop_at
    progress = s["progress"]

    if resume_state is not None:
        state = resume_state
        meta = state["meta"]
        vec = {k: state["vec"][k] for k in vec_start}
        best_vec = {k: state["best_vec"][k] for k in vec_start}
        optimizer.load_state_dict(state["optimizer"])
        history = meta["history"]
        selection.load(meta["selection"])
        trainer.step_count = optimizer.t
        say(f"resuming at epoch {meta['epoch'] + 1} from {os.fspath(ckpt)} (epochs 0-{meta['epoch']} done)")
    else:
        t0 = time.perf_counter()
        vec, train_scores = trainer.start_temperature(vec_start, train, progress=progress)
        val_scores = trainer.evaluate(vec, val, progress=progress, desc="epoch 0: validation") if val else None
        first = _trainer.entry(0, train_scores["val_loss"], val_scores, None, _trainer.elapsed(t0), 0, vec)
        history = [first]
        selection.update(first)
        best_vec = vec
        say(f"{label}{_fmt(first)} (the start)")
        if callback is not None:
            callback(_trainer.public([first])[0])

    while len(history) <= last:
        epoch = len(history)
        if val is not None and selection.should_stop:
            say(f"{label}stopping early: no better {s['metric']} for {selection.patience} epochs")
            break
        t0 = time.perf_counter()
        order = _batches_of_shapes(train.shapes, s["batch_size"], np.random.default_rng([s["seed"], epoch]))
        vec, train_loss, images = trainer.epoch(vec, optimizer, train, order, units=units, z_start=z_start,
                                                progress=progress, desc=f"{label}epoch {epoch}/{last}")
        val_scores = trainer.evaluate(vec, val) if val is not None else None
        e = _trainer.entry(epoch, train_loss, val_scores, optimizer.current_lr(max(optimizer.t - 1, 0)),
                           _trainer.elapsed(t0), images, vec)
        history.append(e)
        if val is None:
            selection.best_epoch = epoch
            best_vec = vec
        elif selection.update(e):
            best_vec = vec
        if ckpt is not None:
            _checkpoint.save(ckpt, {
                "vec": vec, "best_vec": best_vec, "optimizer": optimizer.state_dict(),
                "meta": {"epoch": epoch, "history": _trainer.public(history), "selection": selection.state(),
                         "signature": signature}})
        say(f"{label}{_fmt(e)}" + (" (best so far)" if selection.best_epoch == epoch and val is not None else ""))
        if callback is not None:
            callback(_trainer.public([e])[0])
    return _Run(history, best_vec, selection)


# -------------------------------------------------------------------------------------------------
# fit
# -------------------------------------------------------------------------------------------------
def fit(unaries, images, labels, params=None, *, validation=None, val_fraction="auto", metric=DEFAULT_METRIC,
        patience=3, min_improvement=DEFAULT_MIN_IMPROVEMENT, guard=True, learn=DEFAULT_LEARN, epochs=10, lr=DEFAULT_LR,
        lr_schedule="cosine",
        batch_size=1, class_weights=None, ignore_index=255, temperature=True, prior=DEFAULT_PRIOR,
        lovasz=0.0, filter_size=_api.DEFAULT_FILTER_SIZE, blur=_api.DEFAULT_BLUR, iterations=_api.DEFAULT_ITERATIONS,
        normalization=None, include_self=False, feature_transform=None, num_classes=None, dtype=np.float32,
        device=None, weight_decay=0.0, seed=0, progress=True, checkpoint=None, resume=False, callback=None,
        spatial_dims=None, spacing=None):
    """Learn CRF parameters from labelled images by back-propagation through mean-field inference.

    Minimises the cross-entropy of the CRF output at a learned output temperature (plus a weak
    prior toward the starting parameters) with Adam, scores a segmentation metric on held-out
    images after every epoch, stops early, and returns the best epoch's parameters, or the
    starting parameters themselves when no epoch beat them. See docs/learning.md for the
    measurements behind the defaults.

    Parameters
    ----------
    unaries : sequence or iterable of arrays (C, H, W), or (C, D, H, W) volumes
        Per-image class scores (logits or log-probabilities). A Sequence (a list, a (N, C, H, W)
        array, or a lazy reader with ``len`` and indexing) is indexed again every epoch, so a lazy
        one keeps memory bounded; a one-shot iterable is read into memory once.
    images : sequence or iterable of arrays (H, W, F), or (D, H, W, F) volumes
        The matching images (uint8 or float); sizes may differ between images.
    labels : sequence or iterable of integer arrays (H, W), or (D, H, W) volumes
        Ground-truth class ids in ``[0, C)``; ``ignore_index`` pixels do not count.
    params : CRFParams or dict, optional
        Starting parameters (default ``CRFParams()``).
    validation : (unaries, images, labels), optional
        A held-out set to score candidates on (instead of ``val_fraction``).
    val_fraction : 'auto' or float in [0, 1)
        ``'auto'``: with at least 8 images hold out a quarter (at least 2) for validation; with 2
        to 7 images score candidates by leave-one-out cross-validation and then train on all;
        with one image score the training image itself. A number holds out that fraction; 0 turns
        validation off (the last epoch is returned).
    metric : {'miou_gt', 'miou', 'accuracy', 'loss'}
        Validation score that selects the epoch: mIoU over the classes in the ground truth (the
        default: on a few validation images it predicts the test mIoU better than the standard
        mIoU, see docs/learning.md), mIoU over the classes in the ground truth or the prediction,
        pixel accuracy, or the loss.
    patience : int or None
        Stop after this many epochs in a row without a better validation score (None: never).
    min_improvement : float
        The selected epoch must beat the start by more than this, in the metric's units, with 8
        validation images (0.005: half a point of mIoU); with n images the margin is
        ``min_improvement * sqrt(8 / n)``, as the noise of a score averaged over n images.
    guard : bool
        An epoch is eligible only when its validation accuracy, mIoU and mIoU over ground-truth
        classes are all at least the start's (so a fitted CRF never trades one for another).
    learn : sequence of str
        From ``'weights'``, ``'bandwidths'`` (as logarithms), ``'compatibility'`` (a full C x C
        matrix, starting from ``1 - I`` for Potts), ``'unary_weight'``, ``'feature_transform'``
        (the matrix ``A`` of ``f' = A f + c`` on the image channels; the offset ``c`` is kept,
        as the kernels only see differences of features).
    epochs : int
        At most this many passes over the training images (0 only scores the start).
    lr : float
        Adam's learning rate, in relative units: bandwidths are logarithms and weights are
        divided by their starting magnitude.
    lr_schedule : 'cosine', callable or None
        ``'cosine'``: linear warm-up over the first epoch (at most 20 steps), then cosine decay to
        ``lr / 10`` at the last epoch. A callable ``step -> factor`` multiplies ``lr``; None keeps it.
    batch_size : int
        Images per step; only images of the same size are batched together.
    class_weights : None, 'balanced' or (C,) array_like
        Weight of each class in the loss; ``'balanced'`` is median-frequency balancing from the
        training labels.
    ignore_index : int
        Label value that does not count (default 255); it must lie outside ``[0, C)``.
    temperature : bool
        Learn an output temperature for the loss (recommended: it absorbs calibration, so the CRF
        parameters are fitted for the segmentation). False uses the raw logits.
    prior : float
        Strength of a Gaussian prior pulling the learned variables toward their start (per
        labelled pixel, in the optimiser's relative units); 0 turns it off.
    lovasz : float
        Weight of the Lovász-softmax loss (Berman et al., 2018; the convex surrogate of 1 - IoU per
        class, absent classes included) added to the training loss; 0 turns it off.
    filter_size, blur, iterations, normalization, include_self, spatial_dims, spacing
        As for :func:`cucrf.infer`; the learned parameters belong to these settings. Volumes
        need ``spatial_dims=3``.
    feature_transform : FeatureTransform, dict or (matrix, offset), optional
        Starting (or, without ``'feature_transform'`` in ``learn``, fixed) feature transform.
    num_classes : int, optional
        When given, every unary must have this many classes.
    dtype : numpy.float32 or numpy.float64
        Compute precision.
    device : {None, 'cpu', 'gpu'}
        As for :func:`cucrf.infer`; CuPy arrays (or device='gpu') train on the GPU.
    weight_decay : float
        Decoupled weight decay of Adam.
    seed : int
        Seeds the image order of every epoch and the validation split (an integer >= 0).
    progress : bool
        Progress bars (tqdm); the per-epoch lines also go to the logger ``cucrf.fit`` (INFO).
    checkpoint : path, optional
        A ``.npz`` written atomically after every epoch (with cross-validation: of the final run).
    resume : bool
        Continue from ``checkpoint`` when it exists. Every setting must match: the options, the
        starting parameters and feature transform, the class weights, and the data (the number of
        training images and the labelled pixels per class); the error names the first that differs.
    callback : callable, optional
        Called as ``callback(entry)`` with each epoch's history entry.

    Returns
    -------
    FitResult
        ``.params``, ``.feature_transform``, ``.history``, ``.best_epoch``, ``.improved``,
        ``.metric``, ``.temperature``, ``.validation``.

    Raises
    ------
    TrainingDivergedError
        (a ValueError) when a step produces a non-finite loss or parameter: lower ``lr``.

    Examples
    --------
    >>> import numpy as np, cucrf
    >>> rng = np.random.default_rng(0)
    >>> label = np.zeros((24, 32), dtype=np.uint8); label[:, 16:] = 1
    >>> image = np.where(label[..., None] == 1, 200, 40).astype(np.uint8).repeat(3, axis=2)
    >>> unary = np.stack([label == 0, label == 1]).astype(np.float32) + rng.normal(size=(2, 24, 32))
    >>> result = cucrf.fit([unary], [image], [label], epochs=2, blur=2, progress=False)
    >>> len(result.history) <= 3, isinstance(result.params, cucrf.CRFParams), result.validation[:9]
    (True, True, 'one image')
    """
    # -- settings ---------------------------------------------------------------------------------
    learn = _check_learn(learn)
    epochs = _positive_int("epochs", epochs, minimum=0)
    batch_size = _positive_int("batch_size", batch_size)
    if patience is not None:
        patience = _positive_int("patience", patience)
    min_improvement = _number("min_improvement", min_improvement, lo=0)
    lr = _number("lr", lr, lo=0, lo_open=True)
    prior = _number("prior", prior, lo=0)
    lovasz = _number("lovasz", lovasz, lo=0)
    weight_decay = _number("weight_decay", weight_decay, lo=0)
    if lr * weight_decay >= 1:
        raise ValueError(f"weight_decay * lr must be < 1 (each step multiplies the learned variables by "
                         f"1 - lr * weight_decay), got weight_decay={weight_decay:g} with lr={lr:g}")
    if not isinstance(metric, str) or metric not in _selection.METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if not (lr_schedule is None or lr_schedule == "cosine" or callable(lr_schedule)):
        raise TypeError(f"lr_schedule must be 'cosine', a callable step -> factor, or None, got {lr_schedule!r}")
    if not isinstance(guard, (bool, np.bool_)):
        raise TypeError(f"guard must be True or False, got {guard!r}")
    if not isinstance(temperature, (bool, np.bool_)):
        raise TypeError(f"temperature must be True or False, got {temperature!r}")
    if not isinstance(include_self, (bool, np.bool_)):
        raise TypeError(f"include_self must be True or False, got {include_self!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    seed = _positive_int("seed", seed, minimum=0)
    for name, flag in (("progress", progress), ("resume", resume)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if not (val_fraction == "auto" if isinstance(val_fraction, str) else
            isinstance(val_fraction, (int, float, np.integer, np.floating)) and not isinstance(val_fraction, bool)
            and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be 'auto' or a number in [0, 1), got {val_fraction!r}")
    if num_classes is not None:
        num_classes = _positive_int("num_classes", num_classes, minimum=2)
    try:
        dtype_ok = dtype is None or np.dtype(dtype) in (np.float32, np.float64)
    except TypeError:
        dtype_ok = False
    if not dtype_ok:
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {dtype!r}")
    if checkpoint is None and resume:
        raise ValueError("resume=True needs a checkpoint path")
    if checkpoint is not None:
        _checkpoint.check_path(checkpoint)
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if params is None:
        params = CRFParams()
    elif isinstance(params, dict):
        params = CRFParams.from_dict(params)
    if not isinstance(params, CRFParams):
        raise TypeError(f"params must be a cucrf.CRFParams, a dict or None, got {type(params).__name__}")
    if validation is not None and (not isinstance(validation, (tuple, list)) or len(validation) != 3):
        got = (f"a {type(validation).__name__} of {len(validation)}" if isinstance(validation, (tuple, list))
               else f"a {type(validation).__name__}")
        raise TypeError(f"validation must be a tuple (unaries, images, labels) of three sequences, got {got}")
    say = _Say(progress)

    # -- data: every sample read and checked once, before any training ----------------------------
    prepare_kwargs = dict(filter_size=filter_size, blur=blur, iterations=iterations, normalization=normalization,
                          include_self=bool(include_self), dtype=dtype, device=device, spatial_dims=spatial_dims,
                          spacing=spacing)
    in_memory = all(isinstance(x, (list, tuple, np.ndarray)) for x in (unaries, images, labels))
    everything = _data.Dataset("", unaries, images, labels, prepare_kwargs, ignore_index, num_classes,
                               cache=in_memory).scan(progress, "checking the training images")
    C, F = everything.num_classes, everything.num_channels
    given_val = None
    if validation is not None:
        val_in_memory = all(isinstance(x, (list, tuple, np.ndarray)) for x in validation)
        given_val = _data.Dataset("validation ", *validation, prepare_kwargs, ignore_index, C, cache=val_in_memory,
                                  classes_from="the training unaries have")
        given_val.scan(progress, "checking the validation images")
        if given_val.num_channels != F:
            raise ValueError(f"validation images have {given_val.num_channels} channels but the training images {F}")
    if 0 <= ignore_index < C:
        raise ValueError(f"ignore_index {ignore_index} is one of the {C} classes [0, {C}): its pixels would be "
                         f"neither learned nor scored; pass an ignore_index outside [0, {C}) (default 255)")
    class_weights_given = class_weights
    class_weights = _check_class_weights(class_weights, C)
    if isinstance(class_weights, str):
        class_weights = balanced_class_weights(everything.class_pixels)
    elif class_weights is not None and not (class_weights[everything.class_pixels > 0] > 0).any():
        raise ValueError(f"class_weights give weight 0 to every class in the training labels (classes "
                         f"{np.flatnonzero(everything.class_pixels).tolist()}), so no pixel would count; give one "
                         "of them a positive weight")

    transform = None
    if feature_transform is not None:
        transform = FeatureTransform(*_api.check_feature_transform(feature_transform, F))
    elif "feature_transform" in learn:
        transform = FeatureTransform.identity(F)
    F_out = F if transform is None else transform.matrix.shape[0]
    params = _api._check_params(params, C, F_out)
    vec_start = _parameters.initial_vector(params, C, transform)
    if temperature:
        vec_start["log_temperature"] = np.array(0.0)
    keys = _parameters.learned_keys(learn, vec_start)
    backend = _api.get_backend(everything.library)
    _meanfield.check_backward_support(backend)

    def configs(shape):
        return _api.check_config(filter_size, blur, iterations, normalization, tuple(shape), keep_centre=include_self,
                                 spacing=spacing)

    trainer = _trainer.Trainer(backend, configs, params, keys, learn_temperature=temperature, prior_strength=prior,
                               class_weights=class_weights, ignore_index=ignore_index, num_classes=C,
                               lovasz_weight=lovasz)
    settings = dict(metric=metric, patience=patience, min_improvement=min_improvement, guard=bool(guard),
                    epochs=epochs, lr=lr,
                    lr_schedule=lr_schedule, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                    progress=progress)

    # -- how candidates are scored ----------------------------------------------------------------
    n = len(everything)
    if given_val is not None:
        mode, train, val = "given", everything, given_val
    elif val_fraction == "auto" and n >= MIN_HOLDOUT_IMAGES or not isinstance(val_fraction, str) and val_fraction > 0:
        n_val = max(2, int(round(n / 4))) if isinstance(val_fraction, str) else int(round(val_fraction * n))
        if n_val < 1 or n_val >= n:
            raise ValueError(f"val_fraction={val_fraction} of {n} image(s) leaves no validation or no training "
                             "image; pass more images, another val_fraction, or validation=")
        order = np.random.default_rng(seed).permutation(n)
        mode = "holdout"
        train, val = _data.Subset(everything, sorted(order[n_val:])), _data.Subset(everything, sorted(order[:n_val]))
    elif val_fraction == "auto" and n >= 2:
        mode, train, val = "cross-validation", everything, None
    elif val_fraction == "auto":
        mode, train, val = "training images", everything, everything
    else:
        mode, train, val = "none", everything, None
    # The margin is set for 8 validation images and grows as 1/sqrt(n) for fewer: the noise of a
    # score averaged over n images (on 4 VOC images a 0.5-point gain did not carry over).
    n_scored = n if mode == "cross-validation" else len(val) if val is not None else MIN_HOLDOUT_IMAGES
    settings["min_improvement"] = min_improvement * math.sqrt(MIN_HOLDOUT_IMAGES / n_scored)
    description = {"given": f"{len(val or [])} validation images given", "holdout": f"{len(val or [])} of {n} images "
                   "held out for validation", "cross-validation": f"leave-one-out cross-validation over {n} images",
                   "training images": "one image: candidates are scored on the training image itself",
                   "none": "no validation: the last epoch is returned"}[mode]
    say(f"fitting {', '.join(learn)} on {len(train)} images ({description}); selecting by {metric}")
    as_json = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)
    signature = {"learn": sorted(learn), "classes": C, "channels": F, "filter_size": as_json(filter_size),
                 "blur": as_json(blur), "iterations": iterations, "normalization": normalization, "include_self": include_self,
                 "train_images": len(train), "validation": mode, "metric": metric, "epochs": epochs, "lr": lr,
                 "lr_schedule": lr_schedule if isinstance(lr_schedule, str) or lr_schedule is None else "custom",
                 "batch_size": batch_size, "seed": seed, "temperature": bool(temperature), "prior": prior,
                 "lovasz": lovasz,
                 "patience": patience, "min_improvement": min_improvement, "guard": bool(guard),
                 "params": params.to_dict(), "feature_transform": None if transform is None else transform.to_dict(),
                 "class_weights": ("balanced" if isinstance(class_weights_given, str)
                                   else None if class_weights is None else class_weights.tolist()),
                 "ignore_index": int(ignore_index), "dtype": None if dtype is None else np.dtype(dtype).name,
                 "weight_decay": weight_decay, "class_pixels": everything.class_pixels.tolist()}
    if spatial_dims == 3 or spacing is not None:  # 2-D checkpoints keep their signature
        signature["spatial_dims"] = spatial_dims
        signature["spacing"] = as_json(spacing)

    # -- a checkpoint to resume from is read and checked before any training ----------------------
    resume_state = None
    if resume and os.path.exists(os.fspath(checkpoint)):
        resume_state = _checkpoint.load(checkpoint)
        differs = _checkpoint.signature_difference(resume_state["meta"].get("signature", {}), signature)
        if differs:
            raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} was written with other settings ({differs}); "
                             "delete it, pass resume=False, or use the settings it was written with")
        missing = sorted(set(vec_start) - set(resume_state["vec"]) | set(vec_start) - set(resume_state["best_vec"]))
        if missing:
            raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} lacks the parameter(s) {missing}; delete it or "
                             "pass resume=False")

    # -- train ------------------------------------------------------------------------------------
    if mode == "cross-validation":
        history, best_epoch, best_vec = _cross_validate(trainer, everything, vec_start, settings, say, checkpoint,
                                                        resume_state, signature, callback)
    else:
        run = _train_run(trainer, train, val, vec_start, settings, say, ckpt=checkpoint, resume_state=resume_state,
                         signature=signature, callback=callback)
        history, best_epoch, best_vec = run.history, run.selection.best_epoch, run.best_vec

    # -- the result -------------------------------------------------------------------------------
    improved = best_epoch > 0
    temperature_value = float(np.exp(best_vec.get("log_temperature", 0.0)))
    if improved:
        best_params = _parameters.to_params(best_vec, params, keys)
        best_transform = None
        if "transform_matrix" in best_vec:
            best_transform = FeatureTransform(np.array(best_vec["transform_matrix"]),
                                              np.array(best_vec["transform_offset"]))
        if mode == "none":
            say(f"no validation: returning the last epoch ({best_epoch})")
        else:
            say(f"selected epoch {best_epoch} ({metric} {_score_text(history, 0)} -> "
                f"{_score_text(history, best_epoch)})")
    else:
        best_params = params
        best_transform = feature_transform if isinstance(feature_transform, FeatureTransform) else (
            None if feature_transform is None else transform)
        if epochs > 0:
            say(f"no epoch beat the start on the validation {metric}; returning the starting parameters unchanged",
                logging.WARNING)
        else:
            say("epochs=0: returning the starting parameters unchanged")
    return FitResult(best_params, best_transform, _trainer.public(history), best_epoch, improved, metric,
                     temperature_value, description)


def _score_text(history, epoch):
    for h in history:
        if h["epoch"] == epoch and h.get("score") is not None:
            return f"{h['score']:.4f}"
    return "n/a"


def _cross_validate(trainer, everything, vec_start, settings, say, checkpoint, resume_state, signature, callback):
    """Leave-one-out: per epoch, the held-out predictions of every fold pooled; then all images for the best count."""
    n = len(everything)
    folds = []
    quiet = dict(settings, patience=None, progress=False)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        run = _train_run(trainer, _data.Subset(everything, others), _data.Subset(everything, [i]), vec_start, quiet,
                         lambda text, level=logging.DEBUG: logger.log(logging.DEBUG, text), label=f"fold {i + 1}/{n}: ")
        folds.append(run.history)
        say(f"fold {i + 1}/{n} done")
    pooled = _selection.pooled_history(folds)
    choice = _selection.Selection(settings["metric"], None, settings["min_improvement"], settings["guard"])
    for e in pooled:
        e.update(score=None, lr=None, seconds=None, images=None, temperature=None)
        choice.update(e)
        say(f"cross-validated {_fmt(e)}")
        if callback is not None:
            callback(_trainer.public([e])[0])
    best_epoch = choice.best_epoch
    if best_epoch == 0:
        # the start is kept: its temperature is the one picked on all the images
        return pooled, 0, trainer.start_temperature(vec_start, everything)[0]
    say(f"training on all {n} images for {best_epoch} epoch(s), the cross-validated best")
    final = _train_run(trainer, everything, None, vec_start, settings, say, stop_at=best_epoch, ckpt=checkpoint,
                       resume_state=resume_state, signature=signature)
    for e, f in zip(pooled, final.history):
        e.update(train_loss=f["train_loss"], lr=f["lr"], seconds=f["seconds"], images=f["images"],
                 temperature=f["temperature"])
    return pooled, best_epoch, final.best_vec
