"""The annotation files of COCO json, Pascal VOC and YOLO, read into :class:`~.records.Split` records."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS

from ...engine.task import DataError
from ..classify.data import scan_image_tree
from ..datasets_check import (
    check_class_names,
    pair_by_stem,
    read_names,
    read_text,
    refuse_duplicates,
    warn_unmatched,
)
from ..images import read_headers
from .records import (
    ImageFile,
    Split,
    as_number,
    checked_box,
    make_record,
    records_of,
)


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
    images: dict[Any, ImageFile] = {}
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
        images.setdefault(img["id"], ImageFile(path, (w, h) if ok else None))
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
            x, y, w, h = (as_number(v, "each bbox value") for v in bbox)
        except ValueError as e:
            raise DataError(f"{json_path}: {where}: {e}") from e
        image = images[image_id]
        crowd = bool(a.get("iscrowd", 0))
        image.objects.append((f"{image.path.name} {where}", [x, y, x + w, y + h], label_of[category], crowd))
    return records_of(split, list(images.values()))


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


VocImage = tuple[ImageFile, list[tuple[int, str, list[float], bool]], Path]


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
        parsed.append((ImageFile(image, (w, h) if w > 0 and h > 0 else None), objects, xml_path))
    return parsed


def voc_split(parsed: list[VocImage], classes: list[str], source: str) -> Split:
    """Records of parsed VOC images against a class list (objects of other classes are skipped, counted)."""
    split = Split([], list(classes), source)
    label_of = {c: i for i, c in enumerate(classes)}
    images = []
    for image, objects, xml_path in parsed:
        image = ImageFile(image.path, image.annotated)
        for j, name, box, difficult in objects:
            where = f"{xml_path.name} object {j} ({name})"
            if name not in label_of:
                split.note("objects of unknown classes, skipped", where)
                continue
            image.objects.append((where, box, label_of[name], difficult))
        images.append(image)
    return records_of(split, images)


def yolo_names(root: Path) -> list[str]:
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


def yolo_split_dirs(root: Path, names: Sequence[str]) -> tuple[Path, Path] | None:
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
            checked = checked_box(split, where, (box[0] * w, box[1] * h, box[2] * w, box[3] * h), w, h)
            if checked is not None:
                boxes.append(checked)
                labels.append(cls)
        split.records.append(make_record(image, (w, h), boxes, labels, [False] * len(boxes)))
    return split
