"""Tiny segmentation datasets on disk for the segmentation tests: colour-coded regions, learnable in a few steps."""

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 60, 230)}  # class -> colour; class 0 is dark background


def scene(rng: np.random.Generator, h: int, w: int, classes: int = 4, grid: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A dark noisy image with 1-3 coloured rectangles and its mask (class = colour).

    ``grid`` snaps the rectangles' edges to multiples of it: with the grid of a model's output
    stride, bilinear upsampling of per-cell logits can draw every edge exactly (an over-fit can reach mIoU 100).
    """
    img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for c in rng.choice(np.arange(1, classes), size=rng.integers(1, classes), replace=False):
        y0, x0 = rng.integers(0, h // 2) // grid * grid, rng.integers(0, w // 2) // grid * grid
        y1 = y0 + max(grid, rng.integers(h // 4, h // 2 + 1) // grid * grid)
        x1 = x0 + max(grid, rng.integers(w // 4, w // 2 + 1) // grid * grid)
        img[y0:y1, x0:x1] = np.clip(np.array(COLOURS[int(c)]) + rng.integers(-20, 20, 3), 0, 255)
        mask[y0:y1, x0:x1] = c
    return img, mask


def make_masks_dataset(
    root: Path,
    n_train: int = 8,
    n_val: int = 4,
    size: int = 32,
    classes_txt: bool = True,
    val_sizes: tuple[tuple[int, int], ...] = (),
    grid: int = 1,
) -> Path:
    """The ``masks`` layout; ``val_sizes`` adds validation images of other sizes (full-resolution evaluation)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        sizes = [(size, size)] * n + (list(val_sizes) if split == "val" else [])
        for i, (h, w) in enumerate(sizes):
            img, mask = scene(rng, h, w, grid=grid)
            Image.fromarray(img).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(mask, "L").save(root / split / "masks" / f"{i:03d}.png")
    if classes_txt:
        (root / "classes.txt").write_text("background\nred\ngreen\nblue\n")
    return root


def make_voc_dataset(root: Path, n_train: int = 4, n_val: int = 2, size: int = 32) -> Path:
    """The Pascal VOC layout: JPEGImages, palette PNGs in SegmentationClass (with the 255 boundary), ImageSets."""
    from mobileone.tasks.segment.masks import voc_palette

    rng = np.random.default_rng(1)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"2007_{split}_{i:03d}" for i in range(n)]
        for i in ids:
            img, mask = scene(rng, size, size)
            mask[mask == 3] = 15  # "person"
            mask[0, :] = 255  # VOC's boundary pixels
            Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
            m = Image.fromarray(mask, "P")
            m.putpalette(palette)
            m.save(root / "SegmentationClass" / f"{i}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
