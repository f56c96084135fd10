"""The task's metric of an exported file, measured by running the file in its own runtime.

Top-1 (classify), mAP@0.5 (detect) and mIoU (segment) of any export (fp32 or INT8) on the
validation split of the user's data, preprocessed from the file's own metadata: what ``quantize``
compares before and after INT8, in the runtime that will ship the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.task import require_finite
from ..tasks.detect.augment import to_image_pixels
from ..tasks.detect.evaluate import detection_metrics, val_loader
from ..tasks.detect.model import DetectorConfig, postprocess
from ..tasks.segment.data import SegmentationDataset, eval_transform, load_splits
from ..tasks.segment.evaluate import class_lut
from ..tasks.segment.metrics import confusion_matrix, segmentation_scores
from .common import ExportError, Runner
from .evaluate_onnx import image_folder
from .targets import format_of, load_export, read_metadata, run_export

METRICS = {"classify": "top1", "detect": "map_50", "segment": "miou"}


def runtime_metric(path: str | Path, data: str | os.PathLike, threads: int | None = None) -> dict[str, Any]:
    """``{"metric", "value", "images"}`` of the export at ``path`` on ``data``'s validation split, in its runtime."""
    format = format_of(path)
    if format is None:
        raise ValueError(f"{path} is not an export mobileone knows (suffix)")
    meta = read_metadata(path)
    task = meta.get("task", "classify")
    runner = load_export(format, path, threads)
    value, images = {"classify": _top1, "detect": _map50, "segment": _miou}[task](format, runner, meta, data)
    return {"task": task, "metric": METRICS[task], "value": value, "images": images, "runtime": format}


def _outputs(format: str, runner: Runner, x: Tensor) -> list[Tensor]:
    outs = run_export(format, runner, x, dynamic_batch=False)
    for o in outs:
        if o.is_floating_point():
            require_finite(o, f"the {format} export")
    return outs


def _top1(format: str, runner: Runner, meta: dict, data: Any) -> tuple[float, int]:
    ds = image_folder(data, "val", meta)
    hits, n = 0, 0
    for i in range(len(ds)):
        x, y = ds[i]
        if x is None:
            continue
        hits += int(_outputs(format, runner, x[None])[0].argmax(1).item() == y)
        n += 1
    if not n:
        raise ExportError(f"no image of {ds.root} could be read")
    return 100.0 * hits / n, n


def _map50(format: str, runner: Runner, meta: dict, data: Any) -> tuple[float, int]:
    config = DetectorConfig.from_dict(meta["detector"])
    ds, loader = val_loader(data, "auto", config.img_size, meta["mean"], meta["std"], 1)
    results, seen = [], []
    for x, targets, _ in loader:
        if x is None:
            continue
        boxes, scores = _outputs(format, runner, x)[:2]
        det, t = postprocess(boxes, scores, config)[0], targets[0]
        pixels = to_image_pixels(det["boxes"].float(), t["size"], config.img_size)
        results.append((t["index"], pixels, det["scores"].float(), det["labels"]))
        seen.append(t["index"])
    if not seen:
        raise ExportError(f"no validation image of {ds.source} could be read")
    return float(detection_metrics(ds.records, ds.classes, results, seen)["map_50"]), len(seen)


def _miou(format: str, runner: Runner, meta: dict, data: Any) -> tuple[float, int]:
    """Full-resolution masks; a file with a fixed input size sees each image resized to it, logits resized back."""
    samples, classes, _ = load_splits(data, "auto", splits=("val",))
    names, n = meta.get("class_names"), int(meta["num_classes"])
    ds = SegmentationDataset(
        samples["val"], classes, eval_transform(meta["mean"], meta["std"]), lut=class_lut(classes, names, n, str(data))
    )
    fixed = [int(s) for s in meta["input_size"][1:]] if isinstance(meta["input_size"][1], int) else None
    cm, images = torch.zeros(n, n, dtype=torch.int64), 0
    for i in range(len(ds)):
        x, y = ds[i]
        if x is None:
            continue
        size = tuple(x.shape[-2:])
        inp = F.interpolate(x[None], size=fixed, mode="bilinear", align_corners=False) if fixed else x[None]
        logits = _outputs(format, runner, inp)[0].float()
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        cm += confusion_matrix(logits.argmax(1), y[None], n)
        images += 1
    return float(segmentation_scores(cm, names or [str(i) for i in range(n)])["miou"]), images
