"""Building MobileOnes by name, timm-style, with one documented builder per variant.

``create_model`` sits above the model and the checkpoint code, so it can load weights while
building (``checkpoint=`` / ``pretrained=PATH``). No weights ship with the library and nothing is
downloaded: Apple's files load with ``load_checkpoint`` (README, "Models").
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from .checkpoint import load_checkpoint
from .config import VARIANTS, MobileOneConfig, resolve_variant, variant_of
from .config import register_variant as _register_config
from .model import MobileOne
from .registry import ModelEntry, documented_builders, register

_MODEL_OPTIONS = ("in_chans", "features_only", "out_indices", "drop_rate")
_REFUSED = {
    "drop_path_rate": "MobileOne has no residual paths to drop (its skip branch is a BatchNorm that fusion folds "
    "into the conv); regularize with drop_rate, label smoothing or EMA instead",
    "global_pool": "MobileOne's head is global average pooling, as in Apple's checkpoints",
}


def create_model(
    name: str | MobileOneConfig | dict[str, Any] = "mobileone_s0",
    num_classes: int = 1000,
    inference_mode: bool = False,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool | str | os.PathLike = False,
    **overrides: Any,
) -> MobileOne:
    """Build a MobileOne, timm-style: a variant name (or a config), optional config overrides.

    Args:
        name: ``s0`` .. ``s4``, ``mu0`` .. ``mu2``, a registered name, a :class:`MobileOneConfig` or its dict.
        num_classes: classes of the linear head; 0 builds a headless backbone.
        inference_mode: build the fused (deployed) graph directly.
        checkpoint: load weights from this file with :func:`mobileone.load_checkpoint`.
        pretrained: a path works like ``checkpoint``; ``True`` is refused, since no weights ship.
        **overrides: :class:`MobileOneConfig` fields (``k=1`` for the paper's k ablation,
            ``output_stride=16``) or model options (``in_chans``, ``features_only``, ``out_indices``,
            ``drop_rate``: dropout before the classifier).

    Example:
        >>> model = create_model("s0", num_classes=10)
        >>> backbone = create_model("s1", features_only=True, out_indices=(3, 4), output_stride=16)
    """
    if pretrained is True:
        raise ValueError(
            "no pretrained weights ship with mobileone and nothing is downloaded; load Apple's files yourself: "
            "create_model('s0', checkpoint='mobileone_s0_unfused.pth.tar') or pretrained='<path>'"
        )
    if pretrained:
        if checkpoint is not None:
            raise ValueError("pass the weights once: checkpoint= or pretrained=, not both")
        checkpoint = pretrained
    for key in set(overrides) & set(_REFUSED):
        raise TypeError(f"create_model does not take {key}: {_REFUSED[key]}")
    model_opts = {k: overrides.pop(k) for k in _MODEL_OPTIONS if k in overrides}
    variant = None
    if isinstance(name, str):
        variant = resolve_variant(name)
        config = VARIANTS[variant]
    elif isinstance(name, dict):
        config = MobileOneConfig(**name)
    elif isinstance(name, MobileOneConfig):
        config = name
    else:
        raise TypeError(f"create_model takes a variant name, a MobileOneConfig or its dict, got {type(name).__name__}")
    if overrides:
        config = config.replace(**overrides)
        variant = variant if config == VARIANTS.get(variant or "") else None
    if variant is None:
        variant = variant_of(config)
    model = MobileOne(config, num_classes, inference_mode, variant=variant, **model_opts)
    if checkpoint is not None:
        load_checkpoint(checkpoint, model)
    return model


# One documented, registered builder per variant: name -> what it is.
PAPER_MODELS = {
    "mobileone_s0": "MobileOne-S0 (paper Table 7): k = 4 branches, 2.1 M params and 275 M MACs once fused.",
    "mobileone_s1": "MobileOne-S1 (paper Table 7): k = 1, 4.8 M params and 825 M MACs once fused.",
    "mobileone_s2": "MobileOne-S2 (paper Table 7): k = 1, 7.8 M params and 1,298 M MACs once fused.",
    "mobileone_s3": "MobileOne-S3 (paper Table 7): k = 1, 10.1 M params and 1,896 M MACs once fused.",
    "mobileone_s4": (
        "MobileOne-S4 (paper Table 7): k = 1, SE in the last 6 blocks, 14.8 M params and 2,979 M MACs once fused."
    ),
}
MICRO_MODELS = {
    "mobileone_mu0": (
        "MobileOne-mu0 (paper Table 13, reconstructed): 0.56 M params and 69 M MACs once fused (paper 0.57 M / 68 M)."
    ),
    "mobileone_mu1": (
        "MobileOne-mu1 (paper Table 13, reconstructed): 0.98 M params and 141 M MACs once fused (paper 0.98 M / 139 M)."
    ),
    "mobileone_mu2": (
        "MobileOne-mu2 (paper Table 13, reconstructed): 1.31 M params and 214 M MACs once fused (paper 1.3 M / 214 M)."
    ),
}
_ARGS = "**kwargs: as for create_model (num_classes, inference_mode, checkpoint, config overrides, ...)"
mobileone_s0, mobileone_s1, mobileone_s2, mobileone_s3, mobileone_s4 = documented_builders(
    "classify", create_model, PAPER_MODELS, _ARGS, "num_classes=10"
)
mobileone_mu0, mobileone_mu1, mobileone_mu2 = documented_builders(
    "classify", create_model, MICRO_MODELS, _ARGS, "num_classes=10"
)


def register_variant(name: str, config: MobileOneConfig) -> str:
    """Make a custom architecture buildable by name (``create_model``, the CLI, ``list_models``); returns the full name.

    Example:
        >>> register_variant("tiny", MobileOneConfig(widths=(16, 32, 64, 128), stem_width=16, blocks=(1, 1, 1, 1)))
        'mobileone_tiny'
    """
    key = _register_config(name, config)
    register(ModelEntry(key, "classify", key, partial(create_model, key)))
    return key
