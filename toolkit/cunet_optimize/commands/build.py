"""`cunet-optimize build`: a trained CU-Net -> engine (or device bundle) for one target."""

from __future__ import annotations

from cunet_optimize import distributed
from cunet_optimize.errors import CUNetError
from cunet_optimize.pipeline import run_build

from cunet_optimize.pipeline.build import (CPU_RUNTIME_CHOICES, CPU_RUNTIME_ENV, DEFAULT_AUTO_HELDOUT_IMAGES,
                                           DEFAULT_CALIB_IMAGES, DEFAULT_CALIB_METHOD, DEFAULT_EVAL_SPLIT,
                                           DEFAULT_PRECISION, DEFAULT_TARGET, BuildOptions)
from cunet_optimize.commands.common import non_negative_float, positive_int
from cunet_optimize.exporters.onnx_export import DEFAULT_EXPORTER, EXPORTERS
from cunet_optimize.commands.common import (add_concat_qdq_argument, add_equalize_arguments, add_model_argument,
                                            command_line, print_json)
from cunet_optimize.quant.auto import DEFAULT_SENSITIVITY_IMAGES
from cunet_optimize.quant.calibrate import METHODS
from cunet_optimize.quant.policy import precision_argument
from cunet_optimize.tasks import FACE, POSE, default_calib_split


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="calibrate/QAT, export, surgery, lint, build the engine and check accuracy")
    p.add_argument("--precision", default=DEFAULT_PRECISION, type=precision_argument(),
                   help="fp32, fp16, int8[-convin|-tied|-untied], int4[-b<N>|-pc][-wo] (weights; built dequantized "
                        "where not executable), a paper mode such as w1a8 (with --qat: trained by `qat`, built as a "
                        "float graph), or auto: per-conv INT4/INT8/float, the cheapest plan (--objective) within the "
                        f"accuracy gate's budget; any case (default: {DEFAULT_PRECISION})")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"see `cunet-optimize targets` (default: {DEFAULT_TARGET})")
    add_model_argument(p)
    p.add_argument("--qat", metavar="QAT_CKPT", dest="qat_checkpoint",
                   help="export this `cunet-optimize qat` checkpoint instead of post-training calibration")
    p.add_argument("--calib-data", metavar="DIR", help="calibration images: 300-W layout (face models) or MPII "
                   "annotation JSON / its folder (pose models) (default: the model task's synthetic set's "
                   "calibration slice)")
    p.add_argument("--calib-split", default=None, help="split list in --calib-data (default: train if present)")
    p.add_argument("--calib-method", choices=METHODS, default=DEFAULT_CALIB_METHOD)
    p.add_argument("--calib-images", type=positive_int, default=DEFAULT_CALIB_IMAGES)
    add_concat_qdq_argument(p)
    add_equalize_arguments(p)
    p.add_argument("--eval-data", metavar="DIR",
                   help="evaluation set, same layouts (default: the model task's synthetic test split)")
    p.add_argument("--eval-split", default=DEFAULT_EVAL_SPLIT)
    p.add_argument("--max-nme-increase", type=non_negative_float, default=FACE.default_tolerance,
                   metavar="POINTS", help="accuracy gate of face models: allowed NME increase in percentage "
                                          f"points (default {FACE.default_tolerance})")
    p.add_argument("--max-pckh-decrease", type=non_negative_float, default=POSE.default_tolerance,
                   metavar="POINTS", help="accuracy gate of pose models: allowed PCKh@0.5 decrease in "
                                          f"percentage points (default {POSE.default_tolerance})")
    p.add_argument("--no-accuracy-gate", action="store_true", help="record the accuracy but never fail on it")
    p.add_argument("--trt-major", type=int, choices=[10, 11], help="TensorRT major for GPU/Jetson bundles")
    p.add_argument("--dla-core", type=int, metavar="N",
                   help="build for DLA core N (jetson-orin-nx, jetson-agx-orin): static batch 1, DLA lint rules, "
                        "trtexec --useDLACore=N --allowGPUFallback")
    p.add_argument("--objective", choices=["size", "latency"], default="size",
                   help="--precision auto minimises deployed weight bytes (size) or an estimated latency from "
                        "the target's native precisions (latency) (default: size)")
    p.add_argument("--auto-grain", choices=["conv", "block"], default=None,
                   help="--precision auto: one format per conv or per U-Net block (default: conv up to 96 convs)")
    p.add_argument("--auto-heldout-images", type=positive_int, default=DEFAULT_AUTO_HELDOUT_IMAGES, metavar="N",
                   help="--precision auto: calibration images held out from the scales, on which plans are "
                        f"measured (at most half the calibration set; default {DEFAULT_AUTO_HELDOUT_IMAGES})")
    p.add_argument("--auto-sensitivity-images", type=positive_int, default=None, metavar="N",
                   help="--precision auto: measure each group's sensitivity on the first N held-out images only "
                        f"(the joint runs of whole plans use all of them; default {DEFAULT_SENSITIVITY_IMAGES})")
    p.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER,
                   help=f"torch.onnx exporter: legacy (TorchScript) or dynamo (torch.export; fp32, fp16 and int8 "
                        f"weights only) (default {DEFAULT_EXPORTER}, see exporters/onnx_export.py)")
    p.add_argument("--landmarks", action="store_true",
                   help="append the in-graph landmark decoder: a `landmarks` output [B, C, 2] (x, y in heatmap "
                        "pixels) beside the heatmaps, in the engine and its deploy/ configs, so clients get "
                        "coordinates (default name gets -landmarks)")
    p.add_argument("--cpu-runtime", choices=CPU_RUNTIME_CHOICES, default=None,
                   help="cpu target: the runtime the engine deploys on; auto times ONNX Runtime and, with the "
                        "openvino extra, OpenVINO, and keeps the fastest that passes the gate (default: "
                        f"${CPU_RUNTIME_ENV} or auto)")
    p.add_argument("--name", help="build folder name (default: <model>-<precision>-<target>[-landmarks])")
    p.add_argument("--workdir", default=".", help="artifacts go to WORKDIR/engines and WORKDIR/calib")
    p.add_argument("--force", action="store_true", help="replace an existing build of the same name")
    p.add_argument("--json", action="store_true", help="print build.json to stdout")
    p.set_defaults(func=run)


def build_options(args, command: str | None = None) -> BuildOptions:
    """The BuildOptions of parsed `build` arguments: the CLI's, and api.build's, which parses its
    keyword options with this command's parser (one mapping from options to a build).
    `command`: what build.json records (default: the command line)."""
    if args.precision == "auto" and not args.qat_checkpoint and distributed.is_active():
        raise CUNetError("build --precision auto searches its plan in one process; launch it without "
                         "torchrun/srun (a plan from `qat --plan` builds under torchrun: --qat QAT_CKPT)")
    return BuildOptions(
        precision=args.precision, target=args.target, model=args.model, qat_checkpoint=args.qat_checkpoint,
        calib_data=args.calib_data, calib_split=default_calib_split(args.calib_data, args.calib_split),
        calib_method=args.calib_method,
        calib_images=args.calib_images, concat_qdq=args.concat_qdq, equalize_alpha=args.equalize_alpha,
        eval_data=args.eval_data, eval_split=args.eval_split, max_nme_increase=args.max_nme_increase,
        max_pckh_decrease=args.max_pckh_decrease,
        accuracy_gate=not args.no_accuracy_gate, trt_major=args.trt_major, dla_core=args.dla_core,
        exporter=args.exporter, landmarks=args.landmarks, cpu_runtime=args.cpu_runtime,
        workdir=args.workdir,
        force=args.force, name=args.name, command=command_line() if command is None else command,
        objective=args.objective, auto_grain=args.auto_grain, auto_heldout_images=args.auto_heldout_images,
        auto_sensitivity_images=args.auto_sensitivity_images,
    )


def run(args) -> int:
    opts = build_options(args)
    echo = (lambda *_: None) if args.json else print
    report = run_build(opts, echo=echo, progress=not args.json)  # checks, then holds the workdir's lock
    m = report.manifest
    if args.json:
        print_json(m)
        return 0
    acc = m["accuracy"]
    print(f"accuracy ({acc['runtime']}): {acc['metric']} {acc['quantized_value']:.3f}% vs FP32 "
          f"{acc['reference_value']:.3f}% ({acc['degradation_points']:+.3f} points worse, "
          f"gate {acc['tolerance']}: {'pass' if acc['passed'] else 'FAIL (not enforced)'})")
    ov = acc.get("openvino")
    if ov:  # a TensorRT bundle's ONNX also run in OpenVINO: a second opinion, not the gate
        print(f"accuracy ({ov['runtime']}): " + (f"{acc['metric']} {ov['value']:.3f}% "
              f"({ov['degradation_points']:+.3f} points worse; recorded, not gating)" if "value" in ov
              else f"not measured: {ov['error']}"))
    for note in report.notes:
        print(f"note: {note}")
    if "auto" in m:
        a = m["auto"]
        searched = (f"predicted {a['predicted_degradation']:+.4f}, {len(a['back_off'])} back-off step(s)"
                    if "back_off" in a else f"the plan of the {a['source']}")
        print(f"auto plan ({a['grain']} grain, {a.get('objective') or 'as given'}): "
              f"{dict(sorted(_count(a['plan']).items()))}; weight bytes {a['weight_bytes']:.0f} "
              f"(all int8: {a['weight_bytes_uniform'].get('int8', 0):.0f}); {searched}")
    built = "engine" if m.get("engine_built") else "deployment bundle (no engine built here)"
    print(f"wrote {report.path}/ ({built}; manifest build.json)")
    return 0


def _count(plan: dict) -> dict:
    from collections import Counter

    return dict(Counter(plan.values()))
