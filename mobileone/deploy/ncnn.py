"""ncnn (``.ncnn.param`` + ``.ncnn.bin``): converted by ``pnnx``, run by the ``ncnn`` Python binding.

The path to ARM boards and Android apps that embed ncnn. Both of ncnn's tools default to half
precision: pnnx writes float16 weights unless ``fp16=0`` and ncnn computes and stores
activations in float16 wherever the CPU can (``use_fp16_*`` options), which gives 1e-4 relative
error instead of 1e-7. Exports keep float32 weights and runs switch float16 off unless
``precision="fp16"``. ncnn runs one image at a time (a blob has no batch axis); the metadata goes
into ``<file>.json``.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .common import (
    ExportError,
    Runner,
    filtered_native_stderr,
    package_version,
    read_sidecar,
    require,
    silenced_stdout,
    write_sidecar,
)

SUFFIX, EXTRA, DYNAMIC = ".param", "ncnn", ("none",)
FP16_OPTIONS = ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic")


def weights_path(param: str | Path) -> Path:
    """The ``.bin`` beside a ``.param``."""
    return Path(param).with_suffix(".bin")


def export(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic: str, names: list[str]) -> None:
    """Trace ``model`` at batch 1 and convert it with pnnx (float32 weights) to ``out`` and its ``.bin``."""
    pnnx = require("pnnx", EXTRA)
    require("ncnn", EXTRA)
    with tempfile.TemporaryDirectory(prefix="mobileone_pnnx_") as tmp:
        traced = Path(tmp) / "model.pt"
        with warnings.catch_warnings(), silenced_stdout(), filtered_native_stderr(("",)):  # pnnx narrates every pass
            warnings.simplefilter("ignore")
            pnnx.export(model, str(traced), (example[:1],), fp16=False)
        produced = Path(tmp) / "model.ncnn.param"
        if not produced.exists():
            raise ExportError(f"pnnx did not convert the model to ncnn (no {produced.name} written)")
        unsupported = sorted({ln.split()[0] for ln in produced.read_text().splitlines()[2:] if "." in ln.split()[0]})
        if unsupported:  # pnnx leaves the torch ops ncnn has no layer for as they are; ncnn cannot load them
            raise ExportError(f"ncnn has no layer for {unsupported}; export without it (segment: without --argmax)")
        shutil.move(produced, out)
        shutil.move(produced.with_suffix(".bin"), weights_path(out))
    write_sidecar(out, meta | {"outputs_order": names})


def read_metadata(path: str | Path) -> dict[str, Any]:
    return read_sidecar(path)


def load(path: str | Path, threads: int | None = None, precision: str = "fp32") -> Runner:
    """A runner of the ncnn model (``threads`` threads; float16 storage and math only when ``precision="fp16"``)."""
    ncnn = require("ncnn", EXTRA)
    net = ncnn.Net()
    for option in FP16_OPTIONS:
        setattr(net.opt, option, precision == "fp16")
    if threads:
        net.opt.num_threads = threads
    if net.load_param(str(path)) != 0 or net.load_model(str(weights_path(path))) != 0:
        raise ExportError(f"ncnn cannot load {path} and {weights_path(path)} (corrupt, or not ncnn?)")
    inputs, outputs = net.input_names(), net.output_names()

    def run_one(x: Tensor) -> list[Tensor]:
        extractor = net.create_extractor()
        extractor.input(inputs[0], ncnn.Mat(np.ascontiguousarray(x[0].numpy(), dtype=np.float32)).clone())
        out = []
        for name in outputs:
            status, mat = extractor.extract(name)
            if status != 0:
                raise ExportError(f"ncnn failed to compute output {name} of {path} (status {status})")
            out.append(torch.from_numpy(np.array(mat).copy())[None])
        return out

    return run_one


def runtime_name() -> str:
    return f"ncnn {package_version('ncnn')} (fp32)"
