"""The paper's detection claim on the built-in digit scenes: SSDLite on MobileOne against SSDLite on MobileNetV3.

The paper (Table 11a) reports more COCO mAP for SSDLite on MobileOne-S1 than on MobileNetV2 at
lower latency. COCO does not fit a CPU budget; this script asks the same question on the
built-in semi-synthetic scenes (real digit scans pasted on real photographs, exact boxes): every
detector is trained from scratch with the very same command (``mobileone train --task detect
--variant V --seed S``, one process per run), for several seeds, and the fused detectors are timed
in onnxruntime at 320 px, batch 1, against the peer. It writes ``results.md`` and
``results.json`` under ``--out``: mAP (IoU 0.50:0.95) and mAP@0.5 per run, their mean and
sample standard deviation per detector, and the latency table of ``mobileone bench --task detect``.

    .venv/bin/python experiments/detect_seeds.py --out runs/detect_seeds      # 3 seeds x 3 detectors
    .venv/bin/python experiments/detect_seeds.py --variants s0 mnv3 --seeds 0 --epochs 2   # a quick look

Run it on a quiet machine: the latencies are only worth reporting there, and the training times
are recorded beside the mAPs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling train_runs.py, also when loaded by path
from train_runs import train_subprocess  # noqa: E402


def train_run(variant: str, seed: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One training run in its own process; its summary plus the wall time."""
    options = {"--variant": variant, "--seed": seed, "--workers": args.workers, "--data": args.data}
    options |= {"--epochs": args.epochs, "--img-size": args.img_size, "--steps-per-epoch": args.steps_per_epoch}
    cmd, summary, seconds = train_subprocess("detect", out, options | {"--threads": args.threads})
    best = summary["best"]
    return {
        "variant": variant,
        "seed": seed,
        "map": best["map"],
        "map_50": best["map_50"],
        "map_75": best["map_75"],
        "best_epoch": best["epoch"],
        "weights": best["weights"],
        "seconds": seconds,
        "train_images_per_second": summary["train_images_per_second"],
        "command": " ".join(cmd[1:]),
    }


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample standard deviation, min and max of mAP and mAP@0.5 per detector."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        entry: dict[str, Any] = {"variant": variant, "runs": len(runs)}
        for key in ("map", "map_50"):
            values = [r[key] for r in runs]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{key}_min"], entry[f"{key}_max"] = min(values), max(values)
        entry["seconds"] = statistics.fmean(r["seconds"] for r in runs)
        out.append(entry)
    return out


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"# SSDLite on MobileOne against MobileNetV3-Large, built-in digit scenes ({result['date']})",
        "",
        f"Each detector trained from scratch by `mobileone train --task detect --variant V --seed S` "
        f"(epochs: {cfg['epochs'] or 'the built-in default'}, img size: {cfg['img_size'] or 'the built-in default'}, "
        f"{cfg['threads'] or 'default'} threads), seeds {cfg['seeds']}. mAP in percent (COCO protocol) of the best "
        "epoch's weights on the validation scenes; mean, sample standard deviation and range over the seeds.",
        "",
        "| detector | runs | mAP mean | mAP std | mAP range | mAP@0.5 mean | mAP@0.5 std | train s (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in result["aggregate"]:
        lines.append(
            f"| ssdlite_{a['variant']} | {a['runs']} | {a['map']:.2f} | {a['map_std']:.2f} | "
            f"{a['map_min']:.2f} - {a['map_max']:.2f} | {a['map_50']:.2f} | {a['map_50_std']:.2f} | "
            f"{a['seconds']:.0f} |"
        )
    lines += [
        "",
        "Per run:",
        "",
        "| detector | seed | mAP | mAP@0.5 | best epoch | weights | train s |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| ssdlite_{r['variant']} | {r['seed']} | {r['map']:.2f} | {r['map_50']:.2f} | "
            f"{r['best_epoch']} | {r['weights']} | {r['seconds']:.0f} |"
        )
    if result.get("latency_md"):
        lines += ["", result["latency_md"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/detect_seeds")
    p.add_argument("--variants", nargs="+", default=["s0", "s1", "mnv3"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", help="a detection dataset folder (default: the built-in digit scenes)")
    p.add_argument("--epochs", type=int, help="default: the built-in data's")
    p.add_argument("--img-size", type=int, help="training size (default: the built-in data's, 96)")
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--latency-size", type=int, default=320, help="input size of the latency table (0: skip it)")
    p.add_argument("--runtimes", default="eager,onnxruntime")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:  # seeds outermost: an interrupted study still has every detector for the first seeds
        for variant in args.variants:
            row = train_run(variant, seed, out / f"{variant}-seed{seed}", args)
            runs.append(row)
            print(
                f"ssdlite_{variant} seed {seed}: mAP {row['map']:.2f}, mAP@0.5 {row['map_50']:.2f} "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": vars(args),
        "runs": runs,
        "aggregate": aggregate(runs),
    }
    if args.latency_size:
        from mobileone.bench.detect import DetectionBenchConfig, detection_benchmark

        classes = len(
            json.loads((out / f"{args.variants[0]}-seed{args.seeds[0]}" / "best.json").read_text())["class_names"]
        )
        bench = DetectionBenchConfig(
            models=[f"ssdlite_{v}" for v in args.variants],
            runtimes=args.runtimes.split(","),
            img_size=args.latency_size,
            num_classes=classes,
            threads=args.threads,
            iters=args.iters,
            rounds=args.rounds,
            out=str(out),
        )
        latency = detection_benchmark(bench)
        result["latency"] = latency["rows"]
        result["latency_stable"] = latency["stable"]
        result["latency_md"] = (out / "detect_results.md").read_text()
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
