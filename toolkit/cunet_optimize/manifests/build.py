"""build.json: the manifest `cunet-optimize build` writes into every build folder.

Schema "cunet-optimize/build/1" (engines/README.md describes the fields). The build
writes it through `BuildManifest` (so a field of the wrong type fails the build, not a
later profile), and the profiler and the report read it back through the same class.
Fields the profiler or the report read are typed; the rest of a stage's record (export
summary, engine settings, lint findings, timings) is kept as written.

`artifact_sha256` holds the SHA-256 of every file of the build folder (but build.json),
recorded by `record_artifact_hashes` when the build is complete; `artifact_hash_problems`
says which files no longer match, so nothing runs a file the build did not write.
A build.json from before the field has none (its files cannot be checked).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cunet_optimize.atomic import sha256_file

from cunet_optimize.manifests.schema import check_schema, from_dict, key, read_json, to_dict

BUILD_SCHEMA = "cunet-optimize/build/1"
BUILD_FILE = "build.json"
REBUILD = "rebuild it with this toolkit version (`cunet-optimize build --force`)"


@dataclass
class ModelRecord:
    """The checkpoint a build was made from."""

    checkpoint: str
    sha256: str
    source: str | None = None
    config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalDataRecord:
    """The evaluation set the accuracy gate ran on (the profiler's default set)."""

    folder: str | None = None
    split: str | None = None
    images: int | None = None
    crop: str | None = None  # the crop policy, as a key ("tight") or its sentence
    task: str | None = None  # absent before the pose task: face
    boxes: str | None = None
    normalizer: str | None = None
    flip: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Metrics:
    """A model's metrics on an evaluation set, in percent (metrics.py; a face or a pose set):
    a profile variant's, and the two sides of a build's accuracy gate."""

    nme_percent: float | None = None
    failure_rate_008: float | None = key("failure_rate_0.08_percent")
    failure_rate_010: float | None = key("failure_rate_0.10_percent")
    auc_008: float | None = key("auc_0.08_percent")
    pckh_percent: float | None = None
    pckh_02: float | None = key("pckh_0.2_percent")
    per_joint_percent: dict[str, float | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def value(self, metric_key: str) -> float | None:
        """The headline metric by its key: "nme_percent" (faces) or "pckh_percent" (pose)."""
        return {"nme_percent": self.nme_percent, "pckh_percent": self.pckh_percent}.get(metric_key)


@dataclass
class AccuracyGate:
    """The accuracy gate at build time: the quantized engine vs the FP32 reference."""

    runtime: str | None = None
    task: str | None = None
    metric: str | None = None
    metric_key: str | None = None  # absent before the pose task: NME only
    reference: Metrics | None = None  # the FP32 reference's metrics
    quantized: Metrics | None = None
    reference_value: float | None = None
    quantized_value: float | None = None
    degradation_points: float | None = None  # positive = worse than FP32
    nme_increase_percent_points: float | None = None  # the same, before the pose task
    tolerance: float | None = None
    passed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.metric_key or "nme_percent"

    @property
    def worse_points(self) -> float | None:
        return self.degradation_points if self.degradation_points is not None else self.nme_increase_percent_points


@dataclass
class PassRecord:
    """One surgery pass: what it rewrote and what the graph became."""

    name: str | None = None
    rewrites: int | None = None
    nodes_before: int | None = None
    nodes_after: int | None = None
    concats_before: int | None = None
    concats_after: int | None = None
    concat_bytes_before: int | None = None
    concat_bytes_after: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SurgeryRecord:
    # "passes": the pass names (with "reports" one record per pass), or, in older
    # manifests, the records themselves
    passes: list[str | PassRecord] = field(default_factory=list)
    reports: list[PassRecord] = field(default_factory=list)
    peak_activation_bytes_before: int | None = None
    peak_activation_bytes_after: int | None = None
    concat_bytes_before: int | None = None
    concat_bytes_after: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pass_records(self) -> list[PassRecord]:
        return self.reports or [p for p in self.passes if isinstance(p, PassRecord)]


@dataclass
class CalibrationRecord:
    method: str | None = None
    scheme: str | None = None
    images: int | None = None
    data: str | None = None
    scales_file: str | None = None
    ranges: dict[str, float | None] | None = None  # tensor -> amax
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlanLayer:
    """One conv of an auto plan, in execution order."""

    name: str
    format: str  # "int4", "int8", "float"
    weight_bytes: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class VisitedPlan:
    """A plan the search visited: its cost and predicted degradation."""

    predicted: float
    cost: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class JointRun:
    """A whole plan the search ran on the held-out images (moves None: the additive plan)."""

    cost: float
    predicted: float
    measured: float
    moves: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlanBuild:
    """An engine the search built and measured."""

    step: int
    formats: dict[str, int]  # format -> convs
    predicted: float
    degradation: float
    passed: bool
    weight_bytes: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AutoPlan:
    """build --precision auto: the per-conv plan, the search and its builds (pipeline/auto_build.py)."""

    plan: dict[str, str] = field(default_factory=dict)  # conv -> format
    objective: str | None = None
    grain: str | None = None
    budget: float | None = None
    weight_bytes: float | None = None
    weight_bytes_uniform: dict[str, float] = field(default_factory=dict)
    predicted_degradation: float | None = None
    layers: list[PlanLayer] = field(default_factory=list)
    visited: list[VisitedPlan] = field(default_factory=list)
    joint_runs: list[JointRun] = field(default_factory=list)
    builds: list[PlanBuild] = field(default_factory=list)
    back_off: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildManifest:
    name: str
    precision: str
    target: str
    backend: str
    engine_built: bool
    model: ModelRecord
    artifacts: dict[str, str]  # role -> path relative to the build folder
    schema: str = BUILD_SCHEMA
    # path relative to the folder -> sha256, every file but build.json (None: built before the field)
    artifact_sha256: dict[str, str] | None = None
    toolkit_version: str | None = None
    command: str | None = None
    dla_core: int | None = None
    backend_version: str | None = None
    eval_data: EvalDataRecord | None = None
    calibration: CalibrationRecord | None = None
    surgery: SurgeryRecord | None = None
    accuracy: AccuracyGate | None = None
    auto: AutoPlan | None = None  # build --precision auto
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # target_spec, export, lint, engine_settings, timings...

    @classmethod
    def from_dict(cls, data: Any, where: str = BUILD_FILE) -> BuildManifest:
        return from_dict(cls, check_schema(data, BUILD_SCHEMA, where, REBUILD), where, REBUILD)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"


def read_build_manifest(path: str | os.PathLike) -> BuildManifest:
    """The build.json at `path`; ManifestError (one line: file, field, what to do) when unusable."""
    return BuildManifest.from_dict(read_json(path, BUILD_FILE, REBUILD), str(path))


def checked_build_json(manifest: dict) -> str:
    """The text of build.json for the manifest a build assembled, checked against
    BuildManifest first: a build never writes a manifest the profiler would reject.
    Written in the build's own key order (paths and other objects as strings)."""
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    BuildManifest.from_dict(json.loads(text), f"{manifest.get('name', 'build')}/{BUILD_FILE}")
    return text


def record_artifact_hashes(manifest: dict, folder: str | os.PathLike) -> dict:
    """Record in `manifest` the sha256 of every file under the (complete) build folder but
    build.json, by path relative to it; call right before build.json is written."""
    folder = Path(folder)
    manifest["artifact_sha256"] = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() != BUILD_FILE}
    return manifest


def artifact_hash_problems(manifest: BuildManifest, folder: str | os.PathLike) -> list[tuple[str, str]]:
    """[(path relative to the folder, what is wrong)] for each recorded file that is missing or
    whose bytes changed, and each artifact role inside the folder that has no recorded hash."""
    if manifest.artifact_sha256 is None:
        return []
    folder = Path(folder)
    recorded = manifest.artifact_sha256
    problems = []
    for rel, digest in recorded.items():
        path = folder / rel
        if not path.is_file():
            problems.append((rel, "is missing (build.json records its sha256)"))
        elif sha256_file(path) != digest:
            problems.append((rel, "does not match the sha256 build.json recorded"))
    for rel in dict.fromkeys(manifest.artifacts.values()):
        inside = not Path(rel).is_absolute() and not Path(os.path.normpath(rel)).parts[:1] == ("..",)
        if inside and os.path.normpath(rel).replace(os.sep, "/") not in recorded:
            problems.append((rel, "has no sha256 in build.json"))
    return problems
