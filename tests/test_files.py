"""Every file the library writes: beside its place, then renamed; never over a file it did not write; no
temporary left behind that the next run does not remove."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobileone import read_checkpoint, save_checkpoint
from mobileone.cli import main
from mobileone.core.files import (
    DiskFullError,
    NotOursError,
    atomic_folder,
    atomic_write,
    remove_stale_temporaries,
    write_json_result,
)
from mobileone.engine.rundir import RunDir

from .classify_data import ROOT, cli_train, finite


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_kill_during_a_checkpoint_write_leaves_nothing_the_next_run_keeps(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = (
        "import torch\n"
        "from mobileone.core.checkpoint import write_weights\n"
        "sd = {'w': torch.zeros(60_000_000)}\n"
        "while True:\n"
        f"    write_weights({str(run / 'last.safetensors')!r}, sd, {{'epoch': 1}})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 120

    def writing() -> bool:  # a temporary with part of the weights in it
        for p in run.iterdir():
            try:
                if p.name.startswith(".") and p.stat().st_size > 10_000_000:
                    return True
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        return False

    while time.time() < deadline and not writing():
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)  # in the middle of a 240 MB write
    proc.wait()
    left = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert left, "the kill came too late to leave a temporary"
    with pytest.warns(UserWarning, match="temporary file"), RunDir(run):
        pass
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_every_temporary_pattern_is_removed_and_only_when_its_writer_is_gone(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    names = {
        f".model.{dead}-0123abcd.tmp.onnx": "stale",  # an export killed mid-write
        f".results.{dead}-89abcdef.tmp.json": "stale",
        f".model.{alive}-0123abcd.tmp.onnx": "being written",  # by a live process: kept
        "keep.tmp": "not ours",
    }
    for name in names:
        (tmp_path / name).write_text("half a file")
    (tmp_path / f".digits.{dead}-00000000.tmp").mkdir()  # a dataset cache a kill left half-built
    atomic_write(tmp_path / "results.json", lambda tmp: Path(tmp).write_text("{}"))  # any write cleans beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["results.json", "keep.tmp", f".model.{alive}-0123abcd.tmp.onnx"]
    )
    # Inside a locked run directory every temporary is stale, including other writers' patterns.
    run = tmp_path / "run"
    run.mkdir()
    for name in (".last.safetensors.k2j3.tmp", ".train_state.pt.x81.tmp", ".tmpAb3dE9", f".best.{alive}-01234567.tmp"):
        (run / name).write_bytes(b"half a file")
    assert len(remove_stale_temporaries(run)) == 4 and not list(run.iterdir())


def test_a_dataset_cache_is_built_once_and_a_killed_build_is_removed(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".digits.{dead}-0badf00d.tmp").mkdir()

    def build(folder: Path) -> None:
        (folder / "val").mkdir()
        (folder / "val" / "x.txt").write_text("x")

    assert atomic_folder(tmp_path / "digits", build, done="val") == tmp_path / "digits"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
    assert atomic_folder(tmp_path / "digits", lambda f: pytest.fail("built twice"), done="val").is_dir()


def test_json_results_replace_only_json_results(tmp_path):
    path = write_json_result(tmp_path / "r.json", {"top1": 1.0}, "eval")
    assert json.loads(path.read_text())["written_by"] == "mobileone eval"
    write_json_result(path, {"top1": 2.0}, "eval")
    assert json.loads(path.read_text())["top1"] == 2.0
    for name, content in (("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"), ("notes.json", b'{"a": 1}')):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(NotOursError, match=f"{name} already exists and was not written by mobileone"):
            write_json_result(tmp_path / name, {"top1": 3.0}, "eval")
        assert (tmp_path / name).read_bytes() == content


def test_a_full_disk_names_the_kept_file(tmp_path, data, monkeypatch, capsys):
    import safetensors.torch

    real, calls = safetensors.torch.save, []

    def save(*args, **kwargs):  # epoch 1 writes last, best and best_fused; epoch 2's last hits a full disk
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save", save)
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


def test_a_read_only_out_is_refused_clearly(tmp_path, data, read_only, capsys):
    out = read_only(tmp_path / "ro")
    assert main(cli_train(data, out)) == 2
    assert f"{out} is not writable" in capsys.readouterr().err
    target = out / "model.onnx"
    assert main(["export", "--variant", "s0", "--format", "onnx", "--out", str(target), "--no-check"]) == 2
    err = capsys.readouterr().err
    assert f"{out} is not writable" in err and "choose another --out" in err and "Traceback" not in err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_respect_the_umask(tmp_path, tiny, umask, mode):
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


@pytest.mark.parametrize("name", ["last.safetensors", "last.pth"])
def test_a_kill_between_weights_and_json_never_pairs_them_wrongly(tmp_path, tiny, monkeypatch, name):
    import mobileone.core.checkpoint.storage as ck

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


def test_stale_temporaries_are_removed_by_the_next_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in (".last.safetensors.k2j3.tmp", ".train_state.pt.x81.tmp"):
        (run / name).write_bytes(b"half a file")
    (run / "keep.tmp").write_text("not ours")
    with pytest.warns(UserWarning, match=r"removed 2 temporary file\(s\) an interrupted run left"), RunDir(run):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["keep.tmp"]


def test_eval_json_never_replaces_a_checkpoint(tmp_path, data, tiny, capsys):
    tiny.preprocess.update(input_size=16)
    ckpt = save_checkpoint(tiny, tmp_path / "best.safetensors")
    before = ckpt.read_bytes()
    argv = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--workers", "0"]
    assert main([*argv, "--json", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt} already exists and was not written by mobileone (a safetensors checkpoint)" in err
    assert "choose another --json" in err and ckpt.read_bytes() == before
    result = tmp_path / "result.json"
    assert main([*argv, "--json", str(result)]) == 0 and main([*argv, "--json", str(result)]) == 0  # its own: replaced
    assert json.loads(result.read_text())["written_by"] == "mobileone eval"
