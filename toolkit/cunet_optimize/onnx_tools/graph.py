"""Graph plumbing shared by the export and every surgery pass.

Loading and saving (atomic, deterministic), the standard clean-up (constant folding,
Identity removal, dead-node removal, topological order), shape inference at a fixed
batch, and the small pattern helpers passes are written with (producer, consumers,
constant values).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cunet_optimize.atomic import write_atomic
from cunet_optimize.errors import CUNetError

ModelLike = Union[onnx.ModelProto, gs.Graph, str, os.PathLike]


# ----------------------------------------------------------------------------- load / save


def load_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise CUNetError(f"ONNX file not found: {path}; export one first (`cunet-optimize export`)")
    fix = "pass a model written by `cunet-optimize export` (or copy the file again)"
    if path.stat().st_size == 0:
        raise CUNetError(f"{path}: empty file, not an ONNX model; {fix}")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError and friends
        raise CUNetError(f"cannot read {path} as ONNX ({type(err).__name__}); {fix}") from err
    if not model.graph.node:  # protobuf parses many non-ONNX byte strings as an empty model
        raise CUNetError(f"{path}: no ONNX graph in the file (not an ONNX model, or truncated); {fix}")
    return model


def cunet_mismatch(model: onnx.ModelProto) -> str | None:
    """Why `model` cannot be an exported CU-Net (one N x 3 x H x W image input, convolutions),
    or None. Surgery passes and lint rules are written for that graph."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        return f"{len(inputs)} graph inputs, a CU-Net has one image input"
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or (dims[1].HasField("dim_value") and dims[1].dim_value != 3):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        return f"input {inputs[0].name!r} has shape {shape}, a CU-Net takes N x 3 x H x W images"
    if not any(n.op_type in ("Conv", "QLinearConv", "ConvInteger") for n in model.graph.node):
        return "no convolution in the graph"
    return None


def as_model(model: ModelLike) -> onnx.ModelProto:
    """A ModelProto from a proto (returned as is), a gs.Graph (exported) or a path."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, gs.Graph):
        return to_model(model)
    return load_model_proto(model)


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Export with every free-text field fixed, so equal graphs give equal bytes."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    return write_atomic(path, model.SerializeToString())


# ----------------------------------------------------------------------------- clean-up


def remove_identities(graph: gs.Graph) -> int:
    """Bypass every Identity node; returns how many were removed."""
    removed = 0
    graph.cleanup()  # folding may have left Identity nodes whose output became a constant
    outputs = {id(t) for t in graph.outputs}
    for node in [n for n in graph.nodes if n.op == "Identity" and n.inputs and n.outputs]:
        src, dst = node.inputs[0], node.outputs[0]
        if id(dst) in outputs:
            if isinstance(src, gs.Constant) or id(src) in {id(t) for t in graph.inputs} or id(src) in outputs:
                continue  # a graph output must stay a node output with its own name
            # Let the producer write the output name directly.
            for producer in list(src.inputs):
                producer.outputs = [dst if t is src else t for t in producer.outputs]
            for consumer in list(src.outputs):
                if consumer is not node:
                    consumer.inputs = [dst if t is src else t for t in consumer.inputs]
        else:
            for consumer in list(dst.outputs):
                consumer.inputs = [src if t is dst else t for t in consumer.inputs]
        node.inputs.clear()
        node.outputs.clear()
        removed += 1
    graph.cleanup()
    return removed


def toposort_depth_first(graph: gs.Graph) -> gs.Graph:
    """Order the nodes depth first from the graph outputs (each node right after the
    producers of its inputs, inputs visited in order). Unlike gs's level sort, which
    runs every node of one depth before the next depth and so keeps many tensors
    alive at once, this follows the order a program computes values in: a branch is
    finished before the next starts. Activation-memory estimates (memory.py) depend on
    it. Deterministic; nodes not reaching an output keep their relative order at the end."""
    order: list[gs.Node] = []
    seen: set[int] = set()
    for root in [t for t in graph.outputs] + [t for n in graph.nodes for t in n.outputs]:
        if not root.inputs or id(root.inputs[0]) in seen:
            continue
        stack = [(root.inputs[0], 0)]
        seen.add(id(root.inputs[0]))
        while stack:
            node, i = stack.pop()
            if i < len(node.inputs):
                stack.append((node, i + 1))
                tensor = node.inputs[i]
                parent = tensor.inputs[0] if tensor.inputs else None
                if parent is not None and id(parent) not in seen:
                    seen.add(id(parent))
                    stack.append((parent, 0))
            else:
                order.append(node)
    graph.nodes = order
    return graph


def finish(graph: gs.Graph) -> gs.Graph:
    """Remove dead nodes and tensors, then order depth first: the end of every pass."""
    graph.cleanup(remove_unused_graph_inputs=False)
    return toposort_depth_first(graph)


def clean_graph(graph: gs.Graph, fold: bool = True) -> gs.Graph:
    """Constant folding (Q/DQ kept: gs never folds them), Identity removal, dead
    nodes and tensors removed, depth-first topological order. In place; returns it."""
    if fold:
        graph.fold_constants()  # error_ok: an op ORT cannot fold stays a node; the checks after each step catch the rest
    remove_identities(graph)
    return finish(graph)


# ----------------------------------------------------------------------------- shapes


def tensor_info(model: ModelLike, batch: int = 1) -> dict[str, tuple[list[int] | None, np.dtype | None]]:
    """{tensor name: (shape, dtype)} for graph inputs, outputs and every node output,
    by ONNX shape inference with every graph input's first symbolic dim set to
    `batch`. Shapes with an unknown dimension come back as None."""
    proto = copy.deepcopy(as_model(model)) if isinstance(model, onnx.ModelProto) else as_model(model)
    initializers = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    for out in proto.graph.output:  # let inference recompute them at this batch
        dims = out.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    del proto.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except onnx.shape_inference.InferenceError as err:
        raise CUNetError(f"shape inference failed: {str(err).splitlines()[0]}") from err
    info = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else None
        shape = None
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shape = [int(d.dim_value) for d in t.shape.dim]
        info[vi.name] = (shape, dtype)
    return info


def tensor_bytes(shape: list[int] | None, dtype) -> int:
    if shape is None or dtype is None:
        return 0
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# ----------------------------------------------------------------------------- patterns


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def only_consumer(tensor: gs.Tensor, graph: gs.Graph | None = None) -> gs.Node | None:
    """The single node reading `tensor`, or None (several, none, or a graph output)."""
    if len(tensor.outputs) != 1:
        return None
    if graph is not None and any(t is tensor for t in graph.outputs):
        return None
    return tensor.outputs[0]


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant (an initializer), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every consumer of `old` at `new` (graph outputs included)."""
    for consumer in list(old.outputs):
        consumer.inputs = [new if t is old else t for t in consumer.inputs]
    graph.outputs = [new if t is old else t for t in graph.outputs]


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def op_counts(model: ModelLike) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in as_model(model).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return dict(sorted(ops.items()))


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0
