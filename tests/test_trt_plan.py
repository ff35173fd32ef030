"""TensorRT build plans, their trtexec/recipe renderings, the API adapter's call sequence,
and the TensorRT bundle builder. No test here builds or claims a TensorRT engine; the
one that would needs TensorRT and an NVIDIA GPU and is skipped without them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cunet_optimize.targets import PRECISIONS, TARGETS, check_precision
from cunet_optimize.engines.trt_apply import TensorRTUnavailable, apply_build_plan, import_tensorrt
from cunet_optimize.engines.trt_builder import TensorRTBuilder
from cunet_optimize.engines.trt_plan import (
    TrtBuildPlan,
    make_build_plan,
    plan_from_dict,
    plan_to_dict,
    render_polygraphy_compare,
    render_shell_recipe,
    render_trtexec,
)
from cunet_optimize.engines.trt_runner import TrtRunner
from cunet_optimize.errors import CUNetError

GiB = 1 << 30
_TRT_SPEC = importlib.util.find_spec("tensorrt")
# a stub-only tensorrt/ folder (tensorrt-stubs) imports as a namespace package: not TensorRT
HAS_TENSORRT = _TRT_SPEC is not None and _TRT_SPEC.origin not in (None, "namespace")
PRECISION_SWITCHES = {"--fp16", "--int8", "--fp8", "--bf16", "--int4", "--best"}


def combos():
    """Every (target, precision, major) a TensorRT target can plan, DLA off."""
    for name, spec in TARGETS.items():
        if spec.backend != "tensorrt":
            continue
        for major in spec.tensorrt_majors:
            for precision in PRECISIONS:
                if precision == "int4" or precision in spec.precisions:
                    yield name, precision, major


ALL = list(combos())


# --------------------------------------------------------------------------------------
# Hand-derived plans for the cases the docs decide (see the report for the sources)


def test_orin_nano_int8_trt10_renders_int8_with_fp16_fallback():
    plan = make_build_plan("jetson-orin-nano", "int8", "model.onnx", 10)
    assert plan.strongly_typed is False and plan.network_flags == ()
    assert plan.builder_flags == ("INT8", "FP16")
    assert plan.onnx_form == "qdq-int8"
    assert plan.batch == (1, 1, 4) and plan.workspace_bytes == 1 * GiB
    assert render_trtexec(plan) == [
        "trtexec",
        "--onnx=model.onnx",
        "--saveEngine=model.engine",
        "--minShapes=image:1x3x256x256",
        "--optShapes=image:1x3x256x256",
        "--maxShapes=image:4x3x256x256",
        "--memPoolSize=workspace:1024",
        "--int8",
        "--fp16",
        "--skipInference",
    ]


def test_h100_int8_trt11_has_no_precision_switch_and_no_strongly_typed_flag():
    plan = make_build_plan("h100", "int8", "model.onnx", 11)
    assert plan.strongly_typed is True
    assert plan.network_flags == ()  # STRONGLY_TYPED is deprecated and ignored on 11
    assert plan.builder_flags == ()
    assert plan.onnx_form == "qdq-int8"
    argv = render_trtexec(plan)
    assert not PRECISION_SWITCHES & set(argv)
    assert "--stronglyTyped" not in argv
    assert "--memPoolSize=workspace:8192" in argv
    assert "--optShapes=image:16x3x256x256" in argv and "--maxShapes=image:64x3x256x256" in argv


def test_agx_orin_int8_on_dla_with_trt11():
    plan = make_build_plan("jetson-agx-orin", "int8", "model.onnx", 11, dla_core=1)
    assert plan.min_trt_version == "11.4.1" and plan.max_trt_version is None
    assert plan.parser_flags == ("ADJUST_FOR_DLA",)
    assert plan.builder_flags == ("GPU_FALLBACK",)
    assert plan.batch == (1, 1, 1)
    assert plan.onnx_form == "qdq-int8+fp16-cast"  # DLA computes nothing in FP32
    argv = render_trtexec(plan)
    assert "--useDLACore=1" in argv and "--allowGPUFallback" in argv
    assert not PRECISION_SWITCHES & set(argv)


def test_orin_nx_fp16_on_dla_with_trt10_without_gpu_fallback():
    plan = make_build_plan("jetson-orin-nx", "fp16", "model.onnx", 10, dla_core=0, gpu_fallback=False)
    assert plan.builder_flags == ("FP16",)
    assert plan.gpu_fallback is False
    assert plan.max_trt_version == "10.7"  # last 10.x with DLA
    argv = render_trtexec(plan)
    assert "--fp16" in argv and "--useDLACore=0" in argv and "--allowGPUFallback" not in argv
    assert any("fail the build" in n for n in plan.notes)


def test_t4_fp16_strongly_typed_on_trt10_needs_a_cast_onnx():
    plan = make_build_plan("t4", "fp16", "model.onnx", 10, strongly_typed=True)
    assert plan.network_flags == ("STRONGLY_TYPED",)
    assert plan.builder_flags == ()
    assert plan.onnx_form == "fp16-cast"
    argv = render_trtexec(plan)
    assert "--stronglyTyped" in argv and "--fp16" not in argv


def test_a100_fp32_portable_engine_flags():
    plan = make_build_plan(
        "a100", "fp32", "m.onnx", 10, timing_cache="cache/a100.timing", hardware_compat="AMPERE_PLUS",
        version_compat=True, workspace=512 << 20, batch=(2, 4, 8),
    )  # fmt: skip
    assert plan.builder_flags == ("VERSION_COMPATIBLE",)
    assert plan.hardware_compat == "ampere+"
    assert plan.engine_path == "m.engine"
    argv = render_trtexec(plan)
    for flag in (
        "--timingCacheFile=cache/a100.timing",
        "--hardwareCompatibilityLevel=ampere+",
        "--versionCompatible",
        "--memPoolSize=workspace:512",
        "--minShapes=image:2x3x256x256",
        "--optShapes=image:4x3x256x256",
        "--maxShapes=image:8x3x256x256",
    ):
        assert flag in argv
    assert not PRECISION_SWITCHES & set(argv)


def test_int4_is_planned_as_fp16_with_dequantized_weights():
    weak = make_build_plan("l4", "int4", "model.onnx", 10)
    assert weak.executed_as == "fp16" and weak.builder_flags == ("FP16",)
    assert weak.onnx_form == "int4-dequantized"
    typed = make_build_plan("l4", "int4", "model.onnx", 11)
    assert typed.builder_flags == () and typed.onnx_form == "int4-dequantized+fp16-cast"
    assert any("dequantized" in n for n in typed.notes)


def test_fp8_is_unverified_and_strongly_typed_by_default_on_trt10():
    plan = make_build_plan("h100", "fp8", "model.onnx", 10)
    assert plan.strongly_typed and plan.builder_flags == () and plan.onnx_form == "qdq-fp8"
    assert any("unverified" in n for n in plan.notes)


# --------------------------------------------------------------------------------------
# The whole target x precision x major grid


@pytest.mark.parametrize("target,precision,major", ALL)
def test_every_plan_follows_the_major_rules(target, precision, major):
    plan = make_build_plan(target, precision, "model.onnx", major)
    spec = TARGETS[target]
    argv = render_trtexec(plan)
    shapes = plan.profile_shapes
    # Common to 10 and 11.
    assert argv[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine"]
    assert f"--minShapes=image:{'x'.join(map(str, shapes['min']))}" in argv
    assert f"--maxShapes=image:{spec.batch[2]}x3x256x256" in argv
    assert f"--memPoolSize=workspace:{spec.workspace_bytes // (1 << 20)}" in argv
    assert "EXPLICIT_BATCH" not in plan.network_flags
    assert plan.executed_as == check_precision(target, precision).executed_as
    if major == 11:
        assert plan.strongly_typed and plan.builder_flags == () and plan.network_flags == ()
        assert not PRECISION_SWITCHES & set(argv) and "--stronglyTyped" not in argv
    elif plan.strongly_typed:
        assert plan.network_flags == ("STRONGLY_TYPED",) and "--stronglyTyped" in argv
        assert not PRECISION_SWITCHES & set(argv)
    else:
        wanted = {"fp32": set(), "fp16": {"--fp16"}, "int4": {"--fp16"}, "int8": {"--int8", "--fp16"}}
        assert PRECISION_SWITCHES & set(argv) == wanted[precision]
    if precision in ("fp16", "int4") and plan.strongly_typed:
        assert plan.onnx_form.endswith("fp16-cast")


@pytest.mark.parametrize("target,precision,major", ALL)
def test_plan_round_trips_through_json(target, precision, major):
    plan = make_build_plan(target, precision, "model.onnx", major, timing_cache="t.cache")
    again = plan_from_dict(json.loads(json.dumps(plan_to_dict(plan))))
    assert again == plan and isinstance(again.batch, tuple)


def test_dla_plans_round_trip_too():
    plan = make_build_plan("jetson-agx-orin", "fp16", "model.onnx", 11, dla_core=0, batch=(2, 2, 2))
    assert plan_from_dict(plan_to_dict(plan)) == plan


def test_plan_from_dict_refuses_other_schemas_and_missing_fields():
    data = plan_to_dict(make_build_plan("t4", "fp16", "model.onnx", 10))
    with pytest.raises(CUNetError, match="schema"):
        plan_from_dict({**data, "schema": "something-else/9"})
    broken = dict(data)
    del broken["builder_flags"]
    with pytest.raises(CUNetError, match="missing fields \\['builder_flags'\\]"):
        plan_from_dict(broken)


# --------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target="jetson-orin-nano", precision="int8", dla_core=0), "jetson-orin-nano has no DLA cores"),
        (dict(target="t4", precision="fp16", dla_core=0), "t4 has no DLA cores"),
        (dict(target="jetson-agx-orin", precision="int8", dla_core=2), "DLA core 2 does not exist"),
        (dict(target="jetson-agx-orin", precision="fp32", dla_core=0), "DLA cannot run precision fp32"),
        (
            dict(target="jetson-agx-orin", precision="fp8"),
            "cannot run precision fp8; it runs: fp32, fp16, int8",
        ),
        (dict(target="t4", precision="fp8"), "t4 cannot run precision fp8"),
        (dict(target="h100", precision="int8", trt_major=11, strongly_typed=False), "always strongly typed"),
        (dict(target="jetson-orin-nano", precision="fp16", trt_major=11), "cannot build with TensorRT 11"),
        (dict(target="jetson-orin-nx", precision="int8", trt_major=11), "cannot build with TensorRT 11"),
        (dict(target="a100", precision="fp16", trt_major=12), "TensorRT major 12 is not supported"),
        (dict(target="cpu", precision="fp32"), "not a TensorRT one"),
        (dict(target="jetson-agx-orin", precision="fp16", hardware_compat="ampere+"), "cannot use them"),
        (dict(target="t4", precision="fp16", hardware_compat="ampere+"), "compute capability 7.5"),
        (dict(target="a100", precision="fp16", hardware_compat="hopper+"), "unknown"),
        (dict(target="a100", precision="fp16", workspace=1000), "whole number of MiB"),
        (dict(target="a100", precision="fp16", batch=(4, 2, 8)), "min <= opt <= max"),
        (dict(target="a100", precision="fp16", batch=(0, 1, 1)), "min <= opt <= max"),
        (dict(target="a100", precision="fp16", batch=(1, 2)), "three integers"),
        (dict(target="jetson-agx-orin", precision="int8", dla_core=0, batch=(1, 4, 8)), "static batch"),
    ],
)
def test_invalid_combinations_are_refused(kwargs, message):
    kwargs = dict(kwargs)
    target, precision = kwargs.pop("target"), kwargs.pop("precision")
    with pytest.raises(CUNetError, match=message):
        make_build_plan(target, precision, "model.onnx", **kwargs)


def test_dla_defaults_to_a_static_batch_and_accepts_one():
    assert make_build_plan("jetson-orin-nx", "int8", "m.onnx", dla_core=1).batch == (1, 1, 1)
    plan = make_build_plan("jetson-orin-nx", "int8", "m.onnx", dla_core=1, batch=(4, 4, 4))
    argv = render_trtexec(plan)
    assert {
        "--minShapes=image:4x3x256x256",
        "--optShapes=image:4x3x256x256",
        "--maxShapes=image:4x3x256x256",
    } <= set(argv)


def test_unverified_release_is_noted_in_the_plan():
    plan = make_build_plan("t4", "fp16", "model.onnx", 11)
    assert any("TensorRT 11 on t4 is unverified" in n for n in plan.notes)


# --------------------------------------------------------------------------------------
# The shell recipe: syntax, and its checks run against a stub trtexec that builds nothing


def _write_recipe(tmp_path: Path, plan: TrtBuildPlan) -> Path:
    recipe = tmp_path / "build_engine.sh"
    recipe.write_text(render_shell_recipe(plan, toolkit_version="test"))
    (tmp_path / "model.onnx").write_bytes(b"")
    return recipe


def _stub_trtexec(tmp_path: Path, version_code: int) -> Path:
    """A stand-in trtexec: prints a version banner, records its argv, writes no engine."""
    stub = tmp_path / "trtexec-stub"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version_code}] # trtexec $*"\n'
        f'printf "%s\\n" "$@" > "{tmp_path}/trtexec.argv"\n'
    )
    stub.chmod(0o755)
    return stub


def _run_recipe(recipe: Path, trtexec: Path | str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": str(trtexec), "HOME": str(recipe.parent)}
    return subprocess.run(["bash", str(recipe)], capture_output=True, text=True, env=env, timeout=30)


@pytest.mark.parametrize(
    "target,precision,major,kwargs",
    [
        ("jetson-orin-nano", "int8", 10, {}),
        ("h100", "int8", 11, {}),
        ("jetson-agx-orin", "fp16", 11, {"dla_core": 0}),
        ("a100", "fp32", 10, {"timing_cache": "my cache/a100.timing", "hardware_compat": "ampere+"}),
    ],
)
def test_recipe_is_valid_bash(tmp_path, target, precision, major, kwargs):
    recipe = _write_recipe(tmp_path, make_build_plan(target, precision, "model.onnx", major, **kwargs))
    check = subprocess.run(["bash", "-n", str(recipe)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_recipe_refuses_a_trtexec_of_another_major(tmp_path):
    recipe = _write_recipe(tmp_path, make_build_plan("jetson-agx-orin", "int8", "model.onnx", 10))
    result = _run_recipe(recipe, _stub_trtexec(tmp_path, 110401))
    assert result.returncode == 2
    assert "this recipe is for TensorRT 10.x but" in result.stderr and "TensorRT 11.4.1" in result.stderr
    assert (
        not (tmp_path / "trtexec.argv").exists()
        or "--onnx=model.onnx" not in (tmp_path / "trtexec.argv").read_text()
    )


def test_recipe_refuses_too_old_and_too_new_for_dla(tmp_path):
    plan = make_build_plan("jetson-agx-orin", "int8", "model.onnx", 10, dla_core=0)
    recipe = _write_recipe(tmp_path, plan)
    old = _run_recipe(recipe, _stub_trtexec(tmp_path, 100200))
    assert old.returncode == 2 and "needs TensorRT >= 10.3, found 10.2.0" in old.stderr
    new = _run_recipe(recipe, _stub_trtexec(tmp_path, 100800))
    assert new.returncode == 2 and "DLA needs TensorRT <= 10.7" in new.stderr


def test_recipe_without_trtexec_says_so(tmp_path):
    recipe = _write_recipe(tmp_path, make_build_plan("t4", "fp16", "model.onnx", 10))
    result = _run_recipe(recipe, tmp_path / "no-such-trtexec")
    assert result.returncode == 2 and "trtexec not found" in result.stderr


def test_recipe_passes_the_plan_argv_and_never_claims_a_missing_engine(tmp_path):
    plan = make_build_plan("jetson-orin-nano", "int8", "model.onnx", 10, timing_cache="orin.timing")
    recipe = _write_recipe(tmp_path, plan)
    result = _run_recipe(recipe, _stub_trtexec(tmp_path, 100300))
    assert result.returncode == 1
    assert "trtexec finished but wrote no engine" in result.stderr
    assert "built" not in result.stdout
    assert not (tmp_path / "model.engine").exists()
    recorded = (tmp_path / "trtexec.argv").read_text().splitlines()
    assert recorded == render_trtexec(plan, save_engine="model.engine.partial")[1:]


def test_decoded_coordinate_outputs_get_a_pixel_tolerance(tmp_path):
    plan = make_build_plan("t4", "int8", "model.onnx", 10)
    _, engine = render_polygraphy_compare(plan, coordinate_outputs=["landmarks"])
    atol = engine[engine.index("--atol") + 1 : engine.index("--rtol")]
    assert atol == ["0.05", "landmarks:1.0"]
    onnx_path = _tiny_onnx(tmp_path / "qdq.onnx", qdq=True)
    model = onnx.load(str(onnx_path))
    model.graph.node.append(helper.make_node("ReduceMax", ["heatmap"], ["landmarks"], axes=[3], keepdims=0))
    model.graph.output.append(
        helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["batch", 2, 256])
    )
    onnx.save(model, str(onnx_path))
    TensorRTBuilder(apply=False).build(onnx_path, "t4", "int8", tmp_path / "bundle")
    assert "landmarks:1.0" in (tmp_path / "bundle" / "build_engine.sh").read_text()


def test_polygraphy_comparison_checks_the_built_engine_against_onnxruntime():
    plan = make_build_plan("l4", "int8", "model.onnx", 10)
    reference, engine = render_polygraphy_compare(plan)
    assert reference[:4] == ["polygraphy", "run", "model.onnx", "--onnxrt"]
    assert "image:[8,3,256,256]" in reference and "--save-outputs" in reference
    assert engine[:6] == ["polygraphy", "run", "model.engine", "--model-type", "engine", "--trt"]
    assert "--load-outputs" in engine and "--load-inputs" in engine


# --------------------------------------------------------------------------------------
# trt_apply: the call sequence it makes, checked against a recording stub of the module


class _Recorder:
    """Records method calls and attribute writes as tuples into a shared list."""

    def __init__(self, calls: list, label: str, **attrs):
        object.__setattr__(self, "_calls", calls)
        object.__setattr__(self, "_label", label)
        for key, value in attrs.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        self._calls.append((f"{self._label}.{key}=", value))
        object.__setattr__(self, key, value)


def recording_tensorrt_stub(version: str, calls: list, num_dla_cores: int = 2) -> types.ModuleType:
    """A stand-in for the tensorrt module that records the adapter's calls.

    It builds nothing: build_serialized_network returns None, as TensorRT does on a
    failed build, so no test can ever end with an engine file.
    """
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt_recording_stub")
    trt.__version__ = version

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            calls.append(("Logger", severity))

    builder_flags = ["GPU_FALLBACK", "VERSION_COMPATIBLE"] + (["FP16", "INT8", "FP8"] if major == 10 else [])
    trt.Logger = Logger
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in builder_flags})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")
    trt.OnnxParserFlag = types.SimpleNamespace(
        **({"ADJUST_FOR_DLA": "ADJUST_FOR_DLA"} if major == 11 else {})
    )

    def make_config():
        calls.append(("create_builder_config",))
        config = _Recorder(calls, "config")
        object.__setattr__(config, "set_flag", lambda flag: calls.append(("config.set_flag", flag)))
        object.__setattr__(
            config,
            "set_memory_pool_limit",
            lambda pool, size: calls.append(("config.set_memory_pool_limit", pool, size)),
        )
        object.__setattr__(
            config, "add_optimization_profile", lambda p: calls.append(("config.add_optimization_profile",))
        )
        object.__setattr__(
            config,
            "create_timing_cache",
            lambda data: calls.append(("config.create_timing_cache", data)) or "cache",
        )
        object.__setattr__(
            config,
            "set_timing_cache",
            lambda cache, ignore_mismatch: calls.append(("config.set_timing_cache", cache, ignore_mismatch)),
        )
        return config

    def make_profile():
        calls.append(("create_optimization_profile",))
        return types.SimpleNamespace(set_shape=lambda *a: calls.append(("profile.set_shape", *a)))

    def Builder(logger):
        calls.append(("Builder",))
        return types.SimpleNamespace(
            num_DLA_cores=num_dla_cores,
            create_network=lambda flags: calls.append(("create_network", flags)) or "network",
            create_builder_config=make_config,
            create_optimization_profile=make_profile,
            build_serialized_network=lambda net, cfg: calls.append(("build_serialized_network",)) or None,
        )

    def OnnxParser(network, logger):
        calls.append(("OnnxParser", network))
        return types.SimpleNamespace(
            set_flag=lambda flag: calls.append(("parser.set_flag", flag)),
            parse_from_file=lambda path: calls.append(("parse_from_file", path)) or True,
            num_errors=0,
        )

    trt.Builder = Builder
    trt.OnnxParser = OnnxParser
    return trt


def _sequence(plan: TrtBuildPlan, version: str, tmp_path: Path) -> list:
    (tmp_path / plan.onnx_path).write_bytes(b"")
    calls: list = []
    with pytest.raises(CUNetError, match="returned no engine"):
        apply_build_plan(plan, tmp_path, trt=recording_tensorrt_stub(version, calls))
    assert not (tmp_path / plan.engine_path).exists()
    return calls


def test_adapter_call_sequence_trt10_int8_on_orin_nano(tmp_path):
    plan = make_build_plan("jetson-orin-nano", "int8", "model.onnx", 10)
    calls = _sequence(plan, "10.3.0.30", tmp_path)
    assert calls == [
        ("Logger", "WARNING"),
        ("Builder",),
        ("create_network", 0),
        ("OnnxParser", "network"),
        ("parse_from_file", str(tmp_path / "model.onnx")),
        ("create_builder_config",),
        ("config.set_flag", "INT8"),
        ("config.set_flag", "FP16"),
        ("config.set_memory_pool_limit", "WORKSPACE", 1 * GiB),
        ("create_optimization_profile",),
        ("profile.set_shape", "image", (1, 3, 256, 256), (1, 3, 256, 256), (4, 3, 256, 256)),
        ("config.add_optimization_profile",),
        ("build_serialized_network",),
    ]


def test_adapter_call_sequence_trt11_dla_on_agx_orin(tmp_path):
    plan = make_build_plan("jetson-agx-orin", "int8", "model.onnx", 11, dla_core=1, timing_cache="agx.timing")
    calls = _sequence(plan, "11.4.1", tmp_path)
    assert calls[2] == ("create_network", 0)
    assert ("parser.set_flag", "ADJUST_FOR_DLA") in calls
    assert calls.index(("parser.set_flag", "ADJUST_FOR_DLA")) < calls.index(
        ("parse_from_file", str(tmp_path / "model.onnx"))
    )
    assert ("config.set_flag", "GPU_FALLBACK") in calls
    assert not any(c[0] == "config.set_flag" and c[1] in ("INT8", "FP16") for c in calls)
    assert ("config.create_timing_cache", b"") in calls
    assert ("config.set_timing_cache", "cache", False) in calls
    assert ("config.default_device_type=", "DLA") in calls and ("config.DLA_core=", 1) in calls
    assert calls[-1] == ("build_serialized_network",)


def test_adapter_call_sequence_strongly_typed_and_portable_flags(tmp_path):
    typed = _sequence(
        make_build_plan("t4", "fp16", "model.onnx", 10, strongly_typed=True), "10.8.0", tmp_path
    )
    assert ("create_network", 1 << 1) in typed
    assert not any(c[0] == "config.set_flag" for c in typed)
    portable = _sequence(
        make_build_plan("a100", "fp32", "model.onnx", 11, hardware_compat="ampere+", version_compat=True),
        "11.2.0",
        tmp_path,
    )
    assert ("config.set_flag", "VERSION_COMPATIBLE") in portable
    assert ("config.hardware_compatibility_level=", "AMPERE_PLUS") in portable


def test_adapter_refuses_a_tensorrt_of_another_major_before_building(tmp_path):
    plan = make_build_plan("t4", "int8", "model.onnx", 10)
    calls: list = []
    with pytest.raises(CUNetError, match="for TensorRT 10.x but the installed TensorRT is 11.4.1"):
        apply_build_plan(plan, tmp_path, trt=recording_tensorrt_stub("11.4.1", calls))
    assert calls == []


def test_adapter_refuses_a_dla_core_the_device_lacks(tmp_path):
    plan = make_build_plan("jetson-agx-orin", "fp16", "model.onnx", 10, dla_core=1)
    (tmp_path / "model.onnx").write_bytes(b"")
    stub = recording_tensorrt_stub("10.3.0", [], num_dla_cores=1)
    with pytest.raises(CUNetError, match="this device has 1 DLA core"):
        apply_build_plan(plan, tmp_path, trt=stub)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot be shown")
def test_without_tensorrt_the_adapter_and_runner_say_where_to_run(tmp_path):
    with pytest.raises(
        TensorRTUnavailable, match="TensorRT is not installed here; run the recipe on the device"
    ):
        import_tensorrt()
    plan = make_build_plan("t4", "fp16", "model.onnx", 10)
    with pytest.raises(TensorRTUnavailable, match="build_engine.sh"):
        apply_build_plan(plan, tmp_path)
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed here"):
        with TrtRunner(tmp_path / "model.engine"):
            pass


# --------------------------------------------------------------------------------------
# The bundle builder


def _tiny_onnx(path: Path, qdq: bool = False, fp16: bool = False) -> Path:
    """image (Bx3x256x256) -> Conv 3->2 -> heatmap; optionally Q/DQ-quantized or FP16-typed."""
    ftype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 3, 1, 1)).astype(np.float16 if fp16 else np.float32)
    nodes, inits = [], [numpy_helper.from_array(w, "w")]
    conv_in = "image"
    if qdq:
        inits += [
            numpy_helper.from_array(np.array(0.02, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
        ]
        conv_in = "dq"
    nodes.append(helper.make_node("Conv", [conv_in, "w"], ["heatmap"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", ftype, ["batch", 3, 256, 256])],
        [helper.make_tensor_value_info("heatmap", ftype, ["batch", 2, 256, 256])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: this checks the no-TensorRT bundle path")
def test_builder_writes_the_bundle_and_says_no_engine_was_built(tmp_path):
    onnx_path = _tiny_onnx(tmp_path / "export.onnx", qdq=True)
    out = tmp_path / "engines" / "orin-int8"
    result = TensorRTBuilder().build(
        onnx_path, "jetson-orin-nano", "int8", out, {"timing_cache": "orin.timing"}
    )
    assert result.engine_built is False
    assert "engine" not in result.artifacts and not (out / "model.engine").exists()
    assert any(
        n.startswith("TensorRT is not installed here; run the recipe on the device: bash ")
        and "build_engine.sh" in n
        for n in result.notes
    )
    assert (out / "model.onnx").read_bytes() == onnx_path.read_bytes()
    assert os.access(out / "build_engine.sh", os.X_OK)
    plan = plan_from_dict(json.loads((out / "trt_plan.json").read_text()))
    assert plan.onnx_path == "model.onnx" and plan.timing_cache == "orin.timing"
    assert result.settings["trtexec"] == render_trtexec(plan)
    assert result.backend == "tensorrt" and result.backend_version.startswith("10.x")


def test_builder_checks_the_onnx_is_in_the_form_the_plan_needs(tmp_path):
    plain = _tiny_onnx(tmp_path / "plain.onnx")
    quantized = _tiny_onnx(tmp_path / "qdq.onnx", qdq=True)
    cast = _tiny_onnx(tmp_path / "fp16.onnx", fp16=True)
    builder = TensorRTBuilder(apply=False)
    with pytest.raises(CUNetError, match="has no Q/DQ nodes"):
        builder.build(plain, "t4", "int8", tmp_path / "a")
    with pytest.raises(CUNetError, match="has Q/DQ nodes but precision fp16"):
        builder.build(quantized, "t4", "fp16", tmp_path / "b")
    with pytest.raises(CUNetError, match="not cast to FP16"):
        builder.build(plain, "h100", "fp16", tmp_path / "c", {"trt_major": 11})
    result = builder.build(cast, "h100", "fp16", tmp_path / "d", {"trt_major": 11})
    assert result.engine_built is False and any("bundle only" in n for n in result.notes)
    with pytest.raises(CUNetError, match="unknown TensorRT option"):
        builder.build(plain, "t4", "fp16", tmp_path / "e", {"fp16": True})


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and an NVIDIA GPU")
def test_trt_engine_matches_onnxruntime_on_the_device(tmp_path):
    import torch

    from cunet_optimize.engines.onnxrt import OnnxRuntimeReferenceRunner
    from cunet_optimize.models import CUNet, CUNetConfig

    model = CUNet(CUNetConfig(num_unets=2, order=1, num_classes=4, width=8, growth_rate=4)).eval()
    onnx_path = tmp_path / "tiny_cunet.onnx"
    torch.onnx.export(
        model, (torch.rand(1, 3, 256, 256),), str(onnx_path), dynamo=False, opset_version=17,
        input_names=["image"], dynamic_axes={"image": {0: "batch"}},
    )  # fmt: skip
    result = TensorRTBuilder().build(onnx_path, "a100", "fp32", tmp_path / "bundle", {"batch": (1, 2, 2)})
    assert result.engine_built
    batch = np.random.default_rng(0).random((2, 3, 256, 256), dtype=np.float32)
    with (
        TrtRunner(result.artifacts["engine"]) as trt_runner,
        OnnxRuntimeReferenceRunner(onnx_path) as reference,
    ):
        np.testing.assert_allclose(trt_runner.infer(batch), reference.infer(batch), atol=1e-2, rtol=1e-2)
