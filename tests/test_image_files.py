"""Image files as users have them: hidden entries, link loops, bombs, rotated phone photos, nothing readable."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobileone import save_checkpoint
from mobileone.engine import DataError
from mobileone.tasks import train
from mobileone.tasks.classify.data import (
    ImageFolderDataset,
    UnreadableImageError,
    load_image,
)
from mobileone.tasks.classify.evaluate import evaluate_checkpoint
from mobileone.tasks.images import image_size

from .classify_data import config, make_data, write_bomb

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def test_no_readable_training_or_validation_image_stops(tmp_path, tiny):
    junk = make_data(tmp_path / "junk_train")
    for f in (junk / "train").rglob("*.png"):
        f.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"no training image of epoch 1 could be read \(24 unreadable\)"):
        train(config(tmp_path / "run1", junk))
    assert not (tmp_path / "run1" / "best.safetensors").exists()

    junk = make_data(tmp_path / "junk_val")
    for f in (junk / "val").rglob("*.png"):
        f.write_bytes(b"")
    with pytest.raises(DataError, match=r"no validation image could be read \(12 unreadable\)"):
        train(config(tmp_path / "run2", junk))
    assert not (tmp_path / "run2" / "best.safetensors").exists()

    path = save_checkpoint(tiny, tmp_path / "model.safetensors")
    with pytest.raises(DataError, match="none of the 12 images"):
        evaluate_checkpoint(junk / "val", path, workers=0)


def test_hidden_entries_and_link_loops_are_skipped(tmp_path):
    root = tmp_path / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (100 * i, 50, 0)).save(root / c / f"{i}.png")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "__MACOSX" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "a" / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(root / "a" / ".cache" / "thumb.png")
    (root / "a" / "loop").symlink_to(root)  # a link loop: os.walk(followlinks=True) goes ~40 levels deep
    (root / "a" / "self").symlink_to(root / "a")
    (root / "b" / "a_again").symlink_to(root / "a")  # another class's folder
    (root / "b" / "gone").symlink_to(tmp_path / "nowhere")
    elsewhere = tmp_path / "elsewhere" / "c"  # a class folder that is a link: read once, as its own class
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(elsewhere / "0.png")
    (root / "c").symlink_to(elsewhere)
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(root)
    assert ds.classes == ["a", "b", "c"]
    assert sorted((Path(p).relative_to(root).as_posix(), t) for p, t in ds.samples) == [
        ("a/0.png", 0),
        ("a/1.png", 0),
        ("b/0.png", 1),
        ("b/1.png", 1),
        ("c/0.png", 2),
    ]
    text = " ".join(str(w.message) for w in record)
    assert "skipped 4 hidden entries" in text and ".ipynb_checkpoints" in text and "__MACOSX" in text
    assert "skipped 3 links to folders that were already read" in text and "a_again" in text
    assert "skipped 1 broken links" in text and "gone" in text


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path):
    root = make_data(tmp_path / "data")
    bomb = write_bomb(root / "train" / "red" / "bomb.png")
    with pytest.raises(UnreadableImageError, match=rf"{bomb}.*DecompressionBombError"):
        load_image(bomb)
    ds = ImageFolderDataset(root / "train")
    assert [path for img, path in (ds[i] for i in range(len(ds))) if img is None] == [str(bomb)]
    with pytest.raises(DataError, match=r"unreadable image\(s\) .*bomb\.png.*--strict-images"):
        train(config(tmp_path / "strict", root, batch_size=25, strict_images=True))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (32, 16), (220, 0, 0))  # stored sideways: red left half, blue right half
    img.paste((0, 0, 220), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "phone.jpg")
    assert out.size == image_size(tmp_path / "phone.jpg") == (16, 32)
    top, bottom = np.asarray(out)[4, 8], np.asarray(out)[27, 8]
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]  # red on top, blue below
    # For annotations made on the stored pixels (boxes, masks), the orientation can be left alone:
    assert load_image(tmp_path / "phone.jpg", upright=False).size == image_size(tmp_path / "phone.jpg", False)
    assert image_size(tmp_path / "phone.jpg", upright=False) == (32, 16)
