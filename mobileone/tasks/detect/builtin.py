"""The built-in detection set: semi-synthetic scenes made of real images that ship inside installed packages.

Nothing is downloaded. Each scene is a crop of one of three real photographs (scikit-learn's
``china.jpg`` and ``flower.jpg``, matplotlib's ``grace_hopper.jpg``), resized, flipped, tinted
and toned down to 40 % of its contrast, with zero to four of scikit-learn's real 8x8 handwritten
digit scans pasted on it as ink (upscaled to 20-40 px of a 96 px scene, coloured to contrast with
the background, non-overlapping), saved as JPEG. The boxes are exact: the tight box of each
digit's ink. Ten classes, ``"0"`` .. ``"9"``. Train scenes use the
training digits of classification's fixed split and val scenes its validation digits, so no scan
is seen in both. The scenes are semi-synthetic: real pixels, synthetic composition; mAP on them
shows that detection trains and measures, not how a model does on natural images.

The set is written once in COCO layout (``train/`` and ``val/``, each with its JPEGs and
``_annotations.coco.json``), so it goes through the same reader as users' data. The sizes are
chosen for the demo's budget (a few minutes on 2 CPU cores): toned-down backgrounds and digits of
a fifth to two fifths of the scene, so that SSDLite learns them from scratch in a few hundred steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ...core.files import atomic_folder
from ..classify.data import default_cache_dir, digits_split

VERSION = 2  # bump when the scenes change, so cached copies are rebuilt
CLASSES = [str(d) for d in range(10)]
DIGIT_SIZES = (20, 40)  # pixel side of a pasted digit scan, at the default 96 px scene
CONTRAST = 0.4  # backgrounds keep this fraction of their contrast (their mean colour stays)
INK_THRESHOLD = 0.25  # a pixel belongs to the digit where its ink is at least this (the box is tight to it)


def background_photos() -> list[np.ndarray]:
    """The real photographs the scenes are cut from (RGB uint8)."""
    from matplotlib.cbook import get_sample_data
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    with Image.open(get_sample_data("grace_hopper.jpg")) as img:
        photos.append(np.asarray(img.convert("RGB")))
    return photos


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = out * rng.uniform(0.7, 1.2) + rng.uniform(-20, 20, size=3)  # brightness and colour cast
    mean = out.mean((0, 1))
    return np.clip(mean + CONTRAST * (out - mean), 0, 255)


def _ink(scan: np.ndarray, side: int) -> np.ndarray:
    """A digit scan (8x8, 0..255) upscaled to ``side`` px: ink coverage 0..1."""
    return np.asarray(Image.fromarray(scan).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0


def render_scene(
    rng: np.random.Generator, photos: list[np.ndarray], scans: np.ndarray, labels: np.ndarray, size: int
) -> tuple[np.ndarray, list[list[float]], list[int]]:
    """One scene: an RGB uint8 image and the exact boxes (xyxy pixels) and labels of its digits."""
    img = _background(rng, photos, size)
    count = 0 if rng.random() < 0.05 else int(rng.integers(1, 5))
    boxes: list[list[float]] = []
    out_labels: list[int] = []
    lo, hi = (round(s * size / 96) for s in DIGIT_SIZES)
    for _ in range(count):
        k = int(rng.integers(len(scans)))
        side = int(rng.integers(lo, hi + 1))
        ink = _ink(scans[k], side)
        ys, xs = np.nonzero(ink >= INK_THRESHOLD)
        if len(ys) == 0:
            continue
        for _try in range(20):
            y0, x0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = [float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1), float(y0 + ys.max() + 1)]
            if all(_overlap(box, b) < 0.05 for b in boxes):
                break
        else:
            continue
        patch = img[y0 : y0 + side, x0 : x0 + side]
        bright = patch.mean() < 128
        color = rng.uniform(190, 255, size=3) if bright else rng.uniform(0, 70, size=3)
        alpha = ink[..., None]
        img[y0 : y0 + side, x0 : x0 + side] = patch * (1 - alpha) + color * alpha
        boxes.append(box)
        out_labels.append(int(labels[k]))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), boxes, out_labels


def _overlap(a: list[float], b: list[float]) -> float:
    """Intersection over union of two xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _write_split(folder: Path, rng: np.random.Generator, photos, scans, labels, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        img, boxes, classes = render_scene(rng, photos, scans, labels, size)
        name = f"{i:05d}.jpg"
        Image.fromarray(img).save(folder / name, quality=92)
        images.append({"id": i, "file_name": name, "width": size, "height": size})
        for box, c in zip(boxes, classes):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": c,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": d, "name": name, "supercategory": "digit"} for d, name in enumerate(CLASSES)]
    info = {"description": "mobileone built-in digit scenes (semi-synthetic)", "version": VERSION}
    coco = {"images": images, "annotations": annotations, "categories": categories, "info": info}
    (folder / "_annotations.coco.json").write_text(json.dumps(coco))


def digit_scenes(
    root: str | os.PathLike | None = None, train: int = 2000, val: int = 200, size: int = 96, seed: int = 0
) -> Path:
    """Write the built-in scenes once (COCO layout) and return their folder; later calls reuse it.

    Written to a temporary folder and renamed into place, so concurrent first runs (several ranks)
    never see half of it.
    """
    root = (
        Path(root)
        if root is not None
        else default_cache_dir() / f"digit-scenes-v{VERSION}-{size}px-{train}-{val}-{seed}"
    )

    def build(folder: Path) -> None:
        xt, yt, xv, yv = digits_split()
        photos = background_photos()
        rng = np.random.default_rng(seed)
        _write_split(folder / "train", rng, photos, xt, yt, train, size)
        _write_split(folder / "val", rng, photos, xv, yv, val, size)

    return atomic_folder(root, build, done="val/_annotations.coco.json")
