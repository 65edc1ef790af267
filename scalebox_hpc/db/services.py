"""The database side of a running task's calls (:mod:`scalebox_hpc.taskapi`), on the launcher's
connection: every call is for ``app_id``, the launcher's own app, whatever the task says."""

from __future__ import annotations

from typing import Any

from scalebox_hpc import taskapi
from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.queue import module_refs
from scalebox_hpc.models import ConflictAction


def serve(conn: Connection, app_id: int, request: taskapi.Request) -> Any:
    """Carry out ``request`` for ``app_id``; its value (JSON-ready)."""
    op, name = request.op, request.name
    if op == "semaphore.create":
        return apps.semaphore_create(conn, app_id, name, int(request.value or 0))
    if op == "semaphore.get":
        return apps.semaphore_get(conn, app_id, name)
    if op == "semaphore.add":
        return apps.semaphore_add(conn, app_id, name, int(request.value or 0))
    if op == "semaphore.list":
        return apps.semaphore_list(conn, app_id)
    if op == "variable.set":
        apps.variable_set(conn, app_id, taskapi.check_variable_name(name), str(request.value))
        return None
    if op == "variable.get":
        return apps.variable_get(conn, app_id, name)
    if op == "variable.list":
        return apps.variable_list(conn, app_id)
    if op == "app.state":
        status = str(apps.get_app(conn, app_id)["status"])
        return {"status": status, "modules": {r.name: list(r.sink_modules) for r in module_refs(conn, app_id).values()}}
    return _deliver(conn, app_id, request)


def _deliver(conn: Connection, app_id: int, request: taskapi.Request) -> dict[str, Any]:
    """Messages written at once (not at the task's end), under IGNORE: a body the module has
    already is not written again (the cron module's ticks: a restarted or a second cron task)."""
    with conn.transaction():
        status = str(apps.get_app(conn, app_id)["status"])
        if status != "RUNNING":
            return {"status": status, "written": 0}
        batch = apps.Batch(request.module, dict(request.headers), list(request.bodies))
        done = apps.submit(conn, app_id, [batch], conflict=ConflictAction.IGNORE)
        return {"status": status, "written": done.written}
