"""experiments/gpu_check.py: its CPU dry run passes, and the run records failures, caps and budgets instead of dying.

The GPU check is run by hand where a GPU is (docs/gpu.md); these tests keep its code from rotting
on machines without one: the same steps with ``--device cpu --quick`` (gloo instead of NCCL, the CPU
provider of onnxruntime, dynamo's aot_eager backend instead of inductor).
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from mobileone.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "experiments" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)


def read(out: Path) -> dict:
    assert (out / "gpu_check.md").is_file()
    return json.loads((out / "gpu_check.json").read_text())


def statuses(report: dict) -> dict[str, str]:
    return {r["step"]: r["status"] for r in report["steps"]}


def test_cpu_dry_run_passes(tmp_path):
    # Everything but compilation (the tests below): the engine in four precisions, the fast path against
    # the reference, DDP under torchrun, detection, segmentation, the benchmarks.
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--quick", "--out", str(out), "--budget-s", "600", "--skip", "*_compile"]
    assert gpu_check.main(argv) == 0
    report = read(out)
    status = statuses(report)
    failed = {r["step"]: r["message"] for r in report["steps"] if r["status"] == "fail"}
    assert not failed
    expected = {"environment", "equivalence_tiny", "ddp", "bench_train_step", "bench_latency"}
    expected |= {f"train_tiny_{m}" for m in ("fp32", "bf16", "fp16", "channels_last")}
    expected |= {f"train_{t}" for t in ("detect", "segment") if t in TASKS}
    assert {s for s, v in status.items() if v == "pass"} == expected
    assert status["pinned_loader"] == "skip" and not [s for s in status if s.endswith("_compile")]
    assert report["summary"] == {"pass": len(expected), "fail": 0, "skip": 1}
    steps = {r["step"]: r for r in report["steps"]}
    losses = steps["train_tiny_fp32"]["details"]["losses"]
    assert len(losses) == gpu_check.Plan.make(True, None).train_steps and losses[-1] < losses[0]
    assert {r["runtime"] for r in steps["bench_latency"]["details"]["rows"]} == {"eager", "onnxruntime"}
    assert {r["model"] for r in steps["bench_train_step"]["details"]["rows"]} == {
        "S0 fast",
        "S0 reference",
        "timm mobileone_s0",
        "torchvision mobilenet_v2",
    }
    md = (out / "gpu_check.md").read_text()
    assert "| train_tiny_bf16 | pass |" in md and "## Train step" in md and "## Inference latency" in md
    assert "## Targets" in md and "--quick" in md


@pytest.mark.slow
def test_compiled_latency_dry_run(tmp_path):
    # In a child process, as on the GPU, with dynamo's aot_eager backend.
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--quick", "--out", str(out), "--budget-s", "600", "--only", "bench_latency_compile"]
    assert gpu_check.main(argv) == 0
    (env, step) = read(out)["steps"]
    assert step["status"] == "pass", step["message"]
    assert [(r["model"], r["runtime"]) for r in step["details"]["rows"]] == [("mobileone_s0", "compile")]


@pytest.mark.slow
def test_compiled_training_dry_run(tmp_path, monkeypatch):
    # The dry run's train_tiny_compile step, here in this process: the engine's torch.compile with dynamo's
    # aot_eager backend (graph capture and AOT autograd, no inductor code generation).
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model=None, **kw: compile_(model, **{"backend": "aot_eager", **kw}))
    ctx = gpu_check.Context(
        torch.device("cpu"), gpu_check.Plan.make(True, None), True, tmp_path, time.monotonic() + 600
    )
    try:
        record = gpu_check.run_here(gpu_check.Step("train_tiny_compile", gpu_check.step_train("tiny", "compile")), ctx)
    finally:
        torch._dynamo.reset()
    assert record["status"] == "pass", record["message"]


def fake_runner(tmp_path, budget: float = 60.0, device: str = "cpu"):
    args = gpu_check.parse_args(["--device", device, "--quick", "--out", str(tmp_path), "--budget-s", str(budget)])
    return gpu_check.Runner(args, gpu_check.Plan.make(True, None), tmp_path)


def test_failures_are_recorded_and_the_run_goes_on(tmp_path):
    runner = fake_runner(tmp_path)
    seen_on_disk = []

    def broken(ctx):
        ctx.note(measured=1.5)
        raise RuntimeError("boom")

    def later(ctx):  # the previous step's record is on disk before this one starts
        seen_on_disk.append(statuses(read(tmp_path)))
        return "fine"

    def not_here(ctx):
        raise gpu_check.Skip("does not apply")

    for step in (gpu_check.Step("broken", broken), gpu_check.Step("skipped", not_here), gpu_check.Step("ok", later)):
        runner.run(step)
    report = read(tmp_path)
    assert statuses(report) == {"broken": "fail", "skipped": "skip", "ok": "pass"}
    assert seen_on_disk == [{"broken": "fail", "skipped": "skip"}]
    broken_record = report["steps"][0]
    assert broken_record["message"] == "RuntimeError: boom"
    assert broken_record["details"]["measured"] == 1.5 and "boom" in broken_record["details"]["traceback"]
    assert report["summary"] == {"pass": 1, "fail": 1, "skip": 1}
    assert "| broken | fail |" in (tmp_path / "gpu_check.md").read_text()


def test_a_child_step_is_stopped_at_its_cap(tmp_path):
    # The real compiled-training step in a child process, given 2 s: killed and recorded, not waited for.
    runner = fake_runner(tmp_path)
    start = time.monotonic()
    record = runner.run(gpu_check.Step("train_tiny_compile", lambda ctx: "", cap_s=2.0, min_s=0, launcher="python"))
    assert time.monotonic() - start < 30
    assert record["status"] == "fail" and "stopped at its cap of 2 s" in record["message"]


def test_the_budget_skips_what_no_longer_fits(tmp_path):
    runner = fake_runner(tmp_path, budget=0.0)
    record = runner.run(gpu_check.Step("slow", lambda ctx: "ran", min_s=5))
    assert record["status"] == "skip" and "--budget-s 0" in record["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_no_cuda_device_fails_clearly_and_skips_the_rest(tmp_path):
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path), "--only", "equivalence_*,ddp"]) == 1
    report = read(tmp_path)
    env, *rest = report["steps"]
    assert env["status"] == "fail"
    assert ("sees no GPU" in env["message"]) or ("CPU-only build" in env["message"])
    assert [r["step"] for r in rest] == ["equivalence_s0", "equivalence_s1", "ddp"]
    assert all(r["status"] == "skip" and "no usable CUDA device" in r["message"] for r in rest)


def test_targets_and_tables():
    rows = [
        {"model": "S0 fast", "memory_format": "channels_last", "images_per_s": 3200.0, "peak_mib": 9000.0},
        {"model": "S0 reference", "memory_format": "channels_last", "images_per_s": 2000.0, "peak_mib": 15000.0},
        {"model": "timm mobileone_s0", "memory_format": "channels_last", "images_per_s": 3400.0, "peak_mib": 14000.0},
    ]
    latency = [{"model": "mobileone_s0", "batch": 1, "runtime": "eager", "median_ms": 1.25}]
    records = [
        {"step": "bench_train_step", "status": "pass", "message": "m", "seconds": 1.0, "details": {"rows": rows}},
        {"step": "bench_latency", "status": "pass", "message": "a | b", "seconds": 1.0, "details": {"rows": latency}},
    ]
    found = {t["target"].split(" (")[0]: (t["value"], t["met"]) for t in gpu_check.targets(records)}
    assert found == {
        "S0 fast >= 1.5x the reference": ("1.60x", True),
        "S0 fast faster than timm mobileone_s0": ("0.94x", False),
        "S0 fast peak memory below the reference and timm": ("9000 / 15000 / 14000 MiB", True),
    }
    report = {
        "environment": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.13.0"},
        "summary": {"pass": 2, "fail": 0, "skip": 0},
        "started": "now",
        "elapsed_s": 3.0,
        "budget_s": 280.0,
        "quick": False,
        "steps": records,
        "targets": gpu_check.targets(records),
        "plan": gpu_check.Plan.make(False, None).__dict__,
    }
    md = gpu_check.markdown(report)
    assert md.startswith("# mobileone GPU readiness check\n\nNVIDIA H100 80GB HBM3;")
    assert "| S0 fast | channels_last | 3,200 | 1.60x | 9,000 |" in md
    assert "| S0 fast >= 1.5x the reference (channels_last) | 1.60x | yes |" in md
    assert "| bench_latency | pass | 1.0 | a \\| b |" in md  # a pipe in a message does not break the table
    assert "| mobileone_s0 | 1 | 1.250 |" in md


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--models", "s9"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget-s", "-1"])


def test_missing_packages_are_told_apart_from_broken_imports():
    try:
        try:
            import not_a_package_anywhere  # noqa: F401
        except ImportError as inner:
            raise ImportError("not_a_package_anywhere is needed: pip install 'mobileone[detect]'") from inner
    except ImportError as e:
        assert gpu_check._missing_package(e) == "not_a_package_anywhere"  # a skip, with the advice
    assert gpu_check._missing_package(ModuleNotFoundError("gone", name="mobileone.tasks.gone")) is None  # a failure
    assert gpu_check._missing_package(ImportError("cannot import name 'x'")) is None


def test_the_gpu_plan_names_what_exists():
    from mobileone.bench.peers import available_models

    plan = gpu_check.Plan.make(False, None)
    assert set(plan.lat_models) <= set(available_models())  # with timm installed, as make install does
    names = [s.name for s in gpu_check.steps_for(plan)]
    assert names[0] == "environment" and names[-1] == "bench_latency_compile"
    for model in ("s0", "s1"):
        assert f"equivalence_{model}" in names
        assert {f"train_{model}_{mode}" for mode in gpu_check.TRAIN_MODES} <= set(names)
    assert {"pinned_loader", "ddp", "train_detect", "train_segment", "bench_train_step", "bench_latency"} <= set(names)
    launched = {s.name: s.launcher for s in gpu_check.steps_for(plan) if s.launcher}
    assert launched == {
        "ddp": "torchrun",
        "train_s0_compile": "python",
        "train_s1_compile": "python",
        "bench_latency_compile": "python",
    }
