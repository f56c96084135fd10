"""Training detectors: a handful of images are learnt to mAP near 1; a run through the engine writes what it
should, resumes bit-exactly, and its checkpoints work with ``mobileone eval`` and ``export``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from mobileone.cli import main
from mobileone.tasks import train
from mobileone.tasks.detect.augment import letterbox_transform
from mobileone.tasks.detect.data import DetectionDataset, collate_detection, load_splits
from mobileone.tasks.detect.evaluate import detection_metrics, predict_loader
from mobileone.tasks.detect.task import DetectTask

from .test_detect_data import make_scenes, tiny_dataset, write_coco
from .test_detect_model import TINY_ARCH, tiny_detector


def test_a_handful_of_images_is_learnt_to_map_near_one(tmp_path, one_thread):
    root = write_coco(tmp_path / "d", {"train": make_scenes(4), "val": make_scenes(1)})
    split, _ = load_splits(root)
    x, targets, _ = collate_detection(
        [DetectionDataset(split, letterbox_transform(64), train=True)[i] for i in range(4)]
    )
    torch.manual_seed(0)
    det = tiny_detector(num_classes=2, img_size=64, anchor_min_ratio=0.2)
    opt = torch.optim.AdamW(det.parameters(), lr=3e-3, weight_decay=0)
    det.train()
    for _ in range(250):
        losses = det(x, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    loader = DataLoader(DetectionDataset(split, letterbox_transform(64)), 4, collate_fn=collate_detection)
    results, seen, _ = predict_loader(det, loader, torch.device("cpu"))
    assert det.training  # predict_loader restores the mode
    m = detection_metrics(split.records, split.classes, results, seen)
    assert m["map_50"] > 99 and m["map"] > 85, m


def _options(data, out, **kw):
    return {
        "task": "detect",
        "data": str(data),
        "arch": TINY_ARCH,
        "img_size": 64,
        "batch_size": 2,
        "epochs": 2,
        "workers": 0,
        "out": str(out),
        "progress": False,
        "anchor_min_ratio": 0.15,
        "max_detections": 50,
        "deterministic": True,
        "steps_per_epoch": 3,  # one pass an epoch: no floor of steps on these 6 images
        **kw,
    }


def test_a_run_writes_its_files_and_resumes_bit_exactly(tmp_path, monkeypatch, one_thread):
    data = tiny_dataset(tmp_path / "data", train=6, val=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train(**_options(data, tmp_path / "full"))
    run = tmp_path / "full"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(k in rows[-1] for k in ("map", "map_50", "map_75", "ema_map", "ema_map_50"))
    assert summary["best"]["map"] == max(max(r["map"], r["ema_map"]) for r in rows)
    for name in ("best.safetensors", "best_fused.safetensors", "last.safetensors", "predictions.png", "curves.png"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "best_fused.json").read_text())
    assert meta["task"] == "detect" and meta["inference_mode"] and meta["class_names"] == ["red", "blue"]
    assert meta["detector"]["img_size"] == 64 and meta["detector"]["max_detections"] == 50

    calls = []

    def stop_after_first_epoch(self, row):
        calls.append(row["epoch"])
        raise KeyboardInterrupt

    monkeypatch.setattr(DetectTask, "epoch_line", stop_after_first_epoch)
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        train(**_options(data, tmp_path / "resumed"))
    monkeypatch.undo()
    assert calls == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(resume=str(tmp_path / "resumed"), workers=0)
    a, b = load_file(run / "last.safetensors"), load_file(tmp_path / "resumed" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["map"] == rows[-1]["map"]

    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--task",
                "detect",
                "--data",
                str(data),
                "--checkpoint",
                str(run / "best_fused.safetensors"),
                "--json",
                str(out),
            ]  # no --workers: the default that fits the cores (it once reached the loader as None)
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result) >= {"map", "map_50", "map_75", "per_class"} and set(result["per_class"]) == {"red", "blue"}
    assert abs(result["map"] - summary["best"]["map"]) < 1e-6  # the engine's per-epoch mAP is the same protocol
    assert (
        main(
            [
                "export",
                "--task",
                "detect",
                "--checkpoint",
                str(run / "best.safetensors"),
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "det.onnx"),
                "--max-detections",
                "20",
            ]
        )
        == 0
    )
    assert (tmp_path / "det.onnx").is_file() and (tmp_path / "det_nms.onnx").is_file()


def test_detect_options_are_validated():
    from mobileone.tasks import resolve_config

    with pytest.raises(ValueError, match="--progressive changes the image size"):
        resolve_config(task="detect", progressive=True)
    with pytest.raises(ValueError, match="--augment randaugment is for classification"):
        resolve_config(task="detect", augment="randaugment")
    with pytest.raises(ValueError, match="--pretrained apply to MobileOne backbones"):
        resolve_config(task="detect", variant="mnv3", pretrained="x.pth")
    cfg = resolve_config(task="detect", data="somewhere")
    assert (cfg.head, cfg.img_size, cfg.batch_size, cfg.weight_decay, cfg.hflip, cfg.k) == (
        "tal",
        320,
        16,
        5e-4,
        0.5,
        1,
    )
    assert resolve_config(task="detect", data="somewhere", k=4).k == 4  # S0 trains one branch unless told
    assert resolve_config(task="detect", data="somewhere", variant="s1").k is None
    with pytest.raises(ValueError, match="--head lraspp is a segmentation head"):
        resolve_config(task="detect", head="lraspp")
    builtin = resolve_config(task="detect")
    assert (builtin.head, builtin.img_size, builtin.hflip, builtin.anchor_min_ratio, builtin.batch_size) == (
        "ssdlite",
        96,
        0,
        0.15,
        16,
    )


def test_latency_table_has_every_graph_and_post_processing(tmp_path, one_thread):
    from mobileone.bench.detect import DetectionBenchConfig, detection_benchmark

    cfg = DetectionBenchConfig(
        models=["ssdlite_mnv3"],
        runtimes=["eager"],
        img_size=64,
        num_classes=2,
        threads=1,
        warmup=0,
        iters=1,
        min_time=0.0,
        rounds=2,
        out=str(tmp_path),
    )
    result = detection_benchmark(cfg)
    keys = {(r["fused"], r["nms"]) for r in result["rows"]}
    assert keys == {(False, False), (False, True), (True, False), (True, True)}
    assert all(r["median_ms"] > 0 and r["macs_fused"] > 0 for r in result["rows"])
    table = (tmp_path / "detect_results.md").read_text()
    assert "| ssdlite_mnv3 | unfused |" in table and "| ssdlite_mnv3 | fused |" in table and "eager + NMS ms" in table


@pytest.mark.slow  # two training processes and a latency table: about a minute on 2 cores
def test_the_seed_study_runs_on_a_tiny_setting(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "detect_seeds.py"
    spec = importlib.util.spec_from_file_location("detect_seeds", script)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    data = tiny_dataset(tmp_path / "data", train=4, val=2)
    result = study.main(
        [
            "--out",
            str(tmp_path / "study"),
            "--data",
            str(data),
            "--img-size",
            "64",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "1",
            "--seeds",
            "0",
            "1",
            "--variants",
            "mnv3",
            "--latency-size",
            "64",
            "--runtimes",
            "eager",
            "--iters",
            "1",
            "--rounds",
            "1",
        ]
    )
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [("mnv3", 0), ("mnv3", 1)]
    assert result["aggregate"][0]["runs"] == 2 and result["aggregate"][0]["map_std"] >= 0
    text = (tmp_path / "study" / "results.md").read_text()
    assert "| ssdlite_mnv3 | 2 |" in text and "SSDLite latency" in text


def test_small_sets_get_a_minimum_of_steps_whatever_the_epochs(tmp_path):
    from mobileone.engine.distributed import Env
    from mobileone.tasks import resolve_config
    from mobileone.tasks.detect import task as detect

    data = tiny_dataset(tmp_path / "d", train=6, val=2)
    cfg = resolve_config(task="detect", data=str(data), epochs=4, batch_size=2, workers=0)
    t = DetectTask()
    t.validate(cfg)
    train = t.load_data(cfg, Env(torch.device("cpu"))).train
    steps = cfg.epochs * (len(train) // cfg.batch_size)
    assert detect.DETECT_MIN_STEPS <= steps < detect.DETECT_MIN_STEPS + cfg.epochs * 3  # 6 images: 3 steps a pass
    assert train[(0, 0)][1]["boxes"].shape[1] == 4 and len(train.records) == 6
    capped = resolve_config(task="detect", data=str(data), epochs=4, batch_size=2, steps_per_epoch=5, workers=0)
    assert len(t.load_data(capped, Env(torch.device("cpu"))).train) == 2 * 6  # two passes fill the 5 steps


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_trains_the_tal_detector_in_bf16_on_a_cpu_with_native_bf16(native, monkeypatch):
    from mobileone.tasks import resolve_config
    from mobileone.tasks.detect import task as detect_task

    monkeypatch.setattr(detect_task, "cpu_computes_bf16", lambda: native)
    assert resolve_config(task="detect", data="x", device="cpu").amp == ("bf16" if native else "auto")
    assert resolve_config(task="detect", data="x", device="cpu", amp="none").amp == "none"  # asked for: kept
    assert resolve_config(task="detect", device="cpu").amp == "auto"  # the demo's scenes: float32 as measured
    assert resolve_config(task="detect", data="x", device="cpu", head="ssdlite").amp == "auto"  # not measured
    assert resolve_config(task="detect", data="x", device="cpu", k=4).amp == "auto"  # k > 1: not measured
    assert resolve_config(task="detect", data="x", device="cpu", variant="mnv3").amp == ("bf16" if native else "auto")


def test_user_data_trains_with_adamw_and_each_optimizer_has_its_own_learning_rate(tmp_path):
    from mobileone.engine.schedules import make_optimizer, peak_lr
    from mobileone.tasks import resolve_config

    data = str(tiny_dataset(tmp_path / "d", train=6, val=2))
    cfg = resolve_config(task="detect", data=data)
    assert (cfg.optimizer, peak_lr(cfg)) == ("adamw", pytest.approx(0.002))  # at batch 16
    assert peak_lr(resolve_config(task="detect", data=data, batch_size=64)) == pytest.approx(0.004)  # sqrt scaling
    sgd = resolve_config(task="detect", data=data, optimizer="sgd")
    assert sgd.base_lr == 0.2 and peak_lr(sgd) == pytest.approx(0.2 * 16 / 256)  # SGD by name: its rate, linear
    assert resolve_config(task="detect", data=data, optimizer="sgd", base_lr=0.1).base_lr == 0.1
    builtin = resolve_config(task="detect")  # the demo's digit scenes keep their tuned SGD
    assert (builtin.optimizer, builtin.base_lr) == ("sgd", 0.8)
    assert resolve_config(task="detect", optimizer="adamw").base_lr == pytest.approx(0.8 * 0.04)  # converted
    assert isinstance(make_optimizer(tiny_detector(num_classes=2, img_size=64), cfg), torch.optim.AdamW)
