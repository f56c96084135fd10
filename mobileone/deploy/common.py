"""What every export target shares: the optional-dependency import, the error, tensor names, batching."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INPUT_NAME, OUTPUT_NAME = "input", "logits"
# A loaded export: one batch in (normalized NCHW float32), the outputs in the PyTorch module's order out.
Runner = Callable[[Tensor], list[Tensor]]


class ExportError(RuntimeError):
    """The export failed, or the exported model does not reproduce the PyTorch model."""


# Loggers of third-party packages that print on import what our users cannot act on: coremltools on
# Linux ("Failed to load _MLModelProxy", version notes), torch's pytree deprecation notice that
# executorch's dependencies trigger.
NOISY_LOGGERS = ("coremltools", "torch.utils._pytree")
# Lines that ExecuTorch's native runtime writes straight to stderr while probing the CPU.
# LiteRT's converter and interpreter log through absl / TensorFlow straight to stderr as well.
NATIVE_NOISE = (
    "[cpuinfo_utils.cpp:",
    "[threadpool.cpp:",
    "WARNING: All log messages before absl::InitializeLog()",
    "I0000 ",
    "W0000 ",
    "INFO: Created TensorFlow Lite",
)


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Silence the import-time chatter of ``NOISY_LOGGERS`` (their errors still show)."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def filtered_native_stderr(noise: tuple[str, ...] = NATIVE_NOISE) -> Iterator[None]:
    """Run a block with the process's stderr (file descriptor 2) captured, then re-emit all but ``noise`` lines.

    Native libraries print with C's stdio, which Python's ``sys.stderr`` never sees.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                ln
                for ln in capture.read().decode(errors="replace").splitlines(keepends=True)
                if not ln.startswith(noise)
            ]
            sys.stderr.write("".join(kept))


@contextlib.contextmanager
def silenced_stdout() -> Iterator[None]:
    """Run a block with standard output (Python's and file descriptor 1) discarded: converters that narrate."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def require(module: str, extra: str = "export") -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        with quiet_imports(), filtered_native_stderr():
            return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module.split('.')[0]} is needed for this and is not installed: pip install 'mobileone[{extra}]'"
        ) from e


def sidecar(path: str | Path) -> Path:
    """The JSON file beside an export whose format has no place for metadata (``model.tflite.json``)."""
    return Path(f"{path}.json")


def write_sidecar(path: str | Path, meta: dict[str, Any]) -> None:
    sidecar(path).write_text(json.dumps(meta, indent=2))


def read_sidecar(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(sidecar(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read the metadata of {path} from {sidecar(path)}: {e}") from e


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
