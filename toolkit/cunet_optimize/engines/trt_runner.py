"""Run a serialized TensorRT engine (10.x or 11.x) as a Runner.

Uses the name-based I/O API of TensorRT 10+ (set_input_shape, set_tensor_address,
execute_async_v3) and Polygraphy's ctypes CUDA wrapper (polygraphy.cuda: DeviceArray,
Stream) for device buffers, so no pycuda or cuda-python is needed. TensorRT is imported
on activate(), never at import time; without it (or without a GPU) activate() raises
TensorRTUnavailable. This module cannot run on our machines: its tests skip here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cunet_optimize.engines.base import IMAGE_CHW, Runner, final_head
from cunet_optimize.engines.trt_apply import TensorRTUnavailable, import_tensorrt
from cunet_optimize.errors import CUNetError


def engine_dtype(trt, engine, name: str) -> np.dtype:
    # AutoCast'ed models may keep FP16 I/O; the runner converts at the boundary.
    return np.dtype(trt.nptype(engine.get_tensor_dtype(name)))


class TrtRunner(Runner):
    """infer(batch) -> heatmaps of the engine's last output (the final head)."""

    prefix = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, name: str | None = None):
        super().__init__(name)
        self.engine_path = Path(engine_path)
        self._shape: tuple[int | None, ...] = (None, *IMAGE_CHW)

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return self._shape

    def activate_impl(self) -> None:
        trt = import_tensorrt(f"run {self.engine_path} on the device it was built on")
        if not self.engine_path.is_file():
            raise CUNetError(
                f"engine not found: {self.engine_path}; build it on the device with build_engine.sh"
            )
        from polygraphy import cuda  # noqa: PLC0415

        self._trt = trt
        self._cuda = cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        try:
            self._runtime = trt.Runtime(self._logger)
        except Exception as exc:
            raise TensorRTUnavailable(f"TensorRT found but no usable NVIDIA GPU ({exc})") from exc
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise CUNetError(
                f"TensorRT {trt.__version__} could not load {self.engine_path}: engines only load on the "
                "GPU architecture and TensorRT version that built them; rebuild it here"
            )
        self._engine = engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise CUNetError(
                f"{self.engine_path}: expected one image input and at least one heatmap output, "
                f"got inputs {inputs} and outputs {outputs}"
            )
        self._input = inputs[0]
        # Every output needs a buffer (execute_async_v3 writes them all); the parser keeps
        # the ONNX output order, so the final head is found as in the ONNX.
        self._outputs = outputs
        self._head = final_head([(n, len(engine.get_tensor_shape(n))) for n in outputs])
        self._shape = tuple(None if d < 0 else int(d) for d in engine.get_tensor_shape(self._input))
        self._stream = cuda.Stream()
        self._buffers: dict[str, object] = {}

    def _device_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype):
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._cuda.DeviceArray(shape=shape, dtype=dtype)
            self._buffers[name] = buf
        else:
            buf.resize(shape)
        return buf

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        trt, ctx, engine = self._trt, self._context, self._engine
        in_dtype = engine_dtype(trt, engine, self._input)
        host_in = np.ascontiguousarray(batch.astype(in_dtype, copy=False))
        if not ctx.set_input_shape(self._input, host_in.shape):
            raise CUNetError(
                f"{self.engine_path}: batch shape {host_in.shape} is outside the engine's optimisation "
                "profile; rebuild with a wider batch range"
            )
        d_in = self._device_buffer(self._input, host_in.shape, in_dtype)
        d_in.copy_from(host_in, stream=self._stream)
        ctx.set_tensor_address(self._input, d_in.ptr)
        for name in self._outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = engine_dtype(trt, engine, name)
            ctx.set_tensor_address(name, self._device_buffer(name, shape, dtype).ptr)
        if not ctx.execute_async_v3(self._stream.ptr):
            raise CUNetError(f"{self.engine_path}: execute_async_v3 failed; see the TensorRT log")
        last = self._head
        out = np.empty(tuple(ctx.get_tensor_shape(last)), dtype=engine_dtype(trt, engine, last))
        self._buffers[last].copy_to(out, stream=self._stream)
        self._stream.synchronize()
        return out.astype(np.float32, copy=False)

    def deactivate_impl(self) -> None:
        for buf in getattr(self, "_buffers", {}).values():
            buf.free()
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            self._stream.free()
        self._stream = None
        self._context = None
        self._engine = None
        self._runtime = None
