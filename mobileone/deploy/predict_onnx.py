"""Exported ONNX models on image files, preprocessed from the files' own metadata: the classifier's top
classes, and detectors and segmenters called as their PyTorch models are (``OnnxModel``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..tasks.classify.data import load_image
from ..tasks.classify.predict import preprocessing, top_k
from ..tasks.detect.model import DetectorConfig, postprocess
from ..tasks.images import image_files
from .onnx import onnx_session, require_onnx_task


def predict_onnx(
    path: str | os.PathLike,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    topk: int = 5,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Like :func:`mobileone.predict`, with onnxruntime running ``path`` (fp32 or INT8) image by image."""
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
    meta = require_onnx_task(path, "classify")
    session = onnx_session(path, threads)
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


class OnnxModel:
    """An exported detector or segmenter in onnxruntime, called as the PyTorch model's eval forward is.

    Detectors (raw or NMS form) return one dict of ``boxes`` / ``scores`` / ``labels`` per image,
    segmenters ``{"out": logits}``; ``preprocess`` and ``class_names`` come from the file's metadata.
    """

    def __init__(self, path: str | os.PathLike, task: str, threads: int | None = None) -> None:
        self.path, self.task = Path(path), task
        self.meta = require_onnx_task(path, task)
        self.session = onnx_session(path, threads)
        inp = self.session.get_inputs()[0]
        self.input, self.fixed_batch = inp.name, inp.shape[0] if isinstance(inp.shape[0], int) else None
        size = self.meta.get("input_size", [3, 320, 320])[-1]
        self.preprocess = {"mean": self.meta["mean"], "std": self.meta["std"], "input_size": size}
        self.class_names = self.meta.get("class_names")

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        chunks = x.split(self.fixed_batch) if self.fixed_batch else [x]
        runs = [self.session.run(None, {self.input: c.numpy()}) for c in chunks]
        return [torch.cat([torch.from_numpy(r[i]) for r in runs]) for i in range(len(runs[0]))]

    def __call__(self, x: torch.Tensor) -> Any:
        outs = self._run(x)
        if self.task == "segment":
            return {"out": outs[0]}
        if self.meta.get("form") == "raw":
            return postprocess(outs[0], outs[1], DetectorConfig.from_dict(self.meta["detector"]))
        boxes, scores, labels, counts = outs[:4]
        return [
            {"boxes": b[:n], "scores": s[:n], "labels": lab[:n]}
            for b, s, lab, n in zip(boxes, scores, labels, counts.tolist())
        ]
