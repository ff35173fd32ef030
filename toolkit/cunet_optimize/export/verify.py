"""Checks every exported or rewritten ONNX graph must pass, and the one way we run ONNX Runtime.

Two questions, asked after every export and every graph pass:
1. Is the file valid ONNX? `onnx.checker.check_model(full_check=True)`, which also runs
   strict shape inference.
2. Does it compute what the reference computes? ONNX Runtime on the CPU with graph
   optimisations disabled (bit-faithful to the ONNX semantics, Q/DQ included) against
   PyTorch, or against the graph before a pass.

Tolerances, stated once here (per output; "range" = max - min of the reference):
- fp32: max |a - ref| <= 1e-4 * range. For a trained heatmap (range ~1) this is the
  usual 1e-4 absolute; scaling by the range keeps it meaningful for untrained models,
  whose heatmaps can be 1e-3 small.
- fp16: max |a - ref| <= 1e-2 * range (float16 has ~3 decimal digits).
- fake_quant: mean |a - ref| <= 0.2 * std(ref). PyTorch's fake-quant and ONNX
  Runtime's QuantizeLinear can round a value that sits on a rounding boundary to
  neighbouring integers (float arithmetic order differs); the flip propagates, so the
  maximum is not a fair test, the mean is. The export verifies on synthetic faces
  (onnx_export.verification_batch), not noise, for the same reason. Measured on the
  default model (percentile PTQ, 128 images): ONNX Runtime vs PyTorch 3% of the std,
  5.4% after activation equalization, and PyTorch against itself with input noise of
  1e-5 (far below one 8-bit image level) 12% and 5%: the flips are the network's own
  sensitivity, not an export error. A wiring error is of the order of the std itself.
A failure raises CUNetError: a graph that computes something else is never written
silently.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx

from cunet_optimize.errors import CUNetError

log = logging.getLogger(__name__)

ORT_LEVELS = ("disable_all", "basic", "extended", "all")


@dataclass(frozen=True)
class Tolerance:
    kind: str  # "fp32" | "fp16" | "fake_quant"
    statistic: str  # "max_abs_error" | "mean_abs_error"
    scale: str  # "range" | "std": what the limit is relative to
    limit: float

    def describe(self) -> str:
        return f"{self.statistic} <= {self.limit:g} * reference {self.scale}"


TOLERANCES = {
    "fp32": Tolerance("fp32", "max_abs_error", "range", 1e-4),
    "fp16": Tolerance("fp16", "max_abs_error", "range", 1e-2),
    "fake_quant": Tolerance("fake_quant", "mean_abs_error", "std", 0.2),
}


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs_error: float
    mean_abs_error: float
    reference_range: float
    reference_std: float
    allowed: float
    passed: bool


@dataclass
class VerificationResult:
    runtime: str
    reference: str
    tolerance: str
    batch: int
    outputs: list[OutputComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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
                f"{o.allowed:.3g} ({self.tolerance}); the graph computes something else, do not deploy it "
                "(report this with the model)"
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
    try:
        return ort.InferenceSession(_model_bytes(model), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        first = str(err).strip().splitlines()[0]
        raise CUNetError(f"ONNX Runtime cannot load the model: {first}") from err


def run_onnxruntime(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    level: str = "disable_all",
) -> dict[str, np.ndarray]:
    """Run once on the CPU; returns {output name: array}."""
    session = make_session(model, level)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def compare_outputs(
    actual: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    kind: str,
    *,
    runtime: str,
    reference_name: str,
    names: Sequence[str] | None = None,
) -> VerificationResult:
    """Compare outputs name by name under TOLERANCES[kind] (a pure function)."""
    tol = TOLERANCES[kind]
    names = list(names if names is not None else reference.keys())
    batch = int(next(iter(reference.values())).shape[0]) if reference else 0
    result = VerificationResult(runtime, reference_name, tol.describe(), batch)
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
        finite = np.isfinite(a).all()
        rng = float(r.max() - r.min()) if r.size else 0.0
        std = float(r.std()) if r.size else 0.0
        base = rng if tol.scale == "range" else std
        allowed = tol.limit * max(base, 1e-12)
        stat = float(err.max() if tol.statistic == "max_abs_error" else err.mean()) if r.size else 0.0
        result.outputs.append(
            OutputComparison(
                name=name,
                shape=list(r.shape),
                max_abs_error=float(err.max()) if r.size else 0.0,
                mean_abs_error=float(err.mean()) if r.size else 0.0,
                reference_range=rng,
                reference_std=std,
                allowed=allowed,
                passed=bool(finite and stat <= allowed),
            )
        )
    return result


def graph_kind(model: onnx.ModelProto) -> str:
    """Which tolerance applies: 'fake_quant' if the graph quantizes, else its float type."""
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "fake_quant"
    float16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    return "fp16" if float16 else "fp32"


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
