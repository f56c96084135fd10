"""What rebuilds a detector: one plain config for every head, stored in checkpoints and exported files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ...core.config import VARIANTS, MobileOneConfig, resolve_variant

HEADS = ("tal", "ssdlite")  # tal: anchor-free, task-aligned (the default); ssdlite: the paper's
DEFAULT_HEAD = HEADS[0]
EXTRA_CHANNELS = (512, 256, 256, 128)  # SSDLite's four extra blocks (torchvision, MobileNetV2 paper section 6.2)


@dataclass
class DetectorConfig:
    """Everything that rebuilds a detector; stored in its checkpoints and exported files.

    ``backbone`` is a MobileOne variant (``mobileone_s0``), ``"custom"`` with ``arch`` holding the
    :class:`MobileOneConfig` fields, or ``"mnv3"`` for the MobileNetV3-Large peer. ``num_classes``
    counts the object classes (SSDLite adds its background inside). ``head`` is ``tal`` (anchor-free
    points at strides 8 / 16 / 32 over an FPN + PAN neck of ``neck_channels``) or ``ssdlite`` (default
    boxes from ``anchor_min_ratio`` to ``anchor_max_ratio`` on six levels, ``extra_channels``).
    """

    backbone: str
    num_classes: int
    img_size: int = 320
    arch: dict[str, Any] | None = None
    head: str = "ssdlite"  # checkpoints written before the tal head existed hold SSDLite detectors
    anchor_min_ratio: float = 0.2  # ssdlite: the smallest default box as a fraction of the image (SSD's s_min)
    anchor_max_ratio: float = 0.95
    score_thresh: float = 0.001
    nms_thresh: float = 0.55
    max_detections: int = 300
    topk_candidates: int = 400  # per class, before NMS
    extra_channels: tuple[int, ...] = field(default=EXTRA_CHANNELS)
    neck_channels: int = 64  # tal: width of the FPN + PAN neck and of the head

    def __post_init__(self) -> None:
        self.extra_channels = tuple(self.extra_channels)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1 (objects, no background), got {self.num_classes!r}")
        if not isinstance(self.img_size, int) or not 32 <= self.img_size <= 4096:
            raise ValueError(f"img_size must be an int in 32..4096 (the square input size), got {self.img_size!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "tal" and self.img_size % 32:
            raise ValueError(f"the tal head needs an img_size that is a multiple of 32, got {self.img_size}")
        if not 0 < self.anchor_min_ratio < self.anchor_max_ratio <= 1:
            raise ValueError(
                f"anchor ratios must satisfy 0 < min < max <= 1, got min {self.anchor_min_ratio}, "
                f"max {self.anchor_max_ratio}"
            )
        if not 0 <= self.score_thresh < 1 or not 0 < self.nms_thresh <= 1:
            raise ValueError(
                f"score_thresh must be in [0, 1) and nms_thresh in (0, 1], got {self.score_thresh}, {self.nms_thresh}"
            )
        if self.max_detections < 1 or self.topk_candidates < 1 or self.neck_channels < 8:
            raise ValueError("max_detections and topk_candidates must be >= 1, neck_channels >= 8")
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
