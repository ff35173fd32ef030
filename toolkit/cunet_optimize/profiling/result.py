"""The profile's rows as the profiler fills them, and the profile they make.

A row is a `VariantRecord` (manifests/profile.py), the same type `report` reads back:
one list of fields. Measurements arrive as plain data (dicts of numbers, NumPy
scalars, NaN for a failed value); `part` checks each into its typed record as it is
stored, and `profile_manifest` checks the whole profile once more, so the profiler
cannot write a profile the report would reject. `speedups` and `what_ran_where` are
pure functions over the rows.
"""

from __future__ import annotations

from typing import Any, TypeVar

from cunet_optimize.manifests.profile import PROFILE_SCHEMA, REPROFILE, ProfileManifest, VariantRecord
from cunet_optimize.manifests.schema import from_dict, to_dict

T = TypeVar("T")


def part(cls: type[T], data: Any, where: str) -> T | None:
    """A measurement's plain data as its typed record (None stays None: not measured).

    Through the JSON form (NumPy scalars as numbers, NaN as null), and keeping which
    declared keys the measurement left out: the profile writes exactly the keys measured.
    """
    return None if data is None else from_dict(cls, to_dict(data), where, REPROFILE)


def updated(record: T, changes: dict[str, Any], where: str) -> T:
    """`record` with `changes` (by their JSON keys) merged in, checked again; keys it
    never had stay absent from the JSON, keys set to None are written as null."""
    return from_dict(type(record), {**to_dict(record), **to_dict(changes)}, where, REPROFILE)


def variant_record(**fields: Any) -> VariantRecord:
    """A row from plain data (dicts as the measurements return them); every field is
    written, those not given with VariantRecord's defaults."""
    return part(VariantRecord, {**to_dict(VariantRecord(name=fields["name"])), **fields},
                f"profile variant {fields['name']}")


def profile_manifest(*, variants: list[VariantRecord], **fields: Any) -> ProfileManifest:
    """The typed profile: `fields` are ProfileManifest's (name, created, environment,
    settings, data, commands, statement, notes, seconds, toolkit_version) as plain data.
    Checked field by field, as `report` will read it."""
    data = to_dict({"schema": PROFILE_SCHEMA, **fields, "variants": variants})
    return ProfileManifest.from_dict(data, f"profile {fields.get('name', '')}")


def speedups(variants: list[VariantRecord]) -> None:
    """Fill speedup_vs_pytorch / _vs_onnx_fp32 (median latency at the same batch size,
    same model) in place; None where either side was not measured."""

    def median(v: VariantRecord) -> float | None:
        return v.latency.median_ms if v.latency else None

    def batch(v: VariantRecord) -> int | None:
        return v.latency.batch_size if v.latency else None

    for v in variants:
        same_model = [o for o in variants if o.model_sha256 == v.model_sha256]
        torch_ref = next((o for o in same_model if o.baseline), None)
        ort_ref = next((o for o in same_model if o.backend == "onnxruntime" and o.precision == "fp32"
                        and o.measured), None)
        for attr, ref in (("speedup_vs_pytorch", torch_ref), ("speedup_vs_onnx_fp32", ort_ref)):
            mine, theirs = median(v), median(ref) if ref is not None else None
            same_batch = ref is not None and batch(v) == batch(ref)
            setattr(v, attr, theirs / mine if mine and theirs and same_batch else None)


def what_ran_where(environment: dict, variants: list[VariantRecord]) -> str:
    """A plain statement of which runtimes measured what on which machine."""
    cpu = environment.get("cpu", "this CPU")
    cores = environment.get("cpu_cores_usable") or environment.get("cpu_cores")
    gpu = environment.get("gpu", "none")
    versions = environment.get("versions", {})
    measured = {v.backend for v in variants if v.measured}
    runtimes = []
    if "pytorch" in measured:
        runtimes.append(f"PyTorch {versions.get('torch')} (CPU, eager FP32)")
    if "onnxruntime" in measured:
        runtimes.append(f"ONNX Runtime {versions.get('onnxruntime')} (CPUExecutionProvider)")
    if "openvino" in measured:
        runtimes.append(f"OpenVINO {versions.get('openvino')} (CPU plugin)")
    if "tensorrt" in measured:
        runtimes.append(f"TensorRT {versions.get('tensorrt')} on {gpu}")
    where = f"{cpu}, {cores} cores, GPU: {gpu}"
    text = f"All numbers measured on this machine ({where}) with {' and '.join(runtimes) or 'no runtime'}."
    bundles = [v.name for v in variants if v.backend == "tensorrt" and not v.engine_built]
    if bundles:
        text += (f" TensorRT bundles were not built here ({', '.join(bundles)}): their engines must be built "
                 "and profiled on the device with each bundle's build_engine.sh; no numbers are shown for them.")
    other = [v.name for v in variants if not v.measured and v.name not in bundles]
    if other:
        text += f" Not measured here: {', '.join(other)} (see each row's status)."
    return text
