"""The ``cucrf`` command line: ``cucrf demo``, ``cucrf refine``, ``cucrf fit``, ``cucrf eval`` and ``cucrf params``.

Run ``cucrf --help`` or ``cucrf COMMAND --help`` for the options. Every error is reported as a
single ``cucrf: error: ...`` line on stderr with a non-zero exit status (2 for a bad command
line, 1 for everything else); ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "build_parser"]

_LABEL_IMAGE_SUFFIXES = (".png", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm", ".pnm")
_NPZ_KEYS = ("logits", "unary", "probabilities")  # looked up in this order in .npz files
_IGNORE = 255

_DESCRIPTION = """\
Convolutional CRFs (Teichmann & Cipolla, 2018): refine a segmentation so that its labels follow
the edges of the image. Start with 'cucrf demo'; 'cucrf COMMAND --help' shows each command's
options.
"""

_DEMO_EPILOG = """\
The demo reproduces the paper's synthetic task: the ground-truth label is downsampled by 8,
20%% of the low-resolution cells get a random class, and the result is upsampled again. The
CRF has to recover the object boundaries from the image alone.

examples:
  cucrf demo                                   # generated 240x320 scene, writes ./cucrf-demo/
  cucrf demo --out demo --filter-size 11 --per-class
  cucrf demo --image photo.jpg --label photo_label.png --out photo-demo
"""

_REFINE_EPILOG = """\
UNARY files:
  .npy            an array of shape (C, H, W): logits / log-probabilities (default), or
                  probabilities with --unary-kind probabilities; a 2-D integer array is a
                  label map (see below)
  .npz            the array named 'logits', 'unary' or 'probabilities' (in that order), else
                  the first array; an array named 'probabilities' is read as probabilities
  .png (or other  a label map of class ids (greyscale or paletted PNG); each pixel trusts its
  image)          label with --confidence, pixels equal to --unknown-label are left to the CRF

Images and unaries are paired in order: the first UNARY belongs to the first IMAGE, and so on.
The refined labels are written as paletted PNGs (pixel values are class ids, viewers show
colours). Several images show a progress bar.

examples:
  cucrf refine photo.jpg --unary logits.npy -o refined.png
  cucrf refine photo.jpg --unary coarse_label.png --confidence 0.7 -o refined.png
  cucrf refine img/*.jpg --unary logits/*.npz --out-dir refined --save-probabilities
  cucrf params > params.json   # edit, then: cucrf refine ... --params params.json
"""


class _UsageError(Exception):
    """A bad command line (argparse error), reported in one line with exit status 2."""


class _CLIError(Exception):
    """An error the command line detected itself (bad file, mismatched sizes, ...)."""


class _ArgumentParser(argparse.ArgumentParser):
    # argparse prints the whole usage block and exits; we want one line and a return value.
    def error(self, message):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# -- helpers -------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, (_CLIError, _UsageError, ValueError, TypeError, RuntimeError)):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or exc}: {exc.filename}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _one_line(text) or type(exc).__name__


def _to_numpy(a) -> np.ndarray:
    return a.get() if type(a).__module__.split(".")[0] == "cupy" else np.asarray(a)


def _existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise _CLIError(f"{what} {path!r} does not exist")
    if not p.is_file():
        raise _CLIError(f"{what} {path!r} is not a file")
    return p


def _read_image(path: str) -> np.ndarray:
    from .datasets import _read_image as read

    p = _existing_file(path, "image")
    try:
        return read(p)
    except (OSError, SyntaxError) as exc:  # Pillow raises SyntaxError for some corrupt files
        raise _CLIError(f"cannot read image {path!r}: {_error_text(exc)}") from exc


def _read_label(path: str, what: str = "label") -> np.ndarray:
    from .datasets import _read_label as read

    p = _existing_file(path, what)
    try:
        return read(p)
    except (OSError, SyntaxError) as exc:
        raise _CLIError(f"cannot read {what} {path!r}: {_error_text(exc)}") from exc


def _load_params(spec):
    from ._params import CRFParams

    return None if spec is None else CRFParams.from_json(spec)


def _normalization(value):
    return None if value == "none" else value


def _num_classes_from_labels(label: np.ndarray, unknown, given, what: str) -> int:
    """``given``, or the largest class id (other than the unknown label) + 1, at least 2."""
    if given is not None:
        return given
    known = label if unknown is None else label[label != unknown]
    if known.size == 0:
        raise _CLIError(f"{what} holds no class ids other than the unknown label {unknown}")
    return max(int(known.max()) + 1, 2)


def _run_crf(unary, image, args, params, **kwargs):
    """Run :func:`cucrf.infer`; return (probabilities as float32 NumPy, seconds)."""
    from ._api import infer

    start = time.perf_counter()
    q = infer(
        unary, image, params, filter_size=args.filter_size, blur=args.blur,
        iterations=args.iterations, normalization=_normalization(args.normalization),
        device=args.device, **kwargs,
    )
    q = _to_numpy(q)  # also waits for the GPU, so the time is the real one
    return q.astype(np.float32, copy=False), time.perf_counter() - start


def _write_rgb(path: Path, image: np.ndarray) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)


# -- demo -----------------------------------------------------------------------------------------


def _caption_strip(panels, captions, gap):
    """Row of panels (H, W, 3) with captions above them, ``gap`` white pixels between panels."""
    h = panels[0].shape[0]
    white = np.full((h, gap, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [white, p]
    body = np.concatenate(row, axis=1)
    try:
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default()
        strip = Image.new("RGB", (body.shape[1], 18), "white")
        draw = ImageDraw.Draw(strip)
        x = 0
        for panel, caption in zip(panels, captions):
            width = panel.shape[1]
            while caption and draw.textlength(caption, font=font) > width - 4:
                caption = caption[:-1]  # shorten captions that do not fit small panels
            draw.text((x + 2, 3), caption, fill="black", font=font)
            x += width + gap
        return np.concatenate([np.asarray(strip), body], axis=0)
    except Exception:  # captions are decoration: never fail the demo because of a font
        return body


def _cmd_demo(args) -> int:
    from . import palette
    from .datasets import synthetic_unary
    from .metrics import confusion_matrix, mean_iou, per_class_iou, pixel_accuracy

    if (args.image is None) != (args.label is None):
        raise _UsageError("--image and --label must be given together (see 'cucrf demo --help')")
    params = _load_params(args.params)  # read early: a bad file should fail before any work
    if args.image is None:
        from ._demo_scene import make_scene

        image, label, class_names = make_scene(seed=0)
        source = "generated scene"
    else:
        image, label = _read_image(args.image), _read_label(args.label)
        if image.shape[:2] != label.shape:
            raise _CLIError(
                f"image {args.image!r} is {image.shape[0]}x{image.shape[1]} but label {args.label!r} "
                f"is {label.shape[0]}x{label.shape[1]} (H x W); they must be the same size"
            )
        class_names = None
        source = Path(args.image).name
    num_classes = _num_classes_from_labels(label, _IGNORE, args.num_classes, f"label {args.label!r}")
    if class_names is None or len(class_names) != num_classes:
        class_names = [f"class {i}" for i in range(num_classes)]
    if args.num_classes is not None:
        bad = (label != _IGNORE) & (label >= num_classes)
        if bad.any():
            raise _CLIError(
                f"label holds class id {int(label[bad].max())} but --num-classes is {num_classes}"
            )

    unary = synthetic_unary(label, num_classes, downsample=args.downsample,
                            replace_prob=args.replace_prob, seed=args.seed)
    q, seconds = _run_crf(unary, image, args, params)
    noisy, refined = unary.argmax(axis=0).astype(np.uint8), q.argmax(axis=0).astype(np.uint8)

    cm_before = confusion_matrix(noisy, label, num_classes, ignore_index=_IGNORE)
    cm_after = confusion_matrix(refined, label, num_classes, ignore_index=_IGNORE)
    acc = (pixel_accuracy(cm_before), pixel_accuracy(cm_after))
    miou = (mean_iou(cm_before), mean_iou(cm_after))

    h, w = label.shape
    out = Path(args.out)
    device = args.device or "cpu"
    print(f"cucrf demo: {source}, {h}x{w} pixels, {num_classes} classes")
    print(f"  unary: synthetic (downsample {args.downsample}, {args.replace_prob:.0%} of cells "
          f"replaced, seed {args.seed})")
    print(f"  CRF:   filter_size {args.filter_size}, blur {args.blur}, iterations {args.iterations}, "
          f"{device}{', params ' + args.params if args.params else ''}")
    print()
    print(f"  {'':<10}{'pixel acc':>10}{'mean IoU':>11}")
    print(f"  {'noisy':<10}{acc[0]:>10.2%}{miou[0]:>11.2%}")
    print(f"  {'refined':<10}{acc[1]:>10.2%}{miou[1]:>11.2%}")
    print(f"  {'change':<10}{100 * (acc[1] - acc[0]):>+10.2f} {100 * (miou[1] - miou[0]):>+10.2f}   (points)")
    if args.per_class:
        before, after = per_class_iou(cm_before), per_class_iou(cm_after)
        width = max(10, max(len(n) for n in class_names) + 2)
        print()
        print(f"  {'IoU':<{width}}{'noisy':>9}{'refined':>9}")
        for name, b, a in zip(class_names, before, after):
            # NaN: the class is in neither the label nor the prediction
            b, a = (f"{x:>9.2%}" if np.isfinite(x) else f"{'-':>9}" for x in (b, a))
            print(f"  {name:<{width}}{b}{a}")
    print()
    print(f"CRF inference: {seconds:.3f} s ({device})")

    out.mkdir(parents=True, exist_ok=True)
    rgb = palette._as_rgb(image)
    _write_rgb(out / "image.png", image)
    palette.save_label_png(out / "truth.png", label)
    palette.save_label_png(out / "noisy.png", noisy)
    palette.save_label_png(out / "refined.png", refined)
    import imageio.v3 as iio

    iio.imwrite(out / "overlay.png", palette.overlay(rgb, refined, alpha=0.5))
    panels = [rgb] + [palette.color_labels(x) for x in (label, noisy, refined)]
    captions = ["image", "ground truth", f"noisy, mIoU {miou[0]:.1%}", f"CRF, mIoU {miou[1]:.1%}"]
    iio.imwrite(out / "comparison.png", _caption_strip(panels, captions, gap=4))
    print(f"wrote image.png truth.png noisy.png refined.png overlay.png comparison.png to {out}{os.sep}")
    return 0


# -- refine ---------------------------------------------------------------------------------------


def _load_unary(path: str, kind):
    """Read a unary file; return ``(array, kind)`` with ``kind`` resolved when it was None (auto)."""
    p = _existing_file(path, "unary")
    suffix = p.suffix.lower()
    if suffix in _LABEL_IMAGE_SUFFIXES:
        if kind not in (None, "labels"):
            raise _CLIError(f"unary {path!r} is an image, which is read as a label map; it cannot be "
                            f"used with --unary-kind {kind}")
        return _read_label(path, "unary label map"), "labels"
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
            name = None
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if not z.files:
                    raise _CLIError(f"unary {path!r} holds no arrays")
                name = next((k for k in _NPZ_KEYS if k in z.files), z.files[0])
                arr = z[name]
        else:
            raise _CLIError(f"unary {path!r} has suffix {p.suffix!r}; expected .npy, .npz or a label "
                            "image such as .png")
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, _CLIError):
            raise
        raise _CLIError(f"cannot read unary {path!r}: {_error_text(exc)}") from exc
    if kind is None:
        if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
            kind = "labels"
        else:
            kind = "probabilities" if name == "probabilities" else "logits"
    if kind != "labels" and arr.dtype == np.float16:
        arr = arr.astype(np.float32)  # networks often store float16 logits; compute in float32
    return arr, kind


def _check_unary_shape(unary, kind, image, upath, ipath):
    h, w = image.shape[:2]
    if kind == "labels":
        if unary.shape != (h, w):
            raise _CLIError(f"label map {upath!r} has shape {unary.shape} but image {ipath!r} is "
                            f"{h}x{w}; expected ({h}, {w})")
        return
    if unary.ndim != 3:
        raise _CLIError(f"unary {upath!r} has shape {unary.shape}; expected (C, H, W) = (C, {h}, {w})")
    if unary.shape[1:] != (h, w):
        hint = ""
        if unary.shape[:2] == (h, w):
            hint = "; it looks channels-last (H, W, C): transpose it to (C, H, W)"
        raise _CLIError(f"unary {upath!r} has shape {unary.shape} but image {ipath!r} is {h}x{w}; "
                        f"expected (C, {h}, {w}){hint}")


def _looks_like_probabilities(unary) -> bool:
    if not np.issubdtype(unary.dtype, np.floating) or unary.size == 0:
        return False
    if unary.min() < 0 or unary.max() > 1:
        return False
    return bool(np.allclose(unary.sum(axis=0, dtype=np.float64), 1.0, atol=1e-3))


def _refine_outputs(args):
    """Output PNG paths and probability paths (or None), one per image."""
    n = len(args.images)
    if args.output is not None:
        if len(args.output) != n:
            raise _UsageError(f"got {n} image(s) but {len(args.output)} -o/--output path(s); give one "
                              "output per image or use --out-dir")
        outputs = [Path(o) for o in args.output]
    else:
        outputs = [Path(args.out_dir) / (Path(i).stem + ".png") for i in args.images]
    if len(set(outputs)) != len(outputs):
        dup = next(o for o in outputs if outputs.count(o) > 1)
        raise _CLIError(f"two images would be written to the same file {str(dup)!r}; give -o paths "
                        "or images with different names")
    for o in outputs:
        if o.suffix.lower() != ".png":
            raise _CLIError(f"output {str(o)!r} must be a .png file (the refined labels are written "
                            "as a paletted PNG)")
    if args.save_probabilities is None:
        probs = [None] * n
    elif not args.save_probabilities:
        probs = [o.with_suffix(".npy") for o in outputs]  # next to each PNG
    elif len(args.save_probabilities) != n:
        raise _UsageError(f"got {n} image(s) but {len(args.save_probabilities)} --save-probabilities "
                          "path(s); give one per image, or none to save next to each output")
    else:
        probs = [Path(p) for p in args.save_probabilities]
    return outputs, probs


def _cmd_refine(args) -> int:
    from tqdm import tqdm

    from . import palette

    n = len(args.images)
    if len(args.unary) != n:
        raise _UsageError(f"got {n} image(s) but {len(args.unary)} --unary file(s); give one unary "
                          "per image, in the same order")
    outputs, prob_paths = _refine_outputs(args)
    # Check every input exists before spending time on the first image.
    for i, u in zip(args.images, args.unary):
        _existing_file(i, "image")
        _existing_file(u, "unary")
    params = _load_params(args.params)

    total = 0.0
    bar = tqdm(total=n, unit="image", disable=n <= 1, file=sys.stderr, dynamic_ncols=True)
    try:
        for ipath, upath, opath, ppath in zip(args.images, args.unary, outputs, prob_paths):
            image = _read_image(ipath)
            unary, kind = _load_unary(upath, args.unary_kind)
            _check_unary_shape(unary, kind, image, upath, ipath)
            extra = {"unary_kind": kind}
            if kind == "labels":
                unknown = None if args.unknown_label is None or args.unknown_label < 0 else args.unknown_label
                extra.update(
                    num_classes=_num_classes_from_labels(unary, unknown, args.num_classes, f"label map {upath!r}"),
                    confidence=args.confidence, unknown_label=unknown,
                )
            else:
                if args.num_classes is not None and unary.shape[0] != args.num_classes:
                    raise _CLIError(f"unary {upath!r} has {unary.shape[0]} classes but --num-classes "
                                    f"is {args.num_classes}")
                if kind == "logits" and _looks_like_probabilities(unary):
                    tqdm.write(f"cucrf: note: {upath} looks like probabilities (values in [0, 1] summing "
                               "to 1); if so, pass --unary-kind probabilities", file=sys.stderr)
            try:
                q, seconds = _run_crf(unary, image, args, params, **extra)
            except (ValueError, TypeError) as exc:
                raise _CLIError(f"{ipath}: {_error_text(exc)}") from exc
            total += seconds
            opath.parent.mkdir(parents=True, exist_ok=True)
            palette.save_label_png(opath, q.argmax(axis=0).astype(np.uint8 if q.shape[0] <= 256 else np.int64))
            if ppath is not None:
                ppath.parent.mkdir(parents=True, exist_ok=True)
                np.save(ppath, q)
            extra_text = f", probabilities {ppath}" if ppath is not None else ""
            tqdm.write(f"{opath}  ({image.shape[0]}x{image.shape[1]}, {q.shape[0]} classes, "
                       f"{seconds:.3f} s{extra_text})", file=sys.stdout)
            bar.update(1)
    finally:
        bar.close()
    if n > 1:
        print(f"refined {n} images in {total:.2f} s of CRF time")
    return 0


# -- fit ------------------------------------------------------------------------------------------

_FIT_EPILOG = """\
Training data: FOLDER holds <id>_image.png / <id>_label.png pairs (labels: class ids, 255 =
ignore). Unaries come from --unary-dir (one file per image, named by --unary-pattern: .npz with an
array 'logits' or a single array, or .npy, shape (C, H, W), logits), or, with --synthetic, are
made from the labels with the paper's synthetic protocol (seed = image index).

A fraction of the images (--val-fraction, chosen with --seed) is held out and scored every epoch;
the parameters of the best epoch are written to OUT/params.json (use them with --params), the
feature transform (with --learn feature_transform) to OUT/feature_transform.json, the history to
OUT/history.json and, when matplotlib is installed, the curves to OUT/training_curve.png.

examples:
  cucrf fit data/voc --unary-dir data/unaries --unary-pattern "{name}_espnet2_384.npz" --out fitted
  cucrf fit data/msrc --synthetic --epochs 5 --learn weights,bandwidths --out fitted-msrc
  cucrf refine img.png --unary img.npz --params fitted/params.json -o refined.png
"""


def _learn_list(text):
    from ._fit import LEARNABLE

    names = [t.strip() for t in text.split(",") if t.strip()]
    if "all" in names:
        return list(LEARNABLE)
    bad = [n for n in names if n not in LEARNABLE]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(LEARNABLE)} (or 'all'), "
                                         f"got {text!r}")
    return names


def _plot_history(history, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # the plot is optional (the 'plot' extra)
        return False
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    if any(h.get("val_miou") is not None for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h["val_miou"] for h in history], "s-", color="tab:green", label="validation mIoU")
        ax2.set_ylabel("validation mIoU")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _cmd_fit(args) -> int:
    from . import datasets
    from ._fit import fit

    folder = Path(args.folder)
    if not folder.is_dir():
        raise _CLIError(f"training folder {args.folder!r} does not exist or is not a directory")
    if args.synthetic == (args.unary_dir is not None):
        raise _UsageError("give either --unary-dir or --synthetic (see 'cucrf fit --help')")
    samples = datasets.load_pairs(folder, unary_dir=args.unary_dir, unary_pattern=args.unary_pattern)
    if args.max_images is not None:
        samples = samples[:args.max_images]
    labels = [s.label for s in samples]
    if args.synthetic:
        known = [lab[lab != _IGNORE] for lab in labels]
        largest = max((int(k.max()) for k in known if k.size), default=1)
        num_classes = args.num_classes if args.num_classes is not None else max(largest + 1, 2)
        if largest >= num_classes:
            raise _CLIError(f"labels hold class id {largest} but --num-classes is {num_classes}")
        unaries = [datasets.synthetic_unary(lab, num_classes, seed=i) for i, lab in enumerate(labels)]
    else:
        unaries = [s.unary.astype(np.float32) if s.unary.dtype == np.float16 else s.unary for s in samples]
        if args.num_classes is not None and unaries[0].shape[0] != args.num_classes:
            raise _CLIError(f"unaries have {unaries[0].shape[0]} classes but --num-classes is {args.num_classes}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"cucrf fit: {len(samples)} images from {folder} ({'synthetic unaries' if args.synthetic else 'unaries from ' + str(args.unary_dir)}), "
          f"learning {', '.join(args.learn)}; {args.val_fraction:.0%} held out for validation")
    result = fit(
        unaries, [s.image for s in samples], labels, _load_params(args.params),
        val_fraction=args.val_fraction, learn=args.learn, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, filter_size=args.filter_size, blur=args.blur, iterations=args.iterations,
        normalization=_normalization(args.normalization), device=args.device, seed=args.seed,
        progress=not args.no_progress, checkpoint=args.checkpoint, resume=args.resume,
    )
    result.params.to_json(out / "params.json")
    written = ["params.json"]
    if result.feature_transform is not None:
        (out / "feature_transform.json").write_text(json.dumps(result.feature_transform.to_dict(), indent=2) + "\n")
        written.append("feature_transform.json")
    (out / "history.json").write_text(json.dumps(result.history, indent=2) + "\n")
    written.append("history.json")
    if _plot_history(result.history, out / "training_curve.png"):
        written.append("training_curve.png")
    first, best = result.history[0], result.history[result.best_epoch]
    if first.get("val_miou") is not None:
        print(f"validation mIoU {first['val_miou']:.2%} -> {best['val_miou']:.2%} (epoch {result.best_epoch}), "
              f"accuracy {first['val_accuracy']:.2%} -> {best['val_accuracy']:.2%}")
    print(f"wrote {' '.join(written)} to {out}{os.sep}")
    return 0


# -- eval -----------------------------------------------------------------------------------------

_EVAL_EPILOG = """\
METHODS (comma-separated):
  unary          the argmax of the unary, no CRF
  cucrf          cucrf.infer with its defaults (filter 5, blur 4); --params applies
  cucrf:KxB      cucrf.infer with filter size K and blur B, e.g. cucrf:7x1
  densecrf       the fully connected CRF (pydensecrf2: Gaussian sxy 3 compat 3, bilateral sxy 80
                 srgb 13 compat 10); needs scripts/install-densecrf.sh
  convcrf[:KxB]  upstream ConvCRF's own algorithm (cucrf.convcrf, default config; filter 11, blur 4)

UNARIES: 'synthetic' (default) degrades each label as in the ConvCRF paper (downsample 8, 20%% of
the cells replaced; seed = --seed + image index); any other NAME reads <unary-dir>/<id>_NAME.npz
(an array 'logits', (C, H, W)).

examples:
  cucrf eval --data DATA_DIR --set voc --methods unary,cucrf:5x4,cucrf:7x1,densecrf
  cucrf eval --data DATA_DIR --set voc --unaries espnet2_384 --csv voc-real.csv
  cucrf eval --data DATA_DIR --max-images 10 --per-class
"""


_EVAL_METHODS = "unary,cucrf,densecrf"


def _cmd_eval(args) -> int:
    from . import evaluation
    from ._peers import densecrf_available

    params = _load_params(args.params)
    try:
        methods = evaluation.parse_methods(args.methods or _EVAL_METHODS)
    except ValueError as exc:
        raise _UsageError(f"--methods: {exc}") from exc
    if any(m.kind == "densecrf" for m in methods) and not densecrf_available():
        if args.methods is not None:
            raise _CLIError("method densecrf needs pydensecrf (PyPI: pydensecrf2); install it with "
                            "scripts/install-densecrf.sh or leave densecrf out of --methods")
        methods = [m for m in methods if m.kind != "densecrf"]
        print("cucrf: note: pydensecrf is not installed; densecrf left out", file=sys.stderr)
    sets = None
    if args.set:
        sets = [s.strip() for item in args.set for s in item.split(",") if s.strip()]
    try:
        results = _run_eval(evaluation, args, sets, methods, params)
    except FileNotFoundError as exc:
        raise _CLIError(str(exc)) from exc
    print(evaluation.format_table(results, per_class=args.per_class), end="")
    if args.csv:
        evaluation.write_csv(results, args.csv)
        print(f"wrote {args.csv}")
    return 0


def _run_eval(evaluation, args, sets, methods, params):
    return evaluation.evaluate(
        args.data, sets, methods, unaries=args.unaries, unary_dir=args.unary_dir, num_classes=args.num_classes,
        max_images=args.max_images, seed=args.seed, downsample=args.downsample, replace_prob=args.replace_prob,
        params=params, iterations=args.iterations, progress=not args.no_progress,
    )


# -- params ---------------------------------------------------------------------------------------


def _cmd_params(args) -> int:
    from ._params import CRFParams

    params = CRFParams() if args.params is None else CRFParams.from_json(args.params)
    if args.output:
        params.to_json(args.output)
        print(f"wrote {args.output}")
    else:
        print(params.to_json())
    return 0


# -- parser ---------------------------------------------------------------------------------------


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _label_or_none(text):
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer class id or 'none', got {text!r}") from None


def _crf_options() -> argparse.ArgumentParser:
    from ._api import DEFAULT_BLUR, DEFAULT_FILTER_SIZE, DEFAULT_ITERATIONS

    p = _ArgumentParser(add_help=False)
    g = p.add_argument_group("CRF options")
    g.add_argument("--filter-size", type=int, default=DEFAULT_FILTER_SIZE, metavar="K",
                   help="odd width of the message-passing window, in coarse cells (default: %(default)s)")
    g.add_argument("--blur", type=int, default=DEFAULT_BLUR, metavar="B",
                   help="messages are computed on a B times coarser grid; the window spans K*B pixels "
                        "(default: %(default)s)")
    g.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, metavar="N",
                   help="mean-field iterations (default: %(default)s)")
    g.add_argument("--params", metavar="JSON",
                   help="CRF parameters: a .json file (see 'cucrf params') or JSON text; default: built-in")
    g.add_argument("--normalization", choices=["none", "symmetric"], default="none",
                   help="kernel normalisation (default: %(default)s)")
    g.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="where to compute (default: cpu; gpu needs CuPy)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cucrf`` command."""
    from . import __version__

    parser = _ArgumentParser(prog="cucrf", description=_DESCRIPTION,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cucrf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    crf = _crf_options()

    demo = sub.add_parser(
        "demo", parents=[crf], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="refine a noisy segmentation of a generated scene (or your own image + label)",
        description="Make a noisy segmentation from a ground-truth label (the paper's synthetic\n"
                    "unary), refine it with the CRF, print accuracy and mean IoU before and after,\n"
                    "and write image.png, truth.png, noisy.png, refined.png, overlay.png and\n"
                    "comparison.png to --out.",
        epilog=_DEMO_EPILOG,
    )
    demo.add_argument("--image", metavar="IMG", help="your own image (use with --label)")
    demo.add_argument("--label", metavar="LBL",
                      help="its ground truth: a PNG of class ids (grey or paletted), 255 = ignore")
    demo.add_argument("--num-classes", type=_positive_int, metavar="C",
                      help="number of classes (default: largest class id in the label + 1)")
    demo.add_argument("--out", default="cucrf-demo", metavar="DIR",
                      help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the label noise (default: %(default)s)")
    demo.add_argument("--replace-prob", type=_fraction, default=0.2, metavar="P",
                      help="fraction of low-resolution cells given a random class (default: %(default)s)")
    demo.add_argument("--downsample", type=_positive_int, default=8, metavar="D",
                      help="downsampling factor of the noisy unary (default: %(default)s)")
    demo.add_argument("--per-class", action="store_true", help="also print the IoU of every class")
    demo.set_defaults(func=_cmd_demo)

    refine = sub.add_parser(
        "refine", parents=[crf], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="refine the class scores or label maps of your own images",
        description="Refine per-pixel class scores (or a coarse label map) of one or more images\n"
                    "with the CRF and write the refined labels as paletted PNGs.",
        usage="cucrf refine IMAGE [IMAGE ...] --unary UNARY [UNARY ...] (-o OUT.png [OUT.png ...] | "
              "--out-dir DIR) [options]",
        epilog=_REFINE_EPILOG,
    )
    refine.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s): PNG, JPEG, ...")
    refine.add_argument("-u", "--unary", nargs="+", required=True, metavar="UNARY",
                        help="one unary file per image (.npy, .npz or a label PNG; see below)")
    where = refine.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", nargs="+", metavar="OUT.png",
                       help="output PNG for each image")
    where.add_argument("--out-dir", metavar="DIR",
                       help="write each result to DIR/<image name>.png")
    refine.add_argument("--unary-kind", choices=["logits", "probabilities", "labels"], default=None,
                        help="what the unary holds (default: from the file, see below; arrays are logits)")
    refine.add_argument("--confidence", type=float, default=0.5, metavar="P",
                        help="label maps: probability given to each pixel's label (default: %(default)s)")
    refine.add_argument("--unknown-label", type=_label_or_none, default=_IGNORE, metavar="ID",
                        help="label maps: class id meaning 'unknown', filled in by the CRF "
                             "(default: %(default)s; 'none' for no unknown label)")
    refine.add_argument("--num-classes", type=_positive_int, metavar="C",
                        help="label maps: number of classes (default: largest id + 1); arrays: checked")
    refine.add_argument("--save-probabilities", nargs="*", metavar="OUT.npy",
                        help="also save the refined probabilities (C, H, W) as float32 .npy: to the "
                             "paths given (one per image) or, without paths, next to each output PNG")
    refine.set_defaults(func=_cmd_refine)

    fitp = sub.add_parser(
        "fit", parents=[crf], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="learn CRF parameters from labelled images",
        description="Learn the CRF parameters (kernel weights, bandwidths, compatibility, unary weight,\n"
                    "feature transform) by back-propagation through mean-field inference, with Adam.\n"
                    "--params gives the starting parameters.",
        epilog=_FIT_EPILOG,
    )
    fitp.add_argument("folder", metavar="FOLDER", help="folder of <id>_image.png / <id>_label.png pairs")
    fitp.add_argument("--unary-dir", metavar="DIR", help="folder of per-image unaries (logits)")
    fitp.add_argument("--unary-pattern", default="{name}.npz", metavar="PATTERN",
                      help="file name of an image's unary in --unary-dir; {name} is the id (default: %(default)s)")
    fitp.add_argument("--synthetic", action="store_true",
                      help="make the unaries from the labels (the paper's synthetic protocol)")
    fitp.add_argument("--num-classes", type=_positive_int, metavar="C",
                      help="number of classes (default: from the unaries, or the largest label + 1)")
    fitp.add_argument("--val-fraction", type=_fraction, default=0.25, metavar="F",
                      help="fraction of the images held out for validation (default: %(default)s)")
    fitp.add_argument("--epochs", type=int, default=10, metavar="N", help="training epochs (default: %(default)s)")
    fitp.add_argument("--lr", type=float, default=0.02, help="Adam learning rate (default: %(default)s)")
    fitp.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                      help="images per step; only equal-size images are batched (default: %(default)s)")
    fitp.add_argument("--learn", type=_learn_list, default=["weights", "bandwidths", "compatibility", "unary_weight"],
                      metavar="LIST", help="comma-separated: weights, bandwidths, compatibility, unary_weight, "
                                           "feature_transform, or all (default: all but feature_transform)")
    fitp.add_argument("--seed", type=int, default=0, help="seed of the split and image order (default: %(default)s)")
    fitp.add_argument("--max-images", type=_positive_int, metavar="N", help="use only the first N pairs")
    fitp.add_argument("--checkpoint", metavar="FILE.npz", help="write a checkpoint after every epoch")
    fitp.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    fitp.add_argument("--no-progress", action="store_true", help="no progress bar")
    fitp.add_argument("-o", "--out", default="cucrf-fit", metavar="DIR",
                      help="output folder (default: %(default)s)")
    fitp.set_defaults(func=_cmd_fit)

    evalp = sub.add_parser(
        "eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="score CRFs on folders of labelled images (the paper's protocol), DenseCRF side by side",
        description="Evaluate methods on folders of <id>_image.png / <id>_label.png pairs: pixel accuracy,\n"
                    "mean IoU (over classes in ground truth or prediction, and over classes in ground\n"
                    "truth), per-class IoU and seconds per image, accumulated over each set (label 255\n"
                    "ignored). Prints a table per set; --csv also writes one row per set and method.",
        epilog=_EVAL_EPILOG,
    )
    evalp.add_argument("--data", required=True, metavar="DIR",
                       help="a folder of pairs, or a folder of sets (subfolders such as voc/, msrc/, camvid/)")
    evalp.add_argument("--set", action="append", metavar="NAME",
                       help="subfolder(s) of --data to evaluate (repeat or comma-separate; default: --data itself "
                            "if it holds pairs, else voc, msrc, camvid where present)")
    evalp.add_argument("--methods", metavar="LIST",
                       help=f"comma-separated methods, see below (default: {_EVAL_METHODS}; densecrf left "
                            "out when pydensecrf is missing)")
    evalp.add_argument("--unaries", default="synthetic", metavar="NAME",
                       help="'synthetic' or the NAME of per-image unary files <id>_NAME.npz (default: %(default)s)")
    evalp.add_argument("--unary-dir", metavar="DIR", help="folder of the unary files (default: DIR/unaries)")
    evalp.add_argument("--num-classes", type=_positive_int, metavar="C",
                       help="number of classes (default: 21 voc, 23 msrc, 11 camvid, else from the data)")
    evalp.add_argument("--seed", type=int, default=0, help="seed of the synthetic unaries (default: %(default)s)")
    evalp.add_argument("--downsample", type=_positive_int, default=8, metavar="D",
                       help="synthetic unaries: downsampling factor (default: %(default)s)")
    evalp.add_argument("--replace-prob", type=_fraction, default=0.2, metavar="P",
                       help="synthetic unaries: fraction of cells given a random class (default: %(default)s)")
    evalp.add_argument("--iterations", type=int, default=5, metavar="N",
                       help="mean-field iterations of every CRF (default: %(default)s)")
    evalp.add_argument("--params", metavar="JSON", help="cucrf parameters for the cucrf methods (default: built-in)")
    evalp.add_argument("--max-images", type=_positive_int, metavar="N", help="use the first N images of each set")
    evalp.add_argument("--csv", metavar="OUT.csv", help="also write the results as CSV")
    evalp.add_argument("--per-class", action="store_true", help="also print the IoU of every class")
    evalp.add_argument("--no-progress", action="store_true", help="no progress bar")
    evalp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
    evalp.set_defaults(func=_cmd_eval)

    params = sub.add_parser("params", help="print the default CRF parameters as JSON",
                            description="Print CRF parameters as JSON: the defaults, or those of "
                                        "--params after validation. Edit the output and pass it "
                                        "back with --params.")
    params.add_argument("--params", metavar="JSON", help="validate and print this parameter file instead")
    params.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    params.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    params.set_defaults(func=_cmd_params)
    return parser


def main(argv=None) -> int:
    """Run the ``cucrf`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 on an error, 2 on a bad command line.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"cucrf: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        print("cucrf: error: missing COMMAND: one of demo, refine, fit, eval, params (see 'cucrf --help')", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cucrf: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, no traceback, unless --debug
        if args.debug:
            raise
        print(f"cucrf: error: {_error_text(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, _UsageError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
