"""Apps, modules and tasks as the CLI sees them: create, inspect, steer.

The bulk submit lives in :mod:`scalebox_hpc.db.bulk`, the progress views (counts, stuck
modules, why tasks wait) in :mod:`scalebox_hpc.db.progress`; both are re-exported here, so
``apps.submit``, ``apps.Batch``, ``apps.module_counts`` ... keep working."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from psycopg.types.json import Jsonb

from scalebox_hpc.db import outbox
from scalebox_hpc.db.bodyfile import BodyFile as BodyFile  # re-exported: a Batch takes one
from scalebox_hpc.db.bodyfile import read_bodies
from scalebox_hpc.db.bulk import BULK_JSON_ROWS as BULK_JSON_ROWS  # re-exported, as the names below
from scalebox_hpc.db.bulk import Batch as Batch
from scalebox_hpc.db.bulk import Submitted as Submitted
from scalebox_hpc.db.bulk import add_tasks as add_tasks
from scalebox_hpc.db.bulk import add_tasks_json as add_tasks_json
from scalebox_hpc.db.bulk import submit as submit
from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.progress import WHY_SLOTS_NAMED as WHY_SLOTS_NAMED
from scalebox_hpc.db.progress import ModuleCounts as ModuleCounts
from scalebox_hpc.db.progress import StuckModule as StuckModule
from scalebox_hpc.db.progress import Why as Why
from scalebox_hpc.db.progress import all_work_stuck as all_work_stuck
from scalebox_hpc.db.progress import app_state as app_state
from scalebox_hpc.db.progress import last_line as last_line
from scalebox_hpc.db.progress import module_counts as module_counts
from scalebox_hpc.db.progress import module_why as module_why
from scalebox_hpc.db.progress import stuck_modules as stuck_modules
from scalebox_hpc.db.progress import why_waiting as why_waiting
from scalebox_hpc.db.queue import insert_messages as insert_messages  # re-exported (imported here before the split)
from scalebox_hpc.db.queue import module_refs as module_refs
from scalebox_hpc.db.sql import query
from scalebox_hpc.errors import NotFoundError
from scalebox_hpc.models import (
    AppStatus,
    ConflictAction,
    Message,
    ModuleRef,
    stall_retries,
)

if TYPE_CHECKING:  # pydantic stays out of `scalebox task add` (its start time counts)
    from scalebox_hpc.pipeline import AppSpec

START_ANY = "ANY"
FILE_PREFIX = "FILE:"


def start_messages(spec: AppSpec) -> list[Message]:
    """The start tasks a pipeline declares: app-level ``start_task`` goes to the first module,
    a module's own ``parameters.start_task`` to that module. ``FILE:path`` gives one task per
    non-empty line (path relative to the app dir); ``ANY`` is a task with the body ``ANY``.
    (:func:`create_app` streams ``FILE:`` lists instead of building this list.)"""
    found: list[Message] = []
    for batch in start_batches(spec):
        bodies = list(batch.bodies)
        if batch.file is not None:
            bodies += [body for _, body in read_bodies(batch.file)]
        found += [Message(body=b, module=batch.module) for b in bodies]
    return found


def start_batches(spec: AppSpec) -> list[Batch]:
    """The start tasks of :func:`start_messages` as batches: a ``FILE:`` list stays a file."""
    found: list[Batch] = []
    declared = [(spec.modules[0].name, spec.parameters.start_task)]
    declared += [(m.name, m.parameters.start_task) for m in spec.modules]
    for module, value in declared:
        if value is None:
            continue
        if value.startswith(FILE_PREFIX):
            path = spec.app_dir / value[len(FILE_PREFIX):]
            found.append(Batch(module=module, file=BodyFile(path, strip=True, label=f"start_task {value}")))
        else:
            found.append(Batch(module=module, bodies=(value,)))
    return found


def create_app(conn: Connection, spec: AppSpec) -> int:
    """Create the app, its modules and its start tasks in one transaction; returns the app id."""
    status = AppStatus.INITIAL if spec.parameters.initial_status == "INITIAL" else AppStatus.RUNNING
    with conn.transaction():
        app_id = conn.execute(query("insert_app"), {
            "name": spec.name, "label": spec.label, "cluster": spec.cluster, "status": status,
            "spec": Jsonb(spec.model_dump(mode="json")),
        }).fetchone()["id"]  # type: ignore[index]
        refs: dict[str, ModuleRef] = {}
        for seq, module in enumerate(spec.modules):
            mid = conn.execute(query("insert_module"), {
                "app_id": app_id, "name": module.name, "seq": seq, "sink_modules": module.sink_modules,
                "conflict_action": module.arguments.conflict_action.value,
                "stall_retries": stall_retries(module.parameters.retry_rules),
                "max_pending": module.arguments.max_pending,
                "locality_wait_seconds": module.arguments.locality_wait_seconds
                if module.arguments.locality_wait_seconds is not None else 10.0,
                "input_regex": module.arguments.input_regex,
                "spec": Jsonb(module.model_dump(mode="json")),
            }).fetchone()["id"]  # type: ignore[index]
            refs[module.name] = ModuleRef(
                mid, module.name, tuple(module.sink_modules), module.arguments.conflict_action,
                module.arguments.task_dist_mode,
            )
        outbox.record_remote_sinks(conn, app_id, spec)
        submit(conn, app_id, start_batches(spec), refs=refs, conflict=ConflictAction.IGNORE)
    return int(app_id)


def get_app(conn: Connection, app_id: int) -> dict[str, Any]:
    """The app row; NotFoundError when absent."""
    row = conn.execute(query("get_app"), {"app_id": app_id}).fetchone()
    if row is None:
        raise NotFoundError("app", app_id)
    return dict(row)


def list_apps(conn: Connection) -> list[dict[str, Any]]:
    """Every app with its task count."""
    return [dict(r) for r in conn.execute(query("list_apps")).fetchall()]


def module_specs(conn: Connection, app_id: int) -> list[dict[str, Any]]:
    """The module rows (with their stored specs), in pipeline order."""
    return [dict(r) for r in conn.execute(query("list_modules"), {"app_id": app_id}).fetchall()]


def set_status(conn: Connection, app_id: int, status: AppStatus) -> None:
    """Pause / resume / start an app (a FINISHED app is left as it is)."""
    get_app(conn, app_id)
    with conn.transaction():
        conn.execute(query("set_app_status"), {"app_id": app_id, "status": status.value})


def finish_app(conn: Connection, app_id: int, result: str) -> None:
    """Set the app's result text and FINISHED."""
    with conn.transaction():
        if conn.execute(query("finish_app"), {"app_id": app_id, "result": result}).fetchone() is None:
            raise NotFoundError("app", app_id)


def cancel_app(conn: Connection, app_id: int) -> None:
    """Finish the app as cancelled: nothing more is claimed, running tasks are killed and released."""
    with conn.transaction():
        if conn.execute(query("cancel_app"), {"app_id": app_id}).fetchone() is None:
            raise NotFoundError("app", app_id)


def semaphore_create(conn: Connection, app_id: int, name: str, value: int) -> int:
    """Create (or reset) a semaphore."""
    with conn.transaction():
        return int(conn.execute(query("semaphore_create"), {"app_id": app_id, "name": name, "value": value})
                   .fetchone()["value"])  # type: ignore[index]


def semaphore_get(conn: Connection, app_id: int, name: str) -> int:
    """A semaphore's value."""
    row = conn.execute(query("semaphore_get"), {"app_id": app_id, "name": name}).fetchone()
    if row is None:
        raise NotFoundError("semaphore", name)
    return int(row["value"])


def semaphore_add(conn: Connection, app_id: int, name: str, delta: int) -> int:
    """Atomically add ``delta`` (negative to decrement); returns the new value."""
    with conn.transaction():
        row = conn.execute(query("semaphore_add"), {"app_id": app_id, "name": name, "delta": delta}).fetchone()
    if row is None:
        raise NotFoundError("semaphore", name)
    return int(row["value"])


def semaphore_list(conn: Connection, app_id: int) -> dict[str, int]:
    """Every semaphore of the app."""
    return {r["name"]: int(r["value"]) for r in conn.execute(query("semaphore_list"), {"app_id": app_id})}


def variable_set(conn: Connection, app_id: int, name: str, value: str) -> None:
    """Set an app variable."""
    with conn.transaction():
        conn.execute(query("variable_set"), {"app_id": app_id, "name": name, "value": value})


def variable_get(conn: Connection, app_id: int, name: str) -> str:
    """An app variable's value."""
    row = conn.execute(query("variable_get"), {"app_id": app_id, "name": name}).fetchone()
    if row is None:
        raise NotFoundError("variable", name)
    return str(row["value"])


def variable_list(conn: Connection, app_id: int) -> dict[str, str]:
    """Every variable of the app."""
    return {r["name"]: str(r["value"]) for r in conn.execute(query("variable_list"), {"app_id": app_id})}


def list_tasks(
    conn: Connection, app_id: int, *, module: str | None = None, status: int | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Tasks of an app, oldest first."""
    params = {"app_id": app_id, "module": module, "status": status, "limit": limit}
    return [dict(r) for r in conn.execute(query("list_tasks"), params).fetchall()]


def get_task(conn: Connection, task_id: int) -> dict[str, Any]:
    """A task with its executions (``execs``)."""
    row = conn.execute(query("get_task"), {"task_id": task_id}).fetchone()
    if row is None:
        raise NotFoundError("task", task_id)
    task = dict(row)
    task.pop("body_sha", None)
    task["execs"] = [dict(r) for r in conn.execute(query("list_execs"), {"task_id": task_id}).fetchall()]
    return task


def retry_tasks(conn: Connection, task_ids: Sequence[int]) -> list[int]:
    """Make finished tasks READY again; returns the ids changed."""
    with conn.transaction():
        rows = conn.execute(query("retry_tasks"), {"task_ids": list(task_ids)}).fetchall()
    return [int(r["id"]) for r in rows]


def any_app(conn: Connection) -> bool:
    """True when the database holds at least one app."""
    row = conn.execute(query("any_app")).fetchone()
    return bool(row and row["any"])


def module_names(conn: Connection, app_id: int) -> list[str]:
    """The app's module names, in pipeline order."""
    return [str(r["name"]) for r in conn.execute(query("module_names"), {"app_id": app_id}).fetchall()]


def list_failed_tasks(
    conn: Connection, app_id: int, *, module: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Failed tasks of an app (exit codes, timeouts, system errors), oldest first."""
    params = {"app_id": app_id, "module": module, "limit": limit}
    return [dict(r) for r in conn.execute(query("list_tasks_failed"), params).fetchall()]


def failed_tasks(conn: Connection, app_id: int, limit: int = 5) -> list[dict[str, Any]]:
    """Up to ``limit`` failed tasks with the stderr/stdout tails of their last execution."""
    return [dict(r) for r in conn.execute(query("failed_tasks"), {"app_id": app_id, "limit": limit}).fetchall()]


def list_slots(conn: Connection, app_id: int) -> list[dict[str, Any]]:
    """Every slot of an app with its state, last message, and the task it runs now
    (``task_id``, ``task_body``, ``task_seconds``); ``live`` = not ended and heart-beating."""
    return [dict(r) for r in conn.execute(query("list_slots"), {"app_id": app_id}).fetchall()]


def running_task(conn: Connection, task_id: int) -> dict[str, Any] | None:
    """For a RUNNING task: ``host``, slot ``seq``, ``slot_status``, elapsed ``seconds`` and the
    live tail of its ``output`` (None when its node sent none yet); else None."""
    row = conn.execute(query("running_task"), {"task_id": task_id}).fetchone()
    return dict(row) if row else None


def task_state(conn: Connection, task_id: int) -> dict[str, Any]:
    """A task's ``status`` and ``attempts``, and while it runs the live tail of its ``output``
    (see :mod:`scalebox_hpc.launcher.livetail`); NotFoundError when there is no such task."""
    with conn.transaction():
        row = conn.execute(query("task_state"), {"task_id": task_id}).fetchone()
    if row is None:
        raise NotFoundError("task", task_id)
    return dict(row)


