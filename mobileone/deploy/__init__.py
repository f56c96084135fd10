"""Deployment: export targets (one module each, one table in ``targets.TARGETS``), INT8, evaluation of exports.

Needs the ``[export]`` extra (onnx, onnxruntime, coremltools), and per runtime ``[executorch]``,
``[litert]``, ``[openvino]``, ``[ncnn]``.
"""

from .common import ExportError
from .export import ExportReport, export_model
from .targets import TARGETS, read_metadata

__all__ = ["TARGETS", "ExportError", "ExportReport", "export_model", "read_metadata"]
