"""What a task (classification, detection, segmentation) plugs into the training engine.

The engine owns everything every task needs: the run directory, resume, schedules, EMA, DDP,
AMP, channels_last, accumulation, the NaN stop, progress, metrics and curves. A task supplies
its data, its model, its loss, its metrics and its checkpoint files through this interface.

A batch is ``(images, targets, bad_paths)``: ``images`` a float tensor (N, 3, H, W) or ``None``
when every sample of the batch was unreadable, ``targets`` anything that slices along the batch
(a tensor of labels or masks, a list of per-image dicts of boxes), ``bad_paths`` the files that
could not be read (skipped and counted).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from .config import TrainConfig
    from .distributed import Env


class DataError(ValueError):
    """The dataset on disk cannot be used as given (missing folders, class mismatch, nothing readable).

    A data-loader worker's exception is raised again in the training process as its type, built
    from a text holding the worker's whole traceback; a DataError keeps only its own message
    there, so an error reads the same with data workers as without.
    """

    def __init__(self, message: str = "") -> None:
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if isinstance(message, str) and message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].rstrip("\n")
        super().__init__(message)


class NonFiniteOutputError(ValueError):
    """A model gave NaN or infinite outputs: any score of them (argmax of NaN, NaN boxes) would be meaningless."""


def require_finite(outputs: Any, what: str = "the model") -> None:
    """Raise :class:`NonFiniteOutputError` if a float tensor in ``outputs`` (or a dict / list of them) is not finite.

    Every task's evaluation calls it on the raw outputs before scoring them.
    """
    if isinstance(outputs, Tensor):
        if outputs.is_floating_point() and not bool(outputs.isfinite().all()):
            bad = int((~outputs.isfinite()).sum())
            raise NonFiniteOutputError(
                f"{what} gives NaN or infinite outputs ({bad} of {outputs.numel()} values "
                "in a batch); it is broken, and is not scored"
            )
    elif isinstance(outputs, dict):
        for value in outputs.values():
            require_finite(value, what)
    elif isinstance(outputs, (list, tuple)):
        for value in outputs:
            require_finite(value, what)


@dataclass
class TaskData:
    """A task's datasets: ``train`` is indexed with ``(epoch, index)`` keys (see ``EpochSampler``)."""

    train: Dataset
    val: Dataset
    classes: list[str]


class Task(ABC):
    """One task's hooks into the engine. Subclasses set ``name``, ``metric`` and ``metric_names``."""

    name: str  # the CLI's --task value
    metric: str  # the validation metric that picks best.* (higher is better)
    metric_names: tuple[str, ...]  # metrics logged every epoch (and again for the EMA weights, "ema_" + name)
    min_batch: int = 1  # images per process and micro-batch the model needs in train mode (automatic batches keep it)
    max_validations: int | None = None  # validations a run without --eval-every (None: every epoch)
    min_img_size: int = 32  # the smallest image size a size derived from the data may take

    def defaults(self, recipe: str, variant: str, builtin: bool) -> dict[str, Any]:
        """TrainConfig values this task sets unless the user does (after the recipe's)."""
        return {}

    def validate(self, cfg: TrainConfig, given: frozenset[str] = frozenset()) -> None:
        """Refuse options this task cannot honour, or complete them (called before anything is written).

        ``given`` names the options the user set explicitly (empty for a ready-made config).
        """
        return None

    @abstractmethod
    def load_data(self, cfg: TrainConfig, env: Env) -> TaskData: ...

    @abstractmethod
    def build_model(self, cfg: TrainConfig, classes: Sequence[str]) -> nn.Module: ...

    def prepare(self, cfg: TrainConfig, env: Env, model: nn.Module) -> None:
        """Anything the loss needs besides the model (a distillation teacher), once the model is on its device."""
        return None

    def image_sides(self, data: TaskData) -> Sequence[int]:
        """Short sides (pixels) of some training images, from which a size not given is derived; none: keep it."""
        return []

    def set_eval_transform(self, data: TaskData, cfg: TrainConfig) -> None:
        """Install the evaluation transform, once the run's image size is known (after :meth:`load_data`)."""
        return None

    @abstractmethod
    def set_train_transform(self, data: TaskData, cfg: TrainConfig, size: int, strength: float) -> None:
        """Install the training augmentation for this phase (image size and augmentation strength)."""

    @abstractmethod
    def collate(self) -> Callable[[list[Any]], tuple[Tensor | None, Any, list[str]]]:
        """The loader's collate function (a picklable top-level function, for worker processes)."""

    @abstractmethod
    def loss(self, net: nn.Module, images: Tensor, targets: Any, cfg: TrainConfig) -> Tensor:
        """The training loss of one (micro-)batch; ``net`` may be wrapped in DDP or torch.compile."""

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: Any, env: Env) -> dict[str, float]:
        """``metric_names`` over the whole validation set (summed or gathered over the ranks)."""

    @abstractmethod
    def save(self, model: nn.Module, path: Path, **meta: Any) -> Path:
        """Write a checkpoint that :meth:`load` (and ``mobileone eval --task``) reads back."""

    @abstractmethod
    def load(self, path: Path) -> nn.Module: ...

    # A picture of the best model's predictions on a few validation images, drawn after the run, or None.
    draw_predictions: Callable[[nn.Module, Dataset, Path], None] | None = None
    metric_labels: dict[str, str] = {}  # how the per-epoch line names the metrics it shows (default: all, by name)

    def finish(self, run_dir: Path, best: nn.Module, data: TaskData, cfg: TrainConfig) -> None:
        """After the run, on rank 0: the picture of predictions (:attr:`draw_predictions`), if the task draws one."""
        if self.draw_predictions is not None:
            self.draw_predictions(best, data.val, run_dir / "predictions.png")

    def epoch_line(self, row: dict[str, Any]) -> str:
        """The metrics part of the per-epoch line: ``val <metric> <value>`` ..., then the EMA's main metric."""
        labels = self.metric_labels or {n: n for n in self.metric_names}
        parts = [f"{label} {row[n]:.2f}" for n, label in labels.items() if row.get(n) is not None]
        if row.get(f"ema_{self.metric}") is not None:
            parts.append(f"EMA {labels.get(self.metric, self.metric)} {row[f'ema_{self.metric}']:.2f}")
        return "val " + ("  ".join(parts) or "-")
