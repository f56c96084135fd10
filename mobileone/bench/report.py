"""The benchmark's results as markdown, CSV, JSON, the latency-vs-MACs plot (the paper's Figure 2) and, per
runtime, latency against the published ImageNet top-1 with its Pareto front."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from ..core.config import PAPER
from ..core.files import write_text
from ..deploy.common import require
from .timing import STABLE_ROUNDS, WIDE_SPREAD


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
        s, lg = r[f"bs{small}"], r.get(f"bs{large}")
        flag = " *" if busy(s) else ""
        if flag:
            noisy.append(f"{r['model']} / {r['runtime']} ({100 * max(s['spread'], s.get('round_spread', 0)):.0f} %)")
        big = (
            f"{lg['throughput']:.0f} | {100 * s['peak_fraction']:.1f} | {100 * lg['peak_fraction']:.1f}"
            if lg
            else (f"batch 1 only | {100 * s['peak_fraction']:.1f} | n/a")
        )
        lines.append(f"{head} {s['min_ms']:.2f} | {s['median_ms']:.2f}{flag} | {s['p90_ms']:.2f} | {big} |")
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
            f"Note: * marks a median more than {100 * WIDE_SPREAD:.0f} % above the minimum, or round medians more "
            f"than {100 * STABLE_ROUNDS:.0f} % apart: a busy machine: "
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


def busy(stats: dict[str, float]) -> bool:
    """A measurement a busy machine spoiled: calls far above the fastest, or rounds far apart."""
    return stats["spread"] > WIDE_SPREAD or stats.get("round_spread", 0.0) > STABLE_ROUNDS


def paper_table(result: dict[str, Any]) -> list[str]:
    """One table per runtime: batch-1 latency here beside the paper's top-1, iPhone 12 and desktop CPU columns."""
    b = min(result["config"]["batch_sizes"])
    where = f"batch {b}, {result['config']['img_size']} px, {result['threads']} threads"
    lines = []
    for runtime, precision in dict.fromkeys((r["runtime"], r.get("precision", "fp32")) for r in result["rows"]):
        rows = [
            r
            for r in result["rows"]
            if (r["runtime"], r.get("precision", "fp32")) == (runtime, precision) and f"bs{b}" in r and r["deployed"]
        ]
        base = next((r[f"bs{b}"]["median_ms"] for r in rows if r["model"] == "mobilenet_v2"), None)
        lines += [
            "",
            f"{runtime} ({precision}; {where}), beside the paper's Table 4 "
            "(ImageNet top-1; iPhone 12 with Core ML, the mobile column; Xeon CPU):",
            "",
            "| model | paper top-1 % | paper iPhone 12 ms | paper CPU ms | median ms here | vs MobileNetV2 "
            "| rounds apart |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(rows, key=lambda r: r[f"bs{b}"]["median_ms"]):
            p, s = PAPER.get(r["model"]), r[f"bs{b}"]
            ratio = f"{s['median_ms'] / base:.2f}x" if base else "n/a"
            lines.append(
                f"| {r['model']} | {_fmt(p.top1 if p else None, 1)} | {_fmt(p.iphone12_ms if p else None)} | "
                f"{_fmt(p.cpu_ms if p else None)} | {s['median_ms']:.2f}{' *' if busy(s) else ''} | {ratio} | "
                f"{100 * s.get('round_spread', 0.0):.0f} % |"
            )
    return lines


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (latency, top-1, name) points no other point beats on both: faster and at least as accurate."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def plot_latency_vs_top1(result: dict[str, Any], path: Path) -> None:
    """Per runtime: batch-1 latency here against the published ImageNet top-1, with the Pareto front."""
    matplotlib = require("matplotlib", "bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = min(result["config"]["batch_sizes"])
    runtimes = list(dict.fromkeys(r["runtime"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(runtimes), figsize=(5.5 * len(runtimes), 4.5), squeeze=False)
    for ax, runtime in zip(axes[0], runtimes, strict=True):
        rows = [r for r in result["rows"] if r["runtime"] == runtime and f"bs{b}" in r and r["model"] in PAPER]
        points = [(r[f"bs{b}"]["median_ms"], PAPER[r["model"]].top1, r["model"]) for r in rows]
        for ms, top1, name in points:
            ax.scatter(
                ms, top1, marker="o" if name.startswith("mobileone") else "s", c="C0" if "mobileone" in name else "C1"
            )
            ax.annotate(
                name.replace("mobileone_", ""), (ms, top1), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        front = pareto_front(points)
        ax.step(
            [p[0] for p in front], [p[1] for p in front], where="post", c="grey", ls="--", lw=1, label="Pareto front"
        )
        ax.set(xlabel="median latency here (ms)", ylabel="published ImageNet top-1 (%)", title=f"{runtime}, batch {b}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_result(out: str | Path, stem: str, result: dict[str, Any], markdown: str) -> Path:
    """``stem.json`` and ``stem.md`` in ``out``, each written atomically: every benchmark's result files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{stem}.json", json.dumps(result, indent=2, default=str))
    write_text(out / f"{stem}.md", markdown)
    return out


def write_results(result: dict[str, Any], out: Path) -> None:
    """results.md, results.csv, results.json and latency_vs_macs.png in ``out``."""
    save_result(out, "results", result, results_markdown(result))
    fields = [
        "model",
        "family",
        "deployed",
        "runtime",
        "precision",
        "params",
        "macs",
        "batch",
        "min_ms",
        "median_ms",
        "p90_ms",
        "runs",
        "spread",
        "round_spread",
        "rounds",
        "throughput",
        "peak_fraction",
        "error",
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in result["rows"]:
            base = {k: r.get(k) for k in ("model", "family", "deployed", "runtime", "precision", "params", "macs")}
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
    plot_latency_vs_top1(result, out / "latency_vs_top1.png")


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
