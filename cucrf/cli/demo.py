"""``cucrf demo``: refine a noisy segmentation of a generated scene (or your own image + label)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from ._crf import IGNORE, num_classes_from_labels, run_crf
from ._errors import CLIError, UsageError
from ._files import check_output_paths, load_params, read_image, read_label, write_rgb
from ._pictures import COLOUR_MAX_CLASSES, comparison_strip, image_rgb, legend_entries, write_label_png
from ._parser import fraction, positive_int

#: What the demo writes into --out.
FILES = ("image.png", "truth.png", "noisy.png", "refined.png", "overlay.png", "comparison.png")

EPILOG = """\
The demo reproduces the paper's synthetic task: the ground-truth label is downsampled by 8,
20% of the low-resolution cells get a random class, and the result is upsampled again. The
CRF has to recover the object boundaries from the image alone.

examples:
  cucrf demo                                   # generated 240x320 scene, writes ./cucrf-demo/
  cucrf demo --out demo --filter-size 11 --per-class
  cucrf demo --image photo.jpg --label photo_label.png --out photo-demo
"""


def add_parser(sub, parents) -> argparse.ArgumentParser:
    """Register ``demo`` with the subparsers ``sub``; ``parents`` hold the CRF options."""
    demo = sub.add_parser(
        "demo", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="refine a noisy segmentation of a generated scene (or your own image + label)",
        description="Make a noisy segmentation from a ground-truth label (the paper's synthetic\n"
                    "unary), refine it with the CRF, print accuracy and mean IoU before and after,\n"
                    "and write image.png, truth.png, noisy.png, refined.png (label PNGs of class ids),\n"
                    "overlay.png and comparison.png (pictures in colour) to --out.",
        epilog=EPILOG,
    )
    demo.add_argument("--image", metavar="IMG", help="your own image (use with --label)")
    demo.add_argument("--label", metavar="LBL",
                      help="its ground truth: a PNG of class ids (grey or paletted), 255 = ignore")
    demo.add_argument("--num-classes", type=positive_int, metavar="C",
                      help="number of classes (default: largest class id in the label + 1)")
    demo.add_argument("--out", default="cucrf-demo", metavar="DIR",
                      help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the label noise (default: %(default)s)")
    demo.add_argument("--replace-prob", type=fraction, default=0.2, metavar="P",
                      help="fraction of low-resolution cells given a random class (default: %(default)s)")
    demo.add_argument("--downsample", type=positive_int, default=8, metavar="D",
                      help="downsampling factor of the noisy unary (default: %(default)s)")
    demo.add_argument("--per-class", action="store_true", help="also print the IoU of every class")
    demo.set_defaults(func=run)
    return demo


def run(args) -> int:
    """Run ``cucrf demo``; return the exit status."""
    from .. import palette
    from ..datasets import synthetic_unary
    from ..metrics import confusion_matrix, mean_iou, per_class_iou, pixel_accuracy

    if (args.image is None) != (args.label is None):
        raise UsageError("--image and --label must be given together (see 'cucrf demo --help')")
    out = Path(args.out)
    inputs = [("image", args.image), ("label", args.label)] if args.image is not None else []
    if args.params is not None and not args.params.lstrip().startswith("{"):  # else JSON text
        inputs.append(("--params file", args.params))
    check_output_paths([("--out", out)], [])  # a folder, not under a file
    check_output_paths([("--out", out / name) for name in FILES], inputs)
    params = load_params(args.params)  # read early: a bad file should fail before any work
    if args.image is None:
        from .._demo_scene import make_scene

        image, label, class_names = make_scene(seed=0)
        source = "generated scene"
    else:
        image, label = read_image(args.image), read_label(args.label)
        if image.shape[:2] != label.shape:
            raise CLIError(
                f"image {args.image!r} is {image.shape[0]}x{image.shape[1]} but label {args.label!r} "
                f"is {label.shape[0]}x{label.shape[1]} (H x W); they must be the same size"
            )
        if image.dtype != np.uint8:
            bits = f"{8 * image.dtype.itemsize}-bit" if image.dtype.kind in "ui" else "floating-point"
            raise CLIError(
                f"image {args.image!r} is {bits} ({image.dtype}, values up to {image.max()}), but the demo "
                "shows the image and its colour bandwidths are for 8-bit values 0..255; expected an 8-bit image: "
                "convert it to 8 bits first (or use 'cucrf refine' with --params for other ranges)"
            )
        class_names = None
        source = Path(args.image).name
    num_classes = num_classes_from_labels(label, IGNORE, args.num_classes, f"label {args.label!r}")
    if num_classes > COLOUR_MAX_CLASSES:
        given = f"--num-classes {args.num_classes}" if args.num_classes is not None else \
            f"label {args.label!r} holds class ids up to {num_classes - 1}"
        raise CLIError(f"{given}: {num_classes} classes, but the demo's pictures colour at most "
                       f"{COLOUR_MAX_CLASSES} classes; expected a label with class ids 0..255 (255 = ignore)")
    if class_names is None or len(class_names) != num_classes:
        class_names = [f"class {i}" for i in range(num_classes)]
    if args.num_classes is not None:
        bad = (label != IGNORE) & (label >= num_classes)
        if bad.any():
            raise CLIError(
                f"label {args.label!r} holds class id {int(label[bad].max())} but --num-classes is {num_classes}; "
                f"expected class ids in [0, {num_classes}) or {IGNORE} (ignore)"
            )

    unary = synthetic_unary(label, num_classes, downsample=args.downsample,
                            replace_prob=args.replace_prob, seed=args.seed)
    q, seconds = run_crf(unary, image, args, params)
    noisy, refined = unary.argmax(axis=0).astype(np.uint8), q.argmax(axis=0).astype(np.uint8)

    cm_before = confusion_matrix(noisy, label, num_classes, ignore_index=IGNORE)
    cm_after = confusion_matrix(refined, label, num_classes, ignore_index=IGNORE)
    acc = (pixel_accuracy(cm_before), pixel_accuracy(cm_after))
    miou = (mean_iou(cm_before), mean_iou(cm_after))

    h, w = label.shape
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

    # Make every picture before the folder: a failure leaves nothing behind.
    import imageio.v3 as iio

    rgb = image_rgb(image)
    panels = [rgb] + [palette.color_labels(x) for x in (label, noisy, refined)]
    captions = ["image", "ground truth", f"noisy, mIoU {miou[0]:.1%}", f"CRF, mIoU {miou[1]:.1%}"]
    entries = legend_entries([label, noisy, refined], class_names, special={IGNORE: "ignore"})
    overlay, comparison = palette.overlay(rgb, refined, alpha=0.5), comparison_strip(panels, captions, entries)
    out.mkdir(parents=True, exist_ok=True)
    write_rgb(out / "image.png", image)
    write_label_png(out / "truth.png", label, num_classes)
    write_label_png(out / "noisy.png", noisy, num_classes)
    write_label_png(out / "refined.png", refined, num_classes)
    iio.imwrite(out / "overlay.png", overlay)
    iio.imwrite(out / "comparison.png", comparison)
    print(f"wrote {' '.join(FILES)} to {out}{os.sep}")
    return 0
