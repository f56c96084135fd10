"""Exporting a segmenter: the fused graph, any height and width, logits (and optionally the argmax), checked.

The exported graph is :class:`SegmentationOutputs` around the folded model (no MobileOne branch
and no BatchNorm left): input ``input`` (N, 3, H, W), normalized RGB; output ``logits``
(N, classes, H, W) at the input's size, and with ``argmax=True`` also ``labels`` (N, H, W, int64),
the per-pixel class, so an app needs no post-processing. ONNX and TorchScript take any height
and width (and batch); ExecuTorch and Core ML are exported at ``img_size``.

The check runs the file with its runtime on real photographs (matplotlib's samples) at the export
size and, where the size is dynamic, at a second, non-square size: the logits must match the
eval-mode PyTorch model within ``rtol`` (1e-4; Core ML, which computes in float16, 2e-2) of their
largest magnitude, and the agreement of the per-pixel argmax is reported (a near-tie of two logits
can flip a pixel without any error in the graph).
Core ML predicts on macOS only; elsewhere its check is structural (no BatchNorm, metadata present).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.fusion import reparameterize_model
from ..engine.task import require_finite
from ..tasks.segmentation.data import SegmentationDataset, eval_transform, load_splits
from ..tasks.segmentation.evaluate import class_lut
from ..tasks.segmentation.metrics import confusion_matrix, segmentation_scores
from ..tasks.segmentation.model import Segmenter
from . import torchscript
from .common import INPUT_NAME, ExportError, package_version, require, write_checked
from .coreml import coreml_op_counts, read_coreml_metadata
from .executorch import executorch_method, read_executorch_metadata, to_executorch
from .export import sample_images
from .onnx import onnx_session, read_onnx_metadata, set_onnx_metadata, to_onnx

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "executorch": ".pte", "coreml": ".mlpackage"}
DYNAMIC = ("onnx", "torchscript")  # formats exported with a dynamic batch, height and width
MIN_SIDE, MAX_SIDE = 32, 4096  # the sides an export with dynamic height and width accepts
TOLERANCE = {"default": (1e-5, 1e-4), "coreml": (5e-2, 2e-2)}  # (atol, rtol); Core ML computes in float16


class SegmentationOutputs(nn.Module):
    """What an export computes: ``logits`` at the input's size, and ``labels`` (their argmax) when asked."""

    def __init__(self, model: nn.Module, argmax: bool = False) -> None:
        super().__init__()
        self.model, self.argmax = model, argmax

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        logits = self.model(x)["out"]
        return (logits, logits.argmax(1)) if self.argmax else logits

    @property
    def output_names(self) -> list[str]:
        return ["logits", "labels"] if self.argmax else ["logits"]


@dataclass
class SegmentationExportReport:
    """What was exported and how closely the file reproduces PyTorch (logits, and argmax agreement in %)."""

    path: Path
    format: str
    fused_on_export: bool
    check: str = "not run"
    sizes: list[tuple[int, int]] = field(default_factory=list)
    max_abs_diff: float | None = None
    tolerance: float | None = None
    argmax_agreement: float | None = None  # % of pixels whose argmax matches PyTorch's
    labels_agreement: float | None = None  # % of pixels where the file's ``labels`` output matches PyTorch's argmax
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"exported {self.format} to {self.path}"]
        if self.fused_on_export:
            lines.append("the model had train-time branches and BatchNorms: folded them (eval mode) before exporting")
        if self.max_abs_diff is not None:
            sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
            lines.append(
                f"check ({self.check}; sizes {sizes}): max |logits - PyTorch| = {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}); argmax agreement "
                f"{self.argmax_agreement:.4f} %"
            )
            if self.labels_agreement is not None:
                lines.append(f"labels output vs PyTorch argmax: {self.labels_agreement:.4f} % of pixels agree")
        else:
            lines.append(f"check: {self.check}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def segmentation_metadata(model: Segmenter, img_size: int, argmax: bool, dynamic: bool) -> dict[str, Any]:
    """Classes, preprocessing and the outputs' meaning, written into the exported file."""
    pre = model.preprocess
    shape = "any height and width" if dynamic else f"{img_size}x{img_size}"
    return {
        "task": "segment",
        "architecture": model.name,
        "fused": True,
        "class_names": model.class_names,
        "num_classes": model.num_classes,
        "output_stride": model.config.output_stride,
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "input_size": [3, "H", "W"] if dynamic else [3, img_size, img_size],
        "train_size": int(pre.get("input_size", img_size)),
        "input_layout": f"NCHW, RGB, float32, (x / 255 - mean) / std; {shape}",
        "outputs": ["logits: (N, classes, H, W)"] + (["labels: (N, H, W) int64, argmax of logits"] if argmax else []),
        "ignore_index": 255,
    }


def check_images(img_size: int, dynamic: bool, mean: list[float], std: list[float]) -> list[Tensor]:
    """Real photographs at the export size and, for dynamic exports, at a non-square 3/4 height."""
    square = sample_images(2, img_size, mean, std)
    if not dynamic:
        return [square]
    h = max(MIN_SIDE, img_size * 3 // 4 + 1)  # odd on purpose: no stride divides it
    return [square, sample_images(2, img_size, mean, std)[:, :, :h, :]]


def export_segmenter(
    model: Segmenter,
    out: str | Path,
    format: str | None = None,
    img_size: int | None = None,
    argmax: bool = False,
    check: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
) -> SegmentationExportReport:
    """Fold, export and check a segmenter; raises :class:`ExportError` when the logits differ from PyTorch's.

    ``format`` defaults to the one the suffix of ``out`` names; ``img_size`` (default: the training
    size saved with the model) is the traced size, the only one for ExecuTorch and Core ML. The
    tolerance is ``atol + rtol * max |PyTorch logits|``.
    """
    if not isinstance(model, Segmenter):
        raise TypeError(f"export_segmenter exports a Segmenter (create_segmenter), got {type(model).__name__}")
    out = Path(out)
    format = format or next((f for f, s in FORMATS.items() if out.suffix == s), None)
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r} for {out}; choose one of {list(FORMATS)}")
    out = out if out.suffix == FORMATS[format] else out.with_suffix(FORMATS[format])
    img_size = int(model.preprocess.get("input_size", 512)) if img_size is None else img_size
    if not isinstance(img_size, int) or not MIN_SIDE <= img_size <= MAX_SIDE:
        raise ValueError(f"img_size must be an integer in {MIN_SIDE}..{MAX_SIDE} (pixels), got {img_size!r}")
    reference = copy.deepcopy(model).eval()
    fused_now = not model.inference_mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = reparameterize_model(copy.deepcopy(model).eval(), inplace=True) if fused_now else reference
    wrapper = SegmentationOutputs(fused, argmax).eval()
    dynamic = format in DYNAMIC
    meta = segmentation_metadata(model, img_size, argmax, dynamic)
    example = torch.zeros(2 if dynamic else 1, 3, img_size, img_size)
    report = SegmentationExportReport(out, format, fused_now)

    def write(tmp: Path) -> None:
        with torch.inference_mode(False), torch.no_grad():
            _EXPORTERS[format](wrapper, tmp, example, meta)

    def compare(tmp: Path) -> None:
        if format == "coreml":
            report.check = _coreml_structure(tmp, wrapper, example)
            if sys.platform != "darwin" or not check:
                return
        if check:
            images = check_images(img_size, dynamic, meta["mean"], meta["std"])
            _compare_logits(tmp, wrapper, reference, images, report, (atol, rtol))

    write_checked(out, write, compare, read_segmentation_metadata)
    return report


def _compare_logits(
    tmp: Path,
    wrapper: SegmentationOutputs,
    reference: nn.Module,
    images: list[Tensor],
    report: SegmentationExportReport,
    tolerance: tuple[float | None, float | None],
) -> None:
    """Run the file on ``images``; fill ``report``; an :class:`ExportError` when its logits differ from PyTorch's.

    ``tolerance``: (atol, rtol), None for the format's default.
    """
    format, argmax = report.format, wrapper.argmax
    run, report.check = _RUNNERS[format](tmp, wrapper)
    diffs, scale, agree, labels_agree, pixels = 0.0, 0.0, 0, 0, 0
    for x in images:
        with torch.no_grad():
            expected = reference(x)["out"].float()
        got = [torch.as_tensor(np.asarray(t)) for t in run(x)]
        logits = got[0].float()
        if logits.shape != expected.shape:
            raise ExportError(
                f"{format} export at {tmp} gives logits shaped {tuple(logits.shape)} for an input "
                f"{tuple(x.shape)}; PyTorch gives {tuple(expected.shape)}"
            )
        report.sizes.append(tuple(x.shape[-2:]))
        diffs, scale = max(diffs, float((logits - expected).abs().max())), max(scale, float(expected.abs().max()))
        truth = expected.argmax(1)
        agree += int((logits.argmax(1) == truth).sum())
        pixels += truth.numel()
        if argmax:
            labels_agree += int((got[1].long() == truth).sum())
    defaults = TOLERANCE.get(format, TOLERANCE["default"])
    atol, rtol = (d if t is None else t for d, t in zip(defaults, tolerance, strict=True))
    report.max_abs_diff, report.tolerance = diffs, atol + rtol * scale
    report.argmax_agreement = 100.0 * agree / pixels
    report.labels_agreement = 100.0 * labels_agree / pixels if argmax else None
    if not report.max_abs_diff <= report.tolerance:
        raise ExportError(
            f"{format} export at {tmp} differs from the PyTorch model by {report.max_abs_diff:.3g} "
            f"(tolerance {report.tolerance:.3g}); it should not be deployed"
        )


# ----------------------------------------------------------------------------- per format


def _onnx(wrapper: SegmentationOutputs, out: Path, example: Tensor, meta: dict) -> None:
    onnx = require("onnx")
    dims = {
        0: torch.export.Dim("batch", min=1, max=256),
        2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
        3: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE),
    }
    to_onnx(wrapper, out, example, output_names=wrapper.output_names, dynamic_shapes=(dims,))
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    if "BatchNormalization" in ops:
        raise ExportError(f"{out} still contains BatchNormalization nodes: the graph was not folded")
    set_onnx_metadata(proto, meta)
    onnx.save(proto, str(out))


def _torchscript(wrapper: SegmentationOutputs, out: Path, example: Tensor, meta: dict) -> None:
    torchscript.export(wrapper, out, example, meta, True)


def _executorch(wrapper: SegmentationOutputs, out: Path, example: Tensor, meta: dict) -> None:
    constants = {
        "mobileone_metadata": json.dumps(meta),
        "mean": meta["mean"],
        "std": meta["std"],
        "input_size": meta["input_size"],
    }
    to_executorch(wrapper, out, example, constants=constants)


def _coreml(wrapper: SegmentationOutputs, out: Path, example: Tensor, meta: dict) -> None:
    ct = require("coremltools")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example)
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape))],
            outputs=[ct.TensorType(name=n) for n in wrapper.output_names],
            convert_to="mlprogram",
        )
    mlmodel.short_description = f"{meta['architecture']} (fused MobileOne segmenter)"
    mlmodel.input_description[INPUT_NAME] = f"{meta['input_layout']}; mean {meta['mean']}, std {meta['std']}"
    for key, value in meta.items():
        mlmodel.user_defined_metadata[key] = json.dumps(value)
    if out.exists():
        shutil.rmtree(out)
    mlmodel.save(str(out))


_EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript, "executorch": _executorch, "coreml": _coreml}


def _convs_run(model: nn.Module, example: Tensor) -> int:
    """How many convs an eval forward runs (the auxiliary head's are in the model, not in the graph)."""
    ran: set[int] = set()
    hooks = [
        m.register_forward_hook(lambda m, i, o: ran.add(id(m))) for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return len(ran)


def _coreml_structure(path: Path, wrapper: nn.Module, example: Tensor) -> str:
    ops = coreml_op_counts(path)
    convs = _convs_run(wrapper, example)
    if ops.get("batch_norm", 0) or ops.get("conv", 0) != convs:
        raise ExportError(
            f"{path} holds {ops.get('conv', 0)} convs and {ops.get('batch_norm', 0)} batch norms; the "
            f"folded model has {convs} convs and none"
        )
    if "mean" not in read_coreml_metadata(path):
        raise ExportError(f"{path} lacks the preprocessing metadata (mean, std, input size)")
    where = "" if sys.platform == "darwin" else "; Core ML prediction needs macOS"
    return f"structural ({ops['conv']} convs, no batch norm, metadata present){where}"


def _onnx_runner(path: Path, wrapper: nn.Module):
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return (
        lambda x: session.run(None, {name: x.numpy()}),
        f"onnxruntime {package_version('onnxruntime')}, real images",
    )


def _torchscript_runner(path: Path, wrapper: nn.Module):
    loaded = torch.jit.load(str(path)).eval()

    def run(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            y = loaded(x)
        return list(y) if isinstance(y, tuple) else [y]

    return run, f"TorchScript (torch {torch.__version__}), real images"


def _executorch_runner(path: Path, wrapper: nn.Module):
    method = executorch_method(path)

    def run(x: Tensor) -> list[Tensor]:  # exported for batch 1
        outs = [method.execute([x[i : i + 1].contiguous()]) for i in range(len(x))]
        return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]

    return run, f"ExecuTorch runtime {package_version('executorch')} (XNNPACK), real images"


def _coreml_runner(path: Path, wrapper: nn.Module):
    ct = require("coremltools")
    mlmodel = ct.models.MLModel(str(path))
    names = wrapper.output_names

    def run(x: Tensor) -> list[np.ndarray]:
        outs = [mlmodel.predict({INPUT_NAME: x[i : i + 1].numpy()}) for i in range(len(x))]
        return [np.concatenate([np.asarray(o[n]) for o in outs]) for n in names]

    return run, f"Core ML {package_version('coremltools')} prediction (float16 compute), real images"


_RUNNERS = {
    "onnx": _onnx_runner,
    "torchscript": _torchscript_runner,
    "executorch": _executorch_runner,
    "coreml": _coreml_runner,
}


def read_segmentation_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported segmenter, by the file's suffix."""
    path = Path(path)
    readers = {
        ".onnx": read_onnx_metadata,
        ".pt": torchscript.read_torchscript_metadata,
        ".pte": read_executorch_metadata,
        ".mlpackage": read_coreml_metadata,
    }
    if path.suffix not in readers:
        raise ValueError(f"cannot read metadata from {path}: expected one of {list(readers)}")
    return readers[path.suffix](path)


def evaluate_onnx_segmenter(
    path: str | Path, data: str | Path, split: str = "val", data_format: str = "auto", threads: int | None = None
) -> dict[str, Any]:
    """mIoU of an exported ONNX segmenter on full-resolution images (classes and preprocessing from its metadata)."""
    meta = read_onnx_metadata(path)
    if meta.get("task") != "segment":
        raise ValueError(
            f"{path} is not an exported segmenter (its metadata has no task 'segment'); export one "
            "with `mobileone export --task segment`"
        )
    samples, classes, fmt = load_splits(data, data_format, splits=(split,))
    names, n = meta.get("class_names"), int(meta["num_classes"])
    lut = class_lut(classes, names, n, f"{data} ({split})")
    ds = SegmentationDataset(samples[split], classes, eval_transform(meta["mean"], meta["std"]), lut=lut)
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name
    cm, bad = torch.zeros(n, n, dtype=torch.int64), 0
    for i in range(len(ds)):
        x, y = ds[i]
        if x is None:
            bad += 1
            continue
        logits = torch.from_numpy(session.run(["logits"], {name: x[None].numpy()})[0])
        require_finite(logits, f"{path}")
        cm += confusion_matrix(logits.argmax(1), y[None], n)
    scores = segmentation_scores(cm, names or [str(i) for i in range(n)])
    return {
        "model": str(path),
        "runtime": f"onnxruntime {package_version('onnxruntime')}",
        "data": str(data),
        "format": fmt,
        "split": split,
        **scores,
        "images": len(ds) - bad,
        "unreadable_images": bad,
    }
