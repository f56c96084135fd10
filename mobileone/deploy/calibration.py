"""Calibration images for INT8: any folder of images, class folders or not, preprocessed as the export expects.

Calibration needs no labels, so the reader (the package's ``ImageFilesDataset``) takes every image
under the folder (its ``train/`` when there is one) in any layout: a flat folder of photos from the
app, an ImageFolder, a detection or segmentation dataset (its mask and label folders left out).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

from ..tasks.classify.data import ImageFilesDataset, eval_transform

MASK_FOLDERS = {"masks", "labels", "annotations", "SegmentationClass", "SegmentationObject"}


def transform(meta: dict[str, Any]) -> Any:
    """The export's preprocessing: classifiers resize the short side and crop the centre, the others resize."""
    size = meta["input_size"][-1]
    size = int(size) if isinstance(size, int) else int(meta.get("train_size", 224))
    if meta.get("task", "classify") == "classify":
        return eval_transform(size, float(meta.get("crop_pct", 0.875)), tuple(meta["mean"]), tuple(meta["std"]))
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(meta["mean"]), list(meta["std"])),
        ]
    )


def image_files(data: str | os.PathLike, meta: dict[str, Any] | None = None) -> ImageFilesDataset:
    """Every image under ``data`` (its ``train/`` if present), masks and labels left out, in a fixed order."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration folder {root} does not exist (any folder of images will do)")
    root = root / "train" if (root / "train").is_dir() else root
    ds = ImageFilesDataset(root, transform(meta) if meta else None)
    ds.files = [f for f in ds.files if not MASK_FOLDERS & set(f.relative_to(root).parts[:-1])]
    return ds


def calibration_batch(data: str | os.PathLike, meta: dict[str, Any], num: int = 300, seed: int = 0) -> Tensor:
    """``num`` images drawn at random from ``data``, preprocessed from the export's metadata (N, 3, S, S)."""
    ds = image_files(data, meta)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    images = [x for x in (ds[i][0] for i in idx) if x is not None]
    if not images:
        raise ValueError(f"none of the {len(idx)} images drawn from {data} could be read; nothing to calibrate on")
    return torch.stack(images)
