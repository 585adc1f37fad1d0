#!/usr/bin/env python3
"""Does learning help? Fit CRF parameters from the defaults and score held-out images.

Usage::

    python scripts/evaluate_fit.py DATA_DIR [--epochs 6] [--lr 0.02] [--scale 2] [--out results.json]

DATA_DIR holds ``voc/``, ``msrc/``, ``camvid/`` (``<id>_image.png`` / ``<id>_label.png`` pairs) and
optionally ``unaries/`` (``<id>_espnet2_384.npz`` with real network logits for the VOC images).

Protocol (documented in docs/learning.md):

* split: the pairs of each set sorted by id; even positions train, odd positions validate
  (VOC 4 / 4, MSRC 30 / 30, CamVid 16 / 15), capped by ``--max-train`` / ``--max-val``;
* everything downscaled by ``--scale`` (2x2 area average for images and logits, the top-left pixel
  of each 2x2 block for labels) to keep the run short on two shared cores;
* unaries: the synthetic protocol (``datasets.synthetic_unary`` on the downscaled label,
  seed = position in the sorted list), and, for VOC, the real ESPNet logits;
* ``--noise-copies N``: each training image gets N synthetic unaries with different noise seeds;
* ``cucrf.fit`` from the defaults (``CRFParams()``, ``cucrf.DEFAULT_FILTER_SIZE``,
  ``DEFAULT_BLUR``, ``DEFAULT_ITERATIONS``), learning weights, bandwidths and unary weight, and the
  compatibility matrix when there are at least 10 training images; the validation mIoU of the
  unary alone, of the default CRF (epoch 0) and of the best epoch are reported.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

import cucrf
from cucrf import datasets, metrics

SETS = {"voc": 21, "msrc": 23, "camvid": 11}


def downscale(sample, scale):
    if scale == 1:
        return sample.image, sample.label, sample.unary
    H, W = sample.label.shape
    h, w = H // scale, W // scale

    def area(x):  # (..., H, W) -> (..., h, w)
        x = x[..., :h * scale, :w * scale].astype(np.float32)
        return x.reshape(x.shape[:-2] + (h, scale, w, scale)).mean(axis=(-3, -1))

    image = np.moveaxis(area(np.moveaxis(sample.image, -1, 0)), 0, -1)
    label = sample.label[:h * scale:scale, :w * scale:scale]
    unary = None if sample.unary is None else area(sample.unary)
    return image, np.ascontiguousarray(label), unary


def unary_score(unaries, labels, classes):
    score = metrics.SegmentationScore(classes)
    for u, lab in zip(unaries, labels):
        score.add(u.argmax(axis=0), lab)
    return score.miou


def run(name, classes, train, val, args, kind):
    U, I, L = zip(*train)
    vU, vI, vL = zip(*val)
    t0 = time.perf_counter()
    # A C x C compatibility cannot be estimated from a handful of images: learn it only from 10 or more.
    learn = ("weights", "bandwidths", "unary_weight") + (("compatibility",) if len(train) >= 10 else ())
    result = cucrf.fit(list(U), list(I), list(L), validation=(list(vU), list(vI), list(vL)), epochs=args.epochs,
                       lr=args.lr, learn=learn, progress=False, seed=0)
    seconds = time.perf_counter() - t0
    steps = sum(h["images"] for h in result.history)
    fit_seconds = sum(h["seconds"] for h in result.history[1:])
    row = {
        "set": name, "unaries": kind, "train": len(train), "val": len(val),
        "unary_miou": unary_score(vU, vL, classes),
        "default_miou": result.history[0]["val_miou"], "fitted_miou": result.history[result.best_epoch]["val_miou"],
        "default_accuracy": result.history[0]["val_accuracy"],
        "fitted_accuracy": result.history[result.best_epoch]["val_accuracy"],
        "best_epoch": result.best_epoch, "seconds": seconds, "learn": list(learn),
        "images_per_second": steps / fit_seconds if fit_seconds else None,
        "history": result.history, "params": result.params.to_dict(),
    }
    print(f"{name:7s} {kind:9s} unary {row['unary_miou']:.4f}  default CRF {row['default_miou']:.4f}  "
          f"fitted {row['fitted_miou']:.4f} (epoch {row['best_epoch']})  {seconds:.0f} s, "
          f"{row['images_per_second']:.2f} training images/s", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=16)
    ap.add_argument("--max-val", type=int, default=15)
    ap.add_argument("--sets", default="voc,msrc,camvid")
    ap.add_argument("--out", default="evaluate_fit.json")
    ap.add_argument("--plot", default=None, help="training-curve PNG (needs matplotlib)")
    ap.add_argument("--noise-copies", type=int, default=1,
                    help="synthetic unaries per training image, each with its own noise seed (default 1)")
    args = ap.parse_args()

    rows = []
    for name in args.sets.split(","):
        classes = SETS[name]
        folder = os.path.join(args.data_dir, name)
        if not os.path.isdir(folder):
            print(f"skipping {name}: {folder} not found", file=sys.stderr)
            continue
        unary_dir = os.path.join(args.data_dir, "unaries") if name == "voc" else None
        if unary_dir is not None and not os.path.isdir(unary_dir):
            unary_dir = None
        samples = datasets.load_pairs(folder, unary_dir=unary_dir, unary_pattern="{name}_espnet2_384.npz")
        scaled = [downscale(s, args.scale) for s in samples]
        train_idx = list(range(0, len(scaled), 2))[:args.max_train]
        val_idx = list(range(1, len(scaled), 2))[:args.max_val]
        synth = [(datasets.synthetic_unary(lab, classes, seed=i), im, lab) for i, (im, lab, _) in enumerate(scaled)]
        # Extra noise draws of the training images (seeds 1000 k + i) enlarge a small training set;
        # the validation unaries stay the single draw with seed i.
        train_synth = [synth[i] for i in train_idx] + [
            (datasets.synthetic_unary(scaled[i][1], classes, seed=1000 * k + i), scaled[i][0], scaled[i][1])
            for k in range(1, args.noise_copies) for i in train_idx]
        rows.append(run(name, classes, train_synth, [synth[i] for i in val_idx], args, "synthetic"))
        if unary_dir is not None:
            real = [(u.astype(np.float32), im, lab) for im, lab, u in scaled]
            rows.append(run(name, classes, [real[i] for i in train_idx], [real[i] for i in val_idx], args, "real"))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print("\n| set | unaries | train/val | unary mIoU | default CRF mIoU | fitted CRF mIoU | best epoch | training images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['unaries']} | {r['train']}/{r['val']} | {100 * r['unary_miou']:.2f} | "
              f"{100 * r['default_miou']:.2f} | {100 * r['fitted_miou']:.2f} | {r['best_epoch']} | {r['images_per_second']:.1f} |")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ax.plot([h["epoch"] for h in r["history"]], [h["val_miou"] for h in r["history"]], "o-",
                    label=f"{r['set']} {r['unaries']}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation mIoU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
