"""An in-memory task queue for tests: the second implementation of the launcher's queue ports.

:class:`InMemoryQueue` implements ``TaskQueue`` and ``BatchQueue`` of
:mod:`scalebox_hpc.launcher.ports` with the semantics of :class:`scalebox_hpc.db.queue.PgQueue`
(and of the SQL behind it, ``sql/queries.sql``): claims by module, host and slot, oldest first,
HOST-BOUND (``to_host``) and SLOT-BOUND (``to_slot``) tasks, locality tiers, back-pressure,
semaphores, leases on an injectable clock, hand-offs with lease checks and CONFLICT_ACTION,
recovery, heartbeats with stray release, the scratch index. It is shipped in the package (as
procrastinate ships its ``InMemoryConnector``) so that launcher code and users' tests can run
without PostgreSQL; ``tests/conformance/test_queue_port.py`` holds the two to the same scenarios.

Test-facing helpers sit next to the port methods: :meth:`InMemoryQueue.create_app`,
:meth:`~InMemoryQueue.add_tasks`, :meth:`~InMemoryQueue.tasks`, :meth:`~InMemoryQueue.executions`,
:meth:`~InMemoryQueue.fail_next` (inject :class:`DatabaseError` outages) and ``calls`` (how often
each port method was called).

Documented limits (what PostgreSQL does that this fake does not):

- no concurrency beyond one lock: every call is one atomic step (PostgreSQL's ``SKIP LOCKED``
  never shows here, nor do statement timeouts);
- no database restart: recovery ignores ``pg_postmaster_start_time`` (a lease never gets the
  extra grace PostgreSQL gives it after a restart);
- ``input_regex`` is a Python regex, not a POSIX one (they agree on simple patterns);
- the order of several tasks claimed for one slot is the claim order (PostgreSQL's ``RETURNING``
  promises no order);
- a hand-off copies the whole state to roll back on a rejected message: fine for tests, not for
  millions of tasks.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from scalebox_hpc.errors import DatabaseError, InvalidMessageError, InvalidValueError, NotFoundError, PipelineError
from scalebox_hpc.models import (
    AppStatus,
    Beat,
    Completion,
    ConflictAction,
    LeaseLostError,
    Message,
    ModuleRef,
    SlotWant,
    Task,
    TaskResult,
    TaskStatus,
    route,
    stall_retries,
    storable_text,
    usage_columns,
)
from scalebox_hpc.pipeline import AppSpec

__all__ = ["FakeClock", "InMemoryQueue", "QueueClock", "SystemClock", "app_spec"]

OUTPUT_TAIL_BYTES = 64 * 1024
"""Stdout/stderr kept per execution (as PgQueue keeps them)."""
SLOT_STATUSES = frozenset({"STARTING", "READY", "RUNNING", "ERROR", "EXITED", "LOST"})
LIVE_SLOT_STATUSES = frozenset({"STARTING", "READY", "RUNNING"})
RECOVER_LIMIT = 1000
"""Expired leases recovered (and bound tasks released) per call, as in the SQL."""


# -- clocks ------------------------------------------------------------------------------------
class QueueClock(Protocol):
    """What the queue needs of time: the wall clock its leases and records use."""

    def now(self) -> datetime: ...


class SystemClock:
    """Real time."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def now(self) -> datetime:
        """The current UTC time."""
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        """``time.sleep``."""
        time.sleep(seconds)


class FakeClock:
    """Time that moves only when told (:meth:`advance`, :meth:`sleep`); thread-safe. Also
    satisfies ``launcher.ports.Clock``."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 0.0
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        """Seconds advanced so far."""
        with self._lock:
            return self._mono

    def now(self) -> datetime:
        """The fake wall clock."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        with self._lock:
            self._mono += seconds
            self._now += timedelta(seconds=seconds)

    def sleep(self, seconds: float) -> None:
        """Sleeping is advancing: no real time passes."""
        self.advance(seconds)


# -- rows ---------------------------------------------------------------------------------------
@dataclass
class _App:
    id: int
    name: str
    status: str
    spec: dict[str, Any]
    uid: str
    result: str | None = None
    cancelled: bool = False
    finished_at: datetime | None = None
    semaphores: dict[str, int] = field(default_factory=dict)


@dataclass
class _Module:
    id: int
    app_id: int
    name: str
    seq: int
    sink_modules: tuple[str, ...]
    conflict_action: ConflictAction
    stall_retries: int
    max_pending: int | None
    spec: dict[str, Any]
    locality_wait_seconds: float
    input_regex: str | None
    dist_mode: str | None

    def ref(self) -> ModuleRef:
        return ModuleRef(self.id, self.name, self.sink_modules, self.conflict_action, self.dist_mode)


@dataclass
class _Slot:
    id: int
    module_id: int
    host: str
    seq: int
    pid: int
    work_dir: str
    heartbeat_seconds: float
    started_at: datetime
    heartbeat_at: datetime
    status: str = "STARTING"
    message: str | None = None
    tasks_done: int = 0
    ended_at: datetime | None = None
    waiting: str | None = None
    live_output: dict[str, Any] | None = None


@dataclass
class _Task:
    id: int
    app_id: int
    module_id: int
    body: str
    headers: dict[str, Any]
    status: int
    created_at: datetime
    to_host: str | None = None
    to_slot: int | None = None
    pref_host: str | None = None
    pref_until: datetime | None = None
    pref_partial: bool = False
    attempts: int = 0
    retry_base: int = 0
    slot_id: int | None = None
    host: str | None = None
    heartbeat_at: datetime | None = None
    lease_expires_at: datetime | None = None
    from_task_id: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def as_task(self) -> Task:
        return Task(id=self.id, app_id=self.app_id, module_id=self.module_id, body=self.body,
                    headers=dict(self.headers), status=int(self.status), attempts=self.attempts,
                    retry_base=self.retry_base)

    def release(self) -> None:
        """Back to READY, the attempt not counted (release_tasks / the stray release)."""
        self.status, self.slot_id, self.host = TaskStatus.READY, None, None
        self.heartbeat_at = self.lease_expires_at = self.started_at = None
        self.attempts = max(self.attempts - 1, 0)


@dataclass
class _State:
    """Every table; copied whole to roll a hand-off back."""

    apps: dict[int, _App] = field(default_factory=dict)
    modules: dict[int, _Module] = field(default_factory=dict)
    slots: dict[int, _Slot] = field(default_factory=dict)
    tasks: dict[int, _Task] = field(default_factory=dict)
    by_body: dict[tuple[int, str], int] = field(default_factory=dict)
    """(module id, body) → task id: the unique (module_id, body_sha) index."""
    execs: list[dict[str, Any]] = field(default_factory=list)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    scratch: dict[tuple[str, str], int] = field(default_factory=dict)
    """(key, host) → bytes."""
    ids: dict[str, int] = field(default_factory=dict)

    def next_id(self, table: str) -> int:
        self.ids[table] = self.ids.get(table, 0) + 1
        return self.ids[table]


_PORT_METHODS = (
    "modules", "module_specs", "claim", "claim_for_slots", "app_cancelled", "complete", "recover_expired",
    "heartbeat", "heartbeat_slots", "app_uid", "index_scratch", "adopt_tasks", "release", "module_activity",
    "register_host", "create_slot", "set_slot_status", "complete_many", "release_ids",
)
"""The port methods :meth:`InMemoryQueue.fail_next` can make fail (``close`` never fails)."""


class InMemoryQueue:
    """The queue ports (``TaskQueue`` + ``BatchQueue``) over plain Python data, one lock around
    every call (launcher slots run in threads; share one instance between them, e.g.
    ``queue_factory=lambda: queue``: :meth:`close` does nothing).

    ``clock`` supplies the time of leases and records (default: real time; pass a
    :class:`FakeClock` to expire leases without waiting). ``notify`` is called with a module id
    whenever tasks of it become READY, as PostgreSQL's NOTIFY trigger does (pass
    ``Wakeups.notify`` to wake waiting slots at once)."""

    def __init__(self, *, clock: QueueClock | None = None, notify: Callable[[int], None] | None = None) -> None:
        self.clock: QueueClock = clock or SystemClock()
        self.notify = notify
        self.calls: Counter[str] = Counter()
        """How many times each port method was called (failed calls included)."""
        self._s = _State()
        self._lock = threading.RLock()
        self._failures: list[tuple[int, BaseException, frozenset[str] | None]] = []
        self._ready: set[int] = set()

    # -- the machinery ----------------------------------------------------------------------
    @contextmanager
    def _call(self, name: str) -> Iterator[_State]:
        """One port call: counted, maybe failed by :meth:`fail_next`, atomic under the lock;
        the modules that got READY tasks are notified after the lock is released."""
        with self._lock:
            self.calls[name] += 1
            self._maybe_fail(name)
            yield self._s
            ready, self._ready = self._ready, set()
        if self.notify is not None:
            for module_id in sorted(ready):
                self.notify(module_id)

    def _maybe_fail(self, name: str) -> None:
        for i, (left, exc, methods) in enumerate(self._failures):
            if methods is None or name in methods:
                if left <= 1:
                    del self._failures[i]
                else:
                    self._failures[i] = (left - 1, exc, methods)
                raise exc

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """All or nothing: the state as it was comes back when the block raises."""
        saved = copy.deepcopy(self._s)
        ready = set(self._ready)
        try:
            yield
        except BaseException:
            self._s, self._ready = saved, ready
            raise

    def _now(self) -> datetime:
        return self.clock.now()

    def _app(self, app_id: int) -> _App:
        app = self._s.apps.get(app_id)
        if app is None:
            raise NotFoundError("app", app_id)
        return app

    def _modules_of(self, app_id: int) -> list[_Module]:
        return sorted((m for m in self._s.modules.values() if m.app_id == app_id), key=lambda m: m.seq)

    # -- test-facing helpers ------------------------------------------------------------------
    def fail_next(
        self, n: int = 1, exc: BaseException | None = None, *, methods: Collection[str] | None = None,
    ) -> None:
        """Make the next ``n`` port calls (only those named in ``methods``, if given) raise
        ``exc`` (default: a DatabaseError as an outage gives) before doing anything."""
        if methods is not None and (unknown := set(methods) - set(_PORT_METHODS)):
            raise ValueError(f"not port methods: {sorted(unknown)}")
        error = exc if exc is not None else DatabaseError("cannot reach PostgreSQL: in-memory outage")
        with self._lock:
            self._failures.append((n, error, None if methods is None else frozenset(methods)))

    def heal(self) -> None:
        """End every outage :meth:`fail_next` announced."""
        with self._lock:
            self._failures.clear()

    def create_app(self, spec: AppSpec | Mapping[str, Any]) -> int:
        """Create an app, its modules and start tasks (as ``db.apps.create_app``); returns its id.
        ``spec``: a loaded pipeline, or a mapping in the pipeline file's shape (see :func:`app_spec`)."""
        from scalebox_hpc.db.apps import start_messages  # the one expansion of start_task

        if not isinstance(spec, AppSpec):
            spec = app_spec(spec)
        with self._lock:
            s = self._s
            status = AppStatus.INITIAL if spec.parameters.initial_status == "INITIAL" else AppStatus.RUNNING
            app = _App(id=s.next_id("app"), name=spec.name, status=status.value,
                       spec=spec.model_dump(mode="json"), uid=str(uuid.uuid4()))
            s.apps[app.id] = app
            refs: dict[str, ModuleRef] = {}
            for seq, m in enumerate(spec.modules):
                args = m.arguments
                module = _Module(
                    id=s.next_id("module"), app_id=app.id, name=m.name, seq=seq, sink_modules=tuple(m.sink_modules),
                    conflict_action=args.conflict_action, stall_retries=stall_retries(m.parameters.retry_rules),
                    max_pending=args.max_pending, spec=m.model_dump(mode="json"),
                    locality_wait_seconds=args.locality_wait_seconds
                    if args.locality_wait_seconds is not None else 10.0,
                    input_regex=args.input_regex, dist_mode=args.task_dist_mode,
                )
                s.modules[module.id] = module
                refs[m.name] = module.ref()
            self._insert(app.id, route(refs, None, start_messages(spec)), TaskStatus.READY, ConflictAction.IGNORE,
                         None)
            return app.id

    def add_tasks(
        self, app_id: int, module: str | None, messages: Iterable[Message | str], *, initial: bool = False,
    ) -> int:
        """Add tasks to a module (None: the first), as ``db.apps.add_tasks``; returns rows written.
        A duplicate body under CONFLICT_ACTION=FAIL raises InvalidMessageError, nothing written."""
        with self._lock:
            refs = {m.name: m.ref() for m in self._modules_of(app_id)}
            if not refs:
                raise NotFoundError("app", app_id)
            target = module or next(iter(refs))
            if target not in refs:
                raise NotFoundError("module", target)
            msgs = [Message(m) if isinstance(m, str) else m for m in messages]
            for m in msgs:
                if m.module is not None and m.module not in refs:
                    raise NotFoundError("module", m.module)
            routed = [(refs[m.module or target], m) for m in msgs]
            status = TaskStatus.INITIAL if initial else TaskStatus.READY
            with self._transaction():
                return self._insert(app_id, routed, status, None, None)

    def tasks(self, app_id: int | None = None, *, module: str | None = None) -> list[dict[str, Any]]:
        """Task rows (the columns of ``sbx_tasks`` plus ``module``, the module's name), by id."""
        with self._lock:
            names = {m.id: m.name for m in self._s.modules.values()}
            rows = []
            for t in sorted(self._s.tasks.values(), key=lambda t: t.id):
                if (app_id is None or t.app_id == app_id) and (module is None or names[t.module_id] == module):
                    rows.append({**copy.deepcopy(asdict(t)), "status": int(t.status), "module": names[t.module_id]})
            return rows

    def executions(self, task_id: int) -> list[dict[str, Any]]:
        """The execution records of a task, oldest first."""
        with self._lock:
            return [copy.deepcopy(e) for e in self._s.execs if e["task_id"] == task_id]

    def app(self, app_id: int) -> dict[str, Any]:
        """The app row (``status``, ``result``, ``cancelled``, ...)."""
        with self._lock:
            return copy.deepcopy(asdict(self._app(app_id)))

    def slots(self, app_id: int | None = None) -> list[dict[str, Any]]:
        """Slot rows, by id."""
        with self._lock:
            return [copy.deepcopy(asdict(s)) for s in sorted(self._s.slots.values(), key=lambda s: s.id)
                    if app_id is None or self._s.modules[s.module_id].app_id == app_id]

    def scratch(self, host: str) -> dict[str, int]:
        """What the scratch index holds for ``host``: key → bytes."""
        with self._lock:
            return {k: b for (k, h), b in sorted(self._s.scratch.items()) if h == host}

    def set_app_status(self, app_id: int, status: AppStatus | str) -> None:
        """Pause / resume / start an app (a FINISHED app stays finished)."""
        with self._lock:
            app = self._app(app_id)
            if app.status != AppStatus.FINISHED:
                app.status = AppStatus(status).value

    def finish_app(self, app_id: int, result: str) -> None:
        """``scalebox app set-finished``: FINISHED, the first result text wins."""
        with self._lock:
            self._finish(self._app(app_id), result)

    def cancel_app(self, app_id: int) -> None:
        """``scalebox app cancel``: FINISHED, cancelled, result 'cancelled' unless one was set."""
        with self._lock:
            app = self._app(app_id)
            app.cancelled = True
            self._finish(app, "cancelled")

    def semaphore_create(self, app_id: int, name: str, value: int) -> None:
        """Create (or reset) a semaphore."""
        with self._lock:
            self._app(app_id).semaphores[name] = value

    def semaphore_get(self, app_id: int, name: str) -> int:
        """A semaphore's value; NotFoundError when there is none."""
        with self._lock:
            sems = self._app(app_id).semaphores
            if name not in sems:
                raise NotFoundError("semaphore", name)
            return sems[name]

    def retry_tasks(self, task_ids: Sequence[int]) -> list[int]:
        """``scalebox task retry``: terminal tasks become READY with a fresh attempt budget."""
        with self._lock:
            changed = []
            for tid in task_ids:
                t = self._s.tasks.get(tid)
                if t is None or t.status in (TaskStatus.READY, TaskStatus.RUNNING):
                    continue
                t.status, t.slot_id, t.host = TaskStatus.READY, None, None
                t.started_at = t.finished_at = t.heartbeat_at = t.lease_expires_at = None
                t.retry_base = t.attempts
                self._ready.add(t.module_id)
                changed.append(tid)
            return changed

    # -- message inserts (sbx_insert_messages_v1) ----------------------------------------------
    def _insert(
        self, app_id: int, routed: Iterable[tuple[ModuleRef, Message]], status: int,
        conflict: ConflictAction | None, from_task_id: int | None,
    ) -> int:
        """Insert messages as tasks, each by its target's CONFLICT_ACTION (or ``conflict``);
        returns rows written. FAIL on an existing body (or twice the same body in one call)
        raises InvalidMessageError; the caller's transaction rolls back what was written."""
        s, now = self._s, self._now()
        written = 0
        rows = list(routed)
        # the SQL inserts the FAIL rows first, then IGNORE, then OVERWRITE (one statement each)
        order = {ConflictAction.FAIL: 0, ConflictAction.IGNORE: 1, ConflictAction.OVERWRITE: 2}
        rows.sort(key=lambda r: order[conflict or r[0].conflict_action])
        overwritten: set[tuple[int, str]] = set()  # OVERWRITE writes a body once per call: the last wins
        for ref, msg in rows:
            action = conflict or ref.conflict_action
            key = (ref.id, msg.body)
            existing = s.by_body.get(key)
            to_slot = msg.headers.get("to_slot")
            to_host = msg.headers.get("to_host")
            new = _Task(id=0, app_id=app_id, module_id=ref.id, body=msg.body, headers=copy.deepcopy(msg.headers),
                        status=status, created_at=now, to_host=None if to_host is None else str(to_host),
                        to_slot=int(to_slot) if to_slot not in (None, "") else None, from_task_id=from_task_id)
            self._locality(new)
            if existing is None:
                new.id = s.next_id("task")
                s.tasks[new.id] = new
                s.by_body[key] = new.id
            elif action == ConflictAction.FAIL:
                raise InvalidMessageError(
                    "a message body already exists in its module (CONFLICT_ACTION=FAIL)",
                    hint="set arguments.conflict_action to IGNORE or OVERWRITE, or use distinct bodies",
                )
            elif action == ConflictAction.IGNORE:
                continue
            else:  # OVERWRITE: the old task becomes the new message, unless it runs right now
                old = s.tasks[existing]
                if old.status == TaskStatus.RUNNING:
                    continue
                new.id = old.id
                s.tasks[old.id] = new
                if key in overwritten:
                    continue
            if action == ConflictAction.OVERWRITE:
                overwritten.add(key)
            written += 1
            if status == TaskStatus.READY:
                self._ready.add(ref.id)
        return written

    def _locality(self, t: _Task) -> None:
        """The insert trigger sbx_task_locality_v1: a bound task prefers its host; one naming
        inputs the live host holding most of them, for the module's locality wait."""
        module = self._s.modules[t.module_id]
        if t.to_host is not None:
            t.pref_host, t.pref_partial = t.to_host, False
        else:
            best = self._best_holder(_inputs(t.headers, t.body, module.input_regex), live_only=True, also=None)
            t.pref_host, t.pref_partial = best if best else (None, False)
        if t.pref_host is not None:
            t.pref_until = self._now() + timedelta(seconds=module.locality_wait_seconds)

    def _best_holder(self, inputs: list[str], *, live_only: bool, also: str | None) -> tuple[str, bool] | None:
        """The host holding most of ``inputs`` (then most bytes, then by name); partial when it
        holds fewer than all. ``live_only``: among live hosts and ``also``; else every host,
        live ones and ``also`` first at a tie of counts (sbx_adopt_tasks_v1)."""
        wanted = set(inputs)
        if not wanted:
            return None
        held: dict[str, list[int]] = {}
        for (key, host), size in self._s.scratch.items():
            if key in wanted:
                held.setdefault(host, []).append(size)
        ranked = []
        for host, sizes in held.items():
            live = host == also or self._host_live(host)
            if live_only and not live:
                continue
            ranked.append(((-len(sizes), 0 if live_only else -int(live), -sum(sizes), host), host, len(sizes)))
        if not ranked:
            return None
        _, host, count = min(ranked)
        return host, count < len(wanted)

    def _host_live(self, host: str) -> bool:
        """sbx_host_live: one of its slots heart-beats within two of its own intervals."""
        now = self._now()
        return any(s.host == host and s.status in LIVE_SLOT_STATUSES
                   and s.heartbeat_at > now - timedelta(seconds=2 * s.heartbeat_seconds)
                   for s in self._s.slots.values())

    def _finish(self, app: _App, result: str) -> None:
        app.status = AppStatus.FINISHED.value
        app.result = app.result if app.result is not None else result
        app.finished_at = app.finished_at or self._now()

    # -- modules --------------------------------------------------------------------------------
    def modules(self, app_id: int) -> dict[str, ModuleRef]:
        """The app's modules by name; NotFoundError when the app does not exist."""
        with self._call("modules"):
            refs = {m.name: m.ref() for m in self._modules_of(app_id)}
            if not refs:
                raise NotFoundError("app", app_id)
            return refs

    def module_specs(self, app_id: int) -> dict[str, dict[str, Any]]:
        """The app's stored module specs (pipeline.ModuleSpec as JSON) by name."""
        with self._call("module_specs"):
            return {m.name: copy.deepcopy(m.spec) for m in self._modules_of(app_id)}

    # -- claims -----------------------------------------------------------------------------------
    def claim(
        self, app_id: int, module_id: int, *, host: str, slot_id: int, slot_seq: int,
        limit: int = 1, lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> list[Task]:
        """Claim up to ``limit`` READY tasks for one slot (the one-slot case of :meth:`claim_for_slots`)."""
        with self._call("claim"):
            got = self._claim(app_id, module_id, host, [SlotWant(slot_id, slot_seq, limit)], lease_seconds, semaphore)
            return got.get(slot_id, [])

    def claim_for_slots(
        self, app_id: int, module_id: int, *, host: str, slots: Sequence[SlotWant],
        lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> dict[int, list[Task]]:
        """Claim for several slots of one module on ``host`` at once: a task addressed to a slot's
        seq goes to it, the others are dealt round-robin, oldest first, at most ``want`` each.
        With a ``semaphore``, one unit per claimed task (the units not used go back)."""
        with self._call("claim_for_slots"):
            return self._claim(app_id, module_id, host, slots, lease_seconds, semaphore)

    def _claim(
        self, app_id: int, module_id: int, host: str, slots: Sequence[SlotWant], lease_seconds: float,
        semaphore: str | None,
    ) -> dict[int, list[Task]]:
        slots = [s for s in slots if s.want > 0]
        limit = sum(s.want for s in slots)
        if not limit:
            return {}
        sems: dict[str, int] = {}
        if semaphore is not None:  # semaphore_take_many: up to `limit` units while positive
            app = self._s.apps.get(app_id)
            sems = app.semaphores if app is not None else {}
            if sems.get(semaphore, 0) <= 0:
                return {}
            limit = min(limit, sems[semaphore])
            sems[semaphore] -= limit
        picked = self._candidates(app_id, module_id, host, {s.slot_seq for s in slots}, limit)
        if picked and (unknown := [s.slot_id for s in slots if s.slot_id not in self._s.slots]):
            # the foreign key sbx_tasks.slot_id: checked only when a task would be written
            if semaphore is not None:
                sems[semaphore] += limit
            raise NotFoundError("slot", unknown[0])
        if semaphore is not None:
            sems[semaphore] += limit - len(picked)
        return self._deal(picked, slots, host, lease_seconds)

    def _candidates(self, app_id: int, module_id: int, host: str, seqs: set[int], limit: int) -> list[_Task]:
        """The tasks claim_tasks takes, best first: those preferring this host, then those
        preferring another whose locality wait is over, then those preferring none."""
        s, now = self._s, self._now()
        app = s.apps.get(app_id)
        if app is None or app.status != AppStatus.RUNNING or self._sinks_full(module_id):
            return []
        ready = [t for t in s.tasks.values() if t.module_id == module_id and t.status == TaskStatus.READY
                 and (t.to_slot is None or t.to_slot in seqs)]
        local = sorted((t for t in ready if t.pref_host == host), key=lambda t: (t.pref_partial, t.id))
        waited = sorted((t for t in ready if t.to_host is None and t.pref_host is not None and t.pref_host != host
                         and t.pref_until is not None and t.pref_until <= now),
                        key=lambda t: (t.pref_until or now, t.id))
        free = sorted((t for t in ready if t.to_host is None and t.pref_host is None), key=lambda t: t.id)
        return list(itertools.islice(itertools.chain(local, waited, free), limit))

    def _sinks_full(self, module_id: int) -> bool:
        """Back-pressure: a sink module with ``max_pending`` has that many READY tasks."""
        me = self._s.modules.get(module_id)
        if me is None:
            return False
        for sink in self._s.modules.values():
            if sink.app_id == me.app_id and sink.name in me.sink_modules and sink.max_pending is not None:
                ready = sum(1 for t in self._s.tasks.values()
                            if t.module_id == sink.id and t.status == TaskStatus.READY)
                if ready >= sink.max_pending:
                    return True
        return False

    def _deal(
        self, picked: list[_Task], slots: Sequence[SlotWant], host: str, lease_seconds: float,
    ) -> dict[int, list[Task]]:
        """Seats round-robin over the slots (every slot's first task before any second); a task
        addressed to a slot's seq goes to the first such slot."""
        seats = [s.slot_id for k in range(max(s.want for s in slots)) for s in slots if k < s.want]
        free_seats = iter(seats)
        now = self._now()
        out: dict[int, list[Task]] = {}
        for t in picked:
            if t.to_slot is None:
                slot_id = next(free_seats)
            else:
                slot_id = next(s.slot_id for s in slots if s.slot_seq == t.to_slot)
            t.status, t.slot_id, t.host = TaskStatus.RUNNING, slot_id, host
            t.attempts += 1
            t.started_at = t.heartbeat_at = now
            t.finished_at = None
            t.lease_expires_at = now + timedelta(seconds=lease_seconds)
            out.setdefault(slot_id, []).append(t.as_task())
        return out

    def app_cancelled(self, app_id: int) -> bool:
        """True once the app was cancelled (False for an app that does not exist)."""
        with self._call("app_cancelled"):
            app = self._s.apps.get(app_id)
            return bool(app and app.cancelled)

    # -- hand-offs ----------------------------------------------------------------------------------
    def complete(
        self, task: Task, result: TaskResult, *, slot_id: int, host: str, sender: ModuleRef,
        modules: dict[str, ModuleRef], requeue: bool = False,
    ) -> int:
        """The hand-off: the result, its execution record and the emitted messages, atomically.
        Returns the messages written; LeaseLostError (nothing recorded) when the slot no longer
        holds this attempt of the task. A message that cannot be routed or stored makes the task
        EMIT_FAILED (-102) with nothing emitted. ``requeue``: recorded, then READY again."""
        with self._call("complete"):
            return self._complete_routed(task, result, slot_id, host, sender, modules, requeue)

    def _complete_routed(
        self, task: Task, result: TaskResult, slot_id: int, host: str, sender: ModuleRef,
        modules: dict[str, ModuleRef], requeue: bool,
    ) -> int:
        try:
            routed = route(modules, sender, result.messages)
            with self._transaction():
                return self._complete(task, result, slot_id, host, routed, requeue)
        except InvalidMessageError as exc:
            with self._transaction():
                self._complete(task, _emit_failed(result, str(exc)), slot_id, host, [], False)
            return 0

    def _complete(
        self, task: Task, result: TaskResult, slot_id: int, host: str,
        routed: list[tuple[ModuleRef, Message]], requeue: bool,
    ) -> int:
        """sbx_complete_task_v2 (the caller holds a transaction)."""
        s, now = self._s, self._now()
        t = s.tasks.get(task.id)
        if t is None or t.slot_id != slot_id or t.status != TaskStatus.RUNNING or t.attempts != task.attempts:
            raise LeaseLostError(task.id)
        if requeue:
            t.status, t.slot_id, t.host = TaskStatus.READY, None, None
            t.heartbeat_at = t.lease_expires_at = t.started_at = t.finished_at = None
            self._ready.add(t.module_id)
        else:
            t.status, t.finished_at, t.lease_expires_at, t.heartbeat_at = result.status, now, None, now
        s.execs.append(_exec_record(s.next_id("exec"), t, slot_id, host, result))
        written = self._insert(t.app_id, routed, TaskStatus.READY, None, t.id) if routed else 0
        if result.finish_text is not None:
            self._finish(s.apps[t.app_id], result.finish_text)
        return written

    def complete_many(
        self, items: Sequence[Completion], *, slot_id: int, sender: ModuleRef, modules: dict[str, ModuleRef],
    ) -> list[int | None]:
        """The hand-off of a batch, atomically: per item the messages written, or None when its
        lease was lost. A duplicate body under CONFLICT_ACTION=FAIL rolls the batch back and it is
        recorded item by item instead (that item EMIT_FAILED, the others as they are)."""
        with self._call("complete_many"):
            try:
                with self._transaction():
                    out: list[int | None] = []
                    for item in items:
                        result, requeue = item.result, item.requeue
                        try:
                            routed = route(modules, item.sender or sender, result.messages)
                        except InvalidMessageError as exc:
                            result, requeue, routed = _emit_failed(result, str(exc)), False, []
                        try:
                            out.append(self._complete(item.task, result, item.slot_id or slot_id, item.host,
                                                      routed, requeue))
                        except LeaseLostError:
                            out.append(None)
                    return out
            except InvalidMessageError:
                one_by_one: list[int | None] = []
                for item in items:
                    try:
                        one_by_one.append(self._complete_routed(
                            item.task, item.result, item.slot_id or slot_id, item.host, item.sender or sender,
                            modules, item.requeue))
                    except LeaseLostError:
                        one_by_one.append(None)
                return one_by_one

    # -- leases -------------------------------------------------------------------------------------
    def release(self, slot_id: int) -> int:
        """Give the slot's RUNNING tasks back to READY, the attempt not counted; returns how many."""
        with self._call("release"):
            return len(self._release(slot_id, None))

    def release_ids(self, slot_id: int, task_ids: Sequence[int]) -> int:
        """Give some of the slot's RUNNING tasks back to READY, the attempt not counted."""
        with self._call("release_ids"):
            return len(self._release(slot_id, set(task_ids))) if task_ids else 0

    def _release(self, slot_id: int, ids: set[int] | None) -> list[int]:
        out = []
        for t in self._s.tasks.values():
            if t.slot_id == slot_id and t.status == TaskStatus.RUNNING and (ids is None or t.id in ids):
                t.release()
                self._ready.add(t.module_id)
                out.append(t.id)
        return out

    def heartbeat(
        self, slot_id: int, *, status: str, lease_seconds: float, task_ids: Sequence[int] | None = None,
    ) -> list[int]:
        """Renew the slot and the leases of its RUNNING tasks in ``task_ids`` (None: all); release
        those it does not name that were claimed over a lease ago (a lost claim reply)."""
        with self._call("heartbeat"):
            return self._beat([Beat(slot_id, status, lease_seconds, None if task_ids is None else tuple(task_ids))])

    def heartbeat_slots(self, beats: Sequence[Beat]) -> list[int]:
        """:meth:`heartbeat` for every slot in ``beats`` at once; returns the stray tasks released."""
        with self._call("heartbeat_slots"):
            return self._beat(beats)

    def _beat(self, beats: Sequence[Beat]) -> list[int]:
        s, now = self._s, self._now()
        released = []
        for b in beats:
            slot = s.slots.get(b.slot_id)
            if slot is not None and slot.status not in ("ERROR", "EXITED"):
                _check_slot_status(b.status)
                slot.heartbeat_at, slot.status, slot.waiting = now, b.status, b.waiting
                if b.output is not None:  # None: unchanged
                    slot.live_output = dict(b.output)
            known = None if b.task_ids is None else set(b.task_ids)
            for t in s.tasks.values():
                if t.slot_id != b.slot_id or t.status != TaskStatus.RUNNING:
                    continue
                if known is None or t.id in known:
                    t.heartbeat_at, t.lease_expires_at = now, now + timedelta(seconds=b.lease_seconds)
                elif t.started_at is not None and t.started_at < now - timedelta(seconds=b.lease_seconds):
                    t.release()
                    self._ready.add(t.module_id)
                    released.append(t.id)
        return sorted(released)

    def recover_expired(self) -> list[tuple[int, int]]:
        """Expired leases: an execution record with 123, then READY while the module's stall
        retries allow, else 123; slots silent for two of their own heartbeats become LOST; READY
        tasks bound to a dead host past their locality wait are unbound. Returns (id, status)."""
        with self._call("recover_expired"):
            s, now = self._s, self._now()
            expired = sorted((t for t in s.tasks.values() if t.status == TaskStatus.RUNNING
                              and t.lease_expires_at is not None and t.lease_expires_at < now),
                             key=lambda t: (t.lease_expires_at or now, t.id))[:RECOVER_LIMIT]
            out = []
            for t in expired:
                s.execs.append({
                    "id": s.next_id("exec"), "task_id": t.id, "attempt": t.attempts, "slot_id": t.slot_id,
                    "host": t.host, "status": TaskStatus.STALLED, "started_at": t.started_at or now,
                    "finished_at": now, "stdout": "",
                    "stderr": f"scalebox: lease expired (slot {t.slot_id if t.slot_id is not None else '?'} on "
                              f"{t.host or '?'} stopped heart-beating)",
                    "input_bytes": None, "output_bytes": None, "input_files": [], "output_files": [],
                    "user_text": None, "timestamps": [], "cpu_user_s": None, "cpu_system_s": None,
                    "max_rss_kb": None,
                })
                again = t.attempts - t.retry_base <= s.modules[t.module_id].stall_retries
                if again:
                    t.status, t.finished_at, t.started_at = TaskStatus.READY, None, None
                    self._ready.add(t.module_id)
                else:
                    t.status, t.finished_at = TaskStatus.STALLED, now
                t.slot_id = None
                t.heartbeat_at = t.lease_expires_at = None
                out.append((t.id, int(t.status)))
            # the SQL marks slots LOST in the same statement, from the same snapshot
            for slot in s.slots.values():
                if slot.status in LIVE_SLOT_STATUSES and \
                        slot.heartbeat_at < now - timedelta(seconds=2 * slot.heartbeat_seconds):
                    slot.status, slot.ended_at = "LOST", now
                    slot.message = f"no heartbeat since {slot.heartbeat_at.isoformat()}"
            self._release_bound()
            return out

    def _release_bound(self) -> int:
        """sbx_release_bound_v1: bound READY tasks of a dead host, past their wait, run anywhere."""
        now, n = self._now(), 0
        dead: dict[str, bool] = {}
        for t in sorted(self._s.tasks.values(), key=lambda t: t.id):
            if t.status != TaskStatus.READY or t.to_host is None:
                continue
            if t.to_host not in dead:
                dead[t.to_host] = not self._host_live(t.to_host)
            if dead[t.to_host] and (t.pref_until is None or t.pref_until <= now) and n < RECOVER_LIMIT:
                t.to_host = t.pref_host = t.pref_until = None
                t.to_slot, t.pref_partial = None, False
                self._ready.add(t.module_id)
                n += 1
        return n

    # -- app state ----------------------------------------------------------------------------------
    def app_uid(self, app_id: int) -> str:
        """The app's uid; NotFoundError when there is no such app."""
        with self._call("app_uid"):
            return self._app(app_id).uid

    def module_activity(self, app_id: int, module_id: int) -> tuple[str, bool]:
        """(app status, active): active while the module, or any module upstream of it
        (transitively along ``sink_modules``), has a task READY or RUNNING."""
        with self._call("module_activity"):
            app = self._app(app_id)
            mods = self._modules_of(app_id)
            upstream = {m.id for m in mods if m.id == module_id}
            names = {m.name for m in mods if m.id in upstream}
            grew = bool(upstream)
            while grew:
                grew = False
                for m in mods:
                    if m.id not in upstream and names.intersection(m.sink_modules):
                        upstream.add(m.id)
                        names.add(m.name)
                        grew = True
            active = any(t.module_id in upstream and t.status in (TaskStatus.READY, TaskStatus.RUNNING)
                         for t in self._s.tasks.values())
            return app.status, active

    # -- slots, hosts, scratch ----------------------------------------------------------------------
    def register_host(self, name: str, info: dict[str, Any]) -> None:
        """Record (or refresh) a host."""
        with self._call("register_host"):
            self._s.hosts[name] = copy.deepcopy(info)

    def create_slot(
        self, module_id: int, *, host: str, seq: int, pid: int, work_dir: str, heartbeat_seconds: float = 10.0,
    ) -> int:
        """Register a slot (STARTING); returns its id. NotFoundError for an unknown module."""
        with self._call("create_slot"):
            if module_id not in self._s.modules:
                raise NotFoundError("module", module_id)
            now = self._now()
            slot = _Slot(id=self._s.next_id("slot"), module_id=module_id, host=host, seq=seq, pid=pid,
                         work_dir=work_dir, heartbeat_seconds=heartbeat_seconds, started_at=now, heartbeat_at=now)
            self._s.slots[slot.id] = slot
            return slot.id

    def set_slot_status(
        self, slot_id: int, status: str, *, message: str | None = None, tasks_done: int = 0,
    ) -> None:
        """Update a slot's status (READY, RUNNING, ERROR, EXITED); an unknown slot is no error."""
        with self._call("set_slot_status"):
            _check_slot_status(status)
            slot = self._s.slots.get(slot_id)
            if slot is None:
                return
            now = self._now()
            slot.status, slot.heartbeat_at = status, now
            slot.message = message if message is not None else slot.message
            slot.tasks_done += tasks_done
            if status in ("ERROR", "EXITED"):
                slot.ended_at = now

    def index_scratch(
        self, host: str, added: list[tuple[str, int]], removed: list[str], *, replace: bool = False,
    ) -> None:
        """Record files in (and gone from) ``host``'s scratch; ``replace``: the list is all it holds."""
        with self._call("index_scratch"):
            sc = self._s.scratch
            if replace:
                for entry in [e for e in sc if e[1] == host]:
                    del sc[entry]
            for key in removed:
                sc.pop((key, host), None)
            for key, size in added:
                sc[(key, host)] = size

    def adopt_tasks(self, app_id: int, host: str, *, limit: int = 100_000) -> int:
        """READY tasks naming inputs that prefer no live host now prefer the best holder among
        every host in the scratch index (live ones and ``host`` first at a tie); returns how many."""
        with self._call("adopt_tasks"):
            s, now, n = self._s, self._now(), 0
            candidates = [t for t in sorted(s.tasks.values(), key=lambda t: t.id)
                          if t.app_id == app_id and t.status == TaskStatus.READY and t.to_host is None
                          and (isinstance(t.headers.get("inputs"), list)
                               or s.modules[t.module_id].input_regex is not None)
                          and (t.pref_host is None or (t.pref_host != host and not self._host_live(t.pref_host)))]
            for t in candidates[:limit]:
                module = s.modules[t.module_id]
                best = self._best_holder(_inputs(t.headers, t.body, module.input_regex), live_only=False, also=host)
                if best is None or best[0] == t.pref_host:
                    continue
                t.pref_host, t.pref_partial = best
                t.pref_until = now + timedelta(seconds=module.locality_wait_seconds)
                n += 1
            return n

    def close(self) -> None:
        """Nothing to close: the queue lives as long as the object (slots share one instance)."""
        return None


# -- helpers ------------------------------------------------------------------------------------
def app_spec(data: Mapping[str, Any], app_dir: str | Path = "/nonexistent/scalebox-app") -> AppSpec:
    """An AppSpec from a mapping in the pipeline file's shape, without files: ``modules`` is a
    mapping of name to settings (or a list with names), ``code_path`` defaults to
    ``<app_dir>/<name>``. Sink names are checked; scripts are not (the queue never runs them)."""
    raw = dict(data)
    modules = raw.get("modules") or {}
    listed = [{**(body or {}), "name": name} for name, body in modules.items()] if isinstance(modules, Mapping) \
        else [dict(m) for m in modules]
    root = Path(app_dir)
    for body in listed:
        body.setdefault("code_path", str(root / str(body["name"])))
    spec = AppSpec.model_validate({**raw, "modules": listed, "app_dir": root})
    names = {m.name for m in spec.modules}
    for m in spec.modules:
        for sink in m.sink_modules:
            if sink not in names:
                raise PipelineError(f"unknown module {sink!r}", key=f"modules.{m.name}.sink_modules")
    return spec


def _check_slot_status(status: str) -> None:
    if status not in SLOT_STATUSES:  # the CHECK constraint of sbx_slots.status
        raise InvalidValueError(f"slot status {status!r} is not one of {sorted(SLOT_STATUSES)}")


def _inputs(headers: Mapping[str, Any], body: str, input_regex: str | None) -> list[str]:
    """sbx_task_inputs_v1: the ``inputs`` header, else what ``input_regex`` matches in the body
    (group 1, or the whole match)."""
    named = headers.get("inputs")
    if isinstance(named, list):
        return [v if isinstance(v, str) else _json_text(v) for v in named]
    if input_regex is None:
        return []
    match = re.search(input_regex, body)
    if match is None:
        return []
    found = match.group(1) if match.re.groups else match.group(0)
    return [] if found is None else [found]


def _json_text(value: Any) -> str:
    return json.dumps(value)


def _tail(text: str) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= OUTPUT_TAIL_BYTES:
        return text
    return data[-OUTPUT_TAIL_BYTES:].decode("utf-8", "ignore")


def _exec_record(exec_id: int, t: _Task, slot_id: int, host: str, result: TaskResult) -> dict[str, Any]:
    return {
        "id": exec_id, "task_id": t.id, "attempt": t.attempts, "slot_id": slot_id, "host": host,
        "status": result.status, "started_at": result.started_at, "finished_at": result.finished_at,
        "stdout": storable_text(_tail(result.stdout)), "stderr": storable_text(_tail(result.stderr)),
        "input_bytes": result.input_bytes, "output_bytes": result.output_bytes,
        "input_files": list(result.input_files), "output_files": list(result.output_files),
        "user_text": None if result.user_text is None else storable_text(result.user_text),
        "timestamps": copy.deepcopy(result.timestamps), **usage_columns(result.usage),
    }


def _emit_failed(result: TaskResult, reason: str) -> TaskResult:
    """The result recorded instead when the emitted messages are rejected (as PgQueue does)."""
    stderr = (result.stderr + f"\nscalebox: emitted messages rejected: {reason}\n").lstrip("\n")
    return TaskResult(
        status=TaskStatus.EMIT_FAILED, started_at=result.started_at, finished_at=result.finished_at,
        stdout=result.stdout, stderr=stderr, input_bytes=result.input_bytes, output_bytes=result.output_bytes,
        input_files=result.input_files, output_files=result.output_files, user_text=result.user_text,
        timestamps=result.timestamps, usage=result.usage,
    )


if TYPE_CHECKING:  # mypy holds the class to both ports
    from scalebox_hpc.launcher.ports import BatchQueue

    def _conforms(queue: InMemoryQueue) -> BatchQueue:
        return queue
