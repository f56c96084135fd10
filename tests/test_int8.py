"""INT8 in each runtime: every task quantized and scored in its runtime, the remedy chain on a model built to
collapse, the failure that names --qat, and INT8 in the bench (tiny sizes throughout; QAT: test_qat.py)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mobileone import MobileOneConfig, create_model, save_checkpoint
from mobileone.cli import main
from mobileone.deploy import int8_check
from mobileone.deploy.calibration import calibration_batch, image_files
from mobileone.deploy.common import ExportError
from mobileone.deploy.int8 import Recipe, quantize_graph, task_graph, weighted_layers
from mobileone.deploy.int8_check import quantize_checked
from mobileone.deploy.targets import missing
from mobileone.tasks.classify.data import builtin_dataset

from .segment_data import make_masks_dataset
from .test_detect_data import tiny_dataset
from .test_detect_model import settle, tiny_detector
from .test_quantize import _train_on_digits
from .test_segment_model import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = MobileOneConfig(widths=(8, 16, 16, 32), stem_width=8, blocks=(1, 1, 1, 1), k=2)


def _needs(fmt: str) -> None:
    if missing(fmt):
        pytest.skip(missing(fmt))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return builtin_dataset(tmp_path_factory.mktemp("digits"))


def classifier(trained: bool = False, outlier: bool = False):
    """A tiny classifier's fused graph (``trained``: a few seconds on the digits, ~92 % top-1). ``outlier``: the
    stem's channel 0 scaled up 1000x and the next depthwise layer's channel 0 down as much: the same function, but
    one weight scale or one activation range per tensor rounds every other channel to zero."""
    torch.manual_seed(0)
    if trained:
        model = _train_on_digits()
    else:
        model = create_model(TINY, num_classes=10)
        model.class_names = [str(i) for i in range(10)]
        model.preprocess.update(input_size=16, crop_pct=1.0)
    graph = task_graph("classify", model.eval())
    if outlier:
        with torch.no_grad():
            graph.module.stage0.reparam_conv.weight[0] *= 1000.0
            graph.module.stage0.reparam_conv.bias[0] *= 1000.0
            graph.module.stage1[0].reparam_conv.weight[0] /= 1000.0  # depthwise: exactly compensates
    return graph


def test_calibration_takes_any_folder_of_images(tmp_path, digits):
    flat = tmp_path / "photos"
    flat.mkdir()
    for i, p in enumerate(image_files(digits).files[:5]):
        (flat / f"{i}{p.suffix}").write_bytes(p.read_bytes())
    (flat / "notes.txt").write_text("not an image")
    meta = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3, "task": "detect"}
    assert calibration_batch(flat, meta, 10).shape == (5, 3, 16, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        image_files(tmp_path / "empty")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_classifier_int8_is_scored_in_its_runtime(tmp_path, digits, runtime):
    _needs({"onnxruntime": "onnx", "openvino": "openvino"}[runtime])
    graph = classifier()
    calibration = calibration_batch(digits, graph.meta, 32)
    report = quantize_checked(runtime, graph, calibration, tmp_path / "int8", digits, max_drop=100.0)
    result = report.as_json()
    assert {"task", "runtime", "metric", "fp32", "int8", "drop"} <= set(result) and result["metric"] == "top1"
    assert report.images == 360 and report.path.exists() and report.fp32_path.exists()
    assert result["drop"] == pytest.approx(result["fp32"] - result["int8"]) and len(report.steps) == 1


def test_layers_kept_in_float_lose_their_quantizers_in_openvino(tmp_path):
    _needs("openvino")
    graph = classifier()
    layers = weighted_layers(graph.module, graph.example)
    counts = []
    for keep in ((), tuple(layers[:3])):
        path = quantize_graph(
            "openvino", graph, torch.randn(4, 3, 16, 16), tmp_path / f"{len(keep)}.xml", Recipe(keep_float=keep)
        )
        counts.append(path.read_text().count('type="FakeQuantize"'))
    assert counts[1] == counts[0] - 3  # each kept layer: its weights' FakeQuantize gone


def test_detector_and_segmenter_int8_in_onnxruntime(tmp_path):
    _needs("onnx")
    det = settle(tiny_detector(num_classes=2, max_detections=20))
    data = tiny_dataset(tmp_path / "det")
    graph = task_graph("detect", det)
    report = quantize_checked("onnxruntime", graph, calibration_batch(data, graph.meta, 8), tmp_path / "d", data, 100)
    assert report.metric == "map_50" and report.images == 4 and 0 <= report.best.value <= 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = tiny("lraspp", num_classes=4).eval()
    seg.preprocess["input_size"] = 32
    data = make_masks_dataset(tmp_path / "seg", val_sizes=((24, 40),))
    graph = task_graph("segment", seg)
    report = quantize_checked("onnxruntime", graph, calibration_batch(data, graph.meta, 8), tmp_path / "s", data, 100)
    assert report.metric == "miou" and report.images == 5 and report.fp32 >= 0


@pytest.mark.slow  # seven quantizations, each scored on the 360 held-out digits: about 40 s
def test_remedy_chain_rescues_a_model_built_to_collapse(tmp_path, digits):
    _needs("onnx")
    graph = classifier(trained=True, outlier=True)
    calibration = calibration_batch(digits, graph.meta, 32)
    report = quantize_checked("onnxruntime", graph, calibration, tmp_path / "q", digits, 1.0, Recipe(per_channel=False))
    assert report.fp32 > 85 and report.steps[0].drop > 50, "one scale per tensor should collapse the outlier stem"
    names = [s.remedy.split(":")[0] for s in report.steps]
    assert names[:3] == ["as asked", "remedy 1", "remedy 2"] and set(names[3:]) == {"remedy 3"}
    assert report.ok and report.best is report.steps[-1] and report.best.recipe.keep_float
    assert "stage1.0.reparam_conv" in report.best.recipe.keep_float  # the layer the outlier feeds, found by the pass


def test_still_over_the_limit_exits_3_and_names_qat(tmp_path, digits, monkeypatch, capsys):
    _needs("onnx")
    graph = classifier()
    ckpt = save_checkpoint(graph.module, tmp_path / "best.safetensors")
    real = int8_check.runtime_metric
    monkeypatch.setattr(  # every INT8 file scores 0: the chain runs to its end
        int8_check,
        "runtime_metric",
        lambda path, *a: real(path, *a) if ".fp32." in str(path) else {**real(path, *a), "value": 0.0},
    )
    out = tmp_path / "int8.onnx"
    argv = ["quantize", "--checkpoint", str(ckpt), "--calib-data", str(digits), "--out", str(out)]
    code = main(argv + ["--num-calib", "16", "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 3 and "--qat" in err and "after every remedy" in err
    steps = json.loads((tmp_path / "r.json").read_text())["steps"]
    assert [s["remedy"].split(":")[0] for s in steps] == ["as asked", "remedy 2"] + ["remedy 3"] * 4


def test_ncnn_int8_says_the_wheels_lack_the_tools(digits):
    with pytest.raises(ExportError, match="ncnn2table and ncnn2int8"):
        quantize_graph("ncnn", classifier(), torch.zeros(1, 3, 16, 16), digits / "x.param", Recipe())


@pytest.mark.slow  # two INT8 conversions and their timing
def test_bench_times_int8_beside_fp32(tmp_path):
    _needs("openvino")
    from mobileone.bench import BenchConfig, BenchModel, run_benchmark

    models = [
        BenchModel("mobileone_s0", "MobileOne (fused)", lambda: create_model(TINY, num_classes=10, inference_mode=True))
    ]
    cfg = BenchConfig(
        runtimes=["openvino"],
        precisions=["fp32", "int8"],
        batch_sizes=[1],
        img_size=32,
        threads=1,
        out=str(tmp_path),
        warmup=1,
        iters=2,
        min_time=0.01,
        rounds=1,
        studies=False,
        peak_size=64,
    )
    result = run_benchmark(cfg, models, progress=False)
    assert not result["errors"] and [r["precision"] for r in result["rows"]] == ["fp32", "int8"]
    assert "openvino (int8; batch 1" in (tmp_path / "results.md").read_text()
