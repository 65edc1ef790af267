"""Shared hosts as a user meets them (issue 16; audit F8, F20, F23): `scalebox` run as a
subprocess with the default (per-user) roots, another real user (``sbxtest``) planting things
in a shared /tmp, and a stage-job row changed in the database."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from tests.helpers import write_app
from tests.other_user import as_other, other_uid, shared_tmp
from tests.unit.test_slurm_fake import FAKES, FIXTURES

__all__ = ["shared_tmp"]  # a fixture used here

pytestmark = pytest.mark.pg

HELLO = """
name: hello
parameters: {start_task: world}
modules:
  greet:
    arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.1}
"""


def sbx(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def default_roots_env(pg_dsn: str, tmp: Path, home: Path) -> dict[str, str]:
    """No SCALEBOX_WORK_ROOT / SCALEBOX_LOCAL_DIR: the per-user defaults under TMPDIR=tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_"))}
    env.update(SCALEBOX_DSN=pg_dsn, SCALEBOX_HOME=str(home), TMPDIR=str(tmp), SCALEBOX_RUNTIME="local")
    return env


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_default_work_dirs_are_per_user_and_private(pg_dsn: str, tmp_path: Path) -> None:
    """F20: work root, app, module, slot and private dirs 0700; captured output 0600."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    app = write_app(tmp_path / "app", HELLO, {"greet/run.sh": 'echo "hello $1"\n'})
    proc = sbx(default_roots_env(pg_dsn, tmp, tmp_path / "home"), "run", "--quiet", str(app))
    assert proc.returncode == 0, proc.stderr
    base = tmp / f"scalebox-{os.geteuid()}"
    [app_dir] = (base / "work").glob("app-*")
    slot = app_dir / "greet" / f"{os.uname().nodename}-slot0"
    dirs = [p for p in app_dir.rglob("*") if p.is_dir() and not p.is_symlink()]
    assert slot.parent in dirs and any(p.name.endswith(".scalebox") for p in dirs), dirs
    assert {mode(p) for p in (base, base / "work", app_dir, *dirs)} == {0o700}
    outputs = [p for p in app_dir.rglob("run.*") if p.is_file()]
    assert outputs and {mode(p) for p in outputs} == {0o600}


def test_a_per_user_root_planted_by_another_user_is_refused(pg_dsn: str, shared_tmp: Path, tmp_path: Path) -> None:
    """F8: sbxtest made `scalebox-<root's uid>` 0777 in the shared /tmp with a run.out symlink to
    a victim file; `scalebox run` refuses in one line naming the dir, its owner and mode, and the
    victim keeps its data."""
    victim = shared_tmp / "victim-file"
    victim.write_text("IMPORTANT victim data")
    base = shared_tmp / f"scalebox-{os.geteuid()}"
    slot = base / "work" / "app-1-0" / "greet"
    as_other("mkdir", "-p", str(slot))
    as_other("chmod", "-R", "0777", str(base))
    as_other("ln", "-s", str(victim), str(slot / "run.out"))
    app = write_app(tmp_path / "app", HELLO, {"greet/run.sh": 'echo "hello $1"\n'})
    proc = sbx(default_roots_env(pg_dsn, shared_tmp, tmp_path / "home"), "run", "--quiet", str(app))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[0]
    assert line.startswith(f"scalebox: error: refusing to use {base} (owner uid {other_uid()}, mode 0777)"), line
    assert "SCALEBOX_WORK_ROOT" in proc.stderr  # the hint: how to go on
    assert victim.read_text() == "IMPORTANT victim data" and mode(base) == 0o777
    env = default_roots_env(pg_dsn, shared_tmp, tmp_path / "home")
    assert json.loads(sbx(env, "app", "list", "--json").stdout) == []  # refused before an app was made


@pytest.fixture
def slurm_env(pg_dsn: str, tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for sub in ("state", "done", "scontrol"):
        (tmp_path / sub).mkdir()
    for name, body in FAKES.items():
        exe = bin_dir / name
        exe.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
        exe.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "PG"))}
    environ.update(PATH=f"{bin_dir}{os.pathsep}{environ['PATH']}", FAKE_DIR=str(tmp_path),
                   FAKE_LOG=str(tmp_path / "calls.log"), FIXTURES=str(FIXTURES), SCALEBOX_DSN=pg_dsn,
                   SCALEBOX_WORK_ROOT=str(tmp_path / "work"), SCALEBOX_HOME=str(tmp_path / "home"))
    return environ


def test_a_stored_job_id_like_an_option_is_never_passed_to_scancel(pg_dsn: str, slurm_env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """F23: a database writer sets a stage job's id to `--me`; `stage stop --now` refuses it
    loudly instead of running `scancel --me` (which cancels every job of the caller)."""
    app = write_app(tmp_path / "app", "name: fake\nparameters: {start_task: go}\nmodules:\n  work:\n"
                    "    slurm: {time: '5', partition: p}\n", {"work/run.sh": "true\n"})
    assert sbx(slurm_env, "submit", str(app)).returncode == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("UPDATE sbx_stage_jobs SET slurm_job_id = '--me'").rowcount == 1
    proc = sbx(slurm_env, "stage", "stop", "--app", "1", "work", "--now")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "refusing Slurm job id(s) '--me'" in proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert not [c for c in calls if c.startswith("scancel")], calls
    listed = json.loads(sbx(slurm_env, "stage", "list", "--app", "1", "--json").stdout)
    assert [j["slurm_job_id"] for j in listed] == ["--me"]  # shown as it is, to be looked at
