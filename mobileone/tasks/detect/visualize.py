"""A picture of a detector's predictions on a few validation images: ground truth green, detections red."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, make_grid

from ...core.files import atomic_write
from ..classify.data import load_image
from .augment import letterbox_transform, to_image_pixels
from .data import DetectionDataset
from .model import Detector


@torch.no_grad()
def draw_predictions(
    model: Detector, dataset: DetectionDataset, out: Path, count: int = 8, min_score: float = 0.25
) -> Path | None:
    """Draw ground truth and detections scoring at least ``min_score`` on ``count`` evenly spaced images.

    Tiles are at least 256 px, so small inputs stay readable. Returns the PNG written, or None when
    none of the chosen images could be read.
    """
    was_training = model.training
    model.eval()
    size = model.config.img_size
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    transform = letterbox_transform(size, model.preprocess["mean"], model.preprocess["std"])
    tiles = []
    step = max(1, len(dataset.records) // count)
    try:
        for record in dataset.records[::step][:count]:
            try:
                img = load_image(record.path)
            except (OSError, ValueError, SyntaxError):
                continue
            w, h = img.size
            det = model(transform(img)[None])[0]
            side = max(size, 256)
            canvas = TF.resize(TF.pil_to_tensor(img), [side, side], antialias=True)
            gt = torch.from_numpy(record.boxes) * torch.tensor([side / w, side / h] * 2)
            canvas = draw_bounding_boxes(canvas, gt, colors="lime", width=2)
            keep = det["scores"] >= min_score
            labels = [f"{names[int(c)]} {float(s):.2f}" for c, s in zip(det["labels"][keep], det["scores"][keep])]
            boxes = to_image_pixels(det["boxes"][keep].float(), (h, w), size) * torch.tensor([side / w, side / h] * 2)
            canvas = draw_bounding_boxes(canvas, boxes, labels, colors="red", width=2)
            tiles.append(canvas)
    finally:
        model.train(was_training)
    if not tiles:
        return None
    grid = make_grid(tiles, nrow=min(4, len(tiles)), padding=4, pad_value=255)
    atomic_write(out, lambda tmp: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))
    return out
