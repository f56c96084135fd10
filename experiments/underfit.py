"""Why does MobileOne-S0 under-fit short runs? S0 against MobileNetV2 under one plain training loop.

The data: scikit-learn's bundled digits (real 8x8 scans, 10 classes), a fixed stratified split of
1,437 training and 360 validation images, upsampled to 32 px, random shifts as augmentation.
The loop: SGD momentum 0.9, LR per 256 images scaled with the batch, optional linear warm-up,
cosine per step, weight decay 1e-4 (none on norms and biases), label smoothing 0.1. Every row
changes one thing. Prints a markdown table; ``--jsonl FILE`` appends each row as it finishes.

    .venv/bin/python experiments/underfit.py                 # all rows, about 25 min on one core
    .venv/bin/python experiments/underfit.py --only s0,s0-identity --epochs 5
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import torchvision

from mobileone import create_model, init_branches
from mobileone.tasks.classify.data import digits_split

# name: (model, init, {loop overrides}). init: torch (PyTorch defaults), unit-sum (branch BN scales
# 1/sqrt(n)), identity (skip BN scale 1, other branches 0), pass (identity plus a skip BN shift so
# that the ReLU after the sum passes the skip path: mobileone.init_branches' default).
ROWS: dict[str, tuple[str, str, dict]] = {
    "mnv2": ("mnv2", "torch", {}),
    "s0": ("s0", "torch", {}),
    "s0-k1": ("s0", "torch", {"k": 1}),
    "s0-warmup3": ("s0", "torch", {"warmup": 3}),
    "s0-unit-sum": ("s0", "unit-sum", {}),
    "s0-identity": ("s0", "identity", {}),
    "s0-identity-warmup1": ("s0", "identity", {"warmup": 1}),
    "s0-pass": ("s0", "pass", {}),
    "s0-pass-warmup1": ("s0", "pass", {"warmup": 1}),
    "mnv2-warmup1": ("mnv2", "torch", {"warmup": 1}),
    "mnv2-lr4x": ("mnv2", "torch", {"lr": 0.4}),
    "s0-identity-lr4x": ("s0", "identity", {"lr": 0.4}),
    "s0-identity-distill": ("s0", "identity", {"distill": True}),
}


def load(img_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xt, yt, xv, yv = digits_split()

    def prep(x):
        x = torch.from_numpy(x).float().div(255).unsqueeze(1)
        x = F.interpolate(x, size=img_size, mode="bilinear", align_corners=False)
        return ((x - 0.5) / 0.25).expand(-1, 3, -1, -1).contiguous()

    return prep(xt), torch.from_numpy(yt), prep(xv), torch.from_numpy(yv)


def shift(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels per image (the digits' natural augmentation)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def build(kind: str, init: str, k: int | None) -> torch.nn.Module:
    if kind == "mnv2":
        return torchvision.models.mobilenet_v2(num_classes=10)
    model = create_model("s0", num_classes=10, **({"k": k} if k else {}))
    if init == "identity":  # identity-dominant, but the ReLU after the sum still cuts the skip path in half
        return init_branches(model, "identity", skip_shift=0.0)
    return init_branches(model, "identity" if init == "pass" else init)  # "pass": the default, skip through ReLU


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum().item() for i in range(0, len(x), 256))
    return 100.0 * correct / len(x)


def grad_ratio(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative gradient size (|grad| / |w|) of the first conv over that of the last conv, at init."""
    model.train()
    F.cross_entropy(model(x), y).backward()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    rel = [(w.grad.norm() / w.norm()).item() for w in (convs[0], convs[-1])]
    model.zero_grad()
    return rel[0] / rel[1]


def stage_gradients(name: str, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """|grad| / |weight| of the conv weights of each of S0's five stages, on one batch at init.

    The relative gradient is the relative size of one SGD step (times the LR): it says which
    layers move and which stay where they started.
    """
    kind, init, opts = ROWS[name]
    torch.manual_seed(0)
    model = build(kind, init, opts.get("k")).train()
    F.cross_entropy(model(x), y).backward()
    out = []
    for stage in model.stages:
        ws = [p for p in stage.parameters() if p.ndim == 4]
        out.append(math.sqrt(sum((p.grad**2).sum().item() for p in ws) / sum((p**2).sum().item() for p in ws)))
    return out


def run(name: str, data, epochs: int, batch: int, teacher: torch.nn.Module | None) -> dict:
    kind, init, opts = ROWS[name]
    torch.manual_seed(0)
    model = build(kind, init, opts.get("k"))
    xt, yt, xv, yv = data
    ratio = grad_ratio(model, xt[:batch], yt[:batch])
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    lr = opts.get("lr", 0.1) * batch / 256
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0}], lr, 0.9)
    steps_per_epoch = len(xt) // batch
    total, warm = epochs * steps_per_epoch, opts.get("warmup", 0) * steps_per_epoch
    g = torch.Generator().manual_seed(0)
    step, losses, t0 = 0, [], time.time()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        epoch_loss = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * batch : (b + 1) * batch]
            x, y = shift(xt[idx], 3, g), yt[idx]
            s = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for group in opt.param_groups:
                group["lr"] = lr * s
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            if teacher is not None and opts.get("distill"):
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / 2.0, 1)
                kd = F.kl_div(F.log_softmax(logits / 2.0, 1), soft, reduction="batchmean") * 4.0
                loss = 0.5 * loss + 0.5 * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.item() / steps_per_epoch
            step += 1
        losses.append(epoch_loss)
    return {
        "row": name,
        "epoch1_loss": round(losses[0], 3),
        "final_loss": round(losses[-1], 3),
        "train_top1": round(accuracy(model, xt, yt), 1),
        "val_top1": round(accuracy(model, xv, yv), 1),
        "grad_ratio_stem_vs_last": round(ratio, 1),
        "seconds": round(time.time() - t0),
        "model": model,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(ROWS), help="comma-separated rows, from: " + ", ".join(ROWS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jsonl", help="append each finished row to this file")
    p.add_argument("--diagnose", action="store_true", help="only the per-stage relative gradients at init")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.img_size)
    if args.diagnose:
        print("| row | stem | stage 1 | stage 2 | stage 3 | stage 4 | stem / stage 4 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in ("s0", "s0-k1", "s0-unit-sum", "s0-identity", "s0-pass"):
            g = stage_gradients(name, data[0][: args.batch_size], data[1][: args.batch_size])
            print(f"| {name} | " + " | ".join(f"{v:.3g}" for v in g) + f" | {g[0] / g[-1]:.0f} |")
        return
    names = args.only.split(",")
    teacher, results = None, []
    print(
        f"digits, {len(data[0])} train / {len(data[2])} val images at {args.img_size} px, "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.threads} thread(s)"
    )
    for name in names:
        if ROWS[name][2].get("distill") and teacher is None:
            teacher = run("mnv2", data, args.epochs, args.batch_size, None)["model"].eval()
        r = run(name, data, args.epochs, args.batch_size, teacher)
        if name == "mnv2":
            teacher = r["model"].eval()
        r.pop("model")
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({**r, "epochs": args.epochs, "img_size": args.img_size}) + "\n")
    cols = list(results[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
