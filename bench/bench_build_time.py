"""Wall time of `cunet-optimize build`, stage by stage, for one checkpoint and each precision.

Each build runs in this process, in a fresh temporary workdir (no cached calibration),
with the defaults of `cunet-optimize build --model CKPT --precision P --target cpu`
(percentile calibration on 128 images after equalization, accuracy on the embedded
test split). Stage times are taken from the build's own progress lines, so a build
that fails (say in export verification) still reports the stages it finished and how
long the failing one ran; each stage gets its wall and CPU seconds (user + system, all
threads: on a shared machine CPU time moves less with other jobs than wall time does).
Also recorded: the CPU model, usable cores, PyTorch's thread count and the load average
before and after (compare wall times only across runs made under similar load).

    python bench/bench_build_time.py --model /path/to/n8.safetensors
        [--precisions int8 fp32] [--calib-images 128] [--out bench/results/build_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: less sensitive than wall time
    to other jobs on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class StageClock:
    """An echo for run_build: notes when each "[k/n] stage: ..." line appears (wall and CPU)."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, float, float]] = []

    def __call__(self, line: str = "", *_) -> None:
        print(line, flush=True)
        if line.startswith("[") and "] " in line and ":" in line:
            self.starts.append((line.split("] ", 1)[1].split(":", 1)[0], time.perf_counter(), cpu_seconds()))

    def stages(self, end: float, end_cpu: float) -> dict[str, dict[str, float]]:
        ends = [(t, c) for _, t, c in self.starts[1:]] + [(end, end_cpu)]
        return {name: {"wall": round(stop - start, 2), "cpu": round(stop_cpu - cpu, 1)}
                for (name, start, cpu), (stop, stop_cpu) in zip(self.starts, ends)}


@contextmanager
def measured(result: dict) -> Iterator[StageClock]:
    """Measure what runs inside: yields the StageClock to pass to run_build as its echo; on
    exit `result` gets the per-stage, wall and CPU seconds and the load average before/after."""
    clock = StageClock()
    before = resource.getrusage(resource.RUSAGE_SELF)
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        yield clock
    finally:
        end = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_SELF)
        result["stage_seconds_from_progress_lines"] = clock.stages(end, cpu_seconds())
        result["wall_seconds"] = round(end - start, 2)
        result["cpu_seconds"] = {"user": round(after.ru_utime - before.ru_utime, 1),
                                 "system": round(after.ru_stime - before.ru_stime, 1)}
        result["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]


def time_build(model: str, precision: str, calib_images: int) -> dict:
    from cunet_optimize.pipeline import BuildOptions, run_build

    result: dict = {"precision": precision}
    with measured(result) as clock, tempfile.TemporaryDirectory(prefix="bench-build-") as workdir:
        opts = BuildOptions(precision=precision, model=model, calib_images=calib_images, workdir=workdir,
                            accuracy_gate=False, command="bench/bench_build_time.py")
        try:
            report = run_build(opts, echo=clock, progress=False)
            result["timings_seconds"] = report.manifest["timings_seconds"]
            acc = report.manifest.get("accuracy", {})
            result["nme_percent"] = {"reference": acc.get("reference", {}).get("nme_percent"),
                                     "built": acc.get("quantized", {}).get("nme_percent")}
            result["status"] = "ok"
        except Exception as e:  # a failed build still tells how long its stages took
            result["status"] = "failed"
            result["error"] = f"{type(e).__name__}: {e}"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint to build")
    ap.add_argument("--precisions", nargs="+", default=["int8", "fp32"])
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--out", default="bench/results/build_time.json")
    args = ap.parse_args()

    import onnxruntime
    import torch

    from cunet_optimize.allocator import keep_freed_memory

    keep_freed_memory()  # as the command line does

    results = {
        "model": str(Path(args.model).resolve()),
        "machine": {"cpu_model": cpu_model(), "platform": platform.platform(),
                    "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "environment": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "python": platform.python_version()},
        "builds": [],
    }
    for precision in args.precisions:
        print(f"build {precision} of {args.model} ...", flush=True)
        build = time_build(args.model, precision, args.calib_images)
        results["builds"].append(build)
        print(json.dumps(build, indent=1), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
