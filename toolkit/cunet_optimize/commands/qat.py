"""`cunet-optimize qat`: quantization-aware fine-tuning from calibrated scales."""

from __future__ import annotations

import json
from collections import Counter

import torch

from cunet_optimize.pipeline.build import DEFAULT_CALIB_IMAGES, DEFAULT_CALIB_METHOD, DEFAULT_PRECISION
from cunet_optimize.commands.common import non_negative_int, positive_float, positive_int
from cunet_optimize.commands.common import (add_concat_qdq_argument, add_equalize_arguments, add_face_data_arguments,
                                            add_model_argument, data_task, print_json, task_dataset)
from cunet_optimize.data.face300w import FirstSamples
from cunet_optimize.distributed import summary as distributed_summary
from cunet_optimize.errors import CUNetError
from cunet_optimize.models import resolve_model
from cunet_optimize.quant.calibrate import METHODS
from cunet_optimize.quant.policy import AUTO, equalize_alpha_for, precision_argument, quant_scheme
from cunet_optimize.quant.qat import qat_recipe, run_qat
from cunet_optimize.tasks import calibration_batches
from cunet_optimize.train.loop import TrainRecipe


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("qat", help="quantization-aware fine-tuning (short schedule, resumable)")
    add_model_argument(p)
    p.add_argument("--precision", default=DEFAULT_PRECISION, type=precision_argument(words=(AUTO,)),
                   help="int8[-convin|-tied|-untied], int4[-b<N>|-pc][-wo], the paper's w1a8, w2a8g8, ..., "
                        "auto with --plan (default int8)")
    add_face_data_arguments(p, split_default="train")
    p.add_argument("--val-split", default="test")
    p.add_argument("--train-images", type=positive_int, default=None, help="use only the first N training images")
    p.add_argument("--out", required=True, help="run folder (best.safetensors = QAT checkpoint for build --qat)")
    p.add_argument("--original-epochs", type=positive_int,
                   help="epochs of the original training (default: the checkpoint's training record, else "
                        f"the authors' {TrainRecipe().epochs}); QAT runs 10%% of them "
                        "(30%% for 4-bit weights, 60%% for binary/ternary)")
    p.add_argument("--original-lr", type=positive_float,
                   help="learning rate of the original training (default: the checkpoint's training record, "
                        f"else the authors' {TrainRecipe().lr:g}); QAT uses 1%% of it "
                        "(10%% for 4-bit weights, all of it for binary/ternary)")
    p.add_argument("--epochs", type=positive_int, help="override the QAT epochs")
    p.add_argument("--lr", type=positive_float, help="override the QAT learning rate")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--calib-method", choices=METHODS, default=DEFAULT_CALIB_METHOD)
    p.add_argument("--calib-images", type=positive_int, default=DEFAULT_CALIB_IMAGES)
    add_concat_qdq_argument(p)
    add_equalize_arguments(p)
    p.add_argument("--plan", metavar="BUILD_DIR",
                   help="fine-tune the per-conv plan of a `build --precision auto` (its folder or build.json); "
                        "then build --precision auto --qat CKPT")
    p.add_argument("--learnable-scales", action="store_true", help="train the quantizer scales too (LSQ)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=non_negative_int, default=50, metavar="ITERS")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def trained_schedule(model) -> dict:
    """{epochs, lr} of the recipe our `train` recorded in the checkpoint, or {} (other checkpoints)."""
    training = getattr(model, "checkpoint_metadata", {}).get("training")
    try:
        recipe = json.loads(training).get("recipe", {}) if training else {}
    except (TypeError, ValueError, AttributeError):
        return {}
    return {k: recipe[k] for k in ("epochs", "lr") if isinstance(recipe.get(k), (int, float))}


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ckpt, source, _ = resolve_model(args.model)
    task = data_task(args, model, args.model)
    layer_formats, int4_block = None, None
    if args.plan:
        from cunet_optimize.pipeline.plans import load_plan, load_plan_int4_block

        if args.precision not in ("int8", "auto"):
            raise CUNetError(f"qat --plan fine-tunes an auto plan (int8 base with per-conv formats); "
                             f"drop --precision {args.precision}")
        layer_formats = load_plan(args.plan)
        int4_block = load_plan_int4_block(args.plan)  # the plan's target's INT4, as its search measured it
        args.precision = "auto"
    scheme = quant_scheme("int8" if args.precision == "auto" else args.precision, args.concat_qdq)
    # a plan with INT4 convs gets the INT4 schedule (longer, larger learning rate)
    schedule_scheme = quant_scheme("int4") if "int4" in (layer_formats or {}).values() else scheme
    recorded, authors = trained_schedule(model), TrainRecipe()
    original = TrainRecipe(epochs=args.original_epochs or recorded.get("epochs", authors.epochs),
                           lr=args.original_lr or recorded.get("lr", authors.lr), batch_size=args.batch_size,
                           seed=args.seed, checkpoint_every=args.checkpoint_every)
    origin = ("given" if args.original_epochs and args.original_lr
              else "from the checkpoint's training record" if recorded else "the authors' recipe")
    recipe = qat_recipe(original, schedule_scheme, epochs=args.epochs, lr=args.lr)
    # a plan's convs are INT8 but for those it lists (pipeline/plans.py load_plan)
    what = (f"auto plan ({', '.join(f'{n} {f}' for f, n in sorted(Counter(layer_formats.values()).items()))} "
            f"convs, the rest int8)" if layer_formats else scheme.spec)
    if not args.json:
        print(f"original training: {original.epochs} epochs at lr {original.lr:g} ({origin}); "
              f"QAT {what}: {recipe.epochs} epochs from lr {recipe.lr:g}")
    train_set = task_dataset(args, task, args.split, augment=True, seed=args.seed)
    if args.train_images:
        train_set = FirstSamples(train_set, args.train_images)
    val_set = None if args.val_split == "none" else task_dataset(args, task, args.val_split)
    calib_set = task_dataset(args, task, args.split)
    result = run_qat(model, scheme, train_set, val_set, calibration_batches(calib_set, args.calib_images),
                     recipe, args.out, calib_method=args.calib_method,
                     equalize_alpha=equalize_alpha_for(scheme, args.equalize_alpha),
                     learnable_scales=args.learnable_scales,
                     resume=not args.no_resume, progress=not args.json, sync_batchnorm=args.sync_bn,
                     metadata={"task": task.name, "source_model": source, "recipe": recipe.__dict__},
                     layer_formats=layer_formats, int4_block=int4_block)
    summary = {"out": result.out_dir, "qat_checkpoint": result.best_checkpoint, "scheme": scheme.spec,
               f"best_val_{result.metric_key}": result.best_metric if val_set is not None else None, "epochs": result.epochs_run,
               "lr": recipe.lr, "original_schedule": {"epochs": original.epochs, "lr": original.lr, "origin": origin},
               "wall_seconds": result.wall_seconds, "history": result.history,
               "distributed": distributed_summary(args.sync_bn)}
    if args.json:
        print_json(summary)
    else:
        chosen = (f"best validation {result.metric} {result.best_metric:.3f}%" if val_set is not None
                  else "no validation split: best.safetensors is the last epoch")
        print(f"QAT {what}: {result.epochs_run} epochs at lr {recipe.lr:g} (cosine) in "
              f"{result.wall_seconds:.0f} s; {chosen}")
        print(f"wrote {result.best_checkpoint} (use: cunet-optimize build --precision {args.precision} "
              f"--qat {result.best_checkpoint})")
    return 0
