"""`cunet-optimize profile` on tiny builds: every number present and sane, bundles listed
but never measured, and the inputs a user can get wrong rejected with one clear line."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cunet_optimize.engines.base import Runner
from cunet_optimize.engines.onnxrt import OnnxRuntimeBuilder
from cunet_optimize.errors import CUNetError
from cunet_optimize.models import CUNet, CUNetConfig, save_checkpoint
from cunet_optimize.profiling import (BUNDLE_ONLY_STATUS, batch_sweep, latency_stats, measure_latency, profile_engines,
                                      read_build, read_profile, summary_rows)
from cunet_optimize.engines.onnxrt import thread_candidates
from cunet_optimize.profiling.accuracy import DEFAULT_NME_TOLERANCE_POINTS, accuracy_delta
from cunet_optimize.profiling.builds import check_builds, find_builds
from cunet_optimize.profiling.layers import summarize_ort_trace
from cunet_optimize.profiling.memory import measure_peak_memory
from cunet_optimize.profiling.profiler import padded_to
from cunet_optimize.profiling.size import weights_by_dtype

TINY = CUNetConfig(num_unets=2, order=1, num_classes=68, width=8, growth_rate=4, neck_size=2)
INT8_TOLERANCE = 0.5


# ------------------------------------------------------------------ helpers: build folders


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_tiny(model: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(
        model, (torch.rand(1, 3, 256, 256),), str(path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["heatmaps"],
        dynamic_axes={"image": {0: "batch"}, "heatmaps": {0: "batch"}},
    )
    return path


def quantize_tiny(onnx_path: Path, out: Path) -> Path:
    """A Q/DQ int8 ONNX of the tiny model (ONNX Runtime's static quantizer, 2 random images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"image": rng.random((1, 3, 256, 256), dtype=np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns about every BN bias it cannot fold
    try:
        quantize_static(str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return out


def manifest(name, precision, target, backend, checkpoint, artifacts, data=None, **extra) -> dict:
    """A build.json in the schema `cunet-optimize build` writes."""
    out = {
        "schema": "cunet-optimize/build/1", "name": name, "precision": precision, "target": target,
        "backend": backend, "backend_version": "1.32.0", "engine_built": backend == "onnxruntime",
        "model": {"source": str(checkpoint), "checkpoint": str(checkpoint), "sha256": sha256(checkpoint),
                  "config": TINY.to_dict()},
        "artifacts": artifacts,
        "timings_seconds": {"export": 0.1},
        "command": f"cunet-optimize build --precision {precision} --target {target}",
        "toolkit_version": "0.1.0",
    }
    if data is not None:
        out["eval_data"] = {"folder": str(data), "split": "test", "crop": "tight"}
    out.update(extra)
    return out


def write_ort_build(engines: Path, name: str, onnx_path: Path, checkpoint: Path, precision: str = "fp32",
                    data: Path | None = None, builder_roles: bool = False, **extra) -> Path:
    """An ONNX Runtime build. builder_roles: artifacts named as OnnxRuntimeBuilder names them
    ("model" = the optimised model, "source_onnx") and eval_data's crop as the policy sentence,
    as pipeline/build.py records them; else the short form ("engine", crop "tight")."""
    from cunet_optimize.data.face300w import CROP_POLICIES

    folder = engines / name
    folder.mkdir(parents=True)
    shutil.copy(onnx_path, folder / "model.onnx")
    result = OnnxRuntimeBuilder(intra_op_threads=1).build(folder / "model.onnx", "cpu", precision, folder)
    if builder_roles:
        artifacts = {role: str(Path(p).relative_to(folder)) for role, p in result.artifacts.items()}
        artifacts.setdefault("onnx", "model.onnx")
    else:
        artifacts = {"onnx": "model.onnx", "engine": "model.ort.onnx", "session": "session.json"}
    m = manifest(name, precision, "cpu", "onnxruntime", checkpoint, artifacts, data, **extra)
    if builder_roles and data is not None:
        m["eval_data"] = {"folder": str(data), "split": "test", "images": 3, "crop": CROP_POLICIES["tight"]}
    m["backend_version"] = result.backend_version
    (folder / "build.json").write_text(json.dumps(m, indent=1))
    return folder


def write_trt_bundle(engines: Path, name: str, onnx_path: Path, checkpoint: Path, data: Path | None = None) -> Path:
    """A TensorRT deployment bundle as written where TensorRT is missing: no engine."""
    folder = engines / name
    folder.mkdir(parents=True)
    shutil.copy(onnx_path, folder / "model.onnx")
    (folder / "build_engine.sh").write_text("#!/bin/sh\ntrtexec --onnx=model.onnx --saveEngine=model.engine --int8\n")
    m = manifest(name, "int8", "jetson-orin-nano", "tensorrt", checkpoint,
                 {"onnx": "model.onnx", "recipe": "build_engine.sh"}, data)
    m["backend_version"] = "10.3"
    (folder / "build.json").write_text(json.dumps(m, indent=1))
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """engines/ with an ONNX Runtime fp32 and int8 build and a TensorRT bundle of one tiny CU-Net,
    plus a 6-image synthetic face set (3 test images)."""
    from cunet_optimize.data.synth import write_synthetic_faces

    root = tmp_path_factory.mktemp("profile-ws")
    torch.manual_seed(0)
    model = CUNet(TINY).eval()
    checkpoint = save_checkpoint(model, root / "tiny.safetensors")
    fp32 = export_tiny(model, root / "tiny.onnx")
    int8 = quantize_tiny(fp32, root / "tiny.int8.onnx")
    data = root / "faces"
    write_synthetic_faces(data, 6, seed=0, test_fraction=0.5, progress=False)
    engines = root / "engines"
    write_ort_build(engines, "tiny-fp32-cpu", fp32, checkpoint, data=data, builder_roles=True,
                    notes=["optimised at ORT_ENABLE_ALL"])
    write_ort_build(
        engines, "tiny-int8-cpu", int8, checkpoint, "int8", data=data,
        accuracy={"runtime": "ONNX Runtime 1.32 CPU (ORT_DISABLE_ALL reference)",
                  "reference": {"nme_percent": 90.0}, "quantized": {"nme_percent": 90.2},
                  "nme_increase_percent_points": 0.2, "tolerance": INT8_TOLERANCE, "passed": True},
        calibration={"method": "max", "images": 2, "scales_file": "scales.json", "ranges": {"stem.conv": 2.5}},
        surgery={"passes": [{"name": "fold_dense_concat", "nodes_before": 300, "nodes_after": 250,
                             "concats_before": 40, "concats_after": 10}],
                 "peak_activation_bytes_before": 1000, "peak_activation_bytes_after": 600},
    )
    write_trt_bundle(engines, "tiny-int8-jetson-orin-nano", int8, checkpoint, data=data)
    return {"root": root, "engines": engines, "checkpoint": checkpoint, "data": data, "fp32": fp32}


@pytest.fixture(scope="module")
def profiled(workspace):
    start = time.perf_counter()
    result = profile_engines(
        sorted(workspace["engines"].iterdir()), runs=6, warmup=1, batch_sizes=(1, 2), memory="inprocess",
        layer_runs=2, torch_threads=1, progress=False,
    )
    result.seconds_in_test = time.perf_counter() - start
    return result, result.to_dict()


def by_name(profile: dict) -> dict:
    return {v["name"]: v for v in profile["variants"]}


def run_cli(argv: list[str]) -> int:
    """cunet_optimize.cli.main once the command is wired in; until then the same parse/run/exit-2 path."""
    from cunet_optimize import cli

    if argv[0] in cli.COMMANDS:
        return cli.main(argv)
    parser = argparse.ArgumentParser(prog="cunet-optimize")
    sub = parser.add_subparsers(dest="command")
    importlib.import_module(f"cunet_optimize.commands.{argv[0]}").add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CUNetError as exc:
        print(f"cunet-optimize {args.command}: error: {exc}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------ pure parts, by hand


def test_latency_stats_hand_computed():
    s = latency_stats([0.001, 0.002, 0.003, 0.004, 0.005], batch_size=2)
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["p90_ms"] == pytest.approx(4.6)  # linear between the 4th (4 ms) and 5th (5 ms) sample
    assert s["p99_ms"] == pytest.approx(4.96)
    assert (s["mean_ms"], s["min_ms"], s["max_ms"]) == pytest.approx((3.0, 1.0, 5.0))
    assert s["throughput_ips"] == pytest.approx(2 * 1000 / 3.0)
    assert s["per_image_ms"] == pytest.approx(1.5)
    with pytest.raises(CUNetError, match="no latency samples"):
        latency_stats([])


class SleepyRunner(Runner):
    """Sleeps 1 ms per image; optionally accepts one batch size only."""

    def __init__(self, fixed_batch=None):
        super().__init__("sleepy")
        self.fixed_batch = fixed_batch

    @property
    def input_shape(self):
        return (self.fixed_batch, 3, 256, 256)

    def infer_impl(self, batch):
        time.sleep(0.001 * batch.shape[0])
        return np.zeros((batch.shape[0], 68, 64, 64), np.float32)


def test_measure_latency_counts_runs_and_honours_min_seconds():
    with SleepyRunner() as runner:
        s = measure_latency(runner, batch_size=1, warmup=2, runs=7)
        assert s["runs"] == 7 and s["warmup"] == 2
        assert s["min_ms"] >= 1.0 and s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
        start = time.perf_counter()
        longer = measure_latency(runner, batch_size=1, warmup=0, runs=2, min_seconds=0.05)
        assert longer["runs"] > 2 and time.perf_counter() - start >= 0.05


def test_batch_sweep_scales_runs_and_respects_a_fixed_batch():
    with SleepyRunner() as runner:
        sweep = batch_sweep(runner, sizes=(4, 1, 2), warmup=1, runs=8)
    assert [e["batch_size"] for e in sweep] == [1, 2, 4]
    assert [e["runs"] for e in sweep] == [8, 5, 5]  # ceil(8 / b), at least 5
    assert sweep[2]["throughput_ips"] > sweep[0]["throughput_ips"] / 4  # 4 images per call
    with SleepyRunner(fixed_batch=2) as runner:
        assert [e["batch_size"] for e in batch_sweep(runner, sizes=(1, 4), warmup=0, runs=2)] == [2]


def test_fixed_batch_engines_are_evaluated_with_a_padded_last_batch():
    seen = []

    def infer(images):
        seen.append(images.shape[0])
        return images[:, :1] * 2

    images = np.random.default_rng(0).random((3, 3, 4, 4), dtype=np.float32)
    out = padded_to(4, infer)(images)
    assert seen == [4] and out.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(out, images[:, :1] * 2)


def test_summarize_ort_trace_drops_warmup_and_totals_per_run():
    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        node("conv1", "Conv", 1, 9000),  # warm-up run: ignored
        {"cat": "Session", "name": "model_run", "ts": 1000, "dur": 100},
        node("conv1", "Conv", 1001, 3000), node("conv2", "Conv", 1002, 1000), node("relu", "Relu", 1003, 1000),
        {"cat": "Node", "name": "conv1_fence_before", "ts": 1004, "dur": 500, "args": {"op_name": "Conv"}},
        {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 100},
        node("conv1", "Conv", 2001, 5000), node("conv2", "Conv", 2002, 1000), node("relu", "Relu", 2003, 1000),
    ]
    s = summarize_ort_trace(events, warmup_runs=1)
    assert s["runs"] == 2 and s["nodes"] == 3
    assert s["total_ms_per_run"] == pytest.approx(6.0)  # (5 + 7) ms over 2 runs
    assert s["by_op_type"][0] == {"op_type": "Conv", "nodes": 2, "ms_per_run": pytest.approx(5.0),
                                  "percent": pytest.approx(100 * 10 / 12)}
    assert s["top_nodes"][0]["node"] == "conv1" and s["top_nodes"][0]["ms_per_run"] == pytest.approx(4.0)
    # model_run lasts 0.1 ms per run here, shorter than its kernels: nothing outside them
    assert s["run_ms_per_run"] == pytest.approx(0.1) and s["outside_kernels_ms_per_run"] == 0.0
    events[2]["dur"] = events[7]["dur"] = 8000  # 8 ms runs around 6 ms of kernels
    assert summarize_ort_trace(events, warmup_runs=1)["outside_kernels_ms_per_run"] == pytest.approx(2.0)
    with pytest.raises(CUNetError, match="nothing to summarise"):
        summarize_ort_trace(events, warmup_runs=3)


def test_weights_by_dtype_counts_packed_int4_as_half_bytes():
    w = weights_by_dtype([("float", [2, 3]), ("int8", [4, 4]), ("int4", [3]), ("float", [])])
    assert w["by_dtype"]["float"] == {"tensors": 2, "elements": 7, "bytes": 28}
    assert w["by_dtype"]["int8"]["bytes"] == 16
    assert w["by_dtype"]["int4"]["bytes"] == 2  # 3 nibbles -> 2 bytes
    assert w["total_bytes"] == 46 and w["total_elements"] == 26


def test_accuracy_delta_rule():
    d = accuracy_delta(3.0, 2.5, tolerance_points=0.1)
    assert d["nme_delta_points"] == pytest.approx(0.5) and d["nme_delta_relative_percent"] == pytest.approx(20.0)
    assert d["passed"] is False
    assert accuracy_delta(2.55, 2.5, 0.1)["passed"] is True
    assert accuracy_delta(2.0, 2.5, 0.1)["passed"] is True  # better than the reference
    assert accuracy_delta(float("nan"), 2.5, 0.1)["passed"] is False


# ------------------------------------------------------------------ a real profile


def test_profile_lists_baseline_engines_and_bundle(profiled):
    result, profile = profiled
    assert [v["name"] for v in profile["variants"]] == [
        "pytorch-fp32", "tiny-fp32-cpu", "tiny-int8-cpu", "tiny-int8-jetson-orin-nano"]
    assert profile["schema"] == "cunet-optimize/profile/1"
    json.dumps(profile, allow_nan=False)  # strict JSON


def test_measured_variants_have_sane_numbers(profiled):
    _, profile = profiled
    for name in ("pytorch-fp32", "tiny-fp32-cpu", "tiny-int8-cpu"):
        v = by_name(profile)[name]
        assert v["measured"] and v["status"] == "measured", name
        lat = v["latency"]
        assert lat["batch_size"] == 1 and lat["runs"] == 6
        assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert lat["throughput_ips"] == pytest.approx(1000 / lat["mean_ms"])
        assert [e["batch_size"] for e in v["batch_sweep"]] == [1, 2]
        assert v["size"]["deploy_bytes"] > 0 and v["size"]["weights"]["total_bytes"] > 0
        assert v["memory"]["peak_rss_bytes"] > 0 and v["memory"]["method"]
        assert v["runtime"]
    for name, role in (("tiny-fp32-cpu", "model"), ("tiny-int8-cpu", "engine")):  # both namings of the engine
        size = by_name(profile)[name]["size"]
        assert size["deploy_artifact"] == role
        engine_file = Path(by_name(profile)[name]["build_dir"]) / "model.ort.onnx"
        assert size["deploy_bytes"] == size["engine_bytes"] == engine_file.stat().st_size
        assert size["total_bytes"] == sum(f.stat().st_size for f in engine_file.parent.iterdir()
                                          if f.name != "build.json")
    ort = by_name(profile)["tiny-fp32-cpu"]
    assert "optimised at ORT_ENABLE_ALL" in ort["notes"]
    assert "ONNX Runtime" in ort["runtime"] and "1 intra-op thread" in ort["runtime"]
    assert "int8" in by_name(profile)["tiny-int8-cpu"]["size"]["weights"]["by_dtype"]
    assert "PyTorch" in by_name(profile)["pytorch-fp32"]["runtime"]


def test_per_layer_time_for_onnx_runtime_builds(profiled):
    _, profile = profiled
    for name in ("tiny-fp32-cpu", "tiny-int8-cpu"):
        layers = by_name(profile)[name]["layers"]
        assert layers["runs"] == 2 and layers["total_ms_per_run"] > 0
        ops = [o["op_type"] for o in layers["by_op_type"]]
        assert any(op in ("Conv", "QLinearConv") for op in ops)
        assert sum(o["percent"] for o in layers["by_op_type"]) <= 100.0 + 1e-6
        assert 0 < len(layers["top_nodes"]) <= 15
        assert layers["run_ms_per_run"] > 0
        scaling = layers["thread_scaling"]  # 1 thread up to every usable core
        assert scaling["median_ms_batch1"].keys() == {str(n) for n in thread_candidates()}
        assert scaling["speedup_vs_1_thread"]["1"] == 1.0
    assert by_name(profile)["pytorch-fp32"]["layers"] is None


def test_accuracy_deltas_against_the_pytorch_reference(profiled):
    _, profile = profiled
    variants = by_name(profile)
    ref = variants["pytorch-fp32"]["accuracy"]["metrics"]["nme_percent"]
    assert profile["data"]["images"] == 3 and profile["data"]["normalizer"] == "inter_ocular"
    assert profile["data"]["flip"] is False and "tight" in profile["data"]["crop_policy"]
    for name, tol in (("tiny-fp32-cpu", DEFAULT_NME_TOLERANCE_POINTS), ("tiny-int8-cpu", INT8_TOLERANCE)):
        a = variants[name]["accuracy"]
        nme = a["metrics"]["nme_percent"]
        assert a["metrics"]["count"] == 3 and a["reference"] == "pytorch-fp32"
        assert a["reference_nme_percent"] == pytest.approx(ref)
        assert a["nme_delta_points"] == pytest.approx(nme - ref)
        assert a["nme_delta_relative_percent"] == pytest.approx(100 * (nme - ref) / ref)
        assert a["tolerance_points"] == tol and a["passed"] == (nme - ref <= tol)
        ced = a["ced"]
        assert len(ced["thresholds"]) == len(ced["fraction"]) and ced["thresholds"][-1] == pytest.approx(0.1)
        assert all(0 <= f <= 1 for f in ced["fraction"]) and ced["fraction"] == sorted(ced["fraction"])
    assert variants["tiny-int8-cpu"]["accuracy"]["tolerance_source"] == "build.json accuracy.tolerance"
    assert variants["pytorch-fp32"]["accuracy"]["passed"] is None  # the reference is not judged
    # the builds record the crop as "tight" and as its policy sentence: the same data, no warning
    assert not any("gated on" in n for n in profile["notes"])


def test_speedups_are_latency_ratios(profiled):
    _, profile = profiled
    v = by_name(profile)
    torch_ms, ort_ms = v["pytorch-fp32"]["latency"]["median_ms"], v["tiny-fp32-cpu"]["latency"]["median_ms"]
    int8_ms = v["tiny-int8-cpu"]["latency"]["median_ms"]
    assert v["pytorch-fp32"]["speedup_vs_pytorch"] == pytest.approx(1.0)
    assert v["tiny-fp32-cpu"]["speedup_vs_onnx_fp32"] == pytest.approx(1.0)
    assert v["tiny-int8-cpu"]["speedup_vs_pytorch"] == pytest.approx(torch_ms / int8_ms)
    assert v["tiny-int8-cpu"]["speedup_vs_onnx_fp32"] == pytest.approx(ort_ms / int8_ms)


def test_tensorrt_bundle_is_listed_but_not_measured(profiled):
    _, profile = profiled
    b = by_name(profile)["tiny-int8-jetson-orin-nano"]
    assert b["status"] == BUNDLE_ONLY_STATUS and b["measured"] is False
    for field in ("latency", "memory", "layers", "accuracy", "speedup_vs_pytorch", "speedup_vs_onnx_fp32"):
        assert b[field] is None, field
    assert b["batch_sweep"] == []
    assert b["size"]["engine_bytes"] is None and b["size"]["deploy_artifact"] == "onnx"
    row = next(r for r in summary_rows(profile) if r["variant"] == b["name"])
    assert row["median_ms"] is None and row["nme_percent"] is None
    assert "TensorRT bundles were not built here" in profile["statement"]
    assert "tiny-int8-jetson-orin-nano" in profile["statement"]


def test_tensorrt_engine_built_elsewhere_is_not_measured_without_tensorrt(workspace, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the engine would really be run")
    except ImportError:
        pass
    folder = write_trt_bundle(tmp_path / "engines", "tiny-int8-t4", workspace["fp32"], workspace["checkpoint"])
    (folder / "model.engine").write_bytes(b"not really an engine")
    m = json.loads((folder / "build.json").read_text())
    m.update(engine_built=True, target="t4")
    m["artifacts"]["engine"] = "model.engine"
    (folder / "build.json").write_text(json.dumps(m))
    profile = profile_engines([folder], runs=2, warmup=0, batch_sizes=(1,), memory="off", layer_runs=0,
                              torch_threads=1, progress=False).to_dict()
    trt = by_name(profile)["tiny-int8-t4"]
    assert trt["status"].startswith("not measured here: TensorRT is not installed")
    assert trt["measured"] is False and trt["latency"] is None and trt["batch_sweep"] == []
    assert trt["size"]["deploy_artifact"] == "engine" and trt["size"]["engine_bytes"] == 20
    assert "Not measured here: tiny-int8-t4" in profile["statement"]


def test_build_metadata_environment_and_commands_carried(profiled):
    _, profile = profiled
    int8 = by_name(profile)["tiny-int8-cpu"]
    assert int8["calibration"]["ranges"] == {"stem.conv": 2.5}
    assert int8["surgery"]["peak_activation_bytes_after"] == 600
    assert int8["build_accuracy"]["tolerance"] == INT8_TOLERANCE
    env = profile["environment"]
    assert env["cpu"] and env["cpu_cores"] >= 1 and env["gpu"]
    assert env["versions"]["onnxruntime"] and env["versions"]["torch"] and env["python"]
    builds = {c["name"]: c["command"] for c in profile["commands"]["builds"]}
    assert builds["tiny-int8-cpu"] == "cunet-optimize build --precision int8 --target cpu"
    assert profile["commands"]["profile"].startswith("cunet-optimize profile")


def test_memory_in_a_fresh_process(workspace):
    session = workspace["engines"] / "tiny-fp32-cpu" / "session.json"
    mem = measure_peak_memory("onnxruntime", session, mode="subprocess")
    assert mem is not None and "fresh Python process" in mem["method"]
    assert mem["peak_rss_bytes"] > mem["baseline_rss_bytes"] > 0
    if mem["hwm_reset"]:
        assert mem["inference_growth_bytes"] == mem["peak_rss_bytes"] - mem["baseline_rss_bytes"]


# ------------------------------------------------------------------ the command


def test_cli_profile_writes_report_and_prints_json(workspace, capsys):
    ws = workspace["root"]
    code = run_cli(["profile", "--workdir", str(ws), str(workspace["engines"] / "tiny-fp32-cpu"),
                    "--runs", "3", "--warmup", "1", "--batch-sizes", "1", "--memory", "off", "--layer-runs", "0",
                    "--threads", "1", "--max-images", "2", "--out", "cli-test", "--json", "--no-progress",
                    "--data", str(workspace["data"])])
    out = capsys.readouterr().out
    assert code == 0
    printed = json.loads(out)
    assert [v["name"] for v in printed["variants"]] == ["pytorch-fp32", "tiny-fp32-cpu"]
    assert printed["data"]["images"] == 2 and printed["name"] == "cli-test"
    assert printed["data"]["folder"] == str(workspace["data"]) and printed["data"]["split"] == "test"
    assert "--max-images 2" in printed["commands"]["profile"]
    saved = read_profile(ws / "reports" / "cli-test.json")
    assert saved.to_dict() == printed
    html = (ws / "reports" / "cli-test.html").read_text()
    assert "tiny-fp32-cpu" in html and "<svg" in html
    assert not [p for p in (ws / "reports").iterdir() if p.name.startswith(".")]  # no temp files left

    other = ws / "reports" / "other.html"
    assert run_cli(["report", str(ws / "reports" / "cli-test.json"), "--compare",
                    str(ws / "reports" / "cli-test.json"), "--out", str(other)]) == 0
    assert "Comparison with another profile" in other.read_text()


def test_cli_profile_prints_the_summary_table_and_report_path(workspace, tmp_path, capsys):
    code = run_cli(["profile", str(workspace["engines"] / "tiny-fp32-cpu"),
                    str(workspace["engines"] / "tiny-int8-jetson-orin-nano"), "--workdir", str(tmp_path),
                    "--runs", "2", "--warmup", "0", "--batch-sizes", "1", "--memory", "off", "--layer-runs", "0",
                    "--threads", "1", "--max-images", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    rows = {line.split()[0]: line for line in lines[header + 2:header + 5]}
    assert set(rows) == {"pytorch-fp32", "tiny-fp32-cpu", "tiny-int8-jetson-orin-nano"}
    assert "bundle only" in rows["tiny-int8-jetson-orin-nano"]
    html = [line for line in lines if line.startswith("report: ")]
    assert len(html) == 1 and Path(html[0].removeprefix("report: ")).is_file()
    assert Path(html[0].removeprefix("report: ")).parent == tmp_path / "reports"


# ------------------------------------------------------------------ what a user can get wrong


def test_missing_engine_dir_is_one_line_exit_2(tmp_path, capsys):
    code = run_cli(["profile", str(tmp_path / "nope"), "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "engine folder not found" in err and "\n" not in err
    assert not (tmp_path / "reports").exists()  # nothing half-written


def test_no_builds_found(tmp_path, capsys):
    (tmp_path / "engines" / "interrupted").mkdir(parents=True)  # a folder without build.json
    assert run_cli(["profile", "--workdir", str(tmp_path)]) == 2
    assert "no builds found" in capsys.readouterr().err
    with pytest.raises(CUNetError, match="no engines folder"):
        find_builds(tmp_path / "elsewhere")


@pytest.mark.parametrize("content, message", [
    (None, "no build.json"),
    ("{not json", "not valid JSON"),
    (json.dumps({"schema": "cunet-optimize/build/0", "name": "x"}), "schema 'cunet-optimize/build/0'"),
    (json.dumps(["a list"]), "expected a JSON object"),
])
def test_bad_build_json(tmp_path, content, message):
    folder = tmp_path / "engines" / "b"
    folder.mkdir(parents=True)
    if content is not None:
        (folder / "build.json").write_text(content)
    with pytest.raises(CUNetError, match=message):
        read_build(folder)


def test_build_json_missing_a_field(workspace, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(workspace["engines"] / "tiny-fp32-cpu", folder)
    m = json.loads((folder / "build.json").read_text())
    del m["model"]["sha256"]
    (folder / "build.json").write_text(json.dumps(m))
    with pytest.raises(CUNetError, match="missing field 'model.sha256'"):
        read_build(folder)


def test_engines_of_different_models_need_allow_mixed(workspace, tmp_path, capsys):
    other = tmp_path / "other-model"
    shutil.copytree(workspace["engines"] / "tiny-fp32-cpu", other)
    m = json.loads((other / "build.json").read_text())
    m["name"], m["model"]["sha256"] = "other-fp32-cpu", "0" * 64
    (other / "build.json").write_text(json.dumps(m))
    builds = [read_build(workspace["engines"] / "tiny-fp32-cpu"), read_build(other)]
    with pytest.raises(CUNetError, match="different models.*--allow-mixed"):
        check_builds(builds)
    check_builds(builds, allow_mixed=True)
    code = run_cli(["profile", str(workspace["engines"] / "tiny-fp32-cpu"), str(other), "--workdir", str(tmp_path)])
    assert code == 2 and "different models" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_two_builds_with_one_name(workspace, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(workspace["engines"] / "tiny-fp32-cpu", copy)
    with pytest.raises(CUNetError, match="two builds are named 'tiny-fp32-cpu'"):
        check_builds([read_build(workspace["engines"] / "tiny-fp32-cpu"), read_build(copy)])


def test_missing_checkpoint_fails_before_measuring(workspace, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(workspace["engines"] / "tiny-fp32-cpu", folder)
    m = json.loads((folder / "build.json").read_text())
    m["model"]["checkpoint"] = str(tmp_path / "gone.safetensors")
    (folder / "build.json").write_text(json.dumps(m))
    with pytest.raises(CUNetError, match="gone.safetensors not found"):
        profile_engines([folder], progress=False, memory="off")


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated positive integers"),
    (["--batch-sizes", "0"], "--batch-sizes must be"),
    (["--out", "../escape"], "--out takes a file name"),
])
def test_bad_arguments(workspace, tmp_path, capsys, argv, message):
    code = run_cli(["profile", str(workspace["engines"] / "tiny-fp32-cpu"), "--workdir", str(tmp_path), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_report_rejects_a_corrupt_profile(tmp_path, capsys):
    bad = tmp_path / "p.json"
    bad.write_text('{"schema": "cunet-optimize/profile/1", "variants": [')
    assert run_cli(["report", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"schema": "something-else", "variants": []}))
    assert run_cli(["report", str(bad)]) == 2
    assert "expected 'cunet-optimize/profile/1'" in capsys.readouterr().err
    assert run_cli(["report", str(tmp_path / "missing.json")]) == 2
    assert "profile not found" in capsys.readouterr().err
    assert not (tmp_path / "p.html").exists()


def test_no_eval_data_skips_accuracy_with_a_note(workspace, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(workspace["engines"] / "tiny-fp32-cpu", folder)
    m = json.loads((folder / "build.json").read_text())
    m.pop("eval_data")
    (folder / "build.json").write_text(json.dumps(m))
    profile = profile_engines([folder], runs=2, warmup=0, batch_sizes=(1,), memory="off", layer_runs=0,
                              torch_threads=1, progress=False).to_dict()
    assert profile["data"] is None and all(v["accuracy"] is None for v in profile["variants"])
    assert any("pass --data DIR" in n for n in profile["notes"])
    assert all(math.isfinite(v["latency"]["median_ms"]) for v in profile["variants"])


# ----- profile --serve (the server environment: serving/server_env.py; `serve` creates it)

def test_profile_serve_without_the_server_environment_is_one_line(int8_build, tmp_path, monkeypatch, capsys, caplog):
    from conftest import run_cli

    monkeypatch.delenv("CUNET_TRITON_ENV", raising=False)
    monkeypatch.setenv("CUNET_OPTIMIZE_CACHE", str(tmp_path / "empty-cache"))
    status, out, err = run_cli(["profile", int8_build.out, "--workdir", tmp_path, "--serve", "--out", "s"], capsys,
                               caplog)
    assert status == 2 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "profile --serve: the Triton server environment is absent" in lines[0], err
    assert not (tmp_path / "reports").exists()  # refused before anything was measured or written


@pytest.mark.slow
def test_profile_serve_measures_served_beside_in_process(int8_build, tmp_path):
    from cunet_optimize.report import render_html
    from cunet_optimize.serving.server_env import find_server_env

    env = find_server_env()
    if env is None:
        pytest.skip("the Triton server environment is absent (`cunet-optimize serve` creates it on first use; "
                    "needs the package index)")
    profile = profile_engines([int8_build.out], runs=2, warmup=1, batch_sizes=[1], memory="off", layer_runs=0,
                              progress=False, serve_seconds=0.5).to_dict()
    engine = next(v for v in profile["variants"] if v["role"] == "engine")
    rows = engine["served"]["rows"]
    assert [(r["runner"], r["concurrency"]) for r in rows] == [
        ("in-process ONNX Runtime", 1), ("in-process ONNX Runtime", 8), ("Triton http (perf_analyzer)", 1),
        ("Triton http (perf_analyzer)", 8), ("Triton grpc (perf_analyzer)", 1), ("Triton grpc (perf_analyzer)", 8)]
    assert all(r["p50_ms"] > 0 and r["throughput_infer_per_s"] > 0 for r in rows)
    served_c8 = [r for r in rows if r["runner"].startswith("Triton") and r["concurrency"] == 8]
    assert all(sum(r["executions_by_batch_size"].values()) > 0 for r in served_c8)
    assert 'id="served"' in render_html(profile)
