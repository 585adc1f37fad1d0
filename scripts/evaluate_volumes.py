#!/usr/bin/env python3
"""cucrf on volumes: the paper's synthetic task in 3-D on a labelled T1 MRI volume, with peers.

Usage::

    python scripts/evaluate_volumes.py [--data mni152_tissue.npz] [--out DIR] [--seeds 0,1,2]
                                       [--tune-seeds 100,101] [--downsample 8] [--replace-prob 0.2]
                                       [--peers-python /path/to/venv/bin/python]
                                       [--figure docs/images/volumes-mni152.png] [--no-tune] [--no-fit]

The data file holds ``image`` (D, H, W, 1) uint8, ``label`` (D, H, W) uint8 with classes 0, 1, 2
and 255 = ignore, and ``spacing`` (3,) in mm (the MNI152 tissue volume of docs/volumes.md).

Protocol (docs/volumes.md):

* **split**, fixed: the upper half of the volume along z (slices ``[0, D/2)``) is used for
  everything that is tuned or fitted, the lower half (``[D/2, D)``) only for the reported scores.
  Each half is its own volume: nothing crosses the cut;
* **unary**: :func:`degrade_volume`, the 3-D version of ``cucrf.datasets.synthetic_unary`` (one-hot
  label, area-downsampled ``--downsample`` times along every axis, ``--replace-prob`` of the
  low-resolution cells replaced by a random class, trilinear upsampling, probabilities clipped at
  1e-5), used as log-probabilities. The script checks first that on a one-slice volume it gives
  exactly the 2-D function's unary. Noise seeds: ``--tune-seeds`` on the tuning half,
  ``--seeds`` on the test half;
* **features**: the intensities mapped by :func:`normalise_intensities` (the 1st-99th
  percentiles of the body's voxels to 0-255, clipped); positions are voxel indices times the
  spacing (mm);
* **methods**: the unary's argmax; ``cucrf.infer`` with its defaults (``CRFParams()``, filter 5,
  blur 4); with the parameters of a staged grid search on the tuning half (:func:`tune`), once
  over all windows (the volume defaults that docs/volumes.md recommends) and once over the fast
  windows ``FAST_WINDOWS`` only; with ``cucrf.fit`` from ``CRFParams()`` at the default window
  (:func:`fit_params`); SimpleCRF's ``densecrf3d`` (its demo's parameters, cucrf's
  volume defaults, and the best of a small grid on the tuning half) and MONAI's ``CRF`` (its
  defaults on the image / 255, and the best of a small grid on the tuning half), run through
  ``--peers-python`` (a separate environment with ``SimpleCRF``, ``torch`` and ``monai`` built
  with its C++ extension ``monai._C``), 5 mean-field iterations each, on the same unaries and
  features;
* **the window**: every fast window and the volume defaults' window with the volume defaults'
  kernel parameters, scored on both halves (a diagnostic; nothing is chosen from it);
* **scores**: Dice per class and the mean Dice over the three classes, labelled voxels only
  (label 255 ignored), per seed and averaged;
* **speed**: a 120x150x100 crop (x, y, z) with two classes (tissue or not), every method with 5
  iterations in this one run; the machine's load average is recorded with the times;
* **intensity scaling**: the test half stored in other ways (floats in 0-1; another gain and
  offset with a smooth bias field and noise), refined with the volume defaults without
  normalisation, with the percentile normalisation and with a z-score normalisation;
* **thick slices**: every 4th slice, each the mean of its 4-slice slab (4 mm x 1 mm x 1 mm),
  refined with the spacing ignored, with ``spacing=(4, 1, 1)``, and with per-axis blur.

Everything is written into ``--out`` (default: a new temporary folder): ``volumes.json`` (every
number) and ``volumes.md`` (the tables of docs/volumes.md); the picture goes to ``--figure``
(default: ``OUT/volumes-mni152.png``).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

CLASS_NAMES = ("background", "grey matter", "white matter")
DEFAULT_DATA = "/work/shared/data/volumes/mni152_tissue.npz"
SPEED_SHAPE = (100, 150, 120)  # (z, y, x): the 120x150x100 volume of the peers' reports
ITERATIONS = 5
#: cucrf.fit's options here, chosen by fit's own validation score on the tuning half (docs/volumes.md)
FIT_OPTIONS = {"class_weights": "balanced", "lovasz": 1.0, "lr": 0.2, "epochs": 20, "patience": 5}
FIT_SLABS = 4
#: the least gain in mean Dice for which the grid search moves a weight or a bandwidth away from its value
MIN_GAIN = 0.001
#: windows (filter_size, blur) that take at most about 1 s on the 120x150x100 two-class volume here
FAST_WINDOWS = ((5, 4), (3, 4), (7, 4), (9, 4), (5, 3))
BEST, FAST = "cucrf tuned, best window (volume defaults)", "cucrf tuned, fast windows only"


# -- the synthetic task in 3-D -------------------------------------------------------------------

def _area_downsample(x, factor):
    """Average (C, *spatial) over non-overlapping ``factor``-wide cells -> (C, *ceil(n / factor)).

    A partial cell at the far border averages only the voxels it covers.
    """
    c, spatial = x.shape[0], x.shape[1:]
    low = tuple(-(-n // factor) for n in spatial)
    full = tuple(n * factor for n in low)
    inside = (slice(None),) + tuple(slice(0, n) for n in spatial)
    padded = np.zeros((c,) + full)
    padded[inside] = x
    count = np.zeros(full)
    count[inside[1:]] = 1.0
    blocks = [c]
    for n in low:
        blocks += [n, factor]
    s = padded.reshape(blocks).sum(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))
    n = count.reshape(blocks[1:]).sum(axis=tuple(range(1, 2 * len(spatial), 2)))
    return s / n


def _linear_upsample(x, factor, shape):
    """Upsample (C, *low) to (C, *shape) linearly along every axis, ``align_corners=False`` geometry.

    Output voxel i reads the low-resolution axis at ``(i + 0.5) / factor - 0.5``, clamped at the
    borders; axes are done one after the other (separable), as the 2-D function does rows then columns.
    """
    for axis, n_out in enumerate(shape, start=1):
        n_in = x.shape[axis]
        src = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) / factor - 0.5, 0.0, n_in - 1)
        i0 = np.floor(src).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = (src - i0).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        x = np.take(x, i0, axis=axis) * (1.0 - w) + np.take(x, i1, axis=axis) * w
    return x


def degrade_volume(label, num_classes, *, downsample=8, replace_prob=0.2, seed=0, ignore_index=255, clip=1e-5):
    """The ConvCRF paper's synthetic unary for a volume: ``cucrf.datasets.synthetic_unary`` in 3-D.

    Same steps and random draws as the 2-D function: one-hot (ignored voxels uniform), area
    downsampling by ``downsample`` along every axis, ``round(replace_prob * cells)`` distinct cells
    (drawn first) set to a random class (drawn second) with ``numpy.random.default_rng(seed)``,
    linear upsampling, probabilities clipped at ``clip`` and renormalised.

    Parameters
    ----------
    label : numpy.ndarray of int, shape (D, H, W)
        Class ids in ``[0, num_classes)`` or ``ignore_index``.
    num_classes : int
    downsample : int
    replace_prob : float
    seed : int
    ignore_index : int
    clip : float

    Returns
    -------
    numpy.ndarray of float32, shape (num_classes, D, H, W)
        Log-probabilities.
    """
    lab = np.asarray(label).astype(np.int64)
    ignore = lab == ignore_index
    onehot = np.zeros((num_classes,) + lab.shape)
    for c in range(num_classes):
        onehot[c][lab == c] = 1.0
    onehot[:, ignore] = 1.0 / num_classes
    low = _area_downsample(onehot, downsample)
    rng = np.random.default_rng(seed)
    n_cells = int(np.prod(low.shape[1:]))
    k = int(round(replace_prob * n_cells))
    if k > 0:
        cells = rng.choice(n_cells, size=k, replace=False)
        classes = rng.integers(0, num_classes, size=k)
        flat = low.reshape(num_classes, n_cells)  # a view into low
        flat[:, cells] = 0.0
        flat[classes, cells] = 1.0
    prob = _linear_upsample(low, downsample, lab.shape)
    prob = np.maximum(prob, clip)
    prob /= prob.sum(axis=0, keepdims=True)
    return np.ascontiguousarray(np.log(prob), dtype=np.float32)


def check_degradation_matches_2d(label_slice, num_classes, downsample, replace_prob):
    """A one-slice volume must get exactly the 2-D synthetic unary (same definition, same draws)."""
    from cucrf.datasets import synthetic_unary

    for seed in (0, 7):
        two_d = synthetic_unary(label_slice, num_classes, downsample=downsample, replace_prob=replace_prob, seed=seed)
        three_d = degrade_volume(label_slice[None], num_classes, downsample=downsample, replace_prob=replace_prob,
                                 seed=seed)[:, 0]
        if not np.allclose(two_d, three_d, rtol=0, atol=1e-6):
            raise AssertionError(f"3-D degradation differs from the 2-D one by {np.abs(two_d - three_d).max()}")


def dice_per_class(pred, label, num_classes, ignore_index=255):
    """Dice of each class over the labelled voxels: 2 |P & T| / (|P| + |T|) (NaN for a class in neither)."""
    keep = label != ignore_index
    t = label[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    cm = np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    with np.errstate(invalid="ignore"):
        return 2.0 * np.diag(cm) / (cm.sum(axis=0) + cm.sum(axis=1))


def normalise_intensities(image, low=1.0, high=99.0, body=None):
    """Map the ``low``-``high`` percentiles of the body's intensities to 0-255, clipped; float32.

    ``body`` is a boolean mask (D, H, W); by default the voxels above the image's minimum
    (the background of a skull-stripped or masked scan).
    """
    x = np.asarray(image, dtype=np.float64)
    if body is None:
        body = x[..., 0] > x.min()
    lo, hi = np.percentile(x[body], [low, high])
    return (np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.float32)


def standardise_intensities(image, body=None):
    """Zero mean and unit standard deviation inside the body (the background keeps its z-score); float32."""
    x = np.asarray(image, dtype=np.float64)
    if body is None:
        body = x[..., 0] > x.min()
    v = x[body]
    return ((x - v.mean()) / v.std()).astype(np.float32)


# -- cucrf ----------------------------------------------------------------------------------------

def run_cucrf(unary, features, params, window, spacing):
    """(labels (D, H, W) int64, seconds) of one cucrf.infer call; ``window`` = (filter_size, blur)."""
    import cucrf

    start = time.perf_counter()
    q = cucrf.infer(unary, features, params, filter_size=window[0], blur=window[1], iterations=ITERATIONS,
                    spatial_dims=3, spacing=spacing)
    seconds = time.perf_counter() - start
    return q.argmax(axis=0), seconds


def params_dict(params):
    return {k: v for k, v in params.to_dict().items() if k != "compatibility" or v != "potts"}


def tune(unaries, features, labels, spacing, log, windows=None, start=None):
    """Staged grid search on the tuning half; returns (params, window, rows of every candidate).

    Stage 1: bandwidths and the appearance weight at the default window (skipped when ``start``,
    stage 1's result of an earlier call, is given); stage 2: the window
    (filter_size, blur) among ``windows``; stage 3: theta_beta and the appearance weight again at
    that window, the grid extended while its best value lies on its edge; stage 4: the smoothness
    kernel. The score is the mean Dice over the classes, averaged over the tuning seeds; ties keep
    the earlier candidate.
    """
    from cucrf import CRFParams

    rows, cache = [], {}

    def score(p, window):
        key = (json.dumps(params_dict(p), sort_keys=True), window)
        if key not in cache:
            dice, seconds = [], []
            for unary, label in zip(unaries, labels):
                pred, s = run_cucrf(unary, features, p, window, spacing)
                dice.append(dice_per_class(pred, label, 3))
                seconds.append(s)
            d = np.mean(dice, axis=0)
            cache[key] = float(np.nanmean(d))
            rows.append({"params": params_dict(p), "filter_size": window[0], "blur": window[1],
                         "dice": d.tolist(), "mean_dice": cache[key], "seconds": float(np.mean(seconds))})
            log(f"  tune {window} {params_dict(p)}: mean Dice {cache[key]:.4f} ({np.mean(seconds):.1f} s)")
        return cache[key]

    def best_of(candidates):
        best = None
        for p, window in candidates:
            s = score(p, window)
            if best is None or s > best[0] + 1e-12:
                best = (s, p, window)
        return best[1], best[2]

    def line_search(p, window, name, factor, extensions=3):
        """One parameter on a geometric grid around p's value, extended while the best lies on an edge.

        A value replaces the current one only if it scores more than ``MIN_GAIN`` better: the
        scores saturate (a larger weight keeps gaining a few thousandths of a point), and a
        moderate value is the better default.
        """
        current = getattr(p, name)
        for _ in range(extensions + 1):
            values = [current / factor, current * factor]
            base = score(p, window)
            scored = [(score(p.replace(**{name: v}), window), v) for v in values]
            gain, v = max(scored)
            if gain <= base + MIN_GAIN:
                break
            current = v
            p = p.replace(**{name: v})
        return p

    base = CRFParams()
    window = (5, 4)
    if start is None:
        log("stage 1: theta_alpha, theta_beta, appearance weight at the default window")
        start, _ = best_of([(base.replace(theta_alpha=ta, theta_beta=tb, appearance_weight=wa), window)
                            for ta in (80.0, 40.0, 20.0, 10.0) for tb in (20.0, 10.0, 5.0, 40.0)
                            for wa in (10.0, 3.0, 30.0)])
    p = start
    log("stage 2: window")
    windows = windows or ((5, 4), (3, 4), (7, 4), (5, 3), (3, 2), (5, 2), (7, 2), (3, 1))
    p, window = best_of([(p, w) for w in windows])
    log(f"stage 3: appearance weight and theta_beta at the window {window}")
    for _ in range(2):  # two rounds: the two interact
        p = line_search(p, window, "appearance_weight", 3.0)
        p = line_search(p, window, "theta_beta", 1.5)
    log("stage 4: smoothness kernel")
    p, window = best_of([(p.replace(theta_gamma=tg, smoothness_weight=ws), window)
                         for tg in (3.0, 1.0, 6.0) for ws in (p.smoothness_weight, 0.0, 1.0, 3.0, 10.0)])
    return p, window, rows, start


def fit_params(start, window, unaries, features, labels, spacing, log):
    """cucrf.fit from ``start`` on the tuning half; returns (params, a summary of the run).

    Training volumes: the tuning half cut into 4 slabs along z, with the first tuning seed's unary;
    validation: the same slabs with the second seed's unary (fit selects the epoch on them).
    Options: class weights 'balanced' and a Lovasz term (white matter is the smallest class; plain
    cross-entropy is dominated by the background), lr 0.2, at most 20 epochs, patience 5.
    """
    import cucrf

    depth = labels[0].shape[0]
    edges = np.linspace(0, depth, FIT_SLABS + 1).astype(int)
    slabs = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
    train = ([unaries[0][:, s] for s in slabs], [features[s] for s in slabs], [labels[0][s] for s in slabs])
    val = ([unaries[1][:, s] for s in slabs], [features[s] for s in slabs], [labels[1][s] for s in slabs])
    start_time = time.perf_counter()
    result = cucrf.fit(*train, start, validation=val, filter_size=window[0], blur=window[1], iterations=ITERATIONS,
                       spatial_dims=3, spacing=spacing, num_classes=3, progress=False, seed=0, **FIT_OPTIONS)
    seconds = time.perf_counter() - start_time
    log(f"  fit: improved={result.improved}, best epoch {result.best_epoch}, {seconds:.0f} s; "
        f"{params_dict(result.params)}")
    history = [{k: (float(v) if isinstance(v, (int, float, np.floating)) and v is not None else v)
                for k, v in h.items()} for h in result.history]
    return result.params, {"improved": bool(result.improved), "best_epoch": int(result.best_epoch),
                           "seconds": seconds, "history": history, "validation": result.validation,
                           "options": FIT_OPTIONS, "slabs": FIT_SLABS}


# -- peers, run in their own environment -----------------------------------------------------------

def _simplecrf_param(p):
    """SimpleCRF's parameter dict from (iterations, theta_gamma, w_s, theta_alpha, theta_beta, w_a)."""
    it, tg, ws, ta, tb, wa = p
    return {"MaxIterations": float(it), "PosW": float(ws), "PosRStd": float(tg), "PosCStd": float(tg),
            "PosZStd": float(tg), "BilateralW": float(wa), "BilateralRStd": float(ta), "BilateralCStd": float(ta),
            "BilateralZStd": float(ta), "ModalityNum": 1, "BilateralModsStds": (float(tb),)}


def peer_worker(job_path, out_path):
    """Run the peer jobs of ``job_path`` (an .npz written by :func:`run_peers`) in this interpreter.

    Each job: a method ('simplecrf' or 'monai'), a unary and image key, and the method's parameters.
    Writes the labels and the seconds of every job (or the error) to ``out_path``.
    """
    data = np.load(job_path, allow_pickle=False)
    jobs = json.loads(str(data["jobs"]))
    results, arrays = [], {}
    for i, job in enumerate(jobs):
        unary = data[job["unary"]]
        image = data[job["image"]]
        try:
            if job["method"] == "simplecrf":
                import denseCRF3D

                prob = np.exp(unary - unary.max(axis=0, keepdims=True))
                prob /= prob.sum(axis=0, keepdims=True)
                prob = np.ascontiguousarray(np.moveaxis(prob, 0, -1), dtype=np.float32)  # (D, H, W, C)
                img = np.ascontiguousarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))  # (D, H, W, 1)
                param = _simplecrf_param(job["params"])
                devnull = os.open(os.devnull, os.O_WRONLY)  # densecrf3d prints its parameters
                saved = os.dup(1)
                os.dup2(devnull, 1)
                try:
                    start = time.perf_counter()
                    labels = denseCRF3D.densecrf3d(img, prob, param)
                    seconds = time.perf_counter() - start
                finally:
                    os.dup2(saved, 1)
                    os.close(devnull)
                    os.close(saved)
            elif job["method"] == "monai":
                import torch
                from monai.networks.blocks import CRF

                it, tg, ws, ta, tb, wa, update = job["params"]
                crf = CRF(iterations=int(it), bilateral_weight=wa, gaussian_weight=ws, bilateral_spatial_sigma=ta,
                          bilateral_color_sigma=tb, gaussian_spatial_sigma=tg, update_factor=update)
                logits = torch.from_numpy(np.ascontiguousarray(unary[None], dtype=np.float32))
                reference = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)[None], dtype=np.float32))
                reference = reference * float(job.get("image_scale", 1.0))
                with torch.no_grad():
                    start = time.perf_counter()
                    q = crf(logits, reference)
                    seconds = time.perf_counter() - start
                labels = q[0].argmax(dim=0).numpy()
            else:
                raise ValueError(f"unknown method {job['method']!r}")
            arrays[f"labels{i}"] = np.asarray(labels).astype(np.uint8)
            results.append({"seconds": seconds, "error": None})
        except Exception as exc:  # a peer failing is a result to report, not a reason to stop
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            results.append({"seconds": None, "error": f"{type(exc).__name__}: {first_line}"})
        print(f"peer job {i} {job['method']}: {results[-1]}", flush=True)
    np.savez(out_path, results=json.dumps(results), **arrays)


def run_peers(python, jobs, arrays, workdir, timeout, log):
    """Run ``jobs`` in the peers' interpreter; returns one dict per job: labels, seconds, error."""
    job_path = Path(workdir) / "peer-jobs.npz"
    out_path = Path(workdir) / "peer-results.npz"
    np.savez(job_path, jobs=json.dumps(jobs), **arrays)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    try:
        proc = subprocess.run([python, os.path.abspath(__file__), "--peer-worker", str(job_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"labels": None, "seconds": None, "error": f"timed out after {timeout} s"} for _ in jobs]
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return [{"labels": None, "seconds": None, "error": " | ".join(tail)} for _ in jobs]
    with np.load(out_path) as data:
        out = []
        for i, r in enumerate(json.loads(str(data["results"]))):
            out.append({"labels": data[f"labels{i}"] if f"labels{i}" in data else None, **r})
    job_path.unlink()
    out_path.unlink()
    return out


def peer_versions(python):
    code = ("import importlib.metadata as m, json\n"
            "v = {}\n"
            "for n in ('torch', 'monai', 'SimpleCRF'):\n"
            "    try: v[n] = m.version(n)\n"
            "    except Exception as e: v[n] = None\n"
            "try:\n"
            "    import monai._C; v['monai._C'] = True\n"
            "except Exception as e: v['monai._C'] = f'{type(e).__name__}: {e}'\n"
            "try:\n"
            "    import denseCRF3D; v['denseCRF3D'] = True\n"
            "except Exception as e: v['denseCRF3D'] = f'{type(e).__name__}: {e}'\n"
            "print(json.dumps(v))\n")
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


# -- the picture ----------------------------------------------------------------------------------

def make_figure(path, image, degraded, refined, truth, planes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = np.zeros((256, 3))
    colours[1] = (0.95, 0.55, 0.15)   # grey matter
    colours[2] = (0.35, 0.75, 1.0)    # white matter
    colours[255] = (0.45, 0.45, 0.45)  # ignored
    cmap = ListedColormap(colours)
    z, y, x = planes
    views = [("axial", lambda a: a[z]), ("coronal", lambda a: a[:, y]), ("sagittal", lambda a: a[:, :, x])]
    rows = [("T1 image", image[..., 0], "gray"), ("degraded unary", degraded, cmap),
            ("cucrf, volume defaults", refined, cmap), ("ground truth", truth, cmap)]
    shapes = [take(truth).shape for _, take in views]
    ratios = [h / w for h, w in shapes]  # each view as tall as its aspect needs, one column width for all
    fig, axes = plt.subplots(len(views), len(rows), figsize=(8.0, 2.0 * sum(ratios) + 0.8),
                             gridspec_kw={"height_ratios": ratios})
    for r, (view, take) in enumerate(views):
        for c, (title, volume, cm) in enumerate(rows):
            ax = axes[r, c]
            if cm == "gray":
                ax.imshow(take(volume), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(take(volume).astype(np.uint8), cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(view, fontsize=9)
    fig.suptitle("MNI152 T1, held-out lower half: grey matter orange, white matter blue, ignored grey", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


# -- reporting ------------------------------------------------------------------------------------

def fmt_dice(d):
    return " | ".join(f"{100 * v:.2f}" for v in d) + f" | **{100 * np.nanmean(d):.2f}**"


def summary(per_seed):
    """Mean over seeds of per-class Dice (seeds x classes) and of their means; the spread of the mean."""
    a = np.asarray(per_seed, dtype=np.float64)
    means = np.nanmean(a, axis=1)
    return a.mean(axis=0), float(means.mean()), float(means.min()), float(means.max())


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tune-seeds", default="100,101")
    parser.add_argument("--downsample", type=int, default=8)
    parser.add_argument("--replace-prob", type=float, default=0.2)
    parser.add_argument("--peers-python", default=None, help="interpreter with SimpleCRF and monai (with monai._C)")
    parser.add_argument("--peer-timeout", type=int, default=3000, help="seconds for all peer jobs of one batch")
    parser.add_argument("--figure", default=None)
    parser.add_argument("--no-tune", action="store_true", help="skip the grid; use --params instead")
    parser.add_argument("--params", default=None, help="an earlier run's volumes.json, or a JSON file with "
                        "{'params': {...}, 'filter_size': K, 'blur': B}")
    parser.add_argument("--no-fit", action="store_true")
    parser.add_argument("--peer-worker", nargs=2, metavar=("JOBS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_worker:
        peer_worker(*args.peer_worker)
        return 0

    import cucrf
    from cucrf import CRFParams

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cucrf-volumes-"))
    out.mkdir(parents=True, exist_ok=True)
    figure = Path(args.figure) if args.figure else out / "volumes-mni152.png"
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    tune_seeds = [int(s) for s in args.tune_seeds.split(",")]
    data = np.load(args.data)
    image, label = data["image"], data["label"]
    spacing = tuple(float(s) for s in data["spacing"])
    depth = label.shape[0]
    cut = depth // 2
    halves = {"tune": slice(0, cut), "test": slice(cut, depth)}
    log(f"volume {label.shape}, spacing {spacing} mm; tuning half z [0, {cut}), test half z [{cut}, {depth})")
    check_degradation_matches_2d(label[(3 * depth) // 4], 3, args.downsample, args.replace_prob)
    log("3-D degradation of a one-slice volume == cucrf.datasets.synthetic_unary: ok")

    features = {name: normalise_intensities(image[s]) for name, s in halves.items()}
    labels = {name: label[s] for name, s in halves.items()}
    body = image[halves["test"]][..., 0] > image.min()
    lo, hi = np.percentile(image[halves["test"]][..., 0][body], [1, 99])
    log(f"test half: body percentiles 1 / 99 = {lo:.0f} / {hi:.0f} (uint8 units)")
    unary = {"tune": [degrade_volume(labels["tune"], 3, downsample=args.downsample, replace_prob=args.replace_prob,
                                     seed=s) for s in tune_seeds],
             "test": [degrade_volume(labels["test"], 3, downsample=args.downsample, replace_prob=args.replace_prob,
                                     seed=s) for s in seeds]}
    report = {"data": os.path.basename(args.data), "shape": list(label.shape), "spacing": spacing,
              "split": {"tune": [0, cut], "test": [cut, depth]}, "seeds": seeds, "tune_seeds": tune_seeds,
              "downsample": args.downsample, "replace_prob": args.replace_prob, "iterations": ITERATIONS,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                          "cucrf_threads": __import__("cucrf._parallel", fromlist=["num_threads"]).num_threads(),
                          "load_average_start": load_average()}}

    # 1. parameters for volumes, chosen on the tuning half: the best window, and the best fast one
    default_params, default_window = CRFParams(), (cucrf.DEFAULT_FILTER_SIZE, cucrf.DEFAULT_BLUR)
    if args.no_tune:
        if not args.params:
            parser.error("--no-tune needs --params")
        earlier = json.loads(Path(args.params).read_text())
        grid = earlier.get("grid", {})  # an earlier run's volumes.json: its choices and its grid
        # the first choice is the best window's, the second the fast windows' (as this script writes them)
        chosen = {name: (CRFParams.from_dict(c["params"]), (c["filter_size"], c["blur"]))
                  for name, c in zip((BEST, FAST), earlier["tuned"].values())}
        grid = dict(zip((BEST, FAST), grid.values()))
        log(f"parameters from {args.params} (not tuned in this run)")
        report["tuned_from"] = os.path.basename(args.params)
    else:
        log("tuning on the upper half")
        tune_labels = [labels["tune"]] * len(tune_seeds)
        best, best_window, rows, stage1 = tune(unary["tune"], features["tune"], tune_labels, spacing, log)
        log(f"tuning among the fast windows {FAST_WINDOWS}, from stage 1's result")
        fast, fast_window, fast_rows, _ = tune(unary["tune"], features["tune"], tune_labels, spacing, log,
                                               windows=FAST_WINDOWS, start=stage1)
        chosen = {BEST: (best, best_window), FAST: (fast, fast_window)}
        grid = {BEST: rows, FAST: fast_rows}
    for name, (p, w) in chosen.items():
        log(f"{name}: window {w}, {params_dict(p)}")
    report["tuned"] = {name: {"params": params_dict(p), "filter_size": w[0], "blur": w[1]}
                       for name, (p, w) in chosen.items()}
    report["grid"] = grid
    # the volume defaults docs/volumes.md recommends: the best window's choice
    recommended, recommended_window = chosen[BEST]
    runs = [("cucrf default", default_params, default_window)] + [(n, p, w) for n, (p, w) in chosen.items()]
    if not args.no_fit:
        report["fit"] = {}
        # from CRFParams() at the default window (a fit at the volume defaults' blur-2 window costs
        # about ten times as much per step)
        for name, start, window in (("cucrf fitted from CRFParams(), default window", CRFParams(), default_window),):
            log(f"{name}: cucrf.fit on the upper half at the window {window}")
            try:
                fitted, report["fit"][name] = fit_params(start, window, unary["tune"], features["tune"],
                                                         [labels["tune"]] * len(tune_seeds), spacing, log)
                report["fit"][name]["params"] = params_dict(fitted)
                if not report["fit"][name]["improved"]:
                    name += " (fit kept the start)"
                runs.append((name, fitted, window))
            except Exception as exc:  # report what failed instead of losing the other results
                log(f"  fit failed: {type(exc).__name__}: {exc}")
                report["fit"][name] = {"error": f"{type(exc).__name__}: {exc}"}

    # 2. the held-out half: unary, cucrf default / tuned / fitted
    methods = {"unary": []}
    methods.update({name: [] for name, _, _ in runs})
    times = {k: [] for k in methods}
    predictions = {}
    for i, s in enumerate(seeds):
        u = unary["test"][i]
        methods["unary"].append(dice_per_class(u.argmax(axis=0), labels["test"], 3).tolist())
        if i == 0:
            predictions["unary"] = u.argmax(axis=0)
        for name, p, window in runs:
            pred, sec = run_cucrf(u, features["test"], p, window, spacing)
            methods[name].append(dice_per_class(pred, labels["test"], 3).tolist())
            times[name].append(sec)
            if i == 0:
                predictions[name] = pred
        log(f"seed {s}: " + "; ".join(f"{k} {100 * np.nanmean(v[-1]):.2f}" for k, v in methods.items()))

    # 2b. the window, with the volume defaults' kernel parameters, on both halves (a diagnostic: no choice
    # is made from it)
    windows_table = {}
    for window in FAST_WINDOWS + (recommended_window,):
        row = {}
        for half, half_seeds in (("tune", tune_seeds), ("test", seeds)):
            dice, secs = [], []
            for u in unary[half]:
                pred, sec = run_cucrf(u, features[half], recommended, window, spacing)
                dice.append(dice_per_class(pred, labels[half], 3).tolist())
                secs.append(sec)
            row[half] = {"dice": dice, "seconds": float(np.mean(secs))}
        windows_table[f"{window[0]}x{window[1]}"] = row
        log(f"window {window}: tuning half {100 * np.mean(np.nanmean(row['tune']['dice'], axis=1)):.2f}, "
            f"held-out half {100 * np.mean(np.nanmean(row['test']['dice'], axis=1)):.2f}")
    report["windows"] = windows_table

    # 3. intensity scaling: the test half as another scan would store it
    rng = np.random.default_rng(12345)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in labels["test"].shape], indexing="ij")
    bias = 1.0 + 0.1 * np.sin(1.3 * zz + 0.4) * np.cos(1.1 * yy - 0.3) * np.cos(0.9 * xx)
    raw = image[halves["test"]].astype(np.float64)
    other_scan = raw * 12.5 * bias[..., None] + 40.0 + rng.normal(0.0, 0.02 * 12.5 * 216.0, raw.shape)
    other_scan = np.maximum(other_scan, 0.0)
    other_scan[raw == image.min()] = 0.0  # the background stays masked, as in the original
    # theta_beta in z-score units: the tuned value measured in percentile units, converted on the tuning half
    tuned, tuned_window = recommended, recommended_window
    tb_255 = tuned.theta_beta if isinstance(tuned.theta_beta, float) else tuned.theta_beta[0]
    t_img = image[halves["tune"]][..., 0].astype(np.float64)
    t_body = t_img > image.min()
    p1, p99 = np.percentile(t_img[t_body], [1, 99])
    tb_z = tb_255 * (p99 - p1) / 255.0 / t_img[t_body].std()
    scaling = {}
    from cucrf import medical

    unit_range = raw / 255.0  # a volume stored as floats in [0, 1]
    variants = [
        ("the volume, percentiles 1-99 -> 0-255 (as tuned)", features["test"], tuned),
        ("the volume as stored (uint8), no normalisation", raw.astype(np.float32), tuned),
        ("the volume / 255 (floats in 0-1), no normalisation", unit_range.astype(np.float32), tuned),
        ("the volume / 255, percentiles 1-99 -> 0-255", normalise_intensities(unit_range), tuned),
        ("other scan (x12.5 + 40, bias field, noise), no normalisation", other_scan.astype(np.float32), tuned),
        ("other scan, percentiles 1-99 -> 0-255", normalise_intensities(other_scan), tuned),
        ("other scan, z-score in the body", standardise_intensities(other_scan), tuned.replace(theta_beta=tb_z)),
        ("the volume, cucrf.medical.standardize in the body (mean 128, sd 64)",
         medical.standardize(raw, raw[..., 0] > raw.min()), tuned),
        ("other scan, cucrf.medical.standardize in the body (mean 128, sd 64)",
         medical.standardize(other_scan, other_scan[..., 0] > 0), tuned),
    ]
    for name, feats, p in variants:
        with warnings.catch_warnings(record=True) as caught:  # cucrf warns about a 0-1 image with a large theta_beta
            warnings.simplefilter("always")
            dice = [dice_per_class(run_cucrf(unary["test"][i], feats, p, tuned_window, spacing)[0], labels["test"],
                                   3).tolist() for i in range(len(seeds))]
        said = sorted({str(w.message).splitlines()[0] for w in caught})
        scaling[name] = {"dice": dice, "theta_beta": p.theta_beta, "warnings": said}
        for w in said:
            log(f"  cucrf warned: {w}")
        log(f"scaling: {name}: mean Dice {100 * np.mean(np.nanmean(dice, axis=1)):.2f} (theta_beta {p.theta_beta})")
    report["scaling"] = {"variants": scaling, "theta_beta_zscore": tb_z,
                         "tune_half_percentiles_1_99": [float(p1), float(p99)],
                         "tune_half_body_std": float(t_img[t_body].std())}

    # 3b. thick slices: every 4th slice of each half, its image the mean of the 4 slices of its slab
    thick = {}
    K, B = tuned_window
    settings = [("spacing ignored: isotropic window and blur", None, K, B),
                ("spacing (4, 1, 1), isotropic blur", (4.0, 1.0, 1.0), K, B),
                (f"spacing (4, 1, 1), blur (1, {B}, {B})", (4.0, 1.0, 1.0), K, (1, B, B)),
                (f"spacing (4, 1, 1), blur (1, {B}, {B}), filter (3, {K}, {K})", (4.0, 1.0, 1.0), (3, K, K), (1, B, B))]
    for half in ("tune", "test"):
        img_half = image[halves[half]].astype(np.float64)
        n_slabs = img_half.shape[0] // 4
        slab_image = img_half[:4 * n_slabs].reshape((n_slabs, 4) + img_half.shape[1:]).mean(axis=1)
        picked = np.arange(n_slabs) * 4 + 1  # the slice each thick slice is scored on
        feats = normalise_intensities(slab_image)
        lab_thick = labels[half][picked]
        rows = {}
        for name, sp, k, b in settings:
            dice = []
            for u in unary[half]:
                pred, _ = run_cucrf(np.ascontiguousarray(u[:, picked]), feats, tuned, (k, b), sp)
                dice.append(dice_per_class(pred, lab_thick, 3).tolist())
            rows[name] = dice
        rows["unary"] = [dice_per_class(u[:, picked].argmax(axis=0), lab_thick, 3).tolist() for u in unary[half]]
        thick[half] = rows
        log(f"thick slices, {half} half: " + "; ".join(f"{n} {100 * np.mean(np.nanmean(d, axis=1)):.2f}"
                                                       for n, d in rows.items()))
    report["thick_slices"] = thick

    # 4. peers on the same volumes: first a small grid of each on the tuning half, then the test half
    peers = {}
    if args.peers_python:
        report["peer_versions"] = peer_versions(args.peers_python)
        log(f"peers: {report['peer_versions']}")
        tp = recommended
        tb = tp.theta_beta if isinstance(tp.theta_beta, float) else tp.theta_beta[0]
        # SimpleCRF: (iterations, theta_gamma, w_s, theta_alpha, theta_beta, w_a), DenseCRF's kernels and weights
        sc_demo = (ITERATIONS, 5.0, 2.0, 5.0, 5.0, 3.0)  # its demo's parameters, 5 iterations instead of its 2
        sc_cucrf = (ITERATIONS, tp.theta_gamma, tp.smoothness_weight, tp.theta_alpha, tb, tp.appearance_weight)
        sc_grid = [(ITERATIONS, 5.0, 2.0, ta, tbb, wa) for ta in (5.0, 20.0) for tbb in (5.0, 10.0, 20.0)
                   for wa in (3.0, 10.0, 30.0)]
        # MONAI: (iterations, gaussian sigma, gaussian weight, bilateral spatial sigma, bilateral colour sigma,
        # bilateral weight, update factor); its filters are normalised (a weighted mean of Q), so its weights
        # are not cucrf's. Defaults on the image / 255; the grid on the 0-255 features.
        monai_defaults = (ITERATIONS, 5.0, 1.0, 5.0, 0.5, 1.0, 3.0)
        monai_grid = [(ITERATIONS, 5.0, 1.0, ta, tbb, 1.0, up) for ta in (5.0, 20.0) for tbb in (5.0, 10.0, 20.0)
                      for up in (3.0, 10.0, 30.0)]
        arrays = {"u_tune": unary["tune"][0], "f_tune": features["tune"]}
        jobs = ([{"method": "simplecrf", "unary": "u_tune", "image": "f_tune", "params": list(g)} for g in sc_grid]
                + [{"method": "monai", "unary": "u_tune", "image": "f_tune", "params": list(g)} for g in monai_grid])
        log(f"peer grids on the tuning half (first tuning seed): {len(sc_grid)} SimpleCRF, {len(monai_grid)} MONAI")
        res = run_peers(args.peers_python, jobs, arrays, out, args.peer_timeout, log)
        grid_rows = {"simplecrf": [], "monai": []}
        for job, r in zip(jobs, res):
            d = dice_per_class(r["labels"].astype(np.int64), labels["tune"], 3) if r["labels"] is not None else None
            grid_rows[job["method"]].append({"params": job["params"], "dice": None if d is None else d.tolist(),
                                             "mean_dice": None if d is None else float(np.nanmean(d)),
                                             "seconds": r["seconds"], "error": r["error"]})
            log(f"  {job['method']} {job['params']}: "
                f"{'failed: ' + r['error'] if d is None else f'{100 * np.nanmean(d):.2f}'}")
        best_of_grid = {}
        for method, rows in grid_rows.items():
            scored = [r for r in rows if r["mean_dice"] is not None]
            best_of_grid[method] = tuple(max(scored, key=lambda r: r["mean_dice"])["params"]) if scored else None
        report["peer_grids"] = grid_rows

        arrays = {"f_test": features["test"]}
        runs_peers = [("SimpleCRF, its demo parameters", "simplecrf", sc_demo, 1.0),
                      ("SimpleCRF, cucrf's volume defaults", "simplecrf", sc_cucrf, 1.0),
                      ("SimpleCRF, best of its grid", "simplecrf", best_of_grid["simplecrf"], 1.0),
                      ("MONAI CRF, its defaults (image / 255)", "monai", monai_defaults, 1.0 / 255.0),
                      ("MONAI CRF, best of its grid", "monai", best_of_grid["monai"], 1.0)]
        jobs = []
        for i in range(len(seeds)):
            arrays[f"u{i}"] = unary["test"][i]
            for name, method, prm, scale in runs_peers:
                if prm is not None:
                    jobs.append({"method": method, "unary": f"u{i}", "image": "f_test", "params": list(prm),
                                 "image_scale": scale, "name": name})
        log(f"peers on the test half: {len(jobs)} jobs")
        res = run_peers(args.peers_python, jobs, arrays, out, args.peer_timeout, log)
        for job, r in zip(jobs, res):
            entry = peers.setdefault(job["name"], {"dice": [], "seconds": [], "error": None, "params": job["params"]})
            if r["labels"] is None:
                entry["error"] = r["error"]
                log(f"  {job['name']}: {r['error']}")
                continue
            entry["dice"].append(dice_per_class(r["labels"].astype(np.int64), labels["test"], 3).tolist())
            entry["seconds"].append(r["seconds"])
            log(f"  {job['name']}: mean Dice {100 * np.nanmean(entry['dice'][-1]):.2f} in {r['seconds']:.1f} s")
    report["test"] = {"methods": methods, "times": times, "peers": peers}

    # 5. speed: 120x150x100 (x, y, z), two classes
    D, H, W = label.shape
    sd, sh, sw = SPEED_SHAPE
    ssl = tuple(slice(max((n - m) // 2, 0), max((n - m) // 2, 0) + m) for n, m in zip((D, H, W), (sd, sh, sw)))
    two = label[ssl].copy()
    two[(two == 1) | (two == 2)] = 1
    s_unary = degrade_volume(two, 2, downsample=args.downsample, replace_prob=args.replace_prob, seed=seeds[0])
    s_feat = normalise_intensities(image[ssl])
    speed = {"shape_zyx": list(SPEED_SHAPE), "load_average_before": load_average()}
    for name, p, window in runs[:3]:  # the default and the two tuned windows (fitting keeps the window)
        secs = []
        for _ in range(3):
            pred, sec = run_cucrf(s_unary, s_feat, p, window, spacing)
            secs.append(sec)
        speed[name] = {"seconds": secs, "median": float(np.median(secs)),
                       "dice": dice_per_class(pred, two, 2).tolist()}
        log(f"speed {name}: {np.median(secs):.2f} s (runs {', '.join(f'{s:.2f}' for s in secs)})")
    speed["unary"] = {"dice": dice_per_class(s_unary.argmax(axis=0), two, 2).tolist()}
    if args.peers_python:
        jobs = []
        for name, method, prm, scale in runs_peers:
            if prm is not None:
                jobs += [{"method": method, "unary": "u", "image": "f", "params": list(prm), "image_scale": scale,
                          "name": name}] * 3
        res = run_peers(args.peers_python, jobs, {"u": s_unary, "f": s_feat}, out, args.peer_timeout, log)
        for job, r in zip(jobs, res):
            entry = speed.setdefault(job["name"], {"seconds": [], "dice": None, "error": None})
            if r["labels"] is None:
                entry["error"] = r["error"]
                log(f"speed {job['name']}: {r['error']}")
                continue
            entry["seconds"].append(r["seconds"])
            entry["median"] = float(np.median(entry["seconds"]))
            entry["dice"] = dice_per_class(r["labels"].astype(np.int64), two, 2).tolist()
            log(f"speed {job['name']}: {r['seconds']:.2f} s")
    speed["load_average_after"] = load_average()
    report["speed"] = speed

    # 6. the picture: the held-out half, first seed
    d_, h_, w_ = labels["test"].shape
    make_figure(figure, image[halves["test"]], predictions["unary"], predictions[BEST], labels["test"],
                planes=(min(8, d_ - 1), min(h_ // 2 + 10, h_ - 1), max(w_ // 2 - 25, 0)))
    report["figure"] = str(figure)
    report["minutes"] = (time.perf_counter() - t0) / 60.0
    report["machine"]["load_average_end"] = load_average()
    (out / "volumes.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "volumes.md").write_text(render(report))
    (out / "volumes.log").write_text("\n".join(log_lines) + "\n")
    log(f"wrote {out / 'volumes.json'}, {out / 'volumes.md'}, {figure} in {report['minutes']:.1f} minutes")
    return 0


def render(report):
    """The Markdown tables of docs/volumes.md from ``volumes.json``'s content."""
    lines = []
    seeds = report["seeds"]
    t = report["test"]
    lines.append(f"Held-out lower half (z {report['split']['test'][0]}-{report['split']['test'][1] - 1}), "
                 f"seeds {', '.join(map(str, seeds))}, Dice % (mean over seeds; min-max of the mean Dice over seeds):")
    lines.append("")
    lines.append("| method | " + " | ".join(CLASS_NAMES) + " | mean Dice | min-max | s / volume |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    rows = [(k, v, t["times"].get(k)) for k, v in t["methods"].items()]
    rows += [(k, v["dice"], v["seconds"]) for k, v in t["peers"].items() if v["dice"]]
    for name, dice, secs in rows:
        mean, m, lo, hi = summary(dice)
        s = f"{np.mean(secs):.2f}" if secs else "–"
        lines.append(f"| {name} | {fmt_dice(mean)} | {100 * lo:.2f}-{100 * hi:.2f} | {s} |")
    for name, v in t["peers"].items():
        if not v["dice"] and v.get("error"):
            lines.append(f"| {name} | failed: {v['error']} | | | | | |")
    sp = report["speed"]
    lines.append("")
    lines.append(f"Speed on {sp['shape_zyx'][2]}x{sp['shape_zyx'][1]}x{sp['shape_zyx'][0]} voxels (x, y, z), 2 classes, "
                 f"{report['iterations']} iterations; load average before / after: "
                 f"{', '.join(f'{v:.1f}' for v in sp['load_average_before'] or [])} / "
                 f"{', '.join(f'{v:.1f}' for v in sp['load_average_after'] or [])}:")
    lines.append("")
    lines.append("| method | s (median) | runs | tissue Dice % |")
    lines.append("|---|---:|---:|---:|")
    for name, v in sp.items():
        if not isinstance(v, dict) or name == "unary":
            continue
        if v.get("seconds"):
            lines.append(f"| {name} | {v['median']:.2f} | {len(v['seconds'])} | {100 * v['dice'][1]:.2f} |")
        elif v.get("error"):
            lines.append(f"| {name} | failed: {v['error']} | | |")
    lines.append(f"| unary | – | – | {100 * sp['unary']['dice'][1]:.2f} |")
    wt = report.get("windows")
    if wt:
        lines.append("")
        lines.append("The window (filter_size x blur) with the volume defaults' kernel parameters, mean Dice % "
                     "(grey matter / white matter) over the seeds of each half, seconds per half volume:")
        lines.append("")
        lines.append("| window | span (voxels) | tuning half | held-out half | s |")
        lines.append("|---|---:|---:|---:|---:|")
        for name, row in wt.items():
            k, b = (int(v) for v in name.split("x"))
            cells = []
            for h in ("tune", "test"):
                d = np.mean(row[h]["dice"], axis=0)
                cells.append(f"{100 * np.nanmean(d):.2f} ({100 * d[1]:.1f} / {100 * d[2]:.1f})")
            lines.append(f"| {name} | {k * b} | {cells[0]} | {cells[1]} | {row['test']['seconds']:.1f} |")
    th = report.get("thick_slices")
    if th:
        lines.append("")
        lines.append("Thick slices (every 4th slice, each the mean of its 4-slice slab, 4 mm x 1 mm x 1 mm), "
                     "the volume defaults, mean Dice % over the seeds of each half:")
        lines.append("")
        lines.append("| setting | tuning half | held-out half |")
        lines.append("|---|---:|---:|")
        for name in th["test"]:
            cells = [f"{100 * np.mean(np.nanmean(th[h][name], axis=1)):.2f}" for h in ("tune", "test")]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    sc = report["scaling"]["variants"]
    lines.append("")
    lines.append("Intensity scaling (held-out half, the volume defaults, mean Dice % over the seeds):")
    lines.append("")
    lines.append("| features | θβ | mean Dice |")
    lines.append("|---|---:|---:|")
    for name, v in sc.items():
        tb = v["theta_beta"] if isinstance(v["theta_beta"], float) else v["theta_beta"][0]
        lines.append(f"| {name} | {tb:.3g} | {100 * np.mean(np.nanmean(v['dice'], axis=1)):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
