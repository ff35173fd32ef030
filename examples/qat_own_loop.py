"""QAT in your own training loop, then a CPU engine, with the cunet_optimize Python API.

    your DataLoader -> quantize -> a few QAT steps (your optimizer) -> save_quantized -> build
    -> load_engine -> evaluate

Runs on the embedded default model and a small synthetic face set it writes into the workdir
(48 faces: 32 to train and calibrate on, 16 to test) in well under a minute on 2 cores:

    python examples/qat_own_loop.py [--data 300W_FOLDER] [--workdir OUT] [--steps 3]

`--data` takes a 300-W layout folder (images with .pts files, train.txt and test.txt lists): its
train list feeds the loop and the calibration, its test list the accuracy gate and the evaluation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import cunet_optimize as co
from cunet_optimize.data.face300w import Face300W
from cunet_optimize.data.synth import write_synthetic_faces
from cunet_optimize.quant import freeze_bn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="300-W layout folder (default: the synthetic default set)")
    parser.add_argument("--workdir", type=Path, default=Path("qat-example"), help="engines/ and calib/ go here")
    parser.add_argument("--images", type=int, default=16, help="calibration images")
    parser.add_argument("--steps", type=int, default=3, help="QAT steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    start = time.perf_counter()
    data = args.data
    if data is None:  # as `cunet-optimize data synth --count 48` writes it (seed 1: faces the model never saw)
        data = args.workdir / "faces"
        if not data.is_dir():
            write_synthetic_faces(data, 48, seed=1, test_fraction=1 / 3, progress=False)

    # Your own data pipeline: any DataLoader of image batches (here dicts with "image" and "heatmaps").
    loader = DataLoader(Face300W(data, split="train", augment=True, seed=0), batch_size=args.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    model = co.load_model()  # the embedded default model; or co.load_model("my.safetensors")

    # The scheme, equalization and calibration of `cunet-optimize build --precision int8 --target cpu`.
    qmodel = co.quantize(model, "int8", loader, target="cpu", images=args.images)
    print(f"quantized: {qmodel.scheme.spec}, calibrated on {args.images} training images of {data}")

    # A few QAT steps: an ordinary PyTorch loop (straight-through gradients through the fake quantizers).
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=args.lr)
    qmodel.train()
    freeze_bn(qmodel)  # BatchNorm statistics stay as trained: the scales were calibrated on them
    for step, batch in zip(range(args.steps), loader):
        heads = qmodel(batch["image"])
        loss = sum(F.mse_loss(h, batch["heatmaps"]) for h in heads)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"QAT step {step + 1}/{args.steps}: heatmap loss {loss.item():.6f}")

    # The file `cunet-optimize build --qat` reads, then the same build in Python.
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = co.save_quantized(qmodel, args.workdir / "qat.safetensors", force=True)
    print(f"saved {checkpoint} (cunet-optimize build --precision int8 --qat {checkpoint})")
    report = co.build(qmodel, precision="int8", target="cpu", eval_data=data, eval_split="test", workdir=args.workdir,
                      name="qat-example-int8-cpu", force=True)
    gate = report.accuracy
    print(f"built {report.path}: {gate['metric']} {gate['quantized_value']:.3f}% vs FP32 "
          f"{gate['reference_value']:.3f}% ({gate['degradation_points']:+.3f} points, gate {gate['tolerance']}: "
          f"{'pass' if gate['passed'] else 'FAIL'})")

    # Run the engine (build.json's hashes are checked first) and score it as `cunet-optimize eval` does.
    with co.load_engine(report.path) as engine:
        images = next(iter(loader))["image"][:2]
        out = engine.infer({"image": images})
        print(f"engine outputs: heatmaps {out['heatmaps'].shape}, landmarks {out['landmarks'].shape}")
        engine_metrics = co.evaluate(engine, data, split="test")
    float_metrics = co.evaluate(model, data, split="test")
    print(f"test NME: engine {engine_metrics['nme_percent']:.3f}%, FP32 PyTorch {float_metrics['nme_percent']:.3f}% "
          f"({engine_metrics['count']} images); {time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main()
