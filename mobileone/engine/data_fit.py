"""Defaults that fit the data: an image size near the images' own, and enough optimizer steps on small sets.

A recipe's defaults are written for ImageNet-sized photos and datasets. On 28 px images, 224 px
trains 64x the pixels for no new detail; on 35 images, 10 epochs are 50 optimizer steps, too few to
learn anything (a 35-image segmentation set: 46 mIoU after 50 steps, 77 after 500). When the user
gives neither (``--img-size``, ``--epochs``), the run takes them from the data, and says so.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence

from .config import TrainConfig

MIN_STEPS_PER_RUN = 500  # optimizer steps a run on the user's data gets at least, unless --epochs is given
UPSAMPLE_WARNING = 2.0  # training above this multiple of the images' own size is warned about
SIZE_STEP = 32  # MobileOne's output stride: sizes in multiples of it use every pixel


def fit_image_size(cfg: TrainConfig, sides: Sequence[int], floor: int, main: bool = True) -> None:
    """Set ``cfg.img_size`` from the training images' short sides when it was not given (never above the
    task's default, never below ``floor``), and warn when the size used upsamples them more than 2x."""
    sides = [s for s in sides if s > 0]
    if not sides:
        return
    side = round(statistics.median(sides))
    if cfg.auto_img_size:
        size = min(cfg.img_size, max(floor, round(side / SIZE_STEP) * SIZE_STEP))
        if size != cfg.img_size and main:
            warnings.warn(
                f"the training images are about {side} px (median short side): training at {size} px instead of "
                f"the default {cfg.img_size} (--img-size sets it)",
                stacklevel=3,
            )
        cfg.img_size = size
    if cfg.img_size > UPSAMPLE_WARNING * side and main:
        near = max(floor, round(side / SIZE_STEP) * SIZE_STEP)
        given = "--img-size" if not cfg.auto_img_size else f"the smallest size this task takes ({floor} px)"
        warnings.warn(
            f"{given} {cfg.img_size} upsamples the training images (about {side} px) "
            f"{cfg.img_size / side:.1f}x: {(cfg.img_size / side) ** 2:.0f}x the pixels to compute, with no new detail"
            + (f"; --img-size {near} keeps them near their size" if near < cfg.img_size else ""),
            stacklevel=3,
        )


def fit_epochs(cfg: TrainConfig, per_epoch: int, images: int, main: bool = True) -> None:
    """When the epochs were not given, raise them so that the run makes at least ``MIN_STEPS_PER_RUN`` steps."""
    if not cfg.auto_epochs or cfg.epochs * per_epoch >= MIN_STEPS_PER_RUN:
        return
    epochs = math.ceil(MIN_STEPS_PER_RUN / per_epoch)
    if main:
        warnings.warn(
            f"{images} training images make {per_epoch} steps an epoch: {cfg.epochs} epoch(s) would be "
            f"{cfg.epochs * per_epoch} optimizer steps, too few to learn from; training {epochs} epochs "
            f"({epochs * per_epoch} steps, the floor for small data) instead (--epochs sets it)",
            stacklevel=3,
        )
    cfg.epochs = epochs
