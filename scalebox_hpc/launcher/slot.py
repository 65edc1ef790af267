"""One slot: Scalebox's agent loop for one worker of a module on this host.

setup.sh once → loop { check.sh → claim → run.sh → record + hand-off } → teardown.sh.
The slot's work dir persists across its tasks and is the cwd of every script. Running a task
(scripts, env, timeout, task-exec files) is :class:`~scalebox_hpc.launcher.runner.TaskRunner`'s;
a slot claims around it and records what it returns.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from scalebox_hpc.errors import DatabaseError, ScaleboxError, SlotError
from scalebox_hpc.launcher import scratch
from scalebox_hpc.launcher.outputs import CappedOutputs
from scalebox_hpc.launcher.ports import Clock, HandsOff, TaskQueue
from scalebox_hpc.launcher.runner import (
    HELPER_BIN,
    MAX_HANDOFF_BYTES,
    SCRIPT_SAID_CHARS,
    Backoff,
    IdlePolicy,
    SlotContext,
    SlotControl,
    TaskRunner,
    lease_for,
    outage_backoff,
    script_said,
    session_spec,
    should_requeue,
)
from scalebox_hpc.models import LeaseLostError, ModuleRef, Task, TaskResult, TaskStatus, unrecordable
from scalebox_hpc.runtime.base import Session

logger = logging.getLogger(__name__)

__all__ = [
    "CRASH_LOOP_LIMIT", "HELPER_BIN", "MAX_HANDOFF_BYTES", "SCRIPT_SAID_CHARS", "Slot", "SlotContext",
    "SlotControl", "lease_for", "outage_backoff", "script_said", "session_spec",
]

CRASH_LOOP_LIMIT = 5
"""Consecutive runs that died (signal, unstartable) after which a slot goes to ERROR."""
BATCH_TASKS = 64
"""At most this many tasks a slot runs as one batch: the task it claimed and those prefetched
for it (the dispatcher keeps about 0.1 s of work prefetched, and a batch takes half of it). A
Python handler gets them in one message; run.sh runs them one by one, and their results are
handed over together (one statement instead of one per task or two)."""


@runtime_checkable
class Batches(Protocol):
    """A queue that hands a slot its prefetched tasks at once and records their results in
    one batch (the node's dispatcher): a Python handler's slot runs them as one batch."""

    def take_more(self, app_id: int, module_id: int, *, host: str, slot_id: int, slot_seq: int, limit: int,
                  lease_seconds: float = 30.0) -> list[Task]: ...

    def hand_off_many(
        self, items: Sequence[tuple[Task, TaskResult, bool, Callable[[int], bool]]], *, slot_id: int, host: str,
        sender: ModuleRef, modules: dict[str, ModuleRef], seconds: float | None = None,
    ) -> None: ...


class Slot:
    """Runs one slot's loop in the calling thread: claim → :class:`TaskRunner` → record.

    ``clock``: a test's clock (``scalebox_hpc.testing.FakeClock``) that the waits of a database
    outage sleep on instead of real time; without one (the launcher) they wait on the slot's
    wake-ups, which a drain (``notify_all``) ends at once."""

    def __init__(self, ctx: SlotContext, queue: TaskQueue, *, clock: Clock | None = None) -> None:
        self.ctx = ctx
        self.queue = queue
        self.clock = clock
        self.runner = TaskRunner(ctx)
        self.tasks_done = 0
        self.current: Task | None = None
        self.crashes = 0
        self.running = False
        self.private = self.runner.private
        self.final_status: str | None = None
        """How the slot ended (EXITED, ERROR), once it has."""
        self.backoff = Backoff(self._wait_outage, who=f"slot {ctx.module.name}/{ctx.seq}")
        # batches: the prefetched tasks, through a dispatcher, with no semaphore to take per task
        # (a slot that decides before each claim, check.sh or a disk gate, has no prefetch)
        self._batches = queue if (isinstance(queue, Batches) and ctx.module.arguments.semaphore is None) else None
        self._scripts = ctx.module.handler is None
        """run.sh tasks: a batch runs them one by one, stops at a drain, and hands over at once
        the results that emitted messages (the modules downstream wait for those)."""

    # the runner's state, as the launcher's heartbeat and the tests see it
    @property
    def slot_id(self) -> int:
        """The slot's row id (0 until registered)."""
        return self.runner.slot_id

    @slot_id.setter
    def slot_id(self, value: int) -> None:
        self.runner.slot_id = value

    @property
    def session(self) -> Session | None:
        """The slot's runtime session, once open."""
        return self.runner.session

    @session.setter
    def session(self, value: Session | None) -> None:
        self.runner.session = value

    @property
    def waiting(self) -> str | None:
        """Why the slot claims nothing now (a gate closed); the heartbeat stores it in its row."""
        return self.runner.waiting

    @property
    def outputs(self) -> CappedOutputs:
        """The output files of the run going on (or that just ended)."""
        return self.runner.outputs

    @property
    def db_failures(self) -> int:
        """Consecutive failed database calls (the outage backoff's count)."""
        return self.backoff.failures

    @property
    def lease_seconds(self) -> float:
        """How long a claim stays valid without a heartbeat."""
        return lease_for(self.ctx.module.arguments.heartbeat_seconds)

    def live_output(self) -> dict[str, object] | None:
        """The live tail of the task running now (for the heartbeat), or None."""
        return self.runner.live_output()

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> None:
        """The whole life of the slot; never raises (errors end the slot with status ERROR)."""
        ctx = self.ctx
        try:
            self.runner.open_dirs()
            self.slot_id = self.queue.create_slot(
                ctx.ref.id, host=ctx.host, seq=ctx.seq, pid=os.getpid(), work_dir=str(ctx.work_dir),
                heartbeat_seconds=ctx.module.arguments.heartbeat_seconds,
            )
        except Exception as exc:
            logger.error("slot %s/%s could not register: %s", ctx.module.name, ctx.seq, exc)
            self.final_status = "ERROR"
            self.queue.close()
            return
        self.running = True
        status, message = "EXITED", None
        try:
            self.runner.open()
            failed = self.runner.setup_failure()
            if failed is not None:
                status, message = "ERROR", failed
                return
            self.queue.set_slot_status(self.slot_id, "READY")
            self._loop()
            self.runner.script("teardown.sh")
        except ScaleboxError as exc:
            status, message = "ERROR", str(exc)
            logger.error("slot %s/%s failed: %s", ctx.module.name, ctx.seq, exc)
        except Exception as exc:  # a bug of ours: the slot ends, said where the user looks
            status, message = "ERROR", f"internal error: {type(exc).__name__}: {exc}"
            logger.exception("slot %s/%s failed", ctx.module.name, ctx.seq)
        finally:
            self._finish(status, message)

    def _finish(self, status: str, message: str | None) -> None:
        self.running = False
        self.final_status = status
        self.runner.close()
        try:
            if self.current is not None:  # only a drain or an abort leaves a task unrecorded
                self.queue.release(self.slot_id)
            self.queue.set_slot_status(self.slot_id, status, message=message, tasks_done=self.tasks_done)
        except Exception as exc:
            logger.warning("slot %s: could not record its end: %s", self.slot_id, exc)
        finally:
            self.queue.close()

    def _loop(self) -> None:
        ctx = self.ctx
        idle = IdlePolicy.of(ctx.module)
        pause = ctx.module.arguments.sleep_interval_seconds
        while not ctx.control.draining.is_set():
            seen = ctx.wakeups.generation(ctx.ref.id)
            if not self.runner.gate_open():  # check.sh said "not now": wait, without counting as idle
                ctx.wakeups.wait(ctx.ref.id, seen, pause)
                continue
            try:
                task = self._claim()
            except DatabaseError as exc:  # outage: wait it out, without counting as idle
                self._backoff(exc)
                continue
            self.backoff.ok()
            if task is not None:
                idle.busy()
                more = self._take_more()
                if more:
                    self._process_many([task, *more])
                else:
                    self._process(task)
                continue
            status, active = self._activity()
            verdict = idle.after_empty_poll(status, active, ctx.control.may_idle_exit)
            if verdict == "idle":
                logger.info("slot %s/%s: idle, exiting", ctx.module.name, ctx.seq)
            if verdict != "stay":
                return
            ctx.wakeups.wait(ctx.ref.id, seen, pause)

    def _claim(self) -> Task | None:
        tasks = self.queue.claim(
            self.ctx.app_id, self.ctx.ref.id, host=self.ctx.host, slot_id=self.slot_id,
            slot_seq=self.ctx.seq, limit=1, lease_seconds=self.lease_seconds,
            semaphore=self.ctx.module.arguments.semaphore,
        )
        return tasks[0] if tasks else None

    def _take_more(self) -> list[Task]:
        """The tasks prefetched for this slot, to run with the one it claimed (handlers only)."""
        if self._batches is None:
            return []
        return self._batches.take_more(self.ctx.app_id, self.ctx.ref.id, host=self.ctx.host, slot_id=self.slot_id,
                                       slot_seq=self.ctx.seq, limit=BATCH_TASKS - 1,
                                       lease_seconds=self.lease_seconds)

    def _backoff(self, exc: Exception) -> None:
        """Sleep 0.5 s, 1 s, 2 s ... up to 30 s between tries while the database is away."""
        self.backoff.failed(exc)

    def _wait_outage(self, delay: float) -> None:
        if self.clock is not None:
            self.clock.sleep(delay)
            return
        seen = self.ctx.wakeups.generation(-2)
        self.ctx.wakeups.wait(-2, seen, delay)  # -2: a channel nobody notifies; notify_all ends it

    def _activity(self) -> tuple[str, bool]:
        """(app status, active): active while the module or one upstream of it has work."""
        try:
            return self.queue.module_activity(self.ctx.app_id, self.ctx.ref.id)
        except DatabaseError as exc:
            logger.warning("cannot read the app's state, will retry: %s", exc)
            return "RUNNING", True

    # -- for runners without a queue (kept: the runner does it) ---------------------------------
    def setup(self) -> bool:
        """Run setup.sh in the work dir; False when it failed."""
        return self.runner.setup()

    def gate_open(self) -> bool:
        """The disk gates and check.sh, as before a claim: True when all say go."""
        return self.runner.gate_open()

    def close(self) -> None:
        """Close the runtime session, if open (no teardown.sh), and end the handler worker."""
        self.runner.close()

    def execute(self, task: Task) -> TaskResult | None:
        """:meth:`TaskRunner.execute`: one task into its result, without the database."""
        return self.runner.execute(task)

    def teardown(self) -> None:
        """Run teardown.sh (if any), then close the runtime session."""
        self.runner.teardown()

    # -- one task -------------------------------------------------------------------------------
    def _process(self, task: Task) -> None:
        self.current = task
        result = self.runner.execute(task)
        if result is None:  # aborted or drained: give the task back, the attempt not counted
            self.queue.release(self.slot_id)
            self.current = None
            return
        self._record(task, result, self._requeue(task, result.status))
        self.current = None
        if self.runner.fatal is not None:  # the slot cannot run anything (its container engine failed)
            raise self.runner.fatal
        self._watch_crashes(result.status)

    def _process_many(self, tasks: list[Task]) -> None:
        """Run a batch (one message to the handler's worker), then hand every result over in
        one batch of the dispatcher. Per task as :meth:`_process`: its retry decision, the
        crash-loop count; when one is aborted or drained, it and the rest go back (their
        attempts not counted) once the results before it are handed over."""
        assert self._batches is not None
        done: list[tuple[Task, TaskResult, bool]] = []
        started = time.monotonic()
        results = self.runner.execute_many(tasks)
        give_back = True  # unless every task of the batch ran to its result
        try:
            for n, task in enumerate(tasks):
                if self._scripts and n and self.ctx.control.draining.is_set():
                    return  # a drain: the tasks not started yet go back, as if never claimed
                self.current = task
                result = next(results, None)
                if result is None:  # aborted or drained
                    return
                done.append((task, result, self._requeue(task, result.status)))
                if self.runner.fatal is not None:  # the slot cannot run anything (its container engine failed)
                    raise self.runner.fatal
                self._watch_crashes(result.status)
                if self._scripts and result.messages:  # downstream waits for them: not until the batch's end
                    ready, done = done, []  # (emptied first: a failed hand-off is not tried again below)
                    now = time.monotonic()
                    self._hand_off_many(ready, now - started)
                    started = now
            give_back = False
        finally:
            results.close()
            self._hand_off_many(done, time.monotonic() - started)
            if give_back:
                self.queue.release(self.slot_id)
            self.current = None

    def _hand_off_many(self, done: list[tuple[Task, TaskResult, bool]], seconds: float) -> None:
        if not done:
            return
        assert self._batches is not None
        for _task, result, _requeue in done:
            self._index_outputs(result)
        self._batches.hand_off_many(
            [(task, result, requeue, self._requeue_rule(task)) for task, result, requeue in done],
            slot_id=self.slot_id, host=self.ctx.host, sender=self.ctx.ref, modules=self.ctx.modules, seconds=seconds)
        self.tasks_done += len(done)

    def _requeue_rule(self, task: Task) -> Callable[[int], bool]:
        return lambda status: self._requeue(task, status)

    def _requeue(self, task: Task, status: int) -> bool:
        """Whether the task's retry rules give a run that ended with ``status`` another attempt."""
        return should_requeue(self.ctx.module.parameters.retry_rules, status, task.tries)

    def _watch_crashes(self, status: int) -> None:
        """A slot whose runs keep dying (killed by a signal, or not startable) stops claiming."""
        died = status == TaskStatus.SYSTEM_ERROR or (128 < status < 160)
        self.crashes = self.crashes + 1 if died else 0
        if self.crashes >= CRASH_LOOP_LIMIT:
            raise SlotError(f"crash loop: the last {self.crashes} runs died (status {status})")

    def _record(self, task: Task, result: TaskResult, requeue: bool) -> None:
        """Hand the result off; while the database is away keep it and retry (a result is never
        dropped, unless the lease was lost meanwhile: then the task ran again elsewhere).
        Through the node's dispatcher this happens in the background, with the same rules."""
        self._index_outputs(result)
        if isinstance(self.queue, HandsOff):
            self.queue.hand_off(task, result, slot_id=self.slot_id, host=self.ctx.host, sender=self.ctx.ref,
                                modules=self.ctx.modules, requeue=requeue,
                                requeue_for=lambda status: self._requeue(task, status))
            self.tasks_done += 1
            return
        fallback = False  # the small -103 record that replaces a result the database refused
        while True:
            try:
                written = self.queue.complete(
                    task, result, slot_id=self.slot_id, host=self.ctx.host, sender=self.ctx.ref,
                    modules=self.ctx.modules, requeue=requeue,
                )
            except LeaseLostError:
                logger.warning("task %s: lease lost, result discarded (the task was recovered, or its "
                               "result was already recorded)", task.id)
                return
            except DatabaseError as exc:
                if self.ctx.control.abort.is_set():
                    logger.error("task %s: result not recorded before shutdown: %s", task.id, exc)
                    return
                self._backoff(exc)
                continue
            except Exception as exc:  # refused for good (too large, a bad value): record why instead
                if fallback:
                    logger.exception("task %s: not even its failure could be recorded; left to lease expiry",
                                     task.id)
                    return
                logger.warning("task %s: the database refused its result (%s); recorded as %d",
                               task.id, exc, TaskStatus.OUTPUT_INVALID)
                result = unrecordable(result, f"{type(exc).__name__}: {exc}")
                requeue = self._requeue(task, result.status)
                fallback = True
                continue
            self.backoff.ok()
            self.tasks_done += 1
            logger.debug("task %s: status %s, %s messages%s", task.id, result.status, written,
                         " (requeued)" if requeue else "")
            return

    def _index_outputs(self, result: TaskResult) -> None:
        """Files the run left in (or removed from) the node-local scratch go into the scratch
        index before the hand-off, so the follow-up tasks it emits prefer this host."""
        root = self.ctx.scratch
        if root is None or not (result.output_files or result.removed_files):
            return
        work = self.ctx.work_dir
        added = scratch.keys(self._on_host(result.output_files), root, work)
        removed = [key for key, _ in scratch.keys(self._on_host(result.removed_files), root, work)]
        try:
            self.queue.index_scratch(self.ctx.host, added, removed)
        except DatabaseError as exc:  # an optimisation only: the hand-off matters, this does not
            logger.warning("scratch index not updated: %s", exc)

    def _on_host(self, paths: list[str]) -> list[str]:
        """Reported paths as host paths: a container run's ``/local/x`` is the scratch root's
        ``x``, its ``/work/x`` the work dir's; paths only the container has are left out."""
        if self.session is None:
            return paths
        mapped = (self.session.host_path(p) for p in paths)
        return [p for p in mapped if p is not None]
