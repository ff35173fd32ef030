"""`cunet-optimize models`: the registered CU-Net configurations and what they cost."""

from __future__ import annotations


from cunet_optimize.commands.common import print_json, print_table
from cunet_optimize.models import MODEL_REGISTRY, read_checkpoint
from cunet_optimize.models.complexity import measure_complexity


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "models", help="list the registered CU-Net configurations (parameters, size, GMACs)"
    )
    p.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="describe a checkpoint instead (ours or the authors' .pth.tar): inferred configuration and cost",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.checkpoint:
        # the tensors, not just the metadata (read_checkpoint checks every shape and value):
        # what eval/export/build would refuse, refuse here
        config, state_dict, metadata = read_checkpoint(args.checkpoint)
        entries = [(args.checkpoint, config, f"checkpoint ({metadata.get('format', '?')})")]
    else:
        entries = [(e.name, e.config, e.description) for e in MODEL_REGISTRY.values()]
    rows = []
    for name, cfg, description in entries:
        cost = measure_complexity(cfg)
        rows.append(
            {
                "name": name,
                "config": cfg.to_dict(),
                "parameters": cost.parameters,
                "fp32_mb": round(cost.fp32_bytes / 1e6, 2),
                "gmacs_256": round(cost.macs / 1e9, 3),
                "description": description,
            }
        )
    if args.json:
        print_json(rows)
        return 0
    print_table(
        ["name", "N", "K", "C", "c0", "g", "L", "params", "fp32 MB", "GMACs@256", "description"],
        [
            [r["name"], *(r["config"][k] for k in ("num_unets", "order", "num_classes", "width",
                                                    "growth_rate", "num_heads")),
             f"{r['parameters'] / 1e6:.3f}M", f"{r['fp32_mb']:.1f}", f"{r['gmacs_256']:.2f}",
             r["description"]]
            for r in rows
        ],
    )
    return 0
