"""Activation memory of an ONNX graph, from shape inference and tensor liveness.

What a runtime must hold while it executes the nodes one by one in the file's
topological order: a tensor is live from the step of its producer (graph inputs:
from the first step) to the step of its last consumer (graph outputs: to the end).
Weights (initializers) are excluded, in-place reuse and operator workspaces are not
modelled: the estimate is what a naive executor needs, good for comparing two forms
of one graph (e.g. with and without materialised dense concatenations), not an
absolute prediction of a runtime's allocator.
"""

from __future__ import annotations

import numpy as np
import onnx

from cunet_optimize.surgery.graph import ModelLike, as_model, tensor_bytes, tensor_info

TOP_LIVE_TENSORS = 10


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def activation_memory(model: ModelLike, batch: int = 1) -> dict:
    """Bytes of activations at `batch`.

    Returns a dict with:
      batch, node_output_bytes {node: bytes of its outputs}, total_node_output_bytes,
      concat_count, concat_output_bytes, peak_bytes, peak_nodes (the nodes executing
      when the live bytes reach the peak), peak_live_tensors (the largest tensors live
      at the first peak step: [{name, bytes}]), unknown_shapes (tensors whose size
      shape inference could not tell; counted as 0).
    """
    proto = as_model(model)
    info = tensor_info(proto, batch)
    initializers = {i.name for i in proto.graph.initializer}
    nodes = list(proto.graph.node)
    size: dict[str, int] = {}
    unknown: list[str] = []

    def bytes_of(name: str) -> int:
        if name not in size:
            shape, dtype = info.get(name, (None, None))
            if shape is None or dtype is None:
                unknown.append(name)
            size[name] = tensor_bytes(shape, dtype)
        return size[name]

    start: dict[str, int] = {}
    end: dict[str, int] = {}
    last = max(len(nodes) - 1, 0)
    for inp in proto.graph.input:
        if inp.name not in initializers:
            start[inp.name] = 0
            end[inp.name] = 0
    node_bytes: dict[str, int] = {}
    concat_count = concat_bytes = 0
    for step, node in enumerate(nodes):
        for name in node.input:
            if name and name in start:
                end[name] = max(end[name], step)
        produced = 0
        for name in node.output:
            if not name:
                continue
            start[name] = step
            end[name] = max(end.get(name, step), step)
            produced += bytes_of(name)
        node_bytes[_node_label(node, step)] = produced
        if node.op_type == "Concat":
            concat_count += 1
            concat_bytes += produced
    for out in proto.graph.output:
        if out.name in start:
            end[out.name] = last

    # Live bytes per step by a difference array over [start, end].
    delta = np.zeros(len(nodes) + 1, dtype=np.int64)
    for name, s in start.items():
        b = bytes_of(name)
        delta[s] += b
        delta[end[name] + 1] -= b
    live = np.cumsum(delta)[: len(nodes)] if nodes else np.zeros(0, dtype=np.int64)
    peak = int(live.max()) if live.size else 0
    peak_steps = [int(i) for i in np.flatnonzero(live == peak)] if live.size else []
    top: list[dict] = []
    if peak_steps:
        k = peak_steps[0]
        alive = [(name, bytes_of(name)) for name, s in start.items() if s <= k <= end[name]]
        alive.sort(key=lambda item: (-item[1], item[0]))
        top = [{"name": n, "bytes": b} for n, b in alive[:TOP_LIVE_TENSORS]]
    return {
        "batch": batch,
        "node_output_bytes": node_bytes,
        "total_node_output_bytes": int(sum(node_bytes.values())),
        "concat_count": concat_count,
        "concat_output_bytes": int(concat_bytes),
        "peak_bytes": peak,
        "peak_nodes": [_node_label(nodes[i], i) for i in peak_steps],
        "peak_live_tensors": top,
        "unknown_shapes": sorted(set(unknown)),
    }
