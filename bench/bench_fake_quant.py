"""Per-tensor activation fake quantization without autograd: torch's op vs ours.

torch.fake_quantize_per_tensor_affine also computes the mask its backward would use;
`quantizers.fake_quant_inference` (what every fake-quant model runs without autograd)
computes the same values in one new tensor updated in place. Times the two on one
activation shape (best of `--repeats`), checks they are equal bit for bit, records the CPU.

    python bench/bench_fake_quant.py [--shape 32 128 64 64] [--repeats 7]
        [--out bench/results/fake_quant_inference.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from bench_build_time import cpu_model


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[32, 128, 64, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="bench/results/fake_quant_inference.json")
    args = ap.parse_args()

    import torch

    from cunet_optimize.atomic import write_atomic
    from cunet_optimize.quant.quantizers import fake_quant_inference

    x = torch.randn(*args.shape, generator=torch.Generator().manual_seed(0)) * 3
    scale = torch.tensor(0.05)
    zero = torch.zeros((), dtype=torch.int32)
    with torch.inference_mode():
        op = torch.fake_quantize_per_tensor_affine(x, scale, zero, -128, 127)
        equal = torch.equal(op, fake_quant_inference(x, scale, -128, 127))
        result = {
            "shape": args.shape,
            "machine": {"cpu_model": cpu_model(), "platform": platform.platform(),
                        "torch_threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2)},
            "torch": torch.__version__,
            "torch_op_ms": best_ms(lambda: torch.fake_quantize_per_tensor_affine(x, scale, zero, -128, 127),
                                   args.repeats),
            "inference_path_ms": best_ms(lambda: fake_quant_inference(x, scale, -128, 127), args.repeats),
            "copy_ms": best_ms(x.clone, args.repeats),  # the memory-bound floor: one read, one write
            "bit_equal": equal,
        }
    print(json.dumps(result, indent=1))
    write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
