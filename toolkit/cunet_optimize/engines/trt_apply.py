"""Apply a TrtBuildPlan through the TensorRT Python API: the one place that builds engines.

TensorRT is imported lazily, here and in trt_runner.py only. Where it is missing, or
there is no NVIDIA GPU, this raises TensorRTUnavailable with the command to run on the
device instead. The calls follow the documented 10.x/11.x API (and what Polygraphy's
NetworkFromOnnxPath / CreateConfig / EngineFromNetwork do):

  Builder(logger) -> create_network(flags) -> OnnxParser(network, logger)
  [set_flag(parser flags)] -> parse_from_file -> create_builder_config
  -> set_flag(builder flags) -> set_memory_pool_limit(WORKSPACE) -> optimisation profile
  -> timing cache -> DLA / hardware compatibility -> build_serialized_network
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cunet_optimize.atomic import write_atomic
from cunet_optimize.engines.trt_plan import HARDWARE_COMPAT_LEVELS, TrtBuildPlan, parse_version
from cunet_optimize.errors import CUNetError

log = logging.getLogger(__name__)


class TensorRTUnavailable(CUNetError):
    """TensorRT or an NVIDIA GPU is missing here: the build or run belongs on the device."""


def import_tensorrt(hint: str = "run the recipe on the device") -> Any:
    try:
        import tensorrt  # noqa: PLC0415  (lazy: absent on every machine of ours)
    except ImportError:
        raise TensorRTUnavailable(f"TensorRT is not installed here; {hint}") from None
    if not hasattr(tensorrt, "Builder"):  # e.g. tensorrt-stubs' stub-only folder, importable as a namespace
        raise TensorRTUnavailable(f"TensorRT is not installed here (a 'tensorrt' folder without its bindings, "
                                  f"e.g. type stubs); {hint}")
    return tensorrt


def check_tensorrt_version(trt: Any, plan: TrtBuildPlan) -> str:
    version = str(getattr(trt, "__version__", "0"))
    have = parse_version(version)
    if not have or have[0] != plan.trt_major:
        raise CUNetError(
            f"this build plan is for TensorRT {plan.trt_major}.x but the installed TensorRT is {version}; "
            f"rebuild the bundle with trt_major={have[0] if have else '?'}"
        )
    if have < parse_version(plan.min_trt_version):
        raise CUNetError(f"this build plan needs TensorRT >= {plan.min_trt_version}, installed: {version}")
    if plan.max_trt_version and have[:2] > parse_version(plan.max_trt_version)[:2]:
        raise CUNetError(
            f"this build plan (DLA) needs TensorRT <= {plan.max_trt_version}.x, installed: {version}"
        )
    return version


def _enum(trt: Any, enum_name: str, member: str) -> Any:
    try:
        return getattr(getattr(trt, enum_name), member)
    except AttributeError:
        raise CUNetError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no {enum_name}.{member}, which the plan needs; "
            "the plan was made for another TensorRT version: rebuild the bundle"
        ) from None


# apply_build_plan's steps come before it: tests/test_trt_api_surface.py types the TensorRT
# objects by name in source order, so `builder` and `config` are known where it uses them.
def _builder(trt: Any, logger: Any, version: str, hint: str) -> Any:
    """trt.Builder, or TensorRTUnavailable where TensorRT finds no usable GPU."""
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # TensorRT raises a bare TypeError/RuntimeError without a CUDA device
        raise TensorRTUnavailable(
            f"TensorRT {version} found but no usable NVIDIA GPU ({exc}); {hint}"
        ) from exc
    if builder is None:
        raise TensorRTUnavailable(f"TensorRT {version} found but no usable NVIDIA GPU; {hint}")
    return builder


def _parse_onnx(trt: Any, builder: Any, logger: Any, plan: TrtBuildPlan, onnx_path: Path,
                version: str) -> tuple[Any, Any]:
    """(network, parser): the ONNX file parsed with the plan's network and parser flags."""
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(_enum(trt, "NetworkDefinitionCreationFlag", name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    for name in plan.parser_flags:
        parser.set_flag(_enum(trt, "OnnxParserFlag", name))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0] if errors else "no error reported"
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CUNetError(
            f"TensorRT {version} could not parse {onnx_path}: {first}{more}; "
            "check it with `polygraphy inspect model` and `cunet-optimize lint`"
        )
    return network, parser


def _builder_config(trt: Any, builder: Any, plan: TrtBuildPlan, cache_path: Path | None) -> Any:
    """The builder config of the plan: flags, workspace, the optimisation profile, the timing
    cache (read from `cache_path` when it exists), then the DLA and hardware compatibility."""
    config = builder.create_builder_config()
    for name in plan.builder_flags:
        config.set_flag(_enum(trt, "BuilderFlag", name))
    config.set_memory_pool_limit(_enum(trt, "MemoryPoolType", "WORKSPACE"), plan.workspace_bytes)

    shapes = plan.profile_shapes
    profile = builder.create_optimization_profile()
    profile.set_shape(plan.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    if cache_path is not None:
        previous = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(previous)
        config.set_timing_cache(cache, ignore_mismatch=False)  # a foreign cache is an error
    _place(trt, builder, config, plan)
    return config


def _place(trt: Any, builder: Any, config: Any, plan: TrtBuildPlan) -> None:
    """Where the engine may run: the plan's DLA core (refused beyond the device's cores), and
    the hardware compatibility level that lets it run on other GPUs than the one building it."""
    if plan.uses_dla:
        cores = getattr(builder, "num_DLA_cores", 0)
        if plan.dla_core >= cores:
            raise CUNetError(
                f"this device has {cores} DLA core(s); the plan wants core {plan.dla_core}: "
                "rebuild the bundle with another dla_core or without DLA"
            )
        config.default_device_type = _enum(trt, "DeviceType", "DLA")
        config.DLA_core = plan.dla_core
    if plan.hardware_compat:
        config.hardware_compatibility_level = _enum(
            trt, "HardwareCompatibilityLevel", HARDWARE_COMPAT_LEVELS[plan.hardware_compat]
        )


def apply_build_plan(plan: TrtBuildPlan, base_dir: str | os.PathLike = ".", trt: Any = None) -> Path:
    """Build the engine the plan describes and write it to base_dir/plan.engine_path.

    Relative paths in the plan are relative to base_dir (the bundle folder).
    `trt` is the tensorrt module; None imports it (tests pass a recording stub).
    """
    base = Path(base_dir)
    hint = f"run the recipe on the device: bash {base / 'build_engine.sh'}"
    trt = trt if trt is not None else import_tensorrt(hint)
    version = check_tensorrt_version(trt, plan)
    onnx_path = base / plan.onnx_path
    engine_path = base / plan.engine_path
    if not onnx_path.is_file():
        raise CUNetError(f"ONNX file not found: {onnx_path}; the bundle is incomplete, rebuild it")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = _builder(trt, logger, version, hint)
    # the parser stays referenced until the engine is built (as Polygraphy keeps it beside the
    # network): it owns the weights the network points at
    network, parser = _parse_onnx(trt, builder, logger, plan, onnx_path, version)
    cache_path = base / plan.timing_cache if plan.timing_cache else None
    config = _builder_config(trt, builder, plan, cache_path)

    log.info("building %s with TensorRT %s (this takes minutes)", engine_path, version)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CUNetError(
            f"TensorRT {version} returned no engine for {onnx_path}; see the TensorRT log above "
            "(unsupported layer, workspace too small, or a DLA restriction)"
        )
    write_atomic(engine_path, bytes(serialized))
    if cache_path is not None:
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return engine_path


def main(argv: list[str] | None = None) -> int:
    """On the device: python -m cunet_optimize.engines.trt_apply BUNDLE_DIR (reads trt_plan.json)."""
    import json
    import sys

    from cunet_optimize.engines.trt_plan import plan_from_dict

    args = sys.argv[1:] if argv is None else argv
    bundle = Path(args[0] if args else ".")
    try:
        plan = plan_from_dict(json.loads((bundle / "trt_plan.json").read_text()))
        engine = apply_build_plan(plan, bundle)
    except (CUNetError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"built {engine}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
