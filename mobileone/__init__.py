"""MobileOne (arXiv 2206.04040) for PyTorch: build, load Apple's weights, train, fuse, deploy.

The core (models, fusion, checkpoints) needs torch only; training, export and benchmarking
import their optional dependencies when used.
"""

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    from_apple_layout,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    to_apple_layout,
)
from .complexity import count_layers, count_macs, count_params
from .fast_train import reference_mode, set_fast_train
from .model import (
    VARIANTS,
    FusionWarning,
    MobileOne,
    MobileOneConfig,
    MobileOneLayer,
    create_model,
    init_branches,
    list_models,
    mobileone_s0,
    mobileone_s1,
    mobileone_s2,
    mobileone_s3,
    mobileone_s4,
    register_variant,
    reparameterize_model,
)

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "Checkpoint",
    "CheckpointError",
    "FusionWarning",
    "MobileOne",
    "MobileOneConfig",
    "MobileOneLayer",
    "count_layers",
    "count_macs",
    "count_params",
    "create_model",
    "init_branches",
    "from_apple_layout",
    "list_models",
    "load_checkpoint",
    "mobileone_s0",
    "mobileone_s1",
    "mobileone_s2",
    "mobileone_s3",
    "mobileone_s4",
    "read_checkpoint",
    "reference_mode",
    "register_variant",
    "reparameterize_model",
    "save_checkpoint",
    "set_fast_train",
    "to_apple_layout",
]
