"""Dense semi-synthetic scenes: many touching real objects on real textured ground, with exact boxes.

A stand-in, built from pictures that ship inside installed packages, for what users bring: aerial
tiles of tree crowns, cells, coins on a table; a few hundred tiles of 320 px, dozens of objects
of 16-64 px each, many touching, validated on other sites. Nothing is downloaded.

- **objects**: the 24 coins of scikit-image's ``coins`` photograph, cut out along their outline
  (watershed on the Sobel edges, holes filled), tinted, turned by quarter turns and flipped, scaled
  to 16-64 px (log-uniform), with their cut-out mask as alpha;
- **ground**: crops of real photographs (scikit-image's ``grass``, ``gravel``, ``brick``,
  scikit-learn's ``china.jpg`` and ``flower.jpg`` for training; ``coffee``, ``chelsea``, ``rocket``,
  ``moon`` and ``immunohistochemistry`` for validation), grey ones tinted;
- **layout**: most objects are put next to one already placed (touching clusters), the rest
  anywhere; an object may cover at most a tenth of those under it;
- **boxes**: exact, the tight box of each object's mask as pasted (the whole object, as an
  annotator draws it, even where a neighbour covers its edge);
- **other sites**: validation uses the other half of the coins and the other grounds, and larger,
  non-square images (480 x 360, 50-70 objects) than training (320 x 320, 30-45 objects).

Written in COCO json as annotation tools export it (``train/`` and ``val/``, each with its JPEGs and
``_annotations.coco.json``), one class ``coin``. Semi-synthetic: real pixels, synthetic layout.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..classify.data import default_cache_dir

VERSION = 1
SIDES = (16, 64)  # object side range, pixels
TRAIN_GROUND = ("grass", "gravel", "brick", "china.jpg", "flower.jpg")
VAL_GROUND = ("coffee", "chelsea", "rocket", "moon", "immunohistochemistry")


@dataclass(frozen=True)
class Site:
    """How one split's scenes are laid out."""

    width: int
    height: int
    objects: tuple[int, int]  # fewest, most per image


TRAIN_SITE = Site(320, 320, (30, 45))
VAL_SITE = Site(480, 360, (50, 70))


def _skimage():
    try:
        import skimage.data
        from scipy import ndimage
        from skimage import filters, segmentation
    except ImportError as e:
        raise ImportError("the dense scenes need scikit-image and scipy: pip install scikit-image scipy") from e
    return skimage.data, filters, segmentation, ndimage


def coin_cutouts() -> list[tuple[np.ndarray, np.ndarray]]:
    """The 24 coins of scikit-image's ``coins`` photograph: (grey pixels, mask) per coin, cropped to the coin."""
    data, filters, segmentation, ndimage = _skimage()
    img = data.coins()
    markers = np.zeros_like(img)
    markers[img < 30], markers[img > 150] = 1, 2
    mask = ndimage.binary_fill_holes(segmentation.watershed(filters.sobel(img), markers) - 1)
    labels, _ = ndimage.label(mask)
    out = []
    for i, region in enumerate(ndimage.find_objects(labels), 1):
        m = labels[region] == i
        if m.sum() > 150:
            out.append((img[region].astype(np.float32), m))
    return out


def grounds(names: tuple[str, ...]) -> list[np.ndarray]:
    """Real photographs (RGB float32) from scikit-image (by function name) or scikit-learn (``*.jpg``)."""
    data = _skimage()[0]
    out = []
    for name in names:
        if name.endswith(".jpg"):
            from sklearn.datasets import load_sample_image

            img = load_sample_image(name)
        else:
            img = getattr(data, name)()
        img = np.asarray(img, np.float32)
        out.append(np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3])
    return out


def _ground(rng: np.random.Generator, photos: list[np.ndarray], site: Site) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    scale = rng.uniform(0.6, 1.0) * min(h / site.height, w / site.width)
    ch, cw = int(site.height * scale), int(site.width * scale)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(photo[y : y + ch, x : x + cw].astype(np.uint8)).resize((site.width, site.height))
    out = np.asarray(crop, np.float32) * rng.uniform(0.6, 1.1, size=3)  # a tint per scene (grey grounds too)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _object(rng: np.random.Generator, coin: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One coin, tinted, turned, flipped and scaled: RGB pixels (s, s', 3) and its alpha mask (s, s')."""
    grey, mask = coin
    side = float(np.exp(rng.uniform(np.log(SIDES[0]), np.log(SIDES[1]))))
    k = side / max(grey.shape)
    size = (max(4, round(grey.shape[1] * k)), max(4, round(grey.shape[0] * k)))
    pixels = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize(size, Image.BILINEAR), np.float32)
    alpha = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR), np.float32) / 255
    tint = rng.uniform([0.8, 0.55, 0.3], [1.25, 1.1, 1.0])  # copper to silver
    rgb = pixels[..., None] * tint * rng.uniform(0.8, 1.3)
    turns = int(rng.integers(4))
    rgb, alpha = np.rot90(rgb, turns), np.rot90(alpha, turns)
    if rng.random() < 0.5:
        rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
    return rgb, alpha


def _position(rng: np.random.Generator, boxes: list[list[float]], h: int, w: int, site: Site) -> tuple[int, int]:
    """Top-left corner: beside an object already placed (touching clusters) or anywhere."""
    if boxes and rng.random() < 0.7:
        b = boxes[rng.integers(len(boxes))]
        angle = rng.uniform(0, 2 * np.pi)
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        reach = (max(b[2] - b[0], b[3] - b[1]) + max(h, w)) / 2 * rng.uniform(0.85, 1.05)
        x, y = cx + reach * np.cos(angle) - w / 2, cy + reach * np.sin(angle) - h / 2
        return int(np.clip(round(y), 0, site.height - h)), int(np.clip(round(x), 0, site.width - w))
    return int(rng.integers(0, site.height - h + 1)), int(rng.integers(0, site.width - w + 1))


def render_scene(
    rng: np.random.Generator, photos: list[np.ndarray], coins: list, site: Site
) -> tuple[np.ndarray, list[list[float]]]:
    """One scene: RGB uint8 pixels and the exact xyxy boxes of its objects."""
    img = _ground(rng, photos, site)
    cover = np.zeros((site.height, site.width), np.float32)
    boxes: list[list[float]] = []
    target = int(rng.integers(site.objects[0], site.objects[1] + 1))
    for _ in range(target * 6):
        if len(boxes) == target:
            break
        rgb, alpha = _object(rng, coins[rng.integers(len(coins))])
        h, w = alpha.shape
        y, x = _position(rng, boxes, h, w, site)
        solid = alpha > 0.5
        if (cover[y : y + h, x : x + w] * solid).sum() > 0.1 * solid.sum():
            continue
        ys, xs = np.nonzero(solid)
        a = alpha[..., None]
        img[y : y + h, x : x + w] = img[y : y + h, x : x + w] * (1 - a) + rgb * a
        cover[y : y + h, x : x + w] = np.maximum(cover[y : y + h, x : x + w], solid)
        boxes.append([float(x + xs.min()), float(y + ys.min()), float(x + xs.max() + 1), float(y + ys.max() + 1)])
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), boxes


def _write_split(folder: Path, rng: np.random.Generator, photos, coins, site: Site, count: int) -> None:
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        img, boxes = render_scene(rng, photos, coins, site)
        name = f"{i:05d}.jpg"
        Image.fromarray(img).save(folder / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "width": site.width, "height": site.height})
        for x1, y1, x2, y2 in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "segmentation": [],
                }
            )
    coco = {
        "info": {"description": "mobileone dense scenes (semi-synthetic)", "version": VERSION},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "coin", "supercategory": "object"}],
    }
    (folder / "_annotations.coco.json").write_text(json.dumps(coco))


def dense_scenes(root: str | os.PathLike | None = None, train: int = 212, val: int = 40, seed: int = 0) -> Path:
    """Write the dense scenes once (COCO layout) and return their folder; later calls reuse it."""
    root = Path(root) if root is not None else default_cache_dir() / f"dense-scenes-v{VERSION}-{train}-{val}-{seed}"
    if (root / "val" / "_annotations.coco.json").is_file():
        return root
    coins = coin_cutouts()
    rng = np.random.default_rng(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".dense-scenes."))
    try:  # written aside and renamed into place, as the built-in scenes (concurrent first runs)
        _write_split(tmp / "train", rng, grounds(TRAIN_GROUND), coins[0::2], TRAIN_SITE, train)
        _write_split(tmp / "val", rng, grounds(VAL_GROUND), coins[1::2], VAL_SITE, val)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "val").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
