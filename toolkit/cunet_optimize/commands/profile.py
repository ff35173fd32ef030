"""`cunet-optimize profile`: measure the builds in engines/ and write the report.

Size, latency (median/p90/p95/p99, throughput, batch sweep), peak memory, per-layer
time (ONNX Runtime) and accuracy vs the PyTorch FP32 baseline, for every build folder
given (default: all under <workdir>/engines/). Writes <workdir>/reports/<name>.json
and .html, prints the summary table and where the report is.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from cunet_optimize.commands.common import non_negative_float, non_negative_int, positive_float, positive_int
from cunet_optimize.commands.common import add_force_argument, check_new_output, json_stream, print_table
from cunet_optimize.targets import TARGETS
from cunet_optimize.errors import CUNetError
from cunet_optimize.metrics import NORMALIZERS
from cunet_optimize.profiling import find_builds, profile_engines, summary_rows
from cunet_optimize.profiling.memory import MEMORY_MODES
from cunet_optimize.profiling.profiler import DEFAULT_BATCH_SIZES, DEFAULT_RUNS, DEFAULT_WARMUP, LAYER_PROFILE_RUNS
from cunet_optimize.report import write_report
from cunet_optimize.report.format import MISSING, fmt_bytes, fmt_ms, fmt_num, fmt_pass, fmt_speedup

DEFAULT_SERVE_SECONDS = 5.0  # per served row: perf_analyzer's measurement window
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# The largest batch the sweep takes: the largest optimisation profile of any target
# (`cunet-optimize targets`; h100's 64), since no TensorRT engine we build accepts more.
# Only the CPU engine (dynamic batch) could run a larger one, and one batch of N holds N
# input images (3x256x256 float32, 0.79 MB each) plus their activations (4 MB at the
# embedded model's peak, 58 MB of node outputs in all: bench/results/surgery.json) in
# memory at once: about 4 GB at 64, where 100000 asks for 73 GiB of input alone.
MAX_BATCH_SIZE = max(spec.batch[2] for spec in TARGETS.values())


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise CUNetError(f"--batch-sizes must be comma-separated positive integers such as 1,2,4,8; got {text!r}")
    if max(sizes) > MAX_BATCH_SIZE:
        raise CUNetError(f"--batch-sizes {text}: at most {MAX_BATCH_SIZE} images per batch (the largest engine "
                         "profile of any target; a batch holds every image's input and activations in memory "
                         "at once); pass smaller sizes such as 1,2,4,8")
    return sizes


def report_name(out: str | None, workdir: Path, force: bool, flag: str = "--out") -> str | None:
    """The report's file name from --out (None: profile_engines picks profile-<timestamp>),
    checked before anything is measured: a plain name, and WORKDIR/reports/NAME.json and
    .html replaced only with --force."""
    if out is None:
        return None
    name = out.removesuffix(".html").removesuffix(".json")
    if not NAME_RE.match(name):
        raise CUNetError(
            f"{flag} takes a file name without folders (letters, digits, '.', '_', '-'), got {out!r}; "
            "the report goes to <workdir>/reports/NAME.html and NAME.json"
        )
    for suffix in (".json", ".html"):
        check_new_output(workdir / "reports" / f"{name}{suffix}", flag, force=force)
    return name


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="measure builds (size, latency, memory, per-layer time, accuracy) and write an HTML report",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("engine_dirs", nargs="*", metavar="ENGINE_DIR",
                   help="build folders (default: every build under <workdir>/engines/)")
    p.add_argument("--workdir", default=".", help="where engines/ and reports/ are (default: .)")
    p.add_argument("--data", metavar="DIR", help="evaluation data (300-W layout folder; MPII annotation JSON or its "
                   "folder for pose builds); default: each build's eval_data")
    p.add_argument("--split", default=None, help="split list in the data folder (default: the build's, else test)")
    p.add_argument("--crop", choices=["tight", "detector"], default=None, help="crop policy (default: the build's)")
    p.add_argument("--boxes", metavar="JSON", help="detector boxes for --crop detector")
    p.add_argument("--normalizer", choices=NORMALIZERS, default=None, help="NME normaliser (default inter_ocular)")
    p.add_argument("--flip", action="store_true", help="flip test: average with the mirrored image")
    p.add_argument("--max-images", type=positive_int, default=None, metavar="N", help="score only the first N images")
    p.add_argument("--runs", type=positive_int, default=DEFAULT_RUNS,
                   help=f"timed runs at batch 1 (default {DEFAULT_RUNS})")
    p.add_argument("--warmup", type=non_negative_int, default=DEFAULT_WARMUP,
                   help=f"warm-up runs (default {DEFAULT_WARMUP})")
    p.add_argument("--min-seconds", type=non_negative_float, default=0.0,
                   help="keep timing until this much time passed")
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), metavar="LIST",
                   help=f"batch sweep, e.g. 1,2,4 (default {','.join(map(str, DEFAULT_BATCH_SIZES))}; "
                        f"at most {MAX_BATCH_SIZE})")
    p.add_argument("--memory", choices=MEMORY_MODES, default="subprocess",
                   help="peak-memory measurement: a fresh process per variant (default), in this process, or off")
    p.add_argument("--layer-runs", type=non_negative_int, default=LAYER_PROFILE_RUNS, metavar="N",
                   help="runs under the ONNX Runtime profiler for per-layer time "
                        f"(0 = skip; default {LAYER_PROFILE_RUNS})")
    p.add_argument("--threads", type=positive_int, default=None, help="PyTorch baseline threads (default: PyTorch's)")
    p.add_argument("--serve", action="store_true",
                   help="also measure each CPU build served by Triton (HTTP and gRPC, perf_analyzer) at concurrency "
                        "1 and 8 beside the engine in-process at the same concurrency (needs the server environment "
                        "`serve` creates: docs/SERVING.md)")
    p.add_argument("--serve-seconds", type=positive_float, default=DEFAULT_SERVE_SECONDS, metavar="S",
                   help=f"--serve: measure each row this long (default {DEFAULT_SERVE_SECONDS:g})")
    p.add_argument("--allow-mixed", action="store_true", help="allow builds of different models in one report")
    p.add_argument("--out", metavar="NAME", help="report name (default profile-<UTC timestamp>)")
    add_force_argument(p, "the report NAME.json and NAME.html")
    p.add_argument("--json", action="store_true", help="print the profile JSON to stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def command_line(args) -> str:
    """The command that reproduces this profile, from the parsed arguments."""
    argv = ["cunet-optimize", "profile", *args.engine_dirs]
    defaults = {"workdir": ".", "runs": DEFAULT_RUNS, "warmup": DEFAULT_WARMUP, "min_seconds": 0.0,
                "batch_sizes": ",".join(map(str, DEFAULT_BATCH_SIZES)), "memory": "subprocess",
                "layer_runs": LAYER_PROFILE_RUNS, "serve_seconds": DEFAULT_SERVE_SECONDS}
    for key in ("workdir", "data", "split", "crop", "boxes", "normalizer", "max_images", "runs", "warmup",
                "min_seconds", "batch_sizes", "memory", "layer_runs", "threads", "out",
                *(("serve_seconds",) if args.serve else ())):
        value = getattr(args, key)
        if value is not None and value != defaults.get(key):
            argv += [f"--{key.replace('_', '-')}", str(value)]
    for flag in ("flip", "allow_mixed", "serve"):
        if getattr(args, flag):
            argv.append(f"--{flag.replace('_', '-')}")
    return shlex.join(argv)


def print_summary(profile: dict, file=None) -> None:
    rows, metric = [], "NME"
    for r in summary_rows(profile):
        metric = r["metric"] if r["metric_percent"] is not None else metric
        rows.append([
            r["variant"], r["target"], r["precision"], fmt_bytes(r["size_bytes"]), fmt_ms(r["median_ms"]),
            fmt_ms(r["p90_ms"]), fmt_num(r["throughput_ips"], 1), fmt_speedup(r["speedup_vs_pytorch"]),
            fmt_num(r["metric_percent"], 3), fmt_num(r["metric_delta_points"], 3, sign=True),
            "ref" if r["role"] == "baseline" else fmt_pass(r["passed"]) if r["metric_percent"] is not None else MISSING,
            r["runtime"] if r["measured"] else r["status"],
        ])
    batch = next((r["batch_size"] for r in summary_rows(profile) if r["batch_size"]), 1)
    print_table(["variant", "target", "precision", "size", f"median ms b{batch}", "p90 ms", "img/s", "x pytorch",
                 f"{metric} %", "delta pts", "pass", "runtime / status"], rows, file=file)


def run(args) -> int:
    workdir = Path(args.workdir)
    sizes = parse_batch_sizes(args.batch_sizes)
    name = report_name(args.out, workdir, args.force)
    if args.engine_dirs:
        dirs = [Path(d) for d in args.engine_dirs]
    else:
        dirs = [b.path for b in find_builds(workdir)]
    result = profile_engines(
        dirs, args.data, split=args.split, crop=args.crop, boxes=args.boxes, normalizer=args.normalizer,
        flip=args.flip, max_images=args.max_images, runs=args.runs, warmup=args.warmup,
        min_seconds=args.min_seconds, batch_sizes=sizes, memory=args.memory, layer_runs=args.layer_runs,
        allow_mixed=args.allow_mixed, torch_threads=args.threads, progress=not args.no_progress,
        name=name, command=command_line(args), serve_seconds=args.serve_seconds if args.serve else None,
    )
    profile = result.to_dict()
    json_path, html_path = write_report(profile, workdir / "reports", result.name)
    if args.json:
        print(result.to_json(), end="", file=json_stream())
        print(f"wrote {json_path} and {html_path}", file=sys.stderr)
        return 0
    print(profile["statement"])
    print_summary(profile)
    for note in profile["notes"]:
        print(f"note: {note}")
    print(f"wrote {json_path}")
    print(f"report: {html_path}")
    return 0
