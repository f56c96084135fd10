"""The training engine every task plugs into (see ``task.Task``): config, schedules, run directory, loop."""

from .config import RECIPES, TrainConfig, resolve_config
from .task import DataError, Task, TaskData
from .trainer import TrainingError, fit

__all__ = ["RECIPES", "DataError", "Task", "TaskData", "TrainConfig", "TrainingError", "fit", "resolve_config"]
