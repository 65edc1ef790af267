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
