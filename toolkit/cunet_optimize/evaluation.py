"""Accuracy of any runner on a landmark data set: one place for every stage.

Training, `eval`, the build's accuracy gate and the profiler all call
`evaluate_landmarks` with a plain `infer(images) -> heatmaps` callable, so PyTorch,
ONNX Runtime and TensorRT are measured by the same code. The data set's task decides
the metric (faces: NME, pose: PCKh@0.5, see `cunet_optimize.tasks`).

Under torchrun the batches are dealt out to the ranks (batch k to rank k mod N, so each
batch holds the images it holds in one process), the per-image predictions are gathered
on every rank, and the metrics are computed over all of them: the same numbers as one
process, on every rank.

A metric that comes out NaN or inf is an error, not a result (`check_finite`): the model's
outputs are broken, or the ground truth cannot be scored. Training's validation, where a
diverging run is a finding the loop records, opts out with `allow_nonfinite`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from cunet_optimize import distributed, metrics, tasks
from cunet_optimize.data.transforms import decode_heatmaps, heatmap_to_image_coords
from cunet_optimize.errors import CUNetError

InferFn = Callable[[np.ndarray], np.ndarray]  # Bx3x256x256 float32 -> BxCx64x64 float32
# `eval`'s defaults (and api.evaluate's): images per inference batch, the NME normaliser (docs/EVAL.md)
DEFAULT_BATCH_SIZE = 16
DEFAULT_NORMALIZER = "inter_ocular"


@dataclass
class EvalResult:
    metrics: dict
    per_image_nme: np.ndarray  # faces; empty for pose
    predictions: np.ndarray  # (N, C, 2) in original image coordinates
    paths: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    task: str = "face"
    joint_errors: np.ndarray | None = None  # pose: (N, C) errors in head sizes
    visible: np.ndarray | None = None  # pose: (N, C) joints that count for PCKh

    def summary(self) -> dict:
        return {"metrics": self.metrics, "settings": self.settings}


def torch_infer(model: torch.nn.Module) -> InferFn:
    """PyTorch model (eval mode, no grad) as an infer function returning the last head."""
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    def infer(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images).to(device))[-1].cpu().numpy()

    return infer


def flip_test(infer: InferFn, flip_perm: np.ndarray) -> InferFn:
    """Average the heatmaps of the image and of its mirror (mirrored back, points permuted)."""

    def infer_flipped(images: np.ndarray) -> np.ndarray:
        direct = infer(images)
        mirrored = infer(np.ascontiguousarray(images[..., ::-1]))[:, flip_perm, :, ::-1]
        return (direct + mirrored) / 2

    return infer_flipped


def evaluate_landmarks(
    infer: InferFn,
    dataset,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    normalizer: str = DEFAULT_NORMALIZER,
    flip: bool = False,
    progress: bool = True,
    description: str = "eval",
    runtime: str = "",
    sharded: bool | None = None,
    allow_nonfinite: bool = False,
) -> EvalResult:
    """Predict every sample of a face or pose data set and score it (docs/EVAL.md conventions:
    NME with `normalizer` for faces, PCKh@0.5 for pose; flip test with the task's permutation).

    `sharded` (default: whether a process group is active): every rank must call this with
    the same data set and batch size; each predicts its batches and all get the full result.
    A NaN/inf metric or prediction raises CUNetError (see `check_finite`) unless `allow_nonfinite`."""
    if len(dataset) == 0:
        raise CUNetError("evaluation set is empty; check the data folder and its split list")
    task = tasks.task_of_dataset(dataset)
    if flip:
        infer = flip_test(infer, task.flip_perm)
    sharded = distributed.is_active() if sharded is None else sharded
    indices = range(0, len(dataset), batch_size)
    if sharded:
        indices = indices[distributed.rank()::distributed.world_size()]
        progress = progress and distributed.is_main()

    def predict():
        preds, gts, paths, visible, head_size = [], [], [], [], []
        for start in tqdm(indices, desc=description, unit="batch", disable=not progress, leave=False):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            images = np.stack([np.asarray(it["image"], dtype=np.float32) for it in items])
            heatmaps = np.asarray(infer(images), dtype=np.float32)
            points_64 = decode_heatmaps(heatmaps)
            for it, p in zip(items, points_64):
                preds.append(heatmap_to_image_coords(p, np.asarray(it["transform"], dtype=np.float64)))
                gts.append(np.asarray(it["landmarks"], dtype=np.float64))
                paths.append(str(it["path"]))
                if task is tasks.POSE:
                    visible.append(np.asarray(it["visible"], dtype=bool))
                    head_size.append(float(it["head_size"]))
        return preds, gts, paths, visible, head_size

    # sharded: an image or a runner failing on one rank stops every rank (no rank waits in the gather)
    preds, gts, paths, visible, head_size = distributed.agreed(predict) if sharded else predict()
    if sharded:  # rank r holds batches r, r + N, ...: deal them back into the data set's order
        shards = distributed.all_gather_objects((preds, gts, paths, visible, head_size))
        per_batch = [[], [], [], [], []]
        world = len(shards)
        sizes = [min(batch_size, len(dataset) - s) for s in range(0, len(dataset), batch_size)]
        cursor = [0] * world
        for k, size in enumerate(sizes):
            r = k % world
            for column, values in zip(per_batch, shards[r]):
                column.extend(values[cursor[r]:cursor[r] + size] if values else [])
            cursor[r] += size
        preds, gts, paths, visible, head_size = per_batch
    pred = np.stack(preds)
    gt = np.stack(gts)
    vis = np.stack(visible) if visible else None
    hs = np.asarray(head_size) if head_size else None
    summary, per_image, joint_errors = tasks.score(task, pred, gt, vis, hs, normalizer)
    if not allow_nonfinite:
        check_finite(task, summary, pred, gt, paths, runtime or description, normalizer)
    settings = {
        "task": task.name,
        "metric": task.metric,
        "images": len(dataset),
        "normalizer": summary["normalizer"],
        "crop_policy": getattr(dataset, "crop_policy", "unknown"),
        "flip_test": flip,
        "runtime": runtime,
    }
    return EvalResult(summary, per_image, pred, paths, settings, task.name, joint_errors, vis)


def check_finite(task, summary: dict, pred: np.ndarray, gt: np.ndarray, paths: list[str], what: str,
                 normalizer: str = "inter_ocular") -> None:
    """One line when an evaluation's numbers are not numbers: predictions that are NaN/inf (the
    model or engine is broken: its heatmaps are not finite), else a headline metric that is
    (a ground truth that cannot be scored, e.g. a face whose normalising distance is zero)."""
    value = task.headline(summary)
    broken = ~np.isfinite(pred).all(axis=(1, 2))
    if broken.any():
        first = paths[int(np.argmax(broken))]
        raise CUNetError(
            f"{task.metric} is not a result here: {what} outputs NaN/inf heatmaps for {int(broken.sum())} of "
            f"{len(pred)} images (e.g. {first}); the model is broken (damaged weights, or values that overflow): "
            "retrain, re-export or rebuild it"
        )
    if not np.isfinite(value):
        detail = "check the annotations"
        if task is tasks.FACE:
            with np.errstate(all="ignore"):
                zero = ~(metrics.normalizing_distance(gt, normalizer) > 0)
            if zero.any():
                detail = (f"the ground truth's {normalizer} distance is zero for {int(zero.sum())} image(s) (e.g. "
                          f"{paths[int(np.argmax(zero))]}); fix those .pts files or use the normaliser 'box'")
        raise CUNetError(f"{task.metric} of {what} came out {value} on {len(pred)} images: {detail}")


def evaluate_runner(runner, eval_set, evaluate_landmarks, progress: bool, description: str):
    """`runner` (not yet active) over the evaluation set; under torchrun every rank runs it
    (distributed.on_every_rank) on its share of the batches, reading the model rank 0 wrote,
    and all get the metrics of every image. A static-batch (DLA) model takes its own batch size."""
    distributed.agreed(runner.activate)
    try:
        fixed = (runner.input_shape or (None,))[0]
        return evaluate_landmarks(runner.infer, eval_set, progress=progress, description=description,
                                  **({"batch_size": fixed} if isinstance(fixed, int) else {}))
    finally:
        runner.deactivate()


def result_to_json(result: EvalResult) -> dict:
    out = asdict(result)
    out.pop("per_image_nme")
    out.pop("predictions")
    out.pop("paths")
    for key in ("joint_errors", "visible"):
        out.pop(key)
    return out
