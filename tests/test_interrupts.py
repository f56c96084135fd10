"""Ctrl-C and SIGTERM: a message saying how to resume, no traceback, the lock released, best_fused kept."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mobileone.cli import main

from .classify_data import ROOT, cli_train, poison_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def test_ctrl_c_says_how_to_resume(tmp_path, data, monkeypatch, capsys):
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
def default_signals() -> None:
    """In the child: SIGINT and SIGTERM as a terminal gives them (default action, unblocked), whatever this test
    process inherited or was left with by libraries loaded in it; an ignored or blocked SIGINT is inherited
    across exec and would let the run finish untouched."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_sigint_to_the_process_group_prints_no_traceback(tmp_path, data):
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
        preexec_fn=default_signals,
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


@pytest.mark.slow  # a training subprocess with 2 data workers: about 10-20 s on 2 busy cores
def test_sigterm_stops_like_ctrl_c(tmp_path, data):
    """A cluster's time limit or `timeout` sends SIGTERM to the process group: the trainer and its workers."""
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
        preexec_fn=default_signals,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "train_state.pt").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and f"mobileone train --resume {out}" in err and "Traceback" not in err
    assert not (out / ".lock").exists() and (out / "best_fused.safetensors").is_file()


def test_a_worker_keeps_quiet_about_a_batch_the_stopping_trainer_abandoned():
    """A data worker's resource-sharer thread (it hands tensors' file descriptors to the trainer) fails when the
    trainer stops mid-handshake: that is the stop, not printed; any other thread's error still is."""
    code = """
import signal, sys, threading
from mobileone.engine.distributed import ignore_termination
ignore_termination(0)
assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
def fail():  # what multiprocessing.resource_sharer does with a failed handshake
    try:
        raise ConnectionResetError("the trainer went away")
    except ConnectionResetError:
        sys.excepthook(*sys.exc_info())
for name in ("Thread-3 (_serve)", "Thread-4 (load)"):
    thread = threading.Thread(target=fail, name=name)
    thread.start()
    thread.join()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(_serve)" not in done.stderr and done.stderr.count("ConnectionResetError") == 1
