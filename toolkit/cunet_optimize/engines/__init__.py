"""Engines: per backend a builder (ONNX -> artifact) and a runner, for the targets of the
registry (cunet_optimize/targets.py, which lint and the quantization policy read too; its
names are re-exported here).

- base:        Runner (activate / infer / deactivate), EngineBuilder protocol, EngineArtifacts, TorchRunner
- onnxrt:      ONNX Runtime CPU builder and runners (real, runs here)
- trt_plan:    TensorRT build plans as data, trtexec argv and device recipe (pure)
- trt_apply:   the one module that applies a plan through the TensorRT Python API
- trt_builder: the TensorRT deployment-bundle builder
- trt_runner:  the TensorRT runner (needs TensorRT and an NVIDIA GPU)
"""

from cunet_optimize.engines.base import EngineBuilder, EngineArtifacts, Runner, TorchRunner
from cunet_optimize.targets import (
    PRECISIONS,
    TARGETS,
    PrecisionSupport,
    TargetSpec,
    check_precision,
    get_target,
)

__all__ = [
    "EngineArtifacts",
    "EngineBuilder",
    "Runner",
    "TorchRunner",
    "PRECISIONS",
    "TARGETS",
    "PrecisionSupport",
    "TargetSpec",
    "check_precision",
    "get_target",
    "get_builder",
]


def get_builder(target: str, **kwargs) -> EngineBuilder:
    """The builder for a target's backend (ONNX Runtime or TensorRT)."""
    spec = get_target(target)
    if spec.backend == "onnxruntime":
        from cunet_optimize.engines.onnxrt import OnnxRuntimeBuilder

        return OnnxRuntimeBuilder(**kwargs)
    from cunet_optimize.engines.trt_builder import TensorRTBuilder

    return TensorRTBuilder(**kwargs)
