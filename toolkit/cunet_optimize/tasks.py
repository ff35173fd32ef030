"""The two tasks CU-Net serves, and the one place where they differ.

* face: 68 points in the 300-W layout (a folder of images with same-stem .pts files),
  scored by NME (lower is better);
* pose: 16 MPII joints (the CU-Net authors' annotation JSON), scored by PCKh@0.5
  (higher is better).

A model's task comes from its checkpoint (the `task` our `train` stores, else its
landmark count), a data set's from its layout. Commands ask `task_of_model` and
`task_of_data`, stop with `check_task` when they disagree, and read everything else
(data set class, default data, flip permutation, metric, its direction, the gate
option, the predict crop) from the `Task`, so no command branches on the task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cunet_optimize import metrics
from cunet_optimize.data.mpii import ANNOTATION_FILE as MPII_ANNOTATION_FILE
from cunet_optimize.data.mpii import IMAGE_FOLDER as MPII_IMAGE_FOLDER
from cunet_optimize.data.transforms import FACE68_FLIP_PERM, MPII_FLIP_PERM
from cunet_optimize.errors import CUNetError
from cunet_optimize.models.cunet import POINTS_PER_TASK

# The MPII skeleton: joint pairs `predict` draws as limbs.
MPII_LIMBS = ((0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9),
              (10, 11), (11, 12), (12, 7), (7, 13), (13, 14), (14, 15))
# Split names the commands use (face lists) -> MPII's isValidation selection.
_MPII_SPLIT = {None: "all", "all": "all", "test": "valid", "valid": "valid", "val": "valid",
               "train": "train", "calib": "train"}


@dataclass(frozen=True, eq=False)
class Task:
    name: str
    num_points: int
    model_words: str  # "a 68-point face model"
    data_words: str  # what its data looks like on disk
    flip_perm: np.ndarray
    metric: str  # headline metric as reports name it
    metric_key: str  # its key in the metrics dict of an evaluation (percent)
    lower_is_better: bool
    gate_option: str  # the build option that sets the accuracy tolerance
    default_tolerance: float  # allowed degradation, metric percentage points
    box_factor: float  # predict --box: the crop side is max(w, h) times this
    curve_name: str  # the accuracy curve reports plot
    limbs: tuple[tuple[int, int], ...] = ()  # point pairs drawn as a skeleton

    def degradation(self, value: float, reference: float) -> float:
        """How much worse `value` is than `reference`, in metric points (negative: better)."""
        return value - reference if self.lower_is_better else reference - value

    def better(self, value: float, than: float) -> bool:
        return value < than if self.lower_is_better else value > than

    @property
    def worst(self) -> float:
        return float("inf") if self.lower_is_better else float("-inf")

    def headline(self, result_metrics: dict) -> float:
        return float(result_metrics[self.metric_key])

    def default_data(self, progress: bool = True) -> Path:
        """The synthetic set this task's commands use without --data (written once to the cache)."""
        from cunet_optimize.data import default_set

        return (default_set.ensure_default_dataset(progress) if self.name == "face"
                else default_set.ensure_default_pose_dataset(progress))


FACE = Task(
    name="face", num_points=POINTS_PER_TASK["face"], model_words="a 68-point face model",
    data_words="300-W face data (images with .pts files)", flip_perm=FACE68_FLIP_PERM,
    metric="NME", metric_key="nme_percent", lower_is_better=True, gate_option="--max-nme-increase",
    default_tolerance=metrics.DEFAULT_TOLERANCE_POINTS["NME"],
    box_factor=1.1,  # the authors' detector box policy
    curve_name="CED",
)
POSE = Task(
    name="pose", num_points=POINTS_PER_TASK["pose"], model_words="a 16-joint pose model",
    data_words="MPII pose data (an annotation JSON)", flip_perm=MPII_FLIP_PERM,
    metric="PCKh@0.5", metric_key="pckh_percent", lower_is_better=False, gate_option="--max-pckh-decrease",
    default_tolerance=metrics.DEFAULT_TOLERANCE_POINTS["PCKh@0.5"],
    box_factor=1.25,  # MPII: scale *= 1.25 around the person
    curve_name="PCKh vs threshold", limbs=MPII_LIMBS,
)
TASKS = {t.name: t for t in (FACE, POSE)}
_HOW_TO_GET = {
    "face": "a 300-W layout folder (`cunet-optimize data synth --task face` writes one)",
    "pose": f"an MPII annotation JSON or the folder holding {MPII_ANNOTATION_FILE} "
            "(`cunet-optimize data synth --task pose` writes one)",
}


def task_of_model(model) -> Task:
    """The checkpoint's recorded task, else face/pose by its landmark count (16 = MPII)."""
    meta = getattr(model, "checkpoint_metadata", None) or {}
    if meta.get("task") in TASKS:
        return TASKS[meta["task"]]
    return POSE if model.config.num_classes == POSE.num_points else FACE


def mpii_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of MPII data given as the JSON or its folder."""
    p = Path(path)
    json_path = p if p.is_file() else p / MPII_ANNOTATION_FILE
    images = json_path.parent / MPII_IMAGE_FOLDER
    return json_path, images if images.is_dir() else json_path.parent


def task_of_data(path: str | os.PathLike) -> Task:
    """pose for an MPII annotation JSON (or a folder holding mpii_annotations.json), else face."""
    from cunet_optimize.data.face300w import DataError

    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".json":
        return POSE
    if p.is_dir():
        return POSE if (p / MPII_ANNOTATION_FILE).is_file() else FACE
    raise DataError(f"{p}: data not found; pass {_HOW_TO_GET['face']} or {_HOW_TO_GET['pose']}")


def check_task(model_task: Task, data_task: Task, model_name: str, data: str | os.PathLike) -> None:
    """One line before any work when the model and the data belong to different tasks."""
    if model_task is not data_task:
        raise CUNetError(f"{data}: {data_task.data_words}, but model {model_name} is {model_task.model_words}; "
                         f"pass {_HOW_TO_GET[model_task.name]}, or a {data_task.name} model")


def open_dataset(task: Task, root: str | os.PathLike, split: str | None, *, augment: bool = False, seed: int = 0,
                 crop: str = "tight", boxes: str | None = None, skip_bad: bool = False, flags=None):
    """The task's data set over `root`. Split names are the face lists' (train/test/calib/...;
    None or "all" for everything); for MPII, test -> the validation records, train and calib ->
    the training records. `crop`, `boxes`, `skip_bad` are the 300-W reader's; `flags`
    (face300w.DataFlags) the command's option names its hints use (default --data/--split)."""
    from cunet_optimize.data.face300w import DataError, DataFlags, Face300W
    from cunet_optimize.data.mpii import MPIIDataset

    if task is FACE:
        return Face300W(root, split=None if split in (None, "all") else split, crop=crop, boxes=boxes,
                        augment=augment, seed=seed, skip_bad=skip_bad, flags=flags or DataFlags())
    if split not in _MPII_SPLIT:
        raise DataError(f"{root}: MPII data has no split {split!r}; use train, test (its validation records) or all")
    json_path, images = mpii_paths(root)
    return MPIIDataset(json_path, images, split=_MPII_SPLIT[split], augment=augment, seed=seed)


def check_data_task(model, model_name: str, *folders: str | None) -> Task:
    """The model's task, after checking that every given data folder holds that task's data
    (a face model with pose data or the reverse stops here, before any work)."""
    task = task_of_model(model)
    for folder in folders:
        if folder:
            check_task(task, task_of_data(folder), model_name, folder)
    return task


def open_dataset_or_default(folder: str | None, split: str | None, task: Task = FACE, flags=None):
    """(`task`'s data set over `folder`, or over the task's synthetic default set when None; its root).
    `flags`: the command's option names for hints (face300w.EVAL_DATA_FLAGS for a build's --eval-*)."""
    root = Path(folder) if folder else task.default_data()
    return open_dataset(task, root, split, flags=flags), root


def default_calib_split(calib_data: str | None, split: str | None = None) -> str | None:
    """Calibrate on training images, never on the evaluation split: the embedded set's
    calibration slice, a user folder's train list when it has one, MPII's training records."""
    if split is not None:
        return split
    if not calib_data:
        return "calib"
    if (Path(calib_data) / "train.txt").is_file() or task_of_data(calib_data) is POSE:
        return "train"
    return None


# Images per calibration batch: histogram ranges start at the first batch's maximum, so the
# scales depend on how the images are batched; api.quantize batches a user's loader the same way.
CALIB_BATCH_SIZE = 16


def calibration_batches(dataset, images: int, batch_size: int = CALIB_BATCH_SIZE):
    """The first `images` images of `dataset` as tensors, `batch_size` at a time."""
    import torch

    count = min(images, len(dataset))
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        yield torch.stack([torch.as_tensor(it["image"]) for it in items])


def calibration_images(folder: str | None, split: str | None, count: int, task: Task = FACE) -> np.ndarray:
    """The first `count` calibration images (of `folder`, or of the task's default set) as one
    float32 array, for graph passes that calibrate new quantization points (surgery's
    integer_dataflow, whose commands name them --calib-data/--calib-split)."""
    from cunet_optimize.data.face300w import CALIB_DATA_FLAGS

    dataset, _ = open_dataset_or_default(folder, split, task, CALIB_DATA_FLAGS)
    return np.concatenate([b.numpy() for b in calibration_batches(dataset, count)])


def task_of_dataset(dataset) -> Task:
    return TASKS[getattr(dataset, "task", "face")]


def score(task: Task, pred: np.ndarray, gt: np.ndarray, visible: np.ndarray | None, head_size: np.ndarray | None,
          normalizer: str = "inter_ocular") -> tuple[dict, np.ndarray, np.ndarray | None]:
    """(metrics, per-image NME or empty, per-joint errors in head sizes or None) of predictions."""
    if task is FACE:
        return metrics.face_metrics(pred, gt, normalizer), metrics.nme(pred, gt, normalizer), None
    summary = metrics.pose_metrics(pred, gt, visible, head_size)
    errors = metrics.pckh_errors(pred, gt, head_size)
    thresholds, fraction = metrics.pckh_curve(errors, visible)
    summary["pckh_0.2_percent"] = float(fraction[np.argmin(np.abs(thresholds - 0.2))] * 100.0)
    summary["normalizer"] = "head size = 0.6 x head-box diagonal"
    return summary, np.zeros(0), errors
