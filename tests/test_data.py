import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobileone.tasks.classify.data import (
    DataError,
    ImageFolderDataset,
    builtin_dataset,
    check_splits,
    collate_skip_bad,
    digits_split,
    eval_transform,
    load_image,
    train_transform,
)


def write_folder(root: Path, classes=("a", "b"), n: int = 3, size: int = 12) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (40 * c, 10 * i, 200)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
        (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
        (lambda: Image.new("LA", (4, 4), (50, 255)), (50, 50, 50)),
        (lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),  # 16-bit white
        (lambda: Image.fromarray(np.full((4, 4), 32896, np.uint16)), (128, 128, 128)),  # 16-bit mid-grey
    ],
)
def test_load_image_converts_modes_to_8bit_rgb(tmp_path, make, expected):
    img = make()
    path = tmp_path / ("x.tiff" if img.mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == expected


def test_load_image_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.info["transparency"] = 0
    img.putpixel((0, 0), 0)
    img.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (200, 10, 10)


def test_bad_files_are_returned_as_none_and_counted(tmp_path):
    root = write_folder(tmp_path / "train")
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "a" / "junk.jpg").write_bytes(b"not an image at all")
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    ds = ImageFolderDataset(root, transform=eval_transform(8))
    assert len(ds) == 9
    x, y, bad = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert x.shape == (6, 3, 8, 8) and len(y) == 6
    assert sorted(Path(p).name for p in bad) == ["junk.jpg", "truncated.png", "zero.png"]
    assert collate_skip_bad([ds[ds.samples.index((str(root / "a" / "zero.png"), 0))]])[0] is None


def test_folder_errors_and_warnings(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "flat")
    root = write_folder(tmp_path / "train")
    (root / "empty").mkdir()
    (root / "a" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(root)
    messages = " ".join(str(w.message) for w in record)
    assert "['empty'] hold no images" in messages and "notes.txt" in messages
    assert ds.classes == ["a", "b", "empty"] and len(ds) == 6
    (tmp_path / "none" / "c").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageFolderDataset(tmp_path / "none")


def test_check_splits_names_the_differing_classes(tmp_path):
    train = ImageFolderDataset(write_folder(tmp_path / "train", ("a", "b")))
    val = ImageFolderDataset(write_folder(tmp_path / "val", ("a", "c")))
    with pytest.raises(DataError, match=r"only in train/: \['b'\], only in val/: \['c'\]"):
        check_splits(train, val)
    check_splits(train, ImageFolderDataset(write_folder(tmp_path / "val2", ("a", "b"))))


def test_eval_transform_resizes_then_centre_crops():
    img = Image.new("RGB", (64, 64), (255, 0, 0))  # red border of 4 px around a blue centre
    img.paste((0, 0, 255), (4, 4, 60, 60))
    t = eval_transform(28, crop_pct=0.875, mean=(0, 0, 0), std=(1, 1, 1))
    assert [type(s).__name__ for s in t.transforms][:2] == ["Resize", "CenterCrop"] and t.transforms[0].size == 32
    x = t(img)  # 64 -> 32 px (border 2 px), centre 28 px crop removes the border
    assert x.shape == (3, 28, 28) and x[0].max() < 0.3 and x[2, 2:-2, 2:-2].min() > 0.95
    full = eval_transform(28, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert full[0, 0, 0] > 0.9  # no crop: the red border is still there
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(28, crop_pct=1.5)


def test_train_transform_strength():
    names = [type(s).__name__ for s in train_transform(16, augment="randaugment", magnitude=4.6).transforms]
    assert names[:3] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment"]
    assert train_transform(16, augment="randaugment", magnitude=4.6).transforms[2].magnitude == 5
    assert "RandAugment" not in [
        type(s).__name__ for s in train_transform(16, hflip=0, augment="randaugment").transforms
    ]
    assert "RandomHorizontalFlip" not in [type(s).__name__ for s in train_transform(16, hflip=0).transforms]
    with pytest.raises(ValueError, match="augment"):
        train_transform(16, augment="mixup")


def test_augmentation_is_seeded_per_sample(tmp_path):
    root = write_folder(tmp_path / "train", n=2, size=24)
    noise = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "a" / "1.png")  # ds[1]: crops of noise all differ
    ds = ImageFolderDataset(root, transform=train_transform(16, crop_scale=(0.1, 1.0)), seed=3)
    a = ds[1][0]
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(ds[1][0], a)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], a)
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(torch.get_rng_state(), state)  # and is left untouched


def test_builtin_dataset_is_written_once(tmp_path):
    xt, yt, xv, yv = digits_split()
    assert xt.shape == (1437, 8, 8) and xv.shape == (360, 8, 8) and xt.dtype == np.uint8
    assert np.bincount(yv).min() >= 35  # stratified
    root = builtin_dataset(tmp_path / "digits")
    train, val = ImageFolderDataset(root / "train"), ImageFolderDataset(root / "val")
    assert len(train) == 1437 and len(val) == 360 and train.classes == [str(i) for i in range(10)]
    img = load_image(train.samples[0][0])
    assert img.size == (8, 8) and np.asarray(img).max() > 100
    mtime = (root / "val").stat().st_mtime
    assert builtin_dataset(tmp_path / "digits") == root and (root / "val").stat().st_mtime == mtime


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_turn_as_the_exif_orientation_turns_the_pixels(orientation):
    from mobileone.tasks.images import TRANSPOSE, orient_boxes

    stored = np.zeros((30, 50), np.uint8)  # 50 wide, 30 high
    stored[4:11, 6:20] = 1  # the box [6, 4, 20, 11]
    shown = Image.fromarray(stored)
    if orientation in TRANSPOSE:
        shown = shown.transpose(TRANSPOSE[orientation])
    ys, xs = np.nonzero(np.asarray(shown))
    box = orient_boxes(np.array([[6, 4, 20, 11]], np.float32), orientation, (50, 30))
    assert box.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]


def test_a_flat_folder_of_images_is_read_without_class_folders(tmp_path):
    from mobileone.tasks.classify.data import ImageFilesDataset

    for i in range(3):
        Image.new("RGB", (12, 10), (80 * i, 0, 0)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "more").mkdir()
    Image.new("L", (8, 8), 9).save(tmp_path / "more" / "x.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFilesDataset(tmp_path, transform=eval_transform(8))
    items = [ds[i] for i in range(len(ds))]
    assert [Path(p).name for x, p in items if x is None] == ["broken.png"]  # skipped and counted by its caller
    assert len(items) == 5 and all(x.shape == (3, 8, 8) for x, _ in items if x is not None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        ImageFilesDataset(tmp_path / "empty")
