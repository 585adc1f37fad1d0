#!/usr/bin/env python3
"""pydensecrf and cucrf on the same real image and network logits, side by side.

Usage::

    python scripts/pydensecrf_comparison.py DATA_DIR [--id ID] [--unaries NAME] [--out PNG]
                                            [--with-image] [--table]

DATA_DIR holds ``voc/`` (``<id>_image.png`` / ``<id>_label.png``, PASCAL VOC class ids, 255 =
ignored) and ``unaries/`` (``<id>_<NAME>.npz`` with an array ``logits`` (21, H, W)). Needs
pydensecrf (``scripts/install-densecrf.sh``) and matplotlib.

Every method refines the same unary, the log-softmax of the network's logits:

* the network alone (the argmax of its logits);
* pydensecrf with DenseCRF's usual parameters (Gaussian sxy 3 compat 3; bilateral sxy 80 srgb 13
  compat 10; symmetric normalisation, pydensecrf's default), 5 iterations;
* cucrf with the same parameters translated as docs/pydensecrf-migration.md says
  (``theta_gamma=3, smoothness_weight=3, theta_alpha=80, theta_beta=13, appearance_weight=10``,
  ``normalization="symmetric"``, ``include_self=True``) in cucrf's default window (filter 5, blur 4:
  pixels up to 10 apart interact) and in a window of 63 cells at blur 8 (up to 252 pixels apart,
  close to fully connected on a VOC image);
* cucrf with its own defaults.

Writes ``--out`` (default ``docs/images/pydensecrf_comparison.png``): the label maps of the
network, pydensecrf and the two translated cucrf runs, with pixel accuracy against the ground
truth (label 255 ignored) and the agreement with pydensecrf in the titles. The figure shows label
maps only: the data set's photographs and annotations may not be redistributed, so they appear
only with ``--with-image`` (then write the figure outside the repository). ``--table`` also
scores every image of ``voc/`` that has a unary NAME and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cucrf  # noqa: E402
from cucrf import datasets, metrics, palette  # noqa: E402

NUM_CLASSES = 21
ITERATIONS = 5
#: DenseCRF's usual parameters (pydensecrf's README and the ConvCRF paper's FullCRF).
GAUSSIAN = dict(sxy=3, compat=3)
BILATERAL = dict(sxy=80, srgb=13, compat=10)
#: The same parameters in cucrf, as docs/pydensecrf-migration.md translates them.
TRANSLATED = cucrf.CRFParams(theta_gamma=GAUSSIAN["sxy"], smoothness_weight=GAUSSIAN["compat"],
                             theta_alpha=BILATERAL["sxy"], theta_beta=BILATERAL["srgb"],
                             appearance_weight=BILATERAL["compat"])
DENSECRF_SETTINGS = dict(normalization="symmetric", include_self=True)
WINDOWS = {"default window": (5, 4), "wide window": (63, 8)}


def log_softmax(logits):
    """Log-probabilities (C, H, W) float32 of logits (C, H, W), computed in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=0)
    return (z - np.log(np.exp(z).sum(axis=0))).astype(np.float32)


def run_pydensecrf(log_p, image):
    """pydensecrf's marginals (C, H, W) for log-probabilities (C, H, W) and an RGB uint8 image."""
    import pydensecrf.densecrf as dcrf

    c, h, w = log_p.shape
    crf = dcrf.DenseCRF2D(w, h, c)                           # width first
    crf.setUnaryEnergy(np.ascontiguousarray(-log_p.reshape(c, h * w)))   # energies: -log p
    crf.addPairwiseGaussian(**GAUSSIAN)
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(image), **BILATERAL)
    return np.asarray(crf.inference(ITERATIONS), dtype=np.float32).reshape(c, h, w)


def run_methods(image, log_p):
    """{name: (labels (H, W), seconds)} of every method on one image."""
    out = {"network": (log_p.argmax(axis=0), 0.0)}
    start = time.perf_counter()
    out["pydensecrf"] = (run_pydensecrf(log_p, image).argmax(axis=0), time.perf_counter() - start)
    for name, (k, b) in WINDOWS.items():
        start = time.perf_counter()
        q = cucrf.infer(log_p, image, TRANSLATED, filter_size=k, blur=b, iterations=ITERATIONS,
                        **DENSECRF_SETTINGS)
        out[f"cucrf, {name}"] = (q.argmax(axis=0), time.perf_counter() - start)
    start = time.perf_counter()
    out["cucrf defaults"] = (cucrf.infer(log_p, image).argmax(axis=0), time.perf_counter() - start)
    return out


def load(data, name, unaries):
    (sample,) = datasets.load_pairs(Path(data) / "voc", unary_dir=Path(data) / "unaries",
                                    unary_pattern="{name}_" + unaries + ".npz", names=[name])
    return sample.image, sample.label, log_softmax(sample.unary)


def accuracy(labels, truth):
    keep = truth != palette.IGNORE_LABEL
    return float((labels[keep] == truth[keep]).mean())


def figure(path, name, unaries, image, truth, results, with_image):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = {n: f"filter {k}, blur {b}: ±{k // 2 * b + b // 2} px" for n, (k, b) in WINDOWS.items()}
    panels = []
    if with_image:
        panels += [("image", image), ("ground truth", palette.color_labels(truth))]
    for method, title in [("network", f"network ({unaries})"),
                          ("pydensecrf", "pydensecrf (DenseCRF, fully connected)"),
                          ("cucrf, default window", f"cucrf, same parameters,\n{window['default window']}"),
                          ("cucrf, wide window", f"cucrf, same parameters,\n{window['wide window']}")]:
        labels = results[method][0]
        text = f"{title}\naccuracy {accuracy(labels, truth):.1%}"
        if method.startswith("cucrf"):
            text += f",\nthe same label as pydensecrf at {(labels == results['pydensecrf'][0]).mean():.1%} of the pixels"
        panels.append((text, palette.color_labels(labels)))
    columns = 2 if len(panels) == 4 else 3
    rows = -(-len(panels) // columns)
    h, w = truth.shape
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 3.3, rows * 3.3 * h / w + rows * 0.8), dpi=100)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, (title, picture) in zip(np.ravel(axes), panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"VOC {name}: the same logits refined (5 iterations each)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(data, unaries):
    ids = sorted(p.name[: -len("_image.png")] for p in (Path(data) / "voc").glob("*_image.png")
                 if (Path(data) / "unaries" / f"{p.name[: -len('_image.png')]}_{unaries}.npz").is_file())
    if not ids:
        raise SystemExit(f"no image in {data}/voc has a unary {data}/unaries/<id>_{unaries}.npz")
    scores, same, pixels = {}, {}, 0
    for name in ids:
        image, truth, log_p = load(data, name, unaries)
        results = run_methods(image, log_p)
        for method, (labels, _) in results.items():
            scores.setdefault(method, metrics.SegmentationScore(NUM_CLASSES)).add(labels, truth)
            same[method] = same.get(method, 0) + int((labels == results["pydensecrf"][0]).sum())
        pixels += truth.size
        print(f"  {name} done", file=sys.stderr)
    print(f"| method ({len(ids)} VOC images, {unaries} logits) | pixel accuracy % | mIoU % | mIoU (gt classes) % "
          "| same label as pydensecrf % |")
    print("|---|---:|---:|---:|---:|")
    for method, score in scores.items():
        print(f"| {method} | {100 * score.accuracy:.2f} | {100 * score.miou:.2f} | "
              f"{100 * metrics.mean_iou(score.cm, classes='gt'):.2f} | {100 * same[method] / pixels:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", metavar="DATA_DIR", help="folder with voc/ and unaries/")
    parser.add_argument("--id", default="2007_000033", help="the image (default: the first VOC image, 2007_000033)")
    parser.add_argument("--unaries", default="espnet2_384", help="the unary files' NAME (default: espnet2_384)")
    parser.add_argument("--out", default=str(REPO / "docs" / "images" / "pydensecrf_comparison.png"),
                        help="output PNG (default: docs/images/pydensecrf_comparison.png)")
    parser.add_argument("--with-image", action="store_true",
                        help="also show the photograph and the ground truth (keep such a figure out of the repository)")
    parser.add_argument("--table", action="store_true", help="also score every VOC image and print a Markdown table")
    args = parser.parse_args(argv)
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        raise SystemExit("pydensecrf is not installed: run scripts/install-densecrf.sh") from None
    out = Path(args.out)
    if args.with_image and out.resolve().is_relative_to(REPO):
        raise SystemExit(f"--with-image shows the data set's pictures: write {out} outside the repository")

    image, truth, log_p = load(args.data, args.id, args.unaries)
    results = run_methods(image, log_p)
    for method, (labels, seconds) in results.items():
        print(f"{method:24s} accuracy {accuracy(labels, truth):.4f}  same label as pydensecrf "
              f"{(labels == results['pydensecrf'][0]).mean():.4f}  {seconds:.2f} s")
    figure(out, args.id, args.unaries, image, truth, results, args.with_image)
    print(f"wrote {out}")
    if args.table:
        table(args.data, args.unaries)


if __name__ == "__main__":
    main()
