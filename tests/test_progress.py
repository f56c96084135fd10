"""What a run prints: progress lines without a terminal."""

from unittest import mock

import pytest

from mobileone.tasks import resolve_config, train

from .classify_data import TINY, make_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def test_without_a_terminal_long_epochs_print_progress_lines(tmp_path, capsys):
    data = make_data(tmp_path / "data", n_train=8, n_val=2)
    with mock.patch("sys.stderr.isatty", return_value=False):
        train(
            resolve_config(
                data=str(data),
                arch=TINY,
                out=str(tmp_path / "run"),
                epochs=1,
                batch_size=4,
                img_size=16,
                workers=0,
                log_every=2,
            )
        )
    out = capsys.readouterr().out
    assert "step 2/6 of epoch 1" in out and "step 6/6 of epoch 1" in out and "step 3/6" not in out
