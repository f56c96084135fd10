"""Classification commands. ``mobileone demo``: train S0 on the built-in digits, evaluate, fuse,
check agreement, export, time.

The main job of the README: a whole cycle from training to a deployable file in about 1.5 minutes
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..bench import deployment_report
from ..core.checkpoint import load_checkpoint
from ..core.complexity import count_macs, count_params
from ..tasks import resolve_config, train
from ..tasks.classification.data import ImageFolderDataset, builtin_dataset, eval_transform
from ..tasks.classification.evaluate import evaluate_checkpoint

DEMO_EPOCHS, DEMO_IMG_SIZE = 6, 32


def demo(args: argparse.Namespace) -> int:
    out = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    epochs, img_size = args.epochs or DEMO_EPOCHS, args.img_size or DEMO_IMG_SIZE
    data = builtin_dataset()
    # 1. Train S0 from scratch on the built-in digits with the default ("short") recipe.
    t0 = time.perf_counter()
    cfg = resolve_config(variant="s0", out=str(out), epochs=epochs, img_size=img_size, workers=0, threads=args.threads)
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    # 2. Evaluate the best checkpoint, unfused and fused, with the standard eval transform.
    unfused = evaluate_checkpoint(data, out / "best.safetensors", workers=0)
    fused = evaluate_checkpoint(data, out / "best_fused.safetensors", workers=0)
    # 3. Fused and unfused must agree on real images, logit by logit.
    model, fmodel = load_checkpoint(out / "best.safetensors").eval(), load_checkpoint(out / "best_fused.safetensors")
    val = ImageFolderDataset(data / "val", transform=eval_transform(img_size))
    x = torch.stack([val[i][0] for i in range(0, len(val), max(1, len(val) // 64))])
    with torch.no_grad():
        diff = (model(x) - fmodel.eval()(x)).abs().max().item()
    agree = diff < 1e-3 and abs(unfused["top1"] - fused["top1"]) < 1e-9
    # 4. Size and speed, train-time graph against fused graph.
    size = img_size
    rows = [
        ("params", count_params(model), count_params(fmodel)),
        (f"MACs at {size} px", count_macs(model, size), count_macs(fmodel, size)),
    ]
    threads = args.threads or torch.get_num_threads()
    lines = [
        f"MobileOne-S0 demo: {summary['epochs']} epochs on the built-in digits ({len(val)} val images, {size} px), "
        f"trained in {train_s:.0f} s at {summary['train_images_per_second']:.0f} images/s",
        f"accuracy (best epoch {summary['best']['epoch']}, {summary['best']['weights']} weights): "
        f"unfused top-1 {unfused['top1']:.2f} % top-5 {unfused['top5']:.2f} %; "
        f"fused top-1 {fused['top1']:.2f} % top-5 {fused['top5']:.2f} %",
        f"fused vs unfused: max |logit difference| {diff:.2e} on {len(x)} val images -> "
        f"{'agree' if agree else 'DISAGREE'}",
        *(f"{name}: train-time {a:,} -> fused {b:,} ({a / b:.1f}x)" for name, a, b in rows),
        f"run directory: {out} (metrics.jsonl, curves.png, best/last/best_fused checkpoints, model.onnx)",
    ]
    # 5. Deployment: export to ONNX, checked with onnxruntime; latency unfused vs fused, PyTorch vs onnxruntime.
    lines[-1:-1] = deployment_report(model, out, threads=threads)
    print("\n".join(lines))
    return 0 if agree else 1
