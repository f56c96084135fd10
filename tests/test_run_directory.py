"""The run directory: one run per folder, never over files that are not a run's, and a deployable best at any time."""

import json
from pathlib import Path

import pytest

from mobileone import create_model, save_checkpoint
from mobileone.cli import main

from .classification_data import TINY, cli_train, make_data, poison_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


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
