"""The ``mobileone`` command: a thin argparse layer over the Python API.

Each subcommand is an ``add_<name>`` function that declares its arguments and a ``run_<name>``
function that calls the library; heavy imports happen inside ``run_<name>`` so that
``mobileone info`` works with torch alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .checkpoint import CheckpointError


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="params, MACs and layers of variants, train-time and fused")
    p.add_argument("variants", nargs="*", help="variants (default: all), e.g. s0 mobileone_s4")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_info(args: argparse.Namespace) -> int:
    from .complexity import count_layers, count_macs, count_params
    from .model import create_model, list_models, resolve_variant

    names = [resolve_variant(v) for v in args.variants] or list_models()
    rows = []
    for name in names:
        train = create_model(name, num_classes=args.num_classes)
        fused = create_model(name, num_classes=args.num_classes, inference_mode=True)
        rows.append({
            "variant": name,
            "params_train": count_params(train),
            "params_fused": count_params(fused),
            "macs_train": count_macs(train, args.img_size),
            "macs_fused": count_macs(fused, args.img_size),
            "layers": count_layers(fused),
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"MobileOne at {args.img_size}x{args.img_size}, {args.num_classes} classes "
          "(layers: weight layers of the fused net, convs + head)")  # fmt: skip
    print("| variant | params train-time | params fused | MACs train-time | MACs fused | layers |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['params_train']:,} | {r['params_fused']:,} | "
              f"{r['macs_train'] / 1e6:,.1f} M | {r['macs_fused'] / 1e6:,.1f} M | {r['layers']} |")  # fmt: skip
    return 0


COMMANDS = {"info": (add_info, run_info)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobileone", description="MobileOne: build, train, fuse, export, benchmark")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and why")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command][1](args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"mobileone {args.command}: error: {e}", file=sys.stderr)
        return 2
