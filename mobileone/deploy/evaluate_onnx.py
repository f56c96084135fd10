"""Top-1 / top-5 of any exported ONNX classifier (fp32 or INT8), preprocessed from its own metadata."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..tasks.classify.data import DataError, ImageFolderDataset, collate_skip_bad, eval_transform
from ..tasks.classify.evaluate import topk_hits
from .onnx import onnx_session, read_onnx_metadata, require_onnx_task


def _data_root(data: str | os.PathLike, split: str) -> Path:
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (expected class folders, or train/ and val/)")
    return root / split if (root / split).is_dir() else root


def image_folder(data: str | os.PathLike, split: str, meta: dict[str, Any]) -> Any:
    """An ImageFolder of ``data`` (or its ``split``/ sub-folder) with the model's eval transform.

    Labels follow the model's class names when it has them, so folders in another order score right.
    """
    size = int(meta["input_size"][-1])
    transform = eval_transform(size, float(meta.get("crop_pct", 0.875)), meta["mean"], meta["std"])
    ds = ImageFolderDataset(_data_root(data, split), transform=transform)
    classes = meta.get("class_names")
    if classes:
        unknown = sorted(set(ds.classes) - set(classes))
        if unknown:
            raise DataError(
                f"{ds.root} has class folders {unknown[:10]} the model does not know (its classes: "
                f"{list(classes)[:10]}...)"
            )
        remap = {ds.class_to_idx[c]: list(classes).index(c) for c in ds.classes}
        ds.samples = [(p, remap[t]) for p, t in ds.samples]
        ds.targets = [t for _, t in ds.samples]
    return ds


def _onnx_batches(data: Any, meta: dict[str, Any], batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, (str, os.PathLike)):
        loader = DataLoader(image_folder(data, "val", meta), batch_size, collate_fn=collate_skip_bad)
    else:
        loader = data
    for batch in loader:
        x, y = batch[0], batch[1]
        if x is not None:
            yield x, y


def onnx_logits(
    path: str | os.PathLike, data: Any, batch_size: int = 64, threads: int | None = None
) -> tuple[Tensor, Tensor]:
    """Logits of an ONNX classifier on ``data`` (see :func:`evaluate_onnx`) and the labels."""
    meta = require_onnx_task(path, "classify")
    session = onnx_session(path, threads)
    inp = session.get_inputs()[0]
    size = inp.shape[-1] if isinstance(inp.shape[-1], int) else 224
    meta.setdefault("input_size", [3, size, size])
    meta.setdefault("mean", [0.485, 0.456, 0.406])
    meta.setdefault("std", [0.229, 0.224, 0.225])
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
    logits, labels = [], []
    for x, y in _onnx_batches(data, meta, batch_size):
        chunks = x.split(fixed_batch) if fixed_batch else [x]
        logits += [torch.from_numpy(session.run(None, {inp.name: c.numpy()})[0]) for c in chunks]
        labels.append(y)
    if not labels:
        raise ValueError(f"no images could be evaluated from {data} (none readable)")
    logits = torch.cat(logits)
    if not torch.isfinite(logits).all():
        raise ValueError(f"{path} gives NaN or infinite outputs on {data}; the model is broken, not scored")
    return logits, torch.cat(labels)


def accuracy(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """Top-1 and top-5 in percent."""
    top1, top5 = topk_hits(logits, labels)
    return 100.0 * top1 / max(1, len(labels)), 100.0 * top5 / max(1, len(labels))


def evaluate_onnx(
    path: str | os.PathLike,
    data: Any,
    batch_size: int = 64,
    threads: int | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 of any ONNX classifier on ``data``: a folder (``val/`` if present) or a loader of (x, y).

    Preprocessing (size, crop, mean, std) and the class order are read from the file's metadata,
    as ``mobileone export`` writes it; files without it get ImageNet defaults at their input size.
    """
    t0 = time.perf_counter()
    logits, labels = onnx_logits(path, data, batch_size, threads)
    top1, top5 = accuracy(logits, labels)
    return {
        "model": str(path),
        "data": str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
        "images": len(labels),
        "top1": top1,
        "top5": top5,
        "seconds": time.perf_counter() - t0,
        "quantization": read_onnx_metadata(path).get("quantization"),
    }
