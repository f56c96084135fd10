"""Checkpoint files on disk: reading any PyTorch or safetensors file into a state dict, writing ours.

Every task reads weights through :func:`read_weights` (tensors unwrapped from the usual training
wrappers, and the metadata our writer embedded) and writes them through :func:`write_weights`
(metadata embedded in the weights file itself, plus a readable ``.json`` copy beside it).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..files import atomic_write

log = logging.getLogger("mobileone")


StateDict = dict[str, Tensor]


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit the model it is loaded into."""


class MetadataError(CheckpointError):
    """A checkpoint's metadata cannot describe its tensors (not an object, invalid, or another model's)."""


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


def read_weights(path: str | os.PathLike, use_ema: bool = False) -> tuple[StateDict, dict[str, Any] | None]:
    """The one reader of weight files for every task: (state dict, embedded metadata or None).

    The tensors are unwrapped from the usual training wrappers (``state_dict``, ``model``, ``ema``,
    ``module.`` prefixes); the metadata is the block our writer embedded (see :func:`embedded_metadata`).
    """
    path = Path(path)
    obj = _read_file(path)
    return _unwrap(obj, use_ema, str(path)), embedded_metadata(path, obj)


_TASK_MODELS = {"classify": "classifier", "detect": "detector", "segment": "segmentation model"}


def read_task_weights(path: str | os.PathLike, task: str) -> tuple[StateDict, dict[str, Any]]:
    """(state dict, metadata) of a file this library wrote for ``task``; a clear error for any other file."""
    sd, meta = read_weights(path)
    if not meta or meta.get("task", "classify") != task:
        what = f"a {meta.get('task', 'classify')} checkpoint" if meta else "not a checkpoint written by mobileone"
        raise CheckpointError(
            f"{path} is {what}, not a {_TASK_MODELS[task]}; use a run's best.safetensors, best_fused.safetensors "
            f"or last.safetensors from `mobileone train --task {task}`"
        )
    return sd, meta


def load_task_state(model: Any, sd: StateDict, meta: dict[str, Any], path: str | os.PathLike, what: str) -> Any:
    """Load ``sd`` into the task ``model`` its metadata rebuilt; classes and preprocessing from ``meta``; eval mode."""
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the {what} its metadata describes: {str(e)[:500]}") from e
    model.class_names = meta.get("class_names")
    model.preprocess.update(meta.get("preprocess") or {})
    return model.eval()
