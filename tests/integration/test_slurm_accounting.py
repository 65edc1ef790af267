"""Stage jobs on the accounting test-bed (launchers/testbed/slurm-mc.sh): two Slurm clusters, c1
(nodes mc1, mc2) and c2 (mc3, mc4), sharing one slurmdbd, so `sbatch -M c2` from c1's config is real.

- A real QOS limit: partition `capped` carries QOS `sbxcap` (MaxJobsPerUser=2, enforced through
  slurmdbd). The issue-20 shape: every stage job the user may run is held by an upstream stage; the
  downstream stage's job pends with QOSMaxJobsPerUserLimit although nodes are free.
- One database, two clusters: a module's `cluster:` sends its stage jobs to that cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.components import need, slurm_mc_available, slurm_mc_conf
from tests.integration.test_stage_slurm import (
    FAST,
    REPO,
    all_ended,
    all_ok,
    finished,
    sbx_json,
    submit,
    tasks,
    wait_until,
    write_pipeline,
)

pytestmark = [pytest.mark.slurm, pytest.mark.pg]

CLUSTER = "c1"
QOS_MAX_JOBS = 2


@pytest.fixture
def shared() -> Iterator[Path]:
    """A world-readable directory for the jobs' work dirs, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="sbx-qos-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qos_env(pg_dsn: str, shared: Path) -> Iterator[dict[str, str]]:
    reason = slurm_mc_available()
    if reason:
        need("slurm-mc", reason)
    conf = slurm_mc_conf()
    assert conf is not None
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "PG", "SLURM_"))}
    environ.update(SCALEBOX_DSN=pg_dsn, SCALEBOX_WORK_ROOT=str(shared / "work"), SCALEBOX_AUTOSCALE_SECONDS="2",
                   SCALEBOX_HOME=str(shared / "home"), SLURM_CONF=conf)
    yield environ
    out = subprocess.run(["squeue", "-M", CLUSTER, "-h", "-o", "%i %j"], capture_output=True, text=True,
                         check=False, env=environ).stdout
    mine = [line.split()[0] for line in out.splitlines() if line.split()[1:] and line.split()[1].startswith("sbx-")]
    if mine:
        subprocess.run(["scancel", "-M", CLUSTER, *mine], check=False, env=environ)


def _qos_limit(env: dict[str, str]) -> int:
    out = subprocess.run(["sacctmgr", "-n", "-P", "show", "qos", "sbxcap", "format=maxjobsperuser"],
                         capture_output=True, text=True, check=True, env=env).stdout.strip()
    return int(out or 0)


def test_a_stage_waiting_on_a_qos_limit_gets_the_jobs_of_a_finished_stage(
        qos_env: dict[str, str], shared: Path) -> None:
    """`w` (max_jobs 2) takes both jobs the QOS allows; `s`'s job pends on QOSMaxJobsPerUserLimit
    while `w` works, `scalebox status` says so, and once `w` is done its jobs leave (idle by
    reachability, drained as yielding), `s` runs: every task succeeds, nothing waits for walltime."""
    assert _qos_limit(qos_env) == QOS_MAX_JOBS, "the test-bed's QOS sbxcap is not MaxJobsPerUser=2"
    capped = {"partition": "capped", "time": "10"}
    path = write_pipeline(shared / "qos", {
        "w": {"run": 'sleep 0.5; send-message "s-$1"\n', "arguments": FAST, "sink_modules": ["s"],
              "slurm": {**capped, "max_jobs": 2, "tasks_per_job": 5},
              "parameters": {"start_task": "FILE:bodies.txt"}},
        "s": {"run": "sleep 0.1\n", "arguments": FAST, "slurm": {**capped, "max_jobs": 1}}})
    (path.parent / "bodies.txt").write_text("".join(f"t{i}\n" for i in range(30)))
    started = time.monotonic()
    app_id = submit(qos_env, path)
    reasons: set[str] = set()

    def done() -> bool:
        status = sbx_json(qos_env, "status", app_id)
        for row in status.get("modules", []):
            reasons.update((row.get("pending_reasons") or {}).values())
        return bool(all_ok(qos_env, app_id, 60)())

    wait_until("all 60 tasks to succeed", done, 240, every=2)
    span = time.monotonic() - started
    ended: list[dict[str, Any]] = wait_until("every stage job to end", all_ended(qos_env, app_id), 90, every=2)
    print(f"w -> s under MaxJobsPerUser={QOS_MAX_JOBS}: make-span {span:.1f} s, pending reasons seen {reasons}")
    assert "QOSMaxJobsPerUserLimit" in reasons, reasons  # s waited on the QOS, and status showed why
    assert {j["module"] for j in ended} == {"w", "s"}
    assert all(j["state"] == "COMPLETED" for j in ended), ended
    # the work is 30 x 0.5 s on 2 jobs, then 30 x 0.1 s; the bound leaves room for Slurm's scheduling and
    # the idle polls, far below the 10-minute walltime the old code waited for
    assert span < 150, span


def test_app_primes_across_two_clusters_with_one_database(qos_env: dict[str, str], shared: Path) -> None:
    """app-primes with `calc` on cluster c2 and scatter/gather on c1 (the app's default), one
    PostgreSQL: each module's stage jobs go to its cluster (`sbatch -M`), the jobs' launchers scale
    the other cluster's stages too, and the result is the one of a single cluster."""
    app_dir = shared / "app-primes"
    shutil.copytree(REPO / "examples/app-primes", app_dir)
    spec = yaml.safe_load((app_dir / "app.yaml").read_text())
    for module in spec["modules"].values():
        module["arguments"] = dict(FAST)
    spec["cluster"] = "c1"
    spec["clusters"] = {"c1": {}, "c2": {"slurm": {"nodes": 2}, "local_scratch": str(shared / "scratch-$${HOST}")}}
    spec["modules"]["calc"]["cluster"] = "c2"
    spec["slurm"] = {"time": "10"}
    (app_dir / "app.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    subprocess.run(["chmod", "-R", "a+rX", str(app_dir)], check=True)

    app_id = submit(qos_env, app_dir / "app.yaml")
    status = wait_until("app-primes to finish", finished(qos_env, app_id), 180, every=2)
    assert status["app"]["result"] == "Result is 1229"
    hosts = {t["module"]: set() for t in tasks(qos_env, app_id)}
    for t in tasks(qos_env, app_id):
        hosts[t["module"]].add(t["host"])
    # c2's nodes (which of its two nodes claims the few short tasks is the launchers' race)
    assert hosts["calc"] and hosts["calc"] <= {"mc3", "mc4"}, hosts
    assert hosts["scatter"] <= {"mc1", "mc2"} and hosts["gather"] <= {"mc1", "mc2"}, hosts
    ended: list[dict[str, Any]] = wait_until("every stage job to end", all_ended(qos_env, app_id), 90, every=2)
    by_cluster = {(j["module"], j["cluster"]) for j in ended}
    assert by_cluster == {("scatter", "c1"), ("calc", "c2"), ("gather", "c1")}, ended
    assert {j["state"] for j in ended} == {"COMPLETED"}, ended
    calc = [j for j in ended if j["module"] == "calc"]
    assert all(int(j["slurm_job_id"]) > 100_000 for j in calc), calc  # c2's job ids
    assert {n for j in calc for n in j["nodes"].split(",")} == {"mc3", "mc4"}, calc  # nodes: 2, both of c2
    # Slurm agrees: the calc job ran on c2
    out = subprocess.run(["sacct", "-M", "c2", "-X", "-n", "-P", "-j", calc[0]["slurm_job_id"], "-o", "state"],
                         capture_output=True, text=True, check=True, env=qos_env).stdout.split()
    assert out == ["COMPLETED"], out
