"""Training MobileOne: the paper's recipe, short runs on small data, fine-tuning, distillation, DDP.

The loop in :func:`train` reads top to bottom. Everything it does is a field of
:class:`TrainConfig`, printed and saved as ``config.json`` in the run directory. Schedules are
plain functions of the step (or epoch), so they are tested value by value and a resumed run
lands on the same values. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .checkpoint import _atomic_write, load_checkpoint, read_checkpoint, save_checkpoint
from .data import (
    DataError,
    ImageFolderDataset,
    builtin_dataset,
    check_splits,
    collate_skip_bad,
    eval_transform,
    train_transform,
)
from .evaluate import accuracy_counts
from .model import MobileOne, create_model, init_branches, reparameterize_model, resolve_variant

log = logging.getLogger("mobileone")


class TrainingError(RuntimeError):
    """The run had to stop (a NaN loss, an impossible batch split); the message says where and why."""


@dataclass
class TrainConfig:
    """One training run as plain data. ``None`` fields are filled from the recipe (see :func:`resolve_config`)."""

    data: str | None = None  # folder with train/ and val/ (ImageFolder); None: the built-in digits
    variant: str = "s0"
    arch: dict[str, Any] | None = None  # MobileOneConfig fields for a custom architecture
    recipe: str = "short"  # short | imagenet | finetune (RECIPES)
    out: str = "runs/mobileone"
    epochs: int = 10
    batch_size: int = 128  # global: over all processes and accumulation steps
    accum_steps: int = 1  # micro-batches per step (interleaved, as ranks would split the batch)
    steps_per_epoch: int | None = None  # cap on the steps of an epoch (quick runs)
    img_size: int = 224  # final training size; also the evaluation size
    progressive: bool = False  # 0.71x, 0.86x, 1x img_size over the run (paper: 160 -> 192 -> 224)
    crop_pct: float = 0.875
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    augment: str = "none"  # none | randaugment | autoaugment; strength rises with the image size
    magnitude: float = 7.0
    base_lr: float = 0.1  # per 256 images; lr = base_lr * batch_size / 256
    lr: float | None = None  # absolute peak LR, overrides base_lr
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0  # linear LR warm-up, at most a fifth of the run
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_end: float = 1e-5  # cosine annealing of weight decay; = weight_decay switches it off
    label_smoothing: float = 0.1
    ema_decay: float = 0.9995  # 0 switches EMA off
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    init: str = "torch"  # torch | unit-sum | identity (init_branches), for runs from scratch
    k: int | None = None  # override the variant's number of conv branches (paper ablation k = 1)
    branches: bool = True  # False: k = 1, no scale and no skip branches (plain conv-BN net)
    teacher: str | None = None  # checkpoint of a teacher for knowledge distillation
    distill_alpha: float = 0.5  # weight of the distillation loss (1 - alpha on the labels)
    distill_temperature: float = 2.0
    pretrained: str | None = None  # fine-tune from this checkpoint; the head is replaced
    resume: str | None = None
    workers: int = 4
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | none | bf16 | fp16
    channels_last: bool | None = None  # None: on CUDA
    compile: bool = False
    sync_bn: bool = False
    strict_images: bool = False  # a corrupt image stops the run instead of being skipped
    progress: bool = True  # the per-epoch bar, shown only on an interactive terminal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Values a recipe sets unless the user sets them. "short" is the default: it is what most users
# run (a few epochs on a few thousand images) and what benchmarks/underfit.py tuned.
RECIPES: dict[str, dict[str, Any]] = {
    "imagenet": {"epochs": 300, "batch_size": 256, "warmup_epochs": 5.0, "init": "torch", "img_size": 224},
    "short": {"epochs": 10, "warmup_epochs": 1.0, "init": "identity"},
    "finetune": {"epochs": 10, "base_lr": 0.01, "warmup_epochs": 1.0, "init": "torch"},
}
# The paper's per-variant augmentation: S0 crop + flip; S1 progressive size; S2-S4 also RandAugment.
VARIANT_RECIPES: dict[str, dict[str, Any]] = {
    "mobileone_s0": {},
    "mobileone_s1": {"progressive": True},
    **{f"mobileone_s{i}": {"progressive": True, "augment": "randaugment"} for i in (2, 3, 4)},
}
# The built-in digits: 8x8 scans, upsampled; digits are not mirror-symmetric.
# Batch 64: 22 steps an epoch on its 1,437 training images, as in benchmarks/underfit.py.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "img_size": 32,
    "hflip": 0.0,
    "crop_scale": (0.5, 1.0),
    "epochs": 10,
    "batch_size": 64,
}
PROGRESSIVE = ((37 / 300, 160 / 224, 0.3), (112 / 300, 192 / 224, 0.7), (1.0, 1.0, 1.0))  # mmpretrain's phases


def resolve_config(recipe: str | None = None, **explicit: Any) -> TrainConfig:
    """Defaults <- recipe <- variant <- built-in data <- what the user gave explicitly (not None).

    Without a recipe: ``finetune`` when fine-tuning from ``pretrained``, else ``short``.
    """
    explicit = {k: v for k, v in explicit.items() if v is not None}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(explicit) - names
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}")
    if explicit.get("resume"):
        saved = Path(explicit["resume"]) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist (is {explicit['resume']} a run directory?)")
        values = json.loads(saved.read_text())
        ignored = sorted(set(explicit) - {"resume", "workers", "progress", "device"})
        if ignored:
            warnings.warn(f"--resume uses the run's saved config; ignoring {ignored}", stacklevel=2)
        values.update({k: explicit[k] for k in ("workers", "progress", "device") if k in explicit})
        values["resume"], values["out"] = explicit["resume"], explicit["resume"]
        return _typed(TrainConfig(**values))
    recipe = recipe or ("finetune" if explicit.get("pretrained") else "short")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {list(RECIPES)}")
    variant = resolve_variant(explicit.get("variant", "s0"))
    values = {**RECIPES[recipe], **VARIANT_RECIPES.get(variant, {})}
    if explicit.get("data") is None:
        values.update(BUILTIN_DEFAULTS)
    values.update(explicit)
    values["recipe"] = recipe
    return _typed(TrainConfig(**values))


def _typed(cfg: TrainConfig) -> TrainConfig:
    cfg.crop_scale = tuple(cfg.crop_scale)
    for name, choices in (
        ("augment", ("none", "randaugment", "autoaugment")),
        ("amp", ("auto", "none", "bf16", "fp16")),
    ):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(cfg, name)!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.accum_steps < 1:
        raise ValueError(f"epochs, batch_size and accum_steps must be >= 1 (got {cfg.epochs}, {cfg.batch_size}, "
                         f"{cfg.accum_steps})")  # fmt: skip
    return cfg


# ----------------------------------------------------------------------------- schedules


def peak_lr(cfg: TrainConfig) -> float:
    """The paper's linear scaling: 0.1 per 256 images of global batch, unless ``lr`` is given."""
    return cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 256


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine down to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def weight_decay_at(step: int, total: int, start: float, end: float) -> float:
    """Weight decay annealed from ``start`` to ``end`` along a cosine over the whole run (the paper)."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step / max(1, total), 1.0)))


def ema_decay_at(updates: int, decay: float, warmup: bool = True) -> float:
    """EMA decay after ``updates`` updates; the warm-up keeps short runs from averaging in the init."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def image_size_at(epoch: int, epochs: int, img_size: int, progressive: bool) -> tuple[int, float]:
    """(training image size, augmentation strength 0..1) for ``epoch``: the paper's three phases."""
    if not progressive:
        return img_size, 1.0
    for end, size, strength in PROGRESSIVE:
        if epoch < round(end * epochs):
            return max(8, round(img_size * size / 4) * 4), strength
    return img_size, 1.0


def make_ema(model: nn.Module, cfg: TrainConfig) -> AveragedModel:
    """EMA of weights and buffers (BN statistics too) with torch's AveragedModel and a decay warm-up."""

    @torch.no_grad()
    def update(ema: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = ema_decay_at(int(n), cfg.ema_decay, cfg.ema_warmup)
        if ema[0].is_floating_point():
            torch._foreach_lerp_(ema, current, 1 - d)
        else:  # integer buffers (BN's num_batches_tracked) follow the model
            torch._foreach_copy_(ema, current)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


# ----------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, num_classes: int) -> MobileOne:
    """The train-time model: from a checkpoint (new head) when fine-tuning, else fresh with ``cfg.init``."""
    if cfg.pretrained:
        ckpt = read_checkpoint(cfg.pretrained)
        if ckpt.fused:
            raise ValueError(
                f"{cfg.pretrained} holds fused (inference) weights; fine-tuning needs the unfused train-time "
                "branches: use the unfused checkpoint (Apple's *_unfused.pth.tar, or our last/best.safetensors)"
            )
        model = MobileOne(ckpt.config, num_classes, variant=ckpt.variant)
        return load_checkpoint(cfg.pretrained, model, reset_head=True)
    overrides: dict[str, Any] = {}
    if cfg.k is not None:
        overrides["k"] = cfg.k
    if not cfg.branches:
        overrides.update(k=1, stem_k=1, scale_branch=False, skip_branch=False)
    model = create_model(cfg.arch or cfg.variant, num_classes=num_classes, **overrides)
    return init_branches(model, cfg.init)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only: none on norm layers and biases (the paper)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]  # fmt: skip


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at ``temperature``, scaled by T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                    log_target=True) * t * t  # fmt: skip


# ----------------------------------------------------------------------------- the run


@dataclass
class Env:
    """Where this process runs: device, rank and world size, AMP dtype."""

    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    owns_group: bool = False
    log: list[str] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env(cfg: TrainConfig) -> Env:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); pick device and AMP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {cfg.device!r}")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif use_cuda:
        torch.backends.cudnn.benchmark = True
    rank, owns = 0, False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if use_cuda else "none")
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    cl = cfg.channels_last if cfg.channels_last is not None else use_cuda
    return Env(device, rank, world, dtype, cl, owns)


def load_data(cfg: TrainConfig, env: Env) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    root = Path(cfg.data) if cfg.data else builtin_dataset()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder; --data expects {root}/train/<class>/... and "
                            f"{root}/val/<class>/... (ImageFolder layout)")  # fmt: skip
    train_ds = ImageFolderDataset(root / "train", seed=cfg.seed)
    val_ds = ImageFolderDataset(root / "val", transform=eval_transform(cfg.img_size, cfg.crop_pct))
    check_splits(train_ds, val_ds)
    return train_ds, val_ds


def make_loader(ds, cfg: TrainConfig, env: Env, train: bool) -> DataLoader:
    per_rank = cfg.batch_size // env.world
    workers = cfg.workers
    common = {"num_workers": workers, "pin_memory": env.device.type == "cuda", "collate_fn": collate_skip_bad,
              "persistent_workers": workers > 0}  # fmt: skip
    if train:
        sampler = DistributedSampler(ds, env.world, env.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        return DataLoader(ds, per_rank, sampler=sampler, drop_last=True, **common)
    shard = Subset(ds, range(env.rank, len(ds), env.world))
    return DataLoader(shard, max(1, per_rank // cfg.accum_steps) * 2, shuffle=False, **common)


def evaluate_model(model: nn.Module, loader: DataLoader, env: Env) -> tuple[float, float]:
    """Top-1 and top-5 (%) over the whole validation set, summed over the ranks' shards."""
    counts = accuracy_counts(model, loader, env.device, env.amp_dtype, env.channels_last)
    if env.world > 1:
        dist.all_reduce(counts)
    n = max(1.0, counts[0].item())
    return 100.0 * counts[1].item() / n, 100.0 * counts[2].item() / n


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary also written to ``summary.json``."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    env = setup_env(cfg)
    try:
        return _train(cfg, env)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if env.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: Env) -> dict[str, Any]:
    out = Path(cfg.out)
    if cfg.batch_size % (env.world * cfg.accum_steps):
        raise ValueError(f"batch size {cfg.batch_size} must split evenly over {env.world} process(es) x "
                         f"{cfg.accum_steps} accumulation step(s)")  # fmt: skip
    if not cfg.resume and (out / "train_state.pt").exists():
        raise ValueError(f"{out} already holds a run; continue it with --resume {out}, or choose another --out")
    torch.manual_seed(cfg.seed)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg.to_dict(), indent=2)))
        print(f"training config ({out / 'config.json'}):\n{json.dumps(cfg.to_dict())}", flush=True)

    # --- data and model
    train_ds, val_ds = load_data(cfg, env)
    model = build_model(cfg, len(train_ds.classes))
    model.class_names = list(train_ds.classes)
    model.preprocess.update(input_size=cfg.img_size, crop_pct=cfg.crop_pct)
    if cfg.sync_bn and env.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device)
    if env.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = make_ema(model, cfg) if cfg.ema_decay > 0 else None
    teacher = None
    if cfg.teacher:
        teacher = load_checkpoint(cfg.teacher)
        if teacher.num_classes != model.num_classes:
            raise ValueError(f"teacher {cfg.teacher} has {teacher.num_classes} classes, the data has "
                             f"{model.num_classes}; distil from a teacher trained on these classes")  # fmt: skip
        if not teacher.inference_mode:
            teacher = reparameterize_model(teacher.eval())
        teacher.to(env.device).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=peak_lr(cfg), momentum=cfg.momentum)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.amp_dtype == torch.float16)
    net: nn.Module = model
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    # --- schedules and resume
    per_epoch = len(train_ds) // cfg.batch_size
    if per_epoch == 0:
        raise DataError(f"{len(train_ds)} training images are fewer than one batch of {cfg.batch_size}; "
                        "lower --batch-size")  # fmt: skip
    per_epoch = min(per_epoch, cfg.steps_per_epoch or per_epoch)
    total = cfg.epochs * per_epoch
    warmup = min(round(cfg.warmup_epochs * per_epoch), total // 5)  # a 1-epoch run still gets its cosine
    start_epoch, step, history, best = 0, 0, [], {"val_top1": -1.0}
    state_path = out / "train_state.pt"
    if cfg.resume and state_path.is_file():
        state = torch.load(state_path, map_location=env.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step, history, best = state["epoch"], state["step"], state["history"], state["best"]
        if env.main:
            print(f"resuming {out} after epoch {start_epoch} (step {step})", flush=True)

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    val_loader = make_loader(val_ds, cfg, env, train=False)
    loader, loader_key = None, None
    for epoch in range(start_epoch, cfg.epochs):
        size, strength = image_size_at(epoch, cfg.epochs, cfg.img_size, cfg.progressive)
        if (size, strength) != loader_key:  # progressive phases change the transform: new workers
            train_ds.transform = train_transform(size, cfg.crop_scale, cfg.hflip, cfg.augment, cfg.magnitude * strength)
            loader, loader_key = make_loader(train_ds, cfg, env, train=True), (size, strength)
        loader.sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        net.train()
        if teacher is not None:
            teacher.eval()
        bar = _progress(cfg, env, per_epoch, epoch)
        loss_sum, seen, bad, t0 = torch.zeros((), device=env.device), 0, 0, time.perf_counter()
        for b, (x, y, bad_paths) in enumerate(loader):
            if b >= per_epoch:
                break
            bad += _handle_bad(bad_paths, cfg)
            lr = lr_at(step, total, warmup, peak_lr(cfg), cfg.min_lr)
            wd = weight_decay_at(step, total, cfg.weight_decay, cfg.weight_decay_end)
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = lr, wd if group["decay"] else 0.0
            if x is not None:
                loss = _step(net, model, teacher, criterion, optimizer, scaler, x, y, cfg, env, step, epoch, b, out)
                if ema is not None:
                    ema.update_parameters(model)
                loss_sum += loss * len(x)
                seen += len(x)
            step += 1
            if bar is not None:
                bar.update(1)
                if seen:  # a batch of only unreadable images leaves no loss to show yet
                    speed = seen * env.world / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{speed:.0f}")
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - t0
        if env.world > 1:
            totals = torch.tensor([loss_sum.item(), seen, bad], dtype=torch.float64, device=env.device)
            dist.all_reduce(totals)
            loss_sum, seen, bad = totals[0], int(totals[1]), int(totals[2])
        top1, top5 = evaluate_model(model, val_loader, env)
        ema_top1, ema_top5 = evaluate_model(ema.module, val_loader, env) if ema is not None else (None, None)
        row = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(1, seen), "val_top1": top1, "val_top5": top5,
               "ema_val_top1": ema_top1, "ema_val_top5": ema_top5, "lr": lr, "weight_decay": wd,
               "images_per_second": seen / train_seconds, "img_size": size, "augment_strength": strength,
               "bad_images": bad, "epoch_seconds": time.perf_counter() - t0}  # fmt: skip
        history.append(row)
        if env.main:
            best = _save_epoch(out, model, ema, optimizer, scaler, cfg, epoch, step, history, best)
            print(_epoch_line(row, cfg.epochs), flush=True)
    if env.main:
        return _finish(out, cfg, history, best)
    return {"run_dir": str(out), "best": best}


def _step(net, model, teacher, criterion, optimizer, scaler, x, y, cfg, env, step, epoch, b, out) -> torch.Tensor:
    """One optimizer step over ``accum_steps`` interleaved micro-batches; stops on a non-finite loss."""
    x = x.to(env.device, non_blocking=True)
    y = y.to(env.device, non_blocking=True)
    if env.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=env.device)
    for j in range(cfg.accum_steps):
        xj, yj = x[j :: cfg.accum_steps], y[j :: cfg.accum_steps]
        if len(xj) == 0:
            continue
        sync = j == cfg.accum_steps - 1 or not hasattr(net, "no_sync")
        with (
            net.no_sync() if not sync else contextlib.nullcontext(),
            torch.autocast(env.device.type, dtype=env.amp_dtype or torch.float32, enabled=env.amp_dtype is not None),
        ):
            logits = net(xj)
            loss = criterion(logits, yj)
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(xj)
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * distill_loss(
                    logits.float(), soft.float(), cfg.distill_temperature
                )
            finite = torch.isfinite(loss.detach()).float()
            if env.world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                raise TrainingError(
                    f"the loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}, batch {b + 1}); the run "
                    f"stopped. The last good checkpoint is {out / 'last.safetensors'} (epoch {epoch}). Lower the "
                    "learning rate (--lr), switch off fp16 (--amp bf16/none), or check the data."
                )
            scaler.scale(loss * len(xj) / len(x)).backward()
        total += loss.detach() * len(xj) / len(x)
    scaler.step(optimizer)
    scaler.update()
    return total


def _handle_bad(paths: list[str], cfg: TrainConfig) -> int:
    if paths and cfg.strict_images:
        raise DataError(f"unreadable image(s) {paths[:5]} (--strict-images); remove or re-save them")
    for p in paths:
        log.warning("skipped unreadable image %s", p)
    return len(paths)


def _progress(cfg: TrainConfig, env: Env, steps: int, epoch: int):
    if not (cfg.progress and env.main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    bad = f"  skipped images {r['bad_images']}" if r["bad_images"] else ""
    ema = f"EMA top-1 {r['ema_val_top1']:.2f}  " if r["ema_val_top1"] is not None else ""
    return (
        f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  val top-1 {r['val_top1']:.2f}  "
        f"top-5 {r['val_top5']:.2f}  {ema}lr {r['lr']:.2e}  "
        f"wd {r['weight_decay']:.1e}  {r['images_per_second']:.0f} img/s  {r['img_size']} px  "
        f"{r['epoch_seconds']:.1f} s{bad}"
    )


def _save_epoch(out, model, ema, optimizer, scaler, cfg, epoch, step, history, best) -> dict[str, Any]:
    """Checkpoints after every epoch, each written atomically, so a kill at any point leaves either the
    previous epoch's training state or this one's, never a mix; a resume redoes at most one epoch."""
    row = history[-1]
    save_checkpoint(model, out / "last.safetensors", epoch=epoch + 1, weights="model", val_top1=row["val_top1"])
    use_ema = ema is not None and row["ema_val_top1"] > row["val_top1"]
    top1 = row["ema_val_top1"] if use_ema else row["val_top1"]
    if top1 > best["val_top1"]:
        src = ema.module if use_ema else model
        best = {"val_top1": top1, "val_top5": row["ema_val_top5" if use_ema else "val_top5"], "epoch": epoch + 1,
                "weights": "ema" if use_ema else "model"}  # fmt: skip
        save_checkpoint(src, out / "best.safetensors", **best)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "ema": ema.state_dict() if ema is not None else {}, "epoch": epoch + 1, "step": step,
             "history": history, "best": best}  # fmt: skip
    _atomic_write(out / "train_state.pt", lambda tmp: torch.save(state, tmp))
    lines = "".join(json.dumps(r) + "\n" for r in history)  # rewritten whole, so a resume never duplicates rows
    _atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))
    if row["epoch_seconds"] > 20 or epoch + 1 == cfg.epochs:
        plot_curves(history, out / "curves.png")
    return best


def _finish(out: Path, cfg: TrainConfig, history: list[dict], best: dict) -> dict[str, Any]:
    """Fuse the best checkpoint into ``best_fused`` and write ``summary.json``."""
    best_model = load_checkpoint(out / "best.safetensors")
    fused = reparameterize_model(best_model.eval())
    save_checkpoint(fused, out / "best_fused.safetensors", **best)
    summary = {"run_dir": str(out), "best": best, "last": history[-1], "epochs": cfg.epochs,
               "train_images_per_second": sum(r["images_per_second"] for r in history) / len(history),
               "bad_images": sum(r["bad_images"] for r in history)}  # fmt: skip
    _atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(f"best val top-1 {best['val_top1']:.2f} (epoch {best['epoch']}, {best['weights']} weights); run: {out}")
    return summary


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, accuracy, LR and weight decay against epochs, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    axes[0].plot(ep, [r["train_loss"] for r in history], label="train loss")
    axes[1].plot(ep, [r["val_top1"] for r in history], label="val top-1")
    if history[0]["ema_val_top1"] is not None:
        axes[1].plot(ep, [r["ema_val_top1"] for r in history], label="EMA val top-1")
    axes[2].plot(ep, [r["lr"] for r in history], label="learning rate")
    axes[3].plot(ep, [r["weight_decay"] for r in history], label="weight decay")
    for ax, title in zip(axes, ("loss", "accuracy (%)", "learning rate", "weight decay"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
