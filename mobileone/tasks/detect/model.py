"""Detectors by name: the anchor-free task-aligned head (``tal_*``, the default) and SSDLite (``ssdlite_*``,
the paper's), each on MobileOne or on torchvision's MobileNetV3-Large (the peer); their checkpoints.

Every builder registers with ``mobileone.core.registry`` (``mobileone.list_models("detect")``,
``mobileone.create_model(name)``). The heads live in ``tal.py`` and ``ssdlite.py``, the call
contract they share in ``base.py``, the config in ``config.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ...core.checkpoint import CheckpointError, load_task_state, read_task_weights, write_weights
from ...core.config import MobileOneConfig, resolve_variant, variant_of
from ...core.registry import (
    PEER,
    ModelEntry,
    documented_builders,
    list_registered,
    names_a_task_model,
    normalize_name,
    register,
)
from ..peer_init import zero_init_residuals
from .backbones import MobileNetV3Pyramid, MobileNetV3Trunk, mobileone_backbone
from .base import Detector
from .config import DEFAULT_HEAD, HEADS, DetectorConfig
from .postprocess import postprocess
from .ssdlite import SSDLiteDetector, SSDLiteFeatures
from .tal import TALDetector

__all__ = [
    "PEER",
    "Detector",
    "DetectorConfig",
    "SSDLiteDetector",
    "TALDetector",
    "build_detector",
    "create_detector",
    "load_detector",
    "postprocess",
    "save_detector",
]


def build_detector(
    config: DetectorConfig,
    backbone_checkpoint: str | os.PathLike | None = None,
    init: str = "torch",
    box_prior: float | None = None,
) -> Detector:
    """The detector ``config`` describes; a MobileOne backbone loads ``backbone_checkpoint`` or starts with ``init``
    (``identity`` starts the peer's residual blocks as the identity too: ``mobileone.tasks.peer_init``).
    ``box_prior``: the typical box side in pixels the tal head starts predicting (fitted to the data)."""
    tal = config.head == "tal"
    if config.backbone == PEER:
        if backbone_checkpoint is not None:
            raise ValueError("the MobileNetV3 peer is built without weights; backbone_checkpoint is for MobileOne")
        trunk: Any = MobileNetV3Pyramid() if tal else MobileNetV3Trunk()
        if init == "identity":
            zero_init_residuals(trunk)
        channels = trunk.channels
    else:
        trunk = mobileone_backbone(config, backbone_checkpoint, init, (2, 3, 4) if tal else (3, 4))
        channels = [f["num_chs"] for f in trunk.feature_info]
    if tal:
        return TALDetector(config, trunk, channels, box_prior or 32.0)
    features = SSDLiteFeatures(trunk, channels, config.extra_channels)
    return SSDLiteDetector(config, features, features.out_channels)


def qualified_name(name: str) -> str:
    """``tal_s0`` / ``ssdlite_s1`` as given; a bare variant (``s0``, ``mnv3``) under the default head."""
    return name if names_a_task_model(name) else f"{DEFAULT_HEAD}_{name.removeprefix('mobileone_')}"


def _parse_name(name: str) -> tuple[str, str]:
    """The head and backbone a name carries: ``tal_s0`` -> (tal, mobileone_s0), ``ssdlite_mnv3`` -> the peer."""
    key = normalize_name(name).replace("ssdlite320_", "ssdlite_")
    head, _, tail = key.partition("_")
    if head in HEADS:
        if tail == PEER:
            return head, PEER
        try:
            return head, resolve_variant(tail)
        except ValueError:
            pass
    raise ValueError(f"unknown detector {name!r}; choose one of {list_registered('detect')}")


def create_detector(
    name: str = f"{DEFAULT_HEAD}_s0",
    num_classes: int = 80,
    img_size: int = 320,
    backbone_checkpoint: str | os.PathLike | None = None,
    *,
    arch: MobileOneConfig | dict[str, Any] | None = None,
    init: str = "torch",
    freeze_stages: int = 0,
    class_names: Sequence[str] | None = None,
    box_prior: float | None = None,
    **options: Any,
) -> Detector:
    """Build a detector by name, on MobileOne or on the MobileNetV3-Large peer.

    Args:
        name: ``tal_s0`` .. ``tal_s4`` (anchor-free, task-aligned; the default head) or
            ``ssdlite_s0`` .. ``ssdlite_s4`` (the paper's); ``_mu0`` .. ``_mu2`` build by name too;
            ``tal_mnv3`` / ``ssdlite_mnv3`` put torchvision's MobileNetV3-Large (no weights) under the same head.
        num_classes: object classes, without the background.
        img_size: the training input size (the paper: 320); SSDLite lays its default boxes out for it and takes
            only that size, the tal head takes any multiple of 32.
        backbone_checkpoint: an unfused MobileOne classification checkpoint for the backbone
            (Apple's ``mobileone_s0_unfused.pth.tar``, timm, mmpretrain or ours); its head is dropped.
        arch: a custom MobileOne backbone (:class:`MobileOneConfig` or its fields) instead of a variant.
        init: branch initialisation of a fresh MobileOne backbone (see ``mobileone.init_branches``);
            ``identity`` also starts the peer's residual blocks as the identity (zero last BN scale).
        freeze_stages: freeze the backbone's stem and first stages (0..5), BN statistics included.
        class_names: names of the classes, stored in checkpoints and exports.
        box_prior: tal: the box side (pixels) its box branch starts predicting (the training set's median).
        **options: :class:`DetectorConfig` fields: ``score_thresh``, ``nms_thresh``, ``max_detections``,
            ``topk_candidates``; tal: ``neck_channels``; ssdlite: ``anchor_min_ratio`` (small objects need
            a smaller one), ``anchor_max_ratio``, ``extra_channels``.

    Example:
        >>> det = create_detector("tal_s0", num_classes=20)
        >>> det.eval()(torch.zeros(1, 3, 320, 320))[0]["boxes"].shape
    """
    head, backbone = _parse_name(name)
    arch_dict = arch.to_dict() if isinstance(arch, MobileOneConfig) else (dict(arch) if arch else None)
    if arch_dict is not None:
        if backbone == PEER:
            raise ValueError("arch describes a MobileOne backbone; the mnv3 peer takes none")
        named = variant_of(MobileOneConfig(**arch_dict))
        backbone, arch_dict = (named, None) if named else ("custom", arch_dict)
    config = DetectorConfig(
        backbone=backbone, num_classes=num_classes, img_size=img_size, arch=arch_dict, head=head, **options
    )
    detector = build_detector(config, backbone_checkpoint, init, box_prior)
    if freeze_stages:
        detector.freeze_stages(freeze_stages)
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        detector.class_names = list(class_names)
    return detector


# One documented, registered builder per model: name -> what the model is. The tal head first: the default.
TAL_MODELS = {
    "tal_s0": (
        "The default detector: MobileOne-S0 (strides 8 / 16 / 32: 128, 256, 1024 channels) under the "
        "anchor-free task-aligned head (FPN + PAN neck, 64 channels)."
    ),
    "tal_s1": "MobileOne-S1 under the tal head.",
    "tal_s2": "MobileOne-S2 under the tal head.",
    "tal_s3": "MobileOne-S3 under the tal head.",
    "tal_s4": "MobileOne-S4 under the tal head.",
    "tal_mnv3": (
        "The peer of the default: torchvision's MobileNetV3-Large (no weights; strides 8 / 16 / 32: 40, 112, "
        "960 channels) under the very same tal head, assignment and loss."
    ),
}
SSDLITE_MODELS = {
    "ssdlite_s0": "SSDLite on MobileOne-S0 (256 and 1024 channels at strides 16 and 32); not in the paper's Table 11a.",
    "ssdlite_s1": "SSDLite on MobileOne-S1 (512 and 1280 channels at strides 16 and 32); paper: 25.7 mAP on COCO.",
    "ssdlite_s2": "SSDLite on MobileOne-S2 (640 and 2048 channels at strides 16 and 32); paper: 26.6 mAP on COCO.",
    "ssdlite_s3": "SSDLite on MobileOne-S3 (768 and 2048 channels at strides 16 and 32); paper: 27.3 mAP on COCO.",
    "ssdlite_s4": "SSDLite on MobileOne-S4 (SE blocks; 896 and 2048 channels); paper: 29.4 mAP on COCO.",
    "ssdlite_mnv3": (
        "The SSDLite peer: torchvision's SSDLite MobileNetV3-Large trunk (reduced tail, no weights) with the "
        "same extra blocks, head, default boxes and loss as the MobileOne SSDLite detectors."
    ),
}
_ARGS = "num_classes (objects, no background), then create_detector's options (img_size, backbone_checkpoint, ...)"
_EXAMPLE = "num_classes=1, img_size=320"
tal_s0, tal_s1, tal_s2, tal_s3, tal_s4, tal_mnv3 = documented_builders(
    "detect", create_detector, TAL_MODELS, _ARGS, _EXAMPLE
)
ssdlite_s0, ssdlite_s1, ssdlite_s2, ssdlite_s3, ssdlite_s4, ssdlite_mnv3 = documented_builders(
    "detect", create_detector, SSDLITE_MODELS, _ARGS, _EXAMPLE
)


for _head in HEADS:  # the micro variants build by name, without a documented builder each
    for _micro in ("mu0", "mu1", "mu2"):
        _name = f"{_head}_{_micro}"
        register(ModelEntry(_name, "detect", f"mobileone_{_micro}", partial(create_detector, _name), _head))


def save_detector(model: Detector, path: str | os.PathLike, **meta: Any) -> Path:
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


def load_detector(path: str | os.PathLike) -> Detector:
    """Rebuild a detector from a file :func:`save_detector` wrote (fused or not), in eval mode."""
    sd, meta = read_task_weights(path, "detect")
    try:
        config = DetectorConfig.from_dict(meta["detector"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its detector metadata is unusable ({e})") from e
    model = build_detector(config)
    if meta.get("inference_mode"):
        model.reparameterize()
    return load_task_state(model, sd, meta, path, "detector")
