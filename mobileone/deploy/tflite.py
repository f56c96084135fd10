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

    def run_one(x: Tensor) -> list[Tensor]:
        result = runner(**{in_name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        return [torch.from_numpy(np.array(result[n])) for n in out_names]

    shape = interpreter.get_input_details()[0]["shape"]
    with filtered_native_stderr():  # the first call creates the XNNPACK delegate, which says so on stderr
        run_one(torch.zeros(*shape))
    return run_one


def runtime_name() -> str:
    return f"LiteRT {package_version('ai-edge-litert')} (XNNPACK)"
