"""The one image reader of every task: an image, and its target (boxes or a mask) in the same frame.

Every task reads its pixels here, so the rules below hold for classification, detection and
segmentation alike:

- **Decoding.** Any image PIL reads becomes 8-bit RGB (grayscale, RGBA/LA composited on white,
  palette, CMYK, 16-bit). Anything that does not decode, including a decompression bomb (an image
  claiming more than ``PIL.Image.MAX_IMAGE_PIXELS`` x 2 pixels), raises
  :class:`UnreadableImageError` naming the file, which the datasets turn into a skipped, counted sample.
- **One frame.** Images are used upright, as viewers show them (the EXIF orientation phones write
  is applied), and a target is brought into that frame with its image: a mask stored in the
  pixels of the file (its size is the stored size) is turned with the image; one whose size is the
  upright size already is upright. Boxes are converted once, when annotations are read
  (:func:`boxes_to_file_frame`), from the size they were annotated at to the upright file's pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..engine.task import DataError

# The EXIF orientation tag's values, as the transposition that shows the image upright (PIL's table).
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS_SIDES = (5, 6, 7, 8)
HEADER_THREADS = 8  # header reads are file-system bound: a few threads read a large dataset's sizes faster


class UnreadableImageError(OSError):
    """An image file that cannot be decoded: empty, truncated, corrupt, not an image, or a decompression bomb."""


@contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``PIL.Image.open`` whose every failure (bombs included) is an :class:`UnreadableImageError` naming the file."""
    try:
        img = Image.open(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error...
        raise UnreadableImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    with img:
        yield img


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: the pixels are fine, use them as stored
        return 1
    return value if value in TRANSPOSE else 1


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says: its stored size and its EXIF orientation (1 = upright as stored)."""

    stored: tuple[int, int]  # (width, height) of the pixels in the file
    orientation: int = 1

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as viewers show the image."""
        w, h = self.stored
        return (h, w) if self.orientation in SWAPS_SIDES else (w, h)


def read_header(path: str | os.PathLike) -> ImageHeader:
    """The size and orientation of an image from its header (no pixels decoded)."""
    with open_image(path) as img:
        return ImageHeader(img.size, _orientation(img))


def read_headers(paths: Sequence[str | os.PathLike]) -> list[ImageHeader | None]:
    """:func:`read_header` of many files (None for those that do not open), read by a few threads."""

    def one(path: str | os.PathLike) -> ImageHeader | None:
        try:
            return read_header(path)
        except OSError:
            return None

    with ThreadPoolExecutor(min(HEADER_THREADS, max(1, len(paths)))) as pool:
        return list(pool.map(one, paths))


def short_sides(paths: Sequence[str | os.PathLike], limit: int = 256) -> list[int]:
    """The shorter side of up to ``limit`` images spread over ``paths`` (headers only; unreadable ones left out)."""
    step = max(1, len(paths) // limit)
    return [min(h.size) for h in read_headers(list(paths)[::step][:limit]) if h is not None]


def image_size(path: str | os.PathLike, upright: bool = True) -> tuple[int, int]:
    """(width, height) of the image :func:`load_image` returns, from the file header (no pixels decoded)."""
    header = read_header(path)
    return header.size if upright else header.stored


def _decode(path: str | os.PathLike) -> tuple[Image.Image, int]:
    """The decoded image as stored, and its orientation."""
    with open_image(path) as img:
        try:
            img.load()
        except Exception as e:
            raise UnreadableImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
        return img, _orientation(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any mode: 16/32-bit scaled (not clipped), transparent pixels white as viewers show them."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: str | os.PathLike, upright: bool = True) -> Image.Image:
    """Any image PIL reads as 8-bit RGB, upright (``upright=False``: as stored, EXIF orientation ignored).

    Raises :class:`UnreadableImageError` naming the file for anything that does not decode.
    """
    img, orientation = _decode(path)
    if upright and orientation != 1:
        img = img.transpose(TRANSPOSE[orientation])
    return to_rgb(img)


def orient_boxes(boxes: np.ndarray, orientation: int, stored: tuple[int, int]) -> np.ndarray:
    """xyxy boxes on the stored pixels (``stored`` = width, height) moved as the EXIF orientation turns the image."""
    if orientation not in TRANSPOSE or len(boxes) == 0:
        return boxes
    w, h = stored
    x1, y1, x2, y2 = boxes.T
    moved = {
        2: (w - x2, y1, w - x1, y2),
        3: (w - x2, h - y2, w - x1, h - y1),
        4: (x1, h - y2, x2, h - y1),
        5: (y1, x1, y2, x2),
        6: (h - y2, x1, h - y1, x2),
        7: (h - y2, w - x2, h - y1, w - x1),
        8: (y1, w - x2, y2, w - x1),
    }[orientation]
    return np.stack(moved, axis=1).astype(boxes.dtype)


def boxes_to_file_frame(
    boxes: np.ndarray, annotated: tuple[int, int] | None, header: ImageHeader | None
) -> tuple[np.ndarray, bool]:
    """xyxy boxes annotated on an image of size ``annotated`` (width, height), in the upright file's pixels.

    Annotation tools show images upright, so boxes are taken as drawn on the upright image, unless
    ``annotated`` is the stored size and not the upright one (drawn on the pixels as stored: they
    turn with the image). A file resized after annotation gets its boxes scaled. Returns the boxes
    and whether they were scaled (for the reader's report).
    """
    if header is None or annotated is None or annotated == header.size:
        return boxes, False
    turned = header.orientation != 1 and annotated == header.stored
    if turned:
        return orient_boxes(boxes, header.orientation, header.stored), False
    aw, ah = annotated
    sw, sh = header.stored
    uw, uh = header.size
    stored_frame = header.orientation in SWAPS_SIDES and abs(aw / ah - sw / sh) < abs(aw / ah - uw / uh)
    if stored_frame:
        scaled = boxes * np.array([sw / aw, sh / ah] * 2, np.float32)
        return orient_boxes(scaled.astype(np.float32), header.orientation, header.stored), True
    return (boxes * np.array([uw / aw, uh / ah] * 2, np.float32)).astype(np.float32), True


def load_image_and_mask(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    read_mask: Callable[[Path, Image.Image], np.ndarray],
) -> tuple[Image.Image, np.ndarray]:
    """The upright RGB image and its (H, W) mask in the same frame.

    ``read_mask(path, opened)`` turns the opened mask file into class indices (and refuses what is
    not one). A mask of the file's stored size is turned by the image's EXIF orientation (it was
    made on the pixels as stored, as code that reads pixel arrays makes masks); one of the upright
    size (and not the stored one) is used as it is; any other size is refused.
    """
    image, orientation = _decode(image_path)
    with open_image(mask_path) as opened:
        try:
            mask = read_mask(Path(mask_path), opened)
        except (OSError, ValueError, SyntaxError) as e:
            if isinstance(e, DataError):
                raise
            raise UnreadableImageError(f"cannot read mask {mask_path}: {type(e).__name__}: {e}") from e
    header = ImageHeader(image.size, orientation)
    if orientation != 1:
        image = image.transpose(TRANSPOSE[orientation])
        if mask.shape[::-1] == header.stored:
            mask = np.asarray(Image.fromarray(mask).transpose(TRANSPOSE[orientation]))
    if mask.shape[::-1] != header.size:
        raise DataError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path} "
            f"{header.size[0]}x{header.size[1]}; a mask must match its image pixel for pixel"
        )
    return to_rgb(image), mask


def load_image_and_boxes(
    path: str | os.PathLike, boxes: np.ndarray, size: tuple[int, int]
) -> tuple[Image.Image, tv_tensors.BoundingBoxes]:
    """The upright RGB image and its xyxy boxes, already in its pixels (read by :func:`boxes_to_file_frame`
    for an image of ``size``), as ``tv_tensors.BoundingBoxes``; a file of another size now is refused."""
    image = load_image(path)
    if image.size != tuple(size):
        raise DataError(
            f"{path} is {image.width}x{image.height} pixels but was {size[0]}x{size[1]} when its annotations "
            "were read: it changed during the run; start the run again (or --resume it) on data that stays put"
        )
    canvas = (image.height, image.width)
    return image, tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=canvas)


ImageSource = str | os.PathLike | Iterable[str | os.PathLike]


def image_files(source: ImageSource) -> list[Path]:
    """One image file, every image under a folder (sorted, hidden entries skipped), or a list of files."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMG_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise DataError(f"{path} holds no images (extensions {', '.join(IMG_EXTENSIONS)})")
            return files
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (give an image file or a folder of images)")
        return [path]
    return [Path(p) for p in source]


def each_image(
    source: str | os.PathLike | Iterable[str | os.PathLike], errors: list
) -> Iterator[tuple[Path, Image.Image]]:
    """The images of ``source`` (see :func:`image_files`), decoded and upright; one that does not decode adds
    ``{"image", "error"}`` to ``errors`` instead, so a prediction over a folder never stops on one bad file."""
    for path in image_files(source):
        try:
            img = load_image(path)
        except UnreadableImageError as e:
            errors.append({"image": str(path), "error": f"unreadable image: {e}"})
            continue
        yield path, img
