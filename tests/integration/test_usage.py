"""Core-hours per task: tasks of known CPU use run through the real launcher (bare processes, an
in-slot handler, Apptainer per task and warm) against a real PostgreSQL; the sbx_usage view's
numbers; a stage job's allocated core-hours.

The bounds are generous on purpose: these check that the measurement is the run's (a busy loop
of 0.5 s of CPU shows at least that much, a sleep next to none), not how fast the box is."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.db import stages as db_stages
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.usage import app_usage
from scalebox_hpc.models import Message
from scalebox_hpc.node import StageLifecycle
from scalebox_hpc.pipeline import ModuleSpec
from scalebox_hpc.slurm import JobEnvironment
from tests.components import apptainer_available, need, podman_available
from tests.integration.test_launcher import FAST, create, launch

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parents[2]
BUSY_SECONDS = 0.5
BURN = (f"import os, time\nt = time.process_time()\nwhile time.process_time() - t < {BUSY_SECONDS}: pass\n"
        "x = bytearray(int(os.environ.get(\"TOUCH_MIB\", \"64\")) * 1024 * 1024)\n")
"""Half a second of CPU (whatever the box's load), then TOUCH_MIB (64) MiB touched (a peak RSS above it)."""


def touch_mib() -> int:
    """What a task must touch for its peak to count: above this (launcher) process's own peak,
    which a child's pre-exec copy shares (the rule in runtime/local.py), by 64 MiB. A launcher
    inside a long pytest run has grown well past 64 MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 + 64
RUN_SH = f"""\
case "$1" in
  busy) python3 -c '{BURN}' ;;
  child) python3 -c '{BURN}' & wait ;;
  sleep) sleep 0.5 ;;
esac
"""


def execs(pg_dsn: str, app_id: int) -> dict[str, dict[str, Any]]:
    """The last execution of each task, by body, with its wall seconds."""
    with connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT t.body, e.*, extract(epoch FROM e.finished_at - e.started_at)::float AS wall_s "
            "FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id WHERE t.app_id = %s ORDER BY e.id",
            (app_id,)).fetchall()
    return {r["body"]: dict(r) for r in rows}


def cpu(row: dict[str, Any]) -> float:
    assert row["cpu_user_s"] is not None and row["cpu_system_s"] is not None, row
    return float(row["cpu_user_s"] + row["cpu_system_s"])


def add(pg_dsn: str, app_id: int, module: str, *bodies: str) -> None:
    from scalebox_hpc.db import apps

    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, module, [Message(b) for b in bodies])


def assert_busy_and_idle(got: dict[str, dict[str, Any]], busy: str, idle: str, *, rss: bool = True,
                         idle_cpu: float = 0.1) -> None:
    assert got[busy]["status"] == 0 and got[idle]["status"] == 0, got
    assert cpu(got[busy]) >= 0.9 * BUSY_SECONDS, got[busy]
    assert cpu(got[busy]) <= got[busy]["wall_s"] + 0.1, got[busy]  # one thread: never more than its wall time
    assert cpu(got[idle]) <= idle_cpu, got[idle]
    assert cpu(got[busy]) - cpu(got[idle]) >= 0.8 * BUSY_SECONDS  # the run's CPU, not the engine's start
    assert got[idle]["wall_s"] >= 0.45, got[idle]
    if rss:
        assert got[busy]["max_rss_kb"] >= 64 * 1024, got[busy]
        # sleep's peak is far below the launcher's (this pytest): unknown, never the launcher's
        assert got[idle]["max_rss_kb"] is None, got[idle]


def test_bare_runs_record_the_cpu_and_peak_rss_of_their_process_tree(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: usage
        modules:
          a:
            {FAST}
            environments: {{TOUCH_MIB: "{touch_mib()}"}}
    """, {"a/run.sh": RUN_SH})
    add(pg_dsn, app_id, "a", "busy", "child", "sleep")
    launch(pg_dsn, app_id, tmp_path / "work")
    got = execs(pg_dsn, app_id)
    assert_busy_and_idle(got, "busy", "sleep")
    assert cpu(got["child"]) >= 0.9 * BUSY_SECONDS  # a waited-for grandchild counts
    assert got["child"]["max_rss_kb"] >= 64 * 1024

    with connect(pg_dsn) as conn:
        [row] = app_usage(conn, app_id)
    assert (row.tasks, row.executions, row.measured) == (3, 3, 3)
    assert row.cpu_core_hours == pytest.approx(sum(cpu(r) for r in got.values()) / 3600)
    assert row.wall_hours == pytest.approx(sum(r["wall_s"] for r in got.values()) / 3600)
    assert row.max_rss_kb == max(r["max_rss_kb"] for r in got.values() if r["max_rss_kb"] is not None)
    assert row.alloc_core_hours is None and row.efficiency is None  # no stage job: nothing allocated


HANDLER = f'''
import time

def handle(task):
    if task.body == "busy":
        t = time.process_time()
        while time.process_time() - t < {BUSY_SECONDS}:
            pass
        task.send_message("next")  # a JSON reply carries the usage too
    elif task.body == "sleep":
        time.sleep(0.5)
    return 0
'''


def test_an_in_slot_handler_records_what_each_task_cost_its_worker(pg_dsn: str, tmp_path: Path) -> None:
    for module in ("a", "b"):
        (tmp_path / "app" / module).mkdir(parents=True)
        (tmp_path / "app" / module / "h.py").write_text(textwrap.dedent(HANDLER))
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: usage-handler
        modules:
          a:
            handler: "h.py:handle"
            sink_modules: [b]
            {FAST}
          b:
            handler: "h.py:handle"
            {FAST}
    """, {})
    add(pg_dsn, app_id, "a", "sleep", "busy")
    launch(pg_dsn, app_id, tmp_path / "work")
    got = execs(pg_dsn, app_id)
    assert_busy_and_idle(got, "busy", "sleep", rss=False)
    assert got["next"]["status"] == 0 and cpu(got["next"]) <= 0.1  # the plain (binary) reply


def test_the_view_counts_a_stage_jobs_allocated_core_hours(pg_dsn: str, tmp_path: Path) -> None:
    """A stage job's first node records its CPUs (SLURM_JOB_CPUS_PER_NODE=4(x2): 8) and its start;
    leaving records its end: one hour of it is 8 allocated core-hours, and the efficiency is the
    tasks' CPU over that."""
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: usage-stage
        modules:
          a:
            {FAST}
    """, {"a/run.sh": RUN_SH})
    add(pg_dsn, app_id, "a", "busy")
    launch(pg_dsn, app_id, tmp_path / "work")
    with connect(pg_dsn, autocommit=True) as conn:
        module = {r.name: r for r in db_stages.modules(conn, app_id)}["a"]
        db_stages.record_job(conn, app_id, module.id, "4242", cluster="")
        env = {"SLURM_JOB_ID": "4242", "SLURMD_NODENAME": "n1", "SLURM_JOB_NODELIST": "n[1-2]",
               "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_CPUS_PER_NODE": "4(x2)"}
        job = JobEnvironment.from_env(env)
        assert job.cpus == 8

        def session() -> Any:
            return connect(pg_dsn, autocommit=True)

        hooks = StageLifecycle(job, ModuleSpec.model_validate(module.spec), app_id, session,
                               lambda *a, **k: None, end=None)
        hooks.started()
        conn.execute("UPDATE sbx_stage_jobs SET started_at = started_at - interval '1 hour' "
                     "WHERE slurm_job_id = '4242'")
        hooks.leaving()  # the scale callback returns None: no autoscale report
        job_row = conn.execute("SELECT * FROM sbx_stage_jobs WHERE slurm_job_id = '4242'").fetchone()
        assert job_row is not None and job_row["alloc_cpus"] == 8 and job_row["draining"]
        assert job_row["finished_at"] - job_row["started_at"] >= timedelta(hours=1)
        [row] = app_usage(conn, app_id)
    used = cpu(execs(pg_dsn, app_id)["busy"]) / 3600
    assert row.alloc_core_hours == pytest.approx(8.0, abs=0.01)
    assert row.efficiency == pytest.approx(used / row.alloc_core_hours)


# -- containers ---------------------------------------------------------------------------------------
CONTAINER_RUN_SH = """\
case "$1" in
  busy)  # until this bash has used 0.5 s of CPU (utime + stime in clock ticks, /proc/$$/stat)
    half=$(( $(getconf CLK_TCK 2>/dev/null || echo 100) / 2 ))
    while :; do
      for _ in 1 2 3 4 5 6 7 8 9 10; do :; done
      read -r -a f </proc/$$/stat
      [ $(( f[13] + f[14] )) -lt "$half" ] || break
    done ;;
  sleep) sleep 0.5 ;;
esac
"""
"""bash in the app-primes image (busybox, no Python): busy for half a second of its own CPU,
whatever the box's load."""


@pytest.fixture
def apptainer_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    reason = apptainer_available()
    if reason:
        need("apptainer", reason)
    monkeypatch.setenv("SCALEBOX_SIF_CACHE", str(tmp_path_factory.getbasetemp() / "usage-sif-cache"))
    monkeypatch.setenv("SCALEBOX_CONTAINERS", str(REPO / "containers"))
    monkeypatch.setenv("SCALEBOX_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.delenv("SCALEBOX_RUNTIME", raising=False)


def container_app(pg_dsn: str, tmp_path: Path, runtime: str, options: str) -> int:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: usage-{runtime}
        modules:
          a:
            base_image: app-primes
            arguments: {{runtime: {runtime}, slot_options: [{options}], max_idle_polls: 3,
                         sleep_interval_seconds: 0.2, heartbeat_seconds: 1}}
    """, {"a/run.sh": CONTAINER_RUN_SH})
    add(pg_dsn, app_id, "a", "busy", "sleep")
    return app_id


@pytest.mark.apptainer
@pytest.mark.parametrize("options", ["container_per_task", ""])
def test_apptainer_runs_record_their_cpu(apptainer_env: None, pg_dsn: str, tmp_path: Path, options: str) -> None:
    """Per task: wait4 of apptainer (its starter waits for the container's processes); warm:
    the agent's cutime/cstime around the request (no peak RSS there)."""
    app_id = container_app(pg_dsn, tmp_path, "apptainer", options)
    launch(pg_dsn, app_id, tmp_path / "work")
    got = execs(pg_dsn, app_id)
    # per task, the engine's own start (starter, SIF mount) is the run's too: ~0.2 s of CPU
    assert_busy_and_idle(got, "busy", "sleep", rss=False, idle_cpu=0.5 if options else 0.1)
    assert got["busy"]["max_rss_kb"] is None  # warm: not measured; per task: below the launcher's peak


@pytest.mark.podman
@pytest.mark.parametrize("options", ["container_per_task", ""])
def test_podman_runs_record_cpu_only_where_measured(monkeypatch: pytest.MonkeyPatch, pg_dsn: str, tmp_path: Path,
                                                    options: str) -> None:
    """Per task the container runs under conmon, not under us: NULL, never the client's CPU;
    warm, the agent inside the container measures its children."""
    reason = podman_available()
    if reason:
        need("podman", reason)
    monkeypatch.setenv("SCALEBOX_CONTAINERS", str(REPO / "containers"))
    monkeypatch.setenv("SCALEBOX_LOCAL_DIR", str(tmp_path / "local"))
    app_id = container_app(pg_dsn, tmp_path, "podman", options)
    launch(pg_dsn, app_id, tmp_path / "work")
    got = execs(pg_dsn, app_id)
    assert got["busy"]["status"] == 0 and got["sleep"]["status"] == 0, got
    if options:
        assert all(r["cpu_user_s"] is None and r["max_rss_kb"] is None for r in got.values()), got
    else:
        assert_busy_and_idle(got, "busy", "sleep", rss=False)
