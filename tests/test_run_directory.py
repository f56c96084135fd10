"""The run directory: one run per folder, never over files that are not a run's, and a deployable best at any time."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobileone import create_model, save_checkpoint
from mobileone.cli import main
from mobileone.engine.rundir import RunDir, RunDirError
from mobileone.tasks import resolve_config, train

from .classify_data import ROOT, TINY, cli_train, config, poison_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_a_new_run_never_replaces_checkpoints_that_are_not_a_run(tmp_path, task, capsys):
    out = tmp_path / "models"
    out.mkdir()
    foreign = save_checkpoint(create_model(TINY, num_classes=3), out / "best.safetensors", note="a week of training")
    before = foreign.read_bytes()
    assert main(["train", "--task", task, "--data", str(tmp_path / "anything"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds files that are not a run of mobileone (best.json, best.safetensors)" in err
    assert "Move them away, or choose another --out" in err and "Traceback" not in err
    assert foreign.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["best.json", "best.safetensors"]


def test_a_run_stopped_in_its_first_epoch_starts_over_and_unrelated_files_stay(tmp_path, data, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def interrupt(net):
        raise KeyboardInterrupt

    poison_loss(monkeypatch, 1, interrupt)
    assert main(cli_train(data, out)) == 130
    assert "nothing to resume" in capsys.readouterr().err and (out / "config.json").is_file()
    monkeypatch.undo()
    assert main(cli_train(data, out)) == 0  # the same command again, as the message says
    assert (out / "notes.txt").read_text() == "mine" and (out / "best_fused.safetensors").is_file()


def test_best_fused_is_written_with_best_so_an_interrupted_run_deploys(tmp_path, data, monkeypatch, capsys):
    def interrupt(net):
        raise KeyboardInterrupt

    poison_loss(monkeypatch, 8, interrupt)  # in epoch 3 of 3 steps each
    out = tmp_path / "run"
    assert main(cli_train(data, out, "--epochs", "4")) == 130
    monkeypatch.undo()
    best, fused = json.loads((out / "best.json").read_text()), json.loads((out / "best_fused.json").read_text())
    assert fused["epoch"] == best["epoch"] and fused["inference_mode"] and not best["inference_mode"]
    capsys.readouterr()
    # The README's commands on best_fused, after Ctrl-C:
    assert main(["eval", "--checkpoint", str(out / "best_fused.safetensors"), "--data", str(data)]) == 0
    assert main(["predict", "--checkpoint", str(out / "best_fused.safetensors"), str(data / "val" / "red")]) == 0
    onnx = tmp_path / "model.onnx"
    pytest.importorskip("onnxruntime")
    argv = ["export", "--checkpoint", str(out / "best_fused.safetensors"), "--format", "onnx", "--out", str(onnx)]
    assert main(argv) == 0 and onnx.is_file()


def test_a_best_fused_that_lags_behind_best_is_written_again_at_the_end(tmp_path, data, monkeypatch):
    import mobileone.engine.trainer as tr

    real, calls = tr._save_fused, []

    def lost_once(*args):  # as if a kill had come between best.safetensors and best_fused
        calls.append(1)
        return args[2] if len(calls) == 1 else real(*args)

    monkeypatch.setattr(tr, "_save_fused", lost_once)
    out = tmp_path / "run"
    assert main(cli_train(data, out, "--epochs", "1")) == 0
    assert len(calls) == 2 and json.loads((out / "best_fused.json").read_text())["epoch"] == 1


def test_two_runs_cannot_share_an_out_folder(tmp_path, data):
    out = tmp_path / "run"
    with RunDir(out):  # another run owns it (this process: alive)
        lock = json.loads((out / ".lock").read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        with pytest.raises(RunDirError, match=rf"in use by another run \(process {os.getpid()} on host"):
            train(config(out, data))
        assert not (out / "config.json").exists()
    assert not (out / ".lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=rf"locked by process {dead.pid}, which is no longer running"):
        train(config(out, data))
    assert (out / "best.safetensors").exists() and not (out / ".lock").exists()

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".lock").write_text(json.dumps({"pid": 1, "host": "gpu-node-7"}))
    with pytest.raises(RunDirError, match="on host gpu-node-7"):
        train(config(tmp_path / "other", data))


@pytest.mark.slow  # a training subprocess: about 5-15 s on 2 busy cores
def test_a_second_process_on_a_running_out_folder_stops(tmp_path, data, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-m", "mobileone", *cli_train(data, out, "--epochs", "200")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        assert main(cli_train(data, out, "--epochs", "2")) == 2
        assert f"in use by another run (process {first.pid} on host {socket.gethostname()}" in capsys.readouterr().err
        assert main(["train", "--resume", str(out), "--workers", "0"]) == 2  # nor can it be resumed meanwhile
        assert "in use by another run" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid  # a kill -9 leaves its lock ...
    with pytest.warns(UserWarning, match=f"locked by process {first.pid}, which is no longer running"), RunDir(out):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()  # ... which the next run takes over


def test_options_that_fail_validation_write_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="does not exist|no train/ folder"):
        train(resolve_config(data=str(tmp_path / "missing"), out=str(out), workers=0))
    assert not out.exists() or not any(Path(out).iterdir())
