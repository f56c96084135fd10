"""`predict` (PyTorch and ONNX) agrees with `eval` image by image, with the checkpoint's own preprocessing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobileone import create_model, predict, preprocessing, reparameterize_model, save_checkpoint
from mobileone.cli import main
from mobileone.tasks.classification.evaluate import evaluate_checkpoint

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
