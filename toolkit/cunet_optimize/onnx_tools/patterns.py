"""Small pattern helpers named after the graph ideas the passes use.

- `make_constant`: a gs.Constant from an array, INT4/UINT4 included (stored packed).
- `ConvWeight` / `conv_weight`: the three forms a Conv weight takes in our graphs:
  float initializer; integer initializer -> DequantizeLinear; float initializer ->
  QuantizeLinear -> DequantizeLinear (the fake-quant export). Passes that slice or
  fold weights handle all three through this one description.
- `qdq_params`: scale / zero point / axis / block_size of a Q or DQ node.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from cunet_optimize.onnx_tools.graph import constant_values, only_consumer, producer

_PACKED = {np.dtype(ml_dtypes.int4): onnx.TensorProto.INT4, np.dtype(ml_dtypes.uint4): onnx.TensorProto.UINT4}


def make_constant(name: str, values: np.ndarray, onnx_type: int | None = None) -> gs.Constant:
    """A constant; INT4/UINT4 (by dtype or `onnx_type`) are stored as packed ONNX tensors,
    which gs cannot do from a NumPy array itself."""
    values = np.asarray(values)
    onnx_type = onnx_type if onnx_type is not None else _PACKED.get(values.dtype)
    if onnx_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        proto = onnx.helper.make_tensor(name, onnx_type, list(values.shape), values.astype(np.int32).ravel().tolist())
        return gs.Constant(name, LazyValues(proto))
    return gs.Constant(name, values)


def onnx_type_of(tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues):
        return int(tensor._values.tensor.data_type)
    if tensor.dtype is None:
        return None
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class QDQParams:
    scale: np.ndarray | None
    zero_point: np.ndarray | None  # None when the input is omitted
    zero_point_type: int | None  # ONNX data type of the zero point (the integer type)
    axis: int
    block_size: int


def qdq_params(node: gs.Node) -> QDQParams:
    scale = constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
    zp_tensor = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    zero_point = constant_values(zp_tensor) if zp_tensor is not None else None
    zp_type = onnx_type_of(zp_tensor) if zp_tensor is not None else None
    return QDQParams(scale, zero_point, zp_type, int(node.attrs.get("axis", 1)), int(node.attrs.get("block_size", 0)))


def is_per_tensor(params: QDQParams) -> bool:
    return params.scale is not None and params.scale.size == 1


@dataclass
class ConvWeight:
    kind: str  # "float" | "dq" (integer initializer -> DQ) | "qdq" (float -> Q -> DQ)
    stored: gs.Constant  # the initializer: float weights, or the integers for "dq"
    q: gs.Node | None = None
    dq: gs.Node | None = None

    @property
    def params(self) -> QDQParams | None:
        return qdq_params(self.dq) if self.dq is not None else None


def conv_weight(conv: gs.Node, graph: gs.Graph) -> ConvWeight | None:
    """The weight of a Conv (or ConvTranspose/Gemm input 1) in one of the three forms, or
    None when it is anything else (computed at run time, shared Q/DQ, ...)."""
    if len(conv.inputs) < 2:
        return None
    w = conv.inputs[1]
    if isinstance(w, gs.Constant):
        return ConvWeight("float", w)
    dq = producer(w)
    if dq is None or dq.op != "DequantizeLinear" or only_consumer(w, graph) is not conv:
        return None
    if not all(isinstance(t, gs.Constant) for t in dq.inputs[1:] if not t.is_empty()):
        return None
    x = dq.inputs[0]
    if isinstance(x, gs.Constant):
        return ConvWeight("dq", x, None, dq)
    q = producer(x)
    if q is None or q.op != "QuantizeLinear" or only_consumer(x, graph) is not dq:
        return None
    if not isinstance(q.inputs[0], gs.Constant) or not all(isinstance(t, gs.Constant) for t in q.inputs[1:] if not t.is_empty()):
        return None
    return ConvWeight("qdq", q.inputs[0], q, dq)


def dequantized_weight(weight: ConvWeight) -> np.ndarray:
    """The float weight the Conv sees (what ONNX Runtime computes), as float32."""
    values = np.asarray(weight.stored.values)
    if weight.kind == "float":
        return values.astype(np.float32)
    p = weight.params
    ints = values.astype(np.float64)
    if weight.kind == "qdq":
        qp = qdq_params(weight.q)
        ints = quantize(values, qp)
    scale = expand_qparam(p.scale, ints.shape, p.axis, p.block_size)
    zp = expand_qparam(p.zero_point, ints.shape, p.axis, p.block_size) if p.zero_point is not None else 0.0
    return ((ints - zp) * scale).astype(np.float32)


def expand_qparam(param: np.ndarray, shape: tuple, axis: int, block_size: int) -> np.ndarray:
    """Broadcast a per-tensor, per-axis or blocked scale/zero point to `shape`."""
    param = np.asarray(param, dtype=np.float64)
    if param.size == 1:
        return np.full(shape, float(param.reshape(-1)[0]))
    axis = axis % len(shape)
    if block_size > 0:
        return np.repeat(param, block_size, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(param.reshape(view), shape)


def quantize(values: np.ndarray, params: QDQParams) -> np.ndarray:
    """QuantizeLinear in NumPy (round half to even, saturate to the zero point's type),
    as ONNX Runtime's CPU kernel computes it in float32; returns float64 integers."""
    x = np.asarray(values, dtype=np.float32)
    scale = expand_qparam(params.scale, x.shape, params.axis, params.block_size).astype(np.float32)
    zp = expand_qparam(params.zero_point, x.shape, params.axis, params.block_size) if params.zero_point is not None else 0.0
    lo, hi = integer_range(params.zero_point_type if params.zero_point_type is not None else onnx.TensorProto.UINT8)
    return np.clip(np.rint(x / scale).astype(np.float64) + zp, lo, hi)


def integer_range(onnx_type: int) -> tuple[int, int]:
    return {
        onnx.TensorProto.INT8: (-128, 127),
        onnx.TensorProto.UINT8: (0, 255),
        onnx.TensorProto.INT4: (-8, 7),
        onnx.TensorProto.UINT4: (0, 15),
        onnx.TensorProto.INT16: (-32768, 32767),
        onnx.TensorProto.UINT16: (0, 65535),
    }.get(onnx_type, (-(2**31), 2**31 - 1))
