"""Rank 0 of an MPI stage: the stage's only database user. It registers one slot for the stage,
claims under its id, heart-beats (renewing every lease of the stage) and recovers expired
leases from a thread, hands tasks to the worker ranks (farm) or announces them to all
(collective), and records the results in batches, with the rules every slot applies
(:mod:`scalebox_hpc.launcher.runner`)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from scalebox_hpc import mpi
from scalebox_hpc.errors import DatabaseError, MpiError, ScaleboxError
from scalebox_hpc.launcher.launcher import host_name
from scalebox_hpc.launcher.mpi_dispatch import Dispatcher, Finished
from scalebox_hpc.launcher.mpi_ranks import prepare_rank, run_handler, serve_farm_task
from scalebox_hpc.launcher.mpi_wire import (
    ABORT,
    EXIT_LOST_RANK,
    HOOK_SECONDS,
    POLL_SECONDS,
    STOP,
    TAG_CTRL,
    TAG_PING,
    TAG_READY,
    TAG_RESULT,
    TAG_TASK,
    Plan,
    QueueOpener,
    StageConfig,
    announce,
    rank_context,
)
from scalebox_hpc.launcher.ports import BatchQueue, NoStageHooks, StageHooks
from scalebox_hpc.launcher.runner import (
    Backoff,
    HeartbeatLoop,
    IdlePolicy,
    SlotContext,
    TaskRunner,
    lease_for,
    rank_work_dir,
    should_requeue,
    stamp_messages,
)
from scalebox_hpc.launcher.workdirs import claim_app_dir
from scalebox_hpc.models import (
    BUSY_GIVE_UP_SECONDS,
    BUSY_RETRY_SECONDS,
    HAND_OFF_BUSY,
    Completion,
    Task,
    TaskResult,
    TaskStatus,
)
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.base import ContainerRuntime
from scalebox_hpc.runtime.svcdir import RequestDir

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class FarmState:
    """What the farm loop carries from one step to the next."""

    starting: set[int]
    """Worker ranks that have not said whether their setup.sh went well."""
    idle: IdlePolicy
    next_poll: float = 0.0
    drain_deadline: float | None = None
    abort_sent: bool = False
    finished: bool = False
    heard: bool = False
    lost: list[int] = field(default_factory=list)


class Master:
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
        self.lost_message = ""
        self.served: dict[int, RequestDir] = {}
        """The request directories of the farm's running tasks, by task id."""

    # database calls, serialised with the heartbeat thread (one connection)
    def db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)`` under the connection's lock."""
        with self.lock:
            return fn(*args, **kw)

    def run(self) -> int:
        """The stage's life on rank 0; returns the exit code (MPI_Abort when not 0)."""
        try:
            plan = self._plan()
        except ScaleboxError as exc:
            announce(self.comm, ("error", str(exc)))
            raise
        announce(self.comm, ("ok", plan))
        self.plan = plan
        self.hb = plan.spec.arguments.heartbeat_seconds
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
        """The stage's queue handle (open once :meth:`run` planned)."""
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
        work = rank_work_dir(root, name, self.host, "rank0")
        slot_id = self.q.create_slot(refs[name].id, host=self.host, seq=0, pid=os.getpid(), work_dir=str(work),
                                     heartbeat_seconds=spec.arguments.heartbeat_seconds)
        self.q.set_slot_status(slot_id, "RUNNING")
        env = {**extra_env, **self.config.script_env}
        return Plan(app_id=app_id, spec=spec, ref=refs[name], modules=refs, slot_id=slot_id, script_env=env,
                    work_dir=root)

    def _heartbeats(self) -> None:
        """The stage's one slot and all its leases, renewed as a launcher renews its slots'."""
        HeartbeatLoop(
            beat=lambda: self.db(self.q.heartbeat, self.plan.slot_id, status="RUNNING",
                                 lease_seconds=lease_for(self.hb)),
            cancelled=lambda: self.db(self.q.app_cancelled, self.plan.app_id), on_cancel=self._on_cancel,
            recover=lambda every: self.db(self.q.recover_expired, every=every), heartbeat_seconds=self.hb,
            lease_seconds=lease_for(self.hb), who="MPI stage heartbeat",
        ).run(self.ended.wait)

    def _on_cancel(self) -> None:
        self.cancelled.set()
        self.stop.set()

    def _claim(self, limit: int) -> list[Task]:
        try:
            return self.db(
                self.q.claim, self.plan.app_id, self.plan.ref.id, host=self.host, slot_id=self.plan.slot_id,
                slot_seq=0, limit=limit, lease_seconds=lease_for(self.hb), semaphore=self.plan.spec.arguments.semaphore,
            )
        except DatabaseError as exc:
            logger.warning("MPI stage: claim failed, will retry: %s", exc)
            return []

    def _idle_verdict(self, idle: IdlePolicy) -> bool:
        """After an empty claim with nothing running: end now? (as a slot decides)."""
        try:
            status, active = self.db(self.q.module_activity, self.plan.app_id, self.plan.ref.id)
        except DatabaseError:
            return False
        return idle.after_empty_poll(status, active, lambda: self.db(self.hooks.may_idle_exit)) != "stay"

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
        """Release aborted tasks; record the others (and their messages) in one transaction;
        while the database is away, back off and retry (until the app is cancelled). Items
        whose row another transaction held (HAND_OFF_BUSY) are tried again shortly."""
        rules = self.plan.spec.parameters.retry_rules
        release = [f.task.id for f in finished if f.result is None]
        items = [
            Completion(task=f.task, result=f.result, host=f.host,
                       requeue=should_requeue(rules, f.result.status, f.task.tries))
            for f in finished if f.result is not None
        ]
        backoff = Backoff(time.sleep, who="MPI stage: recording")
        busy_since: float | None = None
        while True:
            try:
                if release:  # the busy ones are released again
                    release = list(self.db(self.q.release_ids, self.plan.slot_id, release).busy)
                if items:  # the busy ones are recorded again
                    items = self._recorded(items, self.db(self.q.complete_many, items, slot_id=self.plan.slot_id,
                                                          sender=self.plan.ref, modules=self.plan.modules))
            except DatabaseError as exc:
                if self.cancelled.is_set():
                    logger.error("MPI stage: %d results not recorded before shutdown: %s", len(items), exc)
                    return
                backoff.failed(exc)
                continue
            if not items and not release:
                return
            busy_since = time.monotonic() if busy_since is None else busy_since
            if time.monotonic() - busy_since >= BUSY_GIVE_UP_SECONDS or self.cancelled.is_set():
                logger.warning("MPI stage: %d results and %d releases given up, their rows held by another "
                               "transaction", len(items), len(release))
                return
            time.sleep(BUSY_RETRY_SECONDS)

    def _recorded(self, items: list[Completion], written: list[int | None]) -> list[Completion]:
        """Count what a batch hand-off recorded, log the lost leases; returns the busy items."""
        busy = []
        for item, w in zip(items, written, strict=True):
            if w == HAND_OFF_BUSY:
                busy.append(item)
            elif w is None:
                logger.warning("task %s: lease lost, result discarded (the task was recovered)", item.task.id,
                               extra={"action": "lease_lost", "task_id": item.task.id, "host": self.host})
            else:
                self.tasks_done += 1
        return busy

    # -- farm ---------------------------------------------------------------------------------------
    def _gate(self) -> TaskRunner | None:
        """Rank 0's gate keeper when the module has check.sh or disk gates: they run on rank 0
        (its node, its work dir) before every claim of a batch, as a slot runs them before its claim."""
        spec = self.plan.spec
        args = spec.arguments
        if spec.script("check.sh") is None and args.free_space_gb is None and not args.dir_limit_gb:
            return None
        return TaskRunner(rank_context(self.plan, 0, self.runtime), slot_id=self.plan.slot_id)

    def _gate_open(self, gate: TaskRunner | None) -> bool:
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
            for task_id in list(self.served):
                self._unserve(task_id)
            if gate is not None:
                gate.close()

    def _ask(self, request: Any) -> Any:
        """A task's semaphore or variable call, answered with the stage's connection."""
        return self.db(self.q.task_service, self.plan.app_id, request)

    def _hand_out(self, rank: int, task: Task) -> None:
        """Send ``task`` to worker rank ``rank``, its request directory served first (so its
        run.sh finds the directory at once)."""
        try:
            self.served[task.id] = serve_farm_task(self.plan, rank, task.id, self._ask)
        except (OSError, ScaleboxError) as exc:  # the task runs; its service calls get the helper's error
            logger.warning("task %s: no request directory for its semaphores and variables: %s", task.id, exc,
                           extra={"action": "svcdir_failed", "task_id": task.id, "rank": rank})
        self.comm.send(task, dest=rank, tag=TAG_TASK)

    def _unserve(self, task_id: int) -> None:
        """The task's result came back (or its rank is lost): stop its request directory, once
        the calls in flight are answered, and remove it."""
        served = self.served.pop(task_id, None)
        if served is not None:
            served.stop()

    def _farm_loop(self, gate: TaskRunner | None) -> int:
        """tick → poll → check lost → start drain → abort overdue → claim → dispatch → flush → done?"""
        disp = Dispatcher(batch=self.plan.spec.mpi.batch or self.size - 1, hang_seconds=lease_for(self.hb))
        st = FarmState(starting=set(range(1, self.size)), idle=IdlePolicy.of(self.plan.spec))
        while True:
            now = time.monotonic()
            self._tick(now)
            st.heard = self._poll(disp, st.starting, now)
            lost = disp.hung(now)
            if lost:
                return self._lost(disp, lost)
            if not st.starting and not disp.idle and not disp.running:
                raise MpiError("no worker rank could start (setup.sh failed on every rank)")
            self._start_drain(disp, st, now)
            self._abort_overdue(disp, st, now)
            self._maybe_claim(disp, st, gate, now)
            for job in disp.assign(now):
                self._hand_out(job.rank, job.task)
            if disp.flush_due(now):
                self._record(disp.take_done())
            if (st.finished or st.drain_deadline is not None) and disp.quiet() and not disp.done:
                break
            if not st.heard:
                time.sleep(POLL_SECONDS)
        for rank in range(1, self.size):
            self.comm.send(STOP, dest=rank, tag=TAG_CTRL)
        return 0

    def _start_drain(self, disp: Dispatcher, st: FarmState, now: float) -> None:
        """On a stop: release what was not handed out, give the running tasks the grace."""
        if not self.stop.is_set() or st.drain_deadline is not None:
            return
        st.drain_deadline = now + (0.0 if self.cancelled.is_set() else self.config.grace)
        tasks = disp.take_pending()
        self._record([Finished(0, t, None, self.host) for t in tasks])
        logger.warning("MPI stage draining: %d undistributed tasks released, %d running",
                       len(tasks), len(disp.running))
        self._leaving()  # a replacement can queue while the running tasks finish

    def _abort_overdue(self, disp: Dispatcher, st: FarmState, now: float) -> None:
        """The drain's grace is over: tell every rank still running a task to kill it."""
        if st.drain_deadline is not None and now >= st.drain_deadline and disp.running and not st.abort_sent:
            for rank in disp.running:
                self.comm.send(ABORT, dest=rank, tag=TAG_CTRL)
            st.abort_sent = True

    def _maybe_claim(self, disp: Dispatcher, st: FarmState, gate: TaskRunner | None, now: float) -> None:
        """Claim for the idle ranks (the gates allowing), or judge idleness after an empty claim."""
        if st.drain_deadline is not None or now < st.next_poll:
            return
        pause = self.plan.spec.arguments.sleep_interval_seconds
        want = disp.claim_size()
        if want and not self._gate_open(gate):  # check.sh / disk gates say "not now"
            want, st.next_poll = 0, now + pause
        if not want:
            return
        tasks = self._claim(want)
        disp.add(tasks)
        if tasks:
            st.idle.busy()
            return
        st.next_poll = now + pause
        if disp.quiet() and not st.starting:
            st.finished = self._idle_verdict(st.idle)

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
                self._unserve(task_id)
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
        ctx = prepare_rank(self.plan, 0, self.runtime)
        idle = IdlePolicy.of(spec)
        while True:
            self._tick(time.monotonic())
            if self.stop.is_set():
                break
            tasks = self._claim(spec.mpi.batch or 1)
            if not tasks:
                if self._idle_verdict(idle):
                    break
                self.stop.wait(spec.arguments.sleep_interval_seconds)
                continue
            idle.busy()
            done: list[Finished] = []
            for n, task in enumerate(tasks):
                if self.stop.is_set():
                    done += [Finished(0, t, None, self.host) for t in tasks[n:]]
                    break
                announce(self.comm, ("task", task))
                done.append(Finished(0, task, self._collective_task(handler, task, ctx), self.host))
            self._record(done)
        announce(self.comm, (STOP, None))

    def _collective_task(self, handler: mpi.Handler, task: Task, ctx: SlotContext) -> TaskResult:
        limit = self.plan.spec.arguments.task_max_seconds
        timer = None
        if limit is not None:  # a collective cannot kill one rank: the whole stage ends, the lease recovers
            timer = threading.Timer(limit, self._collective_timeout, args=(task.id, limit))
            timer.daemon = True
            timer.start()
        try:
            started = datetime.now(UTC)
            own = run_handler(handler, self.comm, task, self.plan, ctx,
                              ask=lambda req: self.db(self.q.task_service, self.plan.app_id, req))
            outcomes = self.comm.gather((own[0], own[2]), root=0)
        finally:
            if timer is not None:
                timer.cancel()
        status, stdout, stderr, messages, finish_text = own
        for rank, (st, err) in enumerate(outcomes):
            if rank and st != 0:
                stderr += f"scalebox: rank {rank} ended with status {st}\n{err}"
                status = status or st
        sent, problems = (stamp_messages(messages, module=self.plan.spec.name, host=self.host, seq=0)
                          if status == 0 else ([], []))
        if problems:
            stderr += "".join(f"scalebox: {p}\n" for p in problems)
            status = TaskStatus.EMIT_FAILED
        return TaskResult(status=status, started_at=started, finished_at=datetime.now(UTC), stdout=stdout,
                          stderr=stderr, messages=sent, finish_text=finish_text if status == 0 else None)

    def _collective_timeout(self, task_id: int, limit: float) -> None:
        logger.error("task %s: over task_max_seconds (%ss) in a collective stage; aborting the MPI job "
                     "(the task comes back by lease expiry)", task_id, limit,
                     extra={"action": "collective_timeout", "task_id": task_id, "task_max_seconds": limit})
        self.comm.Abort(TaskStatus.TIMEOUT)
