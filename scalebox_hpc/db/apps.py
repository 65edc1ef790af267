"""Apps, modules and tasks as the CLI sees them: create, inspect, steer."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
from psycopg.types.json import Jsonb

from scalebox_hpc.db import outbox
from scalebox_hpc.db.bodyfile import BodyFile as BodyFile  # re-exported: a Batch takes one
from scalebox_hpc.db.bodyfile import body_chunks, read_bodies
from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.queue import insert_messages, module_refs
from scalebox_hpc.db.sql import query
from scalebox_hpc.errors import InvalidMessageError, NotFoundError
from scalebox_hpc.models import (
    AppStatus,
    ConflictAction,
    Message,
    ModuleRef,
    TaskStatus,
    stall_retries,
    validate_body,
    validate_headers,
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


def add_tasks(
    conn: Connection, app_id: int, module: str | None, messages: Iterable[Message], *, initial: bool = False
) -> int:
    """Add tasks to a module (default: the first module; a message's own ``module`` wins), each
    by its module's CONFLICT_ACTION; one transaction, by COPY when there are many (see
    :func:`submit`). Returns rows written."""
    refs = module_refs(conn, app_id)
    target = module or next(iter(refs))
    if target not in refs:
        raise NotFoundError("module", target)
    status = TaskStatus.INITIAL if initial else TaskStatus.READY
    bulk = _Bulk(refs, target, status, None)
    return bulk.run(conn, app_id, bulk.message_rows(messages))


def add_tasks_json(
    conn: Connection, app_id: int, module: str | None, messages: Sequence[Message], *, initial: bool = False
) -> int:
    """:func:`add_tasks` by the hand-off's path (every row in one JSON parameter, the SQL function
    sbx_insert_messages_v1): kept as the reference the bulk path is tested and measured against."""
    refs = module_refs(conn, app_id)
    target = module or next(iter(refs))
    if target not in refs:
        raise NotFoundError("module", target)
    status = TaskStatus.INITIAL if initial else TaskStatus.READY
    routed = [(refs[msg.module or target], msg) for msg in messages]
    with conn.transaction():
        return insert_messages(conn, app_id, routed, status=status)


# -- bulk submit -------------------------------------------------------------------------------
# Many tasks at once (`task add --file`, FILE: start tasks, add_tasks) go in by COPY into a
# temporary table and one INSERT ... SELECT per conflict action, with the rules of
# sbx_insert_messages_v1 (the hand-off's path, which takes every row as one JSON value).

BULK_JSON_ROWS = 100
"""Up to this many rows go as one JSON parameter; more by COPY (a temporary table costs a few
milliseconds to create and drop, COPY takes a tenth of JSON's time a row)."""

_Row = tuple[int, int, int | None, str]
"""(seq, group, line, body): one row of a bulk submit."""


@dataclass(frozen=True)
class Batch:
    """Tasks for one module with the same headers: ``bodies``, then the lines of ``file``."""

    module: str | None = None
    """None: the call's default module (the app's first)."""
    headers: Mapping[str, Any] = field(default_factory=dict)
    bodies: Sequence[str] = ()
    file: BodyFile | None = None


class Submitted(NamedTuple):
    """What :func:`submit` did."""

    written: int
    """Rows written (inserted, or overwritten under OVERWRITE)."""
    given: int
    """Bodies given (blank lines not counted)."""


def submit(
    conn: Connection, app_id: int, batches: Iterable[Batch], *, module: str | None = None,
    initial: bool = False, conflict: ConflictAction | None = None, refs: dict[str, ModuleRef] | None = None,
) -> Submitted:
    """Add the batches' tasks in one transaction, in order, each by its module's CONFLICT_ACTION
    (or ``conflict``). Files are streamed through COPY; a body that cannot
    be stored, or under FAIL a body that exists already or repeats an earlier one, raises
    InvalidMessageError naming the file and line, and nothing is written. Under OVERWRITE a body
    given twice is written once, as its last occurrence says, in the place of its first."""
    refs = module_refs(conn, app_id) if refs is None else refs
    target = module or next(iter(refs))
    if target not in refs:
        raise NotFoundError("module", target)
    bulk = _Bulk(refs, target, TaskStatus.INITIAL if initial else TaskStatus.READY, conflict)
    written = bulk.run(conn, app_id, bulk.batch_rows(batches))
    return Submitted(written, bulk.seq)


class _Bulk:
    """One bulk submit: the groups of rows (module + headers), the COPY data, the inserts."""

    def __init__(
        self, refs: dict[str, ModuleRef], default: str, status: int, conflict: ConflictAction | None
    ) -> None:
        self.refs = refs
        self.default = default
        self.status = status
        self.conflict = conflict
        self.groups: list[dict[str, Any]] = []
        self.labels: list[str] = []
        self._keys: dict[tuple[str, str, str], int] = {}
        self.seq = 0

    def group(self, module: str | None, headers: Mapping[str, Any], label: str = "") -> int:
        """The group of rows for this module, headers and source (created on first use)."""
        name = module or self.default
        key = (name, json.dumps(headers, sort_keys=True, default=repr) if headers else "", label)
        found = self._keys.get(key)
        if found is not None:
            return found
        ref = self.refs.get(name)
        if ref is None:
            raise NotFoundError("module", name)
        # what insert_messages does per message, once per group: the header checks, to_host /
        # to_slot as their own columns (no HOST-/SLOT-BOUND binding: that is for emitted messages)
        hdrs = validate_headers(headers)
        to_slot = hdrs.get("to_slot")
        grp = len(self.groups)
        self.groups.append({
            "grp": grp, "module_id": ref.id, "headers": hdrs, "to_host": hdrs.get("to_host"),
            "to_slot": int(to_slot) if to_slot not in (None, "") else None,
            "status": self.status, "action": (self.conflict or ref.conflict_action).value,
        })
        self.labels.append(label)
        self._keys[key] = grp
        return grp

    def message_rows(self, messages: Iterable[Message]) -> Iterator[list[_Row]]:
        """Rows for messages (already checked: a Message checks itself)."""
        out: list[_Row] = []
        for msg in messages:
            self.seq += 1
            out.append((self.seq, self.group(msg.module, msg.headers), None, msg.body))
            if len(out) >= 10_000:
                yield out
                out = []
        yield out

    def batch_rows(self, batches: Iterable[Batch]) -> Iterator[list[_Row]]:
        """Rows for batches: the given bodies, then the file's lines, streamed."""
        for batch in batches:
            if batch.bodies:
                grp = self.group(batch.module, batch.headers)
                out: list[_Row] = []
                for body in batch.bodies:
                    self.seq += 1
                    out.append((self.seq, grp, None, validate_body(body)))
                yield out
            if batch.file is not None:
                yield from self._file_rows(batch.file, self.group(batch.module, batch.headers, batch.file.name))

    def _file_rows(self, source: BodyFile, grp: int) -> Iterator[list[_Row]]:
        """Rows for a body file, a piece of it at a time."""
        for chunk in body_chunks(source):
            seq = self.seq
            self.seq += len(chunk)
            yield [(seq + i, grp, line, body) for i, (line, body) in enumerate(chunk, 1)]

    def run(self, conn: Connection, app_id: int, chunks: Iterator[list[_Row]]) -> int:
        """Insert the rows in one transaction; returns rows written. Up to BULK_JSON_ROWS rows go
        as one JSON parameter; more are COPYed into a temporary table that lives in this
        transaction only (dropped at the end, at the latest with the transaction: PgBouncer's
        transaction pooling never hands it to another client)."""
        first: list[_Row] = []
        for chunk in chunks:
            first += chunk
            if len(first) > BULK_JSON_ROWS:
                break
        else:
            if not first:
                return 0
            rows = Jsonb([{"seq": r[0], "grp": r[1], "line": r[2], "body": r[3]} for r in first])
            with conn.transaction(), conn.cursor() as cur:
                params = {"app_id": app_id, "groups": Jsonb(self.groups), "rows": rows}
                return self._insert(cur, params, query("bulk_rows_json") + "\n")
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(query("bulk_create"))
            with cur.copy(query("bulk_copy")) as copy:
                copy.set_types(["int8", "int4", "int8", "text"])
                for row in first:
                    copy.write_row(row)
                for chunk in chunks:
                    for row in chunk:
                        copy.write_row(row)
            written = self._insert(cur, {"app_id": app_id, "groups": Jsonb(self.groups)}, "")
            cur.execute(query("bulk_drop"))
        return written

    def _insert(self, cur: psycopg.Cursor[Any], params: dict[str, Any], source: str) -> int:
        """The inserts, one per CONFLICT_ACTION, from ``sbx_bulk``: the temporary table, or the
        common table expression ``source`` puts before each statement."""
        conn = cur.connection
        actions = {g["action"] for g in self.groups}
        written = 0
        if ConflictAction.FAIL in actions:
            try:
                with conn.transaction():  # a savepoint: the duplicate is named after
                    written += cur.execute(source + query("bulk_insert_fail"), params).rowcount
            except psycopg.errors.UniqueViolation as exc:
                raise self._duplicate(cur, params, source) from exc
        if ConflictAction.IGNORE in actions:
            written += cur.execute(source + query("bulk_insert_ignore"), params).rowcount
        if ConflictAction.OVERWRITE in actions:
            try:
                with conn.transaction():
                    written += cur.execute(source + query("bulk_insert_overwrite"), params).rowcount
            except psycopg.errors.CardinalityViolation:
                # a body given twice: one ON CONFLICT statement cannot update a row twice
                written += cur.execute(source + query("bulk_insert_overwrite_once"), params).rowcount
        return written

    def _duplicate(self, cur: psycopg.Cursor[Any], params: dict[str, Any], source: str) -> InvalidMessageError:
        """The error for the first FAIL row whose body exists already or repeats an earlier row."""
        hint = "set arguments.conflict_action to IGNORE or OVERWRITE, or use distinct bodies"
        row = cur.execute(source + query("bulk_fail_culprit"), params).fetchone()
        if row is None:  # another transaction's insert, committed meanwhile
            return InvalidMessageError(
                "a message body already exists in its module (CONFLICT_ACTION=FAIL)", hint=hint)
        label = self.labels[row["grp"]]
        where = f"{label} line {row['line']}: " if label and row["line"] is not None else ""
        body = row["body"] if len(row["body"]) <= 60 else row["body"][:57] + "..."
        if row["first_seq"] != row["seq"]:
            first = f"line {row['first_line']}" if label and row["first_line"] is not None else "an earlier body"
            what = f"repeats {first}"
        else:
            what = f"already exists in module {row['module']}"
        return InvalidMessageError(f"{where}body {body!r} {what} (CONFLICT_ACTION=FAIL)", hint=hint)


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


@dataclass
class ModuleCounts:
    """Task counts of one module by status."""

    name: str
    by_status: dict[int, int]
    last_minute: int

    @property
    def total(self) -> int:
        """All tasks of the module."""
        return sum(self.by_status.values())

    @property
    def done(self) -> int:
        """Tasks in a terminal status (OK or failed)."""
        return sum(n for s, n in self.by_status.items() if s >= 0 or s < -100)

    @property
    def failed(self) -> int:
        """Tasks that ended in failure."""
        return sum(n for s, n in self.by_status.items() if TaskStatus.is_failure(s))

    def count(self, status: int) -> int:
        """Tasks in one status."""
        return self.by_status.get(status, 0)


def module_counts(conn: Connection, app_id: int) -> list[ModuleCounts]:
    """Per-module task counts by status, in pipeline order."""
    out: dict[str, ModuleCounts] = {}
    for r in conn.execute(query("module_counts"), {"app_id": app_id}).fetchall():
        mc = out.setdefault(r["name"], ModuleCounts(r["name"], {}, 0))
        if r["status"] is not None:
            mc.by_status[int(r["status"])] = int(r["n"])
            mc.last_minute += int(r["last_minute"])
    return list(out.values())


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


def last_line(text: str | None) -> str:
    """The last non-blank line of ``text`` (stripped), or ''."""
    for line in reversed((text or "").splitlines()):
        if line.strip():
            return line.strip()
    return ""


@dataclass(frozen=True)
class StuckModule:
    """A module with READY tasks that no live slot can take: each of its slots ended."""

    module: str
    ready: int
    slots: int
    errors: int
    message: str

    def describe(self) -> str:
        """One line: the module, what became of its slots, the first error, the READY count."""
        if not self.slots:
            what = "no slot runs it here (an MPI collective module runs only as an MPI stage)"
        elif self.errors == self.slots:
            what = f"all {self.slots} slot(s) failed"
        elif self.errors:
            what = f"no live slot ({self.errors} of {self.slots} failed, the others ended)"
        else:
            what = f"no live slot (all {self.slots} ended)"
        return f"{self.module}: {what}" + (f": {self.message}" if self.message else "") + \
            f" — {self.ready} task(s) left READY"


def stuck_modules(
    counts: Sequence[ModuleCounts], slots: Sequence[dict[str, Any]], *, without_slots: bool = False,
) -> list[StuckModule]:
    """The modules whose READY tasks no slot can take: they had slots, and none is live any more
    (``without_slots``: also those that never had one, for a run whose slots have all started)."""
    found = []
    for mc in counts:
        ready = mc.count(TaskStatus.READY)
        mine = [s for s in slots if s["module"] == mc.name]
        if not ready or (not mine and not without_slots) or any(s["live"] for s in mine):
            continue
        errors = [s for s in mine if s["status"] == "ERROR"]
        message = next((str(s["message"]) for s in errors if s["message"]), "")
        found.append(StuckModule(mc.name, ready, len(mine), len(errors), message))
    return found


def all_work_stuck(counts: Sequence[ModuleCounts], stuck: Sequence[StuckModule]) -> bool:
    """True when there is work left and all of it waits in stuck modules (nothing RUNNING
    anywhere, nothing READY that a live slot could take): a run waiting longer waits for ever."""
    names = {s.module for s in stuck}
    if not names:
        return False
    for mc in counts:
        if mc.count(TaskStatus.RUNNING) or (mc.name not in names and mc.count(TaskStatus.READY)):
            return False
    return True


def app_state(status: str, counts: Sequence[ModuleCounts], slots: Sequence[dict[str, Any]]) -> str:
    """The app's state as a user should see it: the stored status, except that a RUNNING app
    with nothing READY or RUNNING and no live slot is ``IDLE``, and one with READY tasks but no
    live slot (and nothing running) is ``WAITING`` (for a launcher or a stage job)."""
    if status != AppStatus.RUNNING:
        return status
    ready = sum(mc.count(TaskStatus.READY) for mc in counts)
    running = sum(mc.count(TaskStatus.RUNNING) for mc in counts)
    live = any(s["live"] for s in slots)
    if running or live:
        return status
    return "WAITING" if ready else "IDLE"


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


# -- why READY tasks do not move ----------------------------------------------------------------
WHY_SLOTS_NAMED = 3
"""Slot gate reasons named per module (the others are counted)."""


@dataclass(frozen=True)
class Why:
    """One reason a module's READY tasks are not claimed, matching one rule of claim_tasks.

    ``kind``: ``app_paused``, ``app_initial``, ``app_finished``, ``tasks_initial``, ``no_slot``,
    ``check_sh``, ``disk_gate``, ``semaphore``, ``back_pressure`` or ``host``."""

    kind: str
    text: str

    def as_json(self) -> dict[str, str]:
        """``{"kind", "text"}``."""
        return {"kind": self.kind, "text": self.text}


def module_why(
    conn: Connection, app_id: int, counts: Sequence[ModuleCounts], slots: Sequence[dict[str, Any]],
) -> dict[str, list[Why]]:
    """Per module, why its READY (or INITIAL) tasks wait (:func:`why_waiting`); modules with
    nothing waiting, or nothing keeping it, have an empty list."""
    by_name = {mc.name: mc for mc in counts}
    out: dict[str, list[Why]] = {}
    for r in conn.execute(query("module_why"), {"app_id": app_id}).fetchall():
        mc = by_name.get(r["name"]) or ModuleCounts(r["name"], {}, 0)
        mine = [s for s in slots if s["module"] == r["name"]]
        out[r["name"]] = why_waiting(dict(r), mc, mine, app_id)
    return out


def why_waiting(
    row: Mapping[str, Any], counts: ModuleCounts, slots: Sequence[Mapping[str, Any]], app_id: int,
) -> list[Why]:
    """The reasons (one row of the ``module_why`` query, the module's counts and slots) the
    claim takes none of the module's READY tasks now, each the rule of claim_tasks that holds
    them; INITIAL tasks are named too (they are not claimable at all until activated)."""
    ready, initial = counts.count(TaskStatus.READY), counts.count(TaskStatus.INITIAL)
    found: list[Why] = []
    if initial:
        found.append(Why("tasks_initial", f"{initial} task(s) INITIAL: not claimable until activated "
                                          f"(`scalebox task retry --status initial --app {app_id}`)"))
    if not ready:
        return found
    found += _app_why(str(row["app_status"]), app_id)
    found += _slot_why(row, ready, slots, app_id)
    semaphore = row.get("semaphore")
    value = row.get("semaphore_value")
    if semaphore and (value is None or int(value) <= 0):
        said = "does not exist" if value is None else f"is {value}"
        found.append(Why("semaphore", f"semaphore {semaphore!r} {said}: a claim takes one unit a task "
                                      f"(`scalebox semaphore increment --app {app_id} {semaphore}`)"))
    for sink in row.get("full_sinks") or []:
        found.append(Why("back_pressure", f"back-pressure: its sink {sink['sink']} has {sink['max_pending']} or "
                                          f"more READY tasks (max_pending {sink['max_pending']})"))
    for h in row.get("host_waits") or []:
        found.append(Why("host", _host_wait(h)))
    return found


def _app_why(status: str, app_id: int) -> list[Why]:
    """The claim takes tasks of RUNNING apps only."""
    if status == AppStatus.PAUSED:
        return [Why("app_paused", f"the app is PAUSED: nothing is claimed (`scalebox app resume {app_id}`)")]
    if status == AppStatus.INITIAL:
        return [Why("app_initial", f"the app is INITIAL: nothing is claimed until `scalebox app resume {app_id}`")]
    if status == AppStatus.FINISHED:
        return [Why("app_finished", "the app is FINISHED: nothing more is claimed")]
    return []


def _slot_why(row: Mapping[str, Any], ready: int, slots: Sequence[Mapping[str, Any]], app_id: int) -> list[Why]:
    """No live slot of the module, or live slots whose gates are closed (check.sh, disk)."""
    if not row["live_slots"]:
        if not slots:
            return [Why("no_slot", f"no slot has run it yet — start one with `scalebox run --app {app_id}`, "
                                   f"`scalebox launcher --app {app_id}` or `scalebox submit`")]
        errors = [s for s in slots if s["status"] == "ERROR"]
        message = next((str(s["message"]) for s in errors if s["message"]), "")
        stuck = StuckModule(str(row["name"]), ready, len(slots), len(errors), message).describe()
        return [Why("no_slot", stuck.removeprefix(f"{row['name']}: "))]
    groups: dict[str, list[str]] = {}
    for w in row.get("waiting") or []:
        groups.setdefault(str(w["waiting"]), []).append(f"{w['host']} slot {w['seq']}")
    found = []
    for reason, where in list(groups.items())[:WHY_SLOTS_NAMED]:
        kind = "check_sh" if reason.startswith("check.sh") else "disk_gate"
        whom = ", ".join(where[:WHY_SLOTS_NAMED]) + (f" and {len(where) - WHY_SLOTS_NAMED} more"
                                                     if len(where) > WHY_SLOTS_NAMED else "")
        found.append(Why(kind, f"{len(where)} of its {row['live_slots']} live slot(s) wait ({whom}): {reason}"))
    return found


def _host_wait(h: Mapping[str, Any]) -> str:
    """Tasks held for a host that runs no live slot of their module."""
    n = f"{h['tasks']}{'+' if int(h['tasks']) >= 10000 else ''} task(s)"
    if h["bound"]:
        return (f"{n} bound to host {h['host']} (to_host), which runs no live slot of this module "
                "(released to any host once it is dead past their locality wait)")
    wait = max(0.0, float(h["wait_seconds"] or 0.0))
    return (f"{n} wait for host {h['host']}, which holds their inputs but runs no live slot of this "
            f"module, for up to {wait:.0f}s more (locality_wait_seconds)")
