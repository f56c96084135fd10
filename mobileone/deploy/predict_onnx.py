"""Predictions of an exported ONNX classifier on image files, preprocessed from the file's own metadata."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..tasks.classification.data import load_image
from ..tasks.classification.predict import image_files, preprocessing, top_k
from .onnx import onnx_session, read_onnx_metadata


def predict_onnx(
    path: str | os.PathLike,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    topk: int = 5,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Like :func:`mobileone.predict`, with onnxruntime running ``path`` (fp32 or INT8) image by image."""
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
    session = onnx_session(path, threads)
    meta = read_onnx_metadata(path)
    inp = session.get_inputs()[0]
    if "input_size" not in meta and isinstance(inp.shape[-1], int):
        meta["input_size"] = [3, inp.shape[-1], inp.shape[-1]]
    transform = preprocessing(meta)
    results: list[dict[str, Any]] = []
    classes = None
    for file in image_files(images):
        try:
            x = transform(load_image(file)).unsqueeze(0)
        except (OSError, ValueError, SyntaxError) as e:
            results.append({"image": str(file), "error": f"unreadable image: {e}"})
            continue
        logits = torch.from_numpy(session.run(None, {inp.name: x.numpy()})[0]).float()
        if not torch.isfinite(logits).all():
            raise ValueError(f"{path} gives NaN or infinite outputs; the model is broken, not used")
        classes = classes or list(meta.get("class_names") or [str(i) for i in range(logits.shape[1])])
        results.append({"image": str(Path(file)), "top": top_k(logits.softmax(1), classes, topk)[0]})
    return results
