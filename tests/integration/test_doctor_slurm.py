"""`scalebox doctor` with its probe jobs on the real local Slurm test-bed: all green for
app-primes, and the faults it must name (a missing image on the nodes, a full scratch, a
partition that does not exist). Marked and skipped as tests/integration/test_stage_slurm.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.components import need, slurm_available, slurm_nodes
from tests.helpers import write_app

pytestmark = [pytest.mark.slurm, pytest.mark.pg]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def slurm() -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A world-readable directory (jobs may run as another user), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="sbx-doctor-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(pg_dsn: str, shared: Path, slurm: None) -> Iterator[dict[str, str]]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "PG"))}
    environ.update(SCALEBOX_DSN=pg_dsn, SCALEBOX_WORK_ROOT=str(shared / "work"), SCALEBOX_HOME=str(shared / "home"),
                   SCALEBOX_LOCAL_DIR=str(shared / "local"))
    yield environ
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=False).stdout
    mine = [line.split()[0] for line in jobs.splitlines() if line.split()[1:] == ["sbx-doctor"]]
    if mine:
        subprocess.run(["scancel", *mine], check=False)


def doctor(env: dict[str, str], *args: str) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "doctor", "--json", "--probe-timeout", "240", *args],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    out: dict[str, list[dict[str, Any]]] = {}
    for check in json.loads(proc.stdout):
        out.setdefault(check["id"], []).append(check)
    return proc.returncode, out


def test_app_primes_is_all_green_with_a_probe_on_a_node(env: dict[str, str]) -> None:
    code, checks = doctor(env, str(REPO / "examples" / "app-primes" / "app.yaml"))
    failed = [c for cs in checks.values() for c in cs if c["status"] == "fail"]
    assert code == 0 and not failed, failed
    for check_id in ("db.reachable", "db.schema", "slurm.commands", "slurm.controller", "probe.job", "probe.python",
                     "probe.db", "probe.clock", "probe.scratch", "probe.work_root", "probe.resources", "probe.mpi"):
        assert [c["status"] for c in checks[check_id]] == ["pass"], checks[check_id]
    ran_on = checks["probe.db"][0]["summary"].rsplit(" on ", 1)[1]
    assert ran_on in slurm_nodes(), ran_on  # a compute node, not this host
    assert list((Path(env["SCALEBOX_WORK_ROOT"]) / ".doctor").iterdir()) == []


def test_a_missing_image_on_the_nodes(env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "app", """
        name: img
        modules:
          a: {base_image: /nonexistent/image.sif, arguments: {runtime: apptainer}}
    """, {"a/run.sh": "true\n"})
    code, checks = doctor(env, str(app))
    [engine] = checks["probe.engine"]
    assert code == 1 and engine["status"] == "fail" and "/nonexistent/image.sif" in engine["summary"], engine


def test_a_full_scratch_on_the_nodes(env: dict[str, str], shared: Path) -> None:
    full = shared / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "tmpfs", str(full)], check=True)
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={full / 'filler'}", "bs=4k", "count=64"], capture_output=True,
                       check=False)
        code, checks = doctor(dict(env, SCALEBOX_LOCAL_SCRATCH=str(full)))
    finally:
        subprocess.run(["umount", str(full)], check=True)
    [scratch] = checks["probe.scratch"]
    assert code == 1 and scratch["status"] == "fail" and "No space left" in scratch["summary"], scratch


def test_a_partition_that_does_not_exist(env: dict[str, str]) -> None:
    code, checks = doctor(env, "--partition", "nosuch")
    [partition] = checks["slurm.partition"]
    assert code == 1 and partition["status"] == "fail" and partition["target"] == "nosuch"
    refused = [c for c in checks["probe.job"] if c["target"] == "nosuch"]
    assert refused and refused[0]["status"] == "fail" and "sbatch refused" in refused[0]["summary"], refused
