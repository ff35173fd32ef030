"""Latency and throughput of a runner, reported the way trtexec and MMDeploy users read them.

`latency_stats` is the pure part (a list of per-call times -> median, p90, p95, p99,
mean, min, max in milliseconds and images per second); `measure_latency` times one
batch size on an active runner and `batch_sweep` repeats it over several.

Times are the runner's own `inference_time` (the backend call only: no input checks,
no Python-side copies), so PyTorch and ONNX Runtime are timed at the same boundary.
Percentiles use numpy's linear interpolation between order statistics; throughput is
images / total measured time, i.e. batch_size / mean latency, as trtexec reports it.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from cunet_optimize.engines.base import IMAGE_CHW, Runner
from cunet_optimize.errors import CUNetError

PERCENTILES = (50, 90, 95, 99)


def latency_stats(times_s: Sequence[float], batch_size: int = 1) -> dict:
    """Summary of per-call wall times (seconds) of `batch_size`-image batches."""
    t = np.asarray(times_s, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise CUNetError("no latency samples: run at least one timed inference (runs >= 1)")
    if batch_size < 1:
        raise CUNetError(f"batch size must be >= 1, got {batch_size}")
    ms = t * 1000.0
    p50, p90, p95, p99 = np.percentile(ms, PERCENTILES)
    mean = float(ms.mean())
    return {
        "batch_size": int(batch_size),
        "runs": int(t.size),
        "median_ms": float(p50),
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": mean,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "std_ms": float(ms.std()),
        "per_image_ms": mean / batch_size,
        "throughput_ips": batch_size * 1000.0 / mean if mean > 0 else math.inf,
    }


def example_batch(batch_size: int, seed: int = 0) -> np.ndarray:
    """A fixed random batch in [0, 1): latency does not depend on pixel values, but repeats should."""
    return np.random.default_rng(seed).random((batch_size, *IMAGE_CHW), dtype=np.float32)


def measure_latency(
    runner: Runner,
    batch_size: int = 1,
    warmup: int = 10,
    runs: int = 50,
    min_seconds: float = 0.0,
    progress: bool = False,
    description: str | None = None,
) -> dict:
    """Time `runs` inferences (and more until `min_seconds` of timed work) after `warmup`.

    Like trtexec's --iterations / --duration: both minimums must be met. The runner
    must be active (inside `with runner:`).
    """
    if runs < 1 or warmup < 0 or min_seconds < 0:
        raise CUNetError(
            f"latency: need runs >= 1, warmup >= 0, min_seconds >= 0 (got {runs}, {warmup}, {min_seconds})"
        )
    batch = example_batch(batch_size)
    desc = description or f"{runner.name} b{batch_size}"
    times: list[float] = []
    with tqdm(total=warmup + runs, desc=desc, unit="run", disable=not progress, leave=False) as bar:
        for _ in range(warmup):
            runner.infer(batch)
            bar.update()
        start = time.perf_counter()
        while len(times) < runs or time.perf_counter() - start < min_seconds:
            runner.infer(batch)
            times.append(runner.inference_time)
            if len(times) <= runs:
                bar.update()
    stats = latency_stats(times, batch_size)
    stats["warmup"] = int(warmup)
    return stats


def sweep_runs(runs: int, batch_size: int, floor: int = 5) -> int:
    """Timed runs for a batch size in a sweep: about the same number of images per size."""
    return max(min(floor, runs), math.ceil(runs / batch_size))


def batch_sweep(
    runner: Runner,
    sizes: Sequence[int] = (1, 2, 4, 8),
    warmup: int = 10,
    runs: int = 50,
    min_seconds: float = 0.0,
    progress: bool = False,
) -> list[dict]:
    """`measure_latency` for each batch size; larger batches get proportionally fewer runs.

    A runner whose input has a fixed batch dimension is measured at that size only.
    """
    fixed = runner.input_shape[0] if runner.input_shape else None
    sizes = [fixed] if fixed is not None else sorted({int(s) for s in sizes})
    if not sizes or min(sizes) < 1:
        raise CUNetError(f"batch sizes must be positive integers, got {list(sizes)}")
    results = []
    for size in sizes:
        results.append(
            measure_latency(
                runner,
                batch_size=size,
                warmup=max(1, math.ceil(warmup / size)) if warmup else 0,
                runs=sweep_runs(runs, size),
                min_seconds=min_seconds,
                progress=progress,
                description=f"{runner.name} b{size}",
            )
        )
    return results
