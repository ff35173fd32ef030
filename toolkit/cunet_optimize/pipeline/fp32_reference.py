"""The FP32 reference accuracy that a build's accuracy gate (and the gate of each timed INT8
CPU variant) compares against, cached in <workdir>/calib/fp32-reference/<key>/
(`reference_accuracy`).

The key is the FP32 graph's bytes and the bytes of every file the evaluation reads
(cache_seal.dataset_digest: each image and its annotations, hashed in well under a second
for 300 images; a size + modification-time fingerprint would miss files copied with
`cp -p` / `rsync -t`). The folder holds reference.json and its seal (cache_seal.py): a
damaged, edited or malformed record is recomputed with a warning, never trusted: the
gate's verdict rests on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from cunet_optimize import __version__, distributed
from cunet_optimize.atomic import sha256_file
from cunet_optimize.evaluation import evaluate_runner

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.json"


@dataclass
class ReferenceAccuracy:
    """The FP32 export's metrics and evaluation settings."""

    metrics: dict
    settings: dict
    cached: str = ""  # " (cached: FILE)" when read back


def _record_problem(record, metric_key: str) -> str | None:
    """Why a reference record cannot be used (None: it can): metrics and settings objects,
    the task's headline metric a finite, non-negative number."""
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict) \
            or not isinstance(record.get("settings"), dict):
        return "not a {metrics, settings} record"
    value = record["metrics"].get(metric_key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return f"metrics.{metric_key} is {value!r}, not a finite percentage"
    return None


def _read_cached(folder: Path, metric_key: str) -> ReferenceAccuracy | None:
    """The sealed record in `folder`, or None (absent; damaged ones are logged)."""
    from cunet_optimize.cache_seal import check_seal

    path = folder / REFERENCE_FILE
    sealed, damage = check_seal(folder, [path])
    if sealed:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            record, damage = None, f"unreadable ({exc})"
        else:
            damage = _record_problem(record, metric_key)
        if damage is None:
            return ReferenceAccuracy(record["metrics"], record["settings"], f" (cached: {path})")
    if damage:
        log.warning("%s: FP32 reference not reusable (%s); recomputing the FP32 reference", folder, damage)
    return None


def reference_accuracy(workdir: Path, reference_onnx: Path, eval_set, eval_root: Path, split: str | None,
                       evaluate_landmarks, progress: bool) -> ReferenceAccuracy:
    """The FP32 export's metrics on the evaluation set, computed once per (FP32 graph,
    data set) and kept in calib/fp32-reference/: every build of a model (int8, int4, each
    target) compares against the same numbers, and the FP32 pass over 300 images is the
    slowest part of a deep model's build. The graph runs optimised (ORT_ENABLE_ALL): it is
    plain float32 arithmetic, equal to the unoptimised run within float rounding."""
    from cunet_optimize.atomic import write_atomic
    from cunet_optimize.cache_seal import dataset_digest, seal
    from cunet_optimize.engines.onnxrt import OnnxRuntimeSessionRunner, OrtSettings
    from cunet_optimize.tasks import task_of_dataset

    metric_key = task_of_dataset(eval_set).metric_key
    key = hashlib.sha256(json.dumps([__version__, sha256_file(reference_onnx), dataset_digest(eval_set), split,
                                     len(eval_set), getattr(eval_set, "crop_policy", ""),
                                     type(eval_set).__name__]).encode())
    folder = workdir / "calib" / "fp32-reference" / key.hexdigest()[:16]
    cached = _read_cached(folder, metric_key)
    if cached is not None:
        return cached
    runner = OnnxRuntimeSessionRunner(reference_onnx, OrtSettings(optimization="all"), load_optimization="all")
    result = distributed.on_every_rank(evaluate_runner, runner, eval_set, evaluate_landmarks, progress, "FP32 reference")
    folder.mkdir(parents=True, exist_ok=True)
    path = write_atomic(folder / REFERENCE_FILE,
                        json.dumps({"metrics": result.metrics, "settings": result.settings}, default=float) + "\n")
    seal(folder, [path])
    return ReferenceAccuracy(result.metrics, result.settings)
