"""Image classification on the training engine: ImageFolder data, cross-entropy, top-1 / top-5.

The recipe per variant follows the paper: S0 (and the micro variants) crop + flip; S1 progressive
image size; S2-S4 progressive size and RandAugment. Distillation from a teacher checkpoint
(Hinton's soft targets) is part of this task's loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from ...core.config import MobileOneConfig, resolve_variant
from ...core.factory import create_model
from ...core.fusion import reparameterize_model
from ...core.model import MobileOne, init_branches
from ...engine.config import TrainConfig
from ...engine.distributed import Env, all_reduce_sum
from ...engine.task import DataError, Task, TaskData
from ..images import short_sides
from .data import ImageFolderDataset, builtin_dataset, check_splits, collate_skip_bad, eval_transform, train_transform
from .evaluate import accuracy_counts

# The paper's per-variant augmentation: S0 crop + flip; S1 progressive size; S2-S4 also RandAugment.
VARIANT_RECIPES: dict[str, dict[str, Any]] = {
    "mobileone_s1": {"progressive": True},
    **{f"mobileone_s{i}": {"progressive": True, "augment": "randaugment"} for i in (2, 3, 4)},
}
# The built-in digits: 8x8 scans, upsampled; digits are not mirror-symmetric.
# Batch 64: 22 steps an epoch on its 1,437 training images, as in experiments/underfit.py.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "img_size": 32,
    "hflip": 0.0,
    "crop_scale": (0.5, 1.0),
    "epochs": 10,
    "batch_size": 64,
}


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at ``temperature``, scaled by T^2."""
    t = temperature
    return (
        F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True)
        * t
        * t
    )


def build_classifier(cfg: TrainConfig, num_classes: int) -> MobileOne:
    """The train-time model: from a checkpoint (new head) when fine-tuning, else fresh with ``cfg.init``."""
    if cfg.pretrained:
        ckpt = read_checkpoint(cfg.pretrained)
        if ckpt.fused:
            warnings.warn(
                f"{cfg.pretrained} holds fused weights: fine-tuning the plain network (one conv per layer). The "
                "train-time branches are gone, which the paper's ablation prices at 1-2 points of ImageNet top-1 "
                "(S0 69.6 vs 71.4 % trained without and with them); fine-tune the unfused file if you have it",
                stacklevel=2,
            )
        model = MobileOne(ckpt.config, num_classes, inference_mode=ckpt.fused, variant=ckpt.variant)
        model = load_checkpoint(cfg.pretrained, model, reset_head=True)
    else:
        overrides: dict[str, Any] = {}
        if cfg.k is not None:
            overrides["k"] = cfg.k
        if not cfg.branches:
            overrides.update(k=1, stem_k=1, scale_branch=False, skip_branch=False)
        model = init_branches(create_model(cfg.arch or cfg.variant, num_classes=num_classes, **overrides), cfg.init)
    if cfg.freeze_stages:
        model.freeze_stages(cfg.freeze_stages)
    return model


class ClassifyTask(Task):
    """Classification of an ImageFolder tree (``train/<class>/``, ``val/<class>/``) or the built-in digits."""

    name = "classify"
    metric = "val_top1"
    metric_names = ("val_top1", "val_top5")

    def __init__(self) -> None:
        self.teacher: nn.Module | None = None

    def defaults(self, recipe: str, variant: str, builtin: bool) -> dict[str, Any]:
        return {**VARIANT_RECIPES.get(variant, {}), **(BUILTIN_DEFAULTS if builtin else {})}

    def validate(self, cfg: TrainConfig, given: frozenset[str] = frozenset()) -> None:
        if cfg.variant == "mnv3":
            raise ValueError(
                "--variant mnv3 is the MobileNetV3 peer of detection and segmentation; "
                "classification trains MobileOnes (s0..s4, mu0..mu2)"
            )
        if cfg.pretrained:  # the architecture comes from the file: the config must say which it is
            ckpt = read_checkpoint(cfg.pretrained)
            differs = {
                "variant": lambda: resolve_variant(cfg.variant) != ckpt.variant,
                "arch": lambda: cfg.arch is not None and MobileOneConfig(**cfg.arch) != ckpt.config,
                "k": lambda: cfg.k is not None and ckpt.config.k != (cfg.k,) * 4,
                "branches": lambda: not cfg.branches,
            }
            clash = [o for o, test in differs.items() if o in given and test()]
            if clash:
                raise ValueError(
                    f"--pretrained {cfg.pretrained} holds {ckpt.variant or 'a custom architecture'}, which "
                    f"fixes the architecture; drop {', '.join('--' + c for c in clash)} (or pick a checkpoint of "
                    "the architecture you want)"
                )
            cfg.variant = ckpt.variant or cfg.variant
            cfg.arch = None if ckpt.variant else ckpt.config.to_dict()

    def load_data(self, cfg: TrainConfig, env: Env) -> TaskData:
        root = Path(cfg.data) if cfg.data else builtin_dataset()
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(
                    f"{root} has no {split}/ folder; --data expects {root}/train/<class>/... and "
                    f"{root}/val/<class>/... (ImageFolder layout)"
                )
        train_ds = ImageFolderDataset(root / "train", seed=cfg.seed)
        val_ds = ImageFolderDataset(root / "val")
        check_splits(train_ds, val_ds)
        if len(train_ds.classes) == 1:
            warnings.warn(
                f"{root / 'train'} has a single class ({train_ds.classes[0]}): every prediction is right, "
                "so loss and accuracy will mean nothing; add a folder per class",
                stacklevel=2,
            )
        return TaskData(train_ds, val_ds, list(train_ds.classes))

    def build_model(self, cfg: TrainConfig, classes: Sequence[str]) -> nn.Module:
        model = build_classifier(cfg, len(classes))
        model.class_names = list(classes)
        model.preprocess.update(input_size=cfg.img_size, crop_pct=cfg.crop_pct)
        return model

    def prepare(self, cfg: TrainConfig, env: Env, model: nn.Module) -> None:
        self.teacher = None
        if not cfg.teacher:
            return
        teacher = load_checkpoint(cfg.teacher)
        if teacher.num_classes != model.num_classes:
            raise ValueError(
                f"teacher {cfg.teacher} has {teacher.num_classes} classes, the data has "
                f"{model.num_classes}; distil from a teacher trained on these classes"
            )
        if not teacher.inference_mode:
            teacher = reparameterize_model(teacher.eval())
        self.teacher = teacher.to(env.device).eval().requires_grad_(False)

    def image_sides(self, data: TaskData) -> list[int]:
        return short_sides([path for path, _ in data.train.samples])

    def set_eval_transform(self, data: TaskData, cfg: TrainConfig) -> None:
        data.val.transform = eval_transform(cfg.img_size, cfg.crop_pct)

    def set_train_transform(self, data: TaskData, cfg: TrainConfig, size: int, strength: float) -> None:
        data.train.transform = train_transform(size, cfg.crop_scale, cfg.hflip, cfg.augment, cfg.magnitude * strength)

    def collate(self):
        return collate_skip_bad

    def loss(self, net: nn.Module, images: Tensor, targets: Tensor, cfg: TrainConfig) -> Tensor:
        logits = net(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            soft = self.teacher(images)
        kd = distill_loss(logits.float(), soft.float(), cfg.distill_temperature)
        return (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd

    def evaluate(self, model: nn.Module, loader: Any, env: Env) -> dict[str, float]:
        counts = all_reduce_sum(accuracy_counts(model, loader, env.device, env.amp_dtype, env.channels_last), env)
        if counts[0] == 0:
            raise DataError(
                f"no validation image could be read ({int(counts[3])} unreadable); check the files "
                "under the validation folder"
            )
        n = counts[0].item()
        return {"val_top1": 100.0 * counts[1].item() / n, "val_top5": 100.0 * counts[2].item() / n}

    def save(self, model: nn.Module, path: Path, **meta: Any) -> Path:
        return save_checkpoint(model, path, **meta)

    def load(self, path: Path) -> nn.Module:
        return load_checkpoint(path)

    def epoch_line(self, row: dict[str, Any]) -> str:
        ema = f"  EMA top-1 {row['ema_val_top1']:.2f}" if row.get("ema_val_top1") is not None else ""
        return f"val top-1 {row['val_top1']:.2f}  top-5 {row['val_top5']:.2f}{ema}"
