"""Classification commands: ``mobileone demo|eval|predict|export|quantize|bench`` (``--task classify``).

``demo`` is the main job of the README: train S0 on the built-in digits, evaluate, fuse, check
agreement, export, time; a whole cycle from training to a deployable file in about 1.5 minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..bench import BenchConfig, deployment_report, run_benchmark
from ..core.checkpoint import load_checkpoint
from ..core.complexity import count_macs, count_params
from ..deploy.evaluate_onnx import evaluate_onnx
from ..deploy.onnx import read_onnx_metadata
from ..deploy.predict_onnx import predict_onnx
from ..deploy.quantize import QuantSettings, quantization_study, quantize_model, study_table
from ..tasks import resolve_config, train
from ..tasks.classify.data import ImageFolderDataset, builtin_dataset, eval_transform
from ..tasks.classify.evaluate import confusion_text, evaluate_checkpoint, plot_confusion
from ..tasks.classify.predict import predict as predict_images
from . import write_json
from .report import config_from_args, report_predictions

DEMO_EPOCHS, DEMO_IMG_SIZE = 6, 32


def demo(args: argparse.Namespace) -> int:
    out = Path(args.out or time.strftime("runs/demo-classify-%Y%m%d-%H%M%S"))
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


def evaluate(args: argparse.Namespace) -> int:
    """``mobileone eval``: top-1 / top-5 (and the confusion matrix) of a checkpoint or an ONNX file."""
    if args.onnx:
        r = evaluate_onnx(args.onnx, args.data, args.batch_size, args.threads)
        print(
            f"{r['model']} (onnxruntime) on {r['data']}: top-1 {r['top1']:.2f} %, top-5 {r['top5']:.2f} %, "
            f"{r['images']} images"
        )
        write_json(args.json, r)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    r = evaluate_checkpoint(
        args.data, args.checkpoint, args.img_size, args.crop_pct, args.batch_size, args.workers, args.device
    )
    print(
        f"{r['checkpoint']} ({'fused' if r['fused'] else 'unfused'}) on {r['data']}: top-1 {r['top1']:.2f} %, "
        f"top-5 {r['top5']:.2f} %, {r['images']} images at {r['img_size']} px (crop {r['crop_pct']})"
    )
    print(confusion_text(r))
    if r["unreadable_images"]:
        print(f"warning: {r['unreadable_images']} unreadable images were skipped", file=sys.stderr)
    write_json(args.json, r)
    png = args.confusion or (str(Path(args.json).with_suffix(".confusion.png")) if args.json else None)
    if png:
        plot_confusion(r, png)
        print(f"confusion matrix: {png}")
    return 0


def predict(args: argparse.Namespace) -> int:
    """``mobileone predict``: the top classes of each image."""
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for source in args.images:
        if args.onnx:
            results += predict_onnx(args.onnx, source, args.topk, args.threads)
        else:
            results += predict_images(args.checkpoint, source, args.topk)
    return report_predictions(
        args, results, lambda r: ", ".join(f"{t['class']} {100 * t['probability']:.1f} %" for t in r["top"])
    )


def quantize_study(args: argparse.Namespace) -> int:
    """``mobileone quantize --study``: onnxruntime's INT8 of the fused classifier under each calibration setting."""
    method = "percentile" if args.method == "histogram" else args.method
    settings = QuantSettings(method, not args.per_tensor, args.keep_float or "first3", args.reduce_range)
    model = load_checkpoint(args.checkpoint)
    fp32, int8 = quantize_model(model, args.calib_data, args.out, settings, args.img_size, args.num_calib)
    used = (read_onnx_metadata(int8).get("quantization") or {}).get("calibration_images", args.num_calib)
    print(f"INT8 ({settings.label()}, {used} calibration images): {int8}  (fp32 export: {fp32})")
    if args.study:
        study_dir = Path(args.out).parent / "study"
        eval_data = args.eval_data or args.calib_data
        rows = quantization_study(fp32, args.calib_data, eval_data, num_calib=args.num_calib, out_dir=study_dir)
        print(study_table(rows))
    elif args.eval_data:
        a, b = evaluate_onnx(fp32, args.eval_data), evaluate_onnx(int8, args.eval_data)
        print(
            f"top-1 on {b['images']} images: fp32 {a['top1']:.2f} %, INT8 {b['top1']:.2f} % "
            f"(drop {a['top1'] - b['top1']:.2f} points)"
        )
    return 0


def bench(args: argparse.Namespace) -> int:
    """``mobileone bench``: latency per runtime of MobileOne and its peers, with the paper's analyses."""
    cfg = config_from_args(
        BenchConfig,
        args,
        models=args.models.split(","),
        runtimes=args.runtimes.split(","),
        batch_sizes=list(args.batch_sizes),
        img_size=224 if args.img_size is None else args.img_size,
        precisions=args.precisions.split(","),
        studies=not args.no_studies,
    )
    result = run_benchmark(cfg)
    print((Path(args.out) / "results.md").read_text())
    print(f"written: {args.out}/results.md, results.csv, results.json, latency_vs_macs.png, latency_vs_top1.png")
    return 1 if result["errors"] else 0
