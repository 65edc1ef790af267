"""`scalebox status --watch` (issue 18), run as a user runs it: off a terminal it prints the
plain report every second and ends when the app does; on a terminal (a tmux pane) it is a live
view with progress bars that ends when the app ends, or on q, or on Ctrl-C, and puts the
terminal back as it found it every time."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.test_run_terminal import BAR, Terminal, terminal  # noqa: F401  # the fixture
from tests.helpers import write_app

pytestmark = pytest.mark.pg

SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]
BOUND = 120.0
"""A hang guard only (seconds)."""


def sbx(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=BOUND)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def app_with_tasks(root: Path, env: dict[str, str], count: int = 6) -> str:
    """An app whose ``work`` module has ``count`` READY tasks of 0.3 s (2 slots) and no launcher yet."""
    app = write_app(root, """
        name: watched
        modules:
          work:
            slots: [".*:2"]
            arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {"work/run.sh": 'sleep 0.3\necho "did $1"\n'})
    app_id = sbx(env, "app", "create", str(app)).stdout.strip()
    sbx(env, "task", "add", "--app", app_id, "-m", "work", *[f"t{i}" for i in range(count)])
    return app_id


def test_watch_off_a_terminal_prints_the_plain_report_until_the_app_ends(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = app_with_tasks(tmp_path / "app", cli_env)
    watch = subprocess.Popen([*SCALEBOX, "status", "--watch", "--app", app_id], env=cli_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sbx(cli_env, "run", "--app", app_id)
        out, err = watch.communicate(timeout=BOUND)
    finally:
        watch.kill()
    assert watch.returncode == 0, (out, err)
    assert "\x1b" not in out  # plain text, not the live view
    assert "q quits" not in out and "progress" not in out and "┃ per_minute ┃" in out
    states = [line for line in out.splitlines() if line.startswith(("WAITING", "RUNNING", "IDLE"))]
    assert len(states) >= 2, out  # refreshed while the app ran
    assert states[0].startswith("WAITING: 6 task(s) READY but no live slot"), out
    assert states[-1] == "IDLE: nothing READY or RUNNING and no live slot; 6 ok, 0 failed", out
    assert out.count(f"app {app_id} watched") == len(states)


class WatchTerminal(Terminal):
    """A pane whose wrapper also records whether the terminal's modes were put back."""

    WRAPPER = """
import signal, subprocess, sys, termios
signal.signal(signal.SIGINT, lambda *_: None)  # a Ctrl-C is for the command
before = termios.tcgetattr(0)
code = subprocess.call(sys.argv[2:])
restored = termios.tcgetattr(0) == before
with open(sys.argv[1], "w") as fh:
    fh.write(f"{code} {int(restored)}")
"""

    def start(self, *argv: str) -> None:
        subprocess.run([*self.tmux, "new-session", "-d", "-s", "t", "-x", "150", "-y", "40",
                        sys.executable, "-c", self.WRAPPER, str(self.code_file), *argv],
                       env=self.env, check=True, timeout=30)

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def outcome(self) -> tuple[int, bool]:
        """(exit code, whether the terminal's modes were restored) once the command ended."""
        self.exit_code_text()
        code, restored = self.code_file.read_text().split()
        return int(code), restored == "1"

    def exit_code_text(self) -> None:
        # Terminal.exit_code waits for the pane and reads an int: wait the same way
        import time

        deadline = time.monotonic() + BOUND
        while not (self.code_file.exists() and self.code_file.read_text().strip() and
                   self._tmux("display-message", "-p", "-t", "t", "#{pane_dead}").strip() == "1"):
            assert time.monotonic() < deadline, self.screen()
            time.sleep(0.1)


@pytest.fixture
def watch_terminal(terminal: Terminal) -> Iterator[WatchTerminal]:  # noqa: F811
    term = WatchTerminal.__new__(WatchTerminal)
    term.__dict__.update(terminal.__dict__)
    yield term


@pytest.mark.parametrize("how", ["q", "C-c"])
def test_the_live_view_on_a_terminal_quits_on_q_or_ctrl_c_and_restores_the_terminal(
        watch_terminal: WatchTerminal, cli_env: dict[str, str], tmp_path: Path, how: str) -> None:
    app_id = app_with_tasks(tmp_path / "app", cli_env)  # WAITING: no launcher, so it never ends by itself
    watch_terminal.start(*SCALEBOX, "status", "--watch", "--app", app_id)
    watch_terminal.wait_for("q quits")
    screen = watch_terminal.screen()
    assert any(line.startswith("work") and BAR in line and "0/6" in line for line in screen), screen
    assert screen[0] == f"app {app_id} watched: WAITING", screen
    watch_terminal.keys(how)
    code, restored = watch_terminal.outcome()
    lines = watch_terminal.screen()
    assert restored, lines
    assert not any("Traceback" in line for line in lines), lines
    if how == "q":
        assert code == 0 and lines[-1] == f"(stopped watching app {app_id}: WAITING)", lines
    else:
        assert code == 130, lines


def test_the_live_view_ends_when_the_app_ends(
        watch_terminal: WatchTerminal, cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = app_with_tasks(tmp_path / "app", cli_env)
    watch_terminal.start(*SCALEBOX, "status", "--watch", "--app", app_id)
    watch_terminal.wait_for("q quits")
    sbx(cli_env, "run", "--app", app_id)
    code, restored = watch_terminal.outcome()
    lines = watch_terminal.screen()
    assert (code, restored) == (0, True), lines
    work = [line for line in lines if line.startswith("work") and BAR in line]
    assert work and "6/6" in work[-1] and work[-1].rstrip().endswith("done"), lines
    assert any(line == f"app {app_id} watched: IDLE" for line in lines), lines
    assert "q quits" not in lines[-1]
