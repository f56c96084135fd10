"""COCO mAP: ours (faster-coco-eval) against pycocotools run directly, to 1e-4, on a fixture with crowds and misses."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mobileone.tasks.detect.data import ImageRecord
from mobileone.tasks.detect.metrics import coco_detections, coco_ground_truth, coco_map

CLASSES = ["cat", "dog", "bird", "fish"]  # "fish" has no ground truth: no AP


def _fixture(seed: int = 0):
    """20 images of 100 x 80 px, 0-4 boxes of classes 0-2 (some crowd); detections: jittered truths, misses,
    false positives, wrong classes."""
    rng = np.random.default_rng(seed)
    records, results = [], []
    for i in range(20):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 60, size=(n, 2))
        wh = rng.uniform(4, 40, size=(n, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, [100, 80])], 1).astype(np.float32)
        labels = rng.integers(0, 3, size=n)
        crowd = rng.random(n) < 0.1
        records.append(ImageRecord(f"{i}.png", 100, 80, boxes, labels, crowd))
        det_boxes, det_labels = [], []
        for b, lab in zip(boxes, labels):
            if rng.random() < 0.8:  # found, with some jitter, sometimes as the wrong class
                det_boxes.append(b + rng.normal(0, 2, 4))
                det_labels.append(lab if rng.random() < 0.85 else (lab + 1) % 3)
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x0, y0 = rng.uniform(0, 70), rng.uniform(0, 50)
            det_boxes.append([x0, y0, x0 + rng.uniform(5, 30), y0 + rng.uniform(5, 30)])
            det_labels.append(int(rng.integers(0, 4)))
        k = len(det_boxes)
        results.append(
            (
                i,
                torch.tensor(np.asarray(det_boxes, np.float32).reshape(-1, 4)),
                torch.rand(k),
                torch.tensor(det_labels, dtype=torch.long),
            )
        )
    return records, results


def _pycocotools(gt: dict, dets: list) -> tuple[np.ndarray, np.ndarray]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats, e.eval["precision"]


@pytest.mark.parametrize("seed", [0, 1])
def test_our_map_equals_pycocotools(seed):
    records, results = _fixture(seed)
    gt, dets = coco_ground_truth(records, CLASSES), coco_detections(results)
    assert sum(a["iscrowd"] for a in gt["annotations"]) > 0
    stats, precision = _pycocotools(gt, dets)
    for backend in ("faster_coco_eval", "pycocotools"):
        ours = coco_map(gt, dets, CLASSES, backend=backend)
        assert 5 < ours["map"] < 95
        for key, i in (
            ("map", 0),
            ("map_50", 1),
            ("map_75", 2),
            ("map_small", 3),
            ("map_medium", 4),
            ("recall_100", 8),
        ):
            assert abs(ours[key] / 100 - max(stats[i], 0)) <= 1e-4, (backend, key)
        for k, name in enumerate(CLASSES):
            p = precision[:, :, k, 0, -1]
            if (p > -1).any():
                assert abs(ours["per_class"][name] / 100 - p[p > -1].mean()) <= 1e-4
            else:
                assert ours["per_class"][name] is None


def test_no_detections_and_no_ground_truth():
    records, _ = _fixture()
    gt = coco_ground_truth(records, CLASSES)
    zero = coco_map(gt, [], CLASSES)
    assert zero["map"] == 0 and zero["per_class"]["cat"] == 0 and zero["per_class"]["fish"] is None
    empty = [ImageRecord("a.png", 10, 10, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))]
    with pytest.raises(ValueError, match="no \\(non-crowd\\) boxes"):
        coco_map(coco_ground_truth(empty, CLASSES), [], CLASSES)
