"""Object detection on the training engine: the tal or SSDLite head on MobileOne (or the MobileNetV3 peer).

``mobileone train --task detect --data DIR --out RUN`` runs the same loop as classification
(schedules, EMA, resume, DDP, AMP, curves); this module supplies the COCO / VOC / YOLO data with
dense-scene augmentation, the detector (priors fitted to the training boxes), COCO-style mAP of a
fused copy every epoch on letterboxed validation images, and a picture of predictions at the end.

A small set gets a minimum number of optimizer steps whatever the epoch count: each epoch passes
over the images as often as it takes (``DETECT_MIN_STEPS``), so warm-up and cosine run over enough
steps to learn from a few hundred images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from ...core.branch_stats import use_fast_strided_depthwise
from ...core.config import VARIANTS, MobileOneConfig, resolve_variant
from ...engine.config import TrainConfig
from ...engine.distributed import Env, cpu_computes_bf16, pick_device
from ...engine.task import DataError, Task, TaskData
from .augment import DenseTrainData, letterbox_transform
from .builtin import digit_scenes
from .config import DEFAULT_HEAD, HEADS, DetectorConfig
from .data import DetectionDataset, collate_detection, load_splits, train_transform
from .evaluate import detection_metrics, predict_loader
from .model import PEER, Detector, create_detector, load_detector, save_detector
from .priors import box_sides, check_small_boxes, fit_ssdlite_ratios
from .visualize import draw_predictions

log = logging.getLogger("mobileone")

# Every detection run with user data: the tal head at 320 px, batch 16, AdamW at lr 0.002 (0.008 at batch
# 256, square-root scaled; what Ultralytics picks for runs this short), weight decay 5e-4 (as YOLO's) without
# annealing, and at least DETECT_MIN_STEPS optimizer steps (docs/detection.md: the ablation). SGD, asked for
# by name, gets 0.2 per 256 images (torchvision's SSDLite recipe: 0.15 at batch 192), by the engine's ADAMW_PER_SGD.
DETECT_DEFAULTS: dict[str, Any] = {
    "head": DEFAULT_HEAD,
    "img_size": 320,
    "batch_size": 16,
    "optimizer": "adamw",
    "base_lr": 0.008,
    "weight_decay": 5e-4,
    "weight_decay_end": 5e-4,
    "warmup_epochs": 1.0,
}
DETECT_MIN_STEPS = 600
# The built-in digit scenes (96 px, digits of 20-40 px): default boxes from 0.15 to 0.8 of the
# scene, no flips (digits are not mirror-symmetric), 3 epochs of 2,000 scenes in batches of 16 at
# lr 0.05 with a short warm-up (what learnt the most in the demo's few minutes among the settings
# tried), photometric distortion only (zoom-out and IoU crop slow a run this short down more than
# they help it).
BUILTIN_DEFAULTS: dict[str, Any] = {
    "head": "ssdlite",
    "optimizer": "sgd",
    "weight_decay": 4e-5,
    "weight_decay_end": 4e-5,
    "img_size": 96,
    "hflip": 0.0,
    "anchor_min_ratio": 0.15,
    "anchor_max_ratio": 0.8,
    "epochs": 3,
    "batch_size": 16,
    "base_lr": 0.8,
    "warmup_epochs": 0.3,
    "max_detections": 100,
}
BUILTIN_TOPK = 100  # candidates per class before NMS: a 96 px scene holds at most four digits


def detector_name(cfg: TrainConfig) -> str:
    head = cfg.head or DEFAULT_HEAD
    return (
        f"{head}_{PEER}" if cfg.variant == PEER else f"{head}_{resolve_variant(cfg.variant).removeprefix('mobileone_')}"
    )


def cpu_bf16_pays(device: str) -> bool:
    """Whether ``--amp auto`` trains a detector on ``device`` in bf16: a CPU that computes bf16 natively."""
    return pick_device(device).type == "cpu" and cpu_computes_bf16()


def build_detector_for(cfg: TrainConfig, classes: Sequence[str], **options: Any) -> Detector:
    """The detector a training config describes (variant or ``arch``, branch overrides, anchors, backbone weights);
    ``options``: further :class:`DetectorConfig` fields."""
    arch = dict(cfg.arch) if cfg.arch else None
    if cfg.variant != PEER and (cfg.k is not None or not cfg.branches):
        config = MobileOneConfig(**arch) if arch else VARIANTS[resolve_variant(cfg.variant)]
        config = config.replace(**({"k": cfg.k} if cfg.k else {}))
        if not cfg.branches:
            config = config.replace(k=1, stem_k=1, scale_branch=False, skip_branch=False)
        arch = config.to_dict()
    anchors = {"anchor_min_ratio": cfg.anchor_min_ratio, "anchor_max_ratio": cfg.anchor_max_ratio}
    options = {
        **{k: v for k, v in anchors.items() if v is not None},  # None: DetectorConfig's SSD defaults
        "score_thresh": cfg.score_thresh,
        "nms_thresh": cfg.nms_thresh,
        "max_detections": cfg.max_detections,
        **options,
    }
    return create_detector(
        detector_name(cfg),
        len(classes),
        cfg.img_size,
        cfg.pretrained,
        arch=arch,
        init=cfg.init,
        freeze_stages=cfg.freeze_stages,
        class_names=list(classes),
        **options,
    )


class DetectTask(Task):
    """Detection of COCO, VOC or YOLO data (or the built-in digit scenes, with SSDLite)."""

    name = "detect"
    metric = "map"
    metric_names = ("map", "map_50", "map_75")
    metric_labels = {"map": "mAP", "map_50": "mAP@0.5"}
    save = staticmethod(save_detector)
    load = staticmethod(load_detector)
    draw_predictions = staticmethod(draw_predictions)
    min_batch = 2  # BatchNorm over the 1x1 maps of the last extra block needs two images
    min_img_size = 64  # the extra blocks halve 1/32 of the input three more times
    max_validations = 10  # a validation costs about an eighth of a training epoch (docs/detection.md, "Training speed")

    def __init__(self) -> None:
        self.builtin = False
        self.val_data: DetectionDataset | None = None  # its records are the ground truth of evaluate()
        self.train_records: list = []

    def defaults(self, recipe: str, variant: str, builtin: bool) -> dict[str, Any]:
        return {**DETECT_DEFAULTS, **(BUILTIN_DEFAULTS if builtin else {})}

    def validate(self, cfg: TrainConfig, given: frozenset[str] = frozenset()) -> None:
        if cfg.head is None:
            cfg.head = DEFAULT_HEAD
        if cfg.head not in HEADS:
            raise ValueError(f"--head {cfg.head} is a segmentation head; detection heads: {', '.join(HEADS)}")
        if cfg.k is None and cfg.data is not None and not cfg.pretrained and not cfg.arch and cfg.variant != PEER:
            # S0 alone trains k = 4 conv branches a layer; on a CPU budget one branch trains about 2x faster and
            # fuses into the very same network (docs/detection.md: the ablation). A checkpoint keeps its own k.
            if resolve_variant(cfg.variant) == "mobileone_s0":
                cfg.k = 1
        measured = cfg.data is not None and cfg.head == "tal" and (cfg.k == 1 or cfg.variant == PEER)
        if cfg.amp == "auto" and measured and cpu_bf16_pays(cfg.device):
            # bf16 autocast on a CPU that computes bf16 natively: the default detector's step 1.5x faster, the
            # same mAP (docs/detection.md, "Training speed"); statistics, boxes and the loss stay float32. Only
            # where measured: k = 1 backbones (all "direct" layers) and the peer.
            cfg.amp = "bf16"
        # SSDLite's last extra block normalizes 1x1 maps: BatchNorm needs two images; the tal head's smallest map
        # is 1/32 of the input.
        self.min_batch = 2 if cfg.head == "ssdlite" else 1
        if cfg.progressive:
            raise ValueError(
                "--progressive changes the image size, but a detector's default boxes are laid out for "
                "one size (--img-size); detection trains at a fixed size"
            )
        if cfg.augment != "none":
            raise ValueError(
                f"--augment {cfg.augment} is for classification; detection has its own (mosaic, scale "
                "jitter, flips, colour; --mosaic sets how often mosaic is used)"
            )
        if cfg.data_format == "masks":
            raise ValueError("--data-format masks is for segmentation; detection reads coco, voc or yolo (or auto)")
        if cfg.teacher:
            raise ValueError("--teacher (distillation) is for classification")
        if cfg.variant == PEER:
            options = (
                ("--pretrained", cfg.pretrained),
                ("--arch", cfg.arch),
                ("--k", cfg.k),
                ("--freeze-stages", cfg.freeze_stages),
                ("--no-branches", not cfg.branches),
            )
            given = [flag for flag, value in options if value]
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to MobileOne backbones; --variant mnv3 is torchvision's "
                    "MobileNetV3-Large, trained from scratch"
                )

    def load_data(self, cfg: TrainConfig, env: Env) -> TaskData:
        self.builtin = cfg.data is None
        root = Path(cfg.data) if cfg.data else digit_scenes()
        train_split, val_split = load_splits(root, cfg.data_format)
        self.train_records = train_split.records
        base = DetectionDataset(train_split, train=True, seed=cfg.seed)
        val_ds = DetectionDataset(val_split)
        self.val_data = val_ds
        if self.builtin:
            return TaskData(base, val_ds, list(train_split.classes))
        per_epoch = max(1, len(base) // cfg.batch_size)
        if cfg.steps_per_epoch:  # the user capped the epoch: passes enough to fill it, no floor
            repeats = math.ceil(cfg.steps_per_epoch / per_epoch)
        else:
            repeats = math.ceil(DETECT_MIN_STEPS / (cfg.epochs * per_epoch))
            if repeats > 1 and env.main:
                log.warning(
                    "%d training images give %d steps in %d epochs; each epoch passes over them %d times (at least "
                    "%d steps in all, so that warm-up and cosine have room)",
                    len(base),
                    cfg.epochs * per_epoch,
                    cfg.epochs,
                    repeats,
                    DETECT_MIN_STEPS,
                )
        train = DenseTrainData(base, cfg.img_size, repeats, cfg.mosaic, hflip=cfg.hflip)
        return TaskData(train, val_ds, list(train_split.classes))

    def build_model(self, cfg: TrainConfig, classes: Sequence[str]) -> nn.Module:
        return use_fast_strided_depthwise(self._build_model(cfg, classes))

    def _build_model(self, cfg: TrainConfig, classes: Sequence[str]) -> nn.Module:
        if self.builtin:
            return build_detector_for(cfg, classes, topk_candidates=BUILTIN_TOPK)
        sides = box_sides(self.train_records, cfg.img_size)
        if cfg.head == "ssdlite":
            given = cfg.anchor_min_ratio is not None or cfg.anchor_max_ratio is not None
            fitted = {} if given else fit_ssdlite_ratios(sides, cfg.img_size)  # fitted unless either is given
            smallest = fitted.get("anchor_min_ratio", cfg.anchor_min_ratio or DetectorConfig.anchor_min_ratio)
            check_small_boxes(sides, cfg.head, smallest * cfg.img_size)
            return build_detector_for(cfg, classes, **fitted)
        check_small_boxes(sides, cfg.head or DEFAULT_HEAD, 0.0)
        prior = float(sides.median()) if len(sides) else None
        return build_detector_for(cfg, classes, box_prior=prior, topk_candidates=1000)

    def image_sides(self, data: TaskData) -> list[int]:
        return [min(r.width, r.height) for r in data.train.records]

    def set_eval_transform(self, data: TaskData, cfg: TrainConfig) -> None:
        data.val.transform = letterbox_transform(cfg.img_size)

    def set_train_transform(self, data: TaskData, cfg: TrainConfig, size: int, strength: float) -> None:
        if self.builtin:
            data.train.transform = train_transform(size, cfg.hflip, zoom_out=1.0, iou_crop=False)
        else:
            data.train.img_size = size

    def collate(self):
        return collate_detection

    def loss(self, net: nn.Module, images: Tensor, targets: list[dict[str, Tensor]], cfg: TrainConfig) -> Tensor:
        losses = net(images, targets)
        return losses["bbox_regression"] + losses["classification"]

    def evaluate(self, model: nn.Module, loader: Any, env: Env) -> dict[str, float]:
        dataset = self.val_data
        if dataset is None:
            raise RuntimeError("DetectTask.evaluate runs after load_data, which keeps the validation records")
        results, seen, bad = predict_loader(model, loader, env.device)
        if env.world > 1:
            gathered: list[Any] = [None] * env.world
            dist.all_gather_object(gathered, (results, seen, bad))
            results = [r for g in gathered for r in g[0]]
            seen = [i for g in gathered for i in g[1]]
            bad = sum(g[2] for g in gathered)
        if not seen:
            raise DataError(
                f"no validation image could be read ({bad} unreadable); check the images of {dataset.source}"
            )
        out: list[Any] = [None]
        if env.main:
            m = detection_metrics(dataset.records, dataset.classes, results, seen)
            out = [{k: m[k] for k in self.metric_names}]
        if env.world > 1:
            dist.broadcast_object_list(out, src=0)
        return out[0]
