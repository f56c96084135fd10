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
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.checkpoint import embedded_metadata
from ..core.fusion import reparameterizable_modules, reparameterize_model
from .config import TrainConfig, check_batch_floor
from .data_fit import fit_epochs, fit_image_size
from .distributed import Env, KeptBatches, all_reduce_sum, make_loader, setup_env, to_device, too_small_to_step
from .progress import Progress, epoch_line
from .rundir import RunDir, plot_curves
from .schedules import image_size_at, lr_at, make_ema, make_optimizer, peak_lr, weight_decay_at
from .task import DataError, NonFiniteOutputError, Task, TaskData
from .threads import ThreadFitter

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
    if not cfg.resume:
        run.check_new()
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


@dataclass
class _State:
    """What the loop carries from epoch to epoch (and a resume restores)."""

    model: nn.Module
    net: nn.Module  # the model as the step runs it: DDP-wrapped and / or compiled
    ema: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    per_epoch: int
    total: int
    warmup: int
    start_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    threads: ThreadFitter | None = None  # compute threads fitted to the cores other processes leave


def _loop(cfg: TrainConfig, task: Task, env: Env, run: RunDir, data: TaskData, model: nn.Module, per_epoch: int):
    """The epochs: train one, evaluate it, save it (rank 0); then fuse the best and summarise."""
    if env.main and not cfg.resume:
        run.write_json("config.json", cfg.to_dict())
        print(f"training config ({run.path / 'config.json'}):\n{cfg.to_dict()}", flush=True)
    s = _setup(cfg, task, env, model, per_epoch)
    if cfg.resume:
        _restore(s, run, data, env)
    elif env.main:
        s.best = {task.metric: None}
    val_loader = KeptBatches(make_loader(data.val, cfg, env, task.collate(), train=False))
    loader, loader_key = None, None
    epoch = s.start_epoch
    while epoch < cfg.epochs:
        if cfg.time is not None and epoch > 0:
            _fit_epochs_to_time(s, cfg, env, epoch)
        size, strength = image_size_at(epoch, cfg.epochs, cfg.img_size, cfg.progressive)
        if (size, strength) != loader_key:  # progressive phases change the transform: new workers
            task.set_train_transform(data, cfg, size, strength)
            loader, loader_key = make_loader(data.train, cfg, env, task.collate(), train=True), (size, strength)
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        row = train_one_epoch(s, cfg, task, env, loader, epoch, lambda: _last_good(run, s.history))
        if validates(cfg, task, epoch):
            if s.threads is not None:
                s.threads.poll()
            row |= evaluate(s, task, env, val_loader, epoch, lambda: _last_good(run, s.history))
        else:
            _check_weights(s, epoch, lambda: _last_good(run, s.history))
        row |= {"img_size": size, "augment_strength": strength}
        s.history.append(row)
        if env.main:
            s.best = _save_epoch(run, task, s, cfg, epoch, data, t0)
            print(epoch_line(task, row, cfg.epochs), flush=True)
        row.setdefault("epoch_seconds", time.perf_counter() - t0)  # other ranks time their epoch too
        epoch += 1
    if env.main:
        return _finish(run, task, cfg, s.history, s.best, data)
    return {"run_dir": str(run.path), "best": s.best}


def _setup(cfg: TrainConfig, task: Task, env: Env, model: nn.Module, per_epoch: int) -> _State:
    """The model on its device, the task's extras, EMA, optimizer, scaler, DDP / compile wrappers."""
    if cfg.sync_bn and env.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device)
    if env.channels_last:
        model.to(memory_format=torch.channels_last)
    task.prepare(cfg, env, model)
    ema = make_ema(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.amp_dtype == torch.float16)
    net: nn.Module = model
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    total = cfg.epochs * per_epoch
    warmup = min(round(cfg.warmup_epochs * per_epoch), total // 5)  # a 1-epoch run still gets its cosine
    state = _State(model, net, ema, optimizer, scaler, per_epoch, total, warmup, best={task.metric: None})
    # A fixed thread count where the user set it, and for --deterministic: a reduction split over another number
    # of threads rounds differently, and such a run promises the same weights however busy the machine is.
    fixed = cfg.threads is not None or cfg.deterministic
    state.threads = ThreadFitter.for_run(torch.get_num_threads(), fixed, env.world, env.device.type)
    return state


def _fit_epochs_to_time(s: _State, cfg: TrainConfig, env: Env, epoch: int) -> None:
    """``--time``: the epochs that fit the budget at the pace of the epochs so far (training, validation,
    checkpoints; the first left out once there are others, it fills caches), at least this one more.

    A function of the run's history alone, so a resumed run decides as the uninterrupted one did; the
    main process decides for every rank."""
    seconds = [r["epoch_seconds"] for r in s.history]
    pace = sum(seconds[1:]) / (len(seconds) - 1) if len(seconds) > 1 else seconds[0]
    left = cfg.time * 60 - sum(seconds)
    epochs = epoch + max(1, math.floor(left / pace + 0.5))
    epochs = int(all_reduce_sum(torch.tensor(float(epochs if env.main else 0), device=env.device), env))
    if epochs != cfg.epochs and env.main:
        print(f"--time {cfg.time:g} min: {epochs} epochs fit at {pace:.1f} s an epoch", flush=True)
    cfg.epochs, s.total = epochs, epochs * s.per_epoch


def _restore(s: _State, run: RunDir, data: TaskData, env: Env) -> None:
    """Continue from the run's saved training state (the last completed epoch)."""
    state = run.load_state(env.device)
    _check_same_classes(state.get("classes"), data.classes, run.path)
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scaler.load_state_dict(state["scaler"])
    if s.ema is not None:
        s.ema.load_state_dict(state["ema"])
    s.start_epoch, s.step, s.history, s.best = state["epoch"], state["step"], state["history"], state["best"]
    torch.set_rng_state(state["rng"].cpu())
    if env.main:
        print(f"resuming {run.path} after epoch {s.start_epoch} (step {s.step})", flush=True)


def train_one_epoch(s: _State, cfg: TrainConfig, task: Task, env: Env, loader, epoch: int, last_good) -> dict:
    """One pass over ``loader`` (at most ``per_epoch`` steps): the epoch's loss, speed and where its time went."""
    s.net.train()
    report = Progress(cfg, env, s.per_epoch, epoch)
    loss_sum, seen, bad, short, t0 = torch.zeros((), device=env.device), 0, 0, 0, time.perf_counter()
    spent = dict.fromkeys(("data", "step", "ema"), 0.0)
    tick = t0
    fewest = torch.get_num_threads()

    def lap(part: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        spent[part], tick = spent[part] + now - tick, now

    for b, (x, y, bad_paths) in enumerate(loader):
        if b >= s.per_epoch:
            break
        lap("data")
        bad += _handle_bad(bad_paths, cfg)
        lr, wd = _set_schedule(s, cfg)
        where, loss = f"step {s.step + 1} (epoch {epoch + 1}, batch {b + 1})", None
        if too_small_to_step(x, cfg, env, task.min_batch, where):
            short += 1
        elif x is not None:
            loss = _step(s.net, task, s.optimizer, s.scaler, x, y, cfg, env, where, last_good)
            lap("step")
            if s.ema is not None:
                s.ema.update_parameters(s.model)
                lap("ema")
            loss_sum += loss * len(x)
            seen += len(x)
        s.step += 1
        report.update(b + 1, seen, loss)
        if s.threads is not None:
            fewest = min(fewest, s.threads.poll())
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
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / seen,
        "lr": lr,
        "weight_decay": wd,
        "images_per_second": seen / train_seconds,
        "bad_images": bad,
        "skipped_steps": short,
        "train_seconds": train_seconds,
        "fewest_threads": fewest,
        **{f"{k}_seconds": v for k, v in spent.items()},
    }


def _set_schedule(s: _State, cfg: TrainConfig) -> tuple[float, float]:
    """This step's learning rate and weight decay, set on the optimizer's groups (no decay where it is off)."""
    lr = lr_at(s.step, s.total, s.warmup, peak_lr(cfg), cfg.min_lr)
    wd = weight_decay_at(s.step, s.total, cfg.weight_decay, cfg.weight_decay_end)
    for group in s.optimizer.param_groups:
        group["lr"], group["weight_decay"] = lr, wd if group["decay"] else 0.0
    return lr, wd


def validates(cfg: TrainConfig, task: Task, epoch: int) -> bool:
    """Whether epoch ``epoch`` (from 0) is validated: every ``--eval-every``-th and the last; without it every
    epoch, or every ``ceil(epochs / task.max_validations)``-th where validation costs much of a short run."""
    every = cfg.eval_every or (-(-cfg.epochs // task.max_validations) if task.max_validations else 1)
    return (epoch + 1) % every == 0 or epoch + 1 == cfg.epochs


def _check_weights(s: _State, epoch: int, last_good) -> None:
    for name, weights in (("model", s.model), ("EMA model", s.ema.module if s.ema is not None else None)):
        if weights is not None:
            _check_finite(weights, f"after epoch {epoch + 1}", last_good(), name)


def evaluate(s: _State, task: Task, env: Env, val_loader, epoch: int, last_good) -> dict[str, Any]:
    """The epoch's weights (and the EMA's), checked finite, fused and scored on the validation set."""
    _check_weights(s, epoch, last_good)
    t0 = time.perf_counter()
    try:
        row = task.evaluate(_fused_copy(s.model), val_loader, env)
        ema_metrics = task.evaluate(_fused_copy(s.ema.module), val_loader, env) if s.ema is not None else {}
    except NonFiniteOutputError as e:
        raise TrainingError(
            f"validation after epoch {epoch + 1}: {e}; the run stopped. {last_good()} Lower the learning rate (--lr)."
        ) from e
    row |= {f"ema_{k}": ema_metrics.get(k) for k in task.metric_names}
    return row | {"eval_seconds": time.perf_counter() - t0}


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


def _step(net, task: Task, optimizer, scaler, x, y, cfg: TrainConfig, env: Env, where: str, last_good):
    """One optimizer step over ``accum_steps`` interleaved micro-batches; stops on a non-finite loss."""
    x, y = to_device(x, env.device), to_device(y, env.device)
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


def _save_epoch(run: RunDir, task: Task, s: _State, cfg: TrainConfig, epoch: int, data: TaskData, t0: float):
    """Checkpoints after every epoch, each written atomically, so a kill at any point leaves either the
    previous epoch's training state or this one's, never a mix; a resume redoes at most one epoch.

    ``best`` and its deployable ``best_fused`` are written together whenever the metric improves."""
    row, metric, t_save = s.history[-1], task.metric, time.perf_counter()
    task.save(s.model, run.path / "last.safetensors", epoch=epoch + 1, weights="model", **{metric: row.get(metric)})
    validated = row.get(metric) is not None
    use_ema = validated and s.ema is not None and row[f"ema_{metric}"] > row[metric]
    value = row[f"ema_{metric}"] if use_ema else row.get(metric)
    best = s.best
    if validated and (best.get(metric) is None or value > best[metric]):
        prefix = "ema_" if use_ema else ""
        best = {
            **{n: row[prefix + n] for n in task.metric_names},
            "epoch": epoch + 1,
            "weights": "ema" if use_ema else "model",
        }
        weights = s.ema.module if use_ema else s.model
        task.save(weights, run.path / "best.safetensors", **best)
        _save_fused(run, task, weights, best)
    now = time.perf_counter()  # before the training state's write, so that the state's history has it (--time)
    row["save_seconds"], row["epoch_seconds"] = now - t_save, now - t0
    state = {
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scaler": s.scaler.state_dict(),
        "ema": s.ema.state_dict() if s.ema is not None else {},
        "epoch": epoch + 1,
        "step": s.step,
        "history": s.history,
        "best": best,
        "classes": list(data.classes),
        "rng": torch.get_rng_state(),
    }
    run.save_state(state)
    run.write_jsonl("metrics.jsonl", s.history)
    if row["epoch_seconds"] > 20 or epoch + 1 == cfg.epochs:
        plot_curves(s.history, run.path / "curves.png", task.metric_names)
    return best


def _save_fused(run: RunDir, task: Task, model: nn.Module, best: dict[str, Any]) -> nn.Module:
    """``best_fused``: the best weights folded for deployment (what eval, predict and export take)."""
    was_training = model.training
    fused = _fused_copy(model.eval())
    model.train(was_training)
    task.save(fused, run.path / "best_fused.safetensors", **best)
    return fused


def _finish(run: RunDir, task: Task, cfg: TrainConfig, history, best, data: TaskData) -> dict[str, Any]:
    """Let the task draw its pictures with the fused best model, write ``summary.json``.

    ``best_fused`` is written again from ``best`` when a kill came between the two files.
    """
    fused_path = run.path / "best_fused.safetensors"
    stale = not fused_path.exists() or (embedded_metadata(fused_path) or {}).get("epoch") != best["epoch"]
    if stale:
        fused = _save_fused(run, task, task.load(run.path / "best.safetensors"), best)
    else:
        fused = task.load(fused_path)
    task.finish(run.path, fused.eval(), data, cfg)
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
