"""DeepLabV3 and LR-ASPP on MobileOne-S0 against the same heads on MobileNetV3-Large, on the built-in digit scenes.

The paper (Table 11b) reports DeepLabV3 on MobileOne-S0 at 73.7 mIoU on Pascal VOC against 75.7
for MobileNetV2; VOC does not fit a CPU budget. This script asks the comparison's question on the
built-in semi-synthetic scenes (real digit scans on real photographs, pixel masks from the scans):
every model is trained from scratch with the very same command (``mobileone train --task segment
--variant V --head H --seed S``, one process per run), for several seeds, and the fused models are
timed in onnxruntime at 512 px, batch 1 (``mobileone bench --task segment``'s code). It writes
``results.md`` and ``results.json`` under ``--out``: mIoU and pixel accuracy per run, their mean,
sample standard deviation and range per model, and the latency table. Finished runs are kept:
running it again with the same ``--out`` skips them (and re-times).

    .venv/bin/python experiments/segment_seeds.py --out runs/segment_seeds   # 3 seeds x 4 models
    .venv/bin/python experiments/segment_seeds.py --models lraspp_s0 lraspp_mnv3 --seeds 0 --epochs 2

Run it on a quiet machine: the latencies are only worth reporting there, and the training times
are recorded beside the mIoUs.
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

from mobileone.bench.segment import SegmentationBenchConfig, run_segmentation_benchmark, segmentation_markdown

MODELS = ("deeplabv3_s0", "lraspp_s0", "deeplabv3_mnv3", "lraspp_mnv3")


def train_run(model: str, seed: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One training run in its own process; its summary plus the wall time."""
    head, variant = model.split("_", 1)
    options = {"--variant": variant, "--head": head, "--seed": seed, "--workers": args.workers, "--data": args.data}
    options |= {"--epochs": args.epochs, "--img-size": args.img_size, "--batch-size": args.batch_size}
    options |= {"--steps-per-epoch": args.steps_per_epoch, "--threads": args.threads}
    cmd, summary, seconds = train_subprocess("segment", out, options)
    best = summary["best"]
    return {
        "model": model,
        "seed": seed,
        "miou": best["miou"],
        "pixel_acc": best["pixel_acc"],
        "best_epoch": best["epoch"],
        "weights": best["weights"],
        "seconds": seconds,
        "train_images_per_second": summary["train_images_per_second"],
        "command": " ".join(["mobileone", *cmd[3:]]),
    }


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample standard deviation, min and max of mIoU and pixel accuracy per model."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == model]
        entry: dict[str, Any] = {"model": model, "runs": len(runs)}
        for key in ("miou", "pixel_acc"):
            values = [r[key] for r in runs]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{key}_min"], entry[f"{key}_max"] = min(values), max(values)
        entry["seconds"] = statistics.fmean(r["seconds"] for r in runs)
        out.append(entry)
    return out


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    default = "the built-in default"
    lines = [
        f"# DeepLabV3 / LR-ASPP on MobileOne-S0 against MobileNetV3-Large, built-in digit scenes ({result['date']})",
        "",
        "Each model trained from scratch by `mobileone train --task segment --variant V --head H --seed S` "
        f"(epochs: {cfg['epochs'] or default}, img size: {cfg['img_size'] or default}, batch: "
        f"{cfg['batch_size'] or default}, {cfg['threads'] or 'default'} threads), seeds {cfg['seeds']}. mIoU and "
        "pixel accuracy in percent of the best epoch's weights on the full-resolution validation scenes; mean, "
        "sample standard deviation and range over the seeds.",
        "",
        "| model | runs | mIoU mean | mIoU std | mIoU range | pixel acc mean | pixel acc std | train s (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in result["aggregate"]:
        lines.append(
            f"| {a['model']} | {a['runs']} | {a['miou']:.2f} | {a['miou_std']:.2f} | {a['miou_min']:.2f}-"
            f"{a['miou_max']:.2f} | {a['pixel_acc']:.2f} | {a['pixel_acc_std']:.2f} | "
            f"{a['seconds']:.0f} |"
        )
    lines += [
        "",
        "Runs:",
        "",
        "| model | seed | mIoU | pixel acc | best epoch | weights | command |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['model']} | {r['seed']} | {r['miou']:.2f} | {r['pixel_acc']:.2f} | {r['best_epoch']} | "
            f"{r['weights']} | `{r['command']}` |"
        )
    if result.get("latency"):
        lines += ["", segmentation_markdown(result["latency"]).replace("# Segmentation latency", "## Latency, fused")]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"default: {' '.join(MODELS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default="runs/segment_seeds")
    p.add_argument("--data", help="a segmentation dataset instead of the built-in scenes")
    p.add_argument("--epochs", type=int, help="default: the built-in data's")
    p.add_argument("--img-size", type=int, help="training crop (default: the built-in data's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps-per-epoch", type=int, help="cap the steps of an epoch (quick looks)")
    p.add_argument("--threads", type=int, help="torch threads of each training process")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes of each training run")
    p.add_argument("--latency-size", type=int, default=512)
    p.add_argument("--latency-threads", type=int, default=2)
    p.add_argument("--runtimes", nargs="+", default=["onnxruntime"], help="latency runtimes (eager, onnxruntime)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per latency (after 5 warm-up calls)")
    p.add_argument("--no-latency", action="store_true")
    args = p.parse_args(argv)
    bad = [m for m in args.models if "_" not in m or m.split("_", 1)[0] not in ("deeplabv3", "lraspp")]
    if bad:
        p.error(f"--models takes head_backbone names such as {', '.join(MODELS)}; got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "runs.jsonl"
    rows = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.is_file() else []
    for seed in args.seeds:
        for model in args.models:
            if any(r["model"] == model and r["seed"] == seed for r in rows):
                continue
            print(f"training {model} seed {seed}", flush=True)
            row = train_run(model, seed, out / f"{model}_seed{seed}", args)
            rows.append(row)
            with done_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  mIoU {row['miou']:.2f}, pixel acc {row['pixel_acc']:.2f} ({row['seconds']:.0f} s)", flush=True)
    rows = [r for r in rows if r["model"] in args.models and r["seed"] in args.seeds]
    latency = None
    if not args.no_latency:
        cfg = SegmentationBenchConfig(
            models=list(args.models),
            output_strides=[16],
            runtimes=list(args.runtimes),
            img_size=args.latency_size,
            threads=args.latency_threads,
            unfused=False,
            iters=args.iters,
        )
        latency = run_segmentation_benchmark(cfg)
    result = {
        "config": vars(args),
        "runs": rows,
        "aggregate": aggregate(rows),
        "latency": latency,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
