"""The paper's analyses on this machine: rank correlation of latency with MACs and params (its Table 1),
and the 30-layer conv net's cost of each activation (its Table 2) and of skip connections and SE."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.model import SqueezeExcite
from ..deploy.common import require
from .timing import latency_stats, make_runner, time_calls


def spearman(latency: Iterable[float], other: Iterable[float]) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value (the paper's Table 1 statistic)."""
    result = require("scipy.stats", "bench").spearmanr(list(latency), list(other))
    return float(result.statistic), float(result.pvalue)


class SqueezeExciteReLU(nn.Module):
    """SE (reduction 1/16, as in MobileOne-S4) followed by ReLU: the paper's "SE-ReLU" row."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.se = SqueezeExcite(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.se(x))


ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "ReLU": lambda c: nn.ReLU(),
    "GELU": lambda c: nn.GELU(),
    "SiLU": lambda c: nn.SiLU(),
    "Hardswish": lambda c: nn.Hardswish(),
    "SE-ReLU": SqueezeExciteReLU,
}


class ConvNet30(nn.Module):
    """A plain stack of ``depth`` 3x3 convs (stride 1, ``width`` channels) for the micro-studies.

    ``activation`` follows every conv; ``skip`` adds each layer's input to its output (a
    residual); ``se`` puts squeeze-excitation before each activation.
    """

    def __init__(
        self, activation: str = "ReLU", depth: int = 30, width: int = 32, skip: bool = False, se: bool = False
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")
        self.skip = skip
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.acts = nn.ModuleList(
            nn.Sequential(*([SqueezeExciteReLU(width).se] if se else []), ACTIVATIONS[activation](width))
            for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for conv, act in zip(self.convs, self.acts, strict=True):
            y = act(conv(x))
            x = x + y if self.skip else y
        return x


@dataclass
class MicroStudy:
    """Settings of the 30-layer net studies: input ``width`` x ``resolution``^2 at batch 1."""

    depth: int = 30
    width: int = 32
    resolution: int = 56


def _time_net(
    net: nn.Module, study: MicroStudy, runtime: str, threads: int, warmup: int, iters: int, min_time: float
) -> dict[str, float]:
    torch.set_num_threads(threads)
    x = torch.randn(1, study.width, study.resolution, study.resolution)
    net = net.eval()
    with tempfile.TemporaryDirectory(prefix="mobileone_bench_") as tmp:
        with torch.inference_mode(runtime not in ("onnxruntime", "executorch")):
            fn = make_runner(runtime, net, x, threads, Path(tmp))
        with torch.inference_mode():
            return latency_stats(time_calls(fn, warmup, iters, min_time))


def _activation_nets(s: MicroStudy) -> dict[str, Callable[[], nn.Module]]:
    """The 30-layer net with each activation (the paper's Table 2); the first, ReLU, is the reference."""
    return {name: (lambda name=name: ConvNet30(name, s.depth, s.width)) for name in ACTIVATIONS}


def _skip_se_nets(s: MicroStudy) -> dict[str, Callable[[], nn.Module]]:
    """The 30-layer ReLU net plain, with a skip connection per layer, with SE per layer, with both."""
    variants = {"plain": (False, False), "+ skip": (True, False), "+ SE": (False, True), "+ skip + SE": (True, True)}
    return {
        name: (lambda skip=skip, se=se: ConvNet30("ReLU", s.depth, s.width, skip=skip, se=se))
        for name, (skip, se) in variants.items()
    }


STUDIES = {"activation": _activation_nets, "skip/SE": _skip_se_nets}


def run_study(
    title: str,
    runtime: str = "eager",
    threads: int = 2,
    study: MicroStudy | None = None,
    warmup: int = 10,
    iters: int = 30,
    min_time: float = 1.0,
) -> list[dict[str, Any]]:
    """Time each net of the study ``title`` (one of :data:`STUDIES`); ``relative`` is its median over the first's."""
    s = study or MicroStudy()
    rows = []
    for name, make in STUDIES[title](s).items():
        torch.manual_seed(0)
        stats = _time_net(make(), s, runtime, threads, warmup, iters, min_time)
        rows.append({"study": title, "variant": name, "runtime": runtime, **stats})
    for r in rows:
        r["relative"] = r["median_ms"] / rows[0]["median_ms"]
    return rows


activation_study = partial(run_study, "activation")  # latency of each activation relative to ReLU (Table 2)
skip_se_study = partial(run_study, "skip/SE")  # the cost of skip connections and SE blocks
