"""Which grain should `build --precision auto` search at? Both, measured on one model.

For each grain (each conv; each U-Net block and head) this measures the sensitivity table
on the held-out calibration images, the additive greedy plan and the joint-run plan
(`search_measured`), as `build --precision auto` does, without building engines: weight
bytes against all-INT8, the held-out degradation of each plan, and the seconds each grain
costs. One process, one calibration (cached in --workdir), the grains back to back.

    python bench/bench_auto_grain.py [--model CKPT] [--max-nme-increase 0.1] [--heldout-images 64]
        [--workdir /tmp/auto-grain] --out bench/results/auto_grain_embedded.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-nme-increase", type=float, default=0.1)
    ap.add_argument("--heldout-images", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/auto-grain")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from cunet_optimize.allocator import keep_freed_memory
    from cunet_optimize.pipeline.build import BuildOptions, StageTimer, quantize_and_calibrate
    from cunet_optimize.models import resolve_model
    from cunet_optimize.quant import auto
    from cunet_optimize.tasks import open_dataset_or_default, task_of_model

    keep_freed_memory()
    model, ckpt, _, _ = resolve_model(args.model)
    task = task_of_model(model)
    calib_set, _ = open_dataset_or_default(None, "calib", task)
    n = len(calib_set)
    held = min(args.heldout_images, n // 2)
    opts = BuildOptions(precision="int8", model=args.model, workdir=args.workdir, calib_images=min(128, n - held))
    qmodel, _ = quantize_and_calibrate(opts, model, ckpt, StageTimer(1), progress=False)
    heldout = auto.HeldOut.load(calib_set, range(n - held, n))
    convs = auto.layer_infos(qmodel, "conv", tuple(heldout.images.shape[-2:]))
    results = {"model": args.model or "embedded default", "budget": args.max_nme_increase, "heldout_images": held,
               "load_average_start": os.getloadavg()[0], "grains": {}}
    for grain in ("conv", "block"):
        start = time.perf_counter()
        layers = [replace(layer, group=auto.group_of(layer.name, grain)) for layer in convs]
        switch = auto.FormatSwitch(qmodel, heldout, layers)
        table = auto.measure_sensitivity(model, qmodel, heldout, layers, ("int4", "int8"), grain, progress=False,
                                         switch=switch)
        costs = auto.group_costs(layers, ("int4", "int8"), "size")
        int8_bytes = auto.plan_cost(costs, {g: "int8" for g in costs})
        additive = auto.search_plan(table, costs, args.max_nme_increase)
        joint = auto.search_measured(
            table, costs, args.max_nme_increase,
            lambda plan: task.degradation(switch.metric(auto.layer_plan(layers, plan)), table.fp32), additive)
        results["grains"][grain] = {
            "groups": len(costs), "sensitivity_seconds": table.seconds,
            "seconds": round(time.perf_counter() - start, 2), "load_average_end": os.getloadavg()[0],
            "additive": {"weight_bytes_over_int8": round(additive.cost / int8_bytes, 3),
                         "predicted": additive.predicted},
            "joint": {"weight_bytes_over_int8": round(joint["cost"] / int8_bytes, 3), "heldout": joint["measured"],
                      "runs": joint["runs"]},
        }
        print(grain, json.dumps(results["grains"][grain]["joint"]["weight_bytes_over_int8"]), flush=True)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
