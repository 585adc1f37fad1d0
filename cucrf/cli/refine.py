"""``cucrf refine``: refine the class scores or label maps of your own images."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from ._crf import IGNORE, num_classes_from_labels, run_crf
from ._errors import CLIError, UsageError, error_text
from ._files import (check_output_paths, check_transform_channels, check_unary_shape, existing_file,
                     load_feature_transform, load_params, load_unary, read_image)
from ._parser import label_or_none, positive_int

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
The refined labels are written as paletted PNGs (pixel values are class ids, viewers show
colours). Several images show a progress bar. An output path that names one of the input files
is refused before any work.

examples:
  cucrf refine photo.jpg --unary logits.npy -o refined.png
  cucrf refine photo.jpg --unary coarse_label.png --confidence 0.7 -o refined.png
  cucrf refine img/*.jpg --unary logits/*.npz --out-dir refined --save-probabilities
  cucrf params > params.json   # edit, then: cucrf refine ... --params params.json
"""


def add_parser(sub, parents) -> argparse.ArgumentParser:
    """Register ``refine`` with the subparsers ``sub``; ``parents`` hold the CRF options."""
    refine = sub.add_parser(
        "refine", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="refine the class scores or label maps of your own images",
        description="Refine per-pixel class scores (or a coarse label map) of one or more images\n"
                    "with the CRF and write the refined labels as paletted PNGs.",
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
                       help="write each result to DIR/<image name>.png")
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
    refine.set_defaults(func=run)
    return refine


def _looks_like_probabilities(unary) -> bool:
    if not np.issubdtype(unary.dtype, np.floating) or unary.size == 0:
        return False
    if unary.min() < 0 or unary.max() > 1:
        return False
    return bool(np.allclose(unary.sum(axis=0, dtype=np.float64), 1.0, atol=1e-3))


def _outputs(args):
    """Output PNG paths and probability paths (or None), one per image."""
    n = len(args.images)
    if args.output is not None:
        if len(args.output) != n:
            raise UsageError(f"got {n} image(s) but {len(args.output)} -o/--output path(s); give one "
                             "output per image or use --out-dir")
        outputs = [Path(o) for o in args.output]
    else:
        outputs = [Path(args.out_dir) / (Path(i).stem + ".png") for i in args.images]
    if len(set(outputs)) != len(outputs):
        dup = next(o for o in outputs if outputs.count(o) > 1)
        raise CLIError(f"two images would be written to the same file {str(dup)!r}; give -o paths "
                       "or images with different names")
    for o in outputs:
        if o.suffix.lower() != ".png":
            raise CLIError(f"output {str(o)!r} must be a .png file (the refined labels are written "
                           "as a paletted PNG)")
    return outputs, _probability_paths(args.save_probabilities, outputs)


def _is_folder(path: str) -> bool:
    """Whether a --save-probabilities path names a folder: an existing one, or one ending in a separator."""
    return Path(path).is_dir() or path.endswith(("/", os.sep))


def _probability_paths(given, outputs):
    """The .npy path of each image's probabilities (None when not saved).

    ``given`` is the list of --save-probabilities paths (None: not saved; empty: next to each
    output PNG). A folder receives ``<output PNG stem>.npy``; a file must end in .npy, so that
    the file written is exactly the one reported.
    """
    n = len(outputs)
    if given is None:
        return [None] * n
    if not given:
        return [o.with_suffix(".npy") for o in outputs]  # next to each PNG
    if len(given) == 1 and n > 1 and _is_folder(given[0]):
        given = given * n  # one folder for every image
    if len(given) != n:
        raise UsageError(f"got {n} image(s) but {len(given)} --save-probabilities path(s); give one .npy file "
                         "per image, one folder for all, or no path to save next to each output PNG")
    probs = []
    for path, output in zip(given, outputs):
        if _is_folder(path):
            probs.append(Path(path) / (output.stem + ".npy"))
        elif Path(path).suffix.lower() != ".npy":
            raise UsageError(f"--save-probabilities {path!r}: expected a .npy file (the probabilities are "
                             "saved as a NumPy array) or a folder (an existing one, or a path ending in '/'); "
                             "give a path ending in .npy")
        else:
            probs.append(Path(path))
    if len(set(probs)) != len(probs):
        dup = next(q for q in probs if probs.count(q) > 1)
        raise UsageError(f"--save-probabilities: two images would be written to the same file {str(dup)!r}; "
                         "give one path per image")
    return probs


def run(args) -> int:
    """Run ``cucrf refine``; return the exit status."""
    from tqdm import tqdm

    from .. import palette

    n = len(args.images)
    if len(args.unary) != n:
        raise UsageError(f"got {n} image(s) but {len(args.unary)} --unary file(s); give one unary "
                         "per image, in the same order")
    outputs, prob_paths = _outputs(args)
    inputs = [("image", i) for i in args.images] + [("unary", u) for u in args.unary]
    if args.params is not None and not args.params.lstrip().startswith("{"):  # else JSON text
        inputs.append(("--params file", args.params))
    if args.feature_transform is not None:
        inputs.append(("--feature-transform file", args.feature_transform))
    out_option = "-o/--output" if args.output is not None else "--out-dir"
    check_output_paths([(out_option, o) for o in outputs]
                       + [("--save-probabilities", p) for p in prob_paths if p is not None], inputs)
    # Check every input exists before spending time on the first image.
    for i, u in zip(args.images, args.unary):
        existing_file(i, "image")
        existing_file(u, "unary")
    params = load_params(args.params)
    transform = None
    if args.feature_transform is not None:
        transform = load_feature_transform(args.feature_transform)

    total = 0.0
    bar = tqdm(total=n, unit="image", disable=n <= 1, file=sys.stderr, dynamic_ncols=True)
    try:
        for ipath, upath, opath, ppath in zip(args.images, args.unary, outputs, prob_paths):
            image = read_image(ipath)
            unary, kind = load_unary(upath, args.unary_kind)
            check_unary_shape(unary, kind, image, upath, ipath)
            extra = {"unary_kind": kind}
            if transform is not None:
                check_transform_channels(transform, image.shape[2], f"--feature-transform {args.feature_transform!r}",
                                         f"image {ipath!r} has")
                extra["feature_transform"] = transform
            if kind == "labels":
                unknown = None if args.unknown_label is None or args.unknown_label < 0 else args.unknown_label
                extra.update(
                    num_classes=num_classes_from_labels(unary, unknown, args.num_classes, f"label map {upath!r}"),
                    confidence=args.confidence, unknown_label=unknown,
                )
            else:
                if args.num_classes is not None and unary.shape[0] != args.num_classes:
                    raise CLIError(f"unary {upath!r} has {unary.shape[0]} classes but --num-classes "
                                   f"is {args.num_classes}")
                if kind == "logits" and _looks_like_probabilities(unary):
                    tqdm.write(f"cucrf: note: {upath} looks like probabilities (values in [0, 1] summing "
                               "to 1); if so, pass --unary-kind probabilities", file=sys.stderr)
            try:
                q, seconds = run_crf(unary, image, args, params, **extra)
            except (ValueError, TypeError) as exc:
                raise CLIError(f"{ipath}: {error_text(exc)}") from exc
            total += seconds
            opath.parent.mkdir(parents=True, exist_ok=True)
            palette.save_label_png(opath, q.argmax(axis=0).astype(np.uint8 if q.shape[0] <= 256 else np.int64))
            if ppath is not None:
                ppath.parent.mkdir(parents=True, exist_ok=True)
                with open(ppath, "wb") as f:  # np.save(path) would append '.npy' to other spellings
                    np.save(f, q)
            extra_text = f", probabilities {ppath}" if ppath is not None else ""
            tqdm.write(f"{opath}  ({image.shape[0]}x{image.shape[1]}, {q.shape[0]} classes, "
                       f"{seconds:.3f} s{extra_text})", file=sys.stdout)
            bar.update(1)
    finally:
        bar.close()
    if n > 1:
        print(f"refined {n} images in {total:.2f} s of CRF time")
    return 0
