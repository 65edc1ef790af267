"""The database side of a running task's calls (:mod:`scalebox_hpc.taskapi`), on the launcher's
connection: every call is for ``app_id``, the launcher's own app, whatever the task says. Each
goes through a launcher function (migration 0018), so a launcher role with no table privileges
serves them, and only for the apps of the owner it launches for."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from scalebox_hpc import taskapi
from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.queue import launcher_module_refs
from scalebox_hpc.db.sql import query
from scalebox_hpc.errors import NotFoundError
from scalebox_hpc.models import ConflictAction, TaskStatus, validate_body, validate_headers


def serve(conn: Connection, app_id: int, request: taskapi.Request) -> Any:
    """Carry out ``request`` for ``app_id``; its value (JSON-ready)."""
    op, name = request.op, request.name
    sem = {"app_id": app_id, "name": name}
    if op == "semaphore.create":
        return int(_one(conn, "launcher_semaphore_create", {**sem, "value": int(request.value or 0)}, "app")["value"])
    if op == "semaphore.get":
        return int(_one(conn, "launcher_semaphore_get", sem, "semaphore")["value"])
    if op == "semaphore.add":
        delta = int(request.value or 0)
        return int(_one(conn, "launcher_semaphore_add", {**sem, "delta": delta}, "semaphore")["value"])
    if op == "semaphore.list":
        return {r["name"]: int(r["value"]) for r in conn.execute(query("launcher_semaphore_list"), {"app_id": app_id})}
    if op == "variable.set":
        conn.execute(query("launcher_variable_set"),
                     {"app_id": app_id, "name": taskapi.check_variable_name(name), "value": str(request.value)})
        return None
    if op == "variable.get":
        return str(_one(conn, "launcher_variable_get", sem, "variable")["value"])
    if op == "variable.list":
        return {r["name"]: str(r["value"]) for r in conn.execute(query("launcher_variable_list"), {"app_id": app_id})}
    if op == "app.state":
        status = _app_status(conn, app_id)
        refs = launcher_module_refs(conn, app_id)
        return {"status": status, "modules": {r.name: list(r.sink_modules) for r in refs.values()}}
    return _deliver(conn, app_id, request)


def _one(conn: Connection, name: str, params: dict[str, Any], kind: str) -> dict[str, Any]:
    """The one row of a launcher function; NotFoundError (``kind`` named ``params['name']``) for none."""
    row = conn.execute(query(name), params).fetchone()
    if row is None or all(v is None for v in row.values()):
        raise NotFoundError(kind, params["name"] if kind != "app" else params["app_id"])
    return row


def _app_status(conn: Connection, app_id: int) -> str:
    row = conn.execute(query("launcher_app"), {"app_id": app_id}).fetchone()
    if row is None:
        raise NotFoundError("app", app_id)
    return str(row["status"])


def _deliver(conn: Connection, app_id: int, request: taskapi.Request) -> dict[str, Any]:
    """Messages written at once (not at the task's end), under IGNORE: a body the module has
    already is not written again (the cron module's ticks: a restarted or a second cron task).
    As `task add` writes them: to the named module (default: the app's first), the headers
    checked, ``to_host``/``to_slot`` as given (no HOST-/SLOT-BOUND binding)."""
    with conn.transaction():
        status = _app_status(conn, app_id)
        if status != "RUNNING":
            return {"status": status, "written": 0}
        refs = launcher_module_refs(conn, app_id)
        target = request.module or next(iter(refs))
        ref = refs.get(target)
        if ref is None:
            raise NotFoundError("module", target)
        headers = validate_headers(dict(request.headers))
        to_slot = headers.get("to_slot")
        rows = [{
            "module_id": ref.id, "body": validate_body(body), "headers": headers, "to_host": headers.get("to_host"),
            "to_slot": int(to_slot) if to_slot not in (None, "") else None,
            "status": int(TaskStatus.READY), "action": ConflictAction.IGNORE.value,
        } for body in request.bodies]
        if not rows:
            return {"status": status, "written": 0}
        row = conn.execute(query("launcher_insert_messages"),
                           {"app_id": app_id, "from_task_id": None, "rows": Jsonb(rows)}).fetchone()
        return {"status": status, "written": int(row["written"]) if row else 0}
