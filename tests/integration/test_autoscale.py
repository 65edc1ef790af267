"""The daemonless autoscaler against a real PostgreSQL, with an in-memory Slurm standing in for sbatch/squeue."""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.autoscaler import FAILURE_LIMIT, Autoscaler, ClusterClients, LaunchCommand, may_leave_idle
from scalebox_hpc.db import apps, stages
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.errors import ScaleboxError
from scalebox_hpc.models import Message
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.slurm import JobInfo, SlurmCommandError, SlurmState
from scalebox_hpc.slurm.parse import NodeInfo
from tests.helpers import write_app

PYTHON = sys.executable  # a stage Python must pass check_interpreter: exist, be root's or ours

pytestmark = pytest.mark.pg


class FakeSlurm:
    """submit/status/cancel like SlurmClient, in memory; counts calls."""

    def __init__(self) -> None:
        self.ids = itertools.count(100)
        self.jobs: dict[str, SlurmState] = {}
        self.scripts: dict[str, str] = {}
        self.calls: list[str] = []
        self.refuse: str | None = None
        self.refuse_nodelist = False
        self.status_error = False
        self.args: dict[str, list[str]] = {}
        self.node_states: dict[str, NodeInfo] = {}
        self.reasons: dict[str, str] = {}

    @property
    def commands_run(self) -> int:
        return len(self.calls)

    def submit(self, script: str, extra_args: Sequence[str] = ()) -> str:
        self.calls.append("sbatch")
        if self.refuse:
            raise SlurmCommandError(["sbatch"], 1, self.refuse)
        if self.refuse_nodelist and any(a.startswith("--nodelist") for a in extra_args):
            raise SlurmCommandError(["sbatch"], 1, "sbatch: error: Batch job submission failed: "
                                                   "Requested node configuration is not available")
        job_id = str(next(self.ids))
        self.jobs[job_id] = SlurmState.PENDING
        self.scripts[job_id] = script
        self.args[job_id] = list(extra_args)
        return job_id

    def nodes(self, names: Iterable[str], partition: str | None = None) -> dict[str, NodeInfo]:
        self.calls.append("sinfo")
        return {n: self.node_states[n] for n in names if n in self.node_states}

    def status(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        self.calls.append("squeue")
        if self.status_error:
            raise SlurmCommandError(["squeue"], None, "timed out after 30 s")
        return {i: JobInfo(job_id=i, name="x", state=self.jobs[i], reason=self.reasons.get(i))
                for i in job_ids if i in self.jobs}

    def cancel(self, job_ids: Iterable[str], signal: str | None = None) -> None:
        self.calls.append("scancel")
        for i in job_ids:
            self.jobs[i] = SlurmState.CANCELLED


APP = """
name: scale
modules:
  work:
    slurm: {max_jobs: 4, tasks_per_job: 10, time: "5"}
  idle:
    slurm: {min_jobs: 1, max_jobs: 2}
"""


@pytest.fixture
def app(pg_dsn: str, tmp_path: Path) -> int:
    spec = load_pipeline(write_app(tmp_path / "app", APP, {"work/run.sh": "true\n", "idle/run.sh": "true\n"}))
    with connect(pg_dsn) as conn:
        return apps.create_app(conn, spec)


def add(pg_dsn: str, app_id: int, n: int, start: int = 0) -> None:
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "work", [Message(body=f"t{i}") for i in range(start, start + n)])


def scaler(pg_dsn: str, slurm: FakeSlurm, tmp_path: Path, conn: Any, interval: float = 0.0) -> Autoscaler:
    return Autoscaler(conn, {"": slurm}, LaunchCommand(python=PYTHON, work_root=tmp_path / "work"),
                      interval=interval)


def live(pg_dsn: str, app_id: int) -> dict[str, list[str]]:
    with connect(pg_dsn) as conn:
        rows = stages.jobs(conn, app_id)
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r.module, []).append(r.slurm_job_id)
    return out


def test_jobs_follow_the_queue_and_a_second_pass_changes_nothing(pg_dsn: str, app: int, tmp_path: Path) -> None:
    slurm = FakeSlurm()
    add(pg_dsn, app, 25)
    with connect(pg_dsn) as conn:
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True)
        assert {m: len(ids) for m, ids in report.submitted.items()} == {"work": 3, "idle": 1}
        again = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app)
        assert again.submitted == {} and again.cancelled == []
    assert len(live(pg_dsn, app)["work"]) == 3
    script = slurm.scripts[live(pg_dsn, app)["work"][0]]
    assert "#SBATCH --job-name=sbx-" in script and "--time=5" in script
    assert f"--stage-job --app {app} --module work --work-root {tmp_path / 'work'}" in script
    assert (tmp_path / "work" / f"app-{app}" / "slurm").is_dir()  # sbatch --output needs it

    add(pg_dsn, app, 100, start=25)  # deeper queue: up to max_jobs
    with connect(pg_dsn) as conn:
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app)
    assert len(report.submitted["work"]) == 1 and len(live(pg_dsn, app)["work"]) == 4

    with connect(pg_dsn) as conn:  # queue drained: surplus PENDING jobs are cancelled, idle's min_jobs stays
        conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s AND body <> 't0'", (app,))
        conn.commit()
        running = live(pg_dsn, app)["work"][-1]  # the oldest job started
        slurm.jobs[running] = SlurmState.RUNNING
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app)
    assert sorted(report.cancelled) == sorted(set(live_ids for live_ids in slurm.jobs if slurm.jobs[live_ids]
                                                  is SlurmState.CANCELLED))
    assert live(pg_dsn, app)["work"] == [running]  # one task left: one job, the running one
    assert len(live(pg_dsn, app)["idle"]) == 1


def test_new_jobs_ask_for_the_free_nodes_holding_the_inputs(pg_dsn: str, app: int, tmp_path: Path) -> None:
    queue = PgQueue(pg_dsn)
    try:  # no launcher is up: the scratch of earlier jobs still holds the files
        queue.index_scratch("node2", [(f"f{i}", 1) for i in range(12)], [])
        queue.index_scratch("node3", [(f"f{i}", 1) for i in range(12, 20)], [])
        queue.index_scratch("node1", [(f"f{i}", 1) for i in range(20, 30)], [])
    finally:
        queue.close()
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app, "work", [Message(f"t{i}", headers={"inputs": [f"f{i}"]}) for i in range(30)])
    slurm = FakeSlurm()
    slurm.node_states = {"node1": NodeInfo("node1", "drained", 2), "node2": NodeInfo("node2", "idle", 2),
                         "node3": NodeInfo("node3", "mixed", 1)}
    with connect(pg_dsn) as conn:
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=["work"])
    jobs = report.submitted["work"]
    assert [slurm.args[j] for j in jobs] == [["--nodelist=node2"], ["--nodelist=node3"], []]  # node1 is drained
    assert report.placed == {jobs[0]: ["node2"], jobs[1]: ["node3"]}
    assert slurm.calls.count("sinfo") == 1
    with connect(pg_dsn) as conn:  # a deeper queue: no second job on a node a pending job asked for
        apps.add_tasks(conn, app, "work", [Message(f"u{i}", headers={"inputs": [f"f{i}"]}) for i in range(10)])
        more = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=["work"])
    assert [slurm.args[j] for j in more.submitted["work"]] == [[]]

    slurm.refuse_nodelist = True  # a site whose sbatch refuses the list: the job goes anywhere
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_stage_jobs SET ended_at = now() WHERE app_id = %s", (app,))
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=["work"])
    assert len(report.submitted["work"]) == 4 and report.errors == []
    assert all(slurm.args[j] == [] for j in report.submitted["work"])


def test_rate_limit_and_the_lock(pg_dsn: str, app: int, tmp_path: Path) -> None:
    slurm = FakeSlurm()
    with connect(pg_dsn) as conn:
        scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, force=True)
    add(pg_dsn, app, 5)
    with connect(pg_dsn) as conn:
        assert scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app).submitted == {}  # too soon
        assert scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, force=True).submitted != {}

    with connect(pg_dsn) as holder, connect(pg_dsn) as other, holder.transaction():
        assert stages.try_lock(holder, app)
        report = scaler(pg_dsn, slurm, tmp_path, other).reconcile(app, force=True)
        assert report.locked is False and report.submitted == {}


def test_concurrent_scalers_never_overshoot(pg_dsn: str, app: int, tmp_path: Path) -> None:
    add(pg_dsn, app, 1000)
    slurm = FakeSlurm()
    lock = threading.Lock()
    original = slurm.submit

    def submit(script: str, extra: Sequence[str] = ()) -> str:
        with lock:
            return original(script, extra)

    slurm.submit = submit  # type: ignore[method-assign]

    def one() -> None:
        for _ in range(5):
            with connect(pg_dsn) as conn:
                scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app)

    with connect(pg_dsn) as conn:  # make it a Slurm app (as `scalebox submit` does), with no job yet
        stages.save_launch_settings(conn, app, PYTHON, str(tmp_path))
        conn.commit()
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(live(pg_dsn, app)["work"]) == 4 and slurm.calls.count("sbatch") == 4 + 1  # work max 4 + idle min 1


def test_sbatch_refusing_keeps_the_app_and_records_nothing(pg_dsn: str, app: int, tmp_path: Path) -> None:
    slurm = FakeSlurm()
    slurm.refuse = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination"
    add(pg_dsn, app, 5)
    with connect(pg_dsn) as conn:
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True)
    assert report.submitted == {} and any("Invalid account" in e for e in report.errors)
    assert live(pg_dsn, app) == {}
    with connect(pg_dsn) as conn:
        assert len(apps.list_tasks(conn, app, limit=100)) == 5


def test_squeue_failing_is_a_warning_not_a_crash(pg_dsn: str, app: int, tmp_path: Path) -> None:
    slurm = FakeSlurm()
    add(pg_dsn, app, 5)
    with connect(pg_dsn) as conn:
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True)
        slurm.status_error = True
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app)
    assert report.errors == [] and report.submitted == {}


def test_resubmit_after_timeout_but_not_after_repeated_failures(pg_dsn: str, app: int, tmp_path: Path) -> None:
    slurm = FakeSlurm()
    add(pg_dsn, app, 5)
    with connect(pg_dsn) as conn:
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("work",))
        [first] = live(pg_dsn, app)["work"]
        slurm.jobs[first] = SlurmState.TIMEOUT  # walltime: work remains, so a new job
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, only=("work",))
        assert len(report.submitted["work"]) == 1
        for _ in range(FAILURE_LIMIT):
            [job] = live(pg_dsn, app)["work"]
            slurm.jobs[job] = SlurmState.FAILED
            scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, only=("work",))
        assert "work" not in live(pg_dsn, app)  # three failures in a row: stop
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, only=("work",))
        assert report.submitted == {} and "failed in a row" in report.decisions[0].reason
        assert scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("work",)).submitted


def test_draining_jobs_are_replaced_and_unmanaged_apps_left_alone(pg_dsn: str, app: int, tmp_path: Path) -> None:
    slurm = FakeSlurm()
    add(pg_dsn, app, 5)
    with connect(pg_dsn) as conn:
        assert scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app).managed is False  # never submitted
        assert slurm.calls == []
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("work",))
        [job] = live(pg_dsn, app)["work"]
        slurm.jobs[job] = SlurmState.RUNNING
        assert stages.mark_draining(conn, job) and not stages.mark_draining(conn, job)
        conn.commit()
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, only=("work",))
    assert len(report.submitted["work"]) == 1  # the draining job is no longer capacity


def test_idle_jobs_end_only_above_min_jobs(pg_dsn: str, app: int, tmp_path: Path) -> None:
    """`idle` keeps min_jobs 1: of two idle running jobs one may end, the last stays up (no
    exit-and-resubmit churn through the Slurm queue); a pending job does not count as kept."""
    slurm = FakeSlurm()
    with connect(pg_dsn) as conn:
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("idle",))
        stages.set_bounds(conn, app, "idle", 2, 2)
        conn.commit()
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("idle",))
        first, second = sorted(live(pg_dsn, app)["idle"])
        slurm.jobs[first] = SlurmState.RUNNING
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("idle",))  # refresh states
        stages.set_bounds(conn, app, "idle", None, None)
        conn.commit()
        # min_jobs 1 (the file's), first RUNNING, second still PENDING: first is the one running job
        assert may_leave_idle(conn, first) is False
        slurm.jobs[second] = SlurmState.RUNNING
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("idle",))
        conn.commit()
        assert may_leave_idle(conn, second) is True  # two run: one may go, and is marked draining
        conn.commit()
        assert may_leave_idle(conn, first) is False  # the other stays
        assert may_leave_idle(conn, second) is True  # asking again (another node of the job) agrees
        assert may_leave_idle(conn, "999999") is True  # not a stage job the database knows
        stages.set_bounds(conn, app, "idle", 0, 2)  # `scalebox stage scale --min 0`
        conn.commit()
        assert may_leave_idle(conn, first) is True
        conn.commit()
    with connect(pg_dsn) as conn:
        draining = {r.slurm_job_id: r.draining for r in stages.jobs(conn, app)}
    assert draining == {first: True, second: True}


def test_two_idle_jobs_asking_together_leave_one(pg_dsn: str, app: int, tmp_path: Path) -> None:
    """The module row lock: two jobs asking at the same moment never both leave below min_jobs."""
    slurm = FakeSlurm()
    with connect(pg_dsn) as conn:
        stages.set_bounds(conn, app, "idle", 2, 2)
        conn.commit()
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("idle",))
        ids = live(pg_dsn, app)["idle"]
        for job in ids:
            slurm.jobs[job] = SlurmState.RUNNING
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("idle",))
        stages.set_bounds(conn, app, "idle", 1, 2)
        conn.commit()
    answers: dict[str, bool] = {}
    barrier = threading.Barrier(len(ids))

    def ask(job: str) -> None:
        with connect(pg_dsn) as conn:
            barrier.wait()
            answers[job] = may_leave_idle(conn, job)
            conn.commit()

    threads = [threading.Thread(target=ask, args=(job,)) for job in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers.values()) == [False, True], answers


def submitted_app(pg_dsn: str, app: int, tmp_path: Path) -> None:
    """Make it a Slurm app, as `scalebox submit` does (else a non-forced pass leaves it alone)."""
    with connect(pg_dsn) as conn:
        stages.save_launch_settings(conn, app, PYTHON, str(tmp_path))
        conn.commit()


def test_n_stage_jobs_make_the_slurm_calls_of_one(pg_dsn: str, app: int, tmp_path: Path) -> None:
    """Eight stage jobs (each its own connection and scaler) ask for a pass in the same interval:
    one is elected and runs one squeue, the others run no Slurm command; the calls are counted."""
    slurm = FakeSlurm()
    add(pg_dsn, app, 25)
    with connect(pg_dsn) as conn:
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True)  # `scalebox submit`
    submitted = len(slurm.calls)  # 3 work + 1 idle sbatch
    with connect(pg_dsn) as conn:  # the interval since submit is over
        conn.execute("UPDATE sbx_apps SET autoscaled_at = now() - interval '1 hour' WHERE id = %s", (app,))
        conn.commit()
    reports = []
    for _ in range(8):
        with connect(pg_dsn) as conn:
            reports.append(scaler(pg_dsn, slurm, tmp_path, conn, interval=60).reconcile(app))
    assert [r.elected for r in reports] == [True] + [False] * 7
    assert slurm.calls[submitted:] == ["squeue"] and reports[0].slurm_calls == 1
    assert all(r.slurm_calls == 0 for r in reports[1:])
    with connect(pg_dsn) as conn:
        assert stages.slurm_calls_last_minute(conn, app) == (submitted + 1, 2)


def test_the_slurm_budget_skips_passes_but_not_the_users_commands(pg_dsn: str, app: int, tmp_path: Path) -> None:
    slurm = FakeSlurm()
    submitted_app(pg_dsn, app, tmp_path)
    with connect(pg_dsn) as conn:  # another app of the cluster spent the minute's budget
        conn.execute("INSERT INTO sbx_slurm_calls (cluster, calls) VALUES ('', 5)")
        conn.commit()
    add(pg_dsn, app, 5)
    with connect(pg_dsn) as conn:
        capped = Autoscaler(conn, {"": slurm}, LaunchCommand(python=PYTHON, work_root=tmp_path),
                            interval=0, rpc_per_minute=5)
        skipped = capped.reconcile(app)
        assert skipped.budget_spent and skipped.submitted == {} and slurm.calls == []
        leaving = capped.reconcile(app, leaving=("1", ""))  # the last job leaving waits (StageLifecycle retries)
        assert leaving.budget_spent and leaving.urgent
        forced = capped.reconcile(app, force=True)  # `scalebox submit` / `stage scale`: runs, counted
        assert forced.submitted and forced.slurm_calls == len(slurm.calls) > 0
        assert stages.slurm_calls_last_minute(conn, app)[0] == 5 + len(slurm.calls)
        conn.execute("UPDATE sbx_slurm_calls SET at = now() - interval '61 seconds'")  # a minute later
        assert not capped.reconcile(app).budget_spent


def test_the_last_leaving_job_scales_at_once(pg_dsn: str, app: int, tmp_path: Path) -> None:
    """A leaving job's pass runs within the interval only when no other live job of the app
    will pass soon; then a job for work that came in meanwhile is submitted at once."""
    slurm = FakeSlurm()
    add(pg_dsn, app, 5)
    with connect(pg_dsn) as conn:
        scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, force=True, only=("work",))
        stages.mark_app_scaled(conn, app)  # a pass moments ago
        conn.commit()
        [job] = live(pg_dsn, app)["work"]
        slurm.jobs[job] = SlurmState.RUNNING
        conn.execute("UPDATE sbx_stage_jobs SET state = 'RUNNING' WHERE slurm_job_id = %s", (job,))  # as seen
        add(pg_dsn, app, 20, start=5)
        assert scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(job, "")).elected is False
        stages.mark_draining(conn, job)  # it leaves: the app's last live job
        conn.commit()
        report = scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(job, ""))
    assert report.elected and report.urgent and len(report.submitted["work"]) == 3


def _running_jobs(pg_dsn: str, app: int, slurm: FakeSlurm, tmp_path: Path, tasks: int) -> list[str]:
    """``tasks`` work tasks, a forced pass (work's jobs and idle's warm one), work's jobs RUNNING
    (in Slurm and as last seen), and an app pass moments ago: the set-up of a drain tail."""
    add(pg_dsn, app, tasks)
    with connect(pg_dsn) as conn:
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True)
        jobs = live(pg_dsn, app)["work"]
        for job in jobs:
            slurm.jobs[job] = SlurmState.RUNNING
        conn.execute("UPDATE sbx_stage_jobs SET state = 'RUNNING' WHERE slurm_job_id = ANY(%s)", (jobs,))
        stages.mark_app_scaled(conn, app)
        conn.commit()
    return jobs


def test_jobs_leaving_together_make_one_pass_not_one_each(pg_dsn: str, app: int, tmp_path: Path) -> None:
    """Issue 17's drain tail: the app's three RUNNING jobs drain at once with no work left; each
    asks for its leaving pass, and each sees no RUNNING job left. The first pass runs (one
    squeue) and marks the three as seen; the other two passes are not urgent and, within the
    interval, run no Slurm command."""
    slurm = FakeSlurm()
    jobs = _running_jobs(pg_dsn, app, slurm, tmp_path, 30)
    assert len(jobs) == 3
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s", (app,))  # all done
        for job in jobs:  # each marks itself draining (StageLifecycle.leaving) before asking
            stages.mark_draining(conn, job)
        conn.commit()
    before = len(slurm.calls)
    reports = []
    for job in jobs:
        with connect(pg_dsn) as conn:
            reports.append(scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(job, "")))
    assert slurm.calls[before:] == ["squeue"]
    assert [(r.urgent, r.elected) for r in reports] == [(True, True), (False, False), (False, False)]
    with connect(pg_dsn) as conn:
        assert all(j.drain_seen for j in stages.jobs(conn, app, include_ended=True) if j.module == "work")
        again = scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(jobs[0], ""))
    assert not again.urgent and slurm.calls[before:] == ["squeue"]  # its second ask (at exit): no pass


def test_a_seen_leaving_job_still_gets_a_replacement_when_work_is_left(
    pg_dsn: str, app: int, tmp_path: Path,
) -> None:
    """The app's one work job drains while its tasks run (nothing READY): its pass sees it drain
    and submits nothing. Its tasks come back READY (released as it leaves); at its exit it asks
    again: its row is seen, but `work` has READY tasks and no live job, so the pass is urgent
    and submits the replacement (no other job would pass: the work would wait for a user)."""
    slurm = FakeSlurm()
    [job] = _running_jobs(pg_dsn, app, slurm, tmp_path, 5)
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_tasks SET status = -3 WHERE app_id = %s", (app,))  # RUNNING on the job
        stages.mark_draining(conn, job)
        conn.commit()
        first = scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(job, ""))
        assert first.urgent and first.submitted == {} and stages.drain_seen(conn, job)
        conn.execute("UPDATE sbx_tasks SET status = -1 WHERE app_id = %s", (app,))  # back to READY
        conn.commit()
        report = scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(job, ""))
    assert report.urgent and report.elected and len(report.submitted["work"]) == 1


def test_a_job_that_began_draining_after_a_pass_read_the_jobs_is_not_seen(
    pg_dsn: str, app: int, tmp_path: Path,
) -> None:
    """The mark names the rows the pass read: a job whose drain committed while another pass
    held the app's lock (and had read it as live) stays unseen, and its own pass runs."""
    slurm = FakeSlurm()
    first, second, third = _running_jobs(pg_dsn, app, slurm, tmp_path, 30)
    with connect(pg_dsn) as conn, connect(pg_dsn) as other:
        conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s", (app,))
        stages.mark_draining(conn, first)
        stages.mark_draining(conn, third)
        conn.commit()
        # a forced pass (e.g. `scalebox status`) is under way: it has read the jobs, holds the lock
        with other.transaction():
            assert stages.try_lock(other, app)
            seen = stages.jobs(other, app)
            locked_out = scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(first, ""))
            assert not locked_out.locked  # the lifecycle asks again a second later
            stages.mark_draining(conn, second)  # commits while the pass holds the lock
            conn.commit()
            stages.mark_drain_seen(other, [j.id for j in seen if j.draining])
        assert stages.drain_seen(conn, first) and not stages.drain_seen(conn, second)
        again = scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(first, ""))
        assert not again.urgent and not again.elected  # first's ask again: seen, nothing wanted
        report = scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(second, ""))
    assert report.urgent and report.elected  # second's own pass: nobody decided knowing it drains


def test_the_drain_tails_last_pass_asks_slurm_nothing(pg_dsn: str, app: int, tmp_path: Path) -> None:
    """Every live job of the app drains: a leaving pass's squeue would change no decision (a
    draining job is no capacity whatever Slurm says of it), so it runs none, yet it submits for
    the work left; the next other pass (`stage list`, `status`) records how the jobs ended."""
    slurm = FakeSlurm()
    jobs = _running_jobs(pg_dsn, app, slurm, tmp_path, 30)
    with connect(pg_dsn) as conn:
        stages.set_bounds(conn, app, "idle", 0, None)  # no warm job wanted
        [warm] = live(pg_dsn, app)["idle"]
        conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s AND body <> 't0'", (app,))  # t0 READY
        for job in [*jobs, warm]:
            stages.mark_draining(conn, job)
        conn.commit()
        before = len(slurm.calls)
        report = scaler(pg_dsn, slurm, tmp_path, conn, interval=3600).reconcile(app, leaving=(jobs[0], ""))
        assert report.urgent and len(report.submitted["work"]) == 1
        assert slurm.calls[before:] == ["sbatch"]
        for job in jobs:
            slurm.jobs[job] = SlurmState.COMPLETED
        scaler(pg_dsn, slurm, tmp_path, conn, interval=0).reconcile(app)  # `stage list`: not leaving
        ended = {j.slurm_job_id: j.state for j in stages.jobs(conn, app, include_ended=True) if j.ended_at}
    assert slurm.calls[before:] == ["sbatch", "squeue"]
    assert {job: ended.get(job) for job in jobs} == dict.fromkeys(jobs, "COMPLETED")


def test_idle_warm_jobs_give_their_nodes_to_a_starved_module(pg_dsn: str, app: int, tmp_path: Path) -> None:
    """`idle` keeps one warm job (min_jobs 1) and has no work; `work` has READY tasks and its job
    waits (Reason=Resources): the warm job drains, and `idle` gets no new one while `work`
    starves; once `work`'s job runs, `idle` has its min_jobs again."""
    slurm = FakeSlurm()
    with connect(pg_dsn) as conn:
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("idle",))
        [warm] = live(pg_dsn, app)["idle"]
        slurm.jobs[warm] = SlurmState.RUNNING
        add(pg_dsn, app, 5)
        scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True, only=("work",))
        [starved] = live(pg_dsn, app)["work"]
        slurm.reasons[starved] = "Priority"  # behind other users' jobs: nothing of ours to give up
        assert scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app).yielded == []
        slurm.reasons[starved] = "QOSMaxJobsPerUserLimit"
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app)
        assert report.yielded == [warm] and report.submitted == {}
        conn.commit()
        assert stages.is_draining(conn, warm)
        assert scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app).submitted == {}  # still starved: no new warm job
        slurm.jobs[warm] = SlurmState.COMPLETED
        slurm.jobs[starved] = SlurmState.RUNNING
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app)
    assert list(report.submitted) == ["idle"] and report.yielded == []


MULTI = """
name: multi
cluster: c1
clusters:
  c1: {}
  c2: {slurm: {partition: far}}
modules:
  near:
    slurm: {max_jobs: 2, tasks_per_job: 10}
  away:
    cluster: c2
    slurm: {max_jobs: 2, tasks_per_job: 10}
"""


def test_each_modules_jobs_go_to_its_cluster_with_its_own_budget(pg_dsn: str, tmp_path: Path) -> None:
    """One database, two clusters: `away`'s jobs are submitted, refreshed and cancelled through
    c2's client and recorded as c2's; each cluster's Slurm calls are counted apart, and a spent c2
    budget holds back only c2's module."""
    spec = load_pipeline(write_app(tmp_path / "multi", MULTI, {"near/run.sh": "true\n", "away/run.sh": "true\n"}))
    fakes = {"c1": FakeSlurm(), "c2": FakeSlurm()}
    fakes["c2"].ids = itertools.count(100_001)
    default = FakeSlurm()
    made: list[tuple[str, tuple[str, ...]]] = []

    def clients(cluster: str, via: Sequence[str]) -> Any:
        made.append((cluster, tuple(via)))
        return fakes[cluster]

    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, spec)
        apps.add_tasks(conn, app_id, "near", [Message(body=f"n{i}") for i in range(5)])
        apps.add_tasks(conn, app_id, "away", [Message(body=f"a{i}") for i in range(15)])

        def autoscale(force: bool = False) -> Any:
            return Autoscaler(conn, ClusterClients(default, clients),
                              LaunchCommand(python=PYTHON, work_root=tmp_path / "w"),
                              interval=0.0).reconcile(app_id, force=force)

        report = autoscale(force=True)
        assert {m: len(ids) for m, ids in report.submitted.items()} == {"near": 1, "away": 2}
        assert default.calls == [] and fakes["c1"].calls == ["sbatch"] and fakes["c2"].calls == ["sbatch", "sbatch"]
        assert sorted(made) == [("c1", ()), ("c2", ())]
        rows = {(j.module, j.cluster, j.slurm_job_id) for j in stages.jobs(conn, app_id)}
        assert rows == {("near", "c1", "100"), ("away", "c2", "100001"), ("away", "c2", "100002")}
        calls = {r["cluster"]: r["n"] for r in conn.execute(
            "SELECT cluster, sum(calls) AS n FROM sbx_slurm_calls WHERE app_id = %s GROUP BY 1", (app_id,))}
        assert calls == {"c1": 1, "c2": 2}

        # c2 spent its minute (another app, say): the next pass leaves c2 alone, scales c1
        conn.execute("INSERT INTO sbx_slurm_calls (cluster, app_id, calls) VALUES ('c2', %s, 1000)", (app_id,))
        conn.commit()
        fakes["c1"].calls.clear()
        fakes["c2"].calls.clear()
        report = autoscale()
        assert "away" in report.rate_limited and "near" not in report.rate_limited
        assert fakes["c2"].calls == [] and fakes["c1"].calls == ["squeue"]


def test_another_users_app_is_never_scaled_by_me(pg_dsn: str, app: int, tmp_path: Path) -> None:
    """A scrontab `scalebox autoscale` (or a `status`) of user A must not submit user B's stage
    jobs on A's account, running B's interpreter and scripts as A (audit F6)."""
    slurm = FakeSlurm()
    add(pg_dsn, app, 5)
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_apps SET owner = 'someone_else' WHERE id = %s", (app,))
        conn.commit()
        report = scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True)
    assert report.managed is False and report.submitted == {} and slurm.calls == []


def test_a_stage_python_others_can_write_is_refused(pg_dsn: str, app: int, tmp_path: Path) -> None:
    slurm = FakeSlurm()
    add(pg_dsn, app, 5)
    planted = tmp_path / "python"
    planted.write_text("#!/bin/sh\n")
    planted.chmod(0o777)
    with connect(pg_dsn) as conn:
        stages.save_launch_settings(conn, app, str(planted), str(tmp_path))
        stages.save_launch_settings(conn, app, PYTHON, str(tmp_path))  # a later save changes nothing
        conn.commit()
        assert stages.launch_settings(conn, app) == (str(planted), str(tmp_path))
        with pytest.raises(ScaleboxError, match=r"not safe to run.*mode 777"):
            scaler(pg_dsn, slurm, tmp_path, conn).reconcile(app, force=True)
    assert "sbatch" not in slurm.calls
