"""The `cunet-optimize` command: parses, calls a stage, prints what it wrote.

Each subcommand lives in cunet_optimize/commands/<name>.py and registers itself
with `add_parser(subparsers)`; a subcommand is listed here only once it works.
User errors (CUNetError) print one line and exit 2; tracebacks only with --verbose.
Command-line errors too: the error line, then a pointer to --help (CommandLineParser).
So do a full disk or a read-only folder met mid-run (output folders are checked before
any work), and a closed stdout (`... --json | head`) ends quietly with status 141, as
for any Unix tool killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import sys
from typing import NoReturn

from cunet_optimize import __version__
from cunet_optimize.errors import CUNetError

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE
# OS errors a user fixes outside the program (space, permissions), not bugs
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}

# Commands that run as one job over many processes under torchrun / srun (docs/DISTRIBUTED.md);
# the others refuse a multi-process launch rather than run N times over the same files.
DISTRIBUTED_COMMANDS = ("train", "qat", "eval", "build")
# Of those, the commands rank 0 runs alone while the other ranks serve its requests
# (distributed.on_every_rank: the build's calibration and accuracy stages) and write nothing.
LED_BY_RANK_0 = ("build",)

# Order = order in `--help`: the pipeline, front to back.
COMMANDS = [
    "models", "data", "train", "eval", "predict",  # models, data, accuracy
    "calibrate", "qat", "export", "surgery", "lint",  # the stages, one by one
    "targets", "build", "serve", "profile", "report",  # the pipeline, serving it, its measurement
]


def requested_command(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is not an option: no global
    option takes a value), or None."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def usage_error(prog: str, message: str) -> NoReturn:
    """A refusal of the command line, printed like every other refusal: the error line first
    (`cunet-optimize <cmd>: error: ...`), then where the usage is, not 20 lines of usage
    above the one that matters. Exit 2, as argparse."""
    sys.stderr.write(f"{prog}: error: {message}\nsee '{prog} --help'\n")
    sys.exit(EXIT_USER_ERROR)


class CommandLineParser(argparse.ArgumentParser):
    """argparse with `usage_error`'s refusals; the subcommands' parsers are of this class too
    (add_subparsers makes its parsers of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        usage_error(self.prog, message)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with `command` alone: each subcommand's module
    imports what its stage needs (torch for most), and `report`, which only turns JSON into
    HTML, should start without it."""
    parser = CommandLineParser(
        prog="cunet-optimize",
        description="Quantize, export, optimise and profile CU-Net landmark networks "
        "for TensorRT (datacenter GPUs, Jetson) and ONNX Runtime (CPU).",
    )
    parser.add_argument("--version", action="version", version=f"cunet-optimize {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [command] if command else COMMANDS:
        importlib.import_module(f"cunet_optimize.commands.{name}").add_parser(subparsers)
    return parser


def output_locations(args) -> list[tuple[str, str]]:
    """(flag, path) of where this command will write, to check before any work."""
    command = args.command
    if command == "profile":  # --out is a report name inside WORKDIR/reports
        return [("--workdir", args.workdir)]
    found = []
    if getattr(args, "out", None) is not None:
        found.append(("--out", os.fspath(args.out)))
    elif command == "train":
        found.append(("--out", "runs"))
    elif getattr(args, "workdir", None) is not None:
        found.append(("--workdir", args.workdir))
    if getattr(args, "out_dir", None) is not None and not getattr(args, "no_draw", False):
        found.append(("--out-dir", args.out_dir))
    return found


def _environment_error(command: str, exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    fix = ("free disk space and rerun (nothing partial was kept)" if exc.errno in (errno.ENOSPC, errno.EDQUOT,
                                                                                   errno.EFBIG)
           else "fix its permissions or choose another --workdir/--out")
    return f"cunet-optimize {command}: error: {where}{exc.strerror or exc}; {fix}"


def _run_command(args) -> int:
    from cunet_optimize.launch import detect_launch

    launch = detect_launch()
    if not launch.distributed:
        return _run_in_this_process(args)
    from cunet_optimize import distributed

    if args.command not in DISTRIBUTED_COMMANDS:
        raise CUNetError(f"{args.command} runs in one process; launch it without torchrun/srun "
                         f"(multi-process: {', '.join(DISTRIBUTED_COMMANDS)})")
    led = args.command in LED_BY_RANK_0
    with distributed.process_group(launch, distributed.LED_COMMAND_TIMEOUT if led else None):
        if not distributed.is_main():
            # rank 0 speaks for the job: the others log only warnings and print nothing
            logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)
            try:
                with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                    return distributed.follow_rank_0() if led else int(args.func(args) or 0)
            except distributed.JobFailed:
                if args.verbose:
                    raise
                return EXIT_USER_ERROR  # rank 0 prints the line
        print(distributed.describe(), file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)
        with distributed.leading_the_others() if led else contextlib.nullcontext():
            return _run_in_this_process(args)


def _run_in_this_process(args) -> int:
    if not getattr(args, "json", False):
        return int(args.func(args) or 0)
    from cunet_optimize.commands import common

    common._json_stream[0] = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON and nothing else
            return int(args.func(args) or 0)
    finally:
        common._json_stream[0] = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(requested_command(argv))
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse would blame the main parser for an option only the subcommand lacks
        usage_error(f"{parser.prog} {args.command}" if getattr(args, "command", None) else parser.prog,
                    f"unrecognized arguments: {' '.join(extras)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        from cunet_optimize.allocator import keep_freed_memory
        from cunet_optimize.commands.common import check_writable

        keep_freed_memory()  # deep models fault their activations in on every pass otherwise
        for flag, path in output_locations(args):
            check_writable(path, flag)
        status = _run_command(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except CUNetError as e:
        if args.verbose:
            raise
        print(f"cunet-optimize {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        if args.verbose:
            raise
        # the reader went away (`| head`): stop quietly; point stdout at devnull so the
        # interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:
        if args.verbose or e.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(_environment_error(args.command, e), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"cunet-optimize {args.command}: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
