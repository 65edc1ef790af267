"""MPI stages without Slurm: the venv's own MPICH launcher (``mpiexec -n N``, from the PyPI
``mpich`` wheel) runs ``scalebox launcher --mpi`` on this host, so rank 0, the farm's worker ranks
(the shared TaskRunner) and the collective's ranks run for real against PostgreSQL. The Slurm
variants (several nodes, srun steps, signals through Slurm) are in test_mpi_real.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.launcher.launcher import LauncherConfig
from scalebox_hpc.models import Message
from scalebox_hpc.node import run_launcher
from scalebox_hpc.pipeline import load_pipeline
from tests.components import need
from tests.conftest import REPO
from tests.helpers import write_app

pytestmark = [pytest.mark.pg]

MPI_PY = os.environ.get("SCALEBOX_TEST_MPI_PY") or sys.executable


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(MPI_PY).parent))
    probe = subprocess.run([MPI_PY, "-c", "import mpi4py"], capture_output=True, text=True, check=False)
    if found is None or probe.returncode != 0:
        need("mpi", f"no mpiexec next to {MPI_PY}, or mpi4py not importable: {probe.stderr.strip()}")
    assert found is not None
    return found


def stage(dsn: str, app_id: int, module: str, work: Path, ranks: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_", "SLURM_"))}
    env.update({"SCALEBOX_DSN": dsn, "SCALEBOX_MPI_RANKS": str(ranks), "SCALEBOX_HOST": "testhost",
                "PATH": f"{Path(MPI_PY).parent}{os.pathsep}{env.get('PATH', '')}"})
    argv = [mpiexec(), "-n", str(ranks), MPI_PY, "-m", "scalebox_hpc", "-v", "launcher", "--mpi", "-m", module,
            "--app", str(app_id), "--work-root", str(work), "--grace", "5"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"stage did not end in {timeout}s:\n{out[-4000:]}")
    return out


def tasks(dsn: str, app_id: int, module: str) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        return apps.list_tasks(conn, app_id, module=module, limit=10_000)


def test_primes_farm_and_collective_on_one_host_give_1229(pg_dsn: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, load_pipeline(REPO / "examples" / "app-primes-mpi" / "app.yaml"))
    total = stage(pg_dsn, app_id, "total", work, ranks=2)
    calc = stage(pg_dsn, app_id, "calc", work, ranks=3)
    run_launcher(pg_dsn, LauncherConfig(app_id=app_id, host="testhost", work_root=work, local=True,
                                        modules=("scatter", "gather")))
    out_total, out_calc = finish(total), finish(calc)
    with connect(pg_dsn) as conn:
        app = apps.get_app(conn, app_id)
        slots = conn.execute(
            "SELECT m.name, s.status FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id "
            "WHERE m.app_id = %s AND m.name IN ('total', 'calc')", (app_id,)).fetchall()
    assert app["result"] == "Result is 1229", (out_total[-3000:], out_calc[-3000:])
    calcs = tasks(pg_dsn, app_id, "calc")
    assert len(calcs) == 10 and {t["status"] for t in calcs} == {0}
    assert len(tasks(pg_dsn, app_id, "gather")) == 10
    assert total.returncode == 0 and calc.returncode == 0, (out_total[-3000:], out_calc[-3000:])
    assert sorted((r["name"], r["status"]) for r in slots) == [("calc", "EXITED"), ("total", "EXITED")]
    # every rank worked in the one layout of work dirs: <app>/<module>/<host>-rank<R>
    ranks = sorted(p.name for p in (work.glob(f"app-{app_id}*/calc/testhost-rank*")) if p.is_dir())
    assert ranks == ["testhost-rank1", "testhost-rank2"], sorted(str(p) for p in work.rglob("*rank*"))


def test_the_farm_keeps_per_task_semantics(pg_dsn: str, tmp_path: Path) -> None:
    """Timeout (124) kills only that rank's run, retries by exit code, task-exec files, hand-off:
    the worker ranks run tasks with the TaskRunner a slot uses."""
    marks = tmp_path / "marks"
    marks.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    app_yaml = write_app(tmp_path / "app", """
        name: farm
        modules:
          work:
            sink_modules: [sink]
            mpi: {mode: farm}
            parameters: {retry_rules: ["3:1"]}
            arguments: {task_max_seconds: 2, heartbeat_seconds: 4, max_idle_polls: 2,
                         sleep_interval_seconds: 0.2}
          sink:
            arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {
        "work/run.sh": f"""
            case $1 in
              slow) sleep 30 & wait ;;
              flaky) if [ ! -e {marks}/flaky ]; then touch {marks}/flaky; exit 3; fi ;;
              bad) exit 5 ;;
            esac
            echo '{{"userText": "rank '$SLOT_SEQ' slot '$SLOT_ID' '$MODULE_ID'"}}' > task-exec.json
            send-message "out-$1"
        """,
        "sink/run.sh": "true\n",
    })
    bodies = ["slow", "flaky", "bad", *[f"n{i}" for i in range(6)]]
    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, load_pipeline(app_yaml))
        apps.add_tasks(conn, app_id, "work", [Message(b) for b in bodies])
    proc = stage(pg_dsn, app_id, "work", work, ranks=3)
    run_launcher(pg_dsn, LauncherConfig(app_id=app_id, host="testhost", work_root=work, local=True,
                                        modules=("sink",)))
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    with connect(pg_dsn) as conn:
        listed = apps.list_tasks(conn, app_id, module="work", limit=100)
        rows = {t["body"]: apps.get_task(conn, t["id"]) for t in listed}
    status = {b: r["status"] for b, r in rows.items()}
    assert status == {"slow": 124, "flaky": 0, "bad": 5, **{f"n{i}": 0 for i in range(6)}}
    assert [e["status"] for e in rows["flaky"]["execs"]] == [3, 0]
    # the script environment of a slot: SLOT_SEQ the rank, SLOT_ID the stage's one slot, MODULE_ID set
    said = rows["n0"]["execs"][0]["user_text"].split()
    assert said[0] == "rank" and said[1] in {"1", "2"} and said[3] != "0" and said[4] == str(rows["n0"]["module_id"])
    sink = sorted(t["body"] for t in tasks(pg_dsn, app_id, "sink"))
    assert sink == sorted(["out-flaky", *[f"out-n{i}" for i in range(6)]])


COUNTER = '''
from scalebox_hpc import taskapi
from scalebox_hpc.errors import ScaleboxError


def count(task):
    """Every rank increments the semaphore ``hits``; rank 0 reads the result after the others."""
    got = int(taskapi.service("semaphore increment", "hits"))
    task.comm.Barrier()
    taskapi.service("variable set", f"rank{task.rank}", f"{got} of {task.size} {task.body}")
    try:
        taskapi.service("variable set", "_stage.python", "/tmp/evil")
    except ScaleboxError as exc:
        print(f"reserved refused on rank {task.rank}: {'reserved' in str(exc)}")
    task.comm.Barrier()
    if task.rank == 0:
        print("hits=" + taskapi.service("semaphore get", "hits"))
        print("vars=" + taskapi.service("variable list"))
'''


def test_collective_ranks_reach_semaphores_and_variables(pg_dsn: str, tmp_path: Path) -> None:
    """Every rank of a collective stage (not only rank 0, the one with a database connection)
    uses the task's semaphores and variables, through rank 0's request directory."""
    work = tmp_path / "work"
    work.mkdir()
    app_yaml = write_app(tmp_path / "app", """
        name: coll-svc
        parameters: {start_task: first}
        modules:
          c:
            mpi: {mode: collective, handler: "counter.py:count"}
            arguments: {heartbeat_seconds: 4, max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {})
    (tmp_path / "app" / "c").mkdir()
    (tmp_path / "app" / "c" / "counter.py").write_text(COUNTER)
    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, load_pipeline(app_yaml))
        apps.semaphore_create(conn, app_id, "hits", 0)
        apps.add_tasks(conn, app_id, "c", [Message("second")])
    out = finish(stage(pg_dsn, app_id, "c", work, ranks=3))
    done = tasks(pg_dsn, app_id, "c")
    assert {t["status"] for t in done} == {0}, (done, out[-3000:])
    with connect(pg_dsn) as conn:
        assert apps.semaphore_get(conn, app_id, "hits") == 6  # 3 ranks, 2 tasks: each call counted once
        variables = apps.variable_list(conn, app_id)
        execs = conn.execute("SELECT e.stdout FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id "
                             "WHERE t.app_id = %s ORDER BY e.id", (app_id,)).fetchall()
    assert sorted(variables) == ["rank0", "rank1", "rank2"], variables
    assert all(v.endswith("of 3 second") for v in variables.values()), variables
    first, second = (r["stdout"] for r in execs)
    assert "hits=3\n" in first and "hits=6\n" in second, (first, second)
    assert "reserved refused on rank 0: True" in first
    assert "_stage.python" not in variables
    # the request directories went with their tasks
    assert not [p for p in work.rglob("svc-*")], list(work.rglob("svc-*"))
