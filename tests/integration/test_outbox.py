"""One database per cluster (issue 15): the outbox, against two real PostgreSQL servers.

Database 1 is a fresh database of SCALEBOX_TEST_DSN's server, database 2 one of
SCALEBOX_TEST_DSN2's (launchers/testbed/postgres2.sh), so "the remote is down" can be the real
server stopped. No mocks: every delivery goes through libpq to the other server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from scalebox_hpc.db import apps, outbox, schema
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import PgQueue, insert_messages
from scalebox_hpc.db.sql import query
from scalebox_hpc.models import Message, TaskResult
from scalebox_hpc.pipeline import load_pipeline
from tests.components import need, pg2_available, pg2_dsn
from tests.conftest import REPO, _with_db
from tests.helpers import write_app
from tests.integration.test_launcher_role import Site, site  # noqa: F401 (a fixture)

pytestmark = pytest.mark.pg

PG2 = REPO / "launchers" / "testbed" / "postgres2.sh"


@pytest.fixture
def db2() -> Iterator[str]:
    """A fresh database with the schema on the second server (cluster 2's database)."""
    reason = pg2_available()
    if reason is not None:
        need("postgres2", reason)
    server = str(pg2_dsn())
    name = f"sbx_t2_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _with_db(server, name)
    with connect(dsn) as conn:
        schema.init(conn)
        conn.commit()
    yield dsn
    _start_pg2()  # a test that stopped it must not leave it down
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _start_pg2() -> None:
    subprocess.run(["bash", str(PG2), "start"], check=True, capture_output=True, timeout=120)


RECV = """
name: part2
modules:
  recv:
    arguments:
      conflict_action: FAIL
"""

SEND = """
name: part1
parameters:
  start_task: s0
modules:
  send:
    sink_modules: [recv, local]
    environments:
      - REMOTE_SERVER={server}
      - APP_ID={app_id}
  local: {{}}
"""


def _parts(db1: str, db2: str, tmp_path: Path) -> tuple[int, int]:
    """App 2 (module recv) in db2, app 1 (send -> recv remote, send -> local) in db1."""
    spec2 = load_pipeline(write_app(tmp_path / "p2", RECV, {"recv/run.sh": "true\n"}))
    with connect(db2) as conn:
        app2 = apps.create_app(conn, spec2)
    text = SEND.format(server=db2, app_id=app2)
    spec1 = load_pipeline(write_app(tmp_path / "p1", text, {"send/run.sh": "true\n", "local/run.sh": "true\n"}))
    with connect(db1) as conn:
        app1 = apps.create_app(conn, spec1)
    return app1, app2


def _result(messages: list[Message], finish: str | None = None) -> TaskResult:
    now = datetime.now(UTC)
    return TaskResult(status=0, started_at=now, finished_at=now, messages=messages, finish_text=finish)


def _queue_outbox(db1: str, app1: int, n: int, module: str = "recv") -> None:
    """n messages to the remote sink, written as a hand-off writes them (no background relay)."""
    with connect(db1) as conn, conn.transaction():
        refs = outbox.remote_refs(conn, app1)
        insert_messages(conn, app1, [(refs[module], Message(f"m{i:05d}", {"i": i})) for i in range(n)])


def _remote_tasks(db2: str, app2: int) -> list[str]:
    with connect(db2) as conn:
        rows = conn.execute("SELECT body FROM sbx_tasks WHERE app_id = %s ORDER BY id", (app2,)).fetchall()
    return [r["body"] for r in rows]


def _outbox(db1: str) -> list[dict[str, Any]]:
    with connect(db1) as conn:
        return [dict(r) for r in conn.execute("SELECT * FROM sbx_outbox ORDER BY id").fetchall()]


def _keys(db2: str) -> int:
    with connect(db2) as conn:
        row = conn.execute("SELECT count(*) AS n FROM sbx_inbox").fetchone()
    return int(row["n"]) if row else 0


def test_remote_message_is_written_to_the_outbox_by_the_hand_off(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    q = PgQueue(pg_dsn)
    refs = q.modules(app1)
    assert refs["recv"].remote == db2 and refs["recv"].remote_app_id == app2
    slot = q.create_slot(refs["send"].id, host="h1", seq=0, pid=1, work_dir="/tmp")
    [task] = q.claim(app1, refs["send"].id, host="h1", slot_id=slot, slot_seq=0)
    written = q.complete(task, _result([Message("a"), Message("b", module="local"), Message("c")]),
                         slot_id=slot, host="h1", sender=refs["send"], modules=refs)
    assert written == 3
    rows = _outbox(pg_dsn)
    assert [(r["module"], r["body"], r["from_task_id"], r["remote_app_id"]) for r in rows] == [
        ("recv", "a", task.id, app2), ("recv", "c", task.id, app2)]
    with connect(pg_dsn) as conn:
        local = conn.execute("SELECT body FROM sbx_tasks WHERE module_id = %s", (refs["local"].id,)).fetchall()
    assert [r["body"] for r in local] == ["b"]


def test_an_aborted_hand_off_leaves_no_outbox_row(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, _ = _parts(pg_dsn, db2, tmp_path)
    q = PgQueue(pg_dsn)
    refs = q.modules(app1)
    slot = q.create_slot(refs["send"].id, host="h1", seq=0, pid=1, work_dir="/tmp")
    [task] = q.claim(app1, refs["send"].id, host="h1", slot_id=slot, slot_seq=0)
    # the same body twice to a FAIL module: the database refuses the hand-off, all of it
    messages = [Message("to-remote"), Message("dup", module="local"), Message("dup", module="local")]
    n = q.complete(task, _result(messages), slot_id=slot, host="h1", sender=refs["send"], modules=refs)
    assert n == 0
    assert _outbox(pg_dsn) == []
    with connect(pg_dsn) as conn:
        assert apps.get_task(conn, task.id)["status"] == -102  # EMIT_FAILED, recorded without its messages
    # and a hand-off rolled back by its caller takes its outbox rows with it
    with connect(pg_dsn) as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            insert_messages(conn, app1, [(refs["recv"], Message("x"))])
            raise RuntimeError("abort")
        assert conn.execute("SELECT count(*) AS n FROM sbx_outbox").fetchone()["n"] == 0  # type: ignore[index]


def test_delivery_is_exactly_once_and_in_order(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    _queue_outbox(pg_dsn, app1, 250)
    done = outbox.relay(pg_dsn, limit=100)
    assert [(d.sent, d.received, d.error) for d in done] == [(250, 250, None)]
    assert _remote_tasks(db2, app2) == [f"m{i:05d}" for i in range(250)]
    assert outbox.relay(pg_dsn, force=True) == []  # nothing pending: nothing to do
    # Each batch told the receiver the sender's lowest pending id: the keys of the first two
    # batches are forgotten; the last batch's stay (it was pending while it was delivered).
    assert _keys(db2) == 50
    with connect(pg_dsn) as conn:  # that batch tried again (as after a crash before its mark): skipped
        conn.execute("UPDATE sbx_outbox SET delivered_at = NULL WHERE id > (SELECT min(id) + 199 FROM sbx_outbox)")
    again = outbox.relay(pg_dsn, force=True)
    assert [(d.sent, d.received) for d in again] == [(50, 0)]
    assert len(_remote_tasks(db2, app2)) == 250 and _keys(db2) == 50
    with connect(db2) as conn:
        headers = conn.execute("SELECT headers FROM sbx_tasks WHERE body = 'm00007'").fetchone()
    assert headers is not None and headers["headers"]["i"] == 7


def test_delivered_rows_older_than_an_hour_go_with_the_next_delivery(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, _ = _parts(pg_dsn, db2, tmp_path)
    _queue_outbox(pg_dsn, app1, 30)
    assert [d.sent for d in outbox.relay(pg_dsn)] == [30]
    with connect(pg_dsn) as conn:  # 20 of them were delivered two hours ago, 10 just now
        conn.execute("UPDATE sbx_outbox SET delivered_at = now() - interval '2 hours' WHERE id IN "
                     "(SELECT id FROM sbx_outbox ORDER BY id LIMIT 20)")
        conn.execute("INSERT INTO sbx_outbox (app_id, remote, remote_app_id, module, body, created_at) "
                     "VALUES (%s, 'postgresql://127.0.0.1:1/closed', 1, 'recv', 'late', now() - interval '3 hours')",
                     (app1,))
    _queue_outbox(pg_dsn, app1, 5)
    assert sorted((d.sent, d.error is None) for d in outbox.relay(pg_dsn)) == [(0, False), (5, True)]
    left = _outbox(pg_dsn)
    assert len(left) == 16  # the 10 recent and the 5 new delivered rows, and the pending one
    assert [r["body"] for r in left if r["delivered_at"] is None] == ["late"]  # pending: never purged
    # the 5 new rows were received (new keys), the first 30's keys forgotten: all are below the
    # sender's lowest pending id (the late row's), so none of them is ever sent again
    assert _keys(db2) == 5


def test_killed_between_remote_commit_and_local_mark_delivers_once(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    _queue_outbox(pg_dsn, app1, 40)
    env = {**os.environ, outbox.FAULT_ENV: "exit-after-remote-commit"}
    code = "import sys; from scalebox_hpc.db import outbox; outbox.relay(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, pg_dsn], env=env, cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 70, proc.stderr
    assert len(_remote_tasks(db2, app2)) == 40  # the remote committed ...
    assert all(r["delivered_at"] is None for r in _outbox(pg_dsn))  # ... the local mark did not
    done = outbox.relay(pg_dsn)
    assert [(d.sent, d.received) for d in done] == [(40, 0)]
    assert _remote_tasks(db2, app2) == [f"m{i:05d}" for i in range(40)] and _keys(db2) == 40
    assert all(r["delivered_at"] is not None for r in _outbox(pg_dsn))


def test_remote_down_only_delays(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    _queue_outbox(pg_dsn, app1, 30)
    first = outbox.relay(pg_dsn, limit=10)
    assert [(d.sent, d.error) for d in first] == [(30, None)]
    with connect(pg_dsn) as conn, conn.transaction():
        refs = outbox.remote_refs(conn, app1)
        insert_messages(conn, app1, [(refs["recv"], Message(f"late{i}")) for i in range(20)])
    subprocess.run(["bash", str(PG2), "stop"], check=True, capture_output=True, timeout=120)
    try:
        down = outbox.relay(pg_dsn)
        assert len(down) == 1 and down[0].sent == 0 and down[0].error is not None
        pending = [r for r in _outbox(pg_dsn) if r["delivered_at"] is None]
        assert len(pending) == 20 and all(r["attempts"] == 1 and r["last_error"] for r in pending)
        assert outbox.relay(pg_dsn) == []  # in its backoff: not tried again yet
        with connect(pg_dsn) as conn:
            [depth] = outbox.outbox_depth(conn, app1)
        assert depth["depth"] == 20 and depth["last_error"]
    finally:
        _start_pg2()
    up = outbox.relay(pg_dsn, force=True)
    assert [(d.sent, d.received, d.error) for d in up] == [(20, 20, None)]
    bodies = _remote_tasks(db2, app2)
    assert len(bodies) == 50 and len(set(bodies)) == 50 and bodies[30:] == [f"late{i}" for i in range(20)]


def test_a_second_relay_skips_a_remote_being_delivered(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, _ = _parts(pg_dsn, db2, tmp_path)
    _queue_outbox(pg_dsn, app1, 5)
    with connect(pg_dsn) as holder, holder.transaction():
        assert holder.execute(query("outbox_lock"), {"remote": db2}).fetchone()["locked"]  # type: ignore[index]
        busy = outbox.relay(pg_dsn)
        assert [(d.busy, d.sent) for d in busy] == [(True, 0)]
    assert [(d.busy, d.sent) for d in outbox.relay(pg_dsn)] == [(False, 5)]


def test_two_relays_at_once_deliver_each_message_once(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    _queue_outbox(pg_dsn, app1, 600)
    results: list[list[outbox.Delivery]] = []
    start = threading.Barrier(3)

    def run() -> None:
        start.wait()
        mine: list[outbox.Delivery] = []
        for _ in range(20):
            mine += outbox.relay(pg_dsn, limit=50, force=True)
        results.append(mine)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    last = outbox.relay(pg_dsn, force=True)  # whatever the busy skips left
    bodies = _remote_tasks(db2, app2)
    assert len(bodies) == 600 and len(set(bodies)) == 600
    # each message received (a new key inserted) exactly once: keys are forgotten only below
    # the sender's lowest pending id, so a duplicate would have been received again
    assert sum(d.received for r in [*results, last] for d in r) == 600
    assert _keys(db2) == 50  # the last batch's: every row below it was marked delivered
    assert all(r["delivered_at"] is not None for r in _outbox(pg_dsn))


def test_a_missing_remote_module_waits_with_its_error(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    with connect(pg_dsn) as conn, conn.transaction():
        conn.execute("UPDATE sbx_remote_sinks SET name = 'nosuch'")
        refs = outbox.remote_refs(conn, app1)
        insert_messages(conn, app1, [(refs["nosuch"], Message("x"))])
    [d] = outbox.relay(pg_dsn)
    assert d.sent == 0 and d.error is not None and "no module 'nosuch'" in d.error
    assert _remote_tasks(db2, app2) == [] and _keys(db2) == 0


def test_set_finished_is_forwarded_and_applied_once_the_remote_queue_drains(
        pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    _queue_outbox(pg_dsn, app1, 1)
    with connect(pg_dsn) as conn:
        apps.finish_app(conn, app1, "Result is 1229")
    assert [r["kind"] for r in _outbox(pg_dsn)] == ["message", "finish"]
    [d] = outbox.relay(pg_dsn)
    assert d.sent == 1 and d.waiting  # m00000 is READY there: the finish waits
    with connect(db2) as conn:
        assert apps.get_app(conn, app2)["status"] == "RUNNING"
        conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s", (app2,))
        conn.commit()
    [d] = outbox.relay(pg_dsn, force=True)
    assert (d.sent, d.waiting) == (1, False)
    with connect(db2) as conn:
        row = apps.get_app(conn, app2)
    assert (row["status"], row["result"]) == ("FINISHED", "Result is 1229")
    assert all(r["delivered_at"] is not None for r in _outbox(pg_dsn))


def _cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def _env(dsn: str, tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_"))}
    env.update({"SCALEBOX_DSN": dsn, "SCALEBOX_HOME": str(tmp_path / f"home-{name}"),
                "SCALEBOX_WORK_ROOT": str(tmp_path / f"work-{name}"), **extra})
    return env


def test_get_next_id_peeks_without_taking(pg_dsn: str, tmp_path: Path) -> None:
    env = _env(pg_dsn, tmp_path, "1")
    first, second = _cli(env, "app", "get-next-id"), _cli(env, "app", "get-next-id", "--json")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "1" and '"next_id": 1' in second.stdout
    app = write_app(tmp_path / "a", "name: a\nmodules:\n  m: {}\n", {"m/run.sh": "true\n"})
    created = _cli(env, "app", "create", "--json", str(app))
    assert '"app_id": 1' in created.stdout, created.stderr
    assert _cli(env, "app", "get-next-id").stdout.strip() == "2"


def test_status_shows_the_remote_part_and_its_outbox(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    _queue_outbox(pg_dsn, app1, 3)
    with connect(pg_dsn) as conn:  # as after a failed delivery: in its backoff, status does not deliver it
        conn.execute("UPDATE sbx_outbox SET next_try_at = now() + interval '1 hour', last_error = 'down'")
    env = _env(pg_dsn, tmp_path, "1")
    text = _cli(env, "status", "--app", str(app1))
    assert text.returncode == 0, text.stderr
    assert f"remote part: app {app2} at " in text.stdout and "(recv): outbox 3 waiting" in text.stdout
    assert "last error: down" in text.stdout
    js = _cli(env, "status", "--app", str(app1), "--json")
    assert '"remote_parts"' in js.stdout and '"depth": 3' in js.stdout
    metrics = _cli(env, "metrics", "--app", str(app1))
    assert f'scalebox_outbox_depth{{app="{app1}",remote_app="{app2}"}} 3' in metrics.stdout, metrics.stdout
    with connect(pg_dsn) as conn:  # due again: status delivers (a fallback deliverer)
        conn.execute("UPDATE sbx_outbox SET next_try_at = NULL")
    after = _cli(env, "status", "--app", str(app1))
    assert "(recv): outbox nothing waiting" in after.stdout, after.stdout
    assert len(_remote_tasks(db2, app2)) == 3


def test_cross_cluster_primes_two_databases_2023_form(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    """examples/cross-cluster-primes: calc in database 2's app, scatter and gather in database
    1's, each side run by its own `scalebox run` (no Slurm), ids from `app get-next-id`."""
    example = REPO / "examples" / "cross-cluster-primes"
    env1, env2 = _env(pg_dsn, tmp_path, "1"), _env(db2, tmp_path, "2")
    app1 = _cli(env1, "app", "get-next-id").stdout.strip()
    app2 = _cli(env2, "app", "get-next-id").stdout.strip()
    made2 = _cli({**env2, "CLUSTER1_SERVER": pg_dsn, "APP1_ID": app1}, "app", "create",
                 str(example / "cluster2/app.yaml"))
    assert made2.returncode == 0, made2.stderr
    made1 = _cli({**env1, "CLUSTER2_SERVER": db2, "APP2_ID": app2}, "app", "create",
                 str(example / "cluster1/app.yaml"))
    assert made1.returncode == 0, made1.stderr
    run2 = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "run", "--app", app2, "--quiet", "--timeout", "240"],
                            env=env2, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        run1 = _cli(env1, "run", "--app", app1, "--quiet", "--timeout", "240", timeout=300)
        assert run1.returncode == 0, run1.stderr
        assert "Result is 1229" in run1.stdout
        _, err2 = run2.communicate(timeout=120)
        assert run2.returncode == 0, err2
    finally:
        if run2.poll() is None:
            run2.kill()
            run2.wait()
    with connect(db2) as conn:
        row = apps.get_app(conn, int(app2))
        calc = conn.execute("SELECT count(*) AS n, count(DISTINCT body) AS d, bool_and(status = 0) AS ok "
                            "FROM sbx_tasks WHERE app_id = %s", (int(app2),)).fetchone()
    assert (row["status"], row["result"]) == ("FINISHED", "Result is 1229")
    assert calc is not None and (calc["n"], calc["d"], calc["ok"]) == (10, 10, True)
    with connect(pg_dsn) as conn:
        gather = conn.execute("SELECT count(*) AS n, count(DISTINCT t.body) AS d FROM sbx_tasks t "
                              "JOIN sbx_modules m ON m.id = t.module_id WHERE m.name = 'gather'").fetchone()
        left = outbox.outbox_depth(conn, int(app1))
    assert gather is not None and (gather["n"], gather["d"]) == (10, 10)
    assert left == []


def test_cli_set_finished_forwards_to_the_remote_part(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    done = _cli(_env(pg_dsn, tmp_path, "1"), "app", "set-finished", "--app", str(app1), "all done")
    assert done.returncode == 0, done.stderr
    with connect(db2) as conn:  # app 2 has nothing READY: the finish applies at once, delivered by the command
        row = apps.get_app(conn, app2)
    assert (row["status"], row["result"]) == ("FINISHED", "all done")
    assert [(r["kind"], r["delivered_at"] is not None) for r in _outbox(pg_dsn)] == [("finish", True)]


def test_relay_command_once_reports_and_exits_1_when_a_remote_is_unreachable(
        pg_dsn: str, db2: str, tmp_path: Path) -> None:
    app1, app2 = _parts(pg_dsn, db2, tmp_path)
    _queue_outbox(pg_dsn, app1, 4)
    env = _env(pg_dsn, tmp_path, "1")
    ok = _cli(env, "relay", "--once", "--json")
    assert ok.returncode == 0, ok.stderr
    assert '"sent": 4' in ok.stdout and '"received": 4' in ok.stdout
    with connect(pg_dsn) as conn, conn.transaction():  # a remote nobody listens at
        conn.execute("UPDATE sbx_remote_sinks SET remote = 'host=127.0.0.1 port=1'")
        refs = outbox.remote_refs(conn, app1)
        insert_messages(conn, app1, [(refs["recv"], Message("lost?"))])
    down = _cli(env, "relay", "--once")
    assert down.returncode == 1, down.stdout + down.stderr
    assert "postgresql://127.0.0.1:1/: 0 delivered (0 new there): cannot reach PostgreSQL" in down.stdout
    assert len(_remote_tasks(db2, app2)) == 4
    assert [r["attempts"] for r in _outbox(pg_dsn) if r["delivered_at"] is None] == [1]


NATIVE = """
name: part1
remotes:
  cluster2: {{dsn: "{server}", app_id: {app_id}}}
modules:
  send:
    sink_modules: [recv]
    remote: cluster2
"""


def test_the_native_form_delivers_like_the_2023_form(pg_dsn: str, db2: str, tmp_path: Path) -> None:
    spec2 = load_pipeline(write_app(tmp_path / "p2", RECV, {"recv/run.sh": "true\n"}))
    with connect(db2) as conn:
        app2 = apps.create_app(conn, spec2)
    spec1 = load_pipeline(write_app(tmp_path / "p1", NATIVE.format(server=db2, app_id=app2), {"send/run.sh": "true\n"}))
    with connect(pg_dsn) as conn:
        app1 = apps.create_app(conn, spec1)
    _queue_outbox(pg_dsn, app1, 3)
    assert [(d.sent, d.received) for d in outbox.relay(pg_dsn)] == [(3, 3)]
    assert _remote_tasks(db2, app2) == ["m00000", "m00001", "m00002"]


FANOUT = """
name: part1
parameters:
  start_task: s0
modules:
  send:
    sink_modules: [recv]
    environments:
      - REMOTE_SERVER={server}
      - APP_ID={app_id}
    arguments: {{max_idle_polls: 2, sleep_interval_seconds: 0.2}}
"""


def test_a_launcher_killed_between_its_commit_and_the_delivery_loses_and_doubles_nothing(
        pg_dsn: str, db2: str, tmp_path: Path) -> None:
    """The sender's launcher commits a hand-off that emits 25 messages to a remote sink and dies
    before its background relay delivers them (fault point exit-before-delivery): the messages
    wait in its outbox, `scalebox relay --once` from another process delivers each exactly once,
    and a second relay adds nothing."""
    spec2 = load_pipeline(write_app(tmp_path / "p2", RECV, {"recv/run.sh": "true\n"}))
    with connect(db2) as conn:
        app2 = apps.create_app(conn, spec2)
    script = 'for i in $(seq 1 25); do scalebox task add -m recv -- "r$i"; done\n'
    spec1 = load_pipeline(write_app(tmp_path / "p1", FANOUT.format(server=db2, app_id=app2), {"send/run.sh": script}))
    with connect(pg_dsn) as conn:
        app1 = apps.create_app(conn, spec1)
    env = _env(pg_dsn, tmp_path, "1")
    died = _cli({**env, outbox.FAULT_ENV: "exit-before-delivery"}, "launcher", "--app", str(app1), timeout=120)
    assert died.returncode == 70, (died.stdout, died.stderr)
    with connect(pg_dsn) as conn:
        sent = conn.execute("SELECT status FROM sbx_tasks WHERE app_id = %s", (app1,)).fetchall()
    assert [r["status"] for r in sent] == [0]  # the hand-off committed ...
    pending = [r for r in _outbox(pg_dsn) if r["delivered_at"] is None]
    assert sorted(r["body"] for r in pending) == sorted(f"r{i}" for i in range(1, 26))
    assert _remote_tasks(db2, app2) == []  # ... and nothing was delivered
    relayed = _cli(env, "relay", "--once")
    assert relayed.returncode == 0, relayed.stdout + relayed.stderr
    again = _cli(env, "relay", "--once")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _remote_tasks(db2, app2) == [f"r{i}" for i in range(1, 26)] and _keys(db2) == 25
    assert all(r["delivered_at"] is not None for r in _outbox(pg_dsn))


def test_a_module_no_module_of_its_part_feeds_never_idles_in_a_split_app(
        pg_dsn: str, db2: str, tmp_path: Path) -> None:
    """Cluster 1's gather gets its work only from cluster 2 (whenever cluster 2 can deliver it):
    its slots must not count idle polls while the app runs, or they end before the results come.
    A module fed by a module of its own part idles as before; so does any module of an app that
    is not split."""
    app1, app2 = _parts(pg_dsn, db2, tmp_path)  # app 1: send -> recv (remote), send -> local
    with connect(pg_dsn) as conn:  # the start task done: nothing READY or RUNNING in part 1
        conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s", (app1,))
        conn.commit()
    q1, q2 = PgQueue(pg_dsn), PgQueue(db2)
    m1, m2 = q1.modules(app1), q2.modules(app2)
    assert q1.module_activity(app1, m1["send"].id) == ("RUNNING", True)  # fed by nothing here
    assert q1.module_activity(app1, m1["local"].id) == ("RUNNING", False)  # fed by send, which is quiet
    assert q2.module_activity(app2, m2["recv"].id) == ("RUNNING", False)  # app 2 sends nowhere: not split


def test_a_launcher_role_relays_its_owners_outbox_and_the_keys_are_forgotten(
        site: Site, db2: str, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    """The relay as a launcher role (no table privileges, migrations 0019 and 0023): it reads the
    low-water mark through its function and delivers its owner's rows exactly once."""
    spec2 = load_pipeline(write_app(tmp_path / "p2", RECV, {"recv/run.sh": "true\n"}))
    with connect(db2) as conn:
        app2 = apps.create_app(conn, spec2)
    spec1 = load_pipeline(write_app(tmp_path / "p1", SEND.format(server=db2, app_id=app2),
                                    {"send/run.sh": "true\n", "local/run.sh": "true\n"}))
    with connect(site.dsn(site.alice)) as conn:
        app1 = apps.create_app(conn, spec1)
    _queue_outbox(site.dsn(site.alice), app1, 120)
    done = outbox.relay(site.dsn(site.a_launcher), limit=50)
    assert [(d.sent, d.received, d.error) for d in done] == [(120, 120, None)]
    assert _remote_tasks(db2, app2) == [f"m{i:05d}" for i in range(120)]
    assert _keys(db2) == 20  # the last batch's; the first two batches' keys forgotten
    assert outbox.relay(site.dsn(site.b_launcher), force=True) == []  # bob's launcher sees none of it
