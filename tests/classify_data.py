"""Tiny classification folders and a 4-block MobileOne for tests that run the engine or the command line."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from mobileone.tasks import resolve_config
from mobileone.tasks.classify.task import ClassifyTask

TINY = {"widths": [8, 16, 16, 16], "stem_width": 8, "blocks": [1, 1, 1, 1], "k": 2}
ROOT = Path(__file__).resolve().parents[1]


def make_data(root: Path, classes=("red", "green", "blue"), n_train: int = 8, n_val: int = 4) -> Path:
    """Noisy colour classes, ``train/`` and ``val/``: 3 steps an epoch at batch 8."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = rng.integers(0, 90, (16, 16, 3))
                x[..., c % 3] += 160
                Image.fromarray(x.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def config(out: Path, data: Path, **kw):
    opts = {
        "data": str(data),
        "arch": TINY,
        "out": str(out),
        "epochs": 1,
        "batch_size": 8,
        "img_size": 16,
        "workers": 0,
        "progress": False,
        "ema_decay": 0.0,
        **kw,
    }
    return resolve_config(**opts)


def cli_train(data: Path, out: Path, *extra: str) -> list[str]:
    """``mobileone train`` arguments for the tiny model on ``data`` (1 epoch unless ``extra`` says otherwise)."""
    return [
        "train",
        "--data",
        str(data),
        "--arch",
        json.dumps(TINY),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--img-size",
        "16",
        "--workers",
        "0",
        "--no-progress",
        "--no-ema",
        "--epochs",  # own data without --epochs gets a floor of 500 steps; a later --epochs wins
        "1",
        *extra,
    ]


REAL_LOSS = ClassifyTask.loss


def poison_loss(monkeypatch, at_call: int, action):
    """Run ``action(net)`` at the ``at_call``-th training loss (3 calls an epoch here)."""
    calls = []

    def loss(self, net, images, targets, cfg):
        calls.append(1)
        if len(calls) == at_call:
            action(net)
        return REAL_LOSS(self, net, images, targets, cfg)

    monkeypatch.setattr(ClassifyTask, "loss", loss)


def finite(path: Path) -> bool:
    return all(torch.isfinite(v).all() for v in load_file(path).values() if v.is_floating_point())


def write_bomb(path: Path, side: int = 20000) -> Path:
    """A tiny PNG whose header claims side x side pixels (more than PIL's bomb limit of 179 M)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", side, side)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    path.write_bytes(bytes(b))
    return path


def apple_file(tmp_path: Path, model) -> Path:
    """A plain state dict, as Apple's files are, so the metadata can only come from a JSON beside it."""
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    return path
