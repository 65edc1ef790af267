"""Scalebox's acceptance examples, run through `scalebox run` on a real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.pg

HERE = Path(__file__).resolve().parent


def test_retry_test(cli_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "run", str(HERE / "retry_test/app.yaml")],
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # tasks 1, 2, 3 fail in the end
    listed = subprocess.run([sys.executable, "-m", "scalebox_hpc", "task", "list", "--json"], env=cli_env,
                            capture_output=True, text=True, timeout=60, check=True)
    tasks = {t["body"]: t for t in json.loads(listed.stdout)}
    assert {b: t["status"] for b, t in tasks.items()} == {"0": 0, "1": 1, "2": 2, "3": 3}
    execs = Counter()
    for body, task in tasks.items():
        shown = subprocess.run([sys.executable, "-m", "scalebox_hpc", "task", "show", str(task["id"]), "--json"],
                               env=cli_env, capture_output=True, text=True, timeout=60, check=True)
        execs[body] = len(json.loads(shown.stdout)["execs"])
    assert execs == {"0": 1, "1": 2, "2": 4, "3": 1}


def _sbx(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=check)


def test_timeout_gen(cli_env: dict[str, str]) -> None:
    proc = _sbx(cli_env, "run", str(HERE / "timeout_gen/app.yaml"), check=False)
    assert proc.returncode == 1
    [task] = json.loads(_sbx(cli_env, "task", "list", "--json").stdout)
    assert task["status"] == 124
    [ex] = json.loads(_sbx(cli_env, "task", "show", str(task["id"]), "--json").stdout)["execs"]
    lines = ex["stdout"].splitlines()
    assert 1 <= len(lines) <= 4, lines  # about the 2 s limit, the lines printed so far kept
    assert ex["status"] == 124


def test_manual_retry_by_status_and_failed(cli_env: dict[str, str]) -> None:
    _sbx(cli_env, "run", str(HERE / "retry_test/app.yaml"), check=False)
    out = _sbx(cli_env, "task", "retry", "--status", "2").stdout
    assert "requeued 1 task(s)" in out
    assert [t["body"] for t in json.loads(_sbx(cli_env, "task", "list", "--status", "-1", "--json").stdout)] == ["2"]
    out = _sbx(cli_env, "task", "retry", "--failed").stdout
    assert "requeued 2 task(s)" in out  # 1 and 3; 2 is READY already
    proc = _sbx(cli_env, "task", "retry", check=False)
    assert proc.returncode == 2 and "--failed" in proc.stderr
