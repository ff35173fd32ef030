"""Surgery passes: each one runs the graph in ONNX Runtime (ORT_DISABLE_ALL; BASIC for
INT4) before and after on the same inputs. Tolerance for exact passes: max |after -
before| <= 1e-5 * range of the outputs (only float summation order changes)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto

from conftest import tiny_config
from cunet_optimize.data.synth import verification_batch
from cunet_optimize.errors import CUNetError
from cunet_optimize.exporters import export_onnx
from cunet_optimize.models import CUNet
from cunet_optimize.onnx_tools.graph import to_model
from cunet_optimize.onnx_tools.verify import random_feeds, run_onnxruntime
from cunet_optimize.quant import parse_precision, post_training_quantize
from cunet_optimize.surgery import (
    activation_memory, check_weight_axes, check_zero_points, cleanup, flatten_nested_concats, fold_batchnorm,
    dequantize_weights, fold_dense_concats, lint_model, pack_int4_weights, remove_redundant_qdq, run_surgery, tie_concat_qdq_scales,
)
from surgery_graphs import GraphBuilder, clean_int8_model, dense_concat_model

EXACT = 1e-5


def apply(model: onnx.ModelProto, pass_fn, **kwargs):
    graph = gs.import_onnx(model)
    report = pass_fn(graph, **kwargs)
    out = to_model(graph)
    onnx.checker.check_model(out, full_check=True)
    return out, report


def assert_same_outputs(before, after, level="disable_all", tol=EXACT, batch=1):
    feeds = random_feeds(before, batch=batch, seed=1)
    a, b = run_onnxruntime(before, feeds, level), run_onnxruntime(after, feeds, level)
    assert a.keys() == b.keys()
    for name in a:
        scale = max(float(np.ptp(a[name])), 1e-12)
        assert np.abs(a[name] - b[name]).max() <= tol * scale, name


def ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("surgery") / "tiny.onnx"
    export_onnx(CUNet(tiny_config()), path)
    return onnx.load(str(path))


# ----------------------------------------------------------------------------- dense concats


def test_fold_dense_concats_on_cunet(tiny_onnx):
    folded, report = apply(tiny_onnx, fold_dense_concats)
    assert_same_outputs(tiny_onnx, folded, batch=2)
    concats = ops(tiny_onnx).count("Concat")
    assert (report.concats_before, report.concats_after) == (concats, 0)
    assert report.concat_bytes_before > 0 and report.concat_bytes_after == 0
    assert report.nodes_after == len(folded.graph.node) > report.nodes_before
    # every dense layer and adapter opened with a concat: none of them is materialised now
    assert "Concat" not in ops(folded)


def test_fold_gives_each_consumer_its_own_branches():
    model = dense_concat_model(widths=(4, 3, 2), consumers=2)
    folded, report = apply(model, fold_dense_concats)
    assert_same_outputs(model, folded)
    assert report.rewrites == 1 and "Concat" not in ops(folded)
    # 2 consumers x 3 segments, each with its own BN slice and weight slice; 2 adds per consumer
    assert ops(folded).count("BatchNormalization") == 6 and ops(folded).count("Conv") == 6 and ops(folded).count("Add") == 4
    widths = sorted(i.dims[1] for i in folded.graph.initializer if len(i.dims) == 4)
    assert widths == [2, 2, 3, 3, 4, 4]


def test_concat_read_by_something_else_is_kept():
    model = dense_concat_model(extra_consumer=True)
    folded, report = apply(model, fold_dense_concats)
    assert report.rewrites == 0 and ops(folded) == ops(model)
    assert any("a consumer (Sigmoid)" in note for note in report.notes)


@pytest.mark.parametrize("weight_form", ["dq", "qdq"])
def test_fold_with_qdq_splits_weights_and_activations(weight_form):
    model = dense_concat_model(widths=(4, 3), consumers=2, quantized=True, weight_form=weight_form)
    folded, report = apply(model, fold_dense_concats)
    assert_same_outputs(model, folded)
    assert "Concat" not in ops(folded)
    g = gs.import_onnx(folded)
    act_q = [n for n in g.nodes if n.op == "QuantizeLinear" and not isinstance(n.inputs[0], gs.Constant)]
    assert len(act_q) == 4 and {float(n.inputs[1].values) for n in act_q} == {float(np.float32(0.05))}
    original = {n.name: n for n in gs.import_onnx(model).nodes}
    for conv in [n for n in g.nodes if n.op == "Conv"]:
        dq = conv.inputs[1].inputs[0]
        assert dq.op == "DequantizeLinear" and dq.attrs["axis"] == 0
        # per-channel scales stay on axis 0 and unchanged: the original Conv's weight scale
        src = original[conv.name.split("/")[0]].inputs[1].inputs[0]
        np.testing.assert_array_equal(dq.inputs[1].values, src.inputs[1].values)


def test_fold_with_per_segment_scales():
    model = dense_concat_model(widths=(4, 3), consumers=1, quantized=True, weight_form="dq")
    folded, _ = apply(model, fold_dense_concats, segment_scales={"conv0": [0.02, 0.08]})
    g = gs.import_onnx(folded)
    act_q = sorted(float(n.inputs[1].values) for n in g.nodes if n.op == "QuantizeLinear")
    assert act_q == pytest.approx([0.02, 0.08])
    with pytest.raises(CUNetError, match="2 inputs"):
        apply(model, fold_dense_concats, segment_scales={"conv0": [0.02]})


def test_flatten_nested_concats():
    g = GraphBuilder()
    a, b, c = (g.input(n, [1, 2, 4, 4]) for n in "abc")
    inner = g.node("Concat", [b, c], axis=1)
    g.output(g.node("Relu", [g.node("Concat", [a, inner], axis=-3)]))
    model = g.model()
    flat, report = apply(model, flatten_nested_concats)
    assert_same_outputs(model, flat)
    assert ops(flat) == ["Concat", "Relu"] and report.rewrites == 1
    assert list(flat.graph.node[0].input) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- batchnorm / cleanup


def _bn_graph(padded_conv: bool):
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    p = g.node("Conv", [g.bn(x, 3), g.weight([4, 3, 3, 3])], pads=[1, 1, 1, 1] if padded_conv else [0, 0, 0, 0])  # BN -> Conv
    y = g.bn(g.node("Conv", [p, g.weight([5, 4, 3, 3]), g.const(np.ones(5, np.float32))], pads=[1, 1, 1, 1]), 5)  # Conv -> BN
    g.output(g.node("Conv", [g.node("Relu", [g.bn(y, 5)]), g.weight([2, 5, 1, 1])]))  # BN -> ReLU -> Conv: y has 2 readers
    g.output(g.node("Sigmoid", [y]))
    return g.model()


def test_fold_batchnorm_exact_cases_only():
    model = _bn_graph(padded_conv=False)
    folded, report = apply(model, fold_batchnorm)
    assert_same_outputs(model, folded)
    assert report.rewrites == 2 and ops(folded).count("BatchNormalization") == 1
    assert any("BN -> ReLU" in note for note in report.notes)


def test_fold_batchnorm_keeps_bn_before_padded_conv():
    model = _bn_graph(padded_conv=True)
    folded, report = apply(model, fold_batchnorm)
    assert_same_outputs(model, folded)
    assert report.rewrites == 1 and ops(folded).count("BatchNormalization") == 2


def test_fold_batchnorm_on_cunet_is_exact(tiny_onnx):
    folded, _ = apply(tiny_onnx, fold_batchnorm)
    assert_same_outputs(tiny_onnx, folded)


def test_cleanup_removes_identities_and_folds_constants():
    g = GraphBuilder()
    w = g.node("Mul", [g.weight([4, 3, 1, 1]), g.const(np.float32(2.0))])
    y = g.node("Identity", [g.node("Conv", [g.input("x", [1, 3, 8, 8]), w])])
    g.output(g.node("Identity", [g.node("Relu", [y])]))
    model = g.model()
    clean, report = apply(model, cleanup)
    assert_same_outputs(model, clean)
    assert ops(clean) == ["Conv", "Relu"] and [o.name for o in clean.graph.output] == [o.name for o in model.graph.output]


# ----------------------------------------------------------------------------- Q/DQ hygiene


def test_tie_concat_qdq_scales():
    g = GraphBuilder()
    a = g.qdq(g.input("a", [1, 4, 8, 8]), 0.05)
    b = g.qdq(g.input("b", [1, 4, 8, 8]), 0.2)
    cat = g.qdq(g.node("Concat", [a, b], axis=1), 0.1)
    pooled = g.qdq(g.node("MaxPool", [cat], kernel_shape=[2, 2], strides=[2, 2]), 0.3)
    g.output(g.node("Conv", [pooled, g.weight([2, 8, 1, 1], "dq")]))
    model = g.model()
    assert lint_model(model, "jetson-agx-orin", dla_core=0, rules=["qdq-concat-scales", "qdq-pool-scales"])
    tied, report = apply(model, tie_concat_qdq_scales)
    scales = {float(n.inputs[1].values) for n in gs.import_onnx(tied).nodes
              if n.op in ("QuantizeLinear", "DequantizeLinear") and np.size(n.inputs[1].values) == 1}
    assert scales == {float(np.float32(0.3))}  # the largest scale of the group: nothing is clipped
    assert report.rewrites == 1
    assert lint_model(tied, "jetson-agx-orin", dla_core=0, rules=["qdq-concat-scales", "qdq-pool-scales"]) == []


def test_remove_redundant_qdq_collapses_equal_pairs():
    g = GraphBuilder()
    x = g.qdq(g.qdq(g.input("x", [1, 4, 8, 8]), 0.1), 0.1)
    y = g.qdq(g.qdq(g.input("y", [1, 4, 8, 8]), 0.1), 0.2)  # different scales: both pairs stay
    g.output(g.node("Conv", [g.node("Add", [x, y]), g.weight([2, 4, 1, 1], "dq")]))
    model = g.model()
    out, report = apply(model, remove_redundant_qdq)
    assert_same_outputs(model, out, tol=0.0)
    assert report.rewrites == 1
    assert ops(out).count("QuantizeLinear") == 3 and ops(out).count("DequantizeLinear") == 4


def test_check_zero_points_and_weight_axes():
    clean = gs.import_onnx(clean_int8_model())
    check_zero_points(clean)
    check_weight_axes(clean)
    g = GraphBuilder()
    x = g.qdq(g.input("x", [1, 4, 8, 8]), 0.1, zero_point=5)
    g.output(g.node("Conv", [x, g.weight([2, 4, 1, 1], "dq", axis=1)], name="conv"))
    with pytest.raises(CUNetError, match="zero point"):
        check_zero_points(gs.import_onnx(g.model()))
    with pytest.raises(CUNetError, match="conv: Conv weights quantized per channel on axis 1"):
        check_weight_axes(gs.import_onnx(g.model()))


# ----------------------------------------------------------------------------- INT4


def _int4_candidate(opset=21):
    g = GraphBuilder(opset=opset)
    rng = np.random.default_rng(0)
    ints = rng.integers(-8, 8, size=(6, 8, 3, 3)).astype(np.int8)
    scale = rng.uniform(0.01, 0.05, size=(6, 2, 3, 3)).astype(np.float32)  # blocks of 4 input channels
    w = g.node("DequantizeLinear", [g.const(ints), g.const(scale)], axis=1, block_size=4)
    g.output(g.node("Conv", [g.input("x", [1, 8, 8, 8]), w], name="conv", pads=[1, 1, 1, 1]))
    return g.model(), ints


def test_pack_int4_block_weights():
    model, ints = _int4_candidate()
    packed, report = apply(model, pack_int4_weights)
    assert_same_outputs(model, packed, level="basic", tol=0.0)
    stored = [i for i in packed.graph.initializer if i.data_type == TensorProto.INT4]
    assert len(stored) == 1 and len(stored[0].raw_data or bytes(stored[0].int32_data)) <= ints.size // 2 + 1
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(stored[0]).astype(np.int8), ints)
    dq = [n for n in packed.graph.node if n.op_type == "DequantizeLinear"][0]
    assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": 4}
    assert report.rewrites == 1


def test_pack_int4_needs_opset_21():
    model, _ = _int4_candidate(opset=20)
    with pytest.raises(CUNetError, match="opset 21"):
        apply(model, pack_int4_weights)


def test_pack_int4_from_float_weights_on_a_grid():
    g = GraphBuilder(opset=21)
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.01, 0.05, size=(4, 2, 1, 1)).astype(np.float32)
    ints = rng.integers(-7, 8, size=(4, 6, 1, 1))
    w = (ints * np.repeat(scale, 4, axis=1)[:, :6]).astype(np.float32)  # 6 channels: last block is partial
    g.output(g.node("Conv", [g.input("x", [1, 6, 8, 8]), g.const(w)], name="conv"))
    model = g.model()
    packed, report = apply(model, pack_int4_weights, block_scales={"conv": (scale, 4)})
    assert_same_outputs(model, packed, level="basic", tol=1e-6)
    assert report.rewrites == 1
    with pytest.raises(CUNetError, match="not on the given 4-bit grid"):
        apply(model, pack_int4_weights, block_scales={"conv": (scale * 1.37, 4)})


class FakeQuantConv(torch.nn.Module):
    """One conv whose weight is fake-quantized per output channel to [qmin, qmax] (symmetric
    scale, zero point 0), as our weight quantizers export."""

    def __init__(self, qmin: int, qmax: int):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.conv = torch.nn.Conv2d(3, 4, 4, stride=4, bias=False)

    def forward(self, x):
        w = self.conv.weight
        s = w.detach().abs().amax(dim=(1, 2, 3)) / self.qmax
        w = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(4, dtype=torch.int32), 0, self.qmin, self.qmax)
        return [torch.nn.functional.conv2d(x, w, stride=4)]


def test_pack_int4_fake_quant_export(tmp_path):
    """A 4-bit fake-quantized conv (quant range [-8, 7]) exported at opset 21 packs exactly."""
    torch.manual_seed(0)
    export_onnx(FakeQuantConv(-8, 7), tmp_path / "int4.onnx", opset=21)
    model = onnx.load(str(tmp_path / "int4.onnx"))
    packed, report = apply(model, pack_int4_weights)
    assert report.rewrites == 1
    assert_same_outputs(model, packed, level="basic", tol=0.0)
    assert any(i.data_type == TensorProto.INT4 for i in packed.graph.initializer)


def test_pack_pass_stores_int8_qdq_weights_of_a_mixed_graph_as_integers(tmp_path):
    """Beside INT4 convs (opset 21), an INT8 fake-quant weight is stored as INT8, exactly."""
    torch.manual_seed(0)
    export_onnx(FakeQuantConv(-128, 127), tmp_path / "int8.onnx", opset=21)
    model = onnx.load(str(tmp_path / "int8.onnx"))
    graph = gs.import_onnx(model)
    report = pack_int4_weights(graph)
    packed = to_model(graph)
    assert report.rewrites == 1
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4 for i in packed.graph.initializer)
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4 for i in packed.graph.initializer)
    feeds = random_feeds(model, batch=1, seed=1)
    a, b = run_onnxruntime(model, feeds, "disable_all"), run_onnxruntime(packed, feeds, "disable_all")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_dequantize_weights_leaves_float_initializers_on_the_grid():
    """TensorRT's INT4 form: the INT4 DequantizeLinear becomes the float weight it computes."""
    model, ints = _int4_candidate()
    packed, _ = apply(model, pack_int4_weights)
    for source in (model, packed):
        plain, report = apply(source, dequantize_weights)
        assert report.rewrites == 1 and "DequantizeLinear" not in ops(plain)
        assert not any(i.data_type == TensorProto.INT4 for i in plain.graph.initializer)
        assert_same_outputs(source, plain, level="basic", tol=0.0)


# ----------------------------------------------------------------------------- memory


def test_activation_memory_hand_computed():
    g = GraphBuilder()
    a = g.node("Relu", [g.input("x", [1, 2, 4, 4])], name="relu_a")  # 32 floats = 128 bytes each
    b = g.node("Relu", [a], name="relu_b")
    g.output(g.node("Concat", [a, b], name="cat", axis=1))  # 256 bytes
    m = activation_memory(g.model(), batch=1)
    assert m["node_output_bytes"] == {"relu_a": 128, "relu_b": 128, "cat": 256}
    assert m["concat_count"] == 1 and m["concat_output_bytes"] == 256
    # step 0: x + a = 256; step 1: a + b = 256; step 2: a + b + cat = 512
    assert m["peak_bytes"] == 512 and m["peak_nodes"] == ["cat"]
    assert {t["name"] for t in m["peak_live_tensors"]} == {"relu_a_out0", "relu_b_out0", "cat_out0"}


def test_activation_memory_fuses_conv_epilogues_and_qdq_chains():
    g = GraphBuilder()
    x = g.input("x", [1, 2, 4, 4])  # 128 bytes of float, 32 as uint8
    scale, zp = g.const(np.float32(0.1)), g.const(np.uint8(0))
    w = g.node("DequantizeLinear", [g.const(np.ones((2, 2, 1, 1), np.int8)), g.const(np.float32(0.5))],
               name="w_dq")  # a weight: folded at load, never an activation
    xq = g.node("QuantizeLinear", [x, scale, zp], name="x_q")
    conv = g.node("Conv", [g.node("DequantizeLinear", [xq, scale, zp], name="x_dq"), w], name="qconv")
    yq = g.node("QuantizeLinear", [g.node("Relu", [conv], name="qrelu"), scale, zp], name="y_q")
    # float island: conv -> BN -> ReLU runs as one kernel, its output is a Concat input
    y = g.node("DequantizeLinear", [yq, scale, zp], name="y_dq")
    bn = [g.const(np.ones(2, np.float32)), g.const(np.zeros(2, np.float32))]
    fconv = g.node("Conv", [y, g.const(np.ones((2, 2, 1, 1), np.float32))], name="fconv")
    act = g.node("Relu", [g.node("BatchNormalization", [fconv, *bn, *bn], name="bn")], name="relu")
    g.output(g.node("Concat", [y, act], name="cat", axis=1))
    model = g.model()
    fused, naive = activation_memory(model), activation_memory(model, fuse=False)
    assert fused["node_output_bytes"] == {"w_dq": 0, "x_q": 32, "x_dq": 0, "qconv": 0, "qrelu": 0, "y_q": 32,
                                          "y_dq": 128, "fconv": 0, "bn": 0, "relu": 128, "cat": 256}
    # step "cat": y_dq + relu + cat live
    assert fused["peak_bytes"] == 512 and fused["peak_nodes"] == ["cat"]
    assert naive["node_output_bytes"]["qconv"] == 128 and naive["node_output_bytes"]["fconv"] == 128
    assert naive["node_output_bytes"]["w_dq"] == 0  # weights stay weights either way


def test_activation_memory_matches_the_graph_onnxruntime_runs(tmp_path):
    """The fusion model, on an INT8 graph, against ONNX Runtime's own optimised graph
    (QLinearConv, uint8 Concat/MaxPool/Resize: no Q/DQ left to model)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = CUNet(tiny_config()).eval()
    images = verification_batch(4)
    q, _, _ = post_training_quantize(model, parse_precision("int8-convin"), [torch.from_numpy(images)], "max",
                                     progress=False)
    export_onnx(q.eval(), tmp_path / "int8.onnx")
    integer = run_surgery(onnx.load(str(tmp_path / "int8.onnx")), target="cpu",
                          pass_options={"integer_dataflow": {"calibration": images}}).model
    onnx.save(integer, tmp_path / "integer.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(tmp_path / "integer.onnx"), options, providers=["CPUExecutionProvider"])
    executed = onnx.load(str(tmp_path / "ort.onnx"))
    assert "QLinearConv" in ops(executed) and ops(executed).count("DequantizeLinear") <= 2  # the float head's
    estimated, actual = activation_memory(integer), activation_memory(executed, fuse=False)
    assert actual["unknown_shapes"] == []
    assert estimated["peak_bytes"] == actual["peak_bytes"]
    assert estimated["total_node_output_bytes"] == actual["total_node_output_bytes"]
    assert activation_memory(integer, fuse=False)["peak_bytes"] > estimated["peak_bytes"]


def test_activation_memory_scales_with_batch(tiny_onnx):
    one, two = activation_memory(tiny_onnx, batch=1), activation_memory(tiny_onnx, batch=2)
    assert two["peak_bytes"] == 2 * one["peak_bytes"] and two["concat_output_bytes"] == 2 * one["concat_output_bytes"]
    assert one["unknown_shapes"] == [] and one["concat_count"] == ops(tiny_onnx).count("Concat")


# ----------------------------------------------------------------------------- pipeline / CLI


def test_run_surgery_verifies_each_pass(tiny_onnx):
    result = run_surgery(tiny_onnx, ["cleanup", "fold_dense_concats", "fold_batchnorm"])
    assert [r.name for r in result.reports] == ["cleanup", "fold_dense_concats", "fold_batchnorm"]
    assert all(r.verification["passed"] for r in result.reports)
    assert "Concat" not in ops(result.model)
    with pytest.raises(CUNetError, match="unknown surgery pass"):
        run_surgery(tiny_onnx, ["fold_everything"])


def test_surgery_cli(tiny_onnx, tmp_path, capsys):
    from cunet_optimize.commands import surgery as surgery_command

    src = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx, src)
    parser = argparse.ArgumentParser()
    surgery_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["surgery", str(src), "--workdir", str(tmp_path), "--passes", "cleanup,fold_dense_concats", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passes"] == ["cleanup", "fold_dense_concats"]
    assert report["memory"]["after"]["concat_output_bytes"] == 0 < report["memory"]["before"]["concat_output_bytes"]
    out = onnx.load(report["output"])
    assert_same_outputs(tiny_onnx, out)


def test_default_pipeline_per_target():
    from cunet_optimize.surgery import default_passes

    assert "fold_dense_concats" not in default_passes("cpu")  # timed per network by build instead
    assert "fold_dense_concats" not in default_passes("h100")  # TensorRT elides concats itself
    assert "fold_dense_concats" not in default_passes("cpu", quantized=True)
    assert default_passes("cpu", quantized=True)[-1] == "integer_dataflow"  # ONNX Runtime's uint8 form
    assert "integer_dataflow" not in default_passes("h100", quantized=True)  # TensorRT keeps Q/DQ
    # INT4 and mixed CPU graphs too: their per-channel INT4 convs run there as INT8 convs
    assert default_passes("cpu", quantized=True, opset=21)[-1] == "integer_dataflow"
    assert "integer_dataflow" not in default_passes("h100", quantized=True, opset=21)
    assert "tie_concat_qdq_scales" in default_passes("jetson-agx-orin", quantized=True, dla_core=0)
    assert "tie_concat_qdq_scales" not in default_passes("jetson-agx-orin", quantized=True)
    assert {"check_zero_points", "check_weight_axes"} <= set(default_passes("t4", quantized=True))
    int4 = default_passes("cpu", opset=21)  # packed before BN folding moves weights off the 4-bit grid
    assert int4.index("pack_int4_weights") < int4.index("fold_batchnorm")


@pytest.mark.parametrize("name", ["cleanup", "flatten_nested_concats", "fold_batchnorm", "fold_dense_concats",
                                  "remove_redundant_qdq", "tie_concat_qdq_scales"])
def test_every_pass_keeps_the_cunet_outputs(tiny_onnx, name):
    from cunet_optimize.surgery import PASSES

    out, report = apply(tiny_onnx, PASSES[name])
    assert_same_outputs(tiny_onnx, out)
    assert report.name == name and report.nodes_before == len(tiny_onnx.graph.node)


def test_a_repeated_surgery_in_this_process_is_the_kept_result_and_any_difference_runs_again(tiny_onnx, monkeypatch):
    """The same graph, passes, settings and options give the kept result (a copy: changing it leaves
    the kept one as it was); another option value, other settings or a replaced pass function run
    the passes again."""
    import cunet_optimize.surgery.pipeline as pipeline
    from cunet_optimize.cache_seal import ProcessMemo

    monkeypatch.setattr(pipeline, "_surgeries", ProcessMemo(pipeline.SURGERY_MEMO_BYTES, pipeline._surgeries.size))
    model = tiny_onnx
    calls = []

    def counted(real):
        def run(graph, **options):
            calls.append(options)
            return real(graph)
        return run

    monkeypatch.setitem(pipeline.PASSES, "cleanup", counted(cleanup))
    images = np.zeros((2, 3), np.float32)
    first = run_surgery(model, ["cleanup", "fold_batchnorm"], pass_options={"cleanup": {"images": images}})
    again = run_surgery(model, ["cleanup", "fold_batchnorm"], pass_options={"cleanup": {"images": images.copy()}})
    assert len(calls) == 1
    assert again.model.SerializeToString() == first.model.SerializeToString()
    assert [r.to_dict() for r in again.reports] == [r.to_dict() for r in first.reports]
    again.model.graph.node.pop()
    assert run_surgery(model, ["cleanup", "fold_batchnorm"], pass_options={"cleanup": {"images": images}}
                       ).model.SerializeToString() == first.model.SerializeToString()
    assert len(calls) == 1

    images[0, 0] = np.nextafter(np.float32(0), np.float32(1))
    run_surgery(model, ["cleanup", "fold_batchnorm"], pass_options={"cleanup": {"images": images}})
    run_surgery(model, ["cleanup", "fold_batchnorm"], pass_options={"cleanup": {"images": images}}, verify=False)
    monkeypatch.setitem(pipeline.PASSES, "cleanup", counted(cleanup))
    run_surgery(model, ["cleanup", "fold_batchnorm"], pass_options={"cleanup": {"images": images}})
    assert len(calls) == 4
