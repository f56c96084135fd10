"""A tiny detector's and segmenter's checkpoints, with data they fit, for the command-line tests of every task."""

from pathlib import Path

from mobileone.tasks.detect.model import save_detector
from mobileone.tasks.segment.model import save_segmenter

from .segment_data import make_masks_dataset
from .test_detect_data import tiny_dataset
from .test_detect_model import settle, tiny_detector
from .test_segment_model import tiny as tiny_segmenter


def task_files(tmp: Path) -> dict[str, Path]:
    """``{"detect": checkpoint, "detect data": folder, "segment": ..., "segment data": ...}``."""
    det = settle(tiny_detector(num_classes=2, max_detections=20))
    det.class_names = ["red", "blue"]
    seg = tiny_segmenter("lraspp").eval()
    seg.class_names, seg.preprocess["input_size"] = ["background", "red", "green", "blue"], 32
    return {
        "detect": save_detector(det, tmp / "det.safetensors"),
        "segment": save_segmenter(seg, tmp / "seg.safetensors"),
        "detect data": tiny_dataset(tmp / "det_data", train=2, val=2),
        "segment data": make_masks_dataset(tmp / "seg_data", n_train=2, n_val=2),
    }
