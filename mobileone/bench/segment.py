"""Latency of the segmenters: 512 px, batch 1, output stride 16 and 8, fused and unfused, eager and onnxruntime.

The models are DeepLabV3 and LR-ASPP on MobileOne and the same heads on MobileNetV3-Large (the
peers; output stride 16 only), all with random weights (nothing is downloaded): latency does
not depend on the weights. "Unfused" is the train-time graph in eval mode (MobileOne's k branches
and every BatchNorm); "fused" is what ``reparameterize_model`` and the exports deploy. In
onnxruntime the unfused graph's BatchNorms are folded by the runtime itself, its parallel
branches are not. Each timing is the median of at least ``iters`` calls after ``warmup`` calls
at a fixed thread count (``bench.timing``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.complexity import count_macs, count_params
from ..deploy.segment import SegmentationOutputs
from ..tasks.segment.model import MNV3, create_segmenter, parse_segmenter_name
from .report import save_result
from .timing import RUNTIMES, cpu_name, time_model

DEFAULT_MODELS = ("deeplabv3_s0", "lraspp_s0", "deeplabv3_mnv3", "lraspp_mnv3")


@dataclass
class SegmentationBenchConfig:
    """What to time; the defaults are the documented run (docs/segmentation.md)."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    output_strides: list[int] = field(default_factory=lambda: [16, 8])
    runtimes: list[str] = field(default_factory=lambda: ["eager", "onnxruntime"])
    img_size: int = 512
    batch: int = 1
    threads: int = 2
    num_classes: int = 21
    unfused: bool = True  # also time the train-time graph
    warmup: int = 5
    iters: int = 20
    min_time: float = 1.0
    out: str | None = None  # folder for segment_results.md / segment_results.json

    def __post_init__(self) -> None:
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime(s) {unknown}; choose from {list(RUNTIMES)}")
        bad = [s for s in self.output_strides if s not in (8, 16)]
        if bad or not self.output_strides:
            raise ValueError(f"output strides must be 16 and/or 8, got {self.output_strides}")
        for name in self.models:
            parse_segmenter_name(name)  # a clear error for an unknown name, before anything is timed
        if self.threads < 1 or self.batch < 1 or self.iters < 1 or not 32 <= self.img_size <= 4096:
            raise ValueError("threads, batch and iters must be >= 1 and img_size in 32..4096")


def _cases(cfg: SegmentationBenchConfig) -> list[tuple[str, int, bool]]:
    """(model, output stride, fused) to time; the MobileNetV3 peers only at output stride 16."""
    cases = []
    for name in cfg.models:
        for os_ in cfg.output_strides:
            if parse_segmenter_name(name)[1] == MNV3 and os_ != 16:
                continue
            cases += [(name, os_, True)] + ([(name, os_, False)] if cfg.unfused else [])
    return cases


def run_segmentation_benchmark(cfg: SegmentationBenchConfig, progress: bool = True) -> dict[str, Any]:
    """Time every case; returns the rows (and writes ``cfg.out``/segment_results.md and .json when ``out`` is set)."""
    torch.set_num_threads(cfg.threads)
    rows, errors = [], []
    for name, os_, fused in _cases(cfg):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_segmenter(name, num_classes=cfg.num_classes, output_stride=os_, inference_mode=fused)
        wrapped = SegmentationOutputs(model.eval()).eval()
        row: dict[str, Any] = {
            "model": name,
            "output_stride": os_,
            "fused": fused,
            "params": count_params(model),
            "macs": count_macs(wrapped, cfg.img_size),
        }
        for runtime in cfg.runtimes:
            if progress:
                print(f"bench: {name} OS{os_} {'fused' if fused else 'unfused'} / {runtime}", flush=True)
            workdir = Path(tempfile.mkdtemp(prefix="mobileone_segbench_"))
            try:
                stats = time_model(
                    wrapped, runtime, cfg.batch, cfg.img_size, cfg.threads, cfg.warmup, cfg.iters, cfg.min_time, workdir
                )
                row[runtime] = stats
            except Exception as e:  # one failing runtime (an export) must not stop the run
                row[runtime] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
                errors.append(f"{name} OS{os_} / {runtime}: {row[runtime]['error']}")
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        rows.append(row)
    result = {
        "config": asdict(cfg),
        "rows": rows,
        "errors": errors,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": cpu_name(),
        "torch": torch.__version__,
    }
    if cfg.out:
        save_result(cfg.out, "segment_results", result, segmentation_markdown(result))
    return result


def segmentation_markdown(result: dict[str, Any]) -> str:
    """The rows as a markdown table: median (min) ms per runtime, and the fused speed-up per runtime."""
    cfg = result["config"]
    runtimes = cfg["runtimes"]
    lines = [
        f"# Segmentation latency ({result['date']})",
        "",
        f"{result['machine']}, {cfg['threads']} threads, torch {result['torch']}; input {cfg['img_size']}x"
        f"{cfg['img_size']}, batch {cfg['batch']}, {cfg['num_classes']} classes, random weights; median (min) ms of "
        f">= {cfg['iters']} calls after {cfg['warmup']} warm-up calls.",
        "",
        "| model | OS | graph | params M | MACs G | " + " | ".join(f"{r} ms" for r in runtimes) + " |",
        "|---|---:|---|---:|---:|" + "---:|" * len(runtimes),
    ]
    for r in result["rows"]:
        cells = []
        for rt in runtimes:
            s = r.get(rt, {})
            cells.append(f"failed: {s['error'][:60]}" if "error" in s else f"{s['median_ms']:.1f} ({s['min_ms']:.1f})")
        lines.append(
            f"| {r['model']} | {r['output_stride']} | {'fused' if r['fused'] else 'unfused'} | "
            f"{r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.2f} | " + " | ".join(cells) + " |"
        )
    speedups = []
    for r in result["rows"]:
        twin = (
            next(
                (
                    u
                    for u in result["rows"]
                    if u["model"] == r["model"] and u["output_stride"] == r["output_stride"] and not u["fused"]
                ),
                None,
            )
            if r["fused"]
            else None
        )
        if twin is None:
            continue
        parts = [
            f"{rt} {twin[rt]['median_ms'] / r[rt]['median_ms']:.2f}x"
            for rt in runtimes
            if "median_ms" in r.get(rt, {}) and "median_ms" in twin.get(rt, {})
        ]
        if parts:
            speedups.append(f"- {r['model']} OS{r['output_stride']}: fused vs unfused {', '.join(parts)}")
    if speedups:
        lines += ["", "Fusion speed-up (unfused median / fused median):", "", *speedups]
    if result["errors"]:
        lines += ["", "Errors:", "", *(f"- {e}" for e in result["errors"])]
    return "\n".join(lines) + "\n"
