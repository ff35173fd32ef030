"""The torch.export-based exporter against the TorchScript one: same graph after clean-up,
both verified; what it cannot export is refused in one line."""

from __future__ import annotations


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


@pytest.fixture(scope="module")
def dynamo_build(tiny, faces, tmp_path_factory):
    """`build --exporter dynamo` of the tiny model, int8-tied (Q/DQ on the conv inputs and on
    the concatenations, tied) for a TensorRT target, with export_onnx watched: the build's export
    of its fake-quantized model is made again, of the same model with the same options, by the
    legacy exporter. (A dynamo export of the tiny CU-Net costs ~17 CPU-s: the build's is the one
    test_tiny_cunet_int8_same_graph_and_qdq_placement compares.) Returns (the manifest --json
    printed, [(model, dynamo summary, dynamo graph, legacy summary or None, legacy graph or
    None), ...] per export, in the build's order)."""
    import shutil

    import cunet_optimize.exporters as exporters
    from conftest import run_build_json, tiny_build_args
    from cunet_optimize.quant.qmodel import named_quantizers

    root = tmp_path_factory.mktemp("dynamo-build")
    real, exports = exporters.export_onnx, []

    def watched(model, path, **options):
        summary = real(model, path, **options)
        dynamo = onnx.load(str(path))  # (the build's staging folder goes)
        legacy_summary = legacy = None
        if next(named_quantizers(model), None) is not None:
            twin = root / f"{len(exports)}-legacy.onnx"
            legacy_summary = real(model, twin, **{**options, "exporter": "legacy"})
            legacy = onnx.load(str(twin))
        exports.append((model, summary, dynamo, legacy_summary, legacy))
        return summary

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporters, "export_onnx", watched)  # (the build imports it when it exports)
        manifest = run_build_json(tiny_build_args(tiny, faces, root / "w", "int8-tied", "--exporter", "dynamo",
                                                  "--target", "jetson-orin-nano"))
    return manifest, exports


def test_tiny_cunet_int8_same_graph_and_qdq_placement(dynamo_build):
    """The quant package's fake quantizers (per-tensor activations with a tensor scale,
    per-channel weights; on the conv inputs and the tied concatenations) through both
    exporters: one graph, the same Q/DQ on the same tensors. The graph is the build's int8
    export, and the legacy one is of the same calibrated model with the same options."""
    manifest, exports = dynamo_build
    quantized = [e for e in exports if e[3] is not None]
    assert manifest["precision"] == "int8-tied"
    assert len(exports) == 2 and len(quantized) == 1, "the build's int8 and FP32 reference exports were not seen"
    _, summary, dynamo, legacy_summary, legacy = quantized[0]
    assert summary.exporter == "dynamo" and legacy_summary.exporter == "legacy"
    assert summary.verification["passed"] and legacy_summary.verification["passed"]
    placement = qdq_placement(legacy)
    assert len(placement) > 10 and {p[0] for p in placement} >= {"weight", "Relu", "Concat"}
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
def test_build_with_dynamo_records_it(dynamo_build):
    manifest, _ = dynamo_build
    assert manifest["export"]["exporter"] == "dynamo" and manifest["export"]["verification"]["passed"]
    assert manifest["export"]["op_counts"]["QuantizeLinear"] > 10
