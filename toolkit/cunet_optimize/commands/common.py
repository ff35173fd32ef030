"""Small helpers shared by the subcommands: tables, JSON output, option types, output checks.

Every numeric option is checked by its argparse `type=` here (positive_int,
non_negative_float, ...), so a bad value is refused before any work starts, with
argparse's one-line message naming the flag (exit 2). Every file a command writes is
checked here before any work too: a writable place (check_writable), and nothing there
the user did not ask to replace (check_new_output, --force).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence


def _number_type(convert: Callable[[str], float], accept: Callable[[float], bool], wanted: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = _number_type(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number_type(float, lambda v: v > 0, "a number > 0")
non_negative_float = _number_type(float, lambda v: v >= 0, "a number >= 0")
unit_float = _number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


# Output options that name a folder (the others name a file or a folder).
FOLDER_FLAGS = ("--workdir", "--out-dir")


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, an output location this process cannot write to.

    `path` is a file or folder that may not exist yet: its nearest existing folder must
    accept a new file (tried for real: permission bits say nothing for root or a
    read-only mount). A FOLDER_FLAGS path may not be a file."""
    from cunet_optimize.errors import CUNetError

    target = Path(path)
    if flag in FOLDER_FLAGS and target.exists() and not target.is_dir():
        raise CUNetError(f"{flag} {path}: is a file, not a folder; choose a folder for {flag}")
    folder = target if target.is_dir() else target.parent if target.exists() else target
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise CUNetError(f"{flag} {path}: {folder} is a file, not a folder; choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".cunet-write-check-"):
            pass
    except OSError as exc:
        raise CUNetError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc}); "
                         f"choose a writable {flag} or fix its permissions") from None


def add_force_argument(parser, what: str) -> None:
    """--force: the one way to let a command replace an existing output (check_new_output)."""
    parser.add_argument("--force", action="store_true", help=f"replace {what} if it exists (never an input)")


def check_new_output(path: str | os.PathLike, flag: str, *, force: bool,
                     inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, to write `path` over something the user did not ask to replace.

    The rule `build` keeps for engines/NAME, for every file a command writes: an existing file
    is replaced only with --force; one of the command's own `inputs` never (reading it is the
    work that would produce what replaces it, and --force asks to replace an output); a folder
    never (an atomic rename cannot put a file in its place)."""
    from cunet_optimize.errors import CUNetError

    target = Path(path)
    for source in inputs:
        if _same_file(target, Path(source)):
            raise CUNetError(f"{flag} {path} is the input {source}: it would be overwritten; "
                             f"choose another {flag}")
    if target.is_dir():
        raise CUNetError(f"{flag} {path} is a folder; choose another {flag}")
    if (target.exists() or target.is_symlink()) and not force:
        raise CUNetError(f"{path} already exists; pass --force to replace it or choose another {flag}")


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file (through links, `..` and hard links alike)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """A plain aligned text table (numbers right-aligned)."""
    file = file or sys.stdout
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        out = []
        for i, c in enumerate(row):
            numeric = c.replace(".", "", 1).replace("M", "").replace("%", "").lstrip("-").isdigit()
            out.append(c.rjust(widths[i]) if numeric else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    print(fmt(cells[0]), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells[1:]:
        print(fmt(row), file=file)


# With --json, stdout carries the JSON only: the CLI points sys.stdout at stderr while the
# command runs (libraries such as Polygraphy print their warnings to stdout) and keeps the
# real stdout here for the JSON.
_json_stream: list = [None]


def json_stream():
    """Where --json output goes: the real stdout."""
    return _json_stream[0] or sys.stdout


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str), file=json_stream())


def add_model_argument(parser, help_suffix: str = "") -> None:
    parser.add_argument(
        "--model",
        metavar="CKPT_OR_NAME",
        default=None,
        help="checkpoint (.safetensors or the authors' .pth.tar) or registered name; "
        "default: the embedded default model" + help_suffix,
    )


def add_face_data_arguments(parser, split_default: str | None) -> None:
    """--data (faces: a 300-W layout folder; pose: an MPII annotation JSON or its folder) and
    its split and face-crop options."""
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="face model: 300-W layout folder, images with same-stem .pts files (+ split lists); "
                             "pose model: MPII annotation JSON, or the folder holding mpii_annotations.json")
    parser.add_argument("--split", default=split_default, action=_ExplicitSplit,
                        help=f"split list in DIR (train/test/common/challenging/full) or a list file "
                             f"(default: {split_default or 'every image'}; 'all' for every image); "
                             "MPII: test = its validation records, train, all")
    parser.add_argument("--crop", choices=["tight", "detector"], default="tight",
                        help="face crop: ground-truth landmark box x1.25 (HRNet) or detector box x1.1 (authors); "
                             "MPII crops are objpos/scale_provided")
    parser.add_argument("--boxes", metavar="JSON", help="detector boxes {image: [x1,y1,x2,y2]} for --crop detector")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images / malformed .pts with a warning instead of failing (faces)")


class _ExplicitSplit(argparse.Action):
    """--split that remembers it was given (a default split may fall back to every image)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.split_given = True


def data_task(args, model, model_name: str | None):
    """The task of `model`, checked against --data's layout (one line before any work)."""
    from cunet_optimize.tasks import check_task, task_of_data, task_of_model

    task = task_of_model(model)
    check_task(task, task_of_data(args.data), model_name or "(embedded default)", args.data)
    return task


def task_dataset(args, task, split: str | None, augment: bool = False, seed: int = 0):
    """--data opened as `task`'s data set (see `cunet_optimize.tasks.open_dataset`). A default
    --split (not given) in a face folder with no split lists at all, as most people keep
    their photos, means every image with a .pts."""
    import logging

    from cunet_optimize.data.face300w import SPLIT_NAMES
    from cunet_optimize.tasks import FACE, open_dataset

    if (task is FACE and split == args.split and split not in (None, "all") and not getattr(args, "split_given", False)
            and Path(args.data).is_dir() and not any((Path(args.data) / f"{n}.txt").is_file() for n in SPLIT_NAMES)):
        logging.getLogger(__name__).warning(
            "%s has no split lists (%s): using every image with a .pts file (as --split all)",
            args.data, ", ".join(f"{n}.txt" for n in SPLIT_NAMES))
        args.split = split = "all"
    return open_dataset(task, args.data, split, augment=augment, seed=seed, crop=args.crop, boxes=args.boxes,
                        skip_bad=args.skip_bad)


def add_concat_qdq_argument(parser) -> None:
    """--concat-qdq: INT8 Q/DQ placement on the dense concatenations (quant/policy.py)."""
    from cunet_optimize.quant.policy import CONCAT_QDQ

    parser.add_argument("--concat-qdq", choices=sorted(CONCAT_QDQ), default=None,
                        help="INT8 Q/DQ on the dense concatenations: none (conv inputs only; most accurate; the "
                             "default), tied (one scale per concat: TensorRT elides it; pair with qat), untied. "
                             "The same as the precision modifiers -convin / -tied / -untied: give one, or agree")


def command_line() -> str:
    """The command as the user typed it, for the manifests that record it."""
    return "cunet-optimize " + " ".join(sys.argv[1:]) if sys.argv else ""


def add_equalize_arguments(parser) -> None:
    """--equalize ALPHA / --no-equalize: activation equalization before INT8 calibration."""
    from cunet_optimize.quant.policy import DEFAULT_EQUALIZE_ALPHA

    def alpha(text: str):
        return text if text == "default" else unit_float(text)

    parser.add_argument("--equalize", type=alpha, default="default", metavar="ALPHA",
                        dest="equalize_alpha",
                        help="move activation range into the weights before calibrating INT8 activations "
                        f"(SmoothQuant alpha in [0, 1]; default {DEFAULT_EQUALIZE_ALPHA} for INT8 weights, "
                        "off for INT4, where it measured worse)")
    parser.add_argument("--no-equalize", action="store_const", const=None, dest="equalize_alpha",
                        help="calibrate the weights as trained")
