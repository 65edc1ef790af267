"""One slot: Scalebox's agent loop for one worker of a module on this host.

setup.sh once → loop { check.sh → claim → run.sh → record + hand-off } → teardown.sh.
The slot's work dir persists across its tasks and is the cwd of every script.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from scalebox_hpc import mpi
from scalebox_hpc.errors import ContainerError, DatabaseError, ScaleboxError, ScriptError, SlotError
from scalebox_hpc.launcher import livetail, mpirun, pyworker, scratch, taskexec
from scalebox_hpc.launcher.gates import closed_gate
from scalebox_hpc.launcher.outputs import CappedOutputs
from scalebox_hpc.launcher.ports import HandsOff, TaskQueue
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import (
    LeaseLostError,
    Message,
    ModuleRef,
    Task,
    TaskResult,
    TaskStatus,
    extra_attempts,
    headers_for,
    unrecordable,
)
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.base import ContainerRuntime, Outcome, Run, RunSpec, Session, SessionSpec
from scalebox_hpc.runtime.paths import ensure_private, open_regular

logger = logging.getLogger(__name__)

HELPER_BIN = Path(__file__).resolve().parent / "bin"
MAX_HANDOFF_BYTES = 64 * 2**20
"""Bodies and headers one task may emit in all: one hand-off is one transaction, and jsonb
values stop at 256 MB (over that PostgreSQL refuses the statement, for good)."""
CRASH_LOOP_LIMIT = 5
"""Consecutive runs that died (signal, unstartable) after which a slot goes to ERROR."""
SCRIPT_SAID_CHARS = 300
"""What a slot's message quotes of a failed script's stderr (its last lines), at most."""


@dataclass
class SlotControl:
    """Shared stop flags: ``draining`` = claim nothing more; ``abort`` = kill what runs now;
    ``may_idle_exit`` is asked before an idle slot ends (False keeps it polling: its stage job
    is one of the module's ``min_jobs``)."""

    draining: threading.Event = field(default_factory=threading.Event)
    abort: threading.Event = field(default_factory=threading.Event)
    may_idle_exit: Callable[[], bool] = field(default=lambda: True)


@dataclass
class SlotContext:
    """Everything a slot needs, built by the launcher."""

    app_id: int
    module: ModuleSpec
    ref: ModuleRef
    modules: dict[str, ModuleRef]
    host: str
    seq: int
    work_dir: Path
    runtime: ContainerRuntime
    wakeups: Wakeups
    control: SlotControl
    base_env: dict[str, str]
    scratch: Path | None = None


class Slot:
    """Runs one slot's loop in the calling thread."""

    def __init__(self, ctx: SlotContext, queue: TaskQueue) -> None:
        self.ctx = ctx
        self.queue = queue
        self.slot_id = 0
        self.tasks_done = 0
        self.current: Task | None = None
        self.db_failures = 0
        self.crashes = 0
        self.running = False
        self.private = ctx.work_dir.parent / f".{ctx.work_dir.name}.scalebox"
        self.session: Session | None = None
        self.final_status: str | None = None
        """How the slot ended (EXITED, ERROR), once it has."""
        self._fatal: ScaleboxError | None = None
        self.outputs = CappedOutputs(())
        """The output files of the run going on (or that just ended)."""
        self.waiting: str | None = None
        """Why the slot claims nothing now (a gate closed); the heartbeat stores it in its row."""
        self._live: int | None = None
        """The task whose run.sh (or handler) runs now: its output is the heartbeat's live tail."""

    @property
    def lease_seconds(self) -> float:
        """How long a claim stays valid without a heartbeat (the launcher beats every half
        heartbeat, so two beats may be missed; recovery follows within 1.75 heartbeats)."""
        return lease_for(self.ctx.module.arguments.heartbeat_seconds)

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> None:
        """The whole life of the slot; never raises (errors end the slot with status ERROR)."""
        ctx = self.ctx
        ensure_private(ctx.work_dir)  # 0700 in the app dir (itself checked when claimed)
        ensure_private(self.private)
        try:
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
            self.session = ctx.runtime.open(session_spec(ctx, self.private))
            failed = self._setup_failure()
            if failed is not None:
                status, message = "ERROR", failed
                return
            self.queue.set_slot_status(self.slot_id, "READY")
            self._loop()
            self._script("teardown.sh")
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
        self._stop_worker()
        if self.session is not None:
            try:
                self.session.close()
            except Exception:  # a stuck container must not keep the slot's end from being recorded
                logger.exception("slot %s/%s: closing its runtime session failed", self.ctx.module.name, self.ctx.seq)
        try:
            if self.current is not None:  # only a drain or an abort leaves a task unrecorded
                self.queue.release(self.slot_id)
            self.queue.set_slot_status(self.slot_id, status, message=message, tasks_done=self.tasks_done)
        except Exception as exc:
            logger.warning("slot %s: could not record its end: %s", self.slot_id, exc)
        finally:
            self.queue.close()

    def _setup(self) -> bool:
        return self._setup_failure() is None

    def _setup_failure(self) -> str | None:
        """Run setup.sh; None when it went well, else why not (its exit code, its last stderr
        lines): the message of the slot's ERROR, where `slot list` and `scalebox run` show it."""
        code = self._script("setup.sh")
        if code in (None, 0):
            return None
        why = self._script_failure("setup.sh", code)
        logger.error("slot %s/%s: %s", self.ctx.module.name, self.ctx.seq, why)
        return why

    def _script_failure(self, name: str, code: int) -> str:
        """``setup.sh exited 3: <its last stderr lines>`` (bounded, terminal-safe, one line)."""
        what = "timed out" if code == TaskStatus.TIMEOUT else f"exited {code}"
        said = script_said(self.private / f"{name.removesuffix('.sh')}.err")
        return f"{name} {what}" + (f": {said}" if said else "")

    def live_output(self) -> dict[str, object] | None:
        """The live tail of the task running now (for the heartbeat), or None."""
        task_id = self._live
        if task_id is None:
            return None
        return livetail.live_output(task_id, self.private / "run.out", self.private / "run.err")

    def _loop(self) -> None:
        args = self.ctx.module.arguments
        idle = 0
        while not self.ctx.control.draining.is_set():
            seen = self.ctx.wakeups.generation(self.ctx.ref.id)
            if not self._check_gate():  # check.sh said "not now": wait, without counting as idle
                self.ctx.wakeups.wait(self.ctx.ref.id, seen, args.sleep_interval_seconds)
                continue
            try:
                task = self._claim()
            except DatabaseError as exc:  # outage: wait it out, without counting as idle
                self._backoff(exc)
                continue
            self.db_failures = 0
            if task is not None:
                idle = 0
                self._process(task)
                continue
            status, active = self._activity()
            if status == "FINISHED":
                return
            # an idle poll counts only while this module and every module upstream of it are
            # quiet: upstream work still READY or RUNNING will become ours; work of downstream
            # or unrelated modules will not, and must not keep this slot (its nodes) taken
            idle = 0 if active or status != "RUNNING" else idle + 1
            if idle >= args.max_idle_polls and not args.always_running:
                if self.ctx.control.may_idle_exit():
                    logger.info("slot %s/%s: idle, exiting", self.ctx.module.name, self.ctx.seq)
                    return
                idle = 0  # kept up as warm capacity: ask again after another idle timeout
            self.ctx.wakeups.wait(self.ctx.ref.id, seen, args.sleep_interval_seconds)

    def _check_gate(self) -> bool:
        """Built-in disk gates, then check.sh (Scalebox's ACTION_CHECK): all must say go. Why
        one said no is kept in ``waiting`` (the next heartbeat stores it; logged when it changes)."""
        reason = closed_gate(self.ctx.module.arguments, self.ctx.work_dir)
        if reason is None:
            code = self._script("check.sh")
            if code not in (None, 0):
                reason = self._script_failure("check.sh", code) + " (not now)"
        if reason != self.waiting:
            if reason is not None:
                logger.info("slot %s/%s waits: %s", self.ctx.module.name, self.ctx.seq, reason)
            elif self.waiting is not None:
                logger.info("slot %s/%s: its gates are open again", self.ctx.module.name, self.ctx.seq)
            self.waiting = reason
        return reason is None

    def _claim(self) -> Task | None:
        tasks = self.queue.claim(
            self.ctx.app_id, self.ctx.ref.id, host=self.ctx.host, slot_id=self.slot_id,
            slot_seq=self.ctx.seq, limit=1, lease_seconds=self.lease_seconds,
            semaphore=self.ctx.module.arguments.semaphore,
        )
        return tasks[0] if tasks else None

    def _backoff(self, exc: Exception) -> None:
        """Sleep 0.5 s, 1 s, 2 s ... up to 30 s between tries while the database is away."""
        seen = self.ctx.wakeups.generation(-2)
        self.db_failures += 1
        delay = outage_backoff(self.db_failures)
        logger.warning("slot %s/%s: database unavailable, retrying in %.1fs: %s",
                       self.ctx.module.name, self.ctx.seq, delay, exc)
        self.ctx.wakeups.wait(-2, seen, delay)  # -2: a channel nobody notifies; notify_all ends it

    def _activity(self) -> tuple[str, bool]:
        """(app status, active): active while the module or one upstream of it has work."""
        try:
            return self.queue.module_activity(self.ctx.app_id, self.ctx.ref.id)
        except DatabaseError as exc:
            logger.warning("cannot read the app's state, will retry: %s", exc)
            return "RUNNING", True

    # -- for runners without a queue (the MPI farm's worker ranks) ------------------------------
    def setup(self) -> bool:
        """Run setup.sh in the work dir; False when it failed."""
        self._open_session()
        return self._setup()

    def _open_session(self) -> None:
        ensure_private(self.ctx.work_dir)
        ensure_private(self.private)
        if self.session is None:
            self.session = self.ctx.runtime.open(session_spec(self.ctx, self.private))

    def gate_open(self) -> bool:
        """The disk gates and check.sh, as before a claim (the runtime session is opened on first
        use, without setup.sh): True when all say go. :meth:`close` closes the session."""
        self._open_session()
        return self._check_gate()

    def close(self) -> None:
        """Close the runtime session, if open (no teardown.sh), and end the handler worker."""
        self._stop_worker()
        if self.session is not None:
            self.session.close()
            self.session = None

    def execute(self, task: Task) -> TaskResult | None:
        """Run one claimed task (run.sh, timeout, task-exec files) into its result, without
        touching the database; None when ``control.abort`` stopped it. Never raises for what a
        task does: a run that cannot start is -101, output that cannot be read is -103."""
        return self._execute_safely(task)

    def teardown(self) -> None:
        """Run teardown.sh (if any), then close the runtime session."""
        try:
            self._script("teardown.sh")
        finally:
            self.close()

    # -- one task -------------------------------------------------------------------------------
    def _process(self, task: Task) -> None:
        self.current = task
        result = self._execute_safely(task)
        if result is None:  # aborted or drained: give the task back, the attempt not counted
            self.queue.release(self.slot_id)
            self.current = None
            return
        self._record(task, result, self._requeue(task, result.status))
        self.current = None
        if self._fatal is not None:  # the slot cannot run anything (its container engine failed)
            raise self._fatal
        self._watch_crashes(result.status)

    def _requeue(self, task: Task, status: int) -> bool:
        """Whether the task's retry rules give a run that ended with ``status`` another attempt."""
        rules = self.ctx.module.parameters.retry_rules
        return TaskStatus.is_failure(status) and task.tries <= extra_attempts(rules, status)

    def _execute_safely(self, task: Task) -> TaskResult | None:
        """:meth:`_execute`, with whatever goes wrong turned into this task's result: a task
        never takes its slot down, nor goes back to the queue uncounted (a poison task would
        then kill every slot in turn and never fail)."""
        started = datetime.now(UTC)
        try:
            return self._execute(task)
        except ContainerError as exc:  # the engine, not the task: record it, then end the slot
            self._fatal = exc
            return _system_error(started, f"the slot's container failed: {exc}")
        except ScriptError as exc:  # run.sh could not be started (exec format, interpreter missing)
            return _system_error(started, _why_unstartable(self.ctx.module.script("run.sh"), exc))
        except ScaleboxError as exc:
            return _system_error(started, str(exc))
        except Exception as exc:
            logger.exception("task %s: its run could not be executed or collected", task.id)
            return _system_error(started, f"internal error running the task: {type(exc).__name__}: {exc}",
                                 status=TaskStatus.OUTPUT_INVALID, detail=traceback.format_exc())

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
            self.db_failures = 0
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

    def _execute(self, task: Task) -> TaskResult | None:
        if self.ctx.module.handler is not None:
            return self._execute_handler(task)
        ctx = self.ctx
        run_sh = ctx.module.script("run.sh")
        started = datetime.now(UTC)
        # per attempt: a run orphaned by a killed launcher must not write into a later run's buffer
        emit_file = self.private / f"emit-{task.id}.{task.attempts}.jsonl"
        emit_file.unlink(missing_ok=True)
        if run_sh is None:
            return _system_error(started, f"no run.sh in {ctx.module.code_path}")
        argv = [*_script_argv(run_sh), task.body, json.dumps(task.headers, ensure_ascii=False)]
        env = self._env(task, emit_file)
        try:  # a task asking for K ranks runs as an MPI program (srun -n K in the allocation)
            wrapped = mpirun.wrap(ctx.module, task.headers, argv, env)
        except ScaleboxError as exc:
            return _system_error(started, str(exc))
        remote = False
        if wrapped is not argv:
            mpi.remove_stale_segments()
            # an srun step's ranks run under slurmstepd, not under us: wait4 of srun is srun's
            # own CPU only (mpiexec's ranks are its descendants, so its rusage is theirs)
            remote = wrapped[0] == "srun"
            argv = wrapped
        outcome = self._run_script(argv, env, "run", ctx.module.arguments.task_max_seconds, abortable=True,
                                   live=task.id)
        if outcome is None:
            return None
        if remote:
            outcome = dataclasses.replace(outcome, usage=None)
        killed = outcome.returncode < 0 or 128 < outcome.returncode < 160  # by a signal (or its shell's 128+N)
        if killed and not outcome.timed_out and ctx.control.draining.is_set():
            # killed while we drain (scancel, walltime, node shutdown): not the task's fault, give it back
            return None
        finished = datetime.now(UTC)
        report = taskexec.collect(ctx.work_dir, emit_file, ctx.modules.keys(),
                                  host_path=self.session.host_path if self.session is not None else None,
                                  max_messages=ctx.module.arguments.max_messages)
        return self._result(task, outcome, report, started, finished)

    # -- in-slot Python handlers (pyworker): run.sh's semantics without a process per task -----
    _worker: pyworker.Worker | None = None
    """The slot's handler worker, started on its first task (modules with ``handler`` only)."""

    def _execute_handler(self, task: Task) -> TaskResult | None:
        ctx = self.ctx
        started = datetime.now(UTC)
        # per attempt, as for run.sh; a text: a Path is only needed when there is something to collect
        emit_file = f"{self.private}{os.sep}emit-{task.id}.{task.attempts}.jsonl"
        if self._worker is None:
            self._worker = pyworker.Worker(cast(str, ctx.module.handler), ctx.module.code_path, cwd=ctx.work_dir,
                                           env=self._env(None, None), private=self.private)
        worker = self._worker
        self._live = task.id
        try:
            run = worker.run(pyworker.request_for(task.id, task.body, task.headers, task.attempts, emit_file),
                             timeout=ctx.module.arguments.task_max_seconds, abort=ctx.control.abort)
        finally:
            self._live = None
        self.outputs = worker.outputs
        if run.aborted:
            return None
        if run.start_error is not None:
            return _system_error(started, run.start_error)
        if run.died and (run.returncode or 0) < 0 and ctx.control.draining.is_set():
            return None  # killed while we drain (scancel, walltime): not the task's fault, give it back
        finished = datetime.now(UTC)
        collected = None
        if run.reply is None or run.reply.files:
            collected = taskexec.collect(ctx.work_dir, Path(emit_file), ctx.modules.keys(),
                                         max_messages=ctx.module.arguments.max_messages)
        report = run.report(collected, ctx.module.arguments.max_messages)
        return self._result(task, run.outcome(), report, started, finished)

    def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            try:
                worker.close()
            except Exception:  # the slot's end must still be recorded
                logger.exception("slot %s/%s: ending its handler worker failed", self.ctx.module.name, self.ctx.seq)

    def _result(
        self, task: Task, outcome: Outcome, report: taskexec.ExecReport, started: datetime, finished: datetime
    ) -> TaskResult:
        status = _status_of(outcome)
        stderr = self.outputs.tail(self.private / "run.err")
        if report.invalid:  # output of the wrong shape, size or kind: -103 unless run.sh failed anyway
            stderr += "".join(f"scalebox: {p}\n" for p in report.invalid)
            if status == 0:
                status = TaskStatus.OUTPUT_INVALID
        if status == 0 and report.status is not None:
            status = report.status
        messages, problems = self._messages(report) if status == 0 else ([], [])
        problems = [*report.problems, *problems]
        if problems:
            stderr += "".join(f"scalebox: {p}\n" for p in problems)
            if status == 0:
                status = TaskStatus.EMIT_FAILED
        if status != 0:
            messages = []
        return TaskResult(
            status=status, started_at=started, finished_at=finished,
            stdout=self.outputs.tail(self.private / "run.out"), stderr=stderr,
            input_bytes=report.input_bytes, output_bytes=report.output_bytes,
            input_files=report.input_files, output_files=report.output_files, removed_files=report.removed_files,
            user_text=report.user_text, timestamps=report.timestamps, messages=messages,
            finish_text=report.finish_text if status == 0 else None, usage=outcome.usage,
        )

    def _messages(self, report: taskexec.ExecReport) -> tuple[list[Message], list[str]]:
        """The run's messages stamped with where they came from, or the problems that make the
        task emit none (a message whose headers no longer fit, a hand-off over MAX_HANDOFF_BYTES)."""
        out: list[Message] = []
        size = 0
        for n, m in enumerate(report.messages, 1):
            try:
                headers = headers_for(m.headers, from_module=self.ctx.module.name, from_host=self.ctx.host,
                                      from_slot=self.ctx.seq)
            except ScaleboxError as exc:
                return [], [f"message {n}: {exc}"]
            size += len(m.body) + len(str(headers))
            if size > MAX_HANDOFF_BYTES:
                return [], [f"the emitted messages exceed {MAX_HANDOFF_BYTES // 2**20} MiB in all; "
                            "emit fewer or smaller messages per task (pass large data as files)"]
            out.append(Message(body=m.body, module=m.module, headers=headers))
        return out, []

    # -- scripts --------------------------------------------------------------------------------
    def _script(self, name: str) -> int | None:
        """Run setup/check/teardown if the module has it; None when absent."""
        path = self.ctx.module.script(name)
        if path is None:
            return None
        outcome = self._run_script(
            _script_argv(path), self._env(None, None), name.removesuffix(".sh"),
            self.ctx.module.arguments.task_max_seconds, abortable=False,
        )
        return _status_of(outcome) if outcome else None

    def _run_script(
        self, argv: list[str], env: dict[str, str], label: str, timeout: float | None, *, abortable: bool,
        live: int | None = None,
    ) -> Outcome | None:
        """Run a script to its end (or its timeout; None when aborted). ``live``: the task it
        runs, whose output the heartbeat then carries (from when its files were opened anew)."""
        spec = RunSpec(
            argv=argv, cwd=self.ctx.work_dir, env=env, image=self.ctx.module.base_image,
            stdout_path=self.private / f"{label}.out", stderr_path=self.private / f"{label}.err",
        )
        assert self.session is not None
        self.outputs = CappedOutputs((spec.stdout_path, spec.stderr_path))
        run = self.session.start(spec)
        self._live = live
        try:
            return self._wait_run(run, timeout, abortable)
        finally:
            self._live = None

    def _wait_run(self, run: Run, timeout: float | None, abortable: bool) -> Outcome | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outcome = run.wait(0.2)
            if outcome is not None:
                return outcome
            self.outputs.check()  # a run printing without end must not fill the work root
            if abortable and self.ctx.control.abort.is_set():
                run.kill(grace=2.0)
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return run.kill()

    def _env(self, task: Task | None, emit_file: Path | None) -> dict[str, str]:
        ctx = self.ctx
        env = dict(ctx.base_env)
        env.update(ctx.module.arguments.as_env())
        env.update(ctx.module.environments)
        sink = ctx.module.sink_modules[0] if ctx.module.sink_modules else ""
        env.update({
            "APP_ID": str(ctx.app_id), "MODULE_NAME": ctx.module.name, "MODULE_ID": str(ctx.ref.id),
            "SLOT_ID": str(self.slot_id), "SLOT_SEQ": str(ctx.seq), "HOST": ctx.host,
            "WORK_DIR": str(ctx.work_dir), "SINK_MODULE": sink,
            "JOB_ID": str(ctx.ref.id), "JOB_NAME": ctx.module.name, "SINK_JOB": sink,
            "SCALEBOX_APP_ID": str(ctx.app_id), "SCALEBOX_MODULE": ctx.module.name,
            "SCALEBOX_PYTHON": sys.executable,
            "PATH": f"{HELPER_BIN}{os.pathsep}{env.get('PATH', os.defpath)}",
        })
        if task is not None and emit_file is not None:
            env["TASK_ID"] = str(task.id)
            env[taskexec.EMIT_BUFFER_ENV] = str(emit_file)
        else:
            env.pop(taskexec.EMIT_BUFFER_ENV, None)
        return env


def script_said(path: Path, limit: int = SCRIPT_SAID_CHARS) -> str:
    """The last non-blank lines of a script's stderr file, joined with `` / ``, terminal-safe and
    at most ``limit`` characters (the end kept: the last line says most); '' when there are none."""
    try:
        with open_regular(path) as fh:  # in the private dir: no symlink followed, no FIFO waited on
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - 4 * limit))
            data = fh.read(4 * limit)
    except OSError:
        return ""
    lines = [" ".join(line.split()) for line in livetail.sanitize(data).splitlines()]
    lines = [line for line in lines if line and set(line) != {"?"}][-2:]
    said = " / ".join(lines)
    return said if len(said) <= limit else "..." + said[-(limit - 3):]


def outage_backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failed try while the database is away:
    0.5, 1, 2 ... up to 30 (the slot's claims and the dispatcher's kept hand-offs alike)."""
    return min(30.0, 0.5 * 2.0 ** (failures - 1))


def lease_for(heartbeat_seconds: float) -> float:
    """The lease a claim or heartbeat grants."""
    return 1.5 * heartbeat_seconds


def session_spec(ctx: SlotContext, private: Path) -> SessionSpec:
    """What the slot's runtime session needs: the module's image and mounts, the slot's dirs."""
    m = ctx.module
    return SessionSpec(
        name=f"app-{ctx.app_id}.{m.name}.{ctx.host}-slot{ctx.seq}", work_dir=ctx.work_dir, private_dir=private,
        code_path=m.code_path, image=m.base_image, runtime=m.arguments.runtime, volumes=list(m.volumes),
        options=list(m.arguments.slot_options),
    )


def _script_argv(path: Path) -> list[str]:
    """Executable scripts run as themselves (their shebang); others through bash, as in Scalebox."""
    return [str(path)] if os.access(path, os.X_OK) else ["bash", str(path)]


def _why_unstartable(path: Path | None, exc: ScriptError) -> str:
    """The start failure, naming a missing ``#!`` interpreter (the kernel only says ENOENT)."""
    if path is None:
        return str(exc)
    try:
        with open(path, "rb") as fh:
            first = fh.readline(512)
    except OSError:
        return str(exc)
    if first.startswith(b"#!"):
        words = first[2:].decode("utf-8", "replace").split()
        if words and not os.access(words[0], os.X_OK):
            return f"{exc} (its interpreter {words[0]!r}, named on the #! line of {path.name}, is not there)"
    return str(exc)


def _status_of(outcome: Outcome) -> int:
    if outcome.timed_out:
        return TaskStatus.TIMEOUT
    if outcome.returncode < 0:  # killed by a signal: the shell convention 128+N
        return 128 - outcome.returncode
    return outcome.returncode


def _system_error(
    started: datetime, reason: str, *, status: int = TaskStatus.SYSTEM_ERROR, detail: str = "",
) -> TaskResult:
    return TaskResult(
        status=status, started_at=started, finished_at=datetime.now(UTC),
        stderr=f"scalebox: {reason}\n{detail}",
    )
