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
  ``num_detections`` (B,). These are the steps of ``Detector.postprocess``; the check
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
from ..tasks.detect.augment import to_image_pixels
from ..tasks.detect.evaluate import detection_metrics, val_loader
from ..tasks.detect.model import Detector, DetectorConfig, postprocess
from .common import ExportError, require, write_checked
from .export import sample_images
from .onnx import onnx_session, read_onnx_metadata, set_onnx_metadata
from .onnx_nms import add_nms
from .targets import FORMATS, format_of, load_export, run_export, target, write_export

FORMS = ("raw", "nms")
NMS_FORMATS = ("onnx", "openvino")  # the runtimes whose NonMaxSuppression matches ONNX's
RAW_OUTPUTS = ["boxes", "scores"]
NMS_OUTPUTS = ["boxes", "scores", "labels", "num_detections"]
RAW_RTOL, SCORE_TOL, MIN_IOU, NMS_TOL = 1e-4, 1e-4, 0.99, 1e-3
BORDERLINE_SHARE = 0.1  # at most this share of an image's detections may differ at threshold ties


class RawDetector(nn.Module):
    """A detector's ``forward_raw`` as a module's forward: what the exporters trace."""

    def __init__(self, detector: Detector) -> None:
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


def fused_detector(model: Detector) -> tuple[Detector, bool]:
    """An eval-mode copy with everything folded, and whether folding was needed."""
    model = copy.deepcopy(model).eval()
    if model.inference_mode:
        return model, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reparameterize_model(model, inplace=True), True


def detector_metadata(model: Detector, form: str, max_detections: int) -> dict[str, Any]:
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
        "architecture": {"tal": "anchor-free, task-aligned (tal)", "ssdlite": "SSDLite"}[model.config.head],
        "variant": f"{model.config.head}_{model.config.backbone.removeprefix('mobileone_')}",
        "fused": True,
        "detector": model.config.to_dict() | {"max_detections": max_detections},
        "class_names": model.class_names,
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "input_size": [3, model.config.img_size, model.config.img_size],
        "input_layout": "NCHW, RGB, float32, (x / 255 - mean) / std, letterboxed: long side resized to the input, "
        "aspect kept, padded right and bottom with the mean colour",
        "outputs": outputs,
    }


def export_detector(
    model: Detector,
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
            int(fused.forward_raw(example)[0].shape[1]),
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
    got: list[Tensor], fused: Detector, x: Tensor, runtime: str, atol: float | None, rtol: float | None
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
    fused: Detector,
    x: Tensor,
    dynamic_batch: bool,
    atol: float | None = None,
    rtol: float | None = None,
) -> str:
    """Run the raw form at ``path`` in ``format``'s runtime on ``x`` and compare it with PyTorch."""
    got = run_export(format, load_export(format, path), x, dynamic_batch)
    return check_detector_outputs(got, fused, x, target(format).module.runtime_name(), atol, rtol)


def check_nms(format: str, path: Path, fused: Detector, x: Tensor, dynamic_batch: bool) -> str:
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
        candidates = (raw[0][i], raw[1][i])
        problems, exempt = compare_detections(e, got, fused.config.score_thresh, fused.config.nms_thresh, m, candidates)
        if problems:
            raise ExportError(
                f"{format} NMS detections of image {i} differ from PyTorch's ({len(e['scores'])} "
                f"vs {n}): {'; '.join(problems[:3])}; the file should not be deployed"
            )
        total += len(e["scores"])
        borderline += exempt
    note = f" but {borderline} decided differently at a score or NMS threshold tie" if borderline else ""
    return (
        f"{target(format).module.runtime_name()}, {len(x)} real images: every exported detection is one of "
        f"PyTorch's raw candidates, and the same {total} detections as PyTorch (labels equal, IoU >= {MIN_IOU}, "
        f"scores within {SCORE_TOL}){note}"
    )


def compare_detections(
    expected: dict[str, Tensor],
    got: dict[str, Tensor],
    score_thresh: float,
    nms_thresh: float,
    max_detections: int | None = None,
    candidates: tuple[Tensor, Tensor] | None = None,
) -> tuple[list[str], int]:
    """Compare two detection sets of one image: the one check behind every exported detector's NMS form.

    1. With ``candidates`` (PyTorch's raw boxes (A, 4) and scores (A, C) of that image), every
       detection of ``got`` must be one of them: a box at IoU >= 0.99 whose score for the detection's
       label is within 1e-4. A wrong box decoding, swapped coordinates or a shifted class fail here.
    2. The sets are matched one to one (same label, IoU >= 0.99, score within 1e-4). A detection
       left unmatched is allowed only where two correct NMS implementations may legitimately decide
       otherwise: its score within the tolerance of the score threshold or of the last kept score when
       ``max_detections`` cut the list, or the other set holds a higher-scoring detection of its class
       overlapping it at IoU >= ``nms_thresh`` - 1e-3 (one suppression decided at the threshold, and
       what it cascades to). At most a tenth of the detections may be settled that way.

    Returns the problems (empty when the sets agree) and how many borderline detections there were.
    """
    problems = _not_candidates(got, candidates) if candidates is not None else []
    matched_e, matched_g = _match(expected, got)
    exempt = 0
    for side, dets, other, matched in (("PyTorch", expected, got, matched_e), ("the export", got, expected, matched_g)):
        full = max_detections is not None and len(dets["scores"]) >= max_detections
        last = float(dets["scores"].min()) if full else math.inf
        for j in (~matched).nonzero().flatten().tolist():
            s = float(dets["scores"][j])
            if (
                abs(s - score_thresh) <= SCORE_TOL
                or abs(s - last) <= SCORE_TOL
                or _suppressed_by(dets, j, other, nms_thresh)
            ):
                exempt += 1
                continue
            problems.append(
                f"{side} has label {int(dets['labels'][j])} score {s:.5f} box "
                f"{[round(v, 1) for v in dets['boxes'][j].tolist()]} that the other lacks"
            )
    total = max(len(expected["scores"]), len(got["scores"]))
    if exempt > max(2, BORDERLINE_SHARE * total):
        problems.append(f"{exempt} of {total} detections differ, more than threshold ties explain")
    return problems, exempt


def _match(expected: dict[str, Tensor], got: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Greedy one-to-one matching (same label, IoU >= MIN_IOU, score within SCORE_TOL); matched flags of each side."""
    matched_e = torch.zeros(len(expected["scores"]), dtype=torch.bool)
    matched_g = torch.zeros(len(got["scores"]), dtype=torch.bool)
    if not len(got["scores"]) or not len(expected["scores"]):
        return matched_e, matched_g
    iou = box_iou(expected["boxes"].float(), got["boxes"].float())
    ok = (expected["labels"][:, None] == got["labels"][None]) & (iou >= MIN_IOU)
    ok &= (expected["scores"][:, None].float() - got["scores"][None].float()).abs() <= SCORE_TOL
    for j in ok.any(1).nonzero().flatten().tolist():
        free = ok[j] & ~matched_g
        if free.any():
            matched_g[int(free.nonzero()[0])] = True
            matched_e[j] = True
    return matched_e, matched_g


def _suppressed_by(dets: dict[str, Tensor], j: int, other: dict[str, Tensor], nms_thresh: float) -> bool:
    """Whether ``other`` holds a higher-scoring detection of ``j``'s class overlapping it at about the NMS threshold
    or more: the other implementation suppressed ``j`` (directly at a tie, or as a consequence of one)."""
    same = (other["labels"] == dets["labels"][j]) & (other["scores"] >= dets["scores"][j] - SCORE_TOL)
    if not same.any():
        return False
    iou = box_iou(dets["boxes"][j : j + 1].float(), other["boxes"][same].float())[0]
    return bool((iou >= nms_thresh - NMS_TOL).any())


def _not_candidates(got: dict[str, Tensor], candidates: tuple[Tensor, Tensor]) -> list[str]:
    """The detections of ``got`` that are none of the raw candidates (box IoU >= MIN_IOU, same label's score)."""
    boxes, scores = candidates
    if not len(got["scores"]):
        return []
    labels = got["labels"].long()
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        return [f"labels outside 0..{scores.shape[1] - 1}: {sorted(set(labels.tolist()))[:5]}"]
    iou = box_iou(got["boxes"].float(), boxes.float())  # (K, A)
    close = (scores.t()[labels].float() - got["scores"][:, None].float()).abs() <= SCORE_TOL
    bad = (~((iou >= MIN_IOU) & close).any(1)).nonzero().flatten().tolist()
    return [
        f"the export has label {int(labels[j])} score {float(got['scores'][j]):.5f} box "
        f"{[round(v, 1) for v in got['boxes'][j].tolist()]} that is none of PyTorch's raw candidates"
        for j in bad[:3]
    ] + ([f"... {len(bad)} such detections in all"] if len(bad) > 3 else [])


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
            pixels = to_image_pixels(det["boxes"].float(), t["size"], config.img_size)
            results.append((t["index"], pixels, det["scores"].float(), det["labels"]))
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
