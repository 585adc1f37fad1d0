"""The ``cucrf`` command line: ``cucrf demo``, ``cucrf refine``, ``cucrf fit``, ``cucrf eval`` and ``cucrf params``.

Run ``cucrf --help`` or ``cucrf COMMAND --help`` for the options (docs/cli.md describes them all).
Every error is reported as a single ``cucrf: error: ...`` line on stderr with a non-zero exit
status (2 for a bad command line, 1 for everything else); ``--debug`` shows the full traceback
instead.

One module per command (:mod:`.demo`, :mod:`.refine`, :mod:`.fit`, :mod:`.eval`,
:mod:`.params`), each with ``add_parser(subparsers, parents)`` and ``run(args)``; the helpers they
share read files (:mod:`._files`), run the CRF (:mod:`._crf`), define the errors
(:mod:`._errors`) and the option types (:mod:`._parser`).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import demo, fit, params, refine
from . import eval as eval_command
from ._errors import UsageError, error_text, one_line
from ._parser import ArgumentParser, crf_options
from ._warn import warnings_as_lines

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
Convolutional CRFs (Teichmann & Cipolla, 2018): refine a segmentation so that its labels follow
the edges of the image. Start with 'cucrf demo'; 'cucrf COMMAND --help' shows each command's
options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cucrf`` command."""
    from .. import __version__

    parser = ArgumentParser(prog="cucrf", description=_DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cucrf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    crf = [crf_options()]
    for command in (demo, refine, fit):
        command.add_parser(sub, crf)
    for command in (eval_command, params):  # no CRF options of their own
        command.add_parser(sub)
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
        Exit status: 0 on success, 1 on an error, 2 on a bad command line, 130 when
        interrupted, 141 when the reader of the output went away (``cucrf params | head -1``).
    """
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here when the output was buffered
        return status
    except BrokenPipeError:
        # The reader went away: stop quietly, as command-line tools do, and keep Python from
        # reporting the same error again when it flushes stdout at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no real file (e.g. captured): nothing to flush
            pass
        return 141  # 128 + SIGPIPE, the status shells expect of a command that lost its reader


def _run(argv) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"cucrf: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        print("cucrf: error: missing COMMAND: one of demo, refine, fit, eval, params (see 'cucrf --help')",
              file=sys.stderr)
        return 2
    try:
        with warnings_as_lines():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cucrf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:  # one line, no traceback, unless --debug
        if args.debug:
            raise
        print(f"cucrf: error: {error_text(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
