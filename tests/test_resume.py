"""Resume: the same batches, crops and classes as the run it continues, from whatever state a kill left."""

import json
from pathlib import Path

import pytest
import torch

from mobileone.engine import DataError
from mobileone.engine.distributed import Env, make_loader
from mobileone.engine.rundir import RunDir, RunDirError
from mobileone.tasks import resolve_config, train
from mobileone.tasks.classify.data import (
    ImageFolderDataset,
    collate_skip_bad,
    train_transform,
)

from .classify_data import config, make_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def test_augmentation_is_a_function_of_seed_epoch_and_index_in_workers(data):
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


def test_resume_refuses_changed_classes(tmp_path):
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


def test_a_truncated_train_state_falls_back_to_the_previous_one(tmp_path):
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


def test_resume_from_a_truncated_train_state_redoes_one_epoch(tmp_path, data):
    out = tmp_path / "run"
    train(config(out, data, epochs=2))
    state = out / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a copy or a sync cut it short
    with pytest.warns(UserWarning, match=r"could not read train_state\.pt.*resuming from train_state\.prev\.pt"):
        train(resolve_config(resume=str(out)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert torch.load(state, weights_only=True)["epoch"] == 2
