"""Training speed of the default detector (tal on MobileOne-S0, k = 1) against YOLOv8n, in one process.

Issue 23 asks the default S0 detector to train at least as many images/s at 320 px as Ultralytics
YOLOv8n on the same data and machine. This script times both on the same augmented batches of the
dense scenes (``mobileone.tasks.detect.scenes``), in alternating rounds so that both see the same
machine load, and splits where the time goes:

- ``step``: per training step of 16 images at 320 px, forward, assignment + loss, backward,
  optimizer (AdamW, what the default and Ultralytics' ``optimizer=auto`` train these runs with) and
  EMA, for tal_s0 as ``mobileone train --task detect`` builds and runs it (k = 1, its memory format,
  its autocast: bf16 on a CPU with native bf16; fused AdamW), the same in float32 (``--amp none``),
  for the MobileNetV3 peer under the same head (``--variant mnv3``) and for YOLOv8n
  (``DetectionModel("yolov8n.yaml")`` and its own ``v8DetectionLoss``, Ultralytics' ``ModelEMA``,
  float32 as Ultralytics trains on a CPU, and under the same bf16 autocast as ours for comparison);
  the median of ``--steps`` rounds after a warm-up;
- ``backbone``: forward + backward of S0's strides 8 / 16 / 32 alone (fused, train-time k = 1, the
  same with the fast path's "fold" formulation used before "direct", k = 1 without scale and skip
  branches), contiguous and channels-last;
- ``data``: seconds per augmented training image, ours (``DenseTrainData``: mosaic, scale jitter,
  flip, colour) and Ultralytics' (``YOLODataset`` with its default hyper-parameters: mosaic, random
  perspective, HSV, flip), in this process (0 loader processes, as ``mobileone train`` on 2 cores);
- ``eval``: one validation as the engine runs it (a fused copy of the model and of its EMA, each
  over the validation images) and its share of a default run's wall time (``--eval-every``'s
  default: at most 10 validations a run) against validating every epoch.

Ultralytics (AGPL-3.0) is imported by this script only, never by the package::

    pip install --no-deps ultralytics ultralytics-thop opencv-python-headless polars
    python experiments/detect_speed.py --threads 2 --steps 5 --out runs/detect_speed
    python experiments/detect_speed.py --parts step --steps 3        # the step alone

On a shared machine read the ratios, not the seconds: each row of a round runs back to back. Both
models run with OpenMP's default wait policy and a fixed thread count, as ``mobileone train`` runs on
cores it has to itself (``OMP_WAIT_POLICY=PASSIVE`` in the environment times the passive policy).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobileone import create_model, reparameterize_model  # noqa: E402
from mobileone.core import fast_train  # noqa: E402
from mobileone.core.config import VARIANTS  # noqa: E402
from mobileone.core.model import MobileOne  # noqa: E402
from mobileone.engine.config import TrainConfig, resolve_config  # noqa: E402
from mobileone.engine.distributed import Env, cpu_plan, setup_env  # noqa: E402
from mobileone.engine.schedules import make_ema, make_optimizer  # noqa: E402
from mobileone.engine.trainer import validates  # noqa: E402
from mobileone.tasks.detect.augment import DenseTrainData, letterbox_transform  # noqa: E402
from mobileone.tasks.detect.data import DetectionDataset, collate_detection, load_splits  # noqa: E402
from mobileone.tasks.detect.evaluate import detection_metrics, predict_loader  # noqa: E402
from mobileone.tasks.detect.scenes import dense_scenes  # noqa: E402
from mobileone.tasks.detect.task import DETECT_MIN_STEPS, DetectTask  # noqa: E402

BATCH, SIZE = 16, 320
PARTS = ("step", "backbone", "data", "eval")


def median(values: list[float]) -> float:
    return statistics.median(values)


def our_detector(
    scenes: Path, threads: int, variant: str = "s0", amp: str | None = None
) -> tuple[torch.nn.Module, Env, TrainConfig]:
    """tal_s0 (or the ``mnv3`` peer) as ``mobileone train --task detect --data SCENES`` builds it (``amp``: as
    ``--amp``, None for the default), with its run environment (memory format, autocast) and config."""
    task = DetectTask()
    cfg = resolve_config(task, data=str(scenes), threads=threads, variant=variant, amp=amp)
    env = setup_env(cfg)
    train, _ = load_splits(scenes)
    task.train_records = train.records
    det = task.build_model(cfg, train.classes).train()
    if env.channels_last:
        det = det.to(memory_format=torch.channels_last)
    return det, env, cfg


def batches(scenes: Path, count: int) -> list[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]:
    """``count`` augmented training batches of the dense scenes (our pipeline), made ahead of the timed steps."""
    train, _ = load_splits(scenes)
    ds = DenseTrainData(DetectionDataset(train, train=True), SIZE)
    out = []
    for b in range(count):
        x, targets, _ = collate_detection([ds[(0, b * BATCH + i)] for i in range(BATCH)])
        out.append((x, targets))
    return out


def yolo_batch(x: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The same images and boxes in Ultralytics' batch layout (normalized cx, cy, w, h; image index per box)."""
    idx = torch.cat([torch.full((len(t["boxes"]),), float(i)) for i, t in enumerate(targets)])
    boxes = torch.cat([t["boxes"] for t in targets]) / SIZE
    cxcywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    labels = torch.cat([t["labels"] for t in targets]).float()[:, None]
    return {"img": x, "batch_idx": idx, "cls": labels, "bboxes": cxcywh}


def yolo_model() -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
    """YOLOv8n from its yaml, its EMA, and AdamW as Ultralytics builds it (per-tensor, not fused)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG
    from ultralytics.utils.torch_utils import ModelEMA

    torch.manual_seed(0)
    m = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
    m.args = get_cfg(DEFAULT_CFG)
    return m.train(), ModelEMA(m), torch.optim.AdamW(m.parameters(), lr=0.001)


def timed_step(
    det: torch.nn.Module, ema: Any, opt: torch.optim.Optimizer, env: Env, x: torch.Tensor, targets: list[dict[str, Any]]
) -> list[float]:
    """One training step of our detector as the engine runs it (its autocast and memory format); the seconds of
    its forward, assignment + loss, backward, optimizer, EMA."""
    x = x.contiguous(memory_format=torch.channels_last) if env.channels_last else x
    marks = [time.perf_counter()]
    with env.autocast():
        codes, logits = det.head_outputs(x)
    marks.append(time.perf_counter())
    with env.autocast():
        losses = det.compute_loss(codes, logits, targets, tuple(x.shape[-2:]))
    marks.append(time.perf_counter())
    opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    marks.append(time.perf_counter())
    opt.step()
    marks.append(time.perf_counter())
    ema.update_parameters(det)
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def time_steps(scenes: Path, steps: int, yolo: bool, threads: int) -> dict[str, dict[str, float]]:
    """Seconds per step by part for tal_s0 by default (bf16 autocast on a CPU with native bf16) and in float32,
    the MobileNetV3 peer under the same head and command, and YOLOv8n as Ultralytics trains it on a CPU
    (float32) and, where ours runs bf16, under the same bf16 autocast; alternating, on the same batches."""
    data = batches(scenes, steps + 1)
    ours = {}
    det, env, cfg = our_detector(scenes, threads)
    low = env.amp_dtype is not None
    ours[f"tal_s0 (k=1), the default{' (bf16 autocast)' if low else ''}"] = det, env, cfg
    if low:
        ours["tal_s0 (k=1), float32 (--amp none)"] = our_detector(scenes, threads, amp="none")
    ours["tal_mnv3 (the peer, same command)"] = our_detector(scenes, threads, variant="mnv3")
    ours = {
        label: (det, make_ema(det, 0.9995), make_optimizer(det, cfg), env) for label, (det, env, cfg) in ours.items()
    }
    parts = ("forward", "assignment_and_loss", "backward", "optimizer", "ema")
    times: dict[str, dict[str, list[float]]] = {label: {p: [] for p in parts} for label in ours}
    yolos = {}
    if yolo:
        yolos["yolov8n"] = (*yolo_model(), False)
        if low:
            yolos["yolov8n, bf16 autocast (Ultralytics trains float32 on a CPU)"] = (*yolo_model(), True)
        for label in yolos:
            times[label] = {p: [] for p in ("forward_and_loss", "backward", "optimizer", "ema")}
    for r, (x, targets) in enumerate(data):
        for label, (det, ema, opt, env) in ours.items():
            seconds = timed_step(det, ema, opt, env, x, targets)
            if r:
                for part, t in zip(parts, seconds):
                    times[label][part].append(t)
        batch = yolo_batch(x, targets)
        for label, (ym, yema, yopt, autocast) in yolos.items():
            marks = [time.perf_counter()]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = ym.loss(batch)
            marks.append(time.perf_counter())
            yopt.zero_grad(set_to_none=True)
            loss.sum().backward()
            marks.append(time.perf_counter())
            yopt.step()
            marks.append(time.perf_counter())
            yema.update(ym)
            marks.append(time.perf_counter())
            if r:
                for part, a, b in zip(times[label], marks, marks[1:]):
                    times[label][part].append(b - a)
    return {label: {p: median(v) for p, v in parts_.items()} for label, parts_ in times.items()}


def time_backbones(steps: int) -> dict[str, float]:
    """Forward + backward of S0's strides 8 / 16 / 32 (the mean of each map), seconds per batch of 16.

    "k=1, fold" is the train-time k = 1 backbone with the formulation used before "direct" (the
    depthwise layers' conv run once for its statistics, once folded), for the before / after ratio.
    """
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    k1 = VARIANTS["mobileone_s0"].replace(k=1)
    forms = {
        "fused": (None, False),
        "k=1": (k1, False),
        "k=1, fold (before direct)": (k1, True),
        "k=1, no scale / skip": (k1.replace(stem_k=1, scale_branch=False, skip_branch=False), False),
    }
    runs = {}
    for label, (arch, fold) in forms.items():
        for cl in (False, True):
            if arch is None:
                bb = create_model("s0", features_only=True, out_indices=(2, 3, 4), inference_mode=True)
            else:
                bb = MobileOne(arch, features_only=True, out_indices=(2, 3, 4))
            bb.train()
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            if cl:
                bb = bb.to(memory_format=torch.channels_last)

            def step(bb=bb, xx=xx, fold=fold) -> None:
                with mock.patch.object(fast_train, "_direct_applies", return_value=False) if fold else nullcontext():
                    sum(o.mean() for o in bb(xx)).backward()

            runs[f"{label}{', channels_last' if cl else ''}"] = step
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(steps + 1):
        for label, step in runs.items():
            t0 = time.perf_counter()
            step()
            if r:
                times[label].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}


def time_data(scenes: Path, images: int, yolo: bool) -> dict[str, float]:
    """Seconds per augmented training image (0 loader processes), ours and Ultralytics', each after one pass over
    the images as in a run after its first epoch (what each keeps in memory: our decoded images, its buffer)."""
    train, _ = load_splits(scenes)
    ds = DenseTrainData(DetectionDataset(train, train=True), SIZE)
    for i in range(len(train.records)):  # warm-up: file cache, first-call costs, kept images
        ds[(1, i)]
    t0 = time.perf_counter()
    for i in range(images):
        ds[(0, i)]
    out = {"ours (DenseTrainData)": (time.perf_counter() - t0) / images}
    if yolo:
        yds = yolo_dataset(scenes)
        for i in range(len(yds)):
            yds[i]
        t0 = time.perf_counter()
        for i in range(images):
            yds[i % len(yds)]
        out["yolov8n (YOLODataset, its defaults)"] = (time.perf_counter() - t0) / images
    return out


def yolo_dataset(scenes: Path) -> Any:
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DEFAULT_CFG

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from detect_dense import yolo_layout

    yaml = yolo_layout(scenes, scenes.parent / "yolo_layout")
    data = check_det_dataset(str(yaml))
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": SIZE, "cache": False})
    return build_yolo_dataset(cfg, data["train"], BATCH, data, mode="train", stride=32)


def time_eval(scenes: Path, step_seconds: float, threads: int) -> dict[str, float]:
    """One validation as the engine runs it (fused copies of the model and of its EMA), and its share of the
    wall time of a default run (10 epochs) and of a 40-epoch run, validated as the engine's default does."""
    det, _, _ = our_detector(scenes, threads)
    train, val = load_splits(scenes)
    ds = DetectionDataset(val)
    ds.transform = letterbox_transform(SIZE)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, collate_fn=collate_detection)
    t0 = time.perf_counter()
    for _ in range(2):  # the model and its EMA
        fused = reparameterize_model(copy.deepcopy(det).eval())
        results, seen, _ = predict_loader(fused, loader, torch.device("cpu"))
        detection_metrics(ds.records, ds.classes, results, seen)
    seconds = time.perf_counter() - t0
    out: dict[str, float] = {"validation (model + EMA), s": seconds, "validation images": len(ds)}
    per_pass = len(train.records) // BATCH
    for epochs in (10, 40):
        steps = epochs * per_pass * math.ceil(DETECT_MIN_STEPS / (epochs * per_pass))  # the task's step floor
        validations = sum(validates(TrainConfig(epochs=epochs), DetectTask(), e) for e in range(epochs))
        train_s = steps * step_seconds
        out[f"{epochs} epochs: steps, validations"] = f"{steps}, {validations} (every epoch: {epochs})"
        out[f"{epochs} epochs: validation share of wall time"] = (
            validations * seconds / (train_s + validations * seconds)
        )
        out[f"{epochs} epochs: ... if every epoch"] = epochs * seconds / (train_s + epochs * seconds)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = []
    if "step" in results:
        lines += ["Seconds per training step (batch 16, 320 px), median of the rounds:", ""]
        for label, parts in results["step"].items():
            total = sum(parts.values())
            cells = ", ".join(f"{p} {v:.3f}" for p, v in parts.items())
            lines.append(f"- {label}: {total:.3f} s/step, {BATCH / total:.1f} images/s ({cells})")
        totals = {k: sum(v.values()) for k, v in results["step"].items()}
        for a, ta in totals.items():
            for y in (y for y in totals if y.startswith("yolov8n") and not a.startswith("yolov8n")):
                lines.append(f"- ratio: {a} trains {totals[y] / ta:.2f}x the images/s of {y} (model step)")
        peer = [t for label, t in totals.items() if label.startswith("tal_mnv3")]
        for a, ta in totals.items():
            if peer and "the default" in a:
                lines.append(f"- ratio: {a} trains {peer[0] / ta:.2f}x the images/s of the peer (model step)")
    if "backbone" in results:
        lines += ["", "S0 backbone alone, forward + backward, s per batch of 16:", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in results["backbone"].items()]
    if "data" in results:
        lines += ["", "Data, seconds per augmented training image (in process):", ""]
        lines += [f"- {k}: {v * 1000:.1f} ms" for k, v in results["data"].items()]
    if "epoch" in results:
        lines += ["", "Per-step wall time with data (0 loader processes):", ""]
        lines += [f"- {k}: {v:.3f} s/step, {BATCH / v:.1f} images/s" for k, v in results["epoch"].items()]
        for a, ta in results["epoch"].items():
            for y in (y for y in results["epoch"] if y.startswith("yolov8n") and not a.startswith("yolov8n")):
                tb = results["epoch"][y]
                lines.append(f"- ratio: {a} trains {tb / ta:.2f}x the images/s of {y} (data + step + EMA)")
    if "eval" in results:
        lines += ["", "Validation:", ""]
        lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in results["eval"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--steps", type=int, default=5, help="timed rounds after a warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=48, help="images timed by the data part")
    p.add_argument("--scenes", type=Path, help="dense scenes folder (default: written once to the cache)")
    p.add_argument("--no-yolo", action="store_true", help="leave YOLOv8n out (Ultralytics not installed)")
    p.add_argument("--out", type=Path, help="folder for results.json / results.md")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parts = args.parts.split(",")
    scenes = args.scenes or dense_scenes()
    yolo = not args.no_yolo
    results: dict[str, Any] = {
        "threads": args.threads,
        "loader_processes_of_mobileone_train": cpu_plan(None, None)[0],
        "load_average_before": os.getloadavg()[0],
    }
    if "step" in parts:
        results["step"] = time_steps(scenes, args.steps, yolo, args.threads)
        print(markdown({"step": results["step"]}), flush=True)
    if "backbone" in parts:
        results["backbone"] = time_backbones(args.steps)
    if "data" in parts:
        results["data"] = time_data(scenes, args.images, yolo)
        if "step" in results:
            (d_ours, *d_yolo) = results["data"].values()
            results["epoch"] = {
                label: sum(step.values()) + BATCH * (d_yolo[0] if label.startswith("yolov8n") else d_ours)
                for label, step in results["step"].items()
                if not label.startswith("yolov8n") or d_yolo
            }
    if "eval" in parts:
        default = [v for k, v in results.get("step", {}).items() if "the default" in k]
        step_s = sum(default[0].values()) if default else float("nan")
        results["eval"] = time_eval(scenes, step_s, args.threads)
    results["load_average_after"] = os.getloadavg()[0]
    text = (
        markdown(results)
        + f"\nload average before / after: {results['load_average_before']:.2f} / "
        + (f"{results['load_average_after']:.2f}\n")
    )
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
