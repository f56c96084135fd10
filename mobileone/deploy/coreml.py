"""Core ML: an ML program (``.mlpackage``); predicts on macOS only, so Linux checks its structure."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .common import INPUT_NAME, OUTPUT_NAME, ExportError, package_version, require, run_batches


def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic_batch: bool) -> None:
    ct = require("coremltools")
    shape = list(example.shape)
    if dynamic_batch:
        shape[0] = ct.RangeDim(lower_bound=1, upper_bound=256, default=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        classes = meta.get("class_names")
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=ct.Shape(shape))],
            outputs=None if classes else [ct.TensorType(name=OUTPUT_NAME)],
            classifier_config=ct.ClassifierConfig([str(c) for c in classes]) if classes else None,
            convert_to="mlprogram",
        )
    mlmodel.short_description = f"{meta.get('variant') or meta.get('architecture')} (fused MobileOne graph)"
    mlmodel.input_description[INPUT_NAME] = f"{meta['input_layout']}; mean {meta['mean']}, std {meta['std']}"
    for key, value in meta.items():
        mlmodel.user_defined_metadata[key] = json.dumps(value)
    if out.exists():
        shutil.rmtree(out)
    mlmodel.save(str(out))


def read_coreml_metadata(path: str | Path) -> dict[str, Any]:
    """The user-defined metadata of a ``.mlpackage`` (readable on any OS)."""
    ct = require("coremltools")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    out = {}
    for key, value in spec.description.metadata.userDefined.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def coreml_op_counts(path: str | Path) -> dict[str, int]:
    """How many of each MIL op the Core ML program holds (a structural check that works on Linux)."""
    ct = require("coremltools")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    main = spec.mlProgram.functions["main"]
    counts: dict[str, int] = {}
    for op in main.block_specializations[main.opset].operations:
        counts[op.type] = counts.get(op.type, 0) + 1
    return counts


def verify(path: Path, x: Tensor, dynamic_batch: bool, fused: nn.Module) -> tuple[Tensor | None, str]:
    ct = require("coremltools")
    ops = coreml_op_counts(path)
    convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    if ops.get("batch_norm", 0) or ops.get("conv", 0) != convs:
        raise ExportError(
            f"{path} holds {ops.get('conv', 0)} convs and {ops.get('batch_norm', 0)} batch norms; "
            f"the fused model has {convs} convs and none"
        )
    if "mean" not in read_coreml_metadata(path):
        raise ExportError(f"{path} lacks the preprocessing metadata (mean, std, input size)")
    if sys.platform != "darwin":
        return None, (
            f"structural only ({ops['conv']} convs, no batch norm, metadata present): Core ML prediction needs macOS"
        )
    mlmodel = ct.models.MLModel(str(path))
    spec = mlmodel.get_spec()
    classes = read_coreml_metadata(path).get("class_names")

    def run(batch: Tensor) -> Tensor:
        result = mlmodel.predict({INPUT_NAME: batch.numpy()})
        if classes:
            probs = result[spec.description.predictedProbabilitiesName]
            return torch.tensor([[probs[str(c)] for c in classes]])
        return torch.from_numpy(np.asarray(result[OUTPUT_NAME]))

    got = run_batches(run, x, False)
    return got, f"Core ML {package_version('coremltools')} prediction (float16 compute), {len(x)} real images"
