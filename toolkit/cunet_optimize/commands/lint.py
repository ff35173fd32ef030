"""`cunet-optimize lint`: check an ONNX graph against what a target accepts (exit 1 on errors)."""

from __future__ import annotations

from cunet_optimize.commands.common import print_json
from cunet_optimize.surgery.graph import cunet_mismatch, load_model_proto
from cunet_optimize.surgery.lint import ERROR, WARNING, Finding, lint_model, lint_target_names

EXIT_FINDINGS = 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("lint", help="check Q/DQ form, operators and DLA restrictions for a target")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--target", required=True, choices=lint_target_names(), help="deployment target")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    model = load_model_proto(args.model)
    findings = lint_model(model, args.target)
    mismatch = cunet_mismatch(model)
    if mismatch:  # the rules would pass it without a word: say what they were checked against
        findings.append(Finding(WARNING, "cunet-graph", "(graph)", f"not a CU-Net graph: {mismatch}",
                                "lint models written by `cunet-optimize export`; other graphs are "
                                "checked only for operator support"))
    errors = sum(1 for f in findings if f.severity == ERROR)
    if args.json:
        print_json({"model": args.model, "target": args.target, "errors": errors,
                    "warnings": len(findings) - errors, "findings": [f.to_dict() for f in findings]})
    else:
        for f in findings:
            print(f)
        print(f"{args.model} for {args.target}: {errors} error(s), {len(findings) - errors} warning(s)")
    return EXIT_FINDINGS if errors else 0
