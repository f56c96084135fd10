"""From raw outputs to detections: the one post-processing of every head, eager and exported alike."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .config import DetectorConfig


def postprocess(boxes: Tensor, scores: Tensor, config: DetectorConfig) -> list[dict[str, Tensor]]:
    """Per image and class the ``topk_candidates`` best scores above ``score_thresh``, per-class NMS at
    ``nms_thresh``, then the ``max_detections`` best, best first. The ONNX NMS form runs these steps in its graph.

    ``boxes`` (N, A, 4) and ``scores`` (N, A, C) are a detector's ``forward_raw`` outputs (or a raw
    ONNX export's); labels come back 0-based.
    """
    out = []
    k = min(config.topk_candidates, boxes.shape[1])
    for b, s in zip(boxes, scores):
        top, idx = s.t().topk(k, dim=1)  # (C, k)
        keep = top > config.score_thresh
        labels = torch.arange(s.shape[1], device=s.device)[:, None].expand_as(idx)[keep]
        cand_boxes, cand_scores = b[idx[keep]], top[keep]
        order = batched_nms(cand_boxes.float(), cand_scores.float(), labels, config.nms_thresh)[: config.max_detections]
        out.append({"boxes": cand_boxes[order], "scores": cand_scores[order], "labels": labels[order]})
    return out
