#!/usr/bin/env python3
"""Measure synthetic / real unaries and DenseCRF (pydensecrf2) refinement on labelled data.

Usage::

    python3 scripts/measure_densecrf.py DATA_DIR [--sets voc msrc camvid] [--seed 0]
        [--iterations 5] [--no-crf] [--unaries unaries]

DATA_DIR holds one sub-folder per data set (``voc/``, ``msrc/``, ``camvid/``) of
``<id>_image.png`` / ``<id>_label.png`` pairs, and optionally ``unaries/`` with
``<id>_espnet2_384.npz`` / ``<id>_espnet1_256.npz`` (``logits`` (21, H, W)) for the voc images.
Nothing is copied or written; results go to stdout.

Scores: one confusion matrix accumulated over all images of a set (255 ignored); "mIoU" is the
mean over classes present in ground truth or prediction (cucrf.metrics.mean_iou), "mIoU(gt)" the
mean over classes present in the ground truth only (the random classes of the synthetic unary
appear in the prediction of every image, so on a few images the two differ a lot).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cucrf import _peers  # noqa: E402
from cucrf.datasets import load_pairs, synthetic_unary  # noqa: E402
from cucrf.metrics import SegmentationScore  # noqa: E402

NUM_CLASSES = {"voc": 21, "msrc": 23, "camvid": 11}
CRF_PARAMS = dict(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(0, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(0, keepdims=True))).astype(np.float32)


def miou_gt(score: SegmentationScore) -> float:
    iou = score.per_class_iou
    present = score.cm.sum(1) > 0
    return float(np.mean(iou[present]))


def fmt(name: str, score: SegmentationScore, extra: str = "") -> str:
    return (f"  {name:<22} acc {score.accuracy:.4f}  mIoU {score.miou:.4f}  "
            f"mIoU(gt) {miou_gt(score):.4f}{extra}")


def evaluate(samples, unaries, num_classes, run_crf, iterations):
    """Score argmax of the unaries and, optionally, of DenseCRF's output; return lines."""
    s_unary = SegmentationScore(num_classes)
    s_crf = SegmentationScore(num_classes)
    seconds = []
    for sample, u in zip(samples, unaries):
        s_unary.add(u.argmax(0), sample.label)
        if run_crf:
            img = sample.image
            if img.shape[2] == 1:
                img = np.repeat(img, 3, axis=2)
            t = time.perf_counter()
            q = _peers.densecrf_infer(u, img, iterations=iterations, **CRF_PARAMS)
            seconds.append(time.perf_counter() - t)
            s_crf.add(q.argmax(0), sample.label)
    lines = [fmt("unary", s_unary)]
    if run_crf:
        lines.append(fmt(f"DenseCRF ({iterations} it)", s_crf,
                         f"  {np.mean(seconds):.3f} s/image (median {np.median(seconds):.3f})"))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--sets", nargs="+", default=["voc", "msrc", "camvid"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--no-crf", action="store_true", help="score the unaries only")
    ap.add_argument("--unaries", default="unaries", help="sub-folder with real voc unaries ('' to skip)")
    args = ap.parse_args(argv)

    run_crf = not args.no_crf
    if run_crf and not _peers.densecrf_available():
        print("pydensecrf not installed (scripts/install-densecrf.sh); scoring unaries only")
        run_crf = False

    for name in args.sets:
        folder = args.data_dir / name
        if name not in NUM_CLASSES:
            print(f"skipping {name}: unknown number of classes")
            continue
        c = NUM_CLASSES[name]
        samples = load_pairs(folder)
        unaries = [synthetic_unary(s.label, c, seed=args.seed) for s in samples]
        print(f"{name}: {len(samples)} images, {c} classes, synthetic unary (seed {args.seed})")
        for line in evaluate(samples, unaries, c, run_crf, args.iterations):
            print(line)

    udir = args.data_dir / args.unaries if args.unaries else None
    if udir is not None and udir.is_dir():
        for model in ("espnet2_384", "espnet1_256"):
            samples = load_pairs(args.data_dir / "voc", unary_dir=udir, unary_pattern="{name}_" + model + ".npz")
            unaries = [log_softmax(s.unary) for s in samples]
            print(f"voc real unaries {model}: {len(samples)} images")
            for line in evaluate(samples, unaries, 21, run_crf, args.iterations):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
