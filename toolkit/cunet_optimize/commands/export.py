"""`cunet-optimize export`: a CU-Net checkpoint (or registered name) -> a verified ONNX file."""

from __future__ import annotations

from pathlib import Path

from cunet_optimize.commands.common import add_model_argument, print_json
from cunet_optimize.exporters import export_onnx
from cunet_optimize.exporters.onnx_export import DEFAULT_EXPORTER, EXPORTERS
from cunet_optimize.models import DEFAULT_CONFIG_NAME, load_model
from cunet_optimize.quant.policy import precision_argument


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a CU-Net to ONNX (cleaned, verified against PyTorch in ONNX Runtime)"
    )
    add_model_argument(p)
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", type=precision_argument(schemes=False),
                   help="fp16: float16 weights and compute, float32 input/output; any case (default fp32). "
                        "Quantized graphs: `build` (or `calibrate` / `qat`, then build)")
    p.add_argument("--out", metavar="PATH", help="ONNX file to write (default: WORKDIR/<model>-<precision>.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..21 (21 for INT4 weights; default 17)")
    p.add_argument("--all-heads", action="store_true",
                   help="one output per supervised head (heatmaps_0..L-1) instead of the last one (heatmaps)")
    p.add_argument("--landmarks", action="store_true",
                   help="add a 'landmarks' output [B, C, 2] decoded in the graph (heatmap pixels)")
    p.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER,
                   help="legacy: torch.onnx.export's TorchScript tracer; dynamo: its torch.export-based exporter "
                        f"(same graph after clean-up; default {DEFAULT_EXPORTER}, see exporters/onnx_export.py)")
    p.add_argument("--static-batch", action="store_true", help="batch fixed to 1 (DLA needs static shapes)")
    p.add_argument("--workdir", default=".", help="where artifacts go (default: current folder)")
    p.add_argument("--json", action="store_true", help="print the export summary as JSON")
    p.set_defaults(func=run)


def _model_stem(model: str | None) -> str:
    if model is None:
        return DEFAULT_CONFIG_NAME
    name = Path(model).name
    for suffix in (".tar", ".pth", ".pt", ".safetensors"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def run(args) -> int:
    model = load_model(args.model)
    out = Path(args.out) if args.out else Path(args.workdir) / f"{_model_stem(args.model)}-{args.precision}.onnx"
    summary = export_onnx(
        model,
        out,
        opset=args.opset,
        heads="all" if args.all_heads else "last",
        decode_landmarks=args.landmarks,
        fp16=args.precision == "fp16",
        dynamic_batch=not args.static_batch,
        exporter=args.exporter,
    )
    if args.json:
        print_json(summary.to_dict())
        return 0
    check = summary.verification
    worst = max((o["max_abs_error"] for o in check["outputs"]), default=0.0)
    print(f"wrote {summary.path} ({summary.size_bytes / 1e6:.2f} MB, {summary.num_nodes} nodes, opset {summary.opset}, "
          f"{summary.precision}{', Q/DQ' if summary.quantized else ''}; outputs {', '.join(summary.output_names)})")
    print(f"verified: {check['runtime']} vs {check['reference']}: max abs error {worst:.3g} ({check['tolerance']}); "
          f"torch export ({summary.exporter}) {summary.torch_export_seconds:.1f} s, total {summary.total_seconds:.1f} s")
    for note in check.get("notes", []):
        print(f"  {note}")
    return 0
