"""Priors fitted to the training boxes (as YOLO's autoanchor does), and a warning for boxes no prior resolves."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .data import ImageRecord

SMALLEST_STRIDE = 8  # the tal head's finest level
SMALL_SHARE = 0.1  # warn when more than this share of the boxes is below what the detector resolves


def box_sides(records: Sequence[ImageRecord], img_size: int) -> torch.Tensor:
    """Side (square root of the area) of every non-crowd box, in pixels of the letterboxed input."""
    sides = []
    for r in records:
        keep = ~r.crowd
        if not keep.any() or max(r.width, r.height) <= 0:
            continue
        b = r.boxes[keep] * (img_size / max(r.width, r.height))
        sides.append(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
    return torch.from_numpy(np.concatenate(sides)) if sides else torch.zeros(0)


def check_small_boxes(sides: torch.Tensor, head: str, smallest_prior: float) -> None:
    """Warn when many boxes are smaller than the detector resolves: the finest stride (tal) or half the
    smallest default box (SSDLite, whose matching needs IoU 0.5)."""
    if not len(sides):
        return
    limit = SMALLEST_STRIDE if head == "tal" else smallest_prior / 2
    share = float((sides < limit).float().mean())
    if share > SMALL_SHARE:
        what = f"the finest stride ({SMALLEST_STRIDE} px)" if head == "tal" else "half the smallest default box"
        warnings.warn(
            f"{100 * share:.0f} % of the training boxes are smaller than {what} at this --img-size "
            f"(median side {float(sides.median()):.1f} px): raise --img-size, or tile large images",
            stacklevel=2,
        )


def fit_ssdlite_ratios(sides: torch.Tensor, img_size: int) -> dict[str, float]:
    """SSDLite's smallest and largest default box (fractions of the image) spanning the training boxes:
    the 5th percentile side to 1.5 x the 95th (its six levels are spread linearly in between)."""
    if len(sides) < 2:
        return {}
    lo, hi = (float(q) / img_size for q in torch.quantile(sides.float(), torch.tensor([0.05, 0.95])))
    low = min(max(lo, 0.02), 0.5)
    return {"anchor_min_ratio": low, "anchor_max_ratio": min(0.95, max(1.5 * hi, 2 * low))}
