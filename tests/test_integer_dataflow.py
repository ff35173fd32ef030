"""surgery.integer_dataflow: the uint8 CPU form of an INT8 CU-Net, on a tiny model."""

from __future__ import annotations

import json
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from conftest import tiny_config, tiny_cunet_with_varied_batchnorm
from cunet_optimize.data.synth import verification_batch
from cunet_optimize.engines.onnxrt import OnnxRuntimeBuilder
from cunet_optimize.exporters import export_onnx
from cunet_optimize.models import CUNet
from cunet_optimize.onnx_tools.graph import to_model
from cunet_optimize.onnx_tools.patterns import qdq_params
from cunet_optimize.onnx_tools.verify import run_onnxruntime
from cunet_optimize.quant import parse_precision, post_training_quantize
from cunet_optimize.surgery import run_surgery
from cunet_optimize.surgery.integer_dataflow import _fold_bn_into_quantized_convs, integer_dataflow

IMAGES = verification_batch(6)
_INT8_ONNX: dict[bool, bytes] = {}  # tiny_int8_onnx's export, by negative_gamma, once per process


def tiny_int8_onnx(tmp_path, negative_gamma=False):
    """(Q/DQ ONNX path, float model) of a tiny CU-Net, calibrated on synthetic faces. The model
    is seeded, so its quantization and verified export give the same bytes each time: they are
    made once per process (and this module's users, test_int8_cpu_variants' too) and written
    to tmp_path/int8.onnx for each caller; the float model is drawn afresh for each."""
    model = tiny_cunet_with_varied_batchnorm(negative_gamma)
    path = tmp_path / "int8.onnx"
    if negative_gamma not in _INT8_ONNX:
        q, _, _ = post_training_quantize(model, parse_precision("int8-convin"), [torch.from_numpy(IMAGES)], "max",
                                         progress=False)  # (a quantized copy: `model` is left as drawn)
        export_onnx(q.eval(), path)
        _INT8_ONNX[negative_gamma] = path.read_bytes()
    path.write_bytes(_INT8_ONNX[negative_gamma])
    return path, model


def error_vs_float(onnx_model, model):
    with torch.no_grad():
        ref = model(torch.from_numpy(IMAGES))[-1].numpy()
    out = run_onnxruntime(onnx_model, {"image": IMAGES})
    return float(np.abs(next(iter(out.values())) - ref).mean() / ref.std())


@pytest.mark.parametrize("negative_gamma", [False, True])
def test_every_conv_runs_integer_and_accuracy_holds(tmp_path, negative_gamma):
    path, model = tiny_int8_onnx(tmp_path, negative_gamma)
    before = onnx.load(str(path))
    result = run_surgery(before, target="cpu", pass_options={"integer_dataflow": {"calibration": IMAGES}})
    assert "integer_dataflow" in result.passes
    graph = gs.import_onnx(result.model)
    ops = [n.op for n in graph.nodes]
    assert "BatchNormalization" not in ops
    for relu in [n for n in graph.nodes if n.op == "Relu"]:  # ReLU right after a conv, then uint8: fused
        assert relu.inputs[0].inputs[0].op == "Conv"
        assert [r.op for r in relu.outputs[0].outputs] == ["QuantizeLinear"] and relu.o().outputs[0].dtype == np.uint8
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        dq = conv.inputs[0].inputs[0]
        assert dq.op == "DequantizeLinear" and qdq_params(dq).zero_point_type == onnx.TensorProto.UINT8, conv.name
    for concat in [n for n in graph.nodes if n.op == "Concat"]:
        assert concat.outputs[0].dtype == np.uint8  # the dense links move bytes, not floats

    # ONNX Runtime fuses every conv but the float-output head into QLinearConv
    onnx.save(result.model, tmp_path / "rewritten.onnx")
    build = OnnxRuntimeBuilder().build(tmp_path / "rewritten.onnx", "cpu", "int8", tmp_path / "engine")
    optimized = [n.op_type for n in onnx.load(build.artifacts["model"]).graph.node]
    assert optimized.count("QLinearConv") == ops.count("Conv") - 1 and optimized.count("Conv") <= 1
    assert "BatchNormalization" not in optimized

    # the integer form is about as close to the float model as TensorRT's Q/DQ form is
    reference_error = error_vs_float(before, model)
    assert error_vs_float(result.model, model) <= 1.5 * reference_error


def test_batchnorm_folding_into_quantized_convs_is_exact(tmp_path):
    path, _ = tiny_int8_onnx(tmp_path, negative_gamma=True)
    proto = onnx.load(str(path))
    graph = gs.import_onnx(proto)
    assert _fold_bn_into_quantized_convs(graph) > 0
    before = next(iter(run_onnxruntime(proto, {"image": IMAGES}).values()))
    after = next(iter(run_onnxruntime(to_model(graph), {"image": IMAGES}).values()))
    # exact in real arithmetic; float rounding may flip a value at the next quantizer, rarely
    assert np.abs(after - before).mean() < 0.01 * before.std()


def test_a_component_that_does_not_match_stays_float(tmp_path):
    path, _ = tiny_int8_onnx(tmp_path)
    graph = gs.import_onnx(onnx.load(str(path)))
    # one adapter conv with float weights: its output cannot become a uint8 source
    conv = next(n for n in graph.nodes if n.op == "Conv" and "adapters_ahead.0/adapter_conv" in n.name)
    dq = conv.inputs[1].inputs[0]
    scale, w = qdq_params(dq).scale.reshape(-1, 1, 1, 1), dq.inputs[0].inputs[0].inputs[0].values
    conv.inputs[1] = gs.Constant("float_weight", (np.rint(w / scale) * scale).astype(np.float32))
    graph.cleanup()
    report = integer_dataflow(graph, IMAGES)
    assert any(n.startswith("left in float") and "not a quantized conv" in n for n in report.notes)
    assert report.rewrites > 0  # the other components were still converted
    assert any(n.op == "BatchNormalization" for n in graph.nodes)
    out = run_onnxruntime(to_model(graph), {"image": IMAGES})
    assert np.isfinite(next(iter(out.values()))).all()


def test_float_graph_is_left_alone(tmp_path):
    torch.manual_seed(0)
    export_onnx(CUNet(tiny_config()).eval(), tmp_path / "fp32.onnx")
    graph = gs.import_onnx(onnx.load(str(tmp_path / "fp32.onnx")))
    report = integer_dataflow(graph, IMAGES)
    assert report.rewrites == 0 and report.nodes_after == report.nodes_before


def test_integer_dataflow_refuses_to_calibrate_on_stand_in_images(tmp_path):
    from cunet_optimize.errors import CUNetError

    path, _ = tiny_int8_onnx(tmp_path)
    with pytest.raises(CUNetError, match="given no images"):
        integer_dataflow(gs.import_onnx(onnx.load(str(path))))


def test_surgery_cli_takes_calib_data_or_refuses(tmp_path, capsys):
    from cunet_optimize.cli import main
    from cunet_optimize.data.synth import write_synthetic_faces

    path, _ = tiny_int8_onnx(tmp_path)
    assert main(["surgery", str(path), "--target", "cpu", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pass --calib-data DIR" in err
    assert not (tmp_path / "int8-surgery.onnx").exists()
    # a pass list without integer_dataflow needs no images
    assert main(["surgery", str(path), "--passes", "cleanup", "--no-verify", "--workdir", str(tmp_path)]) == 0
    faces = tmp_path / "faces"
    write_synthetic_faces(faces, 8, seed=3, test_fraction=0.25, progress=False)  # 6 train images
    capsys.readouterr()
    assert main(["surgery", str(path), "--target", "cpu", "--calib-data", str(faces), "--workdir", str(tmp_path),
                 "--json", "--force"]) == 0  # over the cleanup's int8-surgery.onnx
    report = json.loads(capsys.readouterr().out)
    notes = [n for r in report["reports"] if r["name"] == "integer_dataflow" for n in r["notes"]]
    assert any("over 6 calibration images" in n for n in notes), notes
