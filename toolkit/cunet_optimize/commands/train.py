"""`cunet-optimize train`: train a CU-Net on face (300-W layout) or pose (MPII) data (resumable)."""

from __future__ import annotations

import math
import platform
import sys
from pathlib import Path

import torch

from cunet_optimize.commands.common import (add_face_data_arguments, data_task, non_negative_int, positive_float,
                                            positive_int, print_json, task_dataset)
from cunet_optimize.distributed import summary as distributed_summary
from cunet_optimize.errors import CUNetError
from cunet_optimize.models import DEFAULT_CONFIG_NAME, load_model
from cunet_optimize.train.loop import TrainRecipe, train

CONFIG_FIELDS = ("num_unets", "order", "num_classes", "width", "growth_rate", "neck_size",
                 "num_heads", "refine_iters")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train (or fine-tune) a CU-Net; resumes from its periodic checkpoints")
    p.add_argument("--model", default=DEFAULT_CONFIG_NAME, metavar="NAME_OR_CKPT",
                   help=f"registered configuration to train from scratch, or a checkpoint to fine-tune "
                        f"(default: {DEFAULT_CONFIG_NAME}, the embedded default's configuration)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                   help=f"override a configuration field of a registered name ({', '.join(CONFIG_FIELDS)})")
    add_face_data_arguments(p, split_default="train")
    p.add_argument("--val-split", default="test", help="split evaluated after each epoch ('none' to skip)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<model>)")
    d = TrainRecipe()
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--lr-steps", default=",".join(f"{e}:{f}" for e, f in d.lr_steps),
                   help="step decay EPOCH:FACTOR,... (authors' face recipe by default)")
    p.add_argument("--cosine", action="store_true", help="cosine decay instead of steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--memory-efficient", action="store_true", help="recompute U-Net positions in backward")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=d.checkpoint_every, metavar="ITERS")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a state")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def parse_lr_steps(text: str) -> tuple[tuple[int, float], ...]:
    if not text.strip():
        return ()
    try:
        return tuple((int(e), float(f)) for e, f in (item.split(":") for item in text.split(",")))
    except ValueError:
        raise CUNetError(f"--lr-steps {text!r}: expected EPOCH:FACTOR,... e.g. 30:0.2,60:0.5") from None


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in CONFIG_FIELDS or not value.lstrip("-").isdigit():
            raise CUNetError(f"--set {item!r}: expected FIELD=INT with FIELD in {', '.join(CONFIG_FIELDS)}")
        out[key] = int(value)
    return out


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = TrainRecipe(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_steps=parse_lr_steps(args.lr_steps),
        lr_schedule="cosine" if args.cosine else "step", seed=args.seed,
        checkpoint_every=args.checkpoint_every, memory_efficient=args.memory_efficient,
    )
    torch.manual_seed(args.seed)
    model = load_model(args.model, **parse_overrides(args.set))
    task = data_task(args, model, args.model)
    train_set = task_dataset(args, task, args.split, augment=not args.no_augment, seed=args.seed)
    val_set = None if args.val_split == "none" else task_dataset(args, task, args.val_split)
    out = Path(args.out or Path("runs") / Path(args.model).name.split(".")[0])
    command = "cunet-optimize " + " ".join(sys.argv[1:]) if sys.argv and "cunet" in sys.argv[0] else ""
    metadata = {"task": task.name,
                "training": {"data": str(args.data), "split": args.split, "val_split": args.val_split,
                             "crop": train_set.crop_policy, "recipe": recipe.__dict__, "command": command,
                             "torch": torch.__version__, "machine": platform.machine()}}
    result = train(model, train_set, val_set, recipe, out, resume=not args.no_resume,
                   progress=not args.json, metadata=metadata, sync_batchnorm=args.sync_bn)
    summary = {"out": result.out_dir,
               "best_checkpoint": result.best_checkpoint if Path(result.best_checkpoint).is_file() else None,
               "last_checkpoint": result.last_checkpoint,
               f"best_val_{result.metric_key}": result.best_metric if math.isfinite(result.best_metric) else None,
               "epochs": result.epochs_run, "wall_seconds": result.wall_seconds, "history": result.history,
               "distributed": distributed_summary(args.sync_bn)}
    if args.json:
        print_json(summary)
    else:
        score = (f"best validation {result.metric} {result.best_metric:.3f}%" if math.isfinite(result.best_metric)
                 else "no validation score" if val_set is None
                 else f"validation {result.metric} never finite (diverged?): no best checkpoint")
        print(f"trained {result.epochs_run} epochs in {result.wall_seconds:.0f} s; {score}")
        # name only what exists: a run whose validation never scored has no best checkpoint
        written = [f for f in (result.best_checkpoint, result.last_checkpoint, Path(result.out_dir) / "history.json")
                   if Path(f).is_file()]
        print(f"wrote {', '.join(map(str, written))}")
    return 0
