"""Masks on image files: the class of every pixel at each image's own resolution, as a mask and an overlay.

Any segmenter plugs in through its eval-mode forward: ``model(images)["out"]`` are class logits at the
input's size (torchvision's segmentation models' convention); ``model.preprocess`` gives the mean and
std, ``model.class_names`` the names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..images import each_image
from ..pictures import save_png
from .data import eval_transform
from .masks import voc_palette

Segmenter = Callable[[Tensor], dict[str, Tensor]]


@torch.no_grad()
def predict_masks(
    model: Segmenter,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike | None = None,
    alpha: float = 0.5,
) -> list[dict[str, Any]]:
    """Segment image files; with ``out``, write ``<name>_mask.png`` (palette PNG, pixel value = class index)
    and ``<name>_overlay.png`` (the classes' colours over the image).

    Returns one dict per image: ``{"image", "width", "height", "classes": {name: % of pixels}, "mask",
    "overlay"}``, or ``{"image", "error"}`` for an unreadable file.
    """
    pre = getattr(model, "preprocess", {}) or {}
    transform = eval_transform(pre.get("mean", (0.485, 0.456, 0.406)), pre.get("std", (0.229, 0.224, 0.225)))
    names = list(getattr(model, "class_names", None) or [])
    results = []
    for path, img in each_image(images, results):
        x = transform(tv_tensors.Image(TF.pil_to_tensor(img)))
        labels = model(x[None].float())["out"][0].argmax(0).numpy().astype(np.uint8)
        counts = np.bincount(labels.ravel(), minlength=len(names))
        share = {_name(names, c): round(100.0 * int(n) / labels.size, 3) for c, n in enumerate(counts) if n}
        record = {"image": str(path), "width": img.width, "height": img.height, "classes": share}
        if out is not None:
            record |= write_pictures(img, labels, Path(out) / Path(path).stem, alpha)
        results.append(record)
    return results


def _name(names: list[str], c: int) -> str:
    return names[c] if c < len(names) else str(c)


def write_pictures(img: Image.Image, labels: np.ndarray, stem: Path, alpha: float) -> dict[str, str]:
    """The mask as a palette PNG (Pascal VOC's colours) and the overlay of those colours on the image."""
    palette = voc_palette()
    mask = Image.fromarray(labels)  # "L"; a palette makes it "P"
    mask.putpalette(palette.reshape(-1).tolist())
    colours = palette[labels].astype(np.float32)
    blend = np.asarray(img, dtype=np.float32) * (1 - alpha) + colours * alpha
    overlay = Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8))
    paths = {"mask": stem.with_name(f"{stem.name}_mask.png"), "overlay": stem.with_name(f"{stem.name}_overlay.png")}
    for key, picture in (("mask", mask), ("overlay", overlay)):
        save_png(picture, paths[key])
    return {k: str(v) for k, v in paths.items()}
