"""ONNX: export with torch's dynamo exporter, metadata in ``metadata_props``, check with onnxruntime."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .common import INPUT_NAME, OUTPUT_NAME, ExportError, Runner, package_version, refuse_failed, require

SUFFIX, EXTRA, DYNAMIC = ".onnx", "export", ("none", "batch", "size")
MIN_SIDE, MAX_SIDE = 32, 4096  # the sides an export with a dynamic height and width accepts


def dynamic_dims(dynamic: str) -> Any:
    """torch.export's dynamic shapes for ``dynamic``: none, the batch, or the batch, height and width."""
    if dynamic == "none":
        return None
    dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic == "size":
        dims |= {2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)}
        dims |= {3: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)}
    return (dims,)


def to_onnx(
    model: nn.Module,
    out: Path,
    example: Tensor,
    dynamic_batch: bool = False,
    output_names: list[str] | None = None,
    dynamic_shapes: Any = None,
) -> None:
    """Export ``model`` as it is (no fusing, no check) with torch's dynamo ONNX exporter.

    ``dynamic_shapes`` overrides the dynamic batch (e.g. a dynamic height and width too).
    """
    require("onnx")
    require("onnxscript")
    if dynamic_shapes is None and dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=output_names or [OUTPUT_NAME],
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    program.save(str(out))


def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic: str, names: list[str]) -> None:
    onnx = require("onnx")
    to_onnx(model, out, example, output_names=names, dynamic_shapes=dynamic_dims(dynamic))
    proto = onnx.load(str(out))
    if "BatchNormalization" in {n.op_type for n in proto.graph.node}:
        raise ExportError(f"{out} still contains BatchNormalization nodes: the graph was not fused")
    set_onnx_metadata(proto, meta)
    onnx.save(proto, str(out))


def set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    """Write ``meta`` into the ONNX ``metadata_props`` (every value as JSON) and a readable doc string."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in meta.items():
        text = json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            proto.metadata_props.add(key=key, value=text)
    proto.doc_string = (
        f"{meta.get('variant') or meta.get('architecture')} (fused); preprocessing: {meta.get('input_layout')}"
    )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata ``export_model`` wrote into an ONNX file (JSON values decoded)."""
    onnx = require("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise ExportError(f"{path} is not a readable ONNX model (truncated or not ONNX?): {e}") from e
    out = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:  # files written by other tools, or before values were all JSON
            out[p.key] = p.value
    return out


def onnx_task(path: str | Path) -> str:
    """The task an exported ONNX file was written for (``classify`` when its metadata names none)."""
    task = read_onnx_metadata(path).get("task", "classify")
    return task if isinstance(task, str) else "classify"


def require_onnx_task(path: str | Path, task: str) -> dict[str, Any]:
    """The file's metadata, or an :class:`ExportError` when it was exported for another task than ``task``."""
    meta = read_onnx_metadata(path)
    found = meta.get("task", "classify")
    if found != task:
        raise ExportError(
            f"{path} is a {found} model (its metadata says so), not a {task} one; run the command with --task {found}"
        )
    return meta


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with full graph optimization and a fixed thread count.

    Files named as failed exports (``NAME.failed.onnx``) are refused.
    """
    refuse_failed(path)
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / NoSuchFile
        raise ExportError(f"onnxruntime cannot load {path} (corrupt, truncated or not ONNX?): {e}") from e


def load(path: str | Path, threads: int | None = None) -> Runner:
    """A runner of the ONNX file in onnxruntime (CPU)."""
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name
    return lambda x: [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]


def runtime_name() -> str:
    return f"onnxruntime {package_version('onnxruntime')}"


read_onnx_metadata = read_metadata  # the name the rest of the package imports
