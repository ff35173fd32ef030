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
from cunet_optimize.tasks import task_of_dataset

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
    out = Path(out_dir)
    main = distributed.is_main()
    progress = progress and main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    save_fn = save_fn or save_checkpoint
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
    device = distributed.device()
    model.to(device)
    optimizer = torch.optim.RMSprop(
        model.parameters(), lr=recipe.lr, alpha=recipe.rmsprop_alpha, eps=recipe.rmsprop_eps
    )
    task = task_of_dataset(val_set if val_set is not None else train_set)
    history_key = "val_" + task.metric_key.removesuffix("_percent")  # val_nme, val_pckh
    epoch, batch_pos, iteration = 0, 0, 0
    best, history, wall = task.worst, [], 0.0
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("recipe") != json.loads(json.dumps(asdict(recipe))):
            raise CUNetError(
                f"{state_path}: saved by a run with another recipe; use a new --out folder "
                "or the same options to resume"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, batch_pos, iteration = state["epoch"], state["batch_pos"], state["iteration"]
        best, history, wall = state.get("best_metric", state.get("best_nme")), state["history"], state["wall_seconds"]
        if load_extra_state and "extra" in state:
            load_extra_state(state["extra"])
        log.info("resuming %s at epoch %d, batch %d", out, epoch, batch_pos)
    # DDP after the resume: its construction broadcasts rank 0's (= the file's) weights and
    # buffers, and no rank writes a state before every rank has read this one.
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def save_state(e: int, b: int) -> None:
        if not main:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": e,
            "batch_pos": b,
            "iteration": iteration,
            "best_metric": best,
            "history": history,
            "wall_seconds": wall + (time.perf_counter() - started),
            "recipe": json.loads(json.dumps(asdict(recipe))),
            **({"extra": extra_state()} if extra_state else {}),
        }
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)

    started = time.perf_counter()
    meta = dict(metadata or {})
    while epoch < recipe.epochs:
        if on_epoch_start:
            on_epoch_start(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        batches = epoch_batches(len(train_set), recipe.batch_size, recipe.seed, epoch)
        if world > 1:  # a rank without a sample cannot step with the others
            batches = [b for b in batches if len(b) >= world]
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(total=len(batches), initial=batch_pos, desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   unit="batch", disable=not progress, leave=False)
        for b in range(batch_pos, len(batches)):
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(epoch, b, len(batches))
            mine = distributed.shard(batches[b])
            images, target = collate(train_set, mine)
            optimizer.zero_grad(set_to_none=True)
            with distributed.local_batch(len(mine) / len(batches[b])):
                loss = heatmap_loss(net(images.to(device)), target.to(device))
            # DDP averages gradients over ranks; weighting each rank's mean loss by its share
            # of the global batch makes that average the global batch's mean-loss gradient.
            share = len(mine) * world / len(batches[b])
            (loss * share if world > 1 else loss).backward()
            optimizer.step()
            iteration += 1
            running += (float(loss.detach()) if world == 1
                        else float(distributed.all_reduce(loss.detach() * len(mine))) / len(batches[b]))
            seen += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / seen:.5f}")
            if recipe.checkpoint_every and iteration % recipe.checkpoint_every == 0:
                save_state(epoch, b + 1)
        bar.close()
        epoch += 1
        batch_pos = 0
        record = {"epoch": epoch, "lr": recipe.lr_at(epoch - 1), "train_loss": running / max(seen, 1)}
        if val_set is not None and (epoch % recipe.eval_every == 0 or epoch == recipe.epochs):
            distributed.broadcast_buffers(model)  # every rank validates the BN statistics rank 0 saves
            # a diverging run scores NaN: recorded in the history, never saved as the best
            result = evaluate_landmarks(torch_infer(model), val_set, progress=progress,
                                        description="validate", allow_nonfinite=True)
            value = task.headline(result.metrics)
            record[history_key] = value
            if task.better(value, best):
                best = value
                if main:
                        save_fn(model, out / BEST_FILE, {**meta, "epoch": epoch, "val_metrics": result.metrics})
            model.train()
        history.append(record)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.5g}" for k, v in record.items()
                                                   if k != "epoch"))
        save_state(epoch, 0)
    wall += time.perf_counter() - started
    if main:
        save_fn(model, out / LAST_FILE, {**meta, "epoch": epoch})
        if val_set is None and not (out / BEST_FILE).exists():
            save_fn(model, out / BEST_FILE, {**meta, "epoch": epoch})
        write_atomic(out / HISTORY_FILE, json.dumps(history, indent=2) + "\n")
    distributed.barrier()  # every rank returns once the files exist
    return TrainResult(str(out), str(out / BEST_FILE), str(out / LAST_FILE), best, epoch,
                       history, round(wall, 1), task.metric, task.metric_key)
