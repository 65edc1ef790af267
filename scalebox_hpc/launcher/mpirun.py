"""MPI tasks of ordinary slots: a task that asks for K ranks runs its run.sh as an MPI program.

Inside a Slurm allocation the run becomes a job step of that allocation (``srun -n K``: no new
Slurm job); outside one, ``mpiexec -n K`` (the MPICH wheel's, found next to the Python
running the launcher, else on PATH).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.pipeline import ModuleSpec

RANKS_HEADER = "ranks"


def task_ranks(module: ModuleSpec, headers: Mapping[str, Any]) -> int | None:
    """How many MPI ranks a task asks for: its ``ranks`` header, else the module's ``mpi.ranks``;
    None for an ordinary (non-MPI) run."""
    raw = headers.get(RANKS_HEADER)
    if raw in (None, ""):
        return module.mpi.ranks
    try:
        ranks = int(str(raw))
    except ValueError:
        raise InvalidMessageError(f"header {RANKS_HEADER} must be a positive integer, not {raw!r}") from None
    if ranks < 1:
        raise InvalidMessageError(f"header {RANKS_HEADER} must be a positive integer, not {raw!r}")
    return ranks


def mpi_argv(argv: list[str], ranks: int, environ: Mapping[str, str]) -> list[str]:
    """``argv`` launched on ``ranks`` MPI ranks: a step of the current Slurm allocation when
    there is one (``--overlap``: it may share the CPUs of the launcher's own step), else mpiexec."""
    if environ.get("SLURM_JOB_ID"):
        return ["srun", "--mpi=pmi2", "--overlap", "--kill-on-bad-exit=1", "-n", str(ranks), *argv]
    local = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(local) if os.access(local, os.X_OK) else (shutil.which("mpiexec") or "mpiexec")
    return [mpiexec, "-n", str(ranks), *argv]


def wrap(module: ModuleSpec, headers: Mapping[str, Any], argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """``argv`` unchanged for an ordinary task, else launched on the ranks it asks for."""
    ranks = task_ranks(module, headers)
    return argv if ranks is None else mpi_argv(argv, ranks, environ)
