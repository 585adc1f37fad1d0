"""Which epoch :func:`cucrf.fit` returns: validation scores, early stopping, the start as a fallback."""

from __future__ import annotations

import math

import numpy as np

from ..metrics import mean_iou, pixel_accuracy

#: Selection metrics: name -> (history key, larger is better).
METRICS = {
    "accuracy": ("val_accuracy", True),
    "miou": ("val_miou", True),
    "miou_gt": ("val_miou_gt", True),
    "loss": ("val_loss", False),
}


def scores_from(confusion, loss_sum, weight_sum):
    """The validation entries of a history line from a confusion matrix and summed losses."""
    return {
        "val_loss": loss_sum / weight_sum if weight_sum else float("nan"),
        "val_accuracy": pixel_accuracy(confusion),
        "val_miou": mean_iou(confusion),
        "val_miou_gt": mean_iou(confusion, "gt"),
    }


class Selection:
    """Tracks the best epoch by a validation metric; epoch 0 (the start) must be beaten.

    An epoch becomes the best when its score is the best so far, beats the start's by more than
    ``min_improvement`` (absolute, in the metric's units; gains smaller than that on a few
    validation images are noise) and, with ``guard``, none of its pixel accuracy, mIoU and mIoU
    over ground-truth classes is below the start's: a fitted CRF must not buy one score with
    another. Training stops after ``patience`` epochs in a row without a better score, whether or
    not the better epochs were eligible (a guarded score may dip for a few epochs and recover).
    """

    #: ``val_miou_per_image`` exists only with cross-validation (see :func:`pooled_history`).
    GUARDED = ("val_accuracy", "val_miou", "val_miou_gt", "val_miou_per_image")

    def __init__(self, metric, patience, min_improvement=0.0, guard=True):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        self.metric = metric
        self.key, self.larger_is_better = METRICS[metric]
        self.patience = patience
        self.min_improvement = min_improvement
        self.guard = guard
        self.best_epoch = 0
        self.best_score = None   # of the selected epoch
        self.top_score = None    # the best score seen, eligible or not (for patience)
        self.start = {}
        self.stale = 0

    def value(self, entry):
        v = entry.get(self.key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def better(self, score, reference, margin=0.0):
        if score is None:
            return False
        if reference is None:
            return True
        if self.larger_is_better:
            return score > reference + margin
        return score < reference - margin

    def update(self, entry):
        """Record an epoch's history entry; True when it is the new best."""
        score = self.value(entry)
        entry["score"] = score
        if entry["epoch"] == 0:
            self.best_epoch, self.best_score, self.top_score, self.stale = 0, score, score, 0
            self.start = {k: entry.get(k) for k in self.GUARDED + (self.key,)}
            return True
        if self.better(score, self.top_score):
            self.top_score, self.stale = score, 0
        else:
            self.stale += 1
        if (self.better(score, self.best_score) and self.better(score, self.start.get(self.key), self.min_improvement)
                and self.eligible(entry)):
            self.best_epoch, self.best_score = entry["epoch"], score
            return True
        return False

    def eligible(self, entry):
        """With ``guard``: no segmentation score below the start's."""
        if not self.guard:
            return True
        return all(self.start.get(k) is None or (entry.get(k) is not None and entry[k] >= self.start[k])
                   for k in self.GUARDED)

    @property
    def should_stop(self):
        return self.patience is not None and self.stale >= self.patience

    def state(self):
        return {"best_epoch": self.best_epoch, "best_score": self.best_score, "top_score": self.top_score,
                "stale": self.stale, "start": self.start}

    def load(self, state):
        self.best_epoch, self.best_score, self.stale = state["best_epoch"], state["best_score"], state["stale"]
        self.top_score, self.start = state["top_score"], state["start"]


def pooled_history(fold_histories):
    """One history from cross-validation folds: per epoch, the folds' confusion matrices summed.

    Each fold history entry carries ``_confusion``, ``_loss_sum`` and ``_weight_sum``; an epoch
    appears when every fold reached it. ``val_miou_per_image`` is the mean over the folds of each
    held-out image's own mIoU: pooling merges the images' classes, so a class predicted in an
    image that lacks it costs little in the pooled mIoU while it costs that image a whole class
    (on VOC with the synthetic unaries, stray blocks that leave-one-out pooling did not see cost
    10 points of test mIoU).
    """
    epochs = min(len(h) for h in fold_histories)
    pooled = []
    for e in range(epochs):
        cm = sum(np.asarray(h[e]["_confusion"]) for h in fold_histories)
        loss_sum = sum(h[e]["_loss_sum"] for h in fold_histories)
        weight_sum = sum(h[e]["_weight_sum"] for h in fold_histories)
        entry = {"epoch": e, "train_loss": float(np.mean([h[e]["train_loss"] for h in fold_histories
                                                          if h[e]["train_loss"] is not None] or [np.nan]))}
        entry.update(scores_from(cm, loss_sum, weight_sum))
        entry["val_miou_per_image"] = float(np.mean([mean_iou(np.asarray(h[e]["_confusion"])) for h in fold_histories]))
        pooled.append(entry)
    return pooled
