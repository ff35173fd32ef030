"""The torch.export-based exporter against the TorchScript one: same graph after clean-up,
both verified; what it cannot export is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_config
from cunet_optimize.cli import main
from cunet_optimize.errors import CUNetError
from cunet_optimize.exporters import export_onnx
from cunet_optimize.data.synth import verification_batch
from cunet_optimize.exporters.same_graph import op_multiset, qdq_placement, structural_difference
from cunet_optimize.models import CUNet
from cunet_optimize.quant import calibrate, parse_precision, quantize_model
from test_export import FakeQuantNet


def export_both(model, tmp_path, **options) -> dict:
    graphs = {}
    for exporter in ("legacy", "dynamo"):
        summary = export_onnx(model, tmp_path / f"{exporter}.onnx", exporter=exporter, **options)
        assert summary.exporter == exporter and summary.verification["passed"]
        graphs[exporter] = onnx.load(str(tmp_path / f"{exporter}.onnx"))
    return graphs


def test_tiny_cunet_int8_same_graph_and_qdq_placement(tmp_path):
    """The quant package's fake quantizers (per-tensor activations with a tensor scale,
    per-channel weights) through both exporters: one graph, the same Q/DQ on the same tensors."""
    torch.manual_seed(0)
    qmodel = quantize_model(CUNet(tiny_config()).eval(), parse_precision("int8"))
    calibrate(qmodel, [torch.from_numpy(verification_batch(4)[2:])], method="max", progress=False)
    graphs = export_both(qmodel.eval(), tmp_path)
    legacy, dynamo = graphs["legacy"], graphs["dynamo"]
    placement = qdq_placement(legacy)
    assert len(placement) > 10 and {p[0] for p in placement} >= {"weight", "Relu"}
    assert qdq_placement(dynamo) == placement
    assert op_multiset(dynamo) == op_multiset(legacy)
    assert structural_difference(legacy, dynamo) is None


def test_narrow_range_fake_quant_same_graph(tmp_path):
    """Ranges ONNX has no type for ([-127, 127] weights) need our translation under both exporters:
    torchlib's own raises NotImplementedError for them."""
    torch.manual_seed(0)
    graphs = export_both(FakeQuantNet(), tmp_path, opset=19)
    assert qdq_placement(graphs["dynamo"]) == qdq_placement(graphs["legacy"])
    assert structural_difference(graphs["legacy"], graphs["dynamo"]) is None


def test_structural_difference_sees_a_changed_scale(tmp_path):
    torch.manual_seed(0)
    graphs = export_both(FakeQuantNet(), tmp_path)
    changed = onnx.load(str(tmp_path / "dynamo.onnx"))
    scale = next(i for i in changed.graph.initializer if i.dims == [] and i.data_type == onnx.TensorProto.FLOAT)
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * np.float32(1.5), scale.name))
    assert "differs" in structural_difference(graphs["legacy"], changed)
    assert qdq_placement(changed) != qdq_placement(graphs["legacy"])


def test_dynamo_refuses_int4_weights_in_one_line(tmp_path):
    torch.manual_seed(0)
    qmodel = quantize_model(CUNet(tiny_config()).eval(), parse_precision("int4"))
    calibrate(qmodel, [torch.from_numpy(verification_batch(3)[2:])], method="max", progress=False)
    with pytest.raises(CUNetError, match="--exporter dynamo cannot export") as err:
        export_onnx(qmodel.eval(), tmp_path / "int4.onnx", opset=21, exporter="dynamo")
    assert "\n" not in str(err.value) and "--exporter legacy" in str(err.value)
    assert not (tmp_path / "int4.onnx").exists()


def test_build_dynamo_int4_is_refused_before_any_work(tmp_path, capsys):
    code = main(["build", "--precision", "int4", "--exporter", "dynamo", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--exporter dynamo cannot export --precision int4" in err
    assert not (tmp_path / "calib").exists() and not (tmp_path / "engines").exists()  # no work began


def test_unknown_exporter(tmp_path):
    with pytest.raises(CUNetError, match="exporter must be one of legacy, dynamo"):
        export_onnx(CUNet(tiny_config()), tmp_path / "x.onnx", exporter="jit")


@pytest.mark.slow
def test_build_with_dynamo_records_it(tiny, faces, tmp_path, capsys):
    from conftest import tiny_build_args as build_args

    assert main(build_args(tiny, faces, tmp_path, "int8", "--exporter", "dynamo", "--target", "jetson-orin-nano",
                           "--json")) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["export"]["exporter"] == "dynamo" and manifest["export"]["verification"]["passed"]
    assert manifest["export"]["op_counts"]["QuantizeLinear"] > 10
