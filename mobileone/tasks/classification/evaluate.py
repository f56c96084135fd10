"""Top-1 / top-5 accuracy of a model or a checkpoint on an ImageFolder, with the standard eval transform."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...core.checkpoint import load_checkpoint
from ...engine.task import NonFiniteOutputError, require_finite
from .data import DataError, ImageFolderDataset, collate_skip_bad, eval_transform


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many rows have the label as their top-1 and among their top-5 logits."""
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(1).sum())


@torch.no_grad()
def accuracy_counts(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """``[images, top-1 correct, top-5 correct, unreadable images]`` as a float64 tensor (summable over ranks).

    ``loader`` yields ``(images, labels, bad_paths)`` as :func:`mobileone.data.collate_skip_bad` makes them.
    NaN or infinite logits raise :class:`NonFiniteOutputError` instead of being counted (the argmax
    of NaN logits is an arbitrary class).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    for x, y, bad in loader:
        counts[3] += len(bad)
        if x is None:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        require_finite(logits)
        top1, top5 = topk_hits(logits, y)
        counts[0] += len(y)
        counts[1] += top1
        counts[2] += top5
    model.train(was_training)
    return counts


def evaluate_checkpoint(
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    img_size: int | None = None,
    crop_pct: float | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate a fused or unfused checkpoint on ``data`` (a folder of class folders, or one with ``val/``).

    Image size and crop ratio default to those saved with the checkpoint. Classes are matched by
    name when the checkpoint records them, so a folder listing classes in another order still scores right.
    """
    root = Path(data)
    if (root / "val").is_dir():
        root = root / "val"
    model = load_checkpoint(checkpoint)
    size = img_size or int(model.preprocess.get("input_size", 224))
    pct = crop_pct or float(model.preprocess.get("crop_pct", 0.875))
    mean, std = tuple(model.preprocess["mean"]), tuple(model.preprocess["std"])
    ds = ImageFolderDataset(root, transform=eval_transform(size, pct, mean, std))
    if model.class_names is not None:
        unknown = sorted(set(ds.classes) - set(model.class_names))
        if unknown:
            raise DataError(f"{root} has class folders {unknown[:10]} that checkpoint {checkpoint} was not trained on "
                            f"(its classes: {model.class_names[:10]}...)")  # fmt: skip
        remap = {ds.class_to_idx[c]: model.class_names.index(c) for c in ds.classes}
        ds.samples = [(p, remap[t]) for p, t in ds.samples]
    elif len(ds.classes) > model.num_classes:
        raise DataError(f"{root} has {len(ds.classes)} classes but the model only {model.num_classes}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    model.to(dev)
    loader = DataLoader(ds, batch_size, num_workers=workers, collate_fn=collate_skip_bad, pin_memory=dev.type == "cuda")
    t0 = time.perf_counter()
    try:
        n, c1, c5, bad = accuracy_counts(model, loader, dev).tolist()
    except NonFiniteOutputError as e:
        raise NonFiniteOutputError(f"checkpoint {checkpoint} gives NaN or infinite outputs on {root}, so it is not "
                                   f"scored: its weights are broken (a diverged run?). Detail: {e}") from e  # fmt: skip
    if n == 0:
        raise DataError(f"none of the {int(bad)} images under {root} could be read; nothing was scored (see the "
                        "warnings above)")  # fmt: skip
    return {
        "checkpoint": str(checkpoint),
        "data": str(root),
        "fused": bool(model.inference_mode),
        "images": int(n),
        "top1": 100.0 * c1 / max(1.0, n),
        "top5": 100.0 * c5 / max(1.0, n),
        "unreadable_images": int(bad),
        "img_size": size,
        "crop_pct": pct,
        "seconds": time.perf_counter() - t0,
    }
