"""Many processes, one result: torchrun/SLURM detection, the process group, shards, reductions.

`train`, `qat`, `eval` and calibration run under `torchrun --nproc_per_node N` (or one
SLURM task per GPU) and give what one process gives: gradients are averaged by
DistributedDataParallel, statistics are combined with torch.distributed collectives
(all_reduce, all_gather_object, broadcast); nothing else travels between processes.
Without launcher variables (one process) every helper here is the identity and no
process group exists, so single-process runs are what they always were.

Rank 0 alone writes files, logs and progress; the other ranks compute and wait.

Two ways to run a command over the ranks. `train`, `qat` and `eval` run the same code on
every rank (each takes its part of the work where the code asks for it). `build` is led by
rank 0 (`leading_the_others` / `follow_rank_0`): rank 0 runs the build; the others serve
its requests (`on_every_rank`: calibration and evaluation, the steps worth sharing) and
write nothing. A failure on any rank stops every rank with one line (`JobFailed`) rather
than leaving the others waiting in a collective.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from cunet_optimize.launch import Launch, detect_launch  # noqa: F401  (torch-free: the CLI reads it first)
from cunet_optimize.errors import CUNetError

log = logging.getLogger(__name__)
T = TypeVar("T")




def backend_for_machine() -> str:
    """nccl where there are GPUs, gloo on CPUs."""
    return "nccl" if torch.cuda.is_available() else "gloo"


# How long a rank may wait in one collective in a command led by rank 0: the others wait
# while rank 0 exports, runs surgery and builds the engine alone (a TensorRT INT8 engine of a
# deep model takes tens of minutes), longer than the default (10 minutes on nccl, 30 on gloo).
LED_COMMAND_TIMEOUT = timedelta(hours=4)


@contextmanager
def process_group(launch: Launch | None = None, timeout: timedelta | None = None) -> Iterator[Launch]:
    """Join the job's process group for the block (env:// rendezvous), leave it afterwards;
    `timeout` bounds a collective (None: PyTorch's default). One process, or a group that
    already exists (tests, a caller's own): nothing to do."""
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
    dist.init_process_group(backend, init_method="env://", **({"timeout": timeout} if timeout else {}))
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


# --------------------------------------------------------------------------------------
# Failures: every rank stops, rank 0 says why


class JobFailed(CUNetError):
    """Raised on every rank when one rank failed: rank 0 prints it, the others exit with the
    same status and print nothing (the CLI), so a failure is one line, not one per rank."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if isinstance(exc, CUNetError) else f"{type(exc).__name__}: {line}".rstrip(": ")


def agreed(compute: Callable[[], T]) -> T:
    """compute() on this rank, then a check that it succeeded on every rank: a failure
    anywhere raises JobFailed on all ranks (naming the rank), so none goes on to a collective
    the failed rank will never join. Every rank must call it at the same point."""
    try:
        result, error = compute(), None
    except Exception as exc:  # reported to every rank below; the traceback stays chained here
        result, error = None, exc
    if not is_active():
        if error is not None:
            raise error
        return result
    failures = all_gather_objects(None if error is None else _one_line(error))
    for r, failure in enumerate(failures):
        if failure is not None:
            if isinstance(error, JobFailed):
                raise error
            raise JobFailed(failure if failure.startswith("rank ") else f"rank {r}: {failure}") from error
    return result


# --------------------------------------------------------------------------------------
# Jobs led by rank 0 (`build`): rank 0 runs the command, the others serve its requests

_in_request = [False]  # rank 0 is inside an on_every_rank call: the ranks' collectives are interleaved


def on_every_rank(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Rank 0, leading: run fn(*args, **kwargs) on every rank (the others are in follow_rank_0)
    and return rank 0's result. fn must be a module-level function and its arguments
    picklable; it shares its work with collectives of its own (sharded calibration, sharded
    evaluation). In one process: fn(*args, **kwargs)."""
    if not is_active():
        return fn(*args, **kwargs)
    broadcast_object(("run", fn, args, kwargs))
    _in_request[0] = True
    try:
        return fn(*args, **kwargs)
    except dist.DistError as exc:  # another rank went away mid-request; it said why
        raise JobFailed(f"another process stopped during {fn.__name__} ({_one_line(exc)}); see its message") from exc
    finally:
        _in_request[0] = False


@contextmanager
def leading_the_others() -> Iterator[None]:
    """Rank 0's side of a led command: when the block ends, the others are released (exit 0),
    or told that it failed (they stop with the same status; rank 0 prints the error)."""
    if not is_active():
        yield
        return
    try:
        yield
    except JobFailed:  # every rank raised it already
        raise
    except BaseException as exc:
        if not _in_request[0]:  # the others wait for the next request: tell them
            broadcast_object(("failed", _one_line(exc)))
        # else they are inside a collective of the request: this process's exit ends it
        # (gloo: the connection closes; torchrun stops every process once one fails)
        _in_request[0] = False
        raise
    broadcast_object(("done",))


def follow_rank_0() -> int:
    """A rank other than 0 in a led command: run rank 0's requests until it is done (0) or
    failed (JobFailed). Nothing here writes files."""
    while True:
        try:
            message = broadcast_object(None)
        except dist.DistError as exc:  # rank 0 went away
            raise JobFailed(f"rank 0 stopped ({_one_line(exc)})") from exc
        kind = message[0]
        if kind == "done":
            return 0
        if kind == "failed":
            raise JobFailed(message[1])
        _, fn, args, kwargs = message
        try:
            fn(*args, **kwargs)
        except dist.DistError as exc:  # another rank went away mid-request; it said why
            raise JobFailed(f"another process stopped during {fn.__name__}") from exc
