"""What the ranks of an MPI stage share: the message tags, the stage's config, the plan rank 0
broadcasts at start, and the non-spinning collectives they meet in."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from scalebox_hpc.errors import MpiError
from scalebox_hpc.launcher import taskenv
from scalebox_hpc.launcher.launcher import host_name
from scalebox_hpc.launcher.ports import BatchQueue, NoStageHooks, StageHooks
from scalebox_hpc.launcher.runner import SlotContext, SlotControl, rank_work_dir
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import ModuleRef
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.base import ContainerRuntime

TAG_READY, TAG_TASK, TAG_CTRL, TAG_RESULT, TAG_PING = 11, 12, 13, 14, 15
STOP, ABORT = "stop", "abort"
EXIT_LOST_RANK = 3
POLL_SECONDS = 0.002

HOOK_SECONDS = 0.5
"""How often rank 0 calls the stage job's ``tick`` (walltime, `scalebox stage stop`, autoscale)."""


@dataclass
class Opened:
    """What rank 0 opens at start: the stage's single queue handle, the app id, extra
    variables for run.sh, and what builds the Slurm stage job's hooks from the module's spec
    (they are called under the queue's lock: they may use its connection)."""

    queue: BatchQueue
    app_id: int
    script_env: dict[str, str]
    hooks: Callable[[ModuleSpec], StageHooks] = lambda _spec: NoStageHooks()


QueueOpener = Callable[[], Opened]
"""Rank 0 only: opens the stage's database side."""


@dataclass(frozen=True)
class StageConfig:
    """What one MPI stage job runs: one module of one app."""

    module: str
    work_root: Path
    app_id: int | None = None
    grace: float = 30.0
    expected_ranks: int | None = None
    """The communicator size the launch asked for (default: SCALEBOX_MPI_RANKS / SLURM_NTASKS)."""
    script_env: Mapping[str, str] = field(default_factory=dict)
    stage_job: bool = False
    """Run as a Slurm stage job (``--stage-job``): walltime and `stage stop` drains, autoscaling, min_jobs."""


@dataclass(frozen=True)
class Plan:
    """What rank 0 learned from the database, broadcast to every rank at start."""

    app_id: int
    spec: ModuleSpec
    ref: ModuleRef
    modules: dict[str, ModuleRef]
    slot_id: int
    script_env: dict[str, str]
    work_dir: Path
    """The app's work dir (see launcher.workdirs): each rank works in ``<module>/<host>-rank<R>`` below it."""


def rank_context(plan: Plan, rank: int, runtime: ContainerRuntime) -> SlotContext:
    """Rank ``rank``'s slot context: its work dir ``<module>/<host>-rank<R>``, the launcher's
    allow-listed environment plus the plan's variables."""
    host = host_name()
    return SlotContext(
        app_id=plan.app_id, module=plan.spec, ref=plan.ref, modules=plan.modules, host=host, seq=rank,
        work_dir=rank_work_dir(plan.work_dir, plan.spec.name, host, f"rank{rank}"),
        runtime=runtime, wakeups=Wakeups(), control=SlotControl(),
        base_env={**taskenv.script_base_env(os.environ), **plan.script_env},
    )


def receive_plan(comm: Any) -> Plan:
    """A worker rank: the plan rank 0 broadcasts (an MpiError when rank 0 could not start)."""
    status, payload = wait_bcast(comm)
    if status != "ok":
        raise MpiError(f"rank 0 could not start the stage: {payload}")
    return cast(Plan, payload)


def wait_bcast(comm: Any) -> Any:
    """A broadcast from rank 0, waited for without spinning (Ibarrier polled, then bcast)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)
    return comm.bcast(None, root=0)


def announce(comm: Any, message: Any) -> None:
    """Rank 0: broadcast ``message`` to the ranks waiting in :func:`wait_bcast`."""
    comm.Ibarrier().Wait()
    comm.bcast(message, root=0)
