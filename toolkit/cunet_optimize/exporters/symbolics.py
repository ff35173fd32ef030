"""ONNX symbolics for PyTorch's fake-quantize ops, for the TorchScript exporter (dynamo.py
holds the same translation for the torch.export-based one).

PyTorch's own symbolics accept only the quant ranges ONNX's int8/uint8 types give
natively ((-128, 127), (0, 255), plus (0, 127)), but TensorRT wants weights on the
symmetric range [-127, 127] and INT4 weights live on [-8, 7]. For such a narrower
range with zero point z we clamp the float input to [(qmin - z) * s, (qmax - z) * s]
before QuantizeLinear: the clamp is exact (round(clamp(x)/s) never leaves the range)
and, on constant weights, the exporter's constant folding turns it into clamped
weights, so the graph keeps the plain float-weight -> Q -> DQ form TensorRT reads.

INT4 weights: the TorchScript exporter cannot write INT4 tensors (it stops at opset
20), so a 4-bit fake-quant (quant range inside [-8, 7]) exports as int8 Q/DQ whose
integers lie in [-8, 7]; `mark_int4_weights` then gives those weight Q/DQ pairs INT4
zero points when the file is opset 21, which makes the intent explicit for
`surgery.pack_int4_weights`. An INT8-calibrated weight always reaches +-127 in some
channel (scale = amax / 127), so "every integer in [-8, 7]" identifies 4-bit weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch.onnx import symbolic_helper

from cunet_optimize.errors import CUNetError
from cunet_optimize.onnx_tools.patterns import make_constant, qdq_params, quantize

_NATIVE_RANGES = {onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255)}
_SYMBOLS = ("aten::fake_quantize_per_tensor_affine", "aten::fake_quantize_per_channel_affine")
_REGISTERED_AT = 13  # custom symbolics apply from this opset up


def check_quant_range(quant_min: int, quant_max: int) -> int:
    """The ONNX zero-point type a fake-quantize range is exported with; CUNetError if none fits."""
    if not (-128 <= quant_min < quant_max <= 255) or (quant_min < 0 and quant_max > 127):
        raise CUNetError(
            f"fake-quantize range [{quant_min}, {quant_max}] does not fit an 8-bit integer type; "
            "use a range inside [-128, 127] (signed, TensorRT) or [0, 255] (unsigned)"
        )
    return onnx.TensorProto.UINT8 if quant_min >= 0 and quant_max > 127 else onnx.TensorProto.INT8


def is_native_range(quant_min: int, quant_max: int, zp_type: int) -> bool:
    """Whether QuantizeLinear's own saturation gives the range (else the input is clamped first)."""
    return (quant_min, quant_max) == _NATIVE_RANGES[zp_type]


def _fake_quantize(g, x, scale, zero_point, axis: int | None, quant_min: int, quant_max: int):
    zp_type = check_quant_range(quant_min, quant_max)
    if axis is None:
        # A one-element scale of shape [1] would read as per-axis on ONNX's default axis 1.
        scalar = g.op("Constant", value_t=torch.tensor([], dtype=torch.int64))
        scale, zero_point = g.op("Reshape", scale, scalar), g.op("Reshape", zero_point, scalar)
    scale = g.op("Cast", scale, to_i=onnx.TensorProto.FLOAT)
    zp = g.op("Cast", zero_point, to_i=zp_type)
    if not is_native_range(quant_min, quant_max, zp_type):
        zp_float = g.op("Cast", zero_point, to_i=onnx.TensorProto.FLOAT)

        def bound(q: int):
            value = g.op("Mul", g.op("Sub", g.op("Constant", value_t=torch.tensor(float(q))), zp_float), scale)
            if axis is None:
                return value
            rank = symbolic_helper._get_tensor_rank(x)
            if rank is None:
                raise CUNetError("per-channel fake-quantize of a tensor of unknown rank cannot be exported")
            shape = [1] * rank
            shape[axis] = -1
            return g.op("Reshape", value, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))

        x = g.op("Max", g.op("Min", x, bound(quant_max)), bound(quant_min))
    kwargs = {} if axis is None else {"axis_i": axis}
    quantized = g.op("QuantizeLinear", x, scale, zp, **kwargs)
    return g.op("DequantizeLinear", quantized, scale, zp, **kwargs)


@symbolic_helper.parse_args("v", "v", "v", "i", "i")
def _per_tensor(g, x, scale, zero_point, quant_min, quant_max):
    return _fake_quantize(g, x, scale, zero_point, None, quant_min, quant_max)


@symbolic_helper.parse_args("v", "v", "v", "i", "i", "i")
def _per_channel(g, x, scale, zero_point, axis, quant_min, quant_max):
    return _fake_quantize(g, x, scale, zero_point, axis, quant_min, quant_max)


@contextmanager
def fake_quant_symbolics() -> Iterator[None]:
    """Use our fake-quantize symbolics for the duration of one export."""
    torch.onnx.register_custom_op_symbolic(_SYMBOLS[0], _per_tensor, _REGISTERED_AT)
    torch.onnx.register_custom_op_symbolic(_SYMBOLS[1], _per_channel, _REGISTERED_AT)
    try:
        yield
    finally:
        for name in _SYMBOLS:
            torch.onnx.unregister_custom_op_symbolic(name, _REGISTERED_AT)


def mark_int4_weights(graph: gs.Graph) -> int:
    """Give weight Q/DQ pairs (constant float -> Q -> DQ, zero point 0) whose integers all
    lie in [-8, 7] INT4 zero points (opset 21 graphs); returns how many were marked."""
    marked = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear" and isinstance(n.inputs[0], gs.Constant)]:
        params = qdq_params(q)
        dqs = [n for n in q.outputs[0].outputs if n.op == "DequantizeLinear"]
        if params.zero_point_type != onnx.TensorProto.INT8 or params.zero_point is None or np.any(params.zero_point):
            continue
        if not dqs or len(dqs) != len(q.outputs[0].outputs) or any(len(n.inputs) < 3 for n in dqs):
            continue
        ints = quantize(q.inputs[0].values, params)
        if ints.min() < -8 or ints.max() > 7:
            continue
        zero = make_constant(f"{q.name or q.outputs[0].name}/zero_point_int4", np.zeros(params.zero_point.shape, dtype=ml_dtypes.int4))
        for node in [q, *dqs]:
            node.inputs[2] = zero
        q.outputs[0].dtype = None  # now INT4; let shape inference type it
        marked += 1
    return marked
