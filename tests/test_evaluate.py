import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mobileone import create_model, load_checkpoint, reparameterize_model, save_checkpoint
from mobileone.cli import main
from mobileone.tasks.classify.data import DataError, ImageFolderDataset, eval_transform
from mobileone.tasks.classify.evaluate import accuracy_counts, evaluate_checkpoint

TINY = {"widths": [8, 16, 16, 16], "stem_width": 8, "blocks": [1, 1, 1, 1], "k": 2}


class FixedLogits(nn.Module):
    """Returns preset logits batch by batch, to check the counting."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.i = logits, 0
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.i : self.i + len(x)]
        self.i += len(x)
        return out


def test_accuracy_counts_top1_top5_and_bad_images():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [0, 9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5, 9.0]])
    labels = torch.tensor([0, 6, 3])  # right; outside the top 5; in the top 5 but not first
    loader = [
        (torch.zeros(2, 3, 4, 4), labels[:2], []),
        (None, None, ["a.png"]),
        (torch.zeros(1, 3, 4, 4), labels[2:], []),
    ]
    assert accuracy_counts(FixedLogits(logits), loader).tolist() == [3, 1, 2, 1]
    small = FixedLogits(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # fewer than 5 classes: top-5 is top-2
    assert accuracy_counts(small, [(torch.zeros(2, 3, 4, 4), torch.tensor([0, 0]), [])]).tolist() == [2, 1, 2, 0]


def write_val(root: Path, classes=("cat", "dog", "fox"), n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def checkpoints(tmp_path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=3)
    model.train()(torch.randn(8, 3, 16, 16))  # non-trivial BN statistics
    model.class_names = ["cat", "dog", "fox"]
    model.preprocess.update(input_size=16)
    unfused = save_checkpoint(model, tmp_path / "best.safetensors")
    fused = save_checkpoint(reparameterize_model(model.eval()), tmp_path / "best_fused.safetensors")
    return unfused, fused


def test_fused_and_unfused_checkpoints_score_the_same(tmp_path, checkpoints):
    data = write_val(tmp_path / "data" / "val")
    a = evaluate_checkpoint(data.parent, checkpoints[0], workers=0)
    b = evaluate_checkpoint(data.parent, checkpoints[1], workers=0)
    assert (a["fused"], b["fused"]) == (False, True)
    assert a["images"] == b["images"] == 12 and a["img_size"] == 16 and a["crop_pct"] == 0.875
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"] == 100.0


def test_classes_are_matched_by_name(tmp_path, checkpoints):
    full = evaluate_checkpoint(write_val(tmp_path / "full"), checkpoints[0], workers=0)
    # a folder holding only "fox" must be scored against the model's class 2, not 0
    only_fox = evaluate_checkpoint(write_val(tmp_path / "fox", ("fox",)), checkpoints[0], workers=0)
    model = load_checkpoint(checkpoints[0]).eval()
    ds = ImageFolderDataset(tmp_path / "fox", transform=eval_transform(16))
    with torch.no_grad():
        preds = model(torch.stack([ds[i][0] for i in range(len(ds))])).argmax(1)
    assert only_fox["top1"] == pytest.approx(100.0 * (preds == 2).float().mean().item())
    assert full["images"] == 12
    with pytest.raises(DataError, match=r"class folders \['wolf'\]"):
        evaluate_checkpoint(write_val(tmp_path / "wolf", ("cat", "wolf")), checkpoints[0], workers=0)


def test_cli_eval_writes_json(tmp_path, checkpoints, capsys):
    data = write_val(tmp_path / "val")
    out = tmp_path / "result.json"
    argv = ["eval", "--data", str(data), "--checkpoint", str(checkpoints[1]), "--json", str(out), "--workers", "0"]
    assert main([*argv, "--img-size", "24", "--crop-pct", "1.0"]) == 0
    result = json.loads(out.read_text())
    assert result["img_size"] == 24 and result["crop_pct"] == 1.0 and result["fused"] is True
    assert "top-1" in capsys.readouterr().out
    assert main(["eval", "--data", str(tmp_path / "nope"), "--checkpoint", str(checkpoints[0])]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_per_class_accuracy_and_confusion_matrix(tmp_path, checkpoints, capsys):
    data = write_val(tmp_path / "val")
    model = load_checkpoint(checkpoints[0]).eval()
    ds = ImageFolderDataset(data, transform=eval_transform(16))
    with torch.no_grad():
        preds = model(torch.stack([ds[i][0] for i in range(len(ds))])).argmax(1)
    labels = torch.tensor([t for _, t in ds.samples])
    out = tmp_path / "result.json"
    assert (
        main(["eval", "--data", str(data), "--checkpoint", str(checkpoints[0]), "--json", str(out), "--workers", "0"])
        == 0
    )
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(labels.tolist(), preds.tolist(), strict=True):
        expected[t, p] += 1
    assert r["confusion"] == expected.tolist() and r["class_names"] == ["cat", "dog", "fox"]
    for i, name in enumerate(r["class_names"]):
        assert r["per_class"][name] == {"images": 4, "top1": pytest.approx(100.0 * int(expected[i, i]) / 4)}
    assert r["top1"] == pytest.approx(100.0 * int(expected.trace()) / 12)
    assert "confusion (rows: true class, columns: predicted)" in printed and "fox" in printed
    assert (tmp_path / "result.confusion.png").read_bytes()[:4] == b"\x89PNG"
