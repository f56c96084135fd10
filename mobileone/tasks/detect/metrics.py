"""COCO-style mAP: the ground truth and detections as COCO json, scored by faster-coco-eval or pycocotools.

Both run COCO's own protocol (IoU 0.50:0.95, 101-point interpolated precision, at most 100
detections per image, crowd regions ignored), so the numbers are comparable with published ones;
faster-coco-eval (the ``[detect]`` extra) is a C++ implementation of the same code, and the tests
hold it to pycocotools within 1e-4. Values come back in percent, like classification's top-1.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from .data import ImageRecord

BACKENDS = ("faster_coco_eval", "pycocotools")
# COCOeval's stats entries we report: mAP (IoU 0.50:0.95), at 0.5 and 0.75, per object size (small < 32^2 px,
# medium < 96^2, large; -1 there, reported as 0, when the set has no object of that size), recall at 100.
SUMMARY = {"map": 0, "map_50": 1, "map_75": 2, "map_small": 3, "map_medium": 4, "map_large": 5, "recall_100": 8}


def require(module: str, extra: str = "detect") -> Any:
    """Import a COCO evaluator, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module.split('.')[0]} is needed for COCO mAP and is not installed: pip install 'mobileone[{extra}]'"
        ) from e


def coco_ground_truth(records: Sequence[ImageRecord], classes: Sequence[str]) -> dict[str, Any]:
    """A COCO ground-truth dict: image ids are the records' indices, category ids 1..C in class order."""
    images, annotations = [], []
    for i, r in enumerate(records):
        images.append({"id": i, "width": r.width, "height": r.height, "file_name": r.path})
        for box, label, crowd in zip(r.boxes.tolist(), r.labels.tolist(), r.crowd.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": label + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": i + 1, "name": str(c)} for i, c in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(results: Iterable[tuple[int, Tensor, Tensor, Tensor]]) -> list[dict[str, Any]]:
    """COCO result entries from ``(image index, boxes xyxy, scores, 0-based labels)`` per image."""
    out = []
    for index, boxes, scores, labels in results:
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            out.append(
                {
                    "image_id": int(index),
                    "category_id": int(label) + 1,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": float(score),
                }
            )
    return out


def _evaluate(gt: dict[str, Any], dets: list[dict[str, Any]], backend: str) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's ``stats`` and ``precision`` array [IoU, recall, class, area, max detections]."""
    gt, dets = copy.deepcopy(gt), copy.deepcopy(dets)
    if backend == "faster_coco_eval":
        fce = require("faster_coco_eval", extra="detect")
        coco_gt = fce.COCO(gt)
        evaluator = fce.COCOeval_faster(coco_gt, coco_gt.loadRes(dets), "bbox", print_function=lambda *a, **k: None)
    else:
        coco = require("pycocotools.coco", extra="dev")
        cocoeval = require("pycocotools.cocoeval", extra="dev")
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = coco.COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            evaluator = cocoeval.COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats), np.asarray(evaluator.eval["precision"])


def default_backend() -> str:
    """faster-coco-eval when installed (the ``[detect]`` extra), else pycocotools."""
    for name in BACKENDS:
        try:
            require(name)
            return name
        except ImportError:
            continue
    raise ImportError("COCO mAP needs faster-coco-eval (pip install 'mobileone[detect]') or pycocotools")


def coco_map(
    gt: dict[str, Any], dets: list[dict[str, Any]], classes: Sequence[str], backend: str | None = None
) -> dict[str, Any]:
    """``map`` (IoU 0.50:0.95), ``map_50``, ``map_75``, ``map_small`` / ``map_medium`` / ``map_large``,
    ``recall_100`` (COCO's AR at 100 detections) and ``per_class`` AP, in percent.

    A class without ground-truth boxes has no AP (``None``); no detections at all score 0.
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not any(not a["iscrowd"] for a in gt["annotations"]):
        raise ValueError("the validation set has no (non-crowd) boxes: mAP is undefined; add annotated images")
    if not dets:
        present = {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
        per_class = {str(c): (0.0 if i + 1 in present else None) for i, c in enumerate(classes)}
        return {**dict.fromkeys(SUMMARY, 0.0), "per_class": per_class}
    stats, precision = _evaluate(gt, dets, backend)
    per_class = {}
    for k, name in enumerate(classes):
        p = precision[:, :, k, 0, -1]  # all IoUs and recalls, area "all", 100 detections
        per_class[str(name)] = float(100 * p[p > -1].mean()) if (p > -1).any() else None
    return {**{name: float(100 * max(stats[i], 0)) for name, i in SUMMARY.items()}, "per_class": per_class}
