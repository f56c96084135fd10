"""The picture of a segmenter's predictions that ``mobileone train --task segment`` leaves in the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...core.files import atomic_write
from .data import SegmentationDataset
from .evaluate import predict
from .masks import voc_palette
from .model import IGNORE_INDEX


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices as (H, W, 3) VOC palette colours; ignore pixels white."""
    rgb = voc_palette()[mask]
    rgb[mask == IGNORE_INDEX] = 255
    return rgb


@torch.no_grad()
def draw_predictions(model: nn.Module, dataset: SegmentationDataset, out: Path, n: int = 4) -> Path | None:
    """A picture of ``n`` validation images: the image, its mask, the prediction (and the pixel accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = model.eval().cpu()
    rows = []
    for i in range(min(len(dataset), n * 3)):
        pair = dataset.read(i)
        if pair is None:
            continue
        x, _ = dataset[i]
        pred = predict(model, x[None].float()).argmax(1)[0].numpy().astype(np.uint8)
        rows.append((np.asarray(pair[0]), pair[1], pred))
        if len(rows) == n:
            break
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for r, (image, truth, pred) in enumerate(rows):
        labelled = truth != IGNORE_INDEX
        acc = 100.0 * float((pred[labelled] == truth[labelled]).mean()) if labelled.any() else float("nan")
        for c, (title, panel) in enumerate(
            (("image", image), ("mask", colorize(truth)), (f"prediction ({acc:.0f} % px)", colorize(pred)))
        ):
            axes[r][c].imshow(panel, interpolation="nearest")
            axes[r][c].set_axis_off()
            if r == 0 or c == 2:
                axes[r][c].set_title(title, fontsize=9)
    names = getattr(model, "class_names", None)
    if names:
        fig.suptitle(f"classes: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}", fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out
