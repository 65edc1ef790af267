"""`scalebox doctor` run as a subprocess, like a new user's first command: without Slurm on
PATH it says so with a hint (no traceback), never prints a password, and over fake Slurm
commands (tests/doctor_fakes.py, whose sbatch runs the probe on this host) it is all green."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.doctor_fakes import make_fake_slurm
from tests.helpers import write_app

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parents[2]


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scalebox_hpc", "doctor", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def by_id(proc: subprocess.CompletedProcess[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for check in json.loads(proc.stdout):
        assert set(check) == {"id", "status", "target", "summary", "hint"}
        out.setdefault(check["id"], []).append(check)
    return out


@pytest.fixture
def bare_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """No Slurm, no engine: PATH is an empty directory (the interpreter is called by its path)."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    return dict(cli_env, PATH=str(empty))


def test_without_slurm_it_says_so_with_a_hint(bare_env: dict[str, str]) -> None:
    proc = doctor(bare_env, "--no-probe", "--json")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    checks = by_id(proc)
    [commands] = checks["slurm.commands"]
    assert commands["status"] == "fail" and "sinfo" in commands["summary"] and "module load" in commands["hint"]
    assert [c["status"] for c in checks["db.reachable"] + checks["db.schema"]] == ["pass", "pass"]
    assert checks["engine.present"][0]["status"] == "warn"
    assert checks["probe.job"][0]["status"] == "skip"


def test_plain_output_is_one_line_a_check(bare_env: dict[str, str]) -> None:
    proc = doctor(bare_env, "--no-probe")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and len(lines) == len(json.loads(doctor(bare_env, "--no-probe", "--json").stdout))
    [slurm] = [line for line in lines if " slurm.commands" in line]
    assert slurm.startswith("FAIL") and "(hint: install the Slurm client tools" in slurm
    assert any(line.startswith("ok    db.reachable") for line in lines)


def test_a_password_is_never_printed(bare_env: dict[str, str]) -> None:
    env = dict(bare_env, SCALEBOX_DSN="postgresql://me:s3cret-pw@127.0.0.1:1/nothing")
    for args in (("--no-probe", "--json"), ("--no-probe",)):
        proc = doctor(env, *args)
        assert proc.returncode == 1
        assert "s3cret" not in proc.stdout + proc.stderr
        assert "postgresql://me@127.0.0.1:1/nothing" in proc.stdout


def test_a_bad_dsn_is_one_line(bare_env: dict[str, str]) -> None:
    proc = doctor(dict(bare_env, SCALEBOX_DSN="nonsense pass=s3cret"), "--no-probe", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "s3cret" not in proc.stdout + proc.stderr


def test_all_green_over_fake_slurm_with_the_probe(cli_env: dict[str, str], tmp_path: Path) -> None:
    fake = make_fake_slurm(tmp_path / "slurm")
    env = dict(cli_env, **fake.env(FAKE_SBATCH_RUN="1"), SCALEBOX_LOCAL_DIR=str(tmp_path / "scratch"))
    proc = doctor(env, str(REPO / "examples" / "app-primes" / "app.yaml"), "--json")
    checks = by_id(proc)
    assert proc.returncode == 0, proc.stdout
    for check_id in ("db.reachable", "db.schema", "slurm.commands", "slurm.controller", "probe.job", "probe.python",
                     "probe.db", "probe.scratch", "probe.work_root", "probe.mpi"):
        assert [c["status"] for c in checks[check_id]] == ["pass"], checks[check_id]
    assert "connected to" in checks["probe.db"][0]["summary"]


def test_the_apps_modules_name_the_partitions(cli_env: dict[str, str], tmp_path: Path) -> None:
    fake = make_fake_slurm(tmp_path / "slurm")
    (fake.root / "sinfo.txt").write_text("debug|up\n")
    env = dict(cli_env, **fake.env())
    app = write_app(tmp_path / "app", "name: p\nslurm: {partition: batch}\nmodules:\n  a: {}\n", {"a/run.sh": "true\n"})
    created = subprocess.run([sys.executable, "-m", "scalebox_hpc", "app", "create", str(app)], env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    proc = doctor(env, "--app", created, "--no-probe", "--json")
    [partition] = by_id(proc)["slurm.partition"]
    assert proc.returncode == 1 and partition["status"] == "fail" and partition["target"] == "batch"
    assert "'batch' does not exist" in partition["summary"]


def test_the_probe_is_hidden_from_the_command_list(cli_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "--help"], env=cli_env, capture_output=True,
                          text=True, timeout=60, check=True)
    assert " doctor " in proc.stdout and "doctor-probe" not in proc.stdout
