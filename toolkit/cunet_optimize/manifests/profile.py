"""The profile JSON: what `cunet-optimize profile` writes and `cunet-optimize report` reads.

Schema "cunet-optimize/profile/1". `ProfileManifest.from_dict` checks every field the
report reads (a number where a number belongs, ...) and the report reads nothing else,
so a hand-edited or truncated profile fails with one line naming the field, never with
a traceback half way through a page. Numbers are `float | None`: None = not measured
(non-finite values are written as null). The profiler fills these same rows
(VariantRecord) as it measures (profiling/result.py) and checks the whole profile
against this model before writing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from cunet_optimize.manifests.build import AccuracyGate, AutoPlan, CalibrationRecord, Metrics, SurgeryRecord
from cunet_optimize.manifests.schema import check_schema, from_dict, read_json, to_dict

PROFILE_SCHEMA = "cunet-optimize/profile/1"
REPROFILE = "re-run `cunet-optimize profile` to write it again"
BUNDLE_ONLY_STATUS = "bundle only: engine must be built and profiled on the device (see its build_engine.sh)"
MEASURED_STATUS = "measured"


@dataclass
class Latency:
    """Timed runs at one batch size (profiling/latency.py latency_stats)."""

    batch_size: int | None = None
    runs: int | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    throughput_ips: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DtypeBytes:
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Weights:
    total_bytes: int | None = None
    by_dtype: dict[str, DtypeBytes] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Size:
    deploy_artifact: str | None = None  # the file a deployment loads
    deploy_bytes: int | None = None
    total_bytes: int | None = None
    weights: Weights | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Memory:
    inference_growth_bytes: int | None = None
    peak_rss_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class OpTime:
    op_type: str
    ms_per_run: float
    percent: float
    nodes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class NodeTime:
    node: str
    op_type: str
    ms_per_run: float
    percent: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ThreadScaling:
    median_ms_batch1: dict[str, float | None]  # intra-op threads -> ms
    speedup_vs_1_thread: dict[str, float | None]
    build_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Layers:
    """Per-layer time (ONNX Runtime's profiler)."""

    source: str
    by_op_type: list[OpTime] = field(default_factory=list)
    top_nodes: list[NodeTime] = field(default_factory=list)
    total_ms_per_run: float | None = None
    run_ms_per_run: float | None = None
    outside_kernels_ms_per_run: float | None = None
    nodes: int | None = None
    batch_size: int | None = None
    runs: int | None = None
    thread_scaling: ThreadScaling | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Curve:
    """A cumulative curve for plots: CED (faces) or PCKh vs threshold (pose)."""

    thresholds: list[float]
    fraction: list[float]
    max_threshold: float
    auc_threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Accuracy:
    """Accuracy of one variant on the evaluation set, and its change vs the FP32 reference."""

    metrics: Metrics
    task: str = "face"
    metric: str = "NME"
    runtime: str | None = None
    reference_nme_percent: float | None = None
    reference_pckh_percent: float | None = None
    nme_delta_points: float | None = None
    nme_delta_relative_percent: float | None = None
    pckh_delta_points: float | None = None
    pckh_delta_relative_percent: float | None = None
    tolerance_points: float | None = None
    tolerance_source: str | None = None
    passed: bool | None = None
    ced: Curve | None = None
    pckh_curve: Curve | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pose(self) -> bool:
        return self.task == "pose"

    @property
    def value(self) -> float | None:
        """The headline metric in percent: NME (faces) or PCKh@0.5 (pose)."""
        return self.metrics.pckh_percent if self.pose else self.metrics.nme_percent

    @property
    def reference_value(self) -> float | None:
        return self.reference_pckh_percent if self.pose else self.reference_nme_percent

    @property
    def delta_points(self) -> float | None:
        return self.pckh_delta_points if self.pose else self.nme_delta_points

    @property
    def delta_relative_percent(self) -> float | None:
        return self.pckh_delta_relative_percent if self.pose else self.nme_delta_relative_percent


@dataclass
class ServedRow:
    """One latency row of `profile --serve` (serving/served_latency.py): the engine in-process,
    or served by Triton over one protocol, at one concurrency; one image per request."""

    runner: str  # "in-process ONNX Runtime" | "Triton http (perf_analyzer)" | "Triton grpc (perf_analyzer)"
    concurrency: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput_infer_per_s: float | None = None
    requests: int | None = None  # in-process rows
    server_queue_ms: float | None = None  # served rows: perf_analyzer's server-side split
    server_compute_ms: float | None = None
    executions_by_batch_size: dict[str, int] = field(default_factory=dict)  # served rows: the batcher's work
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Served:
    """A CPU build's served latency beside its in-process latency (`profile --serve`)."""

    rows: list[ServedRow] = field(default_factory=list)
    triton: str | None = None
    image_batch: int | None = None
    seconds: float | None = None  # measured per row
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class VariantRecord:
    """One row of the profile: the PyTorch baseline or one build."""

    name: str
    role: str | None = None  # "baseline" (PyTorch FP32 of the builds' checkpoint) or "engine"
    precision: str | None = None
    target: str | None = None
    backend: str | None = None  # "pytorch", "onnxruntime", "openvino", "tensorrt"
    runtime: str | None = None  # in words: what produced the numbers
    status: str | None = None  # MEASURED_STATUS, BUNDLE_ONLY_STATUS, or "not measured: <why>"
    measured: bool = False
    backend_version: str | None = None
    model_sha256: str | None = None
    build_dir: str | None = None
    engine_built: bool | None = None
    command: str | None = None
    size: Size | None = None
    latency: Latency | None = None  # at the smallest swept batch size
    batch_sweep: list[Latency] = field(default_factory=list)
    memory: Memory | None = None
    layers: Layers | None = None
    accuracy: Accuracy | None = None
    speedup_vs_pytorch: float | None = None
    speedup_vs_onnx_fp32: float | None = None
    build_accuracy: AccuracyGate | None = None  # build.json "accuracy": the gate at build time
    surgery: SurgeryRecord | None = None
    calibration: CalibrationRecord | None = None
    auto: AutoPlan | None = None  # build.json "auto": the per-conv plan of build --precision auto
    served: Served | None = None  # profile --serve (CPU builds); absent from older profiles
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> bool:
        return self.role == "baseline"


@dataclass
class Environment:
    cpu: str | None = None
    cpu_cores: int | None = None
    cpu_cores_usable: int | None = None
    memory_total_bytes: int | None = None
    gpu: str | None = None
    os: str | None = None
    python: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    load_average: list[float] | None = None
    load_average_end: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Settings:
    sweep_runs: str | None = None  # in words, e.g. "50 at batch 1"
    warmup: int | None = None
    timing: str | None = None
    memory_method: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalData:
    folder: str | None = None
    split: str | None = None
    images: int | None = None
    crop_policy: str | None = None
    crop: str | None = None  # older profiles
    normalizer: str | None = None
    flip: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildCommand:
    name: str | None = None
    command: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Commands:
    builds: list[BuildCommand] = field(default_factory=list)
    profile: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)  # keyword-only: the JSON keeps its reading order, variants required
class ProfileManifest:
    """Everything one profile run measured, and how to reproduce it."""

    name: str = ""
    created: str | None = None  # ISO 8601, UTC
    environment: Environment = field(default_factory=Environment)
    settings: Settings = field(default_factory=Settings)
    data: EvalData | None = None  # evaluation set, or None when accuracy was not measured
    variants: list[VariantRecord]
    commands: Commands = field(default_factory=Commands)
    statement: str | None = None  # what ran where, in one paragraph
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None
    schema: str = PROFILE_SCHEMA
    toolkit_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile") -> ProfileManifest:
        return from_dict(cls, check_schema(data, PROFILE_SCHEMA, where, REPROFILE), where, REPROFILE)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    @property
    def metric(self) -> str:
        """The headline metric of the profiled task: NME (faces) or PCKh@0.5 (pose)."""
        return next((v.accuracy.metric for v in self.variants if v.accuracy and v.accuracy.metric), "NME")


def read_profile(path: str | os.PathLike) -> ProfileManifest:
    """A profile JSON written by `cunet-optimize profile`; ManifestError (one line) if unusable."""
    return ProfileManifest.from_dict(read_json(path, "profile", "run `cunet-optimize profile` first (it writes "
                                                                "reports/*.json)"), str(path))


def as_profile(profile: ProfileManifest | dict, where: str = "profile") -> ProfileManifest:
    """A profile as the typed manifest (a dict, e.g. fresh from the profiler, is checked into it)."""
    return profile if isinstance(profile, ProfileManifest) else ProfileManifest.from_dict(profile, where)


def summary_rows(profile: ProfileManifest | dict) -> list[dict]:
    """One flat row per variant: the numbers of the summary table (None = not measured), so
    the CLI table and the HTML report show the same numbers from the same place."""
    rows = []
    for v in as_profile(profile).variants:
        size, lat, acc = v.size or Size(), v.latency, v.accuracy
        rows.append({
            "variant": v.name,
            "role": v.role,
            "target": v.target,
            "precision": v.precision,
            "backend": v.backend,
            "runtime": v.runtime,
            "status": v.status,
            "measured": v.measured,
            "size_bytes": size.deploy_bytes,
            "size_artifact": size.deploy_artifact,
            "batch_size": lat.batch_size if lat else None,
            "median_ms": lat.median_ms if lat else None,
            "p90_ms": lat.p90_ms if lat else None,
            "p99_ms": lat.p99_ms if lat else None,
            "throughput_ips": lat.throughput_ips if lat else None,
            "speedup_vs_pytorch": v.speedup_vs_pytorch,
            "speedup_vs_onnx_fp32": v.speedup_vs_onnx_fp32,
            "memory_growth_bytes": v.memory.inference_growth_bytes if v.memory else None,
            "nme_percent": acc.metrics.nme_percent if acc else None,
            "nme_delta_points": acc.nme_delta_points if acc else None,
            "nme_delta_relative_percent": acc.nme_delta_relative_percent if acc else None,
            # the headline of the variant's task (NME for faces, PCKh@0.5 for pose), for tables and plots
            "metric": acc.metric if acc else "NME",
            "metric_percent": acc.value if acc else None,
            "metric_delta_points": acc.delta_points if acc else None,
            "metric_delta_relative_percent": acc.delta_relative_percent if acc else None,
            "passed": acc.passed if acc else None,
        })
    return rows
