"""``cucrf refine`` on volumes: NIfTI scans in, NIfTI (or .npy) label volumes out."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ._crf import IGNORE, normalization, num_classes_from_labels
from ._errors import CLIError, UsageError, error_text
from ._files import check_output_paths, existing_file, load_params

#: Suffixes of label volumes refine writes.
VOLUME_OUTPUTS = (".nii.gz", ".nii", ".npy")


def is_volume_input(path) -> bool:
    """Whether an IMAGE argument is a volume (a NIfTI file)."""
    from ..medical import is_nifti

    return is_nifti(path)


def _stem(path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _outputs(args):
    n = len(args.images)
    if args.output is not None:
        if len(args.output) != n:
            raise UsageError(f"got {n} volume(s) but {len(args.output)} -o/--output path(s); give one output per "
                             "volume or use --out-dir")
        outputs = [Path(o) for o in args.output]
    else:
        outputs = [Path(args.out_dir) / (_stem(i) + "_labels.nii.gz") for i in args.images]
    for o in outputs:
        if not o.name.lower().endswith(VOLUME_OUTPUTS):
            raise CLIError(f"output {str(o)!r} must be a .nii.gz, .nii or .npy file (the refined labels of a volume "
                           "are a label volume)")
    if len(set(outputs)) != len(outputs):
        raise CLIError("two volumes would be written to the same file; give -o paths or volumes with different names")
    return outputs


def run_volumes(args) -> int:
    """Refine volumes: each IMAGE a NIfTI scan, each UNARY class scores or a label volume."""
    import time

    from .. import medical
    from .._api import infer

    unsupported = [option for option, value in (("--overlay", args.overlay), ("--comparison", args.comparison),
                                                ("--feature-transform", args.feature_transform))
                   if value is not None]
    if unsupported:
        raise UsageError(f"{', '.join(unsupported)}: not available for volumes (NIfTI images); leave it out")
    n = len(args.images)
    if len(args.unary) != n:
        raise UsageError(f"got {n} volume(s) but {len(args.unary)} --unary file(s); give one unary per volume, in "
                         "the same order")
    outputs = _outputs(args)
    probabilities = [None] * n
    if args.save_probabilities is not None:
        given = args.save_probabilities
        if not given:
            probabilities = [o.with_name(_stem(o) + "_probabilities.npy") for o in outputs]
        elif len(given) != n or not all(g.lower().endswith(".npy") for g in given):
            raise UsageError(f"--save-probabilities: give one .npy file per volume ({n}), or no path to write next "
                             "to each output")
        else:
            probabilities = [Path(g) for g in given]
    inputs = [("image", i) for i in args.images] + [("unary", u) for u in args.unary]
    named = [("-o/--output" if args.output is not None else "--out-dir", o) for o in outputs]
    named += [("--save-probabilities", p) for p in probabilities if p is not None]
    check_output_paths(named, inputs)
    for i, u in zip(args.images, args.unary):
        existing_file(i, "image")
        existing_file(u, "unary")
    params = load_params(args.params)
    for k, (ipath, upath) in enumerate(zip(args.images, args.unary)):
        try:
            scan = medical.read_image(ipath)
            kind = args.unary_kind or ("labels" if medical.is_label_volume(upath) else "logits")
            extra = {}
            if kind == "labels":
                unary = medical.read_labels(upath, like=scan)
                unknown = None if args.unknown_label is None or args.unknown_label < 0 else args.unknown_label
                num_classes = num_classes_from_labels(unary, unknown, args.num_classes, f"label volume {upath!r}")
                extra.update(num_classes=num_classes, confidence=args.confidence, unknown_label=unknown)
            else:
                unary = medical.read_unary(upath, like=scan)
                num_classes = unary.shape[0]
                if args.num_classes is not None and num_classes != args.num_classes:
                    raise CLIError(f"unary {upath!r} has {num_classes} classes but --num-classes is {args.num_classes}")
            if num_classes > 65536:
                raise CLIError(f"unary {upath!r} has {num_classes} classes; a label volume holds at most 65536")
            spacing = args.spacing if args.spacing is not None else scan.spacing
            image = medical.standardize(scan.array) if args.standardize else scan.array
            start = time.perf_counter()
            q = infer(unary, image, params, unary_kind=kind, spatial_dims=3, spacing=spacing,
                      filter_size=args.filter_size, blur=args.blur, iterations=args.iterations,
                      normalization=normalization(args.normalization), include_self=bool(args.include_self),
                      device=args.device, **extra)
            q = q.get() if hasattr(q, "get") and not isinstance(q, np.ndarray) else np.asarray(q)
            seconds = time.perf_counter() - start
        except (ValueError, TypeError, OSError) as exc:
            raise CLIError(f"{ipath}: {error_text(exc)}") from exc
        outputs[k].parent.mkdir(parents=True, exist_ok=True)
        medical.write_labels(outputs[k], q.argmax(axis=0), like=scan)
        saved = ""
        if probabilities[k] is not None:
            probabilities[k].parent.mkdir(parents=True, exist_ok=True)
            with open(probabilities[k], "wb") as f:
                np.save(f, q.astype(np.float32, copy=False))
            saved = f", probabilities {probabilities[k]}"
        shape = "x".join(map(str, scan.shape))
        spacing_text = ",".join(f"{v:g}" for v in spacing)
        print(f"{outputs[k]}  ({shape} voxels of {spacing_text}, {num_classes} classes, {seconds:.3f} s{saved})",
              file=sys.stdout)
    return 0


__all__ = ["run_volumes", "is_volume_input", "IGNORE"]
