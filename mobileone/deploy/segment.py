"""Exporting a segmenter: the fused graph, any height and width, logits (and optionally the argmax), checked.

The exported graph is :class:`SegmentationOutputs` around the folded model (no MobileOne branch
and no BatchNorm left): input ``input`` (N, 3, H, W), normalized RGB; output ``logits``
(N, classes, H, W) at the input's size, and with ``argmax=True`` also ``labels`` (N, H, W, int64),
the per-pixel class, so an app needs no post-processing. ONNX, TorchScript and OpenVINO take any
height and width (and batch); ExecuTorch, Core ML, LiteRT and ncnn are exported at ``img_size``.
Every format is written and run through the targets classification and detection use.

The check runs the file with its runtime on real photographs (matplotlib's samples) at the export
size and, where the size is dynamic, at a second, non-square size: the logits must match the
eval-mode PyTorch model within ``rtol`` (1e-4; Core ML, which computes in float16, 2e-2) of their
largest magnitude, and the agreement of the per-pixel argmax is reported (a near-tie of two logits
can flip a pixel without any error in the graph).
Core ML predicts on macOS only; elsewhere its check is structural (no BatchNorm, metadata present).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.fusion import reparameterize_model
from ..engine.task import require_finite
from ..tasks.segment.data import SegmentationDataset, eval_transform, load_splits
from ..tasks.segment.evaluate import class_lut
from ..tasks.segment.metrics import confusion_matrix, segmentation_scores
from ..tasks.segment.model import Segmenter
from .common import ExportError, package_version
from .export import sample_images
from .onnx import MAX_SIDE, MIN_SIDE, onnx_session, read_onnx_metadata
from .targets import FORMATS, format_of, load_export, read_metadata, run_export, target, write_target

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
    format = format or format_of(out)
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
    dynamic = "size" in target(format).dynamic
    meta = segmentation_metadata(model, img_size, argmax, dynamic)
    example = torch.zeros(2 if dynamic else 1, 3, img_size, img_size)
    report = SegmentationExportReport(out, format, fused_now)
    t = target(format)

    def compare(tmp: Path) -> None:
        if format == "coreml" and not t.module.can_run():
            report.check = t.module.check_structure(tmp, wrapper, example[:1])
            return
        images = check_images(img_size, dynamic, meta["mean"], meta["std"])
        _compare_logits(tmp, wrapper, reference, images, report, (atol, rtol))

    dynamic_mode = "size" if dynamic else "none"
    write_target(format, wrapper, out, example, meta, dynamic_mode, wrapper.output_names, compare if check else None)
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
    runner = load_export(format, tmp)
    report.check = f"{target(format).module.runtime_name()}, real images"
    dynamic = "size" in target(format).dynamic
    diffs, scale, agree, labels_agree, pixels = 0.0, 0.0, 0, 0, 0
    for x in images:
        with torch.no_grad():
            expected = reference(x)["out"].float()
        got = run_export(format, runner, x, dynamic)
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


def read_segmentation_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported segmenter, by the file's suffix."""
    return read_metadata(path)


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
