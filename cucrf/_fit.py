"""Learning CRF parameters from labelled images: :func:`cucrf.fit`.

The loss is the mean cross-entropy of the CRF's output (the logits of the last mean-field
iteration) against the labels; its gradient flows back through the unrolled iterations
(:func:`cucrf._meanfield.mean_field_backward`) to every learnable parameter, and Adam
(:class:`cucrf.optim.Adam`) takes the steps. Positive bandwidths are optimised as ``log theta``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from typing import Optional

import numpy as np

from . import _api, _meanfield
from ._params import CRFParams
from .metrics import SegmentationScore
from .optim import Adam

__all__ = ["fit", "FitResult", "FeatureTransform", "LEARNABLE", "DEFAULT_LEARN"]

#: Everything :func:`fit` can learn.
LEARNABLE = ("weights", "bandwidths", "compatibility", "unary_weight", "feature_transform")
#: What :func:`fit` learns unless told otherwise.
DEFAULT_LEARN = ("weights", "bandwidths", "compatibility", "unary_weight")

_CHECKPOINT_VERSION = 1


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
        The best parameters: those of the epoch with the highest validation mIoU (the starting
        parameters count as epoch 0), or the last epoch's without a validation set.
    feature_transform : FeatureTransform or None
        The learned (or given) feature transform belonging to ``params``; pass it to
        :func:`cucrf.infer` as ``feature_transform=``. None when none was used.
    history : list of dict
        One entry per epoch, epoch 0 being the starting parameters: ``epoch``, ``train_loss``
        (mean over the epoch's steps; at epoch 0 the loss of the starting parameters),
        ``val_loss``, ``val_accuracy``, ``val_miou`` (None without a validation set), ``lr``
        (of the epoch's last step), ``seconds`` (wall time of the epoch) and ``images``.
    best_epoch : int
    """

    params: CRFParams
    feature_transform: Optional[FeatureTransform]
    history: list
    best_epoch: int

    def to_dict(self):
        return {"params": self.params.to_dict(),
                "feature_transform": None if self.feature_transform is None else self.feature_transform.to_dict(),
                "best_epoch": self.best_epoch, "history": self.history}

    def save(self, path):
        """Write :meth:`to_dict` as JSON (atomically)."""
        _atomic_write(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8"))


# -------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Sample:
    unary: object     # (1, C, H, W) compute dtype
    features: object  # (1, F, H, W) compute dtype (image channels, before the transform)
    label: np.ndarray  # (H, W) int64
    library: str


def _as_list(name, value):
    if value is None:
        raise TypeError(f"{name} must be a sequence or iterable of arrays, got None")
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a sequence or iterable of arrays, got a string")
    if hasattr(value, "ndim") and hasattr(value, "shape"):
        return [value[i] for i in range(value.shape[0])]  # a batch array: one item per image
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence or iterable of arrays, got {type(value).__name__}") from None


def _load_samples(what, unaries, images, labels, config_kwargs, dtype, device, ignore_index):
    unaries, images, labels = (_as_list(f"{what}unaries", unaries), _as_list(f"{what}images", images),
                               _as_list(f"{what}labels", labels))
    if not unaries:
        raise ValueError(f"{what}unaries is empty; expected at least one image")
    if not (len(unaries) == len(images) == len(labels)):
        raise ValueError(f"{what}unaries, {what}images and {what}labels must have the same length, got "
                         f"{len(unaries)}, {len(images)} and {len(labels)}")
    samples = []
    classes = channels = None
    for i, (u, im, lab) in enumerate(zip(unaries, images, labels)):
        where = f"{what or 'training '}sample {i}"
        try:
            prep = _api._prepare_inputs(
                u, im, None, unary_kind="logits", num_classes=None, confidence=0.5, unknown_label=None,
                clip=1e-5, output="logits", dtype=dtype, device=device, feature_transform=None, training=True,
                **config_kwargs,
            )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        if prep.batched:
            raise ValueError(f"{where}: unary must be one image (C, H, W), got shape {tuple(np.shape(u))}")
        C, H, W = prep.unary.shape[1:]
        F = prep.image_features.shape[1]
        if classes is None:
            classes, channels = C, F
        elif C != classes:
            raise ValueError(f"{where}: unary has {C} classes but sample 0 has {classes}")
        elif F != channels:
            raise ValueError(f"{where}: image has {F} channels but sample 0 has {channels}")
        lab = lab.get() if type(lab).__module__.split(".")[0] == "cupy" else np.asarray(lab)
        if lab.dtype.kind not in "iu":
            raise TypeError(f"{where}: label must hold integer class ids, got dtype {lab.dtype}")
        if lab.shape != (H, W):
            raise ValueError(f"{where}: label has shape {lab.shape} but the unary is {H}x{W}; expected ({H}, {W})")
        lab = lab.astype(np.int64)
        bad = (lab != ignore_index) & ((lab < 0) | (lab >= C))
        if bad.any():
            raise ValueError(f"{where}: label holds class id {int(lab[bad][0])}, outside [0, {C}) and not the "
                             f"ignore index {ignore_index}")
        samples.append(_Sample(prep.unary, prep.image_features, lab, prep.library))
    return samples, classes, channels


def _batches(samples, batch_size, rng):
    """Groups of up to ``batch_size`` equal-size samples, in a random order."""
    by_size = {}
    for i in rng.permutation(len(samples)):
        by_size.setdefault(tuple(samples[i].label.shape), []).append(int(i))
    groups = []
    for idx in by_size.values():
        groups += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    order = rng.permutation(len(groups))
    return [groups[j] for j in order]


# -------------------------------------------------------------------------------------------------
# parameters as a dict of float64 arrays
# -------------------------------------------------------------------------------------------------
def _initial_vector(params, C, F, transform):
    vec = {
        "appearance_weight": np.array(params.appearance_weight),
        "smoothness_weight": np.array(params.smoothness_weight),
        "log_theta_alpha": np.array(math.log(params.theta_alpha)),
        "log_theta_beta": (np.array(math.log(params.theta_beta)) if isinstance(params.theta_beta, float)
                           else np.log(np.array(params.theta_beta))),
        "log_theta_gamma": np.array(math.log(params.theta_gamma)),
        "compatibility": params.compatibility_matrix(C),
        "unary_weight": np.array(params.unary_weight),
    }
    if transform is not None:
        vec["transform_matrix"] = np.array(transform.matrix, dtype=np.float64)
        vec["transform_offset"] = np.array(transform.offset, dtype=np.float64)
    return vec


def _learned_keys(learn, vec):
    keys = []
    if "weights" in learn:
        keys += ["appearance_weight", "smoothness_weight"]
    if "bandwidths" in learn:
        keys += ["log_theta_alpha", "log_theta_beta", "log_theta_gamma"]
    if "compatibility" in learn:
        keys += ["compatibility"]
    if "unary_weight" in learn:
        keys += ["unary_weight"]
    if "feature_transform" in learn:
        keys += ["transform_matrix", "transform_offset"]
    return [k for k in keys if k in vec]


def _vector_to_params(vec, base, keys):
    """CRFParams from the vector; fields that are not learned keep ``base``'s exact values."""
    if not all(np.isfinite(vec[k]).all() for k in keys):
        raise FloatingPointError("training diverged (a parameter became NaN or infinite); lower lr")
    changes = {}
    if "appearance_weight" in keys:
        changes.update(appearance_weight=float(vec["appearance_weight"]),
                       smoothness_weight=float(vec["smoothness_weight"]))
    if "log_theta_alpha" in keys:
        tb = np.exp(vec["log_theta_beta"])
        changes.update(theta_alpha=float(np.exp(vec["log_theta_alpha"])),
                       theta_beta=float(tb) if tb.ndim == 0 else tuple(float(v) for v in tb),
                       theta_gamma=float(np.exp(vec["log_theta_gamma"])))
    if "compatibility" in keys:
        changes.update(compatibility=vec["compatibility"])
    if "unary_weight" in keys:
        changes.update(unary_weight=float(vec["unary_weight"]))
    return base.replace(**changes) if changes else base


def _vector_transform(vec):
    if "transform_matrix" not in vec:
        return None
    return FeatureTransform(np.array(vec["transform_matrix"]), np.array(vec["transform_offset"]))


def _vector_gradient(vec, params, grads, grad_transform):
    g = {
        "appearance_weight": np.array(grads["appearance_weight"]),
        "smoothness_weight": np.array(grads["smoothness_weight"]),
        "log_theta_alpha": np.array(grads["theta_alpha"] * params.theta_alpha),
        "log_theta_beta": np.asarray(grads["theta_beta"], dtype=np.float64) * np.exp(vec["log_theta_beta"]),
        "log_theta_gamma": np.array(grads["theta_gamma"] * params.theta_gamma),
        "compatibility": np.asarray(grads["compatibility"], dtype=np.float64),
        "unary_weight": np.array(grads["unary_weight"]),
    }
    if vec["log_theta_beta"].ndim == 0:
        g["log_theta_beta"] = np.array(np.sum(g["log_theta_beta"]))
    if grad_transform is not None:
        g["transform_matrix"] = grad_transform["matrix"]
        g["transform_offset"] = grad_transform["offset"]
    return g


# -------------------------------------------------------------------------------------------------
# loss
# -------------------------------------------------------------------------------------------------
def cross_entropy(logits, labels, class_weights=None, ignore_index=255):
    """Mean (weighted) cross-entropy of softmax(logits) over axis 1 and its gradient.

    Parameters
    ----------
    logits : array (B, C, H, W)
    labels : NumPy int array (B, H, W); ``ignore_index`` pixels do not count
    class_weights : (C,) array or None
        Weighted mean as in PyTorch: ``sum_i w[y_i] (-log q_i(y_i)) / sum_i w[y_i]``.

    Returns
    -------
    loss : float
    grad : array like ``logits``
    weight : float
        ``sum_i w[y_i]`` (the number of counted pixels without class weights).
    """
    xp = _namespace(logits)
    dt = logits.dtype
    lab = xp.asarray(labels)
    valid = lab != ignore_index
    safe = xp.where(valid, lab, 0)
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    logp = shifted - xp.log(s)
    picked = xp.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
    if class_weights is None:
        w = valid.astype(dt)
    else:
        w = xp.asarray(class_weights, dtype=dt)[safe] * valid.astype(dt)
    total = float(w.sum(dtype=xp.float64))
    if total <= 0:
        return float("nan"), xp.zeros_like(logits), 0.0
    loss = float(-(w * picked).sum(dtype=xp.float64)) / total
    grad = e / s
    onehot = xp.zeros_like(grad)
    xp.put_along_axis(onehot, safe[:, None], 1.0, axis=1)
    grad -= onehot
    grad *= (w / dt.type(total))[:, None]
    return loss, grad, total


def _namespace(a):
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


# -------------------------------------------------------------------------------------------------
# checkpoints
# -------------------------------------------------------------------------------------------------
def _atomic_write(path, data: bytes):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_checkpoint(path, state):
    arrays = {}
    for group in ("vec", "best_vec"):
        for k, v in state[group].items():
            arrays[f"{group}/{k}"] = np.asarray(v)
    opt = state["optimizer"]
    for group in ("m", "v"):
        for k, v in opt[group].items():
            arrays[f"adam_{group}/{k}"] = np.asarray(v)
    meta = {"version": _CHECKPOINT_VERSION, "epoch": state["epoch"], "history": state["history"],
            "best_epoch": state["best_epoch"], "best_score": state["best_score"], "adam_t": opt["t"],
            "signature": state["signature"]}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write(path, buf.getvalue())


def _load_checkpoint(path):
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
            state = {"vec": {}, "best_vec": {}, "optimizer": {"t": meta["adam_t"], "m": {}, "v": {}}}
            for name in z.files:
                if name == "meta":
                    continue
                group, key = name.split("/", 1)
                if group in ("vec", "best_vec"):
                    state[group][key] = np.array(z[name])
                else:
                    state["optimizer"][group[len("adam_"):]][key] = np.array(z[name])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read checkpoint {os.fspath(path)!r}: {exc}") from exc
    if meta.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {os.fspath(path)!r} has version {meta.get('version')}, expected "
                         f"{_CHECKPOINT_VERSION}")
    state.update(epoch=meta["epoch"], history=meta["history"], best_epoch=meta["best_epoch"],
                 best_score=meta["best_score"], signature=meta["signature"])
    return state


# -------------------------------------------------------------------------------------------------
# fit
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


def fit(unaries, images, labels, params=None, *, validation=None, val_fraction=0.0,
        learn=DEFAULT_LEARN, epochs=10, lr=0.02, batch_size=1, class_weights=None, ignore_index=255,
        filter_size=_api.DEFAULT_FILTER_SIZE, blur=_api.DEFAULT_BLUR, iterations=_api.DEFAULT_ITERATIONS,
        normalization=None, feature_transform=None, dtype=np.float32, device=None, weight_decay=0.0,
        lr_schedule=None, seed=0, progress=True, checkpoint=None, resume=False, callback=None):
    """Learn CRF parameters from labelled images by back-propagation through mean-field inference.

    Minimises the mean cross-entropy of the CRF output (``infer(..., output='logits')``)
    against the labels with Adam, one step per minibatch.

    Parameters
    ----------
    unaries : sequence or iterable of arrays (C, H, W)
        Per-image class scores (logits, e.g. a network's output or log-probabilities). A
        (N, C, H, W) array counts as N images.
    images : sequence or iterable of arrays (H, W, F)
        The matching images (uint8 or float); sizes may differ between images.
    labels : sequence or iterable of integer arrays (H, W)
        Ground-truth class ids in ``[0, C)``; ``ignore_index`` pixels do not count.
    params : CRFParams or dict, optional
        Starting parameters (default ``CRFParams()``).
    validation : (unaries, images, labels), optional
        A held-out set, scored (accuracy, mIoU) after every epoch; the best epoch's parameters
        are returned.
    val_fraction : float
        Without ``validation``, hold out this fraction of the training images (chosen with
        ``seed``) as the validation set.
    learn : sequence of str
        What to learn, from ``'weights'`` (appearance and smoothness weights), ``'bandwidths'``
        (``theta_alpha``, ``theta_beta``, ``theta_gamma``, optimised as logarithms),
        ``'compatibility'`` (a full C x C matrix, starting from Potts ``1 - I`` when ``params`` are
        Potts), ``'unary_weight'``, ``'feature_transform'`` (a linear map ``A f + c`` of the image
        channels, initialised to the identity unless ``feature_transform`` is given).
    epochs : int
        Passes over the training images (>= 0; 0 only scores the starting parameters).
    lr : float
        Adam's learning rate (parameters are O(1)-O(10); bandwidths move in log space).
    batch_size : int
        Images per step; only images of the same size are batched together.
    class_weights : (C,) array_like, optional
        Weight of each class in the loss.
    ignore_index : int
        Label value that does not count (default 255).
    filter_size, blur, iterations, normalization
        As for :func:`cucrf.infer`; the learned parameters belong to these settings.
    feature_transform : FeatureTransform, dict or (matrix, offset), optional
        Starting (or, without ``'feature_transform'`` in ``learn``, fixed) feature transform.
    dtype : numpy.float32 or numpy.float64
        Compute precision.
    device : {None, 'cpu', 'gpu'}
        As for :func:`cucrf.infer`; CuPy arrays (or device="gpu") train on the GPU.
    weight_decay : float
        Decoupled weight decay of Adam (applies to every learned parameter).
    lr_schedule : callable, optional
        ``lr_schedule(step) -> factor`` multiplying ``lr`` at optimiser step ``step`` (0-based).
    seed : int
        Seeds the image order of every epoch (and the validation split).
    progress : bool
        Show a tqdm progress bar.
    checkpoint : path, optional
        A ``.npz`` file written atomically after every epoch (parameters, optimiser state,
        history, best parameters).
    resume : bool
        Continue from ``checkpoint`` when it exists (the settings must match).
    callback : callable, optional
        Called as ``callback(entry)`` with each epoch's history entry.

    Returns
    -------
    FitResult
        ``.params`` (a :class:`CRFParams`), ``.feature_transform``, ``.history``, ``.best_epoch``.

    Examples
    --------
    >>> import numpy as np, cucrf
    >>> rng = np.random.default_rng(0)
    >>> label = np.zeros((24, 32), dtype=np.uint8); label[:, 16:] = 1
    >>> image = np.where(label[..., None] == 1, 200, 40).astype(np.uint8).repeat(3, axis=2)
    >>> unary = np.stack([label == 0, label == 1]).astype(np.float32) + rng.normal(size=(2, 24, 32))
    >>> result = cucrf.fit([unary], [image], [label], epochs=2, blur=2, progress=False)
    >>> len(result.history), isinstance(result.params, cucrf.CRFParams)
    (3, True)
    """
    learn = _check_learn(learn)
    epochs = _positive_int("epochs", epochs, minimum=0)
    batch_size = _positive_int("batch_size", batch_size)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {dtype!r}")
    if checkpoint is None and resume:
        raise ValueError("resume=True needs a checkpoint path")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    if params is None:
        params = CRFParams()
    elif isinstance(params, dict):
        params = CRFParams.from_dict(params)
    if not isinstance(params, CRFParams):
        raise TypeError(f"params must be a cucrf.CRFParams, a dict or None, got {type(params).__name__}")
    config_kwargs = dict(filter_size=filter_size, blur=blur, iterations=iterations, normalization=normalization)

    train, C, F = _load_samples("", unaries, images, labels, config_kwargs, dtype, device, ignore_index)
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 3:
            raise TypeError("validation must be a tuple (unaries, images, labels)")
        val, vC, vF = _load_samples("validation ", *validation, config_kwargs, dtype, device, ignore_index)
        if (vC, vF) != (C, F):
            raise ValueError(f"validation images have {vC} classes and {vF} channels but the training images "
                             f"{C} and {F}")
    elif val_fraction > 0:
        n_val = int(round(val_fraction * len(train)))
        if n_val < 1 or n_val >= len(train):
            raise ValueError(f"val_fraction={val_fraction} of {len(train)} image(s) leaves no validation or no "
                             "training image")
        order = np.random.default_rng(seed).permutation(len(train))
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    else:
        val = []
    if class_weights is not None:
        class_weights = np.asarray(class_weights, dtype=np.float64)
        if class_weights.shape != (C,) or not np.isfinite(class_weights).all() or (class_weights < 0).any():
            raise ValueError(f"class_weights must be {C} finite non-negative numbers, got shape {class_weights.shape}")

    # Parameters and transform: check them against the data (as infer would).
    transform = None
    if feature_transform is not None:
        checked = _api.check_feature_transform(feature_transform, F)
        transform = FeatureTransform(*checked)
    elif "feature_transform" in learn:
        transform = FeatureTransform.identity(F)
    F_out = F if transform is None else transform.matrix.shape[0]
    params = _api._check_params(params, C, F_out)
    vec = _initial_vector(params, C, F_out, transform)
    keys = _learned_keys(learn, vec)
    backend = _api.get_backend(train[0].library)
    _meanfield.check_backward_support(backend)
    xp = backend.xp
    optimizer = Adam(lr=lr, weight_decay=weight_decay, schedule=lr_schedule)
    signature = {"learn": sorted(learn), "classes": C, "channels": F, "keys": keys,
                 "filter_size": filter_size, "blur": blur, "iterations": iterations,
                 "normalization": normalization, "train_images": len(train)}

    def configs(sample_shape):
        return _api.check_config(filter_size, blur, iterations, normalization, *sample_shape)

    def evaluate(samples, vec_now):
        """(loss, accuracy, mIoU) of the parameters ``vec_now`` on ``samples``."""
        p = _vector_to_params(vec_now, params, keys)
        tf = _vector_transform(vec_now)
        score = SegmentationScore(C, ignore_index)
        loss_sum = weight_sum = 0.0
        for s in samples:
            feats = s.features if tf is None else _api.apply_feature_transform(
                xp, s.features, (tf.matrix, tf.offset))
            logits = _meanfield.mean_field(backend, s.unary, feats, p, configs(s.label.shape), return_logits=True)
            loss, _, w = cross_entropy(logits, s.label[None], class_weights, ignore_index)
            if w > 0:
                loss_sum += loss * w
                weight_sum += w
            pred = logits[0].argmax(axis=0)
            score.add(pred.get() if hasattr(pred, "get") else pred, s.label)
        return (loss_sum / weight_sum if weight_sum else float("nan")), score.accuracy, score.miou

    # -- resume or start ------------------------------------------------------------------------
    start_epoch = 0
    history = []
    best_vec, best_score, best_epoch = None, None, 0
    if resume and os.path.exists(os.fspath(checkpoint)):
        state = _load_checkpoint(checkpoint)
        if state["signature"] != json.loads(json.dumps(signature)):
            raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} was written with other settings "
                             f"({state['signature']}); delete it or pass resume=False")
        vec = {k: state["vec"][k] for k in vec}
        best_vec = {k: state["best_vec"][k] for k in vec}
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = state["history"], state["epoch"]
        best_epoch, best_score = state["best_epoch"], state["best_score"]
    else:
        t0 = time.perf_counter()
        train_loss = evaluate(train, vec)[0]
        val_loss, val_acc, val_miou = evaluate(val, vec) if val else (None, None, None)
        history.append({"epoch": 0, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
                        "val_miou": val_miou, "lr": None, "seconds": time.perf_counter() - t0, "images": 0})
        best_vec, best_score, best_epoch = dict(vec), val_miou, 0
        if callback is not None:
            callback(history[-1])

    from tqdm import tqdm

    # -- epochs ---------------------------------------------------------------------------------
    for epoch in range(start_epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        batches = _batches(train, batch_size, rng)
        loss_sum = weight_sum = 0.0
        images_done = 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not progress, leave=False,
                   dynamic_ncols=True)
        for idx in bar:
            p = _vector_to_params(vec, params, keys)
            tf = _vector_transform(vec)
            unary = xp.concatenate([train[i].unary for i in idx], axis=0)
            image_features = xp.concatenate([train[i].features for i in idx], axis=0)
            lab = np.stack([train[i].label for i in idx])
            feats = image_features if tf is None else _api.apply_feature_transform(
                xp, image_features, (tf.matrix, tf.offset))
            tape = _meanfield.Tape()
            logits = _meanfield.mean_field(backend, unary, feats, p, configs(lab.shape[1:]), return_logits=True,
                                           tape=tape)
            loss, g_logits, w = cross_entropy(logits, lab, class_weights, ignore_index)
            images_done += len(idx)
            if w == 0:
                continue  # nothing labelled in this batch
            _, g_feats, grads = _meanfield.mean_field_backward(backend, tape, g_logits)
            g_tf = None
            if tf is not None:
                _, g_tf = _api._feature_transform_backward(xp, image_features, g_feats, (tf.matrix, tf.offset))
            g = _vector_gradient(vec, p, grads, g_tf)
            lr_now = optimizer.current_lr()
            updated = optimizer.step({k: vec[k] for k in keys}, {k: g[k] for k in keys})
            vec = {**vec, **updated}
            loss_sum += loss * w
            weight_sum += w
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        val_loss, val_acc, val_miou = evaluate(val, vec) if val else (None, None, None)
        entry = {"epoch": epoch, "train_loss": loss_sum / weight_sum if weight_sum else None,
                 "val_loss": val_loss, "val_accuracy": val_acc, "val_miou": val_miou,
                 "lr": optimizer.current_lr(max(optimizer.t - 1, 0)), "seconds": time.perf_counter() - t0,
                 "images": images_done}
        history.append(entry)
        if not val or (val_miou is not None and not math.isnan(val_miou)
                       and (best_score is None or math.isnan(best_score) or val_miou > best_score)):
            best_vec, best_score, best_epoch = dict(vec), val_miou, epoch
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {"vec": vec, "best_vec": best_vec, "optimizer": optimizer.state_dict(),
                                          "epoch": epoch, "history": history, "best_epoch": best_epoch,
                                          "best_score": best_score, "signature": signature})
        if progress:
            text = f"epoch {epoch}: train loss {entry['train_loss']:.4f}" if entry["train_loss"] is not None else \
                f"epoch {epoch}"
            if val:
                text += f", val mIoU {val_miou:.4f}, accuracy {val_acc:.4f}"
            tqdm.write(text)
        if callback is not None:
            callback(entry)
    return FitResult(_vector_to_params(best_vec, params, keys), _vector_transform(best_vec), history, best_epoch)
