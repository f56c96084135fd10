"""What a run prints: a progress bar on a terminal, progress lines elsewhere, and one line per epoch."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import TrainConfig
    from .distributed import Env
    from .task import Task


class Progress:
    """A tqdm bar on an interactive terminal; elsewhere (logs, CI) a line every ``log_every`` steps."""

    def __init__(self, cfg: TrainConfig, env: Env, steps: int, epoch: int) -> None:
        self.bar, self.every, self.t0, self.env = None, 0, time.perf_counter(), env
        self.steps, self.epoch = steps, epoch + 1
        if not (cfg.progress and env.main):
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        else:  # short epochs: the epoch line is enough
            self.every = cfg.log_every or (steps // 10 if steps >= 50 else 0)

    def update(self, done: int, seen: int, loss: torch.Tensor | None) -> None:
        if self.bar is None and not (self.every and done % self.every == 0):
            return
        speed = seen * self.env.world / max(1e-9, time.perf_counter() - self.t0)
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{speed:.0f}")
        elif loss is not None:
            print(
                f"  step {done}/{self.steps} of epoch {self.epoch}  loss {loss.item():.4f}  {speed:.0f} img/s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def epoch_line(task: Task, r: dict[str, Any], epochs: int) -> str:
    bad = f"  skipped images {r['bad_images']}" if r["bad_images"] else ""
    bad += f"  skipped steps {r['skipped_steps']}" if r.get("skipped_steps") else ""
    return (
        f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  {task.epoch_line(r)}  lr {r['lr']:.2e}  "
        f"wd {r['weight_decay']:.1e}  {r['images_per_second']:.0f} img/s  {r['img_size']} px  "
        f"{r['epoch_seconds']:.1f} s{bad}"
    )
