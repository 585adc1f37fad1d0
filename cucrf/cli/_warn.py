"""Warnings while a command runs, shown as ``cucrf: warning: ...`` lines on stderr.

The input checks that :func:`cucrf.infer` and the command line share
(:func:`cucrf._diagnostics.check_inputs`) report likely mistakes as :class:`cucrf.InputWarning`;
:func:`warnings_as_lines` shows each on one line, in the command line's words, once per kind (a
folder of images with the same mistake gives one line, not one per image).
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings

from ._errors import one_line

#: Python arguments named in the library's messages, and the options that set them here.
_OPTION_WORDING = [(re.compile(r"unary_kind='(\w+)'"), r"--unary-kind \1")]


def cli_wording(text: str) -> str:
    """``text`` with the library's argument names replaced by this command line's options."""
    for pattern, option in _OPTION_WORDING:
        text = pattern.sub(option, text)
    return text


def _kind(text: str) -> str:
    """The message without its numbers and quoted names: warnings that differ only there are one kind."""
    return re.sub(r"'[^']*'|[-+]?\d+(\.\d+)?(e[-+]?\d+)?", "#", text)


@contextlib.contextmanager
def warnings_as_lines():
    """Within the block, show :class:`cucrf.InputWarning` as ``cucrf: warning: ...`` lines on stderr, each kind once."""
    from .._diagnostics import InputWarning

    seen = set()
    python_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, InputWarning):  # other warnings as Python shows them
            python_show(message, category, filename, lineno, file, line)
            return
        text = cli_wording(one_line(message))
        if _kind(text) in seen:
            return
        seen.add(_kind(text))
        from tqdm import tqdm

        tqdm.write(f"cucrf: warning: {text}", file=sys.stderr)  # between progress bars

    with warnings.catch_warnings():
        warnings.simplefilter("always", InputWarning)  # every one reaches show(), which says each kind once
        warnings.showwarning = show
        yield
