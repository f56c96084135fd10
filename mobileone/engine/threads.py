"""Compute threads fitted, while a run trains, to the cores other processes leave it.

OpenMP's default wait policy lets a thread spin for a while after each parallel region: the fastest
choice on cores a process has to itself, and the slowest beside another busy process, whose thread
the spinning ones push off the cores both need (an S0 epoch 3x slower beside one competing process
was measured). A passive wait policy avoids that but costs a third of the speed alone on small
kernels, and it can only be chosen before torch starts. So training keeps OpenMP's default and
watches instead: every half second it reads how much of its cores' time went to other processes
(``/proc/stat`` less this process and its data workers) and runs as many compute threads as the
others leave free; when they stop, it takes the cores back. A single thread never waits on another,
so the wait policy no longer matters while cores are shared.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("mobileone")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds(cpus: set[int], stat: Path = Path("/proc/stat")) -> float:
    """CPU seconds the given cores spent running anything (user, nice, system, interrupts) since boot."""
    total = 0
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
            total += user + nice + system + irq + softirq
    return total / TICK


def _stat_ticks(pid: int | str, fields: slice) -> int:
    """The sum of some of ``/proc/PID/stat``'s CPU-time fields (counted after the command name)."""
    return sum(int(f) for f in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[fields])


def own_seconds(pid: int | str = "self") -> float:
    """CPU seconds of this process, its ended children and its live ones (data workers), since they began."""
    ticks = _stat_ticks(pid, slice(11, 15))  # utime, stime, cutime, cstime
    for children in Path(f"/proc/{pid}").glob("task/*/children"):
        for child in children.read_text().split():
            try:
                ticks += _stat_ticks(child, slice(11, 13))  # utime, stime
            except (OSError, IndexError):  # it ended between the two reads
                pass
    return ticks / TICK


def _readings(cpus: set[int]) -> tuple[float, float]:
    return busy_seconds(cpus), own_seconds()


class ThreadFitter:
    """Call :meth:`poll` every step; it sets ``torch.set_num_threads`` to the cores others leave free.

    ``most`` is the thread count while the cores are free; another process counts once it takes at
    least ``share`` of a core over a ``every``-second window (brief system work does not).
    """

    def __init__(
        self,
        most: int,
        cpus: set[int],
        every: float = 0.5,
        share: float = 0.6,
        read: Callable[[], tuple[float, float]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.most, self.every, self.share, self.clock = most, every, share, clock
        self.read = read or (lambda: _readings(cpus))
        self.threads = most
        self.others = 0.0
        self.last = (clock(), *self.read())

    @classmethod
    def for_run(cls, threads: int, fixed: bool, world: int, device: str = "cpu") -> ThreadFitter | None:
        """The fitter of a training run, or None where it has nothing to fit: threads the user set, several
        ranks on this machine (each other's load is expected), an accelerator, one core, no ``/proc/stat``."""
        if fixed or world > 1 or device != "cpu" or threads < 2 or not Path("/proc/stat").exists():
            return None
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        try:
            return cls(threads, cpus)
        except (OSError, ValueError, IndexError):  # a /proc this reader does not understand: keep the threads
            return None

    def poll(self) -> int:
        """After each ``every`` seconds: the load of other processes on our cores, and the threads it leaves."""
        now = self.clock()
        if now - self.last[0] < self.every:
            return self.threads
        busy, own = self.read()
        t0, busy0, own0 = self.last
        self.last = (now, busy, own)
        self.others = max(0.0, (busy - busy0) - (own - own0)) / (now - t0)
        threads = max(1, min(self.most, self.most - int(self.others + 1 - self.share)))
        if threads != self.threads:
            log.info(
                "other processes use %.1f of this run's cores: %d compute thread(s) of %d",
                self.others,
                threads,
                self.most,
            )
            torch.set_num_threads(threads)
            self.threads = threads
        return threads
