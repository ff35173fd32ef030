"""Checks every exported or rewritten ONNX graph must pass, and the one way we run ONNX Runtime.

Two questions, asked after every export and every graph pass:
1. Is the file valid ONNX? `onnx.checker.check_model(full_check=True)`, which also runs
   strict shape inference.
2. Does it compute what the reference computes? ONNX Runtime on the CPU with graph
   optimisations disabled (bit-faithful to the ONNX semantics, Q/DQ included) against
   PyTorch, or against the graph before a pass.

Tolerances are judged against the network's own rounding noise, measured on the same
inputs, never against a fixed fraction of the output: a deep CU-Net amplifies float32
rounding (the authors' N=8 face model with realistic activations moves by 6e-4 of its
output range between PyTorch float32 and float64, a trained N=2 model by 7e-7), so a
fixed fraction either rejects a correct deep graph or accepts a miswired shallow one.
For each output, with `noisy` the same network evaluated a second, equally valid way:
    error(graph, reference) <= NOISE_MULTIPLE * error(noisy, reference) + floor * scale
- fp32: reference = the PyTorch model in float64, noisy = PyTorch float32, statistic =
  max |a - ref|, floor 1e-6 * range.
- fp16: reference = float64, noisy = PyTorch float32 with weights and every module's
  output rounded to float16 (fp16 storage, fp32 accumulation, as GPUs run it), max |.|,
  floor 1e-4 * range.
- fake_quant: reference = PyTorch float32 (fake quantization has no float64 kernels),
  noisy = the same model on inputs moved by QUANT_PROBE (1e-5, far below one 8-bit image
  level): how many activations sit on rounding boundaries and how far their flips
  carry. Statistic mean |a - ref| (a flip moves single values a whole step, so the
  maximum says nothing), floor 1e-4 * std.
- graph passes (surgery): reference = the graph before the pass (ORT_DISABLE_ALL),
  noisy = the same graph with ONNX Runtime's own fusions (conv+BN folding, integer
  kernels for Q/DQ), the kind of rewrite our passes make.
A fake-quant graph is also checked with its activation Q/DQ pairs bypassed against the
model with activation quantization off (quantized weights kept), under the fp32 rule: a
deep network with random weights is chaotic under activation rounding (the N=8 face
model's output moves by a sizeable part of its std when its input moves by 1e-5), so there the
output check alone cannot tell a miswired graph from rounding, while the float wiring
check still can.
NOISE_MULTIPLE = 4: a correct graph errs by about its noise (every build records both,
with the allowance, in build.json `export.verification`), a miswired one far beyond the
allowance: tests/test_verify.py passes the N=8 face model's correct export at this multiple
and fails a swapped channel pair, a dropped BatchNorm and permuted concat inputs by more
than 10x the allowance.
A failure raises CUNetError: a graph that computes something else is never written
silently.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np
import onnx

from cunet_optimize.errors import CUNetError

log = logging.getLogger(__name__)

ORT_LEVELS = ("disable_all", "basic", "extended", "all")

NOISE_MULTIPLE = 4.0
QUANT_PROBE = 1e-5  # input shift that measures a fake-quant network's rounding-boundary sensitivity


@dataclass(frozen=True)
class Tolerance:
    kind: str  # "fp32" | "fp16" | "fake_quant"
    statistic: str  # "max_abs_error" | "mean_abs_error"
    floor: float  # allowed on top of the measured noise, relative to `scale`
    scale: str  # "range" | "std" of the reference

    def describe(self, noise: str) -> str:
        return (f"{self.statistic} <= {NOISE_MULTIPLE:g} x that of {noise} + {self.floor:g} x reference "
                f"{self.scale}")


TOLERANCES = {
    "fp32": Tolerance("fp32", "max_abs_error", 1e-6, "range"),
    "fp16": Tolerance("fp16", "max_abs_error", 1e-4, "range"),
    "fake_quant": Tolerance("fake_quant", "mean_abs_error", 1e-4, "std"),
}


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs_error: float
    mean_abs_error: float
    reference_range: float
    reference_std: float
    noise: float  # the tolerance's statistic for the noisy evaluation (0 when none was measured)
    allowed: float
    passed: bool


@dataclass
class VerificationResult:
    runtime: str
    reference: str
    noise: str  # what the graph's error was judged against
    tolerance: str
    batch: int
    outputs: list[OutputComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wiring: dict | None = None  # fake-quant graphs: the check with activation Q/DQ bypassed

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def raise_on_failure(self, what: str) -> None:
        bad = [o for o in self.outputs if not o.passed]
        if bad:
            o = bad[0]
            stat = self.tolerance.split(" ")[0]
            value = o.max_abs_error if stat == "max_abs_error" else o.mean_abs_error
            raise CUNetError(
                f"{what}: output '{o.name}' differs from {self.reference}: {stat} {value:.3g} > allowed "
                f"{o.allowed:.3g} ({NOISE_MULTIPLE:g} x the {o.noise:.3g} of {self.noise}, plus a floor); "
                "the graph computes something else, do not deploy it (report this with the model)"
            )


def check_onnx(model: onnx.ModelProto | str | os.PathLike, what: str = "ONNX model") -> None:
    """onnx.checker with full_check (strict shape inference); CUNetError on failure."""
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CUNetError(f"{what} is not valid ONNX: {first}; this is a bug in the graph rewrite, report it") from err


def _model_bytes(model: onnx.ModelProto | bytes | str | os.PathLike) -> bytes | str:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    return str(model)


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    level: str = "disable_all",
    intra_op_num_threads: int = 1,
    session_config: Mapping[str, str] | None = None,
):
    """An ONNX Runtime CPU session; level is one of ORT_LEVELS."""
    import onnxruntime as ort

    levels = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise CUNetError(f"unknown ONNX Runtime optimisation level '{level}'; use one of {', '.join(ORT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.intra_op_num_threads = intra_op_num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    return open_session(model, options)


def open_session(model: onnx.ModelProto | bytes | str | os.PathLike, options):
    """An ONNX Runtime CPU session of `model` with these SessionOptions: the one place the
    toolkit makes sessions (checks, engines, the layer profiler); CUNetError in one line
    when ONNX Runtime cannot load the model."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(_model_bytes(model), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = str(model) if isinstance(model, (str, os.PathLike)) else "the model"
        raise CUNetError(f"ONNX Runtime cannot load {where}: {first}; check it with `cunet-optimize lint`") from err


def run_onnxruntime(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    level: str = "disable_all",
) -> dict[str, np.ndarray]:
    """Run once on the CPU; returns {output name: array}."""
    session = make_session(model, level)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


Key = TypeVar("Key")


def time_sessions(sessions: Mapping[Key, Any], feeds: Mapping[str, np.ndarray], runs: int,
                  warmup: int = 2) -> dict[Key, list[float]]:
    """Wall time in ms of each of `runs` calls of each session on `feeds`, after `warmup`
    untimed rounds, the sessions taking turns run by run (the benchmarks' way). Builds time
    their candidates in blocks instead (engines/base.py time_blocks): interleaved, a session
    whose threads spin between runs slows the others, so compare one-thread sessions here."""
    times: dict[Key, list[float]] = {key: [] for key in sessions}
    for i in range(warmup + runs):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            if i >= warmup:
                times[key].append((time.perf_counter() - start) * 1e3)
    return times


def _statistic(err: np.ndarray, statistic: str) -> float:
    if not err.size:
        return 0.0
    return float(err.max() if statistic == "max_abs_error" else err.mean())


def compare_outputs(
    actual: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    kind: str,
    *,
    noisy: Mapping[str, np.ndarray] | None = None,
    runtime: str,
    reference_name: str,
    noise_name: str = "",
    names: Sequence[str] | None = None,
) -> VerificationResult:
    """Compare outputs name by name under TOLERANCES[kind] (a pure function): `actual` may
    be NOISE_MULTIPLE times as far from `reference` as `noisy`, the same network evaluated
    another valid way, plus the floor. Without `noisy` only the floor is allowed."""
    tol = TOLERANCES[kind]
    names = list(names if names is not None else reference.keys())
    batch = int(next(iter(reference.values())).shape[0]) if reference else 0
    result = VerificationResult(runtime, reference_name, noise_name or "no noise measurement",
                                tol.describe(noise_name or "nothing"), batch)
    for name in names:
        if name not in actual:
            raise CUNetError(f"verification: output '{name}' is missing from the graph's outputs {sorted(actual)}")
        a = np.asarray(actual[name], dtype=np.float64)
        r = np.asarray(reference[name], dtype=np.float64)
        if a.shape != r.shape:
            raise CUNetError(
                f"verification: output '{name}' has shape {list(a.shape)}, the reference {list(r.shape)}"
            )
        err = np.abs(a - r)
        noise = _statistic(np.abs(np.asarray(noisy[name], dtype=np.float64) - r), tol.statistic) if noisy else 0.0
        rng = float(r.max() - r.min()) if r.size else 0.0
        std = float(r.std()) if r.size else 0.0
        base = rng if tol.scale == "range" else std
        allowed = NOISE_MULTIPLE * noise + tol.floor * max(base, 1e-12)
        result.outputs.append(
            OutputComparison(
                name=name,
                shape=list(r.shape),
                max_abs_error=float(err.max()) if r.size else 0.0,
                mean_abs_error=float(err.mean()) if r.size else 0.0,
                reference_range=rng,
                reference_std=std,
                noise=noise,
                allowed=allowed,
                passed=bool(np.isfinite(a).all() and _statistic(err, tol.statistic) <= allowed),
            )
        )
    return result


def computes_in_fp16(model: onnx.ModelProto) -> bool:
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def graph_kind(model: onnx.ModelProto) -> str:
    """Which tolerance applies: 'fake_quant' if the graph quantizes, else its float type."""
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "fake_quant"
    return "fp16" if computes_in_fp16(model) else "fp32"


def bypass_activation_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The graph with every activation QuantizeLinear -> DequantizeLinear pair (and a Clip
    that only feeds such a Q) replaced by a wire; weights keep their Q/DQ. Returns the new
    model and how many pairs were bypassed."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    bypassed = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear" and not isinstance(n.inputs[0], gs.Constant)]:
        source = q.inputs[0]
        producer = source.inputs[0] if source.inputs else None
        if producer is not None and producer.op == "Clip" and len(source.outputs) == 1:
            source = producer.inputs[0]  # the clamp to the quantized range goes with the Q/DQ
        for dq in [c for c in q.outputs[0].outputs if c.op == "DequantizeLinear"]:
            out = dq.outputs[0]
            for consumer in list(out.outputs):
                consumer.inputs[consumer.inputs.index(out)] = source
            for i, graph_out in enumerate(graph.outputs):
                if graph_out is out:
                    graph.outputs[i] = source
            bypassed += 1
    return gs.export_onnx(graph.cleanup().toposort()), bypassed


def random_feeds(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform [0, 1) inputs (the model's image range) for every graph input; symbolic dims = batch."""
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
