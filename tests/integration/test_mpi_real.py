"""MPI stages on the real local Slurm test-bed (MPICH + mpi4py wheels, `srun --mpi=pmi2`) and a real PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.launcher.launcher import LauncherConfig
from scalebox_hpc.models import Message
from scalebox_hpc.node import run_launcher
from scalebox_hpc.pipeline import load_pipeline
from tests.components import need, slurm_available
from tests.conftest import REPO
from tests.helpers import write_app

pytestmark = [pytest.mark.pg, pytest.mark.slurm]

MPI_PY = os.environ.get("SCALEBOX_TEST_MPI_PY") or sys.executable


@pytest.fixture(autouse=True)
def _mpi_testbed() -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)
    probe = subprocess.run([MPI_PY, "-c", "import mpi4py"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        need("mpi", f"mpi4py not importable by {MPI_PY}: {probe.stderr.strip()}")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def env_for(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_", "SLURM_"))}
    env["SCALEBOX_DSN"] = dsn
    env["MPIR_CVAR_CH4_NETMOD"] = "ofi"  # for MPI tasks' own programs (the stage runner sets it itself)
    env["PATH"] = f"{Path(MPI_PY).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def stage(dsn: str, app_id: int, module: str, work: Path, *, nodes: int, ranks: int,
          kill_on_bad_exit: bool = True, extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """An MPI stage job: srun --mpi=pmi2 ... scalebox launcher --mpi -m MODULE."""
    argv = ["srun", "--mpi=pmi2", f"--kill-on-bad-exit={int(kill_on_bad_exit)}", f"-N{nodes}", f"-n{ranks}",
            "--time=5", "-J", f"sbx_mpi_{module}", MPI_PY, "-m", "scalebox_hpc", "-v", "launcher", "--mpi",
            "-m", module, "--app", str(app_id), "--work-root", str(work), "--grace", "5", *extra]
    return subprocess.Popen(argv, env=env_for(dsn), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"stage did not end in {timeout}s:\n{out[-4000:]}")
    return out


def tasks(dsn: str, app_id: int, module: str | None = None) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        return apps.list_tasks(conn, app_id, module=module, limit=10_000)


def create(dsn: str, app_yaml: Path) -> int:
    with connect(dsn) as conn:
        return apps.create_app(conn, load_pipeline(app_yaml))


def test_primes_example_farm_and_collective_give_1229(pg_dsn: str, work: Path) -> None:
    # a segment that ranks killed during MPI_Init left behind: the stage's start removes it
    leaked = Path("/dev/shm") / f"mpich_shm_sbxtest_{os.getpid()}_0"
    leaked.write_bytes(b"\0" * 4096)
    os.utime(leaked, (time.time() - 600, time.time() - 600))
    app_id = create(pg_dsn, REPO / "examples" / "app-primes-mpi" / "app.yaml")
    total = stage(pg_dsn, app_id, "total", work, nodes=1, ranks=2)
    calc = stage(pg_dsn, app_id, "calc", work, nodes=2, ranks=3)
    run_launcher(pg_dsn, LauncherConfig(app_id=app_id, host="testhost", work_root=work, local=True,
                                        modules=("scatter", "gather")))
    out_total, out_calc = finish(total), finish(calc)
    with connect(pg_dsn) as conn:
        app = apps.get_app(conn, app_id)
    assert app["result"] == "Result is 1229", (out_total[-3000:], out_calc[-3000:])
    [scatter] = tasks(pg_dsn, app_id, "scatter")
    assert scatter["headers"]["total"] == 1229
    calcs = tasks(pg_dsn, app_id, "calc")
    assert len(calcs) == 10 and {t["status"] for t in calcs} == {0}
    assert {t["host"] for t in calcs} <= {"node1", "node2", "node3", "node4"}
    assert len(tasks(pg_dsn, app_id, "gather")) == 10
    assert total.returncode == 0 and calc.returncode == 0, (out_total[-3000:], out_calc[-3000:])
    with connect(pg_dsn) as conn:
        slots = conn.execute(
            "SELECT m.name, s.status FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id "
            "WHERE m.app_id = %s AND m.name IN ('total', 'calc')", (app_id,)).fetchall()
    assert sorted((r["name"], r["status"]) for r in slots) == [("calc", "EXITED"), ("total", "EXITED")]
    assert not leaked.exists()


FARM = """
    name: farm
    modules:
      work:
        sink_modules: [sink]
        mpi: {mode: farm, batch: 4}
        arguments: {heartbeat_seconds: 2, max_idle_polls: 2, sleep_interval_seconds: 0.2}
      sink:
        arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
"""


def test_killed_rank_loses_nothing_and_emits_nothing_twice(pg_dsn: str, work: Path, tmp_path: Path) -> None:
    app_id = create(pg_dsn, write_app(tmp_path / "app", FARM, {
        "work/run.sh": 'echo "$PPID" > "$WORK_DIR/rank.pid"; sleep 0.4; send-message "out-$1"\n',
        "sink/run.sh": "true\n",
    }))
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "work", [Message(str(i)) for i in range(40)])
    # no --kill-on-bad-exit: rank 0 itself must notice the silent rank and end the stage
    proc = stage(pg_dsn, app_id, "work", work, nodes=2, ranks=4, kill_on_bad_exit=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(t["status"] == 0 for t in tasks(pg_dsn, app_id, "work")) < 6:
        time.sleep(0.2)
    pids = sorted(work.rglob("rank.pid"))
    assert pids, "no worker rank ran a task"
    os.kill(int(pids[0].read_text()), signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode != 0 and "left to lease expiry" in out, out[-4000:]
    done_before = {t["id"] for t in tasks(pg_dsn, app_id, "work") if t["status"] == 0}
    assert 6 <= len(done_before) < 40
    # the lost task comes back by lease expiry (1.5 heartbeats), then a new stage job finishes the work
    queue = PgQueue(pg_dsn)
    deadline = time.monotonic() + 20
    recovered: list[tuple[int, int]] = []
    while time.monotonic() < deadline and not recovered:
        recovered = queue.recover_expired()
        time.sleep(0.5)
    queue.close()
    assert recovered and all(status == -1 for _, status in recovered)
    again = stage(pg_dsn, app_id, "work", work, nodes=2, ranks=3)
    # the sink's ordinary slot; both idle out once the whole app is quiet
    run_launcher(pg_dsn, LauncherConfig(app_id=app_id, host="testhost", work_root=work, local=True,
                                        modules=("sink",)))
    out2 = finish(again)
    assert again.returncode == 0, out2[-4000:]
    rows = tasks(pg_dsn, app_id, "work")
    assert len(rows) == 40 and {t["status"] for t in rows} == {0}, out2[-3000:]
    sink = tasks(pg_dsn, app_id, "sink")
    assert sorted(t["body"] for t in sink) == sorted(f"out-{i}" for i in range(40))
    with connect(pg_dsn) as conn:
        stalled = conn.execute(
            "SELECT count(*) AS n FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id "
            "WHERE t.app_id = %s AND e.status = 123", (app_id,)).fetchone()
    assert stalled is not None and stalled["n"] == len(recovered)


def test_singleton_guard_without_pmi(pg_dsn: str, work: Path) -> None:
    # every rank a singleton (no PMI): the communicator has 1 rank where Slurm started 2
    argv = ["srun", "--mpi=none", "-n2", "--time=2", "-J", "sbx_mpi_guard", MPI_PY, "-m", "scalebox_hpc",
            "launcher", "--mpi", "-m", "calc", "--app", "1", "--work-root", str(work)]
    proc = subprocess.run(argv, env=env_for(pg_dsn), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "communicator has 1 rank(s) but the launch asked for 2" in proc.stderr, proc.stderr
    # outside any launcher: a lone process is no stage
    proc = subprocess.run([MPI_PY, "-m", "scalebox_hpc", "launcher", "--mpi", "-m", "calc", "--app", "1"],
                          env=env_for(pg_dsn), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "needs at least 2" in proc.stderr, proc.stderr
    # a wrong expected size
    proc = subprocess.run([MPI_PY, "-m", "scalebox_hpc", "launcher", "--mpi", "-m", "calc", "--ranks", "8"],
                          env=env_for(pg_dsn), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "but the launch asked for 8" in proc.stderr, proc.stderr


def test_mpi_task_with_k_ranks_runs_as_a_step_of_the_allocation(pg_dsn: str, work: Path, tmp_path: Path) -> None:
    app_id = create(pg_dsn, write_app(tmp_path / "app", """
        name: mt
        modules:
          mt:
            mpi: {ranks: 3}
            arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {"mt/run.sh": f"exec {MPI_PY} " + '"$(dirname "$0")/hello.py"\n'}))
    (tmp_path / "app" / "mt" / "hello.py").write_text(
        "import os\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
        "n = c.allreduce(1)\n"
        "if c.Get_rank() == 0:\n    print(f'size={c.Get_size()} sum={n} job={os.environ[\"SLURM_JOB_ID\"]}')\n")
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "mt", [Message("default"), Message("two", headers={"ranks": 2})])
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\necho job=$SLURM_JOB_ID\nexec {MPI_PY} -m scalebox_hpc launcher --app {app_id} "
                      f"--host batchhost --slots 1 --work-root {work}\n")
    proc = subprocess.run(["sbatch", "--wait", "-N2", "-n4", "--time=3", "-J", "sbx_mpi_task",
                           f"--output={tmp_path}/job.out", str(script)],
                          env=env_for(pg_dsn), capture_output=True, text=True, timeout=120, check=False)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, (proc.stderr, log)
    job = log.split("job=")[1].split()[0]
    with connect(pg_dsn) as conn:
        rows = {t["body"]: apps.get_task(conn, t["id"]) for t in apps.list_tasks(conn, app_id, limit=10)}
    assert rows["default"]["status"] == 0 and rows["two"]["status"] == 0, rows
    assert rows["default"]["execs"][0]["stdout"].strip() == f"size=3 sum=3 job={job}"
    assert rows["two"]["execs"][0]["stdout"].strip() == f"size=2 sum=2 job={job}"


def test_usr1_drains_the_farm_and_releases_unfinished_tasks(pg_dsn: str, work: Path, tmp_path: Path) -> None:
    app_id = create(pg_dsn, write_app(tmp_path / "app", FARM, {
        "work/run.sh": 'sleep 0.5; send-message "out-$1"\n', "sink/run.sh": "true\n",
    }))
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "work", [Message(str(i)) for i in range(40)])
    proc = stage(pg_dsn, app_id, "work", work, nodes=2, ranks=3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(t["status"] == 0 for t in tasks(pg_dsn, app_id, "work")) < 4:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # srun forwards USR1 to every rank; rank 0 drains
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    rows = tasks(pg_dsn, app_id, "work")
    assert {t["status"] for t in rows} <= {0, -1}, rows  # nothing left RUNNING: released, not lost
    done = [t for t in rows if t["status"] == 0]
    assert 4 <= len(done) < 40
    assert sorted(t["body"] for t in tasks(pg_dsn, app_id, "sink")) == sorted(f"out-{t['body']}" for t in done)
    assert all(t["attempts"] == 0 for t in rows if t["status"] == -1)
    assert "draining" in out


def test_complete_many_records_a_batch_in_one_statement(pg_dsn: str, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from scalebox_hpc.db.queue import Completion
    from scalebox_hpc.models import TaskResult

    app_id = create(pg_dsn, write_app(tmp_path / "app", FARM, {"work/run.sh": "true\n", "sink/run.sh": "true\n"}))
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "work", [Message(str(i)) for i in range(3)])
    q = PgQueue(pg_dsn)
    refs = q.modules(app_id)
    slot = q.create_slot(refs["work"].id, host="h", seq=0, pid=1, work_dir="/tmp")
    claimed = q.claim(app_id, refs["work"].id, host="h", slot_id=slot, slot_seq=0, limit=3)
    q.release_ids(slot, [claimed[2].id])  # no longer ours: its result must be refused
    now = datetime.now(UTC)
    ok = TaskResult(status=0, started_at=now, finished_at=now, messages=[Message("m0")])
    bad = TaskResult(status=0, started_at=now, finished_at=now, messages=[Message("x", module="nope")])
    written = q.complete_many([Completion(claimed[0], ok, "h"), Completion(claimed[1], bad, "h"),
                               Completion(claimed[2], ok, "h")], slot_id=slot, sender=refs["work"], modules=refs)
    q.close()
    assert written == [1, 0, None]
    by = {t["body"]: t["status"] for t in tasks(pg_dsn, app_id)}
    assert by == {"0": 0, "1": -102, "2": -1, "m0": -1}


def test_farm_keeps_per_task_semantics(pg_dsn: str, work: Path, tmp_path: Path) -> None:
    """Timeout (124) kills only that rank's run, retries by exit code, task-exec files, hand-off."""
    marks = tmp_path / "marks"
    marks.mkdir()
    app_id = create(pg_dsn, write_app(tmp_path / "app", """
        name: sem
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
            echo '{{"userText": "rank '$SLOT_SEQ'"}}' > task-exec.json
            send-message "out-$1"
        """,
        "sink/run.sh": "true\n",
    }))
    bodies = ["slow", "flaky", "bad", *[f"n{i}" for i in range(8)]]
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "work", [Message(b) for b in bodies])
    proc = stage(pg_dsn, app_id, "work", work, nodes=2, ranks=3)
    run_launcher(pg_dsn, LauncherConfig(app_id=app_id, host="testhost", work_root=work, local=True,
                                        modules=("sink",)))
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    with connect(pg_dsn) as conn:
        listed = apps.list_tasks(conn, app_id, module="work", limit=100)
        rows = {t["body"]: apps.get_task(conn, t["id"]) for t in listed}
    status = {b: r["status"] for b, r in rows.items()}
    assert status == {"slow": 124, "flaky": 0, "bad": 5, **{f"n{i}": 0 for i in range(8)}}
    assert [e["status"] for e in rows["flaky"]["execs"]] == [3, 0]
    assert rows["n0"]["execs"][0]["user_text"].startswith("rank ")
    sink = sorted(t["body"] for t in tasks(pg_dsn, app_id, "sink"))
    assert sink == sorted(["out-flaky", *[f"out-n{i}" for i in range(8)]])


def test_collective_handler_failure_on_one_rank(pg_dsn: str, work: Path, tmp_path: Path) -> None:
    app_id = create(pg_dsn, write_app(tmp_path / "app", """
        name: coll
        modules:
          c:
            mpi: {mode: collective, handler: "h.py:run", batch: 2}
            arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {}))
    (tmp_path / "app" / "c").mkdir(exist_ok=True)
    (tmp_path / "app" / "c" / "h.py").write_text(
        "from scalebox_hpc import mpi\n"
        "def run(task):\n"
        "    assert mpi.task() is task\n"
        "    total = task.comm.allreduce(task.rank + 1)\n"
        "    if task.body == 'fail' and task.rank == 1:\n"
        "        raise ValueError('rank one refuses')\n"
        "    print(f'sum={total} size={task.size}')\n"
        "    return 0\n")
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "c", [Message("ok"), Message("fail")])
    proc = stage(pg_dsn, app_id, "c", work, nodes=2, ranks=3)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    with connect(pg_dsn) as conn:
        rows = {t["body"]: apps.get_task(conn, t["id"]) for t in apps.list_tasks(conn, app_id, module="c", limit=10)}
    assert rows["ok"]["status"] == 0 and rows["ok"]["execs"][0]["stdout"] == "sum=6 size=3\n"
    assert rows["fail"]["status"] == 1
    assert "rank 1 ended with status 1" in rows["fail"]["execs"][0]["stderr"]
    assert "ValueError: rank one refuses" in rows["fail"]["execs"][0]["stderr"]


def test_ordinary_launchers_leave_mpi_stages_alone(pg_dsn: str, tmp_path: Path) -> None:
    from scalebox_hpc.launcher.launcher import Launcher
    from scalebox_hpc.launcher.wakeups import Wakeups
    from scalebox_hpc.runtime.local import LocalRuntime

    app_id = create(pg_dsn, write_app(tmp_path / "app", """
        name: skip
        modules:
          o: {}
          f: {mpi: {mode: farm}}
          c: {mpi: {mode: collective, handler: "h.py:run"}}
    """, {"o/run.sh": "true\n", "f/run.sh": "true\n"}))

    def planned(**kw: Any) -> list[str]:
        config = LauncherConfig(app_id=app_id, host="h", work_root=tmp_path / "w", **kw)
        launcher = Launcher(config, lambda: PgQueue(pg_dsn), LocalRuntime(), Wakeups())
        return sorted({ctx.module.name for ctx in launcher.plan()})

    assert planned() == ["o"]
    assert planned(modules=("f",)) == ["f"]
    assert planned(modules=("c",)) == []
    assert planned(local=True) == ["f", "o"]


def test_hung_rank_ends_the_stage_and_its_task_comes_back(pg_dsn: str, work: Path, tmp_path: Path) -> None:
    app_id = create(pg_dsn, write_app(tmp_path / "app", FARM, {
        "work/run.sh": 'echo "$PPID" > "$WORK_DIR/rank.pid"; sleep 0.3\n', "sink/run.sh": "true\n",
    }))
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "work", [Message(str(i)) for i in range(30)])
    proc = stage(pg_dsn, app_id, "work", work, nodes=2, ranks=3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(t["status"] == 0 for t in tasks(pg_dsn, app_id, "work")) < 3:
        time.sleep(0.1)
    pid = int(sorted(work.rglob("rank.pid"))[0].read_text())
    os.kill(pid, signal.SIGSTOP)  # the rank hangs: alive, silent
    try:
        out = finish(proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert proc.returncode != 0 and "silent for 3s" in out, out[-4000:]
    rows = tasks(pg_dsn, app_id, "work")
    running = [t for t in rows if t["status"] == -3]
    assert len(running) == 1  # the hung rank's task, left to lease expiry; the rest recorded or released
    assert {t["status"] for t in rows} <= {0, -1, -3}
    time.sleep(3.5)
    queue = PgQueue(pg_dsn)
    recovered = queue.recover_expired()
    queue.close()
    assert [tid for tid, _ in recovered] == [running[0]["id"]]


def test_setup_failing_on_every_rank_ends_the_stage(pg_dsn: str, work: Path, tmp_path: Path) -> None:
    app_id = create(pg_dsn, write_app(tmp_path / "app", FARM, {
        "work/setup.sh": "exit 4\n", "work/run.sh": "true\n", "sink/run.sh": "true\n",
    }))
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "work", [Message("1")])
    proc = stage(pg_dsn, app_id, "work", work, nodes=2, ranks=3)
    out = finish(proc, timeout=60)
    assert proc.returncode != 0 and "no worker rank could start" in out, out[-3000:]
    assert [t["status"] for t in tasks(pg_dsn, app_id, "work")] == [-1]  # never claimed
    with connect(pg_dsn) as conn:
        [slot] = conn.execute("SELECT s.status, s.message FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id "
                              "WHERE m.app_id = %s", (app_id,)).fetchall()
    assert slot["status"] == "ERROR" and "setup.sh" in slot["message"]


def test_check_sh_holds_the_farm_back_until_it_says_go(pg_dsn: str, work: Path, tmp_path: Path) -> None:
    """check.sh runs on rank 0 before each batch claim: while it exits non-zero nothing is claimed
    (and the stage does not idle out); once it says go, every task runs."""
    gate = tmp_path / "closed"
    gate.touch()
    app_id = create(pg_dsn, write_app(tmp_path / "app", """
        name: gated
        modules:
          work:
            mpi: {mode: farm}
            arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2, heartbeat_seconds: 4}
    """, {
        "work/run.sh": "true\n",
        "work/check.sh": f'echo "check in $PWD" >> {tmp_path}/checks; test ! -e {gate}\n',
    }))
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "work", [Message(f"t{i}") for i in range(6)])
    proc = stage(pg_dsn, app_id, "work", work, nodes=2, ranks=3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "checks").exists():
        time.sleep(0.2)
    time.sleep(3)  # several closed checks (0.2 s apart), far beyond the 2 idle polls
    assert {t["status"] for t in tasks(pg_dsn, app_id)} == {-1}, "claimed while check.sh said no"
    assert proc.poll() is None, "the stage idled out while its gate was closed"
    gate.unlink()
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert {t["status"] for t in tasks(pg_dsn, app_id)} == {0}
    checks = (tmp_path / "checks").read_text().splitlines()
    assert len(checks) >= 5 and all(c.endswith("-rank0") for c in checks), checks[:5]
