"""`qat --plan`: fine-tune an aggressive `build --precision auto` plan until it meets a budget PTQ cannot.

Three command-line steps, run in this process one after the other with `--threads`
PyTorch threads, each timed (wall, CPU, load average before/after):

1. `build --precision auto --max-nme-increase PLAN_BUDGET --no-accuracy-gate`: a loose
   budget makes the search pick a plan near all-INT4; this build is also the plan's PTQ
   result, judged against the tight `--budget`.
2. `qat --plan <that build> --data DATA --split train`: fine-tune the mixed model on the
   training split (`--val-split none`: no checkpoint is chosen on the test split the
   builds evaluate on; best.safetensors is the last epoch).
3. `build --precision auto --qat <best.safetensors> --max-nme-increase BUDGET`, run with
   `--no-accuracy-gate` so a failing plan still reports its NME; `passed` is the gate's
   verdict at BUDGET.
4. (unless --no-ptq-search) `build --precision auto --max-nme-increase BUDGET`: the
   cheapest plan PTQ finds within the tight budget, for its weight bytes.

DATA must hold the training split: the embedded default data in the cache holds only the
test split and the 128 calibration images. Make it with
`cunet-optimize data synth --out DIR --count 3000 --seed 0 --test-fraction 0.1` (the
embedded model's training set; its first 128 training images are the calibration slice).

    python bench/bench_auto_qat.py --data DIR [--plan-budget 1.0] [--budget 0.05] [--epochs 1]
        [--train-images N] [--lr LR] [--threads 1] [--workdir DIR] --out bench/results/auto_qat_embedded.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import tempfile
from pathlib import Path

from bench_build_time import cpu_model, measured


def run_step(argv: list[str]) -> dict:
    """Run one `cunet-optimize` command line in this process, timed."""
    from cunet_optimize.cli import main

    step: dict = {"command": "cunet-optimize " + shlex.join(argv)}
    with measured(step):
        status = main(argv)
    step["exit_status"] = status
    if status != 0:
        raise SystemExit(f"{step['command']}: exit status {status}")
    return step


def build_result(build_dir: Path, plan_dir: Path | None = None) -> dict:
    """NME and gate verdict of a finished build, with the plan's formats and weight bytes from
    the build.json of the auto build that searched it (`plan_dir`, default `build_dir`)."""
    m = json.loads((build_dir / "build.json").read_text())
    acc, plan = m["accuracy"], json.loads(((plan_dir or build_dir) / "build.json").read_text())["auto"]
    formats: dict[str, int] = {}
    for fmt in plan["plan"].values():
        formats[fmt] = formats.get(fmt, 0) + 1
    bytes_int8 = plan["weight_bytes_uniform"]["int8"]
    return {"nme_percent": acc["quantized_value"], "fp32_nme_percent": acc["reference_value"],
            "degradation_points": acc["degradation_points"], "budget": acc["tolerance"], "passed": acc["passed"],
            "formats": formats, "weight_bytes": plan["weight_bytes"], "weight_bytes_int8": bytes_int8,
            "weight_bytes_over_int8": round(plan["weight_bytes"] / bytes_int8, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the training set (300-W layout with train.txt)")
    ap.add_argument("--plan-budget", type=float, default=1.0, help="NME budget of the aggressive PTQ plan")
    ap.add_argument("--budget", type=float, default=0.05, help="NME budget the QAT plan must meet")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-images", type=int, default=None, help="first N training images (default all)")
    ap.add_argument("--lr", type=float, default=None, help="QAT learning rate (default: qat's own)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ptq-search", dest="ptq_search", action="store_false",
                    help="skip step 4 (PTQ's own search at --budget)")
    ap.add_argument("--workdir", default=None, help="keep the builds and the QAT run here (default: a temp dir)")
    ap.add_argument("--previous-attempt", default=None,
                    help="a JSON result of an earlier try to carry along (may be --out itself)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)  # build has no --threads; qat gets it too
    previous = json.loads(Path(args.previous_attempt).read_text()) if args.previous_attempt else None
    with tempfile.TemporaryDirectory(prefix="bench-auto-qat-") as tmp:
        work = Path(args.workdir or tmp)
        plan_dir, qat_dir = work / "engines" / "plan-ptq", work / "qat"
        results: dict = {
            "what": __doc__.split("\n\n")[0],
            "options": {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "previous_attempt")},
            "machine": {"cpu_model": cpu_model(), "platform": platform.platform(),
                        "usable_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()},
            "steps": {},
        }
        steps = results["steps"]
        steps["plan_ptq"] = run_step(["build", "--precision", "auto", "--max-nme-increase", str(args.plan_budget),
                                      "--no-accuracy-gate", "--workdir", str(work), "--name", plan_dir.name])
        ptq = build_result(plan_dir)
        # built under the loose budget; what counts is the verdict at the tight one
        ptq.update(budget=args.budget, passed=ptq["degradation_points"] <= args.budget)
        qat = ["qat", "--plan", str(plan_dir), "--data", args.data, "--split", "train", "--val-split", "none",
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--no-resume", "--out", str(qat_dir)]
        qat += ["--train-images", str(args.train_images)] if args.train_images else []
        qat += ["--lr", f"{args.lr:g}"] if args.lr else []
        steps["qat"] = run_step(qat)
        history = json.loads((qat_dir / "history.json").read_text())
        steps["qat"]["history"] = history
        steps["build_qat"] = run_step(["build", "--precision", "auto", "--qat", str(qat_dir / "best.safetensors"),
                                       "--max-nme-increase", str(args.budget), "--no-accuracy-gate",
                                       "--workdir", str(work), "--name", "plan-qat"])
        results["ptq_same_plan"] = ptq
        from cunet_optimize.pipeline.plans import load_plan, plan_of_qat_checkpoint

        if plan_of_qat_checkpoint(qat_dir / "best.safetensors") != load_plan(plan_dir):
            raise SystemExit("the QAT checkpoint's plan is not the plan it was fine-tuned from")
        results["qat_plan"] = build_result(work / "engines" / "plan-qat", plan_dir)
        results["qat_wall_seconds"] = steps["qat"]["wall_seconds"]
        if args.ptq_search:
            steps["ptq_search"] = run_step(["build", "--precision", "auto", "--max-nme-increase", str(args.budget),
                                            "--no-accuracy-gate", "--workdir", str(work), "--name", "ptq-search"])
            results["ptq_search_at_budget"] = build_result(work / "engines" / "ptq-search")
    if previous is not None:
        results["previous_attempt"] = previous
    from cunet_optimize.atomic import write_atomic

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(results, indent=2) + "\n")
    p, q = results["ptq_same_plan"], results["qat_plan"]
    print(f"wrote {args.out}: plan {p['formats']} = {p['weight_bytes']:.0f} bytes ({p['weight_bytes_over_int8']}x INT8); "
          f"PTQ {p['degradation_points']:+.3f}, QAT {q['degradation_points']:+.3f} NME points "
          f"(budget {args.budget}: PTQ {'pass' if p['passed'] else 'fail'}, QAT {'pass' if q['passed'] else 'fail'}); "
          f"QAT {results['qat_wall_seconds']:.0f} s")
    if "ptq_search_at_budget" in results:
        r = results["ptq_search_at_budget"]
        print(f"PTQ's own plan at {args.budget}: {r['formats']} = {r['weight_bytes']:.0f} bytes "
              f"({r['weight_bytes_over_int8']}x INT8), {r['degradation_points']:+.3f} ({'pass' if r['passed'] else 'fail'})")


if __name__ == "__main__":
    main()
