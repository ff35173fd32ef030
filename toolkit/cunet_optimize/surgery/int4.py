"""Store INT4 Conv weights as opset-21 INT4 initializers with a block DequantizeLinear.

Patterns packed (weights of Conv/ConvTranspose/Gemm/MatMul):
1. DequantizeLinear(integer initializer, same-rank scale, block_size=B) whose integers
   all lie in [-8, 7] and whose zero point is 0 or absent: the integers are re-stored
   as INT4 (half a byte each), everything else unchanged.
2. The fake-quant INT4 export: float initializer -> QuantizeLinear -> DequantizeLinear
   with an INT4 zero point (what `torch.fake_quantize_per_channel_affine` with
   quant_min=-8, quant_max=7 exports to at opset 21, see exporters/symbolics.py). The Q
   is evaluated here (as ONNX Runtime does: round half to even in float32) and the
   weight becomes INT4 integers -> block DQ: a per-channel scale s[o] turns into the
   same-rank scale [O, 1, kh, kw] with the whole input-channel axis as one block
   (block_size = I, blocked axis 1), which is the same numbers in TensorRT's block form.
3. A float initializer already on a 4-bit grid (what a fake-quantizer written with
   plain torch ops, e.g. quant.BlockQuantizer, exports to after constant folding),
   with its scales given by the caller: `block_scales={conv node name: (scale, block)}`,
   scale in ONNX's blocked layout [O, ceil(I / block), kh, kw]. The weight must be on
   the grid (|W - round(W/s)*s| <= 1e-6 * s) and inside [-8, 7], else CUNetError.
4. Float initializer -> QuantizeLinear -> DequantizeLinear with an INT8 zero point (the
   INT8 convs of a mixed `--precision auto` plan beside INT4 ones): the Q is evaluated
   and the weight stored as its INT8 integers into the same DQ (a quarter of the bytes,
   the same values), as integer_dataflow stores them in all-INT8 graphs.
Per-channel int8 DQs are left alone even when their integers happen to fit in 4 bits:
packing them would change what a TensorRT build executes (INT8 convs -> dequantized
INT4), which must be the quantizer's decision, not a storage pass's.
ONNX Runtime executes INT4 DequantizeLinear exactly at optimisation level BASIC (its
reference level here); no target executes INT4 convolutions (see the lint).

`dequantize_weights` is the opposite, for TensorRT targets: their build plans take INT4
as weight-only quantization dequantized to float (targets.py, the
"int4-dequantized" ONNX form), so every weight DequantizeLinear / Q-DQ pair (the INT4
ones and the INT8 edge layers beside them) becomes the float initializer it computes:
the same grid values, no INT4 tensor or weight Q/DQ left for the parser.
"""

from __future__ import annotations

from typing import Mapping

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.graph import finish
from cunet_optimize.onnx_tools.patterns import (
    conv_weight,
    dequantized_weight,
    make_constant,
    onnx_type_of,
    qdq_params,
    quantize,
)
from cunet_optimize.onnx_tools.storage import fits_int4
from cunet_optimize.surgery.report import PassRecorder, PassReport

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BLOCKED_AXIS = 1


def _zero(zp: np.ndarray | None) -> bool:
    return zp is None or not np.any(np.asarray(zp, dtype=np.float64))


def _block_scale(scale: np.ndarray, shape: tuple, axis: int, block: int) -> tuple[np.ndarray, int] | None:
    """(same-rank scale blocked on axis 1, block size) equal to a per-tensor, per-channel
    (axis 0) or already blocked scale; None for other layouts."""
    rank = len(shape)
    if block > 0:
        return (scale, block) if axis % rank == BLOCKED_AXIS else None
    out_shape = list(shape)
    out_shape[BLOCKED_AXIS] = 1
    if scale.size == 1:
        return np.full(out_shape, scale.reshape(-1)[0], dtype=scale.dtype), shape[BLOCKED_AXIS]
    if axis % rank == 0 and scale.ndim == 1:
        view = [-1] + [1] * (rank - 1)
        return np.ascontiguousarray(np.broadcast_to(scale.reshape(view), out_shape)), shape[BLOCKED_AXIS]
    return None


def _pack_float_on_grid(graph: gs.Graph, node: gs.Node, scale: np.ndarray, block: int, base: str) -> int:
    w = np.asarray(node.inputs[1].values, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    expected = list(w.shape)
    expected[BLOCKED_AXIS] = -(-w.shape[BLOCKED_AXIS] // block)
    if list(scale.shape) != expected:
        raise CUNetError(f"pack_int4_weights: scale for '{node.name}' has shape {list(scale.shape)}, expected {expected} "
                         f"(blocked layout for block_size {block})")
    full = np.repeat(scale, block, axis=BLOCKED_AXIS)[:, : w.shape[BLOCKED_AXIS]]
    ints = np.rint(w / full)
    if np.any(np.abs(ints * full - w) > 1e-6 * np.maximum(full, 1e-30)) or not fits_int4(ints):
        raise CUNetError(f"pack_int4_weights: the weight of '{node.name}' is not on the given 4-bit grid; "
                         "pass the scales the model was quantized with")
    out = gs.Variable(f"{base}/W_dequantized", dtype=np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}/W_DequantizeLinear", {"axis": BLOCKED_AXIS, "block_size": int(block)},
                               [make_constant(f"{base}/W_int4", ints.astype(ml_dtypes.int4)),
                                make_constant(f"{base}/W_int4_scale", scale)], [out]))
    node.inputs[1] = out
    return (ints.size + 1) // 2


def pack_int4_weights(graph: gs.Graph, *, block_scales: Mapping[str, tuple[np.ndarray, int]] | None = None) -> PassReport:
    """Re-store 4-bit weights as INT4 initializers (see module doc); requires opset 21."""
    if graph.opset < 21:
        raise CUNetError(
            f"pack_int4_weights needs opset 21 (INT4 tensors, block DequantizeLinear); the graph is opset {graph.opset}: "
            "re-export with --opset 21"
        )
    rec = PassRecorder("pack_int4_weights", graph)
    before_bytes = after_bytes = 0
    left_int8 = stored_int8 = 0
    for node in [n for n in graph.nodes if n.op in WEIGHTED_OPS]:
        w = conv_weight(node, graph)
        base = node.name or node.outputs[0].name
        if w is not None and w.kind == "float" and block_scales and node.name in block_scales:
            scale, block = block_scales[node.name]
            before_bytes += np.asarray(w.stored.values).nbytes
            after_bytes += _pack_float_on_grid(graph, node, scale, int(block), base)
            rec.rewrites += 1
            continue
        if w is None or w.kind == "float":
            continue
        p = w.params
        if w.kind == "dq":
            if onnx_type_of(w.stored) == onnx.TensorProto.INT4:
                continue
            ints = np.asarray(w.stored.values)
            if not np.issubdtype(ints.dtype, np.integer) or not _zero(p.zero_point):
                continue
            if not p.block_size:
                left_int8 += int(fits_int4(ints))
                continue
            if not fits_int4(ints):
                continue
            before_bytes += ints.nbytes
            packed = make_constant(f"{base}/W_int4", ints.astype(ml_dtypes.int4))
            w.dq.inputs = [packed, w.dq.inputs[1]]  # zero point 0 is the default for INT4
            after_bytes += (ints.size + 1) // 2
            rec.rewrites += 1
        else:  # "qdq": float -> Q (INT4 zero point) -> DQ
            qp = qdq_params(w.q)
            if qp.zero_point_type == onnx.TensorProto.INT8 and np.array_equal(qp.scale, p.scale):
                values = np.asarray(w.stored.values)
                ints = quantize(values, qp).astype(np.int8)
                before_bytes += values.nbytes
                w.dq.inputs = [make_constant(f"{base}/W_int8", ints), *w.dq.inputs[1:]]
                after_bytes += ints.nbytes
                stored_int8 += 1
                continue
            if qp.zero_point_type != onnx.TensorProto.INT4 or not _zero(qp.zero_point) or not _zero(p.zero_point):
                continue
            values = np.asarray(w.stored.values)
            blocked = _block_scale(p.scale, values.shape, p.axis, p.block_size)
            if blocked is None or not np.array_equal(qp.scale, p.scale):
                rec.note(f"{base}: weight scale layout cannot be expressed as blocks on axis 1; left as Q/DQ")
                continue
            ints = quantize(values, qp).astype(np.int8)
            scale, block = blocked
            before_bytes += values.nbytes
            packed = make_constant(f"{base}/W_int4", ints.astype(ml_dtypes.int4))
            dq_scale = make_constant(f"{base}/W_int4_scale", scale)
            w.dq.inputs = [packed, dq_scale]
            w.dq.attrs = {"axis": BLOCKED_AXIS, "block_size": int(block)}
            after_bytes += (ints.size + 1) // 2
            rec.rewrites += 1
    finish(graph)
    if rec.rewrites:
        rec.note(f"packed {rec.rewrites} weight(s): {before_bytes} -> {after_bytes} bytes of weight data")
    if stored_int8:
        rec.rewrites += stored_int8
        rec.note(f"stored {stored_int8} Q/DQ int8 weight(s) as INT8 initializers")
    if left_int8:
        rec.note(f"left {left_int8} per-channel int8 weight(s) whose values fit in 4 bits as int8 (not block-quantized)")
    return rec.finish(graph)


def dequantize_weights(graph: gs.Graph) -> PassReport:
    """Replace every quantized weight (DequantizeLinear of a constant, or Q/DQ of one) by
    the float initializer it dequantizes to (see module doc)."""
    rec = PassRecorder("dequantize_weights", graph)
    for node in [n for n in graph.nodes if n.op in WEIGHTED_OPS]:
        w = conv_weight(node, graph)
        if w is None or w.kind == "float":
            continue
        base = node.name or node.outputs[0].name
        dtype = np.asarray(w.params.scale).dtype  # float16 in a float16 graph
        node.inputs[1] = make_constant(f"{base}/W_dequantized", dequantized_weight(w).astype(dtype))
        rec.rewrites += 1
    finish(graph)
    if rec.rewrites:
        rec.note(f"dequantized {rec.rewrites} weight(s) to float32 initializers on their quantization grids")
    return rec.finish(graph)
