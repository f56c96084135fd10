"""An epoch of ``mobileone train`` alone and beside one competing CPU-bound process: today's defaults against
the spinning settings the command used first and the passive ones it used next.

- ``defaults``: OpenMP's default wait policy, and the run's compute threads fitted every half second to the
  cores other processes leave (``mobileone.engine.threads``), no loader process on 2 cores;
- ``spinning``: the first settings, OpenMP's default wait policy with a thread per core and one loader process;
- ``passive``: the second, ``OMP_WAIT_POLICY=PASSIVE`` with a thread per core and no loader process.

Each run is a fresh ``mobileone train --epochs 1`` on the built-in digits with the command's own defaults
(S0, 32 px, batch 64); its time is the epoch's ``epoch_seconds`` (training, evaluation, checkpoints) from
``metrics.jsonl``. The competitor is a pure-Python busy loop, one core, started by this script (so it is not
the training process's child). Rounds alternate the settings, so a machine whose load drifts affects them
alike; medians are reported. The target (issue 22): beside the competitor at most 1.5x the time alone, and
alone at most 5 % slower than the spinning settings.

    python experiments/busy_machine.py --rounds 3

Run it on an otherwise quiet machine; the competitor is the only load it means to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORES = str(len(os.sched_getaffinity(0)))
# name: (extra train flags, extra environment); a thread count given turns the fitting of threads off
SETTINGS = {
    "defaults": ([], {}),
    "spinning": (["--workers", "1", "--threads", CORES], {}),
    "passive": (["--workers", "0", "--threads", CORES], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def epoch_row(flags: list[str], env: dict[str, str], competitor: bool) -> dict:
    """One fresh ``mobileone train --epochs 1`` run (beside a busy loop if ``competitor``); its metrics row."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if competitor else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "mobileone", "train", "--epochs", "1", "--out", f"{tmp}/run", "--no-progress"]
            clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            run_env = {**clean, "PYTHONPATH": str(ROOT), **env}
            subprocess.run([*cmd, *flags], env=run_env, check=True, capture_output=True, text=True)
            return json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting, alternated (default 3)")
    parser.add_argument("--json", help="also write the times here")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    args = parser.parse_args()
    chosen = {name: SETTINGS[name] for name in args.settings.split(",")} | {
        n: SETTINGS[n] for n in ("defaults", "spinning")
    }
    subprocess.run(
        [sys.executable, "-c", "from mobileone.tasks.classify.data import builtin_dataset as b; b()"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )  # the digits, written once
    times: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        for name, (flags, env) in chosen.items():
            for competitor in (False, True):
                row = epoch_row(flags, env, competitor)
                times.setdefault((name, competitor), []).append(row["epoch_seconds"])
                where = "beside a busy process" if competitor else "alone"
                print(
                    f"round {r + 1}: {name:9s} {where:22s} {row['epoch_seconds']:6.1f} s "
                    f"(fewest compute threads {row['fewest_threads']})",
                    flush=True,
                )
    median = {k: statistics.median(v) for k, v in times.items()}
    print("\n| settings | alone (s) | beside a busy process (s) | ratio |")
    print("|---|---:|---:|---:|")
    for name in chosen:
        alone, busy = median[name, False], median[name, True]
        print(f"| {name} | {alone:.1f} | {busy:.1f} | {busy / alone:.2f}x |")
    change = median["defaults", False] / median["spinning", False] - 1
    print(
        f"\ndefaults alone against the spinning settings alone: {100 * change:+.1f} % "
        f"(target <= +5 %); beside a busy process: {median['defaults', True] / median['defaults', False]:.2f}x "
        "its time alone (target <= 1.5x)"
    )
    if args.json:
        rows = [{"settings": n, "competitor": c, "seconds": v} for (n, c), v in times.items()]
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
