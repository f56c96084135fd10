"""The batch statistics of MobileOne branches, with backward passes cheaper than autograd's.

The fast train path (``fast_train.py``, docs/fast-train.md) needs each branch's batch mean and
variance, never its output: these autograd Functions compute them from the input's moments, a
conv's output moments, or quadratic forms of a covariance, each with a hand-written backward that
reads its input once. :func:`conv2d` holds the workaround for PyTorch's broken CPU weight gradient
of strided 1x1 convs, used here, on the fast path and by the per-branch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hits_strided_1x1_bug(x: Tensor, weight: Tensor, stride: int, padding: int) -> bool:
    """Whether ``conv2d(x, weight)`` would take PyTorch's broken CPU weight gradient for strided 1x1 convs.

    PyTorch's CPU weight gradient of a strided 1x1 conv (oneDNN's ``jit_1x1:avx2`` backward-weights
    kernel, on CPUs without AVX-512, channels_last input, few input channels) writes out of bounds:
    wrong gradients with 2 threads, heap corruption and aborts with 1 (docs/fast-train.md, section 6).
    Seen in torch 2.12.1, 2.13.0 and 2.15.0, the newest release when checked; reproduced by
    ``experiments/torch_conv_bug.py``. Which shapes it hits depends on the CPU, so every strided
    1x1 conv on CPU whose weight gradient is taken counts.
    """
    return (
        x.device.type == "cpu"
        and weight.shape[-1] == weight.shape[-2] == 1
        and stride > 1
        and padding == 0
        and weight.requires_grad
        and torch.is_grad_enabled()
    )


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d`` (square int geometry) that avoids PyTorch's strided 1x1 bug (:func:`hits_strided_1x1_bug`).

    A 1x1 conv without padding reads only every ``stride``-th row and column, so there it runs as
    the unit-stride conv of that subsampled input: the same function, without the broken kernel.
    """
    if hits_strided_1x1_bug(x, weight, stride, padding):
        x, stride = x[:, :, ::stride, ::stride], 1
    if (
        weight.requires_grad
        and torch.is_grad_enabled()
        and _slow_strided_depthwise(x, weight, (stride, padding, dilation, groups), compute_dtype(x))
    ):
        return StridedDepthwiseConv.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class StridedDepthwiseConv(torch.autograd.Function):
    """A depthwise 3x3 conv of stride 2 and padding 1 in bf16 / fp16 on CPU, its input gradient by
    :func:`strided_depthwise_input_grad` (PyTorch's own takes 10-40x the float32 time there)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        low = compute_dtype(x)
        x, w = x.to(low), weight.to(low)
        with torch.autocast(x.device.type, enabled=False):
            out = F.conv2d(x, w, None if bias is None else bias.to(low), 2, 1, 1, x.shape[1])
        ctx.save_for_backward(x, w)
        ctx.weight_dtype, ctx.has_bias = weight.dtype, bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        dy = dy.to(x.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad
        dx, dw = conv_backward(dy, x, w, (2, 1, 1, x.shape[1]), need_x, need_w)
        db = dy.sum((0, 2, 3), dtype=torch.float32).to(ctx.weight_dtype) if need_b and ctx.has_bias else None
        return dx, None if dw is None else dw.to(ctx.weight_dtype), db


class FastStridedDepthwise(nn.Conv2d):
    """``nn.Conv2d`` that trains a bf16 / fp16 depthwise 3x3 stride-2 conv on CPU by :func:`conv2d`; the same
    parameters and state dict, and plain ``nn.Conv2d`` in eval mode (what exports)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0], self.dilation[0], self.groups)


def use_fast_strided_depthwise(model: nn.Module) -> nn.Module:
    """Turn ``model``'s depthwise 3x3 stride-2 ``nn.Conv2d`` layers into :class:`FastStridedDepthwise` in place."""
    for m in model.modules():
        if (
            type(m) is nn.Conv2d
            and m.groups == m.in_channels == m.out_channels
            and m.kernel_size == (3, 3)
            and m.stride == (2, 2)
            and m.padding == (1, 1)
            and m.dilation == (1, 1)
        ):
            m.__class__ = FastStridedDepthwise
    return model


def conv_backward(
    dz: Tensor, x: Tensor, weight: Tensor, conv: tuple[int, int, int, int], need_x: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of a bias-free ``(stride, padding, dilation, groups)`` conv; None where not needed."""
    stride, padding, dilation, groups = conv
    phases = need_x and _slow_strided_depthwise(x, weight, conv, x.dtype)
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dz,
        x,
        weight,
        None,
        [stride] * 2,
        [padding] * 2,
        [dilation] * 2,
        False,
        [0, 0],
        groups,
        [need_x and not phases, need_w, False],
    )
    if phases:
        dx = strided_depthwise_input_grad(dz, weight, x.shape[-2:])
    return dx, dw


def _slow_strided_depthwise(x: Tensor, weight: Tensor, conv: tuple[int, int, int, int], dtype: torch.dtype) -> bool:
    """A depthwise 3x3 conv of stride 2 on CPU computed in bf16 / fp16 (``dtype``), whose input gradient PyTorch
    takes 10-40x the float32 time for (oneDNN's transposed depthwise kernel): :func:`strided_depthwise_input_grad`."""
    stride, padding, dilation, groups = conv
    return (
        x.device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and groups == x.shape[1] == weight.shape[0]
        and tuple(weight.shape[1:]) == (1, 3, 3)
        and (stride, padding, dilation) == (2, 1, 1)
    )


def strided_depthwise_input_grad(dy: Tensor, weight: Tensor, size: torch.Size) -> Tensor:
    """The input gradient of a depthwise 3x3 conv of stride 2 and padding 1, as four stride-1 convs of ``dy``.

    Input pixel ``(2r + a, 2c + b)`` is read by taps ``i = 1`` (row ``r`` of the output) when ``a = 0``,
    by ``i = 2`` (row ``r``) and ``i = 0`` (row ``r + 1``) when ``a = 1``; the same for columns. Each of
    the four parities is thus a depthwise conv of ``dy`` (zero-padded by one row and column at the
    end) with a 1x1, 1x2, 2x1 or 2x2 kernel taken from ``weight``, written into its strided view.
    """
    (height, width), channels = size, weight.shape[0]
    w = weight[:, 0]
    dx = torch.empty(
        (dy.shape[0], channels, height, width),
        dtype=dy.dtype,
        device=dy.device,
        memory_format=torch.channels_last if channels_last(dy) else torch.contiguous_format,
    )
    padded = F.pad(dy, (0, 1, 0, 1))
    taps = {0: [1], 1: [2, 0]}  # for a parity: the kernel rows (columns) read from output row r, then r + 1
    for a in (0, 1):
        for b in (0, 1):
            rows, cols = (height - a + 1) // 2, (width - b + 1) // 2
            if rows == 0 or cols == 0:
                continue
            kernel = w[:, taps[a]][:, :, taps[b]].unsqueeze(1)  # (C, 1, len(rows), len(cols))
            source = padded[:, :, : rows + len(taps[a]) - 1, : cols + len(taps[b]) - 1]
            dx[:, :, a::2, b::2] = F.conv2d(source, kernel, None, 1, 0, 1, channels)
    return dx


class Moments(torch.autograd.Function):
    """Per-channel mean and centred channel covariance of ``x`` over (N, H, W), with a cheap backward.

    Autograd through ``xc @ xc.T`` would run two matmuls in the backward pass; the covariance is
    symmetric in its two factors, so one suffices: ``dx = G (x - m) + dmean / M`` with
    ``G = (dS + dS^T) / M``, computed as ``G x`` plus a per-channel constant so that ``x`` is read
    once. The mean's own effect on the centred covariance has zero derivative. Channels-last input
    is used as the (M, C) matrix it already is. Computed in float32 (float64 for float64 input)
    whatever the input's dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        xf = x.to(stats_dtype(x.dtype))
        if channels_last(x):
            rows = xf.permute(0, 2, 3, 1).reshape(-1, c)  # a view: (M, C)
            mean = rows.mean(0)
            centred = (rows - mean).t()
        else:
            mean = xf.mean((0, 2, 3))
            rows_first = xf.reshape(n, c, h * w).transpose(0, 1)
            if torch.compiler.is_compiling():  # traced, out= takes the transposed strides and .view fails
                centred = (rows_first - mean[:, None, None]).reshape(c, -1)
            else:  # eager: one pass into a buffer laid out as (C, N * H * W)
                centred = torch.empty(c, n, h * w, dtype=xf.dtype, device=x.device)
                torch.sub(rows_first, mean[:, None, None], out=centred)
                centred = centred.view(c, -1)
        cov = torch.mm(centred, centred.t()).div_(centred.shape[1])
        ctx.save_for_backward(x if ctx.needs_input_grad[0] else None, mean)
        return mean, cov

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean: Tensor, grad_cov: Tensor) -> Tensor:
        x, mean = ctx.saved_tensors
        n, c, h, w = x.shape
        count = n * h * w
        sym = (grad_cov + grad_cov.t()).div_(count)
        const = grad_mean / count - sym @ mean
        xf = x.to(mean.dtype)
        if channels_last(x):
            grad = torch.addmm(const, xf.permute(0, 2, 3, 1).reshape(-1, c), sym)  # sym is symmetric
            return grad.view(n, h, w, c).permute(0, 3, 1, 2).to(x.dtype)
        grad = torch.matmul(sym, xf.reshape(n, c, h * w)).add_(const[:, None])
        return grad.view(n, c, h, w).to(x.dtype)


def channels_last(x: Tensor) -> bool:
    """Channels-last layout proper (a tensor with one channel or 1x1 pixels counts as contiguous)."""
    return x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and x.is_contiguous(memory_format=torch.channels_last)


class ConvMoments(torch.autograd.Function):
    """Batch mean and biased variance per output channel of ``conv(x, kernels[j])`` for each j.

    The convs' outputs are kept for the backward pass, which needs only
    ``dz = dmean / M + 2 dvar (z - mean) / M`` and one conv backward per kernel.
    ``kernels=None`` takes the statistics of ``x[:, :, ::stride, ::stride]`` itself (BN-only branches).
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernels: Tensor | None, conv: tuple) -> tuple[Tensor, Tensor]:
        stride, padding, dilation, groups = conv
        ctx.conv = conv
        outputs, means, variances = [], [], []
        for w in [None] if kernels is None else kernels.to(x.dtype).unbind(0):
            z = x[:, :, ::stride, ::stride] if w is None else F.conv2d(x, w, None, stride, padding, dilation, groups)
            mean, var = batch_moments(z)
            if w is not None:
                outputs.append(z)
            means.append(mean)
            variances.append(var)
        means = torch.stack(means)
        ctx.save_for_backward(x, kernels, means, *outputs)
        return means, torch.stack(variances)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean: Tensor, grad_var: Tensor) -> tuple[Tensor | None, ...]:
        x, kernels, means, *outputs = ctx.saved_tensors
        stride = ctx.conv[0]
        x_sub = x[:, :, ::stride, ::stride]
        count = x.shape[0] * x_sub.shape[2] * x_sub.shape[3]
        beta = 2 * grad_var / count
        alpha = grad_mean / count - beta * means
        shift, slope = alpha[:, None, :, None, None], beta[:, None, :, None, None]  # (B, 1, C, 1, 1)
        need_x, need_k = ctx.needs_input_grad[:2]
        if kernels is None:
            if not need_x:
                return None, None, None
            dz = torch.addcmul(shift[0], x_sub.to(beta.dtype), slope[0]).to(x.dtype)
            if stride == 1:
                return dz, None, None
            grad_x = torch.zeros_like(x)
            grad_x[:, :, ::stride, ::stride] = dz
            return grad_x, None, None
        grad_x = None
        grad_k = torch.empty_like(kernels) if need_k else None
        for j, z in enumerate(outputs):
            dz = torch.addcmul(shift[j], z.to(beta.dtype), slope[j]).to(x.dtype)
            dx, dw = conv_backward(dz, x, kernels[j].to(x.dtype), ctx.conv, need_x, need_k)
            if dx is not None:
                grad_x = dx if grad_x is None else grad_x.add_(dx)
            if dw is not None:
                grad_k[j] = dw
        return grad_x, grad_k, None


def conv_moments(x: Tensor, kernels: Tensor, conv: tuple) -> tuple[Tensor, Tensor]:
    """:class:`ConvMoments` of ``conv(x, kernels[j])``; strided 1x1 kernels run at unit stride (:func:`conv2d`)."""
    stride, padding, dilation, groups = conv
    if hits_strided_1x1_bug(x, kernels, stride, padding):
        x, conv = x[:, :, ::stride, ::stride], (1, padding, dilation, groups)
    return ConvMoments.apply(x, kernels, conv)


def batch_moments(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of ``z``, in float32 (float64 for float64 input).

    On CPU ``batch_norm_update_stats`` gives them in one pass without writing a normalized copy; for
    bf16 / fp16 input, given float32 running buffers (scratch here), it accumulates and returns
    float32 without a float32 copy of ``z``.
    """
    if z.device.type == "cpu":
        if z.dtype in (torch.float32, torch.float64):
            return torch.batch_norm_update_stats(z, None, None, 0.0)
        scratch = torch.zeros(z.shape[1], dtype=torch.float32)
        return torch.batch_norm_update_stats(z, scratch, torch.ones_like(scratch), 1.0)
    z = z.to(stats_dtype(z.dtype))
    var, mean = torch.var_mean(z, (0, 2, 3), correction=0)
    return mean, var


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a conv on ``x`` runs in: autocast's where it is on for ``x``'s device, else ``x``'s own."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class QuadraticForms(torch.autograd.Function):
    """``v[b, o] = w_bo^T S w_bo`` for kernels ``W`` (B, Cout, Cin) and a symmetric ``S``: the branch variances.

    Autograd would spend two matmuls on the backward pass; with ``S`` symmetric one does:
    ``dW = 2 g * (W S)`` (kept from the forward pass) and ``dS = (g * W)^T W``.
    """

    @staticmethod
    def forward(ctx, kernels: Tensor, cov: Tensor) -> Tensor:
        ws = kernels @ cov
        ctx.save_for_backward(kernels, ws)
        return (ws * kernels).sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        kernels, ws = ctx.saved_tensors
        grad = grad[..., None]
        flat = kernels.flatten(0, 1)
        return 2 * grad * ws, (grad * kernels).flatten(0, 1).t() @ flat


def covariance_stats(kernels: Tensor, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``W m`` and variance ``diag(W S W^T)`` of 1x1 dense branches (kernels: (B, Cout, Cin))."""
    kernels = kernels.to(cov.dtype)
    return kernels @ mean, QuadraticForms.apply(kernels, cov)


class ConvNormPlusAffine(torch.autograd.Function):
    """``BN(conv(x, W)) + sum_e BN_e(w_e x_s)``: a k = 1 layer whose other branches are per-channel.

    ``x_s = x[:, :, ::stride, ::stride]`` is what a 1x1 scale branch (depthwise weights ``w_e``) and
    the BN-only skip (``w_e = 1``) see. The sum is ``A (z - mean_z) + B (x_s - mean_x) + bias`` with
    per-channel ``A = g / sqrt(var_z + eps)``, ``B = sum_e g_e w_e / sqrt(w_e^2 var_x + eps)``: the
    conv runs once, no branch runs for its statistics alone. The backward pass reads ``z`` and
    ``x_s`` once each for their reductions (PyTorch's batch-norm backward kernel), runs the conv's
    backward and adds ``x_s``'s share (``B dy + kappa (x_s - mean_x)`` plus a constant, ``kappa``
    from ``B``'s dependence on ``var_x``) into its input gradient in place. Also returns the batch
    mean and variance of ``z`` and of ``x_s`` for the running statistics. Under autocast the conv, ``y``
    and what backward keeps are in autocast's dtype (``x`` is cast to it); the statistics and the
    per-channel coefficients are float32, rounded to that dtype only where they scale a tensor.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        conv: tuple,
        g: Tensor,
        b: Tensor,
        ws: Tensor,
        gs: Tensor,
        bs: Tensor,
        eps: float,
    ):
        stride, padding, dilation, groups = conv
        low = compute_dtype(x)  # autocast's dtype (bf16 / fp16) or the input's own
        x = x.to(low)
        with torch.autocast(x.device.type, enabled=False):
            z = F.conv2d(x, weight.to(low), None, stride, padding, dilation, groups)
            x_s = x[:, :, ::stride, ::stride]
            mean_x, var_x = batch_moments(x_s)
            inv_e = torch.rsqrt(ws * ws * var_x + eps)  # (E, C)
            bx = (gs * ws * inv_e).sum(0)
            if z.dtype in (torch.float32, torch.float64):
                mean_z, var_z = batch_moments(z)
                inv_z = torch.rsqrt(var_z + eps)
                a = g * inv_z
                shift = b + bs.sum(0) - a * mean_z - bx * mean_x
                y = torch.addcmul(shift[:, None, None], z, a[:, None, None])
            else:  # bf16 / fp16: PyTorch's batch norm takes float32 parameters and statistics over them at full speed
                y, mean_z, inv_z = torch.native_batch_norm(
                    z, g, b + bs.sum(0) - bx * mean_x, None, None, True, 0.0, eps
                )
                var_z = inv_z.pow(-2) - eps
            y.addcmul_(x_s, bx[:, None, None].to(y.dtype))
        ctx.eps, ctx.conv = eps, conv
        ctx.save_for_backward(x, weight, z, g, ws, gs, mean_z, inv_z, mean_x, inv_e, bx)
        ctx.mark_non_differentiable(mean_z, var_z, mean_x, var_x)
        return y, mean_z, var_z, mean_x, var_x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, z, g, ws, gs, mean_z, inv_z, mean_x, inv_e, bx = ctx.saved_tensors
        need_x, need_w, _, need_g, need_b, need_ws, need_gs, need_bs = ctx.needs_input_grad[:8]
        stride = ctx.conv[0]
        x_s = x[:, :, ::stride, ::stride]
        count = z.shape[0] * z.shape[2] * z.shape[3]
        dy = dy.to(z.dtype)
        dy = dy.contiguous(memory_format=torch.channels_last) if channels_last(z) else dy.contiguous()
        dz, dg, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, z, g, None, None, mean_z, inv_z, True, ctx.eps, [need_x or need_w, True, True]
        )
        _, sum_dyx, _ = torch.ops.aten.native_batch_norm_backward(
            dy, x_s, None, None, None, mean_x, torch.ones_like(mean_x), True, ctx.eps, [False, True, False]
        )  # sum(dy (x_s - mean_x))
        dx, dw = None, None
        if need_x or need_w:
            dx, dw = conv_backward(dz, x, weight.to(x.dtype), ctx.conv, need_x, need_w)
            dw = dw.to(weight.dtype) if dw is not None else None
        if need_x:  # x_s's share; d var_x / dx_s = 2 (x_s - mean_x) / M, d inv_e / d var_x = -w^2 inv_e^3 / 2
            kappa = (-1.0 / count) * sum_dyx * (gs * ws.pow(3) * inv_e.pow(3)).sum(0)
            const = -bx * sum_dy / count - kappa * mean_x
            share = dx[:, :, ::stride, ::stride]
            bx, kappa, const = (t[:, None, None].to(dx.dtype) for t in (bx, kappa, const))
            share.addcmul_(dy, bx).addcmul_(x_s, kappa).add_(const)
        dws = gs * sum_dyx * ctx.eps * inv_e.pow(3) if need_ws else None  # d(w / sqrt(w^2 v + eps)) / dw
        dgs = ws * inv_e * sum_dyx if need_gs else None
        dbs = sum_dy.expand_as(gs) if need_bs else None
        return dx, dw, None, dg if need_g else None, sum_dy if need_b else None, dws, dgs, dbs, None
