"""ONNX Runtime builder and runners on a tiny exported CU-Net, against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cunet_optimize.engines import EngineBuilder, TorchRunner, get_builder
from cunet_optimize.engines.base import final_head
from cunet_optimize.engines.onnxrt import (
    OnnxRuntimeBuilder,
    OnnxRuntimeReferenceRunner,
    OnnxRuntimeRunner,
    OnnxRuntimeSessionRunner,
    OrtSettings,
    thread_candidates,
)
from cunet_optimize.errors import CUNetError
from cunet_optimize.models import CUNet, CUNetConfig

TINY = CUNetConfig(num_unets=2, order=1, num_classes=4, width=8, growth_rate=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny trained-looking CU-Net (random BN statistics), its ONNX export, and a batch."""
    torch.manual_seed(0)
    model = CUNet(TINY).eval()
    with torch.no_grad():  # non-trivial running statistics so BN folding is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("onnx") / "tiny_cunet.onnx"
    torch.onnx.export(
        model,
        (torch.rand(1, 3, 256, 256),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=[f"heatmaps_{i}" for i in range(TINY.num_heads)],
        dynamic_axes={"image": {0: "batch"}},
    )
    batch = np.random.default_rng(0).random((2, 3, 256, 256), dtype=np.float32)
    with TorchRunner(model) as runner:
        expected = runner.infer(batch)
    return model, path, batch, expected


def test_torch_runner_returns_the_last_head(tiny):
    model, _, batch, expected = tiny
    assert expected.shape == (2, TINY.num_classes, 64, 64) and expected.dtype == np.float32
    with torch.no_grad():
        heads = model(torch.from_numpy(batch))
    np.testing.assert_array_equal(expected, heads[-1].numpy())
    assert not np.allclose(expected, heads[0].numpy())  # really the last, not the first


def test_builder_writes_optimised_model_and_session_json(tiny, tmp_path):
    _, onnx_path, batch, expected = tiny
    builder = OnnxRuntimeBuilder(intra_op_threads=1)
    assert isinstance(builder, EngineBuilder)
    result = builder.build(onnx_path, "cpu", "fp32", tmp_path / "build")
    assert result.engine_built and result.backend == "onnxruntime"
    model_file = tmp_path / "build" / "model.ort.onnx"
    assert result.artifacts["model"] == str(model_file) and model_file.is_file()
    session = json.loads((tmp_path / "build" / "session.json").read_text())
    assert session["optimization"] == "all" and session["intra_op_threads"] == 1
    assert session["execution_mode"] == "sequential" and session["qdq_flavour"] is None
    assert session["model"] == "model.ort.onnx" and session["precision"] == "fp32"
    assert session == result.settings

    # The saved graph is really the optimised one: the stem's Conv -> BN is folded (the other
    # BNs follow a Concat, CU-Net being pre-activation, and stay).
    def count_bn(path):
        return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)

    assert count_bn(model_file) < count_bn(onnx_path)
    assert not list(tmp_path.joinpath("build").glob(".*partial"))
    with OnnxRuntimeRunner(tmp_path / "build") as runner:
        assert runner.input_shape == (None, 3, 256, 256)
        out = runner.infer(batch)
        assert runner.inference_time is not None and runner.inference_time > 0
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_thread_candidates():
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1, 2]
    assert thread_candidates(6) == [1, 2, 4, 6]
    assert thread_candidates(8) == [1, 2, 4, 8]


def test_usable_cpus_are_the_affinity_capped_by_the_container_quota_and_the_thread_budget(tmp_path, monkeypatch):
    from cunet_optimize.engines import onnxrt

    monkeypatch.setattr(onnxrt.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(onnxrt, "CGROUP_CPU_MAX", tmp_path / "absent")
    monkeypatch.delenv(onnxrt.CPU_THREADS_ENV, raising=False)
    assert onnxrt.usable_cpus() == 64  # no cgroup v2 limit, no budget: the affinity
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(onnxrt, "CGROUP_CPU_MAX", cpu_max)
    for line, expected in (("max 100000", 64), ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1)):
        cpu_max.write_text(line + "\n")  # `docker run --cpus 2`, 1.5, 0.5
        assert onnxrt.usable_cpus() == expected, line
    monkeypatch.setenv(onnxrt.CPU_THREADS_ENV, "1")
    assert onnxrt.usable_cpus() == 1 and thread_candidates() == [1]
    monkeypatch.setenv(onnxrt.CPU_THREADS_ENV, "8")  # a budget above the CPUs there are: the CPUs
    assert onnxrt.usable_cpus() == 1
    for bad in ("0", "two", "-1", ""):
        monkeypatch.setenv(onnxrt.CPU_THREADS_ENV, bad)
        with pytest.raises(CUNetError, match=r"\$CUNET_CPU_THREADS=.*whole number of threads"):
            onnxrt.usable_cpus()


def test_builder_times_thread_counts_unless_pinned(tiny, tmp_path, monkeypatch):
    _, onnx_path, batch, expected = tiny
    # two usable CPUs: the builder times 1 and 2 threads and keeps the faster
    monkeypatch.setattr("cunet_optimize.engines.onnxrt.usable_cpus", lambda: 2)
    result = OnnxRuntimeBuilder().build(onnx_path, "cpu", "fp32", tmp_path / "tuned")
    tuning = result.settings["thread_tuning_ms"]
    assert set(tuning) == {"1", "2"} and all(ms > 0 for ms in tuning.values())
    assert result.settings["intra_op_threads"] == int(min(tuning, key=tuning.get))
    assert any("intra-op threads timed" in n for n in result.notes)
    with OnnxRuntimeRunner(tmp_path / "tuned") as runner:  # the runner uses the stored count
        assert runner.settings.intra_op_threads == result.settings["intra_op_threads"]
        np.testing.assert_allclose(runner.infer(batch), expected, atol=1e-4, rtol=1e-4)

    pinned = OnnxRuntimeBuilder(intra_op_threads=2).build(onnx_path, "cpu", "fp32", tmp_path / "pinned")
    assert pinned.settings["intra_op_threads"] == 2 and pinned.settings["thread_tuning_ms"] is None
    untuned = OnnxRuntimeBuilder(tune_threads=False).build(onnx_path, "cpu", "fp32", tmp_path / "untuned")
    assert untuned.settings["intra_op_threads"] == 0 and untuned.settings["thread_tuning_ms"] is None


def test_reference_runner_matches_pytorch(tiny):
    _, onnx_path, batch, expected = tiny
    with OnnxRuntimeReferenceRunner(onnx_path, intra_op_threads=1) as runner:
        assert runner.settings.optimization == "disable"
        out = runner.infer(batch[:1])  # dynamic batch: 1 works as well as 2
    np.testing.assert_allclose(out, expected[:1], atol=1e-4, rtol=1e-4)


def test_runner_rejects_a_batch_of_the_wrong_shape_or_type(tiny):
    _, onnx_path, batch, _ = tiny
    with OnnxRuntimeReferenceRunner(onnx_path) as runner:
        with pytest.raises(CUNetError, match="takes Bx3x256x256"):
            runner.infer(batch[:, :, :128, :128].copy())
        with pytest.raises(CUNetError, match="float32"):
            runner.infer(batch.astype(np.float64))
    with pytest.raises(RuntimeError, match="activate"):
        OnnxRuntimeReferenceRunner(onnx_path).infer(batch)


def test_builder_options_override_and_are_validated(tiny, tmp_path):
    _, onnx_path, *_ = tiny
    result = get_builder("cpu").build(
        onnx_path, "cpu", "fp32", tmp_path, {"optimization": "basic", "execution_mode": "parallel"}
    )
    assert result.settings["optimization"] == "basic" and result.settings["execution_mode"] == "parallel"
    with pytest.raises(CUNetError, match="unknown ONNX Runtime option"):
        OnnxRuntimeBuilder().build(onnx_path, "cpu", "fp32", tmp_path, {"threads": 2})
    with pytest.raises(CUNetError, match="optimisation level 'max'"):
        OnnxRuntimeBuilder(optimization="max")
    with pytest.raises(CUNetError, match="intra_op_threads must be an integer"):
        OnnxRuntimeBuilder(intra_op_threads=-1)


def test_builder_refuses_what_the_cpu_target_cannot_run(tiny, tmp_path):
    _, onnx_path, *_ = tiny
    with pytest.raises(CUNetError, match="target cpu cannot run precision fp16; it runs: fp32, int8"):
        OnnxRuntimeBuilder().build(onnx_path, "cpu", "fp16", tmp_path)
    with pytest.raises(CUNetError, match="t4 is a tensorrt target"):
        OnnxRuntimeBuilder().build(onnx_path, "t4", "fp32", tmp_path)
    with pytest.raises(CUNetError, match="no QuantizeLinear/DequantizeLinear"):
        OnnxRuntimeBuilder().build(onnx_path, "cpu", "int8", tmp_path)
    with pytest.raises(CUNetError, match="applies to int8 and int4 builds only"):
        OnnxRuntimeBuilder(qdq_flavour="int8-symmetric").build(onnx_path, "cpu", "fp32", tmp_path)
    with pytest.raises(CUNetError, match="unknown Q/DQ flavour 'int7'"):
        OnnxRuntimeBuilder(qdq_flavour="int7")
    assert not (tmp_path / "session.json").exists()


def test_runner_on_a_folder_without_a_build_says_what_to_do(tmp_path):
    with pytest.raises(CUNetError, match="missing session.json"):
        OnnxRuntimeRunner(tmp_path)
    (tmp_path / "session.json").write_text('{"schema": "other"}')
    with pytest.raises(CUNetError, match="schema"):
        OnnxRuntimeRunner(tmp_path)


# --------------------------------------------------------------------------------------
# Q/DQ flavours: a hand-made DQ -> Conv -> Q graph with TensorRT-style int8 activations


def _qdq_conv_onnx(path, activation_type=TensorProto.INT8):
    """x -> Q -> DQ -> Conv(W via DQ, per-channel int8) -> Q -> DQ -> y, symmetric scales."""
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, size=(4, 3, 3, 3), dtype=np.int8)
    zp_dtype = np.int8 if activation_type == TensorProto.INT8 else np.uint8
    inits = [
        numpy_helper.from_array(np.array(1 / 127, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, zp_dtype), "x_zero"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, zp_dtype), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["image", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "y_zero"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["heatmap"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 256, 256])],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["batch", 4, 256, 256])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_int8_symmetric_flavour_records_and_applies_its_session_entry(tmp_path):
    onnx_path = _qdq_conv_onnx(tmp_path / "qdq.onnx")
    plain = OnnxRuntimeBuilder(optimization="extended").build(onnx_path, "cpu", "int8", tmp_path / "plain")
    fused = OnnxRuntimeBuilder(optimization="extended", qdq_flavour="int8-symmetric").build(
        onnx_path, "cpu", "int8", tmp_path / "fused"
    )
    session = json.loads((tmp_path / "fused" / "session.json").read_text())
    assert session["qdq_flavour"] == "int8-symmetric"
    assert session["session_config"] == {"session.qdqisint8allowed": "1"}
    assert any("no Q/DQ flavour given" in n for n in plain.notes)
    # Optimised builds run integer kernels: DQ -> Conv -> Q became QLinearConv. (ONNX Runtime
    # 1.32 on x86-64 fuses int8 activations with or without the flavour's entry, contrary to
    # docs/QUANT_RULES.md; the second assertion records that and fails when it changes.)
    ops = lambda build: {n.op_type for n in onnx.load(build.artifacts["model"]).graph.node}  # noqa: E731
    assert "QLinearConv" in ops(fused)
    assert "QLinearConv" in ops(plain)
    # Fused integer kernels and the float-simulated reference agree up to rounding: within
    # one output quantization step (y_scale = 0.05) everywhere.
    batch = np.random.default_rng(2).random((1, 3, 256, 256), dtype=np.float32)
    with OnnxRuntimeRunner(tmp_path / "fused") as fast, OnnxRuntimeReferenceRunner(onnx_path) as reference:
        diff = np.abs(fast.infer(batch) - reference.infer(batch))
    assert diff.max() <= 0.05 + 1e-6


def test_session_runner_takes_settings_directly(tmp_path):
    onnx_path = _qdq_conv_onnx(tmp_path / "qdq.onnx", activation_type=TensorProto.UINT8)
    batch = np.random.default_rng(3).random((1, 3, 256, 256), dtype=np.float32)
    settings = OrtSettings(optimization="all", intra_op_threads=1)
    with OnnxRuntimeSessionRunner(onnx_path, settings, load_optimization="all") as runner:
        out = runner.infer(batch)
    with OnnxRuntimeReferenceRunner(onnx_path) as reference:
        ref = reference.infer(batch)
    assert out.shape == (1, 4, 256, 256)
    assert np.abs(out - ref).max() <= 0.05 + 1e-6


def test_final_head_skips_a_decoded_landmarks_output():
    assert final_head([("heatmaps_0", 4), ("heatmaps_1", 4), ("landmarks", 3)]) == "heatmaps_1"
    assert final_head([("out_a", 4), ("out_b", 4)]) == "out_b"
    assert final_head([("only", 2)]) == "only"


def test_runner_returns_heatmaps_when_the_export_appends_landmarks(tiny, tmp_path):
    _, onnx_path, batch, expected = tiny
    model = onnx.load(str(onnx_path))
    last = model.graph.output[-1].name
    # A stand-in for the export's landmark decoder: one more output, of rank 3, after the heads.
    model.graph.node.append(helper.make_node("ReduceMax", [last], ["landmarks"], axes=[3], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, None))
    model.graph.output[-1].type.tensor_type.shape.dim.extend([onnx.TensorShapeProto.Dimension()] * 3)
    with_landmarks = tmp_path / "with_landmarks.onnx"
    onnx.save(model, str(with_landmarks))
    OnnxRuntimeBuilder().build(with_landmarks, "cpu", "fp32", tmp_path / "build")
    with OnnxRuntimeRunner(tmp_path / "build") as runner:
        np.testing.assert_allclose(runner.infer(batch), expected, atol=1e-4, rtol=1e-4)
