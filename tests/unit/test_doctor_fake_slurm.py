"""The doctor's Slurm checks and probe jobs through the Slurm adapter, against fake Slurm
commands on PATH (tests/doctor_fakes.py): the real SubprocessRunner and SlurmClient, no Slurm.
PATH holds the fakes and a few shell tools only, so the real Slurm of a test-bed is never reached."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from scalebox_hpc.doctor import gather
from scalebox_hpc.doctor.plan import ProbeTarget, SlurmTarget
from scalebox_hpc.doctor.result import Status
from scalebox_hpc.slurm.commands import SubprocessRunner
from tests.doctor_fakes import FakeSlurm, make_fake_slurm

UNREACHABLE = "postgresql://nobody:s3cret@127.0.0.1:1/none"


@pytest.fixture
def fake(tmp_path: Path) -> FakeSlurm:
    fake = make_fake_slurm(tmp_path / "slurm")
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("cat", "sh", "bash", "printf", "sleep"):
        real = next(Path(d) / tool for d in ("/usr/bin", "/bin") if (Path(d) / tool).exists())
        (tools / tool).symlink_to(real)
    fake.tools = tools  # type: ignore[attr-defined]
    return fake


def _runner(fake: FakeSlurm, **extra: str) -> SubprocessRunner:
    path = f"{fake.bin}{os.pathsep}{fake.tools}"  # type: ignore[attr-defined]
    return SubprocessRunner(extra_env={"SLURM_TIME_FORMAT": "standard", **fake.env(**extra), "PATH": path})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_healthy_cluster(fake: FakeSlurm) -> None:
    (fake.root / "sinfo.txt").write_text("debug|up\ngpu|down\n")
    found, working = gather.slurm(SlurmTarget(partitions=["debug", "gpu", "nope"]),
                                  gather.runner_clients(_runner(fake)), "me")
    assert working
    assert [(c.id, c.status) for c in found] == [
        ("slurm.commands", Status.PASS), ("slurm.controller", Status.PASS), ("slurm.partition", Status.PASS),
        ("slurm.partition", Status.WARN), ("slurm.partition", Status.FAIL)]
    assert "slurm 22.05.8" in found[0].summary
    assert fake.calls("sacctmgr") == []  # no account or QOS named: not asked


def test_a_missing_command_is_named_with_a_hint(fake: FakeSlurm) -> None:
    (fake.bin / "sbatch").unlink()
    found, working = gather.slurm(SlurmTarget(), gather.runner_clients(_runner(fake)), "me")
    assert not working
    [check] = found
    assert check.status is Status.FAIL and "sbatch" in check.summary and "module load" in check.hint


def test_a_controller_that_does_not_answer(fake: FakeSlurm) -> None:
    runner = _runner(fake, FAKE_SINFO_FAIL="Unable to contact slurm controller (connect failure)")
    found, working = gather.slurm(SlurmTarget(partitions=["debug"]), gather.runner_clients(runner), "me")
    assert not working
    assert found[-1].id == "slurm.controller" and found[-1].status is Status.FAIL
    assert "Unable to contact" in found[-1].summary and "scontrol ping" in found[-1].hint


def test_accounts_and_qos_on_a_named_cluster(fake: FakeSlurm) -> None:
    (fake.root / "assoc.txt").write_text("proj1|normal,long\n")
    (fake.root / "qos.txt").write_text("normal\nlong\ndebug\n")
    target = SlurmTarget("c2", (), ["debug"], ["proj1", "proj9"], ["long", "debug"])
    found, _ = gather.slurm(target, gather.runner_clients(_runner(fake)), "me")
    statuses = {(c.id, c.target): c.status for c in found}
    assert statuses[("slurm.account", "c2/proj1")] is Status.PASS
    assert statuses[("slurm.account", "c2/proj9")] is Status.FAIL
    assert statuses[("slurm.qos", "c2/long")] is Status.PASS
    assert statuses[("slurm.qos", "c2/debug")] is Status.FAIL  # defined, but not one of the user's
    assert any(call.startswith("sinfo -M c2 ") for call in fake.calls("sinfo"))
    assoc = [c for c in fake.calls("sacctmgr") if "assoc" in c]
    assert assoc and "user=me cluster=c2" in assoc[0] and "-M" not in assoc[0]


def test_accounts_without_slurmdbd_are_a_warning(fake: FakeSlurm) -> None:
    runner = _runner(fake, FAKE_SACCTMGR_FAIL="Problem talking to the database: Connection refused")
    found, working = gather.slurm(SlurmTarget(accounts=["proj1"]), gather.runner_clients(runner), "me")
    assert working and found[-1].status is Status.WARN and "Connection refused" in found[-1].summary


# -- the probe jobs -----------------------------------------------------------------------------
def _probe(fake: FakeSlurm, tmp_path: Path, python: str = sys.executable, timeout: float = 60.0,
           **extra: str) -> gather.ProbeOutcome:
    clock = Clock()
    runner = _runner(fake, SCALEBOX_DSN=UNREACHABLE, SCALEBOX_LOCAL_DIR=str(tmp_path / "scratch"), **extra)
    [outcome] = gather.run_probes([ProbeTarget(partition="debug")], gather.runner_clients(runner), python=python,
                                  work_root=tmp_path / "work", timeout=timeout, sleep=clock.sleep, monotonic=clock)
    return outcome


def test_a_probe_job_runs_and_its_report_comes_back(fake: FakeSlurm, tmp_path: Path) -> None:
    outcome = _probe(fake, tmp_path, FAKE_SBATCH_RUN="1")
    assert outcome.error == "" and outcome.state == "COMPLETED" and outcome.report is not None
    report = outcome.report
    assert report.python.executable == sys.executable
    assert not report.db.ok and "s3cret" not in report.db.error and report.db.dsn == "postgresql://nobody@127.0.0.1:1/none"
    assert report.mpi.plugins == ["none", "pmi2"]
    assert report.path("work_root") is not None and report.path("work_root").writable  # type: ignore[union-attr]
    [sbatch] = [c for c in fake.calls("sbatch") if "--parsable" in c]
    assert "--partition=debug" in sbatch and "--time=00:05:00" in sbatch and "--job-name=sbx-doctor" in sbatch
    assert list((tmp_path / "work" / ".doctor").iterdir()) == []  # a probe that came back leaves no files


def test_a_probe_job_that_never_starts_is_cancelled(fake: FakeSlurm, tmp_path: Path) -> None:
    outcome = _probe(fake, tmp_path, timeout=20.0)
    assert outcome.report is None and outcome.state == "PENDING" and outcome.reason == "Resources"
    assert "not done after 20 s, cancelled" in outcome.error and "busy" in outcome.error
    assert [c for c in fake.calls("scancel") if "--version" not in c] == [f"scancel -- {outcome.job_id}"]


def test_sbatch_refusing_the_probe(fake: FakeSlurm, tmp_path: Path) -> None:
    outcome = _probe(fake, tmp_path, FAKE_SBATCH_FAIL="Invalid account or account/partition combination specified")
    assert outcome.job_id == "" and "Invalid account" in outcome.error


def test_a_missing_interpreter_on_the_node(fake: FakeSlurm, tmp_path: Path) -> None:
    outcome = _probe(fake, tmp_path, python=str(tmp_path / "no-venv" / "bin" / "python"), FAKE_SBATCH_RUN="1")
    assert outcome.state == "FAILED" and outcome.report is None
    assert "no report" in outcome.error and "no-venv/bin/python" in outcome.error  # sh's "not found", from stderr


def test_garbage_instead_of_a_report(fake: FakeSlurm, tmp_path: Path) -> None:
    liar = tmp_path / "liar"
    liar.write_text("#!/bin/sh\necho 'Lmod: loading python/3.11'\nprintf '{\"scalebox_doctor_probe\": 1, \"ho'\n")
    liar.chmod(0o755)
    outcome = _probe(fake, tmp_path, python=str(liar), FAKE_SBATCH_RUN="1")
    assert outcome.state == "COMPLETED" and outcome.report is None and "truncated or malformed" in outcome.error
    assert len(list((tmp_path / "work" / ".doctor").iterdir())) == 2  # kept for the user to read
