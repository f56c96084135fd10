"""The tasks that plug into the training engine, and the Python training API.

``mobileone.train(task="classify", **options)`` is what ``mobileone train`` runs: the same
options as the command line (``TrainConfig`` fields), the same run directory.
"""

from __future__ import annotations

from typing import Any

from ..engine import Task, TrainConfig, fit
from ..engine import resolve_config as _resolve
from ..engine.config import run_task
from .classify.task import ClassifyTask
from .detect.task import DetectTask
from .segment.task import SegmentTask

TASKS: dict[str, type[Task]] = {"classify": ClassifyTask, "detect": DetectTask, "segment": SegmentTask}


def get_task(name: str) -> Task:
    """A fresh task object by its ``--task`` name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    return TASKS[name]()


def resolve_config(recipe: str | None = None, **options: Any) -> TrainConfig:
    """The full config of a run: the recipe's and the task's defaults, then ``options`` (None means unset).

    With ``resume`` the task is the run's (a contradicting ``task`` is refused).
    """
    name = options.pop("task", None)
    if options.get("resume"):
        saved = run_task(options["resume"])
        if name and name != saved:
            raise ValueError(f"{options['resume']} is a {saved} run, not {name}; drop --task to continue it")
        name = saved
    return _resolve(get_task(name or "classify"), recipe, **options)


def train(config: TrainConfig | None = None, **options: Any) -> dict[str, Any]:
    """Train (or resume) a run and return its summary; ``options`` are ``TrainConfig`` fields.

    Example:
        >>> summary = mobileone.train(data="photos", variant="s0", epochs=10, out="runs/photos")
        >>> summary = mobileone.train(task="detect", data="boxes", img_size=320, out="runs/det")
    """
    if config is not None and options:
        raise TypeError("pass either a TrainConfig or keyword options, not both")
    cfg = config if config is not None else resolve_config(options.pop("recipe", None), **options)
    return fit(cfg, get_task(cfg.task))
