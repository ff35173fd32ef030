"""`profile_engines`: measure every build folder (and the PyTorch FP32 baseline) once.

For each variant, in this order: size on disk and weight bytes; latency over a batch
sweep; accuracy on the evaluation set; per-layer time (ONNX Runtime builds); peak
memory (in a fresh process by default). A TensorRT deployment bundle whose engine was
not built is listed with its size and status and never measured: no invented numbers.
All inputs are checked before the first measurement, so a bad folder fails fast: every
file of a build folder must be the one the build wrote (the sha256 build.json records).
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from cunet_optimize import __version__
from cunet_optimize.atomic import sha256_file
from cunet_optimize.engines.base import Runner, TorchRunner
from cunet_optimize.errors import CUNetError
from cunet_optimize.evaluation import evaluate_landmarks
from cunet_optimize.manifests.profile import (BUNDLE_ONLY_STATUS, MEASURED_STATUS, Accuracy, Latency, Layers, Memory,
                                             ProfileManifest, Served, Size, VariantRecord)
from cunet_optimize.manifests.schema import to_dict
from cunet_optimize.profiling.accuracy import (accuracy_delta, ced_for_plot, eval_data_for, pckh_curve_for_plot)
from cunet_optimize.profiling.builds import BuildFolder, check_builds, read_build
from cunet_optimize.profiling.environment import environment, load_average
from cunet_optimize.profiling.latency import batch_sweep
from cunet_optimize.profiling.memory import MEMORY_MODES, measure_peak_memory, method_description
from cunet_optimize.profiling.result import part, profile_manifest, speedups, updated, what_ran_where
from cunet_optimize.profiling.size import file_sizes, onnx_weights, state_dict_weights
from cunet_optimize.tasks import POSE, TASKS

log = logging.getLogger(__name__)

DEFAULT_RUNS = 50
DEFAULT_WARMUP = 10
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
EVAL_BATCH_SIZE = 8
LAYER_PROFILE_RUNS = 10
ENGINE_ROLES = ("engine", "model")  # build.json artifact roles of an executable engine


def padded_to(batch_size: int, infer):
    """infer for an engine with a fixed batch: pads a short last batch, drops the padding after."""

    def run(images: np.ndarray) -> np.ndarray:
        n = images.shape[0]
        if n == batch_size:
            return infer(images)
        pad = np.repeat(images[-1:], batch_size - n, axis=0)
        return infer(np.concatenate([images, pad]))[:n]

    return run


def _threads(n: int) -> str:
    return "default threads" if n == 0 else f"{n} intra-op thread{'s' if n != 1 else ''}"


class _Measure:
    """The shared measurement settings, applied to one runner at a time."""

    def __init__(self, runs, warmup, min_seconds, batch_sizes, dataset, eval_data, progress):
        self.runs, self.warmup, self.min_seconds = runs, warmup, min_seconds
        self.batch_sizes, self.dataset, self.eval_data, self.progress = batch_sizes, dataset, eval_data, progress
        self.dataset_task = TASKS[eval_data.task] if eval_data is not None else None

    def run(self, v: VariantRecord, runner: Runner) -> None:
        with runner:
            sweep = batch_sweep(runner, self.batch_sizes, self.warmup, self.runs, self.min_seconds, self.progress)
            v.batch_sweep = [part(Latency, stats, f"profile variant {v.name} batch_sweep") for stats in sweep]
            v.latency = v.batch_sweep[0]
            if self.dataset is not None:
                v.accuracy = part(Accuracy, self._accuracy(v, runner), f"profile variant {v.name} accuracy")
        v.status, v.measured = MEASURED_STATUS, True

    def _accuracy(self, v: VariantRecord, runner: Runner) -> dict:
        fixed = runner.input_shape[0]
        infer = padded_to(fixed, runner.infer) if fixed else runner.infer
        start = time.perf_counter()
        ev = evaluate_landmarks(
            infer, self.dataset, batch_size=fixed or EVAL_BATCH_SIZE,
            normalizer=self.eval_data.normalizer, flip=self.eval_data.flip,
            progress=self.progress, description=f"eval {v.name}", runtime=v.runtime,
        )
        accuracy = {
            "task": ev.task,
            "metric": self.dataset_task.metric,
            "metrics": dict(ev.metrics),
            "runtime": v.runtime,
            "seconds": time.perf_counter() - start,
        }
        if self.dataset_task is POSE:
            accuracy["pckh_curve"] = pckh_curve_for_plot(ev.joint_errors, ev.visible)
        else:
            accuracy["ced"] = ced_for_plot(ev.per_image_nme)
        return accuracy


def _build_size(build: BuildFolder) -> tuple[dict, list[str]]:
    roles = {role: build.artifact(role) for role in build.manifest.artifacts}
    sizes, notes = file_sizes(roles)
    distinct: dict[Path, int] = {}
    for role, n in sizes.items():
        distinct[roles[role].resolve()] = n
    # The file a deployment loads: TensorRT's "engine", ONNX Runtime's optimised "model";
    # else (a bundle) the ONNX it is built from on the device.
    deploy = next((role for role in ENGINE_ROLES if role in sizes and roles[role].is_file()), None)
    if deploy is None and "onnx" in sizes:
        deploy = "onnx"
    size = {
        "artifacts": sizes,
        "total_bytes": sum(distinct.values()),
        "engine_bytes": sizes[deploy] if deploy in ENGINE_ROLES else None,
        "deploy_artifact": deploy,
        "deploy_bytes": sizes.get(deploy) if deploy else None,
        "weights": None,
    }
    onnx_path = build.artifact("onnx")
    if onnx_path is not None and onnx_path.is_file():
        try:
            size["weights"] = onnx_weights(onnx_path)
        except Exception as exc:  # a size column must not sink the profile
            notes.append(f"could not read weights of {onnx_path.name}: {exc}")
    return size, notes


def _engine_variant(build: BuildFolder) -> VariantRecord:
    m = build.manifest
    size, notes = _build_size(build)
    return VariantRecord(
        name=build.name, role="engine", precision=build.precision, target=build.target,
        backend=build.backend, runtime="", status="", measured=False, backend_version=m.backend_version,
        model_sha256=build.model_sha256, build_dir=str(build.path), engine_built=build.engine_built,
        command=m.command, size=part(Size, size, f"profile variant {build.name} size"),
        # the build's records travel into the profile JSON as written
        build_accuracy=m.accuracy, surgery=m.surgery, calibration=m.calibration, auto=m.auto,
        notes=[*m.notes, *notes],
    )


def _ort_runtime(runner) -> str:
    s = runner.settings
    return (f"ONNX Runtime {runner.record.get('onnxruntime_version', '?')} CPUExecutionProvider "
            f"(graph optimisation '{s.optimization}' at build, {_threads(s.intra_op_threads)})")


def _profile_tensorrt_engine(build: BuildFolder, v: VariantRecord, measure: _Measure) -> VariantRecord:
    """An engine built on a device: measured when this machine can run it (the device itself)."""
    from cunet_optimize.engines.trt_apply import TensorRTUnavailable
    from cunet_optimize.engines.trt_runner import TrtRunner
    from cunet_optimize.profiling.environment import gpu_description

    engine = build.artifact("engine")
    v.runtime = f"TensorRT {v.backend_version} on {gpu_description()} (target {build.target})"
    if engine is None or not engine.is_file():
        v.status = "not measured: build.json says the engine was built but its file is missing; rebuild it"
        return v
    try:
        measure.run(v, TrtRunner(engine, name=build.name))
    except TensorRTUnavailable as exc:
        v.status = f"not measured here: {exc}"
        v.batch_sweep, v.latency, v.accuracy = [], None, None
        return v
    v.notes.append("memory and per-layer time are not measured for TensorRT engines (GPU memory; use trtexec "
                   "--dumpProfile on the device)")
    return v


# The CPU runtimes a build may hold, each with the build.json artifact role of its session record.
CPU_RUNTIMES = {"onnxruntime": "session", "openvino": "openvino_session"}


def _profile_engines(build: BuildFolder, measure: _Measure, memory: str, layer_runs: int) -> list[VariantRecord]:
    """The build's engine; for a CPU build, every runtime it holds (build.json cpu_runtime), the one it
    chose first under the build's name, another as `<name>@<runtime>`."""
    if build.backend not in CPU_RUNTIMES:
        return [_profile_engine(build, measure, memory, layer_runs)]
    held = [r for r, role in CPU_RUNTIMES.items() if r == build.backend or build.artifact(role) is not None]
    held.sort(key=lambda r: r != build.backend)
    return [_profile_engine(build, measure, memory, layer_runs, runtime=r) for r in held]


def _profile_openvino(build: BuildFolder, v: VariantRecord, measure: _Measure) -> VariantRecord:
    """OpenVINO's session of a CPU build (openvino.json), where OpenVINO is installed."""
    from cunet_optimize.engines.openvino import INSTALL_HINT, OV_SESSION_FILE, OpenVinoRunner, openvino_version, \
        runtime_description

    v.backend, v.backend_version = "openvino", openvino_version()
    if v.backend_version is None:
        v.status, v.runtime = f"not measured here: OpenVINO is not installed; {INSTALL_HINT}", "OpenVINO"
        return v
    runner = OpenVinoRunner(build.artifact("openvino_session") or build.path / OV_SESSION_FILE, name=v.name)
    model = runner.model_path  # what OpenVINO loads: an ONNX file of the folder, compiled at load
    if model.is_file() and v.size:
        v.size = updated(v.size, {"deploy_artifact": "openvino_model", "deploy_bytes": model.stat().st_size,
                                  "engine_bytes": model.stat().st_size}, f"profile variant {v.name} size")
    v.runtime = runtime_description(runner.settings)
    measure.run(v, runner)
    v.notes.append("peak memory and per-op time are measured for ONNX Runtime only")
    return v


def _profile_engine(build: BuildFolder, measure: _Measure, memory: str, layer_runs: int,
                    runtime: str | None = None) -> VariantRecord:
    v = _engine_variant(build)
    runtime = runtime or build.backend
    if runtime != build.backend:
        v.name = f"{build.name}@{runtime}"
        v.notes.append(f"the build chose {build.backend}; this row is its {runtime} session, measured beside it")
    if build.backend == "tensorrt":
        if not build.engine_built:
            v.status, v.runtime = BUNDLE_ONLY_STATUS, f"TensorRT (on the device: {build.target})"
            return v
        return _profile_tensorrt_engine(build, v, measure)
    if runtime not in CPU_RUNTIMES:
        v.status = f"not measured: unknown backend '{build.backend}'"
        return v
    if not build.engine_built:
        v.status = "not measured: build.json says engine_built is false; rebuild it"
        return v
    if runtime == "openvino":
        return _profile_openvino(build, v, measure)
    from cunet_optimize.engines.onnxrt import SESSION_FILE, OnnxRuntimeRunner
    from cunet_optimize.profiling.layers import ort_layer_times, ort_thread_scaling

    v.backend, v.backend_version = "onnxruntime", None
    session = build.artifact("session") or build.path / SESSION_FILE
    runner = OnnxRuntimeRunner(session, name=v.name)
    v.backend_version = runner.record.get("onnxruntime_version")
    v.runtime = _ort_runtime(runner)
    measure.run(v, runner)
    if layer_runs > 0:
        layers = ort_layer_times(session, batch_size=v.latency.batch_size, runs=layer_runs)
        layers["thread_scaling"] = ort_thread_scaling(session)
        v.layers = part(Layers, layers, f"profile variant {v.name} layers")
    v.memory = part(Memory, measure_peak_memory("onnxruntime", session, mode=memory),
                    f"profile variant {v.name} memory")
    return v


def _profile_baseline(build: BuildFolder, name: str, measure: _Measure, memory: str) -> VariantRecord:
    import torch

    from cunet_optimize.models import load_model

    checkpoint = build.checkpoint
    model = load_model(checkpoint)
    size = {
        "artifacts": {"checkpoint": checkpoint.stat().st_size},
        "total_bytes": checkpoint.stat().st_size,
        "engine_bytes": None,
        "deploy_artifact": "checkpoint",
        "deploy_bytes": checkpoint.stat().st_size,
        "weights": state_dict_weights(model.state_dict()),
    }
    v = VariantRecord(
        name=name, role="baseline", precision="fp32", target="cpu", backend="pytorch",
        runtime=f"PyTorch {torch.__version__} CPU, eager FP32 ({_threads(torch.get_num_threads())})",
        status="", measured=False, backend_version=torch.__version__, model_sha256=build.model_sha256,
        command=f"load_model({str(checkpoint)!r})", size=part(Size, size, f"profile variant {name} size"),
    )
    if sha256_file(checkpoint) != build.model_sha256:
        v.notes.append(f"{checkpoint} has a different sha256 than build.json model.sha256: "
                       "the checkpoint changed after the build, or the build hashed another file")
    measure.run(v, TorchRunner(model, name=name))
    v.memory = part(Memory, measure_peak_memory("pytorch", checkpoint, mode=memory), f"profile variant {name} memory")
    return v


def _check_inputs(builds: list[BuildFolder]) -> None:
    for b in builds:
        if not b.checkpoint.is_file():
            raise CUNetError(
                f"{b.path / 'build.json'}: model checkpoint {b.checkpoint} not found (needed for the PyTorch "
                "FP32 baseline); restore it or rebuild"
            )


def _finish_accuracy(variants: list[VariantRecord]) -> None:
    """Each measured accuracy against its model's baseline: delta, tolerance, pass/fail."""
    refs = {v.model_sha256: v for v in variants if v.baseline}
    for v in variants:
        if v.accuracy is None:
            continue
        task = TASKS[v.accuracy.task]
        ref = refs.get(v.model_sha256)
        tol = v.build_accuracy.tolerance if v.build_accuracy is not None else None
        source = "build.json accuracy.tolerance" if tol is not None else "default"
        tol = float(tol) if tol is not None else task.default_tolerance
        ref_value = ref.accuracy.metrics.value(task.metric_key) if ref is not None and ref.accuracy else None
        changes = accuracy_delta(v.accuracy.metrics.value(task.metric_key), ref_value, tol, task)
        changes["reference"] = ref.name if ref is not None else None
        changes[f"reference_{task.metric_key}"] = ref_value
        changes["tolerance_source"] = source
        if v.baseline:
            changes["passed"] = None  # the reference is not judged against itself
        v.accuracy = updated(v.accuracy, changes, f"profile variant {v.name} accuracy")


def profile_engines(
    build_dirs: Sequence[str | os.PathLike],
    data: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    crop: str | None = None,
    boxes: str | None = None,
    normalizer: str | None = None,
    flip: bool = False,
    max_images: int | None = None,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    min_seconds: float = 0.0,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    memory: str = "subprocess",
    layer_runs: int = LAYER_PROFILE_RUNS,
    allow_mixed: bool = False,
    torch_threads: int | None = None,
    progress: bool = True,
    name: str | None = None,
    command: str | None = None,
    serve_seconds: float | None = None,
) -> ProfileManifest:
    """Profile the builds in `build_dirs` plus the PyTorch FP32 baseline of their checkpoint.

    `data` (a 300-W layout folder, or MPII data for pose builds) overrides each build.json's eval_data; with neither,
    accuracy is skipped and the result's notes say so. `command` is the command line to
    record for reproduction (the CLI passes its own argv). `torch_threads` sets the
    PyTorch baseline's thread count (ONNX Runtime builds use their session.json's).
    `serve_seconds` (profile --serve): also measure each CPU build served by Triton at
    concurrency 1 and 8 beside in-process runs, each row this long (serving/served_latency.py).
    """
    _check_settings(build_dirs, runs, warmup, min_seconds, max_images, batch_sizes, torch_threads, memory)
    server_env = _check_serve(serve_seconds)
    builds, eval_data, dataset, notes = _read_inputs(build_dirs, allow_mixed, data, split, crop, boxes=boxes,
                                                     normalizer=normalizer, flip=flip, max_images=max_images)
    if server_env is not None and not any(_servable(b) for b in builds):
        raise CUNetError("profile --serve measures CPU builds served by Triton; none of these is one (TensorRT "
                         "builds are served on the device: docs/SERVING.md)")
    started = time.perf_counter()
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    env = environment()
    measure = _Measure(runs, warmup, min_seconds, tuple(int(b) for b in batch_sizes), dataset, eval_data, progress)
    variants = _measure_variants(builds, measure, memory, layer_runs)
    if server_env is not None:
        _measure_served(builds, variants, server_env, serve_seconds)
    env["load_average_end"] = load_average()
    notes += _busy_machine_notes(env)
    created = datetime.now(timezone.utc)
    return profile_manifest(
        name=name or f"profile-{created.strftime('%Y%m%d-%H%M%S')}",
        created=created.isoformat(timespec="seconds"),
        environment=env,
        settings=_settings(runs, warmup, min_seconds, batch_sizes, layer_runs, memory),
        data={**asdict(eval_data), "images": len(dataset), "crop_policy": dataset.crop_policy}
        if eval_data is not None else None,
        variants=variants,
        commands={
            "builds": [{"name": b.name, "command": b.manifest.command} for b in builds],
            "profile": command or _default_command(build_dirs, data, runs, batch_sizes),
        },
        statement=what_ran_where(env, variants),
        notes=notes,
        seconds=time.perf_counter() - started,
        toolkit_version=__version__,
    )


def _check_serve(serve_seconds: float | None):
    """The server environment for profile --serve (None without it), refused in one line before
    anything is read or measured where it is absent."""
    if serve_seconds is None:
        return None
    if not serve_seconds > 0:
        raise CUNetError(f"serve seconds must be > 0, got {serve_seconds}")
    from cunet_optimize.serving.served_latency import require_server_env

    return require_server_env("profile --serve")


def _servable(build: BuildFolder) -> bool:
    return build.backend == "onnxruntime" and bool(build.engine_built)


def _measure_served(builds: list[BuildFolder], variants: list[VariantRecord], env, seconds: float) -> None:
    """Each measured CPU build's `served` rows (in-process and Triton, concurrency 1 and 8)."""
    from cunet_optimize.serving.served_latency import served_latency

    by_dir = {str(b.path): b for b in builds}
    for v in variants:
        build = by_dir.get(v.build_dir or "")
        if build is None:
            continue
        if not (_servable(build) and v.measured):
            v.notes.append("not served (profile --serve): Triton here serves CPU engines only")
            continue
        log.info("serving %s (Triton, concurrency 1 and 8)", v.name)
        v.served = part(Served, served_latency(build.path, env, seconds), f"profile variant {v.name} served")


def _check_settings(build_dirs, runs, warmup, min_seconds, max_images, batch_sizes, torch_threads, memory) -> None:
    """The measurement options, refused in one line before anything is read."""
    if not build_dirs:
        raise CUNetError("no build folders to profile; pass ENGINE_DIR or build some with `cunet-optimize build`")
    if runs < 1 or warmup < 0 or min_seconds < 0:
        raise CUNetError(f"need runs >= 1, warmup >= 0 and min seconds >= 0 (got {runs}, {warmup}, {min_seconds})")
    if max_images is not None and max_images < 1:
        raise CUNetError(f"max images must be >= 1, got {max_images}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise CUNetError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if torch_threads is not None and torch_threads < 1:
        raise CUNetError(f"torch threads must be >= 1, got {torch_threads}")
    if memory not in MEMORY_MODES:
        raise CUNetError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")


def _read_inputs(build_dirs, allow_mixed: bool, data, split, crop, **eval_options):
    """The builds (every file the one its build wrote, the checkpoint present) and the
    evaluation set, loaded before the first measurement so that bad input fails fast."""
    builds = [read_build(d) for d in build_dirs]
    check_builds(builds, allow_mixed=allow_mixed)
    unchecked = [f"{b.name}: {note}" for b in builds for note in b.check_artifacts()]  # nothing runs a stranger
    _check_inputs(builds)
    eval_data, notes = eval_data_for([to_dict(b.manifest.eval_data) for b in builds], data, split, crop,
                                     **eval_options)
    dataset = eval_data.load() if eval_data is not None else None  # DataError before any measurement
    return builds, eval_data, dataset, notes + unchecked


def _measure_variants(builds: list[BuildFolder], measure: _Measure, memory: str, layer_runs: int) -> list[VariantRecord]:
    """The rows: one PyTorch baseline per distinct model, then every build; accuracy against
    the baseline and speedups filled in once all are measured."""
    variants: list[VariantRecord] = []
    models = list(dict.fromkeys(b.model_sha256 for b in builds))
    for sha in models:
        first = next(b for b in builds if b.model_sha256 == sha)
        base_name = "pytorch-fp32" if len(models) == 1 else f"pytorch-fp32-{sha[:8]}"
        log.info("profiling %s (PyTorch baseline of %s)", base_name, first.checkpoint)
        variants.append(_profile_baseline(first, base_name, measure, memory))
    for i, b in enumerate(builds, 1):
        log.info("profiling %s (%d/%d)", b.name, i, len(builds))
        variants.extend(_profile_engines(b, measure, memory, layer_runs))
    _finish_accuracy(variants)
    speedups(variants)
    return variants


def _busy_machine_notes(env: dict) -> list[str]:
    """A warning when the load average exceeded the usable cores during the profile."""
    cores = env.get("cpu_cores_usable") or 1
    busiest = max((env.get("load_average") or [0])[0], (env.get("load_average_end") or [0])[0])
    if busiest <= cores:
        return []
    return [f"the machine was busy (1-minute load average up to {busiest:g} on {cores} cores): "
            "latencies include waiting for the CPU; compare them within this report only"]


def _settings(runs, warmup, min_seconds, batch_sizes, layer_runs, memory) -> dict:
    """How the numbers were measured, as the profile records it."""
    return {
        "runs": runs, "warmup": warmup, "min_seconds": min_seconds,
        "batch_sizes": sorted({int(b) for b in batch_sizes}),
        "sweep_runs": f"{runs} at batch 1, ceil({runs} / batch) at larger batches (at least {min(5, runs)})",
        "timing": "Runner.inference_time: the backend call only, input already in memory",
        "eval_batch_size": EVAL_BATCH_SIZE,
        "layer_profile_runs": layer_runs,
        "memory": memory,
        "memory_method": method_description(memory) if memory != "off" else None,
    }


def _default_command(build_dirs, data, runs, batch_sizes) -> str:
    argv = ["cunet-optimize", "profile", *map(str, build_dirs), "--runs", str(runs),
            "--batch-sizes", ",".join(map(str, batch_sizes))]
    if data is not None:
        argv += ["--data", str(data)]
    return shlex.join(argv)
