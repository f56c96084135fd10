"""Where an epoch's wall time goes: `mobileone train` against the plain loop a user would write.

Side by side, on the same data and the same machine, each in its own fresh process:

- ``train``: ``mobileone train`` with its defaults (fast path, EMA, fused evaluation of the model
  and of the EMA, checkpoints every epoch) for ``--steps`` steps and one evaluation; its
  breakdown (data wait, step, EMA, evaluation, checkpoint I/O) comes from ``metrics.jsonl``;
- ``plain-<model>``: a timm / torchvision-style loop over the same images: the model as its
  library gives it (S0 per branch, as Apple's and timm's code run it; torchvision's
  MobileNetV2), SGD with momentum, random-resized crop + flip, and an evaluation of the model
  as it is after the epoch.

Then the slowest part of ``train`` is profiled (``torch.profiler`` for the step or the
evaluation, ``cProfile`` for data loading) and the top entries are printed. Works on the
built-in digits (the default) and on any ImageFolder (``--data DIR`` with ``train/`` and
``val/``). Run it on a quiet machine: timings of concurrent jobs are meaningless.

    python experiments/epoch.py --img-size 32 --batch-size 128 --steps 40 --workers 1 --threads 2
    python experiments/epoch.py --img-size 224 --batch-size 32 --steps 10 --workers 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("data", "step", "ema", "eval", "save")


def run_train(args: argparse.Namespace, data: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "mobileone",
        "train",
        "--data",
        str(data),
        "--variant",
        "s0",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--steps-per-epoch",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--img-size",
        str(args.img_size),
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"mobileone train failed:\n{done.stderr[-3000:]}")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "name": "train (mobileone, S0 fast + EMA)",
        "process_seconds": wall,
        **{p: row[f"{p}_seconds"] for p in PARTS},
        "epoch": row["epoch_seconds"],
        "images": args.steps * args.batch_size,
    }


PLAIN = r"""
import json, sys, time, torch, torchvision
from torch.utils.data import DataLoader
from torchvision import datasets, transforms as T
import mobileone
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"]); torch.manual_seed(0)
norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
train_t = T.Compose([T.RandomResizedCrop(cfg["img_size"]), T.RandomHorizontalFlip(), T.ToTensor(), norm])
val_t = T.Compose([T.Resize(int(cfg["img_size"] / 0.875)), T.CenterCrop(cfg["img_size"]), T.ToTensor(), norm])
def rgb(path):
    from PIL import Image
    with Image.open(path) as img:
        return img.convert("RGB")
train = datasets.ImageFolder(cfg["data"] + "/train", train_t, loader=rgb)
val = datasets.ImageFolder(cfg["data"] + "/val", val_t, loader=rgb)
n = len(train.classes)
if cfg["model"] == "s0":  # per branch, as Apple's and timm's code train it
    model = mobileone.create_model("s0", num_classes=n); mobileone.set_fast_train(model, False)
else:
    model = torchvision.models.get_model(cfg["model"], weights=None, num_classes=n)
opt = torch.optim.SGD(model.parameters(), lr=0.1 * cfg["batch_size"] / 256, momentum=0.9, weight_decay=1e-4)
kw = {"num_workers": cfg["workers"], "persistent_workers": cfg["workers"] > 0}
loader = DataLoader(train, cfg["batch_size"], shuffle=True, drop_last=True, **kw)
spent = {"data": 0.0, "step": 0.0, "ema": 0.0, "eval": 0.0, "save": 0.0}
t0 = tick = time.perf_counter()
model.train()
for i, (x, y) in enumerate(loader):
    if i >= cfg["steps"]:
        break
    now = time.perf_counter(); spent["data"] += now - tick; tick = now
    loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    now = time.perf_counter(); spent["step"] += now - tick; tick = now
model.eval()
with torch.no_grad():
    for x, y in DataLoader(val, cfg["batch_size"] * 2, **kw):
        model(x)
spent["eval"] = time.perf_counter() - tick
print(json.dumps({**spent, "epoch": time.perf_counter() - t0}))
"""


def run_plain(args: argparse.Namespace, data: Path, model: str) -> dict:
    cfg = {
        "data": str(data),
        "model": model,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "workers": args.workers,
        "threads": args.threads,
    }
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(cfg)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"plain loop ({model}) failed:\n{done.stderr[-3000:]}")
    spent = json.loads(done.stdout.strip().splitlines()[-1])
    label = "S0 per branch" if model == "s0" else model
    return {"name": f"plain loop ({label})", "process_seconds": wall, **spent, "images": args.steps * args.batch_size}


def profile_slowest(args: argparse.Namespace, data: Path, part: str) -> str:
    """A profile of the slowest part of `mobileone train`'s epoch, run in this process."""
    import torch

    from mobileone.engine.distributed import Env
    from mobileone.tasks import get_task, resolve_config

    torch.set_num_threads(args.threads)
    task = get_task("classify")
    cfg = resolve_config(
        data=str(data),
        variant="s0",
        img_size=args.img_size,
        batch_size=args.batch_size,
        workers=0,
        out=tempfile.mkdtemp(),
    )
    env = Env(torch.device("cpu"))
    bundle = task.load_data(cfg, env)
    task.set_train_transform(bundle, cfg, cfg.img_size, 1.0)
    collate = task.collate()
    batch = collate([bundle.train[(0, i)] for i in range(cfg.batch_size)])
    if part == "data":
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for i in range(cfg.batch_size, 3 * cfg.batch_size):
            bundle.train[(0, i % len(bundle.train))]
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(15)
        return text.getvalue()
    model = task.build_model(cfg, bundle.classes)
    from torch.profiler import ProfilerActivity, profile

    if part == "eval":
        from mobileone import reparameterize_model

        fused = reparameterize_model(model.eval())
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            fused(batch[0])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                loss = task.loss(model, batch[0], batch[1], cfg)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main() -> None:
    parser = argparse.ArgumentParser(description="Wall time of an epoch: mobileone train vs a plain loop")
    parser.add_argument("--data", help="ImageFolder root with train/ and val/ (default: the built-in digits)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="training steps of the timed epoch")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plain", default="s0,mobilenet_v2", help="models of the plain loop")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    if args.data:
        data = Path(args.data)
    else:
        from mobileone.tasks.classify.data import builtin_dataset

        data = builtin_dataset()
    with tempfile.TemporaryDirectory(prefix="mobileone_epoch_") as tmp:
        rows = [run_train(args, data, Path(tmp) / "run")]
    rows += [run_plain(args, data, m) for m in args.plain.split(",") if m]
    print(
        f"\n{args.steps} steps x batch {args.batch_size} at {args.img_size} px, {args.workers} loader worker(s), "
        f"{args.threads} threads, then one evaluation of {data}/val; seconds:\n"
    )
    print("| run | data wait | step | EMA | evaluation | checkpoints | epoch | process | train img/s | eval share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        img_s = r["images"] / (r["data"] + r["step"] + r["ema"])
        print(
            f"| {r['name']} | {r['data']:.1f} | {r['step']:.1f} | {r['ema']:.1f} | {r['eval']:.1f} | "
            f"{r['save']:.1f} | {r['epoch']:.1f} | {r['process_seconds']:.1f} | {img_s:.0f} | "
            f"{100 * r['eval'] / r['epoch']:.0f} % |"
        )
    slowest = max(("data", "step", "eval"), key=lambda p: rows[0][p])
    if not args.no_profile:
        print(f"\nprofile of the slowest part of `mobileone train`'s epoch ({slowest}):\n")
        print(profile_slowest(args, data, slowest))


if __name__ == "__main__":
    main()
