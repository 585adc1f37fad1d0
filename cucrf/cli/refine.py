"""``cucrf refine``: refine the class scores or label maps of your own images."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from ._crf import IGNORE, num_classes_from_labels, run_crf
from ._errors import CLIError, UsageError, error_text
from ._files import (check_output_paths, check_transform_channels, check_unary_shape, existing_file,
                     load_class_names, load_feature_transform, load_params, load_unary, read_image,
                     write_rgb)
from ._pictures import (COLOUR_MAX_CLASSES, PNG_MAX_CLASSES, comparison_strip, image_rgb, legend_entries,
                        write_label_png)
from ._parser import label_or_none, positive_int, spacing
from ._tiles import add_options as add_scale_options

EPILOG = """\
UNARY files:
  .npy            an array of shape (C, H, W): logits / log-probabilities (default), or
                  probabilities with --unary-kind probabilities; a 2-D integer array is a
                  label map (see below)
  .npz            the array named 'logits', 'unary' or 'probabilities' (in that order), else
                  the first array; an array named 'probabilities' is read as probabilities
  .png (or other  a label map of class ids (greyscale or paletted PNG); each pixel trusts its
  image)          label with --confidence, pixels equal to --unknown-label are left to the CRF

Images and unaries are paired in order: the first UNARY belongs to the first IMAGE, and so on.
The refined labels are written as single-channel PNGs of class ids (8-bit, 16-bit beyond 256
classes): they read back as the ids with imageio, Pillow or OpenCV, and look dark in a viewer.
Pictures in colour are extra outputs: --overlay (the labels blended over the image) and
--comparison (image, labels before and after the CRF, and a legend of the classes).

--save-probabilities, --overlay and --comparison take one file per image, or one folder for
all images (an existing folder, or a path ending in '/'; files named after the output PNGs),
or no path: then each file goes next to its output PNG (OUT.npy, OUT_overlay.png,
OUT_comparison.png). Several images show a progress bar (--no-progress: none). An output path
that names an input file or another output is refused before any work.

examples:
  cucrf refine photo.jpg --unary logits.npy -o refined.png
  cucrf refine photo.jpg --unary logits.npy -o refined.png --overlay overlay.png --comparison strip.png
  cucrf refine photo.jpg --unary coarse_label.png --confidence 0.7 -o refined.png
  cucrf refine img/*.jpg --unary logits/*.npz --out-dir refined --save-probabilities --comparison
  cucrf params > params.json   # edit, then: cucrf refine ... --params params.json
  cucrf refine t1.nii.gz --unary probabilities.nii.gz --unary-kind probabilities --standardize \
      --blur 1,4,4 -o labels.nii.gz   # a volume: spacing from the header, labels with its geometry
"""


def add_parser(sub, parents) -> argparse.ArgumentParser:
    """Register ``refine`` with the subparsers ``sub``; ``parents`` hold the CRF options."""
    refine = sub.add_parser(
        "refine", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="refine the class scores or label maps of your own images",
        description="Refine per-pixel class scores (or a coarse label map) of one or more images\n"
                    "with the CRF and write the refined labels as PNGs of class ids.",
        usage="cucrf refine IMAGE [IMAGE ...] --unary UNARY [UNARY ...] (-o OUT.png [OUT.png ...] | "
              "--out-dir DIR) [options]",
        epilog=EPILOG,
    )
    refine.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s): PNG, JPEG, ...")
    refine.add_argument("-u", "--unary", nargs="+", required=True, metavar="UNARY",
                        help="one unary file per image (.npy, .npz or a label PNG; see below)")
    where = refine.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", nargs="+", metavar="OUT.png",
                       help="output PNG for each image")
    where.add_argument("--out-dir", metavar="DIR",
                       help="write each result to DIR/<image name>.png (an ending _image, _img, _rgb or "
                            "_leftImg8bit of the name is left out: DIR/<id>.png for <id>_image.png)")
    refine.add_argument("--unary-kind", choices=["logits", "probabilities", "labels"], default=None,
                        help="what the unary holds (default: from the file, see below; arrays are logits)")
    refine.add_argument("--confidence", type=float, default=None, metavar="P",
                        help="label maps: probability given to each pixel's label "
                             "(default: 0.5, or 0.7 for two classes)")
    refine.add_argument("--unknown-label", type=label_or_none, default=IGNORE, metavar="ID",
                        help="label maps: class id meaning 'unknown', filled in by the CRF "
                             "(default: %(default)s; 'none' for no unknown label)")
    refine.add_argument("--num-classes", type=positive_int, metavar="C",
                        help="label maps: number of classes (default: largest id + 1); arrays: checked")
    refine.add_argument("--feature-transform", metavar="FILE",
                        help="the feature_transform.json that 'cucrf fit --learn feature_transform' writes, used "
                             "with the --params it wrote")
    refine.add_argument("--save-probabilities", nargs="*", metavar="OUT.npy",
                        help="also save the refined probabilities (C, H, W) as float32 .npy: to the "
                             ".npy paths given (one per image), into a folder (an existing one, or a path "
                             "ending in /; files named after the output PNGs) or, without paths, next to "
                             "each output PNG")
    refine.add_argument("--overlay", nargs="*", metavar="OUT.png",
                        help="also write the refined labels in colour over the image (see below for the paths)")
    refine.add_argument("--comparison", nargs="*", metavar="OUT.png",
                        help="also write a strip: the image, the labels before and after the CRF, a legend")
    refine.add_argument("--class-names", metavar="NAMES",
                        help="class names for the --comparison legend: voc, msrc, camvid, a comma-separated "
                             "list, or a text file with one name a line (default: class ids)")
    refine.add_argument("--no-progress", action="store_true", help="no progress bar (for several images)")
    volumes = refine.add_argument_group("volumes (NIfTI scans: IMAGE .nii/.nii.gz, UNARY .nii/.nii.gz/.npy/.npz, "
                                        "-o .nii.gz/.nii/.npy)")
    volumes.add_argument("--spacing", type=spacing, metavar="DZ,DY,DX",
                         help="voxel size along the volume's axes (default: from the NIfTI header); theta_alpha "
                              "and theta_gamma are in its units")
    volumes.add_argument("--standardize", action="store_true",
                         help="map the scan's intensities to mean 128, standard deviation 64 before the CRF, so "
                              "that theta_beta has the meaning it has for 0..255 images")
    add_scale_options(refine)
    refine.set_defaults(func=run)
    return refine


def _check_inputs(unary, kind, image, upath, ipath, params, transform) -> None:
    """Warn (``cucrf: warning:`` lines) about likely mistakes in one image's inputs, before its CRF runs.

    The checks of :func:`cucrf.infer` (:func:`cucrf._diagnostics.check_inputs`), with the file they
    concern named; and an image beyond 8 bits, whose values the colour bandwidths do not fit.
    """
    from .._diagnostics import InputWarning, check_inputs
    from .._params import CRFParams

    params = params if params is not None else CRFParams()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        # A feature transform changes the units of the image: its checks would not apply.
        check_inputs(unary, image if transform is None else None, unary_kind=kind, params=params)
    for w in caught:
        if issubclass(w.category, InputWarning):
            text = str(w.message)  # "unary looks like ..." / "image is ...": name the file
            for what, path in (("unary", upath), ("image", ipath)):
                if text.startswith(what + " "):
                    text = f"{what} {path!r} {text[len(what) + 1:]}"
            warnings.warn(text, InputWarning, stacklevel=2)
        else:  # pragma: no cover - not expected from check_inputs
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if transform is None and image.dtype.kind in "ui" and params.appearance_weight != 0 and image.max() > 255:
        theta = params.theta_beta if isinstance(params.theta_beta, float) else tuple(params.theta_beta)
        warnings.warn(f"image {ipath!r} is {8 * image.dtype.itemsize}-bit ({image.dtype}, values up to "
                      f"{int(image.max())}), but theta_beta={theta} is a colour bandwidth for 8-bit values 0..255, so "
                      "nearly every colour difference switches the appearance kernel off; scale the image to 8 bits, "
                      "or theta_beta by 257 for 16-bit values (in --params)", InputWarning, stacklevel=2)


def _outputs(args):
    """The paths each image's results go to: ``{"labels": [...], "probabilities": [...], ...}``.

    Every list has one entry per image; None where that output was not asked for.
    """
    n = len(args.images)
    if args.output is not None:
        if len(args.output) != n:
            raise UsageError(f"got {n} image(s) but {len(args.output)} -o/--output path(s); give one "
                             "output per image or use --out-dir")
        outputs = [Path(o) for o in args.output]
    else:
        outputs = [Path(args.out_dir) / (output_stem(i) + ".png") for i in args.images]
    if len(set(outputs)) != len(outputs):
        dup = next(o for o in outputs if outputs.count(o) > 1)
        raise CLIError(f"two images would be written to the same file {str(dup)!r}; give -o paths "
                       "or images with different names")
    for o in outputs:
        if o.suffix.lower() != ".png":
            raise CLIError(f"output {str(o)!r} must be a .png file (the refined labels are written "
                           "as a PNG of class ids)")
    return {
        "labels": outputs,
        "probabilities": _extra_paths(args.save_probabilities, outputs, "--save-probabilities", ".npy",
                                      "the probabilities are saved as a NumPy array", ""),
        "overlay": _extra_paths(args.overlay, outputs, "--overlay", ".png", "the overlay is a PNG picture",
                                "_overlay"),
        "comparison": _extra_paths(args.comparison, outputs, "--comparison", ".png",
                                   "the comparison is a PNG picture", "_comparison"),
    }


#: Endings of image file names that say "this is the image" (``<id>_image.png`` pairs, Cityscapes'
#: ``<id>_leftImg8bit.png``); the label map of ``<id>_image.png`` is ``<id>.png``.
_IMAGE_TAGS = re.compile(r"[_-](image|img|rgb|leftImg8bit)$", re.IGNORECASE)


def output_stem(image_path) -> str:
    """The name of an image's outputs in --out-dir: its stem without an ``_image``-style ending.

    >>> output_stem("data/2007_000033_image.png"), output_stem("photo.jpg"), output_stem("_image.png")
    ('2007_000033', 'photo', '_image')
    """
    stem = Path(image_path).stem
    short = _IMAGE_TAGS.sub("", stem)
    return short or stem


def _is_folder(path: str) -> bool:
    """Whether an output path names a folder: an existing one, or one ending in a separator."""
    return Path(path).is_dir() or path.endswith(("/", os.sep))


def _extra_paths(given, outputs, option, suffix, why, tag):
    """The path of an optional output of each image (None when not asked for).

    Parameters
    ----------
    given : list of str or None
        The paths given to ``option``: None, the option is absent; empty, next to each output
        PNG as ``<stem><tag><suffix>``; one folder, every image's file inside it as
        ``<output stem><suffix>``; else one file per image (or folder), ending in ``suffix``,
        so that the file written is exactly the one reported.
    outputs : list of Path
        The label PNG of each image.
    option, suffix, why, tag : str
        The option's name, the suffix its files need and why, the tag of files next to outputs.
    """
    n = len(outputs)
    if given is None:
        return [None] * n
    if not given:
        return [o.with_name(o.stem + tag + suffix) for o in outputs]  # next to each PNG
    if len(given) == 1 and n > 1 and _is_folder(given[0]):
        given = given * n  # one folder for every image
    if len(given) != n:
        raise UsageError(f"got {n} image(s) but {len(given)} {option} path(s); give one {suffix} file "
                         f"per image, one folder for all, or no path to write next to each output PNG")
    paths = []
    for path, output in zip(given, outputs):
        if _is_folder(path):
            paths.append(Path(path) / (output.stem + suffix))
        elif Path(path).suffix.lower() != suffix:
            raise UsageError(f"{option} {path!r}: expected a {suffix} file ({why}) or a folder (an existing one, "
                             f"or a path ending in '/'); give a path ending in {suffix}")
        else:
            paths.append(Path(path))
    if len(set(paths)) != len(paths):
        dup = next(q for q in paths if paths.count(q) > 1)
        raise UsageError(f"{option}: two images would be written to the same file {str(dup)!r}; "
                         "give one path per image")
    return paths


def _check_distinct(outputs) -> None:
    """A :class:`UsageError` when two kinds of output of ``outputs`` (option, path) share a file."""
    from ._files import same_file

    for j, (option, path) in enumerate(outputs):
        for other, earlier in outputs[:j]:
            if other != option and same_file(path, earlier):
                raise UsageError(f"{option} {str(path)!r} is also the {other} path; give each output its own path")


def _check_class_count(num_classes, upath, kind, args, class_names) -> None:
    """Refuse, before the CRF runs, a class count that the outputs asked for cannot show."""
    what = f"label map {upath!r}" if kind == "labels" else f"unary {upath!r}"
    if kind == "labels" and args.num_classes is not None:
        what += f" (--num-classes {args.num_classes})"
    if num_classes > PNG_MAX_CLASSES:
        raise CLIError(f"{what} has {num_classes} classes, but a label PNG holds at most {PNG_MAX_CLASSES} class "
                       "ids (16 bits); expected at most 65536 classes")
    pictures = [option for option, asked in (("--overlay", args.overlay), ("--comparison", args.comparison))
                if asked is not None]
    if pictures and num_classes > COLOUR_MAX_CLASSES:
        raise CLIError(f"{what} has {num_classes} classes, but {' and '.join(pictures)} colour at most "
                       f"{COLOUR_MAX_CLASSES} classes (the VOC palette); leave {' and '.join(pictures)} out")
    if class_names is not None and len(class_names) < num_classes:
        raise CLIError(f"--class-names gives {len(class_names)} names but {what} has {num_classes} classes; "
                       f"expected one name per class")


def _before(unary, kind, unknown):
    """The labels before the CRF, for the comparison: the unary's argmax, or the label map (unknown as 255)."""
    if kind == "labels":
        return unary if unknown is None else np.where(unary == unknown, IGNORE, unary)
    return unary.argmax(axis=0)


def run(args) -> int:
    """Run ``cucrf refine``; return the exit status."""
    from tqdm import tqdm

    from .. import palette
    from .._diagnostics import InputWarning

    from ._volumes import is_volume_input, run_volumes

    volumes = [is_volume_input(i) for i in args.images]
    scale = [o for o, v in (("--tile", args.tile), ("--workers", args.workers), ("--scheduler", args.scheduler),
                            ("--resume", args.resume), ("--overwrite", args.overwrite)) if v]
    if any(volumes):
        if not all(volumes):
            raise UsageError("IMAGE files mix volumes (NIfTI) and pictures; refine one kind at a time")
        if scale:
            raise UsageError(f"{', '.join(scale)} are for pictures (large images or many images); leave them out "
                             "for volumes")
        return run_volumes(args)
    # Large images (tile by tile, cucrf/cli/_tiles.py) and many images on workers (cucrf/cli/_many.py).
    from ._many import make_client, run_many, wants_many
    from ._tiles import is_tiled, run_tiles

    if is_tiled(args):
        return run_tiles(args, make_client)
    if args.tile:
        raise UsageError("--tile is for large images: give -o OUT.zarr or -o OUT.tif")
    if wants_many(args):
        return run_many(args)
    for option, value in (("--spacing", args.spacing), ("--standardize", args.standardize or None)):
        if value is not None:
            raise UsageError(f"{option} is for volumes (NIfTI images); leave it out for pictures")
    n = len(args.images)
    if len(args.unary) != n:
        raise UsageError(f"got {n} image(s) but {len(args.unary)} --unary file(s); give one unary "
                         "per image, in the same order")
    paths = _outputs(args)
    inputs = [("image", i) for i in args.images] + [("unary", u) for u in args.unary]
    if args.params is not None and not args.params.lstrip().startswith("{"):  # else JSON text
        inputs.append(("--params file", args.params))
    if args.feature_transform is not None:
        inputs.append(("--feature-transform file", args.feature_transform))
    options = {"labels": "-o/--output" if args.output is not None else "--out-dir",
               "probabilities": "--save-probabilities", "overlay": "--overlay", "comparison": "--comparison"}
    every_output = [(options[key], path) for key, column in paths.items() for path in column if path is not None]
    check_output_paths(every_output, inputs)
    _check_distinct(every_output)
    # Check every input exists before spending time on the first image.
    for i, u in zip(args.images, args.unary):
        existing_file(i, "image")
        existing_file(u, "unary")
    params = load_params(args.params)
    transform = None
    if args.feature_transform is not None:
        transform = load_feature_transform(args.feature_transform)
    class_names = load_class_names(args.class_names)

    total = 0.0
    bar = tqdm(total=n, unit="image", disable=n <= 1 or args.no_progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for k, (ipath, upath) in enumerate(zip(args.images, args.unary)):
            image = read_image(ipath)
            unary, kind = load_unary(upath, args.unary_kind)
            check_unary_shape(unary, kind, image, upath, ipath)
            extra = {"unary_kind": kind}
            if transform is not None:
                check_transform_channels(transform, image.shape[2], f"--feature-transform {args.feature_transform!r}",
                                         f"image {ipath!r} has")
                extra["feature_transform"] = transform
            unknown = None
            if kind == "labels":
                unknown = None if args.unknown_label is None or args.unknown_label < 0 else args.unknown_label
                num_classes = num_classes_from_labels(unary, unknown, args.num_classes, f"label map {upath!r}")
                extra.update(num_classes=num_classes, confidence=args.confidence, unknown_label=unknown)
            else:
                num_classes = unary.shape[0]
                if args.num_classes is not None and num_classes != args.num_classes:
                    raise CLIError(f"unary {upath!r} has {num_classes} classes but --num-classes "
                                   f"is {args.num_classes}")
            _check_class_count(num_classes, upath, kind, args, class_names)
            _check_inputs(unary, kind, image, upath, ipath, params, transform)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InputWarning)  # said above, with the file's name
                    q, seconds = run_crf(unary, image, args, params, **extra)
            except (ValueError, TypeError) as exc:
                raise CLIError(f"{ipath}: {error_text(exc)}") from exc
            total += seconds
            refined = q.argmax(axis=0)
            written = []
            for key, column in paths.items():
                path = column[k]
                if path is None:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                if key == "labels":
                    write_label_png(path, refined, num_classes)
                    continue
                if key == "probabilities":
                    with open(path, "wb") as f:  # np.save(path) would append '.npy' to other spellings
                        np.save(f, q)
                elif key == "overlay":
                    write_rgb(path, palette.overlay(image_rgb(image), refined, alpha=0.5))
                else:
                    before = _before(unary, kind, unknown)
                    panels = [image_rgb(image), palette.color_labels(before), palette.color_labels(refined)]
                    entries = legend_entries([before, refined], class_names or [], special={IGNORE: "unknown"}
                                             if kind == "labels" and unknown is not None else None)
                    write_rgb(path, comparison_strip(panels, ["image", "before (unary)", "after (CRF)"], entries))
                written.append(f"{key} {path}")
            extra_text = "".join(f", {w}" for w in written)
            tqdm.write(f"{paths['labels'][k]}  ({image.shape[0]}x{image.shape[1]}, {num_classes} classes, "
                       f"{seconds:.3f} s{extra_text})", file=sys.stdout)
            bar.update(1)
    finally:
        bar.close()
    if n > 1:
        print(f"refined {n} images in {total:.2f} s of CRF time")
    return 0
