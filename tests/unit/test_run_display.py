"""`scalebox run` on a terminal: the launcher's log (slot errors) is printed above the progress
bars through rich's console, as plain text (issue 14: the progress display shows errors)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from scalebox_hpc.cli import _RunWatcher


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_slot_errors_show_above_the_bars(restore_logging: None) -> None:
    watcher = _RunWatcher(conn=Any, app_id=1, timeout=None, quiet=False, grace=30.0)  # type: ignore[arg-type]
    console = Console(record=True, force_terminal=True, width=200)
    watcher.tty, watcher.console = True, console
    watcher.configure_logging(0)
    logging.getLogger("scalebox_hpc.launcher.slot").error(
        "slot hasher/0 failed: image '[bold]no-such-image' not found \x1b]0;pwned\x07")
    logging.getLogger("scalebox_hpc.launcher.slot").info("not shown without -v")
    text = console.export_text()
    assert "ERROR scalebox_hpc.launcher.slot: slot hasher/0 failed: image '[bold]no-such-image' not found" in text
    assert "pwned" not in text and "not shown" not in text


def test_the_signal_lines_are_printed_through_the_bars_console_as_plain_text() -> None:
    watcher = _RunWatcher(conn=Any, app_id=1, timeout=None, quiet=False, grace=30.0)  # type: ignore[arg-type]
    console = Console(record=True, force_terminal=True, width=200)
    watcher.tty, watcher.console = True, console
    watcher.say("stopping now: 2 running task(s) killed and given back (SIGINT) [bold]x[/bold] \x1b]0;pwned\x07")
    text = console.export_text()
    assert "scalebox: stopping now: 2 running task(s) killed and given back (SIGINT) [bold]x[/bold]" in text
    assert "pwned" not in text
