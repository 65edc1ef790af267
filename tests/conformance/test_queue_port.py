"""The queue port, held to one behaviour: PgQueue (PostgreSQL) and InMemoryQueue (scalebox_hpc.testing)
expose the same methods and pass the same scenarios (pgqueuer's test_port_conformance.py)."""

from __future__ import annotations

import inspect
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.errors import NotFoundError, ScaleboxError
from scalebox_hpc.launcher.ports import BatchQueue, TaskQueue
from scalebox_hpc.models import (
    AppStatus,
    Beat,
    Completion,
    LeaseLostError,
    Message,
    SlotWant,
    Task,
    TaskResult,
    TaskStatus,
    Usage,
    headers_for,
)
from scalebox_hpc.pipeline import AppSpec, load_pipeline
from scalebox_hpc.testing import InMemoryQueue
from tests.conformance.backends import Backend
from tests.helpers import write_app

PIPE = """
name: pipe
modules:
  a:
    sink_modules: [b, c]
  b:
    sink_modules: [c]
    arguments: {conflict_action: IGNORE}
  c: {}
  o:
    arguments: {conflict_action: OVERWRITE}
"""


# -- (a) the same methods, the same signatures ------------------------------------------------
def _port_members() -> list[str]:
    own = set(vars(TaskQueue)) | set(vars(BatchQueue))
    return sorted(n for n in own if not n.startswith("_") and callable(getattr(BatchQueue, n)))


def test_both_backends_expose_every_port_method_with_the_ports_signature() -> None:
    members = _port_members()
    assert {"claim", "claim_for_slots", "complete", "complete_many", "release_ids", "heartbeat_slots"} <= set(members)
    for name in members:
        port = inspect.signature(getattr(BatchQueue, name))
        pg = inspect.signature(getattr(PgQueue, name))
        mem = inspect.signature(getattr(InMemoryQueue, name))
        assert str(pg) == str(mem), f"{name}: PgQueue{pg} vs InMemoryQueue{mem}"
        # the port's own annotation: names, kinds and defaults agree (`...` stands for a default)
        for ours in (pg, mem):
            assert list(ours.parameters) == list(port.parameters), name
            for p, q in zip(ours.parameters.values(), port.parameters.values(), strict=True):
                assert p.kind == q.kind, (name, p.name)
                assert (p.default is inspect.Parameter.empty) == (q.default is inspect.Parameter.empty), (name, p.name)
                if q.default is not Ellipsis:
                    assert p.default == q.default, (name, p.name)
            assert ours.return_annotation == port.return_annotation, name


# -- helpers ----------------------------------------------------------------------------------
def _spec(tmp_path: Path, text: str) -> AppSpec:
    names = list(yaml.safe_load(text)["modules"])
    root = tmp_path / f"app{len(list(tmp_path.glob('app*')))}"
    return load_pipeline(write_app(root, text, {f"{m}/run.sh": "true\n" for m in names}))


@pytest.fixture
def app(queue_backend: Backend, tmp_path: Path) -> int:
    return queue_backend.create_app(_spec(tmp_path, PIPE))


def _result(status: int = 0, messages: list[Message] | None = None, finish: str | None = None) -> TaskResult:
    now = datetime.now(UTC)
    return TaskResult(status=status, started_at=now, finished_at=now, stdout="out", stderr="err",
                      messages=messages or [], finish_text=finish)


def _mid(b: Backend, app: int, module: str) -> int:
    return b.queue.modules(app)[module].id


def _slot(b: Backend, app: int, module: str, host: str = "h1", seq: int = 0, hb: float = 10.0) -> int:
    return b.queue.create_slot(_mid(b, app, module), host=host, seq=seq, pid=1, work_dir="/tmp", heartbeat_seconds=hb)


def _claim(b: Backend, app: int, module: str, slot: int, *, host: str = "h1", seq: int = 0, limit: int = 1,
           lease: float = 30.0, semaphore: str | None = None) -> list[Task]:
    return b.queue.claim(app, _mid(b, app, module), host=host, slot_id=slot, slot_seq=seq, limit=limit,
                         lease_seconds=lease, semaphore=semaphore)


def _complete(b: Backend, app: int, task: Task, slot: int, result: TaskResult, *, host: str = "h1",
              requeue: bool = False) -> int:
    refs = b.queue.modules(app)
    sender = next(r for r in refs.values() if r.id == task.module_id)
    return b.queue.complete(task, result, slot_id=slot, host=host, sender=sender, modules=refs, requeue=requeue)


def _bodies(b: Backend, app: int, module: str | None = None) -> dict[str, int]:
    return {r["body"]: r["status"] for r in b.tasks(app, module)}


def _row(b: Backend, app: int, task_id: int) -> dict[str, Any]:
    return next(r for r in b.tasks(app) if r["id"] == task_id)


# -- (b) claims ---------------------------------------------------------------------------------
def test_create_app_inserts_the_start_task(queue_backend: Backend, tmp_path: Path) -> None:
    b = queue_backend
    app = b.create_app(_spec(tmp_path, PIPE.replace("name: pipe", "name: s\nparameters: {start_task: s0}")))
    assert [(r["module"], r["body"], r["status"]) for r in b.tasks(app)] == [("a", "s0", -1)]


def test_claim_takes_the_oldest_ready_tasks_and_leases_them(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    assert b.add_tasks(app, "c", [f"t{i}" for i in range(4)]) == 4
    slot = _slot(b, app, "c", "h1")
    got = _claim(b, app, "c", slot, limit=2)
    assert [(t.body, t.attempts, t.status) for t in got] == [("t0", 1, -3), ("t1", 1, -3)]
    rows = {r["body"]: r for r in b.tasks(app)}
    assert (rows["t0"]["slot_id"], rows["t0"]["host"], rows["t0"]["lease_expires_at_set"]) == (slot, "h1", True)
    assert rows["t2"]["status"] == -1 and not rows["t2"]["lease_expires_at_set"]
    assert [t.body for t in _claim(b, app, "c", slot, limit=5)] == ["t2", "t3"]
    assert _claim(b, app, "c", slot) == []


def test_claim_takes_only_its_modules_ready_tasks(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "b", ["for-b"])
    b.add_tasks(app, "c", ["waits"], initial=True)
    slot = _slot(b, app, "c")
    assert _claim(b, app, "c", slot, limit=5) == []
    assert _bodies(b, app) == {"for-b": -1, "waits": -9}


@pytest.mark.parametrize("status", [AppStatus.PAUSED, AppStatus.INITIAL])
def test_an_app_not_running_claims_nothing(queue_backend: Backend, app: int, status: AppStatus) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    b.set_status(app, status)
    assert _claim(b, app, "c", slot) == []
    b.set_status(app, AppStatus.RUNNING)
    assert [t.body for t in _claim(b, app, "c", slot)] == ["t0"]


def test_a_cancelled_app_claims_nothing_and_says_so(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    assert b.queue.app_cancelled(app) is False
    b.cancel(app)
    assert b.queue.app_cancelled(app) is True
    assert _claim(b, app, "c", slot) == []
    assert (b.app(app)["status"], b.app(app)["result"]) == ("FINISHED", "cancelled")
    b.set_status(app, AppStatus.RUNNING)  # a finished app stays finished
    assert b.app(app)["status"] == "FINISHED"


def test_host_bound_tasks_go_to_their_host_only(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", [Message("h2-only", {"to_host": "h2"}), Message("free")])
    s1, s2 = _slot(b, app, "c", "h1"), _slot(b, app, "c", "h2")
    assert [t.body for t in _claim(b, app, "c", s1, host="h1", limit=5)] == ["free"]
    assert [t.body for t in _claim(b, app, "c", s2, host="h2", limit=5)] == ["h2-only"]


def test_slot_bound_tasks_go_to_the_slot_of_their_seq_only(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", [Message("seq1", {"to_slot": 1}), Message("seq1-text", {"to_slot": "1"})])
    s0, s1 = _slot(b, app, "c", seq=0), _slot(b, app, "c", seq=1)
    assert _claim(b, app, "c", s0, seq=0, limit=5) == []
    assert sorted(t.body for t in _claim(b, app, "c", s1, seq=1, limit=5)) == ["seq1", "seq1-text"]


def test_one_claim_deals_tasks_round_robin_and_bound_ones_to_their_slot(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "b", [Message("for-seq-2", {"to_slot": 2})])
    b.add_tasks(app, "b", [f"t{i}" for i in range(6)])
    s0, s1, s2 = (_slot(b, app, "b", seq=i) for i in range(3))
    mid = _mid(b, app, "b")
    got = b.queue.claim_for_slots(app, mid, host="h1", lease_seconds=30,
                                  slots=[SlotWant(s0, 0, 2), SlotWant(s1, 1, 1), SlotWant(s2, 2, 1)])
    bodies = {slot: sorted(t.body for t in tasks) for slot, tasks in got.items()}
    assert bodies == {s0: ["t0"], s1: ["t1"], s2: ["for-seq-2", "t2"]}
    got = b.queue.claim_for_slots(app, mid, host="h1", slots=[SlotWant(s0, 0, 2), SlotWant(s1, 1, 0)])
    assert {slot: sorted(t.body for t in tasks) for slot, tasks in got.items()} == {s0: ["t3", "t4"]}
    owners = {r["body"]: r["slot_id"] for r in b.tasks(app, "b") if r["status"] == -3}
    assert owners == {"for-seq-2": s2, "t0": s0, "t1": s1, "t2": s2, "t3": s0, "t4": s0}
    assert b.queue.claim_for_slots(app, mid, host="h1", slots=[SlotWant(s0, 0, 0)]) == {}
    assert b.queue.claim_for_slots(app, mid, host="h1", slots=[]) == {}


def test_concurrent_claims_never_double_claim(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", [f"m{i}" for i in range(120)])
    mid = _mid(b, app, "c")
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        q = b.other_queue()
        slot = q.create_slot(mid, host=f"h{i}", seq=0, pid=1, work_dir="/tmp")
        while got := q.claim(app, mid, host=f"h{i}", slot_id=slot, slot_seq=0, limit=7):
            with lock:
                claimed.extend(t.id for t in got)
        if q is not b.queue:
            q.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 120
    assert len(set(claimed)) == 120


def test_batched_claim_takes_one_semaphore_unit_per_task(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "b", [f"t{i}" for i in range(3)])
    b.semaphore_create(app, "gpu", 2)
    s0, s1, s2 = (_slot(b, app, "b", seq=i) for i in range(3))
    mid = _mid(b, app, "b")
    wants = [SlotWant(s0, 0, 1), SlotWant(s1, 1, 1), SlotWant(s2, 2, 1)]
    got = b.queue.claim_for_slots(app, mid, host="h1", slots=wants, semaphore="gpu")
    assert sum(len(v) for v in got.values()) == 2
    assert b.semaphore_get(app, "gpu") == 0
    assert b.queue.claim_for_slots(app, mid, host="h1", slots=wants, semaphore="gpu") == {}
    b.semaphore_create(app, "gpu", 5)
    got = b.queue.claim_for_slots(app, mid, host="h1", slots=wants, semaphore="gpu")
    assert sum(len(v) for v in got.values()) == 1  # one task was left: 4 units go back
    assert b.semaphore_get(app, "gpu") == 4


def test_a_claim_gated_by_a_missing_semaphore_takes_nothing(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    assert _claim(b, app, "c", slot, semaphore="nope") == []
    b.semaphore_create(app, "one", 1)
    assert [t.body for t in _claim(b, app, "c", slot, limit=3, semaphore="one")] == ["t0"]
    assert b.semaphore_get(app, "one") == 0


def test_a_tasks_semaphore_calls_act_on_its_app_atomically(queue_backend: Backend, app: int) -> None:
    """What run.sh's `scalebox semaphore ...` asks the launcher (taskapi), on both backends."""
    from scalebox_hpc.taskapi import Request

    q = queue_backend.queue
    assert q.task_service(app, Request("semaphore.create", 1, "n", 3)) == 3
    assert q.task_service(app, Request("semaphore.add", 1, "n", -2)) == 1
    assert q.task_service(app, Request("semaphore.get", 1, "n")) == 1
    assert q.task_service(app, Request("semaphore.list", 1)) == {"n": 1}
    assert q.task_service(app, Request("app.state", 1))["status"] == "RUNNING"
    with pytest.raises(NotFoundError):
        q.task_service(app, Request("semaphore.add", 1, "missing", 1))
    assert queue_backend.semaphore_get(app, "n") == 1


def test_back_pressure_holds_the_upstream_while_a_sink_is_full(queue_backend: Backend, tmp_path: Path) -> None:
    b = queue_backend
    app = b.create_app(_spec(tmp_path, """
        name: bp
        modules:
          up:
            sink_modules: [down]
          down:
            arguments: {max_pending: 2}
    """))
    b.add_tasks(app, "up", ["u0"])
    b.add_tasks(app, "down", ["d0", "d1"])
    up, down = _slot(b, app, "up"), _slot(b, app, "down")
    assert _claim(b, app, "up", up) == []
    assert [t.body for t in _claim(b, app, "down", down)] == ["d0"]  # one READY left: room again
    assert [t.body for t in _claim(b, app, "up", up)] == ["u0"]


# -- hand-offs --------------------------------------------------------------------------------------
def test_complete_records_the_result_and_emits_to_the_first_sink(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "a", ["go"])
    slot = _slot(b, app, "a")
    [task] = _claim(b, app, "a", slot)
    n = _complete(b, app, task, slot, _result(messages=[Message("x1"), Message("x2", {"k": "v"}), Message("y", {},
                                                                                                          "c")]))
    assert n == 3
    rows = {(r["module"], r["body"]): r for r in b.tasks(app)}
    assert {k: r["status"] for k, r in rows.items()} == {("a", "go"): 0, ("b", "x1"): -1, ("b", "x2"): -1,
                                                         ("c", "y"): -1}
    assert rows[("b", "x2")]["headers"] == {"k": "v"}
    assert rows[("a", "go")]["finished_at_set"] and not rows[("a", "go")]["lease_expires_at_set"]
    [ex] = b.executions(task.id)
    assert (ex["status"], ex["attempt"], ex["slot_id"], ex["host"], ex["stdout"], ex["stderr"]) == \
        (0, 1, slot, "h1", "out", "err")


def test_a_failed_run_is_recorded_with_its_status(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    [task] = _claim(b, app, "c", slot)
    assert _complete(b, app, task, slot, _result(status=3)) == 0
    assert _bodies(b, app) == {"t0": 3}
    assert [e["status"] for e in b.executions(task.id)] == [3]


def test_an_unknown_sink_module_makes_the_task_emit_failed(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "a", ["go"])
    slot = _slot(b, app, "a")
    [task] = _claim(b, app, "a", slot)
    assert _complete(b, app, task, slot, _result(messages=[Message("ok"), Message("x", module="nope")])) == 0
    assert _bodies(b, app) == {"go": TaskStatus.EMIT_FAILED}
    [ex] = b.executions(task.id)
    assert ex["status"] == TaskStatus.EMIT_FAILED and "unknown sink module 'nope'" in ex["stderr"]
    assert ex["stderr"].startswith("err\nscalebox: emitted messages rejected")


def test_a_module_without_sinks_cannot_emit_to_the_default_sink(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    [task] = _claim(b, app, "c", slot)
    assert _complete(b, app, task, slot, _result(messages=[Message("x")])) == 0
    assert _bodies(b, app) == {"t0": TaskStatus.EMIT_FAILED}


def test_conflict_actions_ignore_keeps_fail_rejects_the_whole_hand_off(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "a", ["go"])
    b.add_tasks(app, "b", ["dup"])
    b.add_tasks(app, "c", ["dup"])
    slot = _slot(b, app, "a")
    [task] = _claim(b, app, "a", slot)
    # b (IGNORE) drops the duplicate quietly: written counts only the new row
    assert _complete(b, app, task, slot, _result(messages=[Message("dup"), Message("new")])) == 1
    assert _bodies(b, app, "b") == {"dup": -1, "new": -1}
    slot_b = _slot(b, app, "b")
    [tb] = _claim(b, app, "b", slot_b)
    # c (FAIL) rejects it: the sender becomes EMIT_FAILED and nothing of its hand-off is written
    assert _complete(b, app, tb, slot_b, _result(messages=[Message("fresh"), Message("dup")])) == 0
    assert _bodies(b, app, "c") == {"dup": -1}
    assert _row(b, app, tb.id)["status"] == TaskStatus.EMIT_FAILED
    assert "CONFLICT_ACTION=FAIL" in b.executions(tb.id)[0]["stderr"]


def test_fail_rejects_the_same_body_twice_in_one_hand_off(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "b", ["t0"])
    slot = _slot(b, app, "b")
    [task] = _claim(b, app, "b", slot)
    assert _complete(b, app, task, slot, _result(messages=[Message("same"), Message("same")])) == 0
    assert _bodies(b, app, "c") == {}
    assert _row(b, app, task.id)["status"] == TaskStatus.EMIT_FAILED


def test_ignore_keeps_one_of_the_same_body_twice_in_one_hand_off(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "a", ["go"])
    slot = _slot(b, app, "a")
    [task] = _claim(b, app, "a", slot)
    assert _complete(b, app, task, slot, _result(messages=[Message("same"), Message("same")])) == 1
    assert _bodies(b, app, "b") == {"same": -1}


def test_overwrite_resets_a_finished_task_but_not_a_running_one(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "o", ["done", "busy"])
    so = _slot(b, app, "o")
    [done, _busy] = _claim(b, app, "o", so, limit=2)
    _complete(b, app, done, so, _result(status=5))
    b.add_tasks(app, "a", ["go"])
    sa = _slot(b, app, "a")
    [task] = _claim(b, app, "a", sa)
    n = _complete(b, app, task, sa, _result(messages=[Message("done", {"v": 2}, "o"), Message("busy", {}, "o")]))
    assert n == 1
    rows = {r["body"]: r for r in b.tasks(app, "o")}
    assert (rows["done"]["id"], rows["done"]["status"], rows["done"]["attempts"], rows["done"]["headers"]) == \
        (done.id, -1, 0, {"v": 2})
    assert not rows["done"]["finished_at_set"]
    assert (rows["busy"]["status"], rows["busy"]["slot_id"]) == (-3, so)


def _pg_bug(b: Backend, request: pytest.FixtureRequest, reason: str) -> None:
    """A difference that is PgQueue's bug: its case fails on PostgreSQL until the bug is fixed
    (strict: a fix makes the xfail fail, so the marker goes)."""
    if b.name == "postgres":
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"PgQueue bug: {reason}"))



def _overwrite_twice_case(b: Backend, app: int) -> tuple[Task, int]:
    b.add_tasks(app, "a", ["go"])
    slot = _slot(b, app, "a")
    [task] = _claim(b, app, "a", slot)
    return task, _complete(b, app, task, slot, _result(messages=[Message("same", {"v": 1}, "o"),
                                                                 Message("same", {"v": 2}, "o")]))


def test_overwrite_takes_the_last_of_the_same_body_twice_in_one_hand_off(
    queue_backend: Backend, app: int, request: pytest.FixtureRequest,
) -> None:
    b = queue_backend
    task, n = _overwrite_twice_case(b, app)
    assert n == 1  # one task row written
    assert [(r["body"], r["headers"]) for r in b.tasks(app, "o")] == [("same", {"v": 2})]
    assert _row(b, app, task.id)["status"] == 0


def test_a_lost_lease_records_and_emits_nothing(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "a", ["go"])
    slot = _slot(b, app, "a")
    [task] = _claim(b, app, "a", slot)
    assert b.queue.release(slot) == 1  # as if recovery had taken it away
    with pytest.raises(LeaseLostError) as err:
        _complete(b, app, task, slot, _result(messages=[Message("x")]))
    assert err.value.task_id == task.id
    assert _bodies(b, app) == {"go": -1}
    assert b.executions(task.id) == []


def test_a_result_is_recorded_once(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    [task] = _claim(b, app, "c", slot)
    _complete(b, app, task, slot, _result())
    with pytest.raises(LeaseLostError):
        _complete(b, app, task, slot, _result(status=1))
    assert [e["status"] for e in b.executions(task.id)] == [0]


def test_an_older_attempt_records_nothing_even_on_the_same_slot(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    [first] = _claim(b, app, "c", slot, lease=1)
    _complete(b, app, first, slot, _result(status=1), requeue=True)
    [second] = _claim(b, app, "c", slot)
    assert second.attempts == 2
    with pytest.raises(LeaseLostError):
        _complete(b, app, first, slot, _result())
    with pytest.raises(LeaseLostError):  # and another slot cannot record the claim of this one
        _complete(b, app, second, _slot(b, app, "c", seq=1), _result())
    assert _complete(b, app, second, slot, _result()) == 0
    assert [(e["attempt"], e["status"]) for e in b.executions(first.id)] == [(1, 1), (2, 0)]


def test_requeue_records_the_attempt_and_makes_the_task_ready(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    [task] = _claim(b, app, "c", slot)
    assert _complete(b, app, task, slot, _result(status=2), requeue=True) == 0
    row = _row(b, app, task.id)
    assert (row["status"], row["attempts"], row["slot_id"], row["host"]) == (-1, 1, None, None)
    assert not row["started_at_set"] and not row["lease_expires_at_set"]
    [again] = _claim(b, app, "c", slot)
    assert (again.id, again.attempts, again.tries) == (task.id, 2, 2)


def test_a_manual_retry_gives_a_fresh_attempt_budget(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1"])
    slot = _slot(b, app, "c")
    [t0, t1] = _claim(b, app, "c", slot, limit=2)
    _complete(b, app, t0, slot, _result(status=4))
    assert b.retry([t0.id, t1.id]) == [t0.id]  # a RUNNING task is left alone
    [again] = _claim(b, app, "c", slot)
    assert (again.id, again.attempts, again.retry_base, again.tries) == (t0.id, 2, 1, 1)


def test_finish_text_finishes_the_app_with_the_result(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1", "t2"])
    slot = _slot(b, app, "c")
    [t0, t1] = _claim(b, app, "c", slot, limit=2)
    _complete(b, app, t0, slot, _result(finish="Result is 42"))
    _complete(b, app, t1, slot, _result(finish="later"))
    row = b.app(app)
    assert (row["status"], row["result"]) == ("FINISHED", "Result is 42")
    assert row["finished_at"] is not None
    assert _claim(b, app, "c", slot) == []
    assert b.queue.module_activity(app, _mid(b, app, "c")) == ("FINISHED", True)


def test_emitted_messages_are_bound_to_the_senders_host_and_slot(queue_backend: Backend, tmp_path: Path) -> None:
    b = queue_backend
    app = b.create_app(_spec(tmp_path, """
        name: bound
        modules:
          src:
            sink_modules: [h, s]
          h:
            arguments: {task_dist_mode: HOST-BOUND}
          s:
            arguments: {task_dist_mode: SLOT-BOUND}
    """))
    b.add_tasks(app, "src", ["go"])
    refs = b.queue.modules(app)
    assert (refs["h"].dist_mode, refs["s"].dist_mode, refs["src"].dist_mode) == ("HOST-BOUND", "SLOT-BOUND", None)
    slot = _slot(b, app, "src", "n7", seq=3)
    [task] = _claim(b, app, "src", slot, host="n7", seq=3)
    hdr = headers_for({}, from_module="src", from_host="n7", from_slot=3)
    pinned = headers_for({"to_host": "n9"}, from_module="src", from_host="n7", from_slot=3)
    _complete(b, app, task, slot, _result(messages=[Message("x", hdr, "h"), Message("y", hdr, "s"),
                                                    Message("z", pinned, "h")]), host="n7")
    rows = {r["body"]: r for r in b.tasks(app)}
    assert (rows["x"]["to_host"], rows["x"]["to_slot"], rows["x"]["pref_host"]) == ("n7", None, "n7")
    assert (rows["y"]["to_host"], rows["y"]["to_slot"]) == ("n7", 3)
    assert rows["z"]["to_host"] == "n9"  # an explicit to_host wins
    other = _slot(b, app, "h", "n8")
    assert _claim(b, app, "h", other, host="n8", limit=5) == []
    here = _slot(b, app, "h", "n7")
    assert [t.body for t in _claim(b, app, "h", here, host="n7", limit=5)] == ["x"]


# -- batches (the MPI farm's rank 0) ------------------------------------------------------------------
def _batch(b: Backend, app: int, items: list[Completion], slot: int, module: str = "a") -> list[int | None]:
    refs = b.queue.modules(app)
    return b.queue.complete_many(items, slot_id=slot, sender=refs[module], modules=refs)


def test_complete_many_records_a_batch_and_names_the_lost_leases(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "a", ["t0", "t1", "t2"])
    slot = _slot(b, app, "a")
    t0, t1, t2 = _claim(b, app, "a", slot, limit=3)
    b.queue.release_ids(slot, [t2.id])
    out = _batch(b, app, [Completion(t0, _result(messages=[Message("x0")]), "h1"),
                          Completion(t1, _result(status=1), "h1", requeue=True),
                          Completion(t2, _result(), "h1")], slot)
    assert out == [1, 0, None]
    assert _bodies(b, app) == {"t0": 0, "t1": -1, "t2": -1, "x0": -1}
    assert [e["status"] for e in b.executions(t1.id)] == [1]
    assert b.executions(t2.id) == []
    assert _batch(b, app, [], slot) == []


def test_complete_many_overwrites_with_the_last_of_the_same_body(queue_backend: Backend, app: int) -> None:
    """Two items of a batch emit the same body to an OVERWRITE module: each item's messages are
    their own insert (in order), so the second overwrites the first."""
    b = queue_backend
    b.add_tasks(app, "a", ["t0", "t1"])
    slot = _slot(b, app, "a")
    t0, t1 = _claim(b, app, "a", slot, limit=2)
    out = _batch(b, app, [Completion(t0, _result(messages=[Message("same", {"v": 1}, "o")]), "h1"),
                          Completion(t1, _result(messages=[Message("same", {"v": 2}, "o")]), "h1")], slot)
    assert out == [1, 1]
    assert [(r["body"], r["headers"]) for r in b.tasks(app, "o")] == [("same", {"v": 2})]


def test_complete_many_rejects_only_the_item_with_a_bad_message(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "a", ["t0", "t1", "t2"])
    b.add_tasks(app, "c", ["dup"])
    slot = _slot(b, app, "a")
    t0, t1, t2 = _claim(b, app, "a", slot, limit=3)
    out = _batch(b, app, [Completion(t0, _result(messages=[Message("m0")]), "h1"),
                          Completion(t1, _result(messages=[Message("m1"), Message("dup", {}, "c")]), "h1"),
                          Completion(t2, _result(messages=[Message("m2", {}, "nope")]), "h1")], slot)
    assert out == [1, 0, 0]
    assert _bodies(b, app, "a") == {"t0": 0, "t1": TaskStatus.EMIT_FAILED, "t2": TaskStatus.EMIT_FAILED}
    assert _bodies(b, app, "b") == {"m0": -1}
    assert _bodies(b, app, "c") == {"dup": -1}


def test_complete_many_fences_each_silent_item_by_its_attempt(queue_backend: Backend, app: int) -> None:
    """A batch of tasks that emit nothing (recorded set-based): an item of an older attempt of a
    task the same slot claimed again, and an item of a task another slot holds, record nothing;
    the others get their status, execution and requeue as one by one."""
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1", "t2", "t3"])
    slot, other = _slot(b, app, "c"), _slot(b, app, "c", seq=1)
    [old] = _claim(b, app, "c", slot)
    _complete(b, app, old, slot, _result(status=1), requeue=True)
    t1, t2 = _claim(b, app, "c", slot, limit=2)
    [t3] = _claim(b, app, "c", other, seq=1)
    again = next(t for t in (t1, t2) if t.id == old.id)
    fresh = next(t for t in (t1, t2) if t.id != old.id)
    assert again.attempts == 2
    out = _batch(b, app, [Completion(old, _result(), "h1"),         # attempt 1: fenced off
                          Completion(fresh, _result(status=3), "h1", requeue=True),
                          Completion(t3, _result(), "h1"),          # the other slot's
                          Completion(again, _result(status=5), "h2")], slot, module="c")
    assert out == [None, 0, None, 0]
    rows = {r["id"]: r for r in b.tasks(app, "c")}
    assert (rows[old.id]["status"], rows[old.id]["attempts"]) == (5, 2)
    assert (rows[fresh.id]["status"], rows[fresh.id]["slot_id"], rows[fresh.id]["attempts"]) == (-1, None, 1)
    assert (rows[t3.id]["status"], rows[t3.id]["slot_id"]) == (-3, other)
    assert [(e["attempt"], e["status"], e["host"]) for e in b.executions(old.id)] == [(1, 1, "h1"), (2, 5, "h2")]
    assert [(e["attempt"], e["status"]) for e in b.executions(fresh.id)] == [(1, 3)]
    assert b.executions(t3.id) == []


def test_complete_many_records_a_task_given_twice_once(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    [t0] = _claim(b, app, "c", slot)
    assert _batch(b, app, [Completion(t0, _result(status=2), "h1"), Completion(t0, _result(), "h1")],
                  slot, module="c") == [0, None]
    assert _bodies(b, app, "c") == {"t0": 2}
    assert [e["status"] for e in b.executions(t0.id)] == [2]


def test_complete_many_finishes_the_app_with_the_first_text_of_a_held_item(
    queue_backend: Backend, app: int,
) -> None:
    """The set-finished flag in a batch: an item whose lease is lost does not finish the app;
    of the others, the first text is the result (as one by one)."""
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1", "t2"])
    slot = _slot(b, app, "c")
    t0, t1, t2 = _claim(b, app, "c", slot, limit=3)
    b.queue.release_ids(slot, [t0.id])
    out = _batch(b, app, [Completion(t0, _result(finish="lost"), "h1"),
                          Completion(t1, _result(finish="first"), "h1"),
                          Completion(t2, _result(finish="second"), "h1")], slot, module="c")
    assert out == [None, 0, 0]
    row = b.app(app)
    assert (row["status"], row["result"]) == ("FINISHED", "first")
    assert _bodies(b, app, "c") == {"t0": -1, "t1": 0, "t2": 0}


def test_complete_many_mixes_silent_items_with_a_refused_and_a_lost_one(queue_backend: Backend, app: int) -> None:
    """Silent items beside one whose message cannot be stored (a duplicate under FAIL: the batch
    is refused and recorded one by one) and one whose lease was lost: only those two differ."""
    b = queue_backend
    b.add_tasks(app, "a", ["t0", "t1", "t2", "t3"])
    b.add_tasks(app, "c", ["dup"])
    slot = _slot(b, app, "a")
    t0, t1, t2, t3 = _claim(b, app, "a", slot, limit=4)
    b.queue.release_ids(slot, [t3.id])
    out = _batch(b, app, [Completion(t0, _result(), "h1"),
                          Completion(t1, _result(messages=[Message("dup", {}, "c")]), "h1"),
                          Completion(t2, _result(status=7), "h1"),
                          Completion(t3, _result(), "h1")], slot)
    assert out == [0, 0, 0, None]
    assert _bodies(b, app, "a") == {"t0": 0, "t1": TaskStatus.EMIT_FAILED, "t2": 7, "t3": -1}
    assert _bodies(b, app, "c") == {"dup": -1}
    assert [e["status"] for e in b.executions(t2.id)] == [7]


def test_complete_many_dedupes_overwrite_bodies_beside_silent_items(queue_backend: Backend, app: int) -> None:
    """Duplicate OVERWRITE bodies in one item and across items, beside silent items: written once
    each, with the last one's headers."""
    b = queue_backend
    b.add_tasks(app, "a", ["t0", "t1", "t2"])
    slot = _slot(b, app, "a")
    t0, t1, t2 = _claim(b, app, "a", slot, limit=3)
    out = _batch(b, app, [Completion(t0, _result(messages=[Message("same", {"v": 1}, "o"),
                                                           Message("same", {"v": 2}, "o")]), "h1"),
                          Completion(t1, _result(), "h1"),
                          Completion(t2, _result(messages=[Message("same", {"v": 3}, "o")]), "h1")], slot)
    assert out == [1, 0, 1]
    assert [(r["body"], r["headers"]) for r in b.tasks(app, "o")] == [("same", {"v": 3})]
    assert _bodies(b, app, "a") == {"t0": 0, "t1": 0, "t2": 0}


def test_release_ids_gives_back_only_the_named_running_tasks(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1", "t2"])
    slot, other = _slot(b, app, "c"), _slot(b, app, "c", seq=1)
    _t0, t1 = _claim(b, app, "c", slot, limit=2)
    [t2] = _claim(b, app, "c", other, seq=1)
    assert b.queue.release_ids(slot, []) == 0
    assert b.queue.release_ids(slot, [t1.id, t2.id]) == 1  # t2 is another slot's
    rows = {r["body"]: r for r in b.tasks(app)}
    assert [(rows[n]["status"], rows[n]["attempts"]) for n in ("t0", "t1", "t2")] == [(-3, 1), (-1, 0), (-3, 1)]
    assert _claim(b, app, "c", slot)[0].id == t1.id


# -- leases, heartbeats, recovery ----------------------------------------------------------------------
def test_release_gives_back_every_running_task_of_the_slot_uncounted(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1", "t2"])
    slot = _slot(b, app, "c")
    t0, t1 = _claim(b, app, "c", slot, limit=2)
    _complete(b, app, t0, slot, _result())
    assert b.queue.release(slot) == 1
    assert b.queue.release(slot) == 0
    row = _row(b, app, t1.id)
    assert (row["status"], row["attempts"], row["slot_id"], row["host"], row["started_at_set"]) == \
        (-1, 0, None, None, False)


def test_an_expired_lease_is_recovered_with_a_stalled_record(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1"])
    slot = _slot(b, app, "c")
    [t0] = _claim(b, app, "c", slot, lease=5)
    [t1] = _claim(b, app, "c", slot, lease=60)
    assert b.queue.recover_expired() == []
    b.advance(10)
    assert b.queue.recover_expired() == [(t0.id, -1)]
    row = _row(b, app, t0.id)
    assert (row["status"], row["attempts"], row["slot_id"], row["lease_expires_at_set"]) == (-1, 1, None, False)
    [ex] = b.executions(t0.id)
    assert (ex["status"], ex["attempt"], ex["slot_id"], ex["host"]) == (123, 1, slot, "h1")
    assert "lease expired" in ex["stderr"]
    assert _row(b, app, t1.id)["status"] == -3


def test_a_fleets_periodic_recovery_recovers_each_app_once_per_interval(
        queue_backend: Backend, app: int, tmp_path: Path) -> None:
    """0032: every launcher's loop asks with ``every``; an app recovered less than ``every``
    seconds ago is left alone (by anyone: the interval is the app's), another app is not held
    back by it, and ``every=0`` (the CLI) recovers now."""
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1", "t2"])
    slot = _slot(b, app, "c")
    [ta] = _claim(b, app, "c", slot, lease=5)
    [tb] = _claim(b, app, "c", slot, lease=8)
    [tc] = _claim(b, app, "c", slot, lease=11)
    b.advance(6)
    assert b.queue.recover_expired(every=4) == [(ta.id, -1)]
    other = b.create_app(_spec(tmp_path, PIPE))  # never recovered
    b.add_tasks(other, "c", ["o0"])
    oslot = _slot(b, other, "c")
    [to] = _claim(b, other, "c", oslot, lease=1)
    b.advance(3)  # tb and to expired; the app was recovered 3 s ago
    assert b.queue.recover_expired(every=4) == [(to.id, -1)]  # only the other app was due
    assert _row(b, app, tb.id)["status"] == -3
    b.advance(1)  # 4 s since the app's recovery
    assert b.queue.recover_expired(every=4) == [(tb.id, -1)]
    b.advance(2)  # tc expired 1 s ago, the app recovered 2 s ago: not due, but the CLI recovers now
    assert b.queue.recover_expired(every=4) == []
    assert b.queue.recover_expired() == [(tc.id, -1)]


def test_a_task_whose_stall_retries_are_spent_stays_stalled(queue_backend: Backend, app: int) -> None:
    b = queue_backend  # no retry rule names 123: two extra attempts
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    seen = []
    for _ in range(3):
        [task] = _claim(b, app, "c", slot, lease=5)
        b.advance(10)
        seen += b.queue.recover_expired()
    assert seen == [(task.id, -1), (task.id, -1), (task.id, 123)]
    row = _row(b, app, task.id)
    assert (row["status"], row["attempts"], row["finished_at_set"]) == (123, 3, True)
    assert [e["attempt"] for e in b.executions(task.id)] == [1, 2, 3]


def test_stall_retries_follow_the_retry_rules(queue_backend: Backend, tmp_path: Path) -> None:
    b = queue_backend
    app = b.create_app(_spec(tmp_path, """
        name: r
        modules:
          m:
            parameters: {retry_rules: ['1:4', '123:1']}
    """))  # one extra attempt after a stall, not the default two
    b.add_tasks(app, "m", ["t0"])
    slot = _slot(b, app, "m")
    seen = []
    for _ in range(2):
        [task] = _claim(b, app, "m", slot, lease=5)
        b.advance(10)
        seen += b.queue.recover_expired()
    assert seen == [(task.id, -1), (task.id, 123)]


def test_a_beat_renews_its_slots_lease_which_keeps_every_task_of_the_slot_alive(
        queue_backend: Backend, app: int) -> None:
    """0033: a beat renews the slot's lease, not each task's: a RUNNING task lives while its
    claim's lease or its slot's holds. One the slot does not name lives on the slot's lease until
    it is a lease old; then a beat releases it (the attempt not counted), never the recovery."""
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1"])
    slot = _slot(b, app, "c")
    t0, t1 = _claim(b, app, "c", slot, limit=2, lease=5)
    b.advance(3)
    assert b.queue.heartbeat(slot, status="RUNNING", lease_seconds=5, task_ids=[t0.id]) == []  # the slot's: to 8 s
    b.advance(3)  # both claims' leases expired at 5 s; the slot's holds
    assert b.queue.recover_expired() == []
    assert b.queue.heartbeat(slot, status="RUNNING", lease_seconds=5, task_ids=[t0.id]) == [t1.id]  # to 11 s
    row = _row(b, app, t1.id)
    assert (row["status"], row["attempts"], row["slot_id"]) == (-1, 0, None)
    b.advance(4)
    assert b.queue.recover_expired() == []
    assert b.queue.heartbeat(slot, status="RUNNING", lease_seconds=5) == []  # None: it knows all; to 15 s
    b.advance(4)
    assert b.queue.recover_expired() == []
    assert [s["status"] for s in b.slots(app)] == ["RUNNING"]
    b.advance(2)  # no beat since 10 s: the slot's lease expired at 15 s
    assert b.queue.recover_expired() == [(t0.id, -1)]


def test_an_ended_slots_lease_keeps_no_task_alive(queue_backend: Backend, app: int) -> None:
    """A slot marked EXITED (or ERROR) with a task still RUNNING (its launcher died between the
    two): the task lives only on its claim's lease, not on the slot's last one."""
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    [t0] = _claim(b, app, "c", slot, lease=5)
    assert b.queue.heartbeat(slot, status="RUNNING", lease_seconds=60) == []
    b.queue.set_slot_status(slot, "EXITED", message="gone")
    b.advance(6)
    assert b.queue.recover_expired() == [(t0.id, -1)]


def test_heartbeat_releases_a_task_its_slot_does_not_know(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0", "t1"])
    slot = _slot(b, app, "c")
    t0, t1 = _claim(b, app, "c", slot, limit=2, lease=60)
    assert b.queue.heartbeat(slot, status="RUNNING", lease_seconds=60, task_ids=[t0.id]) == []  # claimed just now
    b.advance(61)
    assert b.queue.heartbeat(slot, status="RUNNING", lease_seconds=60, task_ids=[t0.id]) == [t1.id]
    row = _row(b, app, t1.id)
    assert (row["status"], row["attempts"], row["slot_id"]) == (-1, 0, None)


def test_one_heartbeat_statement_renews_every_slot_and_releases_strays(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "b", [f"t{i}" for i in range(3)])
    s0, s1 = _slot(b, app, "b", seq=0), _slot(b, app, "b", seq=1)
    [t0] = _claim(b, app, "b", s0)
    t1, t2 = _claim(b, app, "b", s1, seq=1, limit=2)
    b.advance(3600)  # t2's claim reply was "lost" over a lease ago
    released = b.queue.heartbeat_slots([Beat(s0, "RUNNING", 60.0, (t0.id,)), Beat(s1, "READY", 60.0, (t1.id,))])
    assert released == [t2.id]
    assert b.queue.heartbeat_slots([]) == []
    b.advance(50)  # the renewed leases hold
    assert b.queue.recover_expired() == []
    assert {r["body"]: r["status"] for r in b.tasks(app)} == {"t0": -3, "t1": -3, "t2": -1}
    b.queue.heartbeat_slots([Beat(s0, "RUNNING", 60.0, (t0.id,)), Beat(s1, "READY", 60.0, (t1.id,))])
    assert [s["status"] for s in b.slots(app)] == ["RUNNING", "READY"]


def test_the_heartbeat_stores_why_a_slot_waits_and_the_live_output_sent(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "b", ["t0"])
    s0, s1 = _slot(b, app, "b", seq=0), _slot(b, app, "b", seq=1)
    [t0] = _claim(b, app, "b", s0)
    out = {"task_id": t0.id, "stdout": {"end": 3, "text": "hi\n"}, "stderr": None}
    b.queue.heartbeat_slots([Beat(s0, "RUNNING", 60.0, (t0.id,), output=out),
                             Beat(s1, "READY", 60.0, (), waiting="check.sh exited 1 (not now)")])
    slots = {s["id"]: s for s in b.slots(app)}
    assert (slots[s0]["waiting"], slots[s0]["live_output"]) == (None, out)
    assert (slots[s1]["waiting"], slots[s1]["live_output"]) == ("check.sh exited 1 (not now)", None)
    # output None: unchanged (kept); waiting None: the gates are open again
    b.queue.heartbeat_slots([Beat(s0, "RUNNING", 60.0, (t0.id,)), Beat(s1, "READY", 60.0, ())])
    slots = {s["id"]: s for s in b.slots(app)}
    assert (slots[s0]["live_output"], slots[s1]["waiting"]) == (out, None)


def test_the_one_slot_beat_leaves_why_the_slot_waits_and_its_live_output(queue_backend: Backend,
                                                                         app: int) -> None:
    """The one-slot beat says nothing of why its slot waits (0034: the node's beat of one slot,
    told to keep it); it renews the slot's lease like the node's beat."""
    b = queue_backend
    b.add_tasks(app, "b", ["t0"])
    s0 = _slot(b, app, "b")
    [t0] = _claim(b, app, "b", s0)
    out = {"task_id": t0.id, "stdout": {"end": 2, "text": "x\n"}, "stderr": None}
    b.queue.heartbeat_slots([Beat(s0, "RUNNING", 60.0, (t0.id,), waiting="disk gate /x (not now)", output=out)])
    assert b.queue.heartbeat(s0, status="RUNNING", lease_seconds=60.0, task_ids=[t0.id]) == []
    [row] = b.slots(app)
    assert (row["waiting"], row["live_output"], row["status"]) == ("disk gate /x (not now)", out, "RUNNING")
    b.advance(50)  # its lease was renewed: the task lives
    assert b.queue.recover_expired() == []
    b.queue.heartbeat_slots([Beat(s0, "READY", 60.0, (t0.id,))])
    [row] = b.slots(app)
    assert (row["waiting"], row["status"]) == (None, "READY")


def test_a_silent_slot_is_lost_and_an_ended_one_stays_ended(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    quiet, ended, beating = (_slot(b, app, "c", seq=i, hb=2) for i in range(3))
    b.queue.set_slot_status(ended, "EXITED", message="done", tasks_done=3)
    b.advance(3)
    b.queue.heartbeat(beating, status="READY", lease_seconds=3)
    b.queue.heartbeat(ended, status="READY", lease_seconds=3)  # no resurrection
    b.advance(2)
    b.queue.recover_expired()
    slots = {s["id"]: s for s in b.slots(app)}
    assert [slots[i]["status"] for i in (quiet, ended, beating)] == ["LOST", "EXITED", "READY"]
    assert slots[quiet]["ended_at"] is not None
    assert "no heartbeat since" in slots[quiet]["message"]


def test_a_lost_slot_that_beats_again_runs_with_no_end_and_no_lost_message(queue_backend: Backend,
                                                                             app: int) -> None:
    """A slot marked LOST was slow, not dead, when it beats again (a saturated database): it
    runs, so its row says so, without the end time and "no heartbeat since" of the LOST mark."""
    b = queue_backend
    slow = _slot(b, app, "c", hb=2)
    b.advance(5)
    b.queue.recover_expired()
    assert [s["status"] for s in b.slots(app)] == ["LOST"]
    b.queue.heartbeat_slots([Beat(slow, "RUNNING", 3.0, ())])
    [row] = b.slots(app)
    assert (row["status"], row["ended_at"], row["message"]) == ("RUNNING", None, None)
    b.advance(5)
    b.queue.recover_expired()
    b.queue.heartbeat(slow, status="READY", lease_seconds=3.0)  # the one-slot beat likewise
    [row] = b.slots(app)
    assert (row["status"], row["ended_at"], row["message"]) == ("READY", None, None)


def test_set_slot_status_keeps_the_message_and_counts_tasks(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    slot = _slot(b, app, "c")
    [row] = b.slots(app)
    assert (row["status"], row["host"], row["seq"], row["work_dir"]) == ("STARTING", "h1", 0, "/tmp")
    b.queue.set_slot_status(slot, "READY", message="up")
    b.queue.set_slot_status(slot, "RUNNING", tasks_done=2)
    [row] = b.slots(app)
    assert (row["status"], row["message"], row["tasks_done"], row["ended_at"]) == ("RUNNING", "up", 2, None)
    b.queue.set_slot_status(slot, "ERROR", message="setup.sh failed", tasks_done=1)
    [row] = b.slots(app)
    assert (row["status"], row["message"], row["tasks_done"]) == ("ERROR", "setup.sh failed", 3)
    assert row["ended_at"] is not None


def test_a_task_bound_to_a_dead_host_is_unbound_after_its_wait(queue_backend: Backend, tmp_path: Path) -> None:
    b = queue_backend
    app = b.create_app(_spec(tmp_path, """
        name: dead
        modules:
          m:
            arguments: {locality_wait_seconds: 5}
    """))
    gone = _slot(b, app, "m", "h9", hb=1)
    b.add_tasks(app, "m", [Message("bound", {"to_host": "h9", "to_slot": 0})])
    here = _slot(b, app, "m", "h1", seq=4)
    assert _claim(b, app, "m", here, seq=4) == []
    b.advance(3)  # h9 is dead (no beat in 2 heartbeats), but the wait is not over
    b.queue.heartbeat(here, status="READY", lease_seconds=30)
    b.queue.recover_expired()
    assert _claim(b, app, "m", here, seq=4) == []
    b.advance(3)
    b.queue.heartbeat(here, status="READY", lease_seconds=30)
    b.queue.recover_expired()
    [row] = b.tasks(app)
    assert (row["to_host"], row["to_slot"], row["pref_host"]) == (None, None, None)
    assert [t.body for t in _claim(b, app, "m", here, seq=4)] == ["bound"]
    assert {s["id"]: s["status"] for s in b.slots(app)}[gone] == "LOST"


def test_text_the_database_cannot_store_is_made_storable(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    b.add_tasks(app, "c", ["t0"])
    slot = _slot(b, app, "c")
    [task] = _claim(b, app, "c", slot)
    result = _result()
    result.stdout, result.stderr, result.user_text = "a\x00b", "lone \ud800", "u\x00"
    _complete(b, app, task, slot, result)
    [ex] = b.executions(task.id)
    assert (ex["stdout"], ex["stderr"], ex["user_text"]) == ("a\ufffdb", "lone \ufffd", "u\ufffd")


# -- errors: the ports raise only the ScaleboxError tree ---------------------------------------
def test_a_slot_of_an_unknown_module_is_not_found(
    queue_backend: Backend, app: int, request: pytest.FixtureRequest,
) -> None:
    with pytest.raises(ScaleboxError):
        queue_backend.queue.create_slot(app + 10_000, host="h1", seq=0, pid=1, work_dir="/tmp")


def test_a_claim_for_an_unknown_slot_is_not_found_and_takes_nothing(
    queue_backend: Backend, app: int, request: pytest.FixtureRequest,
) -> None:
    b = queue_backend
    assert _claim(b, app, "c", 4242) == []  # nothing to claim: nothing to check
    b.add_tasks(app, "c", ["t0"])
    with pytest.raises(ScaleboxError):
        _claim(b, app, "c", 4242)
    assert _bodies(b, app) == {"t0": -1}


def test_an_unknown_slot_status_is_refused(queue_backend: Backend, app: int, request: pytest.FixtureRequest) -> None:
    slot = _slot(queue_backend, app, "c")
    with pytest.raises(ScaleboxError):
        queue_backend.queue.heartbeat(slot, status="BOGUS", lease_seconds=1)


# -- the app, its modules -------------------------------------------------------------------------------
def test_modules_and_specs_of_an_app(queue_backend: Backend, app: int) -> None:
    b = queue_backend
    refs = b.queue.modules(app)
    assert list(refs) == ["a", "b", "c", "o"]
    assert (refs["a"].sink_modules, refs["b"].conflict_action, refs["o"].conflict_action) == \
        (("b", "c"), "IGNORE", "OVERWRITE")
    specs = b.queue.module_specs(app)
    assert list(specs) == ["a", "b", "c", "o"]
    assert specs["b"]["arguments"]["conflict_action"] == "IGNORE" and specs["a"]["sink_modules"] == ["b", "c"]
    with pytest.raises(NotFoundError):
        b.queue.modules(app + 100)
    assert b.queue.module_specs(app + 100) == {}


def test_app_uid_is_stable_and_unknown_apps_are_not_found(queue_backend: Backend, app: int, tmp_path: Path) -> None:
    b = queue_backend
    uid = b.queue.app_uid(app)
    assert uid == b.queue.app_uid(app) and len(uid) == 36
    assert b.queue.app_uid(b.create_app(_spec(tmp_path, PIPE))) != uid
    with pytest.raises(NotFoundError):
        b.queue.app_uid(app + 100)
    with pytest.raises(NotFoundError):
        b.queue.module_activity(app + 100, 1)
    assert b.queue.app_cancelled(app + 100) is False


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


def test_module_activity_follows_upstream_modules_only(queue_backend: Backend, tmp_path: Path) -> None:
    b = queue_backend
    app = b.create_app(_spec(tmp_path, GRAPH))
    ids = {name: ref.id for name, ref in b.queue.modules(app).items()}

    def active() -> dict[str, bool]:
        out = {}
        for name, module_id in ids.items():
            status, on = b.queue.module_activity(app, module_id)
            assert status == "RUNNING"
            out[name] = on
        return out

    assert active() == dict.fromkeys(ids, False)
    b.add_tasks(app, "c", ["c1"])  # work for c: c and b (its upstream, through the cycle)
    assert active() == {"a": False, "b": True, "c": True, "x": False, "lone": False}
    b.add_tasks(app, "a", ["a1"])
    assert active() == {"a": True, "b": True, "c": True, "x": True, "lone": False}
    slot = _slot(b, app, "a")
    [task] = _claim(b, app, "a", slot)
    assert active()["x"] is True  # RUNNING counts as READY does
    _complete(b, app, task, slot, _result())
    cs = _slot(b, app, "c")
    [c1] = _claim(b, app, "c", cs)
    _complete(b, app, c1, cs, _result(status=9))
    assert active() == dict.fromkeys(ids, False)


# -- hosts and the scratch index --------------------------------------------------------------------------
LOCAL = """
name: local
modules:
  m:
    arguments: {locality_wait_seconds: 5}
"""


def test_a_task_prefers_the_live_host_holding_its_inputs(queue_backend: Backend, tmp_path: Path) -> None:
    b = queue_backend
    app = b.create_app(_spec(tmp_path, LOCAL))
    b.queue.register_host("h1", {"pid": 1})
    b.queue.register_host("h1", {"pid": 2})  # a refresh
    s1, s2 = _slot(b, app, "m", "h1"), _slot(b, app, "m", "h2")
    b.queue.index_scratch("h2", [("in/a", 10), ("in/b", 20)], [])
    b.add_tasks(app, "m", [Message("both", {"inputs": ["in/a", "in/b"]}), Message("half", {"inputs": ["in/a", "x"]}),
                           Message("none")])
    rows = {r["body"]: r for r in b.tasks(app)}
    assert [(rows[n]["pref_host"], rows[n]["pref_partial"]) for n in ("both", "half", "none")] == \
        [("h2", False), ("h2", True), (None, False)]
    assert [t.body for t in _claim(b, app, "m", s1, host="h1", limit=5)] == ["none"]
    assert [t.body for t in _claim(b, app, "m", s2, host="h2", limit=1)] == ["both"]  # whole holdings first
    b.advance(6)  # the wait is over: anyone may take it
    b.queue.heartbeat_slots([Beat(s1, "READY", 30), Beat(s2, "READY", 30)])
    assert [t.body for t in _claim(b, app, "m", s1, host="h1", limit=5)] == ["half"]


def test_adopted_tasks_prefer_the_holder_that_indexed_later(queue_backend: Backend, tmp_path: Path) -> None:
    b = queue_backend
    app = b.create_app(_spec(tmp_path, LOCAL))
    b.add_tasks(app, "m", [Message("t", {"inputs": ["f1"]}), Message("u", {"inputs": ["f9"]}), Message("plain")])
    assert {r["body"]: r["pref_host"] for r in b.tasks(app)} == {"t": None, "u": None, "plain": None}
    b.queue.index_scratch("h3", [("f1", 1), ("old", 1)], [], replace=True)
    assert b.queue.adopt_tasks(app, "h3") == 1
    assert b.queue.adopt_tasks(app, "h3") == 0  # already its best holder
    assert {r["body"]: r["pref_host"] for r in b.tasks(app)} == {"t": "h3", "u": None, "plain": None}
    s1 = _slot(b, app, "m", "h1")
    assert [t.body for t in _claim(b, app, "m", s1, host="h1", limit=5)] == ["u", "plain"]


def test_the_scratch_index_forgets_removed_and_replaced_files(queue_backend: Backend, tmp_path: Path) -> None:
    b = queue_backend
    app = b.create_app(_spec(tmp_path, LOCAL))
    b.add_tasks(app, "m", [Message("t1", {"inputs": ["f1"]}), Message("t2", {"inputs": ["f2"]})])
    b.queue.index_scratch("h3", [("f1", 1), ("f2", 1)], [])
    b.queue.index_scratch("h3", [], ["f1"])
    b.queue.index_scratch("h4", [("f2", 5)], [])
    b.queue.index_scratch("h4", [("f3", 5)], [], replace=True)  # f2 is gone from h4
    assert b.queue.adopt_tasks(app, "h4", limit=10) == 1
    assert {r["body"]: r["pref_host"] for r in b.tasks(app)} == {"t1": None, "t2": "h3"}


def test_complete_many_mixes_the_slots_and_modules_of_a_node(queue_backend: Backend, app: int) -> None:
    """The dispatcher's batch: each item names its own slot and sender (their leases are
    checked per slot, their messages routed from their own module)."""
    b = queue_backend
    b.add_tasks(app, "a", ["ta"])
    b.add_tasks(app, "b", ["tb"])
    sa, sb = _slot(b, app, "a"), _slot(b, app, "b", seq=1)
    [ta] = _claim(b, app, "a", sa)
    [tb] = _claim(b, app, "b", sb, seq=1)
    refs = b.queue.modules(app)
    out = b.queue.complete_many(
        [Completion(ta, _result(messages=[Message("from-a")]), "h1", slot_id=sa, sender=refs["a"]),
         Completion(tb, _result(messages=[Message("from-b")]), "h1", slot_id=sb, sender=refs["b"]),
         Completion(tb, _result(), "h1", slot_id=sa, sender=refs["a"])],  # not sa's: lease lost
        slot_id=0, sender=refs["a"], modules=refs)
    assert out == [1, 1, None]
    assert _bodies(b, app)["ta"] == 0 and _bodies(b, app)["tb"] == 0
    # each routed from its own module: a's first sink is b, b's is c
    assert "from-a" in {r["body"] for r in b.tasks(app, "b")}
    assert "from-b" in {r["body"] for r in b.tasks(app, "c")}


# -- usage ------------------------------------------------------------------------------------------
USAGE_KEYS = ("cpu_user_s", "cpu_system_s", "max_rss_kb")


def _used(b: Backend, task: Task) -> list[tuple[Any, ...]]:
    return [tuple(e[k] for k in USAGE_KEYS) for e in b.executions(task.id)]


def test_every_hand_off_records_the_runs_usage(queue_backend: Backend, app: int) -> None:
    """One by one, in a batch of silent items, in a batch item that emits, and when the messages
    are refused (-102): the execution keeps what the run used; a run that measured nothing, and
    a lease recovery, record NULLs."""
    b = queue_backend
    b.add_tasks(app, "a", ["t0", "t1", "t2", "t3", "t4"])
    slot = _slot(b, app, "a")
    t0, t1, t2, t3, t4 = _claim(b, app, "a", slot, limit=5)

    def used(n: int, rss: int | None = 2048) -> TaskResult:
        r = _result(messages=[Message(f"m{n}")] if n == 2 else None)
        r.usage = Usage(cpu_user_s=n + 0.25, cpu_system_s=0.5, max_rss_kb=rss)
        return r

    _complete(b, app, t0, slot, used(0))
    bad = used(3)
    bad.messages = [Message("x", {}, "nope")]
    out = _batch(b, app, [Completion(t1, used(1, rss=None), "h1"), Completion(t2, used(2), "h1"),
                          Completion(t3, bad, "h1"), Completion(t4, _result(), "h1")], slot)
    assert out == [0, 1, 0, 0]
    assert _used(b, t0) == [(0.25, 0.5, 2048)]
    assert _used(b, t1) == [(1.25, 0.5, None)]
    assert _used(b, t2) == [(2.25, 0.5, 2048)]
    assert _used(b, t3) == [(3.25, 0.5, 2048)]  # emit-failed: the run still used it
    assert _used(b, t4) == [(None, None, None)]

    b.add_tasks(app, "c", ["lost"])
    [lost] = _claim(b, app, "c", _slot(b, app, "c"), lease=5)
    b.advance(10)
    assert b.queue.recover_expired() == [(lost.id, -1)]
    assert _used(b, lost) == [(None, None, None)]


def test_complete_many_records_emitting_items_set_based_as_one_by_one(queue_backend: Backend, app: int) -> None:
    """Items emitting to an IGNORE module (recorded set-based since 0022) beside an OVERWRITE
    one, a lost one and silent ones: each item's messages meet those of the items before it as
    one by one would (a body emitted twice is written once, by the first), written counts each
    item's new rows, and a lost item writes none of its messages."""
    b = queue_backend
    b.add_tasks(app, "a", ["t0", "t1", "t2", "t3", "t4"])
    b.add_tasks(app, "b", ["old"])
    slot = _slot(b, app, "a")
    t0, t1, t2, t3, t4 = _claim(b, app, "a", slot, limit=5)
    b.queue.release_ids(slot, [t3.id])
    out = _batch(b, app, [
        Completion(t0, _result(messages=[Message("x", {"n": 0}), Message("old"), Message("x", {"n": 9})]), "h1"),
        Completion(t1, _result(), "h1"),
        Completion(t2, _result(messages=[Message("x", {"n": 2}), Message("y"), Message("w", {}, "o")]), "h1"),
        Completion(t3, _result(messages=[Message("lost")]), "h1"),
        Completion(t4, _result(messages=[Message("z")]), "h1")], slot)
    assert out == [1, 0, 2, None, 1]
    rows = {r["body"]: r for r in b.tasks(app, "b")}
    assert set(rows) == {"old", "x", "y", "z"} and rows["x"]["headers"] == {"n": 0}
    assert [r["body"] for r in b.tasks(app, "o")] == ["w"]
    assert _bodies(b, app, "a") == {"t0": 0, "t1": 0, "t2": 0, "t3": -1, "t4": 0}
    assert [len(b.executions(t.id)) for t in (t0, t1, t2, t3, t4)] == [1, 1, 1, 0, 1]
