"""Core-hours and Slurm calls as a user sees them: `scalebox run` of tasks with known CPU use,
then `app show` (text and --json); `stage list` with the fake Slurm tools, counting the calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acceptance.test_cli_stage import APP, env  # noqa: F401  (the fake-Slurm fixture)
from tests.acceptance.test_cli_stage import sbx as sbx_fake
from tests.helpers import write_app

pytestmark = pytest.mark.pg

SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"


def sbx(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"scalebox {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_app_show_gives_the_core_hours_each_module_used(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "app", """
        name: usage
        parameters: {start_task: go}
        modules:
          start:
            sink_modules: [burn]
            arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
          burn:
            arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
    """, {"start/run.sh": "send-message a; send-message b\n",
          "burn/run.sh": f"exec {sys.executable} -c '{BURN}'\n"})
    sbx(cli_env, "run", str(app))
    shown = sbx(cli_env, "app", "show").stdout.splitlines()
    at = shown.index("resources:")
    header, *modules = shown[at + 1:at + 4]
    assert header.split()[:3] == ["module", "tasks", "execs"]
    by_name = {line.split()[0]: line.split() for line in modules}
    assert by_name["burn"][1:3] == ["2", "2"] and float(by_name["burn"][3]) > 0  # 4 decimals: 0.0003
    assert by_name["burn"][5:7] == ["-", "-"]  # `scalebox run`: no stage job, nothing allocated
    usage = {u["module"]: u for u in json.loads(sbx(cli_env, "app", "show", "--json").stdout)["usage"]}
    assert usage["burn"]["measured"] == 2 and usage["burn"]["cpu_core_hours"] * 3600 >= 0.9
    assert usage["start"]["cpu_core_hours"] * 3600 < 0.9 and usage["burn"]["efficiency"] is None
    # `scalebox status` gives the same table, and --json the same numbers
    status = sbx(cli_env, "status").stdout.splitlines()
    assert status[status.index("resources:") + 1:status.index("resources:") + 4] == shown[at + 1:at + 4]
    in_status = {u["module"]: u for u in json.loads(sbx(cli_env, "status", "--json").stdout)["usage"]}
    assert in_status == usage


def test_stage_list_shows_the_slurm_calls_counted(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    app = write_app(tmp_path / "app", APP, {"work/run.sh": "true\n"})
    assert sbx_fake(env, "submit", str(app)).returncode == 0  # sbatch (+ squeue): counted
    listed = sbx_fake(env, "stage", "list", "--app", "1")
    assert listed.returncode == 0, listed.stderr
    [line] = [x for x in listed.stdout.splitlines() if x.startswith("slurm calls")]
    counted = int(line.split(": ", 1)[1].split()[0])
    assert line.startswith("slurm calls on cluster (default): ") and counted >= 1
    assert "budget 30/min" in line and "(this app " in line
    calls = len((tmp_path / "calls.log").read_text().splitlines())
    assert counted <= calls  # never more than were run

    assert sbx_fake(env, "stage", "stop", "--now", "work").returncode == 0  # its scancel counts too
    [after] = [x for x in sbx_fake(env, "stage", "list", "--app", "1").stdout.splitlines()
               if x.startswith("slurm calls")]
    assert int(after.split(": ", 1)[1].split()[0]) > counted
