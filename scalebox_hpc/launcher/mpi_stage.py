"""MPI stages: one module run as one MPI job, whatever its rank count, on ONE database connection.

``farm``: rank 0 claims tasks in batches and hands each to an idle worker rank (1..N-1); the
worker runs run.sh exactly as a slot does (the shared :class:`~scalebox_hpc.launcher.runner.TaskRunner`:
timeout killing only that rank's process tree, task-exec files, emitted messages) and sends the
result back; rank 0 records a batch of results with their messages in one transaction.
``collective``: every task goes to every rank, the module's Python handler runs on all of them
with the communicator, rank 0 records the result.

Only rank 0 touches PostgreSQL (:mod:`~scalebox_hpc.launcher.mpi_rank0`): it registers one slot
for the stage, claims under its id, heart-beats (which renews every lease of the stage) and
recovers expired leases from a thread. A rank that dies or hangs (no ping for 1.5 heartbeats)
ends the stage: what finished is recorded, undistributed tasks are released, the lost rank's
task is left to lease expiry, then rank 0 calls MPI_Abort (MPI_Finalize would wait for the dead
rank forever). SIGUSR1 / SIGTERM / SIGINT drain: rank 0 stops claiming, releases what it holds,
lets running tasks finish for ``grace`` seconds, aborts and releases the rest, and ends the stage.

Every rank polls (Iprobe / Test and a short sleep) instead of blocking in MPI: MPICH spins
while blocked, which would take the CPUs run.sh needs.

The parts: :mod:`~scalebox_hpc.launcher.mpi_wire` (tags, config, the plan, the collectives),
:mod:`~scalebox_hpc.launcher.mpi_rank0` (rank 0), :mod:`~scalebox_hpc.launcher.mpi_ranks` (the others).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from scalebox_hpc import early_signals, mpi
from scalebox_hpc.launcher.mpi_rank0 import Master
from scalebox_hpc.launcher.mpi_ranks import FarmWorker, collective_worker
from scalebox_hpc.launcher.mpi_wire import (
    ABORT,
    EXIT_LOST_RANK,
    HOOK_SECONDS,
    POLL_SECONDS,
    STOP,
    Opened,
    Plan,
    QueueOpener,
    StageConfig,
    receive_plan,
)
from scalebox_hpc.runtime.base import ContainerRuntime

logger = logging.getLogger(__name__)

__all__ = [
    "ABORT", "EXIT_LOST_RANK", "HOOK_SECONDS", "POLL_SECONDS", "STOP", "Opened", "Plan", "QueueOpener",
    "StageConfig", "run_stage",
]


def run_stage(
    comm: Any, config: StageConfig, open_queue: QueueOpener, runtime: ContainerRuntime,
) -> int:
    """Run this rank's part of the stage; returns the process exit code. ``open_queue`` (called on
    rank 0 only) gives the stage's single queue handle, the app id and variables for run.sh."""
    mpi.check_size(int(comm.Get_size()), config.expected_ranks or mpi.expected_size(), minimum=2)
    rank = int(comm.Get_rank())
    stop = threading.Event()
    _install_signals(stop, rank)
    if rank == 0:
        return Master(comm, config, open_queue, stop, runtime).run()
    plan = receive_plan(comm)
    if plan.spec.mpi.mode == "collective":
        return collective_worker(comm, plan, runtime)
    return FarmWorker(comm, plan, runtime).run()


def _install_signals(stop: threading.Event, rank: int) -> None:
    def handler(signum: int, _frame: object) -> None:
        if rank == 0:
            logger.warning("signal %s: draining the MPI stage", signal.Signals(signum).name,
                           extra={"action": "mpi_stage_signal", "signal": signal.Signals(signum).name})
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, handler)
        for early in early_signals.take():  # a walltime warning that came while the rank started
            handler(early, None)
