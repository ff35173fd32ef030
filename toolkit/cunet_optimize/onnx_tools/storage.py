"""How a runtime's deployed ONNX file stores what it runs: weights as the integers a QuantizeLinear
in the graph would compute at every load, all-zero weight zero points left to the default,
INT4-valued integer weights packed behind a Cast, short tensor names, and attributes at their
default values left out.

Each is meant to change bytes on disk, not a computed value: a Cast from INT4 to INT8 gives back
the same integers (the runtimes fold it at load: ONNX Runtime at ORT_ENABLE_BASIC, OpenVINO
always), a tensor's name is a label, an absent attribute takes the value the operator
definition gives, and stored integers are what ONNX Runtime's QuantizeLinear
computes. A runtime may still compute differently from another form of the same values (OpenVINO
on the N=8 face model's Q/DQ graph with its weights stored as integers), so the builders run both
forms and compare their outputs before keeping the smaller one (engines/onnxrt.py
choose_weight_storage, engines/openvino.py choose_openvino_storage).

Why names: ONNX Runtime's optimised model and the exporter's graph spell every tensor out in
full ("/hg/up_blocks.2/layers.1/conv2/Conv/rescaled/W_DequantizeLinear_output_0"), on every
node that reads it and again in value_info; in the embedded model's INT8 engine that is 30% of
the file. Node names stay where per-op profiles report them (ONNX Runtime's engine); the node
order is model.onnx's, whose full names remain beside it.
"""

from __future__ import annotations

from typing import Mapping

import onnx

# op type -> the input that carries an integer-kernel weight, per runtime's deployed graph:
# ONNX Runtime's QLinearConv (ai.onnx and com.microsoft alike) takes it whole; OpenVINO reads the
# Q/DQ graph, where a weight is an integer initializer into a DequantizeLinear.
ORT_WEIGHT_INPUTS = {"QLinearConv": 3}
QDQ_WEIGHT_INPUTS = {"DequantizeLinear": 0}
INT4_MIN, INT4_MAX = -8, 7
QLINEARCONV_W_ZERO_POINT = 5  # QLinearConv's inputs: x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B
SHARED_CONSTANT_BYTES = 64  # share_constants merges initializers up to this size (scalars, short vectors)


def fits_int4(ints) -> bool:
    """Whether integer weights all lie on the INT4 grid (a per-channel INT4 conv's, stored as int8)."""
    return bool(ints.size) and ints.min() >= INT4_MIN and ints.max() <= INT4_MAX


def pack_int4_initializers(model: onnx.ModelProto, weight_inputs: Mapping[str, int]) -> int:
    """INT8 initializers read only as weights (`weight_inputs`) whose values all lie in [-8, 7],
    re-stored as INT4 initializers behind a Cast to INT8 (in place; needs opset >= 21).
    Returns how many were packed."""
    import ml_dtypes
    from onnx import numpy_helper

    readers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, i))
    casts, kept, packed = [], [], 0
    for init in model.graph.initializer:
        uses = readers.get(init.name, [])
        values = numpy_helper.to_array(init) if init.data_type == onnx.TensorProto.INT8 else None
        if (values is None or not uses or not fits_int4(values)
                or any(weight_inputs.get(op) != i for op, i in uses)):
            kept.append(init)
            continue
        kept.append(numpy_helper.from_array(values.astype(ml_dtypes.int4), f"{init.name}/int4"))
        casts.append(onnx.helper.make_node("Cast", [f"{init.name}/int4"], [init.name], name=f"{init.name}/unpack",
                                           to=onnx.TensorProto.INT8))
        packed += 1
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return packed


def store_quantized_weights(model: onnx.ModelProto) -> int:
    """Weights the graph quantizes itself (a float initializer read only by a QuantizeLinear whose
    scale and zero point are initializers and whose output only DequantizeLinears with the same
    scale and zero point read: TensorRT's Q/DQ form) stored as the integers that QuantizeLinear
    computes, read by the DequantizeLinears directly: a quarter of the bytes for 8-bit weights,
    the same dequantized values where the runtime rounds as ONNX Runtime does
    (patterns.quantize; the callers compare outputs). In place; returns how many."""
    from onnx import numpy_helper

    from cunet_optimize.onnx_tools.patterns import QDQParams, quantize

    inits = {i.name: i for i in model.graph.initializer}
    readers = {name: [node for node, _ in uses] for name, uses in _readers(model.graph).items()}
    dropped, stored = set(), 0
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        weight = inits.get(q.input[0])
        params = list(q.input[1:3])
        dqs = readers.get(q.output[0], [])
        if (weight is None or weight.data_type != onnx.TensorProto.FLOAT or len(readers[weight.name]) != 1
                or len(params) != 2 or not all(p in inits for p in params) or not dqs
                or any(d.op_type != "DequantizeLinear" or list(d.input[1:3]) != params for d in dqs)):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in q.attribute}
        if attrs.get("saturate", 1) != 1 or attrs.get("output_dtype", 0):
            continue
        zero_point = inits[params[1]]
        if zero_point.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue  # (4-bit weights come as integers already: pack_int4_initializers)
        qp = QDQParams(numpy_helper.to_array(inits[params[0]]), numpy_helper.to_array(zero_point), zero_point.data_type,
                       int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)))
        values = numpy_helper.to_array(weight)
        ints = quantize(values, qp).astype(numpy_helper.to_array(zero_point).dtype)
        model.graph.initializer.append(numpy_helper.from_array(ints, f"{weight.name}/quantized"))
        for dq in dqs:
            dq.input[0] = f"{weight.name}/quantized"
        dropped.update([q.output[0], weight.name])
        stored += 1
    nodes = [n for n in model.graph.node if n.output[0] not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_initializers(model.graph, dropped)
    return stored


def drop_zero_weight_zero_points(model: onnx.ModelProto) -> int:
    """All-zero zero points that only weight DequantizeLinears read (their input an integer
    initializer of the zero point's type) left out: the operator's default is zero of the input's
    type, so the values are the same. In place; returns how many initializers went."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = _readers(graph)

    def weight_zero_point(node: onnx.NodeProto, i: int, init: onnx.TensorProto) -> bool:
        return (node.op_type == "DequantizeLinear" and i == 2 == len(node.input) - 1
                and node.input[0] in inits and inits[node.input[0]].data_type == init.data_type)

    gone = set()
    for name, init in inits.items():
        uses = readers.get(name, [])
        if uses and all(weight_zero_point(node, i, init) for node, i in uses) and not numpy_helper.to_array(init).any():
            for node, _ in uses:
                del node.input[2]
            gone.add(name)
    _drop_initializers(graph, gone)
    return len(gone)


def _readers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Tensor name -> (node, input index) of each node that reads it."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    return readers


def _drop_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    kept = [i for i in graph.initializer if i.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def share_constants(model: onnx.ModelProto) -> int:
    """Small initializers stored once: a per-output-channel weight zero point of QLinearConv that
    is all zeros becomes a scalar zero (the operator takes either), and initializers with equal
    type, shape and bytes (the many scalar zero points and unit scales) become one, their readers
    pointed at it. In place, the main graph only; returns how many initializers went."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = _readers(graph)
    outputs = {v.name for v in graph.output} | {v.name for v in graph.input}  # (an input may override it)
    zeros: dict[int, str] = {}
    for name, init in list(inits.items()):
        uses = readers.get(name, [])
        if (len(init.dims) != 1 or not uses or name in outputs
                or any(node.op_type != "QLinearConv" or i != QLINEARCONV_W_ZERO_POINT for node, i in uses)):
            continue
        if numpy_helper.to_array(init).any():
            continue
        scalar = zeros.get(init.data_type)
        if scalar is None:
            scalar = zeros[init.data_type] = name
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:1].reshape(()), name))
            continue
        for node, i in uses:
            node.input[i] = scalar
        del inits[name]
    first: dict[tuple, str] = {}
    for name, init in list(inits.items()):
        if init.ByteSize() > SHARED_CONSTANT_BYTES or name in outputs:
            continue
        key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
        if key not in first:
            first[key] = name
            continue
        for node, i in readers.get(name, []):
            node.input[i] = first[key]
        del inits[name]
    gone = {i.name for i in graph.initializer} - set(inits)
    _drop_initializers(graph, gone)
    return len(gone)


def opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def shorten_names(model: onnx.ModelProto, *, nodes: bool = False) -> int:
    """Every tensor name but the graph's inputs and outputs (what callers feed and read) replaced
    by a short one ("t" + base-36 index), value_info and doc strings dropped (the runtimes infer
    shapes at load); node names dropped too where `nodes` (a runtime whose per-op profile nobody
    reads: OpenVINO's here). In place, the main graph only. Returns how many names changed."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # a subgraph may read outer names: leave such a graph as it is
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            names[name] = "t" + _base36(len(names))
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
        init.ClearField("doc_string")  # (an empty string set is still two bytes on disk)
    for node in graph.node:
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
        node.ClearField("doc_string")
        if nodes:
            node.ClearField("name")  # optional in ONNX
    del graph.value_info[:]
    graph.ClearField("doc_string")
    return len(names)


def _all(value):
    return lambda v: isinstance(v, list) and all(x == value for x in v)


# Attribute values the ONNX operator definitions (opset 13 and later, the ai.onnx domain) take
# when the attribute is absent. kernel_shape of a convolution is inferred from its weight's
# shape by the definition itself; a pooling op's is required and stays.
_CONV = {"auto_pad": "NOTSET".__eq__, "dilations": _all(1), "group": (1).__eq__, "pads": _all(0),
         "strides": _all(1), "kernel_shape": lambda v: True}
DEFAULT_ATTRIBUTES = {
    "Conv": _CONV, "ConvInteger": _CONV, "QLinearConv": _CONV,
    "MaxPool": {"auto_pad": "NOTSET".__eq__, "ceil_mode": (0).__eq__, "dilations": _all(1), "pads": _all(0),
                "storage_order": (0).__eq__, "strides": _all(1)},
    "QuantizeLinear": {"axis": (1).__eq__, "block_size": (0).__eq__, "saturate": (1).__eq__,
                       "output_dtype": (0).__eq__},
    "DequantizeLinear": {"axis": (1).__eq__, "block_size": (0).__eq__},
    "Resize": {"antialias": (0).__eq__, "coordinate_transformation_mode": "half_pixel".__eq__,
               "cubic_coeff_a": (-0.75).__eq__, "exclude_outside": (0).__eq__, "extrapolation_value": (0.0).__eq__,
               "keep_aspect_ratio_policy": "stretch".__eq__, "mode": "nearest".__eq__,
               "nearest_mode": "round_prefer_floor".__eq__},
}


def drop_default_attributes(model: onnx.ModelProto) -> int:
    """Attributes whose value is the one the operator takes when it is absent (DEFAULT_ATTRIBUTES:
    unit strides and dilations, zero pads, group 1, a conv's kernel_shape, axis 1, Resize's
    defaults), left out: each is spelled with its name on every node (3% of the embedded INT4
    model's OpenVINO file). ai.onnx ops of a model at opset 13 or later only; a runtime's own
    ops keep theirs. In place; returns how many went."""
    if opset(model) < 13:
        return 0
    dropped = 0
    for node in model.graph.node:
        defaults = DEFAULT_ATTRIBUTES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if not defaults:
            continue
        keep = []
        for attr in node.attribute:
            value = onnx.helper.get_attribute_value(attr)
            value = value.decode() if isinstance(value, bytes) else value
            if attr.name in defaults and defaults[attr.name](value):
                dropped += 1
            else:
                keep.append(attr)
        if len(keep) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)
    return dropped


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out
