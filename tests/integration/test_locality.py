"""Location-aware dispatch on a real PostgreSQL: the scratch index, preferred hosts, delay
scheduling, and real launchers pulling the tasks whose inputs sit in their own scratch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.db.sql import query
from scalebox_hpc.launcher.launcher import LauncherConfig
from scalebox_hpc.models import Message
from scalebox_hpc.node import run_launcher
from scalebox_hpc.pipeline import load_pipeline
from tests.helpers import write_app
from tests.integration.test_queue import _plan_nodes

pytestmark = pytest.mark.pg

APP = """
name: loc
modules:
  use:
    arguments: {{locality_wait_seconds: {wait}, max_idle_polls: 8, sleep_interval_seconds: 0.2,
                 input_regex: "^in:(.*)$"}}
"""


def make_app(pg_dsn: str, root: Path, wait: float = 30, run: str = "true\n") -> int:
    spec = load_pipeline(write_app(root, APP.format(wait=wait), {"use/run.sh": run}))
    with connect(pg_dsn) as conn:
        return apps.create_app(conn, spec)


def live_host(queue: PgQueue, module_id: int, host: str) -> int:
    """A host is live while one of its slots heartbeats; returns the slot id."""
    slot = queue.create_slot(module_id, host=host, seq=0, pid=1, work_dir="/w")
    queue.heartbeat(slot, status="READY", lease_seconds=30)
    return slot


def pref(pg_dsn: str, app_id: int) -> dict[str, str | None]:
    with connect(pg_dsn) as conn:
        rows = conn.execute("SELECT body, pref_host FROM sbx_tasks WHERE app_id = %s", (app_id,)).fetchall()
    return {r["body"]: r["pref_host"] for r in rows}


def claim(queue: PgQueue, app_id: int, module_id: int, host: str, n: int = 100) -> list[str]:
    slot = queue.create_slot(module_id, host=host, seq=0, pid=1, work_dir="/w")
    return [t.body for t in queue.claim(app_id, module_id, host=host, slot_id=slot, slot_seq=0, limit=n)]


@pytest.fixture
def queue(pg_dsn: str) -> Iterator[PgQueue]:
    q = PgQueue(pg_dsn)
    yield q
    q.close()


def test_tasks_prefer_the_live_host_holding_most_inputs(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    mid = queue.modules(app_id)["use"].id
    for host in ("A", "B"):
        live_host(queue, mid, host)
    queue.index_scratch("A", [("x/1", 10), ("x/2", 10), ("big", 1)], [])
    queue.index_scratch("B", [("x/2", 10), ("x/3", 10), ("big", 10_000)], [])
    queue.index_scratch("DEAD", [("x/1", 1), ("x/4", 1)], [])  # no live slot: ignored
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "use", [
            Message("t1", headers={"inputs": ["x/1", "x/2"]}),      # A holds both, B one
            Message("t2", headers={"inputs": ["x/2", "x/3"]}),      # B holds both
            Message("t3", headers={"inputs": ["big"]}),             # both: B holds more bytes
            Message("t4", headers={"inputs": ["x/4"]}),             # only a dead host holds it
            Message("t5"),                                          # no inputs
            Message("in:x/3"),                                      # inputs from the body (input_regex)
            Message("t6", headers={"inputs": ["x/1"], "to_host": "B"}),  # HOST-BOUND wins
        ])
    assert pref(pg_dsn, app_id) == {"t1": "A", "t2": "B", "t3": "B", "t4": None, "t5": None, "in:x/3": "B",
                                    "t6": "B"}

    # A takes its own task first, then the unpreferred ones; B's wait (delay scheduling)
    assert claim(queue, app_id, mid, "A") == ["t1", "t4", "t5"]
    assert sorted(claim(queue, app_id, mid, "B")) == ["in:x/3", "t2", "t3", "t6"]


def test_a_task_waits_for_its_holder_then_anyone_takes_it(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app", wait=1.0)
    mid = queue.modules(app_id)["use"].id
    live_host(queue, mid, "B")
    queue.index_scratch("B", [("f", 5)], [])
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "use", [Message("t", headers={"inputs": ["f"]})])
    assert claim(queue, app_id, mid, "A") == []   # B holds it: A waits
    time.sleep(1.2)                               # B never came: after the wait A may take it
    assert claim(queue, app_id, mid, "A") == ["t"]


def dead(pg_dsn: str, host: str) -> None:
    """The host's slots stopped heart-beating long ago."""
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_slots SET heartbeat_at = now() - interval '10 minutes' WHERE host = %s", (host,))


def test_a_bound_task_waits_for_its_host_while_it_lives(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app", wait=0.5)
    mid = queue.modules(app_id)["use"].id
    live_host(queue, mid, "B")
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "use", [Message("host-bound", headers={"to_host": "B"}),
                                             Message("slot-bound", headers={"to_host": "B", "to_slot": 3})])
    time.sleep(0.7)
    queue.recover_expired()  # what every launcher does each heartbeat
    assert claim(queue, app_id, mid, "A") == []     # past the wait, but B lives: it stays B's
    dead(pg_dsn, "B")                               # B's launcher died: released to anyone
    queue.recover_expired()
    assert sorted(claim(queue, app_id, mid, "A")) == ["host-bound", "slot-bound"]


def test_a_bound_task_is_its_hosts_at_once(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app", wait=30)
    mid = queue.modules(app_id)["use"].id
    with connect(pg_dsn) as conn:  # B is not up yet: its tasks wait for it (within the wait)
        apps.add_tasks(conn, app_id, "use", [Message("b", headers={"to_host": "B"}), Message("free")])
    queue.recover_expired()
    assert claim(queue, app_id, mid, "A") == ["free"]
    assert claim(queue, app_id, mid, "B") == ["b"]


def test_tasks_fully_local_come_before_partly_local(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    mid = queue.modules(app_id)["use"].id
    live_host(queue, mid, "A")
    queue.index_scratch("A", [("a", 1), ("b", 1)], [])
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "use", [
            Message("part", headers={"inputs": ["a", "elsewhere"]}),
            Message("all1", headers={"inputs": ["a"]}),
            Message("all2", headers={"inputs": ["a", "b", "a"]}),
        ])
        rows = conn.execute("SELECT body, pref_partial FROM sbx_tasks WHERE app_id = %s", (app_id,)).fetchall()
    partial = {r["body"]: r["pref_partial"] for r in rows}
    assert partial == {"part": True, "all1": False, "all2": False}
    assert [claim(queue, app_id, mid, "A", n=1) for _ in range(3)] == [["all1"], ["all2"], ["part"]]


def test_a_starting_launcher_adopts_tasks_queued_before_it(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    mid = queue.modules(app_id)["use"].id
    live_host(queue, mid, "C")
    queue.index_scratch("C", [("c", 1)], [])
    with connect(pg_dsn) as conn:  # no holder of a or b is up yet
        apps.add_tasks(conn, app_id, "use", [
            Message("a", headers={"inputs": ["a"]}), Message("b", headers={"inputs": ["b"]}),
            Message("ac", headers={"inputs": ["a", "c"]}), Message("c", headers={"inputs": ["c"]}),
            Message("in:a"), Message("none"),
        ])
    assert pref(pg_dsn, app_id) == {"a": None, "b": None, "ac": "C", "c": "C", "in:a": None, "none": None}
    queue.index_scratch("B", [("b", 1)], [])  # B's scratch is known, its launcher not up yet
    queue.index_scratch("A", [("a", 7)], [], replace=True)  # A's launcher starts: scan, then adopt
    assert queue.adopt_tasks(app_id, "A") == 3
    # b waits for B (its locality wait), so that A, up first, does not take it meanwhile
    assert pref(pg_dsn, app_id) == {"a": "A", "b": "B", "ac": "C", "c": "C", "in:a": "A", "none": None}
    assert queue.adopt_tasks(app_id, "A") == 0  # idempotent
    dead(pg_dsn, "C")  # C died: its tasks go to a holder that starts later
    assert queue.adopt_tasks(app_id, "A") == 1
    assert pref(pg_dsn, app_id)["ac"] == "A"


def test_overwrite_takes_the_new_messages_preference(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    mid = queue.modules(app_id)["use"].id
    live_host(queue, mid, "A")
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_modules SET conflict_action = 'OVERWRITE' WHERE id = %s", (mid,))
        apps.add_tasks(conn, app_id, "use", [Message("t", headers={"to_host": "A"})])
        apps.add_tasks(conn, app_id, "use", [Message("t", headers={"to_host": "B"})])
    assert pref(pg_dsn, app_id) == {"t": "B"}


def test_index_follows_removals_and_rescans(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    mid = queue.modules(app_id)["use"].id
    live_host(queue, mid, "A")
    queue.index_scratch("A", [("a", 1), ("b", 2)], [])
    queue.index_scratch("A", [], ["a"])
    queue.index_scratch("A", [("c", 3)], [], replace=True)  # a start-up scan replaces what A held
    with connect(pg_dsn) as conn:
        rows = conn.execute("SELECT key, bytes FROM sbx_scratch WHERE host = 'A' ORDER BY key").fetchall()
    assert [(r["key"], r["bytes"]) for r in rows] == [("c", 3)]


def claim_scans(conn: Any, app_id: int, module_id: int, host: str) -> dict[tuple[str, str | None], int]:
    """The sbx_tasks scans that ran (nodes of never-needed branches, e.g. the max_pending check
    of an app without sinks, have no loops) in EXPLAIN ANALYZE of a 1-task claim by ``host``
    (rolled back), with the rows each read and filtered out."""
    params = {"app_id": app_id, "module_id": module_id, "host": host, "slot_ids": [None], "slot_seqs": [0],
              "wants": [1], "limit": 1, "lease_seconds": 30}
    with psycopg.ClientCursor(conn) as cur:
        plan: Any = cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query("claim_tasks"), params).fetchone()
    conn.rollback()
    nodes = [n for n in _plan_nodes(plan["QUERY PLAN"][0]["Plan"]) if n.get("Actual Loops", 0) > 0]
    return {(n["Node Type"], n.get("Index Name")): n.get("Rows Removed by Filter", 0)
            for n in nodes if n.get("Relation Name") == "sbx_tasks"}


def test_claim_is_indexed_at_a_million_queued_tasks(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    app_id = make_app(pg_dsn, tmp_path / "app")
    mid = queue.modules(app_id)["use"].id
    with connect(pg_dsn) as conn:
        with conn.transaction():  # 1M READY tasks, a third preferring one of 8 hosts (bypassing the trigger)
            conn.execute("ALTER TABLE sbx_tasks DISABLE TRIGGER sbx_tasks_locality")
            conn.execute("""
                INSERT INTO sbx_tasks (app_id, module_id, body, pref_host, pref_until)
                SELECT %(app)s, %(mid)s, 'b' || i,
                       CASE WHEN i %% 3 = 0 THEN 'h' || (i %% 8) END,
                       CASE WHEN i %% 3 = 0 THEN now() + interval '1 hour' END
                FROM generate_series(1, 1000000) AS i""", {"app": app_id, "mid": mid})
            conn.execute("ALTER TABLE sbx_tasks ENABLE TRIGGER sbx_tasks_locality")
        conn.execute("ANALYZE sbx_tasks")
        scans = claim_scans(conn, app_id, mid, "h3")
        start = time.perf_counter()
        claimed = claim(queue, app_id, mid, "h3", n=1)
        elapsed = time.perf_counter() - start
    # an index scan of the local index, and no sequential scan
    assert ("Index Scan", "sbx_tasks_local_idx") in scans, scans
    assert not any(kind == "Seq Scan" for kind, _ in scans), scans
    assert claimed == ["b3"]  # the oldest task preferring h3 (3 % 8 == 3)
    print(f"claim at 1M queued: {elapsed * 1000:.1f} ms")


def test_an_idle_host_skips_the_tasks_bound_to_others_by_index(pg_dsn: str, tmp_path: Path, queue: PgQueue) -> None:
    """HOST-BOUND at scale: 200k READY tasks bound to 7 live hosts, none to h7; h7's claim must
    not walk them (the free index holds unbound tasks only)."""
    # a wait far beyond the test's run time: on a loaded machine inserting and analysing 200k rows
    # took over the default 30 s, and the sweep then rightly released a batch of them
    app_id = make_app(pg_dsn, tmp_path / "app", wait=3600)
    mid = queue.modules(app_id)["use"].id
    with connect(pg_dsn) as conn:
        conn.execute("""
            INSERT INTO sbx_tasks (app_id, module_id, body, to_host)
            SELECT %(app)s, %(mid)s, 'b' || i, 'h' || (i %% 7) FROM generate_series(1, 200000) AS i""",
                     {"app": app_id, "mid": mid})
        conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 'free')", (app_id, mid))
        conn.commit()
        conn.execute("ANALYZE sbx_tasks")
        scans = claim_scans(conn, app_id, mid, "h7")
    assert ("Index Scan", "sbx_tasks_free_idx") in scans, scans
    assert not any(kind == "Seq Scan" for kind, _ in scans), scans
    assert max(scans.values()) < 10, scans  # no bound task was read and filtered out
    start = time.perf_counter()
    assert claim(queue, app_id, mid, "h7", n=1) == ["free"]
    print(f"idle claim beside 200k bound tasks: {(time.perf_counter() - start) * 1000:.1f} ms")
    start = time.perf_counter()
    assert queue.recover_expired() == []  # the release sweep: 7 dead hosts ...
    print(f"release sweep over 200k bound tasks: {(time.perf_counter() - start) * 1000:.1f} ms")
    with connect(pg_dsn) as conn:  # ... but their tasks are within their locality wait
        assert conn.execute("SELECT count(*) AS n FROM sbx_tasks WHERE to_host IS NOT NULL").fetchone()["n"] == 200000  # type: ignore[index]


def test_an_idle_host_skips_the_tasks_waiting_for_other_hosts_by_index(
    pg_dsn: str, tmp_path: Path, queue: PgQueue,
) -> None:
    """Delay scheduling at scale: 200k READY tasks preferring 7 busy hosts, within their wait;
    h7's claim must not walk them, yet takes the free task and, first, one whose wait is over."""
    app_id = make_app(pg_dsn, tmp_path / "app")
    mid = queue.modules(app_id)["use"].id
    with connect(pg_dsn) as conn:
        with conn.transaction():
            conn.execute("ALTER TABLE sbx_tasks DISABLE TRIGGER sbx_tasks_locality")
            conn.execute("""
                INSERT INTO sbx_tasks (app_id, module_id, body, pref_host, pref_until)
                SELECT %(app)s, %(mid)s, 'b' || i, 'h' || (i %% 7), now() + interval '1 hour'
                FROM generate_series(1, 200000) AS i""", {"app": app_id, "mid": mid})
            conn.execute("""
                INSERT INTO sbx_tasks (app_id, module_id, body, pref_host, pref_until)
                VALUES (%(app)s, %(mid)s, 'waited', 'h1', now() - interval '1 second')""",
                         {"app": app_id, "mid": mid})
            conn.execute("ALTER TABLE sbx_tasks ENABLE TRIGGER sbx_tasks_locality")
        conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) VALUES (%s, %s, 'free')", (app_id, mid))
        conn.commit()
        conn.execute("ANALYZE sbx_tasks")
        scans = claim_scans(conn, app_id, mid, "h7")
    assert ("Index Scan", "sbx_tasks_waited_idx") in scans, scans
    assert not any(kind == "Seq Scan" for kind, _ in scans), scans
    assert max(scans.values()) < 10, scans  # no task within its wait was read and filtered out
    start = time.perf_counter()
    assert claim(queue, app_id, mid, "h7", n=1) == ["waited"]  # it has waited: before the free one
    print(f"idle claim beside 200k tasks waiting for other hosts: {(time.perf_counter() - start) * 1000:.1f} ms")
    with connect(pg_dsn) as conn:
        scans = claim_scans(conn, app_id, mid, "h7")
    assert ("Index Scan", "sbx_tasks_free_idx") in scans and max(scans.values()) < 10, scans
    assert claim(queue, app_id, mid, "h7", n=1) == ["free"]
    assert claim(queue, app_id, mid, "h7", n=1) == []


@pytest.mark.parametrize("queued_first", [False, True], ids=["launchers-first", "tasks-first"])
def test_launchers_pull_the_tasks_whose_inputs_they_hold(pg_dsn: str, tmp_path: Path, queued_first: bool) -> None:
    """tasks-first: queued before any holder is up (stage jobs still pending in Slurm); each
    launcher adopts the tasks whose inputs it holds when it starts."""
    app_id = make_app(pg_dsn, tmp_path / "app", run='echo "$HOST" > /dev/null; sleep 0.05\n')
    scratch = {h: tmp_path / f"scratch-{h}" for h in ("A", "B")}
    for i in range(40):
        host = "A" if i % 2 else "B"
        (scratch[host] / "d").mkdir(parents=True, exist_ok=True)
        (scratch[host] / "d" / f"f{i}").write_bytes(b"x" * (i + 1))
    messages = [Message(f"t{i}", headers={"inputs": [f"d/f{i}"]}) for i in range(40)]
    if queued_first:
        with connect(pg_dsn) as conn:
            apps.add_tasks(conn, app_id, "use", messages)
    threads = [threading.Thread(target=run_launcher, args=(pg_dsn, LauncherConfig(
        app_id=app_id, host=h, work_root=tmp_path / "work", local=True, local_scratch=scratch[h])))
        for h in ("A", "B")]
    for t in threads:
        t.start()
    queue = PgQueue(pg_dsn)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # both launchers up (their slots make the hosts live)
            with connect(pg_dsn) as conn:
                up = conn.execute("SELECT count(DISTINCT host) AS n FROM sbx_slots WHERE status = 'READY'").fetchone()
            if up and up["n"] == 2:
                break
            time.sleep(0.1)
        if not queued_first:
            with connect(pg_dsn) as conn:
                apps.add_tasks(conn, app_id, "use", messages)
    finally:
        queue.close()
    for t in threads:
        t.join(60)
    with connect(pg_dsn) as conn:
        rows = conn.execute("SELECT body, host, status, pref_host FROM sbx_tasks WHERE app_id = %s",
                            (app_id,)).fetchall()
    assert len(rows) == 40 and {r["status"] for r in rows} == {0}
    local = sum(r["host"] == ("A" if int(r["body"][1:]) % 2 else "B") for r in rows)
    print(f"{local} of 40 tasks ran on the host holding their input")
    # tasks-first: the first launcher up adopts the other's tasks for it (locality wait 30 s)
    assert local >= 38, f"only {local} of 40 tasks ran on the host holding their input"
