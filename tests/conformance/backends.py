"""The two queue backends behind one test-facing face: the port object (``queue``) plus what a
scenario needs to set up and inspect (apps, tasks, executions, time), done the backend's way.

PostgreSQL's time cannot be moved, so :meth:`PgBackend.advance` moves the database's recorded
times back instead (the same thing for every rule that compares them with ``now()``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import Connection, connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.launcher.ports import BatchQueue
from scalebox_hpc.models import AppStatus, Message
from scalebox_hpc.pipeline import AppSpec
from scalebox_hpc.testing import FakeClock, InMemoryQueue

TASK_KEYS = ("id", "module", "body", "headers", "status", "attempts", "retry_base", "slot_id", "host", "to_host",
             "to_slot", "pref_host", "pref_partial")
"""The task columns both backends report (times differ in kind: compare them as None or not)."""


class Backend(Protocol):
    name: str
    queue: BatchQueue

    def create_app(self, spec: AppSpec) -> int: ...
    def add_tasks(self, app_id: int, module: str | None, messages: Sequence[Message | str],
                  initial: bool = False) -> int: ...
    def tasks(self, app_id: int, module: str | None = None) -> list[dict[str, Any]]: ...
    def executions(self, task_id: int) -> list[dict[str, Any]]: ...
    def app(self, app_id: int) -> dict[str, Any]: ...
    def slots(self, app_id: int) -> list[dict[str, Any]]: ...
    def set_status(self, app_id: int, status: AppStatus) -> None: ...
    def cancel(self, app_id: int) -> None: ...
    def semaphore_create(self, app_id: int, name: str, value: int) -> None: ...
    def semaphore_get(self, app_id: int, name: str) -> int: ...
    def retry(self, task_ids: Sequence[int]) -> list[int]: ...
    def advance(self, seconds: float) -> None: ...
    def other_queue(self) -> BatchQueue:
        """A handle for another thread (a PgQueue owns one connection; InMemoryQueue is shared)."""
        ...
    def close(self) -> None: ...


def _msgs(messages: Sequence[Message | str]) -> list[Message]:
    return [Message(m) if isinstance(m, str) else m for m in messages]


def _task_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in TASK_KEYS}
    out["status"] = int(out["status"])
    for k in ("started_at", "finished_at", "lease_expires_at", "pref_until"):
        out[k + "_set"] = row[k] is not None
    return out


class MemoryBackend:
    name = "memory"

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.mem = InMemoryQueue(clock=self.clock)
        self.queue: BatchQueue = self.mem

    def create_app(self, spec: AppSpec) -> int:
        return self.mem.create_app(spec)

    def add_tasks(self, app_id: int, module: str | None, messages: Sequence[Message | str],
                  initial: bool = False) -> int:
        return self.mem.add_tasks(app_id, module, _msgs(messages), initial=initial)

    def tasks(self, app_id: int, module: str | None = None) -> list[dict[str, Any]]:
        return [_task_row(r) for r in self.mem.tasks(app_id, module=module)]

    def executions(self, task_id: int) -> list[dict[str, Any]]:
        return self.mem.executions(task_id)

    def app(self, app_id: int) -> dict[str, Any]:
        return self.mem.app(app_id)

    def slots(self, app_id: int) -> list[dict[str, Any]]:
        return self.mem.slots(app_id)

    def set_status(self, app_id: int, status: AppStatus) -> None:
        self.mem.set_app_status(app_id, status)

    def cancel(self, app_id: int) -> None:
        self.mem.cancel_app(app_id)

    def semaphore_create(self, app_id: int, name: str, value: int) -> None:
        self.mem.semaphore_create(app_id, name, value)

    def semaphore_get(self, app_id: int, name: str) -> int:
        return self.mem.semaphore_get(app_id, name)

    def retry(self, task_ids: Sequence[int]) -> list[int]:
        return self.mem.retry_tasks(task_ids)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def other_queue(self) -> BatchQueue:
        return self.mem

    def close(self) -> None:
        self.mem.close()


class PgBackend:
    name = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pg = PgQueue(dsn)
        self.queue: BatchQueue = self.pg
        self.conn: Connection = connect(dsn, autocommit=True)

    def create_app(self, spec: AppSpec) -> int:
        return apps.create_app(self.conn, spec)

    def add_tasks(self, app_id: int, module: str | None, messages: Sequence[Message | str],
                  initial: bool = False) -> int:
        return apps.add_tasks(self.conn, app_id, module, _msgs(messages), initial=initial)

    def tasks(self, app_id: int, module: str | None = None) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT t.*, m.name AS module FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id "
            "WHERE t.app_id = %s AND (%s::text IS NULL OR m.name = %s) ORDER BY t.id", (app_id, module, module),
        ).fetchall()
        return [_task_row(r) for r in rows]

    def executions(self, task_id: int) -> list[dict[str, Any]]:
        return apps.get_task(self.conn, task_id)["execs"]

    def app(self, app_id: int) -> dict[str, Any]:
        return apps.get_app(self.conn, app_id)

    def slots(self, app_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(
            "SELECT s.* FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id WHERE m.app_id = %s "
            "ORDER BY s.id", (app_id,)).fetchall()]

    def set_status(self, app_id: int, status: AppStatus) -> None:
        apps.set_status(self.conn, app_id, status)

    def cancel(self, app_id: int) -> None:
        apps.cancel_app(self.conn, app_id)

    def semaphore_create(self, app_id: int, name: str, value: int) -> None:
        apps.semaphore_create(self.conn, app_id, name, value)

    def semaphore_get(self, app_id: int, name: str) -> int:
        return apps.semaphore_get(self.conn, app_id, name)

    def retry(self, task_ids: Sequence[int]) -> list[int]:
        return apps.retry_tasks(self.conn, task_ids)

    def advance(self, seconds: float) -> None:
        shift = {"s": f"{seconds} seconds"}
        with self.conn.transaction():
            self.conn.execute(
                "UPDATE sbx_tasks SET created_at = created_at - %(s)s::interval, "
                "started_at = started_at - %(s)s::interval, finished_at = finished_at - %(s)s::interval, "
                "heartbeat_at = heartbeat_at - %(s)s::interval, "
                "lease_expires_at = lease_expires_at - %(s)s::interval, pref_until = pref_until - %(s)s::interval",
                shift)
            self.conn.execute(
                "UPDATE sbx_slots SET started_at = started_at - %(s)s::interval, "
                "heartbeat_at = heartbeat_at - %(s)s::interval, ended_at = ended_at - %(s)s::interval, "
                "lease_expires_at = lease_expires_at - %(s)s::interval", shift)
            self.conn.execute("UPDATE sbx_apps SET recovered_at = recovered_at - %(s)s::interval", shift)

    def other_queue(self) -> BatchQueue:
        return PgQueue(self.dsn)

    def close(self) -> None:
        self.pg.close()
        self.conn.close()
