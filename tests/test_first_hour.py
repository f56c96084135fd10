"""What a new user meets in the first hour: clear refusals, honest timing, quiet and readable output."""

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import mobileone
from mobileone import CheckpointError, create_model, load_checkpoint
from mobileone.bench import timing
from mobileone.tasks import resolve_config, train

from .test_train import TINY, make_data


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path):
    (tmp_path / "model.json").write_text('{"variant": "mobileone_s0"}')
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    (tmp_path / "photo.pth").write_bytes((tmp_path / "photo.png").read_bytes())
    with pytest.raises(CheckpointError, match="model.json is a JSON file .*not a checkpoint"):
        load_checkpoint(tmp_path / "model.json")
    with pytest.raises(CheckpointError, match="photo.pth is a PNG image, not a checkpoint"):
        load_checkpoint(tmp_path / "photo.pth")


def test_create_model_pretrained_and_timm_keywords(tmp_path):
    with pytest.raises(ValueError, match="no pretrained weights ship"):
        create_model("s0", pretrained=True)
    with pytest.raises(TypeError, match="drop_path_rate.*no residual paths"):
        create_model("s0", drop_path_rate=0.1)
    path = mobileone.save_checkpoint(create_model("mu0", num_classes=3), tmp_path / "mu0.safetensors")
    model = create_model("mu0", num_classes=3, pretrained=path, drop_rate=0.2)
    assert model.drop_rate == 0.2 and torch.equal(model.linear.weight, load_checkpoint(path).linear.weight)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))  # dropout only in train mode


def test_onnx_metadata_values_are_all_json(tmp_path):
    pytest.importorskip("onnxruntime")
    from mobileone.deploy.onnx import read_onnx_metadata

    model = create_model(TINY, num_classes=3, inference_mode=True)
    mobileone.export_model(model, tmp_path / "m.onnx", img_size=32, check=False)
    import onnx

    raw = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert {"architecture", "variant", "input_layout", "mean"} <= set(raw)
    assert {k: json.loads(v) for k, v in raw.items()} == read_onnx_metadata(tmp_path / "m.onnx")


def test_a_busy_machine_is_reported_not_quoted(monkeypatch):
    calls = iter([0.010, 0.010, 0.030, 0.010, 0.010, 0.010])  # the second entry's rounds differ 3x
    monkeypatch.setattr(timing, "time_calls", lambda *a, **k: np.array([next(calls)]))
    model = torch.nn.Conv2d(3, 3, 1)
    ms, stable, spread = timing.compare_latency({"a": (model, "eager"), "b": (model, "eager")}, 16, 1, rounds=3)
    assert not stable and spread == pytest.approx(2.0) and ms == {"a": pytest.approx(10.0), "b": pytest.approx(10.0)}
    calls = iter([0.010, 0.011] * 3)
    ms, stable, _ = timing.compare_latency({"a": (model, "eager"), "b": (model, "eager")}, 16, 1, rounds=3)
    assert stable and ms["b"] == pytest.approx(11.0)


def test_without_a_terminal_long_epochs_print_progress_lines(tmp_path, capsys):
    data = make_data(tmp_path / "data", n_train=8, n_val=2)
    with mock.patch("sys.stderr.isatty", return_value=False):
        train(
            resolve_config(
                data=str(data),
                arch=TINY,
                out=str(tmp_path / "run"),
                epochs=1,
                batch_size=4,
                img_size=16,
                workers=0,
                log_every=2,
            )
        )
    out = capsys.readouterr().out
    assert "step 2/6 of epoch 1" in out and "step 6/6 of epoch 1" in out and "step 3/6" not in out


def test_failed_validation_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="does not exist|no train/ folder"):
        train(resolve_config(data=str(tmp_path / "missing"), out=str(out), workers=0))
    assert not out.exists() or not any(Path(out).iterdir())
