"""Reading a MobileOne checkpoint of any layout into Apple's, loading it into a model, saving ours."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import MobileOneConfig, variant_of
from ..fusion import reparameterize_model
from ..model import MobileOne
from .layouts import infer_config, to_apple_layout
from .metadata import _metadata
from .storage import CheckpointError, StateDict, _read_file, _unwrap, embedded_metadata, log, write_weights


@dataclass
class Checkpoint:
    """A checkpoint read from disk: Apple-layout tensors plus what is known about them."""

    state_dict: StateDict
    layout: str
    fused: bool
    config: MobileOneConfig
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)  # our metadata (checked against the tensors), if any

    @property
    def variant(self) -> str | None:
        return self.meta.get("variant") or variant_of(self.config)


def read_checkpoint(source: str | os.PathLike | dict, use_ema: bool = False) -> Checkpoint:
    """Read a checkpoint in any supported layout or wrapping into Apple's layout.

    The architecture, classes and preprocessing come from the metadata our writer embedded in the
    file, else from the JSON beside it, each checked against the tensors (see :func:`check_metadata`);
    without usable metadata the architecture is read off the tensor shapes.
    """
    path = Path(source) if not isinstance(source, dict) else None
    obj = _read_file(path) if path else source
    if path:
        _refuse_other_tasks(path, obj)
    sd, layout = to_apple_layout(_unwrap(obj, use_ema, str(path or "state dict")))
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        warnings.warn(f"checkpoint has NaN or infinite values in {len(bad)} tensors, e.g. {bad[:3]}", stacklevel=2)
    meta, config, num_classes, fused = _metadata(path, obj, sd) if path else ({}, *infer_config(sd))
    log.info(
        "read %s: %s layout, %s, %d classes", path or "state dict", layout, "fused" if fused else "unfused", num_classes
    )
    return Checkpoint(sd, layout, fused, config, num_classes, meta)


def _refuse_other_tasks(path: Path, obj: Any) -> None:
    """A detector's or segmenter's file is named for what it is, not read as a broken classifier."""
    try:
        task = (embedded_metadata(path, obj) or {}).get("task", "classify")
    except CheckpointError:
        return  # unusable metadata: the tensors decide, with a warning
    if task != "classify":
        raise CheckpointError(
            f"{path} is a {task} checkpoint, not a classifier; use it with --task {task} (or load_detector / "
            "load_segmenter in Python)"
        )


def _mismatch_report(model: MobileOne, sd: StateDict) -> list[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            lines.append(f"{title} ({len(items)}): {', '.join(items[:8])}{more}")
    return lines


def load_checkpoint(
    source: str | os.PathLike | dict,
    model: MobileOne | None = None,
    *,
    reset_head: bool = False,
    use_ema: bool = False,
) -> MobileOne:
    """Load weights from Apple, timm or mmpretrain files, our safetensors, or a state dict.

    Without ``model`` the architecture comes from the JSON beside the file or from the tensor
    shapes. Weights whose head has another number of classes than ``model`` load only with
    ``reset_head=True`` (fine-tuning): the model keeps its own freshly initialised head.
    An unfused checkpoint loads into a fused model by fusing it on the way.
    """
    ckpt = read_checkpoint(source, use_ema=use_ema)
    sd = ckpt.state_dict
    if model is None:
        model = MobileOne(ckpt.config, ckpt.num_classes, ckpt.fused, variant=ckpt.variant)
    name = model.variant or "custom MobileOne"
    if ckpt.fused and not model.inference_mode:
        raise CheckpointError(
            f"{source} holds fused (inference) weights, which cannot be un-fused into the train-time {name}; "
            "build the model with inference_mode=True, or load an unfused checkpoint"
        )
    if model.inference_mode and not ckpt.fused:
        unfused = MobileOne(model.config, model.num_classes, False, model.in_chans, variant=model.variant)
        _load_into(unfused, sd, ckpt, reset_head, source)
        sd = reparameterize_model(unfused.eval(), inplace=True).state_dict()
    own_head = model.num_classes
    if model.features_only or own_head == 0:
        sd = {k: v for k, v in sd.items() if not k.startswith("linear.")}
    _load_into(model, sd, ckpt, reset_head, source)
    if ckpt.meta:
        model.class_names = ckpt.meta.get("class_names") if own_head == ckpt.num_classes else None
        model.preprocess.update(ckpt.meta.get("preprocess", {}))
    log.info(
        "loaded %s (%s layout) into %s", source if not isinstance(source, dict) else "state dict", ckpt.layout, name
    )
    return model


def _load_into(model: MobileOne, sd: StateDict, ckpt: Checkpoint, reset_head: bool, source: Any) -> None:
    head = model.linear.weight.shape[0] if isinstance(model.linear, torch.nn.Linear) else 0
    if "linear.weight" in sd and sd["linear.weight"].shape[0] != head:
        if not reset_head:
            raise CheckpointError(
                f"{source} has a {sd['linear.weight'].shape[0]}-class head but the model has {head} classes; "
                "pass reset_head=True (CLI: --pretrained does this) to fine-tune with a new head"
            )
        sd = {k: v for k, v in sd.items() if not k.startswith("linear.")}
        sd.update({f"linear.{k}": v for k, v in model.linear.state_dict().items()})
    problems = _mismatch_report(model, sd)
    if problems:
        raise CheckpointError(
            f"{source} does not fit {model.variant or 'this custom MobileOne'} "
            f"({'fused' if model.inference_mode else 'unfused'}; checkpoint is "
            f"{ckpt.variant or 'a custom architecture'}, {'fused' if ckpt.fused else 'unfused'}, "
            f"{ckpt.layout} layout):\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(sd)


def save_checkpoint(model: MobileOne, path: str | os.PathLike, **meta: Any) -> Path:
    """Write a MobileOne's weights (Apple layout) with its variant, config, classes and preprocessing.

    ``.safetensors`` (recommended) or a PyTorch suffix (``.pth``, ``.pt``, ...); a JSON copy of
    the metadata goes beside it. Any extra ``meta`` (epoch, accuracy) is recorded too.
    """
    info = {
        "variant": model.variant,
        "config": model.config.to_dict(),
        "num_classes": model.num_classes,
        "inference_mode": model.inference_mode,
        "class_names": model.class_names,
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in model.preprocess.items()},
        **meta,
    }
    return write_weights(path, model.state_dict(), info)
