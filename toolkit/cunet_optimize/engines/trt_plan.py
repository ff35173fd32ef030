"""TensorRT build plans as plain data, and their renderings as trtexec argv and a recipe.

`make_build_plan` is a pure function: it decides every network flag, builder flag,
profile shape and DLA setting for one target, precision and TensorRT major (10 or 11),
and refuses combinations the documentation rules out. `trt_apply` replays a plan
through the TensorRT Python API; `render_trtexec` / `render_shell_recipe` replay the
same plan as a command line for the device. Nothing here imports TensorRT.

TensorRT 10 vs 11, as decided here (sources in docs/QUANT_RULES.md and the report):
- network flags: EXPLICIT_BATCH is never set (a no-op since 10). On 10, STRONGLY_TYPED
  is opt-in (`strongly_typed=True`, trtexec --stronglyTyped); on 11 every network is
  strongly typed and the flag is deprecated and ignored, so the plan sets nothing.
- precision builder flags exist on 10 only: FP16 for fp16; INT8 plus FP16 for explicit
  Q/DQ int8 graphs (INT8 lets the builder honour the Q/DQ nodes of a weakly typed
  network, FP16 lets the layers left outside Q/DQ run in FP16 as `trtexec --int8
  --fp16` does). A strongly typed plan sets none. On 11 the flags are gone: the ONNX
  must already carry the types (Q/DQ for int8, a cast for fp16: ModelOpt AutoCast),
  which the plan states in `onnx_form`.
- DLA: default device DLA, DLA_core, GPU_FALLBACK; static shapes only (min=opt=max);
  FP16/INT8 only; on 11 (11.4.1+, AGX Orin) the parser flag ADJUST_FOR_DLA is set and
  the ONNX must be FP16-typed; DLA on 10 needs TensorRT <= 10.7.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from cunet_optimize.engines.base import IMAGE_CHW
from cunet_optimize.targets import MiB, TargetSpec, check_dla_core, check_precision, get_target
from cunet_optimize.errors import CUNetError

TRT_MAJORS = (10, 11)
PLAN_SCHEMA = "cunet-optimize/trt-build-plan/1"
HARDWARE_COMPAT_LEVELS = {"ampere+": "AMPERE_PLUS"}  # trtexec spelling -> HardwareCompatibilityLevel
DLA_MAX_TRT10 = "10.7"  # "TensorRT 10.7 was the last 10.x release that supported DLA" (TRT 11.4.1 docs)
DLA_MIN_TRT11 = "11.4.1"  # DLA restored on Jetson AGX Orin (JetPack 7.2.2+) in 11.4.1

# What the ONNX file must already be before this plan can build it.
ONNX_FORMS = {
    "fp32": "float32 ONNX as exported",
    "fp16-cast": "float parts cast to FP16 before the build (ModelOpt AutoCast)",
    "qdq-int8": "explicit INT8 QuantizeLinear/DequantizeLinear, float parts FP32",
    "qdq-int8+fp16-cast": "explicit INT8 Q/DQ with the float parts cast to FP16",
    "int4-dequantized": "INT4-grid weights stored as float initializers (no INT4 tensors)",
    "int4-dequantized+fp16-cast": "INT4-grid weights as FP16 initializers, float parts FP16",
    "qdq-fp8": "explicit FP8 (E4M3) Q/DQ",
}

# Sanity tolerances for the on-device ONNX Runtime vs TensorRT comparison in the recipe,
# by the arithmetic the engine performs (fp32 allows for TF32, on by default on Ampere+).
# They catch broken builds; the accuracy gate is the landmark-error evaluation.
COMPARE_TOLERANCE = {"fp32": 1e-2, "fp16": 2e-2, "int8": 5e-2, "fp8": 5e-2}
COORDINATE_TOLERANCE_PX = 1.0  # mean landmark shift allowed for decoded-coordinate outputs


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); digits only, for ordering releases."""
    parts = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def version_code(text: str) -> int:
    """trtexec's banner number for a version: '10.3.0' -> 100300, '11.4.1' -> 110401."""
    major, minor, patch = (parse_version(text) + (0, 0, 0))[:3]
    return major * 10000 + minor * 100 + patch


@dataclass(frozen=True)
class TrtBuildPlan:
    """Everything a TensorRT build does, decided before TensorRT is anywhere near."""

    target: str
    precision: str
    executed_as: str  # arithmetic the engine performs (int4 -> fp16: see targets.py)
    trt_major: int
    min_trt_version: str
    max_trt_version: str | None  # e.g. "10.7" for DLA on TensorRT 10
    onnx_path: str
    engine_path: str
    onnx_form: str  # a key of ONNX_FORMS
    input_name: str
    input_chw: tuple[int, int, int]
    batch: tuple[int, int, int]  # optimisation profile (min, opt, max)
    strongly_typed: bool
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag names
    builder_flags: tuple[str, ...]  # BuilderFlag names
    parser_flags: tuple[str, ...]  # OnnxParserFlag names
    workspace_bytes: int
    timing_cache: str | None
    dla_core: int | None
    gpu_fallback: bool
    hardware_compat: str | None  # "ampere+" or None
    version_compatible: bool
    notes: tuple[str, ...]

    @property
    def uses_dla(self) -> bool:
        return self.dla_core is not None

    @property
    def profile_shapes(self) -> dict[str, tuple[int, ...]]:
        b_min, b_opt, b_max = self.batch
        return {
            "min": (b_min, *self.input_chw),
            "opt": (b_opt, *self.input_chw),
            "max": (b_max, *self.input_chw),
        }


def make_build_plan(
    target: str | TargetSpec,
    precision: str,
    onnx_path: str,
    trt_major: int | None = None,
    batch: tuple[int, int, int] | None = None,
    workspace: int | None = None,
    timing_cache: str | None = None,
    dla_core: int | None = None,
    gpu_fallback: bool = True,
    hardware_compat: str | None = None,
    version_compat: bool = False,
    strongly_typed: bool | None = None,
    *,
    engine_path: str | None = None,
    input_name: str = "image",
) -> TrtBuildPlan:
    """Decide a TensorRT build; CUNetError (one line: what, where, what to do) if invalid.

    trt_major, batch and workspace default to the target's registry entry; with a DLA
    core the default batch is static (min=opt=max=1).
    """
    spec = get_target(target)
    major, release = _tensorrt_release(spec, trt_major)
    notes = [] if release.verified else [f"TensorRT {major} on {spec.name} is unverified: {release.note}"]
    on_dla = check_dla_core(spec, dla_core) is not None
    support = check_precision(spec, precision, on_dla=on_dla)
    notes += [support.note] if support.note else []
    typed = _strongly_typed(major, precision, strongly_typed)
    precision_flags = () if typed else _WEAK_TYPING_FLAGS[precision]
    notes += _precision_notes(spec, precision, typed, on_dla)
    b = _check_batch(spec, batch, on_dla)
    ws = _check_workspace(spec, workspace)
    level = _hardware_compat_level(spec, hardware_compat)
    notes += [HARDWARE_COMPAT_NOTE] if level else []
    dla = _dla_decision(major, release.min_version, dla_core, gpu_fallback, typed, b)
    notes += dla.notes
    notes += [_version_compatible_note(on_dla)] if version_compat else []
    return TrtBuildPlan(
        target=spec.name, precision=precision, executed_as=support.executed_as,
        trt_major=major, min_trt_version=dla.min_version, max_trt_version=dla.max_version,
        onnx_path=str(onnx_path), engine_path=engine_path or str(Path(onnx_path).with_suffix(".engine")),
        onnx_form=_onnx_form(precision, typed, on_dla), input_name=input_name, input_chw=IMAGE_CHW, batch=b,
        strongly_typed=typed,
        network_flags=("STRONGLY_TYPED",) if typed and major == 10 else (),
        builder_flags=precision_flags + dla.builder_flags + (("VERSION_COMPATIBLE",) if version_compat else ()),
        parser_flags=dla.parser_flags,
        workspace_bytes=ws,
        timing_cache=str(timing_cache) if timing_cache is not None else None,
        dla_core=dla_core, gpu_fallback=bool(gpu_fallback) and on_dla,
        hardware_compat=level, version_compatible=bool(version_compat),
        notes=tuple(notes),
    )


# Builder precision flags of a weakly typed network (TensorRT 10; a strongly typed one sets
# none): INT8 honours the Q/DQ nodes, FP16 lets the layers left outside them run in FP16.
_WEAK_TYPING_FLAGS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "fp16": ("FP16",),
    "int8": ("INT8", "FP16"),
    "int4": ("FP16",),
    "fp8": ("FP8", "FP16"),
}
HARDWARE_COMPAT_NOTE = "hardware-compatible (ampere+) engines run on any Ampere+ GPU at some speed cost"


def _tensorrt_release(spec: TargetSpec, trt_major: int | None):
    """The TensorRT major to build with (the target's default if None) and its registry entry."""
    if spec.backend != "tensorrt":
        raise CUNetError(
            f"target {spec.name} is an {spec.backend} target, not a TensorRT one; "
            "use the ONNX Runtime builder for it"
        )
    major = spec.default_tensorrt_major if trt_major is None else trt_major
    if major not in TRT_MAJORS:
        raise CUNetError(f"TensorRT major {major} is not supported; choose one of {TRT_MAJORS}")
    return major, spec.tensorrt_release(major)


def _strongly_typed(major: int, precision: str, requested: bool | None) -> bool:
    """Strong typing: implied and mandatory on 11, opt-in on 10 (default for fp8 there,
    where NVIDIA's FP8 recipes build strongly typed; unverified for weak typing)."""
    if major == 11:
        if requested is False:
            raise CUNetError(
                "TensorRT 11 networks are always strongly typed (precision flags such as INT8/FP16 "
                "were removed); drop strongly_typed=False or build with trt_major=10"
            )
        return True
    return bool(requested) if requested is not None else precision == "fp8"


def _precision_notes(spec: TargetSpec, precision: str, typed: bool, on_dla: bool) -> list[str]:
    """What the engine's arithmetic will be, where the precision alone does not say it."""
    notes = []
    if typed and precision == "int8" and not on_dla:
        notes.append(
            "strongly typed: layers outside the Q/DQ nodes run in the ONNX's own float type; "
            "cast them to FP16 (ModelOpt AutoCast) to match TensorRT 10's --int8 --fp16 speed"
        )
    if not typed and precision == "int8":
        notes.append("INT8 honours the Q/DQ nodes; FP16 lets the layers outside them run in FP16")
    if precision == "fp32" and spec.compute_capability and spec.compute_capability >= (8, 0):
        notes.append("fp32 layers may run as TF32 on Ampere and newer (TensorRT's default)")
    return notes


def _check_workspace(spec: TargetSpec, workspace: int | None) -> int:
    ws = spec.workspace_bytes if workspace is None else workspace
    if isinstance(ws, bool) or not isinstance(ws, int) or ws <= 0 or ws % MiB:
        raise CUNetError(
            f"workspace {ws!r} bytes: give a positive whole number of MiB "
            "(trtexec --memPoolSize counts MiB), e.g. 1073741824 for 1 GiB"
        )
    return ws


def _hardware_compat_level(spec: TargetSpec, hardware_compat: str | None) -> str | None:
    """The trtexec spelling of the level ("ampere+"), if the target's GPU can use it."""
    if hardware_compat is None:
        return None
    level = str(hardware_compat).lower().replace("_plus", "+").replace("-plus", "+")
    if level not in HARDWARE_COMPAT_LEVELS:
        raise CUNetError(
            f"hardware compatibility level '{hardware_compat}' is unknown; use one of "
            f"{', '.join(HARDWARE_COMPAT_LEVELS)}"
        )
    if spec.device != "gpu" or (spec.compute_capability or (0, 0)) < (8, 0):
        raise CUNetError(
            f"hardware-compatible engines (ampere+) are for Ampere-or-newer datacenter GPUs; "
            f"{spec.name} (compute capability {_cc(spec)}) cannot use them: drop hardware_compat"
        )
    return level


class _DlaDecision(NamedTuple):
    """What building for a DLA core adds to a plan (nothing on the GPU)."""

    builder_flags: tuple[str, ...]
    parser_flags: tuple[str, ...]
    min_version: str
    max_version: str | None  # the last TensorRT 10 with DLA
    notes: tuple[str, ...]


def _dla_decision(major: int, min_version: str, dla_core: int | None, gpu_fallback: bool, typed: bool,
                  batch: tuple[int, int, int]) -> _DlaDecision:
    """GPU fallback, the TensorRT releases that have DLA, and ADJUST_FOR_DLA on 11 (a checked
    `dla_core`; None: the GPU, which adds nothing)."""
    if dla_core is None:
        return _DlaDecision((), (), min_version, None, ())
    parser_flags: tuple[str, ...] = ()
    notes: list[str] = []
    max_version = None
    if major == 10:
        max_version = DLA_MAX_TRT10
    else:
        if parse_version(min_version) < parse_version(DLA_MIN_TRT11):
            min_version = DLA_MIN_TRT11
        parser_flags = ("ADJUST_FOR_DLA",)
        notes.append(
            "ADJUST_FOR_DLA is a parser flag of the Python API; trtexec has no documented "
            "switch for it (unverified), so the trtexec recipe builds without it"
        )
    notes.append(
        f"DLA core {dla_core}: static batch {batch[0]}; layers DLA cannot run "
        + ("fall back to the GPU (each transition costs time)" if gpu_fallback else "fail the build")
    )
    notes.append(
        "DLA layer restrictions (concat scales, resize, pooling) are from TensorRT 8.x docs: unverified on 10/11"
    )
    if typed and major == 10:
        notes.append("strongly typed DLA builds on TensorRT 10 are unverified")
    return _DlaDecision(("GPU_FALLBACK",) if gpu_fallback else (), parser_flags, min_version, max_version,
                        tuple(notes))


def _version_compatible_note(on_dla: bool) -> str:
    return ("version-compatible: runs on newer TensorRT runtimes of the same major "
            "(and TensorRT 10 engines on a TensorRT 11 runtime), at some speed cost"
            + ("; with DLA: unverified" if on_dla else ""))


def _onnx_form(precision: str, typed: bool, on_dla: bool) -> str:
    if precision == "fp32":
        return "fp32"
    if precision == "fp16":
        return "fp16-cast" if typed else "fp32"
    if precision == "int8":
        # DLA computes nothing in FP32, so a strongly typed DLA build needs the float parts in FP16.
        return "qdq-int8+fp16-cast" if typed and on_dla else "qdq-int8"
    if precision == "int4":
        return "int4-dequantized+fp16-cast" if typed else "int4-dequantized"
    return "qdq-fp8"


def _cc(spec) -> str:
    return ".".join(map(str, spec.compute_capability)) if spec.compute_capability else "none"


def _check_batch(spec, batch, on_dla: bool) -> tuple[int, int, int]:
    if batch is None:
        return (spec.batch[0],) * 3 if on_dla else tuple(spec.batch)
    try:
        b = tuple(batch)
    except TypeError:
        b = ()
    if len(b) != 3 or any(isinstance(x, bool) or not isinstance(x, int) for x in b):
        raise CUNetError(f"batch {batch!r}: give three integers (min, opt, max), e.g. (1, 4, 16)")
    if not 1 <= b[0] <= b[1] <= b[2]:
        raise CUNetError(f"batch {b}: needs 1 <= min <= opt <= max")
    if on_dla and not b[0] == b[1] == b[2]:
        raise CUNetError(
            f"DLA needs a static batch (min = opt = max), got {b}; pass e.g. batch=({b[1]}, {b[1]}, {b[1]})"
        )
    return b  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# build.json round trip


def plan_to_dict(plan: TrtBuildPlan) -> dict[str, Any]:
    data = asdict(plan)
    for key, value in data.items():
        if isinstance(value, tuple):
            data[key] = list(value)
    return {"schema": PLAN_SCHEMA, **data}


def plan_from_dict(data: dict[str, Any]) -> TrtBuildPlan:
    """Inverse of plan_to_dict; CUNetError on a plan of another schema or with missing fields."""
    data = dict(data)
    schema = data.pop("schema", None)
    if schema != PLAN_SCHEMA:
        raise CUNetError(f"build plan schema {schema!r} is not {PLAN_SCHEMA!r}; rebuild the bundle")
    names = {f.name for f in fields(TrtBuildPlan)}
    missing = sorted(names - set(data))
    unknown = sorted(set(data) - names)
    if missing or unknown:
        raise CUNetError(
            f"build plan: missing fields {missing}, unknown fields {unknown}; rebuild the bundle"
        )
    for key in ("input_chw", "batch", "network_flags", "builder_flags", "parser_flags", "notes"):
        data[key] = tuple(data[key])
    return TrtBuildPlan(**data)


# --------------------------------------------------------------------------------------
# trtexec and the device recipe

_PRECISION_SWITCHES = {"FP16": "--fp16", "INT8": "--int8", "FP8": "--fp8"}


def _shape_spec(name: str, shape: tuple[int, ...]) -> str:
    return f"{name}:{'x'.join(map(str, shape))}"


def render_trtexec(plan: TrtBuildPlan, trtexec: str = "trtexec", save_engine: str | None = None) -> list[str]:
    """The plan as a trtexec argv for the plan's TensorRT major (10 or 11)."""
    shapes = plan.profile_shapes
    argv = [
        trtexec,
        f"--onnx={plan.onnx_path}",
        f"--saveEngine={save_engine or plan.engine_path}",
        f"--minShapes={_shape_spec(plan.input_name, shapes['min'])}",
        f"--optShapes={_shape_spec(plan.input_name, shapes['opt'])}",
        f"--maxShapes={_shape_spec(plan.input_name, shapes['max'])}",
        # A bare number is MiB in trtexec 10 ("If none of suffixes is appended, the default unit is in MiB").
        f"--memPoolSize=workspace:{plan.workspace_bytes // MiB}",
    ]
    if plan.trt_major == 10:
        if "STRONGLY_TYPED" in plan.network_flags:
            argv.append("--stronglyTyped")
        argv += [_PRECISION_SWITCHES[f] for f in plan.builder_flags if f in _PRECISION_SWITCHES]
    # trtexec 11 has no precision switches and needs no --stronglyTyped (always on).
    if plan.uses_dla:
        argv.append(f"--useDLACore={plan.dla_core}")
        if plan.gpu_fallback:
            argv.append("--allowGPUFallback")
    if plan.timing_cache:
        argv.append(f"--timingCacheFile={plan.timing_cache}")
    if plan.hardware_compat:
        argv.append(f"--hardwareCompatibilityLevel={plan.hardware_compat}")
    if plan.version_compatible:
        argv.append("--versionCompatible")
    argv.append("--skipInference")  # build only: latency is the profile stage's job
    return argv


def render_polygraphy_compare(plan: TrtBuildPlan, coordinate_outputs: Sequence[str] = ()) -> list[list[str]]:
    """Two polygraphy commands: ONNX Runtime reference outputs, then the engine against them.

    coordinate_outputs (e.g. a decoded `landmarks` output, in pixels) get a tolerance of
    COORDINATE_TOLERANCE_PX instead of the heatmaps' one.
    """
    b = plan.batch[1]
    shape = f"{plan.input_name}:[{b},{','.join(map(str, plan.input_chw))}]"
    tol = str(COMPARE_TOLERANCE.get(plan.executed_as, 5e-2))
    tolerances = [tol] + [f"{name}:{COORDINATE_TOLERANCE_PX}" for name in coordinate_outputs]
    reference = [
        "polygraphy", "run", plan.onnx_path, "--onnxrt",
        "--input-shapes", shape,
        "--val-range", f"{plan.input_name}:[0,1]",
        "--seed", "0",
        "--save-inputs", "compare_inputs.json",
        "--save-outputs", "compare_onnxrt_outputs.json",
    ]  # fmt: skip
    engine = [
        "polygraphy", "run", plan.engine_path, "--model-type", "engine", "--trt",
        "--load-inputs", "compare_inputs.json",
        "--load-outputs", "compare_onnxrt_outputs.json",
        "--check-error-stat", "mean",
        "--atol", *tolerances, "--rtol", *tolerances,
    ]  # fmt: skip
    return [reference, engine]


def render_shell_recipe(
    plan: TrtBuildPlan, toolkit_version: str | None = None, coordinate_outputs: Sequence[str] = (),
    engine_copies: Sequence[str] = (),
) -> str:
    """A bash script for the device: checks trtexec and its TensorRT version, builds the
    engine (atomically), then compares it with ONNX Runtime through polygraphy.
    `engine_copies`: paths (relative to the bundle) the engine is also placed at, such as a
    Triton repository's 1/model.plan."""
    if toolkit_version is None:
        from cunet_optimize import __version__ as toolkit_version
    lines = [
        *_recipe_header(plan, toolkit_version),
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "",
        *_recipe_find_trtexec(plan),
        *_recipe_check_version(plan),
        *_recipe_build(plan),
        *_recipe_engine_copies(plan, engine_copies),
        "",
        *_recipe_compare(plan, coordinate_outputs),
    ]
    return "\n".join(lines)


def _recipe_header(plan: TrtBuildPlan, toolkit_version: str) -> list[str]:
    """What the script builds, from what, and that it must run on the device."""
    return [
        "#!/usr/bin/env bash",
        f"# Build the CU-Net TensorRT engine for {plan.target} ({plan.precision}, TensorRT {plan.trt_major}.x).",
        f"# Generated by cunet-optimize {toolkit_version} from a build plan (trt_plan.json beside it).",
        "# Run it ON the target device: engines are timed on, and only valid for, the GPU",
        "# and TensorRT version that build them.",
        f"# The ONNX must be: {ONNX_FORMS[plan.onnx_form]}.",
        *(f"# note: {n}" for n in plan.notes),
    ]


def _recipe_find_trtexec(plan: TrtBuildPlan) -> list[str]:
    """$TRTEXEC: the caller's, the one on PATH, or JetPack's; exit 2 without one."""
    return [
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || true)}"',
        'if [ -z "$TRTEXEC" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then TRTEXEC=/usr/src/tensorrt/bin/trtexec; fi',
        'if [ -z "$TRTEXEC" ] || [ ! -x "$TRTEXEC" ]; then',
        f'  echo "error: trtexec not found; install TensorRT {plan.trt_major}.x (>= {plan.min_trt_version}) '
        'or set TRTEXEC=/path/to/trtexec" >&2',
        "  exit 2",
        "fi",
        "",
    ]


def _recipe_check_version(plan: TrtBuildPlan) -> list[str]:
    """$have: the TensorRT release $TRTEXEC uses; exit 2 outside the plan's releases."""
    lines = [
        "# trtexec names its library in its banner, e.g. [TensorRT v100300] for 10.3.0;",
        "# the Python bindings are the fallback when the banner cannot be read.",
        'code="$("$TRTEXEC" --help 2>&1 | sed -n \'s/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p\' | head -n 1 || true)"',
        'if [ -z "$code" ]; then',
        '  code="$(python3 -c \'import tensorrt as t; v=(t.__version__.split(".")+["0","0"])[:3]; '
        "print(int(v[0])*10000+int(v[1])*100+int(v[2]))' 2>/dev/null || true)\"",
        "fi",
        'if [ -z "$code" ]; then echo "error: cannot tell which TensorRT $TRTEXEC uses" >&2; exit 2; fi',
        'have="$((code / 10000)).$(((code / 100) % 100)).$((code % 100))"',
        f'if [ "$((code / 10000))" -ne {plan.trt_major} ]; then',
        f'  echo "error: this recipe is for TensorRT {plan.trt_major}.x but $TRTEXEC is TensorRT $have; '
        f'rebuild the bundle with TensorRT major $((code / 10000))" >&2',
        "  exit 2",
        "fi",
        f'if [ "$code" -lt {version_code(plan.min_trt_version)} ]; then',
        f'  echo "error: needs TensorRT >= {plan.min_trt_version}, found $have" >&2',
        "  exit 2",
        "fi",
    ]
    if plan.max_trt_version:
        lines += [
            f'if [ "$code" -ge {version_code(plan.max_trt_version) + 100} ]; then',
            f'  echo "error: DLA needs TensorRT <= {plan.max_trt_version} on the 10.x line, found $have" >&2',
            "  exit 2",
            "fi",
        ]
    return lines


def _recipe_build(plan: TrtBuildPlan) -> list[str]:
    """trtexec into a .partial file, renamed to the engine once it is complete."""
    q = shlex.quote
    partial = plan.engine_path + ".partial"
    build = shlex.join(render_trtexec(plan, trtexec="TRTEXEC_PLACEHOLDER", save_engine=partial))
    build = build.replace("TRTEXEC_PLACEHOLDER", '"$TRTEXEC"', 1)
    return [
        f'test -f {q(plan.onnx_path)} || {{ echo "error: {plan.onnx_path} is missing from the bundle" >&2; exit 2; }}',
        "",
        f"rm -f {q(partial)}",
        f"trap {q('rm -f ' + q(partial))} EXIT  # never leave a half-written engine behind",
        build,
        f'test -s {q(partial)} || {{ echo "error: trtexec finished but wrote no engine" >&2; exit 1; }}',
        f"mv -f {q(partial)} {q(plan.engine_path)}",
        f'echo "built {plan.engine_path} (TensorRT $have)"',
    ]


def _recipe_engine_copies(plan: TrtBuildPlan, engine_copies: Sequence[str]) -> list[str]:
    """The built engine also placed where a deployment expects it (a Triton repository's 1/model.plan)."""
    q = shlex.quote
    lines = []
    for copy in engine_copies:
        lines += [f"mkdir -p {q(str(Path(copy).parent))}", f"cp -f {q(plan.engine_path)} {q(copy)}",
                  f'echo "placed it at {copy}"']
    return lines


def _recipe_compare(plan: TrtBuildPlan, coordinate_outputs: Sequence[str]) -> list[str]:
    """The engine against ONNX Runtime through polygraphy (skipped without it); exit 3 if they differ."""
    reference, engine = render_polygraphy_compare(plan, coordinate_outputs)
    return [
        "# Sanity comparison with ONNX Runtime on random inputs in [0, 1]; the accuracy gate",
        "# is the landmark-error evaluation (cunet-optimize profile), not this.",
        "if command -v polygraphy >/dev/null 2>&1; then",
        "  " + shlex.join(reference),
        "  if ! " + shlex.join(engine) + "; then",
        f'    echo "error: {plan.engine_path} differs from ONNX Runtime beyond the sanity tolerance" >&2',
        "    exit 3",
        "  fi",
        "else",
        '  echo "note: polygraphy not found (pip install polygraphy onnxruntime); comparison skipped" >&2',
        "fi",
        "",
    ]
