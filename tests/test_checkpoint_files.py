"""Checkpoint files: metadata checked against the tensors, suffixes honoured, what is not a checkpoint named."""

import json
import warnings

import pytest
import torch
from PIL import Image

import mobileone
from mobileone import CheckpointError, create_model, load_checkpoint, read_checkpoint, save_checkpoint
from mobileone.core.checkpoint import write_weights

from .classify_data import TINY, apple_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


@pytest.mark.parametrize(
    "sidecar, complaint",
    [
        ([1, 2, 3], "holds a JSON list, not an object"),
        ("{not json", "is not readable JSON"),
        (
            {"config": {**TINY, "wings": 2}, "num_classes": 3, "inference_mode": False},
            r"unknown config key\(s\) \['wings'\]",
        ),
        (
            {"config": create_model("s0").config.to_dict(), "num_classes": 1000, "inference_mode": False},
            "describes another model than the file's tensors",
        ),
        (
            {"config": {**TINY, "blocks": [1, 1, 1, 1]}, "num_classes": 3, "inference_mode": True},
            "describes another model",
        ),
        ({"config": {**TINY, "k": -1}, "num_classes": 3, "inference_mode": False}, "has an invalid config"),
    ],
)
def test_unusable_metadata_falls_back_to_the_tensors(tmp_path, tiny, sidecar, complaint):
    path = apple_file(tmp_path, tiny)
    json_path = tmp_path / "model.json"
    json_path.write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    with pytest.warns(UserWarning, match=complaint) as record:
        model = load_checkpoint(path)
    message = next(str(w.message) for w in record if "metadata" in str(w.message))
    assert str(json_path) in message and "read off the tensors" in message
    assert model.config == tiny.config and model.class_names is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tiny(x))


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"class_names": ["cat", "dog"]}, r"class_names \(2 names\) do not fit the 3-class head"),
        ({"variant": "mobileone_s1"}, "variant 'mobileone_s1' does not match"),
        ({"preprocess": {"mean": [0.5, 0.5], "std": [1, 1, 1]}}, r"preprocess block ignored \(mean"),
        ({"preprocess": {"input_size": "big"}}, "input_size 'big' is not an integer"),
        ({"preprocess": {"std": [0.2, 0.0, 0.2]}}, r"std .* has a value <= 0"),
    ],
)
def test_metadata_parts_that_do_not_fit_are_dropped(tmp_path, tiny, change, complaint):
    tiny.class_names = ["x", "y", "z"]
    path = save_checkpoint(tiny, tmp_path / "model.safetensors")
    info = json.loads(path.with_suffix(".json").read_text()) | change
    write_weights(path, tiny.state_dict(), info)  # embedded in the file: checked all the same
    with pytest.warns(UserWarning, match=complaint) as record:
        ckpt = read_checkpoint(path)
        model = load_checkpoint(path)
    assert any(str(w.message).startswith(f"the metadata embedded in {path}: ") for w in record)
    assert ckpt.config == tiny.config and ckpt.variant is None
    if "preprocess" in change:
        assert model.preprocess["mean"] == (0.485, 0.456, 0.406) and model.preprocess["input_size"] == 224
    if "class_names" in change:
        assert ckpt.meta["class_names"] is None
    else:
        assert ckpt.meta["class_names"] == ["x", "y", "z"]


def test_embedded_metadata_wins_over_a_foreign_json(tmp_path, tiny):
    tiny.class_names = ["x", "y", "z"]
    path = save_checkpoint(tiny, tmp_path / "model.safetensors", epoch=7)
    other = create_model({**TINY, "widths": [8, 16, 16, 24]}, num_classes=10)
    save_checkpoint(other, tmp_path / "other.safetensors")
    (tmp_path / "other.json").replace(tmp_path / "model.json")  # another model's JSON beside this file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = read_checkpoint(path)
    assert ckpt.config == tiny.config and ckpt.meta["epoch"] == 7 and ckpt.meta["class_names"] == ["x", "y", "z"]
    write_weights(path, tiny.state_dict(), {**json.loads((tmp_path / "model.json").read_text())})
    with pytest.warns(UserWarning, match=rf"embedded in {path} describes another model.*read off the tensors"):
        assert read_checkpoint(path).config == tiny.config


def test_a_self_referencing_checkpoint_is_refused(tmp_path):
    loop: dict = {}
    loop["state_dict"] = loop
    torch.save(loop, tmp_path / "loop.pth")
    for source in (tmp_path / "loop.pth", loop):
        with pytest.raises(CheckpointError, match="a dict that contains itself"):
            read_checkpoint(source)


def test_save_checkpoint_honours_the_suffix(tmp_path, tiny):
    for name in ("model.pth", "model.pt", "apple.pth.tar"):
        path = save_checkpoint(tiny, tmp_path / name, epoch=3)
        assert path == tmp_path / name and path.is_file()
        obj = torch.load(path, weights_only=True)
        assert set(obj) == {"state_dict", "mobileone"} and obj["mobileone"]["epoch"] == 3
        assert load_checkpoint(path).config == tiny.config
    assert not list(tmp_path.glob("*.safetensors"))
    assert save_checkpoint(tiny, tmp_path / "plain") == tmp_path / "plain.safetensors"
    with pytest.raises(ValueError, match=r"cannot tell the format of model\.weights"):
        save_checkpoint(tiny, tmp_path / "model.weights")


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
