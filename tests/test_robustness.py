"""Training you can trust: one test per item of the robustness issue (bad data, bad files, kills, bad arguments).

Each test is named after its item (``test_01_...`` for item 1). Tiny folders of 16 px images,
a 4-block MobileOne, one or two epochs.
"""

import errno
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mobileone import CheckpointError, create_model, load_checkpoint, read_checkpoint, save_checkpoint
from mobileone.cli import main
from mobileone.core.checkpoint import write_weights
from mobileone.core.files import DiskFullError, atomic_write
from mobileone.engine import DataError, NonFiniteOutputError, TrainingError
from mobileone.engine.distributed import Env, make_loader
from mobileone.engine.rundir import RunDir, RunDirError
from mobileone.tasks import resolve_config, train
from mobileone.tasks.classification.data import (
    ImageFolderDataset,
    UnreadableImageError,
    collate_skip_bad,
    load_image,
    train_transform,
)
from mobileone.tasks.classification.evaluate import evaluate_checkpoint
from mobileone.tasks.classification.task import ClassificationTask
from mobileone.tasks.images import image_size

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention
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
        *extra,
    ]


def finite(path: Path) -> bool:
    return all(torch.isfinite(v).all() for v in load_file(path).values() if v.is_floating_point())


REAL_LOSS = ClassificationTask.loss


def poison_loss(monkeypatch, at_call: int, action):
    """Run ``action(net)`` at the ``at_call``-th training loss (3 calls an epoch here)."""
    calls = []

    def loss(self, net, images, targets, cfg):
        calls.append(1)
        if len(calls) == at_call:
            action(net)
        return REAL_LOSS(self, net, images, targets, cfg)

    monkeypatch.setattr(ClassificationTask, "loss", loss)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=3)
    model.train()(torch.randn(4, 3, 16, 16))  # BN statistics of real activations
    return model.eval()


# ----------------------------------------------------------------------------- 1. augmentation and workers


def test_01_augmentation_is_a_function_of_seed_epoch_index_in_workers(data):
    """Persistent workers hold a copy of the dataset from epoch 0: the epoch must reach them through the keys."""
    batches = {}
    for workers in (0, 2):
        ds = ImageFolderDataset(data / "train", transform=train_transform(12, (0.2, 1.0)), seed=5)
        cfg = config(Path("unused"), data, workers=workers)
        loader = make_loader(ds, cfg, Env(torch.device("cpu")), collate_skip_bad, train=True)
        for epoch in (0, 1, 2):
            loader.sampler.set_epoch(epoch)
            batches[workers, epoch] = [(x, y) for x, y, _ in loader]
    for epoch in (0, 1, 2):
        for (x0, y0), (x2, y2) in zip(batches[0, epoch], batches[2, epoch], strict=True):
            assert torch.equal(x0, x2) and torch.equal(y0, y2)
    for a, b in ((0, 1), (1, 2)):  # a new epoch: new order and new crops, also in the workers
        assert not torch.equal(batches[2, a][0][0], batches[2, b][0][0])
    first = batches[0, 0][0]
    same_images = [(x, y) for batch in batches[2, 1] for x, y in zip(*batch, strict=True)]
    assert not any(torch.equal(first[0][0], x) for x, _ in same_images)  # no crop of epoch 0 comes back


# ----------------------------------------------------------------------------- 2. NaN stop


def test_02_nan_stop_keeps_only_finite_checkpoints(tmp_path, data, monkeypatch):
    def nan_statistics(net):  # the loss stays finite: train-mode BatchNorm uses the batch's statistics
        next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("nan"))

    poison_loss(monkeypatch, 4, nan_statistics)  # the first step of epoch 2
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"NaN or infinite values after epoch 2") as e:
        train(config(run, data, epochs=3))
    assert f"The last good checkpoint is {run / 'last.safetensors'} (epoch 1)" in str(e.value)
    assert finite(run / "last.safetensors") and finite(run / "best.safetensors")
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == 1

    poison_loss(monkeypatch, 1, nan_statistics)
    with pytest.raises(TrainingError, match="No checkpoint was written"):
        train(config(tmp_path / "first", data, epochs=2))
    assert not (tmp_path / "first" / "last.safetensors").exists()


# ----------------------------------------------------------------------------- 3. NaN outputs in evaluation


@pytest.mark.filterwarnings("ignore:checkpoint has NaN")
def test_03_evaluation_refuses_nan_outputs(tmp_path, data, tiny, capsys):
    tiny.class_names = ["blue", "green", "red"]
    tiny.preprocess.update(input_size=16)
    with torch.no_grad():
        tiny.linear.bias[1] = float("nan")
    path = save_checkpoint(tiny, tmp_path / "broken.safetensors")
    with pytest.raises(NonFiniteOutputError, match=rf"checkpoint {path} gives NaN or infinite outputs"):
        evaluate_checkpoint(data, path, workers=0)
    assert main(["eval", "--data", str(data), "--checkpoint", str(path), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not scored" in err and "top-1" not in err


# ----------------------------------------------------------------------------- 4. nothing readable


def test_04_no_readable_training_or_validation_image_stops(tmp_path, tiny):
    junk = make_data(tmp_path / "junk_train")
    for f in (junk / "train").rglob("*.png"):
        f.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"no training image of epoch 1 could be read \(24 unreadable\)"):
        train(config(tmp_path / "run1", junk))
    assert not (tmp_path / "run1" / "best.safetensors").exists()

    junk = make_data(tmp_path / "junk_val")
    for f in (junk / "val").rglob("*.png"):
        f.write_bytes(b"")
    with pytest.raises(DataError, match=r"no validation image could be read \(12 unreadable\)"):
        train(config(tmp_path / "run2", junk))
    assert not (tmp_path / "run2" / "best.safetensors").exists()

    path = save_checkpoint(tiny, tmp_path / "model.safetensors")
    with pytest.raises(DataError, match="none of the 12 images"):
        evaluate_checkpoint(junk / "val", path, workers=0)


# ----------------------------------------------------------------------------- 5. run directory lock


def test_05_two_runs_cannot_share_an_out_folder(tmp_path, data):
    out = tmp_path / "run"
    with RunDir(out):  # another run owns it (this process: alive)
        lock = json.loads((out / ".lock").read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        with pytest.raises(RunDirError, match=rf"in use by another run \(process {os.getpid()} on host"):
            train(config(out, data))
        assert not (out / "config.json").exists()
    assert not (out / ".lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=rf"locked by process {dead.pid}, which is no longer running"):
        train(config(out, data))
    assert (out / "best.safetensors").exists() and not (out / ".lock").exists()

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".lock").write_text(json.dumps({"pid": 1, "host": "gpu-node-7"}))
    with pytest.raises(RunDirError, match="on host gpu-node-7"):
        train(config(tmp_path / "other", data))


@pytest.mark.slow  # a training subprocess: about 5-15 s on 2 busy cores
def test_05_a_second_process_on_a_running_out_folder_stops(tmp_path, data, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-m", "mobileone", *cli_train(data, out, "--epochs", "200")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        assert main(cli_train(data, out, "--epochs", "2")) == 2
        assert f"in use by another run (process {first.pid} on host {socket.gethostname()}" in capsys.readouterr().err
        assert main(["train", "--resume", str(out), "--workers", "0"]) == 2  # nor can it be resumed meanwhile
        assert "in use by another run" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid  # a kill -9 leaves its lock ...
    with pytest.warns(UserWarning, match=f"locked by process {first.pid}, which is no longer running"), RunDir(out):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()  # ... which the next run takes over


# ----------------------------------------------------------------------------- 6. resume checks the classes


def test_06_resume_refuses_changed_classes(tmp_path):
    root = make_data(tmp_path / "data")
    run = tmp_path / "run"
    train(config(run, root))
    for split in ("train", "val"):
        (root / split / "red").rename(root / split / "purple")
    with pytest.raises(DataError, match=r"removed or renamed: \['red'\]; added: \['purple'\]"):
        train(resolve_config(resume=str(run)))
    for split in ("train", "val"):
        (root / split / "purple").rename(root / split / "red")
    make_data(root, classes=("yellow",))  # one more class: no raw size mismatch of the head
    with pytest.raises(DataError, match=r"removed or renamed: \[\]; added: \['yellow'\]"):
        train(resolve_config(resume=str(run)))


# ----------------------------------------------------------------------------- 7. folders that are not classes


def test_07_hidden_entries_and_link_loops_are_skipped(tmp_path):
    root = tmp_path / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (100 * i, 50, 0)).save(root / c / f"{i}.png")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "__MACOSX" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "a" / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(root / "a" / ".cache" / "thumb.png")
    (root / "a" / "loop").symlink_to(root)  # a link loop: os.walk(followlinks=True) goes ~40 levels deep
    (root / "a" / "self").symlink_to(root / "a")
    (root / "b" / "a_again").symlink_to(root / "a")  # another class's folder
    (root / "b" / "gone").symlink_to(tmp_path / "nowhere")
    elsewhere = tmp_path / "elsewhere" / "c"  # a class folder that is a link: read once, as its own class
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(elsewhere / "0.png")
    (root / "c").symlink_to(elsewhere)
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(root)
    assert ds.classes == ["a", "b", "c"]
    assert sorted((Path(p).relative_to(root).as_posix(), t) for p, t in ds.samples) == [
        ("a/0.png", 0),
        ("a/1.png", 0),
        ("b/0.png", 1),
        ("b/1.png", 1),
        ("c/0.png", 2),
    ]
    text = " ".join(str(w.message) for w in record)
    assert "skipped 4 hidden entries" in text and ".ipynb_checkpoints" in text and "__MACOSX" in text
    assert "skipped 3 links to folders that were already read" in text and "a_again" in text
    assert "skipped 1 broken links" in text and "gone" in text


# ----------------------------------------------------------------------------- 8. decompression bombs


def write_bomb(path: Path, side: int = 20000) -> Path:
    """A tiny PNG whose header claims side x side pixels (more than PIL's bomb limit of 179 M)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", side, side)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    path.write_bytes(bytes(b))
    return path


def test_08_decompression_bomb_is_an_unreadable_image(tmp_path):
    root = make_data(tmp_path / "data")
    bomb = write_bomb(root / "train" / "red" / "bomb.png")
    with pytest.raises(UnreadableImageError, match=rf"{bomb}.*DecompressionBombError"):
        load_image(bomb)
    ds = ImageFolderDataset(root / "train")
    assert [path for img, path in (ds[i] for i in range(len(ds))) if img is None] == [str(bomb)]
    with pytest.raises(DataError, match=r"unreadable image\(s\) .*bomb\.png.*--strict-images"):
        train(config(tmp_path / "strict", root, batch_size=25, strict_images=True))


# ----------------------------------------------------------------------------- 9. checkpoint metadata


def apple_file(tmp_path: Path, model) -> Path:
    """A plain state dict, as Apple's files are, so the metadata can only come from a JSON beside it."""
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize(
    "sidecar, complaint",
    [
        ([1, 2, 3], "holds a JSON list, not an object"),
        ("{not json", "is not readable JSON"),
        (
            {"config": {**TINY, "wings": 2}, "num_classes": 3, "inference_mode": False},
            r"unknown config key\(s\) \['wings'\]",
        ),
        (
            {"config": create_model("s0").config.to_dict(), "num_classes": 1000, "inference_mode": False},
            "describes another model than the file's tensors",
        ),
        (
            {"config": {**TINY, "blocks": [1, 1, 1, 1]}, "num_classes": 3, "inference_mode": True},
            "describes another model",
        ),
        ({"config": {**TINY, "k": -1}, "num_classes": 3, "inference_mode": False}, "has an invalid config"),
    ],
)
def test_09_unusable_metadata_falls_back_to_the_tensors(tmp_path, tiny, sidecar, complaint):
    path = apple_file(tmp_path, tiny)
    json_path = tmp_path / "model.json"
    json_path.write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    with pytest.warns(UserWarning, match=complaint) as record:
        model = load_checkpoint(path)
    message = next(str(w.message) for w in record if "metadata" in str(w.message))
    assert str(json_path) in message and "read off the tensors" in message
    assert model.config == tiny.config and model.class_names is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tiny(x))


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"class_names": ["cat", "dog"]}, r"class_names \(2 names\) do not fit the 3-class head"),
        ({"variant": "mobileone_s1"}, "variant 'mobileone_s1' does not match"),
        ({"preprocess": {"mean": [0.5, 0.5], "std": [1, 1, 1]}}, r"preprocess block ignored \(mean"),
        ({"preprocess": {"input_size": "big"}}, "input_size 'big' is not an integer"),
        ({"preprocess": {"std": [0.2, 0.0, 0.2]}}, r"std .* has a value <= 0"),
    ],
)
def test_09_metadata_parts_that_do_not_fit_are_dropped(tmp_path, tiny, change, complaint):
    tiny.class_names = ["x", "y", "z"]
    path = save_checkpoint(tiny, tmp_path / "model.safetensors")
    info = json.loads(path.with_suffix(".json").read_text()) | change
    write_weights(path, tiny.state_dict(), info)  # embedded in the file: checked all the same
    with pytest.warns(UserWarning, match=complaint) as record:
        ckpt = read_checkpoint(path)
        model = load_checkpoint(path)
    assert any(str(w.message).startswith(f"the metadata embedded in {path}: ") for w in record)
    assert ckpt.config == tiny.config and ckpt.variant is None
    if "preprocess" in change:
        assert model.preprocess["mean"] == (0.485, 0.456, 0.406) and model.preprocess["input_size"] == 224
    if "class_names" in change:
        assert ckpt.meta["class_names"] is None
    else:
        assert ckpt.meta["class_names"] == ["x", "y", "z"]


def test_09_embedded_metadata_wins_over_a_foreign_json(tmp_path, tiny):
    tiny.class_names = ["x", "y", "z"]
    path = save_checkpoint(tiny, tmp_path / "model.safetensors", epoch=7)
    other = create_model({**TINY, "widths": [8, 16, 16, 24]}, num_classes=10)
    save_checkpoint(other, tmp_path / "other.safetensors")
    (tmp_path / "other.json").replace(tmp_path / "model.json")  # another model's JSON beside this file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = read_checkpoint(path)
    assert ckpt.config == tiny.config and ckpt.meta["epoch"] == 7 and ckpt.meta["class_names"] == ["x", "y", "z"]
    write_weights(path, tiny.state_dict(), {**json.loads((tmp_path / "model.json").read_text())})
    with pytest.warns(UserWarning, match=rf"embedded in {path} describes another model.*read off the tensors"):
        assert read_checkpoint(path).config == tiny.config


# ----------------------------------------------------------------------------- 10. broken files, full disks


def test_10_self_referencing_checkpoint_is_refused(tmp_path):
    loop: dict = {}
    loop["state_dict"] = loop
    torch.save(loop, tmp_path / "loop.pth")
    for source in (tmp_path / "loop.pth", loop):
        with pytest.raises(CheckpointError, match="a dict that contains itself"):
            read_checkpoint(source)


def test_10_truncated_train_state_falls_back_to_the_previous_one(tmp_path):
    run = RunDir(tmp_path / "run")
    with run:
        for epoch in (1, 2):
            run.save_state({"model": {"w": torch.full((64,), float(epoch))}, "epoch": epoch})
    assert torch.load(run.previous_state_path, weights_only=True)["epoch"] == 1
    run.state_path.write_bytes(run.state_path.read_bytes()[:300])
    with pytest.warns(UserWarning, match=r"could not read train_state\.pt.*resuming from train_state\.prev\.pt"):
        assert run.load_state(torch.device("cpu"))["epoch"] == 1
    run.previous_state_path.write_bytes(b"")
    with pytest.raises(RunDirError, match=r"train_state\.pt: .*train_state\.prev\.pt: "):
        run.load_state(torch.device("cpu"))


def test_10_resume_from_a_truncated_train_state_redoes_one_epoch(tmp_path, data):
    out = tmp_path / "run"
    train(config(out, data, epochs=2))
    state = out / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a copy or a sync cut it short
    with pytest.warns(UserWarning, match=r"could not read train_state\.pt.*resuming from train_state\.prev\.pt"):
        train(resolve_config(resume=str(out)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert torch.load(state, weights_only=True)["epoch"] == 2


def test_10_disk_full_names_the_kept_file(tmp_path, data, monkeypatch, capsys):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(*args, **kwargs):  # epoch 1 writes last and best; epoch 2's last hits a full disk
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    assert main(cli_train(data, out, "--epochs", "2")) == 2
    err = capsys.readouterr().err
    assert f"no space left on the device while writing {out / 'last.safetensors'}" in err
    assert f"the previous {out / 'last.safetensors'} was kept" in err and f"--resume {out}" in err
    assert json.loads((out / "last.json").read_text())["epoch"] == 1 and finite(out / "last.safetensors")
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()

    def full_disk(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"x\.txt was not written"):  # the writer itself, for any file
        atomic_write(tmp_path / "x.txt", full_disk)
    assert not (tmp_path / "x.txt").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only; root ignores permission bits, so access checks are told the same."""
    folders = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and any(Path(path).resolve() == f.resolve() for f in folders):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder)
        return folder

    yield make
    for f in folders:
        f.chmod(0o755)


def test_10_read_only_out_is_refused_clearly(tmp_path, data, read_only, capsys):
    out = read_only(tmp_path / "ro")
    assert main(cli_train(data, out)) == 2
    assert f"{out} is not writable" in capsys.readouterr().err
    target = out / "model.onnx"
    assert main(["export", "--variant", "s0", "--format", "onnx", "--out", str(target), "--no-check"]) == 2
    err = capsys.readouterr().err
    assert f"{out} is not writable" in err and "choose another --out" in err and "Traceback" not in err


def test_10_corrupt_onnx_and_unreadable_calibration_images(tmp_path, data, tiny, capsys):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    assert main(["eval", "--onnx", str(bad), "--data", str(data)]) == 2
    assert f"onnxruntime cannot load {bad}" in capsys.readouterr().err
    from mobileone.deploy.quantize import quantize_model

    junk = make_data(tmp_path / "junk", n_val=1)
    for f in junk.rglob("*.png"):
        f.write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the .* images drawn from .* could be read"):
        quantize_model(tiny, junk, tmp_path / "q" / "int8.onnx", img_size=16)
    assert not (tmp_path / "q").exists()  # refused before anything was exported


# ----------------------------------------------------------------------------- 11. arguments


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--label-smoothing", "2"], r"label_smoothing must be a number in \[0.0, 1.0\), got 2.0"),
        (["--crop-scale", "0.9", "0.1"], r"crop_scale must be two numbers 0 < min <= max <= 1"),
        (["--hflip", "5"], r"hflip must be a number in \[0.0, 1.0\], got 5.0"),
        (["--ema-decay", "2"], r"ema_decay must be a number in \[0.0, 1.0\), got 2.0"),
        (["--magnitude", "-3"], r"magnitude must be a number in \[0.0, 30.0\], got -3.0"),
        (["--steps-per-epoch", "0"], r"steps_per_epoch must be an integer >= 1, got 0"),
        (["--img-size", "7"], r"img_size must be an integer in 16..4096, got 7"),
        (["--arch", '{"widths": [8, 16, 16, 16], "wings": 2}'], r"arch must be a JSON object of MobileOneConfig"),
    ],
)
def test_11_bad_arguments_name_the_valid_range(tmp_path, data, capsys, flags, message):
    out = tmp_path / "run"
    argv = [a for a in cli_train(data, out) if a != "--no-ema"]  # --no-ema would override --ema-decay
    assert main([*argv, *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_11_bad_sizes_and_model_arguments(tmp_path, tiny, capsys):
    assert (
        main(["export", "--variant", "s0", "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--img-size", "0"])
        == 2
    )
    assert "img_size must be an integer in 16..4096 (pixels), got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0 \(0 removes the head\), got -1"):
        tiny.reset_classifier(-1)
    with pytest.raises(ValueError, match=r"freeze_stages takes 0..5 .* got 9"):
        tiny.freeze_stages(9)
    with pytest.raises(ValueError, match=r"in_chans must be an int >= 1 \(3 for RGB\), got 0"):
        create_model(TINY, in_chans=0)


# ----------------------------------------------------------------------------- 12. file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_12_run_files_respect_the_umask(tmp_path, tiny, umask, mode):
    old = os.umask(umask)
    try:
        with RunDir(tmp_path / "run") as run:
            run.write_json("config.json", {"a": 1})
            run.save_state({"model": {}, "epoch": 1})
            run.save_state({"model": {}, "epoch": 2})
            path = save_checkpoint(tiny, run.path / "best.safetensors")
            lock = (run.path / ".lock").stat().st_mode & 0o777
        files = ["config.json", "train_state.pt", "train_state.prev.pt", path.name, "best.json"]
        assert {f: (run.path / f).stat().st_mode & 0o777 for f in files} == dict.fromkeys(files, mode)
        assert lock == mode
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- 13. weights + metadata pairs


@pytest.mark.parametrize("name", ["last.safetensors", "last.pth"])
def test_13_a_kill_between_weights_and_json_never_pairs_them_wrongly(tmp_path, tiny, monkeypatch, name):
    import mobileone.core.checkpoint as ck

    tiny.class_names = ["x", "y", "z"]
    path = save_checkpoint(tiny, tmp_path / name, epoch=1)
    real = ck.atomic_write

    def killed_before_json(target, write, *args):
        if Path(target).suffix == ".json":
            raise KeyboardInterrupt  # the process dies after the weights, before their JSON
        real(target, write, *args)

    monkeypatch.setattr(ck, "atomic_write", killed_before_json)
    tiny.class_names = ["p", "q", "r"]
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny, path, epoch=2)
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] == 1  # the stale JSON
    ckpt = read_checkpoint(path)
    assert ckpt.meta["epoch"] == 2 and ckpt.meta["class_names"] == ["p", "q", "r"]  # what the weights say


def test_13_stale_temporaries_are_removed_by_the_next_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in (".last.safetensors.k2j3.tmp", ".train_state.pt.x81.tmp"):
        (run / name).write_bytes(b"half a file")
    (run / "keep.tmp").write_text("not ours")
    with pytest.warns(UserWarning, match=r"removed 2 temporary file\(s\) an interrupted run left"), RunDir(run):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["keep.tmp"]


# ----------------------------------------------------------------------------- 14. Ctrl-C


def test_14_ctrl_c_says_how_to_resume(tmp_path, data, monkeypatch, capsys):
    def interrupt(net):
        raise KeyboardInterrupt

    poison_loss(monkeypatch, 5, interrupt)  # in epoch 2
    out = tmp_path / "run"
    assert main(cli_train(data, out, "--epochs", "2")) == 130
    err = capsys.readouterr().err
    assert f"mobileone train --resume {out}" in err and "Traceback" not in err
    assert not (out / ".lock").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--workers", "0"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    poison_loss(monkeypatch, 1, interrupt)
    assert main(cli_train(data, tmp_path / "early")) == 130
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess with 2 data workers: about 10-20 s on 2 busy cores
def test_14_sigint_to_the_process_group_prints_no_traceback(tmp_path, data):
    """A terminal's Ctrl-C signals the whole process group: the trainer and its data workers."""
    out = tmp_path / "run"
    argv = cli_train(data, out, "--epochs", "1000")
    argv[argv.index("--workers") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mobileone", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "train_state.pt").exists():
        time.sleep(0.05)
    # Python drops a SIGINT that lands while a finalizer runs ("Exception ignored"), as a user's
    # second Ctrl-C would then show; press again until the run stops (it must stop cleanly).
    for _ in range(10):
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        proc.kill()
        pytest.fail("ten SIGINTs did not stop the run")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"mobileone train --resume {out}" in err


# ----------------------------------------------------------------------------- 15. EXIF


def test_15_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (32, 16), (220, 0, 0))  # stored sideways: red left half, blue right half
    img.paste((0, 0, 220), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "phone.jpg")
    assert out.size == image_size(tmp_path / "phone.jpg") == (16, 32)
    top, bottom = np.asarray(out)[4, 8], np.asarray(out)[27, 8]
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]  # red on top, blue below
    # For annotations made on the stored pixels (boxes, masks), the orientation can be left alone:
    assert load_image(tmp_path / "phone.jpg", upright=False).size == image_size(tmp_path / "phone.jpg", False)
    assert image_size(tmp_path / "phone.jpg", upright=False) == (32, 16)


# ----------------------------------------------------------------------------- 16. suffixes


def test_16_save_checkpoint_honours_the_suffix(tmp_path, tiny):
    for name in ("model.pth", "model.pt", "apple.pth.tar"):
        path = save_checkpoint(tiny, tmp_path / name, epoch=3)
        assert path == tmp_path / name and path.is_file()
        obj = torch.load(path, weights_only=True)
        assert set(obj) == {"state_dict", "mobileone"} and obj["mobileone"]["epoch"] == 3
        assert load_checkpoint(path).config == tiny.config
    assert not list(tmp_path.glob("*.safetensors"))
    assert save_checkpoint(tiny, tmp_path / "plain") == tmp_path / "plain.safetensors"
    with pytest.raises(ValueError, match=r"cannot tell the format of model\.weights"):
        save_checkpoint(tiny, tmp_path / "model.weights")
