"""MobileOne (Vasu et al., arXiv 2206.04040): the re-parameterizable layer and the net.

Module and attribute names follow Apple's reference code, because they are the checkpoint format
users hold (docs/architecture.md, "Checkpoint layouts"). In the paper's terms:

- ``rbr_conv``: the ``k`` over-parameterized conv+BN branches,
- ``rbr_scale``: the 1x1 conv+BN "scale" branch of layers whose kernel is larger than 1x1,
- ``rbr_skip``: the BN-only skip (identity) branch,
- ``reparam_conv``: the single conv all branches fold into at inference,
- ``stage0`` is the stem; ``stage1..4`` are flat sequences of layers (depthwise, pointwise, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import branch_stats
from . import fast_train as _fast_train
from .config import IMAGENET_MEAN, IMAGENET_STD, MobileOneConfig
from .fusion import fuse_branches, identity_kernel, pad_kernel


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as in Apple's ``SEBlock`` (reduction 1/16, ReLU, sigmoid)."""

    def __init__(self, channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = max(1, int(channels * rd_ratio))  # at least one channel for very narrow custom nets
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class ConvBN(nn.Sequential):
    """A conv without bias followed by BatchNorm: one train-time branch (keys ``conv.*``, ``bn.*``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, dilation: int, groups: int) -> None:
        super().__init__()
        padding = dilation * (kernel_size // 2) if kernel_size > 1 else 0
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        if branch_stats.hits_strided_1x1_bug(x, c.weight, c.stride[0], c.padding[0]):
            # PyTorch's CPU weight gradient of strided 1x1 convs is broken: the same conv at unit stride
            # (forward hooks on ``conv`` do not run there).
            return self.bn(branch_stats.conv2d(x, c.weight, c.bias, c.stride[0], 0, c.dilation[0], c.groups))
        return self.bn(c(x))


class MobileOneLayer(nn.Module):
    """One MobileOne layer: ``act(se(sum of k conv branches + scale branch + skip branch))``.

    Apple calls this ``MobileOneBlock``; a paper "block" is a depthwise and a pointwise layer.
    Unlike Apple's code, dilation reaches every branch, and fusion keeps parameters trainable.
    In train mode the branches run through ``fast_train.branch_sum`` (same math, fewer kernels)
    unless ``fast_train`` is False here or ``mobileone.reference_mode()`` is active.
    """

    fast_train: bool = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        k: int = 1,
        use_se: bool = False,
        scale_branch: bool = True,
        skip: bool | None = None,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.dilation, self.groups, self.k = stride, dilation, groups, k
        self.padding = dilation * (kernel_size // 2)
        self.inference_mode = inference_mode
        self.se = SqueezeExcite(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        if skip is None:
            skip = in_channels == out_channels and stride == 1
        if inference_mode:
            self.reparam_conv = self._conv(kernel_size, bias=True)
            return
        if skip and in_channels != out_channels:
            raise ValueError("a skip branch needs in_channels == out_channels")
        self.rbr_skip = nn.BatchNorm2d(in_channels) if skip else None
        self.rbr_conv = nn.ModuleList(
            ConvBN(in_channels, out_channels, kernel_size, stride, dilation, groups) for _ in range(k)
        )
        has_scale = scale_branch and kernel_size > 1
        self.rbr_scale = ConvBN(in_channels, out_channels, 1, stride, 1, groups) if has_scale else None

    def _conv(self, kernel_size: int, bias: bool) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=bias,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        if self.training and self.fast_train and _fast_train.fast_train_enabled():
            return self.activation(self.se(_fast_train.branch_sum(self, x)))
        return self.activation(self.se(self.forward_branches(x)))

    def forward_branches(self, x: Tensor) -> Tensor:
        """The reference per-branch sum, as in Apple's code (before SE and activation)."""
        out = self.rbr_skip(x) if self.rbr_skip is not None else 0
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        return out

    def branches(self) -> list[tuple[Tensor, nn.BatchNorm2d]]:
        """Every branch as (full-size kernel, its BatchNorm): the input to the fusion math."""
        ks = self.kernel_size
        out = [(b.conv.weight, b.bn) for b in self.rbr_conv]
        if self.rbr_scale is not None:
            out.append((pad_kernel(self.rbr_scale.conv.weight, ks), self.rbr_scale.bn))
        if self.rbr_skip is not None:
            out.append(
                (identity_kernel(self.in_channels, self.groups, ks, self.rbr_conv[0].conv.weight), self.rbr_skip)
            )
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold all branches into ``reparam_conv`` using the BN running statistics (idempotent)."""
        if self.inference_mode:
            return
        weight, bias = fuse_branches(self.branches())
        conv = self._conv(self.kernel_size, bias=True).to(weight.device, weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.reparam_conv = conv
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.inference_mode = True

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, groups={self.groups}, k={self.k}, inference_mode={self.inference_mode}"
        )


class MobileOne(nn.Module):
    """The MobileOne network: a stem layer, four stages of depthwise/pointwise layers, a linear head.

    ``forward_features`` gives the stride-32 map, ``forward_head`` the logits, and with
    ``features_only=True`` the forward returns the maps of ``out_indices`` (strides 2..32 are
    indices 0..4) for detection and segmentation heads; ``feature_info`` lists their channels.
    """

    def __init__(
        self,
        config: MobileOneConfig,
        num_classes: int = 1000,
        inference_mode: bool = False,
        in_chans: int = 3,
        features_only: bool = False,
        out_indices: tuple[int, ...] = (0, 1, 2, 3, 4),
        variant: str | None = None,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate (dropout before the classifier) must be in [0, 1), got {drop_rate!r}")
        if not out_indices or any(i not in range(5) for i in out_indices):
            raise ValueError(f"out_indices must be within 0..4 (strides 2, 4, 8, 16, 32), got {out_indices}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be an int >= 1 (3 for RGB), got {in_chans!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 removes the head), got {num_classes!r}")
        self.config, self.variant, self.in_chans, self.drop_rate = config, variant, in_chans, drop_rate
        self.features_only, self.out_indices = features_only, tuple(out_indices)
        self.class_names: list[str] | None = None
        self.frozen_stages = 0
        self.preprocess = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": 224, "crop_pct": 0.875}
        c = config
        self.stage0 = MobileOneLayer(
            in_chans,
            c.stem_width,
            3,
            stride=2,
            k=c.stem_k,
            scale_branch=c.scale_branch,
            skip=False,
            inference_mode=inference_mode,
        )
        # Strides of stages 1-4; with output_stride < 32 the last ones become dilations.
        n_dilated = {32: 0, 16: 1, 8: 2}[c.output_stride]
        self.feature_info = [{"num_chs": c.stem_width, "reduction": 2, "module": "stage0"}]
        cin, reduction, dilation = c.stem_width, 2, 1
        for s in range(4):
            dilated = s >= 4 - n_dilated
            dilation = dilation * 2 if dilated else dilation
            reduction = reduction if dilated else reduction * 2
            stage = self._make_stage(cin, c.widths[s], s, 1 if dilated else 2, dilation, inference_mode)
            setattr(self, f"stage{s + 1}", stage)
            self.feature_info.append({"num_chs": c.widths[s], "reduction": reduction, "module": f"stage{s + 1}"})
            cin = c.widths[s]
        self.num_features = cin
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.num_classes = 0 if features_only else num_classes
        self.linear = nn.Linear(cin, self.num_classes) if self.num_classes > 0 else nn.Identity()
        if features_only:
            self.feature_info = [self.feature_info[i] for i in self.out_indices]

    def _make_stage(
        self, cin: int, cout: int, s: int, stride: int, dilation: int, inference_mode: bool
    ) -> nn.Sequential:
        c, layers = self.config, []
        n = c.blocks[s]
        for b in range(n):
            first = b == 0
            se = b >= n - c.se_blocks[s]
            common = {"k": c.k[s], "use_se": se, "scale_branch": c.scale_branch, "inference_mode": inference_mode}
            # The skip branch depends on the nominal stride, so dilated models load the same checkpoints.
            skip = c.skip_branch and not first
            layers.append(
                MobileOneLayer(cin, cin, 3, stride if first else 1, dilation, groups=cin, skip=skip, **common)
            )
            layers.append(MobileOneLayer(cin, cout, 1, 1, 1, skip=c.skip_branch and cin == cout, **common))
            cin = cout
        return nn.Sequential(*layers)

    @property
    def inference_mode(self) -> bool:
        """Whether every layer is fused (one conv each): the deployed graph."""
        return all(layer.inference_mode for layer in self.layers())

    @property
    def stages(self) -> list[nn.Module]:
        return [self.stage0, self.stage1, self.stage2, self.stage3, self.stage4]

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            hint = " (add a batch dimension with x.unsqueeze(0))" if x.ndim == 3 else ""
            raise ValueError(
                f"MobileOne expects a float batch shaped (N, {self.in_chans}, H, W), got shape {tuple(x.shape)}{hint}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        self._check_input(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_intermediates(self, x: Tensor, indices: tuple[int, ...] | None = None) -> list[Tensor]:
        """Feature maps after the stages in ``indices`` (0 = stem, stride 2; 4 = stride 32)."""
        self._check_input(x)
        indices = self.out_indices if indices is None else tuple(indices)
        out = []
        for i, stage in enumerate(self.stages[: max(indices) + 1]):
            x = stage(x)
            if i in indices:
                out.append(x)
        return out

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(self.gap(x), 1)
        if pre_logits:
            return x
        return self.linear(F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (``num_classes=0`` removes it), e.g. to fine-tune on new classes."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 removes the head), got {num_classes!r}")
        self.num_classes = num_classes
        self.class_names = None
        p = next(self.parameters())
        self.linear = (
            nn.Linear(self.num_features, num_classes).to(p.device, p.dtype) if num_classes > 0 else nn.Identity()
        )

    def freeze_stages(self, n: int) -> None:
        """Stop gradients and BN statistic updates in ``stage0 .. stage{n-1}`` (mmpretrain's frozen_stages).

        ``n`` counts the stem as a stage: 0 freezes nothing, 5 the whole backbone.
        """
        if not isinstance(n, int) or not 0 <= n <= len(self.stages):
            raise ValueError(f"freeze_stages takes 0..{len(self.stages)} (the stem and stages 1-4), got {n!r}")
        for stage in self.stages[:n]:
            stage.eval()
            for p in stage.parameters():
                p.requires_grad_(False)
        self.frozen_stages = n

    def train(self, mode: bool = True) -> MobileOne:
        super().train(mode)
        for stage in self.stages[: self.frozen_stages]:
            stage.eval()
        return self

    def layers(self) -> list[MobileOneLayer]:
        return [m for m in self.modules() if isinstance(m, MobileOneLayer)]


def set_fast_train(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the fast train path on or off for the MobileOne layers of one model (returns the model)."""
    layers = [m for m in model.modules() if isinstance(m, MobileOneLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no MobileOne layers to switch")
    for layer in layers:
        layer.fast_train = enabled
    return model


# E[relu(z)] / std(relu(z)) for z ~ N(0, 1): a skip BN shifted by this maps a post-ReLU input
# (all >= 0) to values >= 0, so the ReLU after the branch sum lets the skip path through whole.
RELU_PASS_SHIFT = 0.6833


@torch.no_grad()
def init_branches(
    model: nn.Module, scheme: str = "identity", conv_gamma: float = 0.0, skip_shift: float = RELU_PASS_SHIFT
) -> nn.Module:
    """Set the branch BatchNorms so that the deep plain stack of MobileOne layers starts trainable.

    With PyTorch's defaults (every BN scale 1, shift 0) a layer outputs the sum of up to k + 2
    unit-variance branches and the gradient grows layer by layer towards the input: at init, S0's
    stem gets relative gradients ~800x those of its last stage, and short runs under-fit
    (``experiments/underfit.py``, README "Why S0 under-fits short runs"). Fusion is unaffected:
    this only chooses where training starts, so call it on a fresh model, before training.

    - ``"torch"``: leave the defaults (the paper's setting; Apple's checkpoints were trained so).
    - ``"unit-sum"``: every branch scale 1/sqrt(n) for n branches, so the sum has unit variance.
    - ``"identity"`` (the short recipe's default): layers with a skip branch start as
      the identity: skip BN scale 1 and shift ``skip_shift``, conv and scale branches scale
      ``conv_gamma``; layers without a skip branch (stem, downsampling) get ``"unit-sum"``.
    """
    if scheme not in ("torch", "unit-sum", "identity"):
        raise ValueError(f"init scheme must be torch, unit-sum or identity, got {scheme!r}")
    if scheme == "torch":
        return model
    for layer in model.modules():
        if not isinstance(layer, MobileOneLayer) or layer.inference_mode:
            continue
        bns = [bn for _, bn in layer.branches()]
        if scheme == "identity" and layer.rbr_skip is not None:
            for bn in bns:
                bn.weight.fill_(1.0 if bn is layer.rbr_skip else conv_gamma)
            layer.rbr_skip.bias.fill_(skip_shift)
        else:
            for bn in bns:
                bn.weight.fill_(1.0 / math.sqrt(len(bns)))
    return model
