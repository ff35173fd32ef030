"""Serving: the deployment every build writes (Triton repository, DeepStream config), its
validation against Triton's schema and the ONNX, and the real Triton server over a CPU build
(skipped, with its reason, where the server's environment is absent)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from conftest import run_cli
from cunet_optimize.errors import CUNetError
from cunet_optimize.serving.deepstream import parse_nvinfer
from cunet_optimize.serving.deploy import triton_plan_path, validate_deployment, write_deployment
from cunet_optimize.serving.model_io import read_model_io
from cunet_optimize.serving.served_latency import free_ports
from cunet_optimize.serving.validate import check_nvinfer_config, check_triton_config, model_config_class
from cunet_optimize.targets import get_target, target_names

needs_schema = pytest.mark.skipif(model_config_class() is None, reason="tritonclient (the `serve` extra) absent")


def _bundle(int8_build, dest: Path, static_batch: bool = False) -> Path:
    """A build-like folder holding the tiny INT8 build's model.onnx (batch fixed to 1 if asked)."""
    dest.mkdir()
    model = onnx.load(int8_build.out / "model.onnx")
    if static_batch:
        for value in list(model.graph.input) + list(model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, dest / "model.onnx")
    shutil.copyfile(int8_build.out / "calibration.cache", dest / "calibration.cache")
    return dest


@needs_schema
@pytest.mark.parametrize("target", target_names())
def test_each_target_gets_a_config_that_matches_its_onnx(int8_build, tmp_path, target):
    spec = get_target(target)
    folder = _bundle(int8_build, tmp_path / "b")
    engine = None if spec.backend == "onnxruntime" else "model.engine"
    record = write_deployment(folder, "m", spec, "int8", {"intra_op_threads": 2}, None, 1.1, engine)
    config_class = model_config_class()
    from google.protobuf import text_format

    config = text_format.Parse((folder / "deploy/triton/m/config.pbtxt").read_text(), config_class())
    io = read_model_io(folder / "model.onnx")
    assert config.name == "m" and config.max_batch_size == spec.batch[2]
    assert [tuple(t.dims) for t in config.input] == [io.image.shape[1:]] == [(3, 256, 256)]
    assert [(t.name, tuple(t.dims)) for t in config.output] == [(o.name, o.shape[1:]) for o in io.outputs]
    if spec.backend == "onnxruntime":
        assert config.backend == "onnxruntime" and (folder / "deploy/triton/m/1/model.onnx").is_file()
        assert config.parameters["intra_op_thread_count"].string_value == "2"
        assert config.instance_group[0].kind == config_class.DESCRIPTOR.fields_by_name[
            "instance_group"].message_type.enum_types_by_name["Kind"].values_by_name["KIND_CPU"].number
    else:
        assert config.platform == "tensorrt_plan"
    assert all(b <= spec.batch[2] for b in config.dynamic_batching.preferred_batch_size)
    if spec.device == "jetson":
        ds = folder / "deploy/deepstream/nvinfer_m.txt"
        props = parse_nvinfer(ds.read_text())["property"]
        assert props["infer-dims"] == "3;256;256" and props["network-mode"] == "1"
        assert props["int8-calib-file"] == "../../calibration.cache" and props["process-mode"] == "2"
        assert props["batch-size"] == str(spec.batch[2])
        assert "x 1.1" in ds.read_text()  # the crop enlargement nvinfer has no key for, stated
        assert len(record["files"]) == 2
    else:
        assert not (folder / "deploy/deepstream").exists() and len(record["files"]) == 1
    assert validate_deployment_files(folder, io) == []


def validate_deployment_files(folder: Path, io) -> list[str]:
    return check_triton_config((folder / "deploy/triton/m/config.pbtxt").read_text(), "m", io)


@needs_schema
def test_a_static_batch_graph_gets_full_shapes_and_no_batcher(int8_build, tmp_path):
    folder = _bundle(int8_build, tmp_path / "b", static_batch=True)
    write_deployment(folder, "m", get_target("jetson-orin-nx"), "int8", {"batch": [1, 1, 1]}, 0, 1.1, "model.engine")
    text = (folder / "deploy/triton/m/config.pbtxt").read_text()
    assert "max_batch_size: 0" in text and "dims: [ 1, 3, 256, 256 ]" in text and "dynamic_batching" not in text
    props = parse_nvinfer((folder / "deploy/deepstream/nvinfer_m.txt").read_text())["property"]
    assert props["batch-size"] == "1" and props["use-dla-core"] == "0"


@needs_schema
def test_the_validator_refuses_a_wrong_dim_a_wrong_name_and_unknown_keys(int8_build, tmp_path):
    folder = _bundle(int8_build, tmp_path / "b")
    write_deployment(folder, "m", get_target("jetson-orin-nano"), "int8", {}, None, 1.1, "model.engine")
    io = read_model_io(folder / "model.onnx")
    config = folder / "deploy/triton/m/config.pbtxt"
    good = config.read_text()
    wrong = good.replace("dims: [ 3, 256, 256 ]", "dims: [ 3, 224, 224 ]")
    assert check_triton_config(wrong, "m", io) == ["input image: dims [3, 224, 224], the ONNX's are [3, 256, 256] "
                                                   "(batch excluded)"]
    assert "differs from its folder" in check_triton_config(good, "other", io)[0]
    assert "not a Triton ModelConfig" in check_triton_config(good.replace("max_batch_size", "max_batch"), "m", io)[0]
    config.write_text(wrong)
    (folder / "build.json").write_text(json.dumps(_manifest()))
    with pytest.raises(CUNetError, match="dims"):
        validate_deployment(folder)
    config.write_text(good)
    ds = folder / "deploy/deepstream/nvinfer_m.txt"
    text = ds.read_text()
    problems = check_nvinfer_config(text.replace("infer-dims=3;256;256", "infer-dims=3;224;224")
                                    .replace("gpu-id=0", "gpu-idx=0"), io, "int8", ds.parent)
    assert problems == ["unknown nvinfer key 'gpu-idx'", "infer-dims '3;224;224', the ONNX input image is 3;256;256"]
    # the key set is the parser's (gstnvinfer_property_parser.h): an element property is no config key
    assert check_nvinfer_config(text + "crop-objects-to-roi-boundary=1\n", io, "int8", ds.parent) == [
        "unknown nvinfer key 'crop-objects-to-roi-boundary'"]
    assert check_nvinfer_config(text + "disable-output-host-copy=0\ninput-tensor-from-meta=0\n", io, "int8",
                                ds.parent) == []
    assert check_nvinfer_config(text, io, "fp16", ds.parent) == ["network-mode '1' but the build is fp16 (2)"]


def _manifest() -> dict:
    return {"schema": "cunet-optimize/build/1", "name": "m", "precision": "int8", "target": "jetson-orin-nano",
            "backend": "tensorrt", "engine_built": False, "artifacts": {},
            "model": {"checkpoint": "x", "sha256": "0"}}


def test_a_build_writes_its_deployment_hashed_with_it(int8_build):
    name = int8_build.manifest["name"]
    manifest = json.loads((int8_build.out / "build.json").read_text())
    config = f"deploy/triton/{name}/config.pbtxt"
    assert manifest["artifacts"]["triton_config"] == config
    assert config in manifest["artifact_sha256"] and f"deploy/triton/{name}/1/model.onnx" in manifest["artifact_sha256"]
    served = int8_build.out / f"deploy/triton/{name}/1/model.onnx"
    assert served.read_bytes() == (int8_build.out / "model.onnx").read_bytes()
    assert manifest["deploy"]["model_file"] == served.relative_to(int8_build.out).as_posix()
    # one file under two names where the filesystem allows it (pytest's tmp does)
    assert manifest["deploy"]["model_file_is"] == "hard link of model.onnx"
    assert served.samefile(int8_build.out / "model.onnx")
    if model_config_class() is not None:
        assert manifest["deploy"]["validation"]["triton"].startswith("parsed by Triton's ModelConfig schema")


def test_the_served_model_is_copied_where_no_hard_link_can_be_made(int8_build, tmp_path, monkeypatch):
    folder = _bundle(int8_build, tmp_path / "b")

    def no_link(source, dest):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    record = write_deployment(folder, "m", get_target("cpu"), "int8", {}, None, 1.1, None)
    served = folder / record["model_file"]
    assert record["model_file_is"] == "copy of model.onnx"
    assert served.read_bytes() == (folder / "model.onnx").read_bytes() and not served.samefile(folder / "model.onnx")


def test_the_tensorrt_recipe_places_the_engine_in_the_triton_repository(int8_build, tmp_path):
    from cunet_optimize.engines.trt_builder import TensorRTBuilder

    result = TensorRTBuilder(apply=False).build(int8_build.out / "model.onnx", "h100", "int8", tmp_path,
                                                {"engine_copies": [triton_plan_path("m")]})
    recipe = Path(result.artifacts["recipe"]).read_text()
    assert "mkdir -p deploy/triton/m/1\ncp -f model.engine deploy/triton/m/1/model.plan" in recipe
    assert recipe.index("mv -f model.engine.partial model.engine") < recipe.index("cp -f model.engine")


def test_build_landmarks_appends_the_decoder_and_its_configs_serve_coordinates(landmarks_build, tmp_path):
    import numpy as np

    from cunet_optimize.data.transforms import decode_heatmaps
    from cunet_optimize.engines.onnxrt import OnnxRuntimeRunner

    out, name = landmarks_build.out, landmarks_build.manifest["name"]
    assert name.endswith("-int8-cpu-landmarks")  # not the plain build's name
    io = read_model_io(out / "model.onnx")
    assert [(t.name, t.shape) for t in io.outputs] == [("heatmaps", (-1, 68, 64, 64)), ("landmarks", (-1, 68, 2))]
    record = landmarks_build.manifest["landmarks"]
    assert record["output"] == "landmarks" and record["shape"] == [68, 2] and "(max diff 0 px)" in record["verified"]
    images = np.random.default_rng(1).random((3, 3, 256, 256), dtype=np.float32)
    with OnnxRuntimeRunner(out) as engine:  # the engine (model.ort.onnx) decodes as NumPy does
        got = engine.infer_all(images)
        assert np.array_equal(got["heatmaps"], engine.infer(images))
    assert np.abs(got["landmarks"] - decode_heatmaps(got["heatmaps"], method="quarter")).max() <= 1e-5
    config = (out / f"deploy/triton/{name}/config.pbtxt").read_text()
    assert 'name: "landmarks"\n    data_type: TYPE_FP32\n    dims: [ 68, 2 ]' in config
    assert "# landmarks: (x, y) per point in heatmap pixels" in config
    if model_config_class() is not None:
        assert check_triton_config(config, name, io) == []
    # a Jetson build of the same graph: nvinfer attaches the coordinates, not the heatmaps
    folder = tmp_path / "b"
    folder.mkdir()
    shutil.copyfile(out / "model.onnx", folder / "model.onnx")
    write_deployment(folder, "m", get_target("jetson-orin-nano"), "int8", {}, None, 1.1, "model.engine")
    ds = (folder / "deploy/deepstream/nvinfer_m.txt").read_text()
    assert parse_nvinfer(ds)["property"]["output-blob-names"] == "landmarks" and "# outputs: landmarks [C, 2]" in ds
    assert check_nvinfer_config(ds, io, "int8", folder / "deploy/deepstream") == []


def test_the_decoder_is_appended_once_to_a_deployed_graph(int8_build):
    from cunet_optimize.exporters.landmarks import append_landmark_decoder

    model = onnx.load(int8_build.out / "model.onnx")
    with_decoder = append_landmark_decoder(model)
    assert [o.name for o in with_decoder.graph.output] == ["heatmaps", "landmarks"]
    assert len(with_decoder.graph.node) > len(model.graph.node) and list(model.graph.node) == list(
        with_decoder.graph.node)[:len(model.graph.node)]  # the deployed graph's nodes as they were
    with pytest.raises(ValueError, match="already has a 'landmarks' output"):
        append_landmark_decoder(with_decoder)


# ----- the server side up to the server (no Triton needed)

def test_the_served_repository_is_the_build_config_with_the_python_backend(int8_build, tmp_path):
    from cunet_optimize.serving.server import TritonServer, check_servable, write_served_repository
    from cunet_optimize.serving.server_env import ServerEnv

    build = check_servable(int8_build.out)
    env = ServerEnv(tmp_path / "env")
    repo = tmp_path / "repo"
    write_served_repository([build], env, repo)
    name = int8_build.manifest["name"]
    text = (repo / name / "config.pbtxt").read_text()
    assert 'backend: "python"' in text and f'string_value: "{int8_build.out.resolve()}"' in text
    assert f'key: "EXECUTION_ENV_PATH"\n  value: {{ string_value: "{env.root}" }}' in text
    assert "class TritonPythonModel" in (repo / name / "1" / "model.py").read_text()
    deployed = (int8_build.out / f"deploy/triton/{name}/config.pbtxt").read_text()
    for block in ("max_batch_size: 8", "dims: [ 3, 256, 256 ]", "max_queue_delay_microseconds: 0"):
        assert block in text and block in deployed
    if model_config_class() is not None:
        assert check_triton_config(text, name, build[0].io) == []
    argv = TritonServer(env, [repo], [name], http_port=1234).argv()
    assert "--disable-auto-complete-config" in argv and "--http-port=1234" in argv and f"--load-model={name}" in argv
    assert "--http-address=127.0.0.1" in argv


def test_serve_refuses_a_tensorrt_bundle_and_a_changed_engine(int8_build, tmp_path, capsys, caplog):
    from cunet_optimize.serving.server import check_servable

    bundle = tmp_path / "bundle"
    shutil.copytree(int8_build.out, bundle)
    manifest = json.loads((bundle / "build.json").read_text())
    manifest.update(backend="tensorrt", target="h100", engine_built=False)
    (bundle / "build.json").write_text(json.dumps(manifest))
    with pytest.raises(CUNetError, match="Python backend only"):
        check_servable(bundle)
    changed = tmp_path / "changed"
    shutil.copytree(int8_build.out, changed)
    with open(changed / "model.ort.onnx", "ab") as f:
        f.write(b"\0")
    status, _, err = run_cli(["serve", changed], capsys, caplog)
    assert status == 2 and "model.ort.onnx does not match the sha256" in err


# ----- the real server (the environment `serve` creates once; CI creates it in .ci/run)

def _server_env():
    from cunet_optimize.serving.server_env import find_server_env

    env = find_server_env()
    if env is None:
        pytest.skip("the Triton server environment is absent (`cunet-optimize serve` creates it on first use; "
                    "needs the package index)")
    return env


def _serve_json(dirs, mode: str, capsys, caplog) -> dict:
    """`serve DIRS --check|--validate --json` on free ports: its JSON report."""
    http, grpc, metrics = free_ports(3)
    status, out, err = run_cli(["serve", *map(str, dirs), mode, "--json", "--http-port", http, "--grpc-port", grpc,
                                "--metrics-port", metrics], capsys, caplog)
    assert status == 0, err
    return json.loads(out)


@pytest.mark.slow
def test_served_outputs_equal_in_process_over_http_and_grpc(int8_build, landmarks_build, capsys, caplog):
    """One server for two builds: the plain one and the one with the landmark decoder."""
    _server_env()
    reports = _serve_json([int8_build.out, landmarks_build.out], "--check", capsys, caplog)
    for build, outputs in ((int8_build, ["heatmaps"]), (landmarks_build, ["heatmaps", "landmarks"])):
        report = reports[build.manifest["name"]]
        assert report["outputs"] == outputs  # each compared with the engine's, by name
        assert report["http"] == report["grpc"] == "outputs identical to in-process" and report["equal"]
        assert report["batches"] == {"2": 2}  # the two requests, each a batch of 2 images


@pytest.mark.slow
def test_validate_has_the_server_load_each_emitted_repository(int8_build, capsys, caplog):
    _server_env()
    verdicts = _serve_json([int8_build.out], "--validate", capsys, caplog)[str(int8_build.out)]
    loaded = [v for k, v in verdicts.items() if k.startswith("tritonserver")]
    assert loaded == ["config accepted; refused only for the missing onnxruntime backend library"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_server_cleanly(stop, int8_build):
    _server_env()
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "toolkit"),
                                                                  os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "cunet_optimize.cli", "serve", str(int8_build.out), "--http-port",
                             str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # as from a terminal: pytest-xdist's workers ignore SIGINT, and a child
                            # started with it ignored never sees Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), proc.stderr.read() if proc.poll() is not None else line
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped (tritonserver exited with status 0)" in out
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", http), timeout=1).close()
