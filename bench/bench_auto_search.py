"""`build --precision auto` beside `build --precision int8`: search time, weight bytes, NME.

Both builds run in this process, back to back (`--order`), each in a fresh temporary
workdir (no cached calibration, no cached FP32 reference), with the command line's
defaults for the cpu target. The issue's target is the search (INT8 calibration,
sensitivity, additive search and joint held-out runs: build.json `auto.search_seconds`)
at most 3x the whole INT8 build; the auto build's total (search + every engine it builds)
is recorded too. Load averages before and after each build are recorded: on a shared
machine compare the ratio, measured back to back, rather than the seconds.

    python bench/bench_auto_search.py [--model CKPT] [--max-nme-increase 0.1]
        [--heldout-images 64] [--sensitivity-images N] [--auto-grain conv|block] [--also int4] [--no-accuracy-gate] [--keep DIR]
        --out bench/results/auto_search_embedded.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from bench_build_time import cpu_model, measured

AUTO_KEYS = ("grain", "grain_reason", "budget", "formats_measured", "weight_bytes", "weight_bytes_uniform",
             "latency_units", "latency_units_uniform", "predicted_degradation", "heldout_degradation", "additive",
             "joint_runs", "builds", "back_off", "search_seconds", "total_seconds")


def timed_build(precision: str, args, gate: bool) -> dict:
    from cunet_optimize.pipeline import BuildOptions, run_build

    out: dict = {"precision": precision}
    with measured(out) as clock, tempfile.TemporaryDirectory(prefix="bench-auto-") as workdir:
        opts = BuildOptions(precision=precision, model=args.model, workdir=workdir,
                            max_nme_increase=args.max_nme_increase, accuracy_gate=gate,
                            auto_heldout_images=args.heldout_images, auto_grain=args.auto_grain,
                            auto_sensitivity_images=args.sensitivity_images,
                            command="bench/bench_auto_search.py")
        report = run_build(opts, echo=clock, progress=False)
        m = report.manifest
        if args.keep:  # the engine folder, e.g. for `qat --plan KEEP/auto`
            shutil.copytree(report.path, Path(args.keep) / precision, dirs_exist_ok=True)
    acc = m.get("accuracy", {})
    out.update({
        "timings_seconds": m.get("timings_seconds"),
        "nme_percent": acc.get("quantized_value"), "fp32_nme_percent": acc.get("reference_value"),
        "degradation_points": acc.get("degradation_points"), "passed": acc.get("passed"),
    })
    if "auto" in m:
        out["auto"] = {k: m["auto"].get(k) for k in AUTO_KEYS}
        out["auto"]["sensitivity_seconds"] = m["auto"]["sensitivity"]["seconds"]
        out["auto"]["heldout"] = m["auto"]["heldout"]
        out["auto"]["groups"] = len(m["auto"]["sensitivity"]["delta"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument("--max-nme-increase", type=float, default=0.1)
    ap.add_argument("--heldout-images", type=int, default=64)
    ap.add_argument("--sensitivity-images", type=int, default=None,
                    help="--auto-sensitivity-images (default: the build's, by grain)")
    ap.add_argument("--auto-grain", choices=("conv", "block"), default=None)
    ap.add_argument("--order", nargs=2, default=["int8", "auto"], help="the two builds, in this order")
    ap.add_argument("--also", nargs="*", default=[], help="precisions built afterwards for comparison, ungated (int4)")
    ap.add_argument("--no-accuracy-gate", dest="accuracy_gate", action="store_false",
                    help="for checkpoints whose NME on the embedded test split means nothing (N=8)")
    ap.add_argument("--keep", default=None, help="copy each engine folder to KEEP/<precision>")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from cunet_optimize.allocator import keep_freed_memory

    keep_freed_memory()  # as the command line does
    results: dict = {
        "model": str(Path(args.model).resolve()) if args.model else "embedded default",
        "options": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
        "machine": {"cpu_model": cpu_model(), "platform": platform.platform(),
                    "usable_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()},
        "builds": {},
    }
    for precision in [*args.order, *args.also]:
        print(f"build {precision} ...", flush=True)
        # the comparison builds are measured, not gated (INT4 PTQ is over a 0.1 budget)
        results["builds"][precision] = timed_build(precision, args, args.accuracy_gate and precision in args.order)
        print(json.dumps(results["builds"][precision], indent=1), flush=True)
    int8, auto = results["builds"].get("int8"), results["builds"].get("auto")
    if int8 and auto:
        a = auto["auto"]
        results["search_over_int8_build"] = round(a["search_seconds"] / int8["wall_seconds"], 2)
        results["auto_build_over_int8_build"] = round(auto["wall_seconds"] / int8["wall_seconds"], 2)
        results["weight_bytes_over_int8"] = round(a["weight_bytes"] / a["weight_bytes_uniform"]["int8"], 3)
    from cunet_optimize.atomic import write_atomic

    out = write_atomic(Path(args.out), json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}: search / INT8 build {results.get('search_over_int8_build')}, "
          f"weight bytes / INT8 {results.get('weight_bytes_over_int8')}")


if __name__ == "__main__":
    main()
