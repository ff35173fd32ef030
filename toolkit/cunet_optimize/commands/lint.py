"""`cunet-optimize lint`: check an ONNX graph against what a target accepts (exit 1 on errors)."""

from __future__ import annotations

from cunet_optimize.commands.common import print_json
from cunet_optimize.targets import target_names
from cunet_optimize.onnx_tools.graph import cunet_mismatch, load_model_proto
from cunet_optimize.surgery.lint import ERROR, WARNING, Finding, lint_model

EXIT_FINDINGS = 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("lint", help="check Q/DQ form, operators and DLA restrictions for a target")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--target", required=True, help=f"deployment target: {', '.join(target_names())}")
    p.add_argument("--dla-core", type=int, metavar="N", help="lint for DLA core N of the target (Jetson Orin NX / AGX Orin)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    model = load_model_proto(args.model)
    findings = lint_model(model, args.target, dla_core=args.dla_core)
    mismatch = cunet_mismatch(model)
    if mismatch:  # the rules would pass it without a word: say what they were checked against
        findings.append(Finding(WARNING, "cunet-graph", "(graph)", f"not a CU-Net graph: {mismatch}",
                                "lint models written by `cunet-optimize export`; other graphs are "
                                "checked only for operator support"))
    errors = sum(1 for f in findings if f.severity == ERROR)
    if args.json:
        print_json({"model": args.model, "target": args.target, "dla_core": args.dla_core, "errors": errors,
                    "warnings": len(findings) - errors, "findings": [f.to_dict() for f in findings]})
    else:
        for f in findings:
            print(f)
        where = args.target + (f" DLA core {args.dla_core}" if args.dla_core is not None else "")
        print(f"{args.model} for {where}: {errors} error(s), {len(findings) - errors} warning(s)")
    return EXIT_FINDINGS if errors else 0
