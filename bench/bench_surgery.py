"""Graph surgery before and after, FP32 and INT8: size, memory and ONNX Runtime CPU latency.

For each model: the embedded default ("embedded", trained) or a registered
configuration with random weights whose BatchNorm statistics are re-estimated on
synthetic faces (random init without that leaves activations so small that FP32
runs into denormal numbers and times 5-7x slower than a trained network: such timings
say nothing). Then:

- FP32, exported with the TorchScript exporter (timed), in three forms: "export" (as
  exported), "concat" (cleanup, flatten_nested_concats, fold_batchnorm: the Concats
  stay) and "folded" (plus fold_dense_concats: never materialised).
- INT8 as `build --precision int8 --target cpu` makes it (percentile PTQ after
  activation equalization on synthetic faces, Q/DQ on conv inputs), in two forms:
  "qdq" (the exported Q/DQ graph after the clean-up passes: TensorRT's form) and
  "integer" (plus integer_dataflow: the CPU engine's form).

For each form: node and Concat counts, bytes of Concat outputs and estimated peak
activation memory at batch 1 (surgery.memory, costed with the fusions TensorRT and ONNX
Runtime make: conv epilogues, Q/DQ chains as integer kernels), and ONNX Runtime CPU latency
(ORT_ENABLE_ALL, --threads intra-op threads, batch 1, one synthetic face, warm-up,
then all forms alternate run by run so machine load hits them alike; median and p90
of --runs runs). Every FP32 form is checked against the export in ONNX Runtime
(ORT_DISABLE_ALL) before timing; INT8 forms report their mean error against it.

    python bench/bench_surgery.py [--models embedded cunet-face-n8k1] [--runs 25]
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

from cunet_optimize.atomic import write_atomic

CLEANUP = ["cleanup", "flatten_nested_concats", "fold_batchnorm"]
FORMS = {
    ("fp32", "export"): [],
    ("fp32", "concat"): CLEANUP,
    ("fp32", "folded"): CLEANUP + ["fold_dense_concats", "fold_batchnorm"],
    ("int8", "qdq"): CLEANUP + ["remove_redundant_qdq"],
    ("int8", "integer"): CLEANUP + ["remove_redundant_qdq", "integer_dataflow"],
}
CALIBRATION_IMAGES = 32


def prepare_model(name: str):
    """The network to time: trained weights, or random ones with re-estimated BN statistics."""
    import torch

    from cunet_optimize import load_model
    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.models.batchnorm import reestimate_batchnorm

    if name == "embedded":
        return load_model().eval()
    torch.manual_seed(0)
    return reestimate_batchnorm(load_model(name), verification_batch(16))


def bench_model(name: str, runs: int, warmup: int, threads: int) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.exporters import export_onnx
    from cunet_optimize.onnx_tools.verify import compare_outputs, make_session, run_onnxruntime, time_sessions
    from cunet_optimize.quant import parse_precision, post_training_quantize
    from cunet_optimize.quant.policy import DEFAULT_EQUALIZE_ALPHA
    from cunet_optimize.surgery import activation_memory, run_surgery

    model = prepare_model(name)
    out: dict = {"model": name, "config": model.config.to_dict()}
    calib = torch.from_numpy(verification_batch(CALIBRATION_IMAGES + 1)[1:])
    qmodel, _, _ = post_training_quantize(model, parse_precision("int8-convin"), calib.split(8), "percentile",
                                          DEFAULT_EQUALIZE_ALPHA, progress=False)
    exported = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision, network in (("fp32", model), ("int8", qmodel.eval())):
            path = Path(tmp) / f"{name}-{precision}.onnx"
            # random networks are chaotic in float rounding: verified by the form checks below instead
            summary = export_onnx(network, path, verify=name == "embedded")
            out[f"export_{precision}"] = {
                "exporter": "torch.onnx.export(dynamo=False) + onnx-graphsurgeon clean-up",
                "torch_export_seconds": summary.torch_export_seconds,
                "total_seconds_with_verification": summary.total_seconds,
                "nodes": summary.num_nodes,
                "op_counts": summary.op_counts,
                "size_mb": round(summary.size_bytes / 1e6, 2),
            }
            exported[precision] = onnx.load(str(path))
    feeds = {"image": verification_batch(1)}  # a synthetic face, not calibrated on
    reference = run_onnxruntime(exported["fp32"], feeds, "disable_all")
    forms, sessions = {}, {}
    for (precision, form), passes in FORMS.items():
        start = time.perf_counter()
        result = run_surgery(exported[precision], passes, verify=False,
                             pass_options={"integer_dataflow": {"calibration": calib.numpy()}})
        seconds = time.perf_counter() - start
        check = compare_outputs(run_onnxruntime(result.model, feeds, "disable_all"), reference,
                                "fp32" if precision == "fp32" else "fake_quant",
                                runtime="onnxruntime CPU ORT_DISABLE_ALL", reference_name="the FP32 export")
        # An exact pass may move a random network's outputs by float rounding (chaotic, see
        # export_onnx); a wiring error moves them by the order of their std.
        worst = max(o.mean_abs_error / o.reference_std for o in check.outputs)
        if precision == "fp32" and (worst > 1e-3 if name != "embedded" else not check.passed):
            raise SystemExit(f"bench {name} {form}: mean error {worst:.2g} x std against the export: a wrong graph")
        mem = activation_memory(result.model, batch=1)
        forms[f"{precision} {form}"] = {
            "passes": passes,
            "surgery_seconds": round(seconds, 2),
            "nodes": len(result.model.graph.node),
            "concats": mem["concat_count"],
            "concat_output_mb": round(mem["concat_output_bytes"] / 1e6, 2),
            "total_node_output_mb": round(mem["total_node_output_bytes"] / 1e6, 2),
            "peak_activation_mb": round(mem["peak_bytes"] / 1e6, 2),
            "peak_nodes": mem["peak_nodes"][:3],
            "max_abs_error_vs_fp32_export": max(o.max_abs_error for o in check.outputs),
            "mean_abs_error_vs_fp32_export_per_std": round(max(o.mean_abs_error / o.reference_std
                                                                 for o in check.outputs), 4),
        }
        sessions[f"{precision} {form}"] = make_session(result.model, "all", intra_op_num_threads=threads)
    times = time_sessions(sessions, feeds, runs, warmup=warmup)
    for form in sessions:
        t = np.array(times[form])
        forms[form]["ort_cpu_latency_ms"] = {"median": round(float(np.median(t)), 2), "p90": round(float(np.percentile(t, 90)), 2),
                                             "runs": runs}
    out["forms"] = forms
    median = {form: forms[form]["ort_cpu_latency_ms"]["median"] for form in forms}
    fp32 = min(median["fp32 concat"], median["fp32 folded"])
    out["ort_cpu_faster_fp32_form"] = "folded" if median["fp32 folded"] < median["fp32 concat"] else "concat"
    out["int8_latency_vs_best_fp32"] = {form: round(median[form] / fp32, 3) for form in ("int8 qdq", "int8 integer")}
    out["onnxruntime"] = ort.__version__
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["embedded", "cunet-face-n8k1"],
                    help="'embedded' (the trained default model) or registered configuration names")
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/surgery.json")
    args = ap.parse_args()
    models = []
    for name in args.models:
        load = os.getloadavg()[0]  # timings on a shared machine mean little without it
        models.append(bench_model(name, args.runs, args.warmup, args.threads))
        models[-1]["load_average_1min_start_end"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    results = {
        "benchmark": "surgery: FP32 and INT8 graphs before and after, ONNX Runtime CPU",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "settings": {"batch": 1, "graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": args.threads,
                     "warmup": args.warmup, "runs": args.runs},
        "models": models,
    }
    write_atomic(args.out, json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
