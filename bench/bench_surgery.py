"""Dense concatenations kept vs folded: graph size, memory and ONNX Runtime CPU latency.

For each model (random init, eval mode): export FP32 with the TorchScript exporter
(timed), then two surgery pipelines: "concat" (cleanup, flatten_nested_concats,
fold_batchnorm: form 1/2 of docs/QUANT_RULES.md, the Concats stay) and "folded" (the
same plus fold_dense_concats: form 3). For each form: node and Concat counts, bytes
of Concat outputs and estimated peak activation memory at batch 1 (surgery.memory),
and ONNX Runtime CPU latency (ORT_ENABLE_ALL, intra_op_num_threads=2, batch 1,
warm-up, then the two forms alternate run by run so machine load hits both alike;
median and p90 of --runs runs). Both forms are checked against the exported graph
in ONNX Runtime (ORT_DISABLE_ALL) before timing.

    python bench/bench_surgery.py [--models cunet-face-small cunet-face-n8k1] [--runs 25]
                                  [--out bench/results/surgery.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

FORMS = {
    "concat": ["cleanup", "flatten_nested_concats", "fold_batchnorm"],
    "folded": ["cleanup", "flatten_nested_concats", "fold_batchnorm", "fold_dense_concats", "fold_batchnorm"],
}


def bench_model(name: str, runs: int, warmup: int, threads: int) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    from cunet_optimize import load_model
    from cunet_optimize.export import compare_outputs, export_onnx, make_session
    from cunet_optimize.export.verify import random_feeds, run_onnxruntime
    from cunet_optimize.surgery import activation_memory, run_surgery

    torch.manual_seed(0)
    model = load_model(name).eval()
    out: dict = {"model": name, "config": model.config.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        summary = export_onnx(model, path)
        out["export"] = {
            "exporter": "torch.onnx.export(dynamo=False) + onnx-graphsurgeon clean-up",
            "torch_export_seconds": summary.torch_export_seconds,
            "total_seconds_with_verification": summary.total_seconds,
            "nodes": summary.num_nodes,
            "op_counts": summary.op_counts,
            "size_mb": round(summary.size_bytes / 1e6, 2),
        }
        exported = onnx.load(str(path))
    feeds = random_feeds(exported, batch=1)
    reference = run_onnxruntime(exported, feeds, "disable_all")
    forms, sessions = {}, {}
    for form, passes in FORMS.items():
        start = time.perf_counter()
        result = run_surgery(exported, passes, verify=False)
        seconds = time.perf_counter() - start
        check = compare_outputs(run_onnxruntime(result.model, feeds, "disable_all"), reference, "fp32",
                                runtime="onnxruntime CPU ORT_DISABLE_ALL", reference_name="the exported graph")
        check.raise_on_failure(f"bench {name} {form}")
        mem = activation_memory(result.model, batch=1)
        forms[form] = {
            "passes": passes,
            "surgery_seconds": round(seconds, 2),
            "nodes": len(result.model.graph.node),
            "concats": mem["concat_count"],
            "concat_output_mb": round(mem["concat_output_bytes"] / 1e6, 2),
            "total_node_output_mb": round(mem["total_node_output_bytes"] / 1e6, 2),
            "peak_activation_mb": round(mem["peak_bytes"] / 1e6, 2),
            "peak_nodes": mem["peak_nodes"][:3],
            "max_abs_error_vs_export": max(o.max_abs_error for o in check.outputs),
        }
        sessions[form] = make_session(result.model, "all", intra_op_num_threads=threads)
    times = {form: [] for form in FORMS}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feeds)
    for _ in range(runs):
        for form, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[form].append(time.perf_counter() - start)
    for form in FORMS:
        t = np.array(times[form]) * 1e3
        forms[form]["ort_cpu_latency_ms"] = {"median": round(float(np.median(t)), 2), "p90": round(float(np.percentile(t, 90)), 2),
                                             "runs": runs}
    out["forms"] = forms
    faster = min(FORMS, key=lambda f: forms[f]["ort_cpu_latency_ms"]["median"])
    out["ort_cpu_faster_form"] = faster
    out["onnxruntime"] = ort.__version__
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cunet-face-small", "cunet-face-n8k1"])
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/surgery.json")
    args = ap.parse_args()
    results = {
        "benchmark": "surgery: dense concatenations kept vs folded",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "settings": {"batch": 1, "graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": args.threads,
                     "warmup": args.warmup, "runs": args.runs},
        "models": [bench_model(name, args.runs, args.warmup, args.threads) for name in args.models],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
