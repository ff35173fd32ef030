"""Wall time of one QAT epoch with 1 and with N processes (torchrun, gloo on CPUs, nccl on GPUs).

    python bench/bench_ddp_qat_epoch.py [--images 96] [--procs 2]

Runs `cunet-optimize qat` on the embedded model over the first --images calibration-split
images of the synthetic set (1 epoch, batch 16, no validation), once in one process (all
cores as torch threads) and once under torchrun (one thread per process), and writes the
loop's wall seconds, the process's and the final training loss to
bench/results/ddp_qat_epoch.json. On a CPU the point is that both agree; the speed-up
belongs to GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cunet_optimize.data.default_set import ensure_default_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "ddp_qat_epoch.json"


def run(command: list[str], env: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    data = ensure_default_dataset(progress=False)
    qat = ["qat", "--data", str(data), "--split", "calib", "--precision", "int8", "--epochs", "1",
           "--train-images", str(args.images), "--batch-size", "16", "--calib-images", "32", "--val-split", "none",
           "--checkpoint-every", "0", "--json"]
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, args.procs):
            launcher = ([sys.executable, "-m", "cunet_optimize.cli"] if procs == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                         "-m", "cunet_optimize.cli"])
            threads = max(1, cores // procs)
            summary, total = run([*launcher, *qat, "--threads", str(threads), "--out", f"{tmp}/p{procs}"], env)
            rows.append({"processes": procs, "threads_per_process": threads, "epoch_wall_seconds": summary["wall_seconds"],
                         "command_wall_seconds": round(total, 1), "train_loss": summary["history"][-1]["train_loss"],
                         "distributed": summary["distributed"]})
            print(rows[-1])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"images": args.images, "cores": cores, "runs": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
