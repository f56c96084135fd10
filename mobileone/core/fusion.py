"""The fusion math, in one place: folding a sum of conv+BatchNorm branches into one conv.

Every MobileOne layer is ``sum_i BN_i(conv(x, W_i))``. Because conv is linear in its kernel and an
eval-mode BatchNorm is an affine map per channel, the sum is one conv with kernel
``sum_i W_i * gamma_i / std_i`` and bias ``sum_i beta_i - mean_i * gamma_i / std_i``
(docs/architecture.md, "Fusion"). The same formula with batch statistics in place of running
statistics is what the fast training path uses (``fast_train.py``), so both call :func:`fold_bn`.

:func:`reparameterize_model` fuses by protocol, as Apple's code does: every module with a
``reparameterize()`` method folds itself, so a detector or segmenter whose head holds
re-parameterizable blocks, or a user's own block, fuses in the same single call.
"""

from __future__ import annotations

import copy
import warnings
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .branch_stats import FastStridedDepthwise


class FusionWarning(UserWarning):
    """Fusion did something the caller may not expect (train mode, already fused, fresh BN)."""


@runtime_checkable
class Reparameterizable(Protocol):
    """A module that folds its train-time branches into its deployed form in place.

    ``reparameterize()`` must be idempotent; an ``inference_mode`` attribute, when present, says
    whether the module is folded already (modules without it count as unfused until called).
    """

    def reparameterize(self) -> None: ...


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


def fold_conv_bn(module: nn.Module) -> int:
    """Fold every conv directly followed by a BatchNorm in an ``nn.Sequential`` of ``module`` into one conv.

    The one conv + BatchNorm fold of every task's heads and necks (SSDLite's extra blocks, FPN
    necks, ASPP): the BatchNorm becomes ``nn.Identity``, the conv gains the bias, its padding mode,
    dilation and groups are kept. Modules below ``module`` that fold themselves (a ``reparameterize()``
    method, e.g. MobileOne layers) are left to it. A BatchNorm without running statistics
    (``track_running_stats=False``) is kept: it normalizes by the batch, which no conv reproduces.
    Exact in eval mode. Returns how many pairs were folded.
    """
    folded = 0
    if isinstance(module, nn.Sequential):
        items = list(module._modules.items())
        for (name, conv), (bn_name, bn) in zip(items, items[1:]):
            if type(conv) in (nn.Conv2d, FastStridedDepthwise) and _foldable_bn(bn):
                module._modules[name] = _folded_conv(conv, bn)
                module._modules[bn_name] = nn.Identity()
                folded += 1
    for child in module.children():
        if not callable(getattr(child, "reparameterize", None)):
            folded += fold_conv_bn(child)
    return folded


def _foldable_bn(bn: nn.Module) -> bool:
    is_bn = isinstance(bn, nn.modules.batchnorm._BatchNorm)
    return is_bn and bn.running_mean is not None and bn.running_var is not None


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """One conv equal, in eval mode, to ``bn(conv(x))`` (a conv bias is folded too)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = bn.bias if bn.bias is not None else torch.zeros_like(scale)
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_(shift + (conv_bias - bn.running_mean) * scale)
    fused.weight.requires_grad_(conv.weight.requires_grad)
    return fused


def reparameterizable_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that can fold themselves (have a ``reparameterize()`` method)."""
    return [m for m in model.modules() if callable(getattr(m, "reparameterize", None))]


def _fuse_tree(module: nn.Module) -> None:
    """Fold ``module`` (if it can fold itself), then whatever re-parameterizable modules it still holds.

    Parents go first, so a block that folds its children its own way can do so; children it
    leaves in place are folded after it.
    """
    if callable(getattr(module, "reparameterize", None)) and not getattr(module, "inference_mode", False):
        module.reparameterize()
    for child in list(module.children()):
        _fuse_tree(child)


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every re-parameterizable module folded (a copy unless ``inplace``).

    Fusion uses the BatchNorm running statistics, so the result matches the unfused model in eval
    mode; the fused model is returned in eval mode and its parameters stay trainable. Works on any
    module holding MobileOne layers or other modules with a ``reparameterize()`` method (a
    detector or segmenter with a MobileOne backbone, a user's own block).
    """
    fusible = reparameterizable_modules(model)
    if not fusible:
        raise ValueError(
            f"{type(model).__name__} contains no MobileOne layers (or other modules with a reparameterize() "
            "method) to re-parameterize"
        )
    unfused = [m for m in fusible if not getattr(m, "inference_mode", False)]
    if not unfused:
        warnings.warn("model is already re-parameterized; returning it unchanged", FusionWarning, stacklevel=2)
        return model if inplace else copy.deepcopy(model)
    if model.training:
        warnings.warn(
            "model was in train mode: fusion folds the BatchNorm running statistics, so the fused model "
            "reproduces the unfused one in eval mode; it is returned in eval mode",
            FusionWarning,
            stacklevel=2,
        )
    bns = [bn for m in unfused for bn in m.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    if bns and all(bn.num_batches_tracked is not None and int(bn.num_batches_tracked) == 0 for bn in bns):
        warnings.warn(
            "no BatchNorm running statistics were ever updated (untrained model): the fused model is exact, "
            "but it folds the initial statistics (mean 0, variance 1)",
            FusionWarning,
            stacklevel=2,
        )
    if not inplace:
        model = copy.deepcopy(model)
    _fuse_tree(model)
    return model.eval()
