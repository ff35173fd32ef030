"""Whether two exports are the same graph: op multiset, Q/DQ placement, exact structure.

Node names and tensor names differ between exporters (and between versions of one), so
graphs are compared by what they compute. Both sides must have been through the same
clean-up (onnx_export.build_graph ends with onnx_tools.graph.finish, whose depth-first
order follows the graph's structure only), so equal graphs list their nodes in the same
order and the structural comparison can walk them side by side.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from cunet_optimize.onnx_tools.graph import opset_of

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def op_multiset(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def qdq_placement(model: onnx.ModelProto) -> list[tuple]:
    """One entry per QuantizeLinear, sorted: what it quantizes (a weight, or the output of
    which op), which ops read its DequantizeLinear (op and input slot), its axis, scale
    shape and zero-point type, and a digest of its scale values. Equal lists mean the
    same tensors are quantized the same way, whatever the node names."""
    inits = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, slot))
    graph_outputs = {o.name for o in model.graph.output}
    entries = []
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        source = q.input[0]
        if source in inits:
            what = "weight"
        elif source in producers:
            what = producers[source].op_type
        else:
            what = "graph input"
        consumers = []
        for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]):
            consumers += readers.get(dq.output[0], []) + [("graph output", 0)] * (dq.output[0] in graph_outputs)
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        scale = inits.get(q.input[1])
        zero = inits.get(q.input[2]) if len(q.input) > 2 else None
        entries.append((
            what,
            tuple(sorted(consumers)),
            axis if scale is not None and scale.size > 1 else None,
            None if scale is None else tuple(scale.shape),
            None if zero is None else str(zero.dtype),
            None if scale is None else hashlib.sha256(np.ascontiguousarray(scale).tobytes()).hexdigest()[:12],
        ))
    return sorted(entries, key=repr)


def _attributes(node: onnx.NodeProto, opset: int) -> dict:
    """The node's attributes with the schema's defaults filled in: one exporter writes
    QuantizeLinear's default axis=1, the other leaves it out."""
    values = {}
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        for name, attr in schema.attributes.items():
            if attr.default_value.type != onnx.AttributeProto.UNDEFINED:
                values[name] = onnx.helper.get_attribute_value(attr.default_value)
    except onnx.defs.SchemaError:
        pass
    values.update({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
    return values


def structural_difference(a: onnx.ModelProto, b: onnx.ModelProto, *, eps: float = 0.0) -> str | None:
    """None when `a` and `b` are the same graph: node for node the same op, attributes and
    wiring, constants equal; else the first difference, in words. Inputs and outputs are
    matched by position. Float constants may differ by `eps` times their type's machine
    epsilon times their largest magnitude: the exporters fold BatchNormalization into
    conv weights with different float operation orders (PyTorch against NumPy)."""
    if len(a.graph.node) != len(b.graph.node):
        return f"{len(a.graph.node)} nodes against {len(b.graph.node)}"
    opset = opset_of(a)
    if opset_of(b) != opset:
        return f"opset {opset} against {opset_of(b)}"
    sides = []
    for model in (a, b):
        names = {i.name: ("graph input", k) for k, i in enumerate(model.graph.input)}
        for k, node in enumerate(model.graph.node):
            for slot, out in enumerate(node.output):
                names[out] = ("node", k, slot)
        sides.append((names, _initializers(model)))
    for k, (na, nb) in enumerate(zip(a.graph.node, b.graph.node)):
        where = f"node {k} ({na.op_type}"
        if na.op_type != nb.op_type:
            return f"{where} against {nb.op_type})"
        where += f" '{na.name}' / '{nb.name}')"
        attrs_a, attrs_b = _attributes(na, opset), _attributes(nb, opset)
        if attrs_a != attrs_b:
            return f"{where}: attributes {attrs_a} against {attrs_b}"
        if len(na.input) != len(nb.input):
            return f"{where}: {len(na.input)} inputs against {len(nb.input)}"
        for slot, (ia, ib) in enumerate(zip(na.input, nb.input)):
            (names_a, inits_a), (names_b, inits_b) = sides
            if ia in inits_a or ib in inits_b:
                va, vb = inits_a.get(ia), inits_b.get(ib)
                if va is None or vb is None or va.shape != vb.shape or va.dtype != vb.dtype:
                    return f"{where}: input {slot} is a constant on one side only, or of another shape or type"
                if va.dtype.kind == "f":
                    scale = float(np.abs(va).max()) if va.size else 0.0
                    worst = float(np.abs(va.astype(np.float64) - vb).max()) if va.size else 0.0
                    if worst > eps * float(np.finfo(va.dtype).eps) * scale:
                        return (f"{where}: constant input {slot} differs by up to {worst:.3g} "
                                f"(largest value {scale:.3g})")
                elif not np.array_equal(va, vb):
                    return f"{where}: constant input {slot} differs"
            elif names_a.get(ia) != names_b.get(ib):
                return f"{where}: input {slot} comes from {names_a.get(ia)} against {names_b.get(ib)}"
    outs_a = [sides[0][0].get(o.name) for o in a.graph.output]
    outs_b = [sides[1][0].get(o.name) for o in b.graph.output]
    if outs_a != outs_b:
        return f"graph outputs come from {outs_a} against {outs_b}"
    return None
