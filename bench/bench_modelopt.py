"""NVIDIA ModelOpt ONNX INT8 PTQ on our FP32 export and our calibration images, its NME next to ours.

ModelOpt (nvidia-modelopt) lives in its own virtual environment (it pulls onnxruntime-gpu
and conflicts with our onnxruntime), so it runs as a subprocess of that environment's
Python: `python -m modelopt.onnx.quantization` on the FP32 ONNX that `export_onnx` writes,
calibrated on exactly the images our build calibrates on (stacked into one .npy), on the
CPU execution provider. Each ModelOpt ONNX and our FP32 ONNX are scored by ONNX Runtime
at ORT_DISABLE_ALL (exact Q/DQ semantics) on the test split, as the build's accuracy
gate does; the Q/DQ placement of each ModelOpt graph is described and linted.

    .venv/bin/python bench/bench_modelopt.py --modelopt-python /work/modelopt-venv/bin/python
        [--model CKPT] [--calib-data DIR [--calib-split train]] [--calib-images 128]
        [--methods entropy,max] [--test-images N] [--out bench/results/modelopt.json]

Without --calib-data: the embedded default set (calibration slice "calib", test split
"test", 300 images), as `cunet-optimize build` uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import numpy_helper

from cunet_optimize.data.default_set import ensure_default_dataset
from cunet_optimize.data.face300w import Face300W, FirstSamples
from cunet_optimize.engines.onnxrt import OnnxRuntimeReferenceRunner
from cunet_optimize.evaluation import evaluate_landmarks
from cunet_optimize.exporters import export_onnx
from cunet_optimize.models import load_model
from cunet_optimize.surgery import lint_model
from cunet_optimize.tasks import calibration_batches, default_calib_split

LINT_TARGETS = ("h100", "jetson-agx-orin")
VERSION_PROBE = (
    "import json, modelopt, onnx, onnxruntime; print(json.dumps({'modelopt': modelopt.__version__, "
    "'onnxruntime': onnxruntime.__version__, 'onnx': onnx.__version__}))"
)


# ----------------------------------------------------------------------------- ModelOpt subprocess


def child_affinity(threads: int):
    """preexec_fn pinning the ModelOpt process to `threads` CPUs: its calibration sessions take
    one ORT thread per core and offer no option to say otherwise."""
    cpus = sorted(os.sched_getaffinity(0))[:max(threads, 1)] if hasattr(os, "sched_getaffinity") else None
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def modelopt_versions(python: str) -> dict:
    proc = subprocess.run([python, "-c", VERSION_PROBE], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {python} cannot import modelopt ({error_line(proc.stderr)}); "
                 "pass --modelopt-python of a virtual environment with nvidia-modelopt installed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def error_line(text: str) -> str:
    """The one line that says what went wrong: the last exception line of a traceback, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Fail")) or head.startswith("onnxruntime"):
            return ln[:500]
    return lines[-1][:500] if lines else "no output"


def modelopt_command(python: str, fp32: Path, calib: Path, method: str, out: Path, high_precision: str) -> list[str]:
    return [python, "-m", "modelopt.onnx.quantization", "--onnx_path", str(fp32), "--quantize_mode", "int8",
            "--calibration_data_path", str(calib), "--calibration_method", method,
            "--calibration_eps", "cpu",  # default is cpu cuda:0 trt: this machine has no GPU
            "--high_precision_dtype", high_precision,  # default fp16 would cast the rest of the graph
            "--output_path", str(out)]


def run_modelopt(cmd: list[str], log_path: Path, threads: int, timeout: float | None) -> tuple[float, str | None]:
    """(wall seconds, None) or (wall seconds, one error line); the full log goes to `log_path`."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=child_affinity(threads))
    except subprocess.TimeoutExpired as exc:
        log_path.write_text(f"{exc.stdout or ''}\n{exc.stderr or ''}")
        return time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    log_path.write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        return seconds, f"exit code {proc.returncode}: {error_line(proc.stderr or proc.stdout)}"
    if not Path(cmd[cmd.index("--output_path") + 1]).is_file():
        return seconds, f"exit code 0 but no output ONNX written; see {log_path}"
    return seconds, None


# ----------------------------------------------------------------------------- graph description


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def describe_qdq(model: onnx.ModelProto) -> dict:
    """Where the Q/DQ nodes sit: which inputs of which ops are dequantized, and whether each
    Concat's inputs (and the Q of its output) share one scale."""
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    consts = constant_values(model)
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    ops = Counter(n.op_type for n in nodes)

    def dq_of(tensor: str):
        node = producer.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def is_weight_dq(dq) -> bool:  # DQ of a constant (stored int8, or Q of a float weight)
        src = dq.input[0]
        if src in consts:
            return True
        q = producer.get(src)
        return q is not None and q.op_type == "QuantizeLinear" and q.input[0] in consts

    def scale(node) -> np.ndarray | None:
        return consts.get(node.input[1])

    zero_points = [consts.get(n.input[2]) for n in nodes
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    zp_types = sorted({str(z.dtype) for z in zero_points if z is not None})
    nonzero_zp = sum(1 for z in zero_points if z is not None and np.any(z != 0))

    act_dq = [n for n in nodes if n.op_type == "DequantizeLinear" and not is_weight_dq(n)]
    weight_dq = [n for n in nodes if n.op_type == "DequantizeLinear" and is_weight_dq(n)]
    act_consumers = Counter(c.op_type for dq in act_dq for c in consumers.get(dq.output[0], []))
    q_after = Counter(producer[n.input[0]].op_type if n.input[0] in producer else "graph input"
                      for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] not in consts)

    convs = [n for n in nodes if n.op_type in ("Conv", "ConvTranspose")]
    conv_act_q = sum(1 for n in convs if dq_of(n.input[0]) is not None)
    conv_w_q = [dq_of(n.input[1]) for n in convs if dq_of(n.input[1]) is not None]
    weight_axes = Counter()
    for dq in conv_w_q:
        s = scale(dq)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        weight_axes["per-tensor" if s is None or s.size == 1 else f"per-channel axis {axis}"] += 1

    # Concat: ModelOpt quantizes the Concat *output* (the input of the BN after it) and ties any
    # Q/DQ'd input to that scale (its concat_elimination pass); float inputs (Conv, Resize) get
    # the output's Q moved onto them by TensorRT, so tying only concerns the DQ'd inputs.
    concats = [n for n in nodes if n.op_type == "Concat"]
    input_producers = Counter(producer[t].op_type if t in producer else "graph input"
                              for n in concats for t in n.input)
    with_dq, tied, output_q = 0, 0, 0
    for n in concats:
        out_qs = [c for c in consumers.get(n.output[0], []) if c.op_type == "QuantizeLinear"]
        output_q += bool(out_qs)
        dqs = [dq_of(t) for t in n.input if dq_of(t) is not None]
        if dqs:
            with_dq += 1
            scales = [scale(dq) for dq in dqs] + [consts.get(q.input[1]) for q in out_qs]
            tied += all(s is not None and np.array_equal(s, scales[0]) for s in scales)
    # MaxPool/Resize with Q/DQ on both sides: TensorRT needs one scale to keep them in INT8
    # without a requantization (QUANT_RULES.md).
    passthrough = Counter()
    for n in nodes:
        if n.op_type in ("MaxPool", "Resize") and dq_of(n.input[0]) is not None:
            out_qs = [c for c in consumers.get(n.output[0], []) if c.op_type == "QuantizeLinear"]
            if out_qs:
                same = all(np.array_equal(consts.get(q.input[1]), scale(dq_of(n.input[0]))) for q in out_qs)
                passthrough[f"{n.op_type} {'one scale' if same else 'different scales'} in/out"] += 1
    return {
        "nodes": len(nodes),
        "op_counts": dict(sorted(ops.items())),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "activation_dequantize_linear": len(act_dq),
        "weight_dequantize_linear": len(weight_dq),
        "zero_point_dtypes": zp_types,
        "nonzero_zero_points": nonzero_zp,
        "activation_dq_consumers": dict(sorted(act_consumers.items())),
        "activation_q_producers": dict(sorted(q_after.items())),
        "conv": len(convs),
        "conv_activation_inputs_quantized": conv_act_q,
        "conv_weights_quantized": len(conv_w_q),
        "conv_weight_scales": dict(weight_axes),
        "concat": len(concats),
        "concat_inputs": sum(input_producers.values()),
        "concat_input_producers": dict(sorted(input_producers.items())),
        "concats_with_q_on_output": output_q,
        "concats_with_dq_inputs": with_dq,
        "concats_dq_inputs_and_output_one_scale": tied,
        "pool_resize_qdq_both_sides": dict(sorted(passthrough.items())),
    }


def lint_counts(model: onnx.ModelProto) -> dict:
    out = {}
    for target in LINT_TARGETS:
        findings = lint_model(model, target)
        out[target] = {"findings": len(findings),
                       "by_rule": dict(sorted(Counter(f"{f.severity}:{f.rule}" for f in findings).items())),
                       "first": [str(f) for f in findings[:3]]}
    return out


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modelopt-python", required=True, help="python of the venv with nvidia-modelopt")
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument("--calib-data", default=None, help="300-W layout folder (default: the embedded set)")
    ap.add_argument("--calib-split", default=None, help="its list for calibration (default as build: train/calib)")
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--methods", default="entropy,max")
    ap.add_argument("--high-precision", default="fp32", choices=("fp32", "fp16"),
                    help="ModelOpt --high_precision_dtype of the unquantized ops (its default is fp16)")
    ap.add_argument("--test-images", type=int, default=None, help="first N test images (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch, ONNX Runtime and ModelOpt CPU threads")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per ModelOpt run")
    ap.add_argument("--workdir", default=None, help="keep the ONNX files, .npy and logs here (default: temp)")
    ap.add_argument("--out", default="bench/results/modelopt.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    versions = modelopt_versions(args.modelopt_python)

    root = Path(args.calib_data) if args.calib_data else ensure_default_dataset()
    calib_split = default_calib_split(args.calib_data, args.calib_split)
    calib_set = Face300W(root, split=calib_split)
    test = Face300W(root, split="test")
    if args.test_images:
        test = FirstSamples(test, args.test_images)

    with tempfile.TemporaryDirectory(prefix="bench-modelopt-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = load_model(args.model).eval()
        fp32 = work / "fp32.onnx"
        export_onnx(model, fp32)
        calib = np.concatenate([b.numpy().astype(np.float32) for b in calibration_batches(calib_set, args.calib_images)])
        calib_path = work / "calib.npy"
        np.save(calib_path, calib)
        print(f"exported {fp32}; calibration data {tuple(calib.shape)} from {root} split={calib_split}", flush=True)

        rows, graphs, commands = [], {}, {}

        def evaluate(name: str, onnx_path: Path, **extra) -> None:
            start = time.perf_counter()
            with OnnxRuntimeReferenceRunner(onnx_path, intra_op_threads=args.threads) as runner:
                metrics = evaluate_landmarks(runner.infer, test, progress=sys.stderr.isatty(),
                                             description=name).metrics
            row = {"variant": name, "nme_percent": round(metrics["nme_percent"], 4),
                   "fr_0.08_percent": round(metrics["failure_rate_0.08_percent"], 3),
                   "auc_0.08_percent": round(metrics["auc_0.08_percent"], 3), **extra,
                   "eval_seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)

        evaluate("fp32 (our export)", fp32, onnx_bytes=fp32.stat().st_size)
        for method in args.methods.split(","):
            out = work / f"modelopt_int8_{method}.onnx"
            cmd = modelopt_command(args.modelopt_python, fp32, calib_path, method, out, args.high_precision)
            commands[method] = shlex.join(cmd)
            seconds, error = run_modelopt(cmd, work / f"modelopt_int8_{method}.log", args.threads, args.timeout)
            name = f"modelopt int8 {method}"
            if error:
                row = {"variant": name, "error": error, "modelopt_seconds": round(seconds, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            qmodel = onnx.load(str(out))
            graphs[name] = {"qdq": describe_qdq(qmodel), "lint": lint_counts(qmodel)}
            evaluate(name, out, method=method, modelopt_seconds=round(seconds, 1), onnx_bytes=out.stat().st_size,
                     quantize_linear=graphs[name]["qdq"]["quantize_linear"],
                     dequantize_linear=graphs[name]["qdq"]["dequantize_linear"])
            print(json.dumps({"graph": name, **graphs[name]}), flush=True)

    result = {
        "benchmark": "modelopt", "model": args.model or "embedded default",
        "data": str(root), "calib_split": calib_split, "calib_images": int(calib.shape[0]),
        "test_images": len(test),
        "runtime": "ONNX Runtime CPU reference (ORT_DISABLE_ALL) of each ONNX",
        "rows": rows, "modelopt_graphs": graphs, "modelopt_commands": commands,
        "environment": {"modelopt": versions["modelopt"], "modelopt_onnxruntime": versions["onnxruntime"],
                        "modelopt_onnx": versions["onnx"], "onnxruntime": onnxruntime.__version__,
                        "onnx": onnx.__version__, "torch": torch.__version__,
                        "python": platform.python_version(), "threads": args.threads,
                        "high_precision_dtype": args.high_precision},
        "command": "python bench/bench_modelopt.py " + shlex.join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
