"""The surgery stage: run named passes over an ONNX model and verify each one.

`run_surgery(model, passes=None, target="cpu")` runs `default_passes(...)` unless told
otherwise. After every pass the graph is checked (onnx.checker, full) and run in ONNX
Runtime on the same inputs as before the pass (synthetic faces for a CU-Net graph;
ORT_DISABLE_ALL, BASIC once the graph holds INT4, the level ONNX Runtime executes INT4
DequantizeLinear exactly at); an exact pass that changes the outputs by more than
onnx_tools/verify.py allows, against the noise of the input graph under ONNX Runtime's own fusions,
raises CUNetError. Passes that change outputs by design (tie_concat_qdq_scales) record the
change in their report instead.

Which form of the dense concatenations the default pipeline produces is a per-backend
decision (design space in docs/QUANT_RULES.md), measured by bench/bench_surgery.py and
recorded in FOLD_DENSE_CONCATS below (or timed per network at build time).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import onnx
import onnx_graphsurgeon as gs

from cunet_optimize import __version__
from cunet_optimize.cache_seal import ProcessMemo, feed_digest
from cunet_optimize.data.synth import VERIFY_SIZE, verification_batch
from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.graph import ModelLike, as_model, opset_of, to_model
from cunet_optimize.onnx_tools.verify import (
    check_onnx,
    compare_outputs,
    graph_kind,
    ort_version,
    random_feeds,
    run_onnxruntime,
)
from cunet_optimize.surgery.batchnorm import cleanup, fold_batchnorm
from cunet_optimize.surgery.dense_concat import flatten_nested_concats, fold_dense_concats
from cunet_optimize.surgery.int4 import dequantize_weights, pack_int4_weights
from cunet_optimize.surgery.integer_dataflow import integer_dataflow
from cunet_optimize.surgery.lint import lint_target
from cunet_optimize.surgery.qdq import check_weight_axes, check_zero_points, remove_redundant_qdq, tie_concat_qdq_scales
from cunet_optimize.surgery.report import PassReport

log = logging.getLogger(__name__)

PASSES: dict[str, Callable[[gs.Graph], PassReport]] = {
    "cleanup": cleanup,
    "flatten_nested_concats": flatten_nested_concats,
    "fold_batchnorm": fold_batchnorm,
    "fold_dense_concats": fold_dense_concats,
    "remove_redundant_qdq": remove_redundant_qdq,
    "tie_concat_qdq_scales": tie_concat_qdq_scales,
    "check_zero_points": check_zero_points,
    "check_weight_axes": check_weight_axes,
    "pack_int4_weights": pack_int4_weights,
    "dequantize_weights": dequantize_weights,
    "integer_dataflow": integer_dataflow,
}
# Passes whose outputs may differ from their inputs by design.
CHANGES_OUTPUTS = frozenset({"tie_concat_qdq_scales", "integer_dataflow"})

# Whether the dense concatenations of a float graph are folded, per backend: True, False,
# or TIMED (the default pipeline keeps them; `build` times both forms on the build machine
# at each usable thread count and keeps the faster, see forms.choose_concat_form).
# onnxruntime: TIMED, because the winner depends on the network and the machine. Medians at
#   batch 1 (ORT 1.32 CPU, ORT_ENABLE_ALL, forms alternating run by run, trained or
#   BN-recalibrated weights, the shared 2-vCPU machine):
#   bench/results/surgery.json (`python bench/bench_surgery.py --runs 15 --threads 1`, load
#   average 1.4 rising to 8.9): embedded model concat 18.0 vs folded 19.1 ms, the authors' N=8
#   face model 806 vs 839 ms; bench/results/int8_cpu-run1.json and bench/results/int8_cpu-run2.json
#   (`python bench/bench_int8_cpu.py`, load 6-7): N=8 on 1 thread concat 288 vs folded 298 ms in
#   one run, 377 vs 353 ms in the other, on 2 threads without spinning 343 vs 311 and 470 vs 442;
#   bench/results/int8_cpu_quiet.json (load under 1.7): N=8 on 2 threads 119.6 vs 125.5 ms, the
#   embedded model's fastest concat 10.5 ms (2 threads, no spinning) vs folded 10.6 ms (1 thread).
#   Folding never materialises the Concat outputs (191 MB at batch 1 on the N=8 model) and moves
#   the estimated peak activation memory (conv epilogues fused) from 17.1 to 14.0 MB (N=8) and
#   from 4.1 to 4.9 MB (embedded) (surgery.json).
# tensorrt: no (not measured: no GPU here). TensorRT elides a Concat by writing its inputs
#   into one buffer (with tied scales in INT8), so the concat form is kept until a device
#   measurement says otherwise.
# Quantized graphs are never folded by default: the Q/DQ-per-branch form is unmeasured.
TIMED = "timed"
FOLD_DENSE_CONCATS = {"onnxruntime": TIMED, "tensorrt": False}
# INT8 graphs for ONNX Runtime are rewritten into uint8 integer dataflow (integer_dataflow.py):
# TensorRT's placement runs there as float convs between Q/DQ, slower than FP32. INT4 and mixed
# (auto) graphs too: their per-channel INT4 convs (quant.policy.int4_block_for) run there as the
# INT8 convs they equal, BatchNorm folded into the integer rescale; the engine stores those
# weights packed (onnx_tools/storage.py, pack_int4_initializers). The pass's
# relu_form variants, thread count and thread-pool spinning are timed per machine by `build`
# (pipeline/autotune.py choose_int8_form); the default pipeline makes the "depthwise" form.
INTEGER_DATAFLOW = {"onnxruntime": True, "tensorrt": False}


def default_passes(target: str = "cpu", *, quantized: bool = False, opset: int = 17,
                   dla_core: int | None = None) -> list[str]:
    spec = lint_target(target, dla_core)
    passes = ["cleanup", "flatten_nested_concats"]
    if opset >= 21:
        # Before BN folding: folding a BN scale into 4-bit weights takes them off their grid.
        # ONNX Runtime stores them packed; TensorRT builds INT4 as dequantized weights.
        passes.append("pack_int4_weights" if spec.backend == "onnxruntime" else "dequantize_weights")
    passes.append("fold_batchnorm")
    if FOLD_DENSE_CONCATS[spec.backend] is True and not quantized:
        # fold_batchnorm again: a segment read by one branch only now meets its BN right after its Conv
        passes += ["fold_dense_concats", "fold_batchnorm"]
    if quantized:
        passes.append("remove_redundant_qdq")
        if spec.dla:  # DLA rejects INT8 Concat/pooling with differing scales
            passes.append("tie_concat_qdq_scales")
        if spec.backend == "tensorrt":
            passes += ["check_zero_points", "check_weight_axes"]
        if INTEGER_DATAFLOW[spec.backend]:
            passes.append("integer_dataflow")
    return passes


@dataclass
class SurgeryResult:
    model: onnx.ModelProto
    reports: list[PassReport] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    # the graph the last pass started from: a variant of the last pass (pipeline/autotune.py's
    # INT8 forms) runs from here instead of running every pass again
    before_last: onnx.ModelProto | None = None

    def to_dict(self) -> dict:
        return {"passes": self.passes, "reports": [r.to_dict() for r in self.reports]}


# Surgeries kept in this process (run_surgery), as export_onnx keeps exports: a build's INT8
# forms run integer_dataflow again on the graph the passes before it left, and a sweep in one
# process (the Python API, the test suite) repeats whole surgeries. In the test suite 65 of 143
# surgeries repeated one in the same process: 28 of their 71 CPU-seconds; with them kept, the
# suite ran in 282 s instead of 302-305 s (2-core Xeon, pytest alone).
SURGERY_MEMO_BYTES = 256 * 2**20
_surgeries = ProcessMemo(SURGERY_MEMO_BYTES, size=lambda result: result.model.ByteSize() + (
    result.before_last.ByteSize() if result.before_last is not None else 0))


def _surgery_key(proto: onnx.ModelProto, names: list[str], settings: list,
                 pass_options: Mapping[str, dict] | None) -> str | None:
    """The content key of a surgery: the graph's bytes, the passes (each pass function by identity,
    so a replaced one never matches), the settings and every pass option (calibration images by
    their bytes); None where an option has no content to key on."""
    h = hashlib.sha256(proto.SerializeToString())
    passes = [f"{name}:{PASSES[name].__module__}.{PASSES[name].__qualname__}:{id(PASSES[name])}" for name in names]
    keyed = feed_digest(h, [passes, settings, __version__, ort_version()]) and feed_digest(h, dict(pass_options or {}))
    return h.hexdigest() if keyed else None


def _ort_level(model: onnx.ModelProto) -> str:
    int4 = any(i.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for i in model.graph.initializer)
    return "basic" if int4 else "disable_all"


def _verification_feeds(proto: onnx.ModelProto, batch: int) -> dict:
    """Synthetic faces for a CU-Net image input (quantized graphs are calibrated on such
    images; on noise their rounding flips cascade), uniform noise for any other graph."""
    feeds = random_feeds(proto, batch=batch)
    if len(feeds) == 1:
        name, value = next(iter(feeds.items()))
        if value.shape[1:] == (3, VERIFY_SIZE, VERIFY_SIZE) and value.dtype == "float32":
            return {name: verification_batch(batch)}
    return feeds


def _fused_outputs(proto: onnx.ModelProto, feeds: dict) -> tuple[dict | None, str]:
    """The input graph's outputs with ONNX Runtime's own fusions: the noise an exact
    rewrite may add. None when ONNX Runtime cannot optimise this graph."""
    try:
        return run_onnxruntime(proto, feeds, "all"), "the input graph under ORT_ENABLE_ALL (vs the reference level)"
    except CUNetError as err:
        log.info("no fused reference for the surgery verification: %s", err)
        return None, ""


def run_surgery(
    model: ModelLike,
    passes: Sequence[str] | None = None,
    *,
    target: str = "cpu",
    dla_core: int | None = None,
    verify: bool = True,
    batch: int = 1,
    pass_options: Mapping[str, dict] | None = None,
) -> SurgeryResult:
    """Run `passes` (default: default_passes(target, ..., dla_core)) in order; returns the new model
    and one PassReport per pass (with its ORT verification when verify=True).
    `pass_options` gives keyword arguments per pass name (e.g. INT4 block scales)."""
    proto = as_model(model)
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    names = list(passes) if passes is not None else default_passes(target, quantized=quantized, opset=opset_of(proto),
                                                                   dla_core=dla_core)
    unknown = [p for p in names if p not in PASSES]
    if unknown:
        raise CUNetError(f"unknown surgery pass(es) {unknown}; known: {', '.join(PASSES)}")
    key = _surgery_key(proto, names, [target, dla_core, verify, batch], pass_options)
    kept = _surgeries.get(key)
    if kept is not None:
        log.info("surgery: the result of the same passes on the same graph earlier in this process")
        return kept
    feeds = _verification_feeds(proto, batch) if verify else {}
    before = run_onnxruntime(proto, feeds, _ort_level(proto)) if verify else {}
    noisy, noise_name = _fused_outputs(proto, feeds) if verify else (None, "")
    graph = gs.import_onnx(proto)
    result = SurgeryResult(proto, passes=names)
    for name in names:
        report = PASSES[name](graph, **(pass_options or {}).get(name, {}))
        current = to_model(graph)
        current.producer_name, current.producer_version = proto.producer_name, proto.producer_version
        del current.metadata_props[:]
        current.metadata_props.extend(proto.metadata_props)
        check_onnx(current, f"model after surgery pass {name}")
        if verify:
            level = _ort_level(current)
            after = run_onnxruntime(current, feeds, level)
            comparison = compare_outputs(
                after, before, graph_kind(current), noisy=noisy, noise_name=noise_name,
                runtime=f"onnxruntime {ort_version()} CPU {level}", reference_name="the graph before the pass",
            )
            report.verification = comparison.to_dict()
            if name in CHANGES_OUTPUTS:
                worst = max((o.max_abs_error for o in comparison.outputs), default=0.0)
                report.notes.append(f"outputs changed by design: max abs change {worst:.3g}")
            else:
                comparison.raise_on_failure(f"surgery pass {name}")
            before = after
        log.info(report.summary())
        result.reports.append(report)
        result.before_last, result.model = result.model, current
    _surgeries.put(key, result)
    return result
