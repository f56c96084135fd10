"""Detection annotations in one form: an :class:`ImageRecord` per image, boxes in the pixels of the image file
as viewers show it, and the checks every box passes when it is read (clipped, dropped, counted per :class:`Split`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..images import ImageHeader, boxes_to_file_frame, read_headers

log = logging.getLogger("mobileone")


TRAIN_NAMES, VAL_NAMES = ("train",), ("val", "valid", "validation")


CLIP_TOLERANCE = 0.01  # pixels a box may reach past the border before it counts as clipped (float rounding)


@dataclass
class ImageRecord:
    """One image and its boxes: xyxy pixels of the image file, 0-based labels, crowd/difficult flags."""

    path: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32
    labels: np.ndarray  # (n,) int64
    crowd: np.ndarray  # (n,) bool: not trained on, ignored by the evaluation


@dataclass
class Split:
    """One split of a dataset: its images, its class list, and what was repaired or skipped while reading."""

    records: list[ImageRecord]
    classes: list[str]
    source: str
    issues: dict[str, list[str]] = field(default_factory=dict)  # kind -> examples (one per occurrence)

    def note(self, kind: str, example: str) -> None:
        self.issues.setdefault(kind, []).append(example)

    def report(self) -> str | None:
        """One line per kind of repair or skip, with a few examples; None when the split was clean."""
        if not self.issues:
            return None
        parts = [f"{len(v)} {kind} (e.g. {'; '.join(v[:3])})" for kind, v in self.issues.items()]
        return f"{self.source}: " + ", ".join(parts)


def checked_box(split: Split, where: str, box: Sequence[float], width: int, height: int) -> list[float] | None:
    """Clip an xyxy box to the image (counted); None (counted) when nothing of positive area is left."""
    x1, y1, x2, y2 = (float(v) for v in box)
    clipped = False
    if width > 0 and height > 0:
        c = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
        clipped = max(abs(a - b) for a, b in zip(c, (x1, y1, x2, y2))) > CLIP_TOLERANCE
        x1, y1, x2, y2 = c
    if not (x2 > x1 and y2 > y1):
        split.note("boxes of zero or negative area (inside the image), dropped", where)
        return None
    if clipped:
        split.note("boxes reaching outside the image, clipped", where)
    return [x1, y1, x2, y2]


def make_record(path: Path, size: tuple[int, int], boxes: list, labels: list, crowd: list) -> ImageRecord:
    return ImageRecord(
        str(path),
        int(size[0]),
        int(size[1]),
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
        np.asarray(crowd, bool),
    )


@dataclass
class ImageFile:
    """One image while its annotations are read: boxes in the annotation's frame until :meth:`record`."""

    path: Path
    annotated: tuple[int, int] | None  # (width, height) the annotation says; None: not given
    objects: list[tuple[str, list[float], int, bool]] = field(default_factory=list)  # (where, xyxy, label, crowd)

    def record(self, split: Split, header: ImageHeader | None) -> ImageRecord:
        """The record in the upright file's pixels (see :func:`boxes_to_file_frame`), bad boxes clipped or dropped."""
        size = header.size if header else (self.annotated or (0, 0))
        raw = np.asarray([o[1] for o in self.objects], np.float32).reshape(-1, 4)
        boxes, scaled = boxes_to_file_frame(raw, self.annotated, header)
        if scaled and len(boxes):
            split.note(
                "images annotated at another size than the file's, boxes scaled to the file",
                f"{self.path.name}: {self.annotated[0]}x{self.annotated[1]} vs {size[0]}x{size[1]}",
            )
        kept, labels, crowd = [], [], []
        for (where, _, label, is_crowd), box in zip(self.objects, boxes):
            checked = checked_box(split, where, box, *size)
            if checked is not None:
                kept.append(checked)
                labels.append(label)
                crowd.append(is_crowd)
        return make_record(self.path, size, kept, labels, crowd)


def records_of(split: Split, images: Sequence[ImageFile]) -> Split:
    """Every image's record, its size read from the file's header (a few threads for large datasets)."""
    headers = read_headers([im.path for im in images])
    split.records = [im.record(split, h) for im, h in zip(images, headers)]
    return split


def as_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)
