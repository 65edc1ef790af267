"""Stage jobs on the real local Slurm test-bed (4 virtual nodes), driven through the `scalebox` CLI.

Each test submits a pipeline with `scalebox submit` into its own database, then watches it
the way a user would (`scalebox status/stage list --json`), calling `scalebox autoscale`
where a site would run it from scrontab.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.models import Message
from tests import helpers
from tests.components import need, slurm_available

pytestmark = [pytest.mark.slurm, pytest.mark.pg]

REPO = Path(__file__).resolve().parents[2]
TEST_USER = "sbxtest"


@pytest.fixture
def slurm() -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A world-readable directory (jobs may run as another user), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="sbx-stage-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(pg_dsn: str, shared: Path, slurm: None) -> Iterator[dict[str, str]]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "PG"))}
    environ.update(SCALEBOX_DSN=pg_dsn, SCALEBOX_WORK_ROOT=str(shared / "work"), SCALEBOX_AUTOSCALE_SECONDS="2",
                   SCALEBOX_HOME=str(shared / "home"))
    yield environ
    # whatever a failed test left in the queue
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=False).stdout
    mine = [line.split()[0] for line in jobs.splitlines() if line.split()[1:] and line.split()[1].startswith("sbx-")]
    if mine:
        subprocess.run(["scancel", *mine], check=False)


def sbx(
    env: dict[str, str], *args: str, user: str | None = None, check: bool = True,
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "scalebox_hpc", *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in env.items()), *argv]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"scalebox {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def sbx_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(sbx(env, *args, "--json").stdout)


def wait_until(what: str, predicate: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """The suite's poll (tests.helpers.wait_until), what first: these waits read best that way."""
    return helpers.wait_until(predicate, timeout, what, every)


def finished(env: dict[str, str], app_id: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        status = sbx_json(env, "status", app_id)
        return status if status["app"]["status"] == "FINISHED" else None
    return check


def all_ok(env: dict[str, str], app_id: str, n: int, autoscale: bool = False) -> Callable[[], bool]:
    """Every one of the app's ``n`` tasks succeeded (apps without set-finished stay RUNNING)."""
    def check() -> bool:
        if autoscale:
            sbx(env, "autoscale", "--app", app_id)
        rows = tasks(env, app_id)
        return len(rows) == n and all(t["status"] == 0 for t in rows)
    return check


def all_ended(env: dict[str, str], app_id: str) -> Callable[[], list[dict[str, Any]] | None]:
    """The app's stage jobs once there are some and every one has ended (one `stage list` a poll)."""
    def check() -> list[dict[str, Any]] | None:
        rows = jobs(env, app_id)
        return rows if rows and all(j["ended_at"] for j in rows) else None
    return check


def job_log(shared: Path, app_id: str, job: dict[str, Any]) -> str:
    """A stage job's output file (stdout and stderr of its launchers)."""
    return (shared / "work" / f"app-{app_id}" / "slurm" / f"{job['module']}-{job['slurm_job_id']}.out").read_text()


def add_with_inputs(env: dict[str, str], app_id: str, bodies: list[str]) -> None:
    """Tasks whose input is the scratch file named by the body."""
    with connect(env["SCALEBOX_DSN"]) as conn:
        apps.add_tasks(conn, int(app_id), "use", [Message(b, headers={"inputs": [b]}) for b in bodies])


def write_pipeline(root: Path, modules: dict[str, Any], **top: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for name, module in modules.items():
        script = module.pop("run", None)
        if script is not None:
            code = root / name
            code.mkdir(exist_ok=True)
            (code / "run.sh").write_text("#!/bin/bash\nset -euo pipefail\n" + script)
            (code / "run.sh").chmod(0o755)
    path = root / "app.yaml"
    path.write_text(yaml.safe_dump({"name": root.name, **top, "modules": modules}, sort_keys=False))
    return path


def submit(env: dict[str, str], path: Path, user: str | None = None) -> str:
    out = sbx(env, "submit", str(path), "--json", user=user).stdout
    return str(json.loads(out)["app_id"])


def jobs(env: dict[str, str], app_id: str) -> list[dict[str, Any]]:
    return sbx_json(env, "stage", "list", "--app", app_id, "--all")  # type: ignore[no-any-return]


def tasks(env: dict[str, str], app_id: str) -> list[dict[str, Any]]:
    return sbx_json(env, "task", "list", "--app", app_id, "-n", "1000")  # type: ignore[no-any-return]


FAST = {"max_idle_polls": 4, "sleep_interval_seconds": 0.5, "heartbeat_seconds": 2}


def test_app_primes_as_stage_jobs_across_nodes(env: dict[str, str], shared: Path) -> None:
    app_dir = shared / "app-primes"
    shutil.copytree(REPO / "examples/app-primes", app_dir)
    spec = yaml.safe_load((app_dir / "app.yaml").read_text())
    for module in spec["modules"].values():
        module["arguments"] = dict(FAST)
    spec["modules"]["calc"]["slurm"] = {"nodes": 2}  # 2 nodes x 2 slots
    spec["slurm"] = {"time": "10"}
    (app_dir / "app.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    subprocess.run(["chmod", "-R", "a+rX", str(app_dir)], check=True)

    app_id = submit(env, app_dir / "app.yaml")
    status = wait_until("app-primes to finish", finished(env, app_id), 150, every=2)
    assert status["app"]["result"] == "Result is 1229"

    calc_hosts = {t["host"] for t in tasks(env, app_id) if t["module"] == "calc"}
    # the job's nodes (both of them usually; with prefetching, the first launcher up may claim all
    # ten short tasks, so one node is not a failure)
    assert calc_hosts and calc_hosts <= {f"node{i}" for i in range(1, 5)}, calc_hosts
    ended = wait_until("every stage job to end", all_ended(env, app_id), 60, every=2)
    assert {j["state"] for j in ended} == {"COMPLETED"}, ended
    assert {j["module"] for j in ended} == {"scatter", "calc", "gather"}
    [calc_job] = [j for j in ended if j["module"] == "calc"]
    assert len(calc_job["nodes"].split(",")) == 2 and calc_hosts <= set(calc_job["nodes"].split(",")), calc_job
    log = job_log(shared, app_id, calc_job)
    assert "launchers exited with 0" in log, log


def test_scancel_mid_task_loses_nothing(env: dict[str, str], shared: Path) -> None:
    path = write_pipeline(shared / "cancel", {"work": {
        "run": 'sleep 2; echo "done $1"\n', "arguments": FAST, "slurm": {"time": "10"},
        "parameters": {"start_task": "FILE:bodies.txt"}}})
    (path.parent / "bodies.txt").write_text("".join(f"b{i}\n" for i in range(6)))
    app_id = submit(env, path)
    running = wait_until("a running task", lambda: [t for t in tasks(env, app_id) if t["status"] == -3], 60,
                         every=0.5)
    [first] = [j["slurm_job_id"] for j in jobs(env, app_id)]
    subprocess.run(["scancel", first], check=True)

    wait_until("every task to succeed after the cancel", all_ok(env, app_id, 6, autoscale=True), 120, every=2)
    rows = tasks(env, app_id)
    assert sorted(t["body"] for t in rows) == [f"b{i}" for i in range(6)] and {t["status"] for t in rows} == {0}
    # the task the cancelled job was running finished once: before the job's end, or again in a
    # new job (released by the draining launcher, or recovered from its expired lease)
    shown = sbx_json(env, "task", "show", str(running[0]["id"]))
    assert [e["status"] for e in shown["execs"]].count(0) == 1, shown
    states = {j["slurm_job_id"]: j["state"] for j in jobs(env, app_id)}
    assert states[first] == "CANCELLED" and len(states) >= 2


def test_walltime_signal_drains_and_a_new_job_finishes_the_work(env: dict[str, str], shared: Path) -> None:
    # a one-minute job warned 55 s ahead: Slurm sends USR1 somewhere in its first ~35 s (it checks
    # time limits periodically); 40 one-second tasks on one slot outlast that, so the job drains
    path = write_pipeline(shared / "walltime", {"work": {
        "run": 'sleep 1; echo "done $1"\n', "arguments": FAST,
        "slurm": {"time": "1", "signal_grace_seconds": 55},
        "parameters": {"start_task": "FILE:bodies.txt"}}})
    (path.parent / "bodies.txt").write_text("".join(f"w{i}\n" for i in range(40)))
    app_id = submit(env, path)
    wait_until("every task to succeed", all_ok(env, app_id, 40, autoscale=True), 240, every=3)
    all_jobs = wait_until("jobs to end", all_ended(env, app_id), 60, every=2)
    first = min(all_jobs, key=lambda j: int(j["slurm_job_id"]))
    assert len(all_jobs) >= 2 and first["state"] == "COMPLETED" and first["draining"], all_jobs
    assert "TIMEOUT" not in {j["state"] for j in all_jobs}, "a job ran into its time limit instead of draining"
    log = job_log(shared, app_id, first)
    assert "stopping: no new tasks" in log and "(SIGUSR1;" in log, log  # the drain, said in the job log
    rows = tasks(env, app_id)
    assert len(rows) == 40 and {t["status"] for t in rows} == {0}


def test_claims_stop_when_a_task_no_longer_fits_the_walltime(env: dict[str, str], shared: Path) -> None:
    # two-minute jobs, tasks allowed 90 s: after ~25 s a task might not fit, so the job drains
    # by itself (Slurm's USR1@5 comes far later)
    path = write_pipeline(shared / "fit", {"work": {
        "run": 'sleep 1\n', "arguments": {**FAST, "task_max_seconds": 90},
        "slurm": {"time": "2", "signal_grace_seconds": 5},
        "parameters": {"start_task": "FILE:bodies.txt"}}})
    (path.parent / "bodies.txt").write_text("".join(f"f{i}\n" for i in range(35)))
    app_id = submit(env, path)
    wait_until("every task to succeed", all_ok(env, app_id, 35, autoscale=True), 240, every=3)
    all_jobs = wait_until("jobs to end", all_ended(env, app_id), 60, every=2)
    first = min(all_jobs, key=lambda j: int(j["slurm_job_id"]))
    log = job_log(shared, app_id, first)
    assert "walltime:" in log and "less than a task needs; draining" in log, log
    assert len(all_jobs) >= 2 and first["state"] == "COMPLETED"
    assert {t["status"] for t in tasks(env, app_id)} == {0}


def test_jobs_scale_with_queue_depth(env: dict[str, str], shared: Path) -> None:
    path = write_pipeline(shared / "depth", {"work": {
        "run": 'sleep 2\n', "arguments": FAST, "slots": [".*:1"],
        "slurm": {"time": "10", "max_jobs": 3, "tasks_per_job": 4},
        "parameters": {"start_task": "FILE:bodies.txt"}}})
    (path.parent / "bodies.txt").write_text("".join(f"d{i}\n" for i in range(12)))
    app_id = submit(env, path)
    live = [j for j in jobs(env, app_id) if not j["ended_at"]]
    assert len(live) == 3  # ceil(12 / 4), within max_jobs
    wait_until("every task to succeed", all_ok(env, app_id, 12), 120, every=2)
    hosts = {t["host"] for t in tasks(env, app_id)}
    assert len(hosts) >= 2, hosts  # the three jobs ran side by side
    wait_until("the idle jobs to exit", all_ended(env, app_id), 60, every=2)
    sbx(env, "task", "add", "--app", app_id, "-m", "work", "late")  # new work: the queue wants one job again
    wait_until("a job for the late task", lambda: "work: submitted" in sbx(env, "autoscale", "--app", app_id).stdout,
               10, every=1)  # autoscale passes are rate-limited (SCALEBOX_AUTOSCALE_SECONDS=2 here)


def test_stage_commands_scale_and_stop(env: dict[str, str], shared: Path) -> None:
    path = write_pipeline(shared / "cmds", {"work": {
        "run": 'sleep 30\n', "arguments": FAST, "slurm": {"time": "10", "max_jobs": 1}}})
    app_id = submit(env, path)  # nothing READY: no job yet
    assert jobs(env, app_id) == []
    out = sbx(env, "stage", "scale", "--app", app_id, "work", "--jobs", "2").stdout
    assert out.startswith("work: submitted"), out
    def two_running() -> list[dict[str, Any]] | None:
        running = [j for j in jobs(env, app_id) if j["state"] == "RUNNING"]
        return running if len(running) == 2 else None

    live = wait_until("two running jobs", two_running, 60)
    script = sbx(env, "stage", "script", "--app", app_id, "work").stdout
    assert script.startswith("#!/bin/bash") and "#SBATCH --time=10" in script
    out = sbx(env, "stage", "stop", "--app", app_id, "work").stdout
    assert out.startswith("work: draining") and all(j["slurm_job_id"] in out for j in live)
    ended = wait_until("the jobs to drain", all_ended(env, app_id), 60, every=2)
    assert {j["state"] for j in ended} == {"COMPLETED"}
    assert "submitted" not in sbx(env, "autoscale", "--app", app_id).stdout  # stopped stays stopped


def test_min_jobs_keeps_an_idle_job_up_until_scaled_down(env: dict[str, str], shared: Path) -> None:
    # idle timeout 4 polls x 0.5 s: without the keep-alive the job would end every 2 s and be
    # resubmitted at once (min_jobs 1), another trip through the Slurm queue each time
    path = write_pipeline(shared / "warm", {"work": {
        "run": 'echo "done $1"\n', "arguments": FAST, "slots": [".*:1"],
        "slurm": {"time": "10", "min_jobs": 1, "max_jobs": 1},
        "parameters": {"start_task": "FILE:bodies.txt"}}})
    (path.parent / "bodies.txt").write_text("w0\nw1\nw2\n")
    app_id = submit(env, path)
    wait_until("every task to succeed", all_ok(env, app_id, 3), 90, every=2)
    time.sleep(8)  # four idle timeouts
    [job] = jobs(env, app_id)
    assert job["ended_at"] is None and not job["draining"] and job["state"] == "RUNNING", job
    assert "idle, staying up" in job_log(shared, app_id, job)
    sbx(env, "task", "add", "--app", app_id, "-m", "work", "late")
    wait_until("the late task to succeed", all_ok(env, app_id, 4), 30)
    assert [j["slurm_job_id"] for j in jobs(env, app_id)] == [job["slurm_job_id"]]  # the warm job took it
    sbx(env, "stage", "scale", "--app", app_id, "work", "--min", "0")
    [ended] = wait_until("the job to end once min_jobs is 0", all_ended(env, app_id), 60, every=2)
    assert ended["slurm_job_id"] == job["slurm_job_id"] and ended["state"] == "COMPLETED", ended


def test_submitted_by_an_unprivileged_user(env: dict[str, str], shared: Path) -> None:
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        need("slurm", f"user {TEST_USER} missing (launchers/testbed/slurm.sh start creates it)")
    path = write_pipeline(shared / "user", {"who": {
        "run": 'id -un > "$WORK_DIR/../whoami-$1"\n', "arguments": FAST, "slurm": {"time": "10"},
        "parameters": {"start_task": "x"}}})
    subprocess.run(["chmod", "-R", "a+rX", str(path.parent)], check=True)
    # shared with the other user as /scratch is: world-writable with the sticky bit, root's (a
    # world-writable root without it is refused: anyone could rename what scalebox makes there)
    (shared / "work").mkdir(mode=0o1777, exist_ok=True)
    (shared / "work").chmod(0o1777)
    app_id = submit(env, path, user=TEST_USER)
    wait_until("the task to succeed", all_ok(env, app_id, 1), 90, every=2)
    [job] = jobs(env, app_id)
    owner = subprocess.run(["stat", "-c", "%U", str(shared / "work" / f"app-{app_id}" / "slurm" /
                                                  f"who-{job['slurm_job_id']}.out")],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert owner == TEST_USER
    [row] = tasks(env, app_id)
    assert row["status"] == 0
    whoami = list((shared / "work").glob(f"app-{app_id}-*/who/whoami-x"))  # the app's work dir: app-N-<uid>
    assert [p.read_text().strip() for p in whoami] == [TEST_USER]


def test_location_aware_dispatch_across_nodes(env: dict[str, str], shared: Path) -> None:
    """Four nodes, each with its own scratch: tasks run where their input is; when a holder dies,
    its tasks run elsewhere after the locality wait."""
    path = write_pipeline(shared / "local", {"use": {
        "run": 'test -f "$LOCAL_SCRATCH/$1" && echo "local $1" || echo "remote $1"; sleep 0.2\n',
        "arguments": {**FAST, "max_idle_polls": 60, "locality_wait_seconds": 2},
        "slots": [".*:1"], "slurm": {"time": "10", "nodes": 4}}})
    nodes = [f"node{i}" for i in range(1, 5)]
    for i in range(48):
        scratch = shared / f"scratch-{nodes[i % 4]}"
        scratch.mkdir(exist_ok=True)
        (scratch / f"f{i}").write_text("x" * i)
    env = {**env, "SCALEBOX_LOCAL_SCRATCH": str(shared / "scratch-${HOST}")}
    app_id = submit(env, path)
    sbx(env, "stage", "scale", "--app", app_id, "use", "--jobs", "1")
    slots_by_host: dict[str, int] = {}

    def four_live() -> bool:
        with connect(env["SCALEBOX_DSN"]) as conn:
            rows = conn.execute("SELECT host, pid FROM sbx_slots WHERE status IN ('READY', 'RUNNING')").fetchall()
        slots_by_host.update({r["host"]: r["pid"] for r in rows})
        return len(slots_by_host) == 4

    wait_until("a launcher on each of the 4 nodes", four_live, 60)
    add_with_inputs(env, app_id, [f"f{i}" for i in range(40)])
    wait_until("40 tasks to succeed", all_ok(env, app_id, 40), 90)
    rows = tasks(env, app_id)
    local = sum(t["host"] == nodes[int(t["body"][1:]) % 4] for t in rows)
    assert local >= 38, f"only {local} of 40 tasks ran on the node holding their input"

    # the holder of f41, f45 dies: after the locality wait its tasks run on the other nodes
    os.kill(slots_by_host["node2"], 9)
    add_with_inputs(env, app_id, ["f41", "f45"])
    wait_until("the dead holder's tasks to run elsewhere", all_ok(env, app_id, 42), 60)
    moved = {t["body"]: t["host"] for t in tasks(env, app_id) if t["body"] in ("f41", "f45")}
    assert set(moved.values()) <= {"node1", "node3", "node4"}, moved


def test_a_stage_job_asks_for_the_node_holding_the_queued_inputs(env: dict[str, str], shared: Path) -> None:
    """Tasks queued before any job runs; their inputs sit in node3's scratch (put there by an
    earlier stage): the job asks Slurm for node3 (Slurm alone would pick node1), and its
    launcher adopts the tasks and runs every one locally."""
    path = write_pipeline(shared / "placed", {"use": {
        "run": 'test -f "$LOCAL_SCRATCH/$1" || { echo "remote $1" >&2; exit 3; }; sleep 0.1\n',
        "arguments": {**FAST, "locality_wait_seconds": 1},
        "slots": [".*:1"], "slurm": {"time": "5", "max_jobs": 1, "tasks_per_job": 100}}})
    scratch = shared / "scratch-node3"
    scratch.mkdir()
    for i in range(10):
        (scratch / f"f{i}").write_text("x" * i)
    env = {**env, "SCALEBOX_LOCAL_SCRATCH": str(shared / "scratch-${HOST}")}
    # a job asks only for a node with its CPUs idle: the previous test's cancelled jobs may still
    # hold node3 for a moment (seen: no --nodelist, the job went anywhere)
    wait_until("node3 to be idle", lambda: subprocess.run(
        ["sinfo", "-h", "-n", "node3", "-o", "%T"], capture_output=True, text=True, check=False).stdout.strip()
        == "idle", 60)
    app_id = submit(env, path)
    assert jobs(env, app_id) == []  # nothing queued, no job
    queue = PgQueue(env["SCALEBOX_DSN"])
    try:  # what node3's launcher of an earlier stage recorded
        queue.index_scratch("node3", [(f"f{i}", i) for i in range(10)], [])
    finally:
        queue.close()
    add_with_inputs(env, app_id, [f"f{i}" for i in range(10)])
    # autoscale passes are rate-limited (SCALEBOX_AUTOSCALE_SECONDS=2 here; `stage list` makes one)
    [job] = wait_until("a job for the queued tasks", lambda: jobs(env, app_id), 10, every=1)
    assert job["nodes"] == "node3", job
    wait_until("10 tasks to succeed", all_ok(env, app_id, 10), 60)
    assert {t["host"] for t in tasks(env, app_id)} == {"node3"}


def test_mpi_stages_as_stage_jobs(env: dict[str, str], shared: Path) -> None:
    """app-primes-mpi submitted like any app: the collective and farm modules become MPI stage
    jobs (srun --mpi=pmi2, ranks per node), the others ordinary ones; scrontab-style autoscale."""
    for name in ("app-primes", "app-primes-mpi"):
        shutil.copytree(REPO / "examples" / name, shared / name)
    app_yaml = shared / "app-primes-mpi" / "app.yaml"
    spec = yaml.safe_load(app_yaml.read_text())
    for module in spec["modules"].values():
        module["arguments"] = dict(FAST)
    spec["modules"]["calc"]["slurm"] = {"nodes": 2}
    spec["slurm"] = {"time": "10"}
    app_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)

    app_id = submit(env, app_yaml)
    script = sbx(env, "stage", "script", "--app", app_id, "calc").stdout
    assert "#SBATCH --ntasks-per-node=2" in script and "srun --mpi=pmi2 --kill-on-bad-exit=1" in script
    assert "launcher --mpi --stage-job --app" in script

    def done() -> dict[str, Any] | None:
        sbx(env, "autoscale", "--app", app_id)
        return finished(env, app_id)()

    status = wait_until("app-primes-mpi to finish", done, 240, every=3)
    assert status["app"]["result"] == "Result is 1229"
    calc = [j for j in jobs(env, app_id) if j["module"] == "calc"]
    assert calc and len(calc[0]["nodes"].split(",")) == 2, calc


def db_jobs(env: dict[str, str], app_id: str) -> list[dict[str, Any]]:
    """The app's stage jobs as the database has them, without the autoscale pass `stage list` makes."""
    from scalebox_hpc.db import stages

    with connect(env["SCALEBOX_DSN"]) as conn:
        # as plain rows: the waits below read them as `stage list --json` prints them
        return [dataclasses.asdict(j) for j in stages.jobs(conn, int(app_id), include_ended=True)]


def test_an_mpi_stage_job_scales_the_app_itself(env: dict[str, str], shared: Path) -> None:
    """No `scalebox autoscale`, `status` or `stage list` while it runs: the sink's job can only be
    submitted by the MPI stage's rank 0 (the first node of a stage job runs the autoscaler)."""
    path = write_pipeline(shared / "mpi-scale", {
        "gen": {"run": 'send-message "got-$1"\n', "arguments": FAST, "sink_modules": ["sink"],
                "mpi": {"mode": "farm"}, "slurm": {"time": "10"},
                "parameters": {"start_task": "FILE:bodies.txt"}},
        "sink": {"run": 'echo "$1"\n', "arguments": FAST, "slurm": {"time": "10"}}})
    (path.parent / "bodies.txt").write_text("".join(f"g{i}\n" for i in range(5)))
    app_id = submit(env, path)
    assert [j["module"] for j in db_jobs(env, app_id)] == ["gen"]

    def all_done() -> bool:
        rows = tasks(env, app_id)
        return len(rows) == 10 and all(t["status"] == 0 for t in rows)

    wait_until("gen's and sink's tasks to succeed", all_done, 180, every=3)
    assert sorted(j["module"] for j in db_jobs(env, app_id)) == ["gen", "sink"]
    ended = wait_until("the jobs to end", all_ended(env, app_id), 90, every=2)
    gen = [j for j in ended if j["module"] == "gen"]
    assert len(gen) == 1 and gen[0]["state"] == "COMPLETED" and gen[0]["draining"], ended
    log = job_log(shared, app_id, gen[0])
    assert "autoscale failed" not in log and "autoscale:" not in log, log


def test_stage_stop_drains_an_mpi_stage_job(env: dict[str, str], shared: Path) -> None:
    path = write_pipeline(shared / "mpi-stop", {"slow": {
        "run": 'sleep 2\n', "arguments": FAST, "mpi": {"mode": "farm"}, "slurm": {"time": "10"},
        "parameters": {"start_task": "FILE:bodies.txt"}}})
    (path.parent / "bodies.txt").write_text("".join(f"s{i}\n" for i in range(30)))
    app_id = submit(env, path)
    wait_until("a first task to succeed", lambda: any(t["status"] == 0 for t in tasks(env, app_id)), 120, every=2)
    out = sbx(env, "stage", "stop", "--app", app_id, "slow").stdout
    assert out.startswith("slow: draining"), out
    [job] = wait_until("the MPI stage job to drain", all_ended(env, app_id), 60, every=2)
    assert job["state"] == "COMPLETED", job
    assert "asked to drain" in job_log(shared, app_id, job)
    statuses = [t["status"] for t in tasks(env, app_id)]
    assert len(statuses) == 30 and set(statuses) <= {0, -1} and statuses.count(-1) >= 10, statuses


def test_a_finished_stage_releases_the_nodes_its_downstream_waits_for(env: dict[str, str], shared: Path) -> None:
    """Issue 20's pipeline scaled down: four exclusive `w` jobs take all four nodes, `s`'s one job
    waits (Reason=Resources) with every `s` task READY. Idle by reachability: `w`'s jobs end once
    `w` is done, although `s` has work, so `s`'s job gets the nodes (before: a deadlock until the
    `w` jobs' walltime)."""
    exclusive = {"time": "10", "extra_sbatch_args": ["--exclusive"]}
    path = write_pipeline(shared / "ws", {
        "w": {"run": 'sleep 0.5; send-message "s-$1"\n', "arguments": FAST, "sink_modules": ["s"],
              "slurm": {**exclusive, "max_jobs": 4, "tasks_per_job": 5},
              "parameters": {"start_task": "FILE:bodies.txt"}},
        "s": {"run": 'sleep 0.1\n', "arguments": FAST, "slurm": {**exclusive, "max_jobs": 1}}})
    (path.parent / "bodies.txt").write_text("".join(f"t{i}\n" for i in range(40)))
    started = time.monotonic()
    app_id = submit(env, path)
    assert [j["module"] for j in db_jobs(env, app_id)] == ["w"] * 4
    wait_until("all 80 tasks to succeed", all_ok(env, app_id, 80), 180, every=2)
    span = time.monotonic() - started
    ended = wait_until("every stage job to end", all_ended(env, app_id), 60, every=2)
    elapsed = time.monotonic() - started
    assert {j["module"] for j in ended} == {"w", "s"}
    w_jobs = [j for j in ended if j["module"] == "w"]
    assert len(w_jobs) == 4 and {j["state"] for j in w_jobs} == {"COMPLETED"}, ended

    # one autoscale pass per app per interval (2 s here) however many jobs ask, plus the forced
    # one of `submit` and the leaving passes of the app's last jobs: each job's first node
    # passing on its own would make about 4 times as many
    with connect(env["SCALEBOX_DSN"]) as conn:
        passes = conn.execute("SELECT calls FROM sbx_slurm_calls WHERE app_id = %s ORDER BY id",
                              (int(app_id),)).fetchall()
    calls = [p["calls"] for p in passes]
    print(f"w -> s make-span {span:.1f} s; {len(calls)} passes with Slurm calls in {elapsed:.0f} s, "
          f"{sum(calls)} calls: {calls}")
    assert len(calls) <= elapsed / 2 + 6, calls


def test_warm_jobs_of_an_idle_module_give_their_nodes_to_a_starved_one(env: dict[str, str], shared: Path) -> None:
    """`warm` keeps four exclusive jobs up (min_jobs 4: all four nodes) without work; tasks for
    `work` come in, its job waits (Reason=Resources): the warm jobs drain, `work` runs."""
    exclusive = {"time": "10", "extra_sbatch_args": ["--exclusive"]}
    path = write_pipeline(shared / "yield", {
        "warm": {"run": "true\n", "arguments": FAST, "slurm": {**exclusive, "min_jobs": 4, "max_jobs": 4}},
        "work": {"run": "sleep 0.2\n", "arguments": FAST, "slurm": {**exclusive, "max_jobs": 1}}})
    app_id = submit(env, path)

    def running(module: str) -> list[dict[str, Any]]:
        return [j for j in db_jobs(env, app_id) if j["module"] == module and j["state"] == "RUNNING"
                and not j["ended_at"]]

    wait_until("four warm jobs to run", lambda: len(running("warm")) == 4, 60)
    sbx(env, "task", "add", "--app", app_id, "-m", "work", *(f"k{i}" for i in range(10)))
    wait_until("the 10 tasks to succeed", all_ok(env, app_id, 10), 120, every=2)
    # marked draining by the autoscaler (min_jobs alone would keep all four up), then gone
    drained = [j for j in db_jobs(env, app_id) if j["module"] == "warm" and j["draining"]]
    assert drained, db_jobs(env, app_id)
    log = job_log(shared, app_id, drained[-1])
    assert "asked to drain" in log or "idle, exiting" in log, log
    sbx(env, "stage", "stop", "--app", app_id, "warm", "--now")
