"""The queue through a real PgBouncer in transaction mode: claim, complete, heartbeat, recover,
semaphores and the statement timeout, with clients forced onto other server connections."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import PooledConnection, connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.models import Message, TaskResult
from scalebox_hpc.pipeline import load_pipeline
from tests.helpers import write_app
from tests.pgbouncer.conftest import Bouncer, Shuffler

pytestmark = [pytest.mark.pg, pytest.mark.pgbouncer]

PIPE = """
name: pgb
modules:
  a:
    sink_modules: [b]
  b: {}
  g:
    arguments: {semaphore: tokens}
"""
SCRIPTS = {f"{m}/run.sh": "true\n" for m in "abg"}
WORKERS = 6
TASKS = 240


def _app(bouncer: Bouncer, tmp_path: Path) -> int:
    spec = load_pipeline(write_app(tmp_path / "app", PIPE, SCRIPTS))
    with connect(bouncer.dsn) as conn:
        app_id = apps.create_app(conn, spec)
        conn.commit()
    return app_id


def _result(messages: list[Message] | None = None) -> TaskResult:
    now = datetime.now(UTC)
    return TaskResult(status=0, started_at=now, finished_at=now, stdout="ok", messages=messages or [])


def _direct_rows(bouncer: Bouncer, sql: str, *params: Any) -> list[dict[str, Any]]:
    with connect(bouncer.direct, pooler=False) as conn:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]


def test_queue_connections_are_pooled_ones(bouncer: Bouncer) -> None:
    q = PgQueue(bouncer.dsn, statement_timeout=7)
    assert isinstance(q.conn, PooledConnection) and q.conn.prepare_threshold is None
    assert q.conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "7s"}
    q.close()


def test_concurrent_workers_claim_complete_and_heartbeat_every_task_exactly_once(
    bouncer: Bouncer, tmp_path: Path,
) -> None:
    """WORKERS clients, each with its own PgQueue, share PgBouncer's server connections: every
    task is done once, every hand-off lands once, and nothing fails on a server connection
    another client prepared or SET something on."""
    app_id = _app(bouncer, tmp_path)
    with connect(bouncer.dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(TASKS)])
        conn.commit()
    errors: list[str] = []
    done: list[int] = []
    backends: list[set[int]] = [set() for _ in range(WORKERS)]
    start = threading.Barrier(WORKERS)

    def work(n: int) -> None:
        q = PgQueue(bouncer.dsn)
        try:
            refs = q.modules(app_id)
            slot = q.create_slot(refs["a"].id, host=f"h{n}", seq=n, pid=n, work_dir="/tmp")
            start.wait()
            while True:
                tasks = q.claim(app_id, refs["a"].id, host=f"h{n}", slot_id=slot, slot_seq=n, limit=1 + n % 3)
                if not tasks:
                    break
                q.heartbeat(slot, status="RUNNING", lease_seconds=30, task_ids=[t.id for t in tasks])
                backends[n].add(int(q.conn.execute("SELECT pg_backend_pid() AS p").fetchone()["p"]))  # type: ignore[index]
                for t in tasks:
                    q.complete(t, _result([Message(f"from-{t.body}")]), slot_id=slot, host=f"h{n}",
                               sender=refs["a"], modules=refs)
                    done.append(t.id)
            q.set_slot_status(slot, "EXITED")
        except Exception as exc:  # every error fails the test below, with its type
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            q.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(done) == len(set(done)) == TASKS
    counts = {(r["module"], r["status"]): r["n"] for r in _direct_rows(bouncer, """
        SELECT m.name AS module, t.status, count(*) AS n FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id
        GROUP BY 1, 2""")}
    assert counts == {("a", 0): TASKS, ("b", -1): TASKS}
    [execs] = _direct_rows(bouncer, "SELECT count(*) AS n, count(DISTINCT task_id) AS tasks FROM sbx_task_execs")
    assert execs == {"n": TASKS, "tasks": TASKS}
    assert len(set().union(*backends)) >= 2  # the clients did share the server connections


def test_a_client_moved_between_server_connections_keeps_working(bouncer: Bouncer, tmp_path: Path) -> None:
    """Every queue call runs on another server connection than the one before (every other
    call three clients pin the server connections on top of PgBouncer's last-in first-out
    idle list, the one just used among them): claim, heartbeat, complete and recover still do
    their work (well past psycopg's 5 runs before it would prepare a statement)."""
    app_id = _app(bouncer, tmp_path)
    with connect(bouncer.dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(8)])
        conn.commit()
    q = PgQueue(bouncer.dsn, statement_timeout=30)
    shuffler = Shuffler(bouncer.dsn)
    pids: list[int] = []  # the server connection of each call (asked right after it, on the same one)

    def moved(call: Any) -> Any:
        # pinned: the call gets a server connection below the three on top (the last one used
        # is on top); unpinned: it gets the top one, a shuffler's, not the one it had before
        pinned = len(pids) % 2 == 1
        if pinned:
            shuffler.pin()
        try:
            out = call()
            pids.append(int(q.conn.execute("SELECT pg_backend_pid() AS p").fetchone()["p"]))  # type: ignore[index]
            return out
        finally:
            if pinned:
                shuffler.release()

    try:
        refs = q.modules(app_id)
        slot = q.create_slot(refs["a"].id, host="h1", seq=0, pid=1, work_dir="/tmp")
        for _ in range(8):
            [task] = moved(lambda: q.claim(app_id, refs["a"].id, host="h1", slot_id=slot, slot_seq=0))
            moved(lambda: q.heartbeat(slot, status="RUNNING", lease_seconds=30))
            assert moved(lambda: q.conn.execute("SHOW statement_timeout").fetchone()) == {"statement_timeout": "30s"}
            moved(lambda t=task: q.complete(t, _result(), slot_id=slot, host="h1", sender=refs["a"], modules=refs))
        # recovery: a lease that expired is given back
        with connect(bouncer.dsn) as conn:
            apps.add_tasks(conn, app_id, "a", [Message("late")])
            conn.commit()
        [late] = moved(lambda: q.claim(app_id, refs["a"].id, host="h1", slot_id=slot, slot_seq=0))
        _direct_rows(bouncer, "UPDATE sbx_tasks SET lease_expires_at = now() - interval '1 minute' "
                              "WHERE id = %s RETURNING id", late.id)
        # and its slot's (0033: the slot's beats renew the lease of every task it holds)
        _direct_rows(bouncer, "UPDATE sbx_slots SET lease_expires_at = now() - interval '1 minute' "
                              "WHERE id = %s RETURNING id", slot)
        assert moved(q.recover_expired) == [(late.id, -1)]
    finally:
        shuffler.close()
        q.close()
    assert all(a != b for a, b in itertools.pairwise(pids))  # moved every time
    statuses = {r["body"]: r["status"] for r in _direct_rows(bouncer, "SELECT body, status FROM sbx_tasks")}
    assert statuses == {**{f"t{i}": 0 for i in range(8)}, "late": -1}


def test_the_semaphore_gates_concurrent_claims_through_the_pooler(bouncer: Bouncer, tmp_path: Path) -> None:
    """The semaphore's take and the claim share one transaction (one server connection): with 3
    units and WORKERS clients racing for 20 tasks, exactly 3 are claimed and the value is 0."""
    app_id = _app(bouncer, tmp_path)
    with connect(bouncer.dsn) as conn:
        apps.add_tasks(conn, app_id, "g", [Message(f"g{i}") for i in range(20)])
        apps.semaphore_create(conn, app_id, "tokens", 3)
        conn.commit()
    claimed: list[int] = []
    errors: list[str] = []
    start = threading.Barrier(WORKERS)

    def work(n: int) -> None:
        q = PgQueue(bouncer.dsn)
        try:
            refs = q.modules(app_id)
            slot = q.create_slot(refs["g"].id, host=f"h{n}", seq=n, pid=n, work_dir="/tmp")
            start.wait()
            for _ in range(5):
                tasks = q.claim(app_id, refs["g"].id, host=f"h{n}", slot_id=slot, slot_seq=n, semaphore="tokens")
                claimed.extend(t.id for t in tasks)
        except Exception as exc:  # fails the test below
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            q.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(claimed) == len(set(claimed)) == 3
    with connect(bouncer.dsn) as conn:
        assert apps.semaphore_get(conn, app_id, "tokens") == 0


@pytest.mark.parametrize("semaphore", [None, "tokens"], ids=["autocommit-statement", "explicit-transaction"])
def test_the_statement_timeout_is_enforced_through_the_pooler(
    bouncer: Bouncer, tmp_path: Path, semaphore: str | None,
) -> None:
    """A claim stuck behind a lock is cancelled after the queue's statement timeout, both as
    one autocommit statement and inside the semaphore's explicit transaction; the timeout is
    SET LOCAL, so it does not leak to the server connections other clients get next."""
    app_id = _app(bouncer, tmp_path)
    module = "g" if semaphore else "a"
    with connect(bouncer.dsn) as conn:
        apps.add_tasks(conn, app_id, module, [Message("x")])
        apps.semaphore_create(conn, app_id, "tokens", 5)
        conn.commit()
    q = PgQueue(bouncer.dsn, statement_timeout=0.5)
    refs = q.modules(app_id)
    slot = q.create_slot(refs[module].id, host="h1", seq=0, pid=1, work_dir="/tmp")
    with psycopg.connect(bouncer.direct) as locker:
        locker.execute("LOCK TABLE sbx_tasks, sbx_semaphores IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(DatabaseError, match="statement timeout") as info:
            q.claim(app_id, refs[module].id, host="h1", slot_id=slot, slot_seq=0, semaphore=semaphore)
        assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled)
        locker.rollback()
    [task] = q.claim(app_id, refs[module].id, host="h1", slot_id=slot, slot_seq=0, semaphore=semaphore)
    assert task.body == "x"
    q.close()
    shuffler = Shuffler(bouncer.dsn)  # four server connections at least, none with our 500 ms
    try:
        shuffler.pin()
        seen = {str(o.execute("SHOW statement_timeout").fetchone()[0]) for o in shuffler.others}  # type: ignore[index]
    finally:
        shuffler.release()
        shuffler.close()
    assert "500ms" not in seen
