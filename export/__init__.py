"""Deployment: `vitreg export onnx`, exact at any image size, and running the exported graph with ONNX Runtime."""

from .onnx_export import OnnxExport, export_onnx
from .runtime import ONNXRuntimeModel

__all__ = ["ONNXRuntimeModel", "OnnxExport", "export_onnx"]
