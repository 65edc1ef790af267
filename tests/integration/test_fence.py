"""F4: a run's processes end with it, and a killed launcher's orphans end when the slot's next
session opens (real processes, no mocks; see scalebox_hpc/runtime/fence.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from scalebox_hpc.runtime import fence
from scalebox_hpc.runtime.base import RunSpec, Session, SessionSpec
from scalebox_hpc.runtime.local import LocalRuntime
from tests.helpers import running, wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def slot(tmp_path: Path) -> SessionSpec:
    """A slot's dirs as the launcher lays them out: the work dir and its private dir beside it."""
    work = tmp_path / "app-1" / "m" / "host-slot0"
    private = work.parent / f".{work.name}.scalebox"
    for d in (work, private, tmp_path / "code"):
        d.mkdir(parents=True)
    return SessionSpec(name="app-1.m.host-slot0", work_dir=work, private_dir=private, code_path=tmp_path / "code")


def script(slot: SessionSpec, text: str, name: str = "run.sh") -> Path:
    path = slot.code_path / name
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def run_spec(slot: SessionSpec, path: Path) -> RunSpec:
    return RunSpec(argv=[str(path), "body", "{}"], cwd=slot.work_dir, env={"PATH": os.environ["PATH"]},
                   stdout_path=slot.private_dir / "run.out", stderr_path=slot.private_dir / "run.err")


def named(pid: int, log: str) -> bool:
    """Whether the log names ``pid`` (as ``PID NAME``, or ``PID`` alone when its name was gone)."""
    return re.search(rf"(?<![0-9]){pid}(?![0-9])", log) is not None


def records(slot: SessionSpec) -> list[Path]:
    return sorted(slot.private_dir.glob(f"{fence.RECORD_PREFIX}*{fence.RECORD_SUFFIX}"))


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """Pids a failing test may leave behind: killed at the end, one by one."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


# -- a run's processes end with its main process ---------------------------------------------------
LATE_WRITER = """sh -c 'sleep 3; echo late >> sink-tasks.txt' &
echo $! > bg.pid
exit 0
"""


def test_background_writer_ends_with_its_run(slot: SessionSpec, caplog: pytest.LogCaptureFixture,
                                            cleanup: list[int]) -> None:
    session = LocalRuntime().open(slot)
    run = session.start(run_spec(slot, script(slot, LATE_WRITER)))
    with caplog.at_level(logging.WARNING, logger="scalebox_hpc.runtime.local"):
        outcome = run.wait(10)
    assert outcome is not None and outcome.returncode == 0 and not outcome.timed_out
    bg = int((slot.work_dir / "bg.pid").read_text())
    cleanup.append(bg)
    assert not running(bg)  # gone when wait() returns, before the launcher reads the work dir
    assert named(bg, caplog.text) and "ended them" in caplog.text
    assert records(slot) == []  # the run's record lives only while it runs
    time.sleep(4)
    assert not (slot.work_dir / "sink-tasks.txt").exists()
    session.close()


def test_a_child_in_another_process_group_ends_too(slot: SessionSpec, cleanup: list[int]) -> None:
    """`timeout` puts itself in a process group of its own: the fence follows the session."""
    session = LocalRuntime().open(slot)
    run = session.start(run_spec(slot, script(slot, "timeout 60 sleep 60 &\necho $! > bg.pid\nexit 3\n")))
    outcome = run.wait(10)
    assert outcome is not None and outcome.returncode == 3
    bg = int((slot.work_dir / "bg.pid").read_text())
    cleanup.append(bg)
    assert not running(bg)


def test_a_timed_out_run_ends_its_whole_session(slot: SessionSpec, cleanup: list[int]) -> None:
    session = LocalRuntime().open(slot)
    run = session.start(run_spec(slot, script(slot, "timeout 60 sleep 61 &\necho $! > bg.pid\nsleep 62\n")))
    pid_file = slot.work_dir / "bg.pid"
    # written, not just created: the shell opens the file before `echo` fills it
    bg = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), what="bg.pid written"))
    cleanup.append(bg)
    assert run.wait(0.3) is None
    outcome = run.kill(grace=1.0)
    assert outcome.timed_out and outcome.returncode == -signal.SIGTERM
    assert not running(bg) and records(slot) == []


def test_record_names_the_live_run(slot: SessionSpec) -> None:
    session = LocalRuntime().open(slot)
    run = session.start(run_spec(slot, script(slot, "touch started; sleep 30\n")))
    wait_until(lambda: (slot.work_dir / "started").exists())
    [path] = records(slot)
    assert path.stat().st_mode & 0o777 == 0o600
    record = fence.read_record(path)
    assert record.owner == fence.this_process()
    [root] = record.roots
    assert root.find() is not None and root.pid == int(path.name.split("-")[1].split(".")[0])
    assert record.label == f"run of {slot.name}"
    run.kill(grace=1.0)
    assert records(slot) == []


# -- a killed launcher's orphans end when the next session opens ------------------------------------
STARTER = """
import sys, time
from pathlib import Path
from scalebox_hpc.runtime.base import RunSpec, SessionSpec
from scalebox_hpc.runtime.local import LocalRuntime
work, private, code = (Path(p) for p in sys.argv[1:4])
session = LocalRuntime().open(SessionSpec(name="app-1.m.host-slot0", work_dir=work, private_dir=private,
                                          code_path=code))
run = session.start(RunSpec(argv=[str(code / "run.sh"), "b", "{}"], cwd=work, env={"PATH": "/usr/bin:/bin"},
                            stdout_path=private / "run.out", stderr_path=private / "run.err"))
print(run.proc.pid, flush=True)
time.sleep(300)
"""
ORPHAN = """sh -c 'sleep 3; echo late > task-exec.json; echo late >> sink-tasks.txt' &
echo $! > bg.pid
touch started
sleep 300
"""


def test_orphans_of_a_killed_launcher_end_before_the_next_session_opens(
    slot: SessionSpec, caplog: pytest.LogCaptureFixture, cleanup: list[int],
) -> None:
    script(slot, ORPHAN)
    launcher = subprocess.Popen([sys.executable, "-c", STARTER, str(slot.work_dir), str(slot.private_dir),
                                 str(slot.code_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert launcher.stdout is not None
    main = int(launcher.stdout.readline())
    cleanup.append(main)
    wait_until(lambda: (slot.work_dir / "started").exists())
    bg = int((slot.work_dir / "bg.pid").read_text())
    cleanup.append(bg)
    (slot.private_dir / "emit-7.1.jsonl").write_text('{"body": "from the killed run"}\n')
    launcher.kill()  # kill -9: nothing of the launcher runs any more
    launcher.wait()
    assert running(main) and running(bg)  # orphans, still able to write into the work dir
    [record] = records(slot)
    with caplog.at_level(logging.WARNING, logger="scalebox_hpc.runtime.fence"):
        session = LocalRuntime().open(slot)
    assert not running(main) and not running(bg)  # ended before open() returned
    assert named(main, caplog.text) and named(bg, caplog.text) and f"pid {launcher.pid}" in caplog.text
    assert not record.exists() and not (slot.private_dir / "emit-7.1.jsonl").exists()
    time.sleep(3.5)
    assert not (slot.work_dir / "task-exec.json").exists() and not (slot.work_dir / "sink-tasks.txt").exists()
    session.close()


def test_a_dropped_session_is_fenced_by_the_next_one(slot: SessionSpec, cleanup: list[int]) -> None:
    """The same launcher re-opening a slot: the abandoned session's run is an orphan too."""
    old: Session | None = LocalRuntime().open(slot)
    assert old is not None
    run = old.start(run_spec(slot, script(slot, "touch started\nsleep 300\n")))
    pid = run.proc.pid  # type: ignore[attr-defined]
    cleanup.append(pid)
    wait_until(lambda: (slot.work_dir / "started").exists())
    del old, run  # never closed, never waited
    LocalRuntime().open(slot)
    wait_until(lambda: not running(pid), timeout=3)


def test_a_live_foreign_owner_is_not_fenced(slot: SessionSpec, caplog: pytest.LogCaptureFixture,
                                            cleanup: list[int]) -> None:
    """Another live launcher's run is reported, never killed (and its emit buffers stay)."""
    owner = subprocess.Popen(["sleep", "60"])
    child = subprocess.Popen(["sleep", "61"], start_new_session=True)
    cleanup += [owner.pid, child.pid]
    owner_proc, child_proc = fence.Proc.of(owner.pid), fence.Proc.of(child.pid)
    assert owner_proc is not None and child_proc is not None
    record = fence.Record(owner_proc, (child_proc,), "run of elsewhere")
    fence.record_path(slot.private_dir, child.pid).write_text(record.to_json())
    (slot.private_dir / "emit-1.1.jsonl").write_text("{}\n")
    with caplog.at_level(logging.ERROR, logger="scalebox_hpc.runtime.fence"):
        LocalRuntime().open(slot)
    assert running(child.pid) and f"live launcher pid {owner.pid}" in caplog.text
    assert (slot.private_dir / "emit-1.1.jsonl").exists() and records(slot)
    for p in (owner, child):
        p.kill()
        p.wait()


def test_a_reused_pid_is_not_fenced(slot: SessionSpec, cleanup: list[int]) -> None:
    """A record whose pid now belongs to another process (another start time) is dropped."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    cleanup.append(other.pid)
    start = psutil.Process(other.pid).create_time()
    dead_owner = {"pid": 2**22 - 3, "start": 1.0}
    fence.record_path(slot.private_dir, other.pid).write_text(json.dumps(
        {"owner": dead_owner, "roots": [{"pid": other.pid, "start": start - 100}], "label": "run"}))
    LocalRuntime().open(slot)
    assert running(other.pid) and records(slot) == []
    other.kill()
    other.wait()


def test_records_are_not_followed_through_links_or_fifos(slot: SessionSpec, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    me = fence.this_process()
    fence.record_path(slot.private_dir, me.pid).symlink_to(victim)
    written = fence.write_record(slot.private_dir, [me], "x")
    assert written is not None and not written.is_symlink() and victim.read_text() == "precious\n"
    written.unlink()
    fence.record_path(slot.private_dir, 12345).symlink_to(victim)
    os.mkfifo(fence.record_path(slot.private_dir, 12346))
    (slot.private_dir / ".fence-99.json.abcd.tmp").write_text("half")
    with caplog.at_level(logging.WARNING, logger="scalebox_hpc.runtime.fence"):
        LocalRuntime().open(slot)  # neither blocks on the FIFO nor reads through the link
    assert "unreadable run record" in caplog.text
    assert records(slot) == [] and victim.read_text() == "precious\n"
    assert not (slot.private_dir / ".fence-99.json.abcd.tmp").exists()


# -- end to end: the audit's reproduction (F4) -------------------------------------------------------
@pytest.mark.pg
def test_a_background_writer_is_not_credited_to_the_next_task(pg_dsn: str, tmp_path: Path) -> None:
    """One slot, tasks A then B: A leaves a process that appends to sink-tasks.txt while B runs in
    the same work dir. Without the fence B's hand-off carried A's message."""
    from scalebox_hpc.db import apps
    from scalebox_hpc.db.connection import connect
    from scalebox_hpc.launcher.launcher import LauncherConfig
    from scalebox_hpc.models import Message
    from scalebox_hpc.node import run_launcher
    from scalebox_hpc.pipeline import load_pipeline
    from tests.helpers import write_app

    app = write_app(tmp_path / "app", """
        name: f4
        modules:
          w:
            sink_modules: [s]
            arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
          s:
            arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
    """, {"w/run.sh": 'if [ "$1" = A ]; then (sleep 1.5; echo from-A >> sink-tasks.txt) & exit 0; fi\nsleep 3\n',
          "s/run.sh": "true\n"})
    with connect(pg_dsn) as conn:
        app_id = apps.create_app(conn, load_pipeline(app))
        apps.add_tasks(conn, app_id, "w", [Message("A"), Message("B")])
    run_launcher(pg_dsn, LauncherConfig(app_id=app_id, host="testhost", work_root=tmp_path / "work", local=True,
                                        slots=1))
    with connect(pg_dsn) as conn:
        rows = apps.list_tasks(conn, app_id, limit=100)
    assert sorted((t["module"], t["body"], t["status"]) for t in rows) == [("w", "A", 0), ("w", "B", 0)]
