"""The task queue on PostgreSQL: claim, hand-off, heartbeat, release — and the message inserts they share."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from scalebox_hpc.db import outbox
from scalebox_hpc.db.connection import Connection, connect, is_retryable, translate_errors
from scalebox_hpc.db.sql import query
from scalebox_hpc.errors import InvalidMessageError, NotFoundError
from scalebox_hpc.models import (  # noqa: F401  (re-exported: routing lives in models)
    RECOVER_LIMIT,
    Beat,
    Completion,
    ConflictAction,
    LeaseLostError,
    Message,
    ModuleRef,
    Released,
    SlotWant,
    Task,
    TaskResult,
    TaskStatus,
    bind,
    headers_for,
    route,
    storable_text,
    usage_columns,
    validate_headers,
)

logger = logging.getLogger(__name__)

# Stdout/stderr kept per execution: the tail, as Scalebox does.
OUTPUT_TAIL_BYTES = 64 * 1024
QUEUE_STATEMENT_TIMEOUT = 120.0
"""Seconds any one queue statement may take (a hand-off of 100 000 messages takes a few)."""
INERROR = TransactionStatus.INERROR


def _tail(text: str) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= OUTPUT_TAIL_BYTES:
        return text
    return data[-OUTPUT_TAIL_BYTES:].decode("utf-8", "ignore")


def _message_rows(
    routed: Iterable[tuple[ModuleRef, Message]], status: int, conflict: ConflictAction | None
) -> list[dict[str, Any]]:
    """The JSON rows sbx_insert_messages_v1 takes: one per message, with its conflict action."""
    rows = []
    for ref, msg in routed:
        if ref.remote is not None:  # to another database: the outbox, in this transaction
            rows.append({"remote": ref.remote, "remote_app_id": ref.remote_app_id, "module": ref.name,
                         "body": msg.body, "headers": msg.headers, "action": "REMOTE"})
            continue
        to_slot = msg.headers.get("to_slot")
        rows.append({
            "module_id": ref.id, "body": msg.body, "headers": msg.headers,
            "to_host": msg.headers.get("to_host"),
            "to_slot": int(to_slot) if to_slot not in (None, "") else None,
            "status": status, "action": (conflict or ref.conflict_action).value,
        })
    return rows


def _to_outbox(routed: Iterable[tuple[ModuleRef, Message]], result: TaskResult, modules: dict[str, ModuleRef]) -> bool:
    """The hand-off writes to the outbox: a message to a remote sink, or the app's finish (forwarded
    to its remote parts)."""
    if any(ref.remote is not None for ref, _ in routed):
        return True
    return result.finish_text is not None and any(ref.remote is not None for ref in modules.values())


@contextlib.contextmanager
def _duplicates_as_invalid() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.UniqueViolation as exc:
        raise InvalidMessageError(
            "a message body already exists in its module (CONFLICT_ACTION=FAIL)",
            hint="set arguments.conflict_action to IGNORE or OVERWRITE, or use distinct bodies",
        ) from exc


def insert_messages(
    conn: Connection,
    app_id: int,
    routed: Iterable[tuple[ModuleRef, Message]],
    *,
    status: int = TaskStatus.READY,
    conflict: ConflictAction | None = None,
) -> int:
    """Insert messages as tasks, each by its target's CONFLICT_ACTION (or ``conflict``); returns
    rows written. With FAIL, a duplicate body raises InvalidMessageError and nothing is written."""
    rows = _message_rows(routed, status, conflict)
    if not rows:
        return 0
    params = {"app_id": app_id, "rows": Jsonb(rows), "from_task_id": None}
    with _duplicates_as_invalid():
        row = conn.execute(query("insert_messages"), params).fetchone()
    return int(row["written"]) if row else 0


def module_refs(conn: Connection, app_id: int) -> dict[str, ModuleRef]:
    """The app's modules by name; NotFoundError when the app does not exist."""
    rows = conn.execute(query("list_modules"), {"app_id": app_id}).fetchall()
    return refs_from_rows(rows, app_id, outbox.remote_refs(conn, app_id))


def launcher_module_refs(conn: Connection, app_id: int) -> dict[str, ModuleRef]:
    """:func:`module_refs` through the launcher's function (any role: see migration 0018)."""
    rows = conn.execute(query("launcher_modules"), {"app_id": app_id}).fetchall()
    return refs_from_rows(rows, app_id, outbox.remote_refs(conn, app_id))


def refs_from_rows(rows: Sequence[dict[str, Any]], app_id: int,
                   remote: dict[str, ModuleRef]) -> dict[str, ModuleRef]:
    """Module rows (id, name, sink_modules, conflict_action, spec) as refs by name, after the app's
    remote sinks; NotFoundError when there are none (no such app)."""
    if not rows:
        raise NotFoundError("app", app_id)
    return remote | {
        r["name"]: ModuleRef(
            r["id"], r["name"], tuple(r["sink_modules"]), ConflictAction(r["conflict_action"]),
            (r["spec"].get("arguments") or {}).get("task_dist_mode"),
        )
        for r in rows
    }


class PgQueue:
    """One slot's (or one CLI call's) handle on the queue; owns one connection, reconnects lazily.

    Every statement is bounded by ``statement_timeout`` seconds (a launcher's lease must not
    wait on a stuck statement), and the connection has TCP keepalives (see :func:`connect`).
    ``clock_offset`` (database minus local clock, measured at each connect) turns the node's
    times into the database's, so execution times agree with the leases and recovery records."""

    def __init__(self, dsn: str, *, statement_timeout: float | None = QUEUE_STATEMENT_TIMEOUT) -> None:
        self.dsn = dsn
        self.statement_timeout = statement_timeout
        self.clock_offset = timedelta(0)
        self.connects = 0
        """How many times the connection was (re)opened: a caller can tell it was away."""
        self._conn: Connection | None = None

    @property
    def conn(self) -> Connection:
        """The open connection (opened on first use, reopened after a failure)."""
        if self._conn is None or self._conn.closed:
            conn = connect(self.dsn, autocommit=True, statement_timeout=self.statement_timeout)
            with translate_errors(self.dsn):
                before = datetime.now(UTC)
                row = conn.execute(query("server_now")).fetchone()
                after = datetime.now(UTC)
            if row is not None:  # the server's clock at the middle of the round trip
                self.clock_offset = row["now"] - (before + (after - before) / 2)
            self._conn = conn
            self.connects += 1
        return self._conn

    def _drop_if_broken(self, exc: psycopg.Error) -> None:
        """Close the connection after an error that may have left it unusable (an outage, a
        terminated backend, a fail-over): the next call reconnects."""
        conn = self._conn
        if is_retryable(exc) or conn is None or conn.closed or conn.info.transaction_status == INERROR:
            self.close()

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        with translate_errors(self.dsn):
            try:  # one statement = one implicit transaction (autocommit): one round trip
                cur = self.conn.execute(query(name), params)
                return cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                self._drop_if_broken(exc)
                raise

    # -- modules --------------------------------------------------------------------------
    def modules(self, app_id: int) -> dict[str, ModuleRef]:
        """The app's modules by name; NotFoundError when the app does not exist."""
        remote = outbox.refs_of(self._run("list_remote_sinks", {"app_id": app_id}))
        return refs_from_rows(self._run("launcher_modules", {"app_id": app_id}), app_id, remote)

    def module_specs(self, app_id: int) -> dict[str, dict[str, Any]]:
        """The app's stored module specs (pipeline.ModuleSpec as JSON) by name."""
        return {r["name"]: r["spec"] for r in self._run("launcher_modules", {"app_id": app_id})}

    # -- the launcher's calls ---------------------------------------------------------------
    def claim(
        self, app_id: int, module_id: int, *, host: str, slot_id: int, slot_seq: int,
        limit: int = 1, lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> list[Task]:
        """Claim up to ``limit`` READY tasks for this slot (empty list: nothing to do). With a
        ``semaphore``, one unit of it is taken per claimed task, in the same transaction, and
        only while it is positive."""
        claimed = self.claim_for_slots(app_id, module_id, host=host, slots=[SlotWant(slot_id, slot_seq, limit)],
                                       lease_seconds=lease_seconds, semaphore=semaphore)
        return claimed.get(slot_id, [])

    def claim_for_slots(
        self, app_id: int, module_id: int, *, host: str, slots: Sequence[SlotWant],
        lease_seconds: float = 30.0, semaphore: str | None = None,
    ) -> dict[int, list[Task]]:
        """One statement claims for several slots of one module on ``host``: a task addressed
        to a slot's seq goes to it, the others round-robin, at most ``want`` each (every rule of
        the claim kept: locality, bound tasks, back-pressure, the app RUNNING). With a
        ``semaphore``, one unit per claimed task, taken in the same transaction; the units not
        used are given back. Returns the tasks per slot id (a slot absent: none for it)."""
        slots = [s for s in slots if s.want > 0]
        limit = sum(s.want for s in slots)
        if not limit:
            return {}
        params = claim_params(app_id, module_id, host, slots, lease_seconds)
        if semaphore is None:
            return _by_slot(self._run("claim", params))
        with translate_errors(self.dsn):
            try:
                with self.conn.transaction():
                    sem = {"app_id": app_id, "name": semaphore}
                    row = self.conn.execute(query("semaphore_take_many"), {**sem, "n": limit}).fetchone()
                    if row is None:
                        return {}
                    taken = int(row["taken"])
                    rows = self.conn.execute(query("claim"), {**params, "limit": taken}).fetchall()
                    if len(rows) < taken:  # units not used go back, in the same transaction
                        self.conn.execute(query("launcher_semaphore_add"), {**sem, "delta": taken - len(rows)})
                    return _by_slot(rows)
            except psycopg.Error as exc:
                self._drop_if_broken(exc)
                raise

    def app_cancelled(self, app_id: int) -> bool:
        """True once `scalebox app cancel` was called."""
        rows = self._run("app_cancelled", {"app_id": app_id})
        return bool(rows and rows[0]["cancelled"])

    def complete(
        self, task: Task, result: TaskResult, *, slot_id: int, host: str, sender: ModuleRef,
        modules: dict[str, ModuleRef], requeue: bool = False,
    ) -> int:
        """The hand-off: record the result and execution and insert the emitted messages, in ONE
        transaction. Returns the number of messages written. Raises LeaseLostError (nothing
        recorded) if the slot no longer holds the task. A message that cannot be routed or
        stored turns the task into an EMIT_FAILED error and emits nothing. With ``requeue``
        (a failure its retry rules allow to try again) the execution is recorded and the task
        becomes READY again."""
        try:
            routed = route(modules, sender, result.messages)
            written = self._complete(task, result, slot_id, host, routed, requeue)
            if _to_outbox(routed, result, modules):  # committed: deliver it now, in the background
                outbox.kick(self.dsn)
            return written
        except InvalidMessageError as exc:
            failed = _emit_failed(result, str(exc))
            self._complete(task, failed, slot_id, host, [], False)
            return 0

    def _complete(
        self, task: Task, result: TaskResult, slot_id: int, host: str,
        routed: list[tuple[ModuleRef, Message]], requeue: bool,
    ) -> int:
        params = {
            "task_id": task.id, "slot_id": slot_id, "attempt": task.attempts, "status": result.status,
            "requeue": requeue, "exec": Jsonb(_exec_record(result, host, self.clock_offset)),
            "messages": Jsonb(_message_rows(routed, TaskStatus.READY, None)),
            "finish_text": result.finish_text,
        }
        with translate_errors(self.dsn), _duplicates_as_invalid():
            try:
                row = self.conn.execute(query("complete_task"), params).fetchone()
            except psycopg.Error as exc:
                self._drop_if_broken(exc)
                raise
        if row is None or row["written"] is None:
            raise LeaseLostError(task.id)
        return int(row["written"])

    def complete_many(
        self, items: Sequence[Completion], *, slot_id: int, sender: ModuleRef, modules: dict[str, ModuleRef],
    ) -> list[int | None]:
        """The hand-off of a batch: every result, execution and emitted message in ONE statement
        (one transaction). Returns, per item, the messages written, None when that task's
        lease was lost, or HAND_OFF_BUSY (-1) when another transaction held its row (nothing
        recorded for either; the caller tries a busy one again, see migration 0030). Unroutable
        messages turn their task into EMIT_FAILED as in :meth:`complete`; a duplicate body under
        CONFLICT_ACTION=FAIL rolls the batch back and it is recorded task by task instead."""
        rows = []
        remote = False
        for ord_, item in enumerate(items):
            result, requeue = item.result, item.requeue
            try:
                routed = route(modules, item.sender or sender, result.messages)
            except InvalidMessageError as exc:
                result, requeue, routed = _emit_failed(result, str(exc)), False, []
            remote = remote or _to_outbox(routed, result, modules)
            rows.append({
                "ord": ord_, "task_id": item.task.id, "slot_id": item.slot_id or slot_id,
                "attempt": item.task.attempts,
                "status": result.status, "requeue": requeue,
                "exec": _exec_record(result, item.host, self.clock_offset),
                "messages": _message_rows(routed, TaskStatus.READY, None), "finish_text": result.finish_text,
            })
        if not rows:
            return []
        try:
            with _duplicates_as_invalid():
                out = self._run("complete_tasks_batch", {"rows": Jsonb(rows)})
        except InvalidMessageError:
            return [self._complete_one(item, slot_id, sender, modules) for item in items]
        if remote:  # committed: deliver it now, in the background
            outbox.kick(self.dsn)
        written: dict[int, int | None] = {
            int(r["ord"]): None if r["written"] is None else int(r["written"]) for r in out
        }
        return [written.get(i) for i in range(len(rows))]

    def _complete_one(
        self, item: Completion, slot_id: int, sender: ModuleRef, modules: dict[str, ModuleRef]
    ) -> int | None:
        try:
            return self.complete(item.task, item.result, slot_id=item.slot_id or slot_id, host=item.host,
                                 sender=item.sender or sender, modules=modules, requeue=item.requeue)
        except LeaseLostError:
            return None

    def release_ids(self, slot_id: int, task_ids: Sequence[int]) -> Released:
        """Give some of the slot's RUNNING tasks back to READY, the attempt not counted; those
        another transaction holds are not, and are named in ``busy`` (try again shortly)."""
        if not task_ids:
            return Released(0)
        return _released(self._run("release_task_ids", {"slot_id": slot_id, "task_ids": list(task_ids)}))

    def recover_expired(self, *, every: float = 0.0) -> list[tuple[int, int]]:
        """Return tasks with expired leases to READY (or 123 when their retries are spent), mark
        slots silent for two of their own heartbeat intervals LOST, and unbind the READY tasks
        bound to a dead host; returns the (task id, new status) pairs of the recovered tasks.
        After a server restart a lease counts from the restart (its owner gets to renew it).
        ``every`` > 0 (a launcher's periodic call): only the apps nobody recovered in the last
        ``every`` seconds (one recovery per app and interval across the fleet); 0: now."""
        rows = self._run("recover_expired", {"every": every, "bound_limit": RECOVER_LIMIT})
        return _recovered(rows)

    def index_scratch(
        self, host: str, added: list[tuple[str, int]], removed: list[str], *, replace: bool = False,
    ) -> None:
        """Record files in (and gone from) ``host``'s scratch; ``replace``: the list is all it holds."""
        if replace or removed or added:
            self._run("index_scratch", {"host": host, "replace": replace, "removed": removed,
                                        "keys": [k for k, _ in added], "bytes": [b for _, b in added]})

    def adopt_tasks(self, app_id: int, host: str, *, limit: int = 100_000) -> int:
        """Make READY tasks that prefer no live host, but name inputs ``host``'s scratch holds,
        prefer their best holder (tasks queued before any holder was up); returns how many."""
        [row] = self._run("adopt_tasks", {"app_id": app_id, "host": host, "limit": limit})
        return int(row["adopted"])

    def heartbeat(
        self, slot_id: int, *, status: str, lease_seconds: float, task_ids: Sequence[int] | None = None,
    ) -> list[int]:
        """Renew the slot's lease, which is the lease of its running tasks (0033: no task row is
        written). A RUNNING task of the slot not in ``task_ids`` (None: it knows all of them) and
        claimed over a lease ago (its claim's reply was lost) is released; returns the released ids.
        Why the slot waits and its live output stay as they are (0034: the node's beat of one slot)."""
        rows = self._run("heartbeat_slot", {
            "slot_id": slot_id, "status": status, "lease_seconds": lease_seconds,
            "task_ids": None if task_ids is None else list(task_ids),
        })
        return [int(i) for i in rows[0]["released"]] if rows else []

    def heartbeat_slots(self, beats: Sequence[Beat]) -> list[int]:
        """One statement renews every slot in ``beats`` and so its tasks' leases (see
        :meth:`heartbeat`), and stores why each waits and its live output (when sent); returns
        the ids of the stray tasks released."""
        if not beats:
            return []
        rows = self._run("heartbeat_slots", {"beats": Jsonb([
            {"slot_id": b.slot_id, "status": b.status, "lease_seconds": b.lease_seconds,
             "task_ids": None if b.task_ids is None else list(b.task_ids),
             "waiting": b.waiting, "output": None if b.output is None else dict(b.output)} for b in beats])})
        return [int(i) for i in rows[0]["released"]] if rows else []

    def release(self, slot_id: int) -> Released:
        """Give the slot's running tasks back to READY (drain); returns how many, and in
        ``busy`` those another transaction held (not released: try again shortly)."""
        return _released(self._run("release_tasks", {"slot_id": slot_id}))

    def app_uid(self, app_id: int) -> str:
        """The app's uid (unique across databases); NotFoundError when there is no such app."""
        rows = self._run("app_uid", {"app_id": app_id})
        if not rows:
            raise NotFoundError("app", app_id)
        return str(rows[0]["uid"])

    def task_service(self, app_id: int, request: Any) -> Any:
        """A running task's call (:class:`scalebox_hpc.taskapi.Request`) for ``app_id``, the
        launcher's own app: see :func:`scalebox_hpc.db.services.serve`."""
        from scalebox_hpc.db import services

        with translate_errors(self.dsn):
            try:
                return services.serve(self.conn, app_id, request)
            except psycopg.Error as exc:
                self._drop_if_broken(exc)
                raise

    def app_activity(self, app_id: int) -> tuple[str, bool]:
        """(status, active): the app's status, and whether any of its tasks is READY or RUNNING."""
        rows = self._run("app_activity", {"app_id": app_id})
        if not rows:
            raise NotFoundError("app", app_id)
        return str(rows[0]["status"]), bool(rows[0]["active"])

    def module_activity(self, app_id: int, module_id: int) -> tuple[str, bool]:
        """(status, active): the app's status, and whether the module or any module upstream of
        it (transitively along ``sink_modules``) has a task READY or RUNNING."""
        rows = self._run("module_activity", {"app_id": app_id, "module_id": module_id})
        if not rows:
            raise NotFoundError("app", app_id)
        return str(rows[0]["status"]), bool(rows[0]["active"])

    # -- slots and hosts ----------------------------------------------------------------------
    def register_host(self, name: str, info: dict[str, Any]) -> None:
        """Record (or refresh) a host."""
        self._run("upsert_host", {"name": name, "info": Jsonb(info)})

    def create_slot(
        self, module_id: int, *, host: str, seq: int, pid: int, work_dir: str, heartbeat_seconds: float = 10.0,
    ) -> int:
        """Register a slot that beats every ``heartbeat_seconds`` / 2; returns its id."""
        rows = self._run("insert_slot", {
            "module_id": module_id, "host": host, "seq": seq, "pid": pid, "work_dir": work_dir,
            "heartbeat_seconds": heartbeat_seconds,
        })
        return int(rows[0]["id"])

    def set_slot_status(self, slot_id: int, status: str, *, message: str | None = None, tasks_done: int = 0) -> None:
        """Update a slot's status (READY, RUNNING, ERROR, EXITED)."""
        self._run("set_slot_status", {
            "slot_id": slot_id, "status": status, "message": message, "tasks_done": tasks_done,
        })


def claim_params(
    app_id: int, module_id: int, host: str, slots: Sequence[SlotWant], lease_seconds: float,
) -> dict[str, Any]:
    """The parameters of the ``claim_tasks`` statement."""
    return {
        "app_id": app_id, "module_id": module_id, "host": host, "lease_seconds": lease_seconds,
        "slot_ids": [s.slot_id for s in slots], "slot_seqs": [s.slot_seq for s in slots],
        "wants": [s.want for s in slots], "limit": sum(s.want for s in slots),
    }


def _by_slot(rows: Iterable[dict[str, Any]]) -> dict[int, list[Task]]:
    """Claimed rows as tasks per slot id, in claim order."""
    out: dict[int, list[Task]] = {}
    for r in rows:
        out.setdefault(int(r["claimed_by"]), []).append(Task.from_row(r))
    return out


def _recovered(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """A recovery's rows as (task id, new status); its last row (NULL, NULL, n) counts the bound
    tasks unbound (logged: they may run on any host now)."""
    unbound = sum(int(r["unbound"]) for r in rows if r["id"] is None)
    if unbound:
        logger.warning("%d task(s) bound to a dead host may now run anywhere", unbound)
    return [(int(r["id"]), int(r["status"])) for r in rows if r["id"] is not None]


def _released(rows: list[dict[str, Any]]) -> Released:
    """A release's rows (id, busy) as a count with the busy ids."""
    return Released(sum(1 for r in rows if not r["busy"]), [int(r["id"]) for r in rows if r["busy"]])


def _emit_failed(result: TaskResult, reason: str) -> TaskResult:
    stderr = (result.stderr + f"\nscalebox: emitted messages rejected: {reason}\n").lstrip("\n")
    return TaskResult(
        status=TaskStatus.EMIT_FAILED, started_at=result.started_at, finished_at=result.finished_at,
        stdout=result.stdout, stderr=stderr, input_bytes=result.input_bytes, output_bytes=result.output_bytes,
        input_files=result.input_files, output_files=result.output_files, user_text=result.user_text,
        timestamps=result.timestamps, usage=result.usage,
    )


def _exec_record(result: TaskResult, host: str, clock_offset: timedelta = timedelta(0)) -> dict[str, Any]:
    """The execution row as JSON, in the database's time, every text made storable (jsonb
    refuses NUL and lone surrogates: one such byte in a task's output must not lose its result).
    Only what the run set goes in: a key left out is NULL to the statement, which stores its
    default ('' or []), so a silent task's row is small to build and to parse (the hand-off of
    a batch of no-op tasks spent more time on this dict than on anything else in Python)."""
    record: dict[str, Any] = {
        "host": storable_text(host), "started_at": (result.started_at + clock_offset).isoformat(),
        "finished_at": (result.finished_at + clock_offset).isoformat(),
    }
    for key, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        if text:
            record[key] = storable_text(_tail(text))
    for key, count in (("input_bytes", result.input_bytes), ("output_bytes", result.output_bytes)):
        if (value := _bigint(count)) is not None:
            record[key] = value
    if result.user_text is not None:
        record["user_text"] = storable_text(result.user_text)
    for key, data in (("input_files", result.input_files), ("output_files", result.output_files),
                      ("timestamps", result.timestamps)):
        if data:
            record[key] = storable(data)
    if result.usage is not None:
        record.update(usage_columns(result.usage))
    return record


def _bigint(value: int | None) -> int | None:
    """A byte count PostgreSQL's bigint holds (None for anything else)."""
    return value if value is not None and 0 <= value < 2**63 else None


def storable(value: Any) -> Any:
    """``value`` (JSON data) with every string PostgreSQL can store: NUL and lone surrogates
    become U+FFFD, in keys too."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable_text(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value
