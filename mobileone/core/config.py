"""MobileOne architectures as plain data: the config type, the paper's variants, and its numbers.

This module is the bottom of the package (it imports nothing of ours), so every other module can
read the architecture tables. The paper's tables live here as data, in one place:

- ``VARIANTS``: Table 7 (S0-S4, as Apple's code builds them) and the micro variants of Table 13
  (reconstructions, see ``MICRO_SEARCH``);
- ``PAPER``: the paper's reported results per model (ImageNet top-1, params, MACs, latencies),
  which the tests, the benchmark and the README compare against.

Architecture reference: docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BASE_WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class MobileOneConfig:
    """A MobileOne architecture as plain data. Per-stage tuples are for stages 1-4."""

    widths: tuple[int, int, int, int]
    stem_width: int
    blocks: tuple[int, int, int, int] = (2, 8, 10, 1)
    k: tuple[int, int, int, int] = (1, 1, 1, 1)
    se_blocks: tuple[int, int, int, int] = (0, 0, 0, 0)  # SE on the last n blocks of each stage
    stem_k: int = 1  # Apple's stem has k = 1 in every variant (the paper's Table 7 says 4)
    scale_branch: bool = True  # False together with k = 1 and skip_branch = False: no branches
    skip_branch: bool = True
    output_stride: int = 32  # 16 or 8 trade the last strides for dilation (segmentation)

    def __post_init__(self) -> None:
        for name in ("widths", "blocks", "k", "se_blocks"):
            value = getattr(self, name)
            value = (value,) * 4 if isinstance(value, int) else tuple(value)
            if len(value) != 4 or not all(isinstance(v, int) and v >= 0 for v in value):
                raise ValueError(f"MobileOneConfig.{name} must be 4 non-negative ints (stages 1-4), got {value!r}")
            object.__setattr__(self, name, value)
        if min(self.widths) < 1 or self.stem_width < 1 or min(self.blocks) < 1 or min(self.k) < 1 or self.stem_k < 1:
            raise ValueError(f"widths, blocks and k must be >= 1: {self}")
        if any(s > b for s, b in zip(self.se_blocks, self.blocks)):
            raise ValueError(f"se_blocks {self.se_blocks} exceeds the blocks per stage {self.blocks}")
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")

    @classmethod
    def from_multipliers(
        cls,
        multipliers: tuple[float, float, float, float],
        k: int = 1,
        se_blocks: tuple[int, ...] = (0, 0, 0, 0),
        blocks: tuple[int, int, int, int] = (2, 8, 10, 1),
    ) -> MobileOneConfig:
        """Apple's parameterization: stage widths ``int(base * w)``, stem ``min(64, int(64 * w0))``."""
        widths = tuple(int(b * w) for b, w in zip(BASE_WIDTHS, multipliers))
        return cls(
            widths=widths, stem_width=min(64, int(64 * multipliers[0])), blocks=blocks, k=(k,) * 4, se_blocks=se_blocks
        )

    def replace(self, **changes: Any) -> MobileOneConfig:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(
                f"unknown MobileOne config option(s) {sorted(unknown)}; valid: {[f.name for f in fields(self)]}"
            )
        return MobileOneConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# The paper's Table 7 (as Apple's code builds it): width multipliers of stages 1-4, k, SE blocks.
# The micro variants of Table 13 were never published beyond their sizes; these configs are
# reconstructions: S0's depth (2, 8, 10, 1) and k = 4, stage widths (multiples of 8, rising)
# chosen by ``experiments/micro_search.py`` so that fused params and MACs at 224 px are each
# within 2 % of the paper's (docs/architecture.md has the search's table).
VARIANTS: dict[str, MobileOneConfig] = {
    "mobileone_s0": MobileOneConfig.from_multipliers((0.75, 1.0, 1.0, 2.0), k=4),
    "mobileone_s1": MobileOneConfig.from_multipliers((1.5, 1.5, 2.0, 2.5), k=1),
    "mobileone_s2": MobileOneConfig.from_multipliers((1.5, 2.0, 2.5, 4.0), k=1),
    "mobileone_s3": MobileOneConfig.from_multipliers((2.0, 2.5, 3.0, 4.0), k=1),
    "mobileone_s4": MobileOneConfig.from_multipliers((3.0, 3.5, 3.5, 4.0), k=1, se_blocks=(0, 0, 5, 1)),
    "mobileone_mu0": MobileOneConfig(widths=(24, 56, 128, 320), stem_width=24, k=(4, 4, 4, 4), stem_k=1),
    "mobileone_mu1": MobileOneConfig(widths=(32, 72, 208, 416), stem_width=32, k=(4, 4, 4, 4), stem_k=1),
    "mobileone_mu2": MobileOneConfig(widths=(32, 112, 240, 512), stem_width=32, k=(4, 4, 4, 4), stem_k=1),
}
PAPER_VARIANTS = tuple(VARIANTS)  # the names above; register_variant adds users' own after them


@dataclass(frozen=True)
class PaperResult:
    """One model's row in the paper: ImageNet top-1, params (M), MACs (M), latencies (ms, batch 1)."""

    top1: float
    params_m: float
    macs_m: float
    iphone12_ms: float | None = None
    cpu_ms: float | None = None  # Xeon Gold 5118, desktop CPU column of Table 4
    gpu_ms: float | None = None  # RTX 2080Ti, TensorRT


# Tables 4 and 13 (MobileOne and the peers the benchmark measures next to them).
PAPER: dict[str, PaperResult] = {
    "mobileone_s0": PaperResult(71.4, 2.1, 275, 0.79, 10.55, 0.56),
    "mobileone_s1": PaperResult(75.9, 4.8, 825, 0.89, 13.04, 0.66),
    "mobileone_s2": PaperResult(77.4, 7.8, 1299, 1.18, 14.87, 0.72),
    "mobileone_s3": PaperResult(78.1, 10.1, 1896, 1.53, 16.47, 0.76),
    "mobileone_s4": PaperResult(79.4, 14.8, 2978, 1.86, 26.60, 0.95),
    "mobileone_mu0": PaperResult(58.5, 0.57, 68, 0.45),
    "mobileone_mu1": PaperResult(66.2, 0.98, 139, 0.47),
    "mobileone_mu2": PaperResult(69.0, 1.3, 214, 0.50),
    "mobilenet_v2": PaperResult(72.0, 3.4, 300, 0.98, 13.65, 0.69),
    "mobilenet_v3_large": PaperResult(75.2, 5.4, 219, 1.09, 17.09, 3.8),
    "mobilenet_v3_small": PaperResult(67.4, 2.5, 56, 0.83, 10.38, 3.74),
    "efficientnet_b0": PaperResult(77.1, 5.3, 390, 1.72, 28.71, 1.35),
}
# Table 11: SSDLite on MS-COCO (mAP@[.5:.95], 320 px) and DeepLabV3 on Pascal VOC (mIoU).
PAPER_DETECTION_MAP = {
    "mobileone_s1": 25.7,
    "mobileone_s2": 26.6,
    "mobileone_s3": 27.3,
    "mobileone_s4": 29.4,
    "mobilenet_v2": 22.1,
    "mobilenet_v3_large": 22.0,
}
PAPER_SEGMENTATION_MIOU = {
    "mobileone_s0": 73.7,
    "mobileone_s1": 77.3,
    "mobileone_s2": 77.9,
    "mobileone_s3": 78.8,
    "mobileone_s4": 80.1,
    "mobilenet_v2": 75.7,
}


def resolve_variant(name: str) -> str:
    """Accept ``mobileone_s0``, ``s0``, ``S0``, ``mu1`` or ``mobileone-s0``; raise a clear error otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a variant name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "_").replace("\u03bc", "mu")
    key = key if key.startswith("mobileone_") else f"mobileone_{key}"
    if key not in VARIANTS:
        raise ValueError(f"unknown MobileOne variant {name!r}; choose one of {list_models()} (or s0..s4, mu0..mu2)")
    return key


def list_models() -> list[str]:
    """Names of the registered variants: S0-S4, the micro variants, and any added with ``register_variant``."""
    return list(VARIANTS)


def register_variant(name: str, config: MobileOneConfig) -> str:
    """Make a custom architecture available to ``create_model`` and the CLI by name; returns the full name."""
    if not isinstance(config, MobileOneConfig):
        raise TypeError(f"register_variant needs a MobileOneConfig, got {type(config).__name__}")
    key = name if name.startswith("mobileone_") else f"mobileone_{name}"
    if key in PAPER_VARIANTS and VARIANTS[key] != config:
        raise ValueError(f"{key} is one of the paper's variants; register your architecture under another name")
    VARIANTS[key] = config
    return key


def variant_of(config: MobileOneConfig) -> str | None:
    """The registered name of ``config``, if it is one of the variants."""
    return next((n for n, c in VARIANTS.items() if c == config), None)
