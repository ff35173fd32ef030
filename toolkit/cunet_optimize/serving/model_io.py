"""A deployed graph's inputs and outputs as serving configs name them: read from the ONNX.

Every config (Triton's config.pbtxt, DeepStream's nvinfer file) takes its tensor names,
data types and dims from here, so a config can never disagree with the graph it serves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnx

# ONNX element type -> Triton's DataType name (model_config.proto)
TRITON_DTYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorIO:
    name: str
    data_type: str  # Triton's TYPE_* name
    shape: tuple[int, ...]  # full shape, batch first; -1 for a free dimension

    @property
    def item_dims(self) -> tuple[int, ...]:
        """The dims without the batch (what config.pbtxt lists when max_batch_size > 0)."""
        return self.shape[1:]


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]

    @property
    def dynamic_batch(self) -> bool:
        """Every tensor's first dimension free: the graph takes any batch."""
        return all(t.shape and t.shape[0] == -1 for t in self.inputs + self.outputs)

    @property
    def image(self) -> TensorIO:
        return self.inputs[0]


def _tensor(value: onnx.ValueInfoProto, where: str) -> TensorIO:
    kind = value.type.tensor_type
    if kind.elem_type not in TRITON_DTYPES:
        raise ValueError(f"{where}: tensor {value.name} has ONNX type {kind.elem_type}, which Triton has no type for")
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in kind.shape.dim)
    return TensorIO(value.name, TRITON_DTYPES[kind.elem_type], dims)


def read_model_io(onnx_path: str | os.PathLike) -> ModelIO:
    """The graph's real inputs (initializers excluded) and outputs, in graph order."""
    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    where = os.fspath(onnx_path)
    return ModelIO(tuple(_tensor(v, where) for v in model.graph.input if v.name not in initializers),
                   tuple(_tensor(v, where) for v in model.graph.output))
