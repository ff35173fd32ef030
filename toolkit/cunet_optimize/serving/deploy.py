"""The deployment a build writes beside its engine: BUILD/deploy/.

    deploy/triton/<name>/config.pbtxt     a Triton model repository of one model, named after
    deploy/triton/<name>/1/model.onnx     the build (cpu: ONNX Runtime backend, the portable graph)
    deploy/triton/<name>/1/model.plan     (TensorRT targets: written by build_engine.sh on the device)
    deploy/deepstream/nvinfer_<name>.txt  (Jetson targets) the secondary nvinfer config

Beside the engine, as MMDeploy's work folder holds deploy.json next to end2end.engine: the
build folder stays the one self-contained, hashed unit a user copies to the device, and Triton
takes several repositories at once (`tritonserver --model-repository=A/deploy/triton
--model-repository=B/deploy/triton`), so no separate command has to merge builds.
Everything emitted is validated here (serving/validate.py) before the build is committed.
"""

from __future__ import annotations

from pathlib import Path

from cunet_optimize.atomic import link_or_copy
from cunet_optimize.errors import CUNetError
from cunet_optimize.serving.deepstream import nvinfer_config, render_nvinfer
from cunet_optimize.serving.model_io import read_model_io
from cunet_optimize.serving.triton_config import CONFIG_FILE, ONNX_FILE, TRT_PLAN_FILE, VERSION, render_config, triton_model
from cunet_optimize.serving.validate import SCHEMA_MISSING, check_nvinfer_config, check_triton_config

DEPLOY_DIR = "deploy"
TRITON_DIR = f"{DEPLOY_DIR}/triton"
DEEPSTREAM_DIR = f"{DEPLOY_DIR}/deepstream"


def triton_plan_path(name: str) -> str:
    """Where build_engine.sh puts the engine for Triton, relative to the build folder."""
    return f"{TRITON_DIR}/{name}/{VERSION}/{TRT_PLAN_FILE}"


def crop_note(box_factor: float) -> str:
    return (f"clients crop a square of side max(w, h) x {box_factor:g} centred on the detector's box, resized to "
            "256x256 (the crop our model was trained on)")


def write_deployment(build_dir: str | Path, name: str, target, precision: str, engine_settings: dict,
                     dla_core: int | None, box_factor: float, engine_file: str | None) -> dict:
    """Write BUILD/deploy/ for the build in `build_dir` (model.onnx there) and validate it;
    returns build.json's record of it: {files, validation[, model_file, model_file_is]}. `target` is its TargetSpec,
    `engine_file` the TensorRT engine's name in the build folder (None for cpu)."""
    build_dir = Path(build_dir)
    onnx_path = build_dir / ONNX_FILE
    io = read_model_io(onnx_path)
    backend = target.backend
    profile = tuple(engine_settings.get("batch") or target.batch)
    model = triton_model(name, io, backend, profile, engine_settings, crop_note(box_factor))
    model_dir = build_dir / TRITON_DIR / name
    (model_dir / VERSION).mkdir(parents=True)
    (model_dir / CONFIG_FILE).write_text(render_config(model))
    files = [f"{TRITON_DIR}/{name}/{CONFIG_FILE}"]
    record = {}
    if backend == "onnxruntime":  # the build's model.onnx once on disk: both names hashed in build.json
        record["model_file"] = f"{TRITON_DIR}/{name}/{VERSION}/{ONNX_FILE}"
        record["model_file_is"] = link_or_copy(onnx_path, build_dir / record["model_file"]) + f" of {ONNX_FILE}"
    validation = {"triton": _validated_triton(model_dir, io)}
    if target.device == "jetson":
        ds_dir = build_dir / DEEPSTREAM_DIR
        ds_dir.mkdir(parents=True)
        calib = "../../calibration.cache" if (build_dir / "calibration.cache").is_file() else None
        config = nvinfer_config(io, precision, profile[2] if io.dynamic_batch else io.image.shape[0],
                                f"../../{ONNX_FILE}", f"../../{engine_file}", calib, box_factor, dla_core)
        ds_file = ds_dir / f"nvinfer_{name}.txt"
        ds_file.write_text(render_nvinfer(config))
        problems = check_nvinfer_config(ds_file.read_text(), io, precision, ds_dir)
        if problems:
            raise CUNetError(f"{ds_file.name}: {'; '.join(problems)}")
        files.append(ds_file.relative_to(build_dir).as_posix())
        validation["deepstream"] = f"{len(config.properties)} keys, all nvinfer keys; infer-dims, outputs, " \
                                   "scale, colour order and network mode match the ONNX and the build"
    return {"files": files, "validation": validation, **record}


def _validated_triton(model_dir: Path, io) -> str:
    try:
        problems = check_triton_config((model_dir / CONFIG_FILE).read_text(), model_dir.name, io)
    except RuntimeError as exc:  # no tritonclient: say so in build.json rather than fail the build
        return str(exc) if str(exc) == SCHEMA_MISSING else f"not checked: {exc}"
    if problems:
        raise CUNetError(f"{model_dir.name}/{CONFIG_FILE}: {'; '.join(problems)}")
    return "parsed by Triton's ModelConfig schema; names, data types, dims and batch match the ONNX"


def validate_deployment(build_dir: str | Path) -> dict:
    """The checks of write_deployment again, on a build folder's files as they are now:
    {file: verdict}; CUNetError naming the first file with problems."""
    from cunet_optimize.manifests.build import BUILD_FILE, read_build_manifest

    build_dir = Path(build_dir)
    manifest = read_build_manifest(build_dir / BUILD_FILE)
    io = read_model_io(build_dir / ONNX_FILE)
    model_dirs = triton_model_dirs(build_dir)
    if not model_dirs:
        raise CUNetError(f"{build_dir}: no {TRITON_DIR}/<name>/{CONFIG_FILE}; rebuild it with this version "
                         "(`cunet-optimize build ... --force`)")
    verdicts = {}
    for model_dir in model_dirs:
        verdicts[model_dir.relative_to(build_dir).as_posix() + f"/{CONFIG_FILE}"] = _validated_triton(model_dir, io)
    for ds_file in sorted((build_dir / DEEPSTREAM_DIR).glob("*.txt")):
        problems = check_nvinfer_config(ds_file.read_text(), io, manifest.precision, ds_file.parent)
        if problems:
            raise CUNetError(f"{ds_file}: {'; '.join(problems)}")
        verdicts[ds_file.relative_to(build_dir).as_posix()] = ("nvinfer keys known; infer-dims, outputs, scale, "
                                                             "colour order and network mode match")
    return verdicts


def triton_model_dirs(build_dir: str | Path) -> list[Path]:
    return sorted(p.parent for p in (Path(build_dir) / TRITON_DIR).glob(f"*/{CONFIG_FILE}"))
