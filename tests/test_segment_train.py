"""Segmentation on the engine: over-fit to mIoU near 100, run files, full-resolution eval, ONNX, resume, peers."""

import json
import shutil

import pytest
import torch

import mobileone.engine.trainer as tr
from mobileone.cli import main
from mobileone.deploy.segment import evaluate_onnx_segmenter, export_segmenter, read_segmentation_metadata
from mobileone.tasks import resolve_config, train
from mobileone.tasks.segment.data import SegmentationDataset, load_splits
from mobileone.tasks.segment.evaluate import evaluate_checkpoint
from mobileone.tasks.segment.metrics import confusion_matrix, segmentation_scores
from mobileone.tasks.segment.model import load_segmenter
from mobileone.tasks.segment.task import build_segmenter

from .segment_data import make_masks_dataset

TINY = {"widths": [8, 16, 16, 16], "stem_width": 8, "blocks": [1, 1, 1, 1], "k": 2}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def config(out, data, **kw):
    opts = {
        "task": "segment",
        "data": str(data),
        "arch": TINY,
        "out": str(out),
        "epochs": 2,
        "batch_size": 4,
        "img_size": 32,
        "workers": 0,
        "progress": False,
        "ema_decay": 0.0,
        **kw,
    }
    return resolve_config(**opts)


@pytest.fixture(scope="module")
def handful(tmp_path_factory):
    """6 scenes at 64 px with edges on the 8-px grid; training sees each 10 times an epoch, val is the same 6."""
    root = make_masks_dataset(tmp_path_factory.mktemp("handful"), n_train=6, n_val=0, size=64, grid=8)
    shutil.rmtree(root / "val")
    shutil.copytree(root / "train", root / "val")
    for sub in ("images", "masks"):
        for p in list((root / "train" / sub).glob("*.png")):
            for r in range(1, 10):
                shutil.copy(p, p.with_name(f"{p.stem}_{r}.png"))
    return root


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, handful):
    out = tmp_path_factory.mktemp("run") / "lraspp"
    cfg = config(out, handful, head="lraspp", output_stride=8, epochs=10, batch_size=3, img_size=64, lr=0.2)
    return out, train(cfg)


def test_overfit_reaches_miou_near_100_and_writes_the_run_files(overfit_run, handful):
    out, summary = overfit_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"miou", "pixel_acc", "ema_miou", "ema_pixel_acc"} <= set(rows[0])
    assert summary["best"]["miou"] >= 88.0 and summary["best"]["pixel_acc"] >= 97.0
    assert rows[0]["miou"] < summary["best"]["miou"] - 20  # it learned, it did not start there
    assert (out / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best, fused = load_segmenter(out / "best.safetensors"), load_segmenter(out / "best_fused.safetensors")
    assert (
        not best.inference_mode and fused.inference_mode and best.class_names == ["background", "red", "green", "blue"]
    )
    samples, classes, _ = load_splits(handful, splits=("val",))
    x = torch.stack([SegmentationDataset(samples["val"], classes)[i][0] for i in range(6)])
    with torch.no_grad():
        assert torch.equal(best(x)["out"].argmax(1), fused(x)["out"].argmax(1))


def test_eval_command_scores_full_resolution_images_of_any_size(overfit_run, handful, tmp_path):
    out, summary = overfit_run
    data = make_masks_dataset(tmp_path / "mixed", n_train=1, n_val=2, size=64, val_sizes=((48, 80), (72, 40)))
    report = tmp_path / "eval.json"
    rc = main(
        [
            "eval",
            "--task",
            "segment",
            "--data",
            str(data),
            "--checkpoint",
            str(out / "best.safetensors"),
            "--json",
            str(report),
            "--batch-size",
            "3",
        ]  # no --workers: the default that fits the cores (it once reached the loader as None)
    )
    r = json.loads(report.read_text())
    assert rc == 0 and r["images"] == 4 and {"miou", "pixel_acc", "per_class_iou"} <= set(r)
    # The same numbers, image by image at each image's own size, with the model called directly.
    model = load_segmenter(out / "best.safetensors")
    samples, classes, _ = load_splits(data, splits=("val",))
    ds, cm = SegmentationDataset(samples["val"], classes), 0
    for i in range(len(ds)):
        x, y = ds[i]
        with torch.no_grad():
            cm = cm + confusion_matrix(model(x[None])["out"].argmax(1)[0], y, 4)
    expected = segmentation_scores(cm, classes)
    assert r["miou"] == pytest.approx(expected["miou"]) and r["per_class_iou"] == pytest.approx(
        expected["per_class_iou"]
    )
    # On the training run's own validation set, the command reproduces the run's number.
    again = evaluate_checkpoint(handful, out / "best.safetensors", workers=0)
    assert again["miou"] == pytest.approx(summary["best"]["miou"], abs=0.05) and again["images"] == 6


def test_onnx_export_matches_pytorch_at_other_sizes(overfit_run, handful, tmp_path):
    out, summary = overfit_run
    model = load_segmenter(out / "best.safetensors")
    report = export_segmenter(model, tmp_path / "seg.onnx", argmax=True)
    assert report.max_abs_diff <= report.tolerance and report.check.startswith("onnxruntime")
    assert (64, 64) in report.sizes and any(h != w for h, w in report.sizes)
    assert report.argmax_agreement >= 99.9 and report.labels_agreement >= 99.9
    meta = read_segmentation_metadata(tmp_path / "seg.onnx")
    assert (
        meta["task"] == "segment" and meta["class_names"] == model.class_names and meta["input_size"] == [3, "H", "W"]
    )
    onnx_scores = evaluate_onnx_segmenter(tmp_path / "seg.onnx", handful)
    assert onnx_scores["miou"] == pytest.approx(summary["best"]["miou"], abs=0.05)
    rc = main(
        [
            "export",
            "--task",
            "segment",
            "--checkpoint",
            str(out / "best_fused.safetensors"),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "cli.onnx"),
            "--img-size",
            "48",
        ]
    )
    assert rc == 0 and read_segmentation_metadata(tmp_path / "cli.onnx")["outputs"] == ["logits: (N, classes, H, W)"]


def test_resume_after_an_interruption_is_bit_exact(tmp_path, monkeypatch):
    data = make_masks_dataset(tmp_path / "d", n_train=8, n_val=2)
    opts = {"head": "deeplabv3", "aux_weight": 0.4, "deterministic": True, "ema_decay": 0.99}
    train(config(tmp_path / "full", data, **opts))
    real, calls = tr._save_epoch, []

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "_save_epoch", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut", data, **opts))
    monkeypatch.setattr(tr, "_save_epoch", real)
    train(resolve_config(task="segment", resume=str(tmp_path / "cut"), workers=0))
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert calls == [1] and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["miou"] == json.loads(
        (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1]
    )["miou"]


def test_the_mobilenet_v3_peer_trains_with_the_same_command(tmp_path, capsys):
    data = make_masks_dataset(tmp_path / "d", n_train=4, n_val=1)
    common = [
        "train",
        "--task",
        "segment",
        "--data",
        str(data),
        "--img-size",
        "32",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert main([*common, "--variant", "mnv3", "--head", "lraspp", "--out", str(tmp_path / "mnv3")]) == 0
    peer = load_segmenter(tmp_path / "mnv3" / "best_fused.safetensors")
    assert peer.config.backbone == "mnv3" and peer.config.head == "lraspp" and peer.inference_mode
    assert main([*common, "--variant", "mnv3", "--output-stride", "8", "--out", str(tmp_path / "x")]) == 2
    assert "output-stride 16 only" in capsys.readouterr().err
    refused = {
        ("--augment", "randaugment"): "classification's",
        ("--head", "lraspp", "--aux-weight", "0.4"): "LR-ASPP has none",
        ("--variant", "mnv3", "--k", "1"): "--k apply to MobileOne",
    }
    for bad, message in refused.items():
        assert main([*common, *bad, "--out", str(tmp_path / "y")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@torch.no_grad()
def test_the_peers_train_on_equal_terms():
    """The run's ``init`` gives the MobileNetV3 peers their identity start (every residual block passes
    its input on), as MobileOne's layers get theirs; ``init="torch"`` keeps torchvision's. Their
    BatchNorm statistics follow the weights as MobileOne's do (momentum 0.1, not torchvision's 0.01)."""
    x = torch.randn(2, 16, 8, 8)  # the first residual block's input: 16 channels
    for init, passes in (("identity", True), ("torch", False)):
        cfg = resolve_config(task="segment", variant="mnv3", head="lraspp", init=init, img_size=32)
        model = build_segmenter(cfg, ["background", "digit"])
        blocks = [m for m in model.backbone.modules() if getattr(m, "use_res_connect", False)]
        assert len(blocks) == 10 and torch.equal(blocks[0].eval()(x), x) is passes
        assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}


SLOW = pytest.mark.slow  # converters that take 5-60 s on 2 cores


@pytest.mark.parametrize(
    "fmt", ["torchscript", pytest.param("coreml", marks=SLOW), pytest.param("executorch", marks=SLOW)]
)
def test_other_formats_convert_and_are_checked(overfit_run, tmp_path, fmt):
    out, _ = overfit_run
    model = load_segmenter(out / "best.safetensors")
    report = export_segmenter(model, tmp_path / "seg", fmt, img_size=64, argmax=True)
    meta = read_segmentation_metadata(report.path)
    assert meta["task"] == "segment" and meta["class_names"] == model.class_names
    if fmt == "coreml":  # predicts on macOS only: elsewhere the check is structural
        assert report.check.startswith("structural") and "no batch norm" in report.check
    else:
        assert report.max_abs_diff <= report.tolerance and report.labels_agreement >= 99.9
        assert len(report.sizes) == (2 if fmt == "torchscript" else 1)  # TorchScript takes any size


def test_batchnorm_floor_refuses_batch_1_and_skips_a_step_left_with_1_image(tmp_path, caplog):
    data = make_masks_dataset(tmp_path / "d", n_train=4, n_val=2)
    with pytest.raises(ValueError, match=r"at least 2 images per micro-batch .*--batch-size 1 .* gives 1"):
        config(tmp_path / "b1", data, batch_size=1)
    assert config(tmp_path / "lr", data, head="lraspp", batch_size=1).batch_size == 1  # no 1x1 BatchNorm there
    with pytest.raises(ValueError, match=r"--batch-size 4 with --accum-steps 4 gives 1"):
        config(tmp_path / "acc", data, accum_steps=4)
    (data / "train" / "images" / "000.png").write_bytes(b"not an image")  # its batch of 2 keeps 1 image
    summary = train(config(tmp_path / "run", data, batch_size=2, epochs=1))
    assert summary["last"]["skipped_steps"] == 1 and summary["last"]["bad_images"] == 1
    assert "a micro-batch of 1 image(s) (unreadable images left out) is below the 2" in caplog.text
