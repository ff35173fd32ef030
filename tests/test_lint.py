"""lint_model: each rule fires on a graph made to break it, and only where the target cares."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from onnx import TensorProto

from cunet_optimize.errors import CUNetError
from cunet_optimize.surgery.lint import lint_model
from surgery_graphs import GraphBuilder, clean_int8_model

DLA = {"target": "jetson-agx-orin", "dla_core": 0}  # lint_model(model, **DLA)


def rules_of(findings, severity=None):
    return {(f.rule, f.severity) for f in findings if severity is None or f.severity == severity}


def find(findings, rule):
    return [f for f in findings if f.rule == rule]


def conv_graph(opset=17, weight_form="dq", act_scale=0.05, zero_point=0, zp_type=np.int8, axis=0,
               static=False):
    g = GraphBuilder(opset)
    x = g.qdq(g.input("x", [1 if static else "batch", 4, 8, 8]), act_scale, zero_point, zp_type)
    g.output(g.node("Conv", [x, g.weight([6, 4, 1, 1], weight_form, axis=axis)], name="conv"))
    return g.model()


@pytest.mark.parametrize("target", ["jetson-agx-orin", "h100"])
def test_clean_int8_graph_has_no_findings(target):
    assert lint_model(clean_int8_model(), target) == []


def test_clean_int8_graph_on_dla_only_needs_a_static_batch():
    assert rules_of(lint_model(clean_int8_model(), **DLA)) == {("dla-dynamic-shape", "error")}


def test_unsupported_operator_for_tensorrt_but_not_cpu():
    g = GraphBuilder()
    g.output(g.node("Det", [g.input("m", [2, 2])], name="det"))
    findings = lint_model(g.model(), "h100")
    assert [(f.rule, f.severity, f.node) for f in findings] == [("trt-unsupported-op", "error", "det")]
    assert lint_model(g.model(), "cpu") == []


def test_qdq_below_opset_13():
    findings = lint_model(conv_graph(opset=12, weight_form="float"), "cpu")
    assert ("qdq-opset", "error") in rules_of(findings)


def test_int4_needs_opset_21():
    g = GraphBuilder(opset=20)
    ints = g.const(np.zeros((6, 4, 1, 1), dtype=np.int8), onnx_type=TensorProto.INT4)
    w = g.node("DequantizeLinear", [ints, g.const(np.float32(0.1))])
    g.output(g.node("Conv", [g.input("x", [1, 4, 8, 8]), w]))
    assert ("qdq-opset", "error") in rules_of(lint_model(g.model(), "cpu"))


def test_nonzero_zero_point_is_an_error_for_tensorrt_only():
    model = conv_graph(zero_point=3)
    assert {f.node for f in find(lint_model(model, "h100"), "qdq-zero-point")} == {"QuantizeLinear_3", "DequantizeLinear_4"}
    assert lint_model(model, "cpu") == []  # ONNX Runtime runs asymmetric quantization


def test_missing_zero_point_means_uint8():
    g = GraphBuilder()
    q = g.node("QuantizeLinear", [g.input("x", [1, 4, 8, 8]), g.const(np.float32(0.1))], name="q")
    g.output(g.node("DequantizeLinear", [q, g.const(np.float32(0.1))], name="dq"))
    assert [f.node for f in find(lint_model(g.model(), "h100"), "qdq-zero-point")] == ["q"]


def test_uint8_quantization_is_rejected_for_tensorrt():
    findings = lint_model(conv_graph(zero_point=0, zp_type=np.uint8), "t4")
    assert ("qdq-int8-type", "error") in rules_of(findings)


def test_weights_using_minus_128_are_flagged():
    g = GraphBuilder()
    x = g.qdq(g.input("x", [1, 4, 8, 8]), 0.05)
    ints = np.full((6, 4, 1, 1), 5, dtype=np.int8)
    ints[2, 1] = -128
    w = g.node("DequantizeLinear", [g.const(ints), g.const(np.full(6, 0.01, np.float32)), g.const(np.zeros(6, np.int8))], axis=0)
    g.output(g.node("Conv", [x, w], name="conv"))
    findings = lint_model(g.model(), "h100")
    assert [(f.rule, f.severity, f.node) for f in findings] == [("qdq-weight-range", "warning", "conv")]
    assert lint_model(conv_graph(), "h100") == []  # the same graph with weights in [-127, 127]


def test_conv_weights_per_channel_must_be_on_axis_0():
    findings = lint_model(conv_graph(axis=1), "jetson-agx-orin")
    assert [(f.rule, f.severity, f.node) for f in findings] == [("qdq-weight-axis", "error", "conv")]


def test_activations_must_be_per_tensor():
    g = GraphBuilder()
    s, z = g.const(np.full(4, 0.1, np.float32)), g.const(np.zeros(4, np.int8))
    q = g.node("QuantizeLinear", [g.input("x", [1, 4, 8, 8]), s, z], name="act_q", axis=1)
    g.output(g.node("DequantizeLinear", [q, s, z], name="act_dq", axis=1))
    findings = lint_model(g.model(), "h100")
    assert {f.node for f in find(findings, "qdq-activation-per-tensor")} == {"act_q", "act_dq"}


def _mismatched_concat():
    g = GraphBuilder()
    a = g.qdq(g.input("a", [1, 4, 8, 8]), 0.05)
    b = g.qdq(g.input("b", [1, 4, 8, 8]), 0.2)
    g.output(g.qdq(g.node("Concat", [a, b], name="cat", axis=1), 0.2))
    return g.model()


def test_concat_scales_warning_on_gpu_error_on_dla():
    model = _mismatched_concat()
    gpu = find(lint_model(model, "h100"), "qdq-concat-scales")
    dla = find(lint_model(model, **DLA), "qdq-concat-scales")
    assert [(f.severity, f.node) for f in gpu] == [("warning", "cat")]
    assert [(f.severity, f.node) for f in dla] == [("error", "cat")]
    assert find(lint_model(model, "cpu"), "qdq-concat-scales") == []


def test_pooling_scales_warning_on_gpu_error_on_dla():
    g = GraphBuilder()
    x = g.qdq(g.input("x", [1, 4, 8, 8]), 0.05)
    g.output(g.qdq(g.node("MaxPool", [x], name="pool", kernel_shape=[2, 2], strides=[2, 2]), 0.1))
    assert [(f.severity, f.node) for f in find(lint_model(g.model(), "l4"), "qdq-pool-scales")] == [("warning", "pool")]
    assert [(f.severity, f.node) for f in find(lint_model(g.model(), **DLA), "qdq-pool-scales")] == [("error", "pool")]


def _int4_conv_model():
    g = GraphBuilder(opset=21)
    ints = g.const(np.ones((6, 4, 1, 1), dtype=np.int8), onnx_type=TensorProto.INT4)
    w = g.node("DequantizeLinear", [ints, g.const(np.full((6, 1, 1, 1), 0.1, np.float32))], axis=1, block_size=4)
    g.output(g.node("Conv", [g.input("x", [1, 4, 8, 8]), w], name="conv"))
    return g.model()


def test_int4_conv_weights_are_storage_on_gpu_and_refused_on_dla():
    gpu = find(lint_model(_int4_conv_model(), "jetson-orin-nano"), "int4-weights")
    assert [(f.severity, f.node) for f in gpu] == [("warning", "conv")]
    assert "INT4 conv weights are dequantized at build; not executed as INT4" in gpu[0].message
    assert [f.severity for f in find(lint_model(_int4_conv_model(), **DLA), "int4-weights")] == ["error"]


def test_dla_needs_static_shapes():
    model = conv_graph()
    assert [(f.severity, f.node) for f in find(lint_model(model, **DLA), "dla-dynamic-shape")] == [("error", "input:x")]
    assert find(lint_model(model, "jetson-agx-orin"), "dla-dynamic-shape") == []
    assert find(lint_model(conv_graph(static=True), **DLA), "dla-dynamic-shape") == []


def test_dla_refuses_fp32_graphs():
    g = GraphBuilder()
    g.output(g.node("Relu", [g.node("Conv", [g.input("x", [1, 4, 8, 8]), g.weight([6, 4, 1, 1])])]))
    assert ("dla-precision", "error") in rules_of(lint_model(g.model(), **DLA))
    assert ("dla-precision", "error") not in rules_of(lint_model(conv_graph(static=True), **DLA))


def test_dla_concat_only_on_channels():
    g = GraphBuilder()
    x = g.qdq(g.input("x", [1, 4, 8, 8]), 0.1)
    g.output(g.node("Concat", [x, x], name="cat_h", axis=2))
    assert [(f.severity, f.node) for f in find(lint_model(g.model(), **DLA), "dla-concat-axis")] == [("warning", "cat_h")]


@pytest.mark.parametrize("scales,mode,ok", [
    ([1, 1, 2, 2], "nearest", True),
    ([1, 1, 32, 32], "nearest", True),
    ([1, 1, 2.5, 2.5], "nearest", False),
    ([1, 2, 2, 2], "nearest", False),
    ([1, 1, 8, 8], "linear", False),
])
def test_dla_resize_scales(scales, mode, ok):
    g = GraphBuilder()
    x = g.qdq(g.input("x", [1, 4, 8, 8]), 0.1)
    g.output(g.node("Resize", [x, "", g.const(np.array(scales, np.float32))], name="up", mode=mode))
    findings = find(lint_model(g.model(), **DLA), "dla-resize")
    assert (findings == []) is ok


def test_dla_unsupported_operator_falls_back():
    g = GraphBuilder()
    x = g.qdq(g.input("x", [1, 4, 8, 8]), 0.1)
    g.output(g.node("ArgMax", [x], name="argmax", axis=1), TensorProto.INT64)
    findings = find(lint_model(g.model(), **DLA), "dla-unsupported-op")
    assert [(f.severity, f.node) for f in findings] == [("warning", "argmax")]
    assert find(lint_model(g.model(), "jetson-agx-orin"), "dla-unsupported-op") == []


def test_unknown_target_is_a_user_error():
    with pytest.raises(CUNetError, match="unknown target 'xavier'"):
        lint_model(clean_int8_model(), "xavier")


def _cli(argv):
    from cunet_optimize.commands import lint as lint_command

    parser = argparse.ArgumentParser()
    lint_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_exit_code_and_json(tmp_path, capsys):
    import onnx

    clean, broken = tmp_path / "clean.onnx", tmp_path / "broken.onnx"
    onnx.save(clean_int8_model(), clean)
    onnx.save(_mismatched_concat(), broken)
    assert _cli(["lint", str(clean), "--target", "h100"]) == 0
    assert _cli(["lint", str(broken), "--target", "h100"]) == 0  # warnings only
    capsys.readouterr()
    assert _cli(["lint", str(broken), "--target", "jetson-agx-orin", "--dla-core", "0", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    # this two-input, convolution-free graph is no CU-Net, and the CLI says so (a warning)
    assert report["errors"] == 1 and [f["rule"] for f in report["findings"]] == ["qdq-concat-scales", "cunet-graph"]


def test_exported_fp16_static_cunet_is_clean_for_dla(tmp_path):
    import torch

    from conftest import tiny_config
    from cunet_optimize.exporters import export_onnx
    from cunet_optimize.models import CUNet

    torch.manual_seed(0)
    export_onnx(CUNet(tiny_config()), tmp_path / "half.onnx", fp16=True, dynamic_batch=False)
    assert lint_model(tmp_path / "half.onnx", **DLA) == []
    assert lint_model(tmp_path / "half.onnx", "h100") == []


def test_lint_reads_the_target_registry_and_the_dla_core(monkeypatch):
    from dataclasses import replace

    from cunet_optimize import targets
    from cunet_optimize.surgery.lint import lint_target

    # a target added to the registry is lintable (and buildable: default_passes reads the same)
    monkeypatch.setitem(targets.TARGETS, "thor", replace(targets.TARGETS["jetson-agx-orin"], name="thor", dla_cores=1))
    assert lint_target("thor").backend == "tensorrt" and not lint_target("thor").dla
    assert lint_target("thor", 0).dla
    with pytest.raises(CUNetError, match="DLA core 1 does not exist on thor; it has cores 0..0"):
        lint_target("thor", 1)
    with pytest.raises(CUNetError, match="target t4 has no DLA cores"):
        lint_target("t4", 0)
    with pytest.raises(CUNetError, match="--target jetson-agx-orin --dla-core N"):
        lint_target("jetson-agx-orin-dla")
    # the DLA rules apply only with a DLA core
    assert find(lint_model(conv_graph(), "jetson-orin-nx", dla_core=1), "dla-dynamic-shape")
    assert not find(lint_model(conv_graph(), "jetson-orin-nx"), "dla-dynamic-shape")


def test_cli_dla_core_flag(tmp_path, capsys):
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(conv_graph(), model)  # dynamic batch: an error on the DLA only
    assert _cli(["lint", str(model), "--target", "jetson-agx-orin"]) == 0
    assert _cli(["lint", str(model), "--target", "jetson-agx-orin", "--dla-core", "1"]) == 1
    assert "for jetson-agx-orin DLA core 1: 1 error(s)" in capsys.readouterr().out
    with pytest.raises(CUNetError, match="DLA core 2 does not exist on jetson-agx-orin"):
        _cli(["lint", str(model), "--target", "jetson-agx-orin", "--dla-core", "2"])
