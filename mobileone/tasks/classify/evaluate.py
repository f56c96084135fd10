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
from ...core.files import atomic_write
from ...engine.distributed import eval_loader, pick_device
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
    confusion: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[images, top-1 correct, top-5 correct, unreadable images]`` as a float64 tensor (summable over ranks).

    ``loader`` yields ``(images, labels, bad_paths)`` as :func:`mobileone.data.collate_skip_bad` makes them.
    NaN or infinite logits raise :class:`NonFiniteOutputError` instead of being counted (the argmax
    of NaN logits is an arbitrary class). ``confusion`` (classes x classes, rows the true class,
    columns the top-1 prediction), when given, is added to.
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
        if confusion is not None:
            k = confusion.shape[0]
            confusion += torch.bincount(y.cpu() * k + logits.argmax(1).cpu(), minlength=k * k).view(k, k)
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
            raise DataError(
                f"{root} has class folders {unknown[:10]} that checkpoint {checkpoint} was not trained on "
                f"(its classes: {model.class_names[:10]}...)"
            )
        remap = {ds.class_to_idx[c]: model.class_names.index(c) for c in ds.classes}
        ds.samples = [(p, remap[t]) for p, t in ds.samples]
    elif len(ds.classes) > model.num_classes:
        raise DataError(f"{root} has {len(ds.classes)} classes but the model only {model.num_classes}")
    dev = pick_device(device)
    model.to(dev)
    loader = eval_loader(ds, batch_size, workers, collate_skip_bad, dev)
    t0 = time.perf_counter()
    confusion = torch.zeros(model.num_classes, model.num_classes, dtype=torch.int64)
    try:
        n, c1, c5, bad = accuracy_counts(model, loader, dev, confusion=confusion).tolist()
    except NonFiniteOutputError as e:
        raise NonFiniteOutputError(
            f"checkpoint {checkpoint} gives NaN or infinite outputs on {root}, so it is not "
            f"scored: its weights are broken (a diverged run?). Detail: {e}"
        ) from e
    if n == 0:
        raise DataError(
            f"none of the {int(bad)} images under {root} could be read; nothing was scored (see the warnings above)"
        )
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
        **per_class_results(confusion, model.class_names or [str(i) for i in range(model.num_classes)]),
    }


def per_class_results(confusion: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Per-class top-1 and the confusion matrix (rows: true class, columns: prediction) as plain data.

    Classes without validation images are left out of ``per_class``; the matrix keeps every class.
    """
    images = confusion.sum(1)
    per_class = {
        c: {"images": int(images[i]), "top1": 100.0 * int(confusion[i, i]) / int(images[i])}
        for i, c in enumerate(classes)
        if images[i] > 0
    }
    return {"per_class": per_class, "class_names": list(classes), "confusion": confusion.tolist()}


def confusion_text(result: dict[str, Any], max_classes: int = 12) -> str:
    """Per-class top-1, and the confusion matrix when there are at most ``max_classes`` classes."""
    lines = [f"{'class':<16} {'images':>6} {'top-1 %':>8}"]
    lines += [f"{c[:16]:<16} {r['images']:>6} {r['top1']:>8.2f}" for c, r in result["per_class"].items()]
    classes = result["class_names"]
    if len(classes) <= max_classes:
        width = max(5, *(len(c[:10]) + 1 for c in classes))
        lines += [
            "",
            "confusion (rows: true class, columns: predicted):",
            " " * 16 + "".join(f"{c[:10]:>{width}}" for c in classes),
        ]
        lines += [
            f"{c[:16]:<16}" + "".join(f"{v:>{width}}" for v in row)
            for c, row in zip(classes, result["confusion"], strict=True)
        ]
    return "\n".join(lines)


def plot_confusion(result: dict[str, Any], path: str | os.PathLike) -> None:
    """The confusion matrix as a PNG, each row normalized to the class's images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = torch.tensor(result["confusion"], dtype=torch.float64)
    rates = matrix / matrix.sum(1, keepdim=True).clamp_min(1)
    classes = result["class_names"]
    side = min(20.0, 2.0 + 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
    ax.set_yticks(ticks, classes, fontsize=7)
    if len(classes) <= 30:
        for i in ticks:
            for j in ticks:
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        int(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    ax.set(xlabel="predicted", ylabel="true class", title=f"top-1 {result['top1']:.2f} % on {result['images']} images")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
