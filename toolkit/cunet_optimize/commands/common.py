"""Small helpers shared by the subcommands: tables, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence


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


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


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
    parser.add_argument("--split", default=split_default,
                        help=f"split list in DIR (train/test/common/challenging/full) or a list file "
                             f"(default: {split_default or 'every image'}; 'all' for every image); "
                             "MPII: test = its validation records, train, all")
    parser.add_argument("--crop", choices=["tight", "detector"], default="tight",
                        help="face crop: ground-truth landmark box x1.25 (HRNet) or detector box x1.1 (authors); "
                             "MPII crops are objpos/scale_provided")
    parser.add_argument("--boxes", metavar="JSON", help="detector boxes {image: [x1,y1,x2,y2]} for --crop detector")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images / malformed .pts with a warning instead of failing (faces)")


def data_task(args, model, model_name: str | None):
    """The task of `model`, checked against --data's layout (one line before any work)."""
    from cunet_optimize.tasks import check_task, task_of_data, task_of_model

    task = task_of_model(model)
    check_task(task, task_of_data(args.data), model_name or "(embedded default)", args.data)
    return task


def task_dataset(args, task, split: str | None, augment: bool = False, seed: int = 0):
    """--data opened as `task`'s data set (see `cunet_optimize.tasks.open_dataset`)."""
    from cunet_optimize.tasks import open_dataset

    return open_dataset(task, args.data, split, augment=augment, seed=seed, crop=args.crop, boxes=args.boxes,
                        skip_bad=args.skip_bad)


def add_equalize_arguments(parser) -> None:
    """--equalize ALPHA / --no-equalize: activation equalization before INT8 calibration."""
    from cunet_optimize.build import DEFAULT_EQUALIZE_ALPHA

    def alpha(text: str):
        return text if text == "default" else float(text)

    parser.add_argument("--equalize", type=alpha, default="default", metavar="ALPHA",
                        dest="equalize_alpha",
                        help="move activation range into the weights before calibrating INT8 activations "
                        f"(SmoothQuant alpha in [0, 1]; default {DEFAULT_EQUALIZE_ALPHA} for INT8 weights, "
                        "off for INT4, where it measured worse)")
    parser.add_argument("--no-equalize", action="store_const", const=None, dest="equalize_alpha",
                        help="calibrate the weights as trained")
