"""CPU INT8 integer form before and after issue 15, against FP32, on ONNX Runtime's CPU.

For each model ("embedded", the trained default, or a checkpoint such as the authors' N=8
face model prepared by bench/prepare_checkpoint.py), made as `build --precision int8
--target cpu` makes it (percentile PTQ after activation equalization on synthetic faces,
export, the clean-up passes, integer_dataflow), the forms:

- fp32 concat / fp32 folded: the two float forms `build` times (pipeline/autotune.py, choose_concat_form);
- int8 depthwise: integer_dataflow as before (each sink BN -> ReLU a depthwise QLinearConv);
- int8 clamp: relu_form "clamp" (a uint8 Max/Min threshold folded into the next 1x1 conv);

each at 1 and 2 intra-op threads, and at 2 threads also with the thread pool's spinning off
(session.intra_op.allow_spinning=0). All sessions (ORT_ENABLE_ALL, batch 1, one synthetic
face not calibrated on) alternate run by run in one process, so machine load hits them
alike; medians and p10 of --runs runs. Node counts: the ONNX graph and what ONNX Runtime
runs after its fusions. Writes JSON with the CPU model, its int8 ISA and the load average.

    python bench/bench_int8_cpu.py --models embedded /work/scratch/n8.safetensors --runs 30 \
        --out bench/results/int8_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from cunet_optimize.atomic import write_atomic

CLEANUP = ["cleanup", "flatten_nested_concats", "fold_batchnorm"]
CALIBRATION_IMAGES = 32


def make_forms(spec: str, tmp: Path) -> dict[str, Path]:
    import onnx
    import torch

    from cunet_optimize import load_model
    from cunet_optimize.quant.policy import DEFAULT_EQUALIZE_ALPHA
    from cunet_optimize.exporters import export_onnx
    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.quant import parse_precision, post_training_quantize
    from cunet_optimize.surgery import run_surgery

    model = (load_model() if spec == "embedded" else load_model(Path(spec))).eval()
    calib = torch.from_numpy(verification_batch(CALIBRATION_IMAGES + 1)[1:])
    qmodel, _, _ = post_training_quantize(model, parse_precision("int8-convin"), calib.split(8), "percentile",
                                          DEFAULT_EQUALIZE_ALPHA, progress=False)
    export_onnx(model, tmp / "fp32.onnx", verify=False)
    export_onnx(qmodel.eval(), tmp / "int8.onnx", verify=False)
    concat = run_surgery(onnx.load(tmp / "fp32.onnx"), CLEANUP, verify=False).model
    folded = run_surgery(concat, ["fold_dense_concats", "fold_batchnorm"], verify=False).model
    qdq = run_surgery(onnx.load(tmp / "int8.onnx"), CLEANUP + ["remove_redundant_qdq"], verify=False).model
    models = {"fp32 concat": concat, "fp32 folded": folded}
    for form in ("depthwise", "clamp"):
        options = {"integer_dataflow": {"calibration": calib.numpy(), "relu_form": form}}
        models[f"int8 {form}"] = run_surgery(qdq, ["integer_dataflow"], verify=False, pass_options=options).model
    paths = {}
    for name, m in models.items():
        paths[name] = tmp / f"{name.replace(' ', '-')}.onnx"
        onnx.save(m, paths[name])
    return paths


def ort_nodes(path: Path, tmp: Path) -> dict:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(tmp / "optimized.onnx").graph.node)
    return {"onnx_nodes": len(onnx.load(path).graph.node), "ort_nodes": sum(ops.values()), "ort_op_counts": dict(ops)}


def bench(spec: str, runs: int) -> dict:
    import onnxruntime as ort

    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.onnx_tools.verify import time_sessions

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_forms(spec, Path(tmp))
        nodes = {name: ort_nodes(p, Path(tmp)) for name, p in paths.items()}
        sessions = {}
        for name, path in paths.items():
            for threads, pool in ((1, "spin"), (2, "spin"), (2, "nospin")):
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.log_severity_level = 3
                if pool == "nospin":
                    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sessions[f"{name} x{threads} {pool}"] = ort.InferenceSession(str(path), so,
                                                                               providers=["CPUExecutionProvider"])
    feed = {"image": verification_batch(1)}
    load = [os.getloadavg()[0]]
    times = time_sessions(sessions, feed, runs, warmup=2)
    load.append(os.getloadavg()[0])
    latency = {k: {"median": round(float(np.median(t)), 2), "p10": round(float(np.percentile(t, 10)), 2)}
               for k, t in times.items()}
    best = {}
    for stat in ("median", "p10"):
        fp32 = min(v[stat] for k, v in latency.items() if k.startswith("fp32"))
        best[stat] = {form: round(min(v[stat] for k, v in latency.items() if k.startswith(form)) / fp32, 3)
                      for form in ("int8 depthwise", "int8 clamp")}
    return {"model": spec, "nodes": nodes, "latency_ms": latency, "best_int8_over_best_fp32": best,
            "load_average_1min_start_end": load}


def main() -> None:
    from cunet_optimize.engines.cpu_isa import cpu_int8_isa, cpu_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["embedded"])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default="bench/results/int8_cpu.json")
    args = ap.parse_args()
    import onnxruntime as ort

    results = {
        "benchmark": "CPU INT8 integer form (depthwise = before, clamp = after) vs FP32, ONNX Runtime",
        "machine": {"cpu": cpu_model(), "int8_isa": cpu_int8_isa(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform()},
        "onnxruntime": ort.__version__,
        "settings": {"batch": 1, "graph_optimization_level": "ORT_ENABLE_ALL", "runs": args.runs,
                     "order": "all sessions alternate run by run"},
        "models": [bench(spec, args.runs) for spec in args.models],
    }
    write_atomic(args.out, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
