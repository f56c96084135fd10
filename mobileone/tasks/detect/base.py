"""What every detector head shares: the call contract the engine, evaluation, export and predict rely on."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...core.config import IMAGENET_MEAN, IMAGENET_STD
from ...core.fusion import fold_conv_bn
from ...core.model import MobileOne, MobileOneLayer
from .config import DetectorConfig
from .postprocess import postprocess

Targets = list[dict[str, Tensor]]
Size = tuple[int, int]


def _size(images: Tensor) -> Size:
    return int(images.shape[-2]), int(images.shape[-1])


class Detector(nn.Module):
    """A detector on a backbone (``self.backbone``), whatever its head.

    - ``forward(images, targets)`` in train mode: ``{"bbox_regression": ..., "classification": ...}``.
    - ``forward(images)`` in eval mode: one dict per image, ``boxes`` (K, 4) xyxy pixels of the
      input, ``scores`` (K,), ``labels`` (K,) 0-based, best first, at most ``max_detections``.
    - ``forward_raw(images)``: decoded boxes (N, A, 4) and class scores (N, A, C), no NMS; fixed
      shapes for a given input size (what exports).

    Subclasses supply ``head_outputs``, ``decode`` and ``compute_loss``.
    """

    backbone: nn.Module

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.class_names: list[str] | None = None
        self.preprocess = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": config.img_size}

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def inference_mode(self) -> bool:
        """Whether everything is folded: no BatchNorm and no MobileOne branches left."""
        return not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())

    def head_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def decode(self, codes: Tensor, logits: Tensor, size: Size) -> tuple[Tensor, Tensor]:
        """Boxes (N, A, 4) in pixels of an input of ``size`` (H, W) and class scores (N, A, C)."""
        raise NotImplementedError

    def compute_loss(self, codes: Tensor, logits: Tensor, targets: Targets, size: Size) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward_raw(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Decoded boxes (N, A, 4) and class scores (N, A, C): the network without NMS (what exports)."""
        return self.decode(*self.head_outputs(images), _size(images))

    def postprocess(self, boxes: Tensor, scores: Tensor) -> list[dict[str, Tensor]]:
        """Detections from :meth:`forward_raw`'s outputs (see :func:`postprocess.postprocess`)."""
        return postprocess(boxes, scores, self.config)

    def forward(self, images: Tensor, targets: Targets | None = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        codes, logits = self.head_outputs(images)
        if self.training:
            if targets is None or len(targets) != len(images):
                raise ValueError("in train mode the detector needs targets: one dict of boxes and labels per image")
            return self.compute_loss(codes, logits, targets, _size(images))
        return self.postprocess(*self.decode(codes, logits, _size(images)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the MobileOne branches and every conv + BatchNorm pair (the fused detector is conv + activations)."""
        for m in self.modules():
            if isinstance(m, MobileOneLayer):
                m.reparameterize()
        fold_conv_bn(self)

    def freeze_stages(self, n: int) -> None:
        """Freeze the MobileOne backbone's stem and first stages (see ``MobileOne.freeze_stages``)."""
        if not isinstance(self.backbone, MobileOne):
            if n:
                raise ValueError("freeze_stages works on MobileOne backbones; the MobileNetV3 peer trains whole")
            return
        self.backbone.freeze_stages(n)
