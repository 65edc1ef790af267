"""The in-memory queue: hand-offs, leases, app state, slots, hosts and scratch over its claims."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from scalebox_hpc.errors import InvalidMessageError, NotFoundError
from scalebox_hpc.models import (
    RECOVER_LIMIT,
    Beat,
    Completion,
    LeaseLostError,
    Message,
    ModuleRef,
    Released,
    Task,
    TaskResult,
    TaskStatus,
    route,
)
from scalebox_hpc.testing.claims import _Claims
from scalebox_hpc.testing.rows import (
    LIVE_SLOT_STATUSES,
    _check_slot_status,
    _emit_failed,
    _exec_record,
    _inputs,
    _Slot,
)


class InMemoryQueue(_Claims):
    """The queue ports (``TaskQueue`` + ``BatchQueue``) over plain Python data, one lock around
    every call (launcher slots run in threads; share one instance between them, e.g.
    ``queue_factory=lambda: queue``: :meth:`close` does nothing).

    ``clock`` supplies the time of leases and records (default: real time; pass a
    :class:`FakeClock` to expire leases without waiting). ``notify`` is called with a module id
    whenever tasks of it become READY, as PostgreSQL's NOTIFY trigger does (pass
    ``Wakeups.notify`` to wake waiting slots at once)."""

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
    def release(self, slot_id: int) -> Released:
        """Give the slot's RUNNING tasks back to READY, the attempt not counted; returns how many
        (never busy: nothing else holds a row here)."""
        with self._call("release"):
            return Released(len(self._release(slot_id, None)))

    def release_ids(self, slot_id: int, task_ids: Sequence[int]) -> Released:
        """Give some of the slot's RUNNING tasks back to READY, the attempt not counted."""
        with self._call("release_ids"):
            return Released(len(self._release(slot_id, set(task_ids))) if task_ids else 0)

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
        """Renew the slot's lease, its RUNNING tasks' lease (0033); release those it does not
        name in ``task_ids`` (None: it knows all) that were claimed over a lease ago (a lost claim
        reply). Why the slot waits and its live output stay as they are (0034)."""
        with self._call("heartbeat"):
            return self._beat([Beat(slot_id, status, lease_seconds, None if task_ids is None else tuple(task_ids))],
                              keep_waiting=True)

    def heartbeat_slots(self, beats: Sequence[Beat]) -> list[int]:
        """:meth:`heartbeat` for every slot in ``beats`` at once; returns the stray tasks released."""
        with self._call("heartbeat_slots"):
            return self._beat(beats)

    def _beat(self, beats: Sequence[Beat], *, keep_waiting: bool = False) -> list[int]:
        s, now = self._s, self._now()
        released = []
        for b in beats:
            slot = s.slots.get(b.slot_id)
            if slot is not None and slot.status not in ("ERROR", "EXITED"):
                _check_slot_status(b.status)
                if slot.status == "LOST":  # slow, not dead: it runs again (as the SQL, 0029)
                    slot.ended_at, slot.message = None, None
                slot.heartbeat_at, slot.status = now, b.status
                if not keep_waiting:  # the one-slot beat says nothing of why it waits (0034)
                    slot.waiting = b.waiting
                # (0033) the slot's lease is its tasks' lease: no task is written
                slot.lease_expires_at = now + timedelta(seconds=b.lease_seconds)
                if b.output is not None:  # None: unchanged
                    slot.live_output = dict(b.output)
            known = None if b.task_ids is None else set(b.task_ids)
            for t in s.tasks.values():
                if t.slot_id != b.slot_id or t.status != TaskStatus.RUNNING or known is None or t.id in known:
                    continue
                if t.started_at is not None and t.started_at < now - timedelta(seconds=b.lease_seconds):
                    t.release()
                    self._ready.add(t.module_id)
                    released.append(t.id)
        return sorted(released)

    def recover_expired(self, *, every: float = 0.0) -> list[tuple[int, int]]:
        """Expired leases: an execution record with 123, then READY while the module's stall
        retries allow, else 123; slots silent for two of their own heartbeats become LOST; READY
        tasks bound to a dead host past their locality wait are unbound. Returns (id, status).
        ``every`` > 0: only the apps not recovered in the last ``every`` seconds (sbx_l_recover_v2)."""
        with self._call("recover_expired"):
            s, now = self._s, self._now()
            due = self._due_for_recovery(every, now)
            expired = sorted((t for t in s.tasks.values() if t.status == TaskStatus.RUNNING and t.app_id in due
                              and t.lease_expires_at is not None and t.lease_expires_at < now
                              and not self._slot_holds(t.slot_id, now)),
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
                if slot.status in LIVE_SLOT_STATUSES and s.modules[slot.module_id].app_id in due and \
                        slot.heartbeat_at < now - timedelta(seconds=2 * slot.heartbeat_seconds):
                    slot.status, slot.ended_at = "LOST", now
                    slot.message = f"no heartbeat since {slot.heartbeat_at.isoformat()}"
            if due:  # sbx_l_release_bound_v1: all the caller's apps, once per recovery that found one due
                self._release_bound()
            return out

    def _slot_holds(self, slot_id: int | None, now: datetime) -> bool:
        """The task's slot (0033) keeps it alive: it exists and holds its lease."""
        slot = None if slot_id is None else self._s.slots.get(slot_id)
        return slot is not None and slot.holds_lease(now)

    def _due_for_recovery(self, every: float, now: datetime) -> set[int]:
        """The apps to recover now, marked recovered (``every`` > 0); all of them (0)."""
        if every <= 0:
            return set(self._s.apps)
        due = {a.id for a in self._s.apps.values()
               if a.recovered_at is None or a.recovered_at <= now - timedelta(seconds=every)}
        for app_id in due:
            self._s.apps[app_id].recovered_at = now
        return due

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

    def task_service(self, app_id: int, request: Any) -> Any:
        """A running task's semaphore call or ``app.state`` (see :mod:`scalebox_hpc.taskapi`);
        the in-memory queue keeps no variables and delivers nothing."""
        with self._call("task_service"):
            app = self._app(app_id)
            op, name = request.op, request.name
            if op == "app.state":
                return {"status": app.status, "modules": {}}
            if op in ("semaphore.create", "semaphore.add"):
                if op == "semaphore.add" and name not in app.semaphores:
                    raise NotFoundError("semaphore", name)
                base = 0 if op == "semaphore.create" else app.semaphores[name]
                app.semaphores[name] = base + int(request.value or 0)
                return app.semaphores[name]
            if op == "semaphore.get":
                if name not in app.semaphores:
                    raise NotFoundError("semaphore", name)
                return app.semaphores[name]
            if op == "semaphore.list":
                return dict(app.semaphores)
            raise NotImplementedError(f"the in-memory queue has no {op}")

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


if TYPE_CHECKING:  # mypy holds the class to both ports
    from scalebox_hpc.launcher.ports import BatchQueue

    def _conforms(queue: InMemoryQueue) -> BatchQueue:
        return queue
