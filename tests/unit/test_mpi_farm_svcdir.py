"""An MPI farm's worker rank: its run.sh gets the request directory rank 0 serves for the task,
under one parent per rank (a new task's directory sweeps only that rank's leftovers)."""

from __future__ import annotations

from pathlib import Path

from scalebox_hpc import taskapi
from scalebox_hpc.launcher.mpi_ranks import FarmRunner, farm_services_dir, serve_farm_task
from scalebox_hpc.launcher.mpi_wire import Plan
from scalebox_hpc.models import Task
from tests.unit.test_runner import context


def plan_for(tmp_path: Path) -> tuple[Plan, FarmRunner]:
    ctx = context(tmp_path, "true\n")
    plan = Plan(app_id=ctx.app_id, spec=ctx.module, ref=ctx.ref, modules=ctx.modules, slot_id=9, script_env={},
                work_dir=tmp_path / "app")
    return plan, FarmRunner(ctx, slot_id=9, plan=plan)


def test_a_tasks_run_gets_its_request_directory_and_no_socket(tmp_path: Path) -> None:
    plan, runner = plan_for(tmp_path)
    task = Task(id=41, app_id=plan.app_id, module_id=1, body="b", headers={}, status=-3, attempts=1)
    env = runner.env(task, tmp_path / "emit")
    assert env[taskapi.SERVICES_DIR_ENV] == str(tmp_path / "app" / "m" / ".services-slot9" / "rank2" / "svc-41")
    assert env["TASK_ID"] == "41" and taskapi.SERVICES_ENV not in env
    assert taskapi.SERVICES_DIR_ENV not in runner.env(None, None)  # setup.sh, teardown.sh: no task


def test_rank_zero_serves_one_directory_per_running_task(tmp_path: Path) -> None:
    plan, _ = plan_for(tmp_path)
    one = serve_farm_task(plan, 1, 5, lambda _req: 0)
    two = serve_farm_task(plan, 2, 6, lambda _req: 0)
    assert one.path == farm_services_dir(plan, 1, 5) and two.path == farm_services_dir(plan, 2, 6)
    assert one.path.is_dir() and two.path.is_dir()  # rank 2's start swept nothing of rank 1's
    assert (one.path.parent.stat().st_mode & 0o777) == 0o700
    one.stop()
    assert not one.path.exists() and two.path.is_dir()
    later = serve_farm_task(plan, 2, 7, lambda _req: 0)  # rank 2's next task: the old one's leftovers go
    assert not two.path.exists() and later.path.is_dir()
    later.stop()
    two.stop()


def test_a_quiet_directory_is_scanned_less_often_and_a_call_resets_the_pause() -> None:
    from scalebox_hpc.runtime.svcdir import POLL_SECONDS, next_wait

    waits = [POLL_SECONDS]
    for _ in range(12):
        waits.append(next_wait(waits[-1], 0, cap=0.2))
    assert waits[1] > waits[0] and waits[-1] == 0.2 and max(waits) == 0.2
    assert next_wait(0.2, 1, cap=0.2) == POLL_SECONDS
    assert next_wait(POLL_SECONDS, 0) == POLL_SECONDS  # the default (containers, collectives): unchanged
