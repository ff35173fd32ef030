"""`cunet-optimize eval`: accuracy of a checkpoint on a face (NME) or pose (PCKh) data set."""

from __future__ import annotations

from cunet_optimize.commands.common import (add_face_data_arguments, add_model_argument, data_task, positive_int,
                                            print_json, print_table, task_dataset)
from cunet_optimize.evaluation import (DEFAULT_BATCH_SIZE, DEFAULT_NORMALIZER, evaluate_landmarks, result_to_json,
                                       torch_infer)
from cunet_optimize.metrics import NORMALIZERS
from cunet_optimize.models import load_model
from cunet_optimize.tasks import POSE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="NME / failure rate / AUC (faces) or PCKh@0.5 (pose) of a model on a "
                                           "data set")
    add_model_argument(p)
    add_face_data_arguments(p, split_default="test")
    p.add_argument("--normalizer", choices=NORMALIZERS, default=DEFAULT_NORMALIZER,
                   help="NME normaliser (faces; pose uses the head size)")
    p.add_argument("--flip", action="store_true", help="flip test: average with the mirrored image")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    model = load_model(args.model)
    task = data_task(args, model, args.model)
    dataset = task_dataset(args, task, args.split)
    result = evaluate_landmarks(torch_infer(model), dataset, batch_size=args.batch_size,
                                normalizer=args.normalizer, flip=args.flip,
                                runtime="PyTorch FP32 (CPU)", progress=not args.json)
    out = result_to_json(result)
    out["model"] = args.model or "embedded default"
    out["data"] = {"folder": args.data, "split": args.split}
    if args.json:
        print_json(out)
        return 0
    m, s = result.metrics, result.settings
    print(f"model {out['model']} on {args.data} (split {args.split}, {s['images']} images, "
          f"crop {s['crop_policy']}, normaliser {s['normalizer']}, flip test {'on' if s['flip_test'] else 'off'}, "
          f"runtime {s['runtime']})")
    if task is POSE:
        print_table(["PCKh@0.5 %", "PCKh@0.2 %"], [[f"{m['pckh_percent']:.2f}", f"{m['pckh_0.2_percent']:.2f}"]])
        print(f"per joint (PCKh@0.5 %; the mean excludes {', '.join(m['excluded_joints'])}):")
        print_table(["joint", "PCKh %"], [[name, f"{v:.2f}"] for name, v in m["per_joint_percent"].items()])
        return 0
    print_table(["NME %", "FR@0.08 %", "FR@0.10 %", "AUC@0.08 %"],
                [[f"{m['nme_percent']:.3f}", f"{m['failure_rate_0.08_percent']:.2f}",
                  f"{m['failure_rate_0.10_percent']:.2f}", f"{m['auc_0.08_percent']:.2f}"]])
    return 0
