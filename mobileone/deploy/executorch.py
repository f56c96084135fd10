"""ExecuTorch: lowered for the XNNPACK CPU backend; metadata as constant methods."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .common import Runner, filtered_native_stderr, package_version, require

SUFFIX, EXTRA, DYNAMIC = ".pte", "executorch", ("none", "batch")


def to_executorch(
    model: nn.Module,
    out: Path,
    example: Tensor,
    dynamic_batch: bool = False,
    constants: dict[str, Any] | None = None,
    program: Any = None,
) -> None:
    """Lower ``model`` as it is (or an already exported or quantized ``program``) for the XNNPACK CPU backend."""
    exir = require("executorch.exir", EXTRA)
    xnnpack = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", EXTRA)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=256)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = program or torch.export.export(model, (example,), dynamic_shapes=dynamic)
        edge = exir.to_edge_transform_and_lower(
            program, partitioner=[xnnpack.XnnpackPartitioner()], constant_methods=constants or None
        )
        out.write_bytes(edge.to_executorch().buffer)


def metadata_constants(meta: dict[str, Any]) -> dict[str, Any]:
    """Constant methods are ExecuTorch's place for metadata: the JSON, and the numbers apps need most."""
    constants = {"mobileone_metadata": json.dumps(meta), "mean": meta.get("mean"), "std": meta.get("std")}
    if all(isinstance(v, int) for v in meta.get("input_size", [None])):
        constants["input_size"] = meta["input_size"]
    return constants


def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic: str, names: list[str]) -> None:
    to_executorch(model, out, example, dynamic == "batch", metadata_constants(meta))


def executorch_program(path: str | Path) -> Any:
    """Load a ``.pte`` with the ExecuTorch runtime."""
    runtime = require("executorch.runtime", EXTRA)
    with filtered_native_stderr():
        return runtime.Runtime.get().load_program(str(path))


def executorch_method(path: str | Path, name: str = "forward") -> Any:
    """Load one method of a ``.pte`` (XNNPACK probes the CPU here, which prints noise we filter)."""
    program = executorch_program(path)
    with filtered_native_stderr():
        return program.load_method(name)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored as a constant method (``mobileone_metadata``) of an ExecuTorch program."""
    return json.loads(executorch_method(path, "mobileone_metadata").execute([])[0])


def set_threads(threads: int | None) -> None:
    """XNNPACK's thread pool is process-wide in ExecuTorch's Python binding."""
    if threads:
        require("executorch.runtime", EXTRA)
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        with filtered_native_stderr():
            _unsafe_reset_threadpool(threads)


def load(path: str | Path, threads: int | None = None) -> Runner:
    set_threads(threads)
    method = executorch_method(path)
    return lambda x: list(method.execute([x.contiguous()]))


def runtime_name() -> str:
    return f"ExecuTorch runtime {package_version('executorch')} (XNNPACK)"


read_executorch_metadata = read_metadata
