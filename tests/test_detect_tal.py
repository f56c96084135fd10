"""The default detection head (tal): assignment against a plain reference, training, fusion, any input size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mobileone import reparameterize_model
from mobileone.deploy.detect import compare_detections
from mobileone.tasks.detect.assign import Assignment, pairwise_iou, task_aligned_assign
from mobileone.tasks.detect.model import create_detector

TINY_ARCH = {"widths": (8, 16, 16, 24), "stem_width": 8, "blocks": (1, 1, 1, 1), "k": (2, 2, 2, 2)}


def tiny_tal(num_classes: int = 2, img_size: int = 64, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_detector("tal_s0", num_classes, img_size, arch=TINY_ARCH, neck_channels=16, **kwargs)


def reference_assign(points, scores, boxes, gts, topk=10, alpha=0.5, beta=6.0) -> Assignment:
    """Task-aligned assignment written plainly: one image, one ground-truth box at a time."""
    n, a, c = scores.shape
    positive = torch.zeros(n, a, dtype=torch.bool)
    out_boxes, out_scores = torch.zeros(n, a, 4), torch.zeros(n, a, c)
    for i, (gt_boxes, gt_labels) in enumerate(gts):
        m = len(gt_boxes)
        if m == 0:
            continue
        iou = torch.zeros(m, a)
        align = torch.zeros(m, a)
        chosen = torch.zeros(m, a, dtype=torch.bool)
        for g in range(m):
            x1, y1, x2, y2 = gt_boxes[g].tolist()
            for p in range(a):
                px, py = points[p].tolist()
                if min(px - x1, py - y1, x2 - px, y2 - py) > 1e-9:
                    iou[g, p] = pairwise_iou(gt_boxes[g].view(1, 1, 4), boxes[i, p].view(1, 1, 4))[0, 0, 0]
                    align[g, p] = scores[i, p, gt_labels[g]] ** alpha * iou[g, p] ** beta
            for p in align[g].topk(min(topk, a)).indices.tolist():
                chosen[g, p] = _inside(points[p], gt_boxes[g])
        for p in range(a):
            claims = chosen[:, p].nonzero().flatten().tolist()
            if len(claims) > 1:
                best = int(iou[:, p].argmax())
                chosen[:, p] = False
                chosen[best, p] = True
        for g in range(m):
            picked = chosen[g].nonzero().flatten()
            if len(picked) == 0:
                continue
            norm = align[g, picked] * iou[g, picked].max() / (align[g, picked].max() + 1e-9)
            for p, q in zip(picked.tolist(), norm.tolist()):
                positive[i, p] = True
                out_boxes[i, p] = gt_boxes[g]
                out_scores[i, p, gt_labels[g]] = q
    return Assignment(positive, out_boxes, out_scores)


def _inside(point, box) -> bool:
    px, py = point.tolist()
    x1, y1, x2, y2 = box.tolist()
    return min(px - x1, py - y1, x2 - px, y2 - py) > 1e-9


def test_vectorized_assignment_equals_the_plain_reference():
    torch.manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(8) * 8 + 4.0, torch.arange(8) * 8 + 4.0, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], -1)  # 64 points of an 8 x 8 grid, stride 8
    for trial in range(5):
        n, c = 3, 3
        scores = torch.rand(n, 64, c)
        centres = points[None].expand(n, -1, -1) + torch.randn(n, 64, 2)
        half = torch.rand(n, 64, 2) * 12 + 2
        boxes = torch.cat([centres - half, centres + half], -1)
        counts = [4, 0, 7] if trial % 2 else [6, 2, 5]
        gts = []
        for m in counts:  # touching boxes: some share edges, some overlap
            xy = torch.rand(m, 2) * 40
            wh = torch.rand(m, 2) * 20 + 6
            gts.append((torch.cat([xy, xy + wh], -1), torch.randint(c, (m,))))
        padded = torch.zeros(n, max(counts), 4)
        labels = torch.zeros(n, max(counts), dtype=torch.long)
        mask = torch.zeros(n, max(counts), dtype=torch.bool)
        for i, (b, lab) in enumerate(gts):
            padded[i, : len(b)], labels[i, : len(b)], mask[i, : len(b)] = b, lab, True
        got = task_aligned_assign(points, scores, boxes, padded, labels, mask, topk=5)
        want = reference_assign(points, scores, boxes, gts, topk=5)
        assert torch.equal(got.positive, want.positive)
        assert torch.allclose(got.boxes[got.positive], want.boxes[want.positive])
        assert torch.allclose(got.scores, want.scores, atol=1e-6)


def test_loss_is_finite_and_falls_when_overfitting_two_images(one_thread):
    det = tiny_tal(img_size=64).train()
    x = torch.randn(2, 3, 64, 64)
    targets = [
        {
            "boxes": torch.tensor([[8.0, 8, 24, 24], [24, 8, 40, 24], [40, 40, 60, 60]]),
            "labels": torch.tensor([0, 0, 1]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # a negative image still trains
    ]
    opt = torch.optim.SGD(det.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(25):
        out = det(x, targets)
        loss = out["bbox_regression"] + out["classification"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_autocast_trains_with_float32_boxes_and_loss(one_thread):
    """Under bf16 autocast (the default on CPUs with native bf16) the head's outputs, box decoding and loss are
    float32, and the loss falls as in float32."""
    from mobileone.core.branch_stats import use_fast_strided_depthwise

    torch.manual_seed(0)
    tal = create_detector("tal_s0", 2, 64, arch={**TINY_ARCH, "k": 1}, neck_channels=16)  # k = 1 runs "direct"
    det = use_fast_strided_depthwise(tal).train()
    x = torch.randn(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8, 24, 24], [40, 40, 60, 60]]), "labels": torch.tensor([0, 1])}] * 2
    opt = torch.optim.AdamW(det.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            codes, logits = det.head_outputs(x)
            out = det.compute_loss(codes, logits, targets, (64, 64))
        assert codes.dtype == logits.dtype == torch.float32
        loss = out["bbox_regression"] + out["classification"]
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_any_size_input_and_fused_detections_equal_unfused(one_thread):
    det = tiny_tal(num_classes=3).train()
    with torch.no_grad():
        for _ in range(3):  # BN statistics away from their init
            det.head_outputs(torch.randn(4, 3, 64, 96))
    det.eval()
    x = torch.randn(2, 3, 64, 96)  # not square, not the training size: any multiple of 32
    boxes, scores = det.forward_raw(x)
    assert boxes.shape == (2, 8 * 12 + 4 * 6 + 2 * 3, 4)  # one point per cell at strides 8, 16, 32
    assert scores.shape == (2, 8 * 12 + 4 * 6 + 2 * 3, 3)
    assert (boxes[..., 2] <= 96).all() and (boxes[..., 3] <= 64).all() and (boxes >= 0).all()
    fused = reparameterize_model(det)
    assert fused.inference_mode and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    fb, fs = fused.forward_raw(x)
    assert torch.allclose(fb, boxes, atol=1e-3) and torch.allclose(fs, scores, atol=1e-4)
    for e, g in zip(det(x), fused(x)):
        assert compare_detections(e, g, det.config.score_thresh, det.config.nms_thresh)[0] == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "executorch", "coreml"])
def test_raw_export_in_every_runtime(tmp_path, fmt, one_thread):
    pytest.importorskip({"onnx": "onnxruntime", "executorch": "executorch", "coreml": "coremltools"}[fmt])
    from mobileone.deploy.detect import FORMATS, export_detector

    det = tiny_tal(num_classes=2).eval()
    report = export_detector(det, tmp_path / f"det{FORMATS[fmt]}", "raw", fmt, check_inputs=torch.randn(2, 3, 64, 64))
    assert "within 1e-4 relative" in report.check or "structural only" in report.check


def test_priors_fit_the_boxes_and_small_boxes_are_warned_about():
    import numpy as np

    from mobileone.tasks.detect.priors import box_sides, check_small_boxes, fit_ssdlite_ratios
    from mobileone.tasks.detect.records import ImageRecord

    boxes = np.array([[0, 0, s, s] for s in range(16, 64, 4)], np.float32)  # sides 16..60 on a 640 px image
    record = ImageRecord("x.jpg", 640, 480, boxes, np.zeros(len(boxes), np.int64), np.zeros(len(boxes), bool))
    sides = box_sides([record], 320)  # letterboxed to 320: half size
    assert torch.allclose(sides, torch.from_numpy(boxes[:, 2] / 2))
    fitted = fit_ssdlite_ratios(sides, 320)
    assert 8 / 320 <= fitted["anchor_min_ratio"] <= 10 / 320 and fitted["anchor_max_ratio"] < 0.2  # not 64-304 px
    with pytest.warns(UserWarning, match="smaller than half the smallest default box"):
        check_small_boxes(sides, "ssdlite", 0.2 * 320)
    with pytest.warns(UserWarning, match="finest stride"):
        check_small_boxes(sides / 2, "tal", 0.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_small_boxes(sides, "tal", 0.0)  # 8-30 px: the stride-8 level resolves them


def test_the_peers_batchnorms_keep_statistics_that_follow_a_short_run():
    peer = create_detector("tal_mnv3", 1, img_size=64)
    norms = [m for m in peer.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) > 50 and {m.momentum for m in norms} == {0.1}  # torchvision's trunk says 0.01
