"""What every export target shares: the optional-dependency import, the error, tensor names, batching."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(RuntimeError):
    """The export failed, or the exported model does not reproduce the PyTorch model."""


def require(module: str, extra: str = "export") -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module.split('.')[0]} is needed for this and is not installed: pip install 'mobileone[{extra}]'"
        ) from e


def run_batches(run: Callable[[Tensor], Tensor], x: Tensor, dynamic_batch: bool) -> Tensor:
    """Run all of ``x`` at once if the export takes any batch size, else image by image."""
    if dynamic_batch:
        return run(x)
    return torch.cat([run(x[i : i + 1]) for i in range(len(x))])


def package_version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"
