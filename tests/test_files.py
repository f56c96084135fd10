"""Every file the library writes: beside its place, then renamed; never over a file it did not write; no
temporary left behind that the next run does not remove."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobileone.core.files import NotOursError, atomic_folder, atomic_write, remove_stale_temporaries, write_json_result
from mobileone.engine.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


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
