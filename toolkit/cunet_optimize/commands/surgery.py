"""`cunet-optimize surgery`: run graph passes over an exported model, verified pass by pass."""

from __future__ import annotations

from pathlib import Path

from cunet_optimize.commands.common import print_json
from cunet_optimize.surgery import PASSES, activation_memory, run_surgery
from cunet_optimize.errors import CUNetError
from cunet_optimize.surgery.graph import cunet_mismatch, load_model_proto, save_model
from cunet_optimize.surgery.lint import lint_target_names


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("surgery", help="optimise an ONNX graph (fold dense concats, BN, Q/DQ hygiene, INT4 packing)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--out", metavar="PATH", help="file to write (default: WORKDIR/<model>-surgery.onnx)")
    p.add_argument("--passes", nargs="+", metavar="PASS",
                   help=f"passes in order (comma or space separated); default: chosen for --target. Known: {', '.join(PASSES)}")
    p.add_argument("--target", default="cpu", choices=lint_target_names(), help="deployment target the default passes suit (default cpu)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check after each pass")
    p.add_argument("--workdir", default=".", help="where artifacts go (default: current folder)")
    p.add_argument("--json", action="store_true", help="print the pass reports and memory figures as JSON")
    p.set_defaults(func=run)


def _memory_summary(model) -> dict:
    m = activation_memory(model, batch=1)
    return {k: m[k] for k in ("concat_count", "concat_output_bytes", "total_node_output_bytes", "peak_bytes", "peak_nodes")}


def run(args) -> int:
    source = load_model_proto(args.model)
    mismatch = cunet_mismatch(source)
    if mismatch:
        raise CUNetError(f"{args.model}: not a CU-Net graph ({mismatch}); surgery's passes are for models "
                         "written by `cunet-optimize export`")
    passes = None
    if args.passes:
        passes = [p for item in args.passes for p in item.split(",") if p]
    result = run_surgery(source, passes, target=args.target, verify=not args.no_verify)
    stem = Path(args.model).name.removesuffix(".onnx")
    out = Path(args.out) if args.out else Path(args.workdir) / f"{stem}-surgery.onnx"
    save_model(result.model, out)
    before, after = _memory_summary(source), _memory_summary(result.model)
    if args.json:
        print_json({"input": args.model, "output": str(out), "target": args.target, **result.to_dict(),
                    "memory": {"before": before, "after": after}})
        return 0
    for report in result.reports:
        verified = ""
        if report.verification:
            worst = max((o["max_abs_error"] for o in report.verification["outputs"]), default=0.0)
            verified = f"; ORT max abs change {worst:.3g}"
        print(report.summary() + verified)
        for note in report.notes:
            print(f"  {note}")
    mb = 1e6
    print(f"activation memory (batch 1): peak {before['peak_bytes'] / mb:.2f} -> {after['peak_bytes'] / mb:.2f} MB, "
          f"Concat outputs {before['concat_output_bytes'] / mb:.2f} -> {after['concat_output_bytes'] / mb:.2f} MB")
    print(f"wrote {out}")
    return 0
