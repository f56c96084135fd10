"""The ``mobileone`` command: a thin argparse layer over the Python API.

Each subcommand is an ``add_<name>`` function that declares its arguments and a ``run_<name>``
function that calls the library. The core is imported at the top; the tasks, deployment and the
benchmark need optional extras (torchvision, onnx, ...), so ``run_<name>`` imports them, and
``mobileone info`` works with torch alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .commands import write_json
from .core.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from .core.complexity import count_layers, count_macs, count_params
from .core.config import list_models, resolve_variant
from .core.factory import create_model
from .core.model import MobileOne
from .deploy.common import ExportError
from .engine.rundir import RunDir, RunDirError

TASKS = ["classify", "detect", "segment"]
INT8_RUNTIMES = ["onnxruntime", "executorch", "litert", "openvino", "ncnn"]
EXPORT_FORMATS = ["onnx", "torchscript", "executorch", "coreml", "tflite", "openvino", "ncnn"]


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="params, MACs and layers of variants, train-time and fused")
    p.add_argument("variants", nargs="*", help="variants (default: all), e.g. s0 mobileone_s4")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--checkpoint", help="describe this file instead: layout, architecture, classes, sizes")


def _describe_checkpoint(path: str) -> list[tuple[str, object, object]]:
    """(name, train-time model, fused model) for a checkpoint file, after saying what it holds."""
    ckpt = read_checkpoint(path)
    print(
        f"{path}: {ckpt.layout} layout, {'fused' if ckpt.fused else 'unfused'}, {ckpt.num_classes} classes, "
        f"variant {ckpt.variant or 'custom'}; config {json.dumps(ckpt.config.to_dict())}"
    )
    train = MobileOne(ckpt.config, ckpt.num_classes)
    return [(ckpt.variant or Path(path).name, train, MobileOne(ckpt.config, ckpt.num_classes, inference_mode=True))]


def run_info(args: argparse.Namespace) -> int:
    if args.checkpoint:
        models = _describe_checkpoint(args.checkpoint)
    else:
        names = [resolve_variant(v) for v in args.variants] or list_models()
        models = [
            (
                n,
                create_model(n, num_classes=args.num_classes),
                create_model(n, num_classes=args.num_classes, inference_mode=True),
            )
            for n in names
        ]
    rows = []
    for name, train, fused in models:
        rows.append(
            {
                "variant": name,
                "params_train": count_params(train),
                "params_fused": count_params(fused),
                "macs_train": count_macs(train, args.img_size),
                "macs_fused": count_macs(fused, args.img_size),
                "layers": count_layers(fused),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"MobileOne at {args.img_size}x{args.img_size}, {fused.num_classes} classes "
        "(layers: weight layers of the fused net, convs + head)"
    )
    print("| variant | params train-time | params fused | MACs train-time | MACs fused | layers |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['params_train']:,} | {r['params_fused']:,} | "
            f"{r['macs_train'] / 1e6:,.1f} M | {r['macs_fused'] / 1e6:,.1f} M | {r['layers']} |"
        )
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune on an ImageFolder (or the built-in digits); works under torchrun",
        description="Unset options come from --recipe (short: few epochs, small data; imagenet: the paper; "
        "finetune: from --pretrained), then from the variant (S1-S4: progressive size, S2-S4: RandAugment).",
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--task", choices=TASKS, help="classify (default), detect (SSDLite), segment (DeepLabV3, LR-ASPP)")
    g.add_argument(
        "--data",
        help="the task's data folder (classify: train/ and val/ with one sub-folder per class); "
        "default: the task's built-in data",
    )
    g.add_argument("--variant", help="s0..s4, mu0..mu2 (default s0); detect / segment also mnv3, the MobileNetV3 peer")
    g.add_argument(
        "--arch",
        type=json.loads,
        help='custom MobileOneConfig as JSON, e.g. \'{"widths": [8,16,32,64], '
        '"stem_width": 8, "blocks": [1,1,1,1], "k": 2}\'',
    )
    g.add_argument(
        "--recipe", choices=["short", "imagenet", "finetune"], help="default: finetune with --pretrained, else short"
    )
    g.add_argument("--out", help="run directory (default runs/mobileone)")
    g.add_argument(
        "--pretrained",
        help="fine-tune from this checkpoint (any layout load_checkpoint reads); new head. "
        "detect / segment: a classification checkpoint of the backbone (e.g. Apple's)",
    )
    g.add_argument("--freeze-stages", type=int, help="freeze the stem and the first N-1 stages, BN included (0..5)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last completed epoch")
    g.add_argument("--strict-images", action="store_true", default=None, help="stop on an unreadable image")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch, over all processes")
    g.add_argument("--accum-steps", type=int, help="split each batch into this many micro-batches")
    g.add_argument("--steps-per-epoch", type=int, help="cap the steps of each epoch")
    g.add_argument("--lr", type=float, help="peak learning rate (default: --base-lr x batch / 256)")
    g.add_argument("--base-lr", type=float, help="learning rate per 256 images (default 0.1)")
    g.add_argument("--min-lr", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--weight-decay-end", type=float, help="cosine-annealed weight decay at the end (paper 1e-5)")
    g.add_argument("--no-wd-anneal", action="store_true", help="constant weight decay (paper ablation)")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--ema-decay", type=float, help="EMA of weights and buffers (default 0.9995)")
    g.add_argument("--no-ema", action="store_true", help="no EMA (paper ablation)")
    g.add_argument("--no-ema-warmup", action="store_true", help="constant EMA decay from the first step")
    g = p.add_argument_group("architecture and initialisation")
    g.add_argument("--k", type=int, help="conv branches per layer (paper ablation: 1)")
    g.add_argument("--no-branches", action="store_true", help="k = 1 and no scale/skip branches (paper ablation)")
    g.add_argument(
        "--init",
        choices=["torch", "unit-sum", "identity"],
        help="branch BN scales at the start (identity: skip layers, peers' residual blocks)",
    )
    g = p.add_argument_group("augmentation")
    g.add_argument("--img-size", type=int, help="final training and evaluation size")
    g.add_argument("--progressive", action=argparse.BooleanOptionalAction, help="160 -> 192 -> 224 px style phases")
    g.add_argument("--augment", choices=["none", "randaugment", "autoaugment"])
    g.add_argument("--magnitude", type=float, help="RandAugment magnitude at full strength (default 7)")
    g.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="random-resized-crop area range")
    g.add_argument("--hflip", type=float, help="horizontal flip probability")
    g.add_argument("--crop-pct", type=float, help="evaluation crop ratio (default 0.875)")
    g = p.add_argument_group("detection and segmentation")
    g.add_argument(
        "--data-format", choices=["auto", "coco", "voc", "yolo", "masks"], help="annotation layout (default: detected)"
    )
    g.add_argument("--anchor-min-ratio", type=float, help="detect: smallest default box / image size (default 0.2)")
    g.add_argument("--anchor-max-ratio", type=float, help="detect: largest default box / image size (default 0.95)")
    g.add_argument("--score-thresh", type=float, help="detect: lowest score kept for evaluation (default 0.001)")
    g.add_argument("--nms-thresh", type=float, help="detect: IoU of per-class NMS (default 0.55)")
    g.add_argument("--max-detections", type=int, help="detect: detections kept per image (default 300)")
    g.add_argument("--head", choices=["deeplabv3", "lraspp"], help="segment: head (default deeplabv3)")
    g.add_argument("--output-stride", type=int, choices=[8, 16], help="segment: backbone output stride (default 16)")
    g.add_argument("--aux-weight", type=float, help="segment: auxiliary FCN loss weight, 0 = no aux head (0.4)")
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", help="teacher checkpoint (same classes) for knowledge distillation")
    g.add_argument("--distill-alpha", type=float, help="weight of the soft-target loss (default 0.5)")
    g.add_argument("--distill-temperature", type=float, help="default 2")
    g = p.add_argument_group("hardware")
    g.add_argument("--workers", type=int, help="data-loading processes per rank (default: fits the machine)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    g.add_argument("--log-every", type=int, help="without a terminal, print a line every N steps")
    g.add_argument("--seed", type=int)
    g.add_argument("--deterministic", action="store_true", default=None, help="deterministic kernels (exact resume)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"])
    g.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], help="mixed precision (auto: bf16 on GPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: on GPU")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm across GPUs")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    from .core.files import DiskFullError
    from .engine import TrainingError
    from .tasks import resolve_config, train

    flags = ("command", "verbose", "no_wd_anneal", "no_ema", "no_ema_warmup", "no_branches", "no_progress")
    opts = {k: v for k, v in vars(args).items() if k not in flags}
    if args.no_ema:
        opts["ema_decay"] = 0.0
    if args.no_ema_warmup:
        opts["ema_warmup"] = False
    if args.no_branches:
        opts["branches"] = False
    if args.no_progress:
        opts["progress"] = False
    opts["hold_weight_decay"] = args.no_wd_anneal
    cfg = resolve_config(**opts)
    try:
        train(cfg)
    except TrainingError as e:
        print(f"mobileone train: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if RunDir(cfg.out).has_state():
            print(
                f"\nmobileone train: interrupted. {cfg.out} keeps its last completed epoch; continue with:\n"
                f"  mobileone train --resume {cfg.out}",
                file=sys.stderr,
            )
        else:
            print(
                "\nmobileone train: interrupted before the first epoch was complete; nothing to resume. Start "
                "again with the same command",
                file=sys.stderr,
            )
        return 130
    except DiskFullError as e:
        print(
            f"mobileone train: error: {e}. Free some space, then continue with: mobileone train --resume {cfg.out}",
            file=sys.stderr,
        )
        return 2
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a fused or unfused checkpoint: top-1/top-5, mAP, or mIoU")
    p.add_argument("--task", choices=TASKS, default="classify")
    p.add_argument("--data", required=True, help="folder of class folders, or a dataset folder with val/")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="any checkpoint load_checkpoint reads")
    src.add_argument("--onnx", help="an exported ONNX model, fp32 or INT8 (preprocessing read from its metadata)")
    p.add_argument("--img-size", type=int, help="default: the size saved with the checkpoint, else 224")
    p.add_argument("--crop-pct", type=float, help="resize the short side to size / crop-pct (default 0.875)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--json", metavar="OUT", help="also write the result to this JSON file (and OUT.confusion.png)")
    p.add_argument("--confusion", metavar="PNG", help="save the confusion matrix as this PNG")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--data-format",
        choices=["auto", "coco", "voc", "yolo", "masks"],
        help="detect / segment: annotation layout of --data (default: detected)",
    )


def run_eval(args: argparse.Namespace) -> int:
    if args.task != "classify":
        return _task_command(args, "evaluate")
    from .tasks.classification.evaluate import evaluate_checkpoint

    if args.onnx:
        from .deploy.evaluate_onnx import evaluate_onnx

        r = evaluate_onnx(args.onnx, args.data, args.batch_size)
        print(
            f"{r['model']} (onnxruntime) on {r['data']}: top-1 {r['top1']:.2f} %, top-5 {r['top5']:.2f} %, "
            f"{r['images']} images"
        )
        write_json(args.json, r)
        return 0
    from .tasks.classification.evaluate import confusion_text, plot_confusion

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
    png = args.confusion or (str(Path(args.json).with_suffix(".confusion.png")) if args.json else None)
    if png:
        plot_confusion(r, png)
        print(f"confusion matrix: {png}")
    write_json(args.json, r)
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train on built-in data, evaluate, fuse, compare, export (a few minutes on a CPU)")
    p.add_argument(
        "--task",
        choices=TASKS,
        default="classify",
        help="classify: S0 on the digits; detect / segment: on scenes built from the digits",
    )
    p.add_argument("--out", help="run directory (default runs/demo-<date>-<time>)")
    p.add_argument("--epochs", type=int, help="default: the task demo's")
    p.add_argument("--img-size", type=int, help="default: the task demo's")
    p.add_argument("--threads", type=int, help="torch CPU threads for training and timing (default: torch's)")


def run_demo(args: argparse.Namespace) -> int:
    return _task_command(args, "demo")


# Each task's command bodies: mobileone.commands.<module>, a function per subcommand taking the parsed
# arguments and returning the exit code (classification keeps eval / export / bench here).
TASK_COMMANDS = {"classify": "classification", "detect": "detection", "segment": "segmentation"}


def _task_command(args: argparse.Namespace, command: str) -> int:
    import importlib

    return getattr(importlib.import_module(f"mobileone.commands.{TASK_COMMANDS[args.task]}"), command)(args)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="fuse, export to onnx/torchscript/executorch/coreml/tflite/openvino/ncnn, and check the file"
    )
    p.add_argument("--task", choices=TASKS, default="classify")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--variant", help="s0..s4, random weights (for trying a deployment pipeline)")
    src.add_argument("--checkpoint", help="any checkpoint load_checkpoint reads (unfused ones are fused)")
    p.add_argument("--format", required=True, choices=[*EXPORT_FORMATS, "all"], help="all: every installed target")
    p.add_argument(
        "--out",
        required=True,
        help="output file (.onnx, .pt, .pte, .mlpackage, .tflite, .xml, .param); a folder with --format all",
    )
    p.add_argument("--img-size", type=int, help="input size (default: the checkpoint's, else 224)")
    p.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (default: batch 1)")
    p.add_argument("--num-classes", type=int, help="classes of a --variant model (default 1000; detect 80)")
    p.add_argument("--no-check", action="store_true", help="skip running the exported file against PyTorch")
    p.add_argument(
        "--check-data", help="classify: check on the held-out images of this folder (its val/) instead of samples"
    )
    p.add_argument("--check-images", type=int, default=400, help="classify: images of --check-data (default 400)")
    p.add_argument("--threads", type=int, help="--format all: threads for the latency column (default 2)")
    p.add_argument("--atol", type=float, help="check tolerance: atol + rtol * max |output| (defaults per format)")
    p.add_argument("--rtol", type=float)
    form = p.add_mutually_exclusive_group()
    form.add_argument(
        "--raw",
        dest="detect_form",
        action="store_const",
        const="raw",
        help="detect: only the raw form (boxes and class scores, no NMS); default: both",
    )
    form.add_argument(
        "--nms",
        dest="detect_form",
        action="store_const",
        const="nms",
        help="detect: only the form with NMS in the graph (ONNX, OpenVINO)",
    )
    p.add_argument(
        "--max-detections",
        type=int,
        help="detect: detections kept per image in the NMS form (default: the checkpoint's, 300)",
    )
    p.add_argument(
        "--argmax",
        action="store_true",
        help="segment: also output labels, the per-pixel argmax (int64), beside the logits",
    )


def run_export(args: argparse.Namespace) -> int:
    from .commands.export import export

    return export(args)


def add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="static INT8 for a runtime (onnxruntime, executorch, litert, openvino, ncnn), checked in that runtime",
        description="Quantizes the fused model with the runtime's own tool, measures the task's metric of the fp32 "
        "and the INT8 file in that runtime, and while INT8 loses more than --max-drop tries per-channel weights, the "
        "other calibration, then the most sensitive layers in float; exit 3 if still over.",
    )
    p.add_argument("--task", choices=TASKS, default="classify")
    p.add_argument("--runtime", choices=INT8_RUNTIMES, default="onnxruntime", help="default onnxruntime")
    p.add_argument("--checkpoint", required=True, help="any checkpoint of the task (unfused ones are fused)")
    p.add_argument("--calib-data", required=True, help="any folder of images to calibrate on (its train/ if present)")
    p.add_argument("--out", required=True, help="INT8 file to write (the fp32 export goes beside it, *.fp32.*)")
    p.add_argument("--eval-data", help="the task's data whose val split scores fp32 and INT8 (default --calib-data)")
    p.add_argument("--json", metavar="OUT", help="write {task, runtime, metric, fp32, int8, drop} and the steps")
    p.add_argument("--max-drop", type=float, default=1.0, help="points of the metric INT8 may lose (default 1)")
    p.add_argument("--img-size", type=int, help="default: the checkpoint's")
    p.add_argument("--num-calib", type=int, default=300, help="calibration images (default 300)")
    p.add_argument(
        "--method",
        default="minmax-avg",
        choices=["minmax", "minmax-avg", "entropy", "percentile", "histogram"],
        help="activation calibration; runtimes other than onnxruntime: minmax or histogram",
    )
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    p.add_argument(
        "--keep-float",
        help="float layers: none, or +-joined first, firstN, last, depthwise (default: onnxruntime classify first3)",
    )
    p.add_argument("--reduce-range", action="store_true", help="--study: 7-bit weights (old x86 int8 kernels)")
    p.add_argument("--study", action="store_true", help="onnxruntime, classify: compare calibration settings")
    g = p.add_argument_group("quantization-aware training")
    g.add_argument("--qat", action="store_true", help="fine-tune the fused model with fake quantization first")
    g.add_argument("--train-data", help="--qat: the task's training data")
    g.add_argument("--epochs", type=int, default=1, help="--qat: epochs (default 1)")
    g.add_argument("--lr", type=float, default=1e-3, help="--qat: learning rate (default 1e-3)")


def run_quantize(args: argparse.Namespace) -> int:
    if not args.study:
        from .commands.quantize import quantize

        return quantize(args)
    from .deploy.quantize import QuantSettings, quantization_study, quantize_model, study_table

    if args.task != "classify" or args.runtime != "onnxruntime":
        raise ValueError("--study compares onnxruntime's settings for classification: drop --task / --runtime")
    method = args.method if args.method != "histogram" else "percentile"
    settings = QuantSettings(method, not args.per_tensor, args.keep_float or "first3", args.reduce_range)
    model = load_checkpoint(args.checkpoint)
    try:
        fp32, int8 = quantize_model(model, args.calib_data, args.out, settings, args.img_size, args.num_calib)
    except ImportError as e:
        print(f"mobileone quantize: {e}", file=sys.stderr)
        return 2
    print(f"INT8 ({settings.label()}, {args.num_calib} calibration images): {int8}  (fp32 export: {fp32})")
    rows = quantization_study(
        fp32,
        args.calib_data,
        args.eval_data or args.calib_data,
        num_calib=args.num_calib,
        out_dir=Path(args.out).parent / "study",
    )
    print(study_table(rows))
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency of MobileOne and peers per runtime, with the paper's analyses")
    p.add_argument(
        "--task",
        choices=TASKS,
        default="classify",
        help="detect / segment: task models at 320 / 512 px against MobileNetV3 peers",
    )
    p.add_argument(
        "--models",
        default="default",
        help="comma list of models or groups: default, mobileone, unfused, "
        "torchvision, timm, all, or names such as mobileone_s0,mobilenet_v3_large",
    )
    p.add_argument(
        "--runtimes",
        default="eager,onnxruntime",
        help="comma list of eager, channels_last, compile, onnxruntime, executorch, litert, openvino, ncnn",
    )
    p.add_argument(
        "--batch-sizes",
        default="1,32",
        help="latency at the smallest, throughput at the largest (segment: the smallest only)",
    )
    p.add_argument("--img-size", type=int, help="default 224; detect 320")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out",
        default="bench_results",
        help="folder for results.md/.csv/.json and the plots (detect_results.*, segment_results.* for the tasks)",
    )
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (batch 1)")
    p.add_argument("--iters", type=int, default=30, help="at least this many timed runs (batch 1)")
    p.add_argument("--rounds", type=int, default=3, help="batch 1 in this many rounds alternating between models")
    p.add_argument(
        "--precisions", default="fp32", help="comma list of fp32, int8 (each runtime's own static INT8; classify)"
    )
    p.add_argument("--min-time", type=float, default=1.0, help="and at least this many seconds per measurement")
    p.add_argument("--no-studies", action="store_true", help="skip the 30-layer activation and skip/SE studies")
    p.add_argument(
        "--output-strides",
        default="16,8",
        help="segment: backbone output strides to time (the MobileNetV3 peers: 16 only)",
    )


def run_bench(args: argparse.Namespace) -> int:
    if args.task != "classify":
        return _task_command(args, "bench")
    from .bench import BenchConfig, run_benchmark

    cfg = BenchConfig(
        models=args.models.split(","),
        runtimes=args.runtimes.split(","),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        img_size=args.img_size or 224,
        threads=args.threads,
        out=args.out,
        warmup=args.warmup,
        iters=args.iters,
        min_time=args.min_time,
        rounds=args.rounds,
        precisions=args.precisions.split(","),
        studies=not args.no_studies,
    )
    try:
        result = run_benchmark(cfg)
    except ImportError as e:
        print(f"mobileone bench: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    print(f"written: {args.out}/results.md, results.csv, results.json, latency_vs_macs.png, latency_vs_top1.png")
    return 1 if result["errors"] else 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files with a checkpoint or an exported ONNX model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="any checkpoint load_checkpoint reads (fused or not)")
    src.add_argument("--onnx", help="an exported ONNX classifier (preprocessing and classes from its metadata)")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--topk", type=int, default=5, help="classes listed per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's / onnxruntime's)")


def run_predict(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for source in args.images:
        if args.onnx:
            from .deploy.predict_onnx import predict_onnx

            results += predict_onnx(args.onnx, source, args.topk, args.threads)
        else:
            from .tasks.classification.predict import predict

            results += predict(args.checkpoint, source, args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['image']}: {r['error']}")
            else:
                print(f"{r['image']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f} %" for t in r["top"]))
    return 1 if any("error" in r for r in results) else 0


COMMANDS = {
    "info": (add_info, run_info),
    "predict": (add_predict, run_predict),
    "train": (add_train, run_train),
    "eval": (add_eval, run_eval),
    "demo": (add_demo, run_demo),
    "export": (add_export, run_export),
    "quantize": (add_quantize, run_quantize),
    "bench": (add_bench, run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobileone", description="MobileOne: build, train, fuse, export, benchmark")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and why")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command][1](args)
    except (CheckpointError, ValueError, OSError, RunDirError, ExportError) as e:
        print(f"mobileone {args.command}: error: {e}", file=sys.stderr)
        return 2
