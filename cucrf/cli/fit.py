"""``cucrf fit``: learn CRF parameters from labelled images."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from ._crf import normalization
from ._errors import CLIError, UsageError
from ._files import check_output_paths, load_params, load_split_arg
from ._parser import class_count, non_negative_int, patience, positive_int, val_fraction

EPILOG = """\
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

#: What fit may write into -o/--out.
FILES = ("params.json", "feature_transform.json", "history.json", "training_curve.png")

#: Selection metrics: (name in messages, short name in plots, a percentage?).
METRICS = {"accuracy": ("validation pixel accuracy", "pixel accuracy", True),
           "miou": ("validation mIoU", "mIoU", True),
           "miou_gt": ("validation mIoU over the classes in the ground truth", "mIoU (ground-truth classes)", True),
           "loss": ("validation loss", "loss", False)}


def learn_list(text):
    """The ``--learn`` option: a list of learnable parameter groups."""
    from .._fit import LEARNABLE

    names = [t.strip() for t in text.split(",") if t.strip()]
    if "all" in names:
        return list(LEARNABLE)
    bad = [n for n in names if n not in LEARNABLE]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(LEARNABLE)} (or 'all'), "
                                         f"got {text!r}")
    return names


def fit_defaults() -> dict:
    """:func:`cucrf.fit`'s defaults, which ``cucrf fit`` shares."""
    import inspect

    from .. import _fit

    return {name: p.default for name, p in inspect.signature(_fit.fit).parameters.items()
            if p.default is not inspect.Parameter.empty}


def add_parser(sub, parents) -> argparse.ArgumentParser:
    """Register ``fit`` with the subparsers ``sub``; ``parents`` hold the CRF options."""
    fitp = sub.add_parser(
        "fit", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="learn CRF parameters from labelled images",
        description="Learn the CRF parameters (kernel weights, bandwidths, compatibility, unary weight,\n"
                    "feature transform) by back-propagation through mean-field inference, with Adam.\n"
                    "--params gives the starting parameters.",
        epilog=EPILOG,
    )
    fitp.add_argument("folder", metavar="FOLDER", help="folder of <id>_image.png / <id>_label.png pairs")
    fitp.add_argument("--unary-dir", metavar="DIR", help="folder of per-image unaries (logits)")
    fitp.add_argument("--unary-pattern", default="{name}.npz", metavar="PATTERN",
                      help="file name of an image's unary in --unary-dir; {name} is the id (default: %(default)s)")
    fitp.add_argument("--synthetic", action="store_true",
                      help="make the unaries from the labels (the paper's synthetic protocol)")
    fitp.add_argument("--num-classes", type=class_count, metavar="C",
                      help="number of classes: required with --synthetic; with --unary-dir checked against the "
                           "unaries (default: theirs). Every label must hold ids < C (or 255)")
    fitp.add_argument("--split", metavar="FILE",
                      help='JSON {"train": [ids], "validation": [ids], "test": [ids]}: fit on train, validate on '
                           "validation, never read test (default: every pair of FOLDER trains)")
    defaults = fit_defaults()
    fitp.add_argument("--val-fraction", type=val_fraction, default=None, metavar="F",
                      help="without validation images from --split: the fraction of the training images held out "
                           f"for validation, in [0, 1), or 'auto' (default: {defaults['val_fraction']})")
    fitp.add_argument("--metric", choices=["miou", "miou_gt", "accuracy", "loss"], default=defaults["metric"],
                      help="validation score that selects the best epoch: mIoU (classes in ground truth or "
                           "prediction), mIoU over the classes in the ground truth, pixel accuracy, or loss "
                           "(default: %(default)s)")
    fitp.add_argument("--patience", type=patience, default=defaults["patience"], metavar="N",
                      help="stop after N epochs in a row without a new best; 'none' never stops early "
                           "(default: %(default)s)")
    fitp.add_argument("--epochs", type=int, default=defaults["epochs"], metavar="N",
                      help="at most N training epochs (default: %(default)s)")
    fitp.add_argument("--lr", type=float, default=defaults["lr"], help="Adam learning rate (default: %(default)s)")
    fitp.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"], metavar="N",
                      help="images per step; only equal-size images are batched (default: %(default)s)")
    fitp.add_argument("--learn", type=learn_list, default=list(defaults["learn"]),
                      metavar="LIST", help="comma-separated: weights, bandwidths, compatibility, unary_weight, "
                                           "feature_transform, or all (default: "
                                           f"{','.join(defaults['learn'])})")
    fitp.add_argument("--seed", type=non_negative_int, default=defaults["seed"],
                      help="seed of the validation hold-out and the image order (default: %(default)s)")
    fitp.add_argument("--max-images", type=positive_int, metavar="N", help="use only the first N pairs")
    fitp.add_argument("--checkpoint", metavar="FILE.npz", help="write a checkpoint after every epoch")
    fitp.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    fitp.add_argument("--no-progress", action="store_true",
                      help="no progress bars (each epoch's summary is still logged on stderr)")
    fitp.add_argument("-o", "--out", default="cucrf-fit", metavar="DIR",
                      help="output folder (default: %(default)s)")
    fitp.set_defaults(func=run)
    return fitp


def json_ready(value):
    """``value`` with NaN / infinities as None and NumPy scalars as Python numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def metric_series(history, metric):
    """Per-epoch values of the selection metric (None where unknown)."""
    key = "val_loss" if metric == "loss" else f"val_{metric}"
    values = [h.get(key) for h in history]
    if all(v is None for v in values):  # no validation set: whatever fit selected on
        values = [h.get("score") for h in history]
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def training_curve_figure(history, metric, best_epoch):
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

    _, short, percent = METRICS.get(metric, (metric, metric, False))
    series = [np.nan if v is None else (100 * v if percent else v) for v in metric_series(history, metric)]
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


def plot_history(history, path, metric="miou", best_epoch=0) -> bool:
    """Write the training curve to ``path``; False (and nothing written) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except Exception:  # the plot is optional (the 'plot' extra)
        return False
    import matplotlib.pyplot as plt

    fig = training_curve_figure(history, metric, best_epoch)
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
    return f"{value:.2%}" if METRICS.get(metric, ("", "", False))[2] else f"{value:.4f}"


def _fit_data(args):
    """The training and validation PairDatasets and the number of classes, all checked."""
    from .. import datasets

    folder = Path(args.folder)
    try:
        data = datasets.PairDataset(folder, unary_dir=args.unary_dir, unary_pattern=args.unary_pattern,
                                    synthetic=args.synthetic, num_classes=args.num_classes if args.synthetic else None)
        validation = None
        if args.split is not None:
            split = load_split_arg(args.split, folder)
            if not split["train"]:
                raise CLIError(f"--split {args.split!r} names no 'train' ids; expected a non-empty list of the "
                               "images to fit on")
            if split["validation"] and args.val_fraction is not None:
                raise UsageError(f"--split {args.split!r} names validation images, so --val-fraction "
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
        raise CLIError(str(exc)) from exc
    return train, validation, num_classes


def run(args) -> int:
    """Run ``cucrf fit``; return the exit status."""
    from .. import _fit

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CLIError(f"training folder {args.folder!r} does not exist or is not a directory")
    if args.synthetic == (args.unary_dir is not None):
        raise UsageError("give either --unary-dir or --synthetic (see 'cucrf fit --help')")
    if args.synthetic and args.num_classes is None:
        raise UsageError("--synthetic needs --num-classes C: the labels alone do not fix the number of classes "
                         "(e.g. 21 for PASCAL VOC, 23 for MSRC, 11 for CamVid)")
    if args.resume and args.checkpoint is None:
        raise UsageError("--resume needs --checkpoint FILE.npz (the checkpoint to continue from)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"-o/--out {args.out!r} is a file; expected a folder to write params.json, history.json "
                         "and the training curve into")
    out = Path(args.out)
    inputs = [(what, path) for what, path in (("--params file", args.params), ("--split file", args.split))
              if path is not None and not path.lstrip().startswith("{")]
    check_output_paths([("-o/--out", out)], [])  # a folder, not under a file
    outputs = [("-o/--out", out / name) for name in FILES]
    if args.checkpoint is not None:
        outputs.append(("--checkpoint", Path(args.checkpoint)))
    check_output_paths(outputs, inputs)
    params = load_params(args.params)  # read early: a bad file should fail before any work
    train, validation, num_classes = _fit_data(args)

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
        normalization=normalization(args.normalization), device=args.device, seed=args.seed,
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
        data = json_ready(result.feature_transform.to_dict())
        (out / "feature_transform.json").write_text(json.dumps(data, indent=2) + "\n")
        written.append("feature_transform.json")
    (out / "history.json").write_text(json.dumps(json_ready(result.history), indent=2) + "\n")
    written.append("history.json")
    if plot_history(result.history, out / "training_curve.png", metric, result.best_epoch):
        written.append("training_curve.png")

    series = metric_series(result.history, metric)
    epochs = [h["epoch"] for h in result.history]
    start = series[0] if series else None
    best = series[epochs.index(result.best_epoch)] if result.best_epoch in epochs else None
    title = METRICS.get(metric, (metric,))[0]
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
