"""What only InMemoryQueue has: outage injection, call counts, wake-ups, its clock, specs from dicts."""

from __future__ import annotations

import pytest

from scalebox_hpc.errors import DatabaseError, PipelineError
from scalebox_hpc.models import Message
from scalebox_hpc.testing import FakeClock, InMemoryQueue, app_spec

PIPE = {"name": "p", "parameters": {"start_task": "s0"},
        "modules": {"a": {"sink_modules": ["b"]}, "b": {"arguments": {"max_pending": 3}}}}


def test_fail_next_fails_that_many_calls_of_the_named_methods_then_heals() -> None:
    q = InMemoryQueue()
    app = q.create_app(PIPE)
    mid = q.modules(app)["a"].id
    q.fail_next(2, methods={"claim"})
    slot = q.create_slot(mid, host="h", seq=0, pid=1, work_dir="/tmp")  # not a claim: not failed
    for _ in range(2):
        with pytest.raises(DatabaseError, match="in-memory outage"):
            q.claim(app, mid, host="h", slot_id=slot, slot_seq=0)
    assert [t.body for t in q.claim(app, mid, host="h", slot_id=slot, slot_seq=0)] == ["s0"]
    assert (q.calls["claim"], q.calls["create_slot"]) == (3, 1)
    q.fail_next(10, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        q.modules(app)
    q.heal()
    assert list(q.modules(app)) == ["a", "b"]
    with pytest.raises(ValueError, match="not port methods"):
        q.fail_next(1, methods={"claim_tasks"})


def test_a_failed_call_changes_nothing() -> None:
    q = InMemoryQueue()
    app = q.create_app(PIPE)
    mid = q.modules(app)["a"].id
    slot = q.create_slot(mid, host="h", seq=0, pid=1, work_dir="/tmp")
    q.fail_next(1)
    with pytest.raises(DatabaseError):
        q.claim(app, mid, host="h", slot_id=slot, slot_seq=0)
    assert [r["status"] for r in q.tasks(app)] == [-1]


def test_ready_tasks_notify_their_module_as_the_database_trigger_does() -> None:
    woken: list[int] = []
    q = InMemoryQueue(notify=woken.append)
    app = q.create_app(PIPE)
    a, b = (q.modules(app)[m].id for m in "ab")
    assert woken == [a]  # the start task
    q.add_tasks(app, "b", ["x"], initial=True)
    assert woken == [a]  # INITIAL tasks wake nobody
    slot = q.create_slot(a, host="h", seq=0, pid=1, work_dir="/tmp")
    q.claim(app, a, host="h", slot_id=slot, slot_seq=0)
    q.release(slot)
    assert woken == [a, a]
    assert b not in woken


def test_the_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    start, mono = clock.now(), clock.monotonic()
    clock.sleep(2.5)
    clock.advance(0.5)
    assert (clock.now() - start).total_seconds() == 3.0
    assert clock.monotonic() - mono == 3.0


def test_a_spec_from_a_dict_checks_its_sinks() -> None:
    spec = app_spec(PIPE)
    assert [m.name for m in spec.modules] == ["a", "b"]
    assert str(spec.modules[0].code_path) == "/nonexistent/scalebox-app/a"
    with pytest.raises(PipelineError, match="unknown module 'nope'"):
        app_spec({"name": "x", "modules": {"a": {"sink_modules": ["nope"]}}})


def test_add_tasks_names_unknown_modules_and_takes_plain_bodies() -> None:
    from scalebox_hpc.errors import NotFoundError

    q = InMemoryQueue()
    app = q.create_app(PIPE)
    assert q.add_tasks(app, None, ["s1", Message("s2")]) == 2  # None: the first module
    with pytest.raises(NotFoundError):
        q.add_tasks(app, "zz", ["x"])
    with pytest.raises(NotFoundError):
        q.add_tasks(app, "a", [Message("x", module="zz")])
    assert [r["body"] for r in q.tasks(app, module="a")] == ["s0", "s1", "s2"]


def test_fail_next_knows_every_port_method_but_close() -> None:
    from scalebox_hpc.testing import _PORT_METHODS
    from tests.conformance.test_queue_port import _port_members

    assert sorted(_PORT_METHODS) == [m for m in _port_members() if m != "close"]
