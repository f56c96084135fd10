"""Task-aligned assignment and the loss of the anchor-free head, vectorized over the batch.

The assignment is TOOD's task-aligned assigner (Feng et al., ICCV 2021), as YOLOv8 and PP-YOLOE
use it: a point is a candidate for a ground-truth box when it lies inside the box; each box takes
the ``topk`` candidates with the best alignment ``score ** alpha * IoU ** beta`` (the predicted
score of the box's class, the IoU of the predicted box with it); a point claimed by several boxes
goes to the one its prediction overlaps most. The classification target of a positive is its
alignment, normalized per box so the best-aligned point gets the box's best IoU: an IoU-aware
score, which is what ranks touching objects right at NMS. Everything is one set of (N, M, A)
tensors (images, padded boxes, points): no Python loop over images or boxes.

The loss is binary cross-entropy on those soft targets (``varifocal`` and ``focal`` are the
alternatives measured in docs/detection.md) plus a GIoU loss on the positives weighted by their
targets, both divided by the sum of the targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

EPS = 1e-9
CLS_LOSSES = ("bce", "varifocal", "focal")


@dataclass
class Assignment:
    """Per point: whether it is a positive, its target box (xyxy) and its soft class targets (N, A, C)."""

    positive: Tensor  # (N, A) bool
    boxes: Tensor  # (N, A, 4)
    scores: Tensor  # (N, A, C)


def pad_targets(targets: list[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's boxes (N, M, 4), labels (N, M) and a mask of the real ones (N, M), M the most boxes of an image."""
    m = max(1, max(len(t["boxes"]) for t in targets))
    n = len(targets)
    boxes = torch.zeros(n, m, 4, device=device)
    labels = torch.zeros(n, m, dtype=torch.long, device=device)
    mask = torch.zeros(n, m, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):  # copies only; the assignment itself is batched
        k = len(t["boxes"])
        boxes[i, :k] = t["boxes"].to(device, torch.float32)
        labels[i, :k] = t["labels"].to(device)
        mask[i, :k] = True
    return boxes, labels, mask


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box of ``a`` (N, M, 4) with every box of ``b`` (N, A, 4): (N, M, A)."""
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter + EPS)


@torch.no_grad()
def task_aligned_assign(
    points: Tensor,
    pred_scores: Tensor,
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
) -> Assignment:
    """Assign points (A, 2) to padded ground truth; ``pred_scores`` (N, A, C) are probabilities."""
    n, a, c = pred_scores.shape
    x, y = points[:, 0], points[:, 1]
    inside = (
        torch.stack(
            [x - gt_boxes[..., 0:1], y - gt_boxes[..., 1:2], gt_boxes[..., 2:3] - x, gt_boxes[..., 3:4] - y], -1
        ).amin(-1)
        > EPS
    )  # (N, M, A)
    candidate = inside & gt_mask[..., None]
    iou = pairwise_iou(gt_boxes, pred_boxes) * candidate
    score = pred_scores.transpose(1, 2).gather(1, gt_labels[..., None].expand(-1, -1, a))  # (N, M, A)
    align = score.pow(alpha) * iou.pow(beta) * candidate
    k = min(topk, a)
    top = align.topk(k, dim=-1).indices
    chosen = torch.zeros_like(candidate).scatter_(-1, top, True) & candidate
    claims = chosen.sum(1)  # (N, A): boxes claiming each point
    best_gt = iou.argmax(1)  # (N, A)
    sole = F.one_hot(best_gt, chosen.shape[1]).transpose(1, 2).bool()
    chosen = torch.where((claims > 1)[:, None, :], sole & chosen.any(1, keepdim=True), chosen)
    positive = chosen.any(1)
    gt_index = chosen.float().argmax(1)  # (N, A)
    boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))
    labels = gt_labels.gather(1, gt_index)
    align = align * chosen
    best_align = align.amax(-1, keepdim=True)
    best_iou = (iou * chosen).amax(-1, keepdim=True)
    quality = (align * best_iou / (best_align + EPS)).amax(1)  # (N, A)
    scores = F.one_hot(labels, c).to(pred_scores.dtype) * (quality * positive)[..., None]
    return Assignment(positive, boxes, scores)


def classification_loss(logits: Tensor, targets: Tensor, kind: str = "bce") -> Tensor:
    """Summed loss of the class logits (N, A, C) against soft targets in [0, 1]."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    if kind == "focal":
        return sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0, reduction="sum")
    if kind == "varifocal":  # Zhang et al. 2021: negatives down-weighted by p^2, positives by their target
        p = logits.sigmoid()
        weight = 0.75 * p.detach().pow(2) * (targets <= 0) + targets
        return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight).sum()
    raise ValueError(f"cls_loss must be one of {CLS_LOSSES}, got {kind!r}")


def detection_loss(
    logits: Tensor,
    boxes: Tensor,
    assignment: Assignment,
    cls_kind: str = "bce",
    cls_weight: float = 1.0,
    box_weight: float = 2.5,
) -> dict[str, Tensor]:
    """Classification over every point and GIoU over the positives, each over the sum of the soft targets."""
    norm = assignment.scores.sum().clamp(min=1.0)
    cls = classification_loss(logits.float(), assignment.scores.float(), cls_kind) / norm
    pos = assignment.positive
    if pos.any():
        weight = assignment.scores.sum(-1)[pos]
        giou = generalized_box_iou_loss(boxes[pos].float(), assignment.boxes[pos].float(), reduction="none")
        box = (giou * weight).sum() / norm
    else:
        box = boxes.sum() * 0.0
    return {"bbox_regression": box_weight * box, "classification": cls_weight * cls}
