"""``mobileone info``: parameters, MACs and layers of variants or of a checkpoint, train-time against fused.

Variants and classification checkpoints need torch alone; a detector's or segmenter's checkpoint is
described by its task's command module (``info`` there), which reuses :func:`report`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch import nn

from ..core.checkpoint import read_checkpoint
from ..core.complexity import count_layers, count_macs, count_params
from ..core.config import list_models, resolve_variant
from ..core.factory import create_model
from ..core.model import MobileOne

Models = list[tuple[str, nn.Module, nn.Module]]  # (name, train-time model, fused model)


def info(args: argparse.Namespace) -> int:
    if args.checkpoint:
        ckpt = read_checkpoint(args.checkpoint)
        print(
            f"{args.checkpoint}: classification checkpoint, {ckpt.layout} layout, "
            f"{'fused' if ckpt.fused else 'unfused'}, {ckpt.num_classes} classes, variant {ckpt.variant or 'custom'}; "
            f"config {json.dumps(ckpt.config.to_dict())}"
        )
        train = MobileOne(ckpt.config, ckpt.num_classes)
        fused = MobileOne(ckpt.config, ckpt.num_classes, inference_mode=True)
        size = args.img_size or int((ckpt.meta.get("preprocess") or {}).get("input_size", 224))
        name = ckpt.variant or Path(args.checkpoint).name
        return report([(name, train, fused)], size, args.json, f"MobileOne, {ckpt.num_classes} classes")
    names = [resolve_variant(v) for v in args.variants] or list_models()
    n = args.num_classes
    models = [(m, create_model(m, num_classes=n), create_model(m, num_classes=n, inference_mode=True)) for m in names]
    size = 224 if args.img_size is None else args.img_size
    return report(models, size, args.json, f"MobileOne, {n} classes")


def report(models: Models, img_size: int, as_json: bool, what: str) -> int:
    """The table (or JSON) of params, MACs and layers of each (name, train-time, fused) model."""
    rows = [
        {
            "variant": name,
            "params_train": count_params(train),
            "params_fused": count_params(fused),
            "macs_train": count_macs(train, img_size),
            "macs_fused": count_macs(fused, img_size),
            "layers": count_layers(fused),
        }
        for name, train, fused in models
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{what} at {img_size}x{img_size} (layers: weight layers of the fused net, convs + head)")
    print("| variant | params train-time | params fused | MACs train-time | MACs fused | layers |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['params_train']:,} | {r['params_fused']:,} | "
            f"{r['macs_train'] / 1e6:,.1f} M | {r['macs_fused'] / 1e6:,.1f} M | {r['layers']} |"
        )
    return 0
