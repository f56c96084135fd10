"""What every task's commands do the same way: options into a config, predictions printed and written."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..core.files import write_json_result

C = TypeVar("C")


def config_from_args(cls: type[C], args: argparse.Namespace, **given: Any) -> C:
    """``cls`` (a dataclass) from the options of the same names in ``args``; ``given`` wins over them."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names} | given)


def report_predictions(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    saved: dict[str, Any] | None = None,
) -> int:
    """Print one line per image (``describe`` of its record, or its error), or the records as JSON with
    ``--json``; with ``saved``, also write ``predictions.json`` under ``--out``: the records and ``saved``.
    Exit code 1 if an image could not be read."""
    if saved is not None:
        write_json_result(Path(args.out or "predictions") / "predictions.json", {"images": results} | saved, "predict")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['image']}: {r['error'] if 'error' in r else describe(r)}")
    return 1 if any("error" in r for r in results) else 0
