"""The pieces of the ``cucrf`` argument parser that the commands share: option types and CRF options."""

from __future__ import annotations

import argparse

from ._errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are a :class:`UsageError` (one line, exit status 2)."""

    # argparse prints the whole usage block and exits; we want one line and a return value.
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def class_count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of classes (an integer >= 2), got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a number of classes >= 2, got {value}")
    return value


def val_fraction(text):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in [0, 1), got {value}")
    return value


def patience(text):
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'none', got {value}")
    return value


def int_per_axis(text):
    """An int, or comma-separated ints, one per spatial axis (``1,4,4`` for thick slices)."""
    parts = [t.strip() for t in text.split(",")]
    try:
        values = [int(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers (one per axis, e.g. "
                                         f"1,4,4), got {text!r}") from None
    return values[0] if len(values) == 1 else tuple(values)


def spacing(text):
    """Comma-separated positive numbers, one per spatial axis."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (e.g. 3,1,1), got {text!r}") from None
    if not all(v > 0 and v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def label_or_none(text):
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer class id or 'none', got {text!r}") from None


def add_debug(parser) -> None:
    """``--debug`` after the command too (the top-level parser has its own)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")


def crf_options() -> argparse.ArgumentParser:
    """A parent parser with the CRF options of demo, refine and fit."""
    from .._api import DEFAULT_BLUR, DEFAULT_FILTER_SIZE, DEFAULT_ITERATIONS

    p = ArgumentParser(add_help=False)
    g = p.add_argument_group("CRF options")
    g.add_argument("--filter-size", type=int_per_axis, default=DEFAULT_FILTER_SIZE, metavar="K",
                   help="odd width of the message-passing window, in coarse cells, or one per axis "
                        "(e.g. 3,5,5) (default: %(default)s)")
    g.add_argument("--blur", type=int_per_axis, default=DEFAULT_BLUR, metavar="B",
                   help="messages are computed on a B times coarser grid; the window spans K*B pixels; one "
                        "value per axis for thick slices (e.g. 1,4,4) (default: %(default)s)")
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
    add_debug(g)
    return p
