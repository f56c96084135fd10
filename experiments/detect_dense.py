"""Dense scenes: the default detector (tal on MobileOne-S0) against its MobileNetV3 peer and YOLOv8n from scratch.

The question of issue 23, on data a user would bring: a few hundred 320 px tiles, dozens of touching
objects of 16-64 px each, validated on other sites (``mobileone.tasks.detect.scenes``,
semi-synthetic: coins cut out of a real photograph on real textured ground). For each seed:

- ``mobileone train --task detect --data SCENES --variant s0 --seed S`` and the same with
  ``--variant mnv3`` (one process each, the defaults otherwise);
- Ultralytics YOLOv8n from scratch (``yolov8n.yaml``, no weights) by its own trainer at 320 px,
  batch 16, for as many epochs as the tal runs saw images (so the same budget in images), one
  data-loading worker as ours; its best weights are scored by OUR evaluator (COCO mAP by
  faster-coco-eval on the val images letterboxed to 320, as ours), and its own mAP is recorded too.

Reported: mAP@0.5 and mAP per run, mean and sample standard deviation per detector, wall time,
training images/s at 320 px (the training loop alone, validation excluded, median over epochs,
measured the same way for all three in this one script) and the split of a training step of the
default detector (data, forward, assignment + loss, backward, optimizer, EMA; ``--split``).

Ultralytics is AGPL-3.0: it is imported here only, never by the package. Install it for the
benchmark alone, leaving torch alone::

    pip install --no-deps ultralytics ultralytics-thop opencv-python-headless polars

    .venv/bin/python experiments/detect_dense.py --out runs/detect_dense            # 3 seeds, ~2 h on 2 cores
    .venv/bin/python experiments/detect_dense.py --seeds 0 --detectors s0 --no-yolo    # one run
    .venv/bin/python experiments/detect_dense.py --split --seeds --no-yolo             # the step split only
    .venv/bin/python experiments/detect_dense.py --seeds 0 --detectors --yolo-epochs 47  # YOLOv8n alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling train_runs.py, also when loaded by path
from train_runs import train_subprocess  # noqa: E402


def train_ours(variant: str, seed: int, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``mobileone train --task detect`` run in its own process; its best mAP, time and images/s.

    A run already finished in ``out`` (its ``summary.json``, of this variant and seed) is read, not trained
    again, so that seeds can be added to a table one session at a time; its wall time is then the sum of its
    epochs' (``reused`` in the row says so)."""
    options = {"--data": data, "--variant": variant, "--seed": seed, "--workers": 1, "--threads": args.threads}
    reused = (out / "summary.json").exists()
    if not reused:
        cmd, summary, seconds = train_subprocess("detect", out, options, args.extra)
    cfg = json.loads((out / "config.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if reused:
        if (cfg["variant"], cfg["seed"]) != (variant, seed):
            raise SystemExit(f"{out} holds a run of {cfg['variant']} seed {cfg['seed']}; give another --out")
        print(f"reusing the finished run {out} (its config.json has the options it ran with)", flush=True)
        keys = ("variant", "seed", "epochs", "batch_size", "img_size")
        cmd = ["mobileone", "train", "--task", "detect", "--out", str(out)]
        cmd += [f"--{k.replace('_', '-')} {cfg[k]}" for k in keys]
        summary = json.loads((out / "summary.json").read_text())
        seconds = sum(r["epoch_seconds"] for r in rows)
    seen = sum(r["images_per_second"] * r["train_seconds"] for r in rows)
    return {
        "detector": f"{cfg['head']}_{variant}",
        "seed": seed,
        "map": summary["best"]["map"],
        "map_50": summary["best"]["map_50"],
        "seconds": seconds,
        "images_seen": round(seen),
        "train_images_per_second": statistics.median(r["images_per_second"] for r in rows),
        "split": {k: sum(r.get(f"{k}_seconds", 0.0) for r in rows) for k in ("data", "step", "ema", "eval")},
        "command": " ".join(cmd[1:]),
        "reused": reused,
    }


def yolo_layout(scenes: Path, out: Path) -> Path:
    """The COCO scenes as Ultralytics' YOLO layout (links to the same JPEGs, one label file each); its data.yaml."""
    for split in ("train", "val"):
        coco = json.loads((scenes / split / "_annotations.coco.json").read_text())
        images, labels = out / "images" / split, out / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        boxes: dict[int, list[str]] = {}
        sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
        for a in coco["annotations"]:
            w, h = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            line = f"{a['category_id'] - 1} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
            boxes.setdefault(a["image_id"], []).append(line)
        for img in coco["images"]:
            link = images / img["file_name"]
            if not link.exists():
                link.symlink_to((scenes / split / img["file_name"]).resolve())
            (labels / Path(img["file_name"]).with_suffix(".txt")).write_text("\n".join(boxes.get(img["id"], [])))
    names = [c["name"] for c in coco["categories"]]
    yaml = out / "data.yaml"
    yaml.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames: {json.dumps(names)}\n")
    return yaml


def train_yolo(seed: int, scenes: Path, epochs: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """YOLOv8n from scratch by Ultralytics' trainer; its best weights scored by our evaluator."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch
    from ultralytics import YOLO, settings

    settings.update({"sync": False})
    torch.set_num_threads(args.threads)
    out = out.resolve()  # Ultralytics puts a relative project under its own runs/ folder
    yaml = yolo_layout(scenes, out / "data")
    model = YOLO("yolov8n.yaml")
    epoch_times: list[float] = []
    marks: dict[str, float] = {}
    model.add_callback("on_train_epoch_start", lambda _t: marks.__setitem__("t0", time.perf_counter()))
    model.add_callback("on_train_epoch_end", lambda _t: epoch_times.append(time.perf_counter() - marks["t0"]))
    t0 = time.perf_counter()
    options = {"imgsz": 320, "batch": 16, "workers": 1, "device": "cpu", "seed": seed, "deterministic": False}
    options |= {"pretrained": False, "plots": False, "amp": False, "exist_ok": True, "verbose": False}
    model.train(data=str(yaml), epochs=epochs, project=str(out), name="yolo", **options)
    seconds = time.perf_counter() - t0
    train_images = len(list((out / "data" / "images" / "train").iterdir()))
    ours = score_yolo(out / "yolo" / "weights" / "best.pt", scenes)
    return {
        "detector": "yolov8n",
        "seed": seed,
        **ours,
        "seconds": seconds,
        "images_seen": epochs * train_images,
        "train_images_per_second": statistics.median(train_images / t for t in epoch_times),
        "command": f"YOLO('yolov8n.yaml').train(imgsz=320, batch=16, epochs={epochs}, workers=1, seed={seed})",
    }


def score_yolo(weights: Path, scenes: Path) -> dict[str, float]:
    """mAP of Ultralytics weights by our evaluator: letterboxed to 320 as ours, COCO protocol, same ground truth."""
    from ultralytics import YOLO

    from mobileone.tasks.detect.data import load_splits
    from mobileone.tasks.detect.evaluate import detection_metrics

    _, val = load_splits(scenes)
    model = YOLO(str(weights))
    results = []
    for i, r in enumerate(val.records):
        pred = model.predict(r.path, imgsz=320, conf=0.001, iou=0.7, max_det=300, verbose=False, device="cpu")[0]
        b = pred.boxes
        results.append((i, b.xyxy.float(), b.conf.float(), b.cls.long()))
    m = detection_metrics(val.records, val.classes, results, list(range(len(val.records))))
    return {"map": m["map"], "map_50": m["map_50"]}


SPLITS = {
    "tal_s0 (k=1, the default)": ("tal_s0", 1),
    "tal_s0 (k=4, the paper's S0)": ("tal_s0", 4),
    "tal_mnv3": ("tal_mnv3", None),
}


def step_split(data: Path, threads: int, steps: int = 4) -> dict[str, dict[str, float]]:
    """Seconds per training step, by part, on real augmented batches of 16 at 320 px, for each of ``SPLITS``."""
    return {label: _split(data, threads, name, k, steps) for label, (name, k) in SPLITS.items()}


def _split(data: Path, threads: int, name: str, k: int | None, steps: int) -> dict[str, float]:
    import torch
    from detect_speed import timed_step  # the step as the speed benchmark times it

    from mobileone.core.config import VARIANTS
    from mobileone.engine.schedules import make_ema
    from mobileone.tasks.detect.augment import DenseTrainData
    from mobileone.tasks.detect.data import DetectionDataset, collate_detection, load_splits
    from mobileone.tasks.detect.model import create_detector

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    train, _ = load_splits(data)
    ds = DenseTrainData(DetectionDataset(train, train=True), 320)
    arch = VARIANTS["mobileone_s0"].replace(k=k).to_dict() if k else None
    det = create_detector(name, len(train.classes), 320, init="identity", arch=arch).train()
    ema = make_ema(det, 0.9995)
    opt = torch.optim.AdamW(det.parameters(), lr=0.001)
    parts = dict.fromkeys(("data", "forward", "assignment_and_loss", "backward", "optimizer", "ema"), 0.0)
    for step in range(steps + 1):
        t0 = time.perf_counter()
        x, targets, _ = collate_detection([ds[(0, step * 16 + i)] for i in range(16)])
        seconds = [time.perf_counter() - t0, *timed_step(det, ema, opt, x, targets)]
        if step:  # the first step warms up
            for name, t in zip(parts, seconds):
                parts[name] += t / steps
    return parts


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["detector"] for r in rows):
        runs = [r for r in rows if r["detector"] == name]
        agg: dict[str, Any] = {"detector": name, "runs": len(runs)}
        for key in ("map_50", "map", "seconds", "train_images_per_second"):
            values = [r[key] for r in runs]
            agg[key] = statistics.mean(values)
            agg[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(agg)
    return out


def markdown(summary: list[dict[str, Any]], rows: list[dict[str, Any]], split: dict[str, float] | None) -> str:
    lines = [
        "| detector | runs | mAP@0.5 | mAP | train images/s at 320 px | wall time per run (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['detector']} | {s['runs']} | {s['map_50']:.2f} +- {s['map_50_std']:.2f} | "
            f"{s['map']:.2f} +- {s['map_std']:.2f} | {s['train_images_per_second']:.1f} | {s['seconds']:.0f} |"
        )
    lines += ["", "Per run (mAP@0.5 / mAP, images seen):"]
    lines += [
        f"- {r['detector']} seed {r['seed']}: {r['map_50']:.2f} / {r['map']:.2f}, {r['images_seen']}"
        + (" (a finished run, read)" if r.get("reused") else "")
        for r in rows
    ]
    if split:
        parts = list(next(iter(split.values())))
        lines += ["", "Seconds per training step (batch 16, 320 px), by part:", ""]
        lines += ["| detector | " + " | ".join(parts) + " | total | images/s |", "|---|" + "---:|" * (len(parts) + 2)]
        for label, times in split.items():
            total = sum(times.values())
            cells = " | ".join(f"{times[p]:.2f}" for p in parts)
            lines.append(f"| {label} | {cells} | {total:.2f} | {16 / total:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/detect_dense"))
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--detectors", nargs="*", default=["s0", "mnv3"], help="variants (none: YOLO alone)")
    p.add_argument("--no-yolo", action="store_true", help="leave YOLOv8n out (Ultralytics not installed)")
    p.add_argument("--yolo-epochs", type=int, help="default: as many images as the first tal_s0 run saw")
    p.add_argument("--split", action="store_true", help="also time the parts of a training step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", type=int, default=212, help="training scenes")
    p.add_argument("--val", type=int, default=40, help="validation scenes (other sites)")
    p.add_argument("extra", nargs="*", help="more `mobileone train` options, after --")
    args = p.parse_args()
    from mobileone.tasks.detect.scenes import dense_scenes

    args.out.mkdir(parents=True, exist_ok=True)
    scenes = dense_scenes(args.out / "scenes", train=args.train, val=args.val)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for variant in args.detectors:
            rows.append(train_ours(variant, seed, scenes, args.out / f"{variant}-seed{seed}", args))
            print(json.dumps(rows[-1]), flush=True)
        if not args.no_yolo:
            seen = next((r["images_seen"] for r in rows if r["detector"].endswith("_s0")), None)
            epochs = args.yolo_epochs or (round(seen / args.train) if seen else 40)
            rows.append(train_yolo(seed, scenes, epochs, args.out / f"yolov8n-seed{seed}", args))
            print(json.dumps(rows[-1]), flush=True)
    split = step_split(scenes, args.threads) if args.split else None
    summary = summarize(rows) if rows else []
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "runs": rows, "split": split}, indent=1))
    (args.out / "results.md").write_text(markdown(summary, rows, split))
    print(markdown(summary, rows, split))


if __name__ == "__main__":
    main()
