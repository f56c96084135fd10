import csv
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from mobileone import MobileOneConfig, create_model
from mobileone.bench import (
    BenchConfig,
    BenchModel,
    ConvNet30,
    MicroStudy,
    activation_study,
    latency_stats,
    resolve_models,
    run_benchmark,
    spearman,
    time_calls,
    time_model,
)
from mobileone.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spearman_against_known_values():
    # scipy's documented example, and the exact formula 1 - 6 sum d^2 / (n (n^2 - 1)) without ties.
    rho, p = spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert rho == pytest.approx(0.8207826816681233) and p == pytest.approx(0.0885870053135438)
    rho, _ = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])  # d = (1, 1, 1, 1, 0): 1 - 6 * 4 / 120
    assert rho == pytest.approx(0.8)
    assert spearman([10, 20, 30], [3, 2, 1])[0] == pytest.approx(-1.0)


def test_latency_stats_and_timing():
    stats = latency_stats(np.array([0.001, 0.002, 0.003, 0.004, 0.010]))
    assert stats["min_ms"] == pytest.approx(1) and stats["median_ms"] == pytest.approx(3)
    assert stats["p90_ms"] == pytest.approx(7.6) and stats["spread"] == pytest.approx(2.0) and stats["runs"] == 5
    calls = []
    times = time_calls(lambda: calls.append(1), warmup=3, iters=7, min_time=0.0)
    assert len(times) == 7 and len(calls) == 10


def test_convnet30_variants():
    x = torch.randn(1, 8, 6, 6)
    for act in ("ReLU", "GELU", "SiLU", "Hardswish", "SE-ReLU"):
        net = ConvNet30(act, depth=30, width=8)
        assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules()) == 30
        assert net(x).shape == x.shape
    plain, skip = ConvNet30(width=8), ConvNet30(width=8, skip=True)
    skip.load_state_dict(plain.state_dict())
    assert not torch.equal(plain(x), skip(x))  # the residual changes the function
    assert len(ConvNet30(width=32, se=True).state_dict()) > len(plain.state_dict())
    with pytest.raises(ValueError, match="unknown activation"):
        ConvNet30("Mish")


def test_activation_study_relative_to_relu():
    rows = activation_study("eager", 1, MicroStudy(depth=3, width=8, resolution=8), warmup=1, iters=3, min_time=0)
    assert [r["variant"] for r in rows] == ["ReLU", "GELU", "SiLU", "Hardswish", "SE-ReLU"]
    assert rows[0]["relative"] == 1.0 and all(r["median_ms"] > 0 for r in rows)


def _tiny(k: int):
    cfg = MobileOneConfig(widths=(8, 16, 16, 32), stem_width=8, blocks=(1, 1, 1, 1), k=k)
    return lambda: create_model(cfg, num_classes=10).eval()


def test_benchmark_end_to_end_writes_all_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    models = [
        BenchModel("tiny_k1", "MobileOne (fused)", _tiny(1)),
        BenchModel("tiny_k2", "MobileOne (fused)", _tiny(2)),
        BenchModel("tiny_k3", "MobileOne (fused)", _tiny(3)),
        BenchModel("tiny_unfused", "MobileOne (train-time graph)", _tiny(2), deployed=False),
    ]
    cfg = BenchConfig(
        runtimes=["eager", "onnxruntime"],
        batch_sizes=[1, 2],
        img_size=32,
        threads=1,
        out=str(tmp_path),
        warmup=1,
        iters=2,
        min_time=0.0,
        micro=MicroStudy(2, 8, 8),
        peak_size=256,
    )
    result = run_benchmark(cfg, models, progress=False)
    assert not result["errors"] and result["peak_gflops"] > 0
    assert {"torch", "onnxruntime", "machine"} <= set(result["versions"])
    for name in ("results.md", "results.csv", "results.json", "latency_vs_macs.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len([r for r in rows if r["family"].startswith("MobileOne")]) == 4 * 2 * 2  # models x runtimes x batches
    assert {r["runtime"] for r in rows} == {"eager", "onnxruntime"}
    assert all(float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["p90_ms"]) for r in rows)
    corr = {c["runtime"]: c for c in result["correlations"]}
    assert corr["eager"]["models"] == 3  # the train-time graph is left out
    md = (tmp_path / "results.md").read_text()
    assert "| tiny_k1 | onnxruntime |" in md and "Spearman" in md and "SE-ReLU" in md and "+ skip + SE" in md


@pytest.mark.parametrize("runtime", ["channels_last", "executorch"])
def test_other_runtimes_time_a_model(runtime):
    if runtime == "executorch" and importlib.util.find_spec("executorch") is None:
        pytest.skip("executorch is not installed (pip install 'mobileone[export]')")
    stats = time_model(_tiny(1)(), runtime, batch=1, img_size=32, threads=1, warmup=1, iters=2, min_time=0.0)
    assert stats["runs"] == 2 and stats["median_ms"] > 0


def test_model_groups_and_bad_names():
    names = [m.name for m in resolve_models(["default"])]
    assert "mobileone_s0" in names and "mobileone_s4_unfused" in names and "mobilenet_v3_large" in names
    assert not next(m for m in resolve_models(["unfused"])).deployed
    with pytest.raises(ValueError, match="unknown benchmark model"):
        resolve_models(["resnet9000"])
    with pytest.raises(ValueError, match="unknown runtime"):
        BenchConfig(runtimes=["tensorrt"])


def test_cli_bench_runs(tmp_path, capsys):
    argv = [
        "bench",
        "--models",
        "mobileone_s0,mobilenet_v3_small",
        "--runtimes",
        "eager",
        "--batch-sizes",
        "1,2",
        "--img-size",
        "32",
        "--threads",
        "1",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--min-time",
        "0",
        "--no-studies",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| mobileone_s0 | eager |" in out and "| mobilenet_v3_small | eager |" in out
    assert (tmp_path / "latency_vs_macs.png").exists()
