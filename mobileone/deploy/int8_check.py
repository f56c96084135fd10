"""INT8 that cannot silently collapse: measure the drop in the target runtime and try the known remedies in order.

Re-parameterized networks lose most of their accuracy under naive INT8 (RepVGG-A0 72.4 -> 52.2 % top-1,
arXiv 2212.01593): folding branches gives kernels and activations whose channels have very different
ranges. :func:`quantize_checked` quantizes with the runtime's own tool, measures the task's metric of the
fp32 and the INT8 file both in that runtime, and while the drop is over ``max_drop`` tries, in order:
per-channel weight scales, the other activation calibration, then keeping the most sensitive layers in
float (1, 2, 4, 8 of them), found by a per-layer sensitivity pass. Remedies add up (each applies to the
recipe kept so far; one that made things worse is dropped). Every step is reported; the best file is
written; a drop still over the limit is an error that names quantization-aware training (``--qat``).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .int8 import RUNTIMES, Graph, Recipe, quantize_graph, weighted_layers
from .runtime_eval import runtime_metric
from .targets import TARGETS, write_export

KEEP_FLOAT_STEPS = (1, 2, 4, 8)


@dataclass
class Step:
    """One quantization tried: what it changed, its recipe, the metric of its file and the drop in points."""

    remedy: str
    recipe: Recipe
    value: float
    drop: float
    path: Path


@dataclass
class Int8Report:
    """Everything ``quantize`` measured: the fp32 and INT8 metric in the runtime, and each step tried."""

    task: str
    runtime: str
    metric: str
    fp32: float
    steps: list[Step] = field(default_factory=list)
    max_drop: float = 1.0
    fp32_path: Path | None = None
    path: Path | None = None
    images: int = 0
    qat: dict[str, Any] | None = None  # the QAT run the INT8 file comes from: its directory and best epoch

    @property
    def best(self) -> Step:
        return min(self.steps, key=lambda s: s.drop)

    @property
    def ok(self) -> bool:
        return self.best.drop <= self.max_drop

    def as_json(self) -> dict[str, Any]:
        """``{task, runtime, metric, fp32, int8, drop}`` (drop in points) and the steps."""
        best = self.best
        return {
            "task": self.task,
            "runtime": self.runtime,
            "metric": self.metric,
            "fp32": self.fp32,
            "int8": best.value,
            "drop": best.drop,
            "max_drop": self.max_drop,
            "recipe": dataclasses.asdict(best.recipe),
            "images": self.images,
            "file": str(self.path),
            "fp32_file": str(self.fp32_path),
            "qat": self.qat,
            "steps": [
                {"remedy": s.remedy, "recipe": s.recipe.label(), "int8": s.value, "drop": s.drop} for s in self.steps
            ],
        }

    def summary(self) -> str:
        before = " (the checkpoint, before QAT)" if self.qat else ""
        lines = [f"{self.metric} in {self.runtime} on {self.images} images: fp32 {self.fp32:.2f}{before}"]
        lines += [
            f"  {s.remedy}: INT8 {s.value:.2f} (drop {s.drop:.2f} points; {s.recipe.label()})" for s in self.steps
        ]
        best = self.best
        lines.append(f"INT8 written: {self.path} ({best.recipe.label()}); fp32 export: {self.fp32_path}")
        return "\n".join(lines)


def sensitivity(graph: Graph, calibration: Tensor, images: int = 16) -> list[str]:
    """The weighted layers, most sensitive to INT8 first: each one alone fake-quantized (per-channel int8 weights,
    per-tensor uint8 input), the others in float, ranked by the relative error it causes at the outputs."""
    x = calibration[:images]
    module = graph.module
    with torch.no_grad():
        reference = _flat(module(x))
    errors = {}
    for name in weighted_layers(module, graph.example):
        layer = module.get_submodule(name)
        with _fake_quantized(layer, x, module), torch.no_grad():
            out = _flat(module(x))
        errors[name] = float((out - reference).norm() / reference.norm().clamp_min(1e-12))
    return sorted(errors, key=errors.get, reverse=True)


def _flat(y: Any) -> Tensor:
    return torch.cat([t.float().flatten() for t in (y if isinstance(y, (tuple, list)) else [y])])


class _fake_quantized:
    """Context: ``layer``'s weights per-channel int8 and its input per-tensor uint8 (ranges from ``x``)."""

    def __init__(self, layer: nn.Module, x: Tensor, model: nn.Module) -> None:
        self.layer, self.weight = layer, layer.weight.data.clone()
        seen: list[Tensor] = []
        hook = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        with torch.no_grad():
            model(x)
        hook.remove()
        lo, hi = float(seen[0].min()), float(seen[0].max())
        self.scale, self.zero = max(hi - lo, 1e-8) / 255.0, round(-lo / max(hi - lo, 1e-8) * 255.0)

    def __enter__(self) -> None:
        w = self.weight
        s = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127.0
        s = s.view(-1, *[1] * (w.dim() - 1))
        self.layer.weight.data = (w / s).round().clamp(-127, 127) * s
        scale, zero = self.scale, self.zero
        self.hook = self.layer.register_forward_pre_hook(
            lambda m, a: ((a[0] / scale + zero).round().clamp(0, 255).sub(zero).mul(scale),)
        )

    def __exit__(self, *exc: Any) -> None:
        self.hook.remove()
        self.layer.weight.data = self.weight


def remedies(recipe: Recipe, graph: Graph, calibration: Tensor) -> Iterator[tuple[str, Any]]:
    """The remedies in order: a function of the best recipe so far giving the next one, with its name."""
    if not recipe.per_channel:
        yield "remedy 1: per-channel weight scales", lambda r: dataclasses.replace(r, per_channel=True)
    other = "histogram" if recipe.method == "minmax" else "minmax"
    yield f"remedy 2: {other} calibration", lambda r: dataclasses.replace(r, method=other)
    ranked: list[str] = []  # filled once, at the first use: the layers not in float yet, most sensitive first
    for k in KEEP_FLOAT_STEPS:

        def keep(r: Recipe, k: int = k) -> Recipe:
            if not ranked:
                ranked.extend(n for n in sensitivity(graph, calibration) if n not in r.keep_float)
            base = tuple(n for n in r.keep_float if n not in ranked)
            return dataclasses.replace(r, keep_float=base + tuple(ranked[:k]))

        yield f"remedy 3: also the {k} most sensitive layer{'s' if k > 1 else ''} in float", keep


def quantize_checked(
    runtime: str,
    graph: Graph,
    calibration: Tensor,
    out: str | Path,
    eval_data: str | Path,
    max_drop: float = 1.0,
    recipe: Recipe | None = None,
    threads: int | None = None,
    reference: Graph | None = None,
) -> Int8Report:
    """Quantize ``graph`` for ``runtime``, measure fp32 and INT8 in it on ``eval_data``, remedy while over ``max_drop``.

    Writes the fp32 export of ``reference`` (default ``graph``; after QAT, the model before it, so the drop is
    what the user loses) beside ``out`` (``<stem>.fp32<suffix>``) and the best INT8 file at ``out``.
    """
    recipe = recipe or Recipe()
    format = RUNTIMES[runtime]
    suffix = TARGETS[format].suffix
    out = Path(out)
    out = out if out.suffix == suffix else out.with_suffix(suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    fp32 = out.with_name(f"{out.stem}.fp32{suffix}")
    ref = reference or graph
    write_export(format, ref.module, fp32, ref.example, ref.meta, "none", ref.names)
    base = runtime_metric(fp32, eval_data, threads)
    report = Int8Report(graph.task, runtime, base["metric"], base["value"], max_drop=max_drop, fp32_path=fp32)
    report.images = base["images"]

    def attempt(name: str, recipe: Recipe, path: Path) -> Step:
        quantize_graph(runtime, graph, calibration, path, recipe)
        value = runtime_metric(path, eval_data, threads)["value"]
        return Step(name, recipe, value, report.fp32 - value, path)

    with tempfile.TemporaryDirectory(prefix="mobileone_int8_") as tmp:
        kept = attempt("as asked", recipe, Path(tmp) / f"0{suffix}")
        report.steps.append(kept)
        for i, (name, change) in enumerate(remedies(recipe, graph, calibration), 1):
            if report.ok:
                break
            step = attempt(name, change(kept.recipe), Path(tmp) / f"{i}{suffix}")
            report.steps.append(step)
            kept = step if step.drop <= kept.drop else kept  # remedies add up, unless one made things worse
        best = report.best.path
        for f in TARGETS[format].files(best):  # the file and what is written beside it (weights, metadata)
            rest = f.name[len(best.name) :] if f.name.startswith(best.name) else None
            shutil.move(f, out.parent / (out.name + rest) if rest is not None else out.with_suffix(f.suffix))
    report.path = out
    return report
