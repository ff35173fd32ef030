"""Per-layer time of an ONNX Runtime build, from ONNX Runtime's own profiler.

A session made with SessionOptions.enable_profiling writes a Chrome-trace JSON: one
"Session" event per run ("model_run") and, per node and run, a "Node" event named
"<node>_kernel_time" with `dur` in microseconds and `args.op_name`. The
`summarize_ort_trace` half is pure (tested on hand-made traces): it drops the warm-up
runs, then totals kernel time per op type and per node, per run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from cunet_optimize.engines.onnxrt import OnnxRuntimeRunner, session_options
from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.verify import open_session
from cunet_optimize.profiling.latency import example_batch

KERNEL_SUFFIX = "_kernel_time"
TOP_N = 15


def summarize_ort_trace(events: list[dict], warmup_runs: int = 0, top: int = TOP_N) -> dict:
    """Kernel time per op type and per node, in ms per run, of the runs after `warmup_runs`."""
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs = len(run_starts) - warmup_runs
    if runs < 1:
        raise CUNetError(
            f"ONNX Runtime trace holds {len(run_starts)} runs, {warmup_runs} of them warm-up: nothing to summarise"
        )
    since = run_starts[warmup_runs]
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    node_op: dict[str, str] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX) or e.get("ts", 0) < since:
            continue
        node = name[: -len(KERNEL_SUFFIX)]
        op = (e.get("args") or {}).get("op_name", "?")
        by_op[op] += e.get("dur", 0) / 1000.0
        by_node[node] += e.get("dur", 0) / 1000.0
        node_op[node] = op
    total = sum(by_op.values())
    # model_run spans the whole run: what exceeds the kernels is the executor and the thread
    # pool's synchronisation between nodes (many small nodes: a large share)
    run_ms = sum(e.get("dur", 0) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
                 and e.get("ts", 0) >= since) / 1000.0
    nodes_per_op: dict[str, int] = defaultdict(int)
    for node, op in node_op.items():
        nodes_per_op[op] += 1

    def share(ms: float) -> float:
        return 100.0 * ms / total if total > 0 else 0.0

    op_rows = sorted(by_op.items(), key=lambda kv: -kv[1])
    node_rows = sorted(by_node.items(), key=lambda kv: -kv[1])
    return {
        "source": "ONNX Runtime profiler (SessionOptions.enable_profiling), kernel time",
        "runs": runs,
        "nodes": len(by_node),
        "total_ms_per_run": total / runs,
        "run_ms_per_run": run_ms / runs,
        "outside_kernels_ms_per_run": max(0.0, run_ms - total) / runs,
        "by_op_type": [
            {"op_type": op, "nodes": nodes_per_op[op], "ms_per_run": ms / runs, "percent": share(ms)}
            for op, ms in op_rows[:top]
        ],
        "top_nodes": [
            {"node": node, "op_type": node_op[node], "ms_per_run": ms / runs, "percent": share(ms)}
            for node, ms in node_rows[:top]
        ],
    }


def ort_layer_times(session_json: str | os.PathLike, batch_size: int = 1, runs: int = 10,
                    warmup: int = 2, top: int = TOP_N) -> dict:
    """Profile an ONNX Runtime build (its session.json or folder) with its own settings."""
    runner = OnnxRuntimeRunner(session_json)  # reads and checks session.json; no session yet
    tmp = Path(tempfile.mkdtemp(prefix="cunet-ort-profile-"))
    try:
        so = session_options(runner.settings, runner.load_optimization)
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp / "trace")
        session = open_session(runner.model_path, so)
        image = session.get_inputs()[0]
        dtype = np.float16 if image.type == "tensor(float16)" else np.float32
        feed = {image.name: example_batch(batch_size).astype(dtype)}
        for _ in range(warmup + runs):
            session.run(None, feed)
        trace = Path(session.end_profiling())
        if not trace.is_absolute():
            trace = Path.cwd() / trace
        events = json.loads(trace.read_text())
        trace.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = summarize_ort_trace(events, warmup_runs=warmup, top=top)
    out["batch_size"] = batch_size
    return out


def ort_thread_scaling(session_json: str | os.PathLike, runs: int = 10) -> dict:
    """Batch-1 median latency of an ONNX Runtime build at 1, 2, 4, ... up to all usable cores,
    with its other settings (each thread count timed in a block of its own); the build's own count is marked."""
    from cunet_optimize.engines.onnxrt import thread_candidates, time_variants

    runner = OnnxRuntimeRunner(session_json)
    threads = thread_candidates()
    timed = time_variants({"model": runner.model_path}, runner.settings, threads, level=runner.load_optimization,
                          runs=runs)
    ms = {n: t for (_, n), t in timed.items()}
    return {"median_ms_batch1": {str(n): round(t, 3) for n, t in ms.items()},
            "speedup_vs_1_thread": {str(n): round(ms[1] / t, 3) for n, t in ms.items()},
            "build_threads": runner.settings.intra_op_threads, "runs": runs}
