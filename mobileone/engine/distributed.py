"""Where a run executes: device, ranks (torchrun, NCCL or gloo), AMP, and the data loaders.

Augmentation must not depend on the number of processes or data workers: the training sampler
hands each dataset lookup its ``(epoch, index)`` key, so a sample's random crop is a pure function
of (seed, epoch, index) even inside persistent worker processes, which never see a ``set_epoch``
call on their copy of the dataset.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info

T = TypeVar("T")
log = logging.getLogger("mobileone")

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass
class Env:
    """Where this process runs: device, rank and world size, AMP dtype, memory format."""

    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> torch.autocast:
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled)


def pick_device(device: str = "auto") -> torch.device:
    """``cuda`` when asked for or (``auto``) when there is one, else the CPU."""
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so that bf16 autocast speeds training up
    rather than emulating it (several times slower)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def eval_loader(ds: Dataset, batch_size: int, workers: int, collate: Callable, device: torch.device) -> DataLoader:
    """The loader of an evaluation outside training (``mobileone eval``): in order, pinned memory on a GPU."""
    return DataLoader(ds, batch_size, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda")


def setup_env(cfg: TrainConfig) -> Env:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); pick device, AMP and threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = pick_device(cfg.device).type == "cuda"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    torch.set_num_threads(cpu_plan(cfg.workers, cfg.threads, world, use_cuda)[1])
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif use_cuda:
        torch.backends.cudnn.benchmark = True
    rank, owns = 0, False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if use_cuda else "none")
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    cl = cfg.channels_last if cfg.channels_last is not None else use_cuda
    return Env(device, rank, world, dtype, cl, owns)


def process_cores(world: int = 1) -> int:
    """The cores this process may use: its CPU affinity shared among the ranks on this machine."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world))


def cpu_plan(workers: int | None, threads: int | None, world: int = 1, gpu: bool = False) -> tuple[int, int]:
    """Data-loading processes and compute threads of one rank, chosen together: never more than its cores.

    On a CPU the compute threads do the work: a loader process per 4 cores (at most 4), the rest
    threads (2 cores: no loader process, 2 threads). On a GPU the loaders feed it: up to 4, one
    core left for the training process. What the user sets is kept; the other fills the rest.
    """
    cores = process_cores(world)
    if workers is None:
        if threads is not None:
            workers = cores - threads - (1 if gpu else 0)
        else:
            workers = cores - 1 if gpu else cores // 4
        workers = max(0, min(4, workers))
    if threads is None:
        threads = max(1, cores - workers)
    return workers, threads


def default_workers(world: int = 1, gpu: bool = False) -> int:
    """Loader processes per rank that fit the machine beside the compute threads (see :func:`cpu_plan`)."""
    return cpu_plan(None, None, world, gpu)[0]


class EpochSampler(DistributedSampler):
    """DistributedSampler that yields ``(epoch, index)`` keys, so the epoch reaches every worker process."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation, a pure function of its key (see :class:`EpochSampler`)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def seeded(seed: int, epoch: int, index: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with torch's RNG seeded from (run seed, epoch, index): a sample's augmentation is a pure
    function of its key (see :class:`EpochSampler`), whatever the worker, the process count or a resume. In a
    data worker its own RNG is seeded; in the main process the caller's RNG state is kept.

    Only the CPU generator, which the transforms draw from: ``torch.manual_seed`` would also queue a seed
    for every accelerator torch knows, formatting a stack trace each time (every sample), and
    in a process that uses CUDA would reseed its generator outside what ``fork_rng`` restores."""
    torch_seed = sample_seed(seed, epoch, index)
    if get_worker_info() is not None:  # a worker's RNG is its own
        torch.default_generator.manual_seed(torch_seed)
        return fn(*args)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(torch_seed)
        return fn(*args)


SMALL_VAL = 2000  # validation images per rank below which they are read in the training process


def make_loader(ds: Dataset, cfg: TrainConfig, env: Env, collate: Callable, train: bool) -> DataLoader:
    """The training loader (shuffled per epoch, the same batches for any world size) or this rank's val shard."""
    per_rank = cfg.batch_size // env.world
    workers = cpu_plan(cfg.workers, cfg.threads, env.world, env.device.type == "cuda")[0]
    if not train and len(ds) // env.world < SMALL_VAL:
        workers = 0  # read once and kept (trainer._KeptBatches): starting processes would cost more
    common: dict[str, Any] = {
        "num_workers": workers,
        "worker_init_fn": ignore_termination if workers else None,
        "pin_memory": env.device.type == "cuda",
        "collate_fn": collate,
        "persistent_workers": workers > 0,
    }
    if train:
        sampler = EpochSampler(ds, env.world, env.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        return DataLoader(ds, per_rank, sampler=sampler, drop_last=True, **common)
    shard = Subset(ds, range(env.rank, len(ds), env.world))
    return DataLoader(shard, max(1, per_rank // cfg.accum_steps) * 2, shuffle=False, **common)


def too_small_to_step(x: torch.Tensor | None, cfg: TrainConfig, env: Env, min_batch: int, where: str) -> bool:
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


def ignore_termination(worker_id: int) -> None:
    """Data workers leave SIGTERM to the training process, which stops the run cleanly and then ends them.

    A cluster's time limit (or ``timeout``) signals the whole process group; a worker that died of it
    first would turn the clean stop into a "DataLoader worker exited unexpectedly" error. A batch the
    stopping process no longer takes breaks the connection the worker hands its tensors' file
    descriptors through: that thread's error is the stop, not a fault, and is not printed.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    report = sys.excepthook  # multiprocessing's resource-sharer thread reports its errors through it

    def quiet_when_abandoned(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        if "(_serve)" not in threading.current_thread().name:
            report(kind, error, trace)

    sys.excepthook = quiet_when_abandoned


def all_reduce_sum(values: torch.Tensor, env: Env) -> torch.Tensor:
    """Sum a tensor over the ranks (a no-op in one process)."""
    if env.world > 1:
        dist.all_reduce(values)
    return values


class KeptBatches:
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


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
