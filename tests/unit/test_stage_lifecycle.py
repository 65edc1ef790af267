"""StageLifecycle's autoscale asks, with the database and Slurm faked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from scalebox_hpc import node
from scalebox_hpc.autoscaler import ScaleReport
from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.slurm import JobEnvironment


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
    assert asked == [{"leaving": True}] * 3 and sleeps == [node.LEAVING_BUDGET_WAIT] * 2


def test_a_leaving_job_that_is_not_the_last_does_not_wait() -> None:
    asked: list[dict[str, Any]] = []
    sleeps: list[float] = []
    lifecycle([ScaleReport(budget_spent=True)], asked, sleeps).leaving()  # the others will pass
    lifecycle([ScaleReport(elected=False)], asked, sleeps).leaving()
    assert asked == [{"leaving": True}] * 2 and sleeps == []


def test_the_wait_for_the_budget_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    spent = ScaleReport(budget_spent=True, urgent=True)
    sleeps: list[float] = []
    lifecycle([spent] * node.LEAVING_BUDGET_TRIES, [], sleeps).leaving()
    assert len(sleeps) == node.LEAVING_BUDGET_TRIES - 1
    assert "leaves without an autoscale pass" in caplog.text
