"""Export: CU-Net (plain or fake-quantized) -> a cleaned, verified ONNX file."""

from cunet_optimize.exporters.onnx_export import ExportSummary, export_onnx

__all__ = ["ExportSummary", "export_onnx"]
