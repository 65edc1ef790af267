"""SlurmClient and StatusWatcher against the real local Slurm 22.05 test-bed (launchers/testbed/slurm.sh)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from scalebox_hpc.slurm.client import SlurmClient
from scalebox_hpc.slurm.commands import SubprocessRunner
from scalebox_hpc.slurm.environment import JobEnvironment
from scalebox_hpc.slurm.parse import JobInfo, SlurmState
from scalebox_hpc.slurm.watcher import StatusWatcher
from tests.components import need, slurm_available

pytestmark = pytest.mark.slurm


@pytest.fixture
def submitted() -> Iterator[list[str]]:
    """Job ids a test submitted; whatever is still alive afterwards is cancelled."""
    ids: list[str] = []
    yield ids
    if ids:
        SlurmClient(SubprocessRunner(), use_json=False).cancel(ids)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    return tmp_path


def wait_for(client: SlurmClient, job_id: str, states: set[SlurmState], timeout: float = 15) -> JobInfo:
    """Poll ``status`` (no ``sbatch --wait``) until the job reaches one of ``states``."""
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = client.status([job_id]).get(job_id)
        if info is not None and info.state in states:
            return info
        time.sleep(0.2)
    pytest.fail(f"job {job_id} not in {sorted(s.value for s in states)} after {timeout} s (last: {info})")


@pytest.mark.parametrize("use_json", [True, False], ids=["json", "delimited"])
def test_submit_and_watch_to_completion(use_json: bool, workdir: Path, submitted: list[str]) -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)
    client = SlurmClient(SubprocessRunner(), use_json=use_json)
    common = ["--time=1", f"--chdir={workdir}", f"--output={workdir}/job-%j.out"]
    script = "#!/bin/bash\nenv | grep '^SLURM' > env.txt\necho done > result.txt\n"
    ok = client.submit(script, ["-J", "sbx_ok", *common])
    bad = client.submit("#!/bin/bash\nexit 3\n", ["-J", "sbx_fail", *common])
    submitted.extend([ok, bad])
    watcher = StatusWatcher(client, time.monotonic, interval=0.2)
    watcher.register(ok, bad)
    done = watcher.wait(ok, timeout=15, step=0.1)
    failed = watcher.wait(bad, timeout=15, step=0.1)
    assert client.json_enabled() is use_json
    assert (done.state, done.exit_code, done.name) == (SlurmState.COMPLETED, 0, "sbx_ok")
    assert (failed.state, failed.exit_code) == (SlurmState.FAILED, 3)
    assert len(done.nodes) == 1 and done.nodes[0].startswith("node")
    assert (workdir / "result.txt").read_text() == "done\n"
    env = JobEnvironment.from_env(dict(
        line.split("=", 1) for line in (workdir / "env.txt").read_text().splitlines() if "=" in line))
    assert (env.job_id, env.node_list, env.node_name) == (ok, done.nodes, done.nodes[0])


def test_cancel_long_job(workdir: Path, submitted: list[str]) -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)
    client = SlurmClient(SubprocessRunner())
    job_id = client.submit("#!/bin/bash\nsleep 300\n", ["-J", "sbx_long", "--time=5", "--output=/dev/null"])
    submitted.append(job_id)
    wait_for(client, job_id, {SlurmState.RUNNING})
    client.cancel([job_id])
    info = StatusWatcher(client, interval=0.2).wait(job_id, timeout=15, step=0.1)
    assert info.state is SlurmState.CANCELLED
    assert not info.state.is_resubmittable


def test_job_end_time_of_running_job(workdir: Path, submitted: list[str]) -> None:
    reason = slurm_available()
    if reason:
        need("slurm", reason)
    client = SlurmClient(SubprocessRunner(), use_json=False)
    job_id = client.submit("#!/bin/bash\nsleep 300\n", ["-J", "sbx_end", "--time=5", "--output=/dev/null"])
    submitted.append(job_id)
    running = wait_for(client, job_id, {SlurmState.RUNNING})
    end = client.job_end_time(job_id)
    assert end is not None
    ahead = end - datetime.now().astimezone()
    assert timedelta(minutes=4, seconds=30) < ahead <= timedelta(minutes=5, seconds=1), ahead
    assert running.end_time is not None and abs(running.end_time - end) <= timedelta(seconds=1)
    assert running.time_limit == timedelta(minutes=5)
    client.cancel([job_id])
