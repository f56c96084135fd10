"""Quantization-aware training as a run of the training engine: one epoch per task on tiny data, the fake
quantizers in the graph, resume after Ctrl-C, the NaN stop, and the INT8 file of the QAT weights run in its
runtime (tiny sizes throughout)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mobileone import create_model, load_checkpoint, save_checkpoint
from mobileone.cli import main
from mobileone.deploy.int8 import Recipe, quantize_graph, task_graph
from mobileone.deploy.qat import QAT_DEFAULTS, qat_config, qat_finetune, qat_task, run_qat
from mobileone.deploy.runtime_eval import runtime_metric
from mobileone.deploy.targets import missing
from mobileone.tasks.detect.model import save_detector
from mobileone.tasks.segment.model import save_segmenter

from .classify_data import TINY, poison_loss
from .segment_data import make_masks_dataset
from .test_detect_data import tiny_dataset
from .test_detect_model import settle, tiny_detector
from .test_detect_tal import tiny_tal
from .test_segment_model import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
COLOURS = ["blue", "green", "red"]  # the classes of the ``data`` fixture, in folder order


def _needs(fmt: str) -> None:
    if missing(fmt):
        pytest.skip(missing(fmt))


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny trained-mode classifier of the ``data`` fixture's classes, saved unfused."""
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=3)
    model.train()(torch.randn(4, 3, 16, 16))  # BN statistics of real activations
    model.class_names = COLOURS
    model.preprocess.update(input_size=16, crop_pct=1.0)
    return save_checkpoint(model.eval(), tmp_path / "model.safetensors")


def _quantize(ckpt, data, out, *extra: str) -> list[str]:
    argv = ["quantize", "--checkpoint", str(ckpt), "--out", str(out), "--qat", "--train-data", str(data)]
    return argv + ["--batch-size", "8", "--workers", "0", "--num-calib", "8", "--max-drop", "100", *extra]


def test_the_graph_is_fake_quantized_with_ranges_from_training_images(tmp_path, data, checkpoint):
    cfg = qat_config("classify", checkpoint, data, tmp_path / "run", epochs=1, workers=0)
    task = qat_task("classify")
    graph = task.build_model(cfg, COLOURS)
    fake = [m for m in graph.modules() if type(m).__name__ == "FusedMovingAvgObsFakeQuantize"]
    assert len(fake) > 10 and all(not torch.all(m.scale == 1.0) for m in fake)  # 1.0: the initial scale, never observed
    x = torch.randn(2, 3, 16, 16)
    fused = task_graph("classify", load_checkpoint(checkpoint)).module
    with torch.no_grad():
        q, f = graph.eval()(x), fused(x)
    error = ((q - f).norm() / f.norm()).item()
    assert 0 < error < 0.2, "int8 rounding changes the logits a little, not entirely"
    assert (cfg.lr, cfg.weight_decay, cfg.img_size) == (QAT_DEFAULTS["lr"], 0.0, 16)
    # SGD even where the task itself trains with AdamW (detection on user data)
    assert qat_task("detect").defaults("short", "mobileone_s0", False)["optimizer"] == cfg.optimizer == "sgd"


def test_the_source_runs_data_and_augmentation_are_kept_unless_given(tmp_path, data, checkpoint):
    source = {"task": "classify", "data": str(data), "hflip": 0.0, "crop_scale": [0.5, 1.0], "epochs": 10}
    (tmp_path / "config.json").write_text(json.dumps(source))  # the run that wrote the checkpoint
    cfg = qat_config("classify", checkpoint, None, tmp_path / "run")
    assert (cfg.data, cfg.hflip, cfg.crop_scale) == (str(data), 0.0, (0.5, 1.0))
    assert cfg.epochs == QAT_DEFAULTS["epochs"] and not cfg.auto_epochs  # its epochs are not QAT's
    assert qat_config("classify", checkpoint, data, tmp_path / "run", hflip=0.5).hflip == 0.5


def test_qat_one_epoch_through_the_engine(tmp_path, data, checkpoint):
    """The engine's run directory, EMA and metrics; the checkpoints are the fused model with the tuned weights."""
    graph = task_graph("classify", load_checkpoint(checkpoint))
    tuned = qat_finetune(graph, data, tmp_path / "run", epochs=1, batch_size=8, workers=0, progress=False)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["ema_val_top1"] is not None and rows[0]["weight_decay"] == 0.0
    best = load_checkpoint(run / "best.safetensors")
    assert best.inference_mode and best.class_names == COLOURS
    before, after = graph.module.state_dict(), tuned.module.state_dict()
    assert before.keys() == after.keys() and not all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((run / "config.json").read_text())
    assert config["pretrained"].endswith("fused.safetensors") and config["task"] == "classify"


def test_interrupted_qat_resumes_where_it_stopped_then_converts(tmp_path, data, checkpoint, monkeypatch, capsys):
    _needs("onnx")
    out, run = tmp_path / "q.onnx", tmp_path / "q.qat"
    argv = _quantize(checkpoint, data, out, "--epochs", "2", "--json", str(tmp_path / "r.json"))

    def stop(net):
        raise KeyboardInterrupt

    poison_loss(monkeypatch, 4, stop)  # 3 steps an epoch: the first step of epoch 2
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err and not (run / ".lock").exists()
    first = (run / "metrics.jsonl").read_text()
    monkeypatch.undo()
    assert main(argv) == 2 and "add --resume" in capsys.readouterr().err  # never over a run silently
    assert main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming {run} after epoch 1" in printed
    rows = (run / "metrics.jsonl").read_text().splitlines()
    kept = ("epoch", "train_loss", "val_top1", "ema_val_top1")
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    assert {k: json.loads(rows[0])[k] for k in kept} == {k: json.loads(first)[k] for k in kept}  # not redone
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["qat"]["run"] == str(run) and report["qat"]["epochs"] == 2
    assert report["int8"] == runtime_metric(out, data)["value"]  # the INT8 file runs in onnxruntime


def test_a_nan_stops_qat_and_options_are_checked(tmp_path, data, checkpoint, monkeypatch, capsys):
    def poison(net):
        with torch.no_grad():
            next(net.parameters()).fill_(float("nan"))

    poison_loss(monkeypatch, 2, poison)
    assert main(_quantize(checkpoint, data, tmp_path / "q.onnx", "--epochs", "1")) == 3
    assert "stopped" in capsys.readouterr().err
    base = ["quantize", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.onnx")]
    assert main([*base, "--calib-data", str(data), "--train-data", str(data)]) == 2
    assert "belong to --qat" in capsys.readouterr().err
    assert main([*base, "--qat"]) == 2 and "give --train-data" in capsys.readouterr().err  # no run beside it
    assert main([*base, "--qat", "--train-data", str(data), "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_help_states_the_qat_defaults(capsys):
    assert main(["quantize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"default {QAT_DEFAULTS['epochs']}" in text and f"(default {QAT_DEFAULTS['lr']})" in text


@pytest.mark.slow  # three QAT runs (capture, one epoch), two INT8 files in onnxruntime: about 30 s
def test_segmenter_and_detectors_qat_then_int8_in_onnxruntime(tmp_path):
    """LR-ASPP, the tal detector (the default head) and SSDLite: each head's loss on the graph's outputs."""
    _needs("onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = tiny("lraspp", num_classes=4).eval()
    seg.preprocess["input_size"] = 32
    seg_data = make_masks_dataset(tmp_path / "seg", val_sizes=((24, 40),))
    det_data = tiny_dataset(tmp_path / "det")
    for name, ckpt, data, convert in (
        ("segment", save_segmenter(seg, tmp_path / "seg.safetensors"), seg_data, True),
        ("tal", save_detector(settle(tiny_tal()), tmp_path / "tal.safetensors"), det_data, True),
        (
            "ssdlite",
            save_detector(settle(tiny_detector(max_detections=20)), tmp_path / "ssd.safetensors"),
            det_data,
            False,
        ),
    ):
        task, metric = ("segment", "miou") if name == "segment" else ("detect", "map")
        run = tmp_path / f"{name}.qat"
        summary = run_qat(qat_config(task, ckpt, data, run, epochs=1, batch_size=4, workers=0, progress=False))
        row = json.loads((run / "metrics.jsonl").read_text())
        assert row["epoch"] == 1 and summary["best"][metric] == max(row[metric], row["ema_" + metric])
        if convert:
            graph = task_graph(task, qat_task(task).base.load(run / "best.safetensors"))
            calibration = torch.randn(4, *graph.example.shape[1:])
            path = quantize_graph("onnxruntime", graph, calibration, tmp_path / f"{name}.onnx", Recipe())
            assert 0 <= runtime_metric(path, data)["value"] <= 100  # the INT8 file of the QAT weights runs


@pytest.mark.slow  # PT2E capture, one epoch and the lowering to XNNPACK: about 20 s
def test_qat_then_executorch_int8(tmp_path, data, checkpoint):
    _needs("executorch")
    argv = _quantize(checkpoint, data, tmp_path / "q.pte", "--runtime", "executorch", "--epochs", "1")
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runtime"] == "executorch" and report["int8"] == runtime_metric(tmp_path / "q.pte", data)["value"]
