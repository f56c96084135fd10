"""Segmentation masks: reading them as class-index arrays, and the checks that name what a user's masks got wrong.

A mask pixel is a class index, 255 "ignore"; palette PNGs (VOC) are read by index. RGB
(colour-coded), 16-bit and JPEG masks are refused with a message saying what they hold and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ...engine.task import DataError
from ..images import UnreadableImageError, open_image
from .model import IGNORE_INDEX

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_palette() -> np.ndarray:
    """The Pascal VOC colour map (256 x 3 uint8): class i is drawn in colour i of the palette PNGs."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def _rgb_mask_error(path: Path, img: Image.Image) -> DataError:
    """What an RGB mask holds (its colours; VOC classes when they are VOC's palette), and what to do."""
    rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    top = [tuple(int(v) for v in colours[i]) for i in np.argsort(-counts)[:6]]
    more = f" and {len(colours) - len(top)} more" if len(colours) > len(top) else ""
    voc = {tuple(int(v) for v in c): i for i, c in enumerate(voc_palette()[: len(VOC_CLASSES)])}
    voc[(224, 224, 192)] = IGNORE_INDEX  # VOC's boundary colour
    hint = ""
    if all(c in voc for c in map(tuple, colours.tolist())):
        names = [VOC_CLASSES[voc[c]] if voc[c] < len(VOC_CLASSES) else "ignore" for c in top]
        hint = (
            f" These are Pascal VOC palette colours ({', '.join(names)}): save the masks as palette ('P') PNGs "
            "as VOC ships them, or map each colour to its index in "
            "mobileone.tasks.segment.data.voc_palette()."
        )
    return DataError(
        f"mask {path} is a colour ({img.mode}) image with {len(colours)} colours: {top}{more}. Masks must hold one "
        f"channel of class indices (8-bit grayscale or palette PNG: pixel = class index, {IGNORE_INDEX} = ignore); "
        f"convert colours to indices.{hint}"
    )


def check_mask_mode(path: Path, img: Image.Image) -> None:
    """Refuse masks that cannot hold 8-bit class indices, saying what the file is."""
    if img.mode in ("L", "P", "1"):
        return
    if img.mode in ("RGB", "RGBA", "RGBX"):
        raise _rgb_mask_error(path, img)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        bits = "16-bit" if img.mode.startswith("I;16") else "32-bit"
        hi = int(np.asarray(img).max())
        raise DataError(
            f"mask {path} is a {bits} image (mode {img.mode}, largest value {hi}); masks must be 8-bit "
            f"(class indices 0..254, {IGNORE_INDEX} = ignore). Re-save it as 8-bit, e.g. "
            "Image.fromarray(np.asarray(mask).astype(np.uint8)) when every value is below 256"
        )
    raise DataError(
        f"mask {path} has image mode {img.mode}; masks must be 8-bit grayscale ('L') or palette ('P') "
        f"PNGs of class indices ({IGNORE_INDEX} = ignore)"
    )


def decode_mask(path: Path, img: Image.Image) -> np.ndarray:
    """An opened mask file as a (H, W) uint8 array of class indices (palette PNGs give their indices)."""
    check_mask_mode(path, img)
    img.load()
    return np.array(img, dtype=np.uint8)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as stored, as a (H, W) uint8 array of class indices; bombs and undecodable files raise
    :class:`UnreadableImageError`."""
    with open_image(path) as img:
        try:
            return decode_mask(Path(path), img)
        except (OSError, ValueError, SyntaxError) as e:
            if isinstance(e, DataError):
                raise
            raise UnreadableImageError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e


def check_mask_values(mask: np.ndarray, num_classes: int, path: Path | str) -> None:
    """Every value is a class index or the ignore index, or a DataError naming the file and the values."""
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = sorted(int(v) for v in np.unique(mask[bad]))[:10]
        raise DataError(
            f"mask {path} holds values {values} that are neither classes 0..{num_classes - 1} nor the "
            f"ignore index {IGNORE_INDEX}; fix the mask, or list every class in classes.txt"
        )
