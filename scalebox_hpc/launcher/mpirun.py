"""MPI tasks of ordinary slots: a module with ``mpi: {ranks: K}`` runs each run.sh as an MPI program.

Inside a Slurm allocation the run becomes a job step of that allocation (``srun -n K``: no new
Slurm job); outside one, ``mpiexec -n K`` (the MPICH wheel's, found next to the Python
running the launcher, else on PATH).

A task's ``ranks`` header overrides K, but only for such modules (elsewhere it is ordinary
data), and within bounds, so that a task cannot start a process storm:

- at most the module's ``mpi.max_ranks`` (default: K);
- inside a Slurm allocation, at most what the allocation can run: the larger of its task count
  (``SLURM_NTASKS``, else ``SLURM_NPROCS``) and its CPUs (``SLURM_CPUS_ON_NODE`` times
  ``SLURM_JOB_NUM_NODES``, else ``SLURM_NNODES``). The larger, because a stage job runs one
  launcher task per node with all the node's CPUs, and ``srun -n K`` may use them all;
- outside Slurm, at most the host's CPUs (``os.cpu_count()``), unless ``mpi.max_ranks`` is set
  and larger (the module's author accepts oversubscribing the host).

A run beyond a bound raises InvalidMessageError: the slot records the task as a system error.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.pipeline import ModuleSpec

RANKS_HEADER = "ranks"
"""The task header that asks for a number of ranks (reserved for modules with ``mpi.ranks``)."""

_COUNT = re.compile(r"\s*[0-9]+\s*")


def _header_ranks(raw: Any) -> int:
    """The ``ranks`` header as a positive integer (an int, or a string of ASCII digits)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        ranks = raw
    elif isinstance(raw, str) and _COUNT.fullmatch(raw):
        digits = raw.strip().lstrip("0")
        if len(digits) > 18:  # no machine has that many; int() would refuse past 4300 digits anyway
            raise InvalidMessageError(f"header {RANKS_HEADER} {_shown(raw)} is too large")
        ranks = int(digits or "0")
    else:
        ranks = 0
    if ranks < 1:
        raise InvalidMessageError(f"header {RANKS_HEADER} must be a positive integer, not {_shown(raw)}")
    return ranks


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def task_ranks(module: ModuleSpec, headers: Mapping[str, Any]) -> int | None:
    """How many MPI ranks a task of ``module`` runs on: None for an ordinary (non-MPI) module,
    whatever its headers say; else its ``ranks`` header (at most ``mpi.max_ranks``, default
    ``mpi.ranks``) or ``mpi.ranks``. Raises InvalidMessageError for a bad or too large header."""
    declared = module.mpi.ranks
    if declared is None:
        return None
    raw = headers.get(RANKS_HEADER)
    if raw is None or raw == "":
        return declared
    ranks = _header_ranks(raw)
    cap = module.mpi.max_ranks or declared
    if ranks > cap:
        raise InvalidMessageError(
            f"header {RANKS_HEADER} asks for {ranks} MPI ranks; module {module.name} allows at most {cap}"
            f" (mpi.max_ranks{'' if module.mpi.max_ranks else ', default mpi.ranks'})")
    return ranks


def _env_int(environ: Mapping[str, str], *names: str) -> int | None:
    """The first of ``names`` set to a positive integer (None: none is; malformed values are ignored)."""
    for name in names:
        value = environ.get(name, "").strip()
        if value.isascii() and value.isdigit() and int(value) > 0:
            return int(value)
    return None


def allocation_ranks(environ: Mapping[str, str]) -> int | None:
    """The most ranks ``srun`` can start in the current Slurm allocation: the larger of its task
    count and its CPU count (see the module docstring); None when the environment tells neither."""
    tasks = _env_int(environ, "SLURM_NTASKS", "SLURM_NPROCS")
    per_node = _env_int(environ, "SLURM_CPUS_ON_NODE")
    cpus = None if per_node is None else per_node * (_env_int(environ, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1)
    known = [n for n in (tasks, cpus) if n is not None]
    return max(known) if known else None


def check_ranks(module: ModuleSpec, ranks: int, environ: Mapping[str, str]) -> None:
    """Raise InvalidMessageError when ``ranks`` is more than where the run happens can hold: the
    Slurm allocation (``environ`` has SLURM_JOB_ID), else this host's CPUs (unless mpi.max_ranks allows more)."""
    if environ.get("SLURM_JOB_ID"):
        limit = allocation_ranks(environ)
        if limit is not None and ranks > limit:
            raise InvalidMessageError(
                f"module {module.name}: a task asks for {ranks} MPI ranks but the Slurm allocation runs at most"
                f" {limit} (SLURM_NTASKS, SLURM_CPUS_ON_NODE x SLURM_NNODES)")
        return
    cpus = os.cpu_count()
    if cpus is None or ranks <= max(cpus, module.mpi.max_ranks or 0):
        return
    raise InvalidMessageError(
        f"module {module.name}: a task asks for {ranks} MPI ranks but this host has {cpus} CPUs"
        " (set mpi.max_ranks to allow more)")


def mpi_argv(argv: list[str], ranks: int, environ: Mapping[str, str]) -> list[str]:
    """``argv`` launched on ``ranks`` MPI ranks: a step of the current Slurm allocation when
    there is one (``--overlap``: it may share the CPUs of the launcher's own step), else mpiexec."""
    if environ.get("SLURM_JOB_ID"):
        return ["srun", "--mpi=pmi2", "--overlap", "--kill-on-bad-exit=1", "-n", str(ranks), *argv]
    local = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(local) if os.access(local, os.X_OK) else (shutil.which("mpiexec") or "mpiexec")
    return [mpiexec, "-n", str(ranks), *argv]


def wrap(module: ModuleSpec, headers: Mapping[str, Any], argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """``argv`` unchanged for an ordinary module, else launched on the ranks its task runs on
    (:func:`task_ranks`, bounded by :func:`check_ranks`); raises InvalidMessageError past a bound."""
    ranks = task_ranks(module, headers)
    if ranks is None:
        return argv
    check_ranks(module, ranks, environ)
    return mpi_argv(argv, ranks, environ)
