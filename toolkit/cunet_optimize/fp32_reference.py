"""The FP32 reference accuracy that a build's accuracy gate (and the gate of each timed INT8
CPU variant) compares against, cached in <workdir>/calib/fp32-reference/ (`reference_accuracy`)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cunet_optimize import __version__, distributed
from cunet_optimize.atomic import sha256_file
from cunet_optimize.evaluate import evaluate_runner

log = logging.getLogger(__name__)


@dataclass
class ReferenceAccuracy:
    """The FP32 export's metrics and evaluation settings."""

    metrics: dict
    settings: dict
    cached: str = ""  # " (cached: FILE)" when read back


def dataset_fingerprint(root: Path) -> str:
    """Every file under an evaluation set's root by path, size and modification time: a
    changed image or annotation gives another fingerprint (hashing the images would cost
    as much as evaluating them)."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reference_accuracy(workdir: Path, reference_onnx: Path, eval_set, eval_root: Path, split: str | None,
                       evaluate_landmarks, progress: bool) -> ReferenceAccuracy:
    """The FP32 export's metrics on the evaluation set, computed once per (FP32 graph,
    data set) and kept in calib/fp32-reference/: every build of a model (int8, int4, each
    target) compares against the same numbers, and the FP32 pass over 300 images is the
    slowest part of a deep model's build. The graph runs optimised (ORT_ENABLE_ALL): it is
    plain float32 arithmetic, equal to the unoptimised run within float rounding."""
    from cunet_optimize.atomic import write_atomic
    from cunet_optimize.engines.onnxrt import OnnxRuntimeSessionRunner, OrtSettings

    key = hashlib.sha256(json.dumps([__version__, sha256_file(reference_onnx), str(Path(eval_root).resolve()),
                                     dataset_fingerprint(eval_root), split, len(eval_set),
                                     getattr(eval_set, "crop_policy", ""), type(eval_set).__name__]).encode())
    cache = workdir / "calib" / "fp32-reference" / f"{key.hexdigest()[:16]}.json"
    if cache.is_file():
        try:
            record = json.loads(cache.read_text())
            return ReferenceAccuracy(record["metrics"], record["settings"], f" (cached: {cache})")
        except (ValueError, KeyError):
            log.warning("%s is damaged; recomputing the FP32 reference", cache)
    runner = OnnxRuntimeSessionRunner(reference_onnx, OrtSettings(optimization="all"), load_optimization="all")
    result = distributed.on_every_rank(evaluate_runner, runner, eval_set, evaluate_landmarks, progress, "FP32 reference")
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache, json.dumps({"metrics": result.metrics, "settings": result.settings}, default=float) + "\n")
    return ReferenceAccuracy(result.metrics, result.settings)
