"""Reading and writing MobileOne weights: Apple's, timm's and mmpretrain's layouts, and our own files.

The model's native state_dict layout is Apple's (docs/architecture.md, "Checkpoint layouts"). Files we write are a
``.safetensors`` (or a PyTorch file) of that layout with the architecture, the classes and the
preprocessing embedded, plus a readable ``.json`` copy beside it, so a file alone rebuilds its
model. Apple's own files carry no config; the architecture is read off the tensor shapes instead.

Metadata is never trusted blindly: the embedded copy (then the JSON beside the file) is checked
against the tensors; a block that does not fit them is ignored with a warning naming the file,
and the architecture is read off the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import VARIANTS, MobileOneConfig, variant_of
from .files import atomic_write
from .fusion import reparameterize_model
from .model import MobileOne

log = logging.getLogger("mobileone")
StateDict = dict[str, Tensor]


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit the model it is loaded into."""


# The same tensor under Apple's, timm's and mmpretrain's names. ``{i}`` is an
# index; ``{s}`` is Apple's stage number 1-4, which timm counts from 0 (``{s-1}``).
LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "timm": [
        ("stage0.", "stem."),
        ("stage{s}.", "stages.{s-1}."),
        (".rbr_conv.{i}.", ".conv_kxk.{i}."),
        (".rbr_scale.", ".conv_scale."),
        (".rbr_skip.", ".identity."),
        (".se.reduce.", ".attn.fc1."),
        (".se.expand.", ".attn.fc2."),
        ("linear.", "head.fc."),
    ],
    "mmpretrain": [
        ("stage{i}.", "backbone.stage{i}."),
        (".rbr_conv.{i}.bn.", ".branch_conv_list.{i}.norm."),
        (".rbr_conv.{i}.", ".branch_conv_list.{i}."),
        (".rbr_scale.bn.", ".branch_scale.norm."),
        (".rbr_scale.", ".branch_scale."),
        (".rbr_skip.", ".branch_norm."),
        (".se.reduce.", ".se.conv1.conv."),
        (".se.expand.", ".se.conv2.conv."),
        (".reparam_conv.", ".branch_reparam."),
        ("linear.", "head.fc."),
    ],
}


def _rule(src: str, dst: str) -> tuple[re.Pattern, Any]:
    """Compile one row of ``LAYOUTS`` into (regex, replacement) mapping ``src`` names to ``dst``."""
    anchored = not src.startswith(".")
    pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{s\}", r"(?P<s>[1-4])")
    pattern = pattern.replace(r"\{s\-1\}", r"(?P<t>[0-3])")

    def repl(m: re.Match) -> str:
        g = m.groupdict()
        out = dst.replace("{i}", g.get("i") or "")
        if g.get("s"):
            out = out.replace("{s-1}", str(int(g["s"]) - 1))
        if g.get("t"):
            out = out.replace("{s}", str(int(g["t"]) + 1))
        return out

    return re.compile(("^" if anchored else "") + pattern), repl


_TO_APPLE = {name: [_rule(b, a) for a, b in rows] for name, rows in LAYOUTS.items()}
_FROM_APPLE = {name: [_rule(a, b) for a, b in rows] for name, rows in LAYOUTS.items()}


def _rename(sd: StateDict, rules: list[tuple[re.Pattern, Any]]) -> StateDict:
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = pattern.sub(repl, key, count=1)
        out[key] = value
    return out


def detect_layout(sd: StateDict) -> str:
    """Which naming a state dict uses: ``apple``, ``timm`` or ``mmpretrain``."""
    keys = list(sd)
    if any(k.startswith("backbone.stage") or ".branch_" in k for k in keys):
        return "mmpretrain"
    if any(k.startswith(("stem.", "stages.")) for k in keys):
        return "timm"
    if any(k.startswith("stage0.") for k in keys):
        return "apple"
    raise CheckpointError(
        f"this state dict is not a MobileOne in Apple's, timm's or mmpretrain's layout; its first keys are {keys[:5]}"
    )


def to_apple_layout(sd: StateDict) -> tuple[StateDict, str]:
    """Convert any supported layout to Apple's; returns the converted dict and the layout found."""
    layout = detect_layout(sd)
    return (sd if layout == "apple" else _rename(sd, _TO_APPLE[layout])), layout


def from_apple_layout(sd: StateDict, layout: str) -> StateDict:
    """Convert an Apple-layout state dict to ``timm`` or ``mmpretrain`` names (for their code)."""
    if layout == "apple":
        return dict(sd)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose apple, {', '.join(LAYOUTS)}")
    return _rename(sd, _FROM_APPLE[layout])


_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net", "params")
_EMA_WRAPPERS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / torch.compile / AveragedModel


_MAX_NESTING = 4  # real files wrap their tensors 1-2 dicts deep ({"state_dict": {"module": ...}})


def _unwrap(obj: Any, use_ema: bool, path: str, depth: int = 0) -> StateDict:
    if depth > _MAX_NESTING:
        raise CheckpointError(
            f"{path}: no state dict within {_MAX_NESTING} levels of nested dicts (a dict that contains itself?); "
            "this is not a checkpoint layout this reader knows"
        )
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = dict(obj)
    else:
        order = (_EMA_WRAPPERS + _WRAPPERS) if use_ema else (_WRAPPERS + _EMA_WRAPPERS)
        key = next((k for k in order if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise CheckpointError(
                f"{path}: no state dict found; top-level keys are {list(obj)[:10]} "
                f"(expected tensors, or one of {list(_WRAPPERS + _EMA_WRAPPERS)})"
            )
        if use_ema and key not in _EMA_WRAPPERS:
            raise CheckpointError(f"{path} has no EMA weights (looked for {list(_EMA_WRAPPERS)})")
        log.info("using the %r entry of %s", key, path)
        return _unwrap(obj[key], False, path, depth + 1)
    sd.pop("n_averaged", None)
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file was not written completely")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    kind = _not_a_checkpoint(path)
    if kind:
        raise CheckpointError(
            f"{path} is {kind}, not a checkpoint; give a .safetensors file or a PyTorch file "
            "(.pth, .pt, .pth.tar) holding a state dict"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} contains Python objects other than tensors, which are not loaded from untrusted files "
            f"(weights_only=True). If you trust it, torch.load(path, weights_only=False) it yourself and pass "
            f"the state dict. Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint (truncated or corrupt?): {e}") from e


# File signatures of what users mistake for checkpoints.
_SIGNATURES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image"}


def _not_a_checkpoint(path: Path) -> str | None:
    """What ``path`` is when it is plainly not a PyTorch file (zip archive or pickle): JSON, text, an image."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or a legacy pickle
        return None
    for magic, kind in _SIGNATURES.items():
        if head.startswith(magic):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.lstrip().startswith(("{", "[")):
        return "a JSON file (the metadata beside a checkpoint?)"
    return "a text file"


def infer_config(sd: StateDict) -> tuple[MobileOneConfig, int, bool]:
    """Read the architecture off Apple-layout tensor shapes: (config, num_classes, fused)."""
    fused = any(".reparam_conv." in k for k in sd)
    try:
        stem_width = sd["stage0.reparam_conv.weight" if fused else "stage0.rbr_conv.0.conv.weight"].shape[0]
        widths, blocks, ks, se = [], [], [], []
        for s in range(1, 5):
            n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"stage{s}."))
            blocks.append(n // 2)
            last = f"stage{s}.{n - 1}"
            widths.append(sd[f"{last}.reparam_conv.weight" if fused else f"{last}.rbr_conv.0.conv.weight"].shape[0])
            ks.append(1 if fused else len({k.split(".")[3] for k in sd if k.startswith(f"stage{s}.1.rbr_conv.")}))
            se.append(sum(f"stage{s}.{2 * b + 1}.se.reduce.weight" in sd for b in range(n // 2)))
        stem_k = 1 if fused else len({k.split(".")[2] for k in sd if k.startswith("stage0.rbr_conv.")})
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot read a MobileOne architecture from this state dict (missing {e})") from e
    config = MobileOneConfig(
        widths=tuple(widths),
        stem_width=stem_width,
        blocks=tuple(blocks),
        k=tuple(ks),
        se_blocks=tuple(se),
        stem_k=stem_k,
    )
    if fused:  # k is gone after fusion: take it from the named variant of the same shape, if any
        named = next((c for c in VARIANTS.values() if c.replace(k=c.k) == config.replace(k=c.k)), None)
        config = named or config
    else:
        config = config.replace(
            scale_branch="stage0.rbr_scale.conv.weight" in sd, skip_branch=any(".rbr_skip." in k for k in sd)
        )
    num_classes = sd["linear.weight"].shape[0] if "linear.weight" in sd else 0
    return config, num_classes, fused


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


class MetadataError(CheckpointError):
    """A checkpoint's metadata cannot describe its tensors (not an object, invalid, or another model's)."""


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


META_KEY = "mobileone"  # where our files embed their metadata: safetensors header / torch dict entry
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")


def write_weights(path: str | os.PathLike, state_dict: StateDict, info: dict[str, Any]) -> Path:
    """Write ``state_dict`` with ``info`` embedded, plus a readable copy of ``info`` as JSON beside it.

    ``.safetensors`` (also for a name without suffix) keeps ``info`` in its header; a PyTorch
    suffix (``.pth``, ``.pt``, ...) writes ``{"state_dict": ..., "mobileone": info}`` with
    ``torch.save``. Readers use the embedded copy, so a kill between the two files never pairs
    weights with another file's metadata. Both files are written atomically.
    """
    from safetensors.torch import save

    path = Path(path)
    path = path if path.suffix else path.with_suffix(".safetensors")
    if path.suffix != ".safetensors" and not path.name.endswith(TORCH_SUFFIXES):
        raise ValueError(
            f"cannot tell the format of {path.name}: use a .safetensors name (recommended) or a "
            f"PyTorch one ({', '.join(TORCH_SUFFIXES)})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        # Serialized here and written by us: safetensors' own writer leaves a .tmpXXXXXX behind when killed.
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(save(sd, metadata={META_KEY: json.dumps(info)})))
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": sd, META_KEY: info}, tmp))
    atomic_write(_sidecar(path), lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    return path


def _sidecar(path: Path) -> Path:
    """``x.safetensors`` -> ``x.json``; ``x.pth.tar`` -> ``x.json``."""
    name = path.name
    for suffix in (".safetensors", ".pth.tar", *TORCH_SUFFIXES):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_suffix(".json")


def embedded_metadata(path: str | os.PathLike, obj: Any = None) -> dict[str, Any] | None:
    """The metadata our writer embedded in ``path`` (``obj``: the file's already-loaded contents), if any.

    Raises :class:`MetadataError` when the file has an embedded block that is not a JSON object.
    The caller checks the block against what it describes (:func:`check_metadata` for MobileOnes).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(META_KEY)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError as e:
            raise MetadataError(f"the metadata embedded in {path} is not valid JSON ({e})") from e
    elif isinstance(obj, dict) and META_KEY in obj:
        value = obj[META_KEY]
    else:
        return None
    if not isinstance(value, dict):
        raise MetadataError(f"the metadata embedded in {path} is a {type(value).__name__}, not an object")
    return value


def checkpoint_task(path: str | os.PathLike) -> str | None:
    """The task a checkpoint was written for (``classify``, ``detect``, ``segment``); None when it is unreadable.

    Files without our metadata (Apple's, timm's, mmpretrain's) are classifiers.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = None if path.suffix == ".safetensors" else _read_file(path)
        meta = embedded_metadata(path, obj)
    except Exception:  # truncated, corrupt, not a checkpoint: the command's own loader says why
        return None
    task = (meta or {}).get("task", "classify")
    return task if isinstance(task, str) else None


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
