"""Chaos: kill launchers with -9, restart PostgreSQL mid-run; nothing lost, nothing done twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from scalebox_hpc.db import apps, schema
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.db.sql import schema_version
from scalebox_hpc.models import Message
from scalebox_hpc.pipeline import load_pipeline
from tests.components import need
from tests.helpers import wait_until, write_app

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parents[2]
FAST = "{heartbeat_seconds: 1, max_idle_polls: 10, sleep_interval_seconds: 0.2}"


def primes_copy(root: Path, *, calc_sleep: float) -> Path:
    """examples/app-primes with 1 s heartbeats and a slower calc, so kills land mid-task."""
    shutil.copytree(REPO / "examples/app-primes", root)
    text = (root / "app.yaml").read_text()
    for module in ("scatter", "calc", "gather"):
        text = text.replace(f"  {module}:\n", f"  {module}:\n    arguments: {FAST}\n", 1)
    (root / "app.yaml").write_text(text)
    calc = root / "calc/run.sh"
    calc.write_text(calc.read_text().replace("set -euo pipefail\n", f"set -euo pipefail\nsleep {calc_sleep}\n", 1))
    return root / "app.yaml"


def launcher(env: dict[str, str], app_id: int, host: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "scalebox_hpc", "launcher", "--app", str(app_id), "--grace", "5", *extra],
        env=dict(env, SCALEBOX_HOST=host), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def count(dsn: str, app_id: int, status: int, module: str | None = None) -> int:
    with connect(dsn) as conn:
        return sum(1 for t in apps.list_tasks(conn, app_id, module=module, limit=10000) if t["status"] == status)


def app_row(dsn: str, app_id: int) -> dict[str, Any]:
    with connect(dsn) as conn:
        return apps.get_app(conn, app_id)


def exec_statuses(dsn: str, app_id: int) -> Counter[int]:
    with connect(dsn) as conn:
        rows = conn.execute("SELECT e.status FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id "
                            "WHERE t.app_id = %s", (app_id,)).fetchall()
    return Counter(r["status"] for r in rows)


def test_kill_9_launcher_mid_app_primes(pg_dsn: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    spec = load_pipeline(primes_copy(tmp_path / "primes", calc_sleep=1.5))
    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, spec)
    first = launcher(cli_env, app_id, "h1")
    wait_until(lambda: count(pg_dsn, app_id, -3, "calc") >= 2, 60, "calc tasks running")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert count(pg_dsn, app_id, -3, "calc") >= 2  # orphaned leases
    t_kill = time.monotonic()
    second = launcher(cli_env, app_id, "h1")  # the node comes back: same host, same work dirs
    wait_until(lambda: count(pg_dsn, app_id, -3, "calc") == 0 or count(pg_dsn, app_id, -1, "calc") > 0, 30,
             "recovery")
    recovery = time.monotonic() - t_kill
    wait_until(lambda: app_row(pg_dsn, app_id)["status"] == "FINISHED", 90, "app-primes to finish")
    second.send_signal(signal.SIGTERM)
    second.wait(30)
    assert app_row(pg_dsn, app_id)["result"] == "Result is 1229"
    with connect(pg_dsn) as conn:
        tasks = apps.list_tasks(conn, app_id, limit=1000)
    per_module = Counter(t["module"] for t in tasks)
    assert per_module == {"scatter": 1, "calc": 10, "gather": 10}  # exactly once downstream
    assert all(t["status"] == 0 for t in tasks), [(t["module"], t["body"], t["status"]) for t in tasks]
    assert exec_statuses(pg_dsn, app_id)[123] >= 2  # the killed runs are on record as stalled
    assert recovery < 2 * 1 + 3, recovery  # within ~2 heartbeats (+ start-up of the new launcher)


def test_kill_9_launcher_other_host_takes_over(pg_dsn: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = _chain_app(pg_dsn, tmp_path, n=12)
    first = launcher(cli_env, app_id, "h1", "--slots", "2")
    wait_until(lambda: count(pg_dsn, app_id, -3, "a") >= 2, 60, "tasks running")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    second = launcher(cli_env, app_id, "h2", "--slots", "2")
    wait_until(lambda: count(pg_dsn, app_id, 0, "b") == 12, 90, "all 12 downstream tasks")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    with connect(pg_dsn) as conn:
        tasks = apps.list_tasks(conn, app_id, limit=1000)
    bodies = Counter((t["module"], t["body"]) for t in tasks)
    assert all(n == 1 for n in bodies.values()) and len(bodies) == 24
    assert all(t["status"] == 0 for t in tasks)


def _chain_app(dsn: str, root: Path, n: int) -> int:
    spec = load_pipeline(write_app(root / "chain", f"""
        name: chain
        modules:
          a:
            sink_modules: [b]
            arguments: {FAST}
          b:
            arguments: {FAST}
    """, {"a/run.sh": 'sleep 1\nsend-message "from-$1"\n', "b/run.sh": "true\n"}))
    with connect(dsn) as conn:
        app_id = apps.create_app(conn, spec)
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(n)])
    return app_id


def test_stalled_task_gets_123_when_retries_are_spent(pg_dsn: str, tmp_path: Path) -> None:
    spec = load_pipeline(write_app(tmp_path / "s", """
        name: s
        parameters: {start_task: go}
        modules:
          a:
            parameters: {retry_rules: ['123:1']}
    """, {"a/run.sh": "true\n"}))
    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, spec)
    q = PgQueue(pg_dsn)
    module_id = q.modules(app_id)["a"].id
    for attempt, expected in ((1, -1), (2, 123)):
        slot = q.create_slot(module_id, host="dead", seq=0, pid=1, work_dir="/nowhere")
        [task] = q.claim(app_id, module_id, host="dead", slot_id=slot, slot_seq=0, lease_seconds=0.01)
        assert task.attempts == attempt
        time.sleep(0.05)
        assert q.recover_expired() == [(task.id, expected)]
    assert exec_statuses(pg_dsn, app_id) == {123: 2}
    q.close()


# -- PostgreSQL restart ---------------------------------------------------------------------
@pytest.fixture
def private_server() -> Iterator[tuple[str, dict[str, str]]]:
    """A PostgreSQL server of this test's own (the test-bed script on another port; a new
    cluster: no scalebox roles yet), wiped at the end."""
    script = REPO / "launchers/testbed/postgres.sh"
    if os.geteuid() != 0 or not shutil.which("runuser"):
        need("postgres-restart", "needs root and the test-bed's launchers/testbed/postgres.sh")
    env = dict(os.environ, SCALEBOX_TESTBED_PG_PORT="55499", SCALEBOX_TESTBED_PG_DIR="/tmp/sbx-chaos-pg")
    subprocess.run(["bash", str(script), "stop", "--wipe"], env=env, capture_output=True, timeout=120)
    out = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        need("postgres-restart", f"postgres.sh start failed: {out.stderr.strip()[-300:]}")
    dsn = "postgresql://postgres@127.0.0.1:55499/scalebox"
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    try:
        yield dsn, env
    finally:
        subprocess.run(["bash", str(script), "stop", "--wipe"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def private_pg(private_server: tuple[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    """:func:`private_server` with the schema, to restart."""
    dsn, _env = private_server
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        schema.init(conn)  # type: ignore[arg-type]
    return private_server


def test_two_inits_of_one_servers_databases_at_once_both_make_their_schema(
        private_server: tuple[str, dict[str, str]]) -> None:
    """0031: the group roles are the server's. Two `db init` of two of its databases at once
    both found sbx_user missing; the second's CREATE ROLE waited for the first to commit and
    then failed (a duplicate key in pg_authid), and its whole init rolled back. Now a role
    made meanwhile is taken as made: both schemas are made, with their grants."""
    dsn, _env = private_server
    dsn2 = dsn.rsplit("/", 1)[0] + "/two"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE two")
    first_in, commit = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:  # makes the roles and holds its transaction open
        with psycopg.connect(dsn, row_factory=dict_row) as a, a.transaction():
            schema.init(a)  # type: ignore[arg-type]
            first_in.set()
            commit.wait(60)

    def second() -> None:
        try:
            with psycopg.connect(dsn2, row_factory=dict_row) as b:
                schema.init(b)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert first_in.wait(60)
    threads[1].start()
    with psycopg.connect(dsn, autocommit=True) as watch:  # the second waits on the first's role
        wait_until(lambda: watch.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'two' "
                                         "AND wait_event_type = 'Lock'").fetchone() == (1,), 30,
                   "the second init waiting for the first's role")
    commit.set()
    for t in threads:
        t.join(60)
    assert errors == []
    for target in (dsn, dsn2):
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT max(version) FROM sbx_schema_version").fetchone() == (schema_version(),)
            assert conn.execute("SELECT has_table_privilege('sbx_user', 'sbx_tasks', 'INSERT'), "
                                "has_function_privilege('sbx_launcher', 'sbx_l_claim_v1(bigint, bigint, text, "
                                "bigint[], integer[], integer[], integer, double precision)', 'EXECUTE')"
                                ).fetchone() == (True, True)


def test_postgres_restart_mid_app_primes(private_pg: tuple[str, dict[str, str]], cli_env: dict[str, str],
                                         tmp_path: Path) -> None:
    dsn, pg_env = private_pg
    spec = load_pipeline(primes_copy(tmp_path / "primes", calc_sleep=1.0))
    with connect(dsn) as conn:
        app_id = apps.create_app(conn, spec)
    env = dict(cli_env, SCALEBOX_DSN=dsn)
    proc = launcher(env, app_id, "h1")
    wait_until(lambda: count(dsn, app_id, -3, "calc") >= 1, 60, "calc running")
    script = str(REPO / "launchers/testbed/postgres.sh")
    subprocess.run(["bash", script, "stop"], env=pg_env, check=True, capture_output=True, timeout=120)
    time.sleep(3)  # tasks finish while the database is away; their results must wait, not vanish
    subprocess.run(["bash", script, "start"], env=pg_env, check=True, capture_output=True, timeout=120)
    wait_until(lambda: app_row(dsn, app_id)["status"] == "FINISHED", 120, "app-primes to finish after the restart")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert app_row(dsn, app_id)["result"] == "Result is 1229"
    with connect(dsn) as conn:
        tasks = apps.list_tasks(conn, app_id, limit=1000)
    assert Counter(t["module"] for t in tasks) == {"scatter": 1, "calc": 10, "gather": 10}
    assert all(t["status"] == 0 for t in tasks)


def test_soak_small(pg_dsn: str, tmp_path: Path) -> None:
    """benchmarks/soak.py at CI size: launchers killed at random, final counts exact."""
    env = dict(os.environ, SCALEBOX_DSN=pg_dsn, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/soak.py"), "--tasks", "400", "--kill-every", "1.5"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["exact"] is True and result["final"] == result["expected"], result
    assert result["misattributed_messages"] == 0


def test_a_task_runs_to_the_end_through_three_restarts_longer_than_its_lease(
    private_pg: tuple[str, dict[str, str]], tmp_path: Path,
) -> None:
    """F9: three PostgreSQL restarts, each longer than the lease (1.5 s), during one 12 s run:
    the task ends OK with one execution, not 123 after three 'recoveries'."""
    dsn, pg_env = private_pg
    spec = load_pipeline(write_app(tmp_path / "app", f"""
        name: long
        modules:
          a:
            arguments: {FAST}
    """, {"a/run.sh": "sleep 12; echo done\n"}))
    with connect(dsn) as conn:
        app_id = apps.create_app(conn, spec)
    with connect(dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message("t")])
    proc = launcher(dict(os.environ, SCALEBOX_DSN=dsn), app_id, "h1", "--work-root", str(tmp_path / "work"))
    wait_until(lambda: count(dsn, app_id, -3) == 1, 30, "the task to run")
    script = str(REPO / "launchers/testbed/postgres.sh")
    for _ in range(3):
        subprocess.run(["bash", script, "stop"], env=pg_env, check=True, capture_output=True, timeout=120)
        time.sleep(2.0)
        subprocess.run(["bash", script, "start"], env=pg_env, check=True, capture_output=True, timeout=120)
        time.sleep(0.5)
    wait_until(lambda: count(dsn, app_id, 0) == 1, 60, "the task to end")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
    with connect(dsn) as conn:
        [task] = conn.execute("SELECT id, status, attempts FROM sbx_tasks").fetchall()
        execs = [r["status"] for r in conn.execute("SELECT status FROM sbx_task_execs").fetchall()]
    assert execs == [0] and (task["status"], task["attempts"]) == (0, 1)
