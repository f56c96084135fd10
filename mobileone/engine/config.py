"""One training run as plain data: every option of every task, its recipes, and its validation.

The config is printed and saved as ``config.json`` in the run directory; every value the loop
uses is a field here. Options are validated once, in :meth:`TrainConfig.validate`, with the valid
range in the message, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import MobileOneConfig, resolve_variant
from ..core.ranges import FRACTION, IMG_SIZE, MAX_DETECTIONS, THREADS, WORKERS, Range

if TYPE_CHECKING:
    from .task import Task


SECTIONS = {
    "data": "data and model",
    "optimization": "optimization",
    "schedule": "schedule",
    "augmentation": "augmentation",
    "detection": "detection (--task detect)",
    "segmentation": "segmentation (--task segment)",
    "run": "run: where, on what, how it reports",
}
CHOICES = {
    "task": ("classify", "detect", "segment"),
    "data_format": ("auto", "coco", "voc", "yolo", "masks"),
    "augment": ("none", "randaugment", "autoaugment"),
    "init": ("torch", "unit-sum", "identity"),
    "optimizer": ("sgd", "adamw"),
    "head": ("tal", "ssdlite", "deeplabv3", "lraspp"),
    "device": ("auto", "cuda", "cpu"),
    "amp": ("auto", "none", "bf16", "fp16"),
}


def option(
    default: Any,
    section: str,
    help: str,
    range: Range | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
    **extra: Any,
) -> Any:
    """A TrainConfig field with what validates it and what ``mobileone train --help`` says about it."""
    meta = {"section": section, "help": help, "range": range, "choices": choices, "cli": cli, **extra}
    return field(default=default, metadata=meta)


# Values a recipe sets unless the user sets them. "short" is the default: it is what most users
# run (a few epochs on a few thousand images) and what experiments/underfit.py tuned.
RECIPES: dict[str, dict[str, Any]] = {
    "imagenet": {"epochs": 300, "batch_size": 256, "warmup_epochs": 5.0, "init": "torch", "img_size": 224},
    "short": {"epochs": 10, "warmup_epochs": 1.0, "init": "identity"},
    "finetune": {"epochs": 10, "base_lr": 0.01, "warmup_epochs": 1.0, "init": "torch"},
}
# AdamW's learning rate for what SGD trains at rate r (both at batch 256): 0.04 r. Detection's measured pair
# (0.2 for SGD, 0.008 for AdamW) is the rule; --optimizer without --base-lr converts the defaults' rate by it.
ADAMW_PER_SGD = 0.04
UNIT = Range(0.0, 1.0)  # probabilities and fractions, both ends included
BELOW_ONE = Range(0.0, 1.0, high_open=True)
RATE = Range(0.0, 100.0, low_open=True)


@dataclass
class TrainConfig:
    """One training run, its options grouped by section. ``None`` fields are filled from the recipe and the task
    (see :func:`resolve_config`); each field's metadata holds its help, choices and valid range."""

    # --- data and model
    task: str = option(
        "classify", "data", "classify, detect (tal, SSDLite) or segment (DeepLabV3, LR-ASPP)", choices=CHOICES["task"]
    )
    data: str | None = option(
        None,
        "data",
        "the task's data folder (classify: train/ and val/ with a folder per class); default: built-in data",
    )
    data_format: str = option("auto", "data", "annotation layout; auto: detected", choices=CHOICES["data_format"])
    variant: str = option("s0", "data", "s0..s4, mu0..mu2; detect / segment also mnv3, the MobileNetV3 peer")
    arch: dict[str, Any] | None = option(
        None,
        "data",
        'a custom MobileOneConfig as JSON, e.g. \'{"widths": [8,16,32,64], "stem_width": 8, "k": 2}\'',
        json=True,
    )
    pretrained: str | None = option(
        None, "data", "fine-tune from this checkpoint (new head); detect / segment: a classifier of the backbone"
    )
    freeze_stages: int = option(
        0, "data", "freeze the stem and the first stages, BN included", Range(0, 5, integer=True)
    )
    k: int | None = option(
        None, "data", "conv branches per layer (the variant's; paper ablation: 1)", Range(1, 16, integer=True)
    )
    branches: bool = option(True, "data", "k = 1 and no scale / skip branches (paper ablation)", flag="--no-branches")
    init: str = option(
        "torch", "data", "branch BN scales at the start (identity: skip layers)", choices=CHOICES["init"]
    )
    # --- optimization
    optimizer: str = option(
        "sgd", "optimization", "sgd (the paper's) or adamw (short runs from scratch)", choices=CHOICES["optimizer"]
    )
    base_lr: float = option(
        0.1, "optimization", "learning rate at batch 256 (SGD: x batch / 256; AdamW: x sqrt(batch / 256))", RATE
    )
    lr: float | None = option(None, "optimization", "peak learning rate (overrides --base-lr)", RATE)
    min_lr: float = option(1e-6, "optimization", "learning rate at the end of the cosine", Range(0.0, 100.0))
    momentum: float = option(0.9, "optimization", "SGD momentum (AdamW's beta1)", BELOW_ONE)
    weight_decay: float = option(1e-4, "optimization", "weight decay at the start", UNIT)
    weight_decay_end: float = option(
        1e-5, "optimization", "cosine-annealed weight decay at the end (= --weight-decay: constant)", UNIT
    )
    label_smoothing: float = option(0.1, "optimization", "label smoothing", BELOW_ONE)
    ema_decay: float = option(0.9995, "optimization", "EMA of weights and buffers; 0: no EMA", BELOW_ONE)
    ema_warmup: bool = option(True, "optimization", "constant EMA decay from the first step", flag="--no-ema-warmup")
    teacher: str | None = option(None, "optimization", "teacher checkpoint (same classes) for knowledge distillation")
    distill_alpha: float = option(0.5, "optimization", "weight of the soft-target loss", UNIT)
    distill_temperature: float = option(2.0, "optimization", "distillation temperature", RATE)
    # --- schedule
    recipe: str = option(
        "short", "schedule", "imagenet: the paper's; finetune: the default with --pretrained", choices=tuple(RECIPES)
    )
    epochs: int = option(10, "schedule", "epochs", Range(1, None, integer=True))
    time: float | None = option(
        None,
        "schedule",
        "train for about this many minutes: before each epoch the epochs are set to what fits at the pace so "
        "far, and the cosine follows (--epochs then only sizes the first epoch)",
        Range(0.0, None, low_open=True),
        metavar="MINUTES",
    )
    batch_size: int = option(
        128, "schedule", "global batch, over all processes and micro-batches", Range(1, None, integer=True)
    )
    auto_batch: bool = option(False, "schedule", "the batch was not set: lowered when the data is small", cli=False)
    auto_epochs: bool = option(
        False, "schedule", "not set (own data): raised to a floor of steps on small data", cli=False
    )
    accum_steps: int = option(
        1, "schedule", "split each batch into this many micro-batches", Range(1, None, integer=True)
    )
    steps_per_epoch: int | None = option(None, "schedule", "cap the steps of each epoch", Range(1, None, integer=True))
    warmup_epochs: float = option(5.0, "schedule", "linear LR warm-up (at most a fifth of the run)", Range(0.0, 1e6))
    progressive: bool = option(False, "schedule", "0.71x, 0.86x, 1x --img-size over the run (160 -> 192 -> 224)")
    # --- augmentation
    img_size: int = option(224, "augmentation", "final training size, also the evaluation size", IMG_SIZE)
    auto_img_size: bool = option(
        False, "augmentation", "not set (own data): lowered to the images' own size", cli=False
    )
    crop_pct: float = option(0.875, "augmentation", "evaluation crop ratio", FRACTION)
    crop_scale: tuple[float, float] = option(
        (0.08, 1.0), "augmentation", "random-resized-crop area range", nargs=2, metavar=("MIN", "MAX")
    )
    hflip: float = option(0.5, "augmentation", "horizontal flip probability", UNIT)
    augment: str = option("none", "augmentation", "strength rises with the image size", choices=CHOICES["augment"])
    magnitude: float = option(7.0, "augmentation", "RandAugment magnitude at full strength", Range(0.0, 30.0))
    # --- detection and segmentation: the head (None: the task's default)
    head: str | None = option(
        None,
        "data",
        "detect: tal (default) or ssdlite; segment: deeplabv3 (default) or lraspp",
        choices=CHOICES["head"],
    )
    # --- detection
    mosaic: float = option(0.5, "detection", "share of training samples tiled from four images", UNIT)
    anchor_min_ratio: float | None = option(
        None,
        "detection",
        "ssdlite: smallest default box / image size (SSD's s_min); default: fitted to the training boxes",
        Range(0.0, 1.0, low_open=True, high_open=True),
    )
    anchor_max_ratio: float | None = option(
        None, "detection", "ssdlite: largest default box / image size; default: fitted", FRACTION
    )
    score_thresh: float = option(0.001, "detection", "lowest score kept for evaluation", BELOW_ONE)
    nms_thresh: float = option(0.55, "detection", "IoU of per-class NMS", FRACTION)
    max_detections: int = option(300, "detection", "detections kept per image", MAX_DETECTIONS)
    # --- segmentation
    output_stride: int = option(16, "segmentation", "backbone output stride (8 or 16)", Range(8, 16, integer=True))
    aux_weight: float = option(
        0.4, "segmentation", "auxiliary FCN loss weight (deeplabv3); 0: no aux head", Range(0.0, 10.0)
    )
    # --- run
    out: str = option("runs/mobileone", "run", "run directory")
    resume: str | None = option(None, "run", "continue a run from its last completed epoch", metavar="RUN_DIR")
    workers: int | None = option(None, "run", "data-loading processes per rank; default: fits the cores", WORKERS)
    threads: int | None = option(None, "run", "torch CPU threads; default: the cores the workers leave", THREADS)
    seed: int = option(0, "run", "random seed", Range(0, 2**63 - 1, integer=True))
    deterministic: bool = option(False, "run", "deterministic kernels (exact resume)")
    device: str = option("auto", "run", "auto: CUDA when there is one", choices=CHOICES["device"])
    amp: str = option(
        "auto",
        "run",
        "mixed precision (auto: bf16 on CUDA, and for the tal detector on a CPU with native bf16)",
        choices=CHOICES["amp"],
    )
    channels_last: bool | None = option(None, "run", "channels-last memory format (default: on CUDA)")
    compile: bool = option(False, "run", "torch.compile the model")
    sync_bn: bool = option(False, "run", "SyncBatchNorm across GPUs")
    strict_images: bool = option(False, "run", "stop on an unreadable image instead of skipping it")
    progress: bool = option(True, "run", "no progress bar", flag="--no-progress")
    eval_every: int | None = option(
        None,
        "run",
        "validate every N epochs (the last always; best.* among the validated); default: every epoch, "
        "detection at most 10 validations a run",
        Range(1, None, integer=True),
    )
    log_every: int | None = option(
        None, "run", "without a terminal, a progress line every N steps", Range(1, None, integer=True)
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> TrainConfig:
        """Every option in its valid range, or a ValueError naming the option and the range."""
        self.crop_scale = tuple(self.crop_scale)
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None and f.default is None:
                continue
            if meta.get("choices") and value not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
            if meta.get("range") is not None:
                meta["range"].check(f.name, value)
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride}")
        self._validate_together()
        return self

    def _validate_together(self) -> None:
        """The checks that involve two options (or a structure)."""
        lo, hi = self.crop_scale if len(self.crop_scale) == 2 else (None, None)
        if lo is None or not 0 < lo <= hi <= 1:
            raise ValueError(
                f"crop_scale must be two numbers 0 < min <= max <= 1 (area fractions), got {self.crop_scale}"
            )
        low, high = self.anchor_min_ratio or 0.0, self.anchor_max_ratio or 1.0
        if low >= high:
            raise ValueError(
                f"anchor_min_ratio ({self.anchor_min_ratio}) must be below anchor_max_ratio ({self.anchor_max_ratio})"
            )
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} must split evenly into {self.accum_steps} accumulation steps"
            )
        if self.arch is not None:
            names = sorted(f.name for f in fields(MobileOneConfig))
            try:
                MobileOneConfig(**self.arch)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"arch must be a JSON object of MobileOneConfig fields ({', '.join(names)}); "
                    f"{self.arch!r} is not valid: {e}"
                ) from e

    @classmethod
    def sections(cls) -> dict[str, list[Field]]:
        """The fields by section, in their order: what ``mobileone train --help`` groups."""
        out: dict[str, list[Field]] = {s: [] for s in SECTIONS}
        for f in fields(cls):
            out[f.metadata["section"]].append(f)
        return out


# What --resume may change in a saved run: where and how it runs, not what it computes.
RESUMABLE = ("workers", "progress", "device", "threads", "log_every")


def _saved_config(run: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a run directory, or an error saying why it cannot be resumed."""
    saved = Path(run) / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"cannot resume: {saved} does not exist (is {run} a run directory?)")
    try:
        values = json.loads(saved.read_text())
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"cannot resume: {saved} is not a readable training config ({e})") from e
    return values


def run_task(run: str | os.PathLike) -> str:
    """The task of a saved run (what ``--resume`` continues, whatever ``--task`` says)."""
    return _saved_config(run).get("task", "classify")


def _resumed(task: Task, explicit: dict[str, Any], names: set[str]) -> TrainConfig:
    """The saved config of ``explicit["resume"]``, with only the ``RESUMABLE`` options changed."""
    run = explicit["resume"]
    values = _saved_config(run)
    saved_task = values.get("task", "classify")
    if task.name != saved_task:
        raise ValueError(f"{run} is a {saved_task} run, not {task.name}; drop --task to continue it")
    ignored = sorted(set(explicit) - {"resume", "task", *RESUMABLE})
    if ignored:
        warnings.warn(f"--resume uses the run's saved config; ignoring {ignored}", stacklevel=3)
    values.update({k: explicit[k] for k in RESUMABLE if k in explicit})
    values["resume"], values["out"] = run, run
    stale = set(values) - names
    if stale:
        raise ValueError(f"cannot resume: {run}/config.json has options this version does not know: {sorted(stale)}")
    return TrainConfig(**values).validate()


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
        return _resumed(task, explicit, names)
    recipe = recipe or ("finetune" if explicit.get("pretrained") and task.name == "classify" else "short")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {list(RECIPES)}")
    variant = explicit.get("variant", "s0")
    if variant != "mnv3":
        variant = resolve_variant(variant)
    values = {**RECIPES[recipe], **task.defaults(recipe, variant, explicit.get("data") is None)}
    planned = values.get("optimizer", TrainConfig.optimizer)
    values.update(explicit)
    if values.get("optimizer", planned) != planned and not {"base_lr", "lr"} & set(explicit):
        # the defaults' rate is for their own optimizer: carry it over (SGD 0.1 at batch 256 <-> AdamW 0.004)
        rate = values.get("base_lr", TrainConfig.base_lr)
        values["base_lr"] = round(rate * ADAMW_PER_SGD if planned == "sgd" else rate / ADAMW_PER_SGD, 12)
    if hold_weight_decay:
        values["weight_decay_end"] = values.get("weight_decay", TrainConfig.weight_decay)
    values["recipe"], values["task"] = recipe, task.name
    values["auto_batch"] = "batch_size" not in explicit
    own_data = explicit.get("data") is not None
    values["auto_img_size"] = own_data and "img_size" not in explicit
    values["auto_epochs"] = own_data and not {"epochs", "steps_per_epoch", "time"} & set(explicit)
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
