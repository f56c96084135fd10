"""mIoU of a segmenter or a checkpoint over full-resolution masks: one confusion matrix for the whole set."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...engine.distributed import eval_loader, pick_device
from ...engine.task import DataError, require_finite
from .data import SegmentationDataset, collate_masks, eval_transform, load_splits
from .metrics import confusion_matrix, segmentation_scores
from .model import IGNORE_INDEX, load_segmenter


def predict(model: nn.Module, x: Tensor, size: int | None = None) -> Tensor:
    """Class logits at the input's resolution; with ``size`` the forward runs at that short side, upsampled back."""
    h, w = x.shape[-2:]
    if size is None or min(h, w) == size:
        return model(x)["out"]
    scale = size / min(h, w)
    small = F.interpolate(
        x,
        size=(max(1, round(h * scale)), max(1, round(w * scale))),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return F.interpolate(model(small)["out"], size=(h, w), mode="bilinear", align_corners=False)


@torch.no_grad()
def confusion_over(
    model: nn.Module,
    loader: Any,
    num_classes: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    size: int | None = None,
) -> tuple[Tensor, int]:
    """(confusion matrix, unreadable images) over ``loader``'s ``(images, masks, bad_paths)`` batches.

    The model is put in eval mode and its previous mode restored. Lists of differently sized
    images (see ``collate_masks``) are run one by one, each at its own resolution.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    bad = 0
    try:
        for x, y, bad_paths in loader:
            bad += len(bad_paths)
            if x is None:
                continue
            pairs = [(x, y)] if isinstance(x, Tensor) else [(xi[None], yi[None]) for xi, yi in zip(x, y)]
            for xb, yb in pairs:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = predict(model, xb, size)
                require_finite(logits, "the segmenter")
                cm += confusion_matrix(logits.argmax(1), yb, num_classes)
    finally:
        model.train(was_training)
    return cm, bad


def class_lut(data_classes: list[str], model_classes: list[str] | None, num_classes: int, where: str) -> np.ndarray:
    """A 256-entry map from the data's mask values to the model's class indices (matched by name)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if model_classes is None or data_classes == model_classes:
        if len(data_classes) > num_classes:
            raise DataError(f"{where} has {len(data_classes)} classes, the model only {num_classes}")
        lut[: len(data_classes)] = np.arange(len(data_classes))
        return lut
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        raise DataError(
            f"{where} has classes {unknown[:10]} the model was not trained on (its classes: "
            f"{model_classes[:10]}{'...' if len(model_classes) > 10 else ''})"
        )
    for i, c in enumerate(data_classes):
        lut[i] = model_classes.index(c)
    return lut


def evaluate_checkpoint(
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    split: str = "val",
    data_format: str = "auto",
    size: int | None = None,
    batch_size: int = 1,
    workers: int = 2,
    device: str = "auto",
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of a fused or unfused checkpoint on the ``split`` of ``data``.

    Images are evaluated at their own resolution against their full-resolution masks (``size``: run
    the model at that short side instead and upsample the logits back). Classes are matched by name
    when the data's and the checkpoint's lists differ in order.
    """
    model = load_segmenter(checkpoint)
    samples, classes, fmt = load_splits(data, data_format, splits=(split,))
    lut = class_lut(classes, model.class_names, model.num_classes, f"{data} ({split})")
    pre = model.preprocess
    ds = SegmentationDataset(samples[split], classes, eval_transform(pre["mean"], pre["std"]), lut=lut)
    dev = pick_device(device)
    model.to(dev)
    loader = eval_loader(ds, batch_size, workers, collate_masks, dev)
    t0 = time.perf_counter()
    cm, bad = confusion_over(model, loader, model.num_classes, dev, size=size)
    scores = segmentation_scores(cm, model.class_names or [str(i) for i in range(model.num_classes)])
    if scores["pixels"] == 0:
        raise DataError(
            f"no pixel of {data} ({split}) could be scored ({bad} unreadable images; every other pixel "
            f"is {IGNORE_INDEX}, ignore)"
        )
    return {
        "checkpoint": str(checkpoint),
        "model": model.name,
        "data": str(Path(data)),
        "format": fmt,
        "split": split,
        "fused": bool(model.inference_mode),
        **scores,
        "images": len(ds) - bad,
        "unreadable_images": bad,
        "size": size or "full resolution",
        "seconds": time.perf_counter() - t0,
    }
