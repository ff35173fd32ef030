"""`cunet-optimize targets`: the deployment targets and what each can execute."""

from __future__ import annotations

import argparse

from cunet_optimize.commands.common import print_json, print_table
from cunet_optimize.targets import TARGETS, TargetSpec


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "targets",
        help="list deployment targets (backend, compute capability, DLA, precisions, TensorRT)",
        description=(
            "List the deployment targets the build stage knows. Precisions marked * are unverified "
            "rows; int4 is never native (no INT4 conv kernels): the cpu runs per-channel INT4 weights as the "
            "INT8 convs they equal, TensorRT targets get them dequantized to their float type."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the registry as JSON")
    parser.set_defaults(func=run)


def _row(spec: TargetSpec) -> list[str]:
    precisions = ",".join(p + ("*" if p in spec.unverified_precisions else "") for p in spec.precisions)
    if spec.dla_cores:
        dla = f"{spec.dla_cores} ({','.join(spec.dla_precisions)})"
    else:
        dla = "-"
    cc = ".".join(map(str, spec.compute_capability)) if spec.compute_capability else "-"
    trt = " ".join(spec.tensorrt_versions) or "-"
    if spec.default_tensorrt_major:
        trt += f" [default {spec.default_tensorrt_major}]"
    return [
        spec.name,
        spec.backend,
        spec.device,
        cc,
        dla,
        precisions,
        "/".join(map(str, spec.batch)),
        f"{spec.workspace_bytes >> 20} MiB" if spec.workspace_bytes else "-",
        "yes" if spec.build_on_device else "no",
        trt,
    ]


HEADER = [
    "target",
    "backend",
    "device",
    "cc",
    "DLA",
    "precisions",
    "batch",
    "workspace",
    "on-device",
    "TensorRT",
]
FOOTNOTE = "* unverified row; int4 runs as int8 on cpu (per-channel INT4 integers) and as weights dequantized to fp16 on GPU/DLA"


def run(args: argparse.Namespace) -> int:
    if getattr(args, "json", False):
        print_json([spec.to_dict() for spec in TARGETS.values()])
    else:
        print_table(HEADER, [_row(spec) for spec in TARGETS.values()])
        print()
        print(FOOTNOTE)
    return 0
