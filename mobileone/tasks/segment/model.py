"""DeepLabV3 and LR-ASPP on a dilated MobileOne, and the same heads on MobileNetV3-Large as peers.

The paper (its Table 11b) reports DeepLabV3 with MobileOne S0-S4 on Pascal VOC: 73.7 / 77.3 / 77.9 /
78.8 / 80.1 mIoU. No code was released. Here the heads are torchvision's building blocks (``ASPP``,
``FCNHead``, ``LRASPPHead``) on the MobileOne backbone, whose last stages trade their stride for
dilation in every train-time branch (``output_stride=16`` or ``8``), so a classification checkpoint
of the backbone loads unchanged at either output stride.

- DeepLabV3: ASPP on the stride-16 (or 8) map of stage 4 with atrous rates that match the output
  stride (6/12/18 at 16, 12/24/36 at 8: rates are in pixels of the feature map, so halving the
  stride doubles them; torchvision's ``DeepLabHead`` hard-codes 12/24/36), image pooling, a 3x3
  conv, the classifier; an optional auxiliary FCN head on stage 3 (a training signal only).
- LR-ASPP (MobileNetV3's light head): a 1x1 conv on stage 4 gated by its global average, upsampled
  to the stride-8 map of stage 2, plus a linear classifier of that low-level map.

Every model returns ``{"out": logits}`` (and ``"aux"`` in train mode when it has the auxiliary
head), like torchvision's segmentation models, with the logits upsampled to the input size.
:func:`mobileone.reparameterize_model` folds the whole model: the MobileOne branches and every
conv + BatchNorm pair of the heads (and of the MobileNetV3 peer), so the deployed graph has no
BatchNorm left.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.models.segmentation.lraspp import LRASPPHead

from ...core.checkpoint import load_checkpoint, load_task_state, read_task_weights, write_weights
from ...core.config import IMAGENET_MEAN, IMAGENET_STD, VARIANTS, MobileOneConfig, resolve_variant, variant_of
from ...core.factory import create_model
from ...core.fusion import fold_conv_bn, reparameterize_model
from ...core.model import MobileOneLayer
from ...core.registry import PEER, PEER_ALIASES, list_registered, normalize_name

HEADS = ("deeplabv3", "lraspp")
IGNORE_INDEX = 255  # mask value of pixels that count neither in the loss nor in the metrics (VOC's boundaries)
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
HEAD_CHANNELS = {"deeplabv3": 256, "lraspp": 128}  # ASPP width / LR-ASPP inter channels (torchvision's)
MNV3 = PEER  # the MobileNetV3-Large peer


@dataclass(frozen=True)
class SegmenterConfig:
    """What a segmenter is built from; saved in its checkpoints, so a file alone rebuilds its model.

    ``backbone`` is a MobileOne variant (``mobileone_s0`` ..), ``custom`` (then ``arch`` holds its
    :class:`MobileOneConfig` fields), or ``mnv3`` (torchvision's MobileNetV3-Large, no weights).
    """

    head: str = "deeplabv3"
    backbone: str = "mobileone_s0"
    num_classes: int = 21
    output_stride: int = 16
    aux: bool = True
    head_channels: int = 256
    arch: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"segmentation head must be one of {HEADS}, got {self.head!r}")
        if self.output_stride not in ATROUS_RATES:
            raise ValueError(f"output_stride must be 16 or 8, got {self.output_stride!r}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1 (background included), got {self.num_classes!r}")
        if self.num_classes > IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX} classes: masks are 8-bit and {IGNORE_INDEX} is the ignore index")
        if self.aux and self.head == "lraspp":
            raise ValueError("LR-ASPP has no auxiliary head; pass aux=False (or leave it unset)")
        if self.backbone == MNV3 and self.output_stride != 16:
            raise ValueError(
                "the MobileNetV3-Large peer runs at output stride 16 only (torchvision dilates its "
                "last stage, nothing more); use output_stride=16"
            )
        if not isinstance(self.head_channels, int) or self.head_channels < 1:
            raise ValueError(f"head_channels must be an int >= 1, got {self.head_channels!r}")

    @property
    def name(self) -> str:
        short = self.backbone.removeprefix("mobileone_")
        return f"{self.head}_{short}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def deeplab_head(in_channels: int, num_classes: int, rates: tuple[int, ...], channels: int = 256) -> nn.Sequential:
    """torchvision's ``DeepLabHead`` with the atrous rates and the width as arguments (same module names)."""
    return nn.Sequential(
        ASPP(in_channels, rates, channels),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, num_classes, 1),
    )


class Segmenter(nn.Module):
    """A backbone, a DeepLabV3 or LR-ASPP head, an optional auxiliary FCN head; logits at the input size.

    ``forward`` returns ``{"out": (N, num_classes, H, W) logits}``, plus ``"aux"`` in train mode when
    the model has the auxiliary head (it is a training signal only, skipped at inference).
    ``reparameterize()`` folds the conv + BatchNorm pairs outside MobileOne layers; use
    :func:`mobileone.reparameterize_model` to fold everything at once.
    """

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.class_names: list[str] | None = None
        self.preprocess: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": 512}
        c = config
        if c.backbone == MNV3:
            self.backbone, low_ch, high_ch = _mobilenet_v3_features(low=c.aux or c.head == "lraspp")
        else:
            arch = MobileOneConfig(**c.arch) if c.arch is not None else VARIANTS[c.backbone]
            # LR-ASPP reads stage 2 (stride 8); DeepLabV3's auxiliary head reads stage 3.
            low = {"lraspp": 2, "deeplabv3": 3}[c.head]
            indices = (low, 4) if c.aux or c.head == "lraspp" else (4,)
            self.backbone = create_model(arch, features_only=True, out_indices=indices, output_stride=c.output_stride)
            low_ch, high_ch = self.backbone.feature_info[0]["num_chs"], self.backbone.feature_info[-1]["num_chs"]
        if c.head == "deeplabv3":
            self.classifier = deeplab_head(high_ch, c.num_classes, ATROUS_RATES[c.output_stride], c.head_channels)
        else:
            self.classifier = LRASPPHead(low_ch, high_ch, c.num_classes, c.head_channels)
        self.aux_classifier = FCNHead(low_ch, c.num_classes) if c.aux else None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def inference_mode(self) -> bool:
        """Whether the whole model is folded: no MobileOne branch and no BatchNorm left."""
        layers_fused = all(m.inference_mode for m in self.modules() if isinstance(m, MobileOneLayer))
        return layers_fused and not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())

    def reparameterize(self) -> None:
        """Fold the conv + BatchNorm pairs of the heads (and of a MobileNetV3 backbone) in place."""
        fold_conv_bn(self)

    def features(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """(low-level map or None, high-level map): stage 2 or 3 and stage 4 for MobileOne."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"a segmenter expects a float batch shaped (N, 3, H, W), got shape {tuple(x.shape)}")
        feats = self.backbone(x)
        feats = list(feats.values()) if isinstance(feats, dict) else list(feats)
        return (feats[0] if len(feats) == 2 else None), feats[-1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        low, high = self.features(x)
        if self.config.head == "deeplabv3":
            logits = self.classifier(high)
        else:
            logits = self.classifier({"low": low, "high": high})
        out = OrderedDict(out=F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
        if self.aux_classifier is not None and self.training:
            out["aux"] = F.interpolate(self.aux_classifier(low), size=size, mode="bilinear", align_corners=False)
        return out


# The peer's BatchNorm: torchvision's eps, but the momentum of the MobileOne models and heads (0.1).
# torchvision's 0.01 suits long ImageNet runs; in short runs its running statistics lag behind
# the weights (LR-ASPP on MobileNetV3 scored 18.2 mIoU on the built-in scenes, 57.4 with the same
# weights once the statistics were recomputed), which would compare statistics, not networks.
PEER_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)


def _mobilenet_v3_features(low: bool) -> tuple[nn.Module, int, int]:
    """torchvision's dilated MobileNetV3-Large features (output stride 16, no weights; ``PEER_NORM``); C2 and C5."""
    features = mobilenet_v3_large(weights=None, weights_backbone=None, dilated=True, norm_layer=PEER_NORM).features
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    low_pos, high_pos = stages[-4], stages[-1]  # C2 (stride 8, 40 channels), C5 (stride 16, 960 channels)
    layers = {str(low_pos): "low", str(high_pos): "high"} if low else {str(high_pos): "high"}
    return (
        IntermediateLayerGetter(features, return_layers=layers),
        features[low_pos].out_channels,
        features[high_pos].out_channels,
    )


def parse_segmenter_name(name: str) -> tuple[str, str | None]:
    """``"deeplabv3_s0"`` -> (``"deeplabv3"``, ``"mobileone_s0"``); ``"lraspp"`` -> (``"lraspp"``, None)."""
    if not isinstance(name, str):
        raise TypeError(f"a segmenter name must be a string, got {type(name).__name__}")
    head, _, backbone = normalize_name(name).partition("_")
    if head not in HEADS:
        raise ValueError(
            f"unknown segmenter {name!r}: it must start with a head, {' or '.join(HEADS)} "
            f"(e.g. deeplabv3_s0, lraspp_mnv3); known: {list_registered('segment')}"
        )
    if not backbone:
        return head, None
    if backbone in PEER_ALIASES:
        return head, MNV3
    return head, resolve_variant(backbone.removeprefix("mobileone_"))


def create_segmenter(
    name: str = "deeplabv3_s0",
    num_classes: int = 21,
    output_stride: int = 16,
    aux: bool | None = None,
    backbone_checkpoint: str | os.PathLike | None = None,
    *,
    arch: MobileOneConfig | dict[str, Any] | None = None,
    head_channels: int | None = None,
    inference_mode: bool = False,
    class_names: list[str] | None = None,
) -> Segmenter:
    """Build a segmenter by name: ``{deeplabv3,lraspp}_{s0..s4,mu0..mu2,mnv3}``.

    Args:
        name: head and backbone, e.g. ``deeplabv3_s0``, ``lraspp_s2``, ``deeplabv3_mnv3``; the head
            alone (``deeplabv3``) with ``arch`` for a custom MobileOne backbone.
        num_classes: classes including the background (at most 255; 255 is the ignore index).
        output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36): the backbone's last stages dilate.
        aux: the auxiliary FCN head on stage 3 (DeepLabV3 only; default True there, False for LR-ASPP).
        backbone_checkpoint: a classification checkpoint of the MobileOne backbone (Apple's, timm's,
            ours; unfused), loaded into the backbone; its classifier is dropped.
        arch: a :class:`MobileOneConfig` (or its dict) for a custom backbone.
        head_channels: ASPP width (default 256) or LR-ASPP inter channels (default 128).
        inference_mode: return the folded (deployed) model.
        class_names: names of the classes, kept with the model and written into its exports.

    Example:
        >>> model = create_segmenter("deeplabv3_s0", num_classes=21, output_stride=16)
        >>> logits = model.eval()(torch.randn(1, 3, 512, 512))["out"]  # (1, 21, 512, 512)
    """
    head, backbone = parse_segmenter_name(name)
    if arch is not None:
        if backbone is not None:
            raise ValueError(
                f"give the backbone once: {name!r} names one, and arch= another; use the head alone "
                f"({head!r}) with arch="
            )
        config = arch if isinstance(arch, MobileOneConfig) else MobileOneConfig(**arch)
        backbone = variant_of(config) or "custom"
        arch_dict = None if backbone != "custom" else config.to_dict()
    elif backbone is None:
        raise ValueError(f"{name!r} names a head only; add a backbone (e.g. {head}_s0) or pass arch=")
    else:
        arch_dict = None
    if backbone == MNV3 and backbone_checkpoint is not None:
        raise ValueError(
            "the MobileNetV3-Large peer is built without weights (nothing is downloaded); "
            "backbone_checkpoint= is for MobileOne backbones"
        )
    aux = (head == "deeplabv3") if aux is None else aux
    config = SegmenterConfig(
        head, backbone, num_classes, output_stride, aux, head_channels or HEAD_CHANNELS[head], arch_dict
    )
    model = Segmenter(config)
    if backbone_checkpoint is not None:
        load_checkpoint(backbone_checkpoint, model.backbone)
    model.class_names = list(class_names) if class_names is not None else None
    if inference_mode:
        model = _fold(model)
    return model


def _fold(model: Segmenter) -> Segmenter:
    """Fold a freshly built (or loaded) model without the untrained-statistics warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reparameterize_model(model.eval(), inplace=True)


def segmenter_info(model: Segmenter, **meta: Any) -> dict[str, Any]:
    """The metadata a checkpoint holds: the constructor's arguments, classes, preprocessing, and ``meta``."""
    pre = {k: list(v) if isinstance(v, tuple) else v for k, v in model.preprocess.items()}
    return {
        "task": "segment",
        "model": model.name,
        **model.config.to_dict(),
        "inference_mode": model.inference_mode,
        "class_names": model.class_names,
        "preprocess": pre,
        **meta,
    }


def save_segmenter(model: Segmenter, path: str | os.PathLike, **meta: Any) -> Path:
    """Write the weights with :func:`segmenter_info` embedded (``.safetensors``, or a PyTorch suffix)."""
    if not isinstance(model, Segmenter):
        raise TypeError(f"save_segmenter saves a Segmenter, got {type(model).__name__}")
    return write_weights(path, model.state_dict(), segmenter_info(model, **meta))


def read_segmenter_info(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, state dict) of a file :func:`save_segmenter` wrote; a clear error for any other file."""
    sd, info = read_task_weights(path, "segment")
    return info, sd


def load_segmenter(path: str | os.PathLike) -> Segmenter:
    """Rebuild a segmenter from its checkpoint (architecture, classes and preprocessing come with the file)."""
    info, sd = read_segmenter_info(path)
    fields = {k: info[k] for k in SegmenterConfig.__dataclass_fields__ if k in info}
    model = Segmenter(SegmenterConfig(**fields))
    if info.get("inference_mode"):
        model = _fold(model)
    return load_task_state(model, sd, info, path, model.name)


__all__ = [
    "ATROUS_RATES",
    "HEADS",
    "IGNORE_INDEX",
    "Segmenter",
    "SegmenterConfig",
    "create_segmenter",
    "load_segmenter",
    "save_segmenter",
]
