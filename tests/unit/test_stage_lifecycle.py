"""StageLifecycle (launcher/lifecycle.py, and node's over a database session): its drain, idle and
autoscale decisions, with the database and Slurm faked and time on an injected clock."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from scalebox_hpc import logs, node
from scalebox_hpc.autoscaler import ScaleReport
from scalebox_hpc.errors import DatabaseError, PrivilegeError
from scalebox_hpc.launcher import lifecycle as lc
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.slurm import JobEnvironment
from scalebox_hpc.testing import FakeClock


@contextlib.contextmanager
def no_database() -> Iterator[Any]:
    raise DatabaseError("not in this test")
    yield None  # pragma: no cover


def lifecycle(reports: list[ScaleReport], asked: list[dict[str, Any]], sleeps: list[float]) -> node.StageLifecycle:
    def scale(app_id: int, **kw: Any) -> ScaleReport:
        asked.append(kw)
        return reports.pop(0)

    spec = ModuleSpec.model_validate({"name": "w", "code_path": "/nonexistent"})
    return node.StageLifecycle(JobEnvironment(job_id="7", node_name="node1"), spec, 1, no_database, scale,
                               end=None, sleep=sleeps.append)


def test_the_last_leaving_job_waits_for_the_slurm_budget() -> None:
    spent = ScaleReport(budget_spent=True, urgent=True)
    asked: list[dict[str, Any]] = []
    sleeps: list[float] = []
    lifecycle([spent, spent, ScaleReport(urgent=True)], asked, sleeps).leaving()
    assert asked == [{"leaving": ("7", "")}] * 3 and sleeps == [node.LEAVING_BUDGET_WAIT] * 2


def test_a_leaving_job_that_is_not_the_last_does_not_wait() -> None:
    asked: list[dict[str, Any]] = []
    sleeps: list[float] = []
    lifecycle([ScaleReport(budget_spent=True)], asked, sleeps).leaving()  # the others will pass
    lifecycle([ScaleReport(elected=False)], asked, sleeps).leaving()
    assert asked == [{"leaving": ("7", "")}] * 2 and sleeps == []


def test_a_leaving_job_asks_again_when_another_pass_held_the_lock() -> None:
    """The pass holding the app's lock may have read the jobs before this one began draining:
    this job's own pass must still get its turn (it is urgent while no pass saw it drain)."""
    asked: list[dict[str, Any]] = []
    sleeps: list[float] = []
    lifecycle([ScaleReport(locked=False), ScaleReport(locked=False), ScaleReport(elected=False)], asked,
              sleeps).leaving()
    assert asked == [{"leaving": ("7", "")}] * 3 and sleeps == [lc.LEAVING_LOCK_WAIT] * 2


def test_the_wait_for_the_budget_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    spent = ScaleReport(budget_spent=True, urgent=True)
    sleeps: list[float] = []
    lifecycle([spent] * node.LEAVING_BUDGET_TRIES, [], sleeps).leaving()
    assert len(sleeps) == node.LEAVING_BUDGET_TRIES - 1
    assert "leaves without an autoscale pass" in caplog.text


# -- the launcher layer's StageLifecycle, on an injected clock and a fake job row ------------------
class FakeStore:
    """The stage job's row in memory; ``fail`` makes every call raise as a lost database would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.asked_to_drain = False
        self.end: datetime | None = None
        self.leave_idle = True
        self.fail = False

    def _call(self, *what: str) -> None:
        if self.fail:
            raise DatabaseError("the database is gone")
        self.calls.append(what)

    def job_started(self, job_id: str, cluster: str, alloc_cpus: int | None) -> None:
        self._call("started", job_id, str(alloc_cpus))

    def may_leave_idle(self, job_id: str, cluster: str) -> bool:
        self._call("may_leave_idle", job_id)
        return self.leave_idle

    def mark_leaving(self, job_id: str, cluster: str, *, finished: bool) -> None:
        self._call("leaving", job_id, str(finished))

    def job_flags(self, job_id: str, cluster: str) -> tuple[bool, datetime | None]:
        self._call("flags", job_id)
        return self.asked_to_drain, self.end


SPEC = ModuleSpec.model_validate({"name": "w", "code_path": "/nonexistent", "arguments": {"task_max_seconds": 60}})


def make(store: FakeStore, clock: FakeClock, *, nodeid: int = 0, end: datetime | None = None,
         reports: list[ScaleReport] | None = None) -> tuple[lc.StageLifecycle, list[dict[str, Any]]]:
    asked: list[dict[str, Any]] = []

    def scale(app_id: int, **kw: Any) -> ScaleReport:
        asked.append(kw)
        return (reports or [ScaleReport()]).pop(0) if reports else ScaleReport()

    job = JobEnvironment(job_id="7", node_name="node1", nodeid=nodeid)
    return lc.StageLifecycle(job, SPEC, 3, store, scale, end=end, interval=10.0, clock=clock), asked


def test_the_first_node_asks_for_a_pass_once_per_interval() -> None:
    clock, store = FakeClock(), FakeStore()
    hooks, asked = make(store, clock)
    assert hooks.tick() is False and asked == [] and store.calls == []  # not yet: 0 s of 10
    clock.advance(9.9)
    assert hooks.tick() is False and asked == []
    clock.advance(0.1)
    assert hooks.tick() is False and asked == [{"leaving": None}] and store.calls == [("flags", "7")]
    clock.advance(5)
    assert hooks.tick() is False and len(asked) == 1  # the next one is 10 s after the last
    clock.advance(5)
    hooks.tick()
    assert len(asked) == 2


def test_other_nodes_read_the_row_but_never_scale() -> None:
    clock, store = FakeClock(), FakeStore()
    hooks, asked = make(store, clock, nodeid=1)
    clock.advance(10)
    assert hooks.tick() is False and asked == [] and store.calls == [("flags", "7")]
    hooks.started()
    hooks.leaving()
    assert asked == [] and store.calls[1:] == [("leaving", "7", "False")]  # no start, no core-hours end


def test_a_task_that_no_longer_fits_the_walltime_drains(caplog: pytest.LogCaptureFixture) -> None:
    clock, store = FakeClock(), FakeStore()
    end = clock.now() + timedelta(seconds=66)  # a task needs 60 s + the 5 s margin
    hooks, _ = make(store, clock, end=end)
    assert hooks.tick() is False
    clock.advance(1.0)
    with caplog.at_level(logging.WARNING):
        assert hooks.tick() is True
    [record] = caplog.records
    assert "walltime: stage job 7 (module w)" in record.getMessage()
    assert "less than a task needs; draining" in record.getMessage()
    facts = logs.record_extras(record)
    assert facts["action"] == "stage_walltime_drain" and facts["slurm_job_id"] == "7"
    assert facts["module_name"] == "w" and facts["left_seconds"] == 65.0


def test_stage_stop_drains_at_the_next_read_of_the_row() -> None:
    clock, store = FakeClock(), FakeStore()
    hooks, asked = make(store, clock)
    store.asked_to_drain = True
    assert hooks.tick() is False  # the row is read once per interval
    clock.advance(10)
    assert hooks.tick() is True and asked == []


def test_the_end_time_comes_from_the_row_when_slurm_did_not_say() -> None:
    clock, store = FakeClock(), FakeStore()
    hooks, _ = make(store, clock)
    store.end = clock.now() + timedelta(hours=1)
    clock.advance(10)
    hooks.tick()
    assert hooks.end == store.end
    clock.advance(3600 - 10 - 65 + 1)
    assert hooks.tick() is True  # now the walltime rule applies


def test_idle_exit_follows_min_jobs_and_stays_up_when_it_cannot_ask(caplog: pytest.LogCaptureFixture) -> None:
    clock, store = FakeClock(), FakeStore()
    hooks, _ = make(store, clock)
    assert hooks.may_idle_exit() is True
    store.leave_idle = False
    assert hooks.may_idle_exit() is False
    store.fail = True
    with caplog.at_level(logging.WARNING):
        assert hooks.may_idle_exit() is False
    assert "cannot check its module's min_jobs (the database is gone); staying up" in caplog.text
    assert logs.record_extras(caplog.records[-1])["error"] == "the database is gone"


def test_the_first_node_records_its_start_and_end() -> None:
    clock, store = FakeClock(), FakeStore()
    hooks, asked = make(store, clock)
    hooks.started()
    hooks.leaving()
    assert store.calls == [("started", "7", "None"), ("leaving", "7", "True")]
    assert asked == [{"leaving": ("7", "")}]


def test_the_last_job_waits_for_the_budget_on_the_clock_not_in_real_time() -> None:
    clock, store = FakeClock(), FakeStore()
    spent = ScaleReport(budget_spent=True, urgent=True)
    hooks, asked = make(store, clock, reports=[spent, spent, spent, ScaleReport(urgent=True)])
    hooks.leaving()
    assert len(asked) == 4 and clock.monotonic() == 3 * lc.LEAVING_BUDGET_WAIT


def test_a_failed_store_or_pass_is_logged_with_its_error(caplog: pytest.LogCaptureFixture) -> None:
    clock, store = FakeClock(), FakeStore()
    store.fail = True

    def broken(app_id: int, **kw: Any) -> ScaleReport:
        raise DatabaseError("sacct failed: connection refused")

    hooks = lc.StageLifecycle(JobEnvironment(job_id="7", node_name="n1"), SPEC, 3, store, broken, end=None, clock=clock)
    with caplog.at_level(logging.WARNING):
        hooks.started()
        hooks.leaving()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "cannot record the start of stage job 7: the database is gone",
        "cannot mark stage job 7 draining: the database is gone",
        "autoscale failed for app 3 (asked by stage job 7): sacct failed: connection refused",
    ]
    assert [logs.record_extras(r)["action"] for r in caplog.records] == [
        "stage_start_unrecorded", "stage_drain_unrecorded", "autoscale_failed"]


def test_a_role_that_may_not_autoscale_is_told_once_and_not_asked_again(caplog: pytest.LogCaptureFixture) -> None:
    """A stage job connected as a launcher role (queue functions only): the autoscaler's first
    query is refused; one warning naming what to run instead, then no pass at all, leaving included."""
    clock, store = FakeClock(), FakeStore()
    asked: list[dict[str, Any]] = []

    def refused(app_id: int, **kw: Any) -> ScaleReport:
        asked.append(kw)
        raise PrivilegeError("the database refused: permission denied for table sbx_modules")

    hooks = lc.StageLifecycle(JobEnvironment(job_id="7", node_name="n1"), SPEC, 3, store, refused, end=None,
                              interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            clock.advance(10)
            hooks.tick()
        hooks.leaving()
    assert asked == [{"leaving": None}]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and logs.record_extras(warnings[0])["action"] == "autoscale_refused"
    assert "scalebox autoscale --app 3" in warnings[0].getMessage()
