"""GPU readiness: every CUDA path of mobileone proved in one run of about five minutes on one GPU.

    python experiments/gpu_check.py --device cuda --out gpu_check        # on the GPU machine
    python experiments/gpu_check.py --device cpu --quick --out /tmp/gc   # the dry run the test suite runs
    python experiments/gpu_check.py --device cuda --out gpu_check --only 'train_s1_*,ddp'   # rerun some steps

It needs a CUDA build of torch: PyPI's Linux x86_64 wheels of torch are CUDA builds, so ``make install``
on a GPU machine gives one (``python -c "import torch; print(torch.version.cuda, torch.cuda.is_available())"``
must print a CUDA version and ``True``). docs/gpu.md says what each step proves and how to read the result.

Each step records pass, fail or skip with a message, and a failing step never stops the others: its
exception is caught and recorded, and after a CUDA error the remaining steps run in child processes,
away from the broken CUDA context. ``gpu_check.json`` is rewritten after every step, so a run cut short
keeps what it did; ``gpu_check.md`` holds the same as tables. Steps run in the order below under a total
``--budget-s`` and a cap each (compilation and DDP in child processes that are killed at their cap);
what no longer fits is skipped. The exit code is 1 when any check failed.

- ``environment``: torch, CUDA, cuDNN, NCCL, bf16 support, the card, onnxruntime's providers.
- ``equivalence_<model>``: the fast train path against the per-branch reference on the device, from the
  same weights and inputs (outputs, input and parameter gradients, BatchNorm running statistics): float64
  within 1e-6; float32 with TF32 off, contiguous and channels_last, within max(5e-4, 4x the reference's
  error) of float64; bf16 and fp16 autocast within max(2e-2, 2x the reference's error) of float32; and
  eval mode, the fused model against the unfused one (float64 1e-9, float32 1e-4).
- ``train_<model>_<mode>``: the training engine (what ``mobileone train`` runs) for 20 steps on a
  4-class folder of noisy colours in fp32, bf16, fp16 with GradScaler, channels_last with bf16 (the
  engine's CUDA default) and compile (that plus ``torch.compile``). Every loss must be finite and the
  last third's mean below 0.9x the first third's; the epoch's fused evaluation and checkpoints run too.
- ``pinned_loader``: the engine's training loader hands out pinned batches from worker processes.
- ``ddp``: a 1-process ``torchrun`` (NCCL on CUDA, gloo on CPU): two DDP steps change the weights and
  statistics as two plain steps do, with BatchNorm and (CUDA) SyncBatchNorm; on CUDA SyncBatchNorm's
  synchronised function (its CUDA kernels and an NCCL all-gather, which ``nn.SyncBatchNorm`` skips in
  a world of one) equals ``batch_norm``.
- ``train_detect``, ``train_segment``: a short run of each task on its built-in data, when the task exists.
- ``bench_train_step``: images/s and peak ``max_memory_allocated`` of a bf16 train step at batch 256 x
  224 px of S0 fast, S0 per-branch reference, timm's ``mobileone_s0`` and torchvision's MobileNetV2,
  channels_last and contiguous (``measure_train_step`` of experiments/train_step.py).
- ``bench_latency``: inference latency (fp32, batch 1 and 64) of fused S0-S4 and peers, eager and in
  onnxruntime's CUDA provider when onnxruntime-gpu is installed (its output checked against PyTorch's).
- ``train_<model>_compile``, ``bench_latency_compile``: last, since compiling takes the longest.

The speed targets (S0 fast at least 1.5x the reference and faster than timm's ``mobileone_s0``, with
lower peak memory than both) are reported, not checked: they do not change the exit code.
``--quick`` shrinks everything (a tiny MobileOne, 32 px, a few steps, one timing repetition, one
thread) and compiles with dynamo's ``aot_eager`` backend, which traces the graphs, backward included,
but skips inductor's code generation (minutes on a CPU); the test suite runs it with ``--device cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import functools
import gc
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import mobileone  # noqa: E402
from mobileone.core.config import MobileOneConfig  # noqa: E402
from mobileone.core.files import atomic_write  # noqa: E402

# The dry run's MobileOne: every layer type (SE, k > 1, scale and skip branches) at a few channels.
TINY = MobileOneConfig(
    widths=(8, 16, 24, 32), stem_width=8, blocks=(1, 2, 2, 1), k=(2, 2, 3, 1), se_blocks=(0, 0, 1, 1)
)
# Engine options per training mode; contiguous unless named (the engine's CUDA default is channels_last).
TRAIN_MODES: dict[str, dict[str, Any]] = {
    "fp32": {"amp": "none", "channels_last": False},
    "bf16": {"amp": "bf16", "channels_last": False},
    "fp16": {"amp": "fp16", "channels_last": False},
    "channels_last": {"amp": "bf16", "channels_last": True},
    "compile": {"amp": "bf16", "channels_last": True, "compile": True},
}
LATENCY_PEERS = ("timm/mobileone_s0", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0")
FALL = 0.9  # the mean loss of a run's last third must be below this fraction of its first third's
TARGET_SPEEDUP = 1.5  # S0 fast train step over the per-branch reference


class Skip(Exception):
    """The step does not apply here (no CUDA, a task not in this version, the budget spent)."""


class CheckFailed(AssertionError):
    """A check's condition did not hold; the message says which and by how much."""


@dataclass
class Plan:
    """Sizes of everything the run does: the GPU run's, or ``--quick``'s for a CPU dry run."""

    models: list[str]
    train_px: int = 64
    train_batch: int = 32
    train_steps: int = 20
    train_lr: float = 0.02
    workers: int = 2
    eq_batch: int = 8
    eq_px: int = 64
    task_px: int | None = None  # None: the task's own size for its built-in data
    task_batch: int = 16
    task_steps: int = 20
    bench_batch: int = 256
    bench_px: int = 224
    bench_warmup: int = 3
    bench_steps: int = 10
    bench_formats: tuple[str, ...] = ("channels_last", "contiguous")
    lat_models: tuple[str, ...] = tuple(f"mobileone_s{i}" for i in range(5)) + LATENCY_PEERS
    lat_batches: tuple[int, ...] = (1, 64)
    lat_px: int = 224
    lat_warmup: int = 10
    lat_iters: int = 20
    lat_min_time: float = 0.3

    @classmethod
    def make(cls, quick: bool, models: list[str] | None) -> Plan:
        if not quick:
            return cls(models or ["s0", "s1"])
        return cls(
            models or ["tiny"],
            train_px=32,
            train_batch=16,
            train_steps=12,
            train_lr=0.2,
            workers=0,
            eq_batch=4,
            eq_px=32,
            task_px=64,
            task_batch=4,
            task_steps=3,
            bench_batch=4,
            bench_px=32,
            bench_warmup=1,
            bench_steps=1,
            bench_formats=("channels_last",),
            lat_models=("mobileone_s0",),
            lat_batches=(1,),
            lat_px=32,
            lat_warmup=1,
            lat_iters=1,
            lat_min_time=0.0,
        )


def model_options(name: str) -> dict[str, Any]:
    """Engine options naming a model of ``--models``: a variant, or ``tiny`` (the dry run's)."""
    return {"variant": "s0", "arch": TINY.to_dict()} if name == "tiny" else {"variant": name}


def build_mobileone(name: str, num_classes: int = 10) -> nn.Module:
    return mobileone.create_model(TINY if name == "tiny" else name, num_classes=num_classes)


@dataclass
class Context:
    """What a step sees: the device, the plan, its deadline, a scratch folder, and its details to fill."""

    device: torch.device
    plan: Plan
    quick: bool
    work: Path
    deadline: float
    details: dict[str, Any] = field(default_factory=dict)
    flush: Callable[[], None] = lambda: None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def note(self, **values: Any) -> None:
        """Add details and save them at once, so a step stopped at its cap keeps what it measured."""
        self.details.update(values)
        self.flush()

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Step:
    name: str
    fn: Callable[[Context], str]
    cap_s: float = 60.0  # the most this step may take
    min_s: float = 5.0  # skipped when less of the budget is left
    launcher: str | None = None  # None: in this process; "python" or "torchrun": a child process


# ---------------------------------------------------------------------------------------------- steps


def bf16_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 has no including_emulation and reports native support
        return torch.cuda.is_bf16_supported()


def _nccl_version() -> str | None:
    if not dist.is_nccl_available():
        return None
    version = torch.cuda.nccl.version()  # a tuple in current torch, an int in old releases
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def step_environment(ctx: Context) -> str:
    d = ctx.details
    d.update(
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        nccl_available=dist.is_nccl_available(),
        gloo_available=dist.is_gloo_available(),
        cpu_threads=torch.get_num_threads(),
    )
    for name in ("torchvision", "timm", "onnxruntime"):
        try:
            d[name] = __import__(name).__version__
        except ImportError:
            d[name] = None
    if d["onnxruntime"]:
        import onnxruntime

        d["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if not ctx.cuda:
        return f"CPU, torch {torch.__version__}, {d['cpu_threads']} threads"
    if torch.version.cuda is None:
        raise CheckFailed(
            f"torch {torch.__version__} is a CPU-only build; install a CUDA build (PyPI's Linux x86_64 "
            "wheels are: pip install torch, or make install)"
        )
    if not torch.cuda.is_available():
        raise CheckFailed(
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; check nvidia-smi, the "
            "driver and CUDA_VISIBLE_DEVICES"
        )
    props = torch.cuda.get_device_properties(ctx.device)
    d.update(
        gpu=props.name,
        capability=f"{props.major}.{props.minor}",
        gpu_memory_gib=props.total_memory / 2**30,
        multiprocessors=props.multi_processor_count,
        gpus=torch.cuda.device_count(),
        cudnn=torch.backends.cudnn.version(),
        bf16=bf16_supported(ctx.device),
        nccl=_nccl_version(),
    )
    a = torch.randn(512, 512, device=ctx.device)
    if not torch.allclose((a @ a).cpu(), a.cpu().double().matmul(a.cpu().double()).float(), rtol=1e-2, atol=1e-1):
        raise CheckFailed("a 512 x 512 matrix product on the GPU differs from the CPU's")
    return (
        f"{props.name} (sm {d['capability']}, {d['gpu_memory_gib']:.0f} GiB), torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, cuDNN {d['cudnn']}, NCCL {d['nccl']}"
    )


# --- the fast train path against the per-branch reference


def _randomize_bn(model: nn.Module) -> nn.Module:
    """BatchNorm scales and shifts away from PyTorch's 1 and 0, which would hide affine mistakes."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.5, 1.5, generator=gen))
                m.bias.copy_(torch.empty(m.bias.shape).normal_(0.0, 0.3, generator=gen))
    return model


def _forward_backward(model: nn.Module, inputs: list[Tensor], fast: bool, amp: torch.dtype | None) -> dict[str, Any]:
    """Every output, input gradient, parameter gradient (by name) and BN statistic of a few train-mode passes."""
    out: dict[str, Any] = {"outputs": [], "input gradients": [], "parameter gradients": {}}
    for i, x in enumerate(inputs):
        x = x.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if fast else mobileone.reference_mode():
            with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                y = model(x)
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(i)).to(x.device, torch.float64)
        (y.double() * weights).sum().backward()
        out["outputs"].append(y.detach())
        out["input gradients"].append(x.grad)
        out["parameter gradients"] |= {f"{n} {i}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    buffers = dict(model.named_buffers())
    out["running statistics"] = [b for n, b in buffers.items() if b.is_floating_point()]
    out["batches tracked"] = [int(b) for n, b in buffers.items() if n.endswith("num_batches_tracked")]
    out["statistic dtypes"] = sorted({str(b.dtype) for b in out["running statistics"]})
    return out


def _rel(a: list[Tensor], b: list[Tensor]) -> float:
    """Relative L2 error of a group of tensors: robust to single tensors that are pure rounding noise."""
    num = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b))
    den = sum(float(y.double().square().sum()) for y in b)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


GROUPS = ("outputs", "input gradients", "parameter gradients", "running statistics")


def _errors(run: dict[str, Any], anchor: dict[str, Any]) -> dict[str, float]:
    if run["parameter gradients"].keys() != anchor["parameter gradients"].keys():
        missing = sorted(anchor["parameter gradients"].keys() ^ run["parameter gradients"].keys())
        raise CheckFailed(f"the parameters with gradients differ: {missing[:5]}")
    if run["batches tracked"] != anchor["batches tracked"]:
        raise CheckFailed(
            f"num_batches_tracked differs: {run['batches tracked'][:5]} vs {anchor['batches tracked'][:5]}"
        )
    grads = (list(run["parameter gradients"].values()), list(anchor["parameter gradients"].values()))
    pairs = {
        "outputs": (run["outputs"], anchor["outputs"]),
        "input gradients": (run["input gradients"], anchor["input gradients"]),
        "parameter gradients": grads,
        "running statistics": (run["running statistics"], anchor["running statistics"]),
    }
    return {g: _rel(*pairs[g]) for g in GROUPS}


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """float32 comparisons at float32 precision: cuDNN convs default to TF32 (10-bit mantissas) on Ampere+."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _fusion_error(base: nn.Module, inputs: list[Tensor], device: torch.device, dtype: torch.dtype) -> float:
    """Eval mode on the device: the re-parameterized model against the unfused one (BN statistics from ``inputs``)."""
    model = copy.deepcopy(base).to(device, dtype).train()
    xs = [x.to(device, dtype) for x in inputs]
    with torch.no_grad():
        for x in xs:
            model(x)
        model.eval()
        fused = mobileone.reparameterize_model(model)
        return _rel([fused(x) for x in xs], [model(x) for x in xs])


def step_equivalence(model_name: str) -> Callable[[Context], str]:
    """float64 within 1e-6; float32 and autocast no further from the exact result than the reference; fusion."""

    def run(ctx: Context) -> str:
        torch.manual_seed(0)
        base = _randomize_bn(build_mobileone(model_name)).train()
        p = ctx.plan
        inputs = [
            torch.randn(p.eq_batch, 3, p.eq_px, p.eq_px, generator=torch.Generator().manual_seed(10 + i)) * 1.5 + 0.3
            for i in range(2)
        ]

        def both(dtype: torch.dtype, amp: torch.dtype | None = None, cl: bool = False) -> tuple[dict, dict]:
            fmt = torch.channels_last if cl else torch.contiguous_format
            xs = [x.to(ctx.device, dtype).contiguous(memory_format=fmt) for x in inputs]
            fast, ref = (copy.deepcopy(base).to(ctx.device, dtype).to(memory_format=fmt) for _ in range(2))
            return _forward_backward(fast, xs, True, amp), _forward_backward(ref, xs, False, amp)

        worst: dict[str, str] = {}
        with _no_tf32():
            fast64, exact64 = both(torch.float64)
            errors = _errors(fast64, exact64)
            ctx.note(float64=errors)
            bad = {g: e for g, e in errors.items() if not e < 1e-6}
            if bad:
                raise CheckFailed(f"float64: the fast path differs from the reference by {bad} (allowed 1e-6)")
            worst["float64"] = f"{max(errors.values()):.0e}"
            _, exact32 = both(torch.float32)
            checks = [
                ("float32", torch.float32, None, False, exact64, 5e-4, 4.0),
                ("float32 channels_last", torch.float32, None, True, exact64, 5e-4, 4.0),
            ]
            for amp, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
                if amp is torch.bfloat16 and not bf16_supported(ctx.device):
                    ctx.note(**{f"{name} autocast": "skipped: the GPU has no native bf16"})
                    continue
                checks.append((f"{name} autocast", torch.float32, amp, False, exact32, 2e-2, 2.0))
                checks.append((f"{name} autocast channels_last", torch.float32, amp, True, exact32, 2e-2, 2.0))
            failures = []
            for label, dtype, amp, cl, anchor, floor, factor in checks:
                fast, ref = both(dtype, amp, cl)
                e_fast, e_ref = _errors(fast, anchor), _errors(ref, anchor)
                ctx.note(**{label: {g: {"fast": e_fast[g], "reference": e_ref[g]} for g in GROUPS}})
                if fast["statistic dtypes"] != ref["statistic dtypes"]:
                    failures.append(
                        f"{label}: running statistics became {fast['statistic dtypes']}, the reference "
                        f"keeps {ref['statistic dtypes']}"
                    )
                for g in GROUPS:
                    allowed = max(floor, factor * e_ref[g])
                    if not e_fast[g] <= allowed:
                        failures.append(
                            f"{label} {g}: error {e_fast[g]:.2e} vs the reference's {e_ref[g]:.2e} "
                            f"(allowed {allowed:.1e})"
                        )
                worst[label] = f"{max(e_fast.values()):.0e} (ref {max(e_ref.values()):.0e})"
            for dtype, allowed in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
                err = _fusion_error(base, inputs, ctx.device, dtype)
                ctx.note(**{f"fused vs unfused {dtype}": err})
                if not err < allowed:
                    failures.append(
                        f"eval mode {dtype}: the fused model differs from the unfused one by {err:.2e} "
                        f"(allowed {allowed:.0e})"
                    )
                worst[f"fused {str(dtype).removeprefix('torch.')}"] = f"{err:.0e}"
        if failures:
            raise CheckFailed("; ".join(failures))
        return "fast = reference; largest relative errors: " + ", ".join(f"{k} {v}" for k, v in worst.items())

    return run


# --- training through the engine


def _recording_task(name: str) -> Any:
    """The task ``name`` with its loss recorded at every step (on the device: no sync per step)."""
    from mobileone.tasks import TASKS

    if name not in TASKS:
        raise Skip(f"--task {name} is not in this version of mobileone (mobileone.tasks.TASKS has {sorted(TASKS)})")

    class Recording(TASKS[name]):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[Tensor] = []

        def loss(self, net: nn.Module, images: Tensor, targets: Any, cfg: Any) -> Tensor:
            value = super().loss(net, images, targets, cfg)
            self.losses.append(value.detach().float())
            return value

    return Recording()


def _missing_package(e: ImportError) -> str | None:
    """The third-party package whose absence caused ``e`` (also when re-raised with advice), else None."""
    while e is not None:
        if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith("mobileone"):
            return e.name
        e = e.__cause__ if isinstance(e.__cause__, ImportError) else None
    return None


def train_with_engine(ctx: Context, task_name: str, run_name: str, falls: bool, **options: Any) -> str:
    """One short run of the engine; checks the recorded losses (finite, and falling if ``falls``)."""
    from mobileone.engine import fit
    from mobileone.tasks import resolve_config

    task = _recording_task(task_name)
    out = ctx.work / run_name
    options = {
        "task": task_name,
        "device": ctx.device.type,
        "out": str(out),
        "epochs": 1,
        "progress": False,
        "workers": ctx.plan.workers,
        "seed": 0,
        "threads": 1 if ctx.quick else None,
        **options,
    }
    try:
        cfg = resolve_config(**options)
        ctx.note(config={k: v for k, v in cfg.to_dict().items() if k in options or k in ("batch_size", "lr")})
        summary = fit(cfg, task)
    except ImportError as e:
        missing = _missing_package(e)
        if missing:
            raise Skip(f"needs the package {missing!r}, which is not installed: {e}") from e
        raise
    finally:  # the losses so far also when the run stopped (a NaN stop says at which step)
        losses = torch.stack(task.losses).cpu().tolist() if task.losses else []
        ctx.note(losses=[round(v, 4) for v in losses])
    best = {k: v for k, v in summary["best"].items() if isinstance(v, (int, float))}
    ctx.note(best=best, images_per_second=summary["train_images_per_second"])
    if not losses:
        raise CheckFailed("the run took no training step")
    if not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"non-finite losses: {losses}")
    third = max(1, len(losses) // 3)
    first, last = float(np.mean(losses[:third])), float(np.mean(losses[-third:]))
    if falls and not last < FALL * first:
        raise CheckFailed(
            f"the loss did not fall over {len(losses)} steps: mean of the first {third} {first:.4f}, "
            f"of the last {third} {last:.4f} (required: below {FALL} x the first)"
        )
    metrics = ", ".join(f"{k} {v:.3g}" for k, v in best.items() if k != "epoch")
    return (
        f"{len(losses)} steps, loss {first:.3f} -> {last:.3f} (means of the first and last {third}); {metrics}; "
        f"{summary['train_images_per_second']:.0f} img/s"
    )


def step_train(model_name: str, mode: str) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        if TRAIN_MODES[mode]["amp"] == "bf16" and not bf16_supported(ctx.device):
            raise Skip("the GPU has no native bf16")
        p = ctx.plan
        return train_with_engine(
            ctx,
            "classify",
            f"train_{model_name}_{mode}",
            True,
            data=str(colours(ctx)),
            img_size=p.train_px,
            batch_size=p.train_batch,
            steps_per_epoch=p.train_steps,
            lr=p.train_lr,
            **model_options(model_name),
            **TRAIN_MODES[mode],
        )

    return run


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 200), "grey": (128, 128, 128)}


def colours(ctx: Context, per_class: int = 160, size: int = 32) -> Path:
    """A 4-class ImageFolder of noisy solid colours, written once into the scratch folder.

    Any working network, optimizer and loss learn it within a few steps (the loss falls from ln 4 to
    about label smoothing's floor), so a loss that does not fall points at the training path, not the data.
    """
    from PIL import Image

    root = ctx.work / "colours"
    if (root / "val").is_dir():
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", max(4, per_class // 8))):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.asarray(rgb, dtype=np.float64) + rng.normal(0, 40, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def step_task(task_name: str) -> Callable[[Context], str]:
    """A short run on the task's built-in data: finite losses and metrics (too few steps to require a fall)."""

    def run(ctx: Context) -> str:
        p = ctx.plan
        size = {"img_size": p.task_px} if p.task_px else {}
        ema = {"ema_decay": 0.0} if ctx.quick else {}  # one evaluation instead of two (the model's and the EMA's)
        return train_with_engine(
            ctx,
            task_name,
            f"train_{task_name}",
            False,
            batch_size=p.task_batch,
            steps_per_epoch=p.task_steps,
            **size,
            **ema,
            **model_options(p.models[0]),
        )

    return run


def step_pinned_loader(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skip("pinned memory is for copies to a GPU; the engine pins only on CUDA")
    from mobileone.engine.distributed import Env, make_loader
    from mobileone.tasks import get_task, resolve_config

    task = get_task("classify")
    cfg = resolve_config(data=str(colours(ctx)), device="cuda", batch_size=16, img_size=32, workers=2)
    env = Env(ctx.device, channels_last=True)
    data = task.load_data(cfg, env)
    task.set_train_transform(data, cfg, cfg.img_size, 1.0)
    loader = make_loader(data.train, cfg, env, task.collate(), train=True)
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    x, y, _ = next(batches)
    pinned = {"images": x.is_pinned(), "labels": y.is_pinned()}
    ctx.note(pinned=pinned, workers=loader.num_workers)
    if not all(pinned.values()):
        raise CheckFailed(f"the loader's batches are not pinned: {pinned}")
    on_gpu = x.to(ctx.device, non_blocking=True)
    torch.cuda.synchronize()
    if not torch.equal(on_gpu.cpu(), x):
        raise CheckFailed("a non-blocking copy of a pinned batch arrived changed")
    del batches, loader
    return f"pinned batches from {cfg.workers} worker processes, non-blocking copy intact"


# --- DDP and SyncBatchNorm (run under torchrun)


def _two_steps(net: nn.Module, params: nn.Module, x: Tensor, y: Tensor) -> list[float]:
    opt = torch.optim.SGD(params.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def _update_error(start: dict[str, Tensor], a: nn.Module, b: nn.Module) -> float:
    """Relative error of ``a``'s change of weights and BN statistics since ``start`` against ``b``'s."""
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sb if sb[k].is_floating_point()]
    return _rel([sa[k] - start[k] for k in keys], [sb[k] - start[k] for k in keys])


def _sync_bn_function(ctx: Context) -> float:
    """SyncBatchNorm's synchronised path (CUDA kernels, NCCL all-gather) against ``F.batch_norm``.

    ``nn.SyncBatchNorm`` takes the plain path in a world of one process, so this calls the autograd
    function it uses with more processes (``torch.nn.modules._functions.SyncBatchNorm``).
    """
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 16, 12, 12, generator=gen) * 2 + 0.5).to(ctx.device)
    w, b = (torch.rand(16, generator=gen) + 0.5).to(ctx.device), torch.randn(16, generator=gen).to(ctx.device)
    grad = torch.randn(x.shape, generator=gen).to(ctx.device)
    results = []
    for synced in (True, False):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        mean, var = torch.zeros(16, device=ctx.device), torch.ones(16, device=ctx.device)
        if synced:
            out = SyncBatchNormFunction.apply(xi, wi, bi, mean, var, 1e-5, 0.1, dist.group.WORLD, 1)
        else:
            out = F.batch_norm(xi, mean, var, wi, bi, True, 0.1, 1e-5)
        out.backward(grad)
        results.append([out.detach(), xi.grad, wi.grad, bi.grad, mean, var])
    return max(_rel([a], [b]) for a, b in zip(*results))


def step_ddp(ctx: Context) -> str:
    """Runs inside torchrun: joins the process group, compares DDP (+ SyncBatchNorm) steps with a plain one."""
    if "RANK" not in os.environ:
        raise CheckFailed("the ddp step runs under torchrun (python -m torch.distributed.run)")
    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend)
    try:
        with _no_tf32():
            return _ddp_checks(ctx, backend)
    finally:
        dist.destroy_process_group()


def _ddp_checks(ctx: Context, backend: str) -> str:
    """Two DDP steps (plain BatchNorm; SyncBatchNorm on CUDA) against two plain steps from the same state."""
    ctx.note(backend=backend, world=dist.get_world_size())
    torch.manual_seed(0)
    model = _randomize_bn(build_mobileone(ctx.plan.models[0])).to(ctx.device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(ctx.plan.eq_batch, 3, ctx.plan.eq_px, ctx.plan.eq_px, generator=gen).to(ctx.device)
    y = torch.randint(0, 10, (ctx.plan.eq_batch,), generator=gen).to(ctx.device)
    ids = [ctx.device] if ctx.cuda else None
    start = {k: v.clone() for k, v in model.state_dict().items()}
    plain = copy.deepcopy(model)
    plain_losses = _two_steps(plain, plain, x, y)
    variants = {"DDP": copy.deepcopy(model)}
    if ctx.cuda:  # DDP refuses SyncBatchNorm on CPU modules
        variants["DDP + SyncBatchNorm"] = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    results = {}
    for label, module in variants.items():
        ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        losses = _two_steps(ddp, module, x, y)
        results[label] = {"losses": losses, "update_error": _update_error(start, module, plain)}
    ctx.note(plain_losses=plain_losses, **results)
    bad = {k: r["update_error"] for k, r in results.items() if not r["update_error"] < 1e-3}
    if bad:
        raise CheckFailed(
            f"two steps changed the weights and BN statistics differently from two plain steps "
            f"(relative error of the changes, allowed 1e-3): {bad}"
        )
    message = f"{backend}: two DDP steps = two plain steps ({', '.join(variants)})"
    if ctx.cuda:
        err = _sync_bn_function(ctx)
        ctx.note(sync_bn_function_error=err)
        if not err < 1e-4:
            raise CheckFailed(f"SyncBatchNorm's synchronised function differs from batch_norm by {err:.2e}")
        message += f"; SyncBatchNorm's CUDA kernels + NCCL all-gather = batch_norm ({err:.0e})"
    else:
        message += " (SyncBatchNorm is CUDA-only)"
    return message


# --- benchmarks


def _free_memory(ctx: Context) -> None:
    """Release the last model's memory, so that the next one's peak is its own."""
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def step_bench_train_step(ctx: Context) -> str:
    """bf16 train step of S0 fast / reference, timm's mobileone_s0 and MobileNetV2, channels_last and contiguous."""
    import train_step

    from mobileone.bench.peers import available_models

    if not bf16_supported(ctx.device):
        raise Skip("the GPU has no native bf16")
    peers = available_models()
    builders = {
        "S0 fast": lambda: train_step.build("s0", "fast", ctx.device.type),
        "S0 reference": lambda: train_step.build("s0", "reference", ctx.device.type),
    }
    if "timm/mobileone_s0" in peers:
        builders["timm mobileone_s0"] = lambda: train_step.build("s0", "timm", ctx.device.type)
    builders["torchvision mobilenet_v2"] = lambda: peers["mobilenet_v2"].build().to(ctx.device)
    p, rows, left_out = ctx.plan, [], []
    for fmt in p.bench_formats:
        for name, build in builders.items():
            if ctx.time_left() <= 0:
                left_out.append(f"{name} {fmt}")
                continue
            torch.manual_seed(0)
            r = train_step.measure_train_step(
                build(),
                p.bench_batch,
                p.bench_px,
                ctx.device.type,
                p.bench_warmup,
                p.bench_steps,
                torch.bfloat16,
                fmt == "channels_last",
            )
            rows.append(
                {
                    "model": name,
                    "memory_format": fmt,
                    "images_per_s": r["images_per_s"],
                    "peak_mib": r["peak_mb"] if ctx.cuda else None,
                }
            )
            ctx.note(rows=rows, left_out=left_out)
            _free_memory(ctx)
    if not rows:
        raise Skip("no time was left to measure")
    text = f"{len(rows)} measurements at batch {p.bench_batch} x {p.bench_px} px, bf16"
    return text + (f"; not measured in time: {left_out}" if left_out else "")


def _ort_runner(model: nn.Module, x: Tensor, ctx: Context, name: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """onnxruntime on the device's provider with I/O bound to ``x`` in place (no host copies on CUDA)."""
    import onnxruntime as ort

    from mobileone.deploy.onnx import to_onnx

    provider = "CUDAExecutionProvider" if ctx.cuda else "CPUExecutionProvider"
    path = ctx.work / f"{name.replace('/', '_')}.onnx"
    if not path.exists():
        with torch.inference_mode(False):
            to_onnx(copy.deepcopy(model).cpu(), path, torch.randn(2, *x.shape[1:]), dynamic_batch=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=[provider])
    if provider not in session.get_providers():  # onnxruntime falls back to its CPU provider when CUDA fails to load
        raise Skip(
            f"onnxruntime could not start its {provider} (got {session.get_providers()}); check that its "
            "CUDA and cuDNN versions match the installed ones"
        )
    binding = session.io_binding()
    index = ctx.device.index or 0
    binding.bind_input(session.get_inputs()[0].name, ctx.device.type, index, np.float32, list(x.shape), x.data_ptr())
    binding.bind_output(session.get_outputs()[0].name, ctx.device.type, index)

    def run() -> None:
        session.run_with_iobinding(binding)

    return run, lambda: torch.from_numpy(binding.copy_outputs_to_cpu()[0])


def _timed(fn: Callable[[], Any], ctx: Context) -> dict[str, float]:
    from mobileone.bench.timing import latency_stats, time_calls

    def call() -> None:
        fn()
        if ctx.cuda:
            torch.cuda.synchronize()

    p = ctx.plan
    return latency_stats(time_calls(call, p.lat_warmup, p.lat_iters, p.lat_min_time))


def _latency(ctx: Context, runtimes: tuple[str, ...]) -> str:
    """Latency of each model, batch and runtime until the step's deadline; what did not fit is listed."""
    from mobileone.bench.peers import available_models

    known, p = available_models(), ctx.plan
    models = [m for m in p.lat_models if m in known]
    rows, left_out, notes = [], [f"{m} (needs timm)" for m in p.lat_models if m not in known], {}
    if "onnxruntime" in runtimes:
        provider = "CUDAExecutionProvider" if ctx.cuda else "CPUExecutionProvider"
        try:
            import onnxruntime

            if provider not in onnxruntime.get_available_providers():
                notes["onnxruntime"] = f"onnxruntime {onnxruntime.__version__} has no {provider} (onnxruntime-gpu has)"
        except ImportError:
            notes["onnxruntime"] = "onnxruntime is not installed"
    for runtime in [r for r in runtimes if r not in notes]:
        for name in models:
            if runtime in notes:  # the runtime could not start
                break
            if ctx.time_left() <= 0:
                left_out.append(f"{name} {runtime}")
                continue
            model = known[name].build().to(ctx.device).eval()
            for batch in p.lat_batches:
                x = torch.randn(batch, 3, p.lat_px, p.lat_px, generator=torch.Generator().manual_seed(0))
                x = x.to(ctx.device)
                with torch.inference_mode():
                    if runtime == "onnxruntime":
                        try:
                            fn, result = _ort_runner(model, x, ctx, name)
                        except Skip as e:
                            notes[runtime] = str(e)
                            break
                        fn()
                        err = _rel([result()], [model(x).float().cpu()])
                        if not err < 1e-2:
                            raise CheckFailed(f"{name} in onnxruntime differs from eager PyTorch by {err:.2e}")
                    elif runtime == "compile":
                        # Fresh caches: S0-S4 share MobileOne.forward, and past dynamo's recompile limit
                        # it would silently run the later models eagerly.
                        torch._dynamo.reset()
                        fn = functools.partial(torch.compile(model, dynamic=False), x)
                    else:
                        fn = functools.partial(model, x)
                    stats = _timed(fn, ctx)
                rows.append({"model": name, "batch": batch, "runtime": runtime, **stats})
                ctx.note(rows=rows, left_out=left_out, notes=notes)
            del model
            _free_memory(ctx)
    ctx.note(rows=rows, left_out=left_out, notes=notes)
    if not rows:
        raise Skip("; ".join(notes.values()) or "no time was left to measure")
    text = f"{len(rows)} measured ({', '.join(r for r in runtimes if r not in notes)})"
    text += "".join(f"; {r}: {n}" for r, n in notes.items())
    return text + (f"; not measured in time: {left_out}" if left_out else "")


def step_bench_latency(ctx: Context) -> str:
    return _latency(ctx, ("eager", "onnxruntime"))


def step_bench_latency_compile(ctx: Context) -> str:
    return _latency(ctx, ("compile",))


def steps_for(plan: Plan) -> list[Step]:
    """Every step in the order it runs: the checks first, the benchmarks next, compilation last."""
    steps = [Step("environment", step_environment, 60, 0)]
    steps += [Step(f"equivalence_{m}", step_equivalence(m), 90) for m in plan.models]
    steps += [
        Step(f"train_{m}_{mode}", step_train(m, mode), 90)
        for m in plan.models
        for mode in TRAIN_MODES
        if mode != "compile"
    ]
    steps += [
        Step("pinned_loader", step_pinned_loader, 60),
        Step("ddp", step_ddp, 120, 20, launcher="torchrun"),
        Step("train_detect", step_task("detect"), 120, 10),
        Step("train_segment", step_task("segment"), 120, 10),
        Step("bench_train_step", step_bench_train_step, 90, 15),
        Step("bench_latency", step_bench_latency, 90, 15),
    ]
    steps += [Step(f"train_{m}_compile", step_train(m, "compile"), 120, 30, launcher="python") for m in plan.models]
    steps.append(Step("bench_latency_compile", step_bench_latency_compile, 120, 30, launcher="python"))
    return steps


# ---------------------------------------------------------------------------------------------- running


def is_cuda_error(e: BaseException) -> bool:
    """An error that leaves the CUDA context unusable for the rest of the process."""
    text = f"{type(e).__name__}: {e}"
    return any(
        s in text
        for s in (
            "CUDA error",
            "AcceleratorError",
            "device-side assert",
            "CUBLAS_STATUS",
            "cuDNN error",
            "CUDNN_STATUS",
            "illegal memory access",
        )
    )


def run_here(step: Step, ctx: Context) -> dict[str, Any]:
    """Run a step in this process: pass, skip (``Skip``) or fail (any exception), with its output's tail."""
    start, output = time.monotonic(), io.StringIO()
    record: dict[str, Any] = {"step": step.name, "status": "pass", "message": "", "details": ctx.details}
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(output):
        warnings.simplefilter("always")
        try:
            record["message"] = step.fn(ctx)
            if ctx.cuda:
                torch.cuda.synchronize()  # an asynchronous CUDA error belongs to this step
        except Skip as e:
            record.update(status="skip", message=str(e))
        except Exception as e:  # a failing step is recorded, never fatal to the others
            record.update(status="fail", message=f"{type(e).__name__}: {e}"[:2000])
            record["details"]["traceback"] = traceback.format_exc()[-4000:]
            record["cuda_error"] = ctx.cuda and is_cuda_error(e)
            record["details"]["output"] = output.getvalue()[-3000:]
    seen = {f"{w.category.__name__}: {w.message}" for w in caught}
    if seen:
        record["details"]["warnings"] = sorted(seen)[:10]
    record["seconds"] = round(time.monotonic() - start, 2)
    return record


class Runner:
    """Runs the steps under the budget, records each, rewrites the JSON and markdown after every step."""

    def __init__(self, args: argparse.Namespace, plan: Plan, work: Path) -> None:
        self.args, self.plan, self.work = args, plan, work
        self.device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.records: list[dict[str, Any]] = []
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.isolate_all = False  # set after a CUDA error: later steps run in fresh processes

    def selected(self, step: Step) -> bool:
        """``environment`` always runs; the others as ``--only`` and ``--skip`` say."""
        if step.name == "environment":
            return True
        if any(fnmatch.fnmatch(step.name, pattern) for pattern in self.args.skip or []):
            return False
        return not self.args.only or any(fnmatch.fnmatch(step.name, pattern) for pattern in self.args.only)

    def context(self, cap: float) -> Context:
        return Context(self.device, self.plan, self.args.quick, self.work, time.monotonic() + cap)

    def run(self, step: Step) -> dict[str, Any]:
        left = self.deadline - time.monotonic()
        env = next((r for r in self.records if r["step"] == "environment"), None)
        if env is not None and env["status"] == "fail" and self.device.type == "cuda":
            record = {"step": step.name, "status": "skip", "message": "no usable CUDA device (see environment)"}
        elif left < step.min_s:
            record = {
                "step": step.name,
                "status": "skip",
                "message": f"the budget (--budget-s {self.args.budget_s:g}) has {max(0, left):.0f} s left; "
                f"this step needs at least {step.min_s:g} s",
            }
        else:
            cap = max(1.0, min(step.cap_s, left))
            if step.launcher is None and not (self.isolate_all and step.name != "environment"):
                record = run_here(step, self.context(cap))
            else:
                record = self.run_child(step, cap)
            if record.pop("cuda_error", False):
                self.isolate_all = True
        record.setdefault("seconds", 0.0)
        record.setdefault("details", {})
        self.records.append(record)
        self.write()
        print(
            f"[{time.monotonic() - self.start:6.1f} s] {record['status']:4}  {step.name:28} "
            f"{record['seconds']:6.1f} s  {record['message'][:300]}",
            file=sys.stderr,
            flush=True,
        )
        return record

    def run_child(self, step: Step, cap: float) -> dict[str, Any]:
        """The step in a fresh process (``torchrun`` for DDP), killed with its children at ``cap`` seconds."""
        result = self.work / f"{step.name}.result.json"
        result.unlink(missing_ok=True)
        prefix = [sys.executable]
        if step.launcher == "torchrun":
            prefix += ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1"]
        cmd = [
            *prefix,
            str(Path(__file__).resolve()),
            "--step",
            step.name,
            "--result",
            str(result),
            "--work",
            str(self.work),
            "--device",
            self.args.device,
            "--out",
            str(self.out),
            "--time-s",
            f"{cap:.1f}",
        ]
        cmd += (["--quick"] if self.args.quick else []) + (
            ["--models", ",".join(self.args.models)] if self.args.models else []
        )
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):  # the context may be broken by an earlier CUDA error
                torch.cuda.empty_cache()
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=cap)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child and what it started (torchrun's worker)
            output, _ = proc.communicate()
            timed_out = True
        seconds = round(time.monotonic() - start, 2)
        record: dict[str, Any] = {"step": step.name, "status": "fail", "message": "", "details": {}}
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(result.read_text())
        record["seconds"] = seconds
        if timed_out:
            record.update(
                status="fail",
                message=f"stopped at its cap of {cap:.0f} s (not finished: slow or hung); "
                "what it measured so far is in details",
            )
        elif record.get("status") not in ("pass", "fail", "skip"):
            record.update(
                status="fail", message=f"the child process exited with code {proc.returncode} without a result"
            )
        if record["status"] == "fail":
            record.setdefault("details", {})["child_output"] = (output or "")[-4000:]
        return record

    def summary(self) -> dict[str, int]:
        return {s: sum(r["status"] == s for r in self.records) for s in ("pass", "fail", "skip")}

    def write(self) -> None:
        env = next((r["details"] for r in self.records if r["step"] == "environment"), {})
        report = {
            "started": self.started_at,
            "device": self.args.device,
            "quick": self.args.quick,
            "budget_s": self.args.budget_s,
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "plan": self.plan.__dict__,
            "environment": env,
            "summary": self.summary(),
            "steps": self.records,
            "targets": targets(self.records),
        }
        text = json.dumps(report, indent=2, default=str)
        atomic_write(self.out / "gpu_check.json", lambda tmp: Path(tmp).write_text(text))
        md = markdown(report)
        atomic_write(self.out / "gpu_check.md", lambda tmp: Path(tmp).write_text(md))


def targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The speed targets of the fast train path, from the train-step rows (reported, not checked)."""
    bench = next((r for r in records if r["step"] == "bench_train_step"), None)
    rows = (bench or {}).get("details", {}).get("rows", [])
    out = []
    for fmt in ("channels_last", "contiguous"):
        by = {r["model"]: r for r in rows if r["memory_format"] == fmt}
        fast, ref, timm_ = by.get("S0 fast"), by.get("S0 reference"), by.get("timm mobileone_s0")
        if fast is None or ref is None:
            continue
        speedup = fast["images_per_s"] / ref["images_per_s"]
        out.append(
            {
                "target": f"S0 fast >= {TARGET_SPEEDUP}x the reference ({fmt})",
                "value": f"{speedup:.2f}x",
                "met": speedup >= TARGET_SPEEDUP,
            }
        )
        if timm_ is not None:
            ratio = fast["images_per_s"] / timm_["images_per_s"]
            out.append(
                {"target": f"S0 fast faster than timm mobileone_s0 ({fmt})", "value": f"{ratio:.2f}x", "met": ratio > 1}
            )
        peers = [r for r in (ref, timm_) if r is not None]
        if fast["peak_mib"] is not None and all(r["peak_mib"] is not None for r in peers):
            values = " / ".join(f"{r['peak_mib']:.0f}" for r in (fast, *peers))
            met = all(fast["peak_mib"] < r["peak_mib"] for r in peers)
            out.append(
                {
                    "target": f"S0 fast peak memory below the reference and timm ({fmt})",
                    "value": f"{values} MiB",
                    "met": met,
                }
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["summary"]
    where = env.get("gpu") or f"CPU ({env.get('cpu_threads', '?')} thread{'s' if env.get('cpu_threads') != 1 else ''})"
    versions = [
        f"{name} {env[key]}"
        for name, key in (("CUDA", "torch_cuda"), ("cuDNN", "cudnn"), ("NCCL", "nccl"))
        if env.get(key) is not None
    ]
    lines = [
        "# mobileone GPU readiness check",
        "",
        f"{where}; torch {env.get('torch', '?')}{' (' + ', '.join(versions) + ')' if versions else ''}; started "
        f"{report['started']}; {report['elapsed_s']:.0f} s of a {report['budget_s']:g} s "
        f"budget{' (--quick)' if report['quick'] else ''}: {s['pass']} passed, {s['fail']} failed, "
        f"{s['skip']} skipped.",
        *(
            ["", "--quick: at these sizes the timings in this report mean nothing; they only show that the code runs."]
            if report["quick"]
            else []
        ),
        "",
        "| step | result | seconds | message |",
        "|---|---|---:|---|",
    ]
    for r in report["steps"]:
        message = " ".join(r["message"].split()).replace("|", "\\|")
        message = message if len(message) <= 400 else message[:400] + " ... (gpu_check.json has all)"
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | {message} |")
    bench = next((r for r in report["steps"] if r["step"] == "bench_train_step"), None)
    rows = (bench or {}).get("details", {}).get("rows", [])
    if rows:
        plan = report["plan"]
        lines += [
            "",
            f"## Train step: bf16, batch {plan['bench_batch']} x {plan['bench_px']} px, SGD",
            "",
            "| model | memory format | images/s | vs S0 reference | peak memory (MiB) |",
            "|---|---|---:|---:|---:|",
        ]
        for r in rows:
            ref = next(
                (q for q in rows if q["model"] == "S0 reference" and q["memory_format"] == r["memory_format"]), None
            )
            vs = f"{r['images_per_s'] / ref['images_per_s']:.2f}x" if ref else "-"
            mem = f"{r['peak_mib']:,.0f}" if r["peak_mib"] is not None else "-"
            lines.append(f"| {r['model']} | {r['memory_format']} | {r['images_per_s']:,.0f} | {vs} | {mem} |")
    if report["targets"]:
        lines += ["", "## Targets (reported, not checked)", "", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
    latency = [
        row
        for r in report["steps"]
        if r["step"].startswith("bench_latency")
        for row in r.get("details", {}).get("rows", [])
    ]
    if latency:
        runtimes = list(dict.fromkeys(row["runtime"] for row in latency))
        cells = {(row["model"], row["batch"], row["runtime"]): row["median_ms"] for row in latency}
        keys = list(dict.fromkeys((row["model"], row["batch"]) for row in latency))
        lines += [
            "",
            f"## Inference latency: fp32, {report['plan']['lat_px']} px, median ms",
            "",
            "| model | batch | " + " | ".join(runtimes) + " |",
            "|---|---:|" + "---:|" * len(runtimes),
        ]
        for model, batch in keys:
            values = [f"{cells[model, batch, rt]:.3f}" if (model, batch, rt) in cells else "-" for rt in runtimes]
            lines.append(f"| {model} | {batch} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def run_child_step(args: argparse.Namespace, plan: Plan) -> int:
    """``--step NAME``: one step in this process (started by the parent), its record written to ``--result``."""
    if args.quick:
        original = torch.compile

        def compile_graph_only(model: Any = None, **kwargs: Any) -> Any:
            kwargs.setdefault("backend", "aot_eager")
            return original(model, **kwargs)

        torch.compile = compile_graph_only
    step = next((s for s in steps_for(plan) if s.name == args.step), None)
    if step is None:
        raise SystemExit(f"unknown step {args.step!r}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if args.device == "cuda" else "cpu")
    ctx = Context(device, plan, args.quick, Path(args.work), time.monotonic() + args.time_s)
    result = Path(args.result)

    def flush() -> None:
        text = json.dumps({"step": step.name, "status": "running", "message": "", "details": ctx.details}, default=str)
        atomic_write(result, lambda tmp: Path(tmp).write_text(text))

    ctx.flush = flush
    record = run_here(step, ctx)
    record.pop("cuda_error", None)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(record, default=str)
        atomic_write(result, lambda tmp: Path(tmp).write_text(text))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny sizes and one timing repetition (the CPU dry run)")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--budget-s", type=float, default=280.0, help="total seconds; steps that no longer fit are skipped")
    p.add_argument("--models", type=lambda s: s.split(","), help="MobileOne variants to check (default s0,s1)")
    p.add_argument(
        "--only",
        type=lambda s: s.split(","),
        help="run only the steps matching these patterns "
        "(comma-separated, shell-style: 'train_s1_*,ddp'); environment always runs",
    )
    p.add_argument("--skip", type=lambda s: s.split(","), help="leave out the steps matching these patterns")
    for hidden in ("--step", "--result", "--work"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--time-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s < 0:
        p.error("--budget-s must be >= 0")
    unknown = [m for m in args.models or [] if m != "tiny" and m not in mobileone.list_models()]
    unknown = [m for m in unknown if f"mobileone_{m}" not in mobileone.list_models()]
    if unknown:
        p.error(f"unknown --models {unknown}; choose from {mobileone.list_models()} or tiny")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.make(args.quick, args.models)
    threads = torch.get_num_threads()
    if args.quick:
        torch.set_num_threads(1)  # tiny models gain nothing from threads; spinning ones crawl on a busy machine
    try:
        if args.step:
            return run_child_step(args, plan)
        with tempfile.TemporaryDirectory(prefix="mobileone_gpu_check_") as work:
            runner = Runner(args, plan, Path(work))
            for step in steps_for(plan):
                if runner.selected(step):
                    runner.run(step)
    finally:
        torch.set_num_threads(threads)
    s = runner.summary()
    print(
        f"{s['pass']} passed, {s['fail']} failed, {s['skip']} skipped; {runner.out / 'gpu_check.md'}", file=sys.stderr
    )
    return 1 if s["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
