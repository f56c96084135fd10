"""Exporting a detector so that it detects what PyTorch detects: two ONNX forms, each checked in onnxruntime.

torchvision's SSD post-processing is a Python loop over classes with data-dependent shapes;
traced, it silently returns other detections (219 in PyTorch against 234 in onnxruntime was
measured on one image), and torch.export refuses it. It is therefore never exported:

- **raw**: the fused network up to decoded boxes ``boxes`` (B, A, 4; xyxy pixels of the input)
  and class scores ``scores`` (B, A, C; softmax without the background). Apps run their own NMS;
  the check holds it to PyTorch's ``forward_raw`` within 1e-4 relative.
- **nms**: the raw graph followed by NMS written as ONNX operators: per class the
  ``topk_candidates`` best scores (TopK), per-class ``NonMaxSuppression`` with the detector's IoU
  and score thresholds, then the ``max_detections`` best overall (TopK). Outputs have fixed
  shapes: ``boxes`` (B, M, 4), ``scores`` (B, M), ``labels`` (B, M; 0-based, -1 for padding),
  ``num_detections`` (B,). These are the steps of ``SSDLiteDetector.postprocess``; the check
  compares the detections as sets (same labels, IoU >= 0.99, scores within 1e-4).

Every other target (TorchScript, ExecuTorch, Core ML, LiteRT, OpenVINO, ncnn) takes the raw form
through the same dispatch as classification and segmentation (``targets.write_export``), and is
checked in its own runtime by the same comparison, :func:`check_detector_outputs`.
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..core.fusion import reparameterize_model
from ..core.ranges import MAX_DETECTIONS
from ..tasks.detection.model import DetectorConfig, SSDLiteDetector, postprocess
from ..tasks.detection.task import detection_metrics, val_loader
from .common import ExportError, require, write_checked
from .export import sample_images
from .onnx import onnx_session, read_onnx_metadata, set_onnx_metadata
from .onnx_nms import add_nms
from .targets import FORMATS, format_of, load_export, run_export, target, write_export

FORMS = ("raw", "nms")
NMS_FORMATS = ("onnx", "openvino")  # the runtimes whose NonMaxSuppression matches ONNX's
RAW_OUTPUTS = ["boxes", "scores"]
NMS_OUTPUTS = ["boxes", "scores", "labels", "num_detections"]
RAW_RTOL, SCORE_TOL, MIN_IOU = 1e-4, 1e-4, 0.99


class RawDetector(nn.Module):
    """A detector's ``forward_raw`` as a module's forward: what the exporters trace."""

    def __init__(self, detector: SSDLiteDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.detector.forward_raw(x)


@dataclass
class DetectionExportReport:
    """What was written, in which form, and how it compares with the PyTorch detector."""

    path: Path
    format: str
    form: str
    fused_on_export: bool
    check: str = "not run"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"exported the {self.form} detector ({self.format}) to {self.path}"]
        if self.fused_on_export:
            lines.append("the detector had train-time branches and BatchNorms: fused it (eval mode) before exporting")
        lines.append(f"check: {self.check}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def fused_detector(model: SSDLiteDetector) -> tuple[SSDLiteDetector, bool]:
    """An eval-mode copy with everything folded, and whether folding was needed."""
    model = copy.deepcopy(model).eval()
    if model.inference_mode:
        return model, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reparameterize_model(model, inplace=True), True


def detector_metadata(model: SSDLiteDetector, form: str, max_detections: int) -> dict[str, Any]:
    """What an app needs beside the file: classes, preprocessing, the detector's settings, the outputs."""
    pre = model.preprocess
    outputs = (
        "boxes (B, A, 4) xyxy pixels of the input, scores (B, A, C) per class"
        if form == "raw"
        else f"boxes (B, {max_detections}, 4) xyxy pixels of the input, scores (B, {max_detections}), labels "
        f"(B, {max_detections}) 0-based or -1 for padding, num_detections (B,)"
    )
    return {
        "task": "detect",
        "form": form,
        "architecture": "SSDLite",
        "variant": f"ssdlite_{model.config.backbone.removeprefix('mobileone_')}",
        "fused": True,
        "detector": model.config.to_dict() | {"max_detections": max_detections},
        "class_names": model.class_names,
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "input_size": [3, model.config.img_size, model.config.img_size],
        "input_layout": "NCHW, RGB, float32, (x / 255 - mean) / std, resized to the square input",
        "outputs": outputs,
    }


def export_detector(
    model: SSDLiteDetector,
    out: str | Path,
    form: str = "raw",
    format: str | None = None,
    dynamic_batch: bool = False,
    max_detections: int | None = None,
    check: bool = True,
    check_inputs: Tensor | None = None,
    from_raw: str | Path | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> DetectionExportReport:
    """Fuse ``model``, export it in ``form`` (``raw`` to any target, ``nms`` ONNX only) and check the file.

    ``check_inputs`` are normalized images at the detector's size (default: real photographs);
    raises :class:`ExportError` when the exported file disagrees with PyTorch. ``from_raw``: the
    NMS form is built on this raw ONNX export of the same detector instead of exporting again.
    ``atol`` / ``rtol``: the raw form's check tolerance (``atol + rtol * max |output|``; default 1e-4 each).
    The file reaches ``out`` only once its check passed; a failed one is kept as ``NAME.failed.EXT``.
    """
    out, format = _target(Path(out), format, form, atol is not None or rtol is not None)
    max_detections = model.config.max_detections if max_detections is None else max_detections
    MAX_DETECTIONS.check("max_detections", max_detections)
    fused, fused_now = fused_detector(model)
    fused.config.max_detections = max_detections  # the copy's eager post-processing is what the check compares to
    size = fused.config.img_size
    example = torch.zeros(2 if dynamic_batch else 1, 3, size, size)
    meta = detector_metadata(fused, form, max_detections)
    report = DetectionExportReport(out, format, form, fused_now)
    if check and check_inputs is None:
        check_inputs = sample_images(4, size, meta["mean"], meta["std"])
    dynamic, t = "batch" if dynamic_batch else "none", target(format)

    def write(tmp: Path) -> None:
        with torch.inference_mode(False), torch.no_grad():
            if format == "onnx":
                _export_onnx(fused, tmp, example, form, dynamic, max_detections, meta, report, from_raw)
            elif form == "nms":  # OpenVINO reads the ONNX graph, NonMaxSuppression included
                with tempfile.TemporaryDirectory(prefix="mobileone_nms_") as folder:
                    onnx_nms = Path(folder) / "nms.onnx"
                    _export_onnx(fused, onnx_nms, example, form, dynamic, max_detections, meta, report, None)
                    t.module.convert_onnx(onnx_nms, tmp, meta)
            else:
                write_export(format, RawDetector(fused), tmp, example, meta, dynamic, RAW_OUTPUTS)

    def compare(tmp: Path) -> str:
        if form == "nms":
            return check_nms(format, tmp, fused, check_inputs, dynamic_batch)
        if format == "coreml" and not t.module.can_run():
            return t.module.check_structure(tmp, RawDetector(fused), example[:1])
        return check_raw(format, tmp, fused, check_inputs, dynamic_batch, atol, rtol)

    companions = lambda p: t.files(p)[1:]  # noqa: E731
    report.check = write_checked(out, write, compare if check else None, t.module.read_metadata, companions)
    report.check = report.check or "not run"
    return report


def _target(out: Path, format: str | None, form: str, tolerance: bool) -> tuple[Path, str]:
    """The file and format of an export (the suffix names the format), or a ValueError for what cannot be."""
    format = format or format_of(out) or "onnx"
    if format not in FORMATS:
        raise ValueError(f"detectors export to {list(FORMATS)}, not {format!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "nms" and format not in NMS_FORMATS:
        raise ValueError(
            f"the NMS form is for {list(NMS_FORMATS)} (runtimes with NonMaxSuppression); export --raw for {format}"
        )
    if form == "nms" and tolerance:
        raise ValueError(
            "--atol / --rtol set the raw form's tolerance; the NMS form's check matches the detections one to one "
            f"(labels equal, IoU >= {MIN_IOU}, scores within {SCORE_TOL})"
        )
    return (out if out.suffix == FORMATS[format] else out.with_suffix(FORMATS[format])), format


def _export_onnx(fused, out, example, form, dynamic, max_detections, meta, report, from_raw) -> None:
    onnx = require("onnx")
    if from_raw is None:
        write_export("onnx", RawDetector(fused), out, example, meta, dynamic, RAW_OUTPUTS)
    proto = onnx.load(str(from_raw or out))
    if form == "nms":
        c = fused.config
        kept = add_nms(
            proto,
            int(fused.anchors.shape[0]),
            c.num_classes,
            c.topk_candidates,
            c.nms_thresh,
            c.score_thresh,
            max_detections,
        )
        if kept < max_detections:
            report.notes.append(f"{kept} detections per image at most: fewer candidates than --max-detections")
            meta["detector"]["max_detections"] = kept
    set_onnx_metadata(proto, meta)
    onnx.save(proto, str(out))


# --- checks ---------------------------------------------------------------------------------------------------


def check_detector_outputs(
    got: list[Tensor], fused: SSDLiteDetector, x: Tensor, runtime: str, atol: float | None, rtol: float | None
) -> str:
    """The one comparison of an exported detector's raw outputs with PyTorch's ``forward_raw`` on ``x``."""
    atol, rtol = RAW_RTOL if atol is None else atol, RAW_RTOL if rtol is None else rtol
    with torch.no_grad():
        expected = fused.forward_raw(x)
    for name, e, g in zip(RAW_OUTPUTS, expected, got):
        diff = float((g.float() - e).abs().max())
        tol = atol + rtol * float(e.abs().max())
        if not diff <= tol:
            raise ExportError(
                f"{runtime}: raw output {name} differs from PyTorch by {diff:.3g} (tolerance {tol:.3g} "
                f"= {atol:g} + {rtol:g} x max |output|) on {len(x)} images; the file should not be deployed"
            )
    within = f"{rtol:.0e} relative + {atol:.0e} absolute".replace("e-0", "e-")
    return f"{runtime}, {len(x)} real images: raw boxes and scores equal PyTorch's within {within}"


def check_raw(
    format: str,
    path: Path,
    fused: SSDLiteDetector,
    x: Tensor,
    dynamic_batch: bool,
    atol: float | None = None,
    rtol: float | None = None,
) -> str:
    """Run the raw form at ``path`` in ``format``'s runtime on ``x`` and compare it with PyTorch."""
    got = run_export(format, load_export(format, path), x, dynamic_batch)
    return check_detector_outputs(got, fused, x, target(format).module.runtime_name(), atol, rtol)


def check_nms(format: str, path: Path, fused: SSDLiteDetector, x: Tensor, dynamic_batch: bool) -> str:
    """Run the NMS form in ``format``'s runtime and match its detections with PyTorch's, image by image."""
    outs = run_export(format, load_export(format, path), x, dynamic_batch)
    boxes, scores, labels, counts = (o.numpy() for o in outs)
    with torch.no_grad():
        raw = fused.forward_raw(x)
        expected = fused.postprocess(*raw)
    m = boxes.shape[1]
    total, borderline = 0, 0
    for i, e in enumerate(expected):
        n = int(counts[i])
        got = {
            "boxes": torch.from_numpy(boxes[i, :n]),
            "scores": torch.from_numpy(scores[i, :n]),
            "labels": torch.from_numpy(labels[i, :n]),
        }
        e = {k: v[:m] for k, v in e.items()}
        problems, exempt = compare_detections(e, got, fused.config.score_thresh, fused.config.nms_thresh, m)
        if problems:
            raise ExportError(
                f"{format} NMS detections of image {i} differ from PyTorch's ({len(e['scores'])} "
                f"vs {n}): {'; '.join(problems[:3])}; the file should not be deployed"
            )
        total += len(e["scores"])
        borderline += exempt
    note = f" ({borderline} at a score or IoU threshold within tolerance)" if borderline else ""
    return (
        f"{target(format).module.runtime_name()}, {len(x)} real images: the same {total} detections as "
        f"PyTorch (labels equal, IoU >= {MIN_IOU}, scores within {SCORE_TOL}){note}"
    )


def compare_detections(
    expected: dict[str, Tensor],
    got: dict[str, Tensor],
    score_thresh: float,
    nms_thresh: float,
    max_detections: int | None = None,
) -> tuple[list[str], int]:
    """Match two detection sets one to one (same label, IoU >= 0.99, score within 1e-4).

    Detections left unmatched are allowed only where rounding may legitimately decide: a score
    within the tolerance of the score threshold, of the last kept score when ``max_detections``
    cut the list (a tie at the cut-off), or an IoU within 1e-3 of the NMS threshold with a
    higher-scoring detection of the same class. Returns the problems (empty when the sets agree)
    and how many such borderline detections there were.
    """
    used = torch.zeros(len(got["scores"]), dtype=torch.bool)
    unmatched_e = []
    iou = box_iou(expected["boxes"].float(), got["boxes"].float()) if len(got["scores"]) else None
    for j in range(len(expected["scores"])):
        ok = torch.zeros(len(got["scores"]), dtype=torch.bool)
        if iou is not None:
            ok = (got["labels"] == expected["labels"][j]) & (iou[j] >= MIN_IOU) & ~used
            ok &= (got["scores"] - expected["scores"][j]).abs() <= SCORE_TOL
        if ok.any():
            used[int(ok.nonzero()[0])] = True
        else:
            unmatched_e.append(j)
    unmatched_g = (~used).nonzero().flatten().tolist()
    problems, exempt = [], 0
    for side, dets, idx in (("PyTorch", expected, unmatched_e), ("onnxruntime", got, unmatched_g)):
        full = max_detections is not None and len(dets["scores"]) >= max_detections
        last = float(dets["scores"].min()) if full else math.inf
        for j in idx:
            s = float(dets["scores"][j])
            if abs(s - score_thresh) <= SCORE_TOL or abs(s - last) <= SCORE_TOL or _near_nms(dets, j, nms_thresh):
                exempt += 1
                continue
            problems.append(
                f"{side} has label {int(dets['labels'][j])} score {s:.5f} box "
                f"{[round(v, 1) for v in dets['boxes'][j].tolist()]} that the other lacks"
            )
    return problems, exempt


def _near_nms(dets: dict[str, Tensor], j: int, nms_thresh: float) -> bool:
    """Whether detection ``j`` overlaps a higher-scoring one of its class at nearly the NMS threshold."""
    same = (dets["labels"] == dets["labels"][j]) & (dets["scores"] >= dets["scores"][j])
    same[j] = False
    if not same.any():
        return False
    iou = box_iou(dets["boxes"][j : j + 1].float(), dets["boxes"][same].float())[0]
    return bool(((iou - nms_thresh).abs() <= 1e-3).any())


def evaluate_onnx_detector(path: str | Path, data: str | Path, data_format: str = "auto") -> dict[str, Any]:
    """COCO mAP of an exported detector (raw or NMS form) in onnxruntime, on ``data``'s val split.

    The raw form's outputs go through the same post-processing as PyTorch's, with the settings
    stored in the file; the NMS form's detections are scored as they come out.
    """
    meta = read_onnx_metadata(path)
    if meta.get("task") != "detect" or meta.get("form") not in FORMS:
        raise ExportError(f"{path} is not a detector exported by mobileone export --task detect")
    config = DetectorConfig.from_dict(meta["detector"])
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    ds, loader = val_loader(
        data, data_format, config.img_size, meta["mean"], meta["std"], fixed if isinstance(fixed, int) else 16
    )
    if meta.get("class_names") and list(meta["class_names"]) != list(ds.classes):
        raise ExportError(f"{path} detects {meta['class_names'][:10]}, {data} has classes {ds.classes[:10]}")
    results, seen, bad = [], [], 0
    for x, targets, bad_paths in loader:
        bad += len(bad_paths)
        if x is None:
            continue
        if isinstance(fixed, int) and len(x) < fixed:  # a fixed-batch file: pad the last batch
            x = torch.cat([x, x[:1].expand(fixed - len(x), -1, -1, -1)])
        outs = [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]
        if meta["form"] == "raw":
            dets = postprocess(outs[0], outs[1], config)
        else:
            dets = [{"boxes": b[:n], "scores": s[:n], "labels": lab[:n]} for b, s, lab, n in zip(*outs[:3], outs[3])]
        for det, t in zip(dets, targets):
            h, w = t["size"]
            scale = torch.tensor([w / config.img_size, h / config.img_size] * 2)
            results.append((t["index"], det["boxes"].float() * scale, det["scores"].float(), det["labels"]))
            seen.append(t["index"])
    if not seen:
        raise ExportError(f"no validation image of {ds.source} could be read ({bad} unreadable)")
    metrics = detection_metrics(ds.records, ds.classes, results, seen)
    return {
        **metrics,
        "onnx": str(path),
        "form": meta["form"],
        "data": ds.source,
        "images": len(seen),
        "unreadable_images": bad,
        "img_size": config.img_size,
    }
