"""The two torch.onnx exporters side by side: TorchScript ("legacy") against torch.export ("dynamo").

For each model (the embedded default, or a checkpoint path such as the authors' N=8 face
model) in FP32 and in INT8 fake quantization (the scheme `build --precision int8
--target cpu` quantizes with: percentile PTQ after activation equalization, on synthetic
faces), each exporter runs `export_onnx` --repeats times, the exporters alternating
call by call in one process so machine load hits them alike. Recorded per exporter:
- the exporter's own seconds (torch_export_seconds: trace + convert, our clean-up
  excluded), every repeat, and their median;
- ONNX node counts: as the exporter wrote them, after export_onnx's clean-up, and after
  the surgery pipeline's clean-up passes (cleanup, flatten_nested_concats,
  fold_batchnorm, and remove_redundant_qdq for INT8);
- the verification of the first repeat (verify.py: error against PyTorch, the noise it
  is judged against, their ratio; the fake-quant wiring check for INT8).
And whether the two exporters' graphs match after each clean-up: same op multiset, same
Q/DQ placement (exporters/same_graph.py), and node for node the same structure.

    python bench/bench_exporters.py [--models embedded /work/scratch/n8.safetensors]
                                    [--repeats 2] [--out bench/results/exporters.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from cunet_optimize.atomic import write_atomic

CALIBRATION_IMAGES = 32
EXPORTERS = ("legacy", "dynamo")


def load(name: str):
    from cunet_optimize import load_model

    return (load_model() if name == "embedded" else load_model(Path(name))).eval()


def int8_model(model):
    import torch

    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.quant import post_training_quantize
    from cunet_optimize.quant.policy import DEFAULT_EQUALIZE_ALPHA, quant_scheme

    # the verification images are faces 0..B-1: calibrate on others
    calib = torch.from_numpy(verification_batch(CALIBRATION_IMAGES + 2)[2:])
    qmodel, _, _ = post_training_quantize(model, quant_scheme("int8", None, "onnxruntime"), calib.split(8),
                                          "percentile", DEFAULT_EQUALIZE_ALPHA, progress=False)
    return qmodel.eval()


def verification_summary(check: dict) -> dict:
    stat = check["tolerance"].split(" ")[0]
    out = {"statistic": stat, "passed": check["passed"], "outputs": {}}
    for o in check["outputs"]:
        out["outputs"][o["name"]] = {"error": o[stat], "noise": o["noise"], "allowed": o["allowed"],
                                     "error_per_noise": round(o[stat] / o["noise"], 4) if o["noise"] else None}
    if check.get("wiring"):
        out["wiring"] = verification_summary(check["wiring"])
    return out


def compare(a, b) -> dict:
    from cunet_optimize.exporters.same_graph import op_multiset, qdq_placement, structural_difference

    ops_a, ops_b = op_multiset(a), op_multiset(b)
    placement_a, placement_b = qdq_placement(a), qdq_placement(b)
    return {
        "same_op_multiset": ops_a == ops_b,
        "op_multiset_difference": {op: [ops_a.get(op, 0), ops_b.get(op, 0)] for op in sorted({*ops_a, *ops_b})
                                   if ops_a.get(op, 0) != ops_b.get(op, 0)},
        "same_qdq_placement": placement_a == placement_b,
        "qdq_nodes": len(placement_a),
        "structural_difference": structural_difference(a, b),
        "structural_difference_constants_within_4_eps": structural_difference(a, b, eps=4),
    }


def bench_case(name: str, precision: str, model, repeats: int, tmp: Path) -> dict:
    import onnx

    from cunet_optimize.exporters import export_onnx
    from cunet_optimize.surgery import run_surgery

    passes = ["cleanup", "flatten_nested_concats", "fold_batchnorm"]
    passes += ["remove_redundant_qdq"] if precision == "int8" else []
    runs: dict = {exporter: [] for exporter in EXPORTERS}
    graphs: dict = {}
    for repeat in range(repeats):
        for exporter in EXPORTERS:
            path = tmp / f"{precision}-{exporter}-{repeat}.onnx"
            summary = export_onnx(model, path, exporter=exporter, verify=repeat == 0)
            runs[exporter].append(summary)
            if repeat == 0:
                exported = onnx.load(str(path))
                graphs[exporter] = (exported, run_surgery(exported, passes, verify=False).model)
    out: dict = {"model": name, "precision": precision, "surgery_cleanup_passes": passes, "exporters": {}}
    for exporter, summaries in runs.items():
        first = summaries[0]
        seconds = [s.torch_export_seconds for s in summaries]
        out["exporters"][exporter] = {
            "torch_export_seconds": seconds,
            "torch_export_seconds_median": round(statistics.median(seconds), 3),
            "nodes_raw": first.raw_nodes,
            "nodes_after_export_cleanup": first.num_nodes,
            "nodes_after_surgery_cleanup": len(graphs[exporter][1].graph.node),
            "op_counts": first.op_counts,
            "verification": verification_summary(first.verification),
        }
    legacy, dynamo = (out["exporters"][e]["torch_export_seconds_median"] for e in EXPORTERS)
    out["dynamo_over_legacy_export_time"] = round(dynamo / legacy, 2)
    out["match_after_export_cleanup"] = compare(graphs["legacy"][0], graphs["dynamo"][0])
    out["match_after_surgery_cleanup"] = compare(graphs["legacy"][1], graphs["dynamo"][1])
    print(json.dumps({k: out[k] for k in ("model", "precision", "dynamo_over_legacy_export_time")}), flush=True)
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["embedded"],
                    help="'embedded' (the trained default model) or checkpoint paths")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/exporters.json")
    args = ap.parse_args()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = load(name)
            for precision in args.precisions:
                network = model if precision == "fp32" else int8_model(model)
                cases.append(bench_case(name, precision, network, args.repeats, Path(tmp)))
    import onnx
    import onnxscript

    results = {
        "benchmark": "torch.onnx.export(dynamo=False) vs (dynamo=True), each followed by export_onnx's clean-up",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__},
        "settings": {"repeats": args.repeats, "order": "exporters alternate call by call",
                     "verification": "first repeat only"},
        "cases": cases,
    }
    write_atomic(args.out, json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
