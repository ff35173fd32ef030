"""FP16 graphs: float16 weights and compute with float32 inputs and outputs.

Why convert the cleaned FP32 graph instead of exporting `model.half()`:
- BN folding, constant folding and every pass run once, in float32, and the result is
  rounded once to float16 (tracing a half model folds in float16 and rounds twice);
- the graph stays strongly typed: every tensor's type follows from the graph alone,
  which TensorRT 11 requires (no precision flags), and a Cast at each boundary keeps
  the I/O float32, so callers feed the same arrays to the FP32 and FP16 files;
- ONNX Runtime's CPU provider runs it as is: where it has no float16 kernel it
  inserts the casts itself (slow, but exact enough to be our accuracy reference).
Inputs that ONNX types as float32 regardless of the data type (Resize `scales`)
stay float32.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.graph import finish

# (op, input index) that ONNX defines as tensor(float) whatever the data type is.
FLOAT32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}
# Ops whose float16 form needs an opset we may not have; we do not convert graphs with them.
_QDQ = {"QuantizeLinear", "DequantizeLinear"}


def _must_stay_float32(tensor: gs.Constant) -> bool:
    return any((node.op, i) in FLOAT32_ONLY_INPUTS for node in tensor.outputs for i, t in enumerate(node.inputs) if t is tensor)


def convert_graph_to_fp16(graph: gs.Graph) -> gs.Graph:
    """Rewrite `graph` in place to float16 inside, float32 at the graph inputs/outputs."""
    if any(node.op in _QDQ for node in graph.nodes) and graph.opset < 19:
        raise CUNetError(
            f"fp16 export of a Q/DQ (fake-quantized) model needs opset >= 19 (float16 scales); got {graph.opset}: "
            "export with --opset 19 or keep fp32 (TensorRT runs the non-quantized layers at the graph's float type)"
        )
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32 and not _must_stay_float32(tensor):
            tensor.values = tensor.values.astype(np.float16)
    for node in graph.nodes:
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
    boundary = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in boundary and tensor.dtype == np.float32:
            tensor.dtype = np.float16

    for inp in [t for t in graph.inputs if t.dtype == np.float32]:
        half = gs.Variable(f"{inp.name}_fp16", dtype=np.float16, shape=inp.shape)
        for node in list(inp.outputs):
            node.inputs = [half if t is inp else t for t in node.inputs]
        graph.nodes.append(
            gs.Node("Cast", name=f"/fp16/Cast_{inp.name}", attrs={"to": onnx.TensorProto.FLOAT16}, inputs=[inp], outputs=[half])
        )
    new_outputs = []
    for out in graph.outputs:
        if out.dtype != np.float32:
            new_outputs.append(out)
            continue
        # The producer keeps writing float16 under a new name; the Cast takes the output's name.
        half = gs.Variable(f"{out.name}_fp16", dtype=np.float16, shape=out.shape)
        for node in list(out.inputs):
            node.outputs = [half if t is out else t for t in node.outputs]
        for node in list(out.outputs):
            node.inputs = [half if t is out else t for t in node.inputs]
        graph.nodes.append(
            gs.Node("Cast", name=f"/fp16/Cast_{out.name}", attrs={"to": onnx.TensorProto.FLOAT}, inputs=[half], outputs=[out])
        )
        new_outputs.append(out)
    graph.outputs = new_outputs
    return finish(graph)
