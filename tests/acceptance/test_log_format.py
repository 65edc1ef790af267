"""`scalebox -v --log-format json ...` (or SCALEBOX_LOG_FORMAT=json) prints one JSON object per log
line on stderr, with the facts of the log call as fields: `scalebox` as a subprocess, on a real
PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import write_app

pytestmark = pytest.mark.pg

SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]


def sbx(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"scalebox {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as JSON (a line that is not JSON fails the test)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no log output"
    return [json.loads(line) for line in lines]


def small_app(cli_env: dict[str, str], root: Path) -> str:
    app = write_app(root, """
        name: logged
        modules:
          echo:
            arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {"echo/run.sh": 'echo "$1"\n'})
    app_id = sbx(cli_env, "app", "create", str(app)).stdout.strip()
    sbx(cli_env, "task", "add", "--app", app_id, "--", "one")
    return app_id


@pytest.mark.parametrize("how", ["option", "env"])
def test_launcher_log_is_json_lines_with_extras(cli_env: dict[str, str], tmp_path: Path, how: str) -> None:
    app_id = small_app(cli_env, tmp_path / "app")
    env, opts = (cli_env, ["--log-format", "json"]) if how == "option" else (
        dict(cli_env, SCALEBOX_LOG_FORMAT="json"), [])
    proc = sbx(env, "-v", *opts, "launcher", "--app", app_id, "--slots", "1")
    records = json_lines(proc.stderr)
    for rec in records:
        assert {"ts", "level", "logger", "msg"} <= set(rec), rec
        assert rec["logger"].startswith("scalebox_hpc"), rec
    started = [r for r in records if r.get("action") == "launcher_started"]
    assert len(started) == 1, proc.stderr
    assert started[0]["msg"] == f"launcher on {started[0]['host']}: 1 slots"
    assert started[0]["app_id"] == int(app_id)
    assert started[0]["slots"] == 1


def test_text_stays_the_default(cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = small_app(cli_env, tmp_path / "app")
    proc = sbx(cli_env, "-v", "launcher", "--app", app_id, "--slots", "1")
    assert " INFO scalebox_hpc.launcher.launcher [" in proc.stderr
    assert not any(line.startswith("{") for line in proc.stderr.splitlines())


def test_an_unknown_log_format_is_a_usage_error(cli_env: dict[str, str]) -> None:
    proc = sbx(dict(cli_env, SCALEBOX_LOG_FORMAT="xml"), "app", "list", check=False)
    assert proc.returncode == 2
    assert "'xml' is not one of 'text', 'json'" in proc.stderr
