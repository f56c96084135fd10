"""TorchScript: a traced module, metadata as the extra file ``mobileone.json``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .common import run_batches

METADATA_FILE = "mobileone.json"


def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic_batch: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(out), _extra_files={METADATA_FILE: json.dumps(meta)})


def read_torchscript_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored as an extra file beside a TorchScript export."""
    extra = {METADATA_FILE: ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def verify(path: Path, x: Tensor, dynamic_batch: bool, fused: nn.Module) -> tuple[Tensor, str]:
    loaded = torch.jit.load(str(path)).eval()
    with torch.no_grad():
        return run_batches(loaded, x, True), f"TorchScript (torch {torch.__version__}), {len(x)} real images"
