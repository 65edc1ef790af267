"""Drain signals that arrive before a stage job's launcher is up.

Slurm sends a stage job's walltime warning (``--signal=B:USR1@grace``) once the remaining time
is below the grace, which for a short job can be seconds after it starts; the job script
forwards it to the launchers, which may still be importing. Python's default for SIGUSR1 ends
the process (the job then FAILS with 138 instead of draining), so ``python -m scalebox_hpc
launcher --stage-job`` records such a signal from its first line, and the launcher, once its
own handlers are installed, drains at once for each one recorded.
"""

from __future__ import annotations

import signal
from types import FrameType

received: list[int] = []
"""Signals recorded before the launcher installed its own handlers, in arrival order."""


def _record(signum: int, _frame: FrameType | None) -> None:
    received.append(signum)


def install() -> None:
    """Record SIGUSR1 (the walltime warning) instead of dying of it, until the launcher's handlers
    replace this one. SIGTERM keeps its default: scancel must still stop a launcher that hangs."""
    signal.signal(signal.SIGUSR1, _record)


def take() -> list[int]:
    """The recorded signals, forgotten."""
    out = list(received)
    received.clear()
    return out
