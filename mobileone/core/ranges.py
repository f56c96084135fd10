"""Valid ranges of sizes, counts and tolerances, checked the same way everywhere with the range in the message.

A :class:`Range` checks a Python value (``check``, for the API and configs) and parses a command-line
string (``parse``, for argparse); 0 is a value like any other, never "not set".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """Integers or finite numbers between ``low`` and ``high`` (``None``: unbounded), ends open or closed."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    unit: str = ""

    def describe(self) -> str:
        """'an integer in 16..4096 (pixels)', 'a number in (0, 1]', 'an integer >= 1'."""
        kind = "an integer" if self.integer else "a number"
        unit = f" ({self.unit})" if self.unit else ""
        if self.low is None and self.high is None:
            return f"{kind}{unit}"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}{unit}"
        if self.low is None:
            return f"{kind} {'<' if self.high_open else '<='} {_num(self.high)}{unit}"
        if self.integer and not (self.low_open or self.high_open):
            return f"{kind} in {_num(self.low)}..{_num(self.high)}{unit}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}{unit}"

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, name: str, value: Any) -> Any:
        """``value`` when it is in the range, else a ValueError naming ``name``, the range and the value."""
        if not self.contains(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def parse(self, text: str) -> int | float:
        """A command-line string as a value of this range; ValueError with the range otherwise."""
        try:
            value: int | float = int(text) if self.integer else float(text)
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        if not self.contains(value):
            raise ValueError(f"must be {self.describe()}, got {text}")
        return value


def _num(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# The ranges every command shares.
IMG_SIZE = Range(16, 4096, integer=True, unit="pixels")
POSITIVE = Range(1, None, integer=True)  # epochs, batch sizes, steps, top-k, iterations
COUNT = Range(0, None, integer=True)  # warm-up runs, ... (0 allowed)
WORKERS = Range(0, 256, integer=True)
THREADS = Range(1, 1024, integer=True)
CLASSES = Range(1, 100_000, integer=True)
MAX_DETECTIONS = Range(1, 100_000, integer=True)
TOLERANCE = Range(0.0, None)  # atol / rtol of an export check
FRACTION = Range(0.0, 1.0, low_open=True)  # crop ratio and other (0, 1] fractions
SECONDS = Range(0.0, None, unit="seconds")
