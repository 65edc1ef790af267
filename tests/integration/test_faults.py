"""A bad task fails alone, leases survive database trouble, work dirs belong to one app.

Regression tests for the audit's findings (../shared/design/audit-2026-12.md: F1, F3, F9, F10,
F11, F13, F27, F28 and the work-dir collision), against a real PostgreSQL and real processes.
"""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scalebox_hpc.db import apps, schema
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import LeaseLostError, PgQueue
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.launcher.workdirs import APP_MARKER
from scalebox_hpc.models import Message, TaskResult, TaskStatus
from scalebox_hpc.node import run_launcher
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.runtime.local import LocalRuntime
from tests.conftest import _with_db
from tests.helpers import write_app

pytestmark = pytest.mark.pg

FAST = "arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.1, heartbeat_seconds: 1}"

# run.sh of module `bad`: one way to misbehave per task body; `good` tasks must still succeed
BAD_RUN = r"""
case "$1" in
  nul)        printf 'a\0b\n' ;;
  nul-err)    printf 'e\0e\n' >&2 ;;
  status-1)   echo '{"statusCode": -1}' > task-exec.json ;;
  status-3)   echo '{"statusCode": -3}' > task-exec.json ;;
  status-256) echo '{"statusCode": 256}' > task-exec.json ;;
  deep)       python3 -c 'print("[" * 3000 + "]" * 3000)' > task-exec.json ;;
  types)      echo '{"inputFiles": 5, "timestamps": 5}' > task-exec.json ;;
  nul-file)   printf '{"outputFiles": ["a\\u0000b"]}' > task-exec.json ;;
  huge-int)   echo '{"inputBytes": 100000000000000000000}' > task-exec.json ;;
  sinkjob)    echo '{"sinkJob": ["x"], "messageBody": "b"}' > task-exec.json ;;
  fifo)       mkfifo task-exec.json ;;
  fat-header) python3 -c 'import json; print("m," + json.dumps({"k": "x" * (65536 - 60)}))' > sink-tasks.txt ;;
  *)          echo fine ;;
esac
"""
BAD_BODIES = ["nul", "nul-err", "status-1", "status-3", "status-256", "deep", "types", "nul-file", "huge-int",
              "sinkjob", "fifo", "fat-header"]


def create(pg_dsn: str, root: Path, yaml_text: str, scripts: dict[str, str]) -> int:
    spec = load_pipeline(write_app(root, yaml_text, scripts))
    with connect(pg_dsn) as conn:
        return apps.create_app(conn, spec)


def rows(dsn: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]


def execs(dsn: str, task_id: int) -> list[dict[str, Any]]:
    return rows(dsn, "SELECT * FROM sbx_task_execs WHERE task_id = %s ORDER BY id", task_id)


def launch(dsn: str, app_id: int, work: Path, **kw: Any) -> int:
    return run_launcher(dsn, LauncherConfig(app_id=app_id, host="testhost", work_root=work, local=True, **kw))


def test_each_bad_output_fails_its_task_alone_and_the_slots_go_on(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: poison
        modules:
          bad:
            {FAST}
            slots: [".*:2"]
            sink_modules: [next]
          next:
            {FAST}
    """, {"bad/run.sh": BAD_RUN, "next/run.sh": "true\n"})
    bodies = [b for bad in BAD_BODIES for b in (bad, f"good-{bad}")]
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "bad", [Message(b) for b in bodies])
    started = time.monotonic()
    assert launch(pg_dsn, app_id, tmp_path / "work") == 0
    assert time.monotonic() - started < 120  # nothing blocked for ever (the FIFO)
    tasks = {t["body"]: t for t in rows(pg_dsn, "SELECT * FROM sbx_tasks WHERE app_id = %s", app_id)
             if t["module_id"] == _module_id(pg_dsn, app_id, "bad")}
    for body in bodies:
        task = tasks[body]
        assert task["status"] not in (TaskStatus.READY, TaskStatus.RUNNING), (body, task["status"])
        assert len(execs(pg_dsn, task["id"])) == 1, body  # recorded once, not re-run in a loop
        if body.startswith("good-"):
            assert task["status"] == 0, body
    expected = {
        "nul": 0, "nul-err": 0,  # the output is kept, its NUL replaced
        "status-1": TaskStatus.OUTPUT_INVALID, "status-3": TaskStatus.OUTPUT_INVALID,
        "status-256": TaskStatus.OUTPUT_INVALID, "deep": TaskStatus.OUTPUT_INVALID,
        "types": TaskStatus.OUTPUT_INVALID, "fifo": TaskStatus.OUTPUT_INVALID,
        "fat-header": TaskStatus.EMIT_FAILED,
    }
    for body, status in expected.items():
        assert tasks[body]["status"] == status, (body, tasks[body]["status"], execs(pg_dsn, tasks[body]["id"]))
    [nul] = execs(pg_dsn, tasks["nul"]["id"])
    assert nul["stdout"] == "a\ufffdb\n"
    for body in ("status-1", "deep", "fifo", "fat-header"):
        assert "scalebox:" in execs(pg_dsn, tasks[body]["id"])[0]["stderr"], body
    slots = rows(pg_dsn, "SELECT s.status FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id "
                         "WHERE m.app_id = %s AND m.name = 'bad'", app_id)
    assert [s["status"] for s in slots] == ["EXITED", "EXITED"]


def _module_id(dsn: str, app_id: int, name: str) -> int:
    [row] = rows(dsn, "SELECT id FROM sbx_modules WHERE app_id = %s AND name = %s", app_id, name)
    return int(row["id"])


@pytest.mark.parametrize(("script", "says"), [
    (b"\x7fELF\x02\x01\x01garbage", "cannot start"),
    (b"#!/no/such/interpreter\necho hi\n", "/no/such/interpreter"),
])
def test_an_unstartable_run_sh_fails_each_task_with_101(pg_dsn: str, tmp_path: Path, script: bytes,
                                                        says: str) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: unstartable
        modules:
          a:
            {FAST}
    """, {"a/run.sh": "placeholder\n"})
    run_sh = tmp_path / "app/a/run.sh"
    run_sh.write_bytes(script)
    run_sh.chmod(run_sh.stat().st_mode | stat.S_IXUSR)
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message("1"), Message("2")])
    launch(pg_dsn, app_id, tmp_path / "work")
    for task in rows(pg_dsn, "SELECT * FROM sbx_tasks WHERE app_id = %s", app_id):
        assert task["status"] == TaskStatus.SYSTEM_ERROR
        [ex] = execs(pg_dsn, task["id"])
        assert says in ex["stderr"], ex["stderr"]


def test_a_crash_loop_ends_the_slot_and_the_launcher_exits_non_zero(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: crashloop
        modules:
          a:
            {FAST}
    """, {"a/run.sh": "kill -9 $$\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(str(i)) for i in range(8)])
    assert launch(pg_dsn, app_id, tmp_path / "work") == 1
    [slot] = rows(pg_dsn, "SELECT status, message FROM sbx_slots")
    assert slot["status"] == "ERROR" and "crash loop" in slot["message"]
    statuses = [t["status"] for t in rows(pg_dsn, "SELECT status FROM sbx_tasks ORDER BY id")]
    assert statuses.count(137) == 5 and statuses.count(-1) == 3  # the rest waits for a healthy slot


def test_setup_failure_on_every_slot_exits_non_zero(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: s
        parameters: {{start_task: go}}
        modules:
          a:
            {FAST}
    """, {"a/setup.sh": "exit 4\n", "a/run.sh": "true\n"})
    assert launch(pg_dsn, app_id, tmp_path / "work") == 1


def test_more_messages_than_max_messages_fails_the_task_and_emits_none(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: many
        modules:
          a:
            arguments: {{max_messages: 50, max_idle_polls: 3, sleep_interval_seconds: 0.1}}
            sink_modules: [b]
          b:
            {FAST}
    """, {"a/run.sh": 'seq 1 "$1" > sink-tasks.txt\n', "b/run.sh": "true\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message("50"), Message("51")])
    launch(pg_dsn, app_id, tmp_path / "work")
    status = {t["body"]: t["status"] for t in rows(pg_dsn, "SELECT body, status FROM sbx_tasks WHERE module_id = %s",
                                                 _module_id(pg_dsn, app_id, "a"))}
    assert status == {"50": 0, "51": TaskStatus.EMIT_FAILED}
    [count] = rows(pg_dsn, "SELECT count(*) AS n FROM sbx_tasks WHERE module_id = %s",
                   _module_id(pg_dsn, app_id, "b"))
    assert count["n"] == 50


# -- the work dir of an app ----------------------------------------------------------------------
GATHER = """
name: sum
modules:
  g:
    {fast}
    environments: {{EXPECT: "{expect}"}}
"""
# a stateful module, like app-primes' gather: it counts every task its work dir has seen
GATHER_RUN = 'echo "$1" >> seen; [ "$(wc -l < seen)" -ge "$EXPECT" ] && scalebox app set-finished "$(wc -l < seen)"\n'


def test_apps_with_the_same_id_in_two_databases_never_share_a_work_dir(
    pg_dsn: str, empty_db: str, tmp_path: Path,
) -> None:
    with psycopg.connect(empty_db, row_factory=psycopg.rows.dict_row) as conn:
        schema.init(conn)  # type: ignore[arg-type]
    work = tmp_path / "work"
    results = []
    for dsn, n in ((pg_dsn, 3), (empty_db, 2)):
        app_id = create(dsn, tmp_path / f"app{n}", GATHER.format(fast=FAST, expect=n), {"g/run.sh": GATHER_RUN})
        assert app_id == 1  # ids restart in every database: the collision the uid prevents
        with connect(dsn) as conn:
            apps.add_tasks(conn, app_id, "g", [Message(str(i)) for i in range(n)])
        launch(dsn, app_id, work)
        [app] = rows(dsn, "SELECT result FROM sbx_apps")
        results.append(app["result"])
    assert results == ["3", "2"]  # before: the second app saw the first one's state and said 5
    dirs = sorted(p.name for p in work.iterdir())
    assert len(dirs) == 2 and all(d.startswith("app-1-") for d in dirs)


def test_a_work_dir_of_another_app_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", GATHER.format(fast=FAST, expect=1), {"g/run.sh": "true\n"})
    [app] = rows(pg_dsn, "SELECT uid::text FROM sbx_apps")
    work = tmp_path / "work"
    launch(pg_dsn, app_id, work)
    [app_dir] = list(work.iterdir())
    (app_dir / APP_MARKER).write_text("00000000-0000-0000-0000-000000000000\n")
    with pytest.raises(Exception, match="belongs to app 00000000"):
        launch(pg_dsn, app_id, work)
    assert app["uid"]


# -- leases ---------------------------------------------------------------------------------------
def one_app(pg_dsn: str, tmp_path: Path, retry: str = "") -> tuple[int, int]:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: q
        modules:
          m:
            {FAST}
            {retry}
    """, {"m/run.sh": "true\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "m", [Message("t")])
    return app_id, _module_id(pg_dsn, app_id, "m")


def result(status: int = 0) -> TaskResult:
    now = TaskResult(status=0, started_at=_now(), finished_at=_now()).started_at
    return TaskResult(status=status, started_at=now, finished_at=now)


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_a_claim_whose_reply_was_lost_is_released_by_the_next_heartbeats(pg_dsn: str, tmp_path: Path) -> None:
    app_id, mid = one_app(pg_dsn, tmp_path)
    q = PgQueue(pg_dsn)
    slot = q.create_slot(mid, host="h", seq=0, pid=1, work_dir="/w", heartbeat_seconds=1)
    [task] = q.claim(app_id, mid, host="h", slot_id=slot, slot_seq=0, lease_seconds=1.0)
    # the slot never saw the reply: it beats without the task
    assert q.heartbeat(slot, status="READY", lease_seconds=1.0, task_ids=[]) == []  # too fresh to judge
    time.sleep(1.2)
    assert q.heartbeat(slot, status="READY", lease_seconds=1.0, task_ids=[]) == [task.id]
    [row] = rows(pg_dsn, "SELECT status, attempts FROM sbx_tasks WHERE id = %s", task.id)
    assert (row["status"], row["attempts"]) == (-1, 0)
    q.close()


def test_a_recovered_and_reclaimed_task_records_only_the_newer_run(pg_dsn: str, tmp_path: Path) -> None:
    """F27: an MPI farm holds all its tasks under one slot id; the attempt fences the hand-off."""
    app_id, mid = one_app(pg_dsn, tmp_path)
    q = PgQueue(pg_dsn)
    slot = q.create_slot(mid, host="h", seq=0, pid=1, work_dir="/w", heartbeat_seconds=1)
    [old] = q.claim(app_id, mid, host="h", slot_id=slot, slot_seq=0, lease_seconds=0.2)
    time.sleep(0.4)
    assert q.recover_expired() == [(old.id, -1)]
    [new] = q.claim(app_id, mid, host="h", slot_id=slot, slot_seq=0, lease_seconds=30)
    assert (old.attempts, new.attempts) == (1, 2)
    refs = q.modules(app_id)
    with pytest.raises(LeaseLostError):
        q.complete(old, result(7), slot_id=slot, host="h", sender=refs["m"], modules=refs)
    q.complete(new, result(0), slot_id=slot, host="h", sender=refs["m"], modules=refs)
    [row] = rows(pg_dsn, "SELECT status FROM sbx_tasks WHERE id = %s", new.id)
    assert row["status"] == 0
    assert [e["status"] for e in execs(pg_dsn, new.id)] == [123, 0]
    q.close()


def test_a_periodic_recovery_skips_an_app_another_recoverer_holds_and_never_waits(
        pg_dsn: str, tmp_path: Path) -> None:
    """0032: the app's row is the fleet's recovery token; held by another recoverer's
    transaction it is skipped at once (the other is recovering it), and `every=0` still
    recovers now (the CLI), without taking it."""
    app_id, mid = one_app(pg_dsn, tmp_path)
    q = PgQueue(pg_dsn)
    slot = q.create_slot(mid, host="h", seq=0, pid=1, work_dir="/w", heartbeat_seconds=1)
    [task] = q.claim(app_id, mid, host="h", slot_id=slot, slot_seq=0, lease_seconds=0.1)
    time.sleep(0.3)
    with connect(pg_dsn) as holder:
        holder.execute("SELECT 1 FROM sbx_apps WHERE id = %s FOR NO KEY UPDATE", (app_id,))
        start = time.monotonic()
        assert q.recover_expired(every=1.0) == []
        assert time.monotonic() - start < 2.0
        holder.rollback()
    assert q.recover_expired(every=1.0) == [(task.id, -1)]
    [again] = q.claim(app_id, mid, host="h", slot_id=slot, slot_seq=0, lease_seconds=0.1)
    time.sleep(0.3)
    assert q.recover_expired(every=30.0) == []  # recovered just now: not due for 30 s
    assert q.recover_expired() == [(again.id, -1)]
    [row] = rows(pg_dsn, "SELECT recovered_at IS NOT NULL AS set FROM sbx_apps WHERE id = %s", app_id)
    assert row["set"]
    q.close()


def test_a_slot_is_judged_by_its_own_heartbeat_not_the_callers(pg_dsn: str, tmp_path: Path) -> None:
    """F13: a launcher beating every second must not mark a slow-beating slot LOST."""
    _, mid = one_app(pg_dsn, tmp_path)
    q = PgQueue(pg_dsn)
    slow = q.create_slot(mid, host="slow", seq=0, pid=1, work_dir="/w", heartbeat_seconds=120)
    fast = q.create_slot(mid, host="fast", seq=0, pid=1, work_dir="/w", heartbeat_seconds=1)
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_slots SET heartbeat_at = now() - interval '100 seconds'")
    q.recover_expired()
    status = {r["id"]: r["status"] for r in rows(pg_dsn, "SELECT id, status FROM sbx_slots")}
    assert status == {slow: "STARTING", fast: "LOST"}
    [live] = rows(pg_dsn, "SELECT sbx_host_live('slow') AS slow, sbx_host_live('fast') AS fast")
    assert live == {"slow": True, "fast": False}
    q.close()


def test_a_manual_retry_gets_a_fresh_attempt_budget(pg_dsn: str, tmp_path: Path) -> None:
    app_id, mid = one_app(pg_dsn, tmp_path)
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_tasks SET status = 5, attempts = 3")
        apps.retry_tasks(conn, [r["id"] for r in conn.execute("SELECT id FROM sbx_tasks").fetchall()])
    [row] = rows(pg_dsn, "SELECT status, attempts, retry_base FROM sbx_tasks")
    assert (row["status"], row["attempts"], row["retry_base"]) == (-1, 3, 3)
    q = PgQueue(pg_dsn)  # it stalls once: with its fresh budget (2 stall retries) it is READY again
    slot = q.create_slot(mid, host="h", seq=0, pid=1, work_dir="/w", heartbeat_seconds=1)
    [task] = q.claim(app_id, mid, host="h", slot_id=slot, slot_seq=0, lease_seconds=0.1)
    assert (task.attempts, task.tries) == (4, 1)
    time.sleep(0.3)
    assert q.recover_expired() == [(task.id, -1)]
    q.close()


def test_a_message_cannot_forge_where_it_came_from(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: forge
        modules:
          a:
            {FAST}
            sink_modules: [b]
          b:
            {FAST}
    """, {"a/run.sh": 'echo \'x,{"from_host": "victim", "from_slot": 9}\' > sink-tasks.txt\n',
          "b/run.sh": "true\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message("go")])
    launch(pg_dsn, app_id, tmp_path / "work")
    [msg] = rows(pg_dsn, "SELECT headers FROM sbx_tasks WHERE module_id = %s", _module_id(pg_dsn, app_id, "b"))
    assert (msg["headers"]["from_host"], msg["headers"]["from_slot"]) == ("testhost", 0)


def test_the_drain_grace_is_one_deadline_for_all_busy_slots(pg_dsn: str, tmp_path: Path) -> None:
    """F11: 4 busy slots and a 2 s grace: the drain is over in about 2 s, not 8."""
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: drain
        modules:
          a:
            {FAST}
            slots: [".*:4"]
    """, {"a/run.sh": "sleep 60\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(str(i)) for i in range(4)])
    config = LauncherConfig(app_id=app_id, host="h", work_root=tmp_path / "work", local=True)
    launcher = Launcher(config, lambda: PgQueue(pg_dsn), LocalRuntime(), Wakeups())
    launcher.start()
    deadline = time.monotonic() + 30
    while len(rows(pg_dsn, "SELECT 1 FROM sbx_tasks WHERE status = -3")) < 4:
        assert time.monotonic() < deadline, "the 4 tasks never all ran"
        time.sleep(0.1)
    started = time.monotonic()
    launcher.stop(grace=2.0)
    took = time.monotonic() - started
    assert took < 6.0, took  # the old per-slot grace: 4 x 2 s before the kill even began
    assert [r["status"] for r in rows(pg_dsn, "SELECT status FROM sbx_tasks")] == [-1] * 4  # released


# -- database faults -----------------------------------------------------------------------------
def test_a_read_only_window_and_killed_sessions_lose_nothing(pg_dsn: str, tmp_path: Path) -> None:
    """F10: HA fail-over as a launcher sees it: sessions terminated, the server read-only for a
    while. The launcher keeps its task, retries the hand-off and records it once writable."""
    app_id = create(pg_dsn, tmp_path / "app", """
        name: ro
        modules:
          a:
            arguments: {max_idle_polls: 5, sleep_interval_seconds: 0.1, heartbeat_seconds: 2}
    """, {"a/run.sh": "sleep 2; echo done\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message("t")])
    dbname = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(launch(pg_dsn, app_id, tmp_path / "work")))
    thread.start()
    deadline = time.monotonic() + 30
    while not rows(pg_dsn, "SELECT 1 FROM sbx_tasks WHERE status = -3"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    admin = _with_db(pg_dsn, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
            psycopg.sql.Identifier(dbname)))
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                     "pg_backend_pid()", (dbname,))
    time.sleep(3.0)  # the run ends meanwhile: its hand-off meets a read-only server
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(
            psycopg.sql.Identifier(dbname)))
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                     "pg_backend_pid()", (dbname,))
    thread.join(60)
    assert not thread.is_alive() and code == [0]
    [task] = rows(pg_dsn, "SELECT id, status, attempts FROM sbx_tasks")
    assert (task["status"], task["attempts"]) == (0, 1)
    assert [e["status"] for e in execs(pg_dsn, task["id"])] == [0]


def test_queue_connections_have_keepalives_and_a_statement_timeout(pg_dsn: str) -> None:
    q = PgQueue(pg_dsn, statement_timeout=7)
    params = q.conn.info.get_parameters()
    assert params.get("keepalives") == "1" and params.get("tcp_user_timeout") == "30000"
    assert q.conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "7s"}
    assert abs(q.clock_offset.total_seconds()) < 5
    q.close()


def test_a_result_the_database_refuses_for_good_is_recorded_as_103_not_retried_for_ever(
    pg_dsn: str, tmp_path: Path,
) -> None:
    """F2: a hand-off PostgreSQL refuses with a program limit (54000, as for a jsonb over 256 MB)
    is not an outage: the task gets -103 with the reason, and the slot goes on."""
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: refused
        modules:
          a:
            {FAST}
    """, {"a/run.sh": 'echo "$1"\n'})
    with connect(pg_dsn) as conn:  # a real server refusal, raised where the size limit would be
        conn.execute("""
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.stdout LIKE '%REFUSE%' AND NEW.status <> -103 THEN
                    RAISE EXCEPTION 'total size of jsonb array elements exceeds the maximum'
                        USING ERRCODE = 'program_limit_exceeded';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse BEFORE INSERT ON sbx_task_execs FOR EACH ROW EXECUTE FUNCTION refuse();
        """)
        apps.add_tasks(conn, app_id, "a", [Message("REFUSE"), Message("fine")])
    started = time.monotonic()
    assert launch(pg_dsn, app_id, tmp_path / "work") == 0
    assert time.monotonic() - started < 60
    status = {t["body"]: t for t in rows(pg_dsn, "SELECT id, body, status FROM sbx_tasks")}
    assert status["fine"]["status"] == 0
    assert status["REFUSE"]["status"] == TaskStatus.OUTPUT_INVALID
    [ex] = execs(pg_dsn, status["REFUSE"]["id"])
    assert "could not be recorded" in ex["stderr"] and "exceeds the maximum" in ex["stderr"]
