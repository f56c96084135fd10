"""MobileOne (arXiv 2206.04040) for PyTorch: build, load Apple's weights, train, fuse, deploy.

The core (models, fusion, checkpoints) needs torch only and is imported here. Training and the
tasks (``[train]`` extra: torchvision) and deployment (``[export]`` extra) are imported on first
use of their names, so ``import mobileone`` works with torch alone.
"""

from __future__ import annotations

import importlib
from typing import Any

from .core import registry as _registry
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
from .core.config import PAPER, VARIANTS, MobileOneConfig
from .core.factory import create_model as _create_mobileone
from .core.factory import (
    mobileone_mu0,
    mobileone_mu1,
    mobileone_mu2,
    mobileone_s0,
    mobileone_s1,
    mobileone_s2,
    mobileone_s3,
    mobileone_s4,
    register_variant,
)
from .core.fast_train import reference_mode
from .core.fusion import FusionWarning, reparameterize_model
from .core.model import MobileOne, MobileOneLayer, init_branches, set_fast_train

__version__ = "0.2.0"

# Names whose modules need optional extras: (module, attribute), imported on first access.
_OPTIONAL = {
    "train": ("mobileone.tasks", "train"),
    "predict": ("mobileone.tasks.classify.predict", "predict"),
    "preprocessing": ("mobileone.tasks.classify.predict", "preprocessing"),
    "TrainConfig": ("mobileone.engine.config", "TrainConfig"),
    "export_model": ("mobileone.deploy.export", "export_model"),
    "read_metadata": ("mobileone.deploy.export", "read_metadata"),
    "create_detector": ("mobileone.tasks.detect.model", "create_detector"),
    "load_detector": ("mobileone.tasks.detect.model", "load_detector"),
    "create_segmenter": ("mobileone.tasks.segment.model", "create_segmenter"),
    "load_segmenter": ("mobileone.tasks.segment.model", "load_segmenter"),
}


def _register_tasks(task: str | None) -> None:
    """Import the task model modules (they need torchvision) so that their builders are registered."""
    try:
        if task in (None, "detect"):
            from .tasks.detect import model as _detection  # noqa: F401
        if task in (None, "segment"):
            from .tasks.segment import builders as _segmentation  # noqa: F401
    except ImportError as e:
        if task is not None:
            raise ImportError(f"{task} models need torchvision: pip install 'mobileone[train]' ({e})") from e


def list_models(task: str | None = None, *, peers: bool = True) -> list[str]:
    """Every model ``create_model`` builds by name: ``task`` is ``"classify"``, ``"detect"``, ``"segment"`` or None
    for all (detectors and segmenters need torchvision); ``peers=False`` leaves out the MobileNetV3 peers.

    Example:
        >>> mobileone.list_models("detect", peers=False)[:2]
        ['ssdlite_s0', 'ssdlite_s1']
    """
    if task != "classify":
        _register_tasks(task)
    return _registry.list_registered(task, peers=peers)


def create_model(name: Any = "mobileone_s0", **kwargs: Any) -> Any:
    """Build any registered model by name: a MobileOne classifier (``s0``, ``mobileone_s0``, a
    :class:`MobileOneConfig` ...), a detector (``ssdlite_s0``) or a segmenter (``deeplabv3_s0``, ``lraspp_mnv3``).

    Keyword arguments go to the model's builder (for classifiers :func:`mobileone.core.factory.create_model`:
    ``num_classes``, ``inference_mode``, ``checkpoint``, config overrides ...; for detectors
    ``create_detector``'s, for segmenters ``create_segmenter``'s).

    Example:
        >>> model = mobileone.create_model("s0", num_classes=10)
        >>> detector = mobileone.create_model("ssdlite_s0", num_classes=3, img_size=320)
    """
    if not isinstance(name, str):
        return _create_mobileone(name, **kwargs)
    try:
        entry = _registry.find_model(name)
    except ValueError:
        _register_tasks(None)
        if not _registry.names_a_task_model(name):  # a MobileOne variant name: its own error lists the variants
            return _create_mobileone(name, **kwargs)
        entry = _registry.find_model(name)
    if entry.task == "classify":
        return _create_mobileone(entry.name, **kwargs)
    return entry.builder(**kwargs)


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
