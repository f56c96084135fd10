"""Latency on this machine, measured the way the paper argues it should be, with its analyses.

The paper's point (its Table 1) is that MACs and parameters predict latency poorly, so latency
has to be measured: MobileOne S0-S4 (and the micro variants) fused and unfused and the usual
mobile peers, per runtime, with min / median / p90 over many runs after a warm-up at a fixed
thread count, the fraction of the machine's measured fp32 peak each latency implies, the
Spearman rank correlation of latency with MACs and with params, and the two micro-studies on a
30-layer conv net: the cost of each activation (its Table 2) and of skip connections and SE.
"""

from __future__ import annotations

import gc
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.complexity import count_macs, count_params
from ..core.fusion import reparameterize_model
from ..deploy.common import require
from ..deploy.export import export_model
from .peers import BenchModel, resolve_models
from .report import write_results
from .studies import MicroStudy, activation_study, skip_se_study, spearman
from .timing import (
    BATCH1_ONLY,
    EXPORTED,
    RUNTIMES,
    alternate_rounds,
    compare_latency,
    cpu_name,
    make_runner,
    measure_peak_gflops,
    round_stats,
    time_model,
)


@dataclass
class BenchConfig:
    """What to time and how; the defaults are the README's run."""

    models: list[str] = field(default_factory=lambda: ["default"])
    runtimes: list[str] = field(default_factory=lambda: ["eager", "onnxruntime"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    img_size: int = 224
    threads: int = 2
    out: str = "bench_results"
    warmup: int = 10
    iters: int = 30
    min_time: float = 1.0
    rounds: int = 3  # batch 1 is timed in this many rounds, alternating between the models of a runtime
    precisions: list[str] = field(default_factory=lambda: ["fp32"])  # int8: each runtime's own static INT8
    studies: bool = True
    micro: MicroStudy = field(default_factory=MicroStudy)
    peak_size: int = 2048  # side of the matrices whose product measures the fp32 peak

    def __post_init__(self) -> None:
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime(s) {unknown}; choose from {list(RUNTIMES)}")
        if set(self.precisions) - {"fp32", "int8"}:
            raise ValueError(f"precisions are fp32 and int8, got {self.precisions}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.threads < 1 or self.img_size < 8 or self.iters < 1 or self.rounds < 1:
            raise ValueError("threads, iters and rounds must be >= 1 and img_size >= 8")


def versions() -> dict[str, str]:
    """Versions of torch and the runtimes, and the machine, recorded with every result."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "machine": cpu_name()}
    for pkg in (
        "torch",
        "torchvision",
        "onnxruntime",
        "executorch",
        "ai-edge-litert",
        "openvino",
        "ncnn",
        "timm",
        "numpy",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run_benchmark(cfg: BenchConfig, models: list[BenchModel] | None = None, progress: bool = True) -> dict[str, Any]:
    """Time every model x runtime x batch size, run the analyses, write ``cfg.out``/results.{md,csv}, the plot.

    ``models`` overrides ``cfg.models`` (e.g. tiny custom models in tests).
    """
    tqdm = require("tqdm.auto", "bench").tqdm
    models = models if models is not None else resolve_models(cfg.models)
    torch.set_num_threads(cfg.threads)
    peak = measure_peak_gflops(cfg.threads, cfg.peak_size)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    bar = tqdm(
        total=len(models) * len(cfg.runtimes) * len(cfg.precisions), disable=not progress, desc="bench", unit="run"
    )
    sizes = {}
    for bm in models:
        model = bm.build().eval()
        sizes[bm.name] = (count_params(model), count_macs(model, cfg.img_size))
    for runtime in cfg.runtimes:
        for precision in cfg.precisions:
            runtime_rows = time_runtime(cfg, models, runtime, sizes, peak, bar, precision)
            errors += [f"{r['model']} / {runtime} {precision}: {r['error']}" for r in runtime_rows if "error" in r]
            rows += runtime_rows
        if runtime == "compile":
            torch._dynamo.reset()
        gc.collect()
    bar.close()
    peak = max(
        peak, measure_peak_gflops(cfg.threads, cfg.peak_size)
    )  # best of before and after: less hurt by a busy moment
    studies: list[dict[str, Any]] = []
    if cfg.studies:
        for runtime in [r for r in cfg.runtimes if r in ("eager", "onnxruntime")] or ["eager"]:
            for fn in (activation_study, skip_se_study):
                if progress:
                    print(f"bench: 30-layer net, {fn.__name__.replace('_', ' ')} ({runtime})", flush=True)
                studies += fn(runtime, cfg.threads, cfg.micro, cfg.warmup, cfg.iters, cfg.min_time)
    result = {
        "config": {k: v for k, v in cfg.__dict__.items() if k != "micro"} | {"micro": cfg.micro.__dict__},
        "versions": versions(),
        "threads": cfg.threads,
        "peak_gflops": peak,
        "rows": rows,
        "correlations": correlations(rows, cfg.batch_sizes),
        "studies": studies,
        "errors": errors,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_results(result, Path(cfg.out))
    return result


def time_runtime(
    cfg: BenchConfig,
    models: list[BenchModel],
    runtime: str,
    sizes: dict[str, tuple[int, int]],
    peak: float,
    bar: Any,
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    """Every model in one runtime: batch 1 in alternating rounds over the models, larger batches one by one."""
    rows: dict[str, dict[str, Any]] = {}
    runners, built = {}, {}
    x = torch.randn(1, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    workdirs = {bm.name: Path(tempfile.mkdtemp(prefix="mobileone_bench_")) for bm in models}
    try:
        for bm in models:
            bar.set_postfix_str(f"{bm.name} / {runtime}: export")
            params, macs = sizes[bm.name]
            rows[bm.name] = {
                "model": bm.name,
                "family": bm.family,
                "deployed": bm.deployed,
                "runtime": runtime,
                "precision": precision,
                "params": params,
                "macs": macs,
            }
            try:
                built[bm.name] = bm.build().eval()
                with torch.inference_mode(runtime not in EXPORTED):
                    runners[bm.name] = make_runner(
                        runtime, built[bm.name], x.clone(), cfg.threads, workdirs[bm.name], precision
                    )
            except Exception as e:  # one failing export must not stop the run
                rows[bm.name]["error"] = _error(e)
        bar.set_postfix_str(f"{runtime}: batch 1, {cfg.rounds} rounds")
        times = alternate_rounds(runners, cfg.rounds, cfg.warmup, cfg.iters, cfg.min_time)
        for name, t in times.items():
            rows[name]["bs1"] = _with_rates(round_stats(t), 1, rows[name]["macs"], peak)
        for b in sorted(b for b in cfg.batch_sizes if b > 1 and runtime not in BATCH1_ONLY and precision == "fp32"):
            for name, model in built.items():
                if "error" in rows[name]:
                    continue
                try:  # large batches take long per call: fewer runs, still at least 3 and min_time seconds
                    it, wu = max(3, cfg.iters // 5), max(1, cfg.warmup // 5)
                    stats = time_model(
                        model, runtime, b, cfg.img_size, cfg.threads, wu, it, cfg.min_time, workdirs[name]
                    )
                    rows[name][f"bs{b}"] = _with_rates(stats, b, rows[name]["macs"], peak)
                except Exception as e:
                    rows[name]["error"] = _error(e)
        bar.update(len(models))
    finally:
        for w in workdirs.values():
            shutil.rmtree(w, ignore_errors=True)
    return list(rows.values())


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _with_rates(stats: dict[str, float], batch: int, macs: int, peak: float) -> dict[str, float]:
    stats["throughput"] = batch / (stats["median_ms"] / 1e3)
    stats["peak_fraction"] = 2 * macs * batch / (stats["median_ms"] / 1e3) / (peak * 1e9)
    return stats


def correlations(rows: list[dict[str, Any]], batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Per runtime, Spearman rho (p) of batch-1 median latency against MACs and against params."""
    b = min(batch_sizes)
    out = []
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        ok = [r for r in rows if r["runtime"] == runtime and r["deployed"] and f"bs{b}" in r]
        if len(ok) < 3:
            continue
        lat = [r[f"bs{b}"]["median_ms"] for r in ok]
        rho_m, p_m = spearman(lat, [r["macs"] for r in ok])
        rho_p, p_p = spearman(lat, [r["params"] for r in ok])
        out.append(
            {
                "runtime": runtime,
                "models": len(ok),
                "batch": b,
                "rho_macs": rho_m,
                "p_macs": p_m,
                "rho_params": rho_p,
                "p_params": p_p,
            }
        )
    return out


def deployment_report(model: nn.Module, out_dir: str | Path, img_size: int = 224, threads: int = 2) -> list[str]:
    """Export a trained MobileOne to ONNX (checked with onnxruntime) and time it, unfused and fused.

    Used by ``mobileone demo``; returns printable lines. The ONNX file keeps the model's own input
    size; the latencies are at ``img_size`` (batch 1): the train-time graph in PyTorch, the fused
    graph in PyTorch and in onnxruntime, in alternating rounds. On a busy machine the line says so
    instead of printing ratios that mean nothing.
    """
    try:
        report = export_model(model, Path(out_dir) / "model.onnx", "onnx", dynamic_batch=True)
    except ImportError as e:
        return [f"ONNX export skipped: {e}"]
    unfused = model.eval()
    fused = reparameterize_model(unfused) if not getattr(model, "inference_mode", True) else unfused
    entries = {"unfused": (unfused, "eager"), "fused": (fused, "eager"), "onnxruntime": (fused, "onnxruntime")}
    ms, stable, spread = compare_latency(entries, img_size, threads)
    where = f"batch 1 at {img_size} px, {threads} threads, median of 3 alternating rounds"
    if stable:
        speedup = ms["unfused"] / ms["fused"]
        timing = (
            f"PyTorch unfused {ms['unfused']:.1f} ms, fused {ms['fused']:.1f} ms ({speedup:.1f}x faster); "
            f"onnxruntime fused {ms['onnxruntime']:.2f} ms"
        )
    else:
        timing = (
            f"not measured reliably, the machine was busy (round medians up to {100 * spread:.0f} % apart): "
            f"roughly unfused {ms['unfused']:.0f} ms, fused {ms['fused']:.0f} ms, onnxruntime fused "
            f"{ms['onnxruntime']:.0f} ms; rerun on a quiet machine, or see `mobileone bench`"
        )
    return [*report.summary().splitlines(), f"latency ({where}): {timing}"]
