"""The run directory: one owner at a time, every file written whole, a training state that survives kills.

Layout: ``config.json``, ``metrics.jsonl``, ``train_state.pt`` (and the previous epoch's
``train_state.prev.pt``), the task's checkpoints, ``curves.png``, ``summary.json``, and
``.lock`` while a run owns the folder.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write, remove_stale_temporaries, writable_folder


class RunDirError(RuntimeError):
    """The run directory cannot be used: another run owns it, it is not writable, or its state is unreadable."""


class OccupiedError(RunDirError, ValueError):
    """A new run's folder holds a run to resume, or files that are not a run's: nothing is written there."""


# Files a run writes (besides its checkpoints): a new run never starts over such files unless they are its own.
RUN_FILES = (
    *("config.json", "metrics.jsonl", "summary.json", "curves.png", "predictions.png"),
    *("train_state.pt", "train_state.prev.pt", "last.json", "best.json", "best_fused.json"),
)
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".tar", ".ckpt", ".bin", ".onnx")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunDir:
    """A run's folder, locked for the lifetime of the object's ``with`` block (rank 0 only)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lock_path = self.path / ".lock"
        self._locked = False

    def __enter__(self) -> RunDir:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the folder and take its lock; a lock left by a dead process on this host is taken over.

        Temporary files an interrupted write left behind are deleted once the lock is held.
        """
        try:
            writable_folder(self.path, "; choose another --out")
        except OSError as e:
            raise RunDirError(f"cannot use the run directory: {e}") from e
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                dead = self.check_free()  # raises while the owner lives
                if self._owner() == dead:  # not taken over by another process in the meantime
                    warnings.warn(
                        f"{self.path} was locked by process {dead.get('pid')}, which is no longer running; "
                        "taking the run directory over",
                        stacklevel=3,
                    )
                    self.lock_path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise RunDirError(f"cannot lock the run directory {self.path}: {e}; choose another --out") from e
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            stale = remove_stale_temporaries(self.path)
            if stale:
                warnings.warn(
                    f"removed {len(stale)} temporary file(s) an interrupted run left in {self.path}: "
                    f"{', '.join(p.name for p in stale[:3])}",
                    stacklevel=3,
                )
            return
        raise RunDirError(f"could not lock {self.path}: another process keeps taking it")

    def check_free(self) -> dict[str, Any] | None:
        """Raise :class:`RunDirError` if a live process (or one on another host) holds the lock.

        Returns the lock's content when its owner is dead (a stale lock), None without a lock.
        """
        owner = self._owner()
        if owner is None:
            return None
        pid, host = owner.get("pid"), owner.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            return owner
        raise RunDirError(
            f"{self.path} is in use by another run (process {pid or '?'} on host {host or '?'}, since "
            f"{owner.get('since', '?')}); wait for it to finish or choose another --out. If that run is gone, "
            f"delete {self.lock_path}"
        )

    def check_new(self) -> None:
        """Refuse to start a new run over files that would be replaced: a run to resume, or files that are not ours.

        A folder with only the ``config.json`` of a run stopped in its first epoch is started over; a
        folder whose checkpoints no run config of ours accompanies (copied models, another tool's
        files) is never written into.
        """
        if self.has_state() or (self.path / "metrics.jsonl").exists():
            raise OccupiedError(
                f"{self.path} already holds a run; continue it with --resume {self.path}, or choose another --out"
            )
        if not self.path.is_dir() or self._is_run_config(self.path / "config.json"):
            return
        names = sorted(
            p.name
            for p in self.path.iterdir()
            if p.name in RUN_FILES or (p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
        )
        if names:
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            raise OccupiedError(
                f"{self.path} holds files that are not a run of mobileone ({shown}); a run there would "
                "replace them. Move them away, or choose another --out"
            )

    @staticmethod
    def _is_run_config(path: Path) -> bool:
        try:
            value = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(value, dict) and {"task", "epochs", "batch_size", "out"} <= set(value)

    def _owner(self) -> dict[str, Any] | None:
        """The lock's content; None when there is no lock, {} when it cannot be read (being written)."""
        try:
            owner = json.loads(self.lock_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def release(self) -> None:
        if self._locked:
            self.lock_path.unlink(missing_ok=True)
            self._locked = False

    # ---- files

    def write_json(self, name: str, value: Any) -> None:
        atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2)))

    def write_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Rewritten whole, so a resume never duplicates rows."""
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(text))

    @property
    def state_path(self) -> Path:
        return self.path / "train_state.pt"

    @property
    def previous_state_path(self) -> Path:
        return self.path / "train_state.prev.pt"

    def save_state(self, state: dict[str, Any]) -> None:
        """The training state after an epoch; the previous epoch's is kept as a fallback.

        Only once the new state is written whole does the current one become the previous one.
        """
        atomic_write(self.state_path, lambda tmp: torch.save(state, tmp), previous=self.previous_state_path)

    def has_state(self) -> bool:
        return self.state_path.exists() or self.previous_state_path.exists()

    def load_state(self, device: torch.device) -> dict[str, Any]:
        """The newest readable training state; falls back to the previous epoch's, saying why."""
        errors = []
        for path in (self.state_path, self.previous_state_path):
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location=device, weights_only=True)
                if not isinstance(state, dict) or "model" not in state:
                    raise ValueError("not a training state")
            except Exception as e:  # truncated, corrupt, or not ours: try the previous one
                errors.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                continue
            if errors:
                warnings.warn(
                    f"could not read {errors[0]}; resuming from {path.name} (epoch {state.get('epoch')})", stacklevel=2
                )
            return state
        raise RunDirError(
            f"cannot resume {self.path}: no readable training state ({'; '.join(errors) or 'train_state.pt missing'}); "
            "start a new run with another --out"
        )


def plot_curves(history: list[dict[str, Any]], path: Path, metrics: tuple[str, ...]) -> None:
    """Loss, validation metrics (and their EMA), LR and weight decay against epochs, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    axes[0].plot(ep, [r["train_loss"] for r in history], label="train loss")
    validated = [r for r in history if r.get(metrics[0]) is not None]  # --eval-every: not every epoch
    val_ep = [r["epoch"] for r in validated]
    for name in metrics:
        axes[1].plot(val_ep, [r[name] for r in validated], ".-", label=f"val {name}")
        if validated and validated[0].get(f"ema_{name}") is not None:
            axes[1].plot(val_ep, [r[f"ema_{name}"] for r in validated], ".--", label=f"EMA {name}")
    axes[2].plot(ep, [r["lr"] for r in history], label="learning rate")
    axes[3].plot(ep, [r["weight_decay"] for r in history], label="weight decay")
    for ax, title in zip(axes, ("loss", "validation", "learning rate", "weight decay"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
