"""The built-in segmentation set: real digit scans pasted on crops of real photographs (semi-synthetic).

Nothing is downloaded. The digits are scikit-learn's bundled scans (1,797 real 8x8 handwritten
digits; the classification split keeps train and val scans apart here too), the backgrounds
crops of matplotlib's sample photographs. Each scene is a ``size`` x ``size`` crop of a photo,
dimmed, with one digit scaled to 60-95 % of the scene at a random place, tinted and alpha-blended
onto it. The mask comes from the scan itself: pixels where the upscaled scan is above half its ink are the digit's
class (``digit_0`` .. ``digit_9``), the faint rim between a quarter and half is ignore (255, like
VOC's object boundaries), the rest background. So the pixels are real, their arrangement is
synthetic: a set on which mIoU means something (the classes need the digit's shape, not its colour),
small enough to train on a CPU in minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ...core.files import atomic_folder
from ..classify.data import default_cache_dir, digits_split
from .model import IGNORE_INDEX

BUILTIN_CLASSES = ["background"] + [f"digit_{d}" for d in range(10)]
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
# A digit's side as a fraction of the scene. Its strokes are about a quarter of that: at 60-95 % of
# a 64 px scene they span 10-15 px, so a stride-8 head (LR-ASPP) can draw them; perfect stride-8
# logits, upsampled, would score about 90 mIoU on these masks (about 56 at stride 16).
DIGIT_SCALE = (0.6, 0.95)


def _photos() -> list[np.ndarray]:
    from matplotlib.cbook import get_sample_data

    return [np.asarray(Image.open(get_sample_data(name)).convert("RGB")) for name in PHOTOS]


def make_scene(
    rng: np.random.Generator, photos: list[np.ndarray], digits: np.ndarray, labels: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 scene and its (H, W) uint8 mask: a random digit of ``digits`` (N, 8, 8) on a photo crop."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.3, 1.0) * min(h, w))
    y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side]).resize((size, size), Image.BILINEAR)
    scene = np.asarray(crop, dtype=np.float32) * rng.uniform(0.35, 0.7)
    i = rng.integers(len(digits))
    s = int(rng.uniform(*DIGIT_SCALE) * size)
    y, x = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
    ink = np.asarray(Image.fromarray(digits[i]).resize((s, s), Image.BICUBIC), dtype=np.float32) / 255.0
    ink = np.clip(ink, 0.0, 1.0)
    colour = rng.uniform(150, 255, size=3).astype(np.float32)
    region = scene[y : y + s, x : x + s]
    region[:] = region * (1 - ink[..., None]) + colour * ink[..., None]
    mask = np.zeros((size, size), dtype=np.uint8)
    sub = mask[y : y + s, x : x + s]
    sub[ink > 0.25] = IGNORE_INDEX
    sub[ink > 0.5] = 1 + int(labels[i])
    return np.clip(scene + 0.5, 0, 255).astype(np.uint8), mask


def builtin_scenes(
    root: str | os.PathLike | None = None, size: int = 64, n_train: int = 800, n_val: int = 160, seed: int = 0
) -> Path:
    """Write the scenes once in the ``masks`` layout (with ``classes.txt``) and return the folder.

    The folder name records the settings, so other settings get their own copy. It is written to a
    temporary folder and renamed into place, so concurrent first runs never see half of it.
    """
    name = f"digit_scenes_v3_{size}px_{n_train}_{n_val}_s{seed}"
    root = Path(root) if root is not None else default_cache_dir() / name

    def build(folder: Path) -> None:
        xt, yt, xv, yv = digits_split()
        photos = _photos()
        rng = np.random.default_rng(seed)
        for split, n, xs, ys in (("train", n_train, xt, yt), ("val", n_val, xv, yv)):
            (folder / split / "images").mkdir(parents=True)
            (folder / split / "masks").mkdir(parents=True)
            for k in range(n):
                scene, mask = make_scene(rng, photos, xs, ys, size)
                Image.fromarray(scene).save(folder / split / "images" / f"{k:05d}.png")
                Image.fromarray(mask, "L").save(folder / split / "masks" / f"{k:05d}.png")
        (folder / "classes.txt").write_text("\n".join(BUILTIN_CLASSES) + "\n")

    return atomic_folder(root, build, done="val/masks")
