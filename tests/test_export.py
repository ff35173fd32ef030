"""export_onnx: the file's contract, determinism, FP16, fake-quant, in-graph landmarks, verification."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from conftest import tiny_config
from cunet_optimize.data.transforms import decode_heatmaps
from cunet_optimize.errors import CUNetError
from cunet_optimize.exporters import export_onnx
from cunet_optimize.exporters.landmarks import add_landmark_decoder
from cunet_optimize.exporters.onnx_export import verify_against_torch
from cunet_optimize.models import CUNet
from cunet_optimize.onnx_tools.graph import to_model
from cunet_optimize.onnx_tools.patterns import qdq_params, quantize
from cunet_optimize.onnx_tools.verify import run_onnxruntime


def torch_heads(model, image: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [h.numpy() for h in model.eval()(torch.from_numpy(image))]


def image_batch(batch: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, 3, 256, 256), dtype=np.float32)


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = CUNet(tiny_config())  # train mode on purpose: export must use eval and restore it
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    summary = export_onnx(model, path)
    return model, path, summary


def test_file_contract_and_outputs_match_pytorch(exported):
    model, path, summary = exported
    assert model.training  # restored
    onnx_model = onnx.load(str(path))
    assert [i.name for i in onnx_model.graph.input] == ["image"]
    assert dims(onnx_model.graph.input[0]) == ["batch", 3, 256, 256]
    assert [o.name for o in onnx_model.graph.output] == ["heatmaps"] == summary.output_names
    assert dims(onnx_model.graph.output[0]) == ["batch", 4, 64, 64]
    ops = {n.op_type for n in onnx_model.graph.node}
    assert "Identity" not in ops and "Constant" not in ops
    assert onnx_model.opset_import[0].version == 17 and onnx_model.doc_string == ""
    meta = {p.key: p.value for p in onnx_model.metadata_props}
    assert json.loads(meta["cunet_optimize.config"])["width"] == 8
    # Independent of the built-in verification: a batch of 3 through ORT vs PyTorch.
    image = image_batch(3)
    got = run_onnxruntime(onnx_model, {"image": image})["heatmaps"]
    want = torch_heads(model, image)[-1]
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want)
    assert summary.verification["passed"] and summary.verification["batch"] == 2


def test_all_heads_static_batch_and_landmarks(exported, tmp_path):
    model, _, _ = exported
    summary = export_onnx(model, tmp_path / "all.onnx", heads="all", decode_landmarks=True, dynamic_batch=False)
    onnx_model = onnx.load(str(tmp_path / "all.onnx"))
    assert summary.output_names == ["heatmaps_0", "heatmaps_1", "landmarks"]
    assert dims(onnx_model.graph.input[0]) == [1, 3, 256, 256]
    image = image_batch(1)
    out = run_onnxruntime(onnx_model, {"image": image})
    for name, want in zip(["heatmaps_0", "heatmaps_1"], torch_heads(model, image)):
        assert np.abs(out[name] - want).max() <= 1e-4 * np.ptp(want)
    assert out["landmarks"].shape == (1, 4, 2)
    np.testing.assert_allclose(out["landmarks"], decode_heatmaps(out["heatmaps_1"], method="quarter"), atol=1e-6)


def _run_decoder(heatmaps: np.ndarray) -> np.ndarray:
    graph = gs.Graph(opset=17)
    inp = gs.Variable("heatmaps", dtype=np.float32, shape=list(heatmaps.shape))
    graph.inputs = [inp]
    graph.outputs = [add_landmark_decoder(graph, inp)]
    model = to_model(graph.cleanup().toposort())
    onnx.checker.check_model(model, full_check=True)
    return run_onnxruntime(model, {"heatmaps": heatmaps})["landmarks"]


def test_landmark_decoder_hand_computed():
    h = np.zeros((1, 4, 8, 8), dtype=np.float32)
    # map 0: peak at x=3, y=2; right (0.5) > left (0.2), below (0.3) > above (0.1)
    h[0, 0, 2, 3], h[0, 0, 2, 4], h[0, 0, 2, 2], h[0, 0, 1, 3], h[0, 0, 3, 3] = 1, 0.5, 0.2, 0.1, 0.3
    # map 1: peak on the left border (x=0): no x shift; above (0.4) > below (0.2)
    h[0, 1, 5, 0], h[0, 1, 5, 1], h[0, 1, 4, 0], h[0, 1, 6, 0] = 1, 0.9, 0.4, 0.2
    # map 2: two equal maxima: the first in row-major order wins; flat neighbours: no shift
    h[0, 2, 1, 2] = h[0, 2, 6, 5] = 1
    # map 3: bottom-right corner
    h[0, 3, 7, 7], h[0, 3, 7, 6] = 1, 0.5
    expected = np.array([[[3.25, 2.25], [0.0, 4.75], [2.0, 1.0], [7.0, 7.0]]], dtype=np.float32)
    np.testing.assert_array_equal(_run_decoder(h), expected)


def test_fp16_graph_has_fp32_io(exported, tmp_path):
    model, _, _ = exported
    summary = export_onnx(model, tmp_path / "half.onnx", fp16=True)
    onnx_model = onnx.load(str(tmp_path / "half.onnx"))
    types = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for i in onnx_model.graph.initializer}
    assert np.dtype(np.float16) in types
    float32_inits = [i.name for i in onnx_model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    resize_scales = {n.input[2] for n in onnx_model.graph.node if n.op_type == "Resize"}
    assert set(float32_inits) <= resize_scales  # only what ONNX types as float32
    assert onnx_model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert onnx_model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    image = image_batch(2)
    got = run_onnxruntime(onnx_model, {"image": image})["heatmaps"]
    want = torch_heads(model, image)[-1]
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-2 * np.ptp(want)
    assert summary.precision == "fp16" and summary.verification["passed"]


def test_mismatch_raises(exported):
    model, path, _ = exported
    torch.manual_seed(123)
    other = CUNet(tiny_config())
    with pytest.raises(CUNetError, match="differs from PyTorch"):
        verify_against_torch(onnx.load(str(path)), other, ["heatmaps"], batch=1)


class FakeQuantNet(torch.nn.Module):
    """Stem -> concat -> BN -> ReLU -> Q/DQ -> 1x1 conv, with the quant package's op forms:
    activations per tensor [-128, 127], weights per channel (axis 0) on [-127, 127]."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4, bias=False)
        self.grow = torch.nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.norm = torch.nn.BatchNorm2d(12)
        self.head = torch.nn.Conv2d(12, 5, 1, bias=False)

    @staticmethod
    def weight(conv):
        w = conv.weight
        scale = w.detach().abs().amax(dim=(1, 2, 3)) / 127 * 0.5  # half range: some weights clip at +-127
        return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(len(scale), dtype=torch.int32), 0, -127, 127)

    def forward(self, x):
        a = torch.fake_quantize_per_tensor_affine(torch.relu(self.stem(x)), 0.02, 0, -128, 127)
        b = torch.nn.functional.conv2d(a, self.weight(self.grow), padding=1)
        y = torch.fake_quantize_per_tensor_affine(torch.relu(self.norm(torch.cat([a, b], 1))), 0.03, 0, -128, 127)
        return [torch.nn.functional.conv2d(y, self.weight(self.head))]


def test_fake_quant_export(tmp_path):
    torch.manual_seed(0)
    summary = export_onnx(FakeQuantNet(), tmp_path / "fq.onnx")
    assert summary.quantized and summary.verification["tolerance"].startswith("mean_abs_error")
    graph = gs.import_onnx(onnx.load(str(tmp_path / "fq.onnx")))
    qs = [n for n in graph.nodes if n.op == "QuantizeLinear"]
    assert len(qs) == 4 and sum(n.op == "DequantizeLinear" for n in graph.nodes) == 4
    for q in qs:
        p = qdq_params(q)
        assert p.zero_point_type == onnx.TensorProto.INT8 and not np.any(p.zero_point)
        if isinstance(q.inputs[0], gs.Constant):  # a weight: per channel on axis 0, symmetric [-127, 127]
            assert p.axis == 0 and p.scale.size == q.inputs[0].shape[0]
            ints = quantize(q.inputs[0].values, p)
            assert ints.min() == -127 or ints.max() == 127  # the clipped ones
            assert ints.min() >= -127
        else:
            assert p.scale.size == 1


def test_fake_quant_wiring_error_fails_verification(tmp_path):
    """The fake-quant tolerance absorbs rounding flips, not a wrong graph: a DequantizeLinear
    whose scale disagrees with its QuantizeLinear (activations 1.5x too large) is caught."""
    torch.manual_seed(0)
    model = FakeQuantNet()
    summary = export_onnx(model, tmp_path / "fq.onnx")
    proto = onnx.load(str(tmp_path / "fq.onnx"))
    graph = gs.import_onnx(proto)
    dq = next(n for n in graph.nodes if n.op == "DequantizeLinear" and n.o().op == "Conv"
              and n.o().outputs[0] in graph.outputs and n.o().inputs[0] is n.outputs[0])  # the head's input
    dq.inputs[1] = gs.Constant("wrong_scale", np.asarray(qdq_params(dq).scale * 1.5, dtype=np.float32))
    with pytest.raises(CUNetError, match="differs from PyTorch"):
        verify_against_torch(gs.export_onnx(graph), model, summary.output_names, batch=2)


def test_bad_arguments(exported, tmp_path):
    model, _, _ = exported
    with pytest.raises(CUNetError, match="heads"):
        export_onnx(model, tmp_path / "x.onnx", heads="middle")
    with pytest.raises(CUNetError, match="opset 12"):
        export_onnx(model, tmp_path / "x.onnx", opset=12)
    assert not (tmp_path / "x.onnx").exists()


def test_export_cli(tmp_path, capsys):
    from cunet_optimize.commands import export as export_command
    from cunet_optimize.models import load_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(load_model("cunet-face-small", width=8, growth_rate=4, neck_size=2), ckpt)
    parser = argparse.ArgumentParser()
    export_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export", "--model", str(ckpt), "--workdir", str(tmp_path), "--opset", "18", "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(tmp_path / "tiny-fp32.onnx") and summary["opset"] == 18
    assert onnx.load(summary["path"]).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 68


def test_fp16_fake_quant_needs_opset_19(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(CUNetError, match="opset >= 19"):
        export_onnx(FakeQuantNet(), tmp_path / "fq16.onnx", fp16=True)
    summary = export_onnx(FakeQuantNet(), tmp_path / "fq16.onnx", fp16=True, opset=19)
    scales = [i for i in onnx.load(str(tmp_path / "fq16.onnx")).graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert summary.quantized and summary.verification["passed"] and scales


def test_per_tensor_scale_of_shape_1_stays_per_tensor(tmp_path):
    """A learnable one-element scale ([1], requires_grad) exports as a scalar (per-tensor) Q/DQ."""

    class LearnedScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)
            self.scale = torch.nn.Parameter(torch.tensor([0.05]))

        def forward(self, x):
            zero = torch.zeros(1, dtype=torch.int32)
            return [torch.fake_quantize_per_tensor_affine(self.conv(x), self.scale, zero, -128, 127)]

    model = LearnedScale()
    summary = export_onnx(model, tmp_path / "s.onnx")
    assert summary.verification["passed"] and model.scale.requires_grad
    graph = gs.import_onnx(onnx.load(str(tmp_path / "s.onnx")))
    assert all(qdq_params(n).scale.shape == () for n in graph.nodes if n.op.endswith("QuantizeLinear"))


@pytest.fixture
def fresh_exports(monkeypatch):
    """An empty memo of verified exports: what this test exports, it exports anew."""
    import cunet_optimize.exporters.onnx_export as onnx_export
    from cunet_optimize.cache_seal import ProcessMemo

    monkeypatch.setattr(onnx_export, "_exports", ProcessMemo(onnx_export.EXPORT_MEMO_BYTES, onnx_export._exports.size))


def test_export_is_deterministic(exported, fresh_exports, tmp_path):
    """(Exported anew, not the memo's copy: equal models give byte-identical files.)"""
    model, path, summary = exported
    again = export_onnx(model, tmp_path / "again.onnx")
    assert not again.reused_from and again.sha256 == summary.sha256
    assert (tmp_path / "again.onnx").read_bytes() == path.read_bytes()


def test_an_identical_export_in_this_process_is_reused_and_any_difference_exports_anew(fresh_exports, tmp_path):
    """A model equal in content (another object) with the same options gets the graph verified for
    the first, written again; a weight one float32 step away, another option or verify=False export
    anew. The digest sees attributes that are not tensors (a quantizer switched off); a forward hook
    (traced into the graph, its function opaque to a digest) leaves the model without a key, never
    kept or matched."""
    import copy

    import cunet_optimize.exporters.onnx_export as onnx_export
    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.quant import parse_precision
    from cunet_optimize.quant.calibrate import calibrate
    from cunet_optimize.quant.qmodel import named_quantizers, quantize_model

    torch.manual_seed(0)
    model = CUNet(tiny_config()).eval()
    first = export_onnx(model, tmp_path / "first.onnx")
    assert not first.reused_from
    twin = export_onnx(copy.deepcopy(model), tmp_path / "twin.onnx")
    assert twin.reused_from == str(tmp_path / "first.onnx")
    assert (tmp_path / "twin.onnx").read_bytes() == (tmp_path / "first.onnx").read_bytes()
    assert (twin.sha256, twin.verification, twin.path) == (first.sha256, first.verification, str(tmp_path / "twin.onnx"))

    nudged = copy.deepcopy(model)
    with torch.no_grad():
        weight = next(nudged.parameters())
        weight[0].view(-1)[0] = torch.nextafter(weight[0].view(-1)[0], torch.tensor(1.0))
    assert not export_onnx(nudged, tmp_path / "nudged.onnx").reused_from
    assert not export_onnx(model, tmp_path / "opset18.onnx", opset=18).reused_from
    assert not export_onnx(model, tmp_path / "unverified.onnx", verify=False).reused_from

    qmodel = quantize_model(copy.deepcopy(model), parse_precision("int8"))
    calibrate(qmodel, [torch.from_numpy(verification_batch(3)[2:])], method="max", progress=False)
    calibrated = onnx_export.module_digest(qmodel)
    _, quantizer = next((n, q) for n, q in named_quantizers(qmodel) if not getattr(q, "is_weight", False))
    quantizer.enabled = False
    switched_off = onnx_export.module_digest(qmodel)
    assert switched_off is not None and switched_off != calibrated

    hooked = copy.deepcopy(model)
    hooked.register_forward_hook(lambda _m, _i, heads: [h + 1 for h in heads])
    assert onnx_export.module_digest(hooked) is None
    kept = len(onnx_export._exports)
    summary = export_onnx(hooked, tmp_path / "hooked.onnx")
    assert not summary.reused_from and summary.sha256 != first.sha256 and len(onnx_export._exports) == kept


def test_the_process_memo_copies_in_and_out_and_drops_the_least_recently_used_beyond_its_bytes():
    from cunet_optimize.cache_seal import ProcessMemo

    memo = ProcessMemo(10, size=len)
    value = [1, 2, 3, 4]
    memo.put("a", value)
    value.append(5)  # the caller's later change is not the kept value
    got = memo.get("a")
    assert got == [1, 2, 3, 4]
    got.append(6)
    assert memo.get("a") == [1, 2, 3, 4]
    memo.put(None, [1])
    assert memo.get(None) is None and len(memo) == 1
    memo.put("b", [0] * 4)
    memo.get("a")  # "a" used last: "b" is the least recently used
    memo.put("c", [0] * 4)  # 12 > 10 bytes
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == ([1, 2, 3, 4], None, [0] * 4)


def test_the_content_digest_reads_arrays_and_dataclass_fields_a_repr_would_shorten_or_leave_out():
    import dataclasses
    import hashlib

    from cunet_optimize.cache_seal import feed_digest

    @dataclasses.dataclass
    class Settings:
        name: str
        table: np.ndarray = dataclasses.field(repr=False)

    def digest(value):
        h = hashlib.sha256()
        return h.hexdigest() if feed_digest(h, value) else None

    big = np.zeros(5000, np.float32)
    changed = big.copy()
    changed[2500] = 1  # inside what numpy's repr elides
    assert repr(big) == repr(changed) and digest(big) != digest(changed)
    assert repr(Settings("a", big)) == repr(Settings("a", changed))
    assert digest(Settings("a", big)) != digest(Settings("a", changed))
    assert digest({"k": [Settings("a", big), 1.5]}) == digest({"k": [Settings("a", big.copy()), 1.5]})
    assert digest({"k": lambda: 0}) is None and digest([object()]) is None
