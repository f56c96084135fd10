"""Export the fused classifier to any target (ONNX, TorchScript, ExecuTorch, Core ML, LiteRT, OpenVINO, ncnn).

The most common deployment mistake is shipping the train-time graph, whose k branches cost up to
4x the deployed MACs, or fusing in train mode. ``export_model`` therefore always
fuses (in eval mode) before exporting and says so, writes the classes and the preprocessing into
the file where the format has a place for them, and then runs the exported file with its own
runtime on real images, failing when its outputs differ from the PyTorch model's.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.config import IMAGENET_MEAN, IMAGENET_STD
from ..core.fusion import reparameterizable_modules, reparameterize_model
from ..core.model import MobileOne
from ..core.ranges import IMG_SIZE
from .common import OUTPUT_NAME, ExportError, ExportReport
from .targets import FORMATS, TARGETS, format_of, load_export, read_metadata, run_export, target, write_target

log = logging.getLogger("mobileone")
__all__ = ["FORMATS", "TARGETS", "ExportReport", "export_model", "read_metadata"]


@dataclass
class ClassifierExportReport(ExportReport):
    """The classifier's check: logits against PyTorch's on real images, and their top-1 agreement."""

    max_abs_diff: float | None = None
    tolerance: float | None = None
    relative_error: float | None = None  # max |exported - PyTorch| / max |PyTorch|
    top1_agreement: float | None = None  # % of check images whose top-1 class equals PyTorch's
    images: int = 0

    def check_lines(self) -> list[str]:
        if self.max_abs_diff is None:
            return super().check_lines()
        return [
            f"check ({self.check}): max |exported - PyTorch| = {self.max_abs_diff:.3g} "
            f"(tolerance {self.tolerance:.3g}; {self.relative_error:.2g} of max |logit|), "
            f"top-1 agreement {self.top1_agreement:.2f} % on {self.images} images"
        ]


def model_metadata(model: nn.Module, img_size: int) -> dict[str, Any]:
    """Classes and preprocessing a deployed app needs, read off a MobileOne (or defaults)."""
    pre = dict(getattr(model, "preprocess", {}) or {})
    meta = {
        "task": "classify",
        "architecture": "MobileOne" if isinstance(model, MobileOne) else type(model).__name__,
        "variant": getattr(model, "variant", None),
        "fused": True,
        "class_names": getattr(model, "class_names", None),
        "mean": list(pre.get("mean", (0.485, 0.456, 0.406))),
        "std": list(pre.get("std", (0.229, 0.224, 0.225))),
        "input_size": [3, img_size, img_size],
        "crop_pct": pre.get("crop_pct", 0.875),
        "input_layout": "NCHW, RGB, float32, (x / 255 - mean) / std",
    }
    return meta


def fuse_for_export(model: nn.Module) -> tuple[nn.Module, bool, list[str]]:
    """An eval-mode copy of ``model`` with every MobileOne layer fused; whether fusing was needed."""
    model = copy.deepcopy(model).eval()
    unfused = any(not getattr(m, "inference_mode", False) for m in reparameterizable_modules(model))
    notes = []
    if unfused:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = reparameterize_model(model, inplace=True)
        notes = [str(w.message) for w in caught if "train mode" not in str(w.message)]
    return model, unfused, notes


def sample_images(n: int = 8, img_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """Real photographs (matplotlib's sample images), cropped at several places and normalized.

    Export checks run on these rather than on noise: real images exercise the value ranges a
    deployed model sees. Without matplotlib the check falls back to Gaussian noise.
    """
    from PIL import Image

    try:
        from matplotlib.cbook import get_sample_data

        photos = [Image.open(get_sample_data(name)).convert("RGB") for name in ("grace_hopper.jpg", "logo2.png")]
    except (ImportError, OSError):
        return torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(min(w, h) * (1.0 - 0.15 * (i // len(photos) % 4)))
        x0, y0 = (w - side) * (i % 3) // 2, (h - side) * (i % 5) // 4
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((img_size, img_size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def export_model(
    model: nn.Module,
    out: str | Path,
    format: str | None = None,
    img_size: int | None = None,
    dynamic_batch: bool = False,
    check: bool = True,
    check_inputs: Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> ExportReport:
    """Fuse, export and verify a classifier; raises :class:`ExportError` when the check fails.

    ``format`` defaults to the one the suffix of ``out`` names. The check runs the exported file
    with its own runtime (onnxruntime, TorchScript, ExecuTorch, LiteRT, OpenVINO, ncnn; Core ML only
    on macOS, elsewhere a structural check) on ``check_inputs`` (default: real photographs) and
    compares with the eval-mode PyTorch model; the tolerance is ``atol + rtol * max |PyTorch output|``
    (defaults per target in ``TARGETS``). The file reaches ``out`` only once its check passed
    (:func:`~mobileone.deploy.common.write_checked`); a failed one is kept as ``NAME.failed.EXT``.
    """
    out = Path(out)
    format = format or format_of(out)
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r} for {out}; choose one of {list(FORMATS)}")
    if out.suffix != FORMATS[format]:
        out = out.with_suffix(FORMATS[format])
    if img_size is None:  # 0 is an invalid size, not "unset"
        img_size = int((getattr(model, "preprocess", None) or {}).get("input_size", 224))
    IMG_SIZE.check("img_size", img_size)
    reference = copy.deepcopy(model).eval()
    fused, fused_now, notes = fuse_for_export(model)
    meta = model_metadata(model, img_size)
    in_chans = getattr(model, "in_chans", 3)
    # torch.export specializes a batch of 1 to a constant, so a dynamic batch is traced with 2.
    example = torch.zeros(2 if dynamic_batch else 1, in_chans, img_size, img_size)
    t = target(format)
    report = ClassifierExportReport(out, format, fused_now, notes=notes)
    if check and check_inputs is None:
        check_inputs = sample_images(8, img_size, meta["mean"], meta["std"])

    def compare(tmp: Path) -> None:
        with torch.no_grad():
            expected = reference(check_inputs).float()
        if format == "coreml" and not t.module.can_run():
            report.check = t.module.check_structure(tmp, fused, example[:1])
            return
        got = run_export(format, load_export(format, tmp), check_inputs, dynamic_batch)[0]
        report.check = f"{t.module.runtime_name()}, {len(check_inputs)} real images"
        compare_logits(report, got.float(), expected, t.tolerance, atol, rtol)

    log.info("exporting %s (fused=%s) to %s", format, True, out)
    dynamic = "batch" if dynamic_batch else "none"
    write_target(format, fused, out, example, meta, dynamic, [OUTPUT_NAME], compare if check else None)
    return report


def compare_logits(
    report: ExportReport,
    got: Tensor,
    expected: Tensor,
    tolerance: tuple[float, float],
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Fill ``report`` with the logits' error and top-1 agreement; raise :class:`ExportError` over tolerance."""
    if got.shape != expected.shape:
        raise ExportError(f"{report.path} gives outputs shaped {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    scale = float(expected.abs().max())
    report.max_abs_diff = float((got - expected).abs().max())
    report.relative_error = report.max_abs_diff / max(scale, 1e-12)
    report.top1_agreement = 100.0 * float((got.argmax(1) == expected.argmax(1)).float().mean())
    report.images = len(expected)
    atol = tolerance[0] if atol is None else atol
    rtol = tolerance[1] if rtol is None else rtol
    report.tolerance = atol + rtol * scale
    if not report.max_abs_diff <= report.tolerance:
        raise ExportError(
            f"{report.format} export at {report.path} differs from the PyTorch model by {report.max_abs_diff:.3g} "
            f"(tolerance {report.tolerance:.3g}) on {len(expected)} images; "
            "the file is kept for inspection but should not be deployed"
        )


def export_to_temp_onnx(model: nn.Module, img_size: int, dynamic_batch: bool = True) -> Path:
    """Export a fused ONNX copy of ``model`` into a temporary directory (for quantization, benchmarks)."""
    path = Path(tempfile.mkdtemp(prefix="mobileone_")) / "model.onnx"
    export_model(model, path, "onnx", img_size=img_size, dynamic_batch=dynamic_batch, check=False)
    return path
