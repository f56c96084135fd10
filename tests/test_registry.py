"""One registry for every task: names, builders, and properties that hold for every registered model."""

from __future__ import annotations

import warnings

import pytest
import torch

import mobileone
from mobileone import FusionWarning, MobileOneConfig, reparameterize_model
from mobileone.core.registry import find_model

from .conftest import settle_bn

TASK_MODELS = [n for n in mobileone.list_models(peers=False) if find_model(n).task != "classify"]
SMALL = 64


def test_every_task_lists_its_models_and_create_model_builds_them():
    every = mobileone.list_models()
    assert sorted(every) == sorted(
        mobileone.list_models("classify") + mobileone.list_models("detect") + mobileone.list_models("segment")
    )
    assert "ssdlite_mnv3" in mobileone.list_models("detect")
    assert "ssdlite_mnv3" not in mobileone.list_models("detect", peers=False)
    assert {"deeplabv3_s0", "lraspp_mnv3"} <= set(mobileone.list_models("segment"))
    assert type(mobileone.create_model("ssdlite_s0", num_classes=2, img_size=SMALL)).__name__ == "SSDLiteDetector"
    assert type(mobileone.create_model("lraspp_mu0", num_classes=2)).__name__ == "Segmenter"
    assert mobileone.create_model("S0", num_classes=2).num_classes == 2  # classifier names as before
    with pytest.raises(ValueError, match="unknown model 'ssdlite_s9' for task 'detect'"):
        mobileone.create_model("ssdlite_s9")
    with pytest.raises(ValueError, match="unknown task"):
        mobileone.list_models("classification")


def test_a_registered_variant_is_listed_and_built_by_name():
    cfg = MobileOneConfig(widths=(8, 16, 16, 24), stem_width=8, blocks=(1, 1, 1, 1), k=2)
    name = mobileone.register_variant("registry_tiny", cfg)
    assert name in mobileone.list_models("classify")
    assert mobileone.create_model("registry_tiny", num_classes=3).config == cfg
    assert mobileone.register_variant("registry_tiny", cfg) == name  # registering again changes nothing


@pytest.mark.parametrize("name", TASK_MODELS)
def test_every_task_model_fuses_to_the_same_outputs(name, one_thread):
    """Fusion holds for every registered detector and segmenter: the fused model gives the same outputs."""
    torch.manual_seed(0)
    entry = find_model(name)
    kwargs = {"num_classes": 3, "img_size": SMALL} if entry.task == "detect" else {"num_classes": 3}
    model = mobileone.create_model(name, **kwargs)
    if entry.task == "detect":  # train mode needs targets: settle the statistics through the network alone
        model.forward = model.head_outputs
    model = settle_bn(model.double(), shape=(2, 3, SMALL, SMALL), steps=2)
    if entry.task == "detect":
        del model.forward
    x = torch.randn(1, 3, SMALL, SMALL, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FusionWarning)
        fused = reparameterize_model(model)
        if entry.task == "detect":
            (ref_boxes, ref_scores), (boxes, scores) = model.forward_raw(x), fused.forward_raw(x)
            assert torch.allclose(ref_scores, scores, atol=1e-8) and torch.allclose(ref_boxes, boxes, atol=1e-6)
        else:
            ref, out = model(x)["out"], fused(x)["out"]
            assert ref.std() > 0 and torch.allclose(ref, out, atol=1e-8 * float(ref.abs().max()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
