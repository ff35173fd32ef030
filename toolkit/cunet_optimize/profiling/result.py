"""The profile as the profiler builds it: one VariantProfile per row, filled in place
(plain dicts, lists, numbers, strings), then `profile_manifest` turns the rows into the
typed ProfileManifest (manifests/profile.py, schema "cunet-optimize/profile/1") that
`profile` writes and `report` reads back. `speedups` and `what_ran_where` are pure
functions over the rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cunet_optimize.manifests.profile import PROFILE_SCHEMA, ProfileManifest
from cunet_optimize.manifests.schema import to_dict


@dataclass
class VariantProfile:
    """One row of the profile: the PyTorch baseline or one build."""

    name: str
    role: str  # "baseline" (PyTorch FP32 of the builds' checkpoint) or "engine"
    precision: str
    target: str
    backend: str  # "pytorch", "onnxruntime", "openvino", "tensorrt"
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


def profile_manifest(*, variants: list[VariantProfile], **fields: Any) -> ProfileManifest:
    """The typed profile (manifests/profile.py) from the profiler's plain data: `fields` are
    ProfileManifest's (name, created, environment, settings, data, commands, statement, notes,
    seconds, toolkit_version). Checked field by field: the profiler cannot produce a profile
    the report would reject."""
    data = to_dict({"schema": PROFILE_SCHEMA, **fields, "variants": [asdict(v) for v in variants]})
    return ProfileManifest.from_dict(data, f"profile {fields.get('name', '')}")


def speedups(variants: list[VariantProfile]) -> None:
    """Fill speedup_vs_pytorch / _vs_onnx_fp32 (median latency at the same batch size,
    same model) in place; None where either side was not measured."""

    def median(v: VariantProfile) -> float | None:
        return (v.latency or {}).get("median_ms")

    for v in variants:
        same_model = [o for o in variants if o.model_sha256 == v.model_sha256]
        torch_ref = next((o for o in same_model if o.role == "baseline"), None)
        ort_ref = next((o for o in same_model if o.backend == "onnxruntime" and o.precision == "fp32"
                        and o.measured), None)
        for attr, ref in (("speedup_vs_pytorch", torch_ref), ("speedup_vs_onnx_fp32", ort_ref)):
            mine, theirs = median(v), median(ref) if ref is not None else None
            same_batch = ref is not None and (v.latency or {}).get("batch_size") == (ref.latency or {}).get("batch_size")
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
    if any(v.get("backend") == "openvino" and v.get("measured") for v in variants):
        runtimes.append(f"OpenVINO {versions.get('openvino')} (CPU plugin)")
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
