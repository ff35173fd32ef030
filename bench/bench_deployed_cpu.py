"""The CPU engines of one workdir side by side, as deployed: each build folder's engine in the
runtime its build chose (`load_engine`) and, where the build kept the other CPU runtime's engine
beside it, that one too; file bytes of the deployed model and median batch-1 latency, every
engine timed in blocks of its own (engines/base.py time_in_blocks) alternating over `--rounds`
rounds, so a drift in machine load hits them alike. `profile` times each engine once, in turn; on
a shared 2-core machine its medians move by a third from run to run, so the issue's ratios
(INT4 and auto against INT8) are read here.

    python bench/bench_deployed_cpu.py --workdir WORKDIR --out bench/results/deployed_cpu_embedded.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a workdir with CPU builds (engines/<name>/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per block")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--baseline", default=None, help="build name the ratios are against (default: the int8 build)")
    args = parser.parse_args()

    import onnxruntime

    import cunet_optimize as co
    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.engines.base import time_in_blocks
    from cunet_optimize.engines.cpu_isa import cpu_bf16_isa, cpu_int8_isa, cpu_model
    from cunet_optimize.engines.onnxrt import OnnxRuntimeRunner
    from cunet_optimize.engines.openvino import OpenVinoRunner, openvino_version

    runners, rows = {}, {}
    for folder in sorted(Path(args.workdir, "engines").iterdir()):
        manifest = json.loads((folder / "build.json").read_text())
        if manifest.get("target") != "cpu":
            continue
        engine = co.load_engine(folder)
        deployed = manifest["artifacts"]["openvino_model" if manifest["backend"] == "openvino" else "model"]
        rows[folder.name] = {"precision": manifest["precision"], "runtime": manifest["backend"], "deployed": deployed,
                             "bytes": (folder / deployed).stat().st_size,
                             "nme_percent": manifest["accuracy"]["quantized_value"]}
        runners[folder.name] = engine.runner
        other = {"openvino": ("onnxruntime", "model", lambda: OnnxRuntimeRunner(folder)),
                 "onnxruntime": ("openvino", "openvino_model", lambda: OpenVinoRunner(folder / "openvino.json"))}
        runtime, artifact, make = other[manifest["backend"]]
        if (folder / manifest["artifacts"].get(artifact, "-")).is_file() and (runtime != "openvino" or openvino_version()):
            name = f"{folder.name}@{runtime}"
            rows[name] = {"precision": manifest["precision"], "runtime": runtime,
                          "deployed": manifest["artifacts"][artifact],
                          "bytes": (folder / manifest["artifacts"][artifact]).stat().st_size}
            runners[name] = make()
    timed = time_in_blocks(runners, verification_batch(1), args.runs, args.rounds)
    for name, t in timed.items():
        rows[name]["median_ms"] = round(t.median_ms, 3)
        rows[name]["round_ms"] = [round(ms, 3) for ms in t.round_ms]
    baseline = args.baseline or next(n for n, r in rows.items() if r["precision"] == "int8" and "@" not in n)
    for row in rows.values():
        row["bytes_vs_baseline"] = round(row["bytes"] / rows[baseline]["bytes"], 3)
        row["ms_vs_baseline"] = round(row["median_ms"] / rows[baseline]["median_ms"], 3)
    result = {"command": f"python bench/bench_deployed_cpu.py --workdir {args.workdir} --out {args.out} "
                         f"--runs {args.runs} --rounds {args.rounds}",
              "machine": {"cpu_model": cpu_model(), "int8_isa": cpu_int8_isa(), "bf16_isa": cpu_bf16_isa(),
                          "platform": platform.platform(), "onnxruntime": onnxruntime.__version__,
                          "openvino": openvino_version()},
              "timing": f"batch 1, each engine in blocks of its own: 2 warm-up + {args.runs} runs, {args.rounds} "
                        "rounds alternating order; median over all timed runs",
              "baseline": baseline, "engines": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
