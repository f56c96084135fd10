"""The trunks detectors stand on: MobileOne's feature maps (any checkpoint layout) and the MobileNetV3 peers."""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection.ssdlite import ssdlite320_mobilenet_v3_large

from ...core.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from ...core.config import variant_of
from ...core.model import MobileOne, init_branches
from .config import DetectorConfig


def mobileone_backbone(
    config: DetectorConfig,
    backbone_checkpoint: str | os.PathLike | None,
    init: str,
    out_indices: Sequence[int],
) -> MobileOne:
    """MobileOne's feature maps at ``out_indices`` (2, 3, 4: strides 8, 16, 32), from a classification
    checkpoint (its head dropped) or freshly initialised with ``init``."""
    mconfig = config.mobileone_config()
    variant = variant_of(mconfig)
    backbone = MobileOne(mconfig, 0, features_only=True, out_indices=tuple(out_indices), variant=variant)
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


class MobileNetV3Pyramid(nn.Module):
    """torchvision's MobileNetV3-Large (no weights) cut after its last block at strides 8, 16 and 32
    (40, 112 and 960 channels), as torchvision's FPN detectors on MobileNetV3 take it.

    Its BatchNorms keep running statistics with momentum 0.1, as every other BatchNorm of the detector and
    MobileOne's: torchvision's 0.01 is for its 600-epoch ImageNet recipe, and over the few hundred steps of a
    short run those statistics lag the weights so far that the eval-mode network is lost (a peer at the
    training loss of S0 scored 19 % mAP@0.5 as saved and 79 % with its statistics recomputed)."""

    CUTS = (7, 13)  # features[:7] ends at stride 8, features[7:13] at stride 16, the rest at stride 32
    BN_MOMENTUM = 0.1

    def __init__(self) -> None:
        super().__init__()
        features = mobilenet_v3_large(weights=None).features
        for m in features.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = self.BN_MOMENTUM
        a, b = self.CUTS
        self.stages = nn.ModuleList([features[:a], features[a:b], features[b:]])
        self.channels = [stage[-1].out_channels for stage in self.stages]

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps
