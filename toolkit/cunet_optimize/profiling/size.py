"""Size on disk of a build's artifacts and the bytes its weights take, by data type.

Weights come from the ONNX initializers (and Constant tensors) of the build's ONNX
model, counted from their shapes, so external-data files need not be read; 4-bit
types count half a byte per element (packed two per byte, as ONNX stores them).
For the PyTorch baseline they come from the checkpoint's state dict.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

# Bits per element for ONNX tensor types that hold weights in practice.
_BITS = {
    "float": 32, "float16": 16, "bfloat16": 16, "double": 64,
    "int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int32": 32, "uint32": 32,
    "int64": 64, "uint64": 64, "bool": 8, "int4": 4, "uint4": 4,
    "float8e4m3fn": 8, "float8e4m3fnuz": 8, "float8e5m2": 8, "float8e5m2fnuz": 8,
}  # fmt: skip


def _dtype_name(data_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(data_type).lower()


def weights_by_dtype(tensors: Iterable[tuple[str, Iterable[int]]]) -> dict:
    """{"total_bytes", "total_elements", "by_dtype": {dtype: {"tensors", "elements", "bytes"}}}
    for (dtype name, shape) pairs; pure, so the packing rule is tested by hand."""
    by: dict[str, dict[str, int]] = {}
    for dtype, shape in tensors:
        n = int(np.prod([int(d) for d in shape], dtype=np.int64)) if shape else 1
        entry = by.setdefault(dtype, {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += n
        entry["bytes"] += math.ceil(n * _BITS.get(dtype, 32) / 8)
    return {
        "total_bytes": sum(e["bytes"] for e in by.values()),
        "total_elements": sum(e["elements"] for e in by.values()),
        "by_dtype": dict(sorted(by.items(), key=lambda kv: -kv[1]["bytes"])),
    }


def onnx_weights(path: str | os.PathLike) -> dict:
    """Weights of an ONNX model by data type (initializers + Constant node tensors)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tensors = [(_dtype_name(t.data_type), list(t.dims)) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    tensors.append((_dtype_name(attr.t.data_type), list(attr.t.dims)))
    out = weights_by_dtype(tensors)
    out["source"] = Path(path).name
    return out


def state_dict_weights(state_dict: Mapping) -> dict:
    """Weights of a PyTorch state dict by data type (parameters and buffers)."""
    names = {"float32": "float", "float64": "double"}
    tensors = []
    for value in state_dict.values():
        dtype = str(value.dtype).removeprefix("torch.")
        tensors.append((names.get(dtype, dtype), list(value.shape)))
    out = weights_by_dtype(tensors)
    out["source"] = "state dict"
    return out


def file_sizes(artifacts: Mapping[str, Path | None]) -> tuple[dict[str, int], list[str]]:
    """Bytes of each artifact role that exists (folders summed); notes for the missing ones."""
    sizes, missing = {}, []
    for role, path in artifacts.items():
        if path is None:
            continue
        p = Path(path)
        if p.is_file():
            sizes[role] = p.stat().st_size
        elif p.is_dir():
            sizes[role] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        else:
            missing.append(f"artifact '{role}' listed in build.json is missing: {p}")
    return sizes, missing
