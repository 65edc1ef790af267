"""Many tasks into the queue at once: ``task add`` (its ``--file``), an app's start tasks, the
Python API's :meth:`~scalebox_hpc.client.Client.add_tasks`. Re-exported by :mod:`scalebox_hpc.db.apps`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from psycopg.types.json import Jsonb

from scalebox_hpc.db.bodyfile import BodyFile, body_chunks
from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.queue import insert_messages, module_refs
from scalebox_hpc.db.sql import query
from scalebox_hpc.errors import InvalidMessageError, NotFoundError
from scalebox_hpc.models import ConflictAction, Message, ModuleRef, TaskStatus, validate_body, validate_headers


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


def copy_text(rows: Sequence[_Row]) -> str:
    """Rows as COPY text-format lines (NULL as \\N): one string a chunk, measured 0.08 s for
    100,000 rows where a write_row() per row took 0.33 s. Bodies are escaped (a backslash, and
    the characters that end a column or a row) only when the chunk holds one of them."""
    if not rows:
        return ""
    joined = "".join(r[3] for r in rows)
    if "\\" in joined or "\t" in joined or "\n" in joined or "\r" in joined:
        bodies = [r[3].replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
                  for r in rows]
    else:
        bodies = [r[3] for r in rows]
    null = "\\N"
    return "".join([f"{r[0]}\t{r[1]}\t{null if r[2] is None else r[2]}\t{b}\n"
                    for r, b in zip(rows, bodies, strict=True)])


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
                copy.write(copy_text(first))
                for chunk in chunks:
                    copy.write(copy_text(chunk))
            written = self._insert(cur, {"app_id": app_id, "groups": Jsonb(self.groups)}, "")
            cur.execute(query("bulk_drop"))
        return written

    def _insert(self, cur: psycopg.Cursor[Any], params: dict[str, Any], source: str) -> int:
        """The inserts, one per CONFLICT_ACTION, from ``sbx_bulk``: the temporary table, or the
        common table expression ``source`` puts before each statement."""
        # the locality trigger skips the rows it would leave without a preferred host (0025).
        # Transaction-local: an error rolls back the savepoint of run(), and the setting with it.
        cur.execute(query("bulk_plain_modules"), {"module_ids": sorted({g["module_id"] for g in self.groups})})
        written = self._insert_each(cur, params, source)
        cur.execute(query("bulk_plain_modules_clear"))
        return written

    def _insert_each(self, cur: psycopg.Cursor[Any], params: dict[str, Any], source: str) -> int:
        """The inserts of :meth:`_insert`, one per CONFLICT_ACTION present."""
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


