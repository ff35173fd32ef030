"""Many processes, one result: torchrun/SLURM detection, the process group, shards, reductions.

`train`, `qat`, `eval` and calibration run under `torchrun --nproc_per_node N` (or one
SLURM task per GPU) and give what one process gives: gradients are averaged by
DistributedDataParallel, statistics are combined with torch.distributed collectives
(all_reduce, all_gather_object, broadcast); nothing else travels between processes.
Without launcher variables (one process) every helper here is the identity and no
process group exists, so single-process runs are what they always were.

Rank 0 alone writes files, logs and progress; the other ranks compute and wait.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from cunet_optimize.launch import Launch, detect_launch  # noqa: F401  (torch-free: the CLI reads it first)

log = logging.getLogger(__name__)




def backend_for_machine() -> str:
    """nccl where there are GPUs, gloo on CPUs."""
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def process_group(launch: Launch | None = None) -> Iterator[Launch]:
    """Join the job's process group for the block (env:// rendezvous), leave it afterwards.
    One process, or a group that already exists (tests, a caller's own): nothing to do."""
    launch = launch or detect_launch()
    if not launch.distributed or dist.is_initialized():
        yield launch
        return
    if launch.launcher == "slurm":  # env:// reads torchrun's names
        os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                          LOCAL_RANK=str(launch.local_rank))
    backend = backend_for_machine()
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(backend, init_method="env://")
    try:
        yield launch
    finally:
        dist.destroy_process_group()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and progress."""
    return rank() == 0


def backend() -> str | None:
    return dist.get_backend() if is_active() else None


def device() -> torch.device:
    """Where this rank computes: its GPU under nccl, else the CPU (single-process runs: the CPU)."""
    if is_active() and backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe() -> str:
    """The line a distributed run states first, e.g. 'distributed: 2 processes, gloo'."""
    return f"distributed: {world_size()} processes, {backend()}" if is_active() else "distributed: 1 process"


def summary(sync_batchnorm: bool = False) -> dict:
    """What a result records about the processes that made it."""
    return {"world_size": world_size(), "backend": backend(),
            "sync_batchnorm": bool(sync_batchnorm and is_active())}


def barrier() -> None:
    if is_active():
        dist.barrier()


# --------------------------------------------------------------------------------------
# Shards: contiguous, as even as possible, rank order = global order


def shard_bounds(count: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[lo, hi) of this rank's part of `count` items (the first count % world ranks get one more)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(count, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def shard(items, rank_: int | None = None, world: int | None = None):
    """This rank's contiguous part of a sequence, array or batch tensor (all of it in one process)."""
    lo, hi = shard_bounds(len(items), rank_, world)
    return items[lo:hi]


# The fraction of the global batch this rank's current forward pass holds (1 in one
# process); the training loop sets it per step, LSQ's gradient scale reads it.
_LOCAL_BATCH_FRACTION = [1.0]


@contextmanager
def local_batch(fraction: float) -> Iterator[None]:
    """Within the block, this rank's activations are `fraction` of the global batch."""
    previous = _LOCAL_BATCH_FRACTION[0]
    _LOCAL_BATCH_FRACTION[0] = fraction
    try:
        yield
    finally:
        _LOCAL_BATCH_FRACTION[0] = previous


def local_batch_fraction() -> float:
    return _LOCAL_BATCH_FRACTION[0]


# --------------------------------------------------------------------------------------
# Reductions (identity in one process)


def _on_comm_device(t: torch.Tensor) -> torch.Tensor:
    return t.to(device()) if backend() == "nccl" else t


def all_reduce(value: torch.Tensor | np.ndarray | float | int, op: str = "sum"):
    """Sum or max of `value` over ranks, returned as the same kind of value."""
    if not is_active():
        return value
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if isinstance(value, torch.Tensor):
        t = _on_comm_device(value.detach().clone())
        dist.all_reduce(t, ops[op])
        return t.to(value.device)
    if isinstance(value, np.ndarray):
        t = _on_comm_device(torch.from_numpy(np.ascontiguousarray(value)).clone())
        dist.all_reduce(t, ops[op])
        return t.cpu().numpy()
    t = _on_comm_device(torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.int64))
    dist.all_reduce(t, ops[op])
    return type(value)(t.item())


def all_gather_objects(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in one process)."""
    if not is_active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm running statistics, fixed quantizer
    scales): without SyncBatchNorm each rank's BN drifts on its own shard."""
    if not is_active():
        return
    for b in module.buffers():
        t = _on_comm_device(b)
        dist.broadcast(t, src)
        if t is not b:
            b.copy_(t)
