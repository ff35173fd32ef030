"""The `cunet-optimize` command: parses, calls a stage, prints what it wrote.

Each subcommand lives in cunet_optimize/commands/<name>.py and registers itself
with `add_parser(subparsers)`; a subcommand is listed here only once it works.
User errors (CUNetError) print one line and exit 2; tracebacks only with --verbose.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cunet_optimize import __version__
from cunet_optimize.errors import CUNetError

EXIT_USER_ERROR = 2

# Order = order in `--help`: the pipeline, front to back.
COMMANDS = [
    "models", "data", "train", "eval", "predict",  # models, data, accuracy
    "calibrate", "qat", "export", "surgery", "lint",  # the stages, one by one
    "targets", "build", "profile", "report",  # the pipeline and its measurement
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cunet-optimize",
        description="Quantize, export, optimise and profile CU-Net landmark networks "
        "for TensorRT (datacenter GPUs, Jetson) and ONNX Runtime (CPU).",
    )
    parser.add_argument("--version", action="version", version=f"cunet-optimize {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cunet_optimize.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except CUNetError as e:
        if args.verbose:
            raise
        print(f"cunet-optimize {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"cunet-optimize {args.command}: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
