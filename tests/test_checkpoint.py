"""Checkpoints: Apple's files as is, timm and mmpretrain layouts, our safetensors, bad files."""

import json
import pickle
import re

import pytest
import torch

from mobileone import (
    CheckpointError,
    create_model,
    from_apple_layout,
    load_checkpoint,
    read_checkpoint,
    reparameterize_model,
    save_checkpoint,
    to_apple_layout,
)
from mobileone.core.checkpoint import infer_config

from .conftest import TINY, settle_bn


@pytest.fixture
def apple_files(tmp_path, tiny_model):
    """An unfused and a fused checkpoint saved the way Apple's are (plain state dicts, .pth.tar)."""
    unfused, fused = tmp_path / "tiny_unfused.pth.tar", tmp_path / "tiny.pth.tar"
    torch.save(tiny_model.state_dict(), unfused)
    torch.save(reparameterize_model(tiny_model).state_dict(), fused)
    return unfused, fused


def test_apple_files_load_with_plain_load_state_dict(apple_files, tiny_model):
    unfused, fused = apple_files
    model = create_model(TINY, num_classes=5)
    model.load_state_dict(torch.load(unfused))
    deploy = create_model(TINY, num_classes=5, inference_mode=True)
    deploy.load_state_dict(torch.load(fused))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), tiny_model(x), rtol=1e-4, atol=1e-4)


def test_load_checkpoint_infers_architecture(apple_files, tiny_model, caplog):
    unfused, fused = apple_files
    x = torch.randn(2, 3, 32, 32)
    with caplog.at_level("INFO", logger="mobileone"):
        a = load_checkpoint(unfused).eval()
    assert "apple layout" in caplog.text
    b = load_checkpoint(fused)
    assert a.config == TINY and not a.inference_mode and b.inference_mode and a.num_classes == 5
    with torch.no_grad():
        torch.testing.assert_close(a(x), tiny_model(x))
        torch.testing.assert_close(b(x), tiny_model(x), rtol=1e-4, atol=1e-4)


def test_infer_named_variant_from_shapes():
    for fused in (False, True):
        sd = create_model("s4", inference_mode=fused).state_dict()
        config, classes, is_fused = infer_config(sd)
        assert (config, classes, is_fused) == (create_model("s4").config, 1000, fused)
    assert read_checkpoint(create_model("s0", inference_mode=True).state_dict()).variant == "mobileone_s0"


def test_unfused_checkpoint_into_fused_model(apple_files, tiny_model):
    deploy = load_checkpoint(apple_files[0], create_model(TINY, num_classes=5, inference_mode=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), tiny_model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="cannot be un-fused"):
        load_checkpoint(apple_files[1], create_model(TINY, num_classes=5))


@pytest.mark.parametrize("layout", ["timm", "mmpretrain"])
@pytest.mark.parametrize("name", ["s0", "s4"])
@pytest.mark.parametrize("fused", [False, True])
def test_layouts_round_trip(layout, name, fused):
    sd = create_model(name, inference_mode=fused).state_dict()
    other = from_apple_layout(sd, layout)
    assert not any(re.match(r"stage\d\.|linear\.", k) or "rbr_" in k for k in other)
    back, found = to_apple_layout(other)
    assert found == layout
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


@pytest.mark.parametrize("fused", [False, True])
def test_timm_layout_matches_timm_model(fused):
    """Our timm names and shapes are exactly those of timm's own mobileone_s4 (SE included)."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model("mobileone_s4", pretrained=False)
    if fused:
        from timm.utils.model import reparameterize_model as timm_fuse

        ref = timm_fuse(ref)
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    ours = {
        k: v.shape for k, v in from_apple_layout(create_model("s4", inference_mode=fused).state_dict(), "timm").items()
    }
    assert ours == theirs


def test_timm_weights_give_timm_outputs():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = settle_bn(timm.create_model("mobileone_s0", pretrained=False, num_classes=10), (4, 3, 64, 64), 2)
    ours = load_checkpoint(ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_wrapped_and_prefixed_checkpoints(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    path = tmp_path / "wrapped.pth"
    mm = from_apple_layout(sd, "mmpretrain")
    torch.save({"state_dict": {f"module.{k}": v for k, v in mm.items()}, "meta": {"epoch": 3}}, path)
    assert read_checkpoint(path).layout == "mmpretrain"
    torch.save({"model": sd, "ema": {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}}, path)
    a, b = load_checkpoint(path), load_checkpoint(path, use_ema=True)
    torch.testing.assert_close(a.stage0.rbr_conv[0].conv.weight + 1, b.stage0.rbr_conv[0].conv.weight)
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_checkpoint(path, use_ema=True)


def test_save_writes_safetensors_and_config(tmp_path, tiny_model):
    tiny_model.class_names = list("abcde")
    path = save_checkpoint(tiny_model, tmp_path / "run" / "best", epoch=4)
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["epoch"] == 4 and meta["num_classes"] == 5 and meta["preprocess"]["crop_pct"] == 0.875
    loaded = load_checkpoint(path).eval()
    assert loaded.class_names == list("abcde") and loaded.config == TINY
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tiny_model(x))
    fused_path = save_checkpoint(reparameterize_model(tiny_model), tmp_path / "fused.safetensors")
    assert load_checkpoint(fused_path).inference_mode


def test_class_count_mismatch_needs_reset_head(apple_files):
    with pytest.raises(CheckpointError, match=r"5-class head but the model has 3 classes.*reset_head=True"):
        load_checkpoint(apple_files[0], create_model(TINY, num_classes=3))
    model = load_checkpoint(apple_files[0], create_model(TINY, num_classes=3), reset_head=True)
    assert model.linear.out_features == 3
    reference = torch.load(apple_files[0])
    torch.testing.assert_close(model.stage1[0].rbr_conv[0].conv.weight, reference["stage1.0.rbr_conv.0.conv.weight"])
    headless = load_checkpoint(apple_files[0], create_model(TINY, num_classes=0))
    assert headless.num_classes == 0


def test_wrong_variant_names_keys_and_shapes(apple_files):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(apple_files[0], create_model("s0", num_classes=5))
    msg = str(e.value)
    assert "mobileone_s0" in msg and "shape mismatch" in msg and "stage0.rbr_conv.0.conv.weight" in msg
    assert "(48, 3, 3, 3)" in msg and "(8, 3, 3, 3)" in msg


def test_bad_files(tmp_path, apple_files):
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(apple_files[0].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": print}, f)
    with pytest.raises(CheckpointError, match="other than tensors"):
        load_checkpoint(evil)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(bad_st)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CheckpointError, match="not a MobileOne"):
        load_checkpoint(other)


def test_nan_weights_warn(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    sd["stage1.0.rbr_conv.0.conv.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.warns(UserWarning, match=r"NaN or infinite.*stage1.0.rbr_conv.0.conv.weight"):
        load_checkpoint(path)
