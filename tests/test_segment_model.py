"""Segmenters: output strides and dilation, backbone checkpoints, fusion, names, checkpoints, the mIoU itself."""

import math

import pytest
import torch
from torch import nn

import mobileone
from mobileone import CheckpointError, MobileOneConfig, create_model, reparameterize_model, save_checkpoint
from mobileone.tasks.segment.builders import deeplabv3_s0, lraspp_mnv3
from mobileone.tasks.segment.metrics import confusion_matrix, segmentation_scores
from mobileone.tasks.segment.model import (
    ATROUS_RATES,
    Segmenter,
    create_segmenter,
    load_segmenter,
    save_segmenter,
)

from .conftest import settle_bn

TINY = MobileOneConfig(widths=(8, 16, 16, 16), stem_width=8, blocks=(1, 1, 1, 1), k=2)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def tiny(head: str = "deeplabv3", **kw) -> Segmenter:
    return create_segmenter(head, arch=TINY, num_classes=kw.pop("num_classes", 4), head_channels=8, **kw)


def layer_dilations(model: Segmenter, stage: int) -> set[int]:
    """Dilations of the 3x3 layers of a stage and of every train-time conv branch in them."""
    layers = [m for m in getattr(model.backbone, f"stage{stage}") if m.kernel_size == 3]
    return {m.dilation for m in layers} | {b.conv.dilation[0] for m in layers for b in m.rbr_conv}


def test_output_stride_gives_the_documented_feature_sizes_and_atrous_rates():
    x = torch.randn(1, 3, 64, 96)
    for os_ in (16, 8):
        model = deeplabv3_s0(num_classes=21, output_stride=os_).eval()
        low, high = model.features(x)
        # S0: stage 3 (256 ch) feeds the aux head, stage 4 (1024 ch) the ASPP; both at 1/os of the input.
        assert high.shape == (1, 1024, 64 // os_, 96 // os_) and low.shape == (1, 256, 64 // os_, 96 // os_)
        aspp = model.classifier[0]
        assert [branch[0].dilation[0] for branch in list(aspp.convs)[1:4]] == list(ATROUS_RATES[os_])
        assert model(x)["out"].shape == (1, 21, 64, 96)
    assert ATROUS_RATES == {16: (6, 12, 18), 8: (12, 24, 36)}
    lr = create_segmenter("lraspp_s0", num_classes=5, output_stride=16).eval()
    low, high = lr.features(x)  # LR-ASPP reads stage 2 (stride 8) and stage 4
    assert low.shape == (1, 128, 8, 12) and high.shape == (1, 1024, 4, 6)


def test_dilation_reaches_the_last_stages_and_the_same_backbone_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    classifier = settle_bn(create_model(TINY, num_classes=7))
    save_checkpoint(classifier, tmp_path / "backbone.safetensors")
    reference = {k: v for k, v in classifier.state_dict().items() if not k.startswith("linear.")}
    for os_, dilations in ((16, {3: {1}, 4: {2}}), (8, {3: {2}, 4: {4}})):
        model = tiny(output_stride=os_, backbone_checkpoint=tmp_path / "backbone.safetensors")
        assert {s: layer_dilations(model, s) for s in (3, 4)} == dilations
        assert {m.stride for m in model.backbone.stage4} == {1}
        loaded = model.backbone.state_dict()
        assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in loaded)
        assert model.eval()(torch.randn(1, 3, 64, 64))["out"].shape == (1, 4, 64, 64)


@pytest.mark.parametrize("head", ["deeplabv3", "lraspp"])
def test_fused_segmenter_predicts_the_same_pixels(head):
    torch.manual_seed(1)
    model = settle_bn(tiny(head, output_stride=8).double(), shape=(4, 3, 64, 64))
    x = torch.randn(3, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)["out"]
        fused = reparameterize_model(model)
        got = fused(x)["out"]
    assert fused.inference_mode and not model.inference_mode
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_the_mobilenet_v3_peer_fuses_its_batchnorms_too():
    torch.manual_seed(2)
    model = settle_bn(lraspp_mnv3(num_classes=3), shape=(2, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused = reparameterize_model(model)
        torch.testing.assert_close(fused(x)["out"], model(x)["out"], rtol=1e-4, atol=1e-4)
    assert fused.inference_mode and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_aux_head_only_in_train_mode_and_names():
    model = tiny(aux=True)
    x = torch.randn(2, 3, 32, 32)
    assert set(model.train()(x)) == {"out", "aux"} and set(model.eval()(x)) == {"out"}
    assert tiny("lraspp").aux_classifier is None and tiny(aux=False).aux_classifier is None
    names = mobileone.list_models("segment")
    assert len(names) == 18 and {"deeplabv3_s4", "lraspp_s0", "deeplabv3_mnv3", "lraspp_mu2"} <= set(names)
    assert lraspp_mnv3(num_classes=3).name == "lraspp_mnv3"
    assert create_segmenter("deeplabv3_mu0", num_classes=3).config.backbone == "mobileone_mu0"
    with pytest.raises(ValueError, match="must start with a head"):
        create_segmenter("unet_s0")
    with pytest.raises(ValueError, match="unknown MobileOne variant"):
        create_segmenter("deeplabv3_s9")
    with pytest.raises(ValueError, match="no auxiliary head"):
        create_segmenter("lraspp_s0", aux=True)
    with pytest.raises(ValueError, match="output stride 16 only"):
        create_segmenter("deeplabv3_mnv3", output_stride=8)
    with pytest.raises(ValueError, match="without weights"):
        create_segmenter("lraspp_mnv3", backbone_checkpoint="x.pth")
    with pytest.raises(ValueError, match="at most 255 classes"):
        tiny(num_classes=256)
    with pytest.raises(ValueError, match="names a head only"):
        create_segmenter("deeplabv3")
    with pytest.raises(ValueError, match="N, 3, H, W"):
        model(torch.randn(3, 32, 32))


@pytest.mark.filterwarnings("ignore:no BatchNorm running statistics")
def test_checkpoints_rebuild_their_model(tmp_path):
    torch.manual_seed(3)
    model = settle_bn(tiny("lraspp", output_stride=8), shape=(2, 3, 64, 64))
    model.class_names, model.preprocess["input_size"] = ["sky", "road", "car", "tree"], 96
    x = torch.randn(1, 3, 48, 64)
    for path, m in ((tmp_path / "a.safetensors", model), (tmp_path / "b.pth", reparameterize_model(model))):
        save_segmenter(m, path, epoch=3)
        back = load_segmenter(path)
        assert back.config == m.config and back.inference_mode == m.inference_mode
        assert back.class_names == model.class_names and back.preprocess["input_size"] == 96
        with torch.no_grad():
            torch.testing.assert_close(back(x)["out"], model.eval()(x)["out"], rtol=1e-4, atol=1e-4)
    save_checkpoint(create_model(TINY, num_classes=3), tmp_path / "classifier.safetensors")
    with pytest.raises(CheckpointError, match="classify checkpoint, not a segmentation model"):
        load_segmenter(tmp_path / "classifier.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_segmenter(tmp_path / "broken.safetensors")


def test_miou_matches_torchmetrics_on_a_fixture():
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_jaccard_index

    g = torch.Generator().manual_seed(0)
    n = 5
    target = torch.randint(0, n - 1, (4, 40, 50), generator=g)  # class 4 never appears in the masks...
    pred = torch.where(
        torch.rand(target.shape, generator=g) < 0.7, target, torch.randint(0, n, target.shape, generator=g)
    )
    target[:, :5] = 255  # ... some pixels are ignored
    pred[0, 10:, :] = 2  # and whole regions are wrong
    scores = segmentation_scores(confusion_matrix(pred, target, n))
    miou = multiclass_jaccard_index(pred, target, n, average="macro", ignore_index=255)
    acc = multiclass_accuracy(pred, target, n, average="micro", ignore_index=255)
    assert scores["miou"] == pytest.approx(100 * float(miou), abs=1e-4)
    assert scores["pixel_acc"] == pytest.approx(100 * float(acc), abs=1e-4)
    assert scores["per_class_iou"]["4"] == 0.0  # predicted but never true: IoU 0, counted
    absent = segmentation_scores(confusion_matrix(torch.zeros(3, 3), torch.zeros(3, 3), 3), ["a", "b", "c"])
    assert absent["miou"] == 100.0 and absent["per_class_iou"] == {"a": 100.0, "b": None, "c": None}
    with pytest.raises(ValueError, match=r"mask values \[7\]"):
        confusion_matrix(torch.zeros(2, 2), torch.full((2, 2), 7), 3)
    assert math.isnan(segmentation_scores(torch.zeros(2, 2, dtype=torch.long))["miou"])


def test_the_peers_are_torchvision_models_key_for_key():
    import torchvision.models.segmentation as tvs

    torch.manual_seed(4)
    theirs = tvs.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    ours = lraspp_mnv3(num_classes=3).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the same modules under the same names
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["out"], theirs(x)["out"])
    deeplab = tvs.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    create_segmenter("deeplabv3_mnv3", num_classes=3).load_state_dict(deeplab.state_dict())  # rates differ, not weights
