"""The shared training loop: plain training (`train`) and QAT (`qat`) both run here.

Resumable and deterministic: the batch order of an epoch comes from (seed, epoch),
augmentation from (seed, epoch, sample index) inside the data set, and the loop
state (weights, optimizer, position inside the epoch, best score, history) is
saved every `checkpoint_every` iterations. A run killed at any moment and resumed
replays from the last saved iteration and ends with the same weights as an
uninterrupted run (same machine, same thread count: float reductions are only
bit-identical under the same parallel split).

Under torchrun (see `cunet_optimize.distributed`) the same global batches are split
over the ranks, DistributedDataParallel averages the gradients, each rank's loss is
weighted by its share of the global batch (so the step is the single-process step of
batch B), validation is sharded and gathered, and rank 0 alone writes the state,
checkpoints, history and progress. The state does not depend on the number of
processes: a run may resume with another one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cunet_optimize import distributed
from cunet_optimize.atomic import atomic_path, write_atomic
from cunet_optimize.errors import CUNetError
from cunet_optimize.evaluation import evaluate_landmarks, torch_infer
from cunet_optimize.models import save_checkpoint
from cunet_optimize.tasks import Task, task_of_dataset

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
HISTORY_FILE = "history.json"


@dataclass
class TrainRecipe:
    """The authors' recipe (docs/CUNET.md) by default: RMSprop 2.5e-4, batch 24, step decay."""

    epochs: int = 120
    batch_size: int = 24
    lr: float = 2.5e-4
    # (epoch, factor): the face schedule x0.2 at 30, x0.5 at 60 and 90
    lr_steps: tuple[tuple[int, float], ...] = ((30, 0.2), (60, 0.5), (90, 0.5))
    lr_schedule: str = "step"  # "step" (authors) or "cosine" (QAT's short schedule)
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 1e-8
    seed: int = 0
    checkpoint_every: int = 50  # iterations between resumable state saves
    eval_every: int = 1  # epochs
    memory_efficient: bool = False
    freeze_bn_after: int | None = None  # epoch after which BN statistics are frozen (QAT)

    def lr_at(self, epoch: int, step_in_epoch: float = 0.0, steps_per_epoch: int = 1) -> float:
        if self.lr_schedule == "cosine":
            progress = (epoch + step_in_epoch / max(steps_per_epoch, 1)) / max(self.epochs, 1)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        lr = self.lr
        for at, factor in self.lr_steps:
            if epoch >= at:
                lr *= factor
        return lr


@dataclass
class TrainResult:
    out_dir: str
    best_checkpoint: str
    last_checkpoint: str
    best_metric: float  # best validation value of `metric` (percent)
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    metric: str = "NME"
    metric_key: str = "nme_percent"


def heatmap_loss(heads: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Sum over the supervised heads of the MSE over all heatmap pixels."""
    return sum(F.mse_loss(h, target) for h in heads)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batch order of one epoch, a pure function of (seed, epoch). A last batch of
    a single sample is dropped (BatchNorm cannot train on it)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    batches = [order[i:i + batch_size] for i in range(0, num_samples, batch_size)]
    return [b for b in batches if len(b) > 1]


def collate(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([torch.as_tensor(it["image"]) for it in items])
    heatmaps = torch.stack([torch.as_tensor(it["heatmaps"]) for it in items])
    return images, heatmaps


def _recipe_record(recipe: TrainRecipe) -> dict:
    """The recipe as the state file stores it (JSON types: tuples as lists), so a saved
    recipe and the current one compare equal exactly when the options are the same."""
    return json.loads(json.dumps(asdict(recipe)))


def _prepare_model(model: torch.nn.Module, train_set, recipe: TrainRecipe, sync_batchnorm: bool) -> torch.nn.Module:
    """Refuse what cannot train, then the model as the recipe trains it (SyncBatchNorm if asked)."""
    if len(train_set) < 2:
        raise CUNetError(f"training set has {len(train_set)} sample(s); at least 2 are needed")
    if hasattr(model, "memory_efficient"):
        model.memory_efficient = recipe.memory_efficient
    world = distributed.world_size()
    if world > 1 and recipe.batch_size < world:
        raise CUNetError(f"--batch-size {recipe.batch_size} is the global batch and must be at least the "
                         f"number of processes ({world})")
    if sync_batchnorm and world > 1:
        if distributed.backend() != "nccl":
            raise CUNetError("--sync-bn needs GPUs (nccl): PyTorch's SyncBatchNorm has no CPU implementation")
        if recipe.memory_efficient:
            raise CUNetError("--sync-bn and --memory-efficient cannot be combined (recomputation would "
                             "synchronise and update BatchNorm statistics twice)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@dataclass(eq=False)
class _TrainingRun:
    """One session of a training run: what every step needs, and where the run stands.

    The position (epoch, batch_pos, iteration, best, history, wall) is what the state
    file saves and what a resumed session starts from; `wall` counts earlier sessions,
    `started` this one.
    """

    model: torch.nn.Module
    net: torch.nn.Module  # `model`, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    recipe: TrainRecipe
    task: Task
    out: Path
    device: torch.device
    world: int
    main: bool  # rank 0: the one process that writes files
    progress: bool
    save_fn: Callable
    meta: dict
    extra_state: Callable[[], dict] | None
    best: float
    epoch: int = 0
    batch_pos: int = 0  # the next batch of `epoch`
    iteration: int = 0  # optimizer steps so far
    history: list[dict] = field(default_factory=list)
    wall: float = 0.0
    started: float = 0.0

    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE

    @property
    def history_key(self) -> str:
        return "val_" + self.task.metric_key.removesuffix("_percent")  # val_nme, val_pckh

    def resume(self, load_extra_state: Callable[[dict], None] | None) -> None:
        """Continue from the state file: weights, optimizer, position and extra state."""
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if state.get("recipe") != _recipe_record(self.recipe):
            raise CUNetError(
                f"{self.state_path}: saved by a run with another recipe; use a new --out folder "
                "or the same options to resume"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch_pos, self.iteration = state["epoch"], state["batch_pos"], state["iteration"]
        self.best = state.get("best_metric", state.get("best_nme"))
        self.history, self.wall = state["history"], state["wall_seconds"]
        if load_extra_state and "extra" in state:
            load_extra_state(state["extra"])
        log.info("resuming %s at epoch %d, batch %d", self.out, self.epoch, self.batch_pos)

    def save_state(self) -> None:
        """Write the resumable state at the current position (rank 0 only)."""
        if not self.main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "batch_pos": self.batch_pos,
            "iteration": self.iteration,
            "best_metric": self.best,
            "history": self.history,
            "wall_seconds": self.wall + (time.perf_counter() - self.started),
            "recipe": _recipe_record(self.recipe),
            **({"extra": self.extra_state()} if self.extra_state else {}),
        }
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)

    def step(self, train_set, batch: np.ndarray, lr: float) -> float:
        """One optimizer step on one global batch; the global batch's mean loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mine = distributed.shard(batch)
        images, target = collate(train_set, mine)
        self.optimizer.zero_grad(set_to_none=True)
        with distributed.local_batch(len(mine) / len(batch)):
            loss = heatmap_loss(self.net(images.to(self.device)), target.to(self.device))
        # DDP averages gradients over ranks; weighting each rank's mean loss by its share
        # of the global batch makes that average the global batch's mean-loss gradient.
        share = len(mine) * self.world / len(batch)
        (loss * share if self.world > 1 else loss).backward()
        self.optimizer.step()
        self.iteration += 1
        if self.world == 1:
            return float(loss.detach())
        return float(distributed.all_reduce(loss.detach() * len(mine))) / len(batch)

    def train_epoch(self, train_set) -> dict:
        """The rest of the current epoch, from `batch_pos`, saving the state every
        `checkpoint_every` steps; the epoch's history record (its mean training loss)."""
        recipe, epoch = self.recipe, self.epoch
        batches = epoch_batches(len(train_set), recipe.batch_size, recipe.seed, epoch)
        if self.world > 1:  # a rank without a sample cannot step with the others
            batches = [b for b in batches if len(b) >= self.world]
        self.model.train()
        running, seen = 0.0, 0
        bar = tqdm(total=len(batches), initial=self.batch_pos, desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   unit="batch", disable=not self.progress, leave=False)
        for b in range(self.batch_pos, len(batches)):
            running += self.step(train_set, batches[b], recipe.lr_at(epoch, b, len(batches)))
            seen += 1
            self.batch_pos = b + 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / seen:.5f}")
            if recipe.checkpoint_every and self.iteration % recipe.checkpoint_every == 0:
                self.save_state()
        bar.close()
        self.epoch, self.batch_pos = epoch + 1, 0
        return {"epoch": self.epoch, "lr": recipe.lr_at(epoch), "train_loss": running / max(seen, 1)}

    def validate(self, val_set, record: dict) -> None:
        """Score `val_set` into `record`; a new best is saved as BEST_FILE."""
        distributed.broadcast_buffers(self.model)  # every rank validates the BN statistics rank 0 saves
        # a diverging run scores NaN: recorded in the history, never saved as the best
        result = evaluate_landmarks(torch_infer(self.model), val_set, progress=self.progress,
                                    description="validate", allow_nonfinite=True)
        value = self.task.headline(result.metrics)
        record[self.history_key] = value
        if self.task.better(value, self.best):
            self.best = value
            if self.main:
                self.save_fn(self.model, self.out / BEST_FILE,
                             {**self.meta, "epoch": self.epoch, "val_metrics": result.metrics})
        self.model.train()

    def finish(self, val_set) -> TrainResult:
        """The last checkpoint (and a best one when nothing was validated) and the history file."""
        self.wall += time.perf_counter() - self.started
        out, meta = self.out, self.meta
        if self.main:
            self.save_fn(self.model, out / LAST_FILE, {**meta, "epoch": self.epoch})
            if val_set is None and not (out / BEST_FILE).exists():
                self.save_fn(self.model, out / BEST_FILE, {**meta, "epoch": self.epoch})
            write_atomic(out / HISTORY_FILE, json.dumps(self.history, indent=2) + "\n")
        distributed.barrier()  # every rank returns once the files exist
        return TrainResult(str(out), str(out / BEST_FILE), str(out / LAST_FILE), self.best, self.epoch,
                           self.history, round(self.wall, 1), self.task.metric, self.task.metric_key)


def _start_run(model: torch.nn.Module, train_set, val_set, recipe: TrainRecipe, out: Path, *, progress: bool,
               metadata: dict | None, save_fn: Callable | None, extra_state: Callable[[], dict] | None,
               sync_batchnorm: bool) -> _TrainingRun:
    """The run at its first step: output folder, checked model on its device, optimizer, metric."""
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    model = _prepare_model(model, train_set, recipe, sync_batchnorm)
    device = distributed.device()
    model.to(device)
    optimizer = torch.optim.RMSprop(
        model.parameters(), lr=recipe.lr, alpha=recipe.rmsprop_alpha, eps=recipe.rmsprop_eps
    )
    task = task_of_dataset(val_set if val_set is not None else train_set)
    return _TrainingRun(model, model, optimizer, recipe, task, out, device, distributed.world_size(), main,
                        progress and main, save_fn or save_checkpoint, dict(metadata or {}), extra_state,
                        best=task.worst)


def train(
    model: torch.nn.Module,
    train_set,
    val_set,
    recipe: TrainRecipe,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    metadata: dict | None = None,
    save_fn: Callable | None = None,
    extra_state: Callable[[], dict] | None = None,
    load_extra_state: Callable[[dict], None] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    sync_batchnorm: bool = False,
) -> TrainResult:
    """Train `model` on `train_set`, evaluate `val_set` every epoch (its task's metric: NME
    for faces, PCKh for pose), keep the best.

    `save_fn(model, path, metadata)` writes a user-facing checkpoint (default: our
    safetensors); QAT passes its own to store quantizer parameters too.

    Distributed (a process group is active): `recipe.batch_size` is the global batch;
    `sync_batchnorm` normalises with the global batch's statistics (GPUs only: PyTorch's
    SyncBatchNorm has no CPU kernel), as one process would.
    """
    run = _start_run(model, train_set, val_set, recipe, Path(out_dir), progress=progress, metadata=metadata,
                     save_fn=save_fn, extra_state=extra_state, sync_batchnorm=sync_batchnorm)
    if resume and run.state_path.is_file():
        run.resume(load_extra_state)
    # DDP after the resume: its construction broadcasts rank 0's (= the file's) weights and
    # buffers, and no rank writes a state before every rank has read this one.
    if run.world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    run.started = time.perf_counter()
    while run.epoch < recipe.epochs:
        if on_epoch_start:
            on_epoch_start(run.epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(run.epoch)
        record = run.train_epoch(train_set)
        if val_set is not None and (run.epoch % recipe.eval_every == 0 or run.epoch == recipe.epochs):
            run.validate(val_set, record)
        run.history.append(record)
        log.info("epoch %d: %s", run.epoch, ", ".join(f"{k}={v:.5g}" for k, v in record.items()
                                                       if k != "epoch"))
        run.save_state()
    return run.finish(val_set)
