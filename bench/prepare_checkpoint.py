"""Write one of the authors' configurations as a checkpoint users could bring: random
weights (seeded) with BatchNorm statistics re-estimated on synthetic faces
(synthetic poses for a 16-joint model; models/batchnorm.py says why), in our safetensors
format.

    python bench/prepare_checkpoint.py cunet-face-n8k1 --out n8.safetensors
    python bench/prepare_checkpoint.py cunet-pose-n16k1 --out pose.safetensors \
        --set num_unets=2 width=32 growth_rate=16 num_heads=2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from cunet_optimize import load_model
from cunet_optimize.data.synth import verification_batch
from cunet_optimize.models import save_checkpoint
from cunet_optimize.models.batchnorm import reestimate_batchnorm


def pose_images(count: int) -> np.ndarray:
    from cunet_optimize.data.synth_pose import synth_pose

    images = [np.asarray(synth_pose(0, i)[0], dtype=np.float32) for i in range(count)]
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2) / np.float32(255.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a registered configuration (cunet-optimize models)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="configuration overrides")
    parser.add_argument("--images", type=int, default=64, help="synthetic images for the BN statistics")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    torch.manual_seed(args.seed)
    model = load_model(args.name, **overrides)
    model = reestimate_batchnorm(model, pose_images(args.images) if model.config.num_classes == 16
                                 else verification_batch(args.images))
    save_checkpoint(model, args.out, {"prepared_by": "bench/prepare_checkpoint.py", "source": args.name,
                                      "overrides": overrides, "bn_images": args.images, "seed": args.seed})
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": args.out, "config": model.config.to_dict(), "parameters": params}))


if __name__ == "__main__":
    main()
