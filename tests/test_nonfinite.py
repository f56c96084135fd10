"""NaN and infinite values: a run stops on them naming the last good checkpoint; they are never scored."""

import pytest
import torch

from mobileone import save_checkpoint
from mobileone.cli import main
from mobileone.engine import NonFiniteOutputError, TrainingError
from mobileone.tasks import train
from mobileone.tasks.classify.evaluate import evaluate_checkpoint

from .classify_data import config, finite, poison_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def test_a_nan_stop_keeps_only_finite_checkpoints(tmp_path, data, monkeypatch):
    def nan_statistics(net):  # the loss stays finite: train-mode BatchNorm uses the batch's statistics
        next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("nan"))

    poison_loss(monkeypatch, 4, nan_statistics)  # the first step of epoch 2
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"NaN or infinite values after epoch 2") as e:
        train(config(run, data, epochs=3))
    assert f"The last good checkpoint is {run / 'last.safetensors'} (epoch 1)" in str(e.value)
    assert finite(run / "last.safetensors") and finite(run / "best.safetensors")
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == 1

    poison_loss(monkeypatch, 1, nan_statistics)
    with pytest.raises(TrainingError, match="No checkpoint was written"):
        train(config(tmp_path / "first", data, epochs=2))
    assert not (tmp_path / "first" / "last.safetensors").exists()


@pytest.mark.filterwarnings("ignore:checkpoint has NaN")
def test_evaluation_refuses_nan_outputs(tmp_path, data, tiny, capsys):
    tiny.class_names = ["blue", "green", "red"]
    tiny.preprocess.update(input_size=16)
    with torch.no_grad():
        tiny.linear.bias[1] = float("nan")
    path = save_checkpoint(tiny, tmp_path / "broken.safetensors")
    with pytest.raises(NonFiniteOutputError, match=rf"checkpoint {path} gives NaN or infinite outputs"):
        evaluate_checkpoint(data, path, workers=0)
    assert main(["eval", "--data", str(data), "--checkpoint", str(path), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not scored" in err and "top-1" not in err
