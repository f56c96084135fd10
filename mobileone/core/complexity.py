"""Counting parameters and multiply-accumulates (MACs) by running the model, not by quoting.

MACs are those of every conv and linear layer (the paper's "FLOPs" column counts MACs);
element-wise work (BN, ReLU, the SE multiply, pooling) is not counted, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import MobileOneLayer


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int = 224, in_chans: int = 3) -> int:
    """MACs of one forward pass on a ``img_size`` x ``img_size`` image (batch 1, eval mode)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, in_chans, img_size, img_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


@torch.no_grad()
def layers_run(
    model: nn.Module, example: torch.Tensor, kinds: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
) -> list[str]:
    """Names of the ``kinds`` layers a forward on ``example`` runs, in the order it first runs them: what an
    exported graph holds (a train-only auxiliary head is in the model but not in the graph)."""
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [
        m.register_forward_hook(lambda m, i, o: order.append(names[m])) for m in model.modules() if isinstance(m, kinds)
    ]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def count_layers(model: nn.Module) -> int:
    """Weight layers of the deployed net: MobileOne layers (one conv each once fused) plus the head."""
    return sum(isinstance(m, MobileOneLayer) for m in model.modules()) + sum(
        isinstance(m, nn.Linear) for m in model.modules()
    )
