"""The MobileNetV3 peers' counterpart of MobileOne's identity start, so that peers train on equal terms.

A fresh MobileOne starts every layer with a skip branch as the identity (``init_branches(model,
"identity")``, the short recipe's default); without it, SSDLite-S0 learns next to nothing in the
built-in 3-epoch detection run, as little as the MobileNetV3 peer with torchvision's initialisation.
A residual network's own identity start zeroes the last BatchNorm scale of every residual block
(Goyal et al., "Accurate, Large Minibatch SGD", 2017; torchvision's ``zero_init_residual``), so
each block starts by passing its input on. The peers take it whenever the run's ``init`` is
``identity``, so the same command gives both networks their identity start.
"""

from __future__ import annotations

from torch import nn


def zero_init_residuals(model: nn.Module) -> int:
    """Zero the last BatchNorm scale of every residual block (a module with a true ``use_res_connect``,
    as torchvision's MobileNetV2 and V3 blocks); returns how many blocks were set."""
    count = 0
    for block in model.modules():
        if not getattr(block, "use_res_connect", False):
            continue
        norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
        if norms:
            nn.init.zeros_(norms[-1].weight)
            count += 1
    return count
