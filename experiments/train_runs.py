"""One ``mobileone train`` in its own process, as the seed and dense-scene experiments run each of theirs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def train_subprocess(
    task: str, out: Path, options: dict[str, Any], extra: list[str] | None = None
) -> tuple[list[str], dict[str, Any], float]:
    """``mobileone train --task TASK --out OUT`` with every option that is not None, ``--no-progress`` and
    ``extra``; returns the command, the run's ``summary.json`` and the wall time. A failed run raises with the
    end of its stderr."""
    cmd = [sys.executable, "-m", "mobileone", "train", "--task", task, "--out", str(out)]
    for flag, value in options.items():
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--no-progress", *(extra or [])]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return cmd, json.loads((out / "summary.json").read_text()), time.perf_counter() - t0
