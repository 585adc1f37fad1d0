#!/usr/bin/env python3
"""Measure CRF settings on labelled data: the evidence behind cucrf's defaults.

Usage::

    python scripts/tune_defaults.py DATA_DIR [--sweep NAME] [--max-images N] [--jobs 2]

DATA_DIR holds ``voc/``, ``msrc/``, ``camvid/`` (``<id>_image.png`` / ``<id>_label.png`` pairs) and
optionally ``unaries/`` (``<id>_espnet2_384.npz`` / ``<id>_espnet1_256.npz`` with raw logits for
the VOC images). Each setting is scored on every set: the synthetic protocol (noisy
log-probabilities, seed = image index) and the real network logits. Prints one row per setting:
mIoU of the unary and after the CRF, per set.
"""

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time

import numpy as np

import cucrf
from cucrf import datasets, metrics

SETS = {"voc": 21, "msrc": 23, "camvid": 11}


def load_tasks(data_dir, max_images):
    tasks = []
    for name, classes in SETS.items():
        folder = os.path.join(data_dir, name)
        if not os.path.isdir(folder):
            continue
        samples = datasets.load_pairs(folder)[:max_images]
        for i, s in enumerate(samples):
            unary = datasets.synthetic_unary(s.label, classes, seed=i)
            tasks.append((f"{name}-synthetic", classes, s.image, s.label, unary))
    unary_dir = os.path.join(data_dir, "unaries")
    if os.path.isdir(unary_dir):
        for s in datasets.load_pairs(os.path.join(data_dir, "voc"))[:max_images]:
            for net in ("espnet2_384", "espnet1_256"):
                path = os.path.join(unary_dir, f"{s.name}_{net}.npz")
                if os.path.exists(path):
                    logits = np.load(path)["logits"].astype(np.float32)
                    tasks.append((f"voc-{net}", 21, s.image, s.label, logits))
    return tasks


_TASKS = None


def _init(tasks):
    global _TASKS
    _TASKS = tasks


def _run(args):
    setting, idx = args
    set_name, classes, image, label, unary = _TASKS[idx]
    params = cucrf.CRFParams(**setting["params"])
    t = time.perf_counter()
    if setting.get("iterations", 5) == 0:
        pred = unary.argmax(axis=0)
    else:
        q = cucrf.infer(unary, image, params, filter_size=setting["filter_size"], blur=setting["blur"],
                        iterations=setting.get("iterations", 5), normalization=setting.get("normalization"))
        pred = q.argmax(axis=0)
    elapsed = time.perf_counter() - t
    return set_name, metrics.confusion_matrix(pred, label, classes), elapsed


def evaluate(settings, tasks, jobs):
    """Return, per setting, {set name: (mIoU, accuracy, seconds per image)}."""
    work = [(s, i) for s in settings for i in range(len(tasks))]
    with multiprocessing.Pool(jobs, initializer=_init, initargs=(tasks,)) as pool:
        results = pool.map(_run, work, chunksize=1)
    out = []
    for k, setting in enumerate(settings):
        chunk = results[k * len(tasks):(k + 1) * len(tasks)]
        per_set = {}
        for set_name, cm, t in chunk:
            acc = per_set.setdefault(set_name, [0, 0.0, 0])
            acc[0] = acc[0] + cm
            acc[1] += t
            acc[2] += 1
        out.append({n: (metrics.mean_iou(cm), metrics.pixel_accuracy(cm), t / n_img,
                        metrics.mean_iou(cm, classes="gt"))
                    for n, (cm, t, n_img) in per_set.items()})
    return out


def sweeps():
    base = dict(filter_size=7, blur=4, normalization=None,
                params=dict(theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0,
                            appearance_weight=10.0, smoothness_weight=3.0))

    def vary(**grid):
        keys = list(grid)
        for values in itertools.product(*grid.values()):
            s = json.loads(json.dumps(base))
            for k, v in zip(keys, values):
                if k in s["params"]:
                    s["params"][k] = v
                else:
                    s[k] = v
            yield s

    return {
        "unary": [dict(base, iterations=0)],
        "weights": list(vary(appearance_weight=[1.0, 3.0, 10.0], smoothness_weight=[0.0, 1.0, 3.0],
                             normalization=[None, "symmetric"])),
        "bandwidths": list(vary(theta_alpha=[20.0, 80.0], theta_beta=[5.0, 13.0, 30.0],
                                appearance_weight=[3.0, 10.0])),
        "window": list(vary(filter_size=[5, 7, 11], blur=[1, 2, 4])),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--sweep", default="weights", help="one of: " + ", ".join(sweeps()) + ", or a JSON list of settings")
    parser.add_argument("--max-images", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    table = sweeps()
    settings = json.loads(args.sweep) if args.sweep.startswith("[") else table["unary"] + table[args.sweep]
    tasks = load_tasks(args.data_dir, args.max_images)
    rows = evaluate(settings, tasks, args.jobs)
    names = sorted(rows[0])
    print("setting | " + " | ".join(names) + " | mean | s/img  (each set: mIoU / mIoU over GT classes / accuracy)")
    for setting, row in zip(settings, rows):
        mean = np.mean([row[n][3] for n in names])
        secs = np.mean([row[n][2] for n in names])
        print(json.dumps(setting, sort_keys=True), "|",
              " | ".join(f"{row[n][0]:.4f} {row[n][3]:.4f} {row[n][1]:.4f}" for n in names),
              f"| {mean:.4f} | {secs:.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
