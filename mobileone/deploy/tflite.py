"""LiteRT (TensorFlow Lite) ``.tflite``: converted by litert-torch, run by ai-edge-litert's interpreter (XNNPACK).

The Android path. The graph takes a fixed batch of 1 (LiteRT's converter specializes shapes); the
metadata (classes, preprocessing, outputs) goes into a JSON file beside the model, ``<file>.json``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .common import (
    Runner,
    filtered_native_stderr,
    package_version,
    read_sidecar,
    require,
    silenced_stdout,
    write_sidecar,
)

SUFFIX, EXTRA, DYNAMIC = ".tflite", "litert", ("none",)


def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic: str, names: list[str]) -> None:
    """Convert ``model`` (traced at ``example``; batch 1) to a ``.tflite`` with the float32 weights as they are."""
    litert_torch = require("litert_torch", EXTRA)
    with warnings.catch_warnings(), filtered_native_stderr(), silenced_stdout():
        warnings.simplefilter("ignore")
        edge = litert_torch.convert(model, (example[:1],))
        edge.export(str(out))
    write_sidecar(out, meta | {"outputs_order": names})


def read_metadata(path: str | Path) -> dict[str, Any]:
    return read_sidecar(path)


def load(path: str | Path, threads: int | None = None) -> Runner:
    """A runner of the ``.tflite`` in LiteRT's interpreter (XNNPACK delegate, ``threads`` threads), image by image.

    Outputs come back in the order the PyTorch module returned them (the signature's ``output_N`` names).
    """
    litert = require("ai_edge_litert.interpreter", EXTRA)
    with filtered_native_stderr():
        interpreter = litert.Interpreter(model_path=str(path), num_threads=threads or None)
        runner = interpreter.get_signature_runner()
    signature = interpreter.get_signature_list()
    key = next(iter(signature))
    in_name = signature[key]["inputs"][0]
    out_names = sorted(signature[key]["outputs"], key=lambda n: int(n.rsplit("_", 1)[-1]) if n[-1].isdigit() else 0)

    in_detail = runner.get_input_details()[in_name]
    out_details = runner.get_output_details()

    def run_one(x: Tensor) -> list[Tensor]:
        result = runner(**{in_name: _to_input(x.numpy(), in_detail)})
        return [torch.from_numpy(_from_output(np.array(result[n]), out_details[n])) for n in out_names]

    shape = interpreter.get_input_details()[0]["shape"]
    with filtered_native_stderr():  # the first call creates the XNNPACK delegate, which says so on stderr
        run_one(torch.zeros(*shape))
    return run_one


def _to_input(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """A float32 input as the model takes it: quantized with its scale and zero point when it takes integers."""
    dtype = detail["dtype"]
    if dtype == np.float32:
        return np.ascontiguousarray(x, dtype=np.float32)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _from_output(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """An output as float32 (dequantized) when it is a quantized integer tensor, else as it is."""
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(y.dtype, np.integer) and scale:
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y


def runtime_name() -> str:
    return f"LiteRT {package_version('ai-edge-litert')} (XNNPACK)"
