"""The fusion math, in one place: folding a sum of conv+BatchNorm branches into one conv.

Every MobileOne layer is ``sum_i BN_i(conv(x, W_i))``. Because conv is linear in its kernel and an
eval-mode BatchNorm is an affine map per channel, the sum is one conv with kernel
``sum_i W_i * gamma_i / std_i`` and bias ``sum_i beta_i - mean_i * gamma_i / std_i``
(spec section 1). The same formula with batch statistics in place of running statistics is what
the fast training path uses (``fast_train.py``), so both call :func:`fold_bn`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def fold_bn(kernel: Tensor, mean: Tensor, var: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold a BatchNorm with statistics ``mean``/``var`` into the conv kernel before it."""
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - mean * scale


def pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad an odd ``s x s`` kernel to ``size x size`` around its centre (1x1 scale branch)."""
    pad = (size - kernel.shape[-1]) // 2
    return nn.functional.pad(kernel, [pad] * 4)


def identity_kernel(channels: int, groups: int, size: int, like: Tensor) -> Tensor:
    """The kernel of a conv that copies its input: what the BN-only skip branch convolves with.

    For a grouped conv, output channel ``c`` sees input ``c % (channels / groups)`` of its group.
    """
    in_per_group = channels // groups
    kernel = torch.zeros(channels, in_per_group, size, size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % in_per_group, size // 2, size // 2] = 1
    return kernel


def fuse_branches(branches: list[tuple[Tensor, nn.BatchNorm2d]]) -> tuple[Tensor, Tensor]:
    """One kernel and bias equal, in eval mode, to the sum of ``BN(conv(x, kernel))`` branches.

    ``branches`` holds full-size kernels (see ``MobileOneLayer.branches``) and their BatchNorms;
    their running statistics are used, which is why fusion is exact only against eval mode.
    """
    weight = bias = None
    for kernel, bn in branches:
        w, b = fold_bn(kernel, bn.running_mean, bn.running_var, bn)
        weight = w if weight is None else weight + w
        bias = b if bias is None else bias + b
    if weight is None:
        raise ValueError("a MobileOne layer needs at least one branch to fuse")
    return weight, bias
