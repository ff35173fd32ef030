"""In-graph landmark decoding: heatmaps [B, C, H, W] -> landmarks [B, C, 2] (x, y).

The same decoding as `cunet_optimize.data.transforms.decode_heatmaps(method="quarter")`
(the CU-Net authors' rule, kept in floats): the argmax pixel (first one on ties, as
NumPy and PyTorch), shifted 0.25 px toward the larger of its two neighbours along each
axis; a peak on the map border is not shifted along that axis. Coordinates are in
heatmap pixels, 0-based, pixel centres on integers (x = column, y = row).

Only operators TensorRT's ONNX parser implements and that need no shape arithmetic
at run time: Reshape with 0/-1 (keeps the dynamic batch), ArgMax (a TopK layer in
TensorRT), integer Div/Sub/Add/Min/Max on the flat index, GatherElements for the four
neighbours, Sign, comparisons. Index clamping keeps every gather in bounds; the
border mask then zeroes the shift that a clamped neighbour would give.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cunet_optimize.engines.base import LANDMARKS, final_head

PREFIX = "/decode_landmarks"
QUARTER_PIXEL = 0.25


def add_landmark_decoder(graph: gs.Graph, heatmaps: gs.Variable, name: str = "landmarks") -> gs.Variable:
    """Append the decoder to `graph`, reading float32 `heatmaps` of static H, W; returns
    the new [B, C, 2] float32 tensor (not yet a graph output)."""
    height, width = int(heatmaps.shape[-2]), int(heatmaps.shape[-1])
    counter = iter(range(1000))

    def const(values, dtype) -> gs.Constant:
        return gs.Constant(f"{PREFIX}/const_{next(counter)}", np.asarray(values, dtype=dtype))

    def op(kind: str, inputs, dtype, attrs=None, out: gs.Variable | None = None) -> gs.Variable:
        step = next(counter)
        out = out or gs.Variable(f"{PREFIX}/{kind}_{step}_output_0", dtype=dtype)
        graph.nodes.append(gs.Node(kind, name=f"{PREFIX}/{kind}_{step}", attrs=attrs or {}, inputs=inputs, outputs=[out]))
        return out

    i64, f32 = np.int64, np.float32
    flat = op("Reshape", [heatmaps, const([0, 0, -1], i64)], f32)  # [B, C, H*W]
    index = op("ArgMax", [flat], i64, {"axis": 2, "keepdims": 1, "select_last_index": 0})  # [B, C, 1]
    row = op("Div", [index, const(width, i64)], i64)  # non-negative: truncation == floor
    col = op("Sub", [index, op("Mul", [row, const(width, i64)], i64)], i64)

    last = height * width - 1
    def clamped(offset: int) -> gs.Variable:
        shifted = op("Add", [index, const(offset, i64)], i64)
        return op("Min", [op("Max", [shifted, const(0, i64)], i64), const(last, i64)], i64)

    # Neighbours in (x, y) order: right/below minus left/above.
    after = op("Concat", [clamped(1), clamped(width)], i64, {"axis": 2})  # [B, C, 2]
    before = op("Concat", [clamped(-1), clamped(-width)], i64, {"axis": 2})
    diff = op(
        "Sub",
        [op("GatherElements", [flat, after], f32, {"axis": 2}), op("GatherElements", [flat, before], f32, {"axis": 2})],
        f32,
    )
    xy = op("Cast", [op("Concat", [col, row], i64, {"axis": 2})], f32, {"to": 1})  # [B, C, 2]
    # Interior along each axis: 0 < x < W-1, 0 < y < H-1 (coordinates are integers here).
    upper = const(np.array([width - 1.5, height - 1.5], dtype=f32), f32)
    inside = op("And", [op("Greater", [xy, const(0.5, f32)], np.bool_), op("Less", [xy, upper], np.bool_)], np.bool_)
    shift = op(
        "Mul",
        [op("Mul", [op("Sign", [diff], f32), const(QUARTER_PIXEL, f32)], f32), op("Cast", [inside], f32, {"to": 1})],
        f32,
    )
    out = gs.Variable(name, dtype=f32, shape=[heatmaps.shape[0], heatmaps.shape[1], 2])
    return op("Add", [xy, shift], f32, out=out)




def landmark_decoding_error(heatmaps: np.ndarray, landmarks: np.ndarray) -> float:
    """Largest |landmarks - decode_heatmaps(heatmaps, quarter)| in heatmap pixels: how far a
    graph's decoded output is from the NumPy decoding of its own heatmaps."""
    from cunet_optimize.data.transforms import decode_heatmaps

    expected = decode_heatmaps(np.asarray(heatmaps, dtype=np.float32), method="quarter")
    return float(np.abs(np.asarray(landmarks, dtype=np.float32) - expected).max())


def append_landmark_decoder(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deployed graph (after surgery) with the decoder added after its final head, as the new
    last output LANDMARKS. The decoder is built in a graph of its own and spliced in, so the
    graph surgery made is not re-imported and re-exported (nodes, packed weights and names stay
    as they are)."""
    outputs = {o.name: o for o in model.graph.output}
    if LANDMARKS in outputs:
        raise ValueError(f"the graph already has a {LANDMARKS!r} output")
    head = outputs[final_head([(o.name, len(o.type.tensor_type.shape.dim)) for o in model.graph.output])]
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in head.type.tensor_type.shape.dim]
    source = gs.Variable(head.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(head.type.tensor_type.elem_type),
                         shape=dims)
    decoder = gs.Graph(inputs=[source], opset=max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))
    heatmaps = source
    if source.dtype != np.float32:  # e.g. FP16 heads: the decoder computes in float32
        heatmaps = gs.Variable(f"{PREFIX}/heatmaps_float32", dtype=np.float32, shape=dims)
        decoder.nodes.append(gs.Node("Cast", name=f"{PREFIX}/Cast_heatmaps", attrs={"to": onnx.TensorProto.FLOAT},
                                     inputs=[source], outputs=[heatmaps]))
    decoder.outputs = [add_landmark_decoder(decoder, heatmaps, LANDMARKS)]
    spliced = gs.export_onnx(decoder.cleanup().toposort(), do_type_check=True)
    taken = {n.name for n in model.graph.node} | {i.name for i in model.graph.initializer}
    clash = sorted(taken & ({n.name for n in spliced.graph.node} | {i.name for i in spliced.graph.initializer}))
    if clash:
        raise ValueError(f"the graph already has the decoder's names {clash[:3]}")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.initializer.extend(spliced.graph.initializer)
    result.graph.node.extend(spliced.graph.node)
    result.graph.output.extend(spliced.graph.output)
    onnx.checker.check_model(result)
    return result
