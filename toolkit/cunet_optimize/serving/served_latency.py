"""Served vs in-process latency and throughput of a CPU build, at concurrency 1 and 8: what
`profile --serve` records beside its in-process runs and bench/bench_serve.py writes.

In-process: the build's ONNX Runtime engine (OnnxRuntimeRunner), one image per call, from N
threads sharing the session (one session, as the server has one instance). Served:
`cunet-optimize serve`'s Triton (the Python backend running the same engine) measured by
perf_analyzer (from the tritonclient 2.51 wheel in the server's environment) over HTTP and
gRPC, one image per request; each served row also holds the executions the server ran by
batch size during it, which show the dynamic batcher at work under concurrency.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cunet_optimize.errors import CUNetError
from cunet_optimize.serving.server_env import ENV_VARIABLE, TRITON_VERSION, ServerEnv, find_server_env

CONCURRENCY = (1, 8)
IN_PROCESS = "in-process ONNX Runtime"
PROTOCOLS = ("http", "grpc")


def served_runner(protocol: str) -> str:
    return f"Triton {protocol} (perf_analyzer)"


def require_server_env(what: str) -> ServerEnv:
    """The server environment, or CUNetError (one line) where it is absent: `what` measures
    nothing without it, and installing it is `serve`'s (it needs the package index)."""
    env = find_server_env()
    if env is None:
        raise CUNetError(f"{what}: the Triton server environment is absent; run `cunet-optimize serve ENGINE_DIR` "
                         f"once to create it (needs the package index) or point {ENV_VARIABLE} at one "
                         "(docs/SERVING.md)")
    return env


def in_process_latency(build_dir: str | os.PathLike, concurrency: int, seconds: float) -> dict:
    """p50/p99 ms and images/s of the engine run in this process by `concurrency` threads."""
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


# perf_analyzer reports once 3 windows in a row agree within this many percent (its default, 10,
# never settles on a 2-core machine that runs anything else: it then fails instead of measuring);
# the row records the spread it accepted through p50/p99, and the profile the machine's load.
STABILITY_PERCENT = 100
MAX_TRIALS = 10


def perf_analyzer_latency(env: ServerEnv, url: str, model: str, protocol: str, concurrency: int,
                          seconds: float) -> dict:
    """perf_analyzer's p50/p99 ms, inferences/s and the server's queue and compute ms."""
    with tempfile.TemporaryDirectory(prefix="cunet-pa-") as tmp:
        out = Path(tmp) / "pa.csv"
        environ = dict(os.environ, LD_LIBRARY_PATH=env.library_path)
        done = subprocess.run([str(env.perf_analyzer), "-m", model, "-u", url, "-i", protocol, "-b", "1",
                               f"--concurrency-range={concurrency}", f"--measurement-interval={int(seconds * 1000)}",
                               f"--stability-percentage={STABILITY_PERCENT}", f"--max-trials={MAX_TRIALS}",
                               "-f", str(out)],
                              capture_output=True, text=True, env=environ)
        if done.returncode:
            last = (done.stdout.strip().splitlines() or done.stderr.strip().splitlines() or ["?"])[-1]
            raise CUNetError(f"perf_analyzer on {model} ({protocol}, concurrency {concurrency}) failed: {last}")
        with out.open() as f:
            row = next(csv.DictReader(f))
    return {"p50_ms": float(row["p50 latency"]) / 1e3, "p99_ms": float(row["p99 latency"]) / 1e3,
            "throughput_infer_per_s": float(row["Inferences/Second"]),
            "server_queue_ms": float(row["Server Queue"]) / 1e3,
            "server_compute_ms": float(row["Server Compute Infer"]) / 1e3}


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the OS's choice), so a measurement never meets a running `serve`."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def served_latency(build_dir: str | os.PathLike, env: ServerEnv, seconds: float = 5.0,
                   concurrency: tuple[int, ...] = CONCURRENCY) -> dict:
    """{triton, image_batch, seconds, rows[]} for one CPU build: in-process rows at each
    concurrency, then Triton's over HTTP and gRPC at each, with the server's executions by
    batch size during each served row."""
    from cunet_optimize.serving.server import TritonServer, batch_histogram, check_servable, write_served_repository

    build = check_servable(build_dir)
    name = build[0].name
    rows = [{"runner": IN_PROCESS, "concurrency": c, **in_process_latency(build_dir, c, seconds)} for c in concurrency]
    http, grpc, metrics = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="cunet-served-") as tmp:
        repo = Path(tmp) / "repository"
        repo.mkdir()
        write_served_repository([build], env, repo)
        with TritonServer(env, [repo], [name], http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_path=Path(tmp) / "tritonserver.log") as server:
            for protocol in PROTOCOLS:
                url = server.http_url.removeprefix("http://") if protocol == "http" else server.grpc_url
                for c in concurrency:
                    before = batch_histogram(server.stats(name))
                    row = perf_analyzer_latency(env, url, name, protocol, c, seconds)
                    after = batch_histogram(server.stats(name))
                    row["executions_by_batch_size"] = {str(b): n - before.get(b, 0) for b, n in sorted(after.items())
                                                       if n - before.get(b, 0)}
                    rows.append({"runner": served_runner(protocol), "concurrency": c, **row})
    return {"triton": TRITON_VERSION, "image_batch": 1, "seconds": seconds, "rows": rows}
