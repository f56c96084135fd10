"""The training engine every task plugs into (see ``task.Task``): config, schedules, run directory, loop."""

from .config import RECIPES, TrainConfig, resolve_config
from .task import DataError, NonFiniteOutputError, Task, TaskData, require_finite
from .trainer import TrainingError, fit

__all__ = [
    "RECIPES",
    "DataError",
    "NonFiniteOutputError",
    "Task",
    "TaskData",
    "TrainConfig",
    "TrainingError",
    "fit",
    "require_finite",
    "resolve_config",
]
