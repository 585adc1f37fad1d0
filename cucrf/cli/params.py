"""``cucrf params``: print the default CRF parameters (or those of a file, validated) as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._files import check_output_paths
from ._parser import add_debug


def add_parser(sub, parents=()) -> argparse.ArgumentParser:
    """Register ``params`` with the subparsers ``sub`` (it takes no CRF options)."""
    params = sub.add_parser("params", help="print the default CRF parameters as JSON",
                            description="Print CRF parameters as JSON: the defaults, or those of "
                                        "--params after validation. Edit the output and pass it "
                                        "back with --params.")
    params.add_argument("--params", metavar="JSON", help="validate and print this parameter file instead")
    params.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    add_debug(params)
    params.set_defaults(func=run)
    return params


def run(args) -> int:
    """Run ``cucrf params``; return the exit status."""
    from .._params import CRFParams

    if args.output:
        check_output_paths([("-o/--output", Path(args.output))], [])  # not under a file
    params = CRFParams() if args.params is None else CRFParams.from_json(args.params)
    if args.output:
        params.to_json(args.output)
        print(f"wrote {args.output}")
    else:
        print(params.to_json())
    return 0
