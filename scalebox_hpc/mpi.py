"""MPI for module handlers and stage runners; needs the optional extra ``scalebox_hpc[mpi]``.

A ``mode: collective`` module names a handler (``mpi: {handler: "count.py:count"}``) that runs
on every rank of the stage for every task::

    from scalebox_hpc import mpi

    def count(task: mpi.MpiTask) -> int:
        lo, hi = map(int, task.body.split(","))
        mine = sum(is_prime(n) for n in range(lo + task.rank, hi + 1, task.size))
        total = task.comm.allreduce(mine)
        if task.rank == 0:
            task.send_message(f"{lo},{hi},{total}")
        return 0

The handler gets the task (also available as :func:`task`) and returns an exit status (None
means 0). Rank 0's status, printed output and emitted messages are recorded; a non-zero status
on any rank fails the task. Importing this module does not import mpi4py: :func:`load_mpi` does.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from scalebox_hpc.errors import MpiError
from scalebox_hpc.models import Message

Handler = Callable[["MpiTask"], "int | None"]

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")  # noqa: S108 -- where MPICH puts its segments, not a temp file of ours
SEGMENT_PREFIX = "mpich_shm_"

_SIZE_VARIABLES = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")  # SCALEBOX_MPI_RANKS: Settings


@dataclass
class MpiTask:
    """One task as every rank of a collective stage sees it."""

    comm: Any
    """The stage's communicator (an ``mpi4py.MPI.Comm``; every rank of the stage)."""
    task_id: int
    body: str
    headers: dict[str, Any]
    module: str
    work_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    """The module's ``environments`` and arguments, as run.sh would see them."""
    messages: list[Message] = field(default_factory=list)
    finish_text: str | None = None

    @property
    def rank(self) -> int:
        """This rank's number in :attr:`comm`."""
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        """How many ranks :attr:`comm` has."""
        return int(self.comm.Get_size())

    def send_message(self, body: str, module: str | None = None, headers: Mapping[str, Any] | None = None) -> None:
        """Emit a message (to ``module``, default the first sink); only rank 0's are recorded."""
        self.messages.append(Message(body=body, headers=dict(headers or {}), module=module))

    def set_finished(self, text: str) -> None:
        """Finish the app with ``text`` as its result once this task is recorded (rank 0 only)."""
        self.finish_text = text


_current: MpiTask | None = None


def task() -> MpiTask:
    """The task the collective handler on this rank is running now."""
    if _current is None:
        raise MpiError("no MPI task is running (scalebox_hpc.mpi.task() works inside a collective handler)")
    return _current


def set_current(current: MpiTask | None) -> None:
    """Set (or clear) what :func:`task` returns; called by the stage runner around a handler."""
    global _current
    _current = current


def load_mpi() -> ModuleType:
    """``mpi4py.MPI`` (initialising MPI), or MpiError when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise MpiError(
            f"mpi4py is not available: {exc}",
            hint="pip install 'scalebox_hpc[mpi]' (mpi4py + the MPICH wheel)",
        ) from exc
    return MPI


def expected_size(environ: Mapping[str, str] | None = None) -> int | None:
    """How many ranks Slurm's launch asked for (its task count; SCALEBOX_MPI_RANKS is a setting the
    root passes as ``StageConfig.expected_ranks``)."""
    env = os.environ if environ is None else environ
    for name in _SIZE_VARIABLES:
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def check_size(size: int, expected: int | None, *, minimum: int = 1) -> None:
    """The singleton guard: fail at start when the communicator is not what the launch asked
    for (e.g. every rank a singleton of size 1 because the PMI plug-in is missing)."""
    if expected is not None and size != expected:
        raise MpiError(
            f"MPI communicator has {size} rank(s) but the launch asked for {expected}: the ranks did not "
            "join one MPI job (launched without PMI? use `srun --mpi=pmi2`, MPICH, not OpenMPI)"
        )
    if size < minimum:
        raise MpiError(
            f"MPI communicator has {size} rank(s); this stage needs at least {minimum} "
            "(rank 0 dispatches, the others run tasks): launch it with `srun --mpi=pmi2 -n N`"
        )


def load_handler(spec: str, code_path: Path) -> Handler:
    """The function named by ``file.py:function`` (relative to ``code_path``) or
    ``package.module:function``."""
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = code_path / where
            mod_name = f"scalebox_handler_{abs(hash(str(path)))}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise MpiError(f"handler file {path} cannot be loaded")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except MpiError:
        raise
    except Exception as exc:  # the user's module failed to import: say which, keep the cause
        raise MpiError(f"handler {spec!r}: cannot import {where}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise MpiError(f"handler {spec!r}: {where} has no function {name!r}")
    return fn  # type: ignore[no-any-return]


def _held_paths(proc: Path = Path("/proc")) -> set[str]:
    """Every /dev/shm path some process we can inspect has open or mapped."""
    held: set[str] = set()
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            for fd in (pid / "fd").iterdir():
                held.add(os.readlink(fd))
            for line in (pid / "maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    held.add(parts[5].removesuffix(" (deleted)"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return held


@contextlib.contextmanager
def init_deadline(seconds: float = 120.0) -> Iterator[None]:
    """End the process (exit 1, every thread's traceback on stderr) if the block takes longer
    than ``seconds`` (the root passes SCALEBOX_MPI_INIT_TIMEOUT, ``Settings.mpi_init_timeout``; 0 disables).

    For MPI_Init: a launch that goes wrong (a PMI exchange that never completes) hangs there,
    inside C code holding the GIL, until the job's time limit. faulthandler's watchdog is a C
    thread that needs no GIL; with ``srun --kill-on-bad-exit`` the exit then ends the step."""
    if seconds <= 0:
        yield
        return
    sys.stderr.flush()  # faulthandler writes to the descriptor: what Python buffered goes first
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def remove_stale_segments(shm_dir: Path = SHM_DIR, *, min_age: float = 10.0,
                          proc: Path = Path("/proc")) -> list[Path]:
    """Remove MPICH shared-memory segments of this user that no process holds.

    MPICH unlinks a node's segment once every local rank has attached; ranks killed during
    MPI_Init (a lost node, ``--kill-on-bad-exit``, scancel) leave it behind, and on a node
    whose /dev/shm is small (64 MiB in a container) a few such leaks make every later MPI_Init
    fail with "Out of memory". Sites often clean /dev/shm in a Slurm epilog; a stage cannot
    count on one. Segments younger than ``min_age`` seconds are left alone (a rank may be
    between creating and attaching one)."""
    uid, now = os.getuid(), time.time()
    try:
        candidates = [p for p in shm_dir.glob(f"{SEGMENT_PREFIX}*")
                      if (st := p.lstat()).st_uid == uid and now - st.st_mtime >= min_age]
    except OSError:
        return []
    if not candidates:
        return []
    held = _held_paths(proc)
    removed = []
    for path in candidates:
        if str(path) in held:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    if removed:
        logger.info("removed %d stale MPICH segment(s) from %s", len(removed), shm_dir,
                    extra={"action": "mpich_shm_cleaned", "removed": len(removed), "dir": str(shm_dir)})
    return removed
