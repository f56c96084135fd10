"""``mobileone train``: one run of any task, stopped cleanly by Ctrl-C, SIGTERM or a full disk."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator

import mobileone.tasks as tasks

from ..core.files import DiskFullError
from ..engine.rundir import RunDir
from .arguments import train_options


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's time limit, ``timeout``, ``kill``): stopped as Ctrl-C stops a run."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in this (main) thread, so the run unwinds: lock released, message."""

    def stop(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(args: argparse.Namespace) -> int:
    cfg = tasks.resolve_config(hold_weight_decay=args.no_wd_anneal, **train_options(args))
    try:
        with sigterm_as_interrupt():
            tasks.train(cfg)
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\nmobileone train: {how}. {_what_is_kept(cfg.out)}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except DiskFullError as e:
        print(
            f"mobileone train: error: {e}. Free some space, then continue with: mobileone train --resume {cfg.out}",
            file=sys.stderr,
        )
        return 2
    return 0


def _what_is_kept(out: str) -> str:
    run = RunDir(out)
    if not run.has_state():
        return "The first epoch was not complete; nothing to resume. Start again with the same command"
    fused = run.path / "best_fused.safetensors"
    best = f"; its best model so far is {fused}" if fused.exists() else ""
    return f"{out} keeps its last completed epoch{best}. Continue with:\n  mobileone train --resume {out}"
