"""Segmentation data: both layouts, joint augmentation, collation, and every bad input named in docs/segmentation.md."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from mobileone.engine import DataError
from mobileone.tasks.segment.builtin import BUILTIN_CLASSES, make_scene
from mobileone.tasks.segment.data import (
    SegmentationDataset,
    collate_masks,
    detect_format,
    load_splits,
    train_transform,
)
from mobileone.tasks.segment.masks import VOC_CLASSES, voc_palette

from .segment_data import COLOURS, make_masks_dataset, make_voc_dataset


def test_masks_layout_with_and_without_classes_txt(tmp_path):
    root = make_masks_dataset(tmp_path / "d", val_sizes=((40, 24),))
    samples, classes, fmt = load_splits(root)
    assert fmt == "masks" and classes == ["background", "red", "green", "blue"]
    assert len(samples["train"]) == 8 and len(samples["val"]) == 5
    ds = SegmentationDataset(samples["val"], classes)
    x, y = ds[4]  # full resolution: no resize, no crop
    assert x.shape == (3, 40, 24) and y.shape == (40, 24) and y.dtype == torch.int64 and x.dtype == torch.float32
    (root / "classes.txt").unlink()
    assert load_splits(root)[1] == ["0", "1", "2", "3"]  # read off the masks


def test_voc_layout_is_detected_also_inside_vocdevkit(tmp_path):
    root = make_voc_dataset(tmp_path / "VOCdevkit" / "VOC2012")
    for given in (root, tmp_path, tmp_path / "VOCdevkit"):
        assert detect_format(given) == (root, "voc")
    samples, classes, fmt = load_splits(tmp_path)
    assert fmt == "voc" and classes == list(VOC_CLASSES) and len(samples["train"]) == 4
    _, mask = SegmentationDataset(samples["train"], classes).read(0)
    assert set(np.unique(mask)) <= {0, 1, 2, 15, 255} and (mask[0] == 255).all()  # palette indices, not colours
    with pytest.raises(DataError, match="not a segmentation dataset in the masks layout"):
        detect_format(tmp_path, "masks")


def test_joint_augmentation_keeps_image_and_mask_aligned():
    img = np.zeros((48, 64, 3), np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    for c, colour in COLOURS.items():  # vertical bands: colour c <-> class c
        img[:, 16 * c : 16 * (c + 1)] = colour
        mask[:, 16 * c : 16 * (c + 1)] = c
    ds = SegmentationDataset([], ["background", "red", "green", "blue"], train_transform(32, hflip=0.5))
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    seen_pad = False
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = ds.transform(
            tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask))
        )
        assert x.shape == (3, 32, 32) and y.shape == (32, 32)
        rgb = ((x * std + mean) * 255).round()
        for c, colour in COLOURS.items():
            inside = y == c
            if inside.any():  # away from resampled edges, a class-c pixel has colour c
                core = inside & torch.roll(inside, 1, 1) & torch.roll(inside, -1, 1)
                assert (rgb[:, core] - torch.tensor(colour)[:, None]).abs().max() <= 2
        seen_pad |= bool((y == 255).any())
    assert seen_pad  # scales below 1 pad the crop, and the padding is ignore


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    root = make_masks_dataset(tmp_path / "d", size=40)
    samples, classes, _ = load_splits(root)
    ds = SegmentationDataset(samples["train"], classes, train_transform(32), seed=5)
    a, b, c = ds[(2, 3)], ds[(2, 3)], ds[(3, 3)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_collate_stacks_one_size_and_lists_several():
    x1, x2 = torch.zeros(3, 8, 8), torch.zeros(3, 8, 10)
    y1, y2 = torch.zeros(8, 8, dtype=torch.long), torch.zeros(8, 10, dtype=torch.long)
    images, masks, bad = collate_masks([(x1, y1), (None, "broken.png"), (x1, y1)])
    assert images.shape == (2, 3, 8, 8) and masks.shape == (2, 8, 8) and bad == ["broken.png"]
    images, masks, _ = collate_masks([(x1, y1), (x2, y2)])
    assert isinstance(images, list) and [m.shape[-1] for m in masks] == [8, 10]
    assert collate_masks([(None, "a"), (None, "b")]) == (None, None, ["a", "b"])


# ----------------------------------------------------------------------------- bad inputs, one each


def _mask(root, split="train", i=0):
    return root / split / "masks" / f"{i:03d}.png"


def test_mask_of_another_size_than_its_image(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    Image.fromarray(np.zeros((30, 32), np.uint8), "L").save(_mask(root, i=2))
    with pytest.raises(DataError, match=r"1 mask\(s\) differ in size .*002.png 32x30 vs image 002.png 32x32"):
        load_splits(root)


def test_mask_values_neither_class_nor_ignore(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    m = np.zeros((32, 32), np.uint8)
    m[5, 5], m[6, 6] = 9, 255
    Image.fromarray(m, "L").save(_mask(root, i=1))
    samples, classes, _ = load_splits(root)  # with classes.txt the values are checked as each mask is read
    ds = SegmentationDataset(samples["train"], classes)
    with pytest.raises(DataError, match=r"001.png holds values \[9\] that are neither classes 0..3 nor the ignore"):
        ds[1]


def test_image_without_a_mask_is_skipped_and_counted(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    _mask(root, i=0).unlink()
    _mask(root, i=5).unlink()
    with pytest.warns(UserWarning, match=r"skipped 2 image\(s\) without a mask"):
        samples, _, _ = load_splits(root)
    assert len(samples["train"]) == 6


def test_rgb_palette_masks_say_what_was_found(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    index = np.asarray(Image.open(_mask(root, i=3)))
    Image.fromarray(voc_palette()[index]).save(_mask(root, i=3))  # colour-coded, as many tools save them
    with pytest.raises(
        DataError, match=r"003.png is a colour \(RGB\) image with \d colours: \[\(0, 0, 0\).*Pascal VOC"
    ):
        load_splits(root)


def test_16_bit_masks(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    Image.fromarray(np.full((32, 32), 300, np.uint16)).save(_mask(root, i=4))
    with pytest.raises(DataError, match=r"004.png is a 16-bit image .*largest value 300.*must be 8-bit"):
        load_splits(root)


def test_train_and_val_with_different_class_lists(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    (root / "classes.txt").unlink()
    (root / "train" / "classes.txt").write_text("background\nred\ngreen\nblue\n")
    (root / "val" / "classes.txt").write_text("background\nred\nblue\ngreen\n")
    with pytest.raises(DataError, match="list different classes .*another order"):
        load_splits(root)
    (root / "val" / "classes.txt").unlink()
    m = np.asarray(Image.open(_mask(root, "val", 0))).copy()
    m[0, 0] = 7
    Image.fromarray(m, "L").save(_mask(root, "val", 0))
    (root / "train" / "classes.txt").unlink()  # no list at all: val may not hold a value train lacks
    with pytest.raises(DataError, match=r"val masks hold class values \[7\] that no training mask has"):
        load_splits(root)


def test_other_layout_mistakes(tmp_path):
    root = make_masks_dataset(tmp_path / "d", classes_txt=False)
    for p in (root / "train" / "masks").glob("*.png"):  # binary masks written as 0 / 255
        m = np.asarray(Image.open(p))
        Image.fromarray(np.where(m > 0, 255, 0).astype(np.uint8), "L").save(p)
    with pytest.raises(DataError, match="Binary masks saved as 0/255"):
        load_splits(root)
    shutil.copy(_mask(root, "val", 0), root / "val" / "masks" / "extra.jpg")
    with pytest.raises(DataError, match="lossy masks"):
        load_splits(root)
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "nothing")
    with pytest.raises(DataError, match="detection format"):
        detect_format(root, "coco")


def test_builtin_scene_masks_come_from_the_scans():
    rng = np.random.default_rng(0)
    photos = [np.full((80, 90, 3), 100, np.uint8)]
    digits = np.zeros((2, 8, 8), np.uint8)
    digits[:, 2:6, 3:5] = 255  # a bar
    scene, mask = make_scene(rng, photos, digits, np.array([4, 7]), 64)
    assert scene.shape == (64, 64, 3) and mask.shape == (64, 64)
    digit_classes = set(np.unique(mask).tolist()) - {0, 255}
    assert digit_classes and digit_classes <= {5, 8}  # digit d is class d + 1
    assert BUILTIN_CLASSES[5] == "digit_4" and len(BUILTIN_CLASSES) == 11
    on_digits = np.isin(mask, list(digit_classes))
    assert scene[on_digits].mean() > scene[mask == 0].mean() + 40  # bright ink on a dimmed photo


def test_unreadable_files_come_back_as_counted_samples(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    samples, classes, _ = load_splits(root)
    (root / "train" / "images" / "001.png").write_bytes(b"\x89PNG broken")
    _mask(root, i=2).write_bytes(b"")
    ds = SegmentationDataset(samples["train"], classes)
    assert ds[1] == (None, str(root / "train" / "images" / "001.png")) and ds[2][0] is None
    images, masks, bad = collate_masks([ds[0], ds[1], ds[2]])
    assert images.shape == (1, 3, 32, 32) and len(bad) == 2


# ----------------------------------------------------------------------------- one reader, identity checks


def _exif_pair(root: Path, name: str, size: tuple[int, int], mask_frame: str) -> None:
    """An image stored sideways (EXIF orientation 6) whose left third is red (class 1), and its mask,
    saved in the stored frame or already upright."""
    w, h = size
    img = np.full((h, w, 3), 20, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    img[:, : w // 3], mask[:, : w // 3] = (230, 20, 20), 1
    img[: h // 4, w // 2 :], mask[: h // 4, w // 2 :] = (20, 230, 20), 2
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(root / "images" / f"{name}.png", exif=exif)
    m = Image.fromarray(mask, "L")
    (m if mask_frame == "stored" else m.transpose(Image.Transpose.ROTATE_270)).save(root / "masks" / f"{name}.png")


def test_exif_orientation_turns_image_and_mask_together(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    cases = (("wide_stored", (40, 24), "stored"), ("wide_upright", (40, 24), "upright"), ("square", (32, 32), "stored"))
    for name, size, frame in cases:
        _exif_pair(root / "train", name, size, frame)
    samples, classes, _ = load_splits(root)  # the sizes of both frames pass the up-front check
    ds = SegmentationDataset(samples["train"], classes)
    for name, (w, h), _ in cases:
        image, mask = ds.read(next(i for i, (p, _) in enumerate(ds.samples) if p.stem == name))
        assert image.size == (h, w) and mask.shape == (w, h), name  # upright: the sides swap
        pixels = np.asarray(image)
        assert ((pixels[..., 0] > 200) == (mask == 1)).all() and ((pixels[..., 1] > 200) == (mask == 2)).all(), name


def test_binary_masks_saved_0_255_beside_classes_txt_are_refused(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    (root / "classes.txt").write_text("background\nobject\n")
    for p in (root / "train" / "masks").glob("*.png"):
        Image.fromarray(np.where(np.asarray(Image.open(p)) > 0, 255, 0).astype(np.uint8), "L").save(p)
    with pytest.raises(DataError, match=r"\(train\): its 8 masks hold only class 0 \('background'\) .*Binary masks"):
        load_splits(root)


def test_a_split_with_one_class_is_refused(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    for p in (root / "val" / "masks").glob("*.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(p)
    with pytest.raises(DataError, match=r"\(val\): its 4 masks hold only class 0 .*nothing to learn or score"):
        load_splits(root)


def test_classes_txt_names_are_every_line(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    (root / "classes.txt").write_text("\ufeffbackground\n#1\ngreen\nblue\n", encoding="utf-8")
    assert load_splits(root)[1] == ["background", "#1", "green", "blue"]
    (root / "classes.txt").write_text("background\nred\nred\nblue\n")
    with pytest.raises(DataError, match=r"classes.txt: 1 class names occur more than once: 'red' \(2x\)"):
        load_splits(root)


def test_decompression_bombs_are_unreadable_samples(tmp_path):
    from .classify_data import write_bomb

    root = make_masks_dataset(tmp_path / "d")
    write_bomb(root / "train" / "images" / "001.png")
    write_bomb(_mask(root, i=2))
    samples, classes, _ = load_splits(root)
    ds = SegmentationDataset(samples["train"], classes)
    assert ds[1] == (None, str(root / "train" / "images" / "001.png"))
    assert ds[2] == (None, str(root / "train" / "images" / "002.png"))


def test_a_bad_mask_value_reads_the_same_with_data_workers(tmp_path):
    root = make_masks_dataset(tmp_path / "d")
    samples, classes, _ = load_splits(root)
    m = np.zeros((32, 32), np.uint8)
    m[3, 3] = 9
    Image.fromarray(m, "L").save(_mask(root, i=0))
    ds = SegmentationDataset(samples["train"][:1], classes)
    with pytest.raises(DataError) as in_process:
        ds[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_masks)
    with pytest.raises(DataError) as in_worker:
        next(iter(loader))
    assert str(in_worker.value) == str(in_process.value) and "holds values [9]" in str(in_process.value)


def test_voc_ids_listed_twice_are_refused(tmp_path):
    root = make_voc_dataset(tmp_path / "voc")
    listing = root / "ImageSets" / "Segmentation" / "train.txt"
    listing.write_text(listing.read_text() + "2007_train_001\n")
    with pytest.raises(DataError, match=r"train.txt: 1 image ids occur more than once: '2007_train_001' \(2x\)"):
        load_splits(root)
