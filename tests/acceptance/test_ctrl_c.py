"""Ctrl-C twice (issue 14): the first drains and says so, a second stops the running tasks now:
they are killed (no `sleep` of theirs is left) and given back READY with their attempts as
before, the command ends at once (the tasks' `sleep 30` never gets to finish) and its last line
says how to continue. `scalebox` runs as a subprocess, as a user runs it; bare modules."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import write_app

pytestmark = pytest.mark.pg

SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]
BOUND = 60.0
"""A hang guard only (seconds): a stop now ends well within the tasks' own 30 s."""
QUICK = "{max_idle_polls: 3, sleep_interval_seconds: 0.2}"
STOP_NOW = "stopping now: 2 running task(s) killed and given back (SIGINT)"


def sbx(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=120)
    assert not check or proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


SLOW_HANDLER = """
import os
import time


def slow(task):
    with open(f"sleep-{task.body}.pid", "w") as fh:  # the worker's cwd is the slot's work dir
        fh.write(str(os.getpid()))
    time.sleep(30)
    return 0
"""


def long_tasks(root: Path, count: int = 4, *, handler: bool = False) -> Path:
    """``count`` tasks on 2 slots, each a `sleep 30` whose pid run.sh writes into the work dir
    (``handler``: an in-slot Python handler sleeping 30 s, its worker's pid written)."""
    how = "handler: slow.py:slow" if handler else ""
    app = write_app(root, f"""
        name: long
        parameters: {{start_task: "FILE:list.txt"}}
        modules:
          work:
            slots: [".*:2"]
            arguments: {QUICK}
            {how}
    """, {} if handler else {"work/run.sh": 'sleep 30 &\necho $! > "$WORK_DIR/sleep-$1.pid"\nwait\n'})
    if handler:
        (root / "work").mkdir()
        (root / "work" / "slow.py").write_text(SLOW_HANDLER)
    (root / "list.txt").write_text("".join(f"t{i}\n" for i in range(count)))
    return app


class Command:
    """A `scalebox` subprocess whose stderr is read as it comes (to signal it at the right time)."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([*SCALEBOX, *args], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.out = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, ("ended before saying", text, self.lines)
            assert time.monotonic() < deadline, ("never said", text, self.lines)
            time.sleep(0.05)

    def finish(self) -> int:
        try:
            assert self.proc.stdout is not None
            self.out = self.proc.stdout.read()
            code = self.proc.wait(timeout=BOUND)
        finally:
            self.proc.kill()
        self._reader.join(10)
        return code

    @property
    def err(self) -> str:
        return "\n".join(self.lines)


def running(env: dict[str, str], count: int, timeout: float = 60.0) -> list[dict[str, object]]:
    """Wait until ``count`` tasks run; their rows."""
    deadline = time.monotonic() + timeout
    while True:
        listed = sbx(env, "task", "list", "-s", "running", "--json", check=False)  # no app yet: not an error
        rows = json.loads(listed.stdout) if listed.returncode == 0 else []
        if len(rows) >= count:
            return list(rows)
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def sleeps(work: Path, count: int, timeout: float = 30.0) -> list[int]:
    """The pids of the tasks' `sleep 30`, once ``count`` run.sh have written them."""
    deadline = time.monotonic() + timeout
    while True:
        files = [p for p in work.rglob("sleep-*.pid") if p.read_text().strip()]
        if len(files) >= count:
            return [int(p.read_text()) for p in files]
        assert time.monotonic() < deadline, files
        time.sleep(0.1)


def alive(pids: list[int], name: str = "sleep") -> list[int]:
    """Those of ``pids`` still a live process called ``name``."""
    left = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and name in proc.name():
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def tasks(env: dict[str, str]) -> dict[int, tuple[int, int]]:
    """Every task: id -> (status, attempts)."""
    rows = json.loads(sbx(env, "task", "list", "--json").stdout)
    return {int(r["id"]): (int(r["status"]), int(r["attempts"])) for r in rows}


def stop_twice(env: dict[str, str], work: Path, *args: str, second: int = signal.SIGINT, third: bool = False,
               runs: str = "sleep") -> tuple[Command, int, list[int], dict[int, tuple[int, int]]]:
    """Run ``scalebox ARGS`` until 2 tasks run (their ``runs`` processes), Ctrl-C, wait for the
    drain's line, signal again."""
    cmd = Command(env, *args)
    try:
        running(env, 2)
        pids = sleeps(work, 2)
        assert sorted(alive(pids, runs)) == sorted(pids), pids
        before = tasks(env)
        cmd.proc.send_signal(signal.SIGINT)
        cmd.wait_for("stopping: no new tasks; 2 running task(s) get up to 600 s")
        cmd.proc.send_signal(second)
        if third:
            cmd.wait_for("stopping now:")
            cmd.proc.send_signal(signal.SIGINT)
        code = cmd.finish()
    finally:
        cmd.proc.kill()
    return cmd, code, pids, before


def test_a_second_ctrl_c_stops_the_running_tasks_now_and_gives_them_back(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    app = long_tasks(tmp_path / "app")
    cmd, code, pids, before = stop_twice(cli_env, tmp_path / "work", "run", "--grace", "600", str(app), third=True)
    assert code == 1, cmd.err
    assert "(SIGINT; Ctrl-C again stops them now)" in cmd.err, cmd.err
    assert f"scalebox: {STOP_NOW}" in cmd.err, cmd.err
    assert "scalebox: already stopping now (SIGINT ignored)" in cmd.err, cmd.err  # the third one
    assert "Traceback" not in cmd.err, cmd.err
    last = cmd.lines[-1]
    assert last == "scalebox: stopped; 4 task(s) left unfinished; continue with `scalebox run --app 1` " \
                   "(or `scalebox launcher --app 1`)", cmd.err
    assert alive(pids) == [], "the tasks' sleep 30 outlived the stop"
    assert sorted(before.values()) == [(-3, 1), (-3, 1), (-1, 0), (-1, 0)], before  # a claim counts an attempt
    after = tasks(cli_env)  # READY again, none done nor failed, the attempts not burnt
    assert after == {tid: (-1, 0) for tid in before}, (before, after)  # attempts as before the run


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_the_launcher_stops_now_on_a_second_signal(
        cli_env: dict[str, str], tmp_path: Path, second: int) -> None:
    app = long_tasks(tmp_path / "app")
    sbx(cli_env, "app", "create", str(app))
    cmd, code, pids, before = stop_twice(cli_env, tmp_path / "work", "launcher", "--app", "1", "--grace", "600",
                                         second=second)
    assert code == 0, cmd.err
    name = signal.Signals(second).name
    assert f"stopping now: 2 running task(s) killed and given back ({name})" in cmd.err, cmd.err
    assert "Traceback" not in cmd.err, cmd.err
    assert cmd.lines[-1].endswith("stopped; continue with `scalebox launcher --app 1` (or `scalebox run --app 1`)"), \
        cmd.err
    assert alive(pids) == []
    after = tasks(cli_env)
    assert after == {tid: (-1, 0) for tid in before}, (before, after)  # attempts as before the run


def test_a_second_ctrl_c_kills_python_handler_workers_too(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = long_tasks(tmp_path / "app", handler=True)
    cmd, code, pids, before = stop_twice(cli_env, tmp_path / "work", "run", "--grace", "600", str(app),
                                         runs="python")
    assert code == 1, cmd.err
    assert f"scalebox: {STOP_NOW}" in cmd.err and "Traceback" not in cmd.err, cmd.err
    assert alive(pids, "python") == [], "a handler worker outlived the stop"
    after = tasks(cli_env)
    assert after == {tid: (-1, 0) for tid in before}, (before, after)
