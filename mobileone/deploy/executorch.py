"""ExecuTorch: lowered for the XNNPACK CPU backend; metadata as constant methods."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .common import filtered_native_stderr, package_version, require, run_batches


def to_executorch(
    model: nn.Module, out: Path, example: Tensor, dynamic_batch: bool = False, constants: dict[str, Any] | None = None
) -> None:
    """Lower ``model`` as it is to an ExecuTorch program for the XNNPACK CPU backend."""
    exir = require("executorch.exir")
    xnnpack = require("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    dynamic = ({0: torch.export.Dim("batch", min=1, max=256)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
        edge = exir.to_edge_transform_and_lower(
            program, partitioner=[xnnpack.XnnpackPartitioner()], constant_methods=constants or None
        )
        out.write_bytes(edge.to_executorch().buffer)


def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic_batch: bool) -> None:
    # Constant methods are ExecuTorch's place for metadata: the JSON, and the numbers apps need most.
    constants = {
        "mobileone_metadata": json.dumps(meta),
        "mean": meta["mean"],
        "std": meta["std"],
        "input_size": meta["input_size"],
    }
    to_executorch(model, out, example, dynamic_batch, constants)


def executorch_program(path: str | Path) -> Any:
    """Load a ``.pte`` with the ExecuTorch runtime."""
    runtime = require("executorch.runtime")
    with filtered_native_stderr():
        return runtime.Runtime.get().load_program(str(path))


def executorch_method(path: str | Path, name: str = "forward") -> Any:
    """Load one method of a ``.pte`` (XNNPACK probes the CPU here, which prints noise we filter)."""
    program = executorch_program(path)
    with filtered_native_stderr():
        return program.load_method(name)


def read_executorch_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored as a constant method (``mobileone_metadata``) of an ExecuTorch program."""
    return json.loads(executorch_method(path, "mobileone_metadata").execute([])[0])


def verify(path: Path, x: Tensor, dynamic_batch: bool, fused: nn.Module) -> tuple[Tensor, str]:
    method = executorch_method(path)
    got = run_batches(lambda b: method.execute([b.contiguous()])[0], x, dynamic_batch)
    return got, f"ExecuTorch runtime {package_version('executorch')} (XNNPACK), {len(x)} real images"
