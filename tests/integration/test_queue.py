"""The queue on a real PostgreSQL: claim, SKIP LOCKED, hand-off atomicity, conflicts, EXPLAIN."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import LeaseLostError, PgQueue
from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.models import HAND_OFF_BUSY, Completion, Message, TaskResult, TaskStatus
from scalebox_hpc.pipeline import load_pipeline
from tests.helpers import write_app

pytestmark = pytest.mark.pg

PIPE = """
name: pipe
parameters:
  start_task: s0
modules:
  a:
    sink_modules: [b]
  b:
    sink_modules: [c]
    arguments:
      conflict_action: IGNORE
  c: {}
"""
SCRIPTS = {f"{m}/run.sh": "true\n" for m in "abc"}


@pytest.fixture
def app_id(pg_dsn: str, tmp_path: Path) -> int:
    spec = load_pipeline(write_app(tmp_path / "app", PIPE, SCRIPTS))
    with connect(pg_dsn) as conn:
        return apps.create_app(conn, spec)


def _result(status: int = 0, messages: list[Message] | None = None, finish: str | None = None) -> TaskResult:
    now = datetime.now(UTC)
    return TaskResult(status=status, started_at=now, finished_at=now, stdout="out", messages=messages or [],
                      finish_text=finish)


def _claim(q: PgQueue, app_id: int, module: str, slot_id: int, host: str = "h1", limit: int = 1) -> list:
    refs = q.modules(app_id)
    return q.claim(app_id, refs[module].id, host=host, slot_id=slot_id, slot_seq=0, limit=limit)


def _slot(q: PgQueue, app_id: int, module: str, host: str = "h1") -> int:
    return q.create_slot(q.modules(app_id)[module].id, host=host, seq=0, pid=1, work_dir="/tmp")


def test_create_app_inserts_start_task(pg_dsn: str, app_id: int) -> None:
    with connect(pg_dsn) as conn:
        tasks = apps.list_tasks(conn, app_id)
    assert [(t["module"], t["body"], t["status"]) for t in tasks] == [("a", "s0", -1)]


def test_claim_then_complete_hands_off_in_one_transaction(pg_dsn: str, app_id: int) -> None:
    q = PgQueue(pg_dsn)
    slot = _slot(q, app_id, "a")
    [task] = _claim(q, app_id, "a", slot)
    assert task.body == "s0" and task.attempts == 1
    assert _claim(q, app_id, "a", slot) == []  # nothing else READY
    refs = q.modules(app_id)
    n = q.complete(task, _result(messages=[Message("x1"), Message("x2", {"k": "v"})]), slot_id=slot, host="h1",
                   sender=refs["a"], modules=refs)
    assert n == 2
    with connect(pg_dsn) as conn:
        rows = apps.list_tasks(conn, app_id)
        execs = apps.get_task(conn, task.id)["execs"]
    assert {(r["module"], r["body"], r["status"]) for r in rows} == {("a", "s0", 0), ("b", "x1", -1), ("b", "x2", -1)}
    assert [e["status"] for e in execs] == [0] and execs[0]["stdout"] == "out"


def test_lost_lease_records_and_emits_nothing(pg_dsn: str, app_id: int) -> None:
    q = PgQueue(pg_dsn)
    slot = _slot(q, app_id, "a")
    [task] = _claim(q, app_id, "a", slot)
    q.release(slot)  # as if recovery had taken the task away
    refs = q.modules(app_id)
    with pytest.raises(LeaseLostError):
        q.complete(task, _result(messages=[Message("x1")]), slot_id=slot, host="h1", sender=refs["a"], modules=refs)
    with connect(pg_dsn) as conn:
        assert [r["body"] for r in apps.list_tasks(conn, app_id)] == ["s0"]
        assert apps.get_task(conn, task.id)["execs"] == []


def test_duplicate_emit_with_fail_marks_task_and_emits_nothing(pg_dsn: str, app_id: int) -> None:
    q = PgQueue(pg_dsn)
    slot = _slot(q, app_id, "a")
    [task] = _claim(q, app_id, "a", slot)
    refs = q.modules(app_id)
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "b", [Message("dup")])
    # b's conflict_action is IGNORE, so a duplicate to b is dropped quietly ...
    q.complete(task, _result(messages=[Message("dup"), Message("new")]), slot_id=slot, host="h1",
               sender=refs["a"], modules=refs)
    with connect(pg_dsn) as conn:
        assert sorted(r["body"] for r in apps.list_tasks(conn, app_id, module="b")) == ["dup", "new"]
    # ... while c (FAIL) rejects it: the sender becomes EMIT_FAILED and nothing is emitted
    slot_b = _slot(q, app_id, "b")
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "c", [Message("dup")])
    [tb] = _claim(q, app_id, "b", slot_b, limit=1)
    q.complete(tb, _result(messages=[Message("fresh"), Message("dup")]), slot_id=slot_b, host="h1",
               sender=refs["b"], modules=refs)
    with connect(pg_dsn) as conn:
        assert [r["body"] for r in apps.list_tasks(conn, app_id, module="c")] == ["dup"]
        got = apps.get_task(conn, tb.id)
    assert got["status"] == TaskStatus.EMIT_FAILED
    assert "CONFLICT_ACTION=FAIL" in got["execs"][0]["stderr"]


def test_unknown_sink_module_is_emit_failed(pg_dsn: str, app_id: int) -> None:
    q = PgQueue(pg_dsn)
    slot = _slot(q, app_id, "a")
    [task] = _claim(q, app_id, "a", slot)
    refs = q.modules(app_id)
    q.complete(task, _result(messages=[Message("x", module="nope")]), slot_id=slot, host="h1",
               sender=refs["a"], modules=refs)
    with connect(pg_dsn) as conn:
        assert apps.get_task(conn, task.id)["status"] == TaskStatus.EMIT_FAILED
        assert len(apps.list_tasks(conn, app_id)) == 1


def test_finish_text_is_committed_with_the_result(pg_dsn: str, app_id: int) -> None:
    q = PgQueue(pg_dsn)
    slot = _slot(q, app_id, "a")
    [task] = _claim(q, app_id, "a", slot)
    refs = q.modules(app_id)
    q.complete(task, _result(finish="Result is 42"), slot_id=slot, host="h1", sender=refs["a"], modules=refs)
    with connect(pg_dsn) as conn:
        row = apps.get_app(conn, app_id)
    assert (row["status"], row["result"]) == ("FINISHED", "Result is 42")
    assert _claim(q, app_id, "a", slot) == []


def test_paused_app_claims_nothing(pg_dsn: str, app_id: int) -> None:
    from scalebox_hpc.models import AppStatus

    q = PgQueue(pg_dsn)
    slot = _slot(q, app_id, "a")
    with connect(pg_dsn) as conn:
        apps.set_status(conn, app_id, AppStatus.PAUSED)
    assert _claim(q, app_id, "a", slot) == []
    with connect(pg_dsn) as conn:
        apps.set_status(conn, app_id, AppStatus.RUNNING)
    assert len(_claim(q, app_id, "a", slot)) == 1


def test_host_and_slot_bound_tasks(pg_dsn: str, app_id: int) -> None:
    q = PgQueue(pg_dsn)
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "b", [Message("h2-only", {"to_host": "h2"}), Message("slot1", {"to_slot": 1})])
    refs = q.modules(app_id)
    s1 = _slot(q, app_id, "b", "h1")
    got = q.claim(app_id, refs["b"].id, host="h1", slot_id=s1, slot_seq=0, limit=10)
    assert got == []
    got = q.claim(app_id, refs["b"].id, host="h2", slot_id=s1, slot_seq=1, limit=10)
    assert sorted(t.body for t in got) == ["h2-only", "slot1"]


def test_concurrent_claims_never_double_claim(pg_dsn: str, app_id: int) -> None:
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "c", [Message(f"m{i}") for i in range(300)])
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        q = PgQueue(pg_dsn)
        slot = _slot(q, app_id, "c", f"h{i}")
        while True:
            got = _claim(q, app_id, "c", slot, host=f"h{i}", limit=7)
            if not got:
                break
            with lock:
                claimed.extend(t.id for t in got)
        q.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 300 and len(set(claimed)) == 300


def test_claim_uses_the_free_index(pg_dsn: str, app_id: int) -> None:
    """With a realistic mix (most tasks finished, other modules busy) the claim is an index scan
    (of the unbound READY tasks: nothing here is HOST-BOUND)."""
    from scalebox_hpc.db.sql import query

    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "c", [Message(f"m{i}") for i in range(5000)])
        apps.add_tasks(conn, app_id, "b", [Message(f"m{i}") for i in range(5000)])
        with conn.transaction():
            conn.execute("UPDATE sbx_tasks SET status = 0 WHERE body LIKE 'm%' AND id % 50 <> 0")
        conn.execute("ANALYZE sbx_tasks")
        module_id = PgQueue(pg_dsn).modules(app_id)["c"].id
        params = {"app_id": app_id, "module_id": module_id, "host": "h1", "slot_ids": [None], "slot_seqs": [0],
                  "wants": [10], "limit": 10, "lease_seconds": 30}
        with psycopg.ClientCursor(conn) as cur:
            row = cur.execute("EXPLAIN (FORMAT JSON) " + query("claim_tasks"), params).fetchone()
        conn.rollback()
    nodes = list(_plan_nodes(row["QUERY PLAN"][0]["Plan"]))  # type: ignore[index]
    scans = {(n["Node Type"], n.get("Index Name")) for n in nodes if n.get("Relation Name") == "sbx_tasks"}
    assert ("Index Scan", "sbx_tasks_free_idx") in scans, scans
    assert not any(kind == "Seq Scan" for kind, _ in scans), scans


def _plan_nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def test_bad_bodies_are_rejected_before_anything_is_written(pg_dsn: str, app_id: int) -> None:
    with pytest.raises(InvalidMessageError, match="NUL"):
        Message("a\x00b")
    with pytest.raises(InvalidMessageError, match="limit"):
        Message("x" * (1024 * 1024))
    big = "y" * (100 * 1024)  # large but deliverable: stored, unique by digest
    with connect(pg_dsn) as conn:
        assert apps.add_tasks(conn, app_id, "c", [Message(big)]) == 1
        assert apps.list_tasks(conn, app_id, module="c")[0]["body"] == big


def test_database_error_names_dsn_without_password() -> None:
    from scalebox_hpc.errors import DatabaseError

    with pytest.raises(DatabaseError) as err:
        PgQueue("postgresql://bob:s3cret@127.0.0.1:9/nodb").app_activity(1)
    assert "s3cret" not in str(err.value) and "127.0.0.1:9/nodb" in str(err.value)


def test_dict_row_connection_smoke(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}


BOUND = """
name: bound
modules:
  src:
    sink_modules: [h, s]
  h:
    arguments: {task_dist_mode: HOST-BOUND}
  s:
    arguments: {task_dist_mode: SLOT-BOUND}
"""


def test_host_and_slot_bound_dispatch(pg_dsn: str, tmp_path: Path) -> None:
    from scalebox_hpc.db.queue import headers_for

    spec = load_pipeline(write_app(tmp_path / "b", BOUND, {f"{m}/run.sh": "true\n" for m in ("src", "h", "s")}))
    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, spec)
        apps.add_tasks(conn, app_id, "src", [Message("go")])
    q = PgQueue(pg_dsn)
    refs = q.modules(app_id)
    assert refs["h"].dist_mode == "HOST-BOUND"
    slot = q.create_slot(refs["src"].id, host="n7", seq=3, pid=1, work_dir="/tmp")
    [task] = q.claim(app_id, refs["src"].id, host="n7", slot_id=slot, slot_seq=3)
    hdr = headers_for({}, from_module="src", from_host="n7", from_slot=3)
    pinned = headers_for({"to_host": "n9"}, from_module="src", from_host="n7", from_slot=3)
    q.complete(task, _result(messages=[Message("x", hdr, "h"), Message("y", hdr, "s"), Message("z", pinned, "h")]),
               slot_id=slot, host="n7", sender=refs["src"], modules=refs)
    with connect(pg_dsn) as conn:
        rows = {r["body"]: r for r in conn.execute(
            "SELECT body, to_host, to_slot FROM sbx_tasks WHERE app_id = %s", (app_id,)).fetchall()}
    assert (rows["x"]["to_host"], rows["x"]["to_slot"]) == ("n7", None)
    assert (rows["y"]["to_host"], rows["y"]["to_slot"]) == ("n7", 3)
    assert rows["z"]["to_host"] == "n9"  # an explicit to_host wins
    other = q.create_slot(refs["h"].id, host="n8", seq=0, pid=1, work_dir="/tmp")
    assert q.claim(app_id, refs["h"].id, host="n8", slot_id=other, slot_seq=0, limit=5) == []
    q.close()


GRAPH = """
name: graph
modules:
  a:
    sink_modules: [b, x]
  b:
    sink_modules: [c]
  c:
    sink_modules: [b]
  x: {}
  lone: {}
"""


def test_module_activity_follows_upstream_modules_only(pg_dsn: str, tmp_path: Path) -> None:
    """a -> b <-> c (a cycle), a -> x, and lone: a module is active while it or a module upstream
    of it (transitively) has READY or RUNNING tasks; downstream and unrelated work does not count."""
    spec = load_pipeline(write_app(tmp_path / "g", GRAPH, {f"{m}/run.sh": "true\n" for m in ("a", "b", "c", "x",
                                                                                              "lone")}))
    with connect(pg_dsn) as conn:
        app = apps.create_app(conn, spec)
    q = PgQueue(pg_dsn)
    try:
        ids = {name: ref.id for name, ref in q.modules(app).items()}

        def active() -> dict[str, bool]:
            out = {}
            for name, module_id in ids.items():
                status, on = q.module_activity(app, module_id)
                assert status == "RUNNING"
                out[name] = on
            return out

        assert active() == dict.fromkeys(ids, False)
        with connect(pg_dsn) as conn:  # work for c only: c and b (its upstream, through the cycle)
            apps.add_tasks(conn, app, "c", [Message("c1")])
        assert active() == {"a": False, "b": True, "c": True, "x": False, "lone": False}
        with connect(pg_dsn) as conn:  # work for a: everything downstream of a, not lone
            apps.add_tasks(conn, app, "a", [Message("a1")])
        assert active() == {"a": True, "b": True, "c": True, "x": True, "lone": False}
        slot = _slot(q, app, "a")
        [task] = _claim(q, app, "a", slot)  # RUNNING counts as READY does
        assert active()["x"] is True
        q.complete(task, _result(), slot_id=slot, host="h1", sender=q.modules(app)["a"], modules=q.modules(app))
        with connect(pg_dsn) as conn:
            conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s", (app,))
        assert active() == dict.fromkeys(ids, False)
        assert q.app_activity(app) == ("RUNNING", False)
    finally:
        q.close()


def _slots(q: PgQueue, app_id: int, module: str, n: int, host: str = "h1") -> list[int]:
    mid = q.modules(app_id)[module].id
    return [q.create_slot(mid, host=host, seq=seq, pid=1, work_dir="/tmp") for seq in range(n)]


def test_one_claim_deals_tasks_to_several_slots(pg_dsn: str, app_id: int) -> None:
    """The dispatcher's batched claim: every slot gets its first task before any gets a second,
    oldest first; a task addressed to a slot's seq goes to that slot whatever its want."""
    from scalebox_hpc.models import SlotWant

    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "b", [Message("for-seq-2", {"to_slot": 2})])
        apps.add_tasks(conn, app_id, "b", [Message(f"t{i}") for i in range(6)])
    q = PgQueue(pg_dsn)
    s0, s1, s2 = _slots(q, app_id, "b", 3)
    mid = q.modules(app_id)["b"].id
    got = q.claim_for_slots(app_id, mid, host="h1", lease_seconds=30,
                            slots=[SlotWant(s0, 0, 2), SlotWant(s1, 1, 1), SlotWant(s2, 2, 1)])
    bodies = {slot: [t.body for t in tasks] for slot, tasks in got.items()}
    # 4 seats, oldest first: for-seq-2 is its slot's; t0..t2 are dealt s0, s1, s2
    assert bodies == {s0: ["t0"], s1: ["t1"], s2: ["for-seq-2", "t2"]} or bodies == {
        s0: ["t0"], s1: ["t1"], s2: ["t2", "for-seq-2"]}
    got = q.claim_for_slots(app_id, mid, host="h1", slots=[SlotWant(s0, 0, 2)])
    assert [t.body for t in got[s0]] == ["t3", "t4"]
    bodies[s0] += ["t3", "t4"]
    with connect(pg_dsn) as conn:
        owners = conn.execute("SELECT body, slot_id FROM sbx_tasks WHERE status = -3").fetchall()
    assert {r["body"]: r["slot_id"] for r in owners} == {b: s for s, bs in bodies.items() for b in bs}


def test_batched_claim_takes_one_semaphore_unit_per_task(pg_dsn: str, app_id: int) -> None:
    from scalebox_hpc.models import SlotWant

    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "b", [Message(f"t{i}") for i in range(3)])
        apps.semaphore_create(conn, app_id, "gpu", 2)
        conn.commit()
    q = PgQueue(pg_dsn)
    s0, s1, s2 = _slots(q, app_id, "b", 3)
    mid = q.modules(app_id)["b"].id
    wants = [SlotWant(s0, 0, 1), SlotWant(s1, 1, 1), SlotWant(s2, 2, 1)]
    got = q.claim_for_slots(app_id, mid, host="h1", slots=wants, semaphore="gpu")
    assert sum(len(v) for v in got.values()) == 2
    assert q.claim_for_slots(app_id, mid, host="h1", slots=wants, semaphore="gpu") == {}
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_semaphores SET value = 5 WHERE app_id = %s", (app_id,))
        conn.commit()
    got = q.claim_for_slots(app_id, mid, host="h1", slots=wants, semaphore="gpu")
    assert sum(len(v) for v in got.values()) == 1  # one task was left: 4 units go back
    with connect(pg_dsn) as conn:
        [row] = conn.execute("SELECT value FROM sbx_semaphores WHERE app_id = %s", (app_id,)).fetchall()
    assert row["value"] == 4


def test_one_heartbeat_statement_renews_every_slot_and_releases_strays(pg_dsn: str, app_id: int) -> None:
    from scalebox_hpc.models import Beat

    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "b", [Message(f"t{i}") for i in range(3)])
    q = PgQueue(pg_dsn)
    s0, s1 = _slots(q, app_id, "b", 2)
    [t0] = _claim(q, app_id, "b", s0)
    [t1, t2] = _claim(q, app_id, "b", s1, limit=2)
    with connect(pg_dsn) as conn:  # t2's claim reply was "lost" over a lease ago
        conn.execute("UPDATE sbx_tasks SET started_at = now() - interval '1 hour', "
                     "lease_expires_at = now() WHERE id = ANY(%s)", ([t0.id, t1.id, t2.id],))
        conn.commit()
    released = q.heartbeat_slots([Beat(s0, "RUNNING", 60.0, (t0.id,)), Beat(s1, "RUNNING", 60.0, (t1.id,))])
    assert released == [t2.id]
    with connect(pg_dsn) as conn:
        rows = {r["id"]: r["status"] for r in conn.execute(
            "SELECT id, status FROM sbx_tasks WHERE id = ANY(%s)", ([t0.id, t1.id, t2.id],)).fetchall()}
        slots = conn.execute("SELECT status, lease_expires_at > now() + interval '50 s' AS fresh "
                             "FROM sbx_slots WHERE id = ANY(%s)", ([s0, s1],)).fetchall()
    assert rows == {t0.id: -3, t1.id: -3, t2.id: -1}
    assert slots == [{"status": "RUNNING", "fresh": True}] * 2  # (0033) the slots' leases: their tasks'


def test_a_beat_writes_no_task_row_and_its_slots_row_is_a_hot_update(pg_dsn: str, app_id: int) -> None:
    """0033: a beat renews its slots' leases, which are their tasks' leases: no row of sbx_tasks
    is written (before: one row version and one row lock per task a node held, every half
    heartbeat: 10-18 of 20 server connections renewing at once at 100 emulated nodes), and the
    slot's own row changes no indexed column (0032), so it is a heap-only tuple. A stray (a
    task its slot does not name, claimed over a lease ago) is the one task row written."""
    import json

    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "b", [Message(f"t{i}") for i in range(5)])
    q = PgQueue(pg_dsn)
    [slot] = _slots(q, app_id, "b", 1)
    tasks = _claim(q, app_id, "b", slot, limit=5)

    def beat(task_ids: list[int]) -> tuple[dict, dict]:
        beats = [{"slot_id": slot, "status": "RUNNING", "lease_seconds": 60.0, "task_ids": task_ids,
                  "waiting": None, "output": None}]
        with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
            [row] = conn.execute("SELECT renewed, released FROM sbx_l_heartbeat_slots_v1(%s::jsonb)",
                                 (json.dumps(beats),)).fetchall()
            counts = conn.execute(
                "SELECT pg_stat_get_xact_tuples_updated('sbx_tasks'::regclass) AS tasks, "
                "pg_stat_get_xact_tuples_updated('sbx_slots'::regclass) AS slots, "
                "pg_stat_get_xact_tuples_hot_updated('sbx_slots'::regclass) AS slots_hot").fetchone()
        return row, counts

    first = beat([t.id for t in tasks])  # STARTING -> RUNNING: an indexed column changes once
    assert first[0] == {"renewed": 5, "released": []} and first[1]["tasks"] == 0
    assert beat([t.id for t in tasks]) == ({"renewed": 5, "released": []}, {"tasks": 0, "slots": 1, "slots_hot": 1})
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_tasks SET started_at = now() - interval '1 hour' WHERE id = %s", (tasks[4].id,))
        conn.commit()
    assert beat([t.id for t in tasks[:4]]) == ({"renewed": 4, "released": [tasks[4].id]},
                                               {"tasks": 1, "slots": 1, "slots_hot": 1})
    q.close()


def _nested_plans(conn: psycopg.Connection, sql_text: str, params: tuple) -> str:
    """The plans of every statement ``sql_text`` runs, functions' statements included (auto_explain
    sent to this client as notices)."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                    "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_level = notice"):
        conn.execute(setting)
    conn.execute(sql_text, params)
    return "\n".join(notices)


_TASK_SCAN = re.compile(r"(Seq Scan|Index Scan|Index Only Scan|Bitmap Heap Scan|Bitmap Index Scan)"
                        r"(?: Backward)?(?: using (\S+))? on (sbx_tasks\S*)")


def _task_scans(plans: str) -> list[str]:
    """Each scan of sbx_tasks (or one of its indexes) in ``plans``: the index used, else the scan."""
    return [using or (on if on != "sbx_tasks" else kind) for kind, using, on in _TASK_SCAN.findall(plans)]


@pytest.mark.parametrize("statistics", ["mostly done", "all ready", "tiny table", "none yet"])
def test_hand_off_finds_its_task_by_primary_key_however_many_run(pg_dsn: str, app_id: int, statistics: str) -> None:
    """0024/0027: whatever the statistics when the session planned it (generic plans), the hand-off's
    UPDATE looks each task up by primary key. Not from the partial index of RUNNING tasks, nor by
    a scan of (app, module, status) with RUNNING as a parameter (0024 until 0027: every item was
    then matched against every running task, 124,750 comparisons for a batch of 500, 30 ms), nor
    by a sequential scan (a plan made while the table was tiny, kept as it grows); and the app
    check reads no whole table. Through the launcher function, as the dispatcher calls it, and the
    one-task hand-off."""
    q = PgQueue(pg_dsn)
    n = {"mostly done": 3000, "all ready": 3000, "tiny table": 12, "none yet": 3000}[statistics]
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "c", [Message(f"m{i}") for i in range(n)])
        if statistics == "mostly done":
            conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s AND id %% 10 <> 0", (app_id,))
        conn.commit()
        if statistics != "none yet":  # else as in a fresh database before autovacuum's first ANALYZE
            conn.execute("ANALYZE sbx_tasks")
            conn.commit()
    slot = _slot(q, app_id, "c")
    running = _claim(q, app_id, "c", slot, limit=min(300, n))
    assert len(running) == min(300, n)
    now = datetime.now(UTC).isoformat()
    rows = [{"ord": i, "task_id": t.id, "slot_id": slot, "attempt": t.attempts, "status": 0, "requeue": False,
             "exec": {"host": "h1", "started_at": now, "finished_at": now}, "messages": []}
            for i, t in enumerate(running[:3])]
    one = running[3]
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        batch = _nested_plans(conn, "SELECT * FROM sbx_l_complete_tasks_v1(%s::jsonb)",
                              (psycopg.types.json.Jsonb(rows),))
        single = _nested_plans(conn, "SELECT sbx_complete_task_v2(%s, %s, %s, 0, false, %s::jsonb, '[]', NULL)",
                               (one.id, slot, one.attempts, psycopg.types.json.Jsonb(rows[0]["exec"])))
        done = conn.execute("SELECT count(*) AS n FROM sbx_tasks WHERE app_id = %s AND status = 0 AND id = ANY(%s)",
                            (app_id, [t.id for t in running[:4]])).fetchone()
    q.close()
    for plans in (batch, single):
        assert "Update on sbx_tasks" in plans, plans
        scans = _task_scans(plans)
        # the one-task hand-off is planned per call (a custom plan), so a 12-row table is
        # rightly read whole; the batch's generic plan is kept by the session as the table grows
        allowed = {"sbx_tasks_pkey", "Seq Scan"} if plans is single and statistics == "tiny table" \
            else {"sbx_tasks_pkey"}
        assert scans and set(scans) <= allowed and "sbx_tasks_pkey" in scans, (scans, plans)
    assert done is not None and done["n"] == 4


_SCANNED = re.compile(r"on (sbx_tasks\S*) .*?\(actual [^)]*rows=(\d+) loops=(\d+)\)(?:\n\s+\S.*?)*?"
                      r"(?:\n\s+Rows Removed by Filter: (\d+))?", re.MULTILINE)


def test_plans_made_while_the_table_was_small_stay_per_task_when_it_grows(pg_dsn: str, app_id: int) -> None:
    """0027: the claim and the hand-off keep their generic plans for the session (0022). Made while
    a new app had a dozen tasks, they read the whole table per call once it had grown, until the
    next ANALYZE (at 300,000 tasks: 200 ms per claim, 70 ms per hand-off). Now, in the same session
    after the table grew tenfold (no ANALYZE), each reads the rows of its tasks only."""
    with connect(pg_dsn) as conn:
        conn.execute("ALTER TABLE sbx_tasks SET (autovacuum_enabled = false)")  # no ANALYZE meanwhile
        apps.add_tasks(conn, app_id, "c", [Message(f"s{i}") for i in range(12)])
        conn.commit()
    q = PgQueue(pg_dsn)
    slot = _slot(q, app_id, "c")
    refs = q.modules(app_id)

    def cycle() -> None:
        [task] = q.claim(app_id, refs["c"].id, host="h1", slot_id=slot, slot_seq=0, limit=1)
        q.complete_many([Completion(task, _result(), "h1")], slot_id=slot, sender=refs["c"], modules=refs)

    for _ in range(6):  # past PL/pgSQL's custom plans: the generic ones are made and kept
        cycle()
    with connect(pg_dsn) as conn:
        conn.execute("INSERT INTO sbx_tasks (app_id, module_id, body) SELECT %s, %s, 'g' || g "
                     "FROM generate_series(1, 20000) g", (app_id, refs["c"].id))
        conn.commit()
    notices: list[str] = []
    q.conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0", "SET auto_explain.log_analyze = on",
                    "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_level = notice"):
        q.conn.execute(setting)
    cycle()
    q.close()
    plans = "\n".join(notices)
    assert "Update on sbx_tasks" in plans
    read = [(index, int(rows) * int(loops) + int(removed or 0))
            for index, rows, loops, removed in _SCANNED.findall(plans)]
    assert read and max(n for _, n in read) < 1000, read


def test_heartbeat_hand_off_and_release_skip_a_task_another_transaction_holds(pg_dsn: str, app_id: int) -> None:
    """0029: the node's heartbeat, hand-off and release never wait for a task row another
    transaction holds (measured: a heartbeat 18 s behind another node's claim, while the node's
    other leases expired); the node's other tasks are renewed, recorded, released. The held
    task's hand-off is answered busy (0030: the holder may not be taking it), nothing recorded;
    tried again once the holder is done, it is recorded."""
    from scalebox_hpc.models import Beat

    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "b", [Message(f"t{i}") for i in range(3)])
    # a wait for the lock fails this session at once instead of hanging the test
    q = PgQueue(psycopg.conninfo.make_conninfo(pg_dsn, options="-c lock_timeout=2000"))
    refs = q.modules(app_id)
    slot = _slot(q, app_id, "b")
    held, mine, third = _claim(q, app_id, "b", slot, limit=3)
    with psycopg.connect(pg_dsn) as other:  # as a recoverer would, in its transaction
        other.execute("UPDATE sbx_tasks SET lease_expires_at = lease_expires_at WHERE id = %s", (held.id,))
        old = other.execute("SELECT lease_expires_at FROM sbx_tasks WHERE id = %s", (held.id,)).fetchone()
        assert q.heartbeat_slots([Beat(slot, "RUNNING", 600.0, (held.id, mine.id, third.id))]) == []
        assert q.heartbeat(slot, status="RUNNING", lease_seconds=600.0, task_ids=[held.id, mine.id, third.id]) == []
        written = q.complete_many([Completion(held, _result(), "h1"), Completion(mine, _result(), "h1")],
                                  slot_id=slot, sender=refs["b"], modules=refs)
        assert written == [HAND_OFF_BUSY, 0]  # nothing recorded for the held task yet
        released = q.release(slot)
        assert released == 1 and released.busy == (held.id,)  # the third; the held one is told apart
        other.rollback()
    assert q.complete_many([Completion(held, _result(), "h1")], slot_id=slot, sender=refs["b"], modules=refs) == [0]
    with connect(pg_dsn) as conn:
        rows = {r["id"]: r for r in conn.execute(
            "SELECT id, status, lease_expires_at, lease_expires_at > now() + interval '500 s' AS fresh "
            "FROM sbx_tasks WHERE id = ANY(%s)", ([held.id, mine.id, third.id],)).fetchall()}
        execs = conn.execute("SELECT task_id FROM sbx_task_execs WHERE task_id = ANY(%s)",
                             ([held.id, mine.id],)).fetchall()
    assert rows[held.id]["status"] == 0 and old is not None
    assert rows[mine.id]["status"] == 0 and rows[third.id]["status"] == -1
    assert sorted(e["task_id"] for e in execs) == sorted([held.id, mine.id])
    q.close()


_SLOW_SCAN = ("SELECT id FROM sbx_tasks t WHERE module_id = %s AND status = -1 AND pg_sleep(0.5) IS NOT NULL {recheck}"
              "ORDER BY id FOR UPDATE SKIP LOCKED")
"""Another node's claim, slow as a saturated node's is: its snapshot is taken at once, its rows
are looked at 0.5 s later. ``{recheck}``: the claim's candidate filter since 0030, or nothing."""
_RECHECK = "AND (t.xmax = '0'::xid OR sbx_task_still_ready_v1(t.id)) "


def _hand_off_beside_a_slow_claim(pg_dsn: str, app_id: int, recheck: str) -> tuple[list[int | None], int]:
    """One task: a slow claim statement starts, this slot claims the task meanwhile, and hands it
    off while that statement's transaction is still open. Returns the hand-off's answer and the
    task's id (the other statement's transaction ended, the slot still holding the task)."""
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "b", [Message("looked-at")])
    q = PgQueue(pg_dsn)
    refs = q.modules(app_id)
    slot = _slot(q, app_id, "b")
    started, scanned, done = threading.Event(), threading.Event(), threading.Event()
    took: list[int] = []

    def other_claim() -> None:
        with psycopg.connect(pg_dsn) as other:
            started.set()
            took.extend(r[0] for r in other.execute(_SLOW_SCAN.format(recheck=recheck), (refs["b"].id,)).fetchall())
            scanned.set()
            done.wait(20)

    thread = threading.Thread(target=other_claim)
    thread.start()
    assert started.wait(10)
    with connect(pg_dsn) as conn:  # the other statement is running (and sleeping) before the claim
        for _ in range(100):
            if conn.execute("SELECT 1 FROM pg_stat_activity WHERE query LIKE %s AND state = 'active'",
                            ("%pg_sleep(0.5)%FOR UPDATE SKIP LOCKED",)).fetchone():
                break
            threading.Event().wait(0.02)
    [task] = _claim(q, app_id, "b", slot)
    assert scanned.wait(20) and took == []  # it took nothing
    try:
        first = q.complete_many([Completion(task, _result(), "h1")], slot_id=slot, sender=refs["b"], modules=refs)
    finally:
        done.set()
        thread.join(20)
    if first == [HAND_OFF_BUSY]:
        assert q.complete_many([Completion(task, _result(), "h1")], slot_id=slot, sender=refs["b"],
                               modules=refs) == [0]
    with connect(pg_dsn) as conn:
        row = conn.execute("SELECT status FROM sbx_tasks WHERE id = %s", (task.id,)).fetchone()
        execs = conn.execute("SELECT status FROM sbx_task_execs WHERE task_id = %s", (task.id,)).fetchall()
    assert row["status"] == 0 and [e["status"] for e in execs] == [0]
    q.close()
    return first, task.id


def test_a_claim_that_only_looked_at_a_running_task_does_not_cost_its_owner_the_result(
        pg_dsn: str, app_id: int) -> None:
    """0030: a claim statement whose snapshot predates this slot's claim finds the task READY
    there; without a second look it locks the row's newest version (RUNNING), its recheck leaves
    the row out, and the lock stays until its transaction ends. 0029's hand-off skipped such a
    row as taken and discarded the result (the task then ran again after its lease expired: 1 %
    of 10 emulated nodes' results); now it is answered busy, and recorded when tried again."""
    first, _ = _hand_off_beside_a_slow_claim(pg_dsn, app_id, recheck="")
    assert first == [HAND_OFF_BUSY]


def test_the_claims_second_look_leaves_a_task_claimed_meanwhile_unlocked(pg_dsn: str, app_id: int) -> None:
    """0030: the claim's candidates whose row changed since its snapshot are looked at again in a
    fresh one (sbx_task_still_ready_v1) before they are locked: the slow claim leaves the task
    another slot claimed meanwhile alone, and that slot's hand-off is recorded at once. The
    claim statement carries the filter in each of its three candidate scans."""
    first, _ = _hand_off_beside_a_slow_claim(pg_dsn, app_id, recheck=_RECHECK)
    assert first == [0]
    from scalebox_hpc.db.sql import query

    assert query("claim_tasks").count(_RECHECK.strip()) == 3


def test_the_heartbeat_reads_its_slots_tasks_only(pg_dsn: str, app_id: int) -> None:
    """0029: the node's heartbeat finds each slot's RUNNING tasks by sbx_tasks_slot_idx; it read
    every RUNNING task of every node per beat (a sequential scan, O(fleet) per node and beat)."""

    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "c", [Message(f"h{i}") for i in range(3000)])
        conn.commit()
        conn.execute("ANALYZE sbx_tasks")
        conn.commit()
    q = PgQueue(pg_dsn)
    s0, s1 = _slots(q, app_id, "c", 2)
    ours = _claim(q, app_id, "c", s0, limit=5)
    _claim(q, app_id, "c", s1, limit=2000)  # the rest of the fleet's running tasks
    beats = [{"slot_id": s0, "status": "RUNNING", "lease_seconds": 60.0, "task_ids": [t.id for t in ours],
              "waiting": None, "output": None}]
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        plans = _nested_plans(conn, "SELECT * FROM sbx_l_heartbeat_slots_v1(%s::jsonb)",
                              (psycopg.types.json.Jsonb(beats),))
    q.close()
    scans = _task_scans(plans)
    assert "sbx_tasks_slot_idx" in scans and set(scans) <= {"sbx_tasks_slot_idx", "sbx_tasks_pkey"}, (scans, plans)
    # (0032) and its slots by primary key: it hashed a sequential scan of sbx_slots (the fleet's
    # slots and their dead versions) in most beats at 200 emulated nodes
    assert "Seq Scan on sbx_slots" not in plans and "sbx_slots_pkey" in plans, plans


@pytest.mark.parametrize("analyzed", ["before the claims", "after the claims"])
def test_the_recovery_reads_the_running_tasks_of_its_apps_only(pg_dsn: str, app_id: int, analyzed: str) -> None:
    """0032: without the lease index the recovery reads RUNNING tasks only: by sbx_tasks_slot_idx
    or module by module with every column of (app_id, module_id, status) bound; never every task
    of the app (app_id alone bound: the planner's choice in the fleet, 200,000 index entries a
    call), nor a sequential scan."""
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "c", [Message(f"r{i}") for i in range(3000)])
        conn.commit()
        conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s AND id %% 10 <> 0", (app_id,))
        conn.commit()
    q = PgQueue(pg_dsn)
    [slot] = _slots(q, app_id, "c", 1)
    if analyzed == "before the claims":
        _analyze(pg_dsn)
    _claim(q, app_id, "c", slot, limit=250)
    if analyzed == "after the claims":
        _analyze(pg_dsn)
    q.close()
    with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
        plans = _nested_plans(conn, "SELECT * FROM sbx_l_recover_v2(0, 1000)", ())
    scans = _task_scans(plans)
    assert scans and "Seq Scan" not in scans, (scans, plans)
    conds = re.findall(r"Index (?:Only )?Scan using sbx_tasks_app_status_idx on sbx_tasks \w+ .*\n\s+Index Cond: (.*)",
                       plans)
    assert scans.count("sbx_tasks_app_status_idx") == len(conds), (scans, plans)
    assert all("module_id =" in c and "status =" in c for c in conds), (conds, plans)


def _analyze(dsn: str) -> None:
    with connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE sbx_tasks")


def test_claims_of_one_module_take_turns_and_the_next_starts_past_the_last(pg_dsn: str, app_id: int) -> None:
    """0032: a module's claims run one at a time (an advisory lock for the claim's transaction):
    the second waits for the first to commit, costs no CPU meanwhile, and its snapshot is taken
    after it, so it finds the first one's tasks taken without looking at them. Another module's
    claim does not wait."""
    from scalebox_hpc.db.sql import query

    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "b", [Message(f"b{i}") for i in range(4)])
        apps.add_tasks(conn, app_id, "c", [Message("c0")])
    q = PgQueue(pg_dsn)
    refs = q.modules(app_id)
    sb, sc = _slot(q, app_id, "b"), _slot(q, app_id, "c")
    q.close()

    def params(module: str, slot: int) -> dict:
        return {"app_id": app_id, "module_id": refs[module].id, "host": "h1", "slot_ids": [slot], "slot_seqs": [0],
                "wants": [2], "limit": 2, "lease_seconds": 30}

    got: dict[str, list[str]] = {}
    with psycopg.connect(pg_dsn, row_factory=dict_row) as first:
        first_bodies = [r["body"] for r in first.execute(query("claim"), params("b", sb)).fetchall()]
        with psycopg.connect(pg_dsn, row_factory=dict_row, autocommit=True) as other:  # another module: at once
            assert [r["body"] for r in other.execute(query("claim"), params("c", sc)).fetchall()] == ["c0"]

        def second() -> None:
            with psycopg.connect(pg_dsn, row_factory=dict_row, autocommit=True) as conn:
                got["b"] = [r["body"] for r in conn.execute(query("claim"), params("b", sb)).fetchall()]

        t = threading.Thread(target=second)
        t.start()
        waited = False
        with psycopg.connect(pg_dsn, autocommit=True) as probe:
            for _ in range(100):
                if probe.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                                 ).fetchone()[0]:  # type: ignore[index]
                    waited = True
                    break
                threading.Event().wait(0.05)
        assert waited and "b" not in got, (got, first_bodies)  # the second waits for the first to commit
        first.commit()
        t.join(10)
    assert first_bodies == ["b0", "b1"] and got["b"] == ["b2", "b3"]
