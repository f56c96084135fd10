"""The bodies of ``mobileone`` subcommands, one module per task (``classification``, ``detection``,
``segmentation``: a function per subcommand taking the parsed arguments and returning the exit code), plus
``train``, ``info``, the argument layer (``arguments``) and the task of a file (``source``)."""

from __future__ import annotations

from typing import Any

from ..core.files import write_json_result


def write_json(path: str | None, result: dict[str, Any], command: str = "eval") -> None:
    """``--json OUT``: the result as JSON, its folder created; never over a file that is not such a result."""
    if path:
        write_json_result(path, result, command)
