"""``cucrf eval``: score CRFs on folders of labelled images (the paper's protocol), DenseCRF side by side."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from ._errors import CLIError, UsageError
from ._files import (check_output_paths, check_transform_channels, load_class_names, load_feature_transform,
                     load_params, load_split_arg, read_image)
from ._parser import add_debug, fraction, positive_int

EPILOG = """\
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

UNARIES: 'synthetic' (default) degrades each label as in the ConvCRF paper (downsample 8, 20% of
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

METHODS = "unary,cucrf,densecrf"
_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*")


def add_parser(sub, parents=()) -> argparse.ArgumentParser:
    """Register ``eval`` with the subparsers ``sub`` (it has its own CRF options: none but --iterations)."""
    evalp = sub.add_parser(
        "eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="score CRFs on folders of labelled images (the paper's protocol), DenseCRF side by side",
        description="Evaluate methods on folders of <id>_image.png / <id>_label.png pairs: pixel accuracy,\n"
                    "mean IoU (over classes in ground truth or prediction, and over classes in ground\n"
                    "truth), per-class IoU and seconds per image, accumulated over each set (label 255\n"
                    "ignored). Prints a table per set; --csv also writes one row per set and method.",
        epilog=EPILOG,
    )
    evalp.add_argument("--data", required=True, metavar="DIR",
                       help="a folder of pairs, or a folder of sets (subfolders such as voc/, msrc/, camvid/)")
    evalp.add_argument("--set", action="append", metavar="NAME",
                       help="subfolder(s) of --data to evaluate (repeat or comma-separate; default: --data itself "
                            "if it holds pairs, else voc, msrc, camvid where present)")
    evalp.add_argument("--methods", metavar="LIST",
                       help=f"comma-separated methods, see below (default: {METHODS}; densecrf left "
                            "out when pydensecrf is missing)")
    evalp.add_argument("--unaries", default="synthetic", metavar="NAME",
                       help="'synthetic' or the NAME of per-image unary files <id>_NAME.npz (default: %(default)s)")
    evalp.add_argument("--unary-dir", metavar="DIR", help="folder of the unary files (default: DIR/unaries)")
    evalp.add_argument("--num-classes", type=positive_int, metavar="C",
                       help="number of classes (default: 21 voc, 23 msrc, 11 camvid, else from the data)")
    evalp.add_argument("--seed", type=int, default=0, help="seed of the synthetic unaries (default: %(default)s)")
    evalp.add_argument("--downsample", type=positive_int, default=8, metavar="D",
                       help="synthetic unaries: downsampling factor (default: %(default)s)")
    evalp.add_argument("--replace-prob", type=fraction, default=0.2, metavar="P",
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
    evalp.add_argument("--max-images", type=positive_int, metavar="N", help="use the first N images of each set")
    evalp.add_argument("--csv", metavar="OUT.csv", help="also write the results as CSV")
    evalp.add_argument("--per-class", action="store_true", help="also print the IoU of every class")
    evalp.add_argument("--class-names", metavar="NAMES",
                       help="names of the classes for --per-class: voc, msrc, camvid, a comma-separated list, or a "
                            "text file with one name a line (default: the names of voc, msrc and camvid sets)")
    evalp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug(evalp)
    evalp.set_defaults(func=run)
    return evalp


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
                raise UsageError(f"{option} given twice without a NAME ({bare!r} and {value!r}); expected one "
                                 f"bare {option} FILE, and NAME=FILE for each further file")
            bare = value
            continue
        if not _NAME_PATTERN.fullmatch(name):
            raise UsageError(f"{option} {value!r}: NAME {name!r} must start with a letter or '_' and hold only "
                             "letters, digits and _.+-; expected NAME=FILE")
        if not item:
            raise UsageError(f"{option} {value!r}: no FILE after '='; expected NAME=FILE")
        if name in named:
            raise UsageError(f"{option} NAME {name!r} given twice ({named[name]!r} and {item!r}); expected one "
                             "file per NAME")
        named[name] = item
    return bare, named


def _parameters(args):
    """Bare params and transform, and ``{NAME: (params, transform)}`` of the named ones."""
    bare_params, named_params = _named_option(args.params, "--params")
    bare_transform, named_transforms = _named_option(args.feature_transform, "--feature-transform")
    for name, path in named_transforms.items():
        if name not in named_params:
            known = ", ".join(named_params) or "none"
            raise UsageError(f"--feature-transform {name}={path}: no --params named {name!r} (NAMEs given: "
                             f"{known}); expected the NAME of a --params NAME=FILE")
    params = load_params(bare_params)
    transform = None if bare_transform is None else load_feature_transform(bare_transform)
    named = {}
    for name, path in named_params.items():
        p = load_params(path, option=f"--params {name}=")
        t = None
        if name in named_transforms:
            t = load_feature_transform(named_transforms[name], option=f"--feature-transform {name}=")
        named[name] = (p, t)
    return params, transform, named, (bare_transform, named_transforms)


def _check_names(names, num_classes, where) -> None:
    if len(names) != num_classes:
        raise CLIError(f"--class-names gives {len(names)} names but {where}: {num_classes} classes; expected one "
                       "name per class")


def _names_of(result, given):
    """The class names of a set: those given, else the known names of its folder, else None."""
    from ..datasets import CLASS_NAMES

    if given is not None:
        return given
    known = CLASS_NAMES.get(result.name.lower())
    return known if known is not None and len(known) == result.num_classes else None


def _per_class_table(result, names) -> str:
    """The IoU of every class (rows, named when ``names`` is given) for every method (columns), in percent."""
    methods = list(result.scores.values())
    labels = [f"{c} {names[c]}" if names else f"{c}" for c in range(result.num_classes)]
    width = max([16] + [len(t) + 2 for t in labels])
    cols = [max(8, len(m.method) + 2) for m in methods]
    lines = [f"  {'IoU % per class':<{width}}" + "".join(f"{m.method:>{w}}" for m, w in zip(methods, cols))]
    ious = [m.per_class_iou for m in methods]
    for c, text in enumerate(labels):
        cells = "".join(f"{100 * v[c]:>{w}.1f}" if math.isfinite(v[c]) else f"{'-':>{w}}" for v, w in zip(ious, cols))
        lines.append(f"  {text:<{width}}{cells}")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    """Run ``cucrf eval``; return the exit status."""
    from .. import datasets, evaluation
    from .._peers import densecrf_available

    if args.subset is not None and args.split is None:
        raise UsageError(f"--subset {args.subset} needs --split FILE (the JSON that names each subset's ids)")
    if args.csv is not None:
        inputs = [("--params file", _split_name(v)[1]) for v in args.params or []]
        inputs += [("--feature-transform file", _split_name(v)[1]) for v in args.feature_transform or []]
        inputs += [("--split file", args.split)] if args.split is not None else []
        check_output_paths([("--csv", Path(args.csv))], [(w, f) for w, f in inputs if not f.lstrip().startswith("{")])
    params, transform, named, transform_files = _parameters(args)
    class_names = load_class_names(args.class_names)
    if class_names is not None and args.num_classes is not None:
        _check_names(class_names, args.num_classes, f"--num-classes is {args.num_classes}")
    try:
        methods = evaluation.parse_methods(args.methods or METHODS)
    except ValueError as exc:
        raise UsageError(f"--methods: {exc}") from exc
    if any(m.kind == "densecrf" for m in methods) and not densecrf_available():
        if args.methods is not None:
            raise CLIError("method densecrf needs pydensecrf (PyPI: pydensecrf2); install it with "
                           "scripts/install-densecrf.sh or leave densecrf out of --methods")
        methods = [m for m in methods if m.kind != "densecrf"]
        print("cucrf: note: pydensecrf is not installed; densecrf left out", file=sys.stderr)
    try:
        methods = evaluation.named_methods(methods, named)
    except ValueError as exc:
        raise UsageError(f"--params: {exc}") from exc
    sets = None
    if args.set:
        sets = [s.strip() for item in args.set for s in item.split(",") if s.strip()]
    try:
        folders = evaluation.find_sets(args.data, sets)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from exc

    names = None
    if args.split is not None:
        if len(folders) != 1:
            raise UsageError(f"--split names the images of one set, but {len(folders)} sets would be evaluated "
                             f"({', '.join(f.name for f in folders)}); choose one with --set")
        subset = args.subset or "test"
        names = load_split_arg(args.split, folders[0])[subset]
        if not names:
            raise CLIError(f"--split {args.split!r} names no {subset!r} images; expected a non-empty list of ids "
                           f"under {subset!r} for --subset {subset}")
        print(f"scoring the {len(names)} '{subset}' images of {args.split}")

    # Feature transforms must fit the images: check each against the first image of each set.
    checks = [(f"--feature-transform {transform_files[0]!r}", transform)] if transform is not None else []
    checks += [(f"--feature-transform {n}={transform_files[1][n]}", t) for n, (_, t) in named.items() if t is not None]
    if checks:
        for folder in folders:
            first = (names or datasets.PairDataset(folder).names)[0]
            image = read_image(str(folder / f"{first}_image.png"))
            for option, t in checks:
                check_transform_channels(t, image.shape[2], option, f"the images of set {folder.name!r} have")
    try:
        results = evaluation.evaluate(
            args.data, sets, methods, unaries=args.unaries, unary_dir=args.unary_dir, num_classes=args.num_classes,
            max_images=args.max_images, seed=args.seed, downsample=args.downsample, replace_prob=args.replace_prob,
            params=params, iterations=args.iterations, progress=not args.no_progress, names=names,
            feature_transform=transform, include_self=args.include_self,
        )
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from exc
    if class_names is not None:
        for r in results:
            _check_names(class_names, r.num_classes, f"set {r.name!r} has {r.num_classes} classes")
    for k, r in enumerate(results):
        if k:
            print()
        print(evaluation.format_table([r]), end="")
        if args.per_class:
            print(_per_class_table(r, _names_of(r, class_names)), end="")
    if args.csv:
        evaluation.write_csv(results, args.csv)
        print(f"wrote {args.csv}")
    return 0
