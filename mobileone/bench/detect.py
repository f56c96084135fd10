"""Detector latency: SSDLite on MobileOne against the same SSDLite on MobileNetV3-Large, at 320 px, batch 1.

For each detector: unfused (train-time graph, eval mode) and fused, without NMS (``forward_raw``,
the raw ONNX form) and with it (eager post-processing, the NMS ONNX form), in eager PyTorch and in
onnxruntime. Entries are timed in alternating rounds (every entry once per round), so a machine
that gets busier part-way slows all of them alike; the report flags unstable rounds.

Random weights unless ``checkpoint`` is given: every candidate then passes the 0.001 score
threshold, the worst case for NMS; a trained detector keeps far fewer candidates.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.complexity import count_macs, count_params
from ..deploy.common import package_version, require
from ..deploy.detect import NMS_FORMATS, RAW_OUTPUTS, RawDetector, export_detector, fused_detector
from ..deploy.onnx import onnx_session, to_onnx
from ..deploy.onnx_nms import add_nms
from ..deploy.targets import TARGETS, load_export
from ..tasks.detect.model import Detector, create_detector, load_detector
from .report import save_result
from .timing import alternate_rounds, cpu_name

DEFAULT_MODELS = ("tal_s0", "tal_mnv3", "ssdlite_s0", "ssdlite_mnv3")
# Exported runtimes time the fused raw form (and the NMS form where the runtime has the operator).
TARGET_OF = {"executorch": "executorch", "litert": "tflite", "openvino": "openvino", "ncnn": "ncnn"}
RUNTIMES = ("eager", "onnxruntime", *TARGET_OF)
STABLE_ROUNDS = 0.15  # round medians of one entry further apart than this mark the run as noisy


@dataclass
class DetectionBenchConfig:
    """What to time and how; the defaults are ``mobileone bench --task detect``'s."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    runtimes: list[str] = field(default_factory=lambda: list(RUNTIMES))
    img_size: int = 320
    num_classes: int = 80
    threads: int = 2
    warmup: int = 5
    iters: int = 20
    min_time: float = 0.5
    rounds: int = 3
    checkpoints: dict[str, str] = field(default_factory=dict)  # model name -> trained detector to time instead
    out: str = "bench_results"

    def __post_init__(self) -> None:
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"detection latency runs on {list(RUNTIMES)}, not {unknown}")
        if self.threads < 1 or self.iters < 1 or self.rounds < 1 or not 32 <= self.img_size <= 4096:
            raise ValueError("threads, iters and rounds must be >= 1 and img_size in 32..4096")


def _detector(name: str, cfg: DetectionBenchConfig) -> Detector:
    if name in cfg.checkpoints:
        return load_detector(cfg.checkpoints[name])
    torch.manual_seed(0)
    return create_detector(name, cfg.num_classes, cfg.img_size).eval()


def _entries(name: str, model: Detector, cfg: DetectionBenchConfig, x: torch.Tensor, workdir: Path) -> dict:
    """``(model, fused, nms, runtime) -> callable`` for one detector."""
    fused, _ = fused_detector(model)
    out: dict[tuple, Callable[[], Any]] = {}
    for runtime in [r for r in cfg.runtimes if r in TARGET_OF]:
        fmt = TARGET_OF[runtime]
        for nms in (False, True) if fmt in NMS_FORMATS else (False,):
            path = workdir / TARGETS[fmt].file_name(f"{name}_{'nms' if nms else 'raw'}")
            export_detector(fused, path, "nms" if nms else "raw", fmt, check=False)
            run = load_export(fmt, path, cfg.threads)
            out[(name, True, nms, runtime)] = lambda run=run: run(x)
    for is_fused, m in ((False, model.eval()), (True, fused)):
        if "eager" in cfg.runtimes:
            out[(name, is_fused, False, "eager")] = lambda m=m: m.forward_raw(x)
            out[(name, is_fused, True, "eager")] = lambda m=m: m(x)
        if "onnxruntime" in cfg.runtimes:
            for nms in (False, True):
                path = workdir / f"{name}_{'fused' if is_fused else 'unfused'}_{'nms' if nms else 'raw'}.onnx"
                if is_fused:
                    export_detector(m, path, "nms" if nms else "raw", check=False)
                else:  # the train-time graph as it is: what shipping an unfused model costs
                    _export_unfused(m, path, nms)
                session = onnx_session(path, cfg.threads)
                feed = {session.get_inputs()[0].name: x.numpy()}
                out[(name, is_fused, nms, "onnxruntime")] = lambda s=session, f=feed: s.run(None, f)
    return out


def _export_unfused(model: Detector, path: Path, nms: bool) -> None:
    onnx = require("onnx")
    example = torch.zeros(1, 3, model.config.img_size, model.config.img_size)
    with torch.no_grad():
        to_onnx(RawDetector(model.eval()).eval(), path, example, output_names=RAW_OUTPUTS)
        points = int(model.forward_raw(example)[0].shape[1])
    if nms:
        proto, c = onnx.load(str(path)), model.config
        add_nms(
            proto,
            points,
            c.num_classes,
            c.topk_candidates,
            c.nms_thresh,
            c.score_thresh,
            c.max_detections,
        )
        onnx.save(proto, str(path))


def alternate_medians(
    runners: dict[Any, Callable[[], Any]], rounds: int = 3, warmup: int = 5, iters: int = 20, min_time: float = 0.5
) -> tuple[dict[Any, list[float]], dict[Any, float]]:
    """Median (ms) of every runner in each of ``rounds`` alternating rounds, and each runner's fastest call (ms)."""
    times = alternate_rounds(runners, rounds, warmup, iters, min_time)
    medians = {k: [float(np.median(t)) * 1e3 for t in v] for k, v in times.items()}
    return medians, {k: min(float(t.min()) for t in v) * 1e3 for k, v in times.items()}


def detection_benchmark(cfg: DetectionBenchConfig) -> dict[str, Any]:
    """Time every detector, graph, post-processing and runtime; write ``detect_results.md`` / ``.json``."""
    torch.set_num_threads(cfg.threads)
    x = torch.randn(1, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    sizes, runners = {}, {}
    with tempfile.TemporaryDirectory(prefix="mobileone_detbench_") as tmp:
        for name in cfg.models:
            model = _detector(name, cfg)
            fused, _ = fused_detector(model)
            sizes[name] = {
                "params_unfused": count_params(model),
                "params_fused": count_params(fused),
                "macs_unfused": count_macs(model, cfg.img_size),
                "macs_fused": count_macs(fused, cfg.img_size),
                "trained": name in cfg.checkpoints,
            }
            with torch.no_grad():
                runners.update(_entries(name, model, cfg, x, Path(tmp)))
        medians, minima = alternate_medians(runners, cfg.rounds, cfg.warmup, cfg.iters, cfg.min_time)
    rows = [
        {
            "model": k[0],
            "fused": k[1],
            "nms": k[2],
            "runtime": k[3],
            "median_ms": float(np.median(v)),
            "min_ms": minima[k],
            "round_spread": max(v) / min(v) - 1,
            **sizes[k[0]],
        }
        for k, v in medians.items()
    ]
    spread = max(r["round_spread"] for r in rows)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": asdict(cfg),
        "machine": cpu_name(),
        "versions": {"torch": torch.__version__, "onnxruntime": package_version("onnxruntime")},
        "stable": spread <= STABLE_ROUNDS,
        "max_round_spread": spread,
        "rows": rows,
    }
    save_result(cfg.out, "detect_results", result, results_markdown(result))
    return result


def results_markdown(result: dict[str, Any]) -> str:
    """One table: a row per detector and graph, columns per runtime, without and with NMS."""
    cfg = result["config"]
    trained = any(r["trained"] for r in result["rows"])
    lines = [
        f"# SSDLite latency ({result['date']})",
        "",
        f"{result['machine']}, {cfg['threads']} threads, batch 1 at {cfg['img_size']} px, {cfg['num_classes']} "
        f"classes; median of {cfg['rounds']} alternating rounds (each >= {cfg['iters']} runs and {cfg['min_time']} s)."
        f" torch {result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']}. "
        + ("Some detectors are trained checkpoints. " if trained else "Random weights (NMS: worst case). ")
        + (
            ""
            if result["stable"]
            else f"UNSTABLE: round medians differed by up to "
            f"{100 * result['max_round_spread']:.0f} %; rerun on a quiet machine."
        ),
        "",
    ]
    runtimes = [r for r in RUNTIMES if r in cfg["runtimes"]]
    head = " | ".join(f"{rt} {'+ NMS' if nms else 'raw'} ms" for rt in runtimes for nms in (False, True))
    lines += [f"| detector | graph | params M | MACs M | {head} |", "|---|---|---:|---:|" + "---:|" * 2 * len(runtimes)]
    index = {(r["model"], r["fused"], r["nms"], r["runtime"]): r for r in result["rows"]}
    for name in cfg["models"]:
        for fused in (False, True):
            any_row = next(r for r in result["rows"] if r["model"] == name)
            params = any_row["params_fused" if fused else "params_unfused"] / 1e6
            macs = any_row["macs_fused" if fused else "macs_unfused"] / 1e6
            cells = [
                f"{index[(name, fused, nms, rt)]['median_ms']:.2f}" if (name, fused, nms, rt) in index else "n/a"
                for rt in runtimes
                for nms in (False, True)
            ]
            lines.append(
                f"| {name} | {'fused' if fused else 'unfused'} | {params:.2f} | {macs:.0f} | {' | '.join(cells)} |"
            )
    return "\n".join(lines) + "\n"
