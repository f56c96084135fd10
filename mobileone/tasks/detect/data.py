"""Detection data in the layouts annotation tools export, read into one form, with SSD augmentation.

Three layouts, detected automatically (``--data-format`` forces one):

- **COCO json**: each split folder holds its images and one ``.json`` (Roboflow: ``train/``,
  ``valid/``, ``_annotations.coco.json``; CVAT per subset), or ``annotations/instances_<split>.json``
  beside image folders (``train2017/``, ``images/<split>/`` or ``images/``).
- **Pascal VOC**: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{train,val}.txt``;
  classes from ``classes.txt`` / ``labels.txt`` if present, else the names found in the train split.
- **YOLO**: ``images/<split>/`` + ``labels/<split>/*.txt`` (Ultralytics) or ``<split>/images`` +
  ``<split>/labels`` (Roboflow), one ``class cx cy w h`` line per box (normalized; polygons become
  their bounding box), class names from ``data.yaml`` (``names``) or ``classes.txt``.

Every split becomes a list of :class:`ImageRecord` in **one frame**, the pixels of the image file as
viewers show it (EXIF orientation applied, as Ultralytics, CVAT and Roboflow's auto-orient have it),
converted once, when the annotations are read: boxes annotated on the pixels as stored turn with
the image, and boxes of an image resized after annotation (its recorded ``width``/``height`` are
not the file's) are scaled to the file, counted and reported (``mobileone.tasks.images``). Training,
validation, the COCO ground truth of mAP and ``eval`` all read these records. Bad annotations
never reach a data-loader worker: boxes reaching outside the image are clipped, boxes of zero or
negative area dropped, annotations of unknown categories skipped, each counted and reported once
per split; images without boxes stay, as negatives; a malformed file stops with a message naming
the file and the entry. What no single file shows is refused (``mobileone.tasks.datasets_check``):
duplicate image ids or file names, duplicate class names, a split without a box; label files that
match no image are warned about by name. Images that do not decode are skipped and counted by the
training loop, as in classification. Crowd regions (COCO ``iscrowd``) and VOC ``difficult``
objects (1/0 or true/false) are not trained on and are ignored by the evaluation, as COCO's does.

Augmentation (torchvision transforms v2 with ``tv_tensors.BoundingBoxes``) is SSD's: photometric
distortion, zoom-out, IoU crop, flip, resize to the square input; it is seeded per sample from
(seed, epoch, index) like classification's, so any number of workers or ranks sees the same boxes.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ...core.config import IMAGENET_MEAN, IMAGENET_STD
from ...engine.distributed import seeded
from ...engine.task import DataError
from ..datasets_check import (
    read_names,
    require_boxes,
)
from ..images import UnreadableImageError, load_image_and_boxes
from .formats import parse_voc, read_coco, read_yolo, voc_split, yolo_names, yolo_split_dirs
from .records import TRAIN_NAMES, VAL_NAMES, Split

FORMATS = ("coco", "voc", "yolo")


COCO_OTHER_FILES = ("captions_", "panoptic_", "image_info_")  # COCO annotation files without object boxes


BOXES_HINT = {  # where each layout keeps the boxes, for the message of a split without any
    "coco": " (each 'annotations' entry with a 'bbox' and the 'image_id' of an 'images' entry)",
    "voc": " (<object> entries in Annotations/<id>.xml for the ids of ImageSets/Main/<split>.txt)",
    "yolo": " (labels/<split>/<image stem>.txt beside images/<split>/, one 'class cx cy w h' line per box)",
}


def _split_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _coco_files(root: Path) -> dict[str, tuple[Path, Path]] | None:
    """{"train": (json, image dir), "val": ...} for either COCO layout; None if neither is there."""
    found = {}
    for split, names in (("train", TRAIN_NAMES), ("val", VAL_NAMES)):
        folder = _split_dir(root, names)
        jsons = sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")) if folder else []
        if len(jsons) > 1:
            raise DataError(
                f"{folder} holds {len(jsons)} json files ({', '.join(p.name for p in jsons[:4])}); a COCO "
                "split folder holds its images and one annotation file"
            )
        if jsons:
            found[split] = (jsons[0], folder)
    annotations = root / "annotations"
    if annotations.is_dir():
        # COCO ships captions_*, person_keypoints_* (people only) and instances_* (every object) side by side.
        jsons = [p for p in annotations.glob("*.json") if not p.name.lower().startswith(COCO_OTHER_FILES)]
        for p in sorted(jsons, key=lambda p: (not p.name.lower().startswith("instances_"), p.name)):
            tag = re.sub(r"^(instances|person_keypoints|stuff)_", "", p.stem, flags=re.IGNORECASE)
            split = "train" if "train" in tag.lower() else "val" if "val" in tag.lower() else None
            if split is None or split in found:
                continue
            folders = (root / tag, root / "images" / tag, root / "images")
            found[split] = (p, next((d for d in folders if d.is_dir()), root))
    return found or None


def detect_format(root: Path) -> str:
    """Which layout ``root`` holds: ``coco``, ``voc`` or ``yolo``."""
    if (root / "Annotations").is_dir() and (root / "ImageSets").is_dir():
        return "voc"
    if any((root / n).is_file() for n in ("data.yaml", "dataset.yaml", "classes.txt", "obj.names")):
        return "yolo"
    if (root / "labels").is_dir() or any((root / n / "labels").is_dir() for n in TRAIN_NAMES + VAL_NAMES):
        return "yolo"
    if _coco_files(root):
        return "coco"
    raise DataError(
        f"{root} is not a detection dataset layout I know. Expected one of: COCO (train/ and val/ each with images "
        "and one .json, or annotations/instances_train*.json + instances_val*.json with image folders); Pascal VOC "
        "(Annotations/, JPEGImages/, ImageSets/Main/train.txt and val.txt); YOLO (images/train, labels/train, "
        "images/val, labels/val and data.yaml or classes.txt). Force one with --data-format."
    )


def load_splits(root: str | os.PathLike, data_format: str = "auto") -> tuple[Split, Split]:
    """The train and val splits of a dataset folder, with one class list; repairs are reported once per split."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"detection data folder {root} does not exist")
    fmt = detect_format(root) if data_format == "auto" else data_format
    if fmt not in FORMATS:
        raise DataError(f"--data-format for detection must be one of {FORMATS} (or auto), got {fmt!r}")
    if fmt == "coco":
        files = _coco_files(root) or {}
        missing = [s for s in ("train", "val") if s not in files]
        if missing:
            raise DataError(
                f"{root}: no COCO annotations found for the {' and '.join(missing)} split; expected "
                f"{root}/train/<one>.json and {root}/val/<one>.json (val may be named valid/), or "
                f"{root}/annotations/instances_train*.json and instances_val*.json"
            )
        train, val = (read_coco(js, d, f"{js}") for js, d in (files["train"], files["val"]))
    elif fmt == "voc":
        main = root / "ImageSets" / "Main"
        for s in ("train", "val"):
            if not (main / f"{s}.txt").is_file():
                raise DataError(f"{root}: Pascal VOC needs {main}/{s}.txt (one image id per line)")
        listed = next((root / n for n in ("classes.txt", "labels.txt") if (root / n).is_file()), None)
        parsed = {sp: parse_voc(root, sp) for sp in ("train", "val")}
        names = {sp: sorted({o[1] for *_, objects, _ in p for o in objects}) for sp, p in parsed.items()}
        if listed:
            classes = read_names(listed)
        else:
            classes, extra = names["train"], sorted(set(names["val"]) - set(names["train"]))
            if extra:
                raise DataError(
                    f"{root}: train and val have different class lists: the val split has {extra[:10]}, "
                    "which the train split lacks; add them to train, or list the classes in "
                    f"{root}/classes.txt"
                )
        train, val = (voc_split(parsed[sp], classes, f"{root} (VOC {sp})") for sp in ("train", "val"))
    else:
        classes = yolo_names(root)
        dirs = {s: yolo_split_dirs(root, names) for s, names in (("train", TRAIN_NAMES), ("val", VAL_NAMES))}
        missing = [s for s, d in dirs.items() if d is None]
        if missing:
            raise DataError(
                f"{root}: no YOLO image folder for the {' and '.join(missing)} split; expected "
                f"{root}/images/train and {root}/images/val (labels/ beside them), or "
                f"{root}/train/images and {root}/valid/images"
            )
        train, val = (read_yolo(root, *dirs[s], classes, f"{root} (YOLO {s})") for s in ("train", "val"))
    if train.classes != val.classes:
        only_t, only_v = sorted(set(train.classes) - set(val.classes)), sorted(set(val.classes) - set(train.classes))
        change = f"only in train: {only_t[:10]}, only in val: {only_v[:10]}" if only_t or only_v else "another order"
        raise DataError(
            f"{root}: train and val have different class lists ({change}); both splits must use the "
            "same categories, in the same order"
        )
    if not train.classes:
        raise DataError(f"{root}: no object classes found")
    for s in (train, val):
        if not s.records:
            raise DataError(f"{s.source}: no images")
        message = s.report()
        if message:
            warnings.warn(message, stacklevel=2)
        require_boxes(s.records, s.source, BOXES_HINT[fmt])
    return train, val


def train_transform(
    img_size: int,
    hflip: float = 0.5,
    zoom_out: float = 4.0,
    photometric: bool = True,
    iou_crop: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """SSD's augmentation: photometric distortion, zoom-out (up to ``zoom_out`` x, filled with the mean),
    IoU crop, horizontal flip, resize to ``img_size`` square; boxes that leave the image are dropped.
    Each step can be left out (``zoom_out=1`` for none)."""
    fill = {tv_tensors.Image: tuple(round(255 * m) for m in mean), "others": 0}
    steps: list[Callable] = [v2.ToImage()]
    if photometric:
        steps.append(v2.RandomPhotometricDistort(p=0.5))
    if zoom_out > 1:
        steps.append(v2.RandomZoomOut(fill=fill, side_range=(1.0, zoom_out), p=0.5))
    if iou_crop:
        steps.append(v2.RandomIoUCrop())
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [
        v2.Resize((img_size, img_size), antialias=True),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(steps)


def eval_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Resize to the detector's square input (no crop: every box stays), scale to [0, 1], normalize."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((img_size, img_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class DetectionDataset(Dataset):
    """Images and boxes of one split. Keys are an index or ``(epoch, index)``; items are ``(image, target)``,
    or ``(None, path)`` for an image that does not decode.

    With ``train=True`` the target holds ``boxes`` (xyxy pixels of the transformed image) and
    ``labels``, crowd boxes left out; otherwise ``index`` and the image's ``size`` (h, w), for
    scaling detections back to the file's pixels (the evaluation reads the boxes from ``records``).
    """

    def __init__(self, split: Split, transform: Callable | None = None, train: bool = False, seed: int = 0) -> None:
        self.records, self.classes, self.source = split.records, split.classes, split.source
        self.transform, self.train, self.seed, self.epoch = transform, train, seed, 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        r = self.records[index]
        keep = ~r.crowd if self.train else slice(0, 0)
        try:
            img, boxes = load_image_and_boxes(r.path, r.boxes[keep], (r.width, r.height))
        except UnreadableImageError:
            return None, r.path
        if not self.train:
            return (self.transform(img) if self.transform else img), {"index": index, "size": (r.height, r.width)}
        target = {"boxes": boxes, "labels": torch.from_numpy(r.labels[keep])}
        if self.transform is None:
            return img, target
        x, t = seeded(self.seed, epoch, index, self.transform, img, target)
        return x, {"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]}


def collate_detection(batch: list[tuple[Any, Any]]) -> tuple[torch.Tensor | None, list[dict[str, Any]], list[str]]:
    """Stack the images that decoded; targets stay a list of dicts; the paths of the others go beside them."""
    good = [(x, t) for x, t in batch if x is not None]
    bad = [t for x, t in batch if x is None]
    if not good:
        return None, [], bad
    return torch.stack([x for x, _ in good]), [t for _, t in good], bad
