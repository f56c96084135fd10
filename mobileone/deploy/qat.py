"""Quantization-aware fine-tuning of the fused model (PT2E ``prepare_qat_pt2e``), for when PTQ still collapses.

The fused graph is captured with ``torch.export``, fake-quantized by the XNNPACK quantizer's QAT
configuration (per-channel int8 weights, int8 activations with moving-average ranges) and fine-tuned
on the task's training data, so the weights learn to live on the int8 grid. The tuned float weights go
back into the fused model, which each runtime's own quantizer then calibrates and converts as in PTQ.
Classification only for now (cross-entropy on an ImageFolder); a plain loop, not the training engine.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..tasks.classify.data import collate_skip_bad
from .common import require
from .evaluate_onnx import image_folder
from .int8 import Graph


def qat_finetune(
    graph: Graph, train_data: str | os.PathLike, epochs: int = 1, lr: float = 1e-3, batch_size: int = 32
) -> Graph:
    """``graph`` with its weights fine-tuned under fake quantization for ``epochs`` on ``train_data``'s train split."""
    if graph.task != "classify":
        raise ValueError(f"--qat fine-tunes classifiers for now; {graph.task} has PTQ and its remedy chain only")
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "executorch")
    xq = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "executorch")
    quantizer = xq.XNNPACKQuantizer().set_global(xq.get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    example = torch.cat([graph.example, graph.example])  # a batch of 2: BatchNorm-free, but keeps the batch dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=1024)
        captured = torch.export.export(graph.module, (example,), dynamic_shapes=({0: batch},)).module()
        model = pt2e.prepare_qat_pt2e(captured, quantizer)
    loader = DataLoader(
        image_folder(train_data, "train", graph.meta), batch_size, shuffle=True, collate_fn=collate_skip_bad
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps, step = epochs * len(loader), 0
    for epoch in range(epochs):
        total, n = 0.0, 0
        for x, y, _ in loader:
            if x is None:
                continue
            for group in opt.param_groups:  # cosine to zero: the tuned weights settle on the grid
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n, step = total + loss.item() * len(y), n + len(y), step + 1
        print(f"qat epoch {epoch + 1}/{epochs}: loss {total / max(n, 1):.4f} on {n} images", file=sys.stderr)
    tuned = {k: v for k, v in model.state_dict().items() if k in graph.module.state_dict()}
    missing = set(graph.module.state_dict()) - set(tuned)
    if missing:
        raise RuntimeError(f"QAT could not map back the weights {sorted(missing)[:5]}")
    graph.module.load_state_dict(tuned)
    return graph
