"""The local Slurm test-bed really works: 4 virtual nodes, batch jobs, MPI across nodes."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.components import need, slurm_available, slurm_nodes

pytestmark = pytest.mark.slurm

TERMINAL = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
    "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


def run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (
        f"{argv} -> exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    return proc


def job_state(job_id: str) -> str:
    """State from squeue (`-t all` keeps finished jobs for MinJobAge), else from `sacct -c`."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout.strip()
    if out:
        return out.splitlines()[0].strip()
    acct = subprocess.run(
        ["sacct", "-c", "-n", "-P", "-j", job_id, "-o", "jobid,state"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout
    for line in acct.splitlines():
        jid, _, state = line.partition("|")
        if jid == job_id:
            return state.split()[0] if state else ""
    return ""


def wait_terminal(job_id: str, timeout: float = 25) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], timeout=10, check=False)
    pytest.fail(f"job {job_id} not finished after {timeout} s (last state {state!r})")


def test_srun_spans_all_virtual_nodes() -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)
    nodes = slurm_nodes()
    n = str(len(nodes))
    out = run(["srun", f"-N{n}", f"-n{n}", "printenv", "SLURMD_NODENAME"]).stdout.split()
    assert len(out) == len(nodes)
    assert len(set(out)) == len(nodes), f"tasks did not land on distinct nodes: {out}"
    assert set(out) == set(nodes)


def test_sbatch_runs_to_completion(tmp_path: Path) -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)
    tmp_path.chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            echo "job=$SLURM_JOB_ID node=$SLURMD_NODENAME"
            echo payload > result.txt
            """
        )
    )
    proc = run([
        "sbatch", "--parsable", "-J", "testbed-sbatch", "-N1", "-n1", "-t", "1",
        f"--chdir={tmp_path}", f"--output={tmp_path}/job-%j.out", str(script),
    ])
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), proc.stdout
    assert wait_terminal(job_id) == "COMPLETED"
    out = (tmp_path / f"job-{job_id}.out").read_text()
    assert f"job={job_id} node=node" in out
    assert (tmp_path / "result.txt").read_text() == "payload\n"
    # the completion record (jobcomp/filetxt) is what `sacct -c` reports
    deadline = time.monotonic() + 10
    record = ""
    while time.monotonic() < deadline:
        record = subprocess.run(
            ["sacct", "-c", "-n", "-P", "-j", job_id, "-o", "jobid,state,exitcode"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()
        if record:
            break
        time.sleep(0.2)
    assert f"{job_id}|COMPLETED|0:0" in record.splitlines(), record


def test_mpi_allreduce_across_two_nodes(tmp_path: Path) -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)
    py = os.environ.get("SCALEBOX_TEST_MPI_PY")
    if not py:
        need("mpi4py", "SCALEBOX_TEST_MPI_PY is not set (launchers/testbed/run-tests.sh sets it)")
        return
    probe = subprocess.run(
        [py, "-c", "import mpi4py"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        need("mpi4py", f"{py} cannot import mpi4py: {probe.stderr.strip()}")
    code = (
        "import os; from mpi4py import MPI; c = MPI.COMM_WORLD; s = c.allreduce(c.rank + 1); "
        "print(f'rank={c.rank} size={c.size} sum={s} node={os.environ[\"SLURMD_NODENAME\"]}', flush=True)"
    )
    out = run(["srun", "--mpi=pmi2", "-N2", "-n2", py, "-c", code], timeout=60).stdout
    lines = sorted(line for line in out.splitlines() if line.startswith("rank="))
    assert len(lines) == 2, out
    # size=1 here would mean every rank is a singleton: srun did not wire up PMI
    for rank, line in enumerate(lines):
        fields = dict(kv.split("=", 1) for kv in line.split())
        assert fields["rank"] == str(rank), out
        assert fields["size"] == "2", f"ranks are singletons (PMI not wired up):\n{out}"
        assert fields["sum"] == "3", out
    assert len({dict(kv.split("=", 1) for kv in line.split())["node"] for line in lines}) == 2, out
