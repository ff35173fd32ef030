"""Lint an ONNX graph against what a deployment target accepts (docs/QUANT_RULES.md).

`lint_model(model_or_path, target)` returns Findings (severity error|warning, rule id,
node, message, fix); nothing is changed. Errors are what makes the build fail or
silently computes something else on the target; warnings cost speed (a reformat, a
DLA<->GPU transition) or say that a precision is stored, not executed.

Targets: `lint_target(name, dla_core)` reads the engines target registry
(targets.py): the backend, and with a DLA core (validated against the target's
DLA cores) the DLA rules. Facts behind the rules, and which are unverified:
- TensorRT's ONNX parser operator table: github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
  (as of TensorRT 10.0).
- DLA layers and restrictions: TensorRT 8.x documentation, unverified for 10/11
  (docs/QUANT_RULES.md, section 6); layers DLA cannot run fall back to the GPU when GPU fallback is on,
  so they are warnings, except what breaks a DLA build outright (dynamic shapes, FP32,
  INT8 Concat scales that differ, INT4).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.graph import ModelLike, as_model, constant_values, opset_of, producer
from cunet_optimize.onnx_tools.patterns import conv_weight, onnx_type_of, qdq_params, quantize

ERROR, WARNING = "error", "warning"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INT4_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
SCALE_RTOL = 1e-6


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    rule: str
    node: str
    message: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message} (fix: {self.fix})"


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class LintTarget:
    name: str
    backend: str  # "onnxruntime" | "tensorrt"
    dla_core: int | None = None  # layers are placed on this DLA core (Jetson Orin); None: the GPU/CPU

    @property
    def dla(self) -> bool:
        return self.dla_core is not None


def lint_target(name: str, dla_core: int | None = None) -> LintTarget:
    """What the lint needs to know about a target: its entry in the engines target
    registry, and the DLA core the layers go to (validated against its DLA cores)."""
    from cunet_optimize.targets import TARGETS, check_dla_core, get_target

    if name.endswith("-dla") and name not in TARGETS and name.removesuffix("-dla") in TARGETS:
        raise CUNetError(f"target '{name}' is gone; lint for the DLA with --target {name.removesuffix('-dla')} "
                         "--dla-core N (dla_core=N)")
    spec = get_target(name)
    return LintTarget(spec.name, spec.backend, check_dla_core(spec, dla_core))


# ----------------------------------------------------------------------------- facts

# github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md (TensorRT 10.0): operators marked N.
TRT_UNSUPPORTED_OPS = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow CenterCropPad
Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow HannWindow
ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss
Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch STFT SequenceAt
SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())
# ... and marked Y.
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# ONNX ops mapped to the DLA layer list (TensorRT 8.x docs; unverified for 10/11):
# convolution/deconvolution/fully connected, activation, pooling, scale (BN),
# elementwise, comparison, concatenation, resize, shuffle, slice, softmax, LRN, PReLU.
DLA_OPS = frozenset("""
Conv ConvTranspose Gemm MatMul Relu Sigmoid Tanh Clip LeakyRelu PRelu MaxPool AveragePool GlobalAveragePool
BatchNormalization Add Sub Mul Div Max Min Pow Sum Equal Greater Less Concat Resize Upsample Reshape
Transpose Flatten Squeeze Unsqueeze Slice Softmax LRN Abs Neg QuantizeLinear DequantizeLinear
""".split())
DLA_RESIZE_MAX_SCALE = {"nearest": 32, "linear": 4}


# ----------------------------------------------------------------------------- context


class _Context:
    def __init__(self, model: onnx.ModelProto, target: LintTarget):
        self.model = model
        self.graph = gs.import_onnx(model)
        self.target = target
        self.opset = opset_of(model)
        self.quantized = any(n.op in QDQ_OPS for n in self.graph.nodes)
        self.labels = {id(n): n.name or f"{n.op}#{i}" for i, n in enumerate(self.graph.nodes)}

    @property
    def tensorrt(self) -> bool:
        return self.target.backend == "tensorrt"

    def label(self, node: gs.Node) -> str:
        return self.labels.get(id(node), node.name or node.op)

    def nodes(self, *ops: str) -> Iterator[gs.Node]:
        return (n for n in self.graph.nodes if not ops or n.op in ops)

    def finding(self, severity: str, rule: str, node: gs.Node | str, message: str, fix: str) -> Finding:
        where = node if isinstance(node, str) else self.label(node)
        return Finding(severity, rule, where, message, fix)


def _is_activation(node: gs.Node) -> bool:
    """A Q/DQ on data computed at run time (not on a weight)."""
    x = node.inputs[0]
    if isinstance(x, gs.Constant):
        return False
    src = producer(x)
    # DQ of a Q of a constant (weight fake-quant) is a weight too.
    return not (src is not None and src.op == "QuantizeLinear" and isinstance(src.inputs[0], gs.Constant))


def _scale_value(node: gs.Node) -> float | None:
    p = qdq_params(node)
    if p.scale is None or p.scale.size != 1:
        return None
    return float(p.scale.reshape(-1)[0])


def _scale_in(tensor: gs.Tensor) -> float | None:
    """Scale of a tensor produced by a per-tensor DequantizeLinear."""
    src = producer(tensor)
    return _scale_value(src) if src is not None and src.op == "DequantizeLinear" else None


def _scales_out(tensor: gs.Tensor) -> list[float]:
    """Scales of the per-tensor QuantizeLinear nodes reading a tensor."""
    return [s for n in tensor.outputs if n.op == "QuantizeLinear" for s in [_scale_value(n)] if s is not None]


def _differ(scales: Iterable[float]) -> bool:
    values = list(scales)
    return len(values) > 1 and (max(values) - min(values)) > SCALE_RTOL * max(abs(v) for v in values)


def _fmt(scales: Iterable[float]) -> str:
    return ", ".join(f"{s:.4g}" for s in scales)


# ----------------------------------------------------------------------------- rules


def rule_trt_unsupported_op(ctx: _Context) -> Iterator[Finding]:
    if not ctx.tensorrt:
        return
    for node in ctx.nodes():
        if node.domain not in (None, "", "ai.onnx"):
            yield ctx.finding(ERROR, "trt-unsupported-op", node, f"custom-domain operator {node.domain}::{node.op}",
                              "replace it with standard ONNX operators or provide a TensorRT plugin")
        elif node.op in TRT_UNSUPPORTED_OPS:
            yield ctx.finding(ERROR, "trt-unsupported-op", node, f"TensorRT's ONNX parser does not implement {node.op}",
                              "rewrite it with supported operators (onnx-tensorrt docs/operators.md)")
        elif node.op not in TRT_SUPPORTED_OPS:
            yield ctx.finding(WARNING, "trt-unsupported-op", node, f"{node.op} is not in onnx-tensorrt's operator table",
                              "check the parser of your TensorRT version accepts it")


def rule_qdq_opset(ctx: _Context) -> Iterator[Finding]:
    for node in ctx.nodes(*QDQ_OPS):
        if ctx.opset < 13:
            yield ctx.finding(ERROR, "qdq-opset", node, f"Q/DQ needs opset >= 13 (per-channel scales); the model is opset {ctx.opset}",
                              "re-export with --opset 17")
            return
        p = qdq_params(node)
        int4 = onnx_type_of(node.inputs[0]) in INT4_TYPES or p.zero_point_type in INT4_TYPES
        if (int4 or p.block_size) and ctx.opset < 21:
            yield ctx.finding(ERROR, "qdq-opset", node, f"INT4 / block quantization needs opset 21; the model is opset {ctx.opset}",
                              "re-export with --opset 21")


def rule_qdq_zero_point(ctx: _Context) -> Iterator[Finding]:
    if not ctx.tensorrt:
        return
    for node in ctx.nodes(*QDQ_OPS):
        p = qdq_params(node)
        if p.zero_point is None and node.op == "QuantizeLinear":
            yield ctx.finding(ERROR, "qdq-zero-point", node, "QuantizeLinear without a zero point quantizes to uint8",
                              "give it an explicit int8 zero point 0 (symmetric)")
        elif p.zero_point is not None and np.any(np.asarray(p.zero_point, dtype=np.float64) != 0):
            yield ctx.finding(ERROR, "qdq-zero-point", node, "non-zero zero point: TensorRT accepts symmetric quantization only",
                              "quantize symmetrically (zero point 0), e.g. re-calibrate with symmetric ranges")


def rule_qdq_int8_type(ctx: _Context) -> Iterator[Finding]:
    if not ctx.tensorrt:
        return
    allowed = {onnx.TensorProto.INT8, *INT4_TYPES, onnx.TensorProto.FLOAT8E4M3FN}
    for node in ctx.nodes(*QDQ_OPS):
        p = qdq_params(node)
        int_type = p.zero_point_type if p.zero_point_type is not None else (
            onnx_type_of(node.inputs[0]) if node.op == "DequantizeLinear" else None)
        if int_type is not None and int_type not in allowed:
            name = onnx.helper.tensor_dtype_to_string(int_type).replace("TensorProto.", "")
            yield ctx.finding(ERROR, "qdq-int8-type", node, f"quantized type {name}: TensorRT quantizes to signed INT8 (or INT4/FP8)",
                              "use int8 with range [-128, 127] (weights [-127, 127])")


def rule_qdq_weight_range(ctx: _Context) -> Iterator[Finding]:
    if not ctx.tensorrt:
        return
    for node in ctx.nodes("Conv", "ConvTranspose", "Gemm", "MatMul"):
        w = conv_weight(node, ctx.graph)
        if w is None or w.kind == "float":
            continue
        p = w.params
        if w.kind == "dq":
            ints = np.asarray(w.stored.values).astype(np.int64)
        else:
            ints = quantize(w.stored.values, qdq_params(w.q))
        int_type = p.zero_point_type or onnx_type_of(w.stored)
        if int_type == onnx.TensorProto.INT8 and np.any(ints == -128):
            yield ctx.finding(WARNING, "qdq-weight-range", node, "int8 weights use -128: the range is not symmetric",
                              "quantize weights to [-127, 127] (fake-quant quant_min=-127)")


def rule_qdq_weight_axis(ctx: _Context) -> Iterator[Finding]:
    if not ctx.tensorrt:
        return
    for node in ctx.nodes("Conv", "ConvTranspose"):
        w = conv_weight(node, ctx.graph)
        if w is None or w.kind == "float":
            continue
        p = w.params
        if p.scale is None or p.scale.size == 1 or p.block_size:
            continue
        axis = p.axis % len(w.stored.shape)
        if node.op == "Conv" and axis != 0:
            yield ctx.finding(ERROR, "qdq-weight-axis", node, f"Conv weights quantized per channel on axis {axis}",
                              "quantize Conv weights per output channel (axis 0)")
        elif node.op == "ConvTranspose":
            yield ctx.finding(WARNING, "qdq-weight-axis", node,
                              f"ConvTranspose weights per channel on axis {axis}: TensorRT's expected axis is unverified (0 or 1)",
                              "test the build on the device, or quantize per tensor")


def rule_qdq_activation_per_tensor(ctx: _Context) -> Iterator[Finding]:
    if not ctx.tensorrt:
        return
    for node in ctx.nodes(*QDQ_OPS):
        p = qdq_params(node)
        if _is_activation(node) and p.scale is not None and p.scale.size > 1:
            yield ctx.finding(ERROR, "qdq-activation-per-tensor", node,
                              f"activation quantized per axis ({p.scale.size} scales): TensorRT quantizes activations per tensor only",
                              "use one scale for the tensor")


def _placement_severity(ctx: _Context) -> str | None:
    if not ctx.tensorrt:
        return None
    return ERROR if ctx.target.dla else WARNING


def rule_qdq_concat_scales(ctx: _Context) -> Iterator[Finding]:
    severity = _placement_severity(ctx)
    if severity is None:
        return
    for node in ctx.nodes("Concat"):
        ins = [_scale_in(t) for t in node.inputs]
        outs = _scales_out(node.outputs[0])
        known = [s for s in ins if s is not None] + outs
        if _differ(known):
            cost = "DLA needs one scale on all inputs and the output" if ctx.target.dla else \
                "TensorRT cannot elide the Concat and requantizes each mismatched input"
            yield ctx.finding(severity, "qdq-concat-scales", node,
                              f"Concat input/output scales differ (inputs {_fmt(s for s in ins if s is not None)}; "
                              f"output {_fmt(outs) or '-'}): {cost}",
                              "tie the scales (`cunet-optimize surgery --passes tie_concat_qdq_scales`) or fold the concat")


def rule_qdq_pool_scales(ctx: _Context) -> Iterator[Finding]:
    severity = _placement_severity(ctx)
    if severity is None:
        return
    for node in ctx.nodes("MaxPool", "Resize"):
        if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", b"nearest"):
            continue
        s_in = _scale_in(node.inputs[0])
        outs = _scales_out(node.outputs[0])
        known = ([s_in] if s_in is not None else []) + outs
        if s_in is not None and outs and _differ(known):
            yield ctx.finding(severity, "qdq-pool-scales", node,
                              f"{node.op} input scale {s_in:.4g} differs from output scale(s) {_fmt(outs)}",
                              "tie the scales (`--passes tie_concat_qdq_scales`)")


def rule_int4_weights(ctx: _Context) -> Iterator[Finding]:
    for node in ctx.nodes("DequantizeLinear"):
        if onnx_type_of(node.inputs[0]) not in INT4_TYPES:
            continue
        users = [c for c in node.outputs[0].outputs]
        for user in users:
            if ctx.target.dla:
                yield ctx.finding(ERROR, "int4-weights", user, "INT4 weights on DLA: DLA executes INT8 and FP16 only",
                                  "quantize these weights to INT8 for DLA, or build for the GPU")
            elif user.op in ("Conv", "ConvTranspose"):
                yield ctx.finding(WARNING, "int4-weights", user, "INT4 conv weights are dequantized at build; not executed as INT4",
                                  "fine for model size; for speed use INT8 weights (TensorRT runs INT8 convs)")


def rule_dla_dynamic_shape(ctx: _Context) -> Iterator[Finding]:
    if not ctx.target.dla:
        return
    for inp in ctx.graph.inputs:
        if inp.shape is None or any(not isinstance(d, int) or d < 1 for d in inp.shape):
            yield ctx.finding(ERROR, "dla-dynamic-shape", f"input:{inp.name}", f"dynamic shape {inp.shape}: DLA needs fixed dimensions",
                              "export with a static batch (`cunet-optimize export --static-batch`)")


def rule_dla_precision(ctx: _Context) -> Iterator[Finding]:
    if not ctx.target.dla or ctx.quantized:
        return
    float32 = any(isinstance(t, gs.Constant) and t.dtype == np.float32 for t in ctx.graph.tensors().values())
    float16 = any(isinstance(t, gs.Constant) and t.dtype == np.float16 for t in ctx.graph.tensors().values())
    if float32 and not float16:
        yield ctx.finding(ERROR, "dla-precision", "graph", "FP32 graph: DLA runs INT8 or FP16 only (TensorRT 11 builds strongly typed)",
                          "export with --precision fp16 or quantize to INT8 Q/DQ")


def rule_dla_concat_axis(ctx: _Context) -> Iterator[Finding]:
    if not ctx.target.dla:
        return
    for node in ctx.nodes("Concat"):
        axis = int(node.attrs.get("axis", 0))
        rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
        if (axis if axis >= 0 or rank is None else axis + rank) != 1:
            yield ctx.finding(WARNING, "dla-concat-axis", node, f"Concat on axis {axis}: DLA concatenates on the channel axis only; runs on the GPU",
                              "keep it off the DLA path (GPU fallback) or concatenate channels")


def rule_dla_resize(ctx: _Context) -> Iterator[Finding]:
    if not ctx.target.dla:
        return
    for node in ctx.nodes("Resize", "Upsample"):
        mode = node.attrs.get("mode", "nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        index = 2 if node.op == "Resize" else 1
        scales = constant_values(node.inputs[index]) if len(node.inputs) > index else None
        problem = None
        if mode not in DLA_RESIZE_MAX_SCALE:
            problem = f"mode {mode}"
        elif scales is None or scales.size != 4:
            problem = "no constant 4-element scales (sizes input?)"
        else:
            k = [float(v) for v in scales.reshape(-1)]
            limit = DLA_RESIZE_MAX_SCALE[mode]
            if k[0] != 1 or k[1] != 1 or any(v != int(v) or not 1 <= v <= limit for v in k[2:]):
                problem = f"scales {k} (need [1, 1, k, k], k integer in 1..{limit} for {mode})"
        if problem:
            yield ctx.finding(WARNING, "dla-resize", node, f"{node.op} with {problem}: not a DLA resize; runs on the GPU",
                              "use nearest upsampling by an integer factor")


def _boundary_cast(ctx: _Context, node: gs.Node) -> bool:
    """A Cast at a graph input or output (fp16 graphs with fp32 I/O): an I/O reformat, not a layer."""
    io = {id(t) for t in [*ctx.graph.inputs, *ctx.graph.outputs]}
    return node.op == "Cast" and (id(node.inputs[0]) in io or id(node.outputs[0]) in io)


def rule_dla_unsupported_op(ctx: _Context) -> Iterator[Finding]:
    if not ctx.target.dla:
        return
    for node in ctx.nodes():
        if node.op not in DLA_OPS and not _boundary_cast(ctx, node):
            yield ctx.finding(WARNING, "dla-unsupported-op", node, f"{node.op} has no DLA layer; it falls back to the GPU (a DLA<->GPU transition)",
                              "move it to the end of the graph or to the host (e.g. decode landmarks outside the engine)")
        elif node.op == "ConvTranspose":
            pads = [int(p) for p in node.attrs.get("pads", [0])]
            kernel = [int(k) for k in node.attrs.get("kernel_shape", [1])]
            if any(pads) or int(node.attrs.get("group", 1)) != 1 or any(int(d) != 1 for d in node.attrs.get("dilations", [1])) \
                    or any(not 1 <= k <= 32 for k in kernel):
                yield ctx.finding(WARNING, "dla-unsupported-op", node,
                                  "ConvTranspose with padding, groups, dilation or a kernel over 32: not a DLA deconvolution",
                                  "use padding 0, group 1, dilation 1, kernel 1..32")


RULES: dict[str, Callable[[_Context], Iterator[Finding]]] = {
    "trt-unsupported-op": rule_trt_unsupported_op,
    "qdq-opset": rule_qdq_opset,
    "qdq-zero-point": rule_qdq_zero_point,
    "qdq-int8-type": rule_qdq_int8_type,
    "qdq-weight-range": rule_qdq_weight_range,
    "qdq-weight-axis": rule_qdq_weight_axis,
    "qdq-activation-per-tensor": rule_qdq_activation_per_tensor,
    "qdq-concat-scales": rule_qdq_concat_scales,
    "qdq-pool-scales": rule_qdq_pool_scales,
    "int4-weights": rule_int4_weights,
    "dla-dynamic-shape": rule_dla_dynamic_shape,
    "dla-precision": rule_dla_precision,
    "dla-concat-axis": rule_dla_concat_axis,
    "dla-resize": rule_dla_resize,
    "dla-unsupported-op": rule_dla_unsupported_op,
}


def lint_model(model_or_path: ModelLike | str | os.PathLike, target: str, rules: Iterable[str] | None = None,
               *, dla_core: int | None = None) -> list[Finding]:
    """Findings of every rule (or of `rules`) for `target` (on its DLA core `dla_core`);
    errors first, then by rule and node."""
    spec = lint_target(target, dla_core)
    model = as_model(model_or_path)
    ctx = _Context(model, spec)
    selected = list(RULES) if rules is None else list(rules)
    unknown = [r for r in selected if r not in RULES]
    if unknown:
        raise CUNetError(f"unknown lint rule(s) {unknown}; known: {', '.join(RULES)}")
    findings = [f for rule in selected for f in RULES[rule](ctx)]
    return sorted(findings, key=lambda f: (f.severity != ERROR, f.rule, f.node))


def raise_on_errors(findings: list[Finding], what: str) -> None:
    errors = [f for f in findings if f.severity == ERROR]
    if errors:
        first = errors[0]
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CUNetError(f"{what}: {first.node}: {first.message}{more}; fix: {first.fix}")
