"""Calibration images for INT8: any folder of images, class folders or not, preprocessed as the export expects.

Calibration needs no labels, so the reader takes every image under the folder (its ``train/`` when
there is one), in any layout: a flat folder of photos from the app, an ImageFolder, a detection or
segmentation dataset's image folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS

MASK_FOLDERS = {"masks", "labels", "annotations", "SegmentationClass", "SegmentationObject"}


def image_files(data: str | os.PathLike) -> list[Path]:
    """Every image file under ``data`` (its ``train/`` if present), masks and labels left out, in a fixed order."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration folder {root} does not exist (any folder of images will do)")
    root = root / "train" if (root / "train").is_dir() else root
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMG_EXTENSIONS and not MASK_FOLDERS & set(p.relative_to(root).parts[:-1])
    )
    if not files:
        raise FileNotFoundError(f"no image under {root} ({', '.join(IMG_EXTENSIONS)}): nothing to calibrate on")
    return files


def preprocess(path: Path, meta: dict[str, Any]) -> Tensor | None:
    """One image as the export takes it: classifiers resize the short side and crop the centre, others resize."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError):
        return None
    size = int(meta["input_size"][-1]) if isinstance(meta["input_size"][-1], int) else int(meta.get("train_size", 224))
    if meta.get("task", "classify") == "classify":
        short = int(round(size / float(meta.get("crop_pct", 0.875))))
        w, h = img.size
        img = img.resize((max(short, round(w * short / h)), max(short, round(h * short / w))), Image.BILINEAR)
        w, h = img.size
        img = img.crop(((w - size) // 2, (h - size) // 2, (w - size) // 2 + size, (h - size) // 2 + size))
    else:
        img = img.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(meta["mean"]).view(3, 1, 1)) / torch.tensor(meta["std"]).view(3, 1, 1)


def calibration_batch(data: str | os.PathLike, meta: dict[str, Any], num: int = 300, seed: int = 0) -> Tensor:
    """``num`` images drawn at random from ``data``, preprocessed from the export's metadata (N, 3, S, S)."""
    files = image_files(data)
    idx = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    images = [x for x in (preprocess(files[i], meta) for i in idx) if x is not None]
    if not images:
        raise ValueError(f"none of the {len(idx)} images drawn from {data} could be read; nothing to calibrate on")
    return torch.stack(images)
