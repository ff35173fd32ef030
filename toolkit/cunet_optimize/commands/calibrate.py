"""`cunet-optimize calibrate`: activation ranges of a quantized CU-Net, cached under calib/<id>/
(quant/calib_cache.py), with TensorRT's legacy calibration.cache sealed beside them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cunet_optimize.pipeline.build import (DEFAULT_CALIB_IMAGES, DEFAULT_CALIB_METHOD, DEFAULT_PRECISION, BuildOptions,
                                           StageTimer, check_workdir, quantize_and_calibrate)
from cunet_optimize.commands.common import positive_int
from cunet_optimize.data.face300w import DataFlags
from cunet_optimize.workdir_lock import workdir_lock
from cunet_optimize.commands.common import (add_concat_qdq_argument, add_equalize_arguments, add_model_argument,
                                            print_json)
from cunet_optimize.models import resolve_model
from cunet_optimize.quant.calib_cache import CalibrationCache
from cunet_optimize.quant.calibrate import METHODS
from cunet_optimize.quant.policy import precision_argument
from cunet_optimize.tasks import check_data_task, default_calib_split, open_dataset_or_default


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="calibrate INT8 activation scales (max/percentile/entropy/mse)")
    add_model_argument(p)
    p.add_argument("--data", metavar="DIR", help="calibration images: 300-W layout (face models) or MPII "
                   "annotation JSON / its folder (pose models) (default: the model task's synthetic set's "
                   "calibration slice)")
    p.add_argument("--split", default=None, help="split list in DIR (default: its train list if any, else all)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_CALIB_METHOD)
    p.add_argument("--precision", default=DEFAULT_PRECISION, type=precision_argument(words=()),
                   help="quantization scheme: int8[-convin|-tied|-untied], int4[-b<N>|-pc][-wo], ... "
                        f"(default {DEFAULT_PRECISION})")
    p.add_argument("--images", type=positive_int, default=DEFAULT_CALIB_IMAGES, help="number of calibration images")
    add_concat_qdq_argument(p)
    add_equalize_arguments(p)
    p.add_argument("--workdir", default=".", help="artifacts go to WORKDIR/calib/<id>/")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    opts = BuildOptions(precision=args.precision, model=args.model, calib_data=args.data,
                        calib_split=default_calib_split(args.data, args.split),
                        calib_method=args.method, calib_images=args.images,
                        concat_qdq=args.concat_qdq, equalize_alpha=args.equalize_alpha,
                        workdir=args.workdir)
    # every check before the workdir's lock: a refused calibrate leaves the workdir as it was
    check_workdir(args.workdir)
    model, ckpt, source, _ = resolve_model(args.model)
    task = check_data_task(model, source, args.data)
    flags = DataFlags(skip_bad=None)
    calib_data = open_dataset_or_default(args.data, opts.calib_split, task, flags)
    timer = StageTimer(total=1, echo=(lambda *_: None) if args.json else print)
    with workdir_lock(args.workdir, "cunet-optimize calibrate"):
        qmodel, info = quantize_and_calibrate(opts, model, ckpt, timer, progress=not args.json,
                                              calib_flags=flags, calib_data=calib_data)
        # equalized scales are cached with their factors (quant/calib_cache.py)
        calib = CalibrationCache(Path(info["scales_file"]).parent, equalized=info.get("equalization") is not None)
        # keyed by ONNX tensor names: exported once per scales, rewritten when missing or damaged
        wrote_legacy = not info.get("cached") or not calib.legacy_cache_reusable()
        if wrote_legacy:
            import onnx

            from cunet_optimize.exporters import export_onnx
            from cunet_optimize.quant.onnx_scales import legacy_cache_scales

            with tempfile.TemporaryDirectory() as tmp:
                export_onnx(qmodel, Path(tmp) / "q.onnx")
                calib.store_legacy_cache(legacy_cache_scales(onnx.load(Path(tmp) / "q.onnx")))
    info["legacy_cache"] = str(calib.legacy_cache_file.resolve())
    info["legacy_cache_cached"] = not wrote_legacy
    if args.json:
        print_json(info)
    else:
        cached = info.get("cached")
        print(f"calibrated {info['scheme']} with {info['method']} over {info['images']} images "
              f"({'cached' if cached else 'computed'})")
        print(f"{'reused' if cached else 'wrote'} {info['scales_file']}\n"
              f"{'wrote' if wrote_legacy else 'reused'} {info['legacy_cache']} (TensorRT <= 10 legacy cache)")
    return 0
