"""The task-specific bodies of ``mobileone`` subcommands (``demo``, and for detect / segment also
``eval``, ``export``, ``bench``): one module per task, each a function of the parsed arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """``--json OUT`` of ``eval``: the result as JSON, its folder created (nothing when ``path`` is None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
