"""The training engine's own mechanisms: batch sizing, kept validation batches, the time breakdown, workers."""

import json
import os
from unittest import mock

import pytest
import torch

from mobileone.engine.config import TrainConfig
from mobileone.engine.distributed import Env, default_workers
from mobileone.engine.distributed import KeptBatches as _KeptBatches
from mobileone.engine.trainer import _steps_per_epoch
from mobileone.tasks import resolve_config, train

from .test_train import TINY, make_data


def test_default_batch_is_lowered_for_small_data_and_left_out_images_are_said():
    env = Env(torch.device("cpu"))
    cfg = TrainConfig(batch_size=128, auto_batch=True)
    with pytest.warns(UserWarning, match="180 training images give fewer than 4 steps.*using batch 45"):
        assert _steps_per_epoch(cfg, 180, env) == 4 and cfg.batch_size == 45
    mine = TrainConfig(batch_size=128)  # set by the user: kept, and the dropped remainder is said
    with pytest.warns(UserWarning, match="each epoch trains on 128 of 180 images"):
        assert _steps_per_epoch(mine, 180, env) == 1 and mine.batch_size == 128
    two_ranks = TrainConfig(batch_size=64, accum_steps=2, auto_batch=True)
    with pytest.warns(UserWarning, match="using batch"):
        _steps_per_epoch(two_ranks, 50, Env(torch.device("cpu"), world=2))
    assert two_ranks.batch_size % 4 == 0
    assert resolve_config(batch_size=16).auto_batch is False and resolve_config().auto_batch is True


def test_validation_batches_are_kept_when_they_fit():
    batches = [(torch.ones(2, 3, 4, 4) * i, torch.tensor([i, i]), []) for i in range(3)]
    calls = mock.MagicMock(side_effect=lambda: iter(batches))
    loader = mock.MagicMock(__iter__=lambda self: calls())
    kept = _KeptBatches(loader)
    first, second = list(kept), list(kept)
    assert calls.call_count == 1 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    streamed = _KeptBatches(loader, budget=2 * 3 * 4 * 4 * 4)  # room for one batch only: stream every time
    list(streamed), list(streamed)
    assert calls.call_count == 3 and streamed.kept is None


def test_metrics_break_the_epoch_down(tmp_path):
    data = make_data(tmp_path / "data", n_train=8, n_val=4)
    train(
        resolve_config(
            data=str(data),
            arch=TINY,
            out=str(tmp_path / "run"),
            epochs=1,
            batch_size=8,
            img_size=16,
            workers=0,
            progress=False,
        )
    )
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    parts = [row[f"{p}_seconds"] for p in ("data", "step", "ema", "eval", "save")]
    assert all(p >= 0 for p in parts) and row["step_seconds"] > 0
    assert sum(parts) <= row["epoch_seconds"] * 1.01


def test_default_workers_fit_the_machine():
    with mock.patch.object(os, "sched_getaffinity", return_value=set(range(2)), create=True):
        assert default_workers() == 1  # 2 cores: one loader process beside the training process
    with mock.patch.object(os, "sched_getaffinity", return_value=set(range(64)), create=True):
        assert default_workers() == 4
        with mock.patch.dict(os.environ, {"LOCAL_WORLD_SIZE": "8"}):
            assert default_workers(8) == 4 and default_workers() == 4
    with mock.patch.object(os, "sched_getaffinity", return_value={0}, create=True):
        assert default_workers() == 0
