"""Train-mode MobileOne layers with fewer kernels and fewer MACs, and the same math (docs/fast-train.md).

A train-time MobileOne layer is ``sum_i BN_i(conv(x, W_i))`` over its branches, each BatchNorm using
batch statistics. :func:`branch_sum` computes exactly that sum, its gradients and every branch
BatchNorm's running-statistic update, in one of three ways chosen per layer by :func:`plan`:

- ``"direct"`` (k = 1, the other branches per-channel): the conv once, its BatchNorm, and the
  scale / skip branches as a per-channel affine map of the input (:class:`ConvNormPlusAffine`).

- ``"concat"``: the branches that share a conv geometry run as one conv over their concatenated
  kernels (output channel ``o * B + j`` is branch ``j`` of channel ``o``, which keeps grouped and
  depthwise convs valid), their BatchNorms as one ``F.batch_norm`` over the concatenated channels,
  and the sum as a reduction over the branch axis. Depthwise layers put the k branches, the
  zero-padded scale branch and the identity (skip) kernel in that one conv; dense layers run their
  1x1 scale branch and BN-only skip branch on their own, since padding them to the full kernel
  would cost more MACs than it saves in kernels.
- ``"fold"``: a branch enters the output only through its batch mean and variance, so those come
  first and the layer then runs as a single conv with the branches folded into one kernel
  (:func:`mobileone.fusion.fold_bn`, the inference-fusion formula with batch statistics). Dense
  1x1 branches get them from the input's channel mean ``m`` and centred covariance ``S``
  (``mu_i = W_i m``, ``v_i = diag(W_i S W_i^T)``), so they never run: about ``Cin^2 + Cin*Cout``
  multiply-adds per position instead of ``k * Cin * Cout``, forward and backward. Dense ``K x K``
  layers with few input channels (the RGB stem: 27 values per patch) do the same with the
  covariance of their zero-padded input patches (``F.unfold``), which is exact at the border.
  Depthwise conv branches run for their statistics only (one pass each, no normalized copy);
  BN-only skip and depthwise 1x1 scale branches take the input's per-channel moments.
  Statistics are kept in float32 (or float64) under autocast.

Whatever cannot be reproduced exactly this way falls back to the per-branch reference
(``MobileOneLayer.forward_branches``): a branch BatchNorm in eval mode (frozen stages,
``norm_eval``), branch BatchNorms with differing ``eps``/``momentum``/``affine``/
``track_running_stats``, ``momentum=None`` with differing batch counts, and BatchNorm subclasses
such as ``SyncBatchNorm`` (their statistics span processes). Forward hooks on the branch modules
do not run on the fast path; switch it off (:func:`reference_mode`, :func:`set_fast_train`) where
they are needed.

Strided 1x1 convs whose weight gradient is taken on CPU run as unit-stride convs of the subsampled
input (:func:`conv2d`), here and in the per-branch reference: PyTorch's own CPU kernel for their
weight gradient is broken in the versions checked (2.12.1-2.15.0; docs/fast-train.md, section 6).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .branch_stats import (
    ConvMoments,
    ConvNormPlusAffine,
    Moments,
    compute_dtype,
    conv2d,
    conv_moments,
    covariance_stats,
)
from .fusion import fold_bn, identity_kernel, pad_kernel

if TYPE_CHECKING:
    from .model import MobileOneLayer

METHODS = ("reference", "concat", "fold", "direct")
_enabled = True


def fast_train_enabled() -> bool:
    """Whether the fast train-mode path is globally on (it is by default)."""
    return _enabled


@contextmanager
def reference_mode() -> Iterator[None]:
    """Run every MobileOne layer through the per-branch reference inside the ``with`` block."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def plan(layer: MobileOneLayer, x: Tensor) -> str:
    """The formulation :func:`branch_sum` uses for ``layer`` on input ``x`` (measured: README, "Fast training").

    ``"direct"`` where it applies (:func:`_direct_applies`: k = 1, the other branches per-channel,
    float32 / float64 without autocast): the one conv runs once and nothing runs for statistics alone.

    ``"fold"``, except for dense 1x1 layers where folding does not save multiply-adds: the folded
    statistics cost about ``2 M Cin^2`` (input covariance, forward and backward) plus
    ``2 k Cout Cin^2`` (branch variances) against ``3 k M Cin Cout`` for running the k branches
    (so k > 1 and enough positions ``M``).
    """
    if _direct_applies(layer, x):
        return "direct"
    if layer.kernel_size == 1 and layer.groups == 1:
        out_h, out_w = -(-x.shape[2] // layer.stride), -(-x.shape[3] // layer.stride)
        cin, cout, k = layer.in_channels, layer.out_channels, layer.k
        positions = x.shape[0] * out_h * out_w
        fold_cost = 2 * positions * cin * cin + 2 * k * cout * cin * cin + 3 * positions * cin * cout
        return "fold" if fold_cost < 3 * k * positions * cin * cout else "concat"
    return "fold"


def _direct_applies(layer: MobileOneLayer, x: Tensor) -> bool:
    """Whether ``"direct"`` computes ``layer`` exactly: one conv branch, a scale branch only if per-channel."""
    depthwise = layer.groups == layer.in_channels == layer.out_channels
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    plain_float = x.dtype in (torch.float32, torch.float64) and not autocast
    plain_float |= autocast and x.dtype in (torch.float32, compute_dtype(x))  # low precision, float32 statistics
    strided_1x1 = layer.kernel_size == 1 and layer.stride > 1  # conv2d's workaround (branch_stats) is not inside
    return layer.k == 1 and (layer.rbr_scale is None or depthwise) and plain_float and not strided_1x1


def _patch_covariance_pays(layer: MobileOneLayer, positions: int) -> bool:
    """Whether a dense ``ks x ks`` layer's branch statistics are cheaper from its input patches' covariance.

    Patches have ``P = Cin ks^2`` entries (27 for the RGB stem): their covariance costs about
    ``2 M P^2`` multiply-adds forward and backward, plus ``2 B Cout P^2`` for the B branch
    variances, against ``3 k M P Cout`` for running the k conv branches.
    """
    patch, cout, k, branches = (
        layer.in_channels * layer.kernel_size**2,
        layer.out_channels,
        layer.k,
        len(_branch_bns(layer)),
    )
    return 2 * positions * patch * patch + 2 * branches * cout * patch * patch < 3 * k * positions * patch * cout


def _branch_bns(layer: MobileOneLayer) -> list[nn.BatchNorm2d]:
    bns = [b.bn for b in layer.rbr_conv]
    if layer.rbr_scale is not None:
        bns.append(layer.rbr_scale.bn)
    if layer.rbr_skip is not None:
        bns.append(layer.rbr_skip)
    return bns


def _exact(bns: list[nn.BatchNorm2d]) -> bool:
    """Whether one shared batch-norm call reproduces each branch BatchNorm exactly."""
    first = bns[0]
    for bn in bns:
        if type(bn) is not nn.BatchNorm2d or not bn.training or not bn.affine:
            return False
        if (bn.eps, bn.momentum, bn.track_running_stats) != (first.eps, first.momentum, first.track_running_stats):
            return False
    if first.track_running_stats and first.momentum is None:
        return len({int(bn.num_batches_tracked) for bn in bns}) == 1
    return True


def branch_sum(layer: MobileOneLayer, x: Tensor, method: str | None = None) -> Tensor:
    """``layer.forward_branches(x)`` in train mode, computed with ``method`` (default: :func:`plan`'s).

    Outputs, gradients and the branch BatchNorms' running statistics and batch counts are those
    of the reference; where they could not be (see the module docstring) the reference runs.
    """
    method = plan(layer, x) if method is None else method
    if method not in METHODS:
        raise ValueError(f"unknown fast-train method {method!r}; choose one of {METHODS}")
    if layer.inference_mode:
        raise ValueError("the layer is re-parameterized (fused): it has no branches to train")
    bns = _branch_bns(layer)
    if method == "reference" or not _exact(bns):
        return layer.forward_branches(x)
    if x.device.type == "cpu" and (layer.groups > 1 or layer.in_channels * layer.stride**2 < layer.out_channels):
        # CPU depthwise/grouped convs run forward + backward about 2x faster in channels_last; a layer
        # whose input is smaller than its output (the RGB stem) converts its input, so that the
        # depthwise layer after it need not convert the larger output (6% of a detector step).
        x = x.contiguous(memory_format=torch.channels_last)
    if method == "concat":
        return _concat_sum(layer, x)
    if x[:, :, :: layer.stride, :: layer.stride][:, 0].numel() <= 1:  # the reference raises BN's error
        return layer.forward_branches(x)
    if method == "direct" and _direct_applies(layer, x):
        return _direct_sum(layer, x, bns)
    return _fold_sum(layer, x, bns)


# ---- "concat": the branches of one conv geometry as one conv, one batch-norm, one sum ----


def _batch_norm(z: Tensor, bns: list[nn.BatchNorm2d]) -> Tensor:
    """Train-mode BatchNorm of channel ``o * B + j`` with ``bns[j]``'s parameters and buffers."""
    first, nb = bns[0], len(bns)
    weight = torch.stack([bn.weight for bn in bns], 1).flatten()
    bias = torch.stack([bn.bias for bn in bns], 1).flatten()
    if not first.track_running_stats:
        return F.batch_norm(z, None, None, weight, bias, True, 0.0, first.eps)
    for bn in bns:
        bn.num_batches_tracked.add_(1)
    momentum = first.momentum if first.momentum is not None else 1.0 / float(first.num_batches_tracked)
    mean = torch.stack([bn.running_mean for bn in bns], 1).flatten()
    var = torch.stack([bn.running_var for bn in bns], 1).flatten()
    out = F.batch_norm(z, mean, var, weight, bias, True, momentum, first.eps)
    with torch.no_grad():
        for j, bn in enumerate(bns):
            bn.running_mean.copy_(mean.view(-1, nb)[:, j])
            bn.running_var.copy_(var.view(-1, nb)[:, j])
    return out


def _conv_bn_sum(x: Tensor, kernels: list[Tensor], bns: list[nn.BatchNorm2d], conv: nn.Conv2d) -> Tensor:
    """``sum_j BN_j(conv(x, kernels[j]))`` with one conv, one batch-norm and one reduction."""
    nb = len(kernels)
    weight = torch.stack(kernels, 1).flatten(0, 1) if nb > 1 else kernels[0]
    z = conv2d(x, weight, None, conv.stride[0], conv.padding[0], conv.dilation[0], conv.groups)
    z = _batch_norm(z, bns)
    return z.unflatten(1, (-1, nb)).sum(2) if nb > 1 else z


def _concat_sum(layer: MobileOneLayer, x: Tensor) -> Tensor:
    conv = layer.rbr_conv[0].conv
    kernels = [b.conv.weight for b in layer.rbr_conv]
    bns = [b.bn for b in layer.rbr_conv]
    if layer.groups == layer.in_channels:  # depthwise: the extra kernels cost kernel_size^2 MACs each
        if layer.rbr_scale is not None:
            kernels.append(pad_kernel(layer.rbr_scale.conv.weight, layer.kernel_size))
            bns.append(layer.rbr_scale.bn)
        if layer.rbr_skip is not None:
            kernels.append(identity_kernel(layer.in_channels, layer.groups, layer.kernel_size, kernels[0]))
            bns.append(layer.rbr_skip)
        return _conv_bn_sum(x, kernels, bns, conv)
    out = _conv_bn_sum(x, kernels, bns, conv)
    if layer.rbr_scale is not None:
        out = out + layer.rbr_scale(x)
    if layer.rbr_skip is not None:
        out = out + layer.rbr_skip(x)
    return out


# ---- "direct" (k = 1): the conv once, its BatchNorm, the per-channel branches as an affine map of x ----


def _direct_sum(layer: MobileOneLayer, x: Tensor, bns: list[nn.BatchNorm2d]) -> Tensor:
    """The conv and its BatchNorm, with the per-channel branches (:class:`ConvNormPlusAffine`) if any."""
    main = layer.rbr_conv[0]
    if len(bns) == 1:
        return main.bn(conv2d(x, main.conv.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups))
    ws = [layer.rbr_scale.conv.weight.reshape(-1)] if layer.rbr_scale is not None else []
    ws = torch.stack(ws + ([torch.ones_like(main.bn.weight)] if layer.rbr_skip is not None else []))
    extra = bns[1:]
    gs, bs = torch.stack([bn.weight for bn in extra]), torch.stack([bn.bias for bn in extra])
    conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
    y, mean_z, var_z, mean_x, var_x = ConvNormPlusAffine.apply(
        x, main.conv.weight, conv, main.bn.weight, main.bn.bias, ws, gs, bs, bns[0].eps
    )
    w = ws.detach()
    count = y.shape[0] * y.shape[2] * y.shape[3]
    _update_running(bns, torch.cat([mean_z[None], w * mean_x]), torch.cat([var_z[None], w * w * var_x]), count)
    return y


# ---- "fold": the branches' batch statistics first, then one conv with the folded kernel ----


class _StackedBN(NamedTuple):
    """Several BatchNorms' affine parameters end to end, for :func:`~mobileone.fusion.fold_bn`."""

    weight: Tensor
    bias: Tensor
    eps: float


@torch.no_grad()
def _update_running(bns: list[nn.BatchNorm2d], mean: Tensor, var: Tensor, count: int) -> None:
    """What ``nn.BatchNorm2d`` does to its buffers in train mode, for all branches at once.

    ``mean``/``var`` are (branches, channels) batch statistics; the running variance gets the
    unbiased ``var * M / (M - 1)``; ``momentum=None`` means the cumulative average.
    """
    first = bns[0]
    if not first.track_running_stats:
        return
    torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    momentum = first.momentum if first.momentum is not None else 1.0 / float(first.num_batches_tracked)
    means, variances = [bn.running_mean for bn in bns], [bn.running_var for bn in bns]
    mean, var = mean.to(means[0].dtype), (var * (count / (count - 1))).to(means[0].dtype)
    torch._foreach_mul_(means, 1 - momentum)
    torch._foreach_add_(means, list(mean.unbind(0)), alpha=momentum)
    torch._foreach_mul_(variances, 1 - momentum)
    torch._foreach_add_(variances, list(var.unbind(0)), alpha=momentum)


def _fold_sum(layer: MobileOneLayer, x: Tensor, bns: list[nn.BatchNorm2d]) -> Tensor:
    """Each branch's batch mean/variance, its running-stat update, then one conv with the folded kernel."""
    eps, s, ks, k = bns[0].eps, layer.stride, layer.kernel_size, layer.k
    conv = (s, layer.padding, layer.dilation, layer.groups)
    x_sub = x[:, :, ::s, ::s]  # what the 1x1 (padding 0) scale branch and the skip branch see
    count = x.shape[0] * x_sub.shape[2] * x_sub.shape[3]
    kernels = [b.conv.weight for b in layer.rbr_conv]  # full-size kernels, in the order of bns
    if layer.rbr_scale is not None:
        kernels.append(pad_kernel(layer.rbr_scale.conv.weight, ks))
    if layer.rbr_skip is not None:
        kernels.append(identity_kernel(layer.in_channels, layer.groups, ks, kernels[0]))
    kernels = torch.stack(kernels)  # (B, Cout, Cin / groups, ks, ks)
    centre = kernels[..., ks // 2, ks // 2]  # the 1x1 branches' kernels: (B, Cout, Cin / groups)
    with torch.autocast(x.device.type, enabled=False):
        if layer.groups == 1 and ks == 1:  # every branch from the input's channel covariance
            mean, cov = Moments.apply(x_sub)
            mu, var = covariance_stats(centre[:k], mean, cov)
            if layer.rbr_skip is not None:  # BN of x itself: its statistics are the input's
                mu, var = torch.cat([mu, mean[None]]), torch.cat([var, torch.diagonal(cov)[None]])
        elif layer.groups == 1 and _patch_covariance_pays(layer, count):
            # Every branch from the covariance of the zero-padded input patches the conv reads
            # (``F.unfold``: the same windows, so the border is exact): (N, Cin ks^2, L) as (M, P).
            patches = F.unfold(x, ks, layer.dilation, layer.padding, s)
            mean, cov = Moments.apply(patches.unsqueeze(-1))
            mu, var = covariance_stats(kernels.flatten(2), mean, cov)
        else:
            extra = centre[k:]  # scale and skip: 1x1 kernels, (B - k, Cout, Cin / groups)
            depthwise = layer.groups == layer.in_channels == layer.out_channels
            mu, var = conv_moments(x, kernels[:k], conv)
            mus, variances = [mu], [var]
            if len(extra) and layer.groups == 1:
                mu, var = covariance_stats(extra, *Moments.apply(x_sub))
            elif len(extra) and depthwise:  # a per-channel scale of x_sub: its moments, scaled
                mean_x, var_x = ConvMoments.apply(x, None, conv)
                w = extra[:, :, 0].to(mean_x.dtype)
                mu, var = w * mean_x, w * w * var_x
            elif len(extra):  # other grouped convs: run the 1x1 branches for their statistics
                mu, var = conv_moments(x, extra[..., None, None], (s, 0, 1, layer.groups))
            if len(extra):
                mus.append(mu)
                variances.append(var)
            mu, var = torch.cat(mus), torch.cat(variances)
        _update_running(bns, mu.detach(), var.detach(), count)
        stacked = _StackedBN(torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns]), eps)
        weight, bias = fold_bn(kernels.flatten(0, 1).to(mu.dtype), mu.flatten(), var.flatten(), stacked)
        weight, bias = weight.unflatten(0, (len(bns), -1)).sum(0), bias.view(len(bns), -1).sum(0)
    return conv2d(x, weight.to(x.dtype), bias.to(x.dtype), *conv)
