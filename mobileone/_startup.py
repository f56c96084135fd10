"""What the ``mobileone`` command sets before torch starts its thread pools (imported first by the package).

OpenMP's default wait policy spins a thread for a while after each parallel region; beside another
busy process on the same cores that spinning takes the cores both need (an S0 step 5x slower beside
one competing process was measured). The command therefore asks for the passive policy unless the
user's environment says otherwise (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``). Library users who
import torch themselves keep whatever their process set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def is_command_line() -> bool:
    """Whether this process is the ``mobileone`` command (the console script, ``python -m mobileone``, torchrun)."""
    if Path(sys.argv[0]).name in ("mobileone", "mobileone.exe"):
        return True
    argv = list(getattr(sys, "orig_argv", sys.argv))
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] in ("mobileone", "mobileone.cli")


def passive_wait_policy() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for the command, before torch loads OpenMP; whether it was set."""
    if "torch" in sys.modules or not is_command_line():
        return False
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


passive_wait_policy()
