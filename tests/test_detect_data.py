"""Detection data: the three layouts give the same targets, bad annotations are repaired or named, SSD augmentation.

The helpers here (``scene``, ``write_coco``, ``write_voc``, ``write_yolo``) also serve the other
detection tests: tiny scenes of coloured rectangles on noise, whose boxes are exact.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobileone.engine.task import DataError
from mobileone.tasks.detect.data import (
    DetectionDataset,
    collate_detection,
    detect_format,
    eval_transform,
    load_splits,
    train_transform,
)

CLASSES = ["red", "blue"]
COLORS = [(220, 30, 30), (30, 30, 220)]


def scene(seed: int, width: int = 80, height: int = 64, count: int | None = None):
    """An RGB uint8 image with ``count`` (default 1-2) filled rectangles; returns (image, boxes xyxy, labels)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(100, 156, size=(height, width, 3)).astype(np.uint8)
    boxes, labels = [], []
    for i in range(1 + seed % 2 if count is None else count):
        w, h = int(rng.integers(14, 30)), int(rng.integers(14, 30))
        x0 = int(rng.integers(0, width // 2 - w // 2)) + (width // 2 if i else 0)
        x0 = min(x0, width - w)
        y0 = int(rng.integers(0, height - h))
        label = (seed + i) % 2
        img[y0 : y0 + h, x0 : x0 + w] = COLORS[label]
        boxes.append([x0, y0, x0 + w, y0 + h])
        labels.append(label)
    return img, boxes, labels


def make_scenes(n: int, offset: int = 0) -> list[tuple[str, np.ndarray, list, list]]:
    return [(f"img{offset + i:03d}.png", *scene(offset + i)) for i in range(n)]


def write_coco(root: Path, splits: dict[str, list], folder_names=("train", "val"), extra=None) -> Path:
    """COCO, Roboflow style: each split folder holds its images and one json."""
    for (split, items), folder in zip(splits.items(), folder_names):
        d = root / folder
        d.mkdir(parents=True)
        images, anns = [], []
        for i, (name, img, boxes, labels) in enumerate(items):
            Image.fromarray(img).save(d / name)
            images.append({"id": i + 1, "file_name": name, "width": img.shape[1], "height": img.shape[0]})
            for b, lab in zip(boxes, labels):
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i + 1,
                        "category_id": lab + 1,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "iscrowd": 0,
                    }
                )
        data = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
        }
        if extra:
            extra(split, data)
        (d / "_annotations.coco.json").write_text(json.dumps(data))
    return root


def write_voc(root: Path, splits: dict[str, list]) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split, items in splits.items():
        ids = []
        for name, img, boxes, labels in items:
            stem = Path(name).stem
            ids.append(stem)
            Image.fromarray(img).save(root / "JPEGImages" / name)
            objs = "".join(
                f"<object><name>{CLASSES[lab]}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
                f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                for b, lab in zip(boxes, labels)
            )
            (root / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><filename>{name}</filename><size><width>{img.shape[1]}</width>"
                f"<height>{img.shape[0]}</height><depth>3</depth></size>{objs}</annotation>"
            )
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def write_yolo(root: Path, splits: dict[str, list], roboflow: bool = False) -> Path:
    for split, items in splits.items():
        images = root / split / "images" if roboflow else root / "images" / split
        labels_dir = root / split / "labels" if roboflow else root / "labels" / split
        images.mkdir(parents=True)
        labels_dir.mkdir(parents=True)
        for name, img, boxes, labels in items:
            Image.fromarray(img).save(images / name)
            h, w = img.shape[:2]
            lines = [
                f"{lab} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                f"{(b[3] - b[1]) / h:.6f}"
                for b, lab in zip(boxes, labels)
            ]
            (labels_dir / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {c}\n" for i, c in enumerate(CLASSES)))
    return root


def tiny_dataset(root: Path, train: int = 6, val: int = 4) -> Path:
    return write_coco(root, {"train": make_scenes(train), "val": make_scenes(val, offset=100)})


def _targets(split) -> list[tuple[str, list, list]]:
    return [(Path(r.path).name, r.boxes.tolist(), r.labels.tolist()) for r in split.records]


@pytest.fixture(scope="module")
def scenes():
    return {"train": make_scenes(5), "val": make_scenes(3, offset=50)}


def test_every_layout_gives_the_same_targets(tmp_path, scenes):
    roots = {
        "coco": write_coco(tmp_path / "coco", scenes, folder_names=("train", "valid")),
        "voc": write_voc(tmp_path / "voc", scenes),
        "yolo": write_yolo(tmp_path / "yolo", scenes),
        "yolo-roboflow": write_yolo(tmp_path / "yolo_rf", scenes, roboflow=True),
    }
    # COCO's other layout: annotations/instances_<split>.json beside the image folders
    coco2 = tmp_path / "coco2"
    write_coco(coco2, scenes, folder_names=("train2017", "val2017"))
    (coco2 / "annotations").mkdir()
    for folder in ("train2017", "val2017"):
        (coco2 / folder / "_annotations.coco.json").rename(coco2 / "annotations" / f"instances_{folder}.json")
    roots["coco-instances"] = coco2
    expected = {
        s: [(n, [list(map(float, b)) for b in bx], lb) for n, _, bx, lb in items] for s, items in scenes.items()
    }
    for name, root in roots.items():
        assert detect_format(root) == name.split("-")[0]
        train, val = load_splits(root)
        assert train.classes == CLASSES, name
        for split, got in (("train", train), ("val", val)):
            got_t = sorted(_targets(got))
            assert [(n, lb) for n, _, lb in got_t] == [(n, lb) for n, _, lb in expected[split]], name
            for (_, gb, _), (_, eb, _) in zip(got_t, expected[split]):
                np.testing.assert_allclose(gb, eb, atol=2e-3, err_msg=name)  # YOLO stores 6 decimals


def test_forced_format_and_unknown_layout(tmp_path, scenes):
    root = write_voc(tmp_path / "voc", scenes)
    with pytest.raises(DataError, match="no COCO annotations found for the train and val split"):
        load_splits(root, "coco")
    (root / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"Pascal VOC needs .*Main/val.txt"):
        load_splits(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a detection dataset layout"):
        load_splits(tmp_path / "empty")


def test_bad_boxes_are_clipped_dropped_and_counted(tmp_path, scenes):
    def spoil(split, data):
        if split != "train":
            return
        a = data["annotations"]
        a.append({"id": 900, "image_id": 1, "category_id": 1, "bbox": [-5, -5, 20, 20]})  # reaches outside: clip
        a.append({"id": 901, "image_id": 1, "category_id": 2, "bbox": [10, 10, 0, 5]})  # zero width: drop
        a.append({"id": 902, "image_id": 1, "category_id": 2, "bbox": [500, 500, 10, 10]})  # wholly outside: drop
        a.append({"id": 903, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]})  # unknown category: skip
        data["images"].append({"id": 99, "file_name": "empty.png", "width": 80, "height": 64})  # no boxes: negative

    root = write_coco(tmp_path / "c", scenes, extra=spoil)
    Image.new("RGB", (80, 64)).save(root / "train" / "empty.png")
    with pytest.warns(UserWarning) as caught:
        train, _ = load_splits(root)
    message = " ".join(str(w.message) for w in caught)
    assert "1 boxes reaching outside the image, clipped" in message
    assert "2 boxes of zero or negative area (inside the image), dropped" in message
    assert "1 annotations of unknown category ids, skipped" in message and "category_id 7" in message
    first = train.records[0]
    assert [0.0, 0.0, 15.0, 15.0] in first.boxes.tolist()
    assert len(first.boxes) == len(scenes["train"][0][2]) + 1
    assert len(train.records) == 6 and len(train.records[-1].boxes) == 0  # the negative image is kept


@pytest.mark.parametrize(
    "layout, spoil, match",
    [
        (
            "coco",
            lambda r: (r / "train" / "_annotations.coco.json").write_text("{not json"),
            r"_annotations.coco.json: not valid JSON",
        ),
        (
            "coco",
            lambda r: _edit_json(r, lambda d: d["annotations"][1].update(bbox=[1, 2, "x", 4])),
            r"annotations\[1\] \(id 2\): each bbox value must be a finite number",
        ),
        ("coco", lambda r: _edit_json(r, lambda d: d.pop("categories")), r"the 'categories' list is missing"),
        (
            "voc",
            lambda r: (r / "Annotations" / "img001.xml").write_text("<annotation><object>"),
            r"img001.xml: malformed XML",
        ),
        (
            "voc",
            lambda r: _edit_xml(r, r"<xmax>\d+</xmax>", ""),
            r"img000.xml: object 0 \(red\) <bndbox> has no <xmax>",
        ),
        (
            "yolo",
            lambda r: (r / "labels" / "train" / "img002.txt").write_text("0 0.5 0.5 0.1\n"),
            r"img002.txt:1: expected 'class cx cy w h' \(5 values\)",
        ),
        (
            "yolo",
            lambda r: (r / "labels" / "train" / "img002.txt").write_text("1 0.5 0.5 0.1 0.1\nzero 1 1 1 1\n"),
            r"img002.txt:2: expected numbers",
        ),
        ("yolo", lambda r: (r / "data.yaml").write_text("names: [a, b\n"), r"data.yaml: malformed YAML"),
    ],
)
def test_malformed_annotations_name_the_file_and_entry(tmp_path, scenes, layout, spoil, match):
    root = {"coco": write_coco, "voc": write_voc, "yolo": write_yolo}[layout](tmp_path / layout, scenes)
    spoil(root)
    with pytest.raises(DataError, match=match):
        load_splits(root)


def _edit_json(root: Path, change, split: str = "train") -> None:
    path = root / split / "_annotations.coco.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_xml(root: Path, pattern: str, new: str) -> None:
    path = root / "Annotations" / "img000.xml"
    path.write_text(re.sub(pattern, new, path.read_text(), count=1))


def test_unknown_yolo_class_ids_are_skipped_and_counted(tmp_path, scenes):
    root = write_yolo(tmp_path / "y", scenes)
    label = root / "labels" / "train" / "img000.txt"
    label.write_text(label.read_text() + "5 0.5 0.5 0.2 0.2\n")
    with pytest.warns(UserWarning, match=r"1 boxes of unknown class ids, skipped \(e.g. .*img000.txt:\d: class 5\)"):
        load_splits(root)


def test_train_and_val_with_different_class_lists_are_refused(tmp_path, scenes):
    def rename(split, data):
        if split == "val":
            data["categories"][1]["name"] = "green"

    with pytest.raises(DataError, match=r"different class lists \(only in train: \['blue'\], only in val: \['green'\]"):
        load_splits(write_coco(tmp_path / "c", scenes, extra=rename))
    voc = write_voc(tmp_path / "v", scenes)
    (voc / "classes.txt").unlink()
    xml = voc / "Annotations" / f"{Path(scenes['val'][0][0]).stem}.xml"
    xml.write_text(
        xml.read_text()
        .replace("<name>red</name>", "<name>green</name>")
        .replace("<name>blue</name>", "<name>green</name>")
    )
    with pytest.raises(DataError, match=r"the val split has \['green'\]"):
        load_splits(voc)


def test_undecodable_images_are_skipped_and_counted(tmp_path, scenes):
    root = write_coco(tmp_path / "c", scenes)
    (root / "train" / "img001.png").write_bytes(b"not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, _ = load_splits(root)
    ds = DetectionDataset(train, train_transform(64, hflip=0.5), train=True)
    x, targets, bad = collate_detection([ds[(0, i)] for i in range(len(ds))])
    assert bad == [str(root / "train" / "img001.png")]
    assert x.shape == (4, 3, 64, 64) and len(targets) == 4


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path, scenes):
    train, _ = load_splits(write_coco(tmp_path / "c", scenes))
    ds = DetectionDataset(train, train_transform(64), train=True, seed=3)
    a, b, c = ds[(2, 1)], ds[(2, 1)], ds[(3, 1)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert not torch.equal(a[0], c[0])
    boxes = a[1]["boxes"]
    assert boxes.ndim == 2 and (boxes >= 0).all() and (boxes <= 64).all() and type(boxes) is torch.Tensor


def test_eval_items_keep_the_file_size_for_scaling_back(tmp_path, scenes):
    _, val = load_splits(write_coco(tmp_path / "c", scenes))
    x, t = DetectionDataset(val, eval_transform(48))[0]
    assert x.shape == (3, 48, 48) and t == {"index": 0, "size": (64, 80)}


def test_boxes_drawn_on_the_stored_pixels_of_an_exif_photo_turn_with_it(tmp_path):
    img, _, _ = scene(0)  # stored 80 x 64; EXIF orientation 6 shows it 64 wide and 80 high
    img[5:20, 10:30] = (255, 0, 255)  # the object, in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    for name, annotated, box in (("stored", (80, 64), [10, 5, 30, 20]), ("upright", (64, 80), [44, 10, 59, 30])):
        root = tmp_path / name
        items = [("a.png", img, [box], [0])]
        write_coco(root, {"train": items, "val": items})
        for split in ("train", "val"):
            Image.fromarray(img).save(root / split / "a.png", exif=exif)
            _edit_json(root, lambda d, a=annotated: d["images"][0].update(width=a[0], height=a[1]), split)
        _, val = load_splits(root)
        record = val.records[0]
        assert (record.width, record.height) == (64, 80), name  # the upright file's frame, whatever the annotation's
        image = np.asarray(DetectionDataset(val)[0][0])
        ys, xs = np.nonzero((image == (255, 0, 255)).all(-1))
        assert record.boxes.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], name


# ----------------------------------------------------------------------------- one frame, identity checks, layouts


def test_images_resized_after_annotation_are_scored_in_the_files_pixels(tmp_path, scenes):
    from mobileone.tasks.detect.evaluate import detection_metrics

    def doubled(split, data):  # annotated on images twice the size of the files on disk
        for img in data["images"]:
            img.update(width=img["width"] * 2, height=img["height"] * 2)
        for a in data["annotations"]:
            a["bbox"] = [2 * v for v in a["bbox"]]

    root = write_coco(tmp_path / "c", scenes, extra=doubled)
    with pytest.warns(UserWarning, match=r"annotated at another size than the file's, boxes scaled .*160x128 vs 80x64"):
        train, val = load_splits(root)
    truth = [(n, [list(map(float, b)) for b in bx], lb) for n, _, bx, lb in scenes["val"]]
    assert sorted(_targets(val)) == sorted(truth)
    assert [(r.width, r.height) for r in val.records] == [(80, 64)] * len(val.records)
    _, target = DetectionDataset(train, train=True)[0]  # training reads the same records
    assert target["boxes"].tolist() == train.records[0].boxes.tolist()
    # A perfect detector (the true boxes, in the files' pixels) scores 100 against the ground truth of mAP.
    perfect = [
        (i, torch.tensor(b, dtype=torch.float32), torch.ones(len(b)), torch.tensor(lb))
        for i, (_, _, b, lb) in enumerate(scenes["val"])
    ]
    assert detection_metrics(val.records, val.classes, perfect, range(len(perfect)))["map"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "spoil, match",
    [
        (lambda d: d["images"][1].update(id=1), r"1 image ids occur more than once: 1 \(2x\)"),
        (lambda d: d["images"][1].update(id=[2]), r"images\[1\] needs an integer or string 'id', got \[2\]"),
        (lambda d: d["images"][1].update(file_name="img000.png"), r"file names occur more than once: 'img000.png'"),
        (lambda d: d["categories"][1].update(name="red"), r"class names occur more than once: 'red' \(2x\)"),
        (lambda d: d["categories"][1].update(id=1), r"category ids occur more than once: 1 \(2x\)"),
        (lambda d: d.update(annotations=[]), r"none of its 5 images has a box to train on or score"),
    ],
)
def test_coco_identity_is_checked(tmp_path, scenes, spoil, match):
    root = write_coco(tmp_path / "c", scenes)
    _edit_json(root, spoil)
    with pytest.raises(DataError, match=match):
        load_splits(root)


def test_coco_as_shipped_annotations_folder_supercategories_and_bom(tmp_path, scenes):
    root = write_coco(tmp_path / "coco", scenes, folder_names=("train2017", "val2017"))
    (root / "annotations").mkdir()
    for folder in ("train2017", "val2017"):
        data = json.loads((root / folder / "_annotations.coco.json").read_text())
        (root / folder / "_annotations.coco.json").unlink()
        data["categories"] = [{"id": i + 1, "name": c, "supercategory": c} for i, c in enumerate(CLASSES)]
        if folder == "val2017":  # no blue object in val: "blue", its own supercategory, stays a class
            data["annotations"] = [a for a in data["annotations"] if a["category_id"] == 1]
        text = "\ufeff" + json.dumps(data)  # a byte-order mark, as Windows tools write
        (root / "annotations" / f"instances_{folder}.json").write_text(text, encoding="utf-8")
        captions = {"images": data["images"], "annotations": [{"image_id": 1, "caption": "x"}], "categories": []}
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps(captions))
    train, val = load_splits(root)
    assert train.classes == val.classes == CLASSES and sum(len(r.boxes) for r in train.records) > 0


def test_roboflow_extra_category_is_still_dropped(tmp_path, scenes):
    def roboflow(split, data):
        data["categories"] = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [
            {**c, "supercategory": "shapes"} for c in data["categories"]
        ]

    train, _ = load_splits(write_coco(tmp_path / "c", scenes, extra=roboflow))
    assert train.classes == CLASSES


def test_voc_difficult_reads_true_false_and_0_1(tmp_path, scenes):
    root = write_voc(tmp_path / "v", scenes)
    xml = root / "Annotations" / "img000.xml"
    for text, crowd in (("false", False), ("true", True), ("0", False), ("1", True)):
        xml.write_text(re.sub(r"<difficult>[^<]*</difficult>", f"<difficult>{text}</difficult>", xml.read_text()))
        train, _ = load_splits(root)
        assert train.records[0].crowd.tolist() == [crowd] * len(train.records[0].crowd), text
    xml.write_text(re.sub(r"<difficult>[^<]*</difficult>", "<difficult>maybe</difficult>", xml.read_text()))
    with pytest.raises(DataError, match=r"img000.xml: object 0 \(red\) has <difficult>maybe</difficult>; expected 0"):
        load_splits(root)


def test_voc_duplicate_class_names_are_refused(tmp_path, scenes):
    root = write_voc(tmp_path / "v", scenes)
    (root / "classes.txt").write_text("red\nblue\nred\n")
    with pytest.raises(DataError, match=r"classes.txt: 1 class names occur more than once: 'red' \(2x\)"):
        load_splits(root)


def test_yolo_label_files_are_matched_or_named(tmp_path, scenes):
    root = write_yolo(tmp_path / "y", scenes)
    labels = root / "labels" / "train"
    (labels / "img000.txt").rename(labels / "img000.TXT")  # another case: still its image's labels
    (labels / "img001.txt").write_text("\ufeff" + (labels / "img001.txt").read_text())  # a byte-order mark
    (labels / "stray.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # no image of that name
    (labels / "classes.txt").write_text("red\nblue\n")  # LabelImg's class list beside the labels: not a label file
    with pytest.warns(UserWarning, match=r"1 label files match no image and are not used: stray.txt \(a label file"):
        train, _ = load_splits(root)
    expected = [(n, [list(map(float, b)) for b in bx], lb) for n, _, bx, lb in scenes["train"]]
    got = sorted(_targets(train))
    assert [(n, lb) for n, _, lb in got] == [(n, lb) for n, _, lb in expected]
    for f in labels.iterdir():  # every label file named in another way: refused, never a run on 0 boxes
        f.rename(labels / f"x_{f.name}")
    with pytest.warns(UserWarning, match="7 label files match no image"):
        with pytest.raises(DataError, match=r"YOLO train\): none of its 5 images has a box .*labels/<split>/<image"):
            load_splits(root)


def test_yolo_names_keep_hash_and_refuse_duplicates(tmp_path, scenes):
    root = write_yolo(tmp_path / "y", scenes)
    (root / "data.yaml").unlink()
    (root / "classes.txt").write_text("\ufeff#1\nblue\n")  # '#1' is a name (classes.txt has no comments)
    train, _ = load_splits(root)
    assert train.classes == ["#1", "blue"]
    (root / "classes.txt").write_text("red\nred\n")
    with pytest.raises(DataError, match=r"classes.txt: 1 class names occur more than once: 'red'"):
        load_splits(root)
    (root / "classes.txt").unlink()
    (root / "data.yaml").write_text("names: [red, blue, blue]\n")
    with pytest.raises(DataError, match=r"data.yaml names: 1 class names occur more than once: 'blue'"):
        load_splits(root)


def test_coco_ids_of_the_wrong_type_are_skipped_and_counted(tmp_path, scenes):
    def spoil(split, data):
        if split == "train":
            data["annotations"] += [
                {"id": 900, "image_id": [1], "category_id": 1, "bbox": [1, 1, 5, 5]},
                {"id": 901, "image_id": 1, "category_id": {"id": 1}, "bbox": [1, 1, 5, 5]},
            ]

    with pytest.warns(UserWarning) as caught:
        load_splits(write_coco(tmp_path / "c", scenes, extra=spoil))
    message = " ".join(str(w.message) for w in caught)
    assert "1 annotations of unknown image ids, skipped (e.g. annotations[" in message and "image_id [1]" in message
    assert "1 annotations of unknown category ids, skipped" in message and "category_id {'id': 1}" in message
