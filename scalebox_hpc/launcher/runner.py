"""The one task runner: the slot lifecycle that per-node slots, the node's dispatcher and an MPI
stage's ranks share.

:class:`TaskRunner` runs one task in a runtime session (run.sh or the module's Python handler:
its environment, its timeout, its task-exec files → a :class:`TaskResult`) and the module's
setup/check/teardown scripts, without touching the database. Around it, the rules every loop
that claims and records applies, once each:

- :func:`should_requeue`: whether a failed run gets another attempt;
- :class:`IdlePolicy`: when an empty poll ends the loop (idle) or keeps it (warm capacity);
- :class:`Backoff`: 0.5 s, 1 s, 2 s ... 30 s between tries while the database is away;
- :func:`stamp_messages`: emitted messages stamped with their sender, within the hand-off size;
- :func:`script_env`, :func:`rank_work_dir`: what every script and handler sees, and where;
- :class:`HeartbeatLoop`: renew leases every half heartbeat, recover expired ones every quarter.

A :class:`~scalebox_hpc.launcher.slot.Slot` is claim → ``TaskRunner`` → record; an MPI farm's
worker rank is ``TaskRunner`` alone (rank 0 claims and records), rank 0's gate keeper too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, cast

from scalebox_hpc import mpi
from scalebox_hpc.errors import ContainerError, ScaleboxError, ScriptError
from scalebox_hpc.launcher import livetail, mpirun, pyworker, taskexec
from scalebox_hpc.launcher.gates import closed_gate
from scalebox_hpc.launcher.outputs import CappedOutputs
from scalebox_hpc.launcher.ports import Clock
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import Message, ModuleRef, Task, TaskResult, TaskStatus, extra_attempts, headers_for
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.runtime.base import ContainerRuntime, Outcome, Run, RunSpec, Session, SessionSpec
from scalebox_hpc.runtime.paths import ensure_private, open_regular

logger = logging.getLogger(__name__)

HELPER_BIN = Path(__file__).resolve().parent / "bin"
MAX_HANDOFF_BYTES = 64 * 2**20
"""Bodies and headers one task may emit in all: one hand-off is one transaction, and jsonb
values stop at 256 MB (over that PostgreSQL refuses the statement, for good)."""
SCRIPT_SAID_CHARS = 300
"""What a slot's message quotes of a failed script's stderr (its last lines), at most."""
WAIT_STEP_SECONDS = 0.2
"""How often a run being waited for is looked at (output caps, abort, deadline)."""


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
    """Everything a slot (or an MPI rank) needs, built by the launcher."""

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


# -- the rules every claim/record loop applies ---------------------------------------------------
def should_requeue(rules: list[str], status: int, tries: int) -> bool:
    """Whether a run that ended with ``status``, the task's ``tries``-th, gets another attempt."""
    return TaskStatus.is_failure(status) and tries <= extra_attempts(rules, status)


def outage_backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failed try while the database is away:
    0.5, 1, 2 ... up to 30 (the slot's claims and the dispatcher's kept hand-offs alike)."""
    return min(30.0, 0.5 * 2.0 ** (failures - 1))


def lease_for(heartbeat_seconds: float) -> float:
    """The lease a claim or heartbeat grants (the launcher beats every half heartbeat, so two
    beats may be missed; recovery follows within 1.75 heartbeats)."""
    return 1.5 * heartbeat_seconds


@dataclass
class Backoff:
    """Waits out a database outage: ``wait(seconds)`` after each failure, 0.5 s doubling to 30 s;
    :meth:`ok` after a success starts the series again."""

    wait: Callable[[float], object]
    who: str = "slot"
    failures: int = 0

    def failed(self, exc: Exception) -> float:
        """Count one failure, log it, wait; returns the seconds waited for."""
        self.failures += 1
        delay = outage_backoff(self.failures)
        logger.warning("%s: database unavailable, retrying in %.1fs: %s", self.who, delay, exc)
        self.wait(delay)
        return delay

    def ok(self) -> None:
        """The database answered."""
        self.failures = 0


Verdict = Literal["stay", "idle", "finished"]
"""After an empty poll: keep polling, end (idle long enough and allowed to), end (app FINISHED)."""


@dataclass
class IdlePolicy:
    """When a loop that found nothing to claim ends. An idle poll counts only while this module
    and every module upstream of it are quiet: upstream work still READY or RUNNING will become
    ours; work of downstream or unrelated modules will not, and must not keep the slot (its
    nodes) taken. ``always_running`` never ends; ``may_idle_exit`` False keeps the slot up
    (warm capacity: one of the module's ``min_jobs``) and asks again after another timeout."""

    max_idle_polls: int
    always_running: bool = False
    polls: int = 0

    @classmethod
    def of(cls, module: ModuleSpec) -> IdlePolicy:
        """The module's ``max_idle_polls`` and ``always_running``."""
        return cls(module.arguments.max_idle_polls, module.arguments.always_running)

    def busy(self) -> None:
        """A claim brought work: the idle count starts again."""
        self.polls = 0

    def after_empty_poll(self, status: str, active: bool, may_idle_exit: Callable[[], bool]) -> Verdict:
        """The verdict after one empty claim; ``status``/``active`` from ``module_activity``."""
        if status == "FINISHED":
            return "finished"
        self.polls = 0 if active or status != "RUNNING" else self.polls + 1
        if self.polls < self.max_idle_polls or self.always_running:
            return "stay"
        if may_idle_exit():
            return "idle"
        self.polls = 0
        return "stay"


def stamp_messages(
    messages: Sequence[Message], *, module: str, host: str, seq: int, limit: int = MAX_HANDOFF_BYTES,
) -> tuple[list[Message], list[str]]:
    """The run's messages stamped with where they came from, or the problems that make the task
    emit none (a message whose headers no longer fit, a hand-off over ``limit`` bytes)."""
    out: list[Message] = []
    size = 0
    for n, m in enumerate(messages, 1):
        try:
            headers = headers_for(m.headers, from_module=module, from_host=host, from_slot=seq)
        except ScaleboxError as exc:
            return [], [f"message {n}: {exc}"]
        size += len(m.body) + len(str(headers))
        if size > limit:
            return [], [f"the emitted messages exceed {limit // 2**20} MiB in all; "
                        "emit fewer or smaller messages per task (pass large data as files)"]
        out.append(Message(body=m.body, module=m.module, headers=headers))
    return out, []


def rank_work_dir(app_dir: Path, module: str, host: str, label: str) -> Path:
    """A slot's (or rank's) work dir: ``<app dir>/<module>/<host>-<label>`` (label ``slot3``, ``rank2``)."""
    return app_dir / module / f"{host}-{label}"


def script_env(ctx: SlotContext, slot_id: int, *, base: bool = True) -> dict[str, str]:
    """The environment every script and handler of the slot sees (``base``: with the launcher's
    allow-listed variables and the helper bin dir on PATH; False: the module's own variables only,
    as an MPI collective rank adds them to its process environment)."""
    m = ctx.module
    env = dict(ctx.base_env) if base else {}
    env.update(m.arguments.as_env())
    env.update(m.environments)
    sink = m.sink_modules[0] if m.sink_modules else ""
    env.update({
        "APP_ID": str(ctx.app_id), "MODULE_NAME": m.name, "MODULE_ID": str(ctx.ref.id),
        "SLOT_ID": str(slot_id), "SLOT_SEQ": str(ctx.seq), "HOST": ctx.host,
        "WORK_DIR": str(ctx.work_dir), "SINK_MODULE": sink,
        "JOB_ID": str(ctx.ref.id), "JOB_NAME": m.name, "SINK_JOB": sink,
        "SCALEBOX_APP_ID": str(ctx.app_id), "SCALEBOX_MODULE": m.name,
        "SCALEBOX_PYTHON": sys.executable,
    })
    if base:
        env["PATH"] = f"{HELPER_BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    return env


@dataclass
class HeartbeatLoop:
    """Two loops on a fixed schedule, neither waiting for the other: every half heartbeat
    ``beat()`` (renew slots and leases); every quarter heartbeat ``recover()`` expired leases
    anywhere (no daemon: every launcher does it), so a dead slot's tasks are back within
    1.5 + 0.25 heartbeats, and every half heartbeat ask ``cancelled()``.

    Why two loops on deadlines: a call waits for the node's dispatcher batch being served, which
    took 10-25 s on a saturated database (50 emulated nodes). One loop that slept a quarter
    heartbeat *after* beat, cancelled and recover had answered renewed a 15 s lease every
    5 s + six such waits, and other nodes recovered a live node's tasks and ran them again. Now
    a beat is due half a heartbeat after the previous one was *due* (at once when late), and
    only the beat's own wait stands between two renewals.

    ``recover(every)`` recovers only the apps nobody recovered in the last ``every`` seconds
    (``PgQueue.recover_expired``): across a fleet, about eight recoveries per heartbeat.

    After a failure a loop tries again a quarter heartbeat later. After its connection was away
    (``connects()`` grew) it recovers nothing for a lease: the others' launchers, cut off as
    well, must get to renew their leases first. A step never raises: it logs and tries again."""

    beat: Callable[[], object]
    cancelled: Callable[[], bool]
    on_cancel: Callable[[], object]
    recover: Callable[[float], list[tuple[int, int]]]
    heartbeat_seconds: float
    lease_seconds: float
    connects: Callable[[], int] = lambda: 1
    clock: Clock | None = None
    who: str = "heartbeat"
    _tick: int = 0
    _seen: int = 0
    _quiet_until: float = 0.0

    def run(self, stopped: Callable[[float], bool], alive: Callable[[], bool] = lambda: True) -> None:
        """Beat in this thread and recover in another until ``stopped(seconds)`` (a wait, called
        from both threads) says so or ``alive()`` is False; returns when both have ended."""
        quarter = self.heartbeat_seconds / 4
        side = threading.Thread(target=self.every, args=(quarter, self.recover_step, stopped, alive),
                                name=f"{self.who}: recovery", daemon=True)
        side.start()
        try:
            self.every(2 * quarter, self.beat_step, stopped, alive)
        finally:
            side.join()

    def every(self, period: float, step: Callable[[], bool], stopped: Callable[[float], bool],
              alive: Callable[[], bool]) -> None:
        """``step()`` every ``period`` seconds, the first after one period, on deadlines: a step
        that overran is followed by the next at once (no drift); one that failed (False) is
        tried again a quarter heartbeat later."""
        due = self._now() + period
        while not stopped(max(0.0, due - self._now())) and alive():
            ok = step()
            now = self._now()
            due = max(due + period, now) if ok else now + self.heartbeat_seconds / 4

    def beat_step(self) -> bool:
        """One renewal; False when it failed (logged)."""
        try:
            self.beat()
        except Exception as exc:
            self._failed(exc)
            return False
        return True

    def recover_step(self) -> bool:
        """One quarter tick of the other loop: every second one asks ``cancelled()``; each
        recovers expired leases (not for a lease after a reconnect). False when it failed."""
        self._tick += 1
        try:
            if self._tick % 2 == 0 and self.cancelled():
                self.on_cancel()
            seen = self.connects()
            if seen > max(self._seen, 1):  # reconnected after an outage
                self._quiet_until = self._now() + self.lease_seconds
            self._seen = seen
            if self._now() < self._quiet_until:
                return True
            # every launcher of the app runs this loop: recover the apps nobody recovered in the
            # last eighth of a heartbeat (0032), so a fleet's recoveries are about 8 per heartbeat
            # whatever its size, not 4 per launcher (200 nodes: 735 no-op recoveries in one run)
            recovered = self.recover(self.heartbeat_seconds / 8)
        except Exception as exc:
            self._failed(exc)
            return False
        for task_id, status in recovered:
            logger.warning("task %s: lease expired, now %s", task_id, "READY" if status == -1 else status,
                           extra={"action": "lease_expired", "task_id": task_id, "status": status})
        return True

    def _failed(self, exc: Exception) -> None:
        log = logger.warning if isinstance(exc, ScaleboxError) else logger.exception
        log("%s failed, will retry: %s", self.who, exc, extra={"action": "heartbeat_failed", "error": str(exc)})

    def _now(self) -> float:
        return self.clock.monotonic() if self.clock is not None else time.monotonic()


# -- running one task -----------------------------------------------------------------------------
class TaskRunner:
    """Runs a slot's scripts and tasks in its runtime session; never touches the database.

    ``slot_id`` is what scripts see as ``SLOT_ID``. ``fatal`` is set when the session itself
    failed (its container engine): the owner records the task's result, then ends the slot."""

    def __init__(self, ctx: SlotContext, slot_id: int = 0) -> None:
        self.ctx = ctx
        self._slot_id = slot_id
        self.private = ctx.work_dir.parent / f".{ctx.work_dir.name}.scalebox"
        self._run_out, self._run_err = self.private / "run.out", self.private / "run.err"
        # each script's output files, joined once: a 32-slot node spent a sixth of its Python
        # time in pathlib's joins and conversions, per task
        self._outputs_of: dict[str, tuple[Path, Path]] = {"run": (self._run_out, self._run_err)}
        self.session: Session | None = None
        self.fatal: ScaleboxError | None = None
        self.outputs = CappedOutputs(())
        """The output files of the run going on (or that just ended)."""
        self.waiting: str | None = None
        """Why the slot claims nothing now (a gate closed); the heartbeat stores it in its row."""
        self._live: int | None = None
        """The task whose run.sh (or handler) runs now: its output is the heartbeat's live tail."""
        self._worker: pyworker.Worker | None = None
        """The slot's handler worker, started on its first task (modules with ``handler`` only)."""
        # looked up once per slot, not per task (the module's code does not change under a slot)
        self._run_sh = ctx.module.script("run.sh")
        self._run_argv = None if self._run_sh is None else script_argv(self._run_sh)
        self._check_sh = ctx.module.script("check.sh")
        self._env_cache: dict[str, str] | None = None

    @property
    def slot_id(self) -> int:
        """The slot's row id (``SLOT_ID`` in every script's environment)."""
        return self._slot_id

    @slot_id.setter
    def slot_id(self, value: int) -> None:
        self._slot_id = value
        self._env_cache = None

    @property
    def name(self) -> str:
        """``module/seq``, for log lines."""
        return f"{self.ctx.module.name}/{self.ctx.seq}"

    # -- session ----------------------------------------------------------------------------------
    def open_dirs(self) -> None:
        """Make the work and private dirs (0700), if not there."""
        ensure_private(self.ctx.work_dir)  # 0700 in the app dir (itself checked when claimed)
        ensure_private(self.private)

    def open(self) -> None:
        """Make the dirs and open the runtime session, once."""
        self.open_dirs()
        if self.session is None:
            self.session = self.ctx.runtime.open(session_spec(self.ctx, self.private))

    def setup(self) -> bool:
        """Open the session and run setup.sh; False when it failed."""
        self.open()
        return self.setup_failure() is None

    def setup_failure(self) -> str | None:
        """Run setup.sh; None when it went well, else why not (its exit code, its last stderr
        lines): the message of the slot's ERROR, where `slot list` and `scalebox run` show it."""
        code = self.script("setup.sh")
        if code in (None, 0):
            return None
        why = self.script_failure("setup.sh", code)
        logger.error("slot %s: %s", self.name, why)
        return why

    def gate_open(self) -> bool:
        """Built-in disk gates, then check.sh (Scalebox's ACTION_CHECK): all must say go. Why
        one said no is kept in ``waiting`` (the next heartbeat stores it; logged when it changes).
        The session is opened on first use, without setup.sh."""
        if self.session is None:
            self.open()
        reason = closed_gate(self.ctx.module.arguments, self.ctx.work_dir)
        if reason is None and self._check_sh is not None:
            code = self.script("check.sh")
            if code not in (None, 0):
                reason = self.script_failure("check.sh", code) + " (not now)"
        if reason != self.waiting:
            if reason is not None:
                logger.info("slot %s waits: %s", self.name, reason)
            elif self.waiting is not None:
                logger.info("slot %s: its gates are open again", self.name)
            self.waiting = reason
        return reason is None

    def teardown(self) -> None:
        """Run teardown.sh (if any), then close the session."""
        try:
            self.script("teardown.sh")
        finally:
            self.close()

    def close(self) -> None:
        """End the handler worker and close the runtime session, if open (no teardown.sh);
        a failure of either is logged, never raised (the slot's end must still be recorded)."""
        self._end_worker()
        session, self.session = self.session, None
        if session is not None:
            try:
                session.close()
            except Exception:  # a stuck container must not keep the slot's end from being recorded
                logger.exception("slot %s: closing its runtime session failed", self.name)

    def live_output(self) -> dict[str, object] | None:
        """The live tail of the task running now (for the heartbeat), or None."""
        task_id = self._live
        if task_id is None:
            return None
        return livetail.live_output(task_id, self._run_out, self._run_err)

    # -- one task ---------------------------------------------------------------------------------
    def execute(self, task: Task) -> TaskResult | None:
        """Run one claimed task (run.sh or the handler, timeout, task-exec files) into its result;
        None when ``control.abort`` stopped it, or a drain killed it (give it back, the attempt not
        counted). Never raises for what a task does: whatever goes wrong becomes this task's result
        (a run that cannot start is -101, output that cannot be read -103), so a poison task never
        takes its slot down, nor goes back to the queue uncounted."""
        started = datetime.now(UTC)
        try:
            if self.ctx.module.handler is not None:
                return self._execute_handler(task)
            return self._execute_script(task)
        except Exception as exc:
            return self._run_failure(exc, task, started)

    def _run_failure(self, exc: Exception, task: Task, started: datetime) -> TaskResult:
        """What a run that raised ``exc`` records (see :meth:`execute`)."""
        if isinstance(exc, ContainerError):  # the engine, not the task: record it, then end the slot
            self.fatal = exc
            return system_error(started, f"the slot's container failed: {exc}")
        if isinstance(exc, ScriptError):  # run.sh could not be started (exec format, interpreter missing)
            return system_error(started, why_unstartable(self._run_sh, exc))
        if isinstance(exc, ScaleboxError):
            return system_error(started, str(exc))
        logger.exception("task %s: its run could not be executed or collected", task.id)
        return system_error(started, f"internal error running the task: {type(exc).__name__}: {exc}",
                            status=TaskStatus.OUTPUT_INVALID, detail=traceback.format_exc())

    def _execute_script(self, task: Task) -> TaskResult | None:
        ctx = self.ctx
        started = datetime.now(UTC)
        # per attempt: a run orphaned by a killed launcher must not write into a later run's buffer
        emit_file = f"{self.private}{os.sep}emit-{task.id}.{task.attempts}.jsonl"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(emit_file)
        if self._run_argv is None:
            return system_error(started, f"no run.sh in {ctx.module.code_path}")
        argv = [*self._run_argv, task.body, json.dumps(task.headers, ensure_ascii=False)]
        env = self.env(task, emit_file)
        try:  # a task asking for K ranks runs as an MPI program (srun -n K in the allocation)
            wrapped = mpirun.wrap(ctx.module, task.headers, argv, env)
        except ScaleboxError as exc:
            return system_error(started, str(exc))
        remote = False
        if wrapped is not argv:
            mpi.remove_stale_segments()
            # an srun step's ranks run under slurmstepd, not under us: wait4 of srun is srun's
            # own CPU only (mpiexec's ranks are its descendants, so its rusage is theirs)
            remote = wrapped[0] == "srun"
            argv = wrapped
        outcome = self.run_script(argv, env, "run", ctx.module.arguments.task_max_seconds, abortable=True,
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
        return self.result(outcome, report, started, finished)

    def execute_many(self, tasks: Sequence[Task]) -> Generator[TaskResult | None, None, None]:
        """Run several claimed tasks in order and yield each one's result as :meth:`execute`
        would (None: aborted or drained, give it back). A module's Python handler gets them in
        one message (:meth:`pyworker.Worker.run_many`), each with its own timeout; run.sh runs
        them one by one. The caller takes each result before the next task runs on."""
        if self.ctx.module.handler is None or len(tasks) < 2:
            for task in tasks:
                yield self.execute(task)
            return
        done = 0
        started = datetime.now(UTC)
        try:
            for result in self._execute_handler_many(tasks):
                done += 1
                yield result
                started = datetime.now(UTC)
        except Exception as exc:  # this task's result; the worker's state is unknown: the rest one by one
            self._end_worker()
            if done == len(tasks):
                raise
            yield self._run_failure(exc, tasks[done], started)
            for task in tasks[done + 1:]:
                yield self.execute(task)

    # in-slot Python handlers (pyworker): run.sh's semantics without a process per task
    def _execute_handler(self, task: Task) -> TaskResult | None:
        return next(self._execute_handler_many([task]))

    def _execute_handler_many(self, tasks: Sequence[Task]) -> Iterator[TaskResult | None]:
        ctx = self.ctx
        # per attempt, as for run.sh; a text: a Path is only needed when there is something to collect
        emits = [f"{self.private}{os.sep}emit-{t.id}.{t.attempts}.jsonl" for t in tasks]
        if self._worker is None:
            self._worker = pyworker.Worker(cast(str, ctx.module.handler), ctx.module.code_path, cwd=ctx.work_dir,
                                           env=self.env(None, None), private=self.private)
        worker = self._worker
        requests = [pyworker.request_for(t.id, t.body, t.headers, t.attempts, e)
                    for t, e in zip(tasks, emits, strict=True)]
        runs = worker.run_many(requests, timeout=ctx.module.arguments.task_max_seconds, abort=ctx.control.abort)
        started = datetime.now(UTC)
        try:
            for task, emit_file in zip(tasks, emits, strict=True):
                self._live = task.id
                run = next(runs)
                self._live = None
                self.outputs = worker.outputs
                result = self._handler_result(run, started, emit_file)
                yield result
                started = datetime.now(UTC)  # the next task began when this one's reply came
        finally:
            self._live = None
            runs.close()

    def _handler_result(self, run: pyworker.HandlerRun, started: datetime, emit_file: str) -> TaskResult | None:
        ctx = self.ctx
        if run.aborted:
            return None
        if run.start_error is not None:
            return system_error(started, run.start_error)
        if run.died and (run.returncode or 0) < 0 and ctx.control.draining.is_set():
            return None  # killed while we drain (scancel, walltime): not the task's fault, give it back
        finished = datetime.now(UTC)
        collected = None
        if run.reply is None or run.reply.files:
            collected = taskexec.collect(ctx.work_dir, emit_file, ctx.modules.keys(),
                                         max_messages=ctx.module.arguments.max_messages)
        report = run.report(collected, ctx.module.arguments.max_messages)
        return self.result(run.outcome(), report, started, finished)

    def _end_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            try:
                worker.close()
            except Exception:
                logger.exception("slot %s: ending its handler worker failed", self.name)

    def result(
        self, outcome: Outcome, report: taskexec.ExecReport, started: datetime, finished: datetime,
    ) -> TaskResult:
        """The run's outcome and its task-exec report as one result: output of the wrong shape is
        -103, messages that cannot be stamped -102, and a failed run emits nothing."""
        status = status_of(outcome)
        stderr = self.outputs.tail(self._run_err)
        if report.invalid:  # output of the wrong shape, size or kind: -103 unless run.sh failed anyway
            stderr += "".join(f"scalebox: {p}\n" for p in report.invalid)
            if status == 0:
                status = TaskStatus.OUTPUT_INVALID
        if status == 0 and report.status is not None:
            status = report.status
        messages, problems = (stamp_messages(report.messages, module=self.ctx.module.name, host=self.ctx.host,
                                             seq=self.ctx.seq) if status == 0 else ([], []))
        problems = [*report.problems, *problems]
        if problems:
            stderr += "".join(f"scalebox: {p}\n" for p in problems)
            if status == 0:
                status = TaskStatus.EMIT_FAILED
        if status != 0:
            messages = []
        return TaskResult(
            status=status, started_at=started, finished_at=finished,
            stdout=self.outputs.tail(self._run_out), stderr=stderr,
            input_bytes=report.input_bytes, output_bytes=report.output_bytes,
            input_files=report.input_files, output_files=report.output_files, removed_files=report.removed_files,
            user_text=report.user_text, timestamps=report.timestamps, messages=messages,
            finish_text=report.finish_text if status == 0 else None, usage=outcome.usage,
        )

    # -- scripts ----------------------------------------------------------------------------------
    def script(self, name: str) -> int | None:
        """Run setup/check/teardown if the module has it: its status; None when absent."""
        path = self.ctx.module.script(name)
        if path is None:
            return None
        outcome = self.run_script(
            script_argv(path), self.env(None, None), name.removesuffix(".sh"),
            self.ctx.module.arguments.task_max_seconds, abortable=False,
        )
        return status_of(outcome) if outcome else None

    def script_failure(self, name: str, code: int) -> str:
        """``setup.sh exited 3: <its last stderr lines>`` (bounded, terminal-safe, one line)."""
        what = "timed out" if code == TaskStatus.TIMEOUT else f"exited {code}"
        said = script_said(self.private / f"{name.removesuffix('.sh')}.err")
        return f"{name} {what}" + (f": {said}" if said else "")

    def run_script(
        self, argv: list[str], env: dict[str, str], label: str, timeout: float | None, *, abortable: bool,
        live: int | None = None,
    ) -> Outcome | None:
        """Run a script to its end (or its timeout; None when aborted). ``live``: the task it
        runs, whose output the heartbeat then carries (from when its files were opened anew)."""
        out = self._outputs_of.get(label)
        if out is None:
            out = self._outputs_of[label] = (self.private / f"{label}.out", self.private / f"{label}.err")
        spec = RunSpec(
            argv=argv, cwd=self.ctx.work_dir, env=env, image=self.ctx.module.base_image,
            stdout_path=out[0], stderr_path=out[1],
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
            outcome = run.wait(WAIT_STEP_SECONDS)
            if outcome is not None:
                return outcome
            self.outputs.check()  # a run printing without end must not fill the work root
            if abortable and self.ctx.control.abort.is_set():
                run.kill(grace=2.0)
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return run.kill()

    def env(self, task: Task | None, emit_file: str | Path | None) -> dict[str, str]:
        """A script's environment: :func:`script_env`, plus TASK_ID and the emit buffer for a task.
        The slot's part is built once (it does not change between tasks), copied per run."""
        if self._env_cache is None:
            env = script_env(self.ctx, self.slot_id)
            env.pop(taskexec.EMIT_BUFFER_ENV, None)
            self._env_cache = env
        env = dict(self._env_cache)
        if task is not None and emit_file is not None:
            env["TASK_ID"] = str(task.id)
            env[taskexec.EMIT_BUFFER_ENV] = str(emit_file)
        return env


def session_spec(ctx: SlotContext, private: Path) -> SessionSpec:
    """What the slot's runtime session needs: the module's image and mounts, the slot's dirs."""
    m = ctx.module
    return SessionSpec(
        name=f"app-{ctx.app_id}.{m.name}.{ctx.host}-slot{ctx.seq}", work_dir=ctx.work_dir, private_dir=private,
        code_path=m.code_path, image=m.base_image, runtime=m.arguments.runtime, volumes=list(m.volumes),
        options=list(m.arguments.slot_options),
    )


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


def script_argv(path: Path) -> list[str]:
    """Executable scripts run as themselves (their shebang); others through bash, as in Scalebox."""
    return [str(path)] if os.access(path, os.X_OK) else ["bash", str(path)]


def why_unstartable(path: Path | None, exc: ScriptError) -> str:
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


def status_of(outcome: Outcome) -> int:
    """A run's task status: -1xx for a timeout, 128+N for a signal, else its exit code."""
    if outcome.timed_out:
        return TaskStatus.TIMEOUT
    if outcome.returncode < 0:  # killed by a signal: the shell convention 128+N
        return 128 - outcome.returncode
    return outcome.returncode


def system_error(
    started: datetime, reason: str, *, status: int = TaskStatus.SYSTEM_ERROR, detail: str = "",
) -> TaskResult:
    """The result of a run the launcher could not start or read (``scalebox: reason`` on stderr)."""
    return TaskResult(
        status=status, started_at=started, finished_at=datetime.now(UTC),
        stderr=f"scalebox: {reason}\n{detail}",
    )
