"""Schema and migrations against a real PostgreSQL."""

from __future__ import annotations

import threading

import psycopg
import pytest
from psycopg.rows import dict_row

from scalebox_hpc.db import schema, sql
from scalebox_hpc.errors import SchemaError

pytestmark = pytest.mark.pg

CATALOG = """
SELECT 'column' AS kind, table_name || '.' || column_name AS name,
       concat_ws(' ', data_type, is_nullable, column_default, generation_expression) AS def
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'index', indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass || '.' || conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger', tgrelid::regclass || '.' || tgname, pg_get_triggerdef(oid)
FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'function', proname, concat_ws(' ', prosrc, prosecdef, array_to_string(proconfig, ','))
FROM pg_proc WHERE pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'policy', tablename || '.' || policyname, concat_ws(' ', cmd, qual, with_check)
FROM pg_policies WHERE schemaname = 'public'
UNION ALL
SELECT 'row security', relname, relrowsecurity::text FROM pg_class
WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'
UNION ALL
SELECT 'view', viewname, definition FROM pg_views WHERE schemaname = 'public'
UNION ALL
SELECT 'view options', relname, array_to_string(reloptions, ',') FROM pg_class
WHERE relnamespace = 'public'::regnamespace AND relkind = 'v'
ORDER BY 1, 2
"""


def _catalog(dsn: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(dsn) as conn:
        return [tuple(r) for r in conn.execute(CATALOG).fetchall()]  # type: ignore[misc]


def test_migrations_from_empty_equal_schema_sql(pg_dsn: str, empty_db: str) -> None:
    with psycopg.connect(empty_db, row_factory=dict_row) as conn:
        applied = schema.upgrade(conn)  # type: ignore[arg-type]
        assert applied == [name for _, name, _ in sql.migrations()]
        assert schema.current_version(conn) == sql.schema_version()  # type: ignore[arg-type]
    assert _catalog(empty_db) == _catalog(pg_dsn)


def test_init_is_idempotent_and_upgrade_is_noop(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        assert schema.init(conn) is False  # type: ignore[arg-type]
        assert schema.upgrade(conn) == []  # type: ignore[arg-type]


def test_ensure_refuses_empty_database_unless_asked(empty_db: str) -> None:
    with psycopg.connect(empty_db, row_factory=dict_row) as conn:
        with pytest.raises(SchemaError, match="no scalebox schema"):
            schema.ensure(conn, create=False)  # type: ignore[arg-type]
        conn.rollback()
        schema.ensure(conn, create=True)  # type: ignore[arg-type]
        assert schema.current_version(conn) == sql.schema_version()  # type: ignore[arg-type]


def test_ensure_refuses_newer_schema(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        conn.execute("INSERT INTO sbx_schema_version (version) VALUES (999)")
        with pytest.raises(SchemaError, match="newer"):
            schema.ensure(conn, create=False)  # type: ignore[arg-type]


def test_a_task_names_a_module_of_its_own_app_and_goes_with_it(pg_dsn: str) -> None:
    """A task's (app_id, module_id) is a module of that app: a foreign key in 0025, a statement
    trigger since 0026, which must refuse, lock and cascade as the key did."""
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        apps = [conn.execute("INSERT INTO sbx_apps (name, spec) VALUES (%s, '{}') RETURNING id", (n,)).fetchone()["id"]
                for n in ("a", "b")]
        mods = [conn.execute("INSERT INTO sbx_modules (app_id, name, seq, spec) VALUES (%s, 'm', 0, '{}') "
                             "RETURNING id", (a,)).fetchone()["id"] for a in apps]
        conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 'ok')", (apps[0], mods[0]))
        with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction():
            conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 'x')",
                         (apps[0], mods[1]))
        with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction():
            conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 'x')",
                         (apps[1] + 100, mods[0]))
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match=r"\(app_id, module_id\)=\(\d+, \d+\)"), \
                conn.transaction():  # one bad row of many: the statement is refused, nothing written
            conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) "
                         "SELECT %s, %s, 'y' || g FROM generate_series(1, 1000) g UNION ALL SELECT %s, %s, 'z'",
                         (apps[0], mods[0], apps[1], mods[0]))
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="keeps its app and module"), conn.transaction():
            conn.execute("UPDATE sbx_tasks SET module_id = %s, app_id = %s", (mods[1], apps[1]))
        conn.execute("UPDATE sbx_tasks SET module_id = module_id, status = -1")  # naming them is no move
        assert conn.execute("SELECT count(*) AS n FROM sbx_tasks").fetchone()["n"] == 1
        conn.execute("DELETE FROM sbx_apps WHERE id = %s", (apps[0],))
        assert conn.execute("SELECT count(*) AS n FROM sbx_tasks").fetchone()["n"] == 0


def test_a_module_deleted_while_tasks_go_in_takes_them_along(pg_dsn: str) -> None:
    """The module check locks the modules it names as a foreign key does: a delete of the app
    waits for the inserting transaction, then deletes what it wrote; an insert after the
    delete is refused."""
    with psycopg.connect(pg_dsn, row_factory=dict_row, autocommit=True) as conn:
        app = conn.execute("INSERT INTO sbx_apps (name, spec) VALUES ('a', '{}') RETURNING id").fetchone()["id"]
        mod = conn.execute("INSERT INTO sbx_modules (app_id, name, seq, spec) VALUES (%s, 'm', 0, '{}') "
                           "RETURNING id", (app,)).fetchone()["id"]
    with psycopg.connect(pg_dsn) as writer, psycopg.connect(pg_dsn, autocommit=True) as deleter:
        writer.execute("INSERT INTO sbx_tasks (app_id, module_id, body) SELECT %s, %s, 'b' || g "
                       "FROM generate_series(1, 10) g", (app, mod))
        done = threading.Event()
        deleting = threading.Thread(target=lambda: (deleter.execute("DELETE FROM sbx_apps WHERE id = %s", (app,)),
                                                    done.set()))
        deleting.start()
        assert not done.wait(1.0)  # waits for the writer's lock on the module
        writer.commit()
        deleting.join(30)
        assert done.is_set()
        assert writer.execute("SELECT count(*) FROM sbx_tasks WHERE app_id = %s", (app,)).fetchone() == (0,)
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            writer.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 'late')", (app, mod))


def _app_with_slot(conn: psycopg.Connection) -> tuple[int, int, int, int]:
    """An app, its module, a slot of it and a task of it: (app, module, slot, task)."""
    app = conn.execute("INSERT INTO sbx_apps (name, spec, status) VALUES ('a', '{}', 'RUNNING') "
                       "RETURNING id").fetchone()["id"]
    mod = conn.execute("INSERT INTO sbx_modules (app_id, name, seq, spec) VALUES (%s, 'm', 0, '{}') "
                       "RETURNING id", (app,)).fetchone()["id"]
    slot = conn.execute("INSERT INTO sbx_slots (module_id, host, seq) VALUES (%s, 'h', 0) RETURNING id",
                        (mod,)).fetchone()["id"]
    task = conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 't') RETURNING id",
                        (app, mod)).fetchone()["id"]
    return app, mod, slot, task


_EXEC = ("INSERT INTO sbx_task_execs (task_id, attempt, slot_id, status, started_at, finished_at) "
         "SELECT x, 1, %s, 0, now(), now() FROM unnest(%s::bigint[]) AS x")


def test_an_execution_is_of_an_existing_task_and_goes_with_it(pg_dsn: str) -> None:
    """sbx_task_execs' keys on its task and slot (foreign keys until 0027, statement triggers
    since): an execution of no task is refused (one bad row refuses the statement), a deleted
    task takes its executions along, a deleted slot is forgotten by tasks and executions."""
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        app, mod, slot, task = _app_with_slot(conn)
        conn.execute(_EXEC, (slot, [task, task]))
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="does not exist") as err, conn.transaction():
            conn.execute(_EXEC, (slot, [task] * 500 + [task + 1000]))
        assert f"(task_id)=({task + 1000})" in str(err.value.diag.message_detail)
        assert conn.execute("SELECT count(*) AS n FROM sbx_task_execs").fetchone()["n"] == 2
        conn.execute("UPDATE sbx_tasks SET slot_id = %s WHERE id = %s", (slot, task))
        conn.execute("DELETE FROM sbx_slots WHERE id = %s", (slot,))
        assert conn.execute("SELECT slot_id FROM sbx_tasks WHERE id = %s", (task,)).fetchone()["slot_id"] is None
        assert {r["slot_id"] for r in conn.execute("SELECT slot_id FROM sbx_task_execs").fetchall()} == {None}
        conn.execute("DELETE FROM sbx_tasks WHERE id = %s", (task,))
        assert conn.execute("SELECT count(*) AS n FROM sbx_task_execs").fetchone()["n"] == 0
        # and with the app: module → tasks → executions
        task2 = conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 'u') RETURNING id",
                             (app, mod)).fetchone()["id"]
        conn.execute(_EXEC, (None, [task2]))
        conn.execute("DELETE FROM sbx_apps WHERE id = %s", (app,))
        assert conn.execute("SELECT count(*) AS n FROM sbx_task_execs").fetchone()["n"] == 0


def test_a_task_deleted_while_its_execution_goes_in_takes_it_along(pg_dsn: str) -> None:
    """The execution check locks its tasks as a key does: a delete of the task waits for the
    recording transaction, then deletes the execution it wrote; an execution after is refused."""
    with psycopg.connect(pg_dsn, row_factory=dict_row, autocommit=True) as conn:
        _, _, slot, task = _app_with_slot(conn)
    with psycopg.connect(pg_dsn) as writer, psycopg.connect(pg_dsn, autocommit=True) as deleter:
        writer.execute(_EXEC, (slot, [task]))
        done = threading.Event()
        deleting = threading.Thread(target=lambda: (deleter.execute("DELETE FROM sbx_tasks WHERE id = %s", (task,)),
                                                    done.set()))
        deleting.start()
        assert not done.wait(1.0)  # waits for the writer's lock on the task
        writer.commit()
        deleting.join(30)
        assert done.is_set()
        assert writer.execute("SELECT count(*) FROM sbx_task_execs WHERE task_id = %s", (task,)).fetchone() == (0,)
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            writer.execute(_EXEC, (slot, [task]))


def test_a_claim_by_a_slot_that_does_not_exist_is_refused(pg_dsn: str) -> None:
    """The claim checks its slots once (0027; the key on sbx_tasks.slot_id checked each task):
    a claim that would take a task for a slot that does not exist is refused and takes nothing
    (one that finds nothing has nothing to check, as with the key: the conformance suite)."""
    with psycopg.connect(pg_dsn, row_factory=dict_row, autocommit=True) as conn:
        app, mod, slot, task = _app_with_slot(conn)
        claim = "SELECT id FROM sbx_l_claim_v1(%s, %s, 'h', %s, %s, %s, 10, 60)"
        other = conn.execute("INSERT INTO sbx_modules (app_id, name, seq, spec) VALUES (%s, 'n', 1, '{}') "
                             "RETURNING id", (app,)).fetchone()["id"]
        assert conn.execute(claim, (app, other, [slot + 1000], [0], [1])).fetchall() == []  # nothing to take
        for slots in ([slot + 1000], [slot, slot + 1000]):
            with pytest.raises(psycopg.errors.ForeignKeyViolation, match="does not exist"):
                conn.execute(claim, (app, mod, slots, [0] * len(slots), [1] * len(slots)))
        assert conn.execute("SELECT status, slot_id FROM sbx_tasks WHERE id = %s", (task,)).fetchone() == \
            {"status": -1, "slot_id": None}
        assert conn.execute(claim, (app, mod, [slot], [0], [1])).fetchall() == [{"id": task}]
        assert conn.execute("SELECT slot_id FROM sbx_tasks WHERE id = %s", (task,)).fetchone()["slot_id"] == slot
