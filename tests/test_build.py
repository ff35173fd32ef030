"""`cunet-optimize build` end to end on a tiny model and a handful of synthetic faces."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from conftest import copy_workdir, run_build_json, tiny_build_args as build_args
from cunet_optimize.cli import main
from cunet_optimize.models import DEFAULT_CHECKPOINT

build_module = importlib.import_module("cunet_optimize.pipeline.build")

pytestmark = pytest.mark.slow

# the session's finished builds (conftest.py) of the precisions it makes for the CPU
SHARED_CPU_BUILDS = {"fp32": "fp32_build", "int8": "int8_build"}


def partial_dirs(workdir):
    return [p for p in (workdir / "engines").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("precision, target", [("fp32", "cpu"), ("int8", "cpu"), ("int4", "cpu"),
                                               ("fp16", "jetson-orin-nano")])
def test_build_each_precision(tiny, faces, tmp_path, precision, target, request):
    """ONNX Runtime (CPU) does not run FP16 natively: FP16 is a GPU/Jetson build. The FP32 and
    INT8 CPU builds are the session's (conftest.py), checked here as any other."""
    if target == "cpu" and precision in SHARED_CPU_BUILDS:
        shared = request.getfixturevalue(SHARED_CPU_BUILDS[precision])
        workdir, manifest = shared.workdir, shared.manifest
    else:
        workdir, manifest = tmp_path, run_build_json(build_args(tiny, faces, tmp_path, precision, "--target", target))
    out = workdir / "engines" / f"tiny-{precision}-{target}"
    assert json.loads((out / "build.json").read_text()) == manifest
    assert manifest["engine_built"] is (target == "cpu")
    assert manifest["backend"] == ("onnxruntime" if target == "cpu" else "tensorrt")
    for rel in manifest["artifacts"].values():
        assert (out / rel).is_file(), rel
    acc = manifest["accuracy"]
    assert acc["reference"]["count"] == acc["quantized"]["count"] == 4
    assert manifest["model"]["sha256"] and manifest["timings_seconds"]["export"] > 0
    if precision in ("int8", "int4"):
        assert manifest["calibration"]["images"] == 4
        assert (workdir / "calib" / manifest["calibration"]["id"] / "scales.json").is_file()
    if precision == "int8":
        assert (out / "calibration.cache").read_text().startswith("TRT-")
    if precision == "int4":  # per-channel INT4 on the CPU: the engine measured how to store it
        storage = manifest["engine_settings"]["weight_storage"]
        assert storage["packed_initializers"] > 0 and storage["chosen"] in ("int8", "packed-int4")
    if precision in ("int8", "int4"):  # INT4 runs on the CPU's integer path as the INT8 convs it equals
        # the integer-form variants were timed and the choice is what the engine runs
        int8 = manifest["surgery"]["int8_cpu_form"]
        chosen, timings = int8["chosen"], int8["median_ms_batch1"]
        assert {k.split()[0] for k in timings} | set(int8["same_graph_as_exact"]) == {"depthwise", "clamp"}
        key = f"{chosen['relu_form']} x{chosen['intra_op_threads']} {chosen['thread_pool']}"
        allowed = [k for k in timings
                   if k.startswith("depthwise") or int8["accuracy_checks"].get("clamp", {}).get("passed")]
        # the fastest allowed; among those the timer could not tell from the fastest, the fewest nodes
        tied, nodes = set(int8["within_drift_of_fastest"]), int8["nodes"]
        assert key == min(allowed, key=lambda k: (k not in tied, nodes[k.split()[0]], timings[k]))
        assert int8["cpu"]["int8_isa"] and manifest["engine_settings"]["cpu"]["int8_isa"] == int8["cpu"]["int8_isa"]
        assert manifest["engine_settings"]["intra_op_threads"] == chosen["intra_op_threads"]
        # (int4 adds its precision's own entry, onnxrt.PRECISION_SESSION_CONFIG)
        assert chosen["session_config"].items() <= manifest["engine_settings"]["session_config"].items()
        ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
        assert ("Max" in ops) == (chosen["relu_form"] == "clamp")
    else:
        assert manifest["surgery"].get("int8_cpu_form") is None
    form = manifest["surgery"]["dense_concat_form"]
    if (precision, target) == ("fp32", "cpu"):  # both forms timed here, the faster one built
        timings = form["median_ms_batch1"]
        assert {k.split()[0] for k in timings} == {"concat", "folded"}
        assert timings[f"{form['chosen']} x{form['intra_op_threads']}"] == min(timings.values())
        concats = sum(n.op_type == "Concat" for n in onnx.load(str(out / "model.onnx")).graph.node)
        assert (concats == 0) == (form["chosen"] == "folded")
        assert ("fold_dense_concats" in manifest["surgery"]["passes"]) == (form["chosen"] == "folded")
        assert manifest["engine_settings"]["intra_op_threads"] == form["intra_op_threads"]
    else:
        assert form is None
    assert not partial_dirs(workdir)


@pytest.mark.parametrize("target, major", [("jetson-orin-nano", 10), ("h100", 11)])
def test_gpu_targets_write_a_bundle_not_an_engine(tiny, faces, tmp_path, target, major, capsys):
    assert main(build_args(tiny, faces, tmp_path, "int8", "--target", target)) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "engines" / f"tiny-int8-{target}" / "build.json").read_text())
    assert manifest["engine_built"] is False and manifest["backend"] == "tensorrt"
    assert "no engine built here" in out
    timings = manifest["timings_seconds"]  # every stage timed, and printed at the end
    assert list(timings) == ["calibrate", "export", "surgery", "engine", "accuracy"]
    assert f"stage times (s): calibrate {timings['calibrate']:.1f}, export" in out
    bundle = tmp_path / "engines" / f"tiny-int8-{target}"
    recipe = (bundle / "build_engine.sh").read_text()
    assert "trtexec" in recipe and "--onnx=model.onnx" in recipe
    commands = "\n".join(line for line in recipe.splitlines() if not line.lstrip().startswith("#"))
    assert ("--int8" in commands) == (major == 10)  # TensorRT 11 has no precision flags
    assert not list(bundle.glob("*.engine")) and not list(bundle.glob("*.plan"))
    assert "ONNX Runtime CPU reference" in manifest["accuracy"]["runtime"]


def test_int4_on_tensorrt_is_weight_only_dequantized_to_the_plans_float_type(tiny, faces, tmp_path, capsys):
    """TensorRT has no INT4 convolution: the bundle holds INT4-grid weights as float
    initializers (FP16 for TensorRT 11's strongly typed plan), no Q/DQ, no INT4 tensor."""
    assert main(build_args(tiny, faces, tmp_path, "int4", "--target", "h100")) == 0
    bundle = tmp_path / "engines" / "tiny-int4-h100"
    manifest = json.loads((bundle / "build.json").read_text())
    assert manifest["calibration"]["scheme"].endswith("-wo") and "dequantize_weights" in manifest["surgery"]["passes"]
    graph = onnx.load(str(bundle / "model.onnx")).graph
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in graph.node}
    types = {i.data_type for i in graph.initializer if len(i.dims) == 4}
    assert types == {onnx.TensorProto.FLOAT16}
    assert manifest["engine_built"] is False and (bundle / "build_engine.sh").is_file()
    # build.json's BatchNorm account is the bundle's graph: every BN it keeps is a BN -> ReLU
    # chain fold_batchnorm cannot fold exactly (the INT4 weights were dequantized before it ran,
    # so their grid keeps none)
    bn = [n for n in graph.node if n.op_type == "BatchNormalization"]
    readers = {n.output[0]: [m.op_type for m in graph.node if n.output[0] in m.input] for n in bn}
    record = manifest["surgery"]["batchnorm"]
    assert record["kept"] == len(bn) == sum(record["patterns"].values()) > 0
    assert all(r == ["Relu"] for r in readers.values()) and all(k.endswith("-> BN -> Relu") for k in record["patterns"])
    assert any("BN -> ReLU" in w for w in record["why_kept"]) and any("TensorRT" in w for w in record["why_kept"])
    assert not any("grid" in w for w in record["why_kept"])


def test_fp32_reference_accuracy_is_computed_once_per_graph_and_data(tiny, faces, fp32_build, tmp_path, capsys):
    faces = Path(shutil.copytree(faces, tmp_path / "faces"))  # changed below: the same bytes elsewhere
    workdir = copy_workdir(fp32_build, tmp_path / "w")  # the session's FP32 build, as if built here

    def accuracy(precision, *extra):
        assert main(build_args(tiny, faces, workdir, precision, *extra)) == 0
        capsys.readouterr()
        return json.loads((workdir / "engines" / f"tiny-{precision}-cpu" / "build.json").read_text())["accuracy"]

    def cached_references():
        return sorted((workdir / "calib" / "fp32-reference").glob("*/reference.json"))

    first = fp32_build.manifest["accuracy"]
    assert "cached" not in first["reference_runtime"] and len(cached_references()) == 1
    second = accuracy("int8")  # the same FP32 export on the same data: read back
    assert "cached" in second["reference_runtime"] and second["reference"] == first["reference"]
    assert len(cached_references()) == 1
    # (the FP32 build reads its reference from the same cache: the cheaper build from here on)
    os.utime(faces / "test.txt", ns=(0, 0))  # touched, the same bytes: still the same data
    assert "cached" in accuracy("fp32", "--force")["reference_runtime"]
    assert len(cached_references()) == 1
    pts = sorted((faces / "images").glob("*.pts"))[-1]  # an annotation changed: measured again
    pts.write_text(pts.read_text() + "\n")
    assert "cached" not in accuracy("fp32", "--force")["reference_runtime"]
    assert len(cached_references()) == 2


def test_refuses_a_precision_the_target_cannot_run(tiny, faces, tmp_path, capsys):
    assert main(build_args(tiny, faces, tmp_path, "fp16", "--target", "cpu")) == 2
    err = capsys.readouterr().err
    assert "target cpu cannot run precision fp16" in err
    assert not (tmp_path / "engines" / "tiny-fp16-cpu").exists()


def test_existing_build_needs_force(tiny, faces, fp32_build, tmp_path, capsys):
    workdir = copy_workdir(fp32_build, tmp_path / "w")  # a finished build, as if built here
    manifest = workdir / "engines" / "tiny-fp32-cpu" / "build.json"
    first = manifest.read_text()
    os.utime(manifest, (1, 1))
    assert main(build_args(tiny, faces, workdir, "fp32")) == 2
    assert "--force" in capsys.readouterr().err
    assert manifest.read_text() == first and manifest.stat().st_mtime == 1  # untouched
    assert main(build_args(tiny, faces, workdir, "fp32", "--force")) == 0
    assert manifest.stat().st_mtime > 1


def test_interrupted_build_leaves_nothing(tiny, faces, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_accuracy_gate", interrupted)
    assert main(build_args(tiny, faces, tmp_path, "int8")) == 130
    assert not (tmp_path / "engines" / "tiny-int8-cpu").exists()
    assert not partial_dirs(tmp_path)


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="the embedded default model is not in this checkout")
def test_accuracy_gate_fails_a_damaged_calibration(faces, tmp_path, capsys):
    common = ["--calib-data", str(faces), "--calib-images", "4", "--workdir", str(tmp_path)]
    assert main(["calibrate", "--data", str(faces), "--images", "4", "--workdir", str(tmp_path), "--json"]) == 0
    scales_file = json.loads(capsys.readouterr().out)["scales_file"]
    data = json.loads(open(scales_file).read())
    data["scales"] = {k: v * 1e-3 for k, v in data["scales"].items()}  # clips every activation
    with open(scales_file, "w") as f:
        json.dump(data, f)
    # re-sealed: a consistent cache of bad scales (an edit alone fails the checksum and is recomputed)
    from cunet_optimize.cache_seal import seal

    calib_dir = Path(scales_file).parent
    seal(calib_dir, [calib_dir / "scales.json", calib_dir / "equalization.safetensors"])
    assert main(["build", "--precision", "int8", "--eval-data", str(faces), *common]) == 2
    assert "accuracy gate failed" in capsys.readouterr().err
    assert not (tmp_path / "engines" / "cunet-face-small-int8-cpu").exists()
    assert not partial_dirs(tmp_path)
