import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mobileone.engine.trainer as tr
import mobileone.tasks
from mobileone import create_model, init_branches, load_checkpoint, reparameterize_model, save_checkpoint
from mobileone.cli import main
from mobileone.core.model import RELU_PASS_SHIFT
from mobileone.engine import DataError, TrainingError, data_fit
from mobileone.engine.config import RECIPES
from mobileone.engine.data_fit import fit_epochs, fit_image_size
from mobileone.engine.schedules import (
    ema_decay_at,
    image_size_at,
    lr_at,
    make_ema,
    make_optimizer,
    param_groups,
    peak_lr,
    weight_decay_at,
)
from mobileone.tasks import resolve_config, train
from mobileone.tasks.classify.task import build_classifier, distill_loss

TINY = {"widths": [8, 16, 16, 16], "stem_width": 8, "blocks": [1, 1, 1, 1], "k": 2}
ROOT = Path(__file__).resolve().parents[1]


def make_data(root: Path, classes=("red", "green", "blue"), n_train: int = 16, n_val: int = 8, size: int = 16) -> Path:
    """Colour classes with noise: learnable in a few steps."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = rng.integers(0, 90, (size, size, 3))
                x[..., c % 3] += 160
                Image.fromarray(x.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def config(out: Path, data: Path, **kw):
    opts = {
        "data": str(data),
        "arch": TINY,
        "out": str(out),
        "epochs": 2,
        "batch_size": 8,
        "img_size": 16,
        "workers": 0,
        "progress": False,
        **kw,
    }
    return resolve_config(**opts)


# ----------------------------------------------------------------------------- schedules, value by value


def test_lr_schedule_values():
    lr, total, warm = 0.4, 100, 10
    assert lr_at(0, total, warm, lr, 0.0) == pytest.approx(0.04)
    assert lr_at(4, total, warm, lr, 0.0) == pytest.approx(0.2)
    assert lr_at(9, total, warm, lr, 0.0) == pytest.approx(0.4)
    assert lr_at(10, total, warm, lr, 0.0) == pytest.approx(0.4)
    assert lr_at(55, total, warm, lr, 0.0) == pytest.approx(0.2)  # half-way down the cosine
    assert lr_at(100, total, warm, lr, 1e-6) == pytest.approx(1e-6)
    assert lr_at(0, total, 0, lr, 0.0) == pytest.approx(0.4)  # no warm-up


def test_weight_decay_and_ema_schedules():
    assert weight_decay_at(0, 100, 1e-4, 1e-5) == pytest.approx(1e-4)
    assert weight_decay_at(50, 100, 1e-4, 1e-5) == pytest.approx(5.5e-5)
    assert weight_decay_at(100, 100, 1e-4, 1e-5) == pytest.approx(1e-5)
    assert weight_decay_at(70, 100, 1e-4, 1e-4) == pytest.approx(1e-4)  # annealing off
    assert ema_decay_at(0, 0.9995) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9995) == pytest.approx(0.91)
    assert ema_decay_at(10**6, 0.9995) == pytest.approx(0.9995)
    assert ema_decay_at(0, 0.9995, warmup=False) == 0.9995


def test_progressive_size_and_strength_follow_the_paper_phases():
    # mmpretrain's 300-epoch schedule: 160 px until epoch 37, 192 until 112, then 224.
    assert [image_size_at(e, 300, 224, True) for e in (0, 36, 37, 111, 112, 299)] == [
        (160, 0.3),
        (160, 0.3),
        (192, 0.7),
        (192, 0.7),
        (224, 1.0),
        (224, 1.0),
    ]
    # Proportional for short runs: 10 epochs -> 1 / 3 / 6 epochs per phase.
    assert [image_size_at(e, 10, 224, True)[0] for e in range(10)] == [160] + [192] * 3 + [224] * 6
    assert image_size_at(0, 10, 32, True) == (24, 0.3)
    assert image_size_at(0, 10, 224, False) == (224, 1.0)


def test_recipes_and_overrides(tmp_path):
    short = resolve_config()
    assert (short.recipe, short.init, short.img_size, short.hflip, short.epochs) == ("short", "identity", 32, 0.0, 10)
    assert short.batch_size == 64 and resolve_config(data="/x").batch_size == 128
    imagenet = resolve_config("imagenet", data="/imagenet", variant="s2")
    assert (imagenet.epochs, imagenet.init, imagenet.img_size, imagenet.progressive, imagenet.augment) == (
        300,
        "torch",
        224,
        True,
        "randaugment",
    )
    assert resolve_config("imagenet", data="/x", variant="s1").augment == "none"
    assert resolve_config("imagenet", data="/x", variant="s0").progressive is False
    assert peak_lr(imagenet) == pytest.approx(0.1) and peak_lr(resolve_config(batch_size=1024)) == pytest.approx(0.4)
    assert peak_lr(resolve_config(lr=0.3, batch_size=1024)) == 0.3
    mine = resolve_config("imagenet", data="/x", epochs=3, init="unit-sum", ema_decay=0.0)
    assert (mine.epochs, mine.init, mine.ema_decay) == (3, "unit-sum", 0.0)
    ckpt = save_checkpoint(create_model("s1", num_classes=3), tmp_path / "s1.safetensors")
    tuned = resolve_config(pretrained=str(ckpt))
    assert tuned.recipe == "finetune" and tuned.variant == "mobileone_s1"  # the file's architecture, recorded
    with pytest.raises(ValueError, match="holds mobileone_s1.*drop --variant"):
        resolve_config(pretrained=str(ckpt), variant="s0")
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_config("fast")
    with pytest.raises(ValueError, match="unknown training option"):
        resolve_config(learning_rate=1.0)
    with pytest.raises(ValueError, match="augment"):
        resolve_config(augment="mixup")


# ----------------------------------------------------------------------------- pieces


def test_init_branches_scales_and_fusion_stays_exact():
    torch.manual_seed(0)
    model = init_branches(create_model(TINY, num_classes=3), "unit-sum")
    for layer in model.layers():
        bns = [bn for _, bn in layer.branches()]
        assert all(torch.allclose(bn.weight, torch.full_like(bn.weight, len(bns) ** -0.5)) for bn in bns)
    model = init_branches(create_model(TINY, num_classes=3), "identity")
    with_skip = [m for m in model.layers() if m.rbr_skip is not None]
    assert with_skip
    for layer in with_skip:
        assert torch.all(layer.rbr_skip.weight == 1) and all(torch.all(b.bn.weight == 0) for b in layer.rbr_conv)
        assert torch.allclose(layer.rbr_skip.bias, torch.full_like(layer.rbr_skip.bias, RELU_PASS_SHIFT))
        x = torch.relu(torch.randn(64, layer.in_channels, 6, 6))  # a previous layer's output
        out = layer.train()(x)
        assert torch.allclose(out, torch.relu(layer.rbr_skip(x)), atol=1e-4)
        # the shift lets the ReLU pass the skip path: nearly every positive input stays positive
        positive = x > 0
        assert (out[positive] > 0).float().mean() > 0.97
        unshifted = torch.relu(layer.rbr_skip(x) - RELU_PASS_SHIFT)
        assert (unshifted[positive] > 0).float().mean() < 0.8
    model.train()(torch.randn(4, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), reparameterize_model(model)(x), atol=1e-4)
    with pytest.raises(ValueError, match="init scheme"):
        init_branches(model, "zeros")


def test_param_groups_skip_norms_and_biases():
    model = create_model(TINY, num_classes=3)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert any(p is model.linear.bias for p in no_decay["params"]) and any(
        p is model.linear.weight for p in decay["params"]
    )
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_choice_keeps_the_groups_and_their_decay(name, kind):
    cfg = resolve_config(task="classify", optimizer=name, weight_decay=1e-3, momentum=0.8)
    model = create_model(TINY, num_classes=3)
    opt = make_optimizer(model, cfg)
    assert type(opt) is kind and [g["decay"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[0]["weight_decay"] == 1e-3 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.defaults["betas" if name == "adamw" else "momentum"] == ((0.8, 0.999) if name == "adamw" else 0.8)
    assert opt.defaults["fused"]  # one kernel over all parameters on CPU and CUDA
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="optimizer"):
        resolve_config(task="classify", optimizer="adam")
    # without --base-lr the defaults' SGD rate is carried over to AdamW (x 0.04), the recipe's too
    assert resolve_config(task="classify", optimizer="adamw").base_lr == pytest.approx(0.004)
    assert resolve_config(task="classify", optimizer="adamw", pretrained=None, recipe="finetune").base_lr == 0.0004
    assert resolve_config(task="classify", optimizer="adamw", base_lr=0.3).base_lr == 0.3


def test_ema_warm_up_and_buffers():
    model = create_model(TINY, num_classes=3)
    ema = make_ema(model, 0.9995)
    w0 = model.linear.weight.detach().clone()
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        model.stage0.rbr_conv[0].bn.running_mean.fill_(2.0)
    ema.update_parameters(model)  # first call copies
    assert torch.equal(ema.module.linear.weight, model.linear.weight)
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        model.stage0.rbr_conv[0].bn.running_mean.fill_(4.0)
    ema.update_parameters(model)  # second: decay (1 + 1) / (10 + 1)
    d = 2 / 11
    assert torch.allclose(ema.module.linear.weight, d * (w0 + 1) + (1 - d) * (w0 + 2), atol=1e-6)
    assert torch.allclose(ema.module.stage0.rbr_conv[0].bn.running_mean, torch.tensor(d * 2 + (1 - d) * 4))


def test_distill_loss():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert distill_loss(t, t, 2.0).abs() < 1e-6
    p_t, log_p_s = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * 4
    assert torch.allclose(distill_loss(s, t, 2.0), expected, atol=1e-6)


# ----------------------------------------------------------------------------- runs


def test_run_writes_metrics_checkpoints_curves(tmp_path, data):
    cfg = config(tmp_path / "run", data, epochs=3, warmup_epochs=1.0, lr=0.05)
    summary = train(cfg)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    keys = {"epoch", "train_loss", "val_top1", "val_top5", "ema_val_top1", "lr", "weight_decay", "images_per_second"}
    assert keys <= set(rows[0]) and all(r["images_per_second"] > 0 and r["bad_images"] == 0 for r in rows)
    steps = 48 // 8  # 6 steps an epoch, 18 in all; warm-up 1 epoch, capped at a fifth of the run: 3 steps
    for r in rows:
        last_step = r["epoch"] * steps - 1
        assert r["lr"] == pytest.approx(lr_at(last_step, 3 * steps, 3, 0.05, 1e-6))
        assert r["weight_decay"] == pytest.approx(weight_decay_at(last_step, 3 * steps, 1e-4, 1e-5))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best, fused = load_checkpoint(run / "best.safetensors"), load_checkpoint(run / "best_fused.safetensors")
    assert not best.inference_mode and fused.inference_mode and best.class_names == ["blue", "green", "red"]
    assert fused.preprocess["input_size"] == 16
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(best.eval()(x), fused(x), atol=1e-4)
    assert summary["best"]["val_top1"] == max(max(r["val_top1"], r["ema_val_top1"]) for r in rows)
    assert not list(run.glob("*.tmp"))
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)


def test_ablation_flags_change_the_model(tmp_path, data):
    assert build_classifier(config(tmp_path, data, k=1), 3).layers()[1].k == 1
    plain = build_classifier(config(tmp_path, data, branches=False), 3)
    assert all(m.rbr_skip is None and m.rbr_scale is None and len(m.rbr_conv) == 1 for m in plain.layers())
    summary = train(config(tmp_path / "noema", data, epochs=1, ema_decay=0.0))
    row = json.loads((tmp_path / "noema" / "metrics.jsonl").read_text())
    assert row["ema_val_top1"] is None and summary["best"]["weights"] == "model"


@pytest.mark.filterwarnings("ignore:no BatchNorm running statistics")  # the untrained teacher
def test_finetune_and_distill(tmp_path, data):
    teacher = create_model(TINY, num_classes=3)
    save_checkpoint(teacher, tmp_path / "teacher.safetensors")
    other = create_model(TINY, num_classes=7)
    save_checkpoint(other, tmp_path / "seven.safetensors")
    train(config(tmp_path / "ft", data, epochs=1, pretrained=str(tmp_path / "seven.safetensors")))
    ft = load_checkpoint(tmp_path / "ft" / "last.safetensors")
    assert ft.num_classes == 3 and json.loads((tmp_path / "ft" / "config.json").read_text())["recipe"] == "finetune"
    key = "stage1.0.rbr_conv.0.conv.weight"  # the backbone starts from the checkpoint, not from scratch
    torch.manual_seed(1)
    fresh = create_model(TINY, num_classes=3).state_dict()[key]
    assert torch.allclose(ft.state_dict()[key], other.state_dict()[key], atol=0.02)
    assert not torch.allclose(ft.state_dict()[key], fresh, atol=0.02)
    train(config(tmp_path / "kd", data, epochs=1, teacher=str(tmp_path / "teacher.safetensors"), distill_alpha=0.7))
    assert math.isfinite(json.loads((tmp_path / "kd" / "metrics.jsonl").read_text())["train_loss"])
    with pytest.raises(ValueError, match="teacher .* 7 classes"):
        train(config(tmp_path / "kd7", data, epochs=1, teacher=str(tmp_path / "seven.safetensors")))
    fused = reparameterize_model(create_model(TINY, num_classes=3).eval())
    save_checkpoint(fused, tmp_path / "fused.safetensors")
    with pytest.warns(UserWarning, match="fine-tuning the plain network"):
        train(config(tmp_path / "ftf", data, epochs=1, pretrained=str(tmp_path / "fused.safetensors")))
    tuned = load_checkpoint(tmp_path / "ftf" / "last.safetensors")
    assert tuned.inference_mode and tuned.num_classes == 3
    assert not torch.equal(
        tuned.state_dict()["stage1.1.reparam_conv.weight"], fused.state_dict()["stage1.1.reparam_conv.weight"]
    )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data, monkeypatch):
    real = tr.lr_at
    monkeypatch.setattr(tr, "lr_at", lambda step, *a: float("nan") if step >= 8 else real(step, *a))
    with pytest.raises(TrainingError, match=r"step 10 \(epoch 2, batch 4\)"):
        train(config(tmp_path / "run", data, epochs=3))
    last = load_file(tmp_path / "run" / "last.safetensors")
    assert json.loads((tmp_path / "run" / "last.json").read_text())["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())


def test_bad_images_are_counted_or_fatal(tmp_path):
    root = make_data(tmp_path / "data")
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "train" / "red" / "empty.jpg").write_bytes(b"")
    train(config(tmp_path / "run", root, epochs=1, batch_size=10))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["bad_images"] == 2
    with pytest.raises(DataError, match="broken.png|empty.jpg"):
        train(config(tmp_path / "strict", root, epochs=1, batch_size=10, strict_images=True))


def test_dataset_layout_errors(tmp_path):
    root = make_data(tmp_path / "data")
    (root / "val" / "red").rename(root / "val" / "purple")
    with pytest.raises(DataError, match="different class folders"):
        train(config(tmp_path / "run", root))
    shutil.rmtree(make_data(tmp_path / "d2") / "val")
    with pytest.raises(DataError, match="no val/ folder"):
        train(config(tmp_path / "run", tmp_path / "d2"))
    with pytest.raises(DataError, match="fewer than one batch"):
        train(config(tmp_path / "run2", make_data(tmp_path / "d3", n_train=2), batch_size=64))


def _cli(tmp_path: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "mobileone",
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
        "--deterministic",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if "running" not in k and "num_batches" not in k}


@pytest.mark.slow  # subprocesses: about 10-20 s each on 2 cores
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, data):
    epochs = "6"
    full = subprocess.run(
        [sys.executable, *_cli(tmp_path, data, tmp_path / "full", "--epochs", epochs)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 0, full.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *_cli(tmp_path, data, run, "--epochs", epochs)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < int(epochs), "the run should have been killed mid-way"
    resumed = subprocess.run(
        [sys.executable, "-m", "mobileone", "train", "--resume", str(run), "--workers", "0"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    done = int(re.search(rf"resuming {re.escape(str(run))} after epoch (\d+)", resumed.stdout).group(1))
    assert 2 <= done < int(epochs)
    a, b = load_file(tmp_path / "full" / "last.safetensors"), load_file(run / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, int(epochs) + 1))


@pytest.mark.slow  # subprocesses: about 10-20 s each on 2 cores
def test_two_gloo_processes_match_one_process(tmp_path, data):
    """2 ranks x 4 images == 1 process x 2 interleaved micro-batches of 4: same BN batches, same gradients.

    Three steps at LR 0.05: BatchNorm over 4 images of 1x1 maps amplifies rounding differences
    step by step (measured: 6e-5 here), while a wrong split (BatchNorm over all 8 images) moves the
    weights by 0.5-1.1, so 1e-3 tells the two apart.
    """
    steps = ("--epochs", "1", "--steps-per-epoch", "3", "--lr", "0.05")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *_cli(tmp_path, data, tmp_path / "ddp", *steps),
    ]
    ddp = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("epoch 1/1") == 1  # only rank 0 prints and writes
    train(config(tmp_path / "one", data, accum_steps=2, deterministic=True, epochs=1, steps_per_epoch=3, lr=0.05))
    a, b = _weights(tmp_path / "ddp" / "last.safetensors"), _weights(tmp_path / "one" / "last.safetensors")
    assert a.keys() == b.keys()
    init = create_model(TINY, num_classes=3).state_dict()
    assert any(not torch.allclose(a[k], init[k]) for k in a)  # the runs did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=0, msg=k)


@pytest.mark.parametrize("task, held", [("detect", 4e-5), ("segment", 1e-4), ("classify", 1e-4)])
def test_no_wd_anneal_holds_the_tasks_weight_decay(monkeypatch, task, held):
    seen = []
    monkeypatch.setattr(mobileone.tasks, "train", seen.append)
    assert main(["train", "--task", task, "--no-wd-anneal", "--out", "unused", "--epochs", "1"]) == 0
    assert seen[0].weight_decay == seen[0].weight_decay_end == held
    with pytest.raises(ValueError, match="drop --weight-decay-end"):
        resolve_config(task=task, hold_weight_decay=True, weight_decay_end=1e-5)


def test_image_size_comes_from_the_data_when_not_given(tmp_path):
    data = make_data(tmp_path / "d", n_train=4, n_val=2, size=28)  # 28 px images: 224 would be 64x the pixels
    cfg = resolve_config(data=str(data), arch=TINY, out=str(tmp_path / "run"), epochs=1, batch_size=4, workers=0)
    assert cfg.auto_img_size and cfg.img_size == 224
    with pytest.warns(
        UserWarning, match=r"about 28 px \(median short side\): training at 32 px instead of the default"
    ):
        train(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["img_size"] == 32
    given = config(tmp_path / "given", data, img_size=224)
    assert not given.auto_img_size
    with pytest.warns(UserWarning, match=r"--img-size 224 upsamples the training images \(about 28 px\) 8.0x: 64x"):
        fit_image_size(given, [28] * 5, 32)
    assert given.img_size == 224


def test_time_budget_sets_the_epochs_from_the_pace_so_far(tmp_path, data):
    cfg = resolve_config(data=str(data), out=str(tmp_path / "a"), time=10.0, epochs=4)
    assert not cfg.auto_epochs  # the budget decides, not the floor of steps
    env = SimpleNamespace(main=True, world=1, device=torch.device("cpu"))
    s = SimpleNamespace(per_epoch=7, total=28, history=[{"epoch_seconds": 90.0}])
    tr._fit_epochs_to_time(s, cfg, env, 1)  # 510 s left at 90 s an epoch
    assert (cfg.epochs, s.total) == (7, 49)
    s.history += [{"epoch_seconds": 60.0}] * 2  # the first epoch (caches) no longer sets the pace
    tr._fit_epochs_to_time(s, cfg, env, 3)  # 390 s left at 60 s
    assert cfg.epochs == 10
    s.history += [{"epoch_seconds": 200.0}] * 4  # past the budget: one more epoch, the last, validated
    tr._fit_epochs_to_time(s, cfg, env, 7)
    assert cfg.epochs == 8
    with pytest.raises(ValueError, match="time"):
        resolve_config(data=str(data), out=str(tmp_path / "b"), time=0)
    # end to end: a budget the first epoch already spends trains it and one more, the last validated
    opts = {"data": str(data), "arch": TINY, "out": str(tmp_path / "run"), "batch_size": 8, "img_size": 16}
    summary = train(resolve_config(**opts, workers=0, progress=False, ema_decay=0.0, time=1e-4, epochs=5))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs"] == 2 and len(rows) == 2 and rows[-1].get("val_top1") is not None
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    assert all(r["epoch_seconds"] > 0 for r in state["history"])  # what a resumed run decides from


def test_deterministic_runs_keep_a_fixed_thread_count(tmp_path, data, monkeypatch):
    # the threads fitted to a busy machine would change how reductions round: such a run would not resume exactly
    fixed = []
    fitter = tr.ThreadFitter.for_run
    monkeypatch.setattr(tr.ThreadFitter, "for_run", staticmethod(lambda *a: fixed.append(a[1]) or fitter(*a)))
    opts = {"data": str(data), "arch": TINY, "batch_size": 8, "img_size": 16, "epochs": 1, "workers": 0}
    for deterministic in (False, True):
        out = str(tmp_path / str(deterministic))
        train(resolve_config(**opts, out=out, progress=False, ema_decay=0.0, deterministic=deterministic))
    assert fixed == [False, True]


def test_small_data_gets_a_floor_of_optimizer_steps(tmp_path, data, monkeypatch):
    cfg = resolve_config(data=str(data), out=str(tmp_path / "a"))
    assert cfg.auto_epochs and cfg.epochs == 10
    with pytest.warns(
        UserWarning, match=r"35 training images make 5 steps an epoch: 10 epoch\(s\) would be 50 optimizer"
    ):
        fit_epochs(cfg, per_epoch=5, images=35)
    assert cfg.epochs == 100  # 500 steps
    for explicit in ({"epochs": 10}, {"steps_per_epoch": 2}):
        assert not resolve_config(data=str(data), out=str(tmp_path / "b"), **explicit).auto_epochs
    assert not resolve_config(out=str(tmp_path / "c")).auto_epochs  # built-in data: its tuned recipe
    monkeypatch.setitem(RECIPES["short"], "epochs", 1)  # the engine applies it: 48 images / 8 = 6 steps an epoch
    monkeypatch.setattr(data_fit, "MIN_STEPS_PER_RUN", 18)
    opts = {"data": str(data), "arch": TINY, "out": str(tmp_path / "run"), "batch_size": 8, "img_size": 16}
    summary = train(resolve_config(**opts, workers=0, progress=False, ema_decay=0.0))
    assert summary["epochs"] == 3
