"""The in-memory queue's machinery (one lock, injected outages, transactions), its test-facing
helpers (create apps, add and inspect tasks) and message inserts."""

from __future__ import annotations

import copy
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from scalebox_hpc.errors import DatabaseError, InvalidMessageError, NotFoundError
from scalebox_hpc.models import (
    AppStatus,
    ConflictAction,
    Message,
    ModuleRef,
    TaskStatus,
    route,
    stall_retries,
)
from scalebox_hpc.pipeline import AppSpec
from scalebox_hpc.testing.clock import QueueClock, SystemClock
from scalebox_hpc.testing.rows import (
    LIVE_SLOT_STATUSES,
    _App,
    _inputs,
    _Module,
    _State,
    _Task,
)
from scalebox_hpc.testing.spec import app_spec

_PORT_METHODS = (
    "modules", "module_specs", "claim", "claim_for_slots", "app_cancelled", "complete", "recover_expired",
    "heartbeat", "heartbeat_slots", "app_uid", "index_scratch", "adopt_tasks", "release", "module_activity",
    "register_host", "create_slot", "set_slot_status", "complete_many", "release_ids", "task_service",
)
"""The port methods :meth:`InMemoryQueue.fail_next` can make fail (``close`` never fails)."""


class _QueueCore:
    """State, lock and test-facing helpers of :class:`~scalebox_hpc.testing.InMemoryQueue`."""

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

