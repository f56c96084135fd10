"""Detection commands: ``mobileone demo|eval|predict|export|bench --task detect``.

``demo`` trains SSDLite on MobileOne-S0 on the built-in digit scenes (semi-synthetic: real digit
scans pasted on real photographs, exact boxes), then shows the whole path to deployment: mAP of
the unfused and the fused detector, that both give the same detections, both ONNX forms checked
in onnxruntime, and latency unfused against fused.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..bench.detect import DEFAULT_MODELS, DetectionBenchConfig, alternate_medians, detection_benchmark
from ..core.fusion import reparameterize_model
from ..deploy.common import ExportError
from ..deploy.detect import compare_detections, evaluate_onnx_detector, export_detector
from ..deploy.onnx import onnx_session
from ..deploy.predict_onnx import OnnxModel
from ..tasks import resolve_config, train
from ..tasks.detect.builtin import digit_scenes
from ..tasks.detect.evaluate import evaluate_detector, val_loader
from ..tasks.detect.model import build_detector, load_detector, qualified_name
from ..tasks.detect.predict import coco_records, predict_detections
from . import write_json
from .info import report
from .report import config_from_args, report_predictions

DEMO_EPOCHS, DEMO_IMG_SIZE = 3, 96


def _map_line(r: dict) -> str:
    sizes = ""
    if "map_small" in r:
        sizes = (
            f" (small {r['map_small']:.2f}, medium {r['map_medium']:.2f}, large {r['map_large']:.2f} %; "
            f"recall at 100 detections {r['recall_100']:.2f} %)"
        )
    return f"mAP {r['map']:.2f} %, mAP@0.5 {r['map_50']:.2f} %, mAP@0.75 {r['map_75']:.2f} %{sizes}"


def evaluate(args: argparse.Namespace) -> int:
    """``mobileone eval --task detect``: COCO mAP (and AP per class) of a checkpoint or an exported ONNX file."""
    fmt = getattr(args, "data_format", None) or "auto"
    if args.onnx:
        r = evaluate_onnx_detector(args.onnx, args.data, fmt)
        what = f"{r['onnx']} ({r['form']} form, onnxruntime)"
    else:
        r = evaluate_detector(args.checkpoint, args.data, fmt, args.batch_size, args.workers, args.device)
        what = f"{r['checkpoint']} ({'fused' if r['fused'] else 'unfused'})"
    if args.img_size is not None and args.img_size != r["img_size"]:
        print(
            f"mobileone eval: --img-size {args.img_size} ignored: the detector evaluates letterboxed to the "
            f"{r['img_size']} px it was trained at",
            file=sys.stderr,
        )
    print(f"{what} on {r['data']}: {_map_line(r)}; {r['images']} images at {r['img_size']} px")
    named = {k: v for k, v in r["per_class"].items() if v is not None}
    print("AP per class: " + ", ".join(f"{k} {v:.1f}" for k, v in named.items()))
    if r["unreadable_images"]:
        print(f"warning: {r['unreadable_images']} unreadable images were skipped", file=sys.stderr)
    write_json(args.json, r)
    return 0


def bench(args: argparse.Namespace) -> int:
    """``mobileone bench --task detect``: SSDLite on MobileOne against the MobileNetV3 peer, fused or not, +/- NMS."""
    models = list(DEFAULT_MODELS) if args.models == "default" else [m.strip() for m in args.models.split(",")]
    models = [qualified_name(m) for m in models]
    runtimes = args.runtimes.split(",")
    size = 320 if args.img_size is None else args.img_size
    cfg = config_from_args(DetectionBenchConfig, args, models=models, runtimes=runtimes, img_size=size)
    detection_benchmark(cfg)
    print((Path(args.out) / "detect_results.md").read_text())
    print(f"written: {args.out}/detect_results.md, detect_results.json")
    return 0  # a busy machine is said in the table, as the other benchmarks do


def info(args: argparse.Namespace) -> int:
    """``mobileone info --checkpoint`` of a detector: what it is, its size train-time and fused."""
    model = load_detector(args.checkpoint)
    c = model.config
    train = build_detector(c)
    print(
        f"{args.checkpoint}: detection checkpoint, SSDLite on {c.backbone}, "
        f"{'fused' if model.inference_mode else 'unfused'}, {c.num_classes} classes "
        f"({', '.join(map(str, (model.class_names or [])[:8]))}), {c.img_size} px input"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = reparameterize_model(train.eval())
    return report([(Path(args.checkpoint).name, train, fused)], c.img_size, args.json, "SSDLite")


def predict(args: argparse.Namespace) -> int:
    """``mobileone predict --task detect``: boxes and scores drawn per image, and COCO-style records."""
    model = OnnxModel(args.onnx, "detect", args.threads) if args.onnx else load_detector(args.checkpoint)
    out = Path(args.out or "predictions")
    results = [r for source in args.images for r in predict_detections(model, source, out, args.min_score)]

    def describe(r: dict[str, Any]) -> str:
        kept = [d for d in r["detections"] if d["score"] >= args.min_score]
        shown = ", ".join(f"{d['class']} {d['score']:.2f}" for d in kept[:10]) or "nothing"
        return f"{shown} (scores >= {args.min_score}) -> {r['picture']}"

    return report_predictions(args, results, describe, {"coco": coco_records(results)})


def demo(args: argparse.Namespace) -> int:
    """Train SSDLite-S0 on the built-in digit scenes, evaluate unfused and fused, compare, export, time."""
    out = Path(args.out or time.strftime("runs/demo-detect-%Y%m%d-%H%M%S"))
    epochs, img_size = args.epochs or DEMO_EPOCHS, args.img_size or DEMO_IMG_SIZE
    threads = args.threads or torch.get_num_threads()
    data = digit_scenes()
    # 1. Train SSDLite on MobileOne-S0 from scratch on the built-in scenes (the detection defaults).
    t0 = time.perf_counter()
    cfg = resolve_config(
        task="detect", variant="s0", out=str(out), epochs=epochs, img_size=img_size, workers=0, threads=args.threads
    )
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    # 2. COCO mAP of the best checkpoint, unfused and fused.
    unfused = evaluate_detector(out / "best.safetensors", data)
    fused = evaluate_detector(out / "best_fused.safetensors", data)
    # 3. The fused detector must give the unfused one's detections, box by box.
    model, fmodel = load_detector(out / "best.safetensors"), load_detector(out / "best_fused.safetensors")
    ds, loader = val_loader(data, "auto", img_size, model.preprocess["mean"], model.preprocess["std"], 16)
    x = next(iter(loader))[0]
    with torch.no_grad():
        a, b = model(x), fmodel(x)
    c = model.config
    problems = [
        p for da, db in zip(a, b) for p in compare_detections(da, db, c.score_thresh, c.nms_thresh, c.max_detections)[0]
    ]
    agree = not problems and abs(unfused["map"] - fused["map"]) < 1e-6
    lines = [
        f"SSDLite MobileOne-S0 demo: {summary['epochs']} epochs on the built-in digit scenes (semi-synthetic: real "
        f"digit scans on real photographs; {len(ds)} val scenes, {img_size} px), trained in {train_s:.0f} s at "
        f"{summary['train_images_per_second']:.0f} images/s",
        f"best epoch {summary['best']['epoch']} ({summary['best']['weights']} weights): unfused {_map_line(unfused)}; "
        f"fused {_map_line(fused)}",
        f"fused vs unfused on {len(x)} val scenes: {sum(len(d['scores']) for d in a)} detections -> "
        + ("the same (labels, IoU >= 0.99, scores within 1e-4)" if agree else f"DIFFERENT: {problems[:2]}"),
    ]
    # 4. Both ONNX forms of the fused detector, each checked in onnxruntime on val scenes.
    files: dict[str, Path] = {}
    try:
        for form in ("raw", "nms"):
            report = export_detector(
                model, out / f"detector_{form}.onnx", form, check_inputs=x[:8], from_raw=files.get("raw")
            )
            files[form] = report.path
            lines.append(f"ONNX {form}: {files[form]}; {report.check}")
    except ImportError as e:
        lines.append(f"ONNX export skipped: {e}")
    except ExportError as e:
        lines.append(f"ONNX export check FAILED: {e}")
        agree = False
    # 5. Latency, batch 1: the train-time graph against the fused one, with NMS; onnxruntime when exported.
    x1 = x[:1]
    runners = {"PyTorch unfused + NMS": lambda: model(x1), "PyTorch fused + NMS": lambda: fmodel(x1)}
    for form, path in files.items():
        session = onnx_session(path, threads)
        feed = {session.get_inputs()[0].name: x1.numpy()}
        runners[f"onnxruntime fused {'+ NMS' if form == 'nms' else 'raw'}"] = lambda s=session, f=feed: s.run(None, f)
    torch.set_num_threads(threads)
    medians, _ = alternate_medians(runners, rounds=3, warmup=3, iters=10, min_time=0.3)
    ms = {k: sorted(v)[len(v) // 2] for k, v in medians.items()}
    spread = max(max(v) / min(v) - 1 for v in medians.values())
    timing = ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
    note = "" if spread <= 0.15 else f" (machine busy: rounds up to {100 * spread:.0f} % apart; see mobileone bench)"
    lines.append(f"latency, batch 1 at {img_size} px, {threads} threads: {timing}{note}")
    lines.append(
        f"run directory: {out} (metrics.jsonl, curves.png, predictions.png, best/last/best_fused "
        "checkpoints, detector_raw.onnx, detector_nms.onnx)"
    )
    print("\n".join(lines))
    return 0 if agree else 1
