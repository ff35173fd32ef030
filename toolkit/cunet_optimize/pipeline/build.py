"""`cunet-optimize build`: checkpoint -> deployable engine for one target, as a straight line.

    model -> (calibrate | QAT checkpoint) -> export ONNX -> surgery -> lint -> engine
          -> accuracy gate against the FP32 reference -> build.json

`run_stages` runs every check that needs no work, then one function per stage. The work
is done where each idea lives: quant/policy.py (what is quantized how), quant/calib_cache.py
(calib/<id>/), exporters/, surgery/, pipeline/autotune.py (the graph forms timed on this machine),
engines/, pipeline/fp32_reference.py (what the gate compares against).

Every check that needs no work runs before anything is written (a refused build leaves
the workdir as it was), then the build takes the workdir's lock (workdir_lock.py). Everything
is written into a hidden staging folder and renamed into engines/<model>-<precision>-<target>/
only when the build succeeded, so an interrupted or failed build leaves nothing half-written;
an existing build is replaced only with force=True, and only if it is a build (a folder with
build.json): nothing else in engines/ is ever deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from cunet_optimize import __version__, distributed
from cunet_optimize.atomic import replace_folder, sha256_file
from cunet_optimize.data.face300w import CALIB_DATA_FLAGS, EVAL_DATA_FLAGS
from cunet_optimize.errors import CUNetError
from cunet_optimize.evaluation import evaluate_runner
from cunet_optimize.pipeline.fp32_reference import reference_accuracy
from cunet_optimize.manifests.build import BUILD_FILE, BUILD_SCHEMA, checked_build_json, record_artifact_hashes
from cunet_optimize.models import resolve_model
from cunet_optimize.quant.calib_cache import CalibrationCache, calibration_id
from cunet_optimize.quant.onnx_scales import int4_block_scales, legacy_cache_scales
from cunet_optimize.quant.policy import (base_precision, canonical_precision, check_placement_request,
                                         check_precision_options, check_qat_checkpoint,
                                         engine_precision, equalize_alpha_for, exports_qdq, int4_block_for,
                                         precision_notes,
                                         quant_scheme, quantizes)
from cunet_optimize.tasks import (FACE, POSE, Task, calibration_batches, calibration_images, check_data_task,
                                  open_dataset_or_default, task_of_model)

if TYPE_CHECKING:
    import torch

    from cunet_optimize.targets import TargetSpec


# The defaults of `build`, which `calibrate`, `qat` and the Python API (api.py) share: the
# argparse options read them from here, so a command line and a Python call mean the same.
DEFAULT_PRECISION = "int8"
DEFAULT_TARGET = "cpu"
DEFAULT_CALIB_METHOD = "percentile"
DEFAULT_CALIB_IMAGES = 128
DEFAULT_EVAL_SPLIT = "test"
DEFAULT_AUTO_HELDOUT_IMAGES = 64
# The CPU runtime a cpu build deploys on: "auto" times every installed one (ONNX Runtime, and
# OpenVINO with its extra) and keeps the fastest that passes the gate; the others pin one.
CPU_RUNTIME_CHOICES = ("auto", "onnxruntime", "openvino")
# Sets --cpu-runtime's default (CLI and API alike); the test suite pins onnxruntime with it so its
# many small builds neither spend time on OpenVINO's candidates nor depend on which one wins.
CPU_RUNTIME_ENV = "CUNET_CPU_RUNTIME"




@dataclass
class BuildOptions:
    precision: str = DEFAULT_PRECISION  # any spelling; kept as quant.policy.canonical_precision's (names, build.json)
    target: str = DEFAULT_TARGET
    model: str | None = None  # checkpoint or registered name; None = embedded default
    qat_checkpoint: str | None = None  # a `cunet-optimize qat` output to export instead of PTQ
    calib_data: str | None = None
    calib_split: str | None = "calib"
    calib_method: str = DEFAULT_CALIB_METHOD
    calib_images: int = DEFAULT_CALIB_IMAGES
    concat_qdq: str | None = None  # Q/DQ on the dense concatenations: none | tied | untied (None: as the precision says, else none)
    # None: no activation equalization; "default": quant.policy.DEFAULT_EQUALIZE_ALPHA for INT8 weights only
    equalize_alpha: float | str | None = "default"
    eval_data: str | None = None
    eval_split: str = DEFAULT_EVAL_SPLIT
    max_nme_increase: float = FACE.default_tolerance  # the gate of face models, NME points
    max_pckh_decrease: float = POSE.default_tolerance  # the gate of pose models, PCKh points
    accuracy_gate: bool = True
    trt_major: int | None = None
    dla_core: int | None = None  # build for this DLA core of a Jetson Orin target (static batch 1)
    exporter: str | None = None  # torch.onnx exporter: legacy | dynamo (None: export_onnx's default)
    landmarks: bool = False  # append the in-graph landmark decoder (exporters/landmarks.py) to the deployed graph
    cpu_runtime: str | None = None  # one of CPU_RUNTIME_CHOICES; None: $CUNET_CPU_RUNTIME or auto (cpu builds)
    workdir: str = "."
    force: bool = False
    name: str | None = None
    command: str = ""
    # --precision auto (quant/auto.py): {conv name: int4|int8|float} of the plan being built,
    # the search's objective (size | latency), grain (conv | block; None: by model size), the
    # held-out calibration images its joint runs are measured on and the first of them its
    # single-group sensitivity is measured on
    layer_formats: dict | None = None
    objective: str = "size"
    auto_grain: str | None = None
    auto_heldout_images: int = DEFAULT_AUTO_HELDOUT_IMAGES
    auto_sensitivity_images: int | None = None  # None: quant.auto.DEFAULT_SENSITIVITY_IMAGES

    def __post_init__(self) -> None:  # one spelling, and no self-contradiction, before any work
        self.precision = canonical_precision(self.precision)
        check_precision_options(self)

    def tolerance(self, task: Task) -> float:
        """The accuracy gate's allowed degradation for `task`, in its metric's points."""
        return self.max_nme_increase if task is FACE else self.max_pckh_decrease


@dataclass
class BuildReport:
    name: str
    path: str
    manifest: dict
    notes: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> dict:
        """build.json's accuracy gate: the metric, the FP32 reference's and the build's value, the verdict."""
        return self.manifest["accuracy"]


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


# A build folder's name: one plain path component that `profile` lists (no leading dot:
# hidden, like the staging folders; no leading dash: read as an option by the commands
# that take it).
BUILD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_build_name(name: str) -> str:
    """`name` if it is a plain build folder name (BUILD_NAME), else a CUNetError."""
    if not BUILD_NAME.fullmatch(name) or name in (".", ".."):
        raise CUNetError(f"--name {name!r} is not a build folder name: use letters, digits, '.', '_', '+', '-', "
                         "starting with a letter or digit, without '/' (the build goes to WORKDIR/engines/NAME)")
    return name


def default_build_name(stem: str, precision: str, target: str, dla: int | None, landmarks: bool = False) -> str:
    """<model>-<precision>-<target>[-dla<N>][-landmarks], the model part reduced to BUILD_NAME's
    characters (a checkpoint named `.face.safetensors` or `my model.pth` still names its build);
    a build with the decoder is another graph, so it does not take the plain build's name."""
    model = re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).strip(".-_+") or "model"
    return (f"{model}-{precision}-{target}" + (f"-dla{dla}" if dla is not None else "")
            + ("-landmarks" if landmarks else ""))


def _final_dir(workdir: Path, name: str, force: bool) -> Path:
    """WORKDIR/engines/<name>, refused when it holds anything --force may not replace."""
    final = workdir / "engines" / name
    if final.is_symlink() or final.exists() and not final.is_dir():
        raise CUNetError(f"{final} exists and is not a build folder; move it away or choose another --name")
    if final.exists():
        if not (final / BUILD_FILE).is_file():
            raise CUNetError(f"{final} exists and is not a build (no {BUILD_FILE}); --force replaces builds only: "
                             "move it away or choose another --name")
        if not force:
            raise CUNetError(f"{final} already exists; pass --force to replace it (or --name to build beside it)")
    return final


def check_workdir(workdir: str | os.PathLike) -> Path:
    """--workdir as a folder (it may not exist yet); a file there is a CUNetError."""
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise CUNetError(f"--workdir {workdir}: is a file, not a folder; choose a folder for engines/ and calib/")
    return path


@dataclass
class _Checked:
    """What `check_build` found, before anything is written."""

    opts: BuildOptions
    target: TargetSpec
    dla: int | None
    support_note: str
    exporter: str  # exporters/onnx_export.py check_exporter's choice
    model: torch.nn.Module
    ckpt_path: Path
    source: str
    task: Task
    name: str
    workdir: Path
    eval_data: tuple  # (data set, its root) the accuracy is measured on
    calib_data: tuple | None  # (data set, its root) of PTQ calibration; None when nothing is calibrated


@dataclass
class _Build(_Checked):
    """One build in progress, after its checks: what its stages share, and the build.json they
    fill in the staging folder (renamed to `final` only when every stage passed)."""

    final: Path
    staging: Path
    timer: StageTimer
    manifest: dict
    notes: list[str]
    progress: bool
    # ONNX forms OpenVINO is timed on beyond model.onnx (label -> file in the staging folder)
    ov_forms: dict = field(default_factory=dict)

    @property
    def eval_set(self):
        return self.eval_data[0]

    @property
    def eval_root(self) -> Path:
        return self.eval_data[1]

    @property
    def quantized(self) -> bool:
        return quantizes(self.opts.precision)

    @property
    def raw_onnx(self) -> Path:  # the export, before surgery
        return self.staging / "export.onnx"

    @property
    def reference_onnx(self) -> Path:  # the FP32 export the accuracy gate compares against
        return self.staging / "reference-fp32.onnx"

    @property
    def onnx_path(self) -> Path:  # the deployed graph
        return self.staging / "model.onnx"


def check_build(opts: BuildOptions) -> _Checked:
    """Every check of a build that needs no work and writes nothing: workdir, target, DLA core,
    precision, Q/DQ placement, exporter, model, the data's task, the build's name and an
    existing build of that name."""
    from cunet_optimize.targets import check_dla_core, check_precision, get_target
    from cunet_optimize.exporters.onnx_export import check_exporter

    workdir = check_workdir(opts.workdir)
    if opts.name is not None:
        check_build_name(opts.name)
    target = get_target(opts.target)
    dla = check_dla_core(target, opts.dla_core)
    support = check_precision(target, engine_precision(opts), on_dla=dla is not None)
    if engine_precision(opts) == "bf16":
        from cunet_optimize.engines.openvino import check_bf16_here

        check_bf16_here()  # the CPU's ISA and OpenVINO, before any work
    check_cpu_runtime(opts, target)
    check_placement_request(opts, target.backend)
    exporter = check_exporter(opts.exporter, opts.precision)  # before any calibration
    model, ckpt_path, source, stem = resolve_model(opts.model)
    task = check_data_task(model, source, opts.calib_data, opts.eval_data)
    name = opts.name or default_build_name(stem, opts.precision, target.name, dla, opts.landmarks)
    _final_dir(workdir, name, opts.force)
    # the data sets are opened (listed and their annotations read) now: a missing split or a
    # bad sample is refused before the workdir is touched
    eval_data = open_dataset_or_default(opts.eval_data, opts.eval_split, task, EVAL_DATA_FLAGS)
    calibrates = quantizes(opts.precision) and not opts.qat_checkpoint
    calib_data = (open_dataset_or_default(opts.calib_data, opts.calib_split, task, CALIB_DATA_FLAGS)
                  if calibrates else None)
    return _Checked(opts, target, dla, getattr(support, "note", ""), exporter, model, ckpt_path, source, task,
                    name, workdir, eval_data, calib_data)


@contextmanager
def locked_workdir(workdir: Path, lock: bool = True):
    """The workdir's lock (a second build here waits for this one), then the staging folders of
    killed builds removed: safe only while holding it. lock=False: the caller holds it."""
    from cunet_optimize.workdir_lock import remove_stale_partials, workdir_lock

    if not lock:
        yield
        return
    with workdir_lock(workdir, "cunet-optimize build"):
        remove_stale_partials(workdir / "engines")
        yield


def run_stages(opts: BuildOptions, echo=print, progress: bool = True, *, lock: bool = True,
               commit: bool = True) -> BuildReport:
    """Build `opts` (an `auto` precision with its plan) into engines/<name>/: every check
    that needs no work first, then, holding the workdir's lock, the stages in order (calibrate,
    export, surgery + lint, engine, accuracy), each filling its part of build.json.
    commit=False leaves the finished build in its staging folder (the report's path) for the
    caller to rename (atomic.replace_folder) or remove; lock=False: the caller holds the
    workdir's lock. pipeline.run_build is the entry that also searches `auto` plans."""
    if opts.precision == "auto" and opts.layer_formats is None:
        raise ValueError("run_stages builds a plan; pipeline.run_build searches one for --precision auto")
    checked = check_build(opts)
    with locked_workdir(checked.workdir, lock):
        b = _start(checked, echo, progress)
        try:
            _record_inputs(b)
            export_model = _calibrate(b)
            opset = _export(b, export_model)
            result, concat_form, int8_form = _surgery(b, export_model, opset)
            build = _engine(b, result, concat_form, int8_form)
            _accuracy(b, build)
            _deploy(b, build)
            report = _finish(b)
            if commit:
                replace_folder(b.staging, b.final)
                report.path = str(b.final)
            return report
        except BaseException:
            shutil.rmtree(b.staging, ignore_errors=True)
            raise
        finally:
            if commit and b.staging.exists():
                shutil.rmtree(b.staging, ignore_errors=True)


def _start(c: _Checked, echo, progress: bool) -> _Build:
    """The staging folder and the manifest's header, holding the workdir's lock (an existing
    build is checked again: another build may have finished while this one waited)."""
    final = _final_dir(c.workdir, c.name, c.opts.force)
    (c.workdir / "engines").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{c.name}.partial-", dir=c.workdir / "engines"))
    manifest: dict = {"schema": BUILD_SCHEMA, "name": c.name, "toolkit_version": __version__,
                      "command": c.opts.command, "precision": c.opts.precision, "target": c.target.name,
                      "dla_core": c.dla, "target_spec": c.target.to_dict()}
    return _Build(**vars(c), final=final, staging=staging,
                  timer=StageTimer(total=5 if quantizes(c.opts.precision) else 4, echo=echo), manifest=manifest,
                  notes=([c.support_note] if c.support_note else []) + precision_notes(c.opts), progress=progress)


def _record_inputs(b: _Build) -> None:
    """The model and the evaluation set, as build.json records them."""
    b.manifest["model"] = {"source": b.source, "checkpoint": str(b.ckpt_path), "sha256": sha256_file(b.ckpt_path),
                           "config": b.model.config.to_dict()}
    b.manifest["eval_data"] = {"folder": str(b.eval_root.resolve()), "split": b.opts.eval_split,
                               "images": len(b.eval_set), "crop": b.eval_set.crop_policy, "task": b.task.name}


def _calibrate(b: _Build):
    """Stage 1 of quantized builds: the fake-quantized model to export (the float model otherwise)."""
    if not b.quantized:
        return b.model
    export_model, calib_info = quantize_and_calibrate(b.opts, b.model, b.ckpt_path, b.timer, b.progress,
                                                      calib_data=b.calib_data)
    b.manifest["calibration"] = calib_info
    if b.opts.qat_checkpoint and b.opts.layer_formats is not None:  # `qat --plan`: no search records the plan
        from cunet_optimize.models.cunet import INPUT_SIZE
        from cunet_optimize.pipeline.plans import qat_plan_record

        b.manifest["auto"] = qat_plan_record(export_model, b.target, b.opts.tolerance(b.task),
                                             (INPUT_SIZE, INPUT_SIZE), plan_float_type(b.opts, b.target))
    return export_model


def _export(b: _Build, export_model) -> int:
    """The ONNX export to deploy and the FP32 reference export, both verified in ONNX Runtime;
    returns the opset (deployed_export_form)."""
    from cunet_optimize.exporters import export_onnx

    opset, fp16 = deployed_export_form(export_model, b.quantized, b.target, b.opts)
    with b.timer.stage("export", f"ONNX opset {opset} ({b.opts.precision}), verified in ONNX Runtime"):
        # DLA builds static shapes only: batch 1, as the plan's profile (min = opt = max)
        summary = export_onnx(export_model, b.raw_onnx, opset=opset, fp16=fp16,
                              dynamic_batch=b.dla is None, exporter=b.exporter)
        if export_model is b.model and b.opts.precision == "fp32":
            shutil.copyfile(b.raw_onnx, b.reference_onnx)  # the same export: verified once
        else:
            export_onnx(b.model, b.reference_onnx, exporter=b.exporter)
        b.manifest["export"] = _jsonable(summary)
    return opset


def computes_in_fp16(target, opts) -> bool:
    """Whether the exported graph computes in FP16: asked for, or what a strongly typed
    TensorRT plan takes precision from (e.g. INT4 weights dequantized to FP16 on TensorRT 11)."""
    from cunet_optimize.engines.trt_plan import make_build_plan

    if opts.precision == "fp16":
        return True
    if target.backend != "tensorrt":
        return False
    plan = make_build_plan(target, engine_precision(opts), "model.onnx", trt_major=opts.trt_major,
                           dla_core=opts.dla_core)
    return plan.onnx_form.endswith("fp16-cast")


def deployed_export_form(export_model, quantized: bool, target: TargetSpec, opts) -> tuple[int, bool]:
    """(opset, fp16) of the graph a build deploys (also api.export's): opset 21 for INT4 weights,
    at least 19 for FP16 Q/DQ scales (e.g. strongly typed DLA on TensorRT 11), else 17; FP16
    compute when asked for or when the target's plan takes it (computes_in_fp16)."""
    fp16 = computes_in_fp16(target, opts)
    opset = 17
    if quantized:
        int4_convs = "int4" in getattr(export_model, "layer_formats", {}).values()
        opset = 21 if export_model.scheme.weight_bits == 4 or int4_convs else 17
        if fp16:
            opset = max(opset, 19)
    return opset, fp16


def _surgery(b: _Build, export_model, opset: int):
    """The target's graph passes, the graph forms timed on ONNX Runtime, then the lint; the
    deployed graph is saved as model.onnx. Returns (SurgeryResult, concat form, INT8 form)."""
    from cunet_optimize.surgery import activation_memory, default_passes, run_surgery
    from cunet_optimize.surgery.integer_dataflow import CALIBRATION_IMAGES
    from cunet_optimize.surgery.batchnorm import batchnorm_record

    with b.timer.stage("surgery", f"graph passes for {b.target.name}, then lint"):
        before = onnx.load(b.raw_onnx)
        options = {}
        passes = default_passes(b.target.name, quantized=exports_qdq(b.opts.precision), opset=opset, dla_core=b.dla)
        if "pack_int4_weights" in passes:
            options["pack_int4_weights"] = {"block_scales": int4_block_scales(export_model, before)}
        if "integer_dataflow" in passes:  # calibrates the new uint8 points on the user's images
            count = min(CALIBRATION_IMAGES, b.opts.calib_images)
            options["integer_dataflow"] = {"calibration": calibration_images(b.opts.calib_data, b.opts.calib_split,
                                                                             count, b.task)}
        result = run_surgery(before, passes, target=b.target.name, dla_core=b.dla, pass_options=options)
        result, concat_form, int8_form = _timed_forms(b, result, options)
        if b.opts.landmarks:  # after the passes and the timed forms: they are the network's, not the decoder's
            from cunet_optimize.exporters.landmarks import append_landmark_decoder

            result.model = append_landmark_decoder(result.model)
        onnx.save(result.model, b.onnx_path)
        if b.opts.landmarks:
            b.manifest["landmarks"] = _verified_landmarks(b.onnx_path)
        b.raw_onnx.unlink()
        mem_before, mem_after = activation_memory(before), activation_memory(result.model)
        b.manifest["surgery"] = {
            **result.to_dict(),
            "peak_activation_bytes_before": mem_before["peak_bytes"],
            "peak_activation_bytes_after": mem_after["peak_bytes"],
            "concat_bytes_before": mem_before["concat_output_bytes"],
            "concat_bytes_after": mem_after["concat_output_bytes"],
            "dense_concat_form": concat_form,
            "int8_cpu_form": int8_form,
            "batchnorm": batchnorm_record(result.model, result.reports, b.target.backend),
        }
        _lint(b, result.model)
        if b.quantized:
            _write_legacy_cache(b, result.model)
    return result, concat_form, int8_form


def _verified_landmarks(onnx_path: Path) -> dict:
    """build.json's record of the decoder, checked as the export checks its own (onnx_export):
    on one image in ONNX Runtime's reference session, the landmarks output equals the NumPy
    decoding of the graph's heatmaps."""
    import numpy as np

    from cunet_optimize.engines.onnxrt import OnnxRuntimeReferenceRunner
    from cunet_optimize.engines.base import LANDMARK_UNITS, LANDMARKS
    from cunet_optimize.exporters.landmarks import landmark_decoding_error
    from cunet_optimize.exporters.onnx_export import LANDMARK_TOLERANCE
    from cunet_optimize.models.cunet import INPUT_SIZE

    image = np.random.default_rng(0).random((1, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    with OnnxRuntimeReferenceRunner(onnx_path) as runner:
        outputs = runner.infer_all(image)
        heatmaps = outputs[runner.head_name]
    worst = landmark_decoding_error(heatmaps, outputs[LANDMARKS])
    if not worst <= LANDMARK_TOLERANCE:
        raise CUNetError(f"build --landmarks: the appended decoder differs from decode_heatmaps(method='quarter') by "
                         f"{worst:.3g} px (allowed {LANDMARK_TOLERANCE}); this is a bug, report it")
    return {"output": LANDMARKS, "shape": list(outputs[LANDMARKS].shape[1:]), "units": LANDMARK_UNITS,
            "verified": f"equal to decode_heatmaps(quarter) of the graph's heatmaps on one image in ONNX Runtime "
                        f"(max diff {worst:.2g} px)"}


def _timed_forms(b: _Build, result, options: dict):
    """On ONNX Runtime: the faster dense-concat form of a float graph, and the fastest INT8
    integer form that passes the gate (pipeline/autotune.py); each choice is noted."""
    from cunet_optimize.engines.onnxrt import OnnxRuntimeSessionRunner, OrtSettings
    from cunet_optimize.pipeline.autotune import EXACT_INT8_CPU_FORM, choose_concat_form, choose_int8_form, \
        int8_form_path
    from cunet_optimize.surgery.pipeline import FOLD_DENSE_CONCATS, TIMED

    concat_form = None
    # bf16 never runs on ONNX Runtime: its timings would choose nothing that runs
    if not b.quantized and FOLD_DENSE_CONCATS[b.target.backend] == TIMED and engine_precision(b.opts) != "bf16":
        result, concat_form = choose_concat_form(result, b.target.name, b.staging)
        b.notes.append(f"dense concatenations: the {concat_form['chosen']} form, the faster one here "
                       f"with {concat_form['intra_op_threads']} thread(s) at batch 1 (median ms: "
                       + ", ".join(f"{k} {v:.2f}" for k, v in concat_form["median_ms_batch1"].items())
                       + ")")
    int8_form = None
    if "integer_dataflow" in result.passes and b.target.backend == "onnxruntime":
        exact_engine = None
        if not b.opts.accuracy_gate:
            # as for OpenVINO's candidates (_cpu_runtime): with the gate off, a form that changes
            # outputs is held to the exact form's engine, not to FP32
            exact_engine = OnnxRuntimeSessionRunner(int8_form_path(b.staging, EXACT_INT8_CPU_FORM),
                                                    OrtSettings(optimization="all"), load_optimization="all")
        variant_gate = _variant_gate(b, exact_engine, f"ONNX Runtime's engine of the {EXACT_INT8_CPU_FORM} form "
                                                      "(the accuracy gate is off)")
        before_integer = result.before_last
        result, int8_form = choose_int8_form(result, options, b.target.name, b.staging, variant_gate)
        chosen = int8_form["chosen"]
        b.notes.append(f"INT8 integer form: relu_form {chosen['relu_form']}, {chosen['intra_op_threads']} "
                       f"thread(s), thread pool {chosen['thread_pool']}: the fastest here that passes the gate "
                       f"({int8_form['cpu']['int8_isa']}; median ms: "
                       + ", ".join(f"{k} {v:.2f}" for k, v in int8_form["median_ms_batch1"].items()) + ")")
        if _times_openvino(b):
            # OpenVINO runs explicit Q/DQ with integer kernels: the symmetric Q/DQ graph, before the
            # uint8 dataflow that suits ONNX Runtime's kernels, is a form of its own
            b.ov_forms["qdq-symmetric"] = b.staging / "form-qdq-symmetric.onnx"
            onnx.save(before_integer, b.ov_forms["qdq-symmetric"])
    return result, concat_form, int8_form


# Build precisions the CPU runtime choice times OpenVINO for: all the cpu target's. INT4 and auto plans
# (per-channel INT4 integers, integer dataflow) run on OpenVINO's integer kernels at INT8's speed; the
# auto search itself (its latency objective) still counts ONNX Runtime's costs.
OPENVINO_PRECISIONS = ("fp32", "int8", "int4", "bf16")


def plan_float_type(opts: BuildOptions, target) -> str:
    """What an auto plan's float convs run as (quant/auto.py float_type): bf16 on a CPU target
    where this machine runs it and the CPU runtime may be OpenVINO, else the target's float."""
    from cunet_optimize.engines.openvino import bf16_runs_here
    from cunet_optimize.quant.auto import float_type

    bf16 = target.device == "cpu" and opts.cpu_runtime != "onnxruntime" and bf16_runs_here()
    return float_type(target, bf16_here=bf16)


def _times_openvino(b: _Build) -> bool:
    """Whether this build times OpenVINO beside ONNX Runtime: a CPU build of OPENVINO_PRECISIONS (an
    auto plan's builds too) where OpenVINO is installed (without the extra, nothing changes), unless
    --cpu-runtime pins ONNX Runtime."""
    from cunet_optimize.engines.openvino import openvino_version

    return (b.target.device == "cpu" and engine_precision(b.opts) in OPENVINO_PRECISIONS
            and b.opts.cpu_runtime != "onnxruntime" and openvino_version() is not None)


def check_cpu_runtime(opts: BuildOptions, target) -> None:
    """--cpu-runtime against the target, the precision and what is installed, before any work; an
    option left out becomes $CUNET_CPU_RUNTIME's value for a cpu build, else auto. A cpu build's
    $CUNET_CPU_THREADS is checked here too (engines/onnxrt.py usable_cpus)."""
    if target.device == "cpu":
        from cunet_optimize.engines.onnxrt import usable_cpus

        usable_cpus()
    if opts.cpu_runtime is None:
        from_env = os.environ.get(CPU_RUNTIME_ENV) if target.device == "cpu" else None
        if from_env is not None and from_env not in CPU_RUNTIME_CHOICES:
            raise CUNetError(f"${CPU_RUNTIME_ENV}={from_env!r}: not a CPU runtime; set it to one of "
                             f"{', '.join(CPU_RUNTIME_CHOICES)} or unset it")
        opts.cpu_runtime = from_env or "auto"
    runtime = opts.cpu_runtime
    if runtime not in CPU_RUNTIME_CHOICES:
        raise CUNetError(f"--cpu-runtime {runtime!r}: not a CPU runtime; choose one of {', '.join(CPU_RUNTIME_CHOICES)}")
    if runtime == "auto":
        return
    if target.device != "cpu":
        raise CUNetError(f"--cpu-runtime {runtime} is for the cpu target; {target.name} builds for "
                         f"{target.backend}: leave --cpu-runtime out")
    precision = engine_precision(opts)
    if runtime == "onnxruntime" and precision == "bf16":
        raise CUNetError("--precision bf16 runs on OpenVINO only (ONNX Runtime's CPU provider has no bf16 "
                         "convolution): use --cpu-runtime openvino or auto")
    if runtime == "openvino":
        from cunet_optimize.engines.openvino import INSTALL_HINT, openvino_version

        if precision not in OPENVINO_PRECISIONS:
            raise CUNetError(f"--cpu-runtime openvino builds {', '.join(OPENVINO_PRECISIONS)}, not "
                             f"{opts.precision}: use --cpu-runtime auto or onnxruntime for it")
        if openvino_version() is None:
            raise CUNetError(f"--cpu-runtime openvino: OpenVINO is not installed; {INSTALL_HINT}")


def _lint(b: _Build, model: onnx.ModelProto) -> None:
    """The target's rules (DLA's with a DLA core): findings go to build.json, an error stops the build."""
    from cunet_optimize.surgery import lint_model

    findings = lint_model(model, b.target.name, dla_core=b.dla)
    errors = [f for f in findings if f.severity == "error"]
    b.manifest["lint"] = [asdict(f) if hasattr(f, "__dataclass_fields__") else dict(f) for f in findings]
    if errors:
        first = errors[0]
        where = b.target.name + (f" DLA core {b.dla}" if b.dla is not None else "")
        raise CUNetError(f"lint for {where}: {len(errors)} error(s), first: [{first.rule}] "
                         f"{first.node}: {first.message}; fix: {first.fix}")


def _write_legacy_cache(b: _Build, model: onnx.ModelProto) -> None:
    """calibration.cache beside the Q/DQ ONNX, for TensorRT <= 10's implicit quantization."""
    from cunet_optimize.quant.legacy_cache import write_legacy_cache

    scales = legacy_cache_scales(model)
    if scales:
        write_legacy_cache(b.staging / "calibration.cache", scales)


def _engine(b: _Build, result, concat_form: dict | None, int8_form: dict | None):
    """The target's builder over model.onnx, with what surgery timed (threads, session
    settings), then, where OpenVINO is installed, the CPU runtime chosen by timing
    (_cpu_runtime); returns the builder's EngineArtifacts (None for bf16: OpenVINO's alone)."""
    what = (f"OpenVINO ({engine_precision(b.opts)}) for {b.target.name}" if engine_precision(b.opts) == "bf16"
            else f"{b.target.backend} for {b.target.name}" + (", OpenVINO timed beside it" if _times_openvino(b) else ""))
    with b.timer.stage("engine", what):
        build = None if engine_precision(b.opts) == "bf16" else _target_engine(b, result, concat_form, int8_form)
        if _times_openvino(b):
            _cpu_runtime(b, build)
        b.manifest["artifacts"].setdefault("onnx", "model.onnx")
    return build


def _target_engine(b: _Build, result, concat_form: dict | None, int8_form: dict | None):
    """The target's builder (ONNX Runtime or TensorRT) over model.onnx."""
    from cunet_optimize.engines import get_builder

    engine_options = {"trt_major": b.opts.trt_major} if b.opts.trt_major else {}
    if b.dla is not None:
        engine_options["dla_core"] = b.dla
    if b.target.backend == "tensorrt":  # the recipe also fills the Triton repository (_deploy)
        from cunet_optimize.serving.deploy import triton_plan_path

        engine_options["engine_copies"] = [triton_plan_path(b.name)]
    if concat_form is not None:  # the thread count was timed with the form
        engine_options["intra_op_threads"] = concat_form["intra_op_threads"]
    if int8_form is not None:  # thread count and pool settings were timed with the form
        engine_options["intra_op_threads"] = int8_form["chosen"]["intra_op_threads"]
        engine_options["session_config"] = int8_form["chosen"]["session_config"]
    if b.target.backend == "onnxruntime" and engine_precision(b.opts) in ("int8", "int4"):
        engine_options["qdq_flavour"] = ("uint8-integer-dataflow" if "integer_dataflow" in result.passes
                                         else "int8-symmetric")
    build = get_builder(b.target.name).build(b.onnx_path, b.target.name, engine_precision(b.opts), b.staging,
                                             engine_options or None)
    b.manifest.update(backend=build.backend, backend_version=build.backend_version,
                      engine_built=build.engine_built, engine_settings=build.settings)
    # relative to the build folder, which is renamed into place at the end
    # (both sides resolved: a symlinked --workdir must not leave paths through the link)
    b.manifest["artifacts"] = {role: os.path.relpath(Path(p).resolve(), b.staging.resolve())
                               for role, p in build.artifacts.items()}
    b.manifest["artifacts"].setdefault("onnx", "model.onnx")
    if (b.staging / "calibration.cache").exists():
        b.manifest["artifacts"]["legacy_calibration_cache"] = "calibration.cache"
    b.notes += [n for n in build.notes if n not in b.notes]
    return build


def _cpu_runtime(b: _Build, build) -> None:
    """ONNX Runtime's engine (`build`; None for bf16) against OpenVINO on model.onnx and the forms of
    b.ov_forms, each OpenVINO candidate gated (pipeline/autotune.py choose_cpu_runtime). The
    choice becomes build.json's backend; openvino.json records OpenVINO's best passing candidate
    beside an ONNX Runtime choice too, so `profile` measures both runtimes."""
    from cunet_optimize.engines.onnxrt import OnnxRuntimeRunner
    from cunet_optimize.engines.openvino import OV_MODEL_FILE, OV_SESSION_FILE, OvSettings, \
        choose_openvino_storage, compile_cache, openvino_version, write_session
    from cunet_optimize.pipeline.autotune import choose_cpu_runtime

    forms = {"deployed": b.onnx_path, **b.ov_forms}
    ort_runner = OnnxRuntimeRunner(b.staging) if build is not None else None
    # With --no-accuracy-gate the user accepted what the precision costs against FP32, not what a
    # runtime swap adds: an OpenVINO candidate is then held to ONNX Runtime's engine of the same graph.
    ort_engine = ort_runner if not b.opts.accuracy_gate else None
    bf16_float = "float" in (b.opts.layer_formats or {}).values() and plan_float_type(b.opts, b.target) == "bf16"
    with compile_cache(b.staging):  # each model compiled once, not once per block and setting
        gate = _variant_gate(b, ort_engine)
        record = choose_cpu_runtime(ort_runner, forms, engine_precision(b.opts), gate,
                                    pinned=b.opts.cpu_runtime == "openvino", bf16_float=bf16_float)
        ov = record["openvino"]
        if ov is not None:
            settings = OvSettings(**ov["settings"])
            ov["storage"] = choose_openvino_storage(forms[ov["form"]], settings, b.staging, gate)
    if ov is not None:
        write_session(b.staging, b.staging / OV_MODEL_FILE, settings, engine_precision(b.opts),
                      {k: v for k, v in record["median_ms_batch1"].items() if k.startswith("openvino")})
        b.manifest.setdefault("artifacts", {})
        b.manifest["artifacts"]["openvino_session"] = OV_SESSION_FILE
        b.manifest["artifacts"]["openvino_model"] = OV_MODEL_FILE
        b.notes.append(ov["storage"]["why"])
    for path in b.ov_forms.values():  # timed forms, not deployed
        path.unlink(missing_ok=True)
    b.manifest["cpu_runtime"] = record
    if record["chosen"] == "openvino":
        b.manifest.update(backend="openvino", backend_version=openvino_version(), engine_built=True)
        b.manifest.setdefault("engine_settings", {})
    times = ", ".join(f"{k} {v:.2f}" for k, v in record["median_ms_batch1"].items())
    b.notes.append(f"CPU runtime: {record['chosen']}, the fastest here that passes the gate (median ms at batch 1: "
                   f"{times})")


def _accuracy(b: _Build, build) -> None:
    """The accuracy gate (`_accuracy_gate`) on the evaluation set; the FP32 reference export is dropped after."""
    from cunet_optimize.evaluation import evaluate_landmarks

    with b.timer.stage("accuracy", f"{b.task.metric} on {len(b.eval_set)} images vs the FP32 reference "
                                   "(ONNX Runtime)"):
        b.manifest["accuracy"] = _accuracy_gate(b.opts, b.task, b.staging, b.manifest, b.onnx_path, b.reference_onnx,
                                                b.eval_set, b.eval_root, evaluate_landmarks, b.progress)
        b.reference_onnx.unlink()


def _deploy(b: _Build, build) -> None:
    """deploy/ beside the engine (serving/deploy.py): a Triton repository, and for Jetson targets
    a DeepStream nvinfer config, validated; recorded in build.json and hashed with the build."""
    from cunet_optimize.serving.deploy import write_deployment

    # bf16 has no ONNX Runtime engine (build is None): its repository serves model.onnx with the backend's defaults
    settings = build.settings if build is not None else {}
    engine = os.path.basename(settings["engine_path"]) if b.target.backend == "tensorrt" else None
    record = write_deployment(b.staging, b.name, b.target, engine_precision(b.opts), settings, b.dla,
                              b.task.box_factor, engine)
    b.manifest["deploy"] = record
    for path in record["files"]:
        role = "deepstream_config" if "/deepstream/" in path else "triton_config"
        b.manifest["artifacts"][role] = path
    b.timer.echo(f"deploy: {', '.join(record['files'])} ({record['validation']['triton']})")


def _finish(b: _Build) -> BuildReport:
    """build.json written into the staging folder; a failed gate (when enforced) stops here."""
    b.manifest["timings_seconds"] = b.timer.seconds
    b.timer.echo(b.timer.summary())
    # builders name the staging folder; users will find the build under its final name
    b.notes = [n.replace(b.staging.name, b.final.name) for n in b.notes]
    b.manifest["notes"] = b.notes
    record_artifact_hashes(b.manifest, b.staging)  # the folder is complete: what profile checks before running
    (b.staging / BUILD_FILE).write_text(checked_build_json(b.manifest))  # typed: manifests/build.py
    if not b.manifest["accuracy"]["passed"] and b.opts.accuracy_gate:
        acc = b.manifest["accuracy"]
        raise CUNetError(
            f"accuracy gate failed: {acc['metric']} {acc['quantized_value']:.3f}% vs FP32 "
            f"{acc['reference_value']:.3f}% ({acc['degradation_points']:.3f} points worse > "
            f"{acc['tolerance']}); try --calib-method entropy, more --calib-images, --qat, "
            f"or {b.task.gate_option} / --no-accuracy-gate to accept it"
        )
    return BuildReport(b.manifest["name"], str(b.staging), b.manifest, b.notes)


def quantize_and_calibrate(opts: BuildOptions, model, ckpt_path: Path, timer: StageTimer, progress: bool,
                           calib_flags=CALIB_DATA_FLAGS, calib_data: tuple | None = None):
    """The calibrate stage (also `calibrate` and `build --precision auto`'s first step): the
    fake-quantized model with calibrated scales (cached in calib/<id>/, quant/calib_cache.py),
    or the model of a QAT checkpoint; and what build.json records about it. `calib_flags`:
    how hints name the calibration data options (`calibrate`'s are --data/--split);
    `calib_data`: the (data set, root) already opened by the caller's checks."""
    if opts.qat_checkpoint:
        from cunet_optimize.quant.qat import load_qat_checkpoint
        from cunet_optimize.targets import get_target

        with timer.stage("calibrate", f"scales from the QAT checkpoint {opts.qat_checkpoint}"):
            qmodel = load_qat_checkpoint(opts.qat_checkpoint)
            # its scheme (concat placement, INT4 granularity included) is what gets exported
            check_qat_checkpoint(qmodel, opts, get_target(opts.target).backend)
            return qmodel.eval(), {"method": "qat", "checkpoint": str(opts.qat_checkpoint)}
    qmodel, _, info = calibrated_models(opts, model, ckpt_path, timer, progress, calib_flags, calib_data)
    return qmodel, info


def calibrated_models(opts: BuildOptions, model, ckpt_path: Path, timer: StageTimer, progress: bool,
                      calib_flags=CALIB_DATA_FLAGS, calib_data: tuple | None = None, unequalized: bool = False):
    """quantize_and_calibrate's calibrate stage: (the fake-quantized model, the same model calibrated
    without activation equalization or None, the record). The second is made where equalization is
    on and an auto plan has INT4 convs (they take its weights and scales: quant/auto.py
    unequalized_convs), or where `unequalized` asks for it (the auto search's FormatSwitch)."""
    from cunet_optimize.quant.calibrate import CalibrationError
    from cunet_optimize.targets import get_target
    from cunet_optimize.quant import activation_scales

    model_sha = sha256_file(ckpt_path)
    scheme = quant_scheme(base_precision(opts), opts.concat_qdq, get_target(opts.target).backend)
    alpha = equalize_alpha_for(scheme, opts.equalize_alpha)
    calib_set, calib_root = calib_data or open_dataset_or_default(opts.calib_data, opts.calib_split,
                                                                  task_of_model(model), calib_flags)
    images = min(opts.calib_images, len(calib_set))

    def cache_for(alpha: float | None) -> tuple[str, CalibrationCache]:
        cid = calibration_id(model_sha, calib_set, opts.calib_method, scheme.spec, opts.calib_images, alpha)
        return cid, CalibrationCache(Path(opts.workdir) / "calib" / cid, equalized=alpha is not None)

    def calibrated(alpha: float | None, cache: CalibrationCache):
        """(qmodel, equalization report) from `cache`, or calibrated and stored there."""
        if cache.reusable():
            return cache.load(model, scheme)
        try:
            qmodel, factors, eq_report = distributed.on_every_rank(
                calibrate_shared, model, scheme, calib_set, opts.calib_images, opts.calib_method, alpha, progress)
        except CalibrationError as exc:  # e.g. images of zero range: name the data they came from
            raise CalibrationError(f"{calib_root} ({opts.calib_split or 'every'} split): {exc}") from None
        report = eq_report.to_dict() if eq_report else None
        cache.store(qmodel, factors, opts.calib_method, report, model_sha256=model_sha,
                    data=str(calib_root.resolve()), split=opts.calib_split, images=images, scheme=scheme.spec)
        return qmodel, report

    cid, cache = cache_for(alpha)
    cached = cache.reusable()
    # an auto plan's INT4 convs keep their unequalized weights and input scales (quant/auto.py
    # unequalized_convs): the scales of a calibration without equalization, cached as any other
    wanted = unequalized or "int4" in (opts.layer_formats or {}).values()
    plain_cache = cache_for(None) if alpha is not None and wanted else None
    plain_cached = plain_cache is not None and plain_cache[1].reusable()
    what = f"{opts.calib_method} over {images} images"
    if alpha is not None:
        what += f", equalization alpha {alpha:g}"
    if plain_cache is not None:
        what += " (and none: for INT4 convs)"
    with timer.stage("calibrate", what + (" (cached)" if cached and (plain_cache is None or plain_cached) else "")):
        qmodel, report = calibrated(alpha, cache)
        plain = calibrated(None, plain_cache[1])[0].eval() if plain_cache is not None else None
    qmodel.eval()
    info = {"method": opts.calib_method, "id": cid, "cached": cached, "scales_file": str(cache.scales_file.resolve()),
            "images": images, "data": str(calib_root.resolve()), "scheme": scheme.spec, "equalization": report}
    if opts.layer_formats:  # an auto plan: the calibrated int8 model with its per-conv formats
        from cunet_optimize.quant.auto import unequalized_convs, with_layer_formats

        if plain is not None:
            info["unequalized_int4_convs"] = {"convs": len(unequalized_convs(qmodel, opts.layer_formats)),
                                              "calibration_id": plain_cache[0], "cached": plain_cached}
        qmodel = with_layer_formats(qmodel, opts.layer_formats, int4_block_for(get_target(opts.target).backend), plain)
    scales = activation_scales(qmodel)
    few = dict(sorted(scales.items(), key=lambda kv: -kv[1])[:8])
    return qmodel, plain, {**info, "ranges": {k: v * 127 for k, v in few.items()}}


def calibrate_shared(model, scheme, calib_set, images: int, method: str, alpha: float | None, progress: bool):
    """post_training_quantize over the first `images` calibration images, run by every rank
    under torchrun (distributed.on_every_rank): each observes its part of every batch and the
    statistics are merged, so the scales are one process's."""
    from cunet_optimize.quant import post_training_quantize

    batches = distributed.agreed(lambda: list(calibration_batches(calib_set, images)))
    return post_training_quantize(model, scheme, batches, method, alpha, progress=progress and distributed.is_main())


def _variant_gate(b: _Build, ort_engine=None,
                  against: str = "ONNX Runtime's engine of this build (the accuracy gate is off)"):
    """accuracy_check for the timed choices (pipeline/autotune.py) against the FP32 reference
    (reference_accuracy: evaluated once, and read back by the final gate), or against `ort_engine`
    (a runner evaluated once, on the first check; `against` says what it is) where given: of a
    runner (choose_cpu_runtime), or of a variant ONNX under ONNX Runtime's full optimisation with
    its session settings (choose_int8_form)."""
    from dataclasses import replace

    from cunet_optimize.engines.base import Runner
    from cunet_optimize.engines.onnxrt import OnnxRuntimeSessionRunner
    from cunet_optimize.evaluation import evaluate_landmarks

    opts, task, progress = b.opts, b.task, b.progress
    engine_value: list[float] = []  # evaluated on the first check

    def reference() -> tuple[float, str]:
        if ort_engine is None:
            fp32 = reference_accuracy(Path(opts.workdir), b.reference_onnx, b.eval_set, b.eval_root,
                                      opts.eval_split, evaluate_landmarks, progress)
            return task.headline(fp32.metrics), "the FP32 reference"
        if not engine_value:
            got = distributed.on_every_rank(evaluate_runner, ort_engine, b.eval_set, evaluate_landmarks, progress,
                                            "ONNX Runtime engine")
            engine_value.append(task.headline(got.metrics))
        return engine_value[0], against

    def check(onnx_path_or_runner, settings=None) -> dict:
        reference_value, against = reference()
        runner = onnx_path_or_runner
        if not isinstance(runner, Runner):
            runner = OnnxRuntimeSessionRunner(runner, replace(settings, optimization="all"), load_optimization="all")
        got = distributed.on_every_rank(evaluate_runner, runner, b.eval_set, evaluate_landmarks, progress,
                                        f"variant {runner.name} {runner.model_path.stem}")
        value = task.headline(got.metrics)
        worse = task.degradation(value, reference_value)
        return {"metric": task.metric, "value": value, "reference_value": reference_value, "against": against,
                "degradation_points": worse, "tolerance": opts.tolerance(task),
                "passed": bool(worse <= opts.tolerance(task))}

    return check


def _gate_runner(manifest: dict, staging: Path, onnx_path: Path):
    """(runner, what it is) the gate measures: the engine of the runtime build.json records
    (OpenVINO or ONNX Runtime on the CPU), else, where no engine is built here, the Q/DQ ONNX run
    exactly by ONNX Runtime, the source of truth."""
    from cunet_optimize.engines.onnxrt import OnnxRuntimeReferenceRunner, OnnxRuntimeRunner

    if manifest["backend"] == "openvino":
        from cunet_optimize.engines.openvino import OpenVinoRunner, runtime_description

        runner = OpenVinoRunner(staging)
        return runner, f"{runtime_description(runner.settings)} (the built engine)"
    if manifest["backend"] == "onnxruntime" and manifest["engine_built"]:
        return OnnxRuntimeRunner(staging), f"ONNX Runtime {manifest['backend_version']} CPU (the built engine)"
    return (OnnxRuntimeReferenceRunner(onnx_path),
            "ONNX Runtime CPU reference (ORT_DISABLE_ALL) of the deployed ONNX; no TensorRT engine here")


def _openvino_bundle_accuracy(task, onnx_path: Path, ref_value: float, tolerance: float, eval_set,
                              evaluate_landmarks, progress) -> dict:
    """A TensorRT bundle's exact ONNX (its Q/DQ run with integer kernels) in OpenVINO at f32 inference
    precision, beside the ONNX Runtime reference the gate judges: what integer kernels make of the
    graph, recorded, not gating. An ONNX OpenVINO cannot compile is recorded as such."""
    from cunet_optimize.engines.openvino import OpenVinoSessionRunner, OvSettings, runtime_description

    settings = OvSettings(inference_precision="f32")
    record: dict = {"runtime": runtime_description(settings) + " of the bundle's model.onnx", "gating": False}
    try:
        got = distributed.on_every_rank(evaluate_runner, OpenVinoSessionRunner(onnx_path, settings), eval_set,
                                        evaluate_landmarks, progress, "bundle in OpenVINO")
    except Exception as exc:  # noqa: BLE001  (a second opinion must not sink the build; say why it is absent)
        return {**record, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    value = task.headline(got.metrics)
    worse = task.degradation(value, ref_value)
    return {**record, "metrics": got.metrics, "value": value, "degradation_points": worse,
            "within_tolerance": bool(worse <= tolerance)}


def _accuracy_gate(opts, task, staging, manifest, onnx_path, reference_onnx, eval_set, eval_root, evaluate_landmarks,
                   progress):
    """The deployed model's headline metric (NME or PCKh) against the FP32 export's, and the
    verdict against the task's tolerance (`BuildOptions.tolerance`); for a TensorRT bundle, where
    OpenVINO is installed, also its ONNX run in OpenVINO (_openvino_bundle_accuracy)."""
    reference = reference_accuracy(Path(opts.workdir), reference_onnx, eval_set, eval_root, opts.eval_split,
                                   evaluate_landmarks, progress)
    runner, runtime = _gate_runner(manifest, staging, onnx_path)
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
    if manifest["backend"] == "tensorrt":
        from cunet_optimize.engines.openvino import openvino_version

        if openvino_version() is not None:
            gate["openvino"] = _openvino_bundle_accuracy(task, onnx_path, ref_value, tolerance, eval_set,
                                                         evaluate_landmarks, progress)
    return gate


def _jsonable(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return json.loads(json.dumps(asdict(obj), default=str))
    return obj


__all__ = ["BuildOptions", "BuildReport", "run_stages"]
