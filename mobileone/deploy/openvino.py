"""OpenVINO IR (``.xml`` + ``.bin``): converted by ``openvino.convert_model``, run by OpenVINO on the CPU.

Two defaults of OpenVINO change the numbers silently and are set here: ``save_model`` compresses
the weights to float16 unless told not to, and the CPU plugin computes in bfloat16 on CPUs that
have it (AVX512-BF16, AMX). Exports keep float32 weights and runs ask for float32 math
(``INFERENCE_PRECISION_HINT``) unless ``precision`` says otherwise. The metadata is stored in the
IR's ``rt_info`` under ``mobileone/metadata``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .common import Runner, keeps_signal_stack, package_version, require

SUFFIX, EXTRA, DYNAMIC = ".xml", "openvino", ("none", "batch", "size")
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


@keeps_signal_stack
def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic: str, names: list[str]) -> None:
    """Convert ``model`` at ``example``'s shape (batch, or batch and size, dynamic when asked), float32 weights."""
    ov = require("openvino", EXTRA)
    ir = convert_module(model, example, dynamic, names)
    ir.set_rt_info(json.dumps(meta), ["mobileone", "metadata"])
    ov.save_model(ir, str(out), compress_to_fp16=False)


@keeps_signal_stack
def convert_module(model: nn.Module, example: Tensor, dynamic: str, names: list[str]) -> Any:
    """The in-memory OpenVINO model of ``model``, its outputs named ``names``."""
    ov = require("openvino", EXTRA)
    shape = [-1 if dynamic != "none" else example.shape[0], example.shape[1]] + [
        -1 if dynamic == "size" else s for s in example.shape[2:]
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ir = ov.convert_model(model, example_input=example, input=[ov.PartialShape(shape)])
    for output, name in zip(ir.outputs, names, strict=True):
        output.get_tensor().set_names({name})
    return ir


@keeps_signal_stack
def convert_onnx(onnx_path: Path, out: Path, meta: dict) -> None:
    """Convert an ONNX file (e.g. a detector with NMS in its graph) to IR with float32 weights."""
    ov = require("openvino", EXTRA)
    ir = ov.convert_model(str(onnx_path))
    ir.set_rt_info(json.dumps(meta), ["mobileone", "metadata"])
    ov.save_model(ir, str(out), compress_to_fp16=False)


@keeps_signal_stack
def read_metadata(path: str | Path) -> dict[str, Any]:
    ov = require("openvino", EXTRA)
    model = ov.Core().read_model(str(path))
    return json.loads(model.get_rt_info(["mobileone", "metadata"]).astype(str))


@keeps_signal_stack
def load(path: str | Path, threads: int | None = None, precision: str = "fp32") -> Runner:
    """A runner of the IR on OpenVINO's CPU plugin, in ``precision`` math (float32 by default), latency mode."""
    ov = require("openvino", EXTRA)
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    @keeps_signal_stack
    def run(x: Tensor) -> list[Tensor]:
        result = request.infer([x.numpy()])
        return [torch.from_numpy(result[o].copy()) for o in compiled.outputs]

    return run


def runtime_name() -> str:
    return f"OpenVINO {package_version('openvino')} CPU (f32 math)"
