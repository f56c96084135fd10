"""Evaluating a detector: COCO mAP overall, per object size and per class, and recall at 100 detections.

``mobileone eval --task detect`` and every epoch of training score detections here: the validation
images are letterboxed to the detector's input (aspect kept), the detections mapped back to each
image's own pixels, and COCO's protocol run on them (``metrics.coco_map``). Per-size mAP (small
< 32^2 px, medium < 96^2, large) and recall at 100 detections say *why* a detector is weak:
missed small objects, or boxes found but ranked or placed badly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ...engine.distributed import pick_device
from ...engine.task import DataError, require_finite
from .augment import letterbox_transform, to_image_pixels
from .data import DetectionDataset, collate_detection, load_splits
from .metrics import coco_detections, coco_ground_truth, coco_map
from .model import Detector, load_detector


@torch.no_grad()
def predict_loader(
    model: Detector, loader: Any, device: torch.device, what: str = "the detector"
) -> tuple[list, list[int], int]:
    """Detections in the pixels of each image file: ``[(index, boxes, scores, labels)]``, the indices
    seen, and the number of unreadable images. ``model`` is put in eval mode and restored after;
    NaN or infinite outputs raise ``NonFiniteOutputError`` naming ``what``."""
    was_training = model.training
    model.eval()
    size = model.config.img_size
    results, seen, bad = [], [], 0
    try:
        for x, targets, bad_paths in loader:
            bad += len(bad_paths)
            if x is None:
                continue
            boxes, scores = model.forward_raw(x.to(device))
            require_finite((boxes, scores), what)
            for det, t in zip(model.postprocess(boxes, scores), targets):
                pixels = to_image_pixels(det["boxes"].float().cpu(), t["size"], size)
                results.append((t["index"], pixels, det["scores"].float().cpu(), det["labels"].cpu()))
                seen.append(t["index"])
    finally:
        model.train(was_training)
    return results, seen, bad


def detection_metrics(records: Sequence[Any], classes: Sequence[str], results: list, seen: Sequence[int]) -> dict:
    """COCO mAP (percent) of ``results`` against the images in ``seen`` (unreadable ones are left out)."""
    kept = sorted(set(seen))
    remap = {old: new for new, old in enumerate(kept)}
    gt = coco_ground_truth([records[i] for i in kept], classes)
    dets = coco_detections((remap[i], b, s, lab) for i, b, s, lab in results)
    return coco_map(gt, dets, classes)


def val_loader(
    root: str | Path,
    data_format: str,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 16,
    workers: int = 0,
) -> tuple[DetectionDataset, DataLoader]:
    """The validation split of a dataset folder at a detector's input size, and its loader."""
    _, split = load_splits(root, data_format)
    ds = DetectionDataset(split, letterbox_transform(img_size, mean, std))
    loader = DataLoader(ds, batch_size, shuffle=False, num_workers=workers, collate_fn=collate_detection)
    return ds, loader


def evaluate_detector(
    checkpoint: str | Path,
    data: str | Path,
    data_format: str = "auto",
    batch_size: int = 16,
    workers: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """COCO mAP (percent, with AP per class) of a detector checkpoint, fused or not, on ``data``'s val split."""
    model = load_detector(checkpoint)
    dev = pick_device(device)
    ds, loader = val_loader(
        data, data_format, model.config.img_size, model.preprocess["mean"], model.preprocess["std"], batch_size, workers
    )
    if model.class_names and list(model.class_names) != list(ds.classes):
        raise DataError(
            f"{checkpoint} was trained on classes {model.class_names[:10]}, {data} has {ds.classes[:10]}; "
            "evaluate on data with the same class list"
        )
    results, seen, bad = predict_loader(model.to(dev), loader, dev, f"{checkpoint}")
    if not seen:
        raise DataError(f"no validation image of {ds.source} could be read ({bad} unreadable)")
    metrics = detection_metrics(ds.records, ds.classes, results, seen)
    return {
        **metrics,
        "checkpoint": str(checkpoint),
        "data": str(ds.source),
        "fused": model.inference_mode,
        "images": len(seen),
        "unreadable_images": bad,
        "img_size": model.config.img_size,
    }
