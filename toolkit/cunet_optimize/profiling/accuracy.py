"""Accuracy of each profiled variant against its FP32 reference (docs/EVAL.md).

Every variant is scored by `evaluate_landmarks` on the same images; the reference is
the PyTorch FP32 model the engines were built from (the profile's baseline row).
The task of the data decides the metric: NME for faces, PCKh@0.5 for pose.
`accuracy_delta` is the pure rule: absolute delta in the metric's percentage points,
relative delta in percent of the reference, and pass = the change for the worse <=
tolerance (an improvement always passes; a non-finite value always fails).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from cunet_optimize.errors import CUNetError
from cunet_optimize.metrics import (AUC_THRESHOLD, FACE_FAILURE_THRESHOLDS, PCKH_CURVE_MAX_THRESHOLD, ced_curve,
                                   pckh_curve)
from cunet_optimize.tasks import FACE, TASKS, Task, open_dataset, task_of_data

# Used when a build.json states no tolerance: the build's own default (NME percentage points),
# read from the task the build reads it from (pipeline/build.py imports torch; the profile reader need not).
DEFAULT_NME_TOLERANCE_POINTS = FACE.default_tolerance
# CED stored for the plot: 0..10 % NME (both failure thresholds), 0.1 % steps.
CED_MAX_THRESHOLD = max(FACE_FAILURE_THRESHOLDS)
CED_PLOT_STEPS = 101


@dataclass(frozen=True)
class EvalData:
    """Which images every variant is scored on, and how."""

    folder: str
    split: str | None = "test"
    crop: str = "tight"
    boxes: str | None = None
    normalizer: str = "inter_ocular"
    flip: bool = False
    max_images: int | None = None
    task: str = "face"  # tasks.TASKS key: decides the data set layout and the metric

    def load(self):
        """The task's data set (first `max_images` items if set); DataError if unusable."""
        dataset = open_dataset(TASKS[self.task], self.folder, self.split, crop=self.crop, boxes=self.boxes)
        if self.max_images is not None and self.max_images < len(dataset):
            dataset.records = dataset.records[: self.max_images]
        return dataset


def crop_key(crop: str | None) -> str:
    """"tight" / "detector" from either the key or the crop-policy sentence a build.json may record."""
    from cunet_optimize.data.face300w import CROP_POLICIES

    text = (crop or "tight").strip()
    return next((key for key in CROP_POLICIES if text == key or text.startswith(key + ":")), text)


def split_key(split: str | None) -> str | None:
    return None if split in (None, "all") else split


def eval_data_for(
    builds_eval: list[dict | None],
    folder: str | os.PathLike | None = None,
    split: str | None = None,
    crop: str | None = None,
    **options: Any,
) -> tuple[EvalData | None, list[str]]:
    """The evaluation set: --data overrides; else the first build's eval_data. Notes say
    when builds were gated on different data than the profile uses. A split of None or
    "all" means every image in the folder."""
    notes: list[str] = []
    stated = [e for e in builds_eval if e]
    first = stated[0] if stated else {}
    if folder is None and not first.get("folder"):
        return None, ["no evaluation data: the builds state none; pass --data DIR to measure accuracy"]
    chosen_folder = str(folder if folder is not None else first["folder"])
    task = task_of_data(chosen_folder)
    stated_tasks = {e.get("task", "face") for e in stated}
    if stated_tasks and stated_tasks != {task.name}:
        raise CUNetError(f"{chosen_folder}: {task.data_words}, but the builds are of {' and '.join(sorted(stated_tasks))} "
                         f"models; pass --data with {'/'.join(sorted(stated_tasks))} data")
    chosen = EvalData(
        folder=chosen_folder,
        split=split_key(split if split is not None else first.get("split", "test")),
        crop=crop_key(crop if crop is not None else first.get("crop")),
        boxes=options.get("boxes", first.get("boxes")),
        normalizer=options.get("normalizer") or first.get("normalizer", "inter_ocular"),
        flip=bool(options.get("flip") or first.get("flip", False)),
        max_images=options.get("max_images"),
        task=task.name,
    )
    for e in stated:
        gated = (str(e.get("folder")), split_key(e.get("split", "test")), crop_key(e.get("crop")))
        if gated != (chosen.folder, chosen.split, chosen.crop):
            notes.append(
                f"a build was gated on {e.get('folder')} (split {e.get('split')}, crop {e.get('crop')}); "
                f"this profile scores every variant on {chosen.folder} (split {chosen.split}, crop {chosen.crop})"
            )
            break
    return chosen, notes


def delta_keys(task: Task) -> tuple[str, str]:
    """Where a variant's accuracy records its change: nme_delta_points / pckh_delta_points (+ relative)."""
    prefix = task.metric_key.removesuffix("_percent")
    return f"{prefix}_delta_points", f"{prefix}_delta_relative_percent"


def accuracy_delta(value_percent: float | None, reference_percent: float | None, tolerance_points: float,
                   task: Task = FACE) -> dict:
    """Absolute (points) and relative (%) change of the task's metric vs the reference, and
    pass/fail: the change for the worse (NME up, PCKh down) within the tolerance."""
    points, relative_key = delta_keys(task)
    finite = value_percent is not None and reference_percent is not None and math.isfinite(value_percent) \
        and math.isfinite(reference_percent)
    if not finite:
        return {points: None, relative_key: None, "tolerance_points": tolerance_points, "passed": False}
    delta = value_percent - reference_percent
    relative = 100.0 * delta / reference_percent if reference_percent > 0 else None
    return {
        points: delta,
        relative_key: relative,
        "tolerance_points": tolerance_points,
        "passed": bool(task.degradation(value_percent, reference_percent) <= tolerance_points),
    }


def ced_for_plot(per_image_nme: np.ndarray) -> dict:
    """CED on a coarse grid (enough for a plot, small in JSON); thresholds as fractions."""
    thresholds, fraction = ced_curve(per_image_nme, CED_MAX_THRESHOLD, CED_PLOT_STEPS)
    return {
        "max_threshold": CED_MAX_THRESHOLD,
        "auc_threshold": AUC_THRESHOLD,
        "thresholds": [round(float(t), 6) for t in thresholds],
        "fraction": [round(float(f), 6) for f in fraction],
    }


def pckh_curve_for_plot(joint_errors: np.ndarray, visible: np.ndarray) -> dict:
    """PCKh at thresholds 0..0.5 head sizes (the pose task's CED), thresholds as fractions."""
    thresholds, fraction = pckh_curve(joint_errors, visible)
    return {
        "max_threshold": PCKH_CURVE_MAX_THRESHOLD,
        "thresholds": [round(float(t), 6) for t in thresholds],
        "fraction": [round(float(f), 6) for f in fraction],
    }
