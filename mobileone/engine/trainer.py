"""The training engine: one loop for every task, read top to bottom in :func:`fit`.

A task (``mobileone.tasks``) supplies data, model, loss, metrics and checkpoint files; the loop
supplies the rest: the locked run directory, resume (bit-exact: schedules are functions of the
step, augmentation of (seed, epoch, index)), LR / weight-decay schedules, EMA, DDP, AMP,
channels_last, gradient accumulation, the stop on a non-finite loss or model, progress, and
``metrics.jsonl`` / ``curves.png`` / ``summary.json``. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.checkpoint import embedded_metadata
from ..core.fusion import reparameterizable_modules, reparameterize_model
from .config import TrainConfig, check_batch_floor
from .data_fit import fit_epochs, fit_image_size
from .distributed import Env, all_reduce_sum, make_loader, setup_env
from .rundir import RunDir, plot_curves
from .schedules import image_size_at, lr_at, make_ema, param_groups, peak_lr, weight_decay_at
from .task import DataError, NonFiniteOutputError, Task, TaskData

log = logging.getLogger("mobileone")
MIN_STEPS = 4  # steps an epoch below which a default batch is lowered to fit the data


class TrainingError(RuntimeError):
    """The run had to stop (a non-finite loss or model); the message says where, why, and what was kept."""


def fit(cfg: TrainConfig, task: Task) -> dict[str, Any]:
    """Run (or resume) one training run of ``task``; returns the summary also written to ``summary.json``."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    cfg.validate()
    task.validate(cfg)
    env = setup_env(cfg)
    try:
        return _fit(cfg, task, env)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        if env.owns_group:
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, task: Task, env: Env) -> dict[str, Any]:
    run = RunDir(cfg.out)
    if env.main:
        run.check_free()  # "in use by another run" rather than "already holds a run" while one is writing it
    if not cfg.resume and (run.has_state() or (run.path / "metrics.jsonl").exists()):
        raise ValueError(
            f"{run.path} already holds a run; continue it with --resume {run.path}, or choose another --out"
        )
    if cfg.resume and not run.has_state():
        raise FileNotFoundError(f"cannot resume: {run.path} has no train_state.pt (no epoch was completed)")
    torch.manual_seed(cfg.seed)
    # Everything that can fail on the user's input fails here, before a file is written.
    data = task.load_data(cfg, env)
    if not cfg.resume:  # a resumed run keeps the size and epochs its config.json holds
        fit_image_size(cfg, task.image_sides(data), task.min_img_size, env.main)
    task.set_eval_transform(data, cfg)
    per_epoch = _steps_per_epoch(cfg, len(data.train), env, task.min_batch)
    if not cfg.resume:
        fit_epochs(cfg, per_epoch, len(data.train), env.main)
    model = task.build_model(cfg, data.classes)
    with run if env.main else contextlib.nullcontext():
        return _loop(cfg, task, env, run, data, model, per_epoch)


def _loop(cfg: TrainConfig, task: Task, env: Env, run: RunDir, data: TaskData, model: nn.Module, per_epoch: int):
    if env.main and not cfg.resume:
        run.write_json("config.json", cfg.to_dict())
        print(f"training config ({run.path / 'config.json'}):\n{cfg.to_dict()}", flush=True)
    if cfg.sync_bn and env.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device)
    if env.channels_last:
        model.to(memory_format=torch.channels_last)
    task.prepare(cfg, env, model)
    ema = make_ema(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=peak_lr(cfg), momentum=cfg.momentum)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.amp_dtype == torch.float16)
    net: nn.Module = model
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    total = cfg.epochs * per_epoch
    warmup = min(round(cfg.warmup_epochs * per_epoch), total // 5)  # a 1-epoch run still gets its cosine
    start_epoch, step, history, best = 0, 0, [], {task.metric: None}
    if cfg.resume:
        state = run.load_state(env.device)
        _check_same_classes(state.get("classes"), data.classes, run.path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step, history, best = state["epoch"], state["step"], state["history"], state["best"]
        torch.set_rng_state(state["rng"].cpu())
        if env.main:
            print(f"resuming {run.path} after epoch {start_epoch} (step {step})", flush=True)

    val_loader = _KeptBatches(make_loader(data.val, cfg, env, task.collate(), train=False))
    loader, loader_key = None, None
    for epoch in range(start_epoch, cfg.epochs):
        size, strength = image_size_at(epoch, cfg.epochs, cfg.img_size, cfg.progressive)
        if (size, strength) != loader_key:  # progressive phases change the transform: new workers
            task.set_train_transform(data, cfg, size, strength)
            loader, loader_key = make_loader(data.train, cfg, env, task.collate(), train=True), (size, strength)
        loader.sampler.set_epoch(epoch)
        net.train()
        report = _Progress(cfg, env, per_epoch, epoch)
        loss_sum, seen, bad, short, t0 = torch.zeros((), device=env.device), 0, 0, 0, time.perf_counter()
        spent = dict.fromkeys(("data", "step", "ema"), 0.0)  # where the epoch's wall time goes
        tick = t0
        for b, (x, y, bad_paths) in enumerate(loader):
            if b >= per_epoch:
                break
            now = time.perf_counter()
            spent["data"], tick = spent["data"] + now - tick, now
            bad += _handle_bad(bad_paths, cfg)
            lr = lr_at(step, total, warmup, peak_lr(cfg), cfg.min_lr)
            wd = weight_decay_at(step, total, cfg.weight_decay, cfg.weight_decay_end)
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = lr, wd if group["decay"] else 0.0
            where, loss = f"step {step + 1} (epoch {epoch + 1}, batch {b + 1})", None
            if _too_small(x, cfg, env, task.min_batch, where):
                short += 1
            elif x is not None:
                loss = _step(net, task, optimizer, scaler, x, y, cfg, env, where, lambda: _last_good(run, history))
                now = time.perf_counter()
                spent["step"], tick = spent["step"] + now - tick, now
                if ema is not None:
                    ema.update_parameters(model)
                    now = time.perf_counter()
                    spent["ema"], tick = spent["ema"] + now - tick, now
                loss_sum += loss * len(x)
                seen += len(x)
            step += 1
            report.update(b + 1, seen, loss)
            tick = time.perf_counter()
        report.close()
        train_seconds = time.perf_counter() - t0
        totals = all_reduce_sum(torch.tensor([float(loss_sum), seen, bad], dtype=torch.float64, device=env.device), env)
        loss_sum, seen, bad = float(totals[0]), int(totals[1]), int(totals[2])
        if seen == 0:
            raise DataError(
                f"no training image of epoch {epoch + 1} could be read ({bad} unreadable); check the "
                "files under the training folder (see the warnings above)"
            )
        for name, weights in (("model", model), ("EMA model", ema.module if ema is not None else None)):
            if weights is not None:
                _check_finite(weights, f"after epoch {epoch + 1}", _last_good(run, history), name)
        t_eval = time.perf_counter()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen}
        try:
            row |= task.evaluate(_fused_copy(model), val_loader, env)
            ema_metrics = task.evaluate(_fused_copy(ema.module), val_loader, env) if ema is not None else {}
        except NonFiniteOutputError as e:
            raise TrainingError(
                f"validation after epoch {epoch + 1}: {e}; the run stopped. "
                f"{_last_good(run, history)} Lower the learning rate (--lr)."
            ) from e
        row |= {f"ema_{k}": ema_metrics.get(k) for k in task.metric_names}
        row |= {
            "lr": lr,
            "weight_decay": wd,
            "images_per_second": seen / train_seconds,
            "img_size": size,
            "augment_strength": strength,
            "bad_images": bad,
            "skipped_steps": short,
            "train_seconds": train_seconds,
            **{f"{k}_seconds": v for k, v in spent.items()},
            "eval_seconds": time.perf_counter() - t_eval,
        }
        history.append(row)
        if env.main:
            best = _save_epoch(run, task, model, ema, optimizer, scaler, cfg, epoch, step, history, best, data, t0)
            print(_epoch_line(task, row, cfg.epochs), flush=True)
    if env.main:
        return _finish(run, task, cfg, history, best, data)
    return {"run_dir": str(run.path), "best": best}


def _steps_per_epoch(cfg: TrainConfig, images: int, env: Env, min_batch: int = 1) -> int:
    """Steps of an epoch; a batch the user did not set is lowered so that small data gets several steps,
    but not below ``min_batch`` images per process and micro-batch (the task's ``min_batch``)."""
    unit = env.world * cfg.accum_steps
    smallest = unit * min_batch
    if cfg.auto_batch and not cfg.resume and images < MIN_STEPS * cfg.batch_size:
        start = max(smallest, images // MIN_STEPS // unit * unit)
        sizes = range(start, smallest - 1, -unit)  # little left out of an epoch
        fitting = next((b for b in sizes if images % b <= 0.1 * images), smallest)
        if fitting < cfg.batch_size:
            warnings.warn(
                f"{images} training images give fewer than {MIN_STEPS} steps an epoch at the default "
                f"batch {cfg.batch_size}; using batch {fitting} (--batch-size sets it)",
                stacklevel=3,
            )
            cfg.batch_size = fitting
    check_batch_floor(cfg, min_batch, env.world)
    per_epoch = images // cfg.batch_size
    if per_epoch == 0:
        raise DataError(f"{images} training images are fewer than one batch of {cfg.batch_size}; lower --batch-size")
    left_out = images - per_epoch * cfg.batch_size
    if left_out > 0.1 * images:
        warnings.warn(
            f"each epoch trains on {per_epoch * cfg.batch_size} of {images} images: the last, incomplete "
            f"batch ({left_out} images) is dropped; a smaller --batch-size wastes less",
            stacklevel=3,
        )
    return min(per_epoch, cfg.steps_per_epoch or per_epoch)


class _KeptBatches:
    """The validation loader, whose batches are kept in memory after the first pass when they fit.

    Evaluation transforms are deterministic, so every epoch (and the EMA's evaluation) would decode
    and resize the same images again; on the small datasets of short runs that is most of the
    evaluation's time. Past ``budget`` bytes the batches stream from the loader as usual.
    """

    def __init__(self, loader: Any, budget: int = 512 << 20) -> None:
        self.loader, self.budget, self.kept = loader, budget, None

    def __iter__(self):
        if self.kept is not None:
            yield from self.kept
            return
        keep, size = [], 0
        for batch in self.loader:
            if keep is not None:
                size += sum(t.numel() * t.element_size() for t in _tensors(batch))
                if size <= self.budget:
                    keep.append(batch)
                else:
                    keep = None
            yield batch
        self.kept = keep


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _step(net, task: Task, optimizer, scaler, x, y, cfg: TrainConfig, env: Env, where: str, last_good):
    """One optimizer step over ``accum_steps`` interleaved micro-batches; stops on a non-finite loss."""
    x, y = _to_device(x, env.device), _to_device(y, env.device)
    if env.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=env.device)
    for j in range(cfg.accum_steps):
        xj, yj = x[j :: cfg.accum_steps], y[j :: cfg.accum_steps]
        if len(xj) == 0:
            continue
        sync = j == cfg.accum_steps - 1 or not hasattr(net, "no_sync")
        with net.no_sync() if not sync else contextlib.nullcontext():
            with env.autocast():
                loss = task.loss(net, xj, yj, cfg)
            finite = all_reduce_sum(torch.isfinite(loss.detach()).logical_not().float(), env)
            if finite.item() > 0:
                raise TrainingError(
                    f"the loss became {loss.item()} at {where}; the run stopped. {last_good()} Lower the learning "
                    "rate (--lr), switch off fp16 (--amp bf16/none), or check the data."
                )
            scaler.scale(loss * len(xj) / len(x)).backward()
        total += loss.detach() * len(xj) / len(x)
    scaler.step(optimizer)
    scaler.update()
    return total


def _too_small(x: torch.Tensor | None, cfg: TrainConfig, env: Env, min_batch: int, where: str) -> bool:
    """Whether a step must be skipped because a micro-batch is below the model's BatchNorm floor (unreadable
    images left fewer than it): decided by every rank together, so that none waits for the others."""
    size = len(x) // cfg.accum_steps if x is not None else 0
    small = x is not None and size < min_batch
    if env.world > 1:  # a rank without images or with too few makes every rank skip the step
        votes = all_reduce_sum(torch.tensor([float(small), float(x is None)], device=env.device), env)
        small = bool(votes[0] > 0) or (x is not None and bool(votes[1] > 0))
    if small and env.main:
        log.warning(
            "skipped %s: a micro-batch of %d image(s) (unreadable images left out) is below the %d that "
            "BatchNorm needs in this model",
            where,
            size,
            min_batch,
        )
    return small


def _last_good(run: RunDir, history: list[dict[str, Any]]) -> str:
    """Which checkpoint survives a stop: the last one written (only ever after a finite epoch), by its own record."""
    last = run.path / "last.safetensors"
    if not (history and last.exists()):
        return "No checkpoint was written (the run stopped in its first epoch)."
    try:
        epoch = (embedded_metadata(last) or {}).get("epoch", history[-1]["epoch"])
    except (OSError, ValueError):
        epoch = history[-1]["epoch"]
    return f"The last good checkpoint is {last} (epoch {epoch})."


def _check_finite(model: nn.Module, when: str, last_good: str, name: str = "model") -> None:
    """A model with a NaN or infinite weight or BN statistic is not a result: stop instead of saving it."""
    bad = [
        n
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        raise TrainingError(
            f"the {name} has NaN or infinite values {when} (in {len(bad)} tensors, e.g. {bad[:3]}); "
            f"the run stopped. {last_good} Lower the learning rate (--lr)."
        )


def _fused_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every branch folded: the same outputs as eval mode, several times fewer kernels."""
    if not reparameterizable_modules(model):
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reparameterize_model(model)


def _check_same_classes(saved: list[str] | None, now: list[str], where: Path) -> None:
    if saved is None or list(saved) == list(now):
        return
    gone, new = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
    change = f"removed or renamed: {gone[:10]}; added: {new[:10]}" if gone or new else "the class order changed"
    raise DataError(
        f"cannot resume {where}: the data's classes differ from the run's ({change}). Labels would "
        "change meaning; restore the data as it was, or start a new run with another --out"
    )


def _handle_bad(paths: list[str], cfg: TrainConfig) -> int:
    if paths and cfg.strict_images:
        raise DataError(f"unreadable image(s) {paths[:5]} (--strict-images); remove or re-save them")
    for p in paths:
        log.warning("skipped unreadable image %s", p)
    return len(paths)


class _Progress:
    """A tqdm bar on an interactive terminal; elsewhere (logs, CI) a line every ``log_every`` steps."""

    def __init__(self, cfg: TrainConfig, env: Env, steps: int, epoch: int) -> None:
        self.bar, self.every, self.t0, self.env = None, 0, time.perf_counter(), env
        self.steps, self.epoch = steps, epoch + 1
        if not (cfg.progress and env.main):
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        else:  # short epochs: the epoch line is enough
            self.every = cfg.log_every or (steps // 10 if steps >= 50 else 0)

    def update(self, done: int, seen: int, loss: torch.Tensor | None) -> None:
        if self.bar is None and not (self.every and done % self.every == 0):
            return
        speed = seen * self.env.world / max(1e-9, time.perf_counter() - self.t0)
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{speed:.0f}")
        elif loss is not None:
            print(
                f"  step {done}/{self.steps} of epoch {self.epoch}  loss {loss.item():.4f}  {speed:.0f} img/s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _epoch_line(task: Task, r: dict[str, Any], epochs: int) -> str:
    bad = f"  skipped images {r['bad_images']}" if r["bad_images"] else ""
    bad += f"  skipped steps {r['skipped_steps']}" if r.get("skipped_steps") else ""
    return (
        f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  {task.epoch_line(r)}  lr {r['lr']:.2e}  "
        f"wd {r['weight_decay']:.1e}  {r['images_per_second']:.0f} img/s  {r['img_size']} px  "
        f"{r['epoch_seconds']:.1f} s{bad}"
    )


def _save_epoch(run: RunDir, task: Task, model, ema, optimizer, scaler, cfg, epoch, step, history, best, data, t0):
    """Checkpoints after every epoch, each written atomically, so a kill at any point leaves either the
    previous epoch's training state or this one's, never a mix; a resume redoes at most one epoch."""
    row, metric, t_save = history[-1], task.metric, time.perf_counter()
    task.save(model, run.path / "last.safetensors", epoch=epoch + 1, weights="model", **{metric: row[metric]})
    use_ema = ema is not None and row[f"ema_{metric}"] > row[metric]
    value = row[f"ema_{metric}"] if use_ema else row[metric]
    if best.get(metric) is None or value > best[metric]:
        prefix = "ema_" if use_ema else ""
        best = {
            **{n: row[prefix + n] for n in task.metric_names},
            "epoch": epoch + 1,
            "weights": "ema" if use_ema else "model",
        }
        task.save(ema.module if use_ema else model, run.path / "best.safetensors", **best)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else {},
        "epoch": epoch + 1,
        "step": step,
        "history": history,
        "best": best,
        "classes": list(data.classes),
        "rng": torch.get_rng_state(),
    }
    run.save_state(state)
    now = time.perf_counter()
    row["save_seconds"], row["epoch_seconds"] = now - t_save, now - t0
    run.write_jsonl("metrics.jsonl", history)
    if row["epoch_seconds"] > 20 or epoch + 1 == cfg.epochs:
        plot_curves(history, run.path / "curves.png", task.metric_names)
    return best


def _finish(run: RunDir, task: Task, cfg: TrainConfig, history, best, data: TaskData) -> dict[str, Any]:
    """Fuse the best checkpoint into ``best_fused``, let the task draw its pictures, write ``summary.json``."""
    best_model = task.load(run.path / "best.safetensors").eval()
    fused = _fused_copy(best_model)
    if fused is not best_model:
        task.save(fused, run.path / "best_fused.safetensors", **best)
    task.finish(run.path, fused, data, cfg)
    summary = {
        "run_dir": str(run.path),
        "task": task.name,
        "best": best,
        "last": history[-1],
        "epochs": cfg.epochs,
        "train_images_per_second": sum(r["images_per_second"] for r in history) / len(history),
        "bad_images": sum(r["bad_images"] for r in history),
    }
    run.write_json("summary.json", summary)
    print(
        f"best {task.metric} {best[task.metric]:.2f} (epoch {best['epoch']}, {best['weights']} weights); "
        f"run: {run.path}"
    )
    return summary
