"""Detector export: the raw and NMS ONNX forms agree with PyTorch in onnxruntime, and the checks catch a mismatch."""

from __future__ import annotations

import copy
import warnings

import onnx
import pytest
import torch

from mobileone import reparameterize_model
from mobileone.deploy.common import ExportError
from mobileone.deploy.detect import (
    check_nms,
    check_raw,
    compare_detections,
    evaluate_onnx_detector,
    export_detector,
)
from mobileone.deploy.onnx import onnx_session, read_onnx_metadata
from mobileone.tasks.detect.evaluate import evaluate_detector
from mobileone.tasks.detect.model import save_detector

from .test_detect_data import tiny_dataset
from .test_detect_model import settle, tiny_detector


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


class _Broken(torch.nn.Module):
    """A detector's raw graph with one deliberate bug: what the export check must refuse."""

    def __init__(self, detector, bug: str) -> None:
        super().__init__()
        self.detector, self.bug = detector, bug

    def forward(self, x):
        boxes, scores = self.detector.forward_raw(x)
        if self.bug == "swapped coordinates":
            return boxes[..., [1, 0, 3, 2]], scores
        if self.bug == "class offset":
            return boxes, scores.roll(1, dims=-1)
        return boxes * 1.05, scores  # a wrong box decoding


def _export_nms(module, det, path, size):
    from mobileone.deploy.detect import RAW_OUTPUTS
    from mobileone.deploy.onnx import to_onnx
    from mobileone.deploy.onnx_nms import add_nms

    example = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        to_onnx(module.eval(), path, example, output_names=RAW_OUTPUTS)
        points = det.forward_raw(example)[0].shape[1]
    proto, c = onnx.load(str(path)), det.config
    add_nms(proto, points, c.num_classes, c.topk_candidates, c.nms_thresh, c.score_thresh, c.max_detections)
    onnx.save(proto, str(path))


@pytest.mark.slow
def test_dense_scene_export_passes_its_check_and_broken_graphs_fail(tmp_path, one_thread):
    from .test_detect_tal import tiny_tal

    size = 128
    det = tiny_tal(num_classes=3, img_size=size, box_prior=10.0, topk_candidates=1000).train()
    with torch.no_grad():
        for head in det.heads:  # scores spread as a trained detector's, not all at the prior
            head.cls[-1].weight.normal_(0, 0.3)
        for _ in range(3):
            det.head_outputs(torch.randn(4, 3, size, size))
    det.eval()
    fused = reparameterize_model(det)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    assert min(len(d["scores"]) for d in fused(x)) >= 100  # a dense scene: hundreds of detections per image
    report = export_detector(det, tmp_path / "det.onnx", "nms", check_inputs=x)
    assert "every exported detection is one of PyTorch's raw candidates" in report.check
    for bug in ("swapped coordinates", "class offset", "wrong decoding"):
        path = tmp_path / f"{bug.replace(' ', '_')}.onnx"
        _export_nms(_Broken(fused, bug), fused, path, size)
        with pytest.raises(ExportError, match="none of PyTorch's raw candidates|more than threshold ties explain"):
            check_nms("onnx", path, fused, x, False)


def test_compare_detections_tolerates_nms_ties_and_their_cascade():
    """Box B sits at the NMS threshold with A: one implementation keeps B (and so suppresses C), the other
    drops B (and so keeps C). Both are correct; a detection missing for no such reason is not."""
    a = [0.0, 0, 10, 10]
    b = [0.0, 0, 10, 10 / 0.55]  # IoU(A, B) = 100 / 181.8 = 0.55
    c = [0.0, 4, 10, 22]  # IoU 0.64 with B, 0.27 with A
    boxes = torch.tensor([a, b, c])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([0, 0, 0])
    keeps_b = {"boxes": boxes[[0, 1]], "scores": scores[[0, 1]], "labels": labels[[0, 1]]}
    drops_b = {"boxes": boxes[[0, 2]], "scores": scores[[0, 2]], "labels": labels[[0, 2]]}
    candidates = (boxes, scores[:, None])
    assert compare_detections(keeps_b, drops_b, 0.001, 0.55, candidates=candidates) == ([], 2)
    far = {"boxes": torch.tensor([[50.0, 50, 60, 60]]), "scores": torch.tensor([0.6]), "labels": torch.tensor([0])}
    problems, _ = compare_detections(keeps_b, {k: torch.cat([drops_b[k], far[k]]) for k in far}, 0.001, 0.55)
    assert problems and "score 0.60000" in problems[0]
