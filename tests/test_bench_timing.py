"""Benchmark timing: a busy machine is reported, not quoted."""

import numpy as np
import pytest
import torch

from mobileone.bench import timing

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def test_a_busy_machine_is_reported_not_quoted(monkeypatch):
    calls = iter([0.010, 0.010, 0.030, 0.010, 0.010, 0.010])  # the second entry's rounds differ 3x
    monkeypatch.setattr(timing, "time_calls", lambda *a, **k: np.array([next(calls)]))
    model = torch.nn.Conv2d(3, 3, 1)
    ms, stable, spread = timing.compare_latency({"a": (model, "eager"), "b": (model, "eager")}, 16, 1, rounds=3)
    assert not stable and spread == pytest.approx(2.0) and ms == {"a": pytest.approx(10.0), "b": pytest.approx(10.0)}
    calls = iter([0.010, 0.011] * 3)
    ms, stable, _ = timing.compare_latency({"a": (model, "eager"), "b": (model, "eager")}, 16, 1, rounds=3)
    assert stable and ms["b"] == pytest.approx(11.0)
