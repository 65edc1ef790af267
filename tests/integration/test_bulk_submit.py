"""Bulk submit on a real PostgreSQL: the COPY path (db/apps.py ``submit`` / ``add_tasks``)
writes exactly the rows the hand-off's row-by-row path (``sbx_insert_messages_v1``, here
``add_tasks_json``) writes — per CONFLICT_ACTION, with duplicates within the input and against
existing tasks, HOST-BOUND binding, to_host / to_slot, locality preferences — few rows (one JSON
parameter) and many (COPY through a temporary table)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from scalebox_hpc.db import apps
from scalebox_hpc.db.bodyfile import BodyFile
from scalebox_hpc.db.connection import Connection, connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.models import Message
from scalebox_hpc.pipeline import load_pipeline
from tests.conftest import _with_db
from tests.helpers import write_app

pytestmark = pytest.mark.pg

PIPE = """
name: bulk
modules:
  f: {}
  i:
    arguments: {conflict_action: IGNORE}
  o:
    arguments: {conflict_action: OVERWRITE}
  hb:
    arguments: {conflict_action: IGNORE, task_dist_mode: HOST-BOUND}
  sb:
    arguments: {conflict_action: OVERWRITE, task_dist_mode: SLOT-BOUND}
  rx:
    arguments: {conflict_action: OVERWRITE, input_regex: "^in:(.*)$", locality_wait_seconds: 5}
"""
SCRIPTS = {f"{m}/run.sh": "true\n" for m in ("f", "i", "o", "hb", "sb", "rx")}
# every column that says what a task is (id, created_at and the pref_until instant aside)
COLUMNS = """m.name AS module, t.body, t.headers, t.status, t.to_host, t.to_slot, t.pref_host,
             t.pref_partial, t.pref_until IS NOT NULL AS waits, t.attempts, t.retry_base,
             t.slot_id IS NULL AS unclaimed, t.host, t.started_at IS NULL AS unstarted,
             t.finished_at IS NULL AS unfinished, t.from_task_id"""


@pytest.fixture
def twin(pg_server: str, pg_template: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two fresh databases with the same app, tasks and scratch index: one for each path."""
    names = [f"sbx_b_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    with psycopg.connect(pg_server, autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(pg_template)))
    dsns = [_with_db(pg_server, n) for n in names]
    spec = load_pipeline(write_app(tmp_path / "app", PIPE, SCRIPTS))
    for dsn in dsns:
        _prepare(dsn, spec)
    yield dsns[0], dsns[1]
    with psycopg.connect(pg_server, autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _prepare(dsn: str, spec: Any) -> None:
    with connect(dsn) as conn:
        app_id = apps.create_app(conn, spec)
        assert app_id == 1
        # tasks that exist already, by the reference path; one of o's is RUNNING (OVERWRITE spares it)
        for module in ("f", "i", "o", "hb", "sb", "rx"):
            apps.add_tasks_json(conn, 1, module, [Message("old-1", {"v": "old"}), Message("old-2", {"v": "old"}),
                                                  Message("in:held", {"v": "old"})])
        conn.execute("UPDATE sbx_tasks SET status = -3, attempts = 2 WHERE body = 'old-2' AND module_id IN "
                     "(SELECT id FROM sbx_modules WHERE name IN ('o', 'sb', 'rx'))")
        conn.execute("UPDATE sbx_tasks SET status = 0, attempts = 3, retry_base = 1 WHERE body = 'old-1'")
        conn.commit()
    q = PgQueue(dsn)
    try:
        mid = q.modules(1)["rx"].id
        slot = q.create_slot(mid, host="A", seq=0, pid=1, work_dir="/w")  # host A is live
        q.heartbeat(slot, status="READY", lease_seconds=300)
        q.index_scratch("A", [("held", 10), ("x/1", 5)], [])
    finally:
        q.close()


def rows(dsn: str) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        return [dict(r) for r in conn.execute(
            f"SELECT {COLUMNS} FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id ORDER BY t.id")]


def messages(scale: int) -> list[Message]:
    """A mixed input for every module: new bodies, bodies that exist, to_host / to_slot / from_*
    headers, inputs (a header, or the body through input_regex), text COPY must escape.
    Duplicates within the input only where the module's action allows them (see the tests)."""
    out: list[Message] = []
    for k in range(scale):
        for module in ("i", "o", "hb", "sb", "rx", "f"):
            fresh = [
                Message(f"n{k}", module=module),
                Message(f"tab\there\\N back\\slash\nnewline\r {k}", {"q": "it's \"quoted\" $(x)"}, module=module),
                Message(f"bound{k}", {"to_host": "B", "to_slot": "3"}, module=module),
                Message(f"from{k}", {"from_host": "C", "from_slot": 7, "n": k}, module=module),
                Message(f"inputs{k}", {"inputs": ["x/1", "gone"]}, module=module),
                Message(f"in:held{k}", module=module),
                Message(f"é{k}😀", {"ü": ["ß", 1.5, None, True]}, module=module),
            ]
            out += fresh
            if module != "f" and k == 0:
                out += [Message("old-1", {"v": "new"}, module=module), Message("old-2", {"v": "new"}, module=module),
                        Message("in:held", {"v": "new"}, module=module)]
            if module in ("i", "hb"):
                out += [Message(f"n{k}", {"second": True}, module=module)]  # IGNORE: the first one stays
    return out


@pytest.mark.parametrize("scale", [1, 40], ids=["json-rows", "copy-rows"])
def test_add_tasks_writes_what_the_row_by_row_path_writes(twin: tuple[str, str], scale: int) -> None:
    old, new = twin
    msgs = messages(scale)
    assert (len(msgs) > apps.BULK_JSON_ROWS) == (scale > 1)
    with connect(old) as conn:
        written_old = apps.add_tasks_json(conn, 1, None, msgs)
    with connect(new) as conn:
        written_new = apps.add_tasks(conn, 1, None, msgs)
    assert written_new == written_old
    got = rows(new)
    assert got == rows(old)
    # the rules did apply (not two paths equally wrong)
    by = {(r["module"], r["body"]): r for r in got}
    assert by[("o", "old-1")]["headers"] == {"v": "new"} and by[("o", "old-1")]["attempts"] == 0
    assert by[("o", "old-2")]["headers"] == {"v": "old"} and by[("o", "old-2")]["status"] == -3  # RUNNING: spared
    assert by[("i", "old-1")]["headers"] == {"v": "old"} and by[("i", "n0")]["headers"] == {}
    # a submitted message is not HOST-/SLOT-BOUND to a from_host it names (only emitted ones are)
    assert by[("hb", "from0")]["to_host"] is None and by[("sb", "from0")]["to_slot"] is None
    assert by[("i", "bound0")]["to_slot"] == 3 and by[("i", "bound0")]["pref_host"] == "B"
    assert by[("rx", "in:held0")]["pref_host"] is None and by[("rx", "in:held")]["pref_host"] == "A"
    assert by[("i", "inputs0")]["pref_host"] == "A" and by[("i", "inputs0")]["pref_partial"] is True
    assert by[("i", "tab\there\\N back\\slash\nnewline\r 0")]["headers"] == {"q": "it's \"quoted\" $(x)"}


@pytest.mark.parametrize("scale", [1, 40], ids=["json-rows", "copy-rows"])
@pytest.mark.parametrize("dup", ["existing", "within"])
def test_fail_refuses_the_whole_input_on_either_path(twin: tuple[str, str], scale: int, dup: str) -> None:
    old, new = twin
    before = rows(old)
    msgs = [Message(f"n{k}", module="f") for k in range(scale * 10)]
    msgs.insert(len(msgs) // 2, Message("old-1" if dup == "existing" else "n0", module="f"))
    msgs.append(Message("late", module="i"))
    with connect(old) as conn, pytest.raises(InvalidMessageError, match="CONFLICT_ACTION=FAIL"):
        apps.add_tasks_json(conn, 1, None, msgs)
    with connect(new) as conn, pytest.raises(InvalidMessageError, match="CONFLICT_ACTION=FAIL") as caught:
        apps.add_tasks(conn, 1, None, msgs)
    assert rows(new) == rows(old) == before
    what = "already exists in module f" if dup == "existing" else "repeats an earlier body"
    assert what in str(caught.value)


@pytest.mark.parametrize("scale", [1, 40], ids=["json-rows", "copy-rows"])
def test_overwrite_with_a_body_given_twice_is_as_if_applied_in_order(twin: tuple[str, str], scale: int) -> None:
    """Both paths write each body once, with its last occurrence's headers, at its first one's
    place (one ON CONFLICT DO UPDATE statement may not touch a row twice)."""
    old, new = twin
    msgs = []
    for k in range(scale * 5):
        msgs += [Message(f"d{k}", {"v": 1}, module="o"), Message(f"e{k}", module="o"),
                 Message(f"d{k}", {"v": 2}, module="o"), Message("old-1", {"v": k}, module="o")]
    with connect(old) as conn:  # the row-by-row path does the same since migration 0009
        expected = apps.add_tasks_json(conn, 1, None, msgs)
    with connect(new) as conn:
        assert apps.add_tasks(conn, 1, None, msgs) == expected
    assert rows(new) == rows(old)
    with connect(new) as conn:
        [d0] = conn.execute("SELECT headers FROM sbx_tasks WHERE body = 'd0'").fetchall()
    assert d0["headers"] == {"v": 2}  # the content of the last


def test_a_file_goes_in_as_its_lines_would_one_by_one(twin: tuple[str, str], tmp_path: Path) -> None:
    """`task add --file` (a Batch with a BodyFile), cut in small pieces, against the old CLI's
    way: every non-blank line of read_text().splitlines() as a Message with the -H headers."""
    old, new = twin
    lines = []
    for k in range(300):
        lines += [f"line-{k}", "", "   ", f"  spaced {k}  ", "old-1", f"line-{k // 2}", f"tab\t{k}\\x", f"é{k}\r"]
    data = "\n".join(lines) + "\nlast\u2028after\x85more\r\nend"
    path = tmp_path / "bodies.txt"
    path.write_text(data, encoding="utf-8")
    headers = {"k": "v", "to_slot": "2"}
    bodies = [ln for ln in data.splitlines() if ln.strip()]
    for module in ("i", "o", "hb"):
        # the old path cannot take a body twice under OVERWRITE (see above): its input is the
        # file without repeats, which under OVERWRITE (same headers) writes the same rows
        given = list(dict.fromkeys(bodies)) if module == "o" else bodies
        with connect(old) as conn:
            w_old = apps.add_tasks_json(conn, 1, module, [Message(b, headers) for b in given])
        with connect(new) as conn:
            done = apps.submit(conn, 1, [apps.Batch(module, headers, file=BodyFile(path, chunk_bytes=97))])
        assert done == apps.Submitted(w_old, len(bodies))
    assert rows(new) == rows(old)


def test_a_file_error_names_the_line_and_writes_nothing(pg_dsn: str, tmp_path: Path) -> None:
    spec = load_pipeline(write_app(tmp_path / "app", PIPE, SCRIPTS))
    path = tmp_path / "bodies.txt"
    with connect(pg_dsn) as conn:
        apps.create_app(conn, spec)
        path.write_text("".join(f"b{k}\n" for k in range(500)) + "b7\n", encoding="utf-8")
        with pytest.raises(InvalidMessageError, match=r"^bodies.txt line 501: body 'b7' repeats line 8 "):
            apps.submit(conn, 1, [apps.Batch("f", file=BodyFile(path, label="bodies.txt"))])
        path.write_text("".join(f"b{k}\n" for k in range(500)) + "\n\nnul\x00\n", encoding="utf-8")
        with pytest.raises(InvalidMessageError, match=r"line 503: task body contains a NUL byte"):
            apps.submit(conn, 1, [apps.Batch("i", file=BodyFile(path, chunk_bytes=64))])
        apps.add_tasks(conn, 1, "f", [Message("b300")])
        path.write_text("".join(f"b{k}\n" for k in range(500)), encoding="utf-8")
        with pytest.raises(InvalidMessageError, match=r"line 301: body 'b300' already exists in module f"):
            apps.submit(conn, 1, [apps.Batch("f", file=BodyFile(path, label="bodies.txt"))])
        count = conn.execute("SELECT count(*) AS n FROM sbx_tasks").fetchone()
        assert count is not None and count["n"] == 1
        # the temporary table went with each transaction: the session holds none
        gone = conn.execute("SELECT to_regclass('pg_temp.sbx_bulk') IS NULL AS gone").fetchone()
        assert gone is not None and gone["gone"]


def test_submits_share_a_transaction_and_leave_no_table(pg_dsn: str, tmp_path: Path) -> None:
    spec = load_pipeline(write_app(tmp_path / "app", PIPE, SCRIPTS))
    path = tmp_path / "bodies.txt"
    path.write_text("".join(f"b{k}\n" for k in range(1000)), encoding="utf-8")
    with connect(pg_dsn) as conn:
        apps.create_app(conn, spec)
        with conn.transaction():
            assert apps.submit(conn, 1, [apps.Batch("i", file=BodyFile(path))]).written == 1000
            assert apps.submit(conn, 1, [apps.Batch("o", file=BodyFile(path))]).written == 1000
            assert apps.submit(conn, 1, [apps.Batch("i", file=BodyFile(path))]).written == 0  # IGNORE
        with pytest.raises(InvalidMessageError), conn.transaction():
            apps.submit(conn, 1, [apps.Batch("f", file=BodyFile(path))])
            apps.submit(conn, 1, [apps.Batch("f", file=BodyFile(path))])  # duplicates: all rolled back
        _check_no_table(conn)
        n = conn.execute("SELECT count(*) AS n FROM sbx_tasks").fetchone()
        assert n is not None and n["n"] == 2000
        # ids follow the file's order: claims take the lowest id first
        bodies = [r["body"] for r in conn.execute(
            "SELECT body FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id WHERE m.name = 'o' ORDER BY t.id")]
        assert bodies == [f"b{k}" for k in range(1000)]


def _check_no_table(conn: Connection) -> None:
    row = conn.execute("SELECT to_regclass('pg_temp.sbx_bulk') IS NULL AS gone").fetchone()
    assert row is not None and row["gone"]


def test_file_start_tasks_stream_with_the_old_rules(pg_dsn: str, tmp_path: Path) -> None:
    """FILE: start tasks: stripped lines, IGNORE (a repeated line is one task), in file order."""
    lines = [f"  s{k % 700}  " for k in range(1000)] + ["", " \t "]
    yaml = "name: starts\nparameters: {start_task: 'FILE:list.txt'}\nmodules:\n  a: {}\n" \
           "  b:\n    parameters: {start_task: one}\n"
    app_yaml = write_app(tmp_path / "app", yaml, {"a/run.sh": "true\n", "b/run.sh": "true\n"})
    (tmp_path / "app" / "list.txt").write_text("\n".join(lines), encoding="utf-8")
    spec = load_pipeline(app_yaml)
    expected = [(m.module, m.body) for m in apps.start_messages(spec)]
    assert expected[:2] == [("a", "s0"), ("a", "s1")] and len(expected) == 1001
    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, spec)
        got = [(r["name"], r["body"]) for r in conn.execute(
            "SELECT m.name, t.body FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id "
            "WHERE t.app_id = %s ORDER BY t.id", (app_id,))]
    assert got == list(dict.fromkeys(expected))
    (tmp_path / "app" / "list.txt").write_bytes(b"ok\n\xff\n")
    with connect(pg_dsn) as conn, pytest.raises(InvalidMessageError, match=r"start_task FILE:list.txt line 2 "):
        apps.create_app(conn, load_pipeline(app_yaml))
