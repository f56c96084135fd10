"""Predictions on image files with exactly the preprocessing a checkpoint was trained with.

A checkpoint written by this library carries its classes and preprocessing (input size, crop
ratio, mean, std); :func:`preprocessing` turns them into the transform, so nobody rewrites it by
hand and gets it subtly wrong. Apple's files carry none: ImageNet's defaults apply.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ...core.checkpoint import load_checkpoint
from ..images import image_files
from .data import eval_transform, load_image


def preprocessing(source: str | os.PathLike | nn.Module | dict[str, Any]):
    """The evaluation transform (PIL image -> normalized tensor) of a checkpoint, model or metadata dict.

    Example:
        >>> transform = mobileone.preprocessing("runs/photos/best_fused.safetensors")
        >>> x = transform(PIL.Image.open("leaf.jpg").convert("RGB")).unsqueeze(0)
    """
    if isinstance(source, dict):
        meta = source
    else:
        model = source if isinstance(source, nn.Module) else load_checkpoint(source)
        meta = getattr(model, "preprocess", {}) or {}
    size = meta.get("input_size", 224)
    size = int(size[-1]) if isinstance(size, (list, tuple)) else int(size)
    return eval_transform(
        size,
        float(meta.get("crop_pct", 0.875)),
        tuple(meta.get("mean", (0.485, 0.456, 0.406))),
        tuple(meta.get("std", (0.229, 0.224, 0.225))),
    )


def top_k(probabilities: torch.Tensor, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of each row, as ``{"class", "index", "probability"}`` dicts."""
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [
        [{"class": classes[i], "index": i, "probability": float(v)} for v, i in zip(vs.tolist(), ix.tolist())]
        for vs, ix in zip(values, indices)
    ]


@torch.no_grad()
def predict(
    checkpoint: str | os.PathLike | nn.Module,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    topk: int = 5,
    batch_size: int = 32,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Classify image files with a checkpoint (fused or not) or a loaded MobileOne.

    Returns one dict per image: ``{"image": path, "top": [{"class", "index", "probability"}, ...]}``,
    or ``{"image": path, "error": ...}`` for a file that does not decode. Class names come from
    the checkpoint (indices as names when it has none).

    Example:
        >>> for r in mobileone.predict("runs/photos/best_fused.safetensors", "new_photos/", topk=3):
        ...     print(r["image"], r["top"][0]["class"])
    """
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
    model = checkpoint if isinstance(checkpoint, nn.Module) else load_checkpoint(checkpoint)
    model = model.to(device).eval()
    transform = preprocessing(model)
    classes = list(model.class_names or [str(i) for i in range(model.num_classes)])
    files = image_files(images)
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        batch, good = [], []
        for path in files[start : start + batch_size]:
            try:
                batch.append(transform(load_image(path)))
                good.append(path)
            except (OSError, ValueError, SyntaxError) as e:
                results.append({"image": str(path), "error": f"unreadable image: {e}"})
        if not batch:
            continue
        logits = model(torch.stack(batch).to(device)).float()
        if not torch.isfinite(logits).all():
            raise ValueError(f"{checkpoint} gives NaN or infinite outputs; the model is broken, not used")
        for path, top in zip(good, top_k(logits.softmax(1), classes, topk), strict=True):
            results.append({"image": str(path), "top": top})
    order = {str(p): i for i, p in enumerate(files)}
    return sorted(results, key=lambda r: order[r["image"]])
