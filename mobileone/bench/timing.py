"""Timing: repeated calls after a warm-up at fixed threads, per runtime (eager, channels_last, compile,
onnxruntime, ExecuTorch, LiteRT, OpenVINO, ncnn), alternating rounds that expose a busy machine, and
the machine's measured fp32 peak to compare against."""

from __future__ import annotations

import copy
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..deploy.executorch import executorch_method, set_threads, to_executorch
from ..deploy.int8 import RUNTIMES as INT8_RUNTIMES
from ..deploy.int8 import Graph, Recipe, quantize_graph
from ..deploy.onnx import onnx_session, to_onnx
from ..deploy.targets import TARGETS, load_export, write_export


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), recorded with every timing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The runtimes apps embed, each timed on the file its export target writes (float32 weights and math).
DEVICE_TARGETS = {"litert": "tflite", "openvino": "openvino", "ncnn": "ncnn"}
RUNTIMES = ("eager", "channels_last", "compile", "onnxruntime", "executorch", *DEVICE_TARGETS)
EXPORTED = ("onnxruntime", "executorch", *DEVICE_TARGETS)  # runtimes that time an exported file
BATCH1_ONLY = tuple(r for r, f in DEVICE_TARGETS.items() if TARGETS[f].per_image)  # LiteRT and ncnn: batch 1
WIDE_SPREAD = 0.15  # (median - min) / min above this marks a noisy measurement


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


def make_runner(
    runtime: str, model: nn.Module, x: Tensor, threads: int, workdir: Path, precision: str = "fp32"
) -> Callable[[], Any]:
    """A no-argument callable running ``model`` on ``x`` with ``runtime`` (``precision`` int8: its INT8 file)."""
    if precision == "int8":
        return int8_runner(runtime, model, x, threads, workdir)
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
        set_threads(threads)
        path = workdir / f"model_{len(x)}.pte"
        to_executorch(model, path, x)
        method = executorch_method(path)
        return lambda: method.execute([x])
    if runtime in DEVICE_TARGETS:
        if len(x) > 1 and runtime in BATCH1_ONLY:
            raise ValueError(f"{runtime} runs batch 1 only")
        format = DEVICE_TARGETS[runtime]
        path = workdir / TARGETS[format].file_name(f"model_{len(x)}")
        if not path.exists():
            write_export(format, model, path, x, {"task": "bench"}, "none", ["output"])
        run = load_export(format, path, threads)
        return lambda: run(x)
    raise ValueError(f"unknown runtime {runtime!r}; choose from {RUNTIMES}")


def int8_runner(runtime: str, model: nn.Module, x: Tensor, threads: int, workdir: Path) -> Callable[[], Any]:
    """The runtime's own static INT8 of ``model`` (calibrated on random images: latency does not depend on it)."""
    if runtime not in INT8_RUNTIMES or runtime == "ncnn":
        raise ValueError(f"no INT8 path for {runtime}; INT8 runs in {[r for r in INT8_RUNTIMES if r != 'ncnn']}")
    meta = {"task": "bench", "mean": [0.0] * 3, "std": [1.0] * 3, "input_size": list(x.shape[1:])}
    graph = Graph("classify", model, x[:1], ["output"], meta)
    calibration = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    format = INT8_RUNTIMES[runtime]
    path = quantize_graph(runtime, graph, calibration, workdir / TARGETS[format].file_name("int8"), Recipe())
    run = load_export(format, path, threads)
    if len(x) > 1 and TARGETS[format].per_image:
        raise ValueError(f"{runtime} runs batch 1 only")
    return lambda: run(x)


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
        if runtime in EXPORTED:  # exporters trace outside inference mode
            with torch.inference_mode(False):
                fn = make_runner(runtime, model, x.clone(), threads, Path(workdir or tmp))
        else:
            fn = make_runner(runtime, model, x, threads, Path(tmp))
        return latency_stats(time_calls(fn, warmup, iters, min_time))


STABLE_ROUNDS = 0.25  # round medians further apart than this: the machine was busy, the numbers are not quotable


def compare_latency(
    entries: dict[str, tuple[nn.Module, str]],
    img_size: int = 224,
    threads: int = 2,
    rounds: int = 3,
    iters: int = 10,
    min_time: float = 0.3,
) -> tuple[dict[str, float], bool, float]:
    """Batch-1 median latency (ms) of several ``name: (model, runtime)`` entries, timed in alternating rounds.

    Alternating rounds expose a busy machine: when one entry's round medians differ by more than
    ``STABLE_ROUNDS`` the result is flagged unstable. Returns the medians, the verdict and the
    largest round-to-round spread.
    """
    torch.set_num_threads(threads)
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    medians: dict[str, list[float]] = {name: [] for name in entries}
    with tempfile.TemporaryDirectory(prefix="mobileone_bench_") as tmp, torch.inference_mode():
        runners = {}
        for i, (name, (model, runtime)) in enumerate(entries.items()):
            workdir = Path(tmp) / str(i)
            workdir.mkdir()
            with torch.inference_mode(runtime not in EXPORTED):
                runners[name] = make_runner(runtime, model.eval(), x.clone(), threads, workdir)
        for r in range(rounds):
            for name, fn in runners.items():
                times = time_calls(fn, warmup=3 if r == 0 else 1, iters=iters, min_time=min_time)
                medians[name].append(float(np.median(times)) * 1e3)
    spread = max(max(ms) / min(ms) - 1 for ms in medians.values())
    return {name: float(np.median(ms)) for name, ms in medians.items()}, spread <= STABLE_ROUNDS, spread


def alternate_rounds(
    runners: dict[Any, Callable[[], Any]], rounds: int = 3, warmup: int = 5, iters: int = 20, min_time: float = 0.5
) -> dict[Any, list[np.ndarray]]:
    """Seconds per call of every runner in each of ``rounds`` rounds, each round timing every runner once.

    Alternating exposes a machine that gets busy part-way: it slows every runner alike, and the
    spread of one runner's round medians shows it.
    """
    times: dict[Any, list[np.ndarray]] = {k: [] for k in runners}
    with torch.inference_mode():
        for r in range(rounds):
            for key, fn in runners.items():
                times[key].append(time_calls(fn, warmup if r == 0 else 1, iters, min_time))
    return times


def round_stats(rounds: list[np.ndarray]) -> dict[str, float]:
    """:func:`latency_stats` over all rounds' calls, the median of the round medians, and their spread."""
    medians = [float(np.median(t)) * 1e3 for t in rounds]
    stats = latency_stats(np.concatenate(rounds))
    stats["median_ms"] = float(np.median(medians))
    stats["round_spread"] = max(medians) / min(medians) - 1
    stats["rounds"] = len(rounds)
    return stats
