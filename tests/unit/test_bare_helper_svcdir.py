"""The bare ``scalebox`` helper (launcher/bin) in a task with a request directory and no
task-services socket (the run.sh of an MPI farm's worker rank): semaphores and variables go
through the directory, by the sh file protocol, or by the Python CLI for what click must judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc import taskapi
from scalebox_hpc.runtime.svcdir import RequestDir

BARE = Path(__file__).resolve().parents[2] / "scalebox_hpc" / "launcher" / "bin" / "scalebox"


@pytest.fixture
def served(tmp_path: Path) -> Any:
    asked: list[taskapi.Request] = []

    def ask(request: taskapi.Request) -> Any:
        asked.append(request)
        return {"semaphore.list": {"a": 1}, "variable.set": None}.get(request.op, 3)

    directory = RequestDir(tmp_path, ask, 7, "3").start()
    yield directory, asked
    directory.stop()


def bare(directory: RequestDir, *argv: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], taskapi.SERVICES_DIR_ENV: str(directory.path), "TASK_ID": "7",
           "APP_ID": "3", "SCALEBOX_EMIT_FILE": str(directory.path.parent / "emit"), "SCALEBOX_PYTHON": python,
           "SCALEBOX_SERVICES_WAIT": "20"}
    return subprocess.run([str(BARE), *argv], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_plain_call_is_the_sh_helpers_no_python(served: Any) -> None:
    directory, asked = served
    got = bare(directory, "semaphore", "decrement", "n", "2", python="/bin/false")  # Python would fail
    assert (got.returncode, got.stdout, got.stderr) == (0, "3\n", "")
    assert asked == [taskapi.Request("semaphore.add", 7, "n", -2)]


def test_what_click_must_judge_is_the_python_clis(served: Any) -> None:
    directory, asked = served
    usage = bare(directory, "semaphore", "get")
    assert usage.returncode == 2 and usage.stdout == "" and "Error: Missing argument 'NAME'." in usage.stderr
    assert usage.stderr.startswith("Usage: scalebox semaphore get [OPTIONS] NAME\n"), usage.stderr
    bad = bare(directory, "semaphore", "create", "n", "x1")
    assert bad.returncode == 2 and "'x1' is not a valid integer." in bad.stderr, bad.stderr
    # click converts "+2", then the Python CLI asks through the directory
    plus = bare(directory, "semaphore", "increment", "n", "+2")
    assert (plus.returncode, plus.stdout, plus.stderr) == (0, "3\n", "")
    listed = bare(directory, "semaphore", "list", "--json", python=sys.executable)
    assert listed.returncode == 0 and json.loads(listed.stdout) == {"a": 1}
    assert asked[0] == taskapi.Request("semaphore.add", 7, "n", 2)
    assert not usage.stdout and not list(directory.path.iterdir())


def test_another_apps_and_reserved_names_are_refused_as_by_the_cli(served: Any) -> None:
    directory, asked = served
    other = bare(directory, "semaphore", "get", "n", "--app", "4")
    assert other.returncode == 1 and other.stdout == ""
    assert other.stderr.startswith("scalebox: error: a task may only use its own app's semaphores and variables "
                                   "(app 3)"), other.stderr
    reserved = bare(directory, "variable", "set", "_stage.python", "/tmp/evil")
    assert reserved.returncode == 1 and "reserved" in reserved.stderr, reserved.stderr
    own = bare(directory, "variable", "get", "v", "--app", "3")
    assert (own.returncode, own.stdout) == (0, "3\n")
    assert asked == [taskapi.Request("variable.get", 7, "v", None)]
