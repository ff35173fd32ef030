"""The held-out forward of `build --precision auto`: float and all-INT8 fake-quant models,
weights contiguous vs channels-last, activation fake quantization by torch's op vs the
inference path (quantizers.fake_quant_inference).

Calibrates as `build --precision int8` does (a temporary workdir), holds out the last
`--images` calibration images, and times one pass over them in batches of 32 for each
combination (best of `--repeats`, combinations alternating). torch's op is what ran before
the inference path existed: autograd stays enabled (nothing requires a gradient, so
nothing is recorded) and the quantizers take their autograd path.

    python bench/bench_heldout_forward.py [--model CKPT] [--images 64] [--repeats 2]
        --out bench/results/heldout_forward.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench_build_time import cpu_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from cunet_optimize.allocator import keep_freed_memory
    from cunet_optimize.atomic import write_atomic
    from cunet_optimize.pipeline.build import BuildOptions, StageTimer, quantize_and_calibrate
    from cunet_optimize.models import resolve_model
    from cunet_optimize.quant.auto import HeldOut
    from cunet_optimize.tasks import open_dataset_or_default, task_of_model

    keep_freed_memory()  # as the command line does
    model, ckpt, _, _ = resolve_model(args.model)
    calib_set, _ = open_dataset_or_default(None, "calib", task_of_model(model))
    n = len(calib_set)
    with tempfile.TemporaryDirectory(prefix="bench-heldout-") as workdir:
        opts = BuildOptions(model=args.model, workdir=workdir, calib_images=min(128, n - args.images))
        qmodel, _ = quantize_and_calibrate(replace(opts), model, ckpt, StageTimer(1, echo=lambda *_: None), False)
    heldout = HeldOut.load(calib_set, range(n - args.images, n))
    model.eval().requires_grad_(False)
    qmodel.eval().requires_grad_(False)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

    def one_pass(m, images, grad: bool) -> float:
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            for i in range(0, len(images), 32):
                m(images[i:i + 32])
        return time.perf_counter() - start

    cases = [("float", model, False)] + [("int8_fake_quant_" + path, qmodel, grad)
                                         for path, grad in (("torch_op", True), ("inference_path", False))]
    seconds: dict[str, float] = {}
    for _ in range(args.repeats):
        for layout, fmt in layouts.items():
            images = heldout.images.contiguous(memory_format=fmt)
            for name, m, grad in cases:
                m.to(memory_format=fmt)
                key = f"{name}/{layout}"
                seconds[key] = round(min(seconds.get(key, float("inf")), one_pass(m, images, grad)), 3)
                print(key, seconds[key], flush=True)
    result = {
        "model": args.model or "embedded default",
        "images": args.images,
        "machine": {"cpu_model": cpu_model(), "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads(), "load_average_end": round(os.getloadavg()[0], 2)},
        "torch": torch.__version__,
        "seconds_best_of_repeats": seconds,
    }
    write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
