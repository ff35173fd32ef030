"""OpenVINO as the second CPU runtime (engines/openvino.py, pipeline/autotune.py choose_cpu_runtime):
the choice recorded in build.json and honoured by load_engine and profile, bf16 refused on a CPU
without it, and TensorRT bundles' ONNX measured in OpenVINO beside the ONNX Runtime reference.

The tests that run OpenVINO skip where the `openvino` extra is absent (the `test` extra installs it)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import needs_openvino, run_build_json, run_cli, tiny_build_args
from cunet_optimize.engines import cpu_isa
from cunet_optimize.engines.base import Timing
from cunet_optimize.engines.openvino import openvino_version

NO_BF16_FLAGS = "fpu sse sse2 avx avx2 avx512f avx512bw avx512_vnni"


@pytest.fixture
def cpu_without_bf16(tmp_path, monkeypatch):
    """This process sees a CPU with AVX-512 VNNI but neither AVX-512 BF16 nor AMX."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Simulated Xeon\nflags\t\t: {NO_BF16_FLAGS}\n")
    monkeypatch.setattr(cpu_isa, "CPUINFO", cpuinfo)
    return cpuinfo


def test_bf16_isa_from_flags(cpu_without_bf16, tmp_path):
    assert cpu_isa.bf16_isa_from_flags("avx512f avx512_bf16 amx_bf16 amx_tile") == "amx_bf16"
    assert cpu_isa.bf16_isa_from_flags({"avx512_bf16"}) == "avx512_bf16"
    assert cpu_isa.cpu_bf16_isa() == "none" and cpu_isa.cpu_model() == "Simulated Xeon"
    assert cpu_isa.cpu_int8_isa() == "avx512_vnni"
    assert cpu_isa.cpu_bf16_isa(tmp_path / "missing") == "unknown"


def test_bf16_is_refused_in_one_line_on_a_cpu_without_it(cpu_without_bf16, tiny, faces, tmp_path, capsys, caplog):
    workdir = tmp_path / "w"
    status, out, err = run_cli(tiny_build_args(tiny, faces, workdir, "bf16"), capsys, caplog)
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "AVX-512 BF16 or AMX" in lines[0] and "Simulated Xeon" in lines[0]
    assert not workdir.exists()  # refused before any work


def test_bf16_is_a_cpu_precision_only(tiny, faces, tmp_path, capsys, caplog):
    status, _, err = run_cli(tiny_build_args(tiny, faces, tmp_path / "w", "bf16", "--target", "h100"), capsys, caplog)
    assert status == 2 and "cannot run precision bf16" in err


def test_cpu_runtime_onnxruntime_times_nothing_on_openvino(int8_build):
    """The session's int8 build (the suite pins --cpu-runtime onnxruntime, conftest): as without the
    extra, ONNX Runtime's engine and no OpenVINO candidate."""
    m = int8_build.manifest
    assert (int8_build.out / "session.json").is_file()
    assert m["backend"] == "onnxruntime" and "cpu_runtime" not in m
    assert not (int8_build.out / "openvino.json").exists()


@pytest.mark.parametrize("args, says", [
    (["--target", "h100", "--cpu-runtime", "onnxruntime"], "--cpu-runtime onnxruntime is for the cpu target"),
    # (without the extra, that it is missing is the refusal)
    (["--cpu-runtime", "onnxruntime", "--precision", "bf16"],
     "--precision bf16 runs on OpenVINO only" if openvino_version() else "OpenVINO (ONNX Runtime's CPU provider has "
                                                                         "no bf16 convolution), which is not installed"),
])
def test_cpu_runtime_refusals_are_one_line(args, says, tiny, faces, tmp_path, capsys, caplog):
    workdir = tmp_path / "w"
    status, _, err = run_cli([*tiny_build_args(tiny, faces, workdir, "int8"), *args], capsys, caplog)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and says in lines[0], err
    assert not workdir.exists()


def test_cpu_runtime_from_the_environment_is_checked(tiny, faces, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("CUNET_CPU_RUNTIME", "openvin")
    status, _, err = run_cli(tiny_build_args(tiny, faces, tmp_path / "w", "int8"), capsys, caplog)
    assert status == 2 and "$CUNET_CPU_RUNTIME='openvin'" in err
    monkeypatch.setenv("CUNET_CPU_RUNTIME", "onnxruntime")
    monkeypatch.setenv("CUNET_CPU_THREADS", "two")  # the thread budget too, before any work
    status, _, err = run_cli(tiny_build_args(tiny, faces, tmp_path / "w", "int8"), capsys, caplog)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "$CUNET_CPU_THREADS='two'" in lines[0], err
    assert not (tmp_path / "w").exists()
    # for a TensorRT target the variable speaks of nothing: no refusal from it, and no pinned runtime
    from cunet_optimize.pipeline.build import BuildOptions, check_cpu_runtime
    from cunet_optimize.targets import get_target

    opts = BuildOptions(target="h100")
    check_cpu_runtime(opts, get_target("h100"))
    assert opts.cpu_runtime == "auto"


@needs_openvino
def test_an_int4_build_runs_on_openvino_where_it_is_faster(tiny, faces, tmp_path, monkeypatch):
    """Per-channel INT4 is INT8 integers: OpenVINO's integer kernels run the deployed graph too."""
    import cunet_optimize as co
    import cunet_optimize.engines.base as base
    from cunet_optimize.engines.openvino import OpenVinoRunner

    monkeypatch.setattr(base, "time_in_blocks", _timing_favours("openvino"))
    m = run_build_json(tiny_build_args(tiny, faces, tmp_path, "int4", "--cpu-runtime", "auto"))
    assert m["precision"] == "int4" and m["backend"] == "openvino" == m["cpu_runtime"]["chosen"]
    with co.load_engine(tmp_path / "engines" / m["name"]) as engine:
        assert isinstance(engine.runner, OpenVinoRunner)


@needs_openvino
def test_cpu_runtime_openvino_is_chosen_even_when_slower(tiny, faces, tmp_path, monkeypatch):
    import cunet_optimize.engines.base as base

    monkeypatch.setattr(base, "time_in_blocks", _timing_favours("onnxruntime"))
    m = run_build_json(tiny_build_args(tiny, faces, tmp_path, "fp32", "--cpu-runtime", "openvino"))
    assert m["backend"] == "openvino" == m["cpu_runtime"]["chosen"]
    assert m["cpu_runtime"]["pinned"] == "openvino (--cpu-runtime)"


def test_bf16_without_openvino_says_how_to_install_it(tiny, faces, tmp_path, monkeypatch, capsys, caplog):
    import cunet_optimize.engines.openvino as ov

    if cpu_isa.cpu_bf16_isa() in ("none", "unknown"):
        pytest.skip("this CPU has no bf16: the ISA refusal comes first")
    monkeypatch.setattr(ov, "openvino_version", lambda: None)
    status, _, err = run_cli(tiny_build_args(tiny, faces, tmp_path / "w", "bf16"), capsys, caplog)
    assert status == 2 and "cunet-optimize[openvino]" in err


def _timing_favours(runtime: str):
    """time_in_blocks replaced: `runtime`'s candidates the fastest (the rest of the choice is real)."""
    def timed(runners, image, runs, rounds=2):
        ms = [(1.0 if key[0] == runtime else 2.0) + 0.01 * i for i, key in enumerate(runners)]
        return {key: Timing(t, (t, t)) for key, t in zip(runners, ms)}

    return timed


@pytest.fixture(scope="module")
def openvino_int8(tmp_path_factory, tiny, faces):
    """The tiny model built int8 for the CPU with OpenVINO's candidates timed fastest."""
    if openvino_version() is None:
        pytest.skip("OpenVINO is not installed (pip install 'cunet-optimize[openvino]')")
    import cunet_optimize.engines.base as base

    patch = pytest.MonkeyPatch()
    patch.setattr(base, "time_in_blocks", _timing_favours("openvino"))
    try:
        workdir = tmp_path_factory.mktemp("ov-int8")
        manifest = run_build_json(tiny_build_args(tiny, faces, workdir, "int8", "--cpu-runtime", "auto"))
    finally:
        patch.undo()
    return workdir, workdir / "engines" / manifest["name"], manifest


@needs_openvino
def test_runtime_choice_is_recorded(openvino_int8):
    _, out, m = openvino_int8
    record = m["cpu_runtime"]
    assert record["chosen"] == "openvino" == m["backend"] and m["backend_version"] == openvino_version()
    timed = record["median_ms_batch1"]
    assert "onnxruntime (as built)" in timed
    assert any(k.startswith("openvino deployed") for k in timed) and any("qdq-symmetric" in k for k in timed)
    assert record["accuracy_checks"] and all("passed" in c for c in record["accuracy_checks"].values())
    session = json.loads((out / "openvino.json").read_text())
    assert session["model"] == m["artifacts"]["openvino_model"] and (out / session["model"]).is_file()
    assert session["inference_precision"] == "f32"  # never bf16 behind an int8 build's back
    assert m["accuracy"]["runtime"].startswith("OpenVINO")
    assert (out / "session.json").is_file()  # ONNX Runtime's engine stays beside it


@needs_openvino
def test_candidates_compiled_again_are_imported_from_the_builds_compile_cache(openvino_int8, tmp_path):
    """Inside compile_cache a model compiled again is imported from the blob its first compile left,
    and every compile setting gives the outputs a plain compile with it gives: bf16, where this CPU
    runs it, differs from f32 and stays bf16 (OpenVINO 2026.4's CPU plugin keeps one blob per
    model and applies the settings on import). The folder goes with the context; the build folder
    keeps none."""
    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.engines.openvino import OpenVinoSessionRunner, OvSettings, bf16_runs_here, compile_cache

    _, out, m = openvino_int8
    assert not [p for p in out.rglob("*") if "cache" in p.name and p.suffix != ".cache"]  # (calibration.cache)
    model, image = out / m["artifacts"]["openvino_model"], verification_batch(1)
    settings = [OvSettings(threads=1), OvSettings(threads=1, performance_hint="THROUGHPUT", num_streams=0),
                *([OvSettings("bf16", threads=1)] if bf16_runs_here() else [])]
    expected = []
    for s in settings:
        with OpenVinoSessionRunner(model, s) as plain:
            expected.append(plain.infer(image))
    if len(settings) == 3:
        assert not np.array_equal(expected[2], expected[0])
    with compile_cache(tmp_path) as cache:
        imported = []
        for s, want in [*zip(settings, expected), (settings[0], expected[0])]:
            with OpenVinoSessionRunner(model, s) as runner:
                imported.append(runner._compiled.get_property("LOADED_FROM_CACHE"))
                np.testing.assert_array_equal(runner.infer(image), want)
        # the first compile fills the cache, the same settings again are imported (whether other
        # settings share the blob is OpenVINO's keying: 2026.4 shares it, with the outputs above)
        assert imported[0] is False and imported[-1] is True
        with compile_cache(tmp_path) as inner:  # nested: the outer folder serves
            assert inner == cache
    assert list(tmp_path.iterdir()) == []
    with OpenVinoSessionRunner(model, settings[0]) as after:  # no cache outside the context
        assert after._compiled.get_property("LOADED_FROM_CACHE") is False


@needs_openvino
def test_load_engine_and_profile_honour_the_recorded_runtime(openvino_int8, capsys):
    import cunet_optimize as co
    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.engines.onnxrt import OnnxRuntimeRunner
    from cunet_optimize.engines.openvino import OpenVinoRunner
    from cunet_optimize.profiling import profile_engines

    workdir, out, m = openvino_int8
    images = verification_batch(2)
    with co.load_engine(out) as engine:
        assert isinstance(engine.runner, OpenVinoRunner)
        got = engine.infer({"image": images})["heatmaps"]
    with OpenVinoRunner(out) as runner:
        np.testing.assert_array_equal(got, runner.infer(images))
    result = profile_engines([out], runs=2, warmup=1, batch_sizes=(1,), memory="off", layer_runs=0, progress=False)
    data = result.to_dict()
    rows = {v["name"]: v for v in data["variants"]}
    chosen, other = rows[m["name"]], rows[f"{m['name']}@onnxruntime"]
    assert chosen["backend"] == "openvino" and chosen["runtime"].startswith("OpenVINO") and chosen["measured"]
    assert other["backend"] == "onnxruntime" and other["runtime"].startswith("ONNX Runtime") and other["measured"]
    assert "OpenVINO" in json.dumps(data.get("statement"))
    with OnnxRuntimeRunner(out) as ort:  # the engine load_engine did not pick is still the build's
        assert ort.infer(images).shape == got.shape


@needs_openvino
def test_serve_takes_an_openvino_build_by_its_onnx_runtime_engine(openvino_int8, caplog):
    from cunet_optimize.serving.server import check_servable

    _, out, m = openvino_int8
    served, _ = check_servable(out)  # the Python backend of this Triton runs ONNX Runtime
    assert served.name == m["name"] and "serves its ONNX Runtime engine" in caplog.text


@needs_openvino
def test_a_candidate_that_fails_the_gate_is_not_chosen(tiny, faces, tmp_path, monkeypatch):
    import cunet_optimize.engines.base as base
    import cunet_optimize.pipeline.build as build_module

    monkeypatch.setattr(base, "time_in_blocks", _timing_favours("openvino"))
    monkeypatch.setattr(build_module, "_variant_gate", lambda b, *_: lambda *a, **k: {"passed": False})
    m = run_build_json(tiny_build_args(tiny, faces, tmp_path, "int8", "--cpu-runtime", "auto"))
    assert m["cpu_runtime"]["chosen"] == "onnxruntime" == m["backend"]
    assert m["cpu_runtime"]["openvino"] is None
    assert not (tmp_path / "engines" / m["name"] / "openvino.json").exists()
    assert not (tmp_path / "engines" / m["name"] / "model.ov.onnx").exists()


@needs_openvino
def test_with_the_gate_on_a_candidate_is_judged_against_fp32(tiny, faces, tmp_path, monkeypatch):
    """With the gate on, an OpenVINO candidate must pass it against FP32 as the build must (with
    the gate off, against ONNX Runtime's engine: test_a_plan_with_float_convs_times_and_gates_openvino_at_bf16)."""
    import cunet_optimize.engines.base as base

    monkeypatch.setattr(base, "time_in_blocks", _timing_favours("openvino"))
    args = tiny_build_args(tiny, faces, tmp_path, "int8", "--cpu-runtime", "auto", "--max-nme-increase", "50")
    args.remove("--no-accuracy-gate")
    m = run_build_json(args)
    assert m["accuracy"]["gate_enforced"]
    check, = m["cpu_runtime"]["accuracy_checks"].values()
    assert check["against"] == "the FP32 reference" and check["reference_value"] == m["accuracy"]["reference_value"]
    assert check["passed"] and m["cpu_runtime"]["chosen"] == "openvino" == m["backend"]


@needs_openvino
@pytest.mark.parametrize("openvino_lead_ms, chosen", [(0.3, "onnxruntime"), (0.6, "openvino")])
def test_runtimes_the_timer_cannot_tell_apart_are_timed_again(monkeypatch, tmp_path, openvino_lead_ms, chosen):
    """Every timing drifts 0.2 ms between its rounds. OpenVINO 0.3 ms ahead is within the drift of
    both: ONNX Runtime and OpenVINO's best are timed again, longer, and that timing (here ONNX
    Runtime 0.1 ms ahead) decides. 0.6 ms ahead, OpenVINO is faster beyond doubt, with no second timing."""
    import cunet_optimize.engines.base as base
    from cunet_optimize.pipeline.autotune import RETIMING_ROUNDS, choose_cpu_runtime

    calls = []

    def drifting(runners, image, runs, rounds=2):
        if ("onnxruntime",) in runners:  # (not OpenVINO's retiming of its own tied settings)
            calls.append((len(runners), rounds))
        lead = openvino_lead_ms if rounds == 2 else -0.1
        ms = {key: 2.0 - (lead if key[0] == "openvino" else 0.0) for key in runners}
        return {key: Timing(m, (m - 0.1, m + 0.1)) for key, m in ms.items()}

    monkeypatch.setattr(base, "time_in_blocks", drifting)
    record = choose_cpu_runtime(object(), {"deployed": tmp_path / "model.onnx"}, "fp32", lambda runner: {"passed": True})
    assert record["chosen"] == chosen and record["openvino"] is not None  # kept beside it either way
    assert record["round_ms_batch1"]["onnxruntime (as built)"] == [1.9, 2.1]
    if chosen == "onnxruntime":
        assert calls[1] == (2, RETIMING_ROUNDS) and len(calls) == 2
        assert record["retimed_ms_batch1"]["onnxruntime (as built)"] == 2.0
    else:
        assert len(calls) == 1 and record["retimed_ms_batch1"] is None


@needs_openvino
def test_openvino_settings_the_timer_cannot_tell_apart_are_timed_again(monkeypatch, tmp_path):
    """One and two threads within each other's drift in the first timing (one thread 0.05 ms ahead):
    both are timed again, longer, and that timing (two threads 0.5 ms ahead) decides; only the
    tied ones are timed again."""
    import cunet_optimize.engines.base as base
    from cunet_optimize.pipeline.autotune import RETIMING_ROUNDS, choose_cpu_runtime

    retimed = []

    def drifting(runners, image, runs, rounds=2):
        def ms(key):
            if key[0] == "onnxruntime":
                return 5.0
            threads, hint = key[2].threads, key[2].performance_hint
            if hint != "LATENCY":
                return 4.0  # beyond the drift of the fastest: not timed again
            return (2.0 - 0.05 * (threads == 1)) if rounds == 2 else (2.0 - 0.5 * (threads == 2))
        if rounds == RETIMING_ROUNDS:
            retimed.append(sorted(key[2].threads for key in runners))
        return {key: Timing(ms(key), (ms(key) - 0.1, ms(key) + 0.1)) for key in runners}

    monkeypatch.setattr("cunet_optimize.engines.onnxrt.thread_candidates", lambda: [1, 2])  # (the suite sets 1)
    monkeypatch.setattr(base, "time_in_blocks", drifting)
    record = choose_cpu_runtime(object(), {"deployed": tmp_path / "model.onnx"}, "fp32", lambda runner: {"passed": True})
    assert retimed == [[1, 2]] and record["openvino"]["settings"]["threads"] == 2
    assert record["openvino_retimed_ms_batch1"] == {"openvino deployed f32 x1 latency": 2.0,
                                                    "openvino deployed f32 x2 latency": 1.5}


@needs_openvino
@pytest.mark.parametrize("big_lead_ms, form", [(0.05, "small"), (0.6, "big")])
def test_openvino_forms_the_timer_cannot_tell_apart_go_by_their_deployed_bytes(monkeypatch, tmp_path, big_lead_ms,
                                                                             form):
    """Every timing drifts 0.2 ms between its rounds. A form 0.05 ms ahead of a smaller one is
    within the drift, and timed again, within 5% of it: the smaller deploys (a choice between such
    timings would follow the noise). 0.6 ms ahead, the faster form deploys whatever its bytes."""
    import cunet_optimize.engines.base as base
    from cunet_optimize.pipeline.autotune import choose_cpu_runtime

    forms = {}
    for name, size in (("big", 4096), ("small", 16)):
        add = onnx.helper.make_node("Add", ["image", "w"], ["heatmaps"])
        io = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [size]) for n in ("image", "heatmaps")]
        graph = onnx.helper.make_graph([add], name, io[:1], io[1:], [onnx.numpy_helper.from_array(
            np.ones(size, np.float32), "w")])
        forms[name] = tmp_path / f"{name}.onnx"
        onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), forms[name])

    def drifting(runners, image, runs, rounds=2):
        ms = {key: 3.0 if key[0] == "onnxruntime" else 2.0 - big_lead_ms * (key[1] == "big") for key in runners}
        return {key: Timing(m, (m - 0.1, m + 0.1)) for key, m in ms.items()}

    monkeypatch.setattr(base, "time_in_blocks", drifting)
    record = choose_cpu_runtime(object(), forms, "fp32", lambda runner: {"passed": True})
    assert record["chosen"] == "openvino" and record["openvino"]["form"] == form
    sizes = record["openvino_form_bytes"]  # weighed only between tied forms
    assert sizes["small"] < sizes["big"] if form == "small" else sizes == {}
    tied_forms = {label.split()[1] for label in record["openvino_tied"]}  # ("openvino FORM SETTINGS")
    assert tied_forms == ({"big", "small"} if form == "small" else {"big"})


@needs_openvino
def test_onnx_runtime_chosen_when_faster_and_honoured(tiny, faces, tmp_path, monkeypatch):
    import cunet_optimize as co
    import cunet_optimize.engines.base as base
    from cunet_optimize.engines.onnxrt import OnnxRuntimeRunner

    monkeypatch.setattr(base, "time_in_blocks", _timing_favours("onnxruntime"))
    m = run_build_json(tiny_build_args(tiny, faces, tmp_path, "fp32", "--cpu-runtime", "auto"))
    assert m["cpu_runtime"]["chosen"] == "onnxruntime" == m["backend"]
    out = tmp_path / "engines" / m["name"]
    assert m["cpu_runtime"]["openvino"] is not None and (out / "openvino.json").is_file()  # profiled beside it
    with co.load_engine(out) as engine:
        assert isinstance(engine.runner, OnnxRuntimeRunner)


@needs_openvino
@pytest.mark.skipif(cpu_isa.cpu_bf16_isa() in ("none", "unknown"), reason="this CPU has no AVX-512 BF16 or AMX")
def test_bf16_build_runs_on_openvino_and_is_gated(tiny, faces, tmp_path):
    m = run_build_json(tiny_build_args(tiny, faces, tmp_path, "bf16", "--cpu-runtime", "auto"))
    out = tmp_path / "engines" / m["name"]
    assert m["precision"] == "bf16" and m["backend"] == "openvino" and m["cpu_runtime"]["chosen"] == "openvino"
    assert not (out / "session.json").exists()  # ONNX Runtime has no bf16 Conv
    assert json.loads((out / "openvino.json").read_text())["inference_precision"] == "bf16"
    assert "bf16" in m["accuracy"]["runtime"] and m["accuracy"]["quantized_value"] is not None


@needs_openvino
def test_tensorrt_bundle_accuracy_is_also_measured_in_openvino(tiny, faces, tmp_path):
    m = run_build_json(tiny_build_args(tiny, faces, tmp_path, "int8", "--target", "h100"))
    gate = m["accuracy"]
    assert m["backend"] == "tensorrt" and gate["runtime"].startswith("ONNX Runtime CPU reference")
    ov = gate["openvino"]
    assert ov["runtime"].startswith("OpenVINO") and ov["gating"] is False and "error" not in ov
    # the same Q/DQ graph: integer kernels agree with the exact reference to well within the gate
    assert abs(ov["value"] - gate["quantized_value"]) < 0.5
    assert ov["degradation_points"] == pytest.approx(ov["value"] - gate["reference_value"])


def test_the_auto_search_costs_float_convs_as_bf16_where_the_cpu_runs_it(cpu_without_bf16, monkeypatch):
    """bf16 in the auto search: on a CPU target with AVX-512 BF16 or AMX (and OpenVINO), a plan's
    float convs are bf16, half FP32's cost per MAC, stored as float32; elsewhere, or with ONNX Runtime
    pinned, FP32 (this process sees a simulated CPU without bf16 first)."""
    import cunet_optimize.engines.openvino as ov
    from cunet_optimize.pipeline.build import BuildOptions, plan_float_type
    from cunet_optimize.quant import auto
    from cunet_optimize.targets import get_target

    cpu = get_target("cpu")
    assert plan_float_type(BuildOptions(cpu_runtime="auto"), cpu) == "fp32"  # no bf16 on this CPU
    monkeypatch.setattr(ov, "check_bf16_here", lambda: "amx_bf16")
    assert plan_float_type(BuildOptions(cpu_runtime="auto"), cpu) == "bf16"
    assert plan_float_type(BuildOptions(cpu_runtime="onnxruntime"), cpu) == "fp32"  # no bf16 kernel there
    assert plan_float_type(BuildOptions(cpu_runtime="auto"), get_target("h100")) == "fp16"
    layer = auto.LayerInfo("c", "c", "dense", (8, 8, 3, 3), 1000)
    assert auto.layer_cost(layer, "float", "latency", "bf16") == auto.layer_cost(layer, "float", "latency", "fp32") / 2
    assert auto.layer_cost(layer, "float", "size", "bf16") == auto.layer_cost(layer, "float", "size", "fp32")
    candidates = ov.settings_candidates("int8", [1, 2], bf16_float=True)
    assert {s.inference_precision for s in candidates} == {"f32", "bf16"} and len(candidates) == 8
    assert {s.inference_precision for s in ov.settings_candidates("int8", [1, 2])} == {"f32"}


@needs_openvino
@pytest.mark.skipif(cpu_isa.cpu_bf16_isa() in ("none", "unknown"), reason="this CPU has no AVX-512 BF16 or AMX")
def test_a_plan_with_float_convs_times_and_gates_openvino_at_bf16(tiny, faces, tmp_path, monkeypatch):
    """A plan keeping convs float, built for this bf16 CPU with the gate off: OpenVINO is also timed
    at bf16 (its float convs in bf16, the integer ones integer), each inference precision checked on
    its own. With --no-accuracy-gate the user accepted what the precision costs against FP32, not what
    the runtime adds: each candidate is held to ONNX Runtime's engine of the same graph (its value,
    not FP32's). One usable CPU here: half the candidates to time, by the same rule."""
    import cunet_optimize as co
    import cunet_optimize.engines.onnxrt as onnxrt
    from cunet_optimize.evaluation import evaluate_landmarks
    from cunet_optimize.pipeline.build import BuildOptions, run_stages
    from cunet_optimize.quant import auto
    from cunet_optimize.quant.qmodel import quantize_model
    from cunet_optimize.tasks import open_dataset_or_default

    monkeypatch.setattr(onnxrt, "usable_cpus", lambda: 1)
    layers = auto.layer_infos(quantize_model(co.load_model(str(tiny)), "int8-convin"), "conv", (64, 64))
    inner = [layer.name for layer in layers if layer.role not in auto.EDGE_ROLES]
    plan = {layer.name: "int8" for layer in layers} | {n: "float" for n in inner[::3]}
    opts = BuildOptions(precision="auto", layer_formats=plan, model=str(tiny), calib_data=str(faces), calib_split=None,
                        calib_images=4,
                        eval_data=str(faces), accuracy_gate=False, cpu_runtime="auto", workdir=str(tmp_path))
    m = run_stages(opts, echo=lambda *_: None, progress=False).manifest
    timed = m["cpu_runtime"]["median_ms_batch1"]
    assert any(" bf16 " in k for k in timed) and any(" f32 " in k for k in timed)
    checks = m["cpu_runtime"]["accuracy_checks"]
    assert checks and {c.split()[-1] for c in checks} <= {"f32", "bf16"}
    eval_set, _ = open_dataset_or_default(str(faces), "test")
    with onnxrt.OnnxRuntimeRunner(tmp_path / "engines" / m["name"]) as engine:  # the engine's own value
        value = evaluate_landmarks(engine.infer, eval_set, progress=False).metrics["nme_percent"]
    assert value != m["accuracy"]["reference_value"]  # (FP32's)
    for check in checks.values():
        assert check["against"].startswith("ONNX Runtime's engine")
        assert check["reference_value"] == pytest.approx(value, rel=1e-9)
