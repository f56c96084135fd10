"""The segmentation latency benchmark and the 3-seed comparison script, on tiny settings (no timing is asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest

from mobileone.bench.segment import SegmentationBenchConfig
from mobileone.cli import main

from .segment_data import make_masks_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def test_bench_command_times_both_output_strides_fused_and_unfused(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(
        [
            "bench",
            "--task",
            "segment",
            "--models",
            "lraspp_s0,deeplabv3_mnv3",
            "--runtimes",
            "eager",
            "--img-size",
            "64",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--min-time",
            "0",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / "segment_results.json").read_text())
    cases = {(r["model"], r["output_stride"], r["fused"]) for r in result["rows"]}
    assert cases == {
        ("lraspp_s0", 16, True),
        ("lraspp_s0", 16, False),
        ("lraspp_s0", 8, True),
        ("lraspp_s0", 8, False),
        ("deeplabv3_mnv3", 16, True),
        ("deeplabv3_mnv3", 16, False),
    }
    assert all(r["eager"]["median_ms"] > 0 for r in result["rows"])
    fused = {(r["model"], r["output_stride"]): r for r in result["rows"] if r["fused"]}
    unfused = {(r["model"], r["output_stride"]): r for r in result["rows"] if not r["fused"]}
    assert all(fused[k]["params"] < unfused[k]["params"] for k in fused)  # branches and BatchNorms folded
    assert fused[("lraspp_s0", 8)]["macs"] > fused[("lraspp_s0", 16)]["macs"]  # dilation keeps stage 4 large
    md = (out / "segment_results.md").read_text()
    assert "| lraspp_s0 | 8 | fused |" in md and "fused vs unfused" in md and md in capsys.readouterr().out
    with pytest.raises(ValueError, match="output strides must be 16 and/or 8"):
        SegmentationBenchConfig(output_strides=[32])
    with pytest.raises(ValueError, match="unknown segmenter"):
        SegmentationBenchConfig(models=["fcn_s0"])


@pytest.mark.slow  # four training subprocesses of the real S0 and MobileNetV3 (about 30-60 s on 2 cores)
def test_seed_comparison_script_runs_end_to_end_on_a_tiny_setting(tmp_path):
    spec = importlib.util.spec_from_file_location("segment_seeds", ROOT / "experiments" / "segment_seeds.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = make_masks_dataset(tmp_path / "d", n_train=4, n_val=1)
    out = tmp_path / "seeds"
    argv = [
        "--models",
        "lraspp_s0",
        "lraspp_mnv3",
        "--seeds",
        "0",
        "1",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--img-size",
        "32",
        "--batch-size",
        "2",
        "--steps-per-epoch",
        "1",
        "--threads",
        "1",
        "--workers",
        "0",
        "--latency-size",
        "64",
        "--latency-threads",
        "1",
        "--runtimes",
        "eager",
        "--iters",
        "1",
        "--out",
        str(out),
    ]
    assert script.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in result["runs"]] == [
        ("lraspp_s0", 0),
        ("lraspp_mnv3", 0),
        ("lraspp_s0", 1),
        ("lraspp_mnv3", 1),
    ]
    assert {a["model"]: a["runs"] for a in result["aggregate"]} == {"lraspp_s0": 2, "lraspp_mnv3": 2}
    assert all(
        0 <= r["miou"] <= 100 and r["command"].startswith("mobileone train --task segment") for r in result["runs"]
    )
    assert {r["model"] for r in result["latency"]["rows"]} == {"lraspp_s0", "lraspp_mnv3"}
    md = (out / "results.md").read_text()
    assert "| lraspp_s0 | 2 |" in md and "Latency, fused" in md
    assert script.main(argv) == 0  # a second call reuses the finished runs
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4
