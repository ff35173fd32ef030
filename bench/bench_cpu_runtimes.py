"""Our INT8 CPU engine against the other CPU INT8 routes, in one run on this machine (issue 24):

- ours: `build --precision int8 --target cpu`'s ONNX Runtime engine (model.ort.onnx, the integer
  form chosen by timing), and whatever CPU runtime that build chose where OpenVINO is installed;
- OpenVINO on our TensorRT bundle's Q/DQ ONNX as is (`build --target h100`'s model.onnx);
- OpenVINO after NNCF post-training quantization of the FP32 export (`nncf.quantize`, its defaults);
- ONNX Runtime's own `quantize_static` of the FP32 export (QDQ, uint8 activations, int8 weights);
- and, for reference, the FP32 export in ONNX Runtime and in OpenVINO at f32 and (where the CPU
  runs it) bf16 inference precision: not INT8 routes, so not in the target's comparison.

NNCF and quantize_static calibrate on the same images our build does (the default calibration set,
--calib-images of them). Every engine is timed at batch 1 with 1 and 2 threads, each (engine,
threads) in a block of its own (engines/base.py time_in_blocks), blocks alternating over --rounds.
OpenVINO runs at inference precision f32 (its default on AMX/AVX-512 BF16 CPUs is bf16, a
precision of its own). NME of each engine on the default evaluation set is recorded beside.

    python bench/prepare_checkpoint.py cunet-face-n8k1 --out /tmp/n8.safetensors
    pip install nncf==3.4.0   # the bench only; not a dependency
    python bench/bench_cpu_runtimes.py --model /tmp/n8.safetensors --out bench/results/cpu_runtimes_face_n8.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint (bench/prepare_checkpoint.py)")
    parser.add_argument("--workdir", default="/tmp/bench-cpu-runtimes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per block")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import nncf
    import onnxruntime
    import openvino as ov
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    import cunet_optimize as co
    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.engines.base import time_in_blocks
    from cunet_optimize.engines.cpu_isa import cpu_bf16_isa, cpu_int8_isa, cpu_model
    from cunet_optimize.engines.onnxrt import OnnxRuntimeSessionRunner, OrtSettings
    from cunet_optimize.engines.openvino import OpenVinoSessionRunner, OvSettings, bf16_runs_here
    from cunet_optimize.evaluation import evaluate_landmarks, evaluate_runner
    from cunet_optimize.exporters import export_onnx
    from cunet_optimize.tasks import FACE, calibration_images, open_dataset_or_default
    from cunet_optimize.data.face300w import EVAL_DATA_FLAGS

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    def stage(name, fn):
        start = time.perf_counter()
        out = fn()
        stages[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {stages[name]} s", flush=True)
        return out

    common = dict(workdir=workdir, force=True, calib_images=args.calib_images)
    ours = stage("build int8 cpu", lambda: co.build(args.model, precision="int8", target="cpu", **common))
    bundle = stage("build int8 h100 bundle", lambda: co.build(args.model, precision="int8", target="h100", **common))
    fp32_onnx = workdir / "fp32.onnx"
    stage("export fp32", lambda: export_onnx(co.load_model(args.model), fp32_onnx))
    calib = calibration_images(None, "calib", args.calib_images, FACE)

    def nncf_int8() -> Path:
        model = ov.Core().read_model(str(fp32_onnx))
        quantized = nncf.quantize(model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]))
        path = workdir / "nncf-int8.xml"
        ov.save_model(quantized, str(path))
        return path

    class Reader(CalibrationDataReader):
        def __init__(self):
            name = onnxruntime.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).get_inputs()[0].name
            self.feeds = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.feeds, None)

    def ort_static() -> Path:
        path = workdir / "ort-quantize-static.onnx"
        quantize_static(str(fp32_onnx), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return path

    nncf_path = stage("nncf quantize", nncf_int8)
    static_path = stage("ort quantize_static", ort_static)

    ours_dir, bundle_dir = Path(ours.path), Path(bundle.path)
    session = json.loads((ours_dir / "session.json").read_text())
    engines = {
        "ours: ONNX Runtime INT8 engine (integer dataflow)": lambda n: OnnxRuntimeSessionRunner(
            ours_dir / "model.ort.onnx", OrtSettings(optimization="disable", intra_op_threads=n,
                                                     session_config=session["session_config"])),
        "OpenVINO on our TensorRT bundle's Q/DQ ONNX": lambda n: OpenVinoSessionRunner(
            bundle_dir / "model.onnx", OvSettings("f32", n)),
        "OpenVINO NNCF 3.4 INT8": lambda n: OpenVinoSessionRunner(nncf_path, OvSettings("f32", n)),
        "ONNX Runtime quantize_static (QDQ, ORT_ENABLE_ALL)": lambda n: OnnxRuntimeSessionRunner(
            static_path, OrtSettings(optimization="all", intra_op_threads=n), load_optimization="all"),
    }
    # the float rows of the table, for reference (not among the INT8 routes the target compares)
    floats = {
        "ONNX Runtime FP32 (ORT_ENABLE_ALL)": lambda n: OnnxRuntimeSessionRunner(
            fp32_onnx, OrtSettings(optimization="all", intra_op_threads=n), load_optimization="all"),
        "OpenVINO FP32 (f32 inference precision)": lambda n: OpenVinoSessionRunner(fp32_onnx, OvSettings("f32", n)),
    }
    if bf16_runs_here():  # OpenVINO's default inference precision on such a CPU
        floats["OpenVINO FP32 at bf16 inference precision"] = lambda n: OpenVinoSessionRunner(
            fp32_onnx, OvSettings("bf16", n))
    engines.update(floats)
    manifest = ours.manifest
    if manifest.get("backend") == "openvino":  # where the build chose OpenVINO, its engine too
        ov_session = json.loads((ours_dir / "openvino.json").read_text())
        engines["ours: the build's chosen runtime (OpenVINO)"] = lambda n: OpenVinoSessionRunner(
            ours_dir / ov_session["model"], OvSettings(ov_session["inference_precision"], n,
                                                       ov_session["performance_hint"], ov_session["num_streams"]))
    runners = {(name, n): make(n) for name, make in engines.items() for n in args.threads}
    timed = {key: t.median_ms for key, t in
             stage("timing", lambda: time_in_blocks(runners, verification_batch(1), args.runs, args.rounds)).items()}

    eval_set, _ = open_dataset_or_default(None, "test", FACE, EVAL_DATA_FLAGS)
    nme = {}
    for name, make in engines.items():
        nme[name] = FACE.headline(evaluate_runner(make(args.threads[-1]), eval_set, evaluate_landmarks, False,
                                                  name).metrics)
    reference = manifest["accuracy"]["reference_value"]

    others = [k for k in engines if not k.startswith("ours") and k not in floats]
    result = {"command": "python bench/bench_cpu_runtimes.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items()),
              "machine": {"cpu_model": cpu_model(), "int8_isa": cpu_int8_isa(), "bf16_isa": cpu_bf16_isa(),
                          "platform": platform.platform(), "onnxruntime": onnxruntime.__version__,
                          "openvino": ov.__version__, "nncf": nncf.__version__},
              "timing": f"batch 1, each (engine, threads) in its own block: 2 warm-up + {args.runs} runs, "
                        f"{args.rounds} rounds alternating order; median over all timed runs",
              "median_ms": {name: {str(n): round(timed[name, n], 2) for n in args.threads} for name in engines},
              "nme_percent": {name: round(v, 3) for name, v in nme.items()},
              "fp32_reference_nme_percent": reference,
              "eval_images": len(eval_set),
              "build_chose": manifest.get("cpu_runtime", {}).get("chosen", manifest.get("backend")),
              "build_cpu_runtime_timings": manifest.get("cpu_runtime", {}).get("median_ms_batch1"),
              "stage_seconds": stages}
    # the target is about the engine `build` deploys: its chosen runtime where it chose OpenVINO
    ours_key = next((k for k in engines if k.startswith("ours: the build's chosen")),
                    "ours: ONNX Runtime INT8 engine (integer dataflow)")
    result["target"] = {"engine": ours_key}
    for n in args.threads:
        best = min(others, key=lambda k: timed[k, n])
        ratio = timed[ours_key, n] / timed[best, n]
        result["target"][str(n)] = {"best_other": best, "ours_over_best": round(ratio, 3), "met (<= 0.95)": ratio <= 0.95}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
