"""The Python API: the CLI's pipeline on your own objects (a model, a DataLoader, a folder).

Each function is a thin layer over the code its command runs, with the command's defaults
(pipeline/build.py DEFAULT_*), so `quantize(model, "int8")` is the scheme, equalization and calibration
of `cunet-optimize build --precision int8`, and `build(...)` parses its options with `build`'s
own parser. docs/API.md has the table and a QAT-in-your-own-loop example::

    import cunet_optimize as co
    qmodel = co.quantize(co.load_model(), "int8", loader)      # your DataLoader of images
    ...                                                         # QAT: your loop, your optimizer
    co.save_quantized(qmodel, "qat.safetensors")                # the file `build --qat` reads
    report = co.build(qmodel, precision="int8", workdir="out")  # engines/<name>/, build.json
    with co.load_engine(report.path) as engine:
        heatmaps = engine(images)
    print(co.evaluate(engine, "data/300w"))

Errors a caller can fix are CUNetError, one line, as on the command line.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from cunet_optimize.pipeline.build import (DEFAULT_CALIB_IMAGES, DEFAULT_CALIB_METHOD, DEFAULT_EVAL_SPLIT,
                                           DEFAULT_PRECISION, DEFAULT_TARGET, BuildReport, check_build,
                                           deployed_export_form)
from cunet_optimize.errors import CUNetError
from cunet_optimize.pipeline import run_build
from cunet_optimize.evaluation import DEFAULT_BATCH_SIZE, DEFAULT_NORMALIZER
from cunet_optimize.models import CUNet, load_model, resolve_model, save_checkpoint
from cunet_optimize.quant.calibrate import METHODS, _as_images, post_training_quantize
from cunet_optimize.quant.policy import canonical_precision, equalize_alpha_for, quant_scheme
from cunet_optimize.quant.qat import load_qat_checkpoint, save_qat_checkpoint
from cunet_optimize.quant.qmodel import QuantCUNet, float_state_dict
from cunet_optimize.tasks import (CALIB_BATCH_SIZE, calibration_batches, check_data_task, default_calib_split,
                                  open_dataset_or_default, task_of_model)

PathLike = str | os.PathLike
# Where build() keeps the checkpoints of the modules it is given, named by their content: build.json
# records them (the FP32 reference, `profile`'s PyTorch baseline) and the printed command reads them.
MODEL_FILES = Path("calib") / "models"
# quantize() records on the model what it was quantized from (a checkpoint path or the float
# module), and save_quantized() in the file, so build() compares against that FP32 model.
FLOAT_SOURCE = "float_source"


# --------------------------------------------------------------------------------------
# quantize, save_quantized, load_quantized


def quantize(model: torch.nn.Module | PathLike | None, precision: str = DEFAULT_PRECISION, calib_data: Any = None,
             *, target: str = DEFAULT_TARGET, method: str = DEFAULT_CALIB_METHOD, images: int = DEFAULT_CALIB_IMAGES,
             equalize: float | str | None = "default", concat_qdq: str | None = None,
             progress: bool = False) -> QuantCUNet:
    """The fake-quantized copy of `model`, calibrated as `build --precision PRECISION --target TARGET`
    calibrates it (quant_scheme's Q/DQ placement, the default equalization, `method` over the first
    `images` images in batches of CALIB_BATCH_SIZE), ready for QAT in your own training loop
    (`qmodel.train()`; quant.freeze_bn(qmodel) once BatchNorm statistics should stop moving).

    `model`: a CU-Net module, a checkpoint path, or None for the embedded default model (left
    untouched). `calib_data`: an iterable of float Nx3xHxW image batches in [0, 1], of `(images, ...)`
    tuples or `{"image": images}` dicts (a torch DataLoader); or a data folder as `--calib-data`
    takes it; None: the default synthetic calibration slice. `equalize`: "default" (alpha 0.5 for
    INT8 weights, off for INT4), an alpha in [0, 1], or None (off). The paper's modes (w1a8, ...)
    are accepted: they are trained from here, not built by PTQ."""
    from cunet_optimize.targets import get_target
    from cunet_optimize.quant.scheme import parse_precision

    module, source = _float_model(model, "quantize")
    precision = canonical_precision(precision, words=())
    if parse_precision(precision).is_float:
        raise CUNetError(f"quantize: precision {precision} is a float scheme, nothing to quantize; "
                         "pass int8, int4, ... (fp16/fp32 builds: build(model, precision=...))")
    if method not in METHODS:
        raise CUNetError(f"quantize: method {method!r} is not a calibration method; use one of {', '.join(METHODS)}")
    _check_count("quantize", "images", images)
    if equalize not in ("default", None) and not (_is_number(equalize) and 0 <= float(equalize) <= 1):
        raise CUNetError(f"quantize: equalize={equalize!r}; pass \"default\", an alpha in [0, 1] or None (off)")
    scheme = quant_scheme(precision, concat_qdq, get_target(target).backend)
    alpha = equalize_alpha_for(scheme, equalize)
    batches = _calibration_batches(module, calib_data, images)
    training = module.training
    try:  # observed in eval mode, as `build` observes the checkpoint it loads
        qmodel, _, _ = post_training_quantize(module.eval(), scheme, batches, method, alpha, progress=progress)
    finally:
        module.train(training)
    _set_float_source(qmodel, source)
    return qmodel.eval()


def save_quantized(qmodel: QuantCUNet, path: PathLike, *, force: bool = False) -> Path:
    """Write `qmodel` (from quantize(), after your QAT) as the checkpoint `cunet-optimize build --qat
    PATH` and `load_quantized` read: weights, every quantizer's scale, the scheme, and the float
    checkpoint it was quantized from when it came from a file. An existing file is replaced only
    with force=True."""
    from cunet_optimize.commands.common import check_new_output

    _check_quantized(qmodel, "save_quantized")
    check_new_output(path, "path", force=force)
    source = getattr(qmodel, FLOAT_SOURCE, None)
    metadata = {"float_checkpoint": str(Path(source).resolve())} if isinstance(source, (str, os.PathLike)) else {}
    return save_qat_checkpoint(qmodel, path, metadata)


def load_quantized(path: PathLike) -> QuantCUNet:
    """The fake-quantized model of a save_quantized (or `cunet-optimize qat`) checkpoint, in eval mode."""
    qmodel = load_qat_checkpoint(path)
    source = qmodel.checkpoint_metadata.get("float_checkpoint")
    if source and Path(source).is_file():
        _set_float_source(qmodel, source)
    return qmodel


# --------------------------------------------------------------------------------------
# build


def build(model: torch.nn.Module | PathLike | None = None, *, precision: str = DEFAULT_PRECISION,
          target: str = DEFAULT_TARGET, calib_data: Any = None, eval_data: PathLike | None = None,
          workdir: PathLike = ".", name: str | None = None, force: bool = False, progress: bool = False,
          **options: Any) -> BuildReport:
    """`cunet-optimize build`: the engine folder WORKDIR/engines/<name>/ and its build.json; returns
    the report (`.path`, `.manifest` = build.json, `.accuracy` = its gate, `.notes`).

    `model`: None (the embedded default), a checkpoint path, a CU-Net module (kept as a checkpoint
    named by its content under WORKDIR/calib/models/, which build.json records), or a quantized
    model from quantize()/load_quantized(), built as `--qat` (its float model is the accuracy
    gate's reference). `calib_data`: a folder as `--calib-data`; a DataLoader (any iterable of
    batches) is calibrated by quantize() first: build(m, calib_data=loader) is
    build(quantize(m, precision, loader, ...)). `eval_data`: a folder as `--eval-data`.
    `options`: the other `build` options by their long names in snake_case (calib_images=32,
    eval_split="test", max_nme_increase=0.5, no_accuracy_gate=True, equalize=None for
    --no-equalize, ...), parsed and checked by the command's own parser."""
    parser = _build_parser()
    extra = _option_argv(parser, options)
    # the options as the command parses them (values, precision, placement) before any work
    _build_options(parser, _build_argv(precision, target, None, eval_data, workdir, name, force, {}, extra))
    if calib_data is not None and not isinstance(calib_data, (str, os.PathLike)):
        if isinstance(model, QuantCUNet):
            raise CUNetError("build: the quantized model is calibrated already; drop calib_data (or pass the float "
                             "model with calib_data)")
        model = quantize(model, precision, calib_data, target=target,
                         method=options.get("calib_method", DEFAULT_CALIB_METHOD),
                         images=options.get("calib_images", DEFAULT_CALIB_IMAGES),
                         equalize=options.get("equalize", "default"), concat_qdq=options.get("concat_qdq"),
                         progress=progress)
        calib_data = None
    with tempfile.TemporaryDirectory(prefix="cunet-api-") as tmp:
        files = _model_files(model, Path(tmp))  # {"--model": ..., "--qat": ...}, written into tmp for modules
        if not files and model is not None:
            files = {"--model": Path(model)}
        argv = _build_argv(precision, target, calib_data, eval_data, workdir, name, force, files, extra)
        written = {flag: path for flag, path in files.items() if path.parent == Path(tmp)}
        if written:  # every check before WORKDIR is touched, then the modules' checkpoints kept where
            check_build(_build_options(parser, argv))  # build.json will point: WORKDIR/calib/models/
            files.update({flag: _keep(path, Path(workdir) / MODEL_FILES) for flag, path in written.items()})
            argv = _build_argv(precision, target, calib_data, eval_data, workdir, name, force, files, extra)
    return run_build(_build_options(parser, argv), echo=print if progress else _quiet, progress=progress)


def _quiet(*_args) -> None:
    pass


# the build() parameters that are `build` options of their own (not **options)
_BUILD_PARAMETERS = ("precision", "target", "model", "calib_data", "eval_data", "workdir", "name", "force", "json",
                     "help")


def _build_parser() -> argparse.ArgumentParser:
    """`cunet-optimize build`'s own parser, refusing with a CUNetError instead of exiting."""
    from cunet_optimize.cli import CommandLineParser
    from cunet_optimize.commands import build as build_command

    class Refusing(CommandLineParser):  # the subcommand's parser is made of its parent's class
        def error(self, message: str):
            raise CUNetError(f"build: {message}")

    subparsers = Refusing(prog="cunet_optimize").add_subparsers(dest="command")
    build_command.add_parser(subparsers)
    return subparsers.choices["build"]


def _long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{snake_case name: action} of every long option of `parser` (build's **options but ours)."""
    return {flag[2:].replace("-", "_"): action for action in parser._actions for flag in action.option_strings
            if flag.startswith("--") and flag[2:].replace("-", "_") not in _BUILD_PARAMETERS}


def _option_argv(parser: argparse.ArgumentParser, options: Mapping[str, Any]) -> list[str]:
    """`options` as `build` arguments; an option `build` does not have is refused, listing those it has."""
    known = _long_options(parser)
    argv = []
    for key, value in options.items():
        if key not in known:
            raise CUNetError(f"build: unknown option {key!r}; the options are {', '.join(sorted(known))} "
                             "(and the parameters model, precision, target, calib_data, eval_data, workdir, name, "
                             "force)")
        action, flag = known[key], "--" + key.replace("_", "-")
        if key == "equalize" and value is None:
            argv.append("--no-equalize")
        elif action.nargs == 0:  # a switch: --no-accuracy-gate, --no-equalize
            if not isinstance(value, bool):
                raise CUNetError(f"build: option {key} is a switch; pass {key}=True or leave it out")
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _build_argv(precision, target, calib_data, eval_data, workdir, name, force, model_flags, extra) -> list[str]:
    argv = ["--precision", str(precision), "--target", str(target), "--workdir", str(workdir)]
    for flag, value in [("--calib-data", calib_data), ("--eval-data", eval_data), ("--name", name),
                        *model_flags.items()]:
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--force"] if force else []) + extra


def _build_options(parser: argparse.ArgumentParser, argv: list[str]):
    """The BuildOptions `cunet-optimize build ARGV` would build (commands/build.py build_options);
    build.json records that command line, which repeats the build."""
    from cunet_optimize.commands.build import build_options

    return build_options(parser.parse_args(argv), command="cunet-optimize build " + shlex.join(argv))


def _model_files(model, folder: Path) -> dict[str, Path]:
    """{"--model": float checkpoint, "--qat": QAT checkpoint} written into `folder` for a module or
    a quantized model ({} for None or a path), each named by its content."""
    if isinstance(model, QuantCUNet):
        source = getattr(model, FLOAT_SOURCE, None)
        if isinstance(source, (str, os.PathLike)):
            files = {"--model": Path(source)}
        else:  # the module it was quantized from, else its own float weights
            files = {"--model": _content_named(source if source is not None else _float_copy(model), folder)}
        path = folder / "qat.safetensors"
        save_qat_checkpoint(model, path)
        files["--qat"] = _by_content(path, "qat")
        return files
    if isinstance(model, torch.nn.Module):
        if not isinstance(model, CUNet):
            raise CUNetError(f"build: model is a {type(model).__name__}, not a CU-Net; pass a CU-Net "
                             "(cunet_optimize.load_model), a checkpoint path, or a model from quantize()")
        return {"--model": _content_named(model, folder)}
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise CUNetError(f"build: model is a {type(model).__name__}; pass a CU-Net module, a checkpoint path, "
                         "a quantized model from quantize(), or None (the embedded default)")
    return {}


def _float_copy(qmodel: QuantCUNet) -> CUNet:
    model = CUNet(qmodel.config)
    model.load_state_dict(float_state_dict(qmodel))
    return model.eval()


def _content_named(module: CUNet, folder: Path) -> Path:
    path = folder / "model.safetensors"
    save_checkpoint(module, path, {"task": task_of_model(module).name})
    return _by_content(path, "model")


def _by_content(path: Path, stem: str) -> Path:
    """`path` renamed <stem>-<first 12 hex digits of its sha256>.safetensors."""
    from cunet_optimize.atomic import sha256_file

    digest = sha256_file(path)[:12]
    named = path.with_name(f"{stem}-{digest}.safetensors")
    os.replace(path, named)
    return named


def _keep(path: Path, folder: Path) -> Path:
    """`path` copied into `folder` atomically, unless a file of that name holds its bytes already
    (the name says which: _by_content; one that does not is damaged and replaced)."""
    from cunet_optimize.atomic import atomic_path, sha256_file

    final = folder / path.name
    if not final.is_file() or sha256_file(final) != sha256_file(path):
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(final) as tmp:
            shutil.copyfile(path, tmp)
    return final.resolve()


# --------------------------------------------------------------------------------------
# load_engine


class Engine:
    """A build folder's engine, Polygraphy-style: `infer({"image": x}) -> {"heatmaps": ..., "landmarks": ...}`,
    or `engine(x) -> heatmaps`; x is Bx3x256x256 float in [0, 1] (numpy or torch). Activated on first
    use (or `with engine:`); `close()` releases the session."""

    def __init__(self, path: Path, manifest: Any, runner: Any):
        self.path, self.manifest, self.runner = path, manifest, runner

    @property
    def task(self) -> str:
        """face or pose: the task of the data the build was gated on."""
        return self.manifest.eval_data.task if self.manifest.eval_data is not None else "face"

    def __enter__(self) -> "Engine":
        self.runner.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.runner.deactivate()

    def __call__(self, images: Any) -> np.ndarray:
        """The final head's heatmaps (BxCx64x64 float32) of `images`."""
        self.runner.activate()
        return self.runner.infer(_as_batch(images))

    def infer(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """{"heatmaps": BxCx64x64, "landmarks": BxCx2 in input (256x256) pixels} of `feed["image"]`."""
        from cunet_optimize.data.transforms import decode_heatmaps, heatmap_to_input_coords

        if not isinstance(feed, Mapping) or set(feed) != {"image"}:
            got = sorted(feed) if isinstance(feed, Mapping) else type(feed).__name__
            raise CUNetError(f"{self.path.name}: infer takes {{'image': Bx3x256x256 array}}, got {got}; "
                             "call the engine itself on an array")
        heatmaps = self(feed["image"])
        return {"heatmaps": heatmaps, "landmarks": heatmap_to_input_coords(decode_heatmaps(heatmaps))}


def load_engine(engine_dir: PathLike) -> Engine:
    """The engine of a build folder (engines/<name>/), after checking every file against the sha256
    build.json recorded (as `profile` does): CPU builds here in the runtime the build chose (ONNX
    Runtime, or OpenVINO where it won and is installed), TensorRT engines where TensorRT runs. A
    TensorRT bundle without an engine is a CUNetError (build it on the device)."""
    from cunet_optimize.profiling.builds import read_build

    record = read_build(engine_dir)
    record.check_artifacts()
    if not record.engine_built:
        raise CUNetError(f"{engine_dir}: a {record.backend} deployment bundle without an engine (target "
                         f"{record.target}); build the engine on the device (its build_engine.sh) and run it there")
    if record.backend == "onnxruntime":
        from cunet_optimize.engines.onnxrt import SESSION_FILE, OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(record.artifact("session") or record.path / SESSION_FILE, name=record.name)
    elif record.backend == "openvino":  # the CPU runtime the build chose (build.json cpu_runtime)
        from cunet_optimize.engines.openvino import OpenVinoRunner

        runner = OpenVinoRunner(record.artifact("openvino_session"), name=record.name)
    elif record.backend == "tensorrt":
        from cunet_optimize.engines.trt_runner import TrtRunner

        runner = TrtRunner(record.artifact("engine"), name=record.name)
    else:
        raise CUNetError(f"{engine_dir}: unknown backend {record.backend!r} in build.json; rebuild it")
    return Engine(record.path, record.manifest, runner)


def _as_batch(images: Any) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(images, dtype=np.float32))


# --------------------------------------------------------------------------------------
# evaluate


def evaluate(model_or_engine: Any, data: Any, *, split: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             normalizer: str = DEFAULT_NORMALIZER, flip: bool = False, progress: bool = False) -> dict:
    """`cunet-optimize eval`'s metrics (faces: NME, failure rates, AUC; pose: PCKh@0.5) of a model
    (module, quantized model, checkpoint path, None = the embedded default), an Engine from
    load_engine, or a build folder, on `data`: a folder as `--data` (split: its `--split`, default
    test, every image when it has no split lists), or an iterable of (images, landmarks) batches,
    images Bx3x256x256 in [0, 1] and 68-point landmarks BxCx2 in their pixels (faces)."""
    from cunet_optimize.evaluation import evaluate_landmarks, torch_infer

    _check_count("evaluate", "batch_size", batch_size)
    if isinstance(model_or_engine, (str, os.PathLike)) and (Path(model_or_engine) / "build.json").is_file():
        with load_engine(model_or_engine) as engine:
            return evaluate(engine, data, split=split, batch_size=batch_size, normalizer=normalizer, flip=flip,
                            progress=progress)
    if isinstance(model_or_engine, Engine):
        from cunet_optimize.tasks import TASKS

        infer, task, name = model_or_engine, TASKS[model_or_engine.task], model_or_engine.path.name
        runtime = f"{model_or_engine.manifest.backend} ({name})"
    else:
        model = model_or_engine if isinstance(model_or_engine, torch.nn.Module) else load_model(model_or_engine)
        infer, task = torch_infer(model), task_of_model(model)
        name, runtime = type(model).__name__, "PyTorch (CPU)"
    dataset = _evaluation_set(data, split, task, name)
    result = evaluate_landmarks(infer, dataset, batch_size=batch_size, normalizer=normalizer, flip=flip,
                                runtime=runtime, progress=progress)
    return result.metrics


def _evaluation_set(data: Any, split: str | None, task, model_name: str):
    """`data` as `eval`'s --data opens it (commands/common.py task_dataset), or a list of samples."""
    if isinstance(data, (str, os.PathLike)):
        from cunet_optimize.commands.common import task_dataset
        from cunet_optimize.tasks import check_task, task_of_data

        check_task(task, task_of_data(data), model_name, data)
        args = SimpleNamespace(data=str(data), split=split or DEFAULT_EVAL_SPLIT, split_given=split is not None,
                               crop="tight", boxes=None, skip_bad=False)
        return task_dataset(args, task, args.split)
    return _LandmarkSamples(data, task)


class _LandmarkSamples(list):
    """(images, landmarks) batches as evaluate_landmarks' samples: already cropped, so the crop is the identity."""

    crop_policy = "given"
    task = "face"

    def __init__(self, batches: Iterable, task):
        super().__init__()
        if task.name != "face":
            raise CUNetError("evaluate: (images, landmarks) batches are scored as faces; pose needs visibility and "
                             "head sizes: pass an MPII annotation JSON or its folder")
        try:
            iterator = iter(batches)
        except TypeError:
            raise CUNetError(f"evaluate: data is a {type(batches).__name__}; pass a data folder or an iterable of "
                             "(images, landmarks) batches") from None
        identity = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
        for i, batch in enumerate(iterator):
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise CUNetError(f"evaluate: batch {i} is a {type(batch).__name__}; pass (images, landmarks) pairs")
            images, points = _as_batch(batch[0]), _as_batch(batch[1])
            if images.ndim != 4 or points.ndim != 3 or len(images) != len(points) or points.shape[-1] != 2:
                raise CUNetError(f"evaluate: batch {i}: images {images.shape} and landmarks {points.shape}; "
                                 "expected Bx3x256x256 and BxCx2 of the same B")
            self.extend({"image": im, "landmarks": p, "transform": identity, "path": f"batch {i} image {j}"}
                        for j, (im, p) in enumerate(zip(images, points)))


# --------------------------------------------------------------------------------------
# export, profile


def export(model_or_qmodel: torch.nn.Module | PathLike | None, path: PathLike, *, target: str = DEFAULT_TARGET,
           precision: str | None = None, opset: int | None = None, exporter: str | None = None,
           dynamic_batch: bool = True, force: bool = False):
    """A verified ONNX file at `path` (export_onnx's ExportSummary). A float model (module, checkpoint,
    None = the embedded default) exports as `cunet-optimize export`: precision fp32 (default) or fp16.
    A quantized model exports its Q/DQ graph as a build for `target` would: its scheme, opset 21 for
    INT4 weights, FP16 where the target's plan computes in it. An existing file is replaced only
    with force=True."""
    from cunet_optimize.commands.common import check_new_output
    from cunet_optimize.targets import get_target
    from cunet_optimize.exporters.onnx_export import DEFAULT_EXPORTER, export_onnx

    check_new_output(path, "path", force=force)
    if isinstance(model_or_qmodel, QuantCUNet):
        if precision is not None:
            raise CUNetError(f"export: a quantized model exports its own scheme ({model_or_qmodel.scheme.spec}); "
                             "drop precision=")
        opts = SimpleNamespace(precision=model_or_qmodel.scheme.spec, trt_major=None, dla_core=None,
                               layer_formats=getattr(model_or_qmodel, "layer_formats", None))
        form_opset, fp16 = deployed_export_form(model_or_qmodel, True, get_target(target), opts)
        model = model_or_qmodel
    else:
        spelling = canonical_precision(precision or "fp32", words=("fp16",))
        if spelling not in ("fp32", "fp16"):
            raise CUNetError(f"export: a float model exports as fp32 or fp16, not {precision}; "
                             f"quantize(model, {precision!r}) first")
        model, _ = _float_model(model_or_qmodel, "export")
        form_opset, fp16 = 17, spelling == "fp16"
    return export_onnx(model, path, opset=opset or form_opset, fp16=fp16, dynamic_batch=dynamic_batch,
                       exporter=exporter or DEFAULT_EXPORTER)


def profile(engine_dirs: Iterable[PathLike] | None = None, *, workdir: PathLike = ".", data: PathLike | None = None,
            name: str | None = None, force: bool = False, progress: bool = False,
            **options: Any) -> tuple[dict, Path]:
    """`cunet-optimize profile`: (the profile manifest, the HTML report's path) of the build folders
    (default: every build under WORKDIR/engines/), written to WORKDIR/reports/<name>.json/.html.
    `options`: profile_engines' (runs, warmup, batch_sizes, memory, layer_runs, max_images, split, ...)."""
    from cunet_optimize.commands.profile import report_name
    from cunet_optimize.profiling import find_builds, profile_engines
    from cunet_optimize.report import write_report

    known = set(inspect.signature(profile_engines).parameters) - {"build_dirs", "data", "name", "command", "progress"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CUNetError(f"profile: unknown option {unknown[0]!r}; the options are {', '.join(sorted(known))}")
    workdir = Path(workdir)
    name = report_name(name, workdir, force, "name")
    dirs = [Path(d) for d in engine_dirs] if engine_dirs is not None else [b.path for b in find_builds(workdir)]
    result = profile_engines(dirs, data, name=name, progress=progress,
                             command="cunet-optimize profile " + shlex.join(str(d) for d in dirs), **options)
    manifest = result.to_dict()
    _, html_path = write_report(manifest, workdir / "reports", result.name)
    return manifest, html_path


# --------------------------------------------------------------------------------------
# shared


def _float_model(model, what: str) -> tuple[CUNet, Any]:
    """(the float CU-Net, its source: a checkpoint path or the module) of a module,
    a checkpoint path (or our registered name: untrained, refused as build refuses it), or None."""
    if isinstance(model, QuantCUNet):
        raise CUNetError(f"{what}: the model is quantized already (from quantize()); pass the float model")
    if isinstance(model, torch.nn.Module):
        if not isinstance(model, CUNet):
            raise CUNetError(f"{what}: model is a {type(model).__name__}, not a CU-Net; load one with "
                             "cunet_optimize.load_model")
        return model, model
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise CUNetError(f"{what}: model is a {type(model).__name__}; pass a CU-Net module, a checkpoint path, "
                         "or None (the embedded default)")
    module, path, _, _ = resolve_model(None if model is None else str(model))
    return module, str(path)


def _calibration_batches(model: CUNet, calib_data: Any, images: int) -> list[torch.Tensor]:
    """The first `images` calibration images in batches of CALIB_BATCH_SIZE, as `build` batches them:
    from a folder (None: the task's default calibration slice) or from any iterable of batches."""
    from cunet_optimize.data.face300w import CALIB_DATA_FLAGS

    if calib_data is None or isinstance(calib_data, (str, os.PathLike)):
        folder = None if calib_data is None else str(calib_data)
        task = check_data_task(model, "the model", folder)
        dataset, _ = open_dataset_or_default(folder, default_calib_split(folder), task, CALIB_DATA_FLAGS)
        return list(calibration_batches(dataset, images))
    if isinstance(calib_data, (torch.Tensor, np.ndarray)):
        calib_data = [calib_data]  # one batch
    try:
        iterator = iter(calib_data)
    except TypeError:
        raise CUNetError(f"quantize: calib_data is a {type(calib_data).__name__}; pass a data folder or an "
                         "iterable of image batches (a DataLoader)") from None
    taken: list[torch.Tensor] = []
    count = 0
    for i, batch in enumerate(iterator):
        if count >= images:
            break
        if isinstance(batch, (list, tuple)) and batch:
            batch = batch[0]
        if isinstance(batch, Mapping) and "image" in batch:
            batch = batch["image"]
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        batch = _as_images(batch, i)  # Bx3xHxW, or the one-line refusal
        if not batch.is_floating_point() or (batch.numel() and float(batch.max()) > 2.0):
            raise CUNetError(f"calibration batch {i}: images must be float in [0, 1], got {batch.dtype} up to "
                             f"{float(batch.max()):g}; divide 0..255 images by 255")
        batch = batch[: images - count].float()
        taken.append(batch)
        count += len(batch)
    images_all = torch.cat(taken) if taken else torch.zeros(0, 3, 1, 1)
    return list(torch.split(images_all, CALIB_BATCH_SIZE)) if len(images_all) else []


def _set_float_source(qmodel: QuantCUNet, source: Any) -> None:
    # a plain attribute: through nn.Module.__setattr__ a module would become a submodule, its
    # weights part of the quantized model's state
    object.__setattr__(qmodel, FLOAT_SOURCE, source)


def _check_quantized(qmodel, what: str) -> None:
    if not isinstance(qmodel, QuantCUNet):
        raise CUNetError(f"{what}: expects a quantized model from quantize() or load_quantized(), got "
                         f"{type(qmodel).__name__}")


def _check_count(what: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CUNetError(f"{what}: {name} must be an integer >= 1, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["Engine", "build", "evaluate", "export", "load_engine", "load_quantized", "profile", "quantize",
           "save_quantized"]
