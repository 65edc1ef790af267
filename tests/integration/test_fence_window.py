"""The fence's cheap path: an armed run's leftovers are looked for among the pids allocated since
it started, not by a scan of every process; the full scan stays the fallback (real processes;
see scalebox_hpc/runtime/fence.py, "Finding a session's members cheaply")."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import psutil
import pytest

from scalebox_hpc.runtime import fence
from tests.helpers import running


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[set[int]]]:
    """Every full scan of the process table (session_members) made meanwhile."""
    seen: list[set[int]] = []
    full = fence.session_members

    def counted(sids: set[int]) -> list[psutil.Process]:
        seen.append(set(sids))
        return full(sids)

    monkeypatch.setattr(fence, "session_members", counted)
    yield seen


def start(script: str) -> tuple[subprocess.Popen[str], int | None]:
    """A run's main process in a session of its own, armed as a session's start arms it; the
    pid it prints first (its background child), if any; returns once the main process exited."""
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True, stdout=subprocess.PIPE, text=True)
    fence.arm(proc.pid)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: its sid stays taken
    return proc, int(line) if line else None


def finish(proc: subprocess.Popen[str], bg: int | None) -> None:
    proc.wait()
    if bg is not None and running(bg):
        os.kill(bg, signal.SIGKILL)


def test_a_clean_short_run_is_fenced_without_scanning_every_process(scans: list[set[int]]) -> None:
    proc, _ = start("exit 0")
    try:
        assert fence.end_session(proc.pid) == []
    finally:
        finish(proc, None)
    assert scans == []


def test_a_leftover_in_another_process_group_is_found_in_the_window(scans: list[set[int]]) -> None:
    """`timeout` leaves the run's process group: the window follows the session, as the scan does."""
    proc, bg = start("timeout 60 sleep 60 & echo $!; exit 0")
    assert bg is not None
    try:
        left = fence.end_session(proc.pid, grace=1.0)
        assert bg in {p.pid for p in left}
        assert not running(bg)
    finally:
        finish(proc, bg)


def test_too_many_forks_meanwhile_falls_back_to_the_full_scan(
    scans: list[set[int]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pids may have wrapped past the run's own: only the scan of every process is sure."""
    proc, bg = start("sleep 60 & echo $!; exit 0")
    assert bg is not None
    forks = fence._forks()
    assert forks is not None
    monkeypatch.setattr(fence, "_forks", lambda: forks + fence._pid_max())
    try:
        left = fence.end_session(proc.pid, grace=1.0)
        assert bg in {p.pid for p in left} and not running(bg)
    finally:
        finish(proc, bg)
    assert scans and scans[0] == {proc.pid}


def test_an_unarmed_run_is_scanned_for_as_before(scans: list[set[int]]) -> None:
    proc = subprocess.Popen(["sh", "-c", "exit 0"], start_new_session=True)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    try:
        assert fence.end_session(proc.pid) == []
    finally:
        proc.wait()
    assert scans == [{proc.pid}]


def test_the_window_wraps_at_pid_max(monkeypatch: pytest.MonkeyPatch) -> None:
    top = fence._pid_max()
    monkeypatch.setattr(fence, "_last_pid", lambda: 5)
    forks = fence._forks()
    assert forks is not None
    fence._armed[top - 3] = forks
    window = fence._window(top - 3)
    assert window is not None and list(window) == [top - 2, top - 1, 2, 3, 4, 5]
    monkeypatch.setattr(fence, "_last_pid", lambda: top - 3 + fence.RANGE_SCAN_LIMIT + 1)
    fence._armed[top - 3 - fence.RANGE_SCAN_LIMIT - 5] = forks
    assert fence._window(top - 3 - fence.RANGE_SCAN_LIMIT - 5) is None  # too wide: the full scan


def test_start_times_match_psutils() -> None:
    proc = subprocess.Popen(["sleep", "5"])
    try:
        mine = fence.Proc.of(proc.pid)
        assert mine is not None and abs(mine.start - psutil.Process(proc.pid).create_time()) < 1e-6
        assert mine.find() is not None
    finally:
        proc.kill()
        proc.wait()
    assert fence.Proc.of(proc.pid) is None
