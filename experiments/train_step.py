"""Train-step throughput and peak memory: fast train-mode MobileOne against the per-branch reference.

    python experiments/train_step.py [--models s0,s1] [--configs 32x224,128x64] [--steps N]
                                    [--threads 2] [--device cpu|cuda] [--amp none|bf16|fp16]
                                    [--impls reference,fast,timm]
    python experiments/train_step.py --layers [--models s0] [--configs 32x224]   # per layer type

A step is forward + cross-entropy + backward + SGD (momentum 0.9) on random images. Each
(model, impl, config) runs in a fresh subprocess, so peak memory is that run's own: on CPU the
process's peak resident set size (``getrusage`` ``ru_maxrss``) and its growth over the RSS just
before the first step (model, optimizer and input already built); on CUDA
``torch.cuda.max_memory_allocated``. Besides wall-clock images/s the table gives images per second
of process CPU time, which a CPU shared with other jobs distorts less. ``timm`` is timm's
``mobileone_s*`` (per-branch, as Apple's code) when timm is installed. ``--layers`` times
forward + backward of each distinct layer of the train-time graph under each formulation of
``mobileone.fast_train`` (what ``plan`` is based on).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mobileone  # noqa: E402
from mobileone.core import fast_train  # noqa: E402
from mobileone.core.config import resolve_variant  # noqa: E402


def parse_config(text: str) -> tuple[int, int]:
    """``"32x224"`` -> (batch 32, 224 px)."""
    try:
        batch, px = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"config {text!r} must be BATCHxPIXELS, e.g. 32x224") from None
    return batch, px


def build(model_name: str, impl: str, device: str) -> torch.nn.Module:
    if impl == "timm":
        import timm

        return timm.create_model(resolve_variant(model_name), num_classes=1000).to(device)
    model = mobileone.create_model(model_name, num_classes=1000).to(device)
    return mobileone.set_fast_train(model, impl == "fast")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_train_step(
    model: torch.nn.Module,
    batch: int,
    px: int,
    device: str,
    warmup: int,
    steps: int,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict:
    """Warm-up steps, then timed steps of ``model`` (1000 classes); returns images/s and peak memory.

    ``amp`` runs forward and loss under autocast in that dtype; ``channels_last`` puts model and
    input in that memory format. Peak memory is the process's on CPU (run one model per process).
    """
    model = model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, px, px, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    device_type = torch.device(device).type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    rss_before = rss_mb()
    for _ in range(warmup):
        step()
    sync(device_type)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync(device_type)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if device_type == "cuda":
        peak, growth = torch.cuda.max_memory_allocated() / 2**20, float("nan")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        growth = peak - rss_before
    images = batch * steps
    speed = {"images_per_s": images / seconds, "images_per_cpu_s": images / cpu_seconds}
    return {**speed, "peak_mb": peak, "growth_mb": growth}


def worker(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process: images/s and peak memory."""
    torch.manual_seed(0)
    batch, px = args.config
    model = build(args.model, args.impl, args.device)
    return measure_train_step(model, batch, px, args.device, args.warmup, args.steps, AMP[args.amp])


def run_one(model: str, impl: str, config: str, args: argparse.Namespace) -> dict:
    batch, px = parse_config(config)
    steps = max(1, args.steps // 2) if px >= 160 and args.device == "cpu" and args.halve_large else args.steps
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--models",
        model,
        "--impls",
        impl,
        "--configs",
        config,
        "--steps",
        str(steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--amp",
        args.amp,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{model}/{impl}/{config} failed:\n{proc.stderr[-2000:]}")
    return {"model": model, "impl": impl, "config": config, "steps": steps, **json.loads(proc.stdout.splitlines()[-1])}


def print_table(rows: list[dict], device: str) -> None:
    mem = "peak GPU alloc MB" if device == "cuda" else "peak RSS MB (growth)"
    print(f"| model | impl | batch x px | steps | images/s | speedup | images/CPU-s | speedup (CPU) | {mem} |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    ref = {(r["model"], r["config"]): r for r in rows if r["impl"] == "reference"}
    for r in rows:
        base = ref[r["model"], r["config"]]
        m = f"{r['peak_mb']:,.0f}" + ("" if device == "cuda" else f" ({r['growth_mb']:,.0f})")
        cells = [
            r["model"],
            r["impl"],
            r["config"],
            r["steps"],
            f"{r['images_per_s']:.1f}",
            f"{r['images_per_s'] / base['images_per_s']:.2f}x",
            f"{r['images_per_cpu_s']:.1f}",
            f"{r['images_per_cpu_s'] / base['images_per_cpu_s']:.2f}x",
            m,
        ]
        print("| " + " | ".join(map(str, cells)) + " |")


def layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, mobileone.MobileOneLayer, tuple, int]]:
    """Each distinct (layer config, input shape) of the model: a layer that has it, and how many do."""
    seen: dict[tuple, list] = {}

    def record(name: str, mod: mobileone.MobileOneLayer, inp: tuple) -> None:
        key = (mod.extra_repr(), mod.rbr_skip is not None, tuple(inp[0].shape))
        seen.setdefault(key, [name, mod, key[2], 0])[3] += 1

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, mobileone.MobileOneLayer):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: record(name, mod, inp)))
    with torch.no_grad(), fast_train.reference_mode():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return [tuple(v) for v in seen.values()]


def time_methods(layer: mobileone.MobileOneLayer, shape: tuple, methods: list[str], reps: int) -> dict[str, float]:
    """Forward + backward CPU ms of ``branch_sum`` per method: interleaved, best of ``reps``.

    Process CPU time rather than wall time, since a shared CPU makes wall time noisy; run it with
    ``--threads 1`` for the cleanest comparison (with more threads, spin-waiting inflates it).
    """
    x = torch.randn(shape, requires_grad=True)
    layer.train()
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(reps + 1):  # the first round warms up
        for method in methods:
            start = time.process_time()
            fast_train.branch_sum(layer, x, method).sum().backward()
            best[method] = min(best[method], (time.process_time() - start) * 1000)
    return best


def layers_table(args: argparse.Namespace) -> None:
    for model_name in args.models:
        for batch, px in args.configs:
            model = mobileone.create_model(model_name)
            print(f"\n{model_name}, batch {batch} x {px} px: forward + backward ms per layer, best of {args.reps}")
            print("| layer | input | k | layers alike | reference | concat | fold | plan |")
            print("|---|---|---:|---:|---:|---:|---:|---|")
            for name, layer, shape, count in layer_inputs(model, torch.randn(batch, 3, px, px)):
                ms = time_methods(layer, shape, ["reference", "concat", "fold"], args.reps)
                dw = "dw" if layer.groups > 1 else "dense"
                kind = f"{layer.kernel_size}x{layer.kernel_size} {dw} s{layer.stride}"
                kind += " +skip" if layer.rbr_skip is not None else ""
                cells = " | ".join(f"{ms[m]:.1f}" if m in ms else "-" for m in ("reference", "concat", "fold"))
                size = "x".join(map(str, shape[1:]))
                chosen = fast_train.plan(layer, torch.empty(shape, device="meta"))
                print(f"| {name} {kind} | {size} | {layer.k} | {count} | {cells} | {chosen} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="s0,s1", type=lambda s: s.split(","), help="comma-separated variants")
    p.add_argument("--configs", default="32x224,128x64", type=lambda s: [parse_config(c) for c in s.split(",")])
    p.add_argument("--impls", default="reference,fast,timm", type=lambda s: s.split(","))
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternate the implementations this often, keep the best")
    p.add_argument("--halve-large", action="store_true", help="on CPU, half the steps for images >= 160 px")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=tuple(AMP), help="autocast dtype of forward and loss")
    p.add_argument("--layers", action="store_true", help="per-layer-type timings of each formulation instead")
    p.add_argument("--reps", type=int, default=3, help="repetitions per layer timing (--layers)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available; use --device cpu")
    bad = set(args.impls) - {"reference", "fast", "timm"}
    if bad:
        p.error(f"unknown --impls {sorted(bad)}; choose from reference, fast, timm")
    if args.worker:
        args.model, args.impl, args.config = args.models[0], args.impls[0], args.configs[0]
        print(json.dumps(worker(args)))
        return
    if args.layers:
        layers_table(args)
        return
    impls = list(args.impls)
    if "timm" in impls:
        try:
            import timm  # noqa: F401
        except ImportError:
            impls.remove("timm")
            print("timm is not installed: its rows are left out", file=sys.stderr)
    if "reference" not in impls:
        impls.insert(0, "reference")
    rows = []
    print(f"# {args.device}, {args.threads} threads, torch {torch.__version__}", file=sys.stderr)
    for model in args.models:
        for batch, px in args.configs:
            best: dict[str, dict] = {}
            for _ in range(args.rounds):  # alternate the implementations; keep each one's best round
                for impl in impls:
                    row = run_one(model, impl, f"{batch}x{px}", args)
                    print(json.dumps(row), file=sys.stderr)
                    if impl not in best or row["images_per_s"] > best[impl]["images_per_s"]:
                        best[impl] = row
            rows += [best[impl] for impl in impls]
    print_table(rows, args.device)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
