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

ExecuTorch and Core ML take the raw form (their runtimes have no NMS operator to match ONNX's).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..core.fusion import reparameterize_model
from ..core.ranges import MAX_DETECTIONS
from ..tasks.detection.augment import to_image_pixels
from ..tasks.detection.evaluate import detection_metrics, val_loader
from ..tasks.detection.model import Detector, DetectorConfig, postprocess
from .common import ExportError, package_version, require, write_checked
from .coreml import coreml_op_counts, read_coreml_metadata
from .executorch import executorch_method, read_executorch_metadata, to_executorch
from .export import sample_images
from .onnx import onnx_session, read_onnx_metadata, set_onnx_metadata, to_onnx

FORMS = ("raw", "nms")
FORMATS = {"onnx": ".onnx", "executorch": ".pte", "coreml": ".mlpackage"}
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


def add_nms(
    proto: Any,
    num_anchors: int,
    num_classes: int,
    topk: int,
    nms_thresh: float,
    score_thresh: float,
    max_detections: int,
) -> int:
    """Append per-class NMS to a raw graph (outputs ``boxes``, ``scores``) in place; returns M, the detections kept.

    M is ``max_detections``, or fewer when the candidates (classes x ``topk``) are fewer.
    """
    onnx = require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    k = min(topk, num_anchors)
    m = min(max_detections, num_classes * k)
    graph = proto.graph
    rename = {"boxes": "raw_boxes", "scores": "raw_scores"}
    for node in graph.node:
        node.output[:] = [rename.get(o, o) for o in node.output]
        node.input[:] = [rename.get(i, i) for i in node.input]
    del graph.output[:]

    def const(name: str, value: Any, dtype: Any = np.int64) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"nms_{name}"))
        return f"nms_{name}"

    def node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        graph.node.append(helper.make_node(op, inputs, outputs, name=f"nms_{outputs[0]}", **attrs))

    node("Transpose", ["raw_scores"], ["scores_t"], perm=[0, 2, 1])  # (B, C, A)
    node("TopK", ["scores_t", const("k", [k])], ["top_s", "top_i"], axis=-1)  # (B, C, k) per class
    node("Unsqueeze", ["raw_boxes", const("ax1", [1])], ["boxes_u"])  # (B, 1, A, 4)
    node("Shape", ["scores_t"], ["shape_bca"])
    node("Concat", ["shape_bca", const("four", [4])], ["shape_bca4"], axis=0)
    node("Expand", ["boxes_u", "shape_bca4"], ["boxes_e"])  # (B, C, A, 4)
    node("Unsqueeze", ["top_i", const("ax3", [3])], ["top_i_u"])
    node("Shape", ["top_i"], ["shape_bck"])
    node("Concat", ["shape_bck", "nms_four"], ["shape_bck4"], axis=0)
    node("Expand", ["top_i_u", "shape_bck4"], ["top_i_e"])
    node("GatherElements", ["boxes_e", "top_i_e"], ["cand"], axis=2)  # (B, C, k, 4) candidates per class
    node("Reshape", ["cand", const("shape_nk4", [-1, k, 4])], ["cand_r"])  # classes as NMS batches
    node("Reshape", ["top_s", const("shape_n1k", [-1, 1, k])], ["top_s_r"])
    node(
        "NonMaxSuppression",
        [
            "cand_r",
            "top_s_r",
            const("max_per_class", [k]),
            const("iou", [nms_thresh], np.float32),
            const("score", [score_thresh], np.float32),
        ],
        ["selected"],
        center_point_box=0,
    )
    node("Gather", ["selected", const("col0", 0)], ["sel_bc"], axis=1)
    node("Gather", ["selected", const("col2", 2)], ["sel_j"], axis=1)
    node("Mul", ["sel_bc", const("k_scalar", k)], ["sel_off"])
    node("Add", ["sel_off", "sel_j"], ["sel_pos"])  # position in the flat (B * C * k) candidates
    node("Reshape", ["top_s", const("flat", [-1])], ["flat_s"])
    node("Gather", ["flat_s", "sel_pos"], ["sel_s"], axis=0)
    node("Shape", ["flat_s"], ["flat_shape"])
    graph.node.append(
        helper.make_node(
            "ConstantOfShape",
            ["flat_shape"],
            ["minus_one"],
            name="nms_minus_one",
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-1.0]),
        )
    )
    node("ScatterElements", ["minus_one", "sel_pos", "sel_s"], ["kept_s"], axis=0)  # -1 where suppressed
    node("Reshape", ["kept_s", const("shape_bck_flat", [-1, num_classes * k])], ["kept_b"])
    node("TopK", ["kept_b", const("m", [m])], ["det_s", "det_i"], axis=1)  # (B, M) best overall
    node("Div", ["det_i", "nms_k_scalar"], ["det_label"])
    node("Reshape", ["cand", const("shape_bck4_flat", [0, num_classes * k, 4])], ["cand_b"])
    node("Unsqueeze", ["det_i", const("ax2", [2])], ["det_i_u"])
    node("Shape", ["det_i"], ["shape_bm"])
    node("Concat", ["shape_bm", "nms_four"], ["shape_bm4"], axis=0)
    node("Expand", ["det_i_u", "shape_bm4"], ["det_i_e"])
    node("GatherElements", ["cand_b", "det_i_e"], ["det_b"], axis=1)
    node("Greater", ["det_s", const("half", -0.5, np.float32)], ["valid"])
    node("Where", ["valid", "det_s", const("zero_f", 0.0, np.float32)], ["scores"])
    node("Where", ["valid", "det_label", const("minus_one_i", -1)], ["labels"])
    node("Unsqueeze", ["valid", "nms_ax2"], ["valid_u"])
    node("Where", ["valid_u", "det_b", "nms_zero_f"], ["boxes"])
    node("Cast", ["valid"], ["valid_i"], to=TensorProto.INT64)
    node("ReduceSum", ["valid_i", "nms_ax1"], ["num_detections"], keepdims=0)
    graph.output.extend(
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", m, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", m]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", m]),
            helper.make_tensor_value_info("num_detections", TensorProto.INT64, ["batch"]),
        ]
    )
    del graph.value_info[:]  # shapes inferred for the old outputs no longer hold
    onnx.checker.check_model(proto)
    return m


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
    """Fuse ``model``, export it in ``form`` (``raw`` or ``nms``, ONNX only) and check the file.

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

    def write(tmp: Path) -> None:
        with torch.inference_mode(False), torch.no_grad():
            if format == "onnx":
                _export_onnx(fused, tmp, example, form, dynamic_batch, max_detections, meta, report, from_raw)
            elif format == "executorch":
                constants = {
                    "mobileone_metadata": json.dumps(meta),
                    **{k: meta[k] for k in ("mean", "std", "input_size")},
                }
                to_executorch(RawDetector(fused).eval(), tmp, example, dynamic_batch, constants)
            else:
                _export_coreml(fused, tmp, example, meta)

    def compare(tmp: Path) -> str:
        tolerance = {} if form == "nms" else {"atol": atol, "rtol": rtol}
        return CHECKS[(format, form)](tmp, fused, check_inputs, dynamic_batch, **tolerance)

    report.check = write_checked(out, write, compare if check else None, READERS[format]) or "not run"
    return report


def _target(out: Path, format: str | None, form: str, tolerance: bool) -> tuple[Path, str]:
    """The file and format of an export (the suffix names the format), or a ValueError for what cannot be."""
    format = format or next((f for f, s in FORMATS.items() if out.suffix == s), "onnx")
    if format not in FORMATS:
        raise ValueError(f"detectors export to {list(FORMATS)}, not {format!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "nms" and format != "onnx":
        raise ValueError(f"the NMS form is ONNX only (NonMaxSuppression); export --raw for {format}")
    if form == "nms" and tolerance:
        raise ValueError(
            "--atol / --rtol set the raw form's tolerance; the NMS form's check matches the detections one to one "
            f"(labels equal, IoU >= {MIN_IOU}, scores within {SCORE_TOL})"
        )
    return (out if out.suffix == FORMATS[format] else out.with_suffix(FORMATS[format])), format


def _export_onnx(fused, out, example, form, dynamic_batch, max_detections, meta, report, from_raw) -> None:
    onnx = require("onnx")
    if from_raw is None:
        to_onnx(RawDetector(fused).eval(), out, example, dynamic_batch, output_names=RAW_OUTPUTS)
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


def _export_coreml(fused: Detector, out: Path, example: Tensor, meta: dict[str, Any]) -> None:
    ct = require("coremltools")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(RawDetector(fused).eval(), example)
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name="input", shape=tuple(example.shape))],
            outputs=[ct.TensorType(name=n) for n in RAW_OUTPUTS],
            convert_to="mlprogram",
        )
    mlmodel.short_description = f"{meta['variant']} (fused {meta['architecture']}, raw outputs: {meta['outputs']})"
    for key, value in meta.items():
        mlmodel.user_defined_metadata[key] = json.dumps(value)
    if out.exists():
        shutil.rmtree(out)
    mlmodel.save(str(out))


# --- checks ---------------------------------------------------------------------------------------------------


def _check_raw(
    got: list[Tensor], fused: Detector, x: Tensor, runtime: str, atol: float | None, rtol: float | None
) -> str:
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


def _run_onnx(path: Path, x: Tensor, dynamic_batch: bool) -> list[list[np.ndarray]]:
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    if dynamic_batch:
        return [session.run(None, {name: x.numpy()})]
    return [session.run(None, {name: x[i : i + 1].numpy()}) for i in range(len(x))]


def check_onnx_raw(path: Path, fused: Detector, x: Tensor, dynamic_batch: bool, atol=None, rtol=None) -> str:
    runs = _run_onnx(path, x, dynamic_batch)
    got = [torch.cat([torch.from_numpy(r[i]) for r in runs]) for i in range(2)]
    return _check_raw(got, fused, x, f"onnxruntime {package_version('onnxruntime')}", atol, rtol)


def check_onnx_nms(path: Path, fused: Detector, x: Tensor, dynamic_batch: bool) -> str:
    runs = _run_onnx(path, x, dynamic_batch)
    boxes, scores, labels, counts = (np.concatenate([r[i] for r in runs]) for i in range(4))
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
                f"onnxruntime NMS detections of image {i} differ from PyTorch's ({len(e['scores'])} "
                f"vs {n}): {'; '.join(problems[:3])}; the file should not be deployed"
            )
        total += len(e["scores"])
        borderline += exempt
    note = f" but {borderline} decided differently at a score or NMS threshold tie" if borderline else ""
    return (
        f"onnxruntime {package_version('onnxruntime')}, {len(x)} real images: every exported detection is one of "
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


def check_executorch_raw(path: Path, fused: Detector, x: Tensor, dynamic_batch: bool, atol=None, rtol=None) -> str:
    method = executorch_method(path)
    batches = [x] if dynamic_batch else [x[i : i + 1] for i in range(len(x))]
    outs = [method.execute([b.contiguous()]) for b in batches]
    got = [torch.cat([o[i] for o in outs]) for i in range(2)]
    return _check_raw(got, fused, x, f"ExecuTorch {package_version('executorch')} (XNNPACK)", atol, rtol)


def check_coreml_raw(path: Path, fused: Detector, x: Tensor, dynamic_batch: bool, atol=None, rtol=None) -> str:
    ops = coreml_op_counts(path)
    convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    if ops.get("batch_norm", 0) or ops.get("conv", 0) != convs:
        raise ExportError(
            f"{path} holds {ops.get('conv', 0)} convs and {ops.get('batch_norm', 0)} batch norms; the "
            f"fused detector has {convs} convs and none"
        )
    if sys.platform != "darwin":
        return f"structural only ({ops['conv']} convs, no batch norm): Core ML prediction needs macOS"
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(path))
    outs = [mlmodel.predict({"input": x[i : i + 1].numpy()}) for i in range(len(x))]
    got = [torch.cat([torch.from_numpy(np.asarray(o[n])) for o in outs]) for n in RAW_OUTPUTS]
    with torch.no_grad():
        expected = fused.forward_raw(x)
    diff = max(float((g.float() - e).abs().max()) for g, e in zip(got, expected))
    return f"Core ML {package_version('coremltools')} (float16 compute): max |difference| {diff:.3g}"


READERS = {"onnx": read_onnx_metadata, "executorch": read_executorch_metadata, "coreml": read_coreml_metadata}
CHECKS = {
    ("onnx", "raw"): check_onnx_raw,
    ("onnx", "nms"): check_onnx_nms,
    ("executorch", "raw"): check_executorch_raw,
    ("coreml", "raw"): check_coreml_raw,
}


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
