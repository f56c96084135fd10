"""SSDLite detectors: loss, detections, fusion of the whole detector, the MobileNetV3 peer, checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from mobileone import CheckpointError, MobileOne, MobileOneConfig, count_params, reparameterize_model, save_checkpoint
from mobileone.deploy.detect import compare_detections
from mobileone.tasks.detect.model import (
    DetectorConfig,
    create_detector,
    load_detector,
    save_detector,
    ssdlite_mnv3,
)

TINY_ARCH = {"widths": (8, 16, 16, 24), "stem_width": 8, "blocks": (1, 1, 1, 1), "k": (2, 2, 2, 2)}
TINY = {"arch": TINY_ARCH, "extra_channels": (32, 32, 16, 16), "anchor_min_ratio": 0.15}


def tiny_detector(num_classes: int = 2, img_size: int = 64, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_detector("ssdlite_s0", num_classes, img_size, **{**TINY, **kwargs})


@torch.no_grad()
def settle(model: nn.Module, img_size: int = 64, steps: int = 3) -> nn.Module:
    """Fill every BN's running statistics from a few train-mode batches, so eval mode is not the init."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None
    model.train()
    for _ in range(steps):
        model.head_outputs(torch.randn(4, 3, img_size, img_size))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _targets(n: int, empty: bool = False) -> list[dict[str, torch.Tensor]]:
    if empty:
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(n)]
    return [{"boxes": torch.tensor([[8.0, 10, 30, 40], [35, 5, 60, 28]]), "labels": torch.tensor([0, 1])}] * n


def test_loss_trains_and_images_without_boxes_still_count(one_thread):
    det = tiny_detector().train()
    x = torch.randn(2, 3, 64, 64)
    losses = det(x, _targets(2))
    assert set(losses) == {"bbox_regression", "classification"} and all(v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert det.head.classification_head.module_list[0][1].weight.grad.abs().sum() > 0
    det.zero_grad()
    negatives = det(x, _targets(2, empty=True))  # no objects: no box loss, but the hardest negatives are trained
    assert negatives["bbox_regression"] == 0 and negatives["classification"] > 0
    negatives["classification"].backward()
    assert det.head.classification_head.module_list[0][1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs targets"):
        det(x)


def test_detections_are_sorted_bounded_and_zero_based(one_thread):
    det = settle(tiny_detector(num_classes=3, max_detections=50))
    out = det(torch.randn(2, 3, 64, 64))
    assert len(out) == 2
    for d in out:
        assert 0 < len(d["scores"]) <= 50
        assert (d["scores"][:-1] >= d["scores"][1:]).all() and (d["scores"] > det.config.score_thresh).all()
        assert d["labels"].min() >= 0 and d["labels"].max() < 3
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= 64).all()
    boxes, scores = det.forward_raw(torch.randn(1, 3, 64, 64))
    assert boxes.shape == (1, det.anchors.shape[0], 4) and scores.shape == (1, det.anchors.shape[0], 3)
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\), got \(1, 3, 96, 96\)"):
        det(torch.randn(1, 3, 96, 96))


def test_fusion_folds_the_whole_detector_and_keeps_its_detections(one_thread):
    det = settle(tiny_detector())
    x = torch.randn(3, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = reparameterize_model(det)
    assert fused.inference_mode and not det.inference_mode
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    convs = lambda m: sum(isinstance(c, nn.Conv2d) for c in m.modules())  # noqa: E731
    assert convs(fused) < convs(det)
    with torch.no_grad():
        for a, b in zip(det(x), fused(x)):
            problems, _ = compare_detections(a, b, det.config.score_thresh, det.config.nms_thresh)
            assert not problems and len(a["scores"]) == len(b["scores"]) > 0
        raw_a, raw_b = det.forward_raw(x), fused.forward_raw(x)
    torch.testing.assert_close(raw_a[1], raw_b[1], atol=1e-5, rtol=1e-4)


def test_mnv3_peer_is_torchvisions_ssdlite_and_fuses(one_thread):
    peer = ssdlite_mnv3(num_classes=90)
    reference = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91)
    assert count_params(peer) == count_params(reference)  # same trunk, extra blocks, head and anchors
    small = settle(ssdlite_mnv3(num_classes=2, img_size=64, extra_channels=(32, 32, 16, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = reparameterize_model(small)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small.forward_raw(x)[1], fused.forward_raw(x)[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="mnv3 peer takes none"):
        create_detector("ssdlite_mnv3", 2, arch=TINY_ARCH)
    with pytest.raises(ValueError, match="MobileNetV3 peer trains whole"):
        small.freeze_stages(2)


@torch.no_grad()
def test_identity_start_reaches_the_peer(one_thread):
    """``init="identity"`` starts every residual block of the MobileNetV3 peer as the identity, as
    MobileOne's layers start; torchvision's initialisation stays for ``init="torch"``."""
    x = torch.randn(2, 16, 8, 8)  # the first residual block's input: 16 channels
    for init, passes in (("identity", True), ("torch", False)):
        trunk = create_detector("ssdlite_mnv3", 2, img_size=64, init=init).features.backbone
        blocks = [m for m in trunk.modules() if getattr(m, "use_res_connect", False)]
        assert len(blocks) == 10 and torch.equal(blocks[0].eval()(x), x) is passes


def test_builders_and_bad_names():
    import mobileone
    from mobileone.core.registry import find_model

    names = mobileone.list_models("detect")
    assert {"ssdlite_s0", "ssdlite_s1", "ssdlite_s2", "ssdlite_s3", "ssdlite_s4", "ssdlite_mnv3"} <= set(names)
    documented = [find_model(n).builder for n in names if "_mu" not in n]
    assert all(f.__doc__ and "Example:" in f.__doc__ and "Args:" in f.__doc__ for f in documented)
    with pytest.raises(ValueError, match="unknown detector 'ssdlite_s9'"):
        create_detector("ssdlite_s9", 3)
    with pytest.raises(ValueError, match="anchor ratios"):
        DetectorConfig("mobileone_s0", 3, anchor_min_ratio=0.5, anchor_max_ratio=0.4)
    det = create_detector("ssdlite_s1", 20, img_size=320)
    assert det.features.out_channels == [512, 1280, 512, 256, 256, 128] and det.anchors.shape == (3234, 4)


def test_checkpoints_round_trip_unfused_and_fused(tmp_path, one_thread):
    det = settle(tiny_detector(num_classes=2, nms_thresh=0.4))
    det.class_names = ["red", "blue"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = reparameterize_model(det)
    x = torch.randn(2, 3, 64, 64)
    for model, name in ((det, "last.safetensors"), (fused, "best_fused.safetensors")):
        path = save_detector(model, tmp_path / name, epoch=3, map=12.5)
        loaded = load_detector(path)
        assert loaded.inference_mode == model.inference_mode and loaded.class_names == ["red", "blue"]
        assert loaded.config == model.config and loaded.config.nms_thresh == 0.4
        with torch.no_grad():
            for a, b in zip(model.forward_raw(x), loaded.forward_raw(x)):
                assert torch.equal(a, b)
    classifier = save_checkpoint(MobileOne(MobileOneConfig(**TINY_ARCH), 5), tmp_path / "cls.safetensors")
    with pytest.raises(CheckpointError, match="is a classify checkpoint, not a detector"):
        load_detector(classifier)


def test_backbone_checkpoint_and_frozen_stages(tmp_path, one_thread):
    torch.manual_seed(1)
    classifier = MobileOne(MobileOneConfig(**TINY_ARCH), 5)
    path = save_checkpoint(classifier, tmp_path / "backbone.safetensors")
    det = create_detector("ssdlite_s0", 2, 64, path, freeze_stages=2, **TINY)
    backbone = det.features.backbone
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, classifier.state_dict()[key]), key
    assert not any(p.requires_grad for p in backbone.stage1.parameters())
    assert all(p.requires_grad for p in backbone.stage2.parameters())
    other = save_checkpoint(
        MobileOne(MobileOneConfig(**{**TINY_ARCH, "stem_width": 16}), 5), tmp_path / "o.safetensors"
    )
    with pytest.raises(CheckpointError, match="backbone"):
        create_detector("ssdlite_s0", 2, 64, other, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = save_checkpoint(reparameterize_model(classifier), tmp_path / "fused.safetensors")
    with pytest.raises(CheckpointError, match="fused"):
        create_detector("ssdlite_s0", 2, 64, fused, **TINY)
