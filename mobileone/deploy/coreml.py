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

from ..core.complexity import layers_run
from .common import INPUT_NAME, OUTPUT_NAME, ExportError, Runner, package_version, require

SUFFIX, EXTRA, DYNAMIC = ".mlpackage", "export", ("none", "batch")


def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic: str, names: list[str]) -> None:
    """An ML program; a classifier (``logits`` only, class names known) gets Core ML's classifier outputs."""
    ct = require("coremltools")
    shape = list(example.shape)
    if dynamic == "batch":
        shape[0] = ct.RangeDim(lower_bound=1, upper_bound=256, default=1)
    classes = meta.get("class_names") if names == [OUTPUT_NAME] and meta.get("task", "classify") == "classify" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=ct.Shape(shape))],
            outputs=None if classes else [ct.TensorType(name=n) for n in names],
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


def read_metadata(path: str | Path) -> dict[str, Any]:
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


def convs_run(model: nn.Module, example: Tensor) -> int:
    """How many convs an eval forward runs (an auxiliary head's are in the model, not in the graph)."""
    return len(layers_run(model, example, (nn.Conv2d,)))


def check_structure(path: Path, model: nn.Module, example: Tensor) -> str:
    """No BatchNorm, as many convs as the fused module runs, the metadata present: what Linux can check."""
    ops = coreml_op_counts(path)
    convs = convs_run(model, example)
    if ops.get("batch_norm", 0) or ops.get("conv", 0) != convs:
        raise ExportError(
            f"{path} holds {ops.get('conv', 0)} convs and {ops.get('batch_norm', 0)} batch norms; "
            f"the fused model runs {convs} convs and none"
        )
    if "mean" not in read_metadata(path):
        raise ExportError(f"{path} lacks the preprocessing metadata (mean, std, input size)")
    return f"structural only ({ops['conv']} convs, no batch norm, metadata present): Core ML prediction needs macOS"


def can_run() -> bool:
    return sys.platform == "darwin"


def load(path: str | Path, threads: int | None = None) -> Runner:
    """A runner of the ML program (macOS only), image by image; a classifier's probabilities in class order."""
    ct = require("coremltools")
    if not can_run():
        raise ExportError("Core ML prediction needs macOS")
    mlmodel = ct.models.MLModel(str(path))
    spec = mlmodel.get_spec()
    meta = read_metadata(path)
    names = [o.name for o in spec.description.output]
    classes = meta.get("class_names") if spec.description.predictedProbabilitiesName else None

    def run(x: Tensor) -> list[Tensor]:
        result = mlmodel.predict({INPUT_NAME: x.numpy()})
        if classes:
            probs = result[spec.description.predictedProbabilitiesName]
            return [torch.tensor([[probs[str(c)] for c in classes]])]
        return [torch.from_numpy(np.asarray(result[n])) for n in names]

    return run


def runtime_name() -> str:
    return f"Core ML {package_version('coremltools')} prediction (float16 compute)"


read_coreml_metadata = read_metadata
