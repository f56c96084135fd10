"""Dense-scene augmentation with the boxes kept right, and the letterbox every evaluation uses.

Training (:class:`DenseTrainData`), per sample, seeded from (seed, epoch, index) as the rest of
the engine, so workers and ranks see the same boxes:

1. **mosaic** (probability ``mosaic``): the image and three others, each resized so its long side is
   the input size, tiled around a random centre of a canvas twice the input size (YOLO's mosaic);
   otherwise the image alone, resized the same way. Every object keeps its pixel scale;
2. **scale jitter and translation**: a square window of side ``img_size / s`` (``s`` drawn from
   ``scale``) around a jittered centre is cropped (padded where it leaves the canvas) and resized to
   the input: objects shrink or grow by ``s``. A box cut by the window is kept, clipped, while at
   least ``MIN_VISIBLE`` of it is inside;
3. flips and colour jitter through torchvision transforms v2 with ``tv_tensors.BoundingBoxes``,
   ``SanitizeBoundingBoxes``, normalization.

``repeats`` passes over the images make one epoch, so a small set still gets enough optimizer
steps per epoch (the detection task sets it from its minimum number of steps).

Evaluation letterboxes (:func:`letterbox_transform`): the long side resized to the input size, the
aspect ratio kept, padded at the right and bottom with the mean colour; :func:`to_image_pixels`
maps detections back to the file's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import query_size

from ...core.config import IMAGENET_MEAN, IMAGENET_STD
from ...engine.distributed import sample_seed, seeded
from .data import DetectionDataset

MIN_VISIBLE = 0.4  # a box cut by the crop is kept while this fraction of its area is inside
CACHE_BYTES = 256 << 20  # decoded training images kept per process (at the input size: ~870 of 320 px)


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    return tuple(round(255 * m) for m in mean)  # type: ignore[return-value]


def _fit(img: Image.Image, boxes: np.ndarray, side: int) -> tuple[Image.Image, np.ndarray]:
    """Resize so the long side is ``side`` (aspect kept), boxes with it."""
    k = side / max(img.size)
    if k != 1:
        img = img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))), Image.BILINEAR)
    return img, boxes * k


def _mosaic(parts: list[tuple[Image.Image, np.ndarray, np.ndarray]], side: int, fill, rng: torch.Generator):
    """Four images (long side ``side``) tiled around a random centre of a (2 side)^2 canvas (YOLO's mosaic)."""
    canvas = Image.new("RGB", (2 * side, 2 * side), fill)
    xc, yc = (int(side * (0.5 + torch.rand((), generator=rng))) for _ in range(2))
    boxes, labels = [], []
    for k, (img, b, lab) in enumerate(parts):
        w, h = img.size
        x0 = xc - w if k in (0, 2) else xc
        y0 = yc - h if k in (0, 1) else yc
        canvas.paste(img, (x0, y0))
        boxes.append(b + np.array([x0, y0, x0, y0], np.float32))
        labels.append(lab)
    return canvas, np.concatenate(boxes), np.concatenate(labels)


def _window(img: Image.Image, boxes: np.ndarray, labels: np.ndarray, side: int, scale, fill, rng):
    """Crop a jittered square window of side ``side / s`` and resize it to ``side``; cut boxes kept if visible."""
    s = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=rng))
    win = side / s
    jx, jy = (0.1 * side * (2 * float(torch.rand((), generator=rng)) - 1) for _ in range(2))
    x0 = img.width / 2 - win / 2 + jx
    y0 = img.height / 2 - win / 2 + jy
    out = img.transform((side, side), Image.EXTENT, (x0, y0, x0 + win, y0 + win), Image.BILINEAR, fillcolor=fill)
    b = (boxes - np.array([x0, y0, x0, y0], np.float32)) * (side / win)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = b.clip(0, side)
    kept = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]) >= MIN_VISIBLE * np.maximum(area, 1e-6)
    return out, c[kept], labels[kept]


class DenseTrainData(Dataset):
    """The training view of a :class:`DetectionDataset`: ``repeats`` passes an epoch, mosaic, scale jitter, flips,
    colour; items are ``(normalized image (3, S, S), {"boxes", "labels"})`` or ``(None, path)``."""

    def __init__(
        self,
        base: DetectionDataset,
        img_size: int,
        repeats: int = 1,
        mosaic: float = 0.5,
        scale: tuple[float, float] = (0.5, 1.5),
        hflip: float = 0.5,
        vflip: float = 0.0,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.cache: dict[int, tuple[Image.Image, np.ndarray, np.ndarray]] = {}
        self.base, self.img_size, self.repeats = base, img_size, max(1, repeats)
        self.mosaic, self.scale, self.fill = mosaic, scale, mean_fill(mean)
        self.records, self.classes, self.source = base.records, base.classes, base.source
        self.epoch = 0
        self.finish = v2.Compose(
            [
                # On the PIL image (Pillow's enhancers): a quarter of a sample's time less than on the tensor.
                v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.5) if photometric else v2.Identity(),
                v2.ToImage(),
                v2.RandomHorizontalFlip(hflip),
                v2.RandomVerticalFlip(vflip),
                v2.SanitizeBoundingBoxes(min_size=2.0),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(mean), list(std)),
            ]
        )

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    @property
    def img_size(self) -> int:
        return self._img_size

    @img_size.setter
    def img_size(self, side: int) -> None:  # a new input size (progressive resizing): the kept images are stale
        self._img_size, self.cached_bytes = side, 0
        self.cache.clear()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _raw(self, index: int) -> tuple[Image.Image, np.ndarray, np.ndarray] | None:
        """Image ``index`` resized to the input size (long side), its boxes and labels; kept in memory up to
        ``CACHE_BYTES``, since a mosaic reads four images a sample and decoding was a third of a sample's time."""
        if index in self.cache:
            return self.cache[index]
        img, target = self.base[(0, index)]
        if img is None:
            return None
        img, boxes = _fit(img.convert("RGB"), target["boxes"].numpy().astype(np.float32), self.img_size)
        part = img, boxes, target["labels"].numpy()
        size = img.width * img.height * 3
        if self.cached_bytes + size <= CACHE_BYTES:
            self.cache[index], self.cached_bytes = part, self.cached_bytes + size
        return part

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        seed = sample_seed(self.base.seed, epoch, index)
        return seeded(self.base.seed, epoch, index, self._sample, index % len(self.records), seed)

    def _sample(self, index: int, seed: int) -> tuple[Any, Any]:
        rng = torch.Generator().manual_seed(seed)
        first = self._raw(index)
        if first is None:
            return None, self.records[index].path
        side = self.img_size
        if float(torch.rand((), generator=rng)) < self.mosaic:
            others = torch.randint(len(self.records), (3,), generator=rng).tolist()
            parts = [first] + [p for p in map(self._raw, others) if p is not None]
            parts += [first] * (4 - len(parts))
            img, boxes, labels = _mosaic(parts, side, self.fill, rng)
        else:
            img, boxes, labels = first
        img, boxes, labels = _window(img, boxes, labels, side, self.scale, self.fill, rng)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes).reshape(-1, 4), format="XYXY", canvas_size=(side, side)
            ),
            "labels": torch.from_numpy(labels).long(),
        }
        x, t = self.finish(img, target)
        return x, {"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]}


class Letterbox(v2.Transform):
    """Resize so the long side is ``size`` (aspect kept) and pad right and bottom to ``size`` x ``size``;
    boxes (``tv_tensors.BoundingBoxes``) follow, so it serves training pairs and evaluation images alike."""

    def __init__(self, size: int, fill: tuple[int, int, int]) -> None:
        super().__init__()
        self.size, self.fill = size, fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        k = self.size / max(h, w)
        return {"hw": [max(1, round(h * k)), max(1, round(w * k))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        nh, nw = params["hw"]
        out = TF.resize(inpt, [nh, nw], antialias=True)
        fill = list(self.fill) if isinstance(inpt, (Image.Image, tv_tensors.Image)) else 0
        return TF.pad(out, [0, 0, self.size - nw, self.size - nh], fill=fill)


def letterbox_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Letterbox to the detector's square input (no crop, aspect kept), scale to [0, 1], normalize."""
    return v2.Compose(
        [
            v2.ToImage(),
            Letterbox(img_size, mean_fill(mean)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def to_image_pixels(boxes: torch.Tensor, size: tuple[int, int], img_size: int) -> torch.Tensor:
    """Boxes in pixels of the letterboxed input back to pixels of the (h, w) image it came from."""
    return boxes * (max(size) / img_size)
