"""Detections on image files: boxes in each image's own pixels, a picture per image, COCO-style records.

Any detector plugs in through its eval-mode forward: ``model(images)`` returns one dict per image of
``boxes`` (xyxy pixels of the letterboxed square input), ``scores`` and ``labels`` (0-based), as torchvision's
detectors do; ``model.preprocess`` gives the input size, mean and std, ``model.class_names`` the names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

from ..images import each_image
from ..pictures import save_png
from .augment import letterbox_transform, to_image_pixels

Detector = Callable[[Tensor], list[dict[str, Tensor]]]


@torch.no_grad()
def predict_detections(
    model: Detector,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike | None = None,
    min_score: float = 0.3,
) -> list[dict[str, Any]]:
    """Detect objects in image files; with ``out``, draw each image's detections (``out/<name>_boxes.png``).

    Returns one dict per image: ``{"image", "width", "height", "detections": [{"class", "label", "score",
    "box"}], "picture"}`` with boxes as ``[x0, y0, x1, y1]`` in the image's pixels, every detection the
    model keeps (``min_score`` only chooses what is drawn), or ``{"image", "error"}`` for an unreadable file.
    """
    pre = getattr(model, "preprocess", {}) or {}
    size = int(pre.get("input_size", 320))
    transform = letterbox_transform(size, pre.get("mean", (0.485, 0.456, 0.406)), pre.get("std", (0.229, 0.224, 0.225)))
    names = list(getattr(model, "class_names", None) or [])
    results = []
    for path, img in each_image(images, results):
        w, h = img.size
        det = model(transform(img)[None])[0]
        boxes = to_image_pixels(det["boxes"].float(), (h, w), size)
        found = [
            {
                "class": names[c] if c < len(names) else str(c),
                "label": c,
                "score": round(float(s), 5),
                "box": [round(v, 2) for v in b.tolist()],
            }
            for b, s, c in zip(boxes, det["scores"], (int(c) for c in det["labels"]))
        ]
        record = {"image": str(path), "width": w, "height": h, "detections": found}
        if out is not None:
            record["picture"] = str(draw(img, found, Path(out) / f"{Path(path).stem}_boxes.png", min_score))
        results.append(record)
    return results


def draw(img: Image.Image, detections: list[dict[str, Any]], path: Path, min_score: float) -> Path:
    """The image with its detections scoring at least ``min_score``: a box and "class score" each."""
    kept = [d for d in detections if d["score"] >= min_score]
    canvas = TF.pil_to_tensor(img)
    if kept:
        boxes = torch.tensor([d["box"] for d in kept])
        labels = [f"{d['class']} {d['score']:.2f}" for d in kept]
        width = max(1, round(max(img.size) / 200))
        canvas = draw_bounding_boxes(canvas, boxes, labels, colors="red", width=width)
    return save_png(Image.fromarray(canvas.permute(1, 2, 0).numpy()), path)


def coco_records(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The detections as COCO's result format (``bbox`` = x, y, width, height; ``category_id`` 0-based)."""
    return [
        {
            "image_id": i,
            "file_name": r["image"],
            "category_id": d["label"],
            "category": d["class"],
            "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]],
            "score": d["score"],
        }
        for i, r in enumerate(results)
        for d in r.get("detections", [])
    ]
