"""Export: checkpoint folders -> bundles (ONNX graphs verified against PyTorch; TensorRT plans)."""

from .onnx_export import DEFAULT_OPSET, ExportError, export_bundle

__all__ = ["export_bundle", "ExportError", "DEFAULT_OPSET"]
