"""One training run as plain data: every option of every task, its recipes, and its validation.

The config is printed and saved as ``config.json`` in the run directory; every value the loop
uses is a field here. Options are validated once, in :meth:`TrainConfig.validate`, with the valid
range in the message, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import MobileOneConfig, resolve_variant

if TYPE_CHECKING:
    from .task import Task


@dataclass
class TrainConfig:
    """One training run. ``None`` fields are filled from the recipe and the task (see :func:`resolve_config`)."""

    task: str = "classify"  # classify | detect | segment
    data: str | None = None  # the task's data folder; None: the task's built-in data
    variant: str = "s0"  # s0..s4, mu0..mu2 (or mnv3: the MobileNetV3 peer of detection / segmentation)
    arch: dict[str, Any] | None = None  # MobileOneConfig fields for a custom architecture
    recipe: str = "short"  # short | imagenet | finetune (RECIPES)
    out: str = "runs/mobileone"
    epochs: int = 10
    batch_size: int = 128  # global: over all processes and accumulation steps
    auto_batch: bool = False  # the batch was not set by the user: lowered when the data is small
    auto_epochs: bool = False  # not set by the user (own data): raised to a floor of steps on small data
    accum_steps: int = 1  # micro-batches per step (interleaved, as ranks would split the batch)
    steps_per_epoch: int | None = None  # cap on the steps of an epoch (quick runs)
    img_size: int = 224  # final training size; also the evaluation size
    auto_img_size: bool = False  # not set by the user (own data): lowered to the images' own size
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
    teacher: str | None = None  # checkpoint of a teacher for knowledge distillation (classification)
    distill_alpha: float = 0.5  # weight of the distillation loss (1 - alpha on the labels)
    distill_temperature: float = 2.0
    pretrained: str | None = None  # classification: fine-tune from it (new head); detect/segment: backbone
    freeze_stages: int = 0  # freeze the stem and the first stages (0..5), BN statistics included
    resume: str | None = None
    workers: int | None = None  # data-loading processes per rank; None: fits the machine
    threads: int | None = None  # torch CPU threads; None: torch's default
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | none | bf16 | fp16
    channels_last: bool | None = None  # None: on CUDA
    compile: bool = False
    sync_bn: bool = False
    strict_images: bool = False  # a corrupt image stops the run instead of being skipped
    progress: bool = True  # the per-epoch bar on a terminal; elsewhere a line every log_every steps
    log_every: int | None = None  # None: about 10 lines an epoch when not on a terminal
    # --- detection and segmentation
    data_format: str = "auto"  # detect: coco | voc | yolo; segment: masks | voc; auto: detected
    # --- detection (SSDLite)
    anchor_min_ratio: float = 0.2  # smallest default box, as a fraction of the image (SSD's s_min)
    anchor_max_ratio: float = 0.95
    score_thresh: float = 0.001  # detections kept for mAP (COCO evaluation keeps low scores)
    nms_thresh: float = 0.55
    max_detections: int = 300
    # --- segmentation (DeepLabV3 / LR-ASPP)
    head: str = "deeplabv3"  # deeplabv3 | lraspp
    output_stride: int = 16  # 16 or 8 (dilated last stages)
    aux_weight: float = 0.4  # auxiliary FCN head loss weight (deeplabv3); 0: no auxiliary head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> TrainConfig:
        """Every option in its valid range, or a ValueError naming the option and the range."""
        self.crop_scale = tuple(self.crop_scale)
        choices = {
            "task": ("classify", "detect", "segment"),
            "recipe": tuple(RECIPES),
            "augment": ("none", "randaugment", "autoaugment"),
            "amp": ("auto", "none", "bf16", "fp16"),
            "init": ("torch", "unit-sum", "identity"),
            "device": ("auto", "cuda", "cpu"),
            "head": ("deeplabv3", "lraspp"),
            "data_format": ("auto", "coco", "voc", "yolo", "masks"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {getattr(self, name)!r}")
        ints = {  # name: (low, high); None = unbounded
            "epochs": (1, None),
            "batch_size": (1, None),
            "accum_steps": (1, None),
            "steps_per_epoch": (1, None),
            "img_size": (16, 4096),
            "k": (1, 16),
            "freeze_stages": (0, 5),
            "workers": (0, 256),
            "threads": (1, 1024),
            "max_detections": (1, 100_000),
            "log_every": (1, None),
            "output_stride": (8, 16),
            "seed": (0, 2**63 - 1),
        }
        for name, (lo, hi) in ints.items():
            value = getattr(self, name)
            if value is None and name in ("steps_per_epoch", "k", "workers", "threads", "log_every"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
                rng = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
                raise ValueError(f"{name} must be {rng}, got {value!r}")
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride}")
        floats = {  # name: (low, high, low inclusive, high inclusive)
            "label_smoothing": (0.0, 1.0, True, False),
            "hflip": (0.0, 1.0, True, True),
            "ema_decay": (0.0, 1.0, True, False),
            "magnitude": (0.0, 30.0, True, True),
            "crop_pct": (0.0, 1.0, False, True),
            "base_lr": (0.0, 100.0, False, True),
            "min_lr": (0.0, 100.0, True, True),
            "warmup_epochs": (0.0, 1e6, True, True),
            "momentum": (0.0, 1.0, True, False),
            "weight_decay": (0.0, 1.0, True, True),
            "weight_decay_end": (0.0, 1.0, True, True),
            "distill_alpha": (0.0, 1.0, True, True),
            "distill_temperature": (0.0, 100.0, False, True),
            "anchor_min_ratio": (0.0, 1.0, False, False),
            "anchor_max_ratio": (0.0, 1.0, False, True),
            "score_thresh": (0.0, 1.0, True, False),
            "nms_thresh": (0.0, 1.0, False, True),
            "aux_weight": (0.0, 10.0, True, True),
        }
        for name, (lo, hi, lo_in, hi_in) in floats.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
            if not ok:
                rng = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
                raise ValueError(f"{name} must be a number in {rng}, got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr <= 100):
            raise ValueError(f"lr must be a number in (0, 100], got {self.lr!r}")
        lo, hi = self.crop_scale if len(self.crop_scale) == 2 else (None, None)
        if lo is None or not 0 < lo <= hi <= 1:
            raise ValueError(
                f"crop_scale must be two numbers 0 < min <= max <= 1 (area fractions), got {self.crop_scale}"
            )
        if self.anchor_min_ratio >= self.anchor_max_ratio:
            raise ValueError(
                f"anchor_min_ratio ({self.anchor_min_ratio}) must be below anchor_max_ratio ({self.anchor_max_ratio})"
            )
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} must split evenly into {self.accum_steps} accumulation steps"
            )
        if self.arch is not None:
            fields = sorted(f.name for f in dataclasses.fields(MobileOneConfig))
            try:
                MobileOneConfig(**self.arch)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"arch must be a JSON object of MobileOneConfig fields ({', '.join(fields)}); "
                    f"{self.arch!r} is not valid: {e}"
                ) from e
        return self


# Values a recipe sets unless the user sets them. "short" is the default: it is what most users
# run (a few epochs on a few thousand images) and what benchmarks/underfit.py tuned.
RECIPES: dict[str, dict[str, Any]] = {
    "imagenet": {"epochs": 300, "batch_size": 256, "warmup_epochs": 5.0, "init": "torch", "img_size": 224},
    "short": {"epochs": 10, "warmup_epochs": 1.0, "init": "identity"},
    "finetune": {"epochs": 10, "base_lr": 0.01, "warmup_epochs": 1.0, "init": "torch"},
}
# What --resume may change in a saved run: where and how it runs, not what it computes.
RESUMABLE = ("workers", "progress", "device", "threads", "log_every")


def resolve_config(
    task: Task, recipe: str | None = None, hold_weight_decay: bool = False, **explicit: Any
) -> TrainConfig:
    """Defaults <- recipe <- task (and its variant and built-in data) <- what the user gave (not None).

    Without a recipe: ``finetune`` when fine-tuning from ``pretrained`` (classification), else ``short``.
    With ``resume`` the run's saved ``config.json`` is used, and only ``RESUMABLE`` options may change.
    ``hold_weight_decay`` (``--no-wd-anneal``): the weight decay the run resolves to (the task's, the
    recipe's or ``weight_decay``) is held to the end instead of annealed.
    """
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if hold_weight_decay and "weight_decay_end" in explicit:
        raise ValueError("--no-wd-anneal holds the weight decay constant; drop --weight-decay-end (or the flag)")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(explicit) - names
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}; valid: {sorted(names)}")
    if explicit.get("resume"):
        saved = Path(explicit["resume"]) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist (is {explicit['resume']} a run directory?)")
        try:
            values = json.loads(saved.read_text())
            if not isinstance(values, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise ValueError(f"cannot resume: {saved} is not a readable training config ({e})") from e
        ignored = sorted(set(explicit) - {"resume", "task", *RESUMABLE})
        if explicit.get("task", values.get("task", "classify")) != values.get("task", "classify"):
            raise ValueError(f"{explicit['resume']} is a {values.get('task', 'classify')} run, not {explicit['task']}")
        if ignored:
            warnings.warn(f"--resume uses the run's saved config; ignoring {ignored}", stacklevel=2)
        values.update({k: explicit[k] for k in RESUMABLE if k in explicit})
        values["resume"], values["out"] = explicit["resume"], explicit["resume"]
        stale = set(values) - names
        if stale:
            raise ValueError(f"cannot resume: {saved} has options this version does not know: {sorted(stale)}")
        return TrainConfig(**values).validate()
    recipe = recipe or ("finetune" if explicit.get("pretrained") and task.name == "classify" else "short")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {list(RECIPES)}")
    variant = explicit.get("variant", "s0")
    if variant != "mnv3":
        variant = resolve_variant(variant)
    values = {**RECIPES[recipe], **task.defaults(recipe, variant, explicit.get("data") is None)}
    values.update(explicit)
    if hold_weight_decay:
        values["weight_decay_end"] = values.get("weight_decay", TrainConfig.weight_decay)
    values["recipe"], values["task"] = recipe, task.name
    values["auto_batch"] = "batch_size" not in explicit
    own_data = explicit.get("data") is not None
    values["auto_img_size"] = own_data and "img_size" not in explicit
    values["auto_epochs"] = own_data and "epochs" not in explicit and "steps_per_epoch" not in explicit
    cfg = TrainConfig(**values).validate()
    task.validate(cfg, frozenset(explicit))
    check_batch_floor(cfg, task.min_batch)
    return cfg


def check_batch_floor(cfg: TrainConfig, min_batch: int, world: int = 1) -> None:
    """Refuse a batch whose micro-batches (per process) are smaller than a model's BatchNorm needs."""
    micro = cfg.batch_size // (world * cfg.accum_steps)
    if micro < min_batch:
        split = f" over {world} processes" if world > 1 else ""
        raise ValueError(
            f"this {cfg.task} model trains on at least {min_batch} images per micro-batch (BatchNorm in train "
            f"mode over its 1x1 maps needs two values); --batch-size {cfg.batch_size} with --accum-steps "
            f"{cfg.accum_steps}{split} gives {micro}: raise --batch-size"
        )
