"""The ``mobileone`` command: the argument layer (``commands.arguments``), one error handler, and dispatch.

Every subcommand's body is a function of the parsed arguments in ``mobileone.commands``: ``info`` and
``train`` have their own modules; ``eval``, ``predict``, ``export``, ``bench``, ``demo`` (and ``info`` of a
detector's or segmenter's checkpoint) live in the module of their task, which is ``--task`` or the one the
checkpoint or ONNX file was written for. Those modules need optional extras (torchvision, onnx, ...), so
they are imported when a command runs: ``mobileone info`` and ``--help`` need torch alone.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .commands.arguments import build_parser
from .core.checkpoint import CheckpointError
from .core.files import check_replaceable, is_json_result
from .deploy.common import ExportCheckError, ExportError
from .engine import TrainingError
from .engine.distributed import default_workers
from .engine.rundir import RunDirError

# Exit codes: 0 done, 1 a check failed or an input could not be read, 2 bad input (one line, no traceback),
# 3 training stopped (non-finite loss or model), 130 Ctrl-C, 143 SIGTERM.
USER_ERRORS = (CheckpointError, ValueError, OSError, RunDirError, ExportError, ImportError)


def _module(name: str) -> Any:
    """A command module: ``commands/<task>.py`` holds each task's bodies (one spelling: classify, detect, segment)."""
    return importlib.import_module(f"mobileone.commands.{name}")


def _task_command(command: str, module: str | None = None) -> Callable[[argparse.Namespace], int]:
    """The body of ``command`` in the module of the task the arguments (or the file they name) say
    (or in ``module``, which serves every task)."""

    def run(args: argparse.Namespace) -> int:
        if getattr(args, "task", None) is None or getattr(args, "checkpoint", None) or getattr(args, "onnx", None):
            _module("source").resolve_task(args)
        if getattr(args, "workers", 0) is None:  # every task's eval and predict: loader processes that fit the cores
            args.workers = default_workers()
        if getattr(args, "json", None) and isinstance(args.json, str):  # refused before a long evaluation
            check_replaceable(Path(args.json), is_json_result, "; choose another --json")
        return getattr(_module(module or args.task), command)(args)

    return run


def _info(args: argparse.Namespace) -> int:
    if args.checkpoint:
        args.task = None
        if _module("source").resolve_task(args) != "classify":
            return _module(args.task).info(args)
    return _module("info").info(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "info": _info,
    "train": lambda args: _module("train").train(args),
    "quantize": _task_command("quantize", "quantize"),
    "export": _task_command("export", "export"),
    "eval": _task_command("evaluate"),
    **{c: _task_command(c) for c in ("predict", "demo", "bench")},
}


def task_defaults() -> dict[str, dict[str, Any]]:
    """Each task's own defaults, for ``mobileone train --help`` (reading them needs the tasks' extras)."""
    from .tasks import TASKS

    out: dict[str, dict[str, Any]] = {}
    for name, cls in TASKS.items():
        task = cls()
        out[name] = task.defaults("short", "mobileone_s0", builtin=False)
        out[f"{name} on the built-in data"] = task.defaults("short", "mobileone_s0", builtin=True)
    return out


def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Warnings as one line, ``warning: <message>``, without the Python source line they come from."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    print(f"warning{kind}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser(task_defaults).parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (argparse printed the one-line message)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    previous, warnings.showwarning = warnings.showwarning, show_warning
    try:
        return COMMANDS[args.command](args)
    except ExportCheckError as e:
        print(f"mobileone {args.command}: check failed: {e}", file=sys.stderr)
        return 1
    except TrainingError as e:
        print(f"mobileone {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    except ImportError as e:  # an optional extra is missing: the message says which to install
        print(f"mobileone {args.command}: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"mobileone {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmobileone {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
