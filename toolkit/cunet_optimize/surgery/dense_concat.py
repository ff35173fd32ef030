"""Passes on CU-Net's dense concatenations.

`fold_dense_concats` rewrites Concat(x_1..x_n) -> BN -> ReLU -> [Q -> DQ ->] Conv into
sum_i Conv_i(ReLU(BN_i(x_i))): BN and ReLU act per channel and a convolution with
group 1 is a sum over input channels, so with BN_i and W_i the slices of the
segment's channels the result is the same up to float summation order, and the
concatenated tensor is never materialised (form 3 of the design space in
docs/QUANT_RULES.md). The CU-Net pattern is a 1x1 conv without bias; any kernel size
with group 1 is exact too and is folded the same way (a bias goes to the first
branch). Every consumer of a Concat gets its own branches (a dense layer's concat
feeds both its "ahead" and "skip" adapters); a Concat is folded only when every
consumer is such a chain, so it always disappears.

With Q/DQ (BN -> ReLU -> Q -> DQ -> Conv, weights through a per-channel DQ), each
branch gets its own activation Q/DQ with the original scale (the per-tensor Q/DQ is
elementwise, so the result is unchanged) or with a per-segment scale when the caller
provides them (then each segment keeps its own INT8 range and no tying is needed);
the weight DQ is split per segment with its per-channel (axis 0) scales unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.graph import constant_values, finish, is_graph_output, only_consumer, producer, tensor_info
from cunet_optimize.onnx_tools.patterns import ConvWeight, conv_weight, is_per_tensor, make_constant, qdq_params
from cunet_optimize.surgery.report import PassRecorder, PassReport

log = logging.getLogger(__name__)

CHANNEL_AXIS = 1


def _axis(node: gs.Node, rank: int | None) -> int | None:
    axis = int(node.attrs.get("axis", 0))
    if axis >= 0:
        return axis
    return axis + rank if rank else None


def _rank(tensor: gs.Tensor, info: dict) -> int | None:
    if tensor.shape is not None:
        return len(tensor.shape)
    shape = info.get(tensor.name, (None, None))[0]
    return len(shape) if shape is not None else None


def flatten_nested_concats(graph: gs.Graph) -> PassReport:
    """Concat(a, Concat(b, c)) -> Concat(a, b, c) when both concatenate on the same axis.
    The inner Concat stays only if something else reads it."""
    rec = PassRecorder("flatten_nested_concats", graph)
    info = tensor_info(graph)
    changed = True
    while changed:
        changed = False
        for outer in [n for n in graph.nodes if n.op == "Concat"]:
            rank = _rank(outer.outputs[0], info)
            flat: list[gs.Tensor] = []
            for t in outer.inputs:
                inner = producer(t)
                if inner is not None and inner.op == "Concat" and _axis(inner, rank) == _axis(outer, rank) is not None:
                    flat.extend(inner.inputs)
                    rec.rewrites += 1
                    changed = True
                else:
                    flat.append(t)
            if len(flat) != len(outer.inputs):
                outer.inputs = flat
    finish(graph)
    return rec.finish(graph)


# ----------------------------------------------------------------------------- folding


@dataclass
class DenseChain:
    """Concat output -> BN -> Relu -> [Q -> DQ ->] Conv."""

    bn: gs.Node
    relu: gs.Node
    q: gs.Node | None
    dq: gs.Node | None
    conv: gs.Node
    weight: ConvWeight


def match_dense_chain(bn: gs.Node, concat_out: gs.Tensor, graph: gs.Graph) -> DenseChain | str:
    """The chain starting at consumer `bn`, or the reason it is not one."""
    label = bn.name or bn.op
    if bn.op != "BatchNormalization" or bn.inputs[0] is not concat_out:
        return f"a consumer ({bn.op}) is not BatchNormalization"
    if int(bn.attrs.get("training_mode", 0)) or len(bn.outputs) != 1:
        return "BatchNormalization in training mode"
    if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constants"
    relu = only_consumer(bn.outputs[0], graph)
    if relu is None or relu.op != "Relu":
        return f"{label} is not followed by a single Relu"
    nxt = only_consumer(relu.outputs[0], graph)
    q = dq = None
    if nxt is not None and nxt.op == "QuantizeLinear":
        q = nxt
        dq = only_consumer(q.outputs[0], graph)
        if dq is None or dq.op != "DequantizeLinear":
            return "activation QuantizeLinear is not followed by a single DequantizeLinear"
        if not all(isinstance(t, gs.Constant) for node in (q, dq) for t in node.inputs[1:] if not t.is_empty()):
            return "activation Q/DQ parameters are not constants"
        if not is_per_tensor(qdq_params(q)) or not is_per_tensor(qdq_params(dq)):
            return "activation Q/DQ is not per-tensor"
        nxt = only_consumer(dq.outputs[0], graph)
    if nxt is None or nxt.op != "Conv" or nxt.inputs[0] is not (dq or relu).outputs[0]:
        return "the Relu does not feed a single Conv"
    if int(nxt.attrs.get("group", 1)) != 1:
        return "grouped Conv"
    if len(nxt.inputs) > 2 and not nxt.inputs[2].is_empty() and not isinstance(nxt.inputs[2], gs.Constant):
        return "Conv bias is not a constant"
    weight = conv_weight(nxt, graph)
    if weight is None:
        return "Conv weight is neither an initializer nor a constant Q/DQ of one"
    return DenseChain(bn, relu, q, dq, nxt, weight)


def _slice_qparam(param: np.ndarray | None, axis: int, block: int, lo: int, hi: int, total: int, rank: int):
    """The scale/zero point for input channels [lo, hi) of a weight, or False if the
    quantization grid does not split there. None stays None."""
    if param is None or param.size == 1:
        return param
    axis %= rank
    if block > 0:
        if axis != CHANNEL_AXIS:
            return param[:, lo:hi]
        if lo % block or (hi % block and hi != total):
            return False
        return param[:, lo // block : -(-hi // block)]
    if axis == 0:
        return param
    if axis == CHANNEL_AXIS and param.ndim == 1:
        return param[lo:hi]
    return False


def _segment_weight(graph: gs.Graph, chain: DenseChain, base: str, lo: int, hi: int, total: int):
    """The weight tensor (plus the nodes it needs) for input channels [lo, hi); False if
    the weight's quantization blocks straddle the boundary."""
    w = chain.weight
    stored = np.asarray(w.stored.values)
    piece = make_constant(f"{base}/W", stored[:, lo:hi])
    if w.kind == "float":
        return piece
    p = w.params
    scale = _slice_qparam(p.scale, p.axis, p.block_size, lo, hi, total, stored.ndim)
    zp = _slice_qparam(p.zero_point, p.axis, p.block_size, lo, hi, total, stored.ndim)
    if scale is False or zp is False:
        return False

    def params_of(node: gs.Node, params, sliced_scale, sliced_zp, tag: str) -> list[gs.Tensor]:
        # Unsliced parameters (per-tensor, per-channel on axis 0) keep their original tensor.
        s = node.inputs[1] if sliced_scale is params.scale else make_constant(f"{base}/{tag}_scale", sliced_scale)
        inputs = [s]
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            same_zp = sliced_zp is params.zero_point
            inputs.append(node.inputs[2] if same_zp else make_constant(f"{base}/{tag}_zero_point", sliced_zp))
        return inputs

    dq_in = piece
    if w.kind == "qdq":
        # Q and DQ of a fake-quant pair share their parameters; slice Q's the same way.
        qp = qdq_params(w.q)
        q_scale = _slice_qparam(qp.scale, qp.axis, qp.block_size, lo, hi, total, stored.ndim)
        q_zp = _slice_qparam(qp.zero_point, qp.axis, qp.block_size, lo, hi, total, stored.ndim)
        if q_scale is False or q_zp is False:
            return False
        dq_in = gs.Variable(f"{base}/W_quantized", dtype=None)
        graph.nodes.append(
            gs.Node("QuantizeLinear", f"{base}/W_QuantizeLinear", dict(w.q.attrs),
                    [piece, *params_of(w.q, qp, q_scale, q_zp, "W_q")], [dq_in])
        )
    out = gs.Variable(f"{base}/W_dequantized", dtype=np.float32)
    graph.nodes.append(
        gs.Node("DequantizeLinear", f"{base}/W_DequantizeLinear", dict(w.dq.attrs),
                [dq_in, *params_of(w.dq, p, scale, zp, "W_dq")], [out])
    )
    return out


def _fold_chain(
    graph: gs.Graph, chain: DenseChain, segments: list[gs.Tensor], bounds: list[tuple[int, int]],
    scales: Sequence[float] | None,
) -> bool:
    conv = chain.conv
    base = conv.name or conv.outputs[0].name
    total = bounds[-1][1]
    dtype = conv.outputs[0].dtype
    bn_params = [constant_values(t) for t in chain.bn.inputs[1:5]]
    # Build every weight slice first: if one cannot be split, nothing is changed.
    weights = [_segment_weight(graph, chain, f"{base}/fold{i}", lo, hi, total) for i, (lo, hi) in enumerate(bounds)]
    if any(w is False for w in weights):
        return False
    partial_sums: list[gs.Variable] = []
    for i, (x, (lo, hi), w) in enumerate(zip(segments, bounds, weights)):
        tag = f"{base}/fold{i}"
        bn_out = gs.Variable(f"{tag}/BatchNormalization_output_0", dtype=dtype)
        graph.nodes.append(
            gs.Node("BatchNormalization", f"{tag}/BatchNormalization", dict(chain.bn.attrs),
                    [x, *[make_constant(f"{tag}/bn_{k}", p[lo:hi]) for k, p in zip("sbmv", bn_params)]], [bn_out])
        )
        act = gs.Variable(f"{tag}/Relu_output_0", dtype=dtype)
        graph.nodes.append(gs.Node("Relu", f"{tag}/Relu", {}, [bn_out], [act]))
        if chain.q is not None:
            q_inputs = list(chain.q.inputs[1:])
            dq_inputs = list(chain.dq.inputs[1:])
            if scales is not None:
                s = make_constant(f"{tag}/act_scale", np.asarray(scales[i], dtype=qdq_params(chain.q).scale.dtype))
                q_inputs[0] = s
                dq_inputs[0] = s
            quantized = gs.Variable(f"{tag}/QuantizeLinear_output_0", dtype=chain.q.outputs[0].dtype)
            graph.nodes.append(gs.Node("QuantizeLinear", f"{tag}/QuantizeLinear", dict(chain.q.attrs), [act, *q_inputs], [quantized]))
            act = gs.Variable(f"{tag}/DequantizeLinear_output_0", dtype=dtype)
            graph.nodes.append(
                gs.Node("DequantizeLinear", f"{tag}/DequantizeLinear", dict(chain.dq.attrs), [quantized, *dq_inputs], [act])
            )
        conv_inputs = [act, w]
        if i == 0 and len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
            conv_inputs.append(conv.inputs[2])
        part = gs.Variable(f"{tag}/Conv_output_0", dtype=dtype)
        graph.nodes.append(gs.Node("Conv", f"{tag}/Conv", dict(conv.attrs), conv_inputs, [part]))
        partial_sums.append(part)

    result = conv.outputs[0]
    for node in (chain.bn, chain.relu, chain.q, chain.dq, conv):
        if node is not None:
            node.inputs.clear()
            node.outputs.clear()
    acc = partial_sums[0]
    for i, part in enumerate(partial_sums[1:], start=1):
        out = result if i == len(partial_sums) - 1 else gs.Variable(f"{base}/fold_sum{i}_output_0", dtype=dtype)
        graph.nodes.append(gs.Node("Add", f"{base}/fold_sum{i}", {}, [acc, part], [out]))
        acc = out
    if len(partial_sums) == 1:  # a one-input Concat: the single branch writes the result
        producer(partial_sums[0]).outputs = [result]
    return True


def fold_dense_concats(
    graph: gs.Graph, *, segment_scales: Mapping[str, Sequence[float]] | None = None
) -> PassReport:
    """Fold every Concat(axis=1) whose consumers are all BN -> ReLU -> [Q/DQ ->] Conv chains.

    segment_scales: optional per-segment activation scales for Q/DQ graphs, keyed by the
    name of the original Conv node (one scale per Concat input, in order); without it
    each branch reuses the original per-tensor scale (exact).
    """
    rec = PassRecorder("fold_dense_concats", graph)
    info = tensor_info(graph)
    skipped: Counter = Counter()
    used_scales: set[str] = set()
    for concat in [n for n in graph.nodes if n.op == "Concat"]:
        out = concat.outputs[0]
        if _axis(concat, _rank(out, info)) != CHANNEL_AXIS:
            skipped["not on the channel axis"] += 1
            continue
        if is_graph_output(graph, out) or not out.outputs:
            skipped["its output is a graph output"] += 1
            continue
        chains = [match_dense_chain(c, out, graph) for c in list(out.outputs)]
        reasons = [c for c in chains if isinstance(c, str)]
        if reasons:
            skipped[reasons[0]] += 1
            continue
        widths = [(info.get(t.name, (None, None))[0] or [None, None])[1] if not isinstance(t, gs.Constant) else t.shape[1]
                  for t in concat.inputs]
        if any(w is None for w in widths):
            skipped["unknown channel count of an input"] += 1
            continue
        bounds, lo = [], 0
        for width in widths:
            bounds.append((lo, lo + int(width)))
            lo += int(width)
        folded_all = True
        for chain in chains:
            scales = None
            key = chain.conv.name
            if segment_scales is not None and key in segment_scales:
                scales = list(segment_scales[key])
                used_scales.add(key)
                if len(scales) != len(bounds):
                    raise CUNetError(
                        f"fold_dense_concats: {len(scales)} segment scales given for Conv '{key}', "
                        f"its Concat has {len(bounds)} inputs"
                    )
                if chain.q is None:
                    raise CUNetError(f"fold_dense_concats: segment scales given for Conv '{key}', which is not quantized")
            if not _fold_chain(graph, chain, list(concat.inputs), bounds, scales):
                folded_all = False
                skipped["weight quantization blocks straddle a segment boundary"] += 1
        if folded_all:
            rec.rewrites += 1
    finish(graph)
    if segment_scales:
        unknown = sorted(set(segment_scales) - used_scales)
        if unknown:
            rec.note(f"segment scales given for Conv nodes that were not folded: {', '.join(unknown[:5])}")
    for reason, count in sorted(skipped.items()):
        rec.note(f"kept {count} Concat(s): {reason}")
    return rec.finish(graph)
