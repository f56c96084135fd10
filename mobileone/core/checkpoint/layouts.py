"""Apple's, timm's and mmpretrain's names for the same tensors, and the architecture read off their shapes.

The model's native state_dict layout is Apple's (docs/architecture.md, "Checkpoint layouts"); the other
layouts are renamed to it on reading (:func:`to_apple_layout`) and back on request.
"""

from __future__ import annotations

import re
from typing import Any

from ..config import VARIANTS, MobileOneConfig
from .storage import CheckpointError, StateDict

# The same tensor under Apple's, timm's and mmpretrain's names. ``{i}`` is an
# index; ``{s}`` is Apple's stage number 1-4, which timm counts from 0 (``{s-1}``).
LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "timm": [
        ("stage0.", "stem."),
        ("stage{s}.", "stages.{s-1}."),
        (".rbr_conv.{i}.", ".conv_kxk.{i}."),
        (".rbr_scale.", ".conv_scale."),
        (".rbr_skip.", ".identity."),
        (".se.reduce.", ".attn.fc1."),
        (".se.expand.", ".attn.fc2."),
        ("linear.", "head.fc."),
    ],
    "mmpretrain": [
        ("stage{i}.", "backbone.stage{i}."),
        (".rbr_conv.{i}.bn.", ".branch_conv_list.{i}.norm."),
        (".rbr_conv.{i}.", ".branch_conv_list.{i}."),
        (".rbr_scale.bn.", ".branch_scale.norm."),
        (".rbr_scale.", ".branch_scale."),
        (".rbr_skip.", ".branch_norm."),
        (".se.reduce.", ".se.conv1.conv."),
        (".se.expand.", ".se.conv2.conv."),
        (".reparam_conv.", ".branch_reparam."),
        ("linear.", "head.fc."),
    ],
}


def _rule(src: str, dst: str) -> tuple[re.Pattern, Any]:
    """Compile one row of ``LAYOUTS`` into (regex, replacement) mapping ``src`` names to ``dst``."""
    anchored = not src.startswith(".")
    pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{s\}", r"(?P<s>[1-4])")
    pattern = pattern.replace(r"\{s\-1\}", r"(?P<t>[0-3])")

    def repl(m: re.Match) -> str:
        g = m.groupdict()
        out = dst.replace("{i}", g.get("i") or "")
        if g.get("s"):
            out = out.replace("{s-1}", str(int(g["s"]) - 1))
        if g.get("t"):
            out = out.replace("{s}", str(int(g["t"]) + 1))
        return out

    return re.compile(("^" if anchored else "") + pattern), repl


_TO_APPLE = {name: [_rule(b, a) for a, b in rows] for name, rows in LAYOUTS.items()}


_FROM_APPLE = {name: [_rule(a, b) for a, b in rows] for name, rows in LAYOUTS.items()}


def _rename(sd: StateDict, rules: list[tuple[re.Pattern, Any]]) -> StateDict:
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = pattern.sub(repl, key, count=1)
        out[key] = value
    return out


def detect_layout(sd: StateDict) -> str:
    """Which naming a state dict uses: ``apple``, ``timm`` or ``mmpretrain``."""
    keys = list(sd)
    if any(k.startswith("backbone.stage") or ".branch_" in k for k in keys):
        return "mmpretrain"
    if any(k.startswith(("stem.", "stages.")) for k in keys):
        return "timm"
    if any(k.startswith("stage0.") for k in keys):
        return "apple"
    raise CheckpointError(
        f"this state dict is not a MobileOne in Apple's, timm's or mmpretrain's layout; its first keys are {keys[:5]}"
    )


def to_apple_layout(sd: StateDict) -> tuple[StateDict, str]:
    """Convert any supported layout to Apple's; returns the converted dict and the layout found."""
    layout = detect_layout(sd)
    return (sd if layout == "apple" else _rename(sd, _TO_APPLE[layout])), layout


def from_apple_layout(sd: StateDict, layout: str) -> StateDict:
    """Convert an Apple-layout state dict to ``timm`` or ``mmpretrain`` names (for their code)."""
    if layout == "apple":
        return dict(sd)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose apple, {', '.join(LAYOUTS)}")
    return _rename(sd, _FROM_APPLE[layout])


def infer_config(sd: StateDict) -> tuple[MobileOneConfig, int, bool]:
    """Read the architecture off Apple-layout tensor shapes: (config, num_classes, fused)."""
    fused = any(".reparam_conv." in k for k in sd)
    try:
        stem_width = sd["stage0.reparam_conv.weight" if fused else "stage0.rbr_conv.0.conv.weight"].shape[0]
        widths, blocks, ks, se = [], [], [], []
        for s in range(1, 5):
            n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"stage{s}."))
            blocks.append(n // 2)
            last = f"stage{s}.{n - 1}"
            widths.append(sd[f"{last}.reparam_conv.weight" if fused else f"{last}.rbr_conv.0.conv.weight"].shape[0])
            ks.append(1 if fused else len({k.split(".")[3] for k in sd if k.startswith(f"stage{s}.1.rbr_conv.")}))
            se.append(sum(f"stage{s}.{2 * b + 1}.se.reduce.weight" in sd for b in range(n // 2)))
        stem_k = 1 if fused else len({k.split(".")[2] for k in sd if k.startswith("stage0.rbr_conv.")})
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot read a MobileOne architecture from this state dict (missing {e})") from e
    config = MobileOneConfig(
        widths=tuple(widths),
        stem_width=stem_width,
        blocks=tuple(blocks),
        k=tuple(ks),
        se_blocks=tuple(se),
        stem_k=stem_k,
    )
    if fused:  # k is gone after fusion: take it from the named variant of the same shape, if any
        named = next((c for c in VARIANTS.values() if c.replace(k=c.k) == config.replace(k=c.k)), None)
        config = named or config
    else:
        config = config.replace(
            scale_branch="stage0.rbr_scale.conv.weight" in sd, skip_branch=any(".rbr_skip." in k for k in sd)
        )
    num_classes = sd["linear.weight"].shape[0] if "linear.weight" in sd else 0
    return config, num_classes, fused
