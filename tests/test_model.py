"""The architecture against docs/architecture.md (Apple's code, the paper): sizes, keys, feature API, bad input."""

import pytest
import torch

import mobileone
from mobileone import MobileOneConfig, count_macs, count_params, create_model, list_models

# docs/architecture.md, "Sizes": params train-time, params fused, MACs fused (M, one decimal).
SPEC_SIZES = {
    "mobileone_s0": (5_293_272, 2_078_504, 275.1),
    "mobileone_s1": (4_825_192, 4_764_840, 825.1),
    "mobileone_s2": (7_884_648, 7_808_168, 1298.4),
    "mobileone_s3": (10_170_600, 10_078_312, 1895.8),
    "mobileone_s4": (14_951_248, 14_838_352, 2979.3),
}
# docs/architecture.md, "Variants": channels of stem and stages 1-4, k, SE.
SPEC_WIDTHS = {
    "mobileone_s0": ((48, 48, 128, 256, 1024), 4, False),
    "mobileone_s1": ((64, 96, 192, 512, 1280), 1, False),
    "mobileone_s2": ((64, 96, 256, 640, 2048), 1, False),
    "mobileone_s3": ((64, 128, 320, 768, 2048), 1, False),
    "mobileone_s4": ((64, 192, 448, 896, 2048), 1, True),
}


def test_list_models():
    variants = [f"mobileone_s{i}" for i in range(5)] + [f"mobileone_mu{i}" for i in range(3)]
    assert list_models("classify")[: len(variants)] == variants  # then any registered by other tests


@pytest.mark.parametrize("name", ["mobileone_mu0", "mobileone_mu1", "mobileone_mu2"])
def test_micro_variants_within_2_percent_of_the_paper(name):
    # Paper Table 13: fused params and MACs at 224 px, 1000 classes; the reconstruction must match both.
    paper = mobileone.PAPER[name]
    fused = create_model(name, inference_mode=True)
    assert abs(count_params(fused) / (paper.params_m * 1e6) - 1) < 0.02
    assert abs(count_macs(fused) / (paper.macs_m * 1e6) - 1) < 0.02
    assert create_model(name.split("_")[1]).variant == name and create_model(name).config.k == (4, 4, 4, 4)


@pytest.mark.parametrize("name", list(SPEC_SIZES))
def test_sizes_match_apple_and_paper(name):
    params_train, params_fused, macs_fused = SPEC_SIZES[name]
    train, fused = create_model(name), create_model(name, inference_mode=True)
    assert count_params(train) == params_train
    assert count_params(fused) == params_fused
    assert round(count_macs(fused) / 1e6, 1) == macs_fused


def test_s0_train_time_macs():
    assert round(count_macs(create_model("s0")) / 1e6) == 1052  # Apple's code: about 1052 M


def _expected_keys(name: str, fused: bool) -> dict[str, tuple[int, ...]]:
    """The Apple key layout written out from docs/architecture.md, independently of the model."""
    (stem, *widths), k, has_se = SPEC_WIDTHS[name]
    blocks = (2, 8, 10, 1)
    se_blocks = (0, 0, 5, 1) if has_se else (0, 0, 0, 0)
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix, c):
        keys.update({f"{prefix}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})
        keys[f"{prefix}.num_batches_tracked"] = ()

    def layer(prefix, cin, cout, ks, groups, k, skip, se):
        if fused:
            keys[f"{prefix}.reparam_conv.weight"] = (cout, cin // groups, ks, ks)
            keys[f"{prefix}.reparam_conv.bias"] = (cout,)
        else:
            for i in range(k):
                keys[f"{prefix}.rbr_conv.{i}.conv.weight"] = (cout, cin // groups, ks, ks)
                bn(f"{prefix}.rbr_conv.{i}.bn", cout)
            if ks > 1:
                keys[f"{prefix}.rbr_scale.conv.weight"] = (cout, cin // groups, 1, 1)
                bn(f"{prefix}.rbr_scale.bn", cout)
            if skip:
                bn(f"{prefix}.rbr_skip", cin)
        if se:
            r = int(cout * 0.0625)
            keys.update({f"{prefix}.se.reduce.weight": (r, cout, 1, 1), f"{prefix}.se.reduce.bias": (r,)})
            keys.update({f"{prefix}.se.expand.weight": (cout, r, 1, 1), f"{prefix}.se.expand.bias": (cout,)})

    layer("stage0", 3, stem, 3, 1, 1, False, False)
    cin = stem
    for s, (n, w, nse) in enumerate(zip(blocks, widths, se_blocks), start=1):
        for b in range(n):
            se = b >= n - nse
            layer(f"stage{s}.{2 * b}", cin, cin, 3, cin, k, b > 0, se)
            layer(f"stage{s}.{2 * b + 1}", cin, w, 1, 1, k, cin == w, se)
            cin = w
    keys["linear.weight"], keys["linear.bias"] = (1000, cin), (1000,)
    return keys


@pytest.mark.parametrize("name", ["mobileone_s0", "mobileone_s4"])
@pytest.mark.parametrize("fused", [False, True])
def test_apple_key_layout(name, fused):
    expected = _expected_keys(name, fused)
    got = {k: tuple(v.shape) for k, v in create_model(name, inference_mode=fused).state_dict().items()}
    assert got == expected


def test_documented_key_counts():
    assert len(create_model("s0").state_dict()) == 1323
    assert len(create_model("s4", inference_mode=True).state_dict()) == 136


def test_short_names_and_builders():
    assert create_model("S1").variant == "mobileone_s1"
    assert count_params(mobileone.mobileone_s2(inference_mode=True)) == SPEC_SIZES["mobileone_s2"][1]


def test_custom_config_and_overrides():
    m = create_model("s0", k=1)
    assert m.variant is None and all(layer.k == 1 for layer in m.stage1)
    plain = create_model("s0", k=1, scale_branch=False, skip_branch=False, num_classes=10)
    layers = plain.layers()
    assert all(layer.rbr_scale is None and layer.rbr_skip is None and len(layer.rbr_conv) == 1 for layer in layers)
    cfg = MobileOneConfig(widths=(8, 16, 24, 32), stem_width=8, blocks=(1, 2, 3, 1), k=(1, 2, 3, 4), se_blocks=1)
    m = create_model(cfg, num_classes=3)
    assert [len(m.stage1[0].rbr_conv), len(m.stage4[0].rbr_conv)] == [1, 4]
    assert sum(isinstance(layer.se, mobileone.core.model.SqueezeExcite) for layer in m.layers()) == 2 * 4
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    mobileone.register_variant("micro", cfg)
    try:
        assert create_model("micro").variant == "mobileone_micro"
    finally:
        del mobileone.VARIANTS["mobileone_micro"]


def test_bad_config_and_variant():
    with pytest.raises(ValueError, match="unknown MobileOne variant 'mobileone_s9'.*mobileone_s0"):
        create_model("mobileone_s9")
    with pytest.raises(TypeError, match="unknown MobileOne config option"):
        create_model("s0", width=3)
    with pytest.raises(ValueError, match="se_blocks"):
        MobileOneConfig(widths=(8, 8, 8, 8), stem_width=8, blocks=(1, 1, 1, 1), se_blocks=(0, 0, 2, 0))
    with pytest.raises(ValueError, match="num_classes"):
        create_model("s0", num_classes=-1)


def test_bad_input_shapes(tiny_model):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(3, 32, 32\).*unsqueeze"):
        tiny_model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 32, 32\)"):
        tiny_model(torch.randn(2, 1, 32, 32))


def test_feature_api(tiny_model):
    x = torch.randn(2, 3, 64, 64)
    feats = tiny_model.forward_intermediates(x, indices=(0, 1, 2, 3, 4))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in tiny_model.feature_info]
    assert [i["reduction"] for i in tiny_model.feature_info] == [2, 4, 8, 16, 32]
    torch.testing.assert_close(tiny_model.forward_features(x), feats[-1])
    torch.testing.assert_close(tiny_model.forward_head(feats[-1]), tiny_model(x))
    assert tiny_model.forward_head(feats[-1], pre_logits=True).shape == (2, 32)
    tiny_model.reset_classifier(0)
    assert tiny_model(x).shape == (2, 32)
    tiny_model.reset_classifier(7)
    assert tiny_model(x).shape == (2, 7)


def test_features_only_and_output_stride():
    m = create_model("s1", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    out = m(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in out] == [96, 192, 512, 1280] == [i["num_chs"] for i in m.feature_info]
    assert "linear.weight" not in m.state_dict()
    d = create_model("s1", output_stride=16).eval()
    assert [i["reduction"] for i in d.feature_info] == [2, 4, 8, 16, 16]
    assert d.forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 4
    assert d.stage4[0].dilation == 2 and d.stage4[0].rbr_conv[0].conv.dilation == (2, 2)
    # Same parameters as the stride-32 model, so the same checkpoints load.
    assert {k: v.shape for k, v in d.state_dict().items()} == {
        k: v.shape for k, v in create_model("s1").state_dict().items()
    }


def test_freeze_stages(tiny_model):
    tiny_model.freeze_stages(2)
    tiny_model.train()
    assert not tiny_model.stage1.training and tiny_model.stage2.training
    assert not any(p.requires_grad for p in tiny_model.stage0.parameters())
    before = tiny_model.stage1[0].rbr_conv[0].bn.running_mean.clone()
    tiny_model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(tiny_model.stage1[0].rbr_conv[0].bn.running_mean, before)
