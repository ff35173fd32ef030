"""Export: CU-Net (plain or fake-quantized) -> a cleaned, verified ONNX file."""

from cunet_optimize.export.onnx_export import ExportSummary, export_onnx
from cunet_optimize.export.verify import (
    TOLERANCES,
    VerificationResult,
    check_onnx,
    compare_outputs,
    make_session,
    run_onnxruntime,
)

__all__ = [
    "ExportSummary",
    "export_onnx",
    "TOLERANCES",
    "VerificationResult",
    "check_onnx",
    "compare_outputs",
    "make_session",
    "run_onnxruntime",
]
