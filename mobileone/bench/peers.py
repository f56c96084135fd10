"""The models the benchmark times: MobileOne S0-S4 and the micro variants, fused and unfused, and their peers.

Every model is built without weights (nothing is downloaded); timm's models join when timm is installed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from ..core.config import PAPER_VARIANTS
from ..core.factory import create_model
from ..core.fusion import reparameterize_model


@dataclass
class BenchModel:
    """A model to time: a name, a family for the plot, whether it is the deployed form, and a builder."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    deployed: bool = True  # False for MobileOne's train-time graph: left out of the correlations


def _mobileone(variant: str, fused: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = create_model(variant)
        if fused:  # fuse the train-time graph, as users do, rather than building the fused one directly
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = reparameterize_model(model.eval(), inplace=True)
        return model.eval()

    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None).eval()

    return build


def _timm(name: str, fuse: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        if fuse:
            from timm.utils.model import reparameterize_model as timm_reparameterize

            model = timm_reparameterize(model)
        return model.eval()

    return build


TORCHVISION_PEERS = (
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "mnasnet1_0",
)
TIMM_PEERS = {
    "timm/mobileone_s0": ("mobileone_s0", True),
    "timm/mobilenetv3_large_100": ("mobilenetv3_large_100", False),
    "timm/mobilenetv4_conv_small": ("mobilenetv4_conv_small", False),
    "timm/repvgg_a0": ("repvgg_a0", True),
}


def available_models() -> dict[str, BenchModel]:
    """Every model ``bench`` knows, built without weights (nothing is downloaded)."""
    models = {}
    for v in PAPER_VARIANTS:
        models[v] = BenchModel(v, "MobileOne (fused)", _mobileone(v, True))
        models[f"{v}_unfused"] = BenchModel(f"{v}_unfused", "MobileOne (train-time graph)", _mobileone(v, False), False)
    for name in TORCHVISION_PEERS:
        models[name] = BenchModel(name, "torchvision", _torchvision(name))
    try:
        import timm  # noqa: F401

        for name, (timm_name, fuse) in TIMM_PEERS.items():
            models[name] = BenchModel(name, "timm", _timm(timm_name, fuse))
    except ImportError:
        pass
    return models


MODEL_GROUPS = {
    "mobileone": list(PAPER_VARIANTS),
    "unfused": [f"{v}_unfused" for v in PAPER_VARIANTS],
    "torchvision": list(TORCHVISION_PEERS),
    "timm": list(TIMM_PEERS),
}
# timm's models join the default set when timm is installed (resolve_models drops unknown names).
MODEL_GROUPS["default"] = MODEL_GROUPS["mobileone"] + MODEL_GROUPS["unfused"] + MODEL_GROUPS["torchvision"]
MODEL_GROUPS["default"] += MODEL_GROUPS["timm"]


def resolve_models(names: Iterable[str]) -> list[BenchModel]:
    """Model names or groups (``default``, ``mobileone``, ``unfused``, ``torchvision``, ``timm``, ``all``)."""
    known = available_models()
    groups = {**MODEL_GROUPS, "all": list(known)}
    out: list[BenchModel] = []
    for name in names:
        if name in groups:
            members = [n for n in groups[name] if n in known]
            if name == "timm" and not members:
                raise ValueError("the timm models need timm: pip install timm")
            out += [known[n] for n in members]
        elif name in known:
            out.append(known[name])
        else:
            raise ValueError(
                f"unknown benchmark model {name!r}; choose from groups {sorted(groups)} or {sorted(known)}"
            )
    return list({m.name: m for m in out}.values())
