"""Accuracy of every quantization scheme on one model, simulated in PyTorch (fake quant).

Rows: FP32; INT8 PTQ for each calibration method, with Q/DQ on conv inputs only
(the default), scales tied across the dense concatenations and untied (with the
requantization points each form leaves), each after activation equalization (the
default), plus conv-inputs-only without it; INT4-weight PTQ with and without it;
QAT for INT8, INT4 and binary weights (w1a8); weight bytes of each.

    python bench/bench_quant_table.py --data DIR [--model CKPT] [--qat-images N]
        [--out bench/results/quant_table.json]

DIR is a 300-W layout folder with train.txt (calibration + QAT) and test.txt
(evaluation), e.g. `cunet-optimize data synth --out DIR --count 3000 --seed 0
--test-fraction 0.1`, the embedded default model's training set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from cunet_optimize.atomic import write_atomic
from cunet_optimize.data.face300w import Face300W, FirstSamples
from cunet_optimize.evaluation import evaluate_landmarks, torch_infer
from cunet_optimize.models import load_model
from cunet_optimize.quant import parse_precision, post_training_quantize, requantization_points
from cunet_optimize.quant.policy import DEFAULT_EQUALIZE_ALPHA, equalize_alpha_for, quant_scheme
from cunet_optimize.quant.qat import load_qat_checkpoint, qat_recipe, run_qat
from cunet_optimize.tasks import calibration_batches
from cunet_optimize.train.loop import TrainRecipe


def weight_bits(quantizer) -> int:
    name = type(quantizer).__name__
    if name.startswith("Binary"):
        return 1
    if name.startswith("Ternary"):
        return 2
    return getattr(quantizer, "num_bits", 32)


def weight_bytes(model) -> int:
    """Conv weights at their quantizer's bit width plus one fp32 scale per output channel
    (or block); every other parameter (BatchNorm, float convs) in fp32."""
    total = 0
    for module in model.modules():
        q = getattr(module, "weight_quantizer", None)
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and q is not None:
                scales = q.scale.numel() if torch.is_tensor(getattr(q, "scale", None)) else p.shape[0]
                total += (p.numel() * weight_bits(q) + 7) // 8 + 4 * scales
            elif not hasattr(module, "is_weight") and "Quantizer" not in type(module).__name__:
                total += 4 * p.numel()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--methods", default="max,percentile,entropy,mse")
    ap.add_argument("--concat-forms", default="none,tied,untied",
                    help="Q/DQ on the dense concatenations (build --concat-qdq)")
    ap.add_argument("--equalize", type=float, default=DEFAULT_EQUALIZE_ALPHA, help="equalization alpha")
    ap.add_argument("--qat-images", type=int, default=0, help="first N training images (0: all)")
    ap.add_argument("--qat-epochs", type=int, default=None, help="default: the scheme's QAT schedule")
    ap.add_argument("--qat-lr", type=float, default=None, help="default: the scheme's QAT schedule")
    ap.add_argument("--skip-qat", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/quant_table.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    test = Face300W(args.data, split="test")
    train = Face300W(args.data, split="train")
    rows = []
    load_start = os.getloadavg()[0]

    def write(complete: bool) -> None:
        """The JSON so far: a long run stopped early keeps the rows it finished."""
        result = {"benchmark": "quant_table", "model": args.model or "embedded default", "data": args.data,
                  "test_images": len(test), "runtime": "PyTorch fake quantization, CPU", "rows": rows,
                  "complete": complete, "load_average_1min_start_now": [round(load_start, 2),
                                                                        round(os.getloadavg()[0], 2)],
                  "environment": {"torch": torch.__version__, "python": platform.python_version(),
                                  "threads": args.threads},
                  "command": "python " + " ".join(sys.argv)}
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")

    def evaluate(name, m, scheme, **extra):
        start = time.perf_counter()
        metrics = evaluate_landmarks(torch_infer(m), test, progress=False).metrics
        row = {"variant": name, "nme_percent": round(metrics["nme_percent"], 4),
               "fr_0.08_percent": round(metrics["failure_rate_0.08_percent"], 3),
               "auc_0.08_percent": round(metrics["auc_0.08_percent"], 3),
               "weight_bytes": weight_bytes(m), **extra,
               "eval_seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(complete=False)

    evaluate("fp32", model, None)
    calib = list(calibration_batches(train, args.calib_images))

    def ptq(spec, method, alpha, concat_qdq="none"):
        scheme = quant_scheme(spec, concat_qdq)
        q, _, _ = post_training_quantize(model, scheme, calib, method, alpha, progress=False)
        return q.eval(), scheme

    best = None
    for method in args.methods.split(","):
        for form, alpha in [(f, args.equalize) for f in args.concat_forms.split(",")] + [("none", None)]:
            q, scheme = ptq("int8", method, alpha, form)
            eq = "equalized" if alpha is not None else "not equalized"
            evaluate(f"int8 PTQ {method} concat-qdq={form} {eq}", q, scheme, method=method, concat_qdq=form,
                     equalize_alpha=alpha, requantization_points=requantization_points(q))
            if form == "none" and alpha is not None and (best is None or rows[-1]["nme_percent"] < best[1]):
                best = (method, rows[-1]["nme_percent"])
    for spec in ("int4-convin", "int4-pc-convin"):
        for alpha in (args.equalize, None):
            q, scheme = ptq(spec, best[0], alpha)
            eq = "equalized" if alpha is not None else "not equalized"
            evaluate(f"{spec} PTQ {best[0]} {eq}", q, scheme, method=best[0], equalize_alpha=alpha)
    if not args.skip_qat:
        original = TrainRecipe(epochs=10, lr=1e-3, batch_size=16, checkpoint_every=0)
        for spec in ("int8-convin", "int8", "int4-convin", "w1a8"):
            scheme = parse_precision(spec)
            recipe = qat_recipe(original, scheme, epochs=args.qat_epochs, lr=args.qat_lr)
            images = Face300W(args.data, split="train", augment=True)
            if args.qat_images:
                images = FirstSamples(images, args.qat_images)
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                run_qat(model, scheme, images, None, calib, recipe, out, calib_method=best[0],
                        equalize_alpha=equalize_alpha_for(scheme), progress=False)
                q = load_qat_checkpoint(Path(out) / "last.safetensors")
                evaluate(f"{spec} QAT", q, scheme, equalize_alpha=equalize_alpha_for(scheme),
                         qat_images=len(images), qat_epochs=recipe.epochs,
                         qat_lr=recipe.lr, qat_seconds=round(time.perf_counter() - start, 1))
    write(complete=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
