"""One optimiser step, one epoch, one evaluation: the working parts of :func:`cucrf.fit`."""

from __future__ import annotations

import math
import time

import numpy as np

from .. import _api, _meanfield
from ..metrics import confusion_matrix
from . import objective, parameters, selection

#: Output temperatures tried to start the learned one (the CRF's logits are often far too confident).
_START_TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def _to_numpy(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


class Trainer:
    """Everything that stays fixed during a fit: backend, settings, starting parameters, loss.

    Parameters
    ----------
    backend : the NumPy or CuPy backend module
    configs : callable (H, W) -> CRFConfig
    base_params : CRFParams
        The starting parameters; entries not learned keep their exact values.
    keys : list of str
        The learned entries of the parameter vector.
    learn_temperature : bool
        Learn the output temperature of the loss (``log_temperature`` in the vector).
    prior_strength : float
        Strength of the Gaussian prior toward the start, per labelled pixel.
    class_weights : (C,) array or None
    ignore_index : int
    num_classes : int
    lovasz_weight : float
        Weight of the Lovász-softmax loss added to the cross-entropy.
    """

    def __init__(self, backend, configs, base_params, keys, *, learn_temperature, prior_strength, class_weights,
                 ignore_index, num_classes, lovasz_weight=0.0):
        self.backend = backend
        self.xp = backend.xp
        self.configs = configs
        self.base_params = base_params
        self.keys = list(keys)
        self.learn_temperature = learn_temperature
        self.prior_strength = prior_strength
        self.class_weights = class_weights
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self.lovasz_weight = lovasz_weight
        self.step_count = 0

    # -- the model --------------------------------------------------------------------------------
    def model(self, vec):
        """(CRFParams, transform or None) of a parameter vector."""
        p = parameters.to_params(vec, self.base_params, self.keys)
        tf = None
        if "transform_matrix" in vec:
            tf = (np.array(vec["transform_matrix"]), np.array(vec["transform_offset"]))
        return p, tf

    def _features(self, features, tf):
        return features if tf is None else _api.apply_feature_transform(self.xp, features, tf)

    def logits(self, vec, sample, tape=None):
        p, tf = self.model(vec)
        return _meanfield.mean_field(self.backend, sample.unary, self._features(sample.features, tf), p,
                                     self.configs(sample.label.shape), return_logits=True, tape=tape)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, vec, dataset, *, progress=False, desc="scoring", temperatures=None):
        """Loss, accuracy and mIoU of ``vec`` on ``dataset``, plus the confusion matrix.

        With ``temperatures``, also the summed loss at each of those output temperatures
        (``_loss_at``), used to start the learned temperature.
        """
        from tqdm import tqdm

        log_tau = float(vec.get("log_temperature", 0.0))
        cm = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        loss_sum = weight_sum = 0.0
        at = np.zeros(len(temperatures)) if temperatures is not None else None
        for j in tqdm(range(len(dataset)), desc=desc, unit="image", disable=not progress, leave=False):
            sample = dataset.load(j)
            logits = self.logits(vec, sample)
            loss, _, _, w = objective.tempered_cross_entropy(logits, sample.label[None], log_tau, self.class_weights,
                                                             self.ignore_index)
            if w > 0:
                loss_sum += loss * w
                weight_sum += w
                if at is not None:
                    for t, tau in enumerate(temperatures):
                        at[t] += w * objective.tempered_cross_entropy(
                            logits, sample.label[None], math.log(tau), self.class_weights, self.ignore_index)[0]
            cm += confusion_matrix(_to_numpy(logits[0].argmax(axis=0)), sample.label, self.num_classes,
                                   self.ignore_index)
        out = selection.scores_from(cm, loss_sum, weight_sum)
        out.update(_confusion=cm, _loss_sum=loss_sum, _weight_sum=weight_sum)
        if at is not None:
            out["_loss_at"] = at
        return out

    def start_temperature(self, vec, dataset, progress=False):
        """Scores of the start on ``dataset`` and ``vec`` with the best of a few output temperatures."""
        scores = self.evaluate(vec, dataset, progress=progress, desc="epoch 0: scoring the start",
                               temperatures=_START_TEMPERATURES if self.learn_temperature else None)
        vec = dict(vec)
        if self.learn_temperature and scores["_weight_sum"] > 0:
            best = int(np.argmin(scores["_loss_at"]))
            vec["log_temperature"] = np.array(math.log(_START_TEMPERATURES[best]))
            scores["val_loss"] = float(scores["_loss_at"][best] / scores["_weight_sum"])
        return vec, scores

    # -- training ---------------------------------------------------------------------------------
    def gradient(self, vec, samples):
        """Loss, labelled weight and gradient of one minibatch (a list of equal-size samples)."""
        xp = self.xp
        p, tf = self.model(vec)
        unary = xp.concatenate([s.unary for s in samples], axis=0)
        image_features = xp.concatenate([s.features for s in samples], axis=0)
        lab = np.stack([s.label for s in samples])
        tape = _meanfield.Tape()
        logits = _meanfield.mean_field(self.backend, unary, self._features(image_features, tf), p,
                                       self.configs(lab.shape[1:]), return_logits=True, tape=tape)
        log_tau = float(vec.get("log_temperature", 0.0))
        loss, g_logits, g_log_tau, w = objective.tempered_cross_entropy(logits, lab, log_tau, self.class_weights,
                                                                        self.ignore_index)
        if w == 0:
            return None, 0.0, None
        if self.lovasz_weight:
            lovasz, g_lovasz = objective.lovasz_softmax(logits, lab, log_tau, self.ignore_index)
            loss += self.lovasz_weight * lovasz
            g_logits = g_logits + logits.dtype.type(self.lovasz_weight) * g_lovasz
        _, g_feats, grads = _meanfield.mean_field_backward(self.backend, tape, g_logits)
        g_tf = None
        if tf is not None:
            _, g_tf = _api._feature_transform_backward(xp, image_features, g_feats, tf)
        g = parameters.gradient(vec, p, grads, g_tf)
        g = {k: g[k] for k in self.keys}
        if self.learn_temperature:
            g["log_temperature"] = np.array(g_log_tau)
        return loss, w, g

    def epoch(self, vec, optimizer, dataset, batch_list, *, units, z_start, progress=False, desc="epoch"):
        """One pass of optimiser steps over ``batch_list``; returns (vec, mean loss, images)."""
        from tqdm import tqdm

        loss_sum = weight_sum = 0.0
        images = 0
        bar = tqdm(batch_list, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True)
        for idx in bar:
            samples = [dataset.load(i) for i in idx]
            images += len(idx)
            loss, w, g = self.gradient(vec, samples)
            self.step_count += 1
            if loss is None:
                continue  # nothing labelled in this minibatch
            if not math.isfinite(loss) or not all(np.isfinite(v).all() for v in g.values()):
                raise parameters.TrainingDivergedError(
                    f"training diverged at step {self.step_count} (loss {loss}); lower lr (now {optimizer.lr:g})")
            names = list(g)
            z = {k: vec[k] / units[k] for k in names}
            gz = {k: g[k] * units[k] for k in names}
            _, prior_grad = objective.prior({k: z[k] for k in names if k in z_start},
                                            z_start, self.prior_strength)
            for k, pg in prior_grad.items():
                gz[k] = gz[k] + pg
            z_new = optimizer.step(z, gz)
            vec = {**vec, **{k: z_new[k] * units[k] for k in names}}
            try:
                self.model(vec)  # a diverged parameter is reported at the step that produced it
            except parameters.TrainingDivergedError as exc:
                raise parameters.TrainingDivergedError(
                    f"training diverged at step {self.step_count}: {exc}; lower lr (now {optimizer.lr:g})") from None
            loss_sum += loss * w
            weight_sum += w
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        return vec, (loss_sum / weight_sum if weight_sum else None), images


def entry(epoch, train_loss, scores, lr, seconds, images, vec):
    """A history line."""
    out = {"epoch": epoch, "train_loss": train_loss}
    for k in ("val_loss", "val_accuracy", "val_miou", "val_miou_gt"):
        out[k] = None if scores is None else scores[k]
    out.update(score=None, lr=lr, seconds=seconds, images=images,
               temperature=float(np.exp(vec.get("log_temperature", 0.0))))
    if scores is not None:
        out.update({k: scores[k] for k in ("_confusion", "_loss_sum", "_weight_sum")})
    return out


def public(history):
    """History lines without the internal entries (confusion matrices, sums)."""
    return [{k: v for k, v in h.items() if not k.startswith("_")} for h in history]


def elapsed(t0):
    return time.perf_counter() - t0
