"""`cunet-optimize build`: checkpoint -> deployable engine for one target, as a straight line.

    model -> (calibrate | QAT checkpoint) -> export ONNX -> surgery -> lint -> engine
          -> accuracy gate against the FP32 reference -> build.json

Everything is written into a hidden staging folder and renamed into
engines/<model>-<precision>-<target>/ only when the build succeeded, so an
interrupted or failed build leaves nothing half-written, and an existing build is
replaced only with force=True.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from cunet_optimize import __version__, distributed
from cunet_optimize.atomic import sha256_file
from cunet_optimize.errors import CUNetError
from cunet_optimize.evaluate import evaluate_runner
from cunet_optimize.fp32_reference import reference_accuracy
from cunet_optimize.manifests.build import BUILD_FILE, BUILD_SCHEMA, checked_build_json
from cunet_optimize.models import resolve_model
from cunet_optimize.quant.calib_cache import CalibrationCache, calibration_id
from cunet_optimize.quant.onnx_scales import int4_block_scales, legacy_cache_scales
from cunet_optimize.quant.policy import (PLACEMENT_WORDS, base_precision, computes_in_fp16, concat_placement,
                                         engine_precision, equalize_alpha_for, placement_of, quant_scheme)
from cunet_optimize.tasks import (FACE, POSE, Task, calibration_batches, calibration_images, check_data_task,
                                  open_dataset_or_default, task_of_model)

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    precision: str = "int8"
    target: str = "cpu"
    model: str | None = None  # checkpoint or registered name; None = embedded default
    qat_checkpoint: str | None = None  # a `cunet-optimize qat` output to export instead of PTQ
    calib_data: str | None = None
    calib_split: str | None = "calib"
    calib_method: str = "percentile"
    calib_images: int = 128
    concat_qdq: str | None = None  # Q/DQ on the dense concatenations: none | tied | untied (None: as the precision says, else none)
    # None: no activation equalization; "default": DEFAULT_EQUALIZE_ALPHA for INT8 weights only
    equalize_alpha: float | str | None = "default"
    eval_data: str | None = None
    eval_split: str = "test"
    max_nme_increase: float = FACE.default_tolerance  # the gate of face models, NME points
    max_pckh_decrease: float = POSE.default_tolerance  # the gate of pose models, PCKh points
    accuracy_gate: bool = True
    trt_major: int | None = None
    dla_core: int | None = None  # build for this DLA core of a Jetson Orin target (static batch 1)
    exporter: str | None = None  # torch.onnx exporter: legacy | dynamo (None: export_onnx's default)
    workdir: str = "."
    force: bool = False
    name: str | None = None
    command: str = ""
    # --precision auto (quant/auto.py): {conv name: int4|int8|float} of the plan being built,
    # the search's objective (size | latency), grain (conv | block; None: by model size) and
    # the held-out calibration images its sensitivity is measured on
    layer_formats: dict | None = None
    objective: str = "size"
    auto_grain: str | None = None
    auto_heldout_images: int = 64

    def tolerance(self, task: Task) -> float:
        """The accuracy gate's allowed degradation for `task`, in its metric's points."""
        return self.max_nme_increase if task is FACE else self.max_pckh_decrease


@dataclass
class BuildReport:
    name: str
    path: str
    manifest: dict
    notes: list[str] = field(default_factory=list)


class StageTimer:
    """Prints each stage as it starts and records how long it took."""

    def __init__(self, total: int, echo=print):
        self.total, self.done, self.seconds, self.echo = total, 0, {}, echo

    @contextmanager
    def stage(self, name: str, what: str):
        self.done += 1
        self.echo(f"[{self.done}/{self.total}] {name}: {what}")
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)

    def summary(self) -> str:
        """One line: each finished stage's seconds and the total."""
        stages = ", ".join(f"{name} {s:.1f}" for name, s in self.seconds.items())
        return f"stage times (s): {stages}; total {sum(self.seconds.values()):.1f}"


def _final_dir(workdir: Path, name: str, force: bool) -> Path:
    final = workdir / "engines" / name
    if final.exists() and not force:
        raise CUNetError(f"{final} already exists; pass --force to replace it (or --name to build beside it)")
    return final


def run_build(opts: BuildOptions, echo=print, progress: bool = True) -> BuildReport:
    if opts.precision == "auto" and opts.layer_formats is None:
        from cunet_optimize.quant.auto_build import plan_of_qat_checkpoint, run_auto_build

        if not opts.qat_checkpoint:
            return run_auto_build(opts, echo, progress)  # search, then builds with a plan
        from dataclasses import replace

        opts = replace(opts, layer_formats=plan_of_qat_checkpoint(opts.qat_checkpoint))
    from cunet_optimize.engines import get_builder
    from cunet_optimize.engines.targets import check_dla_core, check_precision, get_target
    from cunet_optimize.evaluate import evaluate_landmarks
    from cunet_optimize.export import export_onnx
    from cunet_optimize.export.dynamo import check_exporter
    from cunet_optimize.surgery import activation_memory, default_passes, lint_model, run_surgery
    from cunet_optimize.surgery.forms import choose_concat_form, choose_int8_form
    from cunet_optimize.surgery.pipeline import FOLD_DENSE_CONCATS, TIMED

    target = get_target(opts.target)
    dla = check_dla_core(target, opts.dla_core)
    support = check_precision(target, engine_precision(opts), on_dla=dla is not None)
    quantized = opts.precision not in ("fp32", "fp16")
    if quantized:  # contradictory placement requests stop here, before any work
        quant_scheme(base_precision(opts), opts.concat_qdq, target.backend)
    elif opts.concat_qdq not in (None, "none"):
        raise CUNetError(f"precision {opts.precision} has no INT8 activations, so there is no Q/DQ to place "
                         f"{PLACEMENT_WORDS[opts.concat_qdq]}; drop --concat-qdq")
    exporter = check_exporter(opts.exporter, opts.precision)  # before any calibration
    model, ckpt_path, source, stem = resolve_model(opts.model)
    task = check_data_task(model, source, opts.calib_data, opts.eval_data)
    name = opts.name or f"{stem}-{opts.precision}-{target.name}" + (f"-dla{dla}" if dla is not None else "")
    workdir = Path(opts.workdir)
    final = _final_dir(workdir, name, opts.force)
    (workdir / "engines").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=workdir / "engines"))
    timer = StageTimer(total=5 if quantized else 4, echo=echo)
    notes = [support.note] if getattr(support, "note", "") else []
    manifest: dict = {"schema": BUILD_SCHEMA, "name": name, "toolkit_version": __version__,
                      "command": opts.command, "precision": opts.precision, "target": target.name,
                      "dla_core": dla, "target_spec": target.to_dict()}
    try:
        model_sha = sha256_file(ckpt_path)
        manifest["model"] = {"source": source, "checkpoint": str(ckpt_path), "sha256": model_sha,
                             "config": model.config.to_dict()}
        eval_set, eval_root = open_dataset_or_default(opts.eval_data, opts.eval_split, task)
        manifest["eval_data"] = {"folder": str(eval_root.resolve()), "split": opts.eval_split,
                                 "images": len(eval_set), "crop": eval_set.crop_policy, "task": task.name}

        export_model, opset = model, 17
        if quantized:
            export_model, calib_info = quantize_and_calibrate(opts, model, ckpt_path, timer, progress)
            manifest["calibration"] = calib_info
            int4_convs = "int4" in getattr(export_model, "layer_formats", {}).values()
            opset = 21 if export_model.scheme.weight_bits == 4 or int4_convs else 17
            if computes_in_fp16(target, opts):  # FP16 Q/DQ scales (e.g. strongly typed DLA on TensorRT 11)
                opset = max(opset, 19)

        with timer.stage("export", f"ONNX opset {opset} ({opts.precision}), verified in ONNX Runtime"):
            raw = staging / "export.onnx"
            # DLA builds static shapes only: batch 1, as the plan's profile (min = opt = max)
            summary = export_onnx(export_model, raw, opset=opset, fp16=computes_in_fp16(target, opts),
                                  dynamic_batch=dla is None, exporter=exporter)
            reference_onnx = staging / "reference-fp32.onnx"
            if export_model is model and opts.precision == "fp32":
                shutil.copyfile(raw, reference_onnx)  # the same export: verified once
            else:
                export_onnx(model, reference_onnx, exporter=exporter)
            manifest["export"] = _jsonable(summary)

        with timer.stage("surgery", f"graph passes for {target.name}, then lint"):
            before = onnx.load(raw)
            options = {}
            passes = default_passes(target.name, quantized=quantized, opset=opset, dla_core=dla)
            if "pack_int4_weights" in passes:
                options["pack_int4_weights"] = {"block_scales": int4_block_scales(export_model, before)}
            if "integer_dataflow" in passes:  # calibrates the new uint8 points on the user's images
                options["integer_dataflow"] = {"calibration": calibration_images(opts, task=task)}
            result = run_surgery(before, passes, target=target.name, dla_core=dla, pass_options=options)
            concat_form = None
            if not quantized and FOLD_DENSE_CONCATS[target.backend] == TIMED:
                result, concat_form = choose_concat_form(result, target.name, staging)
                notes.append(f"dense concatenations: the {concat_form['chosen']} form, the faster one here "
                             f"with {concat_form['intra_op_threads']} thread(s) at batch 1 (median ms: "
                             + ", ".join(f"{k} {v:.2f}" for k, v in concat_form["median_ms_batch1"].items())
                             + ")")
            int8_form = None
            if "integer_dataflow" in result.passes and target.backend == "onnxruntime":
                variant_gate = _variant_gate(opts, task, reference_onnx, eval_set, eval_root, evaluate_landmarks,
                                             progress)
                result, int8_form = choose_int8_form(result, before, options, target.name, staging, variant_gate)
                chosen = int8_form["chosen"]
                notes.append(f"INT8 integer form: relu_form {chosen['relu_form']}, {chosen['intra_op_threads']} "
                             f"thread(s), thread pool {chosen['thread_pool']}: the fastest here that passes the gate "
                             f"({int8_form['cpu']['int8_isa']}; median ms: "
                             + ", ".join(f"{k} {v:.2f}" for k, v in int8_form["median_ms_batch1"].items()) + ")")
            onnx_path = staging / "model.onnx"
            onnx.save(result.model, onnx_path)
            raw.unlink()
            mem_before, mem_after = activation_memory(before), activation_memory(result.model)
            manifest["surgery"] = {
                **result.to_dict(),
                "peak_activation_bytes_before": mem_before["peak_bytes"],
                "peak_activation_bytes_after": mem_after["peak_bytes"],
                "concat_bytes_before": mem_before["concat_output_bytes"],
                "concat_bytes_after": mem_after["concat_output_bytes"],
                "dense_concat_form": concat_form,
                "int8_cpu_form": int8_form,
            }
            findings = lint_model(result.model, target.name, dla_core=dla)
            errors = [f for f in findings if f.severity == "error"]
            manifest["lint"] = [asdict(f) if hasattr(f, "__dataclass_fields__") else dict(f) for f in findings]
            if errors:
                first = errors[0]
                where = target.name + (f" DLA core {dla}" if dla is not None else "")
                raise CUNetError(f"lint for {where}: {len(errors)} error(s), first: [{first.rule}] "
                                 f"{first.node}: {first.message}; fix: {first.fix}")
            if quantized:
                from cunet_optimize.quant.legacy_cache import write_legacy_cache

                scales = legacy_cache_scales(result.model)
                if scales:
                    write_legacy_cache(staging / "calibration.cache", scales)

        with timer.stage("engine", f"{target.backend} for {target.name}"):
            engine_options = {"trt_major": opts.trt_major} if opts.trt_major else {}
            if dla is not None:
                engine_options["dla_core"] = dla
            if concat_form is not None:  # the thread count was timed with the form
                engine_options["intra_op_threads"] = concat_form["intra_op_threads"]
            if int8_form is not None:  # thread count and pool settings were timed with the form
                engine_options["intra_op_threads"] = int8_form["chosen"]["intra_op_threads"]
                engine_options["session_config"] = int8_form["chosen"]["session_config"]
            if target.backend == "onnxruntime" and engine_precision(opts) == "int8":
                engine_options["qdq_flavour"] = ("uint8-integer-dataflow" if "integer_dataflow" in result.passes
                                                 else "int8-symmetric")
            build = get_builder(target.name).build(onnx_path, target.name, engine_precision(opts), staging,
                                                    engine_options or None)
            manifest.update(backend=build.backend, backend_version=build.backend_version,
                            engine_built=build.engine_built, engine_settings=build.settings)
            # relative to the build folder, which is renamed into place at the end
            manifest["artifacts"] = {role: os.path.relpath(os.path.abspath(p), staging.resolve())
                                     for role, p in build.artifacts.items()}
            manifest["artifacts"].setdefault("onnx", "model.onnx")
            if (staging / "calibration.cache").exists():
                manifest["artifacts"]["legacy_calibration_cache"] = "calibration.cache"
            notes += [n for n in build.notes if n not in notes]

        with timer.stage("accuracy", f"{task.metric} on {len(eval_set)} images vs the FP32 reference "
                                     "(ONNX Runtime)"):
            manifest["accuracy"] = _accuracy_gate(opts, task, staging, build, onnx_path, reference_onnx, eval_set,
                                                  eval_root, evaluate_landmarks, progress)
            reference_onnx.unlink()
        manifest["timings_seconds"] = timer.seconds
        echo(timer.summary())
        # builders name the staging folder; users will find the build under its final name
        notes = [n.replace(staging.name, final.name) for n in notes]
        manifest["notes"] = notes
        (staging / BUILD_FILE).write_text(checked_build_json(manifest))  # typed: manifests/build.py
        if not manifest["accuracy"]["passed"] and opts.accuracy_gate:
            acc = manifest["accuracy"]
            raise CUNetError(
                f"accuracy gate failed: {acc['metric']} {acc['quantized_value']:.3f}% vs FP32 "
                f"{acc['reference_value']:.3f}% ({acc['degradation_points']:.3f} points worse > "
                f"{acc['tolerance']}); try --calib-method entropy, more --calib-images, --qat, "
                f"or {task.gate_option} / --no-accuracy-gate to accept it"
            )
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return BuildReport(name, str(final), manifest, notes)


def quantize_and_calibrate(opts: BuildOptions, model, ckpt_path: Path, timer: StageTimer, progress: bool):
    """The fake-quantized model with calibrated scales (cached in calib/<id>/), or the
    model of a QAT checkpoint; and what to record about it."""
    from cunet_optimize.quant import activation_scales, parse_precision

    if opts.qat_checkpoint:
        from cunet_optimize.quant.qat import load_qat_checkpoint

        with timer.stage("calibrate", f"scales from the QAT checkpoint {opts.qat_checkpoint}"):
            qmodel = load_qat_checkpoint(opts.qat_checkpoint)
            # the checkpoint's scheme (concat placement included) is what gets exported
            if opts.precision == "auto" and not getattr(qmodel, "layer_formats", None):
                raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint is {qmodel.scheme.spec}, not an auto plan; "
                                 f"build it with --precision {qmodel.scheme.spec}, or run qat --plan BUILD.json")
            if opts.precision != "auto" and qmodel.scheme.weight_bits != parse_precision(opts.precision).weight_bits:
                raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint is {qmodel.scheme.spec}, "
                                 f"not {opts.precision}")
            wanted = concat_placement(base_precision(opts), opts.concat_qdq)
            if (opts.concat_qdq is not None or wanted != "none") and placement_of(qmodel.scheme) not in (None, wanted):
                raise CUNetError(f"{opts.qat_checkpoint}: QAT checkpoint places INT8 Q/DQ "
                                 f"{PLACEMENT_WORDS[placement_of(qmodel.scheme)]}, but the build asks for "
                                 f"{PLACEMENT_WORDS[wanted]}; drop --concat-qdq / the modifier, or run qat with it")
            return qmodel.eval(), {"method": "qat", "checkpoint": str(opts.qat_checkpoint)}
    model_sha = sha256_file(ckpt_path)
    from cunet_optimize.engines.targets import get_target

    scheme = quant_scheme(base_precision(opts), opts.concat_qdq, get_target(opts.target).backend)
    alpha = equalize_alpha_for(scheme, opts.equalize_alpha)
    calib_set, calib_root = open_dataset_or_default(opts.calib_data, opts.calib_split, task_of_model(model))
    images = min(opts.calib_images, len(calib_set))
    cid = calibration_id(model_sha, calib_root, opts.calib_split, opts.calib_method, scheme.spec,
                         opts.calib_images, alpha)
    cache = CalibrationCache(Path(opts.workdir) / "calib" / cid, equalized=alpha is not None)
    cached = cache.reusable()
    what = f"{opts.calib_method} over {images} images"
    if alpha is not None:
        what += f", equalization alpha {alpha:g}"
    with timer.stage("calibrate", what + (" (cached)" if cached else "")):
        if cached:
            qmodel, report = cache.load(model, scheme)
        else:
            qmodel, factors, eq_report = distributed.on_every_rank(
                calibrate_shared, model, scheme, calib_set, opts.calib_images, opts.calib_method, alpha, progress)
            report = eq_report.to_dict() if eq_report else None
            cache.store(qmodel, factors, opts.calib_method, report, model_sha256=model_sha,
                        data=str(calib_root.resolve()), split=opts.calib_split, images=images, scheme=scheme.spec)
    qmodel.eval()
    if opts.layer_formats:  # an auto plan: the calibrated int8 model with its per-conv formats
        from cunet_optimize.quant.auto import with_layer_formats

        qmodel = with_layer_formats(qmodel, opts.layer_formats)
    scales = activation_scales(qmodel)
    few = dict(sorted(scales.items(), key=lambda kv: -kv[1])[:8])
    return qmodel, {"method": opts.calib_method, "id": cid, "cached": cached, "scales_file": str(cache.scales_file.resolve()),
                    "images": images, "data": str(calib_root.resolve()), "scheme": scheme.spec,
                    "equalization": report, "ranges": {k: v * 127 for k, v in few.items()}}


def calibrate_shared(model, scheme, calib_set, images: int, method: str, alpha: float | None, progress: bool):
    """post_training_quantize over the first `images` calibration images, run by every rank
    under torchrun (distributed.on_every_rank): each observes its part of every batch and the
    statistics are merged, so the scales are one process's."""
    from cunet_optimize.quant import post_training_quantize

    batches = distributed.agreed(lambda: list(calibration_batches(calib_set, images)))
    return post_training_quantize(model, scheme, batches, method, alpha, progress=progress and distributed.is_main())


def _variant_gate(opts, task, reference_onnx, eval_set, eval_root, evaluate_landmarks, progress):
    """accuracy_check for choose_int8_form: a variant ONNX under ONNX Runtime's full
    optimisation with its session settings, against the FP32 reference (reference_accuracy:
    evaluated once, and read back by the final gate)."""
    from dataclasses import replace

    from cunet_optimize.engines.onnxrt import OnnxRuntimeSessionRunner, OrtSettings

    def check(onnx_path: Path, settings: OrtSettings) -> dict:
        reference = reference_accuracy(Path(opts.workdir), reference_onnx, eval_set, eval_root, opts.eval_split,
                                       evaluate_landmarks, progress)
        reference_value = task.headline(reference.metrics)
        got = distributed.on_every_rank(
            evaluate_runner, OnnxRuntimeSessionRunner(onnx_path, replace(settings, optimization="all"),
                                                      load_optimization="all"),
            eval_set, evaluate_landmarks, progress, f"variant {onnx_path.stem}")
        value = task.headline(got.metrics)
        worse = task.degradation(value, reference_value)
        return {"metric": task.metric, "value": value, "reference_value": reference_value,
                "degradation_points": worse, "tolerance": opts.tolerance(task),
                "passed": bool(worse <= opts.tolerance(task))}

    return check


def _accuracy_gate(opts, task, staging, build, onnx_path, reference_onnx, eval_set, eval_root, evaluate_landmarks,
                   progress):
    """The deployed model's headline metric (NME or PCKh) against the FP32 export's, and the
    verdict against the task's tolerance (`BuildOptions.tolerance`)."""
    from cunet_optimize.engines.onnxrt import OnnxRuntimeReferenceRunner, OnnxRuntimeRunner

    reference = reference_accuracy(Path(opts.workdir), reference_onnx, eval_set, eval_root, opts.eval_split,
                                   evaluate_landmarks, progress)
    if build.backend == "onnxruntime" and build.engine_built:
        runner, runtime = OnnxRuntimeRunner(staging), f"ONNX Runtime {build.backend_version} CPU (the built engine)"
    else:
        # No engine here: the Q/DQ ONNX, run exactly by ONNX Runtime, is the source of truth.
        runner = OnnxRuntimeReferenceRunner(onnx_path)
        runtime = "ONNX Runtime CPU reference (ORT_DISABLE_ALL) of the deployed ONNX; no TensorRT engine here"
    candidate = distributed.on_every_rank(evaluate_runner, runner, eval_set, evaluate_landmarks, progress, "engine")
    ref_value, value = task.headline(reference.metrics), task.headline(candidate.metrics)
    worse = task.degradation(value, ref_value)
    tolerance = opts.tolerance(task)
    gate = {
        "runtime": runtime,
        "reference_runtime": f"ONNX Runtime CPU (ORT_ENABLE_ALL) of the FP32 export{reference.cached}",
        "data": reference.settings,
        "task": task.name,
        "metric": task.metric,
        "metric_key": task.metric_key,
        "higher_is_better": not task.lower_is_better,
        "reference": reference.metrics,
        "quantized": candidate.metrics,
        "reference_value": ref_value,
        "quantized_value": value,
        "degradation_points": worse,  # positive = worse than FP32, in the metric's percentage points
        "tolerance": tolerance,
        "tolerance_option": task.gate_option,
        "passed": bool(worse <= tolerance),
        "gate_enforced": opts.accuracy_gate,
    }
    if task is FACE:
        gate["nme_increase_percent_points"] = worse
        gate["nme_ratio"] = value / max(ref_value, 1e-12)
    else:
        gate["pckh_decrease_points"] = worse
    return gate


def _jsonable(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return json.loads(json.dumps(asdict(obj), default=str))
    return obj


__all__ = ["BuildOptions", "BuildReport", "run_build"]
