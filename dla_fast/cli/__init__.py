"""Command line of dla_fast: `python -m dla_fast bench | cost | info` (also installed as `dla-fast`).

- `bench`: latency, throughput and peak memory of a DLA model (inference or a training step).
- `cost`:  predicted kernels, bytes, FLOPs and time of one step on an H100 (a CPU cost model).
- `info`:  versions, GPU, the backends usable here and the one in force.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


class UsageError(Exception):
    """A bad command-line value: printed as one clear message, without a traceback, exit status 2."""


def one_line(message: str) -> str:
    """A possibly multi-line message on one line: the first line, then the others joined by '; '."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])] if len(lines) > 1 else lines)


def _program_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m dla_fast" if name in ("", "__main__.py", "-c") else name


def build_parser() -> argparse.ArgumentParser:
    """The parser with one sub-command per module of dla_fast.cli."""
    from . import bench, cost, info  # they import UsageError from here

    parser = argparse.ArgumentParser(prog=_program_name(), description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (bench, cost, info):
        summary = module.__doc__.splitlines()[0]
        sub = commands.add_parser(module.__name__.rsplit(".", 1)[-1], help=summary, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run the command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as e:
        print(f"{parser.prog} {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130
