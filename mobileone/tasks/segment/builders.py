"""The documented segmenter builders, one per head and backbone, registered in the model registry.

``mobileone.create_model("deeplabv3_s0")`` and ``mobileone.list_models("segment")`` find them here;
``create_segmenter`` builds any ``{head}_{backbone}`` name, the micro variants included.
"""

from __future__ import annotations

import warnings
from functools import partial

from ...core.registry import ModelEntry, documented_builders, list_registered, register
from .model import HEADS, create_segmenter

# One documented, registered builder per model: name -> what the model is.
DEEPLABV3_MODELS = {
    "deeplabv3_s0": (
        "DeepLabV3 on MobileOne-S0 (the paper's VOC mIoU: 73.7): ASPP on the dilated stage 4, aux head on stage 3."
    ),
    "deeplabv3_s1": "DeepLabV3 on MobileOne-S1 (the paper's VOC mIoU: 77.3).",
    "deeplabv3_s2": "DeepLabV3 on MobileOne-S2 (the paper's VOC mIoU: 77.9).",
    "deeplabv3_s3": "DeepLabV3 on MobileOne-S3 (the paper's VOC mIoU: 78.8).",
    "deeplabv3_s4": (
        "DeepLabV3 on MobileOne-S4 (the paper's VOC mIoU: 80.1, trained without SE; this backbone keeps its SE)."
    ),
    "deeplabv3_mnv3": "The peer: the same DeepLabV3 head (and aux head) on torchvision's MobileNetV3-Large.",
}
LRASPP_MODELS = {
    "lraspp_s0": "LR-ASPP on MobileOne-S0: the light phone head (stage 4 gated by its global average + stage 2).",
    "lraspp_s1": "LR-ASPP on MobileOne-S1.",
    "lraspp_s2": "LR-ASPP on MobileOne-S2.",
    "lraspp_s3": "LR-ASPP on MobileOne-S3.",
    "lraspp_s4": "LR-ASPP on MobileOne-S4.",
    "lraspp_mnv3": (
        "The peer: LR-ASPP on torchvision's MobileNetV3-Large (torchvision's ``lraspp_mobilenet_v3_large``), "
        "no weights."
    ),
}
_ARGS = "**kwargs: as for create_segmenter (num_classes, output_stride, aux, backbone_checkpoint, ...)"
deeplabv3_s0, deeplabv3_s1, deeplabv3_s2, deeplabv3_s3, deeplabv3_s4, deeplabv3_mnv3 = documented_builders(
    "segment", create_segmenter, DEEPLABV3_MODELS, _ARGS, "num_classes=21"
)
lraspp_s0, lraspp_s1, lraspp_s2, lraspp_s3, lraspp_s4, lraspp_mnv3 = documented_builders(
    "segment", create_segmenter, LRASPP_MODELS, _ARGS, "num_classes=21"
)


for _head in HEADS:  # the micro variants build by name, without a documented builder each
    for _micro in ("mu0", "mu1", "mu2"):
        _name = f"{_head}_{_micro}"
        register(ModelEntry(_name, "segment", f"mobileone_{_micro}", partial(create_segmenter, _name), _head))


def list_segmenters() -> list[str]:
    """Deprecated: ``mobileone.list_models("segment")``."""
    warnings.warn('list_segmenters() is deprecated: use mobileone.list_models("segment")', FutureWarning, stacklevel=2)
    return list_registered("segment")
