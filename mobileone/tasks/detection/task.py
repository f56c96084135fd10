"""Object detection on the training engine: SSDLite on MobileOne (or the MobileNetV3 peer), COCO mAP.

``mobileone train --task detect --data DIR --variant s0 --img-size 320 --out RUN`` runs the same
loop as classification (schedules, EMA, resume, DDP, AMP, curves); this module supplies the
COCO / VOC / YOLO data, the detector, SSD's loss, COCO-style mAP of a fused copy every epoch,
and a picture of predictions on validation images at the end (``predictions.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ...core.config import VARIANTS, MobileOneConfig, resolve_variant
from ...engine.config import TrainConfig
from ...engine.distributed import Env
from ...engine.task import DataError, Task, TaskData, require_finite
from .builtin import digit_scenes
from .data import DetectionDataset, collate_detection, eval_transform, load_splits, train_transform
from .metrics import coco_detections, coco_ground_truth, coco_map
from .model import PEER, SSDLiteDetector, create_detector, load_detector, save_detector
from .visualize import draw_predictions

# Every detection run: torchvision's SSDLite recipe where it applies (weight decay 4e-5, constant;
# lr 0.15 at batch 192, i.e. 0.2 per 256 images), at 320 px.
DETECT_DEFAULTS: dict[str, Any] = {
    "img_size": 320,
    "batch_size": 32,
    "base_lr": 0.2,
    "weight_decay": 4e-5,
    "weight_decay_end": 4e-5,
}
# The built-in digit scenes (96 px, digits of 20-40 px): default boxes from 0.15 to 0.8 of the
# scene, no flips (digits are not mirror-symmetric), 3 epochs of 2,000 scenes in batches of 16 at
# lr 0.05 with a short warm-up (what learnt the most in the demo's few minutes among the settings
# tried), photometric distortion only (zoom-out and IoU crop slow a run this short down more than
# they help it).
BUILTIN_DEFAULTS: dict[str, Any] = {
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
    return (
        "ssdlite_mnv3" if cfg.variant == PEER else f"ssdlite_{resolve_variant(cfg.variant).removeprefix('mobileone_')}"
    )


def build_detector_for(cfg: TrainConfig, classes: Sequence[str], **options: Any) -> SSDLiteDetector:
    """The detector a training config describes (variant or ``arch``, branch overrides, anchors, backbone weights);
    ``options``: further :class:`DetectorConfig` fields."""
    arch = dict(cfg.arch) if cfg.arch else None
    if cfg.variant != PEER and (cfg.k is not None or not cfg.branches):
        config = MobileOneConfig(**arch) if arch else VARIANTS[resolve_variant(cfg.variant)]
        config = config.replace(**({"k": cfg.k} if cfg.k else {}))
        if not cfg.branches:
            config = config.replace(k=1, stem_k=1, scale_branch=False, skip_branch=False)
        arch = config.to_dict()
    return create_detector(
        detector_name(cfg),
        len(classes),
        cfg.img_size,
        cfg.pretrained,
        arch=arch,
        init=cfg.init,
        freeze_stages=cfg.freeze_stages,
        class_names=list(classes),
        anchor_min_ratio=cfg.anchor_min_ratio,
        anchor_max_ratio=cfg.anchor_max_ratio,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        max_detections=cfg.max_detections,
        **options,
    )


@torch.no_grad()
def predict_loader(
    model: SSDLiteDetector, loader: Any, device: torch.device, what: str = "the detector"
) -> tuple[list, list[int], int]:
    """Detections in the pixels of each image file: ``[(index, boxes, scores, labels)]``, the indices
    seen, and the number of unreadable images. ``model`` is put in eval mode and restored after;
    NaN or infinite outputs raise ``NonFiniteOutputError`` naming ``what``."""
    was_training = model.training
    model.eval()
    size = model.config.img_size
    results, seen, bad = [], [], 0
    try:
        for x, targets, bad_paths in loader:
            bad += len(bad_paths)
            if x is None:
                continue
            boxes, scores = model.forward_raw(x.to(device))
            require_finite((boxes, scores), what)
            for det, t in zip(model.postprocess(boxes, scores), targets):
                h, w = t["size"]
                scale = torch.tensor([w / size, h / size] * 2)
                results.append(
                    (t["index"], det["boxes"].float().cpu() * scale, det["scores"].float().cpu(), det["labels"].cpu())
                )
                seen.append(t["index"])
    finally:
        model.train(was_training)
    return results, seen, bad


def detection_metrics(records: Sequence[Any], classes: Sequence[str], results: list, seen: Sequence[int]) -> dict:
    """COCO mAP (percent) of ``results`` against the images in ``seen`` (unreadable ones are left out)."""
    kept = sorted(set(seen))
    remap = {old: new for new, old in enumerate(kept)}
    gt = coco_ground_truth([records[i] for i in kept], classes)
    dets = coco_detections((remap[i], b, s, lab) for i, b, s, lab in results)
    return coco_map(gt, dets, classes)


class DetectionTask(Task):
    """SSDLite detection of COCO, VOC or YOLO data (or the built-in digit scenes)."""

    name = "detect"
    metric = "map"
    metric_names = ("map", "map_50", "map_75")
    min_batch = 2  # BatchNorm over the 1x1 maps of the last extra block needs two images
    min_img_size = 64  # the extra blocks halve 1/32 of the input three more times

    def __init__(self) -> None:
        self.builtin = False
        self.val_data: DetectionDataset | None = None  # its records are the ground truth of evaluate()

    def defaults(self, recipe: str, variant: str, builtin: bool) -> dict[str, Any]:
        return {**DETECT_DEFAULTS, **(BUILTIN_DEFAULTS if builtin else {})}

    def validate(self, cfg: TrainConfig, given: frozenset[str] = frozenset()) -> None:
        if cfg.progressive:
            raise ValueError(
                "--progressive changes the image size, but a detector's default boxes are laid out for "
                "one size (--img-size); detection trains at a fixed size"
            )
        if cfg.augment != "none":
            raise ValueError(
                f"--augment {cfg.augment} is for classification; detection uses SSD's augmentation "
                "(photometric distortion, zoom-out, IoU crop, flip)"
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
        train_ds = DetectionDataset(train_split, train=True, seed=cfg.seed)
        val_ds = DetectionDataset(val_split)
        self.val_data = val_ds
        return TaskData(train_ds, val_ds, list(train_split.classes))

    def build_model(self, cfg: TrainConfig, classes: Sequence[str]) -> nn.Module:
        return build_detector_for(cfg, classes, **({"topk_candidates": BUILTIN_TOPK} if self.builtin else {}))

    def image_sides(self, data: TaskData) -> list[int]:
        return [min(r.width, r.height) for r in data.train.records]

    def set_eval_transform(self, data: TaskData, cfg: TrainConfig) -> None:
        data.val.transform = eval_transform(cfg.img_size)

    def set_train_transform(self, data: TaskData, cfg: TrainConfig, size: int, strength: float) -> None:
        if self.builtin:
            data.train.transform = train_transform(size, cfg.hflip, zoom_out=1.0, iou_crop=False)
        else:
            data.train.transform = train_transform(size, cfg.hflip)

    def collate(self):
        return collate_detection

    def loss(self, net: nn.Module, images: Tensor, targets: list[dict[str, Tensor]], cfg: TrainConfig) -> Tensor:
        losses = net(images, targets)
        return losses["bbox_regression"] + losses["classification"]

    def evaluate(self, model: nn.Module, loader: Any, env: Env) -> dict[str, float]:
        dataset = self.val_data
        if dataset is None:
            raise RuntimeError("DetectionTask.evaluate runs after load_data, which keeps the validation records")
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

    def save(self, model: nn.Module, path: Path, **meta: Any) -> Path:
        return save_detector(model, path, **meta)

    def load(self, path: Path) -> nn.Module:
        return load_detector(path)

    def finish(self, run_dir: Path, best: nn.Module, data: TaskData, cfg: TrainConfig) -> None:
        draw_predictions(best, data.val, run_dir / "predictions.png")

    def epoch_line(self, row: dict[str, Any]) -> str:
        ema = f"  EMA mAP {row['ema_map']:.2f}" if row.get("ema_map") is not None else ""
        return f"val mAP {row['map']:.2f}  mAP@0.5 {row['map_50']:.2f}{ema}"


def val_loader(
    root: str | Path,
    data_format: str,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 16,
    workers: int = 0,
) -> tuple[DetectionDataset, DataLoader]:
    """The validation split of a dataset folder at a detector's input size, and its loader."""
    _, split = load_splits(root, data_format)
    ds = DetectionDataset(split, eval_transform(img_size, mean, std))
    loader = DataLoader(ds, batch_size, shuffle=False, num_workers=workers, collate_fn=collate_detection)
    return ds, loader


def evaluate_detector(
    checkpoint: str | Path,
    data: str | Path,
    data_format: str = "auto",
    batch_size: int = 16,
    workers: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """COCO mAP (percent, with AP per class) of a detector checkpoint, fused or not, on ``data``'s val split."""
    model = load_detector(checkpoint)
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    ds, loader = val_loader(
        data, data_format, model.config.img_size, model.preprocess["mean"], model.preprocess["std"], batch_size, workers
    )
    if model.class_names and list(model.class_names) != list(ds.classes):
        raise DataError(
            f"{checkpoint} was trained on classes {model.class_names[:10]}, {data} has {ds.classes[:10]}; "
            "evaluate on data with the same class list"
        )
    results, seen, bad = predict_loader(model.to(dev), loader, dev, f"{checkpoint}")
    if not seen:
        raise DataError(f"no validation image of {ds.source} could be read ({bad} unreadable)")
    metrics = detection_metrics(ds.records, ds.classes, results, seen)
    return {
        **metrics,
        "checkpoint": str(checkpoint),
        "data": str(ds.source),
        "fused": model.inference_mode,
        "images": len(seen),
        "unreadable_images": bad,
        "img_size": model.config.img_size,
    }
