"""`predict` (PyTorch and ONNX) agrees with `eval` image by image, with the checkpoint's own preprocessing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobileone import create_model, predict, preprocessing, reparameterize_model, save_checkpoint
from mobileone.cli import main
from mobileone.tasks.classify.evaluate import evaluate_checkpoint

from .conftest import TINY, settle_bn

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(4):
            x = rng.integers(0, 120, (40, 30, 3))
            x[..., c] += 120
            Image.fromarray(x.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = settle_bn(create_model(TINY, num_classes=3), shape=(4, 3, 24, 24))
    model.class_names = CLASSES
    model.preprocess.update(input_size=24, crop_pct=0.9, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    return save_checkpoint(reparameterize_model(model), tmp_path_factory.mktemp("ckpt") / "fused.safetensors")


def _top1_accuracy(results: list[dict]) -> float:
    hits = [r["top"][0]["class"] == Path(r["image"]).parent.name for r in results]
    return 100.0 * sum(hits) / len(hits)


def test_preprocessing_is_the_checkpoints(checkpoint):
    t = preprocessing(checkpoint)
    assert [type(s).__name__ for s in t.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert t.transforms[0].size == int(24 / 0.9) and t.transforms[1].size == (24, 24)
    assert t.transforms[3].mean == (0.5, 0.4, 0.3)


def test_predict_agrees_with_eval_pytorch_and_onnx(tmp_path, folder, checkpoint, capsys):
    pytest.importorskip("onnxruntime")
    results = predict(checkpoint, folder, topk=2)
    assert len(results) == 12 and all(len(r["top"]) == 2 for r in results)
    assert all(r["top"][0]["probability"] >= r["top"][1]["probability"] for r in results)
    assert {t["class"] for r in results for t in r["top"]} <= set(CLASSES)
    evaluated = evaluate_checkpoint(folder, checkpoint, workers=0)
    assert _top1_accuracy(results) == pytest.approx(evaluated["top1"])
    onnx = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(onnx)]) == 0
    capsys.readouterr()
    assert main(["predict", "--onnx", str(onnx), str(folder), "--topk", "2", "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in from_onnx] == [r["image"] for r in results]
    for a, b in zip(from_onnx, results, strict=True):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-4)


def test_predict_cli_lines_and_bad_input(tmp_path, folder, checkpoint, capsys):
    image = folder / "dog" / "0.png"
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--topk", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ") and line.endswith("%")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert main(["predict", "--checkpoint", str(checkpoint), str(broken)]) == 1  # reported, not a traceback
    assert "unreadable image" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="topk"):
        predict(checkpoint, image, topk=0)


# ---- every task: from a checkpoint or an ONNX file, the task read from the file


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    from .task_models import task_files as make_task_files

    return make_task_files(tmp_path_factory.mktemp("tasks"))


@pytest.mark.parametrize("source", ["checkpoint", "onnx"])
def test_predict_draws_and_records_detections(tmp_path, task_files, source, capsys):
    from mobileone.tasks.detect.model import load_detector

    images = task_files["detect data"] / "val"
    model_file = task_files["detect"]
    if source == "onnx":
        pytest.importorskip("onnxruntime")
        model_file = tmp_path / "det.onnx"
        argv = ["export", "--checkpoint", str(task_files["detect"]), "--format", "onnx", "--nms", "--out"]
        assert main([*argv, str(model_file)]) == 0
    out = tmp_path / "pred"
    assert main(["predict", f"--{source}", str(model_file), str(images), "--out", str(out), "--min-score", "0"]) == 0
    lines = capsys.readouterr().out
    written = json.loads((out / "predictions.json").read_text())
    files = sorted(p for p in images.iterdir() if p.suffix in (".png", ".jpg"))
    assert [Path(r["image"]).name for r in written["images"]] == [p.name for p in files]
    first = written["images"][0]
    assert first["detections"] and {"class", "label", "score", "box"} <= set(first["detections"][0])
    with Image.open(first["picture"]) as picture, Image.open(files[0]) as original:
        assert picture.size == original.size  # drawn on the image's own pixels
        assert not np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(original.convert("RGB")))
    coco = written["coco"][0]
    x0, y0, x1, y1 = first["detections"][0]["box"]
    assert coco["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0]) and coco["category"] in ("red", "blue")
    assert f"{files[0]}:" in lines
    # The same detections as the model's own eval-mode forward, in the image's pixels.
    model = load_detector(task_files["detect"])
    size = model.config.img_size
    from mobileone.tasks.detect.augment import letterbox_transform

    with torch.no_grad():
        det = model(letterbox_transform(size)(Image.open(files[0]).convert("RGB"))[None])[0]
    w, h = Image.open(files[0]).size
    expected = (det["boxes"][0] * max(w, h) / size).tolist()  # letterboxed: one scale, padding right and bottom
    atol = 1e-2 if source == "checkpoint" else 0.5
    assert first["detections"][0]["box"] == pytest.approx(expected, abs=atol)


@pytest.mark.parametrize("source", ["checkpoint", "onnx"])
def test_predict_writes_masks_and_overlays(tmp_path, task_files, source, capsys):
    images = task_files["segment data"] / "val" / "images"
    model_file = task_files["segment"]
    if source == "onnx":
        pytest.importorskip("onnxruntime")
        model_file = tmp_path / "seg.onnx"
        assert (
            main(["export", "--checkpoint", str(task_files["segment"]), "--format", "onnx", "--out", str(model_file)])
            == 0
        )
    out = tmp_path / "pred"
    assert main(["predict", f"--{source}", str(model_file), str(images), "--out", str(out)]) == 0
    written = json.loads((out / "predictions.json").read_text())["images"]
    assert len(written) == len(list(images.iterdir()))
    for r in written:
        with Image.open(r["mask"]) as mask, Image.open(r["overlay"]) as overlay, Image.open(r["image"]) as img:
            assert mask.mode == "P" and mask.size == overlay.size == img.size
            assert set(np.unique(np.asarray(mask))) <= set(range(4))
        assert sum(r["classes"].values()) == pytest.approx(100.0, abs=0.01)
        assert set(r["classes"]) <= {"background", "red", "green", "blue"}
    assert "_mask.png" in capsys.readouterr().out


def test_a_classifier_is_never_given_another_tasks_file(tmp_path, task_files, capsys):
    pytest.importorskip("onnxruntime")
    seg_onnx = tmp_path / "seg.onnx"
    assert main(["export", "--checkpoint", str(task_files["segment"]), "--format", "onnx", "--out", str(seg_onnx)]) == 0
    image = next((task_files["segment data"] / "val" / "images").iterdir())
    capsys.readouterr()
    assert main(["predict", "--task", "classify", "--onnx", str(seg_onnx), str(image)]) == 2
    assert f"{seg_onnx} is a segment ONNX file (its metadata says so), not classify" in capsys.readouterr().err
    from mobileone.deploy.common import ExportError
    from mobileone.deploy.predict_onnx import predict_onnx

    with pytest.raises(ExportError, match="is a segment model .*, not a classify one"):
        predict_onnx(seg_onnx, image)


def test_predict_never_replaces_a_picture_it_did_not_draw(tmp_path, task_files, capsys):
    images = task_files["detect data"] / "val"
    first = sorted(p for p in images.iterdir() if p.suffix in (".png", ".jpg"))[0]
    out = tmp_path / "pred"
    out.mkdir()
    mine = out / f"{first.stem}_boxes.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(mine)
    before = mine.read_bytes()
    assert main(["predict", "--checkpoint", str(task_files["detect"]), str(first), "--out", str(out)]) == 2
    assert f"{mine} already exists and was not written by mobileone" in capsys.readouterr().err
    assert mine.read_bytes() == before
    mine.unlink()
    argv = ["predict", "--checkpoint", str(task_files["detect"]), str(first), "--out", str(out)]
    assert main(argv) == 0 and main(argv) == 0  # its own pictures it replaces
