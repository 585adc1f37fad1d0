"""Errors of the ``cucrf`` command line and their one-line messages."""

from __future__ import annotations

import re

__all__ = ["UsageError", "CLIError", "one_line", "error_text"]


class UsageError(Exception):
    """A bad command line (argparse error), reported in one line with exit status 2."""


class CLIError(Exception):
    """An error the command line detected itself (bad file, mismatched sizes, ...)."""


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) replaced by one space."""
    return re.sub(r"\s+", " ", str(text)).strip()


def error_text(exc: BaseException) -> str:
    """The one-line message of an exception, as ``cucrf: error:`` shows it."""
    if isinstance(exc, (CLIError, UsageError, ValueError, TypeError, RuntimeError)):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or exc}: {exc.filename}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return one_line(text) or type(exc).__name__
