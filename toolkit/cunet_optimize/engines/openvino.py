"""OpenVINO on the CPU: the second CPU runtime beside ONNX Runtime (the optional extra `openvino`).

OpenVINO reads an ONNX file as it is, Q/DQ included, and runs explicit Q/DQ with integer kernels
(checked on our TensorRT bundles' model.onnx), so it needs no graph form of its own: `build --target cpu` times it
on the forms the build already has (pipeline/autotune.py, choose_cpu_runtime) and, where it wins and
passes the accuracy gate, writes `openvino.json` (OV_SESSION_FILE) beside ONNX Runtime's session.json:
the ONNX file it runs, its sha256 and the compile properties that were timed. The runner reloads both.

Precision: OpenVINO's default inference precision on a CPU with AMX or AVX-512 BF16 is bf16, also
for an FP32 model, so every setting here pins INFERENCE_PRECISION_HINT (f32 unless the build's
precision is bf16): an fp32 or int8 build never computes in bf16 behind the user's back.
`--precision bf16` is OpenVINO's alone: ONNX Runtime 1.32's CPU provider has no bfloat16 Conv
kernel (a bfloat16 Conv at opset 22 fails with "Could not find an implementation for Conv(22)";
at opset 17 the ONNX checker refuses the type), so there is nothing there to time.

Without the extra nothing here is imported by a build: `openvino_version()` is None and the build
is what it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from cunet_optimize.atomic import sha256_file, write_atomic
from cunet_optimize.engines.base import Runner, final_head
from cunet_optimize.errors import CUNetError

OV_SESSION_SCHEMA = "cunet-optimize/openvino-session/1"
OV_SESSION_FILE = "openvino.json"
INFERENCE_PRECISIONS = ("f32", "bf16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
INSTALL_HINT = "pip install 'cunet-optimize[openvino]'"


class OpenVinoUnavailable(CUNetError):
    """OpenVINO is not installed here."""


def openvino_version() -> str | None:
    """The installed OpenVINO's version, None where the extra is not installed."""
    try:
        import openvino  # noqa: PLC0415  (optional and heavy: only where asked)
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


def check_bf16_here() -> str:
    """The CPU's bf16 ISA when `--precision bf16` can run on this machine; a CUNetError otherwise:
    a CPU without AVX-512 BF16 or AMX first (no runtime helps there), then OpenVINO missing."""
    from cunet_optimize.engines.cpu_isa import cpu_bf16_isa, cpu_model

    isa = cpu_bf16_isa()
    if isa in ("none", "unknown"):
        raise CUNetError(f"--precision bf16 needs a CPU with AVX-512 BF16 or AMX; this one ({cpu_model()}) has "
                         "neither: build fp32 or int8 for it, or build bf16 on a CPU that has them")
    if openvino_version() is None:
        raise OpenVinoUnavailable("--precision bf16 runs on OpenVINO (ONNX Runtime's CPU provider has no bf16 "
                                  f"convolution), which is not installed; {INSTALL_HINT}")
    return isa


def _ov():
    try:
        import openvino  # noqa: PLC0415
    except ImportError:
        raise OpenVinoUnavailable(f"OpenVINO is not installed; {INSTALL_HINT}") from None
    return openvino


@dataclass(frozen=True)
class OvSettings:
    """How a model is compiled for OpenVINO's CPU plugin; openvino.json stores these."""

    inference_precision: str = "f32"  # INFERENCE_PRECISION_HINT, always pinned (module docstring)
    threads: int = 0  # INFERENCE_NUM_THREADS; 0 = OpenVINO's default
    performance_hint: str = "LATENCY"
    num_streams: int = 1  # one stream: a batch-1 request gets every thread

    def validate(self) -> None:
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise CUNetError(f"unknown OpenVINO inference precision '{self.inference_precision}'; "
                             f"choose one of {', '.join(INFERENCE_PRECISIONS)}")
        if self.performance_hint not in PERFORMANCE_HINTS:
            raise CUNetError(f"unknown OpenVINO performance hint '{self.performance_hint}'; "
                             f"choose one of {', '.join(PERFORMANCE_HINTS)}")
        for name in ("threads", "num_streams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CUNetError(f"OpenVINO {name} must be an integer >= 0, got {value!r}")

    def properties(self) -> dict[str, Any]:
        """The CPU plugin's compile properties."""
        props: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.inference_precision,
                                 "PERFORMANCE_HINT": self.performance_hint}
        if self.threads:
            props["INFERENCE_NUM_THREADS"] = self.threads
        if self.num_streams:
            props["NUM_STREAMS"] = self.num_streams
        return props

    def label(self) -> str:
        return f"{self.inference_precision} x{self.threads or 'default'} {self.performance_hint.lower()}"


def settings_candidates(precision: str, threads: list[int], bf16_float: bool = False) -> list[OvSettings]:
    """The compile settings `build` times for a build precision: each thread count with each
    performance hint, at the inference precision the build's precision means; `bf16_float`: an
    auto plan whose float convs are bf16 (quant/auto.py float_type) also at bf16, which runs its
    float operations in bf16 and leaves its integer convs integer."""
    inference = ["bf16"] if precision == "bf16" else ["f32", "bf16"] if bf16_float else ["f32"]
    return [OvSettings(p, n, hint, 1 if hint == "LATENCY" else 0)
            for p in inference for n in threads for hint in PERFORMANCE_HINTS]


def bf16_runs_here() -> bool:
    """Whether this machine runs bf16 (check_bf16_here would pass)."""
    try:
        check_bf16_here()
    except CUNetError:
        return False
    return True


_COMPILE_CACHE: ContextVar[Path | None] = ContextVar("openvino_compile_cache", default=None)


@contextmanager
def compile_cache(within: Path) -> Iterator[Path]:
    """OpenVINO's model cache (CACHE_DIR) in a new folder inside `within`, while a build times and
    checks its candidates: a model compiled again (each timing round, each accuracy check, each
    compile setting) is imported from the blob its first compile left instead of compiled anew.
    OpenVINO 2026.4's CPU plugin keeps one blob per model and applies the compile settings
    (precision, threads, hint) on import, with the outputs a plain compile gives. Embedded INT8
    model, 2-core AMD EPYC: 0.11 s against 0.45 s. The folder goes with the context, so no blob
    outlives the build that made it; inside another compile_cache, that one's folder serves.
    Yields the folder."""
    active = _COMPILE_CACHE.get()
    if active is not None:
        yield active
        return
    folder = Path(tempfile.mkdtemp(prefix="openvino-cache-", dir=within))
    token = _COMPILE_CACHE.set(folder)
    try:
        yield folder
    finally:
        _COMPILE_CACHE.reset(token)
        shutil.rmtree(folder, ignore_errors=True)


class OpenVinoSessionRunner(Runner):
    """Runs one ONNX file compiled by OpenVINO's CPU plugin with `settings`."""

    prefix = "openvino"

    def __init__(self, model_path: str | os.PathLike, settings: OvSettings | None = None, name: str | None = None):
        super().__init__(name)
        self.model_path = Path(model_path)
        self.settings = settings or OvSettings()
        self.settings.validate()
        self._shape: tuple[int | None, ...] = super().input_shape

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return self._shape

    def activate_impl(self) -> None:
        ov = _ov()
        if not self.model_path.is_file():
            raise CUNetError(f"model not found: {self.model_path}; rebuild it")
        core = ov.Core()
        model = core.read_model(str(self.model_path))
        if len(model.inputs) != 1:
            raise CUNetError(f"{self.model_path}: expected one image input, found {len(model.inputs)}")
        properties = self.settings.properties()
        if _COMPILE_CACHE.get() is not None:
            properties["CACHE_DIR"] = str(_COMPILE_CACHE.get())
        self._compiled = core.compile_model(model, "CPU", properties)
        outputs = [(o.get_any_name(), o.get_partial_shape().rank.get_length()) for o in self._compiled.outputs]
        head = final_head(outputs)
        self._output = next(o for o in self._compiled.outputs if o.get_any_name() == head)
        self._request = self._compiled.create_infer_request()
        shape = self._compiled.inputs[0].get_partial_shape()
        self._shape = tuple(d.get_length() if d.is_static else None for d in shape)

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: batch})
        return np.asarray(result[self._output], dtype=np.float32)

    def execution_graph(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """The compiled model's layers in execution order: (layer type, runtime precision, output
        shapes) each, what the CPU plugin runs (names left out: they are labels)."""
        rows = []
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            rows.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str),
                         tuple(str(o.get_partial_shape()) for o in op.outputs())))
        return rows

    def deactivate_impl(self) -> None:
        self._request = self._compiled = self._output = None


def runtime_description(settings: OvSettings) -> str:
    """What a profile or a gate says ran: OpenVINO's version and its compile settings."""
    threads = "default threads" if not settings.threads else f"{settings.threads} thread(s)"
    return (f"OpenVINO {openvino_version()} CPU plugin (inference precision {settings.inference_precision}, "
            f"{threads}, {settings.performance_hint} hint)")


def write_session(out_dir: str | os.PathLike, model: str | os.PathLike, settings: OvSettings,
                  precision: str, timings: Mapping[str, float] | None = None) -> Path:
    """openvino.json in `out_dir`: the ONNX file OpenVINO runs (a file of the folder, by name, and
    its sha256) and the settings it is compiled with."""
    from cunet_optimize.engines.cpu_isa import cpu_bf16_isa, cpu_model

    out, model = Path(out_dir), Path(model)
    if model.parent.resolve() != out.resolve():
        raise ValueError(f"{model} is not in the build folder {out}")
    settings.validate()
    record = {
        "schema": OV_SESSION_SCHEMA,
        "model": model.name,
        "model_sha256": sha256_file(model),
        "precision": precision,
        "openvino_version": openvino_version(),
        **asdict(settings),
        "properties": settings.properties(),
        "median_ms_batch1": dict(timings or {}),
        "cpu": {"model": cpu_model(), "bf16_isa": cpu_bf16_isa()},
    }
    return write_atomic(out / OV_SESSION_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


# The ONNX file OpenVINO deploys (choose_openvino_storage): the timed form, stored compactly.
OV_MODEL_FILE = "model.ov.onnx"
# Packed INT4 weights are kept unless they compile into other layers than INT8 ones and run slower
# by more than this fraction (the alternating blocks' noise), as ONNX Runtime's engine decides
# (onnxrt.PACKED_LATENCY_TOLERANCE).
PACKED_LATENCY_TOLERANCE = 0.05
STORAGE_TIMING_RUNS = 20


def choose_openvino_storage(form: Path, settings: OvSettings, out: Path, accuracy_check=None) -> dict:
    """out/OV_MODEL_FILE: the ONNX form OpenVINO was timed on (`form`), its tensors renamed short,
    its node names and default attribute values dropped, its small constants stored once and,
    checked, its weights stored compact (onnx_tools/storage.py): weights the graph quantizes with
    a QuantizeLinear (the TensorRT Q/DQ form) stored as their integers, all-zero weight zero points
    left to the default, INT4-valued integer weights packed (OpenVINO folds the Cast at compile).
    The renamed form's outputs must equal `form`'s in OpenVINO, bit for bit (a bug otherwise); the
    compact one is kept by `keeps_compact`: where it runs no slower and its outputs are identical
    too or, where OpenVINO computes other bits from integer-stored weights (it fuses them
    differently; a deep network amplifies the rounding), where it passes `accuracy_check(runner)
    -> dict` (with "passed"): the gate the timed form passed (pipeline/build.py _variant_gate).
    Returns the record (bytes, timings, the choice); the file is written atomically."""
    import onnx

    from cunet_optimize.data.synth import verification_batch
    from cunet_optimize.engines.base import time_in_blocks

    final = out / OV_MODEL_FILE
    model = onnx.load(form)
    defaults = _store_plain(model)
    paths = {"plain": out / f".{OV_MODEL_FILE}.plain"}
    onnx.save(model, paths["plain"])
    quantized, zero_points, packed = _store_compact(model)
    if quantized or zero_points or packed:
        paths["compact"] = out / f".{OV_MODEL_FILE}.compact"
        onnx.save(model, paths["compact"])
    with compile_cache(out):  # each form compiled once for its checks and timing rounds
        try:
            image = verification_batch(1)
            runners = {"form": OpenVinoSessionRunner(form, settings),
                       **{label: OpenVinoSessionRunner(path, settings) for label, path in paths.items()}}
            outputs, layers = {}, {}
            for label, runner in runners.items():
                with runner:
                    outputs[label] = runner.infer(image)
                    layers[label] = runner.execution_graph()
            if not np.array_equal(outputs["plain"], outputs["form"]):  # labels and equal values: a bug
                raise CUNetError(f"renaming the tensors of {form}, sharing its constants or dropping its default "
                                 "attribute values changed OpenVINO's outputs; "
                                 "this is a bug, report it")
            record: dict[str, Any] = {"form": form.name, "default_attributes_dropped": defaults,
                                      "quantized_weights": quantized,
                                      "zero_points_dropped": zero_points, "packed_initializers": packed,
                                      "chosen": "plain",
                                      "bytes": {"form": form.stat().st_size,
                                                **{label: path.stat().st_size for label, path in paths.items()}}}
            if "compact" in paths:
                timed = {label: t.median_ms for label, t in
                         time_in_blocks({label: runners[label] for label in paths}, image, STORAGE_TIMING_RUNS).items()}
                same = bool(np.array_equal(outputs["compact"], outputs["form"]))
                # the same compiled layers run the same kernels: a timing difference is then noise
                compiled_same = layers["compact"] == layers["plain"]
                fast = compiled_same or timed["compact"] <= timed["plain"] * (1 + PACKED_LATENCY_TOLERANCE)
                record.update(median_ms_batch1={k: round(v, 3) for k, v in timed.items()}, outputs_identical=same,
                              same_layers_compiled=compiled_same, no_slower=fast)
                if fast and not same and accuracy_check is not None:  # other bits: judged as the forms are
                    record["accuracy"] = accuracy_check(runners["compact"])
                if keeps_compact(record):
                    record["chosen"] = "compact"
            b = record["bytes"]
            compact = [f"{quantized} Q/DQ weight(s) stored as integers"] * bool(quantized) + \
                [f"{zero_points} zero weight zero point(s) left to the default"] * bool(zero_points) + \
                [f"{packed} INT4-valued weight(s) packed"] * bool(packed)
            record["why"] = (f"OpenVINO's {OV_MODEL_FILE}: {form.name} with short names"
                             + "".join(f", {c}" for c in compact if record["chosen"] == "compact")
                             + f", {b['form']} -> {b[record['chosen']]} bytes, {_storage_verdict(record, compact)}")
            os.replace(paths[record["chosen"]], final)
        finally:
            for path in paths.values():
                path.unlink(missing_ok=True)
        return record


def _store_plain(model) -> int:
    """choose_openvino_storage's renamed form, in place: short tensor names, no node names (OpenVINO's
    per-op times are not profiled here), small constants stored once, no attribute at its default
    value. Returns how many default attribute values went."""
    from cunet_optimize.onnx_tools.storage import drop_default_attributes, share_constants, shorten_names

    shorten_names(model, nodes=True)
    share_constants(model)
    return drop_default_attributes(model)


def _store_compact(model) -> tuple[int, int, int]:
    """choose_openvino_storage's compact form of the renamed one, in place: Q/DQ weights stored as
    integers, zero weight zero points left out, INT4-valued weights packed. Returns the counts."""
    from cunet_optimize.onnx_tools.storage import QDQ_WEIGHT_INPUTS, drop_zero_weight_zero_points, opset, \
        pack_int4_initializers, store_quantized_weights

    quantized = store_quantized_weights(model)
    zero_points = drop_zero_weight_zero_points(model)
    return quantized, zero_points, pack_int4_initializers(model, QDQ_WEIGHT_INPUTS) if opset(model) >= 21 else 0


def compact_bytes(form: Path) -> int:
    """The bytes of `form` stored as choose_openvino_storage's compact form: what deploying it with
    OpenVINO would cost on disk where that form is kept (pipeline/autotune.py choose_cpu_runtime
    breaks timing ties between forms by it)."""
    import onnx

    model = onnx.load(form)
    _store_plain(model)
    _store_compact(model)
    return model.ByteSize()


def keeps_compact(record: dict) -> bool:
    """choose_openvino_storage's rule on its record: the compact file is deployed where it compiles
    into the same layers or runs no slower (`no_slower`) and its outputs are the timed form's bit
    for bit or, where they are not, it passed the accuracy gate (`accuracy`; without a check,
    identical outputs are required)."""
    return bool(record.get("no_slower") and (record["outputs_identical"] or record.get("accuracy", {}).get("passed")))


def _storage_verdict(record: dict, compact: list[str]) -> str:
    """What choose_openvino_storage's record says of the deployed file's outputs and, where the
    compact storage (`compact`: what it changes) was kept out, why."""
    gated = record.get("accuracy")
    metric = f"{gated['metric']} {gated['value']:.3f} against {gated['against']}" if gated else ""
    if record["chosen"] == "compact" and not record["outputs_identical"]:
        return f"outputs differ in their last bits and pass the accuracy gate ({metric})"
    if record["chosen"] == "compact" or "outputs_identical" not in record:
        return "outputs identical"
    why = ("slower" if not record["no_slower"] else
           f"its outputs differ and fail the accuracy gate ({metric})" if gated else "its outputs differ")
    return f"outputs identical; {' and '.join(compact)} kept out ({why})"


class OpenVinoRunner(OpenVinoSessionRunner):
    """Runs what `write_session` recorded: its ONNX file with its compile settings."""

    def __init__(self, build: str | os.PathLike, name: str | None = None):
        path = Path(build)
        session_json = path / OV_SESSION_FILE if path.is_dir() else path
        if not session_json.is_file():
            raise CUNetError(f"no OpenVINO session at {build} (missing {OV_SESSION_FILE}); rebuild it with "
                             "`cunet-optimize build --target cpu` where OpenVINO is installed")
        try:
            record = json.loads(session_json.read_text())
        except ValueError as exc:
            raise CUNetError(f"{session_json} is not valid JSON ({exc}); rebuild") from exc
        if not isinstance(record, dict) or record.get("schema") != OV_SESSION_SCHEMA:
            raise CUNetError(f"{session_json} is not an {OV_SESSION_SCHEMA} record; rebuild")
        self.record = record
        model = session_json.parent / str(record.get("model"))
        if model.is_file() and sha256_file(model) != record.get("model_sha256"):
            raise CUNetError(f"{model} does not match the sha256 {session_json} recorded (replaced or edited after "
                             "the build); rebuild it with `cunet-optimize build ... --force`")
        settings = OvSettings(**{f.name: record[f.name] for f in fields(OvSettings) if f.name in record})
        super().__init__(model, settings, name=name)
