"""The WHEN clause of the locality trigger (migration 0025) on a real PostgreSQL: the trigger
skips only rows it would leave without a preferred host (no to_host, pref_host, pref_partial or
`inputs`, of a module the transaction lists in sbx.plain_modules), and the bulk submit lists
only modules without input_regex. Every other row still gets its locality."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from scalebox_hpc.db import apps
from scalebox_hpc.db.bodyfile import BodyFile
from scalebox_hpc.db.connection import Connection, connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.pipeline import load_pipeline
from tests.helpers import write_app

pytestmark = pytest.mark.pg

APP = """
name: when
modules:
  plain: {}
  rx:
    arguments: {input_regex: "^in:(.*)$", locality_wait_seconds: 30}
"""


@pytest.fixture
def app(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[int, dict[str, int]]]:
    """An app with a plain module and one with input_regex; host A is live and holds x/1."""
    spec = load_pipeline(write_app(tmp_path / "app", APP, {"plain/run.sh": "true\n", "rx/run.sh": "true\n"}))
    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, spec)
    q = PgQueue(pg_dsn)
    try:
        mods = {name: ref.id for name, ref in q.modules(app_id).items()}
        slot = q.create_slot(mods["plain"], host="A", seq=0, pid=1, work_dir="/w")
        q.heartbeat(slot, status="READY", lease_seconds=300)
        q.index_scratch("A", [("x/1", 10)], [])
    finally:
        q.close()
    yield app_id, mods


def _trigger_calls(conn: Connection) -> int:
    row = conn.execute("SELECT COALESCE(sum(calls), 0)::int AS n FROM pg_stat_xact_user_functions "
                       "WHERE funcname = 'sbx_task_locality_v1'").fetchone()
    assert row is not None
    return int(row["n"])


# rows the trigger must not skip although their module is listed as plain, and what it makes of them
NEEDS_TRIGGER = [
    pytest.param({"to_host": "B"}, {}, ("B", False, True), id="to_host"),
    pytest.param({"pref_host": "B"}, {}, (None, False, False), id="given-pref_host"),
    pytest.param({"pref_partial": True}, {}, (None, False, False), id="given-pref_partial"),
    pytest.param({}, {"inputs": ["x/1"]}, ("A", False, True), id="inputs-header"),
    pytest.param({}, {"inputs": ["x/1", "x/9"]}, ("A", True, True), id="inputs-partly-held"),
]


@pytest.mark.parametrize(("columns", "headers", "expected"), NEEDS_TRIGGER)
def test_a_listed_module_still_gets_locality_for_rows_that_need_it(
    pg_dsn: str, app: tuple[int, dict[str, int]], columns: dict[str, Any], headers: dict[str, Any],
    expected: tuple[str | None, bool, bool],
) -> None:
    app_id, mods = app
    with connect(pg_dsn) as conn, conn.transaction():
        conn.execute("SELECT set_config('sbx.plain_modules', %s, true)", (f"{mods['rx'] + 1000},{mods['plain']}",))
        names = ", ".join(columns)
        values = "".join(f", %({c})s" for c in columns)
        row = conn.execute(
            f"INSERT INTO sbx_tasks (app_id, module_id, body, headers{', ' if columns else ''}{names}) "
            f"VALUES (%(app)s, %(mod)s, 'b', %(headers)s{values}) "
            "RETURNING pref_host, pref_partial, pref_until IS NOT NULL AS waits",
            {"app": app_id, "mod": mods["plain"], "headers": Jsonb(headers), **columns}).fetchone()
    assert row is not None
    assert (row["pref_host"], row["pref_partial"], row["waits"]) == expected


def test_an_unlisted_module_with_input_regex_gets_locality(pg_dsn: str, app: tuple[int, dict[str, int]]) -> None:
    app_id, mods = app
    with connect(pg_dsn) as conn, conn.transaction():
        conn.execute("SELECT set_config('sbx.plain_modules', %s, true)", (str(mods["plain"]),))
        row = conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 'in:x/1') "
                           "RETURNING pref_host", (app_id, mods["rx"])).fetchone()
    assert row is not None and row["pref_host"] == "A"


@pytest.mark.parametrize("setting", [None, "", "{rx}", "{rx},", ",0"],
                         ids=["unset", "empty", "another-module", "trailing-comma", "zero"])
def test_a_row_of_a_module_not_listed_goes_through_the_trigger(
    pg_dsn: str, app: tuple[int, dict[str, int]], setting: str | None,
) -> None:
    app_id, mods = app
    with connect(pg_dsn) as conn, conn.transaction():
        conn.execute("SET LOCAL track_functions = 'all'")
        if setting is not None:
            conn.execute("SELECT set_config('sbx.plain_modules', %s, true)", (setting.format(rx=mods["rx"]),))
        conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 'b')", (app_id, mods["plain"]))
        assert _trigger_calls(conn) == 1


def test_bulk_submit_skips_the_trigger_for_plain_rows_only(
    pg_dsn: str, app: tuple[int, dict[str, int]], tmp_path: Path,
) -> None:
    app_id, _ = app
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"p{i}\n" for i in range(300)), encoding="utf-8")
    held = tmp_path / "held.txt"
    held.write_text("".join(f"in:x/1#{i}\nother{i}\n" for i in range(100)), encoding="utf-8")
    with connect(pg_dsn) as conn, conn.transaction():
        conn.execute("SET LOCAL track_functions = 'all'")
        done = apps.submit(conn, app_id, [
            apps.Batch(module="plain", file=BodyFile(plain)),
            apps.Batch(module="plain", headers={"inputs": ["x/1"]}, bodies=["with-inputs"]),
            apps.Batch(module="plain", headers={"to_host": "B"}, bodies=["bound"]),
            apps.Batch(module="rx", file=BodyFile(held)),
        ])
        assert done.written == 300 + 1 + 1 + 200
        # the rx rows, the one with inputs and the bound one: never a plain row
        assert _trigger_calls(conn) == 200 + 2
        setting = conn.execute("SELECT current_setting('sbx.plain_modules', true) AS s").fetchone()
        assert setting is not None and setting["s"] == ""  # cleared after the inserts
    with connect(pg_dsn) as conn:
        got = {(r["name"], r["body"]): (r["pref_host"], r["pref_partial"]) for r in conn.execute(
            "SELECT m.name, t.body, t.pref_host, t.pref_partial FROM sbx_tasks t "
            "JOIN sbx_modules m ON m.id = t.module_id WHERE t.app_id = %s", (app_id,))}
    assert all(got[("plain", f"p{i}")] == (None, False) for i in range(300))
    assert got[("plain", "with-inputs")] == ("A", False)
    assert got[("plain", "bound")] == ("B", False)
    # through the trigger, which found no holder: "in:x/1#5" names the input "x/1#5" (see the next test)
    assert all(got[("rx", f"in:x/1#{i}")] == (None, False) for i in range(100))
    assert all(got[("rx", f"other{i}")] == (None, False) for i in range(100))


def test_bulk_submit_into_a_module_with_input_regex_prefers_the_holder(
    pg_dsn: str, app: tuple[int, dict[str, int]], tmp_path: Path,
) -> None:
    app_id, mods = app
    q = PgQueue(pg_dsn)
    try:
        q.index_scratch("A", [(f"f{i}", 1) for i in range(150)], [])
    finally:
        q.close()
    held = tmp_path / "held.txt"
    held.write_text("".join(f"in:f{i}\n" for i in range(150)), encoding="utf-8")
    with connect(pg_dsn) as conn:
        assert apps.submit(conn, app_id, [apps.Batch(module="rx", file=BodyFile(held))]).written == 150
        got = {r["body"]: r["pref_host"] for r in conn.execute(
            "SELECT body, pref_host FROM sbx_tasks WHERE module_id = %s", (mods["rx"],))}
    assert got == {f"in:f{i}": "A" for i in range(150)}
