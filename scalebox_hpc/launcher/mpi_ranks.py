"""The worker ranks of an MPI stage (1..N-1): a farm's ranks run each task rank 0 sends with the
shared :class:`TaskRunner` (exactly as a slot runs run.sh); a collective's ranks run the
module's handler on every task with the communicator. Neither has a database connection.

A collective's handler reaches its task's semaphores and variables on every rank through a
request directory (see :mod:`scalebox_hpc.runtime.svcdir`) that rank 0 serves with its own
database connection while the task runs: ``<app work dir>/<module>/.services-slot<S>/svc-<TASK>``,
named in ``$SCALEBOX_SERVICES_DIR`` (:func:`scalebox_hpc.taskapi.service` uses it). A directory,
not MPI messages to rank 0: rank 0 is inside the same collective handler then, and answering
point-to-point messages there would need a second MPI thread beside the user's collectives. The
ranks of other nodes reach it when the work root is on a shared file system (as a stage's work
dirs usually are); a rank that cannot gets the helper's error after its bounded wait.

A farm's run.sh (on ranks 1..N-1) reaches them the same way: rank 0 serves a request directory
per task it hands out, ``<app work dir>/<module>/.services-slot<S>/rank<R>/svc-<TASK>``, from
just before it sends the task until the task's result comes back; the worker's run.sh gets its
path in ``$SCALEBOX_SERVICES_DIR`` (no socket), and the ``scalebox`` helper uses it. One parent
per rank: a rank runs one task at a time, so starting a task's directory sweeps only what an
earlier task of that rank left."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from scalebox_hpc import mpi, taskapi
from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.launcher.mpi_wire import (
    ABORT,
    POLL_SECONDS,
    STOP,
    TAG_CTRL,
    TAG_PING,
    TAG_READY,
    TAG_RESULT,
    TAG_TASK,
    Plan,
    rank_context,
    wait_bcast,
)
from scalebox_hpc.launcher.runner import SlotContext, TaskRunner, script_env
from scalebox_hpc.models import Message, Task, TaskResult, TaskStatus
from scalebox_hpc.runtime.base import ContainerRuntime
from scalebox_hpc.runtime.paths import ensure_private
from scalebox_hpc.runtime.svcdir import FARM_IDLE_POLL_SECONDS, Ask, RequestDir

HandlerOutcome = tuple[int, str, str, list[Message], str | None]
"""(status, stdout, stderr, messages, finish text) of a collective handler on one rank."""


class FarmRunner(TaskRunner):
    """A worker rank's TaskRunner: a task's scripts also get the task's request directory,
    which rank 0 serves (the rank has no task-services socket)."""

    def __init__(self, ctx: SlotContext, *, slot_id: int, plan: Plan) -> None:
        super().__init__(ctx, slot_id=slot_id)
        self.plan = plan

    def env(self, task: Task | None, emit_file: str | Path | None) -> dict[str, str]:
        """:meth:`TaskRunner.env`, plus ``$SCALEBOX_SERVICES_DIR`` for a task's run."""
        env = super().env(task, emit_file)
        if task is not None and emit_file is not None:
            env.pop(taskapi.SERVICES_ENV, None)
            env[taskapi.SERVICES_DIR_ENV] = str(farm_services_dir(self.plan, self.ctx.seq, task.id))
        return env


class FarmWorker:
    """Ranks 1..N-1 of a farm: run.sh for every task rank 0 sends, exactly as a slot would."""

    def __init__(self, comm: Any, plan: Plan, runtime: ContainerRuntime) -> None:
        self.comm = comm
        self.ctx = rank_context(plan, int(comm.Get_rank()), runtime)
        self.runner = FarmRunner(self.ctx, slot_id=plan.slot_id, plan=plan)
        self.ping_every = min(1.0, plan.spec.arguments.heartbeat_seconds / 4)

    def run(self) -> int:
        """Set up, then run tasks until rank 0 says stop; the exit code."""
        ok = self.runner.setup()
        self.comm.send(ok, dest=0, tag=TAG_READY)
        mpi_ = mpi.load_mpi()
        status = mpi_.Status()
        while True:
            if not self.comm.Iprobe(source=0, tag=mpi_.ANY_TAG, status=status):
                time.sleep(POLL_SECONDS)
                continue
            msg = self.comm.recv(source=0, tag=status.Get_tag())
            if status.Get_tag() == TAG_TASK:
                result = self._execute(cast(Task, msg))
                self.comm.send((msg.id, result, self.ctx.host), dest=0, tag=TAG_RESULT)
            elif msg == STOP:
                break
        if ok:
            self.runner.teardown()
        else:
            self.runner.close()
        return 0

    def _execute(self, task: Task) -> TaskResult | None:
        """Run the task in a thread; meanwhile ping rank 0 and listen for an abort."""
        box: list[TaskResult | None] = []
        thread = threading.Thread(target=lambda: box.append(self._safe(task)), name="task", daemon=True)
        thread.start()
        status = mpi.load_mpi().Status()
        last_ping = time.monotonic()
        while thread.is_alive():
            thread.join(0.02)
            if self.comm.Iprobe(source=0, tag=TAG_CTRL, status=status) and \
                    self.comm.recv(source=0, tag=TAG_CTRL) == ABORT:
                self.ctx.control.abort.set()
            if time.monotonic() - last_ping >= self.ping_every:
                self.comm.send(task.id, dest=0, tag=TAG_PING)
                last_ping = time.monotonic()
        return box[0] if box else None

    def _safe(self, task: Task) -> TaskResult | None:
        try:
            return self.runner.execute(task)
        except ScaleboxError as exc:  # could not start run.sh at all
            now = datetime.now(UTC)
            return TaskResult(status=TaskStatus.SYSTEM_ERROR, started_at=now, finished_at=now,
                              stderr=f"scalebox: {exc}\n")


def prepare_rank(plan: Plan, rank: int, runtime: ContainerRuntime) -> SlotContext:
    """A collective rank's work dir (its cwd) and environment (the variables run.sh gets)."""
    ctx = rank_context(plan, rank, runtime)
    ensure_private(ctx.work_dir)
    os.chdir(ctx.work_dir)
    os.environ.update(handler_env(plan, ctx))
    return ctx


def handler_env(plan: Plan, ctx: SlotContext) -> dict[str, str]:
    """What a collective handler sees: :func:`script_env` without the launcher's base (the
    rank's own process environment is that), under the stage's one slot id."""
    return script_env(ctx, plan.slot_id, base=False)


def collective_worker(comm: Any, plan: Plan, runtime: ContainerRuntime) -> int:
    """Ranks 1..N-1 of a collective: the handler on every task rank 0 announces, until stop."""
    handler = mpi.load_handler(cast(str, plan.spec.mpi.handler), plan.spec.code_path)
    ctx = prepare_rank(plan, int(comm.Get_rank()), runtime)
    while True:
        kind, task = wait_bcast(comm)
        if kind == STOP:
            return 0
        own = run_handler(handler, comm, task, plan, ctx)
        comm.gather((own[0], own[2]), root=0)


def services_dir(plan: Plan, task_id: int) -> Path:
    """The request directory of task ``task_id`` of the collective stage: the same path on every
    rank (under the app's work dir), made and removed by rank 0."""
    return plan.work_dir / plan.spec.name / f".services-slot{plan.slot_id}" / f"svc-{task_id}"


def farm_services_dir(plan: Plan, rank: int, task_id: int) -> Path:
    """The request directory of task ``task_id`` of the farm stage while worker rank ``rank``
    runs it: the same path on both ranks, made and removed by rank 0."""
    return plan.work_dir / plan.spec.name / f".services-slot{plan.slot_id}" / f"rank{rank}" / f"svc-{task_id}"


def serve_farm_task(plan: Plan, rank: int, task_id: int, ask: Ask) -> RequestDir:
    """Rank 0: start answering the request directory of task ``task_id`` run on rank ``rank``
    (its parents made 0700; what an earlier task of the rank left there swept)."""
    directory = farm_services_dir(plan, rank, task_id)
    ensure_private(directory.parent)
    return RequestDir(directory.parent, ask, task_id, str(plan.app_id), name=directory.name,
                      idle_poll=FARM_IDLE_POLL_SECONDS).start()


def run_handler(handler: mpi.Handler, comm: Any, task: Task, plan: Plan, ctx: SlotContext,
                *, ask: Ask | None = None) -> HandlerOutcome:
    """(status, stdout, stderr, messages, finish text) of the handler on this rank. ``ask``
    (rank 0): how the task's semaphore and variable calls are answered, for every rank."""
    served = None
    directory = services_dir(plan, task.id)
    if ask is not None:
        ensure_private(directory.parent)
        served = RequestDir(directory.parent, ask, task.id, str(plan.app_id), name=directory.name).start()
    os.environ.update({"TASK_ID": str(task.id), taskapi.SERVICES_DIR_ENV: str(directory)})
    env = {**handler_env(plan, ctx), "TASK_ID": str(task.id), taskapi.SERVICES_DIR_ENV: str(directory)}
    current = mpi.MpiTask(comm=comm, task_id=task.id, body=task.body, headers=dict(task.headers),
                          module=plan.spec.name, work_dir=ctx.work_dir, env=env)
    out, err = io.StringIO(), io.StringIO()
    mpi.set_current(current)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = handler(current)
        status = int(code or 0)
    except Exception:  # the user's handler failed: its traceback is the task's stderr
        status = 1
        err.write(traceback.format_exc())
    finally:
        mpi.set_current(None)
        # every rank's calls are done before rank 0 removes the directory (without spinning)
        done = comm.Ibarrier()
        while not done.Test():
            time.sleep(0.002)
        if served is not None:
            served.stop()
    return status, out.getvalue(), err.getvalue(), current.messages, current.finish_text
