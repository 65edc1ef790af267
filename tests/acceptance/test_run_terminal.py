"""`scalebox run` on a real terminal (issue 14), driven through tmux as a user sees it: the
progress bars are drawn, a slot's error is printed above them (not through them) and the run
ends with the reason; Ctrl-C typed twice drains, then stops the running tasks now, each said
in one line above the bars, and the last line says how to continue."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.test_cli_ux import broken_pipeline
from tests.acceptance.test_ctrl_c import long_tasks, running, tasks
from tests.components import need

pytestmark = pytest.mark.pg

BOUND = 90.0
"""A hang guard only (seconds)."""
BAR = "━"
"""What rich draws its bars with."""
WRAPPER = """
import signal, subprocess, sys
signal.signal(signal.SIGINT, lambda *_: None)  # a Ctrl-C is for the command (handlers reset on exec)
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    fh.write(str(code))
"""
"""Runs the command in the pane and writes its exit code to a file."""


class Terminal:
    """One command in a detached tmux pane of its own server (150x40); the pane stays after the
    command ends, so its last screen (and the scrollback) can be read."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        conf = root / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 10000\n")
        self.tmux = ["tmux", "-L", f"sbx-{uuid.uuid4().hex[:12]}", "-f", str(conf)]
        self.env = {**env, "TERM": "xterm-256color"}
        self.code_file = root / "exit-code"

    def start(self, *argv: str) -> None:
        # the command as separate words: tmux runs it directly, no shell in between; through a
        # wrapper that writes the exit code (tmux sometimes marks a pane dead without its status)
        subprocess.run([*self.tmux, "new-session", "-d", "-s", "t", "-x", "150", "-y", "40",
                        sys.executable, "-c", WRAPPER, str(self.code_file), *argv],
                       env=self.env, check=True, timeout=30)

    def _tmux(self, *args: str) -> str:
        return subprocess.run([*self.tmux, *args], env=self.env, capture_output=True, text=True,
                              check=True, timeout=30).stdout

    def screen(self) -> list[str]:
        """Everything the pane showed, scrollback included, wrapped lines joined, blank ones and
        tmux's own "Pane is dead" left out."""
        shown = self._tmux("capture-pane", "-p", "-J", "-t", "t", "-S", "-").splitlines()
        return [line.rstrip() for line in shown if line.strip() and not line.startswith("Pane is dead")]

    def ctrl_c(self) -> None:
        """Type Ctrl-C: the terminal sends SIGINT to its foreground process group."""
        self._tmux("send-keys", "-t", "t", "C-c")

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + BOUND
        while not any(text in line for line in self.screen()):
            assert time.monotonic() < deadline, ("never shown", text, self.screen())
            time.sleep(0.1)

    def exit_code(self) -> int:
        """Wait for the command (and its pane) to end; its exit code."""
        deadline = time.monotonic() + BOUND
        while not (self.code_file.exists() and self.code_file.read_text().strip() and
                   self._tmux("display-message", "-p", "-t", "t", "#{pane_dead}").strip() == "1"):
            assert time.monotonic() < deadline, self.screen()
            time.sleep(0.1)
        return int(self.code_file.read_text())

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], env=self.env, capture_output=True, timeout=30, check=False)


@pytest.fixture
def terminal(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        need("tmux", "`tmux` not found on PATH")
    term = Terminal(tmp_path / "tmux", cli_env)
    try:
        yield term
    finally:
        term.close()


def index(lines: list[str], pred: str) -> int:
    """The first line containing ``pred``."""
    for i, line in enumerate(lines):
        if pred in line:
            return i
    raise AssertionError((pred, lines))


def test_the_progress_display_shows_slot_errors_above_the_bars_and_ends_with_the_reason(
        terminal: Terminal, tmp_path: Path) -> None:
    terminal.start(sys.executable, "-m", "scalebox_hpc", "run", str(broken_pipeline(tmp_path / "image", "image")))
    code = terminal.exit_code()
    lines = terminal.screen()
    assert code == 1, lines
    bars = [i for i, line in enumerate(lines) if BAR in line]
    assert bars, lines  # it was drawn as bars, on a terminal
    errors = [i for i, line in enumerate(lines) if line.startswith("ERROR scalebox_hpc.launcher.slot: slot hasher/")]
    assert len(errors) == 3 and all("failed: " in lines[i] for i in errors), lines
    assert max(errors) < min(bars), lines  # above the bars, each a whole line of its own
    hasher = lines[index(lines, "hasher ")]
    assert BAR in hasher and "0/14" in hasher, hasher
    last = lines[-1]
    assert last.startswith("scalebox: hasher: all 3 slot(s) failed: ") and "14 task(s) left READY" in last, lines
    assert max(bars) < len(lines) - 1


def test_ctrl_c_twice_on_a_terminal_stops_now_said_above_the_bars(
        terminal: Terminal, tmp_path: Path, cli_env: dict[str, str]) -> None:
    app = long_tasks(tmp_path / "app")
    terminal.start(sys.executable, "-m", "scalebox_hpc", "run", "--grace", "600", str(app))
    running(cli_env, 2)
    terminal.wait_for("running 2")  # the bar shows them running
    terminal.ctrl_c()
    terminal.wait_for("scalebox: stopping: no new tasks; 2 running task(s) get up to 600 s to finish")
    terminal.ctrl_c()
    code = terminal.exit_code()
    lines = terminal.screen()
    assert code == 1, lines
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines), lines
    drain = index(lines, "scalebox: stopping: no new tasks; ")
    now = index(lines, "scalebox: stopping now: 2 running task(s) killed and given back (SIGINT)")
    bars = [i for i, line in enumerate(lines) if BAR in line]
    assert drain < now < min(bars), lines  # said above the bars, in order
    assert lines[-1] == "scalebox: stopped; 4 task(s) left unfinished; continue with `scalebox run --app 1` " \
                        "(or `scalebox launcher --app 1`)", lines
    after = tasks(cli_env)
    assert after == {tid: (-1, 0) for tid in after} and len(after) == 4, after
    assert json.loads(subprocess.run([sys.executable, "-m", "scalebox_hpc", "task", "list", "-s", "running",
                                      "--json"], env=cli_env, capture_output=True, text=True,
                                     check=True).stdout) == []
