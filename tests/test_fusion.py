"""Re-parameterization is exact (eval mode), safe in train mode and idempotent."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mobileone import FusionWarning, MobileOneLayer, create_model, list_models, reparameterize_model
from mobileone.core.fusion import identity_kernel

from .conftest import settle_bn


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", list_models("classify"))
def test_fused_equals_unfused_all_variants(name):
    torch.manual_seed(0)
    model = settle_bn(create_model(name, num_classes=10), shape=(4, 3, 32, 32), steps=2).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize_model(model)
        assert ref.std(0).mean() > 1e-3  # outputs depend on the input: the check is not vacuous
        assert _rel_err(ref, fused(x)) < 1e-5
    assert not fused.training
    assert all(p.requires_grad for p in fused.parameters())
    assert not any(hasattr(layer, "rbr_conv") for layer in fused.layers())


@settings(max_examples=40, deadline=None)
@given(
    cin_groups=st.sampled_from([(4, 1), (6, 2), (8, 8), (3, 1), (6, 3)]),
    cout_mult=st.sampled_from([1, 2]),
    kernel=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    k=st.integers(1, 4),
    use_se=st.booleans(),
    scale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fusion_property(cin_groups, cout_mult, kernel, stride, dilation, k, use_se, scale, seed):
    torch.manual_seed(seed)
    cin, groups = cin_groups
    cout = cin * cout_mult
    layer = MobileOneLayer(cin, cout, kernel, stride, dilation, groups, k, use_se, scale).double()
    for m in layer.modules():  # random affine parameters so every branch matters
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    layer.train()
    with torch.no_grad():
        for _ in range(2):
            layer(torch.randn(3, cin, 9, 11, dtype=torch.float64) * 2 + 1)
    layer.eval()
    x = torch.randn(2, cin, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        ref = layer(x)
        layer.reparameterize()
        out = layer(x)
    assert layer.reparam_conv.dilation == (dilation, dilation)
    assert out.shape == ref.shape
    assert _rel_err(ref, out) < 1e-5


def test_dilation_reaches_train_branches():
    layer = MobileOneLayer(4, 4, 3, dilation=2, groups=4, k=2)
    assert all(b.conv.dilation == (2, 2) and b.conv.padding == (2, 2) for b in layer.rbr_conv)


def test_identity_kernel_grouped():
    x = torch.randn(2, 6, 5, 5)
    kernel = identity_kernel(6, 3, 3, x)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, kernel, padding=1, groups=3), x)


def test_train_mode_fusion_warns_and_returns_eval(tiny_model):
    tiny_model.train()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(FusionWarning, match="train mode"):
        fused = reparameterize_model(tiny_model)
    assert not fused.training and tiny_model.training
    with torch.no_grad():
        assert _rel_err(tiny_model.eval()(x), fused(x)) < 1e-5


def test_fusing_twice_warns_and_changes_nothing(tiny_model):
    fused = reparameterize_model(tiny_model)
    with pytest.warns(FusionWarning, match="already re-parameterized"):
        again = reparameterize_model(fused)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), again(x))
    fused.layers()[0].reparameterize()  # the layer-level call is idempotent too


def test_inplace_and_fresh_bn_warning():
    model = create_model("s0", num_classes=3).eval()
    with pytest.warns(FusionWarning, match="statistics were ever updated"):
        out = reparameterize_model(model, inplace=True)
    assert out is model and model.inference_mode


def test_fused_model_trains(tiny_model):
    fused = reparameterize_model(tiny_model)
    fused.train()
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    before = [p.detach().clone() for p in fused.parameters()]
    loss = torch.nn.functional.cross_entropy(fused(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, fused.parameters())]
    assert all(changed[:2]) and sum(changed) > 0.9 * len(changed)  # the stem and nearly all layers move


def test_fusion_inside_another_module(tiny_model):
    wrapper = torch.nn.Sequential(tiny_model, torch.nn.Softmax(-1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = reparameterize_model(wrapper)
    assert all(layer.inference_mode for layer in fused[0].layers())
    with pytest.raises(ValueError, match="no MobileOne layers"):
        reparameterize_model(torch.nn.Linear(2, 2))


def test_fold_conv_bn_is_exact_and_recursive():
    """The one conv + BN fold: nested Sequentials, conv bias, padding modes, dilation, groups, BN without
    affine; a BN without running statistics is kept; a module that folds itself is left to itself."""
    from mobileone.core.fusion import fold_conv_bn

    torch.manual_seed(0)

    class SelfFolding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

        def forward(self, x):
            return self.body(x)

        def reparameterize(self) -> None:  # pragma: no cover - only its presence matters
            pass

    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=True), nn.BatchNorm2d(8), nn.ReLU()),
        nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.BatchNorm2d(8))])[0],
        nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8, affine=False)),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, track_running_stats=False)),
        SelfFolding(),
    )
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            if bn.affine:
                bn.weight.data.uniform_(0.5, 2)
                bn.bias.data.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    expected = model(x)
    assert fold_conv_bn(model) == 3
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert model[0][0].padding_mode == "reflect" and model[1][0].dilation == (2, 2)
    assert isinstance(model[3][1], nn.BatchNorm2d)  # batch statistics: kept
    assert isinstance(model[4].body[1], nn.BatchNorm2d)  # folds itself: left alone
