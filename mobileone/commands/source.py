"""Which task a command runs: ``--task``, else the one the checkpoint or ONNX file was written for.

A ``--task`` that contradicts the file is refused here, before a classifier's loader meets a detector.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.checkpoint import checkpoint_task
from ..deploy.common import ExportError
from ..deploy.onnx import onnx_task


def file_task(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(the file given, the task it was written for); (None, None) without a file, task None when unreadable."""
    onnx, checkpoint = getattr(args, "onnx", None), getattr(args, "checkpoint", None)
    if onnx:
        try:
            return onnx, onnx_task(onnx)
        except (ExportError, ImportError, OSError):  # unreadable: the command's loader says why
            return onnx, None
    if checkpoint:
        return checkpoint, checkpoint_task(checkpoint)
    return None, None


def resolve_task(args: argparse.Namespace) -> str:
    """The command's task; sets ``args.task``. A ``--task`` that the file contradicts is a ValueError."""
    path, found = file_task(args)
    if args.task and found and args.task != found:
        kind = "ONNX file" if Path(path).suffix == ".onnx" else "checkpoint"
        raise ValueError(
            f"{path} is a {found} {kind} (its metadata says so), not {args.task}; drop --task, or pass --task {found}"
        )
    args.task = args.task or found or "classify"
    return args.task
