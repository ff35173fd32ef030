"""Issue 15: the INT8 CPU integer-form variants, their timed choice, and the int8 ISA record."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from cunet_optimize.engines import onnxrt
from cunet_optimize.engines.base import Timing
from cunet_optimize.engines.cpu_isa import cpu_int8_isa, int8_isa_from_flags
from cunet_optimize.engines.onnxrt import OnnxRuntimeBuilder, OnnxRuntimeRunner
from cunet_optimize.onnx_tools.graph import to_model
from cunet_optimize.onnx_tools.verify import run_onnxruntime
from cunet_optimize.surgery import run_surgery
from cunet_optimize.pipeline.autotune import choose_int8_form
from cunet_optimize.surgery.integer_dataflow import integer_dataflow
from test_integer_dataflow import IMAGES, error_vs_float, tiny_int8_onnx


@pytest.mark.parametrize("flags, isa", [
    ("fpu sse2 avx avx2 fma", "avx2"),
    ("avx2 avx512f avx512_vnni avx512_bf16", "avx512_vnni"),
    ("avx2 avx_vnni", "avx_vnni"),
    ("avx2 avx512_vnni amx_tile amx_int8 amx_bf16", "amx"),
    ("fp asimd asimddp", "arm_dotprod"),
    ("fpu sse sse2", "none"),
])
def test_int8_isa_from_cpu_flags(flags, isa, tmp_path):
    assert int8_isa_from_flags(flags) == isa
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n")
    assert cpu_int8_isa(cpuinfo) == isa
    assert cpu_int8_isa(tmp_path / "missing") == "unknown"


def forms(tmp_path, negative_gamma=True):
    path, model = tiny_int8_onnx(tmp_path, negative_gamma)
    qdq = run_surgery(onnx.load(str(path)), ["cleanup", "flatten_nested_concats", "fold_batchnorm",
                                            "remove_redundant_qdq"], verify=False).model
    out = {}
    for form in ("depthwise", "clamp"):
        graph = gs.import_onnx(qdq)
        report = integer_dataflow(graph, IMAGES, relu_form=form)
        out[form] = (to_model(graph), report)
    return qdq, out, model


def test_clamp_form_replaces_depthwise_convs_before_1x1_convs_and_keeps_accuracy(tmp_path):
    qdq, out, model = forms(tmp_path)
    depthwise, clamp = out["depthwise"][0], out["clamp"][0]
    ops = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731
    maxes = ops(clamp).count("Max")
    assert maxes > 0 and "Min" in ops(clamp)  # negative BN scales take a Min
    removed = ops(depthwise).count("Conv") - ops(clamp).count("Conv")  # one depthwise conv per clamped sink
    assert removed >= maxes and removed >= ops(clamp).count("Min")
    assert len(clamp.graph.node) < len(depthwise.graph.node)
    graph = gs.import_onnx(clamp)
    for node in [n for n in graph.nodes if n.op in ("Max", "Min")]:
        assert node.outputs[0].dtype == np.uint8
        reader = node.outputs[0].outputs[0]  # -> Min, or the DQ of a 1x1 conv
        while reader.op != "DequantizeLinear":
            reader = reader.outputs[0].outputs[0]
        conv = reader.outputs[0].outputs[0]
        assert conv.op == "Conv" and conv.inputs[1].inputs[0].inputs[0].values.shape[2:] == (1, 1)
    assert "of them a uint8 Max/Min threshold" in " ".join(out["clamp"][1].notes)
    # not exact (rounded thresholds, requantized weights): about as close to the float model
    assert error_vs_float(clamp, model) <= 1.5 * error_vs_float(qdq, model)


def test_clamp_leaves_out_thresholds_that_only_copy_and_that_is_exact(tmp_path):
    """A sink whose thresholds are all 0 (ReLU never clips on the uint8 range) gets no Max:
    its uint8 tensor goes straight to the conv's DequantizeLinear. Putting the Max(q, 0) back
    leaves ONNX Runtime's ORT_DISABLE_ALL output bit-identical."""
    _, out, _ = forms(tmp_path, negative_gamma=False)
    clamp = out["clamp"][0]
    graph = gs.import_onnx(clamp)
    unclamped = [dq for dq in graph.nodes if dq.op == "DequantizeLinear" and dq.inputs[1].name.endswith(
        "/unit_integer_scale") and dq.inputs[0].inputs[0].op not in ("Max", "Min")]
    assert unclamped  # some sinks needed no threshold
    feeds = {"image": IMAGES}
    before = next(iter(run_onnxruntime(clamp, feeds, "disable_all").values()))
    for dq in unclamped:
        x = dq.inputs[0]
        channels = dq.outputs[0].outputs[0].inputs[1].inputs[0].inputs[0].values.shape[1]
        y = gs.Variable(f"{dq.name}/identity_max", dtype=np.uint8)
        graph.nodes.append(gs.Node("Max", f"{dq.name}/max0", inputs=[
            x, gs.Constant(f"{dq.name}/zeros", np.zeros((1, channels, 1, 1), np.uint8))], outputs=[y]))
        dq.inputs[0] = y
    graph.toposort()
    after = next(iter(run_onnxruntime(to_model(graph), feeds, "disable_all").values()))
    np.testing.assert_array_equal(after, before)


def test_unknown_relu_form_is_refused(tmp_path):
    qdq, _, _ = forms(tmp_path)
    with pytest.raises(ValueError, match="relu_form"):
        integer_dataflow(gs.import_onnx(qdq), IMAGES, relu_form="lut")


def _steady(ms: float) -> Timing:
    """A timing with no drift between its rounds (a quiet machine)."""
    return Timing(ms, (ms, ms))


def _fake_timer(fastest):
    def time_candidate_timings(candidates, level="disable", runs=10):
        assert level == "all"
        return {key: _steady(1.0 if key == fastest else 2.0 + i) for i, key in enumerate(candidates)}
    return time_candidate_timings


@pytest.mark.parametrize("clamp_gap_ms, chosen_form", [(0.3, "clamp"), (0.6, "depthwise")])
def test_forms_the_timer_cannot_tell_apart_go_to_the_one_with_fewer_nodes(tmp_path, monkeypatch, clamp_gap_ms,
                                                                         chosen_form):
    """Each timing drifts 0.2 ms between its rounds: clamp (fewer nodes) 0.3 ms behind depthwise is
    within the drift and taken; 0.6 ms behind, depthwise is faster beyond doubt and taken."""
    path, _ = tiny_int8_onnx(tmp_path)
    options = {"integer_dataflow": {"calibration": IMAGES}}
    result = run_surgery(onnx.load(str(path)), ["cleanup", "fold_batchnorm", "integer_dataflow"], pass_options=options)
    monkeypatch.setattr(onnxrt, "thread_candidates", lambda cpus=None: [1])

    def drifting(candidates, level="disable", runs=10):
        ms = {key: 1.0 + (clamp_gap_ms if key[0] == "clamp" else 0.0) for key in candidates}
        return {key: Timing(m, (m - 0.1, m + 0.1)) for key, m in ms.items()}

    monkeypatch.setattr(onnxrt, "time_candidate_timings", drifting)
    chosen, record = choose_int8_form(result, options, "cpu", tmp_path, lambda *a: {"passed": True})
    assert record["nodes"]["clamp"] < record["nodes"]["depthwise"]
    assert record["chosen"]["relu_form"] == chosen_form
    assert record["within_drift_of_fastest"] == sorted({"depthwise x1 spin"} | (
        {"clamp x1 spin"} if chosen_form == "clamp" else set()))
    assert record["round_ms_batch1"]["depthwise x1 spin"] == [0.9, 1.1]


@pytest.mark.parametrize("clamp_passes", [True, False])
def test_int8_form_choice_is_gated_recorded_and_honoured(tmp_path, monkeypatch, clamp_passes):
    path, _ = tiny_int8_onnx(tmp_path)
    source = onnx.load(str(path))
    passes = ["cleanup", "flatten_nested_concats", "fold_batchnorm", "remove_redundant_qdq", "integer_dataflow"]
    options = {"integer_dataflow": {"calibration": IMAGES}}
    result = run_surgery(source, passes, pass_options=options)
    monkeypatch.setattr(onnxrt, "thread_candidates", lambda cpus=None: [1, 2])
    monkeypatch.setattr(onnxrt, "time_candidate_timings", _fake_timer(("clamp", 2, "nospin")))
    checked = []

    def accuracy_check(onnx_path, settings):
        checked.append((onnx_path.name, settings.intra_op_threads))
        return {"passed": clamp_passes, "degradation_points": 0.1 if clamp_passes else 9.0}

    chosen, record = choose_int8_form(result, options, "cpu", tmp_path, accuracy_check)
    assert checked == [("int8-form-clamp.onnx", 2)]  # only the variant that is not exact, once
    assert set(record["median_ms_batch1"]) == {f"{f} x{n} {p}" for f in ("depthwise", "clamp")
                                              for n, p in ((1, "spin"), (2, "spin"), (2, "nospin"))}
    assert record["cpu"]["int8_isa"] == cpu_int8_isa()
    assert record["accuracy_checks"]["clamp"]["passed"] is clamp_passes
    assert not list(tmp_path.glob("int8-form-*.onnx"))
    has_max = any(n.op_type == "Max" for n in chosen.model.graph.node)
    if clamp_passes:
        assert record["chosen"] == {"relu_form": "clamp", "intra_op_threads": 2, "thread_pool": "nospin",
                                    "session_config": {"session.intra_op.allow_spinning": "0"}}
        assert has_max
    else:  # the fastest exact one: the fake timer ranks candidates in their order
        assert record["chosen"]["relu_form"] == "depthwise" and record["chosen"]["intra_op_threads"] == 1
        assert not has_max
        return
    # honoured: the builder takes the choice into session.json, and the runner reads it back
    onnx.save(chosen.model, tmp_path / "model.onnx")
    build = OnnxRuntimeBuilder().build(tmp_path / "model.onnx", "cpu", "int8", tmp_path / "engine", {
        "intra_op_threads": record["chosen"]["intra_op_threads"],
        "session_config": record["chosen"]["session_config"], "qdq_flavour": "uint8-integer-dataflow"})
    session = json.loads((tmp_path / "engine" / "session.json").read_text())
    assert session["intra_op_threads"] == 2 and session["thread_tuning_ms"] is None
    assert session["session_config"]["session.intra_op.allow_spinning"] == "0"
    assert session["cpu"]["int8_isa"] == cpu_int8_isa()
    runner = OnnxRuntimeRunner(tmp_path / "engine")
    assert runner.settings.session_config == session["session_config"] and runner.settings.intra_op_threads == 2
    assert "Max" in [n.op_type for n in onnx.load(build.artifacts["model"]).graph.node]
    with runner:
        assert np.isfinite(runner.infer(IMAGES[:1])).all()


@pytest.mark.parametrize("gate", ["on", "off"])
def test_a_form_is_checked_against_fp32_or_with_the_gate_off_against_the_exact_forms_engine(
        gate, tiny, faces, tmp_path, monkeypatch):
    """As OpenVINO's candidates are: with the gate on, the clamp form must pass it against FP32; with
    --no-accuracy-gate (the user accepted what the precision costs) it is held to the engine of the
    exact depthwise form, so an INT4 or int8 build without the gate may still take a faster form."""
    import cunet_optimize.pipeline.build as build_module
    from conftest import run_build_json, tiny_build_args

    monkeypatch.setattr(onnxrt, "time_candidate_timings", lambda candidates, level="disable", runs=10: {
        key: _steady(1.0 if key[0] == "clamp" else 2.0) for key in candidates})
    engines, real = [], build_module._variant_gate

    def watched(b, ort_engine=None, *args):
        engines.append(ort_engine)
        return real(b, ort_engine, *args)

    monkeypatch.setattr(build_module, "_variant_gate", watched)
    args = tiny_build_args(tiny, faces, tmp_path, "int8", "--max-nme-increase", "50")
    if gate == "on":
        args.remove("--no-accuracy-gate")
    m = run_build_json(args)
    check = m["surgery"]["int8_cpu_form"]["accuracy_checks"]["clamp"]
    fp32 = m["accuracy"]["reference_value"]
    if gate == "on":
        assert engines == [None] and check["against"] == "the FP32 reference" and check["reference_value"] == fp32
    else:
        engine, = engines
        assert engine.model_path.name == "int8-form-depthwise.onnx"
        assert check["against"].startswith("ONNX Runtime's engine of the depthwise form")
        assert check["reference_value"] != fp32
    assert check["passed"] and m["surgery"]["int8_cpu_form"]["chosen"]["relu_form"] == "clamp"
