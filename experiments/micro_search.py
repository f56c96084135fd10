"""Reconstruct MobileOne-mu0/mu1/mu2 (paper Table 13) from their published sizes.

The paper gives only params and MACs of the micro variants (0.57 M / 68 M, 0.98 M / 139 M,
1.3 M / 214 M, fused, 224 px, 1000 classes); their widths and depths were never published.
The search keeps the family's rules and S0's shape, the smallest published variant:

- S0's depth (2, 8, 10, 1 blocks) and k = 4 (over-parameterization helps small models most);
- stage widths multiples of 8 that never shrink, from width multipliers in steps of 1/16
  (``int(base * w)`` with base (64, 128, 256, 512), stem ``min(64, int(64 * w0))``, Apple's rule);

and lists every config whose fused params and MACs are each within 2 % of the paper's, best
(smallest sum of the two relative errors) first. Candidates are counted in closed form, then
the chosen ones are built and counted by running the model (``count_params`` / ``count_macs``),
which must agree. The chosen configs are ``VARIANTS["mobileone_mu0".."mu2"]``.

    python experiments/micro_search.py            # the table in docs/architecture.md
"""

from __future__ import annotations

import argparse
import itertools

from mobileone import PAPER, VARIANTS, MobileOneConfig, count_macs, count_params, create_model
from mobileone.core.config import BASE_WIDTHS

DEPTH = (2, 8, 10, 1)
TARGETS = ("mobileone_mu0", "mobileone_mu1", "mobileone_mu2")


def fused_size(widths: tuple[int, ...], stem: int, blocks: tuple[int, ...], classes: int = 1000) -> tuple[int, int]:
    """Params and MACs of the fused net at 224 px, in closed form (checked against the model below)."""
    params, macs, cin, res = 27 * stem + stem, 112 * 112 * 27 * stem, stem, 112
    for width, n in zip(widths, blocks, strict=True):
        res //= 2
        for b in range(n):
            c = cin if b == 0 else width
            params += 10 * c + c * width + width  # depthwise 3x3 + bias, pointwise 1x1 + bias
            macs += res * res * (9 * c + c * width)
        cin = width
    return params + cin * classes + classes, macs + cin * classes


def search(tolerance: float = 0.02) -> dict[str, list[dict]]:
    steps = [i / 16 for i in range(4, 40)]
    found: dict[str, list[dict]] = {name: [] for name in TARGETS}
    for mult in itertools.product(steps, repeat=4):
        if list(mult) != sorted(mult):
            continue
        widths = tuple(int(b * w) for b, w in zip(BASE_WIDTHS, mult, strict=True))
        if any(w % 8 for w in widths):
            continue
        stem = min(64, int(64 * mult[0]))
        params, macs = fused_size(widths, stem, DEPTH)
        for name in TARGETS:
            p_err = params / (PAPER[name].params_m * 1e6) - 1
            m_err = macs / (PAPER[name].macs_m * 1e6) - 1
            if abs(p_err) < tolerance and abs(m_err) < tolerance:
                found[name].append(
                    {
                        "widths": widths,
                        "stem": stem,
                        "params": params,
                        "macs": macs,
                        "params_err": p_err,
                        "macs_err": m_err,
                    }
                )
    for rows in found.values():
        rows.sort(key=lambda r: abs(r["params_err"]) + abs(r["macs_err"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=3, help="candidates listed per variant")
    args = parser.parse_args()
    found = search()
    print("| variant | paper params M / MACs M | widths (stem; stages 1-4) | params | MACs | errors | chosen |")
    print("|---|---|---|---:|---:|---|---|")
    for name in TARGETS:
        paper = PAPER[name]
        chosen = VARIANTS[name]
        for r in found[name][: args.top]:
            config = MobileOneConfig(widths=r["widths"], stem_width=r["stem"], blocks=DEPTH, k=(4,) * 4)
            is_chosen = config == chosen
            if is_chosen:  # the closed form must agree with counting the built model
                fused = create_model(config, inference_mode=True)
                assert (count_params(fused), count_macs(fused)) == (r["params"], r["macs"]), name
            print(
                f"| {name} | {paper.params_m} / {paper.macs_m} | {r['stem']}; {', '.join(map(str, r['widths']))} | "
                f"{r['params']:,} | {r['macs'] / 1e6:.1f} M | {100 * r['params_err']:+.1f} % / "
                f"{100 * r['macs_err']:+.1f} % | {'yes' if is_chosen else ''} |"
            )
        print(f"<!-- {name}: {len(found[name])} configs within 2 % -->")


if __name__ == "__main__":
    main()
