"""`cunet-optimize surgery`: run graph passes over an exported model, verified pass by pass."""

from __future__ import annotations

from pathlib import Path

from cunet_optimize.commands.common import add_force_argument, check_new_output, print_json
from cunet_optimize.targets import get_target, target_names
from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.graph import cunet_mismatch, load_model_proto, save_model
from cunet_optimize.surgery import PASSES, activation_memory, run_surgery


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("surgery", help="optimise an ONNX graph (fold dense concats, BN, Q/DQ hygiene, INT4 packing)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--out", metavar="PATH", help="file to write (default: WORKDIR/<model>-surgery.onnx)")
    p.add_argument("--passes", nargs="+", metavar="PASS",
                   help=f"passes in order (comma or space separated); default: chosen for --target. Known: {', '.join(PASSES)}")
    p.add_argument("--target", default="cpu",
                   help=f"deployment target the default passes suit (default cpu): {', '.join(target_names())}")
    p.add_argument("--dla-core", type=int, metavar="N", help="the layers go to DLA core N of the target (its DLA passes)")
    p.add_argument("--calib-data", metavar="DIR",
                   help="calibration images (the model's calibration set; 300-W layout or MPII JSON): required "
                        "when a pass calibrates new quantization points (integer_dataflow, the cpu default for INT8)")
    p.add_argument("--calib-split", default=None, help="split list in --calib-data (default: train if present)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check after each pass")
    p.add_argument("--workdir", default=".", help="where artifacts go (default: current folder)")
    p.add_argument("--json", action="store_true", help="print the pass reports and memory figures as JSON")
    add_force_argument(p, "the output file")
    p.set_defaults(func=run)


def _memory_summary(model) -> dict:
    m = activation_memory(model, batch=1)
    return {k: m[k] for k in ("concat_count", "concat_output_bytes", "total_node_output_bytes", "peak_bytes", "peak_nodes")}


def _pass_options(args, source, passes) -> dict:
    """Calibration images for the passes that calibrate (integer_dataflow): from --calib-data,
    never stand-in images; CUNetError without them."""
    from cunet_optimize.surgery import default_passes
    from cunet_optimize.onnx_tools.graph import opset_of

    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in source.graph.node)
    names = passes or default_passes(args.target, quantized=quantized, opset=opset_of(source), dla_core=args.dla_core)
    if "integer_dataflow" not in names:
        return {}
    if not args.calib_data:
        raise CUNetError(f"{args.model}: surgery pass integer_dataflow calibrates new uint8 points on the model's "
                         "calibration images; pass --calib-data DIR (or leave the pass out with --passes ...)")
    from cunet_optimize.surgery.integer_dataflow import CALIBRATION_IMAGES
    from cunet_optimize.tasks import calibration_images, default_calib_split, task_of_data

    images = calibration_images(args.calib_data, default_calib_split(args.calib_data, args.calib_split),
                                CALIBRATION_IMAGES, task_of_data(args.calib_data))
    return {"integer_dataflow": {"calibration": images}}


def run(args) -> int:
    stem = Path(args.model).name.removesuffix(".onnx")
    out = Path(args.out) if args.out else Path(args.workdir) / f"{stem}-surgery.onnx"
    check_new_output(out, "--out", force=args.force, inputs=[args.model])
    source = load_model_proto(args.model)
    mismatch = cunet_mismatch(source)
    if mismatch:
        raise CUNetError(f"{args.model}: not a CU-Net graph ({mismatch}); surgery's passes are for models "
                         "written by `cunet-optimize export`")
    passes = None
    if args.passes:
        passes = [p for item in args.passes for p in item.split(",") if p]
    options = _pass_options(args, source, passes)
    result = run_surgery(source, passes, target=args.target, dla_core=args.dla_core, verify=not args.no_verify,
                         pass_options=options)
    save_model(result.model, out)
    before, after = _memory_summary(source), _memory_summary(result.model)
    if args.json:
        target = get_target(args.target).name  # the registry's spelling, whatever the case typed
        print_json({"input": args.model, "output": str(out), "target": target, **result.to_dict(),
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
