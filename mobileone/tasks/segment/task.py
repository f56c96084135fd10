"""Semantic segmentation on the training engine: DeepLabV3 / LR-ASPP, cross-entropy with ignore, mIoU.

``mobileone train --task segment`` trains a MobileOne backbone (``--variant s0..s4, mu0..mu2`` or
``--arch``) or the MobileNetV3-Large peer (``--variant mnv3``) under the head ``--head``, with the
same loop, schedules, EMA, AMP, DDP and resume as classification. ``--pretrained`` loads a
classification checkpoint into the backbone; ``--aux-weight`` weighs DeepLabV3's auxiliary loss
(0 removes the auxiliary head). Validation runs at full resolution, image by image when sizes
differ, and the epoch's ``miou`` and ``pixel_acc`` (percent) go to ``metrics.jsonl``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.config import VARIANTS, MobileOneConfig, resolve_variant
from ...core.files import atomic_write
from ...core.model import init_branches
from ...engine.config import TrainConfig
from ...engine.distributed import Env, all_reduce_sum
from ...engine.task import DataError, Task, TaskData
from ..images import short_sides
from ..peer_init import zero_init_residuals
from .builtin import builtin_scenes
from .data import SegmentationDataset, collate_masks, eval_transform, load_splits, train_transform
from .evaluate import confusion_over, predict
from .masks import voc_palette
from .metrics import segmentation_scores
from .model import IGNORE_INDEX, MNV3, Segmenter, create_segmenter, load_segmenter, save_segmenter

# Segmentation's own defaults (the recipe's are classification's): VOC-style 512 px crops, batch 16,
# no label smoothing, lr 0.02 at batch 16 (base_lr per 256 images).
SEGMENT_DEFAULTS: dict[str, Any] = {
    "head": "deeplabv3",
    "img_size": 512,
    "batch_size": 16,
    "base_lr": 0.32,
    "label_smoothing": 0.0,
}
# The built-in digit scenes: 64 px, 800 training scenes, 50 steps an epoch, peak LR 0.2 (LR-ASPP on S0,
# 8 epochs, seed 0: 32.7 mIoU at LR 0.1, 38.3 at 0.2, 36.6 at 0.4).
BUILTIN_DEFAULTS: dict[str, Any] = {"img_size": 64, "epochs": 8, "batch_size": 16, "hflip": 0.0, "base_lr": 3.2}
BUILTIN_SCENE_SIZE = 64


def segmentation_loss(out: dict[str, Tensor], masks: Tensor, aux_weight: float, label_smoothing: float) -> Tensor:
    """Cross-entropy over the non-ignored pixels, plus ``aux_weight`` x that of the auxiliary head.

    Summed and divided by the number of labelled pixels (at least 1), so a crop that is all
    ignore contributes zero instead of NaN.
    """
    valid = (masks != IGNORE_INDEX).sum().clamp(min=1)

    def ce(logits: Tensor) -> Tensor:
        return (
            F.cross_entropy(
                logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
            )
            / valid
        )

    loss = ce(out["out"])
    if "aux" in out and aux_weight > 0:
        loss = loss + aux_weight * ce(out["aux"])
    return loss


def build_segmenter(cfg: TrainConfig, classes: Sequence[str]) -> Segmenter:
    """The train-time model of a run: backbone from ``--pretrained`` or initialised with ``cfg.init``."""
    aux = cfg.head == "deeplabv3" and cfg.aux_weight > 0
    common = {
        "num_classes": len(classes),
        "output_stride": cfg.output_stride,
        "aux": aux,
        "backbone_checkpoint": cfg.pretrained,
        "class_names": list(classes),
    }
    if cfg.variant == MNV3:
        model = create_segmenter(f"{cfg.head}_{MNV3}", **common)
        if cfg.init == "identity":
            zero_init_residuals(model.backbone)
    else:
        arch = MobileOneConfig(**cfg.arch) if cfg.arch else VARIANTS[resolve_variant(cfg.variant)]
        if cfg.k is not None:
            arch = arch.replace(k=cfg.k)
        if not cfg.branches:
            arch = arch.replace(k=1, stem_k=1, scale_branch=False, skip_branch=False)
        model = create_segmenter(cfg.head, arch=arch, **common)
        if not cfg.pretrained:
            init_branches(model.backbone, cfg.init)
        if cfg.freeze_stages:
            model.backbone.freeze_stages(cfg.freeze_stages)
    model.preprocess["input_size"] = cfg.img_size
    return model


class SegmentTask(Task):
    """Segmentation of an image/mask folder tree, Pascal VOC, or the built-in digit scenes."""

    name = "segment"
    metric = "miou"
    metric_names = ("miou", "pixel_acc")
    min_img_size = 64  # crops of at least 4x4 cells at output stride 16

    def defaults(self, recipe: str, variant: str, builtin: bool) -> dict[str, Any]:
        return {**SEGMENT_DEFAULTS, **(BUILTIN_DEFAULTS if builtin else {})}

    def validate(self, cfg: TrainConfig, given: frozenset[str] = frozenset()) -> None:
        if cfg.head is None:
            cfg.head = SEGMENT_DEFAULTS["head"]
        if cfg.head not in ("deeplabv3", "lraspp"):
            raise ValueError(f"--head {cfg.head} is a detection head; segmentation heads: deeplabv3, lraspp")
        # DeepLabV3's image pooling normalizes 1x1 maps: BatchNorm needs two images; LR-ASPP has no such layer.
        self.min_batch = 1 if cfg.head == "lraspp" else 2
        if cfg.head == "lraspp" and "aux_weight" in given and cfg.aux_weight > 0:
            raise ValueError("--aux-weight weighs DeepLabV3's auxiliary head; LR-ASPP has none (--head deeplabv3)")
        if cfg.augment != "none":
            raise ValueError(
                "--augment (RandAugment/AutoAugment) is classification's; segmentation augments image "
                "and mask together (random scale, crop, flip)"
            )
        if cfg.teacher:
            raise ValueError("--teacher (distillation) is classification's; segmentation trains on the masks")
        if cfg.data_format not in ("auto", "masks", "voc"):
            raise ValueError(f"--data-format {cfg.data_format} is a detection layout; segmentation reads masks or voc")
        if cfg.variant == MNV3:
            if cfg.output_stride != 16:
                raise ValueError("--variant mnv3 (torchvision's MobileNetV3-Large) runs at --output-stride 16 only")
            backbone_only = [
                n
                for n, v in (
                    ("--pretrained", cfg.pretrained),
                    ("--arch", cfg.arch),
                    ("--k", cfg.k),
                    ("--freeze-stages", cfg.freeze_stages),
                )
                if v
            ]
            if backbone_only or not cfg.branches:
                named = ", ".join(backbone_only) or "--no-branches"
                raise ValueError(
                    f"{named} apply to MobileOne backbones; --variant mnv3 is the MobileNetV3-Large "
                    "peer, built without weights"
                )

    def load_data(self, cfg: TrainConfig, env: Env) -> TaskData:
        root = Path(cfg.data) if cfg.data else builtin_scenes(size=BUILTIN_SCENE_SIZE)
        with warnings.catch_warnings():
            if not env.main:  # one copy of each data warning, from rank 0
                warnings.simplefilter("ignore")
            samples, classes, _ = load_splits(root, cfg.data_format)
        train = SegmentationDataset(samples["train"], classes, seed=cfg.seed)
        val = SegmentationDataset(samples["val"], classes, eval_transform())
        return TaskData(train, val, classes)

    def build_model(self, cfg: TrainConfig, classes: Sequence[str]) -> nn.Module:
        return build_segmenter(cfg, classes)

    def image_sides(self, data: TaskData) -> list[int]:
        return short_sides([image for image, _ in data.train.samples])

    def set_train_transform(self, data: TaskData, cfg: TrainConfig, size: int, strength: float) -> None:
        data.train.transform = train_transform(size, cfg.hflip)

    def collate(self):
        return collate_masks

    def loss(self, net: nn.Module, images: Tensor, targets: Tensor, cfg: TrainConfig) -> Tensor:
        return segmentation_loss(net(images), targets, cfg.aux_weight, cfg.label_smoothing)

    def evaluate(self, model: nn.Module, loader: Any, env: Env) -> dict[str, float]:
        n = model.num_classes
        cm, bad = confusion_over(model, loader, n, env.device, env.amp_dtype, env.channels_last)
        cm = all_reduce_sum(cm, env)
        if int(cm.sum()) == 0:
            raise DataError(
                f"no validation pixel could be scored ({bad} unreadable images on this rank, all other "
                f"pixels {IGNORE_INDEX}); check the files under the validation folder"
            )
        scores = segmentation_scores(cm)
        return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"]}

    def save(self, model: nn.Module, path: Path, **meta: Any) -> Path:
        return save_segmenter(model, path, **meta)

    def load(self, path: Path) -> nn.Module:
        return load_segmenter(path)

    def finish(self, run_dir: Path, best: nn.Module, data: TaskData, cfg: TrainConfig) -> None:
        draw_predictions(best, data.val, run_dir / "predictions.png")

    def epoch_line(self, row: dict[str, Any]) -> str:
        ema = f"  EMA mIoU {row['ema_miou']:.2f}" if row.get("ema_miou") is not None else ""
        return f"val mIoU {row['miou']:.2f}  pixel acc {row['pixel_acc']:.2f}{ema}"


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices as (H, W, 3) VOC palette colours; ignore pixels white."""
    rgb = voc_palette()[mask]
    rgb[mask == IGNORE_INDEX] = 255
    return rgb


@torch.no_grad()
def draw_predictions(model: nn.Module, dataset: SegmentationDataset, out: Path, n: int = 4) -> Path | None:
    """A picture of ``n`` validation images: the image, its mask, the prediction (and the pixel accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = model.eval().cpu()
    rows = []
    for i in range(min(len(dataset), n * 3)):
        pair = dataset.read(i)
        if pair is None:
            continue
        x, _ = dataset[i]
        pred = predict(model, x[None].float()).argmax(1)[0].numpy().astype(np.uint8)
        rows.append((np.asarray(pair[0]), pair[1], pred))
        if len(rows) == n:
            break
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for r, (image, truth, pred) in enumerate(rows):
        labelled = truth != IGNORE_INDEX
        acc = 100.0 * float((pred[labelled] == truth[labelled]).mean()) if labelled.any() else float("nan")
        for c, (title, panel) in enumerate(
            (("image", image), ("mask", colorize(truth)), (f"prediction ({acc:.0f} % px)", colorize(pred)))
        ):
            axes[r][c].imshow(panel, interpolation="nearest")
            axes[r][c].set_axis_off()
            if r == 0 or c == 2:
                axes[r][c].set_title(title, fontsize=9)
    names = getattr(model, "class_names", None)
    if names:
        fig.suptitle(f"classes: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}", fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out
