"""Quantization-aware training (QAT) of the fused model, as a run of the training engine.

When post-training INT8 and its remedies still lose too much, the fused graph (what ships) is captured
with ``torch.export``, fake-quantized by ``prepare_qat_pt2e`` (``torchao.quantization.pt2e``) with
ExecuTorch's ``XNNPACKQuantizer`` in its QAT configuration (per-channel symmetric int8 weights, int8
activations with moving-average ranges), and trained by :func:`mobileone.engine.fit` with the task's
data, loss and metric: run directory, progress, per-epoch evaluation, EMA, resume, the NaN stop. The
weights learn to live on the int8 grid that every runtime's quantizer lays the same way (per output
channel, symmetric), so one QAT run serves every ``--runtime``.

:class:`QATTask` wraps the base task. Its checkpoints are the *fused float model* with the tuned
weights, in the base task's format (``eval``, ``export`` and ``quantize --checkpoint`` read them); ``best``
is the epoch whose fake-quantized model (observers frozen) scores best on the validation split. The
fused model has no BatchNorm left, so nothing renormalizes the kernels: no weight decay, no warm-up, a
small learning rate (:data:`QAT_DEFAULTS`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import types
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import Task, TaskData, TrainConfig, fit, resolve_config
from ..engine.distributed import Env
from ..engine.task import DataError
from ..tasks import get_task
from ..tasks.classify.data import builtin_dataset
from ..tasks.detect.builtin import digit_scenes
from ..tasks.segment.builtin import builtin_scenes
from ..tasks.segment.task import BUILTIN_SCENE_SIZE, segmentation_loss
from .calibration import calibration_batch
from .common import require
from .int8 import Graph, task_graph

# Fine-tuning scale, SGD whatever the task trains with (AdamW moves every weight by about lr each step, near
# one INT8 step of a fused kernel's weights). The fused kernels carry the folded BatchNorms: decay would
# shrink them with nothing to renormalize, and a warm-up protects freshly initialised heads, of which there are none.
QAT_DEFAULTS: dict[str, Any] = {
    "epochs": 3,
    "optimizer": "sgd",
    "lr": 1e-3,
    "min_lr": 0.0,
    "weight_decay": 0.0,
    "weight_decay_end": 0.0,
    "warmup_epochs": 0.0,
    "progressive": False,  # the captured graph has one input size
    "amp": "none",  # fake quantization is simulated in float32
    "channels_last": False,
}
# Options of the run that wrote the checkpoint (its config.json beside it) that QAT keeps unless given: its
# data (None: the built-in data, with its lighter augmentation), the augmentation the model was trained with
# (no flips for digits, detection's mosaic), its label smoothing, its data layout. (Not its head: the checkpoint
# is the model, and runs written before detection had heads say deeplabv3 there.)
INHERITED = ("data", "hflip", "crop_scale", "augment", "magnitude", "mosaic", "label_smoothing", "data_format")
BUILTIN_DATA: dict[str, Callable[[], Path]] = {
    "classify": builtin_dataset,
    "detect": digit_scenes,
    "segment": partial(builtin_scenes, size=BUILTIN_SCENE_SIZE),
}
CALIBRATION_IMAGES = 32  # training images whose ranges start the fake quantizers (then moving averages)


def prepare_qat(module: nn.Module, example: Tensor) -> torch.fx.GraphModule:
    """``module`` captured with a dynamic batch and fake-quantized with XNNPACK's QAT configuration."""
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "executorch")
    xq = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "executorch")
    quantizer = xq.XNNPACKQuantizer().set_global(xq.get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    # torch's own deprecation inside its pytree, raised on every copy of the graph (the engine's EMA copies it)
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=4096)
        captured = torch.export.export(module, (torch.cat([example, example]),), dynamic_shapes=({0: batch},))
        prepared = pt2e.prepare_qat_pt2e(captured.module(), quantizer)
    return switchable(prepared)


def switchable(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph`` with ``.train()`` and ``.eval()`` as the engine calls them (returning the module). An exported
    graph refuses them: its dropout and batch-norm ops are switched by torchao's ``move_exported_model_to_train``
    / ``_eval``, which a fused model, with neither, does not need (each call costs a second of pattern matching)."""
    ao = require("torchao.quantization.pt2e", "executorch")
    special = any(
        n.op == "call_function" and any(op in str(n.target) for op in ("dropout", "batch_norm"))
        for n in graph.graph.nodes
    )

    def train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
        if special:
            (ao.move_exported_model_to_train if mode else ao.move_exported_model_to_eval)(self)
        for module in self.modules():
            module.training = mode
        return self

    graph.train = types.MethodType(train, graph)
    graph.eval = types.MethodType(lambda self: self.train(False), graph)
    return graph


def set_observers(model: nn.Module, on: bool) -> None:
    """Let the fake quantizers' range observers update (training) or hold their ranges (evaluation)."""
    ao = require("torchao.quantization.pt2e", "executorch")
    model.apply(ao.enable_observer if on else ao.disable_observer)


class HeadOutputs(nn.Module):
    """A detector's box codes and class logits: what QAT captures, since its loss is computed on them."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.detector.head_outputs(x)


class GraphDetector(nn.Module):
    """The fake-quantized head graph behind the detector's evaluation interface (decoding and NMS in float)."""

    def __init__(self, graph: nn.Module, detector: nn.Module) -> None:
        super().__init__()
        self.graph, self.detector = graph, detector

    @property
    def config(self) -> Any:
        return self.detector.config

    def forward_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.detector.decode(*self.graph(x), (int(x.shape[-2]), int(x.shape[-1])))

    def postprocess(self, boxes: Tensor, scores: Tensor) -> list[dict[str, Tensor]]:
        return self.detector.postprocess(boxes, scores)


class FixedSizeSegmenter(nn.Module):
    """The fixed-size logits graph scored as the INT8 file is: each image resized to it, logits resized back."""

    def __init__(self, graph: nn.Module, size: int, num_classes: int) -> None:
        super().__init__()
        self.graph, self.size, self.num_classes = graph, size, num_classes

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h, w = x.shape[-2:]
        if (h, w) == (self.size, self.size):
            return {"out": self.graph(x)}
        small = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return {"out": F.interpolate(self.graph(small), size=(h, w), mode="bilinear", align_corners=False)}


class QATTask(Task):
    """A base task's data, loss and metric for the fake-quantized graph of its fused model (``cfg.pretrained``)."""

    min_batch = 1  # no BatchNorm in a fused model

    def __init__(self, base: Task) -> None:
        self.base = base
        self.name, self.metric, self.metric_names = base.name, base.metric, base.metric_names
        self.template: nn.Module | None = None  # the captured float module: the tuned weights go back into a copy
        self.size = 0  # the captured graph's input size

    def defaults(self, recipe: str, variant: str, builtin: bool) -> dict[str, Any]:
        return {**self.base.defaults(recipe, variant, builtin), **QAT_DEFAULTS}

    def validate(self, cfg: TrainConfig, given: frozenset[str] = frozenset()) -> None:
        if not cfg.pretrained:
            raise ValueError("QAT fine-tunes a trained model: give its checkpoint (pretrained)")
        if not Path(cfg.pretrained).is_file():
            raise FileNotFoundError(f"the checkpoint QAT fine-tunes, {cfg.pretrained}, does not exist")
        for option, value in (("progressive", cfg.progressive), ("teacher", cfg.teacher), ("compile", cfg.compile)):
            if value:
                raise ValueError(f"QAT trains a captured graph of one input size: --{option} does not apply")
        cfg.auto_img_size = cfg.auto_epochs = False  # the graph's size, and the epochs asked for (QAT_DEFAULTS')
        self.base.validate(cfg, given)

    def load_data(self, cfg: TrainConfig, env: Env) -> TaskData:
        return self.base.load_data(cfg, env)

    def build_model(self, cfg: TrainConfig, classes: Sequence[str]) -> nn.Module:
        """The checkpoint's fused graph, fake-quantized, its ranges started on training images."""
        model = self.base.load(Path(cfg.pretrained))
        names = getattr(model, "class_names", None)
        if names and list(names) != list(classes):
            raise DataError(
                f"{cfg.pretrained} was trained on the classes {list(names)[:10]}, the training data has "
                f"{list(classes)[:10]}; QAT fine-tunes on the same classes in the same order"
            )
        graph = task_graph(self.name, model, cfg.img_size)
        self.template, self.size = self.captured(graph), int(graph.example.shape[-1])
        prepared = prepare_qat(self.template, graph.example)
        with torch.no_grad():
            prepared(calibration_batch(qat_data(cfg), graph.meta, CALIBRATION_IMAGES, cfg.seed))
        return prepared

    def captured(self, graph: Graph) -> nn.Module:
        """The module QAT captures from the task's fused graph (default: the graph itself)."""
        return graph.module

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The model the base task saves, from a captured module (default: itself)."""
        return module

    def image_sides(self, data: TaskData) -> Sequence[int]:
        return []

    def set_eval_transform(self, data: TaskData, cfg: TrainConfig) -> None:
        self.base.set_eval_transform(data, cfg)

    def set_train_transform(self, data: TaskData, cfg: TrainConfig, size: int, strength: float) -> None:
        self.base.set_train_transform(data, cfg, size, strength)

    def collate(self):
        return self.base.collate()

    def loss(self, net: nn.Module, images: Tensor, targets: Any, cfg: TrainConfig) -> Tensor:
        try:
            return self.task_loss(net, images, targets, cfg)
        except RuntimeError as e:  # torchao's fake quantization of a NaN weight fails on the zero point it derives
            if "zero_point" not in str(e):
                raise
            return torch.tensor(float("nan"), device=images.device)  # the engine's NaN stop reports it

    def task_loss(self, net: nn.Module, images: Tensor, targets: Any, cfg: TrainConfig) -> Tensor:
        """The base task's loss on the graph's outputs (default: the base task's own)."""
        return self.base.loss(net, images, targets, cfg)

    def evaluable(self, graph: nn.Module) -> nn.Module:
        """The graph as the base task's ``evaluate`` calls it (default: as it is)."""
        return graph

    def evaluate(self, model: nn.Module, loader: Any, env: Env) -> dict[str, float]:
        set_observers(model, False)  # validation images must not move the ranges
        try:
            return self.base.evaluate(self.evaluable(model), loader, env)
        finally:
            set_observers(model, True)

    def save(self, model: nn.Module, path: Path, **meta: Any) -> Path:
        if isinstance(model, torch.fx.GraphModule):
            model = self.tuned_float(model)
        return self.base.save(model, path, **meta)

    def tuned_float(self, graph: torch.fx.GraphModule) -> nn.Module:
        """The fused float model with ``graph``'s weights (torch.export keeps the parameters' names)."""
        if self.template is None:
            raise RuntimeError("QATTask.save runs after build_model, which captures the model")
        module = copy.deepcopy(self.template)
        names = set(module.state_dict())
        tuned = {k: v.detach().cpu() for k, v in graph.state_dict().items() if k in names}
        if names - set(tuned):
            raise RuntimeError(f"QAT could not map back the weights {sorted(names - set(tuned))[:5]}")
        module.load_state_dict(tuned)
        return self.unwrap(module)

    def load(self, path: Path) -> nn.Module:
        return self.base.load(path)

    def finish(self, run_dir: Path, best: nn.Module, data: TaskData, cfg: TrainConfig) -> None:
        self.base.finish(run_dir, best, data, cfg)

    def epoch_line(self, row: dict[str, Any]) -> str:
        return self.base.epoch_line(row)


class SegmentationQAT(QATTask):
    """Segmentation: the logits graph, cross-entropy on them (the auxiliary head is gone in the fused model)."""

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.model

    def task_loss(self, net: nn.Module, images: Tensor, targets: Tensor, cfg: TrainConfig) -> Tensor:
        return segmentation_loss({"out": net(images)}, targets, 0.0, cfg.label_smoothing)

    def evaluable(self, graph: nn.Module) -> nn.Module:
        return FixedSizeSegmenter(graph, self.size, self.template.model.num_classes)


class DetectionQAT(QATTask):
    """Detection: the head outputs graph, the detector's own loss on them; decoding and NMS stay outside."""

    def __init__(self, base: Task) -> None:
        super().__init__(base)
        self.detector: nn.Module | None = None  # the float detector on the run's device: anchors, matcher, loss

    def load_data(self, cfg: TrainConfig, env: Env) -> TaskData:
        # An epoch of QAT is one pass over the data: a capped epoch (steps_per_epoch) is the detect task's way
        # out of its floor of steps, which is there for training from scratch.
        return self.base.load_data(cfg if cfg.steps_per_epoch else dataclasses.replace(cfg, steps_per_epoch=1), env)

    def captured(self, graph: Graph) -> nn.Module:
        return HeadOutputs(graph.module.detector)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module.detector

    def prepare(self, cfg: TrainConfig, env: Env, model: nn.Module) -> None:
        self.detector = copy.deepcopy(self.template.detector).to(env.device).eval()

    def task_loss(self, net: nn.Module, images: Tensor, targets: list[dict[str, Tensor]], cfg: TrainConfig) -> Tensor:
        losses = self.detector.compute_loss(*net(images), targets, (int(images.shape[-2]), int(images.shape[-1])))
        return losses["bbox_regression"] + losses["classification"]

    def evaluable(self, graph: nn.Module) -> nn.Module:
        return GraphDetector(graph, self.detector)


QAT_TASKS: dict[str, type[QATTask]] = {"classify": QATTask, "detect": DetectionQAT, "segment": SegmentationQAT}


def qat_task(name: str) -> QATTask:
    """The QAT wrapper of the task ``name``."""
    return QAT_TASKS[name](get_task(name))


def source_run_options(checkpoint: str | os.PathLike, task: str) -> dict[str, Any]:
    """:data:`INHERITED` options of the run that wrote ``checkpoint``: its ``config.json`` beside it, if any."""
    saved = Path(checkpoint).parent / "config.json"
    try:
        values = json.loads(saved.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(values, dict) or values.get("task", "classify") != task:
        return {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in INHERITED}


def qat_data(cfg: TrainConfig) -> Path:
    """The folder a QAT run trains on: ``cfg.data``, or the task's built-in data."""
    return Path(cfg.data) if cfg.data else BUILTIN_DATA[cfg.task]()


def qat_config(
    task: str, checkpoint: str | os.PathLike, data: str | os.PathLike | None, out: str | os.PathLike, **options: Any
) -> TrainConfig:
    """The QAT run's config: the engine's defaults, :data:`QAT_DEFAULTS`, the source run's :data:`INHERITED`
    options (``data`` too when None is given), then ``options`` (``TrainConfig`` fields; None means unset).
    ``resume=True`` continues the run in ``out``."""
    qat = qat_task(task)
    if options.pop("resume", False):
        return resolve_config(qat, resume=str(out), **options)
    source = source_run_options(checkpoint, task)
    if data is not None:
        source["data"] = str(data)
    elif "data" not in source:
        raise ValueError(
            f"QAT needs the task's training data: give --train-data (no run's config.json beside {checkpoint} "
            "names the data it was trained on)"
        )
    options = {**source, **{k: v for k, v in options.items() if v is not None}}
    if "img_size" not in options:  # the checkpoint's, as the export has it
        options["img_size"] = int(task_graph(task, qat.base.load(Path(checkpoint))).example.shape[-1])
    return resolve_config(qat, pretrained=str(Path(checkpoint).resolve()), out=str(out), **options)


def run_qat(cfg: TrainConfig) -> dict[str, Any]:
    """Train the QAT run ``cfg`` describes (see :func:`qat_config`); the engine's summary."""
    return fit(cfg, qat_task(cfg.task))


def qat_finetune(
    graph: Graph, train_data: str | os.PathLike, out: str | os.PathLike | None = None, **options: Any
) -> Graph:
    """``graph`` (of :func:`~mobileone.deploy.int8.task_graph`) with the weights of the best epoch of a QAT run on
    ``train_data``; ``options`` are ``TrainConfig`` fields (``epochs``, ``lr``, ``batch_size``, ...), the run
    directory is ``out`` (default: a temporary one, deleted after)."""
    with tempfile.TemporaryDirectory(prefix="mobileone_qat_") as tmp:
        qat = qat_task(graph.task)
        checkpoint = qat.base.save(qat.unwrap(qat.captured(graph)), Path(tmp) / "fused.safetensors")
        size = int(graph.example.shape[-1])
        cfg = qat_config(graph.task, checkpoint, train_data, out or Path(tmp) / "run", img_size=size, **options)
        tuned = qat.base.load(Path(run_qat(cfg)["run_dir"]) / "best.safetensors")
        return task_graph(graph.task, tuned, size)
