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

import json
import logging
import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from ...core.config import IMAGENET_MEAN, IMAGENET_STD
from ...engine.distributed import seeded
from ...engine.task import DataError
from ..classify.data import scan_image_tree
from ..datasets_check import (
    check_class_names,
    pair_by_stem,
    read_names,
    read_text,
    refuse_duplicates,
    require_boxes,
    warn_unmatched,
)
from ..images import ImageHeader, UnreadableImageError, boxes_to_file_frame, load_image_and_boxes, read_headers

log = logging.getLogger("mobileone")
FORMATS = ("coco", "voc", "yolo")
TRAIN_NAMES, VAL_NAMES = ("train",), ("val", "valid", "validation")
COCO_OTHER_FILES = ("captions_", "panoptic_", "image_info_")  # COCO annotation files without object boxes
BOXES_HINT = {  # where each layout keeps the boxes, for the message of a split without any
    "coco": " (each 'annotations' entry with a 'bbox' and the 'image_id' of an 'images' entry)",
    "voc": " (<object> entries in Annotations/<id>.xml for the ids of ImageSets/Main/<split>.txt)",
    "yolo": " (labels/<split>/<image stem>.txt beside images/<split>/, one 'class cx cy w h' line per box)",
}
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


# --- reading the boxes ---------------------------------------------------------------------------------------


def _checked_box(split: Split, where: str, box: Sequence[float], width: int, height: int) -> list[float] | None:
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


def _record(path: Path, size: tuple[int, int], boxes: list, labels: list, crowd: list) -> ImageRecord:
    return ImageRecord(
        str(path),
        int(size[0]),
        int(size[1]),
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
        np.asarray(crowd, bool),
    )


@dataclass
class _Image:
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
            checked = _checked_box(split, where, box, *size)
            if checked is not None:
                kept.append(checked)
                labels.append(label)
                crowd.append(is_crowd)
        return _record(self.path, size, kept, labels, crowd)


def _records(split: Split, images: Sequence[_Image]) -> Split:
    """Every image's record, its size read from the file's header (a few threads for large datasets)."""
    headers = read_headers([im.path for im in images])
    split.records = [im.record(split, h) for im, h in zip(images, headers)]
    return split


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _load_json(json_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text(json_path))
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, dict):
        raise DataError(
            f"{json_path}: expected a COCO object with images, annotations and categories, got a {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(
                f"{json_path}: the {key!r} list is missing or not a list (COCO needs images, annotations, categories)"
            )
    return data


def _coco_categories(json_path: Path, data: dict[str, Any]) -> dict[int, str]:
    """Category id -> name, without the extra category Roboflow adds: the dataset's name, used by no
    annotation, the supercategory of every other category and not its own (COCO's own categories often
    are their own supercategory: "person" in "person")."""
    categories = data["categories"]
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DataError(f"{json_path}: categories[{i}] needs an integer 'id' and a string 'name', got {c!r:.120}")
    refuse_duplicates(
        [c["id"] for c in categories], "category ids", f"{json_path}", "give every category an id of its own"
    )
    used = {c for a in data["annotations"] if isinstance(a, dict) and isinstance(c := a.get("category_id"), int)}

    def roboflow_extra(c: dict) -> bool:
        others = [o for o in categories if o is not c]
        return (
            c["id"] not in used
            and bool(others)
            and c.get("supercategory") != c["name"]
            and all(o.get("supercategory") == c["name"] for o in others)
        )

    cats = {c["id"]: c["name"] for c in categories if not roboflow_extra(c)}
    check_class_names([cats[k] for k in sorted(cats)], f"{json_path} categories")
    return cats


def read_coco(json_path: Path, image_dir: Path, source: str) -> Split:
    """A COCO json (images, annotations, categories) whose ``file_name`` entries live under ``image_dir``."""
    data = _load_json(json_path)
    cats = _coco_categories(json_path, data)
    cat_ids = sorted(cats)
    label_of = {cid: i for i, cid in enumerate(cat_ids)}
    split = Split([], [cats[c] for c in cat_ids], source)
    images: dict[Any, _Image] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
            raise DataError(f"{json_path}: images[{i}] needs an 'id' and a 'file_name', got {img!r:.120}")
        if isinstance(img.get("id"), bool) or not isinstance(img.get("id"), (int, str)):
            raise DataError(f"{json_path}: images[{i}] needs an integer or string 'id', got {img.get('id')!r:.60}")
        path = image_dir / img["file_name"]
        if not path.is_file() and (image_dir / Path(img["file_name"]).name).is_file():
            path = image_dir / Path(img["file_name"]).name
        w, h = img.get("width"), img.get("height")
        ok = isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and w > 0 and h > 0
        images.setdefault(img["id"], _Image(path, (w, h) if ok else None))
    ids = [img["id"] for img in data["images"]]
    fix = "each image needs one entry with an id of its own (merge their annotations), or the boxes of two images mix"
    refuse_duplicates(ids, "image ids", f"{json_path}", fix)
    refuse_duplicates([img["file_name"] for img in data["images"]], "file names", f"{json_path} images", fix)
    for i, a in enumerate(data["annotations"]):
        where = f"annotations[{i}] (id {a.get('id') if isinstance(a, dict) else '?'})"
        if not isinstance(a, dict):
            raise DataError(f"{json_path}: {where} is not an object")
        image_id = a.get("image_id")
        if not isinstance(image_id, Hashable) or image_id not in images:
            split.note("annotations of unknown image ids, skipped", f"{where}: image_id {image_id!r:.40}")
            continue
        category = a.get("category_id")
        if not isinstance(category, Hashable) or category not in label_of:
            split.note("annotations of unknown category ids, skipped", f"{where}: category_id {category!r:.40}")
            continue
        bbox = a.get("bbox")
        try:
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"bbox must be [x, y, width, height], got {bbox!r:.80}")
            x, y, w, h = (_number(v, "each bbox value") for v in bbox)
        except ValueError as e:
            raise DataError(f"{json_path}: {where}: {e}") from e
        image = images[image_id]
        crowd = bool(a.get("iscrowd", 0))
        image.objects.append((f"{image.path.name} {where}", [x, y, x + w, y + h], label_of[category], crowd))
    return _records(split, list(images.values()))


def _xml_text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{where} has no <{tag}>")
    return child.text.strip()


def _flag(node: ET.Element, tag: str, where: str) -> bool:
    """A VOC yes/no field (``<difficult>``, ``<truncated>``): 1/0, true/false, yes/no; absent is no."""
    text = (node.findtext(tag) or "0").strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", ""):
        return False
    raise ValueError(f"{where} has <{tag}>{text}</{tag}>; expected 0 or 1 (or true/false)")


VocImage = tuple[_Image, list[tuple[int, str, list[float], bool]], Path]


def parse_voc(root: Path, split_name: str) -> list[VocImage]:
    """The images of ``ImageSets/Main/<split>.txt`` with their objects (index, name, xyxy, difficult)."""
    ids_file = root / "ImageSets" / "Main" / f"{split_name}.txt"
    ids = [line.split()[0] for line in read_text(ids_file).splitlines() if line.strip()]
    refuse_duplicates(ids, "image ids", str(ids_file), "list each image once, or its boxes count twice")
    parsed = []
    for image_id in ids:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DataError(f"{ids_file} lists {image_id!r} but {xml_path} does not exist")
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            raise DataError(f"{xml_path}: malformed XML ({e})") from e
        objects = []
        try:
            size = tree.find("size")
            w = int(float(_xml_text(size, "width", "<size>"))) if size is not None else 0
            h = int(float(_xml_text(size, "height", "<size>"))) if size is not None else 0
            for j, obj in enumerate(tree.findall("object")):
                name = _xml_text(obj, "name", f"object {j}")
                bnd = obj.find("bndbox")
                if bnd is None:
                    raise ValueError(f"object {j} ({name}) has no <bndbox>")
                where = f"object {j} ({name}) <bndbox>"
                box = [float(_xml_text(bnd, t, where)) for t in ("xmin", "ymin", "xmax", "ymax")]
                objects.append((j, name, box, _flag(obj, "difficult", f"object {j} ({name})")))
        except ValueError as e:
            raise DataError(f"{xml_path}: {e}") from e
        filename = (tree.findtext("filename") or "").strip()
        image = root / "JPEGImages" / filename if filename else None
        if image is None or not image.is_file():
            found = sorted((root / "JPEGImages").glob(f"{image_id}.*"))
            image = found[0] if found else root / "JPEGImages" / f"{image_id}.jpg"
        parsed.append((_Image(image, (w, h) if w > 0 and h > 0 else None), objects, xml_path))
    return parsed


def voc_split(parsed: list[VocImage], classes: list[str], source: str) -> Split:
    """Records of parsed VOC images against a class list (objects of other classes are skipped, counted)."""
    split = Split([], list(classes), source)
    label_of = {c: i for i, c in enumerate(classes)}
    images = []
    for image, objects, xml_path in parsed:
        image = _Image(image.path, image.annotated)
        for j, name, box, difficult in objects:
            where = f"{xml_path.name} object {j} ({name})"
            if name not in label_of:
                split.note("objects of unknown classes, skipped", where)
                continue
            image.objects.append((where, box, label_of[name], difficult))
        images.append(image)
    return _records(split, images)


def _yolo_names(root: Path) -> list[str]:
    for name in ("data.yaml", "dataset.yaml"):
        path = root / name
        if path.is_file():
            import yaml

            try:
                data = yaml.safe_load(read_text(path))
            except yaml.YAMLError as e:
                raise DataError(f"{path}: malformed YAML ({e})") from e
            names = data.get("names") if isinstance(data, dict) else None
            if isinstance(names, dict) and all(isinstance(k, int) for k in names):
                if sorted(names) != list(range(len(names))):
                    raise DataError(f"{path}: names must be numbered 0..{len(names) - 1}, got ids {sorted(names)}")
                return check_class_names([str(names[i]) for i in range(len(names))], f"{path} names")
            if isinstance(names, list) and names:
                return check_class_names([str(n) for n in names], f"{path} names")
            raise DataError(f"{path}: expected 'names' as a list or a mapping 0: name, 1: name, ...; got {names!r:.80}")
    for name in ("classes.txt", "obj.names"):
        path = root / name
        if path.is_file():
            return read_names(path)
    raise DataError(f"{root}: YOLO data needs its class names in data.yaml ('names: [...]') or classes.txt")


def _yolo_split_dirs(root: Path, names: Sequence[str]) -> tuple[Path, Path] | None:
    for n in names:
        for images, labels in ((root / "images" / n, root / "labels" / n), (root / n / "images", root / n / "labels")):
            if images.is_dir():
                if not labels.is_dir():
                    raise DataError(
                        f"{images} has no labels folder beside it ({labels}); YOLO keeps one .txt per image there"
                    )
                return images, labels
    return None


YOLO_NAME_FILES = ("classes.txt", "obj.names")  # LabelImg writes classes.txt beside the label files


def _yolo_files(images_dir: Path, labels_dir: Path) -> tuple[list[Path], dict[Path, Path]]:
    """The images of a split and each one's label file; label files that match no image are warned about."""
    exts = tuple(IMG_EXTENSIONS)
    images = [p for p in scan_image_tree(images_dir).files if p.suffix.lower() in exts]
    labels = [
        p
        for p in scan_image_tree(labels_dir).files
        if p.suffix.lower() == ".txt" and p.name.lower() not in YOLO_NAME_FILES
    ]
    pairs, unmatched = pair_by_stem(images, images_dir, labels, labels_dir, "label file")
    warn_unmatched(
        unmatched,
        labels_dir,
        "label files",
        f"a label file is named after its image: {images_dir}/a.jpg -> {labels_dir}/a.txt",
    )
    return images, pairs


def read_yolo(root: Path, images_dir: Path, labels_dir: Path, classes: list[str], source: str) -> Split:
    """A YOLO split: every image under ``images_dir`` with its ``labels_dir/<stem>.txt`` (none: a negative).

    Coordinates are fractions of the image as viewers show it (Ultralytics reads images upright).
    """
    split = Split([], list(classes), source)
    files, label_of = _yolo_files(images_dir, labels_dir)
    headers = read_headers(files)
    for image, header in zip(files, headers):
        label_file = label_of.get(image)
        w, h = header.size if header else (0, 0)
        boxes, labels = [], []
        lines = read_text(label_file).splitlines() if label_file else []
        for n, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{label_file}:{n}"
            try:
                values = [float(v) for v in fields]
            except ValueError:
                raise DataError(f"{where}: expected numbers 'class cx cy w h', got {line!r:.80}") from None
            if len(values) < 5 or (len(values) > 5 and len(values) % 2 == 0):
                raise DataError(
                    f"{where}: expected 'class cx cy w h' (5 values) or a polygon 'class x1 y1 x2 y2 "
                    f"...', got {len(values)} values"
                )
            if not values[0].is_integer():
                raise DataError(f"{where}: the class must be an integer index, got {fields[0]!r}")
            cls = int(values[0])
            if not 0 <= cls < len(classes):
                split.note("boxes of unknown class ids, skipped", f"{where}: class {cls}")
                continue
            if len(values) == 5:
                cx, cy, bw, bh = values[1:]
                box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
            else:
                xs, ys = values[1::2], values[2::2]
                box = (min(xs), min(ys), max(xs), max(ys))
            checked = _checked_box(split, where, (box[0] * w, box[1] * h, box[2] * w, box[3] * h), w, h)
            if checked is not None:
                boxes.append(checked)
                labels.append(cls)
        split.records.append(_record(image, (w, h), boxes, labels, [False] * len(boxes)))
    return split


# --- finding the layout ----------------------------------------------------------------------------------------


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
        classes = _yolo_names(root)
        dirs = {s: _yolo_split_dirs(root, names) for s, names in (("train", TRAIN_NAMES), ("val", VAL_NAMES))}
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


# --- tensors -----------------------------------------------------------------------------------------------------


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
