"""The training engine's own mechanisms: batch sizing, kept validation batches, the time breakdown, workers."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from mobileone.engine.config import TrainConfig
from mobileone.engine.distributed import Env, cpu_plan, default_workers
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


def test_workers_and_threads_never_oversubscribe_the_cores():
    for cores in (1, 2, 3, 4, 8, 16, 64):
        with mock.patch.object(os, "sched_getaffinity", return_value=set(range(cores)), create=True):
            for gpu in (False, True):
                w, t = cpu_plan(None, None, gpu=gpu)
                assert t >= 1 and w >= 0 and w + t <= cores
                w, t = cpu_plan(None, 1, gpu=gpu)  # what the user sets is kept, the other fits beside it
                assert t == 1 and w + t <= max(cores, 1)
                assert cpu_plan(1, None, gpu=gpu) == (1, max(1, cores - 1))
    with mock.patch.object(os, "sched_getaffinity", return_value=set(range(2)), create=True):
        assert cpu_plan(None, None) == (0, 2)  # a CPU run on 2 cores: the threads compute, the main process loads
        assert cpu_plan(None, None, gpu=True) == (1, 1) and default_workers(gpu=True) == 1
    with mock.patch.object(os, "sched_getaffinity", return_value=set(range(64)), create=True):
        assert cpu_plan(None, None) == (4, 60) and cpu_plan(None, None, gpu=True) == (4, 60)
        with mock.patch.dict(os.environ, {"LOCAL_WORLD_SIZE": "8"}):
            assert cpu_plan(None, None, 8) == (2, 6) and cpu_plan(None, None, 8, gpu=True) == (4, 4)
    with mock.patch.object(os, "sched_getaffinity", return_value={0}, create=True):
        assert cpu_plan(None, None) == (0, 1) and default_workers() == 0


def test_threads_follow_the_cores_other_processes_leave():
    """Two threads while the cores are free; one while another process takes about a core (also when our
    spinning threads leave it only two thirds of one); two again when it stops; short work does not count."""
    from mobileone.engine.threads import ThreadFitter

    clock, busy, own = [0.0], [0.0], [0.0]

    def run(seconds: float, ours: float, others: float) -> int:  # cores used over ``seconds``
        clock[0] += seconds
        busy[0] += (ours + others) * seconds
        own[0] += ours * seconds
        return fitter.poll()

    threads = torch.get_num_threads()
    try:
        fitter = ThreadFitter(2, {0, 1}, read=lambda: (busy[0], own[0]), clock=lambda: clock[0])
        assert run(0.6, 2.0, 0.1) == 2 and torch.get_num_threads() == threads  # system noise: nothing to do
        assert run(0.6, 1.33, 0.67) == 1 and torch.get_num_threads() == 1  # a busy loop beside 2 spinning threads
        assert run(0.2, 1.0, 1.0) == 1  # under ``every`` seconds: not read again
        assert run(0.6, 1.0, 1.0) == 1
        assert run(0.6, 1.0, 0.0) == 2 and torch.get_num_threads() == 2  # it ended
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc")
def test_threads_fitter_sees_a_real_busy_process():
    """On this machine's /proc: a busy loop pinned to one of two cores takes this run to one thread, and its end
    gives the second back; the fitter is off where the user fixed the threads or several ranks share the cores."""
    from mobileone.engine.threads import ThreadFitter, busy_seconds, own_seconds

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two cores")
    assert ThreadFitter.for_run(2, fixed=True, world=1) is None
    assert ThreadFitter.for_run(2, fixed=False, world=2) is None
    assert ThreadFitter.for_run(2, fixed=False, world=1, device="cuda") is None
    assert busy_seconds(set(cpus)) > 0 and own_seconds() > 0
    threads = torch.get_num_threads()
    quiet = ThreadFitter(2, set(cpus[:2]), every=0.3)
    time.sleep(0.4)
    quiet.poll()
    if quiet.others > 0.4:
        pytest.skip(f"other processes already take {quiet.others:.1f} of these cores")
    # another process, not our child (a child's time counts as ours, as a data worker's does): started through sh
    code = f"import os; os.sched_setaffinity(0, {{{cpus[0]}}})\nwhile True: pass"
    shell = subprocess.run(["sh", "-c", '"$0" -c "$1" >/dev/null 2>&1 & echo $!', sys.executable, code], stdout=-1)
    loop = int(shell.stdout)
    try:
        fitter = ThreadFitter(2, set(cpus[:2]), every=0.3)
        for _ in range(20):
            time.sleep(0.1)
            fitter.poll()
        assert fitter.threads == 1, f"others {fitter.others:.2f} cores"
        os.kill(loop, signal.SIGKILL)
        for _ in range(10):
            time.sleep(0.1)
            fitter.poll()
        assert fitter.threads == 2, f"others {fitter.others:.2f} cores"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(loop, signal.SIGKILL)
        torch.set_num_threads(threads)


def test_eval_every_validates_some_epochs_and_the_last_and_resumes(tmp_path, monkeypatch):
    """--eval-every 2 over 3 epochs validates epochs 2 and 3; best.* comes from those; a run stopped after
    the unvalidated epoch 1 resumes to the same weights and rows; detection's default caps validations."""
    from safetensors.torch import load_file

    from mobileone.engine.trainer import validates
    from mobileone.tasks.classify.task import ClassifyTask
    from mobileone.tasks.detect.task import DetectTask

    data = make_data(tmp_path / "data", n_train=8, n_val=4)

    def options(out):
        kw = dict(arch=TINY, epochs=3, batch_size=4, img_size=16, workers=0, progress=False, eval_every=2)
        return resolve_config(data=str(data), out=str(out), deterministic=True, **kw)

    summary = train(options(tmp_path / "full"))
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("val_top1") is not None for r in rows] == [False, True, True]
    assert "eval_seconds" not in rows[0] and summary["best"]["epoch"] in (2, 3)
    assert (tmp_path / "full" / "curves.png").is_file()

    def stop_after_first_epoch(self, row):
        raise KeyboardInterrupt

    monkeypatch.setattr(ClassifyTask, "epoch_line", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path / "resumed"))
    monkeypatch.undo()
    train(resolve_config(resume=str(tmp_path / "resumed"), workers=0))
    a, b = (load_file(tmp_path / run / "last.safetensors") for run in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("val_top1") for r in again] == [r.get("val_top1") for r in rows]

    detect, classify = DetectTask(), ClassifyTask()
    at = lambda task, epochs, every=None: [  # noqa: E731
        e + 1 for e in range(epochs) if validates(TrainConfig(epochs=epochs, eval_every=every), task, e)
    ]
    assert at(detect, 40) == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert at(detect, 12) == [2, 4, 6, 8, 10, 12] and at(detect, 5) == [1, 2, 3, 4, 5]
    assert at(classify, 3) == [1, 2, 3] and at(detect, 5, 3) == [3, 5]
    assert detect.epoch_line({"epoch": 1}) == "val -"
