"""Static post-training INT8 through each runtime's own quantizer, for every task.

A task's fused graph (:func:`task_graph`) is quantized by the tool its runtime ships:

- onnxruntime: ``onnxruntime.quantization`` (QDQ; :mod:`.quantize`);
- ExecuTorch: PT2E from ``torchao.quantization.pt2e`` with ExecuTorch's ``XNNPACKQuantizer``, lowered to XNNPACK;
- LiteRT: PT2E with litert-torch's ``PT2EQuantizer``, converted by litert-torch;
- OpenVINO: ``nncf.quantize`` on the IR;
- ncnn: its int8 tools (``ncnn2table``, ``ncnn2int8``) are not in the Python wheels, so it says so.

A :class:`Recipe` says what the remedy chain may change: per-channel or per-tensor weight scales,
the activation calibration (``minmax``, or the runtime's ``histogram`` / percentile method), and
which layers (module names of the fused graph) stay in float.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.fusion import reparameterize_model
from .common import ExportError, filtered_native_stderr, keeps_signal_stack, require, silenced_stdout, write_sidecar
from .detect import RAW_OUTPUTS, RawDetector, detector_metadata, fused_detector
from .executorch import metadata_constants, to_executorch
from .export import fuse_for_export, model_metadata
from .openvino import convert_module
from .quantize import QuantSettings, quantize_onnx
from .segment import SegmentationOutputs, segmentation_metadata
from .targets import write_export

RUNTIMES = {
    "onnxruntime": "onnx",
    "executorch": "executorch",
    "litert": "tflite",
    "openvino": "openvino",
    "ncnn": "ncnn",
}
METHODS = ("minmax", "histogram")
NCNN_INT8 = (
    "ncnn INT8 needs ncnn's ncnn2table and ncnn2int8 tools, which the ncnn and pnnx wheels do not ship: build "
    "ncnn's tools from source and run them on the fp32 export (mobileone export --format ncnn), or use another "
    "--runtime"
)


@dataclass(frozen=True)
class Recipe:
    """One way to quantize: weight scales, activation calibration, layers kept in float."""

    per_channel: bool = True
    method: str = "minmax"
    keep_float: tuple[str, ...] = ()

    def label(self) -> str:
        keep = f", {len(self.keep_float)} layers in float ({', '.join(self.keep_float)})" if self.keep_float else ""
        return f"{'per-channel' if self.per_channel else 'per-tensor'} weights, {self.method} calibration{keep}"


@dataclass
class Graph:
    """What a target exports for a task: the fused module, an example input, output names and metadata."""

    task: str
    module: nn.Module
    example: Tensor
    names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def task_graph(task: str, model: nn.Module, img_size: int | None = None) -> Graph:
    """The fused, eval-mode graph a task exports (classifier logits, detector raw outputs, segmenter logits)."""
    if task == "detect":
        fused, _ = fused_detector(model)
        size = fused.config.img_size
        meta = detector_metadata(fused, "raw", fused.config.max_detections)
        return Graph(task, RawDetector(fused).eval(), torch.zeros(1, 3, size, size), list(RAW_OUTPUTS), meta)
    if task == "segment":
        size = img_size or int(model.preprocess.get("input_size", 512))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = reparameterize_model(copy.deepcopy(model).eval(), inplace=True)
        meta = segmentation_metadata(model, size, False, False)
        return Graph(task, SegmentationOutputs(fused).eval(), torch.zeros(1, 3, size, size), ["logits"], meta)
    size = img_size or int((getattr(model, "preprocess", None) or {}).get("input_size", 224))
    fused, _, _ = fuse_for_export(model)
    return Graph(
        task, fused, torch.zeros(1, getattr(model, "in_chans", 3), size, size), ["logits"], model_metadata(model, size)
    )


def weighted_layers(module: nn.Module, example: Tensor) -> list[str]:
    """Names of the convs and linears in the order a forward runs them (the order exported graphs keep)."""
    order: list[str] = []
    names = {m: n for n, m in module.named_modules()}
    hooks = [
        m.register_forward_hook(lambda m, i, o: order.append(names[m]))
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def quantize_graph(runtime: str, graph: Graph, calibration: Tensor, out: Path, recipe: Recipe) -> Path:
    """Quantize ``graph`` to INT8 with ``runtime``'s own tool, calibrated on ``calibration``; returns the file."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}")
    if recipe.method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {recipe.method!r}")
    if runtime == "ncnn":
        raise ExportError(NCNN_INT8)
    meta = graph.meta | {"quantization": {"runtime": runtime, **dataclasses.asdict(recipe), "images": len(calibration)}}
    with torch.inference_mode(False):
        return QUANTIZERS[runtime](graph, calibration, out, recipe, meta)


def _onnxruntime(graph: Graph, calibration: Tensor, out: Path, recipe: Recipe, meta: dict) -> Path:
    with tempfile.TemporaryDirectory(prefix="mobileone_int8_") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        write_export("onnx", graph.module, fp32, graph.example, meta, "batch", graph.names)
        layers = weighted_layers(graph.module, graph.example)  # the ONNX graph keeps the order they run in
        exclude = [layers.index(name) for name in recipe.keep_float]
        method = "minmax-avg" if recipe.method == "minmax" else "percentile"
        return quantize_onnx(fp32, out, calibration, QuantSettings(method, recipe.per_channel, "none"), exclude)


def _pt2e(graph: Graph, calibration: Tensor, quantizer: Any, fold: bool = True) -> nn.Module:
    """The graph calibrated and converted by PT2E (``torchao.quantization.pt2e``) under ``quantizer``.

    ``fold=False`` keeps the weights' quantize ops in the graph: litert-torch's converter reads them.
    """
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "executorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = torch.export.export(graph.module, (graph.example,)).module()
        prepared = pt2e.prepare_pt2e(captured, quantizer)
        with torch.no_grad():
            for batch in calibration.split(1):
                prepared(batch)
        return pt2e.convert_pt2e(prepared, fold_quantize=fold)


def _observer(config: Any, method: str) -> Any:
    """A PT2E config with MinMax activation observers instead of the histogram ones (``method="minmax"``)."""
    if method == "histogram":
        return config
    observers = require("torchao.quantization.pt2e.observer", "executorch")
    minmax = observers.MinMaxObserver.with_args(eps=2**-12)
    acts = {
        k: dataclasses.replace(getattr(config, k), observer_or_fake_quant_ctr=minmax)
        for k in ("input_activation", "output_activation")
        if getattr(config, k) is not None
    }
    return dataclasses.replace(config, **acts)


def _executorch(graph: Graph, calibration: Tensor, out: Path, recipe: Recipe, meta: dict) -> Path:
    xq = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "executorch")
    quantizer = xq.XNNPACKQuantizer().set_global(
        _observer(xq.get_symmetric_quantization_config(is_per_channel=recipe.per_channel), recipe.method)
    )
    for name in recipe.keep_float:
        quantizer.set_module_name(name, None)
    converted = _pt2e(graph, calibration, quantizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(converted, (graph.example,))
    to_executorch(None, out, graph.example, constants=metadata_constants(meta), program=program)
    return out


def _litert(graph: Graph, calibration: Tensor, out: Path, recipe: Recipe, meta: dict) -> Path:
    litert_torch = require("litert_torch", "litert")
    pq = require("litert_torch.quantize.pt2e_quantizer", "litert")
    qc = require("litert_torch.quantize.quant_config", "litert")
    quantizer = pq.PT2EQuantizer().set_global(
        _observer(pq.get_symmetric_quantization_config(is_per_channel=recipe.per_channel), recipe.method)
    )
    for name in recipe.keep_float:
        quantizer.set_module_name(name, None)
    converted = _pt2e(graph, calibration, quantizer, fold=False)
    with warnings.catch_warnings(), filtered_native_stderr(), silenced_stdout():
        warnings.simplefilter("ignore")
        edge = litert_torch.convert(converted, (graph.example,), quant_config=qc.QuantConfig(pt2e_quantizer=quantizer))
        edge.export(str(out))
    write_sidecar(out, meta | {"outputs_order": graph.names})
    return out


@keeps_signal_stack
def _openvino(graph: Graph, calibration: Tensor, out: Path, recipe: Recipe, meta: dict) -> Path:
    ov = require("openvino", "openvino")
    nncf = require("nncf", "openvino")
    params = require("nncf.quantization.advanced_parameters", "openvino")
    ranges = require("nncf.quantization.range_estimator", "openvino").RangeEstimatorParametersSet
    ir = convert_module(graph.module, graph.example, "none", graph.names)
    advanced = params.AdvancedQuantizationParameters(
        weights_quantization_params=params.QuantizationParameters(per_channel=recipe.per_channel),
        activations_range_estimator_params=ranges.MINMAX if recipe.method == "minmax" else ranges.MEAN_QUANTILE,
    )
    patterns = [f"(.*\\.)?{re.escape(name)}/.*" for name in recipe.keep_float]  # __module.<name>/aten::...
    with silenced_stdout():
        quantized = nncf.quantize(
            ir,
            nncf.Dataset([b.numpy() for b in calibration.split(1)]),
            subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(patterns=patterns, validate=False) if patterns else None,
            advanced_parameters=advanced,
        )
    quantized.set_rt_info(json.dumps(meta), ["mobileone", "metadata"])
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


QUANTIZERS = {"onnxruntime": _onnxruntime, "executorch": _executorch, "litert": _litert, "openvino": _openvino}
