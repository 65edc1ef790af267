"""The dispatcher's batching rules, in-process: calls waiting together are served together."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from scalebox_hpc.errors import DatabaseError, SlotError
from scalebox_hpc.launcher.dispatcher import Dispatcher, SlotPort
from scalebox_hpc.models import (
    BUSY_GIVE_UP_SECONDS,
    BUSY_RETRY_SECONDS,
    HAND_OFF_BUSY,
    Beat,
    Completion,
    ConflictAction,
    LeaseLostError,
    Message,
    ModuleRef,
    Released,
    SlotWant,
    Task,
    TaskResult,
)

REF = ModuleRef(1, "a", (), ConflictAction.IGNORE)
MODULES = {"a": REF}


class Recorder:
    """A BatchQueue double that records each statement and hands out numbered tasks; ``gate``
    blocks the dispatcher thread inside ``app_uid`` so that calls pile up behind it."""

    def __init__(self, tasks: int = 100) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.free = list(range(1, tasks + 1))
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.refuse: set[int] = set()
        self.lost: set[int] = set()
        self.busy: dict[int, int] = {}
        self.busy_release: list[int] = []
        self.claim_gate: threading.Event | None = None
        self.claim_entered = threading.Event()
        """Task ids the next ``release`` finds held by another transaction (Released.busy)."""
        """Task id -> how many more batch hand-offs answer it HAND_OFF_BUSY."""
        self.down = False
        self.released: list[int] = []
        self.statuses: dict[int, int] = {}
        self.slot_seq = 0
        self.leases: list[tuple[str, float]] = []

    def app_uid(self, app_id: int) -> str:
        self.entered.set()
        self.gate.wait(10)
        return "uid"

    def create_slot(self, module_id: int, **kw: Any) -> int:
        self.slot_seq += 1
        return self.slot_seq

    def claim_for_slots(self, app_id: int, module_id: int, *, host: str, slots: Sequence[SlotWant],
                        lease_seconds: float = 30.0, semaphore: str | None = None) -> dict[int, list[Task]]:
        self.calls.append(("claim", [(s.slot_id, s.want) for s in slots]))
        if self.claim_gate is not None:  # a claim statement that takes long
            self.claim_entered.set()
            self.claim_gate.wait(10)
        self.leases.append(("claim", lease_seconds))
        out: dict[int, list[Task]] = {}
        for s in slots:
            for _ in range(s.want):
                if self.free:
                    out.setdefault(s.slot_id, []).append(Task(self.free.pop(0), app_id, module_id, "b", {}, -3))
        return out

    def complete(self, task: Task, result: TaskResult, **kw: Any) -> int:
        self.calls.append(("complete", task.id))
        if self.down:
            raise DatabaseError("down")
        if task.id in self.refuse and result.status != -103:
            raise ValueError("refused")
        self.statuses[task.id] = result.status
        if task.id in self.lost:
            raise LeaseLostError(task.id)
        return 1

    def complete_many(self, items: Sequence[Completion], **kw: Any) -> list[int | None]:
        self.calls.append(("complete_many", [i.task.id for i in items]))
        if self.down:
            raise DatabaseError("down")
        if any(i.task.id in self.refuse for i in items):
            raise ValueError("refused")
        out: list[int | None] = []
        for i in items:
            if self.busy.get(i.task.id, 0) > 0:
                self.busy[i.task.id] -= 1
                out.append(HAND_OFF_BUSY)
            else:
                out.append(None if i.task.id in self.lost else 1)
        return out

    def release_ids(self, slot_id: int, task_ids: Sequence[int]) -> int:
        self.released += list(task_ids)
        return len(task_ids)

    def release(self, slot_id: int) -> int:
        if self.busy_release:
            held, self.busy_release = self.busy_release, []
            return Released(0, held)
        return 0

    def set_slot_status(self, slot_id: int, status: str, **kw: Any) -> None:
        self.calls.append(("status", (slot_id, status)))

    def heartbeat_slots(self, beats: Sequence[Beat]) -> list[int]:
        self.calls.append(("beat", [(b.slot_id, b.task_ids) for b in beats]))
        self.leases += [("beat", b.lease_seconds) for b in beats]
        return []

    def close(self) -> None:
        pass


def result() -> TaskResult:
    now = datetime.now(UTC)
    return TaskResult(status=0, started_at=now, finished_at=now)


def dispatcher(q: Recorder, **kw: Any) -> Dispatcher:
    return Dispatcher(lambda: q, **kw)  # type: ignore[arg-type, return-value]


def together(d: Dispatcher, q: Recorder, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` from threads while the dispatcher is held busy, so they form one batch."""
    blocker = threading.Thread(target=lambda: d.call("app_uid", 1))
    blocker.start()
    assert q.entered.wait(10)  # the dispatcher thread is busy in the blocker now
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for _ in range(500):  # all queued behind the blocker (or failed before)
        if d._inbox.qsize() >= sum(t.is_alive() for t in threads):
            break
        threading.Event().wait(0.01)
    q.gate.set()
    for t in [*threads, blocker]:
        t.join(10)
    q.gate.clear()
    q.entered.clear()
    return out


def claim(port: SlotPort, slot_id: int) -> list[Task]:
    return port.claim(1, 1, host="h", slot_id=slot_id, slot_seq=slot_id)


def test_claims_waiting_together_are_one_statement() -> None:
    q = Recorder()
    d = dispatcher(q)
    ports = [d.port() for _ in range(4)]
    ids = [p.create_slot(1, host="h", seq=i, pid=1, work_dir="/") for i, p in enumerate(ports)]
    got = together(d, q, [lambda p=p, s=s: claim(p, s) for p, s in zip(ports, ids, strict=True)])
    assert sorted(t.id for tasks in got for t in tasks) == [1, 2, 3, 4]
    [(_kind, wants)] = [c for c in q.calls if c[0] == "claim"]
    assert sorted(wants) == [(s, 1) for s in ids]
    d.close()


def test_hand_offs_finishing_together_are_one_statement_and_lost_leases_are_told_apart() -> None:
    q = Recorder()
    q.lost = {2}
    d = dispatcher(q)
    port = d.port()
    tasks = [Task(i, 1, 1, "b", {}, -3) for i in (1, 2, 3)]
    got = together(d, q, [lambda t=t: port.complete(t, result(), slot_id=7, host="h", sender=REF,
                                                      modules=MODULES) for t in tasks])
    assert got[0] == 1 and got[2] == 1 and isinstance(got[1], LeaseLostError) and got[1].task_id == 2
    [(kind, ids)] = [c for c in q.calls if c[0].startswith("complete")]
    assert kind == "complete_many" and sorted(ids) == [1, 2, 3]
    d.close()


def test_a_refused_batch_is_recorded_task_by_task_so_only_the_culprit_fails() -> None:
    q = Recorder()
    q.refuse = {2}
    d = dispatcher(q)
    port = d.port()
    tasks = [Task(i, 1, 1, "b", {}, -3) for i in (1, 2, 3)]
    got = together(d, q, [lambda t=t: port.complete(t, result(), slot_id=7, host="h", sender=REF,
                                                      modules=MODULES) for t in tasks])
    assert got[0] == 1 and got[2] == 1 and isinstance(got[1], ValueError)
    assert ("complete", 1) in q.calls and ("complete", 3) in q.calls
    d.close()


def test_an_outage_reaches_every_waiting_hand_off() -> None:
    q = Recorder()
    q.down = True
    d = dispatcher(q)
    port = d.port()
    got = together(d, q, [lambda i=i: port.complete(Task(i, 1, 1, "b", {}, -3), result(), slot_id=7, host="h",
                                                      sender=REF, modules=MODULES) for i in (1, 2)])
    assert all(isinstance(g, DatabaseError) for g in got)
    d.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _learn(d: Dispatcher, port: SlotPort, slot_id: int, clock: Clock, seconds: float) -> None:
    [task] = claim(port, slot_id)
    clock.now += seconds
    port.complete(task, result(), slot_id=slot_id, host="h", sender=REF, modules=MODULES)


def barrier(d: Dispatcher) -> None:
    """Returns once everything queued before it was served (the inbox is FIFO)."""
    d.call("release", 0)


def test_short_tasks_are_prefetched_and_go_back_when_the_slot_ends() -> None:
    q, clock = Recorder(), Clock()
    d = dispatcher(q, clock=clock)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    _learn(d, port, slot, clock, 0.05)  # no prefetch before the module's task time is known
    assert q.calls[0] == ("claim", [(slot, 1)])
    [task] = claim(port, slot)  # tasks of 50 ms: 100 ms of work = 2 prefetched
    assert task.id == 2 and q.calls[-1] == ("claim", [(slot, 3)]) and d.held(slot) == (3, 4)
    [nxt] = claim(port, slot)  # from the buffer; half of it used: a refill is queued
    barrier(d)
    assert nxt.id == 3 and d.stats.prefetch_hits == 1 and d.held(slot) == (4, 5)
    d.call("heartbeat_slots", [Beat(slot, "RUNNING", 30.0, (nxt.id,))])
    [beat] = [c for c in q.calls if c[0] == "beat"]
    # the prefetched leases are renewed too, and those of the tasks the slot got and has not
    # handed over (2: this test's slot never hands it over), whatever the beat was built with
    assert beat == ("beat", [(slot, (3, 4, 5, 2))])
    port.set_slot_status(slot, "EXITED")
    assert q.released == [4, 5] and d.held(slot) == ()
    d.close()


def test_long_tasks_are_not_prefetched() -> None:
    q, clock = Recorder(), Clock()
    d = dispatcher(q, clock=clock)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    _learn(d, port, slot, clock, 5.0)
    claim(port, slot)
    assert [c for c in q.calls if c[0] == "claim"] == [("claim", [(slot, 1)])] * 2
    d.close()


def test_a_background_hand_off_survives_an_outage_and_a_refusal() -> None:
    """The slot hands over and goes on; the dispatcher keeps the result (and its lease) through
    an outage, and records -103 for a result the database refuses."""
    q, clock = Recorder(), Clock()
    d = dispatcher(q, clock=clock)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    q.down, q.refuse = True, {2}
    for i in (1, 2):
        port.hand_off(Task(i, 1, 1, "b", {}, -3), result(), slot_id=slot, host="h", sender=REF,
                      modules=MODULES, requeue=False, requeue_for=lambda status: False)
    barrier(d)
    assert d.held(slot) == (1, 2)  # kept, leases renewed by the heartbeat
    q.down = False
    clock.now += 60  # every retry is due
    barrier(d)
    barrier(d)
    assert d.held(slot) == ()
    recorded = [c for c in q.calls if c[0].startswith("complete")]
    assert ("complete", 1) in recorded or ("complete_many", [1, 2]) in recorded
    assert q.statuses[2] == -103
    d.close()


def test_no_prefetch_for_a_gated_slot() -> None:
    q = Recorder()
    clock = Clock()
    d = dispatcher(q, clock=clock)
    port = d.port(prefetch=False)
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    _learn(d, port, slot, clock, 0.001)
    claim(port, slot)
    assert [c for c in q.calls if c[0] == "claim"] == [("claim", [(slot, 1)])] * 2
    assert d.held(slot) == ()
    d.close()


def test_calls_after_close_fail_as_an_outage() -> None:
    q = Recorder()
    d = dispatcher(q)
    port = d.port()
    d.close()
    with pytest.raises(DatabaseError, match="closed"):
        port.app_cancelled(1)


SINK = ModuleRef(2, "b", (), ConflictAction.IGNORE)
SENDER = ModuleRef(1, "a", ("b",), ConflictAction.IGNORE)


def test_a_hand_off_writing_to_a_module_claims_for_its_idle_slot_and_wakes_it() -> None:
    """The node's own pipeline: the idle downstream slot's task is claimed in the batch of the
    upstream hand-off, and the slot is woken; its next claim is a prefetch hit (no statement)."""
    from scalebox_hpc.launcher.wakeups import Wakeups

    q = Recorder(tasks=0)
    wakeups = Wakeups()
    d = dispatcher(q, wakeups=wakeups)
    port = d.port()
    down = port.create_slot(2, host="h", seq=0, pid=1, work_dir="/")
    assert port.claim(1, 2, host="h", slot_id=down, slot_seq=0) == []  # idle: nothing yet
    seen = wakeups.generation(2)
    q.free = [41]  # the hand-off's message
    up = Task(9, 1, 1, "b", {}, -3)
    sent = TaskResult(status=0, started_at=datetime.now(UTC), finished_at=datetime.now(UTC), messages=[Message("m")])
    assert port.complete(up, sent, slot_id=99, host="h", sender=SENDER, modules={"a": SENDER, "b": SINK}) == 1
    q.gate.set()
    d.call("app_uid", 1)  # the batch of the hand-off is over
    assert wakeups.generation(2) == seen + 1
    wakeups.notify(2)  # the hand-off's NOTIFY comes back: its slots were woken already
    assert wakeups.generation(2) == seen + 1
    wakeups.notify(2)  # anyone else's
    assert wakeups.generation(2) == seen + 2
    assert d.stats.eager_claims == 1
    assert q.calls[-2:] == [("complete", 9), ("claim", [(down, 1)])]
    assert [t.id for t in port.claim(1, 2, host="h", slot_id=down, slot_seq=0)] == [41]
    assert d.stats.prefetch_hits == 1
    d.close()


def test_a_slots_claim_sent_before_its_eager_claim_came_back_gets_that_task() -> None:
    """The race of a two-stage pipeline on one node: the hand-off's eager claim for the idle
    downstream slot wakes it; the slot looks at its buffer before that claim came back, finds
    nothing and sends its own claim. That claim is answered with the task now buffered (it
    came back empty, and the slot slept beside its next task until the next wake-up: the
    hand-off benchmark measured 57 ms run to run where 9 ms was due)."""
    from scalebox_hpc.launcher.wakeups import Wakeups

    q = Recorder(tasks=0)
    d = dispatcher(q, wakeups=Wakeups())
    port = d.port()
    down = port.create_slot(2, host="h", seq=0, pid=1, work_dir="/")
    assert port.claim(1, 2, host="h", slot_id=down, slot_seq=0) == []  # idle
    q.free = [41]
    up = Task(9, 1, 1, "b", {}, -3)
    sent = TaskResult(status=0, started_at=datetime.now(UTC), finished_at=datetime.now(UTC), messages=[Message("m")])
    assert port.complete(up, sent, slot_id=99, host="h", sender=SENDER, modules={"a": SENDER, "b": SINK}) == 1
    q.gate.set()
    d.call("app_uid", 1)  # the hand-off's batch, its eager claim included, is over
    assert d.held(down) == (41,)
    statements = len(q.calls)
    # the slot's own claim, sent when its buffer was still empty
    got = d.call("claim", 1, 2, host="h", slot_id=down, slot_seq=0, limit=1, lease_seconds=30.0, semaphore=None)
    assert [t.id for t in got] == [41]
    assert d.held(down) == ()
    assert len(q.calls) == statements  # a prefetch hit: no statement
    d.close()


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn's result, or a test failure if it has not returned within ``seconds`` (a dead
    dispatcher thread leaves its callers waiting forever)."""
    out: list[Any] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            failed.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"no answer within {seconds} s: the dispatcher thread is gone"
    if failed:
        raise failed[0]
    return out[0]


def test_an_idle_slot_gets_its_eager_claim_after_another_slot_found_its_module_full() -> None:
    """A's claim found nothing (idle), then B's claim of the same module came back full (the
    module no longer counts as dry): a hand-off writing to the module still claims for A (the
    eager claim once read a loop variable of the dry list here, unbound when that list was empty)."""
    q = Recorder(tasks=0)
    d = dispatcher(q)
    port = d.port()
    a = port.create_slot(2, host="h", seq=0, pid=1, work_dir="/")
    b = port.create_slot(2, host="h", seq=1, pid=1, work_dir="/")
    assert port.claim(1, 2, host="h", slot_id=a, slot_seq=0) == []
    q.free = list(range(5, 40))
    assert [t.id for t in port.claim(1, 2, host="h", slot_id=b, slot_seq=1)][:1] == [5]
    sent = TaskResult(status=0, started_at=datetime.now(UTC), finished_at=datetime.now(UTC), messages=[Message("m")])
    assert port.complete(Task(9, 1, 1, "b", {}, -3), sent, slot_id=99, host="h", sender=SENDER,
                         modules={"a": SENDER, "b": SINK}) == 1
    q.gate.set()
    within(10, lambda: d.call("app_uid", 1))
    assert d.stats.eager_claims == 1
    assert port.claim(1, 2, host="h", slot_id=a, slot_seq=0) != []
    d.close()


def test_a_bug_in_a_batch_fails_its_calls_and_the_dispatcher_serves_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something of ours raising inside a batch must not kill the thread every slot waits on:
    the batch's unanswered calls get a SlotError naming the failure, later calls are served."""
    q = Recorder(tasks=0)
    d = dispatcher(q)
    port = d.port()
    slot = port.create_slot(2, host="h", seq=0, pid=1, work_dir="/")
    q.gate.set()

    def broken(batch: list) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(d, "_serve_batch", broken)
    with pytest.raises(SlotError, match=r"dispatcher failed \(RuntimeError: boom"):
        within(10, lambda: port.claim(1, 2, host="h", slot_id=slot, slot_seq=0))
    monkeypatch.undo()
    q.free = [7]
    assert [t.id for t in port.claim(1, 2, host="h", slot_id=slot, slot_seq=0)] == [7]
    d.close()


def test_no_eager_claim_for_a_busy_slot_nor_one_that_never_prefetches() -> None:
    q = Recorder(tasks=0)
    d = dispatcher(q)
    busy, gated = d.port(), d.port(prefetch=False)
    b_id = busy.create_slot(2, host="h", seq=0, pid=1, work_dir="/")
    g_id = gated.create_slot(2, host="h", seq=1, pid=1, work_dir="/")
    q.free = [5]
    assert [t.id for t in busy.claim(1, 2, host="h", slot_id=b_id, slot_seq=0)] == [5]  # has work
    assert gated.claim(1, 2, host="h", slot_id=g_id, slot_seq=1) == []  # idle, but never prefetches
    q.free = [6, 7]
    sent = TaskResult(status=0, started_at=datetime.now(UTC), finished_at=datetime.now(UTC), messages=[Message("m")])
    busy.complete(Task(9, 1, 1, "b", {}, -3), sent, slot_id=99, host="h", sender=SENDER,
                  modules={"a": SENDER, "b": SINK})
    q.gate.set()
    d.call("app_uid", 1)
    assert d.stats.eager_claims == 0 and q.free == [6, 7]
    d.close()


def test_top_ups_wait_after_a_short_claim_but_a_slots_own_claim_is_always_sent() -> None:
    now = [100.0]
    q = Recorder(tasks=3)
    q.gate.set()
    d = dispatcher(q, clock=lambda: now[0])
    port = d.port()
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    d._task_seconds[1] = 0.01  # short tasks: the slot prefetches
    got = claim(port, slot)  # asks 1 + a top-up, finds 3 of them: short
    assert [t.id for t in got] == [1]
    n = len([c for c in q.calls if c[0] == "claim"])
    assert [t.id for t in claim(port, slot)] == [2]  # a prefetch hit; its top-up is not sent
    assert [t.id for t in claim(port, slot)] == [3]
    assert claim(port, slot) == []  # the slot's own claim: sent
    d.call("app_uid", 1)  # the top-ups queued before have been served (or skipped)
    assert len([c for c in q.calls if c[0] == "claim"]) == n + 1
    assert d.stats.claims_skipped == 2
    now[0] += 1.0  # DRY_SECONDS later, top-ups are sent again
    q.free = [8, 9]
    d.refill(slot, 0, 1, 1, host="h", lease_seconds=30.0, semaphore=None)
    d.call("app_uid", 1)
    assert len([c for c in q.calls if c[0] == "claim"]) == n + 2
    d.close()


def test_a_local_wake_up_whose_echo_never_comes_does_not_swallow_a_later_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from scalebox_hpc.launcher import wakeups as w

    now = [10.0]
    monkeypatch.setattr(w.time, "monotonic", lambda: now[0])
    wk = w.Wakeups()
    wk.notify_local(3, 2)  # two transactions wrote to module 3
    assert wk.generation(3) == 1
    wk.notify(3)
    assert wk.generation(3) == 1  # one echo swallowed, one still expected
    now[0] += w.ECHO_SECONDS + 0.01  # it never came (no LISTEN, a reconnect)
    wk.notify(3)
    assert wk.generation(3) == 2


def test_a_slots_own_claim_after_a_short_one_waits_for_a_wake_up_when_there_are_wake_ups() -> None:
    from scalebox_hpc.launcher.wakeups import Wakeups

    now = [100.0]
    q = Recorder(tasks=1)
    wakeups = Wakeups()
    d = dispatcher(q, clock=lambda: now[0], wakeups=wakeups)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    other = d.port().create_slot(1, host="h", seq=1, pid=1, work_dir="/")
    assert [t.id for t in claim(port, slot)] == [1]  # asked 1, got 1: not short
    assert claim(port, slot) == []  # short: sent, found nothing
    sent = len([c for c in q.calls if c[0] == "claim"])
    assert claim(port, slot) == [] and claim(port, other) == []  # nothing woke the module: not sent
    assert len([c for c in q.calls if c[0] == "claim"]) == sent and d.stats.claims_skipped == 2
    q.free = [7]
    wakeups.notify(1)  # new work (anyone's NOTIFY)
    assert [t.id for t in claim(port, other)] == [7]
    assert claim(port, slot) == []  # sent: the claim just before found all it asked
    assert claim(port, slot) == []  # short again, nothing since: not sent
    now[0] += 1.0
    q.free = [8]  # came without a wake-up (a locality wait ran out): found at the next poll
    assert [t.id for t in claim(port, slot)] == [8]
    d.close()
    with_sem = Dispatcher(lambda: q, wakeups=wakeups)  # type: ignore[arg-type, return-value]
    sp = with_sem.port()
    s2 = sp.create_slot(1, host="h", seq=2, pid=1, work_dir="/")
    for _ in range(2):  # a semaphore's units come back without a NOTIFY: always asked
        assert sp.claim(1, 1, host="h", slot_id=s2, slot_seq=2, semaphore="gpu") == []
    assert with_sem.stats.claims_skipped == 0
    with_sem.close()


def test_a_batching_slot_takes_half_its_prefetch_at_once_and_hands_the_batch_off_in_one_statement() -> None:
    q, clock = Recorder(tasks=1000), Clock()
    d = dispatcher(q, clock=clock)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    _learn(d, port, slot, clock, 0.001)  # tasks of 1 ms: 100 ms of work = 100, above PREFETCH
    [first] = claim(port, slot)
    assert len(d.held(slot)) == 16  # a slot that never took a batch: PREFETCH
    more = port.take_more(1, 1, host="h", slot_id=slot, slot_seq=0, limit=63)
    assert [t.id for t in more] == list(range(first.id + 1, first.id + 9))  # half of 16
    barrier(d)  # the one refill for the batch: now up to BATCH_PREFETCH (100 ms of work here)
    assert q.calls[-1] == ("claim", [(slot, 100 - 8)])
    held = d.held(slot)
    assert set(t.id for t in more) <= set(held) and len(held) == 100 + 8  # the batch's leases are renewed
    port.hand_off_many([(t, result(), False, lambda s: False) for t in [first, *more]], slot_id=slot, host="h",
                       sender=REF, modules=MODULES, seconds=0.009)
    barrier(d)
    assert q.calls[-1] == ("complete_many", [t.id for t in [first, *more]])  # one statement for the batch
    assert len(d.held(slot)) == 100 and d._task_seconds[1] == pytest.approx(0.8 * 0.001 + 0.2 * 0.001)
    taken = port.take_more(1, 1, host="h", slot_id=slot, slot_seq=0, limit=3)
    port.set_slot_status(slot, "EXITED")  # taken but never handed off: back with the prefetch
    assert set(t.id for t in taken) <= set(q.released) and len(q.released) == 100 and d.held(slot) == ()
    d.close()


class Sharing(Recorder):
    """Released tasks are READY again: the next claim takes them first."""

    def release_ids(self, slot_id: int, task_ids: Sequence[int]) -> int:
        self.free[:0] = sorted(task_ids)
        return super().release_ids(slot_id, task_ids)


def test_a_slot_finding_the_queue_empty_takes_half_of_what_another_slot_holds() -> None:
    q, clock = Sharing(tasks=30), Clock()
    d = dispatcher(q, clock=clock)
    port = d.port()
    a = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    b = port.create_slot(1, host="h", seq=1, pid=1, work_dir="/")
    _learn(d, port, a, clock, 0.001)
    [first] = claim(port, a)  # a holds PREFETCH more: 18 of the 30 left for b
    assert len(d.held(a)) == 16
    taken = b_tasks = claim(port, b)
    while b_tasks:  # b empties the queue, then finds it dry
        b_tasks = claim(port, b)
        taken += b_tasks
        if len(taken) > 40:
            break
    # a gave back the newer half of its buffer each time b found the queue empty, down to one task
    assert d.stats.tasks_shared == 8 + 4 + 2 + 1 and d.held(a) == (first.id + 1,)
    assert set(q.released) <= {t.id for t in taken} | set(d.held(b))  # b took every one of them
    assert sorted([first.id, *d.held(a), *(t.id for t in taken), *d.held(b)]) == list(range(2, 31))  # each once
    d.close()


def test_a_heartbeat_waiting_with_hand_offs_and_claims_goes_first() -> None:
    """On a saturated database a batch's hand-offs and claims can outlast a lease: the beat
    that renews the node's leases must not wait behind them, or recovery takes live work."""
    q = Recorder()
    d = dispatcher(q)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=1, pid=1, work_dir="/")
    calls: list[Callable[[], Any]] = [
        lambda i=i: port.complete(Task(i, 1, 1, "b", {}, -3), result(), slot_id=slot, host="h", sender=REF,
                                  modules=MODULES) for i in (90, 91)]
    calls += [lambda: claim(port, slot), lambda: d.call("heartbeat_slots", [Beat(slot, "RUNNING", 30.0, ())])]
    together(d, q, calls)
    kinds = [kind for kind, _ in q.calls if kind != "status"]
    assert kinds[0] == "beat", kinds
    assert {"complete_many", "claim"} <= set(kinds[1:]), kinds
    d.close()


class SlowRecorder(Recorder):
    """A Recorder whose ``app_uid`` takes ``slow`` seconds of the injected clock (a batch that
    waited that long on a saturated database), or fails after them when ``unreachable``."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock, self.slow, self.unreachable = clock, 0.0, False

    def app_uid(self, app_id: int) -> str:
        self.clock.now += self.slow
        if self.unreachable:
            raise DatabaseError("cannot reach PostgreSQL")
        return "uid"

    def batch(self, d: Dispatcher, seconds: float, *, unreachable: bool = False) -> None:
        """One batch of ``seconds`` through ``d``."""
        self.slow, self.unreachable = seconds, unreachable
        with contextlib.suppress(DatabaseError):
            d.call("app_uid", 1)
        self.slow, self.unreachable = 0.0, False


def test_leases_stretch_by_the_slowest_recent_batch_and_shrink_back() -> None:
    """A beat queued behind a 25 s batch arrives 25 s late: the leases the node grants must
    outlast that, or recovery hands a live node's tasks to another node that runs them again."""
    clock = Clock()
    q = SlowRecorder(clock)
    d = dispatcher(q, clock=clock)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=1, pid=1, work_dir="/")
    beat = [Beat(slot, "RUNNING", 30.0, ())]
    q.batch(d, 5.0)  # a fifth of the lease at most: a beat still comes in time
    d.call("heartbeat_slots", beat)
    q.batch(d, 50.0, unreachable=True)  # an outage: every node waits it out, no stretch
    d.call("heartbeat_slots", beat)
    q.batch(d, 25.0)
    d.call("heartbeat_slots", beat)
    claim(port, slot)
    clock.now += 200.0  # still recent
    d.call("heartbeat_slots", beat)
    clock.now += 101.0  # the slow batch is 301 s old: forgotten
    d.call("heartbeat_slots", beat)
    q.batch(d, 1000.0)  # stretched to the cap only
    d.call("heartbeat_slots", beat)
    assert q.leases == [("beat", 30.0), ("beat", 30.0), ("beat", 80.0), ("claim", 80.0), ("beat", 80.0),
                        ("beat", 30.0), ("beat", 120.0)]
    d.close()


def test_leases_granted_before_any_batch_was_measured_get_the_cap() -> None:
    """A fleet that starts at once meets its slowest batches before any has ended: until one
    batch (that neither connected nor met an outage) is measured, leases get the full stretch."""
    clock = Clock()
    q = SlowRecorder(clock)
    d = dispatcher(q, clock=clock)
    beat = [Beat(7, "RUNNING", 30.0, ())]
    q.batch(d, 50.0, unreachable=True)  # the node's first batch, an outage: it measures nothing
    d.call("heartbeat_slots", beat)
    q.batch(d, 1.0)  # (the beat's batch ended well too: measured)
    d.call("heartbeat_slots", beat)
    assert q.leases == [("beat", 120.0), ("beat", 30.0)]
    d.close()


def test_a_hand_off_whose_row_another_transaction_held_is_tried_again_until_recorded() -> None:
    """0030: an item answered HAND_OFF_BUSY (another transaction held its task row: often a
    claim statement that only looked at it) is kept, its lease renewed with the slot's beat,
    and tried again after BUSY_RETRY_SECONDS, doubling, by the batch's path (never a wait for
    the lock); one busy for BUSY_GIVE_UP_SECONDS is given up as a lost lease."""
    q, clock = Recorder(), Clock()
    q.busy = {1: 2, 3: 10**6}
    d = dispatcher(q, clock=clock)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    port.hand_off_many([(Task(i, 1, 1, "b", {}, -3), result(), False, lambda status: False) for i in (1, 2, 3)],
                       slot_id=slot, host="h", sender=REF, modules=MODULES)
    def completes() -> list[tuple[str, Any]]:
        return [c for c in q.calls if c[0].startswith("complete")]

    barrier(d)
    assert d.held(slot) == (1, 3) and d.stats.hand_offs_busy == 2  # 2 recorded; 1 and 3 kept
    barrier(d)
    assert completes() == [("complete_many", [1, 2, 3])]  # not due yet
    clock.now += BUSY_RETRY_SECONDS
    barrier(d)
    assert completes()[1:] == [("complete_many", [1, 3])] and d.held(slot) == (1, 3)  # both busy again
    clock.now += BUSY_RETRY_SECONDS
    barrier(d)
    assert len(completes()) == 2  # the next try waits twice as long
    clock.now += BUSY_RETRY_SECONDS
    barrier(d)
    assert completes()[2:] == [("complete_many", [1, 3])] and d.held(slot) == (3,)  # 1 recorded, third try
    for _ in range(int(BUSY_GIVE_UP_SECONDS)):
        clock.now += 1.0
        barrier(d)
    assert d.held(slot) == ()  # 3 given up after BUSY_GIVE_UP_SECONDS (its lease ran out meanwhile)
    assert {kind for kind, _ in completes()} == {"complete_many"}  # a busy one alone too: never a wait
    assert d.stats.tasks_completed == 2
    d.close()


def test_a_release_that_found_rows_held_releases_them_again_shortly() -> None:
    """0030: the tasks a release could not give back (another transaction held their rows) are
    released again after BUSY_RETRY_SECONDS, renewed with the slot's beat meanwhile; they used
    to stay RUNNING until their lease expired and be recovered as stalled."""
    q, clock = Recorder(), Clock()
    q.busy_release = [41, 42]
    d = dispatcher(q, clock=clock)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    assert port.release(slot) == 0
    assert d.held(slot) == (41, 42)  # still the slot's: its beat renews them
    barrier(d)
    assert q.released == []  # not due yet
    clock.now += BUSY_RETRY_SECONDS
    barrier(d)
    assert q.released == [41, 42] and d.held(slot) == ()
    d.close()


def test_a_beat_that_comes_while_a_batch_is_served_waits_for_one_statement_not_the_batch() -> None:
    """A beat that arrives while a batch is being served goes between two of its statements
    (at 50 emulated nodes one batch held a 7.5 s claim and then the lease recovery: 14 s between
    two renewals, 15 s leases, 789 tasks of a live node recovered); the other calls that came
    meanwhile wait for the next batch, in order."""
    q = Recorder()
    d = dispatcher(q)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=1, pid=1, work_dir="/")
    q.claim_gate = threading.Event()
    batch = [lambda: claim(port, slot), lambda: port.set_slot_status(slot, "RUNNING")]
    runner = threading.Thread(target=lambda: together(d, q, batch))
    runner.start()
    assert q.claim_entered.wait(10)  # the batch's claim statement is running
    late: list[Any] = []
    threads = [threading.Thread(target=lambda: late.append(port.heartbeat_slots([Beat(slot, "RUNNING", 30.0, ())]))),
               threading.Thread(target=lambda: port.set_slot_status(slot, "READY"))]
    for t in threads:
        t.start()
    for _ in range(500):  # both wait in the inbox
        if d._inbox.qsize() >= 2:
            break
        threading.Event().wait(0.01)
    q.claim_gate.set()
    for t in [*threads, runner]:
        t.join(10)
    kinds = [(kind, arg[1] if kind == "status" else None) for kind, arg in q.calls]
    assert kinds == [("claim", None), ("beat", None), ("status", "RUNNING"), ("status", "READY")], kinds
    assert late == [[]]
    d.close()


def test_a_beat_built_before_the_slot_got_its_task_renews_that_task() -> None:
    """The slot's beat names the task it runs, but a beat built while the slot's claim waited
    is served after the claim answered: the dispatcher adds what it gave the slot and has not
    got back (seen at 50 emulated nodes: a 9 s claim, the beat served right after it without
    the 32 tasks it gave, whose 15 s leases expired). Handed over, the task is no longer added."""
    q = Recorder()
    d = dispatcher(q)
    port = d.port()
    slot = port.create_slot(1, host="h", seq=0, pid=1, work_dir="/")
    [task] = claim(port, slot)
    built = [Beat(slot, "RUNNING", 30.0, ())]  # before the slot had its task
    d.call("heartbeat_slots", built)
    port.complete(task, result(), slot_id=slot, host="h", sender=REF, modules=MODULES)
    d.call("heartbeat_slots", built)
    beats = [arg for kind, arg in q.calls if kind == "beat"]
    assert beats == [[(slot, (task.id,))], [(slot, ())]]
    d.close()


def test_a_slow_database_deepens_the_prefetch_to_a_second_of_work_at_most() -> None:
    """A refill waits for the batch being served and then its own, so the buffer holds
    REFILL_BATCHES batches' time of work; but every task held is renewed with every beat, so
    on a saturated database deeper buffers made slower batches, which made deeper buffers (50
    emulated nodes: ~7,000-10,000 tasks a node). At most PREFETCH_MAX_SECONDS of work."""
    from scalebox_hpc.launcher.dispatcher import BATCH_PREFETCH, PREFETCH_MAX_SECONDS, REFILL_BATCHES

    d = dispatcher(Recorder())
    d._task_seconds[1] = 0.01
    d._batch_seconds = 0.05  # fast: REFILL_BATCHES batches = 0.2 s of work
    assert d._depth(1, BATCH_PREFETCH) == round(REFILL_BATCHES * 0.05 / 0.01)
    d._batch_seconds = 10.0  # saturated: 40 s of work before; now a second's
    assert d._depth(1, BATCH_PREFETCH) == round(PREFETCH_MAX_SECONDS / 0.01) < BATCH_PREFETCH
    d.close()
