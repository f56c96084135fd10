"""Dense-scene augmentation keeps boxes on their objects; the letterbox maps back; scene boxes are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mobileone.core.config import IMAGENET_MEAN, IMAGENET_STD
from mobileone.tasks.detect.augment import DenseTrainData, letterbox_transform, to_image_pixels
from mobileone.tasks.detect.data import DetectionDataset
from mobileone.tasks.detect.records import ImageRecord, Split


def _squares(tmp_path, count: int = 4) -> Split:
    """Images of white squares on black, with their exact boxes."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        w, h = (200, 120) if i % 2 else (96, 160)  # not square, not the input size
        img = np.zeros((h, w, 3), np.uint8)
        boxes = []
        for _ in range(6):
            s = int(rng.integers(10, 30))
            x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            if any(x < b[2] + 2 and b[0] < x + s + 2 and y < b[3] + 2 and b[1] < y + s + 2 for b in boxes):
                continue
            img[y : y + s, x : x + s] = 255
            boxes.append([x, y, x + s, y + s])
        path = tmp_path / f"{i}.png"
        Image.fromarray(img).save(path)
        records.append(
            ImageRecord(
                str(path),
                w,
                h,
                np.array(boxes, np.float32),
                np.zeros(len(boxes), np.int64),
                np.zeros(len(boxes), bool),
            )
        )
    return Split(records, ["square"], str(tmp_path))


def test_mosaic_scale_jitter_and_flips_keep_boxes_on_their_objects(tmp_path):
    ds = DenseTrainData(
        DetectionDataset(_squares(tmp_path), train=True), 128, repeats=2, mosaic=0.5, vflip=0.5, photometric=False
    )
    assert len(ds) == 8
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    checked = 0
    for key in [(e, i) for e in range(3) for i in range(8)]:
        x, t = ds[key]
        assert x.shape == (3, 128, 128) and t["boxes"].shape[1] == 4
        assert torch.equal(ds[key][1]["boxes"], t["boxes"])  # the same key, the same sample
        bright = ((x * std + mean).mean(0) > 0.6).float()  # white squares; black and the mean-grey fill are not
        for x1, y1, x2, y2 in t["boxes"].round().long().tolist():
            inner = bright[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]
            if inner.numel():
                assert inner.mean() > 0.9, "a box lies off its square"
                checked += 1
        covered = torch.zeros_like(bright)
        for x1, y1, x2, y2 in t["boxes"].round().long().tolist():
            covered[max(0, y1 - 2) : y2 + 2, max(0, x1 - 2) : x2 + 2] = 1
        assert (bright * (1 - covered)).sum() <= 0.35 * bright.sum() + 1, "a visible square lost its box"
    assert checked > 50


def test_kept_images_give_the_same_samples_and_follow_the_input_size(tmp_path, monkeypatch):
    """Images kept in memory (decoded once, at the input size) give exactly the samples decoding again gives;
    a new input size (progressive resizing) drops them; past the budget nothing more is kept."""
    import mobileone.tasks.detect.augment as augment

    split = _squares(tmp_path)

    def data(size: int = 96) -> DenseTrainData:
        return DenseTrainData(DetectionDataset(split, train=True), size, repeats=2, mosaic=0.5)

    kept, fresh = data(), data()
    for key in [(e, i) for e in range(2) for i in range(8)]:
        fresh.cache.clear()  # decoded again for every sample
        (x, t), (y, u) = kept[key], fresh[key]
        assert torch.equal(x, y) and torch.equal(t["boxes"], u["boxes"]) and torch.equal(t["labels"], u["labels"])
    assert len(kept.cache) == 4 and kept.cached_bytes == sum(i.width * i.height * 3 for i, _, _ in kept.cache.values())
    kept.img_size = 64
    assert not kept.cache and kept[(0, 0)][0].shape == (3, 64, 64)
    assert kept.cache and all(max(part[0].size) == 64 for part in kept.cache.values())
    monkeypatch.setattr(augment, "CACHE_BYTES", 0)
    small = data()
    small[(0, 0)]
    assert not small.cache


def test_letterbox_keeps_the_aspect_and_maps_back():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    x = letterbox_transform(64)(img)
    assert x.shape == (3, 64, 64)
    white = (x.mean(0) > 1.5).float()
    assert white[:32].mean() == 1 and white[33:].max() == 0  # the image on top, padding below
    box = torch.tensor([[16.0, 8, 32, 24]])  # in pixels of the 64 px input
    assert torch.equal(to_image_pixels(box, (100, 200), 64), torch.tensor([[50.0, 25, 100, 75]]))


@pytest.mark.slow
def test_dense_scene_boxes_are_exact():
    pytest.importorskip("skimage")
    from mobileone.tasks.detect import scenes

    coins = scenes.coin_cutouts()
    assert len(coins) == 24
    rng = np.random.default_rng(0)
    black = [np.zeros((200, 200, 3), np.float32)]
    for _ in range(10):  # one object on black ground: its box must be the tight box of its pixels
        img, boxes = scenes.render_scene(rng, black, coins, scenes.Site(96, 96, (1, 1)))
        ys, xs = np.nonzero(img.max(-1) > 10)
        assert len(boxes) == 1
        tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert np.abs(np.array(boxes[0]) - tight).max() <= 1, (boxes[0], tight)
    img, boxes = scenes.render_scene(rng, scenes.grounds(("grass",)), coins, scenes.TRAIN_SITE)
    sides = np.sqrt([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes])
    assert len(boxes) >= 30 and sides.min() >= 12 and sides.max() <= 64
