"""MPI stages: one module run as one MPI job, whatever its rank count, on ONE database connection.

``farm``: rank 0 claims tasks in batches and hands each to an idle worker rank (1..N-1); the
worker runs run.sh exactly as a slot does (:meth:`Slot.execute`: timeout killing only that
rank's process tree, task-exec files, emitted messages) and sends the result back; rank 0
records a batch of results with their messages in one transaction. ``collective``: every task
goes to every rank, the module's Python handler runs on all of them with the communicator,
rank 0 records the result.

Only rank 0 touches PostgreSQL: it registers one slot for the stage, claims under its id,
heart-beats (which renews every lease of the stage) and recovers expired leases from a
thread. A rank that dies or hangs (no ping for 1.5 heartbeats) ends the stage: what finished
is recorded, undistributed tasks are released, the lost rank's task is left to lease expiry,
then rank 0 calls MPI_Abort (MPI_Finalize would wait for the dead rank forever). SIGUSR1 /
SIGTERM / SIGINT drain: rank 0 stops claiming, releases what it holds, lets running tasks
finish for ``grace`` seconds, aborts and releases the rest, and ends the stage.

Every rank polls (Iprobe / Test and a short sleep) instead of blocking in MPI: MPICH spins
while blocked, which would take the CPUs run.sh needs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, cast

from scalebox_hpc import early_signals, mpi
from scalebox_hpc.errors import DatabaseError, MpiError, ScaleboxError
from scalebox_hpc.launcher import taskenv
from scalebox_hpc.launcher.launcher import host_name
from scalebox_hpc.launcher.mpi_dispatch import Dispatcher, Finished
from scalebox_hpc.launcher.ports import BatchQueue, NoStageHooks, StageHooks, TaskQueue
from scalebox_hpc.launcher.slot import Slot, SlotContext, SlotControl, lease_for
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.launcher.workdirs import claim_app_dir
from scalebox_hpc.models import (
    Completion,
    Message,
    ModuleRef,
    Task,
    TaskResult,
    TaskStatus,
    extra_attempts,
    headers_for,
)
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.base import ContainerRuntime
from scalebox_hpc.runtime.paths import ensure_private

logger = logging.getLogger(__name__)

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


class _NoDatabase:
    """Worker ranks have no database: any use is a bug, said loudly."""

    def __getattr__(self, name: str) -> Any:
        raise MpiError(f"worker ranks have no database connection (called {name})")


# -- entry ----------------------------------------------------------------------------------------
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
        return _Master(comm, config, open_queue, stop, runtime).run()
    plan = _receive_plan(comm)
    if plan.spec.mpi.mode == "collective":
        return _collective_worker(comm, plan, config, stop)
    return _FarmWorker(comm, plan, config, runtime).run()


def _receive_plan(comm: Any) -> Plan:
    status, payload = _wait_bcast(comm)
    if status != "ok":
        raise MpiError(f"rank 0 could not start the stage: {payload}")
    return cast(Plan, payload)


def _wait_bcast(comm: Any) -> Any:
    """A broadcast from rank 0, waited for without spinning (Ibarrier polled, then bcast)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)
    return comm.bcast(None, root=0)


def _announce(comm: Any, message: Any) -> None:
    comm.Ibarrier().Wait()
    comm.bcast(message, root=0)


def _install_signals(stop: threading.Event, rank: int) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        if rank == 0:
            logger.warning("signal %s: draining the MPI stage", signal.Signals(signum).name,
                           extra={"action": "mpi_stage_signal", "signal": signal.Signals(signum).name})
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, handler)
        for early in early_signals.take():  # a walltime warning that came while the rank started
            handler(early, None)


def _context(plan: Plan, config: StageConfig, rank: int, runtime: ContainerRuntime) -> SlotContext:
    host = host_name()
    work = plan.work_dir / plan.spec.name / f"{host}-rank{rank}"
    return SlotContext(
        app_id=plan.app_id, module=plan.spec, ref=plan.ref, modules=plan.modules, host=host, seq=rank,
        work_dir=work, runtime=runtime, wakeups=Wakeups(), control=SlotControl(),
        base_env={**taskenv.script_base_env(os.environ), **plan.script_env},
    )


# -- rank 0 ---------------------------------------------------------------------------------------
class _Master:
    """Rank 0: the stage's only database user."""

    def __init__(
        self, comm: Any, config: StageConfig, open_queue: QueueOpener,
        stop: threading.Event, runtime: ContainerRuntime,
    ) -> None:
        self.comm, self.config, self.open_queue, self.stop, self.runtime = comm, config, open_queue, stop, runtime
        self.size = int(comm.Get_size())
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self.ended = threading.Event()
        self.host = host_name()
        self.tasks_done = 0
        self.queue: BatchQueue | None = None
        self.hooks: StageHooks = NoStageHooks()
        self.next_tick = 0.0

    # database calls, serialised with the heartbeat thread (one connection)
    def db(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        with self.lock:
            return fn(*args, **kw)

    def run(self) -> int:
        try:
            plan = self._plan()
        except ScaleboxError as exc:
            _announce(self.comm, ("error", str(exc)))
            raise
        _announce(self.comm, ("ok", plan))
        self.plan = plan
        args = plan.spec.arguments
        self.hb = args.heartbeat_seconds
        beat = threading.Thread(target=self._heartbeats, name="mpi-heartbeat", daemon=True)
        beat.start()
        status, message, code = "EXITED", None, 0
        try:
            if plan.spec.mpi.mode == "collective":
                self._collective()
            else:
                code = self._farm()
                if code == EXIT_LOST_RANK:
                    status, message = "ERROR", self.lost_message
        except Exception as exc:  # the other ranks wait for word from rank 0: never leave them hanging
            status, message, code = "ERROR", f"{type(exc).__name__}: {exc}", 1
            logger.exception("MPI stage %s failed on rank 0", plan.spec.name, extra={
                "action": "mpi_stage_failed", "app_id": plan.app_id, "module_name": plan.spec.name, "host": self.host})
        finally:
            self.ended.set()
            beat.join(5.0)
            with contextlib.suppress(ScaleboxError):
                self.db(self.q.set_slot_status, plan.slot_id, status, message=message, tasks_done=self.tasks_done)
            self._leaving()
            self.q.close()
        if code != 0:  # MPI_Finalize would wait for a lost rank (or a waiting one) forever
            logger.error("MPI stage %s: %s; aborting the MPI job", plan.spec.name, message, extra={
                "action": "mpi_stage_abort", "app_id": plan.app_id, "module_name": plan.spec.name, "error": message})
            self.comm.Abort(code)
        return code

    @property
    def q(self) -> BatchQueue:
        assert self.queue is not None
        return self.queue

    def _plan(self) -> Plan:
        opened = self.open_queue()
        self.queue, app_id, extra_env = opened.queue, opened.app_id, opened.script_env
        refs = self.q.modules(app_id)
        specs = self.q.module_specs(app_id)
        name = self.config.module
        if name not in specs:
            raise MpiError(f"app {app_id} has no module {name!r}")
        spec = ModuleSpec.model_validate(specs[name])
        if spec.mpi.mode is None:
            raise MpiError(f"module {name!r} is not an MPI stage (set mpi: {{mode: farm|collective}})")
        self.hooks = opened.hooks(spec)
        self.q.register_host(self.host, {"pid": os.getpid(), "mpi_ranks": self.size})
        root = claim_app_dir(self.config.work_root, app_id, self.q.app_uid(app_id))
        work = root / name / f"{self.host}-rank0"
        slot_id = self.q.create_slot(refs[name].id, host=self.host, seq=0, pid=os.getpid(), work_dir=str(work),
                                     heartbeat_seconds=spec.arguments.heartbeat_seconds)
        self.q.set_slot_status(slot_id, "RUNNING")
        env = {**extra_env, **self.config.script_env}
        return Plan(app_id=app_id, spec=spec, ref=refs[name], modules=refs, slot_id=slot_id, script_env=env,
                    work_dir=root)

    def _heartbeats(self) -> None:
        """Every half heartbeat renew the stage's slot and all its leases; every quarter
        heartbeat recover expired leases anywhere (as every launcher does)."""
        tick = 0
        while not self.ended.wait(self.hb / 4):
            tick += 1
            try:
                if tick % 2 == 0:
                    self.db(self.q.heartbeat, self.plan.slot_id, status="RUNNING", lease_seconds=lease_for(self.hb))
                    if self.db(self.q.app_cancelled, self.plan.app_id):
                        self.cancelled.set()
                        self.stop.set()
                recovered = self.db(self.q.recover_expired)
            except Exception as exc:  # the heartbeat thread never dies: it logs and beats again
                logger.warning("MPI stage heartbeat failed, will retry: %s", exc)
                continue
            for task_id, st in recovered:
                logger.warning("task %s: lease expired, now %s", task_id, "READY" if st == -1 else st,
                               extra={"action": "lease_expired", "task_id": task_id, "status": st})

    def _claim(self, limit: int) -> list[Task]:
        try:
            tasks = self.db(
                self.q.claim, self.plan.app_id, self.plan.ref.id, host=self.host, slot_id=self.plan.slot_id,
                slot_seq=0, limit=limit, lease_seconds=lease_for(self.hb), semaphore=self.plan.spec.arguments.semaphore,
            )
        except DatabaseError as exc:
            logger.warning("MPI stage: claim failed, will retry: %s", exc)
            return []
        return cast(list[Task], tasks)

    def _idle_verdict(self, idle_polls: int) -> tuple[bool, int]:
        """(end now?, idle polls) after an empty claim with nothing running: as a slot decides."""
        args = self.plan.spec.arguments
        try:
            status, active = self.db(self.q.module_activity, self.plan.app_id, self.plan.ref.id)
        except DatabaseError:
            return False, idle_polls
        if status == "FINISHED":
            return True, idle_polls
        idle_polls = 0 if active or status != "RUNNING" else idle_polls + 1
        if idle_polls < args.max_idle_polls or args.always_running:
            return False, idle_polls
        if not self.db(self.hooks.may_idle_exit):
            return False, 0  # kept up as one of the module's min_jobs: ask again after another timeout
        return True, idle_polls

    def _tick(self, now: float) -> None:
        """Every HOOK_SECONDS: drain when the stage job says so (walltime, `scalebox stage stop`)."""
        if now < self.next_tick or self.stop.is_set():
            return
        self.next_tick = now + HOOK_SECONDS
        if self.db(self.hooks.tick):
            logger.warning("MPI stage: the stage job drains")
            self.stop.set()

    def _leaving(self) -> None:
        self.db(self.hooks.leaving)

    def _record(self, finished: list[Finished]) -> None:
        """Release aborted tasks; record the others (and their messages) in one transaction."""
        rules = self.plan.spec.parameters.retry_rules
        release = [f.task.id for f in finished if f.result is None]
        items = [
            Completion(task=f.task, result=f.result, host=f.host, requeue=TaskStatus.is_failure(f.result.status)
                       and f.task.tries <= extra_attempts(rules, f.result.status))
            for f in finished if f.result is not None
        ]
        delay = 0.5
        while True:
            try:
                if release:
                    self.db(self.q.release_ids, self.plan.slot_id, release)
                    release = []
                written = self.db(self.q.complete_many, items, slot_id=self.plan.slot_id, sender=self.plan.ref,
                                  modules=self.plan.modules) if items else []
                break
            except DatabaseError as exc:
                if self.cancelled.is_set():
                    logger.error("MPI stage: %d results not recorded before shutdown: %s", len(items), exc)
                    return
                logger.warning("MPI stage: recording failed, retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(30.0, delay * 2)
        for item, w in zip(items, written, strict=True):
            if w is None:
                logger.warning("task %s: lease lost, result discarded (the task was recovered)", item.task.id,
                               extra={"action": "lease_lost", "task_id": item.task.id, "host": self.host})
            else:
                self.tasks_done += 1

    # -- farm ---------------------------------------------------------------------------------------
    def _gate(self) -> Slot | None:
        """Rank 0's gate keeper when the module has check.sh or disk gates: they run on rank 0
        (its node, its work dir) before every claim of a batch, as a slot runs them before its claim."""
        spec = self.plan.spec
        args = spec.arguments
        if spec.script("check.sh") is None and args.free_space_gb is None and not args.dir_limit_gb:
            return None
        return Slot(_context(self.plan, self.config, 0, self.runtime), cast(TaskQueue, _NoDatabase()))

    def _gate_open(self, gate: Slot | None) -> bool:
        if gate is None:
            return True
        try:
            return gate.gate_open()
        except ScaleboxError as exc:
            logger.warning("MPI stage: check.sh could not run, not claiming: %s", exc)
            return False

    def _farm(self) -> int:
        gate = self._gate()
        try:
            return self._farm_loop(gate)
        finally:
            if gate is not None:
                gate.close()

    def _farm_loop(self, gate: Slot | None) -> int:
        spec = self.plan.spec
        workers = self.size - 1
        disp = Dispatcher(batch=spec.mpi.batch or workers, hang_seconds=lease_for(self.hb))
        starting = set(range(1, self.size))
        idle_polls, next_poll = 0, 0.0
        drain_deadline: float | None = None
        abort_sent = False
        finished = False
        while True:
            now = time.monotonic()
            self._tick(now)
            heard = self._poll(disp, starting, now)
            lost = disp.hung(now)
            if lost:
                return self._lost(disp, lost)
            if not starting and not disp.idle and not disp.running:
                raise MpiError("no worker rank could start (setup.sh failed on every rank)")
            if self.stop.is_set() and drain_deadline is None:
                drain_deadline = now + (0.0 if self.cancelled.is_set() else self.config.grace)
                tasks = disp.take_pending()
                self._record([Finished(0, t, None, self.host) for t in tasks])
                logger.warning("MPI stage draining: %d undistributed tasks released, %d running",
                               len(tasks), len(disp.running))
                self._leaving()  # a replacement can queue while the running tasks finish
            if drain_deadline is not None and now >= drain_deadline and disp.running and not abort_sent:
                for rank in disp.running:
                    self.comm.send(ABORT, dest=rank, tag=TAG_CTRL)
                abort_sent = True
            if drain_deadline is None and now >= next_poll:
                want = disp.claim_size()
                if want and not self._gate_open(gate):  # check.sh / disk gates say "not now"
                    want, next_poll = 0, now + spec.arguments.sleep_interval_seconds
                if want:
                    tasks = self._claim(want)
                    disp.add(tasks)
                    if tasks:
                        idle_polls = 0
                    else:
                        next_poll = now + spec.arguments.sleep_interval_seconds
                        if disp.quiet() and not starting:
                            finished, idle_polls = self._idle_verdict(idle_polls)
            for job in disp.assign(now):
                self.comm.send(job.task, dest=job.rank, tag=TAG_TASK)
            if disp.flush_due(now):
                self._record(disp.take_done())
            if (finished or drain_deadline is not None) and disp.quiet() and not disp.done:
                break
            if not heard:
                time.sleep(POLL_SECONDS)
        for rank in range(1, self.size):
            self.comm.send(STOP, dest=rank, tag=TAG_CTRL)
        return 0

    def _poll(self, disp: Dispatcher, starting: set[int], now: float) -> bool:
        """Take every message waiting from the workers; True when there was any."""
        mpi_ = mpi.load_mpi()
        status = mpi_.Status()
        heard = False
        while self.comm.Iprobe(source=mpi_.ANY_SOURCE, tag=mpi_.ANY_TAG, status=status):
            src, tag = status.Get_source(), status.Get_tag()
            msg = self.comm.recv(source=src, tag=tag)
            heard = True
            if tag == TAG_READY:
                starting.discard(src)
                if msg:
                    disp.ready(src)
                else:
                    logger.error("MPI stage: rank %s: setup.sh failed; it runs no tasks", src)
            elif tag == TAG_RESULT:
                task_id, result, host = msg
                disp.finish(src, task_id, result, host, now)
            elif tag == TAG_PING:
                disp.seen(src, now)
        return heard

    def _lost(self, disp: Dispatcher, ranks: list[int]) -> int:
        """A rank died or hangs: record what finished, release what was not handed out, leave
        the lost ranks' tasks to lease expiry, and end the stage."""
        left = [t for t in (disp.lose(r) for r in ranks) if t is not None]
        self.lost_message = (f"rank(s) {', '.join(map(str, ranks))} silent for {disp.hang_seconds:.0f}s; "
                             f"task(s) {', '.join(str(t.id) for t in left)} left to lease expiry")
        logger.error("MPI stage: %s", self.lost_message)
        pending = disp.take_pending()
        self._record(disp.take_done() + [Finished(0, t, None, self.host) for t in pending])
        for rank in list(disp.running):
            self.comm.send(ABORT, dest=rank, tag=TAG_CTRL)
        deadline = time.monotonic() + 5.0
        while disp.running and time.monotonic() < deadline:
            if not self._poll(disp, set(), time.monotonic()):
                time.sleep(0.01)
        self._record(disp.take_done())
        self.stop.set()
        self.ended.set()  # no more heartbeats: the lost tasks' leases run out
        return EXIT_LOST_RANK

    # -- collective ---------------------------------------------------------------------------------
    def _collective(self) -> None:
        spec = self.plan.spec
        handler = mpi.load_handler(cast(str, spec.mpi.handler), spec.code_path)
        ctx = _prepare_rank(self.plan, self.config, 0)
        idle_polls = 0
        while True:
            self._tick(time.monotonic())
            if self.stop.is_set():
                break
            tasks = self._claim(spec.mpi.batch or 1)
            if not tasks:
                end, idle_polls = self._idle_verdict(idle_polls)
                if end:
                    break
                self.stop.wait(spec.arguments.sleep_interval_seconds)
                continue
            idle_polls = 0
            done: list[Finished] = []
            for n, task in enumerate(tasks):
                if self.stop.is_set():
                    done += [Finished(0, t, None, self.host) for t in tasks[n:]]
                    break
                _announce(self.comm, ("task", task))
                done.append(Finished(0, task, self._collective_task(handler, task, ctx), self.host))
            self._record(done)
        _announce(self.comm, (STOP, None))

    def _collective_task(self, handler: mpi.Handler, task: Task, ctx: SlotContext) -> TaskResult:
        limit = self.plan.spec.arguments.task_max_seconds
        timer = None
        if limit is not None:  # a collective cannot kill one rank: the whole stage ends, the lease recovers
            timer = threading.Timer(limit, self._collective_timeout, args=(task.id, limit))
            timer.daemon = True
            timer.start()
        try:
            started = datetime.now(UTC)
            own = _run_handler(handler, self.comm, task, self.plan, ctx)
            outcomes = self.comm.gather((own[0], own[2]), root=0)
        finally:
            if timer is not None:
                timer.cancel()
        status, stdout, stderr, messages, finish_text = own
        for rank, (st, err) in enumerate(outcomes):
            if rank and st != 0:
                stderr += f"scalebox: rank {rank} ended with status {st}\n{err}"
                status = status or st
        sent = [
            Message(body=m.body, module=m.module, headers=headers_for(
                m.headers, from_module=self.plan.spec.name, from_host=self.host, from_slot=0))
            for m in messages
        ] if status == 0 else []
        return TaskResult(status=status, started_at=started, finished_at=datetime.now(UTC), stdout=stdout,
                          stderr=stderr, messages=sent, finish_text=finish_text if status == 0 else None)

    def _collective_timeout(self, task_id: int, limit: float) -> None:
        logger.error("task %s: over task_max_seconds (%ss) in a collective stage; aborting the MPI job "
                     "(the task comes back by lease expiry)", task_id, limit,
                     extra={"action": "collective_timeout", "task_id": task_id, "task_max_seconds": limit})
        self.comm.Abort(TaskStatus.TIMEOUT)


# -- worker ranks ---------------------------------------------------------------------------------
class _FarmWorker:
    """Ranks 1..N-1 of a farm: run.sh for every task rank 0 sends, exactly as a slot would."""

    def __init__(self, comm: Any, plan: Plan, config: StageConfig, runtime: ContainerRuntime) -> None:
        self.comm = comm
        self.ctx = _context(plan, config, int(comm.Get_rank()), runtime)
        self.slot = Slot(self.ctx, cast(TaskQueue, _NoDatabase()))
        self.slot.slot_id = plan.slot_id
        self.ping_every = min(1.0, plan.spec.arguments.heartbeat_seconds / 4)

    def run(self) -> int:
        ok = self.slot.setup()
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
            self.slot.teardown()
        return 0

    def _execute(self, task: Task) -> TaskResult | None:
        """Run the task in a thread; meanwhile ping rank 0 and listen for an abort."""
        box: list[TaskResult | None] = []
        runner = threading.Thread(target=lambda: box.append(self._safe(task)), name="task", daemon=True)
        runner.start()
        status = mpi.load_mpi().Status()
        last_ping = time.monotonic()
        while runner.is_alive():
            runner.join(0.02)
            if self.comm.Iprobe(source=0, tag=TAG_CTRL, status=status) and \
                    self.comm.recv(source=0, tag=TAG_CTRL) == ABORT:
                self.ctx.control.abort.set()
            if time.monotonic() - last_ping >= self.ping_every:
                self.comm.send(task.id, dest=0, tag=TAG_PING)
                last_ping = time.monotonic()
        return box[0] if box else None

    def _safe(self, task: Task) -> TaskResult | None:
        try:
            return self.slot.execute(task)
        except ScaleboxError as exc:  # could not start run.sh at all
            now = datetime.now(UTC)
            return TaskResult(status=TaskStatus.SYSTEM_ERROR, started_at=now, finished_at=now,
                              stderr=f"scalebox: {exc}\n")


def _prepare_rank(plan: Plan, config: StageConfig, rank: int) -> SlotContext:
    """A collective rank's work dir (its cwd) and environment (the module's, as run.sh gets it)."""
    ctx = _context(plan, config, rank, cast(ContainerRuntime, None))
    ensure_private(ctx.work_dir)
    os.chdir(ctx.work_dir)
    os.environ.update(_handler_env(plan, ctx))
    return ctx


def _handler_env(plan: Plan, ctx: SlotContext) -> dict[str, str]:
    env = {**plan.spec.arguments.as_env(), **plan.spec.environments}
    env.update({"APP_ID": str(plan.app_id), "MODULE_NAME": plan.spec.name, "WORK_DIR": str(ctx.work_dir),
                "HOST": ctx.host, "SLOT_SEQ": str(ctx.seq)})
    return env


def _collective_worker(comm: Any, plan: Plan, config: StageConfig, stop: threading.Event) -> int:
    handler = mpi.load_handler(cast(str, plan.spec.mpi.handler), plan.spec.code_path)
    ctx = _prepare_rank(plan, config, int(comm.Get_rank()))
    while True:
        kind, task = _wait_bcast(comm)
        if kind == STOP:
            return 0
        own = _run_handler(handler, comm, task, plan, ctx)
        comm.gather((own[0], own[2]), root=0)


def _run_handler(
    handler: mpi.Handler, comm: Any, task: Task, plan: Plan, ctx: SlotContext,
) -> tuple[int, str, str, list[Message], str | None]:
    """(status, stdout, stderr, messages, finish text) of the handler on this rank."""
    current = mpi.MpiTask(comm=comm, task_id=task.id, body=task.body, headers=dict(task.headers),
                          module=plan.spec.name, work_dir=ctx.work_dir, env=_handler_env(plan, ctx))
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
    return status, out.getvalue(), err.getvalue(), current.messages, current.finish_text
