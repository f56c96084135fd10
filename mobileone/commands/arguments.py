"""The argument layer of the ``mobileone`` command: every subcommand's options, validated one way.

Sizes, counts and tolerances are parsed by their :class:`~mobileone.core.ranges.Range`, so a bad value
stops with the valid range in a one-line message, and 0 is a value like any other. ``train``'s options
are generated from the :class:`~mobileone.engine.config.TrainConfig` fields (help, choices, range and
section come from the field), so a default is written once and ``--help`` shows it. Only the core and
the engine's config are imported here: building the parser needs torch alone.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import MISSING, Field
from typing import Any, NoReturn

from ..core.ranges import (
    CLASSES,
    COUNT,
    FRACTION,
    IMG_SIZE,
    MAX_DETECTIONS,
    POSITIVE,
    SECONDS,
    THREADS,
    TOLERANCE,
    WORKERS,
    Range,
)
from ..engine.config import CHOICES, RECIPES, SECTIONS, TrainConfig

TASKS = CHOICES["task"]
FROM_SOURCE = "default: the task the checkpoint or ONNX file was written for"
# Task defaults for --help, read when help is asked for (the tasks need torchvision):
# {task: {field: value}} for the user's data, and {"builtin " + task: ...} for the built-in data.
TaskDefaults = Callable[[], dict[str, dict[str, Any]]]


def ranged(r: Range) -> Callable[[str], int | float]:
    """An argparse type for a value in ``r``: the message says the range."""

    def parse(text: str) -> int | float:
        try:
            return r.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def ranged_list(r: Range) -> Callable[[str], list[int | float]]:
    """An argparse type for a comma list of values in ``r`` (``1,32``)."""
    one = ranged(r)

    def parse(text: str) -> list[int | float]:
        return [one(part.strip()) for part in text.split(",")]

    return parse


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text}")
    return value


def add_task(p: argparse.ArgumentParser, default: str | None = None, help: str = FROM_SOURCE) -> None:
    p.add_argument("--task", choices=TASKS, default=default, help=help)


def add_threads(p: argparse.ArgumentParser, default: str = "the cores") -> None:
    p.add_argument("--threads", type=ranged(THREADS), help=f"CPU threads (default: {default})")


# ---------------------------------------------------------------------------------------------------- train


def _field_help(f: Field, tasks: dict[str, dict[str, Any]] | None = None) -> str:
    """A field's help with its default (the short recipe's), the imagenet recipe's and each task's."""
    default = RECIPES["short"].get(f.name, f.default if f.default is not MISSING else None)
    parts = [] if default is None else [f"default: {_shown(default)}"]
    if RECIPES["imagenet"].get(f.name, default) != default:
        parts.append(f"imagenet recipe: {_shown(RECIPES['imagenet'][f.name])}")
    own: dict[str, Any] = {}  # each task's value, which its built-in data's repeats need not say again
    for task, values in (tasks or {}).items():
        base = own.get(task.split(" ")[0], default)
        if f.name in values and values[f.name] != base:
            parts.append(f"{task}: {_shown(values[f.name])}")
        own.setdefault(task, values.get(f.name, default))
    help = f.metadata["help"]
    return f"{help} ({'; '.join(parts)})" if parts and f.type not in ("bool", "bool | None") else help


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _add_field(group: argparse._ArgumentGroup, f: Field) -> argparse.Action:
    meta, flag = f.metadata, "--" + f.name.replace("_", "-")
    if f.type in ("bool", "bool | None"):
        if meta.get("flag"):  # --no-progress: the switch that turns a default-on option off
            return group.add_argument(meta["flag"], dest=f.name, action="store_const", const=False, help="")
        return group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help="")
    kwargs: dict[str, Any] = {"dest": f.name, "help": ""}
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    if meta.get("range") is not None:
        kwargs["type"] = ranged(meta["range"])
    elif meta.get("json"):
        kwargs["type"] = json_object
    elif meta.get("nargs"):
        kwargs["type"] = float
    for key in ("nargs", "metavar"):
        if meta.get(key):
            kwargs[key] = meta[key]
    return group.add_argument(flag, **kwargs)


def add_train(sub: argparse._SubParsersAction, task_defaults: TaskDefaults | None = None) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune on your data or the built-in data (any task); works under torchrun",
        description="Unset options come from --recipe (short: few epochs, small data; imagenet: the paper; "
        "finetune: from --pretrained), then from the task and the variant (S1-S4: progressive size, S2-S4: "
        "RandAugment); the defaults below say which.",
    )
    fields: dict[argparse.Action, Field] = {}
    for section, members in TrainConfig.sections().items():
        group = p.add_argument_group(SECTIONS[section])
        for f in members:
            if f.metadata["cli"]:
                fields[_add_field(group, f)] = f
        if section == "optimization":
            group.add_argument("--no-ema", action="store_true", help="no EMA (paper ablation; = --ema-decay 0)")
            group.add_argument("--no-wd-anneal", action="store_true", help="constant weight decay (paper ablation)")
    for action, f in fields.items():
        action.help = _field_help(f)

    def format_help() -> str:  # the tasks' defaults are read only when help is asked for
        tasks = task_defaults() if task_defaults else {}
        for action, f in fields.items():
            action.help = _field_help(f, tasks)
        return argparse.ArgumentParser.format_help(p)

    p.format_help = format_help


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the user set (None: unset), with ``--no-ema`` applied (``--no-wd-anneal`` is
    ``resolve_config``'s ``hold_weight_decay``)."""
    opts = {f.name: getattr(args, f.name) for f in TrainConfig.__dataclass_fields__.values() if f.metadata["cli"]}
    if args.no_ema:
        opts["ema_decay"] = 0.0
    return opts


# ---------------------------------------------------------------------------------------------------- the others


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="params, MACs and layers of variants or of a checkpoint, train-time and fused")
    p.add_argument("variants", nargs="*", help="variants (default: all), e.g. s0 mobileone_s4")
    p.add_argument("--img-size", type=ranged(IMG_SIZE), help="input size (default 224; a checkpoint's own)")
    p.add_argument("--num-classes", type=ranged(CLASSES), default=1000, help="classes (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--checkpoint", help="describe this file instead (any task): layout, architecture, classes, sizes")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a checkpoint or an ONNX file: top-1/top-5, mAP, or mIoU")
    add_task(p)
    p.add_argument("--data", required=True, help="a dataset folder with val/ (classify: or a folder of classes)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint of any task, fused or not (or Apple's, timm's, mmpretrain's)")
    src.add_argument("--onnx", help="an exported ONNX model, fp32 or INT8 (preprocessing read from its metadata)")
    p.add_argument("--img-size", type=ranged(IMG_SIZE), help="default: the size saved with the checkpoint")
    p.add_argument("--crop-pct", type=ranged(FRACTION), help="classify: resize to size / crop-pct (default 0.875)")
    p.add_argument("--batch-size", type=ranged(POSITIVE), default=64, help="default 64")
    p.add_argument("--workers", type=ranged(WORKERS), help="data-loading processes (default: fits the cores)")
    p.add_argument("--device", default="auto", choices=CHOICES["device"], help="default auto")
    p.add_argument("--json", metavar="OUT", help="also write the result to this JSON file (never over another file)")
    p.add_argument("--confusion", metavar="PNG", help="classify: save the confusion matrix as this PNG")
    add_threads(p)
    p.add_argument("--data-format", choices=CHOICES["data_format"], help="detect / segment: default detected")


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="run a checkpoint or an ONNX file of any task on image files")
    add_task(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint of any task, fused or not")
    src.add_argument("--onnx", help="an exported ONNX model (preprocessing and classes from its metadata)")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--topk", type=ranged(POSITIVE), default=5, help="classify: classes listed per image (default 5)")
    p.add_argument("--min-score", type=ranged(Range(0.0, 1.0)), default=0.3, help="detect: drawn boxes (default 0.3)")
    p.add_argument(
        "--out", help="detect / segment: folder for pictures, masks and predictions.json (default predictions)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    add_threads(p)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train on built-in data, evaluate, fuse, compare, export (a few minutes on a CPU)")
    add_task(p, "classify", "classify (default): S0 on the digits; detect / segment: on scenes built from them")
    p.add_argument("--out", help="run directory (default runs/demo-<task>-<date>-<time>)")
    p.add_argument("--epochs", type=ranged(POSITIVE), help="default: the task demo's (classify 6, detect 3, segment 8)")
    p.add_argument("--img-size", type=ranged(IMG_SIZE), help="default: the task demo's (32, 96, 64)")
    add_threads(p)


EXPORT_FORMATS = ["onnx", "torchscript", "executorch", "coreml", "tflite", "openvino", "ncnn"]
INT8_RUNTIMES = ["onnxruntime", "executorch", "litert", "openvino", "ncnn"]


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="fuse, export (onnx, torchscript, executorch, coreml, tflite, openvino, ncnn), check, then write"
    )
    add_task(p, help=f"{FROM_SOURCE}; with --variant: classify")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--variant", help="s0..s4 (detect ssdlite_*, segment deeplabv3_* / lraspp_*), random weights")
    src.add_argument("--checkpoint", help="a checkpoint of any task (unfused ones are fused)")
    p.add_argument("--format", required=True, choices=[*EXPORT_FORMATS, "all"], help="all: every installed target")
    p.add_argument(
        "--out",
        required=True,
        help="the file to write once its check passed (.onnx, .pt, .pte, .mlpackage, .tflite, .xml, .param); "
        "a folder with --format all",
    )
    p.add_argument("--img-size", type=ranged(IMG_SIZE), help="input size (default: the checkpoint's; classify 224)")
    p.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (default: batch 1)")
    p.add_argument(
        "--num-classes", type=ranged(CLASSES), help="classes of --variant (classify 1000, detect 80, segment 21)"
    )
    p.add_argument("--no-check", action="store_true", help="skip running the exported file against PyTorch")
    p.add_argument(
        "--check-data", help="classify: check on the held-out images of this folder (its val/) instead of samples"
    )
    p.add_argument(
        "--check-images", type=ranged(POSITIVE), default=400, help="classify: images of --check-data (default 400)"
    )
    p.add_argument("--threads", type=ranged(THREADS), help="--format all: threads of the latency column (default 2)")
    p.add_argument("--atol", type=ranged(TOLERANCE), help="check tolerance atol + rtol x max |output| (per format)")
    p.add_argument("--rtol", type=ranged(TOLERANCE), help="see --atol (per format)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--raw", dest="detect_form", action="store_const", const="raw", help="detect: raw form only")
    form.add_argument(
        "--nms", dest="detect_form", action="store_const", const="nms", help="detect: NMS form only (onnx, openvino)"
    )
    p.add_argument("--max-detections", type=ranged(MAX_DETECTIONS), help="detect: NMS form (default: the checkpoint's)")
    p.add_argument("--argmax", action="store_true", help="segment: also output labels, the per-pixel argmax")


def add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="static INT8 for a runtime (onnxruntime, executorch, litert, openvino, ncnn), checked in that runtime",
        description="Quantizes the fused model with the runtime's own tool, measures the task's metric of the fp32 "
        "and the INT8 file in that runtime, and while INT8 loses more than --max-drop tries per-channel weights, the "
        "other calibration, then the most sensitive layers in float; exit 3 if still over.",
    )
    add_task(p)
    p.add_argument("--runtime", choices=INT8_RUNTIMES, default="onnxruntime", help="default onnxruntime")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of the task (unfused ones are fused)")
    p.add_argument(
        "--calib-data",
        help="any folder of images to calibrate on (its train/ if present; default with --qat: the QAT data)",
    )
    p.add_argument("--out", required=True, help="INT8 file to write (the fp32 export goes beside it, *.fp32.*)")
    p.add_argument("--eval-data", help="the task's data whose val split scores fp32 and INT8 (default --calib-data)")
    p.add_argument("--json", metavar="OUT", help="write {task, runtime, metric, fp32, int8, drop} and the steps")
    p.add_argument("--max-drop", type=ranged(Range(0.0, 100.0)), default=1.0, help="points INT8 may lose (default 1)")
    p.add_argument("--img-size", type=ranged(IMG_SIZE), help="default: the checkpoint's")
    p.add_argument("--num-calib", type=ranged(POSITIVE), default=300, help="calibration images, at most (default 300)")
    p.add_argument(
        "--method",
        default="minmax-avg",
        choices=["minmax", "minmax-avg", "entropy", "percentile", "histogram"],
        help="activation calibration (default minmax-avg); runtimes other than onnxruntime: minmax or histogram",
    )
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    p.add_argument(
        "--keep-float",
        help="float layers: none, or +-joined first, firstN, last, depthwise (default: onnxruntime classify first3)",
    )
    p.add_argument("--reduce-range", action="store_true", help="--study: 7-bit weights (old x86 int8 kernels)")
    p.add_argument("--study", action="store_true", help="onnxruntime, classify: compare calibration settings")
    g = p.add_argument_group(
        "quantization-aware training (a run of the training engine; its best epoch is converted as above)"
    )
    g.add_argument("--qat", action="store_true", help="fine-tune the fused model with fake quantization first")
    g.add_argument(
        "--train-data",
        help="the task's training data, as mobileone train --data (default: the data of the run that wrote "
        "--checkpoint, from its config.json; the built-in data too)",
    )
    g.add_argument("--epochs", type=ranged(_train_range("epochs")), help="default 3")
    g.add_argument("--lr", type=ranged(_train_range("lr")), help="peak learning rate, cosine to 0 (default 0.001)")
    g.add_argument(
        "--batch-size", type=ranged(_train_range("batch_size")), help="default: the task's, lowered for small data"
    )
    g.add_argument("--qat-out", metavar="RUN_DIR", help="the QAT run's directory (default: --out's name + .qat)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted QAT run in --qat-out")
    g.add_argument("--workers", type=ranged(WORKERS), help="data-loading processes (default: fits the cores)")


def _train_range(name: str) -> Range:
    """The valid range of a training option (the same check as mobileone train's)."""
    return TrainConfig.__dataclass_fields__[name].metadata["range"]


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency of MobileOne and peers per runtime, with the paper's analyses")
    add_task(p, "classify", "classify (default); detect / segment: task models against MobileNetV3 peers")
    p.add_argument("--models", default="default", help="comma list of models or groups (default, mobileone, all, ...)")
    p.add_argument(
        "--runtimes",
        default="eager,onnxruntime",
        help="comma list of eager, channels_last, compile, onnxruntime, executorch, litert, openvino, ncnn "
        "(default eager,onnxruntime)",
    )
    p.add_argument(
        "--precisions", default="fp32", help="comma list of fp32, int8 (classify: each runtime's INT8; default fp32)"
    )
    p.add_argument(
        "--rounds", type=ranged(POSITIVE), default=3, help="batch 1 in rounds alternating between models (default 3)"
    )
    p.add_argument("--batch-sizes", type=ranged_list(POSITIVE), default=[1, 32], help="default 1,32")
    p.add_argument("--img-size", type=ranged(IMG_SIZE), help="default: classify 224, detect 320, segment 512")
    p.add_argument("--threads", type=ranged(THREADS), default=2, help="default 2")
    p.add_argument("--out", default="bench_results", help="folder for the results (default bench_results)")
    p.add_argument("--warmup", type=ranged(COUNT), default=10, help="untimed runs first (default 10)")
    p.add_argument("--iters", type=ranged(POSITIVE), default=30, help="at least this many timed runs (default 30)")
    p.add_argument("--min-time", type=ranged(SECONDS), default=1.0, help="and at least this many seconds (default 1)")
    p.add_argument("--no-studies", action="store_true", help="skip the 30-layer activation and skip/SE studies")
    p.add_argument(
        "--output-strides",
        type=ranged_list(Range(8, 16, integer=True)),
        default=[16, 8],
        help="segment: output strides to time (default 16,8)",
    )


class Parser(argparse.ArgumentParser):
    """argparse's parser with a one-line error: what was wrong and where to look, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(task_defaults: TaskDefaults | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="mobileone", description="MobileOne: build, train, fuse, export, benchmark")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and why")
    sub = parser.add_subparsers(dest="command", required=True)
    add_info(sub)
    add_predict(sub)
    add_train(sub, task_defaults)
    for add in (add_eval, add_demo, add_export, add_quantize, add_bench):
        add(sub)
    return parser
