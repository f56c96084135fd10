"""TorchScript: a traced module, metadata as the extra file ``mobileone.json``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .common import Runner

SUFFIX, EXTRA, DYNAMIC = ".pt", "export", ("none", "batch", "size")
METADATA_FILE = "mobileone.json"


def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic: str, names: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(out), _extra_files={METADATA_FILE: json.dumps(meta)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored as an extra file beside a TorchScript export."""
    extra = {METADATA_FILE: ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def load(path: str | Path, threads: int | None = None) -> Runner:
    loaded = torch.jit.load(str(path)).eval()

    def run(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            y = loaded(x)
        return list(y) if isinstance(y, (tuple, list)) else [y]

    return run


def runtime_name() -> str:
    return f"TorchScript (torch {torch.__version__})"


read_torchscript_metadata = read_metadata
