"""Exported files: checked before they are written, metadata readable, a failed export never at --out."""

import json

import pytest
import torch

import mobileone
from mobileone import create_model
from mobileone.cli import main

from .classify_data import TINY
from .task_models import task_files as make_task_files

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def test_onnx_metadata_values_are_all_json(tmp_path):
    pytest.importorskip("onnxruntime")
    from mobileone.deploy.onnx import read_onnx_metadata

    model = create_model(TINY, num_classes=3, inference_mode=True)
    mobileone.export_model(model, tmp_path / "m.onnx", img_size=32, check=False)
    import onnx

    raw = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert {"architecture", "variant", "input_layout", "mean"} <= set(raw)
    assert {k: json.loads(v) for k, v in raw.items()} == read_onnx_metadata(tmp_path / "m.onnx")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, data):
    from mobileone import save_checkpoint

    from .classify_data import TINY as ARCH

    files = make_task_files(tmp_path_factory.mktemp("tasks"))
    torch.manual_seed(0)
    model = create_model(ARCH, num_classes=3)
    model.train()(torch.randn(4, 3, 16, 16))
    model.preprocess.update(input_size=16)
    files["classify"] = save_checkpoint(model.eval(), tmp_path_factory.mktemp("classify") / "best.safetensors")
    files["classify data"] = data
    return files


@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_a_failed_check_leaves_nothing_at_out_and_is_never_evaluated(tmp_path, task_files, task, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    export = ["export", "--checkpoint", str(task_files[task]), "--format", "onnx", "--out", str(out)]
    export += ["--raw"] if task == "detect" else []
    assert main(export) == 0 and out.is_file()  # a good file is there ...
    good = out.read_bytes()
    capsys.readouterr()
    assert main([*export, "--atol", "0", "--rtol", "0"]) == 1  # ... and an export that fails its check
    err = capsys.readouterr().err
    failed = tmp_path / "model.failed.onnx"
    assert "check failed: " in err and f"Nothing was written at {out}; the file is kept as {failed}" in err
    assert out.read_bytes() == good and failed.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.failed.onnx", "model.onnx"]  # no temporaries
    data = task_files[f"{task} data"]
    assert main(["eval", "--onnx", str(failed), "--data", str(data)]) == 2
    assert f"{failed} is an export whose check failed" in capsys.readouterr().err


def test_export_never_replaces_a_file_it_did_not_write(tmp_path, task_files, capsys):
    pt = tmp_path / "best.pt"
    torch.save({"state_dict": {}}, pt)  # someone's PyTorch checkpoint under the name an export would take
    before = pt.read_bytes()
    argv = ["export", "--checkpoint", str(task_files["classify"]), "--format", "torchscript", "--out", str(pt)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{pt} already exists and was not written by mobileone (a PyTorch file)" in err
    assert pt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    pt.unlink()
    assert main(argv) == 0 and main(argv) == 0  # its own export it replaces


def test_detect_tolerances_are_honoured(tmp_path, task_files, capsys):
    pytest.importorskip("onnxruntime")
    argv = ["export", "--checkpoint", str(task_files["detect"]), "--format", "onnx", "--raw", "--out"]
    assert main([*argv, str(tmp_path / "loose.onnx"), "--atol", "0.5", "--rtol", "0.01"]) == 0
    assert "within 1e-2 relative + 5e-1 absolute" in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "strict.onnx"), "--atol", "0", "--rtol", "0"]) == 1
