"""``mobileone quantize``: static INT8 for a runtime and a task, checked in that runtime, with the remedy chain.

``--study`` keeps onnxruntime's comparison of calibration settings (classification).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..deploy.calibration import calibration_batch
from ..deploy.int8 import Graph, Recipe, task_graph, weighted_layers
from ..deploy.int8_check import quantize_checked
from ..deploy.qat import qat_finetune
from .classify import quantize_study
from .export import BUILDERS

HISTOGRAM = ("entropy", "percentile", "histogram")  # onnxruntime's names for the non-MinMax calibrations


def keep_float_layers(spec: str, graph: Graph) -> tuple[str, ...]:
    """``--keep-float`` (none, or +-joined first, firstN, last, depthwise) as layer names of the fused graph."""
    layers = weighted_layers(graph.module, graph.example)
    keep: list[str] = []
    for part in [p for p in spec.split("+") if p != "none"]:
        if re.fullmatch(r"first\d*", part):
            keep += layers[: int(part[5:] or 1)]
        elif part == "last":
            keep.append(layers[-1])
        elif part == "depthwise":
            keep += [n for n in layers if getattr(graph.module.get_submodule(n), "groups", 1) > 1]
        else:
            raise ValueError(f"--keep-float takes none or +-joined first, firstN, last, depthwise; got {part!r}")
    return tuple(dict.fromkeys(keep))


def quantize(args: argparse.Namespace) -> int:
    """Quantize, measure fp32 and INT8 in the runtime, remedy while over ``--max-drop``; exit 3 when still over."""
    if args.study:
        if args.task != "classify" or args.runtime != "onnxruntime":
            raise ValueError("--study compares onnxruntime's settings for classification: drop --task / --runtime")
        return quantize_study(args)
    args.variant, args.num_classes = None, None
    model = BUILDERS[args.task](args)
    graph = task_graph(args.task, model, args.img_size)
    keep = args.keep_float or ("first3" if args.runtime == "onnxruntime" and args.task == "classify" else "none")
    method = "histogram" if args.method in HISTOGRAM else "minmax"
    recipe = Recipe(not args.per_tensor, method, keep_float_layers(keep, graph))
    if args.qat:
        if not args.train_data:
            raise ValueError("--qat needs --train-data: the task's training data to fine-tune on")
        graph = qat_finetune(graph, args.train_data, args.epochs, args.lr)
    calibration = calibration_batch(args.calib_data, graph.meta, args.num_calib)
    eval_data = args.eval_data or args.calib_data
    report = quantize_checked(args.runtime, graph, calibration, args.out, eval_data, args.max_drop, recipe)
    print(f"INT8 for {args.runtime} ({args.task}, {len(calibration)} calibration images from {args.calib_data})")
    print(report.summary())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.as_json(), indent=2))
    if not report.ok:
        print(
            f"mobileone quantize: INT8 still loses {report.best.drop:.2f} points of {report.metric} after every "
            f"remedy (limit --max-drop {args.max_drop}); the file is written but should not ship: fine-tune with "
            "fake quantization, --qat --train-data DIR --epochs N",
            file=sys.stderr,
        )
        return 3
    return 0
