"""Deployment: export targets (one module each, one table in ``export.TARGETS``), INT8, ONNX evaluation.

Needs the ``[export]`` extra (onnx, onnxruntime, executorch, coremltools).
"""

from .common import ExportError
from .export import TARGETS, ExportReport, export_model, read_metadata

__all__ = ["TARGETS", "ExportError", "ExportReport", "export_model", "read_metadata"]
