"""The export targets, one module each, behind one interface, and the one path every export is written through.

A target module has ``SUFFIX``, ``EXTRA`` (the pip extra that installs its converter and runtime),
``DYNAMIC`` (which of ``none`` / ``batch`` / ``size`` it can leave open), ``export(module, out,
example, meta, dynamic, names)``, ``load(path, threads) -> Runner``, ``read_metadata(path)`` and
``runtime_name()``. Tasks hand a target the fused module, an example input and the names of their
outputs; nothing in a target knows which task it exports.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from . import coreml, executorch, ncnn, onnx, openvino, tflite, torchscript
from .common import Runner, write_checked


@dataclass(frozen=True)
class Target:
    """One export format: its module, its check tolerance (atol, rtol) and the packages it needs.

    ``tolerance``: the check fails above ``atol + rtol * max |PyTorch output|``.
    """

    name: str
    module: ModuleType
    tolerance: tuple[float, float]
    packages: tuple[str, ...]
    per_image: bool = False  # the runtime has a fixed batch of 1 (the runner is fed image by image)

    @property
    def suffix(self) -> str:
        return self.module.SUFFIX

    @property
    def extra(self) -> str:
        return self.module.EXTRA

    @property
    def dynamic(self) -> tuple[str, ...]:
        return getattr(self.module, "DYNAMIC", ("none",))

    def installed(self) -> bool:
        return all(importlib.util.find_spec(p) is not None for p in self.packages)

    def file_name(self, stem: str = "model") -> str:
        """The file name ``--format all`` writes (ncnn's ``.ncnn.param`` keeps its ``.bin`` apart from OpenVINO's)."""
        return f"{stem}.ncnn{self.suffix}" if self.name == "ncnn" else f"{stem}{self.suffix}"

    def files(self, path: Path) -> list[Path]:
        """Every file an export at ``path`` consists of (weights and metadata written beside it)."""
        extra = {
            "openvino": [path.with_suffix(".bin")],
            "ncnn": [path.with_suffix(".bin"), Path(f"{path}.json")],
            "tflite": [Path(f"{path}.json")],
        }
        return [path, *extra.get(self.name, [])]


# Core ML computes in float16 by default: it is compared with a looser tolerance than the fp32 runtimes.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("onnx", onnx, (1e-4, 1e-4), ("onnx", "onnxscript", "onnxruntime")),
        Target("torchscript", torchscript, (1e-4, 1e-4), ("torch",)),
        Target("executorch", executorch, (1e-4, 1e-4), ("executorch",)),
        Target("coreml", coreml, (5e-2, 2e-2), ("coremltools",), per_image=True),
        Target("tflite", tflite, (1e-4, 1e-4), ("litert_torch", "ai_edge_litert"), per_image=True),
        Target("openvino", openvino, (1e-4, 1e-4), ("openvino",)),
        Target("ncnn", ncnn, (1e-4, 1e-4), ("pnnx", "ncnn"), per_image=True),
    )
}
FORMATS = {name: t.suffix for name, t in TARGETS.items()}


def target(format: str) -> Target:
    if format not in TARGETS:
        raise ValueError(f"unknown export format {format!r}; choose one of {list(TARGETS)}")
    return TARGETS[format]


def format_of(path: str | Path) -> str | None:
    """The format a file name's suffix names (``.param`` is ncnn, ``.xml`` OpenVINO)."""
    return next((f for f, s in FORMATS.items() if Path(path).suffix == s), None)


def write_export(
    format: str, module: nn.Module, out: Path, example: Tensor, meta: dict[str, Any], dynamic: str, names: list[str]
) -> Path:
    """Write ``module`` (fused, eval mode) as ``format`` to ``out``: every target's writer behind one function
    (:func:`write_target` wraps it in the checked write path)."""
    t = target(format)
    if dynamic not in t.dynamic:
        dynamic = "batch" if dynamic == "size" and "batch" in t.dynamic else "none"
        if dynamic == "none":
            example = example[:1]
    with torch.inference_mode(False), torch.no_grad():
        t.module.export(module.eval(), out, example, meta, dynamic, names)
    return out


def write_target(
    format: str,
    module: nn.Module,
    out: Path,
    example: Tensor,
    meta: dict[str, Any],
    dynamic: str,
    names: list[str],
    check: Callable[[Path], Any] | None = None,
) -> Any:
    """:func:`write_export` through the package's one write path: written beside ``out``, checked by
    ``check(tmp)``, then renamed with its companion files (a failed check leaves nothing at ``out``)."""
    t = target(format)
    return write_checked(
        out,
        lambda tmp: write_export(format, module, tmp, example, meta, dynamic, names),
        check,
        t.module.read_metadata,
        lambda p: t.files(p)[1:],
    )


def load_export(format: str, path: str | Path, threads: int | None = None) -> Runner:
    """A runner of an exported file in its own runtime."""
    return target(format).module.load(path, threads)


def run_export(format: str, runner: Runner, x: Tensor, dynamic_batch: bool) -> list[Tensor]:
    """The outputs of ``runner`` on all of ``x``: at once where the file takes any batch, else image by image."""
    if dynamic_batch and not target(format).per_image:
        return [o.float() if o.is_floating_point() else o for o in runner(x)]
    outs = [runner(x[i : i + 1]) for i in range(len(x))]
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of any exported file, by its suffix."""
    format = format_of(path)
    if format is None:
        raise ValueError(f"cannot read metadata from {path}: expected one of {list(FORMATS.values())}")
    return target(format).module.read_metadata(path)


def missing(format: str) -> str | None:
    """One line naming the extra to install when ``format``'s converter or runtime is missing, else None."""
    t = target(format)
    if t.installed():
        return None
    absent = [p for p in t.packages if importlib.util.find_spec(p) is None]
    return f"{format}: {', '.join(absent)} not installed: pip install 'mobileone[{t.extra}]'"
