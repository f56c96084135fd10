"""``mobileone export`` for every task: one format to a file, or ``--format all`` to a folder with a table.

Each task hands its fused model to the same targets (``mobileone.deploy.targets``); this module
picks the task's exporter, and for ``all`` writes every installed target into one folder, checks
each file in its own runtime and times it at batch 1 (format, file, size, check, latency).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bench.timing import time_calls
from ..core.checkpoint import load_checkpoint
from ..core.factory import create_model
from ..deploy.common import ExportError
from ..deploy.detect import NMS_FORMATS, export_detector
from ..deploy.evaluate_onnx import image_folder
from ..deploy.export import export_model, model_metadata
from ..deploy.segment import export_segmenter
from ..deploy.targets import TARGETS, load_export, missing
from ..tasks.detect.model import create_detector, load_detector, qualified_name
from ..tasks.segment.model import create_segmenter, load_segmenter


def check_images(data: str, model: torch.nn.Module, img_size: int | None, num: int) -> torch.Tensor:
    """``num`` held-out images of ``data`` (its ``val/`` if present, evenly spaced), preprocessed as deployed."""
    size = img_size or int((getattr(model, "preprocess", None) or {}).get("input_size", 224))
    ds = image_folder(data, "val", model_metadata(model, size))
    idx = np.linspace(0, len(ds) - 1, min(num, len(ds))).round().astype(int).tolist()
    images = [x for x in (ds[i][0] for i in idx) if x is not None]
    if not images:
        raise ValueError(f"none of the images of {ds.root} could be read; nothing to check on")
    return torch.stack(images)


def classifier(args: argparse.Namespace) -> torch.nn.Module:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)
    return create_model(
        args.variant, num_classes=1000 if args.num_classes is None else args.num_classes, inference_mode=True
    )


def detector(args: argparse.Namespace) -> torch.nn.Module:
    if args.checkpoint:
        model = load_detector(args.checkpoint)
        if args.img_size and args.img_size != model.config.img_size:
            raise ValueError(
                f"{args.checkpoint} was trained at {model.config.img_size} px and exports at that size; "
                f"--img-size {args.img_size} cannot change that"
            )
        return model
    name = qualified_name(args.variant)
    torch.manual_seed(0)
    return create_detector(
        name, 80 if args.num_classes is None else args.num_classes, 320 if args.img_size is None else args.img_size
    ).eval()


def segmenter_name(variant: str) -> str:
    """``s0`` -> ``deeplabv3_s0``; full names (``lraspp_s0``, ``deeplabv3_mnv3``) pass through."""
    key = variant.lower()
    return key if key.startswith(("deeplabv3", "lraspp")) else f"deeplabv3_{key}"


def segmenter(args: argparse.Namespace) -> torch.nn.Module:
    if args.checkpoint:
        return load_segmenter(args.checkpoint)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_segmenter(
            segmenter_name(args.variant), num_classes=21 if args.num_classes is None else args.num_classes
        )
    model.preprocess["input_size"] = 512 if args.img_size is None else args.img_size
    return model


def export_task(args: argparse.Namespace, model: torch.nn.Module, format: str, out: Path) -> list[Any]:
    """Export ``model`` as ``format`` to ``out`` the way ``args.task`` does; the reports of the files written."""
    check = not args.no_check
    if args.task == "detect":
        form = args.detect_form
        forms = [form] if form else (["raw", "nms"] if format in NMS_FORMATS else ["raw"])
        reports, raw = [], None
        if "nms" in forms and (args.atol is not None or args.rtol is not None):
            print(
                "note: --atol / --rtol apply to the raw form; the NMS form's check matches the detections one to one",
                file=sys.stderr,
            )
        for f in forms:
            path = out if len(forms) == 1 or f == "raw" else out.with_name(f"{out.stem}_nms{out.suffix}")
            tolerance = {"atol": args.atol, "rtol": args.rtol} if f == "raw" else {}
            reports.append(
                export_detector(
                    model,
                    path,
                    f,
                    format,
                    args.dynamic_batch,
                    args.max_detections,
                    check,
                    from_raw=raw if format == "onnx" else None,
                    **tolerance,
                )
            )
            raw = reports[-1].path if f == "raw" else raw
        return reports
    if args.task == "segment":
        return [export_segmenter(model, out, format, args.img_size, args.argmax, check, args.rtol, args.atol)]
    inputs = check_images(args.check_data, model, args.img_size, args.check_images) if args.check_data else None
    return [export_model(model, out, format, args.img_size, args.dynamic_batch, check, inputs, args.rtol, args.atol)]


BUILDERS = {"classify": classifier, "detect": detector, "segment": segmenter}


def export(args: argparse.Namespace) -> int:
    """``mobileone export``: the task's fused model to one format (or every installed one with ``all``), checked."""
    model = BUILDERS[args.task](args)
    if args.format == "all":
        return export_all(args, model)
    for report in export_task(args, model, args.format, Path(args.out)):
        print(report.summary())
    return 0


def short_check(report: Any) -> str:
    """The check's result in a table cell."""
    if getattr(report, "relative_error", None) is not None:
        return f"{report.relative_error:.1e} of max logit; top-1 agrees {report.top1_agreement:.1f} %"
    if getattr(report, "argmax_agreement", None) is not None:
        return f"max diff {report.max_abs_diff:.1e}; argmax agrees {report.argmax_agreement:.2f} %"
    return report.check.split(":", 1)[0] if report.check.startswith("structural") else report.check.split(": ", 1)[-1]


def latency_ms(format: str, path: Path, example: torch.Tensor, threads: int) -> float:
    """Median batch-1 latency of an exported file in its runtime (a few calls: an indication, not a benchmark)."""
    run = load_export(format, path, threads)
    with torch.inference_mode():
        return float(np.median(time_calls(lambda: run(example), warmup=3, iters=10, min_time=0.3))) * 1e3


def size_of(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    extra = [path.with_suffix(".bin")] if path.suffix in (".xml", ".param") else []
    return sum(p.stat().st_size for p in files + extra)


def export_all(args: argparse.Namespace, model: torch.nn.Module) -> int:
    """Every installed target into the folder ``args.out``, each checked and timed; a table, exit 1 on a failure."""
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    threads = args.threads or 2
    torch.set_num_threads(threads)
    rows, failed = [], 0
    for format, target in TARGETS.items():
        if missing(format):
            print(f"skipped {missing(format)}")
            continue
        try:
            reports = export_task(args, model, format, folder / target.file_name())
        except (ExportError, ImportError, RuntimeError, ValueError) as e:
            rows.append((format, "-", "-", f"FAILED: {str(e).splitlines()[0][:100]}", "-"))
            failed += 1
            continue
        for report in reports:
            size = f"{size_of(report.path) / 2**20:.1f} MB"
            example = torch.zeros(1, 3, *_size(model, args))
            runnable = format != "coreml" or target.module.can_run()
            ms = f"{latency_ms(format, report.path, example, threads):.2f}" if runnable else "macOS only"
            rows.append((format, report.path.name, size, short_check(report), ms))
    print(f"| format | file | size | check against PyTorch | batch-1 ms ({threads} threads, indicative) |")
    print("|---|---|---:|---|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if failed else 0


def _size(model: torch.nn.Module, args: argparse.Namespace) -> tuple[int, int]:
    if args.task == "detect":
        return model.config.img_size, model.config.img_size
    size = args.img_size or int((getattr(model, "preprocess", None) or {}).get("input_size", 224))
    return size, size
