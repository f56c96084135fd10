"""Segmentation metrics from one confusion matrix: mIoU, pixel accuracy, per-class IoU.

The matrix is summed over images (and over ranks) before any ratio is taken, so the mIoU is the
dataset's, not a mean of per-image scores: the standard definition (Pascal VOC, torchmetrics'
``MulticlassJaccardIndex`` with ``average="macro"``). A class that appears neither in the masks nor
in the predictions has no IoU (0 / 0) and is left out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .model import IGNORE_INDEX


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows the true class, columns the predicted one.

    Pixels whose target is ``ignore_index`` are skipped; any other target outside the classes is an error.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and mask {tuple(target.shape)} differ in shape")
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = sorted({int(v) for v in target[(target < 0) | (target >= num_classes)].unique()[:10]})
        raise ValueError(
            f"mask values {bad} are neither classes 0..{num_classes - 1} nor the ignore index {ignore_index}"
        )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(cm: Tensor) -> Tensor:
    """IoU of each class in [0, 1], NaN where the class is in neither masks nor predictions."""
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def segmentation_scores(cm: Tensor, class_names: Sequence[str] | None = None) -> dict[str, object]:
    """``miou`` and ``pixel_acc`` in percent, ``per_class_iou`` by name (None: class absent), pixel counts."""
    cm = cm.cpu()
    iou = iou_per_class(cm)
    present = ~iou.isnan()
    total = int(cm.sum())
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(cm))]
    if len(names) != len(cm):
        raise ValueError(f"{len(names)} class names for a {len(cm)}-class confusion matrix")
    return {
        "miou": 100.0 * float(iou[present].mean()) if present.any() else math.nan,
        "pixel_acc": 100.0 * float(cm.diagonal().sum()) / total if total else math.nan,
        "per_class_iou": {n: (100.0 * float(v) if not math.isnan(v) else None) for n, v in zip(names, iou.tolist())},
        "pixels": total,
        "classes_present": int(present.sum()),
    }
