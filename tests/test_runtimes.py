"""The runtimes apps embed (LiteRT, OpenVINO, ncnn): every task exported through the same targets and checked in
its own runtime, float32 by default, the bench on them, and one clear line when a runtime is missing."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from mobileone.cli import main
from mobileone.deploy.common import ExportError, require
from mobileone.deploy.detect import export_detector
from mobileone.deploy.segment import export_segmenter
from mobileone.deploy.targets import TARGETS, missing, read_metadata

from .test_detect_model import settle, tiny_detector
from .test_segment_model import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
SLOW = pytest.mark.slow  # LiteRT's converter takes 5-15 s per model on 2 cores; several conversions add up
FORMATS = [pytest.param("tflite", marks=SLOW), "openvino", "ncnn"]


def _needs(fmt: str) -> None:
    if missing(fmt):
        pytest.skip(missing(fmt))


@pytest.fixture(scope="module")
def detector():
    return settle(tiny_detector(num_classes=2, max_detections=20))


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny("lraspp", num_classes=3)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # running statistics off their initial values
    return model.eval()


@pytest.mark.parametrize("fmt", FORMATS)
def test_detector_raw_form_matches_pytorch_in_each_runtime(detector, tmp_path, fmt):
    _needs(fmt)
    report = export_detector(detector, tmp_path / "det", "raw", fmt)
    assert report.path.suffix == TARGETS[fmt].suffix and "within 1e-4 relative" in report.check
    meta = read_metadata(report.path)
    assert meta["task"] == "detect" and meta["form"] == "raw" and meta["input_size"] == [3, 64, 64]


@SLOW
def test_openvino_runs_the_nms_form_with_the_detections_of_pytorch(detector, tmp_path):
    _needs("openvino")
    report = export_detector(detector, tmp_path / "det.xml", "nms", "openvino")
    assert "OpenVINO" in report.check and "the same" in report.check
    with pytest.raises(ValueError, match="NMS form is for"):
        export_detector(detector, tmp_path / "det.param", "nms", "ncnn")


@pytest.mark.parametrize("fmt", FORMATS)
def test_segmenter_logits_and_argmax_match_pytorch_in_each_runtime(segmenter, tmp_path, fmt):
    _needs(fmt)
    report = export_segmenter(segmenter, tmp_path / "seg", fmt, img_size=64, argmax=fmt != "ncnn")
    assert report.max_abs_diff <= report.tolerance and report.argmax_agreement >= 99.9
    assert len(report.sizes) == (2 if fmt == "openvino" else 1)  # OpenVINO takes any height and width
    assert read_metadata(report.path)["task"] == "segment"


def test_ncnn_refuses_a_graph_with_a_layer_it_lacks(segmenter, tmp_path):
    _needs("ncnn")
    with pytest.raises(ExportError, match=r"ncnn has no layer for \['torch.argmax'\].*without --argmax"):
        export_segmenter(segmenter, tmp_path / "seg", "ncnn", img_size=64, argmax=True)


def test_a_missing_runtime_is_one_line_naming_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pnnx" else real(name, *a))
    assert missing("ncnn") == "ncnn: pnnx not installed: pip install 'mobileone[ncnn]'"
    with pytest.raises(ImportError, match=r"pip install 'mobileone\[litert\]'"):
        require("litert_torch_that_is_not_there", "litert")


@SLOW
def test_export_all_writes_every_installed_target_with_a_table(tmp_path, capsys):
    code = main(
        ["export", "--variant", "s0", "--num-classes", "3", "--img-size", "32", "--format", "all"]
        + ["--out", str(tmp_path), "--threads", "1"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for fmt, target in TARGETS.items():
        row = next((ln for ln in out.splitlines() if ln.startswith(f"| {fmt} |")), None)
        assert (row is not None) == target.installed(), out
        if row and fmt != "coreml":
            assert "top-1 agrees 100.0 %" in row and (tmp_path / target.file_name()).exists()


@SLOW
def test_bench_times_the_device_runtimes(tmp_path):
    from mobileone.bench import BenchConfig, BenchModel, run_benchmark
    from mobileone.core.factory import create_model

    runtimes = [r for r, f in (("openvino", "openvino"), ("ncnn", "ncnn")) if not missing(f)]
    if not runtimes:
        pytest.skip("neither OpenVINO nor ncnn is installed")
    tiny_net = {"widths": (8, 8, 16, 16), "stem_width": 8, "blocks": (1, 1, 1, 1), "k": 1}
    models = [
        BenchModel(n, "MobileOne (fused)", lambda: create_model(tiny_net, num_classes=3, inference_mode=True))
        for n in ("mobileone_s0", "mobilenet_v2")
    ]  # named as the paper's rows: its columns are filled
    cfg = BenchConfig(
        runtimes=runtimes,
        batch_sizes=[1, 2],
        img_size=32,
        threads=1,
        out=str(tmp_path),
        warmup=1,
        iters=2,
        min_time=0.01,
        rounds=2,
        studies=False,
        peak_size=64,
    )
    result = run_benchmark(cfg, models, progress=False)
    assert not result["errors"]
    for r in result["rows"]:
        assert r["precision"] == "fp32" and r["bs1"]["median_ms"] > 0 and r["bs1"]["rounds"] == 2
        assert ("bs2" in r) == (r["runtime"] == "openvino")  # ncnn runs one image at a time
    md = (tmp_path / "results.md").read_text()
    assert all(f"{rt} (fp32; batch 1" in md for rt in runtimes) and "| mobileone_s0 | 71.4 | 0.79 |" in md
    assert (tmp_path / "latency_vs_top1.png").stat().st_size > 0


@SLOW
def test_detect_and_segmentation_bench_time_the_device_runtimes(tmp_path):
    from mobileone.bench.detect import DetectionBenchConfig, detection_benchmark
    from mobileone.bench.segment import SegmentationBenchConfig, run_segmentation_benchmark

    _needs("openvino")
    kw = {"threads": 1, "warmup": 0, "iters": 1, "min_time": 0.0, "out": str(tmp_path)}
    det = DetectionBenchConfig(
        models=["ssdlite_mnv3"], runtimes=["openvino"], img_size=64, num_classes=2, rounds=1, **kw
    )
    keys = {(r["fused"], r["nms"], r["runtime"]) for r in detection_benchmark(det)["rows"]}
    assert keys == {(True, False, "openvino"), (True, True, "openvino")}  # the fused raw and NMS forms
    assert "| ssdlite_mnv3 | unfused |" in (tmp_path / "detect_results.md").read_text()  # n/a cells, no error
    seg = SegmentationBenchConfig(models=["lraspp_s0"], output_strides=[16], runtimes=["openvino"], img_size=64, **kw)
    result = run_segmentation_benchmark(seg, progress=False)
    assert not result["errors"] and all(r["openvino"]["median_ms"] > 0 for r in result["rows"])
    assert (tmp_path / "segment_results.md").exists() and not (tmp_path / "results.md").exists()


def test_openvino_leaves_the_threads_signal_stack_as_it_was(tmp_path):
    """OpenVINO installs an alternate signal stack on the calling thread and can free it while installed: a
    later SIGCHLD (a finished subprocess, which PyTorch's data loader handles) then killed the whole process
    with a segmentation fault. Every OpenVINO call of ours puts the thread's own stack back."""
    import ctypes
    import subprocess

    _needs("openvino")
    from mobileone.deploy import openvino

    class Stack(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    def current() -> tuple:
        s = Stack()
        ctypes.CDLL(None).sigaltstack(None, ctypes.byref(s))
        return s.ss_sp, s.ss_flags, s.ss_size

    from torch.utils.data._utils.signal_handling import _set_SIGCHLD_handler

    _set_SIGCHLD_handler()  # what a DataLoader with workers leaves behind
    before = current()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    openvino.export(model, tmp_path / "m.xml", x, {"task": "classify"}, "none", ["out"])
    run = openvino.load(tmp_path / "m.xml", threads=1)
    assert torch.allclose(run(x)[0], model(x), atol=1e-5)
    assert current() == before
    del run
    assert subprocess.run(["true"]).returncode == 0  # the SIGCHLD is delivered on a valid stack
