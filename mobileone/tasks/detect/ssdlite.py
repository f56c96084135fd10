"""SSDLite (paper Table 11a) taken apart and put back around a fixed input size.

torchvision's SSDLite pieces: backbone features at strides 16 and 32, four extra blocks (1x1,
depthwise 3x3 stride 2, 1x1; 512 / 256 / 256 / 128 channels) down to a 1x1 map, ``SSDLiteHead``
(depthwise 3x3 + pointwise 1x1 per level), ``DefaultBoxGenerator`` default boxes, ``SSDMatcher``
matching, ``BoxCoder`` encoding, smooth-L1 + cross-entropy with 3:1 hard-negative mining, and
per-class ``batched_nms``. What is ours:

- The input is one normalized tensor (N, 3, S, S) at the size the detector was built for, so
  the default boxes are computed once and stored, and nothing resizes or normalizes twice.
- :meth:`SSDLiteDetector.forward_raw` is the whole network without the data-dependent
  post-processing: decoded boxes (N, A, 4) in pixels and class scores (N, A, C). It is what
  exports (``mobileone.deploy.detect``); torchvision's post-processing is never traced,
  because a traced copy silently returns other detections.
- Labels are 0-based indices into the class names (the background column is internal).
- An image without boxes still trains: it contributes its hardest negatives (torchvision's loss
  gives such images no gradient at all).
- ``reparameterize()`` folds the MobileOne branches and every conv + BatchNorm pair of the extra
  blocks and the head, so ``mobileone.reparameterize_model(detector)`` deploys a plain conv net.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import Conv2dNormActivation, box_iou

from .base import Detector, Size, Targets
from .config import DetectorConfig

NEG_TO_POS = 3.0  # hard negatives per positive (SSD)


def _norm_layer() -> partial:
    """SSDLite's BatchNorm (torchvision's ssdlite320: eps 1e-3, momentum 0.03)."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


def _normal_init(module: nn.Module) -> None:
    """SSDLite's initialisation of the convs it adds (normal, std 0.03; zero bias), as torchvision does."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def extra_block(cin: int, cout: int) -> nn.Sequential:
    """One SSDLite extra block: 1x1 to ``cout / 2``, depthwise 3x3 stride 2, 1x1 to ``cout`` (ReLU6 each)."""
    mid, norm = cout // 2, _norm_layer()
    return nn.Sequential(
        Conv2dNormActivation(cin, mid, 1, norm_layer=norm, activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, mid, 3, stride=2, groups=mid, norm_layer=norm, activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, cout, 1, norm_layer=norm, activation_layer=nn.ReLU6),
    )


class SSDLiteFeatures(nn.Module):
    """A backbone's stride-16 and stride-32 maps, then the four extra blocks: six maps for the head."""

    def __init__(self, backbone: nn.Module, channels: Sequence[int], extra_channels: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        cin, extra = channels[-1], []
        for cout in extra_channels:
            extra.append(extra_block(cin, cout))
            cin = cout
        self.extra = nn.ModuleList(extra)
        _normal_init(self.extra)
        self.out_channels = [*channels, *extra_channels]

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = list(self.backbone(x))
        y = maps[-1]
        for block in self.extra:
            y = block(y)
            maps.append(y)
        return maps


def feature_grid(img_size: int, levels: int) -> list[int]:
    """Side of each feature map for a square input: stride 16, 32, then halving (every stride-2 conv pads)."""
    side = img_size
    for _ in range(4):
        side = math.ceil(side / 2)
    sides = [side]
    for _ in range(levels - 1):
        sides.append(math.ceil(sides[-1] / 2))
    return sides


class SSDLiteDetector(Detector):
    """SSDLite at a fixed square input size; see the module docstring for what differs from torchvision's SSD."""

    def __init__(self, config: DetectorConfig, features: SSDLiteFeatures, channels: Sequence[int]) -> None:
        super().__init__(config)
        self.features = features
        levels = len(channels)
        self.anchor_generator = DefaultBoxGenerator([[2, 3]] * levels, config.anchor_min_ratio, config.anchor_max_ratio)
        self.head = SSDLiteHead(
            list(channels), self.anchor_generator.num_anchors_per_location(), config.num_classes + 1, _norm_layer()
        )
        self.box_coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.matcher = det_utils.SSDMatcher(0.5)
        self.register_buffer("anchors", self._default_boxes(levels), persistent=False)

    @property
    def backbone(self) -> nn.Module:
        return self.features.backbone

    def _default_boxes(self, levels: int) -> Tensor:
        """The default boxes (A, 4), xyxy pixels, from torchvision's generator at this input size."""
        s = self.config.img_size
        maps = [torch.empty(1, 1, g, g) for g in feature_grid(s, levels)]
        return self.anchor_generator(ImageList(torch.empty(1, 3, s, s), [(s, s)]), maps)[0]

    def _check_input(self, images: Tensor) -> None:
        s = self.config.img_size
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"this detector takes a normalized float batch (N, 3, {s}, {s}), got {shape}; letterbox "
                f"images to {s} x {s} (mobileone.tasks.detect.augment.letterbox_transform) or build the "
                "detector with another img_size"
            )

    def head_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Box regression codes (N, A, 4) and class logits (N, A, C + 1), background in column 0."""
        self._check_input(images)
        out = self.head(self.features(images))
        return out["bbox_regression"], out["cls_logits"]

    def decode(self, codes: Tensor, logits: Tensor, size: Size | None = None) -> tuple[Tensor, Tensor]:
        """Boxes (N, A, 4) clipped to the image and class scores (N, A, C) from the head's outputs.

        ``BoxCoder.decode_single``'s arithmetic, broadcast over the batch without reshapes, so every
        exporter sees a graph without shape computations.
        """
        anchors = self.anchors.to(codes.dtype)
        wx, wy, ww, wh = self.box_coder.weights
        size = anchors[:, 2:] - anchors[:, :2]
        center = anchors[:, :2] + 0.5 * size
        scale = codes.new_tensor([wx, wy])
        xy = codes[..., :2] / scale * size + center
        wh_ = torch.exp((codes[..., 2:] / codes.new_tensor([ww, wh])).clamp(max=self.box_coder.bbox_xform_clip)) * size
        boxes = torch.cat([xy - 0.5 * wh_, xy + 0.5 * wh_], dim=-1).clamp(0, self.config.img_size)
        return boxes, F.softmax(logits, dim=-1)[..., 1:]

    def compute_loss(
        self, codes: Tensor, logits: Tensor, targets: Targets, size: Size | None = None
    ) -> dict[str, Tensor]:
        """SSD's loss: smooth-L1 on matched boxes, cross-entropy on positives and 3x as many hard negatives,
        both over the number of positives; an image without boxes keeps its 3 hardest negatives."""
        n, a = codes.shape[:2]
        anchors = self.anchors
        gt_boxes = anchors.new_zeros(n, a, 4)
        gt_labels = torch.zeros(n, a, dtype=torch.long, device=anchors.device)
        for i, t in enumerate(targets):
            if t["boxes"].numel() == 0:
                continue
            matched = self.matcher(box_iou(t["boxes"].to(anchors.dtype), anchors))
            fg = matched >= 0
            gt_boxes[i, fg] = t["boxes"][matched[fg]].to(anchors.dtype)
            gt_labels[i, fg] = t["labels"][matched[fg]] + 1
        fg = gt_labels > 0
        num_fg = int(fg.sum())
        target = self.box_coder.encode_single(gt_boxes[fg], anchors.expand(n, a, 4)[fg])
        box_loss = F.smooth_l1_loss(codes[fg].float(), target, reduction="sum")
        cls_loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), gt_labels.reshape(-1), reduction="none"
        ).view(n, a)
        num_neg = (NEG_TO_POS * fg.sum(1, keepdim=True)).clamp(min=NEG_TO_POS)
        negative = cls_loss.detach().masked_fill(fg, -math.inf)
        rank = negative.argsort(1, descending=True).argsort(1)
        hard = rank < num_neg
        denom = max(1, num_fg)
        cls = (cls_loss[fg].sum() + cls_loss[hard].sum()) / denom
        return {"bbox_regression": box_loss / denom, "classification": cls}
