"""`scalebox submit` / `stage` / `autoscale` as a user runs them, with fake Slurm tools on PATH
(the failures a real Slurm cannot be made to produce on demand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import write_app
from tests.unit.test_slurm_fake import FAKES, FIXTURES

pytestmark = pytest.mark.pg

APP = """
name: fake
parameters: {start_task: go}
modules:
  work:
    slurm: {time: "5", partition: nope}
"""


@pytest.fixture
def env(pg_dsn: str, tmp_path: Path) -> dict[str, str]:
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


def sbx(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_sbatch_refusing_is_one_line_and_keeps_the_app(env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "app", APP, {"work/run.sh": "true\n"})
    proc = sbx({**env, "FAKE_SBATCH_FAIL": "sbatch_error.txt"}, "submit", str(app))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("scalebox: error: app 1: work: sbatch --parsable") and "invalid partition" in line.lower()
    assert "scalebox autoscale --app N" in line  # the hint says how to go on
    tasks = json.loads(sbx(env, "task", "list", "--app", "1", "--json").stdout)
    assert [(t["body"], t["status"]) for t in tasks] == [("go", -1)]  # nothing lost
    assert json.loads(sbx(env, "stage", "list", "--app", "1", "--all", "--json").stdout) == []

    # once sbatch works again, one autoscale pass submits the job, and the next one changes nothing
    limited = sbx(env, "autoscale", "--app", "1")  # the failed pass counts for the rate limit
    assert limited.stdout.startswith("app 1: no change (scaled moments ago: the whole app;"), limited
    first = sbx({**env, "SCALEBOX_AUTOSCALE_SECONDS": "0"}, "autoscale", "--app", "1")
    assert first.returncode == 0 and first.stdout.strip() == "app 1: work: submitted 4242", first
    [job] = json.loads(sbx(env, "stage", "list", "--app", "1", "--json").stdout)
    assert (job["slurm_job_id"], job["module"]) == ("4242", "work")
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --partition=nope" in script and "--stage-job --app 1 --module work" in script


def test_squeue_hanging_does_not_break_status(env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "app", APP, {"work/run.sh": "true\n"})
    assert sbx(env, "submit", str(app)).returncode == 0
    proc = sbx({**env, "FAKE_SQUEUE_FAIL": "Socket timed out on send/recv operation"}, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    [module] = json.loads(proc.stdout)["modules"]
    assert module["ready"] == 1 and module["jobs"] == ["4242:PENDING"]


def test_unknown_module_and_bad_bounds(env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "app", APP, {"work/run.sh": "true\n"})
    assert sbx(env, "submit", str(app)).returncode == 0
    for args, fragment in [(("stage", "scale", "nope", "--jobs", "1"), "module 'nope' not found"),
                           (("stage", "script", "nope"), "module 'nope' not found"),
                           (("stage", "scale", "work", "--min", "3", "--max", "1"), "--min 3 is above --max 1"),
                           (("stage", "scale", "work"), "give --jobs N")]:
        proc = sbx(env, *args)
        assert proc.returncode in (1, 2) and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
