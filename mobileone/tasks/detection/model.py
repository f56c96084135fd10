"""SSDLite detectors on MobileOne (paper Table 11a) and on torchvision's MobileNetV3-Large, the peer.

The detector is torchvision's SSDLite taken apart and put back around a fixed input size:
backbone features at strides 16 and 32, four extra blocks (1x1, depthwise 3x3 stride 2, 1x1;
512 / 256 / 256 / 128 channels) down to a 1x1 map, torchvision's ``SSDLiteHead`` (depthwise 3x3
+ pointwise 1x1 per level), ``DefaultBoxGenerator`` default boxes, ``SSDMatcher`` matching,
``BoxCoder`` encoding, smooth-L1 + cross-entropy with 3:1 hard-negative mining, and per-class
``batched_nms``. What is ours:

- The input is one normalized tensor (N, 3, S, S) at the size the detector was built for, so
  the default boxes are computed once and stored, and nothing resizes or normalizes twice.
- :meth:`SSDLiteDetector.forward_raw` is the whole network without the data-dependent
  post-processing: decoded boxes (N, A, 4) in pixels and class scores (N, A, C). It is what
  exports (``mobileone.deploy.detection``); torchvision's post-processing is never traced,
  because a traced copy silently returns other detections.
- Labels are 0-based indices into the class names (the background column is internal), in the
  eager detections and in every exported form alike.
- An image without boxes still trains: it contributes its hardest negatives (torchvision's loss
  gives such images no gradient at all).
- ``reparameterize()`` folds the MobileOne branches and every conv + BatchNorm pair of the extra
  blocks and the head, so ``mobileone.reparameterize_model(detector)`` deploys a plain conv net.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssdlite import SSDLiteHead, ssdlite320_mobilenet_v3_large
from torchvision.ops import Conv2dNormActivation, batched_nms, box_iou

from ...core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    read_task_weights,
    write_weights,
)
from ...core.config import IMAGENET_MEAN, IMAGENET_STD, VARIANTS, MobileOneConfig, resolve_variant, variant_of
from ...core.fusion import fold_conv_bn
from ...core.model import MobileOne, MobileOneLayer, init_branches
from ...core.registry import PEER, ModelEntry, list_registered, normalize_name, register, register_model
from ..peer_init import zero_init_residuals

EXTRA_CHANNELS = (512, 256, 256, 128)  # SSDLite's four extra blocks (torchvision, MobileNetV2 paper section 6.2)
NEG_TO_POS = 3.0  # hard negatives per positive (SSD)


@dataclass
class DetectorConfig:
    """Everything that rebuilds a detector; stored in its checkpoints and exported files.

    ``backbone`` is a MobileOne variant (``mobileone_s0``), ``"custom"`` with ``arch`` holding the
    :class:`MobileOneConfig` fields, or ``"mnv3"`` for the MobileNetV3-Large peer. ``num_classes``
    counts the object classes (the background is added inside).
    """

    backbone: str
    num_classes: int
    img_size: int = 320
    arch: dict[str, Any] | None = None
    anchor_min_ratio: float = 0.2  # the smallest default box as a fraction of the image (SSD's s_min)
    anchor_max_ratio: float = 0.95
    score_thresh: float = 0.001
    nms_thresh: float = 0.55
    max_detections: int = 300
    topk_candidates: int = 400  # per class, before NMS
    extra_channels: tuple[int, ...] = field(default=EXTRA_CHANNELS)

    def __post_init__(self) -> None:
        self.extra_channels = tuple(self.extra_channels)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1 (objects, no background), got {self.num_classes!r}")
        if not isinstance(self.img_size, int) or not 32 <= self.img_size <= 4096:
            raise ValueError(f"img_size must be an int in 32..4096 (the square input size), got {self.img_size!r}")
        if not 0 < self.anchor_min_ratio < self.anchor_max_ratio <= 1:
            raise ValueError(
                f"anchor ratios must satisfy 0 < min < max <= 1, got min {self.anchor_min_ratio}, "
                f"max {self.anchor_max_ratio}"
            )
        if not 0 <= self.score_thresh < 1 or not 0 < self.nms_thresh <= 1:
            raise ValueError(
                f"score_thresh must be in [0, 1) and nms_thresh in (0, 1], got {self.score_thresh}, {self.nms_thresh}"
            )
        if self.max_detections < 1 or self.topk_candidates < 1:
            raise ValueError("max_detections and topk_candidates must be >= 1")
        if len(self.extra_channels) != 4:
            raise ValueError(f"extra_channels must be 4 widths (SSDLite's extra blocks), got {self.extra_channels}")
        if self.backbone == "custom" and not self.arch:
            raise ValueError("backbone 'custom' needs arch (MobileOneConfig fields)")
        if self.arch:  # one spelling (all fields, lists), so configs compare equal after a JSON round trip
            self.arch = MobileOneConfig(**self.arch).to_dict()

    def mobileone_config(self) -> MobileOneConfig:
        if self.arch:
            return MobileOneConfig(**self.arch)
        return VARIANTS[resolve_variant(self.backbone)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_channels"] = list(self.extra_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown detector option(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


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


class MobileNetV3Trunk(nn.Module):
    """torchvision's SSDLite MobileNetV3-Large trunk (reduced tail, no weights): the C4 expansion
    output (stride 16) and the last layer (stride 32), exactly as ``ssdlite320_mobilenet_v3_large`` splits it."""

    def __init__(self) -> None:
        super().__init__()
        reference = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=2)
        self.body = reference.backbone.features  # two Sequentials: up to the C4 expansion, then the rest
        self.channels = [self.body[0][-1].out_channels, self.body[1][-1].out_channels]

    def forward(self, x: Tensor) -> list[Tensor]:
        c4 = self.body[0](x)
        return [c4, self.body[1](c4)]


def feature_grid(img_size: int, levels: int) -> list[int]:
    """Side of each feature map for a square input: stride 16, 32, then halving (every stride-2 conv pads)."""
    side = img_size
    for _ in range(4):
        side = math.ceil(side / 2)
    sides = [side]
    for _ in range(levels - 1):
        sides.append(math.ceil(sides[-1] / 2))
    return sides


def postprocess(boxes: Tensor, scores: Tensor, config: DetectorConfig) -> list[dict[str, Tensor]]:
    """Per image and class the ``topk_candidates`` best scores above ``score_thresh``, per-class NMS at
    ``nms_thresh``, then the ``max_detections`` best, best first. The ONNX NMS form runs these steps in its graph.

    ``boxes`` (N, A, 4) and ``scores`` (N, A, C) are :meth:`SSDLiteDetector.forward_raw`'s outputs
    (or a raw ONNX export's); labels come back 0-based.
    """
    out = []
    k = min(config.topk_candidates, boxes.shape[1])
    for b, s in zip(boxes, scores):
        top, idx = s.t().topk(k, dim=1)  # (C, k)
        keep = top > config.score_thresh
        labels = torch.arange(s.shape[1], device=s.device)[:, None].expand_as(idx)[keep]
        cand_boxes, cand_scores = b[idx[keep]], top[keep]
        order = batched_nms(cand_boxes.float(), cand_scores.float(), labels, config.nms_thresh)[: config.max_detections]
        out.append({"boxes": cand_boxes[order], "scores": cand_scores[order], "labels": labels[order]})
    return out


class SSDLiteDetector(nn.Module):
    """SSDLite at a fixed square input size; see the module docstring for what differs from torchvision's SSD.

    - ``forward(images, targets)`` in train mode: ``{"bbox_regression": ..., "classification": ...}``.
    - ``forward(images)`` in eval mode: one dict per image, ``boxes`` (K, 4) xyxy pixels of the
      input, ``scores`` (K,), ``labels`` (K,) 0-based, best first, at most ``max_detections``.
    - ``forward_raw(images)``: decoded boxes (N, A, 4) and class scores (N, A, C), no NMS.
    """

    def __init__(self, config: DetectorConfig, features: nn.Module, channels: Sequence[int]) -> None:
        super().__init__()
        self.config = config
        self.features = features
        levels = len(channels)
        self.anchor_generator = DefaultBoxGenerator([[2, 3]] * levels, config.anchor_min_ratio, config.anchor_max_ratio)
        self.head = SSDLiteHead(
            list(channels), self.anchor_generator.num_anchors_per_location(), config.num_classes + 1, _norm_layer()
        )
        self.box_coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.matcher = det_utils.SSDMatcher(0.5)
        self.register_buffer("anchors", self._default_boxes(levels), persistent=False)
        self.class_names: list[str] | None = None
        self.preprocess = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": config.img_size}

    def _default_boxes(self, levels: int) -> Tensor:
        """The default boxes (A, 4), xyxy pixels, from torchvision's generator at this input size."""
        s = self.config.img_size
        maps = [torch.empty(1, 1, g, g) for g in feature_grid(s, levels)]
        return self.anchor_generator(ImageList(torch.empty(1, 3, s, s), [(s, s)]), maps)[0]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def inference_mode(self) -> bool:
        """Whether everything is folded: no BatchNorm and no MobileOne branches left."""
        return not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())

    def _check_input(self, images: Tensor) -> None:
        s = self.config.img_size
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"this detector takes a normalized float batch (N, 3, {s}, {s}), got {shape}; resize "
                f"images to {s} x {s} (mobileone.tasks.detection.data.eval_transform) or build the "
                "detector with another img_size"
            )

    def head_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Box regression codes (N, A, 4) and class logits (N, A, C + 1), background in column 0."""
        self._check_input(images)
        out = self.head(self.features(images))
        return out["bbox_regression"], out["cls_logits"]

    def decode(self, codes: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
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

    def forward_raw(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Decoded boxes (N, A, 4) and class scores (N, A, C): the network without NMS (what exports)."""
        return self.decode(*self.head_outputs(images))

    def postprocess(self, boxes: Tensor, scores: Tensor) -> list[dict[str, Tensor]]:
        """Detections from :meth:`forward_raw`'s outputs (see :func:`postprocess`)."""
        return postprocess(boxes, scores, self.config)

    def compute_loss(self, codes: Tensor, logits: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
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

    def forward(
        self, images: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        codes, logits = self.head_outputs(images)
        if self.training:
            if targets is None or len(targets) != len(images):
                raise ValueError("in train mode the detector needs targets: one dict of boxes and labels per image")
            return self.compute_loss(codes, logits, targets)
        return self.postprocess(*self.decode(codes, logits))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the MobileOne branches and every conv + BatchNorm pair (the fused detector is conv + activations)."""
        for m in self.modules():
            if isinstance(m, MobileOneLayer):
                m.reparameterize()
        fold_conv_bn(self)

    def freeze_stages(self, n: int) -> None:
        """Freeze the MobileOne backbone's stem and first stages (see ``MobileOne.freeze_stages``)."""
        backbone = self.features.backbone
        if not isinstance(backbone, MobileOne):
            if n:
                raise ValueError("freeze_stages works on MobileOne backbones; the MobileNetV3 peer trains whole")
            return
        backbone.freeze_stages(n)


def _mobileone_backbone(config: DetectorConfig, backbone_checkpoint: str | os.PathLike | None, init: str) -> MobileOne:
    mconfig = config.mobileone_config()
    variant = variant_of(mconfig)
    backbone = MobileOne(mconfig, 0, features_only=True, out_indices=(3, 4), variant=variant)
    if backbone_checkpoint is None:
        return init_branches(backbone, init)
    ckpt = read_checkpoint(backbone_checkpoint)
    if ckpt.fused:
        raise CheckpointError(
            f"{backbone_checkpoint} holds fused (inference) weights; a detector trains the unfused "
            "branches: use the unfused checkpoint (Apple's *_unfused.pth.tar, or our "
            "last/best.safetensors)"
        )
    if ckpt.config != mconfig:
        raise CheckpointError(
            f"{backbone_checkpoint} is a {ckpt.variant or 'custom'} backbone, the detector's is "
            f"{variant or 'custom'}; choose the matching variant (--variant "
            f"{(ckpt.variant or 'custom').removeprefix('mobileone_')})"
        )
    return load_checkpoint(backbone_checkpoint, backbone)


def build_detector(
    config: DetectorConfig, backbone_checkpoint: str | os.PathLike | None = None, init: str = "torch"
) -> SSDLiteDetector:
    """The detector ``config`` describes; a MobileOne backbone loads ``backbone_checkpoint`` or starts with ``init``
    (``identity`` starts the peer's residual blocks as the identity too: ``mobileone.tasks.peer_init``)."""
    if config.backbone == PEER:
        if backbone_checkpoint is not None:
            raise ValueError("the MobileNetV3 peer is built without weights; backbone_checkpoint is for MobileOne")
        trunk: nn.Module = MobileNetV3Trunk()
        if init == "identity":
            zero_init_residuals(trunk)
        channels = trunk.channels
    else:
        trunk = _mobileone_backbone(config, backbone_checkpoint, init)
        channels = [f["num_chs"] for f in trunk.feature_info]
    features = SSDLiteFeatures(trunk, channels, config.extra_channels)
    return SSDLiteDetector(config, features, features.out_channels)


def _backbone_name(name: str) -> str:
    """The backbone a detector name carries: ``ssdlite_s0`` -> ``mobileone_s0``, ``ssdlite_mnv3`` -> the peer."""
    tail = normalize_name(name).replace("ssdlite320_", "ssdlite_").removeprefix("ssdlite_")
    if tail == PEER:
        return PEER
    try:
        return resolve_variant(tail)
    except ValueError:
        raise ValueError(f"unknown detector {name!r}; choose one of {list_registered('detect')}") from None


def create_detector(
    name: str = "ssdlite_s0",
    num_classes: int = 80,
    img_size: int = 320,
    backbone_checkpoint: str | os.PathLike | None = None,
    *,
    arch: MobileOneConfig | dict[str, Any] | None = None,
    init: str = "torch",
    freeze_stages: int = 0,
    class_names: Sequence[str] | None = None,
    **options: Any,
) -> SSDLiteDetector:
    """Build an SSDLite detector by name, on MobileOne or on the MobileNetV3-Large peer.

    Args:
        name: ``ssdlite_s0`` .. ``ssdlite_s4`` (also ``ssdlite_mu0`` .. ``ssdlite_mu2``), or
            ``ssdlite_mnv3`` for torchvision's MobileNetV3-Large with the same head (no weights).
        num_classes: object classes, without the background.
        img_size: the square input size the default boxes are laid out for (the paper: 320).
        backbone_checkpoint: an unfused MobileOne classification checkpoint for the backbone
            (Apple's ``mobileone_s0_unfused.pth.tar``, timm, mmpretrain or ours); its head is dropped.
        arch: a custom MobileOne backbone (:class:`MobileOneConfig` or its fields) instead of a variant.
        init: branch initialisation of a fresh MobileOne backbone (see ``mobileone.init_branches``);
            ``identity`` also starts the peer's residual blocks as the identity (zero last BN scale).
        freeze_stages: freeze the backbone's stem and first stages (0..5), BN statistics included.
        class_names: names of the classes, stored in checkpoints and exports.
        **options: :class:`DetectorConfig` fields: ``anchor_min_ratio`` (small objects need a smaller
            one), ``anchor_max_ratio``, ``score_thresh``, ``nms_thresh``, ``max_detections``,
            ``topk_candidates``, ``extra_channels``.

    Example:
        >>> det = create_detector("ssdlite_s1", num_classes=20, anchor_min_ratio=0.1)
        >>> det.eval()(torch.zeros(1, 3, 320, 320))[0]["boxes"].shape
    """
    backbone = _backbone_name(name)
    arch_dict = arch.to_dict() if isinstance(arch, MobileOneConfig) else (dict(arch) if arch else None)
    if arch_dict is not None:
        if backbone == PEER:
            raise ValueError("arch describes a MobileOne backbone; the mnv3 peer takes none")
        named = variant_of(MobileOneConfig(**arch_dict))
        backbone, arch_dict = (named, None) if named else ("custom", arch_dict)
    config = DetectorConfig(backbone=backbone, num_classes=num_classes, img_size=img_size, arch=arch_dict, **options)
    detector = build_detector(config, backbone_checkpoint, init)
    if freeze_stages:
        detector.freeze_stages(freeze_stages)
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        detector.class_names = list(class_names)
    return detector


@register_model("detect", backbone="mobileone_s0", head="ssdlite")
def ssdlite_s0(num_classes: int = 80, **kwargs: Any) -> SSDLiteDetector:
    """SSDLite on MobileOne-S0 (k = 4 branches; 256 and 1024 channels at strides 16 and 32).

    Not in the paper's Table 11a, which starts at S1; the smallest MobileOne detector.

    Args:
        num_classes: object classes, without the background.
        **kwargs: as for :func:`create_detector` (``img_size``, ``backbone_checkpoint``, anchor options, ...).

    Example:
        >>> det = ssdlite_s0(num_classes=10, img_size=128, anchor_min_ratio=0.1)
    """
    return create_detector("ssdlite_s0", num_classes, **kwargs)


@register_model("detect", backbone="mobileone_s1", head="ssdlite")
def ssdlite_s1(num_classes: int = 80, **kwargs: Any) -> SSDLiteDetector:
    """SSDLite on MobileOne-S1 (512 and 1280 channels at strides 16 and 32); paper: 25.7 mAP on COCO.

    Args:
        num_classes: object classes, without the background.
        **kwargs: as for :func:`create_detector`.

    Example:
        >>> det = ssdlite_s1(num_classes=80, backbone_checkpoint="mobileone_s1_unfused.pth.tar")
    """
    return create_detector("ssdlite_s1", num_classes, **kwargs)


@register_model("detect", backbone="mobileone_s2", head="ssdlite")
def ssdlite_s2(num_classes: int = 80, **kwargs: Any) -> SSDLiteDetector:
    """SSDLite on MobileOne-S2 (640 and 2048 channels at strides 16 and 32); paper: 26.6 mAP on COCO.

    Args:
        num_classes: object classes, without the background.
        **kwargs: as for :func:`create_detector`.

    Example:
        >>> det = ssdlite_s2(num_classes=80)
    """
    return create_detector("ssdlite_s2", num_classes, **kwargs)


@register_model("detect", backbone="mobileone_s3", head="ssdlite")
def ssdlite_s3(num_classes: int = 80, **kwargs: Any) -> SSDLiteDetector:
    """SSDLite on MobileOne-S3 (768 and 2048 channels at strides 16 and 32); paper: 27.3 mAP on COCO.

    Args:
        num_classes: object classes, without the background.
        **kwargs: as for :func:`create_detector`.

    Example:
        >>> det = ssdlite_s3(num_classes=80)
    """
    return create_detector("ssdlite_s3", num_classes, **kwargs)


@register_model("detect", backbone="mobileone_s4", head="ssdlite")
def ssdlite_s4(num_classes: int = 80, **kwargs: Any) -> SSDLiteDetector:
    """SSDLite on MobileOne-S4 (SE blocks; 896 and 2048 channels at strides 16 and 32); paper: 29.4 mAP on COCO.

    Args:
        num_classes: object classes, without the background.
        **kwargs: as for :func:`create_detector`.

    Example:
        >>> det = ssdlite_s4(num_classes=80)
    """
    return create_detector("ssdlite_s4", num_classes, **kwargs)


@register_model("detect", backbone=PEER, head="ssdlite")
def ssdlite_mnv3(num_classes: int = 80, **kwargs: Any) -> SSDLiteDetector:
    """The peer: torchvision's SSDLite MobileNetV3-Large trunk (reduced tail, no weights) with the same
    extra blocks, head, default boxes and loss as the MobileOne detectors, for fair comparisons.

    Args:
        num_classes: object classes, without the background.
        **kwargs: as for :func:`create_detector` (no ``backbone_checkpoint``, ``arch`` or ``freeze_stages``).

    Example:
        >>> peer = ssdlite_mnv3(num_classes=10, img_size=320)
    """
    return create_detector("ssdlite_mnv3", num_classes, **kwargs)


for _micro in ("mu0", "mu1", "mu2"):  # the micro variants build by name, without a documented builder each
    _name = f"ssdlite_{_micro}"
    register(ModelEntry(_name, "detect", f"mobileone_{_micro}", partial(create_detector, _name), "ssdlite"))


def save_detector(model: SSDLiteDetector, path: str | os.PathLike, **meta: Any) -> Path:
    """Write the detector's weights with what rebuilds it embedded (config, fused or not, classes, preprocessing).

    ``mobileone eval --task detect`` and ``mobileone export --task detect`` need nothing else.
    """
    info = {
        "task": "detect",
        "detector": model.config.to_dict(),
        "inference_mode": model.inference_mode,
        "class_names": model.class_names,
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in model.preprocess.items()},
        **meta,
    }
    return write_weights(path, model.state_dict(), info)


def load_detector(path: str | os.PathLike) -> SSDLiteDetector:
    """Rebuild a detector from a file :func:`save_detector` wrote (fused or not), in eval mode."""
    sd, meta = read_task_weights(path, "detect")
    try:
        config = DetectorConfig.from_dict(meta["detector"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its detector metadata is unusable ({e})") from e
    model = build_detector(config)
    if meta.get("inference_mode"):
        model.reparameterize()
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the detector its metadata describes: {e}") from e
    model.class_names = meta.get("class_names")
    model.preprocess.update(meta.get("preprocess") or {})
    return model.eval()
