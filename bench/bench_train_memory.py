"""Peak memory of one training step (forward + backward), memory-efficient vs plain.

Each mode runs in its own process so that the peak resident set size (ru_maxrss)
belongs to that mode alone; the baseline is the RSS after the model and the batch
exist, so the reported number is what the step itself adds. Also reports the bytes
autograd saves for backward (exact, allocator-independent).

    python bench/bench_train_memory.py [--model cunet-face-n8k1] [--batch 8] [--out bench/results/train_memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

from cunet_optimize.atomic import write_atomic


def one_step(model_name: str, batch: int, memory_efficient: bool, threads: int) -> dict:
    import torch

    from cunet_optimize import load_model

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = load_model(model_name, memory_efficient=memory_efficient).train()
    x = torch.rand(batch, 3, 256, 256)
    target = torch.rand(batch, model.config.num_classes, 64, 64)
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        heads = model(x)
    loss = sum(((h - target) ** 2).mean() for h in heads)
    loss.backward()
    elapsed = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "memory_efficient": memory_efficient,
        "step_peak_rss_mb": round((peak_kb - baseline_kb) / 1024, 1),
        "saved_for_backward_mb": round(saved / 2**20, 1),
        "step_seconds": round(elapsed, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cunet-face-n8k1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/train_memory.json")
    ap.add_argument("--child", choices=["plain", "efficient"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_step(args.model, args.batch, args.child == "efficient", args.threads)))
        return
    runs = {}
    for mode in ("plain", "efficient"):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
               "--threads", str(args.threads), "--child", mode]
        runs[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    import torch

    result = {
        "benchmark": "train_step_memory",
        "model": args.model,
        "batch": args.batch,
        "input": [3, 256, 256],
        "runs": runs,
        "ratio_peak_rss": round(runs["efficient"]["step_peak_rss_mb"] / runs["plain"]["step_peak_rss_mb"], 3),
        "ratio_saved_for_backward": round(
            runs["efficient"]["saved_for_backward_mb"] / runs["plain"]["saved_for_backward_mb"], 3),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "command": " ".join(["python", "bench/bench_train_memory.py", "--model", args.model,
                             "--batch", str(args.batch)]),
    }
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
