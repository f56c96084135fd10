"""Our metadata checked against the tensors it describes: a block that does not fit them is ignored with a
warning naming the file, and the architecture is read off the tensors instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import VARIANTS, MobileOneConfig, variant_of
from ..model import MobileOne
from .layouts import infer_config
from .storage import MetadataError, StateDict, _sidecar, embedded_metadata

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(MobileOneConfig)}


def _metadata(path: Path, obj: Any, sd: StateDict) -> tuple[dict[str, Any], MobileOneConfig, int, bool]:
    """The first usable metadata of ``path`` (embedded, then the JSON beside it), checked; else the tensors'."""
    rejected: list[str] = []

    def sources() -> Iterator[tuple[str, Any]]:  # read lazily: a good embedded block makes the JSON irrelevant
        try:
            embedded = embedded_metadata(path, obj)
            if embedded is not None:
                yield f"the metadata embedded in {path}", embedded
        except MetadataError as e:
            rejected.append(str(e))
        sidecar = _sidecar(path)
        if sidecar != path and sidecar.is_file():
            try:
                yield str(sidecar), json.loads(sidecar.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as e:
                rejected.append(f"{sidecar} is not readable JSON ({e})")

    for where, raw in sources():
        try:
            meta, config, num_classes, fused, notes = check_metadata(raw, sd)
        except MetadataError as e:
            rejected.append(f"{where} {e}")
            continue
        for note in notes:
            warnings.warn(f"{where}: {note}", stacklevel=3)
        if rejected:
            warnings.warn(f"ignored unusable metadata ({'; '.join(rejected)}); used {where}", stacklevel=3)
        return meta, config, num_classes, fused
    if rejected:
        warnings.warn(
            f"ignored unusable metadata of {path}: {'; '.join(rejected)}. The architecture was read off "
            "the tensors; classes and preprocessing are unknown",
            stacklevel=3,
        )
    return {}, *infer_config(sd)


def check_metadata(raw: Any, sd: StateDict) -> tuple[dict[str, Any], MobileOneConfig, int, bool, list[str]]:
    """Check a metadata block against Apple-layout tensors: ``(meta, config, num_classes, fused, notes)``.

    Raises :class:`MetadataError` when the block cannot describe the tensors (not an object, an
    invalid or unknown config key, another architecture or class count). A variant name, class
    names or a preprocessing block that do not fit are dropped from ``meta``, each with a note.
    Keys besides ours (epoch, accuracy, ...) are kept as records.
    """
    if not isinstance(raw, dict):
        raise MetadataError(f"holds a JSON {type(raw).__name__}, not an object")
    meta = dict(raw)
    in_chans = _in_chans(sd)
    if meta.get("config") is None:
        config, num_classes, fused = infer_config(sd)
    else:
        block = meta["config"]
        if not isinstance(block, dict):
            raise MetadataError(f"has a config that is a {type(block).__name__}, not an object")
        unknown = sorted(set(block) - _CONFIG_FIELDS)
        if unknown:
            raise MetadataError(f"has unknown config key(s) {unknown} (known: {sorted(_CONFIG_FIELDS)})")
        try:
            config = MobileOneConfig(**block)
        except (TypeError, ValueError) as e:
            raise MetadataError(f"has an invalid config ({e})") from e
        num_classes, fused = meta.get("num_classes"), meta.get("inference_mode")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise MetadataError(f"has num_classes {num_classes!r}, not an integer >= 0")
        if not isinstance(fused, bool):
            raise MetadataError(f"has inference_mode {fused!r}, not true or false")
        mismatch = _shape_mismatch(sd, config, num_classes, fused, in_chans)
        if mismatch:
            raise MetadataError(f"describes another model than the file's tensors ({mismatch})")
    notes = []
    variant = meta.get("variant")
    if variant is not None and not (isinstance(variant, str) and _is_variant(variant, config)):
        actual = variant_of(config)
        notes.append(
            f"variant {variant!r} does not match the tensors' architecture ({actual or 'a custom one'}); "
            "ignoring the name"
        )
        meta["variant"] = actual
    names = meta.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names) and len(names) == num_classes
    ):
        count = f"{len(names)} names" if isinstance(names, list) else f"a {type(names).__name__}"
        notes.append(f"class_names ({count}) do not fit the {num_classes}-class head; ignoring them")
        meta["class_names"] = None
    if "preprocess" in meta:
        problem = _preprocess_problem(meta["preprocess"], in_chans)
        if problem:
            notes.append(f"preprocess block ignored ({problem}); the defaults are used")
            del meta["preprocess"]
    return meta, config, num_classes, fused, notes


def _in_chans(sd: StateDict) -> int:
    stem = sd.get("stage0.reparam_conv.weight", sd.get("stage0.rbr_conv.0.conv.weight"))
    return int(stem.shape[1]) if stem is not None and stem.ndim == 4 else 3


def _shape_mismatch(sd: StateDict, config: MobileOneConfig, num_classes: int, fused: bool, in_chans: int) -> str:
    """'' when a model of this description has exactly the tensors of ``sd``, else the first differences."""
    with torch.device("meta"):
        expected = MobileOne(config, num_classes, fused, in_chans).state_dict()
    skip = "num_batches_tracked"
    missing = [k for k in expected if k not in sd and not k.endswith(skip)]
    extra = [k for k in sd if k not in expected and not k.endswith(skip)]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)} described"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    parts = [
        f"{title} {items[:3]}"
        for title, items in (
            ("shapes", shapes),
            ("tensors missing from the file", missing),
            ("tensors not described", extra),
        )
        if items
    ]
    return "; ".join(parts)


def _is_variant(name: str, config: MobileOneConfig) -> bool:
    named = VARIANTS.get(name)
    return named is not None and named.replace(output_stride=config.output_stride) == config


def _preprocess_problem(pre: Any, in_chans: int) -> str:
    if not isinstance(pre, dict):
        return f"a {type(pre).__name__}, not an object"

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("mean", "std"):
        v = pre.get(key)
        if v is not None and not (isinstance(v, (list, tuple)) and len(v) == in_chans and all(map(number, v))):
            return f"{key} {v!r} is not {in_chans} numbers"
        if key == "std" and v is not None and min(v) <= 0:
            return f"std {v!r} has a value <= 0"
    size = pre.get("input_size")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and 16 <= size <= 4096):
        return f"input_size {size!r} is not an integer in 16..4096"
    crop = pre.get("crop_pct")
    if crop is not None and not (number(crop) and 0 < crop <= 1):
        return f"crop_pct {crop!r} is not in (0, 1]"
    return ""
