"""The benchmark's results as markdown, CSV, JSON and the latency-vs-MACs plot (the paper's Figure 2)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from ..core.config import PAPER
from ..deploy.common import require
from .timing import WIDE_SPREAD


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def results_markdown(result: dict[str, Any]) -> str:
    """The results as markdown: machine, main table, correlations, micro-studies, notes."""
    cfg, v = result["config"], result["versions"]
    bs = sorted(cfg["batch_sizes"])
    small, large = bs[0], bs[-1]
    lines = [
        f"# MobileOne latency benchmark ({result['date']})",
        "",
        f"Machine: {v.get('machine')}, {cfg['threads']} threads; measured fp32 peak "
        f"({cfg.get('peak_size', 2048)}^3 matmul) "
        f"{result['peak_gflops']:.0f} GFLOP/s. Input {cfg['img_size']}x{cfg['img_size']}, eval + inference mode, "
        f"random weights. Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "machine") + ".",
        "",
        f"| model | runtime | params M | MACs M | bs{small} min ms | median ms | p90 ms | "
        f"img/s at bs{large} | % peak bs{small} | % peak bs{large} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    noisy = []
    for r in result["rows"]:
        head = f"| {r['model']} | {r['runtime']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e6:.0f} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        s, lg = r[f"bs{small}"], r[f"bs{large}"]
        flag = " *" if s["spread"] > WIDE_SPREAD else ""
        if flag:
            noisy.append(f"{r['model']} / {r['runtime']} ({100 * s['spread']:.0f} %)")
        lines.append(
            f"{head} {s['min_ms']:.2f} | {s['median_ms']:.2f}{flag} | {s['p90_ms']:.2f} | "
            f"{lg['throughput']:.0f} | {100 * s['peak_fraction']:.1f} | {100 * lg['peak_fraction']:.1f} |"
        )
    lines += paper_table(result)
    if result["correlations"]:
        lines += [
            "",
            "Spearman rank correlation of latency with MACs and with params (deployed models only; "
            "the paper: mobile 0.47 / 0.30, desktop CPU 0.06 / 0.07):",
            "",
            "| runtime | models | batch | rho (MACs) | p | rho (params) | p |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in result["correlations"]:
            lines.append(
                f"| {c['runtime']} | {c['models']} | {c['batch']} | {_fmt(c['rho_macs'])} | "
                f"{_fmt(c['p_macs'], 3)} | {_fmt(c['rho_params'])} | {_fmt(c['p_params'], 3)} |"
            )
    if result["studies"]:
        m = cfg["micro"]
        lines += [
            "",
            f"{m['depth']}-layer 3x3 conv net, {m['width']} channels at {m['resolution']}x{m['resolution']}, "
            "batch 1 (activations: the paper's Table 2; skip connections and SE: their cost):",
            "",
            "| study | variant | runtime | median ms | p90 ms | relative |",
            "|---|---|---|---:|---:|---:|",
        ]
        for s in result["studies"]:
            lines.append(
                f"| {s['study']} | {s['variant']} | {s['runtime']} | {s['median_ms']:.2f} | "
                f"{s['p90_ms']:.2f} | {s['relative']:.2f}x |"
            )
    if noisy:
        lines += [
            "",
            f"Note: * marks a median more than {100 * WIDE_SPREAD:.0f} % above the minimum, a noisy machine: "
            + ", ".join(noisy)
            + ". Re-run on a quiet machine before quoting.",
        ]
    if any(r.get(k, {}).get("peak_fraction", 0) > 1 for r in result["rows"] for k in r if k.startswith("bs")):
        lines += [
            "",
            "Note: a fraction of peak above 100 % means that runtime's kernels outran the torch matmul "
            "that measures the peak (or the peak ran while the machine was busy).",
        ]
    for e in result["errors"]:
        lines.append(f"\nFailed: {e}")
    return "\n".join(lines) + "\n"


def paper_table(result: dict[str, Any]) -> list[str]:
    """Batch-1 median latency per runtime next to the paper's desktop CPU column (its Table 4)."""
    b = min(result["config"]["batch_sizes"])
    runtimes = list(dict.fromkeys(r["runtime"] for r in result["rows"]))
    by_model: dict[str, dict[str, float]] = {}
    for r in result["rows"]:
        if r["model"] in PAPER and PAPER[r["model"]].cpu_ms is not None and f"bs{b}" in r:
            by_model.setdefault(r["model"], {})[r["runtime"]] = r[f"bs{b}"]["median_ms"]
    if not by_model:
        return []
    where = f"here batch {b}, {result['config']['img_size']} px, {result['threads']} threads"
    lines = [
        "",
        f"Next to the paper's CPU column (Xeon Gold 5118, batch 1, 224 px; {where}):",
        "",
        "| model | " + " | ".join(f"{rt} ms" for rt in runtimes) + " | paper CPU ms |",
        "|---|" + "---:|" * (len(runtimes) + 1),
    ]
    for model, lat in by_model.items():
        cells = " | ".join(f"{lat[rt]:.2f}" if rt in lat else "n/a" for rt in runtimes)
        lines.append(f"| {model} | {cells} | {PAPER[model].cpu_ms:.2f} |")
    return lines


def write_results(result: dict[str, Any], out: Path) -> None:
    """results.md, results.csv, results.json and latency_vs_macs.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(results_markdown(result))
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    fields = [
        "model",
        "family",
        "deployed",
        "runtime",
        "params",
        "macs",
        "batch",
        "min_ms",
        "median_ms",
        "p90_ms",
        "runs",
        "spread",
        "throughput",
        "peak_fraction",
        "error",
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in result["rows"]:
            base = {k: r[k] for k in ("model", "family", "deployed", "runtime", "params", "macs")}
            if "error" in r:
                writer.writerow({**base, "error": r["error"]})
            for key in sorted(k for k in r if k.startswith("bs")):
                writer.writerow({**base, "batch": int(key[2:]), **r[key]})
        for s in result["studies"]:
            writer.writerow(
                {
                    "model": f"convnet30 {s['variant']}",
                    "family": s["study"],
                    "runtime": s["runtime"],
                    "batch": 1,
                    **{k: s[k] for k in ("min_ms", "median_ms", "p90_ms", "runs", "spread")},
                }
            )
    plot_latency_vs_macs(result, out / "latency_vs_macs.png")


def plot_latency_vs_macs(result: dict[str, Any], path: Path) -> None:
    """Latency against MACs per runtime, one marker per family: the paper's Figure 2 on this machine."""
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = min(result["config"]["batch_sizes"])
    runtimes = list(dict.fromkeys(r["runtime"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(runtimes), figsize=(6 * len(runtimes), 4.5), squeeze=False)
    markers = {"MobileOne (fused)": "o", "MobileOne (train-time graph)": "x", "torchvision": "s", "timm": "^"}
    for ax, runtime in zip(axes[0], runtimes, strict=True):
        rows = [r for r in result["rows"] if r["runtime"] == runtime and f"bs{b}" in r]
        for family in dict.fromkeys(r["family"] for r in rows):
            pts = [r for r in rows if r["family"] == family]
            ax.scatter(
                [r["macs"] / 1e6 for r in pts],
                [r[f"bs{b}"]["median_ms"] for r in pts],
                marker=markers.get(family, "D"),
                label=family,
            )
            for r in pts:
                ax.annotate(
                    r["model"].replace("mobileone_", "").replace("_unfused", "*"),
                    (r["macs"] / 1e6, r[f"bs{b}"]["median_ms"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        corr = next((c for c in result["correlations"] if c["runtime"] == runtime), None)
        title = f"{runtime}, batch {b}, {result['threads']} threads"
        if corr:
            title += f"\nSpearman rho: MACs {_fmt(corr['rho_macs'])}, params {_fmt(corr['rho_params'])}"
        ax.set(xlabel="MACs (M)", ylabel="median latency (ms)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
