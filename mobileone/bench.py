"""Latency on this machine, measured the way the paper argues it should be, with its analyses.

The paper's point (its Table 1) is that MACs and parameters predict latency poorly, so latency
has to be measured: MobileOne S0-S4 fused and unfused and the usual mobile peers, per runtime,
with min / median / p90 over many runs after a warm-up at a fixed thread count, the fraction of
the machine's measured fp32 peak each latency implies, the Spearman rank correlation of latency
with MACs and with params, and the two micro-studies on a 30-layer conv net: the cost of each
activation (its Table 2) and of skip connections and SE.
"""

from __future__ import annotations

import copy
import csv
import gc
import json
import math
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .complexity import count_macs, count_params
from .export import executorch_program, onnx_session, require, to_executorch, to_onnx
from .model import create_model, reparameterize_model

RUNTIMES = ("eager", "channels_last", "compile", "onnxruntime", "executorch")
WIDE_SPREAD = 0.15  # (median - min) / min above this marks a noisy measurement

# The paper's desktop CPU column (Xeon Gold 5118, ms, batch 1) and its MACs, for the README comparison.
PAPER_CPU_MS = {
    "mobileone_s0": 10.55,
    "mobileone_s1": 13.04,
    "mobileone_s2": 14.87,
    "mobileone_s3": 16.47,
    "mobileone_s4": 26.60,
    "mobilenet_v2": 13.65,
    "mobilenet_v3_large": 17.09,
    "mobilenet_v3_small": 10.38,
    "efficientnet_b0": 28.71,
}


@dataclass
class BenchModel:
    """A model to time: a name, a family for the plot, whether it is the deployed form, and a builder."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    deployed: bool = True  # False for MobileOne's train-time graph: left out of the correlations


def _mobileone(variant: str, fused: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = create_model(variant)
        if fused:  # fuse the train-time graph, as users do, rather than building the fused one directly
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = reparameterize_model(model.eval(), inplace=True)
        return model.eval()

    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None).eval()

    return build


def _timm(name: str, fuse: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        if fuse:
            from timm.utils.model import reparameterize_model as timm_reparameterize

            model = timm_reparameterize(model)
        return model.eval()

    return build


TORCHVISION_PEERS = (
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "mnasnet1_0",
)
TIMM_PEERS = {
    "timm/mobileone_s0": ("mobileone_s0", True),
    "timm/mobilenetv3_large_100": ("mobilenetv3_large_100", False),
    "timm/mobilenetv4_conv_small": ("mobilenetv4_conv_small", False),
    "timm/repvgg_a0": ("repvgg_a0", True),
}


def available_models() -> dict[str, BenchModel]:
    """Every model ``bench`` knows, built without weights (nothing is downloaded)."""
    models = {}
    for v in (f"mobileone_s{i}" for i in range(5)):
        models[v] = BenchModel(v, "MobileOne (fused)", _mobileone(v, True))
        models[f"{v}_unfused"] = BenchModel(f"{v}_unfused", "MobileOne (train-time graph)", _mobileone(v, False), False)
    for name in TORCHVISION_PEERS:
        models[name] = BenchModel(name, "torchvision", _torchvision(name))
    try:
        import timm  # noqa: F401

        for name, (timm_name, fuse) in TIMM_PEERS.items():
            models[name] = BenchModel(name, "timm", _timm(timm_name, fuse))
    except ImportError:
        pass
    return models


MODEL_GROUPS = {
    "mobileone": [f"mobileone_s{i}" for i in range(5)],
    "unfused": [f"mobileone_s{i}_unfused" for i in range(5)],
    "torchvision": list(TORCHVISION_PEERS),
    "timm": list(TIMM_PEERS),
}
# timm's models join the default set when timm is installed (resolve_models drops unknown names).
MODEL_GROUPS["default"] = MODEL_GROUPS["mobileone"] + MODEL_GROUPS["unfused"] + MODEL_GROUPS["torchvision"]
MODEL_GROUPS["default"] += MODEL_GROUPS["timm"]


def resolve_models(names: Iterable[str]) -> list[BenchModel]:
    """Model names or groups (``default``, ``mobileone``, ``unfused``, ``torchvision``, ``timm``, ``all``)."""
    known = available_models()
    groups = {**MODEL_GROUPS, "all": list(known)}
    out: list[BenchModel] = []
    for name in names:
        if name in groups:
            members = [n for n in groups[name] if n in known]
            if name == "timm" and not members:
                raise ValueError("the timm models need timm: pip install timm")
            out += [known[n] for n in members]
        elif name in known:
            out.append(known[name])
        else:
            raise ValueError(
                f"unknown benchmark model {name!r}; choose from groups {sorted(groups)} or {sorted(known)}"
            )
    return list({m.name: m for m in out}.values())


# ---------------------------------------------------------------------------- measuring


def time_calls(
    fn: Callable[[], Any], warmup: int = 10, iters: int = 30, min_time: float = 1.0, max_iters: int = 1000
) -> np.ndarray:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then at least ``iters`` timed ones and ``min_time`` s."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < iters or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return np.asarray(times)


def latency_stats(times: np.ndarray) -> dict[str, float]:
    """min / median / p90 in ms and the relative spread between min and median."""
    ms = times * 1e3
    lo, med = float(ms.min()), float(np.median(ms))
    return {
        "min_ms": lo,
        "median_ms": med,
        "p90_ms": float(np.percentile(ms, 90)),
        "runs": len(ms),
        "spread": (med - lo) / lo,
    }


def measure_peak_gflops(threads: int, size: int = 2048, seconds: float = 1.0) -> float:
    """This machine's fp32 matrix-multiply rate (GFLOP/s, best call) at ``threads`` threads: the peak to compare to."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    times = time_calls(lambda: torch.mm(a, b), warmup=2, iters=5, min_time=seconds)
    return 2 * size**3 / float(times.min()) / 1e9


def _runner(runtime: str, model: nn.Module, x: Tensor, threads: int, workdir: Path) -> Callable[[], Any]:
    """A no-argument callable running ``model`` on ``x`` with ``runtime``."""
    if runtime == "eager":
        return lambda: model(x)
    if runtime == "channels_last":
        m = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        return lambda: m(xc)
    if runtime == "compile":
        compiled = torch.compile(model)
        return lambda: compiled(x)
    if runtime == "onnxruntime":
        path = workdir / "model.onnx"  # one export with a dynamic batch serves every batch size
        if not path.exists():
            to_onnx(model, path, torch.cat([x[:1], x[:1]]), dynamic_batch=True)
        session = onnx_session(path, threads)
        feed = {session.get_inputs()[0].name: x.numpy()}
        return lambda: session.run(None, feed)
    if runtime == "executorch":
        require("executorch.runtime")
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
        path = workdir / f"model_{len(x)}.pte"
        to_executorch(model, path, x)
        method = executorch_program(path).load_method("forward")
        return lambda: method.execute([x])
    raise ValueError(f"unknown runtime {runtime!r}; choose from {RUNTIMES}")


def time_model(
    model: nn.Module,
    runtime: str,
    batch: int,
    img_size: int,
    threads: int,
    warmup: int,
    iters: int,
    min_time: float,
    workdir: Path | None = None,
) -> dict[str, float]:
    """Latency statistics of one model, runtime and batch size (eval mode, inference mode, fixed threads).

    Exported files go to ``workdir`` (a temporary folder by default), where later batch sizes reuse them.
    """
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="mobileone_bench_") as tmp, torch.inference_mode():
        if runtime in ("onnxruntime", "executorch"):  # exporters trace outside inference mode
            with torch.inference_mode(False):
                fn = _runner(runtime, model, x.clone(), threads, Path(workdir or tmp))
        else:
            fn = _runner(runtime, model, x, threads, Path(tmp))
        return latency_stats(time_calls(fn, warmup, iters, min_time))


# ---------------------------------------------------------------------------- the paper's analyses


def spearman(latency: Iterable[float], other: Iterable[float]) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value (the paper's Table 1 statistic)."""
    result = require("scipy.stats", "bench").spearmanr(list(latency), list(other))
    return float(result.statistic), float(result.pvalue)


class SqueezeExciteReLU(nn.Module):
    """SE (reduction 1/16, as in MobileOne-S4) followed by ReLU: the paper's "SE-ReLU" row."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        from .model import SqueezeExcite

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
            fn = _runner(runtime, net, x, threads, Path(tmp))
        with torch.inference_mode():
            return latency_stats(time_calls(fn, warmup, iters, min_time))


def _study(
    title: str,
    nets: dict[str, Callable[[], nn.Module]],
    runtime: str,
    threads: int,
    study: MicroStudy,
    warmup: int,
    iters: int,
    min_time: float,
) -> list[dict[str, Any]]:
    """Time each net of a study; ``relative`` is its median over the first net's."""
    rows = []
    for name, make in nets.items():
        torch.manual_seed(0)
        stats = _time_net(make(), study, runtime, threads, warmup, iters, min_time)
        rows.append({"study": title, "variant": name, "runtime": runtime, **stats})
    for r in rows:
        r["relative"] = r["median_ms"] / rows[0]["median_ms"]
    return rows


def activation_study(
    runtime: str = "eager",
    threads: int = 2,
    study: MicroStudy | None = None,
    warmup: int = 10,
    iters: int = 30,
    min_time: float = 1.0,
) -> list[dict[str, Any]]:
    """Latency of the 30-layer net with each activation (the paper's Table 2), relative to ReLU."""
    s = study or MicroStudy()
    nets = {name: (lambda name=name: ConvNet30(name, s.depth, s.width)) for name in ACTIVATIONS}
    return _study("activation", nets, runtime, threads, s, warmup, iters, min_time)


def skip_se_study(
    runtime: str = "eager",
    threads: int = 2,
    study: MicroStudy | None = None,
    warmup: int = 10,
    iters: int = 30,
    min_time: float = 1.0,
) -> list[dict[str, Any]]:
    """Latency of the 30-layer ReLU net plain, with a skip connection per layer, with SE per layer, with both."""
    s = study or MicroStudy()
    variants = {"plain": (False, False), "+ skip": (True, False), "+ SE": (False, True), "+ skip + SE": (True, True)}
    nets = {
        name: (lambda skip=skip, se=se: ConvNet30("ReLU", s.depth, s.width, skip=skip, se=se))
        for name, (skip, se) in variants.items()
    }
    return _study("skip/SE", nets, runtime, threads, s, warmup, iters, min_time)


# ---------------------------------------------------------------------------- the benchmark


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
    studies: bool = True
    micro: MicroStudy = field(default_factory=MicroStudy)
    peak_size: int = 2048  # side of the matrices whose product measures the fp32 peak

    def __post_init__(self) -> None:
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime(s) {unknown}; choose from {list(RUNTIMES)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if self.threads < 1 or self.img_size < 8 or self.iters < 1:
            raise ValueError("threads and iters must be >= 1 and img_size >= 8")


def versions() -> dict[str, str]:
    """Versions of torch and the runtimes, and the machine, recorded with every result."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "machine": _cpu_name()}
    for pkg in ("torch", "torchvision", "onnxruntime", "executorch", "timm", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    bar = tqdm(total=len(models) * len(cfg.runtimes), disable=not progress, desc="bench", unit="run")
    for bm in models:
        model = bm.build().eval()
        params, macs = count_params(model), count_macs(model, cfg.img_size)
        for runtime in cfg.runtimes:
            bar.set_postfix_str(f"{bm.name} / {runtime}")
            row: dict[str, Any] = {
                "model": bm.name,
                "family": bm.family,
                "deployed": bm.deployed,
                "runtime": runtime,
                "params": params,
                "macs": macs,
            }
            workdir = Path(tempfile.mkdtemp(prefix="mobileone_bench_"))
            try:
                for b in sorted(cfg.batch_sizes):
                    # Large batches take long per call: fewer runs, still at least 3 and min_time seconds.
                    it, wu = (cfg.iters, cfg.warmup) if b == 1 else (max(3, cfg.iters // 5), max(1, cfg.warmup // 5))
                    stats = time_model(model, runtime, b, cfg.img_size, cfg.threads, wu, it, cfg.min_time, workdir)
                    row[f"bs{b}"] = stats
                    row[f"bs{b}"]["throughput"] = b / (stats["median_ms"] / 1e3)
                    row[f"bs{b}"]["peak_fraction"] = 2 * macs * b / (stats["median_ms"] / 1e3) / (peak * 1e9)
            except Exception as e:  # one failing runtime (e.g. an export) must not stop the run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                errors.append(f"{bm.name} / {runtime}: {row['error']}")
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            rows.append(row)
            bar.update()
            if runtime == "compile":
                torch._dynamo.reset()
        del model
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


# ---------------------------------------------------------------------------- reporting


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def results_markdown(result: dict[str, Any]) -> str:
    """The results as markdown: machine, main table, correlations, micro-studies, notes."""
    cfg, v = result["config"], result["versions"]
    bs = sorted(cfg["batch_sizes"])
    small, large = bs[0], bs[-1]
    lines = [
        f"# MobileOne latency benchmark ({result['date']})",
        "",
        f"Machine: {v.get('machine')}, {cfg['threads']} threads; measured fp32 peak "
        f"({cfg.get('peak_size', 2048)}^3 matmul) "
        f"{result['peak_gflops']:.0f} GFLOP/s. Input {cfg['img_size']}x{cfg['img_size']}, eval + inference mode, "
        f"random weights. Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "machine") + ".",
        "",
        f"| model | runtime | params M | MACs M | bs{small} min ms | median ms | p90 ms | "
        f"img/s at bs{large} | % peak bs{small} | % peak bs{large} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    noisy = []
    for r in result["rows"]:
        head = f"| {r['model']} | {r['runtime']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e6:.0f} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        s, lg = r[f"bs{small}"], r[f"bs{large}"]
        flag = " *" if s["spread"] > WIDE_SPREAD else ""
        if flag:
            noisy.append(f"{r['model']} / {r['runtime']} ({100 * s['spread']:.0f} %)")
        lines.append(
            f"{head} {s['min_ms']:.2f} | {s['median_ms']:.2f}{flag} | {s['p90_ms']:.2f} | "
            f"{lg['throughput']:.0f} | {100 * s['peak_fraction']:.1f} | {100 * lg['peak_fraction']:.1f} |"
        )
    lines += paper_table(result)
    if result["correlations"]:
        lines += [
            "",
            "Spearman rank correlation of latency with MACs and with params (deployed models only; "
            "the paper: mobile 0.47 / 0.30, desktop CPU 0.06 / 0.07):",
            "",
            "| runtime | models | batch | rho (MACs) | p | rho (params) | p |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in result["correlations"]:
            lines.append(
                f"| {c['runtime']} | {c['models']} | {c['batch']} | {_fmt(c['rho_macs'])} | "
                f"{_fmt(c['p_macs'], 3)} | {_fmt(c['rho_params'])} | {_fmt(c['p_params'], 3)} |"
            )
    if result["studies"]:
        m = cfg["micro"]
        lines += [
            "",
            f"{m['depth']}-layer 3x3 conv net, {m['width']} channels at {m['resolution']}x{m['resolution']}, "
            "batch 1 (activations: the paper's Table 2; skip connections and SE: their cost):",
            "",
            "| study | variant | runtime | median ms | p90 ms | relative |",
            "|---|---|---|---:|---:|---:|",
        ]
        for s in result["studies"]:
            lines.append(
                f"| {s['study']} | {s['variant']} | {s['runtime']} | {s['median_ms']:.2f} | "
                f"{s['p90_ms']:.2f} | {s['relative']:.2f}x |"
            )
    if noisy:
        lines += [
            "",
            f"Note: * marks a median more than {100 * WIDE_SPREAD:.0f} % above the minimum, a noisy machine: "
            + ", ".join(noisy)
            + ". Re-run on a quiet machine before quoting.",
        ]
    if any(r.get(k, {}).get("peak_fraction", 0) > 1 for r in result["rows"] for k in r if k.startswith("bs")):
        lines += [
            "",
            "Note: a fraction of peak above 100 % means that runtime's kernels outran the torch matmul "
            "that measures the peak (or the peak ran while the machine was busy).",
        ]
    for e in result["errors"]:
        lines.append(f"\nFailed: {e}")
    return "\n".join(lines) + "\n"


def paper_table(result: dict[str, Any]) -> list[str]:
    """Batch-1 median latency per runtime next to the paper's desktop CPU column (spec section 5)."""
    b = min(result["config"]["batch_sizes"])
    runtimes = list(dict.fromkeys(r["runtime"] for r in result["rows"]))
    by_model: dict[str, dict[str, float]] = {}
    for r in result["rows"]:
        if r["model"] in PAPER_CPU_MS and f"bs{b}" in r:
            by_model.setdefault(r["model"], {})[r["runtime"]] = r[f"bs{b}"]["median_ms"]
    if not by_model:
        return []
    where = f"here batch {b}, {result['config']['img_size']} px, {result['threads']} threads"
    lines = ["", f"Next to the paper's CPU column (Xeon Gold 5118, batch 1, 224 px; {where}):", "",
             "| model | " + " | ".join(f"{rt} ms" for rt in runtimes) + " | paper CPU ms |",
             "|---|" + "---:|" * (len(runtimes) + 1)]  # fmt: skip
    for model, lat in by_model.items():
        cells = " | ".join(f"{lat[rt]:.2f}" if rt in lat else "n/a" for rt in runtimes)
        lines.append(f"| {model} | {cells} | {PAPER_CPU_MS[model]:.2f} |")
    return lines


def write_results(result: dict[str, Any], out: Path) -> None:
    """results.md, results.csv, results.json and latency_vs_macs.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(results_markdown(result))
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    fields = [
        "model",
        "family",
        "deployed",
        "runtime",
        "params",
        "macs",
        "batch",
        "min_ms",
        "median_ms",
        "p90_ms",
        "runs",
        "spread",
        "throughput",
        "peak_fraction",
        "error",
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in result["rows"]:
            base = {k: r[k] for k in ("model", "family", "deployed", "runtime", "params", "macs")}
            if "error" in r:
                writer.writerow({**base, "error": r["error"]})
            for key in sorted(k for k in r if k.startswith("bs")):
                writer.writerow({**base, "batch": int(key[2:]), **r[key]})
        for s in result["studies"]:
            writer.writerow(
                {
                    "model": f"convnet30 {s['variant']}",
                    "family": s["study"],
                    "runtime": s["runtime"],
                    "batch": 1,
                    **{k: s[k] for k in ("min_ms", "median_ms", "p90_ms", "runs", "spread")},
                }
            )
    plot_latency_vs_macs(result, out / "latency_vs_macs.png")


def plot_latency_vs_macs(result: dict[str, Any], path: Path) -> None:
    """Latency against MACs per runtime, one marker per family: the paper's Figure 2 on this machine."""
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = min(result["config"]["batch_sizes"])
    runtimes = list(dict.fromkeys(r["runtime"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(runtimes), figsize=(6 * len(runtimes), 4.5), squeeze=False)
    markers = {"MobileOne (fused)": "o", "MobileOne (train-time graph)": "x", "torchvision": "s", "timm": "^"}
    for ax, runtime in zip(axes[0], runtimes, strict=True):
        rows = [r for r in result["rows"] if r["runtime"] == runtime and f"bs{b}" in r]
        for family in dict.fromkeys(r["family"] for r in rows):
            pts = [r for r in rows if r["family"] == family]
            ax.scatter(
                [r["macs"] / 1e6 for r in pts],
                [r[f"bs{b}"]["median_ms"] for r in pts],
                marker=markers.get(family, "D"),
                label=family,
            )
            for r in pts:
                ax.annotate(
                    r["model"].replace("mobileone_", "").replace("_unfused", "*"),
                    (r["macs"] / 1e6, r[f"bs{b}"]["median_ms"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        corr = next((c for c in result["correlations"] if c["runtime"] == runtime), None)
        title = f"{runtime}, batch {b}, {result['threads']} threads"
        if corr:
            title += f"\nSpearman rho: MACs {_fmt(corr['rho_macs'])}, params {_fmt(corr['rho_params'])}"
        ax.set(xlabel="MACs (M)", ylabel="median latency (ms)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- the demo's deployment step


def deployment_report(model: nn.Module, out_dir: str | Path, img_size: int = 224, threads: int = 2) -> list[str]:
    """Export a trained MobileOne to ONNX (checked with onnxruntime) and time it: PyTorch vs onnxruntime.

    Used by ``mobileone demo``; returns printable lines. The ONNX file keeps the model's own input
    size; the latencies are at ``img_size`` (batch 1), fused graph in both runtimes.
    """
    from .export import export_model

    try:
        report = export_model(model, Path(out_dir) / "model.onnx", "onnx", dynamic_batch=True)
    except ImportError as e:
        return [f"ONNX export skipped: {e}"]
    fused = reparameterize_model(model.eval()) if not getattr(model, "inference_mode", True) else model.eval()
    kw = {"batch": 1, "img_size": img_size, "threads": threads, "warmup": 5, "iters": 20, "min_time": 0.5}
    eager, ort = time_model(fused, "eager", **kw), time_model(fused, "onnxruntime", **kw)
    return [
        *report.summary().splitlines(),
        f"latency of the fused model, batch 1 at {img_size} px, {threads} threads (median of >= 20 runs): "
        f"PyTorch {eager['median_ms']:.2f} ms, onnxruntime {ort['median_ms']:.2f} ms "
        f"({eager['median_ms'] / ort['median_ms']:.1f}x)",
    ]
