"""Activation memory of an ONNX graph, from shape inference and tensor liveness.

What a runtime must hold while it executes the nodes one by one in the file's
topological order: a tensor is live from the step of its producer (graph inputs:
from the first step) to the step of its last consumer (graph outputs: to the end).
Weights are excluded: initializers, and tensors computed from constants only (the
DequantizeLinear of a quantized weight, Constant nodes), which runtimes fold at load.

Graphs are costed as runtimes execute them (`fuse`, the default), with the fusions
that TensorRT and ONNX Runtime both make: a convolution's BatchNormalization and
Relu/Clip epilogue runs inside it (the convolution's own output never exists when
its only consumer is that epilogue), and DequantizeLinear -> op -> [Relu] ->
QuantizeLinear becomes one integer kernel (QLinearConv, QLinearConcat, an int8
convolution), so the float tensors inside such a chain never exist; only the
integer tensors between chains do. Checked against the graph ONNX Runtime actually
runs (its ORT_ENABLE_EXTENDED optimised model, estimated with `fuse=False`) in
tests/test_surgery.py.
In-place reuse and operator workspaces are not modelled: the estimate is what a
naive executor needs, good for comparing two forms of one graph (e.g. with and
without materialised dense concatenations), not an absolute prediction of a
runtime's allocator.
"""

from __future__ import annotations

import numpy as np
import onnx

from cunet_optimize.onnx_tools.graph import ModelLike, as_model, tensor_bytes, tensor_info

TOP_LIVE_TENSORS = 10
# Operators that runtimes fuse with the DequantizeLinear on their inputs and the
# QuantizeLinear on their output into one integer kernel.
QDQ_FUSED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Concat", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "Resize", "Add", "Mul"}
# Activations a QuantizeLinear absorbs (its saturation clips at the zero point).
QDQ_FUSED_ACTIVATIONS = {"Relu", "Clip"}
# What runtimes run inside a convolution as its epilogue.
CONV_OPS = {"Conv", "ConvTranspose"}
CONV_EPILOGUES = {"BatchNormalization", "Relu", "Clip"}


def _constant_tensors(nodes: list[onnx.NodeProto], initializers: set[str]) -> set[str]:
    """Initializers and the node outputs computed from them only (weights as runtimes see them)."""
    constant = set(initializers)
    for node in nodes:
        if node.op_type == "Constant" or (node.input and all(not i or i in constant for i in node.input)):
            constant.update(o for o in node.output if o)
    return constant


def _consumers(nodes: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    return consumers


def _conv_epilogue_tensors(nodes: list[onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]],
                           graph_outputs: set[str]) -> set[str]:
    """Outputs of a convolution (or of its fused epilogue so far) whose only consumer is a
    further epilogue op: computed in registers, never stored."""
    fused: set[str] = set()
    for node in nodes:
        if node.op_type not in CONV_OPS:
            continue
        out = node.output[0]
        while out not in graph_outputs and len(users := consumers.get(out, [])) == 1 \
                and users[0].op_type in CONV_EPILOGUES and users[0].input[0] == out:
            fused.add(out)
            out = users[0].output[0]
    return fused


def _fused_qdq_tensors(nodes: list[onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]],
                       constant: set[str], graph_outputs: set[str]) -> set[str]:
    """Float tensors inside DequantizeLinear -> op -> [Relu|Clip] -> QuantizeLinear chains."""
    producer = {o: n for n in nodes for o in n.output if o}

    def only_quantized(name: str) -> list[str] | None:
        """Float tensors from `name` up to the QuantizeLinear(s) it feeds, or None if it escapes."""
        users = consumers.get(name, [])
        if name in graph_outputs or not users:
            return None
        if all(u.op_type == "QuantizeLinear" for u in users):
            return [name]
        if len(users) == 1 and users[0].op_type in QDQ_FUSED_ACTIVATIONS:
            rest = only_quantized(users[0].output[0])
            return None if rest is None else [name] + rest
        return None

    fused: set[str] = set()
    island: set[int] = set()
    for node in nodes:
        if node.op_type not in QDQ_FUSED_OPS:
            continue
        data = [i for i in node.input if i and i not in constant]
        if not data or any(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in data):
            continue
        chains = [only_quantized(o) for o in node.output if o]
        if not chains or any(c is None for c in chains):
            continue
        island.add(id(node))
        fused.update(t for c in chains for t in c)
    for name, users in consumers.items():
        p = producer.get(name)
        if p is not None and p.op_type == "DequantizeLinear" and name not in graph_outputs \
                and all(id(u) in island for u in users):
            fused.add(name)
    return fused


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def activation_memory(model: ModelLike, batch: int = 1, fuse: bool = True) -> dict:
    """Bytes of activations at `batch` (with the runtimes' fusions unless `fuse` is False).

    Returns a dict with:
      batch, node_output_bytes {node: bytes of its outputs}, total_node_output_bytes,
      concat_count, concat_output_bytes, peak_bytes, peak_nodes (the nodes executing
      when the live bytes reach the peak), peak_live_tensors (the largest tensors live
      at the first peak step: [{name, bytes}]), unknown_shapes (tensors whose size
      shape inference could not tell; counted as 0).
    """
    proto = as_model(model)
    initializers = {i.name for i in proto.graph.initializer}
    nodes = list(proto.graph.node)
    bytes_of = _TensorBytes(tensor_info(proto, batch), _free_tensors(proto, nodes, initializers, fuse))
    start, end = _live_ranges(proto, nodes, initializers)
    produced = [sum(bytes_of(name) for name in node.output if name) for node in nodes]
    node_bytes = {_node_label(node, step): produced[step] for step, node in enumerate(nodes)}
    concats = [step for step, node in enumerate(nodes) if node.op_type == "Concat"]
    peak, peak_steps, top = _peak(start, end, len(nodes), bytes_of)
    return {
        "batch": batch,
        "node_output_bytes": node_bytes,
        "total_node_output_bytes": int(sum(node_bytes.values())),
        "concat_count": len(concats),
        "concat_output_bytes": int(sum(produced[step] for step in concats)),
        "peak_bytes": peak,
        "peak_nodes": [_node_label(nodes[i], i) for i in peak_steps],
        "peak_live_tensors": top,
        "unknown_shapes": sorted(set(bytes_of.unknown)),
    }


def _free_tensors(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], initializers: set[str],
                  fuse: bool) -> set[str]:
    """Tensors that cost no activation memory: weights, and with `fuse` those runtimes never store."""
    free = _constant_tensors(nodes, initializers)
    if fuse:
        outputs, consumers = {o.name for o in proto.graph.output}, _consumers(nodes)
        free |= _fused_qdq_tensors(nodes, consumers, free, outputs) | _conv_epilogue_tensors(nodes, consumers, outputs)
    return free


class _TensorBytes:
    """bytes_of(name): a tensor's size at the batch (0 if free or unknown), computed once;
    `unknown` collects the tensors shape inference could not size."""

    def __init__(self, info: dict, free: set[str]):
        self.info, self.free = info, free
        self.size: dict[str, int] = {}
        self.unknown: list[str] = []

    def __call__(self, name: str) -> int:
        if name in self.free:
            return 0
        if name not in self.size:
            shape, dtype = self.info.get(name, (None, None))
            if shape is None or dtype is None:
                self.unknown.append(name)
            self.size[name] = tensor_bytes(shape, dtype)
        return self.size[name]


def _live_ranges(proto: onnx.ModelProto, nodes: list[onnx.NodeProto],
                 initializers: set[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(start, end): each activation's first and last step (graph inputs from step 0,
    graph outputs to the last step)."""
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    last = max(len(nodes) - 1, 0)
    for inp in proto.graph.input:
        if inp.name not in initializers:
            start[inp.name] = 0
            end[inp.name] = 0
    for step, node in enumerate(nodes):
        for name in node.input:
            if name and name in start:
                end[name] = max(end[name], step)
        for name in node.output:
            if name:
                start[name] = step
                end[name] = max(end.get(name, step), step)
    for out in proto.graph.output:
        if out.name in start:
            end[out.name] = last
    return start, end


def _peak(start: dict[str, int], end: dict[str, int], steps: int, bytes_of) -> tuple[int, list[int], list[dict]]:
    """(peak live bytes, the steps at the peak, the largest tensors live at the first of them)."""
    # Live bytes per step by a difference array over [start, end].
    delta = np.zeros(steps + 1, dtype=np.int64)
    for name, s in start.items():
        b = bytes_of(name)
        delta[s] += b
        delta[end[name] + 1] -= b
    live = np.cumsum(delta)[:steps] if steps else np.zeros(0, dtype=np.int64)
    peak = int(live.max()) if live.size else 0
    peak_steps = [int(i) for i in np.flatnonzero(live == peak)] if live.size else []
    top: list[dict] = []
    if peak_steps:
        k = peak_steps[0]
        alive = [(name, bytes_of(name)) for name, s in start.items() if s <= k <= end[name]]
        alive.sort(key=lambda item: (-item[1], item[0]))
        top = [{"name": n, "bytes": b} for n, b in alive[:TOP_LIVE_TENSORS]]
    return peak, peak_steps, top
