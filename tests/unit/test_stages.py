"""Stage jobs, pure parts: the scaling decision, the sbatch script, the pipeline's slurm: keys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scalebox_hpc.autoscaler import (
    FAILURE_LIMIT,
    STARVED_REASON,
    LaunchCommand,
    ModuleView,
    active_modules,
    decide,
    failing,
    place_jobs,
    stage_job,
    starved_modules,
    wants_job,
)
from scalebox_hpc.db.stages import StageJobRow, StageModule
from scalebox_hpc.errors import PipelineError
from scalebox_hpc.pipeline import SlurmSpec, load_pipeline, walltime_seconds
from scalebox_hpc.slurm.parse import NodeInfo
from scalebox_hpc.slurm.script import StageJob, StageScriptError, default_template, directives, read_template, render
from tests.helpers import write_app

GOLDEN = Path(__file__).parent / "slurm_fixtures" / "stage.sbatch.golden"


def view(**kw: object) -> ModuleView:
    base: dict[str, object] = {"name": "calc", "min_jobs": 0, "max_jobs": 4, "tasks_per_job": 10, "ready": 0,
                               "live_jobs": 0}
    base.update(kw)
    return ModuleView(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "submit", "cancel", "target"), [
    ({}, 0, (), 0),                                                         # nothing to do, nothing running
    ({"ready": 1}, 1, (), 1),                                               # any work wants a job
    ({"ready": 25}, 3, (), 3),                                              # ceil(25 / 10)
    ({"ready": 1000}, 4, (), 4),                                            # capped by max_jobs
    ({"ready": 1000, "live_jobs": 4}, 0, (), 4),                            # already there: idempotent
    ({"ready": 1000, "live_jobs": 1}, 3, (), 4),
    ({"min_jobs": 2}, 2, (), 2),                                            # min_jobs even when idle
    ({"ready": 5, "live_jobs": 3, "pending_jobs": ("9", "8")}, 0, ("9", "8"), 1),  # scale down: pending only
    ({"ready": 5, "live_jobs": 3, "pending_jobs": ("9",)}, 0, ("9",), 1),   # a running job is never cancelled
    ({"ready": 0, "live_jobs": 2}, 0, (), 0),                               # running jobs idle out by themselves
    ({"ready": 50, "app_status": "PAUSED"}, 0, (), 0),                      # paused: no new jobs
    ({"ready": 50, "live_jobs": 2, "pending_jobs": ("7",), "app_status": "FINISHED"}, 0, ("7",), 0),
    ({"ready": 50, "failing": True}, 0, (), 4),                             # failing streak: no resubmits
    ({"ready": 50, "max_jobs": 0}, 0, (), 0),                               # `stage stop`
])
def test_decide(kw: dict[str, object], submit: int, cancel: tuple[str, ...], target: int) -> None:
    decision = decide(view(**kw))
    assert (decision.submit, decision.cancel) == (submit, cancel)
    if kw.get("app_status") != "PAUSED":
        assert decision.target == target


def test_failing_needs_a_full_streak_of_failures() -> None:
    assert failing(["FAILED"] * FAILURE_LIMIT)
    assert failing(["OUT_OF_MEMORY", "BOOT_FAIL", "FAILED", "COMPLETED"])
    assert not failing(["FAILED"] * (FAILURE_LIMIT - 1))
    assert not failing(["FAILED", "TIMEOUT", "FAILED", "FAILED"])  # a walltime end is not a failure
    assert not failing(["CANCELLED"] * FAILURE_LIMIT)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 1800), ("5:30", 330), ("1:00:00", 3600), ("2-0", 172800), ("1-02:03:04", 93784), ("0-0:1", 60),
])
def test_walltime_seconds(text: str, seconds: int) -> None:
    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "-5", "a-1"])
def test_walltime_seconds_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="time limit"):
        walltime_seconds(text)


def _job(**slurm: object) -> StageJob:
    return StageJob(app_id=7, module="calc", slurm=SlurmSpec.model_validate(slurm), slots_per_node=2,
                    work_root=Path("/shared/work"),
                    launcher=["/opt/venv/bin/python", "-m", "scalebox_hpc", "launcher", "--stage-job"])


def test_directives_in_fixed_order_with_optional_keys() -> None:
    opts = directives(_job(nodes=2, cpus_per_slot=3, time="1:00:00", mem="4G", partition="short",
                           account="proj1", extra_sbatch_args=["--exclusive"]))
    assert opts == [
        "--job-name=sbx-7-calc", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=6",
        "--signal=B:USR1@60", "--output=/shared/work/app-7/slurm/calc-%j.out",
        "--time=1:00:00", "--mem=4G", "--partition=short", "--account=proj1", "--exclusive",
    ]


def test_rendered_script_matches_the_golden_file() -> None:
    text = render(read_template(None), _job(time="30", gres="gpu:1", signal_grace_seconds=90))
    assert text == GOLDEN.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/bash\n") and "{{" not in text


@pytest.mark.parametrize(("template", "match"), [
    ("#!/bin/bash\n{{SBATCH_DIRECTIVES}}\n{{LAUNCHER}} {{NOPE}}\n", "unknown placeholder"),
    ("#!/bin/bash\n{{SBATCH_DIRECTIVES}}\n", "lacks {{LAUNCHER}}"),
    ("echo\n{{SBATCH_DIRECTIVES}}\n{{LAUNCHER}}\n", "#!"),
])
def test_bad_templates_are_refused(template: str, match: str) -> None:
    with pytest.raises(StageScriptError, match=match):
        render(template, _job())


def test_values_sbatch_would_misread_are_refused() -> None:
    with pytest.raises(StageScriptError, match="whitespace"):
        directives(_job(partition="a b"))
    with pytest.raises(StageScriptError, match="cannot read"):
        read_template("/nonexistent/stage.sbatch")


def test_shipped_template_is_the_one_in_launchers() -> None:
    assert default_template().read_text() == (Path(__file__).parents[2] / "launchers/slurm/stage.sbatch").read_text()


APP = """
name: s
slurm: {partition: batch, time: "10", max_jobs: 3, tasks_per_job: 5}
modules:
  a:
    sink_modules: [b]
    slurm: {nodes: 2, time: "20"}
  b:
    slots: [".*:4"]
  c:
    schedule_mode: HEAD
"""


def test_app_level_slurm_defaults_and_module_overrides(tmp_path: Path) -> None:
    spec = load_pipeline(write_app(tmp_path, APP, {"a/run.sh": "true\n", "b/run.sh": "true\n", "c/run.sh": "true\n"}))
    a, b, c = spec.modules
    assert (a.slurm.nodes, a.slurm.time, a.slurm.partition, a.slurm.max_jobs) == (2, "20", "batch", 3)
    assert (b.slurm.nodes, b.slurm.time, b.slurm.tasks_per_job) == (1, "10", 5)
    assert (c.slurm.nodes, c.slurm.max_jobs, c.slurm.slots_per_node) == (1, 1, 1)  # HEAD: one slot in the app
    command = LaunchCommand(python="/py", work_root=tmp_path)
    assert stage_job(1, b, command).slots_per_node == 4  # from slots: when slots_per_node is unset
    assert stage_job(1, a, command).launcher == ["/py", "-m", "scalebox_hpc", "launcher", "--stage-job",
                                                 "--app", "1", "--module", "a", "--work-root", str(tmp_path)]


@pytest.mark.parametrize(("slurm", "message"), [
    ("{nodez: 2}", "modules.a.slurm: unknown key 'nodez' (did you mean 'nodes'?)"),
    ("{time: 1h}", "time limit"),
    ("{min_jobs: 3, max_jobs: 1}", "min_jobs 3 is above max_jobs 1"),
    ("{nodes: 0}", "greater than or equal to 1"),
])
def test_bad_slurm_keys_name_file_line_and_key(tmp_path: Path, slurm: str, message: str) -> None:
    path = write_app(tmp_path, f"name: s\nmodules:\n  a:\n    slurm: {slurm}\n", {"a/run.sh": "true\n"})
    with pytest.raises(PipelineError, match=r"app\.yaml:4") as info:
        load_pipeline(path)
    assert message in str(info.value)


NODES = {
    "n1": NodeInfo("n1", "idle", 4), "n2": NodeInfo("n2", "mixed", 2), "n3": NodeInfo("n3", "idle", 4),
    "n4": NodeInfo("n4", "drained", 4), "n5": NodeInfo("n5", "mixed", 1),
}
HOLDERS = [("n4", 50), ("n2", 40), ("n5", 30), ("gone", 20), ("n1", 10), ("n3", 5)]


@pytest.mark.parametrize(("jobs", "per_job", "cpus", "busy", "expected"), [
    (1, 1, 2, (), [["n2"]]),                         # most inputs among the usable (n4 drained)
    (3, 1, 2, (), [["n2"], ["n1"], ["n3"]]),         # n5 lacks idle CPUs; an unknown host is skipped
    (2, 2, 2, (), [["n2", "n1"], ["n3"]]),           # the second job gets what is left
    (2, 1, 2, ("n2",), [["n1"], ["n3"]]),            # a node running the module already
    (1, 1, 8, (), [[]]),                             # nothing fits: Slurm chooses
    (2, 1, 1, (), [["n2"], ["n5"]]),
])
def test_place_jobs(jobs: int, per_job: int, cpus: int, busy: tuple[str, ...], expected: list[list[str]]) -> None:
    assert place_jobs(HOLDERS, NODES, jobs=jobs, nodes_per_job=per_job, cpus_per_node=cpus, busy=busy) == expected


def test_locality_is_nodelist_or_off() -> None:
    assert SlurmSpec().locality == "nodelist"
    assert SlurmSpec(locality="off").locality == "off"
    with pytest.raises(ValueError, match="locality"):
        SlurmSpec(locality="features")  # type: ignore[arg-type]


def _row(id_: int, name: str, sinks: list[str], ready: int = 0, running: int = 0) -> StageModule:
    return StageModule(id=id_, name=name, spec={"sink_modules": sinks}, ready=ready, running=running)


def test_active_modules_follow_the_sinks_downstream() -> None:
    rows = [_row(1, "a", ["b"]), _row(2, "b", ["c"]), _row(3, "c", ["b"]), _row(4, "x", [])]
    assert active_modules(rows) == set()
    rows[1] = replace(rows[1], running=1)
    assert active_modules(rows) == {"b", "c"}  # a is upstream of b: its work does not come from b
    rows[0] = replace(rows[0], ready=3)
    assert active_modules(rows) == {"a", "b", "c"}


def test_starved_modules_need_ready_tasks_and_a_job_waiting_for_nodes_or_limits() -> None:
    rows = [_row(1, "w", [], ready=5), _row(2, "s", [])]

    def job(module_id: int, reason: str, state: str = "PENDING", draining: bool = False) -> StageJobRow:
        return StageJobRow(id=1, module_id=module_id, slurm_job_id="7", reason=reason, state=state,
                           draining=draining, ended_at=None)

    assert starved_modules(rows, [job(1, "Resources")]) == {"w": "Resources"}
    assert starved_modules(rows, [job(1, "AssocGrpCpuLimit")]) == {"w": "AssocGrpCpuLimit"}
    assert starved_modules(rows, [job(2, "Resources")]) == {}  # s has nothing READY
    assert starved_modules(rows, [job(1, "Resources", state="RUNNING")]) == {}
    assert starved_modules(rows, [job(1, "Resources", draining=True)]) == {}
    assert starved_modules(rows, [job(1, "Priority"), job(1, "BeginTime")]) == {}
    assert all(STARVED_REASON.match(r) for r in ("QOSMaxJobsPerUserLimit", "QOSGrpCpuLimit", "Resources"))
    assert not any(STARVED_REASON.match(r) for r in ("InvalidQOS", "QOSNotAllowed", "ResourcesX", ""))


def test_a_module_wants_a_job_when_a_pass_would_submit_one() -> None:
    """What makes a leaving job's pass urgent although a pass already saw it drain."""
    spec = {"name": "w", "code_path": "/nonexistent", "slurm": {"min_jobs": 0, "max_jobs": 4, "tasks_per_job": 10}}
    row = StageModule(id=1, name="w", spec=spec)
    assert not wants_job(row)  # no work, no job: nothing to submit
    assert wants_job(replace(row, ready=1))  # work and no live job: a replacement
    assert not wants_job(replace(row, ready=5, live_jobs=1))  # its live (PENDING or RUNNING) job will take it
    assert wants_job(replace(row, ready=25, live_jobs=2))  # 3 wanted
    assert wants_job(replace(row, min_jobs=1))  # the `stage scale` override: a warm job
    assert not wants_job(replace(row, ready=5, app_status="FINISHED"))
    assert not wants_job(replace(row, ready=5, app_status="PAUSED"))
