"""Export verification judged by the network's own rounding noise (onnx_tools/verify.py):
a deep network's correct graph passes, miswired graphs fail, in both directions."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from cunet_optimize.data.synth import verification_batch
from cunet_optimize.errors import CUNetError
from cunet_optimize.exporters import export_onnx
from cunet_optimize.exporters.onnx_export import reference_heads, verify_against_torch, verify_wiring
from cunet_optimize.models import load_model
from cunet_optimize.models.batchnorm import reestimate_batchnorm
from cunet_optimize.onnx_tools.verify import NOISE_MULTIPLE, TOLERANCES, compare_outputs, run_onnxruntime, time_sessions


def _compare(actual, reference, noisy, kind="fp32"):
    return compare_outputs({"y": actual}, {"y": reference}, kind, noisy={"y": noisy},
                           runtime="test", reference_name="ref", noise_name="noisy")


@pytest.mark.parametrize("kind", sorted(TOLERANCES))
def test_allowance_is_a_multiple_of_the_measured_noise(kind):
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2, 4, 8, 8))
    noise = 1e-3 * rng.standard_normal(reference.shape)
    statistic = TOLERANCES[kind].statistic
    measured = np.abs(noise).max() if statistic == "max_abs_error" else np.abs(noise).mean()
    result = _compare(reference + noise * (NOISE_MULTIPLE * 0.9), reference, reference + noise, kind)
    assert result.passed and result.outputs[0].noise == pytest.approx(measured)
    assert not _compare(reference + noise * (NOISE_MULTIPLE * 1.2), reference, reference + noise, kind).passed
    # a noiseless network leaves only the floor: any real difference fails
    assert not _compare(reference + noise, reference, reference, kind).passed


def test_non_finite_output_fails():
    reference = np.ones((1, 2, 4, 4))
    actual = reference.copy()
    actual[0, 0, 0, 0] = np.nan
    assert not _compare(actual, reference, reference + 1.0).passed


def test_fp16_export_is_judged_by_fp16_storage_noise(tmp_path):
    model = load_model()  # the embedded model: trained weights
    summary = export_onnx(model, tmp_path / "m16.onnx", fp16=True)
    check = summary.verification
    assert check["passed"] and "float16 storage" in check["noise"] and check["reference"].endswith("(float64)")
    out = check["outputs"][0]
    # float16 storage moves a trained model's heatmaps by far more than float32 rounding
    assert out["noise"] > 1e-4 * out["reference_range"] and out["max_abs_error"] <= out["allowed"]


# ----------------------------------------------------------------- the authors' N=8 face model


@pytest.fixture(scope="module")
def n8(tmp_path_factory):
    """Random weights with BatchNorm statistics re-estimated on 8 verification images. (16 gave
    the same picture at twice the cost: noise 6.3x the 1e-4-of-range bar and miswirings >= 145x
    the allowance with 16 images, 7.5x and >= 126x with 8, against the tests' 1x and 10x.)"""
    torch.manual_seed(0)
    model = reestimate_batchnorm(load_model("cunet-face-n8k1"), verification_batch(8))
    path = tmp_path_factory.mktemp("n8") / "n8.onnx"
    summary = export_onnx(model, path)  # the correct graph: verification must pass
    image = verification_batch(2)
    reference, noisy, _, _ = reference_heads(model, image, "fp32")
    return model, onnx.load(str(path)), summary, image, reference[-1], noisy[-1]


def _swap_channel_pair(graph: gs.Graph) -> None:
    """Swap two output channels of a conv: its weight rows (and their per-channel scales,
    where the weight comes through Q/DQ)."""
    def swapped(tensor: gs.Constant) -> gs.Constant:
        values = tensor.values.copy()
        values[[0, 1]] = values[[1, 0]]
        return gs.Constant(tensor.name + "_swapped", values)

    conv = [n for n in graph.nodes if n.op == "Conv"][len(graph.nodes) // 40]
    node, index = conv, 1
    while not isinstance(node.inputs[index], gs.Constant):  # walk back through DequantizeLinear / QuantizeLinear
        node, index = node.inputs[index].inputs[0], 0
        for i in (1, 2):  # per-channel scale and zero point
            if i < len(node.inputs) and isinstance(node.inputs[i], gs.Constant) and node.inputs[i].values.size > 1:
                node.inputs[i] = swapped(node.inputs[i])
    node.inputs[index] = swapped(node.inputs[index])


def _drop_batchnorm(graph: gs.Graph) -> None:
    bn = [n for n in graph.nodes if n.op == "BatchNormalization"][len(graph.nodes) // 40]
    source, out = bn.inputs[0], bn.outputs[0]
    for consumer in list(out.outputs):
        consumer.inputs[consumer.inputs.index(out)] = source
    bn.outputs.clear()


def _permute_concat_inputs(graph: gs.Graph) -> None:
    concat = [n for n in graph.nodes if n.op == "Concat" and len(n.inputs) >= 2][len(graph.nodes) // 40]
    concat.inputs[0], concat.inputs[1] = concat.inputs[1], concat.inputs[0]


@pytest.mark.slow
def test_deep_model_passes_with_its_measured_noise(n8):
    _, _, summary, _, _, _ = n8
    check = summary.verification
    out = check["outputs"][0]
    assert check["passed"] and check["reference"].endswith("(float64)")
    # the noise is real (a fixed 1e-4 of the range rejected this graph) and the graph is within it
    assert out["noise"] > 1e-4 * out["reference_range"]
    assert out["max_abs_error"] <= out["allowed"] == pytest.approx(
        NOISE_MULTIPLE * out["noise"] + TOLERANCES["fp32"].floor * out["reference_range"])


@pytest.mark.slow
@pytest.mark.parametrize("miswire", [_swap_channel_pair, _drop_batchnorm, _permute_concat_inputs])
def test_deep_model_miswired_graph_fails(n8, miswire):
    model, proto, summary, image, reference, noisy = n8
    graph = gs.import_onnx(proto)
    miswire(graph)
    wrong = gs.export_onnx(graph.cleanup().toposort())
    actual = run_onnxruntime(wrong, {"image": image})["heatmaps"]
    result = _compare(actual, reference, noisy)
    assert not result.passed
    out = result.outputs[0]
    assert out.max_abs_error > 10 * out.allowed, "the miswiring should stand far above the noise"


@pytest.mark.slow
def test_deep_model_miswired_graph_is_refused(n8):
    model, proto, summary, _, _, _ = n8
    graph = gs.import_onnx(proto)
    _drop_batchnorm(graph)
    with pytest.raises(CUNetError, match="differs from PyTorch .*float64.*do not deploy"):
        verify_against_torch(gs.export_onnx(graph.cleanup().toposort()), model, summary.output_names, batch=2)


# ------------------------------------------------------------ fake quantization: the wiring check


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    from cunet_optimize.quant.policy import quant_scheme
    from cunet_optimize.quant import post_training_quantize

    qmodel, _, _ = post_training_quantize(load_model(), quant_scheme("int8"),
                                          [torch.from_numpy(verification_batch(12)[4:])], "percentile",
                                          progress=False)
    qmodel.eval()
    path = tmp_path_factory.mktemp("int8") / "q.onnx"
    summary = export_onnx(qmodel, path)
    return qmodel, onnx.load(str(path)), summary


def test_fake_quant_export_checks_output_and_wiring(int8_export):
    _, _, summary = int8_export  # (the fixture's export of the model: export_onnx's defaults)
    check = summary.verification
    assert check["passed"] and check["noise"].startswith("the same model on inputs moved by")
    assert check["wiring"]["passed"] and "activation Q/DQ pairs bypassed" in check["wiring"]["runtime"]
    assert check["outputs"][0]["noise"] > 0  # rounding flips are measured, not assumed


@pytest.mark.parametrize("miswire", [_swap_channel_pair, _drop_batchnorm])
def test_fake_quant_wiring_check_fails_a_miswired_graph(int8_export, miswire):
    qmodel, proto, _ = int8_export
    graph = gs.import_onnx(proto)
    miswire(graph)
    wiring = verify_wiring(gs.export_onnx(graph.cleanup().toposort()), qmodel, verification_batch(2), ["heatmaps"])
    assert not wiring.passed
    assert wiring.outputs[0].max_abs_error > 10 * wiring.outputs[0].allowed


@pytest.mark.slow
def test_fp16_fake_quant_wiring_is_judged_by_fp16_storage_noise(int8_export, tmp_path):
    # TensorRT 11's strongly typed plans compute the Q/DQ graph in float16 (opset 19 scales):
    # its wiring check compares against float16 storage noise, and still fails a miswired graph.
    qmodel, _, _ = int8_export
    path = tmp_path / "q16.onnx"
    check = export_onnx(qmodel, path, opset=19, fp16=True).verification
    assert check["passed"] and check["wiring"]["passed"]
    assert "float16 storage" in check["wiring"]["noise"]
    graph = gs.import_onnx(onnx.load(str(path)))
    _drop_batchnorm(graph)
    wiring = verify_wiring(gs.export_onnx(graph.cleanup().toposort()), qmodel, verification_batch(2), ["heatmaps"])
    assert not wiring.passed and wiring.outputs[0].max_abs_error > 10 * wiring.outputs[0].allowed


def test_fp16_export_refuses_a_scale_float16_cannot_hold(int8_export, tmp_path):
    import copy

    from cunet_optimize.quant.qmodel import is_activation_quantizer, named_quantizers

    qmodel = copy.deepcopy(int8_export[0])
    name, quantizer = next((n, q) for n, q in named_quantizers(qmodel) if is_activation_quantizer(q))
    with torch.no_grad():
        quantizer.scale.fill_(1e-7)  # float16 keeps ~1 significant bit of it
    with pytest.raises(CUNetError, match=f"quantizer '{name}' has scale 1e-07, which float16 rounds by"):
        export_onnx(qmodel, tmp_path / "q16.onnx", opset=19, fp16=True)
    assert not (tmp_path / "q16.onnx").exists()
    quantizer.scale.fill_(1e-2)  # an ordinary scale is held
    export_onnx(qmodel, tmp_path / "q16.onnx", opset=19, fp16=True, verify=False)


def test_time_sessions_alternates_run_by_run_and_leaves_out_the_warmup():
    calls = []

    class Session:
        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def run(self, outputs, feeds):
            calls.append((self.name, feeds["image"].shape))
            time.sleep(self.seconds)

    feeds = {"image": np.zeros((1, 3, 8, 8), np.float32)}
    times = time_sessions({"fast": Session("fast", 0.0), "slow": Session("slow", 0.02)}, feeds, runs=3, warmup=2)
    assert [name for name, _ in calls] == ["fast", "slow"] * 5  # 2 warm-up rounds, then 3 timed
    assert all(shape == (1, 3, 8, 8) for _, shape in calls)
    assert len(times["fast"]) == len(times["slow"]) == 3
    assert min(times["slow"]) >= 20.0  # milliseconds


def test_time_blocks_times_each_candidate_alone_in_alternating_rounds():
    """Each candidate's context is entered for its block only (opened, warm-up calls, timed calls,
    released) and no other is open meanwhile; the order flips each round; warm-up calls are not timed."""
    from contextlib import contextmanager

    from cunet_optimize.engines.base import time_blocks

    events, open_now = [], set()

    def candidate(name, seconds):
        @contextmanager
        def block():
            assert not open_now  # the previous candidate was released first
            open_now.add(name)
            events.append(("open", name))
            yield lambda: (events.append(("call", name)), time.sleep(seconds))
            open_now.discard(name)
            events.append(("close", name))
        return block

    times = time_blocks({"fast": candidate("fast", 0.0), "slow": candidate("slow", 0.02)}, runs=3, warmup=2, rounds=2)
    order = [name for kind, name in events if kind == "open"]
    assert order == ["fast", "slow", "slow", "fast"]
    assert events == [e for n in order for e in [("open", n)] + [("call", n)] * 5 + [("close", n)]]
    assert len(times["fast"]) == len(times["slow"]) == 6 and min(times["slow"]) >= 20.0  # ms, 3 per round


def test_timings_keep_each_round_and_ties_are_what_the_drift_cannot_tell_apart():
    from cunet_optimize.engines.base import Timing, within_drift_of_fastest

    t = Timing.of([1.0, 1.2, 1.1, 2.0, 2.2, 2.1], rounds=2)  # time_blocks' order: round 1, then round 2
    assert t.round_ms == (1.1, 2.1) and t.median_ms == pytest.approx(1.6) and t.drift_ms == pytest.approx(1.0)
    quiet = {"a": Timing(1.0, (1.0, 1.0)), "b": Timing(1.01, (1.01, 1.01))}
    assert within_drift_of_fastest(quiet) == {"a"}  # a quiet timer tells 1% apart
    drifting = {"a": Timing(1.0, (0.9, 1.1)), "b": Timing(1.3, (1.2, 1.4)), "c": Timing(1.5, (1.45, 1.55))}
    assert within_drift_of_fastest(drifting) == {"a", "b"}  # b's gap 0.3 <= 0.2 + 0.2 drift; c's 0.5 is not
