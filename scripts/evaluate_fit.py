#!/usr/bin/env python3
"""Does learning pay? ``cucrf.fit`` on a fixed split, scored on test images it never saw.

Usage::

    python scripts/evaluate_fit.py DATA_DIR [--seeds 0,1,2] [--sets msrc,camvid,voc,voc-espnet2,voc-espnet1]
                                   [--config default] [--output fit-eval.json] [--split-dir DIR]

The rows are written (after every run) to ``--output``; by default to ``fit-eval.json`` in a new
temporary folder, whose path is printed, so that nothing lands in the working directory (or the
repository) unless asked.

DATA_DIR holds ``voc/``, ``msrc/``, ``camvid/`` (``<id>_image.png`` / ``<id>_label.png``) and
``unaries/`` (``<id>_espnet2_384.npz``, ``<id>_espnet1_256.npz``: real network logits for voc/).

Protocol (docs/learning.md):

* split, fixed: the pairs of each set sorted by id; even positions form the fitting pool,
  odd positions the test set (MSRC 30 / 30, CamVid 16 / 15, VOC 4 / 4). ``fit`` chooses its own
  validation images from the pool (its default ``val_fraction='auto'``); test images are only
  read after fitting. ``--split-dir`` writes each split as JSON for ``cucrf fit/eval --split``;
* everything downscaled by ``--scale`` (2x2 area average for images and logits, the top-left
  pixel of each block for labels) to keep the run short on two CPU cores;
* unaries: the paper's synthetic protocol (``datasets.synthetic_unary``, noise seed
  ``1000 * seed + index``) or the real ESPNet logits;
* per seed: ``cucrf.fit`` from ``CRFParams()`` with its defaults (``--config`` picks other
  objectives for comparison), then on the test images: the unary's argmax, the default CRF, the
  fitted CRF and DenseCRF (pydensecrf2, when installed; the parameters of ``cucrf eval``);
  accuracy, mIoU (classes in ground truth or prediction) and mIoU over the ground-truth classes.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import cucrf
from cucrf import datasets, metrics

SETS = {  # name: (folder, classes, unaries)
    "msrc": ("msrc", 23, "synthetic"),
    "camvid": ("camvid", 11, "synthetic"),
    "voc": ("voc", 21, "synthetic"),
    "voc-espnet2": ("voc", 21, "espnet2_384"),
    "voc-espnet1": ("voc", 21, "espnet1_256"),
}

#: Objectives compared in docs/learning.md: keyword arguments of cucrf.fit.
CONFIGS = {
    "default": {},
    # the objective and settings fit had before: plain cross-entropy, constant lr 0.02, the last epoch
    "previous": dict(temperature=False, prior=0.0, lr=0.02, lr_schedule=None, val_fraction=0),
    "plain-ce": dict(temperature=False, prior=0.0, lr=0.02, lr_schedule=None),
    "plain-ce-selected": dict(temperature=False, prior=0.0),
    "temperature": dict(prior=0.0),
    "temperature-prior0.1": dict(prior=0.1),
    "temperature-lr0.02": dict(lr=0.02),
    "balanced": dict(class_weights="balanced"),
    "metric-accuracy": dict(metric="accuracy"),
    "metric-miou-gt": dict(metric="miou_gt"),
    "metric-loss": dict(metric="loss"),
    "no-compat": dict(learn=("weights", "bandwidths", "unary_weight")),
    "no-guard": dict(guard=False),
    "miou-gt-no-guard": dict(metric="miou_gt", guard=False),
    "lovasz1": dict(lovasz=1.0),
    "lovasz0.3": dict(lovasz=0.3),
    "min-improvement": dict(min_improvement=0.002),
    "lr0.05": dict(lr=0.05),
    "no-compat-lr0.05": dict(learn=("weights", "bandwidths", "unary_weight"), lr=0.05),
    "prior1": dict(prior=1.0),
    "prior1-lr0.05": dict(prior=1.0, lr=0.05),
}


def downscale(image, label, unary, scale):
    if scale == 1:
        return image, label, unary
    H, W = label.shape
    h, w = H // scale, W // scale

    def area(x):  # (..., H, W) -> (..., h, w)
        x = x[..., :h * scale, :w * scale].astype(np.float32)
        return x.reshape(x.shape[:-2] + (h, scale, w, scale)).mean(axis=(-3, -1))

    image = np.moveaxis(area(np.moveaxis(image, -1, 0)), 0, -1)
    label = np.ascontiguousarray(label[:h * scale:scale, :w * scale:scale])
    return image, label, None if unary is None else area(unary)


def load_set(data_dir, name, scale):
    folder, classes, kind = SETS[name]
    unary_dir = os.path.join(data_dir, "unaries") if kind != "synthetic" else None
    pattern = "{name}_" + kind + ".npz"
    samples = datasets.load_pairs(os.path.join(data_dir, folder), unary_dir=unary_dir, unary_pattern=pattern)
    out = []
    for s in samples:
        image, label, unary = downscale(s.image, s.label, None if s.unary is None else s.unary.astype(np.float32),
                                        scale)
        out.append((s.name, image, label, unary))
    return out, classes, kind


def score(predictions, labels, classes):
    sc = metrics.SegmentationScore(classes)
    for p, lab in zip(predictions, labels):
        sc.add(p, lab)
    return {"accuracy": sc.accuracy, "miou": sc.miou, "miou_gt": metrics.mean_iou(sc.cm, "gt")}


def densecrf_predictions(unaries, images):
    from cucrf._peers import densecrf_available, densecrf_infer
    from cucrf.evaluation import DENSECRF_PARAMS

    if not densecrf_available():
        return None
    out = []
    for u, im in zip(unaries, images):
        logp = u - np.log(np.exp(u - u.max(0)).sum(0)) - u.max(0)
        q = densecrf_infer(logp, np.ascontiguousarray(np.clip(np.rint(im), 0, 255).astype(np.uint8)), iterations=5,
                           **DENSECRF_PARAMS)
        out.append(np.asarray(q).argmax(0))
    return out


def run_one(name, samples, classes, kind, seed, config, args):
    pool = list(range(0, len(samples), 2))
    test = list(range(1, len(samples), 2))

    def unary(i):
        _, _, label, u = samples[i]
        return datasets.synthetic_unary(label, classes, seed=1000 * seed + i) if kind == "synthetic" else u

    U = [unary(i) for i in pool]
    I = [samples[i][1] for i in pool]
    L = [samples[i][2] for i in pool]
    t0 = time.perf_counter()
    result = cucrf.fit(U, I, L, seed=seed, progress=False, num_classes=classes, **CONFIGS[config])
    seconds = time.perf_counter() - t0
    tU = [unary(i) for i in test]
    tI = [samples[i][1] for i in test]
    tL = [samples[i][2] for i in test]
    row = {"set": name, "unaries": kind, "seed": seed, "config": config, "pool": len(pool), "test": len(test),
           "fit_seconds": seconds, "best_epoch": result.best_epoch, "improved": result.improved,
           "validation": result.validation, "temperature": result.temperature,
           "params": result.params.to_dict(), "history": result.history}
    row["unary"] = score([u.argmax(0) for u in tU], tL, classes)
    row["default"] = score([cucrf.infer(u, im).argmax(0) for u, im in zip(tU, tI)], tL, classes)
    row["fitted"] = score([cucrf.infer(u, im, result.params, feature_transform=result.feature_transform).argmax(0)
                           for u, im in zip(tU, tI)], tL, classes)
    if args.densecrf:
        dense = densecrf_predictions(tU, tI)
        row["densecrf"] = None if dense is None else score(dense, tL, classes)
    d = {k: 100 * (row["fitted"][k] - row["default"][k]) for k in ("accuracy", "miou", "miou_gt")}
    print(f"{name:12s} seed {seed} {config:22s} epoch {result.best_epoch:2d}  fitted - default: "
          f"acc {d['accuracy']:+.2f}  mIoU {d['miou']:+.2f}  mIoU(gt) {d['miou_gt']:+.2f}   "
          f"[default mIoU {100 * row['default']['miou']:.2f}]  {seconds:.0f} s", flush=True)
    return row


def write_split(path, samples):
    names = [s[0] for s in samples]
    split = {"train": [names[i] for i in range(0, len(names), 2)], "validation": [],
             "test": [names[i] for i in range(1, len(names), 2)]}
    with open(path, "w") as f:
        json.dump(split, f, indent=1)


def table(rows):
    """Markdown: per set and config, mean over seeds (min .. max) of each method's test scores."""
    lines = ["| set | config | method | accuracy | mIoU | mIoU (gt classes) |", "|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        if (r["set"], r["config"]) not in keys:
            keys.append((r["set"], r["config"]))
    for s, c in keys:
        group = [r for r in rows if (r["set"], r["config"]) == (s, c)]
        for method in ("unary", "densecrf", "default", "fitted"):
            vals = [r.get(method) for r in group]
            if any(v is None for v in vals):
                continue
            cells = []
            for k in ("accuracy", "miou", "miou_gt"):
                x = 100 * np.array([v[k] for v in vals])
                cells.append(f"{x.mean():.2f} ({x.min():.2f}..{x.max():.2f})" if len(x) > 1 else f"{x[0]:.2f}")
            label = {"default": "default CRF", "fitted": "fitted CRF", "unary": "unary", "densecrf": "DenseCRF"}[method]
            lines.append(f"| {s} | {c} | {label} | " + " | ".join(cells) + " |")
        diffs = []
        for k in ("accuracy", "miou", "miou_gt"):
            x = 100 * np.array([r["fitted"][k] - r["default"][k] for r in group])
            diffs.append(f"{x.mean():+.2f} ({x.min():+.2f}..{x.max():+.2f})")
        lines.append(f"| {s} | {c} | **fitted − default** | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    """The command line (``output``: the JSON file of the rows; a new temporary folder's by default)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--sets", default="msrc,camvid,voc,voc-espnet2,voc-espnet1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--config", default="default", help="comma-separated names from: " + ", ".join(CONFIGS))
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--no-densecrf", dest="densecrf", action="store_false")
    ap.add_argument("--output", "--out", dest="output", metavar="FILE.json",
                    help="where the rows go (default: fit-eval.json in a new temporary folder)")
    ap.add_argument("--split-dir", default=None, help="write each set's split as SET.json here")
    args = ap.parse_args(argv)
    if args.output is None:
        args.output = os.path.join(tempfile.mkdtemp(prefix="cucrf-evaluate-fit-"), "fit-eval.json")
    return ap, args


def main(argv=None):
    ap, args = parse_args(argv)
    print(f"writing the rows to {args.output}", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = args.config.split(",")
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    rows = []
    for name in args.sets.split(","):
        if name not in SETS:
            ap.error(f"unknown set {name!r}; choose from {', '.join(SETS)}")
        if not os.path.isdir(os.path.join(args.data_dir, SETS[name][0])):
            print(f"skipping {name}: not in {args.data_dir}", file=sys.stderr)
            continue
        samples, classes, kind = load_set(args.data_dir, name, args.scale)
        if args.split_dir:
            os.makedirs(args.split_dir, exist_ok=True)
            write_split(os.path.join(args.split_dir, f"{SETS[name][0]}.json"), samples)
        for config in configs:
            for seed in seeds:
                rows.append(run_one(name, samples, classes, kind, seed, config, args))
                with open(args.output, "w") as f:
                    json.dump(rows, f, indent=1)
    print()
    print(table(rows))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
