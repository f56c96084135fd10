"""The latency benchmark: peers (which models), timing (how), studies (the paper's analyses), report, runner.

Needs the ``[bench]`` extra (onnxruntime, scipy, matplotlib, tqdm).
"""

from .peers import BenchModel, available_models, resolve_models
from .runner import BenchConfig, correlations, deployment_report, run_benchmark
from .studies import ConvNet30, MicroStudy, activation_study, skip_se_study, spearman
from .timing import RUNTIMES, latency_stats, measure_peak_gflops, time_calls, time_model

__all__ = [
    "RUNTIMES",
    "BenchConfig",
    "BenchModel",
    "ConvNet30",
    "MicroStudy",
    "activation_study",
    "available_models",
    "correlations",
    "deployment_report",
    "latency_stats",
    "measure_peak_gflops",
    "resolve_models",
    "run_benchmark",
    "skip_se_study",
    "spearman",
    "time_calls",
    "time_model",
]
