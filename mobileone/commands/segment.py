"""Segmentation commands: ``mobileone demo|eval|predict|export|bench --task segment``.

``demo`` trains LR-ASPP on MobileOne-S0 on the built-in digit scenes (semi-synthetic: real digit
scans on real photographs, pixel masks from the scans), then walks the path to deployment: mIoU of
the unfused and the fused model on full-resolution validation scenes, that both predict the same
pixels, the ONNX export (any height and width, with its argmax output) checked in onnxruntime, and
latency unfused against fused, in about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..bench.segment import DEFAULT_MODELS, SegmentationBenchConfig, run_segmentation_benchmark
from ..bench.timing import time_model
from ..core.fusion import reparameterize_model
from ..deploy.common import ExportError
from ..deploy.predict_onnx import OnnxModel
from ..deploy.segment import SegmentationOutputs, evaluate_onnx_segmenter, export_segmenter
from ..tasks import resolve_config, train
from ..tasks.segment.builtin import builtin_scenes
from ..tasks.segment.data import SegmentationDataset, eval_transform, load_splits
from ..tasks.segment.evaluate import evaluate_checkpoint
from ..tasks.segment.model import Segmenter, load_segmenter
from ..tasks.segment.predict import predict_masks
from ..tasks.segment.task import BUILTIN_SCENE_SIZE
from . import write_json
from .export import segmenter_name
from .info import report
from .report import config_from_args, report_predictions

DEMO_MODEL, DEMO_EPOCHS, DEMO_IMG_SIZE = "lraspp", 8, 64


def _scores_line(r: dict) -> str:
    return f"mIoU {r['miou']:.2f} %, pixel accuracy {r['pixel_acc']:.2f} %"


def evaluate(args: argparse.Namespace) -> int:
    """``mobileone eval --task segment``: mIoU, pixel accuracy and IoU per class over full-resolution masks."""
    fmt = getattr(args, "data_format", None) or "auto"
    if args.onnx:
        if args.img_size is not None:
            print(
                "mobileone eval: --img-size is ignored for --onnx: the file runs at each image's resolution",
                file=sys.stderr,
            )
        r = evaluate_onnx_segmenter(args.onnx, args.data, data_format=fmt)
        what = f"{r['model']} ({r['runtime']})"
    else:
        r = evaluate_checkpoint(
            args.data,
            args.checkpoint,
            data_format=fmt,
            size=args.img_size,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
        )
        what = f"{r['checkpoint']} ({r['model']}, {'fused' if r['fused'] else 'unfused'})"
    print(f"{what} on {r['data']} ({r['split']}): {_scores_line(r)}; {r['images']} images")
    named = {k: v for k, v in r["per_class_iou"].items() if v is not None}
    print("IoU per class: " + ", ".join(f"{k} {v:.1f}" for k, v in named.items()))
    absent = [k for k, v in r["per_class_iou"].items() if v is None]
    if absent:
        print(f"classes in neither masks nor predictions (left out of the mean): {absent}")
    if r["unreadable_images"]:
        print(f"warning: {r['unreadable_images']} unreadable images were skipped", file=sys.stderr)
    write_json(args.json, r)
    return 0


def bench(args: argparse.Namespace) -> int:
    """``mobileone bench --task segment``: DeepLabV3 / LR-ASPP latency against the MobileNetV3 peers."""
    models = list(DEFAULT_MODELS) if args.models == "default" else [segmenter_name(m) for m in args.models.split(",")]
    cfg = config_from_args(
        SegmentationBenchConfig,
        args,
        models=models,
        output_strides=list(args.output_strides),
        runtimes=args.runtimes.split(","),
        img_size=512 if args.img_size is None else args.img_size,
        batch=min(args.batch_sizes),
    )
    result = run_segmentation_benchmark(cfg)
    print((Path(args.out) / "segment_results.md").read_text())
    print(f"written: {args.out}/segment_results.md, segment_results.json")
    return 1 if result["errors"] else 0


def info(args: argparse.Namespace) -> int:
    """``mobileone info --checkpoint`` of a segmenter: what it is, its size train-time and fused."""
    model = load_segmenter(args.checkpoint)
    size = args.img_size or int(model.preprocess.get("input_size", 512))
    names = ", ".join(map(str, (model.class_names or [])[:8]))
    print(
        f"{args.checkpoint}: segmentation checkpoint, {model.name}, {'fused' if model.inference_mode else 'unfused'}, "
        f"{model.num_classes} classes ({names}), output stride {model.config.output_stride}, trained at {size} px"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = reparameterize_model(Segmenter(model.config).eval())
    return report([(model.name, Segmenter(model.config), fused)], size, args.json, "segmenter")


def predict(args: argparse.Namespace) -> int:
    """``mobileone predict --task segment``: a mask PNG and an overlay per image, and the classes' shares."""
    model = OnnxModel(args.onnx, "segment", args.threads) if args.onnx else load_segmenter(args.checkpoint)
    out = Path(args.out or "predictions")
    results = [r for source in args.images for r in predict_masks(model, source, out)]

    def describe(r: dict[str, Any]) -> str:
        top = sorted(r["classes"].items(), key=lambda kv: -kv[1])[:5]
        return ", ".join(f"{k} {v:.1f} %" for k, v in top) + f" -> {r['mask']}, {r['overlay']}"

    return report_predictions(args, results, describe, {})


def demo(args: argparse.Namespace) -> int:
    """Train, evaluate unfused and fused, compare them pixel by pixel, export, time."""
    out = Path(args.out or time.strftime("runs/demo-segment-%Y%m%d-%H%M%S"))
    epochs, img_size = args.epochs or DEMO_EPOCHS, args.img_size or DEMO_IMG_SIZE
    data = builtin_scenes(size=BUILTIN_SCENE_SIZE)
    # 1. Train LR-ASPP on MobileOne-S0 from scratch on the built-in scenes (the engine's default recipe).
    t0 = time.perf_counter()
    cfg = resolve_config(
        task="segment", variant="s0", head=DEMO_MODEL, out=str(out), epochs=epochs, img_size=img_size, workers=1
    )
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    # 2. mIoU of the best checkpoint, unfused and fused, on the full-resolution validation scenes.
    unfused = evaluate_checkpoint(data, out / "best.safetensors", workers=0)
    fused = evaluate_checkpoint(data, out / "best_fused.safetensors", workers=0)
    # 3. Fused and unfused must predict the same class at (almost) every pixel.
    model, fmodel = load_segmenter(out / "best.safetensors"), load_segmenter(out / "best_fused.safetensors")
    samples, classes, _ = load_splits(data, splits=("val",))
    val = SegmentationDataset(samples["val"], classes, eval_transform())
    x = torch.stack([val[i][0] for i in range(0, len(val), max(1, len(val) // 32))])
    with torch.no_grad():
        a, b = model(x)["out"], fmodel(x)["out"]
    diff = float((a - b).abs().max())
    agree_px = 100.0 * float((a.argmax(1) == b.argmax(1)).float().mean())
    agree = agree_px >= 99.9 and abs(unfused["miou"] - fused["miou"]) < 0.1
    per_class = fused["per_class_iou"]
    lines = [
        f"LR-ASPP / MobileOne-S0 demo: {summary['epochs']} epochs on the built-in digit scenes (semi-synthetic: "
        f"real digit scans on real photographs; {len(val)} val scenes, {img_size} px crops), trained in "
        f"{train_s:.0f} s at {summary['train_images_per_second']:.0f} images/s",
        f"best epoch {summary['best']['epoch']} ({summary['best']['weights']} weights): unfused "
        f"{_scores_line(unfused)}; fused {_scores_line(fused)}",
        f"fused vs unfused on {len(x)} val scenes: max |logit difference| {diff:.2e}, same class at {agree_px:.3f} % "
        f"of pixels -> {'agree' if agree else 'DISAGREE'}",
        "IoU per class (fused): " + ", ".join(f"{k} {v:.0f}" for k, v in per_class.items() if v is not None),
    ]
    # 4. Deployment: ONNX with any height and width and an argmax output, checked in onnxruntime.
    try:
        report = export_segmenter(model, out / "model.onnx", "onnx", argmax=True)
        lines += report.summary().splitlines()
    except ImportError as e:
        lines.append(f"ONNX export skipped: {e}")
    except ExportError as e:
        lines.append(f"ONNX export check FAILED: {e}")
        agree = False
    # 5. Latency at 512 px, batch 1: the train-time graph against the fused one.
    threads = torch.get_num_threads()
    kw = {"batch": 1, "img_size": 512, "threads": threads, "warmup": 2, "iters": 5, "min_time": 0.5}
    lat = [time_model(SegmentationOutputs(m).eval(), "eager", **kw)["median_ms"] for m in (model, fmodel)]
    lines.append(
        f"latency, batch 1 at 512 px on this CPU ({threads} threads, PyTorch eager): unfused {lat[0]:.0f} ms, "
        f"fused {lat[1]:.0f} ms ({lat[0] / lat[1]:.1f}x faster)"
    )
    lines.append(
        f"run directory: {out} (metrics.jsonl, curves.png, predictions.png, best/last/best_fused "
        "checkpoints, model.onnx)"
    )
    print("\n".join(lines))
    return 0 if agree else 1
