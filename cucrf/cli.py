"""The ``cucrf`` command line: ``cucrf demo``, ``cucrf refine``, ``cucrf fit``, ``cucrf eval`` and ``cucrf params``.

Run ``cucrf --help`` or ``cucrf COMMAND --help`` for the options. Every error is reported as a
single ``cucrf: error: ...`` line on stderr with a non-zero exit status (2 for a bad command
line, 1 for everything else); ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
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
colours). Several images show a progress bar. An output path that names one of the input files
is refused before any work.

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


def _load_params(spec, option: str = "--params "):
    """The CRFParams of a file (or JSON text) given to ``option``; None for None."""
    from ._params import CRFParams

    if spec is None:
        return None
    try:
        return CRFParams.from_json(spec)
    except (ValueError, TypeError) as exc:
        raise _CLIError(f"{option}{spec!r}: {_error_text(exc)}; expected a JSON object of CRF parameters, as "
                        "'cucrf params' and 'cucrf fit' write") from exc


_TRANSFORM_EXPECTED = ('expected the feature_transform.json that \'cucrf fit\' writes: '
                       '{"matrix": [[...], ...] (F\' x F), "offset": [...] (F\')}')


def _load_feature_transform(path: str, option: str = "--feature-transform ") -> dict:
    """Read a feature transform file; return ``{'matrix': (F', F), 'offset': (F',)}`` float64 arrays.

    Every problem is a :class:`_CLIError` naming ``option``, the file, what it holds and what is
    expected.
    """
    what = f"{option}{path!r}"
    p = Path(path)
    if not p.exists():
        raise _CLIError(f"{what}: the file does not exist; {_TRANSFORM_EXPECTED}")
    if not p.is_file():
        raise _CLIError(f"{what}: not a file; {_TRANSFORM_EXPECTED}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _CLIError(f"{what}: not valid JSON ({_error_text(exc)}); {_TRANSFORM_EXPECTED}") from exc
    if not isinstance(data, dict):
        raise _CLIError(f"{what}: holds a JSON {type(data).__name__}; {_TRANSFORM_EXPECTED}")
    unknown = sorted(set(data) - {"matrix", "offset"})
    if unknown or "matrix" not in data:
        raise _CLIError(f"{what}: has keys {sorted(data)}; {_TRANSFORM_EXPECTED}")
    try:
        matrix = np.array(data["matrix"], dtype=np.float64)
        offset = np.array(data["offset"] if data.get("offset") is not None else np.zeros(len(matrix)),
                          dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise _CLIError(f"{what}: 'matrix' and 'offset' must hold numbers ({_error_text(exc)}); "
                        f"{_TRANSFORM_EXPECTED}") from exc
    if matrix.ndim != 2 or matrix.size == 0:
        raise _CLIError(f"{what}: 'matrix' has shape {matrix.shape}; {_TRANSFORM_EXPECTED}")
    if offset.shape != (matrix.shape[0],):
        raise _CLIError(f"{what}: 'offset' has shape {offset.shape} but 'matrix' is {matrix.shape[0]}x"
                        f"{matrix.shape[1]}; expected an offset of shape ({matrix.shape[0]},)")
    if not (np.isfinite(matrix).all() and np.isfinite(offset).all()):
        raise _CLIError(f"{what}: holds NaN or infinite values; expected finite numbers")
    return {"matrix": matrix, "offset": offset}


def _check_transform_channels(transform, channels: int, option: str, where: str) -> None:
    """A :class:`_CLIError` unless the transform maps ``channels`` image channels."""
    f_in = transform["matrix"].shape[1]
    if f_in != channels:
        raise _CLIError(f"{option}: the matrix is {transform['matrix'].shape[0]}x{f_in}, for images with {f_in} "
                        f"channels, but {where} {channels} channels; expected a matrix with {channels} columns")


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

    if getattr(args, "include_self", False):
        kwargs["include_self"] = True
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


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (the same inode where both exist)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _check_output_paths(outputs, inputs) -> None:
    """Refuse output paths that would overwrite an input or cannot be created.

    Parameters
    ----------
    outputs : list of (str, Path)
        The option that named each output path (e.g. ``'-o/--output'``) and the path.
    inputs : list of (str, str)
        What each input file is (e.g. ``'image'``) and its path.

    Raises
    ------
    _UsageError
        If an output is one of the inputs, or lies under a path that is a file, not a folder.
    """
    for option, out in outputs:
        for what, path in inputs:
            if _same_file(out, Path(path)):
                raise _UsageError(f"{option} {str(out)!r} is the {what} {path!r}; writing it would destroy "
                                  "the input, give another output path")
        parent = next((d for d in Path(os.path.abspath(out)).parents if d.exists()), None)
        if parent is not None and not parent.is_dir():
            raise _UsageError(f"{option} {str(out)!r}: {str(parent)!r} is a file, not a folder; give an "
                              "output path inside a folder")


def _cmd_refine(args) -> int:
    from tqdm import tqdm

    from . import palette

    n = len(args.images)
    if len(args.unary) != n:
        raise _UsageError(f"got {n} image(s) but {len(args.unary)} --unary file(s); give one unary "
                          "per image, in the same order")
    outputs, prob_paths = _refine_outputs(args)
    inputs = [("image", i) for i in args.images] + [("unary", u) for u in args.unary]
    if args.params is not None and not args.params.lstrip().startswith("{"):  # else JSON text
        inputs.append(("--params file", args.params))
    if args.feature_transform is not None:
        inputs.append(("--feature-transform file", args.feature_transform))
    out_option = "-o/--output" if args.output is not None else "--out-dir"
    _check_output_paths([(out_option, o) for o in outputs]
                        + [("--save-probabilities", p) for p in prob_paths if p is not None], inputs)
    # Check every input exists before spending time on the first image.
    for i, u in zip(args.images, args.unary):
        _existing_file(i, "image")
        _existing_file(u, "unary")
    params = _load_params(args.params)
    transform = None
    if args.feature_transform is not None:
        transform = _load_feature_transform(args.feature_transform)

    total = 0.0
    bar = tqdm(total=n, unit="image", disable=n <= 1, file=sys.stderr, dynamic_ncols=True)
    try:
        for ipath, upath, opath, ppath in zip(args.images, args.unary, outputs, prob_paths):
            image = _read_image(ipath)
            unary, kind = _load_unary(upath, args.unary_kind)
            _check_unary_shape(unary, kind, image, upath, ipath)
            extra = {"unary_kind": kind}
            if transform is not None:
                _check_transform_channels(transform, image.shape[2], f"--feature-transform {args.feature_transform!r}",
                                          f"image {ipath!r} has")
                extra["feature_transform"] = transform
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
made from the labels with the paper's synthetic protocol (seed = the image's position among the
folder's pairs sorted by id). --synthetic needs --num-classes: the labels do not fix the number
of classes (a folder whose images show 16 of a data set's 23 classes would otherwise give
parameters for 16). Every label is checked against it (or against the unaries' class count)
before training. The images are read one at a time, every epoch, so the folder may be large.

Validation: --split FILE names the images of each subset, as JSON
  {"train": ["id", ...], "validation": ["id", ...], "test": ["id", ...]}
fit trains on 'train', scores 'validation' after every epoch and never reads 'test' (keep it for
'cucrf eval --split FILE --subset test'). Without a validation subset, --val-fraction of the
training images is held out ('auto': cucrf.fit's choice for the number of images). The epoch
with the best --metric is kept (epoch 0 = the starting parameters, which must be beaten);
--patience epochs in a row without a new best stop training.

Outputs in OUT: params.json (use it with --params), feature_transform.json (with --learn
feature_transform; use it with --feature-transform), history.json (one entry per epoch) and,
when matplotlib is installed, training_curve.png. Each epoch's summary is logged on stderr.

examples:
  cucrf fit data/voc --unary-dir data/unaries --unary-pattern "{name}_espnet2_384.npz" --out fitted
  cucrf fit data/msrc --synthetic --num-classes 23 --epochs 5 --learn weights,bandwidths --out fitted-msrc
  cucrf fit data/msrc --synthetic --num-classes 23 --split split.json --metric miou_gt --out fitted
  cucrf refine img.png --unary img.npz --params fitted/params.json -o refined.png
"""

#: Selection metrics: (name in messages, short name in plots, a percentage?).
_METRICS = {"accuracy": ("validation pixel accuracy", "pixel accuracy", True),
            "miou": ("validation mIoU", "mIoU", True),
            "miou_gt": ("validation mIoU over the classes in the ground truth", "mIoU (ground-truth classes)", True),
            "loss": ("validation loss", "loss", False)}


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


def _json_ready(value):
    """``value`` with NaN / infinities as None and NumPy scalars as Python numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _metric_series(history, metric):
    """Per-epoch values of the selection metric (None where unknown)."""
    key = "val_loss" if metric == "loss" else f"val_{metric}"
    values = [h.get(key) for h in history]
    if all(v is None for v in values):  # no validation set: whatever fit selected on
        values = [h.get("score") for h in history]
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def _training_curve_figure(history, metric, best_epoch):
    """The training curve: loss (training and validation) above, the selection metric below.

    Parameters
    ----------
    history : list of dict
        :attr:`cucrf.FitResult.history`.
    metric : str
        The selection metric (``accuracy``, ``miou``, ``miou_gt`` or ``loss``).
    best_epoch : int
        Marked with a vertical line in both panels and a star on the metric's curve.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def values(key):
        return [np.nan if h.get(key) is None else float(h[key]) for h in history]

    epochs = [int(h["epoch"]) for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True)
    ax_loss.plot(epochs, values("train_loss"), "o-", color="tab:blue", label="training loss")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(epochs, values("val_loss"), "s-", color="tab:orange", label="validation loss")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title(f"training curve (best epoch {best_epoch}, selected by {metric})")

    _, short, percent = _METRICS.get(metric, (metric, metric, False))
    series = [np.nan if v is None else (100 * v if percent else v) for v in _metric_series(history, metric)]
    ax_metric.plot(epochs, series, "o-", color="tab:green", label=f"validation {short} (selection metric)")
    ax_metric.set_ylabel(f"validation {short} (%)" if percent else f"validation {short}")
    if best_epoch in epochs and np.isfinite(series[epochs.index(best_epoch)]):
        ax_metric.plot([best_epoch], [series[epochs.index(best_epoch)]], "*", color="tab:red", markersize=14,
                       zorder=5)
    for ax in (ax_loss, ax_metric):
        ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    ax_metric.set_xlabel("epoch")
    ax_metric.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _plot_history(history, path, metric="miou", best_epoch=0) -> bool:
    """Write the training curve to ``path``; False (and nothing written) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except Exception:  # the plot is optional (the 'plot' extra)
        return False
    import matplotlib.pyplot as plt

    fig = _training_curve_figure(history, metric, best_epoch)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return True


class _LogToStderr(logging.Handler):
    """Log records as lines on stderr, written between progress bars (``tqdm.write``)."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never break the command
            self.handleError(record)


class _FitLogging:
    """Route the ``cucrf.fit`` logger's INFO lines to stderr for the duration of a command."""

    def __enter__(self):
        self.logger = logging.getLogger("cucrf.fit")
        self.handler = _LogToStderr(logging.INFO)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # shown once, here, whatever the root logger does
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]
        return False


def _format_score(value, metric) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.2%}" if _METRICS.get(metric, ("", "", False))[2] else f"{value:.4f}"


def _fit_data(args):
    """The training and validation PairDatasets and the number of classes, all checked."""
    from . import datasets

    folder = Path(args.folder)
    try:
        data = datasets.PairDataset(folder, unary_dir=args.unary_dir, unary_pattern=args.unary_pattern,
                                    synthetic=args.synthetic, num_classes=args.num_classes if args.synthetic else None)
        validation = None
        if args.split is not None:
            split = _load_split_arg(args.split, folder)
            if not split["train"]:
                raise _CLIError(f"--split {args.split!r} names no 'train' ids; expected a non-empty list of the "
                                "images to fit on")
            if split["validation"] and args.val_fraction is not None:
                raise _UsageError(f"--split {args.split!r} names validation images, so --val-fraction "
                                  f"{args.val_fraction} has nothing to do; give one or the other")
            train = data.subset(split["train"])
            if split["validation"]:
                validation = data.subset(split["validation"])
        else:
            train = data
        if args.max_images is not None:
            train = train[:args.max_images]
            validation = None if validation is None else validation[:args.max_images]
        num_classes = train.check(args.num_classes, name="--num-classes")
        if validation is not None:
            validation.check(num_classes, name="--num-classes" if args.num_classes is not None
                             else "the training unaries' class count")
    except FileNotFoundError as exc:
        raise _CLIError(str(exc)) from exc
    return train, validation, num_classes


def _cmd_fit(args) -> int:
    from . import _fit

    folder = Path(args.folder)
    if not folder.is_dir():
        raise _CLIError(f"training folder {args.folder!r} does not exist or is not a directory")
    if args.synthetic == (args.unary_dir is not None):
        raise _UsageError("give either --unary-dir or --synthetic (see 'cucrf fit --help')")
    if args.synthetic and args.num_classes is None:
        raise _UsageError("--synthetic needs --num-classes C: the labels alone do not fix the number of classes "
                          "(e.g. 21 for PASCAL VOC, 23 for MSRC, 11 for CamVid)")
    if args.resume and args.checkpoint is None:
        raise _UsageError("--resume needs --checkpoint FILE.npz (the checkpoint to continue from)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise _UsageError(f"-o/--out {args.out!r} is a file; expected a folder to write params.json, history.json "
                          "and the training curve into")
    params = _load_params(args.params)  # read early: a bad file should fail before any work
    train, validation, num_classes = _fit_data(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = "synthetic unaries" if args.synthetic else f"unaries from {args.unary_dir}"
    if validation is not None:
        held_out = f"validating on {len(validation)} images of {args.split}"
    elif args.val_fraction in (None, "auto"):
        held_out = "validation images held out as cucrf.fit chooses (--val-fraction auto)"
    else:
        held_out = f"{args.val_fraction:.0%} held out for validation"
    print(f"cucrf fit: {len(train)} training images from {folder} ({source}, {num_classes} classes), "
          f"learning {', '.join(args.learn)}; {held_out}")
    sys.stdout.flush()

    kwargs = dict(
        num_classes=num_classes, learn=args.learn, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        filter_size=args.filter_size, blur=args.blur, iterations=args.iterations,
        normalization=_normalization(args.normalization), device=args.device, seed=args.seed,
        progress=not args.no_progress, checkpoint=args.checkpoint, resume=args.resume,
    )
    if validation is not None:
        kwargs["validation"] = (validation.unaries, validation.images, validation.labels)
    if args.val_fraction is not None:
        kwargs["val_fraction"] = args.val_fraction
    kwargs.update(metric=args.metric, patience=args.patience, include_self=args.include_self)
    with _FitLogging():
        result = _fit.fit(train.unaries, train.images, train.labels, params, **kwargs)

    metric, improved = result.metric, result.improved
    result.params.to_json(out / "params.json")
    written = ["params.json"]
    if result.feature_transform is not None:
        data = _json_ready(result.feature_transform.to_dict())
        (out / "feature_transform.json").write_text(json.dumps(data, indent=2) + "\n")
        written.append("feature_transform.json")
    (out / "history.json").write_text(json.dumps(_json_ready(result.history), indent=2) + "\n")
    written.append("history.json")
    if _plot_history(result.history, out / "training_curve.png", metric, result.best_epoch):
        written.append("training_curve.png")

    series = _metric_series(result.history, metric)
    epochs = [h["epoch"] for h in result.history]
    start = series[0] if series else None
    best = series[epochs.index(result.best_epoch)] if result.best_epoch in epochs else None
    title = _METRICS.get(metric, (metric,))[0]
    scored = getattr(result, "validation", None)  # how fit scored the epochs, in words
    scored = f" ({scored})" if scored and scored != "none" else ""
    if str(getattr(result, "validation", "")).startswith("no validation"):
        print(f"no validation: kept the last epoch ({result.best_epoch}) without scoring it against the start")
    elif improved:
        print(f"fitting beat the start: best epoch {result.best_epoch} of {epochs[-1]}, {title} "
              f"{_format_score(start, metric)} -> {_format_score(best, metric)}{scored}")
    else:
        print(f"fitting did not beat the start: no epoch of {epochs[-1]} improved the {title} "
              f"({_format_score(start, metric)}){scored}; params.json holds the starting parameters")
    print(f"wrote {' '.join(written)} to {out}{os.sep}")
    return 0


# -- eval -----------------------------------------------------------------------------------------

_EVAL_EPILOG = """\
METHODS (comma-separated):
  unary          the argmax of the unary, no CRF
  cucrf          cucrf.infer with its defaults (filter 5, blur 4); a bare --params applies
  cucrf:KxB      cucrf.infer with filter size K and blur B, e.g. cucrf:7x1
  densecrf       the fully connected CRF (pydensecrf2: Gaussian sxy 3 compat 3, bilateral sxy 80
                 srgb 13 compat 10); needs scripts/install-densecrf.sh
  convcrf[:KxB]  upstream ConvCRF's own algorithm (cucrf.convcrf, default config; filter 11, blur 4)

PARAMETERS: a bare --params FILE (and --feature-transform FILE) applies to the cucrf methods.
Each --params NAME=FILE adds a row NAME: cucrf with those parameters, at the window of the cucrf
method in --methods (cucrf's default window when there is none; with several cucrf windows, one
row NAME:KxB per window), with the feature transform --feature-transform NAME=FILE when given.
So the output folders of several 'cucrf fit' runs compare in one table:
  --params fit1=run1/params.json --feature-transform fit1=run1/feature_transform.json
  --params fit2=run2/params.json

UNARIES: 'synthetic' (default) degrades each label as in the ConvCRF paper (downsample 8, 20%% of
the cells replaced; seed = --seed + the image's position in its folder, sorted by id); any other
NAME reads <unary-dir>/<id>_NAME.npz (an array 'logits', (C, H, W)).

SPLIT: --split FILE (JSON {"train": [ids], "validation": [ids], "test": [ids]}, as for 'cucrf
fit') with --subset NAME scores only that subset's images (default: test) of a single set.

examples:
  cucrf eval --data DATA_DIR --set voc --methods unary,cucrf:5x4,cucrf:7x1,densecrf
  cucrf eval --data DATA_DIR --set voc --unaries espnet2_384 --csv voc-real.csv
  cucrf eval --data DATA_DIR --max-images 10 --per-class
  cucrf eval --data DATA_DIR --set msrc --methods unary,cucrf --params fitted=fitted/params.json \\
             --split split.json --subset test
"""


_EVAL_METHODS = "unary,cucrf,densecrf"
_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*")


def _split_name(value: str):
    """``(NAME, FILE)`` for ``NAME=FILE``; ``(None, value)`` for a bare file (or JSON text)."""
    if value.lstrip().startswith("{") or Path(value).exists():
        return None, value
    m = re.fullmatch(r"([^=/\\]*)=(.*)", value, re.S)
    if m is None:
        return None, value
    return m.group(1), m.group(2)


def _named_option(values, option: str):
    """Repeated ``[NAME=]VALUE`` options: ``(the bare value or None, {NAME: VALUE} in order)``."""
    bare, named = None, {}
    for value in values or []:
        name, item = _split_name(value)
        if name is None:
            if bare is not None:
                raise _UsageError(f"{option} given twice without a NAME ({bare!r} and {value!r}); expected one "
                                  f"bare {option} FILE, and NAME=FILE for each further file")
            bare = value
            continue
        if not _NAME_PATTERN.fullmatch(name):
            raise _UsageError(f"{option} {value!r}: NAME {name!r} must start with a letter or '_' and hold only "
                              "letters, digits and _.+-; expected NAME=FILE")
        if not item:
            raise _UsageError(f"{option} {value!r}: no FILE after '='; expected NAME=FILE")
        if name in named:
            raise _UsageError(f"{option} NAME {name!r} given twice ({named[name]!r} and {item!r}); expected one "
                              "file per NAME")
        named[name] = item
    return bare, named


def _load_split_arg(path, folder):
    """The split file given to ``--split``, checked against ``folder``."""
    from . import datasets

    try:
        return datasets.load_split(path, folder=folder)
    except (FileNotFoundError, ValueError) as exc:
        raise _CLIError(f"--split: {_one_line(exc)}") from exc


def _eval_parameters(args):
    """Bare params and transform, and ``{NAME: (params, transform)}`` of the named ones."""
    bare_params, named_params = _named_option(args.params, "--params")
    bare_transform, named_transforms = _named_option(args.feature_transform, "--feature-transform")
    for name, path in named_transforms.items():
        if name not in named_params:
            known = ", ".join(named_params) or "none"
            raise _UsageError(f"--feature-transform {name}={path}: no --params named {name!r} (NAMEs given: "
                              f"{known}); expected the NAME of a --params NAME=FILE")
    params = _load_params(bare_params)
    transform = None if bare_transform is None else _load_feature_transform(bare_transform)
    named = {}
    for name, path in named_params.items():
        p = _load_params(path, option=f"--params {name}=")
        t = None
        if name in named_transforms:
            t = _load_feature_transform(named_transforms[name], option=f"--feature-transform {name}=")
        named[name] = (p, t)
    return params, transform, named, (bare_transform, named_transforms)


def _cmd_eval(args) -> int:
    from . import datasets, evaluation
    from ._peers import densecrf_available

    if args.subset is not None and args.split is None:
        raise _UsageError(f"--subset {args.subset} needs --split FILE (the JSON that names each subset's ids)")
    params, transform, named, transform_files = _eval_parameters(args)
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
    try:
        methods = evaluation.named_methods(methods, named)
    except ValueError as exc:
        raise _UsageError(f"--params: {exc}") from exc
    sets = None
    if args.set:
        sets = [s.strip() for item in args.set for s in item.split(",") if s.strip()]
    try:
        folders = evaluation.find_sets(args.data, sets)
    except FileNotFoundError as exc:
        raise _CLIError(str(exc)) from exc

    names = None
    if args.split is not None:
        if len(folders) != 1:
            raise _UsageError(f"--split names the images of one set, but {len(folders)} sets would be evaluated "
                              f"({', '.join(f.name for f in folders)}); choose one with --set")
        subset = args.subset or "test"
        names = _load_split_arg(args.split, folders[0])[subset]
        if not names:
            raise _CLIError(f"--split {args.split!r} names no {subset!r} images; expected a non-empty list of ids "
                            f"under {subset!r} for --subset {subset}")
        print(f"scoring the {len(names)} '{subset}' images of {args.split}")

    # Feature transforms must fit the images: check each against the first image of each set.
    checks = [(f"--feature-transform {transform_files[0]!r}", transform)] if transform is not None else []
    checks += [(f"--feature-transform {n}={transform_files[1][n]}", t) for n, (_, t) in named.items() if t is not None]
    if checks:
        for folder in folders:
            first = (names or datasets.PairDataset(folder).names)[0]
            image = _read_image(str(folder / f"{first}_image.png"))
            for option, t in checks:
                _check_transform_channels(t, image.shape[2], option, f"the images of set {folder.name!r} have")
    try:
        results = evaluation.evaluate(
            args.data, sets, methods, unaries=args.unaries, unary_dir=args.unary_dir, num_classes=args.num_classes,
            max_images=args.max_images, seed=args.seed, downsample=args.downsample, replace_prob=args.replace_prob,
            params=params, iterations=args.iterations, progress=not args.no_progress, names=names,
            feature_transform=transform, include_self=args.include_self,
        )
    except FileNotFoundError as exc:
        raise _CLIError(str(exc)) from exc
    print(evaluation.format_table(results, per_class=args.per_class), end="")
    if args.csv:
        evaluation.write_csv(results, args.csv)
        print(f"wrote {args.csv}")
    return 0


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


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _class_count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of classes (an integer >= 2), got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a number of classes >= 2, got {value}")
    return value


def _val_fraction(text):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1), got {value}")
    return value


def _patience(text):
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'none', got {value}")
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
    g.add_argument("--include-self", action="store_true",
                   help="keep the centre of the window (each pixel's message includes itself), as upstream "
                        "ConvCRF does; parameters fitted with it are meant to be used with it")
    g.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="where to compute (default: cpu; gpu needs CuPy)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors")
    return p


def _fit_defaults() -> dict:
    """:func:`cucrf.fit`'s defaults, which ``cucrf fit`` shares."""
    import inspect

    from . import _fit

    return {name: p.default for name, p in inspect.signature(_fit.fit).parameters.items()
            if p.default is not inspect.Parameter.empty}


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
    refine.add_argument("--confidence", type=float, default=None, metavar="P",
                        help="label maps: probability given to each pixel's label "
                             "(default: 0.5, or 0.7 for two classes)")
    refine.add_argument("--unknown-label", type=_label_or_none, default=_IGNORE, metavar="ID",
                        help="label maps: class id meaning 'unknown', filled in by the CRF "
                             "(default: %(default)s; 'none' for no unknown label)")
    refine.add_argument("--num-classes", type=_positive_int, metavar="C",
                        help="label maps: number of classes (default: largest id + 1); arrays: checked")
    refine.add_argument("--feature-transform", metavar="FILE",
                        help="the feature_transform.json that 'cucrf fit --learn feature_transform' writes, used "
                             "with the --params it wrote")
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
    fitp.add_argument("--num-classes", type=_class_count, metavar="C",
                      help="number of classes: required with --synthetic; with --unary-dir checked against the "
                           "unaries (default: theirs). Every label must hold ids < C (or 255)")
    fitp.add_argument("--split", metavar="FILE",
                      help='JSON {"train": [ids], "validation": [ids], "test": [ids]}: fit on train, validate on '
                           "validation, never read test (default: every pair of FOLDER trains)")
    fit_defaults = _fit_defaults()
    fitp.add_argument("--val-fraction", type=_val_fraction, default=None, metavar="F",
                      help="without validation images from --split: the fraction of the training images held out "
                           f"for validation, in [0, 1), or 'auto' (default: {fit_defaults['val_fraction']})")
    fitp.add_argument("--metric", choices=["miou", "miou_gt", "accuracy", "loss"], default=fit_defaults["metric"],
                      help="validation score that selects the best epoch: mIoU (classes in ground truth or "
                           "prediction), mIoU over the classes in the ground truth, pixel accuracy, or loss "
                           "(default: %(default)s)")
    fitp.add_argument("--patience", type=_patience, default=fit_defaults["patience"], metavar="N",
                      help="stop after N epochs in a row without a new best; 'none' never stops early "
                           "(default: %(default)s)")
    fitp.add_argument("--epochs", type=int, default=fit_defaults["epochs"], metavar="N",
                      help="at most N training epochs (default: %(default)s)")
    fitp.add_argument("--lr", type=float, default=fit_defaults["lr"], help="Adam learning rate (default: %(default)s)")
    fitp.add_argument("--batch-size", type=_positive_int, default=fit_defaults["batch_size"], metavar="N",
                      help="images per step; only equal-size images are batched (default: %(default)s)")
    fitp.add_argument("--learn", type=_learn_list, default=list(fit_defaults["learn"]),
                      metavar="LIST", help="comma-separated: weights, bandwidths, compatibility, unary_weight, "
                                           "feature_transform, or all (default: "
                                           f"{','.join(fit_defaults['learn'])})")
    fitp.add_argument("--seed", type=_non_negative_int, default=fit_defaults["seed"],
                      help="seed of the validation hold-out and the image order (default: %(default)s)")
    fitp.add_argument("--max-images", type=_positive_int, metavar="N", help="use only the first N pairs")
    fitp.add_argument("--checkpoint", metavar="FILE.npz", help="write a checkpoint after every epoch")
    fitp.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    fitp.add_argument("--no-progress", action="store_true",
                      help="no progress bars (each epoch's summary is still logged on stderr)")
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
    evalp.add_argument("--params", action="append", metavar="[NAME=]JSON",
                       help="cucrf parameters: a bare FILE for the cucrf methods (default: built-in); NAME=FILE "
                            "(repeatable) adds a row NAME, cucrf with those parameters (see below)")
    evalp.add_argument("--feature-transform", action="append", metavar="[NAME=]FILE",
                       help="a feature_transform.json from 'cucrf fit': a bare FILE for the cucrf methods, "
                            "NAME=FILE for the row of --params NAME=FILE")
    evalp.add_argument("--include-self", action="store_true",
                       help="cucrf methods keep the centre of the window, as upstream ConvCRF does")
    evalp.add_argument("--split", metavar="FILE",
                       help='JSON {"train": [ids], "validation": [ids], "test": [ids]}: score only the images of '
                            "--subset (one set only)")
    evalp.add_argument("--subset", choices=["train", "validation", "test"], default=None,
                       help="the subset of --split to score (default: test)")
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
