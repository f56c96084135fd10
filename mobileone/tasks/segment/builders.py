"""The documented segmenter builders, one per head and backbone, registered in the model registry.

``mobileone.create_model("deeplabv3_s0")`` and ``mobileone.list_models("segment")`` find them here;
``create_segmenter`` builds any ``{head}_{backbone}`` name, the micro variants included.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

from ...core.registry import PEER, ModelEntry, list_registered, register, register_model
from .model import HEADS, Segmenter, create_segmenter


@register_model("segment", backbone="mobileone_s0", head="deeplabv3")
def deeplabv3_s0(**kwargs: Any) -> Segmenter:
    """DeepLabV3 on MobileOne-S0 (the paper's VOC mIoU: 73.7): ASPP on the dilated stage 4, aux head on stage 3.

    Args:
        **kwargs: as for :func:`create_segmenter` (``num_classes``, ``output_stride``, ``aux``,
            ``backbone_checkpoint``, ...).

    Example:
        >>> model = deeplabv3_s0(num_classes=21, backbone_checkpoint="mobileone_s0_unfused.pth.tar")
    """
    return create_segmenter("deeplabv3_s0", **kwargs)


@register_model("segment", backbone="mobileone_s1", head="deeplabv3")
def deeplabv3_s1(**kwargs: Any) -> Segmenter:
    """DeepLabV3 on MobileOne-S1 (the paper's VOC mIoU: 77.3).

    Args:
        **kwargs: as for :func:`create_segmenter`.

    Example:
        >>> model = deeplabv3_s1(num_classes=21, output_stride=8)
    """
    return create_segmenter("deeplabv3_s1", **kwargs)


@register_model("segment", backbone="mobileone_s2", head="deeplabv3")
def deeplabv3_s2(**kwargs: Any) -> Segmenter:
    """DeepLabV3 on MobileOne-S2 (the paper's VOC mIoU: 77.9).

    Args:
        **kwargs: as for :func:`create_segmenter`.

    Example:
        >>> model = deeplabv3_s2(num_classes=21)
    """
    return create_segmenter("deeplabv3_s2", **kwargs)


@register_model("segment", backbone="mobileone_s3", head="deeplabv3")
def deeplabv3_s3(**kwargs: Any) -> Segmenter:
    """DeepLabV3 on MobileOne-S3 (the paper's VOC mIoU: 78.8).

    Args:
        **kwargs: as for :func:`create_segmenter`.

    Example:
        >>> model = deeplabv3_s3(num_classes=21)
    """
    return create_segmenter("deeplabv3_s3", **kwargs)


@register_model("segment", backbone="mobileone_s4", head="deeplabv3")
def deeplabv3_s4(**kwargs: Any) -> Segmenter:
    """DeepLabV3 on MobileOne-S4 (the paper's VOC mIoU: 80.1, trained without SE; this backbone keeps its SE).

    Args:
        **kwargs: as for :func:`create_segmenter`.

    Example:
        >>> model = deeplabv3_s4(num_classes=21)
    """
    return create_segmenter("deeplabv3_s4", **kwargs)


@register_model("segment", backbone="mobileone_s0", head="lraspp")
def lraspp_s0(**kwargs: Any) -> Segmenter:
    """LR-ASPP on MobileOne-S0: the light phone head (stage 4 gated by its global average + stage 2).

    Args:
        **kwargs: as for :func:`create_segmenter` (no ``aux``: LR-ASPP has no auxiliary head).

    Example:
        >>> model = lraspp_s0(num_classes=21)
    """
    return create_segmenter("lraspp_s0", **kwargs)


@register_model("segment", backbone="mobileone_s1", head="lraspp")
def lraspp_s1(**kwargs: Any) -> Segmenter:
    """LR-ASPP on MobileOne-S1.

    Args:
        **kwargs: as for :func:`create_segmenter`.

    Example:
        >>> model = lraspp_s1(num_classes=21)
    """
    return create_segmenter("lraspp_s1", **kwargs)


@register_model("segment", backbone="mobileone_s2", head="lraspp")
def lraspp_s2(**kwargs: Any) -> Segmenter:
    """LR-ASPP on MobileOne-S2.

    Args:
        **kwargs: as for :func:`create_segmenter`.

    Example:
        >>> model = lraspp_s2(num_classes=21)
    """
    return create_segmenter("lraspp_s2", **kwargs)


@register_model("segment", backbone="mobileone_s3", head="lraspp")
def lraspp_s3(**kwargs: Any) -> Segmenter:
    """LR-ASPP on MobileOne-S3.

    Args:
        **kwargs: as for :func:`create_segmenter`.

    Example:
        >>> model = lraspp_s3(num_classes=21)
    """
    return create_segmenter("lraspp_s3", **kwargs)


@register_model("segment", backbone="mobileone_s4", head="lraspp")
def lraspp_s4(**kwargs: Any) -> Segmenter:
    """LR-ASPP on MobileOne-S4.

    Args:
        **kwargs: as for :func:`create_segmenter`.

    Example:
        >>> model = lraspp_s4(num_classes=21)
    """
    return create_segmenter("lraspp_s4", **kwargs)


@register_model("segment", backbone=PEER, head="deeplabv3")
def deeplabv3_mnv3(**kwargs: Any) -> Segmenter:
    """The peer: the same DeepLabV3 head (and aux head) on torchvision's MobileNetV3-Large, no weights.

    Output stride 16 only (rates 6/12/18); the aux head reads C2 (stride 8), as torchvision's does.

    Args:
        **kwargs: as for :func:`create_segmenter` (no ``backbone_checkpoint``).

    Example:
        >>> model = deeplabv3_mnv3(num_classes=21)
    """
    return create_segmenter("deeplabv3_mnv3", **kwargs)


@register_model("segment", backbone=PEER, head="lraspp")
def lraspp_mnv3(**kwargs: Any) -> Segmenter:
    """The peer: LR-ASPP on torchvision's MobileNetV3-Large (torchvision's ``lraspp_mobilenet_v3_large``), no weights.

    Args:
        **kwargs: as for :func:`create_segmenter` (no ``backbone_checkpoint``).

    Example:
        >>> model = lraspp_mnv3(num_classes=21)
    """
    return create_segmenter("lraspp_mnv3", **kwargs)


for _head in HEADS:  # the micro variants build by name, without a documented builder each
    for _micro in ("mu0", "mu1", "mu2"):
        _name = f"{_head}_{_micro}"
        register(ModelEntry(_name, "segment", f"mobileone_{_micro}", partial(create_segmenter, _name), _head))


def list_segmenters() -> list[str]:
    """Deprecated: ``mobileone.list_models("segment")``."""
    warnings.warn('list_segmenters() is deprecated: use mobileone.list_models("segment")', FutureWarning, stacklevel=2)
    return list_registered("segment")
