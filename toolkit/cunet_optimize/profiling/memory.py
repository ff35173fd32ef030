"""Peak memory of inference: how much a runner's resident set grows while it runs.

psutil is not a dependency, so the numbers come from Linux's /proc/self/status:
VmRSS (resident now) and VmHWM (the resident high-water mark). The method:

1. in a fresh Python process (`cunet_optimize.profiling.memory.main`), import
   everything and make the input batch, so interpreter, libraries and input are
   in the baseline;
2. reset the high-water mark by writing "5" to /proc/self/clear_refs (Linux >= 4.0)
   and read VmRSS = baseline;
3. create the session / load the model, run `runs` inferences, read VmHWM = peak.

`inference_growth_bytes` = peak - baseline: weights, session/arena, activations and
the output. A fresh process per engine keeps one engine's freed-but-cached memory
from hiding the next one's growth. "inprocess" does steps 2-3 in the calling process
(fast, used by tests; less clean). Where the mark cannot be reset, the growth is
reported only if the peak rose above the previous mark (`hwm_reset` says which).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MEMORY_MODES = ("subprocess", "inprocess", "off")
SUBPROCESS_TIMEOUT_S = 600
_WORKER = "import sys; from cunet_optimize.profiling.memory import main; sys.exit(main())"


def read_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (ru_maxrss for VmHWM where /proc is missing)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024  # kB
    except OSError:
        pass
    if "VmHWM" not in out:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_in_this_process(make_runner: Callable, batch_size: int = 1, runs: int = 3) -> dict:
    """Steps 2-3 of the module docstring for the runner `make_runner()` returns."""
    from cunet_optimize.profiling.latency import example_batch

    batch = example_batch(batch_size)
    gc.collect()
    before = read_status()
    hwm_reset = reset_peak()
    baseline = read_status().get("VmRSS", before.get("VmRSS", 0))
    runner = make_runner()
    with runner:
        for _ in range(max(1, runs)):
            runner.infer(batch)
        peak = read_status()["VmHWM"]
    grew = hwm_reset or peak > before["VmHWM"]
    return {
        "batch_size": batch_size,
        "runs": max(1, runs),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "inference_growth_bytes": max(0, peak - baseline) if grew else None,
        "hwm_reset": hwm_reset,
    }


def _runner_factory(kind: str, path: str) -> Callable:
    if kind == "onnxruntime":
        from cunet_optimize.engines.onnxrt import OnnxRuntimeRunner

        return lambda: OnnxRuntimeRunner(path)
    if kind == "pytorch":
        from cunet_optimize.engines.base import TorchRunner
        from cunet_optimize.models import load_model

        # The checkpoint is loaded inside the measurement: weights are part of the growth.
        class _LoadingTorchRunner(TorchRunner):
            def activate_impl(self) -> None:
                self.model = load_model(path)
                super().activate_impl()

        return lambda: _LoadingTorchRunner(None)
    raise ValueError(f"unknown runner kind {kind!r}")


def method_description(mode: str) -> str:
    where = "a fresh Python process per variant" if mode == "subprocess" else "the profiling process"
    return (
        f"{where}: VmHWM after session creation + inference minus VmRSS before it "
        "(/proc/self/status; high-water mark reset via /proc/self/clear_refs)"
    )


def measure_peak_memory(kind: str, path: str | os.PathLike, batch_size: int = 1, runs: int = 3,
                        mode: str = "subprocess") -> dict | None:
    """Memory growth of inference for an ONNX Runtime build (`path` = session.json or its
    folder) or a PyTorch checkpoint; None when mode is "off" or the measurement failed
    (logged: memory is a side number, never a reason to lose the whole profile)."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}")
    if mode == "off":
        return None
    if mode == "inprocess":
        result = measure_in_this_process(_runner_factory(kind, str(path)), batch_size, runs)
    else:
        # -c, not -m: the package __init__ already imports this module (runpy would warn).
        cmd = [sys.executable, "-c", _WORKER, kind, str(path),
               "--batch-size", str(batch_size), "--runs", str(runs)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            log.warning("memory measurement of %s timed out after %d s", path, SUBPROCESS_TIMEOUT_S)
            return None
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            log.warning("memory measurement of %s failed: %s", path, tail)
            return None
        result = json.loads(lines[-1])
    result["method"] = method_description(mode)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="peak memory of one runner (used by `cunet-optimize profile`)")
    parser.add_argument("kind", choices=["onnxruntime", "pytorch"])
    parser.add_argument("path", help="ONNX Runtime build folder / session.json, or a PyTorch checkpoint")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if not Path(args.path).exists():
        print(f"not found: {args.path}", file=sys.stderr)
        return 2
    result = measure_in_this_process(_runner_factory(args.kind, args.path), args.batch_size, args.runs)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
