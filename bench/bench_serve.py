"""Served vs in-process latency and throughput of a CPU build, at concurrency 1 and 8.

In-process: the build's ONNX Runtime engine (OnnxRuntimeRunner), one image per call, from
N threads sharing the session. Served: `cunet-optimize serve`'s Triton (Python backend running
the same engine) measured by perf_analyzer (from the tritonclient 2.51 wheel in the server's
environment) over HTTP and gRPC, one image per request; then the server's batch statistics,
which show the dynamic batcher at work under concurrency.

    python bench/bench_serve.py ENGINE_DIR [--seconds 5] --out bench/results/serve_embedded_int8_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CONCURRENCY = (1, 8)


def in_process(build_dir: Path, concurrency: int, seconds: float) -> dict:
    from cunet_optimize.engines.onnxrt import OnnxRuntimeRunner

    image = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    latencies: list[float] = []
    with OnnxRuntimeRunner(build_dir) as runner:
        for _ in range(5):
            runner.infer(image)  # warm-up
        stop = time.perf_counter() + seconds

        def worker():
            while time.perf_counter() < stop:
                t = time.perf_counter()
                runner.infer(image)
                latencies.append(time.perf_counter() - t)

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "throughput_infer_per_s": len(ms) / elapsed, "requests": len(ms)}


def perf_analyzer(env, server, model: str, protocol: str, concurrency: int, seconds: float) -> dict:
    url = server.http_url.removeprefix("http://") if protocol == "http" else server.grpc_url
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        environ = dict(os.environ, LD_LIBRARY_PATH=env.library_path)
        done = subprocess.run([str(env.perf_analyzer), "-m", model, "-u", url, "-i", protocol, "-b", "1",
                               f"--concurrency-range={concurrency}", f"--measurement-interval={int(seconds * 1000)}",
                               "--stability-percentage=50", "--max-trials=6", "-f", str(out)], capture_output=True, text=True, env=environ)
        if done.returncode:
            raise RuntimeError(f"perf_analyzer failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        row = next(csv.DictReader(out.open()))
    return {"p50_ms": float(row["p50 latency"]) / 1e3, "p99_ms": float(row["p99 latency"]) / 1e3,
            "throughput_infer_per_s": float(row["Inferences/Second"]),
            "server_queue_ms": float(row["Server Queue"]) / 1e3,
            "server_compute_ms": float(row["Server Compute Infer"]) / 1e3}


def main() -> None:
    from cunet_optimize.serving.server import TritonServer, batch_histogram, check_servable, write_served_repository
    from cunet_optimize.serving.server_env import TRITON_VERSION, ensure_server_env

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine_dir")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    build_dir = Path(args.engine_dir)
    result = {"bench": "bench/bench_serve.py", "build": build_dir.name, "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "triton": TRITON_VERSION, "image_batch": 1,
              "note": "2-core shared CPU; indicative", "rows": []}
    for c in CONCURRENCY:
        result["rows"].append({"runner": "in-process ONNX Runtime", "concurrency": c,
                               **in_process(build_dir, c, args.seconds)})
    env = ensure_server_env()
    build = check_servable(build_dir)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        write_served_repository([build], env, repo)
        with TritonServer(env, [repo], [build[0].name], log_path=Path(tmp) / "log") as server:
            for protocol in ("http", "grpc"):
                for c in CONCURRENCY:
                    before = batch_histogram(server.stats(build[0].name))
                    row = perf_analyzer(env, server, build[0].name, protocol, c, args.seconds)
                    after = batch_histogram(server.stats(build[0].name))
                    row["executions_by_batch_size"] = {b: n - before.get(b, 0) for b, n in sorted(after.items())
                                                       if n - before.get(b, 0)}
                    result["rows"].append({"runner": f"Triton {protocol} (perf_analyzer)", "concurrency": c, **row})
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'runner':32} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'infer/s':>8}  batches")
    for r in result["rows"]:
        print(f"{r['runner']:32} {r['concurrency']:>4} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['throughput_infer_per_s']:8.1f}  {r.get('executions_by_batch_size', '')}")


if __name__ == "__main__":
    main()
