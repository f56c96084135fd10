"""MobileOne (arXiv 2206.04040) for PyTorch: build, load Apple's weights, train, fuse, deploy.

The core (models, fusion, checkpoints) needs torch only and is imported here. Training and the
tasks (``[train]`` extra: torchvision) and deployment (``[export]`` extra) are imported on first
use of their names, so ``import mobileone`` works with torch alone.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _startup  # noqa: F401  (before torch: the command's OpenMP wait policy)
from .core.checkpoint import (
    Checkpoint,
    CheckpointError,
    from_apple_layout,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    to_apple_layout,
)
from .core.complexity import count_layers, count_macs, count_params
from .core.config import PAPER, VARIANTS, MobileOneConfig, list_models, register_variant
from .core.factory import (
    create_model,
    mobileone_mu0,
    mobileone_mu1,
    mobileone_mu2,
    mobileone_s0,
    mobileone_s1,
    mobileone_s2,
    mobileone_s3,
    mobileone_s4,
)
from .core.fast_train import reference_mode
from .core.fusion import FusionWarning, reparameterize_model
from .core.model import MobileOne, MobileOneLayer, init_branches, set_fast_train

__version__ = "0.2.0"

# Names whose modules need optional extras: (module, attribute), imported on first access.
_OPTIONAL = {
    "train": ("mobileone.tasks", "train"),
    "predict": ("mobileone.tasks.classification.predict", "predict"),
    "preprocessing": ("mobileone.tasks.classification.predict", "preprocessing"),
    "TrainConfig": ("mobileone.engine.config", "TrainConfig"),
    "export_model": ("mobileone.deploy.export", "export_model"),
    "read_metadata": ("mobileone.deploy.export", "read_metadata"),
    "create_detector": ("mobileone.tasks.detection.model", "create_detector"),
    "load_detector": ("mobileone.tasks.detection.model", "load_detector"),
    "create_segmenter": ("mobileone.tasks.segmentation.model", "create_segmenter"),
    "load_segmenter": ("mobileone.tasks.segmentation.model", "load_segmenter"),
}


def __getattr__(name: str) -> Any:
    if name in _OPTIONAL:
        module, attr = _OPTIONAL[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mobileone' has no attribute {name!r}")


__all__ = [
    "PAPER",
    "VARIANTS",
    "Checkpoint",
    "CheckpointError",
    "FusionWarning",
    "MobileOne",
    "MobileOneConfig",
    "MobileOneLayer",
    "TrainConfig",
    "count_layers",
    "count_macs",
    "count_params",
    "create_detector",
    "create_model",
    "create_segmenter",
    "export_model",
    "from_apple_layout",
    "init_branches",
    "list_models",
    "load_checkpoint",
    "load_detector",
    "load_segmenter",
    "mobileone_mu0",
    "mobileone_mu1",
    "mobileone_mu2",
    "mobileone_s0",
    "mobileone_s1",
    "mobileone_s2",
    "mobileone_s3",
    "mobileone_s4",
    "predict",
    "preprocessing",
    "read_checkpoint",
    "read_metadata",
    "reference_mode",
    "register_variant",
    "reparameterize_model",
    "save_checkpoint",
    "set_fast_train",
    "to_apple_layout",
    "train",
]
