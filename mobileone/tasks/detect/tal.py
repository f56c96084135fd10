"""The default detector: anchor-free points at strides 8, 16 and 32 with task-aligned assignment.

What detection practitioners use on small, crowded objects, from torchvision's pieces where they fit:

- **neck**: torchvision's ``FeaturePyramidNetwork`` (top-down, BatchNorm) over the backbone's
  strides 8 / 16 / 32, then a bottom-up path (PAN: a depthwise stride-2 conv added to the next
  level, then a depthwise-separable block), all ``neck_channels`` wide;
- **head**: per level, two depthwise-separable blocks for classes and two for boxes (decoupled, as
  YOLOX / YOLOv8 / PP-YOLOE), then a 1x1 conv each: class logits (one per class, sigmoid) and four
  distances left, top, right, bottom from the point, ``softplus(x) * stride`` pixels;
- **points**: one per feature-map cell, at its centre; 2,100 at 320 x 320. The input may be any
  size that is a multiple of 32 (fully convolutional): train at 320, evaluate letterboxed;
- **training**: task-aligned assignment with IoU-aware soft targets and GIoU (``assign.py``),
  vectorized over the batch;
- **priors fitted to the data**: the box branch starts predicting the training set's median box
  side (``box_prior``), so the first assignments already overlap the objects.

``forward_raw`` returns decoded boxes (N, A, 4) clipped to the input and class probabilities
(N, A, C): the same contract as SSDLite, so evaluation, export and predict treat both alike.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from .assign import detection_loss, pad_targets, task_aligned_assign
from .base import Detector, Size, Targets
from .config import DetectorConfig

STRIDES = (8, 16, 32)
PRIOR_PROB = 0.01  # initial class probability (RetinaNet's prior), so the many negatives start quiet


def separable(channels: int) -> nn.Sequential:
    """Depthwise 3x3 + pointwise 1x1, each with BatchNorm and ReLU (both fold into their convs)."""
    return nn.Sequential(
        Conv2dNormActivation(channels, channels, 3, groups=channels, activation_layer=nn.ReLU),
        Conv2dNormActivation(channels, channels, 1, activation_layer=nn.ReLU),
    )


class PANNeck(nn.Module):
    """torchvision's FPN (top-down) followed by a bottom-up path: one ``channels``-wide map per input level."""

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels, norm_layer=nn.BatchNorm2d)
        levels = len(in_channels)
        self.down = nn.ModuleList(
            Conv2dNormActivation(channels, channels, 3, stride=2, groups=channels, activation_layer=None)
            for _ in range(levels - 1)
        )
        self.fuse = nn.ModuleList(separable(channels) for _ in range(levels - 1))

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        top_down = list(self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps))).values())
        out = [top_down[0]]
        for down, fuse, lateral in zip(self.down, self.fuse, top_down[1:]):
            out.append(fuse(lateral + down(out[-1])))
        return out


class LevelHead(nn.Module):
    """One level's decoupled head: class logits (N, C, H, W) and box distances (N, 4, H, W), pre-activation."""

    def __init__(self, channels: int, num_classes: int, box_bias: float) -> None:
        super().__init__()
        self.cls = nn.Sequential(separable(channels), separable(channels), nn.Conv2d(channels, num_classes, 1))
        self.box = nn.Sequential(separable(channels), separable(channels), nn.Conv2d(channels, 4, 1))
        nn.init.normal_(self.cls[-1].weight, std=0.01)
        nn.init.constant_(self.cls[-1].bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        nn.init.normal_(self.box[-1].weight, std=0.01)
        nn.init.constant_(self.box[-1].bias, box_bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls(x), self.box(x)


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class TALDetector(Detector):
    """Anchor-free points over an FPN + PAN neck, trained by task-aligned assignment (see the module docstring)."""

    cls_loss = "bce"  # or "varifocal" / "focal" (assign.classification_loss)
    topk = 10  # positives per ground-truth box (YOLOv8)

    def __init__(
        self, config: DetectorConfig, backbone: nn.Module, channels: Sequence[int], box_prior: float = 32.0
    ) -> None:
        super().__init__(config)
        self.backbone = backbone
        self.strides = STRIDES
        self.neck = PANNeck(channels, config.neck_channels)
        self.heads = nn.ModuleList(
            LevelHead(config.neck_channels, config.num_classes, inverse_softplus(max(box_prior / 2 / s, 0.05)))
            for s in self.strides
        )

    def _check_input(self, images: Tensor) -> None:
        ok = isinstance(images, Tensor) and images.ndim == 4 and images.shape[1] == 3
        if not ok or images.shape[-2] % 32 or images.shape[-1] % 32:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"this detector takes a normalized float batch (N, 3, H, W) with H and W multiples of 32, got "
                f"{shape}; letterbox images to {self.config.img_size} (mobileone.tasks.detect.augment."
                "letterbox_transform)"
            )

    def points(self, height: int, width: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Point centres (A, 2) in pixels and their strides (A, 1) for an input of this size, level by level.

        Computed at every call (a few thousand values): a traced or exported graph sees the same ops each time."""
        centres, strides = [], []
        for s in self.strides:
            ys = (torch.arange(height // s, device=like.device, dtype=like.dtype) + 0.5) * s
            xs = (torch.arange(width // s, device=like.device, dtype=like.dtype) + 0.5) * s
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
            centres.append(grid)
            strides.append(torch.full((len(grid), 1), float(s), device=like.device, dtype=like.dtype))
        return torch.cat(centres), torch.cat(strides)

    def head_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Box distances (N, A, 4) in pixels (left, top, right, bottom) and class logits (N, A, C)."""
        self._check_input(images)
        maps = self.neck(list(self.backbone(images)))
        logits, dists = [], []
        for head, m in zip(self.heads, maps):
            cls, box = head(m)
            logits.append(cls.flatten(2))
            dists.append(box.flatten(2))
        _, strides = self.points(images.shape[-2], images.shape[-1], images)
        # float32 from here on under autocast: a bf16 distance of 150 px is only good to 1 px
        dist, logits = (
            torch.cat(t, 2).transpose(1, 2).to(torch.promote_types(images.dtype, torch.float32))
            for t in (dists, logits)
        )
        return F.softplus(dist) * strides.to(dist.dtype), logits

    def decode(self, codes: Tensor, logits: Tensor, size: Size) -> tuple[Tensor, Tensor]:
        """Boxes (N, A, 4) clipped to the input and class probabilities (N, A, C)."""
        return self._boxes(codes, size), logits.sigmoid()

    def _boxes(self, dist: Tensor, size: Size) -> Tensor:
        height, width = size
        centres, _ = self.points(height, width, dist)
        boxes = torch.cat([centres - dist[..., :2], centres + dist[..., 2:]], -1)
        return torch.minimum(boxes.clamp(min=0), dist.new_tensor([width, height, width, height]))

    def compute_loss(self, codes: Tensor, logits: Tensor, targets: Targets, size: Size) -> dict[str, Tensor]:
        """Task-aligned assignment on the detached predictions, then BCE (soft targets) + GIoU."""
        boxes = self._boxes(codes, size)
        centres, _ = self.points(*size, codes)
        gt_boxes, gt_labels, gt_mask = pad_targets(targets, codes.device)
        assignment = task_aligned_assign(
            centres.float(),
            logits.detach().float().sigmoid(),
            boxes.detach().float(),
            gt_boxes,
            gt_labels,
            gt_mask,
            self.topk,
        )
        return detection_loss(logits, boxes, assignment, self.cls_loss)
