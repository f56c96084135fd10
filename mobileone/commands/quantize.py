"""``mobileone quantize``: static INT8 for a runtime and a task, checked in that runtime, with the remedy chain.

``--qat`` fine-tunes the fused model with fake quantization first (``deploy.qat``, a run of the training engine);
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
from ..deploy.qat import qat_config, qat_data, run_qat
from ..engine import TrainConfig
from ..engine.rundir import OccupiedError, RunDir
from .classify import quantize_study
from .export import BUILDERS
from .train import Terminated, sigterm_as_interrupt

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
    """Quantize, measure fp32 and INT8 in the runtime, remedy while over ``--max-drop``; exit 3 when still over.

    With ``--qat`` the fused model is first fine-tuned with fake quantization (a run of the training engine), and
    its best epoch is what the runtime's quantizer converts; the fp32 baseline stays the checkpoint's.
    """
    if args.study:
        if args.task != "classify" or args.runtime != "onnxruntime":
            raise ValueError("--study compares onnxruntime's settings for classification: drop --task / --runtime")
        if not args.calib_data:
            raise ValueError("--study needs --calib-data: the images to calibrate on")
        return quantize_study(args)
    args.variant, args.num_classes = None, None
    graph = task_graph(args.task, BUILDERS[args.task](args), args.img_size)
    keep = args.keep_float or ("first3" if args.runtime == "onnxruntime" and args.task == "classify" else "none")
    method = "histogram" if args.method in HISTOGRAM else "minmax"
    recipe = Recipe(not args.per_tensor, method, keep_float_layers(keep, graph))
    reference, qat, calib_data = None, None, args.calib_data
    if args.qat:
        try:
            with sigterm_as_interrupt():
                cfg, summary = fine_tune(args, graph)
        except KeyboardInterrupt as e:
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            print(f"\nmobileone quantize: QAT {how}. {_what_is_kept(args)}", file=sys.stderr)
            return 143 if isinstance(e, Terminated) else 130
        tuned = argparse.Namespace(**{**vars(args), "checkpoint": str(Path(cfg.out) / "best.safetensors")})
        reference, graph = graph, task_graph(args.task, BUILDERS[args.task](tuned), args.img_size)
        qat, calib_data = {"run": cfg.out, "epochs": cfg.epochs, "best": summary["best"]}, calib_data or qat_data(cfg)
    elif args.train_data or args.resume or args.qat_out:
        raise ValueError("--train-data, --qat-out and --resume belong to --qat (quantization-aware training)")
    if not calib_data:
        raise ValueError("quantize needs --calib-data: any folder of images to calibrate on (or --qat --train-data)")
    calibration = calibration_batch(calib_data, graph.meta, args.num_calib)
    eval_data = args.eval_data or calib_data
    report = quantize_checked(
        args.runtime, graph, calibration, args.out, eval_data, args.max_drop, recipe, reference=reference
    )
    report.qat = qat
    print(f"INT8 for {args.runtime} ({args.task}, {len(calibration)} calibration images from {calib_data})")
    print(report.summary())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.as_json(), indent=2))
    if not report.ok:
        hint = (
            f"more QAT epochs (the run in {qat['run']} took {qat['epochs']}) or more training data"
            if qat
            else "fine-tune with fake quantization, --qat --train-data DIR --epochs N"
        )
        print(
            f"mobileone quantize: INT8 still loses {report.best.drop:.2f} points of {report.metric} after every "
            f"remedy (limit --max-drop {args.max_drop}); the file is written but should not ship: {hint}",
            file=sys.stderr,
        )
        return 3
    return 0


def qat_run_dir(args: argparse.Namespace) -> Path:
    """``--qat-out``, else beside ``--out``: ``model.pte`` -> ``model.qat``."""
    return Path(args.qat_out) if args.qat_out else Path(args.out).with_suffix(".qat")


def fine_tune(args: argparse.Namespace, graph: Graph) -> tuple[TrainConfig, dict]:
    """The QAT run of ``--qat`` (new, or continued with ``--resume``): its config and the engine's summary."""
    out = qat_run_dir(args)
    options = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "workers": args.workers}
    if args.resume:
        cfg = qat_config(args.task, args.checkpoint, args.train_data, out, resume=True, **options)
        if Path(cfg.pretrained) != Path(args.checkpoint).resolve():
            raise ValueError(f"{out} fine-tunes {cfg.pretrained}, not {args.checkpoint}; give that --checkpoint")
    else:
        options["img_size"] = int(graph.example.shape[-1])
        try:
            cfg = qat_config(args.task, args.checkpoint, args.train_data, out, **options)
            RunDir(out).check_new()
        except OccupiedError as e:
            raise ValueError(
                f"{out} already holds a QAT run: add --resume to continue it (a finished run is converted "
                "again), or choose another --qat-out"
            ) from e
    return cfg, run_qat(cfg)


def _what_is_kept(args: argparse.Namespace) -> str:
    out = qat_run_dir(args)
    if not RunDir(out).has_state():
        return "The first epoch was not complete; nothing to resume. Start again with the same command"
    return f"{out} keeps its last completed epoch. Continue with the same command and --resume"
