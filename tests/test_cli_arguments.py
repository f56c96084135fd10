"""The argument layer: every size, count and tolerance validated one way in every command, with the range in
the message; 0 is a value; ``train``'s options generated from ``TrainConfig``; defaults in ``--help``; warnings
in one line; the task read from the checkpoint or ONNX file when ``--task`` is absent."""

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

import mobileone
from mobileone import TrainConfig, create_model
from mobileone.cli import main
from mobileone.commands.arguments import build_parser
from mobileone.tasks import resolve_config

from .classify_data import ROOT, TINY, cli_train, make_data
from .task_models import task_files as make_task_files

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention

# Options that are sizes, counts or tolerances, in any command.
NUMERIC = {
    *("img_size", "batch_size", "workers", "threads", "epochs", "num_classes", "num_calib", "topk", "atol", "rtol"),
    *("max_detections", "warmup", "iters", "min_time", "batch_sizes", "output_strides", "crop_pct", "min_score"),
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_size_count_and_tolerance_is_parsed_by_its_range_in_every_command():
    unchecked = [
        f"{name} --{a.dest}"
        for name, p in subparsers().items()
        for a in p._actions
        if a.dest in NUMERIC and getattr(a.type, "__qualname__", "").split(".")[0] not in ("ranged", "ranged_list")
    ]
    assert not unchecked, f"sizes, counts or tolerances without a range: {unchecked}"


@pytest.mark.parametrize("value", ["100000", "20000", "-5", "3", "0", "abc"])
@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--checkpoint", "x.safetensors", "--data", "d"],
        ["export", "--variant", "s0", "--format", "onnx", "--out", "m.onnx"],
        ["demo"],
        ["info"],
        ["quantize", "--checkpoint", "x", "--calib-data", "d", "--out", "q.onnx"],
        ["train"],
    ],
)
def test_img_size_is_refused_with_the_valid_range_everywhere(command, value, capsys):
    assert main([*command, "--img-size", value]) == 2
    err = capsys.readouterr().err
    assert f"argument --img-size: must be an integer in 16..4096 (pixels), got {value}" in err.replace("'", "")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--checkpoint", "x", "--data", "d", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
        (["eval", "--checkpoint", "x", "--data", "d", "--workers", "-1"], "--workers: must be an integer in 0..256"),
        (["predict", "--checkpoint", "x", "i.png", "--topk", "0"], "--topk: must be an integer >= 1"),
        (
            ["export", "--variant", "s0", "--format", "onnx", "--out", "m", "--atol", "-1"],
            "--atol: must be a number >= 0",
        ),
        (["export", "--variant", "s0", "--format", "onnx", "--out", "m", "--max-detections", "0"], "in 1..100000"),
        (["bench", "--batch-sizes", "1,0"], "--batch-sizes: must be an integer >= 1, got 0"),
        (["train", "--threads", "0"], "--threads: must be an integer in 1..1024, got 0"),
    ],
)
def test_counts_and_tolerances_are_refused_with_the_valid_range(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_zero_is_a_value_not_unset(tmp_path, tiny):
    from mobileone.deploy import export_model
    from mobileone.deploy.detect import export_detector
    from mobileone.deploy.segment import export_segmenter

    from .test_detect_model import tiny_detector
    from .test_segment_model import tiny as tiny_segmenter

    with pytest.raises(ValueError, match=r"img_size must be an integer in 16..4096 \(pixels\), got 0"):
        export_model(tiny, tmp_path / "c.onnx", img_size=0)
    with pytest.raises(ValueError, match=r"img_size must be an integer in 32..4096 \(pixels\), got 0"):
        export_segmenter(tiny_segmenter(), tmp_path / "s.onnx", img_size=0)
    with pytest.raises(ValueError, match=r"max_detections must be an integer in 1..100000, got 0"):
        export_detector(tiny_detector(), tmp_path / "d.onnx", "nms", max_detections=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--label-smoothing", "2"], r"argument --label-smoothing: must be a number in \[0, 1\), got 2"),
        (["--crop-scale", "0.9", "0.1"], r"crop_scale must be two numbers 0 < min <= max <= 1"),
        (["--hflip", "5"], r"argument --hflip: must be a number in \[0, 1\], got 5"),
        (["--ema-decay", "2"], r"argument --ema-decay: must be a number in \[0, 1\), got 2"),
        (["--magnitude", "-3"], r"argument --magnitude: must be a number in \[0, 30\], got -3"),
        (["--steps-per-epoch", "0"], r"argument --steps-per-epoch: must be an integer >= 1, got 0"),
        (["--img-size", "7"], r"argument --img-size: must be an integer in 16..4096 \(pixels\), got 7"),
        (["--arch", '{"widths": [8, 16, 16, 16], "wings": 2}'], r"arch must be a JSON object of MobileOneConfig"),
        (["--arch", "[1, 2]"], r"argument --arch: must be a JSON object, got \[1, 2\]"),
    ],
)
def test_bad_training_options_name_the_valid_range(tmp_path, data, capsys, flags, message):
    out = tmp_path / "run"
    argv = [a for a in cli_train(data, out) if a != "--no-ema"]  # --no-ema would override --ema-decay
    assert main([*argv, *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_the_config_validates_with_the_same_ranges():
    with pytest.raises(ValueError, match=r"img_size must be an integer in 16..4096 \(pixels\), got 0"):
        resolve_config(img_size=0)  # 0 is a value, refused, not "unset"
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\), got 2"):
        TrainConfig(label_smoothing=2).validate()
    assert TrainConfig(epochs=3, img_size=64).validate().epochs == 3  # keyword construction


def test_bad_sizes_and_model_arguments(tmp_path, tiny, capsys):
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0 \(0 removes the head\), got -1"):
        tiny.reset_classifier(-1)
    with pytest.raises(ValueError, match=r"freeze_stages takes 0..5 .* got 9"):
        tiny.freeze_stages(9)
    with pytest.raises(ValueError, match=r"in_chans must be an int >= 1 \(3 for RGB\), got 0"):
        create_model(TINY, in_chans=0)


def test_the_train_command_is_generated_from_the_config_and_shows_every_default(capsys):
    train = subparsers()["train"]
    dests = {a.dest: a for a in train._actions}
    options = [f for f in fields(TrainConfig) if f.metadata["cli"]]
    assert [f.name for f in options if f.name not in dests] == []
    for f in options:
        assert dests[f.name].default is None, f"--{f.name}: unset must mean 'from the recipe and the task'"
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in options:
        if f.default is not None and f.type not in ("bool", "bool | None"):
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
            recipe = {"epochs": "10", "warmup_epochs": "1.0", "init": "identity"}  # the short recipe's
            assert f"default: {recipe.get(f.name, shown)}" in text, f"--{f.name}"
    for section in ("data and model", "optimization", "schedule", "augmentation", "detection", "segmentation", "run"):
        assert section in text
    # The tasks' own defaults, read when help is asked for:
    assert "detect: 320" in text and "segment: 512" in text and "imagenet recipe: 300" in text


def test_every_option_of_every_command_says_its_default(capsys):
    missing = []
    for name, p in subparsers().items():
        for a in p._actions:
            has_default = a.default not in (None, False, argparse.SUPPRESS) and not a.required
            if has_default and a.help and "default" not in a.help:
                missing.append(f"{name} --{a.dest}")
    assert not missing, f"options whose help does not say their default: {missing}"


def test_warnings_print_in_one_line_without_source(tmp_path, tiny):
    path = mobileone.save_checkpoint(tiny, tmp_path / "model.safetensors", epoch=1)
    (tmp_path / "model.json").write_text('{"config": "not an object"}')
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path)  # the weights alone: the broken JSON beside them is read, and ignored
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mobileone", "info", "--checkpoint", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines), done.stderr
    assert "ignored unusable metadata" in done.stderr and "warnings.warn" not in done.stderr


# ---- the task of a file


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    return make_task_files(tmp_path_factory.mktemp("tasks"))


def test_the_task_is_read_from_the_checkpoint(task_files, capsys):
    det, seg = task_files["detect"], task_files["segment"]
    assert main(["eval", "--checkpoint", str(det), "--data", str(task_files["detect data"]), "--workers", "0"]) == 0
    assert "mAP" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(seg), "--data", str(task_files["segment data"]), "--workers", "0"]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert main(["info", "--checkpoint", str(seg)]) == 0
    out = capsys.readouterr().out
    assert "segmentation checkpoint, lraspp" in out and "4 classes" in out and "mmpretrain" not in out
    assert main(["info", "--checkpoint", str(det)]) == 0
    assert "detection checkpoint, SSDLite" in capsys.readouterr().out
    for argv in (["eval", "--data", "d"], ["predict", "image.png"], ["export", "--format", "onnx", "--out", "m.onnx"]):
        assert main([argv[0], "--task", "classify", "--checkpoint", str(det), *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert f"{det} is a detect checkpoint (its metadata says so), not classify" in err and "Traceback" not in err
    with pytest.raises(mobileone.CheckpointError, match="is a segment checkpoint, not a classifier"):
        mobileone.load_checkpoint(seg)


def test_resume_continues_the_runs_task(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = resolve_config(task="detect", out=str(run), img_size=64)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert resolve_config(resume=str(run)).task == "detect"
    with pytest.raises(ValueError, match=f"{run} is a detect run, not classify; drop --task"):
        resolve_config(resume=str(run), task="classify")
    assert main(["train", "--resume", str(run), "--task", "segment"]) == 2
    assert "is a detect run, not segment" in capsys.readouterr().err


def test_a_corrupt_onnx_and_unreadable_calibration_images_are_one_line_errors(tmp_path, data, tiny, capsys):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    assert main(["eval", "--onnx", str(bad), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not a readable ONNX model" in err and len(err.strip().splitlines()) == 1
    from mobileone.deploy.quantize import quantize_model

    junk = make_data(tmp_path / "junk", n_val=1)
    for f in junk.rglob("*.png"):
        f.write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the .* images drawn from .* could be read"):
        quantize_model(tiny, junk, tmp_path / "q" / "int8.onnx", img_size=16)
    assert not (tmp_path / "q").exists()  # refused before anything was exported


def test_quantize_reports_the_calibration_images_it_used(tmp_path, tiny, capsys):
    pytest.importorskip("onnxruntime")
    tiny.preprocess.update(input_size=16)
    ckpt = mobileone.save_checkpoint(tiny, tmp_path / "model.safetensors")
    one = make_data(tmp_path / "one", classes=("red",), n_train=1, n_val=1)
    argv = ["quantize", "--checkpoint", str(ckpt), "--calib-data", str(one), "--out", str(tmp_path / "q.onnx")]
    assert main(argv) == 0
    assert "1 calibration images" in capsys.readouterr().out
    torch.set_num_threads(1)
