"""The CPU form of an INT8 CU-Net: uint8 tensors between the convolutions, for ONNX Runtime.

TensorRT's placement (Q/DQ on conv inputs, BN -> ReLU and the dense concatenations in
float) runs on ONNX Runtime's CPU as float convolutions between Q/DQ nodes: ONNX
Runtime makes a QLinearConv only of DequantizeLinear -> Conv -> QuantizeLinear, and in
CU-Net a conv's output goes to Concats and to the BatchNorms of its consumers, never
straight into a QuantizeLinear. `integer_dataflow` rewrites the Q/DQ graph so that
almost every conv reads and writes uint8:

1. Conv -> BN with nothing else reading the conv (the stem, conv1 of every dense
   layer): BN folded into the quantized conv exactly, through the per-channel weight
   scale (|a|), the sign of the integers and the bias.
2. Every *source* (a conv output, or its ReLU, that flows into Concat / MaxPool /
   nearest Resize and ends at BatchNorms) gets a QuantizeLinear: its weight scales and
   bias are rescaled per output channel so that channel c spans [0, 1] over the
   calibration images (exact: the weights are per channel), then uint8 with scale
   1/255. Each channel has its own range in effect: per-channel asymmetric
   activations, which ONNX Runtime's per-tensor QLinearConv output cannot express
   directly. ReLU sources keep their zero (the range is scaled, not shifted).
3. Concat, MaxPool and nearest Resize then move uint8 data (they commute with the
   per-channel increasing affine maps of step 2).
4. Every *sink* BN -> ReLU -> Q -> DQ -> Conv becomes DQ(1/255) -> depthwise 1x1
   Conv -> Q -> DQ -> Conv: on x = m + R*u (u = q/255) the BN is a*R*u + (a*m + t)
   per channel, a depthwise conv whose one weight per channel is exact in int8
   (+-127, scale |a*R|/127) and whose intercept is an int32 bias; its output
   quantizer, now uint8 with zero point 0, saturates below zero, which is the ReLU.
   ONNX Runtime runs it as a depthwise QLinearConv (uint8 in and out), as it runs
   FP32 BN -> ReLU as a depthwise NCHWc conv. A negative BN scale is a weight of -127.
   relu_form="clamp" is the variant: before a 1x1 INT8 conv (no padding, no groups; not INT4:
   folding requantizes the weights on the INT8 grid, so an INT4 conv keeps its depthwise sink), ReLU(s*q + b)
   = s*max(q, T) + b on integer q (s*min(q, T) + b where the BN scale is negative), with
   T = -b/s rounded to an integer, s folded into the conv's weight columns (requantized per
   output channel) and b into its bias: a uint8 Max/Min instead of a depthwise
   QLinearConv, left out altogether where every threshold is 0 (it would only copy). Not
   exact: the rounded threshold moves every zero-side element the same way. Where ONNX
   Runtime's u8 x s8 kernels sum pairs of products in int16 (plain AVX2, engines/cpu_isa.py)
   the large clamped inputs can saturate, far beyond rounding; where the sums are int32
   (AVX-512 VNNI, AVX-VNNI, AMX) it stays about as close to the float model as the Q/DQ
   graph (tests/test_int8_cpu_variants.py, a tiny model).
   So it is never the default: `build` times it beside "depthwise" and takes it only where
   it is faster and passes the accuracy gate on the build machine (forms.choose_int8_form).
5. Every other INT8 Q/DQ pair on a ReLU output (and on the image input when the
   calibration images are >= 0) becomes uint8 with zero point 0 and half the scale:
   the same range, one more bit, and ONNX Runtime's u8 x s8 kernels on x86.

Per-channel INT4 convs (the CPU's INT4, quant.policy) take the same path: their integers
([-7, 7]) are INT8 integers with the same per-channel scale, so steps 1-4 run them exactly as
INT8 convs (`_integer_weight` reads them in the Q/DQ form and in pack_int4_weights' blocked
form with one block over the input channels). Block-wise INT4 (several scales per output
channel) has no exact per-channel INT8 form: its components stay in float.

`integer_dataflow` runs the steps in order, one function each: `_fold_bn_into_quantized_convs`
(1), `find_components`, `_uint8_params` (the ranges of 2 and 3), `_rewrite_sinks` (4),
`_quantize_sources` (2 and 3), `_retype_nonnegative_qdq` (5).

It changes the outputs by design (new quantization points in step 2, the BN output
rounded to the conv's input grid before the ReLU in step 4); `build` checks the
result with its accuracy gate. A component whose pattern does not match (a source
that is not a per-channel quantized conv, a sink that is not BN -> ReLU -> Q -> DQ ->
Conv, any other reader) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.graph import finish, is_graph_output, only_consumer, producer, to_model
from cunet_optimize.onnx_tools.patterns import conv_weight, is_per_tensor, qdq_params, quantize
from cunet_optimize.onnx_tools.storage import fits_int4
from cunet_optimize.onnx_tools.verify import run_onnxruntime
from cunet_optimize.surgery.batchnorm import _bn_affine
from cunet_optimize.surgery.report import PassRecorder, PassReport

PASS_THROUGH = ("Concat", "MaxPool", "Resize")
CALIBRATION_IMAGES = 16  # images `build` and `surgery --calib-data` calibrate the new uint8 points on
LEVELS = 255.0


# ----------------------------------------------------------------------------- weights


def _per_channel_scale(p, shape: tuple) -> np.ndarray | None:
    """The per-output-channel scale of a weight DequantizeLinear, or None. Besides the plain
    per-channel layout (axis 0) this reads per-channel INT4 as pack_int4_weights stores it: one
    block over the whole input-channel axis (axis 1) with the same scale at every kernel
    position, i.e. one scale per output channel written in the blocked layout."""
    scale = np.asarray(p.scale)
    if not p.block_size:
        return scale if scale.ndim == 1 and p.axis == 0 else None
    if len(shape) < 2 or p.axis % len(shape) != 1 or p.block_size < shape[1] or scale.shape[:2] != (shape[0], 1):
        return None
    flat = scale.reshape(shape[0], -1)
    return flat[:, 0] if np.all(flat == flat[:, :1]) else None


def _integer_weight(conv: gs.Node, graph: gs.Graph) -> tuple[np.ndarray, np.ndarray] | None:
    """(integer weights, per-output-channel scales) of a symmetric per-channel quantized conv:
    INT8, or per-channel INT4, whose integers are INT8 integers with the same scale (the
    integer path runs them exactly as INT8)."""
    cw = conv_weight(conv, graph)
    if cw is None or cw.kind == "float":
        return None
    p = cw.params
    if p.scale is None or (p.zero_point is not None and np.any(np.asarray(p.zero_point, dtype=np.float64))):
        return None
    if isinstance(cw.stored._values, LazyValues):  # packed INT4: gs's `.values` would replace the
        stored = onnx.numpy_helper.to_array(cw.stored._values.tensor)  # packed tensor by a wider array
    else:
        stored = np.asarray(cw.stored.values)
    scale = _per_channel_scale(p, stored.shape)
    if scale is None:
        return None
    ints = np.asarray(quantize(stored, qdq_params(cw.q)) if cw.kind == "qdq" else stored).astype(np.int64)
    if ints.shape[0] != scale.size or ints.min() < -127 or ints.max() > 127:
        return None  # -128 has no negation: a sign flip would overflow
    return ints, scale.astype(np.float64)


def _conv_bias(conv: gs.Node, channels: int) -> np.ndarray:
    if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
        return np.asarray(conv.inputs[2].values, dtype=np.float64)
    return np.zeros(channels)


def _set_integer_weight(graph: gs.Graph, conv: gs.Node, ints: np.ndarray, scales: np.ndarray,
                        bias: np.ndarray, step: str) -> None:
    """Weights as an int8 initializer -> DequantizeLinear (axis 0), and a float bias;
    `step` names the new tensors (a conv may be rewritten twice: BN folded, then rescaled)."""
    base = f"{conv.name or conv.outputs[0].name}/{step}"
    weight = gs.Variable(f"{base}/W_dequantized", dtype=np.float32, shape=list(ints.shape))
    graph.nodes.append(gs.Node(
        "DequantizeLinear", f"{base}/W_DequantizeLinear", attrs={"axis": 0},
        inputs=[gs.Constant(f"{base}/W_int8", ints.astype(np.int8)),
                gs.Constant(f"{base}/W_scale", scales.astype(np.float32)),
                gs.Constant(f"{base}/W_zero_point", np.zeros(len(scales), np.int8))],
        outputs=[weight]))
    conv.inputs = [conv.inputs[0], weight, gs.Constant(f"{base}/B", bias.astype(np.float32))]


# ----------------------------------------------------------------------------- Q/DQ


def _to_uint8(q: gs.Node, dqs: list[gs.Node]) -> None:
    """Per-tensor int8 Q/DQ with zero point 0 -> uint8, zero point 0, half the scale."""
    scale = float(qdq_params(q).scale.reshape(())) / 2.0
    base = q.name or q.outputs[0].name
    s = gs.Constant(f"{base}/scale_uint8", np.asarray(scale, np.float32))
    z = gs.Constant(f"{base}/zero_point_uint8", np.asarray(0, np.uint8))
    for node in [q, *dqs]:
        node.inputs = [node.inputs[0], s, z]
    q.outputs[0].dtype = np.uint8


def _symmetric_int8_readers(q: gs.Node) -> list[gs.Node] | None:
    """The DQ readers of a per-tensor, zero-point-0 int8 Q (all of its readers), else None."""
    p = qdq_params(q)
    if not is_per_tensor(p) or p.zero_point_type != onnx.TensorProto.INT8 or np.any(p.zero_point):
        return None
    readers = list(q.outputs[0].outputs)
    same = all(r.op == "DequantizeLinear" and np.array_equal(qdq_params(r).scale, p.scale)
               and qdq_params(r).zero_point_type == onnx.TensorProto.INT8 and not np.any(qdq_params(r).zero_point)
               for r in readers)
    return readers if readers and same else None


def _is_pointwise_conv(conv: gs.Node, graph: gs.Graph) -> bool:
    """A 1x1 conv without padding or groups: a per-channel constant on its input moves into its bias exactly."""
    weight = _integer_weight(conv, graph)
    return (weight is not None and weight[0].ndim == 4 and weight[0].shape[2:] == (1, 1)
            and int(conv.attrs.get("group", 1)) == 1 and not any(int(p) for p in conv.attrs.get("pads", [0]))
            and conv.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET", "VALID", b"VALID"))


def _clamp_folds_into(conv: gs.Node, graph: gs.Graph) -> bool:
    """Whether a sink's clamp may fold its slope into `conv`: a 1x1 INT8 conv. Folding requantizes
    the weights on the INT8 grid, so an INT4 conv (integers in [-8, 7]) would leave the build as
    INT8: its sink keeps the exact depthwise form. Requantizing the folded weights on the INT4
    grid instead does not work: every input column carries its own slope (step 2 gives each
    source channel the whole uint8 range), which seven levels per output channel cannot hold.
    Measured on the embedded model's all-INT4 graph (ONNX Runtime, 8 calibration images): the
    relative error against the Q/DQ graph went 0.16 -> 0.21 with one sink folded, 0.52 with 5 and
    3.6 with all 45 (NME 5.7 -> 78)."""
    return _is_pointwise_conv(conv, graph) and not fits_int4(_integer_weight(conv, graph)[0])


def _affine_relu_as_clamp(graph: gs.Graph, sink: "Sink", slope: np.ndarray, intercept: np.ndarray) -> None:
    """Replace sink BN -> ReLU -> Q -> DQ -> 1x1 Conv by Max/Min(q, threshold) -> DQ(1) -> 1x1 Conv.

    On integer q, ReLU(s*q + b) = s*max(q, T) + b for s > 0 (s*min(q, T) + b for s < 0), T = -b/s;
    s goes into the conv's weight columns and b into its bias. Not exact: T is rounded to an
    integer and the weights are requantized per output channel (see the module docstring)."""
    conv = sink.dq.outputs[0].outputs[0]
    ints, scales = _integer_weight(conv, graph)
    weight = ints[:, :, 0, 0].astype(np.float64) * scales[:, None]
    channels = len(slope)
    live = slope != 0
    threshold = np.where(live, -intercept / np.where(live, slope, 1.0), 0.0)
    rising, falling = slope > 0, slope < 0
    dead = (rising & (threshold >= LEVELS)) | (falling & (threshold <= 0)) | (~live & (intercept <= 0))
    constant = ~live & (intercept > 0)  # ReLU(b) everywhere
    lo = np.where(rising & ~dead, np.clip(np.rint(threshold), 0, LEVELS), 0).astype(np.uint8)
    hi = np.where(falling & ~dead, np.clip(np.rint(threshold), 0, LEVELS), LEVELS).astype(np.uint8)
    active = live & ~dead
    column = np.where(active, slope, 0.0)
    offset = np.where(active, intercept, 0.0) + np.where(constant, intercept, 0.0)
    new_weight = weight * column[None, :]
    bias = _conv_bias(conv, len(scales)) + weight @ offset
    peak = np.abs(new_weight).max(axis=1)
    new_scales = np.where(peak > 0, peak / 127.0, 1.0)
    new_ints = np.rint(new_weight / new_scales[:, None]).astype(np.int64).reshape(ints.shape)

    base = sink.bn.name or sink.bn.outputs[0].name
    clamped = sink.bn.inputs[0]
    # a Max with every threshold 0 (a Min with every one 255) would only copy: left out
    for op, bound, identity in (("Max", lo, 0), ("Min", hi, 255)):
        if np.all(bound == identity):
            continue
        x, clamped = clamped, gs.Variable(f"{base}/{op.lower()}_clamped", dtype=np.uint8)
        graph.nodes.append(gs.Node(op, f"{base}/relu_threshold_{op.lower()}", inputs=[
            x, gs.Constant(f"{base}/threshold_{op.lower()}", bound.reshape(1, channels, 1, 1))], outputs=[clamped]))
    sink.dq.inputs = [clamped, gs.Constant(f"{base}/unit_integer_scale", np.asarray(1.0, np.float32)),
                      gs.Constant(f"{base}/unit_integer_zero_point", np.asarray(0, np.uint8))]
    _set_integer_weight(graph, conv, new_ints, new_scales, bias, "clamp_folded")
    sink.bn.inputs.clear()
    sink.relu.outputs.clear()
    sink.q.inputs.clear()
    sink.q.outputs.clear()
    graph.nodes.remove(sink.q)


def _affine_as_depthwise_conv(graph: gs.Graph, sink: "Sink", slope: np.ndarray, intercept: np.ndarray) -> None:
    """Replace sink BN -> ReLU by DQ(1/255) -> depthwise 1x1 Conv(slope, intercept) feeding the sink's Q.
    Each channel's single weight is exact in int8: +-127 with scale |slope|/127."""
    base = sink.bn.name or sink.bn.outputs[0].name
    channels = len(slope)
    unit = gs.Variable(f"{base}/unit", dtype=np.float32)
    graph.nodes.append(gs.Node(
        "DequantizeLinear", f"{base}/DequantizeLinear",
        inputs=[sink.bn.inputs[0], gs.Constant(f"{base}/unit_scale", np.asarray(1.0 / LEVELS, np.float32)),
                gs.Constant(f"{base}/unit_zero_point", np.asarray(0, np.uint8))],
        outputs=[unit]))
    ints = np.sign(slope).reshape(channels, 1, 1, 1) * 127
    scales = np.where(slope != 0, np.abs(slope) / 127.0, 1.0)
    normalised = gs.Variable(f"{base}/normalised", dtype=np.float32)
    conv = gs.Node("Conv", f"{base}/depthwise", attrs={"group": channels, "kernel_shape": [1, 1]},
                   inputs=[unit], outputs=[normalised])
    graph.nodes.append(conv)
    _set_integer_weight(graph, conv, ints, scales, intercept, "affine")
    sink.q.inputs[0] = normalised
    sink.bn.inputs.clear()
    sink.relu.outputs.clear()


# ----------------------------------------------------------------------------- components


@dataclass
class Sink:
    bn: gs.Node
    relu: gs.Node
    q: gs.Node
    dq: gs.Node  # read by a Conv, nothing else


@dataclass
class Component:
    """Tensors linked by Concat / MaxPool / Resize, from their sources to their sink BNs."""

    sources: list[gs.Tensor] = field(default_factory=list)
    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    nodes: dict[str, gs.Node] = field(default_factory=dict)
    sinks: list[Sink] = field(default_factory=list)
    reason: str | None = None  # why it cannot be converted


def _source_conv(tensor: gs.Tensor, graph: gs.Graph) -> tuple[gs.Node, bool] | None:
    """(conv, through_relu) if `tensor` is a per-channel quantized conv's output or its ReLU."""
    node = producer(tensor)
    relu = node is not None and node.op == "Relu"
    if relu:
        if only_consumer(node.inputs[0], graph) is not node:
            return None
        node = producer(node.inputs[0])
    if node is None or node.op != "Conv" or _integer_weight(node, graph) is None:
        return None
    return node, relu


def _sink(bn: gs.Node, graph: gs.Graph) -> Sink | None:
    relu = only_consumer(bn.outputs[0], graph)
    q = only_consumer(relu.outputs[0], graph) if relu is not None and relu.op == "Relu" else None
    if q is None or q.op != "QuantizeLinear" or _bn_affine(bn) is None:
        return None
    dqs = _symmetric_int8_readers(q)
    if dqs is None or len(dqs) != 1:
        return None
    conv = only_consumer(dqs[0].outputs[0], graph)
    if conv is None or conv.op != "Conv" or conv.inputs[0] is not dqs[0].outputs[0]:
        return None
    return Sink(bn, relu, q, dqs[0])


def _pass_through_ok(node: gs.Node) -> bool:
    if node.op == "Concat":
        return int(node.attrs.get("axis", 0)) == 1
    if node.op == "MaxPool":
        return not any(int(p) for p in node.attrs.get("pads", [0])) and len(node.outputs) == 1
    return node.attrs.get("mode", "nearest") in ("nearest", b"nearest")  # Resize


def _data_inputs(node: gs.Node) -> list[gs.Tensor]:
    return list(node.inputs) if node.op == "Concat" else [node.inputs[0]]


def find_components(graph: gs.Graph) -> list[Component]:
    """Every component reachable from a BatchNorm's input, convertible or not (with the reason)."""
    seen: set[str] = set()
    components = []
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        start = bn.inputs[0]
        if start.name in seen or isinstance(start, gs.Constant):
            continue
        comp = Component()
        stack = [start]
        while stack:
            t = stack.pop()
            if t.name in comp.tensors:
                continue
            comp.tensors[t.name] = t
            seen.add(t.name)
            if is_graph_output(graph, t) or not t.outputs:
                comp.reason = comp.reason or f"{t.name} is a graph output or read by nothing"
            src = producer(t)
            if src is not None and src.op in PASS_THROUGH:
                comp.nodes[src.name] = src
                stack += [x for x in _data_inputs(src) if not isinstance(x, gs.Constant)]
                if not _pass_through_ok(src):
                    comp.reason = comp.reason or f"{src.op} {src.name} does not commute with per-channel scales"
            elif _source_conv(t, graph) is not None:
                comp.sources.append(t)
            else:
                origin = src.op if src else "a graph input"
                comp.reason = comp.reason or f"{t.name} comes from {origin}, not a quantized conv"
            for reader in t.outputs:
                if reader.op in PASS_THROUGH:
                    if reader.inputs[0] is t or reader.op == "Concat":
                        comp.nodes[reader.name] = reader
                        stack += list(reader.outputs)
                        stack += [x for x in _data_inputs(reader) if not isinstance(x, gs.Constant)]
                    else:
                        comp.reason = comp.reason or f"{t.name} is a parameter of {reader.name}"
                elif reader.op == "BatchNormalization":
                    sink = _sink(reader, graph)
                    if sink is None:
                        comp.reason = comp.reason or f"{reader.name} is not BN -> ReLU -> Q -> DQ -> Conv"
                    else:  # each tensor is visited once, so each BN is met once
                        comp.sinks.append(sink)
                else:
                    comp.reason = comp.reason or f"{t.name} is read by {reader.op} {reader.name}"
        components.append(comp)
    return components


# ----------------------------------------------------------------------------- calibration


def channel_ranges(graph: gs.Graph, tensors: list[gs.Tensor],
                   images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (min, max) of `tensors` over `images`, by ONNX Runtime at ORT_DISABLE_ALL."""
    model = to_model(graph)
    known = {o.name for o in model.graph.output}
    for t in tensors:
        if t.name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, None))
    (input_name,) = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for start in range(0, len(images), 4):
        outs = run_onnxruntime(model, {input_name: images[start:start + 4]})
        for t in tensors:
            y = outs[t.name]
            lo[t.name] = np.minimum(lo.get(t.name, np.inf), y.min(axis=(0, 2, 3)))
            hi[t.name] = np.maximum(hi.get(t.name, -np.inf), y.max(axis=(0, 2, 3)))
    return {name: (lo[name].astype(np.float64), hi[name].astype(np.float64)) for name in lo}


# ----------------------------------------------------------------------------- the pass


def _fold_bn_into_quantized_convs(graph: gs.Graph) -> int:
    folded = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        conv = producer(bn.inputs[0])
        affine = _bn_affine(bn)
        if conv is None or conv.op != "Conv" or affine is None or only_consumer(bn.inputs[0], graph) is not bn:
            continue
        weight = _integer_weight(conv, graph)
        if weight is None:
            continue
        a, t = affine
        ints, scales = weight
        sign = np.where(a < 0, -1, 1)
        ints = ints * sign.reshape((-1,) + (1,) * (ints.ndim - 1))
        bias = _conv_bias(conv, len(scales)) * a + t
        _set_integer_weight(graph, conv, ints, scales * np.abs(a), bias, "bn_folded")
        out = bn.outputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        conv.outputs = [out]
        folded += 1
    finish(graph)
    return folded


def _uint8_params(graph: gs.Graph, good: list[Component], sources: list[gs.Tensor],
                  images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Step 2's ranges: per-channel (offset m, range R) of every tensor that becomes uint8,
    x = m + R * q / 255, measured at the sources over `images` and carried through the
    pass-through nodes (step 3) in graph order."""
    ranges = channel_ranges(graph, sources, images) if sources else {}
    params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for t in sources:
        lo, hi = ranges[t.name]
        m = np.zeros_like(lo) if _source_conv(t, graph)[1] else lo  # a ReLU source keeps its zero
        r = hi - m
        params[t.name] = (m, np.where(r > 1e-12, r, 1.0))
    for comp in good:
        for node in [n for n in graph.nodes if n.name in comp.nodes]:
            if node.op == "Concat":
                parts = [params[x.name] for x in node.inputs]
                params[node.outputs[0].name] = (np.concatenate([p[0] for p in parts]),
                                                np.concatenate([p[1] for p in parts]))
            else:
                params[node.outputs[0].name] = params[node.inputs[0].name]
    return params


def _rewrite_sinks(graph: gs.Graph, good: list[Component], params: dict, relu_form: str) -> tuple[int, int]:
    """Step 4: every sink BN -> ReLU on uint8 input as a depthwise uint8 conv (or, relu_form
    "clamp", a threshold folded into the next 1x1 conv). Returns (channels with a negative BN
    scale, sinks clamped)."""
    negative = clamped = 0
    for comp in good:
        for sink in comp.sinks:
            m, r = params[sink.bn.inputs[0].name]
            a, t = _bn_affine(sink.bn)
            negative += int((a < 0).sum())
            # BN(x) on x = m + r * u, u = q / 255 (per-tensor DequantizeLinear): slope a*r, intercept a*m + t
            if relu_form == "clamp" and _clamp_folds_into(sink.dq.outputs[0].outputs[0], graph):
                _affine_relu_as_clamp(graph, sink, a * r / LEVELS, a * m + t)
                clamped += 1
                continue
            _affine_as_depthwise_conv(graph, sink, a * r, a * m + t)
            _to_uint8(sink.q, [sink.dq])  # uint8 saturation at 0 is the ReLU
    return negative, clamped


def _quantize_sources(graph: gs.Graph, good: list[Component], params: dict) -> None:
    """Step 2's rewrite: each source conv's weight scales and bias rescaled so that channel c
    spans [0, 1], then a uint8 QuantizeLinear (scale 1/255) its readers read; the
    pass-through nodes of the components then carry uint8 (step 3)."""
    for t in [t for c in good for t in c.sources]:
        conv, _ = _source_conv(t, graph)
        ints, scales = _integer_weight(conv, graph)
        m, r = params[t.name]
        _set_integer_weight(graph, conv, ints, scales / r, (_conv_bias(conv, len(scales)) - m) / r, "rescaled")
        quantized = gs.Variable(f"{t.name}/uint8", dtype=np.uint8)
        for reader in list(t.outputs):
            reader.inputs = [quantized if x is t else x for x in reader.inputs]
        graph.nodes.append(gs.Node(
            "QuantizeLinear", f"{t.name}/QuantizeLinear",
            inputs=[t, gs.Constant(f"{t.name}/scale", np.asarray(1.0 / LEVELS, np.float32)),
                    gs.Constant(f"{t.name}/zero_point", np.asarray(0, np.uint8))],
            outputs=[quantized]))
    for comp in good:
        for node in comp.nodes.values():
            node.outputs[0].dtype = np.uint8


def _retype_nonnegative_qdq(graph: gs.Graph, images: np.ndarray) -> int:
    """Step 5: the other symmetric int8 Q/DQ pairs on a ReLU output (or on the image input when
    the calibration images are >= 0) as uint8 with half the scale. Returns how many."""
    retyped = 0
    image_inputs = {i.name for i in graph.inputs}
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        x = q.inputs[0]
        nonnegative = (producer(x) is not None and producer(x).op == "Relu") or (
            x.name in image_inputs and float(images.min()) >= 0.0)
        dqs = _symmetric_int8_readers(q) if nonnegative else None
        if dqs is not None:
            _to_uint8(q, dqs)
            retyped += 1
    return retyped


RELU_FORMS = ("depthwise", "clamp")


def integer_dataflow(graph: gs.Graph, calibration: np.ndarray | None = None, relu_form: str = "depthwise") -> PassReport:
    """Rewrite a Q/DQ CU-Net into ONNX Runtime's integer form (see the module docstring).
    `calibration`: N x 3 x H x W float32 images for the new source ranges (required: the
    images the model was calibrated on; CUNetError without them). `relu_form`: how a sink's
    BN -> ReLU runs, "depthwise" (step 4) or "clamp" (a uint8 Max into a following 1x1
    conv; sinks before other convs stay depthwise), a variant `build` times and gates
    (forms.choose_int8_form)."""
    if relu_form not in RELU_FORMS:
        raise ValueError(f"relu_form must be one of {RELU_FORMS}, got {relu_form!r}")
    rec = PassRecorder("integer_dataflow", graph)
    if not any(n.op == "QuantizeLinear" for n in graph.nodes):
        rec.note("no Q/DQ nodes: nothing to do")
        return rec.finish(graph)
    if calibration is None:
        # Calibrating on stand-in images would fix every uint8 range on data the model never sees.
        raise CUNetError("surgery pass integer_dataflow calibrates new uint8 points and was given no images; "
                         "pass the calibration images (`cunet-optimize surgery --calib-data DIR`, or "
                         "pass_options={'integer_dataflow': {'calibration': images}})")
    images = np.asarray(calibration, dtype=np.float32)

    folded = _fold_bn_into_quantized_convs(graph)
    components = find_components(graph)
    good = [c for c in components if c.reason is None and c.sources and c.sinks]
    skipped = [c for c in components if c not in good]
    sources = [t for c in good for t in c.sources]
    params = _uint8_params(graph, good, sources, images)
    negative, clamped = _rewrite_sinks(graph, good, params, relu_form)
    _quantize_sources(graph, good, params)
    retyped = _retype_nonnegative_qdq(graph, images)
    finish(graph)

    rec.rewrites = folded + len(sources) + sum(len(c.sinks) for c in good) + retyped
    rec.note(f"folded {folded} BatchNorm(s) into quantized convs")
    rec.note(f"{len(sources)} conv output(s) quantized to uint8 per channel over {len(images)} calibration images; "
             f"{sum(len(c.sinks) for c in good)} BN -> ReLU sink(s) now a depthwise 1x1 uint8 conv "
             f"({negative} channel(s) with a negative BN scale)"
             + (f", {clamped} of them a uint8 Max/Min threshold folded into the next 1x1 conv (relu_form clamp)"
                if relu_form == "clamp" else ""))
    rec.note(f"{retyped} other ReLU/image Q/DQ pair(s) int8 -> uint8")
    for comp in skipped:
        rec.note(f"left in float: component at {next(iter(comp.tensors))}: {comp.reason or 'no source or sink'}")
    return rec.finish(graph)
