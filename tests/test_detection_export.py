"""Detector export: the raw and NMS ONNX forms agree with PyTorch in onnxruntime, and the checks catch a mismatch."""

from __future__ import annotations

import copy
import warnings

import onnx
import pytest
import torch

from mobileone import reparameterize_model
from mobileone.deploy.common import ExportError
from mobileone.deploy.detection import (
    check_nms,
    check_raw,
    compare_detections,
    evaluate_onnx_detector,
    export_detector,
)
from mobileone.deploy.onnx import onnx_session, read_onnx_metadata
from mobileone.tasks.detection.model import save_detector
from mobileone.tasks.detection.task import evaluate_detector

from .test_detection_data import tiny_dataset
from .test_detection_model import settle, tiny_detector


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A settled tiny detector, its checkpoint, and both ONNX forms (raw with a dynamic batch)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("export")
    det = settle(tiny_detector(num_classes=2, max_detections=40))
    det.class_names = ["red", "blue"]
    save_detector(det, tmp / "best.safetensors")
    export_detector(det, tmp / "raw.onnx", "raw", dynamic_batch=True, check=False)
    export_detector(det, tmp / "nms.onnx", "nms", check=False, from_raw=tmp / "raw.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = reparameterize_model(det)
    yield det, fused, tmp
    torch.set_num_threads(2)


def test_raw_and_nms_forms_match_pytorch(exported):
    _, fused, tmp = exported
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert "within 1e-4 relative" in check_raw("onnx", tmp / "raw.onnx", fused, x, True)
    assert "the same 120 detections as PyTorch" in check_nms("onnx", tmp / "nms.onnx", fused, x, False)  # 3 x 40
    ops = {n.op_type for n in onnx.load(str(tmp / "nms.onnx")).graph.node}
    assert {"NonMaxSuppression", "TopK"} <= ops and "BatchNormalization" not in ops
    meta = read_onnx_metadata(tmp / "nms.onnx")
    assert meta["form"] == "nms" and meta["class_names"] == ["red", "blue"] and meta["detector"]["max_detections"] == 40
    boxes, scores, labels, count = onnx_session(tmp / "nms.onnx").run(None, {"input": x[:1].numpy()})
    assert boxes.shape == (1, 40, 4) and scores.shape == labels.shape == (1, 40) and count.shape == (1,)
    n = int(count[0])
    assert (labels[0, n:] == -1).all() and (scores[0, n:] == 0).all() and (labels[0, :n] >= 0).all()


def test_checks_catch_a_detector_that_differs(exported):
    _, fused, tmp = exported
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    other = copy.deepcopy(fused)
    with torch.no_grad():
        other.head.regression_head.module_list[0][1].bias.add_(0.01)  # boxes move by a fraction of a pixel
    with pytest.raises(ExportError, match="raw output boxes differs from PyTorch"):
        check_raw("onnx", tmp / "raw.onnx", other, x, True)
    other = copy.deepcopy(fused)
    other.config.nms_thresh = 0.3  # another NMS: other detections
    with pytest.raises(ExportError, match="NMS detections of image 0 differ"):
        check_nms("onnx", tmp / "nms.onnx", other, x, False)


def test_compare_detections_matches_sets_and_allows_only_threshold_ties():
    d = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]]),
        "scores": torch.tensor([0.9, 0.5, 0.3]),
        "labels": torch.tensor([0, 1, 0]),
    }
    shuffled = {k: v[[2, 0, 1]] for k, v in d.items()}
    assert compare_detections(d, shuffled, 0.001, 0.5) == ([], 0)
    missing = {k: v[:2] for k, v in d.items()}
    problems, _ = compare_detections(d, missing, 0.001, 0.5)
    assert problems and "label 0 score 0.30000" in problems[0]
    assert compare_detections(d, missing, 0.001, 0.5, max_detections=3) == ([], 1)  # a tie at the cut-off
    assert compare_detections(d, {**d, "labels": torch.tensor([0, 0, 0])}, 0.001, 0.5)[0]
    assert compare_detections(d, {**d, "scores": d["scores"] + torch.tensor([0, 1e-3, 0])}, 0.001, 0.5)[0]
    at_threshold = {
        "boxes": torch.tensor([[0.0, 0, 10, 10]]),
        "scores": torch.tensor([0.00105]),
        "labels": torch.tensor([0]),
    }
    assert compare_detections(at_threshold, {k: v[:0] for k, v in at_threshold.items()}, 0.001, 0.5) == ([], 1)


def test_onnx_evaluation_equals_pytorch_evaluation(tmp_path, exported):
    _, _, tmp = exported
    data = tiny_dataset(tmp_path / "data")
    ours = evaluate_detector(tmp / "best.safetensors", data)
    assert ours["images"] == 4 and set(ours["per_class"]) == {"red", "blue"}
    for form in ("raw", "nms"):
        result = evaluate_onnx_detector(tmp / f"{form}.onnx", data)
        assert result["images"] == 4 and result["form"] == form
        assert abs(result["map"] - ours["map"]) < 1e-3 and abs(result["map_50"] - ours["map_50"]) < 1e-3


@pytest.mark.slow  # ExecuTorch lowering takes about 20 s
def test_executorch_and_coreml_take_the_raw_form(tmp_path, exported):
    det, _, _ = exported
    report = export_detector(det, tmp_path / "det.pte", "raw", "executorch")
    assert "ExecuTorch" in report.check and "within 1e-4 relative" in report.check
    report = export_detector(det, tmp_path / "det.mlpackage", "raw", "coreml")
    assert "no batch norm" in report.check or "Core ML" in report.check
    with pytest.raises(ValueError, match="the NMS form is for"):
        export_detector(det, tmp_path / "det2.pte", "nms", "executorch")
