"""Served vs in-process latency and throughput of a CPU build, at concurrency 1 and 8.

The measuring is the package's (serving/served_latency.py), which `profile --serve` runs too:
in-process, the build's ONNX Runtime engine from N threads; served, `cunet-optimize serve`'s
Triton measured by perf_analyzer over HTTP and gRPC, one image per request, with the server's
executions by batch size.

    python bench/bench_serve.py ENGINE_DIR [--seconds 5] --out bench/results/serve_embedded_int8_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def main() -> None:
    from cunet_optimize.serving.served_latency import served_latency
    from cunet_optimize.serving.server_env import ensure_server_env

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine_dir")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    build_dir = Path(args.engine_dir)
    measured = served_latency(build_dir, ensure_server_env(), args.seconds)
    result = {"bench": "bench/bench_serve.py", "build": build_dir.name, "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "triton": measured["triton"],
              "image_batch": measured["image_batch"], "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
              "rows": measured["rows"]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'runner':32} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'infer/s':>8}  batches")
    for r in result["rows"]:
        print(f"{r['runner']:32} {r['concurrency']:>4} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['throughput_infer_per_s']:8.1f}  {r.get('executions_by_batch_size', '')}")


if __name__ == "__main__":
    main()
