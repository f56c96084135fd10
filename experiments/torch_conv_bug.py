"""Map the CPU convolution bug behind issue 14: which strided convs corrupt memory or compute wrong gradients.

    python experiments/torch_conv_bug.py                       # the default grid, this CPU and AVX2
    python experiments/torch_conv_bug.py --isa native --threads 1 --iters 50 --only-bad
    python experiments/torch_conv_bug.py --python /tmp/torchnew/bin/python   # another torch build

Every case runs forward + backward of one ``F.conv2d`` in float32 ``--iters`` times and compares
the output, the input gradient and the weight gradient with a float64 run (relative error 1e-4).
Each (ISA, thread count) group runs in its own subprocess, because the bug corrupts the heap and
can abort the process ("free(): invalid next size", exit 134); after a crash the group resumes
with the next case, and every case that crashed or went wrong is then re-run alone in a fresh
process, so the verdict does not come from damage an earlier case left behind.

``--isa AVX2`` caps oneDNN's kernels at AVX2 (``ONEDNN_MAX_CPU_ISA``), which is what an AVX2-only
CPU runs; ``native`` is this CPU's best. Each case also runs the library's workaround
(``mobileone.core.branch_stats.conv2d``) so the table shows whether it avoids the bug.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import subprocess
import sys
from pathlib import Path

# (kernel, stride, groups; 0 = depthwise) and (batch, in channels, size, out channels)
GEOMETRIES = [(1, 2, 1), (1, 1, 1), (3, 2, 1), (1, 2, 2), (1, 2, 0), (3, 2, 0)]
SHAPES = [(3, 2, 6, 4), (1, 2, 6, 4), (3, 2, 7, 4), (3, 2, 8, 4), (3, 3, 32, 48), (2, 16, 14, 32), (8, 64, 16, 64)]
TOLERANCE = 1e-4


def cases() -> list[dict]:
    out = []
    for (ks, stride, groups), (n, cin, size, cout), fmt in itertools.product(GEOMETRIES, SHAPES, ("cl", "cf")):
        if groups == cin or cin % max(groups, 1) or cout % max(groups, 1):  # depthwise has its own rows
            continue
        groups = cin if groups == 0 else groups
        cout = cin if groups == cin else cout
        out.append(
            {"n": n, "cin": cin, "size": size, "cout": cout, "ks": ks, "stride": stride, "groups": groups, "fmt": fmt}
        )
    return out


def describe(case: dict) -> str:
    g = "dw" if case["groups"] == case["cin"] > 1 else f"g{case['groups']}"
    return (
        f"{case['ks']}x{case['ks']} s{case['stride']} {g} ({case['n']},{case['cin']},{case['size']},{case['size']})"
        f"->{case['cout']} {'channels_last' if case['fmt'] == 'cl' else 'contiguous'}"
    )


def check(case: dict, iters: int, workaround: bool) -> str:
    """``"ok"`` or the tensors that came out wrong in any of ``iters`` runs (e.g. ``"wrong: grad_w 0.21"``)."""
    import torch
    import torch.nn.functional as F

    conv = F.conv2d
    if workaround:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from mobileone.core.branch_stats import conv2d as conv
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case["n"], case["cin"], case["size"], case["size"], generator=gen)
    w = torch.randn(case["cout"], case["cin"] // case["groups"], case["ks"], case["ks"], generator=gen)
    args = (case["stride"], case["ks"] // 2, 1, case["groups"])
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    yd = F.conv2d(xd, wd, None, *args)
    gy = torch.randn(yd.shape, generator=gen, dtype=torch.float64)
    yd.backward(gy)
    fmt = torch.channels_last if case["fmt"] == "cl" else torch.contiguous_format
    worst: dict[str, float] = {}
    for _ in range(iters):
        xi = x.clone(memory_format=fmt).requires_grad_()
        wi = w.clone().requires_grad_()
        y = conv(xi, wi, None, *args)
        y.backward(gy.float().contiguous(memory_format=fmt))
        for name, a, b in (("output", y, yd), ("grad_x", xi.grad, xd.grad), ("grad_w", wi.grad, wd.grad)):
            err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            if err > TOLERANCE or err != err:
                worst[name] = max(worst.get(name, 0.0), err)
    return "ok" if not worst else "wrong: " + ", ".join(f"{k} {v:.2g}" for k, v in sorted(worst.items()))


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads[0])
    for i, variant in json.loads(args.worker):
        result = check(cases()[i], args.iters, workaround=variant == "workaround")
        print(json.dumps([i, variant, result]), flush=True)


def run_group(
    python: str, isa: str, threads: int, todo: list[tuple[int, str]], iters: int, timeout: float = 60
) -> dict:
    """``{(case, variant): result}`` from worker processes; the unit during which a worker died is a crash."""
    env = dict(os.environ)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        env.pop(name, None)
        if isa != "native":
            env[name] = isa
    results: dict[tuple[int, str], str] = {}
    while todo:
        cmd = [python, __file__, "--worker", json.dumps(todo), "--threads", str(threads), "--iters", str(iters)]
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            hung = False
            while True:  # a corrupted heap can also deadlock the process: give each unit ``timeout`` seconds
                ready, _, _ = select.select([proc.stdout], [], [], timeout)
                if not ready:
                    hung = True
                    proc.kill()
                    break
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("["):
                    i, variant, result = json.loads(line)
                    results[i, variant] = result
            err = proc.stderr.read()
            code = proc.wait()
        todo = [unit for unit in todo if tuple(unit) not in results]
        if todo and (code == 0 or "Traceback" in err):
            raise RuntimeError(f"worker failed without crashing, at {todo[0]}: {err[-2000:]}")
        if todo:
            last = (err.strip().splitlines() or [""])[-1]
            results[tuple(todo[0])] = f"hang ({timeout:.0f} s)" if hung else f"crash: exit {code} {last[:60]}"
            todo = todo[1:]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", nargs="+", default=["native", "AVX2"], help="oneDNN ISA caps (native = no cap)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--iters", type=int, default=20, help="forward + backward runs per case")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the torch build to test")
    parser.add_argument("--only-bad", action="store_true", help="print only cases that crashed or went wrong")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    probe = 'import re, torch; print(torch.__version__, re.search("MKL-DNN (v[0-9.]+)", torch.__config__.show())[1])'
    version = subprocess.run([args.python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    print(f"torch {version}; float32 forward + backward, {args.iters} runs per case, tolerance {TOLERANCE}")
    print("| ISA | threads | conv | plain F.conv2d | alone | workaround |")
    print("|---|---:|---|---|---|---|")
    everything = list(range(len(cases())))
    for isa, threads in itertools.product(args.isa, args.threads):
        units = [(i, variant) for i in everything for variant in ("workaround", "plain")]
        results = run_group(args.python, isa, threads, units, args.iters)
        for i in everything:
            plain, fixed, alone = results[i, "plain"], results[i, "workaround"], ""
            if plain != "ok":  # confirm in a fresh process
                alone = run_group(args.python, isa, threads, [(i, "plain")], args.iters)[i, "plain"]
            if args.only_bad and plain == fixed == "ok":
                continue
            print(f"| {isa} | {threads} | {describe(cases()[i])} | {plain} | {alone} | {fixed} |", flush=True)


if __name__ == "__main__":
    main()
