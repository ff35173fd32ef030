"""The profile result: what `cunet-optimize profile` writes and `report` reads back.

A ProfileResult is plain data (dataclasses of dicts, lists, numbers and strings) that
serialises to JSON with schema "cunet-optimize/profile/1"; non-finite floats become
null. `summary_rows` and `what_ran_where` are pure functions over the JSON form, so
the CLI table and the HTML report show the same numbers from the same place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cunet_optimize.errors import CUNetError

PROFILE_SCHEMA = "cunet-optimize/profile/1"
BUNDLE_ONLY_STATUS = "bundle only: engine must be built and profiled on the device (see its build_engine.sh)"
MEASURED_STATUS = "measured"


@dataclass
class VariantProfile:
    """One row of the profile: the PyTorch baseline or one build."""

    name: str
    role: str  # "baseline" (PyTorch FP32 of the builds' checkpoint) or "engine"
    precision: str
    target: str
    backend: str  # "pytorch", "onnxruntime", "tensorrt"
    backend_version: str | None
    runtime: str  # in words: what produced the numbers
    status: str  # MEASURED_STATUS, BUNDLE_ONLY_STATUS, or "not measured: <why>"
    measured: bool
    model_sha256: str | None
    build_dir: str | None = None
    engine_built: bool | None = None
    command: str | None = None  # the command that made the build
    size: dict | None = None
    latency: dict | None = None  # latency_stats at the smallest swept batch size
    batch_sweep: list[dict] = field(default_factory=list)
    memory: dict | None = None
    layers: dict | None = None
    accuracy: dict | None = None
    speedup_vs_pytorch: float | None = None
    speedup_vs_onnx_fp32: float | None = None
    build_accuracy: dict | None = None  # build.json "accuracy": the gate at build time
    surgery: dict | None = None
    calibration: dict | None = None
    auto: dict | None = None  # build.json "auto": the per-conv plan of build --precision auto
    notes: list[str] = field(default_factory=list)


@dataclass
class ProfileResult:
    """Everything one profile run measured, and how to reproduce it."""

    name: str
    created: str  # ISO 8601, UTC
    environment: dict
    settings: dict
    data: dict | None  # evaluation set, or None when accuracy was not measured
    variants: list[VariantProfile]
    commands: dict  # {"builds": [{"name", "command"}], "profile": str}
    statement: str  # what ran where, in one paragraph
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    schema: str = PROFILE_SCHEMA
    toolkit_version: str = ""

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    """numpy scalars -> Python; NaN / inf -> None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def read_profile(path: str | os.PathLike) -> dict:
    """A profile JSON written by `cunet-optimize profile`; CUNetError if unusable."""
    p = Path(path)
    if not p.is_file():
        raise CUNetError(f"profile not found: {p}; run `cunet-optimize profile` first (it writes reports/*.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CUNetError(f"{p}: not valid JSON ({exc}); re-run `cunet-optimize profile`") from exc
    check_profile(data, str(p))
    return data


def check_profile(data: Any, where: str = "profile") -> None:
    if not isinstance(data, dict) or data.get("schema") != PROFILE_SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise CUNetError(
            f"{where}: schema {got!r}, expected {PROFILE_SCHEMA!r}; pass a JSON written by `cunet-optimize profile`"
        )
    variants = data.get("variants")
    if not isinstance(variants, list) or not all(isinstance(v, dict) and "name" in v for v in variants):
        raise CUNetError(f"{where}: 'variants' must be a list of objects with a name; re-run `cunet-optimize profile`")
    for i, v in enumerate(variants):
        for key, v_type in VARIANT_FIELD_TYPES.items():
            value = v.get(key)
            if value is not None and not (isinstance(value, v_type) and not isinstance(value, bool) or
                                          v_type is bool and isinstance(value, bool)):
                raise CUNetError(f"{where}: variants[{i}].{key} is {type(value).__name__} {str(value)[:40]!r}, "
                                 f"expected {_type_name(v_type)}; re-run `cunet-optimize profile` to write it again")


# The field types the report reads (None is always allowed: not measured).
VARIANT_FIELD_TYPES: dict[str, Any] = {
    "name": str, "role": str, "precision": str, "target": str, "backend": str, "runtime": str,
    "status": str, "measured": bool, "engine_built": bool,
    "size": dict, "latency": dict, "memory": dict, "layers": dict, "accuracy": dict, "build_accuracy": dict,
    "surgery": dict, "calibration": dict, "auto": dict, "batch_sweep": list, "notes": list,
    "speedup_vs_pytorch": (int, float), "speedup_vs_onnx_fp32": (int, float),
}


def _type_name(t) -> str:
    names = {str: "a string", bool: "true/false", dict: "an object", list: "a list"}
    return names.get(t, "a number")


def _get(d: dict | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def summary_rows(profile: dict) -> list[dict]:
    """One flat row per variant: the numbers of the summary table (None = not measured)."""
    rows = []
    for v in profile.get("variants", []):
        rows.append({
            "variant": v["name"],
            "role": v.get("role"),
            "target": v.get("target"),
            "precision": v.get("precision"),
            "backend": v.get("backend"),
            "runtime": v.get("runtime"),
            "status": v.get("status"),
            "measured": bool(v.get("measured")),
            "size_bytes": _get(v, "size", "deploy_bytes"),
            "size_artifact": _get(v, "size", "deploy_artifact"),
            "batch_size": _get(v, "latency", "batch_size"),
            "median_ms": _get(v, "latency", "median_ms"),
            "p90_ms": _get(v, "latency", "p90_ms"),
            "p99_ms": _get(v, "latency", "p99_ms"),
            "throughput_ips": _get(v, "latency", "throughput_ips"),
            "speedup_vs_pytorch": v.get("speedup_vs_pytorch"),
            "speedup_vs_onnx_fp32": v.get("speedup_vs_onnx_fp32"),
            "memory_growth_bytes": _get(v, "memory", "inference_growth_bytes"),
            "nme_percent": _get(v, "accuracy", "metrics", "nme_percent"),
            "nme_delta_points": _get(v, "accuracy", "nme_delta_points"),
            "nme_delta_relative_percent": _get(v, "accuracy", "nme_delta_relative_percent"),
            # the headline of the variant's task (NME for faces, PCKh@0.5 for pose), for tables and plots
            "metric": _get(v, "accuracy", "metric") or "NME",
            "metric_percent": _metric(v, "metrics", "{}_percent"),
            "metric_delta_points": _metric(v, "{}_delta_points"),
            "metric_delta_relative_percent": _metric(v, "{}_delta_relative_percent"),
            "passed": _get(v, "accuracy", "passed"),
        })
    return rows


def _metric(variant: dict, *path: str):
    """A value of the variant's headline metric: `path` under "accuracy", "{}" = nme or pckh."""
    prefix = "pckh" if _get(variant, "accuracy", "task") == "pose" else "nme"
    return _get(variant, "accuracy", *(p.format(prefix) for p in path))


def speedups(variants: list[VariantProfile]) -> None:
    """Fill speedup_vs_pytorch / _vs_onnx_fp32 (median latency at the same batch size,
    same model) in place; None where either side was not measured."""

    def median(v: VariantProfile) -> float | None:
        return _get(v.latency, "median_ms")

    for v in variants:
        same_model = [o for o in variants if o.model_sha256 == v.model_sha256]
        torch_ref = next((o for o in same_model if o.role == "baseline"), None)
        ort_ref = next((o for o in same_model if o.backend == "onnxruntime" and o.precision == "fp32"
                        and o.measured), None)
        for attr, ref in (("speedup_vs_pytorch", torch_ref), ("speedup_vs_onnx_fp32", ort_ref)):
            mine, theirs = median(v), median(ref) if ref is not None else None
            same_batch = ref is not None and _get(v.latency, "batch_size") == _get(ref.latency, "batch_size")
            setattr(v, attr, theirs / mine if mine and theirs and same_batch else None)


def what_ran_where(environment: dict, variants: list[dict]) -> str:
    """A plain statement of which runtimes measured what on which machine."""
    cpu = environment.get("cpu", "this CPU")
    cores = environment.get("cpu_cores_usable") or environment.get("cpu_cores")
    gpu = environment.get("gpu", "none")
    versions = environment.get("versions", {})
    runtimes = []
    if any(v.get("backend") == "pytorch" and v.get("measured") for v in variants):
        runtimes.append(f"PyTorch {versions.get('torch')} (CPU, eager FP32)")
    if any(v.get("backend") == "onnxruntime" and v.get("measured") for v in variants):
        runtimes.append(f"ONNX Runtime {versions.get('onnxruntime')} (CPUExecutionProvider)")
    if any(v.get("backend") == "tensorrt" and v.get("measured") for v in variants):
        runtimes.append(f"TensorRT {versions.get('tensorrt')} on {gpu}")
    where = f"{cpu}, {cores} cores, GPU: {gpu}"
    text = f"All numbers measured on this machine ({where}) with {' and '.join(runtimes) or 'no runtime'}."
    bundles = [v["name"] for v in variants if v.get("backend") == "tensorrt" and not v.get("engine_built")]
    if bundles:
        text += (f" TensorRT bundles were not built here ({', '.join(bundles)}): their engines must be built "
                 "and profiled on the device with each bundle's build_engine.sh; no numbers are shown for them.")
    other = [v["name"] for v in variants if not v.get("measured") and v["name"] not in bundles]
    if other:
        text += f" Not measured here: {', '.join(other)} (see each row's status)."
    return text
